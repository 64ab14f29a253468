//! Crash safety: `kill -9` the server at a random instant in the middle of a write load with
//! many requests in flight, restart it on the same data directory, and check that every write
//! the client saw acknowledged is there (DESIGN.md "Durability rule"; doc/proto.md "Ordering
//! of messages and writes": a write is complete once the server replies to it).
//!
//! How the checker avoids passing vacuously:
//! - every 4 KiB block written carries a header (sequence number, block index) and a body
//!   derived from both, so a block read back names exactly one write, and a torn or misplaced
//!   block is recognised as garbage;
//! - the load (writes, and one request in eight a WRITE_ZEROES) never has two requests in
//!   flight on the same block, so each block's history is a total order: after the crash a
//!   block must hold its last acknowledged write or zeroing, or the one request that was in
//!   flight on it (which may or may not have been applied); anything else, including zeroes
//!   where an acknowledged write was or old data where an acknowledged zeroing was, fails;
//! - the kill only comes after a minimum number of acknowledged writes, and the test asserts
//!   that number and that many blocks were verified to hold acknowledged (non-zero) data;
//! - rounds continue on the same data directory, so later rounds check data that survived
//!   earlier crashes, and the last check follows a clean SIGTERM restart.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const BLOCK_SIZE_BYTES: usize = 4096;
/// The region under test: 2048 blocks (8 MiB) starting at 256 MiB. Small enough that blocks
/// are overwritten many times per round, large enough for 32 writes in flight.
const REGION_OFFSET_BYTES: u64 = 256 * MIB;
const REGION_BLOCKS: u64 = 2048;
/// Longest write, in blocks.
const WRITE_BLOCKS_MAX: u64 = 4;
const QUEUE_DEPTH: usize = 32;
const ROUNDS: u32 = 4;
/// Acknowledged requests (writes and zeroings) required before the kill may happen in a round.
const ACKNOWLEDGED_WRITES_MIN_PER_ROUND: u64 = 300;
/// Extra random delay after that minimum, so the kill lands at an arbitrary point.
const KILL_DELAY_MS_MAX: u64 = 700;
/// A round that cannot reach the minimum in this time fails (the server is far too slow).
const ROUND_DEADLINE: Duration = Duration::from_secs(20);
const BLOCK_MAGIC: u64 = 0x5242_4c4b_4352_5348; // "RBLKCRSH"

/// What a block may legitimately hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    /// Zeroes: never written, or overwritten by an NBD_CMD_WRITE_ZEROES.
    Zero,
    /// The data of the write with this sequence number.
    Write(u64),
}

/// What the test knows about one block of the region.
#[derive(Clone, Copy, Debug)]
struct BlockHistory {
    /// The last acknowledged write or zeroing (or what was observed after a crash).
    settled: Expected,
    /// The write or zeroing sent to this block and not acknowledged when the server died.
    in_flight: Option<Expected>,
}

impl Default for BlockHistory {
    fn default() -> Self {
        BlockHistory {
            settled: Expected::Zero,
            in_flight: None,
        }
    }
}

/// What a block read back turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum BlockContent {
    Zero,
    Write(u64),
    Garbage(String),
}

fn block_bytes(sequence: u64, block_index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_SIZE_BYTES];
    SplitMix64::new(sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block_index)
        .fill_bytes(&mut bytes[24..]);
    bytes[0..8].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
    bytes[8..16].copy_from_slice(&sequence.to_le_bytes());
    bytes[16..24].copy_from_slice(&block_index.to_le_bytes());
    bytes
}

fn decode_block(bytes: &[u8], block_index: u64) -> BlockContent {
    if bytes.iter().all(|&byte| byte == 0) {
        return BlockContent::Zero;
    }
    let field = |range: std::ops::Range<usize>| {
        u64::from_le_bytes(bytes[range].try_into().expect("8 bytes"))
    };
    if field(0..8) != BLOCK_MAGIC {
        return BlockContent::Garbage(format!("no block magic; first bytes {:02x?}", &bytes[..32]));
    }
    let sequence = field(8..16);
    let written_for_block = field(16..24);
    if written_for_block != block_index {
        return BlockContent::Garbage(format!(
            "holds write #{sequence} meant for block {written_for_block}"
        ));
    }
    if bytes != block_bytes(sequence, block_index).as_slice() {
        let first_difference = bytes
            .iter()
            .zip(block_bytes(sequence, block_index))
            .position(|(actual, expected)| *actual != expected)
            .unwrap_or(0);
        return BlockContent::Garbage(format!(
            "torn: header of write #{sequence} but the body differs from byte {first_difference}"
        ));
    }
    BlockContent::Write(sequence)
}

