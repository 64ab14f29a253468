//! `RaftCore`: one Raft group's node without its I/O loop, the way raft-rs's `Ready` hands
//! all I/O to its caller. It owns the `RawNode`, the proposal contexts and pending proposals,
//! read rounds and the lease, the persist queue, the compaction policy and the conf-change
//! checks. Its caller (the Raft actor on a server, the simulation in tests) feeds it events
//! (a proposal, a peer message, a tick, a WAL sync finished, the applied index moved, the
//! storage restarted) and carries out the effects it queues ([`Effect`]: messages to send,
//! committed entries to apply, a WAL sync to run, replies, the member directory).
//!
//! Time is an input: every event that needs the clock takes a [`LeaseInstant`], so a
//! simulation can run the same code on a clock of its own. Proposal and read responders are
//! type parameters (`P`, `R`): the server's are one-shot channels, a simulation's are
//! operation numbers.
//!
//! What the core still does itself is write to the log store (`RaftLogStore`, RocksDB): the
//! Ready's entries and hard state unsynced, the conf state, compaction. raft-rs reads those
//! back within the same step, so they cannot wait for the caller; the expensive part, the
//! WAL sync that makes them durable, is an effect.
//!
//! Ready order follows raft-rs's rules exactly: send leader messages, apply a snapshot, hand
//! over committed entries, persist entries and hard state, send persisted messages, advance.
//!
//! Persistence is asynchronous (raft-rs's `advance_append_async` / `on_persist_ready`, see
//! [`super::persist`]): until a WAL sync has covered a Ready, raft-rs neither counts this
//! node's copy towards a commit nor hands its entries out as committed, so nothing is
//! acknowledged or applied from an unsynced log. A Ready that installs a snapshot is
//! persisted synchronously. A rebuilt core syncs the WAL before it starts.
//!
//! Every node serves proposals and reads, not only the leader: a follower's proposal is
//! forwarded to the leader by raft-rs and answered when this node applies the entry; a read
//! barrier is a ReadIndex round through the leader, or the leader's lease (see
//! [`super::lease`]). Each proposal's entry carries a [`ProposalContext`]; the stale-twin
//! rule in [`super::entry`] decides what of it the state machine applies.
//!
//! Forwarded proposals. A caller told "retry" reissues its write, maybe through another node,
//! and then goes on to later writes; so "retry" may only be said of a proposal that can no
//! longer take effect after that. A leader's own proposal is in its log at once: a retry is
//! appended after it, and a later term makes it a stale twin. A forwarded proposal is
//! different: the message can arrive at the leader at any later time (a stalled connection)
//! and be appended then, after the retry and after later writes. So:
//! - a node's proposal ids only grow, across restarts too (reserved in the log store);
//! - the leader drops a forwarded entry whose id is not above the highest id of its proposer
//!   it has appended in its term ([`RaftCore::admit_forwarded`]): once a later proposal of a
//!   node is in the leader's log, an earlier one that was not can never be appended in that
//!   term, and in a later term it is a stale twin;
//! - so when this node sees its own proposal delivered, every earlier own proposal of the
//!   same term still pending can never take effect, and its caller is told to retry;
//! - a forwarded proposal that has waited a retry interval is not failed but fenced: this
//!   node proposes an empty entry (a fence), and its delivery, or a change of term, answers
//!   the overdue proposal. A lost fence is followed by another one a retry interval later.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use raft::prelude::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message as RaftMessage, MessageType,
    ReadState, Snapshot,
};
use raft::{RawNode, StateRole, Storage as _};

use super::compaction::{compaction_index, AppendedBytes};
use super::entry::ProposalContext;
use super::lease::{LeaderState, LeaseInstant, ReadLease, VoteHold};
use super::persist::PersistQueue;
use super::{ConfChangeCheck, PeerProgress, ProposalError, RaftStatus};
use crate::config::{MemberConfig, RaftConfig};
use crate::storage::raft_log::RaftLogStore;

/// Whether a read on this node needs a ReadIndex round first.
///
/// A node that leads a group in which it is the only voter cannot be deposed without a
/// membership change that it would itself commit, and it acknowledges writes only after they
/// are applied to the image; so a read issued after an acknowledgement already sees that
/// write, and the read barrier would only add a round trip to the Raft thread. The gate is open
/// exactly while that holds and the leader has applied its own first entry (so everything
/// committed before its term is in the image); it closes on any role or membership change and
/// while the Raft core is rebuilt. It is also closed while a restarted storage actor replays
/// the log up to what its previous instance had applied: replay rewrites older versions of
/// blocks on its way forward, and only a barrier (which waits for the applied index) keeps a
/// read from seeing them.
#[derive(Clone, Default)]
pub struct ReadGate {
    sole_voter_leader: Arc<AtomicBool>,
    storage_replaying: Arc<AtomicBool>,
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

    pub fn set_sole_voter_leader(&self, open: bool) {
        self.sole_voter_leader.store(open, Ordering::SeqCst);
    }

    /// The storage actor restarted (set) or has replayed past everything its previous
    /// instance applied (cleared).
    pub fn set_storage_replaying(&self, replaying: bool) {
        self.storage_replaying.store(replaying, Ordering::SeqCst);
    }
}

/// raft-rs's message and batch limits. The server's are [`RaftLimits::default`]; a simulation
/// uses small ones so that appends and committed batches get split, and a fixed election
/// timeout per node (raft-rs draws it from an unseeded generator otherwise).
#[derive(Clone, Debug)]
pub struct RaftLimits {
    /// Bytes of one append message; also the bytes of proposals stepped in as one
    /// `MsgPropose`, so one batch fits one append.
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// A committed Ready carries at most this many bytes of entries, bounding memory.
    pub max_committed_size_per_ready: u64,
    /// `(min, max)` election ticks; `None`: raft-rs's `[election_ticks, 2 × election_ticks)`.
    pub election_tick_range: Option<(usize, usize)>,
}

impl Default for RaftLimits {
    fn default() -> Self {
        RaftLimits {
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_committed_size_per_ready: 64 << 20,
            election_tick_range: None,
        }
    }
}

/// Everything a core is built from.
pub struct CoreParams {
    pub group_id: u64,
    pub node_id: u64,
    pub config: RaftConfig,
    pub limits: RaftLimits,
    /// How long a leader's own proposal may wait for its commit before its caller is told to
    /// retry.
    pub request_timeout: Duration,
    pub log_store: RaftLogStore,
    /// Index the storage side has applied (in memory), published by it; see
    /// [`RaftCore::applied_published`].
    pub applied_index: Arc<AtomicU64>,
    /// Published by the core: the lowest applied index something waits for (a read barrier,
    /// the read gate), `u64::MAX` when nothing does, so the storage side wakes it only then.
    pub applied_wanted: Arc<AtomicU64>,
    pub read_gate: ReadGate,
    pub logger: slog::Logger,
}

