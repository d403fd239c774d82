//! The `model-server` command line (the `model-server` binary and `vigil model-server`):
//! with TF Serving's flags it serves (`model-server --port=8500 --model_name=m
//! --model_base_path=/models/m`); `inspect` and `predict` check a SavedModel without
//! serving it.

use std::ffi::OsString;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::admission::{self, RequestLimits, WireTensor};
use crate::config::ServeArgs;
use crate::error::ServeError;
use crate::server::{self, Listeners};
use crate::tensor_codec::MAX_TENSOR_BYTES;
use crate::{inspect, tensor_json};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use savedmodel::{DEFAULT_SIGNATURE, SavedModel};

#[derive(Parser)]
#[command(
    name = "model-server",
    version,
    about = "Serve TensorFlow SavedModels without TensorFlow, as a drop-in for tensorflow_model_server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print a SavedModel's signatures, ops, variables and whether the engine can run it.
    /// Exits non-zero if a signature cannot be served.
    Inspect {
        /// SavedModel directory (the version directory holding saved_model.pb).
        dir: PathBuf,
        /// Only this signature (default: all).
        #[arg(long)]
        signature: Option<String>,
        /// Machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one prediction. The request is TF Serving REST JSON:
    /// {"inputs": {"name": [[...]]}} or {"instances": [...]}.
    Predict {
        /// SavedModel directory (the version directory holding saved_model.pb).
        dir: PathBuf,
        #[arg(long, default_value = DEFAULT_SIGNATURE)]
        signature: String,
        /// The request JSON; `-` (the default) reads it from stdin.
        #[arg(long, default_value = "-")]
        request: String,
    },
}

/// Parses `args` (the program name first) and runs the command.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    admin::init_logs();
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Some(command) => run(command),
        None => serve(cli.serve).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind((args.bind_address.as_str(), args.port))
            .await
            .with_context(|| format!("binding the gRPC port {}:{}", args.bind_address, args.port))?;
        // TF Serving's startup lines, with the real port when 0 was asked for.
        println!("Running gRPC ModelServer at {}", grpc.local_addr()?);
        let rest = match (&args.rest_api_address, args.rest_api_port) {
            (Some(address), _) => Some(
                tokio::net::TcpListener::bind(address.as_str())
                    .await
                    .with_context(|| format!("binding the REST address {address}"))?,
            ),
            (None, 0) => None,
            (None, port) => Some(
                tokio::net::TcpListener::bind((args.bind_address.as_str(), port))
                    .await
                    .with_context(|| format!("binding the REST port {}:{port}", args.bind_address))?,
            ),
        };
        if let Some(rest) = &rest {
            println!("Exporting HTTP/REST API at {}", rest.local_addr()?);
        }
        let tracing = telemetry::Tracing::from_env("vigil-model-server")?;
        let result = server::run(config, Listeners { grpc, rest }, shutdown_signal()).await;
        tracing.shutdown().await;
        result
    })
}

/// The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once.
async fn shutdown_signal() {
    admin::termination_signal().await;
    tokio::spawn(async {
        admin::termination_signal().await;
        eprintln!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Inspect { dir, signature, json } => {
            let report = inspect::inspect(&dir, signature.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(if report.all_supported() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Predict { dir, signature, request } => {
            let request = if request == "-" {
                let mut body = String::new();
                std::io::stdin().read_to_string(&mut body).context("reading the request from stdin")?;
                body
            } else {
                request
            };
            let body: serde_json::Value = serde_json::from_str(&request).context("the request is not valid JSON")?;
            let model = SavedModel::open(&dir)?;
            let plan = model.load(&signature)?;
            let columns = tensor_json::parse_request(body, plan.spec())?;
            if columns.is_empty() {
                bail!("the request has no inputs");
            }
            let wire = columns.into_iter().map(|(name, value)| (name, WireTensor::Json(value))).collect();
            // A local tool: no per-request budget beyond the largest tensor the server allows.
            let limits =
                RequestLimits { max_rows: usize::MAX, max_batch_rows: None, max_bytes: Some(MAX_TENSOR_BYTES) };
            // The server's messages name the model and version; here there is only the input.
            let admitted = admission::admit("local", 0, plan.spec(), wire, limits).map_err(|e| match e {
                ServeError::Predict { source, .. } => anyhow::Error::msg(source.to_string()),
                other => anyhow::Error::msg(other.to_string()),
            })?;
            let inputs = admitted.decode().map_err(anyhow::Error::msg)?;
            let outputs = plan.run(inputs)?;
            println!("{}", tensor_json::outputs_to_json(&outputs));
            Ok(ExitCode::SUCCESS)
        }
    }
}
