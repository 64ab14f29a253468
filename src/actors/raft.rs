//! `RaftActor`: the shell around one Raft group's sans-I/O core
//! ([`crate::raft::core::RaftCore`]). The core decides everything (Ready order, proposals and
//! their contexts, reads and the lease, conf-change checks, compaction); this actor feeds it
//! the events of a server (proposals and read barriers from sessions and the control API,
//! peer messages, ticks, the storage actor's applied index) and carries out what it asks:
//! messages go to the peer transport, committed entries to the `StorageActor`, WAL syncs run
//! inline or on the blocking pool, replies go back on their one-shot channels.
//!
//! Batching: a proposal handler only hands the proposal to the core and schedules one
//! `ProcessReady`; actix runs every message already in the mailbox before that notification,
//! so all proposals that arrived meanwhile share one Ready (and one append message per
//! follower).
//!
//! WAL syncs: at most one runs at a time (the core asks for the next when it is reported).
//! While the log is quiet it runs on this thread: handing it to the blocking pool and back
//! costs two context switches on the path of every write, and nothing would be stepped
//! meanwhile anyway. Under load it runs on the blocking pool while this thread goes on
//! stepping acknowledgements and proposals and writing further Readies. Before a quiet
//! leader's inline sync, the actor yields once so that the peer links (on this thread) write
//! the appends to their sockets first and the followers persist in parallel with it.
//!
//! Snapshots: a follower too far behind receives one through the peer transport, which stages
//! the data before stepping the `MsgSnapshot` in; the Ready that carries it asks the storage
//! actor to switch to the staged data (blocking this thread) before anything else of that
//! Ready is handled.
//!
//! Runs on its own arbiter (thread): the peer links run on it too, and installing a snapshot
//! blocks it. A panic restarts it: the core is rebuilt from RocksDB, and every caller whose
//! responder was dropped retries.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use raft::prelude::Snapshot;

use super::messages::*;
use super::peer::{PeerNetwork, SnapshotInbox};
use super::supervisor::{run_guarded, Supervision};
use crate::config::{MemberConfig, RaftConfig};
use crate::raft::core::{CoreCounters, CoreParams, Effect, RaftCore, RaftLimits, ReadyProgress};
use crate::raft::lease::LeaseInstant;
use crate::storage::raft_log::RaftLogStore;
use crate::storage::snapshot::SnapshotDescriptor;

pub use crate::raft::core::ReadGate;

/// Everything the Raft actor needs to (re)build itself from durable state.
pub struct RaftActorParams {
    pub group_id: u64,
    pub node_id: u64,
    pub config: RaftConfig,
    pub request_timeout: Duration,
    pub log_store: RaftLogStore,
    pub storage: StorageLink,
    /// Index the storage actor has applied (in memory), published by it. The core takes it
    /// up at every Ready and tick; the storage actor sends `AppliedUpTo` only once it reaches
    /// `applied_wanted`.
    pub applied_index: Arc<AtomicU64>,
    /// Published by the core: the lowest applied index something waits for (a read
    /// barrier, the read gate), `u64::MAX` when nothing does. Waking this thread once per
    /// applied batch cost every node a context switch per write.
    pub applied_wanted: Arc<AtomicU64>,
    /// Published by the core: whether reads may skip the ReadIndex round (see `ReadGate`).
    pub read_gate: ReadGate,
    pub supervision: Supervision,
    /// Sends messages to the other members (none in a one-voter group).
    pub network: PeerNetwork,
    /// Snapshots received and staged by the peer transport.
    pub snapshots: SnapshotInbox,
}

type Core = RaftCore<ProposalResponder, ReadBarrierResponder>;

pub struct RaftActor {
    params: RaftActorParams,
    /// `None` only while the actor restarts.
    core: Option<Core>,
    ready_scheduled: bool,
    /// Status counters of the cores before this one.
    counters: CoreCounters,
    /// Bumped whenever the core is rebuilt, so a sync started for an older core is not
    /// reported to the new one.
    core_generation: u64,
}

impl RaftActor {
    pub fn new(params: RaftActorParams) -> Self {
        RaftActor {
            params,
            core: None,
            ready_scheduled: false,
            counters: CoreCounters::default(),
            core_generation: 0,
        }
    }

    /// Builds the core from the log in RocksDB. Called at start and on every restart.
    fn rebuild(&mut self) {
        self.core_generation += 1;
        let params = CoreParams {
            group_id: self.params.group_id,
            node_id: self.params.node_id,
            config: self.params.config.clone(),
            limits: RaftLimits::default(),
            request_timeout: self.params.request_timeout,
            log_store: self.params.log_store.clone(),
            applied_index: self.params.applied_index.clone(),
            applied_wanted: self.params.applied_wanted.clone(),
            read_gate: self.params.read_gate.clone(),
            logger: self.params.supervision.logger.clone(),
        };
        self.core = Some(RaftCore::new(params, self.counters, LeaseInstant::now()));
    }