/// What the caller must do for the core, in the order queued.
pub enum Effect<P, R> {
    /// Send these messages to their peers.
    Send(Vec<RaftMessage>),
    /// Apply these committed entries, in order, and answer the responders of the proposals
    /// among them that this node made (by entry index) with their outcome.
    Apply {
        entries: Vec<Entry>,
        responders: Vec<(u64, P)>,
    },
    /// Tell this proposal's caller it failed (every error but a conf-change refusal means
    /// "retry").
    ProposalFailed(P, ProposalError),
    /// A read barrier is answered: reads may proceed (`Ok`) or retry.
    ReadAnswered(R, Result<(), ProposalError>),
    /// Sync the log's WAL, then report [`RaftCore::wal_synced`] with `number`. `inline`: the
    /// log is quiet, run it at once (handing it to another thread costs more than it saves).
    SyncWal { number: u64, inline: bool },
    /// The member directory changed (a conf change applied or a snapshot installed).
    MembersChanged(Vec<MemberConfig>),
}

/// Counters that outlive a rebuilt core (status output).
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreCounters {
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    pub lease_reads: u64,
}

/// What became of a Ready (see [`RaftCore::process_ready`]).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadyProgress {
    /// Nothing to do, or the Ready was handled completely.
    Done,
    /// The leader's messages were queued to send and the Ready's write, about to block this
    /// thread in a sync, is held: the caller lets the messages reach their sockets first and
    /// then calls [`RaftCore::write_held_ready`] before handing the core anything else.
    WriteHeld,
}

/// How the message of the panic starts with which the core asks to be rebuilt after a snapshot
/// install failed (the supervisor, or a simulation, restarts it).
pub const SNAPSHOT_INSTALL_FAILED: &str = "installing the snapshot at";

/// Installs a snapshot carried by a Ready: switch the state machine to its staged data and
/// answer once that is durable, with the member directory it carries.
pub type SnapshotInstaller<'a> = dyn FnMut(&Snapshot) -> Result<Vec<MemberConfig>, String> + 'a;

/// A ReadIndex request sent: when and in which role and term it started (for the lease), and
/// the read barriers it answers (none for a lease renewal).
struct ReadRound<R> {
    started_at: LeaseInstant,
    term: u64,
    as_leader: bool,
    responders: Vec<R>,
}

struct PendingProposal<P> {
    /// `None` for a fence (see "Forwarded proposals" in the module doc).
    responder: Option<P>,
    proposed_at: LeaseInstant,
    /// The term this node was in when it proposed; the entry must carry the same term.
    term: u64,
    /// Proposed while this node did not lead: raft-rs forwarded it to the leader.
    forwarded: bool,
}

/// Proposal ids reserved in the log store at a time (see `RaftLogStore::reserve_proposal_ids`).
const PROPOSAL_IDS_RESERVED: u64 = 1 << 32;

/// A follower further behind the leader's last index than this is reported as lagging.
const REPLICA_LAG_WARNING_ENTRIES: u64 = 1024;

pub struct RaftCore<P, R> {
    params: CoreParams,
    node: RawNode<RaftLogStore>,
    effects: Vec<Effect<P, R>>,
    /// Highest index whose application the storage side has reported.
    applied_index: u64,
    /// Highest committed index handed out to apply.
    delivered_index: u64,
    pending_proposals: BTreeMap<u64, PendingProposal<P>>,
    /// Proposals received since the last Ready, stepped into raft-rs together (see
    /// [`RaftCore::step_proposal_batch`]).
    proposal_batch: Vec<(Bytes, Option<P>)>,
    proposal_batch_bytes: usize,
    next_request_id: u64,
    /// The end of the proposal ids reserved for this core.
    request_ids_end: u64,
    /// On the leader: the highest proposal id appended per proposing node in `term`, to drop
    /// a forwarded proposal that arrives after a later one of its proposer (see "Forwarded
    /// proposals" in the module doc).
    forwarded_high: (u64, BTreeMap<u64, u64>),
    /// When this node last proposed a fence.
    fence_proposed_at: Option<LeaseInstant>,
    /// Read barriers not yet sent as a ReadIndex request.
    read_batch: Vec<R>,
    /// ReadIndex requests sent, keyed by their request context.
    reads_in_progress: BTreeMap<u64, ReadRound<R>>,
    lease: ReadLease,
    /// Whether the next Ready starts a ReadIndex round only to renew the lease.
    lease_renewal_wanted: bool,
    /// Votes this node refuses for an election timeout after it (re)starts (where leases are
    /// on).
    vote_hold: VoteHold,
    /// When raft-rs was last ticked (where leases are on, ticks closer than nine tenths of
    /// the interval are skipped, see [`super::lease`]).
    last_tick_at: Option<LeaseInstant>,
    /// Read barriers whose read index is known, waiting for the applied index to reach it.
    reads_waiting_for_apply: VecDeque<(u64, Vec<R>)>,
    /// (term, leader id) last seen, to notice elections.
    last_term_and_leader: (u64, u64),
    appended: AppendedBytes,
    counters: CoreCounters,
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
    peers_down: BTreeSet<u64>,
    /// Ticks since start, and the tick at which the leader last saw each peer active
    /// (raft-rs clears `recent_active` every election timeout, so one look is not enough).
    ticks: u64,
    peer_active_at_tick: BTreeMap<u64, u64>,
    /// Whether a WAL sync asked for by [`Effect::SyncWal`] has not been reported yet.
    wal_sync_running: bool,
    /// Whether the next WAL sync runs inline (see [`Effect::SyncWal`]).
    log_quiet: bool,
    persist_queue: PersistQueue,
    /// A Ready whose write waits for [`RaftCore::write_held_ready`].
    held_ready: Option<raft::Ready>,
    /// This leader applied a configuration without itself: it steps down once the Ready
    /// being handled is advanced (raft-rs keeps no progress for a removed leader, and its
    /// next persist or heartbeat round would look for it).
    removed_while_leading: bool,
}

