//! `vigil rollout ...`: start, inspect, steer and end a model's canary rollout on a running
//! model server, through its `vigil.rollout.v1.RolloutService`.
//!
//! A thin client on purpose: clap checks types, the server checks everything else (ranges,
//! versions, phases) and its message is printed as it is, so the CLI, the rollout file and
//! any other gRPC client report a bad value in the same words. A server error prints
//! `error: <grpc code>: <server message>`; an unreachable server names the URL; both exit 1.
//!
//! `--json` prints, instead of text, a Rollout with the proto's field names (so scripts
//! written against the gRPC API read it unchanged) and the phase as a lowercase string:
//!
//! ```text
//! {"spec": {"model", "stable_version", "canary_version", "canary_weight_percent",
//!           "shadow_percent",
//!           "analysis": null | {"step_weights_percent", "interval_seconds", "failure_limit",
//!                               "min_samples", "max_error_rate_increase",
//!                               "max_latency_p99_ratio", "max_anomaly_rate_difference",
//!                               "score_significance", "max_score_shift"}},
//!  "phase": "progressing" | "manual" | "promoted" | "rolled_back" | "aborted",
//!  "canary_weight_percent", "step", "failures", "revision", "last_decision",
//!  "updated_unix_ms", "source": "api" | "file", "updated_by"}
//! ```
//!
//! `list --json` prints `{"rollouts": [...]}`; `watch --json` prints one Rollout per line
//! (JSON Lines), one per revision.
//!
//! `start --require-replay-from TIME` first replays the readings since TIME through the
//! canary on the stream processor (`--processor`, see [`crate::replay`]) and starts the
//! rollout only if that report passes; a failing report is printed and nothing starts.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use proto::vigil::rollout::v1 as pb;
use proto::vigil::rollout::v1::rollout_service_client::RolloutServiceClient;
use serde_json::json;

use crate::dial::{DialArgs, DialError, Dialed};
use crate::grpc_errors::{code_name, error_chain};

mod render;

use render::{pretty, render, render_list, rollout_json, watch_line};

/// TF Serving's gRPC port on this machine: where `vigil up` and `model-server` listen by
/// default.
const DEFAULT_SERVER: &str = "http://127.0.0.1:8500";

/// Long enough for a change to go through the Kafka state topic (the server waits up to
/// 10 s for it to come back), short enough that a stuck server does not hang a script.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `vigil rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// The model server's gRPC address.
    #[arg(long, global = true, env = "VIGIL_MODEL_SERVER", default_value = DEFAULT_SERVER, value_name = "URL")]
    server: String,
    /// Print JSON (the proto's field names) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// TLS and credentials for --server (not for --processor).
    #[command(flatten)]
    dial: DialArgs,
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RolloutCommand {
    /// Start a rollout: a share of the requests that pin no version go to the canary.
    /// Manual unless an analysis option is given, in which case the server steps the weight
    /// and promotes or rolls back on its own.
    Start(Box<StartArgs>),
    /// Show one model's rollout.
    Status { model: String },
    /// List every model's rollout, finished ones included.
    List,
    /// Set the canary's weight by hand (an analysis plan, if any, stops).
    #[command(allow_negative_numbers = true)]
    SetWeight {
        model: String,
        #[arg(value_name = "PCT")]
        percent: f64,
    },
    /// Send all unpinned traffic to the canary now.
    Promote { model: String },
    /// Send all unpinned traffic back to the stable version now.
    Abort {
        model: String,
        /// Why, for the rollout's history and its event.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a line at every change of the rollout; exit 0 once it is promoted, rolled back
    /// or aborted. A server that goes away (a restart, a rolling update) is polled again
    /// for up to a minute before the watch gives up.
    Watch {
        model: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        every_seconds: u64,
    },
}

#[derive(Debug, clap::Args)]
#[command(allow_negative_numbers = true)]
struct StartArgs {
    /// The model, as the server names it.
    model: String,
    /// The version answering the rest of the traffic.
    #[arg(long, value_name = "N")]
    stable: i64,
    /// The version being rolled out.
    #[arg(long, value_name = "N")]
    canary: i64,
    /// The canary's first weight; with analysis, 0 starts at the first step.
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    weight: f64,
    /// Share of stable's requests the canary also scores in shadow (answer discarded).
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    shadow: f64,
    /// Judge the canary automatically (server defaults for anything not given).
    #[arg(long)]
    analysis: bool,
    #[command(flatten)]
    plan: PlanArgs,
    /// First replay the readings since TIME (RFC 3339, or -1h style) through the canary on
    /// the stream processor (`vigil replay`, default bounds), and start only if the report
    /// passes.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    require_replay_from: Option<String>,
    /// The stream processor that runs the replay.
    #[arg(long, env = "VIGIL_PROCESSOR", default_value = crate::replay::DEFAULT_PROCESSOR, value_name = "URL")]
    processor: String,
    /// Where the replay's scores go [vigil-replay-v<canary>-<unix time>].
    #[arg(long, value_name = "TOPIC")]
    replay_output_topic: Option<String>,
}

/// The analysis options; unset ones are sent as zero, which the server reads as its
/// default (shown in brackets).
#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// Canary weights to step through, ascending [5,25,50].
    #[arg(long, value_name = "PCT,...", value_delimiter = ',')]
    steps: Vec<f64>,
    /// Seconds between checks [60].
    #[arg(long, value_name = "N")]
    interval_seconds: Option<u32>,
    /// Failed checks that roll the canary back [2].
    #[arg(long, value_name = "N")]
    failure_limit: Option<u32>,
    /// Requests and scored rows each side needs before a check counts [200].
    #[arg(long, value_name = "N")]
    min_samples: Option<u32>,
    /// Canary error rate minus stable's, at most [0.01].
    #[arg(long, value_name = "X")]
    max_error_rate_increase: Option<f64>,
    /// Canary p99 latency over stable's, at most [1.5].
    #[arg(long, value_name = "X")]
    max_latency_p99_ratio: Option<f64>,
    /// |canary anomaly rate - stable's|, at most [0.05].
    #[arg(long, value_name = "X")]
    max_anomaly_rate_difference: Option<f64>,
    /// A score shift fails a check when the Mann-Whitney p-value is below this [0.001] ...
    #[arg(long, value_name = "X")]
    score_significance: Option<f64>,
    /// ... and |P(canary score > stable score) - 1/2| is above this [0.2].
    #[arg(long, value_name = "X")]
    max_score_shift: Option<f64>,
}