    fn core(&mut self) -> &mut Core {
        // Invariant: `started` builds the core before any message is handled.
        self.core
            .as_mut()
            .expect("the Raft core is built in started()")
    }

    fn schedule_ready(&mut self, ctx: &mut Context<Self>) {
        if !self.ready_scheduled {
            self.ready_scheduled = true;
            ctx.notify(ProcessReady);
        }
    }

    /// Runs `body` on the core, then carries out the effects it queued; a panic in either
    /// restarts the actor.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        body: impl FnOnce(&mut Core, &mut Context<Self>) -> T,
    ) -> Option<T> {
        let supervision = self.params.supervision.clone();
        run_guarded(&supervision, ctx, |ctx| {
            let result = body(self.core(), ctx);
            self.run_effects(ctx);
            if self.core().wants_ready() {
                self.schedule_ready(ctx);
            }
            result
        })
    }

    /// Carries out every effect the core queued, and those that carrying them out queues.
    fn run_effects(&mut self, ctx: &mut Context<Self>) {
        loop {
            let effects = self.core().take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                match effect {
                    Effect::Send(messages) => {
                        for message in messages {
                            self.params.network.send(message);
                        }
                    }
                    Effect::Apply {
                        entries,
                        responders,
                    } => self.params.storage.apply.do_send(ApplyCommitted {
                        entries,
                        responders,
                    }),
                    Effect::ProposalFailed(responder, error) => {
                        let _ = responder.send(Err(error));
                    }
                    Effect::ReadAnswered(responder, result) => {
                        let _ = responder.send(result);
                    }
                    Effect::SyncWal { number, inline } => self.sync_wal(number, inline, ctx),
                    Effect::MembersChanged(members) => self.params.network.set_members(&members),
                }
            }
        }
    }

    fn sync_wal(&mut self, number: u64, inline: bool, ctx: &mut Context<Self>) {
        if inline {
            if let Err(error) = self.params.log_store.sync_wal() {
                // Nothing unsynced may ever count as persisted: restart from RocksDB.
                panic!("cannot sync the Raft log: {error}");
            }
            self.core().wal_synced(number);
            return;
        }
        let generation = self.core_generation;
        let store = self.params.log_store.clone();
        let sync = tokio::task::spawn_blocking(move || store.sync_wal());
        ctx.spawn(sync.into_actor(self).map(move |result, actor, ctx| {
            if actor.core_generation != generation || actor.core.is_none() {
                return;
            }
            actor.guarded(ctx, move |core, _| {
                match result {
                    Ok(Ok(())) => {}
                    // Nothing unsynced may ever count as persisted: restart from RocksDB.
                    Ok(Err(error)) => panic!("cannot sync the Raft log: {error}"),
                    Err(error) => panic!("the Raft log sync did not finish: {error}"),
                }
                core.wal_synced(number);
            });
        }));
    }

    fn process_ready(&mut self, ctx: &mut Context<Self>) {
        self.ready_scheduled = false;
        let RaftActor { params, core, .. } = self;
        let core = core.as_mut().expect("the Raft core is built in started()");
        let mut install = |snapshot: &Snapshot| install_snapshot(params, snapshot);
        let progress = core.process_ready(LeaseInstant::now(), &mut install);
        if progress == ReadyProgress::WriteHeld {
            // This thread is about to block in the write and the fsync. The peer links run on
            // it: let them write the appends to their sockets first, so that the followers
            // persist in parallel with the leader. `wait` holds back every other message
            // meanwhile: nothing is stepped between this Ready and its write.
            self.run_effects(ctx);
            ctx.wait(
                tokio::task::yield_now()
                    .into_actor(self)
                    .map(move |(), actor, ctx| {
                        actor.guarded(ctx, |core, _| core.write_held_ready());
                    }),
            );
        }
    }

    /// This node's Raft state as the control API shows it.
    fn status(&self) -> RaftStatus {
        match self.core.as_ref() {
            Some(core) => core.status(),
            None => RaftStatus {
                group_id: self.params.group_id,
                node_id: self.params.node_id,
                role: "Restarting".to_string(),
                term: 0,
                leader_id: 0,
                commit_index: 0,
                applied_index: self
                    .params
                    .applied_index
                    .load(std::sync::atomic::Ordering::SeqCst),
                first_log_index: 0,
                last_log_index: 0,
                proposals_pending: 0,
                snapshots_sent: self.counters.snapshots_sent,
                snapshots_installed: self.counters.snapshots_installed,
                lease_reads: self.counters.lease_reads,
                peers: Vec::new(),
                voters: Vec::new(),
                learners: Vec::new(),
                voters_outgoing: Vec::new(),
                health_problem: Some("the Raft actor is restarting".to_string()),
            },
        }
    }
}

