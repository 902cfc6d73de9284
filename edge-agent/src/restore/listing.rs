//! `vaultik ls`: the entries of a snapshot at or below a path, read from its metadata
//! database (hostile input: values are read tolerantly and names are escaped by the
//! caller before they reach a terminal).

use rusqlite::{Connection, params};

use super::plan::RawNode;
use super::raw_node;
use crate::error::{Error, Result};

/// An entry as stored (`path` relative to `/`); `target` is a symlink's target or a
/// hard link's first name.
pub type Entry = RawNode;

/// The path as the user would type it for `fetch`.
pub fn shown_path(e: &Entry) -> String {
    format!("/{}", String::from_utf8_lossy(&e.path))
}

const COLUMNS: &str = "id, path, kind, mode, uid, gid, size, mtime_ns, target";

/// Calls `each` for the entry at `typed` if it is not a directory, else for the
/// directory's children (its whole subtree with `recursive`), in path order. An empty
/// path or `/` lists the top of the snapshot. Returns how many entries were listed.
pub fn list(
    conn: &Connection,
    typed: &str,
    recursive: bool,
    mut each: impl FnMut(&Entry) -> std::io::Result<()>,
) -> Result<u64> {
    let under = typed.trim_matches('/').as_bytes().to_vec();
    let io = |e| Error::io("writing the listing", "stdout", e);
    if !under.is_empty() {
        let own = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM nodes WHERE CAST(path AS BLOB) = ?1"
            ))?
            .query_map([&under], raw_node)?
            .next()
            .transpose()?;
        if let Some(e) = own.filter(|e| e.kind != "dir") {
            each(&e).map_err(io)?;
            return Ok(1);
        }
    }
    // Children are the paths in [lo, hi) (all paths for the top); without `recursive`,
    // only those with no further `/` after `lo`.
    let (lo, hi) = if under.is_empty() {
        (Vec::new(), vec![0xff; 1])
    } else {
        let mut lo = under.clone();
        lo.push(b'/');
        let mut hi = under.clone();
        hi.push(b'0');
        (lo, hi)
    };
    // Paths compare as bytes whatever their storage class: SQLite sorts TEXT before
    // BLOB, and a forged TEXT path must not hide from `ls` when restore would write it.
    let sql = format!(
        "SELECT {COLUMNS} FROM nodes WHERE CAST(path AS BLOB) >= ?1
         AND (CAST(path AS BLOB) < ?2 OR ?3)
         AND (?4 OR instr(substr(CAST(path AS BLOB), length(?1) + 1), X'2F') = 0)
         ORDER BY CAST(path AS BLOB)"
    );
    let mut q = conn.prepare(&sql)?;
    let mut rows = q.query(params![lo, hi, under.is_empty(), recursive])?;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        each(&raw_node(r)?).map_err(io)?;
        n += 1;
    }
    if n == 0 && !under.is_empty() && !is_dir(conn, &under)? {
        return Err(Error::PathNotInSnapshot(typed.to_string()));
    }
    Ok(n)
}

fn is_dir(conn: &Connection, path: &[u8]) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM nodes WHERE CAST(path AS BLOB) = ?1 AND kind = 'dir')",
        [path],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&crate::snapshot::metadata_schema())
            .unwrap();
        let rows = [
            ("srv", "dir"),
            ("srv/a", "dir"),
            ("srv/a/x.txt", "file"),
            ("srv/a/y", "dir"),
            ("srv/a/y/z", "file"),
            ("srv/a0", "file"),
            ("srv/b.txt", "file"),
            ("srv/empty", "dir"),
        ];
        for (i, (p, k)) in rows.iter().enumerate() {
            c.execute(
                "INSERT INTO nodes (id, path, kind, mode, uid, gid, size, mtime_ns, dev, ino, ctime_ns)
                 VALUES (?1, ?2, ?3, 420, 0, 0, 1, 0, 0, 0, 0)",
                params![i as i64 + 1, p.as_bytes(), k],
            )
            .unwrap();
        }
        c
    }

    fn names(c: &Connection, path: &str, recursive: bool) -> Result<Vec<String>> {
        let mut out = Vec::new();
        list(c, path, recursive, |e| {
            out.push(shown_path(e));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn lists_children_subtrees_and_single_files() {
        let c = db();
        assert_eq!(names(&c, "/", false).unwrap(), ["/srv"]);
        assert_eq!(
            names(&c, "/srv/", false).unwrap(),
            ["/srv/a", "/srv/a0", "/srv/b.txt", "/srv/empty"]
        );
        assert_eq!(
            names(&c, "srv/a", true).unwrap(),
            ["/srv/a/x.txt", "/srv/a/y", "/srv/a/y/z"]
        );
        assert_eq!(names(&c, "/srv/a/x.txt", false).unwrap(), ["/srv/a/x.txt"]);
        assert!(names(&c, "/srv/empty", false).unwrap().is_empty());
        assert_eq!(names(&c, "", true).unwrap().len(), 8);
    }

    #[test]
    fn forged_text_paths_are_listed_like_blobs() {
        let c = db();
        c.execute(
            "INSERT INTO nodes (id, path, kind, mode, uid, gid, size, mtime_ns, dev, ino, ctime_ns)
             VALUES (99, 'srv/a/hidden', 'file', 420, 0, 0, 1, 0, 0, 0, 0)",
            [],
        )
        .unwrap();
        assert_eq!(
            names(&c, "/srv/a", false).unwrap(),
            ["/srv/a/hidden", "/srv/a/x.txt", "/srv/a/y"]
        );
        assert_eq!(
            names(&c, "/srv/a/hidden", false).unwrap(),
            ["/srv/a/hidden"]
        );
    }

    #[test]
    fn a_missing_path_is_named_as_typed() {
        let err = names(&db(), "/srv/nope", false).unwrap_err();
        assert_eq!(err.to_string(), "/srv/nope is not in the snapshot");
    }
}
