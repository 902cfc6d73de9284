//! The agent's outbox: events for the controller, kept in SQLite in the state directory
//! until the controller acknowledges their ids. An MQTT PUBACK only says a broker has a
//! message; an entry leaves here only on the controller's `Acked`, after it committed.
//!
//! The outbox is bounded: past `soft_cap` entries the oldest progress and log events go
//! first, and new ones are not kept. Results (job outcomes, snapshots, command acks)
//! are never dropped before they are acknowledged; they are few (one per job), so the
//! cap holds in practice and a week without the controller fits easily.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use wire::message::{Event, EventBody, JobState};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox {path}: {source}")]
    State {
        path: PathBuf,
        source: Box<crate::Error>,
    },
    #[error("encoding an outbox event: {0}")]
    Encode(#[from] wire::codec::EncodeError),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value BLOB NOT NULL);
-- AUTOINCREMENT: an id is never reused, even after every entry was acknowledged.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    droppable INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_droppable ON outbox (droppable, id);
-- Commands already applied, so a redelivered one (even after a restart) is not.
CREATE TABLE IF NOT EXISTS commands_seen (id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
";

/// How many applied command ids are remembered; redeliveries come soon after.
const SEEN_COMMANDS: i64 = 4096;

pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    soft_cap: u64,
    epoch: [u8; 16],
}

/// Progress and log lines may be lost under pressure; outcomes may not.
fn droppable(body: &EventBody) -> bool {
    match body {
        EventBody::Log { .. } => true,
        EventBody::Job(j) => matches!(j.state, JobState::Progress { .. }),
        EventBody::Snapshot(_) | EventBody::CommandAck { .. } => false,
    }
}

impl Outbox {
    /// Opens (or creates, mode 0600) the outbox at `path`.
    pub fn open(path: &Path, soft_cap: u64) -> Result<Self, OutboxError> {
        crate::index::private_file(path).map_err(|e| OutboxError::State {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let sql = |source| OutboxError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .and_then(|_| conn.execute_batch(SCHEMA))
            .map_err(sql)?;
        let epoch = epoch(&conn).map_err(sql)?;
        Ok(Outbox {
            conn,
            path: path.to_path_buf(),
            soft_cap,
            epoch,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
        |source| OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// A value the daemon keeps across restarts (its policy, its last run).
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        self.conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Records command `id` as applied; false if it already was.
    pub fn first_time(&self, id: &str, at_ms: i64) -> Result<bool, OutboxError> {
        let fresh = self
            .conn
            .execute(
                "INSERT INTO commands_seen (id, at_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![id, at_ms],
            )
            .map_err(self.err())?;
        self.conn
            .execute(
                "DELETE FROM commands_seen WHERE rowid <= (SELECT max(rowid) FROM commands_seen) - ?1",
                [SEEN_COMMANDS],
            )
            .map_err(self.err())?;
        Ok(fresh == 1)
    }

    /// The outbox's random id; event ids count within it.
    pub fn epoch(&self) -> [u8; 16] {
        self.epoch
    }

    /// Keeps an event; returns its id, or `None` if it was a droppable event that did
    /// not fit.
    pub fn push(&mut self, at_ms: i64, body: &EventBody) -> Result<Option<u64>, OutboxError> {
        let can_drop = droppable(body);
        let bytes = wire::encode(body)?;
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let len: i64 = tx
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(self.err())?;
        if u64::try_from(len).unwrap_or(0) >= self.soft_cap {
            let freed = tx
                .execute(
                    "DELETE FROM outbox WHERE id =
                     (SELECT id FROM outbox WHERE droppable = 1 ORDER BY id LIMIT 1)",
                    [],
                )
                .map_err(self.err())?;
            if freed == 0 && can_drop {
                return Ok(None);
            }
        }
        tx.execute(
            "INSERT INTO outbox (at_ms, droppable, body) VALUES (?1, ?2, ?3)",
            params![at_ms, can_drop, bytes],
        )
        .map_err(self.err())?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(self.err())?;
        Ok(u64::try_from(id).ok())
    }

    /// Up to `max` unacknowledged events, oldest first. Entries that no longer decode
    /// (written by another version) are removed rather than blocking the rest.
    pub fn pending(&self, max: usize) -> Result<Vec<Event>, OutboxError> {
        let mut q = self
            .conn
            .prepare_cached("SELECT id, at_ms, body FROM outbox ORDER BY id LIMIT ?1")
            .map_err(self.err())?;
        let rows = q
            .query_map([i64::try_from(max).unwrap_or(i64::MAX)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, at_ms, body) in rows {
            match (u64::try_from(id), wire::decode::<EventBody>(&body)) {
                (Ok(id), Ok(body)) => out.push(Event { id, at_ms, body }),
                _ => {
                    self.conn
                        .execute("DELETE FROM outbox WHERE id = ?1", [id])
                        .map_err(self.err())?;
                }
            }
        }
        Ok(out)
    }

    /// The controller committed these; they leave the outbox. Unknown ids are ignored
    /// (an acknowledgement can arrive twice).
    pub fn ack(&mut self, ids: &[u64]) -> Result<usize, OutboxError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let mut n = 0;
        for id in ids {
            let Ok(id) = i64::try_from(*id) else { continue };
            n += tx
                .execute("DELETE FROM outbox WHERE id = ?1", [id])
                .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(n)
    }

    pub fn len(&self) -> Result<u64, OutboxError> {
        self.conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(self.err())
    }

    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }
}

/// The outbox's id, made once.
fn epoch(conn: &Connection) -> rusqlite::Result<[u8; 16]> {
    let stored: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM settings WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(e) = stored.and_then(|v| <[u8; 16]>::try_from(v).ok()) {
        return Ok(e);
    }
    let e: [u8; 16] = rand::random();
    conn.execute(
        "INSERT OR REPLACE INTO settings (key, value) VALUES ('epoch', ?1)",
        [&e[..]],
    )?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::message::{JobEvent, JobKind, Level, SnapshotRecord};
    use wire::{CommandId, JobId};

    fn progress(n: u64) -> EventBody {
        EventBody::Job(JobEvent {
            job: JobId([1; 16]),
            kind: JobKind::Backup,
            command: None,
            state: JobState::Progress {
                files: n,
                bytes: n,
                total_bytes: None,
            },
        })
    }

    fn result(n: u64) -> EventBody {
        EventBody::Snapshot(SnapshotRecord {
            id: [2; 16],
            time_ms: 0,
            hostname: wire::heapless::String::try_from("h").unwrap(),
            files: n,
            bytes: n,
        })
    }

    #[test]
    fn events_stay_until_acknowledged_and_survive_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("outbox.sqlite");
        let mut o = Outbox::open(&path, 100).unwrap();
        let epoch = o.epoch();
        let a = o.push(1, &result(1)).unwrap().unwrap();
        let b = o.push(2, &progress(2)).unwrap().unwrap();
        assert!(b > a);
        drop(o);
        let mut o = Outbox::open(&path, 100).unwrap();
        assert_eq!(o.epoch(), epoch);
        let ids: Vec<u64> = o.pending(10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [a, b]);
        assert_eq!(o.ack(&[a, a, 999]).unwrap(), 1);
        assert_eq!(o.ack(&[b]).unwrap(), 1);
        assert!(o.is_empty().unwrap());
        // Ids are never reused, even with the outbox empty.
        let c = o.push(3, &result(3)).unwrap().unwrap();
        assert!(c > b);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn under_pressure_progress_goes_first_and_results_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(&t.path().join("o.sqlite"), 3).unwrap();
        o.push(0, &progress(1)).unwrap();
        o.push(0, &result(1)).unwrap();
        o.push(0, &progress(2)).unwrap();
        // Full: the oldest progress event makes room for a result.
        o.push(0, &result(2)).unwrap();
        let kept: Vec<EventBody> = o.pending(10).unwrap().into_iter().map(|e| e.body).collect();
        assert_eq!(kept, [result(1), progress(2), result(2)]);
        // Full again: room for a result costs the last progress event; then progress
        // and logs are refused while results are still kept.
        o.push(0, &result(3)).unwrap();
        assert_eq!(o.push(0, &progress(3)).unwrap(), None);
        let log = EventBody::Log {
            job: JobId([1; 16]),
            level: Level::Info,
            line: wire::heapless::String::try_from("x").unwrap(),
        };
        assert_eq!(o.push(0, &log).unwrap(), None);
        assert!(o.push(0, &result(4)).unwrap().is_some());
        let ack = EventBody::CommandAck {
            command: CommandId([3; 16]),
            accepted: true,
            reason: wire::heapless::String::new(),
        };
        assert!(o.push(0, &ack).unwrap().is_some());
        let kept: Vec<EventBody> = o.pending(10).unwrap().into_iter().map(|e| e.body).collect();
        assert_eq!(kept, [result(1), result(2), result(3), result(4), ack]);
    }

    #[test]
    fn an_entry_that_no_longer_decodes_is_removed_not_blocking() {
        let t = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(&t.path().join("o.sqlite"), 10).unwrap();
        o.push(0, &result(1)).unwrap();
        o.conn
            .execute(
                "INSERT INTO outbox (at_ms, droppable, body) VALUES (0, 0, X'FF00')",
                [],
            )
            .unwrap();
        o.push(0, &result(2)).unwrap();
        assert_eq!(o.pending(10).unwrap().len(), 2);
        assert_eq!(o.len().unwrap(), 2);
    }
}
