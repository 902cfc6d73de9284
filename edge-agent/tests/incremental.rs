//! Incremental behaviour: what a re-run reads and uploads, and recovery from a bad index.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn backup(cfg: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["backup", cfg.to_str().unwrap(), "--cron"];
    args.extend_from_slice(extra);
    vaultik(&args, &[])
}

#[test]
fn renames_cost_no_upload_and_edits_upload_only_new_chunks() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/big.bin"), pseudo_random(8 << 20, 3)).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "chunk_size: 256KiB\n");
    assert!(backup(&cfg, &[]).status.success());

    // A move to another directory: read again, nothing new stored.
    std::fs::create_dir_all(src.join("b")).unwrap();
    std::fs::rename(src.join("a/big.bin"), src.join("b/moved.bin")).unwrap();
    assert!(backup(&cfg, &[]).status.success());
    let s = last_summary(t.path(), &key);
    assert_eq!(s["bytes_read"].as_u64(), Some(8 << 20));
    assert_eq!(s["new_chunks"].as_u64(), Some(0), "{s}");
    assert_eq!(s["uploaded_bytes"].as_u64(), Some(0), "{s}");

    // An edit in the middle: only the chunks around it are new.
    let mut data = std::fs::read(src.join("b/moved.bin")).unwrap();
    data[4 << 20] ^= 0xff;
    std::fs::write(src.join("b/moved.bin"), &data).unwrap();
    assert!(backup(&cfg, &[]).status.success());
    let s = last_summary(t.path(), &key);
    let new = s["new_bytes"].as_u64().unwrap();
    assert!(
        new > 0 && new <= 3 * (256 << 10),
        "an edit of one byte stored {new} new bytes"
    );
    restore_latest_matches(t.path(), &key, &src, "r1");
}

#[test]
fn rehash_and_full_scan_interval_read_everything() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), pseudo_random(1 << 20, 9)).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    assert!(backup(&cfg, &[]).status.success());
    assert!(backup(&cfg, &[]).status.success());
    assert_eq!(last_summary(t.path(), &key)["bytes_read"].as_u64(), Some(0));
    assert!(backup(&cfg, &["--rehash"]).status.success());
    assert_eq!(
        last_summary(t.path(), &key)["bytes_read"].as_u64(),
        Some(1 << 20)
    );

    let cfg = local_config(t.path(), &[&src], &key, "full_scan_interval: 1s\n");
    assert!(backup(&cfg, &[]).status.success());
    assert_eq!(
        last_summary(t.path(), &key)["bytes_read"].as_u64(),
        Some(0),
        "the last full scan was just now"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(backup(&cfg, &[]).status.success());
    assert_eq!(
        last_summary(t.path(), &key)["bytes_read"].as_u64(),
        Some(1 << 20),
        "full scan was due"
    );
}

#[test]
fn damaged_or_missing_index_still_backs_up() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), pseudo_random(300_000, 2)).unwrap();
    std::fs::write(src.join("g"), b"small").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    assert!(backup(&cfg, &[]).status.success());

    let index = t.path().join("state/index.sqlite");
    std::fs::write(
        &index,
        b"this is not a database, it was overwritten by accident",
    )
    .unwrap();
    let out = backup(&cfg, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("is damaged").count(), 1, "{err}");
    assert!(t.path().join("state/index.sqlite.damaged").exists());
    restore_latest_matches(t.path(), &key, &src, "r1");
    // The next run is quiet again.
    let out = backup(&cfg, &[]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        stderr(&out)
    );

    std::fs::remove_dir_all(t.path().join("state")).unwrap();
    let out = backup(&cfg, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(src.join("g"), b"changed after losing the index").unwrap();
    assert!(backup(&cfg, &[]).status.success());
    restore_latest_matches(t.path(), &key, &src, "r2");
}

#[test]
fn daemon_backs_up_every_interval() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"daemon").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "backup_interval: 1s\n");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vaultik"))
        .args(["backup", cfg.to_str().unwrap(), "--daemon"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let mut count = 0;
    while std::time::Instant::now() < deadline && count < 3 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = vaultik(&["snapshots", &local_repo(t.path()), "", "--json"], &env);
        if out.status.success() {
            count = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap()
                .len();
        }
    }
    let _ = child.kill();
    child.wait().unwrap();
    assert!(
        count >= 3,
        "the daemon made {count} snapshots in 20 s with a 1 s interval"
    );
}

