//! `raftblk dev`: the embedded default. Starts a three-server cluster and a proxy on loopback,
//! each its own OS process (so a drill can kill any of them), with data under one directory,
//! and serves `nbd://127.0.0.1:10809/disk0` through the proxy. It acts as a small service
//! manager: a child that exits unexpectedly is started again after a short backoff, and
//! Ctrl-C (or SIGTERM) stops every child cleanly. Running it again reuses the data.
//!
//! Layout under the data directory: `node<N>/` (a server's data, `server.toml` it was started
//! with, `server.log`), `proxy/` (`proxy.toml`, `proxy.log`), and `control.token`: the control
//! API token, generated on the first run (random, mode 0600) and written into every server's
//! and the proxy's configuration. `raftblk ctl`/`raftblk volume` take it with
//! `--token "$(cat <data_dir>/control.token)"` or `RAFTBLK_TOKEN`. `tls/`: certificates made on
//! the first run (`ca/`, `nodeN/`, `client/`): the servers require NBD over TLS with client
//! certificates and run mutual TLS between them; the proxy reaches them with `client/`, and
//! its own listener on 127.0.0.1 stays plaintext for the local clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::MemberConfig;
use crate::control::ControlClient;
use crate::server::shutdown_signal;

/// Servers in the development cluster.
pub const DEV_SERVERS: u64 = 3;

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    /// The proxy's NBD address, the one clients use.
    pub listen: String,
    /// Server N uses ports base + 10 * N + {0: nbd, 1: control, 2: peer}.
    pub port_base: u16,
    pub volume_size_bytes: u64,
    pub log_level: String,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            data_dir: PathBuf::from("./raftblk-data"),
            listen: "127.0.0.1:10809".to_string(),
            port_base: 10810,
            volume_size_bytes: 1 << 30,
            log_level: "info".to_string(),
        }
    }
}

fn members(options: &DevOptions) -> Vec<MemberConfig> {
    (1..=DEV_SERVERS)
        .map(|id| {
            let base = options.port_base + 10 * id as u16;
            MemberConfig {
                id,
                nbd: format!("127.0.0.1:{base}"),
                control: format!("127.0.0.1:{}", base + 1),
                peer: format!("127.0.0.1:{}", base + 2),
            }
        })
        .collect()
}

