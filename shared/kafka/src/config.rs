//! A client config in layers: the service's defaults first, then the user's common table
//! (`kafka`), then the table for this client (`consumer`, `producer`); later layers win.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// librdkafka properties as the services' config files hold them.
pub type Properties = BTreeMap<String, String>;

/// `defaults`, then each of `layers` in order.
pub fn client_config(defaults: &[(&str, &str)], layers: &[&Properties]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for layer in layers {
        for (key, value) in layer.iter() {
            config.set(key, value);
        }
    }
    config
}

/// The first of `properties` that the service sets itself (`owned`), if any: a user value
/// there would be overridden silently or break the service's guarantees, so services refuse
/// it at config load, naming it.
pub fn service_owned<'a>(properties: &'a Properties, owned: &[&str]) -> Option<&'a str> {
    properties.keys().map(String::as_str).find(|key| owned.contains(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_over_earlier_ones_and_the_defaults() {
        let common = Properties::from([("linger.ms".into(), "5".into()), ("acks".into(), "1".into())]);
        let specific = Properties::from([("acks".into(), "all".into())]);
        let config = client_config(&[("linger.ms", "2"), ("client.id", "svc")], &[&common, &specific]);
        assert_eq!(config.get("linger.ms"), Some("5"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("client.id"), Some("svc"));
    }

    #[test]
    fn a_service_owned_property_is_named() {
        let properties = Properties::from([("group.id".into(), "x".into()), ("acks".into(), "all".into())]);
        assert_eq!(service_owned(&properties, &["enable.auto.commit", "group.id"]), Some("group.id"));
        assert_eq!(service_owned(&properties, &["transactional.id"]), None);
    }
}
