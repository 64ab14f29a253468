//! Snapshot tests across the whole storage layer: a leader node streams a snapshot to a
//! follower node through the encoded chunks, the follower installs it, replays the leader's
//! log after the snapshot index, and must end up identical (volume table, reads, block status,
//! applied index); crash points around the install leave either the old or the new state and
//! no stray file.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, Storage};

use super::command::{encode_command, encode_write_command, Command};
use super::raft_log::RaftLogStore;
use super::snapshot::{SnapshotSource, SnapshotStaging, StagedSnapshot};
use super::state_machine::{ApplyOutcome, StateMachine, VolumeInfo};
use super::{open_db, StorageError, StorageOptions, IMAGES_DIRECTORY_NAME};

const GROUP_ID: u64 = 1;
const KIB: u64 = 1024;
const TERM: u64 = 2;

fn small_options() -> StorageOptions {
    StorageOptions {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        max_background_jobs: 1,
    }
}

/// One node's storage: log, state machine, and the applied index it publishes.
struct Node {
    directory: tempfile::TempDir,
    log: Option<RaftLogStore>,
    state_machine: Option<StateMachine>,
    applied_index: Arc<AtomicU64>,
}

impl Node {
    fn new() -> Self {
        let mut node = Node {
            directory: tempfile::tempdir().unwrap(),
            log: None,
            state_machine: None,
            applied_index: Arc::new(AtomicU64::new(0)),
        };
        node.open();
        node.log()
            .bootstrap(
                ConfState {
                    voters: vec![1, 2, 3],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        node
    }

    fn images_dir(&self) -> std::path::PathBuf {
        self.directory.path().join(IMAGES_DIRECTORY_NAME)
    }

    fn open(&mut self) {
        let db = open_db(self.directory.path(), &small_options()).unwrap();
        let log = RaftLogStore::open(db.clone(), GROUP_ID).unwrap();
        log.set_applied_index_source(self.applied_index.clone());
        let state_machine = StateMachine::open(db, &self.images_dir(), GROUP_ID).unwrap();
        self.applied_index
            .store(state_machine.applied_index(), Ordering::Release);
        self.log = Some(log);
        self.state_machine = Some(state_machine);
    }

    /// Closes everything and opens again, replaying the log after the durable applied index.
    fn reopen(&mut self) {
        self.state_machine = None;
        self.log = None;
        self.open();
        let last = self.log().last_log_index();
        let first = self.machine().applied_index() + 1;
        let entries = self.entries(first, last);
        self.apply(&entries);
    }

    fn log(&self) -> &RaftLogStore {
        self.log.as_ref().unwrap()
    }

    fn machine(&mut self) -> &mut StateMachine {
        self.state_machine.as_mut().unwrap()
    }

    fn entries(&self, first: u64, last: u64) -> Vec<Entry> {
        if first > last {
            return Vec::new();
        }
        self.log()
            .entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap()
    }

    /// Persists `entries` (committed) and applies them, as the Raft and storage actors do.
    fn append_and_apply(&mut self, entries: &[Entry]) -> Vec<ApplyOutcome> {
        let Some(last) = entries.last() else {
            return Vec::new();
        };
        let hard_state = HardState {
            term: TERM,
            vote: 1,
            commit: last.index,
            ..Default::default()
        };
        self.log()
            .persist_ready(entries, Some(&hard_state), true)
            .unwrap();
        self.apply(entries)
    }

    fn apply(&mut self, entries: &[Entry]) -> Vec<ApplyOutcome> {
        let batch: Vec<(u64, &[u8])> = entries
            .iter()
            .map(|entry| (entry.index, &entry.data[..]))
            .collect();
        let outcomes = self.machine().apply_batch(&batch).unwrap();
        let applied_index = self.machine().applied_index();
        self.applied_index.store(applied_index, Ordering::Release);
        outcomes
    }

    fn propose(&mut self, command: Vec<u8>) -> ApplyOutcome {
        let entry = Entry {
            index: self.log().last_log_index() + 1,
            term: TERM,
            data: command.into(),
            ..Default::default()
        };
        self.append_and_apply(&[entry]).pop().unwrap()
    }

    fn create(&mut self, name: &str, size_bytes: u64, block_size_bytes: u32) -> VolumeInfo {
        match self.propose(encode_command(&Command::CreateVolume {
            name,
            size_bytes,
            block_size_bytes,
        })) {
            ApplyOutcome::VolumeCreated(info) => info,
            other => panic!("create returned {other:?}"),
        }
    }

    fn write(&mut self, volume_id: u64, writer_epoch: u64, offset: u64, length: u64, fill: u8) {
        let outcome = self.propose(encode_write_command(
            volume_id,
            writer_epoch,
            offset,
            &pattern(fill, offset, length),
        ));
        assert_eq!(outcome, ApplyOutcome::Applied);
    }

    fn attach(&mut self, name: &str, client: &str) -> u64 {
        match self.propose(encode_command(&Command::Attach {
            name,
            client,
            force: true,
            attach_id: Some(0x5eed),
        })) {
            ApplyOutcome::Attached(info) => info.attachment.unwrap().epoch,
            other => panic!("attach returned {other:?}"),
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.log().snapshot(0, 2).unwrap()
    }

    /// Everything a client or an operator can observe, for comparison between replicas.
    fn observable_state(
        &mut self,
    ) -> Vec<(VolumeInfo, Vec<u8>, Vec<super::state_machine::Extent>)> {
        let machine = self.machine();
        machine
            .volumes()
            .into_iter()
            .map(|info| {
                let reader = machine.reader(info.id).unwrap();
                let mut data = vec![0u8; info.size_bytes as usize];
                // Verifies every block against its checksum as well.
                reader.read(0, &mut data).unwrap();
                let extents = reader.block_status(0, info.size_bytes).unwrap();
                (info, data, extents)
            })
            .collect()
    }

    /// File names in the images directory.
    fn image_files(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.images_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect()
    }
}

fn pattern(fill: u8, offset: u64, length: u64) -> Vec<u8> {
    (0..length)
        .map(|position| fill.wrapping_add(((offset + position) % 251) as u8) | 1)
        .collect()
}

/// Streams every remaining chunk of `source` into `staging`.
fn stream_all(source: &mut SnapshotSource, staging: &mut SnapshotStaging, data_bytes_max: usize) {
    while let Some(chunk) = source.next_chunk(data_bytes_max).unwrap() {
        staging.stage(&chunk).unwrap();
    }
}

fn stage_snapshot(leader: &mut Node, follower: &Node, snapshot: &Snapshot) -> StagedSnapshot {
    let mut source = leader.machine().snapshot_source().unwrap();
    let mut staging = SnapshotStaging::begin(
        &follower.images_dir(),
        GROUP_ID,
        snapshot.get_metadata().index,
    )
    .unwrap();
    stream_all(&mut source, &mut staging, 64 * 1024);
    staging.finish().unwrap()
}

/// A leader with two volumes of different block sizes, data, holes, a range zeroed in place
/// and an attached writer.
fn leader_with_data() -> Node {
    let mut leader = Node::new();
    let alpha = leader.create("alpha", 1024 * KIB, 4096);
    let beta = leader.create("beta", 256 * KIB, 512);
    leader.write(alpha.id, 0, 0, 300 * KIB, 7);
    leader.write(alpha.id, 0, 700 * KIB, 5000, 9);
    leader.write(beta.id, 0, 1000, 20_000, 3);
    leader.propose(encode_command(&Command::Trim {
        volume_id: alpha.id,
        writer_epoch: 0,
        offset: 64 * KIB,
        length: 128 * KIB,
    }));
    leader.propose(encode_command(&Command::WriteZeroes {
        volume_id: alpha.id,
        writer_epoch: 0,
        offset: 200 * KIB,
        length: 16 * KIB,
        may_punch_hole: false,
    }));
    let epoch = leader.attach("alpha", "host-a");
    leader.write(alpha.id, epoch, 900 * KIB, 8192, 11);
    leader
}

/// A follower with state of its own that the snapshot must replace.
fn follower_with_old_state() -> Node {
    let mut follower = Node::new();
    let old = follower.create("old", 64 * KIB, 4096);
    follower.write(old.id, 0, 0, 8192, 5);
    follower
}

#[test]
fn a_snapshot_round_trip_gives_an_identical_replica() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let old_reader = follower.machine().reader(1).unwrap();
    let snapshot = leader.snapshot();
    let metadata = snapshot.get_metadata().clone();
    assert_eq!(metadata.index, leader.machine().applied_index());

    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    assert_eq!(staged.covered_index(), metadata.index);
    let log = follower.log.clone().unwrap();
    follower
        .machine()
        .install_snapshot(staged, &log, &metadata, &[])
        .unwrap();

    assert_eq!(follower.observable_state(), leader.observable_state());
    assert_eq!(follower.machine().applied_index(), metadata.index);
    assert_eq!(follower.machine().durable_applied_index(), metadata.index);
    assert_eq!(follower.log().first_index().unwrap(), metadata.index + 1);
    assert_eq!(follower.log().last_index().unwrap(), metadata.index);
    assert_eq!(
        follower.log().term(metadata.index).unwrap(),
        leader.log().term(metadata.index).unwrap()
    );
    assert_eq!(follower.log().conf_state(), leader.log().conf_state());
    assert!(follower.log().hard_state().commit >= metadata.index);
    assert!(matches!(
        old_reader.read(0, &mut [0u8; 512]),
        Err(StorageError::VolumeReplaced { volume_id: 1 })
    ));
    // Exactly the new generation of each volume: the old image and the staging area are gone.
    let expected: BTreeSet<String> = leader
        .machine()
        .volumes()
        .iter()
        .map(|info| format!("group-{GROUP_ID}-volume-{}-gen-1.img", info.id))
        .collect();
    assert_eq!(follower.image_files(), expected);

    // After a restart: the same state, and the log goes on after the snapshot index.
    drop((old_reader, log));
    follower.reopen();
    assert_eq!(follower.observable_state(), leader.observable_state());
    assert_eq!(follower.machine().applied_index(), metadata.index);
    assert_eq!(follower.log().first_index().unwrap(), metadata.index + 1);
    assert_eq!(follower.image_files(), expected);
}

/// The fuzzy copy: the leader applies more entries (attach, writes, trims, a create, a
/// delete) after the snapshot index and while the chunks stream; the follower installs at the
/// snapshot index, replays the leader's entries after it, and converges to the leader.
#[test]
fn a_fuzzy_copy_plus_log_replay_converges_to_the_leader() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let alpha = leader.machine().volume_by_name("alpha").unwrap();
    let beta = leader.machine().volume_by_name("beta").unwrap();
    let snapshot = leader.snapshot();
    let metadata = snapshot.get_metadata().clone();
    let snapshot_index = metadata.index;

    // Between the snapshot metadata and the source: the table the source captures is newer.
    let epoch = leader.attach("alpha", "host-b");
    leader.write(alpha.id, epoch, 10 * KIB, 20 * KIB, 21);
    let gamma = leader.create("gamma", 128 * KIB, 4096);
    leader.write(gamma.id, 0, 4096, 8192, 22);
    let mut source = leader.machine().snapshot_source().unwrap();
    assert_eq!(source.covered_index(), leader.machine().applied_index());
    assert!(source.covered_index() > snapshot_index);

    let mut staging =
        SnapshotStaging::begin(&follower.images_dir(), GROUP_ID, snapshot_index).unwrap();
    let mut round = 0u64;
    while let Some(chunk) = source.next_chunk(16 * 1024).unwrap() {
        staging.stage(&chunk).unwrap();
        round += 1;
        // Keep writing over regions already copied and regions still to come.
        let offset = (round * 37 % 240) * 4096;
        leader.write(alpha.id, epoch, offset, 8192, round as u8);
        if round % 5 == 0 {
            leader.propose(encode_command(&Command::Trim {
                volume_id: alpha.id,
                writer_epoch: epoch,
                offset: offset + 1000,
                length: 30_000,
            }));
        }
        if round % 3 == 0 {
            leader.write(gamma.id, 0, (round % 30) * 4096, 6000, round as u8);
        }
        if round == 8 {
            // Deleted while its data streams: the rest of it is skipped, the delete replays.
            assert!(matches!(
                leader.propose(encode_command(&Command::DeleteVolume { name: "beta" })),
                ApplyOutcome::VolumeDeleted(_)
            ));
        }
    }
    assert!(round > 8, "the stream must outlast the delete");
    let staged = staging.finish().unwrap();
    let log = follower.log.clone().unwrap();
    follower
        .machine()
        .install_snapshot(staged, &log, &metadata, &[])
        .unwrap();
    assert_eq!(follower.machine().applied_index(), snapshot_index);
    assert!(follower.machine().reader(beta.id).is_some());

    // The leader's log after the snapshot index, as raft-rs would send it.
    let last = leader.log().last_log_index();
    let entries = leader.entries(snapshot_index + 1, last);
    let covered = follower.machine().snapshot_covered_index();
    let outcomes = follower.append_and_apply(&entries);
    for (entry, outcome) in entries.iter().zip(&outcomes) {
        if entry.index <= covered {
            assert_eq!(
                outcome,
                &ApplyOutcome::AlreadyApplied,
                "entry {}",
                entry.index
            );
        }
    }
    assert_eq!(follower.machine().applied_index(), last);
    assert!(follower.machine().reader(beta.id).is_none());
    assert_eq!(follower.observable_state(), leader.observable_state());

    // And after a restart.
    drop(log);
    follower.reopen();
    assert_eq!(follower.machine().applied_index(), last);
    assert_eq!(follower.observable_state(), leader.observable_state());
}

/// A crash after the staged snapshot is durable but before the install batch: the old state
/// is intact and the staging area disappears. A crash between the renames into the images
/// directory and the batch leaves new-generation files no row names: removed at open too.
#[test]
fn a_crash_before_the_install_batch_keeps_the_old_state() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let before = follower.observable_state();
    let files_before = follower.image_files();
    let snapshot = leader.snapshot();
    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    // A crash skips every destructor.
    std::mem::forget(staged);
    assert!(follower
        .image_files()
        .iter()
        .any(|name| name.starts_with("staging-group-1-")));
    // As if the renames had happened: a new generation nobody names yet.
    std::fs::write(
        follower
            .images_dir()
            .join(format!("group-{GROUP_ID}-volume-2-gen-1.img")),
        b"renamed before the batch",
    )
    .unwrap();
    follower.reopen();
    assert_eq!(follower.observable_state(), before);
    assert_eq!(follower.image_files(), files_before);
}

