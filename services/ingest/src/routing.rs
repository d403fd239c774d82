//! Mapping rules: which Kafka topic and key an MQTT message goes to.
//!
//! Rules are tried in order and the first whose MQTT topic filter (`+`/`#` wildcards) or
//! regular expression matches wins; a message no rule matches is dead-lettered. Topic,
//! key and device-id templates take `{topic}` (the whole MQTT topic), `{level:N}` (its
//! Nth level from 0, or from the end when negative) and, for regex rules, `{name}` for a
//! named capture group. Templates are parsed and checked when the config loads, so a
//! typo fails at startup rather than on the first message.

use regex::Regex;
use std::sync::Arc;

use crate::config::{PayloadKind, RuleConfig};

#[derive(Debug, thiserror::Error)]
#[error("mapping rule {index}: {problem}")]
pub struct RuleError {
    pub index: usize,
    pub problem: String,
}

/// The parsed rules, in order.
#[derive(Debug)]
pub struct Routes {
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    matcher: Matcher,
    topic: Template,
    /// The topic as configured (the template's text): what metrics are labelled with, so a
    /// device publishing to new MQTT topics cannot add series.
    topic_label: Arc<str>,
    key: Option<Template>,
    device_id: Option<Template>,
    payload: PayloadKind,
}

#[derive(Debug)]
enum Matcher {
    Filter(String),
    Regex(Regex),
}

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub kafka_topic: String,
    /// The rule's topic as configured (`plant-{level:1}`), for metric labels.
    pub topic_label: Arc<str>,
    /// The record key; `None` leaves it to the payload (a reading's device id).
    pub key: Option<String>,
    /// The device id the topic names, for payloads that carry none.
    pub device_id: Option<String>,
    pub payload: PayloadKind,
}

/// Why a message has no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    #[error("no mapping rule matches the MQTT topic")]
    NoRule,
    #[error("mapping rule {rule}: {problem}")]
    Template { rule: usize, problem: String },
}

