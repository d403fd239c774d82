//! `vigil replay`: re-score a time range of the readings topic through a candidate model
//! version on a running stream processor (its `vigil.replay.v1.ReplayService`), and print
//! how the candidate differs from what the live model scored on the same readings.
//!
//! A thin client, like `vigil rollout`: clap checks types and turns relative times into
//! timestamps; the processor checks everything else and its message is printed as it is.
//! Exit status: 0 when the report passes, 1 when it fails (each breached bound printed,
//! with the flag that sets it), 2 when there is no report (a refused request, an
//! unreachable processor).
//!
//! `--json` prints the report with the proto's field names:
//!
//! ```text
//! {"model", "candidate_version", "output_topic", "replayed", "compared", "failed", "skipped",
//!  "candidate_anomaly_rate", "live_anomaly_rate", "agreement", "mean_score_difference",
//!  "score_shift", "score_p_value", "live_versions", "passed", "reasons",
//!  "bounds": {"max_anomaly_rate_difference", "min_agreement", "max_score_shift",
//!             "min_compared", "score_significance", "max_failure_rate"}}
//! ```

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use proto::vigil::replay::v1 as pb;
use proto::vigil::replay::v1::replay_service_client::ReplayServiceClient;
use serde_json::{Value, json};

use crate::dial::{DialArgs, DialError};
use crate::grpc_errors::code_name;