/// The rule: a block holds its last acknowledged write or zeroing (zeroes if it never had
/// one), or the single write or zeroing that was in flight on it when the server died.
fn is_acceptable(content: &BlockContent, history: &BlockHistory) -> bool {
    let found = match content {
        BlockContent::Zero => Expected::Zero,
        BlockContent::Write(sequence) => Expected::Write(*sequence),
        BlockContent::Garbage(_) => return false,
    };
    found == history.settled || Some(found) == history.in_flight
}

struct RoundStatistics {
    acknowledged_writes: u64,
    acknowledged_zeroings: u64,
    in_flight_at_kill: usize,
    load_duration: Duration,
}

/// Runs the pipelined write load until the server dies under it. Returns when a send or a
/// receive fails (the kill), leaving `histories` with every unacknowledged write in flight.
fn run_load_until_killed(
    client: &mut NbdClient,
    histories: &mut [BlockHistory],
    next_sequence: &mut u64,
    random: &mut SplitMix64,
    acknowledged_counter: &AtomicU64,
) -> RoundStatistics {
    let started = Instant::now();
    // handle -> (what the request writes, first block, block count)
    let mut outstanding: std::collections::HashMap<u64, (Expected, u64, u64)> = Default::default();
    let mut acknowledged_writes = 0u64;
    let mut acknowledged_zeroings = 0u64;
    'load: loop {
        while outstanding.len() < QUEUE_DEPTH {
            // Pick a run of blocks with no write in flight, so each block's writes are ordered.
            let (first_block, block_count) = loop {
                let block_count = 1 + random.below(WRITE_BLOCKS_MAX);
                let first_block = random.below(REGION_BLOCKS - block_count + 1);
                let busy = (first_block..first_block + block_count)
                    .any(|block| histories[block as usize].in_flight.is_some());
                if !busy {
                    break (first_block, block_count);
                }
            };
            let offset = REGION_OFFSET_BYTES + first_block * BLOCK_SIZE_BYTES as u64;
            // One request in eight asks for FUA; the durability promise is the same either way.
            let mut flags = if random.below(8) == 0 {
                nbd::CMD_FLAG_FUA
            } else {
                0
            };
            // One request in eight is a WRITE_ZEROES (half of them with NO_HOLE): after its
            // reply the blocks must read as zeroes, exactly as after a write of zeroes
            // (doc/proto.md "NBD_CMD_WRITE_ZEROES").
            let (operation, submitted) = if random.below(8) == 0 {
                if random.below(2) == 0 {
                    flags |= nbd::CMD_FLAG_NO_HOLE;
                }
                for block in first_block..first_block + block_count {
                    histories[block as usize].in_flight = Some(Expected::Zero);
                }
                let length = (block_count as usize * BLOCK_SIZE_BYTES) as u32;
                (
                    Expected::Zero,
                    client.submit_command(nbd::CMD_WRITE_ZEROES, flags, offset, length),
                )
            } else {
                let sequence = *next_sequence;
                *next_sequence += 1;
                let mut payload = Vec::with_capacity(block_count as usize * BLOCK_SIZE_BYTES);
                for block in first_block..first_block + block_count {
                    payload.extend_from_slice(&block_bytes(sequence, block));
                    histories[block as usize].in_flight = Some(Expected::Write(sequence));
                }
                (
                    Expected::Write(sequence),
                    client.submit_write(offset, &payload, flags),
                )
            };
            match submitted {
                Ok(handle) => {
                    outstanding.insert(handle, (operation, first_block, block_count));
                }
                // The blocks stay marked in flight: part of the request may have arrived.
                Err(_) => break 'load,
            }
        }
        let reply = match client.receive_reply() {
            Ok(reply) => reply,
            Err(_) => break 'load,
        };
        let (operation, first_block, block_count) = outstanding
            .remove(&reply.handle)
            .unwrap_or_else(|| panic!("reply to a handle never sent: {reply:?}"));
        assert_eq!(
            reply.error,
            0,
            "a valid {operation:?} of blocks {first_block}..+{block_count} failed with {} ({}) \
             {:?}",
            reply.error,
            nbd_error_name(reply.error),
            reply.error_message
        );
        for block in first_block..first_block + block_count {
            let history = &mut histories[block as usize];
            assert_eq!(history.in_flight, Some(operation), "bookkeeping");
            history.settled = operation;
            history.in_flight = None;
        }
        match operation {
            Expected::Write(_) => acknowledged_writes += 1,
            Expected::Zero => acknowledged_zeroings += 1,
        }
        // Zeroings count too: the minimum is about acknowledged requests of either kind.
        acknowledged_counter.store(
            acknowledged_writes + acknowledged_zeroings,
            Ordering::SeqCst,
        );
    }
    RoundStatistics {
        acknowledged_writes,
        acknowledged_zeroings,
        in_flight_at_kill: outstanding.len(),
        load_duration: started.elapsed(),
    }
}

