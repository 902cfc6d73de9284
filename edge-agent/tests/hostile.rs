//! A hostile bucket: whoever can write to it can encrypt to the public key, so snapshot
//! metadata read back is attacker-controlled. These tests forge metadata with the stock
//! `age`, `zstd` and `sqlite3` tools, as such a writer would, and check that restore and
//! fetch never write outside their target, refuse and name what breaks the rules, and
//! still restore the rest.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;

struct Forged {
    t: tempfile::TempDir,
    key: Key,
    src: std::path::PathBuf,
    outside: std::path::PathBuf,
}

impl Forged {
    /// A backup of `src/keep.txt` and `src/d/f.txt`, and an empty directory outside.
    fn new() -> Self {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("keep.txt"), b"keep me").unwrap();
        std::fs::write(src.join("d/f.txt"), b"precious content").unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let key = keygen(t.path());
        backup_ok(&local_config(t.path(), &[&src], &key, ""));
        Forged {
            t,
            key,
            src,
            outside,
        }
    }

    fn tamper(&self, sql: &str) {
        tamper_metadata(&self.t.path().join("repo"), &self.key, sql);
    }

    fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let env = [("VAULTIK_PRIVATE_KEY", self.key.secret.as_str())];
        let repo = local_repo(self.t.path());
        let mut a = vec![args[0], repo.as_str(), "", "latest"];
        a.extend_from_slice(&args[1..]);
        let out = vaultik(&a, &env);
        (out.status.code(), stderr(&out))
    }

    fn outside_is_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            left.is_empty(),
            "restore wrote outside its target: {left:?}"
        );
    }
}

fn node(path: &str, kind: &str, mode: u32, size: usize, target: &str) -> String {
    format!("({path}, '{kind}', {mode}, 0, 0, {size}, 0, {target}, 0, 0, 0)")
}

#[test]
fn restore_never_writes_through_a_symlink_in_the_snapshot() {
    let f = Forged::new();
    let a = f.src.join("a");
    let x = |p: &Path| stored(p);
    let abs = |p: &Path| format!("X'{}'", hex::encode(p.as_os_str().as_encoded_bytes()));
    let rows = [
        node(&x(&a), "symlink", 0o120777, 0, &abs(&f.outside)),
        node(&x(&a.join("file")), "file", 0o100644, 16, "NULL"),
        node(&x(&a.join("dir")), "dir", 0o40755, 0, "NULL"),
        node(
            &x(&a.join("sym")),
            "symlink",
            0o120777,
            0,
            &abs(Path::new("/etc/passwd")),
        ),
        node(
            &x(&a.join("hl")),
            "hardlink",
            0o100644,
            0,
            &x(&f.src.join("d/f.txt")),
        ),
        node(
            &x(&f.src.join("hl-to-symlink")),
            "hardlink",
            0o100644,
            0,
            &x(&a),
        ),
        node(
            &x(&f.src.join("hl-to-dir")),
            "hardlink",
            0o100644,
            0,
            &x(&f.src.join("d")),
        ),
    ];
    f.tamper(&format!(
        "INSERT INTO nodes (path, kind, mode, uid, gid, size, mtime_ns, target, dev, ino, ctime_ns) VALUES {};
         INSERT INTO file_chunks SELECT (SELECT id FROM nodes WHERE path = {}), seq, offset, chunk
           FROM file_chunks WHERE node_id = (SELECT id FROM nodes WHERE path = {});",
        rows.join(", "),
        x(&a.join("file")),
        x(&f.src.join("d/f.txt")),
    ));

    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    f.outside_is_empty();
    assert_eq!(code, Some(3), "{err}");
    for refused in [
        "a/file",
        "a/dir",
        "a/sym",
        "a/hl",
        "hl-to-symlink",
        "hl-to-dir",
    ] {
        let line = format!("hostile entry refused: {}", f.src.join(refused).display());
        assert!(err.contains(&line), "{line} missing from:\n{err}");
    }
    let back = restored(&target, &f.src);
    assert_eq!(std::fs::read(back.join("keep.txt")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(back.join("d/f.txt")).unwrap(),
        b"precious content"
    );
    assert_eq!(std::fs::read_link(back.join("a")).unwrap(), f.outside);

    // fetch obeys the same rules, for the entry itself and for a directory above it.
    for what in [a.join("file"), f.src.clone()] {
        let got = f.t.path().join(format!(
            "got-{}",
            what.file_name().unwrap().to_string_lossy()
        ));
        let (code, err) = f.run(&["fetch", what.to_str().unwrap(), got.to_str().unwrap()]);
        f.outside_is_empty();
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("hostile entry refused"), "{err}");
    }
}