/// Switches the storage actor to the snapshot a Ready carries. The peer transport staged its
/// data before stepping the message in; if the data is gone (this actor restarted in
/// between), the failure restarts the core from RocksDB, which forgets the snapshot, and the
/// leader sends it again.
fn install_snapshot(
    params: &RaftActorParams,
    snapshot: &Snapshot,
) -> Result<Vec<MemberConfig>, String> {
    let metadata = snapshot.get_metadata().clone();
    let Some(staged) = params.snapshots.take(metadata.index, metadata.term) else {
        return Err(format!(
            "the snapshot at index {} term {} arrived without staged data",
            metadata.index, metadata.term
        ));
    };
    let members = SnapshotDescriptor::decode(snapshot.get_data())
        .map_err(|error| format!("its descriptor is corrupt: {error}"))?
        .members;
    // Blocking this thread is intended: nothing else of this Ready may happen before the
    // switch is durable, and the storage actor runs on its own thread.
    futures::executor::block_on(params.storage.install.send(InstallSnapshot {
        staged,
        metadata,
        members: members.clone(),
    }))
    .map_err(|error| format!("the storage actor is unreachable: {error}"))?
    // Rendered here: the core turns a failed install into its restart, with this message.
    .map_err(|error| error.to_string())?;
    Ok(members)
}

impl RaftActor {
    /// How the storage actor and the peer transport address this actor.
    pub fn link(address: &Addr<RaftActor>) -> RaftLink {
        RaftLink {
            storage_started: address.clone().recipient(),
            applied_up_to: address.clone().recipient(),
            durable_applied: address.clone().recipient(),
            step: address.clone().recipient(),
            unreachable: address.clone().recipient(),
            snapshot_ended: address.clone().recipient(),
        }
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
        if let Some(core) = self.core.take() {
            self.counters = core.counters();
        }
        self.ready_scheduled = false;
        self.params.read_gate.set_sole_voter_leader(false);
        // `started` runs again next and rebuilds the core from RocksDB.
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
        let supervision = self.params.supervision.clone();
        run_guarded(&supervision, ctx, |ctx| {
            fail::fail_point!("raft_actor_ready", |_| {
                panic!("failpoint raft_actor_ready");
            });
            self.process_ready(ctx);
            self.run_effects(ctx);
            if self.core().wants_ready() {
                self.schedule_ready(ctx);
            }
        });
    }
}

impl Handler<Tick> for RaftActor {
    type Result = ();
    fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.tick(LeaseInstant::now()));
    }
}

impl Handler<Propose> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: Propose, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| {
            core.propose(msg.command, msg.responder, LeaseInstant::now())
        });
    }
}

impl Handler<ReadBarrier> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReadBarrier, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| {
            core.read_barrier(msg.responder, LeaseInstant::now())
        });
    }
}

impl Handler<ProposeConfChange> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ProposeConfChange, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| {
            core.propose_conf_change(msg.change, msg.check, msg.responder, LeaseInstant::now())
        });
    }
}

impl Handler<TransferLeader> for RaftActor {
    type Result = Result<(), ProposalError>;
    fn handle(&mut self, msg: TransferLeader, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |core, _| core.transfer_leader(msg.to))
            .unwrap_or(Err(ProposalError::Dropped))
    }
}

impl Handler<AppliedUpTo> for RaftActor {
    type Result = ();
    fn handle(&mut self, _: AppliedUpTo, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.applied_published());
    }
}

impl Handler<DurableApplied> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: DurableApplied, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.durable_applied(msg.index));
    }
}

impl Handler<StorageStarted> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: StorageStarted, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.storage_started(msg.applied_index));
    }
}

impl Handler<StepPeerMessage> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: StepPeerMessage, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.step(msg.0, LeaseInstant::now()));
    }
}

impl Handler<ReportUnreachable> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReportUnreachable, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| core.report_unreachable(msg.peer_id));
    }
}

impl Handler<ReportSnapshot> for RaftActor {
    type Result = ();
    fn handle(&mut self, msg: ReportSnapshot, ctx: &mut Context<Self>) {
        self.guarded(ctx, |core, _| {
            core.report_snapshot(msg.peer_id, msg.finished)
        });
    }
}

impl Handler<GetRaftStatus> for RaftActor {
    type Result = MessageResult<GetRaftStatus>;
    fn handle(&mut self, _: GetRaftStatus, ctx: &mut Context<Self>) -> Self::Result {
        if self.core.is_some() {
            self.guarded(ctx, |core, _| core.applied_published());
        }
        MessageResult(self.status())
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
