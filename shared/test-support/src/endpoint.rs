//! A service's operations endpoint as a test sees it: `/ready` (is the service able to do
//! its job), `/metrics` (what it has done) and any other path served beside them (the model
//! server's REST API). Every service serves these (`admin`), in this process or as a child
//! process; the model server on its REST port.

use std::fmt;
use std::time::Duration;

use crate::wait::eventually;

/// A service's HTTP endpoint. It keeps one HTTP client, so polling it reuses a connection
/// (create it on the runtime that uses it: the client's connections belong to that
/// runtime).
#[derive(Debug, Clone)]
pub struct Endpoint {
    base: String,
    http: reqwest::Client,
}

impl Endpoint {
    /// `address`: `host:port`, or a URL such as `http://host:port`.
    pub fn new(address: impl fmt::Display) -> Self {
        let address = address.to_string();
        let base = if address.contains("://") {
            address.trim_end_matches('/').to_owned()
        } else {
            format!("http://{address}")
        };
        Self { base, http: reqwest::Client::new() }
    }

    /// `http://host:port`, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The status of `GET path` (`/ready`...); 0 when nothing answered.
    pub async fn status(&self, path: &str) -> u16 {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The body of `GET path`; panics unless the answer is a success.
    pub async fn text(&self, path: &str) -> String {
        let url = format!("{}{path}", self.base);
        let response = self.http.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        assert!(status.is_success(), "GET {url}: {status}: {body}");
        body
    }

    /// Whether `/ready` answers with a success.
    pub async fn is_ready(&self) -> bool {
        (200..300).contains(&self.status("/ready").await)
    }

    /// Waits until `/ready` answers with a success; panics naming `service` after `within`.
    pub async fn wait_ready(&self, service: &str, within: Duration) {
        let what = format!("{service} to be ready ({}/ready)", self.base);
        eventually(within, &what, async || self.is_ready().await).await;
    }

    /// The `/metrics` page (Prometheus text format); panics unless it is served.
    pub async fn metrics(&self) -> String {
        self.text("/metrics").await
    }

    /// An unlabelled metric's value, or the sum over a labelled one's series; 0 when absent
    /// (`admin::metric_sum` over [`Endpoint::metrics`]).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        admin::metric_sum(&self.metrics().await, name)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_or_a_url_names_the_same_endpoint() {
        assert_eq!(Endpoint::new("127.0.0.1:9000").url(), "http://127.0.0.1:9000");
        assert_eq!(Endpoint::new("http://127.0.0.1:9000/").url(), "http://127.0.0.1:9000");
        let address: std::net::SocketAddr = ([127, 0, 0, 1], 9000).into();
        assert_eq!(Endpoint::new(address).to_string(), "http://127.0.0.1:9000");
    }

    #[tokio::test]
    async fn an_endpoint_with_nothing_behind_it_answers_status_0() {
        // Port 1 (tcpmux): nothing serves it on a loopback interface, as the CLI tests assume.
        let endpoint = Endpoint::new("127.0.0.1:1");
        assert_eq!(endpoint.status("/ready").await, 0);
        assert!(!endpoint.is_ready().await);
    }

    #[tokio::test]
    async fn readiness_and_metrics_come_from_the_admin_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::new(listener.local_addr().unwrap());
        let registry = prometheus_registry_with_a_counter();
        let readiness = admin::Readiness::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(admin::serve(listener, registry, readiness.clone(), async {
            let _ = stopped.await;
        }));
        assert_eq!(endpoint.status("/ready").await, 503);
        readiness.set(true);
        endpoint.wait_ready("the admin endpoint", Duration::from_secs(10)).await;
        assert_eq!(endpoint.metric_sum("test_support_things_total").await, 2.0);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    fn prometheus_registry_with_a_counter() -> prometheus::Registry {
        let registry = prometheus::Registry::new();
        let counter = prometheus::IntCounter::new("test_support_things_total", "Things.").unwrap();
        counter.inc_by(2);
        registry.register(Box::new(counter)).unwrap();
        registry
    }
}