impl PlanArgs {
    fn given(&self) -> bool {
        !self.steps.is_empty()
            || [self.interval_seconds, self.failure_limit, self.min_samples].iter().any(Option::is_some)
            || [
                self.max_error_rate_increase,
                self.max_latency_p99_ratio,
                self.max_anomaly_rate_difference,
                self.score_significance,
                self.max_score_shift,
            ]
            .iter()
            .any(Option::is_some)
    }

    fn to_proto(&self) -> pb::Analysis {
        pb::Analysis {
            step_weights_percent: self.steps.clone(),
            interval_seconds: self.interval_seconds.unwrap_or_default(),
            failure_limit: self.failure_limit.unwrap_or_default(),
            min_samples: self.min_samples.unwrap_or_default(),
            max_error_rate_increase: self.max_error_rate_increase.unwrap_or_default(),
            max_latency_p99_ratio: self.max_latency_p99_ratio.unwrap_or_default(),
            max_anomaly_rate_difference: self.max_anomaly_rate_difference.unwrap_or_default(),
            score_significance: self.score_significance.unwrap_or_default(),
            max_score_shift: self.max_score_shift.unwrap_or_default(),
        }
    }
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// `--server` is not a URL.
    BadServer { server: String, why: String },
    /// A TLS or token flag is unusable.
    Dial(String),
    /// No connection to the server.
    Unreachable { server: String, why: String },
    /// The server answered with an error.
    Refused(tonic::Status),
    /// `--require-replay-from`: the replay gave no report.
    Replay(crate::replay::Failure),
    /// `--require-replay-from`: the replay's report failed.
    ReplayRejected { canary: i64, reasons: Vec<String> },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadServer { server, why } => write!(f, "--server {server:?} is not a URL ({why})"),
            Self::Dial(why) => write!(f, "{why}"),
            Self::Unreachable { server, why } => write!(
                f,
                "cannot reach the model server at {server} ({why}); pass --server URL or set VIGIL_MODEL_SERVER"
            ),
            Self::Refused(status) => {
                write!(f, "{}: {}", code_name(status.code()), status.message())?;
                // A transport failure's cause ("connection reset") is in its source.
                if let Some(source) = std::error::Error::source(status) {
                    write!(f, ": {}", error_chain(source))?;
                }
                match crate::dial::credentials_hint(status.code()) {
                    Some(hint) => write!(f, "; {hint}"),
                    None => Ok(()),
                }
            }
            Self::Replay(failure) => write!(f, "the replay the rollout requires: {failure}"),
            Self::ReplayRejected { canary, reasons } => {
                write!(f, "the rollout was not started: the replay of version {canary} failed ({})", reasons.join("; "))
            }
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Self::Refused(status)
    }
}

