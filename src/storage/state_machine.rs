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

/// One extent of a `BLOCK_STATUS` reply for `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    /// `NBD_STATE_HOLE`: no storage allocated.
    pub hole: bool,
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub zero: bool,
}

/// State of one volume shared between the state machine and its readers.
struct VolumeShared {
    /// Geometry and name; its `attachment` and `size_bytes` are not maintained (see the
    /// fields of the same names).
    info: VolumeInfo,
    /// The current size: grows when a `ResizeVolume` is applied (after the image file grew),
    /// never shrinks.
    size_bytes: AtomicU64,
    /// The current attachment. Written only by apply (the single writer); a mutex rather than
    /// part of `info` because readers hold this struct across attachments.
    attachment: parking_lot::Mutex<Option<Attachment>>,
    group_id: u64,
    db: Arc<DB>,
    image: ImageFile,
    /// Bytes per lock region: a multiple of the block size, so a block is in one region.
    region_bytes: u64,
    stripes: Box<[RwLock<()>]>,
    /// Set (under all write locks) when the volume is deleted; readers check it under their
    /// read locks and fail instead of checking data against deleted checksums.
    deleted: AtomicBool,
    /// Set (under all write locks) when an installed snapshot replaced the whole state;
    /// readers fail with `VolumeReplaced` and must ask the state machine for a new reader.
    replaced: AtomicBool,
    /// Generation of the image file name (0 until a snapshot installed this volume): see
    /// "Snapshots" in the module doc.
    image_generation: u64,
    /// crc32c of an all-zero block, what a block without a checksum key must match.
    zero_block_crc32c: u32,
}

impl VolumeShared {
    /// The row as of now, attachment included.
    fn info_now(&self) -> VolumeInfo {
        VolumeInfo {
            attachment: self.attachment.lock().clone(),
            size_bytes: self.size_bytes(),
            ..self.info.clone()
        }
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Whether a data command carrying `writer_epoch` may change this volume: the writer
    /// fencing rule of the module doc.
    fn admits_writer_epoch(&self, writer_epoch: u64) -> bool {
        match &*self.attachment.lock() {
            None => writer_epoch == 0,
            Some(attachment) => writer_epoch == attachment.epoch,
        }
    }

    fn block_size(&self) -> u64 {
        u64::from(self.info.block_size_bytes)
    }

    /// `VolumeDeleted` or `VolumeReplaced` once the volume is gone (checked under the locks
    /// by reads, whose checksums would otherwise be looked up in a table that moved on).
    fn check_live(&self) -> Result<(), StorageError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(StorageError::VolumeDeleted {
                volume_id: self.info.id,
            });
        }
        if self.replaced.load(Ordering::Acquire) {
            return Err(StorageError::VolumeReplaced {
                volume_id: self.info.id,
            });
        }
        Ok(())
    }

    /// Marks the volume replaced under every write lock: no read is in flight, and every
    /// later read through a reader of it fails with `VolumeReplaced`.
    fn retire(&self) {
        let _guards: Vec<_> = self.stripes.iter().map(|stripe| stripe.write()).collect();
        self.replaced.store(true, Ordering::Release);
    }

    /// The stripes guarding `[start, end)` (non-empty range), ascending: the lock order.
    fn stripes_for(&self, start: u64, end: u64) -> Vec<usize> {
        let first_region = start / self.region_bytes;
        let last_region = (end - 1) / self.region_bytes;
        if last_region - first_region + 1 >= LOCK_STRIPES as u64 {
            return (0..LOCK_STRIPES).collect();
        }
        let mut stripes: Vec<usize> = (first_region..=last_region)
            .map(|region| (region % LOCK_STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
    }

    fn checksum_key(&self, block_index: u64) -> [u8; 24] {
        keys::block_checksum_key(self.group_id, self.info.id, block_index)
    }

    /// The recorded checksums of blocks `[first_block, end_block)`, ascending.
    fn recorded_checksums(
        &self,
        first_block: u64,
        end_block: u64,
    ) -> Result<Vec<(u64, u32)>, StorageError> {
        let checksums = column_family(&self.db, keys::CF_BLOCK_CHECKSUMS)?;
        if end_block == first_block + 1 {
            // One block (the common 4 KiB read): a point lookup is far cheaper than building
            // an iterator over every memtable and table file.
            let Some(value) = self
                .db
                .get_pinned_cf(checksums, self.checksum_key(first_block))?
            else {
                return Ok(Vec::new());
            };
            let crc32c = <[u8; 4]>::try_from(value.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| StorageError::Corruption {
                    what: "block checksum",
                    detail: format!("{} bytes for block {first_block}", value.len()),
                })?;
            return Ok(vec![(first_block, crc32c)]);
        }
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_lower_bound(self.checksum_key(first_block));
        read_options.set_iterate_upper_bound(self.checksum_key(end_block));
        let mut iterator = self.db.raw_iterator_cf_opt(checksums, read_options);
        iterator.seek_to_first();
        let mut recorded = Vec::new();
        while let Some((key, value)) = iterator.item() {
            let block_index =
                keys::block_checksum_key_block_index(self.group_id, self.info.id, key).ok_or_else(
                    || StorageError::Corruption {
                        what: "block checksum key",
                        detail: format!("{key:02x?}"),
                    },
                )?;
            let crc32c = <[u8; 4]>::try_from(value)
                .map(u32::from_be_bytes)
                .map_err(|_| StorageError::Corruption {
                    what: "block checksum",
                    detail: format!("{} bytes for block {block_index}", value.len()),
                })?;
            recorded.push((block_index, crc32c));
            iterator.next();
        }
        iterator.status()?;
        Ok(recorded)
    }

    /// Checks every block of `data`, which holds blocks `first_block..` in full.
    fn verify_blocks(&self, first_block: u64, data: &[u8]) -> Result<(), StorageError> {
        let block_size = self.info.block_size_bytes as usize;
        let block_count = (data.len() / block_size) as u64;
        let recorded = self.recorded_checksums(first_block, first_block + block_count)?;
        let mut recorded = recorded.into_iter().peekable();
        for (position, block) in data.chunks_exact(block_size).enumerate() {
            let block_index = first_block + position as u64;
            let recorded_crc32c = match recorded.peek() {
                Some(&(index, crc32c)) if index == block_index => {
                    recorded.next();
                    Some(crc32c)
                }
                _ => None,
            };
            let computed_crc32c = crc32c::crc32c(block);
            if computed_crc32c != recorded_crc32c.unwrap_or(self.zero_block_crc32c) {
                return Err(StorageError::ChecksumMismatch {
                    volume_id: self.info.id,
                    block_index,
                    recorded_crc32c,
                    computed_crc32c,
                });
            }
        }
        Ok(())
    }

    /// pwrite + the checksums of every block the write touches. Caller holds the write locks.
    fn apply_write(
        &self,
        batch: &mut WriteBatch,
        checksums: &rocksdb::ColumnFamily,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.image.write_all_at(offset, data)?;
        let block_size = self.block_size();
        let end = offset + data.len() as u64;
        let mut edge_block = Vec::new();
        for block_index in offset / block_size..=(end - 1) / block_size {
            let block_start = block_index * block_size;
            let crc32c = if block_start >= offset && block_start + block_size <= end {
                let start = (block_start - offset) as usize;
                crc32c::crc32c(&data[start..start + block_size as usize])
            } else {
                // A partially written edge block: its checksum covers bytes this command did
                // not carry, so read the whole block back from the image.
                self.read_block(block_index, &mut edge_block)?
            };
            batch.put_cf(
                checksums,
                self.checksum_key(block_index),
                crc32c.to_be_bytes(),
            );
        }
        Ok(())
    }

    /// Punch or zero `[offset, offset + length)`; drop the checksums of fully covered blocks
    /// and recompute the partial edge blocks. Caller holds the write locks.
    fn apply_zeroing(
        &self,
        batch: &mut WriteBatch,
        checksums: &rocksdb::ColumnFamily,
        offset: u64,
        length: u64,
        punch_hole: bool,
    ) -> Result<(), StorageError> {
        if punch_hole {
            self.image.punch_hole(offset, length)?;
        } else {
            self.image.zero_range(offset, length)?;
        }
        let block_size = self.block_size();
        let end = offset + length;
        let first_full_block = offset.div_ceil(block_size);
        let end_full_block = end / block_size;
        if first_full_block < end_full_block {
            if end_full_block - first_full_block <= POINT_DELETES_MAX {
                for block_index in first_full_block..end_full_block {
                    batch.delete_cf(checksums, self.checksum_key(block_index));
                }
            } else {
                batch.delete_range_cf(
                    checksums,
                    self.checksum_key(first_full_block),
                    self.checksum_key(end_full_block),
                );
            }
        }
        let mut edge_blocks = vec![offset / block_size, (end - 1) / block_size];
        edge_blocks.dedup();
        let mut edge_block = Vec::new();
        for block_index in edge_blocks {
            let block_start = block_index * block_size;
            if block_start < offset || block_start + block_size > end {
                let crc32c = self.read_block(block_index, &mut edge_block)?;
                batch.put_cf(
                    checksums,
                    self.checksum_key(block_index),
                    crc32c.to_be_bytes(),
                );
            }
        }
        Ok(())
    }

    /// Reads one block into `buffer` and returns its crc32c.
    fn read_block(&self, block_index: u64, buffer: &mut Vec<u8>) -> Result<u32, StorageError> {
        buffer.resize(self.info.block_size_bytes as usize, 0);
        self.image
            .read_exact_at(block_index * self.block_size(), buffer)?;
        Ok(crc32c::crc32c(buffer))
    }
}

/// Cheap to clone, `Send + Sync`: read access to one volume, used from many threads
/// concurrently with apply.
#[derive(Clone)]
pub struct VolumeReader {
    volume: Arc<VolumeShared>,
}

impl std::fmt::Debug for VolumeReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VolumeReader")
            .field("info", &self.volume.info)
            .finish()
    }
}

