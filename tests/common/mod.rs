//! Shared harness for the black-box tests in `tests/`.
//!
//! Owns everything a test needs to drive a real `raftblk server` process from the outside:
//! - [`ServerProcess`]: spawns the server on `127.0.0.1:0` with a private data directory, waits
//!   for its `--ready-file`, and can `kill -9`, `SIGTERM` and restart it on the same data.
//! - [`run_command`] and [`BackgroundProcess`]: external clients (qemu-img, nbdinfo, fio, …)
//!   with a timeout on every run and failure messages that show the command and its output.
//! - [`RawConnection`] and [`NbdClient`]: a small synchronous NBD client written from the
//!   specification (`doc/proto.md` of NetworkBlockDevice/nbd), able to send malformed input and
//!   to pipeline many requests while recording which were acknowledged.
//! - [`SplitMix64`]: a seeded generator so every random test prints a seed that replays it.
//! - [`cluster`]: several servers forming one Raft group, and the client-side proxy;
//!   [`relay`]: the fault-injecting TCP relay between them; [`verified`]: a write load whose
//!   every acknowledged write can be checked after crashes; [`mount`]: ext4 on an export
//!   through nbdfuse and a loop device.
//!
//! Invariant: nothing here sleeps and hopes; every wait polls a condition against a deadline
//! and fails with a message that says what it waited for.

// Each integration test is its own crate and uses a different part of this module.
#![allow(dead_code)]

pub mod cluster;
pub mod mount;
pub mod relay;
pub mod verified;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// The volume a fresh server creates on first start (contract of `raftblk server`).
pub const DEFAULT_EXPORT_NAME: &str = "disk0";
pub const DEFAULT_EXPORT_SIZE_BYTES: u64 = GIB;

/// How long a fresh server may take to open RocksDB, elect itself leader and write its ready
/// file. Generous because CI machines are shared and slow; a healthy server needs ~1 s.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean shutdown (SIGTERM) may take before the test calls it a hang.
pub const SERVER_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket read/write timeout for the test client: a server that stops answering fails the
/// test instead of hanging it.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binary under test: `RAFTBLK_BIN` at run time if set (several worktrees share one
/// build directory, so a test run can pin a copy of the binary it was built with), else the
/// binary Cargo built for this test crate.
pub fn server_program() -> PathBuf {
    match std::env::var_os("RAFTBLK_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_raftblk")),
    }
}

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

/// Debian packages that provide the external tools; named in failure messages.
pub const SETUP_HINT: &str = "install them with scripts/setup-debian (Debian packages: \
     qemu-utils libnbd-bin python3-libnbd nbdkit fio fuse3 e2fsprogs nbdfuse util-linux)";

/// Finds `tool` on `PATH` (plus the sbin directories, where losetup and mkfs live).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        fs::metadata(path)
            .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if tool.contains('/') {
        let path = PathBuf::from(tool);
        return is_executable(&path).then_some(path);
    }
    let path_variable = std::env::var("PATH").unwrap_or_default();
    let found = path_variable
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .filter(|directory| !directory.is_empty())
        .map(|directory| Path::new(directory).join(tool))
        .find(|candidate| is_executable(candidate));
    found
}

/// Fails the test, naming every missing tool, unless all of `tools` are installed. The tests
/// never skip silently: a missing client is a broken test machine, not a pass.
pub fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "required external tools are missing: {missing:?}; {SETUP_HINT}"
    );
}

/// The Debian Python that has the libnbd bindings (a pyenv `python3` may shadow it on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Fails the test unless `/usr/bin/python3 -c 'import nbd'` works.
pub fn require_python_libnbd() {
    require_tools(&[SYSTEM_PYTHON]);
    let result = run_command(
        Command::new(SYSTEM_PYTHON).args(["-c", "import nbd"]),
        Duration::from_secs(30),
    );
    assert!(
        result.status.success(),
        "the libnbd Python bindings are missing ({SYSTEM_PYTHON} -c 'import nbd' failed); \
         {SETUP_HINT}\n{}",
        result.describe()
    );
}

/// Outcome of one external command run to completion.
pub struct CommandResult {
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl CommandResult {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Everything a human needs to see when an assertion about this command fails.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nelapsed: {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command_line,
            self.status,
            self.elapsed,
            truncate_for_display(&self.stdout_text()),
            truncate_for_display(&self.stderr_text()),
        )
    }

    /// Panics with the full description unless the command exited 0.
    #[track_caller]
    pub fn assert_success(self) -> Self {
        assert!(self.status.success(), "command failed\n{}", self.describe());
        self
    }

    /// Parses stdout as JSON, skipping any banner lines printed before the first `{` or `[`
    /// (fio prints "fio: connected to NBD server" first).
    #[track_caller]
    pub fn stdout_json(&self) -> serde_json::Value {
        let text = self.stdout_text();
        let start = text.find(['{', '[']).unwrap_or_else(|| {
            panic!("no JSON in stdout\n{}", self.describe());
        });
        serde_json::from_str(&text[start..]).unwrap_or_else(|error| {
            panic!("stdout is not valid JSON: {error}\n{}", self.describe());
        })
    }
}

