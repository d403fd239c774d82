//! Watches the pipeline from the outside, the way a dashboard would: a plain Kafka
//! consumer (no group) tails the readings, scores, anomalies, alerts and dead-letter
//! topics from where they stood when the run began, and keeps what the live view and the
//! summary need: counts, each device's score order, end-to-end latency, detection against
//! the simulator's labels (which every score carries), and the alerts the rules fired.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use prost::Message as _;
use proto::vigil::alerts::v1::Alert;
use proto::vigil::scoring::v1::{Anomaly, Score};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sensor::FaultKind;

/// The topics of one run.
#[derive(Debug, Clone)]
pub struct Topics {
    pub readings: String,
    pub scores: String,
    pub anomalies: String,
    /// Ingest's (readings it could not accept) and the processor's (readings it could
    /// not score).
    pub dead_letters: [String; 2],
    /// The alerts service's output, its window state, and its dead letters (score records
    /// it could not read).
    pub alerts: String,
    pub alerts_changelog: String,
    pub alert_dead_letters: String,
}

/// Readings against detections, counted over scores (each carries its reading's label).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Confusion {
    pub true_positives: u64,
    pub false_positives: u64,
    pub false_negatives: u64,
    pub true_negatives: u64,
}

impl Confusion {
    pub fn precision(&self) -> Option<f64> {
        let flagged = self.true_positives + self.false_positives;
        (flagged > 0).then(|| self.true_positives as f64 / flagged as f64)
    }

    pub fn recall(&self) -> Option<f64> {
        let faulty = self.true_positives + self.false_negatives;
        (faulty > 0).then(|| self.true_positives as f64 / faulty as f64)
    }
}

/// An anomaly as the live view shows it.
#[derive(Debug, Clone)]
pub struct AnomalySeen {
    pub device_id: String,
    pub score: f32,
    pub threshold: f32,
    pub model: String,
    pub version: i64,
    /// The simulator's label for the reading (`None` for a healthy one: a false alarm).
    pub fault: FaultKind,
}

/// A distinct scored reading, as an alert rule sees it.
#[derive(Debug, Clone)]
pub struct ScoredReading {
    /// The scores topic's partition (alert windows close on their partition's progress).
    pub partition: i32,
    pub device_id: String,
    pub event_time_ms: i64,
    pub is_anomaly: bool,
    pub faulty: bool,
    /// The injected fault's kind, when `faulty`.
    pub fault: Option<String>,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub readings: u64,
    pub dead_letters: u64,
    /// Score records, repeats included.
    pub score_records: u64,
    /// Distinct (device, sequence) scored.
    pub scored: u64,
    pub anomalies: u64,
    pub anomalous_devices: HashSet<String>,
    pub confusion: Confusion,
    pub by_model_version: BTreeMap<i64, u64>,
    /// Per injected fault kind: (readings flagged, readings).
    pub by_fault: BTreeMap<String, (u64, u64)>,
    /// Devices whose scores arrived out of sequence order (first arrivals only).
    pub out_of_order: BTreeMap<String, (u64, u64)>,
    /// The processor's latency per distinct score (the reading's Kafka timestamp to its
    /// score handed to Kafka), in ms.
    pub latencies_ms: Vec<f64>,
    /// Anomalies not yet shown by the live view.
    pub unshown: Vec<AnomalySeen>,
    /// Every distinct reading scored, in arrival order.
    pub scored_readings: Vec<ScoredReading>,
    /// Alert records, repeats included; the distinct alerts by id.
    pub alert_records: u64,
    pub alerts: BTreeMap<String, Alert>,
    pub alert_dead_letters: u64,
    /// Alerts not yet shown by the live view.
    pub unshown_alerts: Vec<Alert>,
    seen: HashSet<(String, u64)>,
    last_sequence: HashMap<String, u64>,
}

