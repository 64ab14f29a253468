//! A private PostgreSQL instance for `pgbench`: Debian's server binaries
//! (`/usr/lib/postgresql/VERSION/bin`), a data directory on the filesystem under test, run as
//! the `postgres` user (the server refuses to run as root), listening on a unix socket in a
//! private directory only (`listen_addresses = ''`, so nothing binds any TCP address; the
//! private port only names the socket file).
//!
//! Invariant: a started [`Postgres`] is stopped, cleanly by [`Postgres::stop`], or in `Drop`
//! with `pg_ctl stop -m immediate` and then SIGKILL, so no server outlives the benchmark and a
//! filesystem under it can be unmounted.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{pick_free_port, run_command, run_ok, wait_with_timeout, CommandResult};

/// The account Debian's postgresql package creates; the server refuses to run as root.
const SERVER_USER: &str = "postgres";
/// Bound on initdb, start and stop; each takes seconds when healthy.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// The newest `/usr/lib/postgresql/*/bin` that has `pg_ctl`.
pub fn server_binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `postgres --version`, e.g. "postgres (PostgreSQL) 15.18".
pub fn server_version() -> String {
    server_binaries()
        .map(|bin| {
            crate::support::machine::command_output(
                &bin.join("postgres").display().to_string(),
                &["--version"],
            )
        })
        .unwrap_or_else(|| "not installed".to_owned())
}

/// What one pgbench run measured.
#[derive(Clone, Copy, Debug)]
pub struct PgbenchMeasurement {
    /// Wall time of `pgbench -i -s SCALE` (table creation, COPY, vacuum, primary keys).
    pub initialise_seconds: f64,
    /// Transactions per second, without the initial connection time.
    pub transactions_per_second: f64,
    pub latency_average_ms: f64,
}

/// How pgbench is run.
#[derive(Clone, Copy, Debug)]
pub struct PgbenchSettings {
    pub scale: u32,
    pub clients: u32,
    pub threads: u32,
    pub seconds: u64,
}

/// A running PostgreSQL server; see the module documentation.
pub struct Postgres {
    binaries: PathBuf,
    data_directory: PathBuf,
    socket_directory: PathBuf,
    port: u16,
    running: bool,
}

/// `runuser -u postgres -- PROGRAM`, so the server's files belong to it.
fn as_server_user(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", SERVER_USER, "--"]).arg(program);
    command
}

#[track_caller]
fn chown_to_server_user(path: &Path) {
    run_ok(
        "chown",
        &[
            "-R".as_ref(),
            format!("{SERVER_USER}:{SERVER_USER}").as_ref(),
            path.as_os_str(),
        ],
        STEP_TIMEOUT,
    );
}

