//! A fault-injecting TCP relay, in process, for the cluster tests (`tc netem` is absent here).
//!
//! A [`Relay`] listens on a free loopback port and forwards every connection to one target.
//! The test switches its [`RelayMode`] at any time:
//! - `Pass`: bytes flow both ways;
//! - `BlackHole`: nothing is delivered in either direction and connections stay open, as in a
//!   network partition. The relay stops *reading* rather than reading and discarding: TCP
//!   never loses bytes in the middle of a stream, so a partition looks to both ends like a
//!   stalled connection, and after the heal the stream resumes intact (discarding would hand
//!   the receiver a torn frame, a fault no real network produces);
//! - `Close`: every open connection is shut down and new ones are closed right after accept;
//! - `Delay(ms)`: every chunk is delivered `ms` later than it was read (latency, not a
//!   bandwidth limit: reading goes on while earlier chunks wait).
//!
//! Each direction of a connection is a reader thread feeding a writer thread through a channel
//! of timestamped chunks. All threads end when the relay is dropped.
//!
//! Invariant: bytes are delivered in order and never altered; the relay only delays, stalls or
//! closes.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a relay thread blocks before it looks at the mode again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Largest chunk read at once.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks queued between a reader and its writer; the reader waits when it is full, so a
/// delayed relay holds a bounded amount of memory.
const CHUNKS_IN_FLIGHT_MAX: usize = 256;

/// What the relay does with traffic (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    Pass,
    BlackHole,
    Close,
    Delay(Duration),
}

struct RelayShared {
    mode: Mutex<RelayMode>,
    /// Bumped on every switch to `Close`, so connections opened before it end.
    close_generation: AtomicU64,
    stopping: AtomicBool,
    /// Both sockets of every open connection, to shut them down on `Close`:
    /// (connection id, close generation at accept, client side, target side).
    connections: Mutex<Vec<(u64, u64, TcpStream, TcpStream)>>,
    next_connection_id: AtomicU64,
    forwarded_bytes: AtomicU64,
    accepted_connections: AtomicU64,
}

