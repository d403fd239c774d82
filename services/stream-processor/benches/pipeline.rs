//! Benchmark: readings/s and event latency (readings topic -> scores topic) through the
//! stream processor, next to the ceiling of a pass-through on the same broker: a consumer
//! group member that copies every record to an output topic with the processor's own
//! producer settings and stores its offset once Kafka confirmed the copy, but makes no
//! RPC and decodes nothing.
//!
//! Peak: a fixed set of readings is written to a fresh readings topic first; then the
//! consumer under test starts and the clock runs from the first output record seen on its
//! output topic to the last (group join time is left out). Rounds alternate the two
//! consumers, so a slow spell on the shared machine hits both alike; a consumer's figure
//! is its median round and the share the median of the per-round ratios.
//!
//! Latency: readings are then written at a steady rate, half of the processor's peak,
//! each stamped with its send time as event time; a reader on the output topic takes
//! `arrival - event time` per record. Both consumers are measured at that same rate.
//!
//! Everything runs in this process on loopback: the model server (bundled `car-anomaly`
//! model, batching on, one replica), the processor, the pass-through, the load and the
//! readers; the Kafka broker is librdkafka's mock cluster (in this process) or, with
//! `VIGIL_BENCH_KAFKA=host:port`, an external broker (benchmarks/stream-processor.sh
//! starts tansu for that).
//!
//! Run: `bash benchmarks/stream-processor.sh` (writes
//! `benchmarks/results/stream-processor.json`; see docs/benchmarks.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use embedded_brokers::KafkaUnderTest as Kafka;
use prost::Message as _;
use proto::vigil::scoring::v1::Score;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sensor::SensorReading;
use serde_json::json;
use stream_processor::config::ProcessorConfig;
use stream_processor::kafka_clients::{CONSUMER_DEFAULTS, PRODUCER_DEFAULTS};

// As the stream-processor and model-server binaries.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: i32 = 4;
const CARS: usize = 200;
/// Readings per peak round on an external broker: a few seconds of the batched modes.
const PEAK_READINGS: usize = 240_000;
/// Readings per peak round on the mock cluster, and for one call per reading (~10k/s) on
/// any broker. The mock cluster finds a fetch's records by walking the partition's
/// message sets, so reading a topic back slows down with its length: 240,000 did not get
/// through the pass-through in 120 s. At 40,000 a mock round lasts 0.15 s (pass-through)
/// to 0.5 s (batched): a shorter window, so the mock's figures move more between rounds.
const PEAK_READINGS_SHORT: usize = 40_000;
const PEAK_ROUNDS: usize = 3;
const LATENCY_ROUNDS: usize = 2;
const LATENCY_SECONDS: f64 = 6.0;
/// Readings sent before a latency round's clock starts (the group is joined and warm).
const WARM_UP_READINGS: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Consumer {
    PassThrough,
    /// The processor making one Predict call per reading (`model.max_rows_per_call = 1`).
    PerReading,
    /// The processor batching its calls (the default).
    Batched,
    /// Batched, with `delivery = "exactly-once"` (peak only, and only on the mock
    /// cluster: tansu 0.6 serves no EndTxn).
    BatchedExactlyOnce,
    /// The model in the processor's own process (`model.mode = "embedded"`), batched.
    Embedded,
    /// Batched, against a model server with a canary rollout in progress (v1 stable, v2 on
    /// 25% of the devices, 10% of stable's rows shadowed on v2, automated analysis on):
    /// every call's rows are split by device between the versions.
    BatchedCanary,
    /// Batched, scoring with the windowed v3 (each reading with its device's last 10):
    /// what windows cost beside `Batched`, which pins the one-reading v2.
    BatchedWindowed,
}

impl Consumer {
    /// How many of the peak readings its peak rounds take on `kafka`.
    fn peak_readings(self, kafka: &Kafka) -> usize {
        if self == Self::PerReading || matches!(kafka, Kafka::Mock(_)) { PEAK_READINGS_SHORT } else { PEAK_READINGS }
    }

