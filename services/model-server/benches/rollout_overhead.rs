//! What a canary rollout costs the model server per request: Predict requests/s, latency
//! and CPU time per request on the bundled car-anomaly model with no rollout, and under a
//! rollout of version 1 -> 2 at 50%: set by hand, with an analysis plan, and with the
//! analysis plus shadow scoring of every stable-answered request by the canary. (A request
//! under any active rollout, manual ones included, is recorded into its version's analysis
//! window, so "split" and "analysis" do the same work per request; they differ only by the
//! analysis loop.) Two references on the no-rollout server separate the rollout's own cost
//! from its mix of versions: every request pinned to version 2 (the canary's wider
//! network), and half the clients pinning 1 and half 2 (the split's mix without any
//! rollout code on the request path). One server per rollout, all in this process and serving the
//! same model directory; short rounds interleave the configurations, and each one is
//! compared with the baseline round by round. Client and servers share the machine's cores.
//!
//! Run: `cargo bench -p model-server --bench rollout_overhead` (writes
//! `benchmarks/results/model-server-rollout.json`; see docs/benchmarks.md).
//! `VIGIL_BENCH_CONCURRENCY=64` measures only the listed levels and `VIGIL_BENCH_CONFIG=shadow`
//! only the configurations whose name contains the text; either writes nothing (for quick
//! comparisons and profiling).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use model_server::rollout::windows::{MAX_SAMPLES, Outcome, Windows};
use model_server::server::{self, Listeners};
use pb::rollout_service_client::RolloutServiceClient;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::{ModelSpec, PredictRequest};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};
use proto::vigil::rollout::v1 as pb;
use serde_json::{Value, json};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

const CONCURRENCY: [usize; 2] = [8, 64];
const WARMUP: Duration = Duration::from_millis(150);
const MEASURE: Duration = Duration::from_millis(600);
/// Measurements per configuration and level, interleaved across configurations: many
/// short rounds, so that the other work on a shared machine hits all of them alike.
const ROUNDS: usize = 15;
/// Clients spread over several HTTP/2 connections, as a channel pool would.
const CONNECTIONS: usize = 4;
/// Distinct routing keys (cars) the requests carry.
const KEYS: usize = 1000;
const MODEL: &str = "car-anomaly";
const BASELINE: &str = "baseline";

// The allocator the server binary uses (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A server under test: the rollout it runs, if any.
struct ServerSetup {
    name: &'static str,
    rollout: Option<pb::RolloutSpec>,
}

/// What is measured: requests to one of the servers, pinned to the versions in `pins`
/// (`None`: unpinned), the clients sharing them out evenly.
struct Config {
    name: &'static str,
    server: usize,
    pins: &'static [Option<i64>],
    description: &'static str,
}

const CONFIGS: [Config; 6] = [
    Config {
        name: BASELINE,
        server: 0,
        pins: &[None],
        description: "no rollout: unpinned requests go to the latest version, 3 (a copy of version 1)",
    },
    Config {
        name: "v2 only (reference)",
        server: 0,
        pins: &[Some(2)],
        description: "no rollout, every request pinned to version 2: what the canary's own network costs",
    },
    Config {
        name: "v1+v2 pinned (reference)",
        server: 0,
        pins: &[Some(1), Some(2)],
        description: "no rollout, half the clients pinning version 1 and half version 2: the split's mix of \
                      versions without any rollout code on the request path",
    },
    Config {
        name: "split",
        server: 1,
        pins: &[None],
        description: "manual rollout 1 -> 2 at 50% (no analysis plan), sticky by routing key; the server still \
                      records every request into the versions' analysis windows, which nothing reads",
    },
    Config {
        name: "analysis",
        server: 2,
        pins: &[None],
        description: "rollout 1 -> 2 at 50% with an analysis plan that holds (interval 3600 s, min_samples 1e9)",
    },
    Config {
        name: "shadow",
        server: 3,
        pins: &[None],
        description: "as analysis, plus shadow_percent 100: every stable-answered request also runs on the canary",
    },
];

