//! How `vigil rollout` and `vigil replay` dial their server: the URL, TLS (`--ca-file`, and
//! `--cert-file`/`--key-file` for mutual TLS) and a bearer token (`--token-file`) sent with
//! every call. One place, so both commands read the same flags the same way.
//!
//! TLS is used for an `https://` URL, or for a bare `host:port` when a TLS flag is given.
//! There are no built-in roots (tonic's are off, to keep the build lean): TLS needs
//! `--ca-file`, the CA that signed the server's certificate, as a private deployment has.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::grpc_errors::error_chain;

/// The TLS and credential flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DialArgs {
    /// PEM CA certificate(s) the server's certificate must chain to; dials TLS.
    #[arg(long, global = true, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the URL's host: through
    /// a `kubectl port-forward` the URL says 127.0.0.1 and the certificate names the Service.
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// PEM client certificate, for a server requiring mutual TLS (with --key-file).
    #[arg(long, global = true, value_name = "PATH", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, global = true, value_name = "PATH", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// A file holding a bearer token, sent as `authorization: Bearer <token>` (the model
    /// server's --management_token_file, for rollout changes).
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

/// A connection whose calls carry the bearer token, if one was given.
pub type Dialed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(<token>)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Why there is no connection.
#[derive(Debug)]
pub enum DialError {
    /// The server's address is not a URL (why).
    BadUrl(String),
    /// A flag or its file is unusable (the message names which).
    Setup(String),
    /// The server did not answer, or the TLS handshake failed.
    Unreachable(String),
}

impl DialArgs {
    /// Whether a TLS flag was given.
    fn wants_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// `server` (`http://`, `https://` or `host:port`) as an endpoint with these flags' TLS,
    /// and the token interceptor; nothing is dialed yet.
    pub fn endpoint(&self, server: &str) -> Result<(Endpoint, Bearer), DialError> {
        // `host:port` is what people type after seeing an address; gRPC needs a scheme.
        let url = match (server.contains("://"), self.wants_tls()) {
            (true, _) => server.to_owned(),
            (false, true) => format!("https://{server}"),
            (false, false) => format!("http://{server}"),
        };
        let https = url.starts_with("https://");
        let mut endpoint = Endpoint::from_shared(url.clone()).map_err(|e| DialError::BadUrl(error_chain(&e)))?;
        if https {
            let ca = self.ca_file.as_deref().ok_or_else(|| {
                DialError::Setup(format!(
                    "{url} is TLS: give --ca-file, the CA certificate the server's certificate chains to"
                ))
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca-file", ca)?));
            if let Some(name) = &self.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(read("--cert-file", cert)?, read("--key-file", key)?));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| DialError::Setup(format!("TLS for {url}: {}", error_chain(&e))))?;
        } else if self.wants_tls() || self.tls_server_name.is_some() {
            return Err(DialError::Setup(format!(
                "--ca-file, --cert-file and --tls-server-name are for TLS, but {url} is plaintext: use https://"
            )));
        }
        let bearer = match &self.token_file {
            None => None,
            Some(path) => {
                let text = String::from_utf8(read("--token-file", path)?)
                    .map_err(|_| DialError::Setup(format!("--token-file {}: the token is not text", path.display())))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(DialError::Setup(format!("--token-file {}: the file is empty", path.display())));
                }
                let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    DialError::Setup(format!(
                        "--token-file {}: the token has characters a header cannot",
                        path.display()
                    ))
                })?;
                Some(value)
            }
        };
        Ok((endpoint, Bearer(bearer)))
    }

    /// Dials `server` with `configure` applied to the endpoint (timeouts).
    pub async fn connect(
        &self,
        server: &str,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Dialed, DialError> {
        let (endpoint, bearer) = self.endpoint(server)?;
        let channel = configure(endpoint).connect().await.map_err(|e| DialError::Unreachable(error_chain(&e)))?;
        Ok(InterceptedService::new(channel, bearer))
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, DialError> {
    std::fs::read(path).map_err(|e| DialError::Setup(format!("{flag} {}: {e}", path.display())))
}

/// A hint for a refusal the flags here can fix.
pub fn credentials_hint(code: tonic::Code) -> Option<&'static str> {
    match code {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Some(
            "pass --token-file PATH (the token in the server's --management_token_file) or a client certificate \
             it allows (--cert-file, --key-file)",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ca: Option<&str>, token: Option<&Path>) -> DialArgs {
        DialArgs { ca_file: ca.map(PathBuf::from), token_file: token.map(Path::to_owned), ..Default::default() }
    }

    fn setup_error(result: Result<(Endpoint, Bearer), DialError>) -> String {
        match result {
            Err(DialError::Setup(message)) => message,
            other => panic!("expected a setup error, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_address_dials_tls_when_a_tls_flag_is_given_and_plaintext_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not checked until the handshake").unwrap();
        let ca = ca.to_str();
        let (endpoint, _) = args(ca, None).endpoint("127.0.0.1:8500").unwrap();
        assert_eq!(endpoint.uri().scheme_str(), Some("https"));
        let (endpoint, _) = args(None, None).endpoint("127.0.0.1:8500").unwrap();
        assert_eq!(endpoint.uri().scheme_str(), Some("http"));
        let error = setup_error(args(ca, None).endpoint("http://127.0.0.1:8500"));
        assert!(error.contains("plaintext"), "{error}");
        let error = setup_error(args(None, None).endpoint("https://127.0.0.1:8500"));
        assert!(error.contains("--ca-file"), "{error}");
        let error = setup_error(args(Some("/nonexistent/ca.pem"), None).endpoint("127.0.0.1:8500"));
        assert!(error.starts_with("--ca-file /nonexistent/ca.pem: "), "{error}");
    }

    #[test]
    fn the_token_file_becomes_a_bearer_header_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let (_, bearer) = args(None, Some(&token)).endpoint("127.0.0.1:1").unwrap();
        assert_eq!(bearer.0.unwrap().to_str().unwrap(), "Bearer s3cret");
        std::fs::write(&token, "\n").unwrap();
        let error = setup_error(args(None, Some(&token)).endpoint("127.0.0.1:1"));
        assert!(error.ends_with("the file is empty"), "{error}");
    }
}
