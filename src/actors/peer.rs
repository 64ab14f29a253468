//! The Raft peer transport: raft-rs messages between storage servers over TCP, in the frame
//! format of [`crate::peer`].
//!
//! - **Outbound**, one link per peer: the Raft actor queues messages with [`PeerNetwork::send`]
//!   (never blocking: a full queue drops the message, which Raft tolerates and repairs by
//!   resending). A link task connects lazily, writes every queued message, batching whatever
//!   is queued into one socket write, reconnects with capped exponential backoff, and reports
//!   the peer unreachable to Raft when a connection fails, so Raft probes instead of
//!   streaming into a dead socket. Messages queued while disconnected are dropped: they
//!   would be stale by the time a connection exists.
//! - **Snapshots** travel on their own connection so heartbeats keep flowing meanwhile: the
//!   `MsgSnapshot` first, then the volume data in bounded chunks read from the storage layer
//!   off the async threads, then an end frame; the receiver stages the chunks to disk and only
//!   then steps the `MsgSnapshot` into Raft, whose Ready installs the staged data. The sender
//!   reports the outcome to Raft (`report_snapshot`).
//! - **Inbound**: one accept loop; each connection must open with a hello addressed to this
//!   node from a current member, and every frame is bounded by `peer.frame_bytes_max`.
//!
//! Every task runs on the transport's own arbiter. A panicking link task is restarted by its
//! supervising loop (one-for-one, with backoff) and counted like an actor restart. The
//! byte-stream is generic (`AsyncRead + AsyncWrite`), the seam where TLS will replace TCP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::{MaybeTls, PeerTls};
use tokio::sync::mpsc;

use super::messages::{
    OpenSnapshotSource, RaftLink, ReportSnapshot, ReportUnreachable, StepPeerMessage, StorageLink,
    StorageRequestError,
};
use super::supervisor::{CrashVerdict, Supervision};
use crate::config::{MemberConfig, PeerConfig};
use crate::peer::{
    decode_frame, decode_hello, decode_raft_message, encode_frame, encode_hello,
    encode_raft_message, FrameKind, Hello, StreamKind, HELLO_BYTES,
};
use crate::storage::snapshot::{SnapshotStaging, StagedSnapshot};

/// The sending side, held by the Raft actor. Cheap to clone.
///
/// The set of peers follows the member directory: [`PeerNetwork::set_members`] opens a link
/// for every member not yet linked and closes the links of members that left, so
/// configuration changes reach the transport without a restart.
#[derive(Clone)]
pub struct PeerNetwork {
    inner: Arc<NetworkInner>,
}

struct NetworkInner {
    node_id: u64,
    config: PeerConfig,
    /// Queue and dial address per linked peer; the accept side admits exactly these peers.
    links: parking_lot::RwLock<HashMap<u64, LinkQueue>>,
    /// New links, started by the transport's link manager.
    new_links: mpsc::UnboundedSender<NewLink>,
    logger: slog::Logger,
    dropped_messages: AtomicU64,
}

struct LinkQueue {
    address: String,
    sender: mpsc::Sender<RaftMessage>,
    queued_bytes: Arc<AtomicU64>,
    queue_bytes_max: u64,
}

/// A link to start: its peer, where to dial, and the receiving half of its queue.
struct NewLink {
    to: u64,
    address: String,
    receiver: mpsc::Receiver<RaftMessage>,
    queued_bytes: Arc<AtomicU64>,
}

/// The receiving side of the link set, consumed by [`start_peer_transport`].
pub struct PeerLinks {
    new_links: mpsc::UnboundedReceiver<NewLink>,
}

/// A snapshot received and staged on disk, waiting for the Raft actor's Ready to install it.
/// Only the newest one is kept.
#[derive(Clone, Default)]
pub struct SnapshotInbox {
    staged: Arc<parking_lot::Mutex<Option<(u64, u64, StagedSnapshot)>>>,
}

impl SnapshotInbox {
    fn put(&self, index: u64, term: u64, staged: StagedSnapshot) {
        *self.staged.lock() = Some((index, term, staged));
    }

    /// Takes the staged snapshot for `index`/`term`, if that is the one received.
    pub fn take(&self, index: u64, term: u64) -> Option<StagedSnapshot> {
        let mut slot = self.staged.lock();
        match slot.take() {
            Some((staged_index, staged_term, staged))
                if staged_index == index && staged_term == term =>
            {
                Some(staged)
            }
            other => {
                *slot = other;
                None
            }
        }
    }
}

