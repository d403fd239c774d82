//! Brokers that run inside the process, on loopback, for tests and for the one-command
//! fleet's development default: nothing to install, real protocols on real sockets.
//!
//! [`MqttBroker`] is rumqttd with an MQTT 3.1.1 and an MQTT 5 listener. rumqttd binds its
//! own listeners from a configured address and cannot take a pre-bound socket or report
//! the port it chose for port 0, so [`MqttBroker::start`] asks the OS for a free loopback
//! port, hands it to rumqttd, and waits until the broker accepts connections there; if
//! another process took the port in between (rumqttd's bind fails), it tries a fresh one.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free loopback port: {0}")]
    NoPort(std::io::Error),
    #[error("rumqttd did not start listening on {0} within 10 s ({1} attempts)")]
    NotListening(SocketAddr, usize),
    #[error("rumqttd: {0}")]
    Broker(String),
}

/// An MQTT broker running on its own threads until the process exits (rumqttd has no
/// shutdown; tests and `vigil up` end with the process).
#[derive(Debug, Clone, Copy)]
pub struct MqttBroker {
    /// MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// MQTT 5 listener.
    pub v5: SocketAddr,
}

/// Largest payload the broker accepts (rumqttd's sample config allows only 20 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

impl MqttBroker {
    pub fn start() -> Result<Self, BrokerError> {
        const ATTEMPTS: usize = 5;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let (v4, v5) = (free_port()?, free_port()?);
            let mut broker = Broker::new(config(v4, v5));
            std::thread::Builder::new()
                .name("mqtt-broker".into())
                // A failed start (the port was taken) shows below as "not listening".
                .spawn(move || drop(broker.start()))
                .map_err(|e| BrokerError::Broker(e.to_string()))?;
            if listening(v4) && listening(v5) {
                return Ok(Self { v4, v5 });
            }
            last = Some(v4);
        }
        Err(BrokerError::NotListening(last.expect("at least one attempt"), ATTEMPTS))
    }
}

fn free_port() -> Result<SocketAddr, BrokerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).map_err(BrokerError::NoPort)
}

fn listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn config(v4: SocketAddr, v5: SocketAddr) -> Config {
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 500,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server("v4", v4))])),
        v5: Some(HashMap::from([("1".to_owned(), server("v5", v5))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}
