//! Restore, fetch and snapshot listing: everything that needs the private key.
//!
//! Restore validates every path before touching the target, creates the tree, then
//! downloads the needed blobs in parallel. Each blob is read with ranged requests that
//! cover only the spans holding wanted chunks; every chunk is hash-checked, all-zero
//! chunks are left as holes, and data is written in place. A damaged chunk fails only the
//! files that contain it; they are named in the report.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::chunk::{ChunkHasher, ChunkId};
use crate::crypt::{Identities, KeyError, RemoteReader, cipher_end};
use crate::error::{Error, Result};
use crate::pack::{BlobId, open_frame};
use crate::progress::Progress;
use crate::snapshot::{METADATA_FORMAT, Manifest, NodeKind, SnapshotId, meta_value};
use crate::store::{Repo, StoreError};

/// The largest zstd frame a chunk can compress to (zstd's bound for the largest chunk).
const MAX_FRAME: u32 =
    (fastcdc::v2020::MAXIMUM_MAX + (fastcdc::v2020::MAXIMUM_MAX >> 7) + 4096) as u32;
/// Reads at most this many plaintext bytes of a blob in one request.
const MAX_SPAN: u64 = 4 << 20;
/// Gaps between wanted chunks smaller than this are downloaded rather than skipped.
const MERGE_GAP: u64 = 256 << 10;

/// Lists all snapshots (decrypting their manifests), oldest first.
pub fn list_snapshots(repo: &Repo, ids: &Identities) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for obj in repo.list(&repo.index_dir())? {
        let Some(name) = obj.key.rsplit('/').next() else {
            continue;
        };
        let Some(id) = name.strip_suffix(".snapshot").and_then(SnapshotId::parse) else {
            continue;
        };
        out.push(read_manifest(repo, ids, &id)?);
    }
    out.sort_by(|a, b| (a.time_unix_ns, &a.id).cmp(&(b.time_unix_ns, &b.id)));
    Ok(out)
}

pub fn read_manifest(repo: &Repo, ids: &Identities, id: &SnapshotId) -> Result<Manifest> {
    let what = format!("snapshot {id}");
    let sealed = repo.get(&repo.manifest_key(id)).map_err(|e| match e {
        StoreError::NotFound { .. } => Error::SnapshotNotFound(id.to_string()),
        e => e.into(),
    })?;
    let mut json = Vec::new();
    ids.decrypt(&sealed[..], &what)?
        .read_to_end(&mut json)
        .map_err(|e| KeyError::Decrypt {
            what: what.clone(),
            message: e.to_string(),
        })?;
    let m: Manifest = serde_json::from_slice(&json).map_err(|e| KeyError::Decrypt {
        what: what.clone(),
        message: format!("manifest is not valid: {e}"),
    })?;
    if m.format > crate::snapshot::MANIFEST_FORMAT {
        return Err(Error::Pipeline(format!(
            "{what} has manifest format {}; this vaultik reads up to {}: upgrade vaultik",
            m.format,
            crate::snapshot::MANIFEST_FORMAT
        )));
    }
    Ok(m)
}

/// Finds a snapshot by full id, unique prefix, or `latest`.
pub fn resolve(repo: &Repo, ids: &Identities, arg: &str) -> Result<Manifest> {
    if let Some(id) = SnapshotId::parse(arg) {
        return read_manifest(repo, ids, &id);
    }
    let all = list_snapshots(repo, ids)?;
    if arg == "latest" {
        return all
            .into_iter()
            .last()
            .ok_or_else(|| Error::SnapshotNotFound(arg.into()));
    }
    let mut hits: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(arg)).collect();
    match hits.len() {
        0 => Err(Error::SnapshotNotFound(arg.into())),
        1 => Ok(hits.remove(0)),
        n => Err(Error::SnapshotAmbiguous(arg.into(), n)),
    }
}

/// A snapshot's metadata database, decrypted into a private temporary file.
pub struct Metadata {
    pub manifest: Manifest,
    file: tempfile::NamedTempFile,
    pub conn: Connection,
    pub hasher: ChunkHasher,
}

