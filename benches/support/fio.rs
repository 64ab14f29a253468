//! fio jobs shared by the benchmarks, run through fio's nbd engine (libnbd) against an NBD
//! server, or with libaio and O_DIRECT against a local file for the no-network baseline, and
//! fio's JSON report reduced to IOPS, MB/s and completion-latency percentiles.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::run_command;

/// One fio job of a comparison.
pub struct Job {
    /// Row label in the tables.
    pub label: &'static str,
    /// fio arguments besides name, engine, target and output format.
    pub arguments: Vec<String>,
    /// Which direction of fio's report to read.
    pub direction: Direction,
    /// Time-based jobs run for the configured duration; the others run to completion.
    pub timed: bool,
    /// Shown in the tables (untimed set-up jobs are not).
    pub reported: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Read,
    Write,
}

/// What one job measured.
#[derive(Clone, Copy, Debug)]
pub struct Measurement {
    pub iops: f64,
    pub megabytes_per_second: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
}

/// Where fio sends its I/O.
pub enum FioTarget<'a> {
    /// An NBD export, through `ioengine=nbd`.
    Nbd { uri: &'a str },
    /// A local file with `ioengine=libaio` and `direct=1`: the disk itself, without the page
    /// cache that every NBD server here writes through.
    LocalFile { path: &'a Path },
}

/// The comparison's jobs in run order: the write jobs over the whole volume, then a sequential
/// fill of the first `read_region_bytes` so the read jobs, which stay inside it, read data
/// rather than holes, and one read pass over it.
pub fn standard_jobs(volume_size_bytes: u64, read_region_bytes: u64) -> Vec<Job> {
    let volume = format!("--size={volume_size_bytes}");
    let region = format!("--size={read_region_bytes}");
    let job = |label, arguments: &[&str], size: &str, direction, timed| Job {
        label,
        arguments: arguments
            .iter()
            .map(|argument| (*argument).to_owned())
            .chain([size.to_owned()])
            .collect(),
        direction,
        timed,
        reported: timed,
    };
    use Direction::{Read, Write};
    vec![
        job(
            "4k randwrite qd1",
            &["--rw=randwrite", "--bs=4k", "--iodepth=1"],
            &volume,
            Write,
            true,
        ),
        job(
            "4k randwrite qd32",
            &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
            &volume,
            Write,
            true,
        ),
        job(
            "1M seq write qd8",
            &["--rw=write", "--bs=1m", "--iodepth=8"],
            &volume,
            Write,
            true,
        ),
        job(
            "4k write qd1 fsync=1",
            &["--rw=write", "--bs=4k", "--iodepth=1", "--fsync=1"],
            &volume,
            Write,
            true,
        ),
        job(
            "fill for reads",
            &["--rw=write", "--bs=1m", "--iodepth=8", "--refill_buffers=1"],
            &region,
            Write,
            false,
        ),
        // One pass over the region, so the random reads measure caches that hold it (the
        // proxy's read cache, the servers' page cache) rather than how fast they warm up.
        job(
            "warm the read region",
            &["--rw=read", "--bs=1m", "--iodepth=8"],
            &region,
            Read,
            false,
        ),
        job(
            "4k randread qd1",
            &["--rw=randread", "--bs=4k", "--iodepth=1"],
            &region,
            Read,
            true,
        ),
        job(
            "4k randread qd32",
            &["--rw=randread", "--bs=4k", "--iodepth=32"],
            &region,
            Read,
            true,
        ),
        job(
            "1M seq read qd8",
            &["--rw=read", "--bs=1m", "--iodepth=8"],
            &region,
            Read,
            true,
        ),
    ]
}

fn percentile_us(report: &Value, percentile: &str) -> f64 {
    report["clat_ns"]["percentile"][percentile]
        .as_f64()
        .map(|nanoseconds| nanoseconds / 1000.0)
        .unwrap_or(f64::NAN)
}

/// Runs `job` against `target`; timed jobs run `seconds` (after a 1 s ramp when `seconds` is
/// at least 5, so connection set-up and the first allocations stay out of the numbers).
pub fn run_job(job: &Job, target: &FioTarget, seconds: u64) -> Result<Measurement, String> {
    let mut command = Command::new("fio");
    command
        .arg(format!("--name={}", job.label.replace(' ', "_")))
        .arg("--output-format=json")
        .args(&job.arguments);
    match target {
        FioTarget::Nbd { uri } => {
            command.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
        FioTarget::LocalFile { path } => {
            command
                .args(["--ioengine=libaio", "--direct=1"])
                .arg(format!("--filename={}", path.display()));
        }
    }
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
    let measurement = Measurement {
        iops: side["iops"].as_f64().unwrap_or(f64::NAN),
        megabytes_per_second: side["bw_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        latency_p50_us: percentile_us(side, "50.000000"),
        latency_p99_us: percentile_us(side, "99.000000"),
    };
    if job.reported && !measurement.iops.is_finite() {
        return Err(format!("fio reported no IOPS\n{}", result.describe()));
    }
    Ok(measurement)
}