impl<P, R> RaftCore<P, R> {
    /// Builds the node from the log in RocksDB: at start and after every restart.
    pub fn new(params: CoreParams, counters: CoreCounters, now: LeaseInstant) -> Self {
        let store = params.log_store.clone();
        let applied_index = params.applied_index.load(Ordering::Acquire);
        // The previous node may have written Readies whose WAL sync had not finished. The new
        // node takes everything in RocksDB as persisted, so make it so before it can say so.
        if let Err(error) = store.sync_wal() {
            panic!("cannot sync the Raft log: {error}");
        }
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
        let limits = &params.limits;
        let (min_election_tick, max_election_tick) = limits.election_tick_range.unwrap_or((0, 0));
        let config = raft::Config {
            id: params.node_id,
            election_tick: params.config.election_ticks,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: params.config.heartbeat_ticks,
            applied: applied_index,
            max_size_per_msg: limits.max_size_per_msg,
            max_inflight_msgs: limits.max_inflight_msgs,
            max_committed_size_per_ready: limits.max_committed_size_per_ready,
            check_quorum: true,
            pre_vote: true,
            // A commit advance is not broadcast on its own: followers learn it from the next
            // append or heartbeat (a ReadIndex round sends one). Broadcasting cost every qd1
            // write two more messages out of the leader, two acknowledgements back and a
            // Ready on each follower.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let mut node = match RawNode::new(&config, store, &params.logger) {
            Ok(node) => node,
            // No way to serve without a Raft node; the supervisor retries and escalates.
            Err(error) => panic!("cannot start the Raft node: {error}"),
        };
        // A group whose only voter is this node elects itself at once instead of waiting for
        // an election timeout.
        let voters: Vec<u64> = node.raft.prs().conf().voters().ids().iter().collect();
        if voters == vec![params.node_id] {
            if let Err(error) = node.campaign() {
                slog::warn!(params.logger, "campaign failed"; "error" => %error);
            }
        }
        slog::info!(params.logger, "raft node started";
            "group" => params.group_id, "node" => params.node_id,
            "applied_index" => applied_index, "term" => node.raft.term,
            "commit_index" => node.raft.raft_log.committed,
            "read_lease_ms" => params.config.read_lease_ms);
        // The new node has forgotten whom it heard from: votes wait (see `lease`). The lease
        // needs no reset: it belongs to a term, and this node leads again only in a later one.
        let vote_hold = VoteHold::starting_at(&params.config, now);
        let mut lease = ReadLease::new(params.config.read_lease_ms);
        lease.carry_reads_served(counters.lease_reads);
        let role = node.raft.state;
        let request_ids_from = match params.log_store.reserve_proposal_ids(PROPOSAL_IDS_RESERVED) {
            Ok(first) => first,
            Err(error) => panic!("cannot reserve proposal ids: {error}"),
        };
        let mut core = RaftCore {
            next_request_id: request_ids_from,
            request_ids_end: request_ids_from + PROPOSAL_IDS_RESERVED,
            forwarded_high: (0, BTreeMap::new()),
            fence_proposed_at: None,
            params,
            node,
            effects: Vec::new(),
            applied_index,
            delivered_index: applied_index,
            pending_proposals: BTreeMap::new(),
            proposal_batch: Vec::new(),
            proposal_batch_bytes: 0,
            read_batch: Vec::new(),
            reads_in_progress: BTreeMap::new(),
            lease,
            lease_renewal_wanted: false,
            vote_hold,
            last_tick_at: None,
            reads_waiting_for_apply: VecDeque::new(),
            last_term_and_leader: (0, 0),
            appended: AppendedBytes::default(),
            counters,
            snapshot_applied_index: None,
            read_gate_opens_at: None,
            quorum_ok: None,
            peers_down: BTreeSet::new(),
            ticks: 0,
            peer_active_at_tick: BTreeMap::new(),
            wal_sync_running: false,
            log_quiet: true,
            persist_queue: PersistQueue::default(),
            held_ready: None,
            removed_while_leading: false,
        };
        core.params.read_gate.set_sole_voter_leader(false);
        core.after_input(role);
        core
    }