impl Metadata {
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

pub fn open_metadata(repo: &Repo, ids: &Identities, manifest: Manifest) -> Result<Metadata> {
    let id = SnapshotId::parse(&manifest.id)
        .ok_or_else(|| Error::SnapshotNotFound(manifest.id.clone()))?;
    let what = format!("metadata of snapshot {id}");
    let sealed = repo.get(&repo.metadata_key(&id))?;
    if sealed.len() as u64 != manifest.metadata_size
        || hex::encode(blake3::hash(&sealed).as_bytes()) != manifest.metadata_hash
    {
        return Err(Error::Pipeline(format!(
            "{what} is damaged: its size or hash does not match the manifest"
        )));
    }
    let mut file = tempfile::Builder::new()
        .prefix("vaultik-metadata-")
        .tempfile()
        .map_err(|e| Error::io("creating", std::env::temp_dir(), e))?;
    let plain = ids.decrypt(&sealed[..], &what)?;
    let mut z =
        zstd::stream::Decoder::new(plain).map_err(|e| Error::io("decompressing", &what, e))?;
    std::io::copy(&mut z, file.as_file_mut()).map_err(|e| Error::io("decompressing", &what, e))?;
    let conn = Connection::open(file.path())?;
    // A private, disposable copy: durability would only cost fsyncs.
    conn.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    let format: u32 = meta_value(&conn, "format")?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Pipeline(format!("{what}: no format version")))?;
    if format > METADATA_FORMAT {
        return Err(Error::Pipeline(format!(
            "{what} has format {format}; this vaultik reads up to {METADATA_FORMAT}: upgrade vaultik"
        )));
    }
    let key = meta_value(&conn, "chunk_key")?
        .and_then(|k| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(k, &mut b).ok().map(|_| b)
        })
        .ok_or_else(|| Error::Pipeline(format!("{what}: no chunk key")))?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS fc_chunk ON file_chunks (chunk_id);
         CREATE INDEX IF NOT EXISTS chunks_blob ON chunks (blob_id, offset);",
    )?;
    Ok(Metadata {
        manifest,
        file,
        conn,
        hasher: ChunkHasher::new(key),
    })
}

/// Checks a stored path and turns it into a relative path. Refuses absolute paths, empty,
/// `.` and `..` components, and NUL bytes: metadata is untrusted input.
pub fn safe_relative(path: &[u8]) -> Result<PathBuf> {
    let hostile = || Error::HostilePath(String::from_utf8_lossy(path).into_owned());
    if path.is_empty() || path.starts_with(b"/") || path.contains(&0) {
        return Err(hostile());
    }
    for comp in path.split(|b| *b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(hostile());
        }
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(path)))
}

/// Which part of a snapshot to restore, and where.
pub struct Selection {
    /// Stored path of the subtree to restore; empty for everything.
    pub under: Vec<u8>,
    /// Prefix removed from stored paths before they are joined to `dest`.
    pub strip: Vec<u8>,
    pub dest: PathBuf,
}

impl Selection {
    pub fn all(dest: &Path) -> Self {
        Selection {
            under: Vec::new(),
            strip: Vec::new(),
            dest: dest.to_path_buf(),
        }
    }

    /// `fetch`: one file or directory; into `target` if it is a directory, else as `target`.
    pub fn one(path: &str, target: &Path) -> Self {
        let under = path.trim_matches('/').as_bytes().to_vec();
        if target.is_dir() {
            let strip = match under.iter().rposition(|b| *b == b'/') {
                Some(i) => under[..i].to_vec(),
                None => Vec::new(),
            };
            Selection {
                under,
                strip,
                dest: target.to_path_buf(),
            }
        } else {
            Selection {
                strip: under.clone(),
                under,
                dest: target.to_path_buf(),
            }
        }
    }

