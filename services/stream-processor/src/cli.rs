//! The `stream-processor` command line (the `stream-processor` binary and `vigil
//! stream-processor`). Config: defaults < `--config` TOML < `PROCESSOR_*` environment <
//! flags (see [`crate::config`]); the rest is the services' shared scaffold
//! ([`admin::service`]).

use std::ffi::OsString;

use admin::layered_config::FlagValue;
use admin::service::{ServiceFlags, ServiceNames, bind_optional, run_service};

use crate::config::ProcessorConfig;

#[derive(clap::Args)]
struct Flags {
    /// Model server replicas, comma-separated `http://host:port` (`model.endpoints`).
    #[arg(long)]
    model_endpoints: Option<String>,
    /// Consumer group (`group_id`).
    #[arg(long)]
    group_id: Option<String>,
    /// gRPC ReplayService and health address (`grpc_listen`, default 0.0.0.0:50062); empty:
    /// not served.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// `at-least-once` (default) or `exactly-once` (Kafka transactions) (`delivery`).
    #[arg(long)]
    delivery: Option<String>,
}

impl ServiceFlags for Flags {
    fn flag_values(&self) -> Vec<FlagValue> {
        let endpoints = self
            .model_endpoints
            .as_ref()
            .map(|list| list.split(',').map(|endpoint| endpoint.trim().to_owned()).collect::<Vec<_>>());
        let own = [
            FlagValue::given(&["model", "endpoints"], endpoints),
            FlagValue::given(&["group_id"], self.group_id.clone()),
            FlagValue::given(&["grpc_listen"], self.grpc_listen.clone()),
            FlagValue::given(&["delivery"], self.delivery.clone()),
        ];
        own.into_iter().flatten().collect()
    }
}

const NAMES: ServiceNames = ServiceNames {
    program: "stream-processor",
    about: "Scores every reading on the readings topic with the model server, in order, at least once or exactly once",
    config_variable: "PROCESSOR_CONFIG",
    trace_service: "vigil-stream-processor",
};

/// Parses `args` (the program name first) and runs the processor until a termination
/// signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    run_service::<Flags, ProcessorConfig, _, _>(&NAMES, args, |config, stop| async move {
        let listeners = crate::Listeners {
            admin: bind_optional(&config.admin_listen).await?,
            grpc: bind_optional(&config.grpc_listen).await?,
        };
        Ok(crate::run(config, listeners, stop).await?)
    })
}

/// The flag layer `flags` give, for the config's tests.
#[cfg(test)]
pub(crate) fn flag_values(flags: &[&str]) -> Vec<FlagValue> {
    admin::service::flag_values_of::<Flags>(&NAMES, flags)
}