/// Runs `vigil rollout ...` to completion.
pub fn main(args: RolloutArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RolloutArgs) -> Result<(), Failure> {
    let mut client = connect(&args.server, &args.dial).await?;
    let json = args.json;
    let rollout = match args.command {
        RolloutCommand::Start(start) => {
            if let Some(from) = &start.require_replay_from {
                require_replay(&start, from, json).await?;
            }
            let analysis = (start.analysis || start.plan.given()).then(|| start.plan.to_proto());
            let spec = pb::RolloutSpec {
                model: start.model,
                stable_version: start.stable,
                canary_version: start.canary,
                canary_weight_percent: start.weight,
                shadow_percent: start.shadow,
                analysis,
            };
            client.start_rollout(pb::StartRolloutRequest { spec: Some(spec) }).await?
        }
        RolloutCommand::Status { model } => client.get_rollout(pb::GetRolloutRequest { model }).await?,
        RolloutCommand::List => {
            let rollouts = client.list_rollouts(pb::ListRolloutsRequest {}).await?.into_inner().rollouts;
            if json {
                let list = json!({ "rollouts": rollouts.iter().map(rollout_json).collect::<Vec<_>>() });
                println!("{}", pretty(&list));
            } else if rollouts.is_empty() {
                println!("no rollouts");
            } else {
                print!("{}", render_list(&rollouts, now_ms()));
            }
            return Ok(());
        }
        RolloutCommand::SetWeight { model, percent } => {
            client.set_canary_weight(pb::SetCanaryWeightRequest { model, canary_weight_percent: percent }).await?
        }
        RolloutCommand::Promote { model } => client.promote_rollout(pb::PromoteRolloutRequest { model }).await?,
        RolloutCommand::Abort { model, reason } => {
            client.abort_rollout(pb::AbortRolloutRequest { model, reason: reason.unwrap_or_default() }).await?
        }
        RolloutCommand::Watch { model, every_seconds } => {
            return watch(&mut client, &model, Duration::from_secs(every_seconds), json).await;
        }
    };
    let rollout = rollout.into_inner();
    if json {
        println!("{}", pretty(&rollout_json(&rollout)));
    } else {
        print!("{}", render(&rollout, now_ms()));
    }
    Ok(())
}

/// Replays the readings since `from` through the canary and fails unless the report
/// passes. The report goes to stdout when it fails (as `vigil replay` prints it, or as
/// JSON), else one line to stderr, so stdout still holds only the rollout.
async fn require_replay(start: &StartArgs, from: &str, json: bool) -> Result<(), Failure> {
    use crate::replay;
    let now = SystemTime::now();
    let from = replay::parse_time("--require-replay-from", from, now).map_err(Failure::Replay)?;
    let to = replay::parse_time("--to", "now", now).map_err(Failure::Replay)?;
    let request = proto::vigil::replay::v1::ReplayRequest {
        from: Some(from),
        to: Some(to),
        model: start.model.clone(),
        candidate_version: start.canary,
        output_topic: start
            .replay_output_topic
            .clone()
            .unwrap_or_else(|| replay::default_output_topic(start.canary, now)),
        bounds: None,
    };
    // The TLS and token flags are --server's; the processor is dialed as before.
    let report = replay::replay(&start.processor, &DialArgs::default(), request).await.map_err(Failure::Replay)?;
    if report.passed {
        eprintln!(
            "replay passed: version {} on {} readings ({} compared), agreement {:.4}, anomaly rate {:.4} against live {:.4}",
            report.candidate_version,
            report.replayed,
            report.compared,
            report.agreement,
            report.candidate_anomaly_rate,
            report.live_anomaly_rate
        );
        return Ok(());
    }
    if json {
        println!("{}", pretty(&replay::report_json(&report)));
    } else {
        print!("{}", replay::render(&report, &from, &to));
    }
    Err(Failure::ReplayRejected { canary: start.canary, reasons: report.reasons })
}

async fn connect(server: &str, dial: &DialArgs) -> Result<RolloutServiceClient<Dialed>, Failure> {
    let dialed =
        dial.connect(server, |endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT)).await;
    match dialed {
        Ok(dialed) => Ok(RolloutServiceClient::new(dialed)),
        Err(DialError::BadUrl(why)) => Err(Failure::BadServer { server: server.to_owned(), why }),
        Err(DialError::Setup(why)) => Err(Failure::Dial(why)),
        Err(DialError::Unreachable(why)) => Err(Failure::Unreachable { server: server.to_owned(), why }),
    }
}

/// How long `watch` keeps polling a model server that does not answer.
const WATCH_OUTAGE_LIMIT: Duration = Duration::from_secs(60);

