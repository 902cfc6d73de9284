//! The agent's local SQLite index: settings, the snapshots it made, and blobs of an
//! interrupted run. Its newest completed snapshot's metadata database is kept beside it
//! and attached as `prev` (files with their stat data and chunk lists, and where each
//! chunk lives), used to skip unchanged files and to deduplicate. During a backup the
//! new snapshot's metadata database (the "run database") is attached as `run` and
//! filled; once its manifest is uploaded it becomes `prev` (a rename).
//!
//! Dedup is only against chunks of the agent's own newest completed snapshot and of the
//! run in progress: those blobs are never pruned (docs/FORMAT.md, "Prune safety").

mod carry;
mod chunks;
mod kept;
mod previous;
pub use carry::{CarryKey, Child, RunTotals};

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::{BlobId, Placement};
use crate::snapshot::{AgentId, NodeKind, metadata_schema};
use crate::store::Uploaded;

const INDEX_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (id TEXT PRIMARY KEY, time_unix_ns INTEGER NOT NULL);
-- Blobs uploaded by a run that has not completed (yet): reused by the next run if young.
CREATE TABLE IF NOT EXISTS partial_blobs (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    plain_size INTEGER NOT NULL,
    payload_start INTEGER NOT NULL,
    hash BLOB NOT NULL,
    uploaded_ns INTEGER NOT NULL
) WITHOUT ROWID;
-- Their chunks, encoded as in the blob's trailer, a few thousand to a row: written in
-- order, not a row per chunk in id order.
CREATE TABLE IF NOT EXISTS partial_entries (
    blob_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (blob_id, part)
) WITHOUT ROWID;
";

/// How long blobs of an interrupted run stay eligible for reuse. Prune's safety margin
/// must exceed this plus the longest backup (docs/FORMAT.md, "Prune safety").
pub const SALVAGE_WINDOW_NS: i64 = 6 * 3600 * 1_000_000_000;

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Stat data of a file as the previous snapshot saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// A node to record in the run database.
pub struct NewNode<'a> {
    pub path: &'a [u8],
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub target: Option<&'a [u8]>,
    pub stat: FileStat,
}

/// A blob that finished uploading, with the chunks it holds.
pub struct BlobDone {
    pub id: BlobId,
    pub uploaded: Uploaded,
    pub plain_size: u64,
    pub payload_start: u64,
    pub entries: Vec<Placement>,
}

pub struct Index {
    conn: Connection,
    path: PathBuf,
    run_path: PathBuf,
    /// The newest snapshot's metadata database, attached as `prev` (`previous`).
    prev_path: PathBuf,
    /// Its packed copy, kept between runs (`kept`).
    kept_path: PathBuf,
    /// The working copy of a read-only index: a private temporary file.
    scratch: Option<tempfile::NamedTempFile>,
    /// The run's lookup from chunk ids to chunk rows, attached as `ids` (`chunks`).
    ids_path: PathBuf,
    ready: std::cell::Cell<chunks::Ready>,
    /// The number the run's next new chunk row gets.
    next_row: std::cell::Cell<i64>,
    read_only: bool,
    /// Whether the previous snapshot, and young blobs of an interrupted run, have
    /// chunks to deduplicate against: a first backup then skips both lookups per chunk.
    dedup_prev: bool,
    dedup_salvage: bool,
    /// The run began as a byte copy of the previous snapshot (`carry_previous`): it
    /// holds every chunk and blob row of it, and only the chunks of removed rows
    /// (`temp.dropped`) may have lost their last reference.
    carried: bool,
    /// Things the user should hear about once (a damaged index, a recovered run).
    notices: Vec<String>,
    /// Held while a backup uses the index (`<index>.lock`).
    _lock: Option<std::fs::File>,
}

/// Takes `<index>.lock`; another backup holding it is an error that says so.
fn lock_state(path: &Path) -> Result<std::fs::File> {
    let lock_path = beside(path, ".lock");
    private_file(&lock_path)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("opening", &lock_path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(path.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("locking", &lock_path, e)),
    }
}

