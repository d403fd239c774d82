//! The alerts service's configuration: defaults < TOML file < `ALERTS_*` environment
//! variables < command-line flags (see `admin::layered_config`). Rules are declared in
//! the file:
//!
//! ```toml
//! [[rules]]
//! name = "repeated-anomalies"          # part of every alert's id
//! window_seconds = 300                 # 5-minute windows on the readings' event time
//! advance_seconds = 60                 # hopping every minute (absent: tumbling)
//! allowed_lateness_seconds = 30        # how late a reading may still count
//! min_anomalies = 3                    # the condition: every field given must hold
//! ```

use std::collections::BTreeMap;

use admin::layered_config::EnvLayout;
pub use admin::layered_config::{ConfigError, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const DEFAULT_SCORES_TOPIC: &str = "vigil-scores";
pub const DEFAULT_ALERTS_TOPIC: &str = "vigil-alerts";
pub const DEFAULT_CHANGELOG_TOPIC: &str = "vigil-alerts-changelog";
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "vigil-alerts-dead-letter";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The consumer group: instances with the same group split the scores' partitions.
    pub group_id: String,
    /// Static group membership (`group.instance.id`): an instance restarted under the same
    /// id takes its partitions back at once, instead of after its predecessor's session
    /// timeout (docs/failure-model.md). Off: an ordinary dynamic member.
    pub static_membership: bool,
    /// This instance's `group.instance.id`; empty: the host name (in Kubernetes the pod
    /// name, kept across container restarts). Every instance in the group needs its own.
    pub group_instance_id: String,
    pub scores_topic: String,
    pub alerts_topic: String,
    /// Compacted, with as many partitions as the scores topic: partition p holds the
    /// window state of the devices on scores partition p.
    pub changelog_topic: String,
    /// Score records that cannot be read, with headers naming the reason.
    pub dead_letter_topic: String,
    /// How far a score's event time may lie from its record's Kafka timestamp; a score
    /// outside is dead-lettered (`implausible_event_time`) and never moves stream time.
    pub event_time: sensor::EventTimeBounds,
    /// Devices with open windows held per assigned partition, at most; past it the device
    /// idle longest is evicted with its windows (counted in `alerts_devices_evicted_total`),
    /// so a flood of made-up device ids cannot grow memory without bound.
    pub max_devices_per_partition: usize,
    /// How often alerts and changed state are written and offsets committed: what a
    /// crash can make the next owner redo (it skips what the changelog says was applied).
    pub commit_interval_ms: u64,
    /// On shutdown: how long Kafka may take to confirm the last alerts and state; after
    /// it the service stops without committing them (the next owner redoes them).
    pub shutdown_grace_seconds: u64,
    /// /live, /ready, /metrics; empty: not served.
    pub admin_listen: String,
    pub rules: Vec<RuleConfig>,
    /// librdkafka properties for every client (`bootstrap.servers`, `security.protocol`,
    /// `sasl.*`, `ssl.*`).
    pub kafka: BTreeMap<String, String>,
}

/// One rule: a window and a condition, per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub window_seconds: u64,
    /// Hopping windows start every `advance_seconds`; absent (or equal to the window):
    /// tumbling windows.
    pub advance_seconds: Option<u64>,
    /// A window closes (and its condition is judged) once the partition's stream time
    /// (the latest event time seen on it) passes its end by this much; readings arriving
    /// for a closed window are late, counted and dropped.
    #[serde(default)]
    pub allowed_lateness_seconds: u64,
    /// At least this many anomalous readings in the window.
    pub min_anomalies: Option<u64>,
    /// At least this many readings in the window.
    pub min_readings: Option<u64>,
    /// Mean score of the window's readings above this.
    pub mean_score_above: Option<f64>,
    /// Highest score in the window above this.
    pub max_score_above: Option<f64>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            group_id: "vigil-alerts".into(),
            static_membership: true,
            group_instance_id: String::new(),
            scores_topic: DEFAULT_SCORES_TOPIC.into(),
            alerts_topic: DEFAULT_ALERTS_TOPIC.into(),
            changelog_topic: DEFAULT_CHANGELOG_TOPIC.into(),
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.into(),
            event_time: sensor::EventTimeBounds::default(),
            max_devices_per_partition: 100_000,
            commit_interval_ms: 200,
            shutdown_grace_seconds: 10,
            admin_listen: "0.0.0.0:9106".into(),
            // The seed's emergency rule: more than 3 anomalies in 5 minutes.
            rules: vec![RuleConfig {
                name: "repeated-anomalies".into(),
                window_seconds: 300,
                advance_seconds: None,
                allowed_lateness_seconds: 30,
                min_anomalies: Some(4),
                min_readings: None,
                mean_score_above: None,
                max_score_above: None,
            }],
            kafka: BTreeMap::from([("bootstrap.servers".to_owned(), "127.0.0.1:9092".to_owned())]),
        }
    }
}

