//! Jobs the daemon runs on a blocking thread (backups, verifies), and the events that
//! report them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edge_agent::backup;
use edge_agent::config::Config;
use edge_agent::progress::Progress;
use edge_agent::store::Repo;
use wire::id::{CommandId, JobId};
use wire::message::truncated;
use wire::message::{EventBody, JobEvent, JobKind, JobState, JobTotals, Policy, SnapshotRecord};

#[derive(Clone, Copy)]
pub enum JobKindArg {
    Backup,
    Verify,
}

pub struct Job {
    pub id: JobId,
    kind: JobKind,
    command: Option<CommandId>,
    cancel: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Result<Vec<EventBody>, String>>,
    started: Instant,
}

/// A finished job's events, in order.
pub struct Done {
    pub events: Vec<EventBody>,
}

/// The config a policy makes of `cfg`.
pub fn effective_config(cfg: &Config, p: &Policy) -> Result<Config> {
    if !matches!(p.destination.as_str(), "" | "default") {
        bail!(
            "destination {:?}: this agent's config defines one destination, `default`",
            p.destination.as_str()
        );
    }
    let sources: Vec<&str> = p.source_dirs.iter().map(|s| s.as_str()).collect();
    let exclude: Vec<&str> = p.exclude.iter().map(|s| s.as_str()).collect();
    let full = Duration::from_secs(p.full_scan_interval_s);
    Ok(cfg.under_policy(&sources, &exclude, Some(full))?)
}

impl Job {
    pub fn start(
        kind: JobKindArg,
        command: Option<CommandId>,
        cfg: Arc<Config>,
        repo: Arc<Repo>,
    ) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let handle = tokio::task::spawn_blocking(move || match kind {
            JobKindArg::Backup => run_backup(&cfg, &repo, flag),
            JobKindArg::Verify => run_verify(&cfg, &repo),
        });
        Job {
            id: JobId(rand::random()),
            kind: match kind {
                JobKindArg::Backup => JobKind::Backup,
                JobKindArg::Verify => JobKind::Verify,
            },
            command,
            cancel,
            handle,
            started: Instant::now(),
        }
    }

    fn event(&self, state: JobState) -> EventBody {
        EventBody::Job(JobEvent {
            job: self.id,
            kind: self.kind,
            command: self.command,
            state,
        })
    }

    pub fn started(&self) -> EventBody {
        self.event(JobState::Started)
    }
}

/// Resolves when the running job ends; never, when there is none.
pub async fn wait(job: &mut Option<Job>) -> Done {
    let Some(j) = job.as_mut() else {
        return std::future::pending().await;
    };
    let result = (&mut j.handle).await;
    let cancelled = j.cancel.load(Ordering::Relaxed);
    let state = |events: &[EventBody]| events.is_empty();
    let events = match result {
        Ok(Ok(mut events)) if !state(&events) => {
            // The engine's events carry the totals; the job id and duration are ours.
            for e in &mut events {
                if let EventBody::Job(je) = e {
                    je.job = j.id;
                    je.command = j.command;
                    if let JobState::Finished(t) = &mut je.state {
                        t.duration_ms =
                            u64::try_from(j.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    }
                }
            }
            events
        }
        Ok(Ok(_)) => vec![j.event(JobState::Finished(JobTotals::default()))],
        Ok(Err(_)) if cancelled => vec![j.event(JobState::Cancelled)],
        Ok(Err(reason)) => vec![j.event(JobState::Failed {
            reason: truncated(&reason),
        })],
        Err(e) => vec![j.event(JobState::Failed {
            reason: truncated(&format!("the job stopped: {e}")),
        })],
    };
    Done { events }
}

pub fn cancel(job: &Option<Job>, id: &JobId) -> Result<()> {
    match job {
        Some(j) if j.id == *id => {
            j.cancel.store(true, Ordering::Relaxed);
            Ok(())
        }
        _ => bail!("job {id} is not running"),
    }
}

fn finished(totals: JobTotals) -> EventBody {
    EventBody::Job(JobEvent {
        job: JobId([0; 16]),
        kind: JobKind::Backup,
        command: None,
        state: JobState::Finished(totals),
    })
}

fn run_backup(
    cfg: &Config,
    repo: &Repo,
    cancel: Arc<AtomicBool>,
) -> Result<Vec<EventBody>, String> {
    let opts = backup::Options {
        progress: Progress::new(false, "backup"),
        rehash: false,
        cancel: Some(cancel),
    };
    let out = backup::run(cfg, repo, opts).map_err(|e| e.to_string())?;
    let id: [u8; 16] = out.snapshot.0;
    let s = &out.summary;
    let totals = JobTotals {
        files: s.files,
        files_new: s.files_new,
        files_changed: s.files_changed,
        bytes: s.bytes,
        new_bytes: s.new_bytes,
        uploaded_bytes: s.uploaded_bytes,
        skipped: u64::try_from(out.skipped.len()).unwrap_or(u64::MAX),
        duration_ms: 0,
        snapshot: Some(id),
    };
    let record = SnapshotRecord {
        id,
        time_ms: out.time_unix_ns / 1_000_000,
        hostname: truncated(&out.hostname),
        files: s.files,
        bytes: s.bytes,
    };
    Ok(vec![EventBody::Snapshot(record), finished(totals)])
}

fn run_verify(cfg: &Config, repo: &Repo) -> Result<Vec<EventBody>, String> {
    let index =
        edge_agent::index::Index::open_read_only(&cfg.index_path).map_err(|e| e.to_string())?;
    let report = edge_agent::verify::verify_from_index(repo, &index).map_err(|e| e.to_string())?;
    if !report.is_clean() {
        return Err(format!("{} damaged objects", report.damage.len()));
    }
    let mut done = finished(JobTotals::default());
    if let EventBody::Job(j) = &mut done {
        j.kind = JobKind::Verify;
    }
    Ok(vec![done])
}