impl Routes {
    pub fn new(configs: &[RuleConfig]) -> Result<Self, RuleError> {
        let rules = configs
            .iter()
            .enumerate()
            .map(|(index, config)| Rule::new(config).map_err(|problem| RuleError { index, problem }))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// The route of a message published to `mqtt_topic`.
    pub fn route(&self, mqtt_topic: &str) -> Result<Route, NoRoute> {
        for (index, rule) in self.rules.iter().enumerate() {
            let captures = match &rule.matcher {
                Matcher::Filter(filter) if rumqttc::matches(mqtt_topic, filter) => None,
                Matcher::Regex(regex) => match regex.captures(mqtt_topic) {
                    Some(captures) => Some(captures),
                    None => continue,
                },
                Matcher::Filter(_) => continue,
            };
            let render = |template: &Template| {
                template
                    .render(mqtt_topic, captures.as_ref())
                    .map_err(|problem| NoRoute::Template { rule: index, problem })
            };
            return Ok(Route {
                kafka_topic: render(&rule.topic)?,
                topic_label: Arc::clone(&rule.topic_label),
                key: rule.key.as_ref().map(render).transpose()?,
                device_id: rule.device_id.as_ref().map(render).transpose()?,
                payload: rule.payload,
            });
        }
        Err(NoRoute::NoRule)
    }
}

impl Rule {
    fn new(config: &RuleConfig) -> Result<Self, String> {
        let (matcher, captures) = match (&config.filter, &config.regex) {
            (Some(filter), None) => {
                if !rumqttc::valid_filter(filter) {
                    return Err(format!("{filter:?} is not a valid MQTT topic filter"));
                }
                (Matcher::Filter(filter.clone()), Vec::new())
            }
            (None, Some(pattern)) => {
                let regex = Regex::new(pattern).map_err(|e| format!("regex {pattern:?}: {e}"))?;
                let names = regex.capture_names().flatten().map(str::to_owned).collect();
                (Matcher::Regex(regex), names)
            }
            _ => return Err("give exactly one of `filter` and `regex`".into()),
        };
        let template =
            |field: &str, text: &str| Template::parse(text, &captures).map_err(|e| format!("{field} {text:?}: {e}"));
        Ok(Self {
            matcher,
            topic: template("topic", &config.topic)?,
            topic_label: Arc::from(config.topic.as_str()),
            key: config.key.as_deref().map(|t| template("key", t)).transpose()?,
            device_id: config.device_id.as_deref().map(|t| template("device_id", t)).transpose()?,
            payload: config.payload,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Level(i32),
    Capture(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

impl Template {
    fn parse(text: &str, capture_names: &[String]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or("an unclosed `{`")? + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "topic" => Part::Topic,
                _ if name.starts_with("level:") => Part::Level(
                    name["level:".len()..].parse().map_err(|_| format!("`{{{name}}}`: the level is not an integer"))?,
                ),
                _ if capture_names.iter().any(|c| c == name) => Part::Capture(name.to_owned()),
                _ => {
                    return Err(format!(
                        "`{{{name}}}` is not `{{topic}}`, `{{level:N}}` or a named capture of the rule's regex"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err("a `}` without `{`".into());
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("empty".into());
        }
        Ok(Self(parts))
    }

    fn render(&self, topic: &str, captures: Option<&regex::Captures<'_>>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Topic => out.push_str(topic),
                Part::Level(n) => {
                    let levels: Vec<&str> = topic.split('/').collect();
                    let index = if *n < 0 { levels.len() as i64 + i64::from(*n) } else { i64::from(*n) };
                    let level = usize::try_from(index)
                        .ok()
                        .and_then(|i| levels.get(i))
                        .ok_or_else(|| format!("the topic has no level {n}"))?;
                    out.push_str(level);
                }
                Part::Capture(name) => out.push_str(captures.and_then(|c| c.name(name)).map_or("", |m| m.as_str())),
            }
        }
        if out.is_empty() {
            return Err("renders empty".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(filter: Option<&str>, regex: Option<&str>, topic: &str, key: Option<&str>) -> RuleConfig {
        RuleConfig {
            filter: filter.map(Into::into),
            regex: regex.map(Into::into),
            topic: topic.into(),
            key: key.map(Into::into),
            device_id: None,
            payload: PayloadKind::Raw,
        }
    }

    #[test]
    fn first_matching_rule_wins_and_templates_render_levels_and_captures() {
        let routes = Routes::new(&[
            rule(Some("vehicles/sensor/data/+"), None, "readings", Some("{level:-1}")),
            rule(None, Some(r"^plant/(?P<site>[^/]+)/(?P<machine>[^/]+)$"), "plant-{site}", Some("{site}:{machine}")),
            rule(Some("#"), None, "everything-else", Some("{topic}")),
        ])
        .unwrap();
        let route = routes.route("vehicles/sensor/data/car-7").unwrap();
        assert_eq!((route.kafka_topic.as_str(), route.key.as_deref()), ("readings", Some("car-7")));
        let route = routes.route("plant/lyon/press-2").unwrap();
        assert_eq!((route.kafka_topic.as_str(), route.key.as_deref()), ("plant-lyon", Some("lyon:press-2")));
        let route = routes.route("vehicles/sensor/data/car-7/extra").unwrap();
        assert_eq!(route.kafka_topic, "everything-else", "`+` is one level only");
    }

    #[test]
    fn unmatched_topics_and_missing_levels_have_no_route() {
        let routes = Routes::new(&[rule(Some("a/+"), None, "t-{level:5}", None)]).unwrap();
        assert_eq!(routes.route("b/c"), Err(NoRoute::NoRule));
        assert!(matches!(routes.route("a/c"), Err(NoRoute::Template { rule: 0, .. })));
    }

    #[test]
    fn bad_rules_fail_at_load_naming_the_rule_and_the_problem() {
        let cases = [
            (rule(Some("a/#/b"), None, "t", None), "not a valid MQTT topic filter"),
            (rule(None, Some("("), "t", None), "regex"),
            (rule(None, None, "t", None), "exactly one"),
            (rule(Some("a"), None, "t-{device}", None), "`{device}` is not"),
            (rule(Some("a"), None, "t-{level:x}", None), "not an integer"),
            (rule(Some("a"), None, "t-{topic", None), "unclosed"),
            (rule(Some("a"), None, "", None), "empty"),
        ];
        for (config, expected) in cases {
            let error = Routes::new(&[rule(Some("ok"), None, "t", None), config]).unwrap_err().to_string();
            assert!(error.starts_with("mapping rule 1: ") && error.contains(expected), "{error}");
        }
    }
}
