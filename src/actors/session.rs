//! `NbdSessionActor`: one per client connection in the transmission phase. It owns the
//! connection's lifecycle and dispatch; two tasks beside it move bytes:
//!
//! - the reader task parses request headers and payloads (`crate::nbd` codec) and sends each
//!   request to the actor, after taking flow-control permits (requests in flight, bytes in
//!   flight), so a client can never make the server buffer more than the configured limits;
//! - the writer task writes replies in the order they complete (out-of-order replies are
//!   allowed by the protocol), coalescing small replies into one write.
//!
//! Each request runs as its own future: writes, trims and zeroes become Raft proposals and are
//! answered once committed (fsync'd on a majority) and applied; reads and block status first
//! pass a read barrier (ReadIndex) and then read the image on the blocking pool. FLUSH and FUA
//! need no work: every acknowledged write is already durable in the Raft log.
//!
//! Failures inside the server (an actor restarting, a leader election) are retried until the
//! request timeout; only then does the client see EIO. A protocol error ends this connection
//! only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::raft::{propose_until, read_barrier_until, RaftActor, ReadGate};
use super::supervisor::{run_guarded, Supervision};
use crate::nbd::proto;
use crate::nbd::transmission::{
    self, check_request_negotiated, encode_block_status, encode_read_data_chunk_header,
    encode_simple_reply, encode_structured_done, encode_structured_error, BlockStatusExtent,
    Command, Errno, RequestHeader, RequestLimits, REQUEST_HEADER_BYTES,
};
use crate::nbd::Negotiated;
use crate::storage::command::{encode_command, encode_write_command, Command as StateCommand};
use crate::storage::state_machine::{ApplyOutcome, ApplyRejection, VolumeReader};

/// Limits of one session, from `[nbd]` in the configuration.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub requests_in_flight_max: usize,
    pub bytes_in_flight_max: u64,
    pub request_max_bytes: u32,
    pub request_timeout: Duration,
    /// Shared by every session of the server: bytes of payloads and read replies held in
    /// memory across all connections.
    pub server_bytes_permits: Arc<Semaphore>,
}

/// One reply on its way to the socket. The permits it carries are released once it is written,
/// which is what lets the reader take the next request.
struct OutgoingReply {
    header: Vec<u8>,
    data: Option<Bytes>,
    _permits: RequestPermits,
}

struct RequestPermits {
    _count: OwnedSemaphorePermit,
    _session_bytes: Option<OwnedSemaphorePermit>,
    _server_bytes: Option<OwnedSemaphorePermit>,
}

/// The semaphores a request must pass before the reader takes in its payload: requests in
/// flight on this connection, bytes on this connection, bytes on the whole server.
#[derive(Clone)]
struct FlowControl {
    requests: Arc<Semaphore>,
    session_bytes: Arc<Semaphore>,
    server_bytes: Arc<Semaphore>,
}

impl FlowControl {
    /// Waits for room for one request holding `bytes` bytes; `None` once closed.
    async fn take(&self, bytes: u32) -> Option<RequestPermits> {
        let count = self.requests.clone().acquire_owned().await.ok()?;
        let (session_bytes, server_bytes) = if bytes > 0 {
            (
                Some(
                    self.session_bytes
                        .clone()
                        .acquire_many_owned(bytes)
                        .await
                        .ok()?,
                ),
                Some(
                    self.server_bytes
                        .clone()
                        .acquire_many_owned(bytes)
                        .await
                        .ok()?,
                ),
            )
        } else {
            (None, None)
        };
        Some(RequestPermits {
            _count: count,
            _session_bytes: session_bytes,
            _server_bytes: server_bytes,
        })
    }
}

/// Reader task → session: one complete request.
#[derive(Message)]
#[rtype(result = "()")]
struct IncomingRequest {
    header: RequestHeader,
    payload: Bytes,
    permits: RequestPermits,
}

/// Reader task → session: the client is gone or broke the protocol; no more requests.
#[derive(Message)]
#[rtype(result = "()")]
struct ReaderFinished {
    reason: String,
}

/// A request future → session: one request is answered.
#[derive(Message)]
#[rtype(result = "()")]
struct RequestFinished;

