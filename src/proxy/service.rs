//! The proxy as an [`NbdService`]: the exports are the cluster's volumes (from the servers'
//! status); preparing an export attaches the volume for this client (once, on the first local
//! session) and starts its upstream task; each session's backend is [`ProxyBackend`], which
//! forwards requests upstream and keeps the read cache coherent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::cache::{
    next_write_id, CacheAbandon, CacheActor, CacheFill, CacheForgetVolume, CacheLookup,
    CacheWriteFinished, CacheWriteStarted, Lookup,
};
use super::discovery::{AttachError, ClusterView, VolumeSummary};
use super::upstream::{
    attach, spawn_upstream, UpstreamHandle, UpstreamParams, UpstreamRequest, UpstreamResult,
};
use crate::actors::listener::{NbdService, EXPORT_TRANSMISSION_FLAGS};
use crate::actors::session::{BackendReply, BackendRequest, SessionBackend};
use crate::nbd::client::ReplyAnswer;
use crate::nbd::handshake::{ExportCatalog, ExportDescription};
use crate::nbd::transmission::{Command, Errno};
use crate::nbd::Negotiated;

/// A volume this proxy has attached and serves.
#[derive(Clone)]
pub struct AttachedVolume {
    pub summary: VolumeSummary,
    /// The cache's name for this volume.
    pub cache_key: u64,
    /// 0 if the cluster has no writer fencing.
    pub epoch: u64,
    pub upstream: UpstreamHandle,
    /// Set once the upstream answered EPERM (another writer took the volume): from then on
    /// nothing of it is served from the cache.
    pub lost: Arc<std::sync::atomic::AtomicBool>,
}

pub struct ProxyShared {
    pub view: ClusterView,
    pub client_id: String,
    pub force_attach: bool,
    pub request_max_bytes: u32,
    pub reply_timeout: Duration,
    pub upstream_queue_max: usize,
    pub cache: Option<Addr<CacheActor>>,
    pub volumes: Mutex<HashMap<String, AttachedVolume>>,
    /// One attach at a time: two racing attaches by this client would fence each other.
    pub attach_lock: tokio::sync::Mutex<()>,
    pub next_cache_key: AtomicU64,
    pub logger: slog::Logger,
    /// NBD over TLS to the servers; `None`: plaintext.
    pub upstream_tls: Option<tokio_rustls::TlsConnector>,
}

#[derive(Clone)]
pub struct ProxyService {
    pub shared: Arc<ProxyShared>,
}

/// One connection's view of the exports; remembers refusals to report them in the handshake.
pub struct ProxyCatalog {
    shared: Arc<ProxyShared>,
    /// Shared with the `prepare_export` futures of this connection.
    refusals: Arc<Mutex<HashMap<String, String>>>,
}

fn description(summary: &VolumeSummary, request_max_bytes: u32) -> ExportDescription {
    ExportDescription {
        name: summary.name.clone(),
        description: format!("raftblk volume {} through the proxy", summary.name),
        size_bytes: summary.size_bytes,
        // The same promises as a server: the proxy acknowledges a write only after the cluster
        // did (durable on a majority), so FLUSH/FUA need no work and CAN_MULTI_CONN holds.
        transmission_flags: EXPORT_TRANSMISSION_FLAGS,
        block_size_min_bytes: 512,
        block_size_preferred_bytes: summary.block_size_bytes.max(512),
        block_size_max_bytes: request_max_bytes,
    }
}

impl ExportCatalog for ProxyCatalog {
    fn export_names(&self) -> Vec<String> {
        let (snapshot, _) = self.shared.view.snapshot();
        snapshot
            .volumes
            .into_iter()
            .map(|volume| volume.name)
            .collect()
    }

    fn export(&self, name: &str) -> Option<ExportDescription> {
        let mut summary = {
            let volumes = self.shared.volumes.lock();
            // Only attached volumes are exports; a listed volume is attached by the first
            // option that names it (see `prepare_export`).
            volumes.get(name)?.summary.clone()
        };
        // A volume grown online since it was attached: new connections get the new size
        // (the servers accept the new range on the existing upstream connection too).
        let (snapshot, _) = self.shared.view.snapshot();
        if let Some(current) = snapshot.volumes.iter().find(|volume| {
            volume.name == summary.name && volume.block_size_bytes == summary.block_size_bytes
        }) {
            summary.size_bytes = summary.size_bytes.max(current.size_bytes);
        }
        Some(description(&summary, self.shared.request_max_bytes))
    }

    fn export_refusal(&self, name: &str) -> Option<String> {
        self.refusals.lock().get(name).cloned()
    }
}

impl NbdService for ProxyService {
    type Catalog = ProxyCatalog;
    type Backend = ProxyBackend;

