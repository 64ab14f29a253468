//! The volume table: create, delete, resize, attach and detach (each a checkpoint), the rows
//! as stored and the names of the image files.

use super::*;

/// The image file name of a volume: generation 0 (created by `CreateVolume`) keeps the name
/// used before snapshots existed; each snapshot install writes a new generation.
pub(super) fn image_file_name(group_id: u64, volume_id: u64, image_generation: u64) -> String {
    if image_generation == 0 {
        format!("group-{group_id}-volume-{volume_id}.img")
    } else {
        format!("group-{group_id}-volume-{volume_id}-gen-{image_generation}.img")
    }
}

/// The (volume id, generation) of an image file name of `group_id`, if it is one.
pub(super) fn parse_image_file_name(group_id: u64, file_name: &str) -> Option<(u64, u64)> {
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
pub(super) struct StoredVolumeRow {
    #[serde(flatten)]
    pub(super) info: VolumeInfo,
    /// Absent in rows written before snapshots existed (generation 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) image_generation: u64,
}

pub(super) fn is_zero(value: &u64) -> bool {
    *value == 0
}

pub(super) fn encode_volume_row(
    info: &VolumeInfo,
    image_generation: u64,
) -> Result<Vec<u8>, StorageError> {
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
    pub(super) fn create_volume(
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
        crate::storage::durability::write_synced(&self.db, batch)?;
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

    pub(super) fn delete_volume(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<ApplyOutcome, StorageError> {
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
        crate::storage::durability::write_synced(&self.db, batch)?;
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
    pub(super) fn attach(
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
    pub(super) fn resize_volume(
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
        crate::storage::durability::write_synced(&self.db, batch)?;
        volume.size_bytes.store(size_bytes, Ordering::Release);
        self.applied_index = index;
        self.durable_applied_index = index;
        Ok(ApplyOutcome::VolumeResized(info))
    }

    /// `Detach`: only the current epoch may detach; anything else is fenced.
    pub(super) fn detach(
        &mut self,
        index: u64,
        name: &str,
        epoch: u64,
    ) -> Result<ApplyOutcome, StorageError> {
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
    pub(super) fn record_attachment(
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
        crate::storage::durability::write_synced(&self.db, batch)?;
        *volume.attachment.lock() = info.attachment.clone();
        self.applied_index = index;
        self.durable_applied_index = index;
        Ok(info)
    }
}
