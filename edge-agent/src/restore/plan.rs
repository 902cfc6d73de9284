//! The restore plan: for each snapshot entry, what restore does with it and why. Pure:
//! values in, decisions out; the driver in `restore` looks up the facts and acts.
//!
//! Snapshot metadata is hostile input (docs/SECURITY.md). The rules:
//! - a stored path is relative, with no empty, `.` or `..` component and no NUL;
//! - every entry's parent is the selection root or a directory entry of the same
//!   snapshot that this restore created (entries are planned in byte order of their
//!   paths, so a parent is always decided before its children);
//! - a symlink target is non-empty and has no NUL; symlinks are created after all file
//!   data, and nothing is ever opened through one (see `target`);
//! - a hard link's first name is a regular file that this restore wrote;
//! - numbers (mode, owner, size) fit their types.
//!
//! An entry that breaks a rule is refused: nothing is written for it or below it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::snapshot::NodeKind;

/// Checks a stored path: relative, no empty, `.` or `..` component, no NUL byte.
pub fn check_path(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.starts_with(b"/") {
        return Err("absolute path");
    }
    if path.contains(&0) {
        return Err("NUL byte in path");
    }
    for comp in path.split(|b| *b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err("empty, `.` or `..` path component");
        }
    }
    Ok(())
}

/// The stored path of an entry's parent directory; empty for a top-level entry.
pub fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[..i],
        None => &[],
    }
}

/// Which part of a snapshot to restore, and where its entries land below `root`, the
/// directory restore opens (and creates if missing) itself.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Stored path of the subtree to restore; empty for everything.
    pub under: Vec<u8>,
    /// Prefix removed from stored paths before they are placed below `root`.
    pub strip: Vec<u8>,
    /// Name put in front of what remains (fetch to a new path: that path's file name).
    pub lead: Vec<u8>,
    pub root: PathBuf,
    /// As the user typed it, for messages.
    pub typed: String,
}

impl Selection {
    pub fn all(dest: &Path) -> Self {
        Selection {
            under: Vec::new(),
            strip: Vec::new(),
            lead: Vec::new(),
            root: dest.to_path_buf(),
            typed: String::new(),
        }
    }

    /// `fetch`: one file or directory; into `target` if it is an existing directory,
    /// else as `target` itself.
    pub fn one(path: &str, target: &Path) -> Self {
        let under = path.trim_matches('/').as_bytes().to_vec();
        let typed = path.to_string();
        if target.is_dir() {
            Selection {
                strip: parent_of(&under).to_vec(),
                under,
                lead: Vec::new(),
                root: target.to_path_buf(),
                typed,
            }
        } else {
            let root = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let lead = target
                .file_name()
                .map(|n| n.as_bytes().to_vec())
                .unwrap_or_default();
            Selection {
                strip: under.clone(),
                under,
                lead,
                root,
                typed,
            }
        }
    }

    /// Byte range of stored paths strictly below `under`: `under/` ..< `under0`
    /// (`0` follows `/` in ASCII). Compared as BLOBs, so it works for any bytes.
    pub fn below(&self) -> (Vec<u8>, Vec<u8>) {
        let mut lo = self.under.clone();
        lo.push(b'/');
        let mut hi = self.under.clone();
        hi.push(b'0');
        (lo, hi)
    }

    /// Where a stored path lands, relative to `root`. `None` for a path outside the
    /// selection.
    pub fn dest_of(&self, stored: &[u8]) -> Option<Vec<u8>> {
        let rest = if self.strip.is_empty() {
            stored
        } else if stored == self.strip.as_slice() {
            &[][..]
        } else {
            stored
                .strip_prefix(self.strip.as_slice())?
                .strip_prefix(b"/")?
        };
        let mut out = self.lead.clone();
        if !out.is_empty() && !rest.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(rest);
        (!out.is_empty()).then_some(out)
    }

