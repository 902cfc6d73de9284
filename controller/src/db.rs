//! The controller's SQLite database: WAL, migrations from `controller/migrations`
//! applied at open, and the operations the CLI and the link need. The serving process
//! and the CLI open it side by side; the busy timeout lets them take turns.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use wire::id::{AgentId, CommandId};
use wire::message::CommandBody;

/// Every migration, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_history_capabilities.sql"),
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} is at schema version {found}, newer than this controller ({known}); upgrade the controller"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("no agent {0}")]
    NoAgent(String),
    #[error("encoding: {0}")]
    Encode(#[from] wire::codec::EncodeError),
}

/// Why a token was refused. The HTTP answer does not say which, to give a guesser
/// nothing; the controller's log does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown token")]
    Unknown,
    #[error("token already used")]
    Used,
    #[error("token expired")]
    Expired,
}

pub struct Db {
    conn: Connection,
    path: PathBuf,
}

/// One row of `vaultik-controller agents`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentRow {
    pub id: String,
    pub display_name: String,
    pub hostname: Option<String>,
    pub version: Option<String>,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
    pub revoked: bool,
    pub last_backup_ms: Option<i64>,
    pub snapshots: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let err = |source| DbError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        crate::files::private_file(path).map_err(|e| DbError::Sqlite {
            path: path.to_path_buf(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .map_err(err)?;
        let mut db = Db {
            conn,
            path: path.to_path_buf(),
        };
        db.migrate()?;
        Ok(db)
    }

    pub(crate) fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        let path = self.path.clone();
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let applied: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let applied = usize::try_from(applied).unwrap_or(usize::MAX);
        if applied > MIGRATIONS.len() {
            return Err(DbError::TooNew {
                path,
                found: applied,
                known: MIGRATIONS.len(),
            });
        }
        for sql in &MIGRATIONS[applied..] {
            tx.execute_batch(sql).map_err(err)?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", MIGRATIONS.len()))
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Runs `f` in one transaction, committed only if it succeeds.
    pub fn with_tx<T>(
        &mut self,
        f: impl FnOnce(&Transaction) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let path = self.path.clone();
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let out = f(&tx)?;
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Stores a new token's hash; returns the secret (hex), shown once.
    pub fn create_token(&self, valid_for: Duration, note: &str) -> Result<String, DbError> {
        let secret: [u8; 16] = rand::random();
        let now = now_ms();
        let expires = now.saturating_add(i64::try_from(valid_for.as_millis()).unwrap_or(i64::MAX));
        self.conn
            .execute(
                "INSERT INTO tokens (hash, created_ms, expires_ms, note) VALUES (?1, ?2, ?3, ?4)",
                params![sha256(&secret), now, expires, note],
            )
            .map_err(self.err())?;
        Ok(hex::encode(secret))
    }

    /// Spends a token and records the agent it enrolled with its first certificate, in
    /// one transaction: a token enrolls at most one agent, however many try at once.
    pub fn enroll(
        &mut self,
        secret: &[u8],
        agent: &AgentId,
        display_name: &str,
        cert: &crate::pki::Issued,
    ) -> Result<Result<(), TokenRefusal>, DbError> {
        let now = now_ms();
        let not_after = ms_of(cert.not_after);
        self.with_tx(|tx| {
            if let Err(why) = token_state(tx, secret, now)? {
                return Ok(Err(why));
            }
            tx.execute(
                "UPDATE tokens SET used_ms = ?2, used_by = ?3 WHERE hash = ?1",
                params![sha256(secret), now, agent.to_string()],
            )
            .map_err(sql)?;
            tx.execute(
                "INSERT INTO agents (id, display_name, enrolled_ms) VALUES (?1, ?2, ?3)",
                params![agent.to_string(), display_name, now],
            )
            .map_err(sql)?;
            record_certificate(tx, agent, &cert.serial, now, not_after)?;
            Ok(Ok(()))
        })
    }

    /// Whether `secret` is a token that can still enroll (checked again, and spent, by
    /// `enroll`), so that no work is done for a request without one.
    pub fn token_usable(&self, secret: &[u8]) -> Result<Result<(), TokenRefusal>, DbError> {
        token_state(&self.conn, secret, now_ms())
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>, DbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT a.id, a.display_name, a.hostname, a.version, a.online, a.last_seen_ms,
                        a.revoked_ms IS NOT NULL,
                        (SELECT max(time_ms) FROM snapshots s WHERE s.agent = a.id),
                        (SELECT count(*) FROM snapshots s WHERE s.agent = a.id)
                 FROM agents a ORDER BY a.enrolled_ms",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(AgentRow {
                    id: r.get(0)?,
                    display_name: r.get(1)?,
                    hostname: r.get(2)?,
                    version: r.get(3)?,
                    online: r.get(4)?,
                    last_seen_ms: r.get(5)?,
                    revoked: r.get(6)?,
                    last_backup_ms: r.get(7)?,
                    snapshots: r.get(8)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Marks `agent` revoked and bumps the revision the serving controller watches to
    /// rewrite the CRL and ACL and cut the agent's live session.
    pub fn revoke(&mut self, agent: &AgentId) -> Result<(), DbError> {
        let id = agent.to_string();
        self.with_tx(|tx| {
            let n = tx
                .execute(
                    "UPDATE agents SET revoked_ms = coalesce(revoked_ms, ?2), online = 0 WHERE id = ?1",
                    params![id, now_ms()],
                )
                .map_err(sql)?;
            if n == 0 {
                return Err(DbError::NoAgent(id.clone()));
            }
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ('revocations', 1)
                 ON CONFLICT (key) DO UPDATE SET value = value + 1",
                [],
            )
            .map_err(sql)?;
            Ok(())
        })
    }

    /// Bumped by every revocation.
    pub fn revocation_revision(&self) -> Result<i64, DbError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM settings WHERE key = 'revocations'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        Ok(v.unwrap_or(0))
    }

    pub fn revoked_agents(&self) -> Result<Vec<AgentId>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM agents WHERE revoked_ms IS NOT NULL ORDER BY id")
            .map_err(self.err())?;
        let ids = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(ids.iter().filter_map(|s| AgentId::parse(s)).collect())
    }

    /// Serials of every certificate of a revoked agent that has not yet expired.
    pub fn revoked_serials(&self) -> Result<Vec<String>, DbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT c.serial FROM certificates c JOIN agents a ON a.id = c.agent
                 WHERE a.revoked_ms IS NOT NULL AND c.not_after_ms > ?1 ORDER BY c.serial",
            )
            .map_err(self.err())?;
        st.query_map([now_ms()], |r| r.get(0))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// Queues a command for `agent`; the serving controller sends it and resends it
    /// until the agent acknowledges it.
    pub fn queue_command(&self, agent: &AgentId, body: &CommandBody) -> Result<CommandId, DbError> {
        let id = CommandId(rand::random());
        let bytes = wire::codec::encode(body)?;
        let n = self
            .conn
            .execute(
                "INSERT INTO commands (id, agent, body, created_ms)
                 SELECT ?1, id, ?3, ?4 FROM agents WHERE id = ?2 AND revoked_ms IS NULL",
                params![id.to_string(), agent.to_string(), bytes, now_ms()],
            )
            .map_err(self.err())?;
        if n == 0 {
            return Err(DbError::NoAgent(agent.to_string()));
        }
        Ok(id)
    }

    /// Commands not yet acknowledged whose last send is older than `resend_after`,
    /// for agents that are online. Each is marked sent now.
    pub fn commands_to_send(
        &mut self,
        resend_after: Duration,
    ) -> Result<Vec<(AgentId, wire::message::Command)>, DbError> {
        let now = now_ms();
        let before = now.saturating_sub(i64::try_from(resend_after.as_millis()).unwrap_or(0));
        self.with_tx(|tx| {
            let mut st = tx
                .prepare(
                    "SELECT c.id, c.agent, c.body FROM commands c JOIN agents a ON a.id = c.agent
                     WHERE c.acked_ms IS NULL AND a.online = 1 AND a.revoked_ms IS NULL
                       AND (c.sent_ms IS NULL OR c.sent_ms < ?1)
                     ORDER BY c.created_ms LIMIT 64",
                )
                .map_err(sql)?;
            let rows = st
                .query_map([before], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(sql)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql)?;
            let mut out = Vec::new();
            for (id, agent, body) in rows {
                tx.execute(
                    "UPDATE commands SET sent_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(sql)?;
                let (Some(cid), Some(agent), Ok(body)) = (
                    CommandId::parse(&id),
                    AgentId::parse(&agent),
                    wire::codec::decode::<CommandBody>(&body),
                ) else {
                    continue;
                };
                out.push((agent, wire::message::Command { id: cid, body }));
            }
            Ok(out)
        })
    }

    /// Stores `policy` for `agent` with the next revision and queues the command that
    /// delivers it, in one transaction. Returns the revision.
    pub fn set_policy(
        &mut self,
        agent: &AgentId,
        mut policy: wire::message::Policy,
    ) -> Result<u64, DbError> {
        let id = agent.to_string();
        self.with_tx(|tx| {
            let known: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM agents WHERE id = ?1 AND revoked_ms IS NULL",
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            if known.is_none() {
                return Err(DbError::NoAgent(id.clone()));
            }
            let last: Option<i64> = tx
                .query_row(
                    "SELECT revision FROM policies WHERE agent = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            let revision = last.map_or(1, |r| r.saturating_add(1));
            policy.revision = u64::try_from(revision).unwrap_or(1);
            let now = now_ms();
            tx.execute(
                "INSERT INTO policies (agent, revision, body, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent) DO UPDATE SET revision = ?2, body = ?3, updated_ms = ?4",
                params![id, revision, wire::codec::encode(&policy)?, now],
            )
            .map_err(sql)?;
            let body = wire::codec::encode(&CommandBody::ApplyPolicy(policy.clone()))?;
            tx.execute(
                "INSERT INTO commands (id, agent, body, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![CommandId(rand::random()).to_string(), id, body, now],
            )
            .map_err(sql)?;
            Ok(policy.revision)
        })
    }

    /// Marks online agents not heard from for `timeout` offline; returns them.
    /// Deletes heartbeats and remembered event ids received before `keep` ago; returns
    /// how many rows went. Event ids only guard against redelivery, which comes within
    /// minutes, never weeks.
    pub fn trim_history(&self, keep: Duration) -> Result<usize, DbError> {
        let before = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        let h = self
            .conn
            .execute("DELETE FROM heartbeats WHERE received_ms < ?1", [before])
            .map_err(self.err())?;
        let e = self
            .conn
            .execute("DELETE FROM events WHERE received_ms < ?1", [before])
            .map_err(self.err())?;
        Ok(h + e)
    }

    pub fn mark_silent_offline(&self, timeout: Duration) -> Result<Vec<String>, DbError> {
        let before = now_ms().saturating_sub(i64::try_from(timeout.as_millis()).unwrap_or(0));
        let mut st = self
            .conn
            .prepare(
                "UPDATE agents SET online = 0 WHERE online = 1 AND coalesce(last_seen_ms, 0) < ?1
                 RETURNING id",
            )
            .map_err(self.err())?;
        st.query_map([before], |r| r.get(0))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    pub fn bump_counter(&self, name: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES (?1, 1)
                 ON CONFLICT (name) DO UPDATE SET value = value + 1",
                [name],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> Result<i64, DbError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        Ok(v.unwrap_or(0))
    }

    /// Read access for reports and tests.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

pub(crate) fn sql(source: rusqlite::Error) -> DbError {
    DbError::Sqlite {
        path: PathBuf::from("controller database"),
        source,
    }
}

pub(crate) fn ms_of(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn record_certificate(
    tx: &Transaction,
    agent: &AgentId,
    serial: &str,
    now: i64,
    not_after: i64,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO certificates (serial, agent, issued_ms, not_after_ms) VALUES (?1, ?2, ?3, ?4)",
        params![serial, agent.to_string(), now, not_after],
    )
    .map_err(sql)?;
    Ok(())
}

fn token_state(
    conn: &rusqlite::Connection,
    secret: &[u8],
    now: i64,
) -> Result<Result<(), TokenRefusal>, DbError> {
    let row: Option<(i64, Option<i64>)> = conn
        .query_row(
            "SELECT expires_ms, used_ms FROM tokens WHERE hash = ?1",
            [sha256(secret)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql)?;
    Ok(match row {
        None => Err(TokenRefusal::Unknown),
        Some((_, Some(_))) => Err(TokenRefusal::Used),
        Some((expires, None)) if expires <= now => Err(TokenRefusal::Expired),
        Some(_) => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> crate::pki::Issued {
        crate::pki::Issued {
            pem: String::new(),
            serial: hex::encode(rand::random::<[u8; 16]>()),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_token_enrolls_once_and_not_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        let t = hex::decode(db.create_token(Duration::from_secs(60), "pi").unwrap()).unwrap();
        let a = AgentId([1; 16]);
        assert_eq!(db.enroll(&t, &a, "pi", &issued()).unwrap(), Ok(()));
        let b = AgentId([2; 16]);
        assert_eq!(
            db.enroll(&t, &b, "pi", &issued()).unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            db.enroll(&[0; 16], &b, "x", &issued()).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        let old = hex::decode(db.create_token(Duration::ZERO, "").unwrap()).unwrap();
        assert_eq!(
            db.enroll(&old, &b, "x", &issued()).unwrap(),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(db.agents().unwrap().len(), 1);
        // Reopening applies no migration twice.
        drop(db);
        let db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        assert_eq!(db.agents().unwrap()[0].id, a.to_string());
    }

    #[test]
    fn revocation_lists_the_agents_serials_and_refuses_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        let t = hex::decode(db.create_token(Duration::from_secs(60), "").unwrap()).unwrap();
        let a = AgentId([1; 16]);
        let cert = issued();
        db.enroll(&t, &a, "pi", &cert).unwrap().unwrap();
        db.queue_command(&a, &CommandBody::RunBackup).unwrap();
        assert_eq!(db.revocation_revision().unwrap(), 0);
        db.revoke(&a).unwrap();
        assert_eq!(db.revocation_revision().unwrap(), 1);
        assert_eq!(db.revoked_serials().unwrap(), vec![cert.serial]);
        assert_eq!(db.revoked_agents().unwrap(), vec![a]);
        assert!(db.queue_command(&a, &CommandBody::RunBackup).is_err());
        assert!(matches!(
            db.revoke(&AgentId([9; 16])),
            Err(DbError::NoAgent(_))
        ));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        Db::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        assert!(matches!(Db::open(&path), Err(DbError::TooNew { .. })));
    }

    #[test]
    fn history_older_than_the_window_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("c.sqlite")).unwrap();
        let t = hex::decode(db.create_token(Duration::from_secs(60), "pi").unwrap()).unwrap();
        let a = AgentId([1; 16]);
        db.enroll(&t, &a, "pi", &issued()).unwrap().unwrap();
        let now = now_ms();
        for (i, age_days) in [0i64, 1, 8, 30].into_iter().enumerate() {
            let at = now - age_days * 86_400_000;
            db.conn
                .execute(
                    "INSERT INTO heartbeats (agent, at_ms, received_ms, cpu_permille, memory_used,
                        memory_total, disks, outbox) VALUES (?1, ?2, ?2, 0, 0, 0, '[]', 0)",
                    params![a.to_string(), at],
                )
                .unwrap();
            db.conn
                .execute(
                    "INSERT INTO events (agent, epoch, id, at_ms, received_ms) VALUES (?1, x'00', ?2, ?3, ?3)",
                    params![a.to_string(), i as i64, at],
                )
                .unwrap();
        }
        assert_eq!(db.trim_history(Duration::from_secs(7 * 86_400)).unwrap(), 4);
        let left = |table: &str| -> i64 {
            db.conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!((left("heartbeats"), left("events")), (2, 2));
    }

    /// POSIX locks belong to the process: closing any descriptor of the database file
    /// drops every lock its connections hold, and another process closing its own
    /// connection then deletes the write-ahead log under them.
    #[test]
    fn a_second_connection_keeps_the_first_ones_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let mut first = Db::open(&path).unwrap();
        let _second = Db::open(&path).unwrap();
        let out = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg("SELECT count(*) FROM agents")
            .output()
            .expect("sqlite3 comes from ./scripts/test.sh");
        assert!(out.status.success());
        assert!(
            dir.path().join("c.sqlite-wal").exists(),
            "another process deleted the log of live connections"
        );
        let t = hex::decode(first.create_token(Duration::from_secs(60), "pi").unwrap()).unwrap();
        let a = AgentId([1; 16]);
        assert_eq!(first.enroll(&t, &a, "pi", &issued()).unwrap(), Ok(()));
        let seen = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM agents", [], |r| r.get::<_, i64>(0))
            .unwrap();
        assert_eq!(seen, 1, "a write is visible to other processes");
    }
}
