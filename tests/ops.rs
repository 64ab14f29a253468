//! Operations tests against real `raftblk server` and `raftblk proxy` processes: `GET /health`
//! follows the quorum, `GET /metrics` is Prometheus text whose counters move with the I/O,
//! changes need the control token, online resize is seen by new NBD connections through a
//! server and through the proxy (`nbdinfo --size`), and `raftblk ctl status` reports the
//! cluster and exits non-zero without a quorum; a volume digest tells a missing volume from a
//! corrupt replica.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;

const TOKEN: &str = "ops-test-token";

/// How long a health change may take: an election timeout is 10 ticks of 50 ms in the
/// harness, a leader needs one to step down and a follower one more to notice.
const HEALTH_CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

fn cluster_with_token() -> Cluster {
    Cluster::start(ClusterOptions::default().set("control", "token", &format!("{TOKEN:?}")))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format strictly enough to catch malformed output: every
/// sample line is `name{label="value",...} number`, every sample's family has a `# TYPE`
/// line before it, and label values are properly quoted.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let problem = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
        let fail = |why: &str| Err(problem(why));
        if line.is_empty() || line.starts_with("# HELP ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return fail("bad TYPE line");
            };
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return fail("unknown metric type");
            }
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            return fail("unknown comment");
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| problem("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return fail("bad metric name");
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after_brace) = rest.strip_prefix('{') {
            let mut cursor = after_brace;
            loop {
                if let Some(after) = cursor.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let Some(equals) = cursor.find("=\"") else {
                    return fail("bad label");
                };
                let key = cursor[..equals].trim_start_matches(',').to_string();
                let mut value = String::new();
                let mut chars = cursor[equals + 2..].char_indices();
                let mut end = None;
                while let Some((index, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, escaped)) => value.push(escaped),
                            None => return fail("dangling escape"),
                        },
                        '"' => {
                            end = Some(index);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                let Some(end) = end else {
                    return fail("unterminated label value");
                };
                labels.insert(key, value);
                cursor = &cursor[equals + 2 + end + 1..];
            }
        }
        let value_text = rest.trim();
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            text => text.parse::<f64>().map_err(|_| problem("bad value"))?,
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| typed.get(*base).is_some_and(|kind| kind == "histogram"))
            })
            .unwrap_or(name);
        if !typed.contains_key(family) {
            return fail("sample without a TYPE line before it");
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn scrape(address: SocketAddr) -> Vec<Sample> {
    let response = ureq::get(&format!("http://{address}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .unwrap_or_else(|error| panic!("GET /metrics on {address}: {error}"));
    let content_type = response.header("Content-Type").unwrap_or("").to_string();
    assert!(
        content_type.starts_with("text/plain"),
        "content type {content_type}"
    );
    let text = response.into_string().expect("metrics body");
    parse_prometheus(&text).unwrap_or_else(|error| panic!("{error}\n--- metrics ---\n{text}"))
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(value))
        })
        .map(|sample| sample.value)
}

fn health_status(address: SocketAddr) -> Option<(u16, serde_json::Value)> {
    http_get(address, "/health")
        .ok()
        .map(|answer| (answer.status, answer.body))
}

fn ctl_status(cluster: &Cluster) -> CommandResult {
    run_command(
        Command::new(server_program()).args([
            "ctl",
            "status",
            "--control",
            &cluster.control_addresses_list(),
        ]),
        Duration::from_secs(30),
    )
}

