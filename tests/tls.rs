//! NBD over TLS against a real `raftblk server` with certificates made by `raftblk ctl certs`,
//! and clients nobody here wrote: nbdinfo (libnbd, `nbds://`), qemu-img and qemu-io
//! (`tls-creds-x509`). What a client that does not play along gets: a plaintext client on a
//! server that requires TLS is told so (`NBD_REP_ERR_TLS_REQD`) before it learns anything, a
//! certificate from another authority is refused, a client that stalls in its TLS handshake
//! or sends garbage after STARTTLS is cut off, an expired certificate is refused, a TLS client
//! on a plaintext server gets NBD_REP_ERR_UNSUP, and other clients are served meanwhile
//! (doc/proto.md, "TLS support").

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A certificate authority, a node certificate for 127.0.0.1, and client directories.
struct Certificates {
    root: tempfile::TempDir,
}

impl Certificates {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("raftblk-tls-")
            .tempdir()
            .expect("a directory for certificates");
        let certificates = Certificates { root };
        certificates.certs(&["init", certificates.path("ca").to_str().unwrap()]);
        certificates.issue("ca", "node", &["--node", "1", "--host", "127.0.0.1"]);
        certificates.issue("ca", "alice", &["--client", "alice"]);
        certificates
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn certs(&self, arguments: &[&str]) {
        let mut command = Command::new(server_program());
        command.args(["ctl", "certs"]).args(arguments);
        run_command(&mut command, Duration::from_secs(30)).assert_success();
    }

    fn issue(&self, authority: &str, out: &str, subject: &[&str]) {
        let (authority, out) = (self.path(authority), self.path(out));
        let mut arguments = vec![
            "issue",
            "--ca",
            authority.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        arguments.extend_from_slice(subject);
        self.certs(&arguments);
    }

    /// A client directory of another authority that trusts ours: it gets as far as presenting
    /// its certificate.
    fn stranger(&self) -> PathBuf {
        self.certs(&["init", self.path("other-ca").to_str().unwrap()]);
        self.issue("other-ca", "mallory", &["--client", "mallory"]);
        let mallory = self.path("mallory");
        std::fs::remove_file(mallory.join("ca-cert.pem")).expect("drop the foreign CA");
        std::fs::copy(
            self.path("ca").join("ca-cert.pem"),
            mallory.join("ca-cert.pem"),
        )
        .expect("trust ours");
        mallory
    }
}

fn tls_server(certificates: &Certificates, mode: &str, extra: &[(&str, &str)]) -> ServerProcess {
    let node = certificates.path("node");
    let mut environment = vec![
        ("RAFTBLK__TLS__MODE", mode),
        ("RAFTBLK__TLS__DIR", node.to_str().unwrap()),
    ];
    environment.extend_from_slice(extra);
    ServerProcess::start_with_environment(&environment)
}

fn nbds_uri(server: &ServerProcess, client: &Path) -> String {
    format!(
        "nbds://{}/{DEFAULT_EXPORT_NAME}?tls-certificates={}",
        server.nbd_address(),
        client.display()
    )
}

fn nbdinfo_size(uri: &str) -> CommandResult {
    run_command(
        Command::new("nbdinfo").args(["--size", uri]),
        Duration::from_secs(30),
    )
}

fn qemu_tls_arguments(server: &ServerProcess, client: &Path) -> Vec<String> {
    let address = server.nbd_address();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            client.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host={},port={},export={DEFAULT_EXPORT_NAME},tls-creds=tls0",
            address.ip(),
            address.port()
        ),
    ]
}

