//! TLS on the gRPC and REST ports from TF Serving's `--ssl_config_file` (a text-format
//! `tensorflow.serving.SSLConfig` holding the PEM *contents*, not paths), so a TF Serving
//! deployment's file works unchanged; or from PEM files as a Kubernetes TLS Secret (and
//! cert-manager) mounts them (`--ssl_cert_file`, `--ssl_key_file`, `--ssl_client_ca_file`),
//! which a pod can use as they are renewed, with no step that writes an SSLConfig.
//!
//! Why handshakes are done here rather than by tonic's `ServerTlsConfig`: the certificate must
//! change without a restart (cert-manager renews every few weeks), and tonic's config is fixed
//! when the server starts. So the listeners stay plain `TcpListener`s, an accept loop hands
//! each connection to its own task that runs the rustls handshake under a timeout (a client
//! that never finishes its handshake holds one task, not the accept loop), and the finished
//! streams are served by tonic and axum as any stream. Each handshake takes the config current
//! at that moment ([`TlsConfigs`] behind an `ArcSwap`), which the file poller replaces.
//!
//! `client_verify: true` is mutual TLS: every client must present a certificate signed by
//! `custom_ca`. One deliberate extension to TF Serving, which ignores `custom_ca` unless
//! `client_verify` is set: with `custom_ca` and `client_verify: false`, a client *may* present
//! a certificate (verified against `custom_ca` if it does), so management calls can be
//! authorized by certificate subject while Predict clients need none.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use proto::tensorflow::serving::SslConfig;
use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::model_config;

/// How long a client gets to finish its TLS handshake after the TCP accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once per listener; past that, new connections wait in the
/// kernel's listen backlog. Bounds what a flood of never-finishing clients can hold.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// TLS settings that cannot be used: the message names the flag, the file and (in an
/// SSLConfig) the field.
#[derive(Debug, thiserror::Error)]
pub enum SslConfigError {
    #[error("{flag} {}: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    /// Not a text-format SSLConfig (the parser's message names the file).
    #[error("--ssl_config_file {0}")]
    Syntax(String),
    /// `field` is the SSLConfig field, or empty for a PEM file of its own.
    #[error("{flag} {}: {field}{}{message}", path.display(), if field.is_empty() { "" } else { ": " })]
    Field { flag: &'static str, path: PathBuf, field: &'static str, message: String },
    /// Flags that do not go together.
    #[error("{0}")]
    Flags(&'static str),
}

/// Where the server's certificate, key and client CA come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// TF Serving's `--ssl_config_file`.
    SslConfigFile(PathBuf),
    /// `--ssl_cert_file`, `--ssl_key_file` and optionally `--ssl_client_ca_file`: the files
    /// of a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`). `client_verify`
    /// (`--ssl_client_verify`) means what it means in an SSLConfig.
    PemFiles { cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>, client_verify: bool },
}

impl TlsSource {
    /// The flags and files, for log lines.
    pub fn describe(&self) -> String {
        self.files().iter().map(|(flag, path)| format!("{flag} {}", path.display())).collect::<Vec<_>>().join(", ")
    }

    /// The files read, in the order [`TlsSource::parse`] takes their contents.
    fn files(&self) -> Vec<(&'static str, &Path)> {
        match self {
            TlsSource::SslConfigFile(path) => vec![("--ssl_config_file", path)],
            TlsSource::PemFiles { cert, key, client_ca, .. } => {
                let mut files = vec![("--ssl_cert_file", cert.as_path()), ("--ssl_key_file", key.as_path())];
                files.extend(client_ca.as_deref().map(|ca| ("--ssl_client_ca_file", ca)));
                files
            }
        }
    }

    /// Reads every file (blocking IO); the contents are what a re-read compares.
    pub fn read(&self) -> Result<Vec<String>, SslConfigError> {
        self.files()
            .into_iter()
            .map(|(flag, path)| {
                std::fs::read_to_string(path).map_err(|source| SslConfigError::Read {
                    flag,
                    path: path.to_owned(),
                    source,
                })
            })
            .collect()
    }

