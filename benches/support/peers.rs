//! The NBD servers the benchmarks compare, each started on loopback with a fresh sparse 1 GiB
//! volume: raftblk with one replica, raftblk with three replicas behind `raftblk proxy`,
//! `qemu-nbd` with write-through or write-back caching, and `nbdkit file`.
//!
//! Invariant: every server binds 127.0.0.1 only, on a port picked free (or port 0), and is
//! owned by a guard whose drop kills it, so an error anywhere still stops it.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::cluster::{Cluster, ClusterOptions, ProxyProcess};
use crate::common::{
    pick_free_port, wait_for_listener, BackgroundProcess, ServerProcess, DEFAULT_EXPORT_NAME, GIB,
};

/// Size of every benchmark volume, also the size of the local files of the baseline.
pub const VOLUME_SIZE_BYTES: u64 = GIB;

/// Every server the benchmarks know, by the name the benchmark options use.
pub const PEER_NAMES: &[&str] = &[
    "raftblk",
    "raftblk-3x-proxy",
    "qemu-nbd",
    "qemu-nbd-writeback",
    "nbdkit",
];
/// The raftblk variants, which the reports compare with each of the other servers.
pub const RAFTBLK_PEER_NAMES: &[&str] = &["raftblk", "raftblk-3x-proxy"];

/// A server being measured; dropping it stops the process(es).
pub enum Peer {
    Raftblk(ServerProcess),
    /// Three replicas on loopback and the proxy in front of them.
    Replicated(Box<(ProxyProcess, Cluster)>),
    External(BackgroundProcess, SocketAddr),
}

impl Peer {
    /// `nbd://127.0.0.1:PORT/EXPORT` of the benchmark volume.
    pub fn uri(&self) -> String {
        match self {
            Peer::Raftblk(server) => server.uri(DEFAULT_EXPORT_NAME),
            Peer::Replicated(parts) => parts.0.uri(DEFAULT_EXPORT_NAME),
            Peer::External(_, address) => format!("nbd://{address}/vol"),
        }
    }

    /// Stops the server(s) cleanly, warning (not failing) if raftblk does not exit 0.
    pub fn stop(self) {
        match self {
            Peer::Raftblk(mut server) => {
                let status = server.terminate();
                if !status.success() {
                    eprintln!("warning: raftblk exited with {status} on SIGTERM");
                }
            }
            Peer::Replicated(parts) => {
                let (mut proxy, cluster) = *parts;
                proxy.stop();
                drop(cluster);
            }
            Peer::External(mut process, _) => {
                process.stop(Duration::from_secs(10));
            }
        }
    }
}

/// A sparse file of [`VOLUME_SIZE_BYTES`] at `directory/name`.
pub fn sparse_image(directory: &Path, name: &str) -> PathBuf {
    let path = directory.join(name);
    let file = fs::File::create(&path).expect("create image");
    file.set_len(VOLUME_SIZE_BYTES)
        .expect("truncate image to the volume size");
    path
}

/// Starts the server called `name` (one of [`PEER_NAMES`]); its images and logs go to
/// `directory`. Panics if it does not come up.
pub fn start_peer(name: &str, directory: &Path) -> Peer {
    match name {
        "raftblk" => Peer::Raftblk(ServerProcess::start()),
        "raftblk-3x-proxy" => {
            // The embedded defaults (production timing, memtables and checkpoints), not the
            // tests' quick failover and small memtables.
            let options = ClusterOptions {
                volume_size_bytes: VOLUME_SIZE_BYTES,
                harness_settings: false,
                ..Default::default()
            };
            let cluster = Cluster::start(options);
            // A read cache that holds the fio read region (256 MiB): the 4k random read jobs
            // measure cache hits, as the proxy serves a working set that fits its cache.
            let proxy =
                ProxyProcess::start(&cluster, "bench", &["--cache-bytes", PROXY_CACHE_SIZE]);
            Peer::Replicated(Box::new((proxy, cluster)))
        }
        "qemu-nbd" => start_qemu_nbd(directory, "writethrough"),
        "qemu-nbd-writeback" => start_qemu_nbd(directory, "writeback"),
        "nbdkit" => {
            let image = sparse_image(directory, "nbdkit.img");
            let port = pick_free_port();
            let process = BackgroundProcess::spawn(
                Command::new("nbdkit")
                    .args(["-f", "-i", "127.0.0.1", "-e", "vol"])
                    .args(["-p", &port.to_string(), "file"])
                    .arg(&image),
                &directory.join("nbdkit.log"),
            );
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            wait_for_listener(address, Duration::from_secs(30));
            Peer::External(process, address)
        }
        other => panic!("unknown peer {other}; known: {PEER_NAMES:?}"),
    }
}

/// The read cache of the benchmarked proxy (`raftblk proxy --cache-bytes`; the default is
/// 64 MiB).
pub const PROXY_CACHE_SIZE: &str = "512M";

/// `qemu-nbd -t -e 16 --cache=MODE`: `-t` keeps serving after a client disconnects, `-e 16`
/// lets several clients (nbdfuse opens more than one connection) in at once.
fn start_qemu_nbd(directory: &Path, cache_mode: &str) -> Peer {
    let image = sparse_image(directory, &format!("qemu-nbd-{cache_mode}.img"));
    let port = pick_free_port();
    let process = BackgroundProcess::spawn(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-t",
                "-e",
                "16",
                "-x",
                "vol",
                "-b",
                "127.0.0.1",
            ])
            .args(["-p", &port.to_string()])
            .arg(format!("--cache={cache_mode}"))
            .arg(&image),
        &directory.join(format!("qemu-nbd-{cache_mode}.log")),
    );
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_listener(address, Duration::from_secs(30));
    Peer::External(process, address)
}