impl RelayShared {
    fn mode(&self) -> RelayMode {
        *self
            .mode
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// One listening relay; see the module documentation. Dropping it closes every connection.
pub struct Relay {
    pub listen_address: SocketAddr,
    pub target_address: SocketAddr,
    shared: Arc<RelayShared>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` forwarding to `target_address`, in `Pass` mode.
    pub fn start(target_address: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a relay on 127.0.0.1:0");
        Self::start_on(listener, target_address)
    }

    /// Starts a relay on an already bound listener.
    pub fn start_on(listener: TcpListener, target_address: SocketAddr) -> Relay {
        let listen_address = listener.local_addr().expect("relay local_addr");
        listener
            .set_nonblocking(true)
            .expect("relay listener non-blocking");
        let shared = Arc::new(RelayShared {
            mode: Mutex::new(RelayMode::Pass),
            close_generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            forwarded_bytes: AtomicU64::new(0),
            accepted_connections: AtomicU64::new(0),
            next_connection_id: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("relay-{listen_address}"))
            .spawn(move || accept_loop(listener, target_address, accept_shared))
            .expect("spawn the relay accept thread");
        Relay {
            listen_address,
            target_address,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn mode(&self) -> RelayMode {
        self.shared.mode()
    }

    /// Switches the mode; `Close` also shuts down every open connection at once.
    pub fn set_mode(&self, mode: RelayMode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = mode;
        if mode == RelayMode::Close {
            let generation = self.shared.close_generation.fetch_add(1, Ordering::SeqCst) + 1;
            let connections = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            for (_, opened_in_generation, client, server) in connections.iter() {
                if *opened_in_generation < generation {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Bytes delivered so far, both directions together.
    pub fn forwarded_bytes(&self) -> u64 {
        self.shared.forwarded_bytes.load(Ordering::SeqCst)
    }

    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted_connections.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, _, client, server) in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
        {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target_address: SocketAddr, shared: Arc<RelayShared>) {
    while !shared.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted_connections.fetch_add(1, Ordering::SeqCst);
                if shared.mode() == RelayMode::Close {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let shared = Arc::clone(&shared);
                let _ = thread::Builder::new()
                    .name("relay-connection".to_owned())
                    .spawn(move || serve_connection(client, target_address, shared));
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => thread::sleep(POLL_INTERVAL),
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

fn serve_connection(client: TcpStream, target_address: SocketAddr, shared: Arc<RelayShared>) {
    let generation = shared.close_generation.load(Ordering::SeqCst);
    let closed_since_accept =
        |shared: &RelayShared| shared.close_generation.load(Ordering::SeqCst) != generation;
    // A connection accepted during a partition is held, not dialled through, until the
    // partition heals: the dialler sees a connect that succeeds and then silence.
    while shared.mode() == RelayMode::BlackHole {
        if shared.stopping() || closed_since_accept(&shared) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    if shared.stopping() || closed_since_accept(&shared) || shared.mode() == RelayMode::Close {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let server = match TcpStream::connect_timeout(&target_address, Duration::from_secs(2)) {
        Ok(server) => server,
        Err(_) => {
            // The target is down (a killed node): the dialler sees the connection close.
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_for_registry), Ok(server_for_registry)) =
        (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let connection_id = shared.next_connection_id.fetch_add(1, Ordering::SeqCst);
    shared
        .connections
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .push((
            connection_id,
            generation,
            client_for_registry,
            server_for_registry,
        ));
    let (Ok(client_reader), Ok(server_reader)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upstream = spawn_direction(client_reader, server, Arc::clone(&shared), generation);
    let downstream = spawn_direction(server_reader, client, Arc::clone(&shared), generation);
    for handles in [upstream, downstream] {
        for handle in handles {
            let _ = handle.join();
        }
    }
    // Dropping the registry's handles closes the sockets for good.
    shared
        .connections
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .retain(|(id, ..)| *id != connection_id);
}

/// One direction of a connection: a reader that honours the mode and a writer that honours
/// each chunk's delivery time. Returns both thread handles.
fn spawn_direction(
    mut source: TcpStream,
    mut destination: TcpStream,
    shared: Arc<RelayShared>,
    generation: u64,
) -> Vec<thread::JoinHandle<()>> {
    let (sender, receiver) = mpsc::sync_channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT_MAX);
    let reader_shared = Arc::clone(&shared);
    let reader = thread::spawn(move || {
        let _ = source.set_read_timeout(Some(POLL_INTERVAL));
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            if reader_shared.stopping()
                || reader_shared.close_generation.load(Ordering::SeqCst) != generation
            {
                break;
            }
            match reader_shared.mode() {
                RelayMode::BlackHole => {
                    thread::sleep(POLL_INTERVAL);
                    continue;
                }
                RelayMode::Close => break,
                RelayMode::Pass | RelayMode::Delay(_) => {}
            }
            match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => {
                    // The mode when the bytes arrived decides their delay (it may have changed
                    // while the read was blocked).
                    let delay = match reader_shared.mode() {
                        RelayMode::Delay(delay) => delay,
                        _ => Duration::ZERO,
                    };
                    if sender
                        .send((Instant::now() + delay, buffer[..count].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = source.shutdown(Shutdown::Read);
    });
    let writer = thread::spawn(move || {
        loop {
            let (deliver_at, chunk) = match receiver.recv_timeout(POLL_INTERVAL) {
                Ok(item) => item,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if shared.stopping()
                        || shared.close_generation.load(Ordering::SeqCst) != generation
                    {
                        break;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // A chunk read before a partition began is held back too: nothing crosses a
            // partition, whenever it was read.
            while shared.mode() == RelayMode::BlackHole
                && !shared.stopping()
                && shared.close_generation.load(Ordering::SeqCst) == generation
            {
                thread::sleep(POLL_INTERVAL);
            }
            let now = Instant::now();
            if deliver_at > now {
                thread::sleep(deliver_at - now);
            }
            if shared.stopping() || shared.close_generation.load(Ordering::SeqCst) != generation {
                break;
            }
            if destination.write_all(&chunk).is_err() {
                break;
            }
            shared
                .forwarded_bytes
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        // The other end learns that this direction is finished (FIN), as it would from the
        // real peer.
        let _ = destination.shutdown(Shutdown::Write);
    });
    vec![reader, writer]
}