    fn dest_of(&self, rel: &Path) -> PathBuf {
        let b = rel.as_os_str().as_bytes();
        let rest = b.strip_prefix(self.strip.as_slice()).unwrap_or(b);
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            self.dest.clone()
        } else {
            self.dest.join(std::ffi::OsStr::from_bytes(rest))
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Restored paths whose content is damaged, each with the reason.
    pub damaged: BTreeMap<PathBuf, String>,
    /// Metadata that could not be applied (owner when not root, unsupported xattrs).
    pub warnings: Vec<String>,
}

pub struct Options {
    pub progress: Progress,
    pub parallel: usize,
}

struct Selected {
    id: i64,
    kind: NodeKind,
    dest: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i64,
    target: Option<Vec<u8>>,
}

pub fn restore(
    repo: &Repo,
    ids: &Identities,
    meta: &Metadata,
    sel: &Selection,
    opts: Options,
) -> Result<Report> {
    let conn = &meta.conn;
    conn.execute_batch(
        "DROP TABLE IF EXISTS sel;
         CREATE TABLE sel (node_id INTEGER PRIMARY KEY, data_node INTEGER NOT NULL, dest BLOB NOT NULL);
         CREATE INDEX sel_data ON sel (data_node);",
    )?;
    // 1. Validate every path and decide each node's destination before writing anything.
    let mut nodes = Vec::new();
    {
        let mut q = conn.prepare(
            "SELECT id, path, kind, mode, uid, gid, size, mtime_ns, target FROM nodes
             WHERE ?1 = X'' OR path = ?1 OR substr(path, 1, length(?1) + 1) = ?1 || X'2f'
             ORDER BY path",
        )?;
        let mut rows = q.query([&sel.under])?;
        while let Some(r) = rows.next()? {
            let path: Vec<u8> = r.get(1)?;
            let rel = safe_relative(&path)?;
            let kind_s: String = r.get(2)?;
            let kind = NodeKind::parse(&kind_s)
                .ok_or_else(|| Error::Pipeline(format!("unknown node kind {kind_s:?}")))?;
            let target: Option<Vec<u8>> = r.get(8)?;
            if kind == NodeKind::Hardlink {
                safe_relative(target.as_deref().unwrap_or_default())?;
            }
            if kind == NodeKind::Symlink
                && target
                    .as_deref()
                    .is_none_or(|t| t.contains(&0) || t.is_empty())
            {
                return Err(Error::HostilePath(
                    String::from_utf8_lossy(&path).into_owned(),
                ));
            }
            nodes.push(Selected {
                id: r.get(0)?,
                kind,
                dest: sel.dest_of(&rel),
                mode: r.get(3)?,
                uid: r.get(4)?,
                gid: r.get(5)?,
                size: r.get::<_, i64>(6)? as u64,
                mtime_ns: r.get(7)?,
                target,
            });
        }
    }
    if nodes.is_empty() {
        return Err(Error::PathNotInSnapshot(
            String::from_utf8_lossy(&sel.under).into_owned(),
        ));
    }
    let mut report = Report::default();
    // A hard link whose first name is outside the selection is restored as a plain copy.
    let mut by_path: Vec<(i64, Vec<u8>)> = Vec::new();
    for n in nodes.iter_mut() {
        let mut data_node = n.id;
        if n.kind == NodeKind::Hardlink {
            let t = n.target.clone().unwrap_or_default();
            let in_sel = sel.under.is_empty()
                || t == sel.under
                || (t.starts_with(&sel.under) && t.get(sel.under.len()) == Some(&b'/'));
            let first: Option<(i64, i64)> = conn
                .query_row(
                    "SELECT id, size FROM nodes WHERE path = ?1 AND kind = 'file'",
                    [&t],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((first_id, first_size)) = first else {
                return Err(Error::Pipeline(format!(
                    "hard link {} points at {} which is not in the snapshot",
                    n.dest.display(),
                    String::from_utf8_lossy(&t)
                )));
            };
            if !in_sel {
                n.kind = NodeKind::File;
                n.size = first_size as u64;
                data_node = first_id;
            }
        }
        by_path.push((data_node, n.dest.as_os_str().as_bytes().to_vec()));
    }
    {
        let tx = conn.unchecked_transaction()?;
        let mut ins =
            tx.prepare("INSERT INTO sel (node_id, data_node, dest) VALUES (?1, ?2, ?3)")?;
        for (n, (data, dest)) in nodes.iter().zip(&by_path) {
            if n.kind == NodeKind::File {
                ins.execute(params![n.id, data, dest])?;
            }
        }
        drop(ins);
        tx.commit()?;
    }

    // 2. The tree: directories, then empty files of the right size (holes until written).
    for n in &nodes {
        match n.kind {
            NodeKind::Dir => {
                std::fs::create_dir_all(&n.dest)
                    .map_err(|e| Error::io("creating directory", &n.dest, e))?;
                report.dirs += 1;
            }
            NodeKind::File => {
                if let Some(parent) = n.dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io("creating directory", parent, e))?;
                }
                let f = create_file(&n.dest)?;
                f.set_len(n.size)
                    .map_err(|e| Error::io("sizing", &n.dest, e))?;
                report.files += 1;
                report.bytes += n.size;
            }
            _ => {}
        }
    }