impl VolumeReader {
    /// The volume's row as of now (the attachment changes while the reader lives).
    pub fn info(&self) -> VolumeInfo {
        self.volume.info_now()
    }

    /// The volume's size as of now (it grows when a resize is applied).
    pub fn size_bytes(&self) -> u64 {
        self.volume.size_bytes()
    }

    fn check_range(&self, offset: u64, length_bytes: u64) -> Result<(), StorageError> {
        let size_bytes = self.volume.size_bytes();
        match offset.checked_add(length_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(StorageError::OutOfRange {
                volume_id: self.volume.info.id,
                offset,
                length_bytes,
                size_bytes,
            }),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`, verifying the checksum of every block the
    /// range touches. A mismatch is [`StorageError::ChecksumMismatch`]: real corruption (the
    /// locks exclude a race with apply). A range outside the volume is
    /// [`StorageError::OutOfRange`] (the caller should have checked).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.read_from(offset, buf, false).map(|_| ())
    }

    /// Like [`Self::read`], but only if the image range is in the page cache: `Ok(false)`
    /// (and `buf` meaningless) when reading would wait for the disk. For callers on an event
    /// loop; checksums are verified the same way.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, StorageError> {
        self.read_from(offset, buf, true)
    }

    fn read_from(
        &self,
        offset: u64,
        buf: &mut [u8],
        cached_only: bool,
    ) -> Result<bool, StorageError> {
        let volume = &self.volume;
        let length = buf.len() as u64;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(true);
        }
        let block_size = volume.block_size();
        let first_block = offset / block_size;
        let end_block = (offset + length).div_ceil(block_size);
        let aligned_start = first_block * block_size;
        let aligned_end = end_block * block_size;
        let read_image = |position: u64, target: &mut [u8]| -> Result<bool, StorageError> {
            if cached_only {
                volume.image.read_exact_at_cached(position, target)
            } else {
                volume.image.read_exact_at(position, target).map(|()| true)
            }
        };

        let stripes = volume.stripes_for(aligned_start, aligned_end);
        let _guards: Vec<_> = stripes
            .iter()
            .map(|&stripe| volume.stripes[stripe].read())
            .collect();
        volume.check_live()?;
        if aligned_start == offset && aligned_end == offset + length {
            if !read_image(offset, buf)? {
                return Ok(false);
            }
            volume.verify_blocks(first_block, buf)?;
        } else {
            // Unaligned: checksums cover whole blocks, so read whole blocks and copy out.
            let mut blocks = vec![0u8; (aligned_end - aligned_start) as usize];
            if !read_image(aligned_start, &mut blocks)? {
                return Ok(false);
            }
            volume.verify_blocks(first_block, &blocks)?;
            let start = (offset - aligned_start) as usize;
            buf.copy_from_slice(&blocks[start..start + buf.len()]);
        }
        Ok(true)
    }

    /// The first allocated range at or after `position` (see
    /// [`ImageFile::next_data_range`]); what a snapshot source copies.
    pub(crate) fn next_data_range(
        &self,
        position: u64,
        limit: u64,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        self.volume.check_live()?;
        self.volume.image.next_data_range(position, limit)
    }

    /// Allocation map for `base:allocation`: extents covering `[offset, offset + length)` in
    /// order (or a prefix of it, when more than [`EXTENTS_MAX`] extents would be needed).
    /// Holes are `hole + zero`; allocated blocks without a checksum (zeroed in place) are
    /// `zero`. A hint, like the spec's: it takes no lock.
    pub fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StorageError> {
        self.check_range(offset, length)?;
        let volume = &self.volume;
        volume.check_live()?;
        let block_size = volume.block_size();
        let mut extents: Vec<Extent> = Vec::new();
        let push =
            |extents: &mut Vec<Extent>, length_bytes: u64, hole: bool, zero: bool| match extents
                .last_mut()
            {
                Some(last) if last.hole == hole && last.zero == zero => {
                    last.length_bytes += length_bytes
                }
                _ => extents.push(Extent {
                    length_bytes,
                    hole,
                    zero,
                }),
            };
        let mut position = offset;
        for allocation in volume.image.allocation_map(offset, length)? {
            let end = position + allocation.length_bytes;
            if allocation.hole {
                push(&mut extents, allocation.length_bytes, true, true);
            } else {
                // Split allocated data by checksum presence: an absent key is an all-zero block.
                let first_block = position / block_size;
                let end_block = end.div_ceil(block_size);
                let recorded = volume.recorded_checksums(first_block, end_block)?;
                let mut recorded = recorded.into_iter().map(|(index, _)| index).peekable();
                let mut cursor = position;
                while cursor < end {
                    let block_index = cursor / block_size;
                    while recorded.peek().is_some_and(|&index| index < block_index) {
                        recorded.next();
                    }
                    let zero = recorded.peek() != Some(&block_index);
                    let next = ((block_index + 1) * block_size).min(end);
                    push(&mut extents, next - cursor, false, zero);
                    cursor = next;
                }
            }
            position = end;
            if extents.len() >= EXTENTS_MAX {
                extents.truncate(EXTENTS_MAX);
                break;
            }
        }
        Ok(extents)
    }
}

/// A data command checked against the volume table, ready to run under the locks.
struct PlannedDataCommand<'a> {
    volume: Arc<VolumeShared>,
    command: Command<'a>,
}

/// A checkpoint in progress (see [`StateMachine::begin_checkpoint`]): the applied index it
/// will record and the images that must be fdatasync'd first. `Send`, so the syncing can run
/// on any thread.
pub struct CheckpointTicket {
    applied_index: u64,
    /// [`StateMachine::snapshot_installs`] when the ticket was taken: a ticket from before an
    /// installed snapshot describes images that no longer exist, and records nothing.
    snapshot_installs: u64,
    volume_ids: BTreeSet<u64>,
    images: Vec<Arc<VolumeShared>>,
}

impl CheckpointTicket {
    /// The applied index this checkpoint records once its images are synced.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The volumes whose images this checkpoint syncs first.
    pub fn volume_ids(&self) -> &BTreeSet<u64> {
        &self.volume_ids
    }

    /// fdatasync every image written up to the captured applied index: their data must be on
    /// disk before an applied index covering it is recorded (the durability rule). An image
    /// deleted meanwhile is still open here, and syncing it is harmless.
    pub fn sync_images(&self) -> Result<(), StorageError> {
        for volume in &self.images {
            volume.image.sync_data()?;
        }
        Ok(())
    }
}

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

/// The image file name of a volume: generation 0 (created by `CreateVolume`) keeps the name
/// used before snapshots existed; each snapshot install writes a new generation.
fn image_file_name(group_id: u64, volume_id: u64, image_generation: u64) -> String {
    if image_generation == 0 {
        format!("group-{group_id}-volume-{volume_id}.img")
    } else {
        format!("group-{group_id}-volume-{volume_id}-gen-{image_generation}.img")
    }
}

/// The (volume id, generation) of an image file name of `group_id`, if it is one.
fn parse_image_file_name(group_id: u64, file_name: &str) -> Option<(u64, u64)> {
    let stem = file_name
        .strip_prefix(&format!("group-{group_id}-volume-"))?
        .strip_suffix(".img")?;
    match stem.split_once("-gen-") {
        None => Some((stem.parse().ok()?, 0)),
        Some((volume_id, generation)) => {
            let generation = generation.parse().ok()?;
            // Generation 0 is never spelled out: such a name is not ours.
            (generation != 0).then_some((volume_id.parse().ok()?, generation))
        }
    }
}

/// A row of the volume table as stored: the public row plus where its image is.
#[derive(Serialize, Deserialize)]
struct StoredVolumeRow {
    #[serde(flatten)]
    info: VolumeInfo,
    /// Absent in rows written before snapshots existed (generation 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    image_generation: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn encode_volume_row(info: &VolumeInfo, image_generation: u64) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(&StoredVolumeRow {
        info: info.clone(),
        image_generation,
    })
    .map_err(|error| StorageError::Corruption {
        what: "volume row",
        detail: format!("cannot encode: {error}"),
    })
}

/// Whether a `CreateVolume` (or a volume declared by a snapshot) has a valid name and geometry.
pub(crate) fn valid_volume_geometry(name: &str, size_bytes: u64, block_size_bytes: u32) -> bool {
    !name.is_empty()
        && block_size_bytes.is_power_of_two()
        && (BLOCK_SIZE_BYTES_MIN..=BLOCK_SIZE_BYTES_MAX).contains(&block_size_bytes)
        && size_bytes > 0
        && size_bytes <= VOLUME_SIZE_BYTES_MAX
        && size_bytes % u64::from(block_size_bytes) == 0
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

    /// Applies one committed entry (see [`Self::apply_batch`]).
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<ApplyOutcome, StorageError> {
        let mut outcomes = self.apply_batch(&[(index, data)])?;
        outcomes.pop().ok_or(StorageError::Corruption {
            what: "apply outcome",
            detail: "apply_batch returned no outcome for one entry".to_string(),
        })
    }

    /// Applies committed entries in index order, returning one outcome per entry; the block
    /// checksums of consecutive data commands go to RocksDB in one unsynced batch.
    ///
    /// `data` empty is a no-op entry (the leader's empty entry; the caller also passes empty
    /// data for configuration changes, which it applies to raft itself). Entries must already
    /// be persisted in the local Raft log (replay after a crash reads them from there).
    /// An index at or below [`Self::applied_index`] is skipped as
    /// [`ApplyOutcome::AlreadyApplied`]; a gap is [`StorageError::ApplyOutOfOrder`] (after
    /// applying the entries before it). After any `Err` the state machine must be dropped and
    /// reopened: the in-memory state may be ahead of what reached RocksDB.
    pub fn apply_batch(
        &mut self,
        entries: &[(u64, &[u8])],
    ) -> Result<Vec<ApplyOutcome>, StorageError> {
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut segment: Vec<PlannedDataCommand<'_>> = Vec::new();
        // Index of the last entry accepted so far (applied, or planned in `segment`).
        let mut last_index = self.applied_index;
        for &(index, data) in entries {
            if index <= last_index {
                outcomes.push(ApplyOutcome::AlreadyApplied);
                continue;
            }
            if index != last_index + 1 {
                self.apply_segment(&mut segment, last_index)?;
                return Err(StorageError::ApplyOutOfOrder {
                    group_id: self.group_id,
                    expected_index: last_index + 1,
                    index,
                });
            }
            last_index = index;
            if index <= self.snapshot_covered_index {
                // Its effect is already in the state an installed snapshot copied.
                outcomes.push(ApplyOutcome::AlreadyApplied);
                continue;
            }
            if data.is_empty() {
                outcomes.push(ApplyOutcome::Applied);
                continue;
            }
            let command = match decode_command(data) {
                Ok(command) => command,
                Err(_) => {
                    outcomes.push(ApplyOutcome::Rejected(ApplyRejection::InvalidCommand));
                    continue;
                }
            };
            match command {
                Command::Write {
                    volume_id,
                    writer_epoch,
                    offset,
                    data,
                } => {
                    outcomes.push(self.plan_data_command(
                        &mut segment,
                        volume_id,
                        writer_epoch,
                        offset,
                        data.len() as u64,
                        command,
                    ));
                }
                Command::Trim {
                    volume_id,
                    writer_epoch,
                    offset,
                    length,
                }
                | Command::WriteZeroes {
                    volume_id,
                    writer_epoch,
                    offset,
                    length,
                    ..
                } => {
                    outcomes.push(self.plan_data_command(
                        &mut segment,
                        volume_id,
                        writer_epoch,
                        offset,
                        length,
                        command,
                    ));
                }
                Command::CreateVolume {
                    name,
                    size_bytes,
                    block_size_bytes,
                } => {
                    self.apply_segment(&mut segment, index - 1)?;
                    outcomes.push(self.create_volume(index, name, size_bytes, block_size_bytes)?);
                }
                Command::DeleteVolume { name } => {
                    self.apply_segment(&mut segment, index - 1)?;
                    outcomes.push(self.delete_volume(index, name)?);
                }
                Command::Attach {
                    name,
                    client,
                    force,
                    attach_id,
                } => {
                    self.apply_segment(&mut segment, index - 1)?;
                    outcomes.push(self.attach(index, name, client, force, attach_id)?);
                }
                Command::Detach { name, epoch } => {
                    self.apply_segment(&mut segment, index - 1)?;
                    outcomes.push(self.detach(index, name, epoch)?);
                }
                Command::ResizeVolume { name, size_bytes } => {
                    self.apply_segment(&mut segment, index - 1)?;
                    outcomes.push(self.resize_volume(index, name, size_bytes)?);
                }
            }
        }
        self.apply_segment(&mut segment, last_index)?;
        Ok(outcomes)
    }

    /// Checks a data command against the volume table and queues it.
    fn plan_data_command<'a>(
        &self,
        segment: &mut Vec<PlannedDataCommand<'a>>,
        volume_id: u64,
        writer_epoch: u64,
        offset: u64,
        length: u64,
        command: Command<'a>,
    ) -> ApplyOutcome {
        let Some(volume) = self.volumes.get(&volume_id) else {
            return ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume);
        };
        // Checked when the entry is reached, against the attachment as of the entries before
        // it: attach and detach flush the pending segment first, so the order is the log's.
        if !volume.admits_writer_epoch(writer_epoch) {
            return ApplyOutcome::Rejected(ApplyRejection::Fenced);
        }
        match offset.checked_add(length) {
            Some(end) if end <= volume.size_bytes() => {}
            _ => return ApplyOutcome::Rejected(ApplyRejection::OutOfRange),
        }
        if length > 0 {
            segment.push(PlannedDataCommand {
                volume: volume.clone(),
                command,
            });
        }
        ApplyOutcome::Applied
    }

    /// Runs the queued data commands under the write locks of their ranges, writes their
    /// checksums in one batch, and advances the applied index to `last_index`.
    fn apply_segment(
        &mut self,
        segment: &mut Vec<PlannedDataCommand<'_>>,
        last_index: u64,
    ) -> Result<(), StorageError> {
        if segment.is_empty() {
            self.applied_index = self.applied_index.max(last_index);
            return Ok(());
        }
        // Every (volume, stripe) the segment touches, in ascending order: the one lock order
        // (reads lock one volume's stripes ascending too), so apply and reads cannot deadlock.
        let mut lock_set: BTreeSet<(u64, usize)> = BTreeSet::new();
        let mut volumes: BTreeMap<u64, Arc<VolumeShared>> = BTreeMap::new();
        for planned in segment.iter() {
            let (offset, length) = match planned.command {
                Command::Write { offset, data, .. } => (offset, data.len() as u64),
                Command::Trim { offset, length, .. }
                | Command::WriteZeroes { offset, length, .. } => (offset, length),
                _ => continue,
            };
            let volume = &planned.volume;
            let block_size = volume.block_size();
            let aligned_start = offset / block_size * block_size;
            let aligned_end = (offset + length).div_ceil(block_size) * block_size;
            for stripe in volume.stripes_for(aligned_start, aligned_end) {
                lock_set.insert((volume.info.id, stripe));
            }
            volumes
                .entry(volume.info.id)
                .or_insert_with(|| volume.clone());
        }
        let checksums = column_family(&self.db, keys::CF_BLOCK_CHECKSUMS)?;
        let mut batch = WriteBatch::default();
        {
            let mut guards: Vec<RwLockWriteGuard<'_, ()>> = Vec::with_capacity(lock_set.len());
            for &(volume_id, stripe) in &lock_set {
                if let Some(volume) = volumes.get(&volume_id) {
                    guards.push(volume.stripes[stripe].write());
                }
            }
            for planned in segment.iter() {
                let volume = &planned.volume;
                match planned.command {
                    Command::Write { offset, data, .. } => {
                        volume.apply_write(&mut batch, checksums, offset, data)?
                    }
                    Command::Trim { offset, length, .. } => {
                        volume.apply_zeroing(&mut batch, checksums, offset, length, true)?
                    }
                    Command::WriteZeroes {
                        offset,
                        length,
                        may_punch_hole,
                        ..
                    } => volume.apply_zeroing(
                        &mut batch,
                        checksums,
                        offset,
                        length,
                        may_punch_hole,
                    )?,
                    _ => {}
                }
            }
            // Not synced: the images are not synced either. Both become durable at the next
            // checkpoint (and this batch already at the next synced Raft write); until then
            // replay from the durable applied index repairs any loss.
            self.db.write_opt(batch, &unsynced_write_options())?;
            // The write locks are released here, after the checksums are visible in RocksDB.
        }
        self.volumes_written_since_checkpoint
            .extend(volumes.keys().copied());
        segment.clear();
        self.applied_index = last_index;
        Ok(())
    }

    /// fdatasync every image written since the last checkpoint, except `skip_volume_id`.
    fn sync_written_images(&mut self, skip_volume_id: Option<u64>) -> Result<(), StorageError> {
        // Images a background checkpoint is syncing are synced here too (and stay listed for
        // it): the index recorded after this covers their writes.
        let in_background: Vec<u64> = self
            .volumes_in_background_checkpoint
            .iter()
            .copied()
            .collect();
        for volume_id in in_background {
            if Some(volume_id) == skip_volume_id {
                continue;
            }
            if let Some(volume) = self.volumes.get(&volume_id) {
                volume.image.sync_data()?;
            }
        }
        for volume_id in std::mem::take(&mut self.volumes_written_since_checkpoint) {
            if Some(volume_id) == skip_volume_id {
                continue;
            }
            if let Some(volume) = self.volumes.get(&volume_id) {
                // fdatasync: this image's data must be on disk before any applied index that
                // covers it is recorded (the durability rule).
                if let Err(error) = volume.image.sync_data() {
                    // Keep it listed so a later checkpoint syncs it again.
                    self.volumes_written_since_checkpoint.insert(volume_id);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// A checkpoint: fdatasync every image written since the last checkpoint, THEN record the
    /// applied index in RocksDB (synced). Returns the new durable applied index. Afterwards the
    /// Raft log may be compacted up to it (`RaftLogStore::compact(index + 1)`).
    pub fn make_durable(&mut self) -> Result<u64, StorageError> {
        if self.applied_index == self.durable_applied_index
            && self.volumes_written_since_checkpoint.is_empty()
            && self.volumes_in_background_checkpoint.is_empty()
        {
            return Ok(self.durable_applied_index);
        }
        self.sync_written_images(None)?;
        self.record_durable_applied_index(self.applied_index)?;
        Ok(self.durable_applied_index)
    }

    /// Records `index` as the durable applied index (synced). Callers have synced the images.
    fn record_durable_applied_index(&mut self, index: u64) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            column_family(&self.db, keys::CF_META)?,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        // Synced: it also makes every checksum batch written before it durable, and the log
        // may be compacted against this index right after.
        super::durability::write_synced(&self.db, batch)?;
        self.durable_applied_index = index;
        Ok(())
    }

    /// First half of a checkpoint that lets the fdatasync run on another thread while applying
    /// goes on: captures the applied index now and the images written up to now. Every write
    /// applied up to the captured index is in the page cache of one of those images, so once
    /// [`CheckpointTicket::sync_images`] returns, the captured index may be recorded (later
    /// writes may or may not be synced too; they are above the recorded index and replayed).
    /// `None` when there is nothing to make durable.
    pub fn begin_checkpoint(&mut self) -> Option<CheckpointTicket> {
        if !self.volumes_in_background_checkpoint.is_empty()
            || (self.applied_index == self.durable_applied_index
                && self.volumes_written_since_checkpoint.is_empty())
        {
            return None;
        }
        let volume_ids = std::mem::take(&mut self.volumes_written_since_checkpoint);
        let images = volume_ids
            .iter()
            .filter_map(|volume_id| self.volumes.get(volume_id).cloned())
            .collect();
        self.volumes_in_background_checkpoint = volume_ids.clone();
        Some(CheckpointTicket {
            applied_index: self.applied_index,
            snapshot_installs: self.snapshot_installs,
            volume_ids,
            images,
        })
    }

    /// Second half: records the ticket's applied index (synced) once its images are synced.
    /// A ticket overtaken by a later checkpoint (volume create/delete checkpoint inline)
    /// records nothing: the durable applied index never goes backwards.
    pub fn finish_checkpoint(&mut self, ticket: CheckpointTicket) -> Result<u64, StorageError> {
        if ticket.snapshot_installs != self.snapshot_installs {
            // Taken before a snapshot install, which cleared the background set itself.
            return Ok(self.durable_applied_index);
        }
        if ticket.applied_index <= self.durable_applied_index {
            self.volumes_in_background_checkpoint.clear();
            return Ok(self.durable_applied_index);
        }
        if let Err(error) = self.record_durable_applied_index(ticket.applied_index) {
            self.abort_checkpoint(ticket);
            return Err(error);
        }
        self.volumes_in_background_checkpoint.clear();
        Ok(self.durable_applied_index)
    }

    /// Gives a failed ticket's images back to the next checkpoint.
    pub fn abort_checkpoint(&mut self, ticket: CheckpointTicket) {
        if ticket.snapshot_installs != self.snapshot_installs {
            return;
        }
        self.volumes_in_background_checkpoint.clear();
        self.volumes_written_since_checkpoint
            .extend(ticket.volume_ids.iter().copied());
    }

    fn create_volume(
        &mut self,
        index: u64,
        name: &str,
        size_bytes: u64,
        block_size_bytes: u32,
    ) -> Result<ApplyOutcome, StorageError> {
        if let Some(existing) = self.volumes.get(&index) {
            // Only reachable if this entry was applied before: the volume id is its index.
            let info = existing.info_now();
            self.applied_index = index;
            return Ok(ApplyOutcome::VolumeCreated(info));
        }
        let outcome = if !valid_volume_geometry(name, size_bytes, block_size_bytes) {
            Some(ApplyRejection::InvalidCommand)
        } else if self.volume_by_name(name).is_some() {
            Some(ApplyRejection::VolumeExists)
        } else {
            None
        };
        if let Some(rejection) = outcome {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(rejection));
        }

        let info = VolumeInfo {
            id: index,
            name: name.to_string(),
            size_bytes,
            block_size_bytes,
            attachment: None,
        };
        // A checkpoint first, so that the synced batch below may record `index` as the durable
        // applied index: every earlier image write is on disk.
        self.sync_written_images(None)?;
        // Replaces any orphan file of the same id (a create interrupted before its row was
        // written), and is durable (file and directory entry) before the row names it.
        let image = ImageFile::create(
            &self
                .images_dir
                .join(image_file_name(self.group_id, index, 0)),
            size_bytes,
        )?;
        let meta = column_family(&self.db, keys::CF_META)?;
        let row = encode_volume_row(&info, 0)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, keys::volume_key(self.group_id, index), row);
        batch.put_cf(
            meta,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        // Synced: the row and the applied index together, so the volume table on disk is
        // always the table as of the durable applied index.
        super::durability::write_synced(&self.db, batch)?;
        self.volumes.insert(
            index,
            Arc::new(Self::volume_shared(
                &self.db,
                self.group_id,
                info.clone(),
                image,
                0,
            )),
        );
        self.applied_index = index;
        self.durable_applied_index = index;
        Ok(ApplyOutcome::VolumeCreated(info))
    }

    fn delete_volume(&mut self, index: u64, name: &str) -> Result<ApplyOutcome, StorageError> {
        let Some(volume) = self.volume_named(name) else {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume));
        };
        let volume_id = volume.info.id;
        // A checkpoint of the other volumes, so the synced batch below may record `index`.
        self.sync_written_images(Some(volume_id))?;
        {
            // Under every write lock: no read is in flight on this volume, and every later
            // read sees the flag instead of comparing data with deleted checksums.
            let _guards: Vec<_> = volume.stripes.iter().map(|stripe| stripe.write()).collect();
            volume.deleted.store(true, Ordering::Release);
        }
        let meta = column_family(&self.db, keys::CF_META)?;
        let checksums = column_family(&self.db, keys::CF_BLOCK_CHECKSUMS)?;
        let (checksums_lower, checksums_upper) =
            keys::block_checksum_key_range(self.group_id, volume_id);
        let mut batch = WriteBatch::default();
        batch.delete_cf(meta, keys::volume_key(self.group_id, volume_id));
        batch.delete_range_cf(checksums, checksums_lower, checksums_upper);
        batch.put_cf(
            meta,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        // Synced before the file goes: a crash in between leaves an orphan file, which `open`
        // removes; never a row without its file.
        super::durability::write_synced(&self.db, batch)?;
        self.volumes.remove(&volume_id);
        self.applied_index = index;
        self.durable_applied_index = index;

        let path = volume.image.path().to_path_buf();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StorageError::io(&path, error)),
        }
        sync_directory(&self.images_dir)?;
        Ok(ApplyOutcome::VolumeDeleted(volume.info_now()))
    }

    /// `Attach`: see "Writer fencing" in the module doc for the rules.
    fn attach(
        &mut self,
        index: u64,
        name: &str,
        client: &str,
        force: bool,
        attach_id: Option<u64>,
    ) -> Result<ApplyOutcome, StorageError> {
        let Some(volume) = self.volume_named(name) else {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume));
        };
        let current = volume.attachment.lock().clone();
        if attach_id.is_some()
            && current.as_ref().is_some_and(|attachment| {
                attachment.client == client && attachment.attach_id == attach_id
            })
        {
            // A retry of the request that made the current attachment: the same answer.
            self.applied_index = index;
            return Ok(ApplyOutcome::Attached(volume.info_now()));
        }
        let held_by_other = current
            .as_ref()
            .is_some_and(|attachment| attachment.client != client);
        let rejection = if client.is_empty() {
            Some(ApplyRejection::InvalidCommand)
        } else if held_by_other && !force {
            Some(ApplyRejection::AttachedByOther)
        } else {
            None
        };
        if let Some(rejection) = rejection {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(rejection));
        }
        let attachment = Some(Attachment {
            client: client.to_string(),
            epoch: index,
            attach_id,
        });
        let info = self.record_attachment(index, &volume, attachment)?;
        Ok(ApplyOutcome::Attached(info))
    }

    /// `ResizeVolume`: grows the image file (sparse, durable), then records the row with the
    /// new size and `index` as the durable applied index in one synced batch, then lets
    /// readers address the new range. A request for the current size is a no-op success.
    fn resize_volume(
        &mut self,
        index: u64,
        name: &str,
        size_bytes: u64,
    ) -> Result<ApplyOutcome, StorageError> {
        let Some(volume) = self.volume_named(name) else {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume));
        };
        let current_size_bytes = volume.size_bytes();
        let rejection = if size_bytes < current_size_bytes {
            Some(ApplyRejection::WouldShrink)
        } else if !valid_volume_geometry(name, size_bytes, volume.info.block_size_bytes) {
            Some(ApplyRejection::InvalidCommand)
        } else {
            None
        };
        if let Some(rejection) = rejection {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(rejection));
        }
        if size_bytes == current_size_bytes {
            self.applied_index = index;
            return Ok(ApplyOutcome::VolumeResized(volume.info_now()));
        }
        // Every image write before this entry must be durable before `index` is recorded.
        self.sync_written_images(None)?;
        volume.image.grow(size_bytes)?;
        let info = VolumeInfo {
            size_bytes,
            ..volume.info_now()
        };
        let meta = column_family(&self.db, keys::CF_META)?;
        let row = encode_volume_row(&info, volume.image_generation)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, keys::volume_key(self.group_id, info.id), row);
        batch.put_cf(
            meta,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        super::durability::write_synced(&self.db, batch)?;
        volume.size_bytes.store(size_bytes, Ordering::Release);
        self.applied_index = index;
        self.durable_applied_index = index;
        Ok(ApplyOutcome::VolumeResized(info))
    }

    /// `Detach`: only the current epoch may detach; anything else is fenced.
    fn detach(&mut self, index: u64, name: &str, epoch: u64) -> Result<ApplyOutcome, StorageError> {
        let Some(volume) = self.volume_named(name) else {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume));
        };
        let current = volume
            .attachment
            .lock()
            .as_ref()
            .is_some_and(|attachment| attachment.epoch == epoch);
        if !current {
            self.applied_index = index;
            return Ok(ApplyOutcome::Rejected(ApplyRejection::Fenced));
        }
        let info = self.record_attachment(index, &volume, None)?;
        Ok(ApplyOutcome::Detached(info))
    }

    /// Writes the volume row with `attachment` and `index` as the durable applied index in one
    /// synced batch (a checkpoint, like create and delete: the table on disk stays the table
    /// as of the durable applied index, so a replayed data command meets the attachment it met
    /// the first time), then makes it visible to apply.
    fn record_attachment(
        &mut self,
        index: u64,
        volume: &VolumeShared,
        attachment: Option<Attachment>,
    ) -> Result<VolumeInfo, StorageError> {
        let info = VolumeInfo {
            attachment,
            size_bytes: volume.size_bytes(),
            ..volume.info.clone()
        };
        // Every image write before this entry must be durable before `index` is recorded.
        self.sync_written_images(None)?;
        let meta = column_family(&self.db, keys::CF_META)?;
        let row = encode_volume_row(&info, volume.image_generation)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, keys::volume_key(self.group_id, info.id), row);
        batch.put_cf(
            meta,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        super::durability::write_synced(&self.db, batch)?;
        *volume.attachment.lock() = info.attachment.clone();
        self.applied_index = index;
        self.durable_applied_index = index;
        Ok(info)
    }

    /// Entries up to this index are contained in the installed snapshot state and skipped by
    /// apply (0 when no snapshot was ever installed); see "Snapshots" in the module doc.
    pub fn snapshot_covered_index(&self) -> u64 {
        self.snapshot_covered_index
    }

    /// The sending side of a snapshot (see the `snapshot` module doc): captures the volume
    /// table as of [`Self::applied_index`] (its covered index) and the open images. Cheap:
    /// no data is read until [`SnapshotSource::next_chunk`].
    pub fn snapshot_source(&self) -> Result<SnapshotSource, StorageError> {
        let volumes = self
            .volumes
            .values()
            .map(|volume| {
                (
                    volume.info_now(),
                    VolumeReader {
                        volume: volume.clone(),
                    },
                )
            })
            .collect();
        Ok(SnapshotSource::new(
            self.group_id,
            self.applied_index,
            volumes,
        ))
    }

    /// Switches to a staged snapshot at `metadata.index` (see "Snapshots" in the module doc):
    /// one synced RocksDB batch replaces the volume table, the group's checksums, the applied
    /// index, the covered index and the Raft log state (through `log_store`); the staged
    /// images, renamed to a new generation before the batch, become the images after it.
    /// Readers handed out before fail with `VolumeReplaced`. After an `Err` the state machine
    /// and the log store must be dropped and reopened (as after a failed apply): on disk,
    /// either the old or the new state is complete.
    pub fn install_snapshot(
        &mut self,
        staged: StagedSnapshot,
        log_store: &RaftLogStore,
        metadata: &SnapshotMetadata,
        members: &[crate::config::MemberConfig],
    ) -> Result<(), StorageError> {
        let refuse = |detail: String| StorageError::SnapshotInstall {
            group_id: self.group_id,
            snapshot_index: metadata.index,
            detail,
        };
        if staged.group_id() != self.group_id || log_store.group_id() != self.group_id {
            return Err(refuse(format!(
                "staged for group {}, log of group {}",
                staged.group_id(),
                log_store.group_id()
            )));
        }
        if staged.snapshot_index() != metadata.index {
            return Err(refuse(format!(
                "staged for index {}",
                staged.snapshot_index()
            )));
        }
        if staged.covered_index() < metadata.index {
            return Err(refuse(format!(
                "the staged state covers index {} only",
                staged.covered_index()
            )));
        }
        if metadata.index <= self.applied_index {
            // The applied index never goes backwards.
            return Err(refuse(format!(
                "not newer than the applied index {}",
                self.applied_index
            )));
        }
        // A background checkpoint in flight syncs images that are about to be replaced and
        // would record an index of the old state: its ticket is recognised by this counter and
        // ignored. Its images go back to the written set, so that if the install fails below
        // the next checkpoint syncs them before it records an index past their writes.
        self.snapshot_installs += 1;
        let in_background = std::mem::take(&mut self.volumes_in_background_checkpoint);
        self.volumes_written_since_checkpoint.extend(in_background);

        let image_generation = self
            .volumes
            .values()
            .map(|volume| volume.image_generation)
            .max()
            .unwrap_or(0)
            + 1;
        let mut new_volumes = BTreeMap::new();
        for info in staged.volumes() {
            let staged_path = staged.image_path(info.id);
            let path =
                self.images_dir
                    .join(image_file_name(self.group_id, info.id, image_generation));
            // A new name: the old generation stays intact until the batch has switched.
            std::fs::rename(&staged_path, &path)
                .map_err(|error| StorageError::io(&staged_path, error))?;
            let image = ImageFile::open(&path)?;
            new_volumes.insert(
                info.id,
                Arc::new(Self::volume_shared(
                    &self.db,
                    self.group_id,
                    info.clone(),
                    image,
                    image_generation,
                )),
            );
        }
        // fsync of the directory: the renames must be durable before a row names the files.
        sync_directory(&self.images_dir)?;

        let meta = column_family(&self.db, keys::CF_META)?;
        let checksums = column_family(&self.db, keys::CF_BLOCK_CHECKSUMS)?;
        let mut batch = WriteBatch::default();
        let (rows_lower, rows_upper) = keys::volume_key_range(self.group_id);
        batch.delete_range_cf(meta, rows_lower, rows_upper);
        for info in staged.volumes() {
            batch.put_cf(
                meta,
                keys::volume_key(self.group_id, info.id),
                encode_volume_row(info, image_generation)?,
            );
        }
        let (checksums_lower, checksums_upper) = keys::block_checksum_group_range(self.group_id);
        batch.delete_range_cf(checksums, checksums_lower, checksums_upper);
        let group_id = self.group_id;
        staged.for_each_checksum(|volume_id, block_index, crc32c| {
            batch.put_cf(
                checksums,
                keys::block_checksum_key(group_id, volume_id, block_index),
                crc32c.to_be_bytes(),
            );
        })?;
        batch.put_cf(
            meta,
            keys::applied_index_key(self.group_id),
            metadata.index.to_be_bytes(),
        );
        batch.put_cf(
            meta,
            keys::snapshot_covered_index_key(self.group_id),
            staged.covered_index().to_be_bytes(),
        );
        // The one synced write that switches: before it the old state is complete on disk,
        // after it the new one.
        log_store.write_snapshot_install(batch, metadata, members)?;

        let old_volumes = std::mem::replace(&mut self.volumes, new_volumes);
        for volume in old_volumes.values() {
            volume.retire();
        }
        self.applied_index = metadata.index;
        self.durable_applied_index = metadata.index;
        self.snapshot_covered_index = staged.covered_index();
        // The old images are gone; the new ones were synced before the switch.
        self.volumes_written_since_checkpoint.clear();

        // The old generation: unreferenced now (`open` would remove it after a crash here).
        for volume in old_volumes.values() {
            let path = volume.image.path();
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(StorageError::io(path, error)),
            }
        }
        sync_directory(&self.images_dir)?;
        // Dropping `staged` removes the (now image-less) staging directory.
        drop(staged);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::command::{encode_command, encode_write_command};
    use crate::storage::{open_db, StorageOptions};

    const KIB: u64 = 1024;

    struct Fixture {
        directory: tempfile::TempDir,
        state_machine: StateMachine,
        next_index: u64,
    }

    fn small_options() -> StorageOptions {
        StorageOptions {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            max_background_jobs: 1,
        }
    }

    impl Fixture {
        fn new() -> Self {
            let directory = tempfile::tempdir().unwrap();
            let db = open_db(directory.path(), &small_options()).unwrap();
            let state_machine =
                StateMachine::open(db, &directory.path().join("images"), 1).unwrap();
            Fixture {
                directory,
                state_machine,
                next_index: 1,
            }
        }

        fn reopen(self) -> Self {
            let Fixture {
                directory,
                state_machine,
                ..
            } = self;
            drop(state_machine);
            let db = open_db(directory.path(), &small_options()).unwrap();
            let state_machine =
                StateMachine::open(db, &directory.path().join("images"), 1).unwrap();
            let next_index = state_machine.applied_index() + 1;
            Fixture {
                directory,
                state_machine,
                next_index,
            }
        }

        fn apply(&mut self, data: &[u8]) -> ApplyOutcome {
            let index = self.next_index;
            self.next_index += 1;
            self.state_machine.apply(index, data).unwrap()
        }

        fn create(&mut self, name: &str, size_bytes: u64, block_size_bytes: u32) -> VolumeInfo {
            match self.apply(&encode_command(&Command::CreateVolume {
                name,
                size_bytes,
                block_size_bytes,
            })) {
                ApplyOutcome::VolumeCreated(info) => info,
                other => panic!("create returned {other:?}"),
            }
        }

        fn image_path(&self, volume_id: u64) -> PathBuf {
            self.directory
                .path()
                .join("images")
                .join(image_file_name(1, volume_id, 0))
        }
    }

    fn read(reader: &VolumeReader, offset: u64, length: u64) -> Vec<u8> {
        let mut buf = vec![0u8; length as usize];
        reader.read(offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn create_write_read_at_unaligned_offsets() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 256 * KIB, 4096);
        assert_eq!(
            info.id, 1,
            "the volume id is the index of its CreateVolume entry"
        );
        assert_eq!(
            fixture.state_machine.volume_by_name("disk"),
            Some(info.clone())
        );
        let data: Vec<u8> = (0..10_000u32)
            .map(|value| (value % 253) as u8 + 1)
            .collect();
        assert_eq!(
            fixture.apply(&encode_write_command(info.id, 0, 3000, &data)),
            ApplyOutcome::Applied
        );
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 3000, 10_000), data);
        assert_eq!(read(&reader, 0, 3000), vec![0u8; 3000]);
        assert_eq!(read(&reader, 2999, 2)[..], [0, data[0]]);
        assert!(matches!(
            reader.read(256 * KIB - 1, &mut [0u8; 2]),
            Err(StorageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn resize_grows_online_refuses_to_shrink_and_survives_reopen() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 60 * KIB, &[5u8; 4096]));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert!(reader.read(64 * KIB, &mut [0u8; 4096]).is_err());
        let resize = |size_bytes| {
            encode_command(&Command::ResizeVolume {
                name: "disk",
                size_bytes,
            })
        };
        match fixture.apply(&resize(128 * KIB)) {
            ApplyOutcome::VolumeResized(resized) => assert_eq!(resized.size_bytes, 128 * KIB),
            other => panic!("resize returned {other:?}"),
        }
        // The reader taken before the resize sees the new range, zeroes, and the old data.
        assert_eq!(reader.info().size_bytes, 128 * KIB);
        assert_eq!(read(&reader, 64 * KIB, 4096), vec![0u8; 4096]);
        assert_eq!(read(&reader, 60 * KIB, 4096), vec![5u8; 4096]);
        assert_eq!(
            fixture.apply(&encode_write_command(info.id, 0, 100 * KIB, &[6u8; 4096])),
            ApplyOutcome::Applied
        );
        assert_eq!(
            fixture.apply(&resize(64 * KIB)),
            ApplyOutcome::Rejected(ApplyRejection::WouldShrink)
        );
        assert_eq!(
            fixture.apply(&resize(128 * KIB + 1)),
            ApplyOutcome::Rejected(ApplyRejection::InvalidCommand)
        );
        assert!(matches!(
            fixture.apply(&resize(128 * KIB)),
            ApplyOutcome::VolumeResized(_)
        ));
        fixture.state_machine.make_durable().unwrap();
        // A reader holds the database open.
        drop(reader);
        let fixture = fixture.reopen();
        let reopened = fixture.state_machine.volume_by_name("disk").unwrap();
        assert_eq!(reopened.size_bytes, 128 * KIB);
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 100 * KIB, 4096), vec![6u8; 4096]);
    }

    #[test]
    fn an_image_grown_without_its_row_is_cut_back_on_open() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let path = fixture.image_path(info.id);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(128 * KIB)
            .unwrap();
        let fixture = fixture.reopen();
        assert_eq!(
            fixture
                .state_machine
                .volume_by_name("disk")
                .unwrap()
                .size_bytes,
            64 * KIB
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * KIB);
    }

    #[test]
    fn background_checkpoint_never_moves_the_durable_index_backwards() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 256 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 0, &[7u8; 4096]));
        let ticket = fixture
            .state_machine
            .begin_checkpoint()
            .expect("a write since the last checkpoint needs one");
        let captured = ticket.applied_index();
        assert!(
            fixture.state_machine.begin_checkpoint().is_none(),
            "one background checkpoint at a time"
        );
        // More writes while the ticket's images sync, then an inline checkpoint: it covers the
        // ticket's images too and records the later index.
        fixture.apply(&encode_write_command(info.id, 0, 8192, &[9u8; 4096]));
        let inline = fixture.state_machine.make_durable().unwrap();
        assert!(inline > captured);
        ticket.sync_images().unwrap();
        assert_eq!(
            fixture.state_machine.finish_checkpoint(ticket).unwrap(),
            inline
        );
        assert_eq!(fixture.state_machine.durable_applied_index(), inline);
        // A normal cycle records exactly the captured index.
        fixture.apply(&encode_write_command(info.id, 0, 0, &[1u8; 4096]));
        let ticket = fixture.state_machine.begin_checkpoint().unwrap();
        let captured = ticket.applied_index();
        fixture.apply(&encode_write_command(info.id, 0, 4096, &[2u8; 4096]));
        ticket.sync_images().unwrap();
        assert_eq!(
            fixture.state_machine.finish_checkpoint(ticket).unwrap(),
            captured
        );
        assert!(fixture.state_machine.applied_index() > captured);
        // An aborted ticket gives its images back to the next checkpoint.
        let ticket = fixture.state_machine.begin_checkpoint().unwrap();
        fixture.state_machine.abort_checkpoint(ticket);
        assert!(fixture.state_machine.begin_checkpoint().is_some());
    }

    #[test]
    fn cached_reads_match_blocking_reads_or_decline() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 256 * KIB, 4096);
        let data: Vec<u8> = (0..20_000u32).map(|value| (value % 251) as u8).collect();
        fixture.apply(&encode_write_command(info.id, 0, 1000, &data));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        // Just written, so in the page cache: served, and equal to the blocking read.
        let mut cached = vec![0u8; 20_000];
        assert!(reader.read_cached(1000, &mut cached).unwrap());
        assert_eq!(cached, data);
        let mut aligned = vec![0u8; 8192];
        assert!(reader.read_cached(4096, &mut aligned).unwrap());
        assert_eq!(aligned, read(&reader, 4096, 8192));
        // Whatever the cache holds, a declined read is never a wrong read.
        let mut far = vec![0u8; 4096];
        if reader.read_cached(200 * KIB, &mut far).unwrap() {
            assert_eq!(far, vec![0u8; 4096]);
        }
    }

    #[test]
    fn rejections_are_outcomes_not_errors() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let rejected = |rejection| ApplyOutcome::Rejected(rejection);
        assert_eq!(
            fixture.apply(&encode_write_command(99, 0, 0, b"x")),
            rejected(ApplyRejection::NoSuchVolume)
        );
        assert_eq!(
            fixture.apply(&encode_write_command(info.id, 0, 64 * KIB, b"x")),
            rejected(ApplyRejection::OutOfRange)
        );
        assert_eq!(
            fixture.apply(&encode_command(&Command::Trim {
                volume_id: info.id,
                writer_epoch: 0,
                offset: u64::MAX,
                length: 2
            })),
            rejected(ApplyRejection::OutOfRange)
        );
        assert_eq!(
            fixture.apply(b"\x01\xff"),
            rejected(ApplyRejection::InvalidCommand)
        );
        for (size_bytes, block_size_bytes) in [
            (0, 4096),
            (4097, 4096),
            (8192, 3000),
            (8192, 256),
            (1 << 45, 4096),
        ] {
            assert_eq!(
                fixture.apply(&encode_command(&Command::CreateVolume {
                    name: "bad",
                    size_bytes,
                    block_size_bytes
                })),
                rejected(ApplyRejection::InvalidCommand),
                "size {size_bytes} block {block_size_bytes}"
            );
        }
        assert_eq!(
            fixture.apply(&encode_command(&Command::CreateVolume {
                name: "disk",
                size_bytes: 8192,
                block_size_bytes: 4096
            })),
            rejected(ApplyRejection::VolumeExists)
        );
        assert_eq!(
            fixture.apply(&encode_command(&Command::DeleteVolume { name: "nope" })),
            rejected(ApplyRejection::NoSuchVolume)
        );
        assert_eq!(fixture.apply(b""), ApplyOutcome::Applied);
        assert_eq!(
            fixture.state_machine.applied_index(),
            fixture.next_index - 1
        );
        assert_eq!(fixture.state_machine.volumes(), vec![info]);
    }

    fn attach(fixture: &mut Fixture, client: &str, force: bool) -> ApplyOutcome {
        attach_with_id(fixture, client, force, None)
    }

    fn attach_with_id(
        fixture: &mut Fixture,
        client: &str,
        force: bool,
        attach_id: Option<u64>,
    ) -> ApplyOutcome {
        fixture.apply(&encode_command(&Command::Attach {
            name: "disk",
            client,
            force,
            attach_id,
        }))
    }

    /// An attach request repeated with its attach id (a retry that commits late, on any
    /// server) gets the attachment it made, without a new epoch; survives a reopen.
    #[test]
    fn a_repeated_attach_id_keeps_the_epoch_it_made() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let first = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(7)));
        let retry = attach_with_id(&mut fixture, "host-a", false, Some(7));
        assert_eq!(attached_epoch(&retry), first, "a retry keeps the epoch");
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, first, 1),
            ApplyOutcome::Applied
        );
        // Still the same after the attachment was reloaded from RocksDB.
        let mut fixture = fixture.reopen();
        let retry = attach_with_id(&mut fixture, "host-a", false, Some(7));
        assert_eq!(attached_epoch(&retry), first);
        // A new request of the holder (another id, or none) starts a new epoch and fences the
        // old one; a retry of the old request after that is a new attachment again.
        let second = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(8)));
        assert!(second > first);
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, first, 2),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        let third = attached_epoch(&attach(&mut fixture, "host-a", false));
        assert!(third > second);
        // Another client with the holder's attach id is not the holder: refused unless forced.
        let fourth = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(9)));
        assert_eq!(
            attach_with_id(&mut fixture, "host-b", false, Some(9)),
            ApplyOutcome::Rejected(ApplyRejection::AttachedByOther)
        );
        let taken = attached_epoch(&attach_with_id(&mut fixture, "host-b", true, Some(9)));
        assert!(taken > fourth);
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, fourth, 3),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
    }

    fn attached_epoch(outcome: &ApplyOutcome) -> u64 {
        match outcome {
            ApplyOutcome::Attached(VolumeInfo {
                attachment: Some(attachment),
                ..
            }) => attachment.epoch,
            other => panic!("attach returned {other:?}"),
        }
    }

    fn write_with_epoch(
        fixture: &mut Fixture,
        volume_id: u64,
        epoch: u64,
        fill: u8,
    ) -> ApplyOutcome {
        fixture.apply(&encode_write_command(volume_id, epoch, 0, &[fill; 4096]))
    }

    fn zeroing_commands(volume_id: u64, writer_epoch: u64) -> [Vec<u8>; 2] {
        [
            encode_command(&Command::Trim {
                volume_id,
                writer_epoch,
                offset: 0,
                length: 4096,
            }),
            encode_command(&Command::WriteZeroes {
                volume_id,
                writer_epoch,
                offset: 0,
                length: 4096,
                may_punch_hole: false,
            }),
        ]
    }

    /// Fencing rule: an unattached volume takes data commands with writer epoch 0 only.
    #[test]
    fn unattached_volume_admits_only_epoch_zero() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        assert_eq!(info.attachment, None);
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, 0, 1),
            ApplyOutcome::Applied
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, 5, 2),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        for command in zeroing_commands(info.id, 5) {
            assert_eq!(
                fixture.apply(&command),
                ApplyOutcome::Rejected(ApplyRejection::Fenced)
            );
        }
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(
            read(&reader, 0, 4096),
            vec![1u8; 4096],
            "fenced commands change nothing"
        );
    }

    /// Fencing rules: the epoch is the index of the Attach entry; only that epoch may write;
    /// the same client attaching again gets a new epoch and fences its own old one.
    #[test]
    fn attached_volume_admits_only_the_current_epoch() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let attach_index = fixture.next_index;
        let outcome = attach(&mut fixture, "host-a", false);
        let epoch = attached_epoch(&outcome);
        assert_eq!(
            epoch, attach_index,
            "the epoch is the index of the Attach entry"
        );
        assert_eq!(
            fixture
                .state_machine
                .volume_by_name("disk")
                .unwrap()
                .attachment,
            Some(Attachment {
                client: "host-a".to_string(),
                epoch,
                attach_id: None,
            })
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, 0, 1),
            ApplyOutcome::Rejected(ApplyRejection::Fenced),
            "an anonymous writer is fenced on an attached volume"
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, epoch, 2),
            ApplyOutcome::Applied
        );
        for command in zeroing_commands(info.id, epoch + 1) {
            assert_eq!(
                fixture.apply(&command),
                ApplyOutcome::Rejected(ApplyRejection::Fenced)
            );
        }
        // Re-attach by the same client: a new epoch, the old one is fenced.
        let second = attached_epoch(&attach(&mut fixture, "host-a", false));
        assert!(second > epoch);
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, epoch, 3),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        for command in zeroing_commands(info.id, second) {
            assert_eq!(fixture.apply(&command), ApplyOutcome::Applied);
        }
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 0, 4096), vec![0u8; 4096]);
        assert_eq!(reader.info().attachment.map(|a| a.epoch), Some(second));
    }

    /// Fencing rules: another client is refused unless it forces, which fences the old epoch.
    #[test]
    fn another_client_needs_force_and_then_fences_the_old_writer() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let old_epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
        assert_eq!(
            attach(&mut fixture, "host-b", false),
            ApplyOutcome::Rejected(ApplyRejection::AttachedByOther)
        );
        assert_eq!(
            fixture
                .state_machine
                .volume_by_name("disk")
                .unwrap()
                .attachment
                .unwrap()
                .client,
            "host-a",
            "a refused attach changes nothing"
        );
        let new_epoch = attached_epoch(&attach(&mut fixture, "host-b", true));
        assert!(new_epoch > old_epoch);
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, old_epoch, 1),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, new_epoch, 2),
            ApplyOutcome::Applied
        );
        assert_eq!(
            attach(&mut fixture, "", false),
            ApplyOutcome::Rejected(ApplyRejection::InvalidCommand)
        );
        assert_eq!(
            fixture.apply(&encode_command(&Command::Attach {
                name: "nope",
                client: "host-a",
                force: true,
                attach_id: None,
            })),
            ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)
        );
    }

    /// Fencing rules: Detach succeeds only for the current epoch; afterwards the volume is
    /// unattached again (epoch 0 writes, anyone may attach).
    #[test]
    fn detach_needs_the_current_epoch() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let old_epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
        let epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
        let detach = |epoch| {
            encode_command(&Command::Detach {
                name: "disk",
                epoch,
            })
        };
        assert_eq!(
            fixture.apply(&detach(old_epoch)),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        match fixture.apply(&detach(epoch)) {
            ApplyOutcome::Detached(detached) => {
                assert_eq!(detached.attachment, None);
                assert_eq!(detached.id, info.id);
            }
            other => panic!("detach returned {other:?}"),
        }
        assert_eq!(
            fixture.apply(&detach(epoch)),
            ApplyOutcome::Rejected(ApplyRejection::Fenced),
            "detaching an unattached volume is fenced"
        );
        assert_eq!(
            fixture.apply(&encode_command(&Command::Detach {
                name: "nope",
                epoch
            })),
            ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, 0, 1),
            ApplyOutcome::Applied
        );
        assert_eq!(
            write_with_epoch(&mut fixture, info.id, epoch, 1),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        attached_epoch(&attach(&mut fixture, "host-b", false));
    }

    /// The attachment is in the volume row and recorded with its index as a checkpoint, so a
    /// restart (and replay of the entries after it) fences exactly as before.
    #[test]
    fn attachment_survives_restart_and_replay_decides_the_same() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        let epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
        assert_eq!(fixture.state_machine.durable_applied_index(), epoch);
        let stale = encode_write_command(info.id, 0, 0, &[9u8; 4096]);
        let current = encode_write_command(info.id, epoch, 4096, &[8u8; 4096]);
        assert_eq!(
            fixture.apply(&stale),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        assert_eq!(fixture.apply(&current), ApplyOutcome::Applied);
        let mut fixture = fixture.reopen();
        assert_eq!(fixture.state_machine.applied_index(), epoch);
        assert_eq!(
            fixture.state_machine.volumes()[0].attachment,
            Some(Attachment {
                client: "host-a".to_string(),
                epoch,
                attach_id: None,
            })
        );
        // Replay of the two entries after the checkpoint.
        assert_eq!(
            fixture.apply(&stale),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
        assert_eq!(fixture.apply(&current), ApplyOutcome::Applied);
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 0, 4096), vec![0u8; 4096]);
        assert_eq!(read(&reader, 4096, 4096), vec![8u8; 4096]);
    }

    /// Rows written before fencing existed have no `attachment` field: they read as unattached.
    #[test]
    fn volume_rows_without_attachment_decode_as_unattached() {
        let row = br#"{"id":3,"name":"old","size_bytes":8192,"block_size_bytes":4096}"#;
        let info: VolumeInfo = serde_json::from_slice(row).unwrap();
        assert_eq!(info.attachment, None);
        assert_eq!(info.id, 3);
    }

    #[test]
    fn indexes_must_follow_the_applied_index() {
        let mut fixture = Fixture::new();
        fixture.create("disk", 64 * KIB, 4096);
        assert_eq!(
            fixture.state_machine.apply(1, b"").unwrap(),
            ApplyOutcome::AlreadyApplied
        );
        assert!(matches!(
            fixture.state_machine.apply(5, b""),
            Err(StorageError::ApplyOutOfOrder {
                expected_index: 2,
                index: 5,
                ..
            })
        ));
        let outcomes = fixture
            .state_machine
            .apply_batch(&[(1, b""), (2, b""), (3, b"")])
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                ApplyOutcome::AlreadyApplied,
                ApplyOutcome::Applied,
                ApplyOutcome::Applied
            ]
        );
        assert_eq!(fixture.state_machine.applied_index(), 3);
    }

    #[test]
    fn trim_punches_holes_and_block_status_reports_them() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 1024 * KIB, 4096);
        fixture.apply(&encode_write_command(
            info.id,
            0,
            0,
            &vec![7u8; 1024 * 1024],
        ));
        fixture.apply(&encode_command(&Command::Trim {
            volume_id: info.id,
            writer_epoch: 0,
            offset: 256 * KIB,
            length: 256 * KIB,
        }));
        // Zeroed in place (NO_HOLE): allocated, but reported as zero.
        fixture.apply(&encode_command(&Command::WriteZeroes {
            volume_id: info.id,
            writer_epoch: 0,
            offset: 768 * KIB,
            length: 128 * KIB,
            may_punch_hole: false,
        }));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 256 * KIB, 256 * KIB), vec![0u8; 256 * 1024]);
        let extents = reader.block_status(0, 1024 * KIB).unwrap();
        // (hole, zero) of the byte at `offset` according to the extents.
        let flags_at = |offset: u64| {
            let mut start = 0;
            for extent in &extents {
                if offset < start + extent.length_bytes {
                    return (extent.hole, extent.zero);
                }
                start += extent.length_bytes;
            }
            panic!("offset {offset} not covered by {extents:?}");
        };
        assert_eq!(
            extents
                .iter()
                .map(|extent| extent.length_bytes)
                .sum::<u64>(),
            1024 * KIB
        );
        for offset in (0..256 * KIB).step_by(4096) {
            assert_eq!(flags_at(offset), (false, false), "offset {offset}");
        }
        for offset in (256 * KIB..512 * KIB).step_by(4096) {
            assert_eq!(flags_at(offset), (true, true), "offset {offset}");
        }
        // Zeroed in place: ext4 keeps the range allocated as unwritten extents, which
        // SEEK_DATA may report as a hole; either way it must read as zero.
        for offset in (768 * KIB..896 * KIB).step_by(4096) {
            assert!(flags_at(offset).1, "offset {offset}");
        }
        for offset in (896 * KIB..1024 * KIB).step_by(4096) {
            assert_eq!(flags_at(offset), (false, false), "offset {offset}");
        }
        // A sub-range starting inside the hole.
        assert_eq!(
            reader.block_status(300 * KIB, 8 * KIB).unwrap(),
            vec![Extent {
                length_bytes: 8 * KIB,
                hole: true,
                zero: true
            }]
        );
    }

    #[test]
    fn unaligned_zeroing_keeps_the_edge_blocks_verifiable() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 0, &vec![5u8; 64 * 1024]));
        fixture.apply(&encode_command(&Command::Trim {
            volume_id: info.id,
            writer_epoch: 0,
            offset: 1000,
            length: 10_000,
        }));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        let all = read(&reader, 0, 64 * KIB);
        assert!(all[..1000].iter().all(|&byte| byte == 5));
        assert!(all[1000..11_000].iter().all(|&byte| byte == 0));
        assert!(all[11_000..].iter().all(|&byte| byte == 5));
    }

    #[test]
    fn corruption_behind_our_back_is_a_checksum_mismatch() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 0, &vec![1u8; 8192]));
        fixture.state_machine.make_durable().unwrap();
        // Flip a byte in block 1, and write into block 5, which has no checksum (a hole).
        let image = ImageFile::open(&fixture.image_path(info.id)).unwrap();
        image.write_all_at(4096 + 17, &[2]).unwrap();
        image.write_all_at(5 * 4096, &[9]).unwrap();
        let reader = fixture.state_machine.reader(info.id).unwrap();
        let mut buf = vec![0u8; 4096];
        reader.read(0, &mut buf).unwrap();
        assert!(matches!(
            reader.read(4000, &mut buf),
            Err(StorageError::ChecksumMismatch {
                volume_id: 1,
                block_index: 1,
                recorded_crc32c: Some(_),
                ..
            })
        ));
        assert!(matches!(
            reader.read(5 * 4096 + 100, &mut [0u8; 10]),
            Err(StorageError::ChecksumMismatch {
                block_index: 5,
                recorded_crc32c: None,
                ..
            })
        ));
    }

    #[test]
    fn delete_removes_row_checksums_and_image() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 0, &vec![1u8; 8192]));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(
            fixture.apply(&encode_command(&Command::DeleteVolume { name: "disk" })),
            ApplyOutcome::VolumeDeleted(info.clone())
        );
        assert!(!fixture.image_path(info.id).exists());
        assert!(matches!(
            reader.read(0, &mut [0u8; 4096]),
            Err(StorageError::VolumeDeleted { volume_id: 1 })
        ));
        assert!(fixture.state_machine.reader(info.id).is_none());
        assert_eq!(fixture.state_machine.durable_applied_index(), 3);
        let db = fixture.state_machine.db.clone();
        let checksums = column_family(&db, keys::CF_BLOCK_CHECKSUMS).unwrap();
        assert!(db
            .get_cf(checksums, keys::block_checksum_key(1, info.id, 0))
            .unwrap()
            .is_none());
        // Every handle on the database must go before it can be opened again.
        drop((reader, db));
        let fixture = fixture.reopen();
        assert!(fixture.state_machine.volumes().is_empty());
    }

    #[test]
    fn reopen_keeps_durable_state_and_removes_orphan_images() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 64 * KIB, 4096);
        fixture.apply(&encode_write_command(info.id, 0, 4096, &[3u8; 4096]));
        assert_eq!(fixture.state_machine.make_durable().unwrap(), 2);
        fixture.apply(&encode_write_command(info.id, 0, 0, &[4u8; 100]));
        // An orphan left by a create interrupted before its row was written.
        let orphan = fixture.image_path(77);
        std::fs::write(&orphan, b"junk").unwrap();
        // A file that is not ours stays.
        let foreign = fixture.directory.path().join("images").join("notes.txt");
        std::fs::write(&foreign, b"keep").unwrap();
        let mut fixture = fixture.reopen();
        assert_eq!(fixture.state_machine.durable_applied_index(), 2);
        assert_eq!(fixture.state_machine.applied_index(), 2);
        assert!(!orphan.exists());
        assert!(foreign.exists());
        // Replay of entry 3 (not covered by the checkpoint) is idempotent.
        fixture.apply(&encode_write_command(info.id, 0, 0, &[4u8; 100]));
        let reader = fixture.state_machine.reader(info.id).unwrap();
        assert_eq!(read(&reader, 0, 100), vec![4u8; 100]);
        assert_eq!(read(&reader, 4096, 4096), vec![3u8; 4096]);
    }

    /// Readers on other threads run during apply: they must never see a checksum mismatch, and
    /// every 4 KiB block they read must be one whole version (apply writes whole blocks filled
    /// with one byte value).
    #[test]
    fn concurrent_reads_never_see_torn_blocks_or_false_mismatches() {
        let mut fixture = Fixture::new();
        let info = fixture.create("disk", 256 * KIB, 4096);
        let reader = fixture.state_machine.reader(info.id).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2u64)
            .map(|thread| {
                let reader = reader.clone();
                let stop = stop.clone();
                let reads_total = reads_total.clone();
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    let mut buf = vec![0u8; 3 * 4096];
                    while !stop.load(Ordering::Relaxed) {
                        let offset = ((reads * 7 + thread * 13) % 60) * 4096;
                        reader.read(offset, &mut buf).unwrap();
                        for block in buf.chunks_exact(4096) {
                            assert!(block.iter().all(|&byte| byte == block[0]), "torn block");
                        }
                        reads += 1;
                        reads_total.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Keep applying until the readers have overlapped with plenty of applies.
        let mut round = 0u64;
        while round < 300 || reads_total.load(Ordering::Relaxed) < 200 {
            let offset = (round * 5 % 62) * 4096;
            let value = (round % 250) as u8 + 1;
            if round % 7 == 0 {
                fixture.apply(&encode_command(&Command::Trim {
                    volume_id: info.id,
                    writer_epoch: 0,
                    offset,
                    length: 8192,
                }));
            } else {
                fixture.apply(&encode_write_command(
                    info.id,
                    0,
                    offset,
                    &vec![value; 8192],
                ));
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            // A panic in a reader (mismatch, torn block) fails the test here.
            thread.join().unwrap();
        }
    }
}
