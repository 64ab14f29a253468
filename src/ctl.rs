//! `raftblk ctl status`: asks every server it can find for its status and health and sums
//! them up as a cluster report, printed as a table (like `ceph -s`) or as JSON.
//!
//! Servers are found from `--control` and from the member lists the answering servers report.
//! A member is `up` (answers and is healthy), `lagging` (answers, but is catching up or more
//! than [`LAGGING_ENTRIES`] behind the leader), `unhealthy` (answers without a working quorum)
//! or `down` (does not answer).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use raftblk::control::ControlClient;

/// A follower further behind the leader's last index than this shows as lagging.
pub const LAGGING_ENTRIES: u64 = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    /// 0 when the server never answered (its id is unknown).
    pub id: u64,
    pub control: String,
    /// "up", "lagging", "unhealthy" or "down".
    pub state: String,
    pub role: Option<String>,
    pub term: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Entries behind the leader (known from the leader's progress only).
    pub lag_entries: Option<u64>,
    /// Why not up: the health reason or the connection error.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// "HEALTH_OK", "HEALTH_WARN" or "HEALTH_ERR".
    pub health: String,
    pub summary: String,
    pub leader_id: Option<u64>,
    pub term: Option<u64>,
    pub members_total: usize,
    pub members_up: usize,
    pub quorum_size: usize,
    pub quorum: bool,
    pub members: Vec<MemberReport>,
    pub volumes: Vec<serde_json::Value>,
}

impl ClusterReport {
    /// The sentence to exit non-zero with, if the cluster cannot serve.
    pub fn failure(&self) -> Option<String> {
        if self.members.iter().all(|member| member.state == "down") {
            let addresses: Vec<&str> = self
                .members
                .iter()
                .map(|member| member.control.as_str())
                .collect();
            return Some(format!(
                "the cluster is unreachable: no server answered at {}",
                addresses.join(", ")
            ));
        }
        if !self.quorum {
            return Some(format!("the cluster has no quorum: {}", self.summary));
        }
        None
    }
}

struct Answer {
    status: serde_json::Value,
    health_problem: Option<String>,
}

fn ask(address: &str, timeout: Duration) -> Result<Answer, String> {
    let client = ControlClient::with_timeout(address, timeout);
    let status = client.status().map_err(|error| error.to_string())?;
    let health_problem = status["raft"]["health_problem"]
        .as_str()
        .map(str::to_string);
    Ok(Answer {
        status,
        health_problem,
    })
}

/// Queries the given servers and the members they report (each once).
pub fn gather(addresses: &[String], timeout: Duration) -> ClusterReport {
    let mut answers: BTreeMap<String, Result<Answer, String>> = BTreeMap::new();
    let mut queue: Vec<String> = addresses.to_vec();
    // Bounded: each address is asked once, and member lists are bounded by the config.
    while let Some(address) = queue.pop() {
        if answers.contains_key(&address) || answers.len() >= 64 {
            continue;
        }
        let answer = ask(&address, timeout);
        if let Ok(answer) = &answer {
            if let Some(members) = answer.status["members"].as_array() {
                for member in members {
                    if let Some(control) = member["control"].as_str() {
                        if !answers.contains_key(control) {
                            queue.push(control.to_string());
                        }
                    }
                }
            }
        }
        answers.insert(address, answer);
    }
    summarize(&answers)
}

fn summarize(answers: &BTreeMap<String, Result<Answer, String>>) -> ClusterReport {
    // The configured member count, from any answer that lists members (else: the servers).
    let configured_members = answers
        .values()
        .filter_map(|answer| answer.as_ref().ok())
        .filter_map(|answer| answer.status["members"].as_array().map(Vec::len))
        .max()
        .unwrap_or(0);
    let leader = answers
        .values()
        .filter_map(|answer| answer.as_ref().ok())
        .filter(|answer| answer.status["raft"]["role"] == "Leader")
        .max_by_key(|answer| answer.status["raft"]["term"].as_u64().unwrap_or(0));
    let leader_id = leader.and_then(|answer| answer.status["raft"]["node_id"].as_u64());
    let leader_last_index = leader
        .and_then(|answer| answer.status["raft"]["last_log_index"].as_u64())
        .unwrap_or(0);
    let mut lag_by_node = BTreeMap::new();
    if let Some(peers) = leader.and_then(|answer| answer.status["raft"]["peers"].as_array()) {
        for peer in peers {
            if let (Some(id), Some(matched)) = (peer["id"].as_u64(), peer["matched"].as_u64()) {
                lag_by_node.insert(id, leader_last_index.saturating_sub(matched));
            }
        }
    }
    if let Some(id) = leader_id {
        lag_by_node.insert(id, 0);
    }
    let mut members: Vec<MemberReport> = answers
        .iter()
        .map(|(control, answer)| match answer {
            Ok(answer) => {
                let raft = &answer.status["raft"];
                let id = raft["node_id"].as_u64().unwrap_or(0);
                let lag_entries = lag_by_node.get(&id).copied();
                let catching_up = answer
                    .health_problem
                    .as_deref()
                    .is_some_and(|problem| problem.starts_with("catching up"));
                let state = if answer.health_problem.is_none()
                    && lag_entries.unwrap_or(0) <= LAGGING_ENTRIES
                {
                    "up"
                } else if catching_up || answer.health_problem.is_none() {
                    "lagging"
                } else {
                    "unhealthy"
                };
                MemberReport {
                    id,
                    control: control.clone(),
                    state: state.to_string(),
                    role: raft["role"].as_str().map(str::to_string),
                    term: raft["term"].as_u64(),
                    commit_index: raft["commit_index"].as_u64(),
                    applied_index: raft["applied_index"].as_u64(),
                    lag_entries,
                    detail: answer.health_problem.clone(),
                }
            }
            Err(error) => MemberReport {
                id: 0,
                control: control.clone(),
                state: "down".to_string(),
                role: None,
                term: None,
                commit_index: None,
                applied_index: None,
                lag_entries: None,
                detail: Some(error.clone()),
            },
        })
        .collect();
    members.sort_by_key(|member| (member.id == 0, member.id, member.control.clone()));
    let members_total = configured_members.max(1).max(members.len());
    let members_up = members
        .iter()
        .filter(|member| member.state == "up" || member.state == "lagging")
        .count();
    let quorum_size = members_total / 2 + 1;
    let leader_healthy = leader.is_some_and(|answer| answer.health_problem.is_none());
    let quorum = leader_healthy && members_up >= quorum_size;
    let not_up: Vec<String> = members
        .iter()
        .filter(|member| member.state != "up")
        .map(|member| match member.id {
            0 => format!("{} {}", member.control, member.state),
            id => format!("member {id} {}", member.state),
        })
        .collect();
    let (health, summary) = if !quorum {
        let reason = if leader.is_none() {
            "no leader among the servers that answered".to_string()
        } else {
            format!("{members_up} of {members_total} members up, {quorum_size} needed")
        };
        ("HEALTH_ERR", reason)
    } else if !not_up.is_empty() {
        ("HEALTH_WARN", not_up.join(", "))
    } else {
        ("HEALTH_OK", format!("all {members_total} members up"))
    };
    let volumes = leader
        .or_else(|| answers.values().find_map(|answer| answer.as_ref().ok()))
        .and_then(|answer| answer.status["volumes"].as_array().cloned())
        .unwrap_or_default();
    ClusterReport {
        health: health.to_string(),
        summary,
        leader_id,
        term: leader.and_then(|answer| answer.status["raft"]["term"].as_u64()),
        members_total,
        members_up,
        quorum_size,
        quorum,
        members,
        volumes,
    }
}

