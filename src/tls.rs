//! TLS with X.509 certificates in the directory layout qemu's `tls-creds-x509` and libnbd's
//! `tls-certificates=` read, so that a directory made here works unchanged with them:
//!
//! - `ca-cert.pem`: the certificate authority every party trusts;
//! - `server-cert.pem`, `server-key.pem`: what a server presents;
//! - `client-cert.pem`, `client-key.pem`: what a client presents (optional unless the server
//!   verifies clients);
//! - `ca-key.pem`: only in the directory of the authority itself (`raftblk ctl certs init`),
//!   never handed out.
//!
//! [`server_config`] and [`client_config`] build rustls configurations (the `ring` provider,
//! TLS 1.2 and 1.3) from such a directory; [`init_authority`] and [`issue`] write one with
//! rcgen. Certificates carry the key usages gnutls (qemu, libnbd) checks: digital signature
//! and key encipherment, server or client authentication.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Certificates are valid for this long from their issue.
const VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a PEM file of the expected kind: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{path}: holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} exists already: refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{name:?} is a node's name (node-ID): only `--node ID` certificates carry one")]
    ReservedName { name: String },
}

/// rustls with *ring*: portable and quick to build (also for the Pi's aarch64), at the price of
/// no post-quantum key exchange (that needs the aws-lc-rs provider and its C build); the
/// clients we serve (gnutls in qemu and libnbd) negotiate X25519 or P-256 with it.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| pem_error(path, error))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| pem_error(path, error))
}

