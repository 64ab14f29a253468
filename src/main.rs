//! The `raftblk` command: `server` runs a storage server; `dev` a whole three-server cluster and
//! a proxy on loopback; `volume` and `ctl` talk to running servers' control APIs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use raftblk::actors::supervisor::ActorKind;
use raftblk::config::{Config, LogFormat, MemberConfig};
use raftblk::control::members::{MembersBody, MembershipClient};
use raftblk::control::{ControlClient, ControlClientError, CreateVolumeRequest};

mod ctl;

#[derive(Parser)]
#[command(
    name = "raftblk",
    version,
    about = "A network block device replicated by Raft"
)]
struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Subcommand)]
enum CliCommand {
    /// Run a storage server (NBD on 127.0.0.1:10809, data in ./raftblk-data by default).
    Server(ServerArgs),
    /// Run a 3-server cluster and a proxy on loopback, each its own process; clients use
    /// nbd://127.0.0.1:10809/disk0. Data under ./raftblk-data; Ctrl-C stops it.
    Dev(DevArgs),
    /// Run the client-side proxy: a local NBD endpoint for the cluster's volumes that follows
    /// the leader and hides server crashes.
    Proxy(ProxyArgs),
    /// Create, list, delete or resize volumes (also `raftblk ctl volumes`).
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Inspect a running cluster.
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(clap::Args)]
struct DevArgs {
    /// Directory holding every server's data, configuration and log.
    #[arg(long, default_value = "./raftblk-data")]
    data_dir: PathBuf,
    /// The proxy's NBD address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Server N listens on ports BASE+10N (NBD), +1 (control), +2 (peer).
    #[arg(long, default_value_t = 10810)]
    port_base: u16,
    /// Size of disk0 when the cluster is created, e.g. 1G.
    #[arg(long, default_value = "1G")]
    size: String,
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// The control addresses of `raftblk dev`'s servers.
const DEV_CONTROL_ADDRESSES: &str = "127.0.0.1:10821,127.0.0.1:10831,127.0.0.1:10841";

/// The proxy control address of `raftblk dev` (its port base + 1).
const DEV_PROXY_CONTROL_ADDRESS: &str = "127.0.0.1:10811";

#[derive(Subcommand)]
enum CtlCommand {
    /// Crash-restart drill: a verified write/read workload through the proxy while servers are
    /// killed (kill -9 of the pid in each server's /v1/status: servers must run on this host
    /// under something that restarts them, as `raftblk dev` does) and actors are crashed
    /// through failpoints (builds with `--features failpoints`). Exits 0 only on a pass.
    Drill {
        /// The proxy's NBD address.
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
        #[arg(long, default_value = "disk0")]
        export: String,
        /// Servers' control API addresses, comma-separated.
        #[arg(long, default_value = DEV_CONTROL_ADDRESSES, value_delimiter = ',')]
        control: Vec<String>,
        /// The proxy's control API address (for cache crashes); empty for none.
        #[arg(long, default_value = DEV_PROXY_CONTROL_ADDRESS)]
        proxy_control: String,
        /// How long to run: 180, 180s, 3m or 500ms.
        #[arg(long, default_value = "60s")]
        duration: String,
        /// Kill a random server this often (0: never).
        #[arg(long, default_value = "10s")]
        kill_interval: String,
        /// Actor kinds to crash once each, comma-separated (nbd_session, raft, storage,
        /// listener, peer, cache), or `all`.
        #[arg(long, value_delimiter = ',')]
        inject: Vec<String>,
        /// Seed of the schedule and the data (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Blocks (4 KiB each) in the working set.
        #[arg(long, default_value_t = 1024)]
        blocks: u64,
        #[arg(long, default_value_t = 32)]
        requests_in_flight: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Bearer token of the control API (default: RAFTBLK_TOKEN, else the dev cluster's
        /// ./raftblk-data/control.token when it exists).
        #[arg(long, env = "RAFTBLK_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// The cluster at a glance: a health line, the leader, the quorum, and each member (up,
    /// down or lagging) with its Raft role and indexes. Exits non-zero when no server answers
    /// or the cluster has no quorum.
    Status {
        /// Control API addresses, comma-separated (the members they list are asked too).
        #[arg(long, default_value = DEV_CONTROL_ADDRESSES, value_delimiter = ',')]
        control: Vec<String>,
        /// Print the report as JSON (for scripts).
        #[arg(long)]
        json: bool,
        /// How long to wait for each server.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// The same commands as `raftblk volume` (list, create, delete, resize).
    Volumes {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// List, add, remove or replace the group's members (Raft voters and learners).
    Members {
        /// Control API addresses to find the leader through, comma-separated.
        #[arg(long, default_value = DEV_CONTROL_ADDRESSES, value_delimiter = ',', global = true)]
        control: Vec<String>,
        /// Bearer token for the control API's mutations (default: RAFTBLK_TOKEN, else the dev
        /// cluster's ./raftblk-data/control.token when it exists).
        #[arg(long, env = "RAFTBLK_TOKEN", global = true, hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        command: Option<MembersCommand>,
    },
    /// Certificates for TLS, in the directory layout qemu and libnbd read (ca-cert.pem,
    /// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a certificate authority in DIR: ca-cert.pem (hand it out) and ca-key.pem (keep it
    /// there, mode 0600).
    Init {
        dir: std::path::PathBuf,
        /// The authority's name (its certificate's common name).
        #[arg(long, default_value = "raftblk cluster CA")]
        name: String,
    },
    /// Issue a certificate signed by the authority in --ca into --out (with a copy of
    /// ca-cert.pem): server-cert.pem and server-key.pem for a storage server (--node), or
    /// client-cert.pem and client-key.pem for a client (--client). Never overwrites a key.
    Issue {
        /// The authority's directory (ca-cert.pem, ca-key.pem).
        #[arg(long)]
        ca: std::path::PathBuf,
        /// Where to write the certificate, key and ca-cert.pem.
        #[arg(long)]
        out: std::path::PathBuf,
        /// A storage server's Raft node id: the certificate names it node-ID.
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        node: Option<u64>,
        /// A client's name (a proxy, an operator, an NBD client).
        #[arg(long)]
        client: Option<String>,
        /// A DNS name or IP address clients reach the server by (repeat for several); the
        /// certificate is valid for each. With --node only.
        #[arg(long = "host", requires = "node")]
        hosts: Vec<String>,
    },
}

#[derive(clap::Args, Clone)]
struct NewMemberArgs {
    /// Raft node id of the new member (unused in the group).
    #[arg(long)]
    id: u64,
    /// Its peer transport address, host:port.
    #[arg(long)]
    peer: String,
    /// Its NBD address, host:port.
    #[arg(long)]
    nbd: String,
    /// Its control API address, host:port.
    #[arg(long = "member-control")]
    member_control: String,
    /// How long the new member may take to catch up, in seconds.
    #[arg(long, default_value_t = 600)]
    catch_up_timeout_s: u64,
}

#[derive(Subcommand)]
enum MembersCommand {
    /// One row per member: id, role, addresses, replication progress (the default).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a server (started with `raftblk server --join`): as a learner, wait for it to catch
    /// up (progress bar), then promote it to voter.
    Add {
        #[command(flatten)]
        member: NewMemberArgs,
        /// Stop after the catch-up: leave it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Promote a learner (added with `add --learner`) to voter, optionally replacing voter
    /// OLD in the same joint-consensus change. The leader waits for a moment when the learner
    /// is within 256 entries of the commit index.
    Promote {
        id: u64,
        /// Remove this voter in the same change.
        #[arg(long)]
        replace: Option<u64>,
        /// How long the learner may take to come close enough, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Remove a member. A leader hands leadership over first. Refused when the remaining
    /// voters would not have a working quorum, unless --force.
    Remove {
        id: u64,
        #[arg(long)]
        force: bool,
    },
    /// Replace member OLD by a new server: add it as a learner, let it catch up, then promote
    /// it and remove OLD in one joint-consensus change.
    Replace {
        old: u64,
        #[command(flatten)]
        member: NewMemberArgs,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// TOML file overriding the built-in defaults (config/default.toml shows every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// NBD listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Control API listen address (port 0 picks a free port).
    #[arg(long)]
    control_listen: Option<String>,
    /// Directory for RocksDB and the volume images.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Raft node id of this server (must be one of cluster.members, if configured).
    #[arg(long)]
    node_id: Option<u64>,
    /// Peer transport listen address.
    #[arg(long)]
    peer_listen: Option<String>,
    /// Join a running group instead of bootstrapping one (see `cluster.join`).
    #[arg(long)]
    join: bool,
    /// Once serving, write {"nbd","control","pid"} as JSON to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// terminal or json.
    #[arg(long)]
    log_format: Option<String>,
    /// trace, debug, info, warning (or warn), error or critical.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// TOML file overriding the built-in defaults (config/default.toml, section [proxy]).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Local NBD listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Servers' control API addresses, comma-separated; `CONTROL=NBD` also names a server's
    /// NBD address.
    #[arg(long, value_delimiter = ',')]
    servers: Option<Vec<String>>,
    /// Client id used to attach volumes (default: the host name).
    #[arg(long)]
    client_id: Option<String>,
    /// The proxy's own control API (status with restart counts; failpoints in test builds).
    #[arg(long)]
    control_listen: Option<String>,
    /// Take volumes over even if another client has them attached (fences that client).
    #[arg(long)]
    force_attach: bool,
    /// Bytes of block data the read cache may hold, e.g. 64M or 1G (0 disables it).
    #[arg(long)]
    cache_bytes: Option<String>,
    /// Once serving, write {"nbd","pid","client_id"} as JSON to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// terminal or json.
    #[arg(long)]
    log_format: Option<String>,
    /// trace, debug, info, warning (or warn), error or critical.
    #[arg(long)]
    log_level: Option<String>,
}

fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(listen) = args.listen {
        overrides.push(("proxy.listen", listen));
    }
    if let Some(client_id) = args.client_id {
        overrides.push(("proxy.client_id", client_id));
    }
    if let Some(control_listen) = args.control_listen {
        overrides.push(("proxy.control_listen", control_listen));
    }
    if args.force_attach {
        overrides.push(("proxy.force_attach", "true".to_string()));
    }
    if let Some(cache_bytes) = args.cache_bytes {
        let bytes = parse_size_argument("--cache-bytes", &cache_bytes)?;
        overrides.push(("proxy.cache_bytes", bytes.to_string()));
    }
    if let Some(format) = args.log_format {
        overrides.push(("log.format", format));
    }
    if let Some(level) = args.log_level {
        overrides.push(("log.level", level));
    }
    let mut config = Config::load(args.config.as_deref(), &overrides)?;
    if let Some(servers) = args.servers {
        // A list does not fit the key/value overrides; set it here and validate again.
        config.proxy.servers = servers;
        config.validate()?;
    }
    let ready_file = args.ready_file;
    run_logged("proxy", config, move |config, logger| {
        raftblk::proxy::run_proxy(config, logger, ready_file)
    })
}

/// Sets up logging (slog drains, panics logged too) and runs `run` in an actix `System`,
/// logging its failure: the frame of every long-running process kind.
fn run_logged<F, Fut>(what: &str, config: Config, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, slog::Logger) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (logger, _logging_guard) = raftblk::logging::build_logger(&config.log);
    install_panic_logger(&logger, config.log.format);
    let system = actix::System::new();
    let result = system.block_on(run(config, logger.clone()));
    if let Err(error) = &result {
        slog::crit!(logger, "process failed"; "process" => what, "error" => format!("{error:#}"));
    }
    result
}

/// Where `raftblk volume`/`raftblk ctl volumes` send their requests, and the token for changes.
#[derive(clap::Args, Clone)]
struct ControlTarget {
    /// Control API addresses, comma-separated; the first that answers is used.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:10810")]
    control: Vec<String>,
    /// The cluster's control.token, for changes. Also from RAFTBLK_TOKEN, or from the
    /// [control] token of the file given with --config.
    #[arg(long, env = "RAFTBLK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A raftblk TOML file (e.g. a server's) to read control.token from.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ControlTarget {
    fn resolved_token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        match &self.config {
            Some(path) => Ok(Config::load(Some(path), &[])?.control.token),
            None => Ok(String::new()),
        }
    }

    /// Runs `call` against each address in turn until one is reachable.
    fn call<T>(
        &self,
        call: impl Fn(&ControlClient) -> Result<T, ControlClientError>,
    ) -> anyhow::Result<T> {
        let token = self.resolved_token()?;
        let mut unreachable = Vec::new();
        for address in &self.control {
            match call(&ControlClient::new(address).token(&token)) {
                Err(ControlClientError::Unreachable { detail, .. }) => {
                    unreachable.push(format!("{address} ({detail})"));
                }
                other => return Ok(other?),
            }
        }
        anyhow::bail!(
            "the cluster is unreachable: no control API answered at {}",
            unreachable.join(", ")
        )
    }
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume (an NBD export).
    Create {
        name: String,
        /// Size, e.g. 64M, 10G, 1073741824.
        #[arg(long)]
        size: String,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        target: ControlTarget,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and its data.
    Delete {
        name: String,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Grow a volume online (new NBD connections see the new size); shrinking is refused.
    Resize {
        name: String,
        /// The new size, e.g. 2G.
        #[arg(long)]
        size: String,
        #[command(flatten)]
        target: ControlTarget,
    },
}

/// Storage sizes are binary: 64M means 64 MiB, as in qemu-img and truncate.
fn parse_size_argument(flag: &str, size: &str) -> anyhow::Result<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(size)
        .map_err(|error| anyhow::anyhow!("invalid {flag} '{size}': {error}"))
}

fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(listen) = args.listen {
        overrides.push(("nbd.listen", listen));
    }
    if let Some(listen) = args.control_listen {
        overrides.push(("control.listen", listen));
    }
    if let Some(dir) = args.data_dir {
        overrides.push(("node.data_dir", dir.display().to_string()));
    }
    if let Some(id) = args.node_id {
        overrides.push(("node.id", id.to_string()));
    }
    if let Some(listen) = args.peer_listen {
        overrides.push(("peer.listen", listen));
    }
    if args.join {
        overrides.push(("cluster.join", "true".to_string()));
    }
    if let Some(format) = args.log_format {
        overrides.push(("log.format", format));
    }
    if let Some(level) = args.log_level {
        overrides.push(("log.level", level));
    }
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let ready_file = args.ready_file;
    run_logged("server", config, move |config, logger| {
        raftblk::server::run_server(config, logger, ready_file)
    })
}

/// Panics are also logged through slog (with their location) so that JSON log consumers see
/// them; the default hook still prints them to stderr.
fn install_panic_logger(logger: &slog::Logger, _format: LogFormat) {
    let logger = logger.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|location| location.to_string())
            .unwrap_or_default();
        // Captured whatever RUST_BACKTRACE says: a crash report without it is of little use,
        // and panics are rare enough for the cost not to matter.
        let backtrace = std::backtrace::Backtrace::force_capture();
        slog::error!(logger, "panic"; "message" => info.to_string(), "location" => location,
            "backtrace" => backtrace.to_string());
        default_hook(info);
    }));
}

fn run_volume_command(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            block_size,
            target,
        } => {
            let request = CreateVolumeRequest {
                name,
                size_bytes: parse_size_argument("--size", &size)?,
                block_size_bytes: block_size,
            };
            let info = target.call(|client| client.create_volume(&request))?;
            println!(
                "created volume {} ({} bytes, block size {}): nbd://<server>/{}",
                info.name, info.size_bytes, info.block_size_bytes, info.name
            );
        }
        VolumeCommand::List { target, json } => {
            let volumes = target.call(|client| client.list_volumes())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&volumes)?);
            } else {
                println!(
                    "{:<32} {:>16} {:>10} ATTACHED",
                    "NAME", "SIZE_BYTES", "BLOCK_SIZE"
                );
                for volume in volumes {
                    let attached = volume
                        .attachment
                        .as_ref()
                        .map(|attachment| {
                            format!("{} (epoch {})", attachment.client, attachment.epoch)
                        })
                        .unwrap_or_else(|| "-".to_string());
                    println!(
                        "{:<32} {:>16} {:>10} {attached}",
                        volume.name, volume.size_bytes, volume.block_size_bytes
                    );
                }
            }
        }
        VolumeCommand::Delete { name, target } => {
            target.call(|client| client.delete_volume(&name))?;
            println!("deleted volume {name}");
        }
        VolumeCommand::Resize { name, size, target } => {
            let size_bytes = parse_size_argument("--size", &size)?;
            let info = target.call(|client| client.resize_volume(&name, size_bytes))?;
            println!(
                "volume {} now has {} bytes; new NBD connections see the new size",
                info.name, info.size_bytes
            );
        }
    }
    Ok(())
}

fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let volume_size_bytes = parse_size::Config::new()
        .with_binary()
        .parse_size(&args.size)
        .map_err(|error| anyhow::anyhow!("invalid --size '{}': {error}", args.size))?;
    raftblk::config::validate_volume_geometry(volume_size_bytes, 4096)
        .map_err(|problem| anyhow::anyhow!("invalid --size: {problem}"))?;
    let options = raftblk::dev::DevOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        port_base: args.port_base,
        volume_size_bytes,
        log_level: args.log_level,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(raftblk::dev::run_dev(options))
}

/// `180`, `180s`, `3m`, `500ms`.
fn parse_duration_text(text: &str) -> anyhow::Result<std::time::Duration> {
    let text = text.trim();
    let (number, unit_ms) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60_000)
    } else {
        (text, 1000)
    };
    let value: u64 = number
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration {text:?} (e.g. 180s, 3m, 500ms)"))?;
    Ok(std::time::Duration::from_millis(
        value.saturating_mul(unit_ms),
    ))
}

fn parse_actor_kinds(names: &[String]) -> anyhow::Result<Vec<ActorKind>> {
    if names.iter().any(|name| name == "all") {
        return Ok(ActorKind::ALL.to_vec());
    }
    names
        .iter()
        .filter(|name| !name.is_empty())
        .map(|name| {
            ActorKind::from_name(name)
                .ok_or_else(|| anyhow::anyhow!("unknown actor kind {name:?} for --inject"))
        })
        .collect()
}

