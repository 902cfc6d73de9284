//! Restore, fetch and snapshot listing: everything that needs the private key.
//!
//! Restore runs in passes over the (hostile) metadata database, each streaming its rows,
//! so memory does not grow with the number of entries:
//! 1. plan: every selected entry, in byte order of its path, is checked and decided
//!    (`plan`); directories are created through the `target` walker; what was accepted
//!    goes into a `sel` table of the temporary database;
//! 2. check: each selected file's chunk list must tile the file exactly, else the file
//!    is reported damaged and gets no content; files are created (holes until written),
//!    except those of a single chunk and no extended attributes ("whole" files);
//! 3. data: blobs in parallel, each read with ranged requests covering only the wanted
//!    chunks; every chunk is hash-checked; all-zero chunks stay holes (`blobs`). A
//!    whole file is created, written and given its owner, mode and mtime here, through
//!    one open: on a tree of small files that is most of the work, spread over workers;
//! 4. links: symlinks and hard links, once every file is written;
//! 5. metadata: xattrs, owners, modes, mtimes of the rest; directories last, deepest
//!    first.

mod blobs;
mod catalog;
pub mod listing;
pub mod plan;
mod schema;
mod target;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row, params};

pub use catalog::{
    Catalog, Metadata, list_snapshots, open_manifest, open_metadata, read_manifest, resolve,
};
pub use plan::Selection;
pub use target::TargetError;

use crate::crypt::Identities;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::snapshot::NodeKind;
use crate::store::Repo;
use blobs::{BlobWorker, XattrValues};
use plan::{ChunkRef, Decision, LinkFirst, Node, Parent, RawNode, Tiling, display_path};
use target::{Attrs, Target};

#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Restored paths whose content is damaged, each with the reason.
    pub damaged: BTreeMap<PathBuf, String>,
    /// Snapshot entries that break the restore rules (`plan`): nothing was written for
    /// them. Keyed by their path in the snapshot.
    pub hostile: BTreeMap<PathBuf, String>,
    /// Metadata that could not be applied (owner when not root, unsupported xattrs).
    pub warnings: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.hostile.is_empty()
    }
}

pub struct Options {
    pub progress: Progress,
    pub parallel: usize,
}

impl From<TargetError> for Error {
    fn from(e: TargetError) -> Self {
        Error::io(e.what, e.path, e.source)
    }
}

/// Bytes of a BLOB or TEXT column; anything else is empty (and then refused).
fn bytes(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        _ => Vec::new(),
    })
}

/// A BLOB or TEXT column as text (invalid UTF-8 replaced); anything else is empty.
pub(crate) fn text(r: &Row<'_>, i: usize) -> rusqlite::Result<String> {
    Ok(String::from_utf8_lossy(&bytes(r, i)?).into_owned())
}

fn opt_bytes(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Vec<u8>>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        _ => Some(bytes(r, i)?),
    })
}

/// An INTEGER column; anything else becomes `i64::MIN`, which no check accepts.
fn int(r: &Row<'_>, i: usize) -> rusqlite::Result<i64> {
    Ok(match r.get_ref(i)? {
        ValueRef::Integer(v) => v,
        _ => i64::MIN,
    })
}

