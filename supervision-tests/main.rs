//! Supervision tests: for each actor kind, a named failpoint (`fail` crate, compiled in with
//! `--features failpoints`) makes that actor panic while a verified client workload runs
//! against real processes, armed either through `FAILPOINTS` at start or at runtime through
//! `PUT /v1/failpoints/{name}`. Each test asserts that the client saw no error, that every
//! acknowledged write reads back intact, that the crash really happened (the restart counter in
//! `/v1/status` and the log line), and that the process still serves new connections. A panic
//! storm must instead end the process with a non-zero exit after a clean shutdown.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::time::Duration;

use common::cluster::{Cluster, ClusterOptions, ProxyProcess};
use common::{NbdClient, ServerProcess, DEFAULT_EXPORT_NAME};

const BLOCK_BYTES: usize = 4096;

fn block_pattern(round: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES];
    for (position, byte) in data.iter_mut().enumerate() {
        *byte = (round.wrapping_mul(31) ^ block.wrapping_mul(7) ^ position as u64) as u8;
    }
    data[..8].copy_from_slice(&round.to_be_bytes());
    data[8..16].copy_from_slice(&block.to_be_bytes());
    data
}

/// Writes `blocks` blocks `rounds` times and reads every block back after each round.
fn verified_workload(client: &mut NbdClient, rounds: u64, blocks: u64) {
    for round in 0..rounds {
        for block in 0..blocks {
            client.write_ok(block * BLOCK_BYTES as u64, &block_pattern(round, block));
        }
        for block in 0..blocks {
            let data = client.read_ok(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32);
            assert!(
                data == block_pattern(round, block),
                "block {block} of round {round} does not read back as written"
            );
        }
    }
}

fn actor_restarts(server: &ServerProcess) -> serde_json::Value {
    let url = format!("http://{}/v1/status", server.control_address());
    let status: serde_json::Value = ureq::get(&url)
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .into_json()
        .unwrap_or_else(|error| panic!("GET {url}: body is not JSON: {error}"));
    status["actor_restarts"].clone()
}

fn assert_one_crash_of(server: &ServerProcess, kind: &str, failpoint: &str) {
    let restarts = actor_restarts(server);
    assert_eq!(
        restarts[kind], 1,
        "expected exactly one {kind} restart, status says {restarts}"
    );
    let log = server.log_text();
    assert!(
        log.contains("actor crashed; restarting it")
            && log.contains(&format!("failpoint {failpoint}")),
        "the server log does not report the injected crash:\n{log}"
    );
}

#[test]
fn storage_actor_panic_is_invisible_to_the_client() {
    let mut server = ServerProcess::start_with_environment(&[(
        "FAILPOINTS",
        "storage_actor_apply=40*off->1*panic->off",
    )]);
    let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 3, 32);
    assert_one_crash_of(&server, "storage", "storage_actor_apply");
    // A new connection sees everything the old one wrote.
    let mut second = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    for block in 0..32 {
        assert!(
            second.read_ok(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                == block_pattern(2, block)
        );
    }
    server.assert_running("after the storage actor crash");
}

#[test]
fn raft_actor_panic_is_invisible_to_the_client() {
    let mut server = ServerProcess::start_with_environment(&[(
        "FAILPOINTS",
        "raft_actor_ready=60*off->1*panic->off",
    )]);
    let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 3, 32);
    assert_one_crash_of(&server, "raft", "raft_actor_ready");
    server.assert_running("after the Raft actor crash");
}

#[test]
fn session_actor_panic_closes_only_its_own_connection() {
    // The 20th request handled by any session panics: that session's connection closes, the
    // other connection goes on, and acknowledged writes stay.
    let mut server = ServerProcess::start_with_environment(&[(
        "FAILPOINTS",
        "nbd_session_request=19*off->1*panic->off",
    )]);
    let mut bystander = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut bystander, 1, 8); // requests 1..=16
    let mut victim = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    victim.write_ok(100 * BLOCK_BYTES as u64, &block_pattern(9, 100)); // 17
    victim.write_ok(101 * BLOCK_BYTES as u64, &block_pattern(9, 101)); // 18
    victim.write_ok(102 * BLOCK_BYTES as u64, &block_pattern(9, 102)); // 19
                                                                       // Request 20 crashes the victim's session: the connection must end, not hang.
    victim.set_timeout(Duration::from_secs(10));
    let outcome = victim.write(103 * BLOCK_BYTES as u64, &block_pattern(9, 103));
    assert!(
        outcome.is_err(),
        "the crashed session's connection should be closed, got a reply {outcome:?}"
    );
    // The bystander's connection still works, and sees the victim's acknowledged writes.
    verified_workload(&mut bystander, 1, 8);
    for block in 100..103 {
        assert!(
            bystander.read_ok(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                == block_pattern(9, block)
        );
    }
    assert_one_crash_of(&server, "nbd_session", "nbd_session_request");
    server.assert_running("after a session crash");
}

