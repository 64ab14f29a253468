//! Several `raftblk server` processes forming one Raft group on loopback, and the client-side
//! `raftblk proxy`, driven from the outside the way an operator would.
//!
//! - [`Cluster`]: writes one config file per node (`[node] [nbd] [control] [peer] [cluster]
//!   [raft] [default_volume]`, ports picked free on 127.0.0.1), starts every node, finds the
//!   leader through `GET /v1/status`, kills (`kill -9`), stops (SIGTERM) and restarts nodes on
//!   their data, and compares replicas through `GET /v1/volumes/{name}/digest`.
//! - With [`ClusterOptions::relays`], node i dials node j through its own [`Relay`] (i, j)
//!   (`[peer] connect_overrides`), so a test can partition any node from any other.
//! - [`ProxyProcess`]: `raftblk proxy` in front of the cluster.
//!
//! Invariant: every wait has a deadline and fails saying what it waited for; every process is
//! killed when its owner is dropped, and its log is printed if the test is failing.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::relay::{Relay, RelayMode};
use super::{
    append_to_file, pick_free_port, send_signal, server_program, truncate_for_display,
    wait_for_listener, wait_with_timeout, NbdClient, DEFAULT_EXPORT_NAME, MIB,
    SERVER_READY_TIMEOUT, SERVER_SHUTDOWN_TIMEOUT,
};

/// Timeout of one control API request made by the harness.
const CONTROL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the harness polls a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes of each process log printed when a test fails.
const LOG_TAIL_BYTES: usize = 24 * 1024;

// ---------------------------------------------------------------------------------------------
// Control API over HTTP
// ---------------------------------------------------------------------------------------------

fn http_agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(1))
        .timeout(CONTROL_REQUEST_TIMEOUT)
        .build()
}

/// An HTTP answer: status code and JSON body (`Null` if the body is not JSON).
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: serde_json::Value,
}

fn into_answer(result: Result<ureq::Response, ureq::Error>) -> Result<HttpAnswer, String> {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => return Err(error.to_string()),
    };
    let status = response.status();
    let text = response
        .into_string()
        .map_err(|error| format!("reading the body: {error}"))?;
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok(HttpAnswer { status, body })
}

/// `GET http://ADDRESS/PATH`; `Err` only for transport failures (refused, timed out).
pub fn http_get(address: SocketAddr, path: &str) -> Result<HttpAnswer, String> {
    into_answer(http_agent().get(&format!("http://{address}{path}")).call())
}

