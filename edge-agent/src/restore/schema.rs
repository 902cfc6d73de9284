//! What a downloaded metadata database must look like before readers query it. Readers
//! query format 4's tables directly; older formats are first rewritten into them in the
//! private copy. Every query readers make joins on a key, so a schema that declares its
//! columns differently (SQLite cannot then search by key) is refused: it would turn
//! restore's joins into scans, quadratic in the number of files.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::snapshot::metadata_schema;

/// Only ordinary tables and indexes, as vaultik writes them: no views, no triggers, no
/// virtual tables, no tables of SQLite's own (planner statistics, in any letter case),
/// no generated columns. SQLite builds its schema from the `sql` text, so that is what
/// counts.
pub(super) fn check_objects(conn: &Connection, what: &str) -> Result<()> {
    let mut q = conn.prepare("SELECT type, name, sql FROM sqlite_schema")?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        let name: String = r.get(1)?;
        let sql: Option<String> = r.get(2)?;
        let sql = sql.unwrap_or_default().to_ascii_uppercase();
        let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let ordinary = match kind.as_str() {
            // Statistics steer the query planner, and vaultik never writes them. SQLite
            // finds its tables whatever the case of their names.
            "table" => {
                sql.starts_with("CREATE TABLE ")
                    && !name.to_ascii_lowercase().starts_with("sqlite_")
            }
            // Automatic indexes (for UNIQUE and PRIMARY KEY) have no SQL text.
            "index" => {
                sql.is_empty()
                    || sql.starts_with("CREATE INDEX ")
                    || sql.starts_with("CREATE UNIQUE INDEX ")
            }
            _ => false,
        };
        if !ordinary {
            let shown = match kind.as_str() {
                "table" if sql.contains("VIRTUAL") => "virtual table",
                "table" => "table of SQLite's own (planner statistics)",
                k => k,
            };
            return Err(Error::Damaged(format!(
                "{what} is not vaultik metadata: it holds a {shown} {name:?}"
            )));
        }
    }
    drop(rows);
    // Computed whenever a row is read or checked, with whatever work its expression
    // asks for.
    let generated: Option<String> = conn
        .query_row(
            "SELECT m.name FROM sqlite_schema m, pragma_table_xinfo(m.name) x
             WHERE m.type = 'table' AND x.hidden != 0 LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(table) = generated {
        return Err(Error::Damaged(format!(
            "{what} is not vaultik metadata: its table {table:?} has a generated column"
        )));
    }
    Ok(())
}

fn tables(conn: &Connection) -> rusqlite::Result<BTreeSet<String>> {
    conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table'
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )?
    .query_map([], |r| r.get::<_, String>(0))?
    .collect()
}