const SEL_SCHEMA: &str = "
DROP TABLE IF EXISTS vaultik_sel;
DROP INDEX IF EXISTS vaultik_sel_data;
CREATE TABLE vaultik_sel (
    node_id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    data_node INTEGER,
    dest BLOB NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    target BLOB,
    size INTEGER,
    -- A file of exactly one chunk and no extended attributes: the data pass creates,
    -- writes and finishes it through one open.
    whole INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX vaultik_sel_data ON vaultik_sel (data_node);
";

/// Restores `sel` of the snapshot whose metadata is `meta`.
pub fn restore(
    repo: &Repo,
    ids: &Identities,
    meta: &Metadata,
    sel: &Selection,
    opts: Options,
) -> Result<Report> {
    let conn = &meta.conn;
    if !selection_exists(conn, sel)? {
        return Err(Error::PathNotInSnapshot(sel.typed.clone()));
    }
    conn.execute_batch(SEL_SCHEMA)?;
    let mut target = Target::open(&sel.root)?;
    let mut report = Report::default();
    // One transaction per pass that writes the selection, not one per entry.
    let tx = conn.unchecked_transaction()?;
    plan_and_create(conn, sel, &mut target, &mut report)?;
    check_chunk_lists(conn, &target, &mut report)?;
    tx.commit()?;
    create_files(conn, &mut target)?;
    if opts.progress.is_shown() {
        let total: f64 = conn.query_row(
            "SELECT total(size) FROM vaultik_sel WHERE kind = 'file'",
            [],
            |r| r.get(0),
        )?;
        opts.progress.set_total(total as u64);
    }
    check_xattr_chunks(conn, &target, &mut report)?;
    let xattrs = XattrValues::new()?;
    write_data(repo, ids, meta, &target, &xattrs, &opts, &mut report)?;
    make_links(conn, &mut target, &mut report)?;
    conn.execute(
        "ATTACH DATABASE ?1 AS xv",
        [xattrs.path().to_string_lossy()],
    )?;
    let applied = apply_metadata(conn, &mut target, &mut report);
    conn.execute_batch("DETACH DATABASE xv")?;
    applied?;
    opts.progress.finish();
    Ok(report)
}

fn selection_exists(conn: &Connection, sel: &Selection) -> Result<bool> {
    if sel.under.is_empty() {
        return Ok(true);
    }
    let (lo, hi) = sel.below();
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM nodes WHERE path = ?1 OR (path >= ?2 AND path < ?3))",
        params![sel.under, lo, hi],
        |r| r.get(0),
    )?)
}

fn raw_node(r: &Row<'_>) -> rusqlite::Result<RawNode> {
    Ok(RawNode {
        id: int(r, 0)?,
        path: bytes(r, 1)?,
        kind: String::from_utf8_lossy(&bytes(r, 2)?).into_owned(),
        mode: int(r, 3)?,
        uid: int(r, 4)?,
        gid: int(r, 5)?,
        size: int(r, 6)?,
        mtime_ns: int(r, 7)?,
        target: opt_bytes(r, 8)?,
    })
}

/// Pass 1: decide every selected entry in path order; create directories.
fn plan_and_create(
    conn: &Connection,
    sel: &Selection,
    target: &mut Target,
    report: &mut Report,
) -> Result<()> {
    let (lo, hi) = sel.below();
    let mut q = conn.prepare(
        "SELECT id, path, kind, mode, uid, gid, size, mtime_ns, target FROM nodes
         WHERE ?1 = X'' OR path = ?1 OR (path >= ?2 AND path < ?3) ORDER BY path",
    )?;
    let mut rows = q.query(params![sel.under, lo, hi])?;
    while let Some(r) = rows.next()? {
        let raw = raw_node(r)?;
        let shown = display_path(&raw.path);
        let node = match plan::node(raw) {
            Ok(n) => n,
            Err(why) => {
                report.hostile.insert(shown, why);
                continue;
            }
        };
        let seen: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM vaultik_sel WHERE path = ?1)
                     OR EXISTS (SELECT 1 FROM vaultik_sel WHERE node_id = ?2)",
            )?
            .query_row(params![node.path, node.id], |r| r.get(0))?;
        let dest = sel.dest_of(&node.path);
        let decision = match &dest {
            _ if seen => Decision::Refuse("its path or id appears twice in the snapshot".into()),
            None => Decision::Refuse("outside the selection".into()),
            Some(_) => {
                let parent = parent_state(conn, sel, &node.path)?;
                let link = match node.kind {
                    NodeKind::Hardlink => Some(link_first(conn, sel, &node)?),
                    _ => None,
                };
                plan::decide(&node, parent, link)
            }
        };
        act(
            conn,
            target,
            report,
            &node,
            &dest.unwrap_or_default(),
            decision,
        )?;
    }
    Ok(())
}

fn kind_at(conn: &Connection, table: &str, path: &[u8]) -> Result<Option<String>> {
    let sql = format!("SELECT kind FROM {table} WHERE path = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([path], |r| bytes(r, 0))
        .optional()?
        .map(|k| String::from_utf8_lossy(&k).into_owned()))
}

