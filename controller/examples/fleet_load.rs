//! Load generator for `bench/fleet.sh`: simulated agents with real enrolled identities
//! (one state directory each, made by `vaultik enroll`) connect over mTLS to the
//! controller's broker, say hello, send job events in acknowledged batches of 16 as the
//! real outbox does, then send a heartbeat every interval until the soak ends.
//!
//!   fleet_load AGENTS_DIR BROKER_PORT EVENTS_PER_AGENT HEARTBEAT_SECS SOAK_SECS
//!
//! Prints one `key value` line per figure. Bounded: every wait has a deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use controller::link::{Endpoint, options};
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use tokio::sync::{Barrier, mpsc};
use wire::message::{
    Capability, EventBody, Heartbeat, Hello, JobEvent, JobKind, JobState, JobTotals, Status,
};
use wire::topic::{Leaf, topic};
use wire::{AgentId, Down, JobId, Up};

const BATCH: usize = 16;
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

struct Creds {
    id: AgentId,
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    failed: AtomicU64,
    heartbeats: AtomicU64,
}

fn load(dir: &Path) -> Result<Creds> {
    let link = dir.join("link");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(link.join("link.json"))?)?;
    let id = json["agent_id"]
        .as_str()
        .and_then(AgentId::parse)
        .context("link.json has no valid agent_id")?;
    Ok(Creds {
        id,
        cert: std::fs::read(link.join("agent.crt"))?,
        key: std::fs::read(link.join("agent.key"))?,
        ca: std::fs::read(link.join("ca.crt"))?,
    })
}

fn hello() -> Result<Up> {
    let mut capabilities = wire::heapless::Vec::new();
    let _ = capabilities.push(Capability::Backup);
    Ok(Up::Hello(Hello {
        version: "load".try_into().map_err(|_| anyhow::anyhow!("name"))?,
        os: "linux".try_into().map_err(|_| anyhow::anyhow!("name"))?,
        arch: std::env::consts::ARCH
            .try_into()
            .map_err(|_| anyhow::anyhow!("name"))?,
        hostname: "load".try_into().map_err(|_| anyhow::anyhow!("name"))?,
        capabilities,
        policy_revision: None,
        outbox: rand::random(),
    }))
}