/// `POST http://ADDRESS/PATH` with a JSON body.
pub fn http_post(
    address: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<HttpAnswer, String> {
    into_answer(
        http_agent()
            .post(&format!("http://{address}{path}"))
            .send_json(body.clone()),
    )
}

/// `POST http://ADDRESS/PATH` with a JSON body, for a request the server may hold for up to
/// `timeout` before it answers.
pub fn http_post_slow(
    address: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<HttpAnswer, String> {
    into_answer(
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout(timeout)
            .build()
            .post(&format!("http://{address}{path}"))
            .send_json(body.clone()),
    )
}

/// `DELETE http://ADDRESS/PATH`.
pub fn http_delete(address: SocketAddr, path: &str) -> Result<HttpAnswer, String> {
    into_answer(
        http_agent()
            .delete(&format!("http://{address}{path}"))
            .call(),
    )
}

/// The Raft part of `GET /v1/status`.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    /// 0 when the node knows no leader.
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    pub lease_reads: u64,
    pub volume_names: Vec<String>,
    pub json: serde_json::Value,
}

impl NodeStatus {
    pub fn parse(json: serde_json::Value) -> Result<NodeStatus, String> {
        let raft = &json["raft"];
        if !raft.is_object() {
            return Err(format!("no \"raft\" object in the status: {json}"));
        }
        let number = |key: &str| raft[key].as_u64().unwrap_or(0);
        let role = raft["role"]
            .as_str()
            .ok_or_else(|| format!("no raft.role in the status: {json}"))?
            .to_owned();
        let volume_names = json["volumes"]
            .as_array()
            .map(|volumes| {
                volumes
                    .iter()
                    .filter_map(|volume| volume["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(NodeStatus {
            node_id: number("node_id"),
            role,
            term: number("term"),
            leader_id: number("leader_id"),
            commit_index: number("commit_index"),
            applied_index: number("applied_index"),
            first_log_index: number("first_log_index"),
            last_log_index: number("last_log_index"),
            snapshots_sent: number("snapshots_sent"),
            snapshots_installed: number("snapshots_installed"),
            lease_reads: number("lease_reads"),
            volume_names,
            json,
        })
    }

    pub fn is_leader(&self) -> bool {
        self.role == "Leader"
    }
}

/// `GET /v1/volumes/{name}/digest` of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaDigest {
    pub node_id: u64,
    pub applied_index: u64,
    pub digest: String,
    pub size_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// How to build a cluster. `settings` override or add config keys per section, as TOML values
/// (`("raft", "log_keep_entries", "8")`).
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub node_count: usize,
    /// Size of the default volume `disk0`.
    pub volume_size_bytes: u64,
    /// Put a [`Relay`] on every directed peer link.
    pub relays: bool,
    /// Apply [`HARNESS_SETTINGS`] (quick failover, small memtables and checkpoints). Off for
    /// benchmarks, which measure the embedded defaults.
    pub harness_settings: bool,
    pub settings: Vec<(String, String, String)>,
    /// Mutual TLS between the servers: a certificate authority in the workspace (`ca/`) and a
    /// node certificate in each node's `data/tls`, made with `raftblk ctl certs`.
    pub peer_tls: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            node_count: 3,
            volume_size_bytes: 64 * MIB,
            relays: false,
            harness_settings: true,
            settings: Vec::new(),
            peer_tls: false,
        }
    }
}

impl ClusterOptions {
    pub fn with_relays(mut self) -> Self {
        self.relays = true;
        self
    }

    pub fn set(mut self, section: &str, key: &str, toml_value: &str) -> Self {
        self.settings
            .push((section.to_owned(), key.to_owned(), toml_value.to_owned()));
        self
    }
}

/// Settings every test cluster gets unless a test overrides them. Short Raft timeouts keep
/// failovers quick; a 50 ms tick with 10 election ticks still leaves 500 ms of slack for a
/// machine shared by several builds.
const HARNESS_SETTINGS: &[(&str, &str, &str)] = &[
    ("raft", "tick_interval_ms", "50"),
    ("raft", "election_ticks", "10"),
    ("raft", "heartbeat_ticks", "2"),
    // A request that cannot commit in this time gets ESHUTDOWN (retry elsewhere) rather than
    // hanging the test client for the 30 s default.
    ("nbd", "request_timeout_ms", "10000"),
    ("peer", "connect_timeout_ms", "500"),
    ("peer", "reconnect_backoff_max_ms", "200"),
    ("storage", "rocksdb_write_buffer_bytes", "33554432"),
    ("storage", "checkpoint_bytes", "8388608"),
    ("log", "level", "\"info\""),
];

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// A node stopped by [`ClusterNode::pause`]; it runs again (SIGCONT) when this is dropped,
/// also when the test fails while it is stopped.
pub struct PausedNode {
    process_id: u32,
}

impl Drop for PausedNode {
    fn drop(&mut self) {
        let _ = send_signal(self.process_id, libc::SIGCONT);
    }
}

/// One server of the cluster: fixed addresses (they are in every node's `cluster.members`),
/// a data directory that survives restarts, and at most one running process.
pub struct ClusterNode {
    pub id: u64,
    pub nbd_address: SocketAddr,
    pub control_address: SocketAddr,
    pub peer_address: SocketAddr,
    pub config_path: PathBuf,
    pub data_directory: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    start_count: u32,
}

impl ClusterNode {
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn uri(&self, export_name: &str) -> String {
        format!("nbd://{}/{export_name}", self.nbd_address)
    }

    pub fn status(&self) -> Result<NodeStatus, String> {
        let answer = http_get(self.control_address, "/v1/status")?;
        if answer.status != 200 {
            return Err(format!("status {}: {}", answer.status, answer.body));
        }
        NodeStatus::parse(answer.body)
    }

