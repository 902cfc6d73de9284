//! What the commands print: tables, listings and summaries.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use edge_agent::backup::Outcome;
use edge_agent::restore::listing::{Entry, shown_path};
use edge_agent::restore::printable;
use edge_agent::snapshot::{Manifest, short_id_len};

/// Ids in tables are at least this long (and longer where two would look alike).
const SHORT_ID: usize = 8;

/// "1 file", "2 files".
pub fn count(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn snapshots(list: &[Manifest], out: &mut dyn Write) -> io::Result<()> {
    let ids: Vec<&str> = list.iter().map(|m| m.id.as_str()).collect();
    let w = short_id_len(&ids, SHORT_ID).max(2);
    writeln!(
        out,
        "{:<w$}  {:<24}  {:<16}  {:>8}  {:>10}  paths",
        "id", "time", "host", "files", "size"
    )?;
    for m in list {
        writeln!(
            out,
            "{:<w$}  {:<24}  {:<16}  {:>8}  {:>10}  {}",
            m.id.get(..w).unwrap_or(&m.id),
            printable(&m.time),
            printable(&m.hostname),
            m.summary.files,
            human(m.summary.bytes),
            printable(&m.source_dirs.join(" "))
        )?;
    }
    if list.len() > 1 {
        writeln!(out, "{} snapshots", list.len())?;
    }
    Ok(())
}

/// One `ls` line: the path (directories end in `/`), or with `long` the type and
/// mode, owner, size and time before it.
pub fn entry(e: &Entry, long: bool, out: &mut dyn Write) -> io::Result<()> {
    let mut name = printable(&shown_path(e));
    match (e.kind.as_str(), &e.target) {
        ("dir", _) => name.push('/'),
        ("symlink", Some(t)) => {
            name = format!("{name} -> {}", printable(&link_target(&e.kind, t)));
        }
        ("hardlink", Some(t)) => {
            name = format!("{name} => {}", printable(&link_target(&e.kind, t)));
        }
        _ => {}
    }
    if !long {
        return writeln!(out, "{name}");
    }
    writeln!(
        out,
        "{}  {:>6} {:>6}  {:>12}  {}  {name}",
        mode_string(&e.kind, e.mode),
        e.uid,
        e.gid,
        e.size,
        time(e.mtime_ns),
    )
}

/// `ls --json`: one object per entry, written as the listing streams.
pub struct JsonList<'a> {
    out: &'a mut dyn Write,
    first: bool,
}

impl<'a> JsonList<'a> {
    pub fn new(out: &'a mut dyn Write) -> io::Result<Self> {
        write!(out, "[")?;
        Ok(JsonList { out, first: true })
    }

    pub fn push(&mut self, e: &Entry) -> io::Result<()> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            path: String,
            #[serde(rename = "type")]
            kind: &'a str,
            mode: String,
            uid: i64,
            gid: i64,
            size: i64,
            mtime: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            target: Option<String>,
        }
        let v = serde_json::to_string(&Json {
            path: shown_path(e),
            kind: &e.kind,
            mode: format!("{:o}", e.mode & 0o7777),
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: iso_time(e.mtime_ns),
            target: e.target.as_ref().map(|t| link_target(&e.kind, t)),
        })?;
        let sep = if self.first { "\n" } else { ",\n" };
        self.first = false;
        write!(self.out, "{sep}  {v}")
    }

    pub fn finish(self) -> io::Result<()> {
        writeln!(self.out, "{}]", if self.first { "" } else { "\n" })
    }
}

/// `drwxr-xr-x` for a kind and a mode.
fn mode_string(kind: &str, mode: i64) -> String {
    let t = match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "hardlink" => 'h',
        "file" => '-',
        _ => '?',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// A symlink's target as stored; a hard link's first name as `fetch` takes it.
fn link_target(kind: &str, t: &[u8]) -> String {
    let t = String::from_utf8_lossy(t);
    if kind == "hardlink" {
        format!("/{t}")
    } else {
        t.into_owned()
    }
}

/// A stored time as RFC 3339 UTC, seconds; `None` before 1970 (or absurd).
fn iso_time(ns: i64) -> Option<String> {
    u64::try_from(ns)
        .ok()
        .and_then(|ns| UNIX_EPOCH.checked_add(Duration::from_nanos(ns)))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn time(ns: i64) -> String {
    iso_time(ns).unwrap_or_else(|| "????-??-??T??:??:??Z".to_string())
}

/// The lines after a backup.
pub fn backup_summary(o: &Outcome, dest: &str) -> String {
    let s = &o.summary;
    format!(
        "Files: {} new, {} changed, {} unmodified; {}, {}\n\
         Added: {} in {}, {} uploaded in {}; metadata {}\n\
         snapshot {} saved to {dest}: {}, {} in {:.1}s",
        s.files_new,
        s.files_changed,
        s.files_unmodified,
        count(s.dirs, "dir"),
        count(s.symlinks + s.hardlinks, "link"),
        human(s.new_bytes),
        count(s.new_chunks, "new chunk"),
        human(s.uploaded_bytes),
        count(s.new_blobs, "blob"),
        human(s.metadata_bytes),
        o.snapshot,
        count(s.files, "file"),
        human(s.bytes),
        o.elapsed.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_times_read_like_ls() {
        assert_eq!(mode_string("dir", 0o40755), "drwxr-xr-x");
        assert_eq!(mode_string("file", 0o100640), "-rw-r-----");
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(-1), "????-??-??T??:??:??Z");
        assert_eq!(time(i64::MAX), "2262-04-11T23:47:16Z");
    }

    #[test]
    fn names_cannot_drive_or_fool_the_terminal() {
        let shown = printable("a\u{1b}[2J\u{202E}txt.exe\u{200B}\u{9b}");
        assert_eq!(shown, "a\\u{1b}[2J\\u{202e}txt.exe\\u{200b}\\u{9b}");
    }
}
