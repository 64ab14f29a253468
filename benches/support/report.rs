//! The benchmark report: real workloads against six targets, written as `REPORT.md`, the plot
//! data `plots.json` and PNG bar charts (drawn by `bench/plot_report.py` with Debian's
//! matplotlib) into one output directory.
//!
//! Targets: raftblk with three replicas behind `raftblk proxy`, raftblk with one replica,
//! `qemu-nbd --cache=writethrough`, `qemu-nbd --cache=writeback`, `nbdkit file`, and "bare"
//! (no NBD: a local file). Workloads, in this order on each target:
//! 1. fio ([`super::fio::standard_jobs`]): through fio's nbd engine, or libaio with O_DIRECT on
//!    a local file for bare.
//! 2. ext4 on the volume (nbdfuse + loop device; bare: a loop device on a local sparse file),
//!    then `dd` of a random file with `conv=fsync`, read back after dropping the page cache,
//!    buffered and with `iflag=direct`.
//! 3. PostgreSQL on that ext4: `pgbench -i -s SCALE`, then a fixed-duration run.
//!
//! Before fio, on the fresh volume: a sparse copy ([`run_sparse_copy`]): qemu-io writes a few
//! extents, `nbdcopy` copies the whole volume to a local file, which should hold only them.
//!
//! [`Settings::full`] keeps the whole report within about 15 minutes on two cores;
//! [`Settings::smoke`] runs every step for a few seconds so a test can check that the command
//! works and its output is well-formed. Nothing here judges a number.
//!
//! Invariant: every process, loop device and mount a step starts belongs to a guard
//! ([`Peer`], [`MountedVolume`], [`Postgres`]) dropped in reverse order of creation, also when
//! the step fails or a signal interrupts the run; a failed step marks its cells "failed" and
//! the run goes on with the next one.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::mount::MountedVolume;
use crate::common::{
    require_tools, run_command, run_ok, write_random_file, SplitMix64, MIB, SYSTEM_PYTHON,
};
use crate::support::fio::{run_job, standard_jobs, FioTarget, Measurement};
use crate::support::peers::{sparse_image, start_peer, Peer, VOLUME_SIZE_BYTES};
use crate::support::postgres::{PgbenchMeasurement, PgbenchSettings, Postgres};
use crate::support::render;

/// One column of the report.
pub struct Target {
    /// Name in `--targets` and in the peer start-up code ([`start_peer`]).
    pub key: &'static str,
    /// Column header.
    pub label: &'static str,
    pub description: &'static str,
    /// The raftblk variants are compared with every other target.
    pub is_raftblk: bool,
}

/// Every target, in column order.
pub const TARGETS: &[Target] = &[
    Target {
        key: "raftblk-3x-proxy",
        label: "raftblk 3x",
        description: "three `raftblk server` replicas on loopback (production tick timing) \
             behind `raftblk proxy`; a write is acknowledged once fsync'd on a majority. The \
             proxy keeps its own read cache (here `--cache-bytes 512M`, 64 MiB by default), \
             which dropping the kernel's page cache does not empty",
        is_raftblk: true,
    },
    Target {
        key: "raftblk",
        label: "raftblk 1x",
        description: "one `raftblk server`, a one-voter Raft group; a write is acknowledged \
             once its log entry is fsync'd",
        is_raftblk: true,
    },
    Target {
        key: "qemu-nbd",
        label: "qemu-nbd wt",
        description: "`qemu-nbd --cache=writethrough -t -e 16` on a sparse raw file (every \
             write is flushed before its reply)",
        is_raftblk: false,
    },
    Target {
        key: "qemu-nbd-writeback",
        label: "qemu-nbd wb",
        description: "`qemu-nbd --cache=writeback -t -e 16` on a sparse raw file (writes go to \
             the page cache; FLUSH is honoured)",
        is_raftblk: false,
    },
    Target {
        key: "nbdkit",
        label: "nbdkit",
        description: "`nbdkit file` on a sparse raw file (multi-threaded, page cache, FLUSH \
             honoured)",
        is_raftblk: false,
    },
    Target {
        key: "bare",
        label: "bare",
        description: "no NBD: fio with libaio and O_DIRECT on a local sparse file; ext4 on a \
             loop device over a local sparse file for dd and pgbench",
        is_raftblk: false,
    },
];

