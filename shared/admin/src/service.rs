//! The command line every Kafka service (ingest, stream processor, alerts) shares, so that
//! they start, log, trace, configure and stop the same way.
//!
//! A service declares only its own flags and, in the same place, which config key each one
//! sets ([`ServiceFlags`]); [`ServiceCommandLine`] adds [`CommonFlags`], and the values of the
//! flags given are the last layer of [`crate::layered_config`]. [`run_service`] does the rest: logs, the
//! `<PREFIX>CONFIG` variable, `--print-config`, the runtime, OpenTelemetry export and the
//! drain signal. This is the binaries' edge, so it speaks `anyhow`.

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};

use crate::layered_config::{FlagValue, ServiceConfig};

/// The flags every service has.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonFlags {
    // `parse` names the service's variable for it (`INGEST_CONFIG`), shown in --help.
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (`kafka."bootstrap.servers"`).
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// /live, /ready, /metrics address (`admin_listen`); empty: not served.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl CommonFlags {
    /// The common flags that were given, at the keys they set.
    pub fn flag_values(&self) -> impl Iterator<Item = FlagValue> {
        [
            FlagValue::given(&["kafka", "bootstrap.servers"], self.kafka_brokers.clone()),
            FlagValue::given(&["admin_listen"], self.admin_listen.clone()),
        ]
        .into_iter()
        .flatten()
    }
}

/// A service's own flags (beside [`CommonFlags`]), each of which sets one config key.
pub trait ServiceFlags: clap::Args {
    /// The flags that were given, at the keys they set.
    fn flag_values(&self) -> Vec<FlagValue>;
}

/// A service's command line: the common flags and its own.
#[derive(clap::Parser, Debug)]
pub struct ServiceCommandLine<F: ServiceFlags> {
    #[command(flatten)]
    pub common: CommonFlags,
    #[command(flatten)]
    pub own: F,
}

impl<F: ServiceFlags> ServiceCommandLine<F> {
    /// Every flag that was given, the common ones first, at the keys they set.
    pub fn flag_values(&self) -> Vec<FlagValue> {
        self.common.flag_values().chain(self.own.flag_values()).collect()
    }
}

/// What a service is called.
#[derive(Debug, Clone, Copy)]
pub struct ServiceNames {
    /// The program name `--help` shows (`ingest`).
    pub program: &'static str,
    /// What `--help` says the service does.
    pub about: &'static str,
    /// The variable that names the config file when `--config` does not (`INGEST_CONFIG`).
    pub config_variable: &'static str,
    /// The OpenTelemetry `service.name` (`vigil-ingest`).
    pub trace_service: &'static str,
}

/// `F`'s command line, named and described by `names`; its `--config` flag also reads
/// `names.config_variable`.
pub fn command<F: ServiceFlags>(names: &ServiceNames) -> clap::Command {
    ServiceCommandLine::<F>::command()
        .name(names.program)
        .about(names.about)
        .version(env!("CARGO_PKG_VERSION"))
        .mut_arg("config", |arg| arg.env(names.config_variable))
}

/// Parses `args` (the program name first) as `F`'s command line; exits with clap's
/// message on a mistake, or with the help or version asked for.
pub fn parse<F: ServiceFlags>(names: &ServiceNames, args: impl IntoIterator<Item = OsString>) -> ServiceCommandLine<F> {
    let matches = command::<F>(names).get_matches_from(args);
    ServiceCommandLine::<F>::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Runs a service from its command line until the drain signal: parses `args`, loads its
/// `Config` from the file, the environment and the flags, prints it and exits on
/// `--print-config`, else starts tracing and a runtime and awaits `run(config, drain)`.
pub fn run_service<F, Config, Run, Serve>(
    names: &ServiceNames,
    args: impl IntoIterator<Item = OsString>,
    run: Run,
) -> anyhow::Result<()>
where
    F: ServiceFlags,
    Config: ServiceConfig,
    Run: FnOnce(Config, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Serve,
    Serve: Future<Output = anyhow::Result<()>>,
{
    crate::init_logs();
    let cli = parse::<F>(names, args);
    let config = Config::load(cli.common.config.as_deref(), std::env::vars(), &cli.flag_values())?;
    if cli.common.print_config {
        print!("{}", toml::to_string_pretty(&config).context("printing the configuration")?);
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let tracing = telemetry::Tracing::from_env(names.trace_service)?;
        let result = run(config, Box::pin(crate::drain_signal())).await;
        tracing.shutdown().await;
        result
    })
}

/// The flag layer that `flags` (no program name) give a service: what its config tests
/// layer over the file and the environment.
pub fn flag_values_of<F: ServiceFlags>(names: &ServiceNames, flags: &[&str]) -> Vec<FlagValue> {
    let args = std::iter::once(names.program).chain(flags.iter().copied()).map(OsString::from);
    parse::<F>(names, args).flag_values()
}

/// Binds `address`; an empty one serves nothing (every listener a service may leave off).
pub async fn bind_optional(address: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if address.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag whose value is a number, at a nested key.
    #[derive(clap::Args)]
    struct ExampleFlags {
        #[arg(long)]
        window_seconds: Option<u32>,
    }

    impl ServiceFlags for ExampleFlags {
        fn flag_values(&self) -> Vec<FlagValue> {
            FlagValue::given(&["window", "seconds"], self.window_seconds).into_iter().collect()
        }
    }

    const NAMES: ServiceNames = ServiceNames {
        program: "example",
        about: "An example",
        config_variable: "ADMIN_SERVICE_TEST_CONFIG",
        trace_service: "vigil-example",
    };

    #[test]
    fn only_given_flags_become_values_at_their_keys() {
        let values = flag_values_of::<ExampleFlags>(&NAMES, &["--kafka-brokers", "k:9092", "--window-seconds", "30"]);
        assert_eq!(values.len(), 2, "{values:?}");
        assert_eq!(values[0].path, ["kafka", "bootstrap.servers"]);
        assert_eq!(values[0].value.as_str(), Some("k:9092"));
        assert_eq!(values[1].path, ["window", "seconds"]);
        assert_eq!(values[1].value.to_u128(), Some(30), "a number stays one");
        assert!(flag_values_of::<ExampleFlags>(&NAMES, &[]).is_empty(), "only the flags given");
        let cli = parse::<ExampleFlags>(&NAMES, ["example", "--print-config"].map(OsString::from));
        assert!(cli.common.config.is_none() && cli.common.print_config);
    }

    #[test]
    fn help_names_the_service_and_its_config_variable() {
        let help = command::<ExampleFlags>(&NAMES).render_help().to_string();
        for expected in
            ["Usage: example", "An example", "ADMIN_SERVICE_TEST_CONFIG", "--kafka-brokers", "--window-seconds"]
        {
            assert!(help.contains(expected), "{expected} in {help}");
        }
    }

    #[tokio::test]
    async fn an_empty_address_binds_nothing_and_a_bad_one_is_named() {
        assert!(bind_optional("").await.unwrap().is_none());
        assert!(bind_optional("127.0.0.1:0").await.unwrap().is_some());
        let error = bind_optional("not an address").await.unwrap_err().to_string();
        assert!(error.contains("not an address"), "{error}");
    }
}
