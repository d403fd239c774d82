//! TLS on the ports ingest serves (the MQTT proxy, HTTP ingest), from PEM files as a
//! Kubernetes TLS Secret mounts them (`tls.crt`, `tls.key`, `ca.crt`). The files are re-read
//! every [`RELOAD_EVERY`], so a renewed certificate (cert-manager) applies to new
//! connections without a restart; contents that are unreadable or invalid are logged and
//! the ones in use kept ([`server_tls::watch`]).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use server_tls::watch::{Contents, Watched, watch_files};
use tokio::sync::watch;

/// How often the certificate files are re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// TLS on one port: the server's certificate and key, and whether clients present
/// certificates (verified against `client_ca_file`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain, the server's first.
    pub cert_file: std::path::PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: std::path::PathBuf,
    /// PEM CA certificate(s) client certificates are verified against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<std::path::PathBuf>,
    /// `none` (the default), `optional` (verified when presented) or `required`.
    #[serde(default)]
    pub client_certificates: ClientCertificates,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCertificates {
    #[default]
    None,
    Optional,
    Required,
}

impl ServerTlsConfig {
    /// What is wrong with the settings themselves (`key` names them: `mqtt_proxy.tls`).
    pub fn check(&self, key: &str) -> Result<(), String> {
        match (self.client_certificates, &self.client_ca_file) {
            (ClientCertificates::None, Some(_)) => {
                Err(format!("{key}.client_ca_file is set but {key}.client_certificates is none"))
            }
            (ClientCertificates::Optional | ClientCertificates::Required, None) => Err(format!(
                "{key}.client_certificates needs {key}.client_ca_file (the CA client certificates are verified against)"
            )),
            _ => Ok(()),
        }
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut files = vec![("cert_file", self.cert_file.as_path()), ("key_file", self.key_file.as_path())];
        if self.client_certificates != ClientCertificates::None
            && let Some(ca) = &self.client_ca_file
        {
            files.push(("client_ca_file", ca));
        }
        files
    }
}

/// The TLS config new connections on one port get.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// What one port's TLS is built from: its settings, where they are in the config, and
/// the ALPN protocols it offers.
#[derive(Debug, Clone)]
pub struct TlsSource {
    pub config: ServerTlsConfig,
    /// Where in the config, for messages: `mqtt_proxy.tls`.
    pub key: &'static str,
    pub alpn: Vec<Vec<u8>>,
}

impl TlsSource {
    /// The files' contents; the error names the setting and the file.
    fn read(&self) -> Result<Vec<String>, String> {
        self.config
            .files()
            .into_iter()
            .map(|(field, path)| {
                std::fs::read_to_string(path).map_err(|e| format!("{}.{field} {}: {e}", self.key, path.display()))
            })
            .collect()
    }

    /// The server config for `contents` (as [`TlsSource::read`] returns them).
    fn build(&self, contents: &[String]) -> Result<rustls::ServerConfig, String> {
        let verify = self.config.client_certificates == ClientCertificates::Required;
        let ca = contents.get(2).map_or("", String::as_str);
        let mut config = server_tls::server_config(&contents[0], &contents[1], ca, verify).map_err(|e| {
            let (field, path) = match e.part {
                server_tls::Part::Certificate => ("cert_file", &self.config.cert_file),
                server_tls::Part::Key => ("key_file", &self.config.key_file),
                server_tls::Part::ClientCa | server_tls::Part::ClientVerify => {
                    ("client_ca_file", self.config.client_ca_file.as_ref().unwrap_or(&self.config.cert_file))
                }
            };
            format!("{}.{field} {}: {}", self.key, path.display(), e.message)
        })?;
        config.alpn_protocols.clone_from(&self.alpn);
        Ok(config)
    }

    /// Reads and checks the files; the error names the setting and file at fault.
    pub fn load(&self) -> Result<ServerTls, String> {
        self.config.check(self.key)?;
        let config = self.build(&self.read()?)?;
        Ok(ServerTls { current: Arc::new(RwLock::new(Arc::new(config))) })
    }

    /// Re-reads the files every [`RELOAD_EVERY`] until `stop` fires, applying valid changes
    /// to `tls`.
    pub fn watch(&self, tls: &ServerTls, stop: watch::Receiver<bool>) {
        let Ok(contents) = self.read() else { return };
        let (read, parse, current) = (self.clone(), self.clone(), tls.current.clone());
        let what = format!("{} ({})", self.key, self.config.cert_file.display());
        tokio::spawn(watch_files(
            Watched { what, every: RELOAD_EVERY, last: Contents::new(contents), stop },
            move || read.read(),
            move |contents| parse.build(contents),
            move |config| {
                if let Ok(mut slot) = current.write() {
                    *slot = Arc::new(config);
                }
            },
        ));
    }
}

impl ServerTls {
    /// The config a handshake starting now uses.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // A poisoned lock still holds a complete config (the writer only swaps an Arc).
        match self.current.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_and_their_ca_go_together() {
        let config = |client_ca_file: Option<&str>, client_certificates| ServerTlsConfig {
            cert_file: "tls.crt".into(),
            key_file: "tls.key".into(),
            client_ca_file: client_ca_file.map(Into::into),
            client_certificates,
        };
        assert!(config(None, ClientCertificates::None).check("http.tls").is_ok());
        assert!(config(Some("ca.crt"), ClientCertificates::Required).check("http.tls").is_ok());
        let error = config(None, ClientCertificates::Required).check("http.tls").unwrap_err();
        assert!(error.contains("http.tls.client_ca_file"), "{error}");
        assert!(config(Some("ca.crt"), ClientCertificates::None).check("http.tls").is_err());
    }

    #[test]
    fn a_missing_or_bad_file_is_named_with_its_setting() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "not a certificate").unwrap();
        let source = |cert_file: &Path| TlsSource {
            config: ServerTlsConfig {
                cert_file: cert_file.to_owned(),
                key_file: dir.path().join("tls.key"),
                client_ca_file: None,
                client_certificates: ClientCertificates::None,
            },
            key: "mqtt_proxy.tls",
            alpn: Vec::new(),
        };
        let missing = source(&dir.path().join("absent.crt")).load().unwrap_err();
        assert!(missing.starts_with("mqtt_proxy.tls.cert_file ") && missing.contains("absent.crt"), "{missing}");
        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        let bad = source(&cert).load().unwrap_err();
        assert!(bad.starts_with("mqtt_proxy.tls.cert_file ") && bad.contains("no PEM certificate"), "{bad}");
    }
}
