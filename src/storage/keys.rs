//! RocksDB column families and key encodings of the storage layer.
//!
//! Every key starts with the Raft group id (u64 big-endian), so a node can host many groups
//! later without a migration, and everything of one group is one contiguous key range per
//! column family (what a snapshot of a group will stream). Integers are big-endian so that
//! RocksDB's bytewise order is numeric order (log entries and blocks iterate in index order).
//!
//! | column family     | key                                   | value                          |
//! |-------------------|---------------------------------------|--------------------------------|
//! | `raft_log`        | group, index                          | `eraftpb::Entry` (protobuf)    |
//! | `meta`            | group, 0x01                           | `HardState` (protobuf)         |
//! | `meta`            | group, 0x02                           | `ConfState` (protobuf)         |
//! | `meta`            | group, 0x03                           | truncated index, term (2×u64)  |
//! | `meta`            | group, 0x04                           | index of the conf state (u64)  |
//! | `meta`            | group, 0x10                           | durable applied index (u64)    |
//! | `meta`            | group, 0x12                           | snapshot covered index (u64)   |
//! | `meta`            | group, 0x11, volume id                | `VolumeInfo` (JSON)            |
//! | `block_checksums` | group, volume id, block index         | crc32c of the block (u32)      |

/// The Raft log: one key per entry.
pub(crate) const CF_RAFT_LOG: &str = "raft_log";
/// Small per-group records: Raft hard/conf/truncated state, applied index, volume table.
pub(crate) const CF_META: &str = "meta";
/// One crc32c per written volume block; an absent key means an all-zero block.
pub(crate) const CF_BLOCK_CHECKSUMS: &str = "block_checksums";

/// Every column family [`super::open_db`] creates (RocksDB adds `default` itself).
pub(crate) const COLUMN_FAMILIES: [&str; 3] = [CF_RAFT_LOG, CF_META, CF_BLOCK_CHECKSUMS];

const META_HARD_STATE: u8 = 0x01;
const META_CONF_STATE: u8 = 0x02;
const META_TRUNCATED_STATE: u8 = 0x03;
const META_CONF_STATE_INDEX: u8 = 0x04;
const META_MEMBERS: u8 = 0x05;
const META_PROPOSAL_IDS: u8 = 0x06;
const META_APPLIED_INDEX: u8 = 0x10;
const META_VOLUME: u8 = 0x11;
const META_SNAPSHOT_COVERED_INDEX: u8 = 0x12;

fn group_and_u64(group_id: u64, value: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group_id.to_be_bytes());
    key[8..].copy_from_slice(&value.to_be_bytes());
    key
}

fn meta_key(group_id: u64, kind: u8) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&group_id.to_be_bytes());
    key[8] = kind;
    key
}

/// Key of the log entry `index` of `group_id` in [`CF_RAFT_LOG`].
pub(crate) fn raft_log_key(group_id: u64, index: u64) -> [u8; 16] {
    group_and_u64(group_id, index)
}

/// The entry index of a [`raft_log_key`] of `group_id`, or `None` if the key is not one.
pub(crate) fn raft_log_key_index(group_id: u64, key: &[u8]) -> Option<u64> {
    let (group, index) = split_u64_pair(key)?;
    (group == group_id).then_some(index)
}

pub(crate) fn hard_state_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_HARD_STATE)
}

pub(crate) fn conf_state_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_CONF_STATE)
}

pub(crate) fn truncated_state_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_TRUNCATED_STATE)
}

pub(crate) fn conf_state_index_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_CONF_STATE_INDEX)
}

/// The member directory (addresses of every member), JSON, written with the conf state.
pub(crate) fn members_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_MEMBERS)
}

/// The first proposal id no core of this node has been handed yet (see
/// `RaftLogStore::reserve_proposal_ids`).
pub(crate) fn proposal_ids_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_PROPOSAL_IDS)
}

pub(crate) fn applied_index_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_APPLIED_INDEX)
}

/// Entries up to this index are contained in the installed snapshot state (see
/// `state_machine`, "Snapshots").
pub(crate) fn snapshot_covered_index_key(group_id: u64) -> [u8; 9] {
    meta_key(group_id, META_SNAPSHOT_COVERED_INDEX)
}

/// `[lower, upper)` bounds of every log entry of `group_id`.
pub(crate) fn raft_log_key_range(group_id: u64) -> ([u8; 16], [u8; 16]) {
    (raft_log_key(group_id, 0), raft_log_key(group_id, u64::MAX))
}

