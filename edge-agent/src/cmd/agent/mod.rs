//! `vaultik agent CONFIG`: the long-running agent. It schedules its own backups from
//! its last known policy (kept in the state directory, so a week without the
//! controller changes nothing), runs the commands the controller sends, and reports
//! through the outbox, which keeps every event until the controller acknowledges it.
//! The backup engine runs on a blocking thread and knows nothing of any of this.

mod jobs;
mod link;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use edge_agent::backup::Scope;
use edge_agent::config::Config;
use edge_agent::fleet::identity::Identity;
use edge_agent::fleet::metrics::Sampler;
use edge_agent::fleet::schedule::{Schedule, next_due};
use edge_agent::outbox::Outbox;
use edge_agent::store::Repo;
use edge_agent::watch;
use rumqttc::QoS;
use tokio::sync::mpsc;
use wire::message::{
    Capability, Command, CommandBody, Down, EventBody, Hello, Policy, Status, Up, truncated,
};
use wire::topic::{self, Leaf};

use self::jobs::{Job, JobKindArg};
use self::link::{Link, News};

/// Events kept for the controller at most; past it progress and log lines go first.
const OUTBOX_CAP: u64 = 10_000;
/// How often a running job reports its progress (at most the heartbeat interval).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// An unacknowledged batch is sent again after this long.
const RESEND_AFTER: Duration = Duration::from_secs(20);
const POLICY_KEY: &str = "policy";
const LAST_START_KEY: &str = "last_backup_start_ms";

pub fn run(cfg: Config, repo: Repo) -> Result<ExitCode> {
    let identity = Identity::load(&cfg.state_dir)?;
    let outbox = Outbox::open(&cfg.state_dir.join("outbox.sqlite"), OUTBOX_CAP)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the daemon's runtime")?;
    let mut daemon = Daemon::new(cfg, repo, identity, outbox)?;
    rt.block_on(daemon.run())?;
    Ok(ExitCode::SUCCESS)
}

