//! The Ansible deployment (deploy/ansible) rendered for a three-node cluster and a proxy on
//! this machine, and proven to work: `site.yml` runs against a local inventory (per-node ports
//! and directories under a temporary directory, units written to a scratch directory instead
//! of /etc/systemd, no systemd calls), then every server and the proxy are started with the
//! exact `ExecStart` line of its rendered unit, `rolling_restart.yml` walks the members
//! through its `GET /health` gate, and a client writes through the proxy and reads back
//! (qemu-io, nbdinfo). `ansible-lint` must pass on the playbooks and roles.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::http_get;
use common::*;

const TOKEN: &str = "ansible-test-token";
const VOLUME_SIZE_BYTES: u64 = 64 * MIB;

fn ansible_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ansible")
}

fn id_output(flag: &str) -> String {
    let result = run_command(Command::new("id").arg(flag), Duration::from_secs(10));
    result.stdout_text().trim().to_string()
}

struct RenderedNode {
    id: u64,
    control: SocketAddr,
    root: PathBuf,
}

/// The inventory: every host local, each with its own ports and directories under `root`.
fn write_inventory(
    root: &Path,
    nodes: &[RenderedNode],
    proxy_listen: SocketAddr,
    proxy_metrics: SocketAddr,
) -> PathBuf {
    let mut servers = String::new();
    for node in nodes {
        let port = |offset: u16| node.control.port() + offset;
        servers.push_str(&format!(
            "        node{id}:\n\
             \x20         raftblk_node_id: {id}\n\
             \x20         raftblk_address: 127.0.0.1\n\
             \x20         raftblk_control_port: {control}\n\
             \x20         raftblk_nbd_port: {nbd}\n\
             \x20         raftblk_peer_port: {peer}\n\
             \x20         raftblk_data_dir: {root}/data\n\
             \x20         raftblk_config_dir: {root}/etc\n\
             \x20         raftblk_systemd_dir: {root}/systemd\n\
             \x20         raftblk_binary_path: {root}/bin/raftblk\n",
            id = node.id,
            control = node.control.port(),
            nbd = port(1),
            peer = port(2),
            root = node.root.display(),
        ));
    }
    let proxy_root = root.join("proxy1");
    let text = format!(
        "---\n\
         all:\n\
         \x20 vars:\n\
         \x20   ansible_connection: local\n\
         \x20   ansible_python_interpreter: /usr/bin/python3\n\
         \x20   raftblk_become: false\n\
         \x20   raftblk_manage_service: false\n\
         \x20   raftblk_create_user: false\n\
         \x20   raftblk_user: {user}\n\
         \x20   raftblk_group: {group}\n\
         \x20   raftblk_control_token: {TOKEN}\n\
         \x20   raftblk_binary_src: {binary}\n\
         \x20   raftblk_listen_address: 127.0.0.1\n\
         \x20   raftblk_default_volume_size_bytes: {VOLUME_SIZE_BYTES}\n\
         \x20   raftblk_health_delay_seconds: 1\n\
         \x20   raftblk_read_lease_ms: 500\n\
         \x20   raftblk_tls_ca_dir: {ca}\n\
         \x20 children:\n\
         \x20   raftblk_servers:\n\
         \x20     hosts:\n\
         {servers}\
         \x20   raftblk_proxies:\n\
         \x20     hosts:\n\
         \x20       proxy1:\n\
         \x20         raftblk_proxy_listen: {proxy_listen}\n\
         \x20         raftblk_proxy_metrics_listen: {proxy_metrics}\n\
         \x20         raftblk_proxy_client_id: ansible-test\n\
         \x20         raftblk_config_dir: {proxy_root}/etc\n\
         \x20         raftblk_systemd_dir: {proxy_root}/systemd\n\
         \x20         raftblk_binary_path: {proxy_root}/bin/raftblk\n",
        user = id_output("-un"),
        group = id_output("-gn"),
        binary = server_program().display(),
        proxy_root = proxy_root.display(),
        ca = root.join("ca").display(),
    );
    let path = root.join("inventory.yml");
    fs::write(&path, text).expect("write the inventory");
    path
}

fn ansible_playbook(root: &Path, inventory: &Path, playbook: &str) -> CommandResult {
    let temporary = root.join("ansible-tmp");
    fs::create_dir_all(&temporary).expect("ansible temp dir");
    run_command(
        Command::new("ansible-playbook")
            .current_dir(ansible_directory())
            .args(["-i", &inventory.display().to_string(), playbook])
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_LOCAL_TEMP", &temporary)
            .env("ANSIBLE_REMOTE_TEMP", &temporary),
        Duration::from_secs(300),
    )
}

/// The program and arguments of the `ExecStart=` line of a rendered unit.
fn exec_start(unit: &Path) -> Vec<String> {
    let text =
        fs::read_to_string(unit).unwrap_or_else(|error| panic!("read {}: {error}", unit.display()));
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{} has no ExecStart line:\n{text}", unit.display()));
    line.split_whitespace().map(str::to_string).collect()
}

fn start_unit(unit: &Path, log_path: &Path) -> BackgroundProcess {
    let arguments = exec_start(unit);
    let (program, rest) = arguments.split_first().expect("ExecStart has a program");
    BackgroundProcess::spawn(Command::new(program).args(rest), log_path)
}

