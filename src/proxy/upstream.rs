//! One volume's upstream: a task that keeps one NBD connection to the cluster (the leader when
//! known, any reachable server otherwise) and carries every local session's requests over it.
//!
//! Every request stays in [`Inflight`] until the cluster answered it on the *current*
//! connection. When the connection fails (EOF, I/O error, no reply within
//! `upstream_reply_timeout_ms`, an `NBD_ESHUTDOWN` reply, or the leader moved), the task
//! re-attaches the volume (a new epoch, which fences anything still in flight on the old one:
//! a stale write can no longer be applied after a newer one), connects again and reissues every
//! unanswered request in its original order. A request is answered to the session only with the
//! cluster's own answer, or with EIO once its deadline passed, so the proxy never acknowledges a
//! write the cluster has not acknowledged.
//!
//! One re-attach sends the same random attach id to every server it tries, so a server that
//! timed out for the proxy but still commits the attach later answers with the attachment
//! another server made instead of starting a new epoch. A write answered `EPERM` (fenced) also
//! re-attaches, without force, and is reissued: what overtakes the proxy's epoch can still be
//! an attach of this client's own that no id covers (one of an earlier re-attach, or one made
//! through the control API). If another client took the volume over, that re-attach is
//! refused and every request fails with `EPERM` from then on.
//!
//! Memory: requests in flight are bounded by the sessions' flow control (each holds permits for
//! its payload or read size until answered) and by the bounded queue into this task.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::MaybeTls;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::discovery::{attach_once, AttachError, ClusterView};
use crate::actors::frame_writer;
use crate::nbd::client::{
    parse_reply_header, reply_header_bytes, ChunkPayload, ClientHandshake, ClientHandshakeStep,
    ExportInfo, ReplyAnswer, ReplyAssembly, ReplyHeader, CHUNK_HEADER_BYTES, REPLY_MAGIC_BYTES,
};
use crate::nbd::proto;
use crate::nbd::transmission::{
    encode_request_header, BlockStatusExtent, Command, Errno, RequestHeader,
};

/// What the session gets back: the cluster's answer (read data, block status extents), or the
/// final errno.
pub type UpstreamResult = Result<ReplyAnswer, Errno>;

/// Session → upstream task: one request to forward.
pub struct UpstreamRequest {
    pub header: RequestHeader,
    pub payload: Bytes,
    pub deadline: Instant,
    pub responder: oneshot::Sender<UpstreamResult>,
}

/// Command flags forwarded upstream. `NBD_CMD_FLAG_DF` is dropped: the proxy puts a read's
/// chunks together before it answers, so the local client gets one chunk whatever the server
/// sent, and the upstream connection may have simple replies, where DF is not allowed
/// ("Command flags").
const FORWARDED_FLAGS: u16 = proto::NBD_CMD_FLAG_FUA
    | proto::NBD_CMD_FLAG_NO_HOLE
    | proto::NBD_CMD_FLAG_FAST_ZERO
    | proto::NBD_CMD_FLAG_REQ_ONE;

/// A request waiting for the cluster's answer.
pub struct Pending<R> {
    pub header: RequestHeader,
    pub payload: Bytes,
    pub deadline: Instant,
    pub responder: R,
    /// The connection it was last sent on and when; `None` = waiting to be (re)sent.
    sent: Option<(u64, Instant)>,
}

/// The unanswered requests of one upstream, keyed by the cookie used upstream (increasing in
/// arrival order, so iteration order is issue order). Pure bookkeeping, no I/O.
pub struct Inflight<R> {
    requests: BTreeMap<u64, Pending<R>>,
    next_cookie: u64,
}

impl<R> Default for Inflight<R> {
    fn default() -> Self {
        Inflight {
            requests: BTreeMap::new(),
            next_cookie: 1,
        }
    }
}