impl Observed {
    fn score(&mut self, partition: i32, score: Score) {
        self.score_records += 1;
        if !self.seen.insert((score.device_id.clone(), score.sequence)) {
            return; // a repeat (at-least-once): counted once
        }
        self.scored += 1;
        if let Some(last) = self.last_sequence.insert(score.device_id.clone(), score.sequence)
            && last >= score.sequence
        {
            self.out_of_order.entry(score.device_id.clone()).or_insert((last, score.sequence));
        }
        *self.by_model_version.entry(score.model_version).or_default() += 1;
        let faulty = score.fault() != FaultKind::None && score.fault() != FaultKind::Unspecified;
        let fault = faulty.then(|| sensor::fault_name(score.fault()));
        if let Some(kind) = &fault {
            let (flagged, readings) = self.by_fault.entry(kind.clone()).or_default();
            *flagged += u64::from(score.is_anomaly);
            *readings += 1;
        }
        let confusion = &mut self.confusion;
        match (score.is_anomaly, faulty) {
            (true, true) => confusion.true_positives += 1,
            (true, false) => confusion.false_positives += 1,
            (false, true) => confusion.false_negatives += 1,
            (false, false) => confusion.true_negatives += 1,
        }
        self.latencies_ms.push(score.pipeline_latency_us as f64 / 1000.0);
        self.scored_readings.push(ScoredReading {
            partition,
            event_time_ms: score.event_time.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000)),
            device_id: score.device_id,
            is_anomaly: score.is_anomaly,
            faulty,
            fault,
        });
    }

    fn alert(&mut self, alert: Alert) {
        self.alert_records += 1;
        if !self.alerts.contains_key(&alert.id) {
            self.unshown_alerts.push(alert.clone());
            self.alerts.insert(alert.id.clone(), alert);
        }
    }

    /// Devices with at least one reading scored while its injected fault was under way.
    pub fn faulty_devices(&self) -> HashSet<&str> {
        self.scored_readings.iter().filter(|r| r.faulty).map(|r| r.device_id.as_str()).collect()
    }

    fn anomaly(&mut self, anomaly: Anomaly) {
        let Some(score) = anomaly.score else { return };
        self.anomalies += 1;
        if self.anomalous_devices.insert(score.device_id.clone()) || self.unshown.len() < 3 {
            self.unshown.push(AnomalySeen {
                device_id: score.device_id.clone(),
                score: score.score,
                threshold: score.threshold,
                model: score.model_name.clone(),
                version: score.model_version,
                fault: score.fault(),
            });
        }
    }

    /// The `p`th percentile (0-1) of the latencies after the first `from`.
    pub fn latency_percentile(&self, from: usize, p: f64) -> Option<f64> {
        let mut recent: Vec<f64> = self.latencies_ms.get(from..)?.to_vec();
        if recent.is_empty() {
            return None;
        }
        recent.sort_by(f64::total_cmp);
        let index = ((recent.len() as f64 * p).ceil() as usize).clamp(1, recent.len()) - 1;
        Some(recent[index])
    }
}

pub struct Observer {
    state: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    /// Starts tailing `topics` on `servers` from their current ends.
    pub fn start(servers: &str, topics: &Topics) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", "vigil-up-observer") // required by librdkafka; nothing is committed
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("the observer's Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        let all = [
            &topics.readings,
            &topics.scores,
            &topics.anomalies,
            &topics.dead_letters[0],
            &topics.dead_letters[1],
            &topics.alerts,
            &topics.alert_dead_letters,
        ];
        for topic in all {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("metadata of {topic}"))?;
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let (_, high) = consumer
                    .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                    .with_context(|| format!("the end of {topic} [{}]", partition.id()))?;
                assignment.add_partition_offset(topic, partition.id(), Offset::Offset(high))?;
            }
        }
        consumer.assign(&assignment)?;
        let state = Arc::new(Mutex::new(Observed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, topics) = (state.clone(), stop.clone(), topics.clone());
            std::thread::Builder::new().name("vigil-observer".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else { continue };
                    let payload = message.payload().unwrap_or_default();
                    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                    let topic = message.topic();
                    if topic == topics.readings {
                        state.readings += 1;
                    } else if topic == topics.scores {
                        if let Ok(score) = Score::decode(payload) {
                            state.score(message.partition(), score);
                        }
                    } else if topic == topics.anomalies {
                        if let Ok(anomaly) = Anomaly::decode(payload) {
                            state.anomaly(anomaly);
                        }
                    } else if topic == topics.alerts {
                        if let Ok(alert) = Alert::decode(payload) {
                            state.alert(alert);
                        }
                    } else if topic == topics.alert_dead_letters {
                        state.alert_dead_letters += 1;
                    } else {
                        state.dead_letters += 1;
                    }
                }
            })?
        };
        Ok(Self { state, stop, thread: Some(thread) })
    }

    pub fn state(&self) -> MutexGuard<'_, Observed> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops tailing and returns what was observed.
    pub fn finish(mut self) -> Observed {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.state())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