    /// Checks the contents [`TlsSource::read`] returned and builds the ports' configs.
    pub fn parse(&self, contents: &[String]) -> Result<TlsConfigs, SslConfigError> {
        match self {
            TlsSource::SslConfigFile(path) => TlsConfigs::parse(path, &contents[0]),
            TlsSource::PemFiles { client_verify, .. } => {
                let files = self.files();
                let config = SslConfig {
                    server_cert: contents[0].clone(),
                    server_key: contents[1].clone(),
                    custom_ca: contents.get(2).cloned().unwrap_or_default(),
                    client_verify: *client_verify,
                };
                // An SSLConfig field's error names the file that field came from.
                build(&config).map_err(|(field, message)| {
                    let file = match field {
                        "server_cert" => files.first(),
                        "server_key" => files.get(1),
                        "custom_ca" => files.get(2),
                        _ => None,
                    };
                    match file {
                        Some(&(flag, path)) => SslConfigError::Field { flag, path: path.to_owned(), field: "", message },
                        None => SslConfigError::Flags(
                            "--ssl_client_verify needs --ssl_client_ca_file (the CA certificates client certificates are verified against)",
                        ),
                    }
                })
            }
        }
    }
}

/// Which listener a handshake is for: they differ in the ALPN protocol offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// HTTP/2 only ("h2"), as gRPC requires.
    Grpc,
    /// HTTP/1.1 only ("http/1.1"): the REST server is built without HTTP/2.
    Rest,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Grpc => "grpc",
            Port::Rest => "rest",
        }
    }
}

/// One `--ssl_config_file`, checked and turned into the two ports' rustls configs.
#[derive(Debug)]
pub struct TlsConfigs {
    grpc: Arc<rustls::ServerConfig>,
    rest: Arc<rustls::ServerConfig>,
    /// Whether client certificates are verified (required or optional): management
    /// authorization by subject needs it.
    pub verifies_clients: bool,
}

impl TlsConfigs {
    /// Checks `text`, the contents of the SSLConfig file `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<TlsConfigs, SslConfigError> {
        let config: SslConfig =
            model_config::parse_text(path, "tensorflow.serving.SSLConfig", text).map_err(SslConfigError::Syntax)?;
        build(&config).map_err(|(field, message)| SslConfigError::Field {
            flag: "--ssl_config_file",
            path: path.to_owned(),
            field,
            message,
        })
    }

    pub fn for_port(&self, port: Port) -> &Arc<rustls::ServerConfig> {
        match port {
            Port::Grpc => &self.grpc,
            Port::Rest => &self.rest,
        }
    }
}

/// Builds the ports' configs; an error names the SSLConfig field at fault.
fn build(config: &SslConfig) -> Result<TlsConfigs, (&'static str, String)> {
    let field = |field: &'static str, message: String| (field, message);
    let certs = certificates(&config.server_cert).map_err(|message| field("server_cert", message))?;
    let key = PrivateKeyDer::from_pem_slice(config.server_key.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => field("server_key", "no PEM private key found".into()),
        e => field("server_key", format!("not a PEM private key ({e})")),
    })?;
    let provider = crypto_provider();
    let verifier = if config.custom_ca.trim().is_empty() {
        if config.client_verify {
            return Err(field(
                "client_verify",
                "needs custom_ca (the CA certificates client certificates are verified against)".into(),
            ));
        }
        WebPkiClientVerifier::no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for (i, ca) in
            certificates(&config.custom_ca).map_err(|message| field("custom_ca", message))?.into_iter().enumerate()
        {
            roots.add(ca).map_err(|e| field("custom_ca", format!("certificate {}: {e}", i + 1)))?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let builder = if config.client_verify { builder } else { builder.allow_unauthenticated() };
        builder.build().map_err(|e| field("custom_ca", e.to_string()))?
    };
    let verifies_clients = !config.custom_ca.trim().is_empty();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| field("server_cert", e.to_string()))?
        .with_client_cert_verifier(verifier)
        // Checks that the key is the certificate's.
        .with_single_cert(certs, key)
        .map_err(|e| field("server_key", format!("{e} (the key must be server_cert's)")))?;
    let mut grpc = server.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut rest = server;
    rest.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfigs { grpc: Arc::new(grpc), rest: Arc::new(rest), verifies_clients })
}