fn healthy(address: SocketAddr) -> bool {
    http_get(address, "/health").is_ok_and(|answer| answer.status == 200)
}

#[test]
fn the_rendered_cluster_serves_a_client_through_the_proxy() {
    require_tools(&["ansible-playbook", "ansible-lint", "nbdinfo", "qemu-io"]);
    let workspace = tempfile::Builder::new()
        .prefix("raftblk-ansible-")
        .tempdir()
        .expect("temporary directory");
    let root = workspace.path();

    let lint = run_command(
        Command::new("ansible-lint")
            .current_dir(ansible_directory())
            .args([
                "--nocolor",
                "site.yml",
                "rolling_restart.yml",
                "member_replace.yml",
                "roles",
            ]),
        Duration::from_secs(300),
    );
    assert!(lint.status.success(), "ansible-lint: {}", lint.describe());

    // Ports: control, nbd = control + 1, peer = control + 2, all three checked free.
    let nodes: Vec<RenderedNode> = (1..=3)
        .map(|id| {
            let control = loop {
                let port = pick_free_port();
                let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
                if port < u16::MAX - 2 && free(port + 1) && free(port + 2) {
                    break port;
                }
            };
            RenderedNode {
                id,
                control: SocketAddr::from(([127, 0, 0, 1], control)),
                root: root.join(format!("node{id}")),
            }
        })
        .collect();
    let proxy_listen = SocketAddr::from(([127, 0, 0, 1], pick_free_port()));
    let proxy_metrics = SocketAddr::from(([127, 0, 0, 1], pick_free_port()));
    let inventory = write_inventory(root, &nodes, proxy_listen, proxy_metrics);
    // The authority the operator keeps on the controller; the playbook issues the rest.
    run_ok(
        &server_program().display().to_string(),
        &[
            "ctl",
            "certs",
            "init",
            &root.join("ca").display().to_string(),
        ],
        Duration::from_secs(30),
    );

    ansible_playbook(root, &inventory, "site.yml").assert_success();
    let mut servers = Vec::new();
    for node in &nodes {
        let unit = node.root.join("systemd/raftblk-server.service");
        let unit_text = fs::read_to_string(&unit).expect("rendered unit");
        assert!(unit_text.contains("Restart=on-failure"), "{unit_text}");
        let config = fs::read_to_string(node.root.join("etc/server.toml")).expect("config");
        assert!(config.contains(TOKEN), "the token is in the server config");
        assert!(
            config.contains("read_lease_ms = 500"),
            "the lease setting is in the server config: {config}"
        );
        assert!(
            config.contains("mode = \"require\"") && config.contains("peers = true"),
            "TLS is on in the server config: {config}"
        );
        let key = node.root.join("etc/tls/server-key.pem");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(&key).expect("the installed key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o640, "{}", key.display());
        servers.push(start_unit(&unit, &node.root.join("server.log")));
    }
    for (node, server) in nodes.iter().zip(servers.iter_mut()) {
        wait_until(
            &format!("node {} healthy", node.id),
            Duration::from_secs(60),
            || {
                server.assert_running();
                healthy(node.control)
            },
        );
    }

    // The rolling restart's health gate, run against the live cluster (no systemd here, so
    // the restart task itself is skipped).
    let rolling = ansible_playbook(root, &inventory, "rolling_restart.yml").assert_success();
    assert!(
        rolling.stdout_text().contains("Wait for GET /health"),
        "{}",
        rolling.describe()
    );

    let proxy_root = root.join("proxy1");
    let mut proxy = start_unit(
        &proxy_root.join("systemd/raftblk-proxy.service"),
        &proxy_root.join("proxy.log"),
    );
    wait_for_listener(proxy_listen, Duration::from_secs(30));
    proxy.assert_running();
    let uri = format!("nbd://{proxy_listen}/disk0");
    let size = run_ok(
        "nbdinfo",
        &["--size", uri.as_str()],
        Duration::from_secs(60),
    );
    assert_eq!(
        size.stdout_text().trim(),
        VOLUME_SIZE_BYTES.to_string(),
        "{}",
        proxy.log_text()
    );
    for (command, what) in [
        ("write -P 0x3c 1M 256k", "write through the proxy"),
        ("read -P 0x3c 1M 256k", "read back through the proxy"),
    ] {
        let result = run_ok(
            "qemu-io",
            &["-f", "raw", "-c", command, uri.as_str()],
            Duration::from_secs(60),
        );
        let output = result.stdout_text() + &result.stderr_text();
        assert!(
            !output.contains("failed") && !output.contains("error"),
            "{what}: {output}\n{}",
            proxy.log_text()
        );
    }
    let metrics = ureq::get(&format!("http://{proxy_metrics}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .expect("proxy metrics")
        .into_string()
        .expect("metrics text");
    assert!(
        metrics
            .contains("raftblk_volume_requests_total{volume=\"disk0\",op=\"write\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("raftblk_proxy_cache_lookups_total"));

    proxy.stop(Duration::from_secs(20));
    for server in servers.iter_mut() {
        server.stop(Duration::from_secs(30));
    }
}