    fn name(self) -> &'static str {
        match self {
            Self::PassThrough => "pass-through (ceiling): consume -> produce, no RPC",
            Self::PerReading => "stream processor: one Predict per reading",
            Self::Batched => "stream processor: batched Predict calls",
            Self::BatchedExactlyOnce => "stream processor, batched, exactly-once",
            Self::Embedded => "stream processor: embedded model",
            Self::BatchedCanary => "stream processor: batched, canary rollout under way",
            Self::BatchedWindowed => "stream processor: batched, windowed model (v3)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::PassThrough => "pass_through",
            Self::PerReading => "per_reading",
            Self::Batched => "batched",
            Self::BatchedExactlyOnce => "batched_exactly_once",
            Self::Embedded => "embedded",
            Self::BatchedCanary => "batched_canary",
            Self::BatchedWindowed => "batched_windowed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "pass-through" => Self::PassThrough,
            "per-reading" => Self::PerReading,
            "batched" => Self::Batched,
            "batched-exactly-once" => Self::BatchedExactlyOnce,
            "embedded" => Self::Embedded,
            "batched-canary" => Self::BatchedCanary,
            "batched-windowed" => Self::BatchedWindowed,
            other => panic!(
                "VIGIL_BENCH_CONSUMER: {other:?} is not pass-through, per-reading, batched, batched-exactly-once, \
                 embedded, batched-canary or batched-windowed"
            ),
        }
    }
}

/// A round's topics and group, fresh so no round sees another's records or offsets.
#[derive(Clone)]
struct Round {
    readings: String,
    output: String,
    anomalies: String,
    dead_letters: String,
    group: String,
}

impl Round {
    async fn create(kafka: &Kafka, tag: &str) -> Self {
        let round = Self {
            readings: format!("bench-{tag}-readings"),
            output: format!("bench-{tag}-scores"),
            anomalies: format!("bench-{tag}-anomalies"),
            dead_letters: format!("bench-{tag}-dead-letter"),
            group: format!("bench-{tag}"),
        };
        for topic in [&round.readings, &round.output, &round.anomalies] {
            kafka.create_topic(topic, PARTITIONS).await.unwrap();
        }
        kafka.create_topic(&round.dead_letters, 1).await.unwrap();
        round
    }
}

/// The model servers the processor modes call (in this process, batching on, the bundled
/// `car-anomaly`).
struct ModelServers {
    /// Every version, no rollout: the modes pin v2 (one reading a call row), except
    /// `BatchedWindowed`, which takes the latest, the windowed v3.
    plain: support::ModelServer,
    /// Versions 1 and 2, a canary rollout from 1 to 2 in progress (see `Consumer::BatchedCanary`).
    canary: support::ModelServer,
    _files: tempfile::TempDir,
}

impl ModelServers {
    async fn start() -> Self {
        let files = tempfile::tempdir().unwrap();
        let models = files.path().join("models.config");
        let bundled = support::root().join("deploy/models/car-anomaly");
        std::fs::write(&models, model_server::model_config::all_versions_config("car-anomaly", &bundled).unwrap())
            .unwrap();
        // The rollout's server serves only the versions it rolls between, both one-reading
        // models: the processor then reads a one-reading signature, as before v3 existed.
        let canary_models = files.path().join("canary-models.config");
        std::fs::write(
            &canary_models,
            format!(
                "model_config_list {{ config {{ name: \"car-anomaly\" base_path: \"{}\" model_platform: \"tensorflow\" \
                 model_version_policy {{ specific {{ versions: 1 versions: 2 }} }} }} }}\n",
                bundled.display()
            ),
        )
        .unwrap();
        // One analysis step that does not end during a run: the rollout stays in progress,
        // its checks computing over both sides' rows.
        let rollouts = files.path().join("rollouts.toml");
        std::fs::write(
            &rollouts,
            "[[rollouts]]\nmodel = \"car-anomaly\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 25\n\
             shadow_percent = 10\n[rollouts.analysis]\nstep_weights_percent = [25, 50]\ninterval_seconds = 3600\n",
        )
        .unwrap();
        let canary = support::ModelServer::start(&[
            "--enable_batching",
            &format!("--model_config_file={}", canary_models.display()),
            &format!("--rollout_config_file={}", rollouts.display()),
        ])
        .await;
        let plain =
            support::ModelServer::start(&["--enable_batching", &format!("--model_config_file={}", models.display())])
                .await;
        Self { plain, canary, _files: files }
    }

