//! Three-node replication, end to end: real `raftblk server` processes on loopback forming one
//! Raft group, the `raftblk proxy` in front of them, and real NBD clients (fio, nbdinfo,
//! qemu-io) or the test's own verifying client. Each test says the requirement it checks, and
//! the Raft paper section where one applies.
//!
//! The tests run one at a time (a file-wide lock): three servers each are all two cores can
//! carry, and timing-sensitive failovers must not starve each other.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::relay::RelayMode;
use common::verified::*;
use common::*;

/// The tests of this file take turns (see the module documentation).
fn one_cluster_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poison| poison.into_inner())
}

const QUEUE_DEPTH: usize = 32;
/// A replica that cannot catch up or agree within this time is a failure.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// A new leader must be elected within this time of the old one's death (election timeout
/// here is 0.5–1 s; the rest is slack for a loaded machine).
const ELECTION_TIMEOUT_BOUND: Duration = Duration::from_secs(20);
/// The Linux kernel nbd client gives up on a request after 30 s: the proxy must answer sooner.
const KERNEL_NBD_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until `leader` has compacted its log past `bound`, the last index a stopped or
/// cut-off follower can hold: that follower can then catch up only by a snapshot.
#[track_caller]
fn wait_for_compaction_past(cluster: &mut Cluster, leader: u64, bound: u64) {
    cluster.wait_until(
        &format!("node {leader} to compact its log past index {bound}"),
        Duration::from_secs(90),
        |cluster| {
            cluster
                .status(leader)
                .map(|status| status.first_log_index > bound + 1)
                .unwrap_or(false)
        },
    );
}

/// Waits until `node` has installed a snapshot.
#[track_caller]
fn wait_for_snapshot_installed(cluster: &mut Cluster, node: u64) {
    cluster.wait_until(
        &format!("node {node} to install a snapshot"),
        CONVERGENCE_TIMEOUT,
        |cluster| {
            cluster
                .status(node)
                .map(|status| status.snapshots_installed >= 1)
                .unwrap_or(false)
        },
    );
}

/// A verified load running on its own thread against one NBD connection.
struct BackgroundLoad {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    thread: thread::JoinHandle<(VerifiedRegion, LoadStatistics)>,
}

