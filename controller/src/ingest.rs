//! What an agent's messages do to the database. The agent is the one its topic names
//! (the broker lets an agent publish only under its own certificate's id); nothing
//! in a message can speak for another agent. Each event id takes effect once: it is
//! recorded in `events` in the same transaction as its effect, and the ids are
//! acknowledged only after that transaction commits.

use rusqlite::{OptionalExtension, Transaction, params};
use wire::id::AgentId;
use wire::message::{
    Capability, Event, EventBody, Heartbeat, Hello, JobEvent, JobKind, JobState, Status,
};

use crate::db::{DbError, sql};

/// What an `Up` message came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded; nothing to answer.
    Recorded,
    /// These event ids are committed: acknowledge them.
    Ack(Vec<u64>),
    /// The agent is unknown or revoked: the message was dropped.
    Refused,
    /// Events came before any hello told their outbox epoch: not acknowledged, so the
    /// agent sends them again after its hello.
    NoEpoch,
}

/// Whether `agent` may speak: enrolled and not revoked.
pub fn admitted(tx: &Transaction, agent: &AgentId) -> Result<bool, DbError> {
    let ok: Option<i64> = tx
        .query_row(
            "SELECT 1 FROM agents WHERE id = ?1 AND revoked_ms IS NULL",
            [agent.to_string()],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql)?;
    Ok(ok.is_some())
}

pub fn hello(tx: &Transaction, agent: &AgentId, h: &Hello, now: i64) -> Result<(), DbError> {
    tx.execute(
        "UPDATE agents SET version = ?2, os = ?3, arch = ?4, hostname = ?5, policy_revision = ?6,
                outbox_epoch = ?7, online = 1, last_seen_ms = ?8, capabilities = ?9 WHERE id = ?1",
        params![
            agent.to_string(),
            h.version.as_str(),
            h.os.as_str(),
            h.arch.as_str(),
            h.hostname.as_str(),
            h.policy_revision.and_then(|r| i64::try_from(r).ok()),
            h.outbox.as_slice(),
            now,
            capabilities(h)
        ],
    )
    .map_err(sql)?;
    Ok(())
}

fn capabilities(h: &Hello) -> String {
    h.capabilities
        .iter()
        .map(|c| match c {
            Capability::Backup => "backup",
            Capability::Verify => "verify",
            Capability::Cancel => "cancel",
            Capability::Inotify => "inotify",
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn status(tx: &Transaction, agent: &AgentId, s: Status, now: i64) -> Result<(), DbError> {
    let online = matches!(s, Status::Online);
    tx.execute(
        "UPDATE agents SET online = ?2, last_seen_ms = CASE WHEN ?2 THEN ?3 ELSE last_seen_ms END
         WHERE id = ?1",
        params![agent.to_string(), online, now],
    )
    .map_err(sql)?;
    Ok(())
}

pub fn heartbeat(
    tx: &Transaction,
    agent: &AgentId,
    h: &Heartbeat,
    now: i64,
) -> Result<(), DbError> {
    let disks: Vec<_> = h
        .disks
        .iter()
        .map(|d| {
            serde_json::json!({
                "role": format!("{:?}", d.role).to_lowercase(),
                "mount": d.mount.as_str(),
                "total": d.total,
                "available": d.available,
            })
        })
        .collect();
    tx.execute(
        "INSERT INTO heartbeats (agent, at_ms, received_ms, cpu_permille, memory_used, memory_total,
                                 disks, next_backup_ms, outbox)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            agent.to_string(),
            h.at_ms,
            now,
            h.cpu_permille,
            clamp(h.memory_used),
            clamp(h.memory_total),
            serde_json::Value::from(disks).to_string(),
            h.next_backup_ms,
            h.outbox
        ],
    )
    .map_err(sql)?;
    tx.execute(
        "UPDATE agents SET online = 1, last_seen_ms = ?2 WHERE id = ?1",
        params![agent.to_string(), now],
    )
    .map_err(sql)?;
    Ok(())
}

/// Records each event not seen before and applies it; returns every id to acknowledge
/// (repeats included, so the agent stops resending them).
pub fn events(
    tx: &Transaction,
    agent: &AgentId,
    events: &[Event],
    now: i64,
) -> Result<Outcome, DbError> {
    let epoch: Option<Vec<u8>> = tx
        .query_row(
            "SELECT outbox_epoch FROM agents WHERE id = ?1",
            [agent.to_string()],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql)?
        .flatten();
    let Some(epoch) = epoch else {
        return Ok(Outcome::NoEpoch);
    };
    let mut ids = Vec::with_capacity(events.len());
    for e in events {
        let Ok(id) = i64::try_from(e.id) else {
            continue;
        };
        let fresh = tx
            .execute(
                "INSERT INTO events (agent, epoch, id, at_ms, received_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT DO NOTHING",
                params![agent.to_string(), epoch, id, e.at_ms, now],
            )
            .map_err(sql)?;
        if fresh == 1 {
            apply(tx, agent, e, now)?;
        }
        ids.push(e.id);
    }
    tx.execute(
        "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1",
        params![agent.to_string(), now],
    )
    .map_err(sql)?;
    Ok(Outcome::Ack(ids))
}

fn apply(tx: &Transaction, agent: &AgentId, e: &Event, now: i64) -> Result<(), DbError> {
    let a = agent.to_string();
    match &e.body {
        EventBody::Job(j) => job(tx, &a, j, e.at_ms),
        EventBody::Log { job, level, line } => {
            tx.execute(
                "INSERT INTO job_logs (job, agent, at_ms, level, line) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    job.to_string(),
                    a,
                    e.at_ms,
                    format!("{level:?}").to_lowercase(),
                    line.as_str()
                ],
            )
            .map_err(sql)?;
            Ok(())
        }
        EventBody::Snapshot(s) => {
            tx.execute(
                "INSERT INTO snapshots (agent, id, time_ms, hostname, files, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![
                    a,
                    hex::encode(s.id),
                    s.time_ms,
                    s.hostname.as_str(),
                    clamp(s.files),
                    clamp(s.bytes)
                ],
            )
            .map_err(sql)?;
            Ok(())
        }
        EventBody::CommandAck {
            command,
            accepted,
            reason,
        } => {
            tx.execute(
                "UPDATE commands SET acked_ms = ?3, accepted = ?4, reason = ?5
                 WHERE id = ?1 AND agent = ?2 AND acked_ms IS NULL",
                params![command.to_string(), a, now, accepted, reason.as_str()],
            )
            .map_err(sql)?;
            Ok(())
        }
    }
}

