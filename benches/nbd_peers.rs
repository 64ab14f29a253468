//! Benchmark: the same fio jobs (ioengine=nbd) against raftblk on one node, raftblk with three
//! replicas through `raftblk proxy` (every write committed on a majority before its reply),
//! `qemu-nbd --cache=writethrough` and `nbdkit file`, each on a fresh sparse 1 GiB volume,
//! printed as a markdown table with each raftblk variant's ratio to each peer and appended to
//! `bench/RESULTS.md` with the date and machine.
//!
//! Run with `cargo bench --bench nbd_peers`. Each timed job runs `RAFTBLK_BENCH_SECONDS`
//! seconds (default 10; `RAFTBLK_BENCH_SECONDS=2` for a smoke run). `RAFTBLK_BENCH_PEERS`
//! (comma-separated, default all of `raftblk,raftblk-3x-proxy,qemu-nbd,nbdkit`) picks the
//! peers. This is a program that prints numbers, not a test: nothing here asserts a timing.
//!
//! Every process it starts is owned by a guard that kills it on drop, so an error anywhere
//! still stops the servers.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One fio job of the comparison.
struct Job {
    /// Column label in the table.
    label: &'static str,
    /// fio arguments besides name, engine, URI and output format.
    arguments: &'static [&'static str],
    /// Which direction of fio's report to read.
    direction: Direction,
    /// Time-based jobs run for the configured duration; the others run to completion.
    timed: bool,
    /// Shown in the table (untimed set-up jobs are not).
    reported: bool,
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// In run order: the write jobs, then a sequential fill of the first 256 MiB so the read jobs,
/// which stay inside it, read data rather than holes.
const JOBS: &[Job] = &[
    Job {
        label: "4k randwrite qd32",
        arguments: &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1g"],
        direction: Direction::Write,
        timed: true,
        reported: true,
    },
    Job {
        label: "1M seq write qd8",
        arguments: &["--rw=write", "--bs=1m", "--iodepth=8", "--size=1g"],
        direction: Direction::Write,
        timed: true,
        reported: true,
    },
    Job {
        label: "4k write qd1 fsync=1",
        arguments: &[
            "--rw=write",
            "--bs=4k",
            "--iodepth=1",
            "--fsync=1",
            "--size=1g",
        ],
        direction: Direction::Write,
        timed: true,
        reported: true,
    },
    Job {
        label: "fill for reads",
        arguments: &[
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            "--size=256m",
            "--refill_buffers=1",
        ],
        direction: Direction::Write,
        timed: false,
        reported: false,
    },
    Job {
        label: "4k randread qd32",
        arguments: &["--rw=randread", "--bs=4k", "--iodepth=32", "--size=256m"],
        direction: Direction::Read,
        timed: true,
        reported: true,
    },
    Job {
        label: "1M seq read qd8",
        arguments: &["--rw=read", "--bs=1m", "--iodepth=8", "--size=256m"],
        direction: Direction::Read,
        timed: true,
        reported: true,
    },
];

/// What one job measured.
#[derive(Clone, Copy, Debug)]
struct Measurement {
    iops: f64,
    megabytes_per_second: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
}

/// Every peer the benchmark knows, in table order.
const PEER_NAMES: &[&str] = &["raftblk", "raftblk-3x-proxy", "qemu-nbd", "nbdkit"];
/// The raftblk variants, compared with each of the other peers.
const RAFTBLK_PEER_NAMES: &[&str] = &["raftblk", "raftblk-3x-proxy"];

/// A server being measured; dropping it stops the process.
enum Peer {
    Raftblk(ServerProcess),
    /// Three replicas on loopback and the proxy in front of them.
    Replicated(Box<(common::cluster::ProxyProcess, common::cluster::Cluster)>),
    External(BackgroundProcess, SocketAddr),
}

impl Peer {
    fn uri(&self) -> String {
        match self {
            Peer::Raftblk(server) => server.uri(DEFAULT_EXPORT_NAME),
            Peer::Replicated(parts) => parts.0.uri(DEFAULT_EXPORT_NAME),
            Peer::External(_, address) => format!("nbd://{address}/vol"),
        }
    }