/// Dropping an unfinished staging area, or a staged snapshot never installed, removes it.
#[test]
fn dropped_staging_areas_leave_nothing_behind() {
    let mut leader = leader_with_data();
    let follower = Node::new();
    let files_before = follower.image_files();
    let snapshot = leader.snapshot();
    let mut source = leader.machine().snapshot_source().unwrap();
    let mut staging = SnapshotStaging::begin(
        &follower.images_dir(),
        GROUP_ID,
        snapshot.get_metadata().index,
    )
    .unwrap();
    for _ in 0..3 {
        let chunk = source.next_chunk(4096).unwrap().unwrap();
        staging.stage(&chunk).unwrap();
    }
    assert_ne!(follower.image_files(), files_before);
    drop(staging);
    assert_eq!(follower.image_files(), files_before);
    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    drop(staged);
    assert_eq!(follower.image_files(), files_before);
}

#[test]
fn install_refuses_mismatched_or_stale_snapshots() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let snapshot = leader.snapshot();
    let log = follower.log.clone().unwrap();

    let mut other_index = snapshot.get_metadata().clone();
    other_index.index -= 1;
    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    assert!(matches!(
        follower
            .machine()
            .install_snapshot(staged, &log, &other_index, &[]),
        Err(StorageError::SnapshotInstall { .. })
    ));

    // Not newer than what the follower applied already.
    let stale = SnapshotMetadata {
        index: 1,
        term: TERM,
        ..Default::default()
    };
    let mut staging = SnapshotStaging::begin(&follower.images_dir(), GROUP_ID, 1).unwrap();
    let mut source = leader.machine().snapshot_source().unwrap();
    stream_all(&mut source, &mut staging, 1 << 20);
    let staged = staging.finish().unwrap();
    follower.machine().make_durable().unwrap();
    follower.write(1, 0, 0, 4096, 1);
    assert!(follower.machine().applied_index() > 1);
    assert!(matches!(
        follower
            .machine()
            .install_snapshot(staged, &log, &stale, &[]),
        Err(StorageError::SnapshotInstall { .. })
    ));
    // Neither attempt changed anything.
    assert_eq!(follower.machine().volumes()[0].name, "old");
}

