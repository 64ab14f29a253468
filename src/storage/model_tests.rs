//! Model-based property test of the whole storage layer (in the style of sled's): random
//! sequences of Write / Read / Trim / WriteZeroes / Checkpoint / Compact / Restart /
//! PowerLoss / delete-and-recreate run against the real `RaftLogStore` + `StateMachine` and
//! against an in-memory model (one `Vec<u8>` per volume); every read must match the model.
//!
//! Each command goes through the path production uses: encoded, appended to the Raft log as an
//! entry with a synced `persist_ready`, then applied (several at once with `apply_batch`).
//! Restart drops the state machine, the log and the database, reopens them, and replays the
//! log from the durable applied index + 1, which is what checks the durability rule and the
//! idempotence of replay. PowerLoss is a restart that
//! first rolls every 512-byte sector of the images written since the last checkpoint back to
//! its checkpointed content or not, at random, as a power cut may (what is not fdatasync'd may
//! or may not have reached the disk; the Raft log is synced at every step, so it survives).

use std::sync::Arc;

use proptest::prelude::*;
use raft::prelude::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

use super::command::{encode_command, encode_write_command, Command};
use super::raft_log::RaftLogStore;
use super::state_machine::{ApplyOutcome, ApplyRejection, StateMachine};
use super::{open_db, StorageOptions};

const GROUP_ID: u64 = 1;
const VOLUME_SIZE_BYTES: u64 = 64 * 1024;
/// Volume `i` has block size `BLOCK_SIZES[i]`: the default, and the NBD minimum.
const BLOCK_SIZES: [u32; 2] = [4096, 512];
const VOLUME_NAMES: [&str; 2] = ["alpha", "beta"];

#[derive(Clone, Debug)]
enum DataOp {
    Write {
        volume: usize,
        offset: u64,
        length: u64,
        seed: u8,
    },
    Trim {
        volume: usize,
        offset: u64,
        length: u64,
    },
    WriteZeroes {
        volume: usize,
        offset: u64,
        length: u64,
        may_punch_hole: bool,
    },
}

#[derive(Clone, Debug)]
enum Op {
    /// Data commands persisted in one `persist_ready` and applied with one `apply_batch`.
    Batch(Vec<DataOp>),
    Read {
        volume: usize,
        offset: u64,
        length: u64,
    },
    Checkpoint,
    Compact,
    Restart,
    /// A restart after a simulated power cut (see the module doc); the seed picks the sectors.
    PowerLoss {
        seed: u64,
    },
    /// Delete the volume and create one of the same name (a new, zeroed volume).
    Recreate {
        volume: usize,
    },
}

/// Offsets and lengths: block-aligned ones (the common case) and arbitrary ones, occasionally
/// reaching past the end of the volume to exercise the `OutOfRange` rejection.
fn range_strategy() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        3 => (0u64..16, 1u64..5).prop_map(|(block, blocks)| (block * 4096, blocks * 4096)),
        3 => (0..VOLUME_SIZE_BYTES, 0u64..12_000),
        1 => (VOLUME_SIZE_BYTES - 3000..VOLUME_SIZE_BYTES + 10, 0u64..6000),
    ]
}

fn data_op_strategy() -> impl Strategy<Value = DataOp> {
    prop_oneof![
        4 => (0usize..2, range_strategy(), any::<u8>()).prop_map(|(volume, (offset, length), seed)| {
            DataOp::Write { volume, offset, length, seed }
        }),
        1 => (0usize..2, range_strategy()).prop_map(|(volume, (offset, length))| {
            DataOp::Trim { volume, offset, length }
        }),
        1 => (0usize..2, range_strategy(), any::<bool>()).prop_map(
            |(volume, (offset, length), may_punch_hole)| DataOp::WriteZeroes {
                volume,
                offset,
                length,
                may_punch_hole
            }
        ),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(data_op_strategy(), 1..4).prop_map(Op::Batch),
        4 => (0usize..2, range_strategy()).prop_map(|(volume, (offset, length))| Op::Read { volume, offset, length }),
        2 => Just(Op::Checkpoint),
        1 => Just(Op::Compact),
        2 => Just(Op::Restart),
        2 => any::<u64>().prop_map(|seed| Op::PowerLoss { seed }),
        1 => (0usize..2).prop_map(|volume| Op::Recreate { volume }),
    ]
}

