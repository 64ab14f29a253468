//! `RaftActor`: owns the raft-rs `RawNode` of one Raft group and drives it. It turns proposals
//! into log entries, writes each `Ready` to RocksDB, makes it durable with a WAL sync shared
//! by every Ready written while the previous sync ran (group commit), hands committed entries
//! to the `StorageActor`, and answers read barriers (ReadIndex, or the leader's lease where
//! `raft.read_lease_ms` is set: see `read_lease`) once the storage actor has applied far
//! enough.
//!
//! Ready handling follows raft-rs's required order exactly: send leader messages, apply a
//! snapshot, hand over committed entries, persist entries and hard state, send persisted
//! messages, advance. Entries are applied asynchronously by the
//! storage actor, which publishes its applied index in an atomic; this actor takes it up at
//! every Ready and tick (`advance_apply_to`), and asks for an `AppliedUpTo` wake-up only while
//! a read barrier or the read gate waits for an index (`applied_wanted`).
//!
//! Batching: a proposal handler only queues the proposal and schedules one `ProcessReady`;
//! actix runs every message already in the mailbox before that notification, so all proposals
//! that arrived meanwhile share one Ready (and one append message per follower).
//!
//! Every node serves proposals and reads, not only the leader: a follower's proposal is
//! forwarded to the leader by raft-rs and answered when this node applies the entry; a read
//! barrier is a ReadIndex round through the leader. Each proposal's entry context names the
//! proposing node, a proposal id and the term it was proposed in. An entry whose term differs
//! from its proposal term was appended by a later leader from a delayed forward (the proposer
//! has already been told to retry), so every replica applies it as a no-op: a retried write can
//! never be overtaken by its stale twin.
//!
//! Snapshots: a follower too far behind receives one through the peer transport, which stages
//! the data before stepping the `MsgSnapshot` in; the Ready that carries it asks the storage
//! actor to switch to the staged data before anything else of that Ready is handled.
//!
//! Log compaction (on `DurableApplied`): never above the durable applied index, keeping
//! `log_keep_entries` below it; on the leader also not above what a follower still needs,
//! while that follower lags by at most `log_lag_entries_max` entries and
//! `log_lag_bytes_max` bytes. Beyond that the laggard is sent a snapshot instead.
//!
//! Persistence is asynchronous (raft-rs's `advance_append_async` / `on_persist_ready`): a
//! Ready's entries and hard state are written unsynced, so raft-rs can read them back at once,
//! and the Ready is advanced. Under load a WAL sync then runs on the blocking pool while this
//! thread goes on stepping acknowledgements and proposals and writing further Readies (while
//! the log is quiet it runs on this thread, see `start_wal_sync`); when it returns,
//! every Ready written before it is reported persisted and the messages those Readies hold
//! (a follower's append and vote responses) are sent. Until then raft-rs neither counts this
//! node's copy towards a commit nor hands its entries out as committed, so nothing is
//! acknowledged or applied from an unsynced log. A Ready that installs a snapshot is persisted
//! synchronously. A rebuilt node syncs the WAL before it starts.
//!
//! Runs on its own arbiter (thread): the peer links run on it too, and installing a snapshot
//! blocks it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use raft::prelude::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message as RaftMessage, MessageType,
    ReadState,
};
use raft::{RawNode, StateRole, Storage as _};

use super::messages::*;
use super::peer::{PeerNetwork, SnapshotInbox};
use super::read_lease::{LeaderState, LeaseInstant, ReadLease, VoteHold};
use super::storage::StorageActor;
use super::supervisor::{run_guarded, Supervision};
use crate::config::MemberConfig;
use crate::config::RaftConfig;
use crate::raft::entry::ProposalContext;
use crate::storage::raft_log::RaftLogStore;
use crate::storage::snapshot::SnapshotDescriptor;

/// Everything the Raft actor needs to (re)build itself from durable state.
pub struct RaftActorParams {
    pub group_id: u64,
    pub node_id: u64,
    pub config: RaftConfig,
    pub request_timeout: Duration,
    pub log_store: RaftLogStore,
    pub storage: Addr<StorageActor>,
    /// Index the storage actor has applied (in memory), published by it. This actor takes it
    /// up at every Ready and tick; the storage actor sends `AppliedUpTo` only once it reaches
    /// `applied_wanted`.
    pub applied_index: Arc<AtomicU64>,
    /// Published by this actor: the lowest applied index something waits for (a read
    /// barrier, the read gate), `u64::MAX` when nothing does. Waking this thread once per
    /// applied batch cost every node a context switch per write.
    pub applied_wanted: Arc<AtomicU64>,
    /// Published by this actor: whether reads may skip the ReadIndex round (see `ReadGate`).
    pub read_gate: ReadGate,
    pub supervision: Supervision,
    /// Sends messages to the other members (none in a one-voter group).
    pub network: PeerNetwork,
    /// Snapshots received and staged by the peer transport.
    pub snapshots: SnapshotInbox,
}

/// Whether a read on this node needs a ReadIndex round first.
///
/// A node that leads a group in which it is the only voter cannot be deposed without a
/// membership change that it would itself commit, and it acknowledges writes only after they
/// are applied to the image; so a read issued after an acknowledgement already sees that
/// write, and the read barrier would only add a round trip to the Raft thread. The gate is open
/// exactly while that holds and the leader has applied its own first entry (so everything
/// committed before its term is in the image); it closes on any role or membership change and
/// while the Raft actor restarts. It is also closed while a restarted storage actor replays
/// the log up to what its previous instance had applied: replay rewrites older versions of
/// blocks on its way forward, and only a barrier (which waits for the applied index) keeps a
/// read from seeing them.
#[derive(Clone, Default)]
pub struct ReadGate {
    sole_voter_leader: Arc<std::sync::atomic::AtomicBool>,
    storage_replaying: Arc<std::sync::atomic::AtomicBool>,
}

impl ReadGate {
    pub fn reads_need_barrier(&self) -> bool {
        !self.is_open()
    }

    fn is_open(&self) -> bool {
        // Replaying is set before a restarted storage actor hands out any reader, and
        // cleared only once it has caught up: both orders are sequentially consistent.
        self.sole_voter_leader.load(Ordering::SeqCst)
            && !self.storage_replaying.load(Ordering::SeqCst)
    }

    fn set_sole_voter_leader(&self, open: bool) {
        self.sole_voter_leader.store(open, Ordering::SeqCst);
    }

    /// The storage actor restarted (set) or has replayed past everything its previous
    /// instance applied (cleared).
    pub fn set_storage_replaying(&self, replaying: bool) {
        self.storage_replaying.store(replaying, Ordering::SeqCst);
    }
}

/// A ReadIndex request sent: when and in which role and term it started (for the lease), and
/// the read barriers it answers (none for a lease renewal).
struct ReadRound {
    started_at: LeaseInstant,
    term: u64,
    as_leader: bool,
    responders: Vec<ReadBarrierResponder>,
}

struct PendingProposal {
    responder: ProposalResponder,
    proposed_at: Instant,
    /// The term this node was in when it proposed; the entry must carry the same term.
    term: u64,
}