    /// `GET /v1/volumes/{volume}/digest`.
    pub fn digest(&self, volume: &str) -> Result<ReplicaDigest, String> {
        let answer = http_get(
            self.control_address,
            &format!("/v1/volumes/{volume}/digest"),
        )?;
        if answer.status != 200 {
            return Err(format!(
                "node {}: digest of {volume} answered {}: {}",
                self.id, answer.status, answer.body
            ));
        }
        let body = &answer.body;
        Ok(ReplicaDigest {
            node_id: self.id,
            applied_index: body["applied_index"]
                .as_u64()
                .ok_or_else(|| format!("no applied_index in {body}"))?,
            digest: body["digest"]
                .as_str()
                .ok_or_else(|| format!("no digest in {body}"))?
                .to_owned(),
            size_bytes: body["size_bytes"].as_u64().unwrap_or(0),
        })
    }

    fn append_to_log(&self, text: &str) {
        append_to_file(&self.log_path, text);
    }

    /// Starts the process without waiting for it.
    #[track_caller]
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.start_count += 1;
        self.append_to_log(&format!(
            "=== test harness: node {} start #{} ===\n",
            self.id, self.start_count
        ));
        let ready_path = self
            .log_path
            .with_file_name(format!("ready-{}-{}.json", self.id, self.start_count));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the node log");
        let log_for_stderr = log.try_clone().expect("clone the node log handle");
        let mut command = Command::new(server_program());
        command
            .arg("server")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&ready_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start node {}: {command:?}: {error}", self.id));
        self.child = Some(child);
    }

    /// Starts the process and waits until its control API answers `/v1/status`.
    #[track_caller]
    fn spawn_and_wait_ready(&mut self) {
        self.spawn();
        let description = format!("node {} ({})", self.id, self.config_path.display());
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "node {} exited ({status}) before its control API answered: {description}\n\
                     --- node log ---\n{}",
                    self.id,
                    truncate_for_display(&self.log_text())
                );
            }
            if self.status().is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {} did not answer GET /v1/status within {SERVER_READY_TIMEOUT:?}: \
                     {description}\n--- node log ---\n{}",
                    self.id,
                    truncate_for_display(&self.log_text())
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Stops the process (SIGSTOP) until the guard is dropped (SIGCONT): a node that falls
    /// behind while its peers go on, without a crash or a restart.
    #[track_caller]
    pub fn pause(&self) -> PausedNode {
        let process_id = self
            .pid()
            .unwrap_or_else(|| panic!("pause: node {} is not running", self.id));
        send_signal(process_id, libc::SIGSTOP).expect("send SIGSTOP to the node");
        self.append_to_log("=== test harness: SIGSTOP ===\n");
        PausedNode { process_id }
    }

    /// `kill -9` and reap; returns the exit status.
    #[track_caller]
    fn kill_9(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("kill_9: node {} is not running", self.id));
        let _ = send_signal(child.id(), libc::SIGKILL);
        let status = child.wait().expect("reap the killed node");
        self.append_to_log(&format!("=== test harness: kill -9 -> {status} ===\n"));
        status
    }

    #[track_caller]
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("terminate: node {} is not running", self.id));
        send_signal(child.id(), libc::SIGTERM).expect("send SIGTERM to the node");
        let status = match wait_with_timeout(&mut child, SERVER_SHUTDOWN_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not exit within {SERVER_SHUTDOWN_TIMEOUT:?} of SIGTERM\n\
                     --- node log ---\n{}",
                    self.id,
                    truncate_for_display(&self.log_text())
                );
            }
        };
        self.append_to_log(&format!("=== test harness: SIGTERM -> {status} ===\n"));
        status
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// N servers of one Raft group on loopback; see the module documentation.
pub struct Cluster {
    workspace: tempfile::TempDir,
    pub nodes: Vec<ClusterNode>,
    /// Directed peer links: `(from, to)` → the relay node `from` dials to reach `to`.
    relays: BTreeMap<(u64, u64), Relay>,
    pub options: ClusterOptions,
}