#[test]
fn real_clients_use_a_volume_over_tls_and_a_plaintext_client_learns_only_that_tls_is_required() {
    require_tools(&["nbdinfo", "qemu-img", "qemu-io"]);
    let certificates = Certificates::new();
    let mut server = tls_server(&certificates, "require", &[]);
    let alice = certificates.path("alice");

    let size = nbdinfo_size(&nbds_uri(&server, &alice)).assert_success();
    assert_eq!(
        size.stdout_text().trim(),
        DEFAULT_EXPORT_SIZE_BYTES.to_string()
    );

    let mut info = Command::new("qemu-img");
    info.arg("info").args(qemu_tls_arguments(&server, &alice));
    let info = run_command(&mut info, Duration::from_secs(30)).assert_success();
    assert!(info.stdout_text().contains("1 GiB"), "{}", info.describe());
    let mut io = Command::new("qemu-io");
    io.args(qemu_tls_arguments(&server, &alice)).args([
        "-c",
        "write -P 0x3c 1M 256k",
        "-c",
        "read -P 0x3c 1M 256k",
    ]);
    let io = run_command(&mut io, Duration::from_secs(60)).assert_success();
    let output = io.stdout_text() + &io.stderr_text();
    assert!(
        output.contains("read 262144/262144") && !output.contains("Pattern verification failed"),
        "{output}"
    );

    // A client that trusts another authority refuses this server (which does not verify
    // clients, so the refusal is the client's).
    certificates.certs(&["init", certificates.path("elsewhere").to_str().unwrap()]);
    let refused = nbdinfo_size(&nbds_uri(&server, &certificates.path("elsewhere")));
    assert!(!refused.status.success(), "{}", refused.describe());

    // A plaintext client: libnbd reports what the server said.
    let plain = nbdinfo_size(&server.uri(DEFAULT_EXPORT_NAME));
    assert!(!plain.status.success(), "{}", plain.describe());
    assert!(
        plain.stderr_text().contains("requires TLS"),
        "{}",
        plain.describe()
    );
    // Byte by byte: the list of exports and an existing export's details are refused alike.
    let mut raw = RawConnection::connect(server.nbd_address());
    raw.start_handshake();
    for (option, payload) in [
        (nbd::OPT_LIST, Vec::new()),
        (nbd::OPT_INFO, info_request(DEFAULT_EXPORT_NAME)),
        (nbd::OPT_GO, info_request("no-such-volume")),
    ] {
        raw.send_option(option, &payload).expect("send an option");
        let reply = raw.read_option_reply().expect("a reply");
        assert_eq!(reply.reply_type, nbd::REP_ERR_TLS_REQD, "{reply:?}");
    }
    server.assert_running("after the TLS clients");
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: the name, and no information requests.
fn info_request(name: &str) -> Vec<u8> {
    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload
}

#[test]
fn with_verified_clients_a_certificate_of_another_authority_is_refused_and_ours_served() {
    require_tools(&["nbdinfo"]);
    let certificates = Certificates::new();
    let mut server = tls_server(
        &certificates,
        "require",
        &[("RAFTBLK__TLS__VERIFY_CLIENTS", "true")],
    );
    let stranger = certificates.stranger();
    let refused = nbdinfo_size(&nbds_uri(&server, &stranger));
    assert!(!refused.status.success(), "{}", refused.describe());

    // No certificate at all: only the CA.
    let anonymous = certificates.path("anonymous");
    std::fs::create_dir_all(&anonymous).expect("a directory");
    std::fs::copy(
        certificates.path("ca").join("ca-cert.pem"),
        anonymous.join("ca-cert.pem"),
    )
    .expect("the CA");
    let refused = nbdinfo_size(&nbds_uri(&server, &anonymous));
    assert!(!refused.status.success(), "{}", refused.describe());

    let served = nbdinfo_size(&nbds_uri(&server, &certificates.path("alice"))).assert_success();
    assert_eq!(
        served.stdout_text().trim(),
        DEFAULT_EXPORT_SIZE_BYTES.to_string()
    );
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("TLS handshake failed") && line.contains("peer: 127.0.0.1:")),
        "the refusals are logged with the peer:\n{log}"
    );
    server.assert_running("after the refusals");
}

