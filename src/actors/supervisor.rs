//! Supervision: every crash of an actor becomes a restart of that actor alone, with backoff and
//! a restart-intensity limit; past the limit the whole process shuts down cleanly and exits
//! non-zero so that its service manager restarts it.
//!
//! actix restarts a `Supervised` actor only when it *stops*, and nothing in actix catches a
//! panic: a panic would drop the actor and close its mailbox for good. Two layers close that gap:
//!
//! - Inside message handlers, [`run_guarded`] catches the panic, logs and counts it, and turns it
//!   into `ctx.stop()`.
//! - Everything else an actor runs (timers such as `run_interval`, `started()`, futures spawned
//!   on its context) is polled by its parent, [`SupervisedActor`], the future that owns the
//!   actor's context on its arbiter. It polls the context inside `catch_unwind`, so a panic
//!   anywhere in the actor lands there; a stop after a guarded handler crash lands there too.
//!
//! Either way the parent restarts the actor one-for-one, in place: the context's timers and
//! spawned futures (possibly poisoned mid-poll) are dropped, `Supervised::restarting` rebuilds all
//! of the actor's state from durable state (RocksDB and the image files), and `started()` runs
//! again. The mailbox and therefore the address stay the same, so callers always reach the
//! current instance; their in-flight replies were one-shot channels that the crash dropped,
//! which callers treat as "retry". Messages sent meanwhile wait in the mailbox.
//!
//! Restart intensity: each kind may restart at most [`RestartPolicy::restarts_max`] times within
//! [`RestartPolicy::window`]; the second and later restarts in the window wait an exponential
//! backoff first. One more crash escalates: [`RestartCounters::escalate`] wakes the process's
//! main task, which runs the ordinary clean shutdown (final checkpoint, actors stopped, RocksDB
//! closed) and exits non-zero. Detected corruption escalates the same way.
//!
//! Invariant: `panic = "unwind"` stays set in Cargo.toml; with `abort` none of this runs.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix::dev::ContextFut;
use actix::{Actor, ActorContext, Addr, ArbiterHandle, AsyncContext, Context, Supervised};
use parking_lot::Mutex;
use serde::Serialize;

/// The actor kinds that restart independently, used as labels in logs, status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    NbdSession,
    Raft,
    Storage,
    Listener,
    /// The Raft peer transport's tasks (listener, links, snapshot transfers).
    Peer,
    /// The proxy's read cache.
    Cache,
}