fn run_ctl_command(command: CtlCommand) -> anyhow::Result<()> {
    match command {
        CtlCommand::Members {
            control,
            token,
            command,
        } => run_members_command(
            &MembershipClient::new(&control, token_or_dev_token(token)),
            command.unwrap_or(MembersCommand::List { json: false }),
        )?,
        CtlCommand::Status {
            control,
            json,
            timeout_ms,
        } => {
            let report = ctl::gather(&control, std::time::Duration::from_millis(timeout_ms));
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", ctl::format_table(&report));
            }
            if let Some(problem) = report.failure() {
                anyhow::bail!("{problem}");
            }
        }
        CtlCommand::Drill {
            nbd,
            export,
            control,
            proxy_control,
            duration,
            kill_interval,
            inject,
            seed,
            blocks,
            requests_in_flight,
            json,
            token,
        } => {
            let inject = parse_actor_kinds(&inject)?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let options = raftblk::drill::DrillOptions {
                nbd_address: nbd,
                export_name: export,
                controls: control,
                proxy_control: (!proxy_control.is_empty()).then_some(proxy_control),
                token: token_or_dev_token(token),
                duration: parse_duration_text(&duration)?,
                kill_interval: parse_duration_text(&kill_interval)?,
                inject,
                seed,
                blocks,
                requests_in_flight,
            };
            eprintln!(
                "drill: seed {seed}, {} s, kill every {} ms, inject [{}]",
                options.duration.as_secs(),
                options.kill_interval.as_millis(),
                options
                    .inject
                    .iter()
                    .map(|kind| kind.name())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let report = raftblk::drill::run_drill(options)?;
            print!("{}", report.render());
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            if !report.passed() {
                anyhow::bail!("the drill failed");
            }
        }
        CtlCommand::Volumes { command } => run_volume_command(command)?,
        CtlCommand::Certs { command } => run_certs_command(command)?,
    }
    Ok(())
}