pub struct RaftActor {
    params: RaftActorParams,
    node: Option<RawNode<RaftLogStore>>,
    /// Highest index whose application the storage actor has reported.
    applied_index: u64,
    /// Highest committed index handed to the storage actor.
    delivered_index: u64,
    pending_proposals: HashMap<u64, PendingProposal>,
    /// Proposals received since the last Ready, stepped into raft-rs together (see
    /// [`RaftActor::step_proposal_batch`]).
    proposal_batch: Vec<(Bytes, ProposalResponder)>,
    proposal_batch_bytes: usize,
    next_request_id: u64,
    /// Read barriers not yet sent as a ReadIndex request.
    read_batch: Vec<ReadBarrierResponder>,
    /// ReadIndex requests sent, keyed by their request context.
    reads_in_progress: HashMap<u64, ReadRound>,
    /// Lease reads (`raft.read_lease_ms`, see `read_lease`).
    lease: ReadLease,
    /// Whether the next Ready starts a ReadIndex round only to renew the lease.
    lease_renewal_wanted: bool,
    /// Votes this node refuses for an election timeout after it (re)starts (where leases are
    /// on).
    vote_hold: VoteHold,
    /// When raft-rs was last ticked (where leases are on, ticks closer than nine tenths of
    /// the interval are skipped, see `read_lease`).
    last_tick_at: Option<Instant>,
    /// Read barriers whose read index is known, waiting for `applied_index` to reach it.
    reads_waiting_for_apply: VecDeque<(u64, Vec<ReadBarrierResponder>)>,
    ready_scheduled: bool,
    /// (term, leader id) last seen, to notice elections.
    last_term_and_leader: (u64, u64),
    /// (last index, cumulative bytes) of the entries appended per Ready: sizes the log a
    /// lagging follower would need.
    appended_bytes: VecDeque<(u64, u64)>,
    appended_bytes_total: u64,
    snapshots_sent: u64,
    snapshots_installed: u64,
    /// Set by a Ready that installed a snapshot; raft-rs learns it as applied after the
    /// Ready is advanced.
    snapshot_applied_index: Option<u64>,
    /// While this node is the sole voter's leader but has not yet applied everything
    /// committed before its term: the index (its first entry as leader) at which the read
    /// gate opens.
    read_gate_opens_at: Option<u64>,
    /// Whether this node was last seen in a working quorum (for "quorum lost/regained").
    quorum_ok: Option<bool>,
    /// Peers the leader last saw as inactive (for "member down/up").
    peers_down: std::collections::BTreeSet<u64>,
    /// Ticks since start, and the tick at which the leader last saw each peer active
    /// (raft-rs clears `recent_active` every election timeout, so one look is not enough).
    ticks: u64,
    peer_active_at_tick: HashMap<u64, u64>,
    /// Asynchronous persistence (see "Persistence" in the module doc): whether a WAL sync runs
    /// on the blocking pool now, and the Readies written but not yet reported persisted.
    wal_sync_running: bool,
    /// Whether the next WAL sync runs on this thread (see `start_wal_sync`).
    log_quiet: bool,
    persist_queue: PersistQueue,
    /// Bumped whenever the `RawNode` is rebuilt, so a sync started for an older node is not
    /// reported to the new one.
    node_generation: u64,
}

/// The Readies written (unsynced) and advanced but not yet reported persisted: the newest
/// one's number, whether any of them needs a WAL sync, and the persisted messages each holds
/// until it is durable. Pure bookkeeping, also driven by the Raft simulation.
#[derive(Default)]
pub struct PersistQueue {
    unpersisted: Option<(u64, bool)>,
    held: VecDeque<(u64, Vec<RaftMessage>)>,
}

impl PersistQueue {
    /// Ready `number` was written and advanced; `messages` wait until it is durable.
    pub fn written(&mut self, number: u64, needs_sync: bool, messages: Vec<RaftMessage>) {
        if !messages.is_empty() {
            self.held.push_back((number, messages));
        }
        let needs_sync = needs_sync || self.unpersisted.is_some_and(|(_, needs)| needs);
        self.unpersisted = Some((number, needs_sync));
    }

    /// Whether a Ready was written since the last `take_unpersisted`.
    pub fn has_unpersisted(&self) -> bool {
        self.unpersisted.is_some()
    }

    /// The Readies a sync starting now covers: the newest number, and whether any needs a
    /// sync at all.
    pub fn take_unpersisted(&mut self) -> Option<(u64, bool)> {
        self.unpersisted.take()
    }

    /// Readies up to `number` are durable: the messages they held, oldest first.
    pub fn persisted(&mut self, number: u64) -> Vec<RaftMessage> {
        let mut released = Vec::new();
        while self
            .held
            .front()
            .is_some_and(|(held_for, _)| *held_for <= number)
        {
            if let Some((_, messages)) = self.held.pop_front() {
                released.extend(messages);
            }
        }
        released
    }

    /// Everything written is durable (a synchronous sync): every held message.
    pub fn persisted_all(&mut self) -> Vec<RaftMessage> {
        self.unpersisted = None;
        self.held
            .drain(..)
            .flat_map(|(_, messages)| messages)
            .collect()
    }
}

/// A follower further behind the leader's last index than this is reported as lagging.
const REPLICA_LAG_WARNING_ENTRIES: u64 = 1024;

/// Bytes of proposals stepped into raft-rs as one `MsgPropose`; also raft-rs's
/// `max_size_per_msg`, so one batch fits one append message.
const PROPOSAL_BATCH_BYTES_MAX: usize = 1 << 20;

/// Entries of appended-bytes history kept for compaction decisions.
const APPENDED_BYTES_HISTORY_MAX: usize = 65536;

impl RaftActor {
    pub fn new(params: RaftActorParams) -> Self {
        let lease = ReadLease::new(params.config.read_lease_ms);
        let vote_hold = VoteHold::starting_now(&params.config);
        RaftActor {
            params,
            node: None,
            applied_index: 0,
            delivered_index: 0,
            pending_proposals: HashMap::new(),
            proposal_batch: Vec::new(),
            proposal_batch_bytes: 0,
            next_request_id: 0,
            read_batch: Vec::new(),
            reads_in_progress: HashMap::new(),
            lease,
            lease_renewal_wanted: false,
            vote_hold,
            last_tick_at: None,
            reads_waiting_for_apply: VecDeque::new(),
            ready_scheduled: false,
            last_term_and_leader: (0, 0),
            appended_bytes: VecDeque::new(),
            appended_bytes_total: 0,
            snapshots_sent: 0,
            snapshots_installed: 0,
            snapshot_applied_index: None,
            read_gate_opens_at: None,
            quorum_ok: None,
            peers_down: std::collections::BTreeSet::new(),
            ticks: 0,
            peer_active_at_tick: HashMap::new(),
            wal_sync_running: false,
            log_quiet: true,
            persist_queue: PersistQueue::default(),
            node_generation: 0,
        }
    }

    /// Why this node should not count as healthy, or `None`: it must know a leader, have heard
    /// from it within an election timeout (a leader with check_quorum steps down by itself
    /// once a majority is silent that long), and have applied an entry of the current term
    /// (the new leader's no-op at least), so its state is as current as the group's.
    fn health_problem(&self) -> Option<String> {
        let node = self.node.as_ref()?;
        let raft = &node.raft;
        if raft.leader_id == 0 {
            return Some(format!(
                "no leader in term {} (election running, or no quorum)",
                raft.term
            ));
        }
        if raft.state != StateRole::Leader && raft.election_elapsed >= raft.election_timeout() {
            return Some(format!(
                "no contact with leader {} for {} ticks",
                raft.leader_id, raft.election_elapsed
            ));
        }
        let applied_term = raft.raft_log.term(self.applied_index).unwrap_or(0);
        if applied_term != raft.term {
            return Some(format!(
                "catching up: applied index {} is from term {applied_term}, the current term is {}",
                self.applied_index, raft.term
            ));
        }
        None
    }

