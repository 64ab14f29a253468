//! The Raft log and Raft state (hard state, conf state, truncated index/term) of one Raft group
//! in RocksDB, behind raft-rs's [`raft::Storage`] trait.
//!
//! Owned by the Raft actor: it calls [`RaftLogStore::persist_ready`] once per `Ready` (the one
//! synced write that makes entries and votes durable: group commit), and raft-rs reads entries
//! back through the trait. A bounded cache of the most recent entries spares RocksDB reads when
//! raft-rs hands just-persisted entries back as committed entries or sends them to followers.
//!
//! Invariants:
//! - the entries in RocksDB are exactly `first_index ..= last_index` with
//!   `first_index = truncated_index + 1`; `term(truncated_index)` is remembered separately.
//! - the in-memory view (indexes, cache) changes only after the RocksDB write that it reflects
//!   has succeeded, under the same lock, so readers never see a state RocksDB does not hold.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use protobuf::Message;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use rocksdb::{ReadOptions, WriteBatch, WriteOptions, DB};

use super::keys;
use super::snapshot::SnapshotDescriptor;
use super::wal_cache::WalPageCache;
use super::{column_family, StorageError};
use crate::config::MemberConfig;

/// Default bound of the recent-entry cache.
pub const ENTRY_CACHE_BYTES_MAX_DEFAULT: usize = 64 << 20;

/// Bytes an entry is charged in the cache: its payload plus a fixed overhead for the struct.
fn cached_entry_bytes(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len() + 64
}

/// The Raft log of one group. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct RaftLogStore {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<DB>,
    group_id: u64,
    entry_cache_bytes_max: usize,
    state: RwLock<LogState>,
    /// The state machine's applied index, published by its owner: the index a snapshot is
    /// taken at (see [`RaftLogStore::set_applied_index_source`]).
    applied_index_source: parking_lot::Mutex<Option<Arc<AtomicU64>>>,
    /// Drops the WAL's pages from the page cache behind each sync.
    wal_cache: WalPageCache,
}

struct LogState {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index of the configuration-change entry that produced `conf_state` (0: bootstrap).
    conf_state_index: u64,
    /// Addresses of the members, by node id; changed together with `conf_state`.
    members: Vec<MemberConfig>,
    /// Index of the last entry dropped by compaction (0 when nothing was ever dropped).
    truncated_index: u64,
    /// Term of the entry at `truncated_index`, kept for raft-rs's log-matching check.
    truncated_term: u64,
    last_index: u64,
    /// The most recent entries, contiguous and ending at `last_index` when not empty.
    entry_cache: VecDeque<Entry>,
    entry_cache_bytes: usize,
}

impl LogState {
    fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    fn cached_entry(&self, index: u64) -> Option<&Entry> {
        let front_index = self.entry_cache.front()?.index;
        let position = usize::try_from(index.checked_sub(front_index)?).ok()?;
        self.entry_cache.get(position)
    }
}

fn corruption(what: &'static str, detail: impl Into<String>) -> StorageError {
    StorageError::Corruption {
        what,
        detail: detail.into(),
    }
}

fn parse_protobuf<M: Message>(what: &'static str, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|error| corruption(what, error.to_string()))
}

fn encode_protobuf<M: Message>(what: &'static str, message: &M) -> Result<Vec<u8>, StorageError> {
    message
        .write_to_bytes()
        .map_err(|error| corruption(what, format!("cannot encode: {error}")))
}

/// Options of a write that is not synced (a synced one goes through
/// `durability::write_synced`).
fn unsynced_write_options() -> WriteOptions {
    WriteOptions::default()
}

fn sorted_members(members: &[MemberConfig]) -> Vec<MemberConfig> {
    let mut members = members.to_vec();
    members.sort_by_key(|member| member.id);
    members.dedup_by_key(|member| member.id);
    members
}

fn encode_members(members: &[MemberConfig]) -> Vec<u8> {
    serde_json::to_vec(&sorted_members(members)).expect("member records serialize")
}

pub(crate) fn decode_members(bytes: &[u8]) -> Result<Vec<MemberConfig>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

impl RaftLogStore {
    /// Opens the log of `group_id` with the default entry cache bound.
    pub fn open(db: Arc<DB>, group_id: u64) -> Result<Self, StorageError> {
        Self::open_with_entry_cache_bytes(db, group_id, ENTRY_CACHE_BYTES_MAX_DEFAULT)
    }