/// The SQL of each of `tables` and of its indexes, whitespace aside. SQLite builds its
/// whole view of a table from that text, which is what it plans queries with (declared
/// types, keys, rowids, indexes) and what it evaluates on rows that readers write
/// (CHECK and DEFAULT expressions, collations): equal text, equal tables.
fn layout(
    conn: &Connection,
    tables: &BTreeSet<String>,
) -> rusqlite::Result<BTreeMap<String, Vec<String>>> {
    let mut q = conn.prepare(
        "SELECT type, name, sql FROM sqlite_schema WHERE tbl_name = ?1 ORDER BY type, name",
    )?;
    let mut out = BTreeMap::new();
    for table in tables {
        let sql = q
            .query_map([table], |r| {
                let sql: Option<String> = r.get(2)?;
                let sql = sql.unwrap_or_default();
                let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                Ok(format!(
                    "{} {} {sql}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.insert(table.clone(), sql);
    }
    Ok(out)
}

/// Every table must be laid out as format 4 lays it out, and there may be no other.
/// Run after [`check_objects`], so that nothing but tables and indexes remain.
pub(super) fn check_tables(conn: &Connection, what: &str) -> Result<()> {
    let reference = Connection::open_in_memory()?;
    reference.execute_batch(&metadata_schema())?;
    let names = tables(&reference)?;
    // Names first: the layout of thousands of tables would itself take long.
    let got_names = tables(conn)?;
    let (want, got) = if got_names == names {
        (layout(&reference, &names)?, layout(conn, &names)?)
    } else {
        let only = |n: &BTreeSet<String>| n.iter().map(|t| (t.clone(), Vec::new())).collect();
        (only(&names), only(&got_names))
    };
    let odd = want
        .keys()
        .chain(got.keys())
        .find(|t| want.get(*t) != got.get(*t));
    if let Some(table) = odd {
        let why = match (want.contains_key(table), got.contains_key(table)) {
            (true, true) => {
                "is not laid out as format 4 lays it out (its columns, constraints, key or indexes)"
            }
            (true, false) => "is missing",
            _ => "is not one of format 4's",
        };
        return Err(Error::Damaged(format!(
            "{what} is not vaultik metadata: its table {table:?} {why}"
        )));
    }
    Ok(())
}

/// Rebuilds every index from the rows. The file's own index pages may hold anything,
/// whatever their SQL says: a query answered from one could skip rows (a file not
/// restored, a blob prune thinks unused) or name rows that are not there.
pub(super) fn rebuild_indexes(conn: &Connection, what: &str) -> Result<()> {
    conn.execute_batch("REINDEX")
        .map_err(|e| Error::Damaged(format!("{what}: its indexes cannot be rebuilt: {e}")))
}

/// Rewrites the chunk tables of format 1, 2 or 3 (chunks and blobs by id) into format 4's
/// (by row number). A reference that names nothing becomes row 0, which no row has: the
/// files that use it are then reported damaged by the checks every reader makes. Each id
/// keeps its first row only, so every join below matches at most one row.
pub(super) fn number_chunks(conn: &Connection, format: u32) -> rusqlite::Result<()> {
    if format < 2 {
        // Format 1 kept extended attribute values inline and has no chunk column.
        conn.execute_batch("ALTER TABLE xattrs ADD COLUMN chunk_id BLOB")?;
    }
    let schema = metadata_schema();
    conn.execute_batch(&format!(
        "ALTER TABLE blobs RENAME TO old_blobs;
         ALTER TABLE chunks RENAME TO old_chunks;
         ALTER TABLE file_chunks RENAME TO old_file_chunks;
         ALTER TABLE xattrs RENAME TO old_xattrs;
         {schema}
         INSERT OR IGNORE INTO blobs (name, size, plain_size, payload_start, hash)
             SELECT id, size, plain_size, payload_start, hash FROM old_blobs;
         CREATE UNIQUE INDEX chunks_by_hash ON chunks (hash);"
    ))?;
    for step in NUMBERING {
        conn.execute_batch(step)?;
    }
    conn.execute_batch(
        "DROP INDEX chunks_by_hash;
         DROP TABLE old_xattrs;
         DROP TABLE old_file_chunks;
         DROP TABLE old_chunks;
         DROP TABLE old_blobs;",
    )
}

/// The joins of [`number_chunks`]. The old side is cast to the type of the new key, so
/// that whatever the old table declares, each row is one search of that key.
const NUMBERING: [&str; 3] = [
    "INSERT OR IGNORE INTO chunks (hash, blob, offset, clen, ulen)
         SELECT c.id, coalesce(b.id, 0), c.offset, c.clen, c.ulen
         FROM old_chunks c LEFT JOIN blobs b ON b.name = CAST(c.blob_id AS TEXT)",
    "INSERT OR IGNORE INTO file_chunks (node_id, seq, offset, chunk)
         SELECT f.node_id, f.seq, f.offset, coalesce(c.id, 0)
         FROM old_file_chunks f LEFT JOIN chunks c ON c.hash = CAST(f.chunk_id AS BLOB)",
    "INSERT OR IGNORE INTO xattrs (node_id, name, value, chunk)
         SELECT x.node_id, x.name, x.value,
             CASE WHEN x.chunk_id IS NOT NULL THEN coalesce(c.id, 0) END
         FROM old_xattrs x LEFT JOIN chunks c ON c.hash = CAST(x.chunk_id AS BLOB)",
];

/// The file's pages must form sound b-trees, each page in one of them
/// (`quick_check`): rebuilding an index whose pages belong to another tree as well
/// would rewrite that tree.
pub(super) fn check_pages(conn: &Connection, what: &str) -> Result<()> {
    let verdict: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(Error::Damaged(format!("{what} is damaged: {verdict}")));
    }
    Ok(())
}

/// References between rows must be integers, as format 4 writes them. SQLite would
/// compare a stored TEXT '5' with the number 5 as equal in some queries (through a
/// rowid) and not in others (through an index), so a file could pass its checks by
/// one route and be written by another. A reference that is not an integer names no
/// row (0); a row keyed by something else is unreachable and dropped.
pub(super) fn normalize_references(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "DELETE FROM file_chunks WHERE typeof(node_id) != 'integer';
         UPDATE file_chunks SET chunk = 0 WHERE typeof(chunk) != 'integer';
         DELETE FROM xattrs WHERE typeof(node_id) != 'integer';
         UPDATE xattrs SET chunk = 0 WHERE chunk IS NOT NULL AND typeof(chunk) != 'integer';
         UPDATE chunks SET blob = 0 WHERE typeof(blob) != 'integer';",
    )
}

/// The indexes readers need beyond the keys: which files use a chunk, and a blob's
/// chunks in order.
pub(super) fn add_reader_indexes(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE INDEX fc_chunk ON file_chunks (chunk);
         CREATE INDEX xattrs_chunk ON xattrs (chunk);
         CREATE INDEX chunks_blob ON chunks (blob, offset);",
    )
}

#[cfg(test)]
mod tests {
    use rusqlite::types::Value::{Blob as B, Integer as I, Null, Text as T};

    use super::*;
    use crate::snapshot::NODE_SCHEMA;

    /// Format 3's chunk tables, as vaultik wrote them.
    const FORMAT_3_CHUNKS: &str = "
        CREATE TABLE file_chunks (node_id INTEGER NOT NULL, seq INTEGER NOT NULL,
            offset INTEGER NOT NULL, chunk_id BLOB NOT NULL, PRIMARY KEY (node_id, seq))
            WITHOUT ROWID;
        CREATE TABLE chunks (id BLOB PRIMARY KEY, blob_id TEXT NOT NULL,
            offset INTEGER NOT NULL, clen INTEGER NOT NULL, ulen INTEGER NOT NULL)
            WITHOUT ROWID;
        CREATE TABLE blobs (id TEXT PRIMARY KEY, size INTEGER NOT NULL,
            plain_size INTEGER NOT NULL, payload_start INTEGER NOT NULL, hash BLOB NOT NULL)
            WITHOUT ROWID;";

    /// A database of format `n` (1 or 3), with two files.
    fn old_format(n: u32) -> Connection {
        let chunk = if n < 2 { "" } else { "chunk_id BLOB," };
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&NODE_SCHEMA.replace("chunk INTEGER,", chunk))
            .unwrap();
        c.execute_batch(FORMAT_3_CHUNKS).unwrap();
        c.execute_batch(
            "INSERT INTO nodes VALUES (1, 'f', 'file', 420, 0, 0, 3, 0, NULL, 1, 1, 0),
                 (2, 'g', 'file', 420, 0, 0, 1, 0, NULL, 1, 2, 0);",
        )
        .unwrap();
        c
    }

    fn rows(c: &Connection, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        let mut q = c.prepare(sql).unwrap();
        let n = q.column_count();
        q.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn format_3_is_numbered_and_dangling_references_name_no_row() {
        let c = old_format(3);
        c.execute_batch(
            "INSERT INTO blobs VALUES ('b1', 10, 9, 1, x'00'), ('b2', 20, 19, 1, x'01');
             INSERT INTO chunks VALUES (x'aa', 'b2', 8, 3, 3), (x'bb', 'gone', 0, 1, 1);
             INSERT INTO file_chunks VALUES (1, 0, 0, x'aa'), (1, 1, 3, x'cc'), (2, 0, 0, x'bb');
             INSERT INTO xattrs VALUES (1, 'user.a', NULL, x'aa'), (1, 'user.b', NULL, x'dd'),
                 (2, 'user.c', 'inline', NULL);",
        )
        .unwrap();
        number_chunks(&c, 3).unwrap();
        check_tables(&c, "m").unwrap();
        let got = rows(
            &c,
            "SELECT f.node_id, f.seq, c.hash, b.name FROM file_chunks f
             LEFT JOIN chunks c ON c.id = f.chunk LEFT JOIN blobs b ON b.id = c.blob
             ORDER BY f.node_id, f.seq",
        );
        assert_eq!(
            got,
            [
                vec![I(1), I(0), B(vec![0xaa]), T("b2".into())],
                vec![I(1), I(1), Null, Null],
                vec![I(2), I(0), B(vec![0xbb]), Null],
            ]
        );
        let got = rows(&c, "SELECT name, value, chunk FROM xattrs ORDER BY name");
        assert_eq!(got[0][2], I(1), "a chunk stays a chunk");
        assert_eq!(got[1][2], I(0), "a dangling chunk names no row");
        assert_eq!(
            got[2][1..],
            [T("inline".into()), Null],
            "inline stays inline"
        );
    }

    #[test]
    fn format_1_values_stay_inline() {
        let c = old_format(1);
        c.execute_batch("INSERT INTO xattrs VALUES (1, 'user.a', 'v');")
            .unwrap();
        number_chunks(&c, 1).unwrap();
        check_tables(&c, "m").unwrap();
        let got = rows(&c, "SELECT value, chunk FROM xattrs");
        assert_eq!(got, [vec![T("v".into()), Null]]);
    }

    #[test]
    fn an_old_id_listed_many_times_keeps_one_row() {
        // Without a key on the old ids, each reference would match every copy.
        let c = old_format(3);
        c.execute_batch(
            "DROP TABLE chunks;
             CREATE TABLE chunks (id BLOB, blob_id TEXT, offset INTEGER, clen INTEGER, ulen INTEGER);
             INSERT INTO blobs VALUES ('b1', 10, 9, 1, x'00');
             INSERT INTO chunks VALUES (x'aa', 'b1', 8, 1, 1), (x'aa', 'b1', 9, 1, 1),
                 (x'aa', 'b1', 10, 1, 1);
             INSERT INTO file_chunks VALUES (1, 0, 0, x'aa'), (1, 1, 1, x'aa'), (1, 2, 2, x'aa');",
        )
        .unwrap();
        number_chunks(&c, 3).unwrap();
        let got = rows(
            &c,
            "SELECT (SELECT count(*) FROM chunks), count(*) FROM file_chunks f
             JOIN chunks c ON c.id = f.chunk",
        );
        assert_eq!(got, [vec![I(1), I(3)]]);
    }

    #[test]
    fn old_ids_are_searched_by_key_whatever_their_declared_type() {
        // Declared INTEGER, an old id could not be compared with the new key's TEXT or
        // BLOB through it: each row would scan the new table.
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&metadata_schema()).unwrap();
        c.execute_batch(
            "CREATE UNIQUE INDEX chunks_by_hash ON chunks (hash);
             CREATE TABLE old_chunks (id INTEGER, blob_id INTEGER, offset, clen, ulen);
             CREATE TABLE old_file_chunks (node_id, seq, offset, chunk_id INTEGER);
             CREATE TABLE old_xattrs (node_id, name, value, chunk_id INTEGER);",
        )
        .unwrap();
        for (step, new) in NUMBERING.iter().zip(["b", "c", "c"]) {
            let plan = rows(&c, &format!("EXPLAIN QUERY PLAN {step}"));
            let plan: Vec<String> = plan.iter().map(|r| format!("{:?}", r[3])).collect();
            let searched = plan.iter().any(|p| p.contains(&format!("SEARCH {new} ")));
            let scanned = plan.iter().any(|p| p.contains(&format!("SCAN {new} ")));
            assert!(searched && !scanned, "{step}: {plan:?}");
        }
    }

    #[test]
    fn references_that_are_not_integers_name_no_row() {
        let c = Connection::open_in_memory().unwrap();
        // Untyped while the rows go in, as a hostile writer can make it.
        let untyped = metadata_schema().replace(" INTEGER NOT NULL", " NOT NULL");
        c.execute_batch(&untyped.replace("chunk INTEGER,", "chunk,"))
            .unwrap();
        c.execute_batch(
            "INSERT INTO chunks VALUES (5, x'aa', '1', 0, 1, 1), (6, x'bb', 1, 0, 1, 1);
             INSERT INTO file_chunks VALUES (1, 0, 0, 6), ('1', 1, 0, 5), (2, 0, 0, '6');
             INSERT INTO xattrs VALUES ('1', 'user.a', NULL, 6), (1, 'user.b', NULL, '6');",
        )
        .unwrap();
        normalize_references(&c).unwrap();
        let got = rows(
            &c,
            "SELECT 'f', node_id, chunk FROM file_chunks
             UNION ALL SELECT 'x', node_id, chunk FROM xattrs
             UNION ALL SELECT 'c', id, blob FROM chunks ORDER BY 1, 2",
        );
        let t = |s: &str| T(s.into());
        assert_eq!(
            got,
            [
                vec![t("c"), I(5), I(0)],
                vec![t("c"), I(6), I(1)],
                vec![t("f"), I(1), I(6)],
                vec![t("f"), I(2), I(0)],
                vec![t("x"), I(1), I(0)],
            ]
        );
    }

    #[test]
    fn joins_search_keys() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&metadata_schema()).unwrap();
        check_tables(&c, "m").unwrap();
        add_reader_indexes(&c).unwrap();
        let plan: Vec<String> = rows(
            &c,
            "EXPLAIN QUERY PLAN SELECT * FROM nodes n
             LEFT JOIN file_chunks f ON f.node_id = n.id LEFT JOIN chunks c ON c.id = f.chunk
             LEFT JOIN blobs b ON b.id = c.blob",
        )
        .into_iter()
        .map(|r| format!("{:?}", r[3]))
        .collect();
        assert!(
            plan.iter()
                .any(|p| p.contains("SEARCH f USING PRIMARY KEY")),
            "{plan:?}"
        );
    }

    #[test]
    fn tables_laid_out_otherwise_are_refused_by_name() {
        let schema = metadata_schema();
        let cases = [
            // Untyped: an integer cannot be searched for through the key.
            (
                schema.replace("node_id INTEGER NOT NULL", "node_id"),
                "\"file_chunks\" is not laid",
            ),
            // Rowids where format 4 has none.
            (
                schema.replacen(") WITHOUT ROWID;", ");", 1),
                "\"xattrs\" is not laid",
            ),
            // Not the rowid: an id that may be NULL or TEXT.
            (
                schema.replace(
                    "id INTEGER PRIMARY KEY,\n    hash",
                    "id INTEGER PRIMARY KEY DESC,\n    hash",
                ),
                "\"chunks\" is not laid",
            ),
            // Names not unique: a lookup by name scans.
            (
                schema.replace("name TEXT NOT NULL UNIQUE", "name TEXT NOT NULL"),
                "\"blobs\" is not laid",
            ),
            (
                schema.replace("path BLOB NOT NULL UNIQUE", "path BLOB NOT NULL"),
                "\"nodes\" is not laid",
            ),
            (
                format!("{schema} CREATE INDEX i ON chunks (hash);"),
                "\"chunks\" is not laid",
            ),
            (
                format!("{schema} CREATE TABLE extra (x);"),
                "\"extra\" is not one of format 4's",
            ),
            // Evaluated on every row readers write, and the pragmas do not show them.
            (
                schema.replace(
                    "ulen INTEGER NOT NULL\n)",
                    "ulen INTEGER NOT NULL CHECK (length(zeroblob(1000000000)))\n)",
                ),
                "\"chunks\" is not laid",
            ),
            (
                schema.replace("kind TEXT NOT NULL", "kind TEXT NOT NULL COLLATE NOCASE"),
                "\"nodes\" is not laid",
            ),
            (
                schema.replace("CREATE TABLE IF NOT EXISTS meta", "CREATE TABLE other"),
                "\"meta\" is missing",
            ),
        ];
        for (sql, why) in cases {
            assert_ne!(sql, schema);
            let c = Connection::open_in_memory().unwrap();
            c.execute_batch(&sql).unwrap();
            let e = check_tables(&c, "m").unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn views_triggers_and_statistics_are_refused() {
        let cases = [
            ("CREATE VIEW v AS SELECT 1;", "view"),
            (
                "CREATE TRIGGER t AFTER INSERT ON nodes BEGIN SELECT 1; END;",
                "trigger",
            ),
            (
                "CREATE INDEX i ON nodes (x); ANALYZE;",
                "planner statistics) \"sqlite_stat1\"",
            ),
            (
                // SQLite reserves the name, but a file can hold it all the same.
                "PRAGMA writable_schema = ON;
                 INSERT INTO sqlite_schema VALUES ('table', 'SQLITE_STAT1', 'SQLITE_STAT1', 0,
                     'CREATE TABLE SQLITE_STAT1 (tbl, idx, stat)');",
                "planner statistics) \"SQLITE_STAT1\"",
            ),
            (
                "CREATE TABLE g (a, b AS (length(printf('%.*c', 1000, 'x'))));",
                "\"g\" has a generated column",
            ),
        ];
        for (sql, shown) in cases {
            let c = Connection::open_in_memory().unwrap();
            c.execute_batch("CREATE TABLE nodes (x); INSERT INTO nodes VALUES (1), (2);")
                .unwrap();
            c.execute_batch(sql).unwrap();
            let e = check_objects(&c, "m").unwrap_err().to_string();
            assert!(e.contains(shown), "{sql}: {e}");
        }
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE nodes (x UNIQUE, y); CREATE INDEX i ON nodes (y);
             CREATE TABLE w (k PRIMARY KEY) WITHOUT ROWID;",
        )
        .unwrap();
        check_objects(&c, "m").unwrap();
    }
}