/// A background checkpoint begun before an install must neither record an index of the old
/// state afterwards nor disturb the next checkpoint.
#[test]
fn a_checkpoint_ticket_from_before_an_install_records_nothing() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let snapshot = leader.snapshot();
    let metadata = snapshot.get_metadata().clone();
    follower.write(1, 0, 4096, 4096, 2);
    let ticket = follower.machine().begin_checkpoint().unwrap();
    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    let log = follower.log.clone().unwrap();
    follower
        .machine()
        .install_snapshot(staged, &log, &metadata, &[])
        .unwrap();
    ticket.sync_images().unwrap();
    assert_eq!(
        follower.machine().finish_checkpoint(ticket).unwrap(),
        metadata.index
    );
    // The next checkpoint works normally.
    let alpha = follower.machine().volume_by_name("alpha").unwrap();
    let epoch = alpha.attachment.unwrap().epoch;
    let entries = leader.entries(metadata.index + 1, leader.log().last_log_index());
    follower.append_and_apply(&entries);
    let entry = Entry {
        index: follower.log().last_log_index() + 1,
        term: TERM,
        data: encode_write_command(alpha.id, epoch, 0, &[4u8; 4096]).into(),
        ..Default::default()
    };
    follower.append_and_apply(&[entry]);
    let ticket = follower.machine().begin_checkpoint().unwrap();
    ticket.sync_images().unwrap();
    let index = follower.machine().finish_checkpoint(ticket).unwrap();
    assert_eq!(index, follower.machine().applied_index());
}