/// Version 1 -> 2 at 50%; with `analysis`, a plan that records every request but never
/// judges during the run (one check an hour, from a billion samples), so the weight holds.
fn rollout(analysis: bool, shadow_percent: f64) -> pb::RolloutSpec {
    pb::RolloutSpec {
        model: MODEL.into(),
        stable_version: 1,
        canary_version: 2,
        canary_weight_percent: 50.0,
        shadow_percent,
        analysis: analysis.then(|| pb::Analysis {
            step_weights_percent: vec![50.0, 90.0],
            interval_seconds: 3600,
            min_samples: 1_000_000_000,
            ..Default::default()
        }),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The bundled car-anomaly as versions 1 and 2, and version 1 again as 3, all served;
/// returns the `--model_config_file` flag.
fn model_config(root: &Path, dir: &Path) -> String {
    let bundled = root.join("deploy/models/car-anomaly");
    let base = dir.join(MODEL);
    for (from, to) in [("1", "1"), ("2", "2"), ("1", "3")] {
        copy_dir(&bundled.join(from), &base.join(to));
    }
    let config = dir.join("models.config");
    std::fs::write(&config, model_server::model_config::all_versions_config(MODEL, &base).unwrap()).unwrap();
    format!("--model_config_file={}", config.display())
}

/// One-row Predicts of the golden readings (every signal a named float[1] tensor).
fn golden_requests(root: &Path, pins: &[Option<i64>]) -> Vec<PredictRequest> {
    let text = std::fs::read_to_string(root.join("tests/fixtures/car_anomaly_golden.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let tensor = |value: f32| TensorProto {
        dtype: 1,
        tensor_shape: Some(TensorShapeProto {
            dim: vec![tensor_shape_proto::Dim { size: 1, ..Default::default() }],
            ..Default::default()
        }),
        float_val: vec![value],
        ..Default::default()
    };
    golden["readings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|reading| pins.iter().map(move |pin| (reading, pin)))
        .map(|(reading, pin)| PredictRequest {
            model_spec: Some(ModelSpec {
                name: MODEL.into(),
                version_choice: pin.map(VersionChoice::Version),
                ..Default::default()
            }),
            inputs: reading
                .as_object()
                .unwrap()
                .iter()
                .filter(|(name, _)| !["control_unit_firmware", "fault", "sequence"].contains(&name.as_str()))
                .filter_map(|(name, value)| Some((name.clone(), tensor(value.as_f64()? as f32))))
                .collect(),
            output_filter: vec![],
        })
        .collect()
}

/// Counters read from a server's `/metrics`: requests answered per version (index 1-3),
/// rows the canary scored in shadow (one per shadow run here) and shadow runs skipped.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    answered: [f64; 4],
    shadow_rows: f64,
    shadow_skipped: f64,
}

impl Counters {
    fn parse(text: &str) -> Counters {
        let mut counters = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let version = series.split("version=\"").nth(1).and_then(|v| v.split('"').next()?.parse::<usize>().ok());
            if series.starts_with("model_server_requests_total{") {
                if let Some(v @ 1..=3) = version {
                    counters.answered[v] += value;
                }
            } else if series.starts_with("model_server_shadow_rows_total{") {
                counters.shadow_rows += value;
            } else if series.starts_with("model_server_shadow_skipped_total{") {
                counters.shadow_skipped += value;
            }
        }
        counters
    }

    fn since(self, before: Counters) -> Counters {
        let mut answered = [0.0; 4];
        for (v, slot) in answered.iter_mut().enumerate() {
            *slot = self.answered[v] - before.answered[v];
        }
        Counters {
            answered,
            shadow_rows: self.shadow_rows - before.shadow_rows,
            shadow_skipped: self.shadow_skipped - before.shadow_skipped,
        }
    }

    fn add(&mut self, other: Counters) {
        for v in 0..4 {
            self.answered[v] += other.answered[v];
        }
        self.shadow_rows += other.shadow_rows;
        self.shadow_skipped += other.shadow_skipped;
    }
}

async fn scrape(rest: SocketAddr) -> Counters {
    let text = reqwest::get(format!("http://{rest}/metrics")).await.unwrap().text().await.unwrap();
    Counters::parse(&text)
}

/// CPU time this process (client and servers) has used, from `/proc/self/stat` (Linux):
/// CPU time per request moves much less than requests/s when other processes take cores
/// away, so it shows a configuration's cost more steadily on a shared machine.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th, in clock ticks (USER_HZ, 100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

struct Round {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time of the whole process (client included) per request.
    cpu_us_per_request: Option<f64>,
    /// Over the measured period only.
    counters: Counters,
}

/// Drives `concurrency` clients for the warm-up, then for the measured period.
async fn measure(server: &Running, requests: &Arc<Vec<PredictRequest>>, concurrency: usize) -> Round {
    let keys: Arc<Vec<AsciiMetadataValue>> = Arc::new((0..KEYS).map(|i| format!("car-{i}").parse().unwrap()).collect());
    let requests = requests.clone();
    let request = move |n: usize| {
        let mut request = tonic::Request::new(requests[n % requests.len()].clone());
        request.metadata_mut().insert(canary::ROUTING_KEY_METADATA, keys[n % KEYS].clone());
        request
    };
    let run = |duration| support::closed_loop(&server.channels, concurrency, duration, request.clone());
    run(WARMUP).await;
    let before = scrape(server.rest).await;
    let (started, cpu_before) = (Instant::now(), process_cpu_seconds());
    let mut latencies = run(MEASURE).await;
    let (elapsed, cpu_after) = (started.elapsed(), process_cpu_seconds());
    let counters = scrape(server.rest).await.since(before);
    latencies.sort();
    let pct = |p| support::percentile_us(&latencies, p);
    let cpu_us_per_request = cpu_before.zip(cpu_after).map(|(b, a)| (a - b) * 1e6 / latencies.len() as f64);
    Round {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        cpu_us_per_request,
        counters,
    }
}

/// A server under test: its clients' channels, its REST address, and how to stop it.
struct Running {
    channels: Vec<Channel>,
    rest: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(models_flag: &str) -> Running {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, rest_addr) = (grpc.local_addr().unwrap(), rest.local_addr().unwrap());
    let config = support::serve_config(&[models_flag]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(config, Listeners { grpc, rest: Some(rest) }, async {
        let _ = stopped.await;
    }));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await.unwrap());
    }
    Running { channels, rest: rest_addr, stop, task }
}