    /// Logs the operator-level transitions seen at a tick: quorum lost/regained, member
    /// down/up and replica lagging (the last two on the leader only).
    fn observe_cluster(&mut self) {
        let logger = self.params.supervision.logger.clone();
        let node_id = self.params.node_id;
        let Some(node) = self.node.as_ref() else {
            return;
        };
        let raft = &node.raft;
        let quorum_ok = raft.leader_id != 0
            && (raft.state == StateRole::Leader || raft.election_elapsed < raft.election_timeout());
        match (self.quorum_ok, quorum_ok) {
            (Some(true), false) => slog::error!(logger, "quorum lost";
                "term" => raft.term, "role" => ?raft.state, "leader" => raft.leader_id),
            (Some(false), true) => slog::info!(logger, "quorum regained";
                "term" => raft.term, "leader" => raft.leader_id),
            _ => {}
        }
        // Not before the first quorum: a starting node has not lost anything yet.
        if self.quorum_ok.is_some() || quorum_ok {
            self.quorum_ok = Some(quorum_ok);
        }
        self.ticks += 1;
        if raft.state != StateRole::Leader {
            self.peers_down.clear();
            self.peer_active_at_tick.clear();
            return;
        }
        // Silent for two election timeouts: down.
        let down_after_ticks = 2 * raft.election_timeout() as u64;
        let last_index = raft.raft_log.last_index();
        let mut down_now = Vec::new();
        for (id, progress) in raft.prs().iter() {
            if *id == node_id {
                continue;
            }
            let lag_entries = last_index.saturating_sub(progress.matched);
            let ticks = self.ticks;
            let active_at = self.peer_active_at_tick.entry(*id).or_insert(ticks);
            if progress.recent_active {
                *active_at = ticks;
            }
            if ticks.saturating_sub(*active_at) > down_after_ticks {
                down_now.push(*id);
            } else if lag_entries > REPLICA_LAG_WARNING_ENTRIES {
                let warnings = crate::logging::operator_warnings();
                if let Some(suppressed) = warnings.limiter.admit(&format!("replica lagging {id}")) {
                    slog::warn!(logger, "replica lagging"; "member" => *id,
                        "lag_entries" => lag_entries, "state" => ?progress.state,
                        "suppressed" => suppressed);
                }
            }
        }
        for id in &down_now {
            if self.peers_down.insert(*id) {
                slog::warn!(logger, "member down"; "member" => *id, "term" => raft.term);
            }
        }
        let up: Vec<u64> = self
            .peers_down
            .iter()
            .filter(|id| !down_now.contains(id))
            .copied()
            .collect();
        for id in up {
            self.peers_down.remove(&id);
            slog::info!(logger, "member up"; "member" => id, "term" => raft.term);
        }
    }

    /// How long a forwarded proposal or a read barrier waits before it is retried: a message
    /// lost on the way to the leader is otherwise noticed only at the request deadline.
    fn retry_interval(&self) -> Duration {
        Duration::from_millis(
            2 * self.params.config.tick_interval_ms * self.params.config.election_ticks as u64,
        )
    }