impl<R> Inflight<R> {
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Registers a request; returns its upstream cookie.
    pub fn add(
        &mut self,
        header: RequestHeader,
        payload: Bytes,
        deadline: Instant,
        responder: R,
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut header = header;
        header.cookie = cookie;
        header.flags &= FORWARDED_FLAGS;
        self.requests.insert(
            cookie,
            Pending {
                header,
                payload,
                deadline,
                responder,
                sent: None,
            },
        );
        cookie
    }

    /// Cookies waiting to be sent, in issue order.
    pub fn unsent(&self) -> Vec<u64> {
        self.requests
            .iter()
            .filter(|(_, pending)| pending.sent.is_none())
            .map(|(cookie, _)| *cookie)
            .collect()
    }

    pub fn get(&self, cookie: u64) -> Option<&Pending<R>> {
        self.requests.get(&cookie)
    }

    pub fn mark_sent(&mut self, cookie: u64, connection: u64, now: Instant) {
        if let Some(pending) = self.requests.get_mut(&cookie) {
            pending.sent = Some((connection, now));
        }
    }

    /// Was `cookie` sent on `connection` and is still unanswered? Replies that arrive on an
    /// older connection for a request since reissued are not this request's answer.
    pub fn awaits_reply_on(&self, cookie: u64, connection: u64) -> bool {
        self.requests.get(&cookie).is_some_and(|pending| {
            pending
                .sent
                .is_some_and(|(sent_on, _)| sent_on == connection)
        })
    }

    /// Takes the request out once the cluster answered it.
    pub fn complete(&mut self, cookie: u64) -> Option<Pending<R>> {
        self.requests.remove(&cookie)
    }

    /// The connection failed: everything sent on it will be sent again.
    pub fn connection_failed(&mut self) {
        for pending in self.requests.values_mut() {
            pending.sent = None;
        }
    }

    /// Removes and returns the requests whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Pending<R>> {
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, pending)| pending.deadline <= now)
            .map(|(cookie, _)| *cookie)
            .collect();
        expired
            .into_iter()
            .filter_map(|cookie| self.requests.remove(&cookie))
            .collect()
    }

    /// When the oldest request still waiting for a reply on `connection` was sent.
    pub fn oldest_sent_at(&self, connection: u64) -> Option<Instant> {
        self.requests
            .values()
            .filter_map(|pending| match pending.sent {
                Some((sent_on, at)) if sent_on == connection => Some(at),
                _ => None,
            })
            .min()
    }

    /// Takes every request out (the volume was lost).
    pub fn drain(&mut self) -> Vec<Pending<R>> {
        std::mem::take(&mut self.requests).into_values().collect()
    }
}

/// How a session reaches a volume's upstream task.
#[derive(Clone)]
pub struct UpstreamHandle {
    pub sender: mpsc::Sender<UpstreamRequest>,
}

/// Everything an upstream task needs.
pub struct UpstreamParams {
    pub volume_name: String,
    pub client_id: String,
    /// From the attach made during the first handshake; 0 if the cluster has no fencing.
    pub epoch: u64,
    pub view: ClusterView,
    pub reply_timeout: Duration,
    pub queue_max: usize,
    pub logger: slog::Logger,
    /// NBD over TLS to the servers (`[proxy] upstream_tls_dir`); `None`: plaintext.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// Starts the task on the current arbiter.
pub fn spawn_upstream(params: UpstreamParams) -> UpstreamHandle {
    let (sender, receiver) = mpsc::channel(params.queue_max);
    actix_rt::spawn(run_upstream(params, receiver));
    UpstreamHandle { sender }
}

/// Upstream connection → task.
enum ConnectionEvent {
    Reply {
        connection: u64,
        cookie: u64,
        error: u32,
        answer: ReplyAnswer,
    },
    Closed {
        connection: u64,
        reason: String,
    },
}

struct Frame {
    header: Vec<u8>,
    payload: Bytes,
}

struct Connection {
    id: u64,
    address: SocketAddr,
    frames: mpsc::UnboundedSender<Frame>,
    /// The reads and block status requests sent on this connection, for the reader to know
    /// what their replies carry.
    expected: Arc<Mutex<HashMap<u64, Expected>>>,
    /// What the handshake negotiated; `None` for `base:allocation` means block status is
    /// answered here as "all data".
    base_allocation_context_id: Option<u32>,
    reader: tokio::task::JoinHandle<()>,
}

/// A request whose reply carries more than an errno.
#[derive(Clone, Copy, Debug)]
struct Expected {
    command: Command,
    offset: u64,
    length_bytes: u32,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer ends when `frames` is dropped; the reader must be stopped explicitly.
        self.reader.abort();
    }
}

