//! The `raftblk` command: `server` runs a storage server; `dev` a whole three-server cluster and
//! a proxy on loopback; `volume` and `ctl` talk to running servers' control APIs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use raftblk::config::{Config, LogFormat};
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

#[derive(Subcommand)]
enum CtlCommand {
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
    /// Once serving, write {"nbd","control","pid"} as JSON to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// terminal or json.
    #[arg(long)]
    log_format: Option<String>,
    /// trace, debug, info, warning, error or critical.
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
    /// Take volumes over even if another client has them attached (fences that client).
    #[arg(long)]
    force_attach: bool,
    /// Once serving, write {"nbd","pid","client_id"} as JSON to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// terminal or json.
    #[arg(long)]
    log_format: Option<String>,
    /// trace, debug, info, warning, error or critical.
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
    if args.force_attach {
        overrides.push(("proxy.force_attach", "true".to_string()));
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
fn parse_size_argument(size: &str) -> anyhow::Result<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(size)
        .map_err(|error| anyhow::anyhow!("invalid --size '{size}': {error}"))
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
        slog::error!(logger, "panic"; "message" => info.to_string(), "location" => location);
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
                size_bytes: parse_size_argument(&size)?,
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
            let size_bytes = parse_size_argument(&size)?;
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

fn run_ctl_command(command: CtlCommand) -> anyhow::Result<()> {
    match command {
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
        CtlCommand::Volumes { command } => run_volume_command(command)?,
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