fn heartbeat() -> Up {
    Up::Heartbeat(Heartbeat {
        at_ms: now_ms(),
        cpu_permille: 10,
        memory_used: 100 << 20,
        memory_total: 1 << 30,
        disks: wire::heapless::Vec::new(),
        next_backup_ms: None,
        outbox: 0,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

/// A job's worth of events: started, progress, finished.
fn batch(first_id: u64, n: usize) -> Up {
    let job = JobId(rand::random());
    let mut list = wire::heapless::Vec::new();
    for i in 0..n {
        let state = match i {
            0 => JobState::Started,
            i if i + 1 == n => JobState::Finished(JobTotals::default()),
            i => JobState::Progress {
                files: i as u64,
                bytes: (i as u64) << 20,
                total_bytes: None,
            },
        };
        let _ = list.push(wire::message::Event {
            id: first_id + i as u64,
            at_ms: now_ms(),
            body: EventBody::Job(JobEvent {
                job,
                kind: JobKind::Backup,
                command: None,
                state,
            }),
        });
    }
    Up::Events(list)
}

async fn publish(
    client: &AsyncClient,
    c: &Creds,
    leaf: Leaf,
    msg: &impl serde::Serialize,
    retain: bool,
) {
    if let Ok(bytes) = wire::encode(msg) {
        let _ = client
            .publish(topic(&c.id, leaf), QoS::AtLeastOnce, retain, bytes)
            .await;
    }
}

struct Plan {
    port: u16,
    events: u64,
    heartbeat: Duration,
    soak: Duration,
}

async fn agent(c: Creds, plan: Arc<Plan>, stats: Arc<Stats>, start: Arc<Barrier>) {
    let ep = Endpoint {
        host: "127.0.0.1".into(),
        port: plan.port,
        ca_pem: c.ca.clone(),
    };
    let mut o = options(&ep, &c.id.to_string(), c.cert.clone(), c.key.clone());
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (acks, mut acked) = mpsc::channel::<usize>(16);
    let (up, mut connected) = mpsc::channel::<()>(4);
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = up.try_send(());
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if let Ok(Down::Acked(ids)) = wire::decode::<Down>(&p.payload) {
                        let _ = acks.send(ids.len()).await;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
    let ok = tokio::time::timeout(Duration::from_secs(120), connected.recv()).await;
    if !matches!(ok, Ok(Some(()))) {
        start.wait().await;
        start.wait().await;
        return;
    }
    {
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let _ = client
            .subscribe(topic(&c.id, Leaf::Down), QoS::AtLeastOnce)
            .await;
        publish(&client, &c, Leaf::Status, &Status::Online, true).await;
        if let Ok(h) = hello() {
            publish(&client, &c, Leaf::Up, &h, false).await;
        }
    }
    start.wait().await;
    let mut next = 1u64;
    while next <= plan.events {
        let n = usize::try_from((plan.events - next + 1).min(BATCH as u64)).unwrap_or(BATCH);
        let msg = batch(next, n);
        for attempt in 0.. {
            if attempt == 5 {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            publish(&client, &c, Leaf::Up, &msg, false).await;
            match tokio::time::timeout(ACK_TIMEOUT, acked.recv()).await {
                Ok(Some(k)) => {
                    stats.acked.fetch_add(k as u64, Ordering::Relaxed);
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    stats.resent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        next += n as u64;
    }
    start.wait().await;
    // Heartbeats, spread over the interval as real agents' clocks would be.
    let offset = plan.heartbeat.mul_f64(rand::random::<f64>());
    let end = Instant::now() + plan.soak;
    tokio::time::sleep(offset.min(plan.soak)).await;
    while Instant::now() < end {
        publish(&client, &c, Leaf::Up, &heartbeat(), false).await;
        stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(plan.heartbeat).await;
    }
    let _ = client.disconnect().await;
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T> {
    args.get(i)
        .with_context(|| format!("missing {name}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("{name} is not a number"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).context(
        "usage: fleet_load AGENTS_DIR BROKER_PORT EVENTS_PER_AGENT HEARTBEAT_SECS SOAK_SECS",
    )?);
    let plan = Arc::new(Plan {
        port: arg(&args, 2, "BROKER_PORT")?,
        events: arg(&args, 3, "EVENTS_PER_AGENT")?,
        heartbeat: Duration::from_secs(arg(&args, 4, "HEARTBEAT_SECS")?),
        soak: Duration::from_secs(arg(&args, 5, "SOAK_SECS")?),
    });
    let mut creds = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        creds.push(load(&e?.path())?);
    }
    if creds.is_empty() {
        bail!("no enrolled agents in {}", dir.display());
    }
    let n = creds.len();
    let stats = Arc::new(Stats::default());
    // Every agent, and this task, meet before and after the ingest phase.
    let gate = Arc::new(Barrier::new(n + 1));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in creds.into_iter().enumerate() {
        tasks.push(tokio::spawn(agent(
            c,
            plan.clone(),
            stats.clone(),
            gate.clone(),
        )));
        // Reconnecting fleets arrive spread out; 100 a second here.
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    gate.wait().await;
    println!("agents {n}");
    println!("connected {}", stats.connected.load(Ordering::Relaxed));
    println!("connect_s {:.1}", t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    gate.wait().await;
    let ingest = t1.elapsed().as_secs_f64();
    let acked = stats.acked.load(Ordering::Relaxed);
    println!("events_acked {acked}");
    println!("ingest_s {ingest:.1}");
    println!("events_per_s {:.0}", acked as f64 / ingest.max(0.001));
    println!("batches_resent {}", stats.resent.load(Ordering::Relaxed));
    println!("batches_failed {}", stats.failed.load(Ordering::Relaxed));
    eprintln!("soak: heartbeats for {} s", plan.soak.as_secs());
    for t in tasks {
        let _ = t.await;
    }
    println!("heartbeats {}", stats.heartbeats.load(Ordering::Relaxed));
    Ok(())
}
