//! The replicated state machine of one Raft group: applies committed commands to the volume
//! images and RocksDB, and serves reads of the applied state.
//!
//! Owned by the storage actor, which is the single writer: `apply*` and `make_durable` take
//! `&mut self`. Reads run on other threads through [`VolumeReader`]s, concurrently with apply.
//!
//! What lives where:
//! - block data: one sparse image file per volume (`images/group-G-volume-V.img`);
//! - in RocksDB (column family `meta`): the volume table and the durable applied index;
//! - in RocksDB (column family `block_checksums`): one crc32c per written block, an absent key
//!   meaning an all-zero block. Checksums are written in one unsynced `WriteBatch` per applied
//!   batch of entries; the next synced RocksDB write (every Raft `Ready` syncs the WAL) makes
//!   them durable, and a crash before that is repaired by replay (below).
//!
//! Durability rule: the applied index recorded in RocksDB
//! never runs ahead of what is durable in the images. [`StateMachine::make_durable`]
//! fdatasyncs every image written since the last checkpoint and only THEN records the applied
//! index, with a synced write. After a crash, the entries after the recorded index are applied
//! again from the Raft log, so applying is idempotent as a sequence: writes and zeroing rewrite
//! the same bytes and recompute the checksums of every block they touch from the image, which
//! converges to the pre-crash state whatever mixture of old and new blocks the crash left.
//! Creating and deleting a volume are checkpoints themselves (images synced, then the volume
//! row and the applied index in one synced batch), so the volume table on disk is always the
//! table as of the durable applied index, and a replayed command meets the same table it met
//! the first time (same outcome, same volume).
//!
//! Writer fencing (two writers would corrupt a file system): a volume is attached read-write to
//! at most one client. `Attach` by the holder (or on a free volume) starts a new epoch, the
//! index of the `Attach` entry; by another client it is refused as `AttachedByOther` unless
//! `force`, which takes the volume over and so fences the old epoch. An `Attach` by the holder
//! that carries the attach id of the current attachment is a retry of the request that made
//! it (on another server, or after a lost reply) and is answered with the current attachment,
//! changing nothing. `Detach` succeeds only for
//! the current epoch (otherwise `Fenced`). A Write/Trim/WriteZeroes is applied iff the volume
//! is unattached and its `writer_epoch` is 0, or attached and its `writer_epoch` is the
//! current epoch; otherwise it is rejected as `Fenced`. Every rule reads only the volume table
//! as of the previous entry, so every replica decides the same. The attachment is part of the
//! volume row and changes only in a checkpoint batch, like create and delete.
//!
//! Snapshots (a follower too far behind the leader's log; the streaming format and why a fuzzy
//! copy is correct are in the `snapshot` module doc): the follower installs a staged copy at
//! the snapshot index X0 whose volume table and images were captured at a later "covered
//! index" A >= X0. The applied index becomes X0 (the Raft log restarts right after it), and
//! apply skips entries up to A as already applied, because their effects are in the copy;
//! A is recorded in RocksDB beside the applied index. Installing is crash-safe by image file
//! GENERATIONS: the staged images are renamed to new names
//! (`images/group-G-volume-V-gen-N.img`, N in the volume row) and the directory synced; then
//! ONE synced RocksDB batch replaces the volume table, the group's checksums, the applied
//! index, the covered index and the Raft log state; only then are the old generation's files
//! deleted. A crash before the batch leaves the old rows naming the old files (the new files
//! are unreferenced); after it the new rows name the new files. `open` deletes every image
//! file no row names and every leftover staging directory, so either way no stray file
//! survives. Known limit: the batch holds one checksum per non-zero block of the snapshot in
//! memory (about 40 bytes per block).
//!
//! Layout: `read` (the per-volume state, its locks and [`VolumeReader`]), `batch` (applying
//! committed entries), `volume_table` (the commands that change the table), `checkpoint` (the
//! durability rule), `install` (snapshots), `tests`.
//!
//! Concurrency between apply and reads: each volume has striped reader-writer locks over its
//! regions. Apply takes the write locks covering a batch's ranges, in ascending order, around
//! the pwrites *and* the RocksDB write of their checksums; a read takes the read locks of its
//! range around pread + checksum lookup. So a read never pairs new data with an old checksum,
//! and a checksum mismatch on read is real corruption, not a race.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockWriteGuard};
use raft::prelude::SnapshotMetadata;
use rocksdb::{ReadOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::command::{decode_command, Command};
use super::image::{sync_directory, ImageFile, EXTENTS_MAX};
use super::raft_log::RaftLogStore;
use super::snapshot::{is_staging_directory_of, SnapshotSource, StagedSnapshot};
use super::{column_family, keys, StorageError};

/// Smallest volume block size: the NBD minimum block size.
pub const BLOCK_SIZE_BYTES_MIN: u32 = 512;
/// Largest volume block size (and the NBD preferred block size we can advertise).
pub const BLOCK_SIZE_BYTES_MAX: u32 = 64 * 1024;
/// Largest volume: 16 TiB, the largest file ext4 allows with 4 KiB blocks.
pub const VOLUME_SIZE_BYTES_MAX: u64 = 1 << 44;

/// Bytes of a volume covered by one lock region (at least one block).
const LOCK_REGION_BYTES: u64 = 64 * 1024;
/// Lock stripes per volume; region `r` is guarded by stripe `r % LOCK_STRIPES`.
const LOCK_STRIPES: usize = 64;
/// Up to this many blocks, a trim deletes checksum keys one by one; beyond, with one range
/// tombstone (many small range tombstones slow RocksDB reads down).
const POINT_DELETES_MAX: u64 = 64;

/// One row of the volume table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The Raft index of the volume's `CreateVolume` entry: the same on every replica, and
    /// never reused, even after the volume is deleted.
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    /// The client attached read-write, if any (see "Writer fencing" in the module doc).
    /// Rows written before fencing existed have no such field: unattached.
    #[serde(default)]
    pub attachment: Option<Attachment>,
}