/// The analysis windows on their own: nanoseconds of thread time per `Windows::record` of
/// a one-row answer, alternating the two versions as a 50% split does; first while the
/// windows fill up to their sample cap, then (where a long interval spends most of its
/// time) once they are full, from one thread and from two contending for the lock.
fn window_record_ns() -> Value {
    const CALLS: usize = 1_000_000;
    let record = |windows: &Windows, i: usize| {
        let outcome = Outcome { error: false, latency_ms: 1.0, scores: &[0.5], thresholds: Some(&[1.0]) };
        windows.record(MODEL, 1 + (i % 2) as i64, outcome);
    };
    let windows = Windows::default();
    let started = Instant::now();
    for i in 0..2 * MAX_SAMPLES {
        record(&windows, i);
    }
    let filling = started.elapsed().as_secs_f64() * 1e9 / (2 * MAX_SAMPLES) as f64;
    let full = |threads: usize| {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..threads {
                let windows = windows.clone();
                scope.spawn(move || (0..CALLS).for_each(|i| record(&windows, i + t)));
            }
        });
        started.elapsed().as_secs_f64() * 1e9 * threads as f64 / (CALLS * threads) as f64
    };
    let (one, two) = (full(1), full(2));
    eprintln!("Windows::record: {filling:.0} ns filling, {one:.0} ns full, {two:.0} ns full with 2 threads contending");
    json!({ "filling": filling.round(), "full_one_thread": one.round(), "full_two_threads": two.round() })
}

