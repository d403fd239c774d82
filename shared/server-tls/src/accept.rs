//! Accepting TLS connections: each handshake in its own task under a timeout, so a client
//! that never finishes one holds a task, not the accept loop; a bounded number at once.
//! Each handshake takes the config current at that moment, so a renewed certificate
//! applies to new connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client gets to finish its TLS handshake after the TCP accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once per listener; past that, new connections wait in the
/// kernel's listen backlog. Bounds what a flood of never-finishing clients can hold.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// A connection whose handshake finished, and its peer.
pub type AcceptedTls = (TlsStream<TcpStream>, SocketAddr);

/// Accepts connections on `listener` and yields each once its handshake finished, with the
/// config `config` returns when the connection came. `tune` sees every accepted socket
/// (e.g. to set TCP_NODELAY); `port` names the port in log lines. Accepting stops when the
/// receiver is dropped, closing the port.
pub fn spawn(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
    tune: fn(&TcpStream),
    port: &'static str,
) -> mpsc::Receiver<AcceptedTls> {
    // A small queue: a finished handshake waits for the server to take it, as a TCP
    // connection waits in the backlog.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, config, tune, port, tx));
    rx
}

async fn accept_loop(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig>,
    tune: fn(&TcpStream),
    port: &'static str,
    tx: mpsc::Sender<AcceptedTls>,
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
        tune(&tcp);
        let acceptor = TlsAcceptor::from(config());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                // Worth seeing when a client's certificate or trust is wrong; a port scan
                // shows up here too, hence info and not warn.
                Ok(Err(e)) => tracing::info!(port, %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(
                    port,
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
async fn accept_failed(port: &'static str, e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(port, error = %e, "accept failed; pausing 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A port's TLS connections as an axum listener, so `axum::serve` serves them as it serves
/// a `TcpListener`.
#[derive(Debug)]
pub struct TlsListener {
    connections: mpsc::Receiver<AcceptedTls>,
    local: SocketAddr,
}

impl TlsListener {
    /// See [`spawn`] for the arguments.
    pub fn new(
        listener: TcpListener,
        config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
        tune: fn(&TcpStream),
        port: &'static str,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self { connections: spawn(listener, config, tune, port), local })
    }
}

impl axum::serve::Listener for TlsListener {
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