/// The read-write attachment of a volume to one client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// Who attached (an opaque id chosen by the client, e.g. its host name).
    pub client: String,
    /// The Raft index of the `Attach` entry: unique, and larger for every later attachment,
    /// so a writer holding an older epoch is fenced.
    pub epoch: u64,
    /// The attach id of the request that made this attachment (see `Command::Attach`).
    /// Rows written before attach ids existed have none.
    #[serde(default)]
    pub attach_id: Option<u64>,
}

/// What applying one committed entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A data command or a no-op entry was applied.
    Applied,
    VolumeCreated(VolumeInfo),
    VolumeDeleted(VolumeInfo),
    /// The volume is now attached; the epoch is in `attachment`.
    Attached(VolumeInfo),
    /// The attachment ended; `attachment` is `None`.
    Detached(VolumeInfo),
    /// The volume has its new (or already had the requested) size.
    VolumeResized(VolumeInfo),
    /// The command was refused, the same way on every replica; the state is unchanged.
    Rejected(ApplyRejection),
    /// The index is at or below [`StateMachine::applied_index`]: it was applied before (for
    /// example, a restarted Raft actor re-sends committed entries from the durable applied
    /// index while this state machine kept running), so it is skipped.
    AlreadyApplied,
}

/// Why a command was refused. Deterministic on every replica, never fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyRejection {
    NoSuchVolume,
    VolumeExists,
    OutOfRange,
    /// Undecodable, or a `CreateVolume` with an invalid name, size or block size, or an
    /// `Attach` with an empty client id.
    InvalidCommand,
    /// `Attach` without `force` while another client holds the volume.
    AttachedByOther,
    /// A data command whose writer epoch is not the volume's current one (0 when unattached),
    /// or a `Detach` of an epoch that is not current.
    Fenced,
    /// A `ResizeVolume` to fewer bytes than the volume has.
    WouldShrink,
}

mod batch;
mod checkpoint;
mod install;
mod read;
#[cfg(test)]
mod tests;
mod volume_table;