    /// Opens the log of `group_id`: loads hard state, conf state, truncated index/term, and
    /// finds the first and last index. `entry_cache_bytes_max` bounds the recent-entry cache
    /// (0 disables it).
    pub fn open_with_entry_cache_bytes(
        db: Arc<DB>,
        group_id: u64,
        entry_cache_bytes_max: usize,
    ) -> Result<Self, StorageError> {
        let meta = column_family(&db, keys::CF_META)?;
        let hard_state = match db.get_pinned_cf(meta, keys::hard_state_key(group_id))? {
            Some(bytes) => parse_protobuf("raft hard state", &bytes)?,
            None => HardState::default(),
        };
        let conf_state = match db.get_pinned_cf(meta, keys::conf_state_key(group_id))? {
            Some(bytes) => parse_protobuf("raft conf state", &bytes)?,
            None => ConfState::default(),
        };
        let conf_state_index = match db.get_pinned_cf(meta, keys::conf_state_index_key(group_id))? {
            Some(bytes) => keys::decode_u64(&bytes).ok_or_else(|| {
                corruption("raft conf state index", format!("{} bytes", bytes.len()))
            })?,
            None => 0,
        };
        let members = match db.get_pinned_cf(meta, keys::members_key(group_id))? {
            Some(bytes) => decode_members(&bytes)
                .map_err(|error| corruption("member directory", error.to_string()))?,
            None => Vec::new(),
        };
        let (truncated_index, truncated_term) =
            match db.get_pinned_cf(meta, keys::truncated_state_key(group_id))? {
                Some(bytes) => keys::split_u64_pair(&bytes).ok_or_else(|| {
                    corruption("raft truncated state", format!("{} bytes", bytes.len()))
                })?,
                None => (0, 0),
            };

        let (first_stored_index, last_stored_index) = Self::stored_index_range(&db, group_id)?;
        let last_index = match (first_stored_index, last_stored_index) {
            (Some(first), Some(last)) => {
                // Compaction deletes entries and records the truncated index in one batch, so
                // the first stored entry is right after the truncated one.
                if first != truncated_index + 1 {
                    return Err(corruption(
                        "raft log",
                        format!(
                            "group {group_id}: first stored entry {first}, truncated index {truncated_index}"
                        ),
                    ));
                }
                last
            }
            _ => truncated_index,
        };

        let wal_cache = WalPageCache::new(db.path());
        Ok(RaftLogStore {
            shared: Arc::new(Shared {
                db,
                group_id,
                entry_cache_bytes_max,
                state: RwLock::new(LogState {
                    hard_state,
                    conf_state,
                    conf_state_index,
                    members,
                    truncated_index,
                    truncated_term,
                    last_index,
                    entry_cache: VecDeque::new(),
                    entry_cache_bytes: 0,
                }),
                applied_index_source: parking_lot::Mutex::new(None),
                wal_cache,
            }),
        })
    }

    /// The first and last entry index stored for `group_id`, if any.
    fn stored_index_range(
        db: &DB,
        group_id: u64,
    ) -> Result<(Option<u64>, Option<u64>), StorageError> {
        let raft_log = column_family(db, keys::CF_RAFT_LOG)?;
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_lower_bound(keys::raft_log_key(group_id, 0));
        read_options.set_iterate_upper_bound(keys::raft_log_key(group_id, u64::MAX));
        let mut iterator = db.raw_iterator_cf_opt(raft_log, read_options);
        let index_of = |key: Option<&[u8]>| -> Result<Option<u64>, StorageError> {
            match key {
                None => Ok(None),
                Some(key) => keys::raft_log_key_index(group_id, key)
                    .map(Some)
                    .ok_or_else(|| corruption("raft log key", format!("{key:02x?}"))),
            }
        };
        iterator.seek_to_first();
        iterator.status()?;
        let first = index_of(iterator.key())?;
        iterator.seek_to_last();
        iterator.status()?;
        let last = index_of(iterator.key())?;
        Ok((first, last))
    }

    /// The Raft group this log belongs to.
    pub fn group_id(&self) -> u64 {
        self.shared.group_id
    }

    /// Whether a conf state has been written: the group was bootstrapped on this node, or a
    /// configuration was applied here.
    pub fn is_bootstrapped(&self) -> bool {
        self.shared.state.read().conf_state != ConfState::default()
    }

    /// First start of a new group: writes the initial configuration, synced, so a crash right
    /// after cannot make the node forget it is a member. Bootstrapping again with the same
    /// configuration is a no-op; with another one it is an error.
    pub fn bootstrap(
        &self,
        conf_state: ConfState,
        members: &[MemberConfig],
    ) -> Result<(), StorageError> {
        {
            let state = self.shared.state.read();
            if state.conf_state != ConfState::default() {
                return if state.conf_state == conf_state {
                    Ok(())
                } else {
                    Err(StorageError::AlreadyBootstrapped {
                        group_id: self.shared.group_id,
                    })
                };
            }
        }
        self.set_conf_state_at(&conf_state, 0, members)
    }

    /// The member directory: the addresses of every member this node knows, as recorded with
    /// the conf state (bootstrap, configuration changes, snapshots).
    pub fn members(&self) -> Vec<MemberConfig> {
        self.shared.state.read().members.clone()
    }

    /// Records `members` as the directory without changing the conf state: a node that joins
    /// an existing group starts from its configured member list until a snapshot or a
    /// configuration change brings the group's own.
    pub fn set_members(&self, members: &[MemberConfig]) -> Result<(), StorageError> {
        let db = &self.shared.db;
        let mut state = self.shared.state.write();
        let meta = column_family(db, keys::CF_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            meta,
            keys::members_key(self.shared.group_id),
            encode_members(members),
        );
        super::durability::write_synced(db, batch)?;
        state.members = sorted_members(members);
        Ok(())
    }