#[test]
fn health_follows_the_quorum_and_metrics_count_the_io() {
    let mut cluster = cluster_with_token();
    let leader = cluster.leader();
    for id in cluster.node_ids() {
        let address = cluster.node(id).control_address;
        wait_until(
            &format!("node {id} reports healthy"),
            HEALTH_CHANGE_TIMEOUT,
            || health_status(address).is_some_and(|(status, _)| status == 200),
        );
    }
    let report = ctl_status(&cluster).assert_success();
    let table = report.stdout_text();
    assert!(table.contains("HEALTH_OK"), "{table}");
    assert!(
        table.contains(&format!("leader:  node {leader}")),
        "{table}"
    );

    // Metrics on the leader: Raft series, then writes move the volume counters.
    let leader_control = cluster.node(leader).control_address;
    let before = scrape(leader_control);
    assert_eq!(
        value_of(&before, "raftblk_raft_role", &[("role", "Leader")]),
        Some(1.0)
    );
    assert!(value_of(&before, "raftblk_raft_term", &[]).is_some_and(|term| term >= 1.0));
    assert_eq!(value_of(&before, "raftblk_raft_healthy", &[]), Some(1.0));
    assert_eq!(
        value_of(&before, "raftblk_volume_size_bytes", &[("volume", "disk0")]),
        Some((64 * MIB) as f64)
    );
    for follower in cluster.others(leader) {
        let lag = value_of(
            &before,
            "raftblk_raft_peer_lag_entries",
            &[("peer", &follower.to_string())],
        );
        assert!(lag.is_some(), "no lag series for follower {follower}");
    }
    let write_ok = [("volume", "disk0"), ("op", "write"), ("result", "ok")];
    let writes_before =
        value_of(&before, "raftblk_volume_requests_total", &write_ok).unwrap_or(0.0);
    let mut client = cluster.nbd_client(leader, DEFAULT_EXPORT_NAME);
    for block in 0..8u64 {
        client.write_ok(block * 4096, &[block as u8 + 1; 4096]);
    }
    assert_eq!(client.read_ok(4096, 4096), vec![2u8; 4096]);
    drop(client);
    let after = scrape(leader_control);
    let writes_after = value_of(&after, "raftblk_volume_requests_total", &write_ok)
        .expect("a write counter for disk0");
    assert_eq!(writes_after - writes_before, 8.0, "eight writes were made");
    let bytes_written = value_of(
        &after,
        "raftblk_volume_bytes_total",
        &[("volume", "disk0"), ("op", "write")],
    )
    .expect("a written-bytes counter");
    assert!(bytes_written >= (8 * 4096) as f64);
    let latency_count = value_of(
        &after,
        "raftblk_volume_request_duration_seconds_count",
        &[("volume", "disk0"), ("op", "write")],
    )
    .expect("a write latency histogram");
    let latency_infinite_bucket = value_of(
        &after,
        "raftblk_volume_request_duration_seconds_bucket",
        &[("volume", "disk0"), ("op", "write"), ("le", "+Inf")],
    );
    assert_eq!(Some(latency_count), latency_infinite_bucket);
    assert!(latency_count >= 8.0);
    assert_eq!(
        value_of(&after, "raftblk_actor_restarts_total", &[("actor", "raft")]),
        Some(0.0)
    );
    let applied = value_of(&after, "raftblk_raft_applied_index", &[]).expect("applied index");
    let applied_before = value_of(&before, "raftblk_raft_applied_index", &[]).unwrap_or(0.0);
    assert!(applied >= applied_before + 8.0);

    // Two of three gone: the survivor has no quorum and says so.
    let followers = cluster.others(leader);
    for follower in &followers {
        cluster.kill_9(*follower);
    }
    let mut reason = String::new();
    wait_until(
        "the remaining node reports 503",
        HEALTH_CHANGE_TIMEOUT,
        || match health_status(leader_control) {
            Some((503, body)) => {
                reason = body["reason"].as_str().unwrap_or("").to_string();
                true
            }
            _ => false,
        },
    );
    assert!(!reason.is_empty(), "a 503 names its reason");
    let report = ctl_status(&cluster);
    assert!(
        !report.status.success(),
        "ctl status must fail without quorum\n{}",
        report.describe()
    );
    assert!(
        report.stderr_text().contains("no quorum"),
        "{}",
        report.describe()
    );
    assert!(report.stdout_text().contains("HEALTH_ERR"));
    let metrics = scrape(leader_control);
    assert_eq!(value_of(&metrics, "raftblk_raft_healthy", &[]), Some(0.0));

    // Back again: healthy everywhere.
    for follower in &followers {
        cluster.restart(*follower);
    }
    for id in cluster.node_ids() {
        let address = cluster.node(id).control_address;
        wait_until(
            &format!("node {id} healthy again"),
            HEALTH_CHANGE_TIMEOUT,
            || health_status(address).is_some_and(|(status, _)| status == 200),
        );
    }
    assert!(ctl_status(&cluster).status.success());
}

fn nbdinfo_size(uri: &str) -> Option<u64> {
    let result = run_command(
        Command::new("nbdinfo").args(["--size", uri]),
        Duration::from_secs(30),
    );
    if !result.status.success() {
        return None;
    }
    result.stdout_text().trim().parse().ok()
}

fn cli(cluster: &Cluster, args: &[&str], token: Option<&str>) -> CommandResult {
    let mut command = Command::new(server_program());
    command
        .args(args)
        .args(["--control", &cluster.control_addresses_list()])
        .env_remove("RAFTBLK_TOKEN");
    if let Some(token) = token {
        command.env("RAFTBLK_TOKEN", token);
    }
    run_command(&mut command, Duration::from_secs(60))
}

