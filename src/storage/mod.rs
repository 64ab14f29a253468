//! Durable state of one node: RocksDB (Raft log, hard/conf state, applied index, volume table,
//! block checksums) beside one sparse image file per volume.
//!
//! Layout of this module:
//! - [`apply`]: the one path committed entries take into the state machine.
//! - [`command`]: pure encode/decode of the state-machine commands carried in Raft entries.
//! - [`raft_log`]: the Raft log and Raft state of one group in RocksDB ([`raft::Storage`]).
//! - [`image`]: one sparse image file (pwrite/pread, hole punching, allocation map).
//! - [`state_machine`]: applies committed commands to the images and RocksDB, serves reads,
//!   installs snapshots.
//! - [`snapshot`]: snapshot streaming for followers behind the log (fuzzy copy + log replay):
//!   pure chunk encoding, the sending [`snapshot::SnapshotSource`] and the receiving
//!   [`snapshot::SnapshotStaging`].
//! - [`durability`]: the sync points, reported to a watcher of the thread (the simulation's
//!   power cuts).
//! - `wal_cache`: drops RocksDB's synced write-ahead log from the page cache.
//! - `keys`: the RocksDB column families and key encodings, all prefixed by the Raft group id.
//!
//! Whom it talks to: the Raft actor owns a [`raft_log::RaftLogStore`], the storage actor owns the
//! [`state_machine::StateMachine`]; NBD sessions read through cloned
//! [`state_machine::VolumeReader`]s. Nothing here spawns threads or knows about actors.
//!
//! Durability rule: the Raft log is the write-ahead log,
//! the images are a checkpoint. The applied index recorded in RocksDB never runs ahead of what is
//! durable in the images: [`state_machine::StateMachine::make_durable`] fdatasyncs every image
//! written since the last checkpoint *before* it records the applied index (synced). Entries
//! after the recorded index are applied again on restart, so applying is idempotent as a
//! sequence. Log compaction must never drop entries above the durable applied index.

pub mod apply;
pub mod command;
pub mod durability;
mod error;
pub mod image;
mod keys;
pub mod raft_log;
pub mod snapshot;
pub mod state_machine;
mod wal_cache;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod snapshot_tests;

use std::path::Path;
use std::sync::Arc;

pub use error::StorageError;

/// RocksDB tuning that matters on a small node (a Raspberry Pi has little memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageOptions {
    /// One LRU block cache shared by every column family.
    pub block_cache_bytes: usize,
    /// Memtable size of each column family (RocksDB `write_buffer_size`).
    pub write_buffer_bytes: usize,
    /// Flush and compaction threads (RocksDB `max_background_jobs`).
    pub max_background_jobs: i32,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 32 << 20,
            max_background_jobs: 2,
        }
    }
}

/// Memtable bound of the block checksum column family. Its keys arrive in random order (one
/// per block written), and a skiplist insert costs more the more entries the memtable
/// holds: with the 128 MiB of the other families it was 4.9 % of all CPU under 4k randwrite
/// qd32. With 8 MiB, through the proxy (alternated, bench/RESULTS.md fifth round): 15 s runs
/// 7065 / 7151 / 8342 → 7665 / 7871 / 8655 IOPS, 60 s 6552 → 7055.
const CHECKSUM_WRITE_BUFFER_MAX_BYTES: usize = 8 << 20;

/// Name of the RocksDB directory inside the data directory.
pub const ROCKSDB_DIRECTORY_NAME: &str = "rocksdb";
/// Name of the image directory inside the data directory.
pub const IMAGES_DIRECTORY_NAME: &str = "images";

/// Opens (creating) RocksDB at `data_dir/rocksdb` with the column families this layer needs;
/// images live in `data_dir/images/` (see [`state_machine::StateMachine::open`]).
pub fn open_db(
    data_dir: &Path,
    options: &StorageOptions,
) -> Result<Arc<rocksdb::DB>, StorageError> {
    let path = data_dir.join(ROCKSDB_DIRECTORY_NAME);
    std::fs::create_dir_all(&path).map_err(|source| StorageError::Io {
        path: path.clone(),
        source,
    })?;

    let block_cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
    let column_family_options = |name: &str| {
        let mut table_options = rocksdb::BlockBasedOptions::default();
        table_options.set_block_cache(&block_cache);
        let mut cf_options = rocksdb::Options::default();
        cf_options.set_block_based_table_factory(&table_options);
        let write_buffer_bytes = if name == keys::CF_BLOCK_CHECKSUMS {
            options
                .write_buffer_bytes
                .min(CHECKSUM_WRITE_BUFFER_MAX_BYTES)
        } else {
            options.write_buffer_bytes
        };
        cf_options.set_write_buffer_size(write_buffer_bytes);
        cf_options
    };

    let mut db_options = rocksdb::Options::default();
    db_options.create_if_missing(true);
    db_options.create_missing_column_families(true);
    db_options.set_max_background_jobs(options.max_background_jobs);
    // RocksDB's own info log would otherwise grow without limit on a small SD card.
    db_options.set_keep_log_file_num(4);
    db_options.set_max_log_file_size(8 << 20);

    let descriptors = keys::COLUMN_FAMILIES
        .iter()
        .map(|name| rocksdb::ColumnFamilyDescriptor::new(*name, column_family_options(name)));
    let db = rocksdb::DB::open_cf_descriptors(&db_options, &path, descriptors)?;
    Ok(Arc::new(db))
}

/// The column family `name`, which [`open_db`] always creates.
pub(crate) fn column_family<'db>(
    db: &'db rocksdb::DB,
    name: &'static str,
) -> Result<&'db rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name)
        .ok_or(StorageError::MissingColumnFamily { name })
}