    /// The one synced write per Raft `Ready`: appends `entries` (overwriting any conflicting
    /// suffix and deleting whatever of the old log lies beyond them, as raft-rs requires) and
    /// the hard state in ONE RocksDB `WriteBatch`, fsync'd when `sync` (always true in
    /// production: raft-rs may send messages that promise these entries only after this
    /// returns).
    pub fn persist_ready(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let mut state = self.shared.state.write();
        let mut batch = WriteBatch::default();

        if let Some(first) = entries.first() {
            if first.index <= state.truncated_index {
                return Err(StorageError::LogEntryCompacted {
                    group_id,
                    index: first.index,
                    truncated_index: state.truncated_index,
                });
            }
            if first.index > state.last_index + 1 {
                return Err(StorageError::LogGap {
                    group_id,
                    previous_index: state.last_index,
                    index: first.index,
                });
            }
            for pair in entries.windows(2) {
                if pair[1].index != pair[0].index + 1 {
                    return Err(StorageError::LogGap {
                        group_id,
                        previous_index: pair[0].index,
                        index: pair[1].index,
                    });
                }
            }
            let raft_log = column_family(db, keys::CF_RAFT_LOG)?;
            for entry in entries {
                let value = encode_protobuf("raft entry", entry)?;
                batch.put_cf(raft_log, keys::raft_log_key(group_id, entry.index), value);
            }
            let new_last_index = first.index + entries.len() as u64 - 1;
            if new_last_index < state.last_index {
                // The new entries conflict with a longer old suffix: that suffix belonged to
                // a leader whose entries lost, and must not survive past the new last index.
                batch.delete_range_cf(
                    raft_log,
                    keys::raft_log_key(group_id, new_last_index + 1),
                    keys::raft_log_key(group_id, state.last_index + 1),
                );
            }
        }
        if let Some(hard_state) = hard_state {
            let meta = column_family(db, keys::CF_META)?;
            batch.put_cf(
                meta,
                keys::hard_state_key(group_id),
                encode_protobuf("raft hard state", hard_state)?,
            );
        }

        // fsync (when `sync`): raft-rs may acknowledge these entries and this vote to peers as
        // soon as we return, so they must survive a power loss. The batch is written unsynced
        // and the WAL then synced with `SyncWAL`, which runs outside RocksDB's write queue: a
        // synced write would hold that queue through its fdatasync, and every write of the
        // storage actor (an applied batch's checksums) would wait behind it. The sync covers
        // everything written to the WAL before it, this batch included.
        let batch_bytes = batch.size_in_bytes();
        db.write_opt(batch, &unsynced_write_options())?;
        self.shared.wal_cache.note_written(batch_bytes);
        if sync {
            self.shared
                .wal_cache
                .sync(|| super::durability::sync_wal(db))?;
        }

        if let Some(hard_state) = hard_state {
            state.hard_state = hard_state.clone();
        }
        if let Some(first) = entries.first() {
            state.last_index = first.index + entries.len() as u64 - 1;
            self.cache_appended_entries(&mut state, entries);
        }
        Ok(())
    }