/// The dd steps, in row order.
pub const DD_STEPS: &[&str] = &[
    "write conv=fsync",
    "read buffered (cold cache)",
    "read iflag=direct",
];

/// The phases timed on each target, in column order ("total" last).
pub const PHASES: &[&str] = &[
    "start-up",
    "sparse copy",
    "fio",
    "ext4 set-up",
    "dd",
    "pgbench",
    "teardown",
    "total",
];

/// How long and how large each workload is.
#[derive(Clone, Debug)]
pub struct Settings {
    /// "full" or "smoke", shown in the report.
    pub mode_name: &'static str,
    /// Duration of each timed fio job.
    pub fio_seconds: u64,
    /// The fio read jobs stay inside this much of the volume, filled first.
    pub read_region_bytes: u64,
    /// Size of the file dd writes and reads.
    pub dd_bytes: u64,
    pub pgbench: PgbenchSettings,
}

impl Settings {
    /// The real report: about two minutes per target, so the six fit in about 15 minutes.
    pub fn full() -> Settings {
        Settings {
            mode_name: "full",
            fio_seconds: 8,
            read_region_bytes: 256 * MIB,
            dd_bytes: 128 * MIB,
            pgbench: PgbenchSettings {
                scale: 10,
                clients: 4,
                threads: 2,
                seconds: 30,
            },
        }
    }

    /// Every step for a second or a few, for the test that checks the command end to end.
    pub fn smoke() -> Settings {
        Settings {
            mode_name: "smoke",
            fio_seconds: 1,
            read_region_bytes: 16 * MIB,
            dd_bytes: 8 * MIB,
            pgbench: PgbenchSettings {
                scale: 1,
                clients: 4,
                threads: 2,
                seconds: 2,
            },
        }
    }
}

/// What to run and where to write it.
pub struct Options {
    pub settings: Settings,
    pub output_directory: PathBuf,
    pub targets: Vec<&'static Target>,
    /// A line for the report's header (e.g. that this was a development run).
    pub note: Option<String>,
}

/// Everything measured on one target; `Err` cells say why they have no number.
pub struct TargetResults {
    /// One per reported fio job, in job order.
    pub fio: Vec<Result<Measurement, String>>,
    /// MB/s, one per [`DD_STEPS`] entry.
    pub dd: Vec<Result<f64, String>>,
    pub pgbench: Result<PgbenchMeasurement, String>,
    pub sparse_copy: Result<SparseCopy, String>,
    /// Seconds, one per [`PHASES`] entry.
    pub phase_seconds: Vec<f64>,
}

impl TargetResults {
    /// Every cell failed with `reason`.
    fn failed(fio_job_count: usize, reason: &str) -> TargetResults {
        TargetResults {
            fio: vec![Err(reason.to_owned()); fio_job_count],
            dd: vec![Err(reason.to_owned()); DD_STEPS.len()],
            pgbench: Err(reason.to_owned()),
            sparse_copy: Err(reason.to_owned()),
            phase_seconds: vec![0.0; PHASES.len()],
        }
    }

    /// Every failure message, prefixed with the cell it belongs to.
    pub fn failures(&self, target: &Target, fio_labels: &[&str]) -> Vec<String> {
        let fio = self
            .fio
            .iter()
            .zip(fio_labels)
            .filter_map(|(result, label)| result.as_ref().err().map(|error| (*label, error)));
        let dd = self
            .dd
            .iter()
            .zip(DD_STEPS)
            .filter_map(|(result, step)| result.as_ref().err().map(|error| (*step, error)));
        let pgbench = self.pgbench.as_ref().err().map(|error| ("pgbench", error));
        let sparse_copy = self
            .sparse_copy
            .as_ref()
            .err()
            .map(|error| ("sparse copy", error));
        fio.chain(dd)
            .chain(pgbench)
            .chain(sparse_copy)
            .map(|(cell, error)| format!("{} / {cell}: {error}", target.label))
            .collect()
    }
}