fn parent_state(conn: &Connection, sel: &Selection, path: &[u8]) -> Result<Parent> {
    let as_parent = |kind: Option<String>| match kind.as_deref().map(NodeKind::parse) {
        Some(Some(NodeKind::Dir)) => Parent::Dir,
        Some(Some(k)) => Parent::NotDir(k),
        _ => Parent::Absent,
    };
    if !sel.is_top(path) {
        return Ok(as_parent(kind_at(
            conn,
            "vaultik_sel",
            plan::parent_of(path),
        )?));
    }
    // A fetched entry's ancestors are not restored, but where the snapshot has them
    // they must be directories: nothing below a symlink is ever a genuine entry.
    let mut p = plan::parent_of(path);
    while !p.is_empty() {
        if let Some(kind) = kind_at(conn, "nodes", p)?.filter(|k| k != "dir") {
            return Ok(match as_parent(Some(kind)) {
                Parent::NotDir(k) => Parent::NotDir(k),
                _ => Parent::Absent,
            });
        }
        p = plan::parent_of(p);
    }
    Ok(Parent::Root)
}

fn link_first(conn: &Connection, sel: &Selection, node: &Node) -> Result<LinkFirst> {
    let first = node.target.as_deref().unwrap_or_default();
    if sel.contains(first) {
        return Ok(LinkFirst::Inside);
    }
    let row: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, size FROM nodes WHERE path = ?1 AND kind = 'file'",
            [first],
            |r| Ok((int(r, 0)?, int(r, 1)?)),
        )
        .optional()?;
    Ok(
        match row.and_then(|(id, size)| Some((id, u64::try_from(size).ok()?))) {
            Some((node, size)) => LinkFirst::Outside { node, size },
            None => LinkFirst::NotAFile,
        },
    )
}

/// Carries out one decision; `dest` is where the entry lands below the root.
fn act(
    conn: &Connection,
    target: &mut Target,
    report: &mut Report,
    node: &Node,
    dest: &[u8],
    decision: Decision,
) -> Result<()> {
    let mut created_size = None;
    let (kind, data_node) = match decision {
        Decision::Refuse(why) => {
            report.hostile.insert(node.path_display(), why);
            return Ok(());
        }
        Decision::Dir => {
            target.mkdir(dest)?;
            report.dirs += 1;
            ("dir", None)
        }
        Decision::File { data_node, size } => {
            created_size = Some(size);
            report.files += 1;
            report.bytes = report.bytes.saturating_add(size);
            ("file", Some(data_node))
        }
        Decision::Symlink => ("symlink", None),
        Decision::Hardlink => ("hardlink", None),
    };
    conn.prepare_cached(
        "INSERT INTO vaultik_sel (node_id, path, kind, data_node, dest, mode, uid, gid, mtime_ns, target, size, whole)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
             (SELECT count(*) FROM (SELECT 1 FROM file_chunks WHERE node_id = ?4 LIMIT 2)) = 1
             AND NOT EXISTS (SELECT 1 FROM xattrs WHERE node_id = ?1))",
    )?
    .execute(params![
        node.id,
        node.path,
        kind,
        data_node,
        dest,
        node.mode,
        node.uid,
        node.gid,
        node.mtime_ns,
        node.target,
        created_size.and_then(|s| i64::try_from(s).ok())
    ])?;
    Ok(())
}

/// One file's chunk list while pass 2 reads it.
struct FileCheck {
    node: i64,
    dest: Vec<u8>,
    /// The size the file was created with.
    size: u64,
    tiling: Tiling,
    error: Option<String>,
}

impl FileCheck {
    /// `Some((node, dest, why))` if the file is damaged.
    fn verdict(self) -> Option<(i64, Vec<u8>, String)> {
        let why = self.error.or_else(|| self.tiling.finish(self.size).err())?;
        Some((self.node, self.dest, why))
    }
}