/// Polls the rollout and prints each new revision until the rollout is over.
async fn watch(
    client: &mut RolloutServiceClient<Dialed>,
    model: &str,
    every: Duration,
    json: bool,
) -> Result<(), Failure> {
    let mut shown = None;
    let mut unavailable_since: Option<Instant> = None;
    loop {
        let rollout = match client.get_rollout(pb::GetRolloutRequest { model: model.to_owned() }).await {
            Ok(response) => {
                if unavailable_since.take().is_some() {
                    eprintln!("the model server answers again");
                }
                response.into_inner()
            }
            // A server restarting (or the Service between pods) is not the rollout's end.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                let since = *unavailable_since.get_or_insert_with(|| {
                    eprintln!(
                        "the model server does not answer ({}); polling it again for up to {} s",
                        status.message(),
                        WATCH_OUTAGE_LIMIT.as_secs()
                    );
                    Instant::now()
                });
                if since.elapsed() > WATCH_OUTAGE_LIMIT {
                    return Err(status.into());
                }
                tokio::time::sleep(every).await;
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        if shown != Some(rollout.revision) {
            shown = Some(rollout.revision);
            if json {
                println!("{}", rollout_json(&rollout));
            } else {
                println!("{}", watch_line(&rollout));
            }
        }
        if is_over(rollout.phase) {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

fn is_over(phase: i32) -> bool {
    matches!(pb::Phase::try_from(phase), Ok(pb::Phase::Promoted | pb::Phase::RolledBack | pb::Phase::Aborted))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis().try_into().unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(analysis: Option<pb::Analysis>) -> pb::Rollout {
        pb::Rollout {
            spec: Some(pb::RolloutSpec {
                model: "car-anomaly".into(),
                stable_version: 2,
                canary_version: 1,
                canary_weight_percent: 0.0,
                shadow_percent: 10.0,
                analysis,
            }),
            phase: pb::Phase::RolledBack as i32,
            canary_weight_percent: 0.0,
            step: 1,
            failures: 2,
            revision: 7,
            last_decision: "rolled back: anomaly rate".into(),
            updated_unix_ms: 1_750_000_000_000,
            source: "api".into(),
            updated_by: "replica-a".into(),
        }
    }

    #[test]
    fn json_uses_the_proto_field_names_and_a_lowercase_phase() {
        let plan = pb::Analysis { step_weights_percent: vec![5.0, 25.0], interval_seconds: 60, ..Default::default() };
        let value = rollout_json(&rollout(Some(plan)));
        assert_eq!(value["phase"], "rolled_back");
        assert_eq!(value["revision"], 7);
        assert_eq!(value["spec"]["stable_version"], 2);
        assert_eq!(value["spec"]["analysis"]["step_weights_percent"], json!([5.0, 25.0]));
        assert_eq!(rollout_json(&rollout(None))["spec"]["analysis"], serde_json::Value::Null);
    }

    #[test]
    fn text_shows_phase_in_words_versions_weight_and_the_plan_on_one_line() {
        let plan = pb::Analysis {
            step_weights_percent: vec![5.0, 25.0, 50.0],
            interval_seconds: 60,
            failure_limit: 2,
            ..Default::default()
        };
        let text = render(&rollout(Some(plan)), 1_750_000_005_000);
        assert!(text.contains("phase:         rolled back\n"), "{text}");
        assert!(text.contains("stable 2 -> canary 1"), "{text}");
        assert!(text.contains("2025-06-15 15:06:40 UTC (5 s ago)"), "{text}");
        let analysis: Vec<&str> = text.lines().filter(|l| l.starts_with("analysis:")).collect();
        assert_eq!(analysis.len(), 1, "{text}");
        assert!(analysis[0].contains("steps 5% 25% 50%, a check every 60 s"), "{text}");
        assert!(!render(&rollout(None), 0).contains("analysis:"));
    }

    #[test]
    fn list_prints_one_line_per_rollout() {
        let text = render_list(&[rollout(None), rollout(None)], 1_750_000_000_000);
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with("car-anomaly  rolled back  stable 2 -> canary 1 at   0%  revision 7"), "{text}");
    }

    #[test]
    fn only_promoted_rolled_back_and_aborted_end_a_watch() {
        let over: Vec<_> = (0..=6).filter(|&p| is_over(p)).collect();
        assert_eq!(over, [pb::Phase::Promoted as i32, pb::Phase::RolledBack as i32, pb::Phase::Aborted as i32]);
    }

    #[test]
    fn a_server_error_prints_its_code_in_words_and_its_message() {
        let failure = Failure::from(tonic::Status::invalid_argument("canary_weight_percent: 150 is above 100"));
        assert_eq!(failure.to_string(), "invalid argument: canary_weight_percent: 150 is above 100");
    }
}
