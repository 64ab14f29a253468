//! Turns the measurements of [`super::report`] into `REPORT.md` (markdown tables: one number or
//! ratio per cell, "failed" where a step failed) and into the plot specification that
//! `bench/plot_report.py` draws as grouped bar charts.
//!
//! Invariant: every table cell after the first column is a number (a ratio ends in "x") or the
//! word "failed"; prose goes in paragraphs and lists, never in tables, so a reader (and the
//! smoke test) can check the tables mechanically.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fio::Measurement;
use crate::support::machine;
use crate::support::report::{
    Settings, Target, TargetResults, DD_STEPS, PHASES, SPARSE_EXTENTS, SPARSE_EXTENT_BYTES,
};

/// The PNG files the plot specification asks for, in report order.
pub const PLOT_FILES: &[(&str, &str)] = &[
    ("fio_iops.png", "fio IOPS"),
    ("fio_p99.png", "fio p99 completion latency"),
    ("dd.png", "dd on ext4"),
    ("pgbench.png", "pgbench"),
];

/// Everything the report shows.
pub struct Report<'a> {
    pub settings: &'a Settings,
    pub note: Option<&'a str>,
    pub started_at: &'a str,
    pub elapsed: Duration,
    pub targets: &'a [&'a Target],
    pub fio_labels: &'a [&'a str],
    pub results: &'a [TargetResults],
}

/// A markdown table under construction.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(first_column: &str, columns: impl IntoIterator<Item = String>) -> Table {
        Table {
            header: std::iter::once(first_column.to_owned())
                .chain(columns)
                .collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, label: &str, cells: impl IntoIterator<Item = String>) {
        self.rows
            .push(std::iter::once(label.to_owned()).chain(cells).collect());
    }

    fn render(&self, out: &mut String) {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        let rule: Vec<String> = (0..self.header.len())
            .map(|column| if column == 0 { "---" } else { "---:" }.to_owned())
            .collect();
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out.push('\n');
    }
}

/// `value` with `decimals` digits, or "failed".
fn number<E>(value: &Result<f64, E>, decimals: usize) -> String {
    match value {
        Ok(value) if value.is_finite() => format!("{value:.decimals$}"),
        _ => "failed".to_owned(),
    }
}

/// `ours / theirs` as "1.23x", or "failed" when either is missing or theirs is zero.
fn ratio<E>(ours: &Result<f64, E>, theirs: &Result<f64, E>) -> String {
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) if *theirs > 0.0 && ours.is_finite() => {
            format!("{:.2}x", ours / theirs)
        }
        _ => "failed".to_owned(),
    }
}

/// Seconds as "1 min 23 s" or "45.6 s".
fn duration_text(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds >= 60.0 {
        format!("{} min {:.0} s", (seconds / 60.0).floor(), seconds % 60.0)
    } else {
        format!("{seconds:.1} s")
    }
}