fn run_certs_command(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, name } => {
            raftblk::tls::init_authority(&dir, &name)?;
            println!(
                "certificate authority in {}: {} (give it out), {} (keep it here)",
                dir.display(),
                raftblk::tls::CA_CERT,
                raftblk::tls::CA_KEY
            );
        }
        CertsCommand::Issue {
            ca,
            out,
            node,
            client,
            hosts,
        } => {
            let subject = match (node, client) {
                (Some(id), None) => raftblk::tls::Subject::Node { id, hosts },
                (None, Some(name)) => raftblk::tls::Subject::Client { name },
                _ => anyhow::bail!("give exactly one of --node and --client"),
            };
            raftblk::tls::issue(&ca, &out, &subject)?;
            println!("issued {subject:?} into {}", out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Test builds read named fault-injection points from the FAILPOINTS environment variable
    // (e.g. `FAILPOINTS=storage_actor_apply=20*off->1*panic->off`); release builds have none.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let result = match cli.command {
        CliCommand::Server(args) => run_server(args),
        CliCommand::Dev(args) => run_dev(args),
        CliCommand::Proxy(args) => run_proxy(args),
        CliCommand::Volume { command } => run_volume_command(command),
        CliCommand::Ctl { command } => run_ctl_command(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("raftblk: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_members(body: &MembersBody) {
    println!(
        "{:>4}  {:<15} {:<22} {:<22} {:<22} {:>9} {:>9}  state",
        "id", "role", "peer", "nbd", "control", "matched", "behind"
    );
    for view in &body.members {
        let leader = if view.member.id == body.leader_id {
            " (leader)"
        } else {
            ""
        };
        let (matched, behind, state) = match &view.progress {
            Some(progress) => (
                progress.matched.to_string(),
                body.commit_index
                    .saturating_sub(progress.matched)
                    .to_string(),
                format!(
                    "{}{}",
                    progress.state,
                    if progress.recent_active {
                        ""
                    } else {
                        ", inactive"
                    }
                ),
            ),
            None => ("-".into(), "-".into(), String::new()),
        };
        println!(
            "{:>4}  {:<15} {:<22} {:<22} {:<22} {:>9} {:>9}  {state}{leader}",
            view.member.id,
            view.role,
            view.member.peer,
            view.member.nbd,
            view.member.control,
            matched,
            behind
        );
    }
}

/// Draws a learner's catch-up progress bar on stderr.
fn draw_progress(matched: u64, commit: u64) {
    const WIDTH: u64 = 40;
    let filled = (matched.min(commit) * WIDTH)
        .checked_div(commit)
        .unwrap_or(WIDTH);
    eprint!(
        "\r[{}{}] {matched}/{commit}",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    );
}

/// Adds a learner and waits for it to catch up, drawing a progress bar on stderr.
fn add_and_catch_up(client: &MembershipClient, member: &NewMemberArgs) -> anyhow::Result<()> {
    let record = MemberConfig {
        id: member.id,
        peer: member.peer.clone(),
        nbd: member.nbd.clone(),
        control: member.member_control.clone(),
    };
    client.add_learner(&record)?;
    eprintln!("node {} added as a learner; catching up", member.id);
    let took = client.wait_caught_up(
        member.id,
        std::time::Duration::from_secs(member.catch_up_timeout_s),
        draw_progress,
    )?;
    eprintln!("\nnode {} caught up in {:.1?}", member.id, took);
    Ok(())
}

/// Promotes learner `id` (replacing `old` in the same joint change), letting the leader wait
/// for it up to `timeout_s`, with the progress bar drawn meanwhile.
fn promote(
    client: &MembershipClient,
    id: u64,
    old: Option<u64>,
    timeout_s: u64,
) -> anyhow::Result<MembersBody> {
    let result = client.promote(
        id,
        old,
        std::time::Duration::from_secs(timeout_s),
        draw_progress,
    );
    eprintln!();
    Ok(result?)
}

fn run_members_command(client: &MembershipClient, command: MembersCommand) -> anyhow::Result<()> {
    let body = match command {
        MembersCommand::List { json } => {
            let body = client.members()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            body
        }
        MembersCommand::Add { member, learner } => {
            add_and_catch_up(client, &member)?;
            if learner {
                client.members()?
            } else {
                let body = promote(client, member.id, None, member.catch_up_timeout_s)?;
                eprintln!("node {} promoted to voter", member.id);
                body
            }
        }
        MembersCommand::Promote {
            id,
            replace,
            timeout_s,
        } => {
            let body = promote(client, id, replace, timeout_s)?;
            match replace {
                Some(old) => eprintln!(
                    "node {id} replaced node {old} (joint consensus); node {old} can be stopped"
                ),
                None => eprintln!("node {id} promoted to voter"),
            }
            body
        }
        MembersCommand::Remove { id, force } => {
            let body = client.remove(id, force)?;
            eprintln!("node {id} removed; it can be stopped");
            body
        }
        MembersCommand::Replace { old, member } => {
            add_and_catch_up(client, &member)?;
            let body = promote(client, member.id, Some(old), member.catch_up_timeout_s)?;
            eprintln!(
                "node {} replaced node {old} (joint consensus); node {old} can be stopped",
                member.id
            );
            body
        }
    };
    print_members(&body);
    Ok(())
}

/// The token given, else the one `raftblk dev` keeps in its default data directory, so the
/// commands work on the dev cluster as they are.
fn token_or_dev_token(token: Option<String>) -> Option<String> {
    token.or_else(|| {
        std::fs::read_to_string("raftblk-data/control.token")
            .ok()
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty())
    })
}
