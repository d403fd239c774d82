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

/// Layers `defaults`, `file`, the variables of `env` under `layout` and `flags` (given as
/// (path, value) pairs), and extracts the result.
pub fn load<T: Serialize + DeserializeOwned>(
    defaults: &T,
    file: Option<&Path>,
    layout: EnvLayout<'_>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[(&[&str], Option<String>)],
) -> Result<T, String> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(format!("{}: no such file", path.display()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Serialized::defaults(env_layer(layout, env)?));
    let mut set = Dict::new();
    for (path, value) in flags {
        if let Some(value) = value {
            insert(&mut set, path, Value::from(value.clone()));
        }
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
            path[1] = path[1].replace('_', ".");
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
