//! A verified write load: every acknowledged write can be checked later, after crashes.
//!
//! Used by the crash test (one server, `kill -9`) and the cluster tests (all servers
//! `kill -9`ed at once). The rule it checks is doc/proto.md "Ordering of messages and writes":
//! a write is complete once the server replies to it, so it must survive any crash after that.
//!
//! How the checker avoids passing vacuously:
//! - every 4 KiB block written carries a header (sequence number, absolute block number) and a
//!   body derived from both, so a block read back names exactly one write, and a torn or
//!   misplaced block is recognised as garbage;
//! - the load (writes, and one request in eight a WRITE_ZEROES) never has two requests in
//!   flight on the same block, so each block's history is a total order: after a crash a block
//!   must hold its last acknowledged write or zeroing, or the one request that was in flight on
//!   it (which may or may not have been applied); anything else, including zeroes where an
//!   acknowledged write was or old data where an acknowledged zeroing was, fails;
//! - callers assert how many requests were acknowledged and how many blocks were verified to
//!   hold acknowledged (non-zero) data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{nbd, nbd_error_name, NbdClient, SplitMix64};

pub const BLOCK_SIZE_BYTES: usize = 4096;
const BLOCK_MAGIC: u64 = 0x5242_4c4b_4352_5348; // "RBLKCRSH"

/// What a block may legitimately hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Zeroes: never written, or overwritten by an NBD_CMD_WRITE_ZEROES.
    Zero,
    /// The data of the write with this sequence number.
    Write(u64),
}

/// What the test knows about one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHistory {
    /// The last acknowledged write or zeroing (or what was observed after a crash).
    pub settled: Expected,
    /// The write or zeroing sent to this block and not acknowledged when the server died.
    pub in_flight: Option<Expected>,
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
pub enum BlockContent {
    Zero,
    Write(u64),
    Garbage(String),
}

/// The bytes write number `sequence` puts into block `block_number` (absolute, offset / 4096).
pub fn block_bytes(sequence: u64, block_number: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_SIZE_BYTES];
    SplitMix64::new(sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block_number)
        .fill_bytes(&mut bytes[24..]);
    bytes[0..8].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
    bytes[8..16].copy_from_slice(&sequence.to_le_bytes());
    bytes[16..24].copy_from_slice(&block_number.to_le_bytes());
    bytes
}

