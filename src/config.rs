//! Configuration: built-in defaults (`config/default.toml`, compiled in) → an optional TOML file →
//! `RAFTBLK__SECTION__KEY` environment variables → command-line overrides. Every limit has a
//! default and is validated once at start-up; the rest of the program trusts a `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The compiled-in defaults: the embedded default needs no file on disk.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// Errors found while loading or validating configuration. They are reported to the operator
/// verbatim, so each names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be loaded: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub node: NodeConfig,
    pub nbd: NbdConfig,
    pub control: ControlConfig,
    pub raft: RaftConfig,
    pub peer: PeerConfig,
    pub cluster: ClusterConfig,
    pub storage: StorageConfig,
    pub default_volume: DefaultVolumeConfig,
    pub log: LogConfig,
    pub proxy: ProxyConfig,
    pub tls: TlsConfig,
}

/// How the NBD listener offers TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: STARTTLS is answered `NBD_REP_ERR_UNSUP`.
    Off,
    /// TLS offered; a client may stay in plaintext.
    On,
    /// TLS required: every option but STARTTLS and ABORT is refused until the client upgrades.
    Require,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// The certificate directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`); empty:
    /// `<node.data_dir>/tls`.
    pub dir: PathBuf,
    /// Ask NBD clients for a certificate signed by `ca-cert.pem`; refuse those without one.
    pub verify_clients: bool,
    /// Mutual TLS on the links between servers: each presents its node certificate, and the
    /// node a peer claims to be must be the one its certificate names.
    pub peers: bool,
}

impl TlsConfig {
    /// The certificate directory, `data_dir`/tls when none is configured.
    pub fn directory(&self, data_dir: &std::path::Path) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            data_dir.join("tls")
        } else {
            self.dir.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    pub connections_max: usize,
    pub requests_in_flight_per_session_max: usize,
    pub bytes_in_flight_per_session_max: u64,
    pub bytes_in_flight_max: u64,
    pub request_max_bytes: u32,
    pub option_length_max_bytes: u32,
    pub handshake_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    pub workers: usize,
    /// Bearer token every mutating request (anything but GET and HEAD) must carry. Empty turns
    /// authentication off: a development mode only (see README, "Control API token").
    #[serde(default)]
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RaftConfig {
    pub tick_interval_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub proposals_pending_max: usize,
    pub mailbox_capacity: usize,
    pub log_keep_entries: u64,
    pub log_lag_entries_max: u64,
    pub log_lag_bytes_max: u64,
    /// Lease reads: how long after a successful ReadIndex round the leader answers reads
    /// without another one (0: off). See `raft::lease` for what it assumes.
    pub read_lease_ms: u64,
}

/// The Raft peer transport of this node.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerConfig {
    pub listen: SocketAddr,
    /// Dial these members at another address than `cluster.members` gives (relays, NAT).
    #[serde(default)]
    pub connect_overrides: Vec<PeerAddressOverride>,
    pub queue_messages_max: usize,
    pub queue_bytes_max: u64,
    pub frame_bytes_max: u32,
    pub connect_timeout_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    pub snapshot_chunk_bytes: u32,
    pub snapshot_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerAddressOverride {
    pub id: u64,
    pub address: String,
}

/// The initial members of the Raft group. Empty: a one-voter group of this node alone.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClusterConfig {
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// This node joins a running group: it does not bootstrap a voter set and waits, empty,
    /// until the group adds it (`raftblk ctl members add`) and sends it a snapshot.
    /// `members` then lists the group's current members and this node.
    #[serde(default)]
    pub join: bool,
}

/// One storage server: its Raft node id and the addresses others reach it at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct MemberConfig {
    pub id: u64,
    pub peer: String,
    pub nbd: String,
    pub control: String,
}

