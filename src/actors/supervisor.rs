//! Supervision: turns a panic inside an actor's message handler into a restart of that actor
//! alone, and counts restarts per actor kind.
//!
//! actix restarts a `Supervised` actor only when it *stops*, and nothing in actix catches a
//! panic: a panicking handler would drop the actor and close its mailbox for good. So every
//! handler body of a supervised actor runs inside [`run_guarded`]: a panic is caught, logged
//! with its message, counted, and turned into `ctx.stop()`. `actix::Supervisor` then calls
//! `Supervised::restarting`, which each actor implements by rebuilding all of its state from
//! durable state (RocksDB and the image files). The actor keeps its address, so callers reach
//! the new instance without noticing; their in-flight replies were one-shot channels that the
//! panic dropped, which callers treat as "retry".
//!
//! Invariant: `panic = "unwind"` stays set in Cargo.toml; with `abort` none of this runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Actor, ActorContext, Context};
use serde::Serialize;

/// The actor kinds that restart independently, used as labels in logs, status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

/// Restart counts per actor kind, shared by every actor of a process.
#[derive(Debug, Default)]
pub struct RestartCounters {
    nbd_session: AtomicU64,
    raft: AtomicU64,
    storage: AtomicU64,
    listener: AtomicU64,
    peer: AtomicU64,
    cache: AtomicU64,
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
        Arc::new(Self::default())
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

    pub fn record(&self, kind: ActorKind) {
        self.counter(kind).fetch_add(1, Ordering::Relaxed);
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

/// Runs `body`; if it panics, logs and counts the crash and stops the actor so that its
/// `actix::Supervisor` restarts it. Returns `None` after a panic.
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
            supervision.counters.record(supervision.kind);
            slog::error!(supervision.logger, "actor crashed; restarting it";
                "actor" => supervision.kind.name(),
                "panic" => panic_message(payload.as_ref()));
            ctx.stop();
            None
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
}
