//! Finding the model server's replicas, and keeping calls away from one that is down.
//!
//! Every configured endpoint is a host and port; the host is resolved again every
//! refresh, and each address becomes one replica (a headless Kubernetes Service resolves
//! to its ready pods). Changes feed tower's power-of-two-choices balancer as a
//! [`tower::discover::Change`] stream. Each replica is a lazily connecting tonic
//! `Channel`, measured by its pending requests, behind [`Eject`]: after a connection
//! failure the replica reports itself not ready for a while, so the balancer picks the
//! others instead of the replica that fails fastest.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::Service;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};

/// A configured endpoint: `http://host:port`, or `https://host:port` for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(format!("{text:?}: use http://host:port, or https://host:port for TLS")),
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("{text:?}: no host"))?;
        let port = url.port().ok_or_else(|| format!("{text:?}: no port"))?;
        Ok(Self { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port, tls })
    }
}

/// Reads the client TLS settings for `https://` endpoints: the CA the model server's
/// certificate chains to, and optionally a client certificate for mutual TLS. Errors name
/// the file.
pub fn client_tls(
    ca_file: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<ClientTlsConfig, String> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_file)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// One replica as the balancer sees it.
pub type Replica = PendingRequests<Eject<Channel>>;

/// The replica set as a discovery stream for `tower::balance::p2c::Balance`.
pub type ReplicaChanges =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<Change<SocketAddr, Replica>, Infallible>> + Send>>;

/// Starts resolving `targets` every `refresh`; the stream ends when the task is aborted.
/// `tls` is used for `https://` targets (each replica is dialled by address, with the
/// target's host name as the name its certificate must carry).
pub fn discover(
    targets: Vec<Target>,
    refresh: Duration,
    eject_for: Duration,
    replicas: prometheus::IntGauge,
    tls: Option<ClientTlsConfig>,
) -> (ReplicaChanges, tokio::task::JoinHandle<()>) {
    let (changes, receiver) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut known: BTreeSet<SocketAddr> = BTreeSet::new();
        // Which target an address came from: its host names the certificate for TLS.
        let mut origin: std::collections::HashMap<SocketAddr, &Target> = std::collections::HashMap::new();
        loop {
            let mut found = BTreeSet::new();
            let mut failed = false;
            for target in &targets {
                match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                    Ok(addresses) => {
                        for address in addresses {
                            origin.insert(address, target);
                            found.insert(address);
                        }
                    }
                    Err(error) => {
                        failed = true;
                        tracing::warn!(host = %target.host, %error, "resolving a model server endpoint failed");
                    }
                }
            }
            // A failed lookup keeps what it had rather than dropping every replica.
            if failed {
                found.extend(known.iter().copied());
            }
            for gone in known.difference(&found) {
                tracing::info!(address = %gone, "model server replica gone");
                if changes.send(Change::Remove(*gone)).await.is_err() {
                    return;
                }
            }
            for new in found.difference(&known) {
                tracing::info!(address = %new, "model server replica found");
                let target = origin.get(new).copied();
                let scheme = if target.is_some_and(|t| t.tls) { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{new}"))
                    .expect("a socket address is a valid URI")
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true);
                if let (Some(target), Some(tls)) = (target.filter(|t| t.tls), &tls) {
                    endpoint = match endpoint.tls_config(tls.clone().domain_name(target.host.clone())) {
                        Ok(endpoint) => endpoint,
                        Err(error) => {
                            tracing::error!(address = %new, %error, "the model server TLS settings are unusable");
                            continue;
                        }
                    };
                }
                let channel = endpoint.connect_lazy();
                let replica = PendingRequests::new(Eject::new(channel, eject_for), CompleteOnResponse::default());
                if changes.send(Change::Insert(*new, replica)).await.is_err() {
                    return;
                }
            }
            known = found;
            replicas.set(known.len() as i64);
            // Until something is found, look again soon.
            let wait = if known.is_empty() { refresh.min(Duration::from_secs(1)) } else { refresh };
            tokio::time::sleep(wait).await;
        }
    });
    (Box::pin(ReceiverStream::new(receiver).map(Ok)), task)
}

/// Takes a replica out of rotation for `eject_for` after a call failed to reach it (a
/// transport error, not a gRPC status: a status means the replica answered).
pub struct Eject<S> {
    inner: S,
    eject_for: Duration,
    down_until: Arc<Mutex<Option<Instant>>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: Clone> Clone for Eject<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), eject_for: self.eject_for, down_until: self.down_until.clone(), sleep: None }
    }
}

impl<S> Eject<S> {
    pub fn new(inner: S, eject_for: Duration) -> Self {
        Self { inner, eject_for, down_until: Arc::new(Mutex::new(None)), sleep: None }
    }
}

impl<S, Request> Service<Request> for Eject<S>
where
    S: Service<Request>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let until = *self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until
            && Instant::now() < until
        {
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            sleep.as_mut().reset(until);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sleep = None;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let future = self.inner.call(request);
        let (down_until, eject_for) = (self.down_until.clone(), self.eject_for);
        Box::pin(async move {
            let result = future.await;
            if result.is_err() {
                *down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + eject_for);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_mistakes_are_named() {
        assert_eq!(
            Target::parse("http://model-server:8500").unwrap(),
            Target { host: "model-server".into(), port: 8500, tls: false }
        );
        assert_eq!(
            Target::parse("https://model-server:8500").unwrap(),
            Target { host: "model-server".into(), port: 8500, tls: true }
        );
        assert_eq!(Target::parse("http://[::1]:9").unwrap().host, "::1");
        assert!(Target::parse("ftp://x:1").unwrap_err().contains("https://host:port"));
        assert!(Target::parse("http://x").unwrap_err().contains("no port"));
        assert!(Target::parse("x:1").is_err());
    }

    #[tokio::test]
    async fn a_name_becomes_one_replica_per_address() {
        let gauge = prometheus::IntGauge::new("replicas", "replicas").unwrap();
        let targets = vec![Target::parse("http://127.0.0.1:7").unwrap(), Target::parse("http://127.0.0.2:7").unwrap()];
        let (mut stream, task) =
            discover(targets, Duration::from_secs(60), Duration::from_secs(1), gauge.clone(), None);
        let mut inserted = Vec::new();
        while inserted.len() < 2 {
            match stream.next().await.unwrap().unwrap() {
                Change::Insert(address, _) => inserted.push(address),
                Change::Remove(address) => panic!("removed {address}"),
            }
        }
        inserted.sort();
        assert_eq!(inserted, ["127.0.0.1:7".parse().unwrap(), "127.0.0.2:7".parse::<SocketAddr>().unwrap()]);
        assert_eq!(gauge.get(), 2);
        task.abort();
    }
}