/// Approximate bytes a message holds in a queue.
fn message_bytes(message: &RaftMessage) -> u64 {
    let entries: usize = message
        .get_entries()
        .iter()
        .map(|entry| entry.data.len() + entry.context.len() + 32)
        .sum();
    (entries + 64) as u64
}

impl PeerNetwork {
    /// A network with no peers yet; [`Self::set_members`] adds them.
    pub fn new(node_id: u64, config: &PeerConfig, logger: slog::Logger) -> (Self, PeerLinks) {
        let (new_links, receiver) = mpsc::unbounded_channel();
        (
            PeerNetwork {
                inner: Arc::new(NetworkInner {
                    node_id,
                    config: config.clone(),
                    links: parking_lot::RwLock::new(HashMap::new()),
                    new_links,
                    logger,
                    dropped_messages: AtomicU64::new(0),
                }),
            },
            PeerLinks {
                new_links: receiver,
            },
        )
    }

    /// Makes the links match `members` (this node excluded): one bounded queue and link task
    /// per member, dialled at its `peer.connect_overrides` entry or else its peer address. A
    /// member whose address changed gets a fresh link; a member that left loses its link
    /// (its queue closes and the link task ends).
    pub fn set_members(&self, members: &[MemberConfig]) {
        let wanted: HashMap<u64, String> = members
            .iter()
            .filter(|member| member.id != self.inner.node_id)
            .map(|member| {
                let address = self
                    .inner
                    .config
                    .connect_overrides
                    .iter()
                    .find(|entry| entry.id == member.id)
                    .map(|entry| entry.address.clone())
                    .unwrap_or_else(|| member.peer.clone());
                (member.id, address)
            })
            .collect();
        let mut links = self.inner.links.write();
        links.retain(|id, link| {
            let keep = wanted.get(id) == Some(&link.address);
            if !keep {
                slog::info!(self.inner.logger, "peer link closed"; "peer" => *id,
                    "address" => &link.address);
            }
            keep
        });
        for (id, address) in wanted {
            if links.contains_key(&id) {
                continue;
            }
            let (sender, receiver) = mpsc::channel(self.inner.config.queue_messages_max);
            let queued_bytes = Arc::new(AtomicU64::new(0));
            links.insert(
                id,
                LinkQueue {
                    address: address.clone(),
                    sender,
                    queued_bytes: queued_bytes.clone(),
                    queue_bytes_max: self.inner.config.queue_bytes_max,
                },
            );
            // The manager outlives every sender while the transport runs; a send failing
            // means the process is shutting down.
            let _ = self.inner.new_links.send(NewLink {
                to: id,
                address,
                receiver,
                queued_bytes,
            });
        }
    }

    /// Whether `id` is a member this node links to (the accept side's admission check).
    pub fn is_peer(&self, id: u64) -> bool {
        self.inner.links.read().contains_key(&id)
    }

    /// Queues `message` for its peer. Returns false if it was dropped (unknown peer, queue
    /// full): Raft resends what matters.
    pub fn send(&self, message: RaftMessage) -> bool {
        let links = self.inner.links.read();
        let Some(link) = links.get(&message.to) else {
            slog::debug!(self.inner.logger, "message to an unknown peer dropped";
                "to" => message.to, "type" => ?message.get_msg_type());
            return false;
        };
        let bytes = message_bytes(&message);
        if link.queued_bytes.load(Ordering::Relaxed) + bytes > link.queue_bytes_max {
            self.note_drop(message.to);
            return false;
        }
        link.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        match link.sender.try_send(message) {
            Ok(()) => true,
            Err(error) => {
                let message = match error {
                    mpsc::error::TrySendError::Full(message)
                    | mpsc::error::TrySendError::Closed(message) => message,
                };
                link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.note_drop(message.to);
                false
            }
        }
    }

    fn note_drop(&self, to: u64) {
        let dropped = self.inner.dropped_messages.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per 1024 drops: a dead peer must not flood the log.
        if dropped % 1024 == 1 {
            slog::warn!(self.inner.logger, "peer queue full, dropping Raft messages";
                "to" => to, "dropped_total" => dropped);
        }
    }

    pub fn dropped_messages(&self) -> u64 {
        self.inner.dropped_messages.load(Ordering::Relaxed)
    }
}