pub struct NbdSessionActor {
    peer: SocketAddr,
    negotiated: Negotiated,
    volume: VolumeReader,
    raft: Addr<RaftActor>,
    read_gate: ReadGate,
    limits: SessionLimits,
    replies: Option<mpsc::UnboundedSender<OutgoingReply>>,
    requests_in_flight: usize,
    reader_finished: bool,
    supervision: Supervision,
    /// Decremented when the session ends: the listener's connection count.
    connections: Arc<AtomicUsize>,
}

impl NbdSessionActor {
    /// Starts the session on the current arbiter for an already negotiated connection.
    /// `leftover` holds bytes the client sent right after the handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        peer: SocketAddr,
        read_half: OwnedReadHalf,
        write_half: OwnedWriteHalf,
        leftover: BytesMut,
        negotiated: Negotiated,
        volume: VolumeReader,
        raft: Addr<RaftActor>,
        read_gate: ReadGate,
        limits: SessionLimits,
        supervision: Supervision,
        connections: Arc<AtomicUsize>,
    ) -> Addr<NbdSessionActor> {
        let (reply_sender, reply_receiver) = mpsc::unbounded_channel();
        let logger = supervision.logger.clone();
        actix_rt::spawn(write_replies(write_half, reply_receiver, logger));
        let flow_control = FlowControl {
            requests: Arc::new(Semaphore::new(limits.requests_in_flight_max)),
            session_bytes: Arc::new(Semaphore::new(
                limits.bytes_in_flight_max.min(u64::from(u32::MAX)) as usize,
            )),
            server_bytes: limits.server_bytes_permits.clone(),
        };
        let request_max_bytes = limits.request_max_bytes;
        NbdSessionActor::create(move |ctx| {
            let reader = std::io::Cursor::new(leftover).chain(read_half);
            actix_rt::spawn(read_requests(
                reader,
                ctx.address(),
                flow_control,
                request_max_bytes,
            ));
            NbdSessionActor {
                peer,
                negotiated,
                volume,
                raft,
                read_gate,
                limits,
                replies: Some(reply_sender),
                requests_in_flight: 0,
                reader_finished: false,
                supervision,
                connections,
            }
        })
    }

    fn send_reply(&self, reply: OutgoingReply) {
        if let Some(replies) = &self.replies {
            // A send error means the writer task ended (socket closed): nothing to tell.
            let _ = replies.send(reply);
        }
    }

    fn error_reply(&self, cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
        error_reply_bytes(self.negotiated.structured_replies, cookie, errno, message)
    }

    fn dispatch(&mut self, request: IncomingRequest, ctx: &mut Context<Self>) {
        let IncomingRequest {
            header,
            payload,
            permits,
        } = request;
        let cookie = header.cookie;
        let request_limits = RequestLimits {
            request_max_bytes: self.limits.request_max_bytes,
        };
        if let Err(errno) = check_request_negotiated(&header, &self.negotiated, &request_limits) {
            slog::debug!(self.supervision.logger, "request rejected";
                "peer" => %self.peer, "command" => ?header.command, "errno" => ?errno);
            let header_bytes = self.error_reply(cookie, errno, "request rejected");
            self.send_reply(OutgoingReply {
                header: header_bytes,
                data: None,
                _permits: permits,
            });
            return;
        }
        let volume_id = self.volume.info().id;
        let deadline = Instant::now() + self.limits.request_timeout;
        let structured = self.negotiated.structured_replies;
        let context_id = self.negotiated.base_allocation_context_id;
        let raft = self.raft.clone();
        let needs_barrier = self.read_gate.reads_need_barrier();
        let volume = self.volume.clone();
        let replies = self.replies.clone();
        let session = ctx.address();
        let logger = self.supervision.logger.clone();
        let proposal = match header.command {
            Command::Write if header.length == 0 => None,
            Command::Write => Some(encode_write_command(volume_id, 0, header.offset, &payload)),
            Command::Trim if header.length == 0 => None,
            Command::Trim => Some(encode_command(&StateCommand::Trim {
                volume_id,
                writer_epoch: 0,
                offset: header.offset,
                length: u64::from(header.length),
            })),
            Command::WriteZeroes if header.length == 0 => None,
            Command::WriteZeroes => Some(encode_command(&StateCommand::WriteZeroes {
                volume_id,
                writer_epoch: 0,
                offset: header.offset,
                length: u64::from(header.length),
                may_punch_hole: header.flags & proto::NBD_CMD_FLAG_NO_HOLE == 0,
            })),
            _ => None,
        };
        // The payload is now inside the proposal (or unneeded): free it before waiting.
        drop(payload);
        self.requests_in_flight += 1;
        let command = header.command;
        actix_rt::spawn(async move {
            let (reply, data) = match command {
                Command::Write | Command::Trim | Command::WriteZeroes => match proposal {
                    None => (success_reply(structured, cookie), None),
                    Some(command_bytes) => {
                        let reply = match propose_until(&raft, Bytes::from(command_bytes), deadline)
                            .await
                        {
                            Ok(ApplyOutcome::Rejected(rejection)) => {
                                let errno = match rejection {
                                    ApplyRejection::OutOfRange => Errno::NoSpc,
                                    ApplyRejection::NoSuchVolume => Errno::Shutdown,
                                    _ => Errno::Inval,
                                };
                                error_reply_bytes(structured, cookie, errno, "write rejected")
                            }
                            Ok(_) => success_reply(structured, cookie),
                            Err(error) => {
                                slog::warn!(logger, "write failed after retries"; "error" => %error);
                                error_reply_bytes(structured, cookie, Errno::Io, "write failed")
                            }
                        };
                        (reply, None)
                    }
                },
                // Every acknowledged write is already committed to the fsync'd Raft log on a
                // majority, so FLUSH covers all of them (on every connection) at once.
                Command::Flush | Command::Cache => (success_reply(structured, cookie), None),
                Command::Read => {
                    read_reply(
                        &raft,
                        needs_barrier,
                        volume,
                        header,
                        structured,
                        deadline,
                        &logger,
                    )
                    .await
                }
                Command::BlockStatus => {
                    let reply = block_status_reply(
                        &raft,
                        needs_barrier,
                        volume,
                        header,
                        context_id,
                        deadline,
                        &logger,
                    )
                    .await;
                    (reply, None)
                }
                // `check_request` rejects everything else before dispatch.
                Command::Disc | Command::Unknown(_) => (
                    error_reply_bytes(structured, cookie, Errno::Inval, "unsupported"),
                    None,
                ),
            };
            if let Some(replies) = replies {
                let _ = replies.send(OutgoingReply {
                    header: reply,
                    data,
                    _permits: permits,
                });
            }
            session.do_send(RequestFinished);
        });
    }

    /// Closes the connection once the reader is done and every request is answered
    /// (NBD_CMD_DISC: "finish in-flight requests, then close").
    fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        if self.reader_finished && self.requests_in_flight == 0 {
            // Dropping the sender lets the writer flush and shut the socket down.
            self.replies = None;
            ctx.stop();
        }
    }
}