    // 3. File contents, blob by blob, in parallel.
    let blobs: Vec<String> = {
        let mut q = conn.prepare(
            "SELECT DISTINCT c.blob_id FROM sel JOIN file_chunks f ON f.node_id = sel.data_node
             JOIN chunks c ON c.id = f.chunk_id",
        )?;
        q.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    let missing: Vec<Vec<u8>> = {
        let mut q = conn.prepare(
            "SELECT DISTINCT sel.dest FROM sel JOIN file_chunks f ON f.node_id = sel.data_node
             WHERE f.chunk_id NOT IN (SELECT id FROM chunks)",
        )?;
        q.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for d in missing {
        report.damaged.insert(
            PathBuf::from(std::ffi::OsStr::from_bytes(&d)),
            "metadata lists a chunk with no location".into(),
        );
    }
    let queue = Mutex::new(blobs);
    let damaged = Mutex::new(BTreeMap::new());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    let (db_path, hasher) = (meta.path(), &meta.hasher);
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            s.spawn(|| {
                let worker = match BlobWorker::new(repo, db_path, hasher, ids, &opts.progress) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = fatal.lock().map(|mut f| f.get_or_insert(e).to_string());
                        return;
                    }
                };
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop());
                    let Some(blob) = next else { break };
                    match worker.restore_blob(&blob) {
                        Ok(bad) => {
                            if let Ok(mut d) = damaged.lock() {
                                d.extend(bad);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = fatal.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().ok().flatten() {
        return Err(e);
    }
    report
        .damaged
        .extend(damaged.into_inner().unwrap_or_default());

    // 4. Links, then metadata (directories last and deepest first, so their mtimes stick).
    for n in &nodes {
        match n.kind {
            NodeKind::Hardlink => {
                let t = n.target.as_deref().unwrap_or_default();
                let first = sel.dest_of(&safe_relative(t)?);
                if let Some(parent) = n.dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io("creating directory", parent, e))?;
                }
                std::fs::hard_link(&first, &n.dest)
                    .map_err(|e| Error::io("linking", &n.dest, e))?;
                report.links += 1;
            }
            NodeKind::Symlink => {
                let t = std::ffi::OsStr::from_bytes(n.target.as_deref().unwrap_or_default());
                if let Some(parent) = n.dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io("creating directory", parent, e))?;
                }
                std::os::unix::fs::symlink(t, &n.dest)
                    .map_err(|e| Error::io("creating symlink", &n.dest, e))?;
                report.links += 1;
            }
            _ => {}
        }
    }
    let mut xq = conn.prepare("SELECT name, value FROM xattrs WHERE node_id = ?1")?;
    for n in nodes
        .iter()
        .filter(|n| n.kind != NodeKind::Dir)
        .chain(nodes.iter().rev().filter(|n| n.kind == NodeKind::Dir))
    {
        if n.kind == NodeKind::Hardlink {
            continue;
        }
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = xq
            .query_map([n.id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        apply_metadata(n, &xattrs, &mut report);
    }
    opts.progress.finish();
    Ok(report)
}

fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))
}

fn apply_metadata(n: &Selected, xattrs: &[(Vec<u8>, Vec<u8>)], report: &mut Report) {
    let p = &n.dest;
    for (name, value) in xattrs {
        if let Err(e) = xattr::set(p, std::ffi::OsStr::from_bytes(name), value) {
            report.warnings.push(format!(
                "{}: extended attribute {}: {e}",
                p.display(),
                String::from_utf8_lossy(name)
            ));
        }
    }
    match std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid)) {
        Ok(()) => {}
        // Only root may give files away; a user restoring their own files keeps them.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => report.warnings.push(format!("{}: owner: {e}", p.display())),
    }
    if n.kind != NodeKind::Symlink
        && let Err(e) =
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(n.mode & 0o7777))
    {
        report.warnings.push(format!("{}: mode: {e}", p.display()));
    }
    let t = filetime::FileTime::from_unix_time(
        n.mtime_ns.div_euclid(1_000_000_000),
        n.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    if let Err(e) = filetime::set_symlink_file_times(p, t, t) {
        report.warnings.push(format!("{}: mtime: {e}", p.display()));
    }
}

