//! `NbdListenerActor`: accepts NBD connections, enforces the connection limit, runs the
//! handshake (`crate::nbd::handshake`, bounded by a timeout) and starts one
//! `NbdSessionActor` per negotiated connection. The same listener serves a server and a proxy;
//! what differs sits behind [`NbdService`]: the export list (a server's live volume table, a
//! proxy's view of the cluster's volumes) and the backend each session gets
//! ([`RaftVolumeBackend`] on a server, the upstream forwarder on a proxy).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::raft::{RaftActor, ReadGate};
use super::session::{
    NbdSessionActor, RaftVolumeBackend, SessionBackend, SessionLimits, VolumeHandle,
};
use super::storage::VolumeRegistry;
use super::supervisor::{ActorKind, SupervisedActor, Supervision};
use crate::config::NbdConfig;
use crate::nbd::handshake::{
    ExportCatalog, ExportDescription, Handshake, HandshakeLimits, HandshakeStep, TlsOffer,
};
use crate::nbd::{proto, Negotiated};
use crate::tls::MaybeTls;

/// Limits of a listener and of the sessions it starts: `[nbd]` on a server, `[proxy]` on a
/// proxy.
#[derive(Clone, Debug)]
pub struct ListenerLimits {
    pub connections_max: usize,
    pub requests_in_flight_per_session_max: usize,
    pub bytes_in_flight_per_session_max: u64,
    /// Validated to fit in u32 (a semaphore counts the bytes).
    pub bytes_in_flight_max: u64,
    pub request_max_bytes: u32,
    pub option_length_max_bytes: u32,
    pub handshake_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl From<&NbdConfig> for ListenerLimits {
    fn from(config: &NbdConfig) -> Self {
        ListenerLimits {
            connections_max: config.connections_max,
            requests_in_flight_per_session_max: config.requests_in_flight_per_session_max,
            bytes_in_flight_per_session_max: config.bytes_in_flight_per_session_max,
            bytes_in_flight_max: config.bytes_in_flight_max,
            request_max_bytes: config.request_max_bytes,
            option_length_max_bytes: config.option_length_max_bytes,
            handshake_timeout_ms: config.handshake_timeout_ms,
            request_timeout_ms: config.request_timeout_ms,
        }
    }
}

/// What a listener serves: the exports offered during the handshake and the backend of each
/// negotiated session.
pub trait NbdService: Clone + Unpin + 'static {
    /// The export table, consulted synchronously by the handshake codec.
    type Catalog: ExportCatalog + 'static;
    type Backend: SessionBackend;

    /// A catalog for one connection's handshake.
    fn catalog(&self) -> Self::Catalog;

    /// Called before the handshake answers an option naming `export_name` (`NBD_OPT_GO`,
    /// `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, the metadata context options), so that asynchronous work (a proxy attaching the
    /// volume) is done before the synchronous catalog is asked. The default does nothing.
    fn prepare_export(
        &self,
        _catalog: &Self::Catalog,
        _export_name: &str,
    ) -> impl Future<Output = ()> + 'static {
        std::future::ready(())
    }

    /// The backend of a session that negotiated `negotiated`, or `None` if the export vanished
    /// meanwhile (the connection is closed).
    fn backend(
        &self,
        catalog: &Self::Catalog,
        negotiated: &Negotiated,
        logger: &slog::Logger,
    ) -> Option<Self::Backend>;
}

/// The volume table seen as NBD exports.
pub struct VolumeCatalog {
    pub registry: VolumeRegistry,
    pub default_export_name: String,
    pub request_max_bytes: u32,
}

/// Transmission flags of every export. CAN_MULTI_CONN is honest: a write is acknowledged only
/// once committed to the fsync'd Raft log, so a FLUSH on any connection covers writes
/// acknowledged on all of them.
pub const EXPORT_TRANSMISSION_FLAGS: u16 = proto::NBD_FLAG_SEND_FLUSH
    | proto::NBD_FLAG_SEND_FUA
    | proto::NBD_FLAG_SEND_TRIM
    | proto::NBD_FLAG_SEND_WRITE_ZEROES
    | proto::NBD_FLAG_SEND_FAST_ZERO
    | proto::NBD_FLAG_SEND_CACHE
    | proto::NBD_FLAG_SEND_DF
    | proto::NBD_FLAG_CAN_MULTI_CONN;

/// An export name as a server understands it: `disk0` is an anonymous session, `disk0@7` the
/// session of the writer attached with epoch 7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportName<'a> {
    pub volume_name: &'a str,
    /// 0 for an anonymous session.
    pub writer_epoch: u64,
}

