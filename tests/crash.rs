//! Crash safety: `kill -9` the server at a random instant in the middle of a write load with
//! many requests in flight, restart it on the same data directory, and check that every write
//! the client saw acknowledged is there (the durability rule: nothing is acknowledged before it
//! is durable; doc/proto.md "Ordering of messages and writes": a write is complete once the
//! server replies to it).
//!
//! The checker (`tests/common/verified.rs`) explains how it avoids passing vacuously; here:
//! - the kill only comes after a minimum number of acknowledged writes, and the test asserts
//!   that number and that many blocks were verified to hold acknowledged (non-zero) data;
//! - rounds continue on the same data directory, so later rounds check data that survived
//!   earlier crashes, and the last check follows a clean SIGTERM restart.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::verified::*;
use common::*;

/// The region under test: 2048 blocks (8 MiB) starting at 256 MiB. Small enough that blocks
/// are overwritten many times per round, large enough for 32 writes in flight.
const REGION_OFFSET_BYTES: u64 = 256 * MIB;
const REGION_BLOCKS: u64 = 2048;
const QUEUE_DEPTH: usize = 32;
const ROUNDS: u32 = 4;
/// Acknowledged requests (writes and zeroings) required before the kill may happen in a round.
const ACKNOWLEDGED_WRITES_MIN_PER_ROUND: u64 = 300;
/// Extra random delay after that minimum, so the kill lands at an arbitrary point.
const KILL_DELAY_MS_MAX: u64 = 700;
/// A round that cannot reach the minimum in this time fails (the server is far too slow).
const ROUND_DEADLINE: Duration = Duration::from_secs(20);

/// The checker itself, without a server: it must reject every way a block can be wrong, or the
/// crash test could pass without proving anything.
#[test]
fn checker_rejects_lost_stale_torn_and_misplaced_blocks() {
    let history = BlockHistory {
        settled: Expected::Write(7),
        in_flight: Some(Expected::Write(9)),
    };
    let block = 42;
    assert_eq!(
        decode_block(&block_bytes(7, block), block),
        BlockContent::Write(7)
    );
    assert!(
        is_acceptable(&BlockContent::Write(7), &history),
        "last acknowledged"
    );
    assert!(
        is_acceptable(&BlockContent::Write(9), &history),
        "the in-flight write"
    );
    assert!(
        !is_acceptable(&BlockContent::Zero, &history),
        "a lost write"
    );
    assert!(
        !is_acceptable(&BlockContent::Write(5), &history),
        "a stale write"
    );
    assert!(
        !is_acceptable(&BlockContent::Write(11), &history),
        "a write never sent"
    );
    let never_written = BlockHistory::default();
    assert!(is_acceptable(&BlockContent::Zero, &never_written));
    assert!(!is_acceptable(&BlockContent::Write(1), &never_written));
    let zeroing_in_flight = BlockHistory {
        settled: Expected::Write(7),
        in_flight: Some(Expected::Zero),
    };
    assert!(is_acceptable(&BlockContent::Zero, &zeroing_in_flight));
    assert!(is_acceptable(&BlockContent::Write(7), &zeroing_in_flight));
    let zeroed = BlockHistory {
        settled: Expected::Zero,
        in_flight: None,
    };
    assert!(
        !is_acceptable(&BlockContent::Write(7), &zeroed),
        "data that an acknowledged WRITE_ZEROES replaced"
    );

    let mut torn = block_bytes(9, block);
    torn[2048..].copy_from_slice(&block_bytes(7, block)[2048..]);
    assert!(
        matches!(decode_block(&torn, block), BlockContent::Garbage(_)),
        "torn"
    );
    assert!(
        matches!(
            decode_block(&block_bytes(7, block + 1), block),
            BlockContent::Garbage(_)
        ),
        "a write that landed on the wrong block"
    );
    let mut flipped = block_bytes(7, block);
    flipped[4000] ^= 1;
    assert!(
        matches!(decode_block(&flipped, block), BlockContent::Garbage(_)),
        "a flipped bit"
    );
    let mut zero_header = block_bytes(7, block);
    zero_header[..24].fill(0);
    assert!(matches!(
        decode_block(&zero_header, block),
        BlockContent::Garbage(_)
    ));
}