    /// fsyncs the WAL: everything written before this call, by any `persist_ready`, survives a
    /// power loss once it returns. Takes no lock of this store, so the Raft actor can go on
    /// writing further Readies (unsynced) while another thread runs this.
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        let db = &self.shared.db;
        self.shared
            .wal_cache
            .sync(|| super::durability::sync_wal(db))?;
        Ok(())
    }

    fn cache_appended_entries(&self, state: &mut LogState, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        while state
            .entry_cache
            .back()
            .is_some_and(|cached| cached.index >= first.index)
        {
            if let Some(dropped) = state.entry_cache.pop_back() {
                state.entry_cache_bytes -= cached_entry_bytes(&dropped);
            }
        }
        if state
            .entry_cache
            .back()
            .is_some_and(|cached| cached.index + 1 != first.index)
        {
            // Cannot happen given the checks in `persist_ready`; keep the cache contiguous anyway.
            state.entry_cache.clear();
            state.entry_cache_bytes = 0;
        }
        for entry in entries {
            // `Entry::data` is a `Bytes`: cloning shares the payload, it does not copy it.
            state.entry_cache_bytes += cached_entry_bytes(entry);
            state.entry_cache.push_back(entry.clone());
        }
        while state.entry_cache_bytes > self.shared.entry_cache_bytes_max {
            match state.entry_cache.pop_front() {
                Some(dropped) => state.entry_cache_bytes -= cached_entry_bytes(&dropped),
                None => break,
            }
        }
    }

    /// Records the configuration (synced: it decides who may vote), keeping the recorded
    /// [`Self::conf_state_index`]. Prefer [`Self::set_conf_state_at`].
    pub fn set_conf_state(&self, conf_state: &ConfState) -> Result<(), StorageError> {
        let (index, members) = {
            let state = self.shared.state.read();
            (state.conf_state_index, state.members.clone())
        };
        self.set_conf_state_at(conf_state, index, &members)
    }

    /// Records the configuration produced by applying the configuration-change entry at
    /// `index`, both in one synced batch.
    ///
    /// Why the index: after a restart raft-rs starts from `Config::applied` (the durable
    /// applied index of the state machine), which may be below `index`, and hands the
    /// configuration-change entries after it back as committed entries. The conf state loaded
    /// by `RawNode::new` already contains their effect, and applying a joint change twice fails
    /// ("already joint"), so the caller skips `apply_conf_change` for every entry at or below
    /// [`Self::conf_state_index`].
    pub fn set_conf_state_at(
        &self,
        conf_state: &ConfState,
        index: u64,
        members: &[MemberConfig],
    ) -> Result<(), StorageError> {
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let mut state = self.shared.state.write();
        let meta = column_family(db, keys::CF_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            meta,
            keys::conf_state_key(group_id),
            encode_protobuf("raft conf state", conf_state)?,
        );
        batch.put_cf(
            meta,
            keys::conf_state_index_key(group_id),
            index.to_be_bytes(),
        );
        batch.put_cf(meta, keys::members_key(group_id), encode_members(members));
        // fsync: a node must not forget a membership it has acted on.
        super::durability::write_synced(db, batch)?;
        state.conf_state = conf_state.clone();
        state.conf_state_index = index;
        state.members = sorted_members(members);
        Ok(())
    }

    /// Index of the configuration-change entry whose application produced the recorded conf
    /// state (0 for the bootstrap configuration); see [`Self::set_conf_state_at`].
    pub fn conf_state_index(&self) -> u64 {
        self.shared.state.read().conf_state_index
    }

    /// Drops the entries below `compact_index` and remembers the index and term of the last
    /// dropped one. The caller guarantees `compact_index <= durable applied index + 1`, so no
    /// entry that a restart would have to replay is dropped. Compacting to or below the
    /// current first index is a no-op.
    pub fn compact(&self, compact_index: u64) -> Result<(), StorageError> {
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let mut state = self.shared.state.write();
        if compact_index <= state.first_index() {
            return Ok(());
        }
        if compact_index > state.last_index + 1 {
            return Err(StorageError::CompactBeyondLastIndex {
                group_id,
                compact_index,
                last_index: state.last_index,
            });
        }
        let new_truncated_index = compact_index - 1;
        let new_truncated_term = self.term_locked(&state, new_truncated_index)?;

        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            column_family(db, keys::CF_RAFT_LOG)?,
            keys::raft_log_key(group_id, state.first_index()),
            keys::raft_log_key(group_id, compact_index),
        );
        batch.put_cf(
            column_family(db, keys::CF_META)?,
            keys::truncated_state_key(group_id),
            keys::join_u64_pair(new_truncated_index, new_truncated_term),
        );
        // Not synced: the deletion and the new truncated state are one atomic batch, so after
        // a crash either both are there or the old log (still valid) is.
        db.write_opt(batch, &unsynced_write_options())?;

        state.truncated_index = new_truncated_index;
        state.truncated_term = new_truncated_term;
        while state
            .entry_cache
            .front()
            .is_some_and(|cached| cached.index < compact_index)
        {
            if let Some(dropped) = state.entry_cache.pop_front() {
                state.entry_cache_bytes -= cached_entry_bytes(&dropped);
            }
        }
        Ok(())
    }

    /// Where [`raft::Storage::snapshot`] reads the state machine's applied index (X0 of the
    /// snapshot module doc). Until set, snapshots are temporarily unavailable.
    pub fn set_applied_index_source(&self, applied_index: Arc<AtomicU64>) {
        *self.shared.applied_index_source.lock() = Some(applied_index);
    }

    /// The Raft part of installing a snapshot at `metadata.index`: adds to the caller's batch
    /// the deletion of every log entry, the truncated index/term = the snapshot's, its conf
    /// state (recorded as produced at the snapshot index), and the hard state with
    /// `commit = max(commit, index)`; writes the batch synced; then updates the in-memory
    /// view, under the lock, so readers never see a state RocksDB does not hold.
    pub(crate) fn write_snapshot_install(
        &self,
        mut batch: WriteBatch,
        metadata: &SnapshotMetadata,
        members: &[MemberConfig],
    ) -> Result<(), StorageError> {
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let mut state = self.shared.state.write();
        let raft_log = column_family(db, keys::CF_RAFT_LOG)?;
        let meta = column_family(db, keys::CF_META)?;
        let conf_state = metadata.get_conf_state().clone();
        let mut hard_state = state.hard_state.clone();
        hard_state.commit = hard_state.commit.max(metadata.index);
        hard_state.term = hard_state.term.max(metadata.term);
        let (lower, upper) = keys::raft_log_key_range(group_id);
        // Every entry goes, also those after the snapshot index: raft-rs restores its own log
        // to exactly the snapshot and appends what the leader sends next.
        batch.delete_range_cf(raft_log, lower, upper);
        batch.put_cf(
            meta,
            keys::truncated_state_key(group_id),
            keys::join_u64_pair(metadata.index, metadata.term),
        );
        batch.put_cf(
            meta,
            keys::conf_state_key(group_id),
            encode_protobuf("raft conf state", &conf_state)?,
        );
        batch.put_cf(
            meta,
            keys::conf_state_index_key(group_id),
            metadata.index.to_be_bytes(),
        );
        batch.put_cf(
            meta,
            keys::hard_state_key(group_id),
            encode_protobuf("raft hard state", &hard_state)?,
        );
        batch.put_cf(meta, keys::members_key(group_id), encode_members(members));
        // fsync: after this the node is a member at the snapshot index, and the state machine
        // part of the batch names the new image files.
        super::durability::write_synced(db, batch)?;
        state.hard_state = hard_state;
        state.conf_state = conf_state;
        state.conf_state_index = metadata.index;
        state.members = sorted_members(members);
        state.truncated_index = metadata.index;
        state.truncated_term = metadata.term;
        state.last_index = metadata.index;
        state.entry_cache.clear();
        state.entry_cache_bytes = 0;
        Ok(())
    }

    /// The metadata of a snapshot at the published applied index, or why there is none now
    /// (see the snapshot module doc).
    fn snapshot_now(&self, request_index: u64) -> Result<Snapshot, SnapshotUnavailable> {
        let applied_index = self
            .shared
            .applied_index_source
            .lock()
            .as_ref()
            .map(|source| source.load(Ordering::Acquire))
            .ok_or(SnapshotUnavailable::NoAppliedIndexSource)?;
        let state = self.shared.state.read();
        if applied_index == 0 {
            // raft-rs treats a snapshot at index 0 as fatal ("need non-empty snapshot").
            return Err(SnapshotUnavailable::NothingApplied);
        }
        if request_index > applied_index {
            return Err(SnapshotUnavailable::RequestedNewer);
        }
        if state.conf_state_index > applied_index {
            // The conf state we hold is newer than the data: it would not match the index.
            return Err(SnapshotUnavailable::ConfStateNewer);
        }
        if applied_index < state.truncated_index || applied_index > state.last_index {
            return Err(SnapshotUnavailable::TermUnknown);
        }
        let term = self
            .term_locked(&state, applied_index)
            .map_err(|_| SnapshotUnavailable::TermUnknown)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(
            SnapshotDescriptor {
                group_id: self.shared.group_id,
                snapshot_index: applied_index,
                members: state.members.clone(),
            }
            .encode()
            .into(),
        );
        let metadata = snapshot.mut_metadata();
        metadata.index = applied_index;
        metadata.term = term;
        metadata.set_conf_state(state.conf_state.clone());
        Ok(snapshot)
    }

    /// Reserves `count` proposal ids and returns the first: ids this node has never handed
    /// out before, in any earlier run, so that a node's proposal ids only grow (the Raft
    /// core's forwarding rules rely on it). The reservation is written with fsync before it is
    /// used; a crash only skips ids.
    pub fn reserve_proposal_ids(&self, count: u64) -> Result<u64, StorageError> {
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let _state = self.shared.state.write();
        let meta = column_family(db, keys::CF_META)?;
        let key = keys::proposal_ids_key(group_id);
        let first = match db.get_pinned_cf(meta, key)? {
            Some(bytes) => keys::decode_u64(&bytes).ok_or_else(|| StorageError::Corruption {
                what: "proposal id reservation",
                detail: format!("{} bytes", bytes.len()),
            })?,
            None => 1,
        };
        let next = first
            .checked_add(count)
            .ok_or_else(|| StorageError::Corruption {
                what: "proposal id reservation",
                detail: format!("{first} + {count} overflows"),
            })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, key, next.to_be_bytes());
        super::durability::write_synced(db, batch)?;
        Ok(first)
    }

    /// The last persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.shared.state.read().hard_state.clone()
    }

    /// The last persisted conf state.
    pub fn conf_state(&self) -> ConfState {
        self.shared.state.read().conf_state.clone()
    }

    /// Index of the last entry dropped by compaction (0 if none).
    pub fn truncated_index(&self) -> u64 {
        self.shared.state.read().truncated_index
    }

    /// Index of the last entry in the log (the truncated index when the log is empty).
    pub fn last_log_index(&self) -> u64 {
        self.shared.state.read().last_index
    }

    /// Bytes currently held by the recent-entry cache.
    pub fn entry_cache_bytes(&self) -> usize {
        self.shared.state.read().entry_cache_bytes
    }

    fn term_locked(&self, state: &LogState, index: u64) -> Result<u64, StorageError> {
        if index == state.truncated_index {
            return Ok(state.truncated_term);
        }
        if let Some(entry) = state.cached_entry(index) {
            return Ok(entry.term);
        }
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let raft_log = column_family(db, keys::CF_RAFT_LOG)?;
        match db.get_pinned_cf(raft_log, keys::raft_log_key(group_id, index))? {
            Some(bytes) => Ok(parse_protobuf::<Entry>("raft entry", &bytes)?.term),
            None => Err(StorageError::LogEntryMissing { group_id, index }),
        }
    }

    /// Reads `[low, high)` from RocksDB, stopping once `max_size` bytes are exceeded (the first
    /// entry is always returned).
    fn read_entries_from_db(
        &self,
        low: u64,
        high: u64,
        max_size: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let group_id = self.shared.group_id;
        let db = &self.shared.db;
        let raft_log = column_family(db, keys::CF_RAFT_LOG)?;
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_lower_bound(keys::raft_log_key(group_id, low));
        read_options.set_iterate_upper_bound(keys::raft_log_key(group_id, high));
        let mut iterator = db.raw_iterator_cf_opt(raft_log, read_options);
        iterator.seek_to_first();

        let mut entries = Vec::new();
        let mut total_size = 0u64;
        let mut expected_index = low;
        while expected_index < high {
            iterator.status()?;
            let Some((key, value)) = iterator.item() else {
                return Err(StorageError::LogEntryMissing {
                    group_id,
                    index: expected_index,
                });
            };
            if keys::raft_log_key_index(group_id, key) != Some(expected_index) {
                return Err(StorageError::LogEntryMissing {
                    group_id,
                    index: expected_index,
                });
            }
            let entry: Entry = parse_protobuf("raft entry", value)?;
            if entry.index != expected_index {
                return Err(corruption(
                    "raft entry",
                    format!(
                        "key says index {expected_index}, entry says {}",
                        entry.index
                    ),
                ));
            }
            total_size += u64::from(entry.compute_size());
            if !entries.is_empty() && total_size > max_size {
                break;
            }
            entries.push(entry);
            expected_index += 1;
            iterator.next();
        }
        Ok(entries)
    }
}

