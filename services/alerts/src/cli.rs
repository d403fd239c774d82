//! The `alerts` command line (the `alerts` binary and `vigil alerts`). Config: defaults <
//! `--config` TOML < `ALERTS_*` environment < flags (see [`crate::config`]); the rest is
//! the services' shared scaffold ([`admin::service`]).

use std::ffi::OsString;

use admin::layered_config::FlagValue;
use admin::service::{ServiceFlags, ServiceNames, bind_optional, run_service};

use crate::config::AlertsConfig;

#[derive(clap::Args)]
struct Flags {
    /// The consumer group (`group_id`).
    #[arg(long)]
    group_id: Option<String>,
}

impl ServiceFlags for Flags {
    fn flag_values(&self) -> Vec<FlagValue> {
        FlagValue::given(&["group_id"], self.group_id.clone()).into_iter().collect()
    }
}

const NAMES: ServiceNames = ServiceNames {
    program: "alerts",
    about: "Windowed alert rules over the scores topic: one alert per device, rule and window",
    config_variable: "ALERTS_CONFIG",
    trace_service: "vigil-alerts",
};

/// Parses `args` (the program name first) and runs until a termination signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    run_service::<Flags, AlertsConfig, _, _>(&NAMES, args, |config, stop| async move {
        let listeners = crate::Listeners { admin: bind_optional(&config.admin_listen).await? };
        Ok(crate::run(config, listeners, stop).await?)
    })
}

/// The flag layer `flags` give, for the config's tests.
#[cfg(test)]
pub(crate) fn flag_values(flags: &[&str]) -> Vec<FlagValue> {
    admin::service::flag_values_of::<Flags>(&NAMES, flags)
}
