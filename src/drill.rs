//! `raftblk ctl drill`: a crash-restart drill against a running cluster. A verified write/read
//! workload runs through the proxy (the project's own NBD client codec, many requests in
//! flight) while server processes are killed and actors are made to crash, and a report says
//! whether any I/O failed or any acknowledged write was lost.
//!
//! The workload: every block of a working set carries `(block, generation, seed)` in its first
//! 24 bytes and a pattern derived from them in the rest, so a block read back is known to be
//! the right one, whole (not torn), and at least as new as the last acknowledged write. Never
//! two requests touch one block at once, so a read must return exactly the last acknowledged
//! generation (or the one of a write that failed, which may or may not have been applied). A
//! block is read only after this run wrote it, so a volume used before is fine.
//!
//! How servers are killed: `kill -9` of the pid that a server's `GET /v1/status` reports, so
//! only servers on this host can be killed. Something must start them again: `raftblk dev`
//! does (it acts as the service manager), elsewhere systemd or the like. A kill is done only
//! when every server answers its status, so the drill never takes the quorum away itself.
//!
//! How actors are crashed: `PUT /v1/failpoints/{name}` with `1*panic` on a server's (or the
//! proxy's) control API, which only builds with the `failpoints` feature have; the restart must
//! then show up in that process's `actor_restarts`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::actors::supervisor::ActorKind;
use crate::nbd::client::{
    parse_simple_reply, ClientHandshake, ClientHandshakeStep, SIMPLE_REPLY_BYTES,
};
use crate::nbd::transmission::{encode_request_header, Command, RequestHeader};

/// Bytes of one block of the working set.
pub const BLOCK_BYTES: usize = 4096;
/// Bytes of a block's self-description: block index, generation, seed.
const BLOCK_HEADER_BYTES: usize = 24;
/// Longest wait for one status call or one failpoint call.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an injected crash may take to show up as a restart.
const RESTART_OBSERVATION_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The proxy's NBD address and export.
    pub nbd_address: String,
    pub export_name: String,
    /// The servers' control API addresses.
    pub controls: Vec<String>,
    /// The proxy's control API address, for cache crashes and its restart counts.
    pub proxy_control: Option<String>,
    /// Bearer token of the servers' control API (arming a failpoint is a change).
    pub token: Option<String>,
    pub duration: Duration,
    /// Zero: kill nothing.
    pub kill_interval: Duration,
    /// One crash of each of these kinds, spread over the run.
    pub inject: Vec<ActorKind>,
    pub seed: u64,
    /// Blocks in the working set.
    pub blocks: u64,
    pub requests_in_flight: usize,
}

