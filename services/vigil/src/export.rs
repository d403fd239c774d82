//! `vigil export-readings`: a time range of the readings topic as JSON lines, one reading
//! per line in the format `device-simulator generate` writes, so the model's training
//! script learns from what a fleet really sent as easily as from simulated files
//! (`deploy/models/train_car_anomaly.py --kafka-brokers ...`).
//!
//! The range is read as a replay reads it ([`stream_processor::replay::range`]): partitions
//! assigned, never subscribed, so no consumer group is joined and nothing is committed;
//! readings by Kafka timestamp in `[from, to)`, each partition up to its first record at or
//! past `to` (a partition's timestamps rise, as producers' create times do). A record that
//! is not a `SensorReading` is skipped and counted, not fatal (the topic is the pipeline's,
//! but anything may write to it). The file is written as `<out>.partial` and renamed once
//! complete, so a failed or interrupted export leaves no half file under the name a training
//! run reads; `--max-readings` bounds its size.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use prost::Message as _;
use rdkafka::message::Message as _;
use sensor::SensorReading;
use stream_processor::config::{DEFAULT_READINGS_TOPIC, ProcessorConfig};
use stream_processor::replay::range::{self, Take};
use stream_processor::replay::request::millis;

use crate::replay::parse_time;

/// `vigil export-readings`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Kafka's bootstrap servers.
    #[arg(long, env = "VIGIL_KAFKA_BROKERS", value_name = "HOST:PORT,...")]
    kafka_brokers: String,
    /// A librdkafka property for the cluster (security.protocol, sasl.*, ssl.*), repeatable.
    #[arg(short = 'X', long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// The readings topic.
    #[arg(long, default_value = DEFAULT_READINGS_TOPIC, value_name = "TOPIC")]
    topic: String,
    /// The range's start (readings by Kafka timestamp): RFC 3339 (2026-01-01T12:00:00Z) or
    /// relative to now (-15m, -2h, -1d, -90s).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    from: String,
    /// The range's end, exclusive: RFC 3339, relative to now, or `now`.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, default_value = "now")]
    to: String,
    /// The JSON-lines file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Refuse a range with more readings than this (about 600 bytes each in the file).
    #[arg(long, value_name = "N", default_value_t = 2_000_000)]
    max_readings: u64,
}

/// What an export read and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub readings: u64,
    /// Records in the range that are not a `SensorReading`.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    BadArgument(String),
    #[error("reading {topic}: {source}")]
    Kafka { topic: String, source: range::RangeError },
    #[error("the range holds more than --max-readings {0} readings: narrow it or raise the limit")]
    TooMany(u64),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Runs `vigil export-readings ...`: exit 0 with the file written, 2 with an error.
pub fn main(args: ExportArgs) -> ExitCode {
    match export(&args) {
        Ok(exported) => {
            eprintln!(
                "wrote {} readings to {}{}",
                exported.readings,
                args.out.display(),
                if exported.skipped > 0 {
                    format!(" ({} records that are not a SensorReading skipped)", exported.skipped)
                } else {
                    String::new()
                }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

/// Writes the range's readings to `args.out`. Blocking.
pub fn export(args: &ExportArgs) -> Result<Exported, ExportError> {
    let now = SystemTime::now();
    let bound_ms = |flag: &str, text: &str| {
        let time = parse_time(flag, text, now).map_err(|failure| ExportError::BadArgument(failure.to_string()))?;
        millis(&time).ok_or_else(|| ExportError::BadArgument(format!("{flag} {text:?} is out of range")))
    };
    let (from, to) = (bound_ms("--from", &args.from)?, bound_ms("--to", &args.to)?);
    if from >= to {
        return Err(ExportError::BadArgument(format!("--from {} is not before --to {}", args.from, args.to)));
    }
    let mut config = ProcessorConfig::default();
    config.kafka.insert("bootstrap.servers".into(), args.kafka_brokers.clone());
    for property in &args.kafka_properties {
        let (key, value) = property.split_once('=').ok_or_else(|| {
            ExportError::BadArgument(format!("-X {property:?} is not KEY=VALUE (e.g. -X security.protocol=SSL)"))
        })?;
        config.kafka.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    let kafka = |source| ExportError::Kafka { topic: args.topic.clone(), source };
    let group = format!("vigil-export-{}", std::process::id());
    let consumer = range::consumer(&config, &group).map_err(|error| kafka(error.into()))?;
    let spans = range::spans(&consumer, &args.topic, from).map_err(kafka)?;

    let partial = partial_path(&args.out);
    let write = |source| ExportError::Write { path: partial.display().to_string(), source };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(write)?);
    let mut exported = Exported::default();
    let mut failure = None;
    let scanned = range::scan(&consumer, &args.topic, &spans, &AtomicBool::new(false), |message| {
        let Some(timestamp) = message.timestamp().to_millis() else { return Take::Next };
        if timestamp >= to {
            return Take::PartitionDone;
        }
        if timestamp < from {
            return Take::Next;
        }
        let Some(reading) = message.payload().and_then(|payload| SensorReading::decode(payload).ok()) else {
            exported.skipped += 1;
            return Take::Next;
        };
        if exported.readings >= args.max_readings {
            failure = Some(ExportError::TooMany(args.max_readings));
            return Take::Stop;
        }
        if let Err(error) = writeln!(out, "{}", sensor::json::to_json(&reading)) {
            failure = Some(write(error));
            return Take::Stop;
        }
        exported.readings += 1;
        Take::Next
    });
    let finished = match (scanned, failure) {
        (Err(error), _) => Err(kafka(error)),
        (Ok(()), Some(failure)) => Err(failure),
        (Ok(()), None) => out.flush().map_err(write),
    };
    drop(out);
    if let Err(error) = finished {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, &args.out)
        .map_err(|source| ExportError::Write { path: args.out.display().to_string(), source })?;
    Ok(exported)
}

/// Where the file is written until it is complete.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}
