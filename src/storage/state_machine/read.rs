//! The read path: a volume's shared state ([`VolumeShared`]: image, locks, checksums) and
//! [`VolumeReader`], which serves reads and `BLOCK_STATUS` on other threads, concurrently with
//! apply (see "Concurrency between apply and reads" in the parent module doc).

use super::*;

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
pub(super) struct VolumeShared {
    /// Geometry and name; its `attachment` and `size_bytes` are not maintained (see the
    /// fields of the same names).
    pub(super) info: VolumeInfo,
    /// The current size: grows when a `ResizeVolume` is applied (after the image file grew),
    /// never shrinks.
    pub(super) size_bytes: AtomicU64,
    /// The current attachment. Written only by apply (the single writer); a mutex rather than
    /// part of `info` because readers hold this struct across attachments.
    pub(super) attachment: parking_lot::Mutex<Option<Attachment>>,
    pub(super) group_id: u64,
    pub(super) db: Arc<DB>,
    pub(super) image: ImageFile,
    /// Bytes per lock region: a multiple of the block size, so a block is in one region.
    pub(super) region_bytes: u64,
    pub(super) stripes: Box<[RwLock<()>]>,
    /// Set (under all write locks) when the volume is deleted; readers check it under their
    /// read locks and fail instead of checking data against deleted checksums.
    pub(super) deleted: AtomicBool,
    /// Set (under all write locks) when an installed snapshot replaced the whole state;
    /// readers fail with `VolumeReplaced` and must ask the state machine for a new reader.
    pub(super) replaced: AtomicBool,
    /// Generation of the image file name (0 until a snapshot installed this volume): see
    /// "Snapshots" in the module doc.
    pub(super) image_generation: u64,
    /// crc32c of an all-zero block, what a block without a checksum key must match.
    pub(super) zero_block_crc32c: u32,
}

impl VolumeShared {
    /// The row as of now, attachment included.
    pub(super) fn info_now(&self) -> VolumeInfo {
        VolumeInfo {
            attachment: self.attachment.lock().clone(),
            size_bytes: self.size_bytes(),
            ..self.info.clone()
        }
    }

    pub(super) fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Whether a data command carrying `writer_epoch` may change this volume: the writer
    /// fencing rule of the module doc.
    pub(super) fn admits_writer_epoch(&self, writer_epoch: u64) -> bool {
        match &*self.attachment.lock() {
            None => writer_epoch == 0,
            Some(attachment) => writer_epoch == attachment.epoch,
        }
    }

    pub(super) fn block_size(&self) -> u64 {
        u64::from(self.info.block_size_bytes)
    }

    /// `VolumeDeleted` or `VolumeReplaced` once the volume is gone (checked under the locks
    /// by reads, whose checksums would otherwise be looked up in a table that moved on).
    pub(super) fn check_live(&self) -> Result<(), StorageError> {
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
    pub(super) fn retire(&self) {
        let _guards: Vec<_> = self.stripes.iter().map(|stripe| stripe.write()).collect();
        self.replaced.store(true, Ordering::Release);
    }

    /// The stripes guarding `[start, end)` (non-empty range), ascending: the lock order.
    pub(super) fn stripes_for(&self, start: u64, end: u64) -> Vec<usize> {
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

    pub(super) fn checksum_key(&self, block_index: u64) -> [u8; 24] {
        keys::block_checksum_key(self.group_id, self.info.id, block_index)
    }

    /// The recorded checksums of blocks `[first_block, end_block)`, ascending.
    pub(super) fn recorded_checksums(
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
    pub(super) fn verify_blocks(&self, first_block: u64, data: &[u8]) -> Result<(), StorageError> {
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
    pub(super) fn apply_write(
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
    pub(super) fn apply_zeroing(
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
    pub(super) fn read_block(
        &self,
        block_index: u64,
        buffer: &mut Vec<u8>,
    ) -> Result<u32, StorageError> {
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
    pub(super) volume: Arc<VolumeShared>,
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

    pub(super) fn check_range(&self, offset: u64, length_bytes: u64) -> Result<(), StorageError> {
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

    pub(super) fn read_from(
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