/// What a drill found. It passes with no I/O error, nothing lost or corrupt, something
/// verified, and every injected crash seen as a restart.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DrillReport {
    pub duration_ms: u64,
    pub seed: u64,
    pub writes_acknowledged: u64,
    pub reads_verified: u64,
    pub blocks_verified_at_end: u64,
    pub io_errors: u64,
    pub connection_losses: u64,
    pub writes_lost: u64,
    pub blocks_corrupt: u64,
    pub longest_stall_ms: u64,
    pub server_kills: u64,
    /// Restarts per actor kind, summed over every process seen (each pid counted once).
    pub restarts_observed: HashMap<String, u64>,
    pub injected: Vec<String>,
    /// Injected kinds whose restart was never seen.
    pub injected_not_restarted: Vec<String>,
    /// Problems of the drill itself (unreachable control APIs when injecting, ...).
    pub notes: Vec<String>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.io_errors == 0
            && self.connection_losses == 0
            && self.writes_lost == 0
            && self.blocks_corrupt == 0
            && self.reads_verified > 0
            && self.writes_acknowledged > 0
            && self.injected_not_restarted.is_empty()
    }

    pub fn render(&self) -> String {
        let mut kinds: Vec<_> = self.restarts_observed.iter().collect();
        kinds.sort();
        let restarts = kinds
            .iter()
            .map(|(kind, count)| format!("{kind}={count}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut text = format!(
            "drill report (seed {seed}, {duration_s:.0} s)\n\
             writes acknowledged   {writes}\n\
             reads verified        {reads}\n\
             blocks verified (end) {blocks}\n\
             I/O errors            {errors}\n\
             connection losses     {losses}\n\
             writes lost           {lost}\n\
             blocks corrupt        {corrupt}\n\
             longest stall         {stall} ms\n\
             server kills          {kills}\n\
             restarts observed     {restarts}\n\
             injected              {injected}\n",
            seed = self.seed,
            duration_s = self.duration_ms as f64 / 1000.0,
            writes = self.writes_acknowledged,
            reads = self.reads_verified,
            blocks = self.blocks_verified_at_end,
            errors = self.io_errors,
            losses = self.connection_losses,
            lost = self.writes_lost,
            corrupt = self.blocks_corrupt,
            stall = self.longest_stall_ms,
            kills = self.server_kills,
            injected = self.injected.join(" "),
        );
        if !self.injected_not_restarted.is_empty() {
            text.push_str(&format!(
                "NOT restarted         {}\n",
                self.injected_not_restarted.join(" ")
            ));
        }
        for note in &self.notes {
            text.push_str(&format!("note: {note}\n"));
        }
        text.push_str(if self.passed() { "PASS\n" } else { "FAIL\n" });
        text
    }
}

/// The failpoint that crashes one actor of `kind`, and whether it lives in the proxy.
pub fn failpoint_of(kind: ActorKind) -> (&'static str, bool) {
    match kind {
        ActorKind::NbdSession => ("nbd_session_request", false),
        ActorKind::Raft => ("raft_actor_tick", false),
        ActorKind::Storage => ("storage_actor_apply", false),
        ActorKind::Listener => ("nbd_listener_accept", false),
        ActorKind::Peer => ("peer_link_send", false),
        ActorKind::Cache => ("proxy_cache_lookup", true),
    }
}

/// A deterministic generator (SplitMix64) so that a seed replays the same schedule.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }
}