    /// Rebuilds the `RawNode` from the log in RocksDB. Called at start and on every restart.
    fn rebuild(&mut self) {
        let logger = self.params.supervision.logger.clone();
        let store = self.params.log_store.clone();
        let applied_index = self.params.applied_index.load(Ordering::Acquire);
        // The previous node may have written Readies whose WAL sync had not finished. The new
        // node takes everything in RocksDB as persisted, so make it so before it can say so.
        if let Err(error) = store.sync_wal() {
            panic!("cannot sync the Raft log: {error}");
        }
        self.node_generation += 1;
        // The new node has forgotten whom it heard from: votes wait (see `read_lease`). The
        // lease needs no reset: it belongs to a term, and this node leads again only in a
        // later one.
        self.vote_hold = VoteHold::starting_now(&self.params.config);
        self.wal_sync_running = false;
        self.persist_queue = PersistQueue::default();
        // The hard state's commit index is persisted lazily (without fsync), so after a crash
        // it may lag entries that were already applied. Entries are only applied once
        // committed, so raising it to the applied index is safe, and raft-rs refuses to start
        // with applied > commit.
        let mut hard_state = store.hard_state();
        if hard_state.commit < applied_index {
            hard_state.commit = applied_index;
            if let Err(error) = store.persist_ready(&[], Some(&hard_state), true) {
                panic!("cannot persist the recovered commit index: {error}");
            }
        }
        let config = raft::Config {
            id: self.params.node_id,
            election_tick: self.params.config.election_ticks,
            heartbeat_tick: self.params.config.heartbeat_ticks,
            applied: applied_index,
            max_size_per_msg: PROPOSAL_BATCH_BYTES_MAX as u64,
            max_inflight_msgs: 256,
            // A committed Ready carries at most this many bytes of entries, bounding memory.
            max_committed_size_per_ready: 64 << 20,
            check_quorum: true,
            pre_vote: true,
            // A commit advance is not broadcast on its own: followers learn it from the next
            // append or heartbeat (a ReadIndex round sends one). Broadcasting cost every qd1
            // write two more messages out of the leader, two acknowledgements back and a
            // Ready on each follower.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let node = match RawNode::new(&config, store, &logger) {
            Ok(node) => node,
            // No way to serve without a Raft node; the supervisor retries and escalates.
            Err(error) => panic!("cannot start the Raft node: {error}"),
        };
        self.applied_index = applied_index;
        self.delivered_index = applied_index;
        self.next_request_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1);
        self.node = Some(node);
        let node = self.node.as_mut().expect("just set");
        // A group whose only voter is this node elects itself at once instead of waiting for
        // an election timeout.
        let voters = node
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .collect::<Vec<_>>();
        if voters == vec![self.params.node_id] {
            if let Err(error) = node.campaign() {
                slog::warn!(logger, "campaign failed"; "error" => %error);
            }
        }
        slog::info!(logger, "raft node started";
            "group" => self.params.group_id, "node" => self.params.node_id,
            "applied_index" => applied_index, "term" => node.raft.term,
            "commit_index" => node.raft.raft_log.committed,
            "read_lease_ms" => self.params.config.read_lease_ms);
    }

    fn node(&mut self) -> &mut RawNode<RaftLogStore> {
        // Invariant: `started`/`restarting` build the node before any message is handled.
        self.node.as_mut().expect("raft node is built in started()")
    }

    fn schedule_ready(&mut self, ctx: &mut Context<Self>) {
        if !self.ready_scheduled {
            self.ready_scheduled = true;
            ctx.notify(ProcessReady);
        }
    }

    fn take_request_id(&mut self) -> u64 {
        self.next_request_id = self.next_request_id.wrapping_add(1);
        self.next_request_id
    }

    fn propose(&mut self, msg: Propose) {
        if self.pending_proposals.len() + self.proposal_batch.len()
            >= self.params.config.proposals_pending_max
        {
            let _ = msg.responder.send(Err(ProposalError::Overloaded));
            return;
        }
        self.proposal_batch_bytes += msg.command.len();
        self.proposal_batch.push((msg.command, msg.responder));
        if self.proposal_batch_bytes >= PROPOSAL_BATCH_BYTES_MAX {
            self.step_proposal_batch();
        }
    }

    /// Steps every batched proposal into raft-rs as ONE `MsgPropose`. raft-rs broadcasts an
    /// append per `MsgPropose`, so proposing each write on its own sent every follower one
    /// `MsgAppend` per write and got one response per write back; batched, a Ready's writes
    /// travel in one message per follower (up to [`PROPOSAL_BATCH_BYTES_MAX`], the size of one
    /// append message). The entry contexts carry the term at stepping time, the term raft-rs
    /// appends them in.
    fn step_proposal_batch(&mut self) {
        self.proposal_batch_bytes = 0;
        if self.proposal_batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.proposal_batch);
        let node = self.node();
        let term = node.raft.term;
        if node.raft.state != StateRole::Leader && node.raft.leader_id == 0 {
            // No leader to forward to (an election is running): the callers retry.
            for (_, responder) in batch {
                let _ = responder.send(Err(ProposalError::Dropped));
            }
            return;
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut responders = Vec::with_capacity(batch.len());
        for (command, responder) in batch {
            let proposal_id = self.take_request_id();
            let context = ProposalContext {
                node_id: self.params.node_id,
                proposal_id,
                term,
            };
            // Proposing through `step` lets the entry keep the caller's `Bytes` without a
            // copy (`RawNode::propose` takes a `Vec` and would copy up to 32 MiB).
            entries.push(Entry {
                data: command,
                context: context.encode(),
                ..Default::default()
            });
            responders.push((proposal_id, responder));
        }
        let mut message = RaftMessage::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.params.node_id;
        message.set_entries(entries.into());
        let result = self.node().step(message);
        match result {
            Ok(()) => {
                let proposed_at = Instant::now();
                for (proposal_id, responder) in responders {
                    self.pending_proposals.insert(
                        proposal_id,
                        PendingProposal {
                            responder,
                            proposed_at,
                            term,
                        },
                    );
                }
            }
            Err(error) => {
                if !matches!(error, raft::Error::ProposalDropped) {
                    slog::warn!(self.params.supervision.logger, "proposal rejected";
                        "error" => %error);
                }
                for (_, responder) in responders {
                    let _ = responder.send(Err(ProposalError::Dropped));
                }
            }
        }
    }

    /// Hands committed entries to the storage actor with the responders of our proposals.
    fn deliver_committed(&mut self, entries: Vec<Entry>) {
        let Some(last) = entries.last() else {
            return;
        };
        let last_index = last.index;
        let mut responders = Vec::new();
        let mut entries_for_storage = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if let Some(context) = ProposalContext::decode(&entry.context) {
                        if context.node_id == self.params.node_id {
                            if let Some(pending) =
                                self.pending_proposals.remove(&context.proposal_id)
                            {
                                // A stale twin changes nothing (`raft::entry`): its
                                // proposer retries.
                                if context.is_stale_in(&entry) {
                                    let _ = pending.responder.send(Err(ProposalError::Dropped));
                                } else {
                                    responders.push((entry.index, pending.responder));
                                }
                            }
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    if let Some(context) = ProposalContext::decode(&entry.context) {
                        if context.node_id == self.params.node_id {
                            if let Some(pending) =
                                self.pending_proposals.remove(&context.proposal_id)
                            {
                                responders.push((entry.index, pending.responder));
                            }
                        }
                    }
                    // The state machine sees a no-op at this index (`raft::entry`).
                    self.apply_conf_change(&entry);
                }
            }
            entries_for_storage.push(entry);
        }
        self.delivered_index = self.delivered_index.max(last_index);
        self.params.storage.do_send(ApplyCommitted {
            entries: entries_for_storage,
            responders,
        });
    }

    fn apply_conf_change(&mut self, entry: &Entry) {
        // The recorded conf state already includes every change up to its index, and
        // `RawNode::new` loaded it; applying a (joint) change twice would fail.
        if entry.index <= self.params.log_store.conf_state_index() {
            return;
        }
        // Rounds before this counted a majority of the old membership.
        self.lease.membership_changed(LeaseInstant::now());
        let logger = self.params.supervision.logger.clone();
        let change: Result<ConfChangeV2, String> =
            if entry.get_entry_type() == EntryType::EntryConfChange {
                protobuf::Message::parse_from_bytes(&entry.data)
                    .map(|change: ConfChange| conf_change_v2(&change))
                    .map_err(|error| error.to_string())
            } else {
                protobuf::Message::parse_from_bytes(&entry.data).map_err(|error| error.to_string())
            };
        let result = change.and_then(|change| {
            let conf_state = self
                .node()
                .apply_conf_change(&change)
                .map_err(|error| error.to_string())?;
            Ok((change, conf_state))
        });
        match result {
            Ok((change, conf_state)) => {
                let members = updated_members(
                    self.params.log_store.members(),
                    &change.context,
                    &conf_state,
                );
                if let Err(error) =
                    self.params
                        .log_store
                        .set_conf_state_at(&conf_state, entry.index, &members)
                {
                    panic!("cannot persist the conf state: {error}");
                }
                self.params.network.set_members(&members);
                slog::info!(logger, "membership changed"; "index" => entry.index,
                    "voters" => ?conf_state.voters, "learners" => ?conf_state.learners,
                    "outgoing_voters" => ?conf_state.voters_outgoing);
                let node_id = self.params.node_id;
                let still_member = conf_state.voters.contains(&node_id)
                    || conf_state.learners.contains(&node_id)
                    || conf_state.voters_outgoing.contains(&node_id)
                    || conf_state.learners_next.contains(&node_id);
                if !still_member {
                    slog::warn!(logger, "this node was removed from the group; it can be stopped";
                        "node" => node_id);
                }
            }
            // A committed entry that does not decode means the log is corrupt.
            Err(error) => panic!(
                "committed conf change at {} is corrupt: {error}",
                entry.index
            ),
        }
    }

    /// Proposes a membership change on the leader; see [`ProposeConfChange`].
    fn propose_conf_change(&mut self, msg: ProposeConfChange) {
        let node = self.node();
        if node.raft.state != StateRole::Leader {
            let leader_id = node.raft.leader_id;
            let _ = msg
                .responder
                .send(Err(ProposalError::NotLeader { leader_id }));
            return;
        }
        if node.raft.has_pending_conf() {
            let _ = msg.responder.send(Err(ProposalError::ConfChangeNotReady(
                "another membership change is still being applied".into(),
            )));
            return;
        }
        if !node
            .raft
            .prs()
            .conf()
            .to_conf_state()
            .voters_outgoing
            .is_empty()
        {
            let _ = msg.responder.send(Err(ProposalError::ConfChangeNotReady(
                "the group is still leaving a joint configuration".into(),
            )));
            return;
        }
        // The caller's condition, on the state of this very moment: nothing is stepped
        // between this check and the proposal below.
        if let Some(check) = msg.check {
            if let Err(reason) = check(&self.status()) {
                let _ = msg
                    .responder
                    .send(Err(ProposalError::ConfChangeNotReady(reason)));
                return;
            }
        }
        let node = self.node();
        // Check the change against the current configuration here, where the answer can
        // still reach the caller; raft-rs would only fail it at apply time.
        let mut trial = raft::Changer::new(node.raft.prs());
        let checked = match msg.change.enter_joint() {
            Some(auto_leave) => trial.enter_joint(auto_leave, &msg.change.changes),
            None => trial.simple(&msg.change.changes),
        };
        if let Err(error) = checked {
            let _ = msg
                .responder
                .send(Err(ProposalError::ConfChangeRefused(error.to_string())));
            return;
        }
        let term = node.raft.term;
        let proposal_id = self.take_request_id();
        let context = ProposalContext {
            node_id: self.params.node_id,
            proposal_id,
            term,
        };
        match self
            .node()
            .propose_conf_change(context.encode().to_vec(), msg.change)
        {
            Ok(()) => {
                self.pending_proposals.insert(
                    proposal_id,
                    PendingProposal {
                        responder: msg.responder,
                        proposed_at: Instant::now(),
                        term,
                    },
                );
            }
            Err(error) => {
                let _ = msg
                    .responder
                    .send(Err(ProposalError::ConfChangeRefused(error.to_string())));
            }
        }
    }

    fn handle_read_states(&mut self, read_states: Vec<ReadState>) {
        for read_state in read_states {
            if read_state.request_ctx.len() != 8 {
                continue;
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&read_state.request_ctx);
            if let Some(round) = self.reads_in_progress.remove(&u64::from_be_bytes(id)) {
                let now = self.leader_state();
                self.lease
                    .round_completed(round.started_at, round.term, round.as_leader, now);
                if !round.responders.is_empty() {
                    self.reads_waiting_for_apply
                        .push_back((read_state.index, round.responders));
                }
            }
        }
        self.release_reads();
    }

    /// What decides whether the lease may be used now.
    fn leader_state(&self) -> LeaderState {
        match self.node.as_ref() {
            Some(node) => LeaderState {
                is_leader: node.raft.state == StateRole::Leader,
                term: node.raft.term,
                transfer_in_progress: node.raft.lead_transferee.is_some(),
                conf_change_pending: node.raft.pending_conf_index > node.raft.raft_log.applied,
            },
            None => LeaderState {
                is_leader: false,
                term: 0,
                transfer_in_progress: false,
                conf_change_pending: false,
            },
        }
    }

    /// Asks the next Ready for a round that only renews the lease, while reads use it and no
    /// round of this leader's is already on its way.
    fn want_lease_renewal(&mut self) {
        let state = self.leader_state();
        if !self.lease.wants_renewal(LeaseInstant::now(), state) {
            return;
        }
        let round_running = self
            .reads_in_progress
            .values()
            .any(|round| round.as_leader && round.term == state.term);
        if !round_running {
            self.lease_renewal_wanted = true;
        }
    }

    /// Answers a read barrier from the lease if it holds: the read waits only for this node
    /// to apply up to its commit index. Gives the responder back when the barrier needs a
    /// ReadIndex round.
    fn read_from_lease(
        &mut self,
        responder: ReadBarrierResponder,
    ) -> Result<(), ReadBarrierResponder> {
        let state = self.leader_state();
        if !self.lease.admit_read(LeaseInstant::now(), state) {
            return Err(responder);
        }
        let committed = self.node().raft.raft_log.committed;
        self.reads_waiting_for_apply
            .push_back((committed, vec![responder]));
        self.release_reads();
        Ok(())
    }

    /// Takes up the applied index the storage actor published. Only between Readys: raft-rs
    /// learns it through `advance_apply_to`.
    fn sync_applied(&mut self) {
        let published = self.params.applied_index.load(Ordering::SeqCst);
        if published > self.applied_index {
            self.applied_index = published;
            self.node().advance_apply_to(published);
        }
        self.release_reads();
    }

    /// Answers every read barrier whose read index has been applied, and publishes the index
    /// the rest wait for.
    fn release_reads(&mut self) {
        loop {
            // Reads compare with the published index alone: it may run ahead of what raft-rs
            // has been told (`sync_applied`), and it falls back to the durable applied index
            // when the storage actor restarts, whose replay rewrites older block versions on
            // its way forward. What raft-rs was told never goes back.
            let applied_index = self.params.applied_index.load(Ordering::SeqCst);
            if let Some(index) = self.read_gate_opens_at {
                if applied_index >= index {
                    self.read_gate_opens_at = None;
                    self.params.read_gate.set_sole_voter_leader(true);
                }
            }
            self.reads_waiting_for_apply
                .retain_mut(|(index, responders)| {
                    if *index <= applied_index {
                        for responder in responders.drain(..) {
                            let _ = responder.send(Ok(()));
                        }
                        false
                    } else {
                        true
                    }
                });
            let wanted = self
                .reads_waiting_for_apply
                .iter()
                .map(|(index, _)| *index)
                .chain(self.read_gate_opens_at)
                .min()
                .unwrap_or(u64::MAX);
            self.params.applied_wanted.store(wanted, Ordering::SeqCst);
            // The storage actor may have passed `wanted` before it could see it: look again
            // (both sides store, then load, sequentially consistent).
            if wanted == u64::MAX || self.params.applied_index.load(Ordering::SeqCst) < wanted {
                return;
            }
        }
    }

    fn send_messages(&mut self, messages: Vec<RaftMessage>) {
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent += 1;
            }
            self.params.network.send(message);
        }
    }

    /// Switches the storage actor to the snapshot this Ready carries. The peer transport
    /// staged its data before stepping the message in; if the data is gone (this actor
    /// restarted in between), panicking restarts the Raft node from RocksDB, which forgets the
    /// snapshot, and the leader sends it again.
    fn install_snapshot(&mut self, snapshot: &raft::prelude::Snapshot) {
        let metadata = snapshot.get_metadata().clone();
        let Some(staged) = self.params.snapshots.take(metadata.index, metadata.term) else {
            panic!(
                "snapshot at index {} term {} arrived without staged data",
                metadata.index, metadata.term
            );
        };
        let index = metadata.index;
        let members = match SnapshotDescriptor::decode(snapshot.get_data()) {
            Ok(descriptor) => descriptor.members,
            Err(error) => panic!("the snapshot at {index} has a corrupt descriptor: {error}"),
        };
        // Blocking this thread is intended: nothing else of this Ready may happen before the
        // switch is durable, and the storage actor runs on its own thread.
        let result = futures::executor::block_on(self.params.storage.send(InstallSnapshot {
            staged,
            metadata,
            members: members.clone(),
        }));
        match result {
            Ok(Ok(())) => self.params.network.set_members(&members),
            Ok(Err(error)) => panic!("installing the snapshot at {index} failed: {error}"),
            Err(error) => panic!("installing the snapshot at {index} failed: {error}"),
        }
        self.snapshots_installed += 1;
        self.applied_index = self.applied_index.max(index);
        self.delivered_index = self.delivered_index.max(index);
        self.snapshot_applied_index = Some(index);
        slog::info!(self.params.supervision.logger, "snapshot installed"; "index" => index);
    }

    /// Records the bytes of entries appended by a Ready (for compaction decisions).
    fn record_appended(&mut self, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        let bytes: u64 = entries
            .iter()
            .map(|entry| (entry.data.len() + entry.context.len()) as u64)
            .sum();
        self.appended_bytes_total += bytes;
        // A rewritten suffix (new leader) makes older records past it stale.
        while self
            .appended_bytes
            .back()
            .is_some_and(|(index, _)| *index >= last.index)
        {
            self.appended_bytes.pop_back();
        }
        self.appended_bytes
            .push_back((last.index, self.appended_bytes_total));
        if self.appended_bytes.len() > APPENDED_BYTES_HISTORY_MAX {
            self.appended_bytes.pop_front();
        }
    }

    /// Approximate bytes of the log between `low` and `high` (by recorded Ready sizes).
    fn log_bytes_between(&self, low: u64, high: u64) -> u64 {
        let at = |index: u64| {
            self.appended_bytes
                .iter()
                .find(|(recorded, _)| *recorded >= index)
                .map(|(_, cumulative)| *cumulative)
                .unwrap_or(self.appended_bytes_total)
        };
        at(high).saturating_sub(at(low))
    }

    /// The highest index the log may be compacted to (entries below it dropped).
    fn compaction_index(&mut self, durable_applied_index: u64) -> u64 {
        let keep = self.params.config.log_keep_entries;
        let wanted = durable_applied_index.saturating_sub(keep);
        let node_id = self.params.node_id;
        let node = self.node();
        if node.raft.state != StateRole::Leader {
            return wanted;
        }
        let mut needed = wanted;
        for (id, progress) in node.raft.prs().iter() {
            if *id == node_id {
                continue;
            }
            // A follower being sent a snapshot needs the entries after it.
            // raft-rs may probe below `matched` after a stale rejection (it sets `next_idx`
            // from the hint alone), so keep what `next_idx` points at as well.
            let next_needed = if progress.state == raft::ProgressState::Snapshot {
                progress.pending_snapshot + 1
            } else {
                (progress.matched + 1).min(progress.next_idx)
            };
            needed = needed.min(next_needed);
        }
        if needed >= wanted {
            return wanted;
        }
        let lag_entries = wanted - needed;
        let lag_bytes = self.log_bytes_between(needed, wanted);
        if lag_entries <= self.params.config.log_lag_entries_max
            && lag_bytes <= self.params.config.log_lag_bytes_max
        {
            needed
        } else {
            wanted
        }
    }

    /// Drives one Ready through raft-rs's required order.
    fn process_ready(&mut self, ctx: &mut Context<Self>) {
        self.ready_scheduled = false;
        self.sync_applied();
        self.step_proposal_batch();
        let renew_lease = std::mem::take(&mut self.lease_renewal_wanted);
        if !self.read_batch.is_empty() || renew_lease {
            let request_id = self.take_request_id();
            let responders = std::mem::take(&mut self.read_batch);
            let state = self.leader_state();
            self.reads_in_progress.insert(
                request_id,
                ReadRound {
                    started_at: LeaseInstant::now(),
                    term: state.term,
                    as_leader: state.is_leader,
                    responders,
                },
            );
            self.node().read_index(request_id.to_be_bytes().to_vec());
        }
        if !self.node().has_ready() {
            return;
        }
        let mut ready = self.node().ready();
        let sent_before_persisting = !ready.messages().is_empty();
        if sent_before_persisting {
            // A leader's appends and heartbeats leave before its own write: the followers
            // persist in parallel with it (raft thesis 10.2.1).
            let messages = ready.take_messages();
            self.send_messages(messages);
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot);
        }
        let committed = ready.take_committed_entries();
        self.deliver_committed(committed);
        let read_states = ready.take_read_states();
        self.handle_read_states(read_states);
        if !ready.snapshot().is_empty() {
            self.persist_and_advance(ready);
            self.schedule_ready(ctx);
        } else if sent_before_persisting && ready.must_sync() && self.syncs_inline() {
            // This thread is about to block in the write and the fsync. The peer links run on
            // it: let them write the appends to their sockets first, so that the followers
            // persist in parallel with the leader. `wait` holds back every other message
            // meanwhile: nothing is stepped between this Ready and its advance.
            ctx.wait(
                tokio::task::yield_now()
                    .into_actor(self)
                    .map(move |(), actor, ctx| {
                        actor.guarded(ctx, move |actor, ctx| actor.write_ready(ready, ctx));
                    }),
            );
        } else {
            self.write_ready(ready, ctx);
        }
    }

    /// Whether the next WAL sync would run on this thread (see `start_wal_sync`).
    fn syncs_inline(&self) -> bool {
        self.log_quiet && !self.wal_sync_running
    }

    /// Writes a Ready's entries and hard state unsynced and advances raft-rs past it; the
    /// Ready counts as persisted (its held messages go out, its entries may commit and apply)
    /// once a later WAL sync has covered it. See "Persistence" in the module doc.
    fn write_ready(&mut self, mut ready: raft::Ready, ctx: &mut Context<Self>) {
        self.record_appended(ready.entries());
        if !ready.entries().is_empty() || ready.hs().is_some() {
            if let Err(error) =
                self.params
                    .log_store
                    .persist_ready(ready.entries(), ready.hs(), false)
            {
                // The log is our write-ahead log; without it nothing may be acknowledged.
                panic!("cannot persist the Raft log: {error}");
            }
        }
        let number = ready.number();
        let needs_sync = ready.must_sync();
        if ready.entries().len() > 1 {
            // Several proposals or appends piled up while the last Ready was handled: sync
            // off this thread from now on, so that the next ones are stepped meanwhile.
            self.log_quiet = false;
        }
        let messages = ready.take_persisted_messages();
        self.node().advance_append_async(ready);
        self.persist_queue.written(number, needs_sync, messages);
        self.start_wal_sync(ctx);
        if self.node().has_ready() {
            self.schedule_ready(ctx);
        }
    }

    /// Reports the written Readies as persisted, through a WAL sync when one of them needs it.
    /// At most one sync runs at a time; Readies written meanwhile share the next one (group
    /// commit). While the log is quiet the sync runs on this thread: handing it to the
    /// blocking pool and back costs two context switches on the path of every write, and
    /// nothing would be stepped meanwhile anyway.
    fn start_wal_sync(&mut self, ctx: &mut Context<Self>) {
        if self.wal_sync_running {
            return;
        }
        let Some((number, needs_sync)) = self.persist_queue.take_unpersisted() else {
            return;
        };
        if !needs_sync {
            // Only the commit index changed, which may be persisted lazily (`rebuild`
            // recovers it), or nothing was written at all: only held messages wait.
            self.on_persisted(number);
            return;
        }
        if self.log_quiet {
            if let Err(error) = self.params.log_store.sync_wal() {
                panic!("cannot sync the Raft log: {error}");
            }
            self.on_persisted(number);
            return;
        }
        self.wal_sync_running = true;
        let generation = self.node_generation;
        let store = self.params.log_store.clone();
        let sync = tokio::task::spawn_blocking(move || store.sync_wal());
        ctx.spawn(sync.into_actor(self).map(move |result, actor, ctx| {
            if actor.node_generation != generation {
                return;
            }
            actor.guarded(ctx, move |actor, ctx| {
                actor.wal_sync_running = false;
                match result {
                    Ok(Ok(())) => {}
                    // Nothing unsynced may ever count as persisted: restart from RocksDB.
                    Ok(Err(error)) => panic!("cannot sync the Raft log: {error}"),
                    Err(error) => panic!("the Raft log sync did not finish: {error}"),
                }
                // Quiet again once a sync ran without another Ready arriving meanwhile.
                actor.log_quiet = !actor.persist_queue.has_unpersisted();
                actor.on_persisted(number);
                actor.start_wal_sync(ctx);
                actor.schedule_ready(ctx);
            });
        }));
    }

    /// Readies up to `number` are durable: tell raft-rs (a leader may now commit, a node apply
    /// its own entries) and send the messages they held (a follower's append and vote
    /// responses).
    fn on_persisted(&mut self, number: u64) {
        self.node().on_persist_ready(number);
        let messages = self.persist_queue.persisted(number);
        self.send_messages(messages);
    }

    /// A Ready that installs a snapshot is persisted synchronously, with one WAL sync that
    /// also covers every Ready written before it.
    fn persist_and_advance(&mut self, mut ready: raft::Ready) {
        self.record_appended(ready.entries());
        if let Err(error) = self
            .params
            .log_store
            .persist_ready(ready.entries(), ready.hs(), true)
        {
            panic!("cannot persist the Raft log: {error}");
        }
        let messages = self.persist_queue.persisted_all();
        self.send_messages(messages);
        if !ready.persisted_messages().is_empty() {
            let messages = ready.take_persisted_messages();
            self.send_messages(messages);
        }
        let mut light_ready = self.node().advance_append(ready);
        if let Some(index) = self.snapshot_applied_index.take() {
            if index > self.node().raft.raft_log.applied {
                self.node().advance_apply_to(index);
            }
        }
        if let Some(commit_index) = light_ready.commit_index() {
            // The commit index may be persisted lazily: `rebuild` recovers it.
            let mut hard_state = self.params.log_store.hard_state();
            hard_state.commit = commit_index;
            if let Err(error) = self
                .params
                .log_store
                .persist_ready(&[], Some(&hard_state), false)
            {
                panic!("cannot persist the commit index: {error}");
            }
        }
        let messages = light_ready.take_messages();
        self.send_messages(messages);
        let committed = light_ready.take_committed_entries();
        self.deliver_committed(committed);
    }

    /// Fails proposals and reads that waited too long so that their callers retry.
    fn expire_waiters(&mut self) {
        let is_leader = self.node().raft.state == StateRole::Leader;
        // A leader's own proposal sits in its log and cannot get lost; a forwarded one can.
        let proposal_timeout = if is_leader {
            self.params.request_timeout
        } else {
            self.retry_interval()
        };
        let timeout = self.retry_interval();
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending_proposals
            .iter()
            .filter(|(_, pending)| now.duration_since(pending.proposed_at) > proposal_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(pending) = self.pending_proposals.remove(&id) {
                let _ = pending.responder.send(Err(ProposalError::Dropped));
            }
        }
        let lease_now = LeaseInstant::now();
        self.reads_in_progress.retain(|_, round| {
            if round.started_at.until(lease_now) > timeout {
                for responder in round.responders.drain(..) {
                    let _ = responder.send(Err(ProposalError::Dropped));
                }
                false
            } else {
                true
            }
        });
    }

    /// Fails everything waiting when this node stops being leader: the new leader may
    /// overwrite our uncommitted entries, and callers retry against the right node.
    fn on_role_change(&mut self, previous: StateRole) {
        let node_id = self.params.node_id;
        let node = self.node();
        let role = node.raft.state;
        let conf = node.raft.prs().conf();
        let sole_voter =
            conf.voters().ids().iter().eq(std::iter::once(node_id)) && conf.learners().is_empty();
        let last_index = node.raft.raft_log.last_index();
        if role == StateRole::Leader && sole_voter {
            // Entries committed before this term may still be unapplied (after a restart
            // the durable applied index trails the log): the image and its checksums are
            // not current until this leader's first entry is applied.
            if !self.params.read_gate.is_open() && self.read_gate_opens_at.is_none() {
                self.read_gate_opens_at = Some(last_index);
            }
        } else {
            self.read_gate_opens_at = None;
            self.params.read_gate.set_sole_voter_leader(false);
        }
        self.release_reads();
        let node = self.node();
        let leader_id = node.raft.leader_id;
        let term = node.raft.term;
        if role != previous {
            slog::info!(self.params.supervision.logger, "raft role changed";
                "role" => ?role, "term" => term, "leader" => leader_id);
        }
        if (term, leader_id) != self.last_term_and_leader {
            if leader_id != 0 && leader_id != self.last_term_and_leader.1 {
                slog::info!(self.params.supervision.logger, "leader changed";
                    "term" => term, "leader" => leader_id);
            }
            self.last_term_and_leader = (term, leader_id);
            // Proposals from an earlier term may be overwritten by the new leader, or were
            // forwarded to a leader that is gone; read barriers were asked of the old leader.
            // Their callers retry now instead of at the deadline. A retried write that also
            // commits in its old term is harmless: both carry the same data and both commit
            // before the client is answered, so nothing later can be overtaken.
            let stale: Vec<u64> = self
                .pending_proposals
                .iter()
                .filter(|(_, pending)| pending.term < term)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                if let Some(pending) = self.pending_proposals.remove(&id) {
                    let _ = pending.responder.send(Err(ProposalError::Dropped));
                }
            }
            for (_, round) in self.reads_in_progress.drain() {
                for responder in round.responders {
                    let _ = responder.send(Err(ProposalError::Dropped));
                }
            }
        }
    }

    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> Option<R> {
        let supervision = self.params.supervision.clone();
        let role_before = self.node.as_ref().map(|node| node.raft.state);
        let result = run_guarded(&supervision, ctx, |ctx| body(self, ctx));
        if result.is_some() {
            if let Some(previous) = role_before {
                self.on_role_change(previous);
            }
        }
        result
    }
}

