//! The controller's side of the message plane: one MQTT client (`controller`, with its
//! own certificate) that reads every agent's `up` and `status`, and one thread that
//! owns the database, ingests what arrives, and publishes on the agents' `down`:
//! acknowledgements after each commit, queued commands, renewed certificates. The
//! same thread watches for revocations and for agents that went silent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use wire::codec;
use wire::id::AgentId;
use wire::message::{Down, Status, Up};
use wire::topic::{self, Leaf};

use crate::broker::{BrokerFiles, Reloader};
use crate::db::{Db, DbError, now_ms};
use crate::ingest::{self, Outcome};
use crate::pki::Ca;

/// Where the broker is and who the controller is to it.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub ca_pem: Vec<u8>,
}

pub struct Settings {
    pub endpoint: Endpoint,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub agent_cert_validity: Duration,
    /// An online agent silent for this long is marked offline.
    pub offline_after: Duration,
    /// An unacknowledged command is sent again after this long.
    pub resend_after: Duration,
}

/// Options for an MQTT client of this broker with a given certificate.
pub fn options(ep: &Endpoint, client_id: &str, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, ep.host.clone(), ep.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: ep.ca_pem.clone(),
        alpn: None,
        client_auth: Some((cert_pem, key_pem)),
    }));
    o
}

/// Runs the link until `stop` fires, then drains and commits what already arrived.
pub async fn run(
    settings: Settings,
    db: Db,
    ca: Arc<Ca>,
    broker: (BrokerFiles, Reloader),
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut opts = options(
        &settings.endpoint,
        wire::id::CONTROLLER,
        settings.cert_pem.clone(),
        settings.key_pem.clone(),
    );
    // The broker keeps what agents publish while the controller is away.
    opts.set_clean_session(false);
    opts.set_request_channel_capacity(1024);
    let (client, eventloop) = AsyncClient::new(opts, 1024);
    let (tx, rx) = mpsc::channel(1024);
    let handle = tokio::runtime::Handle::current();
    let worker = Worker {
        db,
        ca,
        client: client.clone(),
        settings,
        broker,
        handle,
        kicked: HashSet::new(),
        revision: None,
        trimmed: None,
    };
    let thread = std::thread::spawn(move || worker.run(rx));
    poll(eventloop, client.clone(), tx, stop).await;
    // The worker drains the channel, commits, and ends when it is empty and closed.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let _ = client.try_disconnect();
}

