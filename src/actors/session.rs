//! `NbdSessionActor`: one per client connection in the transmission phase, shared by the server
//! and the proxy. It owns the connection's lifecycle and dispatch; two tasks beside it move
//! bytes:
//!
//! - the reader task parses request headers and payloads (`crate::nbd` codec) and sends each
//!   request to the actor, after taking flow-control permits (requests in flight, bytes in
//!   flight), so a client can never make the process buffer more than the configured limits;
//! - the writer task writes replies in the order they complete (out-of-order replies are
//!   allowed by the protocol), coalescing small replies into one write.
//!
//! What a request *does* is the [`SessionBackend`]'s business: on a server,
//! [`RaftVolumeBackend`] turns writes, trims and zeroes into Raft proposals answered once
//! committed (fsync'd on a majority) and applied, and serves reads after a read barrier
//! (ReadIndex); on a proxy, `crate::proxy` forwards them upstream through its cache. The session
//! validates every request against the negotiated export, answers what needs no backend (empty
//! ranges, FLUSH, CACHE: every acknowledged write is already durable in the Raft log), and
//! encodes the backend's [`BackendReply`] for the client (simple or structured replies).
//!
//! Failures behind the backend (an actor restarting, a leader election, a server crash seen by
//! the proxy) are retried by the backend until the request deadline; only then does the client
//! see an error. A protocol error ends this connection only.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::frame_writer::{write_frames, Frame};
use super::raft::{propose_until, read_barrier_until, RaftActor, ReadGate};
use super::storage::VolumeRegistry;
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
use crate::storage::StorageError;

/// One validated request handed to a backend. Requests with an empty range, FLUSH, CACHE and
/// DISC never reach a backend.
#[derive(Debug)]
pub struct BackendRequest {
    pub header: RequestHeader,
    /// The data of an `NBD_CMD_WRITE` (empty for every other command).
    pub payload: Bytes,
    /// The backend retries transient failures until this instant, then fails the request.
    pub deadline: Instant,
}

/// What a backend answers; the session encodes it for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendReply {
    /// The command succeeded and returns no data (WRITE, TRIM, WRITE_ZEROES).
    Done,
    /// The data of a READ: exactly `header.length` bytes.
    Data(Bytes),
    /// The `base:allocation` extents of a BLOCK_STATUS, in order from `header.offset`.
    Extents(Vec<BlockStatusExtent>),
    /// The command failed with `errno`; `message` goes into structured error replies.
    Error { errno: Errno, message: &'static str },
}

/// Executes a session's requests. One value per session (cloned into each request's future);
/// the future runs on the session's arbiter, so it need not be `Send`.
pub trait SessionBackend: Clone + Unpin + 'static {
    /// Starts `request`. Anything that depends on the moment of the call (e.g. whether a read
    /// needs a barrier) is decided before the future is returned.
    fn execute(&self, request: BackendRequest) -> impl Future<Output = BackendReply> + 'static;

    /// The export's size now, if the backend knows it: a volume grown by an online resize
    /// accepts requests in its new range on connections negotiated before (the proxy's
    /// long-lived upstream connections need that). Never used to shrink.
    fn live_size_bytes(&self) -> Option<u64> {
        None
    }
}

/// Limits of one session, from `[nbd]` (server) or `[proxy]` (proxy) in the configuration.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub requests_in_flight_max: usize,
    pub bytes_in_flight_max: u64,
    pub request_max_bytes: u32,
    /// How long a request may be retried by the backend before the client gets an error.
    pub request_timeout: Duration,
    /// Shared by every session of the process: bytes of payloads and read replies held in
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
/// flight on this connection, bytes on this connection, bytes on the whole process.
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

pub struct NbdSessionActor<B: SessionBackend> {
    peer: SocketAddr,
    negotiated: Negotiated,
    backend: B,
    limits: SessionLimits,
    replies: Option<mpsc::UnboundedSender<OutgoingReply>>,
    requests_in_flight: usize,
    reader_finished: bool,
    supervision: Supervision,
    /// Decremented when the session ends: the listener's connection count.
    connections: Arc<AtomicUsize>,
}