pub use checkpoint::CheckpointTicket;
use read::VolumeShared;
pub use read::{Extent, VolumeReader};
pub(crate) use volume_table::valid_volume_geometry;
use volume_table::{encode_volume_row, image_file_name, parse_image_file_name, StoredVolumeRow};

/// The state machine of one Raft group.
pub struct StateMachine {
    db: Arc<DB>,
    group_id: u64,
    images_dir: PathBuf,
    volumes: BTreeMap<u64, Arc<VolumeShared>>,
    applied_index: u64,
    durable_applied_index: u64,
    /// Volumes with image writes not yet fdatasync'd by a checkpoint.
    volumes_written_since_checkpoint: BTreeSet<u64>,
    /// Volumes whose fdatasync a background checkpoint (`begin_checkpoint`) is running. Any
    /// checkpoint recorded inline meanwhile (`make_durable`, volume create/delete) syncs them
    /// too, because the index it records covers their writes.
    volumes_in_background_checkpoint: BTreeSet<u64>,
    /// Entries up to this index are already contained in the state (an installed snapshot
    /// copied the table and images as of this index or later): applying them is skipped.
    /// 0 when no snapshot was ever installed.
    snapshot_covered_index: u64,
    /// Snapshots installed since open; lets a checkpoint ticket taken before an install be
    /// recognised and ignored.
    snapshot_installs: u64,
}

/// Options of a write that is not synced (a synced one goes through
/// `durability::write_synced`).
fn unsynced_write_options() -> WriteOptions {
    WriteOptions::default()
}

