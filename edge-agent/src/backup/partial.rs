//! A partial scan: the run starts as the previous snapshot (`Index::carry_previous`)
//! and only the directories a watcher saw change are listed and stat'ed again. A new
//! directory found in one of them is walked in full; one that is gone takes its
//! subtree with it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::index::{Child, FileStat, Index};
use crate::progress::Progress;
use crate::scan::{
    Entry, Excludes, Visit, normalize_roots, read_sorted, relative_bytes, walk_tree,
};

/// What a backup looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every entry under the sources.
    Everything,
    /// Only these directories changed since the newest snapshot started: every other
    /// entry is carried over from it.
    Changed(Changes),
}

/// What a watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The roots it watched: a partial scan needs them to be the backup's roots.
    pub roots: Vec<PathBuf>,
    pub dirs: BTreeSet<PathBuf>,
}

type Visitor<'v> = dyn FnMut(Entry) -> Result<Visit> + 'v;
type Warner<'v> = dyn FnMut(&Path, std::io::Error) + 'v;

pub(super) struct PartialWalk<'a, 'v> {
    pub index: &'a Index,
    pub excludes: &'a Excludes,
    pub visit: &'a mut Visitor<'v>,
    pub warn: &'a mut Warner<'v>,
    /// Directories walked in full here; changed directories below them are done.
    walked: Vec<PathBuf>,
    /// Files to read again at the end (hard links whose other names moved or changed).
    again: BTreeSet<Vec<u8>>,
    /// Directories listed again already (in a full rescan, only the roots: each other
    /// directory is reached once, from its parent).
    listed: HashSet<PathBuf>,
    /// How many directories were listed.
    count: usize,
    roots: Vec<PathBuf>,
    /// Every directory is listed, and an entry whose stat data is unchanged stays as
    /// carried over instead of being visited again (and counted here).
    full: bool,
    progress: Option<&'a Progress>,
    /// Directories still to list, the next last: a stack, not recursion, so that a
    /// deep tree cannot exhaust the thread's stack.
    queue: Vec<PathBuf>,
}

impl<'a, 'v> PartialWalk<'a, 'v> {
    pub fn new(
        index: &'a Index,
        excludes: &'a Excludes,
        visit: &'a mut Visitor<'v>,
        warn: &'a mut Warner<'v>,
    ) -> Self {
        PartialWalk {
            index,
            excludes,
            visit,
            warn,
            walked: Vec::new(),
            again: BTreeSet::new(),
            listed: HashSet::new(),
            count: 0,
            roots: Vec::new(),
            full: false,
            progress: None,
            queue: Vec::new(),
        }
    }

    /// Lists every directory under `roots`, visiting only entries that are new or
    /// whose stat data changed: a full walk over a run that carries the previous
    /// snapshot over.
    pub fn run_full(mut self, roots: &[PathBuf], progress: &'a Progress) -> Result<usize> {
        self.full = true;
        self.progress = Some(progress);
        let all: BTreeSet<PathBuf> = normalize_roots(roots).into_iter().collect();
        self.run(roots, &all)
    }

    /// Rescans `changed` under `roots`; returns how many directories were listed.
    pub fn run(mut self, roots: &[PathBuf], changed: &BTreeSet<PathBuf>) -> Result<usize> {
        self.roots = normalize_roots(roots);
        for root in self.roots.clone() {
            self.restat_root(&root)?;
        }
        // Byte order puts a directory before everything below it.
        for dir in changed {
            if !self.listed.contains(dir) && self.wanted(dir)? {
                self.rescan(dir)?;
            }
        }
        self.again.extend(self.index.dangling_hardlinks()?);
        for rel in std::mem::take(&mut self.again) {
            self.read_again(&rel)?;
        }
        Ok(self.count)
    }

    /// True when the directory holding `path` is a root or a directory of the run.
    fn parent_is_dir(&self, path: &Path) -> Result<bool> {
        let Some(parent) = path.parent() else {
            return Ok(false);
        };
        if self.roots.iter().any(|r| r == parent) {
            return Ok(true);
        }
        Ok(self.index.run_kind(relative_bytes(parent))?.as_deref() == Some("dir"))
    }