/// Splits `name@epoch`; a name without a valid non-zero epoch suffix is a plain volume name.
pub fn parse_export_name(name: &str) -> ExportName<'_> {
    if let Some((volume_name, epoch)) = name.rsplit_once('@') {
        if let Ok(writer_epoch) = epoch.parse::<u64>() {
            if writer_epoch > 0 && !volume_name.is_empty() {
                return ExportName {
                    volume_name,
                    writer_epoch,
                };
            }
        }
    }
    ExportName {
        volume_name: name,
        writer_epoch: 0,
    }
}

impl ExportCatalog for VolumeCatalog {
    fn export_names(&self) -> Vec<String> {
        self.registry.names()
    }

    fn export(&self, name: &str) -> Option<ExportDescription> {
        let name = if name.is_empty() {
            self.default_export_name.as_str()
        } else {
            name
        };
        let export_name = parse_export_name(name);
        let volume = self.registry.get(export_name.volume_name)?;
        let info = volume.info();
        // An anonymous session on a volume attached by a writer may only read: its writes
        // would be fenced anyway, and saying so up front lets clients mount read-only.
        let transmission_flags = if export_name.writer_epoch == 0 && info.attachment.is_some() {
            EXPORT_TRANSMISSION_FLAGS | proto::NBD_FLAG_READ_ONLY
        } else {
            EXPORT_TRANSMISSION_FLAGS
        };
        Some(ExportDescription {
            name: if export_name.writer_epoch == 0 {
                info.name.clone()
            } else {
                format!("{}@{}", info.name, export_name.writer_epoch)
            },
            description: format!("raftblk volume {} (Raft-replicated)", info.name),
            size_bytes: info.size_bytes,
            transmission_flags,
            // Any 512-byte-aligned I/O works (unaligned edges are read-modify-written by the
            // state machine); the volume's block size is what performs best.
            block_size_min_bytes: 512,
            block_size_preferred_bytes: info.block_size_bytes.max(512),
            block_size_max_bytes: self.request_max_bytes,
        })
    }
}

/// A server's NBD service: the volumes of this node's Raft group.
#[derive(Clone)]
pub struct VolumeService {
    pub registry: VolumeRegistry,
    pub default_export_name: String,
    pub request_max_bytes: u32,
    pub raft: Addr<RaftActor>,
    pub read_gate: ReadGate,
    pub restarts: Arc<super::supervisor::RestartCounters>,
}

/// How long an export lookup waits for a read barrier before answering from the local table.
const EXPORT_BARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl NbdService for VolumeService {
    type Catalog = VolumeCatalog;
    type Backend = RaftVolumeBackend;

    fn catalog(&self) -> VolumeCatalog {
        VolumeCatalog {
            registry: self.registry.clone(),
            default_export_name: self.default_export_name.clone(),
            request_max_bytes: self.request_max_bytes,
        }
    }

    /// A read barrier first, so that the export table this node answers from includes every
    /// change committed before the client asked (a volume just created or attached through
    /// another node). Without quorum the barrier gives up after a short wait and the local
    /// table answers.
    fn prepare_export(
        &self,
        _catalog: &VolumeCatalog,
        _export_name: &str,
    ) -> impl Future<Output = ()> + 'static {
        let raft = self.raft.clone();
        let needs_barrier = self.read_gate.reads_need_barrier();
        async move {
            if needs_barrier {
                let deadline = std::time::Instant::now() + EXPORT_BARRIER_WAIT;
                let _ = crate::actors::raft::read_barrier_until(&raft, deadline).await;
            }
        }
    }

    fn backend(
        &self,
        catalog: &VolumeCatalog,
        negotiated: &Negotiated,
        logger: &slog::Logger,
    ) -> Option<RaftVolumeBackend> {
        let export_name = parse_export_name(&negotiated.export.name);
        let volume = catalog.registry.get(export_name.volume_name)?;
        Some(RaftVolumeBackend {
            volume: VolumeHandle::new(volume, catalog.registry.clone()),
            raft: self.raft.clone(),
            read_gate: self.read_gate.clone(),
            writer_epoch: export_name.writer_epoch,
            logger: logger.clone(),
            restarts: self.restarts.clone(),
        })
    }
}