impl Actor for RaftActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.params.config.mailbox_capacity);
        self.rebuild();
        let tick = Duration::from_millis(self.params.config.tick_interval_ms);
        ctx.run_interval(tick, |actor, ctx| {
            // Outside any handler: a panic here is caught by the actor's supervisor.
            fail::fail_point!("raft_actor_tick", |_| panic!("failpoint raft_actor_tick"));
            ctx.notify(Tick);
            let _ = actor;
        });
        self.schedule_ready(ctx);
    }
}

impl actix::Supervised for RaftActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Callers holding responders see them dropped and retry against the new instance.
        self.pending_proposals.clear();
        self.proposal_batch.clear();
        self.proposal_batch_bytes = 0;
        self.read_batch.clear();
        self.reads_in_progress.clear();
        self.reads_waiting_for_apply.clear();
        self.lease_renewal_wanted = false;
        self.ready_scheduled = false;
        self.node = None;
        self.params.read_gate.set_sole_voter_leader(false);
        self.read_gate_opens_at = None;
        self.last_term_and_leader = (0, 0);
        self.snapshot_applied_index = None;
        // `started` runs again next and rebuilds the node from RocksDB.
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ProcessReady;

#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

impl Handler<ProcessReady> for RaftActor {
    type Result = ();
    fn handle(&mut self, _: ProcessReady, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            fail::fail_point!("raft_actor_ready", |_| {
                panic!("failpoint raft_actor_ready");
            });
            actor.process_ready(ctx)
        });
    }
}

