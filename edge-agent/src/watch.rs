//! Which directories changed between two backups, learned from inotify (through the
//! `notify` crate), so that a scheduled run lists only those ([`Scope::Changed`]).
//!
//! [`ChangeLog`] is the bookkeeping, free of I/O; [`Watcher`] feeds it. Anything that
//! can lose an event (the watcher not yet running, a queue overflow, a watch error, too
//! many directories) makes the next run scan everything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::backup::{Changes, Scope};

/// Directories with changes since the last [`ChangeLog::take`].
#[derive(Debug)]
pub struct ChangeLog {
    dirs: BTreeSet<PathBuf>,
    /// False while an event may have been missed since the last take.
    complete: bool,
    /// The roots a live watcher covers; empty until one starts (then every run
    /// scans everything).
    roots: Vec<PathBuf>,
    /// A digest of the mount table at the last take: a mount under a source makes no
    /// event.
    mounts: Option<blake3::Hash>,
    max_dirs: usize,
}

impl ChangeLog {
    /// Nothing is known before the watcher starts: the first take is a full scan.
    pub fn new(max_dirs: usize) -> Self {
        ChangeLog {
            dirs: BTreeSet::new(),
            complete: false,
            roots: Vec::new(),
            mounts: None,
            max_dirs,
        }
    }

    /// A watcher now covers `roots`; changes count from the next take.
    pub fn arm(&mut self, roots: Vec<PathBuf>) {
        self.lost();
        self.roots = roots;
    }

    /// The mount table now; a change since the last take loses the log.
    pub fn note_mounts(&mut self, digest: Option<blake3::Hash>) {
        if digest.is_none() || digest != self.mounts {
            self.lost();
        }
        self.mounts = digest;
    }

    /// Something happened at `path`: the directory that lists it changed.
    pub fn record(&mut self, path: &Path) {
        if !self.complete {
            return;
        }
        if let Some(parent) = path.parent() {
            self.dirs.insert(parent.to_path_buf());
        }
        if self.dirs.len() > self.max_dirs {
            self.lost();
        }
    }

    /// Events may have been missed.
    pub fn lost(&mut self) {
        self.complete = false;
        self.dirs.clear();
    }

    /// What the run starting now must look at; from now on changes count for the next.
    pub fn take(&mut self) -> Scope {
        let scope = if self.complete && !self.roots.is_empty() {
            Scope::Changed(Changes {
                roots: self.roots.clone(),
                dirs: std::mem::take(&mut self.dirs),
            })
        } else {
            Scope::Everything
        };
        self.complete = true;
        self.dirs.clear();
        scope
    }

    /// A run with `scope` did not finish: its changes are still to be backed up.
    pub fn give_back(&mut self, scope: Scope) {
        match scope {
            Scope::Everything => self.lost(),
            Scope::Changed(c) if self.complete => {
                self.dirs.extend(c.dirs);
                if self.dirs.len() > self.max_dirs {
                    self.lost();
                }
            }
            Scope::Changed(_) => {}
        }
    }
}

/// A change log shared between the watcher's thread and the scheduler.
pub type SharedLog = Arc<Mutex<ChangeLog>>;

/// Takes the scope for a run from a shared log (a poisoned lock means a full scan).
pub fn take(log: &SharedLog) -> Scope {
    let mounts = std::fs::read("/proc/self/mountinfo")
        .ok()
        .map(|t| blake3::hash(&t));
    log.lock().map_or(Scope::Everything, |mut l| {
        l.note_mounts(mounts);
        l.take()
    })
}

pub fn give_back(log: &SharedLog, scope: Scope) {
    if let Ok(mut l) = log.lock() {
        l.give_back(scope);
    }
}

/// Watches source trees and records their changes into a [`ChangeLog`].
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

impl Watcher {
    /// Watches every directory under `roots` (one inotify watch each).
    pub fn start(roots: &[PathBuf], log: SharedLog) -> Result<Self, notify::Error> {
        let sink = log.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(mut l) = sink.lock() else {
                return;
            };
            match res {
                Ok(e) if e.need_rescan() => l.lost(),
                // Closing a file written through a memory map is the only sign of it.
                Ok(e) if e.kind == EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    e.paths.iter().for_each(|p| l.record(p))
                }
                // Opening or reading a file (the backup itself does) changes nothing.
                Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
                Ok(e) => e.paths.iter().for_each(|p| l.record(p)),
                Err(_) => l.lost(),
            }
        };
        // A symlink to a directory of the tree would share its watch, and events
        // there would be reported under the link's path, which backups do not list.
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut inner = notify::RecommendedWatcher::new(handler, config)?;
        for root in roots {
            if let Err(e) = inner.watch(root, RecursiveMode::Recursive) {
                if let Ok(mut l) = log.lock() {
                    l.lost();
                }
                return Err(e);
            }
        }
        if let Ok(mut l) = log.lock() {
            l.arm(roots.to_vec());
        }
        Ok(Watcher { _inner: inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(scope: Scope) -> Vec<String> {
        match scope {
            Scope::Changed(c) => c.dirs.iter().map(|p| p.display().to_string()).collect(),
            Scope::Everything => vec!["*".into()],
        }
    }

    #[test]
    fn the_first_take_and_any_loss_mean_everything() {
        let mut log = ChangeLog::new(3);
        log.take();
        log.record(Path::new("/s/a/x"));
        assert_eq!(dirs(log.take()), ["*"], "no watcher: always everything");
        log.arm(vec!["/s".into()]);
        log.record(Path::new("/s/a/x"));
        assert_eq!(dirs(log.take()), ["*"], "nothing was watched before");
        log.record(Path::new("/s/a/x"));
        log.record(Path::new("/s/b"));
        assert_eq!(dirs(log.take()), ["/s", "/s/a"]);
        assert_eq!(dirs(log.take()), Vec::<String>::new(), "nothing since");
        log.record(Path::new("/s/a/x"));
        log.lost();
        log.record(Path::new("/s/c/x"));
        assert_eq!(dirs(log.take()), ["*"], "an overflow loses everything");
        for d in ["a", "b", "c", "d"] {
            log.record(&Path::new("/s").join(d).join("f"));
        }
        assert_eq!(dirs(log.take()), ["*"], "past the bound: a full scan");
    }

    #[test]
    fn a_failed_run_gives_its_changes_back() {
        let mut log = ChangeLog::new(10);
        log.arm(vec!["/s".into()]);
        log.take();
        log.record(Path::new("/s/a/x"));
        let taken = log.take();
        log.record(Path::new("/s/b/y"));
        log.give_back(taken);
        assert_eq!(dirs(log.take()), ["/s/a", "/s/b"]);
        log.give_back(Scope::Everything);
        assert_eq!(
            dirs(log.take()),
            ["*"],
            "a failed full scan is a full scan again"
        );
    }

    #[test]
    fn a_changed_mount_table_means_everything() {
        let mut log = ChangeLog::new(10);
        log.arm(vec!["/s".into()]);
        let [one, two] = [b"one", b"two"].map(|t| Some(blake3::hash(t)));
        log.note_mounts(one);
        log.take();
        log.record(Path::new("/s/a/x"));
        log.note_mounts(one);
        assert_eq!(dirs(log.take()), ["/s/a"]);
        log.record(Path::new("/s/a/x"));
        log.note_mounts(two);
        assert_eq!(dirs(log.take()), ["*"], "something was mounted");
        log.note_mounts(None);
        assert_eq!(dirs(log.take()), ["*"], "an unreadable mount table");
    }
}