impl Cluster {
    /// Writes the configs, starts every node, and waits until a leader exists and every node
    /// has applied the creation of the default volume.
    #[track_caller]
    pub fn start(options: ClusterOptions) -> Cluster {
        let workspace = tempfile::Builder::new()
            .prefix("raftblk-cluster-")
            .tempdir()
            .expect("create the cluster's temporary directory");
        let address = |port: u16| -> SocketAddr {
            format!("127.0.0.1:{port}").parse().expect("socket address")
        };
        let mut nodes = Vec::new();
        for index in 0..options.node_count {
            let id = index as u64 + 1;
            let directory = workspace.path().join(format!("node{id}"));
            fs::create_dir_all(&directory).expect("create the node directory");
            nodes.push(ClusterNode {
                id,
                nbd_address: address(pick_free_port()),
                control_address: address(pick_free_port()),
                peer_address: address(pick_free_port()),
                config_path: directory.join("raftblk.toml"),
                data_directory: directory.join("data"),
                log_path: directory.join("server.log"),
                child: None,
                start_count: 0,
            });
        }
        let mut relays = BTreeMap::new();
        if options.relays {
            for from in &nodes {
                for to in &nodes {
                    if from.id != to.id {
                        relays.insert((from.id, to.id), Relay::start(to.peer_address));
                    }
                }
            }
        }
        let mut cluster = Cluster {
            workspace,
            nodes,
            relays,
            options,
        };
        if cluster.options.peer_tls {
            let authority = cluster.workspace.path().join("ca");
            run_certs(&["init", &authority.display().to_string()]);
            for node in &cluster.nodes {
                run_certs(&[
                    "issue",
                    "--ca",
                    &authority.display().to_string(),
                    "--out",
                    &node.data_directory.join("tls").display().to_string(),
                    "--node",
                    &node.id.to_string(),
                    "--host",
                    "127.0.0.1",
                ]);
            }
            cluster
                .options
                .settings
                .push(("tls".into(), "peers".into(), "true".into()));
        }
        for node in &cluster.nodes {
            let text = cluster.config_text(node.id);
            fs::write(&node.config_path, text).expect("write the node config");
        }
        // Spawn every node before waiting for any: a node of a new cluster may wait for its
        // peers before it answers.
        for node in &mut cluster.nodes {
            node.spawn();
        }
        let all = cluster.node_ids();
        cluster.wait_until(
            "every node answering GET /v1/status",
            SERVER_READY_TIMEOUT,
            |cluster| {
                cluster.assert_all_alive("while starting");
                cluster.nodes.iter().all(|node| node.status().is_ok())
            },
        );
        cluster.wait_for_leader(&all, SERVER_READY_TIMEOUT);
        cluster.wait_for_volume_everywhere(DEFAULT_EXPORT_NAME, SERVER_READY_TIMEOUT);
        cluster
    }