/// One configuration at one level over all rounds: medians, and its ratios to the baseline
/// round by round (when the baseline was measured).
fn summarise(config: &Config, concurrency: usize, results: &[Round], baseline: Option<&[Round]>) -> Value {
    let paired = |f: fn(&Round, &Round) -> Option<f64>| -> Vec<f64> {
        baseline.map(|b| results.iter().zip(b).filter_map(|(r, b)| f(r, b)).collect()).unwrap_or_default()
    };
    let ratios = paired(|r, b| Some(r.rps / b.rps));
    let added_cpu = paired(|r, b| Some(r.cpu_us_per_request? - b.cpu_us_per_request?));
    let cpu: Vec<f64> = results.iter().filter_map(|r| r.cpu_us_per_request).collect();
    let mut counters = Counters::default();
    results.iter().for_each(|r| counters.add(r.counters));
    let answered: f64 = counters.answered.iter().sum();
    let stable = counters.answered[1];
    let per_stable = |n: f64| (stable > 0.0).then(|| round3(n / stable));
    let of_rounds = |f: fn(&Round) -> f64| median(results.iter().map(f).collect()).round();
    json!({
        "config": config.name, "concurrency": concurrency,
        "requests_per_second": of_rounds(|r| r.rps),
        "p50_us": of_rounds(|r| r.p50_us),
        "p99_us": of_rounds(|r| r.p99_us),
        "requests_per_second_by_round": results.iter().map(|r| r.rps.round()).collect::<Vec<_>>(),
        "p99_us_by_round": results.iter().map(|r| r.p99_us.round()).collect::<Vec<_>>(),
        "ratio_to_baseline": (!ratios.is_empty()).then(|| round3(median(ratios.clone()))),
        "ratio_to_baseline_quartiles": (!ratios.is_empty()).then(|| quartiles(&ratios)),
        "ratio_to_baseline_by_round": ratios.iter().copied().map(round3).collect::<Vec<_>>(),
        "process_cpu": (!cpu.is_empty()).then(|| json!({
            "us_per_request": round3(median(cpu.clone())),
            "us_per_request_by_round": cpu.iter().copied().map(round3).collect::<Vec<_>>(),
            "added_us_per_request": (!added_cpu.is_empty()).then(|| round3(median(added_cpu.clone()))),
            "added_us_per_request_quartiles": (!added_cpu.is_empty()).then(|| quartiles(&added_cpu)),
        })),
        "answered_share_by_version": {
            "1": round3(counters.answered[1] / answered),
            "2": round3(counters.answered[2] / answered),
            "3": round3(counters.answered[3] / answered),
        },
        "shadow_runs_per_stable_answer": per_stable(counters.shadow_rows),
        "shadow_skipped_per_stable_answer": per_stable(counters.shadow_skipped),
    })
}

/// The machine's 1-minute load average (Linux), recorded beside the figures.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn median(values: Vec<f64>) -> f64 {
    quantile(values, 0.5)
}