struct Daemon {
    cfg: Arc<Config>,
    repo: Arc<Repo>,
    identity: Identity,
    outbox: Outbox,
    policy: Option<Policy>,
    schedule: Option<Schedule>,
    last_start: Option<SystemTime>,
    job: Option<Job>,
    sampler: Sampler,
    link: Option<Link>,
    connected: bool,
    inflight: Option<Instant>,
    renewal_asked: Option<Instant>,
    /// Directories changed since the last backup started, and what watches them.
    changes: watch::SharedLog,
    watcher: Option<watch::Watcher>,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn from_ms(v: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

impl Daemon {
    fn new(cfg: Config, repo: Repo, identity: Identity, outbox: Outbox) -> Result<Self> {
        let policy = match outbox.setting(POLICY_KEY)? {
            Some(bytes) => wire::codec::decode::<Policy>(&bytes).ok(),
            None => None,
        };
        let last_start = outbox
            .setting(LAST_START_KEY)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(|b| from_ms(i64::from_le_bytes(b)));
        let sources = cfg.source_dirs.iter().map(|s| s.path.clone()).collect();
        let sampler = Sampler::new(sources, cfg.state_dir.clone());
        let mut d = Daemon {
            cfg: Arc::new(cfg),
            repo: Arc::new(repo),
            identity,
            outbox,
            policy: None,
            schedule: None,
            last_start,
            job: None,
            sampler,
            link: None,
            connected: false,
            inflight: None,
            renewal_asked: None,
            changes: Arc::new(std::sync::Mutex::new(watch::ChangeLog::new(0))),
            watcher: None,
        };
        d.adopt(policy);
        Ok(d)
    }

    /// Takes `policy` (or, without one, the config's `backup_interval`) as the schedule.
    fn adopt(&mut self, policy: Option<Policy>) {
        self.schedule = match &policy {
            Some(p) => Schedule::from_wire(&p.schedule).ok(),
            None => self
                .cfg
                .backup_interval
                .and_then(|d| Schedule::every(d).ok()),
        };
        self.policy = policy;
        // The sources may have changed: watch them afresh (the next run scans all).
        self.watcher = None;
        let cfg = self.job_config().unwrap_or_else(|_| self.cfg.clone());
        (self.changes, self.watcher) = crate::cmd::watch_sources(&cfg);
    }

    fn min_gap(&self) -> Duration {
        match &self.policy {
            Some(p) => Duration::from_secs(p.min_time_between_runs_s),
            None => self.cfg.min_time_between_run.unwrap_or(Duration::ZERO),
        }
    }

    fn next_due(&self) -> Option<SystemTime> {
        let s = self.schedule.as_ref()?;
        Some(next_due(
            s,
            self.min_gap(),
            self.last_start,
            SystemTime::now(),
        ))
    }

    async fn run(&mut self) -> Result<()> {
        let (news_tx, mut news) = mpsc::channel(64);
        self.link = Some(link::start(
            &self.identity,
            self.cfg.heartbeat_interval,
            news_tx.clone(),
        ));
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_interval);
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        let mut report = tokio::time::interval(PROGRESS_EVERY.min(self.cfg.heartbeat_interval));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(shutdown());
        eprintln!("vaultik: agent {} running", self.identity.agent);
        loop {
            let wait = self.until_due();
            tokio::select! {
                Some(n) = news.recv() => self.on_news(n, &news_tx)?,
                _ = tokio::time::sleep(wait), if self.job.is_none() && self.schedule.is_some() => {
                    if self.next_due().is_some_and(|d| d <= SystemTime::now()) {
                        self.start_job(JobKindArg::Backup, None)?;
                    }
                }
                done = jobs::wait(&mut self.job) => self.finish_job(done)?,
                _ = heartbeat.tick() => self.heartbeat()?,
                _ = report.tick(), if self.job.is_some() => self.report()?,
                _ = flush.tick() => self.flush()?,
                _ = &mut stop => break,
            }
        }
        self.goodbye().await;
        Ok(())
    }

    fn until_due(&self) -> Duration {
        self.next_due()
            .and_then(|d| d.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(60))
    }

    fn on_news(&mut self, news: News, news_tx: &mpsc::Sender<News>) -> Result<()> {
        match news {
            News::Connected => {
                self.connected = true;
                self.inflight = None;
                self.publish(Leaf::Status, &Status::Online, true);
                self.up(&Up::Hello(self.hello()));
                self.heartbeat()?;
                self.flush()?;
            }
            News::Disconnected(why) => {
                if self.connected {
                    eprintln!("vaultik: lost the controller link: {why}; reconnecting");
                }
                self.connected = false;
            }
            News::Malformed(why) => {
                eprintln!("vaultik: dropped a malformed message from the controller: {why}")
            }
            News::Down(down) => match *down {
                Down::Acked(ids) => {
                    self.outbox.ack(&ids)?;
                    self.inflight = None;
                    self.flush()?;
                }
                Down::Command(c) => self.command(c)?,
                Down::Certificate { pem } => match self.identity.install_certificate(&pem) {
                    Ok(()) => {
                        eprintln!("vaultik: certificate renewed; reconnecting with it");
                        self.link = None;
                        self.connected = false;
                        self.link = Some(link::start(
                            &self.identity,
                            self.cfg.heartbeat_interval,
                            news_tx.clone(),
                        ));
                    }
                    Err(e) => eprintln!("vaultik: {e}"),
                },
            },
        }
        Ok(())
    }

    fn hello(&self) -> Hello {
        let host = rustix::system::uname();
        let mut capabilities = wire::heapless::Vec::new();
        for c in [Capability::Backup, Capability::Verify, Capability::Cancel] {
            let _ = capabilities.push(c);
        }
        if self.watcher.is_some() {
            let _ = capabilities.push(Capability::Inotify);
        }
        Hello {
            version: truncated(env!("CARGO_PKG_VERSION")),
            os: truncated(std::env::consts::OS),
            arch: truncated(std::env::consts::ARCH),
            hostname: truncated(&host.nodename().to_string_lossy()),
            capabilities,
            policy_revision: self.policy.as_ref().map(|p| p.revision),
            outbox: self.outbox.epoch(),
        }
    }

    fn publish<T: serde::Serialize>(&self, leaf: Leaf, msg: &T, retain: bool) {
        let (Some(link), true) = (&self.link, self.connected) else {
            return;
        };
        let Ok(bytes) = wire::codec::encode(msg) else {
            return;
        };
        let t = topic::topic(&self.identity.agent, leaf);
        let _ = link.client.try_publish(t, QoS::AtLeastOnce, retain, bytes);
    }

    fn up(&self, msg: &Up) {
        self.publish(Leaf::Up, msg, false);
    }

    fn heartbeat(&mut self) -> Result<()> {
        if !self.connected {
            return Ok(());
        }
        let next = self.next_due().map(ms);
        let hb = self
            .sampler
            .sample(ms(SystemTime::now()), next, self.outbox.len()?);
        self.up(&Up::Heartbeat(hb));
        self.maybe_renew();
        Ok(())
    }

    /// Asks for a new certificate once two thirds of this one's life have passed, at
    /// most once an hour.
    fn maybe_renew(&mut self) {
        if !self.identity.renewal_due(SystemTime::now())
            || self
                .renewal_asked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(3600))
        {
            return;
        }
        match self
            .identity
            .csr()
            .map(|c| wire::heapless::String::try_from(c.as_str()))
        {
            Ok(Ok(csr_pem)) => {
                self.up(&Up::Renew { csr_pem });
                self.renewal_asked = Some(Instant::now());
            }
            _ => eprintln!("vaultik: cannot make a certificate request for renewal"),
        }
    }

    /// Sends the oldest unacknowledged events, one batch at a time.
    fn flush(&mut self) -> Result<()> {
        if !self.connected || self.inflight.is_some_and(|t| t.elapsed() < RESEND_AFTER) {
            return Ok(());
        }
        let events = self.outbox.pending(wire::message::BATCH)?;
        if events.is_empty() {
            self.inflight = None;
            return Ok(());
        }
        let list = events.into_iter().collect();
        self.up(&Up::Events(list));
        self.inflight = Some(Instant::now());
        Ok(())
    }

