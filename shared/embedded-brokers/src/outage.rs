//! A TCP relay that can cut its connections: a network outage between a client and a
//! broker, for tests of reconnecting and redelivery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Relays loopback connections to a broker; [`Outage::happen`] drops every open one and
/// refuses new ones for a while, as a car on the road or a pod on a flaky network sees.
#[derive(Debug)]
pub struct Outage {
    /// Where clients connect instead of the broker.
    pub port: u16,
    refusing: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Outage {
    /// A relay to `127.0.0.1:broker_port` on a free loopback port (needs a tokio runtime).
    pub async fn relay_to(broker_port: u16) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let refusing = Arc::new(AtomicBool::new(false));
        let relays = Arc::new(Mutex::new(Vec::new()));
        let (refusing_, relays_) = (refusing.clone(), relays.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing_.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees a reset
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                relays_.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(relay);
            }
        });
        Ok(Self { port, refusing, relays })
    }

    /// Cuts every open connection and refuses new ones for `length`.
    pub async fn happen(&self, length: Duration) {
        self.refusing.store(true, Ordering::SeqCst);
        for relay in self.relays.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            relay.abort();
        }
        tokio::time::sleep(length).await;
        self.refusing.store(false, Ordering::SeqCst);
    }
}