impl<B: SessionBackend> NbdSessionActor<B> {
    /// Starts the session on the current arbiter for an already negotiated connection.
    /// `leftover` holds bytes the client sent right after the handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        peer: SocketAddr,
        read_half: Box<dyn AsyncRead + Unpin + Send>,
        write_half: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
        leftover: BytesMut,
        negotiated: Negotiated,
        backend: B,
        limits: SessionLimits,
        supervision: Supervision,
        connections: Arc<AtomicUsize>,
    ) -> Addr<NbdSessionActor<B>> {
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
                backend,
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

    fn dispatch(&mut self, request: IncomingRequest, ctx: &mut Context<Self>) {
        let IncomingRequest {
            header,
            payload,
            permits,
        } = request;
        let cookie = header.cookie;
        let structured = self.negotiated.structured_replies;
        let request_limits = RequestLimits {
            request_max_bytes: self.limits.request_max_bytes,
        };
        if let Some(size_bytes) = self.backend.live_size_bytes() {
            if size_bytes > self.negotiated.export.size_bytes {
                self.negotiated.export.size_bytes = size_bytes;
            }
        }
        if let Err(errno) = check_request_negotiated(&header, &self.negotiated, &request_limits) {
            slog::debug!(self.supervision.logger, "request rejected";
                "peer" => %self.peer, "command" => ?header.command, "errno" => ?errno);
            self.send_reply(OutgoingReply {
                header: error_reply_bytes(structured, cookie, errno, "request rejected"),
                data: None,
                _permits: permits,
            });
            return;
        }
        let answered_here = match header.command {
            // An empty range asks for nothing ("Request types": a zero length is not an error
            // for these commands).
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
                if header.length == 0 =>
            {
                Some(BackendReply::Done)
            }
            // Every acknowledged write is already committed to the fsync'd Raft log on a
            // majority, so FLUSH covers all of them (on every connection) at once; CACHE is
            // advisory.
            Command::Flush | Command::Cache => Some(BackendReply::Done),
            // `check_request` rejects everything else before dispatch.
            Command::Disc | Command::Unknown(_) => Some(BackendReply::Error {
                errno: Errno::Inval,
                message: "unsupported",
            }),
            _ => None,
        };
        if let Some(reply) = answered_here {
            let (reply_header, data) = encode_backend_reply(&self.negotiated, &header, reply);
            self.send_reply(OutgoingReply {
                header: reply_header,
                data,
                _permits: permits,
            });
            return;
        }
        let started_at = Instant::now();
        let deadline = started_at + self.limits.request_timeout;
        let op = match header.command {
            Command::Read => "read",
            Command::Write => "write",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            _ => "other",
        };
        let op_metrics = crate::metrics::global().volume_op(&self.negotiated.export.name, op);
        let length_bytes = u64::from(header.length);
        let future = self.backend.execute(BackendRequest {
            header,
            payload,
            deadline,
        });
        let negotiated = self.negotiated.clone();
        let replies = self.replies.clone();
        let session = ctx.address();
        self.requests_in_flight += 1;
        actix_rt::spawn(async move {
            let reply = future.await;
            let ok = !matches!(reply, BackendReply::Error { .. });
            if ok {
                op_metrics.ok_total.fetch_add(1, Ordering::Relaxed);
                op_metrics
                    .bytes_total
                    .fetch_add(length_bytes, Ordering::Relaxed);
            } else {
                op_metrics.error_total.fetch_add(1, Ordering::Relaxed);
            }
            op_metrics.duration.observe(started_at.elapsed());
            let (reply_header, data) = encode_backend_reply(&negotiated, &header, reply);
            if let Some(replies) = replies {
                let _ = replies.send(OutgoingReply {
                    header: reply_header,
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

/// Encodes a backend's answer as the reply bytes for the client: a simple reply, or structured
/// chunks if they were negotiated ("Simple reply message", "Structured reply chunk message").
/// Read data is returned separately so it is written from the backend's buffer, uncopied.
fn encode_backend_reply(
    negotiated: &Negotiated,
    header: &RequestHeader,
    reply: BackendReply,
) -> (Vec<u8>, Option<Bytes>) {
    let structured = negotiated.structured_replies;
    let cookie = header.cookie;
    match reply {
        BackendReply::Done => (success_reply(structured, cookie), None),
        BackendReply::Error { errno, message } => {
            (error_reply_bytes(structured, cookie, errno, message), None)
        }
        BackendReply::Data(data) => {
            if header.command != Command::Read || data.len() != header.length as usize {
                // A backend bug must not desynchronise the client's byte stream.
                return (
                    error_reply_bytes(structured, cookie, Errno::Io, "read failed"),
                    None,
                );
            }
            let mut out = Vec::with_capacity(32);
            if structured {
                encode_read_data_chunk_header(&mut out, cookie, header.offset, header.length, true);
            } else {
                encode_simple_reply(&mut out, cookie, None);
            }
            (out, Some(data))
        }
        BackendReply::Extents(extents) => {
            let Some(context_id) = negotiated.base_allocation_context_id else {
                return (
                    error_reply_bytes(structured, cookie, Errno::Inval, "no metadata context"),
                    None,
                );
            };
            let request_one = header.flags & proto::NBD_CMD_FLAG_REQ_ONE != 0;
            let mut wire_extents: Vec<BlockStatusExtent> = extents
                .into_iter()
                .filter(|extent| extent.length_bytes > 0)
                .collect();
            if request_one {
                wire_extents.truncate(1);
            }
            if wire_extents.is_empty() {
                wire_extents.push(BlockStatusExtent {
                    length_bytes: header.length,
                    flags: 0,
                });
            }
            let mut out = Vec::with_capacity(32 + 8 * wire_extents.len());
            encode_block_status(&mut out, cookie, context_id, &wire_extents, true);
            (out, None)
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

/// A session's reader of its volume. A reader belongs to one state machine; when that one
/// is replaced (a snapshot was installed, or the storage actor restarted and reopened it) its
/// readers fail with `VolumeReplaced`, and the session takes the registry's reader of the
/// same volume (its id never changes) and reads again after a barrier.
#[derive(Clone)]
pub struct VolumeHandle {
    reader: Arc<parking_lot::Mutex<VolumeReader>>,
    registry: VolumeRegistry,
    volume_id: u64,
}

impl VolumeHandle {
    pub fn new(reader: VolumeReader, registry: VolumeRegistry) -> Self {
        let volume_id = reader.info().id;
        VolumeHandle {
            reader: Arc::new(parking_lot::Mutex::new(reader)),
            registry,
            volume_id,
        }
    }

    pub fn current(&self) -> VolumeReader {
        self.reader.lock().clone()
    }

    /// Takes the registry's reader of this volume; `None` when the registry has none, as
    /// after a snapshot install that dropped the volume (the retired reader is kept: it
    /// fails every read).
    fn refresh(&self) -> Option<VolumeReader> {
        let reader = self.registry.get_by_id(self.volume_id)?;
        *self.reader.lock() = reader.clone();
        Some(reader)
    }
}

/// What a read through a [`VolumeReader`] gives, run on the blocking pool or not.
type ReaderResult<T> = Result<Result<T, StorageError>, tokio::task::JoinError>;

/// Whether a read failed because its reader's state machine was replaced (see
/// [`VolumeHandle`]): then it is read again, not failed.
fn reader_replaced<T>(result: &ReaderResult<T>) -> bool {
    matches!(result, Ok(Err(StorageError::VolumeReplaced { .. })))
}

/// How long a read whose state machine was replaced waits before it looks for the new one.
const REPLACED_READER_RETRY: Duration = Duration::from_millis(1);

/// The server's backend: one volume of this node's Raft group. Writes carry `writer_epoch`
/// (the epoch named in the export, `disk0@7`; 0 for an anonymous session), which the state
/// machine checks against the volume's attachment.
#[derive(Clone)]
pub struct RaftVolumeBackend {
    pub volume: VolumeHandle,
    pub raft: Addr<RaftActor>,
    pub read_gate: ReadGate,
    pub writer_epoch: u64,
    pub logger: slog::Logger,
    /// Told about corruption found while reading (the process then exits).
    pub restarts: std::sync::Arc<super::supervisor::RestartCounters>,
}

impl SessionBackend for RaftVolumeBackend {
    fn live_size_bytes(&self) -> Option<u64> {
        Some(self.volume.current().size_bytes())
    }

    fn execute(&self, request: BackendRequest) -> impl Future<Output = BackendReply> + 'static {
        let BackendRequest {
            header,
            payload,
            deadline,
        } = request;
        let volume_id = self.volume.volume_id;
        let writer_epoch = self.writer_epoch;
        let proposal = match header.command {
            Command::Write => Some(encode_write_command(
                volume_id,
                writer_epoch,
                header.offset,
                &payload,
            )),
            Command::Trim => Some(encode_command(&StateCommand::Trim {
                volume_id,
                writer_epoch,
                offset: header.offset,
                length: u64::from(header.length),
            })),
            Command::WriteZeroes => Some(encode_command(&StateCommand::WriteZeroes {
                volume_id,
                writer_epoch,
                offset: header.offset,
                length: u64::from(header.length),
                may_punch_hole: header.flags & proto::NBD_CMD_FLAG_NO_HOLE == 0,
            })),
            _ => None,
        };
        // The payload is now inside the proposal (or unneeded): free it before waiting.
        drop(payload);
        // Decided now, at dispatch: a barrier skipped must be skipped for a request issued
        // while the gate was open. The reader is taken first: a restarted storage actor closes
        // the gate before its new state machine hands out a reader, so a reader of the new one
        // never goes with an open gate.
        let reader = self.volume.current();
        let needs_barrier = self.read_gate.reads_need_barrier();
        let backend = self.clone();
        async move {
            match (header.command, proposal) {
                (_, Some(command_bytes)) => backend.propose(command_bytes, deadline).await,
                (Command::Read, None) => {
                    backend.read(header, reader, needs_barrier, deadline).await
                }
                (Command::BlockStatus, None) => {
                    backend
                        .block_status(header, reader, needs_barrier, deadline)
                        .await
                }
                _ => BackendReply::Error {
                    errno: Errno::Inval,
                    message: "unsupported",
                },
            }
        }
    }
}

impl RaftVolumeBackend {
    async fn propose(&self, command_bytes: Vec<u8>, deadline: Instant) -> BackendReply {
        match propose_until(&self.raft, Bytes::from(command_bytes), deadline).await {
            Ok(ApplyOutcome::Rejected(rejection)) => {
                let (errno, message) = match rejection {
                    ApplyRejection::OutOfRange => (Errno::NoSpc, "write past the end"),
                    ApplyRejection::NoSuchVolume => (Errno::Shutdown, "the volume is gone"),
                    // Another writer holds the volume now (or this session is anonymous on an
                    // attached volume): final, never retried.
                    ApplyRejection::Fenced => (
                        Errno::Perm,
                        "fenced: the volume is attached by another writer epoch",
                    ),
                    _ => (Errno::Inval, "write rejected"),
                };
                BackendReply::Error { errno, message }
            }
            Ok(_) => BackendReply::Done,
            Err(error) => {
                // ESHUTDOWN, not EIO: the write was not applied and may succeed elsewhere (a
                // proxy retries it on another server; every other errno is final for it).
                slog::warn!(self.logger, "write failed after retries"; "error" => %error);
                BackendReply::Error {
                    errno: Errno::Shutdown,
                    message: "no quorum before the request deadline",
                }
            }
        }
    }

    /// Waits for the read barrier unless the read gate skipped it; an error reply if it failed.
    async fn barrier(&self, needs_barrier: bool, deadline: Instant) -> Result<(), BackendReply> {
        if !needs_barrier {
            // The read gate says no barrier is needed (sole-voter leader).
            return Ok(());
        }
        read_barrier_until(&self.raft, deadline)
            .await
            .map_err(|error| {
                slog::warn!(self.logger, "read barrier failed after retries"; "error" => %error);
                BackendReply::Error {
                    errno: Errno::Shutdown,
                    message: "no quorum before the request deadline",
                }
            })
    }

    /// Runs `attempt` on `reader` after the barrier (taken after the reader, see `execute`).
    /// While the attempt fails because the reader's state machine was replaced, it runs again
    /// on the registry's reader of the volume, after a barrier, until the deadline or until
    /// the registry no longer has the volume. `Err` is the barrier's failure reply.
    async fn with_reader<T, F, Fut>(
        &self,
        mut reader: VolumeReader,
        mut needs_barrier: bool,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<ReaderResult<T>, BackendReply>
    where
        F: FnMut(VolumeReader) -> Fut,
        Fut: Future<Output = ReaderResult<T>>,
    {
        loop {
            self.barrier(needs_barrier, deadline).await?;
            let result = attempt(reader.clone()).await;
            if !reader_replaced(&result) || Instant::now() >= deadline {
                return Ok(result);
            }
            tokio::time::sleep(REPLACED_READER_RETRY).await;
            let Some(current) = self.volume.refresh() else {
                return Ok(result);
            };
            reader = current;
            needs_barrier = true;
        }
    }

    async fn read(
        &self,
        header: RequestHeader,
        reader: VolumeReader,
        needs_barrier: bool,
        deadline: Instant,
    ) -> BackendReply {
        let offset = header.offset;
        let length = header.length as usize;
        let result = self
            .with_reader(reader, needs_barrier, deadline, |volume| async move {
                // Serve from the page cache on this thread when possible (no thread hop);
                // only reads that would wait for the disk go to the blocking pool.
                let mut buffer = vec![0u8; length];
                match volume.read_cached(offset, &mut buffer) {
                    Ok(true) => Ok(Ok(buffer)),
                    Ok(false) => {
                        tokio::task::spawn_blocking(move || {
                            volume.read(offset, &mut buffer).map(|()| buffer)
                        })
                        .await
                    }
                    Err(error) => Ok(Err(error)),
                }
            })
            .await;
        let result = match result {
            Ok(result) => result,
            Err(reply) => return reply,
        };
        match result {
            Ok(Ok(buffer)) => BackendReply::Data(Bytes::from(buffer)),
            Ok(Err(error)) => {
                slog::error!(self.logger, "read failed"; "error" => %error, "offset" => offset,
                    "length" => length);
                if matches!(error, crate::storage::StorageError::ChecksumMismatch { .. }) {
                    // This replica's image is corrupt: exit so that leadership, and with it
                    // the clients' reads, moves to a healthy replica (see ARCHITECTURE.md).
                    self.restarts.escalate(format!("corruption: {error}"));
                }
                BackendReply::Error {
                    errno: Errno::Io,
                    message: "read failed",
                }
            }
            Err(join_error) => {
                slog::error!(self.logger, "read task failed"; "error" => %join_error);
                BackendReply::Error {
                    errno: Errno::Io,
                    message: "read failed",
                }
            }
        }
    }

    async fn block_status(
        &self,
        header: RequestHeader,
        reader: VolumeReader,
        needs_barrier: bool,
        deadline: Instant,
    ) -> BackendReply {
        let offset = header.offset;
        let length = u64::from(header.length);
        let result = self
            .with_reader(reader, needs_barrier, deadline, |volume| async move {
                tokio::task::spawn_blocking(move || volume.block_status(offset, length)).await
            })
            .await;
        let result = match result {
            Ok(result) => result,
            Err(reply) => return reply,
        };
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
                BackendReply::Extents(wire_extents)
            }
            Ok(Err(error)) => {
                slog::error!(self.logger, "block status failed"; "error" => %error);
                BackendReply::Error {
                    errno: Errno::Io,
                    message: "block status failed",
                }
            }
            Err(join_error) => {
                slog::error!(self.logger, "block status task failed"; "error" => %join_error);
                BackendReply::Error {
                    errno: Errno::Io,
                    message: "block status failed",
                }
            }
        }
    }
}

impl<B: SessionBackend> Actor for NbdSessionActor<B> {
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

impl<B: SessionBackend> Handler<IncomingRequest> for NbdSessionActor<B> {
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

impl<B: SessionBackend> Handler<RequestFinished> for NbdSessionActor<B> {
    type Result = ();
    fn handle(&mut self, _: RequestFinished, ctx: &mut Context<Self>) {
        self.requests_in_flight = self.requests_in_flight.saturating_sub(1);
        self.maybe_finish(ctx);
    }
}

impl<B: SessionBackend> Handler<ReaderFinished> for NbdSessionActor<B> {
    type Result = ();
    fn handle(&mut self, msg: ReaderFinished, ctx: &mut Context<Self>) {
        slog::debug!(self.supervision.logger, "client stopped sending";
            "peer" => %self.peer, "reason" => msg.reason);
        self.reader_finished = true;
        self.maybe_finish(ctx);
    }
}

/// Reads requests until the client disconnects, sends DISC, or breaks the protocol.
async fn read_requests<R: AsyncRead + Unpin, B: SessionBackend>(
    reader: R,
    session: Addr<NbdSessionActor<B>>,
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

impl<B: SessionBackend> Handler<SendRaw> for NbdSessionActor<B> {
    type Result = ();
    fn handle(&mut self, msg: SendRaw, _ctx: &mut Context<Self>) {
        self.send_reply(msg.reply);
    }
}

/// Writes replies until every sender is gone, then shuts the socket down.
async fn write_replies(
    write_half: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    replies: mpsc::UnboundedReceiver<OutgoingReply>,
    logger: slog::Logger,
) {
    if let Err(error) = write_frames(write_half, replies).await {
        slog::debug!(logger, "client connection broke while replying"; "error" => %error);
    }
}

impl Frame for OutgoingReply {
    fn head(&self) -> &[u8] {
        &self.header
    }

    fn body(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}
