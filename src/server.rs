//! Wires one server process together: opens RocksDB, starts the storage and Raft actors (each
//! on its own arbiter, under an `actix::Supervisor`), creates the default volume on a new
//! cluster, starts the NBD listener and the control API, announces readiness, and shuts down
//! cleanly on SIGINT/SIGTERM (checkpoint, then stop every actor before RocksDB closes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use bytes::Bytes;
use raft::prelude::ConfState;

use crate::actors::listener::NbdListenerActor;
use crate::actors::messages::{Checkpoint, GetRaftStatus};
use crate::actors::raft::{propose_until, RaftActor, RaftActorParams, ReadGate};
use crate::actors::storage::{ConnectRaft, StorageActor, StorageActorParams, VolumeRegistry};
use crate::actors::supervisor::{ActorKind, RestartCounters, Supervision};
use crate::config::Config;
use crate::control::{self, ControlState};
use crate::storage::command::{encode_command, Command};
use crate::storage::raft_log::RaftLogStore;
use crate::storage::{open_db, StorageOptions};
use crate::DEFAULT_GROUP_ID;

/// Addresses a started server listens on, written to the ready file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadyInfo {
    pub nbd: SocketAddr,
    pub control: SocketAddr,
    pub pid: u32,
}

/// Writes `info` to `path` atomically, so a reader never sees a half-written file.
fn write_ready_file(path: &Path, info: &ReadyInfo) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec(info)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn wait_for_leadership(raft: &Addr<RaftActor>, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = raft.send(GetRaftStatus).await {
            if status.role == "Leader" && status.applied_index >= status.commit_index {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("this node did not become Raft leader within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// Runs a server until SIGINT/SIGTERM. Must be called inside an actix `System`.
pub async fn run_server(
    config: Config,
    logger: slog::Logger,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let data_dir = config.node.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let db = open_db(
        &data_dir,
        &StorageOptions {
            block_cache_bytes: config.storage.rocksdb_block_cache_bytes,
            write_buffer_bytes: config.storage.rocksdb_write_buffer_bytes,
            max_background_jobs: config.storage.rocksdb_max_background_jobs,
        },
    )
    .with_context(|| format!("opening RocksDB in {}", data_dir.display()))?;
    let log_store = RaftLogStore::open(db.clone(), DEFAULT_GROUP_ID)?;
    let new_cluster = !log_store.is_bootstrapped();
    if new_cluster {
        // A new one-voter group: this node is the whole cluster.
        let conf_state = ConfState {
            voters: vec![config.node.id],
            ..Default::default()
        };
        log_store.bootstrap(conf_state)?;
        slog::info!(logger, "new Raft group bootstrapped"; "group" => DEFAULT_GROUP_ID,
            "node" => config.node.id);
    }

    let restarts = RestartCounters::new();
    let supervision = |kind: ActorKind| Supervision {
        kind,
        logger: logger.new(slog::o!("actor" => kind.name())),
        counters: restarts.clone(),
    };
    let registry = VolumeRegistry::default();
    let applied_index = Arc::new(AtomicU64::new(0));

    let storage_arbiter = Arbiter::new();
    let storage_params = StorageActorParams {
        group_id: DEFAULT_GROUP_ID,
        data_dir: data_dir.clone(),
        db: db.clone(),
        config: config.storage.clone(),
        log_store: log_store.clone(),
        registry: registry.clone(),
        applied_index: applied_index.clone(),
        supervision: supervision(ActorKind::Storage),
    };
    let storage = actix::Supervisor::start_in_arbiter(&storage_arbiter.handle(), move |_| {
        StorageActor::new(storage_params)
    });
    // The Raft node starts from the applied index the storage actor publishes once it has
    // opened the state machine; this round trip waits for that.
    storage
        .send(Checkpoint)
        .await
        .context("the storage actor did not start")?
        .map_err(|error| anyhow::anyhow!(error))?;

    let read_gate = ReadGate::default();
    let raft_arbiter = Arbiter::new();
    let raft_params = RaftActorParams {
        group_id: DEFAULT_GROUP_ID,
        node_id: config.node.id,
        config: config.raft.clone(),
        request_timeout: Duration::from_millis(config.nbd.request_timeout_ms),
        log_store: log_store.clone(),
        storage: storage.clone(),
        applied_index: applied_index.clone(),
        read_gate: read_gate.clone(),
        supervision: supervision(ActorKind::Raft),
    };
    let raft = actix::Supervisor::start_in_arbiter(&raft_arbiter.handle(), move |_| {
        RaftActor::new(raft_params)
    });
    storage.do_send(ConnectRaft(raft.clone()));

    let election_timeout =
        Duration::from_millis(config.raft.tick_interval_ms * config.raft.election_ticks as u64);
    wait_for_leadership(&raft, election_timeout * 5 + Duration::from_secs(5)).await?;

    let request_timeout = Duration::from_millis(config.nbd.request_timeout_ms);
    if new_cluster
        && config.default_volume.create
        && registry.get(&config.default_volume.name).is_none()
    {
        let command = encode_command(&Command::CreateVolume {
            name: &config.default_volume.name,
            size_bytes: config.default_volume.size_bytes,
            block_size_bytes: config.default_volume.block_size_bytes,
        });
        propose_until(
            &raft,
            Bytes::from(command),
            Instant::now() + request_timeout,
        )
        .await
        .map_err(|error| anyhow::anyhow!("creating the default volume failed: {error}"))?;
        slog::info!(logger, "default volume created"; "name" => &config.default_volume.name,
            "size_bytes" => config.default_volume.size_bytes);
    }

    let nbd_listener = tokio::net::TcpListener::bind(config.nbd.listen)
        .await
        .with_context(|| format!("binding the NBD listener to {}", config.nbd.listen))?;
    let nbd_address = nbd_listener.local_addr()?;
    let listener_supervision = supervision(ActorKind::Listener);
    let listener = NbdListenerActor::new(
        nbd_listener,
        config.nbd.clone(),
        registry.clone(),
        config.default_volume.name.clone(),
        raft.clone(),
        read_gate.clone(),
        listener_supervision,
    )
    .start();

    let control_state = actix_web::web::Data::new(ControlState {
        raft: raft.clone(),
        registry: registry.clone(),
        restarts: restarts.clone(),
        request_timeout,
    });
    let control_server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(control_state.clone())
            .app_data(actix_web::web::JsonConfig::default().limit(64 * 1024))
            .configure(control::configure)
    })
    .workers(config.control.workers)
    .disable_signals()
    .bind(config.control.listen)
    .with_context(|| format!("binding the control API to {}", config.control.listen))?;
    let control_address = control_server
        .addrs()
        .first()
        .copied()
        .context("the control API has no address")?;
    let control_server = control_server.run();
    let control_handle = control_server.handle();
    actix_rt::spawn(control_server);

    slog::info!(logger, "raftblk server ready";
        "nbd" => %nbd_address, "control" => %control_address,
        "data_dir" => %data_dir.display(), "volumes" => registry.names().join(","));
    if let Some(path) = ready_file {
        write_ready_file(
            &path,
            &ReadyInfo {
                nbd: nbd_address,
                control: control_address,
                pid: std::process::id(),
            },
        )?;
    }

    shutdown_signal().await;
    slog::info!(logger, "shutting down");
    listener.do_send(StopListener);
    control_handle.stop(true).await;
    // Make everything applied durable so the next start replays nothing.
    match storage.send(Checkpoint).await {
        Ok(Ok(index)) => slog::info!(logger, "final checkpoint"; "durable_applied_index" => index),
        Ok(Err(error)) => slog::warn!(logger, "final checkpoint failed"; "error" => error),
        Err(error) => slog::warn!(logger, "final checkpoint failed"; "error" => %error),
    }
    // Stop the actors (they hold RocksDB handles) before the database is dropped here.
    raft_arbiter.stop();
    storage_arbiter.stop();
    let _ = raft_arbiter.join();
    let _ = storage_arbiter.join();
    drop(raft);
    drop(storage);
    drop(log_store);
    drop(db);
    Ok(())
}

/// Stops the NBD listener from accepting new connections.
#[derive(Message)]
#[rtype(result = "()")]
struct StopListener;

impl Handler<StopListener> for NbdListenerActor {
    type Result = ();
    fn handle(&mut self, _: StopListener, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