impl Report<'_> {
    /// (raftblk variant, other target) index pairs the ratio tables compare.
    fn comparisons(&self) -> Vec<(usize, usize)> {
        let indices = 0..self.targets.len();
        indices
            .clone()
            .filter(|ours| self.targets[*ours].is_raftblk)
            .flat_map(|ours| {
                indices
                    .clone()
                    .filter(|theirs| !self.targets[*theirs].is_raftblk)
                    .map(move |theirs| (ours, theirs))
            })
            .collect()
    }

    fn target_columns(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|target| target.label.to_owned())
            .collect()
    }

    fn comparison_columns(&self) -> Vec<String> {
        self.comparisons()
            .iter()
            .map(|(ours, theirs)| {
                format!(
                    "{} / {}",
                    self.targets[*ours].label, self.targets[*theirs].label
                )
            })
            .collect()
    }

    /// One value per target for fio job `job`.
    fn fio_values(&self, job: usize, pick: fn(&Measurement) -> f64) -> Vec<Result<f64, ()>> {
        self.results
            .iter()
            .map(|result| result.fio[job].as_ref().map(pick).map_err(|_| ()))
            .collect()
    }

    fn dd_values(&self, step: usize) -> Vec<Result<f64, ()>> {
        self.results
            .iter()
            .map(|result| result.dd[step].clone().map_err(|_| ()))
            .collect()
    }

    /// One value per target from a measurement each target may have failed: `field` picks
    /// the measurement, `pick` the number.
    fn measurement_values<T>(
        &self,
        field: fn(&TargetResults) -> &Result<T, String>,
        pick: fn(&T) -> f64,
    ) -> Vec<Result<f64, ()>> {
        self.results
            .iter()
            .map(|result| field(result).as_ref().map(pick).map_err(|_| ()))
            .collect()
    }

    /// A table with one row per `(label, values)` and one column per target.
    fn values_table(
        &self,
        first_column: &str,
        rows: &[(String, Vec<Result<f64, ()>>)],
        decimals: usize,
    ) -> Table {
        self.values_table_by_row(first_column, rows, &vec![decimals; rows.len()])
    }

    /// Like [`Self::values_table`], with each row's own number of decimals.
    fn values_table_by_row(
        &self,
        first_column: &str,
        rows: &[(String, Vec<Result<f64, ()>>)],
        decimals: &[usize],
    ) -> Table {
        let mut table = Table::new(first_column, self.target_columns());
        for ((label, values), decimals) in rows.iter().zip(decimals) {
            table.row(label, values.iter().map(|value| number(value, *decimals)));
        }
        table
    }

    /// A table with one row per `(label, values)` and one column per comparison.
    fn ratio_table(&self, first_column: &str, rows: &[(String, Vec<Result<f64, ()>>)]) -> Table {
        let mut table = Table::new(first_column, self.comparison_columns());
        for (label, values) in rows {
            table.row(
                label,
                self.comparisons()
                    .iter()
                    .map(|(ours, theirs)| ratio(&values[*ours], &values[*theirs])),
            );
        }
        table
    }

    fn fio_rows(&self, pick: fn(&Measurement) -> f64) -> Vec<(String, Vec<Result<f64, ()>>)> {
        self.fio_labels
            .iter()
            .enumerate()
            .map(|(job, label)| ((*label).to_owned(), self.fio_values(job, pick)))
            .collect()
    }

    fn dd_rows(&self) -> Vec<(String, Vec<Result<f64, ()>>)> {
        DD_STEPS
            .iter()
            .enumerate()
            .map(|(step, label)| ((*label).to_owned(), self.dd_values(step)))
            .collect()
    }

    fn sparse_copy_rows(&self) -> Vec<(String, Vec<Result<f64, ()>>)> {
        vec![
            (
                "MB/s".to_owned(),
                self.measurement_values(|result| &result.sparse_copy, |m| m.megabytes_per_second),
            ),
            (
                "time (s)".to_owned(),
                self.measurement_values(|result| &result.sparse_copy, |m| m.seconds),
            ),
            (
                "copy allocated (MiB)".to_owned(),
                self.measurement_values(|result| &result.sparse_copy, |m| m.allocated_mib),
            ),
        ]
    }

    fn pgbench_rows(&self) -> Vec<(String, Vec<Result<f64, ()>>)> {
        vec![
            (
                format!("init -s {} (s)", self.settings.pgbench.scale),
                self.measurement_values(|result| &result.pgbench, |m| m.initialise_seconds),
            ),
            (
                "tps".to_owned(),
                self.measurement_values(|result| &result.pgbench, |m| m.transactions_per_second),
            ),
            (
                "latency average (ms)".to_owned(),
                self.measurement_values(|result| &result.pgbench, |m| m.latency_average_ms),
            ),
        ]
    }

    fn header(&self, out: &mut String) {
        let settings = self.settings;
        let _ = writeln!(out, "# raftblk benchmark report\n");
        if settings.mode_name == "smoke" {
            let _ = writeln!(
                out,
                "> **Smoke run** ({} s per fio job, pgbench -s {} for {} s): it checks that the \
                 report can be produced; its numbers are too short to mean anything.\n",
                settings.fio_seconds, settings.pgbench.scale, settings.pgbench.seconds
            );
        }
        if let Some(note) = self.note {
            let _ = writeln!(out, "> {note}\n");
        }
        let _ = writeln!(
            out,
            "Produced by `./scripts/bench-report` (`cargo bench --bench report`), {} mode, \
             started {}; the whole run took {}. raftblk `{}`.\n",
            settings.mode_name,
            self.started_at,
            duration_text(self.elapsed),
            machine::raftblk_commit()
        );
        let _ = writeln!(out, "## Machine and tools\n");
        let tools = [
            ("machine", machine::machine_description()),
            ("memory", machine::memory_description()),
            ("distribution", machine::distribution()),
            ("kernel", machine::kernel_release()),
            ("fio", machine::command_output("fio", &["--version"])),
            (
                "qemu-nbd",
                machine::first_line_of("qemu-nbd", &["--version"]),
            ),
            ("nbdkit", machine::first_line_of("nbdkit", &["--version"])),
            ("nbdfuse", machine::first_line_of("nbdfuse", &["--version"])),
            ("PostgreSQL", crate::support::postgres::server_version()),
        ];
        for (name, value) in tools {
            let _ = writeln!(out, "- {name}: {value}");
        }
        let _ = writeln!(
            out,
            "\nEverything runs on this one machine: servers, replicas, clients and the load \
             generators share its cores, and every server's files are on the same local disk \
             as bare's. Runs on a shared machine vary by ±20 %; compare within one report.\n"
        );
        let _ = writeln!(out, "## Targets\n");
        for target in self.targets {
            let _ = writeln!(
                out,
                "- **{}** (`{}`): {}.",
                target.label, target.key, target.description
            );
        }
        let _ = writeln!(
            out,
            "\nEach NBD target serves a fresh sparse 1 GiB volume on 127.0.0.1. Ratio tables \
             divide each raftblk variant's number by each other target's (higher is better \
             for raftblk, except for times and latencies, which have no ratio tables).\n"
        );
    }

    /// The whole `REPORT.md`.
    pub fn markdown(&self) -> String {
        let settings = self.settings;
        let mut out = String::new();
        self.header(&mut out);

        let _ = writeln!(
            out,
            "## fio\n\nfio {} through its nbd engine (libnbd), one job, {} s per timed job{}; \
             bare: the same jobs with ioengine=libaio and direct=1 on a local file. The write \
             jobs cover the whole volume; the read jobs stay in its first {} MiB, filled by a \
             sequential write first. Latency is fio's completion latency.\n",
            machine::command_output("fio", &["--version"]),
            settings.fio_seconds,
            if settings.fio_seconds >= 5 {
                " after a 1 s ramp"
            } else {
                ""
            },
            settings.read_region_bytes >> 20
        );
        for (title, pick, decimals) in [
            (
                "IOPS",
                (|m: &Measurement| m.iops) as fn(&Measurement) -> f64,
                0,
            ),
            ("MB/s", |m: &Measurement| m.megabytes_per_second, 1),
            ("p50 latency (µs)", |m: &Measurement| m.latency_p50_us, 0),
            ("p99 latency (µs)", |m: &Measurement| m.latency_p99_us, 0),
        ] {
            let _ = writeln!(out, "### fio {title}\n");
            self.values_table("fio job", &self.fio_rows(pick), decimals)
                .render(&mut out);
        }
        let _ = writeln!(out, "### fio ratios (IOPS)\n");
        self.ratio_table("fio job", &self.fio_rows(|m| m.iops))
            .render(&mut out);

        let _ = writeln!(
            out,
            "## dd on ext4\n\nThe volume formatted ext4 (`mkfs.ext4`) and mounted through \
             nbdfuse and a loop device (bare: a loop device on a local sparse file). dd copies \
             a {} MiB file of random bytes (in the page cache) with bs=1M and conv=fsync, then \
             reads it back with bs=1M after `sync; echo 3 > /proc/sys/vm/drop_caches`, once \
             buffered and, after dropping the caches again, with iflag=direct (raftblk \
             proxy's read cache is not dropped, so raftblk 3x may read part of the file from \
             it). MB/s are 10^6 bytes per second of dd's own timing.\n",
            settings.dd_bytes >> 20
        );
        let _ = writeln!(out, "### dd MB/s\n");
        self.values_table("dd", &self.dd_rows(), 1).render(&mut out);
        let _ = writeln!(out, "### dd ratios (MB/s)\n");
        self.ratio_table("dd", &self.dd_rows()).render(&mut out);

        let pgbench = settings.pgbench;
        let _ = writeln!(
            out,
            "## pgbench\n\nPostgreSQL ({}) with its data directory on that ext4 filesystem, \
             started with initdb/pg_ctl as the postgres user on a private unix socket (no TCP \
             listener); fsync and synchronous_commit on (the defaults), max_wal_size 256MB so \
             the WAL fits the 1 GiB filesystem. `pgbench -i -s {}` (timed), then the TPC-B-like \
             default script: `pgbench -c {} -j {} -T {}`. tps excludes the initial connection \
             time.\n",
            crate::support::postgres::server_version(),
            pgbench.scale,
            pgbench.clients,
            pgbench.threads,
            pgbench.seconds
        );
        let _ = writeln!(out, "### pgbench results\n");
        let rows = self.pgbench_rows();
        self.values_table_by_row("pgbench", &rows, &[1, 1, 2])
            .render(&mut out);
        let _ = writeln!(out, "### pgbench ratios (tps)\n");
        self.ratio_table("pgbench", &rows[1..2]).render(&mut out);

        let _ = writeln!(
            out,
            "## Sparse copy\n\nOn the fresh volume, before fio: qemu-io writes {} extents of {} \
             MiB spread evenly over it, then `nbdcopy` copies the whole volume to a local file \
             (timed), which is checked (each extent, zeroes elsewhere) and deleted. nbdcopy asks \
             the server for its allocation map (NBD block status, `base:allocation`) and reads \
             only the data; bare's nbdcopy seeks the file's holes. MB/s counts the whole \
             volume.\n",
            SPARSE_EXTENTS,
            SPARSE_EXTENT_BYTES >> 20
        );
        let _ = writeln!(out, "### sparse copy results\n");
        let rows = self.sparse_copy_rows();
        self.values_table_by_row("sparse copy", &rows, &[0, 2, 1])
            .render(&mut out);
        let _ = writeln!(out, "### sparse copy ratios (MB/s)\n");
        self.ratio_table("sparse copy", &rows[0..1])
            .render(&mut out);

        let _ = writeln!(
            out,
            "## Run times\n\nSeconds per phase on each target (teardown includes unmounting and \
             stopping the servers).\n"
        );
        let mut table = Table::new("target", PHASES.iter().map(|phase| format!("{phase} (s)")));
        for (target, result) in self.targets.iter().zip(self.results) {
            table.row(
                target.label,
                result
                    .phase_seconds
                    .iter()
                    .map(|seconds| format!("{seconds:.1}")),
            );
        }
        table.render(&mut out);

        let _ = writeln!(out, "## Plots\n");
        for (file, title) in PLOT_FILES {
            let _ = writeln!(out, "![{title}]({file})\n");
        }
        out
    }

    /// The plot specification for `bench/plot_report.py`: one grouped bar chart per entry of
    /// [`PLOT_FILES`], `null` for a failed value.
    pub fn plots(&self) -> Value {
        let series = |rows: &[(String, Vec<Result<f64, ()>>)]| -> Vec<Value> {
            self.targets
                .iter()
                .enumerate()
                .map(|(index, target)| {
                    let values: Vec<Value> = rows
                        .iter()
                        .map(|(_, values)| match values[index] {
                            Ok(value) if value.is_finite() => json!(value),
                            _ => Value::Null,
                        })
                        .collect();
                    json!({ "label": target.label, "values": values })
                })
                .collect()
        };
        let categories = |rows: &[(String, Vec<Result<f64, ()>>)]| -> Vec<String> {
            rows.iter().map(|(label, _)| label.clone()).collect()
        };
        let fio_iops = self.fio_rows(|m| m.iops);
        let fio_p99 = self.fio_rows(|m| m.latency_p99_us);
        let dd = self.dd_rows();
        let tps = self.pgbench_rows()[1..2].to_vec();
        let chart =
            |index: usize, ylabel: &str, log: bool, rows: &[(String, Vec<Result<f64, ()>>)]| {
                json!({
                    "file": PLOT_FILES[index].0,
                    "title": format!("{} ({} mode)", PLOT_FILES[index].1, self.settings.mode_name),
                    "ylabel": ylabel,
                    "log_scale": log,
                    "categories": categories(rows),
                    "series": series(rows),
                })
            };
        json!({
            "charts": [
                chart(0, "IOPS (log scale)", true, &fio_iops),
                chart(1, "p99 latency, µs (log scale)", true, &fio_p99),
                chart(2, "MB/s (log scale)", true, &dd),
                chart(3, "transactions per second", false, &tps),
            ]
        })
    }
}