pub fn decode_block(bytes: &[u8], block_number: u64) -> BlockContent {
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
    if written_for_block != block_number {
        return BlockContent::Garbage(format!(
            "holds write #{sequence} meant for block {written_for_block}"
        ));
    }
    let expected = block_bytes(sequence, block_number);
    if bytes != expected.as_slice() {
        let first_difference = bytes
            .iter()
            .zip(expected)
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
pub fn is_acceptable(content: &BlockContent, history: &BlockHistory) -> bool {
    let found = match content {
        BlockContent::Zero => Expected::Zero,
        BlockContent::Write(sequence) => Expected::Write(*sequence),
        BlockContent::Garbage(_) => return false,
    };
    found == history.settled || Some(found) == history.in_flight
}

/// Counts from one run of [`VerifiedRegion::run_load`].
#[derive(Debug, Default)]
pub struct LoadStatistics {
    pub acknowledged_writes: u64,
    pub acknowledged_zeroings: u64,
    /// Requests sent and not answered when the load ended.
    pub in_flight_at_end: usize,
    pub load_duration: Duration,
    /// Why the load ended: `None` when `stop` was raised and every reply arrived, else the
    /// transport error that ended it (the expected outcome of a kill).
    pub transport_error: Option<String>,
    /// Longest wait for any reply while requests were in flight.
    pub longest_reply_gap: Duration,
}

impl LoadStatistics {
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged_writes + self.acknowledged_zeroings
    }
}

/// A range of blocks under test and the history of each.
pub struct VerifiedRegion {
    pub offset_bytes: u64,
    pub block_count: u64,
    histories: Vec<BlockHistory>,
    /// Sequence numbers are unique across regions (the caller gives each region its own
    /// starting point), so a write that lands in the wrong region is garbage too.
    next_sequence: u64,
    pub write_blocks_max: u64,
}

impl VerifiedRegion {
    pub fn new(offset_bytes: u64, block_count: u64, first_sequence: u64) -> Self {
        assert_eq!(offset_bytes % BLOCK_SIZE_BYTES as u64, 0, "aligned region");
        assert!(first_sequence > 0, "sequence 0 is reserved");
        VerifiedRegion {
            offset_bytes,
            block_count,
            histories: vec![BlockHistory::default(); block_count as usize],
            next_sequence: first_sequence,
            write_blocks_max: 4,
        }
    }

    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.block_count * BLOCK_SIZE_BYTES as u64
    }

    fn first_block_number(&self) -> u64 {
        self.offset_bytes / BLOCK_SIZE_BYTES as u64
    }

    /// Runs a pipelined write load with `queue_depth` requests in flight until `stop` is
    /// raised (then waits for the replies still due) or the connection fails (a kill). Every
    /// reply must be a success: an error reply to a valid request fails the test.
    /// `acknowledged_counter` is updated after every reply, for a killer thread to watch.
    pub fn run_load(
        &mut self,
        client: &mut NbdClient,
        random: &mut SplitMix64,
        queue_depth: usize,
        stop: &AtomicBool,
        acknowledged_counter: &AtomicU64,
    ) -> LoadStatistics {
        let started = Instant::now();
        let first_block_number = self.first_block_number();
        // handle -> (what the request writes, first block index in the region, block count)
        let mut outstanding: HashMap<u64, (Expected, u64, u64)> = HashMap::new();
        let mut statistics = LoadStatistics::default();
        'load: loop {
            let stopping = stop.load(Ordering::SeqCst);
            if stopping && outstanding.is_empty() {
                break;
            }
            while !stopping && outstanding.len() < queue_depth {
                // A run of blocks with no request in flight, so each block's writes are
                // ordered.
                let (first_block, block_count) = loop {
                    let block_count = 1 + random.below(self.write_blocks_max);
                    let first_block = random.below(self.block_count - block_count + 1);
                    let busy = (first_block..first_block + block_count)
                        .any(|block| self.histories[block as usize].in_flight.is_some());
                    if !busy {
                        break (first_block, block_count);
                    }
                };
                let offset = self.offset_bytes + first_block * BLOCK_SIZE_BYTES as u64;
                // One request in eight asks for FUA; the durability promise is the same.
                let mut flags = if random.below(8) == 0 {
                    nbd::CMD_FLAG_FUA
                } else {
                    0
                };
                // One request in eight is a WRITE_ZEROES (half of them with NO_HOLE): after
                // its reply the blocks must read as zeroes (doc/proto.md
                // "NBD_CMD_WRITE_ZEROES").
                let (operation, submitted) = if random.below(8) == 0 {
                    if random.below(2) == 0 {
                        flags |= nbd::CMD_FLAG_NO_HOLE;
                    }
                    for block in first_block..first_block + block_count {
                        self.histories[block as usize].in_flight = Some(Expected::Zero);
                    }
                    let length = (block_count as usize * BLOCK_SIZE_BYTES) as u32;
                    (
                        Expected::Zero,
                        client.submit_command(nbd::CMD_WRITE_ZEROES, flags, offset, length),
                    )
                } else {
                    let sequence = self.next_sequence;
                    self.next_sequence += 1;
                    let mut payload = Vec::with_capacity(block_count as usize * BLOCK_SIZE_BYTES);
                    for block in first_block..first_block + block_count {
                        payload
                            .extend_from_slice(&block_bytes(sequence, first_block_number + block));
                        self.histories[block as usize].in_flight = Some(Expected::Write(sequence));
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
                    Err(error) => {
                        statistics.transport_error = Some(format!("send: {error}"));
                        break 'load;
                    }
                }
            }
            let waiting_since = Instant::now();
            let reply = match client.receive_reply() {
                Ok(reply) => reply,
                Err(error) => {
                    statistics.transport_error = Some(format!("receive: {error}"));
                    break 'load;
                }
            };
            statistics.longest_reply_gap =
                statistics.longest_reply_gap.max(waiting_since.elapsed());
            let (operation, first_block, block_count) = outstanding
                .remove(&reply.handle)
                .unwrap_or_else(|| panic!("reply to a handle never sent: {reply:?}"));
            assert_eq!(
                reply.error,
                0,
                "a valid {operation:?} of region blocks {first_block}..+{block_count} failed \
                 with {} ({}) {:?}",
                reply.error,
                nbd_error_name(reply.error),
                reply.error_message
            );
            for block in first_block..first_block + block_count {
                let history = &mut self.histories[block as usize];
                assert_eq!(history.in_flight, Some(operation), "bookkeeping");
                history.settled = operation;
                history.in_flight = None;
            }
            match operation {
                Expected::Write(_) => statistics.acknowledged_writes += 1,
                Expected::Zero => statistics.acknowledged_zeroings += 1,
            }
            acknowledged_counter.fetch_add(1, Ordering::SeqCst);
        }
        statistics.in_flight_at_end = outstanding.len();
        statistics.load_duration = started.elapsed();
        statistics
    }

    /// Reads the whole region back through `client` and checks every block against its
    /// history; on success the histories are settled to what was read (resolving the
    /// in-flight requests). Returns how many blocks hold a write (as opposed to zeroes).
    #[track_caller]
    pub fn verify(&mut self, client: &mut NbdClient, context: &str) -> u64 {
        const BLOCKS_PER_READ: u64 = 256;
        let first_block_number = self.first_block_number();
        let mut violations = Vec::new();
        let mut blocks_holding_writes = 0;
        for chunk_start in (0..self.block_count).step_by(BLOCKS_PER_READ as usize) {
            let blocks = BLOCKS_PER_READ.min(self.block_count - chunk_start);
            let data = client.read_ok(
                self.offset_bytes + chunk_start * BLOCK_SIZE_BYTES as u64,
                (blocks as usize * BLOCK_SIZE_BYTES) as u32,
            );
            for (index_in_chunk, bytes) in data.chunks(BLOCK_SIZE_BYTES).enumerate() {
                let block = chunk_start + index_in_chunk as u64;
                let history = &mut self.histories[block as usize];
                let content = decode_block(bytes, first_block_number + block);
                if !is_acceptable(&content, history) {
                    violations.push(format!(
                        "block {} (byte offset {}): read {content:?}, expected the last \
                         acknowledged {:?} or the in-flight {:?}",
                        first_block_number + block,
                        self.offset_bytes + block * BLOCK_SIZE_BYTES as u64,
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
        assert!(
            violations.is_empty(),
            "{context}: {} of {} blocks lost or corrupted acknowledged writes; first ones:\n{}",
            violations.len(),
            self.block_count,
            violations
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        blocks_holding_writes
    }
}