async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    tx: mpsc::Sender<(String, bytes::Bytes)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut pause = Duration::from_millis(200);
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = crate::stopped(&mut stop) => return,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                pause = Duration::from_millis(200);
                tracing::info!("connected to the broker");
                for leaf in [Leaf::Up, Leaf::Status] {
                    let _ = client
                        .subscribe(topic::all_agents(leaf), QoS::AtLeastOnce)
                        .await;
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                if tx.send((p.topic, p.payload)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("broker connection: {e}; retrying in {pause:?}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = crate::stopped(&mut stop) => return,
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Heartbeats and remembered event ids are kept this long.
const HISTORY: Duration = Duration::from_secs(14 * 86_400);
const TRIM_EVERY: Duration = Duration::from_secs(3600);

struct Worker {
    db: Db,
    ca: Arc<Ca>,
    client: AsyncClient,
    settings: Settings,
    broker: (BrokerFiles, Reloader),
    handle: tokio::runtime::Handle,
    kicked: HashSet<AgentId>,
    revision: Option<i64>,
    trimmed: Option<Instant>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<(String, bytes::Bytes)>) {
        let mut last_tick = Instant::now() - Duration::from_secs(60);
        loop {
            let next = self.handle.block_on(async {
                tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            });
            match next {
                Ok(Some((topic, payload))) => self.message(&topic, &payload),
                Ok(None) => return,
                Err(_) => {}
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                if let Err(e) = self.tick() {
                    tracing::error!("{e}");
                }
            }
        }
    }

    fn tick(&mut self) -> Result<(), DbError> {
        let revision = self.db.revocation_revision()?;
        if self.revision != Some(revision) {
            self.revision = Some(revision);
            self.apply_revocations();
        }
        for agent in self.db.mark_silent_offline(self.settings.offline_after)? {
            tracing::info!("agent {agent} went silent: offline");
        }
        if self.trimmed.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
            self.trimmed = Some(Instant::now());
            let n = self.db.trim_history(HISTORY)?;
            tracing::debug!("trimmed {n} rows of heartbeats and event ids");
        }
        for (agent, command) in self.db.commands_to_send(self.settings.resend_after)? {
            self.send(&agent, &Down::Command(command));
        }
        Ok(())
    }

    fn message(&mut self, topic: &str, payload: &[u8]) {
        let Some((agent, leaf)) = topic::parse(topic) else {
            return self.drop_malformed(topic, "not an agent topic");
        };
        let now = now_ms();
        let result = match leaf {
            Leaf::Status => match codec::decode::<Status>(payload) {
                Ok(s) => self.db.with_tx(|tx| {
                    if ingest::admitted(tx, &agent)? {
                        ingest::status(tx, &agent, s, now)?;
                    }
                    Ok(Outcome::Recorded)
                }),
                Err(e) => return self.drop_malformed(topic, &e.to_string()),
            },
            Leaf::Up => match codec::decode::<Up>(payload) {
                Ok(up) => self.up(&agent, up, now),
                Err(e) => return self.drop_malformed(topic, &e.to_string()),
            },
            Leaf::Down => return,
        };
        match result {
            Ok(Outcome::Ack(ids)) => {
                for chunk in ids.chunks(wire::message::BATCH) {
                    let list = chunk.iter().copied().collect();
                    self.send(&agent, &Down::Acked(list));
                }
            }
            Ok(Outcome::Refused) => {
                tracing::warn!("dropped a message from revoked or unknown agent {agent}")
            }
            Ok(_) => {}
            Err(e) => tracing::error!("ingesting from {agent}: {e}"),
        }
    }

    fn up(&mut self, agent: &AgentId, up: Up, now: i64) -> Result<Outcome, DbError> {
        if let Up::Renew { csr_pem } = &up {
            return self.renew(agent, csr_pem);
        }
        self.db.with_tx(|tx| {
            if !ingest::admitted(tx, agent)? {
                return Ok(Outcome::Refused);
            }
            match &up {
                Up::Hello(h) => ingest::hello(tx, agent, h, now).map(|()| Outcome::Recorded),
                Up::Heartbeat(h) => {
                    ingest::heartbeat(tx, agent, h, now).map(|()| Outcome::Recorded)
                }
                Up::Events(events) => ingest::events(tx, agent, events, now),
                Up::Renew { .. } => Ok(Outcome::Recorded),
            }
        })
    }

    fn renew(&mut self, agent: &AgentId, csr_pem: &str) -> Result<Outcome, DbError> {
        let validity = self.settings.agent_cert_validity;
        let issued = match self.ca.sign_agent(agent, csr_pem, validity) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("renewal for {agent}: {e}");
                return Ok(Outcome::Recorded);
            }
        };
        let admitted = self.db.with_tx(|tx| {
            if !ingest::admitted(tx, agent)? {
                return Ok(false);
            }
            let now = now_ms();
            crate::db::record_certificate(
                tx,
                agent,
                &issued.serial,
                now,
                crate::db::ms_of(issued.not_after),
            )?;
            Ok(true)
        })?;
        if !admitted {
            return Ok(Outcome::Refused);
        }
        match wire::heapless::String::try_from(issued.pem.as_str()) {
            Ok(pem) => self.send(agent, &Down::Certificate { pem }),
            Err(_) => tracing::error!("a renewed certificate does not fit the message"),
        }
        tracing::info!("renewed the certificate of {agent}");
        Ok(Outcome::Recorded)
    }

    fn drop_malformed(&mut self, topic: &str, why: &str) {
        tracing::warn!("dropped a malformed message on {topic:?}: {why}");
        if let Err(e) = self.db.bump_counter("malformed_messages") {
            tracing::error!("{e}");
        }
    }

    fn send(&self, agent: &AgentId, down: &Down) {
        let Ok(bytes) = codec::encode(down) else {
            tracing::error!("a message for {agent} does not encode");
            return;
        };
        let t = topic::topic(agent, Leaf::Down);
        if let Err(e) = self.client.try_publish(t, QoS::AtLeastOnce, false, bytes) {
            tracing::warn!("publishing to {agent}: {e}");
        }
    }

    /// Rewrites the ACL and CRL, makes the broker reload them, and ends the live
    /// session of every newly revoked agent.
    fn apply_revocations(&mut self) {
        let (files, reloader) = &self.broker;
        let done = (|| -> Result<Vec<AgentId>, String> {
            let revoked = self.db.revoked_agents().map_err(|e| e.to_string())?;
            let serials = self.db.revoked_serials().map_err(|e| e.to_string())?;
            let number = u64::try_from(self.revision.unwrap_or(0)).unwrap_or(0) + 1;
            let crl = self
                .ca
                .crl_pem(&serials, number)
                .map_err(|e| e.to_string())?;
            files.write_crl(&crl).map_err(|e| e.to_string())?;
            files.write_acl(&revoked).map_err(|e| e.to_string())?;
            reloader.reload().map_err(|e| e.to_string())?;
            Ok(revoked)
        })();
        let revoked = match done {
            Ok(r) => r,
            Err(e) => return tracing::error!("applying revocations: {e}"),
        };
        let fresh: Vec<_> = revoked
            .into_iter()
            .filter(|a| !self.kicked.contains(a))
            .collect();
        if fresh.is_empty() {
            return;
        }
        // Let the broker finish its reload before the takeover.
        std::thread::sleep(Duration::from_millis(300));
        for agent in fresh {
            match self
                .handle
                .block_on(end_session(&self.ca, &self.settings.endpoint, &agent))
            {
                Ok(()) => {
                    tracing::info!("revoked agent {agent}: its session is closed");
                    self.kicked.insert(agent);
                }
                Err(e) => tracing::error!("closing the session of revoked agent {agent}: {e}"),
            }
        }
    }
}

/// Connects once in the agent's name with a fresh short-lived certificate: the broker
/// ends any live session with the same client id (MQTT session takeover), and the
/// clean session drops what was queued for it. Then disconnects.
async fn end_session(ca: &Ca, ep: &Endpoint, agent: &AgentId) -> Result<(), String> {
    let (cert, key) = ca.session_breaker(agent).map_err(|e| e.to_string())?;
    let id = agent.to_string();
    let mut opts = options(ep, &id, cert.into_bytes(), key.into_bytes());
    opts.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    connack(&mut eventloop, Duration::from_secs(10)).await?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
    Ok(())
}

/// Polls until the broker accepts the connection (Ok) or refuses or drops it (the
/// error), for at most `limit`.
pub async fn connack(eventloop: &mut EventLoop, limit: Duration) -> Result<(), String> {
    let answer = tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    answer
        .await
        .unwrap_or_else(|_| Err("the broker did not answer".to_string()))
}