impl BackgroundLoad {
    fn start(mut client: NbdClient, mut region: VerifiedRegion, seed: u64) -> BackgroundLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let acknowledged = Arc::clone(&acknowledged);
            thread::spawn(move || {
                let mut random = SplitMix64::new(seed);
                let statistics =
                    region.run_load(&mut client, &mut random, QUEUE_DEPTH, &stop, &acknowledged);
                (region, statistics)
            })
        };
        BackgroundLoad {
            stop,
            acknowledged,
            thread,
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Waits until `count` more requests than now have been acknowledged.
    #[track_caller]
    fn wait_for_more_acknowledgements(&self, count: u64, timeout: Duration, context: &str) {
        let target = self.acknowledged() + count;
        wait_until(
            &format!("{count} more acknowledged writes ({context})"),
            timeout,
            || self.acknowledged() >= target || self.thread.is_finished(),
        );
        assert!(
            !self.thread.is_finished(),
            "the load ended early ({context}); see the panic above or the statistics"
        );
    }

    fn finish(self) -> (VerifiedRegion, LoadStatistics) {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Requirement: "3 servers + proxy: fio through the proxy with verify=crc32c, 32 in flight,
/// while the leader is kill -9ed and restarted several times: zero I/O errors at the client,
/// every block verifies, and the longest I/O stall is printed."
#[test]
fn fio_through_the_proxy_survives_three_leader_kills() {
    let _turn = one_cluster_at_a_time();
    require_tools(&["fio"]);
    let mut cluster = Cluster::start(ClusterOptions::default());
    let mut proxy = ProxyProcess::start(&cluster, "fio-client", &[]);
    const RUNTIME_SECONDS: u64 = 40;
    let uri = proxy.uri(DEFAULT_EXPORT_NAME);
    let fio = thread::spawn(move || {
        run_command(
            std::process::Command::new("fio").args([
                "--name=failover",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                // Half the volume, so blocks are overwritten and verification covers rewrites.
                "--size=32m",
                "--time_based",
                &format!("--runtime={RUNTIME_SECONDS}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // Verify while writing too, not only in the final pass.
                "--verify_backlog=1024",
                "--output-format=json",
            ]),
            Duration::from_secs(RUNTIME_SECONDS + 120),
        )
    });
    let started = Instant::now();
    let mut failovers = Vec::new();
    for round in 1..=3u32 {
        // Spread the kills over the run: one every ~10 s, starting after 5 s of load.
        let kill_at = Duration::from_secs(5 + 10 * u64::from(round - 1));
        while started.elapsed() < kill_at {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !fio.is_finished(),
            "fio ended before kill {round}; it must run through every failover"
        );
        let old_leader = cluster.leader();
        let killed_at = Instant::now();
        cluster.kill_9(old_leader);
        let survivors = cluster.others(old_leader);
        let new_leader = cluster.wait_for_leader(&survivors, ELECTION_TIMEOUT_BOUND);
        let election = killed_at.elapsed();
        cluster.restart(old_leader);
        cluster.wait_caught_up(old_leader, CONVERGENCE_TIMEOUT);
        eprintln!(
            "kill {round}: leader {old_leader} killed at {:.1?}, node {new_leader} leads after \
             {election:.2?}; node {old_leader} restarted and caught up after {:.2?}",
            killed_at - started,
            killed_at.elapsed()
        );
        failovers.push(election);
        proxy.assert_running("during the failovers");
    }
    let result = fio.join().expect("the fio thread");
    assert!(
        result.status.success(),
        "fio reported an error through three leader failovers\n{}",
        result.describe()
    );
    let json = result.stdout_json();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error\n{}", result.describe());
    let written_bytes = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let verified_bytes = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(
        written_bytes >= 16 * MIB,
        "fio wrote only {written_bytes} bytes in {RUNTIME_SECONDS} s"
    );
    // Verification reads are fio's reads here: none would mean nothing was checked.
    assert!(
        verified_bytes > 0,
        "fio verified nothing (no read bytes)\n{}",
        result.describe()
    );
    let longest_stall = Duration::from_nanos(job["write"]["lat_ns"]["max"].as_u64().unwrap_or(0));
    eprintln!(
        "fio through the proxy: {} MiB written, {} MiB verified, {:.0} write IOPS; longest I/O \
         stall (max write latency) {longest_stall:.2?}; elections took {failovers:.2?}",
        written_bytes / MIB,
        verified_bytes / MIB,
        job["write"]["iops"].as_f64().unwrap_or(0.0),
    );
    assert!(
        longest_stall < KERNEL_NBD_TIMEOUT,
        "a write stalled {longest_stall:.1?}: the kernel nbd client would have failed it"
    );
    let all = cluster.node_ids();
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
}

/// Requirement: "A follower killed and restarted under load catches up; after the load stops,
/// the three nodes' images are byte-identical (checksum compare)." (Raft §5.3: the leader
/// brings a follower's log up to date.)
#[test]
fn follower_killed_under_load_catches_up_and_replicas_are_identical() {
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("follower_killed_under_load");
    let mut cluster = Cluster::start(ClusterOptions::default());
    let leader = cluster.leader();
    let follower = cluster.others(leader)[0];
    let load = BackgroundLoad::start(
        cluster.nbd_client(leader, DEFAULT_EXPORT_NAME),
        VerifiedRegion::new(16 * MIB, 2048, 1),
        random.next_u64(),
    );
    let minute = Duration::from_secs(60);
    load.wait_for_more_acknowledgements(300, minute, "before the kill");
    cluster.kill_9(follower);
    load.wait_for_more_acknowledgements(1000, minute, "with the follower down");
    let before_restart = cluster.status(leader).expect("leader status");
    cluster.restart(follower);
    load.wait_for_more_acknowledgements(500, minute, "after the restart");
    let (mut region, statistics) = load.finish();
    assert!(
        statistics.transport_error.is_none(),
        "the load's connection to the leader failed: {:?}",
        statistics.transport_error
    );
    let all = cluster.node_ids();
    let digests = cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
    assert!(
        digests[0].applied_index > before_restart.commit_index,
        "the restarted follower must have applied what was committed while it was down"
    );
    // The restarted follower serves every acknowledged write (reads through it are
    // linearizable: ReadIndex).
    let mut reader = cluster.nbd_client(follower, DEFAULT_EXPORT_NAME);
    let blocks_holding_writes = region.verify(&mut reader, "read through the restarted follower");
    assert!(
        blocks_holding_writes > 500,
        "only {blocks_holding_writes} blocks hold writes"
    );
    eprintln!(
        "{} requests acknowledged; replicas identical at applied index {}",
        statistics.acknowledged(),
        digests[0].applied_index
    );
}

/// Requirement: "A node kept down past log compaction rejoins by snapshot and ends identical."
/// (Raft §7: the leader sends InstallSnapshot to a follower whose next entry was discarded.)
#[test]
fn node_down_past_log_compaction_rejoins_by_snapshot() {
    rejoin_by_snapshot(false);
}

/// The same over mutual TLS between the servers: the snapshot stream's last frame and its
/// acknowledgement must leave the TLS buffers without waiting for more data.
#[test]
fn node_down_past_log_compaction_rejoins_by_snapshot_over_mutual_tls() {
    rejoin_by_snapshot(true);
}

fn rejoin_by_snapshot(peer_tls: bool) {
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("rejoin_by_snapshot");
    let mut options = ClusterOptions::default()
        .set("raft", "log_keep_entries", "8")
        .set("raft", "log_lag_entries_max", "64")
        .set("raft", "log_lag_bytes_max", "1048576")
        // Small chunks, so the snapshot of even a small volume takes several messages.
        .set("peer", "snapshot_chunk_bytes", "1048576");
    options.peer_tls = peer_tls;
    let mut cluster = Cluster::start(options);
    let leader = cluster.leader();
    let follower = cluster.others(leader)[0];
    // Some data before the follower goes down, so the snapshot carries old and new blocks.
    let load = BackgroundLoad::start(
        cluster.nbd_client(leader, DEFAULT_EXPORT_NAME),
        VerifiedRegion::new(8 * MIB, 4096, 1),
        random.next_u64(),
    );
    let minute = Duration::from_secs(60);
    load.wait_for_more_acknowledgements(200, minute, "before the follower stops");
    let applied_by_follower = cluster
        .status(follower)
        .expect("follower status")
        .applied_index;
    cluster.terminate(follower);
    // The follower went on receiving entries between its status and its death, so what it
    // applied is no bound on what its log holds. The leader's log once the follower is dead is:
    // the follower can hold no entry the leader did not have then.
    let follower_log_bound = cluster
        .status(leader)
        .expect("leader status")
        .last_log_index;
    wait_for_compaction_past(&mut cluster, leader, follower_log_bound);
    load.wait_for_more_acknowledgements(200, minute, "after compaction");
    let (mut region, statistics) = load.finish();
    assert!(statistics.transport_error.is_none(), "{statistics:?}");
    let sent_before = cluster
        .status(leader)
        .expect("leader status")
        .snapshots_sent;
    cluster.restart(follower);
    wait_for_snapshot_installed(&mut cluster, follower);
    let leader_status = cluster.status(leader).expect("leader status");
    assert!(
        leader_status.snapshots_sent > sent_before,
        "the leader's snapshots_sent must grow: {} then {}",
        sent_before,
        leader_status.snapshots_sent
    );
    let all = cluster.node_ids();
    let digests = cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
    let mut reader = cluster.nbd_client(follower, DEFAULT_EXPORT_NAME);
    let blocks_holding_writes = region.verify(&mut reader, "read through the snapshot-fed node");
    eprintln!(
        "node {follower} stopped at applied index {applied_by_follower}, log at most \
         {follower_log_bound}; the leader's log then began at {}; snapshots sent by the leader \
         {}; replicas identical at {}",
        leader_status.first_log_index, leader_status.snapshots_sent, digests[0].applied_index
    );
    assert!(
        blocks_holding_writes > 200,
        "only {blocks_holding_writes} blocks hold writes"
    );
}

/// Requirement: lease reads, if offered, are opt-in with their clock assumptions stated
/// (Raft thesis §6.4.1). With `raft.read_lease_ms` set, the leader answers reads without a
/// ReadIndex round; once partitioned it goes on answering from its lease only until a new
/// leader could exist, so no read issued after the majority acknowledged a newer write
/// returns the older data.
#[test]
fn lease_reads_skip_the_round_and_a_partitioned_leader_serves_nothing_stale() {
    let _turn = one_cluster_at_a_time();
    // The harness ticks every 50 ms with 10 election ticks: the longest lease allowed is 364.
    let options = ClusterOptions::default()
        .with_relays()
        .set("raft", "read_lease_ms", "300")
        .set("nbd", "request_timeout_ms", "2000");
    let mut cluster = Cluster::start(options);
    let old_leader = cluster.leader();
    let majority = cluster.others(old_leader);
    let old_data = tagged_block(0x11, 0);
    let new_data = tagged_block(0x22, 0);
    let mut client = cluster.nbd_client(old_leader, DEFAULT_EXPORT_NAME);
    client.write_ok(0, &old_data);
    const READS: u64 = 500;
    for _ in 0..READS {
        assert_eq!(client.read_ok(0, 4096), old_data);
    }
    let lease_reads = cluster
        .status(old_leader)
        .expect("leader status")
        .lease_reads;
    assert!(
        lease_reads > READS / 2,
        "only {lease_reads} of {READS} reads were answered from the lease"
    );

    // Reads on the old leader, back to back, from before the partition until after it stepped
    // down: when each was issued and answered, and what it returned.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        let (old_data, new_data) = (old_data.clone(), new_data.clone());
        thread::spawn(move || {
            client.set_timeout(Duration::from_secs(10));
            let mut reads = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let issued = Instant::now();
                let reply = client.read(0, 4096).expect("a reply from the old leader");
                let answer = match reply.error {
                    0 if reply.data == old_data => Ok("old"),
                    0 if reply.data == new_data => Ok("new"),
                    0 => panic!("block 0 holds neither write"),
                    error => Err(error),
                };
                reads.push((issued, Instant::now(), answer));
            }
            reads
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    cluster.set_links_of(old_leader, RelayMode::BlackHole);
    let partitioned_at = Instant::now();
    let new_leader = cluster.wait_for_leader(&majority, ELECTION_TIMEOUT_BOUND);
    let mut majority_client = cluster.nbd_client(new_leader, DEFAULT_EXPORT_NAME);
    majority_client.write_ok(0, &new_data);
    let acknowledged_at = Instant::now();
    cluster.wait_until(
        "the isolated old leader to step down (check_quorum)",
        ELECTION_TIMEOUT_BOUND,
        |cluster| {
            cluster
                .status(old_leader)
                .map(|status| !status.is_leader())
                .unwrap_or(false)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader thread");

    let since = |at: Instant| {
        at.checked_duration_since(partitioned_at)
            .map(|elapsed| format!("+{elapsed:.0?}"))
            .unwrap_or_else(|| format!("-{:.0?}", partitioned_at - at))
    };
    let lease_answers_in_partition = reads
        .iter()
        .filter(|(issued, _, answer)| *issued > partitioned_at && *answer == Ok("old"))
        .count();
    let last_old_answer = reads
        .iter()
        .filter(|(_, _, answer)| *answer == Ok("old"))
        .map(|(_, answered, _)| *answered)
        .max()
        .expect("reads before the partition");
    eprintln!(
        "lease: {lease_reads} of {READS} reads from the lease; {} reads on the isolated leader, \
         {lease_answers_in_partition} of them answered from the lease after the partition, \
         the last at {}; the new leader acknowledged its write at {}",
        reads.len(),
        since(last_old_answer),
        since(acknowledged_at)
    );
    for (issued, answered, answer) in &reads {
        assert!(
            !(*issued > acknowledged_at && *answer == Ok("old")),
            "a read issued at {} (answered at {}) returned the data the new leader had \
             overwritten at {}",
            since(*issued),
            since(*answered),
            since(acknowledged_at)
        );
    }
    assert!(
        lease_answers_in_partition > 0,
        "no read was answered from the lease once the partition began: the test saw no lease"
    );

    cluster.heal_all_links();
    let all = cluster.node_ids();
    cluster.wait_for_leader(&all, ELECTION_TIMEOUT_BOUND);
    let mut reader = cluster.nbd_client(old_leader, DEFAULT_EXPORT_NAME);
    cluster.wait_until(
        "the old leader to serve the new write after the heal",
        CONVERGENCE_TIMEOUT,
        |_| {
            reader
                .read(0, 4096)
                .is_ok_and(|reply| reply.data == new_data)
        },
    );
}

/// A 4 KiB block whose bytes say who wrote it (for the partition test).
fn tagged_block(tag: u8, block: u64) -> Vec<u8> {
    let mut data = vec![tag; 4096];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data
}

/// Requirement: "A partition: the isolated minority never acknowledges a write, the majority
/// elects and goes on, and after the heal no replica diverges." (Raft §5.2 and §6.4 with
/// check_quorum: a leader that cannot reach a majority steps down; §5.4.1: only entries
/// replicated on a majority commit.)
#[test]
fn partitioned_leader_never_acknowledges_and_the_majority_goes_on() {
    let _turn = one_cluster_at_a_time();
    // Requests on the isolated node give up quickly (ESHUTDOWN), so the test sees the answer.
    let options = ClusterOptions::default()
        .with_relays()
        .set("nbd", "request_timeout_ms", "4000");
    let mut cluster = Cluster::start(options);
    let old_leader = cluster.leader();
    let majority = cluster.others(old_leader);

    // A client of the old leader, connected before the partition; one write proves it works.
    let mut minority_client = cluster.nbd_client(old_leader, DEFAULT_EXPORT_NAME);
    minority_client.set_timeout(Duration::from_secs(60));
    minority_client.write_ok(0, &tagged_block(0x11, 0));

    cluster.set_links_of(old_leader, RelayMode::BlackHole);
    let partitioned_at = Instant::now();
    // Blocks 100..116 are written only through the isolated node.
    const MINORITY_BLOCKS: std::ops::Range<u64> = 100..116;
    let mut minority_handles = std::collections::HashMap::new();
    for block in MINORITY_BLOCKS {
        let handle = minority_client
            .submit_write(block * 4096, &tagged_block(0xee, block), 0)
            .expect("send a write to the isolated node");
        minority_handles.insert(handle, block);
    }

    // The majority elects a new leader and goes on writing.
    let new_leader = cluster.wait_for_leader(&majority, ELECTION_TIMEOUT_BOUND);
    assert_ne!(new_leader, old_leader);
    let mut majority_client = cluster.nbd_client(new_leader, DEFAULT_EXPORT_NAME);
    for block in 200..264u64 {
        majority_client.write_ok(block * 4096, &tagged_block(0x22, block));
    }
    // check_quorum: the isolated leader notices it lost the majority and steps down.
    cluster.wait_until(
        "the isolated old leader to step down (check_quorum)",
        ELECTION_TIMEOUT_BOUND,
        |cluster| {
            cluster
                .status(old_leader)
                .map(|status| !status.is_leader())
                .unwrap_or(false)
        },
    );

    // While isolated, every reply the old leader gives must be an error (ESHUTDOWN: the
    // request could not commit in time). Replies are awaited for twice the request timeout.
    let mut acknowledged_after_heal = Vec::new();
    let mut failed = Vec::new();
    let answer_deadline = partitioned_at + Duration::from_secs(8);
    minority_client.set_timeout(Duration::from_millis(500));
    while !minority_handles.is_empty() && Instant::now() < answer_deadline {
        match minority_client.receive_reply() {
            Ok(reply) => {
                let block = minority_handles
                    .remove(&reply.handle)
                    .expect("a reply to a write we sent");
                assert_ne!(
                    reply.error,
                    0,
                    "the isolated node acknowledged the write of block {block} during the \
                     partition ({:.1?} after it began)",
                    partitioned_at.elapsed()
                );
                failed.push((block, reply.error));
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => panic!("the connection to the isolated node failed: {error}"),
        }
    }
    eprintln!(
        "partition: {} writes to the isolated node failed ({:?}), {} unanswered after {:.1?}",
        failed.len(),
        failed
            .iter()
            .map(|(_, error)| nbd_error_name(*error))
            .collect::<Vec<_>>(),
        minority_handles.len(),
        partitioned_at.elapsed()
    );

    cluster.heal_all_links();
    // Late replies after the heal: a success is allowed now, but must then be durable.
    minority_client.set_timeout(Duration::from_secs(30));
    while !minority_handles.is_empty() {
        let reply = minority_client
            .receive_reply()
            .expect("the isolated node must answer every request after the heal");
        let block = minority_handles
            .remove(&reply.handle)
            .expect("known handle");
        if reply.error == 0 {
            acknowledged_after_heal.push(block);
        }
    }
    let all = cluster.node_ids();
    cluster.wait_for_leader(&all, ELECTION_TIMEOUT_BOUND);
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
    // Every node serves the majority's writes, the write before the partition, and any
    // minority write acknowledged after the heal; a failed write is either absent or whole.
    for id in &all {
        let mut reader = cluster.nbd_client(*id, DEFAULT_EXPORT_NAME);
        assert_eq!(
            reader.read_ok(0, 4096),
            tagged_block(0x11, 0),
            "node {id}, block 0"
        );
        for block in 200..264u64 {
            assert_eq!(
                reader.read_ok(block * 4096, 4096),
                tagged_block(0x22, block),
                "node {id}: the majority's write of block {block}"
            );
        }
        for block in MINORITY_BLOCKS {
            let data = reader.read_ok(block * 4096, 4096);
            if acknowledged_after_heal.contains(&block) {
                assert_eq!(data, tagged_block(0xee, block), "node {id}, block {block}");
            } else {
                assert!(
                    data == tagged_block(0xee, block) || data.iter().all(|byte| *byte == 0),
                    "node {id}: block {block} holds neither the failed write nor zeroes"
                );
            }
        }
    }
}

/// Requirement: "Whole-cluster kill -9 of all servers mid-load, restart: every acknowledged
/// write present." Two clients, one on the leader and one on a follower (whose writes are
/// forwarded to the leader), each with its own region; all three servers die together.
#[test]
fn whole_cluster_kill_9_mid_load_keeps_every_acknowledged_write() {
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("whole_cluster_kill_9");
    let mut cluster = Cluster::start(ClusterOptions::default());
    let mut regions = vec![
        VerifiedRegion::new(4 * MIB, 2048, 1),
        VerifiedRegion::new(24 * MIB, 2048, 1 << 40),
    ];
    for round in 1..=2u32 {
        let leader = cluster.leader();
        let follower = cluster.others(leader)[0];
        let loads: Vec<BackgroundLoad> = regions
            .drain(..)
            .zip([leader, follower])
            .map(|(region, node)| {
                BackgroundLoad::start(
                    cluster.nbd_client(node, DEFAULT_EXPORT_NAME),
                    region,
                    random.next_u64(),
                )
            })
            .collect();
        for load in &loads {
            load.wait_for_more_acknowledgements(300, Duration::from_secs(60), "before the kill");
        }
        thread::sleep(Duration::from_millis(random.below(500)));
        cluster.kill_9_all();
        let mut acknowledged = Vec::new();
        for load in loads {
            let (region, statistics) = load.finish();
            assert!(
                statistics.transport_error.is_some(),
                "round {round}: the load must have been cut by the kill: {statistics:?}"
            );
            acknowledged.push(statistics.acknowledged());
            regions.push(region);
        }
        cluster.restart_all_stopped();
        let all = cluster.node_ids();
        let leader = cluster.wait_for_leader(&all, Duration::from_secs(60));
        for (index, region) in regions.iter_mut().enumerate() {
            // Read through a different node than the one that took the writes.
            let reader_node = all[(index + round as usize) % all.len()];
            let mut reader = cluster.nbd_client(reader_node, DEFAULT_EXPORT_NAME);
            let blocks_holding_writes = region.verify(
                &mut reader,
                &format!("round {round}, region {index}, read through node {reader_node}"),
            );
            assert!(
                blocks_holding_writes >= 150,
                "round {round}: only {blocks_holding_writes} blocks of region {index} hold writes"
            );
        }
        eprintln!(
            "round {round}: {acknowledged:?} requests acknowledged before the kill; all present \
             after the restart (leader {leader})"
        );
    }
    let all = cluster.node_ids();
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
}

/// Requirement: "A second read-write attach of the same volume is refused with a clear error."
/// At the control API and the NBD exports of the servers: attach, refusal of a second client,
/// forced takeover, fencing of the old epoch.
#[test]
fn second_attach_is_refused_and_a_forced_takeover_fences_the_first_writer() {
    let _turn = one_cluster_at_a_time();
    let mut cluster = Cluster::start(ClusterOptions::default());
    let leader = cluster.leader();
    let follower = cluster.others(leader)[0];
    let control = cluster.node(leader).control_address;
    let attach = |client: &str, force: bool| {
        http_post(
            control,
            "/v1/volumes/disk0/attach",
            &serde_json::json!({ "client": client, "force": force }),
        )
        .unwrap_or_else(|error| panic!("POST attach: {error}"))
    };
    let first = attach("alpha", false);
    assert_eq!(first.status, 200, "attach by alpha: {:?}", first.body);
    let first_epoch = first.body["epoch"]
        .as_u64()
        .expect("epoch in the attach reply");

    let refused = attach("beta", false);
    assert_eq!(
        refused.status, 409,
        "a second writer must be refused: {:?}",
        refused.body
    );
    let message = refused.body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("attached") && message.contains("alpha"),
        "the refusal must say who holds the volume: {message:?}"
    );

    // The attached writer's session; an anonymous session is read-only now.
    let mut first_writer = cluster.nbd_client(follower, &format!("disk0@{first_epoch}"));
    first_writer.write_ok(0, &tagged_block(0xa1, 0));

    let takeover = attach("beta", true);
    assert_eq!(
        takeover.status, 200,
        "forced attach by beta: {:?}",
        takeover.body
    );
    let second_epoch = takeover.body["epoch"].as_u64().expect("epoch");
    assert!(
        second_epoch > first_epoch,
        "epochs grow: {first_epoch} then {second_epoch}"
    );

    let fenced = first_writer
        .write(4096, &tagged_block(0xa2, 1))
        .expect("the fenced writer still gets a reply");
    assert_eq!(
        fenced.error,
        nbd::EPERM,
        "a write of the fenced epoch must fail with EPERM, got {}",
        nbd_error_name(fenced.error)
    );
    let mut second_writer = cluster.nbd_client(leader, &format!("disk0@{second_epoch}"));
    second_writer.write_ok(4096, &tagged_block(0xb2, 1));
    assert_eq!(
        second_writer.read_ok(0, 8192)[4096..],
        tagged_block(0xb2, 1)[..]
    );

    // An anonymous session on an attached volume is read-only: advertised so, and its
    // writes refused.
    let mut anonymous = cluster.nbd_client(follower, DEFAULT_EXPORT_NAME);
    let anonymous_write = anonymous
        .write(8192, &tagged_block(0xcc, 2))
        .expect("a reply to the anonymous write");
    assert_eq!(
        anonymous_write.error,
        nbd::EPERM,
        "an anonymous write to an attached volume must fail with EPERM, got {}",
        nbd_error_name(anonymous_write.error)
    );
    assert_ne!(
        anonymous.export.transmission_flags & nbd::FLAG_READ_ONLY,
        0,
        "an anonymous session on an attached volume must be advertised READ_ONLY"
    );

    let stale = http_delete(
        control,
        &format!("/v1/volumes/disk0/attach?epoch={first_epoch}"),
    )
    .expect("DELETE attach");
    assert_eq!(
        stale.status, 409,
        "detach with a stale epoch: {:?}",
        stale.body
    );
    let detached = http_delete(
        control,
        &format!("/v1/volumes/disk0/attach?epoch={second_epoch}"),
    )
    .expect("DELETE attach");
    assert_eq!(detached.status, 200, "detach: {:?}", detached.body);
    let all = cluster.node_ids();
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
}

/// A write the proxy failed at its request deadline may still land (the server retries it
/// until its own timeout), but never after a later write to its block that the proxy
/// acknowledged: the proxy attaches again (a new epoch) before it sends anything else, so the
/// old write is fenced if it commits after that.
#[test]
fn a_write_failed_at_the_proxy_deadline_never_lands_after_a_later_acknowledged_one() {
    let _turn = one_cluster_at_a_time();
    let mut cluster = Cluster::start(ClusterOptions {
        relays: true,
        ..ClusterOptions::default()
    });
    let config = cluster.workspace().join("proxy-deadline.toml");
    std::fs::write(
        &config,
        "[proxy]\nrequest_deadline_ms = 400\nupstream_reply_timeout_ms = 400\ncache_bytes = 0\n",
    )
    .expect("proxy config");
    let config = config.display().to_string();
    let proxy = ProxyProcess::start(&cluster, "deadline", &["--config", &config]);
    let mut client = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    const BLOCKS: u64 = 16;
    let content = |tag: u8, block: u64| vec![tag.wrapping_add(block as u8); 4096];
    for block in 0..BLOCKS {
        assert!(client
            .write(block * 4096, &content(0x10, block))
            .expect("write")
            .is_ok());
    }

    // The two followers never hear from each other again, so only the leader can win an
    // election; cut off from both, it steps down with the B writes in its log.
    let leader = cluster.leader();
    let followers: Vec<u64> = cluster
        .node_ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster
        .relay(followers[0], followers[1])
        .set_mode(RelayMode::BlackHole);
    cluster
        .relay(followers[1], followers[0])
        .set_mode(RelayMode::BlackHole);
    for follower in &followers {
        cluster.relay(leader, *follower).set_mode(RelayMode::Close);
        cluster.relay(*follower, leader).set_mode(RelayMode::Close);
    }
    for block in 0..BLOCKS {
        client
            .submit_write(block * 4096, &content(0x40, block), 0)
            .expect("submit");
    }
    for _ in 0..BLOCKS {
        let reply = client.receive_reply().expect("reply");
        assert!(!reply.is_ok(), "a write committed without a quorum");
    }
    // Long enough for the leader to step down: the server now retries the writes.
    thread::sleep(Duration::from_millis(1500));
    for follower in &followers {
        cluster.relay(leader, *follower).set_mode(RelayMode::Pass);
        cluster.relay(*follower, leader).set_mode(RelayMode::Pass);
    }
    let back = cluster.wait_for_leader(&[leader, followers[0]], Duration::from_secs(30));
    assert_eq!(
        back, leader,
        "only the old leader can win with the followers apart"
    );
    // The later writes, spread over the servers' retry interval.
    for block in 0..BLOCKS {
        let reply = client
            .write(block * 4096, &content(0x70, block))
            .expect("write");
        assert!(reply.is_ok(), "write after the heal: error {}", reply.error);
        thread::sleep(Duration::from_millis(15));
    }
    // Let the servers' retries of the failed writes run their course, then read each block
    // on every server.
    thread::sleep(Duration::from_secs(2));
    cluster.heal_all_links();
    for id in cluster.node_ids() {
        cluster.wait_caught_up(id, Duration::from_secs(30));
        let mut direct = cluster.nbd_client(id, DEFAULT_EXPORT_NAME);
        for block in 0..BLOCKS {
            let data = direct.read(block * 4096, 4096).expect("read").data;
            assert!(
                data == content(0x70, block),
                "node {id} block {block}: {} after an acknowledged later write\n{}",
                if data == content(0x40, block) {
                    "the write that failed at the deadline landed"
                } else {
                    "unexpected content"
                },
                proxy.log_text()
            );
        }
    }
}

/// A write the proxy answered with an error (here EIO at its request deadline) may still land:
/// the server goes on retrying it. Once it has, the proxy must not serve the block from its
/// cache as it was before the write.
#[test]
fn a_block_whose_write_failed_is_not_served_from_the_proxy_cache_as_before() {
    let _turn = one_cluster_at_a_time();
    // An election timeout (2 s) longer than the write's stall: the leader keeps the write in
    // its log while the proxy gives up on it (its reply timeout, then its deadline).
    let mut cluster = Cluster::start(ClusterOptions {
        settings: vec![("raft".into(), "election_ticks".into(), "40".into())],
        ..ClusterOptions::default()
    });
    let config = cluster.workspace().join("proxy-short-deadline.toml");
    std::fs::write(
        &config,
        "[proxy]\nrequest_deadline_ms = 600\nupstream_reply_timeout_ms = 300\n",
    )
    .expect("proxy config");
    let config = config.display().to_string();
    let proxy = ProxyProcess::start(&cluster, "short-deadline", &["--config", &config]);
    let mut client = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    let before = vec![0xa1u8; 4096];
    let after = vec![0xb2u8; 4096];
    assert!(client.write(0, &before).expect("write").is_ok());
    // Read once, so that the proxy caches the block.
    assert_eq!(client.read(0, 4096).expect("read").data, before);

    // Without its followers the leader cannot commit: the write fails at the proxy's deadline.
    let leader = cluster.leader();
    let followers: Vec<u64> = cluster
        .node_ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let paused: Vec<PausedNode> = followers
        .iter()
        .map(|id| cluster.node(*id).pause())
        .collect();
    let failed = client.write(0, &after).expect("write");
    assert!(
        !failed.is_ok(),
        "the write must fail while the leader has no quorum\n{}",
        proxy.log_text()
    );
    drop(paused);

    // The servers still hold the write and commit it once the followers are back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = cluster.wait_for_leader(&cluster.node_ids(), Duration::from_secs(30));
        let mut direct = cluster.nbd_client(leader, DEFAULT_EXPORT_NAME);
        if direct.read(0, 4096).expect("direct read").data == after {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed write never landed on the servers: this test needs it to"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let through_proxy = client.read(0, 4096).expect("read");
    assert!(
        through_proxy.is_ok() && through_proxy.data == after,
        "the servers hold the write that failed, but the proxy answered {} with the block as it \
         was before it (error {})\n{}",
        if through_proxy.data == before {
            "from its cache"
        } else {
            "otherwise"
        },
        through_proxy.error,
        proxy.log_text()
    );
}

/// Proxy "alpha" (`first`, client `alpha`) writes block 0 and reads it back, so that it
/// caches it (`cached`); then proxy "beta-forced" takes the volume over and overwrites block 0.
struct CachedThenTakenOver {
    first: ProxyProcess,
    alpha: NbdClient,
    cached: Vec<u8>,
    _second: ProxyProcess,
}

fn cached_then_taken_over(cluster: &Cluster) -> CachedThenTakenOver {
    let first = ProxyProcess::start(cluster, "alpha", &[]);
    let mut alpha = NbdClient::connect(first.listen_address, DEFAULT_EXPORT_NAME);
    let cached = vec![0xa1u8; 4096];
    assert!(alpha.write(0, &cached).expect("write").is_ok());
    assert_eq!(alpha.read(0, 4096).expect("read").data, cached);

    let second = ProxyProcess::start(cluster, "beta-forced", &["--force-attach"]);
    let mut beta = NbdClient::connect(second.listen_address, DEFAULT_EXPORT_NAME);
    assert!(beta.write(0, &[0xb2u8; 4096]).expect("write").is_ok());
    CachedThenTakenOver {
        first,
        alpha,
        cached,
        _second: second,
    }
}

/// A proxy whose volume another client took over, and that only reads, learns of it from the
/// servers' status within a few polls and from then on serves nothing of it from its cache.
#[test]
fn a_proxy_whose_volume_was_taken_over_stops_serving_its_cache_within_a_few_status_polls() {
    let _turn = one_cluster_at_a_time();
    let cluster = Cluster::start(ClusterOptions::default());
    let CachedThenTakenOver {
        first,
        mut alpha,
        cached,
        _second,
    } = cached_then_taken_over(&cluster);

    // The status is polled every second: three polls.
    thread::sleep(Duration::from_secs(3));
    let read = alpha.read(0, 4096).expect("read");
    assert!(
        !(read.is_ok() && read.data == cached),
        "three status polls after the takeover the first proxy still served a block from its \
         cache that the new writer has overwritten\n{}",
        first.log_text()
    );
}

/// A proxy that learns its volume was taken over by another writer (its next write is fenced)
/// serves no more reads from its cache: what it cached may have been overwritten since.
#[test]
fn a_proxy_that_lost_its_volume_serves_no_reads_from_its_cache() {
    let _turn = one_cluster_at_a_time();
    let cluster = Cluster::start(ClusterOptions::default());
    let CachedThenTakenOver {
        first,
        mut alpha,
        cached,
        _second,
    } = cached_then_taken_over(&cluster);

    let fenced = alpha.write(8192, &cached).expect("write");
    assert_eq!(
        fenced.error,
        nbd::EPERM,
        "the first proxy's write must be refused as fenced\n{}",
        first.log_text()
    );
    let read = alpha.read(0, 4096).expect("read");
    assert!(
        !(read.is_ok() && read.data == cached),
        "after losing the volume the first proxy served a block from its cache that the new \
         writer has overwritten\n{}",
        first.log_text()
    );
}

/// The same requirement through `raftblk proxy`: a second proxy with another client id is
/// refused with a clear NBD handshake error (shown by nbdinfo); with force it takes over and
/// the first proxy's writes are fenced.
#[test]
fn a_second_proxy_is_refused_and_with_force_fences_the_first() {
    let _turn = one_cluster_at_a_time();
    require_tools(&["nbdinfo", "qemu-io"]);
    let cluster = Cluster::start(ClusterOptions::default());
    let first = ProxyProcess::start(&cluster, "alpha", &[]);
    let qemu_write = |uri: &str, pattern: &str| {
        run_command(
            std::process::Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} 0 64k"),
                uri,
            ]),
            Duration::from_secs(60),
        )
    };
    qemu_write(&first.uri(DEFAULT_EXPORT_NAME), "0xa1").assert_success();

    let second = ProxyProcess::start(&cluster, "beta", &[]);
    let refused = run_command(
        // LIBNBD_DEBUG shows the text of the server's NBD_REP_ERR reply, which nbdinfo's own
        // message reduces to an errno.
        std::process::Command::new("nbdinfo")
            .env("LIBNBD_DEBUG", "1")
            .arg(second.uri(DEFAULT_EXPORT_NAME)),
        Duration::from_secs(60),
    );
    assert!(
        !refused.status.success(),
        "nbdinfo through the second proxy must fail\n{}",
        refused.describe()
    );
    let text = refused.stderr_text();
    assert!(
        text.contains("attached") && text.contains("alpha"),
        "the handshake error must say the volume is attached by alpha\n{}",
        refused.describe()
    );

    let forced = ProxyProcess::start(&cluster, "beta-forced", &["--force-attach"]);
    qemu_write(&forced.uri(DEFAULT_EXPORT_NAME), "0xb2").assert_success();
    let fenced = qemu_write(&first.uri(DEFAULT_EXPORT_NAME), "0xa3");
    let output = format!("{}{}", fenced.stdout_text(), fenced.stderr_text());
    // The refusal itself, EPERM from the fencing rule; not any failure of qemu-io.
    assert!(
        output.contains("Operation not permitted"),
        "the first proxy's write after the takeover must be refused with EPERM\n{}",
        fenced.describe()
    );
    let check = run_command(
        std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xb2 0 64k",
            &forced.uri(DEFAULT_EXPORT_NAME),
        ]),
        Duration::from_secs(60),
    )
    .assert_success();
    assert!(
        !check.stdout_text().contains("Pattern verification failed"),
        "the fenced write must not have landed\n{}",
        check.describe()
    );
}

/// Requirement: "`raftblk proxy` ... presents the cluster's volumes". A volume's allocation map
/// is part of what it presents: through the proxy, `nbdinfo --map` must give the servers' own
/// `base:allocation` map (data, holes, zeroes allocated in place), so sparse-aware clients skip
/// the holes; and `nbdcopy` through the proxy must copy the data, and only the data.
#[test]
fn the_proxy_passes_the_servers_allocation_map_through() {
    let _turn = one_cluster_at_a_time();
    require_tools(&["nbdinfo", "qemu-io", "nbdcopy"]);
    const MIB: u64 = 1 << 20;
    let options = ClusterOptions::default();
    const VOLUME_BYTES: u64 = 64 * MIB;
    assert_eq!(options.volume_size_bytes, VOLUME_BYTES);
    let cluster = Cluster::start(options);
    let proxy = ProxyProcess::start(&cluster, "alpha", &[]);
    let through_proxy = proxy.uri(DEFAULT_EXPORT_NAME);
    run_command(
        std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 2M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0xcd 20M 64k",
            "-c",
            "write -P 0xef 40M 1M",
            "-c",
            "discard 40M 512k",
            &through_proxy,
        ]),
        Duration::from_secs(60),
    )
    .assert_success();
    let map = |uri: &str| {
        run_command(
            std::process::Command::new("nbdinfo").args(["--map", "--json", uri]),
            Duration::from_secs(60),
        )
        .assert_success()
        .stdout_json()
    };
    let proxy_map = map(&through_proxy);
    let extents = proxy_map
        .as_array()
        .expect("nbdinfo --map --json gives an array");
    // (offset, length, type) of every extent: type 0 data, 2 zero, 3 hole and zero.
    let triples: Vec<(u64, u64, u64)> = extents
        .iter()
        .map(|extent| {
            let field = |name: &str| {
                extent[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("extent without {name}: {extent}"))
            };
            (field("offset"), field("length"), field("type"))
        })
        .collect();
    let type_at = |offset: u64| {
        triples
            .iter()
            .find(|(start, length, _)| (*start..start + length).contains(&offset))
            .map(|(_, _, kind)| *kind)
            .unwrap_or_else(|| panic!("no extent covers {offset}: {triples:?}"))
    };
    assert_eq!(type_at(0), 0, "written data: {triples:?}");
    assert_eq!(type_at(2 * MIB), 3, "never written: a hole: {triples:?}");
    assert_eq!(
        type_at(4 * MIB),
        2,
        "zeroed in place: allocated zeroes: {triples:?}"
    );
    assert_eq!(type_at(20 * MIB), 0, "written data: {triples:?}");
    assert_eq!(type_at(40 * MIB), 3, "trimmed: a hole: {triples:?}");
    assert_eq!(
        type_at(40 * MIB + 512 * 1024),
        0,
        "written data: {triples:?}"
    );
    assert_eq!(type_at(50 * MIB), 3, "never written: a hole: {triples:?}");
    let total: u64 = triples.iter().map(|(_, length, _)| length).sum();
    assert_eq!(
        total, VOLUME_BYTES,
        "the map covers the whole volume: {triples:?}"
    );
    for id in cluster.node_ids() {
        assert_eq!(
            map(&cluster.node(id).uri(DEFAULT_EXPORT_NAME)),
            proxy_map,
            "node {id}'s own map differs from the one through the proxy"
        );
    }

    let copy = cluster.workspace().join("copy.img");
    run_command(
        std::process::Command::new("nbdcopy")
            .args([through_proxy.as_str(), copy.to_str().unwrap()]),
        Duration::from_secs(120),
    )
    .assert_success();
    let image = std::fs::read(&copy).expect("read the copy");
    assert_eq!(image.len() as u64, VOLUME_BYTES);
    assert!(image[..2 * MIB as usize].iter().all(|&byte| byte == 0xab));
    let at = |offset: u64, length: u64| &image[offset as usize..(offset + length) as usize];
    assert!(at(20 * MIB, 64 * 1024).iter().all(|&byte| byte == 0xcd));
    assert!(at(40 * MIB + 512 * 1024, 512 * 1024)
        .iter()
        .all(|&byte| byte == 0xef));
    let nonzero = image.iter().filter(|&&byte| byte != 0).count() as u64;
    assert_eq!(
        nonzero,
        2 * MIB + 64 * 1024 + 512 * 1024,
        "nothing else is data"
    );
    drop(image);
    let allocated = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&copy).expect("stat the copy").blocks() * 512
    };
    assert!(
        allocated < 16 * MIB,
        "nbdcopy must skip the holes: the copy has {allocated} bytes allocated"
    );
}