/// `kill -9` mid-load, restart, verify; several rounds on the same data directory, then a
/// clean SIGTERM restart and a final verification.
#[test]
fn kill_9_during_write_load_loses_no_acknowledged_write() {
    let mut random = SplitMix64::from_environment_or_clock("kill_9_during_write_load");
    let mut server = ServerProcess::start();
    let mut region = VerifiedRegion::new(REGION_OFFSET_BYTES, REGION_BLOCKS, 1);
    let test_started = Instant::now();

    for round in 1..=ROUNDS {
        let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
        assert!(
            client.export.size_bytes >= region.end_bytes(),
            "disk0 is too small for the test region: {:?}",
            client.export
        );
        let acknowledged_counter = Arc::new(AtomicU64::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let kill_delay = Duration::from_millis(random.below(KILL_DELAY_MS_MAX + 1));
        let pid = server.pid();
        // The killer waits for the minimum number of acknowledgements (or the deadline, in
        // which case the assertion below fails the test), then a random extra delay.
        let killer = {
            let acknowledged_counter = Arc::clone(&acknowledged_counter);
            let killed = Arc::clone(&killed);
            thread::spawn(move || {
                let deadline = Instant::now() + ROUND_DEADLINE;
                while acknowledged_counter.load(Ordering::SeqCst)
                    < ACKNOWLEDGED_WRITES_MIN_PER_ROUND
                    && Instant::now() < deadline
                {
                    thread::sleep(Duration::from_millis(1));
                }
                thread::sleep(kill_delay);
                // SAFETY: kill(2) only sends a signal to the server we started.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                killed.store(true, Ordering::SeqCst);
            })
        };
        // Never raised: the load ends when the kill breaks the connection.
        let never_stop = AtomicBool::new(false);
        let statistics = region.run_load(
            &mut client,
            &mut random,
            QUEUE_DEPTH,
            &never_stop,
            &acknowledged_counter,
        );
        killer.join().expect("killer thread");
        assert!(
            killed.load(Ordering::SeqCst),
            "round {round}: the load stopped before the kill: the connection failed on its own \
             ({:?})",
            statistics.transport_error
        );
        let status = server.kill_9();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}: the server must have died of the kill -9, not before it: {status}"
        );
        eprintln!(
            "round {round}: {} writes and {} zeroings acknowledged in {:.2?}, {} in flight at \
             the kill (kill delay {kill_delay:?})",
            statistics.acknowledged_writes,
            statistics.acknowledged_zeroings,
            statistics.load_duration,
            statistics.in_flight_at_end
        );
        let acknowledged = statistics.acknowledged_writes + statistics.acknowledged_zeroings;
        assert!(
            acknowledged >= ACKNOWLEDGED_WRITES_MIN_PER_ROUND,
            "round {round}: only {acknowledged} requests were acknowledged in \
             {ROUND_DEADLINE:?} before the kill; the check needs at least \
             {ACKNOWLEDGED_WRITES_MIN_PER_ROUND}"
        );
        assert!(
            statistics.acknowledged_writes > 0 && statistics.acknowledged_zeroings > 0,
            "round {round}: the load must include both writes and zeroings"
        );

        server.restart();
        let mut reader = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
        let blocks_holding_writes =
            region.verify(&mut reader, &format!("after kill -9 in round {round}"));
        let _ = reader.disconnect();
        assert!(
            blocks_holding_writes >= ACKNOWLEDGED_WRITES_MIN_PER_ROUND.min(REGION_BLOCKS) / 2,
            "round {round}: only {blocks_holding_writes} blocks hold written data; the load \
             did not exercise the region"
        );
    }

    // Finally a clean shutdown keeps everything too.
    server.terminate_cleanly();
    server.restart();
    let mut reader = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    let blocks_holding_writes = region.verify(&mut reader, "after SIGTERM restart");
    eprintln!(
        "verified {blocks_holding_writes} written blocks after {ROUNDS} crashes and a clean \
         restart in {:.1?}",
        test_started.elapsed()
    );
}
