//! Restoring file content blob by blob: each blob is read with ranged requests covering
//! only the spans that hold wanted chunks; every chunk is decompressed to its recorded
//! length and hash-checked before it is written. Files are opened through the restore
//! `Target`, never by path.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::target::Target;
use crate::chunk::{ChunkHasher, ChunkId};
use crate::crypt::{Identities, KeyError, RemoteReader, cipher_end};
use crate::error::{Error, Result};
use crate::pack::{BlobId, FrameOpener};
use crate::pieces::{Checked, Located};
use crate::progress::Progress;
use crate::store::Repo;

/// The largest zstd frame a chunk can compress to (zstd's bound for the largest chunk).
const MAX_FRAME: u64 =
    (fastcdc::v2020::MAXIMUM_MAX + (fastcdc::v2020::MAXIMUM_MAX >> 7) + 4096) as u64;
/// Reads at most this many plaintext bytes of a blob in one request.
const MAX_SPAN: u64 = 4 << 20;
/// Gaps between wanted chunks smaller than this are downloaded rather than skipped.
const MERGE_GAP: u64 = 256 << 10;

/// A wanted chunk, its location checked to lie inside the blob.
pub(super) struct Want {
    /// Its row in `chunks` (a metadata piece: its place in the list).
    pub row: i64,
    pub id: ChunkId,
    pub offset: u64,
    pub clen: u64,
    pub ulen: u32,
}

/// Damaged files found while restoring one blob: (destination, reason).
pub(super) type Damaged = Vec<(PathBuf, String)>;

pub(super) struct BlobWorker<'a> {
    repo: &'a Repo,
    conn: Connection,
    frames: FrameOpener,
    ids: &'a Identities,
    progress: &'a Progress,
    target: Target,
    xattrs: &'a XattrValues,
    /// The last file written, kept open: consecutive chunks often land in one file.
    open: Option<(Vec<u8>, std::fs::File)>,
    /// Attributes of whole files that could not be applied.
    warnings: Vec<String>,
}

/// A selected file that wants a chunk, and where in it.
struct Dest {
    offset: u64,
    path: Vec<u8>,
    /// Set for a whole file: it is created and finished where its only chunk is written.
    whole: Option<WholeFile>,
}

struct WholeFile {
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
}

/// Columns of `vaultik_sel` (as `sel`) and `file_chunks` (as `f`) that make a `Dest`.
const DEST_COLUMNS: &str =
    "f.offset, sel.dest, sel.whole, sel.size, sel.mode, sel.uid, sel.gid, sel.mtime_ns";

fn dest(r: &rusqlite::Row<'_>) -> rusqlite::Result<Dest> {
    let whole = if r.get::<_, bool>(2)? {
        Some(WholeFile {
            size: u64::try_from(super::int(r, 3)?).unwrap_or(0),
            mode: r.get(4)?,
            uid: r.get(5)?,
            gid: r.get(6)?,
            mtime_ns: r.get(7)?,
        })
    } else {
        None
    };
    Ok(Dest {
        // Offsets of selected files were checked to tile each file exactly.
        offset: u64::try_from(super::int(r, 0)?).unwrap_or(u64::MAX),
        path: r.get(1)?,
        whole,
    })
}

/// Creates whole file `d`, writes `data` into it (`None`: it stays a hole of its size)
/// and applies its attributes, all through one open; warnings go to `warnings`.
fn write_whole(
    target: &mut Target,
    warnings: &mut Vec<String>,
    d: &Dest,
    w: &WholeFile,
    data: Option<&[u8]>,
) -> Result<()> {
    let f = target.create(&d.path)?;
    match data {
        Some(data) => f
            .write_all_at(data, 0)
            .map_err(|e| Error::io("writing", target.display(&d.path), e))?,
        None => target.set_len(&f, &d.path, w.size)?,
    }
    let attrs = super::target::Attrs {
        symlink: false,
        mode: w.mode,
        uid: w.uid,
        gid: w.gid,
        mtime_ns: w.mtime_ns,
        xattrs: &[],
    };
    warnings.extend(target.apply_open(&f, &d.path, &attrs));
    Ok(())
}