#[test]
fn changes_need_the_token_and_resize_reaches_new_connections() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let mut cluster = cluster_with_token();
    let leader = cluster.leader();
    let control = cluster.node(leader).control_address;
    let create = serde_json::json!({"name": "grow", "size_bytes": 8 * MIB});

    // The token: none → 401, a wrong one → 403, the right one → 201. Reads stay open.
    let missing = http_post(control, "/v1/volumes", &create).expect("reachable");
    assert_eq!(missing.status, 401, "{:?}", missing.body);
    let wrong = ureq::post(&format!("http://{control}/v1/volumes"))
        .set("Authorization", "Bearer not-the-token")
        .send_json(create.clone());
    assert!(
        matches!(wrong, Err(ureq::Error::Status(403, _))),
        "wrong token: {wrong:?}"
    );
    assert_eq!(http_get(control, "/v1/status").expect("status").status, 200);
    let refused = cli(
        &cluster,
        &["volume", "create", "grow", "--size", "8M"],
        None,
    );
    assert!(!refused.status.success());
    assert!(
        refused.stderr_text().contains("Bearer"),
        "{}",
        refused.describe()
    );
    cli(
        &cluster,
        &["volume", "create", "grow", "--size", "8M"],
        Some(TOKEN),
    )
    .assert_success();
    cluster.wait_for_volume_everywhere("grow", Duration::from_secs(20));

    // Through a server and through the proxy (which attaches with the token from its config).
    let proxy_config = cluster.workspace().join("proxy-token.toml");
    std::fs::write(&proxy_config, format!("[control]\ntoken = {TOKEN:?}\n")).expect("config");
    let proxy_config_text = proxy_config.display().to_string();
    let proxy = ProxyProcess::start(&cluster, "ops-proxy", &["--config", &proxy_config_text]);
    let server_uri = cluster.node(leader).uri("grow");
    assert_eq!(nbdinfo_size(&server_uri), Some(8 * MIB));
    assert_eq!(
        nbdinfo_size(&proxy.uri("grow")),
        Some(8 * MIB),
        "{}",
        proxy.log_text()
    );

    cli(
        &cluster,
        &["ctl", "volumes", "resize", "grow", "--size", "16M"],
        Some(TOKEN),
    )
    .assert_success();
    assert_eq!(nbdinfo_size(&server_uri), Some(16 * MIB));
    // The proxy learns sizes from its status poll (1 s).
    wait_until(
        "the proxy serves the new size",
        Duration::from_secs(15),
        || nbdinfo_size(&proxy.uri("grow")) == Some(16 * MIB),
    );
    for id in cluster.node_ids() {
        assert_eq!(nbdinfo_size(&cluster.node(id).uri("grow")), Some(16 * MIB));
    }
    // The grown range works through the proxy (its upstream connection is older than the
    // resize) and the data is on the servers.
    let proxy_uri = proxy.uri("grow");
    for (arguments, what) in [
        (
            vec![
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 12M 64k",
                proxy_uri.as_str(),
            ],
            "write through the proxy",
        ),
        (
            vec![
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0x5a 12M 64k",
                server_uri.as_str(),
            ],
            "read back from a server",
        ),
    ] {
        let result = run_ok("qemu-io", &arguments, Duration::from_secs(60));
        let output = result.stdout_text() + &result.stderr_text();
        assert!(
            !output.contains("failed") && !output.contains("error"),
            "{what}: {output}"
        );
    }

    let shrink = cli(
        &cluster,
        &["volume", "resize", "grow", "--size", "4M"],
        Some(TOKEN),
    );
    assert!(!shrink.status.success());
    assert!(
        shrink.stderr_text().contains("shrinking"),
        "{}",
        shrink.describe()
    );
    assert_eq!(nbdinfo_size(&server_uri), Some(16 * MIB));
    let listing = cli(&cluster, &["volume", "list", "--json"], None).assert_success();
    let volumes = listing.stdout_json();
    let grow = volumes
        .as_array()
        .and_then(|list| list.iter().find(|volume| volume["name"] == "grow"))
        .expect("grow is listed");
    assert_eq!(grow["size_bytes"].as_u64(), Some(16 * MIB));
}

/// `GET /v1/volumes/{name}/digest` tells its failures apart: a volume this node does not have
/// is 404, and a replica whose image no longer matches its recorded checksums is a 500 that
/// names the checksum mismatch (an operator comparing replicas must not read "no such volume"
/// for a corrupt one).
#[test]
fn a_digest_tells_a_missing_volume_from_a_corrupt_replica() {
    require_tools(&["qemu-io"]);
    let mut server = ServerProcess::start();
    let uri = server.uri(DEFAULT_EXPORT_NAME);
    let written = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 64k", uri.as_str()],
        Duration::from_secs(60),
    );
    assert!(
        !written.stdout_text().contains("failed"),
        "{}",
        written.describe()
    );
    let control = server.control_address();
    let missing =
        http_get(control, "/v1/volumes/no-such-volume/digest").expect("the server answers");
    assert_eq!(missing.status, 404, "{:?}", missing.body);
    let healthy = http_get(
        control,
        &format!("/v1/volumes/{DEFAULT_EXPORT_NAME}/digest"),
    )
    .expect("the server answers");
    assert_eq!(healthy.status, 200, "{:?}", healthy.body);

    // Behind the server's back: the first block of the image changes.
    let images = server.data_directory().join("images");
    let image = std::fs::read_dir(&images)
        .expect("the images directory")
        .map(|entry| entry.expect("an image").path())
        .find(|path| path.extension().is_some_and(|extension| extension == "img"))
        .expect("an image file");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open the image");
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xa5; 4096], 0).expect("corrupt a block");
    drop(file);

    let corrupt = http_get(
        control,
        &format!("/v1/volumes/{DEFAULT_EXPORT_NAME}/digest"),
    )
    .expect("the server answers");
    assert_eq!(corrupt.status, 500, "{:?}", corrupt.body);
    let error = corrupt.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("checksum mismatch"), "{:?}", corrupt.body);
    server.assert_running("after the digests");
}
