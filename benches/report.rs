//! The benchmark report: fio, dd on ext4 and PostgreSQL pgbench against raftblk (three
//! replicas behind the proxy, and one replica), qemu-nbd (write-through and write-back),
//! nbdkit and a bare local file, written to `bench/results/REPORT.md` with PNG plots.
//!
//! Run with `./scripts/bench-report [--smoke]`, which installs the system packages and runs
//! `cargo bench --bench report -- [OPTIONS]`:
//! - `--smoke`: a few seconds per step instead of about 15 minutes in all;
//! - `--output DIR`: write there instead of `bench/results/`;
//! - `--targets a,b`: only these targets (keys as in the report's target list);
//! - `--note TEXT`: a line for the report's header (e.g. "development run").
//!
//! The work is in `support::report`, shared with `tests/bench_report_smoke.rs`. Needs root
//! (loop devices, mounts, dropping the page cache). This program prints numbers; it asserts
//! nothing about them. Its exit status is 1 if any step failed.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::PathBuf;

use support::report::{install_interrupt_handler, Options, Settings, TARGETS};

const USAGE: &str =
    "usage: cargo bench --bench report -- [--smoke] [--output DIR] [--targets a,b] [--note TEXT]";

fn main() {
    // `cargo bench` passes `--bench`. `cargo test --all-targets` also runs this program, with
    // no such flag: then it only says how to run it (the smoke test covers the code).
    let all: Vec<String> = std::env::args().skip(1).collect();
    if !all.iter().any(|argument| argument == "--bench") {
        println!("report: benchmark skipped outside `cargo bench --bench report`");
        return;
    }
    let mut options = Options {
        settings: Settings::full(),
        output_directory: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results"),
        targets: TARGETS.iter().collect(),
        note: None,
    };
    let mut iterator = all.into_iter();
    while let Some(argument) = iterator.next() {
        let mut value = |name: &str| {
            iterator
                .next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{USAGE}"))
        };
        match argument.as_str() {
            "--bench" => {}
            "--smoke" => options.settings = Settings::smoke(),
            "--output" => options.output_directory = PathBuf::from(value("--output")),
            "--note" => options.note = Some(value("--note")),
            "--targets" => {
                let list = value("--targets");
                let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
                for key in &wanted {
                    assert!(
                        TARGETS.iter().any(|target| target.key == *key),
                        "unknown target {key:?}; known: {:?}",
                        TARGETS.iter().map(|target| target.key).collect::<Vec<_>>()
                    );
                }
                options.targets = TARGETS
                    .iter()
                    .filter(|target| wanted.contains(&target.key))
                    .collect();
            }
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    install_interrupt_handler();
    let outcome = support::report::run(&options);
    println!("wrote {}", outcome.report_path.display());
    for plot in &outcome.plot_paths {
        println!("wrote {}", plot.display());
    }
    println!(
        "{} mode took {:.0} s",
        options.settings.mode_name,
        outcome.elapsed.as_secs_f64()
    );
    if !outcome.failures.is_empty() {
        eprintln!("{} step(s) failed:", outcome.failures.len());
        for failure in &outcome.failures {
            eprintln!("- {failure}");
        }
        std::process::exit(1);
    }
}
