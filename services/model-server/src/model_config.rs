//! TF Serving's configuration files, parsed as the text-format protobufs users already
//! have: `--model_config_file` (`ModelServerConfig` with a `model_config_list`),
//! `--batching_parameters_file` (`BatchingParameters`) and `--monitoring_config_file`
//! (`MonitoringConfig`). Text format is parsed by prost-reflect against the descriptors
//! compiled from `proto/`, then converted to the typed messages.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage};
use proto::tensorflow::serving::{
    BatchingParameters, ModelConfig as ModelConfigProto, ModelServerConfig, MonitoringConfig,
    file_system_storage_path_source_config::servable_version_policy::PolicyChoice, model_server_config,
};

use crate::batching::BatchingOptions;
use crate::repository::{ModelConfig, VersionPolicy};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("the compiled descriptor set decodes")
    })
}

/// Parses text-format protobuf `text` as message `full_name`, naming `path` in errors.
pub fn parse_text<M: prost::Message + Default>(path: &Path, full_name: &str, text: &str) -> Result<M, String> {
    let descriptor = pool().get_message_by_name(full_name).expect("message compiled from proto/");
    let message = DynamicMessage::parse_text_format(descriptor, text)
        .map_err(|e| format!("{}: not a valid {full_name} text proto: {e}", path.display()))?;
    message.transcode_to::<M>().map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A `--model_config_file` serving every version of `model` under `base_path` (what
/// `vigil up` writes, and what tests and benches of canary rollouts serve).
pub fn all_versions_config(model: &str, base_path: &Path) -> Result<String, String> {
    let base_path = base_path.to_str().ok_or_else(|| format!("{}: the path is not UTF-8", base_path.display()))?;
    let quoted = |text: &str| text.replace('\\', "\\\\").replace('"', "\\\"");
    Ok(format!(
        "model_config_list {{\n  config {{\n    name: \"{}\"\n    base_path: \"{}\"\n    model_platform: \"tensorflow\"\n    \
         model_version_policy {{ all {{}} }}\n  }}\n}}\n",
        quoted(model),
        quoted(base_path)
    ))
}

/// Reads `--model_config_file`.
pub fn read_model_config_file(path: &Path) -> Result<Vec<ModelConfig>, String> {
    let config: ModelServerConfig = parse_text(path, "tensorflow.serving.ModelServerConfig", &read(path)?)?;
    model_configs(config).map_err(|e| format!("{}: {e}", path.display()))
}

/// `ModelServerConfig` (from a file or a `ReloadConfigRequest`) -> repository configs.
pub fn model_configs(config: ModelServerConfig) -> Result<Vec<ModelConfig>, String> {
    match config.config {
        Some(model_server_config::Config::ModelConfigList(list)) => list.config.into_iter().map(model_config).collect(),
        Some(model_server_config::Config::CustomModelConfig(_)) => {
            Err("custom_model_config is not supported; use model_config_list".into())
        }
        None => Err("the config has no model_config_list".into()),
    }
}

fn model_config(proto: ModelConfigProto) -> Result<ModelConfig, String> {
    let name = proto.name;
    if !proto.model_platform.is_empty() && proto.model_platform != "tensorflow" {
        return Err(format!(
            "model {name:?}: model_platform {:?} is not supported (only \"tensorflow\")",
            proto.model_platform
        ));
    }
    let policy = match proto.model_version_policy.and_then(|p| p.policy_choice) {
        None => VersionPolicy::Latest(1),
        Some(PolicyChoice::Latest(latest)) => VersionPolicy::Latest(latest.num_versions.max(1) as usize),
        Some(PolicyChoice::All(_)) => VersionPolicy::All,
        Some(PolicyChoice::Specific(specific)) => {
            if specific.versions.is_empty() {
                return Err(format!("model {name:?}: model_version_policy.specific lists no versions"));
            }
            VersionPolicy::Specific(specific.versions.into_iter().collect())
        }
    };
    let labels: BTreeMap<String, i64> = proto.version_labels.into_iter().collect();
    Ok(ModelConfig { name, base_path: proto.base_path.into(), policy, labels })
}

/// Reads `--batching_parameters_file`; fields left out keep TF Serving's defaults.
pub fn read_batching_file(path: &Path) -> Result<BatchingOptions, String> {
    let params: BatchingParameters = parse_text(path, "tensorflow.serving.BatchingParameters", &read(path)?)?;
    let defaults = BatchingOptions::default();
    let positive = |field: &str, value: Option<i64>, default: usize| -> Result<usize, String> {
        match value {
            None => Ok(default),
            Some(v) if v > 0 => Ok(v as usize),
            Some(v) => Err(format!("{}: {field} must be positive, got {v}", path.display())),
        }
    };
    let options = BatchingOptions {
        max_batch_size: positive("max_batch_size", params.max_batch_size, defaults.max_batch_size)?,
        batch_timeout: Duration::from_micros(
            params.batch_timeout_micros.map(|v| v.max(0) as u64).unwrap_or(defaults.batch_timeout.as_micros() as u64),
        ),
        max_enqueued_batches: positive(
            "max_enqueued_batches",
            params.max_enqueued_batches,
            defaults.max_enqueued_batches,
        )?,
        num_batch_threads: positive("num_batch_threads", params.num_batch_threads, defaults.num_batch_threads)?,
        allowed_batch_sizes: params
            .allowed_batch_sizes
            .iter()
            .map(|&s| usize::try_from(s).map_err(|_| format!("{}: allowed_batch_sizes has {s}", path.display())))
            .collect::<Result<_, _>>()?,
    };
    options.validate().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(options)
}

/// Reads `--monitoring_config_file`; returns the Prometheus path if enabled.
pub fn read_monitoring_file(path: &Path) -> Result<Option<String>, String> {
    let config: MonitoringConfig = parse_text(path, "tensorflow.serving.MonitoringConfig", &read(path)?)?;
    Ok(config
        .prometheus_config
        .filter(|p| p.enable)
        .map(|p| if p.path.is_empty() { "/monitoring/prometheus/metrics".to_owned() } else { p.path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_versions_config_reads_back_even_at_an_awkward_path() {
        let dir = tempfile::tempdir().unwrap();
        let awkward = dir.path().join("a \"quoted\" \\ dir");
        let file = dir.path().join("models.config");
        std::fs::write(&file, all_versions_config("car-anomaly", &awkward).unwrap()).unwrap();
        let models = read_model_config_file(&file).unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!((models[0].name.as_str(), &models[0].base_path), ("car-anomaly", &awkward));
        assert_eq!(models[0].policy, VersionPolicy::All);
    }

    #[test]
    fn a_tf_serving_model_config_file_parses() {
        let text = r#"
            model_config_list {
              config {
                name: "autoencoder"
                base_path: "/models/autoencoder"
                model_platform: "tensorflow"
                model_version_policy { specific { versions: 1 versions: 2 } }
                version_labels { key: "stable" value: 1 }
                version_labels { key: "canary" value: 2 }
              }
              config { name: "other" base_path: "/models/other" model_version_policy { all {} } }
              config { name: "third" base_path: "/m" model_version_policy { latest { num_versions: 2 } } }
            }"#;
        let config: ModelServerConfig =
            parse_text(Path::new("models.config"), "tensorflow.serving.ModelServerConfig", text).unwrap();
        let models = model_configs(config).unwrap();
        assert_eq!(models[0].name, "autoencoder");
        assert_eq!(models[0].policy, VersionPolicy::Specific([1, 2].into()));
        assert_eq!(models[0].labels, [("canary".to_owned(), 2), ("stable".to_owned(), 1)].into());
        assert_eq!(models[1].policy, VersionPolicy::All);
        assert_eq!(models[2].policy, VersionPolicy::Latest(2));
    }

    #[test]
    fn batching_parameters_use_wrapper_values_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batching.config");
        std::fs::write(
            &path,
            "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\nnum_batch_threads { value: 2 }\n\
             allowed_batch_sizes: 8\nallowed_batch_sizes: 64\n",
        )
        .unwrap();
        let options = read_batching_file(&path).unwrap();
        assert_eq!(options.max_batch_size, 64);
        assert_eq!(options.batch_timeout, Duration::from_micros(500));
        assert_eq!(options.allowed_batch_sizes, vec![8, 64]);
        std::fs::write(&path, "max_batch_size { value: 64 }\nallowed_batch_sizes: 32\n").unwrap();
        let error = read_batching_file(&path).unwrap_err();
        assert!(error.contains("batching.config") && error.contains("must equal max_batch_size"), "{error}");
    }

    #[test]
    fn a_malformed_config_names_the_file() {
        let error = parse_text::<ModelServerConfig>(
            Path::new("/etc/models.config"),
            "tensorflow.serving.ModelServerConfig",
            "model_config_list { config { nmae: \"x\" } }",
        )
        .unwrap_err();
        assert!(error.contains("/etc/models.config") && error.contains("nmae"), "{error}");
    }
}