pub struct NbdListenerActor<S: NbdService = VolumeService> {
    /// The listening socket, kept for the actor's whole life: each instance (a restart after a
    /// crash in its accept loop) accepts on a duplicate of it, so the port never closes and
    /// connections queued meanwhile wait in the backlog. `None` once told to stop accepting.
    listener: Option<std::net::TcpListener>,
    limits: ListenerLimits,
    service: S,
    connections: Arc<AtomicUsize>,
    server_bytes_permits: Arc<tokio::sync::Semaphore>,
    logger: slog::Logger,
    session_supervision: Supervision,
    supervision: Supervision,
    /// The running accept loop.
    accepting: Option<SpawnHandle>,
    tls: Option<ListenerTls>,
}

/// TLS on a listener: how it is offered, and the server side of the handshake.
#[derive(Clone)]
pub struct ListenerTls {
    pub offer: TlsOffer,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl NbdListenerActor<VolumeService> {
    /// The listener of a server.
    pub fn new(
        listener: TcpListener,
        config: NbdConfig,
        registry: VolumeRegistry,
        default_export_name: String,
        raft: Addr<RaftActor>,
        read_gate: ReadGate,
        supervision: Supervision,
    ) -> std::io::Result<Self> {
        let service = VolumeService {
            registry,
            default_export_name,
            request_max_bytes: config.request_max_bytes,
            raft,
            read_gate,
            restarts: supervision.counters.clone(),
        };
        NbdListenerActor::with_service(
            listener,
            ListenerLimits::from(&config),
            service,
            supervision,
        )
    }
}

impl<S: NbdService> NbdListenerActor<S> {
    pub fn with_service(
        listener: TcpListener,
        limits: ListenerLimits,
        service: S,
        supervision: Supervision,
    ) -> std::io::Result<Self> {
        // Validated to fit in u32 (the semaphore counts bytes).
        let server_bytes_permits = Arc::new(tokio::sync::Semaphore::new(
            limits.bytes_in_flight_max as usize,
        ));
        // A tokio listener is non-blocking already, as each instance's duplicate must be.
        let listener = Some(listener.into_std()?);
        Ok(NbdListenerActor {
            listener,
            limits,
            service,
            connections: Arc::new(AtomicUsize::new(0)),
            server_bytes_permits,
            logger: supervision.logger.clone(),
            session_supervision: Supervision {
                kind: ActorKind::NbdSession,
                ..supervision.clone()
            },
            supervision,
            accepting: None,
            tls: None,
        })
    }

    /// Offers TLS on this listener's connections.
    pub fn with_tls(mut self, tls: Option<ListenerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Starts the listener under its supervisor on the current arbiter.
    pub fn start_supervised(self) -> Addr<Self> {
        let supervision = self.supervision.clone();
        SupervisedActor::start(supervision, move |_| self)
    }

    /// Open connections (handshaking or in transmission), shared with the caller.
    pub fn connections(&self) -> Arc<AtomicUsize> {
        self.connections.clone()
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
}

impl<S: NbdService> Actor for NbdListenerActor<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(std_listener) = self.listener.as_ref() else {
            return;
        };
        let listener = match std_listener.try_clone().and_then(TcpListener::from_std) {
            Ok(listener) => listener,
            Err(error) => {
                // Out of file descriptors, most likely: crash, so that the supervisor retries
                // with backoff and escalates if it persists.
                panic!("cannot duplicate the listening socket: {error}");
            }
        };
        let addr = ctx.address();
        let logger = self.logger.clone();
        self.accepting = Some(
            ctx.spawn(
                async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, peer)) => {
                                // Outside any handler: a panic here is caught by the supervisor,
                                // which restarts the listener (the accepted stream is dropped).
                                fail::fail_point!("nbd_listener_accept", |_| {
                                    panic!("failpoint nbd_listener_accept");
                                });
                                if addr.send(Accepted { stream, peer }).await.is_err() {
                                    return;
                                }
                            }
                            Err(error) => {
                                // EMFILE and friends: back off instead of spinning.
                                slog::warn!(logger, "accept failed"; "error" => %error);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
                .into_actor(self),
            ),
        );
    }
}

/// A listener restarts with the same socket, counters and permits; its accept loop is
/// started again by `started`. Sessions are independent actors and live on.
impl<S: NbdService> actix::Supervised for NbdListenerActor<S> {}

/// Stops accepting connections (at shutdown): the listening socket closes; open sessions go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

impl<S: NbdService> Handler<StopAccepting> for NbdListenerActor<S> {
    type Result = ();
    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        self.listener = None;
        // Ends the accept loop (and its socket duplicate) without stopping the actor, which
        // its supervisor would take for a crash.
        ctx.cancel_future(self.accepting.take().unwrap_or_default());
    }
}

