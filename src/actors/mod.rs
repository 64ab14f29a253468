//! The actor system of a server. Actors only move bytes and messages; the NBD codec
//! (`crate::nbd`) and the storage layer (`crate::storage`) do the thinking.
//!
//! - [`listener::NbdListenerActor`]: accepts connections, runs the handshake.
//! - [`session::NbdSessionActor`]: one per connection; dispatches requests.
//! - [`raft::RaftActor`]: the Raft group's shell: runs the sans-I/O core
//!   ([`crate::raft::core::RaftCore`]) and carries out the I/O it asks for.
//! - [`storage::StorageActor`]: applies committed entries to the images; checkpoints.
//! - [`peer`]: the Raft peer transport (links to the other members, snapshot transfers).
//! - [`supervisor`]: turns handler panics into restarts, counts them.
//! - [`frame_writer`]: the coalescing socket writer of sessions and proxy upstreams.
//!
//! [`messages`] lists every message between them.

pub mod frame_writer;
pub mod listener;
pub mod messages;
pub mod peer;
pub mod raft;
pub mod session;
pub mod storage;
pub mod supervisor;
