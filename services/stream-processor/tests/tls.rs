//! The processor scoring through a model server that speaks only mutual TLS (TF Serving's
//! `--ssl_config_file` with `client_verify: true`): `https://` endpoints, the CA to trust and
//! the processor's own client certificate from its config.

mod support;

#[path = "../../model-server/tests/support/pki.rs"]
mod pki;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_scored_through_a_model_server_that_requires_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("vigil test CA");
    let ssl = dir.path().join("ssl.cfg");
    std::fs::write(&ssl, pki::ssl_config(&ca.server(), Some(&ca), true)).unwrap();
    let client = ca.client("stream-processor");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server = ModelServer::start(&[&format!("--ssl_config_file={}", ssl.display())]).await;
    let kafka = kafka();
    let mut config = config(&kafka, &[]);
    // By host name: the certificate names localhost, and the processor checks it.
    config.model.endpoints = vec![format!("https://localhost:{}", server.grpc.port())];
    config.model.tls_ca_file = Some(write("ca.pem", &ca.pem));
    config.model.tls_cert_file = Some(write("client.pem", &client.cert));
    config.model.tls_key_file = Some(write("client.key", &client.key));
    let processor = Processor::start(config).await;
    let readings = fleet_readings(5, 20, 3);
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored once");
    processor.stop().await;
    server.stop().await;
}

#[test]
fn an_https_endpoint_without_a_ca_is_refused_naming_the_field() {
    use stream_processor::config::ServiceConfig as _;
    let mut config = stream_processor::config::ProcessorConfig::default();
    config.model.endpoints = vec!["https://model-server:8500".into()];
    let error = config.check().unwrap_err().0;
    assert!(error.contains("model.tls_ca_file"), "{error}");
}