/// Reads the whole region back and checks every block against its history; on success the
/// histories are settled to what was read (resolving the in-flight writes). Returns how many
/// blocks hold a write (as opposed to zeroes).
#[track_caller]
fn verify_region(server: &ServerProcess, histories: &mut [BlockHistory], context: &str) -> u64 {
    let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
    const BLOCKS_PER_READ: u64 = 256;
    let mut violations = Vec::new();
    let mut blocks_holding_writes = 0;
    for chunk_start in (0..REGION_BLOCKS).step_by(BLOCKS_PER_READ as usize) {
        let data = client.read_ok(
            REGION_OFFSET_BYTES + chunk_start * BLOCK_SIZE_BYTES as u64,
            (BLOCKS_PER_READ as usize * BLOCK_SIZE_BYTES) as u32,
        );
        for (index_in_chunk, bytes) in data.chunks(BLOCK_SIZE_BYTES).enumerate() {
            let block = chunk_start + index_in_chunk as u64;
            let history = &mut histories[block as usize];
            let content = decode_block(bytes, block);
            if !is_acceptable(&content, history) {
                violations.push(format!(
                    "block {block} (byte offset {}): read {content:?}, expected the last \
                     acknowledged {:?} or the in-flight {:?}",
                    REGION_OFFSET_BYTES + block * BLOCK_SIZE_BYTES as u64,
                    history.settled,
                    history.in_flight
                ));
                continue;
            }
            history.settled = match content {
                BlockContent::Write(found) => {
                    blocks_holding_writes += 1;
                    Expected::Write(found)
                }
                _ => Expected::Zero,
            };
            history.in_flight = None;
        }
    }
    let _ = client.disconnect();
    assert!(
        violations.is_empty(),
        "{context}: {} of {REGION_BLOCKS} blocks lost or corrupted acknowledged writes; first \
         ones:\n{}",
        violations.len(),
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    blocks_holding_writes
}

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
    let mut histories = vec![BlockHistory::default(); REGION_BLOCKS as usize];
    let mut next_sequence = 1u64;
    let test_started = Instant::now();

    for round in 1..=ROUNDS {
        let mut client = NbdClient::connect(server.nbd_address(), DEFAULT_EXPORT_NAME);
        assert!(
            client.export.size_bytes
                >= REGION_OFFSET_BYTES + REGION_BLOCKS * BLOCK_SIZE_BYTES as u64,
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
        let statistics = run_load_until_killed(
            &mut client,
            &mut histories,
            &mut next_sequence,
            &mut random,
            &acknowledged_counter,
        );
        killer.join().expect("killer thread");
        assert!(
            killed.load(Ordering::SeqCst),
            "round {round}: the load stopped before the kill: the connection failed on its own"
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
            statistics.in_flight_at_kill
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
        let blocks_holding_writes = verify_region(
            &server,
            &mut histories,
            &format!("after kill -9 in round {round}"),
        );
        assert!(
            blocks_holding_writes >= ACKNOWLEDGED_WRITES_MIN_PER_ROUND.min(REGION_BLOCKS) / 2,
            "round {round}: only {blocks_holding_writes} blocks hold written data; the load \
             did not exercise the region"
        );
    }

    // Finally a clean shutdown keeps everything too.
    server.terminate_cleanly();
    server.restart();
    let blocks_holding_writes = verify_region(&server, &mut histories, "after SIGTERM restart");
    eprintln!(
        "verified {blocks_holding_writes} written blocks after {ROUNDS} crashes and a clean \
         restart in {:.1?}",
        test_started.elapsed()
    );
}
