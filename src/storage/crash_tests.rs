//! Crash test in a child process (in the style of sled's `exit(9)` tests): a child writes
//! through the real log + state machine and is killed with SIGKILL at a random instant (in
//! the middle of a pwrite, a checksum batch, a checkpoint, a compaction, or its own replay);
//! the parent reopens the storage, replays the log, and checks that every write the child
//! reported as applied is there and that every block reads back with a valid checksum
//! (the storage promise: after `kill -9` at any instant, restart replays the log and every
//! acknowledged write is present; no torn or stale block is ever served).
//!
//! The child is this same test binary, started with [`CHILD_DIRECTORY_VARIABLE`] set.
//! A kill does not drop the page cache, so this checks the ordering of RocksDB writes, image
//! writes and file creation/removal against replay, not power loss.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command as ProcessCommand, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use raft::prelude::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

use super::command::{encode_command, encode_write_command, Command};
use super::raft_log::RaftLogStore;
use super::state_machine::{ApplyOutcome, StateMachine};
use super::{open_db, StorageOptions};

const CHILD_DIRECTORY_VARIABLE: &str = "RAFTBLK_STORAGE_CRASH_CHILD_DIRECTORY";
const TEST_NAME: &str = "storage::crash_tests::kill_9_at_random_instants_loses_no_applied_write";
const GROUP_ID: u64 = 1;
const VOLUME_SIZE_BYTES: u64 = 1 << 20;
const BLOCK_SIZE_BYTES: u32 = 4096;
/// Entry 1 creates the volume, so the volume id is 1.
const VOLUME_ID: u64 = 1;
const KILL_ROUNDS: usize = 8;

/// A small deterministic generator (splitmix64): the command of each index is a pure function
/// of the index, so the parent can rebuild the model from the log's last index alone.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// The command of entry `index` (>= 2) as (offset, length, fill byte; 0 = zeroing).
fn command_of(index: u64) -> (u64, u64, u8, bool) {
    let random = mix(index);
    let length = 1 + (random >> 8) % (48 * 1024);
    let offset = (random >> 24) % (VOLUME_SIZE_BYTES - length);
    let kind = random % 8;
    let fill = if kind == 0 {
        0
    } else {
        (index % 251) as u8 + 1
    };
    (offset, length, fill, kind == 1)
}

fn encoded_command_of(index: u64) -> Vec<u8> {
    if index == 1 {
        return encode_command(&Command::CreateVolume {
            name: "crash",
            size_bytes: VOLUME_SIZE_BYTES,
            block_size_bytes: BLOCK_SIZE_BYTES,
        });
    }
    let (offset, length, fill, punch) = command_of(index);
    if fill == 0 {
        encode_command(&Command::WriteZeroes {
            volume_id: VOLUME_ID,
            writer_epoch: 0,
            offset,
            length,
            may_punch_hole: punch,
        })
    } else {
        encode_write_command(VOLUME_ID, 0, offset, &vec![fill; length as usize])
    }
}

fn model_up_to(last_index: u64) -> Vec<u8> {
    let mut model = vec![0u8; VOLUME_SIZE_BYTES as usize];
    for index in 2..=last_index {
        let (offset, length, fill, _) = command_of(index);
        model[offset as usize..(offset + length) as usize].fill(fill);
    }
    model
}

fn options() -> StorageOptions {
    StorageOptions {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        max_background_jobs: 1,
    }
}

/// Opens the storage in `directory` and applies every entry of the log (one node: all of them
/// are committed), as a restarted server does.
fn open_and_replay(directory: &Path) -> (RaftLogStore, StateMachine) {
    let db = open_db(directory, &options()).unwrap();
    let log = RaftLogStore::open(db.clone(), GROUP_ID).unwrap();
    if !log.is_bootstrapped() {
        log.bootstrap(
            ConfState {
                voters: vec![1],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
    }
    let mut state_machine = StateMachine::open(db, &directory.join("images"), GROUP_ID).unwrap();
    let last_index = log.last_index().unwrap();
    let mut index = state_machine.durable_applied_index() + 1;
    while index <= last_index {
        let entries = log
            .entries(
                index,
                last_index + 1,
                1 << 20,
                GetEntriesContext::empty(false),
            )
            .unwrap();
        let batch: Vec<(u64, &[u8])> = entries
            .iter()
            .map(|entry| (entry.index, &entry.data[..]))
            .collect();
        state_machine.apply_batch(&batch).unwrap();
        index += entries.len() as u64;
    }
    (log, state_machine)
}

/// The child: resumes after the last logged entry and writes until it is killed, printing
/// `applied <index>` after each entry is durable in the log and applied.
fn run_child(directory: &Path) -> ! {
    let (log, mut state_machine) = open_and_replay(directory);
    let mut stdout = std::io::stdout();
    let mut index = log.last_index().unwrap() + 1;
    loop {
        let entry = Entry {
            index,
            term: 1,
            data: encoded_command_of(index).into(),
            ..Default::default()
        };
        let hard_state = HardState {
            term: 1,
            vote: 1,
            commit: index,
            ..Default::default()
        };
        log.persist_ready(std::slice::from_ref(&entry), Some(&hard_state), true)
            .unwrap();
        let outcome = state_machine.apply(index, &entry.data).unwrap();
        assert!(
            matches!(
                outcome,
                ApplyOutcome::Applied | ApplyOutcome::VolumeCreated(_)
            ),
            "{outcome:?}"
        );
        writeln!(stdout, "applied {index}").unwrap();
        stdout.flush().unwrap();
        if mix(index ^ 0x5555) % 16 == 0 {
            let durable = state_machine.make_durable().unwrap();
            log.compact(durable.saturating_sub(8) + 1).unwrap();
        }
        index += 1;
    }
}

#[test]
fn kill_9_at_random_instants_loses_no_applied_write() {
    if let Some(directory) = std::env::var_os(CHILD_DIRECTORY_VARIABLE) {
        run_child(Path::new(&directory));
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(1);
    println!("crash test seed {seed}");
    let directory = tempfile::tempdir().unwrap();
    let executable = std::env::current_exe().unwrap();
    let mut highest_reported_index = 0;
    for round in 0..KILL_ROUNDS as u64 {
        let random = mix(seed ^ round);
        let mut child = ProcessCommand::new(&executable)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIRECTORY_VARIABLE, directory.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines_before_kill = 10 + random % 150;
        let mut lines_seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(index) = line.strip_prefix("applied ") {
                highest_reported_index = highest_reported_index.max(index.parse().unwrap());
                lines_seen += 1;
                if lines_seen == lines_before_kill {
                    break;
                }
            }
        }
        assert_eq!(
            lines_seen, lines_before_kill,
            "round {round}: the child stopped early (seed {seed})"
        );
        // Land the kill at a random point inside the next few operations.
        std::thread::sleep(Duration::from_micros((random >> 16) % 3000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (log, state_machine) = open_and_replay(directory.path());
        let last_index = log.last_index().unwrap();
        assert!(
            last_index >= highest_reported_index,
            "round {round}: entry {highest_reported_index} was reported applied but the log ends at {last_index} (seed {seed})"
        );
        let reader = state_machine.reader(VOLUME_ID).unwrap();
        let mut contents = vec![0u8; VOLUME_SIZE_BYTES as usize];
        // Verifies the checksum of every block: no torn or stale block is served.
        reader.read(0, &mut contents).unwrap();
        assert!(
            contents == model_up_to(last_index),
            "round {round}: volume differs from the model after replaying to {last_index} (seed {seed})"
        );
    }
    assert!(highest_reported_index > KILL_ROUNDS as u64 * 10);
}
