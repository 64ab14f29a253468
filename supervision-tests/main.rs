//! Supervision tests: for each actor kind, a named failpoint (`fail` crate, compiled in with
//! `--features failpoints`) makes that actor panic once while a verified client workload runs
//! against a real server process. Each test asserts that the client saw no error, that every
//! acknowledged write reads back intact, that the crash really happened (the restart counter in
//! `/v1/status` and the log line), and that the server still serves new connections.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

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