#[test]
fn a_client_stalled_in_its_tls_handshake_or_sending_garbage_is_cut_off_while_others_are_served() {
    require_tools(&["nbdinfo"]);
    let certificates = Certificates::new();
    let mut server = tls_server(
        &certificates,
        "on",
        &[("RAFTBLK__NBD__HANDSHAKE_TIMEOUT_MS", "2000")],
    );
    let mut stalled = RawConnection::connect(server.nbd_address());
    stalled.start_handshake();
    stalled
        .send_option(nbd::OPT_STARTTLS, &[])
        .expect("send STARTTLS");
    let reply = stalled.read_option_reply().expect("a reply");
    assert_eq!(reply.reply_type, nbd::REP_ACK, "{reply:?}");
    let started = Instant::now();

    let mut garbage = RawConnection::connect(server.nbd_address());
    garbage.start_handshake();
    garbage
        .send_option(nbd::OPT_STARTTLS, &[])
        .expect("send STARTTLS");
    assert_eq!(
        garbage.read_option_reply().expect("a reply").reply_type,
        nbd::REP_ACK
    );
    garbage
        .send(&[0x5a; 512])
        .expect("send garbage instead of a ClientHello");
    garbage
        .expect_closed(Duration::from_secs(10))
        .expect("the server closes a connection that sends garbage for TLS");

    // Meanwhile, both kinds of client are served.
    nbdinfo_size(&nbds_uri(&server, &certificates.path("alice"))).assert_success();
    nbdinfo_size(&server.uri(DEFAULT_EXPORT_NAME)).assert_success();

    stalled
        .expect_closed(Duration::from_secs(10))
        .expect("the stalled client is cut off at the handshake timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "cut off after {:?}, before the timeout",
        started.elapsed()
    );
    // The log line follows the close.
    wait_until("the timeout is logged", Duration::from_secs(10), || {
        server.log_text().contains("handshake timed out")
    });
    let log = server.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    server.assert_running("after the misbehaving clients");
}

/// Sends a peer hello from node `from` to node 1 and a heartbeat-shaped frame over TLS with
/// the node certificate in `directory` (which trusts the cluster's authority); what happens
/// next is the server's business.
fn claim_to_be_a_member(target: std::net::SocketAddr, directory: &Path, from: u64) {
    use raftblk::peer::encode_raft_message;
    use std::io::Write;
    let config = raftblk::tls::node_client_config(directory).expect("a client configuration");
    let name = rustls::pki_types::ServerName::try_from("node-1").expect("a name");
    let connection = rustls::ClientConnection::new(config, name).expect("a TLS client");
    let socket = std::net::TcpStream::connect(target).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    let mut stream = rustls::StreamOwned::new(connection, socket);
    let mut bytes = peer_hello(from, 1);
    let mut message = raft::prelude::Message::default();
    message.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    message.from = from;
    message.to = 1;
    message.term = 1_000_000;
    encode_raft_message(raftblk::DEFAULT_GROUP_ID, &message, &mut bytes);
    let _ = stream.write_all(&bytes).and_then(|()| stream.flush());
    let mut buffer = [0u8; 16];
    let _ = std::io::Read::read(&mut stream, &mut buffer);
}