/// The files a run wrote, and what failed.
pub struct Outcome {
    pub report_path: PathBuf,
    pub plot_paths: Vec<PathBuf>,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

// ---------------------------------------------------------------------------------------------
// Interruption
// ---------------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interruption(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe; restoring the default action lets a second
    // Ctrl-C end the process at once if the cleanup itself hangs.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// On SIGINT, SIGTERM or SIGHUP, let the running step finish (each is bounded) and then
/// unwind, so the guards stop every server and undo every mount. Without this the default
/// action would end the process at once and leave mounts, loop devices and the peers (which
/// run in their own process groups) behind.
pub fn install_interrupt_handler() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic and calls signal(2).
        unsafe {
            libc::signal(
                signal,
                note_interruption as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[track_caller]
fn check_interrupted() {
    assert!(
        !interrupted(),
        "interrupted by a signal; stopping after cleanup"
    );
}

/// Runs a workload step, unless a signal has interrupted the run, turning a panic (a failed
/// command, a timeout, the interruption) into `Err` with the panic message. The step's guards
/// have been dropped by then.
fn attempt<T>(what: &str, step: impl FnOnce() -> T) -> Result<T, String> {
    attempt_cleanup(what, || {
        check_interrupted();
        step()
    })
}

/// Runs a measuring step through [`attempt`] and prints its result (`describe`) or its
/// failure after `what`.
fn measure<T>(
    what: &str,
    step: impl FnOnce() -> Result<T, String>,
    describe: impl FnOnce(&T) -> String,
) -> Result<T, String> {
    let result = attempt(what, step).and_then(|result| result);
    match &result {
        Ok(value) => eprintln!("     {what:<22} {}", describe(value)),
        Err(error) => eprintln!("     {what:<22} FAILED: {error}"),
    }
    result
}

/// Like [`attempt`] but runs even after an interruption: for the orderly teardown, which
/// should stop servers gracefully rather than leave it to the guards' kills.
fn attempt_cleanup<T>(what: &str, step: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
            })
            .unwrap_or_else(|| "panicked".to_owned());
        format!("{what}: {}", message.lines().next().unwrap_or("failed"))
    })
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

/// A started target: an NBD server, or the local files of the baseline.
enum Backend {
    Nbd {
        peer: Peer,
        uri: String,
    },
    Local {
        fio_file: PathBuf,
        ext4_file: PathBuf,
    },
}

impl Backend {
    /// What qemu-io and nbdcopy open: the NBD URI, or bare's local file.
    fn client_source(&self) -> String {
        match self {
            Backend::Nbd { uri, .. } => uri.clone(),
            Backend::Local { fio_file, .. } => fio_file.display().to_string(),
        }
    }

    fn start(target: &Target, directory: &Path) -> Backend {
        if target.key == "bare" {
            return Backend::Local {
                fio_file: sparse_image(directory, "bare-fio.img"),
                ext4_file: sparse_image(directory, "bare-ext4.img"),
            };
        }
        let peer = start_peer(target.key, directory);
        let uri = peer.uri();
        Backend::Nbd { peer, uri }
    }