    async fn stop(self) {
        self.plain.stop().await;
        self.canary.stop().await;
    }
}

/// The consumer under test, running until stopped.
enum Running {
    PassThrough { stop: Arc<AtomicBool>, task: tokio::task::JoinHandle<()> },
    Processor(support::Processor),
}

impl Running {
    async fn start(consumer: Consumer, kafka: &Kafka, round: &Round, servers: &ModelServers) -> Self {
        match consumer {
            Consumer::PassThrough => {
                let stop = Arc::new(AtomicBool::new(false));
                let task =
                    tokio::spawn(pass_through(kafka.bootstrap_servers().to_owned(), round.clone(), stop.clone()));
                Self::PassThrough { stop, task }
            }
            Consumer::PerReading
            | Consumer::Batched
            | Consumer::BatchedExactlyOnce
            | Consumer::Embedded
            | Consumer::BatchedCanary
            | Consumer::BatchedWindowed => {
                let model = if consumer == Consumer::BatchedCanary { &servers.canary } else { &servers.plain };
                let mut config = ProcessorConfig::default();
                config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
                config.model.endpoints = vec![format!("http://{}", model.grpc)];
                config.readings_topic.clone_from(&round.readings);
                config.scores_topic.clone_from(&round.output);
                config.anomalies_topic.clone_from(&round.anomalies);
                config.dead_letter_topic.clone_from(&round.dead_letters);
                config.group_id.clone_from(&round.group);
                config.admin_listen.clear();
                // Tuning knobs for the batched modes (see measure()).
                if let Some(Ok(rows)) = std::env::var("VIGIL_BENCH_MAX_ROWS").ok().map(|v| v.parse()) {
                    config.model.max_rows_per_call = rows;
                }
                if let Some(Ok(calls)) = std::env::var("VIGIL_BENCH_CALLS_IN_FLIGHT").ok().map(|v| v.parse()) {
                    config.model.calls_in_flight = calls;
                }
                if let Some(Ok(window)) = std::env::var("VIGIL_BENCH_IN_FLIGHT").ok().map(|v| v.parse()) {
                    config.max_in_flight_per_partition = window;
                }
                if consumer == Consumer::PerReading {
                    config.model.max_rows_per_call = 1;
                }
                // The one-reading model, as these modes measured before the windowed v3.
                if !matches!(consumer, Consumer::BatchedCanary | Consumer::BatchedWindowed) {
                    config.model.version = Some(2);
                }
                if consumer == Consumer::Embedded {
                    config.model.mode = stream_processor::config::ModelMode::Embedded;
                    config.model.model_dir = Some(support::bundled_model_dir());
                }
                if consumer == Consumer::BatchedExactlyOnce {
                    config.delivery = stream_processor::config::Delivery::ExactlyOnce;
                    config.transactional_id = format!("{}-transactions", round.group);
                }
                Self::Processor(support::Processor::start(config).await)
            }
        }
    }

    async fn stop(self) {
        match self {
            Self::PassThrough { stop, task } => {
                stop.store(true, Ordering::Relaxed);
                task.await.unwrap();
            }
            Self::Processor(processor) => processor.stop().await,
        }
    }
}

