//! Wires one server process together: opens RocksDB, starts the storage and Raft actors (each
//! on its own arbiter, under an `actix::Supervisor`) and the peer transport (on a third),
//! creates the default volume on a new cluster, starts the NBD listener and the control API,
//! announces readiness, and shuts down cleanly on SIGINT/SIGTERM (checkpoint, then stop every
//! actor before RocksDB closes).
//!
//! A new cluster: every member bootstraps the same initial voter set (`cluster.members`, or
//! this node alone when that is empty), and whichever member leads first creates the default
//! volume; a racing member's duplicate is rejected by the state machine as `VolumeExists`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use bytes::Bytes;
use raft::prelude::ConfState;

use crate::actors::listener::{ListenerTls, NbdListenerActor, StopAccepting};
use crate::actors::messages::{Checkpoint, GetRaftStatus};
use crate::actors::peer::{start_peer_transport, PeerContext, PeerNetwork, SnapshotInbox};
use crate::actors::raft::{propose_until, RaftActor, RaftActorParams, ReadGate};
use crate::actors::storage::{ConnectRaft, StorageActor, StorageActorParams, VolumeRegistry};
use crate::actors::supervisor::{ActorKind, RestartCounters, SupervisedActor, Supervision};
use crate::config::{Config, TlsMode};
use crate::control::{self, ControlState};
use crate::nbd::handshake::TlsOffer;
use crate::storage::command::{encode_command, Command};
use crate::storage::raft_log::RaftLogStore;
use crate::storage::{open_db, StorageOptions};
use crate::DEFAULT_GROUP_ID;

/// Addresses a started server listens on, written to the ready file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadyInfo {
    pub nbd: SocketAddr,
    pub control: SocketAddr,
    /// The peer transport's address; absent in a one-voter group.
    pub peer: Option<SocketAddr>,
    pub pid: u32,
}

