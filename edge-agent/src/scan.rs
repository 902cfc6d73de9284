//! Walking the source tree in a deterministic (byte-sorted) order, honouring excludes.
//! Memory is bounded by the directory depth times the widest directory, never by the
//! size of the tree.

use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Exclude patterns:
/// - `*.log` (no `/`): matches the entry's name at any depth;
/// - `/var/cache` (leading `/`): anchored, matches the absolute path;
/// - `cache/*.tmp` (a `/` inside): matches the end of the path at any depth.
///
/// `*` stays within one path component, `**` crosses them. A matched directory is
/// skipped with everything below it.
#[derive(Debug, Clone)]
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in patterns {
            let p = p.trim_end_matches('/');
            if p.is_empty() {
                return Err("empty pattern".into());
            }
            let (set, pat) = if !p.contains('/') {
                (&mut names, p.to_string())
            } else if p.starts_with('/') {
                (&mut paths, p.to_string())
            } else {
                (&mut paths, format!("**/{p}"))
            };
            let glob = GlobBuilder::new(&pat)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("{p:?}: {e}"))?;
            set.add(glob);
        }
        Ok(Excludes {
            names: names.build().map_err(|e| e.to_string())?,
            paths: paths.build().map_err(|e| e.to_string())?,
        })
    }

    pub fn is_excluded(&self, abs: &Path) -> bool {
        abs.file_name().is_some_and(|n| self.names.is_match(n)) || self.paths.is_match(abs)
    }
}

/// One entry found by the walk; `meta` is from `lstat`.
pub struct Entry {
    pub path: PathBuf,
    pub meta: Metadata,
}

/// What the visitor tells the walk.
pub enum Visit {
    Continue,
    /// Do not descend into this directory.
    SkipChildren,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "source {path}: {source} (nothing was backed up; mark it `optional: true` in source_dirs if it may be absent)"
    )]
    Unavailable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no source is present (all are optional and missing): nothing to back up")]
    NonePresent,
}

/// The roots a backup walks, resolved, and what the user should hear about them.
#[derive(Debug, Default)]
pub struct Roots {
    pub paths: Vec<PathBuf>,
    pub notes: Vec<String>,
}

/// Resolves configured sources to real paths (symlinks on the way are followed, so the
/// snapshot holds what they point at) and checks that each can be read. A missing or
/// unreadable source fails the backup unless it is optional: an unmounted disk must not
/// produce an empty snapshot that becomes `latest`.
pub fn resolve_roots(sources: &[crate::config::SourceDir]) -> Result<Roots, SourceError> {
    let mut roots = Roots::default();
    for s in sources {
        let readable = std::fs::canonicalize(&s.path).and_then(|real| {
            if real.is_dir() {
                std::fs::read_dir(&real)?;
            } else {
                std::fs::File::open(&real)?;
            }
            Ok(real)
        });
        match readable {
            Ok(real) => {
                if real != s.path {
                    roots.notes.push(format!(
                        "note: source {} resolves to {} (a symlink on the way); backing up {}",
                        s.path.display(),
                        real.display(),
                        real.display()
                    ));
                }
                roots.paths.push(real);
            }
            Err(e) if s.optional => roots.notes.push(format!(
                "note: optional source {} is not available ({e}); skipped",
                s.path.display()
            )),
            Err(source) => {
                return Err(SourceError::Unavailable {
                    path: s.path.clone(),
                    source,
                });
            }
        }
    }
    if roots.paths.is_empty() {
        return Err(SourceError::NonePresent);
    }
    Ok(roots)
}

/// Keeps only roots that are not inside another root, sorted.
pub fn normalize_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut r: Vec<PathBuf> = roots.iter().map(|p| p.components().collect()).collect();
    r.sort();
    r.dedup();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in r {
        if !out.iter().any(|o| p.starts_with(o)) {
            out.push(p);
        }
    }
    out
}