struct Established {
    stream: MaybeTls,
    leftover: BytesMut,
    address: SocketAddr,
    epoch: u64,
    info: ExportInfo,
}

enum EstablishError {
    /// Worth retrying (no leader yet, server down, network).
    Transient(String),
    /// The volume was taken over by another client (or deleted): final.
    Lost(String),
}

/// Fenced writes in a row that make the upstream re-attach; one more is answered EPERM. Each
/// late attach of this client's own fences it once, and a server retries an attach only until
/// its control request times out, so a few cover every retry still under way.
const MAX_FENCED_REATTACHES: u32 = 4;

type EstablishFuture = Pin<Box<dyn Future<Output = Result<Established, EstablishError>>>>;

async fn run_upstream(params: UpstreamParams, mut requests: mpsc::Receiver<UpstreamRequest>) {
    let logger = params
        .logger
        .new(slog::o!("volume" => params.volume_name.clone()));
    let mut inflight: Inflight<oneshot::Sender<UpstreamResult>> = Inflight::default();
    let (events_sender, mut events) = mpsc::unbounded_channel::<ConnectionEvent>();
    let mut connection: Option<Connection> = None;
    let mut connecting: Option<EstablishFuture> = None;
    let mut epoch = params.epoch;
    // The first connection uses the attach made by the handshake; every later one re-attaches.
    let mut reattach = false;
    let mut next_connection_id = 1u64;
    let mut retry_at = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut lost: Option<String> = None;
    // Re-attaches caused by fenced writes since the last write that succeeded.
    let mut fenced_reattaches = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if lost.is_none()
            && connection.is_none()
            && connecting.is_none()
            && Instant::now() >= retry_at
        {
            connecting = Some(Box::pin(establish(
                params.view.clone(),
                params.volume_name.clone(),
                params.client_id.clone(),
                epoch,
                reattach,
                params.reply_timeout,
                params.tls.clone(),
            )));
        }
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else {
                    // Every session and the service are gone.
                    return;
                };
                if let Some(message) = &lost {
                    slog::debug!(logger, "request refused: volume lost"; "reason" => message);
                    let _ = request.responder.send(Err(Errno::Perm));
                    continue;
                }
                let cookie = inflight.add(request.header, request.payload, request.deadline, request.responder);
                if let Some(connection) = &connection {
                    send_request(connection, &mut inflight, cookie);
                }
            }
            Some(event) = events.recv() => {
                match event {
                    ConnectionEvent::Reply { connection: from, cookie, error, answer } => {
                        let current = connection.as_ref().map(|c| c.id);
                        if current != Some(from) || !inflight.awaits_reply_on(cookie, from) {
                            continue;
                        }
                        if error == proto::NBD_ESHUTDOWN {
                            // The server could not reach a quorum in time: retry elsewhere.
                            slog::info!(logger, "upstream answered ESHUTDOWN; reconnecting");
                            fail_connection(&mut connection, &mut inflight, &mut reattach, epoch, &params.view);
                            continue;
                        }
                        let changes_data = inflight.get(cookie).is_some_and(|pending| {
                            matches!(pending.header.command, Command::Write | Command::Trim | Command::WriteZeroes)
                        });
                        if error == proto::NBD_EPERM && changes_data && epoch != 0
                            && fenced_reattaches < MAX_FENCED_REATTACHES
                        {
                            // Our epoch was overtaken. Either another client took the volume
                            // (the re-attach, without force, is then refused and the volume is
                            // lost), or an attach of our own that an earlier server was still
                            // retrying committed after the one we hold. A fenced write changed
                            // nothing, so it is reissued under the new epoch.
                            fenced_reattaches += 1;
                            slog::warn!(logger, "upstream write fenced; re-attaching";
                                "epoch" => epoch, "attempt" => fenced_reattaches);
                            fail_connection(&mut connection, &mut inflight, &mut reattach, epoch, &params.view);
                            continue;
                        }
                        let Some(pending) = inflight.complete(cookie) else { continue };
                        if error == 0 && changes_data {
                            fenced_reattaches = 0;
                        }
                        let result = if error == 0 {
                            Ok(answer)
                        } else {
                            Err(Errno::from_code(error).unwrap_or(Errno::Inval))
                        };
                        let _ = pending.responder.send(result);
                    }
                    ConnectionEvent::Closed { connection: from, reason } => {
                        if connection.as_ref().map(|c| c.id) == Some(from) {
                            slog::info!(logger, "upstream connection lost"; "reason" => reason,
                                "unanswered" => inflight.len());
                            fail_connection(&mut connection, &mut inflight, &mut reattach, epoch, &params.view);
                        }
                    }
                }
            }
            result = async { connecting.as_mut().expect("guarded by the select condition").await }, if connecting.is_some() => {
                connecting = None;
                match result {
                    Ok(established) => {
                        epoch = established.epoch;
                        reattach = false;
                        backoff = Duration::from_millis(50);
                        let id = next_connection_id;
                        next_connection_id += 1;
                        slog::info!(logger, "upstream connected"; "address" => %established.address,
                            "epoch" => epoch, "reissuing" => inflight.len());
                        let new_connection = start_connection(id, established, events_sender.clone());
                        for cookie in inflight.unsent() {
                            send_request(&new_connection, &mut inflight, cookie);
                        }
                        connection = Some(new_connection);
                    }
                    Err(EstablishError::Transient(reason)) => {
                        slog::debug!(logger, "upstream connect failed; retrying"; "reason" => reason,
                            "backoff_ms" => backoff.as_millis() as u64);
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(EstablishError::Lost(message)) => {
                        slog::error!(logger, "volume lost: every request now fails with EPERM";
                            "reason" => &message);
                        for pending in inflight.drain() {
                            let _ = pending.responder.send(Err(Errno::Perm));
                        }
                        lost = Some(message);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut expired_changes_data = false;
                for pending in inflight.expire(now) {
                    slog::warn!(logger, "request deadline passed; answering EIO";
                        "command" => ?pending.header.command, "offset" => pending.header.offset);
                    expired_changes_data |= matches!(
                        pending.header.command,
                        Command::Write | Command::Trim | Command::WriteZeroes
                    );
                    let _ = pending.responder.send(Err(Errno::Io));
                }
                if expired_changes_data && connection.is_some() {
                    // The servers may still be retrying the write the client was just told
                    // failed: with a new epoch, it can never land after anything sent from
                    // now on.
                    slog::info!(logger, "leaving upstream connection";
                        "reason" => "a write passed its deadline", "unanswered" => inflight.len());
                    fail_connection(&mut connection, &mut inflight, &mut reattach, epoch, &params.view);
                    continue;
                }
                let Some(current) = &connection else { continue };
                let timed_out = inflight
                    .oldest_sent_at(current.id)
                    .is_some_and(|sent_at| now.duration_since(sent_at) >= params.reply_timeout);
                let (snapshot, leader_known) = params.view.snapshot();
                let leader_moved = snapshot
                    .leader_nbd(leader_known)
                    .is_some_and(|leader| leader != current.address);
                if timed_out || leader_moved {
                    slog::info!(logger, "leaving upstream connection";
                        "reason" => if timed_out { "reply timeout" } else { "leader moved" },
                        "address" => %current.address, "unanswered" => inflight.len());
                    fail_connection(&mut connection, &mut inflight, &mut reattach, epoch, &params.view);
                }
            }
        }
    }
}