fn pem_error(path: &Path, error: rustls::pki_types::pem::Error) -> TlsError {
    match error {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

fn roots(directory: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let path = directory.join(CA_CERT);
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(&path)? {
        roots.add(certificate).map_err(|error| TlsError::Pem {
            path: path.clone(),
            detail: error.to_string(),
        })?;
    }
    Ok(roots)
}

/// The server side: `server-cert.pem` and `server-key.pem` presented; with `verify_clients`,
/// only clients presenting a certificate signed by `ca-cert.pem` get through the handshake.
pub fn server_config(
    directory: &Path,
    verify_clients: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certificates = read_certificates(&directory.join(SERVER_CERT))?;
    let key = read_key(&directory.join(SERVER_KEY))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = if verify_clients {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(directory)?),
            provider(),
        )
        .build()
        .map_err(|error| TlsError::Verifier(error.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(builder.with_single_cert(certificates, key)?))
}

/// The client side: servers must present a certificate signed by `ca-cert.pem` for the name
/// connected to; `client-cert.pem` and `client-key.pem` are presented when they exist.
pub fn client_config(directory: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let presented = directory
        .join(CLIENT_CERT)
        .exists()
        .then_some((CLIENT_CERT, CLIENT_KEY));
    client_config_presenting(directory, presented)
}

/// A node's client side towards the other nodes: trusts `ca-cert.pem` and presents the node's
/// own `server-cert.pem` (issued for both server and client authentication).
pub fn node_client_config(directory: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_presenting(directory, Some((SERVER_CERT, SERVER_KEY)))
}

/// Trusts `ca-cert.pem` of `directory`, and presents the certificate and key of `presented`
/// (file names in `directory`), if any.
fn client_config_presenting(
    directory: &Path,
    presented: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(directory)?);
    let config = match presented {
        Some((certificate, key)) => builder.with_client_auth_cert(
            read_certificates(&directory.join(certificate))?,
            read_key(&directory.join(key))?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Every name a certificate gives its holder: its DNS subject alternative names and its common
/// name.
pub fn certificate_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    let Ok(params) = rcgen::CertificateParams::from_ca_cert_der(certificate) else {
        return Vec::new();
    };
    let mut names: Vec<String> = params
        .subject_alt_names
        .iter()
        .filter_map(|name| match name {
            rcgen::SanType::DnsName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect();
    if let Some(common_name) = params.distinguished_name.get(&rcgen::DnType::CommonName) {
        names.push(match common_name {
            rcgen::DnValue::PrintableString(text) => text.to_string(),
            rcgen::DnValue::Utf8String(text) => text.clone(),
            other => format!("{other:?}"),
        });
    }
    names
}

/// The node a verified peer certificate is for: `Some(id)` only for a node certificate, one
/// issued for server authentication (client certificates are not) whose first DNS name is
/// `node-ID`. Other names on it (its hosts) prove nothing.
pub fn certified_node(certificate: &CertificateDer<'_>) -> Option<u64> {
    let params = rcgen::CertificateParams::from_ca_cert_der(certificate).ok()?;
    if !params
        .extended_key_usages
        .contains(&rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    {
        return None;
    }
    let first = params
        .subject_alt_names
        .iter()
        .find_map(|name| match name {
            rcgen::SanType::DnsName(name) => Some(name.to_string()),
            _ => None,
        })?;
    parse_node_identity(&first)
}

/// `node-ID` → ID.
fn parse_node_identity(name: &str) -> Option<u64> {
    name.strip_prefix("node-")?
        .parse()
        .ok()
        .filter(|id| *id > 0)
}

/// A TCP connection, plain or TLS (either side).
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// The certificates the other side presented (TLS only; verified by the handshake).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(stream) => stream.get_ref().1.peer_certificates(),
        }
    }

    /// Writes `bytes` (then empties it) and flushes: through TLS a write may leave its last
    /// records in the session's buffer until the next one, and a handshake reply must leave
    /// before its sender waits for the answer.
    pub async fn send(&mut self, bytes: &mut Vec<u8>) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.write_all(bytes).await?;
        self.flush().await?;
        bytes.clear();
        Ok(())
    }

    /// The two directions, for a reader task and a writer task. A plain socket splits without
    /// a lock; a TLS stream shares its state between the halves.
    pub fn into_boxed_halves(
        self,
    ) -> (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) {
        match self {
            MaybeTls::Plain(stream) => {
                let (read_half, write_half) = stream.into_split();
                (Box::new(read_half), Box::new(write_half))
            }
            MaybeTls::Tls(stream) => {
                let (read_half, write_half) = tokio::io::split(*stream);
                (Box::new(read_half), Box::new(write_half))
            }
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => std::pin::Pin::new(stream).poll_read(context, buffer),
            MaybeTls::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => std::pin::Pin::new(stream).poll_write(context, buffer),
            MaybeTls::Tls(stream) => {
                std::pin::Pin::new(stream.as_mut()).poll_write(context, buffer)
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => std::pin::Pin::new(stream).poll_flush(context),
            MaybeTls::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(context),
            MaybeTls::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// Mutual TLS between the servers of a cluster: every link is TLS, each side presents its
/// node certificate, and each side checks that the other's names the node it claims to be.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl PeerTls {
    /// From a node's certificate directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`).
    pub fn load(directory: &Path) -> Result<Self, TlsError> {
        Ok(PeerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server_config(directory, true)?),
            connector: tokio_rustls::TlsConnector::from(node_client_config(directory)?),
        })
    }

    /// The accepting side's handshake: the peer must present a certificate of the cluster's
    /// authority (whose names the caller checks against the node the peer claims to be).
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<MaybeTls> {
        let stream = self.acceptor.accept(stream).await?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Server(
            stream,
        ))))
    }

    /// The connecting side's handshake with node `to`, whose certificate must name it.
    pub async fn connect(&self, to: u64, stream: TcpStream) -> std::io::Result<MaybeTls> {
        let name = ServerName::try_from(node_identity(to))
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let stream = self.connector.connect(name, stream).await?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(
            stream,
        ))))
    }
}

/// Writes `contents` to a new file (never over an existing one); `private` files get mode 0600.
fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io(source)
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn validity(params: &mut rcgen::CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A day back, so that a clock slightly behind on another machine accepts it at once.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

/// Whom a certificate names.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A storage server: presented to NBD clients, the proxy and (as a client too) to the
    /// other servers. Named `node-ID`, with `hosts` (DNS names or IP
    /// addresses the others connect to) as further subject alternative names.
    Node { id: u64, hosts: Vec<String> },
    /// A client (a proxy, an operator, an NBD client), named `name`.
    Client { name: String },
}