fn truncate_for_display(text: &str) -> String {
    const LIMIT_BYTES: usize = 16 * 1024;
    if text.len() <= LIMIT_BYTES {
        return text.to_owned();
    }
    let mut start = text.len() - LIMIT_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {} bytes cut ...]\n{}", start, &text[start..])
}

/// Runs `command` to completion with stdin closed and output captured. On timeout the whole
/// process group is killed and the test fails with the command and its output so far.
#[track_caller]
pub fn run_command(command: &mut Command, timeout: Duration) -> CommandResult {
    let command_line = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also kills anything the tool started.
        .process_group(0);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command_line}: {error}; {SETUP_HINT}"));
    let stdout_receiver = drain_in_background(child.stdout.take());
    let stderr_receiver = drain_in_background(child.stderr.take());
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                kill_process_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                let stdout = stdout_receiver
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                let stderr = stderr_receiver
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                panic!(
                    "command timed out after {timeout:?} and was killed: {command_line}\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    truncate_for_display(&String::from_utf8_lossy(&stdout)),
                    truncate_for_display(&String::from_utf8_lossy(&stderr)),
                );
            }
            Err(error) => panic!("waiting for {command_line}: {error}"),
        }
    };
    // A daemon the tool left behind could hold the pipes open forever; do not wait for it.
    let stdout = stdout_receiver
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    let stderr = stderr_receiver
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    CommandResult {
        command_line,
        status,
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// Runs `program args…` with a timeout and asserts it exits 0.
#[track_caller]
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> CommandResult {
    run_command(Command::new(program).args(args), timeout).assert_success()
}

fn drain_in_background<R: Read + Send + 'static>(source: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(mut source) = source {
            let _ = source.read_to_end(&mut buffer);
        }
        let _ = sender.send(buffer);
    });
    receiver
}

fn kill_process_group(process_group_id: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(process_group_id as libc::pid_t), signal);
    }
}

fn send_signal(process_id: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) only sends a signal; no memory is involved.
    let result = unsafe { libc::kill(process_id as libc::pid_t, signal) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for `child` to exit, up to `timeout`; `None` if it is still running.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(error) => panic!("waiting for child {}: {error}", child.id()),
        }
    }
}

/// Polls `condition` every 20 ms until it holds; fails with `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A long-running helper process (nbdfuse, qemu-nbd, nbdkit) whose output goes to a log file.
/// Dropping it kills its process group, so a failing test leaves nothing behind.
pub struct BackgroundProcess {
    pub description: String,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl BackgroundProcess {
    #[track_caller]
    pub fn spawn(command: &mut Command, log_path: &Path) -> Self {
        let description = format!("{command:?}");
        let log = File::create(log_path)
            .unwrap_or_else(|error| panic!("create {}: {error}", log_path.display()));
        let log_for_stderr = log
            .try_clone()
            .unwrap_or_else(|error| panic!("clone log handle: {error}"));
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {description}: {error}; {SETUP_HINT}"));
        BackgroundProcess {
            description,
            log_path: log_path.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// Fails the test (with the process's log) if it has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited early with {status}\n--- log ---\n{}",
                self.description,
                self.log_text()
            );
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_with_timeout(child, timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        kill_process_group(child.id(), libc::SIGTERM);
        if let Some(status) = wait_with_timeout(&mut child, grace) {
            return Some(status);
        }
        kill_process_group(child.id(), libc::SIGKILL);
        child.wait().ok()
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_process_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            if thread::panicking() {
                eprintln!(
                    "--- log of {} ---\n{}",
                    self.description,
                    truncate_for_display(&fs::read_to_string(&self.log_path).unwrap_or_default())
                );
            }
        }
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, never the same one twice in
/// this process, for peers (qemu-nbd, nbdkit) that cannot bind port 0 and report it.
pub fn pick_free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free TCP port found on 127.0.0.1 after 100 attempts");
}

/// Waits until something accepts TCP connections on `address`.
#[track_caller]
pub fn wait_for_listener(address: SocketAddr, timeout: Duration) {
    wait_until(&format!("a listener on {address}"), timeout, || {
        TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
    });
}

/// Resident set size of `pid` in KiB, from `/proc/PID/status`.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/status: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status:\n{status}"))
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// Addresses the server reported in its ready file.
#[derive(Clone, Copy, Debug)]
pub struct ServerAddresses {
    pub nbd: SocketAddr,
    pub control: SocketAddr,
    pub pid: u32,
}

/// One `raftblk server` with a private temporary data directory. It survives restarts:
/// [`ServerProcess::restart`] starts a new process on the same data directory. Each start
/// listens on fresh ports (`127.0.0.1:0`), so always ask for the address after a restart.
/// Dropping it kills the process; if the test is failing, the server's log is printed.
pub struct ServerProcess {
    workspace: tempfile::TempDir,
    data_directory: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    addresses: Option<ServerAddresses>,
    start_count: u32,
    /// Extra environment for every start (e.g. `FAILPOINTS` for the supervision tests).
    environment: Vec<(String, String)>,
}

impl ServerProcess {
    /// Starts a server on a fresh, empty data directory and waits until it is ready.
    #[track_caller]
    pub fn start() -> Self {
        Self::start_with_environment(&[])
    }

    /// Like [`ServerProcess::start`], with extra environment variables that also apply to
    /// every restart.
    #[track_caller]
    pub fn start_with_environment(environment: &[(&str, &str)]) -> Self {
        let workspace = tempfile::Builder::new()
            .prefix("raftblk-test-")
            .tempdir()
            .expect("create temporary directory for the server");
        let data_directory = workspace.path().join("data");
        let log_path = workspace.path().join("server.log");
        let mut server = ServerProcess {
            workspace,
            data_directory,
            log_path,
            child: None,
            addresses: None,
            start_count: 0,
            environment: environment
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        };
        server.spawn_and_wait_ready();
        server
    }

    /// A scratch directory that lives as long as the server (for images, mount points …).
    pub fn workspace(&self) -> &Path {
        self.workspace.path()
    }

    pub fn data_directory(&self) -> &Path {
        &self.data_directory
    }

    #[track_caller]
    pub fn addresses(&self) -> ServerAddresses {
        self.addresses
            .unwrap_or_else(|| panic!("the server is not running (start #{})", self.start_count))
    }

    #[track_caller]
    pub fn nbd_address(&self) -> SocketAddr {
        self.addresses().nbd
    }

    #[track_caller]
    pub fn control_address(&self) -> SocketAddr {
        self.addresses().control
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    #[track_caller]
    pub fn uri(&self, export_name: &str) -> String {
        format!("nbd://{}/{}", self.nbd_address(), export_name)
    }

    #[track_caller]
    pub fn pid(&self) -> u32 {
        self.addresses().pid
    }

    /// The server's stdout and stderr over all starts so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fails the test, with the server log, if the server process has exited.
    #[track_caller]
    pub fn assert_running(&mut self, context: &str) {
        let exit_status = self
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten());
        if let Some(status) = exit_status {
            panic!(
                "the server exited ({status}) {context}\n--- server log ---\n{}",
                truncate_for_display(&self.log_text())
            );
        }
        assert!(self.child.is_some(), "the server is not running {context}");
    }

    /// Resident memory of the server process in KiB.
    #[track_caller]
    pub fn vm_rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid())
    }

