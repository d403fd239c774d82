//! TLS on the model server's ports from TF Serving's `--ssl_config_file`, over real loopback
//! connections: Predict over TLS, mutual TLS refusing clients without a certificate from
//! custom_ca, REST over TLS with HTTP/1.1, and a rotated certificate presented to new
//! connections without a restart while an invalid file is ignored. The same from PEM files
//! laid out as a Kubernetes Secret volume (`--ssl_cert_file` and friends), renewed the way the
//! kubelet renews them.

#[path = "support/pki.rs"]
mod pki;
mod support;

use std::sync::OnceLock;
use std::time::Duration;

use pki::{Ca, presented_certificate, ssl_config, tls_channel, tls_connect, write_atomically};
use proto::tensorflow::serving::PredictRequest;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use support::*;
use test_support::eventually;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

/// Starts a server on the autoencoder with `ssl.cfg` holding `ssl` and more flags.
async fn start(root: &std::path::Path, ssl: &str, more: &[&str]) -> (TestServer, std::path::PathBuf) {
    let base = model_base(root, "ae", "autoencoder", &[1]);
    let file = root.join("ssl.cfg");
    std::fs::write(&file, ssl).unwrap();
    let mut flags = vec![
        "--model_name=ae".to_owned(),
        format!("--model_base_path={}", base.display()),
        format!("--ssl_config_file={}", file.display()),
    ];
    flags.extend(more.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    (TestServer::start(&flags).await, file)
}

/// Predicts the first golden case; panics if the answer is wrong, errs if the call fails.
async fn predict(channel: Channel) -> Result<(), tonic::Status> {
    let (dims, input, expected) = autoencoder_golden().remove(0);
    let request = PredictRequest {
        model_spec: spec("ae", None, None, ""),
        inputs: [("sensors".to_owned(), float_tensor(&dims, &input))].into(),
        output_filter: vec![],
    };
    let response = PredictionServiceClient::new(channel).predict(request).await?.into_inner();
    assert_close(&response.outputs["output_0"].float_val, &expected, "predict over TLS");
    Ok(())
}

/// A connection plus a call: under TLS 1.3 a client missing a certificate completes its side
/// of the handshake and learns of the refusal on its first read, so either may fail.
async fn connect_and_predict(
    server: &TestServer,
    ca: &Ca,
    client: Option<&pki::Leaf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tls_channel(server.grpc, ca, client).await?;
    predict(channel).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_works_over_tls_and_a_plaintext_client_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (server, _) = start(root.path(), &ssl_config(&ca.server(), None, false), &[]).await;

    predict(tls_channel(server.grpc, &ca, None).await.unwrap()).await.unwrap();

    // gRPC ALPN: h2 is the one protocol offered.
    let stream = tls_connect(server.grpc, &ca, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // An open connection that never sends a request holds the shutdown for its grace period.
    drop(stream);

    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await?;
        predict(channel).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(plaintext.await.is_err(), "a plaintext client got an answer from a TLS port");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_custom_ca() {
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let stranger = Ca::new("another CA");
    let (server, _) = start(root.path(), &ssl_config(&ca.server(), Some(&ca), true), &[]).await;

    let without = connect_and_predict(&server, &ca, None).await;
    assert!(without.is_err(), "a client without a certificate was served");
    let foreign = connect_and_predict(&server, &ca, Some(&stranger.client("alice"))).await;
    assert!(foreign.is_err(), "a client with a certificate from another CA was served");
    connect_and_predict(&server, &ca, Some(&ca.client("alice"))).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_over_tls_with_http1() {
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (server, _) = start(root.path(), &ssl_config(&ca.server(), None, false), &[]).await;

    // A browser-like client offers both; the REST port only speaks HTTP/1.1.
    let mut stream = tls_connect(server.rest, &ca, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    stream.write_all(b"GET /v1/models/ae HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"AVAILABLE\""), "{response}");
    server.stop().await;
}

/// What the server logged, for waiting on its file poller (this binary's tests share it).
fn logs() -> test_support::CapturedLogs {
    static LOGS: OnceLock<test_support::CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = test_support::CapturedLogs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();
        logs
    })
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_presented_to_new_connections_and_an_invalid_file_is_ignored() {
    let logs = logs();
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (first, second) = (ca.server(), ca.server());
    let (server, file) =
        start(root.path(), &ssl_config(&first, None, false), &["--security_files_poll_wait_seconds=1"]).await;
    assert_eq!(presented_certificate(server.grpc, &ca).await.unwrap(), first.der());
    let established = tls_channel(server.grpc, &ca, None).await.unwrap();

    write_atomically(&file, &ssl_config(&second, None, false));
    eventually(Duration::from_secs(30), "the new certificate on a new connection", async || {
        presented_certificate(server.grpc, &ca).await.unwrap() == second.der()
    })
    .await;
    assert_eq!(presented_certificate(server.rest, &ca).await.unwrap(), second.der(), "the REST port too");
    predict(established).await.expect("a connection made before the rotation keeps working");

    // A broken file is reported and changes nothing.
    write_atomically(&file, "server_cert: \"not a certificate\"\n");
    let reported = format!("{}", file.display());
    eventually(Duration::from_secs(30), "the invalid file to be reported", async || {
        let text = logs.text();
        text.lines().any(|line| line.contains(&reported) && line.contains("not valid"))
    })
    .await;
    assert_eq!(presented_certificate(server.grpc, &ca).await.unwrap(), second.der());
    predict(tls_channel(server.grpc, &ca, None).await.unwrap()).await.unwrap();
    server.stop().await;
}

/// Writes a Secret volume's files as the kubelet does: the files in a timestamped directory,
/// `..data` a symlink to it, each key a symlink through `..data`; an update writes a new
/// directory and swaps `..data` with one rename, so the three files change at once.
fn write_secret_volume(dir: &std::path::Path, generation: u32, files: &[(&str, &str)]) {
    let data = dir.join(format!("..2026_12_05_{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let staging = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &staging).unwrap();
    std::fs::rename(&staging, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pem_files_from_a_secret_volume_serve_mutual_tls_and_are_renewed_in_place() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let secret = root.path().join("tls");
    std::fs::create_dir(&secret).unwrap();
    let ca = Ca::new("cluster CA");
    let first = ca.server();
    write_secret_volume(&secret, 1, &[("tls.crt", &first.cert), ("tls.key", &first.key), ("ca.crt", &ca.pem)]);
    let flags = [
        "--model_name=ae".to_owned(),
        format!("--model_base_path={}", base.display()),
        format!("--ssl_cert_file={}", secret.join("tls.crt").display()),
        format!("--ssl_key_file={}", secret.join("tls.key").display()),
        format!("--ssl_client_ca_file={}", secret.join("ca.crt").display()),
        "--ssl_client_verify".to_owned(),
        "--security_files_poll_wait_seconds=1".to_owned(),
    ];
    let server = TestServer::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;

    assert!(connect_and_predict(&server, &ca, None).await.is_err(), "a client without a certificate was served");
    connect_and_predict(&server, &ca, Some(&ca.client("processor"))).await.unwrap();
    assert_eq!(presented_certificate(server.rest, &ca).await.unwrap(), first.der());

    // Renewal: a new key and certificate, swapped in together.
    let second = ca.server();
    write_secret_volume(&secret, 2, &[("tls.crt", &second.cert), ("tls.key", &second.key), ("ca.crt", &ca.pem)]);
    eventually(Duration::from_secs(30), "the renewed certificate on a new connection", async || {
        presented_certificate(server.grpc, &ca).await.unwrap() == second.der()
    })
    .await;
    connect_and_predict(&server, &ca, Some(&ca.client("processor"))).await.unwrap();
    server.stop().await;
}

#[test]
fn pem_file_flags_are_refused_when_incomplete_or_mixed_with_an_ssl_config() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: model_server::config::ServeArgs,
    }
    let parse = |flags: &[&str]| {
        let mut args = vec!["model-server", "--model_name=m", "--model_base_path=/m"];
        args.extend(flags);
        <Cli as clap::Parser>::try_parse_from(args).map(|_| ()).map_err(|e| e.to_string())
    };
    let alone = parse(&["--ssl_cert_file=/s/tls.crt"]).unwrap_err();
    assert!(alone.contains("--ssl_key_file"), "{alone}");
    let mixed = parse(&["--ssl_config_file=/s/ssl.cfg", "--ssl_cert_file=/s/tls.crt", "--ssl_key_file=/s/tls.key"])
        .unwrap_err();
    assert!(mixed.contains("cannot be used with"), "{mixed}");
    let verify_without_ca =
        parse(&["--ssl_cert_file=/s/tls.crt", "--ssl_key_file=/s/tls.key", "--ssl_client_verify"]).unwrap_err();
    assert!(verify_without_ca.contains("--ssl_client_ca_file"), "{verify_without_ca}");
    parse(&["--ssl_cert_file=/s/tls.crt", "--ssl_key_file=/s/tls.key"]).unwrap();
}