impl Postgres {
    /// `initdb` in `data_directory` (created; its parents must be traversable by the server
    /// user), the socket and log in `socket_directory`, then `pg_ctl start`.
    #[track_caller]
    pub fn initialise_and_start(data_directory: &Path, socket_directory: &Path) -> Postgres {
        let binaries = server_binaries().unwrap_or_else(|| {
            panic!("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl); install the postgresql package with scripts/setup-debian")
        });
        fs::create_dir_all(data_directory).expect("create the PostgreSQL data directory");
        fs::create_dir_all(socket_directory).expect("create the PostgreSQL socket directory");
        chown_to_server_user(data_directory);
        chown_to_server_user(socket_directory);
        // The data directory must be private to the server (initdb refuses a group- or
        // world-accessible one on start).
        run_ok(
            "chmod",
            &["0700".as_ref(), data_directory.as_os_str()],
            STEP_TIMEOUT,
        );
        // --no-sync: initdb's own fsyncs are set-up, not the workload; pgbench -i and the run
        // that are measured keep fsync and synchronous_commit at their defaults (on).
        run_command(
            as_server_user(&binaries.join("initdb"))
                .arg("-D")
                .arg(data_directory)
                .args(["-U", SERVER_USER, "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]),
            STEP_TIMEOUT,
        )
        .assert_success();
        let port = pick_free_port();
        let mut configuration = OpenOptions::new()
            .append(true)
            .open(data_directory.join("postgresql.conf"))
            .expect("open postgresql.conf");
        // max_wal_size bounds the WAL on the 1 GiB filesystem (the default, 1 GB, could fill
        // it); everything else is PostgreSQL's default.
        writeln!(
            configuration,
            "\n# Written by the raftblk benchmark.\nlisten_addresses = ''\nport = {port}\n\
             unix_socket_directories = '{}'\nmax_wal_size = '256MB'",
            socket_directory.display()
        )
        .expect("append to postgresql.conf");
        drop(configuration);
        let postgres = Postgres {
            binaries,
            data_directory: data_directory.to_owned(),
            socket_directory: socket_directory.to_owned(),
            port,
            running: true,
        };
        let log_path = socket_directory.join("postgresql.log");
        let start = run_command(
            as_server_user(&postgres.binaries.join("pg_ctl"))
                .arg("-D")
                .arg(data_directory)
                .arg("-l")
                .arg(&log_path)
                .args(["-w", "-t", "120", "start"]),
            STEP_TIMEOUT,
        );
        if !start.status.success() {
            // `postgres` stays marked running: a server that is slow to start may still come
            // up, and its drop stops it (or finds nothing to stop).
            panic!(
                "pg_ctl start failed\n{}\n--- server log ---\n{}",
                start.describe(),
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        postgres
    }

    /// pgbench with the connection options of this server.
    fn pgbench(&self) -> Command {
        let mut command = Command::new(self.binaries.join("pgbench"));
        command.arg("-h").arg(&self.socket_directory).args([
            "-p",
            &self.port.to_string(),
            "-U",
            SERVER_USER,
        ]);
        command
    }

    /// `pgbench -i -s SCALE`, then `pgbench -c CLIENTS -j THREADS -T SECONDS` (TPC-B-like).
    pub fn run_pgbench(&self, settings: PgbenchSettings) -> Result<PgbenchMeasurement, String> {
        let started = Instant::now();
        let initialise = run_bounded(
            self.pgbench()
                .args(["-i", "-s", &settings.scale.to_string()])
                .arg(SERVER_USER),
            STEP_TIMEOUT + Duration::from_secs(u64::from(settings.scale) * 60),
        )?;
        if !initialise.status.success() {
            return Err(format!("pgbench -i failed\n{}", initialise.describe()));
        }
        let initialise_seconds = started.elapsed().as_secs_f64();
        let run = run_bounded(
            self.pgbench()
                .args(["-c", &settings.clients.to_string()])
                .args(["-j", &settings.threads.to_string()])
                .args(["-T", &settings.seconds.to_string()])
                .arg(SERVER_USER),
            STEP_TIMEOUT + Duration::from_secs(settings.seconds * 2),
        )?;
        if !run.status.success() {
            return Err(format!("pgbench failed\n{}", run.describe()));
        }
        let text = run.stdout_text();
        let field = |prefix: &str| -> Result<f64, String> {
            text.lines()
                .find_map(|line| line.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|number| number.parse().ok())
                .ok_or_else(|| {
                    format!("no {prefix:?} line in pgbench's output\n{}", run.describe())
                })
        };
        Ok(PgbenchMeasurement {
            initialise_seconds,
            transactions_per_second: field("tps = ")?,
            latency_average_ms: field("latency average = ")?,
        })
    }

    /// `pg_ctl stop -m fast`: the server checkpoints and exits; asserts it did.
    #[track_caller]
    pub fn stop(mut self) {
        self.running = false;
        run_command(
            as_server_user(&self.binaries.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_directory)
                .args(["-m", "fast", "-w", "-t", "120", "stop"]),
            STEP_TIMEOUT,
        )
        .assert_success();
    }
}

/// `run_command` with its timeout panic turned into an error, so a hung pgbench fails its
/// cell instead of the whole target.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<CommandResult, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_command(command, timeout)
    }))
    .map_err(|_| format!("{command:?} did not finish within {timeout:?}"))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        // Reached only when the benchmark failed with the server up. Never panic here (this
        // often runs while a panic unwinds): immediate shutdown, then SIGKILL by the pid in
        // postmaster.pid if the server is still there.
        let stopped = as_server_user(&self.binaries.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data_directory)
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .is_some_and(|mut child| {
                let status = wait_with_timeout(&mut child, Duration::from_secs(30));
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                status.is_some_and(|status| status.success())
            });
        if stopped {
            return;
        }
        let process_id = fs::read_to_string(self.data_directory.join("postmaster.pid"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .next()
                    .and_then(|line| line.trim().parse().ok())
            });
        if let Some(process_id) = process_id {
            // SAFETY: kill(2) only sends a signal; no memory is involved.
            unsafe {
                libc::kill(process_id, libc::SIGKILL);
            }
        }
    }
}
