//! `device-simulator`: runs a simulated car fleet.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use device_simulator::fleet::{Fleet, FleetOptions};

#[derive(Parser)]
#[command(version, about = "A fleet of simulated cars publishing labelled sensor readings")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulates the fleet offline and writes every reading as JSON Lines (for training).
    Generate {
        /// Output file (`-` for standard output).
        #[arg(long, default_value = "-")]
        out: String,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Simulated seconds per car.
        #[arg(long, default_value_t = 1800.0)]
        seconds: f64,
        /// Simulated seconds between two readings of a car.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Event time of the first reading's clock (seconds since the Unix epoch).
        #[arg(long, default_value_t = 1_767_225_600)]
        start_epoch_seconds: i64,
    },
}

#[derive(clap::Args)]
struct FleetArgs {
    /// Number of cars.
    #[arg(long, env = "SIMULATOR_CARS", default_value_t = 100)]
    cars: usize,
    /// Seed: the same seed gives the same fleet and readings.
    #[arg(long, env = "SIMULATOR_SEED", default_value_t = 42)]
    seed: u64,
    /// Share of cars (0-1) that develop a fault.
    #[arg(long, env = "SIMULATOR_FAULT_SHARE", default_value_t = 0.1)]
    fault_share: f64,
    /// Earliest fault onset, seconds after a car starts.
    #[arg(long, default_value_t = 60.0)]
    fault_onset_min: f64,
    /// Latest fault onset, seconds after a car starts.
    #[arg(long, default_value_t = 600.0)]
    fault_onset_max: f64,
}

impl FleetArgs {
    fn options(&self) -> anyhow::Result<FleetOptions> {
        anyhow::ensure!((0.0..=1.0).contains(&self.fault_share), "--fault-share must be between 0 and 1");
        anyhow::ensure!(self.fault_onset_min <= self.fault_onset_max, "--fault-onset-min is after --fault-onset-max");
        Ok(FleetOptions {
            cars: self.cars,
            seed: self.seed,
            fault_share: self.fault_share,
            onset_window_s: (self.fault_onset_min, self.fault_onset_max),
            ..FleetOptions::default()
        })
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate { out, fleet, seconds, interval, start_epoch_seconds } => {
            anyhow::ensure!(interval > 0.0, "--interval must be positive");
            let mut fleet =
                Fleet::new(&fleet.options()?, prost_types::Timestamp { seconds: start_epoch_seconds, nanos: 0 });
            let mut sink: Box<dyn std::io::Write> = if out == "-" {
                Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
            } else {
                let path = PathBuf::from(&out);
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
                ))
            };
            let steps = (seconds / interval).round() as u64;
            for _ in 0..steps {
                for reading in fleet.step(interval) {
                    writeln!(sink, "{}", sensor::json::to_json(&reading))?;
                }
            }
            sink.flush()?;
        }
    }
    Ok(())
}