/// Moves a corrupt index aside and returns the warning to show.
fn set_aside(path: &Path, reason: &rusqlite::Error) -> Result<String> {
    // A damaged index only costs re-uploading: set it aside and start afresh.
    let aside = beside(path, ".damaged");
    std::fs::rename(path, &aside)
        .map_err(|err| Error::io("moving aside damaged index", path, err))?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(beside(path, suffix));
    }
    Ok(format!(
        "warning: local index {} is damaged ({reason}); it was moved to {} and a new one started, so this backup uploads everything again",
        path.display(),
        aside.display()
    ))
}

/// Opens the index database, checking that it is intact.
fn open_checked(path: &Path) -> std::result::Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(check),
        ));
    }
    shrinkable(&conn)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
    conn.execute_batch(INDEX_SCHEMA)?;
    drop_copied_tables(&conn)?;
    pack_partial_chunks(&conn)?;
    Ok(conn)
}

/// Indexes made before `partial_entries` had a row per chunk in `partial_chunks`:
/// moved, once.
fn pack_partial_chunks(conn: &Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE name = 'partial_chunks')",
        [],
        |r| r.get(0),
    )?;
    if !old {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    let rows: Vec<(String, Vec<u8>, i64, u32, u32)> = tx
        .prepare("SELECT blob_id, id, offset, clen, ulen FROM partial_chunks ORDER BY blob_id")?
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for blob in rows.chunk_by(|a, b| a.0 == b.0) {
        let entries: Vec<Placement> = blob
            .iter()
            .filter_map(|(_, id, offset, clen, ulen)| {
                Some(Placement {
                    chunk: ChunkId::from_slice(id)?,
                    offset: u64::try_from(*offset).ok()?,
                    clen: *clen,
                    ulen: *ulen,
                })
            })
            .collect();
        chunks::put_entries(&tx, &blob[0].0, &entries)?;
    }
    tx.execute_batch("DROP TABLE partial_chunks")?;
    tx.commit()
}

/// The salvage tables fill with every chunk of a run and empty when it commits: with
/// incremental auto-vacuum (`Index::shrink`) the file gives that space back.
fn shrinkable(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA journal_size_limit = 4194304")?;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode != 2 {
        // VACUUM cannot change it in WAL mode (set again by the caller). It needs room
        // for a copy of the file: on a full disk the index just stays as it is.
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA auto_vacuum = INCREMENTAL;")?;
        let _ = conn.execute_batch("VACUUM");
    }
    Ok(())
}

/// Indexes made before the previous snapshot was used in place held copies of its
/// tables: dropped, and the file compacted, once.
fn drop_copied_tables(conn: &Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE name = 'file_chunks')",
        [],
        |r| r.get(0),
    )?;
    if old {
        conn.execute_batch(
            "DROP TABLE IF EXISTS main.files; DROP TABLE IF EXISTS main.file_chunks;
             DROP TABLE IF EXISTS main.chunks; DROP TABLE IF EXISTS main.blobs;",
        )?;
        // Gives the space back; on a full disk the pages stay free inside the file.
        let _ = conn.execute_batch("VACUUM");
    }
    Ok(())
}

/// `dev, ino, size, mtime_ns, ctime_ns` from column `at` on (written by this agent).
fn file_stat(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<FileStat> {
    Ok(FileStat {
        dev: r.get::<_, i64>(at)? as u64,
        ino: r.get::<_, i64>(at + 1)? as u64,
        size: r.get::<_, i64>(at + 2)? as u64,
        mtime_ns: r.get(at + 3)?,
        ctime_ns: r.get(at + 4)?,
    })
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Index {
        path: path.to_path_buf(),
        source,
    }
}

/// A path next to the index: `index.sqlite` + `suffix`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Creates `path` (if missing) readable by its owner only, and tightens an existing
/// file. SQLite gives its journal and WAL files the mode of the database file.
/// An existing file is only chmod'ed, never opened: closing a descriptor of a SQLite
/// database drops every POSIX lock this process's connections hold on it.
pub(crate) fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Err(e) => Err(e),
    }
    .map_err(|e| Error::io("creating", path, e))
}

/// Removes `path`; one that is not there is no error.
fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", path, e)),
    }
}

/// Only real corruption justifies setting an index aside; a locked or unreadable one
/// is an error to report.
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

