//! A real filesystem on a block device without the kernel nbd module: an NBD export exposed as a
//! file by `nbdfuse`, a loop device on that file (or on a plain local file, for a baseline), and
//! an ext4 mount on the loop device.
//!
//! Used by the interop and cluster tests (ext4 across a server restart and a leader kill) and by
//! the benchmark report (dd and PostgreSQL on ext4). Needs root (losetup, mount) and
//! `/dev/fuse`.
//!
//! Invariant: whatever [`MountedVolume`] set up is undone, in reverse order (umount, detach the
//! loop device, `fusermount3 -u`, wait for nbdfuse): step by step with checks in
//! [`MountedVolume::detach`], and with lazy unmounts and kills in `Drop` when a caller failed
//! half way, so a failing test or benchmark leaves no mount, loop device or nbdfuse behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{run_ok, wait_until, wait_with_timeout, BackgroundProcess};

/// Bound on each set-up and teardown command; they take well under a second when healthy.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on `mkfs.ext4`, which writes the inode tables and journal through the device.
const MKFS_TIMEOUT: Duration = Duration::from_secs(180);

/// nbdfuse (optional), a loop device and a mount; see the module documentation.
pub struct MountedVolume {
    pub fuse_directory: Option<PathBuf>,
    pub mount_directory: PathBuf,
    nbdfuse: Option<BackgroundProcess>,
    loop_device: Option<String>,
    mounted: bool,
}

impl MountedVolume {
    /// Exposes `uri` through nbdfuse as `WORKSPACE/fuse-TAG/disk` and attaches a loop device to
    /// it (not yet formatted or mounted). The file must have `expected_size_bytes`.
    #[track_caller]
    pub fn attach_nbd(uri: &str, workspace: &Path, tag: &str, expected_size_bytes: u64) -> Self {
        let fuse_directory = workspace.join(format!("fuse-{tag}"));
        fs::create_dir_all(&fuse_directory).expect("create fuse directory");
        let pid_file = workspace.join(format!("nbdfuse-{tag}.pid"));
        let mut volume = MountedVolume::unattached(workspace, tag);
        volume.fuse_directory = Some(fuse_directory.clone());
        let nbdfuse = BackgroundProcess::spawn(
            Command::new("nbdfuse")
                .arg("-P")
                .arg(&pid_file)
                .arg(fuse_directory.join("disk"))
                .arg(uri),
            &workspace.join(format!("nbdfuse-{tag}.log")),
        );
        volume.nbdfuse = Some(nbdfuse);
        // nbdfuse writes its pid file once it serves (man nbdfuse, --pidfile).
        wait_until("nbdfuse to write its pid file", STEP_TIMEOUT, || {
            if let Some(nbdfuse) = volume.nbdfuse.as_mut() {
                nbdfuse.assert_running();
            }
            fs::metadata(&pid_file)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        });
        let disk_file = fuse_directory.join("disk");
        assert_eq!(
            fs::metadata(&disk_file).expect("nbdfuse's disk file").len(),
            expected_size_bytes,
            "the nbdfuse file must have the export's size"
        );
        volume.attach_loop_device(&disk_file);
        volume
    }

    /// Attaches a loop device to a local file (the baseline without any NBD in the path).
    #[track_caller]
    pub fn attach_file(file: &Path, workspace: &Path, tag: &str) -> Self {
        let mut volume = MountedVolume::unattached(workspace, tag);
        volume.attach_loop_device(file);
        volume
    }

    fn unattached(workspace: &Path, tag: &str) -> Self {
        let mount_directory = workspace.join(format!("mnt-{tag}"));
        fs::create_dir_all(&mount_directory).expect("create mount directory");
        MountedVolume {
            fuse_directory: None,
            mount_directory,
            nbdfuse: None,
            loop_device: None,
            mounted: false,
        }
    }

