//! What a benchmark result needs beside its numbers: the machine (cores, CPU, memory, kernel,
//! distribution), the versions of the tools it ran, and the raftblk commit measured.

use std::fs;
use std::process::Command;

/// The trimmed stdout of `program args…`, or "unknown" if it cannot run or fails.
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The first line of [`command_output`].
pub fn first_line_of(program: &str, args: &[&str]) -> String {
    command_output(program, args)
        .lines()
        .next()
        .unwrap_or("unknown")
        .to_owned()
}

/// The value after `key:` on the first line of `/proc/FILE` that starts with `key`.
fn proc_field(file: &str, key: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{file}"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split(':').nth(1))
        .map(|value| value.trim().to_owned())
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `nproc N, Linux RELEASE, CPU MODEL`.
pub fn machine_description() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|count| count.get().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let cpu_model = proc_field("cpuinfo", "model name").unwrap_or_else(|| "unknown".to_owned());
    format!("nproc {cpus}, Linux {}, CPU {cpu_model}", kernel_release())
}

/// `MemTotal` of `/proc/meminfo` in GiB, one decimal.
pub fn memory_description() -> String {
    proc_field("meminfo", "MemTotal")
        .and_then(|value| value.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `PRETTY_NAME` of `/etc/os-release`.
pub fn distribution() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|value| value.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `git describe --always --dirty` of the checkout the benchmark was built from.
pub fn raftblk_commit() -> String {
    command_output(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    )
}