impl Index {
    /// Opens (or creates) the index for a backup. Takes the state lock first, so a
    /// second backup with the same index stops with a clear error.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io("creating index directory", dir, e))?;
        }
        let lock = lock_state(path)?;
        private_file(path)?;
        let mut notices = Vec::new();
        let conn = match open_checked(path) {
            Ok(c) => c,
            Err(reason) if is_corrupt(&reason) => {
                notices.push(set_aside(path, &reason)?);
                private_file(path)?;
                open_checked(path).map_err(sql_err(path))?
            }
            Err(reason) => return Err(sql_err(path)(reason)),
        };
        let mut index = Index::over(conn, path);
        index.notices = notices;
        index._lock = Some(lock);
        index.unpack_kept()?;
        index.attach_previous(true)?;
        Ok(index)
    }

    /// An index over `conn`, with the paths beside `path`, no notices and no lock.
    fn over(conn: Connection, path: &Path) -> Self {
        Index {
            conn,
            path: path.to_path_buf(),
            run_path: beside(path, "-run"),
            prev_path: beside(path, "-prev"),
            kept_path: beside(path, "-prev.zst"),
            scratch: None,
            ids_path: beside(path, "-ids"),
            ready: Default::default(),
            next_row: Default::default(),
            read_only: false,
            dedup_prev: false,
            dedup_salvage: false,
            carried: false,
            notices: Vec::new(),
            _lock: None,
        }
    }

    /// Opens an existing index without changing anything (agent-side verify).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sql_err(path))?;
        let mut index = Index::over(conn, path);
        index.read_only = true;
        index.unpack_kept()?;
        index.attach_previous(false)?;
        Ok(index)
    }

    fn e(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        sql_err(&self.path)
    }

    /// A 32-byte setting, if it is there.
    fn setting_bytes(&self, key: &str) -> Result<Option<[u8; 32]>> {
        let got: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.e())?;
        Ok(got.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    }

    /// The per-index key of chunk ids; made on first use.
    pub fn chunk_key(&self) -> Result<[u8; 32]> {
        if let Some(k) = self.setting_bytes("chunk_key")? {
            return Ok(k);
        }
        let key: [u8; 32] = rand::random();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('chunk_key', ?1)",
                [&key[..]],
            )
            .map_err(self.e())?;
        Ok(key)
    }

    /// The identity of this index, recorded in every manifest it makes; made on first use.
    pub fn agent_id(&self) -> Result<AgentId> {
        if let Some(id) = self
            .setting("agent_id")?
            .as_deref()
            .and_then(AgentId::parse)
        {
            return Ok(id);
        }
        let id = AgentId::random();
        self.set_setting("agent_id", &id.to_string())?;
        Ok(id)
    }

    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT CAST(value AS TEXT) FROM settings WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.e())
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
            .map_err(self.e())
    }

    /// When every file was last read in full (a first run counts), if ever.
    pub fn last_full_scan_ns(&self) -> Result<Option<i64>> {
        Ok(self
            .setting("last_full_scan_ns")?
            .and_then(|v| v.parse().ok()))
    }

    pub fn set_last_full_scan_ns(&self, t: i64) -> Result<()> {
        self.set_setting("last_full_scan_ns", &t.to_string())
    }

    /// When a run last walked the whole tree (rather than a partial scan's few
    /// directories), if ever.
    pub fn last_walk_ns(&self) -> Result<Option<i64>> {
        Ok(self.setting("last_walk_ns")?.and_then(|v| v.parse().ok()))
    }

    pub fn set_last_walk_ns(&self, t: i64) -> Result<()> {
        self.set_setting("last_walk_ns", &t.to_string())
    }

    /// When a run last visited every entry (rather than only those whose stat data
    /// changed), if ever.
    pub fn last_visit_ns(&self) -> Result<Option<i64>> {
        Ok(self.setting("last_visit_ns")?.and_then(|v| v.parse().ok()))
    }

    pub fn set_last_visit_ns(&self, t: i64) -> Result<()> {
        self.set_setting("last_visit_ns", &t.to_string())
    }

    /// Records, durably, that the manifest of the finished run is about to be uploaded.
    pub fn mark_manifest_pending(&self, id: &str, time_ns: i64) -> Result<()> {
        self.set_setting("pending_manifest", &format!("{id} {time_ns}"))
    }

    /// Starts a run: a fresh run database is attached as `run`. First deals with a run
    /// whose manifest upload failed or was cut off: whether that snapshot exists is
    /// unknown, so neither it nor the indexed snapshot is a safe dedup base (prune may
    /// treat either as superseded). Its blobs stay reusable as young partial blobs.
    pub fn begin_run(&mut self) -> Result<()> {
        let now = now_ns();
        if let Some(pending) = self.setting("pending_manifest")? {
            let id = pending.split(' ').next().unwrap_or_default().to_string();
            self.conn
                .execute_batch("DELETE FROM settings WHERE key = 'pending_manifest'")
                .map_err(self.e())?;
            self.forget_previous()?;
            self.notices.push(format!(
                "warning: the previous backup stopped while committing snapshot {id}; this backup reads and uploads everything again, except blobs uploaded in the last 6 hours"
            ));
        }
        // Blobs of interrupted runs uploaded before this are not reused.
        let cutoff = now - SALVAGE_WINDOW_NS;
        self.conn
            .execute(
                "DELETE FROM partial_entries WHERE blob_id NOT IN
                     (SELECT id FROM partial_blobs WHERE uploaded_ns >= ?1)",
                [cutoff],
            )
            .and_then(|_| {
                self.conn
                    .execute("DELETE FROM partial_blobs WHERE uploaded_ns < ?1", [cutoff])
            })
            .map_err(self.e())?;
        self.dedup_prev = self.any("prev.chunks")?;
        self.dedup_salvage = self.any("main.partial_entries")?;
        for suffix in ["", "-journal"] {
            let mut p = self.run_path.as_os_str().to_owned();
            p.push(suffix);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io("removing stale run database", p, err)),
            }
        }
        private_file(&self.run_path)?;
        self.carried = false;
        self.attach_ids()?;
        self.attach_run()
    }

    /// Attaches the run database, creating its tables where they are missing, and
    /// opens the run's transaction.
    fn attach_run(&self) -> Result<()> {
        let run = self.run_path.to_string_lossy().into_owned();
        self.conn
            .execute("ATTACH DATABASE ?1 AS run", [run])
            .map_err(self.e())?;
        let schema = metadata_schema().replace("IF NOT EXISTS ", "IF NOT EXISTS run.");
        // Index names are qualified by their table's schema, not their own name.
        let schema = schema.replace("ON run.nodes", "ON nodes");
        self.conn.execute_batch(&schema).map_err(self.e())?;
        // Freed space is zeroed: deleted rows leave nothing behind, and the pieces
        // and the kept copy compress better.
        self.conn
            .execute_batch(
                "PRAGMA run.secure_delete = ON;
                 CREATE TEMP TABLE IF NOT EXISTS dropped (id INTEGER PRIMARY KEY);
                 DELETE FROM temp.dropped;
                 BEGIN",
            )
            .map_err(self.e())?;
        Ok(())
    }

    /// Commits what the run wrote so far and opens a new transaction.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn.execute_batch("COMMIT; BEGIN").map_err(self.e())
    }

    /// Bytes of file content in the previous snapshot, if there is one.
    pub fn last_snapshot_bytes(&self) -> Result<Option<u64>> {
        self.conn
            .query_row(
                "SELECT count(*), total(size) FROM prev.nodes WHERE kind = 'file'",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?)),
            )
            .map(|(n, total)| (n > 0).then_some(total as u64))
            .map_err(self.e())
    }

    pub fn prev_file(&self, path: &[u8]) -> Result<Option<(i64, FileStat)>> {
        self.conn
            .prepare_cached(
                "SELECT id, dev, ino, size, mtime_ns, ctime_ns FROM prev.nodes
                 WHERE path = ?1 AND kind = 'file'",
            )
            .and_then(|mut s| {
                s.query_row([path], |r| Ok((r.get(0)?, file_stat(r, 1)?)))
                    .optional()
            })
            .map_err(self.e())
    }

    pub fn insert_node(&self, n: &NewNode<'_>) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO run.nodes (path, kind, mode, uid, gid, size, mtime_ns, target, dev, ino, ctime_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    n.path,
                    n.kind.as_str(),
                    n.mode,
                    n.uid,
                    n.gid,
                    n.size as i64,
                    n.mtime_ns,
                    n.target,
                    n.stat.dev as i64,
                    n.stat.ino as i64,
                    n.stat.ctime_ns
                ])
            })
            .map_err(self.e())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records an extended attribute whose value is stored as chunk row `value`.
    pub fn insert_xattr(&self, node: i64, name: &[u8], value: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO run.xattrs (node_id, name, chunk) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![node, name, value]))
            .map(|_| ())
            .map_err(self.e())
    }

    /// Path of a regular file already in this run with the same inode (a hard link).
    pub fn find_inode(&self, dev: u64, ino: u64) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached(
                "SELECT path FROM run.nodes WHERE dev = ?1 AND ino = ?2 AND kind = 'file' LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![dev as i64, ino as i64], |r| r.get(0))
                    .optional()
            })
            .map_err(self.e())
    }

    pub fn remove_node(&self, node: i64) -> Result<()> {
        self.conn
            .execute_batch(&format!(
                "INSERT OR IGNORE INTO temp.dropped
                     SELECT chunk FROM run.file_chunks WHERE node_id = {node};
                 INSERT OR IGNORE INTO temp.dropped
                     SELECT chunk FROM run.xattrs WHERE node_id = {node} AND chunk IS NOT NULL;
                 DELETE FROM run.file_chunks WHERE node_id = {node};
                 DELETE FROM run.xattrs WHERE node_id = {node};
                 DELETE FROM run.nodes WHERE id = {node};"
            ))
            .map_err(self.e())
    }

    pub fn set_size(&self, node: i64, size: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE run.nodes SET size = ?2 WHERE id = ?1",
                params![node, size as i64],
            )
            .map(|_| ())
            .map_err(self.e())
    }

    /// Reuses an unchanged file's chunk list: its chunk rows keep their numbers in the
    /// run (`chunks`).
    pub fn reuse_chunks(&self, old_node: i64, new_node: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO run.file_chunks (node_id, seq, offset, chunk)
                 SELECT ?2, seq, offset, chunk FROM prev.file_chunks WHERE node_id = ?1",
            )
            .and_then(|mut s| s.execute(params![old_node, new_node]))
            .map(|_| ())
            .map_err(self.e())
    }

    /// Adds chunk row `chunk` to a file's chunk list.
    pub fn add_file_chunk(&self, node: i64, seq: u64, offset: u64, chunk: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO run.file_chunks (node_id, seq, offset, chunk) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![node, seq as i64, offset as i64, chunk]))
            .map(|_| ())
            .map_err(self.e())
    }

    /// True when `table` has a row.
    fn any(&self, table: &str) -> Result<bool> {
        self.conn
            .query_row(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), [], |r| {
                r.get(0)
            })
            .map_err(self.e())
    }

    /// Completes the run database: drops chunk and blob rows nothing references,
    /// writes `meta`, and detaches it. Returns its path for upload.
    pub fn finish_run(&mut self, meta: &[(&str, String)]) -> Result<PathBuf> {
        let e = sql_err(&self.path);
        self.settle_chunks()?;
        for (k, v) in meta {
            self.conn
                .execute(
                    "INSERT OR REPLACE INTO run.meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )
                .map_err(&e)?;
        }
        self.conn
            .execute_batch("COMMIT; DETACH DATABASE run")
            .map_err(&e)?;
        self.drop_ids()?;
        Ok(self.run_path.clone())
    }

    /// Makes the uploaded snapshot the index's reference for the next run.
    /// `pieces` is the snapshot's piece list (JSON): what the next run's metadata upload
    /// may reuse.
    pub fn commit_snapshot(&mut self, id: &str, time_unix_ns: i64, pieces: &str) -> Result<()> {
        // The run database becomes the previous snapshot first: until the index records
        // the snapshot, `pending_manifest` keeps it from being used (`previous`).
        let run = self.run_path.clone();
        self.pack_kept(&run)?;
        self.keep_run_as_previous()?;
        let e = sql_err(&self.path);
        self.conn
            .execute_batch(
                "BEGIN;
                 DELETE FROM main.partial_entries;
                 DELETE FROM main.partial_blobs;
                 DELETE FROM main.settings WHERE key = 'pending_manifest';",
            )
            .map_err(&e)?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO main.snapshots (id, time_unix_ns) VALUES (?1, ?2)",
                params![id, time_unix_ns],
            )
            .map_err(&e)?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO main.settings (key, value) VALUES ('pieces', ?1)",
                [pieces],
            )
            .map_err(&e)?;
        self.conn.execute_batch("COMMIT").map_err(e)?;
        self.shrink()?;
        self.attach_previous(false)
    }

    /// Gives back the pages the salvage tables no longer use, and empties the WAL.
    fn shrink(&self) -> Result<()> {
        // Each step of incremental_vacuum frees a page: run it to the end.
        let mut q = self
            .conn
            .prepare("PRAGMA main.incremental_vacuum")
            .map_err(self.e())?;
        let mut rows = q.query([]).map_err(self.e())?;
        while rows.next().map_err(self.e())?.is_some() {}
        self.conn
            .query_row("PRAGMA main.wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(self.e())
    }

    /// Blobs referenced by the newest completed snapshot (its data and its metadata
    /// pieces), with their sizes.
    pub fn blob_sizes(&self) -> Result<Vec<(String, u64)>> {
        if !self.has_previous() {
            return Ok(Vec::new());
        }
        let mut q = self
            .conn
            .prepare(if self.previous_format().map_err(self.e())? >= 4 {
                "SELECT name, size FROM prev.blobs"
            } else {
                // Read-only, a kept copy an older agent made is used as it is.
                "SELECT id, size FROM prev.blobs"
            })
            .map_err(self.e())?;
        let rows = q
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(self.e())?;
        let mut sizes: Vec<(String, u64)> =
            rows.collect::<rusqlite::Result<_>>().map_err(self.e())?;
        if let Some(list) = self.previous_pieces()? {
            sizes.extend(list.blobs.into_iter().map(|b| (b.id, b.size)));
        }
        Ok(sizes)
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.drop_working_copy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;
    use crate::pack::Placement;

    fn blob(n: u8, chunks: &[ChunkId]) -> BlobDone {
        BlobDone {
            id: BlobId([n; 32]),
            uploaded: Uploaded {
                size: 100,
                hash: [n; 32],
            },
            plain_size: 90,
            payload_start: 10,
            entries: chunks
                .iter()
                .enumerate()
                .map(|(i, c)| Placement {
                    chunk: *c,
                    offset: 8 + 10 * i as u64,
                    clen: 10,
                    ulen: 10,
                })
                .collect(),
        }
    }

    fn file(index: &Index, path: &[u8]) -> i64 {
        index
            .insert_node(&NewNode {
                path,
                kind: NodeKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 10,
                mtime_ns: 1,
                target: None,
                stat: FileStat {
                    dev: 1,
                    ino: path.len() as u64,
                    size: 10,
                    mtime_ns: 1,
                    ctime_ns: 1,
                },
            })
            .unwrap()
    }

    fn chunk_ids(db: &Path) -> Vec<(Vec<u8>, String)> {
        let c = Connection::open(db).unwrap();
        let mut q = c
            .prepare(
                "SELECT c.hash, b.name FROM chunks c JOIN blobs b ON b.id = c.blob ORDER BY c.hash",
            )
            .unwrap();
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_run_keeps_exactly_the_chunks_its_files_reference() {
        let t = tempfile::tempdir().unwrap();
        let mut index = Index::open(&t.path().join("index.sqlite")).unwrap();
        let [used, unused, kept] = [1u8, 2, 3].map(|n| ChunkId([n; 32]));
        index.begin_run().unwrap();
        let a = file(&index, b"a");
        let rows = [used, unused, kept].map(|c| index.new_chunk(&c).unwrap());
        index
            .record_blob(&blob(7, &[used, unused, kept]), &rows)
            .unwrap();
        index.add_file_chunk(a, 0, 0, rows[0]).unwrap();
        let b = file(&index, b"bb");
        index.add_file_chunk(b, 0, 0, rows[2]).unwrap();
        let meta = [("snapshot_id", "s1".into()), ("format", "4".into())];
        let db = index.finish_run(&meta).unwrap();
        let blob7 = BlobId([7; 32]).to_hex();
        assert_eq!(
            chunk_ids(&db),
            [
                (used.0.to_vec(), blob7.clone()),
                (kept.0.to_vec(), blob7.clone())
            ],
            "a chunk no file references is dropped"
        );
        index.commit_snapshot("s1", 1, "{}").unwrap();

        // The next run reuses one file's chunk list: where its chunk lives comes along.
        index.begin_run().unwrap();
        let b2 = file(&index, b"bb");
        let old: i64 = index
            .conn
            .query_row("SELECT id FROM prev.nodes WHERE path = x'6262'", [], |r| {
                r.get(0)
            })
            .unwrap();
        index.reuse_chunks(old, b2).unwrap();
        assert_eq!(
            index.chunk_ref(&kept).unwrap(),
            Some(rows[2]),
            "same number"
        );
        assert_eq!(index.chunk_ref(&unused).unwrap(), None, "dropped last run");
        let db = index.finish_run(&[]).unwrap();
        assert_eq!(chunk_ids(&db), [(kept.0.to_vec(), blob7)]);
        assert!(
            !t.path().join("index.sqlite-ids").exists(),
            "scratch removed"
        );
    }

    #[test]
    fn an_older_index_keeps_the_chunks_of_its_partial_blobs() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("index.sqlite");
        let blob7 = BlobId([7; 32]).to_hex();
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE partial_blobs (id TEXT PRIMARY KEY, size INTEGER NOT NULL,
                 plain_size INTEGER NOT NULL, payload_start INTEGER NOT NULL,
                 hash BLOB NOT NULL, uploaded_ns INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE partial_chunks (id BLOB PRIMARY KEY, blob_id TEXT NOT NULL,
                 offset INTEGER NOT NULL, clen INTEGER NOT NULL, ulen INTEGER NOT NULL)
                 WITHOUT ROWID;",
        )
        .unwrap();
        c.execute(
            "INSERT INTO partial_blobs VALUES (?1, 100, 90, 10, x'07', ?2)",
            params![blob7, now_ns()],
        )
        .unwrap();
        for (n, offset) in [(3u8, 8), (4, 20)] {
            c.execute(
                "INSERT INTO partial_chunks VALUES (?1, ?2, ?3, 12, 30)",
                params![&[n; 32][..], blob7, offset],
            )
            .unwrap();
        }
        drop(c);
        let mut index = Index::open(&path).unwrap();
        index.begin_run().unwrap();
        let row = index.chunk_ref(&ChunkId([4; 32])).unwrap().unwrap();
        assert_eq!(index.chunk_ref(&ChunkId([5; 32])).unwrap(), None);
        let placed: (Vec<u8>, i64, i64, String) = index
            .conn
            .query_row(
                "SELECT c.hash, c.offset, c.clen, b.name FROM run.chunks c
                 JOIN run.blobs b ON b.id = c.blob WHERE c.id = ?1",
                [row],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(placed, (vec![4; 32], 20, 12, blob7));
        let gone: bool = index
            .conn
            .query_row(
                "SELECT NOT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE name = 'partial_chunks')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(gone);
    }

    #[test]
    fn entries_whose_blob_row_is_gone_are_dropped_not_salvaged() {
        // An older agent drops partial blobs it finds stale, but knows nothing of
        // their entries.
        let t = tempfile::tempdir().unwrap();
        let mut index = Index::open(&t.path().join("index.sqlite")).unwrap();
        let orphan = blob(9, &[ChunkId([9; 32])]);
        chunks::put_entries(&index.conn, &orphan.id.to_hex(), &orphan.entries).unwrap();
        index.begin_run().unwrap();
        assert_eq!(index.chunk_ref(&ChunkId([9; 32])).unwrap(), None);
        assert!(!index.any("main.partial_entries").unwrap());
    }
}