impl MemberConfig {
    /// Checks the id and that every address is host:port.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("member id 0 is reserved (raft-rs uses it for \"none\")".into());
        }
        for (what, address) in [
            ("peer", &self.peer),
            ("nbd", &self.nbd),
            ("control", &self.control),
        ] {
            if address.len() > 255
                || address
                    .rsplit_once(':')
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .is_none()
            {
                return Err(format!(
                    "member {} has {what} address '{address}', which is not host:port",
                    self.id
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The member record of this node, if the cluster is configured.
    pub fn this_member(&self) -> Option<&MemberConfig> {
        self.cluster
            .members
            .iter()
            .find(|member| member.id == self.node.id)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageConfig {
    pub checkpoint_interval_ms: u64,
    pub checkpoint_bytes: u64,
    pub rocksdb_block_cache_bytes: usize,
    pub rocksdb_write_buffer_bytes: usize,
    pub rocksdb_max_background_jobs: i32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DefaultVolumeConfig {
    pub create: bool,
    pub name: String,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Terminal,
    Json,
    /// RFC 3164 records to the local syslog socket (/dev/log), facility daemon.
    Syslog,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// A checkpoint's fdatasync slower than this is logged as a warning ("fsync slow").
    #[serde(default = "default_fsync_slow_ms")]
    pub fsync_slow_ms: u64,
    /// Repeats of one warning within this interval are counted, not logged.
    #[serde(default = "default_warning_interval_ms")]
    pub warning_interval_ms: u64,
}

fn default_fsync_slow_ms() -> u64 {
    500
}

fn default_warning_interval_ms() -> u64 {
    30000
}

/// Largest READ/WRITE the NBD layer accepts: the block-size maximum the spec lets a server
/// advertise and the size qemu and the kernel use.
pub const REQUEST_MAX_BYTES_LIMIT: u32 = 32 * 1024 * 1024;

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, then `overrides`
    /// (`("nbd.listen", "127.0.0.1:0")` pairs from command-line flags), and validates the result.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("RAFTBLK")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.clone())?;
        }
        let config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values that would make the server misbehave rather than fail loudly later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                problem: problem.into(),
            }
        }
        if self.node.id == 0 {
            return Err(invalid(
                "node.id",
                "must be non-zero (0 means 'none' in Raft)",
            ));
        }
        if self.tls.verify_clients && self.tls.mode != TlsMode::Require {
            return Err(invalid(
                "tls.verify_clients",
                "needs tls.mode = \"require\": otherwise a client stays in plaintext and \
                 presents no certificate at all",
            ));
        }
        if self.nbd.connections_max == 0 {
            return Err(invalid("nbd.connections_max", "must be at least 1"));
        }
        if self.nbd.requests_in_flight_per_session_max == 0 {
            return Err(invalid(
                "nbd.requests_in_flight_per_session_max",
                "must be at least 1",
            ));
        }
        if self.nbd.request_max_bytes < 4096 || self.nbd.request_max_bytes > REQUEST_MAX_BYTES_LIMIT
        {
            return Err(invalid(
                "nbd.request_max_bytes",
                format!("must be between 4096 and {REQUEST_MAX_BYTES_LIMIT}"),
            ));
        }
        if self.nbd.bytes_in_flight_per_session_max < u64::from(self.nbd.request_max_bytes) {
            return Err(invalid(
                "nbd.bytes_in_flight_per_session_max",
                "must be at least nbd.request_max_bytes, or a maximal request could never run",
            ));
        }
        if self.nbd.bytes_in_flight_max < self.nbd.bytes_in_flight_per_session_max
            || self.nbd.bytes_in_flight_max > u64::from(u32::MAX)
        {
            return Err(invalid(
                "nbd.bytes_in_flight_max",
                "must be at least nbd.bytes_in_flight_per_session_max and at most 4 GiB - 1",
            ));
        }
        if self.nbd.bytes_in_flight_per_session_max > u64::from(u32::MAX) {
            return Err(invalid(
                "nbd.bytes_in_flight_per_session_max",
                "must be at most 4 GiB - 1",
            ));
        }
        if self.nbd.option_length_max_bytes < 1024 {
            return Err(invalid(
                "nbd.option_length_max_bytes",
                "must be at least 1024 (export names may be 4096 bytes)",
            ));
        }
        if self.nbd.handshake_timeout_ms == 0 || self.nbd.request_timeout_ms == 0 {
            return Err(invalid(
                "nbd.handshake_timeout_ms/request_timeout_ms",
                "must be non-zero",
            ));
        }
        if self.control.workers == 0 || self.control.workers > 64 {
            return Err(invalid("control.workers", "must be between 1 and 64"));
        }
        if self.raft.tick_interval_ms == 0 {
            return Err(invalid("raft.tick_interval_ms", "must be non-zero"));
        }
        if self.raft.heartbeat_ticks == 0 || self.raft.election_ticks <= self.raft.heartbeat_ticks {
            return Err(invalid(
                "raft.election_ticks",
                "must be greater than raft.heartbeat_ticks, which must be non-zero",
            ));
        }
        let lease_max = crate::raft::lease::read_lease_ms_max(
            self.raft.election_ticks,
            self.raft.tick_interval_ms,
        );
        if self.raft.read_lease_ms > lease_max {
            return Err(invalid(
                "raft.read_lease_ms",
                format!(
                    "must be at most {lease_max} (0.81 x (election_ticks - 1) x \
                     tick_interval_ms): a follower refuses votes only that long after it \
                     heard from the leader"
                ),
            ));
        }
        if self.raft.proposals_pending_max == 0 || self.raft.mailbox_capacity == 0 {
            return Err(invalid(
                "raft.proposals_pending_max/mailbox_capacity",
                "must be at least 1",
            ));
        }
        if self.raft.log_lag_entries_max < self.raft.log_keep_entries
            || self.raft.log_lag_bytes_max == 0
        {
            return Err(invalid(
                "raft.log_lag_entries_max/log_lag_bytes_max",
                "must be at least raft.log_keep_entries, and non-zero",
            ));
        }
        if self.peer.queue_messages_max == 0 || self.peer.queue_bytes_max == 0 {
            return Err(invalid(
                "peer.queue_messages_max/queue_bytes_max",
                "must be at least 1",
            ));
        }
        if u64::from(self.peer.frame_bytes_max) < u64::from(self.nbd.request_max_bytes) + 65536 {
            return Err(invalid(
                "peer.frame_bytes_max",
                "must exceed nbd.request_max_bytes by at least 64 KiB, or a maximal write \
                 could never be replicated",
            ));
        }
        if self.peer.snapshot_chunk_bytes < 4096
            || u64::from(self.peer.snapshot_chunk_bytes) + 65536
                > u64::from(self.peer.frame_bytes_max)
        {
            return Err(invalid(
                "peer.snapshot_chunk_bytes",
                "must be at least 4096 and fit in a frame (peer.frame_bytes_max - 64 KiB)",
            ));
        }
        if self.peer.connect_timeout_ms == 0
            || self.peer.reconnect_backoff_max_ms == 0
            || self.peer.snapshot_timeout_ms == 0
        {
            return Err(invalid(
                "peer.connect_timeout_ms/reconnect_backoff_max_ms/snapshot_timeout_ms",
                "must be non-zero",
            ));
        }
        self.validate_cluster()
            .map_err(|problem| invalid("cluster.members", problem))?;
        if self.storage.checkpoint_interval_ms == 0 || self.storage.checkpoint_bytes == 0 {
            return Err(invalid(
                "storage.checkpoint_interval_ms/checkpoint_bytes",
                "must be non-zero",
            ));
        }
        if self.storage.rocksdb_max_background_jobs < 1 {
            return Err(invalid(
                "storage.rocksdb_max_background_jobs",
                "must be at least 1",
            ));
        }
        validate_volume_geometry(
            self.default_volume.size_bytes,
            self.default_volume.block_size_bytes,
        )
        .map_err(|problem| invalid("default_volume", problem))?;
        if self.default_volume.name.is_empty() || self.default_volume.name.len() > 4096 {
            return Err(invalid("default_volume.name", "must be 1 to 4096 bytes"));
        }
        self.proxy.validate()?;
        match self.log.level.as_str() {
            "trace" | "debug" | "info" | "warning" | "warn" | "error" | "critical" => {}
            other => {
                return Err(invalid(
                    "log.level",
                    format!("'{other}' is not one of trace, debug, info, warning, error, critical"),
                ))
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_cluster(&self) -> Result<(), String> {
        let members = &self.cluster.members;
        if members.is_empty() {
            if self.cluster.join {
                return Err("join needs the group's members and this node listed".into());
            }
            return Ok(());
        }
        let mut ids = std::collections::BTreeSet::new();
        for member in members {
            member.validate()?;
            if !ids.insert(member.id) {
                return Err(format!("member id {} is repeated", member.id));
            }
        }
        if !ids.contains(&self.node.id) {
            return Err(format!(
                "this node (node.id = {}) is not one of the members {:?}",
                self.node.id, ids
            ));
        }
        for entry in &self.peer.connect_overrides {
            if !ids.contains(&entry.id) {
                return Err(format!(
                    "peer.connect_overrides names unknown member {}",
                    entry.id
                ));
            }
        }
        Ok(())
    }
}

/// The one rule for a volume's size and block size, shared by configuration and the control
/// API, with the state machine's limits: block size a power of two in 512..=65536, size a
/// non-zero multiple of it, at most 16 TiB.
pub fn validate_volume_geometry(size_bytes: u64, block_size_bytes: u32) -> Result<(), String> {
    use crate::storage::state_machine::{
        BLOCK_SIZE_BYTES_MAX, BLOCK_SIZE_BYTES_MIN, VOLUME_SIZE_BYTES_MAX,
    };
    if !block_size_bytes.is_power_of_two()
        || !(BLOCK_SIZE_BYTES_MIN..=BLOCK_SIZE_BYTES_MAX).contains(&block_size_bytes)
    {
        return Err(format!(
            "block size {block_size_bytes} must be a power of two between \
             {BLOCK_SIZE_BYTES_MIN} and {BLOCK_SIZE_BYTES_MAX}"
        ));
    }
    if size_bytes == 0 || size_bytes % u64::from(block_size_bytes) != 0 {
        return Err(format!(
            "size {size_bytes} must be a non-zero multiple of the block size {block_size_bytes}"
        ));
    }
    if size_bytes > VOLUME_SIZE_BYTES_MAX {
        return Err(format!(
            "size {size_bytes} is larger than the largest volume, {VOLUME_SIZE_BYTES_MAX} bytes"
        ));
    }
    Ok(())
}

/// `[proxy]`: the client-side proxy (`raftblk proxy`). Handshake limits and the largest request
/// come from `[nbd]`, shared with the server.
#[derive(Debug, Clone, Deserialize)]
pub struct ProxyConfig {
    /// Local NBD endpoint.
    pub listen: SocketAddr,
    /// Control API addresses of the servers, each optionally `CONTROL=NBD` to name the server's
    /// NBD address when its status does not list cluster members.
    pub servers: Vec<String>,
    /// Who attaches volumes; empty means this machine's host name.
    pub client_id: String,
    /// The proxy's control API address ("ip:port"); empty: none.
    pub control_listen: String,
    /// Take a volume over even when another client has it attached (fencing that client).
    pub force_attach: bool,
    /// Bytes of block data the read cache may hold (0 disables the cache).
    pub cache_bytes: u64,
    /// Granularity of the cache (a power of two, 512..=65536).
    pub cache_block_size_bytes: u32,
    /// An upstream request without a reply for this long fails the upstream connection.
    pub upstream_reply_timeout_ms: u64,
    /// How long a request is retried across upstream failures before the client gets EIO.
    pub request_deadline_ms: u64,
    /// How often the servers' status is polled to follow the leader.
    pub status_poll_interval_ms: u64,
    /// Timeout of one control API call (status, attach, detach).
    pub control_timeout_ms: u64,
    pub connections_max: usize,
    pub requests_in_flight_per_session_max: usize,
    pub bytes_in_flight_per_session_max: u64,
    pub bytes_in_flight_max: u64,
    /// Requests queued towards one volume's upstream connection (all sessions together).
    pub upstream_queue_max: usize,
    /// Where the proxy serves `GET /metrics` (Prometheus text); empty: no metrics listener.
    #[serde(default)]
    pub metrics_listen: String,
    /// NBD over TLS to the servers, with the certificates in this directory (`ca-cert.pem`,
    /// and `client-cert.pem` / `client-key.pem` for servers that verify clients); empty:
    /// plaintext.
    #[serde(default)]
    pub upstream_tls_dir: PathBuf,
}

impl ProxyConfig {
    /// The client id actually used: the configured one, or the host name.
    pub fn effective_client_id(&self) -> String {
        if !self.client_id.is_empty() {
            return self.client_id.clone();
        }
        let mut buffer = [0u8; 256];
        // SAFETY: gethostname writes at most `buffer.len()` bytes into the buffer it is given.
        let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
        let length = buffer.iter().position(|byte| *byte == 0).unwrap_or(0);
        if result == 0 && length > 0 {
            String::from_utf8_lossy(&buffer[..length]).into_owned()
        } else {
            "raftblk-proxy".to_string()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                problem: problem.into(),
            }
        }
        for server in &self.servers {
            let (control, nbd) = match server.split_once('=') {
                Some((control, nbd)) => (control, Some(nbd)),
                None => (server.as_str(), None),
            };
            if control.parse::<SocketAddr>().is_err()
                || nbd.is_some_and(|nbd| nbd.parse::<SocketAddr>().is_err())
            {
                return Err(invalid(
                    "proxy.servers",
                    format!("'{server}' is not CONTROL_ADDRESS or CONTROL_ADDRESS=NBD_ADDRESS (ip:port)"),
                ));
            }
        }
        if self.client_id.len() > 255 || self.client_id.chars().any(char::is_control) {
            return Err(invalid(
                "proxy.client_id",
                "must be at most 255 printable characters",
            ));
        }
        if let Some(memory_bytes) = physical_memory_bytes() {
            if self.cache_bytes > memory_bytes / 2 {
                return Err(invalid(
                    "proxy.cache_bytes",
                    format!(
                        "{} bytes is more than half of this machine's {memory_bytes} bytes of \
                         memory; the cache would push the client's own pages out",
                        self.cache_bytes
                    ),
                ));
            }
        }
        if self.cache_block_size_bytes < 512
            || self.cache_block_size_bytes > 65536
            || !self.cache_block_size_bytes.is_power_of_two()
        {
            return Err(invalid(
                "proxy.cache_block_size_bytes",
                "must be a power of two between 512 and 65536",
            ));
        }
        if self.upstream_reply_timeout_ms == 0
            || self.request_deadline_ms == 0
            || self.status_poll_interval_ms == 0
            || self.control_timeout_ms == 0
        {
            return Err(invalid(
                "proxy.*_ms",
                "timeouts and intervals must be non-zero",
            ));
        }
        if self.request_deadline_ms < self.upstream_reply_timeout_ms {
            return Err(invalid(
                "proxy.request_deadline_ms",
                "must be at least proxy.upstream_reply_timeout_ms, or no request survives one failover",
            ));
        }
        if self.connections_max == 0
            || self.requests_in_flight_per_session_max == 0
            || self.upstream_queue_max == 0
        {
            return Err(invalid(
                "proxy.connections_max/requests_in_flight_per_session_max/upstream_queue_max",
                "must be at least 1",
            ));
        }
        if self.bytes_in_flight_per_session_max < u64::from(REQUEST_MAX_BYTES_LIMIT)
            || self.bytes_in_flight_max < self.bytes_in_flight_per_session_max
            || self.bytes_in_flight_max > u64::from(u32::MAX)
        {
            return Err(invalid(
                "proxy.bytes_in_flight_max/bytes_in_flight_per_session_max",
                "per session at least 32 MiB (a maximal request), in total at least the per-session \
                 limit and at most 4 GiB - 1",
            ));
        }
        Ok(())
    }
}

/// This machine's physical memory, or `None` if the system does not say.
fn physical_memory_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page_bytes) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page_bytes <= 0 {
        return None;
    }
    (pages as u64).checked_mul(page_bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid_and_match_the_documented_embedded_default() {
        let config = Config::load(None, &[]).expect("defaults load");
        assert_eq!(config.nbd.listen.to_string(), "127.0.0.1:10809");
        assert_eq!(config.node.data_dir, PathBuf::from("./raftblk-data"));
        assert_eq!(config.default_volume.name, "disk0");
        assert_eq!(config.default_volume.size_bytes, 1 << 30);
        assert_eq!(config.nbd.request_max_bytes, 32 << 20);
    }

    #[test]
    fn overrides_win_and_bad_limits_are_rejected_with_the_key_named() {
        let config = Config::load(None, &[("nbd.listen", "127.0.0.1:0".to_string())])
            .expect("override loads");
        assert_eq!(config.nbd.listen.port(), 0);
        let error = Config::load(None, &[("nbd.request_max_bytes", "100".to_string())])
            .expect_err("too small a request limit must be rejected");
        assert!(
            error.to_string().contains("nbd.request_max_bytes"),
            "{error}"
        );
        let error = Config::load(None, &[("raft.election_ticks", "1".to_string())])
            .expect_err("election <= heartbeat must be rejected");
        assert!(error.to_string().contains("raft.election_ticks"), "{error}");
        let config = Config::load(None, &[("raft.read_lease_ms", "729".to_string())])
            .expect("the longest lease the default timeouts allow");
        assert_eq!(config.raft.read_lease_ms, 729);
        let error = Config::load(None, &[("raft.read_lease_ms", "730".to_string())])
            .expect_err("a lease as long as the followers' vote refusal must be rejected");
        assert!(
            error.to_string().contains("raft.read_lease_ms") && error.to_string().contains("729"),
            "{error}"
        );
        let error = Config::load(None, &[("log.level", "loud".to_string())])
            .expect_err("an unknown log level must be rejected");
        assert!(error.to_string().contains("log.level"), "{error}");
        for level in ["warn", "warning"] {
            let config = Config::load(None, &[("log.level", level.to_string())])
                .expect("both spellings of the warning level are accepted");
            assert_eq!(
                crate::logging::level_from_name(&config.log.level),
                slog::Level::Warning
            );
        }
    }

    #[test]
    fn volume_geometry_rules() {
        assert!(validate_volume_geometry(1 << 30, 4096).is_ok());
        assert!(validate_volume_geometry(4096 + 512, 4096).is_err());
        assert!(validate_volume_geometry(0, 4096).is_err());
        assert!(validate_volume_geometry(1 << 20, 3000).is_err());
        assert!(validate_volume_geometry(1 << 20, 256).is_err());
        assert!(validate_volume_geometry(1 << 45, 4096).is_err());
    }

    #[test]
    fn proxy_defaults_are_valid_and_bad_proxy_settings_name_their_key() {
        let config = Config::load(None, &[]).expect("defaults load");
        assert_eq!(config.proxy.listen.to_string(), "127.0.0.1:10809");
        assert_eq!(config.proxy.cache_bytes, 64 << 20);
        assert_eq!(config.proxy.upstream_reply_timeout_ms, 5000);
        assert_eq!(config.proxy.request_deadline_ms, 60000);
        assert!(!config.proxy.force_attach);
        assert!(!config.proxy.effective_client_id().is_empty());
        let mut bad = config.proxy.clone();
        bad.servers = vec!["nonsense".to_string()];
        let error = bad
            .validate()
            .expect_err("a server that is not ip:port is refused");
        assert!(error.to_string().contains("proxy.servers"), "{error}");
        bad.servers = vec!["127.0.0.1:10810=127.0.0.1:10809".to_string()];
        assert!(bad.validate().is_ok());
        bad.cache_bytes = physical_memory_bytes().expect("Linux reports its memory");
        let error = bad
            .validate()
            .expect_err("a cache as large as the machine's memory is refused");
        assert!(error.to_string().contains("proxy.cache_bytes"), "{error}");
        let error = Config::load(None, &[("proxy.request_deadline_ms", "10".to_string())])
            .expect_err("a deadline shorter than one reply timeout is refused");
        assert!(
            error.to_string().contains("proxy.request_deadline_ms"),
            "{error}"
        );
    }
}
