//! What a downloaded metadata database must look like before readers query it. Readers
//! query format 4's tables directly; older formats are first rewritten into them in the
//! private copy. Every query readers make joins on a key, so a schema that declares its
//! columns differently (SQLite cannot then search by key) is refused: it would turn
//! restore's joins into scans, quadratic in the number of files.

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::snapshot::metadata_schema;

/// The tables readers join on.
const JOINED: [&str; 4] = ["xattrs", "file_chunks", "chunks", "blobs"];

/// Only ordinary tables and indexes, as vaultik writes them: no views, no triggers, no
/// virtual tables, no planner statistics. SQLite builds its schema from the `sql` text,
/// so that is what counts.
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
            // Statistics steer the query planner, and vaultik never writes them.
            "table" => sql.starts_with("CREATE TABLE ") && !name.starts_with("sqlite_stat"),
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
                "table" => "table of planner statistics",
                k => k,
            };
            return Err(Error::Damaged(format!(
                "{what} is not vaultik metadata: it holds a {shown} {name:?}"
            )));
        }
    }
    Ok(())
}

/// One table's shape: its columns (name, declared type, place in the primary key) and
/// whether it has rowids.
type Shape = (Vec<(String, String, i64)>, bool);

fn shape(conn: &Connection, table: &str) -> rusqlite::Result<Shape> {
    let columns = conn
        .prepare("SELECT name, upper(type), pk FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let rowid = conn
        .query_row(
            "SELECT NOT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .unwrap_or(true);
    Ok((columns, rowid))
}

/// The joined tables must be declared as format 4 declares them.
pub(super) fn check_tables(conn: &Connection, what: &str) -> Result<()> {
    let reference = Connection::open_in_memory()?;
    reference.execute_batch(&metadata_schema())?;
    for table in JOINED {
        if shape(conn, table)? != shape(&reference, table)? {
            return Err(Error::Damaged(format!(
                "{what} is not vaultik metadata: its table {table:?} is not declared as format 4 declares it"
            )));
        }
    }
    Ok(())
}

/// Rewrites the chunk tables of format 1, 2 or 3 (chunks and blobs by id) into format 4's
/// (by row number). A reference that names nothing becomes row 0, which no row has: the
/// files that use it are then reported damaged by the checks every reader makes.
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
         INSERT OR IGNORE INTO chunks (hash, blob, offset, clen, ulen)
             SELECT c.id, coalesce(b.id, 0), c.offset, c.clen, c.ulen
             FROM old_chunks c LEFT JOIN blobs b ON b.name = c.blob_id;
         CREATE INDEX chunks_by_hash ON chunks (hash);
         INSERT OR IGNORE INTO file_chunks (node_id, seq, offset, chunk)
             SELECT f.node_id, f.seq, f.offset, coalesce(c.id, 0)
             FROM old_file_chunks f LEFT JOIN chunks c ON c.hash = f.chunk_id;
         INSERT OR IGNORE INTO xattrs (node_id, name, value, chunk)
             SELECT x.node_id, x.name, x.value,
                 CASE WHEN x.chunk_id IS NOT NULL THEN coalesce(c.id, 0) END
             FROM old_xattrs x LEFT JOIN chunks c ON c.hash = x.chunk_id;
         DROP INDEX chunks_by_hash;
         DROP TABLE old_xattrs;
         DROP TABLE old_file_chunks;
         DROP TABLE old_chunks;
         DROP TABLE old_blobs;"
    ))
}

/// The indexes readers need beyond the keys: which files use a chunk, and a blob's
/// chunks in order. Built here from the rows themselves; an index of the same name the
/// database brought may index anything, and is dropped first.
pub(super) fn add_reader_indexes(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "DROP INDEX IF EXISTS fc_chunk;
         DROP INDEX IF EXISTS xattrs_chunk;
         DROP INDEX IF EXISTS chunks_blob;
         CREATE INDEX fc_chunk ON file_chunks (chunk);
         CREATE INDEX xattrs_chunk ON xattrs (chunk);
         CREATE INDEX chunks_blob ON chunks (blob, offset);",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Format 3's chunk tables, as vaultik wrote them.
    const FORMAT_3: &str = "
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE nodes (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, kind TEXT,
            mode INTEGER, uid INTEGER, gid INTEGER, size INTEGER, mtime_ns INTEGER,
            target BLOB, dev INTEGER, ino INTEGER, ctime_ns INTEGER);
        CREATE TABLE xattrs (node_id INTEGER NOT NULL, name BLOB NOT NULL, value BLOB,
            chunk_id BLOB, PRIMARY KEY (node_id, name)) WITHOUT ROWID;
        CREATE TABLE file_chunks (node_id INTEGER NOT NULL, seq INTEGER NOT NULL,
            offset INTEGER NOT NULL, chunk_id BLOB NOT NULL, PRIMARY KEY (node_id, seq))
            WITHOUT ROWID;
        CREATE TABLE chunks (id BLOB PRIMARY KEY, blob_id TEXT NOT NULL,
            offset INTEGER NOT NULL, clen INTEGER NOT NULL, ulen INTEGER NOT NULL)
            WITHOUT ROWID;
        CREATE TABLE blobs (id TEXT PRIMARY KEY, size INTEGER NOT NULL,
            plain_size INTEGER NOT NULL, payload_start INTEGER NOT NULL, hash BLOB NOT NULL)
            WITHOUT ROWID;";

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
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(FORMAT_3).unwrap();
        c.execute_batch(
            "INSERT INTO nodes (id, path) VALUES (1, 'f'), (2, 'g');
             INSERT INTO blobs VALUES ('b1', 10, 9, 1, x'00'), ('b2', 20, 19, 1, x'01');
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
        use rusqlite::types::Value::{Blob as B, Integer as I, Null, Text as T};
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
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&FORMAT_3.replace("chunk_id BLOB, PRIMARY", "PRIMARY"))
            .unwrap();
        c.execute_batch("INSERT INTO xattrs VALUES (1, 'user.a', 'v');")
            .unwrap();
        number_chunks(&c, 1).unwrap();
        let got = rows(&c, "SELECT value, chunk FROM xattrs");
        use rusqlite::types::Value::{Null, Text};
        assert_eq!(got, [vec![Text("v".into()), Null]]);
    }

    #[test]
    fn joins_search_keys_and_other_declarations_are_refused() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&metadata_schema()).unwrap();
        check_tables(&c, "m").unwrap();
        add_reader_indexes(&c).unwrap();
        let plan: Vec<String> = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT * FROM nodes n
                 LEFT JOIN file_chunks f ON f.node_id = n.id LEFT JOIN chunks c ON c.id = f.chunk
                 LEFT JOIN blobs b ON b.id = c.blob",
            )
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.starts_with("SEARCH f USING PRIMARY KEY")),
            "{plan:?}"
        );
        // Untyped columns: an integer cannot be searched for through their key.
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&metadata_schema().replace("node_id INTEGER NOT NULL", "node_id"))
            .unwrap();
        let e = check_tables(&c, "m").unwrap_err().to_string();
        assert!(e.contains("\"xattrs\" is not declared as format 4"), "{e}");
        // A rowid table where format 4 has none.
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&metadata_schema().replacen(") WITHOUT ROWID;", ");", 2))
            .unwrap();
        let e = check_tables(&c, "m").unwrap_err().to_string();
        assert!(e.contains("is not declared as format 4"), "{e}");
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
                "planner statistics \"sqlite_stat1\"",
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
