//! The configuration layering every Vigil service uses: defaults < TOML file < the
//! service's environment variables < command-line flags, extracted into the service's
//! own config struct.
//!
//! Environment variables nest with `__` (`PREFIX_A__B=v` is `a.b`). Under a pass-through
//! table (librdkafka properties: `kafka`, `consumer`, `producer`), underscores become dots,
//! so `PREFIX_KAFKA__SASL_MECHANISM` sets `kafka."sasl.mechanism"`. The environment is
//! passed in as a list, so tests never touch the process's own.

use std::path::Path;
use std::str::FromStr as _;

use figment::Figment;
use figment::providers::{Format as _, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How a service names its variables and which of its tables pass keys through.
#[derive(Debug, Clone, Copy)]
pub struct EnvLayout<'a> {
    /// e.g. `INGEST_`.
    pub prefix: &'a str,
    /// Tables whose keys are librdkafka property names (`_` becomes `.`).
    pub pass_through: &'a [&'a str],
    /// Variables under the prefix that belong to a flag, not to the config (`CONFIG` for
    /// `INGEST_CONFIG`, which names the file): skipped.
    pub flag_variables: &'a [&'a str],
}

/// A configuration its service could not run with, naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// Refuses the first of `values` (key, value) that is empty, naming its key.
    pub fn require_non_empty<'a>(values: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), ConfigError> {
        match values.into_iter().find(|(_, value)| value.is_empty()) {
            Some((key, _)) => Err(ConfigError(format!("{key} is empty"))),
            None => Ok(()),
        }
    }
}

/// A service's whole configuration: how its variables are named and what it checks
/// beyond its types. [`ServiceConfig::load`] is every service's way in.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    /// Its environment variables (`INGEST_`, the pass-through Kafka tables).
    const ENV: EnvLayout<'static>;

    /// Checks what the types cannot, naming the key at fault.
    fn check(&self) -> Result<(), ConfigError>;

    /// Layers the defaults, `file`, the variables of `env` under [`Self::ENV`] and the
    /// given `flags`, and checks the result.
    fn load<K: Into<String>, V: Into<String>>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (K, V)>,
        flags: &[FlagValue],
    ) -> Result<Self, ConfigError> {
        let config = load(&Self::default(), file, Self::ENV, env, flags).map_err(ConfigError)?;
        config.check()?;
        Ok(config)
    }
}

/// No variables: the environment of a test that sets none.
pub const NO_ENV: [(&str, &str); 0] = [];

/// A command-line flag that was given, at the config key it sets: the last layer.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagValue {
    /// The key's path (`["kafka", "bootstrap.servers"]`).
    pub path: &'static [&'static str],
    pub value: Value,
}

impl FlagValue {
    /// `value` at `path` if the flag was given.
    pub fn given(path: &'static [&'static str], value: Option<impl Into<Value>>) -> Option<Self> {
        value.map(|value| Self { path, value: value.into() })
    }
}

/// Layers `defaults`, `file`, the variables of `env` under `layout` and `flags`, and
/// extracts the result.
pub fn load<T: Serialize + DeserializeOwned, K: Into<String>, V: Into<String>>(
    defaults: &T,
    file: Option<&Path>,
    layout: EnvLayout<'_>,
    env: impl IntoIterator<Item = (K, V)>,
    flags: &[FlagValue],
) -> Result<T, String> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(format!("{}: no such file", path.display()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let env = env.into_iter().map(|(name, value)| (name.into(), value.into()));
    figment = figment.merge(Serialized::defaults(env_layer(layout, env)?));
    let mut set = Dict::new();
    for flag in flags {
        insert(&mut set, flag.path, flag.value.clone());
    }
    figment.merge(Serialized::defaults(set)).extract_lossy().map_err(|e| e.to_string())
}

/// The variables of `env` under `layout.prefix` as a nested table.
fn env_layer(layout: EnvLayout<'_>, env: impl IntoIterator<Item = (String, String)>) -> Result<Dict, String> {
    let mut dict = Dict::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(layout.prefix) else { continue };
        if layout.flag_variables.contains(&rest) {
            continue;
        }
        let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{name}: empty key segment"));
        }
        let value = if layout.pass_through.contains(&path[0].as_str()) {
            if path.len() != 2 {
                return Err(format!(
                    "{name}: use {}{}__<PROPERTY>, e.g. {}{}__SASL_MECHANISM",
                    layout.prefix,
                    path[0].to_ascii_uppercase(),
                    layout.prefix,
                    path[0].to_ascii_uppercase()
                ));
            }
            path[1] = property_name(&path[1]);
            Value::from(raw) // librdkafka takes every property as a string
        } else {
            // Lists and tables parse (`["a/+", "b/#"]`); a number or boolean stays the
            // text it was, and the lossy extraction turns it into a number where one is
            // expected, so `..._CLIENT_ID=007` stays "007".
            match Value::from_str(&raw) {
                Ok(value @ (Value::Array(..) | Value::Dict(..))) => value,
                _ => Value::from(raw),
            }
        };
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        insert(&mut dict, &path, value);
    }
    Ok(dict)
}

/// The librdkafka property an environment variable's suffix names: `SASL_MECHANISM` is
/// `sasl.mechanism`.
pub fn property_name(variable_suffix: &str) -> String {
    variable_suffix.to_ascii_lowercase().replace('_', ".")
}

/// The librdkafka properties the variables of `env` under `prefix` set
/// (`PREFIX_SASL_MECHANISM=PLAIN` is `sasl.mechanism = PLAIN`), for a service whose Kafka
/// properties are not a table of a layered config (the model server's rollout log).
pub fn properties_from_env(
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> std::collections::BTreeMap<String, String> {
    env.into_iter().filter_map(|(name, value)| Some((property_name(name.strip_prefix(prefix)?), value))).collect()
}

fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry((*first).to_owned()).or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConfigError;

    #[test]
    fn the_first_empty_value_is_refused_by_its_key() {
        assert!(ConfigError::require_non_empty([("a", "x"), ("b", "y")]).is_ok());
        let error = ConfigError::require_non_empty([("a", "x"), ("b", ""), ("c", "")]).unwrap_err();
        assert_eq!(error.to_string(), "configuration: b is empty");
    }
}