fn fail_connection<R>(
    connection: &mut Option<Connection>,
    inflight: &mut Inflight<R>,
    reattach: &mut bool,
    epoch: u64,
    view: &ClusterView,
) {
    *connection = None;
    inflight.connection_failed();
    // With fencing, the next connection gets a new epoch: requests still in flight on the old
    // connection can then never be applied after the reissued ones.
    *reattach = epoch != 0;
    let view = view.clone();
    actix_rt::spawn(async move { view.refresh(Duration::from_millis(0)).await });
}

fn send_request(
    connection: &Connection,
    inflight: &mut Inflight<oneshot::Sender<UpstreamResult>>,
    cookie: u64,
) {
    let Some(pending) = inflight.get(cookie) else {
        return;
    };
    let command = pending.header.command;
    if command == Command::BlockStatus && connection.base_allocation_context_id.is_none() {
        // This server cannot report allocation: "allocated data" is always a correct answer
        // ("base:allocation": a server MAY report data for any extent).
        let length_bytes = pending.header.length;
        if let Some(pending) = inflight.complete(cookie) {
            let answer = if length_bytes == 0 {
                Err(Errno::Inval)
            } else {
                Ok(ReplyAnswer::Extents(vec![BlockStatusExtent {
                    length_bytes,
                    flags: 0,
                }]))
            };
            let _ = pending.responder.send(answer);
        }
        return;
    }
    let mut header = Vec::with_capacity(28);
    encode_request_header(&mut header, &pending.header);
    if matches!(command, Command::Read | Command::BlockStatus) {
        connection.expected.lock().insert(
            cookie,
            Expected {
                command,
                offset: pending.header.offset,
                length_bytes: pending.header.length,
            },
        );
    }
    let payload = if pending.header.command == Command::Write {
        pending.payload.clone()
    } else {
        Bytes::new()
    };
    // A send error means the writer ended; its reader reports the closed connection.
    let _ = connection.frames.send(Frame { header, payload });
    inflight.mark_sent(cookie, connection.id, Instant::now());
}