fn optional(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

/// The report as text for a terminal.
pub fn format_table(report: &ClusterReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  health:  {} ({})", report.health, report.summary);
    let _ = match report.leader_id {
        Some(leader) => writeln!(
            out,
            "  leader:  node {leader} (term {})",
            optional(report.term)
        ),
        None => writeln!(out, "  leader:  none"),
    };
    let _ = writeln!(
        out,
        "  quorum:  {} ({} of {} members up, {} needed)",
        if report.quorum { "yes" } else { "NO" },
        report.members_up,
        report.members_total,
        report.quorum_size
    );
    let _ = writeln!(out, "  volumes: {}", report.volumes.len());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>4} {:<22} {:<9} {:<12} {:>6} {:>10} {:>10} {:>8}  DETAIL",
        "ID", "CONTROL", "STATE", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG"
    );
    for member in &report.members {
        let _ = writeln!(
            out,
            "{:>4} {:<22} {:<9} {:<12} {:>6} {:>10} {:>10} {:>8}  {}",
            if member.id == 0 {
                "?".to_string()
            } else {
                member.id.to_string()
            },
            member.control,
            member.state,
            member.role.as_deref().unwrap_or("-"),
            optional(member.term),
            optional(member.commit_index),
            optional(member.applied_index),
            optional(member.lag_entries),
            member.detail.as_deref().unwrap_or("")
        );
    }
    if !report.volumes.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<32} {:>16} ATTACHED", "VOLUME", "SIZE_BYTES");
        for volume in &report.volumes {
            let attached = match volume["attachment"]["client"].as_str() {
                Some(client) => format!(
                    "{client} (epoch {})",
                    volume["attachment"]["epoch"].as_u64().unwrap_or(0)
                ),
                None => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<32} {:>16} {attached}",
                volume["name"].as_str().unwrap_or("?"),
                volume["size_bytes"].as_u64().unwrap_or(0)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(node: u64, role: &str, problem: Option<&str>) -> Result<Answer, String> {
        Ok(Answer {
            status: json!({
                "raft": {"node_id": node, "role": role, "term": 4, "last_log_index": 5000,
                         "commit_index": 5000, "applied_index": 5000,
                         "peers": [{"id": 2, "matched": 5000}, {"id": 3, "matched": 10}]},
                "members": [{"control": "a"}, {"control": "b"}, {"control": "c"}],
                "volumes": [{"name": "disk0", "size_bytes": 1024}]
            }),
            health_problem: problem.map(str::to_string),
        })
    }

    #[test]
    fn a_lagging_member_warns_and_a_lost_majority_is_an_error() {
        let mut answers = BTreeMap::new();
        answers.insert("a".to_string(), answer(1, "Leader", None));
        answers.insert("b".to_string(), answer(2, "Follower", None));
        answers.insert("c".to_string(), answer(3, "Follower", None));
        let report = summarize(&answers);
        assert_eq!(report.health, "HEALTH_WARN");
        assert!(report.quorum);
        assert_eq!(report.members[2].state, "lagging");
        assert!(report.failure().is_none());
        assert!(format_table(&report).contains("member 3 lagging"));

        let mut answers = BTreeMap::new();
        answers.insert(
            "a".to_string(),
            answer(1, "Follower", Some("no leader in term 4")),
        );
        answers.insert("b".to_string(), Err("connection refused".to_string()));
        answers.insert("c".to_string(), Err("connection refused".to_string()));
        let report = summarize(&answers);
        assert_eq!(report.health, "HEALTH_ERR");
        assert!(!report.quorum);
        assert!(report
            .failure()
            .is_some_and(|problem| problem.contains("no quorum")));
    }
}
