//! The endpoint over real HTTP on a loopback port: liveness always, readiness following
//! the latch, metrics in Prometheus' text format.

use admin::Readiness;
use prometheus::{IntCounter, Registry};

#[tokio::test]
async fn ready_follows_the_latch_and_metrics_render_the_registry() {
    let registry = Registry::new();
    let counter = IntCounter::new("things_done_total", "Things done").unwrap();
    registry.register(Box::new(counter.clone())).unwrap();
    counter.inc_by(3);
    let readiness = Readiness::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(admin::serve(listener, registry, readiness.clone(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let request = http.get(format!("{base}{path}"));
        async move { request.send().await.unwrap().status().as_u16() }
    };

    assert_eq!(status("/live").await, 200);
    assert_eq!(status("/ready").await, 503, "not ready until the service says so");
    readiness.set(true);
    assert_eq!(status("/ready").await, 200);
    readiness.set(false);
    assert_eq!(status("/ready").await, 503, "draining clears readiness");

    let body = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(body.contains("# TYPE things_done_total counter"), "{body}");
    assert!(body.contains("things_done_total 3"), "{body}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
