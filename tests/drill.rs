//! The crash-restart drill in CI: `raftblk dev` (built with `--features failpoints`, so the
//! failpoint endpoints exist) in a temporary directory on free ports, and `raftblk ctl drill`
//! against it for `RAFTBLK_DRILL_SECONDS` (180 by default, as CI runs it; at least 30 so that
//! servers get killed) killing a random server every 10 s and crashing one actor of each kind.
//! A second drill, half as long, works a hot set of 48 blocks (rewritten and read back
//! constantly, so reads overlap every storage replay and leader change) while storage and Raft
//! actors crash and servers are killed. Each asserts the drill passes with no I/O error,
//! nothing lost, stale or corrupt, servers killed and every injected kind restarted. The report
//! is printed; the longest stall is a goal (under 1.5 s with default timeouts), not asserted.
//! The drills take turns: two dev clusters at once would starve each other on two cores.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{run_command, server_program, wait_until, BackgroundProcess};

const ACTOR_KINDS: [&str; 6] = [
    "nbd_session",
    "raft",
    "storage",
    "listener",
    "peer",
    "cache",
];

/// A port base whose dev layout (base+1, base+5, base+10N+{0,1,2} for N = 1..3) is free,
/// below the ephemeral port range so outgoing connections do not take them meanwhile.
fn free_port_base() -> u16 {
    let offsets = [1u16, 5, 10, 11, 12, 20, 21, 22, 30, 31, 32];
    for attempt in 0..200u32 {
        let base = 20_000 + ((std::process::id() + attempt * 7919) % 250) as u16 * 50;
        let free = offsets
            .iter()
            .all(|offset| TcpListener::bind(("127.0.0.1", base + offset)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free port range for raftblk dev found");
}

fn drill_seconds() -> u64 {
    std::env::var("RAFTBLK_DRILL_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(180)
        .max(30)
}

fn one_drill_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[test]
fn drill_on_the_dev_cluster_loses_nothing() {
    let _turn = one_drill_at_a_time();
    drill_on_dev(drill_seconds(), &["--inject", "all"], &ACTOR_KINDS);
}

#[test]
fn hot_set_drill_with_storage_and_raft_crashes_loses_nothing() {
    let _turn = one_drill_at_a_time();
    drill_on_dev(
        (drill_seconds() / 2).max(30),
        &["--blocks", "48", "--inject", "storage,raft"],
        &["storage", "raft"],
    );
}

/// Runs the drill for `seconds` with `arguments` against a fresh `raftblk dev`, killing a
/// server every 10 s, and asserts it passed with a restart of each of `kinds` observed.
fn drill_on_dev(seconds: u64, arguments: &[&str], kinds: &[&str]) {
    let workspace = tempfile::Builder::new()
        .prefix("raftblk-drill-")
        .tempdir()
        .expect("create a temporary directory");
    let base = free_port_base();
    let listen = format!("127.0.0.1:{}", base + 5);
    let mut dev = BackgroundProcess::spawn(
        Command::new(server_program())
            .arg("dev")
            .arg("--data-dir")
            .arg(workspace.path().join("cluster"))
            .arg("--listen")
            .arg(&listen)
            .arg("--port-base")
            .arg(base.to_string())
            .arg("--size")
            .arg("256M"),
        &workspace.path().join("dev.log"),
    );
    wait_until("raftblk dev serves", Duration::from_secs(120), || {
        std::fs::read_to_string(workspace.path().join("dev.log"))
            .unwrap_or_default()
            .contains("serving nbd://")
    });
    let controls: Vec<String> = (1..=3)
        .map(|node| format!("127.0.0.1:{}", base + 10 * node + 1))
        .collect();
    // Arming a failpoint is a change: it needs the token the dev cluster generated.
    let dev_token = std::fs::read_to_string(workspace.path().join("cluster/control.token"))
        .expect("raftblk dev writes its control token");
    let drill = run_command(
        Command::new(server_program())
            .args(["ctl", "drill", "--nbd", &listen, "--control"])
            .arg(controls.join(","))
            .arg("--proxy-control")
            .arg(format!("127.0.0.1:{}", base + 1))
            .arg("--duration")
            .arg(format!("{seconds}s"))
            .args(["--kill-interval", "10s", "--json"])
            .args(arguments)
            .env("RAFTBLK_TOKEN", dev_token.trim()),
        Duration::from_secs(seconds + 180),
    );
    println!("{}", drill.describe());
    let stdout = drill.stdout_text();
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("the drill printed no JSON report:\n{}", drill.describe()));
    let dev_log = std::fs::read_to_string(workspace.path().join("dev.log")).unwrap_or_default();
    let context = format!("{}\n--- raftblk dev ---\n{dev_log}", drill.describe());
    assert_eq!(report["io_errors"], 0, "{context}");
    assert_eq!(report["connection_losses"], 0, "{context}");
    assert_eq!(report["writes_lost"], 0, "{context}");
    assert_eq!(report["blocks_corrupt"], 0, "{context}");
    assert!(report["server_kills"].as_u64() > Some(0), "{context}");
    assert!(report["reads_verified"].as_u64() > Some(0), "{context}");
    for kind in kinds {
        assert!(
            report["restarts_observed"][kind].as_u64() >= Some(1),
            "no {kind} restart observed\n{context}"
        );
    }
    assert_eq!(
        report["injected_not_restarted"],
        serde_json::json!([]),
        "{context}"
    );
    assert!(
        drill.status.success(),
        "the drill exited non-zero\n{context}"
    );
    println!(
        "longest stall: {} ms (goal: under 1500 ms)",
        report["longest_stall_ms"]
    );
    dev.stop(Duration::from_secs(60));
}