    #[track_caller]
    fn attach_loop_device(&mut self, file: &Path) {
        let losetup = run_ok(
            "losetup",
            &["-f".as_ref(), "--show".as_ref(), file.as_os_str()],
            STEP_TIMEOUT,
        );
        let device = losetup.stdout_text().trim().to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed no device\n{}",
            losetup.describe()
        );
        self.loop_device = Some(device);
    }

    #[track_caller]
    pub fn device(&self) -> &str {
        self.loop_device.as_deref().expect("loop device attached")
    }

    /// `mkfs.ext4 -q -F` on the loop device (which discards the whole device first).
    #[track_caller]
    pub fn make_ext4(&self) {
        run_ok("mkfs.ext4", &["-q", "-F", self.device()], MKFS_TIMEOUT);
    }

    #[track_caller]
    pub fn mount(&mut self) {
        run_ok(
            "mount",
            &[self.device().as_ref(), self.mount_directory.as_os_str()],
            STEP_TIMEOUT,
        );
        self.mounted = true;
    }

    /// Fails the caller, with nbdfuse's log, if nbdfuse has exited.
    #[track_caller]
    pub fn assert_nbdfuse_running(&mut self) {
        if let Some(nbdfuse) = self.nbdfuse.as_mut() {
            nbdfuse.assert_running();
        }
    }

    /// Orderly teardown; asserts each step succeeds.
    #[track_caller]
    pub fn detach(mut self) {
        if self.mounted {
            run_ok("umount", &[self.mount_directory.as_os_str()], STEP_TIMEOUT);
            self.mounted = false;
        }
        if let Some(device) = self.loop_device.take() {
            run_ok("losetup", &["-d", device.as_str()], STEP_TIMEOUT);
        }
        if let Some(fuse_directory) = &self.fuse_directory {
            run_ok(
                "fusermount3",
                &["-u".as_ref(), fuse_directory.as_os_str()],
                STEP_TIMEOUT,
            );
        }
        if let Some(mut nbdfuse) = self.nbdfuse.take() {
            let status = nbdfuse.wait_for_exit(STEP_TIMEOUT);
            assert!(
                status.is_some(),
                "nbdfuse did not exit after fusermount3 -u\n{}",
                nbdfuse.log_text()
            );
        }
    }
}

impl Drop for MountedVolume {
    fn drop(&mut self) {
        // Only reached with something still attached when the caller failed half way: undo it
        // all, never blocking for long, and ignore errors (the failure is already reported).
        if self.mounted {
            run_during_cleanup(Command::new("umount").arg("-l").arg(&self.mount_directory));
        }
        if let Some(device) = self.loop_device.take() {
            run_during_cleanup(Command::new("losetup").args(["-d", device.as_str()]));
        }
        if let (Some(_), Some(fuse_directory)) = (&self.nbdfuse, &self.fuse_directory) {
            run_during_cleanup(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(fuse_directory),
            );
        }
        // BackgroundProcess::drop kills nbdfuse if it is still there.
        self.nbdfuse.take();
    }
}

/// Runs a cleanup command for at most 20 s, ignoring every failure. Unlike `run_command` it
/// never panics: it runs in `Drop`, often while a panic unwinds, where a second panic aborts.
fn run_during_cleanup(command: &mut Command) {
    let spawned = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(mut child) = spawned {
        if wait_with_timeout(&mut child, Duration::from_secs(20)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `sha256sum` of every file under `directory`, as sorted "hash  relative-path" lines.
pub fn checksums(directory: &Path) -> Vec<String> {
    let result = super::run_command(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum")
            .current_dir(directory),
        STEP_TIMEOUT,
    )
    .assert_success();
    result.stdout_text().lines().map(str::to_owned).collect()
}

/// Fails the test unless the tools and rights for a mounted volume are here: nbdfuse, a loop
/// device, ext4 tools, `/dev/fuse`, and root (losetup and mount need it; CI runs as root).
pub fn require_mount_tools() {
    super::require_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fusermount3",
        "sha256sum",
    ]);
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: nbdfuse needs FUSE"
    );
    // SAFETY: geteuid(2) only reads the process's credentials.
    let effective_user_id = unsafe { libc::geteuid() };
    assert_eq!(
        effective_user_id, 0,
        "a mounted volume needs a loop device and mount, which need root (run the suite as \
         root, as CI does)"
    );
}
