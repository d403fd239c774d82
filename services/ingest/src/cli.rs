//! The `ingest` command line (the `ingest` binary and `vigil ingest`). Config: defaults <
//! `--config` TOML < `INGEST_*` environment < flags (see [`crate::config`]); the rest is the
//! services' shared scaffold ([`admin::service`]).

use std::ffi::OsString;

use admin::layered_config::FlagValue;
use admin::service::{ServiceFlags, ServiceNames, bind_optional, run_service};

use crate::config::IngestConfig;

#[derive(clap::Args)]
struct Flags {
    /// MQTT broker, e.g. mqtt://127.0.0.1:1883 (`mqtt.url`); empty: no MQTT bridge.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// MQTT client id (`mqtt.client_id`); distinct per replica.
    #[arg(long)]
    client_id: Option<String>,
    /// gRPC IngestService address (`grpc.listen`); empty: not served.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// HTTP ingest address, `POST /v1/readings` (`http.listen`); empty: not served.
    #[arg(long)]
    http_listen: Option<String>,
    /// MQTT proxy address devices connect to, e.g. 0.0.0.0:1883 (`mqtt_proxy.listen`);
    /// empty: not served.
    #[arg(long)]
    mqtt_listen: Option<String>,
}

impl ServiceFlags for Flags {
    fn flag_values(&self) -> Vec<FlagValue> {
        let own = [
            FlagValue::given(&["mqtt", "url"], self.mqtt_url.clone()),
            FlagValue::given(&["mqtt", "client_id"], self.client_id.clone()),
            FlagValue::given(&["grpc", "listen"], self.grpc_listen.clone()),
            FlagValue::given(&["http", "listen"], self.http_listen.clone()),
            FlagValue::given(&["mqtt_proxy", "listen"], self.mqtt_listen.clone()),
        ];
        own.into_iter().flatten().collect()
    }
}

const NAMES: ServiceNames = ServiceNames {
    program: "ingest",
    about: "Bridges MQTT to Kafka, acknowledging each reading to MQTT once Kafka has it",
    config_variable: "INGEST_CONFIG",
    trace_service: "vigil-ingest",
};

/// Parses `args` (the program name first) and runs ingest until a termination signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    run_service::<Flags, IngestConfig, _, _>(&NAMES, args, |config, stop| async move {
        let listeners = crate::Listeners {
            grpc: bind_optional(&config.grpc.listen).await?,
            http: bind_optional(&config.http.listen).await?,
            mqtt_proxy: bind_optional(&config.mqtt_proxy.listen).await?,
            admin: bind_optional(&config.admin_listen).await?,
        };
        Ok(crate::run(config, listeners, stop).await?)
    })
}

/// The flag layer `flags` give, for the config's tests.
#[cfg(test)]
pub(crate) fn flag_values(flags: &[&str]) -> Vec<FlagValue> {
    admin::service::flag_values_of::<Flags>(&NAMES, flags)
}
