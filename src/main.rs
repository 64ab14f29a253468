//! The `raftblk` command: `server` runs a storage server; `volume` manages volumes through a
//! running server's control API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use raftblk::config::{Config, LogFormat};
use raftblk::control::{ControlClient, CreateVolumeRequest};

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
    /// Run the client-side proxy: a local NBD endpoint for the cluster's volumes that follows
    /// the leader and hides server crashes.
    Proxy(ProxyArgs),
    /// Create, list or delete volumes on a running server.
    Volume {
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
    let (logger, _logging_guard) = raftblk::logging::build_logger(&config.log);
    install_panic_logger(&logger, config.log.format);
    let system = actix::System::new();
    let result = system.block_on(raftblk::proxy::run_proxy(
        config,
        logger.clone(),
        args.ready_file,
    ));
    if let Err(error) = &result {
        slog::crit!(logger, "proxy failed"; "error" => format!("{error:#}"));
    }
    result
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
        #[arg(long, default_value = "127.0.0.1:10810")]
        control: String,
    },
    /// List volumes.
    List {
        #[arg(long, default_value = "127.0.0.1:10810")]
        control: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and its data.
    Delete {
        name: String,
        #[arg(long, default_value = "127.0.0.1:10810")]
        control: String,
    },
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
    if let Some(format) = args.log_format {
        overrides.push(("log.format", format));
    }
    if let Some(level) = args.log_level {
        overrides.push(("log.level", level));
    }
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let (logger, _logging_guard) = raftblk::logging::build_logger(&config.log);
    install_panic_logger(&logger, config.log.format);
    let system = actix::System::new();
    let result = system.block_on(raftblk::server::run_server(
        config,
        logger.clone(),
        args.ready_file,
    ));
    if let Err(error) = &result {
        slog::crit!(logger, "server failed"; "error" => format!("{error:#}"));
    }
    result
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
            control,
        } => {
            // Storage sizes are binary: 64M means 64 MiB, as in qemu-img and truncate.
            let size_bytes = parse_size::Config::new()
                .with_binary()
                .parse_size(&size)
                .map_err(|error| anyhow::anyhow!("invalid --size '{size}': {error}"))?;
            let info = ControlClient::new(&control).create_volume(&CreateVolumeRequest {
                name,
                size_bytes,
                block_size_bytes: block_size,
            })?;
            println!(
                "created volume {} ({} bytes, block size {}): nbd://<server>/{}",
                info.name, info.size_bytes, info.block_size_bytes, info.name
            );
        }
        VolumeCommand::List { control, json } => {
            let volumes = ControlClient::new(&control).list_volumes()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&volumes)?);
            } else {
                println!("{:<32} {:>16} {:>10}", "NAME", "SIZE_BYTES", "BLOCK_SIZE");
                for volume in volumes {
                    println!(
                        "{:<32} {:>16} {:>10}",
                        volume.name, volume.size_bytes, volume.block_size_bytes
                    );
                }
            }
        }
        VolumeCommand::Delete { name, control } => {
            ControlClient::new(&control).delete_volume(&name)?;
            println!("deleted volume {name}");
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
        CliCommand::Proxy(args) => run_proxy(args),
        CliCommand::Volume { command } => run_volume_command(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("raftblk: {error:#}");
            ExitCode::FAILURE
        }
    }
}