fn job(tx: &Transaction, agent: &str, j: &JobEvent, at: i64) -> Result<(), DbError> {
    let kind = match j.kind {
        JobKind::Backup => "backup",
        JobKind::Verify => "verify",
    };
    tx.execute(
        "INSERT INTO jobs (agent, id, kind, command, state, started_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?5) ON CONFLICT DO NOTHING",
        params![
            agent,
            j.job.to_string(),
            kind,
            j.command.map(|c| c.to_string()),
            at
        ],
    )
    .map_err(sql)?;
    let id = j.job.to_string();
    match &j.state {
        JobState::Started => {}
        JobState::Progress {
            files,
            bytes,
            total_bytes,
        } => {
            tx.execute(
                "UPDATE jobs SET files = ?4, bytes = ?5, total_bytes = ?6, updated_ms = ?3
                 WHERE agent = ?1 AND id = ?2 AND state = 'running'",
                params![
                    agent,
                    id,
                    at,
                    clamp(*files),
                    clamp(*bytes),
                    total_bytes.map(clamp)
                ],
            )
            .map_err(sql)?;
        }
        JobState::Finished(t) => {
            tx.execute(
                "UPDATE jobs SET state = 'finished', files = ?4, bytes = ?5, new_bytes = ?6,
                        uploaded_bytes = ?7, skipped = ?8, duration_ms = ?9, snapshot = ?10,
                        updated_ms = ?3 WHERE agent = ?1 AND id = ?2 AND state = 'running'",
                params![
                    agent,
                    id,
                    at,
                    clamp(t.files),
                    clamp(t.bytes),
                    clamp(t.new_bytes),
                    clamp(t.uploaded_bytes),
                    clamp(t.skipped),
                    clamp(t.duration_ms),
                    t.snapshot.map(hex::encode)
                ],
            )
            .map_err(sql)?;
        }
        JobState::Failed { reason } => end(tx, agent, &id, at, "failed", reason)?,
        JobState::Skipped { reason } => end(tx, agent, &id, at, "skipped", reason)?,
        JobState::Cancelled => end(tx, agent, &id, at, "cancelled", "")?,
    }
    Ok(())
}

/// A job ends once: the first terminal state recorded stays, whatever arrives later.
fn end(
    tx: &Transaction,
    agent: &str,
    id: &str,
    at: i64,
    state: &str,
    reason: &str,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE jobs SET state = ?4, reason = ?5, updated_ms = ?3
         WHERE agent = ?1 AND id = ?2 AND state = 'running'",
        params![agent, id, at, state, reason],
    )
    .map_err(sql)?;
    Ok(())
}