fn success_reply(structured: bool, cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    if structured {
        encode_structured_done(&mut out, cookie);
    } else {
        encode_simple_reply(&mut out, cookie, None);
    }
    out
}

fn error_reply_bytes(structured: bool, cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if structured {
        encode_structured_error(&mut out, cookie, errno, message);
    } else {
        encode_simple_reply(&mut out, cookie, Some(errno));
    }
    out
}

async fn read_reply(
    raft: &Addr<RaftActor>,
    needs_barrier: bool,
    volume: VolumeReader,
    header: RequestHeader,
    structured: bool,
    deadline: Instant,
    logger: &slog::Logger,
) -> (Vec<u8>, Option<Bytes>) {
    let cookie = header.cookie;
    if header.length == 0 {
        return (success_reply(structured, cookie), None);
    }
    if !needs_barrier {
        // The read gate says no barrier is needed (sole-voter leader).
    } else if let Err(error) = read_barrier_until(raft, deadline).await {
        slog::warn!(logger, "read barrier failed after retries"; "error" => %error);
        return (
            error_reply_bytes(structured, cookie, Errno::Io, "read failed"),
            None,
        );
    }
    let offset = header.offset;
    let length = header.length as usize;
    // Serve from the page cache on this thread when possible (no thread hop); only reads that
    // would wait for the disk go to the blocking pool.
    let mut buffer = vec![0u8; length];
    let result = match volume.read_cached(offset, &mut buffer) {
        Ok(true) => Ok(Ok(buffer)),
        Ok(false) => {
            tokio::task::spawn_blocking(move || volume.read(offset, &mut buffer).map(|()| buffer))
                .await
        }
        Err(error) => Ok(Err(error)),
    };
    match result {
        Ok(Ok(buffer)) => {
            let mut out = Vec::with_capacity(32);
            if structured {
                encode_read_data_chunk_header(&mut out, cookie, offset, header.length, true);
            } else {
                encode_simple_reply(&mut out, cookie, None);
            }
            (out, Some(Bytes::from(buffer)))
        }
        Ok(Err(error)) => {
            slog::error!(logger, "read failed"; "error" => %error, "offset" => offset,
                "length" => length);
            (
                error_reply_bytes(structured, cookie, Errno::Io, "read failed"),
                None,
            )
        }
        Err(join_error) => {
            slog::error!(logger, "read task failed"; "error" => %join_error);
            (
                error_reply_bytes(structured, cookie, Errno::Io, "read failed"),
                None,
            )
        }
    }
}

