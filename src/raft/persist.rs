//! The Readies written (unsynced) and advanced but not yet reported persisted.
//!
//! A Ready's entries and hard state are written to RocksDB without a sync, so raft-rs can read
//! them back at once, and the Ready is advanced with `advance_append_async`. A WAL sync then
//! covers every Ready written before it started (group commit); only after it returns is
//! each of them reported with `on_persist_ready`, and only then do the messages it holds (a
//! follower's append and vote responses) go out.

use std::collections::VecDeque;

use raft::prelude::Message as RaftMessage;

/// The newest unreported Ready's number, whether any of them needs a WAL sync, and the
/// persisted messages each holds until it is durable.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(to: u64) -> RaftMessage {
        RaftMessage {
            to,
            ..Default::default()
        }
    }

    #[test]
    fn held_messages_go_out_only_once_their_ready_is_durable() {
        let mut queue = PersistQueue::default();
        queue.written(1, true, vec![message(1)]);
        queue.written(2, false, vec![message(2)]);
        // One sync covers both Readies, and one of them needs it.
        assert_eq!(queue.take_unpersisted(), Some((2, true)));
        queue.written(3, false, vec![message(3)]);
        let released: Vec<u64> = queue.persisted(2).iter().map(|m| m.to).collect();
        assert_eq!(released, vec![1, 2]);
        assert!(queue.has_unpersisted());
        assert_eq!(queue.take_unpersisted(), Some((3, false)));
        let released: Vec<u64> = queue.persisted_all().iter().map(|m| m.to).collect();
        assert_eq!(released, vec![3]);
    }
}