#[test]
fn a_carried_run_keeps_only_the_chunks_and_blobs_its_files_use() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, seed) in [("a.bin", 1), ("b.bin", 2), ("c.bin", 3)] {
        std::fs::write(src.join(name), pseudo_random(300_000, seed)).unwrap();
    }
    let key = keygen(t.path());
    let cfg = local_config(
        t.path(),
        &[&src],
        &key,
        "chunk_size: 64KiB\nblob_size_limit: 256KiB\n",
    );
    backup_ok(&cfg);
    std::fs::remove_file(src.join("a.bin")).unwrap();
    std::fs::write(src.join("c.bin"), pseudo_random(300_000, 4)).unwrap();
    backup_ok(&cfg);

    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let list = snapshot_list(&local_repo(t.path()), "", &env);
    let id = list.last().unwrap()["id"].as_str().unwrap().to_string();
    let meta = t.path().join(format!("repo/index/{id}.metadata"));
    let db = t.path().join("last.sqlite");
    decrypt_metadata(&key, &meta, &db);
    let counts = sqlite(
        &db,
        "SELECT count(*) FROM chunks;
         SELECT count(*) FROM chunks WHERE id NOT IN (SELECT chunk FROM file_chunks)
             AND id NOT IN (SELECT chunk FROM xattrs WHERE chunk IS NOT NULL);
         SELECT count(*) FROM blobs WHERE id NOT IN (SELECT blob FROM chunks);",
    );
    let counts: Vec<u64> = counts.lines().map(|l| l.parse().unwrap()).collect();
    assert!(counts[0] > 0, "{counts:?}");
    assert_eq!(counts[1..], [0, 0], "unused chunk rows, unused blob rows");
    restore_latest_matches(t.path(), &key, &src, "r2");
}

/// For each piece of a piece list, the deltas between it and a whole piece.
fn depths(list: &serde_json::Value) -> Vec<usize> {
    let bases = list["bases"].as_array().cloned().unwrap_or_default();
    let depth = |p: &serde_json::Value| {
        let mut d = 0;
        let mut next = p["base"].as_u64();
        while let Some(b) = next {
            d += 1;
            assert!(d <= 8, "a chain longer than 8");
            next = bases[b as usize]["base"].as_u64();
        }
        d
    };
    list["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(depth)
        .collect()
}

#[test]
fn edited_metadata_is_stored_as_deltas_in_chains_of_at_most_eight() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..20 {
        for f in 0..150 {
            write_file(
                &src.join(format!("d{d:02}/f{f:03}.txt")),
                format!("{d} {f}\n").as_bytes(),
            );
        }
    }
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    // An edit in every directory each run: most pieces change every time.
    for run in 1..=10 {
        for d in 0..20 {
            let f = (run * 7 + d * 3) % 150;
            write_file(
                &src.join(format!("d{d:02}/f{f:03}.txt")),
                format!("run {run}\n").as_bytes(),
            );
        }
        backup_ok(&cfg);
    }
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let snapshots = snapshot_list(&local_repo(t.path()), "", &env);
    let lists: Vec<serde_json::Value> = snapshots
        .iter()
        .map(|s| {
            let id = s["id"].as_str().unwrap();
            piece_list(&key, &t.path().join(format!("repo/index/{id}.metadata")))
        })
        .collect();
    let bytes = |n: usize| snapshots[n]["summary"]["metadata_bytes"].as_u64().unwrap();
    assert!(depths(&lists[0]).iter().all(|d| *d == 0));
    assert!(lists[0]["pieces"].as_array().unwrap().len() >= 8);
    // Every piece changes every run here, so every chain reaches 8 at run 8 and run 9
    // stores whole pieces again.
    for n in (1..lists.len()).filter(|n| *n != 9) {
        assert!(
            bytes(n) * 3 < bytes(0),
            "run {n} stored {} bytes of metadata, the first {}",
            bytes(n),
            bytes(0)
        );
    }
    assert!(
        bytes(9) * 3 > bytes(0) * 2,
        "run 9 stored {} bytes",
        bytes(9)
    );
    // The header piece changes every run: its chain grows to 8, then starts again.
    let heads: Vec<usize> = lists.iter().map(|l| depths(l)[0]).collect();
    assert_eq!(heads, [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1], "{heads:?}");

    // Every snapshot opens, by hand and by vaultik; the content is what was backed up.
    for (n, s) in snapshots.iter().enumerate() {
        let id = s["id"].as_str().unwrap();
        let db = t.path().join(format!("{n}.sqlite"));
        decrypt_metadata(
            &key,
            &t.path().join(format!("repo/index/{id}.metadata")),
            &db,
        );
        assert_eq!(sqlite(&db, "PRAGMA integrity_check").trim(), "ok");
        let count = sqlite(&db, "SELECT count(*) FROM nodes WHERE kind = 'file'");
        assert_eq!(count.trim(), "3000");
    }
    let repo = local_repo(t.path());
    let out = vaultik(&["verify", &repo, "", "--read-data"], &env);
    assert!(out.status.success(), "verify: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("11 snapshots") && said.contains("no problems found"),
        "{said}"
    );

    // Prune to the newest snapshot: every blob its list names, those holding only the
    // bases of its deltas included, stays.
    let newest = lists.last().unwrap();
    assert!(!newest["bases"].as_array().unwrap().is_empty());
    let out = prune_to_newest(&repo, &env);
    assert!(out.status.success(), "prune: {}", stderr(&out));
    for b in newest["blobs"].as_array().unwrap() {
        let id = b["id"].as_str().unwrap();
        let path = t.path().join("repo/blobs").join(&id[..2]).join(id);
        assert!(
            path.exists(),
            "prune deleted blob {id} of the kept snapshot"
        );
    }
    let out = vaultik(&["verify", &repo, "", "--read-data"], &env);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("1 snapshots") && said.contains("no problems found"),
        "{said}"
    );
    restore_latest_matches(t.path(), &key, &src, "r");
}

