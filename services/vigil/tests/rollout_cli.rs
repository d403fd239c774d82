//! The `vigil rollout` binary against a model server started in this process on both
//! bundled car-anomaly versions: every command's exit code and output, the server's errors
//! passed through naming their field, a watch that ends on a finished rollout and rides
//! out a server restart, an unreachable server named together with the way to point
//! elsewhere, and a TLS server requiring a management token.

use std::path::PathBuf;

use clap::Parser as _;
use serde_json::Value;
use tokio::sync::oneshot;

#[path = "../../model-server/tests/support/pki.rs"]
mod pki;
mod support;

use support::{Run, assert_unreachable, words};

#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: model_server::config::ServeArgs,
}

/// A model server in this process, serving every bundled version of car-anomaly.
struct Server {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _config: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        Self::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), &[]).await
    }

    /// A server on `grpc` with more model server flags.
    async fn start_on(grpc: tokio::net::TcpListener, more_flags: &[String]) -> Self {
        let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/models/car-anomaly");
        let config = tempfile::tempdir().unwrap();
        let file = config.path().join("models.config");
        std::fs::write(&file, model_server::model_config::all_versions_config("car-anomaly", &models).unwrap())
            .unwrap();
        let mut flags = vec!["model-server".to_owned(), format!("--model_config_file={}", file.display())];
        flags.extend_from_slice(more_flags);
        let server_config = ServeCli::try_parse_from(flags).unwrap().serve.resolve().unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = model_server::server::Listeners { grpc, rest: None };
        let task = tokio::spawn(model_server::server::run(server_config, listeners, async {
            let _ = stopped.await;
        }));
        Self { url, stop, task, _config: config }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Runs `vigil rollout <args>`, with `VIGIL_MODEL_SERVER` set when given.
async fn vigil(env_server: Option<&str>, args: &[&str]) -> Run {
    let mut all = vec!["rollout"];
    all.extend_from_slice(args);
    let env: Vec<_> = env_server.map(|server| ("VIGIL_MODEL_SERVER", server)).into_iter().collect();
    support::vigil(&all, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_cli_steers_a_rollout_and_passes_the_servers_errors_through() {
    let server = Server::start().await;
    let url = server.url.as_str();
    let rollout = |args: &'static [&'static str]| {
        let mut all = vec!["--server", url];
        all.extend_from_slice(args);
        async move { vigil(None, &all).await }
    };

    let started = rollout(&["start", "car-anomaly", "--stable", "2", "--canary", "1", "--weight", "10"]).await;
    assert_eq!(started.code, 0, "{}", started.stderr);
    assert_eq!(started.field("phase"), "manual");
    assert_eq!(started.field("canary weight"), "10%");
    assert_eq!(started.field("versions"), "stable 2 -> canary 1");

    let status = rollout(&["--json", "status", "car-anomaly"]).await.json();
    assert_eq!((status["revision"].as_u64(), status["canary_weight_percent"].as_f64()), (Some(1), Some(10.0)));
    assert_eq!((&status["phase"], &status["spec"]["analysis"]), (&Value::from("manual"), &Value::Null));

    // The server judges ranges; its message, naming the field, is what the user sees.
    let too_much = rollout(&["set-weight", "car-anomaly", "150"]).await;
    assert_eq!(too_much.code, 1);
    assert!(too_much.stderr.starts_with("error: invalid argument: canary_weight_percent"), "{}", too_much.stderr);

    let weight = rollout(&["set-weight", "--json", "car-anomaly", "40"]).await.json();
    assert_eq!((weight["revision"].as_u64(), weight["canary_weight_percent"].as_f64()), (Some(2), Some(40.0)));

    // The environment names the server as well as --server does.
    let listed = vigil(Some(url), &["list"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert_eq!(listed.stdout.lines().count(), 1, "{}", listed.stdout);
    assert!(listed.stdout.starts_with("car-anomaly  manual"), "{}", listed.stdout);

    let promoted = rollout(&["promote", "car-anomaly"]).await;
    assert_eq!((promoted.code, promoted.field("phase")), (0, "promoted"));
    let again = rollout(&["promote", "car-anomaly"]).await;
    assert_eq!(again.code, 1);
    assert!(again.stderr.starts_with("error: failed precondition: "), "{}", again.stderr);
    assert!(again.stderr.contains("is over"), "{}", again.stderr);

    let watched = rollout(&["watch", "car-anomaly"]).await;
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    assert_eq!(watched.stdout.lines().count(), 1, "{}", watched.stdout);
    assert!(watched.stdout.contains("revision 3: promoted, canary 100%"), "{}", watched.stdout);

    // A finished rollout makes way for the next; analysis options imply --analysis, and the
    // server fills in the defaults of the ones not given.
    let line = format!("--server {url} start car-anomaly --stable 1 --canary 2 --steps 5,25 --interval-seconds 1");
    let analysed = vigil(None, &words(&line)).await;
    assert_eq!(analysed.code, 0, "{}", analysed.stderr);
    assert!(analysed.field("analysis").starts_with("steps 5% 25%, a check every 1 s"), "{}", analysed.stdout);
    let status = rollout(&["status", "car-anomaly", "--json"]).await.json();
    let plan = &status["spec"]["analysis"];
    assert_eq!(plan["step_weights_percent"], serde_json::json!([5.0, 25.0]));
    let counts = ["interval_seconds", "failure_limit", "min_samples"].map(|field| plan[field].as_u64());
    assert_eq!(counts, [Some(1), Some(2), Some(200)], "the server's defaults fill the rest");
    assert_eq!((status["phase"].as_str(), status["revision"].as_u64()), (Some("progressing"), Some(4)));

    // A watch follows a live rollout until it ends, whenever the end comes.
    let (watched, aborted) = tokio::join!(
        rollout(&["watch", "car-anomaly"]),
        rollout(&["abort", "car-anomaly", "--reason", "testing the watch"]),
    );
    assert_eq!((aborted.code, aborted.field("phase")), (0, "aborted"));
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    let last = watched.stdout.lines().last().unwrap_or_default();
    assert!(last.contains("revision 5: aborted, canary 0%: aborted by hand: testing the watch"), "{}", watched.stdout);

    let unreachable = vigil(None, &["--server", "http://127.0.0.1:1", "list"]).await;
    assert_unreachable(&unreachable, 1, "model server", "http://127.0.0.1:1", "--server", "VIGIL_MODEL_SERVER");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_rides_out_a_model_server_restart() {
    // Rollout state on Kafka, as replicas keep it, so the restarted server carries on with
    // the same rollout; it comes back on the same address, as a pod behind its Service.
    let kafka = embedded_brokers::KafkaCluster::start(1).unwrap();
    kafka.create_topic("vigil.rollout-state", 1).unwrap();
    kafka.create_topic("vigil.rollout-events", 1).unwrap();
    let flags = [format!("--rollout_kafka_brokers={}", kafka.bootstrap_servers())];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = Server::start_on(listener, &flags).await;
    let url = server.url.clone();
    let started =
        vigil(Some(&url), &["start", "car-anomaly", "--stable", "1", "--canary", "2", "--weight", "10"]).await;
    assert_eq!(started.code, 0, "{}", started.stderr);

    let (watched, restarted) = tokio::join!(vigil(Some(&url), &["watch", "car-anomaly"]), async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        server.stop().await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let server = Server::start_on(listener, &flags).await;
        let aborted = vigil(Some(&url), &["abort", "car-anomaly", "--reason", "after the restart"]).await;
        assert_eq!((aborted.code, aborted.field("phase")), (0, "aborted"), "{}", aborted.stderr);
        server
    });
    assert_eq!(watched.code, 0, "the watch ended with the rollout: {}", watched.stderr);
    assert!(
        watched.stderr.contains("does not answer") && watched.stderr.contains("answers again"),
        "{}",
        watched.stderr
    );
    let lines: Vec<&str> = watched.stdout.lines().collect();
    assert!(lines[0].contains("revision 1: manual, canary 10%"), "{}", watched.stdout);
    assert!(lines.last().unwrap().contains("aborted by hand: after the restart"), "{}", watched.stdout);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_cli_dials_tls_sends_its_token_and_says_what_is_missing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("test CA");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ssl = write("ssl.cfg", &pki::ssl_config(&ca.server(), None, false));
    let ca_file = write("ca.pem", &ca.pem);
    let token = write("token", "rollout-token\n");
    let wrong = write("wrong", "not-the-token\n");
    let flags = [format!("--ssl_config_file={ssl}"), format!("--management_token_file={token}")];
    let server = Server::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), &flags).await;
    let address = server.url.trim_start_matches("http://").to_owned();
    let https = format!("https://{address}");
    let start = ["start", "car-anomaly", "--stable", "2", "--canary", "1", "--weight", "10"];
    let with = |dial: &[&str], command: &[&str]| {
        let mut all: Vec<String> = dial.iter().map(|s| (*s).to_owned()).collect();
        all.extend(command.iter().map(|s| (*s).to_owned()));
        async move { vigil(None, &all.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    // A bare address with --ca-file dials TLS; reads need no token.
    let listed = with(&["--server", &address, "--ca-file", &ca_file, "--token-file", &token], &["list"]).await;
    assert_eq!((listed.code, listed.stdout.trim()), (0, "no rollouts"), "{}", listed.stderr);

    let refused = with(&["--server", &https, "--ca-file", &ca_file], &start).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.starts_with("error: unauthenticated: "), "{}", refused.stderr);
    assert!(refused.stderr.contains("--token-file PATH"), "the error says how to fix it: {}", refused.stderr);
    let denied = with(&["--server", &https, "--ca-file", &ca_file, "--token-file", &wrong], &start).await;
    assert!(denied.stderr.starts_with("error: permission denied: "), "{}", denied.stderr);

    let started = with(&["--server", &https, "--ca-file", &ca_file, "--token-file", &token], &start).await;
    assert_eq!((started.code, started.field("phase")), (0, "manual"), "{}", started.stderr);

    // TLS needs the CA; a plaintext dial of a TLS port does not get through.
    let no_ca = with(&["--server", &https], &["list"]).await;
    assert_eq!(no_ca.code, 1);
    assert!(no_ca.stderr.contains("give --ca-file"), "{}", no_ca.stderr);
    let plaintext = with(&["--server", &server.url], &["list"]).await;
    assert_eq!(plaintext.code, 1, "{}", plaintext.stdout);

    // Through a port-forward the URL's host is not the certificate's name: --tls-server-name
    // says which name to check (the test certificate names localhost, not "model-server").
    let named = with(&["--server", &https, "--ca-file", &ca_file, "--tls-server-name", "localhost"], &["list"]).await;
    assert_eq!(named.code, 0, "{}", named.stderr);
    let misnamed =
        with(&["--server", &https, "--ca-file", &ca_file, "--tls-server-name", "model-server"], &["list"]).await;
    assert_eq!(misnamed.code, 1, "a certificate that does not name model-server was accepted: {}", misnamed.stdout);
    server.stop().await;
}
