//! The agent's MQTT connection: outbound TLS with its own certificate, a last will
//! that says "offline", and reconnection with capped exponential backoff and jitter.
//! It forwards what matters to the daemon and publishes what the daemon gives it.

use std::time::Duration;

use edge_agent::fleet::identity::Identity;
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, Incoming, LastWill, MqttOptions, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use wire::message::{Down, Status};
use wire::topic::{self, Leaf};

/// What the connection tells the daemon.
pub enum News {
    Connected,
    Disconnected(String),
    Down(Box<Down>),
    /// A payload on our `down` topic that does not decode.
    Malformed(String),
}

pub struct Link {
    pub client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn options(id: &Identity, keep_alive: Duration) -> MqttOptions {
    let agent = id.agent.to_string();
    let mut o = MqttOptions::new(agent, id.link.broker_host.clone(), id.link.broker_port);
    o.set_keep_alive(keep_alive);
    // The broker keeps commands sent while the agent was away.
    o.set_clean_session(false);
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    let offline = wire::codec::encode(&Status::Offline).unwrap_or_default();
    o.set_last_will(LastWill::new(
        topic::topic(&id.agent, Leaf::Status),
        offline,
        QoS::AtLeastOnce,
        true,
    ));
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: id.ca_pem.clone().into_bytes(),
        alpn: None,
        client_auth: Some((
            id.cert_pem.clone().into_bytes(),
            id.key_pem.clone().into_bytes(),
        )),
    }));
    o
}

/// Connects and keeps connecting until dropped.
pub fn start(id: &Identity, keep_alive: Duration, news: mpsc::Sender<News>) -> Link {
    let (client, mut eventloop) = AsyncClient::new(options(id, keep_alive), 64);
    let down = topic::topic(&id.agent, Leaf::Down);
    let sub = client.clone();
    let task = tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    failures = 0;
                    let _ = sub.try_subscribe(down.clone(), QoS::AtLeastOnce);
                    if news.send(News::Connected).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == down => {
                    let n = match wire::codec::decode::<Down>(&p.payload) {
                        Ok(d) => News::Down(Box::new(d)),
                        Err(e) => News::Malformed(e.to_string()),
                    };
                    if news.send(n).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if news.send(News::Disconnected(e.to_string())).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    });
    Link { client, task }
}

/// 1 s doubling to a minute, each pause drawn from its upper half, so a fleet that
/// lost its broker does not come back in step.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    let cap = Duration::from_secs(1 << exp).min(MAX_BACKOFF);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(60_000);
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_minute_with_jitter() {
        assert!(backoff(1) <= Duration::from_secs(1));
        assert!(backoff(1) >= Duration::from_millis(500));
        for n in [7, 8, 100, u32::MAX] {
            let b = backoff(n);
            assert!(b <= MAX_BACKOFF && b >= MAX_BACKOFF / 2, "{n}: {b:?}");
        }
        let draws: std::collections::HashSet<_> = (0..20).map(|_| backoff(5)).collect();
        assert!(draws.len() > 1, "jittered");
    }
}