fn start_connection(
    id: u64,
    established: Established,
    events: mpsc::UnboundedSender<ConnectionEvent>,
) -> Connection {
    let Established {
        stream,
        leftover,
        address,
        info,
        ..
    } = established;
    let (read_half, write_half) = stream.into_boxed_halves();
    let (frames, frame_receiver) = mpsc::unbounded_channel();
    let expected = Arc::new(Mutex::new(HashMap::new()));
    // A write error shows up on the read side too (EOF or reset), which reconnects.
    actix_rt::spawn(frame_writer::write_frames(write_half, frame_receiver));
    let reader = actix_rt::spawn(read_replies(
        id,
        read_half,
        leftover,
        expected.clone(),
        info.base_allocation_context_id,
        events,
    ));
    Connection {
        id,
        address,
        frames,
        expected,
        base_allocation_context_id: info.base_allocation_context_id,
        reader,
    }
}

impl frame_writer::Frame for Frame {
    fn head(&self) -> &[u8] {
        &self.header
    }

    fn body(&self) -> &[u8] {
        &self.payload
    }
}

/// Structured replies one connection may have begun and not finished: far more than the
/// requests the sessions' flow control lets be in flight, so only a broken server reaches it.
const REPLIES_IN_PROGRESS_MAX: usize = 1 << 16;

