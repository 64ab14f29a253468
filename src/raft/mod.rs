//! The parts of Raft that are pure rules over log entries and Raft state, apart from the
//! actors that do the I/O: every replica must reach the same answer from the same entry, so
//! these take no clock, no socket and no disk.
//!
//! - [`entry`]: the proposal context every entry carries, and what of a committed entry the
//!   state machine applies (the stale-twin rule).

pub mod entry;
