//! Jobs the daemon runs on a blocking thread (backups, verifies), and the events that
//! report them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edge_agent::backup::{self, Scope};
use edge_agent::config::Config;
use edge_agent::progress::{Counts, Progress, Tally};
use edge_agent::store::Repo;
use wire::id::{CommandId, JobId};
use wire::message::truncated;
use wire::message::{
    EventBody, JobEvent, JobKind, JobState, JobTotals, Level, Policy, SnapshotRecord,
};

/// Warning lines a job keeps for the controller between two reports.
const LINES_PER_REPORT: usize = 64;

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
    tally: Arc<Tally>,
    reported: Option<Counts>,
    scope: Scope,
}

/// A finished job's events, in order.
pub struct Done {
    pub events: Vec<EventBody>,
    /// What a backup that did not finish was to look at.
    pub unfinished: Option<Scope>,
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
        scope: Scope,
    ) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let tally = Arc::new(Tally::new(LINES_PER_REPORT));
        let progress = Progress::tallied("backup", tally.clone());
        let run_scope = scope.clone();
        let handle = tokio::task::spawn_blocking(move || match kind {
            JobKindArg::Backup => run_backup(&cfg, &repo, flag, progress, run_scope),
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
            tally,
            reported: None,
            scope,
        }
    }

    /// What happened since the last report: the counts, when they moved, and the
    /// warning lines (with a note of any that did not fit).
    pub fn report(&mut self) -> Vec<EventBody> {
        let mut out = Vec::new();
        let counts = self.tally.counts();
        if self.reported != Some(counts) {
            self.reported = Some(counts);
            out.push(self.event(JobState::Progress {
                files: counts.files,
                bytes: counts.bytes,
                total_bytes: counts.total,
            }));
        }
        let (lines, dropped) = self.tally.take_lines();
        let log = |level, line: &str| EventBody::Log {
            job: self.id,
            level,
            line: truncated(line),
        };
        for line in lines {
            out.push(log(level_of(&line), &line));
        }
        if dropped > 0 {
            out.push(log(Level::Warn, &format!("{dropped} more lines not sent")));
        }
        out
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
    let finished = matches!(&result, Ok(Ok(_)));
    // The lines of the job's last moments; its counts are in the final event.
    let mut tail = j.report();
    tail.retain(|e| matches!(e, EventBody::Log { .. }));
    let cancelled = j.cancel.load(Ordering::Relaxed);
    let state = |events: &[EventBody]| events.is_empty();
    let events = match result {
        Ok(Ok(mut events)) if !state(&events) => {
            // The engine's events carry the totals; the job id and duration are ours.
            for e in &mut events {
                if let EventBody::Log { job, .. } = e {
                    *job = j.id;
                }
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
    tail.extend(events);
    Done {
        events: tail,
        // Only a backup took the watcher's changes; a failed verify must not give back
        // "everything" and force a full walk.
        unfinished: (!finished && j.kind == JobKind::Backup).then(|| j.scope.clone()),
    }
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

fn level_of(line: &str) -> Level {
    if line.starts_with("error") {
        Level::Error
    } else if line.starts_with("warning") {
        Level::Warn
    } else {
        Level::Info
    }
}

fn run_backup(
    cfg: &Config,
    repo: &Repo,
    cancel: Arc<AtomicBool>,
    progress: Progress,
    scope: Scope,
) -> Result<Vec<EventBody>, String> {
    let opts = backup::Options {
        progress,
        rehash: false,
        cancel: Some(cancel),
        scope,
    };
    let out = backup::run(cfg, repo, opts).map_err(|e| e.to_string())?;
    let mut events = Vec::new();
    if let Some(n) = out.rescanned {
        events.push(EventBody::Log {
            job: JobId([0; 16]),
            level: Level::Info,
            line: truncated(&format!("partial scan: {n} changed directories listed")),
        });
    }
    let id: [u8; 16] = out.snapshot.0;
    let s = &out.summary;
    let totals = JobTotals {
        files: s.files,
        files_new: s.files_new,
        files_changed: s.files_changed,
        bytes: s.bytes,
        new_bytes: s.new_bytes,
        uploaded_bytes: s.uploaded_bytes.saturating_add(s.metadata_bytes),
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
    events.extend([EventBody::Snapshot(record), finished(totals)]);
    Ok(events)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tally: Arc<Tally>) -> Job {
        Job {
            id: JobId([1; 16]),
            kind: JobKind::Backup,
            command: None,
            cancel: Arc::new(AtomicBool::new(false)),
            handle: tokio::task::spawn_blocking(|| Ok(Vec::new())),
            started: Instant::now(),
            tally,
            reported: None,
            scope: Scope::Everything,
        }
    }

    fn progress(e: &EventBody) -> Option<(u64, u64, Option<u64>)> {
        match e {
            EventBody::Job(JobEvent {
                state:
                    JobState::Progress {
                        files,
                        bytes,
                        total_bytes,
                    },
                ..
            }) => Some((*files, *bytes, *total_bytes)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn only_a_failed_backup_gives_its_changes_back() {
        for (kind, back) in [(JobKind::Backup, true), (JobKind::Verify, false)] {
            let mut j = job(Arc::new(Tally::new(2)));
            j.kind = kind;
            j.handle = tokio::task::spawn_blocking(|| Err("the bucket is gone".into()));
            let mut slot = Some(j);
            let done = wait(&mut slot).await;
            assert_eq!(done.unfinished.is_some(), back, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn a_report_carries_moved_counts_and_new_lines_once() {
        let tally = Arc::new(Tally::new(2));
        let p = Progress::tallied("backup", tally.clone());
        let mut j = job(tally);
        p.set_total(10);
        p.add_file();
        p.add_bytes(4);
        for l in ["warning: skipped /a: denied", "note: b", "c"] {
            p.warn(l);
        }
        let first = j.report();
        assert_eq!(progress(&first[0]), Some((1, 4, Some(10))));
        let lines: Vec<_> = first[1..]
            .iter()
            .map(|e| match e {
                EventBody::Log { level, line, .. } => (*level, line.as_str().to_string()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            lines,
            [
                (Level::Warn, "warning: skipped /a: denied".to_string()),
                (Level::Info, "note: b".to_string()),
                (Level::Warn, "1 more lines not sent".to_string()),
            ]
        );
        assert!(j.report().is_empty(), "nothing moved, nothing sent");
        p.add_bytes(1);
        let again = j.report();
        assert_eq!(again.len(), 1);
        assert_eq!(progress(&again[0]), Some((1, 5, Some(10))));
    }
}