/// An older agent's kept copy: the uncompressed `-prev`, metadata format 3 (chunks and
/// blobs by id), made from a format-4 one with the stock `zstd` and `sqlite3`.
fn make_format_3_kept_copy(state: &std::path::Path) {
    let packed = state.join("index.sqlite-prev.zst");
    let prev = state.join("index.sqlite-prev");
    let out = std::process::Command::new("zstd")
        .args(["-q", "-d", "-f"])
        .arg(&packed)
        .arg("-o")
        .arg(&prev)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&packed).unwrap();
    sqlite(
        &prev,
        "CREATE TABLE old_blobs (id TEXT PRIMARY KEY, size INTEGER NOT NULL,
             plain_size INTEGER NOT NULL, payload_start INTEGER NOT NULL, hash BLOB NOT NULL)
             WITHOUT ROWID;
         INSERT INTO old_blobs SELECT name, size, plain_size, payload_start, hash FROM blobs;
         CREATE TABLE old_chunks (id BLOB PRIMARY KEY, blob_id TEXT NOT NULL,
             offset INTEGER NOT NULL, clen INTEGER NOT NULL, ulen INTEGER NOT NULL) WITHOUT ROWID;
         INSERT INTO old_chunks SELECT c.hash, b.name, c.offset, c.clen, c.ulen
             FROM chunks c JOIN blobs b ON b.id = c.blob;
         CREATE TABLE old_fc (node_id INTEGER NOT NULL, seq INTEGER NOT NULL,
             offset INTEGER NOT NULL, chunk_id BLOB NOT NULL, PRIMARY KEY (node_id, seq))
             WITHOUT ROWID;
         INSERT INTO old_fc SELECT f.node_id, f.seq, f.offset, c.hash
             FROM file_chunks f JOIN chunks c ON c.id = f.chunk;
         CREATE TABLE old_x (node_id INTEGER NOT NULL, name BLOB NOT NULL, value BLOB,
             chunk_id BLOB, PRIMARY KEY (node_id, name)) WITHOUT ROWID;
         INSERT INTO old_x SELECT x.node_id, x.name, x.value, c.hash
             FROM xattrs x LEFT JOIN chunks c ON c.id = x.chunk;
         DROP TABLE blobs; DROP TABLE chunks; DROP TABLE file_chunks; DROP TABLE xattrs;
         ALTER TABLE old_blobs RENAME TO blobs; ALTER TABLE old_chunks RENAME TO chunks;
         ALTER TABLE old_fc RENAME TO file_chunks; ALTER TABLE old_x RENAME TO xattrs;
         UPDATE meta SET value = '3' WHERE key = 'format';
         VACUUM;",
    );
}

#[test]
fn the_kept_copy_is_packed_and_an_older_agents_copy_still_spares_reads_and_uploads() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..4 {
        for f in 0..25 {
            let text = format!("file {d}/{f}\n").repeat(20 + f);
            write_file(&src.join(format!("d{d}/f{f:02}.txt")), text.as_bytes());
        }
    }
    std::fs::write(src.join("big.bin"), pseudo_random(3 << 20, 5)).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let state = t.path().join("state");
    let names = |dir: &std::path::Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    // Between runs: the index and the packed copy, nothing unpacked, no scratch.
    assert_eq!(
        names(&state),
        ["index.sqlite", "index.sqlite-prev.zst", "index.sqlite.lock"]
    );

    make_format_3_kept_copy(&state);
    // A copy of an existing file's content: deduplicated against the upgraded copy.
    std::fs::copy(src.join("big.bin"), src.join("copy.bin")).unwrap();
    backup_ok(&cfg);
    let s = last_summary(t.path(), &key);
    assert_eq!(s["files_unmodified"].as_u64(), Some(101), "{s}");
    assert_eq!(s["files_new"].as_u64(), Some(1), "{s}");
    assert_eq!(s["bytes_read"].as_u64(), Some(3 << 20), "{s}");
    assert_eq!(s["new_chunks"].as_u64(), Some(0), "{s}");
    assert_eq!(s["uploaded_bytes"].as_u64(), Some(0), "{s}");
    assert_eq!(
        names(&state),
        ["index.sqlite", "index.sqlite-prev.zst", "index.sqlite.lock"]
    );
    restore_latest_matches(t.path(), &key, &src, "r");
}
