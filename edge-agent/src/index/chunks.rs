//! Where chunks live, in the run database: a row per chunk (its id, blob, place) that
//! file and attribute rows refer to by number, and the lookup from a chunk's id to its
//! row. That lookup is a table of its own in `<index>-ids` (attached as `ids`): it
//! would double the size of the database the snapshot uploads and the agent keeps, so
//! it is built on a run's first lookup and deleted with the run.
//!
//! A run's chunk rows keep the numbers they had in the previous snapshot: a carried run
//! is a copy of it, and any other run copies its chunk and blob rows before its first
//! lookup (`seed`). An unchanged file's chunk list is then reused as it is.

use rusqlite::{OptionalExtension, params};

use super::{BlobDone, Index, now_ns};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::{ENTRY_LEN, Placement};

/// How far a run's chunk rows are ready for lookups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Ready {
    /// Nothing yet: the run holds only what it wrote itself.
    #[default]
    No,
    /// The run holds the previous snapshot's chunk and blob rows.
    Seeded,
    /// ... and `ids.known` maps every chunk row's id to it.
    Known,
}

impl Index {
    /// Attaches a fresh `<index>-ids` as `ids` (outside a transaction). It is scratch:
    /// no journal, no syncs; a crash leaves a file the next run replaces.
    pub(super) fn attach_ids(&self) -> Result<()> {
        super::remove_if_there(&self.ids_path)?;
        super::private_file(&self.ids_path)?;
        let ids = self.ids_path.to_string_lossy().into_owned();
        self.conn
            .execute("ATTACH DATABASE ?1 AS ids", [ids])
            .and_then(|_| {
                self.conn.execute_batch(
                    "PRAGMA ids.journal_mode = OFF; PRAGMA ids.synchronous = OFF;
                     CREATE TABLE ids.known (hash BLOB PRIMARY KEY, chunk INTEGER NOT NULL)
                         WITHOUT ROWID;
                     CREATE TABLE ids.salvage (hash BLOB PRIMARY KEY, blob TEXT NOT NULL,
                         offset INTEGER NOT NULL, clen INTEGER NOT NULL, ulen INTEGER NOT NULL)
                         WITHOUT ROWID;",
                )
            })
            .map_err(self.e())?;
        self.ready.set(Ready::No);
        Ok(())
    }

    /// Detaches and deletes `ids` (outside a transaction).
    pub(super) fn drop_ids(&self) -> Result<()> {
        self.conn
            .execute_batch("DETACH DATABASE ids")
            .map_err(self.e())?;
        super::remove_if_there(&self.ids_path)
    }

    /// A run that did not start as a copy of the previous snapshot takes over its chunk
    /// and blob rows, numbers included, so reused chunk lists stay valid.
    fn seed(&self) -> Result<()> {
        if self.ready.get() >= Ready::Seeded {
            return Ok(());
        }
        if self.dedup_prev {
            self.conn
                .execute_batch(
                    "INSERT INTO run.blobs SELECT * FROM prev.blobs;
                     INSERT INTO run.chunks SELECT * FROM prev.chunks;",
                )
                .map_err(self.e())?;
        }
        self.ready.set(Ready::Seeded);
        Ok(())
    }

    /// Fills `ids.known` from the run's chunk rows, sorted once (cheaper than inserting
    /// in row order, which is random in id order).
    fn know(&self) -> Result<()> {
        if self.ready.get() == Ready::Known {
            return Ok(());
        }
        self.seed()?;
        let last: i64 = self
            .conn
            .execute_batch(
                "INSERT OR IGNORE INTO ids.known SELECT hash, id FROM run.chunks ORDER BY hash",
            )
            .and_then(|()| {
                self.conn
                    .query_row("SELECT coalesce(max(id), 0) FROM run.chunks", [], |r| {
                        r.get(0)
                    })
            })
            .map_err(self.e())?;
        self.next_row.set(last.saturating_add(1));
        if self.dedup_salvage {
            self.list_salvage()?;
        }
        self.ready.set(Ready::Known);
        Ok(())
    }