/// The content of `block` at `generation` (generation 0: never written, all zeros).
pub fn block_pattern(seed: u64, block: u64, generation: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES];
    if generation == 0 {
        return data;
    }
    data[0..8].copy_from_slice(&block.to_be_bytes());
    data[8..16].copy_from_slice(&generation.to_be_bytes());
    data[16..24].copy_from_slice(&seed.to_be_bytes());
    let mut random = SplitMix64(seed ^ block.rotate_left(32) ^ generation.wrapping_mul(0x9e37));
    for chunk in data[BLOCK_HEADER_BYTES..].chunks_mut(8) {
        let bytes = random.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// What the drill knows about one block.
#[derive(Debug, Default, Clone, Copy)]
struct BlockState {
    /// The generation of the last acknowledged write.
    acknowledged: u64,
    /// A write that failed or was cut off: it may or may not have been applied.
    uncertain: Option<u64>,
    /// Highest generation ever issued.
    issued: u64,
    busy: bool,
}

/// How a read of a block compares with what the drill knows.
#[derive(Debug, PartialEq, Eq)]
enum ReadVerdict {
    Good,
    /// An older generation than the last acknowledged one: a lost write.
    Lost,
    /// Not any generation of this block, or torn.
    Corrupt,
}

fn judge(seed: u64, block: u64, state: &BlockState, data: &[u8]) -> ReadVerdict {
    let candidates = std::iter::once(state.acknowledged).chain(state.uncertain);
    for generation in candidates {
        if data == block_pattern(seed, block, generation).as_slice() {
            return ReadVerdict::Good;
        }
    }
    // Tell a lost write (an intact older generation) from garbage.
    let header_generation = data
        .get(8..16)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    let older_intact = (0..state.acknowledged).any(|generation| {
        generation == header_generation && data == block_pattern(seed, block, generation).as_slice()
    });
    if older_intact || data.iter().all(|byte| *byte == 0) {
        ReadVerdict::Lost
    } else {
        ReadVerdict::Corrupt
    }
}

#[derive(Default)]
struct WorkloadStats {
    writes_acknowledged: u64,
    reads_verified: u64,
    io_errors: u64,
    /// The first few failed requests: (seconds into the run, command, NBD error value).
    first_errors: Vec<(f64, &'static str, u32)>,
    connection_losses: u64,
    writes_lost: u64,
    blocks_corrupt: u64,
    longest_stall: Duration,
}

impl WorkloadStats {
    fn failed(&mut self, started: Instant, command: &'static str, error: u32) {
        self.io_errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors
                .push((started.elapsed().as_secs_f64(), command, error));
        }
    }
}

struct InFlight {
    block: u64,
    /// `Some(generation)` for a write.
    write_generation: Option<u64>,
    /// Issued by the final verification pass.
    final_read: bool,
}

/// Opens an NBD connection and negotiates `export_name` (simple replies).
async fn connect(address: &str, export_name: &str) -> anyhow::Result<TcpStream> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(address))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {address} timed out"))??;
    stream.set_nodelay(true)?;
    let mut handshake = ClientHandshake::new(export_name)?;
    let mut input = BytesMut::with_capacity(4096);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let step = handshake.advance(&mut input, &mut out)?;
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        match step {
            ClientHandshakeStep::Done(_) => return Ok(stream),
            // This client never asks for TLS.
            ClientHandshakeStep::StartTls => anyhow::bail!("the server started TLS unasked"),
            ClientHandshakeStep::NeedMore => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let read = tokio::time::timeout(remaining, stream.read_buf(&mut input))
                    .await
                    .map_err(|_| anyhow::anyhow!("the NBD handshake with {address} timed out"))??;
                if read == 0 {
                    anyhow::bail!("{address} closed the connection during the handshake");
                }
            }
        }
    }
}