#[test]
fn listener_panic_in_its_accept_loop_restarts_it_and_keeps_sessions() {
    let mut server = ServerProcess::start();
    let mut bystander = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut bystander, 1, 8);
    // The next accepted connection panics the accept loop (a spawned future, outside any
    // handler): that connection is dropped, the listener restarts on the same socket.
    server.arm_failpoint("nbd_listener_accept", "1*panic");
    let mut victim = std::net::TcpStream::connect(server.nbd_address()).expect("connect");
    victim
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    let mut greeting = [0u8; 18];
    assert!(
        victim.read_exact(&mut greeting).is_err(),
        "the connection accepted by the crashing accept loop should be closed"
    );
    // The open session never noticed, and new connections are accepted again.
    verified_workload(&mut bystander, 2, 8);
    let mut newcomer = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    for block in 0..8 {
        assert!(
            newcomer.read_ok(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                == block_pattern(1, block)
        );
    }
    assert_one_crash_of(&server, "listener", "nbd_listener_accept");
    server.assert_running("after the listener crash");
}

#[test]
fn raft_timer_panic_restarts_the_raft_actor() {
    let mut server = ServerProcess::start();
    let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 1, 16);
    // The tick timer (run_interval, outside any handler) panics once.
    server.arm_failpoint("raft_actor_tick", "1*panic");
    verified_workload(&mut client, 3, 16);
    common::wait_until(
        "the Raft actor's restart is counted",
        Duration::from_secs(30),
        || actor_restarts(&server)["raft"] == 1,
    );
    assert_one_crash_of(&server, "raft", "raft_actor_tick");
    verified_workload(&mut client, 1, 16);
    server.assert_running("after the Raft timer crash");
}

#[test]
fn a_panic_storm_exits_non_zero_after_a_clean_shutdown() {
    let mut server = ServerProcess::start();
    let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 1, 16);
    // Every apply panics from now on: the storage actor crashes at every restart until the
    // restart intensity is exceeded.
    server.arm_failpoint("storage_actor_apply", "panic");
    client.set_timeout(Duration::from_secs(60));
    let outcome = client.write(0, &block_pattern(7, 0));
    let status = server
        .wait_for_own_exit(Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "the server should exit after a panic storm\n{}",
                server.log_text()
            )
        });
    assert!(
        !status.success() && status.code().is_some(),
        "expected a non-zero exit code (not a signal), got {status}; the write got {outcome:?}"
    );
    let log = server.log_text();
    assert!(
        log.contains("actor crashed too often; escalating")
            && log.contains("supervision escalated")
            && log.contains("RocksDB closed"),
        "the log does not show an escalation followed by a clean shutdown:\n{log}"
    );
    // Durable state is intact: the restarted server (runtime failpoints are gone with the
    // process) serves every write acknowledged before the storm.
    server.restart();
    let mut reader = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    for block in 1..16 {
        assert!(
            reader.read_ok(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                == block_pattern(0, block),
            "block {block} acknowledged before the storm was lost"
        );
    }
}

#[test]
fn release_profile_keeps_panic_unwind() {
    // Supervision catches panics; with `panic = "abort"` every crash would kill the process.
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("read Cargo.toml");
    let release = manifest
        .split("[profile.release]")
        .nth(1)
        .expect("Cargo.toml has a [profile.release] section");
    let release = release.split("\n[").next().unwrap_or(release);
    assert!(
        release
            .lines()
            .any(|line| line.split('#').next().unwrap_or("").replace(' ', "") == "panic=\"unwind\""),
        "[profile.release] must set panic = \"unwind\":\n{release}"
    );
}