    fn catalog(&self) -> ProxyCatalog {
        ProxyCatalog {
            shared: self.shared.clone(),
            refusals: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn prepare_export(
        &self,
        catalog: &ProxyCatalog,
        export_name: &str,
    ) -> impl Future<Output = ()> + 'static {
        let shared = self.shared.clone();
        let refusals = catalog.refusals.clone();
        let name = export_name.to_string();
        async move {
            match prepare(&shared, &name).await {
                Ok(()) => {
                    refusals.lock().remove(&name);
                }
                Err(message) => {
                    slog::warn!(shared.logger, "export refused"; "export" => &name,
                        "reason" => &message);
                    refusals.lock().insert(name, message);
                }
            }
        }
    }

    fn backend(
        &self,
        _catalog: &ProxyCatalog,
        negotiated: &Negotiated,
        _logger: &slog::Logger,
    ) -> Option<ProxyBackend> {
        let volumes = self.shared.volumes.lock();
        let volume = volumes.get(&negotiated.export.name)?;
        Some(ProxyBackend {
            volume: volume.clone(),
            cache: self.shared.cache.clone(),
            view: self.shared.view.clone(),
            client_id: self.shared.client_id.clone(),
        })
    }
}

/// Attaches `name` (once per proxy) and starts its upstream. `Err` carries the message for the
/// local client.
async fn prepare(shared: &Arc<ProxyShared>, name: &str) -> Result<(), String> {
    let _attaching = shared.attach_lock.lock().await;
    if shared.volumes.lock().contains_key(name) {
        return Ok(());
    }
    let find = |shared: &ProxyShared| {
        let (snapshot, _) = shared.view.snapshot();
        snapshot
            .volumes
            .into_iter()
            .find(|volume| volume.name == name)
    };
    let summary = match find(shared) {
        Some(summary) => summary,
        None => {
            shared.view.refresh(shared.view.control_timeout()).await;
            let (snapshot, _) = shared.view.snapshot();
            if snapshot.servers_reachable == 0 {
                return Err("no raftblk server is reachable; cannot attach the volume".to_string());
            }
            find(shared).ok_or_else(|| format!("the cluster has no volume named {name:?}"))?
        }
    };
    let epoch = match attach(&shared.view, name, &shared.client_id, shared.force_attach).await {
        Ok(epoch) => epoch,
        // A cluster without writer fencing: the anonymous export is the only one.
        Err(AttachError::Unsupported) => {
            slog::warn!(shared.logger, "the cluster does not support attaching; writes are not fenced";
                "volume" => name);
            0
        }
        Err(AttachError::Refused(message)) => {
            return Err(format!("cannot attach volume {name} read-write: {message}"))
        }
        Err(error) => return Err(format!("cannot attach volume {name}: {error}")),
    };
    slog::info!(shared.logger, "volume attached"; "volume" => name, "epoch" => epoch,
        "client" => &shared.client_id);
    let upstream = spawn_upstream(UpstreamParams {
        volume_name: name.to_string(),
        client_id: shared.client_id.clone(),
        epoch,
        view: shared.view.clone(),
        reply_timeout: shared.reply_timeout,
        queue_max: shared.upstream_queue_max,
        logger: shared.logger.clone(),
        tls: shared.upstream_tls.clone(),
    });
    let cache_key = shared.next_cache_key.fetch_add(1, Ordering::Relaxed);
    shared.volumes.lock().insert(
        name.to_string(),
        AttachedVolume {
            summary,
            cache_key,
            epoch,
            upstream,
            lost: Arc::default(),
        },
    );
    Ok(())
}

/// A local session's backend: forwards to the volume's upstream, through the cache.
#[derive(Clone)]
pub struct ProxyBackend {
    volume: AttachedVolume,
    cache: Option<Addr<CacheActor>>,
    view: ClusterView,
    client_id: String,
}

async fn forward(upstream: &UpstreamHandle, request: BackendRequest) -> UpstreamResult {
    let (responder, response) = oneshot::channel();
    let request = UpstreamRequest {
        header: request.header,
        payload: request.payload,
        deadline: request.deadline,
        responder,
    };
    // The queue is bounded: a full one makes the session wait (and stop reading its socket).
    if upstream.sender.send(request).await.is_err() {
        return Err(Errno::Io);
    }
    response.await.unwrap_or(Err(Errno::Io))
}

fn error_reply(errno: Errno) -> BackendReply {
    BackendReply::Error {
        errno,
        message: match errno {
            Errno::Perm => "volume attached by another client (fenced)",
            Errno::Io => "the cluster did not answer before the request deadline",
            _ => "the cluster refused the request",
        },
    }
}

impl ProxyBackend {
    /// Whether the volume is lost to another writer: the upstream said so (EPERM), or the
    /// leader's status, polled every `status_poll_interval_ms`, names another client as its
    /// holder. Checked before every cache lookup, so that a proxy that only reads stops
    /// serving its cache within a poll of a takeover.
    async fn volume_lost(&self) -> bool {
        if self.volume.lost.load(Ordering::SeqCst) {
            return true;
        }
        let taken_over = self
            .view
            .held_by_other(&self.volume.summary.name, &self.client_id);
        if taken_over {
            self.forget(Errno::Perm).await;
        }
        taken_over
    }