fn pattern(seed: u8, offset: u64, length: u64) -> Vec<u8> {
    (0..length)
        .map(|position| seed.wrapping_add(((offset + position) % 251) as u8) | 1)
        .collect()
}

struct Harness {
    directory: tempfile::TempDir,
    log: Option<RaftLogStore>,
    state_machine: Option<StateMachine>,
    /// Volume id of model volume `i`.
    volume_ids: [u64; 2],
    /// Image contents as of the durable applied index `checkpoint_index`: what a power cut
    /// cannot take away.
    checkpoint_images: [Vec<u8>; 2],
    checkpoint_index: u64,
    model: [Vec<u8>; 2],
}

fn small_options() -> StorageOptions {
    StorageOptions {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        max_background_jobs: 1,
    }
}

impl Harness {
    fn new() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let mut harness = Harness {
            directory,
            log: None,
            state_machine: None,
            volume_ids: [0; 2],
            checkpoint_images: [Vec::new(), Vec::new()],
            checkpoint_index: 0,
            model: [
                vec![0; VOLUME_SIZE_BYTES as usize],
                vec![0; VOLUME_SIZE_BYTES as usize],
            ],
        };
        harness.open();
        let conf_state = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        harness.log().bootstrap(conf_state, &[]).unwrap();
        for volume in 0..2 {
            harness.create(volume);
        }
        harness.note_checkpoint();
        harness
    }

    fn image_path(&self, volume: usize) -> std::path::PathBuf {
        self.directory.path().join("images").join(format!(
            "group-{GROUP_ID}-volume-{}.img",
            self.volume_ids[volume]
        ))
    }

    /// Remembers the images whenever the durable applied index moves (a checkpoint, or a
    /// create/delete, which are checkpoints): everything applied is durable at that moment.
    fn note_checkpoint(&mut self) {
        let durable = self.state_machine().durable_applied_index();
        if durable == self.checkpoint_index {
            return;
        }
        assert_eq!(self.state_machine().applied_index(), durable);
        for volume in 0..2 {
            self.checkpoint_images[volume] = std::fs::read(self.image_path(volume)).unwrap();
        }
        self.checkpoint_index = durable;
    }

    /// Closes everything, rolls back a random subset of the sectors written since the last
    /// checkpoint, and restarts.
    fn power_loss(&mut self, seed: u64) {
        self.state_machine = None;
        self.log = None;
        let mut random = seed | 1;
        for volume in 0..2 {
            let path = self.image_path(volume);
            let mut image = std::fs::read(&path).unwrap();
            for (sector, old) in image
                .chunks_exact_mut(512)
                .zip(self.checkpoint_images[volume].chunks_exact(512))
            {
                // xorshift64: a cheap, seeded coin per sector.
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                if random % 2 == 0 {
                    sector.copy_from_slice(old);
                }
            }
            std::fs::write(&path, &image).unwrap();
        }
        self.restart();
    }

    fn log(&self) -> &RaftLogStore {
        self.log.as_ref().unwrap()
    }

    fn state_machine(&mut self) -> &mut StateMachine {
        self.state_machine.as_mut().unwrap()
    }

    fn open(&mut self) {
        let db = open_db(self.directory.path(), &small_options()).unwrap();
        // A small cache, so replay reads both from the cache and from RocksDB.
        self.log = Some(
            RaftLogStore::open_with_entry_cache_bytes(db.clone(), GROUP_ID, 16 * 1024).unwrap(),
        );
        self.state_machine =
            Some(StateMachine::open(db, &self.directory.path().join("images"), GROUP_ID).unwrap());
    }

    fn restart(&mut self) {
        // No-ops when already closed (power_loss closes first).
        self.state_machine = None;
        self.log = None;
        // Every `Arc<DB>` is gone now: the database is closed, as after a crash of the process.
        self.open();
        let first = self.state_machine().durable_applied_index() + 1;
        let last = self.log().last_index().unwrap();
        let mut index = first;
        while index <= last {
            let entries: Vec<Entry> = self
                .log()
                .entries(index, last + 1, 64 * 1024, GetEntriesContext::empty(false))
                .unwrap();
            assert!(!entries.is_empty());
            let batch: Vec<(u64, &[u8])> = entries
                .iter()
                .map(|entry| (entry.index, &entry.data[..]))
                .collect();
            self.state_machine().apply_batch(&batch).unwrap();
            index += entries.len() as u64;
        }
        assert_eq!(self.state_machine().applied_index(), last);
    }

    /// Appends `commands` to the log (one synced write, committing them) and applies them.
    fn propose(&mut self, commands: Vec<Vec<u8>>) -> Vec<ApplyOutcome> {
        let first = self.log().last_log_index() + 1;
        let entries: Vec<Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(position, data)| Entry {
                index: first + position as u64,
                term: 1,
                data: data.into(),
                ..Default::default()
            })
            .collect();
        let hard_state = HardState {
            term: 1,
            vote: 1,
            commit: first + entries.len() as u64 - 1,
            ..Default::default()
        };
        self.log()
            .persist_ready(&entries, Some(&hard_state), true)
            .unwrap();
        let batch: Vec<(u64, &[u8])> = entries
            .iter()
            .map(|entry| (entry.index, &entry.data[..]))
            .collect();
        self.state_machine().apply_batch(&batch).unwrap()
    }

    fn create(&mut self, volume: usize) {
        let command = encode_command(&Command::CreateVolume {
            name: VOLUME_NAMES[volume],
            size_bytes: VOLUME_SIZE_BYTES,
            block_size_bytes: BLOCK_SIZES[volume],
        });
        let outcomes = self.propose(vec![command]);
        match &outcomes[..] {
            [ApplyOutcome::VolumeCreated(info)] => self.volume_ids[volume] = info.id,
            other => panic!("create returned {other:?}"),
        }
        self.model[volume] = vec![0; VOLUME_SIZE_BYTES as usize];
    }

    fn run_batch(&mut self, data_ops: &[DataOp]) {
        let mut commands = Vec::new();
        let mut expected = Vec::new();
        for op in data_ops {
            let (volume, offset, length) = match *op {
                DataOp::Write {
                    volume,
                    offset,
                    length,
                    ..
                }
                | DataOp::Trim {
                    volume,
                    offset,
                    length,
                }
                | DataOp::WriteZeroes {
                    volume,
                    offset,
                    length,
                    ..
                } => (volume, offset, length),
            };
            let volume_id = self.volume_ids[volume];
            commands.push(match *op {
                DataOp::Write { seed, .. } => {
                    encode_write_command(volume_id, 0, offset, &pattern(seed, offset, length))
                }
                DataOp::Trim { .. } => encode_command(&Command::Trim {
                    volume_id,
                    writer_epoch: 0,
                    offset,
                    length,
                }),
                DataOp::WriteZeroes { may_punch_hole, .. } => {
                    encode_command(&Command::WriteZeroes {
                        volume_id,
                        writer_epoch: 0,
                        offset,
                        length,
                        may_punch_hole,
                    })
                }
            });
            // The model: every accepted command sets its range, trims included (holes read as
            // zeroes).
            if offset + length > VOLUME_SIZE_BYTES {
                expected.push(ApplyOutcome::Rejected(ApplyRejection::OutOfRange));
                continue;
            }
            expected.push(ApplyOutcome::Applied);
            let range = offset as usize..(offset + length) as usize;
            match *op {
                DataOp::Write { seed, .. } => {
                    self.model[volume][range].copy_from_slice(&pattern(seed, offset, length))
                }
                DataOp::Trim { .. } | DataOp::WriteZeroes { .. } => {
                    self.model[volume][range].fill(0)
                }
            }
        }
        assert_eq!(self.propose(commands), expected);
    }

    fn check_read(&mut self, volume: usize, offset: u64, length: u64) {
        let volume_id = self.volume_ids[volume];
        let reader = self.state_machine().reader(volume_id).unwrap();
        let mut buf = vec![0u8; length as usize];
        let result = reader.read(offset, &mut buf);
        if offset + length > VOLUME_SIZE_BYTES {
            assert!(
                matches!(result, Err(super::StorageError::OutOfRange { .. })),
                "{result:?}"
            );
            return;
        }
        result.unwrap();
        let expected = &self.model[volume][offset as usize..(offset + length) as usize];
        assert!(
            buf == expected,
            "volume {volume} read {offset}+{length} differs from the model"
        );
    }

    fn check_everything(&mut self) {
        for volume in 0..2 {
            self.check_read(volume, 0, VOLUME_SIZE_BYTES);
            let volume_id = self.volume_ids[volume];
            let reader = self.state_machine().reader(volume_id).unwrap();
            let extents = reader.block_status(0, VOLUME_SIZE_BYTES).unwrap();
            let mut position = 0usize;
            for extent in extents {
                let range = position..position + extent.length_bytes as usize;
                if extent.hole || extent.zero {
                    assert!(
                        self.model[volume][range.clone()]
                            .iter()
                            .all(|&byte| byte == 0),
                        "volume {volume}: extent {range:?} reported zero/hole is not zero"
                    );
                }
                position = range.end;
            }
            assert_eq!(position as u64, VOLUME_SIZE_BYTES);
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Batch(data_ops) => self.run_batch(data_ops),
            Op::Read {
                volume,
                offset,
                length,
            } => self.check_read(*volume, *offset, *length),
            Op::Checkpoint => {
                let applied = self.state_machine().applied_index();
                assert_eq!(self.state_machine().make_durable().unwrap(), applied);
            }
            Op::Compact => {
                let durable = self.state_machine().durable_applied_index();
                self.log().compact(durable + 1).unwrap();
            }
            Op::Restart => self.restart(),
            Op::PowerLoss { seed } => self.power_loss(*seed),
            Op::Recreate { volume } => {
                let command = encode_command(&Command::DeleteVolume {
                    name: VOLUME_NAMES[*volume],
                });
                let outcomes = self.propose(vec![command]);
                assert!(
                    matches!(&outcomes[..], [ApplyOutcome::VolumeDeleted(info)] if info.id == self.volume_ids[*volume]),
                    "{outcomes:?}"
                );
                self.create(*volume);
            }
        }
        self.note_checkpoint();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn storage_matches_the_model_across_restarts(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.run(op);
        }
        harness.check_everything();
        harness.restart();
        harness.check_everything();
        // Exactly the two live volumes have image files: deleted ones leave nothing behind.
        let image_files = std::fs::read_dir(harness.directory.path().join("images")).unwrap().count();
        prop_assert_eq!(image_files, 2);
    }
}

/// A restart right after a delete-and-recreate, with no other checkpoint, still finds the new
/// volume and nothing of the old one.
#[test]
fn restart_after_recreate_without_checkpoint() {
    let mut harness = Harness::new();
    harness.run(&Op::Batch(vec![DataOp::Write {
        volume: 0,
        offset: 100,
        length: 9000,
        seed: 3,
    }]));
    harness.run(&Op::Recreate { volume: 0 });
    harness.run(&Op::Batch(vec![DataOp::Write {
        volume: 0,
        offset: 5000,
        length: 100,
        seed: 4,
    }]));
    harness.run(&Op::Restart);
    harness.check_everything();
    let volumes = harness.state_machine().volumes();
    assert_eq!(volumes.len(), 2);
    assert!(volumes.iter().any(|info| info.id == harness.volume_ids[0]));
}

/// The shared state is reachable from many threads: the reader type must be `Send + Sync`.
#[test]
fn readers_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<super::state_machine::VolumeReader>();
    assert_send_sync::<RaftLogStore>();
    let _: Option<Arc<rocksdb::DB>> = None;
}