#[test]
fn servers_with_mutual_tls_replicate_and_refuse_peers_that_cannot_prove_who_they_are() {
    use common::cluster::{run_certs, Cluster, ClusterOptions};
    require_tools(&["qemu-io"]);
    let mut cluster = Cluster::start(ClusterOptions {
        peer_tls: true,
        ..ClusterOptions::default()
    });
    let all = cluster.node_ids();
    let write = |cluster: &mut Cluster, pattern: &str| {
        let leader = cluster.leader();
        let uri = cluster.node(leader).uri(DEFAULT_EXPORT_NAME);
        let command = format!("write -P {pattern} 0 1M");
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", command.as_str(), uri.as_str()],
            Duration::from_secs(60),
        );
    };
    write(&mut cluster, "0x11");
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, Duration::from_secs(60));
    let target = cluster.node(1).peer_address;
    let workspace = cluster.workspace().to_path_buf();

    // Plaintext, as before TLS: the TLS handshake fails.
    {
        use std::io::Write;
        let bytes = peer_hello(2, 1);
        let mut plain = std::net::TcpStream::connect(target).expect("connect");
        let _ = plain.write_all(&bytes);
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        let _ = std::io::Read::read(&mut plain, &mut [0u8; 16]);
    }
    // A node certificate of another authority, for node 2.
    let foreign_ca = workspace.join("foreign-ca");
    let impostor = workspace.join("impostor");
    run_certs(&["init", foreign_ca.to_str().unwrap()]);
    run_certs(&[
        "issue",
        "--ca",
        foreign_ca.to_str().unwrap(),
        "--out",
        impostor.to_str().unwrap(),
        "--node",
        "2",
    ]);
    std::fs::copy(
        workspace.join("ca").join("ca-cert.pem"),
        impostor.join("ca-cert.pem"),
    )
    .expect("trust the cluster's authority");
    claim_to_be_a_member(target, &impostor, 2);
    // A certificate of the cluster's authority for node 4, claiming to be node 2.
    let node4 = workspace.join("node4-certificate");
    run_certs(&[
        "issue",
        "--ca",
        workspace.join("ca").to_str().unwrap(),
        "--out",
        node4.to_str().unwrap(),
        "--node",
        "4",
    ]);
    claim_to_be_a_member(target, &node4, 2);
    // A client certificate of the cluster's authority that names itself node-2 (an operator's,
    // a proxy's): not a node certificate, so not node 2.
    let client_named_node2 = workspace.join("client-named-node-2");
    rcgen_client(
        &workspace.join("ca"),
        &client_named_node2,
        "node-2",
        time::OffsetDateTime::now_utc() + time::Duration::days(1),
        ("server-cert.pem", "server-key.pem"),
    );
    claim_to_be_a_member(target, &client_named_node2, 2);

    common::wait_until("node 1 logs four refusals", Duration::from_secs(20), || {
        let log = cluster.node(1).log_text();
        log.matches("peer connection refused").count() >= 4
    });
    let log = cluster.node(1).log_text();
    assert!(
        log.contains("TLS handshake failed") && log.contains("certificate naming"),
        "{log}"
    );
    // None of them stepped a message: no term was raised to theirs, and the group serves on.
    for id in &all {
        let status = cluster.status(*id).expect("a status");
        assert!(
            status.term < 1_000_000,
            "node {id} is at term {}",
            status.term
        );
    }
    write(&mut cluster, "0x22");
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, Duration::from_secs(60));
    cluster.assert_all_alive("after the impostors");
}

/// The whole chain under TLS: servers that require NBD over TLS and talk to each other over
/// mutual TLS, and a proxy that reaches them through `NBD_OPT_STARTTLS` with a client
/// certificate (the servers verify clients). qemu-io writes and reads through the proxy's
/// local plaintext listener; the replicas agree; a leader kill is hidden from the client.
#[test]
fn a_proxy_serves_a_cluster_that_requires_tls_and_survives_a_leader_kill() {
    use common::cluster::{run_certs, Cluster, ClusterOptions, ProxyProcess};
    require_tools(&["qemu-io"]);
    let mut cluster = Cluster::start(ClusterOptions {
        peer_tls: true,
        settings: vec![
            ("tls".into(), "mode".into(), "\"require\"".into()),
            ("tls".into(), "verify_clients".into(), "true".into()),
        ],
        ..ClusterOptions::default()
    });
    let all = cluster.node_ids();
    let workspace = cluster.workspace().to_path_buf();
    let client_directory = workspace.join("proxy-tls");
    run_certs(&[
        "issue",
        "--ca",
        workspace.join("ca").to_str().unwrap(),
        "--out",
        client_directory.to_str().unwrap(),
        "--client",
        "tls-proxy",
    ]);
    let config = workspace.join("proxy-tls.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nupstream_tls_dir = {:?}\n",
            client_directory.display().to_string()
        ),
    )
    .expect("write the proxy config");
    let proxy = ProxyProcess::start(
        &cluster,
        "tls-proxy",
        &["--config", config.to_str().unwrap()],
    );
    let uri = proxy.uri(DEFAULT_EXPORT_NAME);
    let qemu_io = |commands: &[&str]| {
        let mut arguments = vec!["-f", "raw"];
        for command in commands {
            arguments.extend_from_slice(&["-c", command]);
        }
        arguments.push(uri.as_str());
        let result = run_ok("qemu-io", &arguments, Duration::from_secs(120));
        let output = result.stdout_text() + &result.stderr_text();
        assert!(
            !output.contains("failed") && !output.contains("error"),
            "{output}"
        );
    };
    qemu_io(&["write -P 0x61 0 2M", "read -P 0x61 0 2M"]);
    let leader = cluster.leader();
    cluster.kill_9(leader);
    qemu_io(&[
        "write -P 0x62 2M 2M",
        "read -P 0x61 0 2M",
        "read -P 0x62 2M 2M",
    ]);
    cluster.restart(leader);
    cluster.assert_replicas_identical(&all, DEFAULT_EXPORT_NAME, Duration::from_secs(60));
    for id in &all {
        assert!(
            !cluster
                .node(*id)
                .log_text()
                .contains("TLS handshake failed"),
            "the proxy's connections to node {id} all completed their TLS handshakes"
        );
    }
}