/// The proxy's attach can commit twice: after a leader kill a server may still be retrying the
/// proxy's first attach when the proxy, timed out there, attaches at another server; if the
/// late one commits last, the epoch the proxy holds is overtaken. The proxy must then
/// re-attach and reissue, not answer its client EPERM ("the client never sees an I/O error
/// while a quorum lives"). The late attach is made here directly through a control API,
/// with the proxy's own client id; a takeover by another client must still fence it.
#[test]
fn a_late_attach_of_the_proxys_own_does_not_fence_its_client() {
    let _turn = one_cluster_at_a_time();
    let cluster = Cluster::start(ClusterOptions::default());
    let proxy = ProxyProcess::start(&cluster, "alpha", &[]);
    let mut client = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    let block = |tag: u8| vec![tag; 4096];
    client.write_ok(0, &block(1));

    let late_attach = |client_id: &str, force: bool| {
        let node = cluster.node(cluster.node_ids()[0]);
        let answer = http_post(
            node.control_address,
            "/v1/volumes/disk0/attach",
            &serde_json::json!({ "client": client_id, "force": force }),
        )
        .unwrap_or_else(|error| panic!("POST attach: {error}"));
        assert_eq!(
            answer.status, 200,
            "attach by {client_id}: {:?}",
            answer.body
        );
    };
    for round in 0..3u8 {
        late_attach("alpha", false);
        let tag = 2 + round;
        let reply = client
            .write(4096 * u64::from(round + 1), &block(tag))
            .expect("write");
        assert_eq!(
            reply.error,
            0,
            "a write after a late attach of the proxy's own client id must succeed, got {}\n{}",
            nbd_error_name(reply.error),
            proxy.log_text()
        );
    }
    for round in 0..3u8 {
        assert_eq!(
            client.read_ok(4096 * u64::from(round + 1), 4096),
            block(2 + round),
            "block {} after the re-attach",
            round + 1
        );
    }
    assert!(
        proxy
            .log_text()
            .contains("upstream write fenced; re-attaching"),
        "the writes must have been fenced and reissued, not merely raced past the attach\n{}",
        proxy.log_text()
    );

    // A real takeover by another client still ends this proxy's writes.
    late_attach("beta", true);
    let reply = client
        .write(0, &block(9))
        .expect("write after the takeover");
    assert_eq!(
        nbd_error_name(reply.error),
        "EPERM",
        "a write after another client's forced takeover must be refused"
    );
    // The proxy has lost the volume (it refuses everything now); read through a server.
    let mut reader = cluster.nbd_client(cluster.node_ids()[0], DEFAULT_EXPORT_NAME);
    assert_eq!(
        reader.read_ok(0, 4096),
        block(1),
        "the fenced write must not have landed"
    );
}