impl ActorKind {
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::NbdSession => "nbd_session",
            ActorKind::Raft => "raft",
            ActorKind::Storage => "storage",
            ActorKind::Listener => "listener",
            ActorKind::Peer => "peer",
            ActorKind::Cache => "cache",
        }
    }

    pub const ALL: [ActorKind; 6] = [
        ActorKind::NbdSession,
        ActorKind::Raft,
        ActorKind::Storage,
        ActorKind::Listener,
        ActorKind::Peer,
        ActorKind::Cache,
    ];

    pub fn from_name(name: &str) -> Option<ActorKind> {
        ActorKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How often an actor kind may restart before the process gives up on itself.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts of one kind allowed within `window`; one more escalates.
    pub restarts_max: usize,
    pub window: Duration,
    /// Pause before the second restart within the window; doubles with every further one.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        // A burst of 10 crashes in 10 s is a bug that restarts do not cure: let the service
        // manager start a fresh process instead. The first restart is immediate so that an
        // isolated crash costs clients as little as possible.
        RestartPolicy {
            restarts_max: 10,
            window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// What a crash leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashVerdict {
    /// Restart the actor after this pause.
    Restart { backoff: Duration },
    /// The restart intensity is exceeded: the process shuts down and exits non-zero.
    Escalate,
}

/// Restart counts and recent restart times per actor kind, shared by every actor of a process,
/// and the process's escalation signal.
#[derive(Debug)]
pub struct RestartCounters {
    nbd_session: AtomicU64,
    raft: AtomicU64,
    storage: AtomicU64,
    listener: AtomicU64,
    peer: AtomicU64,
    cache: AtomicU64,
    policy: RestartPolicy,
    /// Crash times within the policy's window, per kind (indexed by `ActorKind::index`); each
    /// holds at most `restarts_max + 1` entries.
    recent: Mutex<[VecDeque<Instant>; 6]>,
    /// `Some(reason)` once the process decided to exit.
    escalation: tokio::sync::watch::Sender<Option<String>>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct RestartCounts {
    pub nbd_session: u64,
    pub raft: u64,
    pub storage: u64,
    pub listener: u64,
    pub peer: u64,
    pub cache: u64,
}

impl RestartCounters {
    pub fn new() -> Arc<Self> {
        Self::with_policy(RestartPolicy::default())
    }

    pub fn with_policy(policy: RestartPolicy) -> Arc<Self> {
        Arc::new(RestartCounters {
            nbd_session: AtomicU64::new(0),
            raft: AtomicU64::new(0),
            storage: AtomicU64::new(0),
            listener: AtomicU64::new(0),
            peer: AtomicU64::new(0),
            cache: AtomicU64::new(0),
            policy,
            recent: Mutex::new(Default::default()),
            escalation: tokio::sync::watch::channel(None).0,
        })
    }

    fn counter(&self, kind: ActorKind) -> &AtomicU64 {
        match kind {
            ActorKind::NbdSession => &self.nbd_session,
            ActorKind::Raft => &self.raft,
            ActorKind::Storage => &self.storage,
            ActorKind::Listener => &self.listener,
            ActorKind::Peer => &self.peer,
            ActorKind::Cache => &self.cache,
        }
    }

    /// Counts one crash of `kind` and decides what follows it; past the restart intensity it
    /// escalates.
    pub fn record(&self, kind: ActorKind) -> CrashVerdict {
        self.counter(kind).fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let crashes_in_window = {
            let mut recent = self.recent.lock();
            let times = &mut recent[kind.index()];
            while times
                .front()
                .is_some_and(|time| now.duration_since(*time) > self.policy.window)
            {
                times.pop_front();
            }
            times.push_back(now);
            while times.len() > self.policy.restarts_max + 1 {
                times.pop_front();
            }
            times.len()
        };
        if crashes_in_window > self.policy.restarts_max {
            self.escalate(format!(
                "{} crashed {} times within {} ms",
                kind.name(),
                crashes_in_window,
                self.policy.window.as_millis()
            ));
            return CrashVerdict::Escalate;
        }
        CrashVerdict::Restart {
            backoff: self.backoff_after(crashes_in_window),
        }
    }

    /// The pause due before restarting `kind` given its crashes already recorded in the window.
    fn current_backoff(&self, kind: ActorKind) -> Duration {
        let now = Instant::now();
        let recent = self.recent.lock();
        let crashes_in_window = recent[kind.index()]
            .iter()
            .filter(|time| now.duration_since(**time) <= self.policy.window)
            .count();
        self.backoff_after(crashes_in_window)
    }

    /// No pause after the first crash in the window, then `backoff_initial`, doubling, capped.
    fn backoff_after(&self, crashes_in_window: usize) -> Duration {
        if crashes_in_window <= 1 {
            Duration::ZERO
        } else {
            let doublings = (crashes_in_window - 2).min(16) as u32;
            (self.policy.backoff_initial * 2u32.pow(doublings)).min(self.policy.backoff_max)
        }
    }

    /// Asks the process to shut down cleanly and exit non-zero. The first reason wins.
    pub fn escalate(&self, reason: String) {
        self.escalation.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The escalation reason, if the process decided to exit.
    pub fn escalation(&self) -> Option<String> {
        self.escalation.borrow().clone()
    }

    /// Resolves with the reason once the process decided to exit.
    pub async fn escalated(&self) -> String {
        let mut receiver = self.escalation.subscribe();
        loop {
            if let Some(reason) = receiver.borrow_and_update().clone() {
                return reason;
            }
            if receiver.changed().await.is_err() {
                // The sender lives in `self`, so this does not happen; never resolve if it did.
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn snapshot(&self) -> RestartCounts {
        RestartCounts {
            nbd_session: self.nbd_session.load(Ordering::Relaxed),
            raft: self.raft.load(Ordering::Relaxed),
            storage: self.storage.load(Ordering::Relaxed),
            listener: self.listener.load(Ordering::Relaxed),
            peer: self.peer.load(Ordering::Relaxed),
            cache: self.cache.load(Ordering::Relaxed),
        }
    }
}

/// What a supervised actor needs to report its own crash.
#[derive(Clone)]
pub struct Supervision {
    pub kind: ActorKind,
    pub logger: slog::Logger,
    pub counters: Arc<RestartCounters>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl Supervision {
    /// Logs and counts a crash (a caught panic's payload); returns what follows it.
    pub fn crashed(&self, payload: &(dyn std::any::Any + Send)) -> CrashVerdict {
        let verdict = self.counters.record(self.kind);
        let panic = panic_message(payload);
        match verdict {
            CrashVerdict::Restart { backoff } => {
                slog::error!(self.logger, "actor crashed; restarting it";
                    "actor" => self.kind.name(), "panic" => panic,
                    "backoff_ms" => backoff.as_millis() as u64);
            }
            CrashVerdict::Escalate => {
                slog::crit!(self.logger, "actor crashed too often; escalating: the process \
                    shuts down and exits non-zero";
                    "actor" => self.kind.name(), "panic" => panic,
                    "reason" => self.counters.escalation().unwrap_or_default());
            }
        }
        verdict
    }
}

/// Runs `body`; if it panics, logs and counts the crash and stops the actor so that its parent
/// ([`SupervisedActor`]) restarts it (or, for an unsupervised actor such as an NBD session,
/// so that it ends). Returns `None` after a panic.
pub fn run_guarded<A, R>(
    supervision: &Supervision,
    ctx: &mut Context<A>,
    body: impl FnOnce(&mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    // AssertUnwindSafe: after a panic the actor's state is never used again as-is;
    // `restarting()` rebuilds it from durable state before the next message.
    match catch_unwind(AssertUnwindSafe(|| body(ctx))) {
        Ok(result) => Some(result),
        Err(payload) => {
            supervision.crashed(payload.as_ref());
            ctx.stop();
            None
        }
    }
}

/// The parent of one supervised actor: owns the actor's context future on its arbiter, catches
/// every panic while polling it, and restarts the actor in place (see the module docs).
pub struct SupervisedActor<A>
where
    A: Supervised + Actor<Context = Context<A>>,
{
    context: ContextFut<A, Context<A>>,
    supervision: Supervision,
    /// Set between a crash and the restart it waits for.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<A> SupervisedActor<A>
where
    A: Supervised + Actor<Context = Context<A>>,
{
    /// Starts `make()`'s actor under supervision on the current arbiter.
    pub fn start(supervision: Supervision, make: impl FnOnce(&mut Context<A>) -> A) -> Addr<A> {
        let mut context = Context::new();
        let actor = make(&mut context);
        let address = context.address();
        actix_rt::spawn(SupervisedActor {
            context: context.into_future(actor),
            supervision,
            backoff: None,
        });
        address
    }

    /// Starts `make()`'s actor under supervision on `arbiter`.
    pub fn start_in_arbiter(
        arbiter: &ArbiterHandle,
        supervision: Supervision,
        make: impl FnOnce(&mut Context<A>) -> A + Send + 'static,
    ) -> Addr<A> {
        let (sender, receiver) = actix::dev::channel::channel(16);
        arbiter.spawn_fn(move || {
            let mut context = Context::with_receiver(receiver);
            let actor = make(&mut context);
            actix_rt::spawn(SupervisedActor {
                context: context.into_future(actor),
                supervision,
                backoff: None,
            });
        });
        Addr::new(sender)
    }

    /// After a crash: restart now, or arm the backoff timer. `false`: do not restart.
    fn after_crash(&mut self, verdict: CrashVerdict) -> bool {
        match verdict {
            CrashVerdict::Escalate => false,
            CrashVerdict::Restart { backoff } if backoff.is_zero() => self.restart(),
            CrashVerdict::Restart { backoff } => {
                self.backoff = Some(Box::pin(tokio::time::sleep(backoff)));
                true
            }
        }
    }

    fn restart(&mut self) -> bool {
        if self.supervision.counters.escalation().is_some() {
            return false;
        }
        // `restart` drops the context's timers and spawned futures and calls `restarting`;
        // it refuses when no address is left (nobody can reach the actor any more).
        let restarted = self.context.restart();
        if restarted {
            slog::info!(self.supervision.logger, "actor restarted";
                "actor" => self.supervision.kind.name());
        }
        restarted
    }
}

impl<A> Future for SupervisedActor<A>
where
    A: Supervised + Actor<Context = Context<A>>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                if backoff.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
                if !this.restart() {
                    return Poll::Ready(());
                }
            }
            // AssertUnwindSafe: after a panic the actor is never used as-is; `restart` drops
            // the context's items and `restarting` rebuilds the actor from durable state.
            let polled = catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.context).poll(cx)));
            match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(())) => {
                    // Stopped: a guarded handler crashed (already logged and counted), or the
                    // actor stopped itself. Either way it restarts while it can be reached.
                    if this.supervision.counters.escalation().is_some() {
                        return Poll::Ready(());
                    }
                    let backoff = this
                        .supervision
                        .counters
                        .current_backoff(this.supervision.kind);
                    if !this.after_crash(CrashVerdict::Restart { backoff }) {
                        return Poll::Ready(());
                    }
                }
                Err(payload) => {
                    let verdict = this.supervision.crashed(payload.as_ref());
                    if !this.after_crash(verdict) {
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::prelude::*;

    struct Fragile {
        supervision: Supervision,
        generation: u32,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;
    }

    impl actix::Supervised for Fragile {
        fn restarting(&mut self, _ctx: &mut Context<Self>) {
            self.generation += 1;
        }
    }

    #[derive(Message)]
    #[rtype(result = "Option<u32>")]
    struct Poke {
        panic: bool,
    }

    impl Handler<Poke> for Fragile {
        type Result = Option<u32>;
        fn handle(&mut self, msg: Poke, ctx: &mut Context<Self>) -> Option<u32> {
            let supervision = self.supervision.clone();
            let generation = self.generation;
            run_guarded(&supervision, ctx, |_| {
                assert!(!msg.panic, "injected panic");
                generation
            })
        }
    }

    #[actix_rt::test]
    async fn a_panicking_handler_restarts_the_actor_at_the_same_address() {
        let counters = RestartCounters::new();
        let supervision = Supervision {
            kind: ActorKind::Storage,
            logger: crate::logging::discard_logger(),
            counters: counters.clone(),
        };
        let addr = actix::Supervisor::start(move |_| Fragile {
            supervision,
            generation: 0,
        });
        assert_eq!(addr.send(Poke { panic: false }).await, Ok(Some(0)));
        assert_eq!(addr.send(Poke { panic: true }).await, Ok(None));
        // The same address now reaches the restarted instance.
        assert_eq!(addr.send(Poke { panic: false }).await, Ok(Some(1)));
        assert_eq!(counters.snapshot().storage, 1);
    }

    fn supervision_with(counters: &Arc<RestartCounters>, kind: ActorKind) -> Supervision {
        Supervision {
            kind,
            logger: crate::logging::discard_logger(),
            counters: counters.clone(),
        }
    }

    /// Panics outside its handlers on demand: in a timer, in `started()`, in a spawned future.
    struct Wobbly {
        starts: Arc<AtomicU64>,
        panic_in_started_once: bool,
        panic_in_timer_once: Arc<std::sync::atomic::AtomicBool>,
        panic_in_future_once: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Actor for Wobbly {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            self.starts.fetch_add(1, Ordering::SeqCst);
            if std::mem::take(&mut self.panic_in_started_once) {
                panic!("injected panic in started");
            }
            let timer_flag = self.panic_in_timer_once.clone();
            ctx.run_interval(Duration::from_millis(5), move |_, _| {
                if timer_flag.swap(false, Ordering::SeqCst) {
                    panic!("injected panic in a timer");
                }
            });
            let future_flag = self.panic_in_future_once.clone();
            ctx.spawn(actix::fut::wrap_future(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if future_flag.swap(false, Ordering::SeqCst) {
                        panic!("injected panic in a spawned future");
                    }
                }
            }));
        }
    }

    impl actix::Supervised for Wobbly {}

    #[derive(Message)]
    #[rtype(result = "u64")]
    struct Starts;

    impl Handler<Starts> for Wobbly {
        type Result = u64;
        fn handle(&mut self, _: Starts, _: &mut Context<Self>) -> u64 {
            self.starts.load(Ordering::SeqCst)
        }
    }

    async fn wait_for_starts(addr: &Addr<Wobbly>, starts: u64) -> u64 {
        for _ in 0..1000 {
            let seen = addr.send(Starts).await.expect("the actor answers");
            if seen >= starts {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        addr.send(Starts).await.expect("the actor answers")
    }

    #[actix_rt::test]
    async fn panics_outside_handlers_restart_the_actor_at_the_same_address() {
        let counters = RestartCounters::new();
        let timer_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let future_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let actor = Wobbly {
            starts: Arc::new(AtomicU64::new(0)),
            panic_in_started_once: true,
            panic_in_timer_once: timer_flag.clone(),
            panic_in_future_once: future_flag.clone(),
        };
        let addr =
            SupervisedActor::start(supervision_with(&counters, ActorKind::Listener), |_| actor);
        // The first `started()` panicked; the restarted instance answers.
        assert_eq!(wait_for_starts(&addr, 2).await, 2);
        timer_flag.store(true, Ordering::SeqCst);
        assert_eq!(wait_for_starts(&addr, 3).await, 3);
        future_flag.store(true, Ordering::SeqCst);
        assert_eq!(wait_for_starts(&addr, 4).await, 4);
        assert_eq!(counters.snapshot().listener, 3);
        assert_eq!(counters.escalation(), None);
    }

    #[actix_rt::test]
    async fn a_panic_storm_escalates_instead_of_restarting_forever() {
        let counters = RestartCounters::with_policy(RestartPolicy {
            restarts_max: 3,
            window: Duration::from_secs(3600),
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
        });
        let addr = SupervisedActor::start(supervision_with(&counters, ActorKind::Storage), |_| {
            Fragile {
                supervision: supervision_with(&counters, ActorKind::Storage),
                generation: 0,
            }
        });
        for _ in 0..3 {
            assert_eq!(addr.send(Poke { panic: true }).await, Ok(None));
            assert!(addr.send(Poke { panic: false }).await.is_ok());
        }
        assert_eq!(counters.escalation(), None);
        // The fourth crash within the window is one too many: no restart, the process is told.
        assert_eq!(addr.send(Poke { panic: true }).await, Ok(None));
        let reason = tokio::time::timeout(Duration::from_secs(10), counters.escalated())
            .await
            .expect("escalation is signalled");
        assert!(reason.contains("storage"), "reason: {reason}");
        assert!(addr.send(Poke { panic: false }).await.is_err());
        assert_eq!(counters.snapshot().storage, 4);
    }

    #[test]
    fn restarts_back_off_exponentially_within_the_window() {
        let counters = RestartCounters::with_policy(RestartPolicy {
            restarts_max: 5,
            window: Duration::from_secs(3600),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(30),
        });
        let verdicts: Vec<CrashVerdict> =
            (0..6).map(|_| counters.record(ActorKind::Raft)).collect();
        let restart = |ms| CrashVerdict::Restart {
            backoff: Duration::from_millis(ms),
        };
        assert_eq!(
            verdicts,
            vec![
                restart(0),
                restart(10),
                restart(20),
                restart(30),
                restart(30),
                CrashVerdict::Escalate
            ]
        );
        // Other kinds have their own budget.
        assert_eq!(counters.record(ActorKind::Cache), restart(0));
    }
}
