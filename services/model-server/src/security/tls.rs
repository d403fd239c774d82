//! TLS on the gRPC and REST ports from TF Serving's `--ssl_config_file` (a text-format
//! `tensorflow.serving.SSLConfig` holding the PEM *contents*, not paths), so a TF Serving
//! deployment's file works unchanged; or from PEM files as a Kubernetes TLS Secret (and
//! cert-manager) mounts them (`--ssl_cert_file`, `--ssl_key_file`, `--ssl_client_ca_file`),
//! which a pod can use as they are renewed, with no step that writes an SSLConfig.
//!
//! Why handshakes are done here rather than by tonic's `ServerTlsConfig`: the certificate must
//! change without a restart (cert-manager renews every few weeks), and tonic's config is fixed
//! when the server starts. So the listeners stay plain `TcpListener`s, [`server_tls::accept`]
//! runs each rustls handshake in its own task under a timeout, and the finished streams are
//! served by tonic and axum as any stream. Each handshake takes the config current at that
//! moment ([`TlsConfigs`] behind an `ArcSwap`), which the file poller replaces.
//!
//! `client_verify: true` is mutual TLS: every client must present a certificate signed by
//! `custom_ca`. One deliberate extension to TF Serving, which ignores `custom_ca` unless
//! `client_verify` is set: with `custom_ca` and `client_verify: false`, a client *may* present
//! a certificate (verified against `custom_ca` if it does), so management calls can be
//! authorized by certificate subject while Predict clients need none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use proto::tensorflow::serving::SslConfig;
use server_tls::{AcceptedTls, Part};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::model_config;

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
    pub fn name(self) -> &'static str {
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
    let server =
        server_tls::server_config(&config.server_cert, &config.server_key, &config.custom_ca, config.client_verify)
            .map_err(|e| {
                let field = match e.part {
                    Part::Certificate => "server_cert",
                    Part::Key => "server_key",
                    Part::ClientCa => "custom_ca",
                    Part::ClientVerify => "client_verify",
                };
                let message = match e.part {
                    Part::Key => e.message.replace("the certificate's", "server_cert's"),
                    _ => e.message,
                };
                (field, message)
            })?;
    let verifies_clients = !config.custom_ca.trim().is_empty();
    let mut grpc = server.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut rest = server;
    rest.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfigs { grpc: Arc::new(grpc), rest: Arc::new(rest), verifies_clients })
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
    pub fn accept(&self, listener: TcpListener, port: Port) -> mpsc::Receiver<AcceptedTls> {
        let tls = self.clone();
        server_tls::accept::spawn(
            listener,
            move || tls.current().for_port(port).clone(),
            crate::overload::tune_accepted,
            port.name(),
        )
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