impl Handler<Tick> for RaftActor {
    type Result = ();
    fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            // Where leases are on, a tick delayed in the mailbox, or the burst an interval
            // timer fires after a stall, must not advance raft-rs's election clock faster
            // than real time: other nodes' leases count on how long this one refuses votes
            // (see `read_lease`).
            let now = Instant::now();
            let interval = Duration::from_millis(actor.params.config.tick_interval_ms);
            if actor.lease.enabled()
                && actor
                    .last_tick_at
                    .is_some_and(|last| now.duration_since(last) < interval * 9 / 10)
            {
                return;
            }
            actor.last_tick_at = Some(now);
            actor.node().tick();
            actor.sync_applied();
            actor.observe_cluster();
            actor.expire_waiters();
            actor.want_lease_renewal();
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<Propose> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: Propose, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            actor.propose(msg);
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<ReadBarrier> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReadBarrier, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            let node = actor.node();
            if node.raft.state != StateRole::Leader && node.raft.leader_id == 0 {
                // No leader to ask (an election is running): the caller retries.
                let _ = msg.responder.send(Err(ProposalError::Dropped));
                return;
            }
            if let Err(responder) = actor.read_from_lease(msg.responder) {
                actor.read_batch.push(responder);
                actor.schedule_ready(ctx);
            }
        });
    }
}