    /// The config file of node `id`.
    fn config_text(&self, id: u64) -> String {
        let node = self.node(id);
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut set = |section: &str, key: &str, value: String| {
            let entries = sections.entry(section.to_owned()).or_default();
            entries.retain(|(existing, _)| existing != key);
            entries.push((key.to_owned(), value));
        };
        let quoted = |text: String| format!("{text:?}");
        set("node", "id", id.to_string());
        set(
            "node",
            "data_dir",
            quoted(node.data_directory.display().to_string()),
        );
        set("nbd", "listen", quoted(node.nbd_address.to_string()));
        set(
            "control",
            "listen",
            quoted(node.control_address.to_string()),
        );
        set("peer", "listen", quoted(node.peer_address.to_string()));
        let overrides: Vec<String> = self
            .relays
            .iter()
            .filter(|((from, _), _)| *from == id)
            .map(|((_, to), relay)| {
                format!("{{ id = {to}, address = \"{}\" }}", relay.listen_address)
            })
            .collect();
        if !overrides.is_empty() {
            set(
                "peer",
                "connect_overrides",
                format!("[{}]", overrides.join(", ")),
            );
        }
        let members: Vec<String> = self
            .nodes
            .iter()
            .map(|member| {
                format!(
                    "{{ id = {}, peer = \"{}\", nbd = \"{}\", control = \"{}\" }}",
                    member.id, member.peer_address, member.nbd_address, member.control_address
                )
            })
            .collect();
        set("cluster", "members", format!("[{}]", members.join(", ")));
        set(
            "default_volume",
            "size_bytes",
            self.options.volume_size_bytes.to_string(),
        );
        if self.options.harness_settings {
            for (section, key, value) in HARNESS_SETTINGS {
                set(section, key, (*value).to_owned());
            }
        }
        for (section, key, value) in &self.options.settings {
            set(section, key, value.clone());
        }
        let mut text = String::from("# Written by the cluster test harness.\n");
        for (section, entries) in &sections {
            text.push_str(&format!("\n[{section}]\n"));
            for (key, value) in entries {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text
    }

    pub fn workspace(&self) -> &Path {
        self.workspace.path()
    }

    /// Creates node `max id + 1` with fresh addresses and starts it with `cluster.join = true`
    /// (its config lists every node, itself included), waiting until its control API answers.
    /// It is not a member until someone adds it (`raftblk ctl members add`).
    #[track_caller]
    pub fn start_joining_node(&mut self) -> u64 {
        let id = self.nodes.iter().map(|node| node.id).max().unwrap_or(0) + 1;
        let address = |port: u16| -> SocketAddr {
            format!("127.0.0.1:{port}").parse().expect("socket address")
        };
        let directory = self.workspace.path().join(format!("node{id}"));
        fs::create_dir_all(&directory).expect("create the node directory");
        self.nodes.push(ClusterNode {
            id,
            nbd_address: address(pick_free_port()),
            control_address: address(pick_free_port()),
            peer_address: address(pick_free_port()),
            config_path: directory.join("raftblk.toml"),
            data_directory: directory.join("data"),
            log_path: directory.join("server.log"),
            child: None,
            start_count: 0,
        });
        let text = self
            .config_text(id)
            .replacen("\n[cluster]\n", "\n[cluster]\njoin = true\n", 1);
        assert!(
            text.contains("join = true"),
            "the config has a [cluster] section"
        );
        fs::write(&self.node(id).config_path, text).expect("write the node config");
        self.node_mut(id).spawn_and_wait_ready();
        id
    }

    /// The `--member-control`, `--peer`, `--nbd` and `--id` arguments that describe node `id`
    /// to `raftblk ctl members add|replace`.
    pub fn member_arguments(&self, id: u64) -> Vec<String> {
        let node = self.node(id);
        vec![
            "--id".into(),
            id.to_string(),
            "--peer".into(),
            node.peer_address.to_string(),
            "--nbd".into(),
            node.nbd_address.to_string(),
            "--member-control".into(),
            node.control_address.to_string(),
        ]
    }

    /// Runs `raftblk ctl members --control <every node> ARGS` and returns its stdout, failing
    /// with its output when it exits non-zero.
    #[track_caller]
    pub fn ctl_members(&self, arguments: &[String]) -> String {
        let output = Command::new(server_program())
            .arg("ctl")
            .arg("members")
            .arg("--control")
            .arg(self.control_addresses_list())
            .args(arguments)
            .stdin(Stdio::null())
            .output()
            .expect("run raftblk ctl members");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "raftblk ctl members {arguments:?} failed ({}):\n{stdout}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.describe_statuses()
        );
        stdout
    }

    /// Stops node `id` for good (SIGTERM) and forgets it: for a member that was removed.
    #[track_caller]
    pub fn retire(&mut self, id: u64) {
        self.terminate(id);
        self.nodes.retain(|node| node.id != id);
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    #[track_caller]
    pub fn node(&self, id: u64) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    #[track_caller]
    fn node_mut(&mut self, id: u64) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn running_ids(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|node| node.is_running().then_some(node.id))
            .collect()
    }

    /// Control addresses of all members, comma-separated (for `raftblk proxy --servers`).
    pub fn control_addresses_list(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.control_address.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// NBD addresses of all members, comma-separated.
    pub fn nbd_addresses_list(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.nbd_address.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn status(&self, id: u64) -> Result<NodeStatus, String> {
        self.node(id).status()
    }

    /// Fails the test, with the node's log, if a node that should run has exited.
    #[track_caller]
    pub fn assert_all_alive(&mut self, context: &str) {
        for node in &mut self.nodes {
            let exited = node
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                node.child = None;
                panic!(
                    "node {} exited by itself ({status}) {context}\n--- node log ---\n{}",
                    node.id,
                    truncate_for_display(&node.log_text())
                );
            }
        }
    }

    /// Polls `condition` until it holds; fails naming `what` after `timeout`.
    #[track_caller]
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&mut Cluster) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !condition(self) {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.describe_statuses()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// One line per node: its status or why there is none.
    pub fn describe_statuses(&self) -> String {
        self.nodes
            .iter()
            .map(|node| match node.status() {
                Ok(status) => format!(
                    "node {}: {} term {} leader {} commit {} applied {} log [{}, {}] \
                     snapshots sent {} installed {}",
                    node.id,
                    status.role,
                    status.term,
                    status.leader_id,
                    status.commit_index,
                    status.applied_index,
                    status.first_log_index,
                    status.last_log_index,
                    status.snapshots_sent,
                    status.snapshots_installed
                ),
                Err(error) => format!("node {}: no status ({error})", node.id),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The leader agreed on by all of `among`, if there is one right now: exactly one of them
    /// says it is Leader, and every one of them names it as leader in the same term.
    pub fn agreed_leader(&self, among: &[u64]) -> Option<u64> {
        let statuses: Vec<NodeStatus> = among
            .iter()
            .map(|id| self.status(*id))
            .collect::<Result<_, _>>()
            .ok()?;
        let leaders: Vec<&NodeStatus> = statuses.iter().filter(|s| s.is_leader()).collect();
        let [leader] = leaders.as_slice() else {
            return None;
        };
        let agreed = statuses
            .iter()
            .all(|status| status.term == leader.term && status.leader_id == leader.node_id);
        agreed.then_some(leader.node_id)
    }

    /// Waits until all of `among` agree on a leader; returns its id.
    #[track_caller]
    pub fn wait_for_leader(&mut self, among: &[u64], timeout: Duration) -> u64 {
        let mut found = None;
        let among = among.to_vec();
        self.wait_until(
            &format!("nodes {among:?} to agree on a leader"),
            timeout,
            |cluster| {
                found = cluster.agreed_leader(&among);
                found.is_some()
            },
        );
        found.expect("set by the wait")
    }

    /// The leader agreed on by every running node.
    #[track_caller]
    pub fn leader(&mut self) -> u64 {
        let running = self.running_ids();
        self.wait_for_leader(&running, Duration::from_secs(30))
    }

    pub fn others(&self, id: u64) -> Vec<u64> {
        self.node_ids()
            .into_iter()
            .filter(|other| *other != id)
            .collect()
    }

    /// Waits until every running node lists `volume` in its status.
    #[track_caller]
    pub fn wait_for_volume_everywhere(&mut self, volume: &str, timeout: Duration) {
        let running = self.running_ids();
        self.wait_until(
            &format!("volume {volume} on nodes {running:?}"),
            timeout,
            |cluster| {
                running.iter().all(|id| {
                    cluster
                        .status(*id)
                        .map(|status| status.volume_names.iter().any(|name| name == volume))
                        .unwrap_or(false)
                })
            },
        );
    }

    #[track_caller]
    pub fn kill_9(&mut self, id: u64) -> ExitStatus {
        self.node_mut(id).kill_9()
    }

    /// `kill -9` every running node at once (all signals first, then the reaping), as a power
    /// cut of the whole cluster would.
    pub fn kill_9_all(&mut self) {
        for node in &self.nodes {
            if let Some(child) = node.child.as_ref() {
                let _ = send_signal(child.id(), libc::SIGKILL);
            }
        }
        for node in &mut self.nodes {
            if node.child.is_some() {
                node.kill_9();
            }
        }
    }

    #[track_caller]
    pub fn terminate(&mut self, id: u64) -> ExitStatus {
        self.node_mut(id).terminate()
    }

    /// Starts node `id` again on its data directory and waits until its control API answers.
    #[track_caller]
    pub fn restart(&mut self, id: u64) {
        self.node_mut(id).spawn_and_wait_ready();
    }

    /// Restarts every stopped node, spawning all before waiting for any (a lone node of a
    /// three-node group cannot elect anyone).
    #[track_caller]
    pub fn restart_all_stopped(&mut self) {
        let stopped: Vec<u64> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_none())
            .map(|node| node.id)
            .collect();
        for id in &stopped {
            self.node_mut(*id).spawn();
        }
        self.wait_until(
            &format!("restarted nodes {stopped:?} answering GET /v1/status"),
            SERVER_READY_TIMEOUT,
            |cluster| {
                cluster.assert_all_alive("while restarting");
                stopped.iter().all(|id| cluster.status(*id).is_ok())
            },
        );
    }

    // --- relays ------------------------------------------------------------------------------

    #[track_caller]
    pub fn relay(&self, from: u64, to: u64) -> &Relay {
        self.relays
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no relay {from} -> {to} (ClusterOptions::relays off?)"))
    }

    /// Sets the mode of every link into and out of `id`: `BlackHole` partitions it.
    pub fn set_links_of(&self, id: u64, mode: RelayMode) {
        for ((from, to), relay) in &self.relays {
            if *from == id || *to == id {
                relay.set_mode(mode);
            }
        }
    }

    /// Every link back to `Pass`.
    pub fn heal_all_links(&self) {
        for relay in self.relays.values() {
            relay.set_mode(RelayMode::Pass);
        }
    }

    // --- replicas ----------------------------------------------------------------------------

    /// Waits until node `id` has applied everything the leader had committed when the wait
    /// began.
    #[track_caller]
    pub fn wait_caught_up(&mut self, id: u64, timeout: Duration) {
        let leader = self.leader();
        let target = self
            .status(leader)
            .unwrap_or_else(|error| panic!("status of the leader {leader}: {error}"))
            .commit_index;
        self.wait_until(
            &format!("node {id} to apply up to the leader's commit index {target}"),
            timeout,
            |cluster| {
                cluster
                    .status(id)
                    .map(|status| status.applied_index >= target)
                    .unwrap_or(false)
            },
        );
    }

    /// Waits until `ids` have all applied the same index, then asserts that their images of
    /// `volume` have the same digest at that index. A difference at equal applied indices is
    /// a diverged replica and fails at once. Returns the digests.
    #[track_caller]
    pub fn assert_replicas_identical(
        &mut self,
        ids: &[u64],
        volume: &str,
        timeout: Duration,
    ) -> Vec<ReplicaDigest> {
        let deadline = Instant::now() + timeout;
        loop {
            let last_seen;
            let applied: Result<Vec<u64>, String> = ids
                .iter()
                .map(|id| self.status(*id).map(|status| status.applied_index))
                .collect();
            match applied {
                Ok(applied) if applied.windows(2).all(|pair| pair[0] == pair[1]) => {
                    let digests: Result<Vec<ReplicaDigest>, String> =
                        ids.iter().map(|id| self.node(*id).digest(volume)).collect();
                    match digests {
                        Ok(digests)
                            if digests
                                .windows(2)
                                .all(|pair| pair[0].applied_index == pair[1].applied_index) =>
                        {
                            let first = &digests[0];
                            assert!(
                                digests.iter().all(|digest| digest.digest == first.digest
                                    && digest.size_bytes == first.size_bytes),
                                "replicas of {volume} diverge at applied index {}:\n{digests:#?}\n{}",
                                first.applied_index,
                                self.describe_statuses()
                            );
                            return digests;
                        }
                        Ok(digests) => {
                            last_seen = format!("digests at different indices {digests:?}")
                        }
                        Err(error) => last_seen = error,
                    }
                }
                Ok(applied) => last_seen = format!("applied indices {applied:?}"),
                Err(error) => last_seen = error,
            }
            if Instant::now() >= deadline {
                panic!(
                    "replicas {ids:?} did not reach the same applied index within {timeout:?} \
                     (last seen: {last_seen})\n{}",
                    self.describe_statuses()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// An NBD connection straight to node `id` (anonymous export unless told otherwise).
    #[track_caller]
    pub fn nbd_client(&self, id: u64, export_name: &str) -> NbdClient {
        NbdClient::connect(self.node(id).nbd_address, export_name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Relays first, so no node is left blocked on a half-open link while dying.
        self.relays.clear();
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            for node in &self.nodes {
                let log = node.log_text();
                let start = log.len().saturating_sub(LOG_TAIL_BYTES);
                let start = (start..log.len())
                    .find(|index| log.is_char_boundary(*index))
                    .unwrap_or(log.len());
                eprintln!(
                    "--- log of node {} ({}), last {} bytes ---\n{}",
                    node.id,
                    node.log_path.display(),
                    log.len() - start,
                    &log[start..]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

/// One `raftblk proxy` process in front of a cluster.
pub struct ProxyProcess {
    pub client_id: String,
    pub listen_address: SocketAddr,
    pub log_path: PathBuf,
    child: Option<Child>,
    description: String,
}

impl ProxyProcess {
    /// `raftblk proxy --listen A --servers C1,C2,C3 --client-id ID --ready-file F [extra]`,
    /// waiting until it accepts NBD connections.
    #[track_caller]
    pub fn start(cluster: &Cluster, client_id: &str, extra_arguments: &[&str]) -> ProxyProcess {
        let listen_address: SocketAddr = format!("127.0.0.1:{}", pick_free_port())
            .parse()
            .expect("socket address");
        let directory = cluster.workspace().join(format!("proxy-{client_id}"));
        fs::create_dir_all(&directory).expect("create the proxy directory");
        let log_path = directory.join("proxy.log");
        let ready_path = directory.join(format!("ready-{}.json", listen_address.port()));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the proxy log");
        let log_for_stderr = log.try_clone().expect("clone the proxy log handle");
        let mut command = Command::new(server_program());
        command
            .arg("proxy")
            .arg("--listen")
            .arg(listen_address.to_string())
            .arg("--servers")
            .arg(cluster.control_addresses_list())
            .arg("--client-id")
            .arg(client_id)
            .arg("--ready-file")
            .arg(&ready_path)
            .args(extra_arguments)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        let description = format!("{command:?}");
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {description}: {error}"));
        let mut proxy = ProxyProcess {
            client_id: client_id.to_owned(),
            listen_address,
            log_path,
            child: Some(child),
            description,
        };
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        while !ready_path.exists() {
            proxy.assert_running("before it was ready");
            assert!(
                Instant::now() < deadline,
                "{} wrote no ready file within {SERVER_READY_TIMEOUT:?}\n--- log ---\n{}",
                proxy.description,
                proxy.log_text()
            );
            thread::sleep(POLL_INTERVAL);
        }
        wait_for_listener(listen_address, Duration::from_secs(10));
        proxy
    }

    pub fn uri(&self, export_name: &str) -> String {
        format!("nbd://{}/{export_name}", self.listen_address)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    #[track_caller]
    pub fn assert_running(&mut self, context: &str) {
        let exited = self
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten());
        if let Some(status) = exited {
            self.child = None;
            panic!(
                "{} exited ({status}) {context}\n--- proxy log ---\n{}",
                self.description,
                truncate_for_display(&self.log_text())
            );
        }
    }

    /// SIGTERM and wait (SIGKILL after the shutdown timeout).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = send_signal(child.id(), libc::SIGTERM);
        if let Some(status) = wait_with_timeout(&mut child, SERVER_SHUTDOWN_TIMEOUT) {
            return Some(status);
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}",
                self.description,
                truncate_for_display(&self.log_text())
            );
        }
    }
}

/// `raftblk ctl certs ARGUMENTS`, which must succeed.
pub fn run_certs(arguments: &[&str]) {
    let mut command = std::process::Command::new(server_program());
    command.args(["ctl", "certs"]).args(arguments);
    super::run_command(&mut command, Duration::from_secs(30)).assert_success();
}