    /// Marks the volume lost and makes the cache forget it (once).
    async fn forget(&self, errno: Errno) {
        if errno == Errno::Perm && !self.volume.lost.swap(true, Ordering::SeqCst) {
            if let Some(cache) = &self.cache {
                let _ = cache
                    .send(CacheForgetVolume {
                        volume: self.volume.cache_key,
                    })
                    .await;
            }
        }
    }

    /// The reply to a request the upstream failed. EPERM means the volume was lost to another
    /// writer: what the cache holds of it may have been overwritten since.
    async fn failed(&self, errno: Errno) -> BackendReply {
        self.forget(errno).await;
        error_reply(errno)
    }
}

impl SessionBackend for ProxyBackend {
    fn execute(&self, request: BackendRequest) -> impl Future<Output = BackendReply> + 'static {
        let backend = self.clone();
        async move {
            let header = request.header;
            let cache_key = backend.volume.cache_key;
            match header.command {
                Command::Read => {
                    let mut request = request;
                    let mut ticket = None;
                    let lost = backend.volume_lost().await;
                    if let Some(cache) = backend.cache.as_ref().filter(|_| !lost) {
                        // A cache that is down (restarting) is bypassed.
                        match cache
                            .send(CacheLookup {
                                volume: cache_key,
                                offset: header.offset,
                                length: u64::from(header.length),
                                volume_size_bytes: backend.volume.summary.size_bytes,
                            })
                            .await
                        {
                            Ok(Lookup::Hit(data)) if data.len() == header.length as usize => {
                                return BackendReply::Data(data)
                            }
                            Ok(Lookup::Miss {
                                ticket: issued,
                                length,
                            }) => {
                                ticket = Some(issued);
                                // Reading ahead: at most the cache's largest range (1 MiB).
                                if let Ok(length) = u32::try_from(length) {
                                    request.header.length = request.header.length.max(length);
                                }
                            }
                            _ => {}
                        }
                    }
                    let result = forward(&backend.volume.upstream, request).await;
                    match (result, &backend.cache, ticket) {
                        (Ok(ReplyAnswer::Data(data)), cache, ticket) => {
                            if let (Some(cache), Some(ticket)) = (cache, ticket) {
                                cache.do_send(CacheFill {
                                    ticket,
                                    data: data.clone(),
                                });
                            }
                            // The client gets what it asked for, of what was read ahead too.
                            let requested = (header.length as usize).min(data.len());
                            BackendReply::Data(data.slice(..requested))
                        }
                        (result, cache, ticket) => {
                            if let (Some(cache), Some(ticket)) = (cache, ticket) {
                                cache.do_send(CacheAbandon { ticket });
                            }
                            match result {
                                Err(errno) => backend.failed(errno).await,
                                _ => error_reply(Errno::Io),
                            }
                        }
                    }
                }
                Command::Write | Command::Trim | Command::WriteZeroes => {
                    let written =
                        (header.command == Command::Write).then(|| request.payload.clone());
                    let write = next_write_id();
                    if let Some(cache) = &backend.cache {
                        cache.do_send(CacheWriteStarted {
                            write,
                            volume: cache_key,
                            offset: header.offset,
                            length: u64::from(header.length),
                        });
                    }
                    let result = forward(&backend.volume.upstream, request).await;
                    if let Some(cache) = &backend.cache {
                        // Before the client hears of the outcome, so no later read can be
                        // served the data the write replaced: an acknowledged write refreshes
                        // the blocks it covers (unless another write to them was in flight),
                        // a failed one (it may still land: an EIO at the deadline leaves it
                        // to the servers) drops them. An error means the cache is restarting,
                        // and a restarted cache is empty.
                        let _ = cache
                            .send(CacheWriteFinished {
                                write,
                                volume: cache_key,
                                offset: header.offset,
                                length: u64::from(header.length),
                                data: written.filter(|_| result.is_ok()),
                            })
                            .await;
                    }
                    match result {
                        Ok(_) => BackendReply::Done,
                        Err(errno) => backend.failed(errno).await,
                    }
                }
                // The servers' own map: a sparse-aware client (qemu-img convert, nbdcopy) then
                // skips the holes. The cluster answers after a read barrier, so the map
                // includes every write acknowledged before the request.
                Command::BlockStatus => match forward(&backend.volume.upstream, request).await {
                    Ok(ReplyAnswer::Extents(extents)) => BackendReply::Extents(extents),
                    Ok(_) => error_reply(Errno::Io),
                    Err(errno) => backend.failed(errno).await,
                },
                _ => error_reply(Errno::Inval),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::actors::supervisor::{ActorKind, RestartCounters, SupervisedActor, Supervision};
    use crate::nbd::transmission::RequestHeader;

    const BLOCK: u32 = 4096;
    const VOLUME_BYTES: u64 = 16 * BLOCK as u64;

    fn backend(sender: mpsc::Sender<UpstreamRequest>) -> ProxyBackend {
        let supervision = Supervision {
            kind: ActorKind::Cache,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            counters: RestartCounters::new(),
        };
        let cache = SupervisedActor::start(supervision.clone(), move |_| {
            CacheActor::new(1 << 20, BLOCK, supervision)
        });
        ProxyBackend {
            volume: AttachedVolume {
                summary: VolumeSummary {
                    name: "alpha".into(),
                    size_bytes: VOLUME_BYTES,
                    block_size_bytes: BLOCK,
                    attachment: None,
                },
                cache_key: 1,
                epoch: 1,
                upstream: UpstreamHandle { sender },
                lost: Arc::default(),
            },
            cache: Some(cache),
            view: ClusterView::new(Vec::new(), Duration::from_secs(1), String::new()),
            client_id: "proxy-test".into(),
        }
    }

    fn request(command: Command, cookie: u64, payload: Bytes) -> BackendRequest {
        BackendRequest {
            header: RequestHeader {
                flags: 0,
                command,
                cookie,
                offset: 0,
                length: BLOCK,
            },
            payload,
            deadline: Instant::now() + Duration::from_secs(10),
        }
    }

    fn filled(byte: u8) -> Bytes {
        Bytes::from(vec![byte; BLOCK as usize])
    }

    /// The byte a block read returned, if the reply is a block of one repeated byte.
    fn block_byte(reply: &BackendReply) -> Option<u8> {
        match reply {
            BackendReply::Data(data)
                if data.len() == BLOCK as usize && data.iter().all(|byte| *byte == data[0]) =>
            {
                Some(data[0])
            }
            _ => None,
        }
    }

    /// Reads block 0 through `backend`; a read that reaches the (fake) servers is answered
    /// with `server_block`.
    async fn read_block(
        backend: &ProxyBackend,
        upstream: &mut mpsc::Receiver<UpstreamRequest>,
        server_block: &Bytes,
    ) -> BackendReply {
        let mut reply = actix_rt::spawn(backend.execute(request(Command::Read, 9, Bytes::new())));
        tokio::select! {
            answered = &mut reply => return answered.expect("read task"),
            Some(read) = upstream.recv() => {
                assert_eq!(read.header.command, Command::Read);
                let mut data = server_block.to_vec();
                data.resize(read.header.length as usize, 0);
                let _ = read.responder.send(Ok(ReplyAnswer::Data(Bytes::from(data))));
            }
        }
        reply.await.expect("read task")
    }

    /// Two local connections write the same block at once. The servers apply the writes in
    /// the order they arrive and, as NBD allows, answer them in the other order; the cache
    /// must end up agreeing with the servers whatever order the acknowledgements come in.
    #[actix_rt::test]
    async fn overlapping_writes_answered_out_of_order_leave_the_cache_agreeing_with_the_servers() {
        let (sender, mut upstream) = mpsc::channel(16);
        let backend = backend(sender);
        let mut server_block = filled(0);
        // The block is cached.
        let first = read_block(&backend, &mut upstream, &server_block).await;
        assert_eq!(block_byte(&first), Some(0));
        let mut writes = Vec::new();
        for (cookie, byte) in [(1, 0xaa), (2, 0xbb)] {
            let write =
                actix_rt::spawn(backend.execute(request(Command::Write, cookie, filled(byte))));
            let arrived = upstream.recv().await.expect("the write goes upstream");
            // Applied on arrival: the last to arrive is what the servers hold.
            server_block = arrived.payload.clone();
            writes.push((write, arrived.responder));
        }
        assert_eq!(server_block, filled(0xbb));
        // Answered in the other order, each reply awaited by its connection.
        while let Some((write, responder)) = writes.pop() {
            responder
                .send(Ok(ReplyAnswer::Done))
                .expect("the write waits");
            assert_eq!(write.await.expect("write task"), BackendReply::Done);
        }
        let after = read_block(&backend, &mut upstream, &server_block).await;
        assert_eq!(
            block_byte(&after),
            Some(0xbb),
            "a read after both acknowledgements returns what the servers hold"
        );
    }
}