/// The ceiling: the processor's consumer and producer settings, offsets stored in order
/// after each copy is confirmed, the same in-flight bound in all (partitions x the
/// processor's per-partition default), and nothing else.
async fn pass_through(bootstrap: String, round: Round, stop: Arc<AtomicBool>) {
    let defaults = ProcessorConfig::default();
    let mut common = defaults.kafka.clone();
    common.insert("bootstrap.servers".into(), bootstrap);
    let mut consumer_config = kafka::client_config(CONSUMER_DEFAULTS, &[&common, &defaults.consumer]);
    consumer_config.set("group.id", &round.group).set("enable.auto.offset.store", "false");
    let consumer: Arc<StreamConsumer> = Arc::new(consumer_config.create().unwrap());
    let producer: FutureProducer =
        kafka::client_config(PRODUCER_DEFAULTS, &[&common, &defaults.producer]).create().unwrap();
    consumer.subscribe(&[&round.readings]).unwrap();
    let in_flight = PARTITIONS as usize * defaults.max_in_flight_per_partition;
    let (pending, mut confirmed) =
        tokio::sync::mpsc::channel::<(rdkafka::producer::DeliveryFuture, String, i32, i64)>(in_flight);
    let store = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            while let Some((delivery, topic, partition, offset)) = confirmed.recv().await {
                delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
                consumer.store_offset(&topic, partition, offset).unwrap();
            }
        })
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(message) = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await else { continue };
        let message = message.unwrap();
        let mut record = FutureRecord::to(&round.output).payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        let delivery = producer.send_result(record).map_err(|(e, _)| e).unwrap();
        let (topic, partition, offset) = (message.topic().to_owned(), message.partition(), message.offset());
        pending.send((delivery, topic, partition, offset)).await.unwrap();
    }
    drop(pending);
    store.await.unwrap();
}

/// What a reader saw on an output topic.
struct Arrivals {
    first: Instant,
    last: Instant,
    records: usize,
    /// `arrival - event time` of every record not sent as warm-up, in microseconds.
    latencies_us: Vec<u64>,
}

/// Reads `topic` from the start until `expected` records arrived (or 120 s pass).
/// Warm-up readings carry sequence 0; their records count but are not timed.
fn read_outputs(bootstrap: &str, topic: &str, consumer: Consumer, expected: usize, seen: &AtomicUsize) -> Arrivals {
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-reader") // no offsets are committed
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    reader.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut arrivals = Arrivals { first: Instant::now(), last: Instant::now(), records: 0, latencies_us: Vec::new() };
    while arrivals.records < expected {
        assert!(Instant::now() < deadline, "{topic}: {} of {expected} records within 120 s", arrivals.records);
        let Some(message) = reader.poll(Duration::from_millis(100)) else { continue };
        let message = message.unwrap();
        let (now, wall) = (Instant::now(), SystemTime::now());
        if arrivals.records == 0 {
            arrivals.first = now;
        }
        arrivals.last = now;
        arrivals.records += 1;
        seen.store(arrivals.records, Ordering::Relaxed);
        let payload = message.payload().unwrap_or_default();
        let (sequence, event_time) = match consumer {
            Consumer::PerReading
            | Consumer::Batched
            | Consumer::BatchedExactlyOnce
            | Consumer::Embedded
            | Consumer::BatchedCanary
            | Consumer::BatchedWindowed => {
                let score = Score::decode(payload).unwrap();
                (score.sequence, score.event_time)
            }
            Consumer::PassThrough => {
                let reading = SensorReading::decode(payload).unwrap();
                (reading.sequence, reading.event_time)
            }
        };
        if sequence != 0 {
            let sent = SystemTime::try_from(event_time.unwrap()).unwrap();
            arrivals.latencies_us.push(wall.duration_since(sent).unwrap_or_default().as_micros() as u64);
        }
    }
    arrivals
}

fn load_producer(kafka: &Kafka) -> FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// Writes `readings` to `topic` keyed by device id, as ingest does, and waits for Kafka.
async fn produce(producer: &FutureProducer, topic: &str, readings: &[SensorReading]) {
    support::write_readings(producer, topic, readings.iter().map(|reading| (reading, None))).await;
}

/// A reader on the round's output topic, and how many records it has seen so far.
fn spawn_reader(
    kafka: &Kafka,
    round: &Round,
    consumer: Consumer,
    expected: usize,
) -> (tokio::task::JoinHandle<Arrivals>, Arc<AtomicUsize>) {
    let (servers, topic) = (kafka.bootstrap_servers().to_owned(), round.output.clone());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    (tokio::task::spawn_blocking(move || read_outputs(&servers, &topic, consumer, expected, &counter)), seen)
}

