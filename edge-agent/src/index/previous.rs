//! The previous snapshot: the metadata database of the agent's newest completed
//! snapshot, kept beside the index (packed, `kept`), unpacked as `<index>-prev` and
//! attached as `prev`. It is
//! what unchanged files are recognised by and what chunks are deduplicated against.
//! When it is missing, damaged, or not the newest snapshot the index knows, an empty
//! in-memory database stands in: everything is read and uploaded again.

use std::io::Read;

use rusqlite::OptionalExtension;

use super::Index;
use crate::chunk::ChunkHasher;
use crate::error::{Error, Result};
use crate::pieces::PieceList;
use crate::snapshot::{METADATA_FORMAT, metadata_schema};

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
                Ok(true) if self.read_only => return Ok(()),
                Ok(true) => match self.upgrade_previous() {
                    Ok(()) => return Ok(()),
                    Err(reason) => self.notices.push(format!(
                        "warning: the kept copy of the newest snapshot's metadata ({}) could not be brought to format {METADATA_FORMAT} ({reason}); this backup reads and uploads everything again",
                        self.prev_path.display()
                    )),
                },
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
        super::remove_if_there(&self.kept_path)?;
        super::remove_if_there(&self.prev_path)
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

    /// The format of the attached previous snapshot.
    pub(super) fn previous_format(&self) -> rusqlite::Result<u32> {
        Ok(self
            .prev_meta("format")?
            .and_then(|f| f.parse().ok())
            .unwrap_or(0))
    }

    /// Rewrites a kept copy in format 2 or 3 (chunks and blobs by id) into format 4
    /// (by row number), in place, so that an upgraded agent still skips unchanged
    /// files and deduplicates. Format 1 (values of extended attributes inline) fails
    /// here and is forgotten.
    fn upgrade_previous(&self) -> rusqlite::Result<()> {
        if self.previous_format()? >= METADATA_FORMAT {
            return Ok(());
        }
        let schema = metadata_schema().replace("IF NOT EXISTS ", "IF NOT EXISTS prev.");
        let schema = schema.replace("ON prev.nodes", "ON nodes");
        let result = self.conn.execute_batch(&format!(
            "BEGIN;
             ALTER TABLE prev.blobs RENAME TO old_blobs;
             ALTER TABLE prev.chunks RENAME TO old_chunks;
             ALTER TABLE prev.file_chunks RENAME TO old_file_chunks;
             ALTER TABLE prev.xattrs RENAME TO old_xattrs;
             {schema}
             INSERT INTO prev.blobs (name, size, plain_size, payload_start, hash)
                 SELECT id, size, plain_size, payload_start, hash FROM prev.old_blobs ORDER BY id;
             INSERT INTO prev.chunks (hash, blob, offset, clen, ulen)
                 SELECT c.id, b.id, c.offset, c.clen, c.ulen
                 FROM prev.old_chunks c JOIN prev.blobs b ON b.name = c.blob_id
                 ORDER BY b.id, c.offset;
             CREATE INDEX prev.chunks_by_hash ON chunks (hash);
             INSERT INTO prev.file_chunks (node_id, seq, offset, chunk)
                 SELECT f.node_id, f.seq, f.offset, c.id
                 FROM prev.old_file_chunks f JOIN prev.chunks c ON c.hash = f.chunk_id;
             INSERT INTO prev.xattrs (node_id, name, value, chunk)
                 SELECT x.node_id, x.name, x.value, c.id
                 FROM prev.old_xattrs x LEFT JOIN prev.chunks c ON c.hash = x.chunk_id;
             DROP INDEX prev.chunks_by_hash;
             DROP TABLE prev.old_blobs;
             DROP TABLE prev.old_chunks;
             DROP TABLE prev.old_file_chunks;
             DROP TABLE prev.old_xattrs;
             UPDATE prev.meta SET value = '{METADATA_FORMAT}' WHERE key = 'format';
             COMMIT;"
        ));
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
            return result;
        }
        // Dropped tables leave free pages: compacted once.
        self.conn.execute_batch("VACUUM prev")
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