async fn read_replies(
    connection: u64,
    read_half: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    leftover: BytesMut,
    expected: Arc<Mutex<HashMap<u64, Expected>>>,
    base_allocation_context_id: Option<u32>,
    events: mpsc::UnboundedSender<ConnectionEvent>,
) {
    let reader = std::io::Cursor::new(leftover).chain(read_half);
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    // Structured replies whose last chunk has not come yet; at most one per request in flight.
    let mut assemblies: HashMap<u64, ReplyAssembly> = HashMap::new();
    let mut payload = Vec::new();
    let reason = loop {
        let mut header = [0u8; CHUNK_HEADER_BYTES];
        if let Err(error) = reader.read_exact(&mut header[..REPLY_MAGIC_BYTES]).await {
            break format!("connection closed: {error}");
        }
        let header_bytes = match reply_header_bytes([header[0], header[1], header[2], header[3]]) {
            Ok(bytes) => bytes,
            Err(error) => break format!("protocol error: {error}"),
        };
        if let Err(error) = reader
            .read_exact(&mut header[REPLY_MAGIC_BYTES..header_bytes])
            .await
        {
            break format!("connection closed: {error}");
        }
        let reply = match parse_reply_header(&header[..header_bytes]) {
            Ok(reply) => reply,
            Err(error) => break format!("protocol error: {error}"),
        };
        let (cookie, error, answer) = match reply {
            ReplyHeader::Simple(reply) => {
                let sent = expected.lock().remove(&reply.cookie);
                let answer = match (reply.error, sent) {
                    (0, Some(sent)) if sent.command == Command::Read => {
                        let mut data = BytesMut::zeroed(sent.length_bytes as usize);
                        if let Err(error) = reader.read_exact(&mut data).await {
                            break format!("connection closed mid-reply: {error}");
                        }
                        ReplyAnswer::Data(data.freeze())
                    }
                    // Block status needs a structured reply.
                    (0, Some(_)) => break "protocol error: simple reply to block status".into(),
                    _ => ReplyAnswer::Done,
                };
                (reply.cookie, reply.error, answer)
            }
            ReplyHeader::Chunk(chunk) => {
                if assemblies.len() >= REPLIES_IN_PROGRESS_MAX
                    && !assemblies.contains_key(&chunk.cookie)
                {
                    break format!(
                        "protocol error: more than {REPLIES_IN_PROGRESS_MAX} replies unfinished"
                    );
                }
                let assembly = assemblies.entry(chunk.cookie).or_insert_with(|| {
                    match expected.lock().remove(&chunk.cookie) {
                        Some(sent) => {
                            ReplyAssembly::new(sent.command, sent.offset, sent.length_bytes)
                        }
                        // A request whose reply carries nothing but success or an errno.
                        None => ReplyAssembly::new(Command::Flush, 0, 0),
                    }
                });
                let step = match assembly.chunk(chunk) {
                    Ok(step) => step,
                    Err(error) => break format!("protocol error: {error}"),
                };
                match step {
                    ChunkPayload::DataOffset => {
                        let mut offset = [0u8; 8];
                        if let Err(error) = reader.read_exact(&mut offset).await {
                            break format!("connection closed mid-reply: {error}");
                        }
                        let slot = match assembly.data_slot(u64::from_be_bytes(offset)) {
                            Ok(slot) => slot,
                            Err(error) => break format!("protocol error: {error}"),
                        };
                        if let Err(error) = reader.read_exact(slot).await {
                            break format!("connection closed mid-reply: {error}");
                        }
                    }
                    ChunkPayload::Whole { length_bytes } => {
                        payload.resize(length_bytes as usize, 0);
                        if let Err(error) = reader.read_exact(&mut payload).await {
                            break format!("connection closed mid-reply: {error}");
                        }
                        if let Err(error) = assembly.payload(&payload, base_allocation_context_id) {
                            break format!("protocol error: {error}");
                        }
                    }
                }
                if chunk.flags & proto::NBD_REPLY_FLAG_DONE == 0 {
                    continue;
                }
                let Some(assembly) = assemblies.remove(&chunk.cookie) else {
                    continue;
                };
                match assembly.finish() {
                    Ok((error, answer)) => (chunk.cookie, error, answer),
                    Err(error) => break format!("protocol error: {error}"),
                }
            }
        };
        if events
            .send(ConnectionEvent::Reply {
                connection,
                cookie,
                error,
                answer,
            })
            .is_err()
        {
            return;
        }
    };
    let _ = events.send(ConnectionEvent::Closed { connection, reason });
}

