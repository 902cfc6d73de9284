//! The previous snapshot: the metadata database of the agent's newest completed
//! snapshot, kept beside the index as `<index>-prev` and attached as `prev`. It is
//! what unchanged files are recognised by and what chunks are deduplicated against.
//! When it is missing, damaged, or not the newest snapshot the index knows, an empty
//! in-memory database stands in: everything is read and uploaded again.

use std::io::Read;

use rusqlite::OptionalExtension;

use super::Index;
use crate::chunk::ChunkHasher;
use crate::error::{Error, Result};
use crate::pieces::PieceList;
use crate::snapshot::metadata_schema;

impl Index {
    /// Attaches the previous snapshot as `prev` (outside a transaction). `check` first
    /// compares it with its piece hashes, or runs SQLite's quick check when they do not
    /// match; one that fails is forgotten, with a notice.
    pub(super) fn attach_previous(&mut self, check: bool) -> Result<()> {
        if self.prev_path.exists() {
            let prev = self.prev_path.to_string_lossy().into_owned();
            self.conn
                .execute("ATTACH DATABASE ?1 AS prev", [prev])
                .map_err(self.e())?;
            match self.previous_is_usable(check) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(reason) => self.notices.push(format!(
                    "warning: the kept copy of the newest snapshot's metadata ({}) is damaged ({reason}); this backup reads and uploads everything again",
                    self.prev_path.display()
                )),
            }
            self.conn
                .execute_batch("DETACH DATABASE prev")
                .map_err(self.e())?;
            if !self.read_only {
                self.remove_previous()?;
            }
        }
        if self.read_only {
            // Nothing can be created on a read-only connection: no `prev` at all.
            return Ok(());
        }
        self.attach_empty()
    }

    /// True when `prev` is attached (always, except read-only without a usable one).
    pub(super) fn has_previous(&self) -> bool {
        let q = "SELECT EXISTS (SELECT 1 FROM pragma_database_list WHERE name = 'prev')";
        self.conn.query_row(q, [], |r| r.get(0)).unwrap_or(false)
    }

    /// The piece list of the previous snapshot, when that snapshot is attached as
    /// `prev`: the pieces a new metadata upload may reuse.
    pub fn previous_pieces(&self) -> Result<Option<PieceList>> {
        if !self.has_previous() {
            return Ok(None);
        }
        let id = self.prev_meta("snapshot_id").map_err(self.e())?;
        Ok(self
            .kept_pieces()?
            .filter(|l| id.as_ref() == Some(&l.snapshot)))
    }

    /// Where the previous snapshot's database lies: what its piece list describes, byte
    /// for byte, while [`Self::previous_pieces`] returns it.
    pub fn previous_db(&self) -> &std::path::Path {
        &self.prev_path
    }

    /// The piece list the index kept with its newest snapshot, if it has one.
    fn kept_pieces(&self) -> Result<Option<PieceList>> {
        Ok(self
            .setting("pieces")?
            .and_then(|json| serde_json::from_str::<PieceList>(&json).ok()))
    }

    /// A value of the previous snapshot's `meta` table.
    pub(super) fn prev_meta(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM prev.meta WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
    }

    /// The newest snapshot the index recorded: the last one, whatever the clock said.
    pub(super) fn newest_snapshot(&self) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT id FROM main.snapshots ORDER BY rowid DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
    }

    /// True when the kept copy hashes, piece by piece, to the piece list kept with the
    /// newest snapshot: cheaper than SQLite's quick check, which reads every page too.
    fn matches_kept_pieces(&self) -> bool {
        let list = self.kept_pieces().ok().flatten();
        let key = self.setting_bytes("chunk_key").ok().flatten();
        let (Some(list), Some(key)) = (list, key) else {
            return false;
        };
        let Ok(mut file) = std::fs::File::open(&self.prev_path) else {
            return false;
        };
        if file.metadata().map(|m| m.len()).ok() != Some(list.size) {
            return false;
        }
        let hasher = ChunkHasher::new(key);
        let mut buf = Vec::new();
        list.pieces.iter().all(|p| {
            buf.resize(p.ulen as usize, 0);
            file.read_exact(&mut buf).is_ok() && hex::encode(hasher.id(&buf).0) == p.id
        })
    }

    fn remove_previous(&self) -> Result<()> {
        match std::fs::remove_file(&self.prev_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", &self.prev_path, e)),
        }
    }

    /// True when `prev` is intact and is the newest snapshot the index knows, and no
    /// manifest is pending (that snapshot may or may not exist).
    fn previous_is_usable(&self, check: bool) -> rusqlite::Result<bool> {
        // Byte for byte what was uploaded is intact; anything else gets SQLite's check.
        if check && !self.matches_kept_pieces() {
            let ok: String = self
                .conn
                .query_row("PRAGMA prev.quick_check", [], |r| r.get(0))?;
            if ok != "ok" {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(ok),
                ));
            }
        }
        let pending: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM main.settings WHERE key = 'pending_manifest')",
            [],
            |r| r.get(0),
        )?;
        let newest = self.newest_snapshot()?;
        Ok(!pending && newest.is_some() && self.prev_meta("snapshot_id")? == newest)
    }

    /// No previous snapshot: an empty one in memory, so queries need no special case.
    fn attach_empty(&self) -> Result<()> {
        let schema = metadata_schema().replace("IF NOT EXISTS ", "IF NOT EXISTS prev.");
        let schema = schema.replace("ON prev.nodes", "ON nodes");
        self.conn
            .execute("ATTACH DATABASE ':memory:' AS prev", [])
            .and_then(|_| self.conn.execute_batch(&schema))
            .map_err(self.e())
    }

    /// Drops the previous snapshot: it no longer matches the index (outside a
    /// transaction).
    pub(super) fn forget_previous(&self) -> Result<()> {
        self.conn
            .execute_batch("DETACH DATABASE prev")
            .map_err(self.e())?;
        self.remove_previous()?;
        self.attach_empty()
    }

    /// Makes the run database (detached, complete, its manifest uploaded) the previous
    /// snapshot: a rename.
    pub(super) fn keep_run_as_previous(&self) -> Result<()> {
        self.conn
            .execute_batch("DETACH DATABASE prev")
            .map_err(self.e())?;
        std::fs::rename(&self.run_path, &self.prev_path)
            .map_err(|err| Error::io("keeping the run database", &self.run_path, err))
    }
}