/// Walks `roots` depth-first in byte order. Ancestors of each root are visited first
/// (once), so their metadata is restored too. Errors on single entries go to `warn` and
/// the walk goes on; an error returned by `visit` stops it.
pub fn walk<E>(
    roots: &[PathBuf],
    excludes: &Excludes,
    mut visit: impl FnMut(Entry) -> Result<Visit, E>,
    mut warn: impl FnMut(&Path, std::io::Error),
) -> Result<(), E> {
    let mut seen_ancestors: Vec<PathBuf> = Vec::new();
    for root in normalize_roots(roots) {
        for anc in root
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if anc.as_os_str().len() <= 1 || seen_ancestors.iter().any(|s| s == anc) {
                continue;
            }
            seen_ancestors.push(anc.to_path_buf());
            match std::fs::symlink_metadata(anc) {
                Ok(meta) => {
                    visit(Entry {
                        path: anc.to_path_buf(),
                        meta,
                    })?;
                }
                Err(e) => warn(anc, e),
            }
        }
        walk_tree(&root, excludes, &mut visit, &mut warn)?;
    }
    Ok(())
}

/// Walks `root` and everything below it (not its ancestors), depth-first in byte order.
pub fn walk_tree<E>(
    root: &Path,
    excludes: &Excludes,
    visit: &mut impl FnMut(Entry) -> Result<Visit, E>,
    warn: &mut impl FnMut(&Path, std::io::Error),
) -> Result<(), E> {
    // A stack of sorted-descending name lists, one per open directory.
    let mut stack: Vec<(PathBuf, Vec<OsString>)> = Vec::new();
    let mut pending = Some(root.to_path_buf());
    loop {
        if let Some(path) = pending.take() {
            if path != root && excludes.is_excluded(&path) {
                // excluded: neither visited nor descended
            } else {
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) => {
                        let is_dir = meta.is_dir();
                        let descend = matches!(
                            visit(Entry {
                                path: path.clone(),
                                meta
                            })?,
                            Visit::Continue
                        );
                        if is_dir && descend {
                            match read_sorted(&path) {
                                Ok(names) => stack.push((path, names)),
                                Err(e) => warn(&path, e),
                            }
                        }
                    }
                    Err(e) => warn(&path, e),
                }
            }
        }
        let Some((dir, names)) = stack.last_mut() else {
            break;
        };
        match names.pop() {
            Some(name) => pending = Some(dir.join(name)),
            None => {
                stack.pop();
            }
        }
    }
    Ok(())
}

/// The names in `dir`, sorted descending (pop from the end for byte order).
pub fn read_sorted(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()?;
    // Descending, so popping from the end yields ascending byte order.
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(names)
}

/// The stored form of an absolute path: its bytes without the leading `/`.
pub fn relative_bytes(abs: &Path) -> &[u8] {
    let b = abs.as_os_str().as_bytes();
    b.strip_prefix(b"/").unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_semantics() {
        let ex =
            Excludes::new(&["*.log".into(), "/data/cache".into(), "tmp/**/*.o".into()]).unwrap();
        assert!(ex.is_excluded(Path::new("/a/b/x.log")));
        assert!(!ex.is_excluded(Path::new("/a/b.log/x")));
        assert!(ex.is_excluded(Path::new("/data/cache")));
        assert!(!ex.is_excluded(Path::new("/other/data/cache")));
        assert!(ex.is_excluded(Path::new("/x/tmp/a/b/c.o")));
        assert!(!ex.is_excluded(Path::new("/x/tmp.o")));
        assert!(Excludes::new(&["[".into()]).is_err());
    }

    #[test]
    fn nested_roots_collapse() {
        let r = normalize_roots(&["/etc/ssh".into(), "/etc".into(), "/home/a/".into()]);
        assert_eq!(r, vec![PathBuf::from("/etc"), PathBuf::from("/home/a")]);
    }

    #[test]
    fn walk_is_sorted_and_skips_excluded() {
        let t = tempfile::tempdir().unwrap();
        for p in ["b/2", "b/1", "a", "skip/x", "c.log"] {
            let p = t.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let ex = Excludes::new(&["skip".into(), "*.log".into()]).unwrap();
        let mut seen = Vec::new();
        walk::<()>(
            &[t.path().to_path_buf()],
            &ex,
            |e| {
                seen.push(e.path);
                Ok(Visit::Continue)
            },
            |p, e| panic!("{p:?}: {e}"),
        )
        .unwrap();
        let under: Vec<String> = seen
            .iter()
            .filter_map(|p| p.strip_prefix(t.path()).ok())
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(under, ["", "a", "b", "b/1", "b/2"]);
    }
}