/// Runs the verified workload until `stop`, then verifies every block once more.
async fn run_workload(
    options: &DrillOptions,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<WorkloadStats>>,
) -> anyhow::Result<u64> {
    let seed = options.seed;
    let mut random = SplitMix64(seed ^ 0x5eed);
    let mut blocks = vec![BlockState::default(); options.blocks as usize];
    let mut stream = connect(&options.nbd_address, &options.export_name).await?;
    let mut next_cookie: u64 = 1;
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut input = BytesMut::with_capacity(1 << 20);
    let mut out = Vec::with_capacity(1 << 20);
    let mut last_progress = Instant::now();
    let started = Instant::now();
    // The final pass reads each block in order once the run is over.
    let mut final_pass: Option<VecDeque<u64>> = None;
    let mut verified_at_end = 0u64;
    loop {
        if final_pass.is_none() && stop.load(Ordering::Relaxed) {
            final_pass = Some(
                (0..options.blocks)
                    .filter(|block| blocks[*block as usize].issued > 0)
                    .collect(),
            );
        }
        // Issue requests up to the limit, on blocks nobody is using.
        while in_flight.len() < options.requests_in_flight {
            let (block, write) = match final_pass.as_mut() {
                Some(queue) => match queue.front().copied() {
                    Some(block) if !blocks[block as usize].busy => {
                        queue.pop_front();
                        (block, false)
                    }
                    _ => break,
                },
                None => {
                    let block = random.below(options.blocks);
                    let state = &blocks[block as usize];
                    if state.busy {
                        break;
                    }
                    // A block is read only once this run wrote it: what an earlier run left
                    // there is unknown.
                    (block, state.issued == 0 || random.below(2) == 0)
                }
            };
            let state = &mut blocks[block as usize];
            state.busy = true;
            let cookie = next_cookie;
            next_cookie += 1;
            let header = RequestHeader {
                flags: 0,
                command: if write { Command::Write } else { Command::Read },
                cookie,
                offset: block * BLOCK_BYTES as u64,
                length: BLOCK_BYTES as u32,
            };
            encode_request_header(&mut out, &header);
            let write_generation = write.then(|| {
                state.issued += 1;
                out.extend_from_slice(&block_pattern(seed, block, state.issued));
                state.issued
            });
            in_flight.insert(
                cookie,
                InFlight {
                    block,
                    write_generation,
                    final_read: final_pass.is_some(),
                },
            );
        }
        if final_pass.as_ref().is_some_and(VecDeque::is_empty) && in_flight.is_empty() {
            return Ok(verified_at_end);
        }
        if !out.is_empty() {
            if let Err(error) = stream.write_all(&out).await {
                anyhow::bail!("writing to the proxy failed: {error}");
            }
            out.clear();
        }
        // Read until at least one reply is complete.
        let reply = loop {
            if input.len() >= SIMPLE_REPLY_BYTES {
                let reply = parse_simple_reply(&input)?;
                let Some(request) = in_flight.get(&reply.cookie) else {
                    anyhow::bail!("reply for unknown cookie {}", reply.cookie);
                };
                let payload = if reply.error == 0 && request.write_generation.is_none() {
                    BLOCK_BYTES
                } else {
                    0
                };
                if input.len() >= SIMPLE_REPLY_BYTES + payload {
                    input.advance(SIMPLE_REPLY_BYTES);
                    let data = input.split_to(payload);
                    break (reply, data);
                }
            }
            input.reserve(64 * 1024);
            let read = tokio::time::timeout(Duration::from_secs(120), stream.read_buf(&mut input))
                .await
                .map_err(|_| anyhow::anyhow!("no reply from the proxy for 120 s"))??;
            if read == 0 {
                anyhow::bail!("the proxy closed the connection");
            }
        };
        let now = Instant::now();
        {
            let mut stats = stats.lock();
            stats.longest_stall = stats.longest_stall.max(now - last_progress);
        }
        last_progress = now;
        let (reply, data) = reply;
        let Some(request) = in_flight.remove(&reply.cookie) else {
            continue;
        };
        let state = &mut blocks[request.block as usize];
        state.busy = false;
        let mut stats = stats.lock();
        match (reply.error, request.write_generation) {
            (0, Some(generation)) => {
                state.acknowledged = generation;
                state.uncertain = None;
                stats.writes_acknowledged += 1;
            }
            (error, Some(generation)) => {
                state.uncertain = Some(generation);
                stats.failed(started, "write", error);
            }
            (0, None) => match judge(seed, request.block, state, &data) {
                ReadVerdict::Good => {
                    // What was read is now known; an uncertain write is settled either way.
                    if state.uncertain.is_some() {
                        let generation =
                            u64::from_be_bytes(data[8..16].try_into().unwrap_or([0; 8]));
                        state.acknowledged = generation.max(state.acknowledged);
                        state.uncertain = None;
                    }
                    stats.reads_verified += 1;
                    if request.final_read {
                        verified_at_end += 1;
                    }
                }
                ReadVerdict::Lost => stats.writes_lost += 1,
                ReadVerdict::Corrupt => stats.blocks_corrupt += 1,
            },
            (error, None) => stats.failed(started, "read", error),
        }
    }
}

/// Restart counts seen per process (control address + pid), so that a killed process's counts
/// are not lost and a restarted one is not double counted.
#[derive(Default)]
struct RestartLedger {
    per_process: HashMap<(String, u64), HashMap<String, u64>>,
}