/// Finds a server, (re-)attaches if needed, connects and runs the client handshake for
/// `volume@epoch`.
async fn establish(
    view: ClusterView,
    volume_name: String,
    client_id: String,
    epoch: u64,
    reattach: bool,
    reply_timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
) -> Result<Established, EstablishError> {
    let control_timeout = view.control_timeout();
    let (mut snapshot, _) = view.snapshot();
    if reattach || snapshot.nbd_candidates.is_empty() {
        view.refresh(control_timeout).await;
        (snapshot, _) = view.snapshot();
    }
    let mut epoch = epoch;
    if reattach {
        epoch = attach(&view, &volume_name, &client_id, false)
            .await
            .map_err(|error| match error {
                AttachError::Refused(message) | AttachError::NoSuchVolume(message) => {
                    EstablishError::Lost(message)
                }
                AttachError::Unsupported => EstablishError::Transient(
                    "the server no longer supports attaching volumes".to_string(),
                ),
                AttachError::Unavailable(message) => EstablishError::Transient(message),
            })?;
    }
    let export_name = if epoch == 0 {
        volume_name.clone()
    } else {
        format!("{volume_name}@{epoch}")
    };
    let mut last_error = "no server address known yet".to_string();
    for address in snapshot.nbd_candidates {
        let attempt = connect_and_handshake(address, &export_name, tls.as_ref());
        match tokio::time::timeout(reply_timeout, attempt).await {
            Ok(Ok((stream, leftover, info))) => {
                return Ok(Established {
                    stream,
                    leftover,
                    address,
                    epoch,
                    info,
                })
            }
            Ok(Err(error)) => last_error = format!("{address}: {error}"),
            Err(_) => last_error = format!("{address}: handshake timed out"),
        }
    }
    Err(EstablishError::Transient(last_error))
}

/// Connects to `address` and runs the client handshake; with `tls`, `NBD_OPT_STARTTLS` first
/// and the rest through TLS, the server's certificate checked against the address dialled.
async fn connect_and_handshake(
    address: SocketAddr,
    export_name: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<(MaybeTls, BytesMut, ExportInfo), String> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|error| error.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut stream = MaybeTls::Plain(tcp);
    let mut handshake = ClientHandshake::new(export_name)
        .map_err(|error| error.to_string())?
        .asking_structured_replies();
    if tls.is_some() {
        handshake = handshake.requiring_tls();
    }
    let mut input = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(256);
    loop {
        let step = handshake
            .advance(&mut input, &mut out)
            .map_err(|error| error.to_string())?;
        if !out.is_empty() {
            stream
                .send(&mut out)
                .await
                .map_err(|error| error.to_string())?;
        }
        match step {
            ClientHandshakeStep::NeedMore => {
                input.reserve(4096);
                let read = stream
                    .read_buf(&mut input)
                    .await
                    .map_err(|error| error.to_string())?;
                if read == 0 {
                    return Err("server closed the connection during the handshake".to_string());
                }
            }
            ClientHandshakeStep::Done(info) => return Ok((stream, input, info)),
            ClientHandshakeStep::StartTls => {
                let (Some(tls), MaybeTls::Plain(tcp)) = (tls, stream) else {
                    return Err("STARTTLS acknowledged on a connection already TLS".to_string());
                };
                if !input.is_empty() {
                    return Err("the server sent data after acknowledging STARTTLS".to_string());
                }
                let name = rustls::pki_types::ServerName::from(address.ip());
                let upgraded = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|error| format!("TLS handshake with {address} failed: {error}"))?;
                stream = MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(upgraded)));
                handshake.tls_started(&mut out);
                stream
                    .send(&mut out)
                    .await
                    .map_err(|error| error.to_string())?;
            }
        }
    }
}

