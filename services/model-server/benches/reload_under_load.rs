//! Loading a large model must not disturb serving of the others, and unloading it must
//! give its memory back. With clients driving Predict on the small autoencoder, this
//! measures the autoencoder's p50/p99 in three windows (steady state, while a ~100 MB
//! model loads through HandleReloadConfigRequest, after it unloads) and the process RSS
//! before, with and after the large model.
//!
//! Run via `bash benchmarks/model-server-reload.sh` (it exports the large model with
//! TensorFlow and passes its directory as VIGIL_LARGE_MODEL).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod support;

use model_server::server::{self, Listeners};
use proto::tensorflow::serving::file_system_storage_path_source_config::ServableVersionPolicy;
use proto::tensorflow::serving::file_system_storage_path_source_config::servable_version_policy::{
    Latest, PolicyChoice,
};
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{GetModelStatusRequest, ModelConfig, ModelSpec, PredictRequest};
use serde_json::json;
use tokio::sync::Mutex;

// The allocator the server binary uses (see src/main.rs): it gives freed pages back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENTS: usize = 8;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn model_config(name: &str, base: &Path) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        base_path: base.display().to_string(),
        model_platform: "tensorflow".into(),
        model_version_policy: Some(ServableVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        }),
        ..Default::default()
    }
}

fn predict() -> PredictRequest {
    support::autoencoder_request(vec![0.25; 18])
}

fn percentiles(mut latencies: Vec<Duration>) -> serde_json::Value {
    latencies.sort();
    let pct = |p| support::percentile_us(&latencies, p);
    json!({ "requests": latencies.len(), "p50_us": pct(0.5).round(), "p99_us": pct(0.99).round(), "max_us": pct(1.0).round() })
}

fn main() {
    let large = PathBuf::from(std::env::var("VIGIL_LARGE_MODEL").expect("set VIGIL_LARGE_MODEL to the exported model"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let small = root.join("tests/fixtures/savedmodels/autoencoder");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let report = runtime.block_on(async {
        let args = ["--model_name=autoencoder".to_owned(), format!("--model_base_path={}", small.display())];
        let config = support::serve_config(&args);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(config, Listeners { grpc: listener, rest: None }, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

        // Clients record every latency into the window that is current when they finish.
        let window: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicBool::new(true));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (channel, window, running) = (channel.clone(), window.clone(), running.clone());
                tokio::spawn(async move {
                    let mut client = PredictionServiceClient::new(channel);
                    while running.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        client.predict(predict()).await.expect("no request fails while models load and unload");
                        window.lock().await.push(started.elapsed());
                    }
                })
            })
            .collect();
        let take = || async { std::mem::take(&mut *window.lock().await) };

        tokio::time::sleep(Duration::from_secs(1)).await;
        take().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let steady = percentiles(take().await);
        let rss_before = rss_mib();

        let mut models = ModelServiceClient::new(channel.clone());
        let started = Instant::now();
        models.handle_reload_config_request(support::reload_request(vec![model_config("autoencoder", &small), model_config("large", &large)])).await.unwrap();
        let load_seconds = started.elapsed().as_secs_f64();
        let during_load = percentiles(take().await);
        let rss_loaded = rss_mib();

        models.handle_reload_config_request(support::reload_request(vec![model_config("autoencoder", &small)])).await.unwrap();
        // Unloading completes when the last in-flight request on it is done (a generous
        // limit: the large model's size is the caller's).
        test_support::Poll::within(Duration::from_secs(300))
            .every(Duration::from_millis(20))
            .until("the large model to unload", async || {
                let status = models
                    .get_model_status(GetModelStatusRequest { model_spec: Some(ModelSpec { name: "large".into(), ..Default::default() }) })
                    .await;
                status.map(|s| s.into_inner().model_version_status.iter().all(|v| v.state == 50)).unwrap_or(true)
            })
            .await;
        take().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after_unload = percentiles(take().await);
        let rss_after = rss_mib();

        running.store(false, Ordering::Relaxed);
        for client in clients {
            client.await.unwrap();
        }
        let _ = stop.send(());
        let _ = server.await;
        json!({
            "benchmark": "autoencoder Predict latency while a large model loads and unloads; process RSS",
            "clients": CLIENTS,
            "large_model_load_seconds": (load_seconds * 100.0).round() / 100.0,
            "latency": { "steady": steady, "during_large_load": during_load, "after_unload": after_unload },
            "rss_mib": { "before": rss_before.round(), "large_loaded": rss_loaded.round(), "after_unload": rss_after.round() },
        })
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let out = root.join("benchmarks/results/model-server-reload.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