/// ring, as the workspace's rustls is built with (see the root Cargo.toml). rustls 0.23.48
/// deprecated ring's provider because it lacks post-quantum key exchange (X25519MLKEM768,
/// aws-lc-rs only); switching means building aws-lc's C library in every build. Clients get
/// classical (X25519, P-256, P-384) key exchange; moving the workspace to aws-lc-rs is the
/// way to post-quantum.
#[allow(deprecated)]
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// The TLS configs in force; replaced whole when the file changes.
#[derive(Debug, Clone)]
pub struct Tls {
    current: Arc<ArcSwap<TlsConfigs>>,
}

impl Tls {
    pub fn new(configs: TlsConfigs) -> Self {
        Self { current: Arc::new(ArcSwap::from_pointee(configs)) }
    }

    /// The configs new handshakes use.
    pub fn current(&self) -> Arc<TlsConfigs> {
        self.current.load_full()
    }

    /// New handshakes use `configs` from now on; connections already made keep theirs.
    pub fn replace(&self, configs: TlsConfigs) {
        self.current.store(Arc::new(configs));
    }

    /// Accepts connections on `listener` and yields each once its handshake finished.
    /// Accepting stops when the receiver is dropped (the server stopped), closing the port.
    pub fn accept(&self, listener: TcpListener, port: Port) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
        // A small queue: a finished handshake waits for the server to take it, as a TCP
        // connection waits in the backlog.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, self.clone(), port, tx));
        rx
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Tls,
    port: Port,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            accepted = async {
                let permit = pending.clone().acquire_owned().await.expect("the semaphore is never closed");
                (listener.accept().await, permit)
            } => accepted,
        };
        let ((tcp, peer), permit) = match accepted {
            (Ok(connection), permit) => (connection, permit),
            (Err(e), _) => {
                accept_failed(port, e).await;
                continue;
            }
        };
        crate::overload::tune_accepted(&tcp);
        let acceptor = TlsAcceptor::from(tls.current().for_port(port).clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                // Worth seeing when a client's certificate or trust is wrong; a port scan
                // shows up here too, hence info and not warn.
                Ok(Err(e)) => tracing::info!(port = port.name(), %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(
                    port = port.name(),
                    %peer,
                    timeout_seconds = HANDSHAKE_TIMEOUT.as_secs(),
                    "TLS handshake timed out"
                ),
            }
        });
    }
}

/// As hyper and axum do: a connection reset before accept is the client's business; any
/// other error (out of file descriptors) is logged and accepting pauses for a second.
async fn accept_failed(port: Port, e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(port = port.name(), error = %e, "accept failed; pausing 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The REST port's TLS connections as an axum listener, so `axum::serve` serves them as
/// it serves a `TcpListener`.
#[derive(Debug)]
pub struct RestListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl RestListener {
    pub fn new(tls: &Tls, listener: TcpListener) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self { connections: tls.accept(listener, Port::Rest), local })
    }
}