/// What the transport tasks need besides their queues.
#[derive(Clone)]
pub struct PeerContext {
    pub node_id: u64,
    pub group_id: u64,
    pub config: PeerConfig,
    /// The link set: also decides which peers the accept side admits.
    pub network: PeerNetwork,
    pub images_dir: PathBuf,
    pub raft: RaftLink,
    pub storage: StorageLink,
    pub snapshots: SnapshotInbox,
    pub supervision: Supervision,
    /// Mutual TLS on every link (`[tls] peers`); `None`: plain TCP.
    pub tls: Option<PeerTls>,
}

/// Starts the accept loop, and the link manager that starts one link task per peer, on the
/// current arbiter.
pub fn start_peer_transport(listener: TcpListener, links: PeerLinks, context: PeerContext) {
    let accept_context = context.clone();
    actix_rt::spawn(supervised("peer listener", context.supervision.clone(), {
        let listener = Arc::new(listener);
        move || accept_loop(listener.clone(), accept_context.clone())
    }));
    let mut new_links = links.new_links;
    actix_rt::spawn(async move {
        while let Some(link) = new_links.recv().await {
            let NewLink {
                to,
                address,
                receiver,
                queued_bytes,
            } = link;
            let link_context = context.clone();
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            actix_rt::spawn(supervised(
                "peer link",
                context.supervision.clone(),
                move || {
                    run_link(
                        to,
                        address.clone(),
                        receiver.clone(),
                        queued_bytes.clone(),
                        link_context.clone(),
                    )
                },
            ));
        }
    });
}

/// Runs `make()` again whenever it panics, with the supervision policy's backoff, counting each
/// restart; past the restart intensity the process escalates and the task stays down.
async fn supervised<F, Fut>(what: &'static str, supervision: Supervision, make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        match std::panic::AssertUnwindSafe(make()).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                slog::error!(supervision.logger, "peer transport task panicked"; "task" => what);
                match supervision.crashed(panic.as_ref()) {
                    CrashVerdict::Restart { backoff } => tokio::time::sleep(backoff).await,
                    CrashVerdict::Escalate => return,
                }
            }
        }
    }
}

