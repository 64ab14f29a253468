//! `raftblk proxy`: a local NBD endpoint on the client's machine that presents the cluster's
//! volumes and hides server crashes from the client.
//!
//! ```text
//!  NBD client ──▶ NbdListenerActor<ProxyService> ──▶ NbdSessionActor<ProxyBackend>
//!                      │ prepare_export: attach                │ reads: CacheActor, then upstream
//!                      ▼                                       ▼
//!               control API (attach)          upstream task (one per volume) ──NBD──▶ leader
//!  ClusterView ──GET /v1/status──▶ every server (leader, members' NBD addresses, volumes)
//! ```
//!
//! - [`discovery`]: polls the servers' status; attach/detach calls.
//! - [`upstream`]: the per-volume connection to the cluster; reissues unanswered requests after
//!   any failure, on a new epoch.
//! - [`cache`]: the read-through block cache actor (bounded, LRU, never stale).
//! - [`service`]: glues them into the shared listener/session code (`crate::actors`).
//!
//! Invariant: a request is answered to the client only with the cluster's answer to it, or
//! with an error after `request_deadline_ms`; a write is never acknowledged before the cluster
//! acknowledged it.

pub mod cache;
pub mod discovery;
pub mod service;
pub mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;

use crate::actors::listener::{ListenerLimits, NbdListenerActor, StopAccepting};
use crate::actors::supervisor::{ActorKind, RestartCounters, SupervisedActor, Supervision};
use crate::config::Config;
use cache::CacheActor;
use discovery::{detach_once, ClusterView, ServerEndpoint};
use service::{ProxyService, ProxyShared};

use crate::server::{shutdown_signal, write_ready_file};

/// Written to `--ready-file` once the proxy accepts connections.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxyReadyInfo {
    pub nbd: std::net::SocketAddr,
    pub pid: u32,
    pub client_id: String,
    /// The metrics listener's address, when `proxy.metrics_listen` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Marks this process as one that flushes I/O for others (`PR_SET_IO_FLUSHER`), so memory
/// reclaim triggered by a kernel nbd device backed by this proxy cannot wait on the proxy's own
/// allocations (a deadlock). Needs CAP_SYS_RESOURCE; without it, a warning.
fn set_io_flusher(logger: &slog::Logger) {
    // PR_SET_IO_FLUSHER = 57 (Linux 5.6).
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes plain integers and touches no memory of ours.
    let result = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        slog::warn!(logger, "PR_SET_IO_FLUSHER not set; under memory pressure a kernel nbd \
            client on this host could deadlock with the proxy"; "error" => %error);
    } else {
        slog::info!(logger, "PR_SET_IO_FLUSHER set");
    }
}

