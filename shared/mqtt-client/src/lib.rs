//! MQTT client plumbing that ingest's bridge and the device simulator share, so that both
//! read a broker's address and TLS files the same way:
//! - [`parse_url`]: `mqtt://host[:port]` (or `tcp://`; port 1883 when left out) or
//!   `mqtts://host[:port]` (or `ssl://`; TLS, port 8883 when left out);
//! - [`tls_transport`]: the broker verified against a CA from a PEM file (or the system's
//!   roots), and a client certificate with its PKCS#8 key when given.

#![forbid(unsafe_code)]

use std::path::Path;

/// Where a broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttClientError {
    #[error("mqtt url {url:?}: {problem}")]
    Url { url: String, problem: String },
    #[error("mqtt tls: {0}")]
    Tls(String),
}

/// A broker URL as an [`Endpoint`].
pub fn parse_url(text: &str) -> Result<Endpoint, MqttClientError> {
    let error = |problem: &str| MqttClientError::Url { url: text.to_owned(), problem: problem.to_owned() };
    let url = url::Url::parse(text).map_err(|e| error(&e.to_string()))?;
    let (tls, default_port) = match url.scheme() {
        "mqtt" | "tcp" => (false, 1883),
        "mqtts" | "ssl" => (true, 8883),
        other => return Err(error(&format!("the scheme {other:?} is neither mqtt:// nor mqtts://"))),
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| error("no host"))?;
    Ok(Endpoint {
        host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: url.port().unwrap_or(default_port),
        tls,
    })
}

/// The PEM files of a client's TLS: the CA the broker's certificate is checked against
/// (`None`: the system's roots), and the client's own certificate and PKCS#8 key.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    pub ca: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
}

/// The TLS transport for `files`. A client certificate needs both its files.
pub fn tls_transport(files: TlsFiles<'_>) -> Result<rumqttc::Transport, MqttClientError> {
    use rumqttc::tokio_native_tls::native_tls;
    let tls = MqttClientError::Tls;
    let read = |path: &Path| std::fs::read(path).map_err(|e| tls(format!("{}: {e}", path.display())));
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = files.ca {
        let certificate = native_tls::Certificate::from_pem(&read(path)?)
            .map_err(|e| tls(format!("{}: not a PEM certificate: {e}", path.display())))?;
        builder.add_root_certificate(certificate);
    }
    match (files.client_cert, files.client_key) {
        (Some(cert), Some(key)) => {
            let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?).map_err(|e| {
                tls(format!("{} with {}: not a PEM certificate and PKCS#8 key: {e}", cert.display(), key.display()))
            })?;
            builder.identity(identity);
        }
        (None, None) => {}
        _ => return Err(tls("a client certificate needs both its certificate and its key file".into())),
    }
    let connector = builder.build().map_err(|e| tls(e.to_string()))?;
    Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::NativeConnector(connector)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_tls() {
        let endpoint = |url: &str| parse_url(url).unwrap();
        assert_eq!(endpoint("mqtt://broker"), Endpoint { host: "broker".into(), port: 1883, tls: false });
        assert_eq!(endpoint("mqtts://broker"), Endpoint { host: "broker".into(), port: 8883, tls: true });
        assert_eq!(endpoint("ssl://10.0.0.1:9000"), Endpoint { host: "10.0.0.1".into(), port: 9000, tls: true });
        assert_eq!(endpoint("tcp://[::1]:1884"), Endpoint { host: "::1".into(), port: 1884, tls: false });
        for bad in ["http://broker", "mqtt://", "broker:1883"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_files_are_named_when_unreadable_and_a_lone_half_of_a_client_pair_is_refused() {
        let missing = Path::new("/nonexistent/ca.pem");
        let error = tls_transport(TlsFiles { ca: Some(missing), ..Default::default() }).err().unwrap().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let error = tls_transport(TlsFiles { client_cert: Some(missing), ..Default::default() }).err().unwrap();
        assert!(error.to_string().contains("both"), "{error}");
    }
}
