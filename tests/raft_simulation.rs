//! Deterministic simulation of the shipping Raft core. Several nodes, each the server's own
//! [`RaftCore`] (the code the Raft actor runs) over the real [`RaftLogStore`] and the real
//! [`StateMachine`] in RocksDB and image files, applied through the storage actor's own
//! [`apply_committed`], are driven on one thread by one seeded random number generator. Only
//! what is I/O on a server is the simulation's: the clock, the network between the nodes,
//! when a WAL sync returns, when the storage side gets to its mailbox, and the clients.
//!
//! What a node is made of, as on a server:
//! - RocksDB opened with [`raftblk::storage::open_db`] in a directory of its own, holding the
//!   Raft log ([`RaftLogStore`], bootstrapped with every node as a voter) and the applied state
//!   ([`StateMachine`], image files beside it);
//! - a [`RaftCore`] fed the events the Raft actor feeds it (proposals, read barriers, peer
//!   messages, ticks, WAL syncs returned, the published applied index, the storage side
//!   restarted, durable applied index) and whose effects the simulation carries out as the
//!   actor does: messages into the simulated network, committed entries into the storage
//!   side's mailbox, a WAL sync that returns at a random later step (inline ones at once),
//!   replies to the clients;
//! - the storage side: a mailbox drained at random moments through [`apply_committed`], the
//!   applied index published and the core woken when it reaches the index the core waits
//!   for, checkpoints (`make_durable`, then the core's own compaction policy);
//! - snapshots as the peer transport moves them: the sender's state machine opens a
//!   [`SnapshotSource`](raftblk::storage::snapshot::SnapshotSource), the receiver stages its
//!   chunks with [`SnapshotStaging`], and only then is the `MsgSnapshot` stepped in; the core
//!   installs it through the state machine's `install_snapshot`. A transfer fails (the sender
//!   hears `report_snapshot` failure) when the receiver is down, the staging fails, or the
//!   message is lost.
//!
//! What the world does to them, all decided by the seed:
//! - the network drops, delays (and so reorders) and duplicates messages, now and then holds
//!   one back for long (a stalled connection), and cuts links in partitions that come and go
//!   (a lone node, a random split, one-way links);
//! - a node's process crashes (everything in memory is dropped, RocksDB closed without a
//!   checkpoint) and restarts from its directory like a server: the core from the log, the
//!   state machine from its durable applied index. A crash loses nothing that was written,
//!   synced or not (the page cache survives);
//! - a node loses power (now and then every node at once): besides the crash, what its disk
//!   had not been told to keep is gone. The storage layer reports each of its syncs
//!   ([`raftblk::storage::durability`]) to a watcher on the simulation's thread, which
//!   remembers what each made durable; the cut truncates the newest RocksDB write-ahead log to
//!   a random length at or above what was synced of it (RocksDB then recovers the writes
//!   whose records survived, whole batches only), and rolls back, each at random, the
//!   512-byte sectors of every image file written since the file's last sync;
//! - the Raft actor alone restarts (the core is rebuilt from RocksDB; the storage side and its
//!   mailbox live on), and the storage actor alone restarts (its state machine is dropped,
//!   its readers retired, and it is reopened from durable state; the core re-delivers what it
//!   lost);
//! - the leader is asked to hand leadership to another voter;
//! - membership changes as an operator makes them: a spare node is started empty to join and
//!   added as a learner, a learner promoted (now and then replacing a voter in one joint
//!   change), a voter of a group of more than three removed, each planned on the leader's live
//!   status with the control API's own planning functions and proposed with their checks,
//!   asked again while not ready; a removed node is stopped and wiped once the configuration
//!   no longer names it;
//! - where the seed turns lease reads on, every node's clock runs at its own rate within the
//!   lease's stated assumptions (5 % either way);
//! - clients, like a proxy's NBD connections, each issue one request at a time to the node
//!   they believe leads (now and then another): writes of a whole block in a small hot set,
//!   reads of one (a reader taken first, then a read barrier, then the read, as an NBD
//!   session does), and other commands (trims, zeroings, writes of other ranges, some out of
//!   range). A request the node answers "retry" is reissued, at the leader or another node,
//!   until the client's deadline, after which it has failed (EIO to the client).
//!
//! Checkers:
//! - Election Safety: at most one leader per term (every node's role after every step);
//! - Log Matching: every entry persisted anywhere is recorded by (index, term) with a digest of
//!   its data and the term of the entry before it; an entry with the same index and term must
//!   have the same data and the same predecessor term. Checked when entries are handed out
//!   and on a periodic read-back of every log from RocksDB;
//! - committed entries never change: every committed entry handed to any state machine, and
//!   every entry at or below a node's commit index in its RocksDB log, equals the first one
//!   recorded at that index;
//! - State Machine Safety: every node applies the same outcome at each index as an
//!   independent in-memory model of the volumes computes for it (the model takes what the
//!   shipping stale-twin rule says an entry applies);
//! - per block, linearizability of the hot blocks as registers: a read returns the value of
//!   the newest write at or below the applied index it read at, and that index is at least
//!   the index of every write acknowledged before the read was issued; a write that failed
//!   may or may not land, but never after a write to its block acknowledged after it failed,
//!   nor may any write land after a later acknowledged one;
//! - after the chaos ends (network healed, crashed nodes restarted): a leader is elected and a
//!   probe write commits within a bounded number of ticks (liveness), every client request
//!   completes, every node applies everything, every node's volumes read back exactly as the
//!   model says (identical replicas, on every node the configuration names), and every
//!   acknowledged write is the committed entry at the index it was acknowledged with (no
//!   acknowledged write lost).
//!
//! Running it: `cargo test --release --features failpoints --test raft_simulation` runs the CI
//! seeds (on every core) and prints, as its last line, `simulation: N seeds, M client operations checked, 0 violations`. A failure
//! names its seed and the command that replays it: `RAFTBLK_SIM_SEED=<n>` replays only that
//! seed (with `RAFTBLK_SIM_TRACE=1` and `-- --nocapture` it prints the last events),
//! `RAFTBLK_SIM_SEEDS=<count>` runs more seeds, `RAFTBLK_SIM_STEPS=<n>` makes each run longer.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, Message, MessageType, Snapshot};
use raft::{GetEntriesContext, StateRole, Storage as _};
use raftblk::config::{MemberConfig, RaftConfig};
use raftblk::control::members::{plan_add_learner, plan_promote, plan_remove, Plan, PlanRefusal};
use raftblk::raft::core::{
    CoreCounters, CoreParams, Effect, RaftCore, RaftLimits, ReadGate, ReadyProgress,
    SNAPSHOT_INSTALL_FAILED,
};
use raftblk::raft::entry::applied_command;
use raftblk::raft::lease::{read_lease_ms_max, LeaseInstant};
use raftblk::raft::ProposalError;
use raftblk::storage::apply::apply_committed;
use raftblk::storage::command::{decode_command, encode_command, encode_write_command, Command};
use raftblk::storage::durability::{watch_this_thread, Synced};
use raftblk::storage::image::ImageFile;
use raftblk::storage::raft_log::RaftLogStore;
use raftblk::storage::snapshot::{SnapshotDescriptor, SnapshotStaging, StagedSnapshot};
use raftblk::storage::state_machine::{ApplyOutcome, StateMachine, VolumeReader};
use raftblk::storage::{open_db, StorageOptions, IMAGES_DIRECTORY_NAME, ROCKSDB_DIRECTORY_NAME};

/// The Raft group every simulated node belongs to.
const GROUP_ID: u64 = 1;
/// One step of simulated time, and the tick interval in steps (each node has its own phase).
const STEP_MS: u64 = 1;
const TICK_INTERVAL_STEPS: u64 = 4;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// Steps of one run in CI; `RAFTBLK_SIM_STEPS` overrides it.
const STEPS_DEFAULT: u64 = 1_500;
/// Seeds run in CI; `RAFTBLK_SIM_SEEDS` overrides it.
const SEEDS_DEFAULT: u64 = 1_000;
/// Every this many steps, every node's whole log is read back from RocksDB and checked.
const LOG_SCAN_INTERVAL_STEPS: u64 = 250;
/// Liveness bound: after the heal, a leader must be elected, a probe write acknowledged,
/// every client request completed and everything applied on every node within this many
/// ticks (a client's deadline fits in it).
const LIVENESS_TICKS_MAX: u64 = 1_000;
/// Bound on Ready rounds handled for one node in one step (each round is finite; raft-rs
/// stops producing them once nothing changes).
const READY_ROUNDS_MAX: usize = 32;
/// Events kept for the failure report when tracing.
const TRACE_EVENTS_MAX: usize = 40_000;
/// How long a client keeps reissuing a request before it reports the failure (the proxy's
/// request deadline, scaled to the simulated cluster): drawn per run between these, 7 to 30
/// election timeouts, so that long partitions make some requests fail.
const CLIENT_DEADLINE_STEPS_MIN: u64 = 300;
const CLIENT_DEADLINE_STEPS_MAX: u64 = 1_200;
/// Clients (connections), each with one request at a time.
const CLIENTS: u64 = 4;
/// The hot set: registers are the first blocks of the first volume.
const HOT_BLOCKS: u64 = 12;
const HOT_BLOCK_BYTES: usize = 512;
/// Nodes that are not members at the start: added as learners, promoted, removed again.
const SPARE_NODES: u64 = 2;
/// How long a membership change is tried before it is given up (its check may wait for a
/// learner to catch up).
const MEMBERSHIP_DEADLINE_STEPS: u64 = 1_500;
/// How long a leader's own proposal may wait for its commit (the server's request timeout,
/// scaled).
const REQUEST_TIMEOUT_STEPS: u64 = 2_000;
/// How long the proxy waits for an answer before it leaves the connection (and reattaches
/// with a new epoch) and reissues the request elsewhere.
const REPLY_TIMEOUT_STEPS: u64 = 400;
/// The proxy's client id when it attaches the hot volume.
const PROXY_CLIENT: &str = "sim-proxy";

// ---------------------------------------------------------------------------------------------
// Randomness and hashing
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number generators"): tiny,
/// fast, and the same sequence on every platform, which is all a simulation needs.
#[derive(Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`); the modulo bias is irrelevant here.
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Uniform in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `numerator / denominator`.
    fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }

    /// An independent generator for another part of the simulation.
    fn split(&mut self) -> SplitMix64 {
        SplitMix64::new(self.next_u64())
    }
}

/// FNV-1a, 64 bits: a stable digest (std's hashers may change between Rust releases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64::new()
    }
}

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    fn of(parts: &[&[u8]]) -> u64 {
        let mut hash = Fnv64::new();
        for part in parts {
            hash.u64(part.len() as u64);
            hash.bytes(part);
        }
        hash.0
    }
}

fn entry_digest(entry: &Entry) -> u64 {
    Fnv64::of(&[
        &(entry.get_entry_type() as u64).to_le_bytes(),
        &entry.context,
        &entry.data,
    ])
}

fn data_digest(data: &[u8]) -> u64 {
    Fnv64::of(&[data])
}

// ---------------------------------------------------------------------------------------------
// Options and chaos
// ---------------------------------------------------------------------------------------------

/// A deliberately broken node or client, to show the checkers catch what they claim to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Halfway through the run, one node's newest log entry is rewritten in RocksDB with the
    /// same index and term but other data.
    CorruptNewestLogEntry,
    /// Appends are acknowledged but not durable: a crash loses every log entry above the
    /// node's durable applied index (and the commit index that covered them).
    AppendsNotDurable,
    /// Clients read without waiting for the read barrier.
    ReadsSkipTheBarrier,
    /// The WAL sync a Ready asks for returns without syncing: the core reports appends and
    /// votes persisted that a power cut can take back.
    WalSyncSkipped,
}

#[derive(Clone, Debug)]
struct SimulationOptions {
    seed: u64,
    node_count: u64,
    steps: u64,
    fault: Option<Fault>,
    /// Crash nodes far more often than usual (for the fault self-tests).
    crash_heavy: bool,
    /// Keep the last events for the failure report (and print them).
    trace: bool,
}

impl SimulationOptions {
    fn new(seed: u64) -> Self {
        SimulationOptions {
            seed,
            // One seed in four runs five nodes.
            node_count: if seed % 4 == 3 { 5 } else { 3 },
            steps: env_u64("RAFTBLK_SIM_STEPS").unwrap_or(STEPS_DEFAULT),
            fault: None,
            crash_heavy: false,
            trace: std::env::var_os("RAFTBLK_SIM_TRACE").is_some(),
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(parsed) => Some(parsed),
        Err(error) => panic!("{name}={value:?} is not a number: {error}"),
    }
}

/// How hostile the world is in one run, drawn from the seed so that seeds differ in kind, not
/// only in detail. Probabilities are per step, in millionths.
#[derive(Clone, Debug)]
struct Chaos {
    drop_per_million: u64,
    duplicate_per_million: u64,
    delay_steps_max: u64,
    /// A message held back for up to `long_delay_steps_max` (a stalled connection).
    long_delay_per_million: u64,
    long_delay_steps_max: u64,
    crash_per_million: u64,
    /// The share of crashes, in percent, that are power cuts (a crash that also loses what
    /// was not synced).
    power_cut_percent: u64,
    /// Every node loses power at once.
    blackout_per_million: u64,
    restart_per_million: u64,
    raft_restart_per_million: u64,
    storage_restart_per_million: u64,
    transfer_per_million: u64,
    membership_per_million: u64,
    partition_per_million: u64,
    heal_per_million: u64,
    request_per_million: u64,
    apply_per_million: u64,
    checkpoint_per_million: u64,
    /// Chance per step that a running WAL sync finishes.
    wal_sync_done_per_million: u64,
    /// Chance that a snapshot transfer fails while it is staged.
    snapshot_failure_per_million: u64,
    /// Entries kept below the durable applied index at compaction (the core's policy).
    log_keep_entries: u64,
    client_deadline_steps: u64,
}

impl Chaos {
    fn draw(rng: &mut SplitMix64, crash_heavy: bool) -> Self {
        Chaos {
            drop_per_million: [0, 10_000, 50_000, 150_000][rng.below(4) as usize],
            duplicate_per_million: [0, 10_000, 50_000][rng.below(3) as usize],
            delay_steps_max: rng.between(1, 12),
            long_delay_per_million: [0, 0, 500, 3_000][rng.below(4) as usize],
            long_delay_steps_max: rng.between(50, 400),
            crash_per_million: if crash_heavy {
                6_000
            } else {
                rng.between(0, 2_500)
            },
            power_cut_percent: if crash_heavy {
                50
            } else {
                [0, 25, 50, 100][rng.below(4) as usize]
            },
            blackout_per_million: [0, 0, 100, 400][rng.below(4) as usize],
            restart_per_million: rng.between(5_000, 30_000),
            raft_restart_per_million: rng.between(0, 1_500),
            storage_restart_per_million: rng.between(0, 3_000),
            transfer_per_million: rng.between(0, 1_500),
            membership_per_million: [0, 1_000, 4_000][rng.below(3) as usize],
            partition_per_million: rng.between(0, 3_000),
            heal_per_million: rng.between(2_000, 10_000),
            request_per_million: rng.between(100_000, 400_000),
            apply_per_million: rng.between(200_000, 900_000),
            checkpoint_per_million: rng.between(5_000, 40_000),
            wal_sync_done_per_million: rng.between(100_000, 900_000),
            snapshot_failure_per_million: [0, 100_000, 400_000][rng.below(3) as usize],
            log_keep_entries: [0, 2, 8, 64][rng.below(4) as usize],
            client_deadline_steps: rng
                .between(CLIENT_DEADLINE_STEPS_MIN, CLIENT_DEADLINE_STEPS_MAX),
        }
    }

