//! What the proxy knows about the cluster, learned from the servers' control API: who leads,
//! every member's NBD address, the volumes. [`ClusterView`] polls `GET /v1/status` of every
//! configured server and every member the servers list (in parallel, each call bounded by a
//! timeout) every
//! `status_poll_interval_ms`, and at once when an upstream connection failed.
//! [`merge_statuses`] is the pure part: many status documents in, one [`ClusterSnapshot`] out.
//!
//! Attach and detach (`POST/DELETE /v1/volumes/{name}/attach`) live here too: they are control
//! API calls sent to the leader first, then to any other server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Notify;

/// One configured server: its control address and, optionally, its NBD address for servers
/// whose status lists no cluster members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    pub control: SocketAddr,
    pub nbd_override: Option<SocketAddr>,
}

impl ServerEndpoint {
    /// Parses `CONTROL` or `CONTROL=NBD` (validated by the configuration already).
    pub fn parse(text: &str) -> Option<ServerEndpoint> {
        let (control, nbd) = match text.split_once('=') {
            Some((control, nbd)) => (control, Some(nbd)),
            None => (text, None),
        };
        Some(ServerEndpoint {
            control: control.trim().parse().ok()?,
            nbd_override: match nbd {
                Some(nbd) => Some(nbd.trim().parse().ok()?),
                None => None,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeSummary {
    pub name: String,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    /// Who holds the volume read-write, as the answering server knows it.
    #[serde(default)]
    pub attachment: Option<AttachmentSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AttachmentSummary {
    pub client: String,
    pub epoch: u64,
}

#[derive(Debug, Deserialize)]
struct StatusRaft {
    node_id: u64,
    #[serde(default)]
    leader_id: u64,
    #[serde(default)]
    term: u64,
}

#[derive(Debug, Deserialize)]
struct StatusMember {
    id: u64,
    nbd: String,
    control: String,
}

/// The parts of `GET /v1/status` the proxy reads; everything else is ignored.
#[derive(Debug, Deserialize)]
struct StatusDocument {
    raft: StatusRaft,
    #[serde(default)]
    members: Vec<StatusMember>,
    #[serde(default)]
    volumes: Vec<VolumeSummary>,
}

/// The cluster as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// 0 when no reachable server knows a leader.
    pub leader_id: u64,
    pub term: u64,
    /// Where to send NBD traffic, best first: the leader, then every other reachable server
    /// (followers forward proposals and serve reads after a ReadIndex round).
    pub nbd_candidates: Vec<SocketAddr>,
    /// Control addresses, best first (the leader's first).
    pub control_candidates: Vec<SocketAddr>,
    pub volumes: Vec<VolumeSummary>,
    pub servers_reachable: usize,
    /// The control address of every member any reachable server lists: polled too, so the
    /// proxy follows members added after it started.
    pub member_controls: Vec<SocketAddr>,
}

impl ClusterSnapshot {
    /// The leader's NBD address, if a leader is known and its address too.
    pub fn leader_nbd(&self, leader_known: bool) -> Option<SocketAddr> {
        if leader_known && self.leader_id != 0 {
            self.nbd_candidates.first().copied()
        } else {
            None
        }
    }
}

/// Merges the status documents of the configured servers (`None`: unreachable or unparsable)
/// into one view. The leader is the one named by the reachable server with the highest term.
pub fn merge_statuses(
    endpoints: &[ServerEndpoint],
    statuses: &[Option<serde_json::Value>],
) -> (ClusterSnapshot, bool) {
    let mut snapshot = ClusterSnapshot::default();
    let documents: Vec<(usize, StatusDocument)> = statuses
        .iter()
        .enumerate()
        .filter_map(|(index, status)| {
            let document = serde_json::from_value(status.clone()?).ok()?;
            Some((index, document))
        })
        .collect();
    snapshot.servers_reachable = documents.len();
    // Addresses by node id: from any member list, then from the configured overrides.
    let mut nbd_by_node: Vec<(u64, SocketAddr)> = Vec::new();
    let mut control_by_node: Vec<(u64, SocketAddr)> = Vec::new();
    for (_, document) in &documents {
        for member in &document.members {
            if let Ok(nbd) = member.nbd.parse() {
                nbd_by_node.push((member.id, nbd));
            }
            if let Ok(control) = member.control.parse() {
                control_by_node.push((member.id, control));
            }
        }
    }
    for (index, document) in &documents {
        let endpoint = &endpoints[*index];
        if let Some(nbd) = endpoint.nbd_override {
            // An explicit address wins over what the member list says (test relays).
            nbd_by_node.retain(|(id, _)| *id != document.raft.node_id);
            nbd_by_node.push((document.raft.node_id, nbd));
        }
        if !control_by_node
            .iter()
            .any(|(id, _)| *id == document.raft.node_id)
        {
            control_by_node.push((document.raft.node_id, endpoint.control));
        }
    }
    let address_of = |table: &[(u64, SocketAddr)], node: u64| {
        table
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, address)| *address)
    };
    let best = documents
        .iter()
        .filter(|(_, document)| document.raft.leader_id != 0)
        .max_by_key(|(_, document)| document.raft.term);
    let mut leader_known = false;
    if let Some((_, document)) = best {
        snapshot.leader_id = document.raft.leader_id;
        snapshot.term = document.raft.term;
        if let Some(nbd) = address_of(&nbd_by_node, snapshot.leader_id) {
            snapshot.nbd_candidates.push(nbd);
            leader_known = true;
        }
        if let Some(control) = address_of(&control_by_node, snapshot.leader_id) {
            snapshot.control_candidates.push(control);
        }
        // The leader's volume table is the freshest.
        if let Some((_, leader_document)) = documents
            .iter()
            .find(|(_, document)| document.raft.node_id == snapshot.leader_id)
        {
            snapshot.volumes = leader_document.volumes.clone();
        }
    }
    for (index, document) in &documents {
        if let Some(nbd) = address_of(&nbd_by_node, document.raft.node_id) {
            if !snapshot.nbd_candidates.contains(&nbd) {
                snapshot.nbd_candidates.push(nbd);
            }
        }
        let control = endpoints[*index].control;
        if !snapshot.control_candidates.contains(&control) {
            snapshot.control_candidates.push(control);
        }
        if snapshot.volumes.is_empty() {
            snapshot.volumes = document.volumes.clone();
        }
    }
    for (_, control) in &control_by_node {
        if !snapshot.member_controls.contains(control) {
            snapshot.member_controls.push(*control);
        }
    }
    // Unreachable servers last: an attach may still get through to them.
    for endpoint in endpoints {
        if !snapshot.control_candidates.contains(&endpoint.control) {
            snapshot.control_candidates.push(endpoint.control);
        }
    }
    (snapshot, leader_known)
}

/// The shared, periodically refreshed view of the cluster.
#[derive(Clone)]
pub struct ClusterView {
    inner: Arc<ClusterViewInner>,
}

struct ClusterViewInner {
    /// The servers from the configuration: always polled.
    configured: Vec<ServerEndpoint>,
    /// Members learned from the last poll's member lists and not configured.
    learned: Mutex<Vec<ServerEndpoint>>,
    control_timeout: Duration,
    /// The cluster's `control.token`, sent with attach and detach.
    token: String,
    snapshot: Mutex<(ClusterSnapshot, bool, Option<Instant>)>,
    refresh_requested: Notify,
    refreshed: Notify,
}

impl ClusterView {
    pub fn new(endpoints: Vec<ServerEndpoint>, control_timeout: Duration, token: String) -> Self {
        ClusterView {
            inner: Arc::new(ClusterViewInner {
                configured: endpoints,
                learned: Mutex::new(Vec::new()),
                control_timeout,
                token,
                snapshot: Mutex::new((ClusterSnapshot::default(), false, None)),
                refresh_requested: Notify::new(),
                refreshed: Notify::new(),
            }),
        }
    }

    pub fn control_timeout(&self) -> Duration {
        self.inner.control_timeout
    }

    /// The control token for attach and detach (empty: none).
    pub fn token(&self) -> String {
        self.inner.token.clone()
    }

    /// The last snapshot and whether the leader's NBD address is in it.
    /// Whether the leader's last status names a client other than `client_id` as the holder
    /// of `volume` (without copying the snapshot: asked before every cached read).
    pub fn held_by_other(&self, volume: &str, client_id: &str) -> bool {
        let guard = self.inner.snapshot.lock();
        let (snapshot, leader_known) = (&guard.0, guard.1);
        leader_known
            && snapshot.volumes.iter().any(|summary| {
                summary.name == volume
                    && summary
                        .attachment
                        .as_ref()
                        .is_some_and(|holder| holder.client != client_id)
            })
    }

    pub fn snapshot(&self) -> (ClusterSnapshot, bool) {
        let guard = self.inner.snapshot.lock();
        (guard.0.clone(), guard.1)
    }

    /// Asks the poller for a fresh snapshot and waits for it (at most `wait`).
    pub async fn refresh(&self, wait: Duration) {
        let refreshed = self.inner.refreshed.notified();
        self.inner.refresh_requested.notify_one();
        let _ = tokio::time::timeout(wait, refreshed).await;
    }

    /// Polls once now.
    pub async fn poll_once(&self) {
        let mut endpoints = self.inner.configured.clone();
        endpoints.extend(self.inner.learned.lock().iter().cloned());
        let mut polls = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let control = endpoint.control;
            let timeout = self.inner.control_timeout;
            polls.push(tokio::task::spawn_blocking(move || {
                fetch_status(control, timeout).ok()
            }));
        }
        let mut statuses = Vec::with_capacity(polls.len());
        for poll in polls {
            statuses.push(poll.await.ok().flatten());
        }
        let (snapshot, leader_known) = merge_statuses(&endpoints, &statuses);
        if snapshot.servers_reachable > 0 {
            // Members removed from the group drop out; never the configured servers.
            *self.inner.learned.lock() = snapshot
                .member_controls
                .iter()
                .filter(|control| {
                    !self
                        .inner
                        .configured
                        .iter()
                        .any(|endpoint| endpoint.control == **control)
                })
                .map(|control| ServerEndpoint {
                    control: *control,
                    nbd_override: None,
                })
                .collect();
        }
        *self.inner.snapshot.lock() = (snapshot, leader_known, Some(Instant::now()));
        self.inner.refreshed.notify_waiters();
    }

    /// Polls every `interval`, and whenever a refresh is requested, until the process ends.
    pub async fn run(self, interval: Duration, logger: slog::Logger) {
        let mut last_leader = 0;
        loop {
            self.poll_once().await;
            let (snapshot, _) = self.snapshot();
            if snapshot.leader_id != last_leader {
                slog::info!(logger, "cluster leader"; "leader_id" => snapshot.leader_id,
                    "term" => snapshot.term,
                    "nbd" => format!("{:?}", snapshot.nbd_candidates.first()),
                    "servers_reachable" => snapshot.servers_reachable);
                last_leader = snapshot.leader_id;
            }
            let _ = tokio::time::timeout(interval, self.inner.refresh_requested.notified()).await;
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(timeout).build()
}

/// Adds `Authorization: Bearer` when the cluster has a token.
fn authorized(request: ureq::Request, token: &str) -> ureq::Request {
    if token.is_empty() {
        request
    } else {
        request.set("Authorization", &format!("Bearer {token}"))
    }
}

/// `GET /v1/status` of one server (blocking; run it on the blocking pool).
pub fn fetch_status(control: SocketAddr, timeout: Duration) -> Result<serde_json::Value, String> {
    agent(timeout)
        .get(&format!("http://{control}/v1/status"))
        .call()
        .map_err(|error| error.to_string())?
        .into_json()
        .map_err(|error| error.to_string())
}

/// Why an attach did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// 409: another client holds the volume; the server's message says who.
    #[error("{0}")]
    Refused(String),
    /// 404 with an error body: there is no such volume.
    #[error("{0}")]
    NoSuchVolume(String),
    /// 404 without an error body: the server has no attach endpoint (no writer fencing); the
    /// proxy then uses the anonymous export.
    #[error("the server does not support attaching volumes")]
    Unsupported,
    /// Network error or a server error: worth retrying on another server.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Deserialize)]
struct AttachReply {
    epoch: u64,
}

#[derive(Debug, Deserialize)]
struct ErrorReply {
    error: String,
}

/// `POST /v1/volumes/{name}/attach` on one server (blocking). Returns the epoch.
/// `attach_id` is the same for every server tried for one attach (see `Command::Attach`).
pub fn attach_once(
    control: SocketAddr,
    volume_name: &str,
    client_id: &str,
    force: bool,
    attach_id: u64,
    timeout: Duration,
    token: &str,
) -> Result<u64, AttachError> {
    let request = agent(timeout).post(&format!("http://{control}/v1/volumes/{volume_name}/attach"));
    let result = authorized(request, token).send_json(serde_json::json!({
        "client": client_id,
        "force": force,
        "attach_id": attach_id,
    }));
    match result {
        Ok(response) => response
            .into_json::<AttachReply>()
            .map(|reply| reply.epoch)
            .map_err(|error| AttachError::Unavailable(format!("bad attach reply: {error}"))),
        Err(ureq::Error::Status(status, response)) => {
            let body = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<ErrorReply>(&body).map(|reply| reply.error);
            match (status, message) {
                (409, Ok(message)) => Err(AttachError::Refused(message)),
                (409, Err(_)) => Err(AttachError::Refused(body)),
                (404, Ok(message)) => Err(AttachError::NoSuchVolume(message)),
                (404, Err(_)) => Err(AttachError::Unsupported),
                // The same token goes to every server: another one will not take it either.
                (401 | 403, Ok(message)) => Err(AttachError::Refused(format!(
                    "{message} (set control.token in the proxy's --config, or RAFTBLK_TOKEN)"
                ))),
                (status, Ok(message)) => {
                    Err(AttachError::Unavailable(format!("{status}: {message}")))
                }
                (status, Err(_)) => Err(AttachError::Unavailable(format!("{status}: {body}"))),
            }
        }
        Err(error) => Err(AttachError::Unavailable(error.to_string())),
    }
}

/// `DELETE /v1/volumes/{name}/attach?epoch=N` on one server (blocking).
pub fn detach_once(
    control: SocketAddr,
    volume_name: &str,
    epoch: u64,
    timeout: Duration,
    token: &str,
) -> Result<(), String> {
    let request = agent(timeout).delete(&format!(
        "http://{control}/v1/volumes/{volume_name}/attach?epoch={epoch}"
    ));
    authorized(request, token)
        .call()
        .map(|_| ())
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint(control: &str) -> ServerEndpoint {
        ServerEndpoint::parse(control).expect("valid")
    }

    fn status(node: u64, leader: u64, term: u64) -> serde_json::Value {
        json!({
            "raft": {"node_id": node, "leader_id": leader, "term": term, "role": "Follower"},
            "members": [
                {"id": 1, "peer": "127.0.0.1:1", "nbd": "127.0.0.1:11", "control": "127.0.0.1:21"},
                {"id": 2, "peer": "127.0.0.1:2", "nbd": "127.0.0.1:12", "control": "127.0.0.1:22"},
                {"id": 3, "peer": "127.0.0.1:3", "nbd": "127.0.0.1:13", "control": "127.0.0.1:23"}
            ],
            "volumes": [{"name": "disk0", "size_bytes": 1024, "block_size_bytes": 512, "id": 1}]
        })
    }

    #[test]
    fn the_leader_of_the_highest_term_comes_first_then_every_reachable_server() {
        let endpoints = vec![
            endpoint("127.0.0.1:21"),
            endpoint("127.0.0.1:22"),
            endpoint("127.0.0.1:23"),
        ];
        // Node 1 still believes in an old leader; node 2 knows the new one (3, term 5); node 3
        // is unreachable.
        let statuses = vec![Some(status(1, 1, 4)), Some(status(2, 3, 5)), None];
        let (snapshot, leader_known) = merge_statuses(&endpoints, &statuses);
        assert!(leader_known);
        assert_eq!(snapshot.leader_id, 3);
        assert_eq!(
            snapshot.nbd_candidates,
            vec![
                "127.0.0.1:13".parse().unwrap(),
                "127.0.0.1:11".parse().unwrap(),
                "127.0.0.1:12".parse().unwrap()
            ]
        );
        assert_eq!(
            snapshot.control_candidates[0],
            "127.0.0.1:23".parse().unwrap()
        );
        assert_eq!(snapshot.servers_reachable, 2);
        assert_eq!(snapshot.volumes[0].name, "disk0");
    }

    /// A one-voter server whose status lists no members: its NBD address comes from the
    /// `CONTROL=NBD` form of `proxy.servers`.
    #[test]
    fn servers_without_member_lists_use_the_configured_nbd_address() {
        let endpoints = vec![endpoint("127.0.0.1:21=127.0.0.1:11")];
        let statuses = vec![Some(json!({
            "raft": {"node_id": 1, "leader_id": 1, "term": 2},
            "volumes": []
        }))];
        let (snapshot, leader_known) = merge_statuses(&endpoints, &statuses);
        assert!(leader_known);
        assert_eq!(
            snapshot.leader_nbd(leader_known),
            Some("127.0.0.1:11".parse().unwrap())
        );
        let (snapshot, leader_known) = merge_statuses(&endpoints, &[None]);
        assert!(!leader_known);
        assert!(snapshot.nbd_candidates.is_empty());
        assert_eq!(snapshot.control_candidates.len(), 1);
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            ServerEndpoint::parse("127.0.0.1:10810=127.0.0.1:10809"),
            Some(ServerEndpoint {
                control: "127.0.0.1:10810".parse().unwrap(),
                nbd_override: Some("127.0.0.1:10809".parse().unwrap()),
            })
        );
        assert_eq!(ServerEndpoint::parse("localhost"), None);
    }
}