/// Pass 2: every selected file's chunk list must tile it; the others become 'damaged'
/// and get no content.
fn check_chunk_lists(conn: &Connection, target: &Target, report: &mut Report) -> Result<()> {
    let mut q = conn.prepare(
        "SELECT s.node_id, s.dest, s.size, f.offset,
                CASE WHEN b.id IS NOT NULL THEN c.ulen END,
                CASE WHEN typeof(c.hash) = 'blob' THEN length(c.hash) ELSE 0 END,
                f.node_id IS NOT NULL
         FROM vaultik_sel s
         LEFT JOIN file_chunks f ON f.node_id = s.data_node
         LEFT JOIN chunks c ON c.id = f.chunk
         LEFT JOIN blobs b ON b.id = c.blob
         WHERE s.kind = 'file' ORDER BY s.node_id, f.seq",
    )?;
    let mut rows = q.query([])?;
    let mut bad: Vec<(i64, Vec<u8>, String)> = Vec::new();
    let mut cur: Option<FileCheck> = None;
    while let Some(r) = rows.next()? {
        let id = int(r, 0)?;
        if cur.as_ref().is_none_or(|c| c.node != id) {
            bad.extend(cur.take().and_then(FileCheck::verdict));
            cur = Some(FileCheck {
                node: id,
                dest: bytes(r, 1)?,
                size: u64::try_from(int(r, 2)?).unwrap_or(u64::MAX),
                tiling: Tiling::default(),
                error: None,
            });
        }
        let has_chunk: bool = r.get(6)?;
        if let Some(c) = cur.as_mut().filter(|c| c.error.is_none() && has_chunk) {
            let chunk = ChunkRef {
                offset: int(r, 3)?,
                ulen: match r.get_ref(4)? {
                    ValueRef::Null => None,
                    _ => Some(int(r, 4)?),
                },
                id_len: usize::try_from(int(r, 5)?).unwrap_or(0),
            };
            c.error = c.tiling.push(chunk).err();
        }
    }
    bad.extend(cur.take().and_then(FileCheck::verdict));
    drop(rows);
    for (id, dest, why) in bad {
        conn.execute(
            "UPDATE vaultik_sel SET kind = 'damaged' WHERE node_id = ?1",
            [id],
        )?;
        report.damaged.insert(
            target.display(&dest),
            format!("metadata is inconsistent: {why}"),
        );
    }
    Ok(())
}

/// Creates the files the data pass does not create whole: empty ones, damaged ones and
/// those of several chunks. They are holes until written.
fn create_files(conn: &Connection, target: &mut Target) -> Result<()> {
    let mut q = conn.prepare(
        "SELECT dest, size FROM vaultik_sel
         WHERE kind = 'damaged' OR (kind = 'file' AND NOT whole) ORDER BY path",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let (dest, size) = (bytes(r, 0)?, u64::try_from(int(r, 1)?).unwrap_or(0));
        target.create_file(&dest, size)?;
    }
    Ok(())
}

/// Pass 2, for extended attributes stored as chunks: each needs a stored location.
fn check_xattr_chunks(conn: &Connection, target: &Target, report: &mut Report) -> Result<()> {
    let mut q = conn.prepare(
        "SELECT s.dest, x.name FROM vaultik_sel s JOIN xattrs x ON x.node_id = s.node_id
         LEFT JOIN chunks c ON c.id = x.chunk LEFT JOIN blobs b ON b.id = c.blob
         WHERE x.chunk IS NOT NULL AND s.kind IN ('file', 'damaged', 'dir')
           AND (b.id IS NULL OR typeof(c.hash) != 'blob' OR length(c.hash) != 32)",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let (dest, name) = (bytes(r, 0)?, bytes(r, 1)?);
        report.damaged.insert(
            target.display(&dest),
            format!(
                "extended attribute {} has no stored location",
                String::from_utf8_lossy(&name)
            ),
        );
    }
    Ok(())
}