    /// `kill -9` the server, as a power cut would, and reap it.
    #[track_caller]
    pub fn kill_9(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("kill_9: the server is not running");
        self.addresses = None;
        // The process may already be gone if it crashed by itself; `wait` tells us below.
        let _ = send_signal(child.id(), libc::SIGKILL);
        let status = child.wait().expect("reap the killed server");
        self.append_to_log(&format!("=== test harness: kill -9 -> {status} ===\n"));
        status
    }

    /// Sends SIGTERM and waits for the exit status (panics if the server hangs).
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("terminate: the server is not running");
        self.addresses = None;
        send_signal(child.id(), libc::SIGTERM).expect("send SIGTERM to the server");
        let status = match wait_with_timeout(&mut child, SERVER_SHUTDOWN_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not exit within {SERVER_SHUTDOWN_TIMEOUT:?} of SIGTERM\n\
                     --- server log ---\n{}",
                    truncate_for_display(&self.log_text())
                );
            }
        };
        self.append_to_log(&format!("=== test harness: SIGTERM -> {status} ===\n"));
        status
    }

    /// SIGTERM and assert the contract: a clean shutdown exits 0.
    #[track_caller]
    pub fn terminate_cleanly(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "SIGTERM must shut the server down with exit status 0, got {status}\n\
             --- server log ---\n{}",
            truncate_for_display(&self.log_text())
        );
    }

    /// Waits for the server to exit by itself (e.g. after supervision escalated) and reaps
    /// it; `None` if it is still running after `timeout` (it keeps running then).
    pub fn wait_for_own_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_with_timeout(child, timeout)?;
        self.child = None;
        self.addresses = None;
        self.append_to_log(&format!(
            "=== test harness: exited by itself -> {status} ===\n"
        ));
        Some(status)
    }

    /// Arms the named failpoint in the running server (`PUT /v1/failpoints/{name}`; only
    /// builds with the `failpoints` feature have it), e.g. `action` = `1*panic`.
    #[track_caller]
    pub fn arm_failpoint(&self, name: &str, action: &str) {
        arm_failpoint(self.control_address(), name, action);
    }

    /// Starts the server again on the same data directory (after `kill_9` or `terminate`).
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart: the previous server process is still running"
        );
        self.spawn_and_wait_ready();
    }

    /// Runs `raftblk ARGS… --control ADDR` (the admin CLI) with a timeout.
    #[track_caller]
    pub fn run_cli(&self, args: &[&str]) -> CommandResult {
        let control = self.control_address().to_string();
        run_command(
            Command::new(server_program())
                .args(args)
                .args(["--control", control.as_str()]),
            Duration::from_secs(60),
        )
    }

    fn append_to_log(&self, text: &str) {
        append_to_file(&self.log_path, text);
    }

    #[track_caller]
    fn spawn_and_wait_ready(&mut self) {
        self.start_count += 1;
        let ready_path = self
            .workspace
            .path()
            .join(format!("ready-{}.json", self.start_count));
        let _ = fs::remove_file(&ready_path);
        self.append_to_log(&format!(
            "=== test harness: server start #{} ===\n",
            self.start_count
        ));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the server log");
        let log_for_stderr = log.try_clone().expect("clone the server log handle");
        let mut command = Command::new(server_program());
        command
            .arg("server")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--control-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.data_directory)
            .arg("--ready-file")
            .arg(&ready_path)
            .envs(self.environment.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        let description = format!("{command:?}");
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {description}: {error}"));
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        let addresses = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the server exited ({status}) before becoming ready: {description}\n\
                     --- server log ---\n{}",
                    truncate_for_display(&self.log_text())
                );
            }
            if let Some(addresses) = read_ready_file(&ready_path) {
                break addresses;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not write its ready file {} within \
                     {SERVER_READY_TIMEOUT:?}: {description}\n--- server log ---\n{}",
                    ready_path.display(),
                    truncate_for_display(&self.log_text())
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            addresses.pid,
            child.id(),
            "the ready file must carry the pid of the server process"
        );
        self.child = Some(child);
        self.addresses = Some(addresses);
    }
}

