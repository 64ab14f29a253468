//! The parts of Raft that are pure rules over log entries and Raft state, apart from the
//! actors that do the I/O: every replica must reach the same answer from the same entry, so
//! these take no clock, no socket and no disk.
//!
//! - [`entry`]: the proposal context every entry carries, and what of a committed entry the
//!   state machine applies (the stale-twin rule).

pub mod compaction;
pub mod core;
pub mod entry;
pub mod lease;
pub mod persist;

use serde::Serialize;

/// Why a proposal or read barrier did not complete. None of these means the data is lost or
/// corrupt; each is either retried by the caller or turned into an NBD errno.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProposalError {
    /// This node is not the Raft leader; `leader_id` is its best guess (0 = unknown).
    #[error("this node is not the Raft leader (leader hint {leader_id})")]
    NotLeader { leader_id: u64 },
    /// The proposal was dropped before it was committed (leader change, actor restart):
    /// proposing it again is safe because an uncommitted write was never acknowledged.
    #[error("the proposal was dropped before commit; retry")]
    Dropped,
    /// The Raft group has too many proposals waiting; the caller backs off.
    #[error("too many proposals are waiting for commit")]
    Overloaded,
    /// The storage layer failed to apply a committed entry. The storage actor restarts and
    /// replays from the log, so retrying is correct here too.
    #[error("storage failed to apply the entry: {0}")]
    Storage(String),
    /// A membership change that cannot be proposed now (another one is pending, the group is
    /// in a joint configuration, or the change is invalid for the current configuration).
    #[error("membership change refused: {0}")]
    ConfChangeRefused(String),
    /// A membership change whose condition does not hold at the moment the leader would
    /// propose it (a learner behind the commit index, voters that would lose their quorum);
    /// it may hold later, so the caller may wait and ask again.
    #[error("membership change not possible now: {0}")]
    ConfChangeNotReady(String),
}

impl ProposalError {
    /// Whether the caller should try again after a short wait.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProposalError::NotLeader { .. })
    }
}

/// What must hold for a membership change, judged by the Raft core on its live state in the
/// same step that proposes it, so that nothing can change between the check and the proposal.
/// A failed check is answered [`ProposalError::ConfChangeNotReady`] with the reason.
pub type ConfChangeCheck = Box<dyn FnOnce(&RaftStatus) -> Result<(), String> + Send>;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RaftStatus {
    pub group_id: u64,
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub proposals_pending: usize,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    /// Reads this node answered from its lease, without a ReadIndex round.
    pub lease_reads: u64,
    /// Replication progress of the other members, known only on the leader.
    pub peers: Vec<PeerProgress>,
    /// The configuration this node applied: voters, learners, and the outgoing voters while
    /// a joint change is being left.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    /// Why this node is not healthy (`GET /health` answers 503 with it), or `None`.
    pub health_problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
    pub next_index: u64,
    /// "Probe", "Replicate" or "Snapshot".
    pub state: String,
    /// Whether the leader heard from it within the last election timeout.
    pub recent_active: bool,
}
