//! A fleet of simulated cars for Vigil: realistic, reproducible sensor readings with
//! labelled faults, published over MQTT like the seed demo's cars (topic
//! `vehicles/sensor/data/<device-id>`, QoS 1) or written to JSON Lines or CSV for training.
//!
//! [`car`] holds the physics and the faults, [`fleet`] who gets which fault and when,
//! [`publish`] sends a fleet's readings over MQTT, counted in [`metrics`].
//! Readings are [`sensor::SensorReading`]s in Vigil's JSON form, each carrying its ground
//! truth in `fault`, so detection can be scored reading by reading.

#![forbid(unsafe_code)]

pub mod car;
pub mod cli;
pub mod fleet;
pub mod metrics;
pub mod output;
pub mod publish;

/// `mqtt://host:port`, `tcp://host:port` or `host:port` (port 1883 when left out) as host
/// and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://")).unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().map_err(|_| format!("{url:?}: the port {port:?} is not a number"))?),
        None => (rest, 1883),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} is not an MQTT address such as mqtt://127.0.0.1:1883"));
    }
    Ok((host.to_owned(), port))
}