/// Pass 3: file contents (and extended attribute values), blob by blob, in parallel.
fn write_data(
    repo: &Repo,
    ids: &Identities,
    meta: &Metadata,
    target: &Target,
    xattrs: &XattrValues,
    opts: &Options,
    report: &mut Report,
) -> Result<()> {
    let mut blobs: Vec<i64> = {
        let mut q = meta.conn.prepare(
            "SELECT c.blob FROM vaultik_sel s
             JOIN file_chunks f ON f.node_id = s.data_node JOIN chunks c ON c.id = f.chunk
             WHERE s.kind = 'file' AND typeof(c.blob) = 'integer'
             UNION
             SELECT c.blob FROM vaultik_sel s
             JOIN xattrs x ON x.node_id = s.node_id JOIN chunks c ON c.id = x.chunk
             WHERE s.kind IN ('file', 'damaged', 'dir') AND typeof(c.blob) = 'integer'",
        )?;
        q.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    // Taken from the end: the first blobs of the backup first, near files near.
    blobs.reverse();
    let queue = Mutex::new(blobs);
    let damaged = Mutex::new(Vec::new());
    let warnings = Mutex::new(Vec::new());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        if let Ok(mut f) = fatal.lock() {
            f.get_or_insert(e);
        }
    };
    let (db_path, hasher) = (meta.path(), &meta.hasher);
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            s.spawn(|| {
                let worker = target.reopen().map_err(Error::from).and_then(|t| {
                    BlobWorker::new(repo, db_path, hasher, ids, &opts.progress, t, xattrs)
                });
                let mut worker = match worker {
                    Ok(w) => w,
                    Err(e) => return fail(e),
                };
                while let Some(blob) = queue.lock().ok().and_then(|mut q| q.pop()) {
                    match worker.restore_blob(blob) {
                        Ok(bad) => {
                            if let Ok(mut d) = damaged.lock() {
                                d.extend(bad);
                            }
                        }
                        Err(e) => return fail(e),
                    }
                }
                if let Ok(mut w) = warnings.lock() {
                    w.extend(worker.into_warnings());
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
    report
        .warnings
        .extend(warnings.into_inner().unwrap_or_default());
    Ok(())
}

/// Pass 4: symlinks and hard links. A hard link's first name must be a regular file
/// this restore wrote.
fn make_links(conn: &Connection, target: &mut Target, report: &mut Report) -> Result<()> {
    let mut q = conn.prepare(
        "SELECT s.node_id, s.path, s.kind, s.dest, s.target, f.dest FROM vaultik_sel s
         LEFT JOIN vaultik_sel f ON s.kind = 'hardlink' AND f.path = s.target
              AND f.kind IN ('file', 'damaged')
         WHERE s.kind IN ('symlink', 'hardlink')",
    )?;
    let mut refused = Vec::new();
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let (id, path, kind): (i64, Vec<u8>, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let (dest, link_target): (Vec<u8>, Option<Vec<u8>>) = (r.get(3)?, r.get(4)?);
        let link_target = link_target.unwrap_or_default();
        if kind == "symlink" {
            target.symlink(&dest, &link_target)?;
        } else if let Some(first) = r.get::<_, Option<Vec<u8>>>(5)? {
            target.hard_link(&dest, &first)?;
        } else {
            report.hostile.insert(
                display_path(&path),
                format!(
                    "hard link to {}, which is not a regular file this restore wrote",
                    display_path(&link_target).display()
                ),
            );
            refused.push(id);
            continue;
        }
        report.links += 1;
    }
    drop(rows);
    for id in refused {
        conn.execute(
            "UPDATE vaultik_sel SET kind = 'refused' WHERE node_id = ?1",
            [id],
        )?;
    }
    Ok(())
}

/// Pass 5: xattrs, owners, modes and mtimes of what the data pass did not finish;
/// directories last and deepest first, so their mtimes stick.
fn apply_metadata(conn: &Connection, target: &mut Target, report: &mut Report) -> Result<()> {
    // Format 1 values are inline; format 2 values were read from blobs in pass 3.
    let mut xq = conn.prepare(
        "SELECT name, value FROM xattrs WHERE node_id = ?1 AND value IS NOT NULL
         UNION ALL SELECT name, value FROM xv.xattr_values WHERE node_id = ?1",
    )?;
    for order in [
        "WHERE kind IN ('file', 'damaged', 'symlink') AND NOT (kind = 'file' AND whole)
         ORDER BY path",
        "WHERE kind = 'dir' ORDER BY path DESC",
    ] {
        let mut q = conn.prepare(&format!(
            "SELECT node_id, kind, dest, mode, uid, gid, mtime_ns FROM vaultik_sel {order}"
        ))?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let (id, kind, dest): (i64, String, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let xattrs: Vec<(Vec<u8>, Vec<u8>)> = xq
                .query_map([id], |x| Ok((bytes(x, 0)?, bytes(x, 1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let attrs = Attrs {
                symlink: kind == "symlink",
                mode: r.get(3)?,
                uid: r.get(4)?,
                gid: r.get(5)?,
                mtime_ns: r.get(6)?,
                xattrs: &xattrs,
            };
            report.warnings.extend(target.apply(&dest, &attrs));
        }
    }
    Ok(())
}

/// `s` with control characters escaped, and the invisible ones that reorder or hide
/// text (bidi controls, zero-width characters, line separators): names from a snapshot
/// must neither drive the terminal that shows them nor pass for other names.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || is_invisible(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Writes a restore report for people: refused entries, damaged files, then warnings.
pub fn print_report(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let show = |p: &PathBuf| printable(&p.display().to_string());
    for (path, why) in &report.hostile {
        writeln!(
            out,
            "hostile entry refused: {}: {}",
            show(path),
            printable(why)
        )?;
    }
    for (path, why) in &report.damaged {
        writeln!(out, "damaged: {}: {}", show(path), printable(why))?;
    }
    for w in &report.warnings {
        writeln!(out, "warning: {}", printable(w))?;
    }
    Ok(())
}
