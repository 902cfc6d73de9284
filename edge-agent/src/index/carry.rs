//! Partial scans: the run starts as a copy of the previous snapshot (`previous`), and
//! the backup replaces only the entries of the directories that changed.

use rusqlite::{OptionalExtension, params};

use super::{FileStat, Index};
use crate::error::{Error, Result};

/// What the carried-over snapshot must share with this run for its entries to stand.
pub struct CarryKey<'a> {
    pub format: &'a str,
    pub source_dirs: &'a str,
    pub excludes: &'a str,
}

/// An entry the run holds, as a directory listing compares it.
#[derive(Debug, Clone)]
pub struct Child {
    pub path: Vec<u8>,
    pub kind: String,
    pub stat: FileStat,
}

/// Entries of the run by kind, and the bytes of its regular files.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunTotals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes: u64,
}

/// The bounds of the paths strictly below `dir` (`""` is the filesystem root).
fn below(dir: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    if dir.is_empty() {
        return (Vec::new(), None);
    }
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'/' + 1);
    (lo, Some(hi))
}

/// The condition on `path` for the bounds from [`below`], written so that SQLite
/// searches the path index for them (an `OR` in the bound would make it scan).
fn within(hi: &Option<Vec<u8>>) -> &'static str {
    match hi {
        Some(_) => "path >= ?1 AND path < ?2",
        None => "path >= ?1 AND ?2 IS NULL",
    }
}

impl Index {
    /// Makes the run (just begun, still empty) a byte copy of the newest snapshot's
    /// database, when `prev` is that snapshot and was made from the same sources and
    /// excludes. False, and the run stays empty, otherwise. A copy rather than rows
    /// inserted anew: pages no change touches stay as they were, and the metadata
    /// upload skips them (`pieces`).
    pub fn carry_previous(&mut self, key: &CarryKey<'_>) -> Result<bool> {
        if !self.previous_matches(key)? {
            return Ok(false);
        }
        self.conn
            .execute_batch("COMMIT; DETACH DATABASE run")
            .map_err(self.e())?;
        let copied = std::fs::copy(&self.prev_path, &self.run_path);
        if let Err(err) = &copied {
            self.notices.push(format!(
                "warning: cannot copy {} ({err}); this backup visits every file",
                self.prev_path.display()
            ));
            // The run database may be half written: start it empty again.
            std::fs::write(&self.run_path, b"")
                .map_err(|err| Error::io("emptying the run database", &self.run_path, err))?;
        }
        self.attach_run()?;
        self.carried = copied.is_ok();
        if self.carried {
            self.ready.set(super::chunks::Ready::Seeded);
        }
        Ok(self.carried)
    }

    fn previous_matches(&self, key: &CarryKey<'_>) -> Result<bool> {
        let meta = |k: &str| self.prev_meta(k).map_err(self.e());
        let newest = self.newest_snapshot().map_err(self.e())?;
        Ok(newest.is_some()
            && meta("snapshot_id")? == newest
            && meta("format")?.as_deref() == Some(key.format)
            && meta("source_dirs")?.as_deref() == Some(key.source_dirs)
            && meta("excludes")?.as_deref() == Some(key.excludes))
    }