/// SQLite integers are signed; a count past i64::MAX is a lie, kept at the ceiling.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wire::id::JobId;
    use wire::message::{JobTotals, SnapshotRecord};

    use super::*;
    use crate::db::Db;

    fn enrolled(db: &mut Db, a: AgentId) {
        let t = hex::decode(db.create_token(Duration::from_secs(60), "").unwrap()).unwrap();
        let cert = crate::pki::Issued {
            pem: String::new(),
            serial: hex::encode(a.0),
            not_after: std::time::SystemTime::now() + Duration::from_secs(60),
        };
        db.enroll(&t, &a, "x", &cert).unwrap().unwrap();
    }

    fn hello_msg() -> Hello {
        Hello {
            version: "1".try_into().unwrap(),
            os: "linux".try_into().unwrap(),
            arch: "aarch64".try_into().unwrap(),
            hostname: "pi".try_into().unwrap(),
            capabilities: Default::default(),
            policy_revision: None,
            outbox: [7; 16],
        }
    }

    fn job_event(id: u64, job: JobId, state: JobState) -> Event {
        Event {
            id,
            at_ms: 1,
            body: EventBody::Job(JobEvent {
                job,
                kind: JobKind::Backup,
                command: None,
                state,
            }),
        }
    }

    fn count(db: &Db, sql: &str) -> i64 {
        db.conn().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_redelivered_batch_is_acknowledged_again_and_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        let a = AgentId([1; 16]);
        enrolled(&mut db, a);
        let job = JobId([5; 16]);
        let batch = vec![
            job_event(1, job, JobState::Started),
            Event {
                id: 2,
                at_ms: 2,
                body: EventBody::Snapshot(SnapshotRecord {
                    id: [9; 16],
                    time_ms: 2,
                    hostname: "pi".try_into().unwrap(),
                    files: 3,
                    bytes: 4,
                }),
            },
            Event {
                id: 4,
                at_ms: 2,
                body: EventBody::Log {
                    job,
                    level: wire::message::Level::Warn,
                    line: "skipped /x".try_into().unwrap(),
                },
            },
            job_event(
                3,
                job,
                JobState::Finished(JobTotals {
                    files: 3,
                    ..JobTotals::default()
                }),
            ),
        ];
        let early = db.with_tx(|tx| events(tx, &a, &batch, 1)).unwrap();
        assert_eq!(early, Outcome::NoEpoch, "no hello yet: not acknowledged");
        db.with_tx(|tx| hello(tx, &a, &hello_msg(), 1)).unwrap();
        for _ in 0..2 {
            let out = db.with_tx(|tx| events(tx, &a, &batch, 1)).unwrap();
            assert_eq!(out, Outcome::Ack(vec![1, 2, 4, 3]));
        }
        assert_eq!(count(&db, "SELECT count(*) FROM snapshots"), 1);
        assert_eq!(
            count(&db, "SELECT count(*) FROM job_logs"),
            1,
            "a log line once"
        );
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM jobs WHERE state = 'finished' AND files = 3"
            ),
            1
        );
        // A late progress event cannot reopen a finished job.
        let late = [job_event(
            5,
            job,
            JobState::Progress {
                files: 1,
                bytes: 1,
                total_bytes: None,
            },
        )];
        db.with_tx(|tx| events(tx, &a, &late, 1)).unwrap();
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM jobs WHERE state = 'finished' AND files = 3"
            ),
            1
        );
        // Nor can a later terminal state rewrite how it ended.
        let failed = [
            job_event(
                6,
                job,
                JobState::Failed {
                    reason: "late".try_into().unwrap(),
                },
            ),
            job_event(7, job, JobState::Cancelled),
        ];
        db.with_tx(|tx| events(tx, &a, &failed, 1)).unwrap();
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM jobs WHERE state = 'finished' AND reason IS NULL"
            ),
            1
        );
    }

    #[test]
    fn an_agent_cannot_reach_another_agents_jobs_or_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        let (a, b) = (AgentId([1; 16]), AgentId([2; 16]));
        enrolled(&mut db, a);
        enrolled(&mut db, b);
        let command = db
            .queue_command(&a, &wire::message::CommandBody::RunBackup)
            .unwrap();
        let job = JobId([5; 16]);
        for agent in [a, b] {
            db.with_tx(|tx| hello(tx, &agent, &hello_msg(), 1)).unwrap();
        }
        db.with_tx(|tx| events(tx, &a, &[job_event(1, job, JobState::Started)], 1))
            .unwrap();
        let forged = [
            job_event(
                1,
                job,
                JobState::Failed {
                    reason: "forged".try_into().unwrap(),
                },
            ),
            Event {
                id: 2,
                at_ms: 1,
                body: EventBody::CommandAck {
                    command,
                    accepted: false,
                    reason: "forged".try_into().unwrap(),
                },
            },
        ];
        db.with_tx(|tx| events(tx, &b, &forged, 1)).unwrap();
        let a_job: String = db
            .conn()
            .query_row(
                "SELECT state FROM jobs WHERE agent = ?1",
                [a.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(a_job, "running");
        assert_eq!(
            count(&db, "SELECT count(*) FROM commands WHERE acked_ms IS NULL"),
            1
        );
        // A revoked agent is no longer admitted.
        db.revoke(&b).unwrap();
        assert!(!db.with_tx(|tx| admitted(tx, &b)).unwrap());
        assert!(db.with_tx(|tx| admitted(tx, &a)).unwrap());
    }
}
