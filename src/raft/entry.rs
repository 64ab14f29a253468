//! What a committed entry means to the state machine.
//!
//! Every proposal's entry carries a [`ProposalContext`]: the node that proposed it, its
//! proposal id on that node, and the term that node was in when it proposed. An entry whose
//! term differs from the term in its context was appended by a later leader from a forward
//! delayed past an election; its proposer has already been told to retry, and the retry is a
//! new entry. Such a stale twin must change nothing, or it could land after the retried write
//! and after later writes to the same blocks. [`applied_command`] is the one place that rule
//! lives: it is a function of the entry alone, so every replica applies the same thing, by
//! whatever path the entry reaches its state machine (delivered by Raft, read back from the
//! log to fill a gap, or replayed after a restart).

use bytes::Bytes;
use raft::prelude::{Entry, EntryType};

/// The context of every proposal's entry: who proposed it, which proposal, in which term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposalContext {
    pub node_id: u64,
    pub proposal_id: u64,
    pub term: u64,
}

impl ProposalContext {
    pub const BYTES: usize = 24;

    pub fn encode(&self) -> Bytes {
        let mut bytes = Vec::with_capacity(Self::BYTES);
        bytes.extend_from_slice(&self.node_id.to_be_bytes());
        bytes.extend_from_slice(&self.proposal_id.to_be_bytes());
        bytes.extend_from_slice(&self.term.to_be_bytes());
        Bytes::from(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::BYTES {
            return None;
        }
        let field = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Some(ProposalContext {
            node_id: field(0),
            proposal_id: field(8),
            term: field(16),
        })
    }

    /// Whether `entry` is the stale twin of this proposal (see the module doc).
    pub fn is_stale_in(&self, entry: &Entry) -> bool {
        self.term != entry.term
    }
}

/// The state-machine command a committed entry carries: its data, or nothing (a no-op) for a
/// stale twin, a membership change (the Raft actor applies those) and an empty entry.
pub fn applied_command(entry: &Entry) -> &[u8] {
    match entry.get_entry_type() {
        EntryType::EntryNormal => match ProposalContext::decode(&entry.context) {
            Some(context) if context.is_stale_in(entry) => &[],
            _ => &entry.data,
        },
        EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(term: u64, entry_type: EntryType, context: Bytes) -> Entry {
        let mut entry = Entry {
            index: 9,
            term,
            context,
            data: Bytes::from_static(b"command"),
            ..Default::default()
        };
        entry.set_entry_type(entry_type);
        entry
    }

    #[test]
    fn contexts_round_trip_and_other_lengths_are_no_context() {
        let context = ProposalContext {
            node_id: 3,
            proposal_id: u64::MAX,
            term: 7,
        };
        assert_eq!(ProposalContext::decode(&context.encode()), Some(context));
        assert_eq!(ProposalContext::decode(&[0u8; 23]), None);
        assert_eq!(ProposalContext::decode(&[0u8; 25]), None);
    }

    #[test]
    fn only_a_current_normal_entry_carries_its_command() {
        let proposed_in = |term: u64| {
            ProposalContext {
                node_id: 1,
                proposal_id: 5,
                term,
            }
            .encode()
        };
        let current = entry(4, EntryType::EntryNormal, proposed_in(4));
        assert_eq!(applied_command(&current), b"command");
        let stale = entry(5, EntryType::EntryNormal, proposed_in(4));
        assert_eq!(applied_command(&stale), b"");
        // Entries without a proposal context (none are written today) keep their data.
        let bare = entry(5, EntryType::EntryNormal, Bytes::new());
        assert_eq!(applied_command(&bare), b"command");
        for conf_change in [EntryType::EntryConfChange, EntryType::EntryConfChangeV2] {
            assert_eq!(applied_command(&entry(4, conf_change, proposed_in(4))), b"");
        }
    }
}