/// An install that fails after it began (here: a staged image is missing when it is renamed
/// into place) must leave every image written since the last checkpoint to the next one,
/// including those a background checkpoint was syncing when the install began (that
/// checkpoint's ticket is void after an install). A checkpoint that recorded the applied index
/// without syncing them would let compaction drop the only durable copy of acknowledged
/// writes, and a power cut would then lose them.
#[test]
fn a_failed_install_leaves_unsynced_images_to_the_next_checkpoint() {
    let mut leader = leader_with_data();
    let mut follower = follower_with_old_state();
    let old = follower.machine().volume_by_name("old").unwrap().id;
    let newer = follower.create("newer", 64 * KIB, 4096).id;
    follower.machine().make_durable().unwrap();
    // "old" is being synced by a background checkpoint; "newer" is written after it began.
    follower.write(old, 0, 0, 4096, 21);
    let in_flight = follower.machine().begin_checkpoint().unwrap();
    assert!(in_flight.volume_ids().contains(&old));
    follower.write(newer, 0, 4096, 4096, 22);

    let snapshot = leader.snapshot();
    let staged = stage_snapshot(&mut leader, &follower, &snapshot);
    let missing = staged.volumes()[0].id;
    std::fs::remove_file(staged.image_path(missing)).unwrap();
    let log = follower.log.clone().unwrap();
    assert!(follower
        .machine()
        .install_snapshot(staged, &log, snapshot.get_metadata(), &[])
        .is_err());

    // The background checkpoint finishes after the failed install: void, it records nothing.
    in_flight.sync_images().unwrap();
    let applied_index = follower.machine().applied_index();
    assert!(follower.machine().finish_checkpoint(in_flight).unwrap() < applied_index);
    let next = follower.machine().begin_checkpoint().unwrap();
    assert_eq!(next.applied_index(), applied_index);
    assert_eq!(
        next.volume_ids().iter().copied().collect::<Vec<_>>(),
        vec![old, newer],
        "the next checkpoint must sync both images before it records index {applied_index}"
    );
}
