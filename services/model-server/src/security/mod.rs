//! Who can talk to the model server, and over what: TLS (optionally mutual) on both ports
//! from `--ssl_config_file` or PEM files ([`tls`]), and credentials for the calls that change what is
//! served ([`auth`]). Kept apart from the request handling so that each can change alone.
//!
//! The files are re-read while serving, every `--security_files_poll_wait_seconds` (5 by
//! default): certificates are renewed and tokens rotated without a restart. A file whose
//! contents changed and are valid is used from then on (new TLS handshakes, new calls); one
//! that is unreadable or invalid is logged once and the one in use is kept
//! ([`server_tls::watch`]).

pub mod auth;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use auth::{ManagementAuth, Token};
use server_tls::watch::{Contents, Watched, watch_files};
pub use tls::TlsSource;
use tls::{Port, Tls};

/// What the flags say about security (see `config.rs`).
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    /// Where TLS comes from; `None` serves plain TCP.
    pub tls: Option<TlsSource>,
    pub management_token_file: Option<PathBuf>,
    pub management_allowed_subjects: Vec<String>,
    /// Between re-reads of the two files; `None` reads them once.
    pub poll: Option<Duration>,
}

/// Security settings that cannot be used; messages name the flag or file and the field.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Ssl(#[from] tls::SslConfigError),
    #[error("--management_token_file {}: {message}", path.display())]
    TokenFile { path: PathBuf, message: String },
    #[error(
        "--management_allowed_subject needs verified client certificates: an --ssl_config_file with custom_ca \
         or an --ssl_client_ca_file (and client_verify: true or --ssl_client_verify to require them of every client)"
    )]
    SubjectsWithoutClientCertificates,
}

/// The TLS configs and management credentials in force, loaded from the flags' files.
#[derive(Debug, Clone)]
pub struct Security {
    options: SecurityOptions,
    tls: Option<(Tls, Contents)>,
    auth: ManagementAuth,
    token: Option<Contents>,
}

impl Security {
    /// Reads and checks the files the options name.
    pub fn load(options: SecurityOptions) -> Result<Security, SecurityError> {
        let tls = match &options.tls {
            Some(source) => {
                let contents = source.read()?;
                let configs = source.parse(&contents)?;
                if !options.management_allowed_subjects.is_empty() && !configs.verifies_clients {
                    return Err(SecurityError::SubjectsWithoutClientCertificates);
                }
                Some((Tls::new(configs), Contents::new(contents)))
            }
            None if !options.management_allowed_subjects.is_empty() => {
                return Err(SecurityError::SubjectsWithoutClientCertificates);
            }
            None => None,
        };
        let (token, token_contents) = match &options.management_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| SecurityError::TokenFile { path: path.clone(), message: e.to_string() })?;
                let token = Token::from_file_text(&text)
                    .map_err(|message| SecurityError::TokenFile { path: path.clone(), message: message.into() })?;
                (Some(token), Some(Contents::new(vec![text])))
            }
            None => (None, None),
        };
        let auth = ManagementAuth::new(token, options.management_allowed_subjects.clone());
        Ok(Security { options, tls, auth, token: token_contents })
    }

    /// The TLS configs, when the ports serve TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref().map(|(tls, _)| tls)
    }

    /// The management calls' credentials (open when none are configured).
    pub fn auth(&self) -> &ManagementAuth {
        &self.auth
    }

    /// Says, once at startup, what is required of clients.
    pub fn log_summary(&self) {
        match self.tls() {
            Some(tls) => {
                let clients = if tls.current().verifies_clients { "verified" } else { "not asked for" };
                tracing::info!(client_certificates = clients, "TLS on the gRPC port and the REST port (if served)");
            }
            None => tracing::info!("plain TCP, no TLS (neither --ssl_config_file nor --ssl_cert_file)"),
        }
        if self.auth.required() {
            tracing::info!(
                token = self.options.management_token_file.is_some(),
                allowed_subjects = self.options.management_allowed_subjects.len(),
                "management calls need credentials"
            );
        } else {
            tracing::warn!(
                "management calls (model config reloads, rollout changes) are open to every client: \
                 set --management_token_file or --management_allowed_subject"
            );
        }
    }

    /// Starts re-reading the files (when polling is on); the tasks end on `stop`.
    pub fn watch(&self, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let Some(every) = self.options.poll else { return Vec::new() };
        let mut tasks = Vec::new();
        if let (Some((tls, contents)), Some(source)) = (&self.tls, &self.options.tls) {
            let tls = tls.clone();
            let (read, parse) = (source.clone(), source.clone());
            tasks.push(tokio::spawn(watch_files(
                Watched { what: source.describe(), every, last: contents.clone(), stop: stop.clone() },
                move || read.read().map_err(|e| e.to_string()),
                move |contents| parse.parse(contents).map_err(|e| e.to_string()),
                move |configs| tls.replace(configs),
            )));
        }
        if let (Some(contents), Some(path)) = (&self.token, &self.options.management_token_file) {
            let auth = self.auth.clone();
            let (read, name) = (path.clone(), path.clone());
            tasks.push(tokio::spawn(watch_files(
                Watched {
                    what: format!("--management_token_file {}", path.display()),
                    every,
                    last: contents.clone(),
                    stop: stop.clone(),
                },
                move || std::fs::read_to_string(&read).map(|text| vec![text]).map_err(|e| e.to_string()),
                move |contents| Token::from_file_text(&contents[0]).map_err(|e| format!("{}: {e}", name.display())),
                move |token| auth.set_token(token),
            )));
        }
        tasks
    }
}

impl Tls {
    /// The gRPC port's TLS connections, as tonic's `serve_with_incoming` takes them. Each
    /// carries its client certificates into the requests (tonic's `TlsConnectInfo`).
    pub fn grpc_incoming(
        &self,
        listener: TcpListener,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> + use<>
    {
        tokio_stream::wrappers::ReceiverStream::new(self.accept(listener, Port::Grpc)).map(|(stream, _)| Ok(stream))
    }

    /// Serves `app` on the REST port over TLS until `stop`.
    pub async fn serve_rest(
        &self,
        listener: TcpListener,
        app: axum::Router,
        stop: impl admin::Shutdown,
    ) -> std::io::Result<()> {
        let tls = self.clone();
        let listener = server_tls::TlsListener::new(
            listener,
            move || tls.current().for_port(Port::Rest).clone(),
            crate::overload::tune_accepted,
            Port::Rest.name(),
        )?;
        axum::serve(listener, app).with_graceful_shutdown(stop).await
    }
}