impl raft::Storage for RaftLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let state = self.shared.state.read();
        Ok(RaftState::new(
            state.hard_state.clone(),
            state.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let state = self.shared.state.read();
        if low < state.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        // The log from its first entry builds on the bootstrap configuration, which only the
        // founding members hold: a member added since (its log empty, so the leader's probe
        // falls back to entry 1) would apply the entries on an empty configuration and fail at
        // the first membership change. Once the group changed its membership, the log is not
        // sent from its start: answering "compacted" makes raft-rs send a snapshot instead,
        // which carries the configuration. raft-rs asks with a context that may wait (the
        // only kind `can_async` is true for) only when it sends appends; this store never
        // asks that way itself.
        if low == 1 && context.can_async() && state.conf_state_index > 0 {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > state.last_index + 1 || low > high {
            // raft-rs's own MemStorage panics here; an error stops this group instead of the
            // whole process.
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        if low == high {
            return Ok(Vec::new());
        }
        if state.cached_entry(low).is_some() {
            // The cache is contiguous up to `last_index`, so it holds the whole range.
            let mut entries = Vec::new();
            let mut total_size = 0u64;
            for index in low..high {
                let Some(entry) = state.cached_entry(index) else {
                    break;
                };
                total_size += u64::from(entry.compute_size());
                if !entries.is_empty() && total_size > max_size {
                    break;
                }
                entries.push(entry.clone());
            }
            return Ok(entries);
        }
        Ok(self.read_entries_from_db(low, high, max_size)?)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let state = self.shared.state.read();
        if index < state.truncated_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if index > state.last_index {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.term_locked(&state, index)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.shared.state.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.shared.state.read().last_index)
    }

    /// Metadata only (the bytes are streamed by the transport, see the snapshot module doc).
    /// Every failure is `SnapshotTemporarilyUnavailable`: raft-rs treats any other error here
    /// as fatal, and retries this one later.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        self.snapshot_now(request_index)
            .map_err(|_| raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable))
    }
}

