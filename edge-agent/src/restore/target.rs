//! The restore target: a directory that restore opened itself, and every path below it
//! reached component by component with `openat(O_NOFOLLOW)`. No path component is ever
//! resolved through a symlink, so nothing a snapshot says can make restore create,
//! change or link anything outside the target, whatever is already in it.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

/// Errors carry the path below the target they concern.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct TargetError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T> = std::result::Result<T, TargetError>;

/// A directory handle plus a one-entry cache of the last parent directory opened.
pub struct Target {
    root: OwnedFd,
    root_path: PathBuf,
    cached: Option<(Vec<u8>, OwnedFd)>,
}

const DIR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn name_of(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

impl Target {
    /// Creates `root` if needed (it is the user's choice, so symlinks in it are followed)
    /// and opens it.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| TargetError {
            what: "creating directory",
            path: root.to_path_buf(),
            source: e,
        })?;
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| TargetError {
            what: "opening directory",
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Target {
            root: fd,
            root_path: root.to_path_buf(),
            cached: None,
        })
    }

    /// The same root, opened again for another thread.
    pub fn reopen(&self) -> Result<Self> {
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.root, 0)
            .map_err(|e| self.err("opening", b"", e))?;
        Ok(Target {
            root: fd,
            root_path: self.root_path.clone(),
            cached: None,
        })
    }

    /// The absolute path of `rel`, for messages.
    pub fn display(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root_path.clone()
        } else {
            self.root_path.join(OsStr::from_bytes(rel))
        }
    }

    fn err(&self, what: &'static str, rel: &[u8], e: Errno) -> TargetError {
        TargetError {
            what,
            path: self.display(rel),
            source: e.into(),
        }
    }

    /// Opens the directory `rel` (empty: the root) without following any symlink.
    fn dir(&mut self, rel: &[u8]) -> Result<&OwnedFd> {
        let hit = self.cached.as_ref().is_some_and(|(p, _)| p == rel);
        if !hit {
            let mut fd = rustix::io::fcntl_dupfd_cloexec(&self.root, 0)
                .map_err(|e| self.err("opening", b"", e))?;
            if !rel.is_empty() {
                for comp in rel.split(|b| *b == b'/') {
                    fd = rustix::fs::openat(&fd, OsStr::from_bytes(comp), DIR_FLAGS, Mode::empty())
                        .map_err(|e| self.err("opening directory", rel, e))?;
                }
            }
            self.cached = Some((rel.to_vec(), fd));
        }
        match &self.cached {
            Some((_, fd)) => Ok(fd),
            None => Err(self.err("opening directory", rel, Errno::NOENT)),
        }
    }

    /// Removes a non-directory at `name` so that a fresh entry can take its place.
    fn clear(&mut self, rel: &[u8]) -> Result<()> {
        let (parent, name) = name_of(rel);
        let fd = self.dir(parent)?.try_clone().map_err(|e| TargetError {
            what: "opening directory",
            path: PathBuf::from(OsStr::from_bytes(parent)),
            source: e,
        })?;
        let st = rustix::fs::statat(&fd, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("inspecting", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(self.err("replacing", rel, Errno::ISDIR));
        }
        rustix::fs::unlinkat(&fd, OsStr::from_bytes(name), AtFlags::empty())
            .map_err(|e| self.err("replacing", rel, e))
    }

    /// Creates directory `rel` (mode 0700 until metadata is applied), or accepts an
    /// existing directory there; anything else there is an error.
    pub fn mkdir(&mut self, rel: &[u8]) -> Result<()> {
        let (parent, name) = name_of(rel);
        let fd = self.dir(parent)?;
        match rustix::fs::mkdirat(fd, OsStr::from_bytes(name), Mode::RWXU) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(fd, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.err("inspecting", rel, e))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    Ok(())
                } else {
                    Err(self.err("creating directory", rel, Errno::EXIST))
                }
            }
            Err(e) => Err(self.err("creating directory", rel, e)),
        }
    }

    /// Creates regular file `rel`, empty and open for writing. An existing non-directory
    /// there is replaced, never written through (it may be a link).
    pub fn create(&mut self, rel: &[u8]) -> Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let (parent, name) = name_of(rel);
        let make = |t: &mut Self| {
            rustix::fs::openat(
                t.dir(parent)?,
                OsStr::from_bytes(name),
                flags,
                Mode::RUSR | Mode::WUSR,
            )
            .map_err(|e| t.err("creating", rel, e))
        };
        let fd = match make(self) {
            Err(e) if e.source.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => {
                self.clear(rel)?;
                make(self)
            }
            other => other,
        }?;
        Ok(File::from(fd))
    }

    /// Creates regular file `rel` of `size` bytes (holes until written).
    pub fn create_file(&mut self, rel: &[u8], size: u64) -> Result<()> {
        let f = self.create(rel)?;
        self.set_len(&f, rel, size)
    }

    /// Sizes `f`, the file `rel`, to `size` bytes; what was not written stays a hole.
    pub fn set_len(&self, f: &File, rel: &[u8], size: u64) -> Result<()> {
        rustix::fs::ftruncate(f, size).map_err(|e| self.err("sizing", rel, e))
    }

    /// Opens regular file `rel` for writing its content.
    pub fn open_file(&mut self, rel: &[u8]) -> Result<File> {
        let (parent, name) = name_of(rel);
        let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(
            self.dir(parent)?,
            OsStr::from_bytes(name),
            flags,
            Mode::empty(),
        )
        .map_err(|e| self.err("writing", rel, e))?;
        Ok(File::from(fd))
    }

    pub fn symlink(&mut self, rel: &[u8], target: &[u8]) -> Result<()> {
        let (parent, name) = name_of(rel);
        let make = |t: &mut Self| {
            rustix::fs::symlinkat(
                OsStr::from_bytes(target),
                t.dir(parent)?,
                OsStr::from_bytes(name),
            )
            .map_err(|e| t.err("creating symlink", rel, e))
        };
        match make(self) {
            Err(e) if e.source.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => {
                self.clear(rel)?;
                make(self)
            }
            other => other,
        }
    }

    /// Links `rel` to `first`, which must be a regular file below the target.
    pub fn hard_link(&mut self, rel: &[u8], first: &[u8]) -> Result<()> {
        let (fparent, fname) = name_of(first);
        let from = self.dir(fparent)?.try_clone().map_err(|e| TargetError {
            what: "opening directory",
            path: self.display(fparent),
            source: e,
        })?;
        let st = rustix::fs::statat(&from, OsStr::from_bytes(fname), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("inspecting", first, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.err("linking to", first, Errno::INVAL));
        }
        let (parent, name) = name_of(rel);
        let link = |t: &mut Self| {
            rustix::fs::linkat(
                &from,
                OsStr::from_bytes(fname),
                t.dir(parent)?,
                OsStr::from_bytes(name),
                AtFlags::empty(),
            )
            .map_err(|e| t.err("linking", rel, e))
        };
        match link(self) {
            Err(e) if e.source.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => {
                self.clear(rel)?;
                link(self)
            }
            other => other,
        }
    }

    /// Applies owner, mode, mtime and extended attributes to `rel`. Returns the parts
    /// that could not be applied, as warnings.
    pub fn apply(&mut self, rel: &[u8], m: &Attrs<'_>) -> Vec<String> {
        let shown = self.display(rel).display().to_string();
        let (parent, name) = name_of(rel);
        let pfd = match self.dir(parent) {
            Ok(fd) => fd,
            Err(e) => return vec![e.to_string()],
        };
        let name = OsStr::from_bytes(name);
        if m.symlink {
            let (times, owner) = (m.times(), m.owner());
            let mut warn = Vec::new();
            // Symlink xattrs and mode are not settable on Linux for ordinary namespaces.
            if let Err(e) =
                rustix::fs::chownat(pfd, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                && e != Errno::PERM
            {
                warn.push(format!("{shown}: owner: {}", std::io::Error::from(e)));
            }
            if let Err(e) = rustix::fs::utimensat(pfd, name, &times, AtFlags::SYMLINK_NOFOLLOW) {
                warn.push(format!("{shown}: mtime: {}", std::io::Error::from(e)));
            }
            return warn;
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        match rustix::fs::openat(pfd, name, flags, Mode::empty()) {
            Ok(fd) => self.apply_open(&fd, rel, m),
            Err(e) => vec![format!("{shown}: {}", std::io::Error::from(e))],
        }
    }

    /// Applies owner, extended attributes, mode and mtime to `fd`, the open file `rel`.
    /// Returns the parts that could not be applied, as warnings.
    pub fn apply_open(&self, fd: impl AsFd, rel: &[u8], m: &Attrs<'_>) -> Vec<String> {
        let mut warn = Vec::new();
        let shown = || self.display(rel).display().to_string();
        let (times, owner) = (m.times(), m.owner());
        // Owner first: a change of owner drops capabilities that xattrs then restore.
        match rustix::fs::fchown(&fd, owner.0, owner.1) {
            // Only root may give files away; a user restoring their own files keeps them.
            Ok(()) | Err(Errno::PERM) => {}
            Err(e) => warn.push(format!("{}: owner: {}", shown(), std::io::Error::from(e))),
        }
        for (k, v) in m.xattrs {
            if let Err(e) = rustix::fs::fsetxattr(
                &fd,
                OsStr::from_bytes(k),
                v,
                rustix::fs::XattrFlags::empty(),
            ) {
                warn.push(format!(
                    "{}: extended attribute {}: {}",
                    shown(),
                    String::from_utf8_lossy(k),
                    std::io::Error::from(e)
                ));
            }
        }
        if let Err(e) = rustix::fs::fchmod(&fd, Mode::from_raw_mode(m.mode & 0o7777)) {
            warn.push(format!("{}: mode: {}", shown(), std::io::Error::from(e)));
        }
        if let Err(e) = rustix::fs::futimens(&fd, &times) {
            warn.push(format!("{}: mtime: {}", shown(), std::io::Error::from(e)));
        }
        warn
    }
}

/// What `Target::apply` sets.
pub struct Attrs<'a> {
    pub symlink: bool,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl Attrs<'_> {
    /// Access and modification time, both the stored mtime.
    fn times(&self) -> Timestamps {
        let mtime = Timespec {
            tv_sec: self.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: self.mtime_ns.rem_euclid(1_000_000_000),
        };
        Timestamps {
            last_access: mtime,
            last_modification: mtime,
        }
    }

    fn owner(&self) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
        (
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_walks_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
        let mut tg = Target::open(&root).unwrap();
        assert!(tg.create_file(b"a/x", 1).is_err());
        assert!(tg.mkdir(b"a/d").is_err());
        assert!(tg.symlink(b"a/s", b"/etc").is_err());
        assert!(tg.mkdir(b"a").is_err(), "a symlink is not a directory");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A file at the symlink's place replaces the link, not its target.
        tg.create_file(b"a", 3).unwrap();
        assert!(std::fs::symlink_metadata(root.join("a")).unwrap().is_file());
        assert!(outside.is_dir());
    }

    #[test]
    fn replaces_rather_than_writes_through_existing_links() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::hard_link(&victim, root.join("f")).unwrap();
        let mut tg = Target::open(&root).unwrap();
        tg.create_file(b"f", 0).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        tg.mkdir(b"d").unwrap();
        tg.create_file(b"d/g", 2).unwrap();
        tg.hard_link(b"h", b"d/g").unwrap();
        tg.symlink(b"s", b"d/g").unwrap();
        assert!(
            tg.hard_link(b"h2", b"s").is_err(),
            "links only to regular files"
        );
        assert_eq!(std::fs::metadata(root.join("h")).unwrap().len(), 2);
    }
}