async fn block_status_reply(
    raft: &Addr<RaftActor>,
    needs_barrier: bool,
    volume: VolumeReader,
    header: RequestHeader,
    context_id: Option<u32>,
    deadline: Instant,
    logger: &slog::Logger,
) -> Vec<u8> {
    let cookie = header.cookie;
    let Some(context_id) = context_id else {
        return error_reply_bytes(true, cookie, Errno::Inval, "no metadata context selected");
    };
    if !needs_barrier {
        // The read gate says no barrier is needed (sole-voter leader).
    } else if let Err(error) = read_barrier_until(raft, deadline).await {
        slog::warn!(logger, "read barrier failed after retries"; "error" => %error);
        return error_reply_bytes(true, cookie, Errno::Io, "block status failed");
    }
    let offset = header.offset;
    let length = u64::from(header.length);
    let result = tokio::task::spawn_blocking(move || volume.block_status(offset, length)).await;
    match result {
        Ok(Ok(extents)) => {
            let request_one = header.flags & proto::NBD_CMD_FLAG_REQ_ONE != 0;
            let mut wire_extents = Vec::new();
            for extent in extents {
                if extent.length_bytes == 0 {
                    continue;
                }
                let mut flags = 0;
                if extent.hole {
                    flags |= proto::NBD_STATE_HOLE;
                }
                if extent.zero || extent.hole {
                    flags |= proto::NBD_STATE_ZERO;
                }
                // Extents never exceed the request length, which is a u32.
                let length_bytes = extent.length_bytes.min(u64::from(u32::MAX)) as u32;
                wire_extents.push(BlockStatusExtent {
                    length_bytes,
                    flags,
                });
                if request_one {
                    break;
                }
            }
            if wire_extents.is_empty() {
                wire_extents.push(BlockStatusExtent {
                    length_bytes: header.length,
                    flags: 0,
                });
            }
            let mut out = Vec::with_capacity(32 + 8 * wire_extents.len());
            encode_block_status(&mut out, cookie, context_id, &wire_extents, true);
            out
        }
        Ok(Err(error)) => {
            slog::error!(logger, "block status failed"; "error" => %error);
            error_reply_bytes(true, cookie, Errno::Io, "block status failed")
        }
        Err(join_error) => {
            slog::error!(logger, "block status task failed"; "error" => %join_error);
            error_reply_bytes(true, cookie, Errno::Io, "block status failed")
        }
    }
}

impl Actor for NbdSessionActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        slog::debug!(self.supervision.logger, "session started"; "peer" => %self.peer,
            "export" => &self.negotiated.export.name);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        slog::debug!(self.supervision.logger, "session ended"; "peer" => %self.peer);
    }
}

impl Handler<IncomingRequest> for NbdSessionActor {
    type Result = ();
    fn handle(&mut self, msg: IncomingRequest, ctx: &mut Context<Self>) {
        let supervision = self.supervision.clone();
        // A crash here ends this connection only (the actor is not restarted: the client
        // reconnects, as it would after any dropped connection).
        run_guarded(&supervision, ctx, |ctx| {
            fail::fail_point!("nbd_session_request", |_| {
                panic!("failpoint nbd_session_request");
            });
            if msg.header.command == Command::Disc {
                self.reader_finished = true;
                self.maybe_finish(ctx);
                return;
            }
            self.dispatch(msg, ctx)
        });
    }
}

impl Handler<RequestFinished> for NbdSessionActor {
    type Result = ();
    fn handle(&mut self, _: RequestFinished, ctx: &mut Context<Self>) {
        self.requests_in_flight = self.requests_in_flight.saturating_sub(1);
        self.maybe_finish(ctx);
    }
}