struct Want {
    id: ChunkId,
    offset: u64,
    clen: u32,
    ulen: u32,
}

struct BlobWorker<'a> {
    repo: &'a Repo,
    conn: Connection,
    hasher: ChunkHasher,
    ids: &'a Identities,
    progress: &'a Progress,
}

impl<'a> BlobWorker<'a> {
    fn new(
        repo: &'a Repo,
        db: &Path,
        hasher: &ChunkHasher,
        ids: &'a Identities,
        progress: &'a Progress,
    ) -> Result<Self> {
        // Nothing writes the database while workers run, so they can skip file locking.
        let uri = format!("file:{}?immutable=1", db.display());
        let conn = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )?;
        Ok(BlobWorker {
            repo,
            conn,
            hasher: hasher.clone(),
            ids,
            progress,
        })
    }

    /// Restores every wanted chunk of one blob; returns the files it could not complete.
    fn restore_blob(&self, blob: &str) -> Result<Vec<(PathBuf, String)>> {
        let (size, payload_start): (i64, i64) = self.conn.query_row(
            "SELECT size, payload_start FROM blobs WHERE id = ?1",
            [blob],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let wants: Vec<Want> = {
            let mut q = self.conn.prepare_cached(
                "SELECT c.id, c.offset, c.clen, c.ulen FROM chunks c WHERE c.blob_id = ?1 AND EXISTS
                   (SELECT 1 FROM file_chunks f JOIN sel ON sel.data_node = f.node_id
                    WHERE f.chunk_id = c.id)
                 ORDER BY c.offset",
            )?;
            q.query_map([blob], |r| {
                let id: Vec<u8> = r.get(0)?;
                Ok(Want {
                    id: ChunkId::from_slice(&id).unwrap_or(ChunkId([0; 32])),
                    offset: r.get::<_, i64>(1)? as u64,
                    clen: r.get(2)?,
                    ulen: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let mut bad = Vec::new();
        let Some(blob_id) = BlobId::parse(blob) else {
            for w in &wants {
                self.mark_damaged(&w.id, &format!("blob name {blob:?} is not valid"), &mut bad)?;
            }
            return Ok(bad);
        };
        let key = self.repo.blob_key(&blob_id);
        let what = format!("blob {blob}");
        let geom = Geometry {
            size: size as u64,
            payload_start: payload_start as u64,
        };
        let mut reader = match self.open_blob(&key, geom, &what) {
            Ok(r) => r,
            Err(Error::Key(e @ KeyError::WrongKey { .. })) => return Err(e.into()),
            Err(e) => {
                for w in &wants {
                    self.mark_damaged(&w.id, &e.to_string(), &mut bad)?;
                }
                return Ok(bad);
            }
        };
        // Entries come from untrusted metadata: frames must lie inside the blob and be no
        // larger than a compressed chunk can be.
        let (wants, outside): (Vec<Want>, Vec<Want>) = wants.into_iter().partition(|w| {
            w.clen <= MAX_FRAME && w.offset.saturating_add(u64::from(w.clen)) <= size as u64
        });
        for w in &outside {
            self.mark_damaged(
                &w.id,
                &format!("blob {blob}: chunk entry lies outside the blob"),
                &mut bad,
            )?;
        }
        for span in spans(&wants) {
            let start = wants[span.start].offset;
            let end = wants[span.clone()]
                .iter()
                .map(|w| w.offset + u64::from(w.clen))
                .max()
                .unwrap_or(start);
            let mut buf = vec![0u8; (end - start) as usize];
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
                    Err(e) => self.mark_damaged(&w.id, &e.to_string(), &mut bad)?,
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
        let (remote, hint) = RemoteReader::new(self.repo.clone(), key.clone(), g.size);
        hint.store(g.payload_start, Ordering::Relaxed);
        let plain = self.ids.decrypt(remote, what)?;
        Ok(BlobReader { plain, hint, g })
    }

    fn place(&self, w: &Want, frame: &[u8], bad: &mut Vec<(PathBuf, String)>) -> Result<()> {
        let data = match open_frame(frame, w.ulen, w.id, &self.hasher) {
            Ok(d) => d,
            Err(e) => return self.mark_damaged(&w.id, &e.to_string(), bad),
        };
        let zero = data.iter().all(|b| *b == 0);
        let mut q = self.conn.prepare_cached(
            "SELECT sel.dest, f.offset FROM file_chunks f JOIN sel ON sel.data_node = f.node_id
             WHERE f.chunk_id = ?1",
        )?;
        let dests: Vec<(Vec<u8>, i64)> = q
            .query_map([&w.id.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (dest, off) in dests {
            let path = Path::new(std::ffi::OsStr::from_bytes(&dest));
            self.progress.add_bytes(data.len() as u64);
            if zero {
                continue; // the file was created sparse; leave the hole
            }
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| Error::io("writing", path, e))?;
            f.write_all_at(&data, off as u64)
                .map_err(|e| Error::io("writing", path, e))?;
        }
        Ok(())
    }

    fn mark_damaged(
        &self,
        id: &ChunkId,
        why: &str,
        bad: &mut Vec<(PathBuf, String)>,
    ) -> Result<()> {
        let mut q = self.conn.prepare_cached(
            "SELECT DISTINCT sel.dest FROM file_chunks f JOIN sel ON sel.data_node = f.node_id
             WHERE f.chunk_id = ?1",
        )?;
        let dests: Vec<Vec<u8>> = q
            .query_map([&id.0[..]], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for d in dests {
            bad.push((
                PathBuf::from(std::ffi::OsStr::from_bytes(&d)),
                why.to_string(),
            ));
        }
        Ok(())
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
    hint: std::sync::Arc<std::sync::atomic::AtomicU64>,
    g: Geometry,
}

impl BlobReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = cipher_end(self.g.payload_start, offset + buf.len() as u64, self.g.size);
        self.hint.store(end, Ordering::Relaxed);
        self.plain.seek(SeekFrom::Start(offset))?;
        self.plain.read_exact(buf)
    }
}

/// Groups wanted chunks (sorted by offset) into ranges read with one request each.
fn spans(wants: &[Want]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=wants.len() {
        let split = i == wants.len() || {
            let prev = &wants[i - 1];
            let prev_end = prev.offset + u64::from(prev.clen);
            let gap = wants[i].offset.saturating_sub(prev_end);
            let span_len = wants[i].offset + u64::from(wants[i].clen) - wants[start].offset;
            gap > MERGE_GAP || span_len > MAX_SPAN
        };
        if split {
            out.push(start..i);
            start = i;
        }
    }
    out
}

/// Writes a restore report for people: damaged files first, then warnings.
pub fn print_report(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    for (path, why) in &report.damaged {
        writeln!(out, "damaged: {}: {why}", path.display())?;
    }
    for w in &report.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"a/../../x",
            b"..",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"a/",
        ] {
            assert!(
                safe_relative(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            safe_relative(b"etc/hosts").unwrap(),
            PathBuf::from("etc/hosts")
        );
        assert!(safe_relative(b"we\xffird/na\nme").is_ok());
    }

    #[test]
    fn spans_merge_close_chunks_and_split_far_ones() {
        let w = |offset, clen| Want {
            id: ChunkId([0; 32]),
            offset,
            clen,
            ulen: clen,
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

    #[test]
    fn selection_destinations() {
        let all = Selection::all(Path::new("/r"));
        assert_eq!(
            all.dest_of(Path::new("etc/hosts")),
            PathBuf::from("/r/etc/hosts")
        );
        let one = Selection::one("/etc/hosts", Path::new("/nonexistent/out.txt"));
        assert_eq!(
            one.dest_of(Path::new("etc/hosts")),
            PathBuf::from("/nonexistent/out.txt")
        );
        let t = tempfile::tempdir().unwrap();
        let into = Selection::one("etc/ssh", t.path());
        assert_eq!(
            into.dest_of(Path::new("etc/ssh/key")),
            t.path().join("ssh/key")
        );
    }
}