impl<'a> BlobWorker<'a> {
    pub fn new(
        repo: &'a Repo,
        db: &Path,
        hasher: &ChunkHasher,
        ids: &'a Identities,
        progress: &'a Progress,
        target: Target,
        xattrs: &'a XattrValues,
    ) -> Result<Self> {
        // Nothing writes the database while workers run, so they can skip file locking.
        let uri = format!("file:{}?immutable=1", db.display());
        let conn = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )?;
        super::catalog::harden(&conn)?;
        Ok(BlobWorker {
            repo,
            conn,
            frames: FrameOpener::new(hasher.clone())?,
            ids,
            progress,
            target,
            xattrs,
            open: None,
            warnings: Vec::new(),
        })
    }

    pub fn into_warnings(self) -> Vec<String> {
        self.warnings
    }

    /// The blob of row `blob`: its name as written, and its id, encrypted size and
    /// payload start if the row is sane.
    fn record(&self, blob: i64) -> Result<(String, Option<(BlobId, Geometry)>)> {
        let row: Option<(Option<Vec<u8>>, i64, i64)> = self
            .conn
            .query_row(
                "SELECT CAST(name AS BLOB), size, payload_start FROM blobs WHERE id = ?1",
                [blob],
                |r| Ok((r.get(0)?, super::int(r, 1)?, super::int(r, 2)?)),
            )
            .optional()?;
        let Some((Some(name), size, start)) = row else {
            return Ok((format!("#{blob}"), None));
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let sane = (|| {
            let g = Geometry {
                size: u64::try_from(size).ok()?,
                payload_start: u64::try_from(start).ok()?,
            };
            (g.payload_start <= g.size).then_some((BlobId::parse(&name)?, g))
        })();
        Ok((name, sane))
    }

    /// Wanted chunks of the blob, split into those that lie inside it and the rest.
    fn wants(&self, blob: i64, plain_max: u64) -> Result<(Vec<Want>, Vec<i64>)> {
        let mut q = self.conn.prepare_cached(
            "SELECT c.id, c.hash, c.offset, c.clen, c.ulen FROM chunks c WHERE c.blob = ?1 AND (EXISTS
               (SELECT 1 FROM file_chunks f JOIN vaultik_sel sel ON sel.data_node = f.node_id
                WHERE f.chunk = c.id AND sel.kind = 'file')
             OR EXISTS (SELECT 1 FROM xattrs x JOIN vaultik_sel sel ON sel.node_id = x.node_id
                WHERE x.chunk = c.id AND sel.kind IN ('file', 'damaged', 'dir')))
             ORDER BY c.offset",
        )?;
        let rows = q.query_map([blob], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                super::bytes(r, 1)?,
                super::int(r, 2)?,
                super::int(r, 3)?,
                super::int(r, 4)?,
            ))
        })?;
        let (mut inside, mut outside) = (Vec::new(), Vec::new());
        for row in rows {
            let (row, id, offset, clen, ulen) = row?;
            // Ids were checked before the data pass; a bad one cannot be wanted.
            let Some(id) = ChunkId::from_slice(&id) else {
                continue;
            };
            let want = (|| {
                let w = Want {
                    row,
                    id,
                    offset: u64::try_from(offset).ok()?,
                    clen: u64::try_from(clen).ok().filter(|c| *c <= MAX_FRAME)?,
                    ulen: u32::try_from(ulen).ok()?,
                };
                (w.offset.checked_add(w.clen)? <= plain_max).then_some(w)
            })();
            match want {
                Some(w) => inside.push(w),
                None => outside.push(row),
            }
        }
        // The hostile database may carry its own index that lies about order.
        inside.sort_by_key(|w| w.offset);
        Ok((inside, outside))
    }

    /// Restores every wanted chunk of one blob; returns the files it could not complete.
    pub fn restore_blob(&mut self, row: i64) -> Result<Damaged> {
        let mut bad = Vec::new();
        let (blob, sane) = self.record(row)?;
        let Some((blob_id, geom)) = sane else {
            let (inside, outside) = self.wants(row, u64::MAX)?;
            for chunk in inside.iter().map(|w| w.row).chain(outside) {
                let why = format!("blob {blob:?} has no valid record");
                self.mark_damaged(chunk, &why, &mut bad)?;
            }
            return Ok(bad);
        };
        let (wants, outside) = self.wants(row, geom.size)?;
        for chunk in outside {
            let why = format!("blob {blob}: chunk entry lies outside the blob");
            self.mark_damaged(chunk, &why, &mut bad)?;
        }
        let key = self.repo.blob_key(&blob_id);
        let what = format!("blob {blob}");
        let mut reader = match self.open_blob(&key, geom, &what) {
            Ok(r) => r,
            Err(Error::Key(e @ KeyError::WrongKey { .. })) => return Err(e.into()),
            Err(e) => {
                for w in &wants {
                    self.mark_damaged(w.row, &e.to_string(), &mut bad)?;
                }
                return Ok(bad);
            }
        };
        for span in spans(&wants) {
            let (start, mut buf) = span_buffer(&wants[span.clone()]);
            if reader.read_at(start, &mut buf).is_ok() {
                for w in &wants[span] {
                    let at = (w.offset - start) as usize;
                    self.place(w, &buf[at..at + w.clen as usize], &mut bad)?;
                }
                continue;
            }
            // Part of the span is damaged. age refuses to read on after an authentication
            // failure, so retry chunk by chunk, each with a fresh decryptor.
            for w in &wants[span] {
                let mut one = vec![0u8; w.clen as usize];
                let got = self.open_blob(&key, geom, &what).and_then(|mut r| {
                    r.read_at(w.offset, &mut one)
                        .map_err(|e| Error::io("reading", &what, e))
                });
                match got {
                    Ok(()) => self.place(w, &one, &mut bad)?,
                    Err(e) => self.mark_damaged(w.row, &e.to_string(), &mut bad)?,
                }
            }
            reader = match self.open_blob(&key, geom, &what) {
                Ok(r) => r,
                Err(_) => break,
            };
        }
        Ok(bad)
    }

    fn open_blob(
        &self,
        key: &object_store::path::Path,
        g: Geometry,
        what: &str,
    ) -> Result<BlobReader> {
        BlobReader::open(self.repo, self.ids, key, g, what)
    }

    fn place(&mut self, w: &Want, frame: &[u8], bad: &mut Damaged) -> Result<()> {
        let data = match self.frames.open(frame, w.ulen, w.id) {
            Ok(d) => d,
            Err(e) => return self.mark_damaged(w.row, &e.to_string(), bad),
        };
        self.keep_xattrs(w.row, &data)?;
        let zero = data.iter().all(|b| *b == 0);
        // Streamed: a chunk may appear in many places of many files.
        let mut q = self.conn.prepare_cached(&format!(
            "SELECT {DEST_COLUMNS} FROM file_chunks f JOIN vaultik_sel sel ON sel.data_node = f.node_id
             WHERE f.chunk = ?1 AND sel.kind = 'file' ORDER BY sel.node_id"
        ))?;
        let mut rows = q.query([w.row])?;
        while let Some(r) = rows.next()? {
            let d = dest(r)?;
            self.progress.add_bytes(data.len() as u64);
            if let Some(whole) = &d.whole {
                let data = (!zero).then_some(&data[..]);
                write_whole(&mut self.target, &mut self.warnings, &d, whole, data)?;
            } else if !zero {
                // A zero chunk of a file created sparse stays a hole.
                let f = open_file(&mut self.target, &mut self.open, &d.path)?;
                if let Err(e) = f.write_all_at(&data, d.offset) {
                    return Err(Error::io("writing", self.target.display(&d.path), e));
                }
            }
        }
        Ok(())
    }

    /// Keeps the values of extended attributes stored as this chunk, for the metadata
    /// pass (they must be set after the data: writing a file drops capabilities).
    fn keep_xattrs(&self, chunk: i64, value: &[u8]) -> Result<()> {
        let mut q = self.conn.prepare_cached(
            "SELECT x.node_id, x.name FROM xattrs x JOIN vaultik_sel sel ON sel.node_id = x.node_id
             WHERE x.chunk = ?1 AND sel.kind IN ('file', 'damaged', 'dir')",
        )?;
        let names: Vec<(i64, Vec<u8>)> = q
            .query_map([chunk], |r| Ok((r.get(0)?, super::bytes(r, 1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (node, name) in names {
            self.xattrs.put(node, &name, value)?;
        }
        Ok(())
    }

    /// Reports the files and attributes that wanted the chunk of row `chunk` as
    /// damaged. A whole file is still created, as a hole of its size, and given its
    /// attributes.
    fn mark_damaged(&mut self, chunk: i64, why: &str, bad: &mut Damaged) -> Result<()> {
        let mut q = self.conn.prepare_cached(&format!(
            "SELECT {DEST_COLUMNS} FROM file_chunks f JOIN vaultik_sel sel ON sel.data_node = f.node_id
             WHERE f.chunk = ?1 AND sel.kind = 'file' GROUP BY sel.node_id"
        ))?;
        let mut rows = q.query([chunk])?;
        while let Some(r) = rows.next()? {
            let d = dest(r)?;
            bad.push((self.target.display(&d.path), why.to_string()));
            if let Some(whole) = &d.whole {
                write_whole(&mut self.target, &mut self.warnings, &d, whole, None)?;
            }
        }
        drop(rows);
        let mut q = self.conn.prepare_cached(
            "SELECT sel.dest, x.name FROM xattrs x JOIN vaultik_sel sel ON sel.node_id = x.node_id
             WHERE x.chunk = ?1 AND sel.kind IN ('file', 'damaged', 'dir')",
        )?;
        let names: Vec<(Vec<u8>, Vec<u8>)> = q
            .query_map([chunk], |r| Ok((super::bytes(r, 0)?, super::bytes(r, 1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (d, name) in names {
            let why = format!(
                "extended attribute {}: {why}",
                String::from_utf8_lossy(&name)
            );
            bad.push((self.target.display(&d), why));
        }
        Ok(())
    }
}

/// Extended attribute values read from blobs, kept in a private temporary database
/// until the metadata pass applies them.
pub(super) struct XattrValues {
    conn: std::sync::Mutex<Connection>,
    file: tempfile::NamedTempFile,
}

impl XattrValues {
    pub fn new() -> Result<Self> {
        let file = tempfile::Builder::new()
            .prefix("vaultik-xattrs-")
            .tempfile()
            .map_err(|e| Error::io("creating", std::env::temp_dir(), e))?;
        let conn = Connection::open(file.path())?;
        conn.execute_batch(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
             CREATE TABLE xattr_values (node_id INTEGER NOT NULL, name BLOB NOT NULL,
                 value BLOB NOT NULL, PRIMARY KEY (node_id, name)) WITHOUT ROWID;",
        )?;
        Ok(XattrValues {
            conn: std::sync::Mutex::new(conn),
            file,
        })
    }

    fn put(&self, node: i64, name: &[u8], value: &[u8]) -> Result<()> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error::Pipeline("a restore worker panicked".into()))?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO xattr_values (node_id, name, value) VALUES (?1, ?2, ?3)",
        )?
        .execute(rusqlite::params![node, name, value])?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// The file `dest` below `target`, reusing `open` when it is already that file.
fn open_file<'f>(
    target: &mut Target,
    open: &'f mut Option<(Vec<u8>, std::fs::File)>,
    dest: &[u8],
) -> Result<&'f std::fs::File> {
    if open.as_ref().is_none_or(|(p, _)| p != dest) {
        let f = target.open_file(dest).map_err(Error::from)?;
        *open = Some((dest.to_vec(), f));
    }
    match open {
        Some((_, f)) => Ok(f),
        None => Err(Error::Pipeline("no open file".into())),
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    size: u64,
    payload_start: u64,
}

/// A decrypting reader over one remote blob that fetches exactly the ciphertext needed.
struct BlobReader {
    plain: age::stream::StreamReader<RemoteReader>,
    hint: Arc<AtomicU64>,
    g: Geometry,
}

impl BlobReader {
    fn open(
        repo: &Repo,
        ids: &Identities,
        key: &object_store::path::Path,
        g: Geometry,
        what: &str,
    ) -> Result<Self> {
        let (remote, hint) = RemoteReader::new(repo.clone(), key.clone(), g.size);
        hint.store(g.payload_start, Ordering::Relaxed);
        let plain = ids.decrypt(remote, what)?;
        Ok(BlobReader { plain, hint, g })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = cipher_end(self.g.payload_start, offset + buf.len() as u64, self.g.size);
        self.hint.store(end, Ordering::Relaxed);
        self.plain.seek(SeekFrom::Start(offset))?;
        self.plain.read_exact(buf)
    }
}

/// Reads the pieces of a metadata database (manifest format 3) into `out`, each
/// decompressed to its listed length and hash-checked; any piece that fails fails all.
/// Delta pieces are read after their bases, depth by depth: bases go to the space
/// after the database, which is cut off at the end.
pub(super) fn fetch_pieces(
    repo: &Repo,
    ids: &Identities,
    list: &Checked,
    out: &std::fs::File,
    what: &str,
) -> Result<()> {
    let hasher = ChunkHasher::new(list.chunk_key);
    let mut frames = FrameOpener::new(hasher.clone())?;
    let deepest = list.all().map(|p| p.depth).max().unwrap_or(0);
    for depth in 0..=deepest {
        let mut by_blob: Vec<Vec<&Located>> = vec![Vec::new(); list.blob_ids.len()];
        for p in list.all().filter(|p| p.depth == depth) {
            by_blob[p.blob].push(p);
        }
        for (n, pieces) in by_blob.into_iter().enumerate() {
            if pieces.is_empty() {
                continue;
            }
            let blob = list.blob_ids[n].to_hex();
            let damaged = |why: String| Error::Damaged(format!("{what}: blob {blob}: {why}"));
            read_pieces_of(repo, ids, list, n, pieces, what, |p, frame| {
                let data = match p.base {
                    None => frames.open(frame, p.ulen, p.id),
                    Some(b) => {
                        let base = &list.bases[b];
                        let mut bytes = vec![0u8; base.ulen as usize];
                        out.read_exact_at(&mut bytes, base.at)
                            .map_err(|e| Error::io("reading", what, e))?;
                        crate::delta::open(frame, &bytes, base.id, p.ulen, p.id, &hasher)
                    }
                };
                let data = data.map_err(|e| damaged(e.to_string()))?;
                out.write_all_at(&data, p.at)
                    .map_err(|e| Error::io("writing", what, e))
            })?;
        }
    }
    out.set_len(list.list.size)
        .map_err(|e| Error::io("writing", what, e))
}

/// Reads the frames of `pieces` (all in blob `n` of the list), a span at a time, and
/// hands each to `put`.
fn read_pieces_of(
    repo: &Repo,
    ids: &Identities,
    list: &Checked,
    n: usize,
    mut pieces: Vec<&Located>,
    what: &str,
    mut put: impl FnMut(&Located, &[u8]) -> Result<()>,
) -> Result<()> {
    pieces.sort_by_key(|p| p.offset);
    let b = &list.list.blobs[n];
    let g = Geometry {
        size: b.size,
        payload_start: b.payload_start,
    };
    let blob = list.blob_ids[n].to_hex();
    let wants: Vec<Want> = pieces
        .iter()
        .zip(0..)
        .map(|(p, row)| Want {
            row,
            id: p.id,
            offset: p.offset,
            clen: u64::from(p.clen),
            ulen: p.ulen,
        })
        .collect();
    let key = repo.blob_key(&list.blob_ids[n]);
    let damaged = |why: String| Error::Damaged(format!("{what}: blob {blob}: {why}"));
    let mut reader =
        BlobReader::open(repo, ids, &key, g, what).map_err(|e| damaged(e.to_string()))?;
    for span in spans(&wants) {
        let (start, mut buf) = span_buffer(&wants[span.clone()]);
        reader
            .read_at(start, &mut buf)
            .map_err(|e| damaged(e.to_string()))?;
        for (w, p) in wants[span.clone()].iter().zip(&pieces[span]) {
            let at = (w.offset - start) as usize;
            put(p, &buf[at..at + w.clen as usize])?;
        }
    }
    Ok(())
}

/// Where a span of wanted chunks (sorted by offset, checked to lie inside their blob)
/// starts, and a buffer as long as it.
fn span_buffer(span: &[Want]) -> (u64, Vec<u8>) {
    let start = span.first().map_or(0, |w| w.offset);
    let end = span
        .iter()
        .map(|w| w.offset + w.clen)
        .max()
        .unwrap_or(start);
    (start, vec![0u8; (end - start) as usize])
}

/// Groups wanted chunks (sorted by offset) into ranges read with one request each.
pub(super) fn spans(wants: &[Want]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=wants.len() {
        let split = i == wants.len() || {
            let prev = &wants[i - 1];
            let prev_end = prev.offset + prev.clen;
            let gap = wants[i].offset.saturating_sub(prev_end);
            let span_len = (wants[i].offset + wants[i].clen).saturating_sub(wants[start].offset);
            gap > MERGE_GAP || span_len > MAX_SPAN
        };
        if split {
            out.push(start..i);
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_close_chunks_and_split_far_ones() {
        let w = |offset, clen| Want {
            row: 0,
            id: ChunkId([0; 32]),
            offset,
            clen,
            ulen: 0,
        };
        let wants = vec![
            w(8, 100),
            w(108, 100),
            w(10_000_000, 50),
            w(10_000_050, 20_000_000),
        ];
        assert_eq!(spans(&wants), vec![0..2, 2..3, 3..4]);
        assert!(spans(&[]).is_empty());
    }
}