impl<S: NbdService> Handler<Accepted> for NbdListenerActor<S> {
    type Result = ();
    fn handle(&mut self, msg: Accepted, _ctx: &mut Context<Self>) {
        let Accepted { stream, peer } = msg;
        let open = self.connections.fetch_add(1, Ordering::AcqRel);
        if open >= self.limits.connections_max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            slog::warn!(self.logger, "connection refused: limit reached";
                "peer" => %peer, "connections_max" => self.limits.connections_max);
            // Dropping the stream closes it.
            return;
        }
        let _ = stream.set_nodelay(true);
        let service = self.service.clone();
        let catalog = service.catalog();
        let config = self.limits.clone();
        let connections = self.connections.clone();
        let server_bytes_permits = self.server_bytes_permits.clone();
        let supervision = self.session_supervision.clone();
        let tls = self.tls.clone();
        actix_rt::spawn(async move {
            let timeout = Duration::from_millis(config.handshake_timeout_ms);
            let limits = HandshakeLimits {
                option_length_max_bytes: config.option_length_max_bytes,
                options_max_count: 64,
            };
            // A client that stalls anywhere in the handshake, TLS included, is cut off here.
            let outcome = tokio::time::timeout(
                timeout,
                negotiate(
                    MaybeTls::Plain(stream),
                    &service,
                    &catalog,
                    limits,
                    tls.as_ref(),
                ),
            )
            .await;
            let (stream, negotiated, leftover) = match outcome {
                Ok(Ok(Some(done))) => done,
                Ok(Ok(None)) => {
                    connections.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                Ok(Err(error)) => {
                    slog::info!(supervision.logger, "handshake failed"; "peer" => %peer,
                        "error" => %error);
                    connections.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                Err(_) => {
                    slog::info!(supervision.logger, "handshake timed out"; "peer" => %peer);
                    connections.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            };
            let Some(backend) = service.backend(&catalog, &negotiated, &supervision.logger) else {
                connections.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            let (read_half, write_half) = stream.into_boxed_halves();
            let limits = SessionLimits {
                requests_in_flight_max: config.requests_in_flight_per_session_max,
                bytes_in_flight_max: config.bytes_in_flight_per_session_max,
                request_max_bytes: config.request_max_bytes,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                server_bytes_permits,
            };
            NbdSessionActor::start(
                peer,
                read_half,
                write_half,
                leftover,
                negotiated,
                backend,
                limits,
                supervision,
                connections,
            );
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum NegotiateError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] crate::nbd::handshake::HandshakeError),
    #[error("the client sent data after NBD_OPT_STARTTLS before its TLS handshake")]
    DataBeforeTls,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Drives the sans-I/O handshake over the connection, upgrading it to TLS when the client asks
/// and `tls` offers it. `None`: the client left (ABORT or EOF).
async fn negotiate<S: NbdService>(
    mut stream: MaybeTls,
    service: &S,
    catalog: &S::Catalog,
    limits: HandshakeLimits,
    tls: Option<&ListenerTls>,
) -> Result<Option<(MaybeTls, Negotiated, BytesMut)>, NegotiateError> {
    let offer = tls.map_or(TlsOffer::None, |tls| tls.offer);
    let mut handshake = Handshake::with_tls(limits, offer);
    let mut scanner = ExportOptionScanner::new(limits.option_length_max_bytes);
    let mut out = Vec::with_capacity(256);
    handshake.greeting(&mut out);
    stream.send(&mut out).await?;
    let mut input = BytesMut::with_capacity(16 * 1024);
    loop {
        // Let the service prepare every export a complete option in `input` is about to name
        // (not before TLS where it is required: those options are refused unanswered, and a
        // client without credentials must not make the servers work).
        let refused_before_tls = offer == TlsOffer::Required && !handshake.tls_active();
        if !refused_before_tls {
            for export_name in scanner.scan(&input) {
                service.prepare_export(catalog, &export_name).await;
            }
        }
        let consumed_before = input.len();
        let step = handshake.advance(&mut input, catalog, &mut out)?;
        if !refused_before_tls {
            scanner.consumed(consumed_before - input.len());
        }
        if !out.is_empty() {
            stream.send(&mut out).await?;
        }
        match step {
            HandshakeStep::NeedMore => {
                // The codec consumes (or discards) what it can, so `input` stays bounded by
                // the option length limit.
                input.reserve(16 * 1024);
                if stream.read_buf(&mut input).await? == 0 {
                    return Ok(None);
                }
            }
            HandshakeStep::Done(negotiated) => return Ok(Some((stream, negotiated, input))),
            HandshakeStep::Close => return Ok(None),
            HandshakeStep::StartTls => {
                // The codec offers TLS only with `tls` set, and only once.
                let (Some(tls), MaybeTls::Plain(tcp)) = (tls, stream) else {
                    return Err(NegotiateError::DataBeforeTls);
                };
                if !input.is_empty() {
                    return Err(NegotiateError::DataBeforeTls);
                }
                let upgraded = tls
                    .acceptor
                    .accept(tcp)
                    .await
                    .map_err(NegotiateError::Tls)?;
                stream = MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Server(upgraded)));
                handshake.tls_started();
                scanner = ExportOptionScanner::after_tls(limits.option_length_max_bytes);
            }
        }
    }
}

/// Finds, ahead of the handshake codec, every complete option that names an export
/// (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_LIST_META_CONTEXT`,
/// `NBD_OPT_SET_META_CONTEXT`; "Option types"), so the service can
/// prepare that export before the codec consults the catalog. It walks the same byte stream as
/// the codec (client flags, then `IHAVEOPT` option headers and payloads) and stays at or ahead
/// of the codec's position; it never buffers anything itself. Pure: no I/O.
#[derive(Debug)]
struct ExportOptionScanner {
    option_length_max_bytes: u32,
    /// Bytes at the front of the caller's buffer already scanned (not yet consumed by the codec).
    scanned_bytes: usize,
    state: ScanState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    ClientFlags,
    OptionHeader,
    /// Waiting for the whole payload of an option that names an export.
    NamePayload {
        option: u32,
        length_bytes: usize,
    },
    /// Stepping over the payload of any other option.
    Skip {
        remaining_bytes: usize,
    },
    /// The stream no longer looks like options (transmission has started or the client is
    /// broken): nothing more to find; the codec deals with it.
    Stopped,
}

impl ExportOptionScanner {
    fn new(option_length_max_bytes: u32) -> Self {
        ExportOptionScanner {
            option_length_max_bytes,
            scanned_bytes: 0,
            state: ScanState::ClientFlags,
        }
    }

    /// A scanner for the options that follow a TLS upgrade (no client flags come first).
    fn after_tls(option_length_max_bytes: u32) -> Self {
        ExportOptionScanner {
            option_length_max_bytes,
            scanned_bytes: 0,
            state: ScanState::OptionHeader,
        }
    }

    /// The codec consumed `bytes` from the front of the buffer.
    fn consumed(&mut self, bytes: usize) {
        self.scanned_bytes = self.scanned_bytes.saturating_sub(bytes);
    }

    /// Scans what `input` holds beyond the scanned prefix; returns the export names found.
    fn scan(&mut self, input: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        loop {
            let available = input.get(self.scanned_bytes..).unwrap_or_default();
            match self.state {
                ScanState::ClientFlags => {
                    if available.len() < 4 {
                        return names;
                    }
                    self.scanned_bytes += 4;
                    self.state = ScanState::OptionHeader;
                }
                ScanState::OptionHeader => {
                    let Some(header) = available.get(..16) else {
                        return names;
                    };
                    let mut field = [0u8; 8];
                    field.copy_from_slice(&header[..8]);
                    if u64::from_be_bytes(field) != proto::IHAVEOPT {
                        self.state = ScanState::Stopped;
                        return names;
                    }
                    let mut word = [0u8; 4];
                    word.copy_from_slice(&header[8..12]);
                    let option = u32::from_be_bytes(word);
                    word.copy_from_slice(&header[12..16]);
                    let length_bytes = u32::from_be_bytes(word);
                    self.scanned_bytes += 16;
                    // The metadata context options start with the same 32-bit length and
                    // name as NBD_OPT_GO.
                    let names_export = matches!(
                        option,
                        proto::NBD_OPT_EXPORT_NAME
                            | proto::NBD_OPT_INFO
                            | proto::NBD_OPT_GO
                            | proto::NBD_OPT_LIST_META_CONTEXT
                            | proto::NBD_OPT_SET_META_CONTEXT
                    );
                    self.state = if names_export && length_bytes <= self.option_length_max_bytes {
                        ScanState::NamePayload {
                            option,
                            length_bytes: length_bytes as usize,
                        }
                    } else {
                        ScanState::Skip {
                            remaining_bytes: length_bytes as usize,
                        }
                    };
                }
                ScanState::NamePayload {
                    option,
                    length_bytes,
                } => {
                    let Some(payload) = available.get(..length_bytes) else {
                        return names;
                    };
                    let name_bytes = if option == proto::NBD_OPT_EXPORT_NAME {
                        Some(payload)
                    } else {
                        payload.get(..4).and_then(|length| {
                            let mut word = [0u8; 4];
                            word.copy_from_slice(length);
                            payload.get(4..4usize.saturating_add(u32::from_be_bytes(word) as usize))
                        })
                    };
                    if let Some(name) = name_bytes.and_then(|bytes| std::str::from_utf8(bytes).ok())
                    {
                        names.push(name.to_owned());
                    }
                    self.scanned_bytes += length_bytes;
                    self.state = ScanState::OptionHeader;
                }
                ScanState::Skip { remaining_bytes } => {
                    let step = available.len().min(remaining_bytes);
                    self.scanned_bytes += step;
                    if step < remaining_bytes {
                        self.state = ScanState::Skip {
                            remaining_bytes: remaining_bytes - step,
                        };
                        return names;
                    }
                    self.state = ScanState::OptionHeader;
                }
                ScanState::Stopped => return names,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
        out.put_u64(proto::IHAVEOPT);
        out.put_u32(option);
        out.put_u32(payload.len() as u32);
        out.put_slice(payload);
    }

    fn go_payload(name: &str) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.put_u32(name.len() as u32);
        payload.put_slice(name.as_bytes());
        payload.put_u16(0);
        payload
    }

    /// "Option types": NBD_OPT_GO / NBD_OPT_INFO carry a 32-bit name length and the name;
    /// NBD_OPT_EXPORT_NAME carries the bare name. The scanner finds each exactly once, even
    /// when the bytes arrive one at a time and the codec consumes between reads.
    #[test]
    fn scanner_finds_names_of_export_options_byte_by_byte() {
        let mut stream = vec![0, 0, 0, 3];
        option(&mut stream, proto::NBD_OPT_STRUCTURED_REPLY, &[]);
        option(&mut stream, proto::NBD_OPT_LIST, &[]);
        option(&mut stream, proto::NBD_OPT_INFO, &go_payload("disk0"));
        option(&mut stream, proto::NBD_OPT_GO, &go_payload("disk1"));
        option(&mut stream, proto::NBD_OPT_EXPORT_NAME, b"disk2");
        let mut scanner = ExportOptionScanner::new(1024);
        let mut buffer: Vec<u8> = Vec::new();
        let mut found = Vec::new();
        for (index, byte) in stream.iter().enumerate() {
            buffer.push(*byte);
            found.extend(scanner.scan(&buffer));
            // A codec that consumed everything so far every seventh byte.
            if index % 7 == 0 {
                let consumed = buffer.len().min(scanner.scanned_bytes);
                buffer.drain(..consumed);
                scanner.consumed(consumed);
            }
        }
        assert_eq!(found, vec!["disk0", "disk1", "disk2"]);
    }

    /// A payload over the option limit is discarded by the codec, so it names nothing; bytes
    /// without `IHAVEOPT` stop the scanner ("Option haggling": every option starts with it).
    #[test]
    fn scanner_skips_oversized_options_and_stops_at_a_bad_magic() {
        let mut stream = vec![0, 0, 0, 1];
        option(
            &mut stream,
            proto::NBD_OPT_GO,
            &go_payload(&"x".repeat(2000)),
        );
        option(&mut stream, proto::NBD_OPT_GO, &go_payload("small"));
        stream.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        stream.extend_from_slice(&[0u8; 24]);
        let mut scanner = ExportOptionScanner::new(1024);
        assert_eq!(scanner.scan(&stream), vec!["small"]);
        assert_eq!(scanner.state, ScanState::Stopped);
        assert!(scanner.scan(&stream).is_empty());
    }

    /// `disk0@7` names the writer session of epoch 7; anything else is a plain volume name.
    #[test]
    fn export_names_with_epochs() {
        assert_eq!(
            parse_export_name("disk0@7"),
            ExportName {
                volume_name: "disk0",
                writer_epoch: 7
            }
        );
        assert_eq!(parse_export_name("disk0").writer_epoch, 0);
        assert_eq!(parse_export_name("disk0@x").volume_name, "disk0@x");
        assert_eq!(parse_export_name("disk0@0").volume_name, "disk0@0");
        assert_eq!(parse_export_name("@5").volume_name, "@5");
    }
}
