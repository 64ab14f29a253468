//! Code the benchmark programs share (`benches/nbd_peers.rs`, `benches/report.rs`) and the
//! report's smoke test (`tests/bench_report_smoke.rs`) includes:
//! - [`peers`]: starting the NBD servers compared (raftblk 1x and 3x, qemu-nbd, nbdkit);
//! - [`fio`]: the fio jobs and the parsing of fio's JSON;
//! - [`machine`]: machine description and tool versions;
//! - [`postgres`]: a private PostgreSQL server for pgbench;
//! - [`report`] and [`render`]: the benchmark report (fio, dd and pgbench on six targets) and
//!   its markdown and plot output.
//!
//! Each includer also includes `tests/common` as its `common` module, which this code builds on.

// Each includer uses a different part.
#![allow(dead_code)]

pub mod fio;
pub mod machine;
pub mod peers;
pub mod postgres;
pub mod render;
pub mod report;