/// Records/s of `consumer` over readings already waiting in the topic.
async fn peak_round(
    kafka: &Kafka,
    servers: &ModelServers,
    consumer: Consumer,
    tag: &str,
    readings: &[SensorReading],
) -> f64 {
    let round = Round::create(kafka, tag).await;
    produce(&load_producer(kafka), &round.readings, readings).await;
    let (reader, _) = spawn_reader(kafka, &round, consumer, readings.len());
    let running = Running::start(consumer, kafka, &round, servers).await;
    let arrivals = reader.await.unwrap();
    if let Running::Processor(processor) = &running {
        let text = processor.admin.metrics().await;
        let stat = |name: &str| test_support::metric_total(&text, name, &[]);
        eprintln!(
            "  processor: {:.1} readings per call, mean Predict {:.2} ms, {} model retries, {} backoffs",
            stat("processor_model_rows_per_call_sum") / stat("processor_model_rows_per_call_count"),
            stat("processor_model_latency_seconds_sum") / stat("processor_model_latency_seconds_count") * 1e3,
            stat("processor_model_retries_total"),
            stat("processor_model_backoffs_total"),
        );
        if consumer == Consumer::BatchedCanary {
            // The rollout is really in progress: both versions scored devices.
            let by_version =
                |v: &str| test_support::metric_total(&text, "processor_scores_total", &[("model_version", v)]);
            let (stable, canary) = (by_version("1"), by_version("2"));
            eprintln!("  rollout: {stable} readings scored by v1 (stable), {canary} by v2 (canary)");
            assert!(stable > 0.0 && canary > 0.0, "a canary rollout in progress scores on both versions");
        }
    }
    running.stop().await;
    (arrivals.records - 1) as f64 / (arrivals.last - arrivals.first).as_secs_f64()
}

/// The processor's per-stage latency figures: (sum of seconds, count) per stage.
const STAGES: [&str; 4] = ["fetch", "call_wait", "call", "produce"];

async fn stage_totals(running: &Running) -> Option<[(f64, f64); 4]> {
    let Running::Processor(processor) = running else { return None };
    let text = processor.admin.metrics().await;
    Some(STAGES.map(|stage| {
        let total = |name| test_support::metric_total(&text, name, &[("stage", stage)]);
        (total("processor_stage_seconds_sum"), total("processor_stage_seconds_count"))
    }))
}

/// CPU time a process has used so far, in seconds (all threads, living or ended), from
/// `/proc/<pid>/stat` (utime + stime, in the kernel's USER_HZ = 100 ticks a second);
/// `pid` "self" for this one.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// What a latency round measured.
struct LatencyRound {
    /// `arrival - event time` of every timed reading, in microseconds, sorted.
    latencies_us: Vec<u64>,
    /// For the processor: the mean time (ms) its readings spent in each stage.
    stages: Option<serde_json::Value>,
    /// CPU cores this whole process (load, readers, model server, consumer under test and,
    /// on the mock cluster, the broker) kept busy while the timed readings went through.
    cpu_cores: f64,
    /// The same for an external broker's process (`VIGIL_BENCH_BROKER_PID`), if named.
    broker_cpu_cores: Option<f64>,
}