impl Handler<ProposeConfChange> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ProposeConfChange, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            // raft-rs admits one conf change at a time, judged by its applied index.
            actor.sync_applied();
            actor.propose_conf_change(msg);
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<TransferLeader> for RaftActor {
    type Result = Result<(), ProposalError>;
    fn handle(&mut self, msg: TransferLeader, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor, ctx| {
            let node = actor.node();
            if node.raft.state != StateRole::Leader {
                return Err(ProposalError::NotLeader {
                    leader_id: node.raft.leader_id,
                });
            }
            if !node.raft.prs().conf().voters().contains(msg.to) || msg.to == node.raft.id {
                return Err(ProposalError::ConfChangeRefused(format!(
                    "node {} is not another voter",
                    msg.to
                )));
            }
            let term = node.raft.term;
            actor.lease.transfer_started(term);
            actor.node().transfer_leader(msg.to);
            actor.schedule_ready(ctx);
            Ok(())
        })
        .unwrap_or(Err(ProposalError::Dropped))
    }
}

impl Handler<AppliedUpTo> for RaftActor {
    type Result = ();
    fn handle(&mut self, _: AppliedUpTo, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            actor.sync_applied();
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<DurableApplied> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: DurableApplied, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, _| {
            // Never drop anything above the durable applied index (the images do not hold it
            // durably yet); keep what lagging followers need within the budget.
            let compact_index = actor.compaction_index(msg.index);
            let first_index = actor.params.log_store.first_index().unwrap_or(1);
            if compact_index > first_index {
                if let Err(error) = actor.params.log_store.compact(compact_index) {
                    slog::error!(actor.params.supervision.logger, "log compaction failed";
                        "error" => %error, "compact_index" => compact_index);
                }
            }
        });
    }
}

impl Handler<StorageStarted> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: StorageStarted, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, _| {
            // A restarted storage actor lost the entries it had been handed but not yet made
            // durable; hand them over again from the log. Their responders are gone, so the
            // sessions that waited retry their requests.
            if msg.applied_index >= actor.delivered_index {
                return;
            }
            let low = msg.applied_index + 1;
            let high = actor.delivered_index + 1;
            match actor.params.log_store.entries(
                low,
                high,
                None,
                raft::GetEntriesContext::empty(false),
            ) {
                Ok(entries) => {
                    actor.params.storage.do_send(ApplyCommitted {
                        entries,
                        responders: Vec::new(),
                    });
                }
                Err(error) => panic!("cannot re-read committed entries {low}..{high}: {error}"),
            }
        });
    }
}

