//! Who can talk to the model server, and over what: TLS (optionally mutual) on both ports
//! from `--ssl_config_file` or PEM files ([`tls`]), and credentials for the calls that change what is
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use auth::{ManagementAuth, Token};
pub use tls::TlsSource;
use tls::{Port, RestListener, Tls};

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

/// Files' contents as last read, to notice a change. Never printed: they hold keys and
/// tokens.
#[derive(Clone, PartialEq, Eq)]
struct Contents(Arc<[String]>);

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
        let tls = match &options.tls {
            Some(source) => {
                let contents = source.read()?;
                let configs = source.parse(&contents)?;
                if !options.management_allowed_subjects.is_empty() && !configs.verifies_clients {
                    return Err(SecurityError::SubjectsWithoutClientCertificates);
                }
                Some((Tls::new(configs), Contents(contents.into())))
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
                (Some(token), Some(Contents(vec![text].into())))
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

/// Files being re-read: which (for the log), how often, their contents in use, until when.
struct Watched {
    what: String,
    every: Duration,
    last: Contents,
    stop: watch::Receiver<bool>,
}

/// Re-reads files every `every` and applies contents that changed and parse.
async fn watch_files<T: Send + 'static>(
    watched: Watched,
    read: impl Fn() -> Result<Vec<String>, String> + Send + Sync + 'static,
    parse: impl Fn(&[String]) -> Result<T, String> + Send + Sync + 'static,
    apply: impl Fn(T),
) {
    let Watched { what, every, mut last, mut stop } = watched;
    let (read, parse) = (Arc::new(read), Arc::new(parse));
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let (read, parse, previous) = (read.clone(), parse.clone(), last.clone());
        // Reading is blocking IO and building a TLS config parses keys: off the async threads.
        let polled = tokio::task::spawn_blocking(move || match read() {
            Err(e) => Polled::Unreadable(e),
            Ok(contents) if *contents == *previous.0 => Polled::Unchanged,
            Ok(contents) => {
                let parsed = parse(&contents);
                Polled::Changed(Contents(contents.into()), parsed)
            }
        })
        .await;
        match polled {
            Ok(Polled::Unchanged) => reported = None,
            Ok(Polled::Unreadable(error)) => {
                if reported.as_ref() != Some(&error) {
                    tracing::error!(files = %what, %error, "file unreadable; keeping the one in use");
                    reported = Some(error);
                }
            }
            Ok(Polled::Changed(contents, Ok(value))) => {
                apply(value);
                last = contents;
                reported = None;
                tracing::info!(files = %what, "file changed; new connections and calls use it");
            }
            Ok(Polled::Changed(contents, Err(error))) => {
                // Remembered, so the same bad contents are reported once.
                last = contents;
                reported = None;
                tracing::error!(files = %what, %error, "file changed but is not valid; keeping the one in use");
            }
            Err(e) => tracing::error!(files = %what, error = %e, "file poll task failed"),
        }
    }
}