    /// True for the stored path whose parent is the restore root itself.
    pub fn is_top(&self, stored: &[u8]) -> bool {
        if self.under.is_empty() {
            !stored.contains(&b'/')
        } else {
            stored == self.under.as_slice()
        }
    }

    pub fn contains(&self, stored: &[u8]) -> bool {
        self.under.is_empty()
            || stored == self.under.as_slice()
            || (stored.starts_with(&self.under) && stored.get(self.under.len()) == Some(&b'/'))
    }
}

/// A node row as stored: every number still as SQLite gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawNode {
    pub id: i64,
    pub path: Vec<u8>,
    pub kind: String,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub size: i64,
    pub mtime_ns: i64,
    pub target: Option<Vec<u8>>,
}

/// A node whose values fit their types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: i64,
    pub path: Vec<u8>,
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub target: Option<Vec<u8>>,
}

impl Node {
    pub fn path_display(&self) -> PathBuf {
        display_path(&self.path)
    }
}

/// `/` + stored path, for messages.
pub fn display_path(stored: &[u8]) -> PathBuf {
    let mut p = b"/".to_vec();
    p.extend_from_slice(stored);
    PathBuf::from(OsStr::from_bytes(&p))
}

/// Checks a raw row: its path and that every number fits.
pub fn node(raw: RawNode) -> Result<Node, String> {
    check_path(&raw.path).map_err(str::to_string)?;
    if raw.id == i64::MIN {
        return Err("its id is not an integer".into());
    }
    let kind = NodeKind::parse(&raw.kind).ok_or_else(|| format!("unknown kind {:?}", raw.kind))?;
    let fit =
        |v: i64, what: &str| u32::try_from(v).map_err(|_| format!("{what} {v} is out of range"));
    let size = u64::try_from(raw.size).map_err(|_| format!("size {} is negative", raw.size))?;
    let target = raw.target;
    match kind {
        NodeKind::Symlink => {
            if target
                .as_deref()
                .is_none_or(|t| t.is_empty() || t.contains(&0))
            {
                return Err("symlink target is empty or has a NUL byte".into());
            }
        }
        NodeKind::Hardlink => {
            let t = target.as_deref().unwrap_or_default();
            check_path(t).map_err(|e| format!("hard link target: {e}"))?;
        }
        NodeKind::File | NodeKind::Dir => {}
    }
    Ok(Node {
        id: raw.id,
        path: raw.path,
        kind,
        mode: fit(raw.mode, "mode")?,
        uid: fit(raw.uid, "owner")?,
        gid: fit(raw.gid, "group")?,
        size,
        mtime_ns: raw.mtime_ns,
        target,
    })
}

/// What the driver found at an entry's parent path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// The entry sits directly in the restore root.
    Root,
    /// A directory entry this restore created.
    Dir,
    /// A snapshot entry of another kind (a symlink, a file) that this restore accepted.
    NotDir(NodeKind),
    /// Nothing this restore created: refused, failed, or not in the snapshot.
    Absent,
}

/// Where a hard link's first name is, as far as the plan's first pass is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFirst {
    /// Inside the selection: linked in the links pass, once every file is written.
    Inside,
    /// Outside the selection but a regular file of the snapshot: restored as a copy.
    Outside { node: i64, size: u64 },
    /// Outside the selection and not a regular file of the snapshot.
    NotAFile,
}

/// What restore does with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Dir,
    /// A regular file whose content is that of node `data_node`.
    File {
        data_node: i64,
        size: u64,
    },
    /// Created in the links pass, after all file data.
    Symlink,
    /// Linked in the links pass, if its first name is a file this restore wrote.
    Hardlink,
    Refuse(String),
}