/// Writes `info` to `path` atomically, so a reader never sees a half-written file. Shared by
/// every process kind that announces readiness (server, proxy).
pub fn write_ready_file(path: &Path, info: &impl serde::Serialize) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec(info)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Creates the default volume of a new cluster once a leader exists: proposed by this node
/// only while it leads, so one member normally creates it; returns when it exists.
async fn ensure_default_volume(
    raft: Addr<RaftActor>,
    registry: VolumeRegistry,
    config: crate::config::DefaultVolumeConfig,
    request_timeout: Duration,
    logger: slog::Logger,
) {
    loop {
        if registry.get(&config.name).is_some() {
            return;
        }
        let leads = matches!(raft.send(GetRaftStatus).await,
            Ok(status) if status.role == "Leader" && status.applied_index >= status.commit_index);
        if leads {
            let command = encode_command(&Command::CreateVolume {
                name: &config.name,
                size_bytes: config.size_bytes,
                block_size_bytes: config.block_size_bytes,
            });
            match propose_until(
                &raft,
                Bytes::from(command),
                Instant::now() + request_timeout,
            )
            .await
            {
                Ok(outcome) => {
                    slog::info!(logger, "default volume created"; "name" => &config.name,
                        "size_bytes" => config.size_bytes, "outcome" => ?outcome);
                }
                Err(error) => {
                    slog::warn!(logger, "creating the default volume failed; retrying";
                        "error" => %error);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resolves on SIGINT or SIGTERM; every long-running process kind stops cleanly on it.
pub async fn shutdown_signal() {
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
    let voters: Vec<u64> = if config.cluster.members.is_empty() {
        vec![config.node.id]
    } else {
        config
            .cluster
            .members
            .iter()
            .map(|member| member.id)
            .collect()
    };
    let joining = config.cluster.join;
    if new_cluster && joining {
        // Not a member yet: no voters, only the addresses to answer the group at. The
        // leader's snapshot brings the conf state and the group's own directory.
        log_store.set_members(&config.cluster.members)?;
        slog::info!(logger, "waiting to be added to a running group"; "node" => config.node.id);
    } else if new_cluster {
        let conf_state = ConfState {
            voters: voters.clone(),
            ..Default::default()
        };
        log_store.bootstrap(conf_state, &config.cluster.members)?;
        slog::info!(logger, "new Raft group bootstrapped"; "group" => DEFAULT_GROUP_ID,
            "node" => config.node.id, "voters" => ?voters);
    } else if log_store.members().is_empty() && !config.cluster.members.is_empty() {
        // A group bootstrapped before the directory was kept in RocksDB.
        log_store.set_members(&config.cluster.members)?;
    }
    // Membership is dynamic once a cluster is configured: the transport runs even while this
    // node is the only member, so members can be added.
    let clustered = !config.cluster.members.is_empty() || log_store.members().len() > 1;

    let restarts = RestartCounters::new();
    let supervision = |kind: ActorKind| Supervision {
        kind,
        logger: logger.new(slog::o!("actor" => kind.name())),
        counters: restarts.clone(),
    };
    let registry = VolumeRegistry::default();
    let applied_index = Arc::new(AtomicU64::new(0));
    // Nothing waits for an applied index until the Raft actor says so.
    let applied_wanted = Arc::new(AtomicU64::new(u64::MAX));
    // Snapshots for lagging followers are taken at the applied index.
    log_store.set_applied_index_source(applied_index.clone());

    let storage_arbiter = Arbiter::new();
    let read_gate = ReadGate::default();
    let storage_params = StorageActorParams {
        group_id: DEFAULT_GROUP_ID,
        data_dir: data_dir.clone(),
        db: db.clone(),
        config: config.storage.clone(),
        log_store: log_store.clone(),
        registry: registry.clone(),
        applied_index: applied_index.clone(),
        applied_wanted: applied_wanted.clone(),
        read_gate: read_gate.clone(),
        supervision: supervision(ActorKind::Storage),
    };
    let storage = SupervisedActor::start_in_arbiter(
        &storage_arbiter.handle(),
        supervision(ActorKind::Storage),
        move |_| StorageActor::new(storage_params),
    );
    // The Raft node starts from the applied index the storage actor publishes once it has
    // opened the state machine; this round trip waits for that.
    storage
        .send(Checkpoint)
        .await
        .context("the storage actor did not start")?
        .context("the storage actor did not open its state")?;

    let peer_supervision = supervision(ActorKind::Peer);
    let (network, peer_links) = PeerNetwork::new(
        config.node.id,
        &config.peer,
        peer_supervision.logger.clone(),
    );
    network.set_members(&log_store.members());
    let snapshots = SnapshotInbox::default();
    let raft_arbiter = Arbiter::new();
    let raft_params = RaftActorParams {
        group_id: DEFAULT_GROUP_ID,
        node_id: config.node.id,
        config: config.raft.clone(),
        request_timeout: Duration::from_millis(config.nbd.request_timeout_ms),
        log_store: log_store.clone(),
        storage: StorageActor::link(&storage),
        applied_index: applied_index.clone(),
        applied_wanted,
        read_gate: read_gate.clone(),
        supervision: supervision(ActorKind::Raft),
        network: network.clone(),
        snapshots: snapshots.clone(),
    };
    let raft = SupervisedActor::start_in_arbiter(
        &raft_arbiter.handle(),
        supervision(ActorKind::Raft),
        move |_| RaftActor::new(raft_params),
    );
    storage.do_send(ConnectRaft(RaftActor::link(&raft)));

    let mut peer_address = None;
    if clustered {
        let peer_listener = std::net::TcpListener::bind(config.peer.listen)
            .with_context(|| format!("binding the peer transport to {}", config.peer.listen))?;
        peer_listener.set_nonblocking(true)?;
        peer_address = Some(peer_listener.local_addr()?);
        let peer_tls = if config.tls.peers {
            let directory = config.tls.directory(&config.node.data_dir);
            Some(crate::tls::PeerTls::load(&directory).with_context(|| {
                format!(
                    "loading the peer TLS certificates from {}",
                    directory.display()
                )
            })?)
        } else {
            None
        };
        let context = PeerContext {
            node_id: config.node.id,
            group_id: DEFAULT_GROUP_ID,
            config: config.peer.clone(),
            network,
            images_dir: data_dir.join(crate::storage::IMAGES_DIRECTORY_NAME),
            raft: RaftActor::link(&raft),
            storage: StorageActor::link(&storage),
            snapshots,
            supervision: peer_supervision,
            tls: peer_tls,
        };
        // On the Raft actor's thread: a message read from a peer is stepped, and a message
        // Raft sends is written, without waking another thread.
        raft_arbiter.spawn(async move {
            match tokio::net::TcpListener::from_std(peer_listener) {
                Ok(listener) => start_peer_transport(listener, peer_links, context),
                Err(error) => slog::crit!(context.supervision.logger,
                    "the peer listener cannot be registered"; "error" => %error),
            }
        });
    }

    let request_timeout = Duration::from_millis(config.nbd.request_timeout_ms);
    if new_cluster && !joining && config.default_volume.create {
        let creation = ensure_default_volume(
            raft.clone(),
            registry.clone(),
            config.default_volume.clone(),
            request_timeout,
            logger.clone(),
        );
        if voters.len() == 1 {
            // Alone, this node elects itself at once: be ready only with the volume there.
            tokio::time::timeout(request_timeout, creation)
                .await
                .map_err(|_| anyhow::anyhow!("creating the default volume timed out"))?;
        } else {
            actix_rt::spawn(creation);
        }
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
    )?
    .with_tls(nbd_tls(&config)?)
    .start_supervised();

    let control_state = actix_web::web::Data::new(ControlState {
        raft: raft.clone(),
        registry: registry.clone(),
        restarts: restarts.clone(),
        request_timeout,
        storage: storage.clone(),
        log_store: log_store.clone(),
    });
    if config.control.token.is_empty() {
        slog::warn!(
            logger,
            "control.token is empty: the control API accepts changes from \
            anyone who can reach it (development mode)"
        );
    }
    let control_token =
        actix_web::web::Data::new(control::auth::ControlToken(config.control.token.clone()));
    let control_server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .wrap(actix_web::middleware::from_fn(control::auth::require_token))
            .app_data(control_token.clone())
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
                peer: peer_address,
                pid: std::process::id(),
            },
        )?;
    }

    // Ends on SIGINT/SIGTERM, or when supervision gives up on an actor (restart intensity
    // exceeded, corruption detected): the same clean shutdown, then a non-zero exit.
    let escalation = tokio::select! {
        _ = shutdown_signal() => None,
        reason = restarts.escalated() => Some(reason),
    };
    slog::info!(logger, "shutting down"; "escalation" => escalation.as_deref().unwrap_or("none"));
    listener.do_send(StopAccepting);
    control_handle.stop(true).await;
    // Make everything applied durable so the next start replays nothing.
    match storage.send(Checkpoint).await {
        Ok(Ok(index)) => slog::info!(logger, "final checkpoint"; "durable_applied_index" => index),
        Ok(Err(error)) => slog::warn!(logger, "final checkpoint failed"; "error" => %error),
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
    slog::info!(logger, "RocksDB closed");
    match escalation {
        Some(reason) => Err(anyhow::anyhow!("supervision escalated: {reason}")),
        None => Ok(()),
    }
}

/// TLS on the NBD listener as `[tls]` configures it; the certificates are read now, so a
/// missing or unreadable one stops the start with its path.
fn nbd_tls(config: &Config) -> anyhow::Result<Option<ListenerTls>> {
    let offer = match config.tls.mode {
        TlsMode::Off => return Ok(None),
        TlsMode::On => TlsOffer::Optional,
        TlsMode::Require => TlsOffer::Required,
    };
    let directory = config.tls.directory(&config.node.data_dir);
    let server =
        crate::tls::server_config(&directory, config.tls.verify_clients).with_context(|| {
            format!(
                "loading the NBD TLS certificates from {}",
                directory.display()
            )
        })?;
    Ok(Some(ListenerTls {
        offer,
        acceptor: tokio_rustls::TlsAcceptor::from(server),
    }))
}