    /// Visits an entry of an unchanged directory again, unless it is gone with it.
    fn read_again(&mut self, rel: &[u8]) -> Result<()> {
        self.index.remove_path(rel)?;
        let abs = absolute(rel);
        if !self.parent_is_dir(&abs)? {
            return Ok(());
        }
        match std::fs::symlink_metadata(&abs) {
            Ok(meta) => (self.visit)(Entry { path: abs, meta }).map(|_| ()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                (self.warn)(&abs, e);
                Ok(())
            }
        }
    }

    /// A root and its ancestors are stat'ed on every run, as a full walk does. A root
    /// whose listing changed is listed again; one that is another directory now (moved,
    /// replaced, mounted over) is walked in full.
    fn restat_root(&mut self, root: &Path) -> Result<()> {
        let mut chain: Vec<&Path> = root
            .ancestors()
            .filter(|a| a.as_os_str().len() > 1)
            .collect();
        chain.reverse();
        let before = self.index.run_stat(relative_bytes(root))?;
        for p in chain {
            let rel = relative_bytes(p);
            let kept = match std::fs::symlink_metadata(p) {
                Ok(meta) => self.same_dir(rel, &meta)?,
                Err(_) => false,
            };
            if !kept {
                self.index.remove_path(rel)?;
                self.restat(p)?;
            }
        }
        let Ok(meta) = std::fs::symlink_metadata(root) else {
            return Ok(());
        };
        match before {
            Some(b) if same_stat(&b, &meta, false) => Ok(()),
            Some(b) if b.dev == meta.dev() && b.ino == meta.ino() => self.rescan(root),
            _ if root.as_os_str().len() > 1 => self.walk_anew(root, relative_bytes(root)),
            _ => self.rescan(root),
        }
    }

    /// Forgets what the run holds at and below `abs` and walks it in full.
    fn walk_anew(&mut self, abs: &Path, rel: &[u8]) -> Result<()> {
        self.index.remove_subtree(rel)?;
        self.walked.push(abs.to_path_buf());
        walk_tree(
            abs,
            self.excludes,
            &mut &mut *self.visit,
            &mut &mut *self.warn,
        )
    }