    fn fio_target(&self) -> FioTarget<'_> {
        match self {
            Backend::Nbd { uri, .. } => FioTarget::Nbd { uri },
            Backend::Local { fio_file, .. } => FioTarget::LocalFile { path: fio_file },
        }
    }

    /// A loop device on the volume, formatted ext4 and mounted at `DIRECTORY/mnt-ext4`.
    fn mount_ext4(&self, directory: &Path) -> MountedVolume {
        let mut volume = match self {
            Backend::Nbd { uri, .. } => {
                MountedVolume::attach_nbd(uri, directory, "ext4", VOLUME_SIZE_BYTES)
            }
            Backend::Local { ext4_file, .. } => {
                MountedVolume::attach_file(ext4_file, directory, "ext4")
            }
        };
        volume.make_ext4();
        volume.mount();
        volume
    }

    fn stop(self) {
        if let Backend::Nbd { peer, .. } = self {
            peer.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sparse copy
// ---------------------------------------------------------------------------------------------

/// Extents written before the sparse copy: this many, each [`SPARSE_EXTENT_BYTES`] long,
/// spread evenly over the volume.
pub const SPARSE_EXTENTS: u64 = 16;
pub const SPARSE_EXTENT_BYTES: u64 = MIB;
/// The byte qemu-io fills them with.
const SPARSE_PATTERN: u8 = 0x5a;

/// `nbdcopy` of a volume that holds [`SPARSE_EXTENTS`] written extents to a local file.
#[derive(Clone, Debug)]
pub struct SparseCopy {
    pub seconds: f64,
    /// Volume bytes (holes included) per second, 10^6.
    pub megabytes_per_second: f64,
    /// Allocated size of the copy (`st_blocks`).
    pub allocated_mib: f64,
}

/// Offset of written extent `index`.
fn sparse_extent_offset(index: u64) -> u64 {
    index * (VOLUME_SIZE_BYTES / SPARSE_EXTENTS)
}

/// Writes the extents with qemu-io, copies the whole volume with nbdcopy into `directory`,
/// checks that each extent arrived and that the rest reads as zeroes, and deletes the copy.
fn run_sparse_copy(source: &str, directory: &Path) -> Result<SparseCopy, String> {
    let mut fill = Command::new("qemu-io");
    fill.args(["-f", "raw"]);
    for index in 0..SPARSE_EXTENTS {
        fill.arg("-c").arg(format!(
            "write -P {SPARSE_PATTERN} {} {SPARSE_EXTENT_BYTES}",
            sparse_extent_offset(index)
        ));
    }
    fill.arg(source);
    let result = run_command(&mut fill, Duration::from_secs(120));
    if !result.status.success() {
        return Err(format!("qemu-io failed\n{}", result.describe()));
    }

    let copy = directory.join("sparse-copy.img");
    let _ = fs::remove_file(&copy);
    let started = Instant::now();
    let result = run_command(
        Command::new("nbdcopy").arg(source).arg(&copy),
        Duration::from_secs(600),
    );
    let seconds = started.elapsed().as_secs_f64();
    if !result.status.success() {
        let _ = fs::remove_file(&copy);
        return Err(format!("nbdcopy failed\n{}", result.describe()));
    }
    let checked = check_sparse_copy(&copy);
    let allocated = fs::metadata(&copy)
        .map(|metadata| std::os::unix::fs::MetadataExt::blocks(&metadata) * 512)
        .map_err(|error| format!("stat {}: {error}", copy.display()));
    let _ = fs::remove_file(&copy);
    checked?;
    Ok(SparseCopy {
        seconds,
        megabytes_per_second: VOLUME_SIZE_BYTES as f64 / seconds / 1e6,
        allocated_mib: allocated? as f64 / MIB as f64,
    })
}

/// The copy holds the volume: its size, each written extent, and zeroes everywhere else.
fn check_sparse_copy(copy: &Path) -> Result<(), String> {
    let mut file = fs::File::open(copy).map_err(|error| format!("open the copy: {error}"))?;
    let length = file
        .metadata()
        .map_err(|error| format!("stat the copy: {error}"))?
        .len();
    if length != VOLUME_SIZE_BYTES {
        return Err(format!(
            "the copy is {length} bytes, the volume {VOLUME_SIZE_BYTES}"
        ));
    }
    let mut buffer = vec![0u8; MIB as usize];
    let mut offset = 0;
    while offset < length {
        file.read_exact(&mut buffer)
            .map_err(|error| format!("read the copy at {offset}: {error}"))?;
        let written = (0..SPARSE_EXTENTS).any(|index| {
            let start = sparse_extent_offset(index);
            offset >= start && offset < start + SPARSE_EXTENT_BYTES
        });
        let expected = if written { SPARSE_PATTERN } else { 0 };
        if let Some(position) = buffer.iter().position(|byte| *byte != expected) {
            return Err(format!(
                "the copy has {:#04x} at byte {}, expected {expected:#04x}",
                buffer[position],
                offset + position as u64
            ));
        }
        offset += MIB;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// dd
// ---------------------------------------------------------------------------------------------

/// Writes dirty pages back, then drops the page cache, dentries and inodes, so the next read
/// comes from the target rather than from memory (proc(5), /proc/sys/vm/drop_caches).
#[track_caller]
fn drop_caches() {
    run_ok("sync", &[] as &[&str], Duration::from_secs(300));
    fs::write("/proc/sys/vm/drop_caches", "3")
        .unwrap_or_else(|error| panic!("echo 3 > /proc/sys/vm/drop_caches: {error} (needs root)"));
}

/// Reads `path` once so the dd write reads its source from memory, not from the disk it is
/// also writing to.
fn warm_page_cache(path: &Path) {
    let mut file = fs::File::open(path).expect("open the dd source file");
    let mut buffer = vec![0u8; MIB as usize];
    while file
        .read(&mut buffer)
        .map(|count| count > 0)
        .unwrap_or(false)
    {}
}

/// Runs `dd ARGS` (C locale) and returns MB/s (10^6 bytes per second) from its summary line,
/// "N bytes (…) copied, S s, …".
fn dd(arguments: &[&str]) -> Result<f64, String> {
    let result = attempt("dd", || {
        run_command(
            Command::new("dd").args(arguments).env("LC_ALL", "C"),
            Duration::from_secs(600),
        )
    })?;
    if !result.status.success() {
        return Err(format!("dd failed\n{}", result.describe()));
    }
    let stderr = result.stderr_text();
    let summary = stderr
        .lines()
        .rev()
        .find(|line| line.contains(" copied, "))
        .ok_or_else(|| format!("no summary line from dd\n{}", result.describe()))?;
    let bytes: f64 = summary
        .split_whitespace()
        .next()
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| format!("no byte count in {summary:?}"))?;
    let seconds: f64 = summary
        .split(" copied, ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| format!("no duration in {summary:?}"))?;
    if bytes <= 0.0 || seconds <= 0.0 {
        return Err(format!("dd moved nothing: {summary:?}"));
    }
    Ok(bytes / seconds / 1e6)
}

/// The [`DD_STEPS`] on the mounted filesystem, in order.
fn run_dd_steps(mount_directory: &Path, source: &Path) -> Vec<Result<f64, String>> {
    let file = mount_directory.join("dd.bin");
    let source_argument = format!("if={}", source.display());
    let file_in = format!("if={}", file.display());
    let file_out = format!("of={}", file.display());
    warm_page_cache(source);
    let write = dd(&[&source_argument, &file_out, "bs=1M", "conv=fsync"]);
    drop_caches();
    let read_buffered = dd(&[&file_in, "of=/dev/null", "bs=1M"]);
    drop_caches();
    let read_direct = dd(&[&file_in, "of=/dev/null", "bs=1M", "iflag=direct"]);
    let _ = fs::remove_file(&file);
    vec![write, read_buffered, read_direct]
}

// ---------------------------------------------------------------------------------------------
// pgbench
// ---------------------------------------------------------------------------------------------

/// PostgreSQL with its data directory on the mounted filesystem, pgbench, and a clean stop.
fn run_pgbench_on(
    mount_directory: &Path,
    directory: &Path,
    settings: PgbenchSettings,
) -> Result<PgbenchMeasurement, String> {
    let postgres = Postgres::initialise_and_start(
        &mount_directory.join("pgdata"),
        &directory.join("postgres"),
    );
    let measurement = postgres.run_pgbench(settings);
    postgres.stop();
    measurement
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Lets the `postgres` user reach the mount point and its own socket directory below
/// `directory` (temporary directories are created 0700).
fn make_traversable(directory: &Path) {
    fs::set_permissions(directory, fs::Permissions::from_mode(0o711))
        .unwrap_or_else(|error| panic!("chmod 0711 {}: {error}", directory.display()));
}

fn run_target(
    target: &Target,
    settings: &Settings,
    workspace: &Path,
    dd_source: &Path,
) -> TargetResults {
    let started = Instant::now();
    let directory = workspace.join(target.key);
    fs::create_dir_all(&directory).expect("create the target's directory");
    make_traversable(&directory);
    let jobs = standard_jobs(VOLUME_SIZE_BYTES, settings.read_region_bytes);
    let reported_job_count = jobs.iter().filter(|job| job.reported).count();
    let mut phase_started = Instant::now();
    let mut phase_seconds = Vec::new();
    let mut end_phase = |phase_seconds: &mut Vec<f64>| {
        phase_seconds.push(phase_started.elapsed().as_secs_f64());
        eprintln!(
            "   {:<12} {:.1} s",
            PHASES[phase_seconds.len() - 1],
            phase_started.elapsed().as_secs_f64()
        );
        phase_started = Instant::now();
    };

    let backend = match attempt("start-up", || Backend::start(target, &directory)) {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("   FAILED: {error}");
            return TargetResults::failed(reported_job_count, &error);
        }
    };
    end_phase(&mut phase_seconds);

    let sparse_copy = measure(
        "sparse copy",
        || run_sparse_copy(&backend.client_source(), &directory),
        |m| {
            format!(
                "{:.2} s, {:.0} MB/s, {:.1} MiB allocated",
                m.seconds, m.megabytes_per_second, m.allocated_mib
            )
        },
    );
    end_phase(&mut phase_seconds);

    let mut fio = Vec::new();
    for job in &jobs {
        let measurement = measure(
            job.label,
            || run_job(job, &backend.fio_target(), settings.fio_seconds),
            |m| {
                format!(
                    "{:>8.0} IOPS {:>8.1} MB/s p50 {:>7.0} µs p99 {:>7.0} µs",
                    m.iops, m.megabytes_per_second, m.latency_p50_us, m.latency_p99_us
                )
            },
        );
        if job.reported {
            fio.push(measurement);
        }
    }
    end_phase(&mut phase_seconds);

    let volume = attempt("ext4 set-up", || backend.mount_ext4(&directory));
    end_phase(&mut phase_seconds);
    let (dd, pgbench) = match volume {
        Ok(volume) => {
            let dd = attempt("dd", || run_dd_steps(&volume.mount_directory, dd_source))
                .unwrap_or_else(|error| vec![Err(error); DD_STEPS.len()]);
            for (step, result) in DD_STEPS.iter().zip(&dd) {
                match result {
                    Ok(rate) => eprintln!("     dd {step:<26} {rate:.1} MB/s"),
                    Err(error) => eprintln!("     dd {step:<26} FAILED: {error}"),
                }
            }
            end_phase(&mut phase_seconds);
            let pgbench = measure(
                "pgbench",
                || run_pgbench_on(&volume.mount_directory, &directory, settings.pgbench),
                |m| {
                    format!(
                        "init {:.1} s, {:.1} tps, latency {:.2} ms",
                        m.initialise_seconds, m.transactions_per_second, m.latency_average_ms
                    )
                },
            );
            end_phase(&mut phase_seconds);
            if let Err(error) = attempt_cleanup("teardown", || volume.detach()) {
                eprintln!("   teardown FAILED: {error}");
            }
            (dd, pgbench)
        }
        Err(error) => {
            eprintln!("   FAILED: {error}");
            phase_seconds.extend([0.0, 0.0]);
            (vec![Err(error.clone()); DD_STEPS.len()], Err(error))
        }
    };
    // Stopping the servers is part of the teardown phase.
    if let Err(error) = attempt_cleanup("stop", || backend.stop()) {
        eprintln!("   stopping FAILED: {error}");
    }
    end_phase(&mut phase_seconds);
    phase_seconds.push(started.elapsed().as_secs_f64());
    TargetResults {
        fio,
        dd,
        pgbench,
        sparse_copy,
        phase_seconds,
    }
}

/// Fails, naming what is missing, unless this process can run the report (root for losetup,
/// mount and drop_caches; the clients, peers and PostgreSQL).
pub fn require_report_prerequisites() {
    // SAFETY: geteuid(2) only reads the process's credentials.
    let effective_user_id = unsafe { libc::geteuid() };
    assert_eq!(
        effective_user_id, 0,
        "the benchmark report attaches loop devices, mounts ext4 and drops the page cache, \
         which needs root"
    );
    require_tools(&[
        "fio",
        "qemu-io",
        "nbdcopy",
        "qemu-nbd",
        "nbdkit",
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "mount",
        "umount",
        "dd",
        "runuser",
        SYSTEM_PYTHON,
    ]);
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: nbdfuse needs FUSE"
    );
    assert!(
        crate::support::postgres::server_binaries().is_some(),
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl); run \
         scripts/setup-debian"
    );
}

/// Runs every workload on every target in `options`, then writes `REPORT.md`, `plots.json` and
/// the PNG plots into the output directory.
pub fn run(options: &Options) -> Outcome {
    require_report_prerequisites();
    let started = Instant::now();
    let started_at =
        crate::support::machine::command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let workspace = tempfile::Builder::new()
        .prefix("raftblk-report-")
        .tempdir()
        .expect("create the report's working directory");
    make_traversable(workspace.path());
    let dd_source = workspace.path().join("dd-source.bin");
    // Random so that no layer can shortcut zeros; seeded so every run copies the same bytes.
    write_random_file(
        &dd_source,
        options.settings.dd_bytes,
        &mut SplitMix64::new(0x00dd_5eed),
    );

    let fio_labels: Vec<&str> =
        standard_jobs(VOLUME_SIZE_BYTES, options.settings.read_region_bytes)
            .iter()
            .filter(|job| job.reported)
            .map(|job| job.label)
            .collect();
    let mut results = Vec::new();
    for target in &options.targets {
        if interrupted() {
            break;
        }
        eprintln!("== {} ({})", target.label, target.key);
        results.push(run_target(
            target,
            &options.settings,
            workspace.path(),
            &dd_source,
        ));
    }
    let mut failures: Vec<String> = options
        .targets
        .iter()
        .zip(&results)
        .flat_map(|(target, result)| result.failures(target, &fio_labels))
        .collect();
    if interrupted() {
        failures.push("interrupted by a signal before every target ran".to_owned());
    }
    let elapsed = started.elapsed();

    fs::create_dir_all(&options.output_directory)
        .unwrap_or_else(|error| panic!("create {}: {error}", options.output_directory.display()));
    let targets: Vec<&Target> = options.targets[..results.len()].to_vec();
    let report = render::Report {
        settings: &options.settings,
        note: options.note.as_deref(),
        started_at: &started_at,
        elapsed,
        targets: &targets,
        fio_labels: &fio_labels,
        results: &results,
    };
    let report_path = options.output_directory.join("REPORT.md");
    fs::write(&report_path, report.markdown())
        .unwrap_or_else(|error| panic!("write {}: {error}", report_path.display()));
    let plots_path = options.output_directory.join("plots.json");
    let plots = report.plots();
    fs::write(
        &plots_path,
        serde_json::to_string_pretty(&plots).expect("plots serialise"),
    )
    .unwrap_or_else(|error| panic!("write {}: {error}", plots_path.display()));
    let plot_paths = draw_plots(&plots_path, &options.output_directory);
    Outcome {
        report_path,
        plot_paths,
        failures,
        elapsed,
    }
}

/// `/usr/bin/python3 bench/plot_report.py plots.json DIRECTORY`; returns the PNGs it wrote.
fn draw_plots(plots_path: &Path, output_directory: &Path) -> Vec<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/plot_report.py");
    // Debian's python3, which has python3-matplotlib; a pyenv python3 may shadow it on PATH.
    let result = run_command(
        Command::new(SYSTEM_PYTHON)
            .arg(&script)
            .arg(plots_path)
            .arg(output_directory),
        Duration::from_secs(120),
    )
    .assert_success();
    result
        .stdout_text()
        .lines()
        .map(str::trim)
        .filter(|line| line.ends_with(".png"))
        .map(PathBuf::from)
        .collect()
}