/// Decides one entry given its parent and, for a hard link, where its first name is.
pub fn decide(node: &Node, parent: Parent, link: Option<LinkFirst>) -> Decision {
    match parent {
        Parent::Root | Parent::Dir => {}
        Parent::NotDir(kind) => {
            return Decision::Refuse(format!(
                "its parent is a {} in the snapshot, not a directory",
                kind.as_str()
            ));
        }
        Parent::Absent => {
            return Decision::Refuse("its parent is not a directory this restore made".into());
        }
    }
    match node.kind {
        NodeKind::Dir => Decision::Dir,
        NodeKind::File => Decision::File {
            data_node: node.id,
            size: node.size,
        },
        NodeKind::Symlink => Decision::Symlink,
        NodeKind::Hardlink => match link {
            Some(LinkFirst::Inside) => Decision::Hardlink,
            Some(LinkFirst::Outside { node, size }) => Decision::File {
                data_node: node,
                size,
            },
            Some(LinkFirst::NotAFile) | None => {
                Decision::Refuse("hard link to something that is not a regular file".into())
            }
        },
    }
}

/// One file's chunk list entry, as the data check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub offset: i64,
    /// `None` when the chunk has no location (no `chunks` row or no `blobs` row).
    pub ulen: Option<i64>,
    pub id_len: usize,
}

/// Checks, chunk by chunk, that a file's chunks tile it exactly: each starts where the
/// previous ended, ids are 32 bytes, every chunk has a stored location, and the sum is
/// the file size. A file that fails is restored without content and reported damaged,
/// so no write ever lands outside its recorded size.
#[derive(Debug, Default)]
pub struct Tiling {
    at: u64,
    seq: u64,
}

impl Tiling {
    pub fn push(&mut self, c: ChunkRef) -> Result<(), String> {
        let seq = self.seq;
        self.seq += 1;
        match c.id_len {
            32 => {}
            // Format 4: a number that is no chunk's row.
            0 => return Err(format!("chunk {seq} has no id")),
            n => return Err(format!("chunk {seq} has a {n}-byte id")),
        }
        let Some(ulen) = c.ulen else {
            return Err(format!("chunk {seq} has no stored location"));
        };
        if u64::try_from(c.offset).ok() != Some(self.at) {
            return Err(format!(
                "chunk {seq} starts at {}, expected {}",
                c.offset, self.at
            ));
        }
        let len = u64::try_from(ulen).map_err(|_| format!("chunk {seq} has length {ulen}"))?;
        self.at = self
            .at
            .checked_add(len)
            .ok_or_else(|| format!("chunk {seq} ends past any file size"))?;
        Ok(())
    }

    pub fn finish(&self, size: u64) -> Result<(), String> {
        if self.at != size {
            return Err(format!(
                "its chunks hold {} bytes, its size is {size}",
                self.at
            ));
        }
        Ok(())
    }
}