/// Runs the proxy until SIGINT/SIGTERM. Must be called inside an actix `System`.
pub async fn run_proxy(
    config: Config,
    logger: slog::Logger,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    set_io_flusher(&logger);
    let proxy = config.proxy.clone();
    let endpoints: Vec<ServerEndpoint> = proxy
        .servers
        .iter()
        .filter_map(|server| ServerEndpoint::parse(server))
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("proxy.servers is empty: give the servers' control addresses (--servers)");
    }
    let client_id = proxy.effective_client_id();
    let upstream_tls = if proxy.upstream_tls_dir.as_os_str().is_empty() {
        None
    } else {
        let config = crate::tls::client_config(&proxy.upstream_tls_dir).with_context(|| {
            format!(
                "loading the upstream TLS certificates from {}",
                proxy.upstream_tls_dir.display()
            )
        })?;
        Some(tokio_rustls::TlsConnector::from(config))
    };
    let view = ClusterView::new(
        endpoints,
        Duration::from_millis(proxy.control_timeout_ms),
        config.control.token.clone(),
    );
    let metrics_address = if proxy.metrics_listen.is_empty() {
        None
    } else {
        let listen: std::net::SocketAddr = proxy.metrics_listen.parse().with_context(|| {
            format!(
                "proxy.metrics_listen '{}' is not ip:port",
                proxy.metrics_listen
            )
        })?;
        Some(
            crate::metrics::serve_proxy_metrics(
                listen,
                logger.new(slog::o!("component" => "metrics")),
            )
            .await?,
        )
    };
    view.poll_once().await;
    actix_rt::spawn(view.clone().run(
        Duration::from_millis(proxy.status_poll_interval_ms),
        logger.new(slog::o!("component" => "discovery")),
    ));
    let restarts = RestartCounters::new();
    let supervision = |kind: ActorKind| Supervision {
        kind,
        logger: logger.new(slog::o!("actor" => kind.name())),
        counters: restarts.clone(),
    };
    let cache = (proxy.cache_bytes > 0).then(|| {
        let cache_supervision = supervision(ActorKind::Cache);
        let capacity_bytes = proxy.cache_bytes;
        let block_size_bytes = proxy.cache_block_size_bytes;
        SupervisedActor::start(cache_supervision.clone(), move |_| {
            CacheActor::new(capacity_bytes, block_size_bytes, cache_supervision)
        })
    });
    let shared = Arc::new(ProxyShared {
        view: view.clone(),
        client_id: client_id.clone(),
        force_attach: proxy.force_attach,
        request_max_bytes: config.nbd.request_max_bytes,
        reply_timeout: Duration::from_millis(proxy.upstream_reply_timeout_ms),
        upstream_queue_max: proxy.upstream_queue_max,
        cache,
        volumes: Mutex::new(HashMap::new()),
        attach_lock: tokio::sync::Mutex::new(()),
        next_cache_key: AtomicU64::new(1),
        logger: logger.new(slog::o!("component" => "proxy")),
        upstream_tls,
    });
    let limits = ListenerLimits {
        connections_max: proxy.connections_max,
        requests_in_flight_per_session_max: proxy.requests_in_flight_per_session_max,
        bytes_in_flight_per_session_max: proxy.bytes_in_flight_per_session_max,
        bytes_in_flight_max: proxy.bytes_in_flight_max,
        request_max_bytes: config.nbd.request_max_bytes,
        option_length_max_bytes: config.nbd.option_length_max_bytes,
        // Attaching may wait for a leader election: give the handshake room for it.
        handshake_timeout_ms: config
            .nbd
            .handshake_timeout_ms
            .max(proxy.control_timeout_ms * 3),
        request_timeout_ms: proxy.request_deadline_ms,
    };
    let listener = tokio::net::TcpListener::bind(proxy.listen)
        .await
        .with_context(|| format!("binding the proxy's NBD listener to {}", proxy.listen))?;
    let nbd_address = listener.local_addr()?;
    let listener_actor = NbdListenerActor::with_service(
        listener,
        limits,
        ProxyService {
            shared: shared.clone(),
        },
        supervision(ActorKind::Listener),
    )?;
    let connections = listener_actor.connections();
    let listener_address = listener_actor.start_supervised();
    let control_handle = if proxy.control_listen.is_empty() {
        None
    } else {
        let address: std::net::SocketAddr = proxy.control_listen.parse().with_context(|| {
            format!(
                "proxy.control_listen {:?} is not ip:port",
                proxy.control_listen
            )
        })?;
        let state = actix_web::web::Data::new(crate::control::ProxyControlState {
            restarts: restarts.clone(),
        });
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(state.clone())
                .configure(crate::control::configure_proxy)
        })
        .workers(1)
        .disable_signals()
        .bind(address)
        .with_context(|| format!("binding the proxy's control API to {address}"))?
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Some(handle)
    };
    let (snapshot, _) = view.snapshot();
    slog::info!(logger, "raftblk proxy ready"; "nbd" => %nbd_address, "client_id" => &client_id,
        "servers_reachable" => snapshot.servers_reachable, "leader_id" => snapshot.leader_id);
    if let Some(path) = ready_file {
        write_ready_file(
            &path,
            &ProxyReadyInfo {
                nbd: nbd_address,
                pid: std::process::id(),
                client_id: client_id.clone(),
                metrics: metrics_address,
            },
        )?;
    }

    // Ends on SIGINT/SIGTERM, or when supervision gives up on an actor: the same clean
    // shutdown, then a non-zero exit.
    let escalation = tokio::select! {
        _ = shutdown_signal() => None,
        reason = restarts.escalated() => Some(reason),
    };
    slog::info!(logger, "shutting down"; "escalation" => escalation.as_deref().unwrap_or("none"));
    listener_address.do_send(StopAccepting);
    drop(listener_address);
    if let Some(handle) = control_handle {
        handle.stop(true).await;
    }
    let open = connections.load(Ordering::Acquire);
    let attached: Vec<(String, u64)> = shared
        .volumes
        .lock()
        .iter()
        .filter(|(_, volume)| volume.epoch != 0)
        .map(|(name, volume)| (name.clone(), volume.epoch))
        .collect();
    if open > 0 {
        // A client still uses the volumes: keep them attached so a restarted proxy (same
        // client id) can take over without a forced attach.
        slog::info!(logger, "sessions still open; volumes stay attached"; "sessions" => open);
    } else {
        for (name, epoch) in attached {
            detach(&view, &name, epoch, &logger).await;
        }
    }
    match escalation {
        Some(reason) => Err(anyhow::anyhow!("supervision escalated: {reason}")),
        None => Ok(()),
    }
}

async fn detach(view: &ClusterView, name: &str, epoch: u64, logger: &slog::Logger) {
    let (snapshot, _) = view.snapshot();
    let timeout = view.control_timeout();
    for control in snapshot.control_candidates {
        let volume = name.to_string();
        let token = view.token();
        let result = tokio::task::spawn_blocking(move || {
            detach_once(control, &volume, epoch, timeout, &token)
        })
        .await;
        match result {
            Ok(Ok(())) => {
                slog::info!(logger, "volume detached"; "volume" => name, "epoch" => epoch);
                return;
            }
            Ok(Err(error)) => {
                slog::debug!(logger, "detach failed"; "control" => %control, "error" => error)
            }
            Err(error) => slog::debug!(logger, "detach task failed"; "error" => %error),
        }
    }
    slog::warn!(logger, "volume not detached"; "volume" => name, "epoch" => epoch);
}
