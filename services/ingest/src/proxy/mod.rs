//! MQTT proxy mode: devices connect to ingest itself (MQTT 3.1.1 or 5, QoS 0, 1 and 2)
//! and each PUBLISH is acknowledged once Kafka has its record, with no MQTT broker in
//! between. Replicas share nothing (no sessions are kept: every CONNACK says "no session
//! present"), so they scale out behind one Service, and a killed replica loses nothing it
//! acknowledged.
//!
//! [`wire`] reads and writes packets, [`access`] holds logins and the ACL, [`connection`]
//! serves one device; this module accepts connections within the connection limit and
//! drains them at shutdown. See docs/mqtt-proxy.md.

pub mod access;
pub mod connection;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::IngestError;
use crate::config::IngestConfig;
use crate::kafka::{Sink, SinkError};
use crate::metrics::Metrics;
use crate::routing::Routes;

/// The shared state of every connection, from `config`.
pub fn shared(
    config: &IngestConfig,
    routes: Arc<Routes>,
    sink: Sink,
    metrics: Metrics,
) -> Result<Arc<connection::Shared>, IngestError> {
    let proxy = &config.mqtt_proxy;
    let users = match &proxy.users_file {
        Some(path) => Some(
            access::Users::from_file(path).map_err(|e| IngestError::Config(format!("mqtt_proxy.users_file: {e}")))?,
        ),
        None => None,
    };
    let acl = access::Acl::new(&proxy.acl).map_err(|e| IngestError::Config(format!("mqtt_proxy.acl: {e}")))?;
    let verified = match proxy.device_id_from {
        access::DeviceIdFrom::ClientId => false,
        access::DeviceIdFrom::Username => users.is_some(),
        access::DeviceIdFrom::CertificateCn => true,
    };
    if !acl.is_open() && !verified {
        tracing::warn!(
            device_id_from = ?proxy.device_id_from,
            "mqtt_proxy.acl checks an identity the client only claims: use username with users_file, or \
             certificate-cn with client certificates, for one the proxy verifies"
        );
    }
    Ok(Arc::new(connection::Shared {
        sink,
        routes,
        metrics,
        config: proxy.clone(),
        dead_letter_topic: config.dead_letter_topic.clone(),
        event_time: config.event_time,
        max_payload_bytes: config.mqtt.max_payload_bytes,
        users,
        acl,
        in_flight: Arc::new(Semaphore::new(proxy.max_in_flight_bytes)),
        fatal: watch::channel(None).0,
        assigned_ids: std::sync::atomic::AtomicU64::new(0),
    }))
}

/// Finishes the TLS handshake (within the CONNECT timeout, the connection's slot held)
/// and serves the connection, the verified client certificate's common name its identity
/// when `device_id_from` says so.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    tls: &crate::tls::ServerTls,
    shared: Arc<connection::Shared>,
    draining: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let timeout = Duration::from_secs(shared.config.connect_timeout_seconds);
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let common_name = server_tls::Subject::of_peer(stream.get_ref().1).and_then(|s| s.common_name);
            connection::serve(stream, common_name, shared, draining).await;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "MQTT proxy: TLS handshake failed");
            shared.metrics.proxy_connects_refused.with_label_values(&["tls_handshake"]).inc();
        }
        Err(_) => shared.metrics.proxy_connects_refused.with_label_values(&["connect_timeout"]).inc(),
    }
}

/// Accepts device connections until `draining` fires, then lets every connection answer
/// what Kafka confirms within `grace` and closes the rest. Fails when the producer failed
/// fatally (the connections were closed unacknowledged).
pub async fn run(
    listener: TcpListener,
    tls: Option<crate::tls::ServerTls>,
    shared: Arc<connection::Shared>,
    mut draining: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), SinkError> {
    let connections = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    let mut fatal = shared.fatal.subscribe();
    let for_connections = draining.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
                    shared.metrics.proxy_connects_refused.with_label_values(&["connection_limit"]).inc();
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (shared, draining, tls) = (Arc::clone(&shared), for_connections.clone(), tls.clone());
                tasks.spawn(async move {
                    match tls {
                        None => connection::serve(stream, None, shared, draining).await,
                        Some(tls) => serve_tls(stream, &tls, shared, draining).await,
                    }
                    drop(slot);
                });
            }
            // Reap finished connections so the set stays as large as what is open.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = draining.wait_for(|d| *d) => break,
            _ = fatal.wait_for(Option::is_some) => break,
        }
    }
    drop(listener);
    let open = tasks.len();
    if open > 0 {
        tracing::info!(connections = open, "MQTT proxy draining: answering what Kafka confirms");
    }
    let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(connections = tasks.len(), "grace period over: closing MQTT proxy connections unanswered");
        tasks.shutdown().await;
    }
    match fatal.borrow().clone() {
        Some(reason) => Err(SinkError::Fatal(reason)),
        None => Ok(()),
    }
}