/// [`Tiling`] over a whole list.
pub fn check_chunks(size: u64, chunks: &[ChunkRef]) -> Result<(), String> {
    let mut t = Tiling::default();
    for c in chunks {
        t.push(*c)?;
    }
    t.finish(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(path: &str, kind: &str, target: Option<&str>) -> RawNode {
        RawNode {
            id: 1,
            path: path.as_bytes().to_vec(),
            kind: kind.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 3,
            mtime_ns: 0,
            target: target.map(|t| t.as_bytes().to_vec()),
        }
    }

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
                check_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(check_path(b"etc/hosts").is_ok());
        assert!(check_path(b"we\xffird/na\nme").is_ok());
    }

    #[test]
    fn numbers_must_fit() {
        let mut r = raw("a", "file", None);
        r.uid = -1;
        assert!(node(r).unwrap_err().contains("owner"));
        let mut r = raw("a", "file", None);
        r.size = -5;
        assert!(node(r).unwrap_err().contains("size"));
        let mut r = raw("a", "file", None);
        r.mode = 1 << 40;
        assert!(node(r).unwrap_err().contains("mode"));
        assert!(node(raw("a", "fifo", None)).is_err());
        assert!(node(raw("a", "symlink", Some(""))).is_err());
        assert!(node(raw("a", "symlink", Some("/anywhere"))).is_ok());
        assert!(node(raw("a", "hardlink", Some("../x"))).is_err());
        assert!(node(raw("a", "hardlink", None)).is_err());
    }

    #[test]
    fn nothing_below_a_symlink_or_a_refused_entry() {
        let n = node(raw("a/b", "file", None)).unwrap();
        assert!(matches!(
            decide(&n, Parent::NotDir(NodeKind::Symlink), None),
            Decision::Refuse(r) if r.contains("symlink")
        ));
        assert!(matches!(
            decide(&n, Parent::Absent, None),
            Decision::Refuse(_)
        ));
        assert_eq!(
            decide(&n, Parent::Dir, None),
            Decision::File {
                data_node: 1,
                size: 3
            }
        );
        let d = node(raw("a/b", "dir", None)).unwrap();
        assert_eq!(decide(&d, Parent::Root, None), Decision::Dir);
    }

    #[test]
    fn hard_links_only_to_files() {
        let l = node(raw("a/l", "hardlink", Some("a/f"))).unwrap();
        assert_eq!(
            decide(&l, Parent::Dir, Some(LinkFirst::Inside)),
            Decision::Hardlink
        );
        assert_eq!(
            decide(
                &l,
                Parent::Dir,
                Some(LinkFirst::Outside { node: 7, size: 9 })
            ),
            Decision::File {
                data_node: 7,
                size: 9
            }
        );
        assert!(matches!(
            decide(&l, Parent::Dir, Some(LinkFirst::NotAFile)),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn chunk_lists_must_tile_the_file() {
        let c = |offset, ulen| ChunkRef {
            offset,
            ulen: Some(ulen),
            id_len: 32,
        };
        assert!(check_chunks(10, &[c(0, 4), c(4, 6)]).is_ok());
        assert!(check_chunks(0, &[]).is_ok());
        assert!(check_chunks(11, &[c(0, 4), c(4, 6)]).is_err());
        assert!(check_chunks(10, &[c(0, 4), c(5, 6)]).is_err());
        assert!(check_chunks(10, &[c(-4, 4), c(0, 10)]).is_err());
        assert!(check_chunks(u64::MAX, &[c(0, i64::MAX), c(i64::MAX, i64::MAX)]).is_err());
        let mut short = c(0, 10);
        short.id_len = 31;
        assert!(check_chunks(10, &[short]).is_err());
        let mut lost = c(0, 10);
        lost.ulen = None;
        assert!(check_chunks(10, &[lost]).is_err());
    }

    #[test]
    fn selections() {
        let all = Selection::all(Path::new("/r"));
        assert_eq!(all.dest_of(b"etc/hosts").unwrap(), b"etc/hosts");
        assert!(all.is_top(b"etc") && !all.is_top(b"etc/hosts"));
        let one = Selection::one("/etc/hosts", Path::new("/nonexistent/out.txt"));
        assert_eq!(one.root, PathBuf::from("/nonexistent"));
        assert_eq!(one.dest_of(b"etc/hosts").unwrap(), b"out.txt");
        assert!(one.dest_of(b"etc/hostsx").is_none());
        let t = tempfile::tempdir().unwrap();
        let into = Selection::one("etc/ssh", t.path());
        assert_eq!(into.dest_of(b"etc/ssh/key").unwrap(), b"ssh/key");
        assert!(into.is_top(b"etc/ssh") && !into.is_top(b"etc/ssh/key"));
        assert!(into.contains(b"etc/ssh/key") && !into.contains(b"etc/sshd"));
        let (lo, hi) = into.below();
        assert!(lo.as_slice() < &b"etc/ssh/\xff"[..] && &b"etc/ssh/\xff"[..] < hi.as_slice());
        assert!(&b"etc/ssh-x"[..] < lo.as_slice() && &b"etc/sshd"[..] > hi.as_slice());
    }
}