/// Parses the ready file; `None` while it does not exist yet.
fn read_ready_file(path: &Path) -> Option<ServerAddresses> {
    let text = fs::read_to_string(path).ok()?;
    // The server renames the file into place, so a partial file is a contract violation.
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|error| {
        panic!(
            "ready file {} is not JSON ({error}): {text:?}",
            path.display()
        )
    });
    let address = |key: &str| -> SocketAddr {
        json[key]
            .as_str()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("ready file lacks a socket address {key:?}: {text}"))
    };
    let pid = json["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or_else(|| panic!("ready file lacks \"pid\": {text}"));
    Some(ServerAddresses {
        nbd: address("nbd"),
        control: address("control"),
        pid,
    })
}

/// `PUT /v1/failpoints/{name}` on a server's or proxy's control API.
#[track_caller]
pub fn arm_failpoint(control: SocketAddr, name: &str, action: &str) {
    let url = format!("http://{control}/v1/failpoints/{name}");
    if let Err(error) = ureq::put(&url)
        .timeout(Duration::from_secs(10))
        .send_string(action)
    {
        panic!("PUT {url} {action:?}: {error} (is the binary built with --features failpoints?)");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- raftblk server log ({}) ---\n{}",
                self.log_path.display(),
                truncate_for_display(&self.log_text())
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for test data.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// Seed from `RAFTBLK_TEST_SEED` if set, else from the clock; printed so a failure can be
    /// replayed with `RAFTBLK_TEST_SEED=<seed>`.
    pub fn from_environment_or_clock(test_name: &str) -> Self {
        let seed = std::env::var("RAFTBLK_TEST_SEED")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos() as u64)
                    .unwrap_or(0x5eed)
            });
        eprintln!("{test_name}: seed {seed} (replay with RAFTBLK_TEST_SEED={seed})");
        SplitMix64::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (bound > 0; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below(0)");
        self.next_u64() % bound
    }

    pub fn fill_bytes(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, length: usize) -> Vec<u8> {
        let mut buffer = vec![0; length];
        self.fill_bytes(&mut buffer);
        buffer
    }
}

/// Writes `size_bytes` of seeded random data to `path` (for qemu-img and cmp).
pub fn write_random_file(path: &Path, size_bytes: u64, random: &mut SplitMix64) {
    let mut file = File::create(path).unwrap_or_else(|error| panic!("create {path:?}: {error}"));
    let mut chunk = vec![0u8; MIB as usize];
    let mut remaining = size_bytes;
    while remaining > 0 {
        let length = remaining.min(MIB) as usize;
        random.fill_bytes(&mut chunk[..length]);
        file.write_all(&chunk[..length])
            .unwrap_or_else(|error| panic!("write {path:?}: {error}"));
        remaining -= length as u64;
    }
    file.sync_all().ok();
}

// ---------------------------------------------------------------------------------------------
// NBD protocol constants (doc/proto.md, section "Values")
// ---------------------------------------------------------------------------------------------

pub mod nbd {
    //! Wire constants, named as in the specification.

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Option types.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    // Option reply types.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
    pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
    pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

    // Info types.
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const FLAG_READ_ONLY: u16 = 1 << 1;
    pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const FLAG_SEND_FUA: u16 = 1 << 3;
    pub const FLAG_ROTATIONAL: u16 = 1 << 4;
    pub const FLAG_SEND_TRIM: u16 = 1 << 5;
    pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const FLAG_SEND_DF: u16 = 1 << 7;
    pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const FLAG_SEND_CACHE: u16 = 1 << 10;
    pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

    // Structured reply flags and types.
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

    // Error values ("Error values").
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest payload the test client accepts in one reply (32 MiB data plus chunk overhead).
const REPLY_PAYLOAD_LIMIT_BYTES: u32 = 32 * 1024 * 1024 + 4096;
/// Largest option reply payload the test client accepts.
const OPTION_REPLY_PAYLOAD_LIMIT_BYTES: u32 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Handshake-level connection
// ---------------------------------------------------------------------------------------------

/// One reply to an option (doc/proto.md "Fixed newstyle negotiation").
#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub payload: Vec<u8>,
}

/// How a connection ended when the test expected the server to close it.
#[derive(Debug)]
pub struct ClosedConnection {
    /// Bytes the server sent before closing (e.g. an error reply).
    pub bytes_before_close: Vec<u8>,
    /// `true` for an orderly FIN, `false` for a reset.
    pub orderly: bool,
}

