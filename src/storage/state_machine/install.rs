//! Snapshots: the sending side's capture of the volumes, and the receiving side's install
//! of a staged copy by image generations (see "Snapshots" in the parent module doc).

use super::*;

impl StateMachine {
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
}
