//! Every message the actors exchange, in one place: read this file to learn the whole
//! conversation of a server.
//!
//! ```text
//!  NbdListenerActor ──spawns──▶ NbdSessionActor (one per connection)
//!  NbdSessionActor ──Propose / ReadBarrier──▶ RaftActor
//!  RaftActor ──ApplyCommitted──▶ StorageActor ──(responder: ProposalResult)──▶ NbdSessionActor
//!  StorageActor ──AppliedUpTo / DurableApplied / StorageStarted──▶ RaftActor
//!  control API ──Propose / GetRaftStatus──▶ RaftActor
//! ```
//!
//! Replies to proposals and read barriers travel on one-shot channels carried inside the
//! messages, so a reply reaches the session that asked even when the actor that produced it has
//! since restarted. A dropped responder (its actor crashed) means "retry", never "failed".

use actix::prelude::*;
use raft::prelude::Entry;
use tokio::sync::oneshot;

use crate::storage::state_machine::ApplyOutcome;
use crate::storage::StorageError;

/// Why the storage actor did not do what another actor or the control API asked of it. Typed,
/// so that the asker can tell a volume it does not have from a corrupt replica or a failed
/// disk, and a crash of the actor from all of these.
#[derive(Debug, thiserror::Error)]
pub enum StorageRequestError {
    /// The actor panicked while handling the request (it restarts; the request may be
    /// asked again).
    #[error("the storage actor crashed while {0}")]
    Crashed(&'static str),
    /// This node has no volume of that name.
    #[error("no volume named {0}")]
    NoSuchVolume(String),
    /// The storage layer failed (I/O, RocksDB, a checksum mismatch, corruption).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub use crate::raft::{ConfChangeCheck, PeerProgress, ProposalError, RaftStatus};

pub type ProposalResult = Result<ApplyOutcome, ProposalError>;
pub type ProposalResponder = oneshot::Sender<ProposalResult>;
pub type ReadBarrierResponder = oneshot::Sender<Result<(), ProposalError>>;

/// Session or control API → Raft actor: replicate this state-machine command
/// (`storage::command` encoding). The outcome arrives on `responder` once the entry is committed
/// and applied on this node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Propose {
    pub command: bytes::Bytes,
    pub responder: ProposalResponder,
}

/// Control API → Raft actor: change the membership (learner add, promotion, removal, or a
/// joint replace). Only the leader accepts it, one at a time: raft-rs would silently turn a
/// second change into an empty entry while one is pending, and its caller would never hear.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProposeConfChange {
    pub change: raft::prelude::ConfChangeV2,
    /// What must hold for the change, judged by the Raft actor on its live state in the same
    /// step that proposes it, so that nothing can change between the check and the proposal
    /// (a status read earlier by the caller can be stale by then). A failed check is answered
    /// [`ProposalError::ConfChangeNotReady`] with the reason.
    pub check: Option<ConfChangeCheck>,
    pub responder: ProposalResponder,
}

/// Control API → Raft actor: hand leadership to `to` (a caught-up voter). Answers at once;
/// the caller watches the status for the new leader.
#[derive(Message)]
#[rtype(result = "Result<(), ProposalError>")]
pub struct TransferLeader {
    pub to: u64,
}

/// Session → Raft actor: answer once this node has applied everything committed before the
/// barrier was asked for (Raft ReadIndex), so that a read after it is linearizable. Barriers
/// that arrive together share one ReadIndex round.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReadBarrier {
    pub responder: ReadBarrierResponder,
}

/// Raft actor → storage actor: committed entries, in index order, to apply to the images, and
/// the responders of the proposals among them that this node made.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyCommitted {
    pub entries: Vec<Entry>,
    pub responders: Vec<(u64, ProposalResponder)>,
}

/// Storage actor → Raft actor: the published applied index (the shared atomic) has reached the
/// Raft actor's `applied_wanted`, so a waiting read may go on. Without a waiter the Raft actor
/// reads the published index at its next Ready or tick and nothing is sent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AppliedUpTo;

/// Storage actor → Raft actor: the images are fdatasync'd and the applied index `index` is
/// recorded, so the log up to it may be compacted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DurableApplied {
    pub index: u64,
}

/// Storage actor → Raft actor, on every (re)start: the storage actor has rebuilt its state and
/// applied up to `applied_index`; the Raft actor re-delivers any committed entries after it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StorageStarted {
    pub applied_index: u64,
}

/// Anyone → storage actor: fdatasync the images and record the applied index now (used on
/// shutdown). Answers with the durable applied index.
#[derive(Message)]
#[rtype(result = "Result<u64, StorageRequestError>")]
pub struct Checkpoint;

/// Anyone → Raft actor: a snapshot of the Raft state for status output.
#[derive(Message)]
#[rtype(result = "RaftStatus")]
pub struct GetRaftStatus;

/// Peer transport → Raft actor: a message from another member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StepPeerMessage(pub raft::prelude::Message);

/// Peer transport → Raft actor: the connection to `peer_id` failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportUnreachable {
    pub peer_id: u64,
}

/// Peer transport → Raft actor: a snapshot transfer to `peer_id` ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportSnapshot {
    pub peer_id: u64,
    pub finished: bool,
}

/// The storage actor as the Raft actor and the peer transport address it: one typed
/// recipient per message, so neither names the other's type (and a router of many groups can
/// stand in for either).
#[derive(Clone)]
pub struct StorageLink {
    pub apply: Recipient<ApplyCommitted>,
    pub install: Recipient<InstallSnapshot>,
    pub open_snapshot: Recipient<OpenSnapshotSource>,
}

/// The Raft actor as the storage actor and the peer transport address it.
#[derive(Clone)]
pub struct RaftLink {
    pub storage_started: Recipient<StorageStarted>,
    pub applied_up_to: Recipient<AppliedUpTo>,
    pub durable_applied: Recipient<DurableApplied>,
    pub step: Recipient<StepPeerMessage>,
    pub unreachable: Recipient<ReportUnreachable>,
    pub snapshot_ended: Recipient<ReportSnapshot>,
}

/// Peer transport → storage actor: capture the volumes for a snapshot transfer.
#[derive(Message)]
#[rtype(result = "Result<crate::storage::snapshot::SnapshotSource, StorageRequestError>")]
pub struct OpenSnapshotSource;

/// Raft actor → storage actor: switch to a received snapshot (Ready order: before any
/// committed entry after it). Answers once the switch is durable.
#[derive(Message)]
#[rtype(result = "Result<(), StorageRequestError>")]
pub struct InstallSnapshot {
    pub staged: crate::storage::snapshot::StagedSnapshot,
    pub metadata: raft::prelude::SnapshotMetadata,
    /// The member directory the snapshot carries, recorded with its conf state.
    pub members: Vec<crate::config::MemberConfig>,
}