/// One attach request retried at every server (what the proxy does when a server does not
/// answer in time) makes one attachment: each retry with the same attach id, on the leader or
/// a follower, answers with the epoch the first made, and writes under it still land. A new
/// request of the same client (a new id) starts a new epoch and fences the old one.
#[test]
fn an_attach_retried_at_every_server_makes_one_epoch() {
    let _turn = one_cluster_at_a_time();
    let mut cluster = Cluster::start(ClusterOptions::default());
    let leader = cluster.leader();
    let nodes = cluster.node_ids();
    let controls: Vec<(u64, std::net::SocketAddr)> = nodes
        .iter()
        .map(|&node| (node, cluster.node(node).control_address))
        .collect();
    let attach_at = |(node, control): (u64, std::net::SocketAddr), attach_id: u64| -> u64 {
        let answer = http_post(
            control,
            "/v1/volumes/disk0/attach",
            &serde_json::json!({ "client": "gamma", "force": false, "attach_id": attach_id }),
        )
        .unwrap_or_else(|error| panic!("POST attach at node {node}: {error}"));
        assert_eq!(
            answer.status, 200,
            "attach at node {node}: {:?}",
            answer.body
        );
        answer.body["epoch"]
            .as_u64()
            .expect("epoch in the attach reply")
    };
    let epoch = attach_at(controls[0], 41);
    for &control in &controls {
        assert_eq!(
            attach_at(control, 41),
            epoch,
            "a retry of the same attach at node {} must keep the epoch",
            control.0
        );
    }
    let mut writer = cluster.nbd_client(leader, &format!("{DEFAULT_EXPORT_NAME}@{epoch}"));
    writer.write_ok(0, &[5u8; 4096]);

    let next = attach_at(controls[1], 42);
    assert!(next > epoch, "a new attach request starts a new epoch");
    let reply = writer.write(4096, &[6u8; 4096]).expect("write");
    assert_eq!(
        nbd_error_name(reply.error),
        "EPERM",
        "the old epoch is fenced by the new attachment"
    );
    let mut reader = cluster.nbd_client(leader, DEFAULT_EXPORT_NAME);
    assert_eq!(reader.read_ok(0, 4096), vec![5u8; 4096]);
    assert_eq!(reader.read_ok(4096, 4096), vec![0u8; 4096]);
}