    /// Visits `path` alone, if it can still be stat'ed.
    fn restat(&mut self, path: &Path) -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => (self.visit)(Entry {
                path: path.to_path_buf(),
                meta,
            })
            .map(|_| ()),
            Err(e) => {
                (self.warn)(path, e);
                Ok(())
            }
        }
    }

    /// A changed directory is rescanned when it is in a source, not excluded, not
    /// already walked, and its parent is (still) a directory of the run.
    fn wanted(&self, dir: &Path) -> Result<bool> {
        let Some(root) = self.roots.iter().find(|r| dir.starts_with(r)) else {
            return Ok(false);
        };
        if self.walked.iter().any(|w| dir.starts_with(w))
            || dir
                .ancestors()
                .take_while(|a| a != root)
                .any(|a| self.excludes.is_excluded(a))
        {
            return Ok(false);
        }
        if dir == root {
            return Ok(true);
        }
        self.parent_is_dir(dir)
    }

    /// Lists `dir` again, and the directories below it that need it.
    fn rescan(&mut self, dir: &Path) -> Result<()> {
        self.list(dir)?;
        while let Some(next) = self.queue.pop() {
            self.list(&next)?;
        }
        Ok(())
    }

    /// Lists `dir` again: its own entry, and each entry in it. Entries that are gone
    /// leave with their subtrees; subdirectories to list are queued.
    fn list(&mut self, dir: &Path) -> Result<()> {
        let is_root = self.roots.iter().any(|r| r == dir);
        if (!self.full || is_root) && !self.listed.insert(dir.to_path_buf()) {
            return Ok(());
        }
        self.count += 1;
        let rel = relative_bytes(dir).to_vec();
        let before: HashMap<Vec<u8>, Child> = self
            .index
            .run_children(&rel)?
            .into_iter()
            .map(|c| (c.path.clone(), c))
            .collect();
        let meta = match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => m,
            // Gone, or no longer a directory: its parent's rescan deals with it.
            _ => return Ok(()),
        };
        // Its own entry is visited again only if it changed: an unchanged one stays
        // where it is in the run database, and so do the pages that hold it.
        if !is_root && !self.same_dir(&rel, &meta)? {
            self.index.remove_path(&rel)?;
            self.restat(dir)?;
        }
        let names = match read_sorted(dir) {
            Ok(n) => n,
            Err(e) => {
                (self.warn)(dir, e);
                return Ok(());
            }
        };
        let now: BTreeSet<Vec<u8>> = names
            .iter()
            .map(|n| relative_bytes(&dir.join(n)).to_vec())
            .collect();
        for gone in before.keys().filter(|p| !now.contains(*p)) {
            self.index.remove_subtree(gone)?;
        }
        let queued = self.queue.len();
        for path in now {
            self.entry(&absolute(&path), &path, before.get(&path))?;
        }
        // Popped in byte order.
        self.queue[queued..].reverse();
        Ok(())
    }

    /// One entry of a rescanned directory; `was` is what the run holds for it so far.
    fn entry(&mut self, abs: &Path, rel: &[u8], was: Option<&Child>) -> Result<()> {
        if self.excludes.is_excluded(abs) {
            return self.index.remove_subtree(rel);
        }
        let meta = match std::fs::symlink_metadata(abs) {
            Ok(m) => m,
            Err(e) => {
                (self.warn)(abs, e);
                return self.index.remove_subtree(rel);
            }
        };
        if meta.is_dir()
            && let Some(was) = was.filter(|w| w.kind == "dir")
        {
            let b = &was.stat;
            if b.dev == meta.dev() && b.ino == meta.ino() {
                // The same directory: its entries are carried over, unless its own
                // listing changed (events made before a new directory was watched).
                // Listing it visits its own entry too.
                if self.full || !same_stat(b, &meta, false) {
                    self.queue.push(abs.to_path_buf());
                    return Ok(());
                }
                self.index.remove_path(rel)?;
                return (self.visit)(Entry {
                    path: abs.to_path_buf(),
                    meta,
                })
                .map(|_| ());
            }
        }
        if meta.is_dir() {
            // New here, or another directory under the old name.
            return self.walk_anew(abs, rel);
        }
        if self.full && self.unchanged(was, &meta) {
            return Ok(());
        }
        self.index.remove_subtree(rel)?;
        if meta.is_file() && meta.nlink() > 1 {
            // Another name of this inode may be carried over with stale content.
            for other in self.index.take_inode_files(meta.dev(), meta.ino())? {
                self.again.insert(other);
            }
        }
        (self.visit)(Entry {
            path: abs.to_path_buf(),
            meta,
        })
        .map(|_| ())
    }
}

impl PartialWalk<'_, '_> {
    /// True when the run holds `rel` as a directory with this stat data.
    fn same_dir(&self, rel: &[u8], meta: &std::fs::Metadata) -> Result<bool> {
        if self.index.run_kind(rel)?.as_deref() != Some("dir") {
            return Ok(false);
        }
        Ok(self
            .index
            .run_stat(rel)?
            .is_some_and(|b| same_stat(&b, meta, false)))
    }

    /// True when a file, symlink or hard link is as the run holds it (`was`): same
    /// device, inode, size, modification and change time (a change of content, mode,
    /// owner, link count or extended attributes moves the change time).
    fn unchanged(&self, was: Option<&Child>, meta: &std::fs::Metadata) -> bool {
        let sized = match was.map(|w| w.kind.as_str()) {
            Some("file") if meta.is_file() => true,
            Some("hardlink") if meta.is_file() => false,
            Some("symlink") if meta.is_symlink() => false,
            _ => return false,
        };
        let same = was.is_some_and(|w| same_stat(&w.stat, meta, sized));
        if same
            && sized
            && let Some(p) = self.progress
        {
            p.add_file();
            p.add_bytes(meta.size());
        }
        same
    }
}

/// True when stat data is what the run holds for an entry. Only regular files are
/// stored with their size (directories, symlinks and hard links with 0).
fn same_stat(before: &FileStat, meta: &std::fs::Metadata, sized: bool) -> bool {
    let now = super::stat_of(meta);
    (before.dev, before.ino, before.mtime_ns, before.ctime_ns)
        == (now.dev, now.ino, now.mtime_ns, now.ctime_ns)
        && (!sized || before.size == now.size)
}

/// The path a stored (relative) path names.
fn absolute(rel: &[u8]) -> PathBuf {
    PathBuf::from(std::ffi::OsStr::from_bytes(&[b"/", rel].concat()))
}