impl RestartLedger {
    fn observe(&mut self, control: &str, status: &serde_json::Value) {
        let pid = status["pid"].as_u64().unwrap_or(0);
        let Some(restarts) = status["actor_restarts"].as_object() else {
            return;
        };
        let entry = self
            .per_process
            .entry((control.to_string(), pid))
            .or_default();
        for (kind, count) in restarts {
            let count = count.as_u64().unwrap_or(0);
            let seen = entry.entry(kind.clone()).or_default();
            *seen = (*seen).max(count);
        }
    }

    fn totals(&self) -> HashMap<String, u64> {
        let mut totals = HashMap::new();
        for counts in self.per_process.values() {
            for (kind, count) in counts {
                *totals.entry(kind.clone()).or_default() += count;
            }
        }
        totals
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(CONTROL_TIMEOUT).build()
}

fn get_status(agent: &ureq::Agent, control: &str) -> Option<serde_json::Value> {
    agent
        .get(&format!("http://{control}/v1/status"))
        .call()
        .ok()?
        .into_json()
        .ok()
}

fn arm_failpoint(
    agent: &ureq::Agent,
    control: &str,
    name: &str,
    token: Option<&str>,
) -> Result<(), String> {
    let request = agent.put(&format!("http://{control}/v1/failpoints/{name}"));
    let request = match token {
        Some(token) => request.set("Authorization", &format!("Bearer {token}")),
        None => request,
    };
    request
        .send_string("1*panic")
        .map(|_| ())
        .map_err(|error| match error {
            ureq::Error::Status(404, _) => {
                format!("{control} has no failpoints endpoint (build with --features failpoints)")
            }
            ureq::Error::Status(401 | 403, _) => format!(
                "arming {name} on {control}: the control API wants the cluster's token \
                 (--token or RAFTBLK_TOKEN)"
            ),
            other => format!("arming {name} on {control}: {other}"),
        })
}

/// The schedule and the chaos: kills and injections, plus status polling for restart counts.
fn run_chaos(
    options: &DrillOptions,
    started: Instant,
    stop: &AtomicBool,
    report: &mut DrillReport,
) -> RestartLedger {
    let agent = agent();
    let mut random = SplitMix64(options.seed ^ 0x000c_4a05);
    let mut ledger = RestartLedger::default();
    let poll_all = |ledger: &mut RestartLedger| -> Vec<(String, serde_json::Value)> {
        let mut answered = Vec::new();
        for control in &options.controls {
            if let Some(status) = get_status(&agent, control) {
                ledger.observe(control, &status);
                answered.push((control.clone(), status));
            }
        }
        if let Some(proxy) = &options.proxy_control {
            if let Some(status) = get_status(&agent, proxy) {
                ledger.observe(proxy, &status);
            }
        }
        answered
    };
    let injections: Vec<(Duration, ActorKind)> = options
        .inject
        .iter()
        .enumerate()
        .map(|(position, kind)| {
            let share = options.duration / (options.inject.len() as u32 + 1);
            (share * (position as u32 + 1), *kind)
        })
        .collect();
    let mut next_injection = 0;
    let mut next_kill = options.kill_interval;
    let mut pending: Vec<PendingRestart> = Vec::new();
    while started.elapsed() < options.duration {
        std::thread::sleep(Duration::from_millis(250));
        let answered = poll_all(&mut ledger);
        check_pending(&agent, &mut pending, &mut ledger, report);
        let elapsed = started.elapsed();
        if let Some((at, kind)) = injections.get(next_injection).copied() {
            if elapsed >= at {
                next_injection += 1;
                report.injected.push(kind.name().to_string());
                if let Some(waiting) = inject(options, &agent, &mut random, &answered, kind, report)
                {
                    pending.push(waiting);
                }
                continue;
            }
        }
        // Kill only a healthy cluster (every server answers) with no crash pending, so the
        // drill never takes the quorum away by itself nor loses the count of a restart.
        let healthy = answered.len() == options.controls.len() && !answered.is_empty();
        if !options.kill_interval.is_zero() && elapsed >= next_kill && healthy && pending.is_empty()
        {
            let (control, status) = &answered[random.below(answered.len() as u64) as usize];
            if let Some(pid) = status["pid"].as_u64().filter(|pid| *pid > 1) {
                // SAFETY: kill(2) with a pid and a signal number touches no memory.
                let result = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                if result == 0 {
                    report.server_kills += 1;
                    eprintln!(
                        "drill: {:>5.1} s kill -9 server {control} (pid {pid})",
                        elapsed.as_secs_f64()
                    );
                } else {
                    report.notes.push(format!(
                        "kill -9 {pid} ({control}) failed: {} (servers must run on this host)",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            next_kill = elapsed + options.kill_interval;
        }
    }
    // The workload keeps running while the last injected crashes are confirmed.
    let deadline = Instant::now() + RESTART_OBSERVATION_TIMEOUT;
    while !pending.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        check_pending(&agent, &mut pending, &mut ledger, report);
    }
    for waiting in pending {
        report
            .injected_not_restarted
            .push(waiting.kind.name().to_string());
    }
    poll_all(&mut ledger);
    stop.store(true, Ordering::Relaxed);
    ledger
}

/// An injected crash whose restart has not been seen yet.
struct PendingRestart {
    kind: ActorKind,
    target: String,
    restarts_before: u64,
    deadline: Instant,
}

fn check_pending(
    agent: &ureq::Agent,
    pending: &mut Vec<PendingRestart>,
    ledger: &mut RestartLedger,
    report: &mut DrillReport,
) {
    pending.retain(|waiting| {
        if let Some(status) = get_status(agent, &waiting.target) {
            ledger.observe(&waiting.target, &status);
            let now = status["actor_restarts"][waiting.kind.name()]
                .as_u64()
                .unwrap_or(0);
            if now > waiting.restarts_before {
                eprintln!(
                    "drill: {} restarted on {}",
                    waiting.kind.name(),
                    waiting.target
                );
                return false;
            }
        }
        if Instant::now() >= waiting.deadline {
            report
                .injected_not_restarted
                .push(waiting.kind.name().to_string());
            return false;
        }
        true
    });
}

fn inject(
    options: &DrillOptions,
    agent: &ureq::Agent,
    random: &mut SplitMix64,
    answered: &[(String, serde_json::Value)],
    kind: ActorKind,
    report: &mut DrillReport,
) -> Option<PendingRestart> {
    let (failpoint, in_proxy) = failpoint_of(kind);
    let target = if in_proxy {
        options.proxy_control.clone()
    } else if kind == ActorKind::NbdSession {
        // Only the leader serves the proxy's sessions.
        answered
            .iter()
            .find(|(_, status)| status["raft"]["role"] == "Leader")
            .map(|(control, _)| control.clone())
    } else {
        answered
            .get(random.below(answered.len() as u64) as usize)
            .map(|(control, _)| control.clone())
    };
    let Some(target) = target else {
        report.notes.push(format!(
            "no {} control API reachable to crash {}",
            if in_proxy { "proxy" } else { "server" },
            kind.name()
        ));
        report.injected_not_restarted.push(kind.name().to_string());
        return None;
    };
    let Some(status) = get_status(agent, &target) else {
        report.notes.push(format!(
            "{target} did not answer before crashing {}",
            kind.name()
        ));
        report.injected_not_restarted.push(kind.name().to_string());
        return None;
    };
    let restarts_before = status["actor_restarts"][kind.name()].as_u64().unwrap_or(0);
    if let Err(error) = arm_failpoint(agent, &target, failpoint, options.token.as_deref()) {
        report.notes.push(error);
        report.injected_not_restarted.push(kind.name().to_string());
        return None;
    }
    eprintln!("drill: crash {} via {failpoint} on {target}", kind.name());
    // A listener crashes on its next accepted connection: make one.
    if kind == ActorKind::Listener {
        let nbd = status["raft"]["node_id"].as_u64().and_then(|node| {
            status["members"]
                .as_array()?
                .iter()
                .find(|member| member["id"].as_u64() == Some(node))
                .and_then(|member| member["nbd"].as_str().map(str::to_string))
        });
        match nbd.and_then(|address| address.parse::<SocketAddr>().ok()) {
            Some(address) => {
                let _ = std::net::TcpStream::connect_timeout(&address, CONTROL_TIMEOUT);
            }
            None => report
                .notes
                .push(format!("no NBD address known for {target}")),
        }
    }
    Some(PendingRestart {
        kind,
        target,
        restarts_before,
        deadline: Instant::now() + RESTART_OBSERVATION_TIMEOUT,
    })
}

/// Runs the drill and returns its report.
pub fn run_drill(options: DrillOptions) -> anyhow::Result<DrillReport> {
    anyhow::ensure!(options.blocks > 0, "--blocks must be at least 1");
    anyhow::ensure!(
        options.requests_in_flight > 0 && options.requests_in_flight <= 1024,
        "--requests-in-flight must be 1..=1024"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(WorkloadStats::default()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workload = {
        let options = options.clone();
        let stop = stop.clone();
        let stats = stats.clone();
        std::thread::spawn(move || runtime.block_on(run_workload(&options, stop, stats)))
    };
    let started = Instant::now();
    let mut report = DrillReport {
        seed: options.seed,
        ..Default::default()
    };
    let ledger = run_chaos(&options, started, &stop, &mut report);
    let outcome = workload
        .join()
        .map_err(|_| anyhow::anyhow!("the workload thread panicked"))?;
    match outcome {
        Ok(verified) => report.blocks_verified_at_end = verified,
        Err(error) => {
            stats.lock().connection_losses += 1;
            report.notes.push(format!("workload stopped: {error:#}"));
        }
    }
    let stats = stats.lock();
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.writes_acknowledged = stats.writes_acknowledged;
    report.reads_verified = stats.reads_verified;
    report.io_errors = stats.io_errors;
    for (at_s, command, error) in &stats.first_errors {
        report.notes.push(format!(
            "{command} failed with NBD error {error} at {at_s:.1} s"
        ));
    }
    report.connection_losses = stats.connection_losses;
    report.writes_lost = stats.writes_lost;
    report.blocks_corrupt = stats.blocks_corrupt;
    report.longest_stall_ms = stats.longest_stall.as_millis() as u64;
    report.restarts_observed = ledger.totals();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_judged_against_the_acknowledged_generation() {
        let seed = 7;
        let state = BlockState {
            acknowledged: 3,
            uncertain: Some(4),
            issued: 4,
            busy: false,
        };
        assert_eq!(
            judge(seed, 5, &state, &block_pattern(seed, 5, 3)),
            ReadVerdict::Good
        );
        assert_eq!(
            judge(seed, 5, &state, &block_pattern(seed, 5, 4)),
            ReadVerdict::Good
        );
        assert_eq!(
            judge(seed, 5, &state, &block_pattern(seed, 5, 2)),
            ReadVerdict::Lost
        );
        assert_eq!(
            judge(seed, 5, &state, &block_pattern(seed, 5, 0)),
            ReadVerdict::Lost
        );
        // Another block's data, or a torn block, is corruption.
        assert_eq!(
            judge(seed, 5, &state, &block_pattern(seed, 6, 3)),
            ReadVerdict::Corrupt
        );
        let mut torn = block_pattern(seed, 5, 3);
        torn[BLOCK_BYTES - 1] ^= 1;
        assert_eq!(judge(seed, 5, &state, &torn), ReadVerdict::Corrupt);
    }

    #[test]
    fn every_actor_kind_has_a_failpoint() {
        for kind in ActorKind::ALL {
            let (name, _) = failpoint_of(kind);
            assert!(!name.is_empty());
            assert_eq!(ActorKind::from_name(kind.name()), Some(kind));
        }
    }
}
