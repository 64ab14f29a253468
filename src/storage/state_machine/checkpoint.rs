//! Checkpoints: fdatasync the images written since the last one, then record the applied
//! index (the durability rule in the parent module doc), inline or with the syncing on
//! another thread.

use super::*;

/// A checkpoint in progress (see [`StateMachine::begin_checkpoint`]): the applied index it
/// will record and the images that must be fdatasync'd first. `Send`, so the syncing can run
/// on any thread.
pub struct CheckpointTicket {
    pub(super) applied_index: u64,
    /// [`StateMachine::snapshot_installs`] when the ticket was taken: a ticket from before an
    /// installed snapshot describes images that no longer exist, and records nothing.
    pub(super) snapshot_installs: u64,
    pub(super) volume_ids: BTreeSet<u64>,
    pub(super) images: Vec<Arc<VolumeShared>>,
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

impl StateMachine {
    /// fdatasync every image written since the last checkpoint, except `skip_volume_id`.
    pub(super) fn sync_written_images(
        &mut self,
        skip_volume_id: Option<u64>,
    ) -> Result<(), StorageError> {
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
    pub(super) fn record_durable_applied_index(&mut self, index: u64) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            column_family(&self.db, keys::CF_META)?,
            keys::applied_index_key(self.group_id),
            index.to_be_bytes(),
        );
        // Synced: it also makes every checksum batch written before it durable, and the log
        // may be compacted against this index right after.
        crate::storage::durability::write_synced(&self.db, batch)?;
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
}