impl StateMachine {
    /// Loads the volume table and the durable applied index of `group_id`, opens the images
    /// in `images_dir` (created if missing), and removes image files of this group that no
    /// volume row names (left by a crash inside a create or a delete; see the module doc).
    ///
    /// The state is that of the durable applied index: the caller must apply the committed
    /// entries after [`Self::durable_applied_index`] (raft-rs does it when given
    /// `Config::applied = durable_applied_index`) before serving reads.
    pub fn open(db: Arc<DB>, images_dir: &Path, group_id: u64) -> Result<Self, StorageError> {
        std::fs::create_dir_all(images_dir).map_err(|error| StorageError::io(images_dir, error))?;
        let meta = column_family(&db, keys::CF_META)?;
        let durable_applied_index = match db
            .get_pinned_cf(meta, keys::applied_index_key(group_id))?
        {
            Some(bytes) => keys::decode_u64(&bytes).ok_or_else(|| StorageError::Corruption {
                what: "applied index",
                detail: format!("{} bytes", bytes.len()),
            })?,
            None => 0,
        };

        let snapshot_covered_index = match db
            .get_pinned_cf(meta, keys::snapshot_covered_index_key(group_id))?
        {
            Some(bytes) => keys::decode_u64(&bytes).ok_or_else(|| StorageError::Corruption {
                what: "snapshot covered index",
                detail: format!("{} bytes", bytes.len()),
            })?,
            None => 0,
        };

        let mut rows = Vec::new();
        {
            let (lower, upper) = keys::volume_key_range(group_id);
            let mut read_options = ReadOptions::default();
            read_options.set_iterate_lower_bound(lower);
            read_options.set_iterate_upper_bound(upper);
            let mut iterator = db.raw_iterator_cf_opt(meta, read_options);
            iterator.seek_to_first();
            while let Some(value) = iterator.value() {
                let row: StoredVolumeRow =
                    serde_json::from_slice(value).map_err(|error| StorageError::Corruption {
                        what: "volume row",
                        detail: error.to_string(),
                    })?;
                rows.push(row);
                iterator.next();
            }
            iterator.status()?;
        }

        let mut volumes = BTreeMap::new();
        for StoredVolumeRow {
            info,
            image_generation,
        } in rows
        {
            let path = images_dir.join(image_file_name(group_id, info.id, image_generation));
            let image = ImageFile::open(&path)?;
            let mut file_size_bytes = image.size_bytes()?;
            if file_size_bytes > info.size_bytes {
                // A resize grew the file but its row was never written (a crash in between):
                // the entry is applied again after the durable applied index, so undo the
                // growth. The range beyond the row's size was never addressable: no data.
                image.truncate_to(info.size_bytes)?;
                file_size_bytes = image.size_bytes()?;
            }
            if file_size_bytes != info.size_bytes {
                return Err(StorageError::Corruption {
                    what: "image file size",
                    detail: format!(
                        "{}: {file_size_bytes} bytes, volume row says {}",
                        path.display(),
                        info.size_bytes
                    ),
                });
            }
            volumes.insert(
                info.id,
                Arc::new(Self::volume_shared(
                    &db,
                    group_id,
                    info,
                    image,
                    image_generation,
                )),
            );
        }

        // Image files no row names: left by a crash inside a create, a delete or a snapshot
        // install (either generation), and staging directories of unfinished snapshots.
        let mut removed_orphans = false;
        let entries =
            std::fs::read_dir(images_dir).map_err(|error| StorageError::io(images_dir, error))?;
        for entry in entries {
            let entry = entry.map_err(|error| StorageError::io(images_dir, error))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if is_staging_directory_of(group_id, file_name) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|error| StorageError::io(&path, error))?;
                removed_orphans = true;
                continue;
            }
            let Some((volume_id, image_generation)) = parse_image_file_name(group_id, file_name)
            else {
                continue;
            };
            let referenced = volumes
                .get(&volume_id)
                .is_some_and(|volume| volume.image_generation == image_generation);
            if !referenced {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|error| StorageError::io(&path, error))?;
                removed_orphans = true;
            }
        }
        if removed_orphans {
            sync_directory(images_dir)?;
        }

        Ok(StateMachine {
            db,
            group_id,
            images_dir: images_dir.to_path_buf(),
            volumes,
            applied_index: durable_applied_index,
            durable_applied_index,
            volumes_written_since_checkpoint: BTreeSet::new(),
            volumes_in_background_checkpoint: BTreeSet::new(),
            snapshot_covered_index,
            snapshot_installs: 0,
        })
    }

    fn volume_shared(
        db: &Arc<DB>,
        group_id: u64,
        info: VolumeInfo,
        image: ImageFile,
        image_generation: u64,
    ) -> VolumeShared {
        let block_size_bytes = u64::from(info.block_size_bytes);
        VolumeShared {
            size_bytes: AtomicU64::new(info.size_bytes),
            attachment: parking_lot::Mutex::new(info.attachment.clone()),
            zero_block_crc32c: crc32c::crc32c(&vec![0u8; info.block_size_bytes as usize]),
            region_bytes: LOCK_REGION_BYTES.max(block_size_bytes),
            stripes: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            deleted: AtomicBool::new(false),
            replaced: AtomicBool::new(false),
            image_generation,
            group_id,
            db: db.clone(),
            image,
            info,
        }
    }

    /// The group this state machine belongs to.
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// Index of the last applied entry (in memory).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Applied index recorded in RocksDB: everything up to it is durable in the images.
    pub fn durable_applied_index(&self) -> u64 {
        self.durable_applied_index
    }

    /// Makes every reader handed out fail with `VolumeReplaced` from now on: for a state
    /// machine about to be dropped and opened again (the storage actor restarts), whose
    /// readers would otherwise go on reading images the new one writes without their locks.
    pub fn retire_readers(&self) {
        for volume in self.volumes.values() {
            volume.retire();
        }
    }

    /// Every volume, by id.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.volumes
            .values()
            .map(|volume| volume.info_now())
            .collect()
    }

    pub fn volume_by_name(&self, name: &str) -> Option<VolumeInfo> {
        self.volume_named(name).map(|volume| volume.info_now())
    }

    fn volume_named(&self, name: &str) -> Option<Arc<VolumeShared>> {
        self.volumes
            .values()
            .find(|volume| volume.info.name == name)
            .cloned()
    }

    /// A reader of the volume, to hand to other threads.
    pub fn reader(&self, volume_id: u64) -> Option<VolumeReader> {
        self.volumes.get(&volume_id).map(|volume| VolumeReader {
            volume: volume.clone(),
        })
    }
}
