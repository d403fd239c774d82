//! The candidate side of a replay: a model client pinned to the candidate version (checked
//! to be served first), and each record of the range scored with it into a record for the
//! replay's output topic, the devices' windows filled in the partition's order as the live
//! path fills them.

use std::collections::HashMap;

use rdkafka::message::{Message as _, OwnedMessage};
use sensor::SensorReading;

use super::request::Plan;
use super::{ATTEMPTS, ReplayError};
use crate::config::ProcessorConfig;
use crate::metrics::Metrics;
use crate::model::{ModelClient, Retry, ScoreError, SignatureError};
use crate::output::{self, OutKind, OutRecord, Source};
use crate::windows::{Window, Windows};

/// A reading's candidate score, or why there is none.
pub(super) enum Outcome {
    Scored {
        partition: i32,
        offset: i64,
        record: OutRecord,
        score: f32,
        anomaly: bool,
    },
    Failed(String),
    /// Not a valid reading.
    Skipped,
    /// Read before the range only to fill devices' windows.
    History,
}

/// The candidate's client: the processor's model client settings, pinned to the version,
/// after checking the model server serves it. Its calls stay out of the processor's
/// `processor_model_*` metrics, which describe live scoring.
pub(super) async fn candidate(config: &ProcessorConfig, plan: &Plan) -> Result<ModelClient, ReplayError> {
    let mut model_config = config.model.clone();
    model_config.name.clone_from(&plan.model);
    model_config.version = Some(plan.version);
    model_config.version_label = None;
    model_config.concurrency_limit = config.replay_concurrency;
    model_config.calls_in_flight = model_config.calls_in_flight.min(config.replay_concurrency);
    let unseen = Metrics::new(&prometheus::Registry::new()).map_err(|e| ReplayError::Internal(e.to_string()))?;
    let client = ModelClient::new(&model_config, unseen).map_err(ReplayError::Internal)?;
    let what = format!("model {} version {}", plan.model, plan.version);
    let mut backoff = config.model.backoff();
    let mut tries = 0;
    loop {
        tries += 1;
        let error = match client.signature().await {
            Ok(inputs) if inputs.version == plan.version || inputs.version == 0 => return Ok(client),
            Ok(inputs) => {
                return Err(ReplayError::NotServed(format!(
                    "{what}: the model server answered for version {} instead",
                    inputs.version
                )));
            }
            Err(SignatureError::Status(status))
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(ReplayError::NotServed(format!(
                    "{what} is not served by the model server: {}",
                    status.message()
                )));
            }
            Err(SignatureError::Unusable(why)) => {
                return Err(ReplayError::NotServed(format!("the processor cannot score with {what}: {why}")));
            }
            Err(error) => error,
        };
        if tries >= ATTEMPTS {
            return Err(ReplayError::ModelServer(format!("reading {what}'s signature: {error}")));
        }
        backoff.wait().await;
    }
}

/// Decodes and checks a record, and adds a valid reading to its device's window (in the
/// partition's order, as the live path does); `None` for what the live path dead-letters.
pub(super) fn take(
    config: &ProcessorConfig,
    windows: &mut HashMap<i32, Windows>,
    window: usize,
    message: &OwnedMessage,
) -> Option<(SensorReading, Window)> {
    let reading = crate::pipeline::scorable_reading(config, message)?;
    let windows = windows.entry(message.partition()).or_insert_with(|| {
        let mut windows = Windows::new(&config.windows);
        windows.set_keep(window);
        windows
    });
    let window = windows.push(&reading);
    Some((reading, window))
}

/// Scores one record of the range with the candidate (a record before the range only
/// filled its device's window).
pub(super) async fn score(
    model: &ModelClient,
    config: &ProcessorConfig,
    plan: &Plan,
    message: OwnedMessage,
    history: bool,
    taken: Option<(SensorReading, Window)>,
) -> Outcome {
    if history {
        return Outcome::History;
    }
    let Some((reading, window)) = taken else { return Outcome::Skipped };
    let source = Source {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        // A replayed score has no pipeline latency (its pipeline_latency_us is 0): the
        // reading's age says nothing about the candidate.
        timestamp: None,
        headers: Vec::new(),
    };
    // No trace of its own: a replay is not a reading's journey.
    let trace = telemetry::Context::new();
    let mut backoff = config.model.backoff();
    let retry = |_: &str, attempt: u32| {
        if attempt >= ATTEMPTS { Retry::GiveUp } else { Retry::After(backoff.next_delay()) }
    };
    let scored = match model.score_with_retry(&reading, &window, &trace, retry).await {
        Ok(scored) if scored.model_version == plan.version => scored,
        Ok(scored) => {
            return Outcome::Failed(format!(
                "version {} answered instead of the candidate {}",
                scored.model_version, plan.version
            ));
        }
        Err(ScoreError::Rejected(error) | ScoreError::Transient(error)) => return Outcome::Failed(error),
    };
    let score = output::score(&source, &reading, &scored);
    let record = OutRecord {
        topic: plan.output_topic.clone(),
        key: reading.device_id.clone().into_bytes(),
        payload: output::encode_score(config.output_format, &score),
        headers: output::model_headers(&scored).into(),
        kind: OutKind::Score { anomaly: score.is_anomaly },
        // Written now: a replay's records are a new run's, not the readings' history.
        timestamp: None,
    };
    Outcome::Scored {
        partition: source.partition,
        offset: source.offset,
        record,
        score: score.score,
        anomaly: score.is_anomaly,
    }
}