#[test]
fn restore_does_not_follow_a_symlink_already_in_the_target() {
    let f = Forged::new();
    let target = f.t.path().join("r");
    std::fs::create_dir(&target).unwrap();
    // The first component of every stored path is "tmp" (or whatever holds the test).
    let first = f.src.components().nth(1).unwrap();
    std::os::unix::fs::symlink(&f.outside, target.join(first)).unwrap();
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    f.outside_is_empty();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&target.join(first).display().to_string()),
        "{err}"
    );
}

#[test]
fn hostile_numbers_and_chunk_lists_mark_files_damaged_not_abort() {
    let f = Forged::new();
    let repo = f.t.path().join("repo");
    let pristine = f.t.path().join("pristine");
    copy_dir(&repo.join("index"), &pristine);
    let victim = stored(&f.src.join("d/f.txt"));
    let cases = [
        (
            format!("UPDATE nodes SET size = size + 1 WHERE path = {victim}"),
            "damaged",
            "its chunks hold",
        ),
        (
            format!(
                "UPDATE file_chunks SET offset = -5 WHERE node_id = (SELECT id FROM nodes WHERE path = {victim})"
            ),
            "damaged",
            "starts at -5",
        ),
        ("DELETE FROM blobs".into(), "damaged", "no stored location"),
        (
            format!(
                "UPDATE chunks SET hash = X'00' WHERE id =
                     (SELECT chunk FROM file_chunks WHERE node_id = (SELECT id FROM nodes WHERE path = {victim}))"
            ),
            "damaged",
            "1-byte id",
        ),
        (
            format!(
                "UPDATE file_chunks SET chunk = 987654321 WHERE node_id = (SELECT id FROM nodes WHERE path = {victim})"
            ),
            "damaged",
            "has no id",
        ),
        (
            format!(
                "UPDATE chunks SET blob = 'x' WHERE id =
                     (SELECT chunk FROM file_chunks WHERE node_id = (SELECT id FROM nodes WHERE path = {victim}))"
            ),
            "damaged",
            "no stored location",
        ),
        (
            format!("UPDATE nodes SET uid = -1 WHERE path = {victim}"),
            "hostile entry refused",
            "owner -1",
        ),
        (
            format!("UPDATE nodes SET mode = 'x' WHERE path = {victim}"),
            "hostile entry refused",
            "mode",
        ),
    ];
    for (sql, kind, why) in cases {
        copy_dir(&pristine, &repo.join("index"));
        f.tamper(&sql);
        let target = f.t.path().join("r");
        let _ = std::fs::remove_dir_all(&target);
        let (code, err) = f.run(&["restore", target.to_str().unwrap(), "-q"]);
        assert_eq!(code, Some(3), "{sql}: {err}");
        assert!(
            err.contains(kind) && err.contains("f.txt") && err.contains(why),
            "{sql}: {err}"
        );
        // The other file is whole, or (with no blob rows at all) also reported damaged.
        let keep = restored(&target, &f.src).join("keep.txt");
        assert!(
            std::fs::read(&keep).unwrap() == b"keep me" || err.contains("keep.txt"),
            "{sql}: {err}"
        );
    }
}

