//! `NbdListenerActor`: accepts NBD connections, enforces the connection limit, runs the
//! handshake (`crate::nbd::handshake`, bounded by a timeout) and starts one
//! `NbdSessionActor` per negotiated connection. The export list is the live volume table.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::raft::{RaftActor, ReadGate};
use super::session::{NbdSessionActor, SessionLimits};
use super::storage::VolumeRegistry;
use super::supervisor::{ActorKind, Supervision};
use crate::config::NbdConfig;
use crate::nbd::handshake::{
    ExportCatalog, ExportDescription, Handshake, HandshakeLimits, HandshakeStep,
};
use crate::nbd::{proto, Negotiated};

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
        let volume = self.registry.get(name)?;
        let info = volume.info();
        Some(ExportDescription {
            name: info.name.clone(),
            description: format!("raftblk volume {} (Raft-replicated)", info.name),
            size_bytes: info.size_bytes,
            transmission_flags: EXPORT_TRANSMISSION_FLAGS,
            // Any 512-byte-aligned I/O works (unaligned edges are read-modify-written by the
            // state machine); the volume's block size is what performs best.
            block_size_min_bytes: 512,
            block_size_preferred_bytes: info.block_size_bytes.max(512),
            block_size_max_bytes: self.request_max_bytes,
        })
    }
}

pub struct NbdListenerActor {
    listener: Option<TcpListener>,
    config: NbdConfig,
    registry: VolumeRegistry,
    default_export_name: String,
    raft: Addr<RaftActor>,
    read_gate: ReadGate,
    connections: Arc<AtomicUsize>,
    server_bytes_permits: Arc<tokio::sync::Semaphore>,
    logger: slog::Logger,
    session_supervision: Supervision,
}

impl NbdListenerActor {
    pub fn new(
        listener: TcpListener,
        config: NbdConfig,
        registry: VolumeRegistry,
        default_export_name: String,
        raft: Addr<RaftActor>,
        read_gate: ReadGate,
        supervision: Supervision,
    ) -> Self {
        // Validated to fit in u32 (the semaphore counts bytes).
        let server_bytes_permits = Arc::new(tokio::sync::Semaphore::new(
            config.bytes_in_flight_max as usize,
        ));
        NbdListenerActor {
            listener: Some(listener),
            config,
            registry,
            default_export_name,
            raft,
            read_gate,
            connections: Arc::new(AtomicUsize::new(0)),
            server_bytes_permits,
            logger: supervision.logger.clone(),
            session_supervision: Supervision {
                kind: ActorKind::NbdSession,
                ..supervision
            },
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
}

impl Actor for NbdListenerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let addr = ctx.address();
        let logger = self.logger.clone();
        ctx.spawn(
            async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
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
        );
    }
}

impl Handler<Accepted> for NbdListenerActor {
    type Result = ();
    fn handle(&mut self, msg: Accepted, _ctx: &mut Context<Self>) {
        let Accepted { stream, peer } = msg;
        let open = self.connections.fetch_add(1, Ordering::AcqRel);
        if open >= self.config.connections_max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            slog::warn!(self.logger, "connection refused: limit reached";
                "peer" => %peer, "connections_max" => self.config.connections_max);
            // Dropping the stream closes it.
            return;
        }
        let _ = stream.set_nodelay(true);
        let catalog = VolumeCatalog {
            registry: self.registry.clone(),
            default_export_name: self.default_export_name.clone(),
            request_max_bytes: self.config.request_max_bytes,
        };
        let config = self.config.clone();
        let raft = self.raft.clone();
        let read_gate = self.read_gate.clone();
        let connections = self.connections.clone();
        let server_bytes_permits = self.server_bytes_permits.clone();
        let supervision = self.session_supervision.clone();
        actix_rt::spawn(async move {
            let timeout = Duration::from_millis(config.handshake_timeout_ms);
            let limits = HandshakeLimits {
                option_length_max_bytes: config.option_length_max_bytes,
                options_max_count: 64,
            };
            let mut stream = stream;
            let outcome =
                tokio::time::timeout(timeout, negotiate(&mut stream, &catalog, limits)).await;
            let (negotiated, leftover) = match outcome {
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
            let Some(volume) = catalog.registry.get(&negotiated.export.name) else {
                connections.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            let (read_half, write_half) = stream.into_split();
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
                volume,
                raft,
                read_gate,
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
}

/// Drives the sans-I/O handshake over the socket. `None`: the client left (ABORT or EOF).
async fn negotiate(
    stream: &mut TcpStream,
    catalog: &VolumeCatalog,
    limits: HandshakeLimits,
) -> Result<Option<(Negotiated, BytesMut)>, NegotiateError> {
    let mut handshake = Handshake::new(limits);
    let mut out = Vec::with_capacity(256);
    handshake.greeting(&mut out);
    stream.write_all(&out).await?;
    out.clear();
    let mut input = BytesMut::with_capacity(16 * 1024);
    loop {
        let step = handshake.advance(&mut input, catalog, &mut out)?;
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
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
            HandshakeStep::Done(negotiated) => return Ok(Some((negotiated, input))),
            HandshakeStep::Close => return Ok(None),
        }
    }
}