    /// Fills `ids.salvage` with the chunks of young blobs of interrupted runs.
    fn list_salvage(&self) -> Result<()> {
        let mut blobs = self
            .conn
            .prepare("SELECT blob_id, entries FROM main.partial_entries")
            .map_err(self.e())?;
        let mut rows = blobs.query([]).map_err(self.e())?;
        let mut add = self
            .conn
            .prepare(
                "INSERT OR IGNORE INTO ids.salvage (hash, blob, offset, clen, ulen)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(self.e())?;
        while let Some(r) = rows.next().map_err(self.e())? {
            let blob: String = r.get(0).map_err(self.e())?;
            let entries: Vec<u8> = r.get(1).map_err(self.e())?;
            let mut entries: Vec<Placement> = entries
                .chunks_exact(ENTRY_LEN)
                .filter_map(Placement::decode)
                .collect();
            // In id order, each page of the table is written once per part.
            entries.sort_unstable_by_key(|p| p.chunk.0);
            for p in entries {
                add.execute(params![
                    &p.chunk.0[..],
                    blob,
                    p.offset as i64,
                    p.clen,
                    p.ulen
                ])
                .map_err(self.e())?;
            }
        }
        Ok(())
    }

    /// The row of a chunk this run may use: one the previous snapshot or this run has
    /// (stored, or queued by [`Self::new_chunk`]), or one in a young blob of an
    /// interrupted run (its row is added).
    pub fn chunk_ref(&self, id: &ChunkId) -> Result<Option<i64>> {
        self.know()?;
        let found: Option<i64> = self
            .conn
            .prepare_cached("SELECT chunk FROM ids.known WHERE hash = ?1")
            .and_then(|mut s| s.query_row([&id.0[..]], |r| r.get(0)).optional())
            .map_err(self.e())?;
        if found.is_some() || !self.dedup_salvage {
            return Ok(found);
        }
        self.salvage(id)
    }

    /// Adds the row of a chunk stored by an interrupted run, and its blob's row.
    fn salvage(&self, id: &ChunkId) -> Result<Option<i64>> {
        let blob: Option<String> = self
            .conn
            .prepare_cached("SELECT blob FROM ids.salvage WHERE hash = ?1")
            .and_then(|mut s| s.query_row([&id.0[..]], |r| r.get(0)).optional())
            .map_err(self.e())?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO run.blobs (name, size, plain_size, payload_start, hash)
                 SELECT id, size, plain_size, payload_start, hash FROM main.partial_blobs
                 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute([&blob]))
            .map_err(self.e())?;
        let row = self.take_row();
        let placed = self
            .conn
            .prepare_cached(
                "INSERT INTO run.chunks (id, hash, blob, offset, clen, ulen)
                 SELECT ?2, s.hash, b.id, s.offset, s.clen, s.ulen
                 FROM ids.salvage s JOIN run.blobs b ON b.name = s.blob
                 WHERE s.hash = ?1",
            )
            .and_then(|mut s| s.execute(params![&id.0[..], row]))
            .map_err(self.e())?;
        if placed == 0 {
            // Its blob has no row (an older agent dropped it): stored again instead.
            return Ok(None);
        }
        self.learn(id, row)?;
        Ok(Some(row))
    }

    /// A number no chunk row of the run has.
    fn take_row(&self) -> i64 {
        let row = self.next_row.get();
        self.next_row.set(row.saturating_add(1));
        row
    }