/// The fault-injecting relay itself (the partition test is only as good as it is): bytes pass
/// intact, a black hole delivers nothing while keeping the connection open and resumes intact
/// after the heal, a delay delays, and `Close` ends open connections.
#[test]
fn relay_passes_black_holes_delays_and_closes() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    let echo_listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo server");
    let echo_address = echo_listener.local_addr().expect("echo address");
    thread::spawn(move || {
        for stream in echo_listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(count) = stream.read(&mut buffer) {
                    if count == 0 || stream.write_all(&buffer[..count]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let relay = common::relay::Relay::start(echo_address);
    let mut client = TcpStream::connect(relay.listen_address).expect("connect through the relay");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let echo = |client: &mut TcpStream, message: &[u8]| -> std::io::Result<Vec<u8>> {
        client.write_all(message)?;
        let mut answer = vec![0u8; message.len()];
        client.read_exact(&mut answer)?;
        Ok(answer)
    };
    assert_eq!(echo(&mut client, b"pass").expect("echo in Pass"), b"pass");

    relay.set_mode(RelayMode::BlackHole);
    client
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    client
        .write_all(b"held")
        .expect("the connection stays open");
    let mut buffer = [0u8; 4];
    let error = client
        .read_exact(&mut buffer)
        .expect_err("nothing crosses a black hole");
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "a black hole is silence, not a close: {error}"
    );
    relay.set_mode(RelayMode::Pass);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client
        .read_exact(&mut buffer)
        .expect("held bytes arrive after the heal");
    assert_eq!(&buffer, b"held");

    relay.set_mode(RelayMode::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(echo(&mut client, b"slow").expect("echo in Delay"), b"slow");
    // Both directions are delayed: at least two delays for the round trip.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );

    relay.set_mode(RelayMode::Close);
    let mut rest = Vec::new();
    let closed = client.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "Close ends the connection: {closed:?}"
    );
    relay.set_mode(RelayMode::Pass);
    let mut again = TcpStream::connect(relay.listen_address).expect("reconnect");
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(
        echo(&mut again, b"back").expect("echo after Close"),
        b"back"
    );
}

/// Bytes a node's data directory occupies on disk (allocated blocks): what catching up moved
/// to a new member.
fn allocated_bytes(directory: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut pending = vec![directory.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(metadata) if metadata.is_dir() => pending.push(entry.path()),
                Ok(metadata) => total += metadata.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// One measured membership phase of the test below.
struct MembershipPhase {
    name: &'static str,
    took: Duration,
    new_member_bytes: u64,
    longest_stall: Duration,
    acknowledged: u64,
}

/// The voters as node 1..n's statuses report them, sorted; `None` until a leader reports.
fn voters_of(cluster: &Cluster, among: &[u64]) -> Option<Vec<u64>> {
    let leader = cluster.agreed_leader(among)?;
    let status = cluster.status(leader).ok()?;
    let mut voters: Vec<u64> = status.json["raft"]["voters"]
        .as_array()?
        .iter()
        .filter_map(|id| id.as_u64())
        .collect();
    voters.sort_unstable();
    Some(voters)
}

/// Requirement (membership): "3→4→3 and a replace under verified client load with
/// zero client errors; the table of 3→4→3 vs 3→2→3". Raft §6 / the joint-consensus
/// extension: a new node joins as a learner (it does not count for the quorum while it
/// catches up by snapshot and log), is promoted once caught up, and a replace is one joint
/// change. The client writes through the proxy during every phase and sees no error; the
/// proxy follows the membership to nodes it was not configured with.
#[test]
fn membership_changes_under_load_lose_nothing_and_the_proxy_follows() {
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("membership_changes");
    let mut cluster = Cluster::start(ClusterOptions::default());
    let mut proxy = ProxyProcess::start(&cluster, "membership-client", &[]);
    let minute = Duration::from_secs(60);
    let mut region = VerifiedRegion::new(16 * MIB, 2048, 1);
    // Old data for the new members' snapshots to carry.
    {
        let load = BackgroundLoad::start(
            NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME),
            region,
            random.next_u64(),
        );
        load.wait_for_more_acknowledgements(1500, minute, "before any change");
        let (finished_region, statistics) = load.finish();
        assert!(statistics.transport_error.is_none(), "{statistics:?}");
        region = finished_region;
    }
    let mut phases = Vec::new();
    let mut run_phase = |cluster: &mut Cluster,
                         region: VerifiedRegion,
                         name: &'static str,
                         change: &mut dyn FnMut(&mut Cluster) -> u64|
     -> VerifiedRegion {
        let load = BackgroundLoad::start(
            NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME),
            region,
            random.next_u64(),
        );
        load.wait_for_more_acknowledgements(200, minute, name);
        let started = Instant::now();
        let new_member = change(cluster);
        let took = started.elapsed();
        let installed = cluster
            .status(new_member)
            .map(|status| status.snapshots_installed)
            .unwrap_or(0);
        assert!(
            installed >= 1,
            "node {new_member} caught up without a snapshot, yet the log was compacted long ago"
        );
        load.wait_for_more_acknowledgements(200, minute, name);
        let (region, statistics) = load.finish();
        assert!(
            statistics.transport_error.is_none(),
            "the client saw an error during {name}: {:?}",
            statistics.transport_error
        );
        phases.push(MembershipPhase {
            name,
            took,
            new_member_bytes: allocated_bytes(&cluster.node(new_member).data_directory),
            longest_stall: statistics.longest_reply_gap,
            acknowledged: statistics.acknowledged(),
        });
        region
    };
    let add = |cluster: &mut Cluster| -> u64 {
        let id = cluster.start_joining_node();
        let mut arguments = vec!["add".to_string()];
        arguments.extend(cluster.member_arguments(id));
        cluster.ctl_members(&arguments);
        id
    };
    let remove = |cluster: &mut Cluster, id: u64| {
        cluster.ctl_members(&["remove".to_string(), id.to_string()]);
        cluster.retire(id);
    };

    // 3→4→3: grow first, then remove node 1 (possibly the leader, which steps aside).
    region = run_phase(
        &mut cluster,
        region,
        "3→4→3 (add 4, remove 1)",
        &mut |cluster| {
            let added = add(cluster);
            assert_eq!(
                voters_of(cluster, &[1, 2, 3, added]),
                Some(vec![1, 2, 3, added])
            );
            remove(cluster, 1);
            added
        },
    );
    // 3→2→3: shrink first, then add a fresh node 5.
    region = run_phase(
        &mut cluster,
        region,
        "3→2→3 (remove 2, add 5)",
        &mut |cluster| {
            remove(cluster, 2);
            add(cluster)
        },
    );
    // Replace node 3 by node 6 in one joint change.
    region = run_phase(
        &mut cluster,
        region,
        "replace 3 by 6 (joint)",
        &mut |cluster| {
            let id = cluster.start_joining_node();
            let mut arguments = vec!["replace".to_string(), "3".to_string()];
            arguments.extend(cluster.member_arguments(id));
            cluster.ctl_members(&arguments);
            cluster.retire(3);
            id
        },
    );

    let remaining = cluster.node_ids();
    assert_eq!(remaining, vec![4, 5, 6]);
    cluster.wait_until("the voters to be exactly 4, 5, 6", minute, |cluster| {
        voters_of(cluster, &[4, 5, 6]) == Some(vec![4, 5, 6])
    });
    let listing = cluster.ctl_members(&["list".to_string()]);
    assert_eq!(
        listing
            .lines()
            .filter(|line| line.contains(" voter "))
            .count(),
        3,
        "ctl members list:\n{listing}"
    );
    // Every acknowledged write, read back through the proxy (which by now talks only to
    // members it learned about) and on every replica.
    let mut reader = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    let blocks_holding_writes = region.verify(&mut reader, "after three membership changes");
    assert!(blocks_holding_writes > 1000, "{blocks_holding_writes}");
    cluster.assert_replicas_identical(&remaining, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
    proxy.assert_running("after the membership changes");

    eprintln!("\n| phase | took | bytes on the new member | longest client stall | requests acknowledged |");
    eprintln!("|---|---|---|---|---|");
    for phase in &phases {
        eprintln!(
            "| {} | {:.1?} | {:.1} MiB | {:.0?} | {} |",
            phase.name,
            phase.took,
            phase.new_member_bytes as f64 / MIB as f64,
            phase.longest_stall,
            phase.acknowledged
        );
    }
}

/// The members-replace race: a learner the operator saw caught up can be behind again by the
/// time the leader is asked to promote it, because writes go on in between. Here the race is
/// made certain rather than left to timing: after `members add --learner` returned (the
/// learner caught up), the learner is stopped (SIGSTOP) until the leader's commit index is
/// more than the promotion threshold past it, and the promotion is asked for while it is
/// still stopped; it is resumed a second later. The leader must wait for it (bounded) and
/// then promote it, not refuse. Three replaces in a row (1 by 4, 2 by 5, 3 by 6; one of the
/// old nodes leads, so leadership moves too) under the suite's heaviest load, 32 verified
/// writes in flight through the proxy; the client sees no error and every write reads back.
#[test]
fn replaces_in_a_row_promote_a_learner_that_fell_behind_under_load() {
    /// The leader's promotion threshold (`PROMOTE_LAG_ENTRIES_MAX`).
    const PROMOTE_LAG_ENTRIES: u64 = 256;
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("replaces_in_a_row");
    let mut cluster = Cluster::start(ClusterOptions::default());
    let mut proxy = ProxyProcess::start(&cluster, "replace-client", &[]);
    let minute = Duration::from_secs(60);
    let load = BackgroundLoad::start(
        NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME),
        VerifiedRegion::new(16 * MIB, 2048, 1),
        random.next_u64(),
    );
    load.wait_for_more_acknowledgements(500, minute, "before the replaces");
    let mut voters = vec![1, 2, 3];
    for old in [1, 2, 3] {
        let new = cluster.start_joining_node();
        let mut arguments = vec!["add".to_string(), "--learner".to_string()];
        arguments.extend(cluster.member_arguments(new));
        cluster.ctl_members(&arguments);

        let paused = cluster.node(new).pause();
        let mut lag = 0;
        cluster.wait_until(
            &format!("the commit index to run more than {PROMOTE_LAG_ENTRIES} entries past stopped node {new}"),
            minute,
            |cluster| {
                let Some(leader) = cluster.agreed_leader(&voters) else {
                    return false;
                };
                let Ok(answer) = http_get(cluster.node(leader).control_address, "/v1/members")
                else {
                    return false;
                };
                let commit = answer.body["commit_index"].as_u64().unwrap_or(0);
                let matched = answer.body["members"]
                    .as_array()
                    .and_then(|members| {
                        members
                            .iter()
                            .find(|member| member["id"].as_u64() == Some(new))
                    })
                    .and_then(|member| member["progress"]["matched"].as_u64());
                lag = commit.saturating_sub(matched.unwrap_or(commit));
                lag > PROMOTE_LAG_ENTRIES
            },
        );
        eprintln!("node {new} stopped {lag} entries behind the commit index; promoting it to replace node {old}");
        let resume = thread::spawn(move || {
            thread::sleep(Duration::from_secs(1));
            drop(paused);
        });
        // Asked of the leader while the learner is stopped; a leader that is being replaced
        // hands leadership over first (503, retry) and another node may answer 421.
        let asked = Instant::now();
        let answer = loop {
            // Not `cluster.leader()`: the stopped node would not answer its status.
            let Some(leader) = cluster.agreed_leader(&voters) else {
                assert!(asked.elapsed() < minute, "no leader among {voters:?}");
                thread::sleep(Duration::from_millis(100));
                continue;
            };
            let answer = http_post_slow(
                cluster.node(leader).control_address,
                &format!("/v1/members/{new}/promote"),
                &serde_json::json!({ "replace": old, "wait_ms": 30_000 }),
                minute,
            )
            .unwrap_or_else(|error| panic!("promote {new}: {error}"));
            if (answer.status == 421 || answer.status == 503) && asked.elapsed() < minute {
                thread::sleep(Duration::from_millis(300));
                continue;
            }
            break answer;
        };
        resume.join().expect("the resume thread");
        assert_eq!(
            answer.status,
            200,
            "promoting node {new} (stopped {lag} entries behind when asked) to replace node \
             {old} was refused: {}\n{}",
            answer.body,
            cluster.describe_statuses()
        );
        voters.retain(|id| *id != old);
        voters.push(new);
        let expected = voters.clone();
        cluster.wait_until(
            &format!("the voters to be exactly {expected:?}"),
            minute,
            |cluster| voters_of(cluster, &expected) == Some(expected.clone()),
        );
        cluster.retire(old);
        eprintln!(
            "node {new} replaced node {old} {:.1?} after it was asked",
            asked.elapsed()
        );
        load.wait_for_more_acknowledgements(200, minute, "after a replace");
    }
    let (mut region, statistics) = load.finish();
    assert!(
        statistics.transport_error.is_none(),
        "the client saw an error during the replaces: {:?}",
        statistics.transport_error
    );
    let mut reader = NbdClient::connect(proxy.listen_address, DEFAULT_EXPORT_NAME);
    region.verify(&mut reader, "after three replaces");
    cluster.assert_replicas_identical(&voters, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
    proxy.assert_running("after the replaces");
}

/// A server added while the group's log still starts at its first entry (a young cluster,
/// nothing compacted yet) must not be sent the log from that entry: it was not part of the
/// bootstrap configuration the entries build on, so it is brought up by a snapshot, then the
/// log. It catches up, becomes a voter, and holds what was written before it joined.
#[test]
fn a_member_added_before_any_compaction_catches_up() {
    let _turn = one_cluster_at_a_time();
    // No checkpoint, hence no compaction, while the test runs.
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .set("storage", "checkpoint_interval_ms", "600000")
            .set("storage", "checkpoint_bytes", "1073741824"),
    );
    let leader = cluster.leader();
    let mut client = NbdClient::connect(cluster.node(leader).nbd_address, DEFAULT_EXPORT_NAME);
    for block in 0..16u64 {
        client.write_ok(block * 4096, &[block as u8 + 1; 4096]);
    }
    let new = cluster.start_joining_node();
    let mut arguments = vec![
        "add".to_string(),
        "--catch-up-timeout-s".to_string(),
        "60".to_string(),
    ];
    arguments.extend(cluster.member_arguments(new));
    cluster.ctl_members(&arguments);
    let members = [1, 2, 3, new];
    assert_eq!(voters_of(&cluster, &members), Some(vec![1, 2, 3, new]));
    let leader = cluster.leader();
    let status = cluster.status(leader).expect("the leader's status");
    assert_eq!(
        status.first_log_index, 1,
        "the log was compacted: the test did not add the member to a young log"
    );
    cluster.assert_all_alive("after the member was added");
    cluster.assert_replicas_identical(&members, DEFAULT_EXPORT_NAME, CONVERGENCE_TIMEOUT);
}

/// A server that lags behind the leader must not answer from its own stale volume table:
/// attach and delete are decided by the committed Raft command, on whichever server is asked.
/// The leader's and the other follower's links to one follower are delayed by 400 ms (less
/// than the two election timeouts after which a forwarded proposal is retried), a
/// volume is created through the leader, and the lagging follower is asked at once to attach
/// it (a proxy told "no such volume" declares the volume lost), and to delete another one.
#[test]
fn a_lagging_server_answers_attach_and_delete_from_the_committed_state() {
    let _turn = one_cluster_at_a_time();
    let mut cluster = Cluster::start(ClusterOptions::default().with_relays());
    let leader = cluster.leader();
    let lagging = cluster.others(leader)[0];
    for other in cluster.others(lagging) {
        cluster
            .relay(other, lagging)
            .set_mode(RelayMode::Delay(Duration::from_millis(400)));
    }
    let leader_control = cluster.node(leader).control_address;
    let lagging_control = cluster.node(lagging).control_address;
    for name in ["lagging-attach", "lagging-delete"] {
        let created = http_post(
            leader_control,
            "/v1/volumes",
            &serde_json::json!({ "name": name, "size_bytes": 16 * MIB }),
        )
        .expect("create through the leader");
        assert_eq!(created.status, 201, "create {name}: {}", created.body);
    }
    let attached = http_post(
        lagging_control,
        "/v1/volumes/lagging-attach/attach",
        &serde_json::json!({ "client": "lagging-test" }),
    )
    .expect("attach through the lagging follower");
    assert_eq!(
        attached.status, 200,
        "node {lagging}, 400 ms behind, answered the attach from its own table: {}",
        attached.body
    );
    let deleted = http_delete(lagging_control, "/v1/volumes/lagging-delete")
        .expect("delete through the lagging follower");
    assert_eq!(
        deleted.status, 204,
        "node {lagging}, 400 ms behind, answered the delete from its own table: {}",
        deleted.body
    );
    cluster.heal_all_links();
}

/// A session open on a follower while the follower installs a snapshot reads on: the
/// snapshot replaces the whole state machine, and the session's reader of the old one is
/// exchanged for the new one's, invisibly to the client. The follower is cut off (its links
/// black-holed, its NBD connection open and idle) until the leader has compacted its log past
/// it, then reconnected, sent a snapshot, and read through the same connection.
#[test]
fn a_session_open_across_a_snapshot_install_reads_on() {
    let _turn = one_cluster_at_a_time();
    let mut random = SplitMix64::from_environment_or_clock("session_across_snapshot");
    let options = ClusterOptions::default()
        .with_relays()
        .set("raft", "log_keep_entries", "8")
        .set("raft", "log_lag_entries_max", "64")
        .set("raft", "log_lag_bytes_max", "1048576");
    let mut cluster = Cluster::start(options);
    let leader = cluster.leader();
    let follower = cluster.others(leader)[0];
    let minute = Duration::from_secs(60);
    let load = BackgroundLoad::start(
        cluster.nbd_client(leader, DEFAULT_EXPORT_NAME),
        VerifiedRegion::new(8 * MIB, 4096, 1),
        random.next_u64(),
    );
    load.wait_for_more_acknowledgements(200, minute, "before the follower is cut off");
    let mut session = cluster.nbd_client(follower, DEFAULT_EXPORT_NAME);
    session.read_ok(0, 4096);
    // A second volume, with a session of its own on the follower, that the snapshot will not
    // hold: it is deleted while the follower is cut off.
    let leader_control = cluster.node(leader).control_address;
    let created = http_post(
        leader_control,
        "/v1/volumes",
        &serde_json::json!({ "name": "gone", "size_bytes": 4 * MIB }),
    )
    .expect("create gone");
    assert_eq!(created.status, 201, "{}", created.body);
    cluster.wait_for_volume_everywhere("gone", minute);
    let mut gone_session = cluster.nbd_client(follower, "gone");
    gone_session.read_ok(0, 4096);
    cluster.set_links_of(follower, RelayMode::BlackHole);
    let follower_log_bound = cluster
        .status(leader)
        .expect("leader status")
        .last_log_index;
    cluster.wait_until(
        "the cut-off follower to lose its leader",
        minute,
        |cluster| {
            cluster
                .status(follower)
                .map(|status| status.leader_id == 0)
                .unwrap_or(false)
        },
    );
    let deleted = http_delete(leader_control, "/v1/volumes/gone").expect("delete gone");
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    wait_for_compaction_past(&mut cluster, leader, follower_log_bound);
    load.wait_for_more_acknowledgements(200, minute, "after compaction");
    let (mut region, statistics) = load.finish();
    assert!(statistics.transport_error.is_none(), "{statistics:?}");
    cluster.heal_all_links();
    wait_for_snapshot_installed(&mut cluster, follower);
    // The volume the snapshot dropped: its session is told at once, not at its deadline.
    let asked = Instant::now();
    let reply = gone_session.read(0, 4096).expect("an answer");
    assert_ne!(reply.error, 0, "a read of a deleted volume succeeded");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the read of a volume the snapshot dropped was answered after {:?}",
        asked.elapsed()
    );
    let blocks_holding_writes = region.verify(
        &mut session,
        "through a connection opened before the snapshot install",
    );
    assert!(
        blocks_holding_writes > 200,
        "only {blocks_holding_writes} blocks hold writes"
    );
}

/// A kernel filesystem on a volume through the proxy while the leader is killed: nbdfuse + a
/// loop device + ext4, mounted on the proxy's export. Rounds of files are copied onto the
/// mounted filesystem and synced, back to back, and after the first round the leader is killed
/// with SIGKILL; copying goes on through the new leader for two more rounds at least (the old
/// leader is started again afterwards). The filesystem sees no I/O error (a failed write would
/// fail `cp` or `sync`, which must all succeed); after the last round it is unmounted,
/// `e2fsck -f -n` finds it clean, and mounted again every file of every round has its sha256.
#[test]
fn ext4_through_the_proxy_survives_a_leader_kill_9_while_mounted_and_written() {
    use common::mount::{checksums, require_mount_tools, MountedVolume};
    let _turn = one_cluster_at_a_time();
    require_mount_tools();
    /// A bound on the rounds, which fill 3.4 MiB each of the 64 MiB volume.
    const ROUNDS_MAX: usize = 12;
    let mut random = SplitMix64::from_environment_or_clock("ext4_leader_kill");
    let mut cluster = Cluster::start(ClusterOptions::default());
    let proxy = ProxyProcess::start(&cluster, "ext4-client", &[]);
    let workspace = cluster.workspace().to_owned();
    let source = workspace.join("source");
    std::fs::create_dir_all(source.join("nested")).expect("create the source tree");
    for (name, size) in [
        ("big.bin", 3 * MIB as usize + 123),
        ("nested/page.bin", 4096),
        ("nested/odd.bin", 100_003),
        ("small.txt", 17),
    ] {
        std::fs::write(source.join(name), random.bytes(size)).expect("write a source file");
    }
    let expected = checksums(&source);

    let mut volume = MountedVolume::attach_nbd(
        &proxy.uri(DEFAULT_EXPORT_NAME),
        &workspace,
        "ext4",
        ClusterOptions::default().volume_size_bytes,
    );
    volume.make_ext4();
    volume.mount();
    let mount_directory = volume.mount_directory.clone();
    // Copies and syncs round after round, without a pause, until told to stop.
    let rounds_done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (source, rounds_done, stop) =
            (source.clone(), Arc::clone(&rounds_done), Arc::clone(&stop));
        thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::SeqCst) && round < ROUNDS_MAX {
                let target = mount_directory.join(format!("round{round}"));
                run_ok(
                    "cp",
                    &["-r".as_ref(), source.as_os_str(), target.as_os_str()],
                    Duration::from_secs(180),
                );
                run_ok("sync", &[] as &[&str], Duration::from_secs(180));
                round += 1;
                rounds_done.store(round as u64, Ordering::SeqCst);
            }
        })
    };
    wait_until("a first round of copies", Duration::from_secs(120), || {
        rounds_done.load(Ordering::SeqCst) >= 1 || writer.is_finished()
    });
    let leader = cluster.leader();
    cluster.kill_9(leader);
    let done_at_kill = rounds_done.load(Ordering::SeqCst);
    let survivors = cluster.others(leader);
    cluster.wait_for_leader(&survivors, ELECTION_TIMEOUT_BOUND);
    // Writing went on through the new leader.
    wait_until(
        "two more rounds after the kill",
        Duration::from_secs(180),
        || rounds_done.load(Ordering::SeqCst) >= done_at_kill + 2 || writer.is_finished(),
    );
    stop.store(true, Ordering::SeqCst);
    writer
        .join()
        .expect("every copy and sync on the mounted filesystem succeeded");
    let rounds = rounds_done.load(Ordering::SeqCst) as usize;
    assert!(
        rounds as u64 >= done_at_kill + 2,
        "only {rounds} rounds, {done_at_kill} of them before the kill"
    );
    eprintln!("{rounds} rounds copied, {done_at_kill} of them before the leader was killed");
    cluster.restart(leader);
    volume.assert_nbdfuse_running();
    for round in 0..rounds {
        assert_eq!(
            checksums(&volume.mount_directory.join(format!("round{round}"))),
            expected,
            "round {round} on the mounted filesystem"
        );
    }
    volume.detach();

    let mut volume = MountedVolume::attach_nbd(
        &proxy.uri(DEFAULT_EXPORT_NAME),
        &workspace,
        "ext4-check",
        ClusterOptions::default().volume_size_bytes,
    );
    let fsck = run_command(
        std::process::Command::new("e2fsck").args(["-f", "-n", volume.device()]),
        Duration::from_secs(180),
    );
    assert!(
        fsck.status.success(),
        "the filesystem must be clean after the leader kill\n{}",
        fsck.describe()
    );
    volume.mount();
    for round in 0..rounds {
        assert_eq!(
            checksums(&volume.mount_directory.join(format!("round{round}"))),
            expected,
            "round {round} after a fresh mount"
        );
    }
    volume.detach();
}