/// A TCP connection to an NBD server driven byte by byte: the handshake helpers send exactly
/// what the test asks, valid or not.
pub struct RawConnection {
    pub stream: TcpStream,
}

impl RawConnection {
    #[track_caller]
    pub fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
            .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
        stream.set_nodelay(true).ok();
        stream
            .set_read_timeout(Some(CLIENT_IO_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(CLIENT_IO_TIMEOUT))
            .expect("set write timeout");
        RawConnection { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn receive_exact(&mut self, length: usize) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0; length];
        self.stream.read_exact(&mut buffer)?;
        Ok(buffer)
    }

    /// Reads the server's greeting and returns its handshake flags, checking both magics.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let greeting = self.receive_exact(18)?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
        let option_magic = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
        if magic != nbd::NBDMAGIC || option_magic != nbd::IHAVEOPT {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad greeting magics {magic:#x} {option_magic:#x} (not fixed newstyle)"),
            ));
        }
        Ok(u16::from_be_bytes([greeting[16], greeting[17]]))
    }

    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.send(&flags.to_be_bytes())
    }

    /// Greeting plus client flags `FIXED_NEWSTYLE | NO_ZEROES`; asserts the server offers both.
    #[track_caller]
    pub fn start_handshake(&mut self) {
        let handshake_flags = self.read_greeting().expect("read the server greeting");
        assert_ne!(
            handshake_flags & nbd::FLAG_FIXED_NEWSTYLE,
            0,
            "the server must offer fixed newstyle"
        );
        let mut client_flags = nbd::FLAG_C_FIXED_NEWSTYLE;
        if handshake_flags & nbd::FLAG_NO_ZEROES != 0 {
            client_flags |= nbd::FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(client_flags)
            .expect("send client flags");
    }

    /// An option header announcing `length` bytes of data, without the data.
    pub fn send_option_header(&mut self, option: u32, length: u32) -> io::Result<()> {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        self.send(&header)
    }

    pub fn send_option(&mut self, option: u32, payload: &[u8]) -> io::Result<()> {
        let length = u32::try_from(payload.len()).expect("option payload fits u32");
        let mut message = Vec::with_capacity(16 + payload.len());
        message.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        message.extend_from_slice(payload);
        self.send(&message)
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let header = self.receive_exact(20)?;
        let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
        if magic != nbd::OPTION_REPLY_MAGIC {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let reply_type = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        if length > OPTION_REPLY_PAYLOAD_LIMIT_BYTES {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("option reply payload of {length} bytes is implausibly large"),
            ));
        }
        let payload = self.receive_exact(length as usize)?;
        Ok(OptionReply {
            option,
            reply_type,
            payload,
        })
    }

    /// `NBD_OPT_LIST`: the export names the server announces.
    pub fn list_exports(&mut self) -> io::Result<Vec<String>> {
        self.send_option(nbd::OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let reply = self.read_option_reply()?;
            match reply.reply_type {
                nbd::REP_SERVER if reply.payload.len() >= 4 => {
                    let name_length =
                        u32::from_be_bytes(reply.payload[0..4].try_into().expect("4 bytes"))
                            as usize;
                    let name = reply.payload.get(4..4 + name_length).ok_or_else(|| {
                        io::Error::new(ErrorKind::InvalidData, "NBD_REP_SERVER name overruns")
                    })?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                nbd::REP_ACK => return Ok(names),
                other => {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!("unexpected reply {other:#x} to NBD_OPT_LIST"),
                    ))
                }
            }
        }
    }

    /// Sends `NBD_OPT_ABORT` and expects its acknowledgement (the spec asks servers to ack).
    pub fn abort(&mut self) -> io::Result<OptionReply> {
        self.send_option(nbd::OPT_ABORT, &[])?;
        self.read_option_reply()
    }

    /// Reads until the server closes the connection, for at most `within`. `Err` if the
    /// connection is still open then. Any bytes received first are returned, so the caller
    /// can check an error reply sent before the close.
    pub fn expect_closed(&mut self, within: Duration) -> Result<ClosedConnection, String> {
        let deadline = Instant::now() + within;
        let mut received = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!(
                    "the connection is still open after {within:?} ({} bytes received: {:02x?})",
                    received.len(),
                    &received[..received.len().min(64)]
                ));
            }
            self.stream
                .set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
                .map_err(|error| error.to_string())?;
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    return Ok(ClosedConnection {
                        bytes_before_close: received,
                        orderly: true,
                    })
                }
                Ok(count) => {
                    // Cap what we keep: a server streaming garbage must not eat test memory.
                    if received.len() < 1024 * 1024 {
                        received.extend_from_slice(&buffer[..count]);
                    }
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(ClosedConnection {
                        bytes_before_close: received,
                        orderly: false,
                    })
                }
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(format!("unexpected read error: {error}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission-phase client
// ---------------------------------------------------------------------------------------------

/// What the server said about the export during `NBD_OPT_GO`.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_size_minimum_bytes: Option<u32>,
    pub block_size_preferred_bytes: Option<u32>,
    pub block_size_maximum_bytes: Option<u32>,
}

/// A request that has been sent and not yet answered.
#[derive(Clone, Copy, Debug)]
pub struct PendingRequest {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
}

/// The complete reply to one request (all structured chunks gathered).
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    pub request: PendingRequest,
    /// 0 on success, else an NBD error value.
    pub error: u32,
    /// Read data (holes filled with zeroes); empty for other commands or on error.
    pub data: Vec<u8>,
    /// Human-readable message from a structured error chunk, if any.
    pub error_message: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.error == 0
    }
}