/// Latencies of `consumer` under a steady `rate` of readings per second, its stages and the
/// CPU it took.
async fn latency_round(
    kafka: &Kafka,
    servers: &ModelServers,
    consumer: Consumer,
    tag: &str,
    rate: f64,
) -> LatencyRound {
    let round = Round::create(kafka, tag).await;
    let mut fleet =
        support::fleet_readings(CARS, 1 + (WARM_UP_READINGS + (rate * LATENCY_SECONDS) as usize) / CARS, 7).into_iter();
    let timed = (rate * LATENCY_SECONDS) as usize;
    let (reader, seen) = spawn_reader(kafka, &round, consumer, WARM_UP_READINGS + timed);
    let running = Running::start(consumer, kafka, &round, servers).await;
    let producer = load_producer(kafka);
    let warm_up: Vec<SensorReading> = fleet
        .by_ref()
        .take(WARM_UP_READINGS)
        .map(|mut reading| {
            reading.sequence = 0;
            reading
        })
        .collect();
    produce(&producer, &round.readings, &warm_up).await;
    // The group is joined and every partition flowing before the clock starts (looked
    // at often: the clock starts as soon as they are).
    test_support::Poll::within(Duration::from_secs(60))
        .every(Duration::from_millis(10))
        .until("the warm-up readings to come out", async || seen.load(Ordering::Relaxed) >= WARM_UP_READINGS)
        .await;
    let warm = stage_totals(&running).await;
    let broker = std::env::var("VIGIL_BENCH_BROKER_PID").ok();
    let (cpu_before, broker_before) = (cpu_seconds("self"), broker.as_deref().map(cpu_seconds));
    let tick = Duration::from_millis(5);
    let per_tick = rate * tick.as_secs_f64();
    let start = Instant::now();
    let (mut sent, mut deliveries) = (0usize, Vec::with_capacity(timed));
    let mut ticker = tokio::time::interval(tick);
    while sent < timed {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() / tick.as_secs_f64() + 1.0) * per_tick) as usize;
        while sent < due.min(timed) {
            let mut reading = fleet.next().expect("enough readings generated");
            reading.event_time = Some(SystemTime::now().into());
            let payload = reading.encode_to_vec();
            let record = FutureRecord::to(&round.readings).key(reading.device_id.as_bytes()).payload(&payload);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            sent += 1;
        }
    }
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let arrivals = reader.await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let cores = |seconds: f64| (seconds / elapsed * 100.0).round() / 100.0;
    let cpu_cores = cores(cpu_seconds("self") - cpu_before);
    let broker_cpu_cores = broker.as_deref().zip(broker_before).map(|(pid, before)| cores(cpu_seconds(pid) - before));
    let stages = match (warm, stage_totals(&running).await) {
        (Some(before), Some(after)) => {
            let mut breakdown = serde_json::Map::new();
            for (i, stage) in STAGES.iter().enumerate() {
                let (sum, count) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
                let mean_ms = if count > 0.0 { (sum / count * 1e5).round() / 100.0 } else { 0.0 };
                breakdown.insert(format!("{stage}_mean_ms"), json!(mean_ms));
            }
            Some(serde_json::Value::Object(breakdown))
        }
        _ => None,
    };
    running.stop().await;
    let mut latencies = arrivals.latencies_us;
    assert_eq!(latencies.len(), timed, "every timed reading came out once");
    latencies.sort_unstable();
    LatencyRound { latencies_us: latencies, stages, cpu_cores, broker_cpu_cores }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    let index = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    (sorted_us[index] as f64 / 10.0).round() / 100.0
}

/// One latency row: `consumer` at `rate` over the latency rounds.
async fn latency_row(
    kafka: &Kafka,
    servers: &ModelServers,
    run: &str,
    consumer: Consumer,
    rate: f64,
) -> serde_json::Value {
    let mut all = Vec::new();
    let mut by_round = Vec::new();
    for round in 0..LATENCY_ROUNDS {
        let tag = format!("{run}-latency{round}-{}-{rate}", consumer.key()).replace('_', "-");
        let LatencyRound { latencies_us: latencies, stages, cpu_cores, broker_cpu_cores } =
            latency_round(kafka, servers, consumer, &tag, rate).await;
        let (p50, p99) = (percentile_ms(&latencies, 0.5), percentile_ms(&latencies, 0.99));
        eprintln!(
            "{:38} {:44} at {rate} readings/s, round {round}: p50 {p50} ms, p99 {p99} ms, max {} ms; {cpu_cores} cores \
             busy (broker process: {broker_cpu_cores:?}); stages {}",
            kafka.name(),
            consumer.name(),
            percentile_ms(&latencies, 1.0),
            stages.as_ref().map_or(String::new(), |s| s.to_string()),
        );
        by_round.push(json!({
            "p50_ms": p50, "p99_ms": p99, "cpu_cores": cpu_cores, "broker_cpu_cores": broker_cpu_cores, "stages": stages,
        }));
        all.extend(latencies);
    }
    all.sort_unstable();
    json!({
        "consumer": consumer.name(),
        "readings_per_second": rate,
        "readings": all.len(),
        "p50_ms": percentile_ms(&all, 0.5),
        "p99_ms": percentile_ms(&all, 0.99),
        "p999_ms": percentile_ms(&all, 0.999),
        "max_ms": percentile_ms(&all, 1.0),
        "by_round": by_round,
    })
}

