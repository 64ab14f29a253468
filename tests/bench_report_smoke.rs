//! The benchmark report end to end, in smoke mode (each step for a second or a few), into a
//! temporary directory: every target comes up, every workload runs, `REPORT.md` has a number in
//! every table cell, and each plot is a PNG file. Checks that the command works and that its
//! output is well-formed, never what the numbers are.
//!
//! Runs the same code as `cargo bench --bench report -- --smoke` (`benches/support/report.rs`)
//! in this process. Needs root, like the interop test's ext4 mount.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;
#[path = "../benches/support/mod.rs"]
mod support;

use std::fs;

use support::render::PLOT_FILES;
use support::report::{Options, Settings, TARGETS};

/// The first bytes of every PNG file (PNG specification, section 5.2).
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The markdown tables of `text`: each a list of rows, each row a list of trimmed cells; the
/// header is the first row, the `---` rule is dropped.
fn tables(text: &str) -> Vec<Vec<Vec<String>>> {
    let mut tables = Vec::new();
    let mut current: Vec<Vec<String>> = Vec::new();
    for line in text.lines().chain([""]) {
        if let Some(inner) = line
            .trim()
            .strip_prefix('|')
            .and_then(|rest| rest.strip_suffix('|'))
        {
            let cells: Vec<String> = inner
                .split('|')
                .map(|cell| cell.trim().to_owned())
                .collect();
            if !cells.iter().all(|cell| cell.starts_with("---")) {
                current.push(cells);
            }
        } else if !current.is_empty() {
            tables.push(std::mem::take(&mut current));
        }
    }
    tables
}

/// A measured value ("123", "4.5") or a ratio ("0.84x").
fn is_number(cell: &str) -> bool {
    cell.strip_suffix('x')
        .unwrap_or(cell)
        .parse::<f64>()
        .is_ok_and(f64::is_finite)
}

#[test]
fn smoke_report_has_a_number_in_every_cell_and_png_plots() {
    let output = tempfile::Builder::new()
        .prefix("raftblk-report-smoke-")
        .tempdir()
        .expect("create the output directory");
    let options = Options {
        settings: Settings::smoke(),
        output_directory: output.path().to_owned(),
        targets: TARGETS.iter().collect(),
        note: None,
    };
    let outcome = support::report::run(&options);
    eprintln!("smoke report took {:.0?}", outcome.elapsed);
    let report = fs::read_to_string(&outcome.report_path).expect("read REPORT.md");
    assert!(
        outcome.failures.is_empty(),
        "steps failed:\n{}\n--- REPORT.md ---\n{report}",
        outcome.failures.join("\n")
    );

    let tables = tables(&report);
    // fio IOPS, MB/s, p50, p99 and ratios; dd and its ratios; pgbench and its ratios; the
    // sparse copy and its ratios; run times.
    assert_eq!(tables.len(), 12, "tables in REPORT.md:\n{report}");
    for table in &tables {
        let header = &table[0];
        assert!(
            table.len() > 1,
            "a table without rows: {header:?}\n{report}"
        );
        for row in &table[1..] {
            assert_eq!(row.len(), header.len(), "row {row:?} under {header:?}");
            for (cell, column) in row.iter().zip(header).skip(1) {
                assert!(
                    is_number(cell),
                    "cell {cell:?} in row {:?}, column {column:?} is not a number\n{report}",
                    row[0]
                );
            }
        }
    }
    let fio_iops = &tables[0];
    for target in TARGETS {
        assert!(
            fio_iops[0].iter().any(|column| column == target.label),
            "no column for {} in {:?}",
            target.label,
            fio_iops[0]
        );
    }
    assert_eq!(fio_iops.len() - 1, 7, "seven fio jobs: {fio_iops:?}");
    // Two raftblk variants against four other targets.
    assert_eq!(
        tables[4][0].len() - 1,
        8,
        "ratio columns: {:?}",
        tables[4][0]
    );
    let run_times = &tables[11];
    assert_eq!(
        run_times.len() - 1,
        TARGETS.len(),
        "a run-time row per target"
    );

    assert_eq!(outcome.plot_paths.len(), PLOT_FILES.len());
    for (file, _) in PLOT_FILES {
        let path = output.path().join(file);
        let bytes = fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert!(
            bytes.starts_with(PNG_SIGNATURE),
            "{} is not a PNG file",
            path.display()
        );
        assert!(
            report.contains(&format!("]({file})")),
            "REPORT.md links {file}"
        );
    }
    assert!(output.path().join("plots.json").exists());
}