/// Attaches `volume_name` for `client_id`, trying the leader's control API first, then every
/// other server. Refusals (409, 404) are final; anything else tries the next server. Every
/// server gets the same random attach id, so a server that timed out here but commits the
/// attach later answers with the attachment another server made, instead of a new epoch.
pub async fn attach(
    view: &ClusterView,
    volume_name: &str,
    client_id: &str,
    force: bool,
) -> Result<u64, AttachError> {
    let attach_id = rand::random::<u64>();
    let (snapshot, _) = view.snapshot();
    let timeout = view.control_timeout();
    let mut last = AttachError::Unavailable("no server configured".to_string());
    for control in snapshot.control_candidates {
        let name = volume_name.to_string();
        let client = client_id.to_string();
        let token = view.token();
        let result = tokio::task::spawn_blocking(move || {
            attach_once(control, &name, &client, force, attach_id, timeout, &token)
        })
        .await
        .unwrap_or_else(|error| Err(AttachError::Unavailable(error.to_string())));
        match result {
            Ok(epoch) => return Ok(epoch),
            Err(error @ (AttachError::Refused(_) | AttachError::NoSuchVolume(_))) => {
                return Err(error)
            }
            Err(error) => last = error,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: Command, offset: u64) -> RequestHeader {
        RequestHeader {
            flags: proto::NBD_CMD_FLAG_FUA | proto::NBD_CMD_FLAG_DF,
            command,
            cookie: 999,
            offset,
            length: 4096,
        }
    }

    /// After a connection failure every unanswered request is sent again, in the order the
    /// sessions issued it; answered ones are not.
    #[test]
    fn reissue_after_failure_keeps_issue_order_and_skips_answered_requests() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let mut inflight: Inflight<u32> = Inflight::default();
        let a = inflight.add(
            header(Command::Write, 0),
            Bytes::from_static(b"a"),
            deadline,
            1,
        );
        let b = inflight.add(header(Command::Read, 4096), Bytes::new(), deadline, 2);
        let c = inflight.add(
            header(Command::Write, 8192),
            Bytes::from_static(b"c"),
            deadline,
            3,
        );
        assert_eq!(inflight.unsent(), vec![a, b, c]);
        for cookie in [a, b, c] {
            inflight.mark_sent(cookie, 1, now);
        }
        assert!(inflight.unsent().is_empty());
        assert_eq!(
            inflight.complete(b).map(|pending| pending.responder),
            Some(2)
        );
        inflight.connection_failed();
        assert_eq!(inflight.unsent(), vec![a, c]);
        // Upstream cookies are the proxy's own; DF is not forwarded, FUA is.
        let pending = inflight.get(a).expect("still pending");
        assert_eq!(pending.header.cookie, a);
        assert_eq!(pending.header.flags, proto::NBD_CMD_FLAG_FUA);
    }

    /// A reply on an old connection for a request since reissued on a new one is ignored: only
    /// the answer on the connection it is waiting on counts.
    #[test]
    fn replies_count_only_on_the_connection_the_request_waits_on() {
        let now = Instant::now();
        let mut inflight: Inflight<()> = Inflight::default();
        let a = inflight.add(
            header(Command::Write, 0),
            Bytes::new(),
            now + Duration::from_secs(1),
            (),
        );
        inflight.mark_sent(a, 1, now);
        assert!(inflight.awaits_reply_on(a, 1));
        inflight.connection_failed();
        assert!(!inflight.awaits_reply_on(a, 1));
        inflight.mark_sent(a, 2, now);
        assert!(!inflight.awaits_reply_on(a, 1));
        assert!(inflight.awaits_reply_on(a, 2));
        assert_eq!(inflight.oldest_sent_at(2), Some(now));
        assert_eq!(inflight.oldest_sent_at(1), None);
    }

    #[test]
    fn requests_past_their_deadline_expire() {
        let now = Instant::now();
        let mut inflight: Inflight<u8> = Inflight::default();
        inflight.add(header(Command::Write, 0), Bytes::new(), now, 1);
        let later = inflight.add(
            header(Command::Write, 0),
            Bytes::new(),
            now + Duration::from_secs(5),
            2,
        );
        let expired = inflight.expire(now);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].responder, 1);
        assert_eq!(inflight.unsent(), vec![later]);
    }
}