    fn stop(self) {
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

fn sparse_image(directory: &Path, name: &str) -> PathBuf {
    let path = directory.join(name);
    let file = fs::File::create(&path).expect("create image");
    file.set_len(GIB).expect("truncate image to 1 GiB");
    path
}

fn start_peer(name: &str, directory: &Path) -> Peer {
    match name {
        "raftblk" => Peer::Raftblk(ServerProcess::start()),
        "raftblk-3x-proxy" => {
            let mut options = common::cluster::ClusterOptions {
                volume_size_bytes: GIB,
                ..Default::default()
            };
            // Production timing, not the tests' quick failover.
            options = options.set("raft", "tick_interval_ms", "100").set(
                "nbd",
                "request_timeout_ms",
                "30000",
            );
            let cluster = common::cluster::Cluster::start(options);
            let proxy = common::cluster::ProxyProcess::start(&cluster, "bench", &[]);
            Peer::Replicated(Box::new((proxy, cluster)))
        }
        "qemu-nbd" => {
            let image = sparse_image(directory, "qemu-nbd.img");
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
                    .args(["-p", &port.to_string(), "--cache=writethrough"])
                    .arg(&image),
                &directory.join("qemu-nbd.log"),
            );
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            wait_for_listener(address, Duration::from_secs(30));
            Peer::External(process, address)
        }
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
        other => panic!("unknown peer {other}"),
    }
}

fn percentile_us(report: &Value, percentile: &str) -> f64 {
    report["clat_ns"]["percentile"][percentile]
        .as_f64()
        .map(|nanoseconds| nanoseconds / 1000.0)
        .unwrap_or(f64::NAN)
}

fn run_job(job: &Job, uri: &str, seconds: u64) -> Result<Measurement, String> {
    let mut command = Command::new("fio");
    command
        .arg(format!("--name={}", job.label.replace(' ', "_")))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=json")
        .args(job.arguments);
    if job.timed {
        command
            .arg("--time_based")
            .arg(format!("--runtime={seconds}"));
        if seconds >= 5 {
            command.arg("--ramp_time=1");
        }
    }
    // Untimed jobs move at most 1 GiB; give them a generous bound anyway.
    let timeout = Duration::from_secs(seconds * 3 + 300);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_command(&mut command, timeout)
    }))
    .map_err(|_| format!("fio {} did not finish within {timeout:?}", job.label))?;
    if !result.status.success() {
        return Err(format!("fio {} failed\n{}", job.label, result.describe()));
    }
    let text = result.stdout_text();
    let start = text
        .find('{')
        .ok_or_else(|| format!("fio printed no JSON\n{}", result.describe()))?;
    let report: Value = serde_json::from_str(&text[start..])
        .map_err(|error| format!("fio JSON: {error}\n{}", result.describe()))?;
    let job_report = &report["jobs"][0];
    if job_report["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio job error\n{}", result.describe()));
    }
    let side = match job.direction {
        Direction::Read => &job_report["read"],
        Direction::Write => &job_report["write"],
    };
    Ok(Measurement {
        iops: side["iops"].as_f64().unwrap_or(f64::NAN),
        megabytes_per_second: side["bw_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        latency_p50_us: percentile_us(side, "50.000000"),
        latency_p99_us: percentile_us(side, "99.000000"),
    })
}

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

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|count| count.get().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    format!("nproc {cpus}, Linux {kernel}, CPU {cpu_model}")
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
    // results[peer][job]
    let mut results: Vec<Vec<Result<Measurement, String>>> = Vec::new();
    for &peer_name in &peers {
        eprintln!("== {peer_name}");
        let peer = start_peer(peer_name, workspace.path());
        let uri = peer.uri();
        let mut peer_results = Vec::new();
        for job in JOBS {
            let measurement = run_job(job, &uri, seconds);
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
    for (index, job) in JOBS.iter().enumerate() {
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
         qemu-nbd --cache=writethrough -e 16 -t, nbdkit file, each on a fresh sparse 1 GiB \
         volume. Ratios compare IOPS. Latency is fio's completion latency.\n",
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