/// The stream processor's default gRPC address on this machine (its `grpc_listen`, and
/// `vigil up`'s `--processor-grpc-port`).
pub const DEFAULT_PROCESSOR: &str = "http://127.0.0.1:50062";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `vigil replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The stream processor's gRPC address.
    #[arg(long, env = "VIGIL_PROCESSOR", default_value = DEFAULT_PROCESSOR, value_name = "URL")]
    processor: String,
    /// The range's start (readings by Kafka timestamp): RFC 3339 (2026-01-01T12:00:00Z) or
    /// relative to now (-15m, -2h, -1d, -90s).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    from: String,
    /// The range's end, exclusive: RFC 3339, relative to now, or `now`.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, default_value = "now")]
    to: String,
    /// The model [the processor's].
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// The candidate version.
    #[arg(long, value_name = "N")]
    version: i64,
    /// Where the candidate's score records go [vigil-replay-v<N>-<unix time>].
    #[arg(long, value_name = "TOPIC")]
    output_topic: Option<String>,
    #[command(flatten)]
    bounds: BoundsArgs,
    /// Print the report as JSON (the proto's field names) instead of text.
    #[arg(long)]
    json: bool,
    /// TLS and credentials for --processor.
    #[command(flatten)]
    dial: DialArgs,
}

/// The verdict's bounds; unset ones are sent as zero, which the processor reads as its
/// default (shown in brackets).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BoundsArgs {
    /// |candidate anomaly rate - live anomaly rate|, at most [0.05].
    #[arg(long, value_name = "X")]
    max_anomaly_rate_difference: Option<f64>,
    /// Share of readings both flag or both pass, at least [0.9].
    #[arg(long, value_name = "X")]
    min_agreement: Option<f64>,
    /// |P(candidate score > live score) - 1/2|, at most [0.2] ...
    #[arg(long, value_name = "X")]
    max_score_shift: Option<f64>,
    /// ... when the Mann-Whitney p-value is below this [0.001].
    #[arg(long, value_name = "X")]
    score_significance: Option<f64>,
    /// Readings compared with their live scores, at least [100].
    #[arg(long, value_name = "N")]
    min_compared: Option<u64>,
    /// Readings the candidate failed to score, at most this share [0.01].
    #[arg(long, value_name = "X")]
    max_failure_rate: Option<f64>,
}

impl BoundsArgs {
    pub fn to_proto(&self) -> pb::Bounds {
        pb::Bounds {
            max_anomaly_rate_difference: self.max_anomaly_rate_difference.unwrap_or_default(),
            min_agreement: self.min_agreement.unwrap_or_default(),
            max_score_shift: self.max_score_shift.unwrap_or_default(),
            min_compared: self.min_compared.unwrap_or_default(),
            score_significance: self.score_significance.unwrap_or_default(),
            max_failure_rate: self.max_failure_rate.unwrap_or_default(),
        }
    }
}

/// The bounds by the names the processor's reasons use, with the flags that set them.
const BOUND_FLAGS: [(&str, &str); 6] = [
    ("max_anomaly_rate_difference", "--max-anomaly-rate-difference"),
    ("min_agreement", "--min-agreement"),
    ("max_score_shift", "--max-score-shift"),
    ("score_significance", "--score-significance"),
    ("min_compared", "--min-compared"),
    ("max_failure_rate", "--max-failure-rate"),
];

/// Why there is no report.
#[derive(Debug)]
pub enum Failure {
    /// A flag's value is unusable.
    BadArgument(String),
    /// No connection to the processor.
    Unreachable { processor: String, why: String },
    /// The processor answered with an error.
    Refused(tonic::Status),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadArgument(why) => write!(f, "{why}"),
            Self::Unreachable { processor, why } => write!(
                f,
                "cannot reach the stream processor at {processor} ({why}); pass --processor URL or set VIGIL_PROCESSOR"
            ),
            Self::Refused(status) => write!(f, "{}: {}", code_name(status.code()), status.message()),
        }
    }
}

/// Runs `vigil replay ...` to completion.
pub fn main(args: ReplayArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(2)
        }
    }
}

/// Whether the report passed.
async fn run(args: ReplayArgs) -> Result<bool, Failure> {
    let now = SystemTime::now();
    let from = parse_time("--from", &args.from, now)?;
    let to = parse_time("--to", &args.to, now)?;
    let request = pb::ReplayRequest {
        from: Some(from),
        to: Some(to),
        model: args.model.unwrap_or_default(),
        candidate_version: args.version,
        output_topic: args.output_topic.unwrap_or_else(|| default_output_topic(args.version, now)),
        bounds: Some(args.bounds.to_proto()),
    };
    let report = replay(&args.processor, &args.dial, request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report)).unwrap_or_default());
    } else {
        print!("{}", render(&report, &from, &to));
    }
    Ok(report.passed)
}

/// Runs one replay on the processor at `processor` (dialed with `dial`'s TLS and token) and
/// returns its report.
pub async fn replay(processor: &str, dial: &DialArgs, request: pb::ReplayRequest) -> Result<pb::ReplayReport, Failure> {
    // No request timeout: a replay takes as long as its range takes to score (Ctrl-C
    // cancels it on the processor too).
    let channel =
        dial.connect(processor, |endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT)).await.map_err(|e| match e {
            DialError::BadUrl(why) => Failure::BadArgument(format!("--processor {processor:?} is not a URL ({why})")),
            DialError::Setup(why) => Failure::BadArgument(why),
            DialError::Unreachable(why) => Failure::Unreachable { processor: processor.to_owned(), why },
        })?;
    let mut client = ReplayServiceClient::new(channel);
    Ok(client.replay(request).await.map_err(Failure::Refused)?.into_inner())
}

/// An output topic no earlier replay used.
pub fn default_output_topic(version: i64, now: SystemTime) -> String {
    let seconds = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("vigil-replay-v{version}-{seconds}")
}

/// `now`, a time relative to `now` (`-15m`: `s`, `m`, `h` or `d`), or RFC 3339.
pub fn parse_time(flag: &str, text: &str, now: SystemTime) -> Result<prost_types::Timestamp, Failure> {
    let bad = || {
        Failure::BadArgument(format!(
            "{flag} {text:?} is not a time: give RFC 3339 (2026-01-01T12:00:00Z), `now`, or a time before now \
             such as -15m, -2h, -1d, -90s"
        ))
    };
    let text = text.trim();
    let time = if text == "now" {
        now
    } else if let Some(relative) = text.strip_prefix('-') {
        let split = relative.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (count, unit) = relative.split_at(split);
        let count: u64 = count.parse().map_err(|_| bad())?;
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        now.checked_sub(Duration::from_secs(count.checked_mul(unit).ok_or_else(bad)?)).ok_or_else(bad)?
    } else {
        let parsed = DateTime::parse_from_rfc3339(text).map_err(|_| bad())?;
        let nanos = parsed.timestamp_nanos_opt().ok_or_else(bad)?;
        let nanos = u64::try_from(nanos).map_err(|_| bad())?;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
    };
    let since = time.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| bad())?;
    Ok(prost_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 })
}

fn utc(time: &prost_types::Timestamp) -> String {
    DateTime::<Utc>::from_timestamp(time.seconds, time.nanos.max(0) as u32)
        .map_or_else(|| format!("{time}"), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// The report as `label: value` lines, then each breached bound on its own line.
pub fn render(report: &pb::ReplayReport, from: &prost_types::Timestamp, to: &prost_types::Timestamp) -> String {
    let bounds = report.bounds.unwrap_or_default();
    let versions: Vec<String> = report.live_versions.iter().map(i64::to_string).collect();
    let live = match versions.len() {
        0 => "no live scores found".to_owned(),
        1 => format!("live version {}", versions[0]),
        _ => format!("live versions {}", versions.join(", ")),
    };
    let lines = [
        ("candidate", format!("{} version {} against {live}", report.model, report.candidate_version)),
        ("range", format!("{} to {}", utc(from), utc(to))),
        ("output topic", report.output_topic.clone()),
        (
            "readings",
            format!(
                "{} replayed, {} compared with their live scores, {} failed, {} skipped (not readings)",
                report.replayed, report.compared, report.failed, report.skipped
            ),
        ),
        (
            "anomaly rate",
            format!(
                "candidate {:.4}, live {:.4} (may differ by {})",
                report.candidate_anomaly_rate, report.live_anomaly_rate, bounds.max_anomaly_rate_difference
            ),
        ),
        ("agreement", format!("{:.4} (at least {})", report.agreement, bounds.min_agreement)),
        (
            "scores",
            format!(
                "candidate - live {:+.4} on average; shift {:+.3}, Mann-Whitney p = {:.2e} (fails beyond {} when p < {})",
                report.mean_score_difference,
                report.score_shift,
                report.score_p_value,
                bounds.max_score_shift,
                bounds.score_significance
            ),
        ),
        (
            "verdict",
            if report.passed {
                "passed".to_owned()
            } else {
                format!("FAILED ({} of the bounds)", report.reasons.len())
            },
        ),
    ];
    let mut text: String = lines.iter().map(|(label, value)| format!("{:<14}{value}\n", format!("{label}:"))).collect();
    for reason in &report.reasons {
        let flag = BOUND_FLAGS.iter().find(|(name, _)| reason.contains(name)).map(|(_, flag)| format!(" ({flag})"));
        text.push_str(&format!("  - {reason}{}\n", flag.unwrap_or_default()));
    }
    text
}

pub fn report_json(report: &pb::ReplayReport) -> Value {
    let bounds = report.bounds.unwrap_or_default();
    json!({
        "model": report.model,
        "candidate_version": report.candidate_version,
        "output_topic": report.output_topic,
        "replayed": report.replayed,
        "compared": report.compared,
        "failed": report.failed,
        "skipped": report.skipped,
        "candidate_anomaly_rate": report.candidate_anomaly_rate,
        "live_anomaly_rate": report.live_anomaly_rate,
        "agreement": report.agreement,
        "mean_score_difference": report.mean_score_difference,
        "score_shift": report.score_shift,
        "score_p_value": report.score_p_value,
        "live_versions": report.live_versions,
        "passed": report.passed,
        "reasons": report.reasons,
        "bounds": {
            "max_anomaly_rate_difference": bounds.max_anomaly_rate_difference,
            "min_agreement": bounds.min_agreement,
            "max_score_shift": bounds.max_score_shift,
            "min_compared": bounds.min_compared,
            "score_significance": bounds.score_significance,
            "max_failure_rate": bounds.max_failure_rate,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn times_are_rfc3339_now_or_before_now() {
        let now = at(1_767_225_600);
        let seconds = |text: &str| parse_time("--from", text, now).map(|t| t.seconds).map_err(|e| e.to_string());
        assert_eq!(seconds("now"), Ok(1_767_225_600));
        assert_eq!(seconds("-15m"), Ok(1_767_225_600 - 900));
        assert_eq!(seconds("-2h"), Ok(1_767_225_600 - 7200));
        assert_eq!(seconds("-1d"), Ok(1_767_225_600 - 86_400));
        assert_eq!(seconds("-90s"), Ok(1_767_225_510));
        assert_eq!(seconds("2026-01-01T01:00:00Z"), Ok(1_767_229_200));
        assert_eq!(seconds("2026-01-01T02:00:00+01:00"), Ok(1_767_229_200));
        let nanos = parse_time("--to", "2026-01-01T00:00:00.25Z", now).unwrap().nanos;
        assert_eq!(nanos, 250_000_000);
        for bad in ["15m", "-15", "-15w", "yesterday", "-m"] {
            let error = seconds(bad).unwrap_err();
            assert!(error.starts_with(&format!("--from {bad:?} is not a time")), "{error}");
        }
    }

    fn report(passed: bool) -> pb::ReplayReport {
        pb::ReplayReport {
            model: "car-anomaly".into(),
            candidate_version: 3,
            output_topic: "vigil-replay-v3".into(),
            replayed: 400,
            compared: 398,
            failed: 0,
            candidate_anomaly_rate: 1.0,
            live_anomaly_rate: 0.055,
            agreement: 0.055,
            mean_score_difference: 9.87,
            score_shift: 0.5,
            score_p_value: 1e-50,
            live_versions: vec![1, 2],
            passed,
            reasons: if passed {
                vec![]
            } else {
                vec![
                    "anomaly rate 1.0000 against live 0.0550: a difference of 0.9450, more than max_anomaly_rate_difference 0.05".into(),
                    "agreement 0.0550, less than min_agreement 0.9".into(),
                ]
            },
            skipped: 2,
            bounds: Some(stream_processor::replay::request::DEFAULT_BOUNDS),
        }
    }

    #[test]
    fn text_names_each_breached_bound_with_its_flag() {
        let (from, to) = (
            prost_types::Timestamp { seconds: 1_767_225_600, nanos: 0 },
            prost_types::Timestamp { seconds: 1_767_226_500, nanos: 0 },
        );
        let text = render(&report(false), &from, &to);
        assert!(text.contains("candidate:    car-anomaly version 3 against live versions 1, 2\n"), "{text}");
        assert!(text.contains("range:        2026-01-01 00:00:00 UTC to 2026-01-01 00:15:00 UTC\n"), "{text}");
        assert!(text.contains("readings:     400 replayed, 398 compared"), "{text}");
        assert!(text.contains("verdict:      FAILED (2 of the bounds)\n"), "{text}");
        assert!(text.contains("max_anomaly_rate_difference 0.05 (--max-anomaly-rate-difference)\n"), "{text}");
        assert!(text.contains("  - agreement 0.0550, less than min_agreement 0.9 (--min-agreement)\n"), "{text}");
        let passed = render(&report(true), &from, &to);
        assert!(passed.contains("verdict:      passed\n") && !passed.contains("  - "), "{passed}");
    }

    #[test]
    fn json_uses_the_proto_field_names() {
        let value = report_json(&report(false));
        assert_eq!(value["passed"], false);
        assert_eq!(value["live_versions"], json!([1, 2]));
        assert_eq!(value["bounds"]["min_compared"], 100);
        assert_eq!(value["reasons"].as_array().map(Vec::len), Some(2));
    }
}