impl AlertsConfig {
    /// The consumer's `group.instance.id`; `None` without static membership.
    pub fn group_instance_id(&self) -> Option<String> {
        kafka::group::instance_id(self.static_membership, &self.group_instance_id)
    }
}

impl ServiceConfig for AlertsConfig {
    const ENV: EnvLayout<'static> =
        EnvLayout { prefix: "ALERTS_", pass_through: &["kafka"], flag_variables: &["CONFIG"] };

    fn check(&self) -> Result<(), ConfigError> {
        let error = |text: String| Err(ConfigError(text));
        ConfigError::require_non_empty([
            ("scores_topic", self.scores_topic.as_str()),
            ("alerts_topic", &self.alerts_topic),
            ("changelog_topic", &self.changelog_topic),
            ("dead_letter_topic", &self.dead_letter_topic),
        ])?;
        if self.changelog_topic == self.scores_topic || self.alerts_topic == self.scores_topic {
            return error("alerts_topic and changelog_topic must differ from scores_topic".into());
        }
        if self.max_devices_per_partition == 0 {
            return error("max_devices_per_partition must be at least 1".into());
        }
        if self.commit_interval_ms == 0 {
            return error("commit_interval_ms must be at least 1".into());
        }
        if self.rules.is_empty() {
            return error("rules is empty: nothing to alert on".into());
        }
        let owned =
            ["group.id", "group.instance.id", "enable.auto.commit", "enable.auto.offset.store", "transactional.id"];
        if let Some(key) = kafka::service_owned(&self.kafka, &owned) {
            return error(format!(
                "kafka.\"{key}\" is set by the service (group_id and group_instance_id set the group)"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let at = |field: &str| format!("rules[{index}] ({:?}).{field}", rule.name);
            if rule.name.is_empty() || rule.name.contains('/') {
                return error(format!(
                    "rules[{index}].name must be non-empty and without '/' (it is part of alert ids)"
                ));
            }
            if !names.insert(rule.name.as_str()) {
                return error(format!("{}: another rule has this name", at("name")));
            }
            if rule.window_seconds == 0 {
                return error(format!("{} must be at least 1", at("window_seconds")));
            }
            if let Some(advance) = rule.advance_seconds
                && (advance == 0 || advance > rule.window_seconds)
            {
                return error(format!("{} must be between 1 and window_seconds", at("advance_seconds")));
            }
            if rule.min_anomalies.is_none()
                && rule.min_readings.is_none()
                && rule.mean_score_above.is_none()
                && rule.max_score_above.is_none()
            {
                return error(format!(
                    "rules[{index}] ({:?}) has no condition: give min_anomalies, min_readings, mean_score_above or max_score_above",
                    rule.name
                ));
            }
            for (field, value) in
                [("mean_score_above", rule.mean_score_above), ("max_score_above", rule.max_score_above)]
            {
                if value.is_some_and(|v| !v.is_finite()) {
                    return error(format!("{} must be a finite number", at(field)));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_come_from_the_file_and_the_rest_layers_as_in_every_service() {
        let file = test_support::temp_file(
            "alerts.toml",
            r#"
alerts_topic = "from-file"
[[rules]]
name = "hot"
window_seconds = 60
advance_seconds = 20
mean_score_above = 2.5
"#,
        );
        let config = AlertsConfig::load(
            Some(&file.path),
            [
                ("ALERTS_COMMIT_INTERVAL_MS", "50"),
                ("ALERTS_CONFIG", "/ignored"),
                ("ALERTS_KAFKA__SASL_MECHANISM", "PLAIN"),
            ],
            &crate::cli::flag_values(&["--kafka-brokers", "flag:9092"]),
        )
        .unwrap();
        assert_eq!(config.alerts_topic, "from-file");
        assert_eq!(config.commit_interval_ms, 50);
        assert_eq!(config.kafka["bootstrap.servers"], "flag:9092");
        assert_eq!(config.kafka["sasl.mechanism"], "PLAIN");
        assert_eq!(config.rules.len(), 1, "the file's rules replace the default");
        assert_eq!(config.rules[0].advance_seconds, Some(20));
        assert_eq!(config.rules[0].mean_score_above, Some(2.5));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let refused = |rule: RuleConfig| {
            let config = AlertsConfig { rules: vec![rule], ..AlertsConfig::default() };
            config.check().unwrap_err().to_string()
        };
        let base = AlertsConfig::default().rules[0].clone();
        assert!(refused(RuleConfig { window_seconds: 0, ..base.clone() }).contains("window_seconds"));
        assert!(refused(RuleConfig { advance_seconds: Some(600), ..base.clone() }).contains("advance_seconds"));
        assert!(refused(RuleConfig { min_anomalies: None, ..base.clone() }).contains("no condition"));
        assert!(refused(RuleConfig { name: "a/b".into(), ..base.clone() }).contains("name"));
        assert!(refused(RuleConfig { mean_score_above: Some(f64::NAN), ..base }).contains("mean_score_above"));
    }
}