    /// The kind of the run's entry at `path`, if there is one.
    pub fn run_kind(&self, path: &[u8]) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT kind FROM run.nodes WHERE path = ?1")
            .and_then(|mut s| s.query_row([path], |r| r.get(0)).optional())
            .map_err(self.e())
    }

    /// Stat data the run holds for `path`, if it has an entry there.
    pub fn run_stat(&self, path: &[u8]) -> Result<Option<FileStat>> {
        self.conn
            .prepare_cached(
                "SELECT dev, ino, size, mtime_ns, ctime_ns FROM run.nodes WHERE path = ?1",
            )
            .and_then(|mut s| s.query_row([path], |r| super::file_stat(r, 0)).optional())
            .map_err(self.e())
    }

    /// The run's entries directly in `dir`.
    pub fn run_children(&self, dir: &[u8]) -> Result<Vec<Child>> {
        let (lo, hi) = below(dir);
        let skip = i64::try_from(lo.len()).unwrap_or(i64::MAX) + 1;
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT path, kind, dev, ino, size, mtime_ns, ctime_ns FROM run.nodes
                 WHERE {} AND instr(substr(path, ?3), X'2F') = 0",
                within(&hi)
            ))
            .map_err(self.e())?;
        let rows = stmt
            .query_map(params![lo, hi, skip], |r| {
                Ok(Child {
                    path: r.get(0)?,
                    kind: r.get(1)?,
                    stat: super::file_stat(r, 2)?,
                })
            })
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(self.e())?;
        Ok(rows
            .into_iter()
            .filter(|c| c.path.len() > lo.len())
            .collect())
    }

    /// Removes the run's entry at `path` (not what is below it).
    pub fn remove_path(&self, path: &[u8]) -> Result<()> {
        let id: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM run.nodes WHERE path = ?1")
            .and_then(|mut s| s.query_row([path], |r| r.get(0)).optional())
            .map_err(self.e())?;
        match id {
            Some(id) => self.remove_node(id),
            None => Ok(()),
        }
    }

    /// Removes the run's entry at `path` and everything below it.
    pub fn remove_subtree(&self, path: &[u8]) -> Result<()> {
        self.remove_path(path)?;
        let (lo, hi) = below(path);
        let range = within(&hi);
        let under = format!("SELECT id FROM run.nodes WHERE {range}");
        for sql in [
            format!(
                "INSERT OR IGNORE INTO temp.dropped
                     SELECT chunk FROM run.file_chunks WHERE node_id IN ({under})"
            ),
            format!(
                "INSERT OR IGNORE INTO temp.dropped SELECT chunk FROM run.xattrs
                 WHERE node_id IN ({under}) AND chunk IS NOT NULL"
            ),
            format!("DELETE FROM run.file_chunks WHERE node_id IN ({under})"),
            format!("DELETE FROM run.xattrs WHERE node_id IN ({under})"),
            format!("DELETE FROM run.nodes WHERE {range}"),
        ] {
            self.conn
                .prepare_cached(&sql)
                .and_then(|mut s| s.execute(params![lo, hi]))
                .map_err(self.e())?;
        }
        Ok(())
    }

    /// Removes the run's regular files with this inode and returns their paths: a
    /// file written through another of its names must be read again.
    pub fn take_inode_files(&self, dev: u64, ino: u64) -> Result<Vec<Vec<u8>>> {
        let paths: Vec<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT path FROM run.nodes WHERE dev = ?1 AND ino = ?2 AND kind = 'file'",
            )
            .and_then(|mut s| {
                s.query_map(params![dev as i64, ino as i64], |r| r.get(0))
                    .and_then(|rows| rows.collect())
            })
            .map_err(self.e())?;
        for p in &paths {
            self.remove_path(p)?;
        }
        Ok(paths)
    }

    /// Hard links whose target is no longer a regular file of the run with their inode
    /// (the target's name may now hold another file).
    pub fn dangling_hardlinks(&self) -> Result<Vec<Vec<u8>>> {
        self.conn
            .prepare_cached(
                "SELECT h.path FROM run.nodes h WHERE h.kind = 'hardlink' AND NOT EXISTS
                     (SELECT 1 FROM run.nodes f WHERE f.path = h.target AND f.kind = 'file'
                          AND f.dev = h.dev AND f.ino = h.ino)
                 ORDER BY h.path",
            )
            .and_then(|mut s| {
                s.query_map([], |r| r.get(0))
                    .and_then(|rows| rows.collect())
            })
            .map_err(self.e())
    }

    pub fn run_totals(&self) -> Result<RunTotals> {
        let mut t = RunTotals::default();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, count(*), total(size) FROM run.nodes GROUP BY kind")
            .map_err(self.e())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(self.e())?;
        for (kind, n, bytes) in rows {
            let n = u64::try_from(n).unwrap_or(0);
            match kind.as_str() {
                "file" => {
                    t.files = n;
                    t.bytes = bytes as u64;
                }
                "dir" => t.dirs = n,
                "symlink" => t.symlinks = n,
                "hardlink" => t.hardlinks = n,
                _ => {}
            }
        }
        Ok(t)
    }
}