/// A synchronous NBD client: fixed newstyle, `NBD_OPT_GO`, optional structured replies, and
/// any number of requests in flight. Replies may arrive in any order; the client matches them
/// to requests by handle and keeps count of acknowledged writes.
pub struct NbdClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    pub export: ExportInfo,
    pub structured_replies: bool,
    next_handle: u64,
    pending: HashMap<u64, PendingRequest>,
    partial_replies: HashMap<u64, Reply>,
    /// Writes (WRITE, WRITE_ZEROES, TRIM) the server acknowledged with success.
    pub acknowledged_write_count: u64,
}

impl NbdClient {
    /// Connects to `export_name` with structured replies negotiated.
    #[track_caller]
    pub fn connect(address: SocketAddr, export_name: &str) -> Self {
        Self::connect_with(address, export_name, true)
            .unwrap_or_else(|error| panic!("NBD handshake with {address}/{export_name}: {error}"))
    }

    /// Connects with or without structured replies (simple replies only when `false`).
    pub fn connect_with(
        address: SocketAddr,
        export_name: &str,
        structured_replies: bool,
    ) -> io::Result<Self> {
        let mut connection = RawConnection::connect(address);
        let handshake_flags = connection.read_greeting()?;
        if handshake_flags & nbd::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "server is not fixed newstyle",
            ));
        }
        let mut client_flags = nbd::FLAG_C_FIXED_NEWSTYLE;
        if handshake_flags & nbd::FLAG_NO_ZEROES != 0 {
            client_flags |= nbd::FLAG_C_NO_ZEROES;
        }
        connection.send_client_flags(client_flags)?;
        Self::finish_handshake(connection, export_name, structured_replies)
    }

    /// Completes a handshake whose greeting and client flags were already exchanged.
    pub fn finish_handshake(
        mut connection: RawConnection,
        export_name: &str,
        structured_replies: bool,
    ) -> io::Result<Self> {
        if structured_replies {
            connection.send_option(nbd::OPT_STRUCTURED_REPLY, &[])?;
            let reply = connection.read_option_reply()?;
            if reply.reply_type != nbd::REP_ACK {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("NBD_OPT_STRUCTURED_REPLY answered {:#x}", reply.reply_type),
                ));
            }
        }
        // NBD_OPT_GO: name length, name, then one information request (BLOCK_SIZE).
        let name = export_name.as_bytes();
        let mut payload = Vec::new();
        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&nbd::INFO_BLOCK_SIZE.to_be_bytes());
        connection.send_option(nbd::OPT_GO, &payload)?;
        let mut export = ExportInfo::default();
        let mut saw_export_info = false;
        loop {
            let reply = connection.read_option_reply()?;
            match reply.reply_type {
                nbd::REP_INFO if reply.payload.len() >= 2 => {
                    let info_type = u16::from_be_bytes([reply.payload[0], reply.payload[1]]);
                    let body = &reply.payload[2..];
                    match info_type {
                        nbd::INFO_EXPORT if body.len() == 10 => {
                            export.size_bytes =
                                u64::from_be_bytes(body[0..8].try_into().expect("8 bytes"));
                            export.transmission_flags = u16::from_be_bytes([body[8], body[9]]);
                            saw_export_info = true;
                        }
                        nbd::INFO_BLOCK_SIZE if body.len() == 12 => {
                            let field = |index: usize| {
                                u32::from_be_bytes(
                                    body[index * 4..index * 4 + 4].try_into().expect("4 bytes"),
                                )
                            };
                            export.block_size_minimum_bytes = Some(field(0));
                            export.block_size_preferred_bytes = Some(field(1));
                            export.block_size_maximum_bytes = Some(field(2));
                        }
                        nbd::INFO_EXPORT | nbd::INFO_BLOCK_SIZE => {
                            return Err(io::Error::new(
                                ErrorKind::InvalidData,
                                format!(
                                    "NBD_REP_INFO type {info_type} with a {}-byte body",
                                    body.len()
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
                nbd::REP_ACK => break,
                other => {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!(
                            "NBD_OPT_GO for {export_name:?} answered {other:#x}: {}",
                            String::from_utf8_lossy(&reply.payload)
                        ),
                    ))
                }
            }
        }
        if !saw_export_info {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "NBD_OPT_GO succeeded without NBD_INFO_EXPORT",
            ));
        }
        let reader = BufReader::with_capacity(256 * 1024, connection.stream.try_clone()?);
        Ok(NbdClient {
            writer: connection.stream,
            reader,
            export,
            structured_replies,
            next_handle: 1,
            pending: HashMap::new(),
            partial_replies: HashMap::new(),
            acknowledged_write_count: 0,
        })
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.writer.set_read_timeout(Some(timeout)).ok();
        self.writer.set_write_timeout(Some(timeout)).ok();
    }

    /// A second handle on the socket, for tests that watch the raw stream.
    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.writer.try_clone()
    }

    /// Sends bytes as they are, outside any request framing (for truncated requests).
    pub fn send_raw_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    pub fn pending_requests(&self) -> &HashMap<u64, PendingRequest> {
        &self.pending
    }

    /// Sends a request header exactly as given (any command, flags and length), followed by
    /// `payload`, and records it as pending. For malformed input the caller chooses `length`
    /// independently of `payload.len()`.
    pub fn send_request_raw(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut message = Vec::with_capacity(28 + payload.len());
        message.extend_from_slice(&nbd::REQUEST_MAGIC.to_be_bytes());
        message.extend_from_slice(&flags.to_be_bytes());
        message.extend_from_slice(&command.to_be_bytes());
        message.extend_from_slice(&handle.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        message.extend_from_slice(payload);
        // Recorded before sending: if the send fails half way the request may still have
        // reached the server, and a crash checker must treat it as possibly applied.
        self.pending.insert(
            handle,
            PendingRequest {
                command,
                flags,
                offset,
                length,
            },
        );
        self.writer.write_all(&message)?;
        Ok(handle)
    }

    pub fn submit_read(&mut self, offset: u64, length: u32) -> io::Result<u64> {
        self.send_request_raw(nbd::CMD_READ, 0, offset, length, &[])
    }

    pub fn submit_write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u64> {
        let length = u32::try_from(data.len()).expect("write length fits u32");
        self.send_request_raw(nbd::CMD_WRITE, flags, offset, length, data)
    }

    /// Sends a command without payload (FLUSH, TRIM, WRITE_ZEROES, CACHE, DISC …).
    pub fn submit_command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> io::Result<u64> {
        self.send_request_raw(command, flags, offset, length, &[])
    }

    /// Reads replies until one request is completely answered, and returns that reply.
    pub fn receive_reply(&mut self) -> io::Result<Reply> {
        loop {
            let mut magic = [0u8; 4];
            self.reader.read_exact(&mut magic)?;
            match u32::from_be_bytes(magic) {
                nbd::SIMPLE_REPLY_MAGIC => return self.receive_simple_reply(),
                nbd::STRUCTURED_REPLY_MAGIC => {
                    if !self.structured_replies {
                        return Err(invalid_data(
                            "structured reply chunk although structured replies were not \
                             negotiated",
                        ));
                    }
                    if let Some(reply) = self.receive_structured_chunk()? {
                        return Ok(reply);
                    }
                }
                other => return Err(invalid_data(&format!("bad reply magic {other:#010x}"))),
            }
        }
    }

    fn take_pending(&mut self, handle: u64) -> io::Result<PendingRequest> {
        self.pending
            .remove(&handle)
            .ok_or_else(|| invalid_data(&format!("reply for unknown handle {handle}")))
    }

    fn receive_simple_reply(&mut self) -> io::Result<Reply> {
        let mut rest = [0u8; 12];
        self.reader.read_exact(&mut rest)?;
        let error = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes"));
        let handle = u64::from_be_bytes(rest[4..12].try_into().expect("8 bytes"));
        let request = self.take_pending(handle)?;
        if self.structured_replies && request.command == nbd::CMD_READ {
            return Err(invalid_data(
                "simple reply to NBD_CMD_READ after structured replies were negotiated",
            ));
        }
        let mut data = Vec::new();
        // Without structured replies, a successful read carries exactly `length` bytes and a
        // failed one none ("Simple reply message").
        if request.command == nbd::CMD_READ && error == 0 {
            data = vec![0; request.length as usize];
            self.reader.read_exact(&mut data)?;
        }
        Ok(self.complete(Reply {
            handle,
            request,
            error,
            data,
            error_message: String::new(),
        }))
    }

    /// Handles one structured chunk; returns the reply when this chunk carried the DONE flag.
    fn receive_structured_chunk(&mut self) -> io::Result<Option<Reply>> {
        let mut header = [0u8; 16];
        self.reader.read_exact(&mut header)?;
        let flags = u16::from_be_bytes([header[0], header[1]]);
        let chunk_type = u16::from_be_bytes([header[2], header[3]]);
        let handle = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if length > REPLY_PAYLOAD_LIMIT_BYTES {
            return Err(invalid_data(&format!(
                "structured chunk of {length} bytes is larger than any valid reply"
            )));
        }
        let mut payload = vec![0u8; length as usize];
        self.reader.read_exact(&mut payload)?;
        let request = *self
            .pending
            .get(&handle)
            .ok_or_else(|| invalid_data(&format!("chunk for unknown handle {handle}")))?;
        let reply = self.partial_replies.entry(handle).or_insert_with(|| Reply {
            handle,
            request,
            error: 0,
            data: if request.command == nbd::CMD_READ {
                vec![0; request.length as usize]
            } else {
                Vec::new()
            },
            error_message: String::new(),
        });
        let range_in_request =
            |offset: u64, chunk_length: u64| -> io::Result<std::ops::Range<usize>> {
                let start = offset.checked_sub(request.offset);
                match start {
                    Some(start) if start + chunk_length <= u64::from(request.length) => {
                        Ok(start as usize..(start + chunk_length) as usize)
                    }
                    _ => Err(invalid_data(&format!(
                        "chunk [{offset}, +{chunk_length}) outside the request [{}, +{})",
                        request.offset, request.length
                    ))),
                }
            };
        match chunk_type {
            nbd::REPLY_TYPE_NONE => {}
            nbd::REPLY_TYPE_OFFSET_DATA if payload.len() >= 8 => {
                let offset = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
                let range = range_in_request(offset, (payload.len() - 8) as u64)?;
                reply.data[range].copy_from_slice(&payload[8..]);
            }
            nbd::REPLY_TYPE_OFFSET_HOLE if payload.len() == 12 => {
                let offset = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
                let hole_length = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
                let range = range_in_request(offset, u64::from(hole_length))?;
                reply.data[range].fill(0);
            }
            nbd::REPLY_TYPE_BLOCK_STATUS => {}
            nbd::REPLY_TYPE_ERROR | nbd::REPLY_TYPE_ERROR_OFFSET if payload.len() >= 6 => {
                reply.error = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
                let message_length = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                let message = payload.get(6..6 + message_length).unwrap_or(&[]);
                reply.error_message = String::from_utf8_lossy(message).into_owned();
                if reply.error == 0 {
                    return Err(invalid_data("structured error chunk with error value 0"));
                }
            }
            other => {
                return Err(invalid_data(&format!(
                    "unexpected or malformed structured chunk type {other} ({} bytes)",
                    payload.len()
                )))
            }
        }
        if flags & nbd::REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        let mut reply = self
            .partial_replies
            .remove(&handle)
            .expect("the entry was inserted above");
        self.pending.remove(&handle);
        if reply.error != 0 {
            reply.data.clear();
        }
        Ok(Some(self.complete(reply)))
    }

    fn complete(&mut self, reply: Reply) -> Reply {
        if reply.error == 0
            && matches!(
                reply.request.command,
                nbd::CMD_WRITE | nbd::CMD_WRITE_ZEROES | nbd::CMD_TRIM
            )
        {
            self.acknowledged_write_count += 1;
        }
        reply
    }

    /// Sends one request and waits for its reply (nothing else may be in flight).
    fn round_trip(&mut self, submit: io::Result<u64>) -> io::Result<Reply> {
        let handle = submit?;
        let reply = self.receive_reply()?;
        if reply.handle != handle {
            return Err(invalid_data(&format!(
                "expected the reply to handle {handle}, got {}",
                reply.handle
            )));
        }
        Ok(reply)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> io::Result<Reply> {
        let submit = self.submit_read(offset, length);
        self.round_trip(submit)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
        let submit = self.submit_write(offset, data, 0);
        self.round_trip(submit)
    }

    pub fn command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> io::Result<Reply> {
        let submit = self.submit_command(command, flags, offset, length);
        self.round_trip(submit)
    }

    pub fn flush(&mut self) -> io::Result<Reply> {
        self.command(nbd::CMD_FLUSH, 0, 0, 0)
    }

    /// Reads and asserts success, returning the data.
    #[track_caller]
    pub fn read_ok(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let reply = self
            .read(offset, length)
            .unwrap_or_else(|error| panic!("READ [{offset}, +{length}): transport error {error}"));
        assert_eq!(
            reply.error, 0,
            "READ [{offset}, +{length}) failed: error {} {:?}",
            reply.error, reply.error_message
        );
        reply.data
    }

    /// Writes and asserts success.
    #[track_caller]
    pub fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let length = data.len();
        let reply = self
            .write(offset, data)
            .unwrap_or_else(|error| panic!("WRITE [{offset}, +{length}): transport error {error}"));
        assert_eq!(
            reply.error, 0,
            "WRITE [{offset}, +{length}) failed: error {} {:?}",
            reply.error, reply.error_message
        );
    }

    /// `NBD_CMD_DISC`, then half-close; the server finishes in-flight writes and closes.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.submit_command(nbd::CMD_DISC, 0, 0, 0)?;
        self.writer.shutdown(Shutdown::Write)
    }
}

fn invalid_data(message: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message.to_owned())
}

/// Name of an NBD error value, for messages.
pub fn nbd_error_name(error: u32) -> &'static str {
    match error {
        0 => "success",
        nbd::EPERM => "EPERM",
        nbd::EIO => "EIO",
        nbd::ENOMEM => "ENOMEM",
        nbd::EINVAL => "EINVAL",
        nbd::ENOSPC => "ENOSPC",
        nbd::EOVERFLOW => "EOVERFLOW",
        nbd::ENOTSUP => "ENOTSUP",
        nbd::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error value",
    }
}

/// Appends `text` to a process log (harness markers between restarts); best effort.
pub fn append_to_file(path: &Path, text: &str) {
    if let Ok(mut log) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = log.write_all(text.as_bytes());
    }
}

/// The opening of a peer message stream from node `from` to node `to`, as a member sends it;
/// the caller appends frames.
pub fn peer_hello(from: u64, to: u64) -> bytes::BytesMut {
    let mut bytes = bytes::BytesMut::new();
    raftblk::peer::encode_hello(
        &raftblk::peer::Hello {
            kind: raftblk::peer::StreamKind::Messages,
            from,
            to,
        },
        &mut bytes,
    );
    bytes
}
