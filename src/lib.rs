//! raftblk: a network block device (NBD) whose writes are replicated by Raft.
//!
//! # Layout
//! - [`nbd`]: the NBD wire protocol as pure functions and a handshake state machine (no I/O).
//! - [`storage`]: RocksDB (Raft log, state-machine metadata) beside sparse image files.
//! - [`actors`]: the actix actors that move bytes between sockets, Raft and storage.
//! - [`peer`]: the wire format between storage servers (pure functions, like [`nbd`]).
//! - [`raft`]: Raft rules that are pure functions of entries (the proposal context, what the
//!   state machine applies of an entry).
//! - [`control`]: the HTTP control API (volumes, status).
//! - [`dev`]: `raftblk dev`, a whole cluster and proxy on loopback as child processes.
//! - [`proxy`]: the client-side proxy (`raftblk proxy`): leader following, reissue, cache.
//! - [`server`]: wires a server process together; [`config`] and [`logging`] set it up.
//! - [`tls`]: rustls configurations and certificates in the layout qemu and libnbd use.
//!
//! See ARCHITECTURE.md for the write path fsync by fsync and the invariants.

pub mod actors;
pub mod config;
pub mod control;
pub mod dev;
pub mod drill;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod peer;
pub mod proxy;
pub mod raft;
pub mod server;
pub mod storage;
pub mod tls;

/// The Raft group every volume belongs to today. Keys, messages and metrics carry a group id
/// already so that volumes can later be sharded across many groups per node.
pub const DEFAULT_GROUP_ID: u64 = 1;