async fn measure(kafka: &Kafka, servers: &ModelServers, run: &str) -> serde_json::Value {
    let readings: Vec<SensorReading> = support::fleet_readings(CARS, Consumer::Batched.peak_readings(kafka) / CARS, 11);
    // `VIGIL_BENCH_CONSUMER=batched` (or `per-reading`, `pass-through`,
    // `batched-exactly-once`): peak rounds of that one only, printed, not written; for
    // profiling and tuning (with VIGIL_BENCH_MAX_ROWS, VIGIL_BENCH_CALLS_IN_FLIGHT).
    if let Ok(only) = std::env::var("VIGIL_BENCH_CONSUMER") {
        let consumer = Consumer::parse(&only);
        // `VIGIL_BENCH_RATE=N`: one latency round at N readings/s instead.
        if let Ok(rate) = std::env::var("VIGIL_BENCH_RATE") {
            let tag = format!("{run}-only-latency-{consumer:?}").to_lowercase();
            let rate = rate.parse().expect("VIGIL_BENCH_RATE: readings per second");
            let LatencyRound { latencies_us: latencies, stages, cpu_cores, broker_cpu_cores } =
                latency_round(kafka, servers, consumer, &tag, rate).await;
            let [p50, p99, max] = [0.5, 0.99, 1.0].map(|p| percentile_ms(&latencies, p));
            eprintln!(
                "{} at {rate} readings/s: p50 {p50} ms, p99 {p99} ms, max {max} ms; {cpu_cores} cores busy (broker \
                 process: {broker_cpu_cores:?}); stages {stages:?}",
                consumer.name()
            );
            std::process::exit(0);
        }
        for round in 0..PEAK_ROUNDS {
            let tag = format!("{run}-only{round}-{consumer:?}").to_lowercase();
            let rate = peak_round(kafka, servers, consumer, &tag, &readings[..consumer.peak_readings(kafka)]).await;
            eprintln!("{:38} {:44} round {round}: {rate:>9.0} readings/s", kafka.name(), consumer.name());
        }
        std::process::exit(0);
    }
    let mut peak: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..PEAK_ROUNDS {
        let mut order = vec![
            Consumer::PassThrough,
            Consumer::PerReading,
            Consumer::Batched,
            Consumer::Embedded,
            Consumer::BatchedCanary,
            Consumer::BatchedWindowed,
        ];
        if matches!(kafka, Kafka::Mock(_)) {
            order.push(Consumer::BatchedExactlyOnce);
        }
        if round % 2 == 1 {
            order.reverse();
        }
        for consumer in order {
            let tag = format!("{run}-peak{round}-{consumer:?}").to_lowercase();
            let rate = peak_round(kafka, servers, consumer, &tag, &readings[..consumer.peak_readings(kafka)]).await;
            eprintln!("{:38} {:44} round {round}: {rate:>9.0} readings/s", kafka.name(), consumer.name());
            peak.entry(consumer.key()).or_default().push(rate);
        }
    }
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    // Each mode against the ceiling, round by round (same rounds, so a slow spell on the
    // shared machine hits both alike); the figure is the median of those ratios.
    let share =
        |mode: &str| -> Vec<f64> { peak[mode].iter().zip(&peak["pass_through"]).map(|(p, c)| round3(p / c)).collect() };
    let mut modes = serde_json::Map::new();
    let mut latency_rows = Vec::new();
    for consumer in [
        Consumer::PerReading,
        Consumer::Batched,
        Consumer::Embedded,
        Consumer::BatchedCanary,
        Consumer::BatchedWindowed,
    ] {
        let shares = share(consumer.key());
        let mode_peak = median(peak[consumer.key()].clone());
        eprintln!("  {} at {} of the pass-through ceiling", consumer.name(), median(shares.clone()));
        modes.insert(
            consumer.key().into(),
            json!({
                "readings_per_second": mode_peak.round(),
                "by_round": peak[consumer.key()].iter().map(|r| r.round()).collect::<Vec<_>>(),
                "share_of_ceiling": median(shares.clone()),
                "share_of_ceiling_by_round": shares,
            }),
        );
        latency_rows.push(latency_row(kafka, servers, run, consumer, (mode_peak / 2.0).round()).await);
    }
    // The ceiling's latency at the batched mode's half-peak rate (its own half-peak is far
    // beyond any processor's).
    let batched_half = (median(peak["batched"].clone()) / 2.0).round();
    latency_rows.push(latency_row(kafka, servers, run, Consumer::PassThrough, batched_half).await);
    // At a light 1,000 readings/s: the batched and embedded modes, and the pass-through as
    // the floor that the broker and the clients' settings give on their own.
    for consumer in [Consumer::Batched, Consumer::Embedded, Consumer::PassThrough] {
        latency_rows.push(latency_row(kafka, servers, run, consumer, 1000.0).await);
    }
    // What windows cost per reading: the one-reading model's rate over the windowed one's,
    // round by round.
    let window_costs: Vec<f64> =
        peak["batched"].iter().zip(&peak["batched_windowed"]).map(|(one, windowed)| round3(one / windowed)).collect();
    eprintln!("  windowed scoring costs {}x the one-reading model's per reading", median(window_costs.clone()));
    modes["batched_windowed"]["cost_per_reading_vs_batched"] = json!(median(window_costs.clone()));
    modes["batched_windowed"]["cost_per_reading_vs_batched_by_round"] = json!(window_costs);
    if let Some(exactly_once) = peak.get("batched_exactly_once") {
        let ratios: Vec<f64> = exactly_once.iter().zip(&peak["batched"]).map(|(e, a)| e / a).collect();
        modes.insert(
            "batched_exactly_once".into(),
            json!({
                "readings_per_second": median(exactly_once.clone()).round(),
                "by_round": exactly_once.iter().map(|r| r.round()).collect::<Vec<_>>(),
                "share_of_at_least_once": round3(median(ratios)),
            }),
        );
    }
    json!({
        "broker": kafka.name(),
        "peak": {
            "readings": Consumer::Batched.peak_readings(kafka),
            "readings_one_call_per_reading": Consumer::PerReading.peak_readings(kafka),
            "pass_through_readings_per_second": median(peak["pass_through"].clone()).round(),
            "pass_through_by_round": peak["pass_through"].iter().map(|r| r.round()).collect::<Vec<_>>(),
            "modes": modes,
        },
        "latency": latency_rows,
    })
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let report = runtime.block_on(async {
        let kafka = Kafka::from_env().unwrap();
        let servers = ModelServers::start().await;
        // Distinct topic names per run, so an external broker can be reused.
        let run = format!("{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
        let result = measure(&kafka, &servers, &run).await;
        servers.stop().await;
        result
    });
    let out = support::root().join("benchmarks/results/stream-processor.json");
    // One file holds the latest run per broker.
    let mut results: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|file| file["results"].as_array().cloned())
        .unwrap_or_default();
    results.retain(|row| row["broker"] != report["broker"]);
    results.push(report);
    let file = json!({
        "benchmark": "readings topic -> scores topic through the stream processor (one Predict per reading, batched \
                      calls, batched calls under a canary rollout, batched calls to the windowed v3, to in-process \
                      model servers with batching on; and the model embedded) vs a pass-through consumer -> producer with the processor's Kafka \
                      settings and no RPC, on the same broker; one machine, one process; latency at half of each \
                      mode's own peak and at 1,000/s, stages are the processor's mean processor_stage_seconds per \
                      reading, cpu_cores the whole process's CPU over the round",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "partitions": PARTITIONS, "cars": CARS, "peak_rounds": PEAK_ROUNDS,
        "latency_rounds": LATENCY_ROUNDS, "latency_seconds_per_round": LATENCY_SECONDS,
        "results": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&file).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