/// The `q`-quantile (nearest rank) of `values`.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// The middle half of `values` (first and third quartiles), rounded.
fn quartiles(values: &[f64]) -> [f64; 2] {
    [round3(quantile(values.to_vec(), 0.25)), round3(quantile(values.to_vec(), 0.75))]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let models_flag = model_config(&root, dir.path());
    let only: Option<Vec<usize>> = std::env::var("VIGIL_BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').map(|c| c.trim().parse().expect("VIGIL_BENCH_CONCURRENCY: numbers")).collect());
    let levels = only.clone().unwrap_or(CONCURRENCY.to_vec());
    let only_config = std::env::var("VIGIL_BENCH_CONFIG").ok();
    let active: Vec<usize> = (0..CONFIGS.len())
        .filter(|&i| only_config.as_ref().is_none_or(|only| CONFIGS[i].name.contains(only.as_str())))
        .collect();
    let load_before = load_average();
    let setups = [
        ServerSetup { name: "no rollout", rollout: None },
        ServerSetup { name: "split", rollout: Some(rollout(false, 0.0)) },
        ServerSetup { name: "analysis", rollout: Some(rollout(true, 0.0)) },
        ServerSetup { name: "shadow", rollout: Some(rollout(true, 100.0)) },
    ];
    let requests: Vec<Arc<Vec<PredictRequest>>> =
        CONFIGS.iter().map(|c| Arc::new(golden_requests(&root, c.pins))).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut rows = Vec::new();
    runtime.block_on(async {
        let mut servers = Vec::new();
        for setup in &setups {
            let server = start(&models_flag).await;
            if let Some(spec) = setup.rollout.clone() {
                let mut api = RolloutServiceClient::new(server.channels[0].clone());
                api.start_rollout(pb::StartRolloutRequest { spec: Some(spec) }).await.expect("the rollout starts");
            }
            servers.push(server);
        }
        for concurrency in levels.iter().copied() {
            // Rounds interleave the configurations, each round starting with a different
            // one, so a slow spell on a shared machine hits them all alike.
            let mut rounds: Vec<Vec<Round>> = active.iter().map(|_| Vec::new()).collect();
            for round in 0..ROUNDS {
                for k in 0..active.len() {
                    let slot = (round + k) % active.len();
                    let config = &CONFIGS[active[slot]];
                    let result = measure(&servers[config.server], &requests[active[slot]], concurrency).await;
                    eprintln!(
                        "{:24} c={concurrency:<3} {:>7.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  CPU {:>5.1} us/request",
                        config.name,
                        result.rps,
                        result.p50_us,
                        result.p99_us,
                        result.cpu_us_per_request.unwrap_or(f64::NAN)
                    );
                    rounds[slot].push(result);
                }
            }
            let baseline = active.iter().position(|&i| CONFIGS[i].name == BASELINE).map(|slot| rounds[slot].as_slice());
            for (&i, results) in active.iter().zip(&rounds) {
                let row = summarise(&CONFIGS[i], concurrency, results, baseline);
                eprintln!(
                    "  {:24} c={concurrency:<3} median {:>7.0} req/s, ratio to baseline {} (quartiles {}), \
                     CPU {} us/request ({:+} us), shadow runs {}, skipped {} per stable answer",
                    CONFIGS[i].name,
                    row["requests_per_second"],
                    row["ratio_to_baseline"],
                    row["ratio_to_baseline_quartiles"],
                    row["process_cpu"]["us_per_request"],
                    row["process_cpu"]["added_us_per_request"],
                    row["shadow_runs_per_stable_answer"],
                    row["shadow_skipped_per_stable_answer"],
                );
                rows.push(row);
            }
        }
        // The rollouts held where they started: nothing changed the weight mid-run.
        for (setup, server) in setups.iter().zip(&servers) {
            if setup.rollout.is_some() {
                let mut api = RolloutServiceClient::new(server.channels[0].clone());
                let state = api.get_rollout(pb::GetRolloutRequest { model: MODEL.into() }).await.unwrap().into_inner();
                assert_eq!(
                    (state.revision, state.canary_weight_percent),
                    (1, 50.0),
                    "{}: the rollout changed during the run: {state:?}",
                    setup.name
                );
            }
        }
        for server in servers {
            drop(server.channels);
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    });
    let load_after = load_average();
    let window_record_ns = window_record_ns();
    if only.is_some() || only_config.is_some() {
        return;
    }
    let out = root.join("benchmarks/results/model-server-rollout.json");
    let report = json!({
        "benchmark": "Predict on car-anomaly (one reading, 17 named float tensors) with a routing key per car, \
                      without and under a canary rollout 1 -> 2 at 50%, loopback gRPC, client and servers on the same machine",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "measure_seconds": MEASURE.as_secs_f64(), "warmup_seconds": WARMUP.as_secs_f64(),
        "rounds": ROUNDS, "connections": CONNECTIONS, "routing_keys": KEYS, "levels": levels,
        "configs": CONFIGS.iter().map(|c| json!({"name": c.name, "description": c.description})).collect::<Vec<_>>(),
        "load_average_before_and_after": [load_before, load_after],
        "results": rows,
        "window_record_ns": window_record_ns,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