impl axum::serve::Listener for RestListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        ca: String,
        cert: String,
        key: String,
        other_key: String,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
        Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
            other_key: rcgen::KeyPair::generate().unwrap().serialize_pem(),
        }
    }

    fn text(key: &str, cert: &str, ca: &str, verify: bool) -> String {
        let quoted = |s: &str| s.replace('\n', "\\n");
        format!(
            "server_key: \"{}\"\nserver_cert: \"{}\"\ncustom_ca: \"{}\"\nclient_verify: {verify}\n",
            quoted(key),
            quoted(cert),
            quoted(ca)
        )
    }

    fn error(text: &str) -> String {
        TlsConfigs::parse(Path::new("ssl.cfg"), text).unwrap_err().to_string()
    }

    #[test]
    fn a_tf_serving_ssl_config_gives_h2_for_grpc_and_http1_for_rest() {
        let pki = pki();
        let configs = TlsConfigs::parse(Path::new("ssl.cfg"), &text(&pki.key, &pki.cert, "", false)).unwrap();
        assert_eq!(configs.for_port(Port::Grpc).alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(configs.for_port(Port::Rest).alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(!configs.verifies_clients);
        let mutual = TlsConfigs::parse(Path::new("ssl.cfg"), &text(&pki.key, &pki.cert, &pki.ca, true)).unwrap();
        assert!(mutual.verifies_clients);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let pki = pki();
        let flag = "--ssl_config_file ssl.cfg";
        assert_eq!(error(&text(&pki.key, "", "", false)), format!("{flag}: server_cert: no PEM certificate found"));
        assert_eq!(error(&text("", &pki.cert, "", false)), format!("{flag}: server_key: no PEM private key found"));
        assert_eq!(
            error(&text(&pki.key, &pki.cert, "junk", false)),
            format!("{flag}: custom_ca: no PEM certificate found")
        );
        let mismatch = error(&text(&pki.other_key, &pki.cert, "", false));
        assert!(mismatch.starts_with(&format!("{flag}: server_key: ")), "{mismatch}");
        let unverifiable = error(&text(&pki.key, &pki.cert, "", true));
        assert!(unverifiable.starts_with(&format!("{flag}: client_verify: needs custom_ca")), "{unverifiable}");
        let typo = error("server_kye: \"x\"");
        assert!(typo.starts_with(&format!("{flag}: ")) && typo.contains("server_kye"), "{typo}");
    }

    #[test]
    fn a_truncated_pem_says_what_is_wrong_without_echoing_the_key() {
        let pki = pki();
        let truncated = &pki.key[..pki.key.len() / 2];
        let message = error(&text(truncated, &pki.cert, "", false));
        assert!(message.starts_with("--ssl_config_file ssl.cfg: server_key: not a PEM private key"), "{message}");
        let body_line = pki.key.lines().nth(1).unwrap();
        assert!(!message.contains(body_line), "{message}");
    }

    fn pem_files(verify: bool) -> TlsSource {
        TlsSource::PemFiles {
            cert: "tls/tls.crt".into(),
            key: "tls/tls.key".into(),
            client_ca: Some("tls/ca.crt".into()),
            client_verify: verify,
        }
    }

    #[test]
    fn pem_files_build_the_same_configs_and_errors_name_the_flag_and_file() {
        let pki = pki();
        let source = pem_files(true);
        let configs = source.parse(&[pki.cert.clone(), pki.key.clone(), pki.ca.clone()]).unwrap();
        assert!(configs.verifies_clients);
        assert_eq!(configs.for_port(Port::Grpc).alpn_protocols, vec![b"h2".to_vec()]);
        let error = |contents: [&str; 3]| source.parse(&contents.map(str::to_owned)).unwrap_err().to_string();
        assert_eq!(error(["", &pki.key, &pki.ca]), "--ssl_cert_file tls/tls.crt: no PEM certificate found");
        assert_eq!(error([&pki.cert, "", &pki.ca]), "--ssl_key_file tls/tls.key: no PEM private key found");
        assert_eq!(error([&pki.cert, &pki.key, "junk"]), "--ssl_client_ca_file tls/ca.crt: no PEM certificate found");
        let mismatch = error([&pki.cert, &pki.other_key, &pki.ca]);
        assert!(mismatch.starts_with("--ssl_key_file tls/tls.key: "), "{mismatch}");
        let no_ca = TlsSource::PemFiles { cert: "c".into(), key: "k".into(), client_ca: None, client_verify: true };
        let message = no_ca.parse(&[pki.cert.clone(), pki.key.clone()]).unwrap_err().to_string();
        assert!(message.starts_with("--ssl_client_verify needs --ssl_client_ca_file"), "{message}");
        let missing = pem_files(false).read().unwrap_err().to_string();
        assert!(missing.starts_with("--ssl_cert_file tls/tls.crt: "), "{missing}");
    }
}
