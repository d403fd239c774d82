//! Who can talk to the model server, and over what: TLS (optionally mutual) on both ports
//! from `--ssl_config_file` ([`tls`]), and credentials for the calls that change what is
//! served ([`auth`]). Kept apart from the request handling so that each can change alone.
//!
//! The files are re-read while serving, every `--security_files_poll_wait_seconds` (5 by
//! default): certificates are renewed and tokens rotated without a restart. A file whose
//! contents changed and are valid is used from then on (new TLS handshakes, new calls); one
//! that is unreadable or invalid is logged once and the one in use is kept. Contents are
//! compared, not modification times: a Kubernetes Secret update swaps a symlink, which
//! leaves the file's own mtime behind.

pub mod auth;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use auth::{ManagementAuth, Token};
use tls::{Port, RestListener, Tls, TlsConfigs};

/// What the flags say about security (see `config.rs`).
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    pub ssl_config_file: Option<PathBuf>,
    pub management_token_file: Option<PathBuf>,
    pub management_allowed_subjects: Vec<String>,
    /// Between re-reads of the two files; `None` reads them once.
    pub poll: Option<Duration>,
}

/// Security settings that cannot be used; messages name the flag or file and the field.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("--ssl_config_file {0}")]
    Ssl(#[from] tls::SslConfigError),
    #[error("--management_token_file {}: {message}", path.display())]
    TokenFile { path: PathBuf, message: String },
    #[error(
        "--management_allowed_subject needs verified client certificates: an --ssl_config_file with custom_ca \
         (and client_verify: true to require them of every client)"
    )]
    SubjectsWithoutClientCertificates,
}

/// A file's contents as last read, to notice a change. Never printed: they hold keys and
/// tokens.
#[derive(Clone, PartialEq, Eq)]
struct Contents(Arc<str>);

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<contents>")
    }
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
        let tls = match &options.ssl_config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| tls::SslConfigError::Read { path: path.clone(), source })?;
                let configs = TlsConfigs::parse(path, &text)?;
                if !options.management_allowed_subjects.is_empty() && !configs.verifies_clients {
                    return Err(SecurityError::SubjectsWithoutClientCertificates);
                }
                Some((Tls::new(configs), Contents(text.into())))
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
                (Some(token), Some(Contents(text.into())))
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
            None => tracing::info!("plain TCP, no TLS (no --ssl_config_file)"),
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
        if let (Some((tls, contents)), Some(path)) = (&self.tls, &self.options.ssl_config_file) {
            let tls = tls.clone();
            tasks.push(tokio::spawn(watch_file(
                "--ssl_config_file",
                path.clone(),
                every,
                contents.clone(),
                stop.clone(),
                |path, text| TlsConfigs::parse(path, text).map_err(|e| e.to_string()),
                move |configs| tls.replace(configs),
            )));
        }
        if let (Some(contents), Some(path)) = (&self.token, &self.options.management_token_file) {
            let auth = self.auth.clone();
            tasks.push(tokio::spawn(watch_file(
                "--management_token_file",
                path.clone(),
                every,
                contents.clone(),
                stop.clone(),
                |path, text| Token::from_file_text(text).map_err(|e| format!("{}: {e}", path.display())),
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
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(RestListener::new(self, listener)?, app).with_graceful_shutdown(stop).await
    }
}

/// What one poll found.
enum Polled<T> {
    Unchanged,
    Unreadable(String),
    Changed(Contents, Result<T, String>),
}

/// Re-reads `path` every `every` and applies contents that changed and parse.
async fn watch_file<T: Send + 'static>(
    flag: &'static str,
    path: PathBuf,
    every: Duration,
    mut last: Contents,
    mut stop: watch::Receiver<bool>,
    parse: fn(&Path, &str) -> Result<T, String>,
    apply: impl Fn(T),
) {
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let (file, previous) = (path.clone(), last.clone());
        // Reading is blocking IO and building a TLS config parses keys: off the async threads.
        let polled = tokio::task::spawn_blocking(move || match std::fs::read_to_string(&file) {
            Err(e) => Polled::Unreadable(e.to_string()),
            Ok(text) if *text == *previous.0 => Polled::Unchanged,
            Ok(text) => {
                let parsed = parse(&file, &text);
                Polled::Changed(Contents(text.into()), parsed)
            }
        })
        .await;
        let path = path.display();
        match polled {
            Ok(Polled::Unchanged) => reported = None,
            Ok(Polled::Unreadable(error)) => {
                if reported.as_ref() != Some(&error) {
                    tracing::error!(flag, %path, %error, "file unreadable; keeping the one in use");
                    reported = Some(error);
                }
            }
            Ok(Polled::Changed(contents, Ok(value))) => {
                apply(value);
                last = contents;
                reported = None;
                tracing::info!(flag, %path, "file changed; new connections and calls use it");
            }
            Ok(Polled::Changed(contents, Err(error))) => {
                // Remembered, so the same bad contents are reported once.
                last = contents;
                reported = None;
                tracing::error!(flag, %path, %error, "file changed but is not valid; keeping the one in use");
            }
            Err(e) => tracing::error!(flag, error = %e, "file poll task failed"),
        }
    }
}