impl Handler<ReaderFinished> for NbdSessionActor {
    type Result = ();
    fn handle(&mut self, msg: ReaderFinished, ctx: &mut Context<Self>) {
        slog::debug!(self.supervision.logger, "client stopped sending";
            "peer" => %self.peer, "reason" => msg.reason);
        self.reader_finished = true;
        self.maybe_finish(ctx);
    }
}

/// Reads requests until the client disconnects, sends DISC, or breaks the protocol.
async fn read_requests<R: AsyncRead + Unpin>(
    reader: R,
    session: Addr<NbdSessionActor>,
    flow_control: FlowControl,
    request_max_bytes: u32,
) {
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, reader);
    let reason = loop {
        let mut header_bytes = [0u8; REQUEST_HEADER_BYTES];
        if let Err(error) = reader.read_exact(&mut header_bytes).await {
            break format!("connection closed: {error}");
        }
        let header = match transmission::parse_request_header(&header_bytes) {
            Ok(header) => header,
            Err(error) => break format!("protocol error: {error}"),
        };
        let payload_bytes = transmission::write_payload_bytes(&header);
        if payload_bytes > request_max_bytes {
            // The payload cannot be skipped cheaply (up to 4 GiB), so the stream cannot be
            // resynchronised: answer EINVAL (spec: a server MAY close the connection) and end.
            let mut out = Vec::new();
            encode_simple_reply(&mut out, header.cookie, Some(Errno::Inval));
            let permits = match flow_control.take(0).await {
                Some(permits) => permits,
                None => break "shutting down".to_string(),
            };
            session.do_send(SendRaw {
                reply: OutgoingReply {
                    header: out,
                    data: None,
                    _permits: permits,
                },
            });
            break format!("write of {payload_bytes} bytes exceeds the request limit");
        }
        // Memory a request may hold: its payload, or the data a read will return.
        let memory_bytes = match header.command {
            Command::Read if header.length <= request_max_bytes => header.length,
            _ => payload_bytes,
        };
        let Some(permits) = flow_control.take(memory_bytes).await else {
            break "shutting down".to_string();
        };
        let mut payload = BytesMut::zeroed(payload_bytes as usize);
        if payload_bytes > 0 {
            if let Err(error) = reader.read_exact(&mut payload).await {
                break format!("connection closed mid-request: {error}");
            }
        }
        let is_disc = header.command == Command::Disc;
        if session
            .send(IncomingRequest {
                header,
                payload: payload.freeze(),
                permits,
            })
            .await
            .is_err()
        {
            break "session ended".to_string();
        }
        if is_disc {
            break "client sent NBD_CMD_DISC".to_string();
        }
    };
    session.do_send(ReaderFinished { reason });
}

/// Reader task → session: a reply the reader produced itself (fatal request errors).
#[derive(Message)]
#[rtype(result = "()")]
struct SendRaw {
    reply: OutgoingReply,
}

impl Handler<SendRaw> for NbdSessionActor {
    type Result = ();
    fn handle(&mut self, msg: SendRaw, _ctx: &mut Context<Self>) {
        self.send_reply(msg.reply);
    }
}

/// Writes replies until every sender is gone, then shuts the socket down.
async fn write_replies(
    write_half: OwnedWriteHalf,
    mut replies: mpsc::UnboundedReceiver<OutgoingReply>,
    logger: slog::Logger,
) {
    let mut writer = BufWriter::with_capacity(256 * 1024, write_half);
    while let Some(reply) = replies.recv().await {
        let mut next = Some(reply);
        // Coalesce every reply already waiting into one flush.
        while let Some(reply) = next {
            if let Err(error) = write_one(&mut writer, &reply).await {
                slog::debug!(logger, "client connection broke while replying"; "error" => %error);
                return;
            }
            drop(reply);
            next = replies.try_recv().ok();
        }
        if let Err(error) = writer.flush().await {
            slog::debug!(logger, "client connection broke while replying"; "error" => %error);
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn write_one(
    writer: &mut BufWriter<OwnedWriteHalf>,
    reply: &OutgoingReply,
) -> std::io::Result<()> {
    writer.write_all(&reply.header).await?;
    if let Some(data) = &reply.data {
        writer.write_all(data).await?;
    }
    Ok(())
}