/// `[lower, upper)` bounds of every block checksum of every volume of `group_id` (volume ids
/// are entry indexes, never `u64::MAX`).
pub(crate) fn block_checksum_group_range(group_id: u64) -> ([u8; 24], [u8; 24]) {
    (
        block_checksum_key(group_id, 0, 0),
        block_checksum_key(group_id, u64::MAX, u64::MAX),
    )
}

/// Key of the volume-table row of `volume_id` in [`CF_META`].
pub(crate) fn volume_key(group_id: u64, volume_id: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[..9].copy_from_slice(&meta_key(group_id, META_VOLUME));
    key[9..].copy_from_slice(&volume_id.to_be_bytes());
    key
}

/// `[lower, upper)` bounds of every volume-table row of `group_id`.
pub(crate) fn volume_key_range(group_id: u64) -> ([u8; 9], [u8; 9]) {
    (
        meta_key(group_id, META_VOLUME),
        meta_key(group_id, META_VOLUME + 1),
    )
}

/// Key of the checksum of `block_index` of `volume_id` in [`CF_BLOCK_CHECKSUMS`].
pub(crate) fn block_checksum_key(group_id: u64, volume_id: u64, block_index: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&group_id.to_be_bytes());
    key[8..16].copy_from_slice(&volume_id.to_be_bytes());
    key[16..].copy_from_slice(&block_index.to_be_bytes());
    key
}

/// `[lower, upper)` bounds of every checksum of `volume_id`. Block indexes are far below
/// `u64::MAX` (a volume has at most 2^44 bytes), so the exclusive upper key never exists.
pub(crate) fn block_checksum_key_range(group_id: u64, volume_id: u64) -> ([u8; 24], [u8; 24]) {
    (
        block_checksum_key(group_id, volume_id, 0),
        block_checksum_key(group_id, volume_id, u64::MAX),
    )
}

/// The block index of a [`block_checksum_key`] of (`group_id`, `volume_id`).
pub(crate) fn block_checksum_key_block_index(
    group_id: u64,
    volume_id: u64,
    key: &[u8],
) -> Option<u64> {
    let bytes: &[u8; 24] = key.try_into().ok()?;
    let group = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let volume = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
    let block_index = u64::from_be_bytes(bytes[16..].try_into().ok()?);
    (group == group_id && volume == volume_id).then_some(block_index)
}

/// Splits 16 bytes into two big-endian u64s.
pub(crate) fn split_u64_pair(bytes: &[u8]) -> Option<(u64, u64)> {
    let bytes: &[u8; 16] = bytes.try_into().ok()?;
    let first = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let second = u64::from_be_bytes(bytes[8..].try_into().ok()?);
    Some((first, second))
}

/// Encodes two u64s as 16 big-endian bytes (the truncated index and term).
pub(crate) fn join_u64_pair(first: u64, second: u64) -> [u8; 16] {
    group_and_u64(first, second)
}

/// Decodes a stored big-endian u64 value (the applied index).
pub(crate) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_log_keys_sort_by_group_then_index() {
        assert!(raft_log_key(1, 2) < raft_log_key(1, 256));
        assert!(raft_log_key(1, u64::MAX) < raft_log_key(2, 0));
        assert_eq!(raft_log_key_index(7, &raft_log_key(7, 42)), Some(42));
        assert_eq!(raft_log_key_index(8, &raft_log_key(7, 42)), None);
        assert_eq!(raft_log_key_index(7, b"short"), None);
    }

    #[test]
    fn volume_rows_stay_inside_their_range() {
        let (lower, upper) = volume_key_range(3);
        for volume_id in [0, 1, 1 << 40, u64::MAX] {
            let key = volume_key(3, volume_id);
            assert!(key[..] >= lower[..] && key[..] < upper[..]);
        }
        // The other meta records of the group are outside the volume range.
        assert!(applied_index_key(3)[..] < lower[..]);
        assert!(hard_state_key(3)[..] < lower[..]);
    }

    #[test]
    fn block_checksum_keys_round_trip() {
        let key = block_checksum_key(1, 2, 3);
        assert_eq!(block_checksum_key_block_index(1, 2, &key), Some(3));
        assert_eq!(block_checksum_key_block_index(1, 3, &key), None);
        let (lower, upper) = block_checksum_key_range(1, 2);
        assert!(key >= lower && key < upper);
        assert!(block_checksum_key(1, 3, 0) > upper);
    }
}
