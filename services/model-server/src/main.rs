//! `model-server` command line: `inspect` and `predict` a SavedModel.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use model_server::{inspect, tensor_json};
use savedmodel::{DEFAULT_SIGNATURE, SavedModel};

#[derive(Parser)]
#[command(name = "model-server", version, about = "Serve and check TensorFlow SavedModels without TensorFlow")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
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
            let inputs = tensor_json::parse_request(&body, plan.spec())?;
            if inputs.is_empty() {
                bail!("the request has no inputs");
            }
            let outputs = plan.run(inputs)?;
            println!("{}", tensor_json::outputs_to_json(&outputs));
            Ok(ExitCode::SUCCESS)
        }
    }
}
