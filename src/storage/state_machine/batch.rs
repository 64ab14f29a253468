//! Applying committed entries: a batch of data commands runs under the volumes' stripe locks
//! with one RocksDB write of their checksums; volume-table commands go to `volume_table`.

use super::*;

/// A data command checked against the volume table, ready to run under the locks.
pub(super) struct PlannedDataCommand<'a> {
    pub(super) volume: Arc<VolumeShared>,
    pub(super) command: Command<'a>,
}

impl StateMachine {
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
    pub(super) fn plan_data_command<'a>(
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
    pub(super) fn apply_segment(
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
}
