//! Applying committed entries to the state machine: the one path every entry takes, whether
//! Raft delivered it, it was read back from the log to fill a gap, or a restarted storage
//! side replays it. The storage actor runs it; so does the Raft simulation, which drives the
//! same code against its own clock and network.
//!
//! Entries at or below the applied index are skipped (a restarted storage side is handed
//! again what its predecessor had applied). A gap before the first entry means the storage
//! side restarted and lost entries it had been handed: they are read from the log, which
//! keeps everything above the durable applied index. Either way entries are applied exactly
//! in index order, and what each means to the state machine is decided by
//! [`crate::raft::entry::applied_command`] from the entry alone.

use std::collections::HashMap;

use raft::prelude::Entry;
use raft::Storage as _;

use super::raft_log::RaftLogStore;
use super::state_machine::{ApplyOutcome, StateMachine};
use crate::raft::entry::applied_command;
use crate::raft::ProposalError;

/// What applying one batch did.
pub struct Applied<P> {
    /// The answer for each responder handed in.
    pub replies: Vec<(P, Result<ApplyOutcome, ProposalError>)>,
    /// Whether the volume table changed (a volume created, deleted, attached or detached).
    pub volumes_changed: bool,
    /// Bytes of commands applied (for the checkpoint trigger).
    pub applied_bytes: u64,
}

/// Applies `entries` (committed, in index order) and answers `responders` (entry index →
/// responder of a proposal this node made). An I/O error applies nothing further and gives
/// the responders back with the error: the caller answers them and restarts the storage side,
/// which replays from its durable state.
pub fn apply_committed<P>(
    machine: &mut StateMachine,
    log_store: &RaftLogStore,
    entries: Vec<Entry>,
    responders: Vec<(u64, P)>,
) -> Result<Applied<P>, (String, Vec<P>)> {
    let mut responders: HashMap<u64, P> = responders.into_iter().collect();
    let mut applied = Applied {
        replies: Vec::new(),
        volumes_changed: false,
        applied_bytes: 0,
    };
    let Some(first_index) = entries.first().map(|entry| entry.index) else {
        applied.replies = dropped(responders);
        return Ok(applied);
    };
    let applied_index = machine.applied_index();
    let mut to_apply: Vec<Entry> = Vec::new();
    if first_index > applied_index + 1 {
        match log_store.entries(
            applied_index + 1,
            first_index,
            None,
            raft::GetEntriesContext::empty(false),
        ) {
            Ok(missing) => to_apply.extend(missing),
            Err(error) => panic!(
                "cannot read committed entries {}..{first_index} from the log: {error}",
                applied_index + 1
            ),
        }
    }
    to_apply.extend(
        entries
            .into_iter()
            .filter(|entry| entry.index > applied_index),
    );
    let batch: Vec<(u64, &[u8])> = to_apply
        .iter()
        .map(|entry| (entry.index, applied_command(entry)))
        .collect();
    applied.applied_bytes = batch.iter().map(|(_, data)| data.len() as u64).sum();
    let outcomes = if batch.is_empty() {
        Vec::new()
    } else {
        match machine.apply_batch(&batch) {
            Ok(outcomes) => outcomes,
            Err(error) => return Err((error.to_string(), responders.into_values().collect())),
        }
    };
    for ((index, _), outcome) in batch.iter().zip(outcomes) {
        if matches!(
            outcome,
            ApplyOutcome::VolumeCreated(_)
                | ApplyOutcome::VolumeDeleted(_)
                | ApplyOutcome::Attached(_)
                | ApplyOutcome::Detached(_)
        ) {
            applied.volumes_changed = true;
        }
        if let Some(responder) = responders.remove(index) {
            let answer = match outcome {
                // Covered by an installed snapshot: its effect, or its rejection, is in the
                // copied state, and this node cannot tell which. Never report that as
                // success; the proposer asks again and gets the answer of a fresh entry.
                ApplyOutcome::AlreadyApplied => Err(ProposalError::Dropped),
                outcome => Ok(outcome),
            };
            applied.replies.push((responder, answer));
        }
    }
    // Already applied before a restart: the outcome is unknown here, so ask for a retry.
    applied.replies.extend(dropped(responders));
    Ok(applied)
}

fn dropped<P>(responders: HashMap<u64, P>) -> Vec<(P, Result<ApplyOutcome, ProposalError>)> {
    responders
        .into_values()
        .map(|responder| (responder, Err(ProposalError::Dropped)))
        .collect()
}