/// A peer's message stream carries that member's Raft messages and nothing else: a snapshot
/// (which must come on a snapshot stream, staged before Raft sees it) or a message naming
/// another sender ends the connection before Raft steps it. A stepped `MsgSnapshot` without
/// staged data would crash the Raft actor, and one connection repeating it would crash it
/// past its restart limit and end the process.
#[test]
fn a_message_stream_carries_no_snapshot_and_only_its_senders_messages() {
    use raftblk::peer::{encode_hello, encode_raft_message, Hello, StreamKind};
    use std::io::{Read, Write};
    let _turn = one_cluster_at_a_time();
    let mut cluster = Cluster::start(ClusterOptions::default());
    let leader = cluster.leader();
    let follower = cluster.others(leader)[0];
    let other = cluster.others(leader)[1];
    let term = cluster.status(follower).expect("status").term;
    let commit = cluster.status(follower).expect("status").commit_index;
    let send = |message: raft::prelude::Message, hello_from: u64| -> bool {
        let mut stream =
            std::net::TcpStream::connect(cluster.node(follower).peer_address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = bytes::BytesMut::new();
        encode_hello(
            &Hello {
                kind: StreamKind::Messages,
                from: hello_from,
                to: follower,
            },
            &mut out,
        );
        encode_raft_message(raftblk::DEFAULT_GROUP_ID, &message, &mut out);
        stream.write_all(&out).expect("send");
        // Closed by the follower (end of stream or reset), not left open (a read timeout).
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => true,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    let mut snapshot = raft::prelude::Message::default();
    snapshot.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
    snapshot.from = leader;
    snapshot.to = follower;
    snapshot.term = term;
    snapshot.mut_snapshot().mut_metadata().index = commit + 1000;
    snapshot.mut_snapshot().mut_metadata().term = term;
    snapshot
        .mut_snapshot()
        .mut_metadata()
        .mut_conf_state()
        .voters = vec![1, 2, 3];
    assert!(
        send(snapshot, leader),
        "a snapshot on a message stream must end it"
    );
    let mut heartbeat = raft::prelude::Message::default();
    heartbeat.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    heartbeat.from = leader;
    heartbeat.to = follower;
    heartbeat.term = term;
    assert!(
        send(heartbeat, other),
        "a message from node {leader} on node {other}'s stream must end it"
    );
    thread::sleep(Duration::from_secs(2));
    let status = cluster.node(follower).status().expect("status");
    assert_eq!(
        status.json["actor_restarts"]["raft"], 0,
        "the follower's Raft actor crashed: {}",
        status.json["actor_restarts"]
    );
    cluster.assert_all_alive("after the bad peer messages");
}