impl Handler<StepPeerMessage> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: StepPeerMessage, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            let message = msg.0;
            let from = message.from;
            let kind = message.get_msg_type();
            let term = actor.node().raft.term;
            if actor.vote_hold.refuses(&message, term, LeaseInstant::now()) {
                slog::debug!(actor.params.supervision.logger,
                    "vote ignored: this node started less than an election timeout ago";
                    "from" => from, "type" => ?kind, "term" => message.term);
                return;
            }
            if kind == MessageType::MsgTransferLeader {
                actor.lease.transfer_started(term);
            }
            if let Err(error) = actor.node().step(message) {
                // Responses from removed members and the like: nothing to do.
                slog::debug!(actor.params.supervision.logger, "peer message not stepped";
                    "from" => from, "type" => ?kind, "error" => %error);
            }
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<ReportUnreachable> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReportUnreachable, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            actor.node().report_unreachable(msg.peer_id);
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<ReportSnapshot> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReportSnapshot, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            let status = if msg.finished {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            };
            actor.node().report_snapshot(msg.peer_id, status);
            actor.schedule_ready(ctx);
        });
    }
}

impl Handler<GetRaftStatus> for RaftActor {
    type Result = MessageResult<GetRaftStatus>;
    fn handle(&mut self, _: GetRaftStatus, _ctx: &mut Context<Self>) -> Self::Result {
        if self.node.is_some() {
            self.sync_applied();
        }
        MessageResult(self.status())
    }
}

impl RaftActor {
    /// This node's Raft state as the control API shows it.
    fn status(&self) -> RaftStatus {
        let proposals_pending = self.pending_proposals.len() + self.proposal_batch.len();
        let applied_index = self.applied_index;
        let group_id = self.params.group_id;
        let node_id = self.params.node_id;
        let store = self.params.log_store.clone();
        let snapshots_sent = self.snapshots_sent;
        let snapshots_installed = self.snapshots_installed;
        let lease_reads = self.lease.reads_served();
        let mut conf_state = self.params.log_store.conf_state();
        conf_state.voters.sort_unstable();
        conf_state.learners.sort_unstable();
        conf_state.voters_outgoing.sort_unstable();
        let health_problem = match self.node.as_ref() {
            Some(_) => self.health_problem(),
            None => Some("the Raft actor is restarting".to_string()),
        };
        let status = match self.node.as_ref() {
            Some(node) => RaftStatus {
                peers: if node.raft.state == StateRole::Leader {
                    let mut peers: Vec<PeerProgress> = node
                        .raft
                        .prs()
                        .iter()
                        .filter(|(id, _)| **id != node_id)
                        .map(|(id, progress)| PeerProgress {
                            id: *id,
                            matched: progress.matched,
                            next_index: progress.next_idx,
                            state: format!("{:?}", progress.state),
                            recent_active: progress.recent_active,
                        })
                        .collect();
                    peers.sort_by_key(|peer| peer.id);
                    peers
                } else {
                    Vec::new()
                },
                snapshots_sent,
                snapshots_installed,
                lease_reads,
                group_id,
                node_id,
                role: format!("{:?}", node.raft.state),
                term: node.raft.term,
                leader_id: node.raft.leader_id,
                commit_index: node.raft.raft_log.committed,
                applied_index,
                first_log_index: store.first_index().unwrap_or(0),
                last_log_index: store.last_index().unwrap_or(0),
                proposals_pending,
                voters: conf_state.voters,
                learners: conf_state.learners,
                voters_outgoing: conf_state.voters_outgoing,
                health_problem: health_problem.clone(),
            },
            None => RaftStatus {
                group_id,
                node_id,
                role: "Restarting".to_string(),
                term: 0,
                leader_id: 0,
                commit_index: 0,
                applied_index,
                first_log_index: 0,
                last_log_index: 0,
                proposals_pending,
                snapshots_sent,
                snapshots_installed,
                lease_reads,
                peers: Vec::new(),
                voters: Vec::new(),
                learners: Vec::new(),
                voters_outgoing: Vec::new(),
                health_problem,
            },
        };
        status
    }
}

/// Runs `attempt` until it succeeds or `deadline` passes, backing off between tries. Every
/// failure an attempt can report (actor restarting, leader election, dropped proposal) is
/// transient, so only the deadline turns one into the caller's error.
async fn retry_until<T, F, Fut>(deadline: Instant, mut attempt: F) -> Result<T, ProposalError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProposalError>>,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() + backoff >= deadline => return Err(error),
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Puts `message` in the Raft actor's mailbox, waiting for room only when it is full. Unlike
/// `send`, it does not wait for the handler to run: the handler's completion would wake the
/// caller's thread for nothing (the answer comes through the message's responder), and that
/// wake-up would be made by the Raft thread before it sends the appends.
async fn post<M>(raft: &Addr<RaftActor>, message: M) -> Result<(), actix::MailboxError>
where
    M: actix::Message<Result = ()> + Send + 'static,
    RaftActor: Handler<M>,
{
    match raft.try_send(message) {
        Ok(()) => Ok(()),
        Err(actix::prelude::SendError::Full(message)) => raft.send(message).await,
        Err(actix::prelude::SendError::Closed(_)) => Err(actix::MailboxError::Closed),
    }
}

/// Proposes `command` and waits for it to be committed and applied, retrying through leader
/// elections and actor restarts until `deadline`. Used by NBD sessions and the control API.
pub async fn propose_until(
    raft: &Addr<RaftActor>,
    command: Bytes,
    deadline: Instant,
) -> Result<crate::storage::state_machine::ApplyOutcome, ProposalError> {
    retry_until(deadline, || async {
        let (responder, reply) = tokio::sync::oneshot::channel();
        let proposal = Propose {
            command: command.clone(),
            responder,
        };
        match post(raft, proposal).await {
            // A dropped responder means the actor restarted mid-request.
            Ok(()) => reply.await.unwrap_or(Err(ProposalError::Dropped)),
            // The mailbox is closed while the supervisor restarts the actor.
            Err(_) => Err(ProposalError::Dropped),
        }
    })
    .await
}

/// Waits until a read issued now is linearizable on this node (see `ReadBarrier`), retrying
/// like [`propose_until`].
pub async fn read_barrier_until(
    raft: &Addr<RaftActor>,
    deadline: Instant,
) -> Result<(), ProposalError> {
    retry_until(deadline, || async {
        let (responder, reply) = tokio::sync::oneshot::channel();
        match post(raft, ReadBarrier { responder }).await {
            Ok(()) => reply.await.unwrap_or(Err(ProposalError::Dropped)),
            Err(_) => Err(ProposalError::Dropped),
        }
    })
    .await
}

/// The member directory after a configuration change: the member a change adds carries its
/// addresses in the change's context; members no longer in the configuration are dropped.
fn updated_members(
    mut members: Vec<MemberConfig>,
    change_context: &[u8],
    conf_state: &ConfState,
) -> Vec<MemberConfig> {
    if !change_context.is_empty() {
        // Written by our own control API; an unreadable one leaves the directory as is.
        if let Ok(added) = serde_json::from_slice::<MemberConfig>(change_context) {
            members.retain(|member| member.id != added.id);
            members.push(added);
        }
    }
    members.retain(|member| {
        conf_state.voters.contains(&member.id)
            || conf_state.learners.contains(&member.id)
            || conf_state.voters_outgoing.contains(&member.id)
            || conf_state.learners_next.contains(&member.id)
    });
    members
}

/// A single-change (v1) entry as the equivalent v2 change, its context kept.
fn conf_change_v2(change: &ConfChange) -> ConfChangeV2 {
    let mut single = raft::prelude::ConfChangeSingle::default();
    single.set_change_type(change.get_change_type());
    single.node_id = change.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.set_changes(vec![single].into());
    v2.context = change.context.clone();
    v2
}