#[test]
fn metadata_with_views_or_triggers_is_refused() {
    let f = Forged::new();
    f.tamper("CREATE VIEW evil AS SELECT 1");
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not vaultik metadata") && err.contains("view"),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn chunk_tables_declared_otherwise_are_refused_by_name() {
    // Untyped columns: SQLite could not search them by key, and every one of restore's
    // joins would scan the table, once per file.
    let f = Forged::new();
    f.tamper(
        "CREATE TABLE fc (node_id, seq, offset, chunk, PRIMARY KEY (node_id, seq)) WITHOUT ROWID;
         INSERT INTO fc SELECT * FROM file_chunks;
         DROP TABLE file_chunks;
         ALTER TABLE fc RENAME TO file_chunks;",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not vaultik metadata")
            && err.contains("its table \"file_chunks\" is not laid out as format 4"),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn fetch_of_a_directory_restores_its_whole_subtree() {
    let f = Forged::new();
    std::fs::write(f.src.join("d/g.txt"), b"second").unwrap();
    std::fs::create_dir(f.src.join("d/sub")).unwrap();
    std::fs::write(f.src.join("d/sub/h.txt"), b"deeper").unwrap();
    backup_ok(&local_config(f.t.path(), &[&f.src], &f.key, ""));
    let d = f.src.join("d");
    // Into an existing directory, and as a new path.
    let into = f.t.path().join("into");
    std::fs::create_dir(&into).unwrap();
    let (code, err) = f.run(&["fetch", d.to_str().unwrap(), into.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_tree(&d, &into.join("d"));
    let fresh = f.t.path().join("fresh");
    let (code, err) = f.run(&["fetch", d.to_str().unwrap(), fresh.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_tree(&d, &fresh);
    // A path that is not in the snapshot is an error that names it as typed.
    let typed = format!("{}/nope", d.display());
    let (code, err) = f.run(&["fetch", &typed, f.t.path().join("x").to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{typed} is not in the snapshot")),
        "{err}"
    );
}

#[test]
fn a_foreign_manifest_is_skipped_and_stops_prune() {
    let f = Forged::new();
    // A manifest-named object that does not decrypt with our key (another repository's).
    let stranger = keygen(&f.t.path().join("stranger").tap_mkdir());
    let foreign =
        f.t.path()
            .join("repo/index/00112233445566778899aabbccddeeff.snapshot");
    let st = std::process::Command::new("age")
        .args(["-r", &stranger.public, "-o"])
        .arg(&foreign)
        .arg(&stranger.file)
        .status()
        .unwrap();
    assert!(st.success());
    let env = [("VAULTIK_PRIVATE_KEY", f.key.secret.as_str())];
    let repo = local_repo(f.t.path());
    let out = vaultik(&["snapshots", &repo, ""], &env);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipped") && err.contains("00112233445566778899aabbccddeeff"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let out = vaultik(&["prune", &repo, "", "--keep-last", "1"], &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("deletes nothing") && err.contains("00112233"),
        "{err}"
    );
    assert!(foreign.exists());
}

#[test]
fn an_index_vaultik_does_not_write_is_refused_by_name() {
    let f = Forged::new();
    // Partial (it indexes nothing) while its recorded SQL says it indexes every row: a
    // query answered from it would find no file that wants a chunk.
    f.tamper(
        "CREATE INDEX evil ON file_chunks (chunk, offset) WHERE node_id < 0;
         PRAGMA writable_schema = ON;
         UPDATE sqlite_schema SET sql = 'CREATE INDEX evil ON file_chunks (chunk, offset)'
             WHERE name = 'evil';",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is damaged") && err.contains("evil"), "{err}");
    assert!(!target.exists());
}

#[test]
fn lying_index_pages_are_rebuilt_so_nothing_is_skipped_or_pruned() {
    let f = Forged::new();
    // Indexes whose pages hold another index's entries (as many as their table has
    // rows, so that SQLite's checks pass): paths read through the one on (dev, ino),
    // blob names through the one on meta's keys. Answered from them, restore would find
    // no entry and prune no blob in use.
    f.tamper(
        "CREATE TEMP TABLE k AS SELECT (SELECT count(*) FROM meta) - (SELECT count(*) FROM blobs) AS d;
         INSERT INTO blobs (name, size, plain_size, payload_start, hash)
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < (SELECT d FROM k))
             SELECT 'pad' || i, 0, 0, 0, x'' FROM n WHERE (SELECT d FROM k) > 0;
         INSERT INTO meta (key, value)
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < -(SELECT d FROM k))
             SELECT 'pad' || i, '' FROM n WHERE (SELECT d FROM k) < 0;
         CREATE TEMP TABLE r AS SELECT name, rootpage FROM sqlite_schema;
         PRAGMA writable_schema = ON;
         UPDATE sqlite_schema SET rootpage = CASE name
                 WHEN 'sqlite_autoindex_nodes_1' THEN (SELECT rootpage FROM r WHERE name = 'nodes_inode')
                 WHEN 'nodes_inode' THEN (SELECT rootpage FROM r WHERE name = 'sqlite_autoindex_nodes_1')
                 WHEN 'sqlite_autoindex_blobs_1' THEN (SELECT rootpage FROM r WHERE name = 'sqlite_autoindex_meta_1')
                 ELSE (SELECT rootpage FROM r WHERE name = 'sqlite_autoindex_blobs_1') END
             WHERE name IN ('sqlite_autoindex_nodes_1', 'nodes_inode',
                 'sqlite_autoindex_blobs_1', 'sqlite_autoindex_meta_1');",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_tree(&f.src, &restored(&target, &f.src));

    let env = [("VAULTIK_PRIVATE_KEY", f.key.secret.as_str())];
    let repo = local_repo(f.t.path());
    let out = prune_to_newest(&repo, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = f.t.path().join("r2");
    let (code, err) = f.run(&["restore", again.to_str().unwrap()]);
    assert_eq!(code, Some(0), "prune deleted a blob in use: {err}");
    assert_same_tree(&f.src, &restored(&again, &f.src));
}

#[test]
fn index_pages_shared_with_another_tree_are_refused_by_name() {
    let f = Forged::new();
    // Rebuilt, the index on (dev, ino) would overwrite the one on blob names in the
    // pages they share: prune would then find no blob in use.
    f.tamper(
        "PRAGMA writable_schema = ON;
         UPDATE sqlite_schema SET rootpage = (SELECT rootpage FROM sqlite_schema
             WHERE name = 'sqlite_autoindex_blobs_1') WHERE name = 'nodes_inode';",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is damaged"), "{err}");
    assert!(!target.exists());

    let blobs = || {
        let dirs = std::fs::read_dir(f.t.path().join("repo/blobs")).unwrap();
        dirs.map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum::<usize>()
    };
    let before = blobs();
    let env = [("VAULTIK_PRIVATE_KEY", f.key.secret.as_str())];
    let out = prune_to_newest(&local_repo(f.t.path()), &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(blobs(), before, "prune deleted blobs");
}

#[test]
fn check_expressions_are_never_run_and_refused_by_name() {
    let f = Forged::new();
    // A CHECK could ask for any amount of work on every row; this one fails on every
    // row, so it shows whether SQLite's page check evaluated it before the table was
    // refused.
    f.tamper(
        "PRAGMA writable_schema = ON;
         UPDATE sqlite_schema
             SET sql = replace(sql, 'ulen INTEGER NOT NULL', 'ulen INTEGER NOT NULL CHECK (ulen < 0)')
             WHERE name = 'chunks';",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("its table \"chunks\" is not laid out as format 4"),
        "{err}"
    );
}

#[test]
fn duplicate_entries_are_refused_by_name() {
    let f = Forged::new();
    // The top directory again, its path as TEXT: the unique index on paths holds both,
    // and restore, which compares bytes, meets the TEXT one first.
    f.tamper(
        "INSERT INTO nodes SELECT id + 1000, CAST(path AS TEXT), kind, mode, uid, gid, size,
             mtime_ns, target, dev, ino, ctime_ns FROM nodes
             WHERE path = (SELECT min(path) FROM nodes);",
    );
    let target = f.t.path().join("r");
    let (code, err) = f.run(&["restore", target.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("appears twice"), "{err}");
    let back = restored(&target, &f.src);
    assert_eq!(std::fs::read(back.join("keep.txt")).unwrap(), b"keep me");
}

#[test]
fn ls_escapes_forged_names_and_shows_what_restore_would_write() {
    let f = Forged::new();
    let dir = stored(&f.src);
    // A name with a terminal escape and a bidi override; a path stored as TEXT (which
    // SQLite sorts apart from BLOBs) whose symlink target is an escape too.
    f.tamper(&format!(
        "INSERT INTO nodes (id, path, kind, mode, uid, gid, size, mtime_ns, target, dev, ino, ctime_ns) VALUES
         (900, CAST({dir} || X'2F1B5B324A6576696CE280AE747874' AS BLOB), 'file', 420, 0, 0, 0, 0, NULL, 0, 0, 0),
         (901, CAST({dir} || X'2F74657874' AS TEXT), 'symlink', 511, 0, 0, 0, -5, X'1B5D303B78', 0, 0, 0);"
    ));
    let env = [("VAULTIK_PRIVATE_KEY", f.key.secret.as_str())];
    let repo = local_repo(f.t.path());
    let src = f.src.to_str().unwrap();
    let out = vaultik(&["ls", &repo, "", "latest", src, "--long"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!out.stdout.contains(&0x1b), "raw escape on stdout");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(r"/\u{1b}[2Jevil\u{202e}txt"), "{text}");
    assert!(text.contains(r"/text -> \u{1b}]0;x"), "{text}");
    assert!(text.contains("????-??-??"), "{text}");
    let out = vaultik(&["ls", &repo, "", "latest", src, "--json"], &env);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = list.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&format!("{src}/text").as_str()), "{paths:?}");
    assert_eq!(paths.len(), 4, "{paths:?}");
}

#[test]
fn a_forged_chain_of_delta_pieces_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..10 {
        for f in 0..100 {
            let text = format!("{d} {f}\n");
            write_file(&src.join(format!("d{d}/f{f:03}.txt")), text.as_bytes());
        }
    }
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    for d in 0..10 {
        write_file(&src.join(format!("d{d}/f050.txt")), b"edited\n");
    }
    backup_ok(&cfg);
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let list = snapshot_list(&local_repo(t.path()), "", &env);
    let id = list.last().unwrap()["id"].as_str().unwrap().to_string();
    let meta = t.path().join(format!("repo/index/{id}.metadata"));
    let honest = piece_list(&key, &meta);
    let delta = honest["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .position(|p| p.get("base").is_some())
        .expect("the edit stored a delta piece");
    type Lie = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Lie, &str)> = vec![
        (
            Box::new(|l| l["bases"][0]["base"] = 0.into()),
            "longer than 8 (or a loop)",
        ),
        (
            Box::new(move |l| l["pieces"][delta]["base"] = 999.into()),
            "names no listed base",
        ),
        (
            Box::new(|l| l["format"] = 1.into()),
            "format 1 has delta pieces",
        ),
    ];
    for (n, (lie, said)) in cases.iter().enumerate() {
        let mut forged = honest.clone();
        lie(&mut forged);
        rewrite_piece_list(&meta, &key, &forged);
        let target = t.path().join(format!("r{n}"));
        let out = restore_latest(&local_repo(t.path()), "", &target, &env);
        assert!(!out.status.success(), "{said}: restore succeeded");
        assert!(stderr(&out).contains(said), "{said}: {}", stderr(&out));
        assert!(
            !target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(),
            "{said}: restore wrote something"
        );
    }
    rewrite_piece_list(&meta, &key, &honest);
    restore_latest_matches(t.path(), &key, &src, "honest");
}