fn restarts_at(control: std::net::SocketAddr) -> serde_json::Value {
    let url = format!("http://{control}/v1/status");
    let status: serde_json::Value = ureq::get(&url)
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .into_json()
        .unwrap_or_else(|error| panic!("GET {url}: body is not JSON: {error}"));
    status["actor_restarts"].clone()
}

#[test]
fn peer_link_panic_restarts_the_link_and_replication_goes_on() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let leader = cluster.leader();
    let leader_node = cluster.node(leader);
    let (nbd, control) = (leader_node.nbd_address, leader_node.control_address);
    let mut client = NbdClient::connect(nbd, DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 1, 16);
    // The next batch a link task of the leader sends panics that task (outside any actor).
    common::arm_failpoint(control, "peer_link_send", "1*panic");
    verified_workload(&mut client, 3, 16);
    common::wait_until(
        "the peer link's restart is counted",
        Duration::from_secs(30),
        || restarts_at(control)["peer"] == 1,
    );
    // Writes still commit (they need a follower's acknowledgement through the links).
    verified_workload(&mut client, 1, 16);
    assert!(
        cluster
            .node(leader)
            .log_text()
            .contains("failpoint peer_link_send"),
        "the leader's log does not report the injected crash"
    );
    cluster.assert_all_alive("after the peer link crash");
}

/// The proxy's cache lookup counters (`raftblk_proxy_cache_lookups_total`): (hits, misses).
fn cache_lookups(metrics: std::net::SocketAddr) -> (u64, u64) {
    let url = format!("http://{metrics}/metrics");
    let text = ureq::get(&url)
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .into_string()
        .expect("the metrics text");
    let counter = |result: &str| -> u64 {
        let prefix = format!("raftblk_proxy_cache_lookups_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in the proxy's metrics:\n{text}")) as u64
    };
    (counter("hit"), counter("miss"))
}

/// The proxy's cache actor panics inside the lookup of a read: that read is served from the
/// cluster all the same (the session bypasses a cache that does not answer), the actor
/// restarts, and it restarts cold: a block it held before the crash is a miss afterwards, then
/// a hit once read again.
#[test]
fn proxy_cache_panic_restarts_it_cold_and_reads_bypass_it() {
    let cluster = Cluster::start(ClusterOptions::default());
    let free_address = || -> std::net::SocketAddr {
        format!("127.0.0.1:{}", common::pick_free_port())
            .parse()
            .expect("an address")
    };
    let (proxy_control, proxy_metrics) = (free_address(), free_address());
    let config_path = cluster.workspace().join("proxy-metrics.toml");
    std::fs::write(
        &config_path,
        format!("[proxy]\nmetrics_listen = \"{proxy_metrics}\"\n"),
    )
    .expect("write the proxy config");
    let proxy = ProxyProcess::start(
        &cluster,
        "supervision-test",
        &[
            "--control-listen",
            &proxy_control.to_string(),
            "--config",
            &config_path.to_string_lossy(),
        ],
    );
    let mut client = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    verified_workload(&mut client, 1, 16);
    let block_zero = || block_pattern(0, 0);
    // Warm: block 0 is in the cache.
    client.read_ok(0, BLOCK_BYTES as u32);
    let before = cache_lookups(proxy_metrics);
    assert!(client.read_ok(0, BLOCK_BYTES as u32) == block_zero());
    let warm = cache_lookups(proxy_metrics);
    assert_eq!(
        (warm.0 - before.0, warm.1 - before.1),
        (1, 0),
        "block 0 must be a cache hit before the crash"
    );

    common::arm_failpoint(proxy_control, "proxy_cache_lookup", "1*panic");
    // This read's lookup crashes the cache: it is served from the cluster.
    assert!(
        client.read_ok(BLOCK_BYTES as u64, BLOCK_BYTES as u32) == block_pattern(0, 1),
        "the read whose cache lookup crashed returned wrong data"
    );
    common::wait_until(
        "the cache's restart is counted",
        Duration::from_secs(30),
        || restarts_at(proxy_control)["cache"] == 1,
    );
    let restarted = cache_lookups(proxy_metrics);
    assert!(client.read_ok(0, BLOCK_BYTES as u32) == block_zero());
    let cold = cache_lookups(proxy_metrics);
    assert_eq!(
        (cold.0 - restarted.0, cold.1 - restarted.1),
        (0, 1),
        "block 0, cached before the crash, must be a miss after the restart (cold)"
    );
    assert!(client.read_ok(0, BLOCK_BYTES as u32) == block_zero());
    let refilled = cache_lookups(proxy_metrics);
    assert_eq!(
        (refilled.0 - cold.0, refilled.1 - cold.1),
        (1, 0),
        "the restarted cache serves block 0 once it read it"
    );
    verified_workload(&mut client, 3, 16);
    let log = std::fs::read_to_string(&proxy.log_path).unwrap_or_default();
    assert!(
        log.contains("actor crashed; restarting it") && log.contains("cache actor restarted cold"),
        "the proxy log does not report the cache crash:\n{log}"
    );
}