/// Writes into `out` a client certificate of the authority in `authority` that expired
/// yesterday, with our `ca-cert.pem` beside it.
fn expired_client(authority: &Path, out: &Path) {
    let now = time::OffsetDateTime::now_utc();
    rcgen_client(
        authority,
        out,
        "late",
        now - time::Duration::days(1),
        ("client-cert.pem", "client-key.pem"),
    );
}

/// A client certificate (client authentication only) named `name`, valid until `not_after`,
/// signed by the authority in `authority` without `raftblk ctl certs`' rules, written into
/// `out` under `files` with the authority's `ca-cert.pem`.
fn rcgen_client(
    authority: &Path,
    out: &Path,
    name: &str,
    not_after: time::OffsetDateTime,
    files: (&str, &str),
) {
    let read = |name: &str| std::fs::read_to_string(authority.join(name)).expect("read the CA");
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).expect("the CA key");
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&read("ca-cert.pem"))
        .expect("the CA certificate")
        .self_signed(&ca_key)
        .expect("the CA");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate().expect("a key");
    let certificate = params.signed_by(&key, &ca, &ca_key).expect("signed");
    std::fs::create_dir_all(out).expect("a directory");
    std::fs::write(out.join(files.0), certificate.pem()).expect("write");
    std::fs::write(out.join(files.1), key.serialize_pem()).expect("write");
    std::fs::copy(authority.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy");
}

/// An expired client certificate is refused by a server that verifies clients; a TLS client
/// on a server without TLS is told STARTTLS is not supported (and nbdinfo, asked for TLS,
/// stops rather than going on in plaintext); both servers serve the next good client.
#[test]
fn an_expired_client_certificate_and_a_tls_client_on_a_plaintext_server_are_refused() {
    require_tools(&["nbdinfo"]);
    let certificates = Certificates::new();
    let mut verifying = tls_server(
        &certificates,
        "require",
        &[("RAFTBLK__TLS__VERIFY_CLIENTS", "true")],
    );
    let late = certificates.path("late");
    expired_client(&certificates.path("ca"), &late);
    let refused = nbdinfo_size(&nbds_uri(&verifying, &late));
    assert!(!refused.status.success(), "{}", refused.describe());
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        let log = verifying.log_text();
        log.contains("TLS handshake failed") && log.contains("certificate expired")
    });
    nbdinfo_size(&nbds_uri(&verifying, &certificates.path("alice"))).assert_success();
    verifying.assert_running("after the expired certificate");

    let mut plain = ServerProcess::start();
    let uri = format!(
        "nbds://{}/{DEFAULT_EXPORT_NAME}?tls-certificates={}",
        plain.nbd_address(),
        certificates.path("alice").display()
    );
    let refused = nbdinfo_size(&uri);
    assert!(!refused.status.success(), "{}", refused.describe());
    let mut raw = RawConnection::connect(plain.nbd_address());
    raw.start_handshake();
    raw.send_option(nbd::OPT_STARTTLS, &[])
        .expect("send STARTTLS");
    assert_eq!(
        raw.read_option_reply().expect("a reply").reply_type,
        nbd::REP_ERR_UNSUP
    );
    nbdinfo_size(&plain.uri(DEFAULT_EXPORT_NAME)).assert_success();
    plain.assert_running("after the TLS client");
}