    fn push(&mut self, body: &EventBody) -> Result<()> {
        self.outbox.push(ms(SystemTime::now()), body)?;
        self.flush()
    }

    fn command(&mut self, c: Command) -> Result<()> {
        if !self
            .outbox
            .first_time(&c.id.to_string(), ms(SystemTime::now()))?
        {
            return Ok(());
        }
        let verdict = match c.body {
            CommandBody::RunBackup => self.start_job(JobKindArg::Backup, Some(c.id)),
            CommandBody::Verify => self.start_job(JobKindArg::Verify, Some(c.id)),
            CommandBody::ApplyPolicy(p) => self.apply_policy(p),
            CommandBody::Cancel { job } => jobs::cancel(&self.job, &job),
        };
        let (accepted, reason) = match verdict {
            Ok(()) => (true, String::new()),
            Err(e) => (false, format!("{e:#}")),
        };
        self.push(&EventBody::CommandAck {
            command: c.id,
            accepted,
            reason: truncated(&reason),
        })
    }

    fn apply_policy(&mut self, p: Policy) -> Result<()> {
        if self
            .policy
            .as_ref()
            .is_some_and(|cur| cur.revision >= p.revision)
        {
            return Ok(());
        }
        Schedule::from_wire(&p.schedule)?;
        jobs::effective_config(&self.cfg, &p)?;
        self.outbox
            .set_setting(POLICY_KEY, &wire::codec::encode(&p)?)?;
        eprintln!("vaultik: policy revision {} applied", p.revision);
        self.adopt(Some(p));
        Ok(())
    }

    fn start_job(&mut self, kind: JobKindArg, command: Option<wire::id::CommandId>) -> Result<()> {
        if let Some(j) = &self.job {
            anyhow::bail!("job {} is still running", j.id);
        }
        let cfg = self.job_config()?;
        let mut scope = Scope::Everything;
        if matches!(kind, JobKindArg::Backup) {
            let now = SystemTime::now();
            self.outbox
                .set_setting(LAST_START_KEY, &ms(now).to_le_bytes())?;
            self.last_start = Some(now);
            scope = watch::take(&self.changes);
        }
        let job = Job::start(kind, command, cfg, self.repo.clone(), scope);
        let started = job.started();
        // Kept before anything else can fail: the job runs already, and it holds the
        // watcher's changes until it finishes.
        self.job = Some(job);
        self.push(&started)
    }

    /// The config jobs run under: the agent's, as the policy amends it.
    fn job_config(&self) -> Result<Arc<Config>> {
        Ok(match &self.policy {
            Some(p) => Arc::new(jobs::effective_config(&self.cfg, p)?),
            None => self.cfg.clone(),
        })
    }

    fn finish_job(&mut self, done: jobs::Done) -> Result<()> {
        self.job = None;
        if let Some(scope) = done.unfinished {
            watch::give_back(&self.changes, scope);
        }
        self.push_all(&done.events)
    }

    /// The running job's progress and warning lines since the last report.
    fn report(&mut self) -> Result<()> {
        let events = self.job.as_mut().map(|j| j.report()).unwrap_or_default();
        self.push_all(&events)
    }

    fn push_all(&mut self, events: &[EventBody]) -> Result<()> {
        let now = ms(SystemTime::now());
        for event in events {
            self.outbox.push(now, event)?;
        }
        self.flush()
    }

    /// Says "offline" on the way out, so the controller need not wait for a timeout.
    async fn goodbye(&mut self) {
        if let (Some(link), true) = (&self.link, self.connected) {
            let offline = wire::codec::encode(&Status::Offline).unwrap_or_default();
            let t = topic::topic(&self.identity.agent, Leaf::Status);
            let _ = link
                .client
                .publish(t, QoS::AtLeastOnce, true, offline)
                .await;
            let _ = link.client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `vaultik enroll`: where the identity goes.
pub fn state_dir(config: Option<&Path>, state_dir: Option<&Path>) -> Result<std::path::PathBuf> {
    match (config, state_dir) {
        (_, Some(d)) => Ok(d.to_path_buf()),
        (Some(c), None) => Ok(Config::load(c)?.state_dir),
        (None, None) => Ok(std::path::PathBuf::from("/var/lib/vaultik")),
    }
}

pub fn enroll(
    state: &Path,
    controller: &str,
    token: &str,
    name: Option<String>,
) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let name = name.unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    let id = rt.block_on(edge_agent::fleet::identity::enroll(
        state, controller, token, &name,
    ))?;
    eprintln!(
        "enrolled as agent {} ({}); identity in {}",
        id.agent,
        name,
        state.join("link").display()
    );
    eprintln!("next: run `vaultik agent CONFIG` (or enable vaultik-agent.service)");
    Ok(ExitCode::SUCCESS)
}