/// Connects to node `to` at `address`, with TLS when the links use it (the handshake within
/// the same timeout, and the other side's certificate must name node `to`).
async fn connect(to: u64, address: &str, context: &PeerContext) -> std::io::Result<MaybeTls> {
    let timeout = Duration::from_millis(context.config.connect_timeout_ms);
    tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        match &context.tls {
            Some(tls) => tls.connect(to, stream).await,
            None => Ok(MaybeTls::Plain(stream)),
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn run_link(
    to: u64,
    address: String,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<RaftMessage>>>,
    queued_bytes: Arc<AtomicU64>,
    context: PeerContext,
) {
    let mut receiver = receiver.lock().await;
    let logger = context.supervision.logger.new(slog::o!("peer" => to));
    let backoff_max = Duration::from_millis(context.config.reconnect_backoff_max_ms);
    let mut backoff = Duration::from_millis(20).min(backoff_max);
    let mut snapshot_in_flight: Option<tokio::task::JoinHandle<()>> = None;
    let mut connected_before = false;
    loop {
        // Connect lazily: only when there is something to say.
        let Some(first) = receiver.recv().await else {
            return;
        };
        queued_bytes.fetch_sub(message_bytes(&first), Ordering::Relaxed);
        let stream = match connect(to, &address, &context).await {
            Ok(stream) => stream,
            Err(error) => {
                if connected_before {
                    slog::warn!(logger, "peer unreachable"; "address" => &address, "error" => %error);
                    connected_before = false;
                }
                context
                    .raft
                    .unreachable
                    .do_send(ReportUnreachable { peer_id: to });
                // What was queued meanwhile is stale; Raft resends after probing.
                while let Ok(message) = receiver.try_recv() {
                    queued_bytes.fetch_sub(message_bytes(&message), Ordering::Relaxed);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        backoff = Duration::from_millis(20).min(backoff_max);
        if !connected_before {
            slog::info!(logger, "peer connected"; "address" => &address);
            connected_before = true;
        }
        let result = write_messages(
            stream,
            first,
            &mut receiver,
            &queued_bytes,
            &context,
            to,
            &address,
            &mut snapshot_in_flight,
        )
        .await;
        if let Err(error) = result {
            slog::warn!(logger, "peer connection lost"; "address" => &address, "error" => %error);
            connected_before = false;
            context
                .raft
                .unreachable
                .do_send(ReportUnreachable { peer_id: to });
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_messages<S: AsyncWrite + Unpin>(
    mut stream: S,
    first: RaftMessage,
    receiver: &mut mpsc::Receiver<RaftMessage>,
    queued_bytes: &AtomicU64,
    context: &PeerContext,
    to: u64,
    address: &str,
    snapshot_in_flight: &mut Option<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    encode_hello(
        &Hello {
            kind: StreamKind::Messages,
            from: context.node_id,
            to,
        },
        &mut buffer,
    );
    let mut next = Some(first);
    // Batch what is already queued into one write, up to this many bytes.
    const BATCH_BYTES_MAX: usize = 4 << 20;
    loop {
        while let Some(message) = next.take() {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                let busy = snapshot_in_flight
                    .as_ref()
                    .map(|task| !task.is_finished())
                    .unwrap_or(false);
                if busy {
                    // One transfer per peer at a time; Raft asks again after this one ends.
                    context.raft.snapshot_ended.do_send(ReportSnapshot {
                        peer_id: to,
                        finished: false,
                    });
                } else {
                    *snapshot_in_flight = Some(tokio::task::spawn_local(send_snapshot_task(
                        to,
                        address.to_string(),
                        message,
                        context.clone(),
                    )));
                }
            } else {
                encode_raft_message(context.group_id, &message, &mut buffer);
            }
            if buffer.len() >= BATCH_BYTES_MAX {
                break;
            }
            if let Ok(message) = receiver.try_recv() {
                queued_bytes.fetch_sub(message_bytes(&message), Ordering::Relaxed);
                next = Some(message);
            }
        }
        if !buffer.is_empty() {
            // A batch lost here is resent by Raft; the supervisor restarts the link task.
            fail::fail_point!("peer_link_send", |_| panic!("failpoint peer_link_send"));
            stream.write_all(&buffer).await?;
            // Through TLS a write may leave its last records in the session's buffer until
            // the next write; the batch must leave now, as nothing may follow for a while.
            stream.flush().await?;
            buffer.clear();
        }
        match receiver.recv().await {
            Some(message) => {
                queued_bytes.fetch_sub(message_bytes(&message), Ordering::Relaxed);
                next = Some(message);
            }
            None => return Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SnapshotTransferError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage: {0}")]
    Storage(#[from] StorageRequestError),
    #[error("the storage actor is unreachable: {0}")]
    StorageUnreachable(#[from] actix::MailboxError),
    #[error("reading the snapshot: {0}")]
    Read(#[from] crate::storage::StorageError),
    #[error("the snapshot read task failed: {0}")]
    ReadTask(#[from] tokio::task::JoinError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the transfer took longer than {0:?}")]
    TimedOut(Duration),
}

async fn send_snapshot_task(to: u64, address: String, message: RaftMessage, context: PeerContext) {
    let logger = context.supervision.logger.new(slog::o!("peer" => to));
    let index = message.get_snapshot().get_metadata().index;
    slog::info!(logger, "sending snapshot"; "index" => index);
    let timeout = Duration::from_millis(context.config.snapshot_timeout_ms);
    let started = std::time::Instant::now();
    let result =
        match tokio::time::timeout(timeout, send_snapshot(&address, message, &context)).await {
            Ok(result) => result,
            Err(_) => Err(SnapshotTransferError::TimedOut(timeout)),
        };
    match &result {
        Ok(bytes) => slog::info!(logger, "snapshot sent"; "index" => index, "bytes" => bytes,
            "elapsed_ms" => started.elapsed().as_millis() as u64),
        Err(error) => slog::warn!(logger, "snapshot transfer failed"; "index" => index,
            "error" => %error),
    }
    context.raft.snapshot_ended.do_send(ReportSnapshot {
        peer_id: to,
        finished: result.is_ok(),
    });
}

async fn send_snapshot(
    address: &str,
    message: RaftMessage,
    context: &PeerContext,
) -> Result<u64, SnapshotTransferError> {
    let to = message.to;
    let mut source = context
        .storage
        .open_snapshot
        .send(OpenSnapshotSource)
        .await??;
    let mut stream = connect(to, address, context).await?;
    let mut buffer = BytesMut::new();
    encode_hello(
        &Hello {
            kind: StreamKind::Snapshot,
            from: context.node_id,
            to,
        },
        &mut buffer,
    );
    encode_raft_message(context.group_id, &message, &mut buffer);
    stream.write_all(&buffer).await?;
    let chunk_bytes = context.config.snapshot_chunk_bytes as usize;
    let mut sent_bytes = 0u64;
    loop {
        // Reading the images blocks; keep it off the async thread.
        let (chunk, returned) = tokio::task::spawn_blocking(move || {
            let chunk = source.next_chunk(chunk_bytes);
            (chunk, source)
        })
        .await?;
        source = returned;
        let chunk = chunk?;
        buffer.clear();
        match chunk {
            Some(chunk) => {
                sent_bytes += chunk.len() as u64;
                encode_frame(
                    FrameKind::SnapshotChunk,
                    context.group_id,
                    &chunk,
                    &mut buffer,
                );
                stream.write_all(&buffer).await?;
            }
            None => break,
        }
    }
    buffer.clear();
    encode_frame(FrameKind::SnapshotEnd, context.group_id, &[], &mut buffer);
    stream.write_all(&buffer).await?;
    // Everything must be out (TLS buffers included) before waiting for the acknowledgement.
    stream.flush().await?;
    // The receiver answers once the data is staged and fsync'd.
    let mut input = BytesMut::with_capacity(64);
    loop {
        if let Some(frame) = decode_frame(&mut input, 1024)
            .map_err(|error| SnapshotTransferError::Protocol(error.to_string()))?
        {
            return match (frame.kind, frame.body.first()) {
                (FrameKind::SnapshotAck, Some(1)) => Ok(sent_bytes),
                _ => Err(SnapshotTransferError::Protocol(
                    "the receiver refused the snapshot".into(),
                )),
            };
        }
        if stream.read_buf(&mut input).await? == 0 {
            return Err(SnapshotTransferError::Protocol(
                "the receiver closed before acknowledging".into(),
            ));
        }
    }
}

async fn accept_loop(listener: Arc<TcpListener>, context: PeerContext) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let context = context.clone();
                actix_rt::spawn(async move {
                    match serve_connection(stream, context.clone()).await {
                        Ok(()) => {}
                        // Bytes that are not the peer protocol: worth an operator's look.
                        Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                            slog::warn!(context.supervision.logger,
                                "peer connection refused: invalid data";
                                "remote" => %remote, "error" => %error);
                        }
                        Err(error) => {
                            slog::debug!(context.supervision.logger, "peer connection closed";
                                "remote" => %remote, "error" => %error);
                        }
                    }
                });
            }
            Err(error) => {
                slog::warn!(context.supervision.logger, "accepting a peer connection failed";
                    "error" => %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
    frame_bytes_max: u32,
) -> std::io::Result<Option<crate::peer::Frame>> {
    loop {
        match decode_frame(input, frame_bytes_max) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(error) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, error)),
        }
        // Room for the rest of a frame whose header has arrived (its length is within
        // `frame_bytes_max`, checked above), at least 64 KiB: growing the buffer in steps
        // would copy a large frame's received part at every step.
        let frame_total = crate::peer::frame_total_bytes(input).unwrap_or(0);
        let wanted = frame_total.saturating_sub(input.len()).max(64 * 1024);
        if input.capacity() - input.len() < wanted {
            input.reserve(wanted.max(256 * 1024));
        }
        if stream.read_buf(input).await? == 0 {
            return Ok(None);
        }
    }
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

async fn serve_connection(stream: TcpStream, context: PeerContext) -> std::io::Result<()> {
    let mut stream = match &context.tls {
        Some(tls) => tokio::time::timeout(Duration::from_secs(10), tls.accept(stream))
            .await
            .map_err(|_| invalid("no TLS handshake within 10 s"))?
            .map_err(|error| invalid(format!("TLS handshake failed: {error}")))?,
        None => MaybeTls::Plain(stream),
    };
    let mut input = BytesMut::with_capacity(256 * 1024);
    let hello = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match decode_hello(&input) {
                Ok(Some(hello)) => return Ok(hello),
                Ok(None) => {}
                Err(error) => return Err(invalid(error.to_string())),
            }
            if stream.read_buf(&mut input).await? == 0 {
                return Err(invalid("closed during the hello"));
            }
        }
    })
    .await
    .map_err(|_| invalid("no hello within 10 s"))??;
    let _ = input.split_to(HELLO_BYTES);
    if hello.to != context.node_id || !context.network.is_peer(hello.from) {
        return Err(invalid(format!(
            "hello from {} to {} does not address this node ({}) from a member",
            hello.from, hello.to, context.node_id
        )));
    }
    // With TLS, the node the hello names must be the node the certificate is for.
    if let Some(certificates) = stream.peer_certificates() {
        let certified = certificates.first().and_then(crate::tls::certified_node);
        if certified != Some(hello.from) {
            let names = certificates
                .first()
                .map(crate::tls::certificate_names)
                .unwrap_or_default();
            return Err(invalid(format!(
                "hello from node {} with a certificate naming {names:?} (node {certified:?})",
                hello.from
            )));
        }
    } else if context.tls.is_some() {
        return Err(invalid("no client certificate on a TLS peer link"));
    }
    let frame_bytes_max = context.config.frame_bytes_max;
    match hello.kind {
        StreamKind::Messages => loop {
            let Some(frame) = read_frame(&mut stream, &mut input, frame_bytes_max).await? else {
                return Ok(());
            };
            if frame.kind != FrameKind::RaftMessage || frame.group_id != context.group_id {
                return Err(invalid("unexpected frame on a message stream"));
            }
            let message = decode_raft_message(&frame.body).map_err(invalid)?;
            if message.to != context.node_id {
                return Err(invalid("message addressed to another node"));
            }
            if message.from != hello.from {
                return Err(invalid(format!(
                    "a message from node {} on node {}'s stream",
                    message.from, hello.from
                )));
            }
            // A snapshot travels on a snapshot stream, which stages its data before Raft sees
            // it; stepped without staged data it would crash the Raft actor.
            if message.get_msg_type() == MessageType::MsgSnapshot {
                return Err(invalid("a snapshot on a message stream"));
            }
            // A full mailbox drops the message; Raft repairs that like a lost packet.
            let _ = context.raft.step.try_send(StepPeerMessage(message));
        },
        StreamKind::Snapshot => receive_snapshot(stream, input, hello.from, context).await,
    }
}

async fn receive_snapshot(
    mut stream: MaybeTls,
    mut input: BytesMut,
    from: u64,
    context: PeerContext,
) -> std::io::Result<()> {
    let frame_bytes_max = context.config.frame_bytes_max;
    let Some(first) = read_frame(&mut stream, &mut input, frame_bytes_max).await? else {
        return Ok(());
    };
    let message = decode_raft_message(&first.body).map_err(invalid)?;
    if first.kind != FrameKind::RaftMessage
        || message.get_msg_type() != MessageType::MsgSnapshot
        || message.from != from
    {
        return Err(invalid("a snapshot stream must start with MsgSnapshot"));
    }
    let metadata = message.get_snapshot().get_metadata().clone();
    let logger = context.supervision.logger.new(slog::o!("peer" => from));
    slog::info!(logger, "receiving snapshot"; "index" => metadata.index, "term" => metadata.term);
    let images_dir = context.images_dir.clone();
    let group_id = context.group_id;
    let index = metadata.index;
    let mut staging =
        tokio::task::spawn_blocking(move || SnapshotStaging::begin(&images_dir, group_id, index))
            .await
            .map_err(|error| invalid(error.to_string()))?
            .map_err(|error| invalid(error.to_string()))?;
    let outcome: std::io::Result<StagedSnapshot> = async {
        loop {
            let Some(frame) = read_frame(&mut stream, &mut input, frame_bytes_max).await? else {
                return Err(invalid("the sender closed mid-snapshot"));
            };
            match frame.kind {
                FrameKind::SnapshotChunk => {
                    let (result, returned) = tokio::task::spawn_blocking(move || {
                        let result = staging.stage(&frame.body);
                        (result, staging)
                    })
                    .await
                    .map_err(|error| invalid(error.to_string()))?;
                    staging = returned;
                    result.map_err(|error| invalid(error.to_string()))?;
                }
                FrameKind::SnapshotEnd => {
                    return tokio::task::spawn_blocking(move || staging.finish())
                        .await
                        .map_err(|error| invalid(error.to_string()))?
                        .map_err(|error| invalid(error.to_string()));
                }
                _ => return Err(invalid("unexpected frame in a snapshot stream")),
            }
        }
    }
    .await;
    let mut reply = BytesMut::new();
    match outcome {
        Ok(staged) => {
            context.snapshots.put(metadata.index, metadata.term, staged);
            context.raft.step.do_send(StepPeerMessage(message));
            encode_frame(FrameKind::SnapshotAck, context.group_id, &[1], &mut reply);
            slog::info!(logger, "snapshot staged"; "index" => metadata.index);
            stream.write_all(&reply).await?;
            stream.flush().await?;
            Ok(())
        }
        Err(error) => {
            encode_frame(FrameKind::SnapshotAck, context.group_id, &[0], &mut reply);
            let _ = stream.write_all(&reply).await;
            let _ = stream.flush().await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::BytesMut;
    use tokio::io::{AsyncRead, ReadBuf};

    use super::read_frame;
    use crate::peer::{encode_frame, FrameKind};

    /// Serves `data` in pieces of at most `piece` bytes and records, for each read, the
    /// buffer room it was offered and the bytes of `data` still to come.
    struct PieceReader {
        data: Vec<u8>,
        position: usize,
        piece: usize,
        offers: Vec<(usize, usize)>,
    }

    impl PieceReader {
        fn new(data: &[u8], piece: usize) -> Self {
            PieceReader {
                data: data.to_vec(),
                position: 0,
                piece,
                offers: Vec::new(),
            }
        }
    }

    impl AsyncRead for PieceReader {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let remaining = self.data.len() - self.position;
            self.offers.push((buf.remaining(), remaining));
            let length = remaining.min(self.piece).min(buf.remaining());
            let start = self.position;
            buf.put_slice(&self.data[start..start + length]);
            self.position += length;
            Poll::Ready(Ok(()))
        }
    }

    #[actix_rt::test]
    async fn a_large_frame_is_read_into_room_made_once_its_header_arrived() {
        let large: Vec<u8> = (0..3 << 20).map(|index| (index % 251) as u8).collect();
        let mut wire = BytesMut::new();
        encode_frame(FrameKind::RaftMessage, 7, &large, &mut wire);
        encode_frame(FrameKind::SnapshotAck, 7, b"ack", &mut wire);
        let large_frame_bytes = wire.len() - (4 + 1 + 8 + 3);
        let mut reader = PieceReader::new(&wire, 100 * 1024);
        let mut input = BytesMut::new();

        let frame = read_frame(&mut reader, &mut input, 8 << 20)
            .await
            .expect("read")
            .expect("a frame");
        assert_eq!(frame.kind, FrameKind::RaftMessage);
        assert_eq!(frame.group_id, 7);
        assert_eq!(&frame.body[..], &large[..]);
        // Every read after the first (which brought the header) had room for the whole rest
        // of the frame: the received part was never copied into a grown buffer.
        let offers_for_the_large_frame = large_frame_bytes.div_ceil(100 * 1024);
        for (read, &(room, remaining)) in reader.offers[1..offers_for_the_large_frame]
            .iter()
            .enumerate()
        {
            let rest_of_frame = remaining - (wire.len() - large_frame_bytes);
            assert!(
                room >= rest_of_frame,
                "read {} was offered {room} bytes for the {rest_of_frame} left of the frame",
                read + 1
            );
        }

        let frame = read_frame(&mut reader, &mut input, 8 << 20)
            .await
            .expect("read")
            .expect("the second frame");
        assert_eq!(frame.kind, FrameKind::SnapshotAck);
        assert_eq!(&frame.body[..], b"ack");
        assert!(read_frame(&mut reader, &mut input, 8 << 20)
            .await
            .expect("clean end")
            .is_none());
    }

    #[actix_rt::test]
    async fn a_frame_over_the_limit_fails_before_its_body_is_buffered() {
        let mut wire = BytesMut::new();
        encode_frame(FrameKind::RaftMessage, 1, &vec![0u8; 2 << 20], &mut wire);
        let mut reader = PieceReader::new(&wire, 64 * 1024);
        let mut input = BytesMut::new();
        let error = read_frame(&mut reader, &mut input, 1 << 20)
            .await
            .expect_err("over the limit");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(reader.offers.len(), 1, "only the first piece was read");
        assert!(input.capacity() < 1 << 20, "capacity {}", input.capacity());
    }
}
