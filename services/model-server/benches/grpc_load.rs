//! Load benchmark: Predict requests/s and latency at several concurrency levels, for the
//! model server with batching off and on (and, batching off, with its overload limits
//! lifted, with a management token, and over TLS: to price each), side by side with a no-op tonic server (the same PredictionService answering an
//! echo without any inference) as the ceiling that gRPC itself allows on this machine.
//! Client and servers share the machine's cores.
//!
//! Run: `cargo bench -p model-server --bench grpc_load` (writes
//! `benchmarks/results/model-server-load.json`; see docs/benchmarks.md).
//! `VIGIL_BENCH_CONCURRENCY=64` measures only the listed levels and writes nothing, for
//! quick comparisons while tuning; `VIGIL_BENCH_SERVER=on` measures only the servers whose
//! name contains the text (for profiling one of them); `VIGIL_BENCH_SERVERS` lists exact names
//! separated by `|`, and keeps the ceiling (so shares are computed), for comparing the same
//! set of servers across builds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod support;

#[path = "../tests/support/pki.rs"]
mod pki;

use model_server::server::{self, Listeners};
use proto::tensorflow::serving::prediction_service_server::{PredictionService, PredictionServiceServer};
use proto::tensorflow::serving::*;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const CONCURRENCY: [usize; 4] = [1, 8, 64, 256];
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
/// Measurements per server and level, interleaved across servers.
const ROUNDS: usize = 3;
const CEILING: &str = "no-op tonic server (ceiling)";
/// Clients spread over several HTTP/2 connections, as a channel pool would.
const CONNECTIONS: usize = 4;

// The allocator the server binary uses (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The ceiling: decodes the request and answers with its input, no inference.
struct Echo;

#[tonic::async_trait]
impl PredictionService for Echo {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let request = request.into_inner();
        let output = request.inputs.into_values().next().unwrap_or_default();
        Ok(Response::new(PredictResponse {
            model_spec: request.model_spec,
            outputs: [("output_0".to_owned(), output)].into(),
        }))
    }
    async fn get_model_metadata(
        &self,
        _: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn classify(&self, _: Request<ClassificationRequest>) -> Result<Response<ClassificationResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn regress(&self, _: Request<RegressionRequest>) -> Result<Response<RegressionResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

fn request(seed: usize) -> PredictRequest {
    support::autoencoder_request((0..18).map(|i| ((seed * 7 + i * 3) % 17) as f32 / 17.0 - 0.5).collect())
}

struct LoadResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn load(channels: &[Channel], concurrency: usize) -> LoadResult {
    let run = |duration| support::closed_loop(channels, concurrency, duration, |n| tonic::Request::new(request(n)));
    run(WARMUP).await;
    let started = Instant::now();
    let mut latencies = run(MEASURE).await;
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p| support::percentile_us(&latencies, p);
    LoadResult { rps: latencies.len() as f64 / elapsed.as_secs_f64(), p50_us: pct(0.5), p99_us: pct(0.99) }
}

async fn channels(addr: std::net::SocketAddr, tls: Option<&pki::Ca>) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS {
        out.push(match tls {
            Some(ca) => pki::tls_channel(addr, ca, None).await.unwrap(),
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(),
        });
    }
    out
}

/// How a model server variant is secured.
#[derive(Clone, Copy, PartialEq)]
enum Security {
    Plain,
    /// `--management_token_file` set: every call passes the management check.
    Token,
    /// `--ssl_config_file` (server certificate, no client certificates) and the token.
    TlsAndToken,
}