/// The name a node's certificate carries (its first DNS subject alternative name).
pub fn node_identity(id: u64) -> String {
    format!("node-{id}")
}

/// Creates `directory` (if missing) with a new certificate authority: `ca-cert.pem` and
/// `ca-key.pem` (mode 0600). Refuses to overwrite either.
pub fn init_authority(directory: &Path, name: &str) -> Result<(), TlsError> {
    std::fs::create_dir_all(directory).map_err(|source| TlsError::Io {
        path: directory.to_path_buf(),
        source,
    })?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let certificate = params.self_signed(&key)?;
    write_new(&directory.join(CA_KEY), &key.serialize_pem(), true)?;
    write_new(&directory.join(CA_CERT), &certificate.pem(), false)
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Issues a certificate for `subject`, signed by the authority in `authority`, into `out`
/// (created if missing): `server-cert.pem` / `server-key.pem` for a node, `client-cert.pem` /
/// `client-key.pem` for a client, and a copy of `ca-cert.pem`, so that `out` is a complete
/// directory for qemu, libnbd and raftblk. Refuses to overwrite a certificate or key.
pub fn issue(authority: &Path, out: &Path, subject: &Subject) -> Result<(), TlsError> {
    // Node names are for node certificates only: a client or a host named like a node would
    // read as one to a human, if not to the peer links.
    let claimed = match subject {
        Subject::Node { hosts, .. } => hosts
            .iter()
            .find(|host| parse_node_identity(host).is_some()),
        Subject::Client { name } => Some(name).filter(|name| parse_node_identity(name).is_some()),
    };
    if let Some(name) = claimed {
        return Err(TlsError::ReservedName { name: name.clone() });
    }
    let ca_key = rcgen::KeyPair::from_pem(&read_text(&authority.join(CA_KEY))?)?;
    let ca_pem = read_text(&authority.join(CA_CERT))?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    let (names, common_name, certificate_file, key_file, purposes) = match subject {
        Subject::Node { id, hosts } => {
            let mut names = vec![node_identity(*id)];
            names.extend(hosts.iter().cloned());
            (
                names,
                node_identity(*id),
                SERVER_CERT,
                SERVER_KEY,
                vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        }
        Subject::Client { name } => (
            vec![name.clone()],
            name.clone(),
            CLIENT_CERT,
            CLIENT_KEY,
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        ),
    };
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = purposes;
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let key = rcgen::KeyPair::generate()?;
    let certificate = params.signed_by(&key, &ca, &ca_key)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_new(&out.join(key_file), &key.serialize_pem(), true)?;
    write_new(&out.join(certificate_file), &certificate.pem(), false)?;
    let ca_copy = out.join(CA_CERT);
    match std::fs::read_to_string(&ca_copy) {
        Ok(existing) if existing == ca_pem => Ok(()),
        Ok(_) => Err(TlsError::Exists { path: ca_copy }),
        Err(_) => write_new(&ca_copy, &ca_pem, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory made by `init_authority` and `issue` gives working rustls configurations:
    /// a client trusting the authority completes a handshake with a node, presenting its
    /// client certificate, whose identity the server reads back.
    #[test]
    fn issued_certificates_complete_a_mutual_handshake() {
        let directory = tempfile::tempdir().expect("a directory");
        let authority = directory.path().join("ca");
        let node = directory.path().join("node");
        let client = directory.path().join("client");
        init_authority(&authority, "raftblk test CA").expect("a CA");
        issue(
            &authority,
            &node,
            &Subject::Node {
                id: 3,
                hosts: vec!["127.0.0.1".into(), "localhost".into()],
            },
        )
        .expect("a node certificate");
        issue(
            &authority,
            &client,
            &Subject::Client {
                name: "alice".into(),
            },
        )
        .expect("a client certificate");
        assert!(matches!(
            issue(
                &authority,
                &client,
                &Subject::Client {
                    name: "alice".into()
                }
            ),
            Err(TlsError::Exists { .. })
        ));

        let server = server_config(&node, true).expect("the server side");
        let client = client_config(&client).expect("the client side");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
        let mut client = rustls::ClientConnection::new(client, name).expect("a client");
        let mut server = rustls::ServerConnection::new(server).expect("a server");
        for _ in 0..10 {
            let mut buffer = Vec::new();
            client.write_tls(&mut buffer).expect("client bytes");
            server.read_tls(&mut &buffer[..]).expect("to the server");
            server.process_new_packets().expect("the server accepts");
            let mut buffer = Vec::new();
            server.write_tls(&mut buffer).expect("server bytes");
            client.read_tls(&mut &buffer[..]).expect("to the client");
            client.process_new_packets().expect("the client accepts");
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        let presented = server.peer_certificates().expect("a client certificate");
        assert_eq!(
            certificate_names(&presented[0]).first().map(String::as_str),
            Some("alice")
        );
    }

    /// Only a node certificate names a node: a client certificate or a host named `node-N`
    /// is refused at issue, and `certified_node` reads the node from the certificate's first
    /// name only when it is for server authentication.
    #[test]
    fn only_node_certificates_name_a_node() {
        let directory = tempfile::tempdir().expect("a directory");
        let authority = directory.path().join("ca");
        init_authority(&authority, "test CA").expect("a CA");
        for subject in [
            Subject::Client {
                name: "node-2".into(),
            },
            Subject::Node {
                id: 1,
                hosts: vec!["node-2".into()],
            },
        ] {
            assert!(matches!(
                issue(&authority, &directory.path().join("x"), &subject),
                Err(TlsError::ReservedName { .. })
            ));
        }
        let node = directory.path().join("node");
        issue(
            &authority,
            &node,
            &Subject::Node {
                id: 7,
                hosts: vec!["10.0.0.7".into()],
            },
        )
        .expect("a node certificate");
        let client = directory.path().join("client");
        issue(&authority, &client, &Subject::Client { name: "ops".into() })
            .expect("a client certificate");
        let first = |path: PathBuf| read_certificates(&path).expect("a certificate").remove(0);
        assert_eq!(certified_node(&first(node.join(SERVER_CERT))), Some(7));
        assert_eq!(certified_node(&first(client.join(CLIENT_CERT))), None);
    }

    /// A server verifying clients refuses a certificate from another authority.
    #[test]
    fn a_client_of_another_authority_is_refused() {
        let directory = tempfile::tempdir().expect("a directory");
        let (ours, theirs) = (
            directory.path().join("ours"),
            directory.path().join("theirs"),
        );
        init_authority(&ours, "ours").expect("a CA");
        init_authority(&theirs, "theirs").expect("another CA");
        let node = directory.path().join("node");
        issue(
            &ours,
            &node,
            &Subject::Node {
                id: 1,
                hosts: vec!["127.0.0.1".into()],
            },
        )
        .expect("a node certificate");
        let stranger = directory.path().join("stranger");
        issue(
            &theirs,
            &stranger,
            &Subject::Client {
                name: "mallory".into(),
            },
        )
        .expect("a foreign client certificate");
        // The stranger trusts our CA (to get as far as presenting its certificate).
        std::fs::copy(ours.join(CA_CERT), stranger.join("ours.pem")).expect("copy");
        std::fs::rename(stranger.join("ours.pem"), stranger.join(CA_CERT)).expect("swap");
        let server = server_config(&node, true).expect("the server side");
        let client = client_config(&stranger).expect("the client side");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
        let mut client = rustls::ClientConnection::new(client, name).expect("a client");
        let mut server = rustls::ServerConnection::new(server).expect("a server");
        let mut refused = false;
        for _ in 0..10 {
            let mut buffer = Vec::new();
            client.write_tls(&mut buffer).expect("client bytes");
            server.read_tls(&mut &buffer[..]).expect("to the server");
            if server.process_new_packets().is_err() {
                refused = true;
                break;
            }
            let mut buffer = Vec::new();
            server.write_tls(&mut buffer).expect("server bytes");
            client.read_tls(&mut &buffer[..]).expect("to the client");
            let _ = client.process_new_packets();
        }
        assert!(
            refused,
            "the server accepted a certificate of another authority"
        );
    }
}