/// The dev cluster's control token: read from `<data_dir>/control.token`, or made from 16
/// random bytes (hex) and written there, readable by the owner only.
fn dev_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("control.token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut source| source.read_exact(&mut random))
        .context("reading /dev/urandom for the control token")?;
    let token: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// The dev cluster's certificates under `<data_dir>/tls`, made once and kept: an authority
/// (`ca/`), one node directory per server (`nodeN/`, for 127.0.0.1 and localhost) and a client
/// directory (`client/`, the proxy's, also usable as `tls-certificates=` by any NBD client).
fn dev_certificates(data_dir: &Path, members: &[MemberConfig]) -> anyhow::Result<PathBuf> {
    let root = data_dir.join("tls");
    let authority = root.join("ca");
    if !authority.join(crate::tls::CA_KEY).exists() {
        crate::tls::init_authority(&authority, "raftblk dev CA")?;
    }
    for member in members {
        let directory = root.join(format!("node{}", member.id));
        if !directory.join(crate::tls::SERVER_CERT).exists() {
            crate::tls::issue(
                &authority,
                &directory,
                &crate::tls::Subject::Node {
                    id: member.id,
                    hosts: vec!["127.0.0.1".into(), "localhost".into()],
                },
            )?;
        }
    }
    let client = root.join("client");
    if !client.join(crate::tls::CLIENT_CERT).exists() {
        crate::tls::issue(
            &authority,
            &client,
            &crate::tls::Subject::Client {
                name: "raftblk-dev".into(),
            },
        )?;
    }
    Ok(root)
}

fn server_config(
    options: &DevOptions,
    member: &MemberConfig,
    members: &[MemberConfig],
    token: &str,
    tls_root: &Path,
) -> String {
    let data_dir = options.data_dir.join(format!("node{}", member.id));
    let mut text = format!(
        "[node]\nid = {}\ndata_dir = {:?}\n\n[nbd]\nlisten = {:?}\n\n[control]\nlisten = {:?}\n\
         token = {:?}\n\n[peer]\nlisten = {:?}\n\n[default_volume]\ncreate = true\nname = \"disk0\"\n\
         size_bytes = {}\n\n[log]\nlevel = {:?}\n\n[tls]\nmode = \"require\"\ndir = {:?}\n\
         verify_clients = true\npeers = true\n\n[cluster]\nmembers = [\n",
        member.id,
        data_dir.join("data").display().to_string(),
        member.nbd,
        member.control,
        token,
        member.peer,
        options.volume_size_bytes,
        options.log_level,
        tls_root
            .join(format!("node{}", member.id))
            .display()
            .to_string(),
    );
    for other in members {
        text.push_str(&format!(
            "  {{ id = {}, peer = {:?}, nbd = {:?}, control = {:?} }},\n",
            other.id, other.peer, other.nbd, other.control
        ));
    }
    text.push_str("]\n");
    text
}

/// One supervised child process.
struct ChildProcess {
    name: String,
    arguments: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
    restarts: u64,
    started_at: Instant,
}

impl ChildProcess {
    fn spawn(&mut self, executable: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let mut command = Command::new(executable);
        // If `raftblk dev` itself dies, its children must not outlive it holding the ports.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .args(&self.arguments)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        self.started_at = Instant::now();
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }
}

fn terminate(child: &Child) {
    // SIGTERM asks for a clean shutdown (final checkpoint).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Waits up to `timeout` for `child` to exit.
async fn wait_with_timeout(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn wait_for_default_volume(members: &[MemberConfig], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for member in members {
            let control = member.control.clone();
            let found = tokio::task::spawn_blocking(move || {
                ControlClient::new(&control)
                    .list_volumes()
                    .map(|volumes| volumes.iter().any(|volume| volume.name == "disk0"))
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if found {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn print_cluster(children: &[ChildProcess], members: &[MemberConfig], listen: &str) {
    println!("{:<8} {:>8} {:<10} ADDRESSES", "PROCESS", "PID", "ROLE");
    for (child, member) in children.iter().zip(members) {
        let control = member.control.clone();
        let role = tokio::task::spawn_blocking(move || {
            ControlClient::new(&control)
                .status()
                .ok()
                .and_then(|status| status["raft"]["role"].as_str().map(str::to_string))
                .unwrap_or_else(|| "unreachable".to_string())
        })
        .await
        .unwrap_or_default();
        println!(
            "{:<8} {:>8} {:<10} nbd={} control={} peer={}",
            child.name,
            child.pid().map(|pid| pid.to_string()).unwrap_or_default(),
            role,
            member.nbd,
            member.control,
            member.peer
        );
    }
    if let Some(proxy) = children.get(members.len()) {
        println!(
            "{:<8} {:>8} {:<10} nbd={listen}",
            proxy.name,
            proxy.pid().map(|pid| pid.to_string()).unwrap_or_default(),
            "proxy"
        );
    }
    println!("serving nbd://{listen}/disk0 (Ctrl-C stops the cluster)");
}

/// Runs the development cluster until Ctrl-C or SIGTERM.
pub async fn run_dev(options: DevOptions) -> anyhow::Result<()> {
    let executable = std::env::current_exe().context("locating the raftblk executable")?;
    let members = members(&options);
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let token = dev_token(&options.data_dir)?;
    let tls_root = dev_certificates(&options.data_dir, &members)?;
    let mut children = Vec::new();
    for member in &members {
        let node_dir = options.data_dir.join(format!("node{}", member.id));
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        let config_path = node_dir.join("server.toml");
        std::fs::write(
            &config_path,
            server_config(&options, member, &members, &token, &tls_root),
        )
        .with_context(|| format!("writing {}", config_path.display()))?;
        children.push(ChildProcess {
            name: format!("server{}", member.id),
            arguments: vec![
                "server".into(),
                "--config".into(),
                config_path.display().to_string(),
            ],
            log_path: node_dir.join("server.log"),
            child: None,
            restarts: 0,
            started_at: Instant::now(),
        });
    }
    let proxy_dir = options.data_dir.join("proxy");
    std::fs::create_dir_all(&proxy_dir)?;
    let proxy_config_path = proxy_dir.join("proxy.toml");
    std::fs::write(
        &proxy_config_path,
        format!(
            "[control]\ntoken = {token:?}\n\n[log]\nlevel = {:?}\n\n[proxy]\nupstream_tls_dir = {:?}\n",
            options.log_level,
            tls_root.join("client").display().to_string()
        ),
    )
    .with_context(|| format!("writing {}", proxy_config_path.display()))?;
    let servers: Vec<String> = members
        .iter()
        .map(|member| member.control.clone())
        .collect();
    children.push(ChildProcess {
        name: "proxy".into(),
        arguments: vec![
            "proxy".into(),
            "--config".into(),
            proxy_config_path.display().to_string(),
            "--listen".into(),
            options.listen.clone(),
            "--servers".into(),
            servers.join(","),
            "--client-id".into(),
            "raftblk-dev".into(),
            // Its status (restart counts) and, in test builds, failpoints for drills.
            "--control-listen".into(),
            format!("127.0.0.1:{}", options.port_base + 1),
        ],
        log_path: proxy_dir.join("proxy.log"),
        child: None,
        restarts: 0,
        started_at: Instant::now(),
    });
    for child in children.iter_mut().take(members.len()) {
        child.spawn(&executable)?;
    }
    println!(
        "starting {DEV_SERVERS} servers (logs in {}/node*/server.log)",
        options.data_dir.display()
    );
    if !wait_for_default_volume(&members, Duration::from_secs(60)).await {
        for child in children.iter_mut().filter_map(|child| child.child.as_mut()) {
            terminate(child);
            wait_with_timeout(child, Duration::from_secs(20)).await;
        }
        anyhow::bail!(
            "the cluster did not elect a leader and create disk0 within 60 s; see {}/node*/server.log",
            options.data_dir.display()
        );
    }
    let proxy_index = members.len();
    children[proxy_index].spawn(&executable)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    print_cluster(&children, &members, &options.listen).await;
    println!(
        "TLS: the servers require it (NBD, and mutual between them); certificates in {}, a \
         client directory for nbds:// in {}",
        tls_root.display(),
        tls_root.join("client").display()
    );
    println!(
        "control token: {} (export RAFTBLK_TOKEN=$(cat {}))",
        options.data_dir.join("control.token").display(),
        options.data_dir.join("control.token").display()
    );

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for child in children.iter_mut() {
            let exited = match child.child.as_mut() {
                Some(process) => process.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                // A crash (or a drill's kill -9): start it again, like a service manager,
                // with a pause if it keeps dying right after starting.
                let quick = child.started_at.elapsed() < Duration::from_secs(5);
                eprintln!(
                    "{} exited ({status}); restarting{}",
                    child.name,
                    if quick { " in 1 s" } else { "" }
                );
                if quick {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                child.restarts += 1;
                child.spawn(&executable)?;
                eprintln!(
                    "{} restarted (pid {})",
                    child.name,
                    child.pid().unwrap_or_default()
                );
            }
        }
    }
    println!("stopping the cluster");
    // The proxy first, so the client's connection ends before the servers go.
    for child in children
        .iter()
        .rev()
        .filter_map(|child| child.child.as_ref())
    {
        terminate(child);
    }
    for child in children.iter_mut().rev() {
        if let Some(process) = child.child.as_mut() {
            if !wait_with_timeout(process, Duration::from_secs(20)).await {
                eprintln!("{} did not stop within 20 s; killing it", child.name);
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn generated_server_configs_load_agree_on_the_members_and_name_certificates_that_load() {
        let directory = tempfile::tempdir().unwrap();
        let options = DevOptions {
            data_dir: directory.path().to_path_buf(),
            ..Default::default()
        };
        let members = members(&options);
        let token = dev_token(directory.path()).unwrap();
        assert_eq!(token.len(), 32);
        assert_eq!(
            dev_token(directory.path()).unwrap(),
            token,
            "reused on the next run"
        );
        let tls_root = dev_certificates(directory.path(), &members).unwrap();
        assert_eq!(
            dev_certificates(directory.path(), &members).unwrap(),
            tls_root,
            "certificates are reused on the next run"
        );
        crate::tls::client_config(&tls_root.join("client")).expect("the proxy's directory");
        for member in &members {
            let path = directory.path().join(format!("{}.toml", member.id));
            let text = server_config(&options, member, &members, &token, &tls_root);
            std::fs::write(&path, text).unwrap();
            let config = Config::load(Some(&path), &[]).expect("generated config is valid");
            assert_eq!(config.tls.mode, crate::config::TlsMode::Require);
            assert!(config.tls.peers && config.tls.verify_clients);
            let node_directory = config.tls.directory(&config.node.data_dir);
            crate::tls::server_config(&node_directory, true).expect("the node's certificates");
            crate::tls::PeerTls::load(&node_directory).expect("the node's peer certificates");
            assert_eq!(config.node.id, member.id);
            assert_eq!(config.cluster.members, members);
            assert_eq!(config.peer.listen.to_string(), member.peer);
            assert_eq!(config.default_volume.size_bytes, 1 << 30);
            assert_eq!(config.control.token, token);
        }
    }
}
