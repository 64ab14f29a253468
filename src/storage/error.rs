//! The one error type of the storage layer. Structured fields so the caller can log and map
//! them (e.g. a checksum mismatch becomes an NBD `EIO` and an operator-level log line).

use std::path::PathBuf;

/// Everything that can go wrong in `src/storage`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error (I/O, corruption it detected itself, ...).
    #[error("RocksDB: {0}")]
    RocksDb(#[from] rocksdb::Error),

    /// A file system call on an image file or directory failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A value read back from RocksDB or the file system does not have the shape we wrote.
    #[error("corruption in {what}: {detail}")]
    Corruption { what: &'static str, detail: String },

    /// A block read from an image does not match the checksum recorded when it was written.
    #[error(
        "checksum mismatch in volume {volume_id} block {block_index}: recorded {recorded_crc32c:?} \
         (None = all-zero block), computed {computed_crc32c:#010x}"
    )]
    ChecksumMismatch {
        volume_id: u64,
        block_index: u64,
        recorded_crc32c: Option<u32>,
        computed_crc32c: u32,
    },

    /// [`open_db`](super::open_db) creates every column family; a missing one means the
    /// database was opened some other way.
    #[error("RocksDB column family {name} is missing")]
    MissingColumnFamily { name: &'static str },

    /// `persist_ready` was asked to write entries the log has already compacted away.
    #[error("raft log of group {group_id}: entry {index} is at or below the truncated index {truncated_index}")]
    LogEntryCompacted {
        group_id: u64,
        index: u64,
        truncated_index: u64,
    },

    /// `persist_ready` was given entries that leave a gap after the last index, or that are not
    /// consecutive among themselves.
    #[error("raft log of group {group_id}: entry {index} does not follow index {previous_index}")]
    LogGap {
        group_id: u64,
        previous_index: u64,
        index: u64,
    },

    /// An entry between the first and the last index is not in RocksDB.
    #[error("raft log of group {group_id}: entry {index} is missing")]
    LogEntryMissing { group_id: u64, index: u64 },

    /// `compact` was asked to drop entries that do not exist yet.
    #[error("raft log of group {group_id}: cannot compact to {compact_index}, last index is {last_index}")]
    CompactBeyondLastIndex {
        group_id: u64,
        compact_index: u64,
        last_index: u64,
    },

    /// `bootstrap` on a group that already has a different configuration.
    #[error("raft group {group_id} is already bootstrapped with another configuration")]
    AlreadyBootstrapped { group_id: u64 },

    /// Committed entries must be applied in order, without gaps.
    #[error(
        "apply out of order in group {group_id}: expected index {expected_index}, got {index}"
    )]
    ApplyOutOfOrder {
        group_id: u64,
        expected_index: u64,
        index: u64,
    },

    /// A read on a volume that has been deleted since the reader was handed out.
    #[error("volume {volume_id} has been deleted")]
    VolumeDeleted { volume_id: u64 },

    /// A read through a reader whose volume was replaced by an installed snapshot: get a new
    /// reader from the state machine.
    #[error("volume {volume_id} has been replaced by a snapshot")]
    VolumeReplaced { volume_id: u64 },

    /// A snapshot chunk is malformed (bytes from the network: never trusted).
    #[error("snapshot chunk: {0}")]
    SnapshotChunk(#[from] super::snapshot::SnapshotChunkDecodeError),

    /// A well-formed snapshot chunk that does not fit the stream received so far (order,
    /// undeclared volume, range, counts, group or index).
    #[error("snapshot stream of group {group_id} at index {snapshot_index}: {detail}")]
    SnapshotStream {
        group_id: u64,
        snapshot_index: u64,
        detail: String,
    },

    /// `install_snapshot` was given a staged snapshot that does not match the metadata, the
    /// group, or is not newer than the applied state.
    #[error("cannot install snapshot at index {snapshot_index} in group {group_id}: {detail}")]
    SnapshotInstall {
        group_id: u64,
        snapshot_index: u64,
        detail: String,
    },

    /// A read outside the volume (the caller should have checked).
    #[error("range {offset}+{length_bytes} is outside volume {volume_id} of {size_bytes} bytes")]
    OutOfRange {
        volume_id: u64,
        offset: u64,
        length_bytes: u64,
        size_bytes: u64,
    },
}

impl StorageError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<StorageError> for raft::Error {
    /// raft-rs treats any storage error as fatal for the node ("the application is responsible
    /// for cleanup and recovery"), so the detail travels boxed inside `Store(Other)`.
    fn from(error: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(error)))
    }
}