/// A server under test: its name, its clients' channels, and how to stop it.
struct Running {
    name: &'static str,
    channels: Vec<Channel>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(
    name: &'static str,
    extra: Option<Vec<String>>,
    security: Security,
    base: &std::path::Path,
    pki: &(pki::Ca, tempfile::TempDir),
) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = match extra {
        None => tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PredictionServiceServer::new(Echo))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .map_err(anyhow::Error::from)
        }),
        Some(extra) => {
            let mut args = vec!["--model_name=autoencoder".to_owned(), format!("--model_base_path={}", base.display())];
            args.extend(extra);
            let (ca, dir) = pki;
            if security != Security::Plain {
                let token = dir.path().join("token");
                std::fs::write(&token, "bench-token\n").unwrap();
                args.push(format!("--management_token_file={}", token.display()));
            }
            if security == Security::TlsAndToken {
                let ssl = dir.path().join("ssl.cfg");
                std::fs::write(&ssl, pki::ssl_config(&ca.server(), None, false)).unwrap();
                args.push(format!("--ssl_config_file={}", ssl.display()));
            }
            let config = support::serve_config(&args);
            tokio::spawn(server::run(config, Listeners { grpc: listener, rest: None }, async {
                let _ = stopped.await;
            }))
        }
    };
    let tls = (security == Security::TlsAndToken).then_some(&pki.0);
    Running { name, channels: channels(addr, tls).await, stop, task }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let base = root.join("tests/fixtures/savedmodels/autoencoder");
    let batching = std::env::temp_dir().join("vigil-bench-batching.config");
    // No timeout: a busy server merges whatever queued while the previous batch ran.
    std::fs::write(
        &batching,
        "max_batch_size { value: 256 }\nbatch_timeout_micros { value: 0 }\nmax_enqueued_batches { value: 64 }\n",
    )
    .unwrap();
    let only: Option<Vec<usize>> = std::env::var("VIGIL_BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').map(|c| c.trim().parse().expect("VIGIL_BENCH_CONCURRENCY: numbers")).collect());
    let levels = only.clone().unwrap_or(CONCURRENCY.to_vec());
    let only_server = std::env::var("VIGIL_BENCH_SERVER").ok();
    let only_servers: Option<Vec<String>> =
        std::env::var("VIGIL_BENCH_SERVERS").ok().map(|names| names.split('|').map(str::to_owned).collect());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut rows = Vec::new();
    runtime.block_on(async {
        let mut servers = Vec::new();
        let pki = (pki::Ca::new("bench CA"), tempfile::tempdir().unwrap());
        for (name, extra, security) in [
            (CEILING, None, Security::Plain),
            ("model-server, batching off", Some(vec![]), Security::Plain),
            ("model-server, batching off, management token", Some(vec![]), Security::Token),
            ("model-server, batching off, TLS and management token", Some(vec![]), Security::TlsAndToken),
            // The overload protections (in-flight pool, stream cap, deadline) out of the way,
            // to price them: the same server with every limit lifted.
            (
                "model-server, batching off, limits lifted",
                Some(vec![
                    "--max_in_flight_requests=1000000".to_owned(),
                    "--grpc_max_concurrent_streams=4294967295".to_owned(),
                    "--request_timeout_seconds=0".to_owned(),
                ]),
                Security::Plain,
            ),
            (
                "model-server, batching on",
                Some(vec![
                    "--enable_batching".to_owned(),
                    format!("--batching_parameters_file={}", batching.display()),
                ]),
                Security::Plain,
            ),
        ] {
            if only_server.as_ref().is_some_and(|only| !name.contains(only.as_str())) {
                continue;
            }
            if only_servers.as_ref().is_some_and(|names| name != CEILING && !names.iter().any(|n| n == name)) {
                continue;
            }
            servers.push(start(name, extra, security, &base, &pki).await);
        }
        for concurrency in levels.iter().copied() {
            // Rounds interleave the servers, so a slow spell on a shared machine hits all of
            // them alike; each server's figure is its median round, and its share of the
            // ceiling the median of the per-round ratios.
            let mut rounds: Vec<Vec<LoadResult>> = servers.iter().map(|_| Vec::new()).collect();
            for _ in 0..ROUNDS {
                for (server, results) in servers.iter().zip(&mut rounds) {
                    let result = load(&server.channels, concurrency).await;
                    eprintln!(
                        "{:32} c={concurrency:<4} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us",
                        server.name, result.rps, result.p50_us, result.p99_us
                    );
                    results.push(result);
                }
            }
            let ceiling = servers.iter().position(|s| s.name == CEILING).map(|i| &rounds[i]);
            for (server, results) in servers.iter().zip(&rounds) {
                let shares: Vec<f64> =
                    ceiling.map(|c| results.iter().zip(c).map(|(r, c)| r.rps / c.rps).collect()).unwrap_or_default();
                let typical = {
                    let rps = median(results.iter().map(|r| r.rps).collect());
                    results.iter().find(|r| r.rps == rps).expect("the median is one of the rounds")
                };
                let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
                rows.push(json!({
                    "server": server.name, "concurrency": concurrency,
                    "requests_per_second": typical.rps.round(),
                    "p50_us": typical.p50_us.round(), "p99_us": typical.p99_us.round(),
                    "requests_per_second_by_round": results.iter().map(|r| r.rps.round()).collect::<Vec<_>>(),
                    "share_of_ceiling": if shares.is_empty() { None } else { Some(round3(median(shares.clone()))) },
                    "share_of_ceiling_by_round": shares.into_iter().map(round3).collect::<Vec<_>>(),
                }));
                eprintln!(
                    "  {:30} c={concurrency:<4} median {:>9.0} req/s, {}",
                    server.name,
                    typical.rps,
                    rows.last().unwrap()["share_of_ceiling"]
                );
            }
        }
        for server in servers {
            drop(server.channels);
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    });
    if only.is_some() || only_server.is_some() || only_servers.is_some() {
        return;
    }
    let out = root.join("benchmarks/results/model-server-load.json");
    let report = json!({
        "benchmark": "Predict, 1x18 float32 autoencoder, loopback gRPC, client and server on the same machine",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "measure_seconds": MEASURE.as_secs_f64(), "rounds": ROUNDS, "connections": CONNECTIONS,
        "results": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
