//! TLS on a service's own ports, shared by the model server (gRPC and REST) and ingest
//! (MQTT proxy and HTTP ingest):
//!
//! - [`pem`]: a rustls server config from PEM contents (certificate chain, key, and the CA
//!   that client certificates are verified against, required or optional), with errors
//!   that name the part at fault and never echo a key;
//! - [`subject`]: the verified client certificate's subject and common name;
//! - [`accept`]: an accept loop that runs each handshake in its own task under a timeout,
//!   so a client that never finishes one holds a task, not the port; and an axum listener
//!   over it;
//! - [`watch`]: files re-read while serving, so renewed certificates (cert-manager) apply
//!   to new connections without a restart.

#![forbid(unsafe_code)]

pub mod accept;
pub mod pem;
pub mod subject;
pub mod watch;

pub use accept::{AcceptedTls, TlsListener};
pub use pem::{Part, PemError, server_config};
pub use subject::Subject;

/// ring, as the workspace's rustls is built with (see the root Cargo.toml). rustls 0.23.48
/// deprecated ring's provider because it lacks post-quantum key exchange (X25519MLKEM768,
/// aws-lc-rs only); switching means building aws-lc's C library in every build. Clients get
/// classical (X25519, P-256, P-384) key exchange; moving the workspace to aws-lc-rs is the
/// way to post-quantum.
#[allow(deprecated)]
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