    /// The world after the heal: nothing fails any more, and clients stop issuing requests.
    fn calm(log_keep_entries: u64, client_deadline_steps: u64) -> Self {
        Chaos {
            drop_per_million: 0,
            duplicate_per_million: 0,
            delay_steps_max: 3,
            long_delay_per_million: 0,
            long_delay_steps_max: 0,
            crash_per_million: 0,
            power_cut_percent: 0,
            blackout_per_million: 0,
            restart_per_million: 0,
            raft_restart_per_million: 0,
            storage_restart_per_million: 0,
            transfer_per_million: 0,
            membership_per_million: 0,
            partition_per_million: 0,
            heal_per_million: 0,
            request_per_million: 0,
            apply_per_million: 1_000_000,
            checkpoint_per_million: 20_000,
            wal_sync_done_per_million: 1_000_000,
            snapshot_failure_per_million: 0,
            log_keep_entries,
            client_deadline_steps,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------------

/// A message on its way; a snapshot carries the data the receiver staged from it.
struct Packet {
    message: Message,
    staged: Option<StagedSnapshot>,
}

/// Messages in flight, ordered by delivery step and then by the order they were sent; a random
/// delay per message is what reorders them.
struct Network {
    rng: SplitMix64,
    in_flight: BTreeMap<(u64, u64), Packet>,
    next_sequence: u64,
    /// Directed links that are cut: `(from, to)`.
    cut_links: BTreeSet<(u64, u64)>,
    messages_sent: u64,
    messages_dropped: u64,
}

impl Network {
    /// Queues `packet`; false when it was lost on the way.
    fn send(&mut self, now_step: u64, chaos: &Chaos, packet: Packet) -> bool {
        self.messages_sent += 1;
        let (from, to) = (packet.message.from, packet.message.to);
        if self.cut_links.contains(&(from, to))
            || self.rng.chance(chaos.drop_per_million, 1_000_000)
        {
            self.messages_dropped += 1;
            return false;
        }
        // A staged snapshot exists once; its message is never duplicated.
        let copies =
            if packet.staged.is_none() && self.rng.chance(chaos.duplicate_per_million, 1_000_000) {
                2
            } else {
                1
            };
        let mut packet = Some(packet);
        for copy in 0..copies {
            let delay = if self.rng.chance(chaos.long_delay_per_million, 1_000_000) {
                self.rng.between(1, chaos.long_delay_steps_max.max(1))
            } else {
                self.rng.between(1, chaos.delay_steps_max)
            };
            let this = if copy + 1 == copies {
                packet.take().expect("one packet per copy")
            } else {
                let original = packet.as_ref().expect("kept for the last copy");
                Packet {
                    message: original.message.clone(),
                    staged: None,
                }
            };
            self.in_flight
                .insert((now_step + delay, self.next_sequence), this);
            self.next_sequence += 1;
        }
        true
    }

    /// Every packet due at `now_step`, and those whose link went down on the way (lost).
    fn due(&mut self, now_step: u64) -> (Vec<Packet>, Vec<Packet>) {
        let mut due = Vec::new();
        let mut lost = Vec::new();
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > now_step {
                break;
            }
            let packet = entry.remove();
            if self
                .cut_links
                .contains(&(packet.message.from, packet.message.to))
            {
                self.messages_dropped += 1;
                lost.push(packet);
                continue;
            }
            due.push(packet);
        }
        (due, lost)
    }
}

// ---------------------------------------------------------------------------------------------
// The model of the volumes
// ---------------------------------------------------------------------------------------------

/// What applying a command must do, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpectedOutcome {
    Applied,
    VolumeCreated,
    /// Attached, with this epoch.
    Attached(u64),
    Rejected,
}

fn outcome_kind(outcome: &ApplyOutcome) -> Option<ExpectedOutcome> {
    match outcome {
        ApplyOutcome::Applied => Some(ExpectedOutcome::Applied),
        ApplyOutcome::VolumeCreated(_) => Some(ExpectedOutcome::VolumeCreated),
        ApplyOutcome::Attached(info) => info
            .attachment
            .as_ref()
            .map(|attachment| ExpectedOutcome::Attached(attachment.epoch)),
        ApplyOutcome::Rejected(_) => Some(ExpectedOutcome::Rejected),
        // The simulation never deletes volumes; an unexpected outcome has no kind.
        _ => None,
    }
}

struct ModelVolume {
    name: String,
    data: Vec<u8>,
    /// (client, epoch, attach id) of the read-write attachment: data commands must carry its
    /// epoch (0 while unattached).
    attachment: Option<(String, u64, Option<u64>)>,
}

impl ModelVolume {
    fn admits(&self, writer_epoch: u64) -> bool {
        writer_epoch == self.attachment.as_ref().map_or(0, |(_, epoch, _)| *epoch)
    }
}

/// The volumes as the committed log says they must be: a plain byte vector per volume,
/// written independently of the state machine's images, checksums and locks.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<u64, ModelVolume>,
}

impl Model {
    fn volume_id(&self, name: &str) -> Option<u64> {
        self.volumes
            .iter()
            .find(|(_, volume)| volume.name == name)
            .map(|(id, _)| *id)
    }