/// Reads overlap every window in which a restarted storage actor replays the log. One
/// connection rewrites a hot set of 8 blocks round after round while two others read them back
/// to back, and the storage actor is crashed 6 times. Checkpoints are held off, so every
/// restart reopens the state machine far behind and replays thousands of entries, rewriting
/// older versions of the hot blocks on its way forward. The server is a one-voter group, whose
/// reads skip the ReadIndex round. Per block, a read must return the last write acknowledged
/// before the read was issued, or a later one, intact; never an older round, never an error.
#[test]
fn reads_during_a_storage_actor_replay_never_return_an_overwritten_block() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const HOT_BLOCKS: u64 = 8;
    const CRASHES: u64 = 6;
    let mut server = ServerProcess::start_with_environment(&[
        ("RAFTBLK__STORAGE__CHECKPOINT_INTERVAL_MS", "600000"),
        ("RAFTBLK__STORAGE__CHECKPOINT_BYTES", "1073741824"),
    ]);
    let acknowledged: Arc<Vec<AtomicU64>> =
        Arc::new((0..HOT_BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
        let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
        std::thread::spawn(move || -> Result<u64, String> {
            let mut round = 0;
            while !stop.load(Ordering::Acquire) {
                round += 1;
                for block in 0..HOT_BLOCKS {
                    let reply = client
                        .write(block * BLOCK_BYTES as u64, &block_pattern(round, block))
                        .map_err(|error| format!("write: transport error {error}"))?;
                    if reply.error != 0 {
                        return Err(format!(
                            "write of block {block} round {round}: error {} {}",
                            reply.error, reply.error_message
                        ));
                    }
                    acknowledged[block as usize].store(round, Ordering::Release);
                }
            }
            Ok(round)
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|reader| {
            let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
            let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
            std::thread::spawn(move || -> Result<u64, String> {
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let block = (reads + reader) % HOT_BLOCKS;
                    let floor = acknowledged[block as usize].load(Ordering::Acquire);
                    let reply = client
                        .read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                        .map_err(|error| format!("read: transport error {error}"))?;
                    if reply.error != 0 {
                        return Err(format!(
                            "read of block {block}: error {} {}",
                            reply.error, reply.error_message
                        ));
                    }
                    let round = u64::from_be_bytes(reply.data[..8].try_into().expect("8 bytes"));
                    let expected = if round == 0 {
                        vec![0u8; BLOCK_BYTES]
                    } else {
                        block_pattern(round, block)
                    };
                    if round < floor || reply.data != expected {
                        return Err(format!(
                            "read {reads} of block {block} returned round {round} (intact: {}) \
                             after round {floor} was acknowledged",
                            reply.data == expected
                        ));
                    }
                    reads += 1;
                }
                Ok(reads)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    for crash in 1..=CRASHES {
        server.arm_failpoint("storage_actor_apply", "1*panic");
        common::wait_until(
            &format!("storage actor restart {crash}"),
            Duration::from_secs(30),
            || actor_restarts(&server)["storage"] == crash,
        );
        // Restarts stay below the restart intensity (10 in 10 s).
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, Ordering::Release);
    let rounds = writer.join().expect("the writer thread");
    let reads: Vec<_> = readers
        .into_iter()
        .map(|reader| reader.join().expect("a reader thread"))
        .collect();
    eprintln!("writer: {rounds:?}; readers: {reads:?}");
    assert!(rounds.is_ok(), "the writer failed: {rounds:?}");
    for result in &reads {
        assert!(
            result.is_ok(),
            "a reader saw a stale block or an error: {result:?}"
        );
    }
    assert_eq!(actor_restarts(&server)["storage"], CRASHES);
    server.assert_running("after the storage actor crashes");
}