    /// The effects queued since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect<P, R>> {
        std::mem::take(&mut self.effects)
    }

    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// The raft-rs node, for inspection (tests, simulations).
    pub fn raw_node(&self) -> &RawNode<RaftLogStore> {
        &self.node
    }

    pub fn counters(&self) -> CoreCounters {
        CoreCounters {
            lease_reads: self.lease.reads_served(),
            ..self.counters
        }
    }

    pub fn node_id(&self) -> u64 {
        self.params.node_id
    }

    /// Whether raft-rs has work for [`Self::process_ready`] (or batched proposals and reads
    /// wait for it).
    pub fn wants_ready(&self) -> bool {
        self.node.has_ready()
            || !self.proposal_batch.is_empty()
            || !self.read_batch.is_empty()
            || self.lease_renewal_wanted
    }

    /// Whether a write would sync inline (see [`Effect::SyncWal`]).
    pub fn syncs_inline(&self) -> bool {
        self.log_quiet && !self.wal_sync_running
    }

    /// How long a forwarded proposal or a read barrier waits before it is retried: a message
    /// lost on the way to the leader is otherwise noticed only at the request deadline.
    pub fn retry_interval(&self) -> Duration {
        Duration::from_millis(
            2 * self.params.config.tick_interval_ms * self.params.config.election_ticks as u64,
        )
    }

    /// A proposal (or read request) id: never handed out before on this node, and greater
    /// than every earlier one.
    fn take_request_id(&mut self) -> u64 {
        if self.next_request_id >= self.request_ids_end {
            match self
                .params
                .log_store
                .reserve_proposal_ids(PROPOSAL_IDS_RESERVED)
            {
                Ok(first) => {
                    self.next_request_id = first;
                    self.request_ids_end = first + PROPOSAL_IDS_RESERVED;
                }
                Err(error) => panic!("cannot reserve proposal ids: {error}"),
            }
        }
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    // -----------------------------------------------------------------------------------------
    // Inputs
    // -----------------------------------------------------------------------------------------

    /// A state-machine command to replicate; `responder` hears the outcome once the entry is
    /// applied on this node, or an error to retry.
    pub fn propose(&mut self, command: Bytes, responder: P, now: LeaseInstant) {
        let role = self.node.raft.state;
        if self.pending_proposals.len() + self.proposal_batch.len()
            >= self.params.config.proposals_pending_max
        {
            self.effects
                .push(Effect::ProposalFailed(responder, ProposalError::Overloaded));
            return;
        }
        self.proposal_batch_bytes += command.len();
        self.proposal_batch.push((command, Some(responder)));
        if self.proposal_batch_bytes as u64 >= self.params.limits.max_size_per_msg {
            self.step_proposal_batch(now);
        }
        self.after_input(role);
    }

    /// A read barrier: answered once a read issued now is linearizable on this node.
    pub fn read_barrier(&mut self, responder: R, now: LeaseInstant) {
        let role = self.node.raft.state;
        if role != StateRole::Leader && self.node.raft.leader_id == 0 {
            // No leader to ask (an election is running): the caller retries.
            self.effects
                .push(Effect::ReadAnswered(responder, Err(ProposalError::Dropped)));
            return;
        }
        if let Err(responder) = self.read_from_lease(responder, now) {
            self.read_batch.push(responder);
        }
        self.after_input(role);
    }

    /// A membership change, proposed only by the leader and one at a time: raft-rs would
    /// silently turn a second change into an empty entry while one is pending, and its caller
    /// would never hear. `check` is judged on the state of this very moment.
    pub fn propose_conf_change(
        &mut self,
        change: ConfChangeV2,
        check: Option<ConfChangeCheck>,
        responder: P,
        now: LeaseInstant,
    ) {
        let role = self.node.raft.state;
        // raft-rs admits one conf change at a time, judged by its applied index.
        self.applied_published();
        if let Err(error) = self.conf_change_admissible(&change, check) {
            self.effects.push(Effect::ProposalFailed(responder, error));
            self.after_input(role);
            return;
        }
        let term = self.node.raft.term;
        let proposal_id = self.take_request_id();
        let context = ProposalContext {
            node_id: self.params.node_id,
            proposal_id,
            term,
        };
        match self
            .node
            .propose_conf_change(context.encode().to_vec(), change)
        {
            Ok(()) => {
                self.pending_proposals.insert(
                    proposal_id,
                    PendingProposal {
                        responder: Some(responder),
                        proposed_at: now,
                        term,
                        forwarded: false,
                    },
                );
            }
            Err(error) => self.effects.push(Effect::ProposalFailed(
                responder,
                ProposalError::ConfChangeRefused(error.to_string()),
            )),
        }
        self.after_input(role);
    }

    fn conf_change_admissible(
        &self,
        change: &ConfChangeV2,
        check: Option<ConfChangeCheck>,
    ) -> Result<(), ProposalError> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return Err(ProposalError::NotLeader {
                leader_id: raft.leader_id,
            });
        }
        if raft.has_pending_conf() {
            return Err(ProposalError::ConfChangeNotReady(
                "another membership change is still being applied".into(),
            ));
        }
        if !raft.prs().conf().to_conf_state().voters_outgoing.is_empty() {
            return Err(ProposalError::ConfChangeNotReady(
                "the group is still leaving a joint configuration".into(),
            ));
        }
        // The caller's condition, on the state of this very moment: nothing is stepped
        // between this check and the proposal.
        if let Some(check) = check {
            check(&self.status()).map_err(ProposalError::ConfChangeNotReady)?;
        }
        // Check the change against the current configuration here, where the answer can
        // still reach the caller; raft-rs would only fail it at apply time.
        let mut trial = raft::Changer::new(raft.prs());
        let checked = match change.enter_joint() {
            Some(auto_leave) => trial.enter_joint(auto_leave, &change.changes),
            None => trial.simple(&change.changes),
        };
        checked
            .map(|_| ())
            .map_err(|error| ProposalError::ConfChangeRefused(error.to_string()))
    }

    /// Hands leadership to `to`, a voter other than this leader.
    pub fn transfer_leader(&mut self, to: u64) -> Result<(), ProposalError> {
        let role = self.node.raft.state;
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return Err(ProposalError::NotLeader {
                leader_id: raft.leader_id,
            });
        }
        if !raft.prs().conf().voters().contains(to) || to == raft.id {
            return Err(ProposalError::ConfChangeRefused(format!(
                "node {to} is not another voter"
            )));
        }
        let term = raft.term;
        self.lease.transfer_started(term);
        self.node.transfer_leader(to);
        self.after_input(role);
        Ok(())
    }

    /// A message from another member.
    pub fn step(&mut self, message: RaftMessage, now: LeaseInstant) {
        let role = self.node.raft.state;
        let from = message.from;
        let kind = message.get_msg_type();
        let term = self.node.raft.term;
        if self.vote_hold.refuses(&message, term, now) {
            slog::debug!(self.params.logger,
                "vote ignored: this node started less than an election timeout ago";
                "from" => from, "type" => ?kind, "term" => message.term);
            return;
        }
        if kind == MessageType::MsgTransferLeader {
            self.lease.transfer_started(term);
        }
        let mut message = message;
        if kind == MessageType::MsgPropose && !self.admit_forwarded(&mut message) {
            return;
        }
        if let Err(error) = self.node.step(message) {
            // Responses from removed members and the like: nothing to do.
            slog::debug!(self.params.logger, "peer message not stepped";
                "from" => from, "type" => ?kind, "error" => %error);
        }
        self.after_input(role);
    }

    /// Drops the entries of a forwarded proposal that arrive after a later proposal of the
    /// same node was appended in this term; false when none is left.
    fn admit_forwarded(&mut self, message: &mut RaftMessage) -> bool {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            // raft-rs forwards it to the leader, which judges it.
            return true;
        }
        let (term, high) = &mut self.forwarded_high;
        if *term != raft.term {
            *term = raft.term;
            high.clear();
        }
        let entries: Vec<Entry> = message.take_entries().into();
        let proposed = entries.len();
        let admitted: Vec<Entry> = entries
            .into_iter()
            .filter(|entry| match ProposalContext::decode(&entry.context) {
                Some(context) => {
                    let newest = high.entry(context.node_id).or_insert(0);
                    if context.proposal_id <= *newest {
                        return false;
                    }
                    *newest = context.proposal_id;
                    true
                }
                None => true,
            })
            .collect();
        if admitted.len() < proposed {
            slog::debug!(self.params.logger, "late forwarded proposals dropped";
                "from" => message.from, "dropped" => proposed - admitted.len());
        }
        let any = !admitted.is_empty();
        message.set_entries(admitted.into());
        any
    }

    /// A tick of the Raft clock. Where leases are on, a tick delayed in a mailbox, or the
    /// burst an interval timer fires after a stall, must not advance raft-rs's election clock
    /// faster than real time: other nodes' leases count on how long this one refuses votes.
    pub fn tick(&mut self, now: LeaseInstant) {
        let role = self.node.raft.state;
        let interval = Duration::from_millis(self.params.config.tick_interval_ms);
        if self.lease.enabled()
            && self
                .last_tick_at
                .is_some_and(|last| last.until(now) < interval * 9 / 10)
        {
            return;
        }
        self.last_tick_at = Some(now);
        self.node.tick();
        self.applied_published();
        self.observe_cluster();
        self.expire_waiters(now);
        self.want_lease_renewal(now);
        self.after_input(role);
    }

    pub fn report_unreachable(&mut self, peer_id: u64) {
        let role = self.node.raft.state;
        self.node.report_unreachable(peer_id);
        self.after_input(role);
    }

    pub fn report_snapshot(&mut self, peer_id: u64, finished: bool) {
        let role = self.node.raft.state;
        let status = if finished {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(peer_id, status);
        self.after_input(role);
    }

    /// Takes up the applied index the storage side published. Only between Readies: raft-rs
    /// learns it through `advance_apply_to`.
    pub fn applied_published(&mut self) {
        let published = self.params.applied_index.load(Ordering::SeqCst);
        if published > self.applied_index {
            self.applied_index = published;
            self.node.advance_apply_to(published);
        }
        self.release_reads();
    }

    /// A restarted storage side lost the entries it had been handed but not yet made durable
    /// (it stands at `applied_index`): hand them over again from the log. Their responders
    /// are gone, so the callers that waited retry their requests.
    pub fn storage_started(&mut self, applied_index: u64) {
        if applied_index >= self.delivered_index {
            return;
        }
        let low = applied_index + 1;
        let high = self.delivered_index + 1;
        match self
            .params
            .log_store
            .entries(low, high, None, raft::GetEntriesContext::empty(false))
        {
            Ok(entries) => self.effects.push(Effect::Apply {
                entries,
                responders: Vec::new(),
            }),
            Err(error) => panic!("cannot re-read committed entries {low}..{high}: {error}"),
        }
    }

    /// The storage side made everything up to `index` durable: compact the log below it, as
    /// far as [`super::compaction`] allows.
    pub fn durable_applied(&mut self, index: u64) {
        // raft-rs reads the entries after its applied index back (a campaign looks for
        // unapplied conf changes in them, and panics if they are gone): take up the published
        // applied index first, and never compact above what raft-rs was told.
        self.applied_published();
        let index = index.min(self.node.raft.raft_log.applied);
        let node_id = self.params.node_id;
        let raft = &self.node.raft;
        let followers = (raft.state == StateRole::Leader).then(|| {
            raft.prs()
                .iter()
                .filter(move |(id, _)| **id != node_id)
                .map(|(_, progress)| progress)
        });
        let compact_index = compaction_index(&self.params.config, index, followers, &self.appended);
        let first_index = self.params.log_store.first_index().unwrap_or(1);
        if compact_index > first_index {
            if let Err(error) = self.params.log_store.compact(compact_index) {
                slog::error!(self.params.logger, "log compaction failed";
                    "error" => %error, "compact_index" => compact_index);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Ready
    // -----------------------------------------------------------------------------------------

    /// Steps batched proposals and reads into raft-rs and drives one Ready through raft-rs's
    /// required order. `install` switches the state machine to a snapshot the Ready carries
    /// before anything else of the Ready is handled; its failure is fatal to the core (the
    /// caller rebuilds it from RocksDB, which forgets the snapshot, and the leader sends it
    /// again).
    pub fn process_ready(
        &mut self,
        now: LeaseInstant,
        install: &mut SnapshotInstaller<'_>,
    ) -> ReadyProgress {
        let role = self.node.raft.state;
        assert!(
            self.held_ready.is_none(),
            "a held Ready must be written before the next one"
        );
        self.applied_published();
        self.step_proposal_batch(now);
        let renew_lease = std::mem::take(&mut self.lease_renewal_wanted);
        if !self.read_batch.is_empty() || renew_lease {
            let request_id = self.take_request_id();
            let responders = std::mem::take(&mut self.read_batch);
            let state = self.leader_state();
            self.reads_in_progress.insert(
                request_id,
                ReadRound {
                    started_at: now,
                    term: state.term,
                    as_leader: state.is_leader,
                    responders,
                },
            );
            self.node.read_index(request_id.to_be_bytes().to_vec());
        }
        if !self.node.has_ready() {
            self.after_input(role);
            return ReadyProgress::Done;
        }
        let mut ready = self.node.ready();
        let sent_before_persisting = !ready.messages().is_empty();
        if sent_before_persisting {
            // A leader's appends and heartbeats leave before its own write: the followers
            // persist in parallel with it (raft thesis 10.2.1).
            let messages = ready.take_messages();
            self.send_messages(messages);
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot, install);
        }
        let committed = ready.take_committed_entries();
        self.deliver_committed(committed, now);
        let read_states = ready.take_read_states();
        self.handle_read_states(read_states);
        let progress = if !ready.snapshot().is_empty() {
            self.persist_and_advance(ready, now);
            ReadyProgress::Done
        } else if sent_before_persisting && ready.must_sync() && self.syncs_inline() {
            self.held_ready = Some(ready);
            ReadyProgress::WriteHeld
        } else {
            self.write_ready(ready);
            ReadyProgress::Done
        };
        self.after_input(role);
        progress
    }

    /// Writes the Ready [`Self::process_ready`] held.
    pub fn write_held_ready(&mut self) {
        let role = self.node.raft.state;
        if let Some(ready) = self.held_ready.take() {
            self.write_ready(ready);
        }
        self.after_input(role);
    }

    /// A WAL sync asked for by [`Effect::SyncWal`] returned: every Ready up to `number` is
    /// durable.
    pub fn wal_synced(&mut self, number: u64) {
        let role = self.node.raft.state;
        self.wal_sync_running = false;
        // Quiet again once a sync ran without another Ready arriving meanwhile.
        self.log_quiet = !self.persist_queue.has_unpersisted();
        self.on_persisted(number);
        self.start_wal_sync();
        self.after_input(role);
    }

    /// Steps every batched proposal into raft-rs as ONE `MsgPropose`. raft-rs broadcasts an
    /// append per `MsgPropose`, so proposing each write on its own sent every follower one
    /// `MsgAppend` per write and got one response per write back; batched, a Ready's writes
    /// travel in one message per follower (up to `max_size_per_msg`, the size of one append
    /// message). The entry contexts carry the term at stepping time, the term raft-rs appends
    /// them in.
    fn step_proposal_batch(&mut self, now: LeaseInstant) {
        self.proposal_batch_bytes = 0;
        if self.proposal_batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.proposal_batch);
        let term = self.node.raft.term;
        let forwarded = self.node.raft.state != StateRole::Leader;
        if forwarded && self.node.raft.leader_id == 0 {
            // No leader to forward to (an election is running): the callers retry.
            for responder in batch.into_iter().filter_map(|(_, responder)| responder) {
                self.effects
                    .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
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
        match self.node.step(message) {
            Ok(()) => {
                for (proposal_id, responder) in responders {
                    self.pending_proposals.insert(
                        proposal_id,
                        PendingProposal {
                            responder,
                            proposed_at: now,
                            term,
                            forwarded,
                        },
                    );
                }
            }
            Err(error) => {
                if !matches!(error, raft::Error::ProposalDropped) {
                    slog::warn!(self.params.logger, "proposal rejected"; "error" => %error);
                }
                for responder in responders
                    .into_iter()
                    .filter_map(|(_, responder)| responder)
                {
                    self.effects
                        .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
                }
            }
        }
    }

    /// Queues committed entries to apply, with the responders of this node's proposals.
    fn deliver_committed(&mut self, entries: Vec<Entry>, now: LeaseInstant) {
        let Some(last) = entries.last() else {
            return;
        };
        let last_index = last.index;
        let mut responders = Vec::new();
        // The newest own proposal delivered, by the term it was proposed in.
        let mut newest_own: Option<ProposalContext> = None;
        for entry in &entries {
            let is_conf_change = matches!(
                entry.get_entry_type(),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2
            );
            if let Some(context) = ProposalContext::decode(&entry.context) {
                if context.node_id == self.params.node_id {
                    newest_own = Some(context);
                    let pending = self.pending_proposals.remove(&context.proposal_id);
                    if let Some(responder) = pending.and_then(|pending| pending.responder) {
                        // A stale twin changes nothing (`entry`): its proposer retries.
                        if !is_conf_change && context.is_stale_in(entry) {
                            self.effects
                                .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
                        } else {
                            responders.push((entry.index, responder));
                        }
                    }
                }
            }
            if is_conf_change {
                // The state machine sees a no-op at this index (`entry`).
                self.apply_conf_change(entry, now);
            }
        }
        self.delivered_index = self.delivered_index.max(last_index);
        self.effects.push(Effect::Apply {
            entries,
            responders,
        });
        if let Some(newest) = newest_own {
            self.overtaken_by(newest);
        }
    }

    /// This node's proposal `newest` was delivered: every proposal of its own from the same
    /// term with a lower id that is still pending can never take effect any more, so its
    /// caller may retry (see "Forwarded proposals" in the module doc).
    fn overtaken_by(&mut self, newest: ProposalContext) {
        let overtaken: Vec<u64> = self
            .pending_proposals
            .range(..newest.proposal_id)
            .filter(|(_, pending)| pending.term == newest.term)
            .map(|(id, _)| *id)
            .collect();
        for id in overtaken {
            let pending = self.pending_proposals.remove(&id);
            if let Some(responder) = pending.and_then(|pending| pending.responder) {
                self.effects
                    .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry, now: LeaseInstant) {
        // The recorded conf state already includes every change up to its index, and
        // `RawNode::new` loaded it; applying a (joint) change twice would fail.
        if entry.index <= self.params.log_store.conf_state_index() {
            return;
        }
        // Rounds before this counted a majority of the old membership.
        self.lease.membership_changed(now);
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
                .node
                .apply_conf_change(&change)
                .map_err(|error| error.to_string())?;
            Ok((change, conf_state))
        });
        let (change, conf_state) = match result {
            Ok(applied) => applied,
            // A committed entry that does not decode means the log is corrupt.
            Err(error) => panic!(
                "committed conf change at {} is corrupt: {error}",
                entry.index
            ),
        };
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
        self.effects.push(Effect::MembersChanged(members));
        let logger = &self.params.logger;
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
        let still_voter =
            conf_state.voters.contains(&node_id) || conf_state.voters_outgoing.contains(&node_id);
        if !still_voter && self.node.raft.state == StateRole::Leader {
            self.removed_while_leading = true;
        }
    }

    fn handle_read_states(&mut self, read_states: Vec<ReadState>) {
        for read_state in read_states {
            let Ok(id) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(round) = self.reads_in_progress.remove(&u64::from_be_bytes(id)) {
                let state = self.leader_state();
                self.lease
                    .round_completed(round.started_at, round.term, round.as_leader, state);
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
        let raft = &self.node.raft;
        LeaderState {
            is_leader: raft.state == StateRole::Leader,
            term: raft.term,
            transfer_in_progress: raft.lead_transferee.is_some(),
            conf_change_pending: raft.pending_conf_index > raft.raft_log.applied,
        }
    }

    /// Asks the next Ready for a round that only renews the lease, while reads use it and no
    /// round of this leader's is already on its way.
    fn want_lease_renewal(&mut self, now: LeaseInstant) {
        let state = self.leader_state();
        if !self.lease.wants_renewal(now, state) {
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
    fn read_from_lease(&mut self, responder: R, now: LeaseInstant) -> Result<(), R> {
        let state = self.leader_state();
        if !self.lease.admit_read(now, state) {
            return Err(responder);
        }
        let committed = self.node.raft.raft_log.committed;
        self.reads_waiting_for_apply
            .push_back((committed, vec![responder]));
        self.release_reads();
        Ok(())
    }

    /// Answers every read barrier whose read index has been applied, and publishes the index
    /// the rest wait for.
    fn release_reads(&mut self) {
        loop {
            // Reads compare with the published index alone: it may run ahead of what raft-rs
            // has been told (`applied_published`), and it falls back to the durable applied
            // index when the storage side restarts, whose replay rewrites older block
            // versions on its way forward. What raft-rs was told never goes back.
            let applied_index = self.params.applied_index.load(Ordering::SeqCst);
            if let Some(index) = self.read_gate_opens_at {
                if applied_index >= index {
                    self.read_gate_opens_at = None;
                    self.params.read_gate.set_sole_voter_leader(true);
                }
            }
            let effects = &mut self.effects;
            self.reads_waiting_for_apply
                .retain_mut(|(index, responders)| {
                    if *index <= applied_index {
                        for responder in responders.drain(..) {
                            effects.push(Effect::ReadAnswered(responder, Ok(())));
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
            // The storage side may have passed `wanted` before it could see it: look again
            // (both sides store, then load, sequentially consistent).
            if wanted == u64::MAX || self.params.applied_index.load(Ordering::SeqCst) < wanted {
                return;
            }
        }
    }

    fn send_messages(&mut self, messages: Vec<RaftMessage>) {
        if messages.is_empty() {
            return;
        }
        self.counters.snapshots_sent += messages
            .iter()
            .filter(|message| message.get_msg_type() == MessageType::MsgSnapshot)
            .count() as u64;
        self.effects.push(Effect::Send(messages));
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot, install: &mut SnapshotInstaller<'_>) {
        let index = snapshot.get_metadata().index;
        match install(snapshot) {
            Ok(members) => self.effects.push(Effect::MembersChanged(members)),
            Err(error) => panic!("{SNAPSHOT_INSTALL_FAILED} {index} failed: {error}"),
        }
        self.counters.snapshots_installed += 1;
        self.applied_index = self.applied_index.max(index);
        self.delivered_index = self.delivered_index.max(index);
        self.snapshot_applied_index = Some(index);
        slog::info!(self.params.logger, "snapshot installed"; "index" => index);
    }

    /// Writes a Ready's entries and hard state unsynced and advances raft-rs past it; the
    /// Ready counts as persisted (its held messages go out, its entries may commit and apply)
    /// once a later WAL sync has covered it.
    fn write_ready(&mut self, mut ready: raft::Ready) {
        self.appended.record(ready.entries());
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
            // off the caller's thread from now on, so that the next ones are stepped
            // meanwhile.
            self.log_quiet = false;
        }
        let messages = ready.take_persisted_messages();
        self.node.advance_append_async(ready);
        self.persist_queue.written(number, needs_sync, messages);
        self.start_wal_sync();
    }

    /// Asks for a WAL sync covering the written Readies when one of them needs it. At most one
    /// sync runs at a time; Readies written meanwhile share the next one (group commit).
    fn start_wal_sync(&mut self) {
        if self.wal_sync_running {
            return;
        }
        let Some((number, needs_sync)) = self.persist_queue.take_unpersisted() else {
            return;
        };
        if !needs_sync {
            // Only the commit index changed, which may be persisted lazily (`new` recovers
            // it), or nothing was written at all: only held messages wait.
            self.on_persisted(number);
            return;
        }
        self.wal_sync_running = true;
        self.effects.push(Effect::SyncWal {
            number,
            inline: self.log_quiet,
        });
    }

    /// Readies up to `number` are durable: tell raft-rs (a leader may now commit, a node apply
    /// its own entries) and send the messages they held (a follower's append and vote
    /// responses).
    fn on_persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
        let messages = self.persist_queue.persisted(number);
        self.send_messages(messages);
    }

    /// A Ready that installs a snapshot is persisted synchronously, with one WAL sync that
    /// also covers every Ready written before it.
    fn persist_and_advance(&mut self, mut ready: raft::Ready, now: LeaseInstant) {
        self.appended.record(ready.entries());
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
        let mut light_ready = self.node.advance_append(ready);
        if let Some(index) = self.snapshot_applied_index.take() {
            if index > self.node.raft.raft_log.applied {
                self.node.advance_apply_to(index);
            }
        }
        if let Some(commit_index) = light_ready.commit_index() {
            // The commit index may be persisted lazily: `new` recovers it.
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
        self.deliver_committed(committed, now);
    }

    // -----------------------------------------------------------------------------------------
    // Housekeeping
    // -----------------------------------------------------------------------------------------

    /// Fails proposals and reads that waited too long so that their callers retry. A
    /// forwarded proposal that waited a retry interval is not failed but fenced: see
    /// "Forwarded proposals" in the module doc.
    fn expire_waiters(&mut self, now: LeaseInstant) {
        let timeout = self.retry_interval();
        let request_timeout = self.params.request_timeout;
        let term = self.node.raft.term;
        let expired: Vec<u64> = self
            .pending_proposals
            .iter()
            .filter(|(_, pending)| {
                !pending.forwarded && pending.proposed_at.until(now) > request_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let pending = self.pending_proposals.remove(&id);
            if let Some(responder) = pending.and_then(|pending| pending.responder) {
                self.effects
                    .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
            }
        }
        let forward_overdue = self.pending_proposals.values().any(|pending| {
            pending.forwarded && pending.term == term && pending.proposed_at.until(now) > timeout
        });
        let fence_due = self
            .fence_proposed_at
            .map_or(true, |at| at.until(now) > timeout);
        if forward_overdue && fence_due && self.node.raft.leader_id != 0 {
            self.fence_proposed_at = Some(now);
            self.proposal_batch.push((Bytes::new(), None));
            slog::debug!(self.params.logger, "fencing overdue forwarded proposals"; "term" => term);
        }
        let effects = &mut self.effects;
        self.reads_in_progress.retain(|_, round| {
            if round.started_at.until(now) > timeout {
                for responder in round.responders.drain(..) {
                    effects.push(Effect::ReadAnswered(responder, Err(ProposalError::Dropped)));
                }
                false
            } else {
                true
            }
        });
    }

    /// After every input: notices role, term and leader changes. Everything waiting fails
    /// when this node stops being leader or the term moves on: the new leader may overwrite
    /// uncommitted entries, and callers retry against the right node.
    fn after_input(&mut self, previous: StateRole) {
        if self.removed_while_leading && self.held_ready.is_none() {
            self.removed_while_leading = false;
            if self.node.raft.state == StateRole::Leader {
                let term = self.node.raft.term;
                self.node.raft.become_follower(term, raft::INVALID_ID);
                slog::warn!(self.params.logger,
                    "this leader was removed from the group: stepping down"; "term" => term);
            }
        }
        let node_id = self.params.node_id;
        let raft = &self.node.raft;
        let role = raft.state;
        let conf = raft.prs().conf();
        let sole_voter =
            conf.voters().ids().iter().eq(std::iter::once(node_id)) && conf.learners().is_empty();
        let last_index = raft.raft_log.last_index();
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
        let raft = &self.node.raft;
        let leader_id = raft.leader_id;
        let term = raft.term;
        if role != previous {
            slog::info!(self.params.logger, "raft role changed";
                "role" => ?role, "term" => term, "leader" => leader_id);
        }
        if (term, leader_id) == self.last_term_and_leader {
            return;
        }
        if leader_id != 0 && leader_id != self.last_term_and_leader.1 {
            slog::info!(self.params.logger, "leader changed";
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
            let pending = self.pending_proposals.remove(&id);
            if let Some(responder) = pending.and_then(|pending| pending.responder) {
                self.effects
                    .push(Effect::ProposalFailed(responder, ProposalError::Dropped));
            }
        }
        for (_, round) in std::mem::take(&mut self.reads_in_progress) {
            for responder in round.responders {
                self.effects
                    .push(Effect::ReadAnswered(responder, Err(ProposalError::Dropped)));
            }
        }
    }

    /// Why this node should not count as healthy, or `None`: it must know a leader, have heard
    /// from it within an election timeout (a leader with check_quorum steps down by itself
    /// once a majority is silent that long), and have applied an entry of the current term
    /// (the new leader's no-op at least), so its state is as current as the group's.
    fn health_problem(&self) -> Option<String> {
        let raft = &self.node.raft;
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
        let logger = self.params.logger.clone();
        let node_id = self.params.node_id;
        let raft = &self.node.raft;
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

    /// This node's Raft state as the control API shows it.
    pub fn status(&self) -> RaftStatus {
        let node_id = self.params.node_id;
        let store = &self.params.log_store;
        let mut conf_state = store.conf_state();
        conf_state.voters.sort_unstable();
        conf_state.learners.sort_unstable();
        conf_state.voters_outgoing.sort_unstable();
        let raft = &self.node.raft;
        let peers = if raft.state == StateRole::Leader {
            let mut peers: Vec<PeerProgress> = raft
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
        };
        let counters = self.counters();
        RaftStatus {
            group_id: self.params.group_id,
            node_id,
            role: format!("{:?}", raft.state),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            first_log_index: store.first_index().unwrap_or(0),
            last_log_index: store.last_index().unwrap_or(0),
            proposals_pending: self.pending_proposals.len() + self.proposal_batch.len(),
            snapshots_sent: counters.snapshots_sent,
            snapshots_installed: counters.snapshots_installed,
            lease_reads: counters.lease_reads,
            peers,
            voters: conf_state.voters,
            learners: conf_state.learners,
            voters_outgoing: conf_state.voters_outgoing,
            health_problem: self.health_problem(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{open_db, StorageOptions};

    const SECOND: Duration = Duration::from_secs(1);

    fn config() -> RaftConfig {
        RaftConfig {
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposals_pending_max: 4,
            mailbox_capacity: 64,
            log_keep_entries: 0,
            log_lag_entries_max: 100,
            log_lag_bytes_max: 1 << 20,
            read_lease_ms: 0,
        }
    }

    struct Harness {
        _directory: tempfile::TempDir,
        applied_index: Arc<AtomicU64>,
        core: RaftCore<u64, u64>,
    }

    fn at(seconds: u64) -> LeaseInstant {
        LeaseInstant::from_boot(SECOND * 3600 + SECOND * seconds as u32)
    }

    /// A core over a fresh log whose voters are `voters`; this node is 1.
    fn harness(voters: &[u64], config: RaftConfig) -> Harness {
        let directory = tempfile::tempdir().unwrap();
        let options = StorageOptions {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            max_background_jobs: 1,
        };
        let db = open_db(directory.path(), &options).unwrap();
        let log_store = RaftLogStore::open(db, 1).unwrap();
        let conf_state = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        log_store.bootstrap(conf_state, &[]).unwrap();
        let applied_index = Arc::new(AtomicU64::new(0));
        let params = CoreParams {
            group_id: 1,
            node_id: 1,
            config,
            limits: RaftLimits::default(),
            request_timeout: SECOND * 30,
            log_store,
            applied_index: applied_index.clone(),
            applied_wanted: Arc::new(AtomicU64::new(u64::MAX)),
            read_gate: ReadGate::default(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
        };
        let core = RaftCore::new(params, CoreCounters::default(), at(0));
        Harness {
            _directory: directory,
            applied_index,
            core,
        }
    }

    fn add_learner(id: u64) -> ConfChangeV2 {
        let mut single = raft::prelude::ConfChangeSingle::default();
        single.set_change_type(raft::prelude::ConfChangeType::AddLearnerNode);
        single.node_id = id;
        let mut change = ConfChangeV2::default();
        change.set_changes(vec![single].into());
        change
    }

    /// The proposals the effects answer with an error.
    fn proposal_failures(effects: Vec<Effect<u64, u64>>) -> Vec<(u64, ProposalError)> {
        effects
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::ProposalFailed(op, error) => Some((op, error)),
                _ => None,
            })
            .collect()
    }

    fn no_snapshot(_: &Snapshot) -> Result<Vec<MemberConfig>, String> {
        Err("no snapshot expected".into())
    }

    impl Harness {
        /// Runs Readies and WAL syncs until the core is idle; returns the effects other than
        /// the syncs.
        fn settle(&mut self, now: LeaseInstant) -> Vec<Effect<u64, u64>> {
            let mut effects = Vec::new();
            for _ in 0..16 {
                if self.core.wants_ready()
                    && self.core.process_ready(now, &mut no_snapshot) == ReadyProgress::WriteHeld
                {
                    self.core.write_held_ready();
                }
                let mut synced = false;
                for effect in self.core.take_effects() {
                    match effect {
                        Effect::SyncWal { number, .. } => {
                            self.core.wal_synced(number);
                            synced = true;
                        }
                        other => effects.push(other),
                    }
                }
                if !synced && !self.core.wants_ready() && !self.core.has_effects() {
                    break;
                }
            }
            effects
        }

        /// Applies every Apply effect (by publishing its last index) and returns the
        /// responders with the index they were delivered at.
        fn apply(&mut self, effects: &[Effect<u64, u64>]) -> Vec<(u64, u64)> {
            let mut delivered = Vec::new();
            for effect in effects {
                if let Effect::Apply {
                    entries,
                    responders,
                } = effect
                {
                    if let Some(last) = entries.last() {
                        self.applied_index.store(last.index, Ordering::SeqCst);
                    }
                    delivered.extend(responders.iter().map(|(index, op)| (*op, *index)));
                }
            }
            self.core.applied_published();
            delivered
        }
    }

    #[test]
    fn a_sole_voter_delivers_its_proposal_only_after_the_wal_sync() {
        let mut harness = harness(&[1], config());
        let effects = harness.settle(at(0));
        harness.apply(&effects);
        assert_eq!(harness.core.raw_node().raft.state, StateRole::Leader);
        harness.core.propose(Bytes::from_static(b"write"), 7, at(0));
        assert_eq!(
            harness.core.process_ready(at(0), &mut no_snapshot),
            ReadyProgress::Done
        );
        let effects = harness.core.take_effects();
        // The entry is written, but nothing is applied before its sync returns.
        assert!(effects
            .iter()
            .all(|effect| !matches!(effect, Effect::Apply { .. })));
        let number = effects
            .iter()
            .find_map(|effect| match effect {
                Effect::SyncWal { number, .. } => Some(*number),
                _ => None,
            })
            .expect("a WAL sync is asked for");
        harness.core.wal_synced(number);
        let effects = harness.settle(at(0));
        let delivered = harness.apply(&effects);
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].0, 7);
    }

    /// A forwarded proposal that reaches the leader after a later proposal of the same node
    /// was appended is dropped, so that its proposer may tell its caller to retry.
    #[test]
    fn the_leader_drops_a_forwarded_proposal_that_arrives_after_a_later_one() {
        let mut harness = harness(&[1], config());
        let effects = harness.settle(at(0));
        harness.apply(&effects);
        let term = harness.core.raw_node().raft.term;
        let forward = |proposal_id: u64| {
            let context = ProposalContext {
                node_id: 2,
                proposal_id,
                term,
            };
            let mut message = RaftMessage::default();
            message.set_msg_type(MessageType::MsgPropose);
            message.from = 2;
            message.to = 1;
            message.set_entries(
                vec![Entry {
                    data: Bytes::from_static(b"write"),
                    context: context.encode(),
                    ..Default::default()
                }]
                .into(),
            );
            message
        };
        let last_index = |harness: &Harness| harness.core.raw_node().raft.raft_log.last_index();
        let before = last_index(&harness);
        harness.core.step(forward(20), at(0));
        assert_eq!(last_index(&harness), before + 1);
        // Earlier (delayed) and repeated (duplicated) ones are dropped; later ones appended.
        harness.core.step(forward(10), at(0));
        harness.core.step(forward(20), at(0));
        assert_eq!(last_index(&harness), before + 1);
        harness.core.step(forward(21), at(0));
        assert_eq!(last_index(&harness), before + 2);
    }

    #[test]
    fn proposal_ids_grow_across_rebuilt_cores() {
        let mut harness = harness(&[1], config());
        let first = harness.core.take_request_id();
        let params = CoreParams {
            group_id: 1,
            node_id: 1,
            config: config(),
            limits: RaftLimits::default(),
            request_timeout: SECOND,
            log_store: harness.core.params.log_store.clone(),
            applied_index: harness.applied_index.clone(),
            applied_wanted: Arc::new(AtomicU64::new(u64::MAX)),
            read_gate: ReadGate::default(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
        };
        let mut rebuilt: RaftCore<u64, u64> = RaftCore::new(params, CoreCounters::default(), at(1));
        assert!(rebuilt.take_request_id() > first + 1);
    }

    #[test]
    fn proposals_beyond_the_pending_limit_are_refused_as_overloaded() {
        let mut harness = harness(&[1], config());
        let effects = harness.settle(at(0));
        harness.apply(&effects);
        for op in 0..5 {
            harness
                .core
                .propose(Bytes::from_static(b"write"), op, at(0));
        }
        let refused = proposal_failures(harness.core.take_effects());
        assert_eq!(refused, vec![(4, ProposalError::Overloaded)]);
    }

    #[test]
    fn a_follower_without_a_leader_answers_proposals_and_reads_with_retry() {
        // Three voters, the others silent: node 1 knows no leader.
        let mut harness = harness(&[1, 2, 3], config());
        harness.core.read_barrier(5, at(0));
        harness.core.propose(Bytes::from_static(b"write"), 6, at(0));
        let effects = harness.settle(at(0));
        let reads: Vec<_> = effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::ReadAnswered(op, result) => Some((*op, result.clone())),
                _ => None,
            })
            .collect();
        let proposals: Vec<_> = effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::ProposalFailed(op, error) => Some((*op, error.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(reads, vec![(5, Err(ProposalError::Dropped))]);
        assert_eq!(proposals, vec![(6, ProposalError::Dropped)]);
    }

    #[test]
    fn a_read_barrier_is_answered_once_the_read_index_is_applied() {
        let mut harness = harness(&[1], config());
        let effects = harness.settle(at(0));
        harness.apply(&effects);
        harness.core.propose(Bytes::from_static(b"write"), 1, at(0));
        let effects = harness.settle(at(0));
        harness.core.read_barrier(9, at(0));
        let mut read_effects = harness.settle(at(0));
        // The write is committed but not applied: the read waits for it.
        assert!(read_effects
            .iter()
            .all(|effect| !matches!(effect, Effect::ReadAnswered(..))));
        harness.apply(&effects);
        read_effects.extend(harness.core.take_effects());
        assert!(read_effects
            .iter()
            .any(|effect| matches!(effect, Effect::ReadAnswered(9, Ok(())))));
    }

    #[test]
    fn conf_changes_and_transfers_are_refused_off_the_leader() {
        let mut harness = harness(&[1, 2, 3], config());
        let change = add_learner(4);
        harness.core.propose_conf_change(change, None, 3, at(0));
        let refused = proposal_failures(harness.core.take_effects());
        assert_eq!(
            refused,
            vec![(3, ProposalError::NotLeader { leader_id: 0 })]
        );
        assert_eq!(
            harness.core.transfer_leader(2),
            Err(ProposalError::NotLeader { leader_id: 0 })
        );
    }

    #[test]
    fn a_failing_conf_change_check_is_answered_not_ready_with_its_reason() {
        let mut harness = harness(&[1], config());
        let effects = harness.settle(at(0));
        harness.apply(&effects);
        let change = add_learner(4);
        let check: ConfChangeCheck =
            Box::new(|status: &RaftStatus| Err(format!("not now (term {})", status.term)));
        harness
            .core
            .propose_conf_change(change, Some(check), 3, at(0));
        let refused = proposal_failures(harness.core.take_effects());
        assert_eq!(
            refused,
            vec![(
                3,
                ProposalError::ConfChangeNotReady("not now (term 1)".into())
            )]
        );
    }

    #[test]
    fn with_leases_on_ticks_closer_than_nine_tenths_of_the_interval_are_skipped() {
        let mut config = config();
        config.read_lease_ms = 500;
        let mut harness = harness(&[1, 2, 3], config);
        let start = LeaseInstant::from_boot(SECOND * 3600);
        // Thirty ticks in a burst, 1 ms apart: one counts.
        for tick in 0..30u32 {
            harness
                .core
                .tick(start.plus(Duration::from_millis(u64::from(tick))));
        }
        assert_eq!(harness.core.raw_node().raft.election_elapsed, 1);
        // Ticks a whole interval apart all count.
        for tick in 1..=3u64 {
            harness
                .core
                .tick(start.plus(Duration::from_millis(100 * tick)));
        }
        assert_eq!(harness.core.raw_node().raft.election_elapsed, 4);
    }
}