    fn apply(&mut self, index: u64, data: &[u8]) -> ExpectedOutcome {
        if data.is_empty() {
            return ExpectedOutcome::Applied;
        }
        let Ok(command) = decode_command(data) else {
            return ExpectedOutcome::Rejected;
        };
        let zero = |volumes: &mut BTreeMap<u64, ModelVolume>,
                    volume_id,
                    writer_epoch,
                    offset: u64,
                    length| {
            let Some(volume) = volumes.get_mut(&volume_id) else {
                return ExpectedOutcome::Rejected;
            };
            if !volume.admits(writer_epoch) {
                return ExpectedOutcome::Rejected;
            }
            match offset.checked_add(length) {
                Some(end) if end <= volume.data.len() as u64 => {
                    volume.data[offset as usize..end as usize].fill(0);
                    ExpectedOutcome::Applied
                }
                _ => ExpectedOutcome::Rejected,
            }
        };
        match command {
            Command::CreateVolume {
                name, size_bytes, ..
            } => {
                if self.volume_id(name).is_some() {
                    return ExpectedOutcome::Rejected;
                }
                self.volumes.insert(
                    index,
                    ModelVolume {
                        name: name.to_string(),
                        data: vec![0; size_bytes as usize],
                        attachment: None,
                    },
                );
                ExpectedOutcome::VolumeCreated
            }
            Command::Write {
                volume_id,
                writer_epoch,
                offset,
                data,
            } => {
                let Some(volume) = self.volumes.get_mut(&volume_id) else {
                    return ExpectedOutcome::Rejected;
                };
                if !volume.admits(writer_epoch) {
                    return ExpectedOutcome::Rejected;
                }
                match offset.checked_add(data.len() as u64) {
                    Some(end) if end <= volume.data.len() as u64 => {
                        volume.data[offset as usize..end as usize].copy_from_slice(data);
                        ExpectedOutcome::Applied
                    }
                    _ => ExpectedOutcome::Rejected,
                }
            }
            Command::Attach {
                name,
                client,
                force,
                attach_id,
            } => {
                let Some(volume) = self.volumes.values_mut().find(|volume| volume.name == name)
                else {
                    return ExpectedOutcome::Rejected;
                };
                match &volume.attachment {
                    // A retry of the request that made the current attachment.
                    Some((holder, epoch, id))
                        if attach_id.is_some() && holder == client && *id == attach_id =>
                    {
                        return ExpectedOutcome::Attached(*epoch);
                    }
                    Some((holder, _, _)) if holder != client && !force => {
                        return ExpectedOutcome::Rejected;
                    }
                    _ if client.is_empty() => return ExpectedOutcome::Rejected,
                    _ => {}
                }
                volume.attachment = Some((client.to_string(), index, attach_id));
                ExpectedOutcome::Attached(index)
            }
            // The simulation never detaches or resizes a volume.
            Command::Detach { .. } | Command::ResizeVolume { .. } => ExpectedOutcome::Rejected,
            Command::Trim {
                volume_id,
                writer_epoch,
                offset,
                length,
            }
            | Command::WriteZeroes {
                volume_id,
                writer_epoch,
                offset,
                length,
                ..
            } => zero(&mut self.volumes, volume_id, writer_epoch, offset, length),
            // Not generated by the workload.
            Command::DeleteVolume { .. } => ExpectedOutcome::Rejected,
        }
    }
}

/// The volumes the workload uses: (name, size, block size). The first holds the hot blocks
/// (registers); the other takes every other command. Small, so that writes overlap.
const VOLUMES: [(&str, u64, u32); 2] = [("sim-a", 64 * 1024, 512), ("sim-b", 128 * 1024, 4096)];

/// A hot block's content for the write of `value`: the value, the block number, and a fill
/// derived from both, so that a read tells which write it sees and whether it is whole.
fn register_content(block: u64, value: u64) -> Vec<u8> {
    let mut content = Vec::with_capacity(HOT_BLOCK_BYTES);
    content.extend_from_slice(&value.to_le_bytes());
    content.extend_from_slice(&block.to_le_bytes());
    let mut fill = SplitMix64::new(value ^ block.rotate_left(32));
    while content.len() < HOT_BLOCK_BYTES {
        content.extend_from_slice(&fill.next_u64().to_le_bytes());
    }
    content
}

/// Which write a hot block's content is: `Some(0)` for zeroes (never written), `None` for
/// content no write produced.
fn register_value(block: u64, content: &[u8]) -> Option<u64> {
    if content.iter().all(|byte| *byte == 0) {
        return Some(0);
    }
    let value = u64::from_le_bytes(content[..8].try_into().ok()?);
    (content == register_content(block, value).as_slice()).then_some(value)
}

/// The hot block a command writes as a whole, and the value it writes.
fn register_write(hot_volume_id: Option<u64>, data: &[u8]) -> Option<(u64, u64)> {
    let Ok(Command::Write {
        volume_id,
        offset,
        data,
        ..
    }) = decode_command(data)
    else {
        return None;
    };
    if Some(volume_id) != hot_volume_id || data.len() != HOT_BLOCK_BYTES {
        return None;
    }
    let block = offset / HOT_BLOCK_BYTES as u64;
    if offset % HOT_BLOCK_BYTES as u64 != 0 || block >= HOT_BLOCKS {
        return None;
    }
    Some((block, register_value(block, data)?))
}

// ---------------------------------------------------------------------------------------------
// Clients and their operations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum OpKind {
    /// A whole hot block written with the value that is this operation's id.
    Write { block: u64 },
    /// A hot block read.
    Read { block: u64 },
    /// Any other command (volume creation, trims, zeroings, other writes).
    Other,
    /// The proxy attaching the hot volume (a new epoch).
    Attach,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OpResult {
    /// Acknowledged: applied at this index on the node that answered.
    Acknowledged { index: u64 },
    /// Read: the value seen, at the applied index of the node that served it.
    Read { value: u64, applied_index: u64 },
    /// The client's deadline passed: the request may or may not have taken effect.
    Failed,
}

struct Op {
    id: u64,
    client: u64,
    kind: OpKind,
    command: Bytes,
    invoked_step: u64,
    deadline_step: u64,
    /// The attempt in flight: its number and node, or when the next one starts.
    attempt: u64,
    attempt_node: Option<u64>,
    attempt_started_step: u64,
    retry_at_step: Option<u64>,
    /// A read's reader, taken before its barrier (as an NBD session does).
    reader: Option<VolumeReader>,
    completed: Option<(u64, OpResult)>,
}

/// A proposal's responder in the simulation: which operation and which attempt.
#[derive(Clone, Copy, Debug)]
struct Responder {
    op: u64,
    attempt: u64,
}

// ---------------------------------------------------------------------------------------------
// The checkers' record of the cluster's history
// ---------------------------------------------------------------------------------------------

struct CommittedEntry {
    term: u64,
    digest: u64,
    data_digest: u64,
}

#[derive(Default)]
struct History {
    /// Leader of each term, as first seen.
    leader_by_term: BTreeMap<u64, u64>,
    /// Every entry persisted anywhere: (index, term) -> (digest, term of the entry before it,
    /// if known).
    log_entries: BTreeMap<(u64, u64), (u64, Option<u64>)>,
    /// The committed log, index `i` at position `i - 1`.
    committed: Vec<CommittedEntry>,
    /// What the model says applying each committed entry does, same positions.
    expected_outcomes: Vec<ExpectedOutcome>,
    model: Model,
    /// Per hot block: (index, value) of every write applied to it, in log order.
    versions: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Every client operation.
    ops: BTreeMap<u64, Op>,
    trace: Fnv64,
}

type Checked<T> = Result<T, String>;

impl History {
    /// Log Matching, as entries are written or read back: the same (index, term) means the same
    /// data and the same predecessor term.
    fn check_log_entry(
        &mut self,
        node_id: u64,
        entry: &Entry,
        previous_term: Option<u64>,
    ) -> Checked<()> {
        let digest = entry_digest(entry);
        let key = (entry.index, entry.term);
        match self.log_entries.get_mut(&key) {
            None => {
                self.log_entries.insert(key, (digest, previous_term));
            }
            Some((known_digest, known_previous_term)) => {
                if *known_digest != digest {
                    return Err(format!(
                        "log matching: node {node_id} holds entry {}@term {} with data digest \
                         {digest:#x}, another log had {known_digest:#x}",
                        entry.index, entry.term
                    ));
                }
                match (*known_previous_term, previous_term) {
                    (Some(known), Some(seen)) if known != seen => {
                        return Err(format!(
                            "log matching: node {node_id} holds entry {}@term {} after an entry \
                             of term {seen}, another log had it after term {known}",
                            entry.index, entry.term
                        ));
                    }
                    (None, Some(seen)) => *known_previous_term = Some(seen),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Committed entries never change; a new one extends the committed log by exactly one.
    fn check_committed(&mut self, node_id: u64, entry: &Entry, what: &str) -> Checked<()> {
        let digest = entry_digest(entry);
        let known = self.committed.len() as u64;
        if entry.index == 0 || entry.index > known + 1 {
            return Err(format!(
                "node {node_id} {what} entry {} but the committed log ends at {known}",
                entry.index
            ));
        }
        if entry.index <= known {
            let first = &self.committed[(entry.index - 1) as usize];
            if first.term != entry.term || first.digest != digest {
                return Err(format!(
                    "committed entry changed: node {node_id} {what} entry {}@term {} (digest \
                     {digest:#x}), committed before as term {} (digest {:#x})",
                    entry.index, entry.term, first.term, first.digest
                ));
            }
            return Ok(());
        }
        self.trace.u64(entry.index);
        self.trace.u64(entry.term);
        self.trace.u64(digest);
        self.committed.push(CommittedEntry {
            term: entry.term,
            digest,
            data_digest: data_digest(&entry.data),
        });
        // What the entry means to the state machine, by the shipping rule (a stale twin is a
        // no-op).
        let command = applied_command(entry);
        let hot_volume_id = self.model.volume_id(VOLUMES[0].0);
        let outcome = self.model.apply(entry.index, command);
        if outcome == ExpectedOutcome::Applied {
            if let Some((block, value)) = register_write(hot_volume_id, command) {
                self.versions
                    .entry(block)
                    .or_default()
                    .push((entry.index, value));
            }
        }
        self.expected_outcomes.push(outcome);
        Ok(())
    }

    fn check_leader(&mut self, node_id: u64, term: u64) -> Checked<()> {
        let leader = *self.leader_by_term.entry(term).or_insert(node_id);
        if leader != node_id {
            return Err(format!(
                "election safety: nodes {leader} and {node_id} are both leader of term {term}"
            ));
        }
        Ok(())
    }

    /// The value of hot block `block` after applying everything up to `index`.
    fn register_at(&self, block: u64, index: u64) -> (u64, u64) {
        self.versions
            .get(&block)
            .and_then(|versions| {
                versions
                    .iter()
                    .rev()
                    .find(|(version_index, _)| *version_index <= index)
                    .copied()
            })
            .unwrap_or((0, 0))
    }

    /// Per-block register linearizability over every completed operation (see the module
    /// doc). Returns the number of operations checked.
    fn check_registers(&self) -> Checked<u64> {
        let completed_step = |op: &Op| op.completed.as_ref().map(|(step, _)| *step);
        let mut checked = 0;
        for op in self.ops.values() {
            let Some((_, result)) = &op.completed else {
                continue;
            };
            checked += 1;
            match (&op.kind, result) {
                (OpKind::Write { block }, OpResult::Acknowledged { index }) => {
                    let landed = self
                        .versions
                        .get(block)
                        .is_some_and(|versions| versions.contains(&(*index, op.id)));
                    if !landed {
                        return Err(format!(
                            "register: write {} to block {block} was acknowledged at index \
                             {index}, where the committed log does not write it",
                            op.id
                        ));
                    }
                }
                (
                    OpKind::Read { block },
                    OpResult::Read {
                        value,
                        applied_index,
                    },
                ) => {
                    let (version_index, expected) = self.register_at(*block, *applied_index);
                    if *value != expected {
                        return Err(format!(
                            "register: read {} of block {block} at applied index \
                             {applied_index} saw value {value}; the log's last write to it at \
                             or below that index is {expected} (index {version_index})",
                            op.id
                        ));
                    }
                    // Every write acknowledged before the read was issued is visible.
                    for earlier in self.ops.values() {
                        let (
                            OpKind::Write { block: written },
                            Some((done, OpResult::Acknowledged { index })),
                        ) = (&earlier.kind, &earlier.completed)
                        else {
                            continue;
                        };
                        if written == block && *done < op.invoked_step && index > applied_index {
                            return Err(format!(
                                "register: stale read: read {} of block {block} issued at step \
                                 {} read at applied index {applied_index}, but write {} was \
                                 acknowledged at index {index} at step {done}, before it",
                                op.id, op.invoked_step, earlier.id
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        // No write lands after a write to its block acknowledged after the first one
        // completed (acknowledged or failed).
        for (block, versions) in &self.versions {
            for (landed_index, value) in versions {
                let Some(landed) = self.ops.get(value) else {
                    continue;
                };
                let Some(landed_done) = completed_step(landed) else {
                    continue;
                };
                for later in self.ops.values() {
                    let (
                        OpKind::Write { block: written },
                        Some((_, OpResult::Acknowledged { index })),
                    ) = (&later.kind, &later.completed)
                    else {
                        continue;
                    };
                    if written == block && later.invoked_step > landed_done && index < landed_index
                    {
                        return Err(format!(
                            "register: write {} to block {block}, completed at step \
                             {landed_done} ({:?}), landed at index {landed_index}, after write \
                             {} issued later and acknowledged at index {index}",
                            landed.id,
                            landed.completed.as_ref().map(|(_, result)| result),
                            later.id
                        ));
                    }
                }
            }
        }
        Ok(checked)
    }
}

// ---------------------------------------------------------------------------------------------
// One node
// ---------------------------------------------------------------------------------------------

type Core = RaftCore<Responder, Responder>;

/// A batch of committed entries in the storage side's mailbox, with its responders.
type ApplyBatch = (Vec<Entry>, Vec<(u64, Responder)>);

/// A running node: everything a process crash throws away.
struct LiveNode {
    /// `None` only within a step, while the Raft actor restarts.
    core: Option<Core>,
    counters: CoreCounters,
    log_store: RaftLogStore,
    db: Arc<rocksdb::DB>,
    machine: StateMachine,
    applied_index: Arc<AtomicU64>,
    applied_wanted: Arc<AtomicU64>,
    read_gate: ReadGate,
    /// The storage side's mailbox.
    apply_queue: VecDeque<ApplyBatch>,
    /// The WAL sync asked for and not yet returned.
    wal_sync: Option<u64>,
    /// The snapshot staged by the transport, waiting for the Ready that installs it.
    inbox: Option<(u64, u64, StagedSnapshot)>,
}

struct SimNode {
    id: u64,
    data_dir: PathBuf,
    /// raft-rs's election timeout for this node, fixed (see `RaftLimits`).
    election_ticks: usize,
    tick_phase: u64,
    /// This node's clock rate, in millionths of real time.
    clock_rate_ppm: u64,
    live: Option<LiveNode>,
    /// Whether the node should run: an initial voter, or a node added to the group (set
    /// when it is started to join, cleared when it is removed).
    member: bool,
    /// Whether the node bootstraps the group (an initial voter) or joins it empty.
    bootstraps: bool,
    /// Removed from the group and wiped. Its id is never added again: a member that still
    /// has the old node's progress (its removal committed but not yet applied there) would
    /// send a new, empty node a commit index beyond its log.
    retired: bool,
}

/// What the syncs reported on this thread made durable, for every node of the run.
#[derive(Default)]
struct DurableRecords {
    /// Per RocksDB directory: the newest write-ahead log file at the last sync, and its
    /// length then (all of it synced).
    wal: HashMap<PathBuf, (u64, u64)>,
    /// Per file (device, inode): its content at its last sync. By inode, because a staged
    /// snapshot image is synced and then renamed into place.
    files: HashMap<(u64, u64), Vec<u8>>,
}

/// What one power cut took.
struct PowerCut {
    wal_bytes_lost: u64,
    sectors_rolled_back: u64,
}

/// The number of a RocksDB write-ahead log file (`000123.log`).
fn wal_number(path: &Path) -> Option<u64> {
    if path.extension()? != "log" {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

/// The newest write-ahead log of the RocksDB database in `directory`: its number, path, length.
fn newest_wal(directory: &Path) -> std::io::Result<Option<(u64, PathBuf, u64)>> {
    let mut newest: Option<(u64, PathBuf, u64)> = None;
    for entry in std::fs::read_dir(directory)? {
        let path = entry?.path();
        let Some(number) = wal_number(&path) else {
            continue;
        };
        if newest.as_ref().map_or(true, |(seen, ..)| number > *seen) {
            let length = std::fs::metadata(&path)?.len();
            newest = Some((number, path, length));
        }
    }
    Ok(newest)
}

fn file_identity(metadata: &std::fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

impl DurableRecords {
    /// Records from now on what every sync of this thread makes durable.
    fn watch() -> Rc<RefCell<DurableRecords>> {
        let records = Rc::new(RefCell::new(DurableRecords::default()));
        let watched = records.clone();
        watch_this_thread(Some(Rc::new(move |synced: Synced<'_>| {
            let mut records = watched.borrow_mut();
            // A sync that just succeeded on a directory the simulation owns: reading it back
            // fails only if the machine is broken.
            match synced {
                Synced::Wal(directory) => {
                    if let Some((number, _, length)) =
                        newest_wal(directory).expect("list the RocksDB directory")
                    {
                        records
                            .wal
                            .insert(directory.to_path_buf(), (number, length));
                    }
                }
                Synced::File(path) => {
                    let metadata = std::fs::metadata(path).expect("stat a synced file");
                    let content = std::fs::read(path).expect("read a synced file");
                    records.files.insert(file_identity(&metadata), content);
                }
            }
        })));
        records
    }

    /// The disk of the node in `data_dir` (closed: its process is gone) keeps only part of
    /// what was not synced: the newest WAL is cut at a random length no shorter than its
    /// synced length (a WAL created since the last sync may lose everything), and each sector
    /// of a synced file that differs from its synced content goes back to it at random. A
    /// file never synced is left as it is (as are older WALs: RocksDB syncs a WAL before it
    /// flushes the memtable written to it).
    fn cut_power(&self, data_dir: &Path, rng: &mut SplitMix64) -> std::io::Result<PowerCut> {
        let mut cut = PowerCut {
            wal_bytes_lost: 0,
            sectors_rolled_back: 0,
        };
        let rocksdb_dir = data_dir.join(ROCKSDB_DIRECTORY_NAME);
        if let Some((number, path, length)) = newest_wal(&rocksdb_dir)? {
            let synced_length = match self.wal.get(&rocksdb_dir) {
                Some(&(synced_number, synced_length)) if synced_number == number => {
                    synced_length.min(length)
                }
                _ => 0,
            };
            let kept = rng.between(synced_length, length);
            if kept < length {
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                file.set_len(kept)?;
                cut.wal_bytes_lost = length - kept;
            }
        }
        let mut directories = vec![data_dir.to_path_buf()];
        while let Some(directory) = directories.pop() {
            for entry in std::fs::read_dir(&directory)? {
                let entry = entry?;
                let path = entry.path();
                let metadata = entry.metadata()?;
                if metadata.is_dir() {
                    if path != rocksdb_dir {
                        directories.push(path);
                    }
                    continue;
                }
                let Some(synced) = self.files.get(&file_identity(&metadata)) else {
                    continue;
                };
                let mut content = std::fs::read(&path)?;
                let mut changed = content.len() != synced.len();
                content.resize(synced.len(), 0);
                for (sector, old) in content.chunks_mut(512).zip(synced.chunks(512)) {
                    if sector != old && rng.chance(1, 2) {
                        sector.copy_from_slice(old);
                        cut.sectors_rolled_back += 1;
                        changed = true;
                    }
                }
                if changed {
                    std::fs::write(&path, &content)?;
                }
            }
        }
        Ok(cut)
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        watch_this_thread(None);
    }
}

fn small_storage_options() -> StorageOptions {
    StorageOptions {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        max_background_jobs: 1,
    }
}

fn storage_failure(node_id: u64, what: &str, error: impl std::fmt::Display) -> String {
    format!("node {node_id}: {what}: {error}")
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl SimNode {
    fn raft_config(&self, chaos: &Chaos, read_lease_ms: u64) -> RaftConfig {
        RaftConfig {
            tick_interval_ms: TICK_INTERVAL_STEPS * STEP_MS,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: HEARTBEAT_TICKS,
            proposals_pending_max: 256,
            mailbox_capacity: 1024,
            log_keep_entries: chaos.log_keep_entries,
            log_lag_entries_max: 64,
            log_lag_bytes_max: 64 * 1024,
            read_lease_ms,
        }
    }

    fn now(&self, step: u64) -> LeaseInstant {
        // Every clock starts an hour after boot, so that nothing is near zero.
        let micros = step * STEP_MS * 1_000 * self.clock_rate_ppm / 1_000_000;
        LeaseInstant::from_boot(Duration::from_secs(3_600) + Duration::from_micros(micros))
    }

    /// Opens the node from its directory the way a server starts: RocksDB, bootstrap of a new
    /// group, the state machine at its durable applied index, then the core.
    fn start(&mut self, voters: &[u64], config: RaftConfig, step: u64) -> Checked<()> {
        // A node that joins starts with no voters, as a server started to join does: the
        // leader's snapshot brings the configuration.
        let id = self.id;
        let db = open_db(&self.data_dir, &small_storage_options())
            .map_err(|error| storage_failure(id, "open RocksDB", error))?;
        let log_store = RaftLogStore::open(db.clone(), GROUP_ID)
            .map_err(|error| storage_failure(id, "open the log", error))?;
        if !log_store.is_bootstrapped() && self.bootstraps {
            log_store
                .bootstrap(
                    ConfState {
                        voters: voters.to_vec(),
                        ..Default::default()
                    },
                    &[],
                )
                .map_err(|error| storage_failure(id, "bootstrap", error))?;
        }
        let machine = StateMachine::open(
            db.clone(),
            &self.data_dir.join(IMAGES_DIRECTORY_NAME),
            GROUP_ID,
        )
        .map_err(|error| storage_failure(id, "open the state machine", error))?;
        let applied_index = Arc::new(AtomicU64::new(machine.applied_index()));
        log_store.set_applied_index_source(applied_index.clone());
        let mut live = LiveNode {
            core: None,
            counters: CoreCounters::default(),
            log_store,
            db,
            machine,
            applied_index,
            applied_wanted: Arc::new(AtomicU64::new(u64::MAX)),
            read_gate: ReadGate::default(),
            apply_queue: VecDeque::new(),
            wal_sync: None,
            inbox: None,
        };
        self.build_core(&mut live, config, step);
        self.live = Some(live);
        Ok(())
    }

    /// Builds the core from the log, as the Raft actor does at start and on every restart.
    fn build_core(&mut self, live: &mut LiveNode, config: RaftConfig, step: u64) {
        let params = CoreParams {
            group_id: GROUP_ID,
            node_id: self.id,
            config,
            limits: RaftLimits {
                // Small limits, so that appends and committed batches get split.
                max_size_per_msg: 8 * 1024,
                max_inflight_msgs: 16,
                max_committed_size_per_ready: 16 * 1024,
                election_tick_range: Some((self.election_ticks, self.election_ticks + 1)),
            },
            request_timeout: Duration::from_millis(REQUEST_TIMEOUT_STEPS * STEP_MS),
            log_store: live.log_store.clone(),
            applied_index: live.applied_index.clone(),
            applied_wanted: live.applied_wanted.clone(),
            read_gate: live.read_gate.clone(),
            // Apart for every core any node builds in a run.
            logger: discard_logger(),
        };
        live.wal_sync = None;
        live.core = Some(RaftCore::new(params, live.counters, self.now(step)));
    }
}

impl LiveNode {
    fn core(&self) -> &Core {
        self.core
            .as_ref()
            .expect("the core is rebuilt within the step")
    }

    fn core_mut(&mut self) -> &mut Core {
        self.core
            .as_mut()
            .expect("the core is rebuilt within the step")
    }

    fn role(&self) -> StateRole {
        self.core().raw_node().raft.state
    }

    /// Whether this node's configuration names `id` (voter, learner or outgoing voter).
    fn configuration_names(&self, id: u64) -> bool {
        let conf = self.core().raw_node().raft.prs().conf().to_conf_state();
        conf.voters.contains(&id)
            || conf.learners.contains(&id)
            || conf.voters_outgoing.contains(&id)
            || conf.learners_next.contains(&id)
    }

    fn hot_reader(&self, history: &History) -> Option<VolumeReader> {
        self.machine.reader(history.model.volume_id(VOLUMES[0].0)?)
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------------------------

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunSummary {
    trace_hash: u64,
    committed_entries: u64,
    operations: u64,
    acknowledged: u64,
    reads: u64,
    failed: u64,
    terms_with_leader: u64,
    crashes: u64,
    power_cuts: u64,
    raft_restarts: u64,
    storage_restarts: u64,
    snapshots_installed: u64,
    membership_changes: u64,
    messages_sent: u64,
    messages_dropped: u64,
}

/// The proxy's attachment of the hot volume, as `raftblk proxy` keeps it: writes carry its
/// epoch; when it loses a connection (the server died, or an answer took longer than its reply
/// timeout) it attaches again, so that requests still in flight on the old connection can never
/// be applied after the ones it reissues, and reissues them with the new epoch.
#[derive(Default)]
struct SimProxy {
    epoch: u64,
    attached: bool,
    /// The attach request in flight.
    attach_op: Option<u64>,
    attach_ids: u64,
}

/// A membership change an operator asks for, planned with the control API's own functions and
/// reissued until its deadline.
#[derive(Clone, Debug)]
enum MembershipKind {
    AddLearner(u64),
    Promote { id: u64, replace: Option<u64> },
    Remove(u64),
}

struct MembershipOp {
    op: u64,
    kind: MembershipKind,
    attempt: u64,
    attempt_node: Option<u64>,
    retry_at_step: Option<u64>,
    deadline_step: u64,
}

struct Simulation {
    options: SimulationOptions,
    rng: SplitMix64,
    chaos: Chaos,
    read_lease_ms: u64,
    network: Network,
    nodes: Vec<SimNode>,
    history: History,
    step: u64,
    next_op_id: u64,
    /// Per client: the operation in flight.
    clients: Vec<Option<u64>>,
    /// The proxy all clients go through: its attachment of the hot volume.
    proxy: SimProxy,
    /// The membership change in progress.
    membership: Option<MembershipOp>,
    membership_changes: u64,
    /// Nodes whose removal was acknowledged (with the index), stopped and wiped once the
    /// leader's configuration no longer names them.
    retiring: BTreeMap<u64, u64>,
    crashes: u64,
    power_cuts: u64,
    raft_restarts: u64,
    storage_restarts: u64,
    snapshots_installed: u64,
    corruption_injected: bool,
    /// What the syncs of this thread made durable: the floor of a power cut.
    durable: Rc<RefCell<DurableRecords>>,
    recent_events: VecDeque<String>,
    /// Keeps the node directories alive for the run.
    _root: tempfile::TempDir,
}

fn simulation_root() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut builder = tempfile::Builder::new();
        builder.prefix("raftblk-sim-");
        builder
    };
    if shm.is_dir() {
        if let Ok(directory) = builder.tempdir_in(shm) {
            return directory;
        }
    }
    builder
        .tempdir()
        .expect("a temporary directory for the simulated nodes")
}

impl Simulation {
    fn new(options: SimulationOptions) -> Checked<Self> {
        let mut rng = SplitMix64::new(options.seed);
        let chaos = Chaos::draw(&mut rng, options.crash_heavy);
        // One seed in three turns lease reads on, as long as the configuration allows.
        let read_lease_ms = if rng.chance(1, 3) {
            read_lease_ms_max(ELECTION_TICKS, TICK_INTERVAL_STEPS * STEP_MS)
        } else {
            0
        };
        let network = Network {
            rng: rng.split(),
            in_flight: BTreeMap::new(),
            next_sequence: 0,
            cut_links: BTreeSet::new(),
            messages_sent: 0,
            messages_dropped: 0,
        };
        let root = simulation_root();
        let durable = DurableRecords::watch();
        // Distinct election timeouts per node, from the seed: 10..=19 ticks.
        let mut election_ticks: Vec<usize> = (ELECTION_TICKS..ELECTION_TICKS + 10).collect();
        let mut nodes = Vec::new();
        for id in 1..=options.node_count + SPARE_NODES {
            let pick = rng.below(election_ticks.len() as u64) as usize;
            let clock_rate_ppm = if read_lease_ms > 0 {
                rng.between(950_000, 1_050_000)
            } else {
                1_000_000
            };
            nodes.push(SimNode {
                id,
                data_dir: root.path().join(format!("node-{id}")),
                election_ticks: election_ticks.swap_remove(pick),
                tick_phase: rng.below(TICK_INTERVAL_STEPS),
                clock_rate_ppm,
                live: None,
                member: id <= options.node_count,
                bootstraps: id <= options.node_count,
                retired: false,
            });
        }
        let mut simulation = Simulation {
            options,
            rng,
            chaos,
            read_lease_ms,
            network,
            nodes,
            history: History::default(),
            step: 0,
            next_op_id: 1,
            clients: vec![None; CLIENTS as usize],
            proxy: SimProxy::default(),
            membership: None,
            membership_changes: 0,
            retiring: BTreeMap::new(),
            crashes: 0,
            power_cuts: 0,
            raft_restarts: 0,
            storage_restarts: 0,
            snapshots_installed: 0,
            corruption_injected: false,
            durable,
            recent_events: VecDeque::new(),
            _root: root,
        };
        for index in 0..simulation.nodes.len() {
            if simulation.nodes[index].member {
                simulation.start_node(index)?;
            }
        }
        let election_ticks: Vec<usize> = simulation
            .nodes
            .iter()
            .map(|node| node.election_ticks)
            .collect();
        let lease = simulation.read_lease_ms;
        simulation.event(|| format!("start: election ticks {election_ticks:?}, lease {lease} ms"));
        Ok(simulation)
    }

    /// The voters the group is bootstrapped with.
    fn voters(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|node| node.bootstraps)
            .map(|node| node.id)
            .collect()
    }

    fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    fn start_node(&mut self, index: usize) -> Checked<()> {
        let voters = self.voters();
        let config = self.nodes[index].raft_config(&self.chaos, self.read_lease_ms);
        let step = self.step;
        self.nodes[index].start(&voters, config, step)?;
        self.run_effects(index)
    }

    fn event(&mut self, describe: impl FnOnce() -> String) {
        if !self.options.trace {
            return;
        }
        if self.recent_events.len() == TRACE_EVENTS_MAX {
            self.recent_events.pop_front();
        }
        let text = format!("step {:>6}: {}", self.step, describe());
        self.recent_events.push_back(text);
    }

    fn run(&mut self) -> Checked<RunSummary> {
        while self.step < self.options.steps {
            self.chaos_events()?;
            self.client_requests()?;
            self.one_step()?;
        }
        self.heal_and_check_liveness()?;
        self.check_final_state()?;
        self.history.check_registers()?;
        Ok(self.summary())
    }

    fn summary(&self) -> RunSummary {
        let count = |wanted: fn(&OpResult) -> bool| {
            self.history
                .ops
                .values()
                .filter(|op| {
                    op.completed
                        .as_ref()
                        .is_some_and(|(_, result)| wanted(result))
                })
                .count() as u64
        };
        RunSummary {
            trace_hash: self.history.trace.0,
            committed_entries: self.history.committed.len() as u64,
            operations: self.history.ops.len() as u64,
            acknowledged: count(|result| matches!(result, OpResult::Acknowledged { .. })),
            reads: count(|result| matches!(result, OpResult::Read { .. })),
            failed: count(|result| matches!(result, OpResult::Failed)),
            terms_with_leader: self.history.leader_by_term.len() as u64,
            crashes: self.crashes,
            power_cuts: self.power_cuts,
            raft_restarts: self.raft_restarts,
            storage_restarts: self.storage_restarts,
            snapshots_installed: self.snapshots_installed,
            membership_changes: self.membership_changes,
            messages_sent: self.network.messages_sent,
            messages_dropped: self.network.messages_dropped,
        }
    }

    fn live_mut(&mut self, index: usize) -> Option<&mut LiveNode> {
        self.nodes[index].live.as_mut()
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|node| node.id == id)
    }

    /// One step of virtual time: deliver, tick, sync, apply, checkpoint, process every Ready,
    /// check.
    fn one_step(&mut self) -> Checked<()> {
        let now_step = self.step;
        let (due, lost) = self.network.due(now_step);
        for packet in lost {
            self.snapshot_transfer_ended(&packet.message, false)?;
        }
        for packet in due {
            self.deliver(packet)?;
        }
        for index in 0..self.nodes.len() {
            if self.nodes[index].live.is_none() {
                continue;
            }
            if now_step % TICK_INTERVAL_STEPS == self.nodes[index].tick_phase {
                let now = self.nodes[index].now(now_step);
                self.with_core(index, |core| core.tick(now))?;
            }
            self.process_ready(index)?;
            let sync_running = self.nodes[index]
                .live
                .as_ref()
                .is_some_and(|live| live.wal_sync.is_some());
            if sync_running
                && self
                    .rng
                    .chance(self.chaos.wal_sync_done_per_million, 1_000_000)
            {
                self.finish_wal_sync(index)?;
                self.process_ready(index)?;
            }
            if self.rng.chance(self.chaos.apply_per_million, 1_000_000) {
                self.apply_some(index)?;
                self.process_ready(index)?;
            }
            if self
                .rng
                .chance(self.chaos.checkpoint_per_million, 1_000_000)
            {
                self.checkpoint(index)?;
            }
        }
        self.retry_due_requests()?;
        self.check_leaders()?;
        if now_step % LOG_SCAN_INTERVAL_STEPS == LOG_SCAN_INTERVAL_STEPS - 1 {
            self.scan_logs()?;
        }
        self.step += 1;
        Ok(())
    }

    /// Runs `body` on the node's core and carries out its effects. A panic is a failure of
    /// the run (only `process_ready` may ask for a restart, see there).
    fn with_core(&mut self, index: usize, body: impl FnOnce(&mut Core)) -> Checked<()> {
        let Some(live) = self.live_mut(index) else {
            return Ok(());
        };
        body(live.core_mut());
        self.run_effects(index)
    }

    /// Carries out every effect the core queued, as the Raft actor does.
    fn run_effects(&mut self, index: usize) -> Checked<()> {
        loop {
            let Some(live) = self.live_mut(index) else {
                return Ok(());
            };
            let effects = live.core_mut().take_effects();
            if effects.is_empty() {
                return Ok(());
            }
            for effect in effects {
                self.carry_out(index, effect)?;
            }
        }
    }

    fn carry_out(&mut self, index: usize, effect: Effect<Responder, Responder>) -> Checked<()> {
        let node_id = self.nodes[index].id;
        match effect {
            Effect::Send(messages) => {
                for message in messages {
                    self.send(index, message)?;
                }
            }
            Effect::Apply {
                entries,
                responders,
            } => {
                for entry in &entries {
                    self.history
                        .check_committed(node_id, entry, "was handed committed")?;
                }
                if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
                    let (first_index, last_index) = (first.index, last.index);
                    self.event(|| format!("node {node_id} committed {first_index}..={last_index}"));
                }
                if let Some(live) = self.live_mut(index) {
                    live.apply_queue.push_back((entries, responders));
                }
            }
            Effect::ProposalFailed(responder, error) => {
                self.attempt_failed(responder.op, responder.attempt, &error);
            }
            Effect::ReadAnswered(responder, result) => {
                self.read_answered(index, responder, result)?
            }
            Effect::SyncWal { number, inline } => {
                if let Some(live) = self.live_mut(index) {
                    live.wal_sync = Some(number);
                }
                if inline {
                    self.finish_wal_sync(index)?;
                }
            }
            Effect::MembersChanged(_) => {}
        }
        Ok(())
    }

    /// Sends one message; a snapshot goes the way the peer transport takes it: the receiver
    /// stages the sender's state first, and only a staged snapshot travels.
    fn send(&mut self, index: usize, message: Message) -> Checked<()> {
        if self.options.trace {
            let description = describe_message(&message);
            self.event(|| format!("send {description}"));
        }
        if message.get_msg_type() != MessageType::MsgSnapshot {
            self.network.send(
                self.step,
                &self.chaos,
                Packet {
                    message,
                    staged: None,
                },
            );
            return Ok(());
        }
        let staged = match self.stage_snapshot(index, &message) {
            Ok(staged) => staged,
            Err(reason) => {
                self.event(|| format!("snapshot transfer to {} failed: {reason}", message.to));
                return self.snapshot_transfer_ended(&message, false);
            }
        };
        let for_report = message.clone();
        let sent = self.network.send(
            self.step,
            &self.chaos,
            Packet {
                message,
                staged: Some(staged),
            },
        );
        if !sent {
            self.snapshot_transfer_ended(&for_report, false)?;
        }
        Ok(())
    }

    /// Streams the sender's state machine into a staging area on the receiver, chunk by
    /// chunk, through the shipping source and staging.
    fn stage_snapshot(
        &mut self,
        index: usize,
        message: &Message,
    ) -> Result<StagedSnapshot, String> {
        let to_index = self
            .index_of(message.to)
            .ok_or_else(|| format!("no node {}", message.to))?;
        if self.nodes[to_index].live.is_none() {
            return Err("the receiver is down".into());
        }
        let fail_at_chunk = self
            .rng
            .chance(self.chaos.snapshot_failure_per_million, 1_000_000)
            .then(|| self.rng.below(4));
        let images_dir = self.nodes[to_index].data_dir.join(IMAGES_DIRECTORY_NAME);
        let live = self.nodes[index]
            .live
            .as_ref()
            .ok_or("the sender is down")?;
        let mut source = live
            .machine
            .snapshot_source()
            .map_err(|error| error.to_string())?;
        let metadata = message.get_snapshot().get_metadata();
        let mut staging = SnapshotStaging::begin(&images_dir, GROUP_ID, metadata.index)
            .map_err(|error| error.to_string())?;
        let mut chunks = 0u64;
        while let Some(chunk) = source.next_chunk(4096).map_err(|error| error.to_string())? {
            if fail_at_chunk == Some(chunks) {
                return Err(format!("the connection broke after {chunks} chunks"));
            }
            staging.stage(&chunk).map_err(|error| error.to_string())?;
            chunks += 1;
        }
        staging.finish().map_err(|error| error.to_string())
    }

    /// The sender's transport reports how a snapshot transfer ended.
    fn snapshot_transfer_ended(&mut self, message: &Message, finished: bool) -> Checked<()> {
        if message.get_msg_type() != MessageType::MsgSnapshot {
            return Ok(());
        }
        let Some(from_index) = self.index_of(message.from) else {
            return Ok(());
        };
        let to = message.to;
        self.with_core(from_index, |core| core.report_snapshot(to, finished))
    }

    fn deliver(&mut self, packet: Packet) -> Checked<()> {
        let Packet { message, staged } = packet;
        self.history.trace.u64(self.step);
        self.history.trace.u64(message.from);
        self.history.trace.u64(message.to);
        self.history.trace.u64(message.get_msg_type() as u64);
        self.history.trace.u64(message.term);
        self.history.trace.u64(message.index);
        if self.options.trace {
            let description = describe_message(&message);
            self.event(|| format!("deliver {description}"));
        }
        let Some(index) = self.index_of(message.to) else {
            return Ok(());
        };
        if self.nodes[index].live.is_none() {
            return self.snapshot_transfer_ended(&message, false);
        }
        if let Some(staged) = staged {
            let metadata = message.get_snapshot().get_metadata();
            let slot = Some((metadata.index, metadata.term, staged));
            if let Some(live) = self.live_mut(index) {
                live.inbox = slot;
            }
            self.snapshot_transfer_ended(&message, true)?;
        }
        let now = self.nodes[index].now(self.step);
        self.with_core(index, |core| core.step(message, now))
    }

    /// Drives the node's Readies as the Raft actor does, installing snapshots through the
    /// state machine.
    fn process_ready(&mut self, index: usize) -> Checked<()> {
        for _ in 0..READY_ROUNDS_MAX {
            let Some(live) = self.nodes[index].live.as_mut() else {
                return Ok(());
            };
            if !live.core().wants_ready() {
                return Ok(());
            }
            let now = self.nodes[index].now(self.step);
            let node_id = self.nodes[index].id;
            let mut installed = None;
            let held;
            {
                let live = self.nodes[index].live.as_mut().expect("checked above");
                let LiveNode {
                    core,
                    machine,
                    log_store,
                    inbox,
                    applied_index,
                    ..
                } = live;
                let core = core.as_mut().expect("the core is rebuilt within the step");
                let mut install = |snapshot: &Snapshot| {
                    install_snapshot(machine, log_store, inbox, applied_index, snapshot)
                        .inspect(|_| installed = Some(snapshot.get_metadata().index))
                };
                let result =
                    catch_unwind(AssertUnwindSafe(|| core.process_ready(now, &mut install)));
                match result {
                    Ok(progress) => held = progress == ReadyProgress::WriteHeld,
                    Err(panic) => {
                        let message = panic_message(&*panic);
                        if !message.starts_with(SNAPSHOT_INSTALL_FAILED) {
                            resume_unwind(panic);
                        }
                        self.event(|| format!("node {node_id} core panicked: {message}"));
                        // The storage side reopens its state machine, as the storage actor
                        // does after a failed install, and the Raft actor restarts.
                        self.restart_storage(index)?;
                        self.restart_raft(index)?;
                        continue;
                    }
                }
            }
            if let Some(snapshot_index) = installed {
                self.snapshots_installed += 1;
                self.event(|| format!("node {node_id} installed a snapshot at {snapshot_index}"));
            }
            self.check_persisted_entries(index)?;
            self.run_effects(index)?;
            if held {
                self.with_core(index, |core| core.write_held_ready())?;
            }
        }
        Ok(())
    }

    /// Log Matching over the entries the node's log holds after a Ready: its newest ones.
    fn check_persisted_entries(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let Some(live) = self.nodes[index].live.as_ref() else {
            return Ok(());
        };
        let store = &live.log_store;
        let last_index = store.last_index().unwrap_or(0);
        let first_index = store
            .first_index()
            .unwrap_or(1)
            .max(last_index.saturating_sub(7));
        if last_index < first_index {
            return Ok(());
        }
        let entries = store
            .entries(
                first_index,
                last_index + 1,
                None,
                GetEntriesContext::empty(false),
            )
            .map_err(|error| storage_failure(node_id, "read the newest entries", error))?;
        let mut previous_term = store.term(first_index - 1).ok();
        for entry in &entries {
            self.history
                .check_log_entry(node_id, entry, previous_term)?;
            previous_term = Some(entry.term);
        }
        Ok(())
    }

    /// The WAL sync in flight returns: the core reports its Readies persisted.
    fn finish_wal_sync(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let sync_skipped = self.options.fault == Some(Fault::WalSyncSkipped);
        let Some(live) = self.live_mut(index) else {
            return Ok(());
        };
        let Some(number) = live.wal_sync.take() else {
            return Ok(());
        };
        if !sync_skipped {
            live.log_store
                .sync_wal()
                .map_err(|error| storage_failure(node_id, "sync the WAL", error))?;
        }
        self.event(|| format!("node {node_id} persisted Readies up to {number}"));
        self.with_core(index, |core| core.wal_synced(number))
    }

    /// The storage side takes a random number of batches from its mailbox and applies them
    /// through the storage actor's own path, publishes its applied index, and wakes the core
    /// when it reached the index the core waits for.
    fn apply_some(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let Some(live) = self.nodes[index].live.as_mut() else {
            return Ok(());
        };
        if live.apply_queue.is_empty() {
            return Ok(());
        }
        let count = self.rng.between(1, live.apply_queue.len() as u64) as usize;
        let mut replies = Vec::new();
        for _ in 0..count {
            let Some((entries, responders)) = live.apply_queue.pop_front() else {
                break;
            };
            let indexed: Vec<(u64, (Responder, u64))> = responders
                .into_iter()
                .map(|(entry_index, responder)| (entry_index, (responder, entry_index)))
                .collect();
            let applied = apply_committed(&mut live.machine, &live.log_store, entries, indexed)
                .map_err(|(error, _)| storage_failure(node_id, "apply", error))?;
            replies.extend(applied.replies);
        }
        let applied_index = live.machine.applied_index();
        live.applied_index.store(applied_index, Ordering::SeqCst);
        let wake = applied_index >= live.applied_wanted.load(Ordering::SeqCst);
        for ((responder, entry_index), answer) in replies {
            match answer {
                Ok(outcome) => {
                    let expected = self.history.expected_outcomes[(entry_index - 1) as usize];
                    if outcome_kind(&outcome) != Some(expected) {
                        return Err(format!(
                            "state machine safety: node {node_id} applied entry {entry_index} \
                             with outcome {outcome:?}, the model expects {expected:?}"
                        ));
                    }
                    if self.proxy.attach_op == Some(responder.op)
                        && self.is_current(responder.op, responder.attempt)
                    {
                        match &outcome {
                            ApplyOutcome::Attached(info) => {
                                self.proxy.epoch = info
                                    .attachment
                                    .as_ref()
                                    .map_or(0, |attachment| attachment.epoch);
                            }
                            refused => {
                                return Err(format!(
                                    "the proxy's attach at {entry_index} was refused: {refused:?}"
                                ))
                            }
                        }
                    }
                    self.attempt_acknowledged(responder, entry_index);
                }
                Err(error) => self.attempt_failed(responder.op, responder.attempt, &error),
            }
        }
        self.history.trace.u64(node_id);
        self.history.trace.u64(applied_index);
        self.event(|| format!("node {node_id} applied up to {applied_index}"));
        if wake {
            self.with_core(index, |core| core.applied_published())?;
        }
        Ok(())
    }

    /// A checkpoint (`make_durable`), then the core compacts by its own policy.
    fn checkpoint(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let Some(live) = self.live_mut(index) else {
            return Ok(());
        };
        let durable_index = live
            .machine
            .make_durable()
            .map_err(|error| storage_failure(node_id, "make_durable", error))?;
        self.with_core(index, |core| core.durable_applied(durable_index))
    }

    fn check_leaders(&mut self) -> Checked<()> {
        for node in &self.nodes {
            if let Some(live) = &node.live {
                let raft = &live.core().raw_node().raft;
                if raft.state == StateRole::Leader {
                    self.history.check_leader(node.id, raft.term)?;
                }
            }
        }
        Ok(())
    }

    /// Reads every running node's whole log back from RocksDB: Log Matching over the stored
    /// entries, and every entry at or below the node's commit index equal to the committed log.
    fn scan_logs(&mut self) -> Checked<()> {
        for index in 0..self.nodes.len() {
            let node_id = self.nodes[index].id;
            let Some(live) = self.nodes[index].live.as_ref() else {
                continue;
            };
            // Unpersisted entries would make the stored log and the commit index disagree.
            if live.core().raw_node().has_ready() || live.wal_sync.is_some() {
                continue;
            }
            let store = &live.log_store;
            let first_index = store.first_index().unwrap_or(1);
            let last_index = store.last_index().unwrap_or(0);
            let entries = store
                .entries(
                    first_index,
                    last_index + 1,
                    None,
                    GetEntriesContext::empty(false),
                )
                .map_err(|error| storage_failure(node_id, "read the log back", error))?;
            if entries.len() as u64 != (last_index + 1).saturating_sub(first_index) {
                return Err(format!(
                    "node {node_id}: log {first_index}..={last_index} read back {} entries",
                    entries.len()
                ));
            }
            let commit_index = live.core().raw_node().raft.raft_log.committed;
            let mut previous_term = store.term(first_index - 1).ok();
            for (position, entry) in entries.iter().enumerate() {
                if entry.index != first_index + position as u64 {
                    return Err(format!(
                        "node {node_id}: entry at position {position} of the log has index {}",
                        entry.index
                    ));
                }
                self.history
                    .check_log_entry(node_id, entry, previous_term)?;
                if entry.index <= commit_index {
                    self.history
                        .check_committed(node_id, entry, "stores as committed")?;
                }
                previous_term = Some(entry.term);
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // The world's doings
    // -----------------------------------------------------------------------------------------

    fn chaos_events(&mut self) -> Checked<()> {
        let node_count = self.nodes.len() as u64;
        if self.rng.chance(self.chaos.crash_per_million, 1_000_000) {
            let index = self.rng.below(node_count) as usize;
            if self.rng.chance(self.chaos.power_cut_percent, 100) {
                self.power_cut(&[index])?;
            } else {
                self.crash(index)?;
            }
        }
        if self.rng.chance(self.chaos.blackout_per_million, 1_000_000) {
            let all: Vec<usize> = (0..self.nodes.len()).collect();
            self.power_cut(&all)?;
        }
        if self
            .rng
            .chance(self.chaos.raft_restart_per_million, 1_000_000)
        {
            let index = self.rng.below(node_count) as usize;
            self.restart_raft(index)?;
        }
        if self
            .rng
            .chance(self.chaos.storage_restart_per_million, 1_000_000)
        {
            let index = self.rng.below(node_count) as usize;
            self.restart_storage(index)?;
        }
        if self.rng.chance(self.chaos.transfer_per_million, 1_000_000) {
            self.transfer_leadership()?;
        }
        if self
            .rng
            .chance(self.chaos.membership_per_million, 1_000_000)
        {
            self.begin_membership_change()?;
        }
        for index in 0..self.nodes.len() {
            if self.nodes[index].live.is_none()
                && self.nodes[index].member
                && self.rng.chance(self.chaos.restart_per_million, 1_000_000)
            {
                let node_id = self.nodes[index].id;
                self.start_node(index)?;
                self.event(|| format!("node {node_id} restarted"));
            }
        }
        if self.rng.chance(self.chaos.partition_per_million, 1_000_000) {
            self.partition();
        }
        if !self.network.cut_links.is_empty()
            && self.rng.chance(self.chaos.heal_per_million, 1_000_000)
        {
            self.network.cut_links.clear();
            self.event(|| "network healed".to_string());
        }
        if self.options.fault == Some(Fault::CorruptNewestLogEntry)
            && !self.corruption_injected
            && self.step >= self.options.steps / 2
        {
            self.corrupt_newest_log_entry()?;
        }
        Ok(())
    }

    /// The process dies: the core, the state machine, the mailbox, every RocksDB handle (the
    /// database closes when the last one is dropped). Requests in flight there get no answer;
    /// their clients reissue them.
    fn crash(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let Some(live) = self.nodes[index].live.take() else {
            return Ok(());
        };
        if self.options.fault == Some(Fault::AppendsNotDurable) {
            lose_entries_above_durable_applied_index(node_id, &live)?;
        }
        drop(live);
        self.crashes += 1;
        self.requests_lost_at(node_id);
        self.event(|| format!("node {node_id} crashed"));
        Ok(())
    }

    /// The nodes lose power: each crashes, then its disk loses what was not synced (see the
    /// module doc).
    fn power_cut(&mut self, indexes: &[usize]) -> Checked<()> {
        for &index in indexes {
            if self.nodes[index].live.is_none() {
                continue;
            }
            let node_id = self.nodes[index].id;
            self.crash(index)?;
            let cut = {
                let durable = self.durable.borrow();
                durable.cut_power(&self.nodes[index].data_dir, &mut self.rng)
            }
            .map_err(|error| storage_failure(node_id, "cut the power", error))?;
            self.power_cuts += 1;
            self.history.trace.u64(cut.wal_bytes_lost);
            self.history.trace.u64(cut.sectors_rolled_back);
            self.event(|| {
                format!(
                    "node {node_id} lost power: {} bytes of its WAL and {} image sectors lost",
                    cut.wal_bytes_lost, cut.sectors_rolled_back
                )
            });
        }
        Ok(())
    }

    /// The Raft actor restarts alone: its core is rebuilt from RocksDB; the responders it held
    /// are dropped (their callers retry); the storage side and its mailbox live on.
    fn restart_raft(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let config = self.nodes[index].raft_config(&self.chaos, self.read_lease_ms);
        let step = self.step;
        let Some(mut live) = self.nodes[index].live.take() else {
            return Ok(());
        };
        if let Some(core) = live.core.take() {
            live.counters = core.counters();
        }
        self.nodes[index].build_core(&mut live, config, step);
        self.nodes[index].live = Some(live);
        self.raft_restarts += 1;
        self.event(|| format!("node {node_id} Raft actor restarted"));
        self.run_effects(index)?;
        self.requests_reissued_at(index)
    }

    /// The storage actor restarts alone: its state machine is dropped (its readers retired)
    /// and reopened from durable state; the core hands it again what it lost.
    fn restart_storage(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let images_dir = self.nodes[index].data_dir.join(IMAGES_DIRECTORY_NAME);
        let Some(live) = self.live_mut(index) else {
            return Ok(());
        };
        live.machine.retire_readers();
        let machine = StateMachine::open(live.db.clone(), &images_dir, GROUP_ID)
            .map_err(|error| storage_failure(node_id, "reopen the state machine", error))?;
        live.machine = machine;
        let applied_index = live.machine.applied_index();
        live.applied_index.store(applied_index, Ordering::SeqCst);
        self.storage_restarts += 1;
        self.event(|| format!("node {node_id} storage actor restarted at {applied_index}"));
        self.with_core(index, |core| core.storage_started(applied_index))
    }

    fn leader_index(&self) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.live
                .as_ref()
                .is_some_and(|live| live.role() == StateRole::Leader)
        })
    }

    fn transfer_leadership(&mut self) -> Checked<()> {
        let Some(leader) = self.leader_index() else {
            return Ok(());
        };
        let voters = self.nodes[leader]
            .live
            .as_ref()
            .expect("the leader is live")
            .core()
            .status()
            .voters;
        let to = voters[self.rng.below(voters.len() as u64) as usize];
        let leader_id = self.nodes[leader].id;
        self.event(|| format!("leader {leader_id} asked to transfer to {to}"));
        self.with_core(leader, |core| {
            let _ = core.transfer_leader(to);
        })
    }

    fn partition(&mut self) {
        let ids = self.node_ids();
        let mut cut = BTreeSet::new();
        match self.rng.below(3) {
            0 => {
                // One node alone.
                let lone = ids[self.rng.below(ids.len() as u64) as usize];
                for &other in &ids {
                    if other != lone {
                        cut.insert((lone, other));
                        cut.insert((other, lone));
                    }
                }
            }
            1 => {
                // A random split into two sides.
                let side: Vec<bool> = ids.iter().map(|_| self.rng.chance(1, 2)).collect();
                for (a, &from) in ids.iter().enumerate() {
                    for (b, &to) in ids.iter().enumerate() {
                        if side[a] != side[b] {
                            cut.insert((from, to));
                        }
                    }
                }
            }
            _ => {
                // Some one-way links.
                for &from in &ids {
                    for &to in &ids {
                        if from != to && self.rng.chance(1, 4) {
                            cut.insert((from, to));
                        }
                    }
                }
            }
        }
        let description = format!("{cut:?}");
        self.network.cut_links = cut;
        self.event(|| format!("partition: cut links {description}"));
    }

    fn corrupt_newest_log_entry(&mut self) -> Checked<()> {
        let mut corrupted = None;
        for node in &self.nodes {
            let Some(live) = &node.live else {
                continue;
            };
            let store = &live.log_store;
            let last_index = store.last_index().unwrap_or(0);
            if last_index < store.first_index().unwrap_or(1) {
                continue;
            }
            let mut entries = store
                .entries(
                    last_index,
                    last_index + 1,
                    None,
                    GetEntriesContext::empty(false),
                )
                .map_err(|error| storage_failure(node.id, "read the newest entry", error))?;
            let Some(mut entry) = entries.pop() else {
                continue;
            };
            let mut data = entry.data.to_vec();
            data.extend_from_slice(b"corrupted");
            entry.data = Bytes::from(data);
            store
                .persist_ready(&[entry], None, true)
                .map_err(|error| storage_failure(node.id, "corrupt an entry", error))?;
            corrupted = Some((node.id, last_index));
            break;
        }
        if let Some((node_id, last_index)) = corrupted {
            self.corruption_injected = true;
            self.event(|| format!("node {node_id}: entry {last_index} corrupted"));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Membership, as an operator changes it through the control API
    // -----------------------------------------------------------------------------------------

    /// Starts the next membership change, if none is in progress: promote a learner (now and
    /// then replacing a voter), remove a voter from a group of more than three, or add a
    /// spare node as a learner.
    fn begin_membership_change(&mut self) -> Checked<()> {
        if self.membership.is_some() {
            return Ok(());
        }
        let Some(leader) = self.leader_index() else {
            return Ok(());
        };
        let status = self.nodes[leader]
            .live
            .as_ref()
            .expect("the leader is live")
            .core()
            .status();
        if !status.voters_outgoing.is_empty() {
            return Ok(());
        }
        let kind = if let Some(&learner) = status.learners.first() {
            let replace = self
                .rng
                .chance(1, 2)
                .then(|| status.voters[self.rng.below(status.voters.len() as u64) as usize]);
            MembershipKind::Promote {
                id: learner,
                replace,
            }
        } else if status.voters.len() > 3 {
            MembershipKind::Remove(
                status.voters[self.rng.below(status.voters.len() as u64) as usize],
            )
        } else {
            let spares: Vec<usize> = (0..self.nodes.len())
                .filter(|index| {
                    let node = &self.nodes[*index];
                    !node.member && !node.retired && node.live.is_none()
                })
                .collect();
            let Some(&spare) = spares.get(self.rng.below(spares.len().max(1) as u64) as usize)
            else {
                return Ok(());
            };
            // A fresh, empty server started to join the group.
            let node = &mut self.nodes[spare];
            let _ = std::fs::remove_dir_all(&node.data_dir);
            node.member = true;
            node.bootstraps = false;
            let id = node.id;
            self.start_node(spare)?;
            MembershipKind::AddLearner(id)
        };
        let op = self.next_op_id;
        self.next_op_id += 1;
        self.event(|| format!("membership change {op}: {kind:?}"));
        self.membership = Some(MembershipOp {
            op,
            kind,
            attempt: 0,
            attempt_node: None,
            retry_at_step: None,
            deadline_step: self.step + MEMBERSHIP_DEADLINE_STEPS,
        });
        self.membership_attempt()
    }

    /// Plans the change on the leader's live status with the control API's functions and
    /// proposes it there with the plan's check.
    fn membership_attempt(&mut self) -> Checked<()> {
        let step = self.step;
        let Some(membership) = self.membership.as_mut() else {
            return Ok(());
        };
        membership.retry_at_step = None;
        if step >= membership.deadline_step {
            let (op, kind) = (membership.op, membership.kind.clone());
            self.membership = None;
            self.event(|| format!("membership change {op} ({kind:?}) given up"));
            return Ok(());
        }
        let kind = membership.kind.clone();
        let Some(leader) = self.leader_index() else {
            if let Some(membership) = self.membership.as_mut() {
                membership.retry_at_step = Some(step + 20);
            }
            return Ok(());
        };
        let live = self.nodes[leader]
            .live
            .as_ref()
            .expect("the leader is live");
        let status = live.core().status();
        let plan: Result<Plan, PlanRefusal> = match kind {
            MembershipKind::AddLearner(id) => {
                plan_add_learner(&status, live.log_store.members().len(), &member_config(id))
            }
            MembershipKind::Promote { id, replace } => plan_promote(&status, id, replace),
            MembershipKind::Remove(id) => plan_remove(&status, id, false),
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(PlanRefusal::LeaderMustMove) => {
                // As the endpoint does: leadership moves first, the change is asked again.
                let others: Vec<u64> = status
                    .voters
                    .iter()
                    .copied()
                    .filter(|id| *id != status.node_id)
                    .collect();
                if let Some(&to) = others.get(self.rng.below(others.len().max(1) as u64) as usize) {
                    self.with_core(leader, |core| {
                        let _ = core.transfer_leader(to);
                    })?;
                }
                if let Some(membership) = self.membership.as_mut() {
                    membership.retry_at_step = Some(step + 40);
                }
                return Ok(());
            }
            Err(PlanRefusal::Conflict(reason)) => {
                // The group is not (or no longer) as the change needs it: an earlier attempt
                // may have committed, or the roles changed meanwhile.
                self.event(|| format!("membership change {kind:?} refused: {reason}"));
                self.membership = None;
                return Ok(());
            }
        };
        let membership = self.membership.as_mut().expect("checked above");
        membership.attempt += 1;
        membership.attempt_node = Some(self.nodes[leader].id);
        let responder = Responder {
            op: membership.op,
            attempt: membership.attempt,
        };
        let now = self.nodes[leader].now(step);
        self.with_core(leader, |core| {
            core.propose_conf_change(
                plan.change.clone(),
                Some(plan.boxed_check()),
                responder,
                now,
            )
        })
    }

    /// Takes the answer to a membership attempt; false when `op_id` is not the change in
    /// progress.
    fn membership_attempt_ended(
        &mut self,
        op_id: u64,
        attempt: u64,
        result: Result<u64, &ProposalError>,
    ) -> bool {
        let step = self.step;
        let Some(membership) = self.membership.as_mut() else {
            return false;
        };
        if membership.op != op_id {
            return false;
        }
        if membership.attempt != attempt || membership.attempt_node.is_none() {
            return true;
        }
        membership.attempt_node = None;
        match result {
            Ok(index) => {
                let kind = membership.kind.clone();
                self.membership = None;
                self.membership_changes += 1;
                match kind {
                    MembershipKind::Remove(id)
                    | MembershipKind::Promote {
                        replace: Some(id), ..
                    } => {
                        self.retiring.insert(id, index);
                    }
                    _ => {}
                }
                self.event(|| format!("membership change {kind:?} committed at {index}"));
            }
            Err(error) => {
                // Not ready yet (a learner catching up, the previous change applying), or
                // dropped: ask again a little later, as the endpoint does.
                membership.retry_at_step = Some(step + 30);
                let error = error.to_string();
                self.event(|| format!("membership attempt failed: {error}"));
            }
        }
        true
    }

    /// Stops and wipes the nodes whose removal committed, once the leader has left any joint
    /// configuration that still named them.
    fn retire_removed_nodes(&mut self) -> Checked<()> {
        if self.retiring.is_empty() {
            return Ok(());
        }
        let Some(leader) = self.leader_index() else {
            return Ok(());
        };
        let live = self.nodes[leader]
            .live
            .as_ref()
            .expect("the leader is live");
        let applied = live.core().raw_node().raft.raft_log.applied;
        let gone: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(id, index)| applied >= **index && !live.configuration_names(**id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.retiring.remove(&id);
            let Some(index) = self.index_of(id) else {
                continue;
            };
            self.crash(index)?;
            let node = &mut self.nodes[index];
            node.member = false;
            node.retired = true;
            let _ = std::fs::remove_dir_all(&node.data_dir);
            self.event(|| format!("node {id} removed from the group, stopped and wiped"));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Clients
    // -----------------------------------------------------------------------------------------

    /// Idle clients issue their next request.
    fn client_requests(&mut self) -> Checked<()> {
        for client in 0..CLIENTS {
            if self.clients[client as usize].is_some()
                || !self.rng.chance(self.chaos.request_per_million, 1_000_000)
            {
                continue;
            }
            let (kind, command) = self.random_request();
            self.issue(client, kind, command)?;
        }
        Ok(())
    }

    fn issue(&mut self, client: u64, kind: OpKind, command: Bytes) -> Checked<u64> {
        let id = self.next_op_id;
        self.next_op_id += 1;
        // A hot write's command is made at each attempt, with the proxy's epoch of then.
        let command = match kind {
            OpKind::Attach => {
                self.proxy.attach_ids += 1;
                Bytes::from(encode_command(&Command::Attach {
                    name: VOLUMES[0].0,
                    client: PROXY_CLIENT,
                    force: false,
                    attach_id: Some(self.proxy.attach_ids),
                }))
            }
            _ => command,
        };
        self.history.trace.u64(id);
        self.history.ops.insert(
            id,
            Op {
                id,
                client,
                kind: kind.clone(),
                command,
                invoked_step: self.step,
                deadline_step: self.step + self.chaos.client_deadline_steps,
                attempt: 0,
                attempt_node: None,
                attempt_started_step: 0,
                retry_at_step: None,
                reader: None,
                completed: None,
            },
        );
        if matches!(kind, OpKind::Attach) {
            self.proxy.attach_op = Some(id);
        } else {
            self.clients[client as usize] = Some(id);
        }
        self.event(|| format!("client {client} issues op {id}: {kind:?}"));
        self.start_attempt(id)?;
        Ok(id)
    }

    /// A request for the workload: create the volumes until they exist, then writes and reads
    /// of the hot blocks, and other commands on the second volume: trims, zeroings, writes,
    /// and a few out of range (rejected the same way everywhere).
    fn random_request(&mut self) -> (OpKind, Bytes) {
        for (name, size_bytes, block_size_bytes) in VOLUMES {
            if self.history.model.volume_id(name).is_none() {
                let command = encode_command(&Command::CreateVolume {
                    name,
                    size_bytes,
                    block_size_bytes,
                });
                return (OpKind::Other, Bytes::from(command));
            }
        }
        match self.rng.below(10) {
            0..=3 => {
                let block = self.rng.below(HOT_BLOCKS);
                return (OpKind::Write { block }, Bytes::new());
            }
            4..=6 => {
                let block = self.rng.below(HOT_BLOCKS);
                return (OpKind::Read { block }, Bytes::new());
            }
            _ => {}
        }
        let (name, size_bytes, _) = VOLUMES[1];
        let volume_id = self.history.model.volume_id(name).expect("created above");
        let length = self.rng.between(1, 2048).min(size_bytes);
        let mut offset = self.rng.below(size_bytes - length + 1);
        if self.rng.chance(1, 50) {
            offset = size_bytes - length + 1;
        }
        let command = match self.rng.below(5) {
            0 => encode_command(&Command::Trim {
                volume_id,
                writer_epoch: 0,
                offset,
                length,
            }),
            1 => encode_command(&Command::WriteZeroes {
                volume_id,
                writer_epoch: 0,
                offset,
                length,
                may_punch_hole: self.rng.chance(1, 2),
            }),
            _ => {
                let mut data = vec![0u8; length as usize];
                let mut fill = self.rng.split();
                for chunk in data.chunks_mut(8) {
                    let word = fill.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&word[..chunk.len()]);
                }
                encode_write_command(volume_id, 0, offset, &data)
            }
        };
        (OpKind::Other, Bytes::from(command))
    }

    /// The node a client sends its next attempt to: the leader as some live node knows it
    /// (a proxy follows the leader), else, or now and then anyway, any live node.
    fn pick_node(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|index| self.nodes[*index].live.is_some())
            .collect();
        if live.is_empty() {
            return None;
        }
        if !self.rng.chance(1, 5) {
            let known_leader = live.iter().find_map(|index| {
                let leader_id = self.nodes[*index]
                    .live
                    .as_ref()
                    .map(|node| node.core().raw_node().raft.leader_id)
                    .unwrap_or(0);
                self.index_of(leader_id)
                    .filter(|leader| self.nodes[*leader].live.is_some())
            });
            if let Some(leader) = known_leader {
                return Some(leader);
            }
        }
        Some(live[self.rng.below(live.len() as u64) as usize])
    }

    fn start_attempt(&mut self, op_id: u64) -> Checked<()> {
        let Some(index) = self.pick_node() else {
            self.schedule_retry(op_id);
            return Ok(());
        };
        if let OpKind::Write { block } = self.history.ops[&op_id].kind {
            if !self.proxy.attached {
                // Writes wait for the proxy's attachment.
                self.ensure_attached()?;
                self.schedule_retry(op_id);
                return Ok(());
            }
            let volume_id = self
                .history
                .model
                .volume_id(VOLUMES[0].0)
                .expect("hot writes are issued once the volume exists");
            self.history.ops.get_mut(&op_id).expect("issued").command =
                Bytes::from(encode_write_command(
                    volume_id,
                    self.proxy.epoch,
                    block * HOT_BLOCK_BYTES as u64,
                    &register_content(block, op_id),
                ));
        }
        self.attempt_at(op_id, index)
    }

    /// The proxy attaches the hot volume, unless it is attached or an attach is on its way.
    fn ensure_attached(&mut self) -> Checked<()> {
        if self.proxy.attached || self.proxy.attach_op.is_some() {
            return Ok(());
        }
        self.issue(u64::MAX, OpKind::Attach, Bytes::new())
            .map(|_| ())
    }

    /// The proxy lost a connection: it attaches again, and every hot write in flight is
    /// reissued once it has (answers on the old connection are ignored).
    fn connection_lost(&mut self) {
        if !self.proxy.attached {
            return;
        }
        self.proxy.attached = false;
        self.event(|| "proxy: connection lost, attaching again".to_string());
        let writes: Vec<u64> = self
            .clients
            .iter()
            .flatten()
            .copied()
            .filter(|op_id| {
                let op = &self.history.ops[op_id];
                matches!(op.kind, OpKind::Write { .. }) && op.attempt_node.is_some()
            })
            .collect();
        for op_id in writes {
            self.schedule_retry(op_id);
        }
    }

    fn attempt_at(&mut self, op_id: u64, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let now = self.nodes[index].now(self.step);
        let skip_barrier = self.options.fault == Some(Fault::ReadsSkipTheBarrier);
        let step = self.step;
        let op = self.history.ops.get_mut(&op_id).expect("issued");
        op.attempt += 1;
        op.attempt_node = Some(node_id);
        op.attempt_started_step = step;
        op.retry_at_step = None;
        let attempt = op.attempt;
        let command = op.command.clone();
        let kind = op.kind.clone();
        self.event(|| format!("op {op_id} attempt {attempt} at node {node_id}"));
        match kind {
            OpKind::Read { .. } => {
                // As an NBD session: the reader first, then the barrier, then the read.
                let live = self.nodes[index].live.as_ref().expect("picked live");
                let reader = live.hot_reader(&self.history);
                self.history.ops.get_mut(&op_id).expect("issued").reader = reader;
                let responder = Responder { op: op_id, attempt };
                if skip_barrier {
                    return self.read_answered(index, responder, Ok(()));
                }
                self.with_core(index, |core| core.read_barrier(responder, now))
            }
            _ => self.with_core(index, |core| {
                core.propose(command, Responder { op: op_id, attempt }, now)
            }),
        }
    }

    fn schedule_retry(&mut self, op_id: u64) {
        let backoff = self.rng.between(5, 40);
        let step = self.step;
        let op = self.history.ops.get_mut(&op_id).expect("issued");
        op.attempt_node = None;
        op.reader = None;
        if step + backoff >= op.deadline_step {
            self.complete(op_id, OpResult::Failed);
            return;
        }
        op.retry_at_step = Some(step + backoff);
    }

    fn retry_due_requests(&mut self) -> Checked<()> {
        // Answers that take longer than the reply timeout: the proxy leaves the connection.
        let step = self.step;
        let overdue: Vec<u64> = self
            .in_flight()
            .into_iter()
            .filter(|op_id| {
                let op = &self.history.ops[op_id];
                op.attempt_node.is_some() && op.attempt_started_step + REPLY_TIMEOUT_STEPS <= step
            })
            .collect();
        for op_id in overdue {
            if matches!(self.history.ops[&op_id].kind, OpKind::Write { .. }) {
                self.connection_lost();
            }
            if self.history.ops[&op_id].attempt_node.is_some() {
                self.schedule_retry(op_id);
            }
        }
        let due: Vec<u64> = self
            .in_flight()
            .into_iter()
            .filter(|op_id| {
                self.history.ops[op_id]
                    .retry_at_step
                    .is_some_and(|at| at <= self.step)
            })
            .collect();
        for op_id in due {
            self.start_attempt(op_id)?;
        }
        let membership_due = self
            .membership
            .as_ref()
            .is_some_and(|membership| membership.retry_at_step.is_some_and(|at| at <= self.step));
        if membership_due {
            self.membership_attempt()?;
        }
        self.retire_removed_nodes()
    }

    fn is_current(&self, op_id: u64, attempt: u64) -> bool {
        self.history.ops.get(&op_id).is_some_and(|op| {
            op.completed.is_none() && op.attempt == attempt && op.attempt_node.is_some()
        })
    }

    fn attempt_failed(&mut self, op_id: u64, attempt: u64, error: &ProposalError) {
        if self.membership_attempt_ended(op_id, attempt, Err(error)) {
            return;
        }
        if !self.is_current(op_id, attempt) {
            return;
        }
        self.event(|| format!("op {op_id} attempt {attempt} failed: {error}"));
        self.schedule_retry(op_id);
    }

    fn attempt_acknowledged(&mut self, responder: Responder, index: u64) {
        if self.membership_attempt_ended(responder.op, responder.attempt, Ok(index)) {
            return;
        }
        if !self.is_current(responder.op, responder.attempt) {
            return;
        }
        self.complete(responder.op, OpResult::Acknowledged { index });
    }

    /// Every request in flight: the clients' and the proxy's attach.
    fn in_flight(&self) -> Vec<u64> {
        self.clients
            .iter()
            .flatten()
            .copied()
            .chain(self.proxy.attach_op)
            .collect()
    }

    /// The process at `node_id` died: the proxy's connection to it broke. Requests there are
    /// reissued elsewhere; hot writes only after the proxy has attached again.
    fn requests_lost_at(&mut self, node_id: u64) {
        let lost: Vec<u64> = self
            .in_flight()
            .into_iter()
            .filter(|op_id| self.history.ops[op_id].attempt_node == Some(node_id))
            .collect();
        if lost
            .iter()
            .any(|op_id| matches!(self.history.ops[op_id].kind, OpKind::Write { .. }))
        {
            self.connection_lost();
        }
        for op_id in lost {
            if self.history.ops[&op_id].attempt_node.is_some() {
                self.schedule_retry(op_id);
            }
        }
        self.membership_lost_at(node_id);
    }

    /// The Raft actor at `node_id` restarted: the sessions there lost their answers and ask
    /// again at the same node (the proxy sees nothing of it).
    fn requests_reissued_at(&mut self, index: usize) -> Checked<()> {
        let node_id = self.nodes[index].id;
        let lost: Vec<u64> = self
            .in_flight()
            .into_iter()
            .filter(|op_id| self.history.ops[op_id].attempt_node == Some(node_id))
            .collect();
        for op_id in lost {
            self.attempt_at(op_id, index)?;
        }
        self.membership_lost_at(node_id);
        Ok(())
    }

    fn membership_lost_at(&mut self, node_id: u64) {
        if let Some(membership) = &mut self.membership {
            if membership.attempt_node == Some(node_id) {
                membership.attempt_node = None;
                membership.retry_at_step = Some(self.step + 20);
            }
        }
    }

    /// A read's barrier was answered: read the block through the reader taken before it; a
    /// reader of a state machine dropped meanwhile fails, and the read is reissued.
    fn read_answered(
        &mut self,
        index: usize,
        responder: Responder,
        result: Result<(), ProposalError>,
    ) -> Checked<()> {
        let op_id = responder.op;
        if !self.is_current(op_id, responder.attempt) {
            return Ok(());
        }
        let op = &self.history.ops[&op_id];
        let OpKind::Read { block } = op.kind else {
            return Ok(());
        };
        if let Err(error) = result {
            let attempt = op.attempt;
            self.attempt_failed(op_id, attempt, &error);
            return Ok(());
        }
        let Some(reader) = op.reader.clone() else {
            // The volume did not exist on that node yet: reissue.
            self.schedule_retry(op_id);
            return Ok(());
        };
        let mut content = vec![0u8; HOT_BLOCK_BYTES];
        if reader
            .read(block * HOT_BLOCK_BYTES as u64, &mut content)
            .is_err()
        {
            self.event(|| format!("op {op_id}: the reader was retired; read again"));
            self.schedule_retry(op_id);
            return Ok(());
        }
        let applied_index = self.nodes[index]
            .live
            .as_ref()
            .map(|live| live.machine.applied_index())
            .unwrap_or(0);
        let Some(value) = register_value(block, &content) else {
            return Err(format!(
                "register: read {op_id} of block {block} at applied index {applied_index} \
                 returned content no write produced"
            ));
        };
        self.complete(
            op_id,
            OpResult::Read {
                value,
                applied_index,
            },
        );
        Ok(())
    }

    fn complete(&mut self, op_id: u64, result: OpResult) {
        let step = self.step;
        let op = self.history.ops.get_mut(&op_id).expect("issued");
        op.completed = Some((step, result.clone()));
        op.attempt_node = None;
        op.retry_at_step = None;
        op.reader = None;
        let client = op.client;
        if matches!(op.kind, OpKind::Attach) {
            self.proxy.attach_op = None;
            if let OpResult::Acknowledged { .. } = result {
                self.proxy.attached = true;
            }
        } else if self.clients[client as usize] == Some(op_id) {
            self.clients[client as usize] = None;
        }
        self.history.trace.u64(op_id);
        self.history.trace.u64(step);
        self.event(|| format!("op {op_id} completed: {result:?}"));
    }

    // -----------------------------------------------------------------------------------------
    // The end of a run
    // -----------------------------------------------------------------------------------------

    /// Heals everything and requires, within [`LIVENESS_TICKS_MAX`] ticks, a leader, a probe
    /// write acknowledged, every client request completed, and every node applied up to the
    /// end of the committed log.
    fn heal_and_check_liveness(&mut self) -> Checked<()> {
        self.network.cut_links.clear();
        self.chaos = Chaos::calm(
            self.chaos.log_keep_entries,
            self.chaos.client_deadline_steps,
        );
        for index in 0..self.nodes.len() {
            if self.nodes[index].live.is_none() && self.nodes[index].member {
                self.start_node(index)?;
            }
        }
        self.event(|| "heal: every node up, network calm".to_string());
        let heal_step = self.step;
        let deadline_step = heal_step + LIVENESS_TICKS_MAX * TICK_INTERVAL_STEPS;
        let mut probe: Option<u64> = None;
        while self.step < deadline_step {
            self.one_step()?;
            let probe_done =
                probe.is_some_and(|op_id| self.history.ops[&op_id].completed.is_some());
            let clients_idle = self.clients.iter().all(Option::is_none);
            if probe.is_none() && clients_idle {
                // Creates the volumes if the run never got to it, else writes a hot block.
                let (kind, command) = match self.history.model.volume_id(VOLUMES[1].0) {
                    Some(_) => (OpKind::Write { block: 0 }, Bytes::new()),
                    None => self.random_request(),
                };
                probe = Some(self.issue(0, kind, command)?);
            }
            let committed_end = self.history.committed.len() as u64;
            let members = self.configured_members();
            let everyone_applied = !members.is_empty()
                && self.membership.is_none()
                && members.iter().all(|index| {
                    let node = &self.nodes[*index];
                    node.live.as_ref().is_some_and(|live| {
                        live.machine.applied_index() == committed_end
                            && live.core().raw_node().raft.raft_log.committed == committed_end
                            && live.apply_queue.is_empty()
                    })
                });
            if probe_done && clients_idle && everyone_applied {
                self.retire_removed_nodes()?;
                let probe_result = &self.history.ops[&probe.expect("done")].completed;
                if !matches!(probe_result, Some((_, OpResult::Acknowledged { .. }))) {
                    return Err(format!(
                        "liveness: the probe after the heal was not acknowledged: {probe_result:?}"
                    ));
                }
                self.scan_logs()?;
                return Ok(());
            }
        }
        let state: Vec<String> = self
            .nodes
            .iter()
            .map(|node| match &node.live {
                Some(live) => {
                    let raft = &live.core().raw_node().raft;
                    format!(
                        "node {}: {:?} term {} commit {} applied {} first {} last {} progress {:?}",
                        node.id,
                        raft.state,
                        raft.term,
                        raft.raft_log.committed,
                        live.machine.applied_index(),
                        live.log_store.first_index().unwrap_or(0),
                        live.log_store.last_index().unwrap_or(0),
                        raft.prs()
                            .iter()
                            .map(|(id, progress)| (
                                *id,
                                (progress.matched, progress.next_idx, progress.state)
                            ))
                            .collect::<BTreeMap<_, _>>()
                    )
                }
                None => format!("node {}: down", node.id),
            })
            .collect();
        let open: Vec<u64> = self.clients.iter().flatten().copied().collect();
        Err(format!(
            "liveness: {LIVENESS_TICKS_MAX} ticks after the heal (at step {heal_step}), the probe \
             {probe:?} or the requests {open:?} are not done or not applied everywhere; \
             committed log ends at {}; {}",
            self.history.committed.len(),
            state.join("; ")
        ))
    }

    /// The nodes the leader's configuration names (voters, learners, outgoing voters).
    fn configured_members(&self) -> Vec<usize> {
        let Some(leader) = self.leader_index() else {
            return Vec::new();
        };
        let live = self.nodes[leader]
            .live
            .as_ref()
            .expect("the leader is live");
        (0..self.nodes.len())
            .filter(|index| live.configuration_names(self.nodes[*index].id))
            .collect()
    }

    /// Identical replicas: every node's volumes read back exactly as the model says; every
    /// acknowledged request is the committed entry at the index it was acknowledged with.
    fn check_final_state(&mut self) -> Checked<()> {
        for op in self.history.ops.values() {
            let Some((_, OpResult::Acknowledged { index })) = &op.completed else {
                continue;
            };
            let committed = self
                .history
                .committed
                .get((index - 1) as usize)
                .ok_or_else(|| {
                    format!(
                        "op {} acknowledged at {index}, beyond the committed log",
                        op.id
                    )
                })?;
            if committed.data_digest != data_digest(&op.command) {
                return Err(format!(
                    "acknowledged request {} is not the committed entry {index}",
                    op.id
                ));
            }
        }
        let model_ids: Vec<u64> = self.history.model.volumes.keys().copied().collect();
        let members = self.configured_members();
        if members.is_empty() {
            return Err("no leader at the end to name the members".into());
        }
        for node in members.iter().map(|index| &self.nodes[*index]) {
            let live = node
                .live
                .as_ref()
                .ok_or_else(|| format!("node {} is down at the end", node.id))?;
            let volume_ids: Vec<u64> = live.machine.volumes().iter().map(|info| info.id).collect();
            if volume_ids != model_ids {
                return Err(format!(
                    "node {} has volumes {volume_ids:?}, the committed log makes {model_ids:?}",
                    node.id
                ));
            }
            for (&volume_id, volume) in &self.history.model.volumes {
                let reader = live
                    .machine
                    .reader(volume_id)
                    .ok_or_else(|| format!("node {}: no reader for volume {volume_id}", node.id))?;
                let mut image = vec![0u8; volume.data.len()];
                reader
                    .read(0, &mut image)
                    .map_err(|error| storage_failure(node.id, "read a volume", error))?;
                if image != volume.data {
                    let first_difference = image
                        .iter()
                        .zip(&volume.data)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(format!(
                        "node {} volume {} differs from the model from byte {first_difference}",
                        node.id, volume.name
                    ));
                }
                self.history.trace.u64(Fnv64::of(&[&image]));
            }
        }
        Ok(())
    }
}

/// The member record an operator would add for node `id` (addresses are not used: the
/// simulated network routes by id).
fn member_config(id: u64) -> MemberConfig {
    MemberConfig {
        id,
        peer: format!("127.0.0.1:{}", 17_000 + id),
        nbd: format!("127.0.0.1:{}", 18_000 + id),
        control: format!("127.0.0.1:{}", 19_000 + id),
    }
}

/// The storage side's install of a snapshot a Ready carries (the storage actor's
/// `InstallSnapshot`): the staged data the transport left, switched in durably.
fn install_snapshot(
    machine: &mut StateMachine,
    log_store: &RaftLogStore,
    inbox: &mut Option<(u64, u64, StagedSnapshot)>,
    applied_index: &AtomicU64,
    snapshot: &Snapshot,
) -> Result<Vec<raftblk::config::MemberConfig>, String> {
    let metadata = snapshot.get_metadata();
    let staged = match inbox.take() {
        Some((index, term, staged)) if index == metadata.index && term == metadata.term => staged,
        other => {
            *inbox = other;
            return Err(format!(
                "the snapshot at index {} term {} arrived without staged data",
                metadata.index, metadata.term
            ));
        }
    };
    let members = SnapshotDescriptor::decode(snapshot.get_data())
        .map_err(|error| format!("its descriptor is corrupt: {error}"))?
        .members;
    machine
        .install_snapshot(staged, log_store, metadata, &members)
        .map_err(|error| error.to_string())?;
    applied_index.store(machine.applied_index(), Ordering::SeqCst);
    Ok(members)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The broken node of [`Fault::AppendsNotDurable`]: its log loses every entry above its
/// durable applied index when it crashes, and its commit index with them.
fn lose_entries_above_durable_applied_index(node_id: u64, live: &LiveNode) -> Checked<()> {
    let store = &live.log_store;
    let first_index = store.first_index().unwrap_or(1);
    let last_index = store.last_index().unwrap_or(0);
    let keep_index = live.machine.durable_applied_index().max(first_index);
    if keep_index >= last_index {
        return Ok(());
    }
    let kept = store
        .entries(
            keep_index,
            keep_index + 1,
            None,
            GetEntriesContext::empty(false),
        )
        .map_err(|error| storage_failure(node_id, "read the entry to keep", error))?;
    let mut hard_state = store.hard_state();
    hard_state.commit = hard_state.commit.min(keep_index);
    // Rewriting the last kept entry deletes everything after it.
    store
        .persist_ready(&kept, Some(&hard_state), true)
        .map_err(|error| storage_failure(node_id, "lose entries", error))?;
    Ok(())
}

fn describe_message(message: &Message) -> String {
    format!(
        "{:?} {}->{} term {} index {} log_term {} commit {} entries {} reject {} hint {}",
        message.get_msg_type(),
        message.from,
        message.to,
        message.term,
        message.index,
        message.log_term,
        message.commit,
        message.entries.len(),
        message.reject,
        message.reject_hint
    )
}

/// Runs one seed; a panic anywhere (raft-rs asserts its own invariants) is a failure too.
fn run_simulation(options: SimulationOptions) -> Result<RunSummary, String> {
    let seed = options.seed;
    let trace = options.trace;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut simulation = Simulation::new(options)?;
        let result = simulation.run();
        if result.is_err() && trace {
            for event in &simulation.recent_events {
                eprintln!("{event}");
            }
        }
        result
    }));
    match result {
        Ok(result) => result,
        Err(panic) => Err(format!("seed {seed} panicked: {}", panic_message(&*panic))),
    }
}

/// A core asks for its own restart by panicking (a failed snapshot install), which the
/// simulation catches like a supervisor; only other panics are worth printing.
fn quiet_expected_panics() {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let expected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|message| message.starts_with(SNAPSHOT_INSTALL_FAILED));
            if !expected {
                default(info);
            }
        }));
    });
}

/// Whether a failure is what lost appends lead to, not a stall or an unrelated panic: one of
/// the simulation's safety checks, or raft-rs's own assertion that a follower was told to
/// commit past its last entry (the leader counted entries the follower had acknowledged and
/// then lost).
fn is_lost_appends_failure(seed: u64, failure: &str) -> bool {
    const SAFETY_CHECKS: [&str; 6] = [
        "log matching",
        "committed entry changed",
        "election safety",
        "state machine safety",
        "acknowledged request",
        "register",
    ];
    let by_a_safety_check = SAFETY_CHECKS.iter().any(|check| failure.starts_with(check));
    let by_raft_rs = failure.starts_with(&format!("seed {seed} panicked: to_commit "))
        && failure.contains("is out of range [last_index");
    by_a_safety_check || by_raft_rs
}

fn replay_hint(seed: u64) -> String {
    format!(
        "replay: RAFTBLK_SIM_SEED={seed} RAFTBLK_SIM_TRACE=1 cargo test --release --features \
         failpoints --test raft_simulation many_seeds -- --nocapture"
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Raft paper, Figure 3 (Election Safety, Log Matching, Leader Completeness, State Machine
/// Safety) and per-block linearizability of the clients' history, under drops, delays,
/// duplicates, partitions, process crashes, power cuts, Raft and storage actor restarts, leader
/// transfers, snapshots and compaction; then liveness after the heal and identical replicas.
#[test]
fn many_seeds_keep_every_invariant() {
    let seeds: Vec<u64> = match env_u64("RAFTBLK_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (1..=env_u64("RAFTBLK_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT)).collect(),
    };
    quiet_expected_panics();
    let started = Instant::now();
    // Seeds are independent: run them on every core, and report them in seed order.
    let threads = std::thread::available_parallelism()
        .map(|count| count.get())
        .unwrap_or(1)
        .min(8);
    let outcomes: Vec<(u64, SimulationOptions, Duration, Result<RunSummary, String>)> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|worker| {
                    let seeds = &seeds;
                    scope.spawn(move || {
                        seeds
                            .iter()
                            .skip(worker)
                            .step_by(threads)
                            .map(|&seed| {
                                let options = SimulationOptions::new(seed);
                                let seed_started = Instant::now();
                                let outcome = run_simulation(options.clone());
                                (seed, options, seed_started.elapsed(), outcome)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut outcomes: Vec<_> = workers
                .into_iter()
                .flat_map(|worker| worker.join().expect("a simulation worker panicked"))
                .collect();
            outcomes.sort_by_key(|(seed, ..)| *seed);
            outcomes
        });
    let mut failures = Vec::new();
    let mut operations_checked = 0u64;
    let mut totals = RunSummary {
        trace_hash: 0,
        committed_entries: 0,
        operations: 0,
        acknowledged: 0,
        reads: 0,
        failed: 0,
        terms_with_leader: 0,
        crashes: 0,
        power_cuts: 0,
        raft_restarts: 0,
        storage_restarts: 0,
        snapshots_installed: 0,
        membership_changes: 0,
        messages_sent: 0,
        messages_dropped: 0,
    };
    for (seed, options, elapsed, outcome) in outcomes {
        match outcome {
            Ok(summary) => {
                // The workload must have done something, or the checks prove nothing.
                if summary.committed_entries <= 10 || summary.acknowledged == 0 {
                    failures.push((seed, format!("too little happened: {summary:?}")));
                    continue;
                }
                operations_checked += summary.acknowledged + summary.reads + summary.failed;
                totals.committed_entries += summary.committed_entries;
                totals.operations += summary.operations;
                totals.acknowledged += summary.acknowledged;
                totals.reads += summary.reads;
                totals.failed += summary.failed;
                totals.crashes += summary.crashes;
                totals.power_cuts += summary.power_cuts;
                totals.raft_restarts += summary.raft_restarts;
                totals.storage_restarts += summary.storage_restarts;
                totals.snapshots_installed += summary.snapshots_installed;
                totals.membership_changes += summary.membership_changes;
                if seeds.len() == 1 {
                    eprintln!(
                        "seed {seed} ({} nodes): {summary:?} in {elapsed:?}",
                        options.node_count
                    );
                }
            }
            Err(failure) => {
                eprintln!("seed {seed} FAILED: {failure}\n{}", replay_hint(seed));
                failures.push((seed, failure));
            }
        }
    }
    eprintln!(
        "{} seeds in {:?}: {} committed entries, {} writes and other requests acknowledged, {} \
         reads, {} requests failed at their deadline, {} crashes ({} of them power cuts), {} Raft \
         actor restarts, {} \
         storage actor restarts, {} snapshots installed, {} membership changes",
        seeds.len(),
        started.elapsed(),
        totals.committed_entries,
        totals.acknowledged,
        totals.reads,
        totals.failed,
        totals.crashes,
        totals.power_cuts,
        totals.raft_restarts,
        totals.storage_restarts,
        totals.snapshots_installed,
        totals.membership_changes
    );
    eprintln!(
        "simulation: {} seeds, {operations_checked} client operations checked, {} violations",
        seeds.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed: {}",
        failures.len(),
        seeds.len(),
        failures
            .iter()
            .map(|(seed, failure)| format!("\nseed {seed}: {failure}\n  {}", replay_hint(*seed)))
            .collect::<String>()
    );
}

/// The simulation is deterministic: one seed, run twice, gives the same trace (every message
/// delivered, every entry committed, every apply, every request, the final images).
#[test]
fn the_same_seed_replays_the_same_trace() {
    for seed in [7, 11] {
        let mut options = SimulationOptions::new(seed);
        options.steps = 1_000;
        let first = run_simulation(options.clone()).unwrap_or_else(|failure| panic!("{failure}"));
        let second = run_simulation(options).unwrap_or_else(|failure| panic!("{failure}"));
        assert_eq!(first, second, "seed {seed} is not deterministic");
    }
    let mut options = SimulationOptions::new(8);
    options.steps = 1_000;
    let other = run_simulation(options).unwrap_or_else(|failure| panic!("{failure}"));
    let mut options = SimulationOptions::new(7);
    options.steps = 1_000;
    let seven = run_simulation(options).unwrap_or_else(|failure| panic!("{failure}"));
    assert_ne!(
        other.trace_hash, seven.trace_hash,
        "different seeds must make different traces"
    );
}

/// The Log Matching checker catches an entry whose data changed under the same index and term
/// (Raft paper, Figure 3, "Log Matching").
#[test]
fn a_corrupted_log_entry_is_detected() {
    let mut options = SimulationOptions::new(3);
    options.node_count = 3;
    options.steps = 1_000;
    options.fault = Some(Fault::CorruptNewestLogEntry);
    let failure = run_simulation(options).expect_err("the corrupted entry went unnoticed");
    assert!(
        failure.contains("log matching") || failure.contains("committed entry changed"),
        "unexpected failure: {failure}"
    );
}

/// The register checker catches reads that skip the read barrier: some seed among a few
/// must end in a stale read.
#[test]
fn reads_that_skip_the_barrier_are_caught_as_stale() {
    let mut failures = Vec::new();
    for seed in 1..=20 {
        let mut options = SimulationOptions::new(seed);
        options.fault = Some(Fault::ReadsSkipTheBarrier);
        if let Err(failure) = run_simulation(options) {
            failures.push((seed, failure));
            break;
        }
    }
    let Some((seed, failure)) = failures.pop() else {
        panic!("20 seeds of reads without a barrier went unnoticed");
    };
    assert!(
        failure.starts_with("register: stale read")
            || failure.starts_with("register: read")
                && failure.contains("the log's last write to it"),
        "seed {seed} failed, but not as a stale read: {failure}"
    );
    eprintln!("reads without a barrier caught with seed {seed}: {failure}");
}

/// A node that acknowledges appends it has not made durable (Raft paper, section 5.3:
/// followers respond only after the entries are stored) breaks the cluster once a crash loses
/// them: some seed among a few must end in a failure (a checker, or raft-rs's own assertion
/// that a committed index lies beyond the log).
#[test]
fn appends_lost_in_a_crash_are_detected() {
    lost_appends_are_detected(Fault::AppendsNotDurable, "losing acknowledged appends");
}

/// Runs a few crash-heavy seeds with `fault` until one fails, and checks that the first
/// failure is one lost appends lead to ([`is_lost_appends_failure`]).
fn lost_appends_are_detected(fault: Fault, what: &str) {
    let mut outcomes = Vec::new();
    for seed in 1..=12 {
        let mut options = SimulationOptions::new(seed);
        options.node_count = 3;
        options.steps = 1_500;
        options.crash_heavy = true;
        options.fault = Some(fault);
        let outcome = run_simulation(options);
        let detected = outcome.is_err();
        outcomes.push((seed, outcome));
        if detected {
            break;
        }
    }
    let detection = outcomes
        .iter()
        .find_map(|(seed, outcome)| outcome.as_ref().err().map(|failure| (seed, failure)));
    let Some((seed, failure)) = detection else {
        panic!("{what} went unnoticed: {outcomes:?}");
    };
    assert!(
        is_lost_appends_failure(*seed, failure),
        "seed {seed} failed, but not as lost appends: {failure}"
    );
    eprintln!("{what} detected with seed {seed}: {failure}");
}

/// A power cut takes back what was not synced, and only that: the log entries written after
/// the last WAL sync and the image sectors written after the image's last sync may be gone,
/// everything synced is still there, and some of a few cuts do lose something of each kind.
#[test]
fn a_power_cut_loses_only_what_was_not_synced() {
    let durable = DurableRecords::watch();
    let mut rng = SplitMix64::new(42);
    let (mut entries_lost, mut sectors_lost) = (0, 0);
    for _ in 0..8 {
        let directory = simulation_root();
        let image_path = directory.path().join("image");
        {
            let db = open_db(directory.path(), &small_storage_options()).expect("open RocksDB");
            let store = RaftLogStore::open(db, GROUP_ID).expect("open the log");
            store
                .bootstrap(
                    ConfState {
                        voters: vec![1],
                        ..Default::default()
                    },
                    &[],
                )
                .expect("bootstrap");
            let entry = |index: u64| Entry {
                index,
                term: 1,
                data: Bytes::from(vec![index as u8; 300]),
                ..Default::default()
            };
            let synced: Vec<Entry> = (1..=20).map(entry).collect();
            store.persist_ready(&synced, None, false).expect("append");
            store.sync_wal().expect("sync the WAL");
            let unsynced: Vec<Entry> = (21..=40).map(entry).collect();
            store.persist_ready(&unsynced, None, false).expect("append");
            let image = ImageFile::create(&image_path, 4096).expect("create an image");
            image.write_all_at(0, &[1; 2048]).expect("write");
            image.sync_data().expect("sync the image");
            image.write_all_at(0, &[2; 4096]).expect("write");
        }
        let cut = durable
            .borrow()
            .cut_power(directory.path(), &mut rng)
            .expect("cut the power");
        let db = open_db(directory.path(), &small_storage_options()).expect("reopen RocksDB");
        let store = RaftLogStore::open(db, GROUP_ID).expect("reopen the log");
        let last_index = store.last_index().expect("the last index");
        assert!(
            (20..=40).contains(&last_index),
            "the log ends at {last_index} after a cut that took {} bytes",
            cut.wal_bytes_lost
        );
        entries_lost += 40 - last_index;
        let content = std::fs::read(&image_path).expect("read the image");
        for (number, sector) in content.chunks(512).enumerate() {
            let synced = if number < 4 { 1 } else { 0 };
            assert!(
                sector.iter().all(|byte| *byte == 2) || sector.iter().all(|byte| *byte == synced),
                "sector {number} holds neither the synced nor the newer data"
            );
            if sector[0] != 2 {
                sectors_lost += 1;
            }
        }
        assert_eq!(cut.sectors_rolled_back, sectors_lost_in(&content));
    }
    assert!(
        entries_lost > 0,
        "eight power cuts lost no unsynced log entry"
    );
    assert!(
        sectors_lost > 0,
        "eight power cuts rolled back no unsynced sector"
    );
    watch_this_thread(None);
}

fn sectors_lost_in(image: &[u8]) -> u64 {
    image.chunks(512).filter(|sector| sector[0] != 2).count() as u64
}

/// Power cuts take back WAL syncs that never happened: a node whose WAL syncs return without
/// syncing (the core then reports appends and votes persisted that are not) breaks the
/// cluster once its power is cut, as a crash alone cannot show (the page cache survives it).
/// Some seed among a few must end in a safety failure.
#[test]
fn wal_syncs_that_sync_nothing_are_caught_by_power_cuts() {
    lost_appends_are_detected(Fault::WalSyncSkipped, "WAL syncs that sync nothing");
}