    fn learn(&self, id: &ChunkId, row: i64) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO ids.known (hash, chunk) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![&id.0[..], row]))
            .map(|_| ())
            .map_err(self.e())
    }

    /// Numbers a chunk about to be uploaded. Its row is written once, by
    /// [`Self::record_blob`], when where it lies is known: a row written twice would
    /// leave stale bytes in its page (`finish_run` refuses a run with a number that
    /// names no row).
    pub fn new_chunk(&self, id: &ChunkId) -> Result<i64> {
        self.know()?;
        let row = self.take_row();
        self.learn(id, row)?;
        Ok(row)
    }

    /// Records a blob that finished uploading and places its chunks: `rows[i]` is the
    /// row [`Self::new_chunk`] gave `b.entries[i]`.
    pub fn record_blob(&self, b: &BlobDone, rows: &[i64]) -> Result<()> {
        if rows.len() != b.entries.len() {
            return Err(Error::Pipeline(format!(
                "blob {} holds {} chunks, {} were numbered",
                b.id.to_hex(),
                b.entries.len(),
                rows.len()
            )));
        }
        let id = b.id.to_hex();
        let (size, plain, start) = (
            b.uploaded.size as i64,
            b.plain_size as i64,
            b.payload_start as i64,
        );
        let hash = &b.uploaded.hash[..];
        self.conn
            .prepare_cached(
                "INSERT INTO run.blobs (name, size, plain_size, payload_start, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![id, size, plain, start, hash]))
            .map_err(self.e())?;
        let blob = self.conn.last_insert_rowid();
        let mut place = self
            .conn
            .prepare_cached(
                "INSERT INTO run.chunks (id, hash, blob, offset, clen, ulen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(self.e())?;
        for (p, row) in b.entries.iter().zip(rows) {
            place
                .execute(params![
                    row,
                    &p.chunk.0[..],
                    blob,
                    p.offset as i64,
                    p.clen,
                    p.ulen
                ])
                .map_err(self.e())?;
        }
        self.remember_partial(b, &id)?;
        self.checkpoint()
    }

    /// Also remembered outside the run database, so that a run killed after this point
    /// does not upload the blob again.
    fn remember_partial(&self, b: &BlobDone, id: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO main.partial_blobs VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    b.uploaded.size as i64,
                    b.plain_size as i64,
                    b.payload_start as i64,
                    &b.uploaded.hash[..],
                    now_ns()
                ])
            })
            .and_then(|_| put_entries(&self.conn, id, &b.entries))
            .map_err(self.e())
    }

    /// Drops the rows of chunks nothing references any more (of a carried run, only
    /// those whose references it removed: `temp.dropped`), then of blobs left empty,
    /// and checks that every chunk lies in a blob the run knows.
    pub(super) fn settle_chunks(&self) -> Result<()> {
        self.seed()?;
        let among = if self.carried {
            "id IN temp.dropped AND"
        } else {
            ""
        };
        let dropped = self
            .conn
            .execute(
                &format!(
                    "DELETE FROM run.chunks WHERE {among}
                         id NOT IN (SELECT chunk FROM run.file_chunks)
                         AND id NOT IN (SELECT chunk FROM run.xattrs WHERE chunk IS NOT NULL)"
                ),
                [],
            )
            .map_err(self.e())?;
        if dropped > 0 || !self.carried {
            self.conn
                .execute(
                    "DELETE FROM run.blobs WHERE id NOT IN (SELECT blob FROM run.chunks)",
                    [],
                )
                .map_err(self.e())?;
        }
        let (unplaced, unstored): (i64, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT count(*) FROM run.chunks
                         WHERE blob NOT IN (SELECT id FROM run.blobs)),
                        (SELECT count(*) FROM run.file_chunks
                         WHERE chunk NOT IN (SELECT id FROM run.chunks))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.e())?;
        if unplaced > 0 || unstored > 0 {
            return Err(Error::Pipeline(format!(
                "{unplaced} chunks lie in no blob the index knows, {unstored} in no blob at all"
            )));
        }
        Ok(())
    }
}

/// Entries of `partial_entries` per row: 96 KiB, so a blob of 65,536 tiny chunks is
/// never one 3 MiB value copied three times on its way into SQLite.
const ENTRIES_PER_PART: usize = 2048;

/// Records the chunks of partial blob `blob`.
pub(super) fn put_entries(
    conn: &rusqlite::Connection,
    blob: &str,
    entries: &[Placement],
) -> rusqlite::Result<()> {
    let mut s = conn.prepare_cached(
        "INSERT OR IGNORE INTO main.partial_entries (blob_id, part, entries) VALUES (?1, ?2, ?3)",
    )?;
    let mut buf = Vec::with_capacity(ENTRIES_PER_PART * ENTRY_LEN);
    for (part, group) in (0i64..).zip(entries.chunks(ENTRIES_PER_PART)) {
        buf.clear();
        group.iter().for_each(|p| p.encode(&mut buf));
        s.execute(params![blob, part, buf])?;
    }
    Ok(())
}