/// Why [`RaftLogStore`] cannot describe a snapshot right now (all temporary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SnapshotUnavailable {
    NoAppliedIndexSource,
    NothingApplied,
    RequestedNewer,
    ConfStateNewer,
    TermUnknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{open_db, StorageOptions};
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn small_options() -> StorageOptions {
        StorageOptions {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            max_background_jobs: 1,
        }
    }

    fn terms(store: &RaftLogStore, low: u64, high: u64) -> Vec<u64> {
        store
            .entries(low, high, None, GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|entry| entry.term)
            .collect()
    }

    /// Runs `check` against a store with the cache enabled and one with it disabled, so both
    /// the cache and the RocksDB read path are covered.
    fn with_both_cache_settings(check: impl Fn(&dyn Fn() -> (tempfile::TempDir, RaftLogStore))) {
        for cache_bytes in [ENTRY_CACHE_BYTES_MAX_DEFAULT, 0] {
            let open = move || {
                let directory = tempfile::tempdir().unwrap();
                let db = open_db(directory.path(), &small_options()).unwrap();
                let store = RaftLogStore::open_with_entry_cache_bytes(db, 1, cache_bytes).unwrap();
                (directory, store)
            };
            check(&open);
        }
    }

    #[test]
    fn a_new_log_is_empty_and_truncated_at_zero() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            assert_eq!(store.first_index().unwrap(), 1);
            assert_eq!(store.last_index().unwrap(), 0);
            assert_eq!(store.term(0).unwrap(), 0);
            assert!(!store.is_bootstrapped());
            assert!(!store.initial_state().unwrap().initialized());
        });
    }

    #[test]
    fn append_then_read_back() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            let entries: Vec<Entry> = (1..=5).map(|index| entry(index, 1, b"x")).collect();
            store.persist_ready(&entries, None, true).unwrap();
            assert_eq!(store.last_index().unwrap(), 5);
            assert_eq!(terms(&store, 1, 6), vec![1; 5]);
            assert_eq!(store.term(3).unwrap(), 1);
            assert_eq!(
                store.term(6),
                Err(raft::Error::Store(raft::StorageError::Unavailable))
            );
        });
    }

    /// Raft paper section 5.3: "If an existing entry conflicts with a new one (same index but
    /// different terms), delete the existing entry and all that follow it".
    #[test]
    fn a_conflicting_append_replaces_the_whole_old_suffix() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            let old: Vec<Entry> = (1..=6).map(|index| entry(index, 1, b"old")).collect();
            store.persist_ready(&old, None, true).unwrap();
            let new = vec![entry(3, 2, b"new"), entry(4, 2, b"new")];
            store.persist_ready(&new, None, true).unwrap();
            assert_eq!(store.last_index().unwrap(), 4);
            assert_eq!(terms(&store, 1, 5), vec![1, 1, 2, 2]);
            assert_eq!(
                store.term(5),
                Err(raft::Error::Store(raft::StorageError::Unavailable))
            );
        });
    }

    #[test]
    fn a_gap_or_compacted_append_is_refused() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            store
                .persist_ready(&[entry(1, 1, b""), entry(2, 1, b"")], None, true)
                .unwrap();
            assert!(matches!(
                store.persist_ready(&[entry(4, 1, b"")], None, true),
                Err(StorageError::LogGap {
                    previous_index: 2,
                    index: 4,
                    ..
                })
            ));
            assert!(matches!(
                store.persist_ready(&[entry(3, 1, b""), entry(5, 1, b"")], None, true),
                Err(StorageError::LogGap {
                    previous_index: 3,
                    index: 5,
                    ..
                })
            ));
            store.compact(2).unwrap();
            assert!(matches!(
                store.persist_ready(&[entry(1, 2, b"")], None, true),
                Err(StorageError::LogEntryCompacted { index: 1, .. })
            ));
            assert_eq!(store.last_index().unwrap(), 2);
        });
    }

    #[test]
    fn compaction_keeps_the_term_of_the_last_dropped_entry() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            let entries: Vec<Entry> = (1..=6).map(|index| entry(index, index, b"x")).collect();
            store.persist_ready(&entries, None, true).unwrap();
            store.compact(4).unwrap();
            assert_eq!(store.first_index().unwrap(), 4);
            assert_eq!(store.term(3).unwrap(), 3);
            assert_eq!(
                store.term(2),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            assert_eq!(
                store.entries(3, 5, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            assert_eq!(terms(&store, 4, 7), vec![4, 5, 6]);
            // Compacting backwards is a no-op; beyond the last index is an error.
            store.compact(2).unwrap();
            assert_eq!(store.first_index().unwrap(), 4);
            assert!(matches!(
                store.compact(8),
                Err(StorageError::CompactBeyondLastIndex { .. })
            ));
            // Compacting everything leaves an empty log that still knows the last term.
            store.compact(7).unwrap();
            assert_eq!(store.first_index().unwrap(), 7);
            assert_eq!(store.last_index().unwrap(), 6);
            assert_eq!(store.term(6).unwrap(), 6);
            store
                .persist_ready(&[entry(7, 7, b"")], None, true)
                .unwrap();
            assert_eq!(terms(&store, 7, 8), vec![7]);
        });
    }

    #[test]
    fn after_a_membership_change_appends_are_not_sent_from_the_first_entry() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            let entries: Vec<Entry> = (1..=10).map(|index| entry(index, 1, &[7u8; 10])).collect();
            store.persist_ready(&entries, None, true).unwrap();
            let voters = ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            store.bootstrap(voters.clone(), &[]).unwrap();
            // raft-rs sends appends with a context that may wait (`can_async`).
            let sending = || GetEntriesContext::empty(true);
            // Founding members share the bootstrap configuration: the log goes out from 1.
            assert_eq!(store.entries(1, 11, None, sending()).unwrap().len(), 10);
            store.set_conf_state_at(&voters, 5, &[]).unwrap();
            assert!(matches!(
                store.entries(1, 11, None, sending()),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            ));
            // Later entries still go out, and this node itself still reads its whole log.
            assert_eq!(store.entries(2, 11, None, sending()).unwrap().len(), 9);
            assert_eq!(
                store
                    .entries(1, 11, None, GetEntriesContext::empty(false))
                    .unwrap()
                    .len(),
                10
            );
        });
    }

    #[test]
    fn entries_honour_max_size_but_return_at_least_one() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            let entries: Vec<Entry> = (1..=10).map(|index| entry(index, 1, &[7u8; 100])).collect();
            store.persist_ready(&entries, None, true).unwrap();
            let one_size = u64::from(entries[0].compute_size());
            let read = |max_size: u64| {
                store
                    .entries(1, 11, max_size, GetEntriesContext::empty(false))
                    .unwrap()
                    .len()
            };
            assert_eq!(read(0), 1);
            assert_eq!(read(one_size), 1);
            assert_eq!(read(one_size * 3), 3);
            assert_eq!(read(one_size * 3 + 1), 3);
            assert_eq!(read(u64::MAX), 10);
            assert_eq!(
                store.entries(1, 12, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(raft::StorageError::Unavailable))
            );
        });
    }

    #[test]
    fn everything_survives_a_reopen() {
        let directory = tempfile::tempdir().unwrap();
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: 4,
            ..Default::default()
        };
        let conf_state = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        {
            let db = open_db(directory.path(), &small_options()).unwrap();
            let store = RaftLogStore::open(db, 9).unwrap();
            store.bootstrap(conf_state.clone(), &[]).unwrap();
            let entries: Vec<Entry> = (1..=6).map(|index| entry(index, 3, b"abc")).collect();
            store
                .persist_ready(&entries, Some(&hard_state), true)
                .unwrap();
            store.compact(3).unwrap();
            // Another group in the same database must not interfere.
            let other = RaftLogStore::open(store.shared.db.clone(), 10).unwrap();
            other
                .persist_ready(&[entry(1, 1, b"other")], None, true)
                .unwrap();
        }
        let db = open_db(directory.path(), &small_options()).unwrap();
        let store = RaftLogStore::open(db.clone(), 9).unwrap();
        assert!(store.is_bootstrapped());
        let initial_state = store.initial_state().unwrap();
        assert_eq!(initial_state.hard_state, hard_state);
        assert_eq!(initial_state.conf_state, conf_state);
        assert_eq!(store.first_index().unwrap(), 3);
        assert_eq!(store.last_index().unwrap(), 6);
        assert_eq!(store.term(2).unwrap(), 3);
        let entries = store
            .entries(3, 7, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(entries.len(), 4);
        assert!(entries.iter().all(|entry| &entry.data[..] == b"abc"));
        assert!(matches!(
            store.bootstrap(ConfState::default(), &[]),
            Err(StorageError::AlreadyBootstrapped { group_id: 9 })
        ));
        store.bootstrap(conf_state, &[]).unwrap();
        assert_eq!(store.conf_state_index(), 0);
        let other = RaftLogStore::open(db, 10).unwrap();
        assert_eq!(other.last_index().unwrap(), 1);
        assert_eq!(other.first_index().unwrap(), 1);
    }

    #[test]
    fn the_entry_cache_stays_within_its_bound() {
        let directory = tempfile::tempdir().unwrap();
        let db = open_db(directory.path(), &small_options()).unwrap();
        let store = RaftLogStore::open_with_entry_cache_bytes(db, 1, 10_000).unwrap();
        for index in 1..=100 {
            store
                .persist_ready(&[entry(index, 1, &[1u8; 1000])], None, true)
                .unwrap();
            assert!(store.entry_cache_bytes() <= 10_000);
        }
        assert!(store.entry_cache_bytes() > 0);
        // Old entries come from RocksDB, recent ones from the cache; both read the same.
        assert_eq!(terms(&store, 1, 101), vec![1; 100]);
    }

    #[test]
    fn the_conf_state_remembers_the_index_that_produced_it() {
        let directory = tempfile::tempdir().unwrap();
        let joint = ConfState {
            voters: vec![1, 2],
            voters_outgoing: vec![1],
            ..Default::default()
        };
        {
            let db = open_db(directory.path(), &small_options()).unwrap();
            let store = RaftLogStore::open(db, 1).unwrap();
            store
                .bootstrap(
                    ConfState {
                        voters: vec![1],
                        ..Default::default()
                    },
                    &[],
                )
                .unwrap();
            store
                .set_conf_state_at(&joint, 7, &[member(2), member(1), member(2)])
                .unwrap();
            assert_eq!(store.conf_state_index(), 7);
        }
        let db = open_db(directory.path(), &small_options()).unwrap();
        let store = RaftLogStore::open(db, 1).unwrap();
        assert_eq!(store.conf_state(), joint);
        assert_eq!(store.conf_state_index(), 7);
        // The member directory is written with the conf state: sorted, one record per id.
        assert_eq!(store.members(), vec![member(1), member(2)]);
        // The index-less setter keeps the recorded index.
        store.set_conf_state(&joint).unwrap();
        assert_eq!(store.conf_state_index(), 7);
    }

    fn member(id: u64) -> MemberConfig {
        MemberConfig {
            id,
            peer: format!("127.0.0.{id}:10811"),
            nbd: format!("127.0.0.{id}:10809"),
            control: format!("127.0.0.{id}:10810"),
        }
    }

    fn unavailable() -> raft::Result<Snapshot> {
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }

    /// raft-rs `Storage::snapshot`: "If snapshot is temporarily unavailable, it should return
    /// SnapshotTemporarilyUnavailable"; every case where this store cannot describe a
    /// snapshot at the applied index is that error, never another one (which raft-rs treats
    /// as fatal).
    #[test]
    fn snapshot_metadata_is_the_applied_index_or_temporarily_unavailable() {
        with_both_cache_settings(|open| {
            let (_directory, store) = open();
            assert_eq!(store.snapshot(0, 2), unavailable());
            assert_eq!(
                store.snapshot_now(0),
                Err(SnapshotUnavailable::NoAppliedIndexSource)
            );
            let applied_index = Arc::new(AtomicU64::new(0));
            store.set_applied_index_source(applied_index.clone());
            assert_eq!(
                store.snapshot_now(0),
                Err(SnapshotUnavailable::NothingApplied)
            );
            let conf_state = ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            store
                .bootstrap(conf_state.clone(), &[member(1), member(2)])
                .unwrap();
            let entries: Vec<Entry> = (1..=10)
                .map(|index| entry(index, if index <= 5 { 1 } else { 2 }, b"x"))
                .collect();
            store.persist_ready(&entries, None, true).unwrap();
            applied_index.store(7, Ordering::Release);
            let snapshot = store.snapshot(0, 2).unwrap();
            assert_eq!(snapshot.get_metadata().index, 7);
            assert_eq!(snapshot.get_metadata().term, 2);
            assert_eq!(snapshot.get_metadata().get_conf_state(), &conf_state);
            assert_eq!(
                SnapshotDescriptor::decode(snapshot.get_data()),
                Ok(SnapshotDescriptor {
                    group_id: 1,
                    snapshot_index: 7,
                    // A node that catches up by this snapshot learns every member's address.
                    members: vec![member(1), member(2)],
                })
            );
            assert_eq!(store.snapshot(7, 2).unwrap().get_metadata().index, 7);
            assert_eq!(
                store.snapshot_now(8),
                Err(SnapshotUnavailable::RequestedNewer)
            );
            assert_eq!(store.snapshot(8, 2), unavailable());
            store.set_conf_state_at(&conf_state, 9, &[]).unwrap();
            assert_eq!(
                store.snapshot_now(0),
                Err(SnapshotUnavailable::ConfStateNewer)
            );
            store.set_conf_state_at(&conf_state, 7, &[]).unwrap();
            assert!(store.snapshot(0, 2).is_ok());
            store.compact(9).unwrap();
            assert_eq!(
                store.snapshot_now(0),
                Err(SnapshotUnavailable::TermUnknown),
                "index 7 was compacted away"
            );
            applied_index.store(11, Ordering::Release);
            assert_eq!(
                store.snapshot_now(0),
                Err(SnapshotUnavailable::TermUnknown),
                "index 11 is not in the log yet"
            );
            assert_eq!(store.snapshot(0, 2), unavailable());
            applied_index.store(8, Ordering::Release);
            let snapshot = store.snapshot(0, 2).unwrap();
            assert_eq!(
                (snapshot.get_metadata().index, snapshot.get_metadata().term),
                (8, 2),
                "the truncated index keeps its term"
            );
        });
    }

    /// Installing a snapshot leaves the log empty after the snapshot index, remembers its
    /// term for the log-matching check (Raft paper section 7: "the snapshot ... includes the
    /// last included index and term"), and survives a reopen.
    #[test]
    fn installing_a_snapshot_replaces_the_log() {
        let directory = tempfile::tempdir().unwrap();
        let voters = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let mut metadata = SnapshotMetadata {
            index: 20,
            term: 3,
            ..Default::default()
        };
        metadata.set_conf_state(voters.clone());
        let check = |store: &RaftLogStore| {
            assert_eq!(store.first_index().unwrap(), 21);
            assert_eq!(store.last_index().unwrap(), 20);
            assert_eq!(store.term(20).unwrap(), 3);
            assert_eq!(
                store.term(5),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            assert_eq!(
                store.entries(5, 6, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            let hard_state = store.hard_state();
            assert_eq!(
                (hard_state.commit, hard_state.term, hard_state.vote),
                (20, 3, 1)
            );
            assert_eq!(store.conf_state(), voters);
            assert_eq!(store.conf_state_index(), 20);
        };
        {
            let db = open_db(directory.path(), &small_options()).unwrap();
            let store = RaftLogStore::open(db, 1).unwrap();
            store
                .bootstrap(
                    ConfState {
                        voters: vec![1],
                        ..Default::default()
                    },
                    &[],
                )
                .unwrap();
            let entries: Vec<Entry> = (1..=25).map(|index| entry(index, 1, b"old")).collect();
            let hard_state = HardState {
                term: 1,
                vote: 1,
                commit: 5,
                ..Default::default()
            };
            store
                .persist_ready(&entries, Some(&hard_state), true)
                .unwrap();
            store
                .write_snapshot_install(WriteBatch::default(), &metadata, &[])
                .unwrap();
            check(&store);
            assert_eq!(store.entry_cache_bytes(), 0);
            // The leader's entries after the snapshot append normally.
            store
                .persist_ready(&[entry(21, 3, b"new")], None, true)
                .unwrap();
            assert_eq!(terms(&store, 21, 22), vec![3]);
        }
        let db = open_db(directory.path(), &small_options()).unwrap();
        let store = RaftLogStore::open(db, 1).unwrap();
        assert_eq!(store.last_index().unwrap(), 21);
        assert_eq!(terms(&store, 21, 22), vec![3]);
        store.compact(1).unwrap();
        assert_eq!(store.first_index().unwrap(), 21);
        assert_eq!(store.term(20).unwrap(), 3);
    }
}
