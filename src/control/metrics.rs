//! `GET /metrics` of a server: the process-wide counters of [`crate::metrics`] plus the Raft
//! state, peer replication lag, volume sizes and actor restarts read at scrape time.
//!
//! Raft series: `raftblk_raft_role{role}` (1 for the current role), `raftblk_raft_term`,
//! `raftblk_raft_leader_id`, `raftblk_raft_commit_index`, `raftblk_raft_applied_index`,
//! `raftblk_raft_first_log_index`, `raftblk_raft_last_log_index`,
//! `raftblk_raft_proposals_pending`, `raftblk_raft_healthy` (what `/health` answers),
//! `raftblk_raft_snapshots_sent_total`, `raftblk_raft_snapshots_installed_total`,
//! `raftblk_raft_lease_reads_total`, and on the
//! leader `raftblk_raft_peer_lag_entries{peer}` and `raftblk_raft_peer_matched_index{peer}`.
//! Also `raftblk_volume_size_bytes{volume}` and `raftblk_actor_restarts_total{actor}`.

use crate::actors::messages::RaftStatus;
use crate::actors::supervisor::RestartCounts;
use crate::metrics::Exposition;
use crate::storage::state_machine::VolumeInfo;

const ROLES: [&str; 5] = [
    "Leader",
    "Follower",
    "Candidate",
    "PreCandidate",
    "Restarting",
];

/// Renders the whole exposition of a server.
pub fn render_server_metrics(
    raft: Option<&RaftStatus>,
    volumes: &[VolumeInfo],
    restarts: &RestartCounts,
) -> String {
    let mut out = Exposition::default();
    if let Some(raft) = raft {
        out.header("raftblk_raft_role", "gauge", "1 for this node's Raft role.");
        for role in ROLES {
            let value = if raft.role == role { 1.0 } else { 0.0 };
            out.sample("raftblk_raft_role", &[("role", role)], value);
        }
        for (name, help, value) in [
            ("raftblk_raft_term", "Current Raft term.", raft.term),
            (
                "raftblk_raft_leader_id",
                "Node id of the known leader (0: none).",
                raft.leader_id,
            ),
            (
                "raftblk_raft_commit_index",
                "Highest committed log index known here.",
                raft.commit_index,
            ),
            (
                "raftblk_raft_applied_index",
                "Highest log index applied to the images here.",
                raft.applied_index,
            ),
            (
                "raftblk_raft_first_log_index",
                "First index still in the log.",
                raft.first_log_index,
            ),
            (
                "raftblk_raft_last_log_index",
                "Last index in the log.",
                raft.last_log_index,
            ),
            (
                "raftblk_raft_proposals_pending",
                "Proposals of this node waiting for commit.",
                raft.proposals_pending as u64,
            ),
            (
                "raftblk_raft_healthy",
                "1 while GET /health answers 200.",
                u64::from(raft.health_problem.is_none()),
            ),
        ] {
            out.single(name, "gauge", help, value as f64);
        }
        out.single(
            "raftblk_raft_snapshots_sent_total",
            "counter",
            "Snapshots sent to lagging followers.",
            raft.snapshots_sent as f64,
        );
        out.single(
            "raftblk_raft_snapshots_installed_total",
            "counter",
            "Snapshots installed on this node.",
            raft.snapshots_installed as f64,
        );
        out.single(
            "raftblk_raft_lease_reads_total",
            "counter",
            "Reads answered from the leader's lease, without a ReadIndex round.",
            raft.lease_reads as f64,
        );
        out.header(
            "raftblk_raft_peer_lag_entries",
            "gauge",
            "Entries a follower is behind the leader's last index (leader only).",
        );
        for peer in &raft.peers {
            out.sample(
                "raftblk_raft_peer_lag_entries",
                &[("peer", &peer.id.to_string())],
                raft.last_log_index.saturating_sub(peer.matched) as f64,
            );
        }
        out.header(
            "raftblk_raft_peer_matched_index",
            "gauge",
            "Highest index known replicated on a follower (leader only).",
        );
        for peer in &raft.peers {
            out.sample(
                "raftblk_raft_peer_matched_index",
                &[("peer", &peer.id.to_string())],
                peer.matched as f64,
            );
        }
    }
    out.header("raftblk_volume_size_bytes", "gauge", "Size of each volume.");
    for volume in volumes {
        out.sample(
            "raftblk_volume_size_bytes",
            &[("volume", &volume.name)],
            volume.size_bytes as f64,
        );
    }
    out.header(
        "raftblk_actor_restarts_total",
        "counter",
        "Actor restarts by supervision, by actor kind.",
    );
    for (actor, count) in [
        ("nbd_session", restarts.nbd_session),
        ("raft", restarts.raft),
        ("storage", restarts.storage),
        ("listener", restarts.listener),
        ("peer", restarts.peer),
        ("cache", restarts.cache),
    ] {
        out.sample(
            "raftblk_actor_restarts_total",
            &[("actor", actor)],
            count as f64,
        );
    }
    crate::metrics::global().render(&mut out);
    out.finish()
}
