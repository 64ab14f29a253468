//! Benchmark: the same fio jobs (ioengine=nbd) against raftblk on one node, raftblk with three
//! replicas through `raftblk proxy` (every write committed on a majority before its reply),
//! `qemu-nbd --cache=writethrough` and `--cache=writeback`, and `nbdkit file`, each on a fresh
//! sparse 1 GiB volume, printed as a markdown table with each raftblk variant's ratio to each
//! peer and appended to `bench/RESULTS.md` with the date and machine.
//!
//! Run with `cargo bench --bench nbd_peers`. Each timed job runs `RAFTBLK_BENCH_SECONDS`
//! seconds (default 10; `RAFTBLK_BENCH_SECONDS=2` for a smoke run). `RAFTBLK_BENCH_PEERS`
//! (comma-separated, default all of
//! `raftblk,raftblk-3x-proxy,qemu-nbd,qemu-nbd-writeback,nbdkit`) picks the peers. This is a
//! program that prints numbers, not a test: nothing here asserts a timing. Peer start-up and
//! the fio jobs are shared with the benchmark report (`benches/support`).
//!
//! Every process it starts is owned by a guard that kills it on drop, so an error anywhere
//! still stops the servers.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::Path;

use common::*;
use support::fio::{run_job, standard_jobs, FioTarget, Measurement};
use support::machine::{command_output, machine_description};
use support::peers::{start_peer, PEER_NAMES, RAFTBLK_PEER_NAMES, VOLUME_SIZE_BYTES};

/// The read jobs stay inside the first 256 MiB of the volume, filled first.
const READ_REGION_BYTES: u64 = 256 * MIB;

fn format_measurement(measurement: &Result<Measurement, String>) -> String {
    match measurement {
        Ok(m) => format!(
            "{:.0} | {:.1} | {:.0} / {:.0}",
            m.iops, m.megabytes_per_second, m.latency_p50_us, m.latency_p99_us
        ),
        Err(_) => "failed | failed | failed".to_owned(),
    }
}

fn ratio(ours: &Result<Measurement, String>, theirs: &Result<Measurement, String>) -> String {
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) if theirs.iops > 0.0 => format!("{:.2}x", ours.iops / theirs.iops),
        _ => "n/a".to_owned(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`. `cargo test --all-targets` also runs this program, with
    // no such flag: then it only says how to run it, so the test suite stays fast.
    if !std::env::args().any(|argument| argument == "--bench") {
        println!("nbd_peers: benchmark skipped outside `cargo bench --bench nbd_peers`");
        return;
    }
    require_tools(&["fio", "qemu-nbd", "nbdkit"]);
    let seconds: u64 = std::env::var("RAFTBLK_BENCH_SECONDS")
        .ok()
        .map(|text| {
            text.parse()
                .unwrap_or_else(|_| panic!("RAFTBLK_BENCH_SECONDS must be whole seconds: {text:?}"))
        })
        .unwrap_or(10);
    let workspace = tempfile::Builder::new()
        .prefix("raftblk-bench-")
        .tempdir()
        .expect("create bench directory");
    let peers: Vec<&str> = match std::env::var("RAFTBLK_BENCH_PEERS") {
        Ok(list) => PEER_NAMES
            .iter()
            .copied()
            .filter(|name| list.split(',').any(|wanted| wanted.trim() == *name))
            .collect(),
        Err(_) => PEER_NAMES.to_vec(),
    };
    assert!(
        !peers.is_empty(),
        "RAFTBLK_BENCH_PEERS names none of {PEER_NAMES:?}"
    );
    let jobs = standard_jobs(VOLUME_SIZE_BYTES, READ_REGION_BYTES);
    // results[peer][job]
    let mut results: Vec<Vec<Result<Measurement, String>>> = Vec::new();
    for &peer_name in &peers {
        eprintln!("== {peer_name}");
        let peer = start_peer(peer_name, workspace.path());
        let uri = peer.uri();
        let mut peer_results = Vec::new();
        for job in &jobs {
            let measurement = run_job(job, &FioTarget::Nbd { uri: &uri }, seconds);
            match &measurement {
                Ok(m) => eprintln!("   {:<22} {m:?}", job.label),
                Err(error) => eprintln!("   {:<22} FAILED: {error}", job.label),
            }
            peer_results.push(measurement);
        }
        peer.stop();
        results.push(peer_results);
    }

    let mut table = String::new();
    let mut header_row = String::from("| job |");
    let mut rule_row = String::from("|---|");
    for peer_name in &peers {
        let _ = write!(
            header_row,
            " {peer_name} IOPS | {peer_name} MB/s | {peer_name} p50 / p99 µs |"
        );
        rule_row.push_str("---:|---:|---:|");
    }
    // Each raftblk variant against each other peer, by IOPS.
    let comparisons: Vec<(usize, usize)> = peers
        .iter()
        .enumerate()
        .filter(|(_, name)| RAFTBLK_PEER_NAMES.contains(name))
        .flat_map(|(ours, _)| {
            peers
                .iter()
                .enumerate()
                .filter(|(_, name)| !RAFTBLK_PEER_NAMES.contains(name))
                .map(move |(theirs, _)| (ours, theirs))
        })
        .collect();
    for (ours, theirs) in &comparisons {
        let _ = write!(header_row, " {}/{} |", peers[*ours], peers[*theirs]);
        rule_row.push_str("---:|");
    }
    let _ = writeln!(table, "{header_row}");
    let _ = writeln!(table, "{rule_row}");
    for (index, job) in jobs.iter().enumerate() {
        if !job.reported {
            continue;
        }
        let mut row = format!("| {} |", job.label);
        for peer_results in &results {
            let _ = write!(row, " {} |", format_measurement(&peer_results[index]));
        }
        for (ours, theirs) in &comparisons {
            let _ = write!(
                row,
                " {} |",
                ratio(&results[*ours][index], &results[*theirs][index])
            );
        }
        let _ = writeln!(table, "{row}");
    }
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let header = format!(
        "## {date}\n\n{}; fio {}; {seconds} s per job; fio ioengine=nbd against {}: raftblk \
         is one node, raftblk-3x-proxy three replicas on loopback behind raftblk proxy, \
         qemu-nbd --cache=writethrough -e 16 -t, qemu-nbd-writeback the same with \
         --cache=writeback, nbdkit file, each on a fresh sparse 1 GiB volume. Ratios compare IOPS. Latency is fio's completion latency.\n",
        machine_description(),
        command_output("fio", &["--version"]),
        peers.join(", "),
    );
    println!("\n{header}\n{table}");

    let results_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/RESULTS.md");
    fs::create_dir_all(results_path.parent().expect("bench directory")).expect("create bench/");
    let is_new = !results_path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results_path)
        .expect("open bench/RESULTS.md");
    if is_new {
        let _ = writeln!(
            file,
            "# Benchmark results\n\nAppended by `cargo bench --bench nbd_peers`.\n"
        );
    }
    let _ = writeln!(file, "{header}\n{table}");
    eprintln!("appended to {}", results_path.display());

    let failures: Vec<&String> = results
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().err())
        .collect();
    if !failures.is_empty() {
        eprintln!("{} job(s) failed; see above", failures.len());
        std::process::exit(1);
    }
}
