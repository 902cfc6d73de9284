//! The agent's own disk: a private state directory, one backup at a time, an index set
//! aside only when it is really corrupt, and an agent-side verify that changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn state_directory_and_databases_are_private() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    std::fs::write(src.join("f"), b"x").unwrap();
    let key = keygen(t.path());
    backup_ok(&local_config(t.path(), &[&src], &key, ""));
    let state = t.path().join("state");
    assert_eq!(mode(&state), 0o700);
    for entry in std::fs::read_dir(&state).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    assert!(state.join("index.sqlite").exists());
}

#[test]
fn a_second_backup_while_one_runs_says_so() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    // Hold the state lock as a running backup does.
    let lock = std::fs::File::options()
        .write(true)
        .open(t.path().join("state/index.sqlite.lock"))
        .unwrap();
    lock.lock().unwrap();
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another backup is running"), "{err}");
    assert!(!err.contains("database is locked"), "{err}");
    drop(lock);
    backup_ok(&cfg);
}

#[test]
fn only_a_corrupt_index_is_set_aside() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    let key = keygen(t.path());
    let state = t.path().join("state");
    // An index path that cannot be opened as a file is an error, not "damage".
    std::fs::create_dir_all(state.join("index.sqlite")).unwrap();
    let cfg = local_config(t.path(), &[&src], &key, "");
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("index.sqlite"), "{err}");
    assert!(!state.join("index.sqlite.damaged").exists());
    // Garbage where the index should be is corruption: set aside, backup goes on.
    std::fs::remove_dir(state.join("index.sqlite")).unwrap();
    std::fs::write(state.join("index.sqlite"), vec![0x5a; 8192]).unwrap();
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("is damaged"), "{err}");
    assert!(state.join("index.sqlite.damaged").exists());
}

#[test]
fn agent_verify_changes_nothing_and_needs_a_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    std::fs::write(src.join("f"), b"x").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    std::fs::create_dir_all(t.path().join("repo")).unwrap();
    let out = vaultik(&["verify", "--config", cfg.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing to verify"), "{err}");
    assert!(!t.path().join("state").exists(), "verify created state");
    backup_ok(&cfg);
    let index = t.path().join("state/index.sqlite");
    let before = std::fs::read(&index).unwrap();
    let out = vaultik(&["verify", "--config", cfg.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&index).unwrap(), before);
    // Without the kept snapshot there is nothing to verify, and it says so.
    std::fs::remove_file(t.path().join("state/index.sqlite-prev.zst")).unwrap();
    let out = vaultik(&["verify", "--config", cfg.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing to verify"), "{err}");
    assert_eq!(std::fs::read(&index).unwrap(), before);
}

#[test]
fn a_damaged_previous_snapshot_only_costs_an_upload() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    std::fs::write(src.join("a.bin"), pseudo_random(300_000, 4)).unwrap();
    std::fs::write(src.join("b.txt"), b"small").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let first = last_summary(t.path(), &key);
    // Unchanged: nothing new.
    backup_ok(&cfg);
    assert_eq!(last_summary(t.path(), &key)["new_chunks"], 0);

    // Its first pages (the header, `meta`) stay intact: only a full check finds this.
    edit_kept_copy(&t.path().join("state"), |db| {
        let mut bytes = std::fs::read(db).unwrap();
        let half = bytes.len() / 2;
        for b in &mut bytes[half..] {
            *b = 0x5a;
        }
        std::fs::write(db, bytes).unwrap();
    });
    let packed = t.path().join("state/index.sqlite-prev.zst");
    let cut = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
    };
    for (damage, what) in [(None, "piece hashes"), (Some(cut), "packed copy cut short")] {
        if let Some(damage) = damage {
            damage(&packed);
        }
        let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{what}: {err}");
        assert!(err.contains("is damaged"), "{what}: {err}");
        let s = last_summary(t.path(), &key);
        assert_eq!(
            s["new_chunks"], first["new_chunks"],
            "{what}: read and uploaded again: {s}"
        );
        assert_eq!(s["bytes_read"], first["bytes_read"], "{what}: {s}");
    }

    restore_latest_matches(t.path(), &key, &src, "restored");
    // And the next run deduplicates against it again.
    backup_ok(&cfg);
    assert_eq!(last_summary(t.path(), &key)["new_chunks"], 0);
}

#[test]
fn the_index_keeps_no_copy_of_the_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    for i in 0..4000 {
        std::fs::write(src.join(format!("f{i}")), format!("file number {i}\n")).unwrap();
    }
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let size = |name: &str| {
        std::fs::metadata(t.path().join("state").join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    // The snapshot's metadata (4000 files, chunk lists, chunk rows) is kept once,
    // packed (4000 chunk ids alone take 128,000 bytes), and not unpacked between runs;
    // the index itself gives back the space the run's salvage rows took.
    let kept = size("index.sqlite-prev.zst");
    assert!(kept > 128_000 && kept < 400_000, "{kept}");
    assert_eq!(size("index.sqlite-prev"), 0);
    let index = size("index.sqlite") + size("index.sqlite-wal");
    assert!(index < 100_000, "the index takes {index} bytes");
}

#[test]
fn a_snapshot_dated_in_the_future_does_not_stop_deduplication() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    std::fs::write(src.join("a.bin"), pseudo_random(200_000, 8)).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    // As if the clock had run a century ahead during that backup.
    sqlite(
        &t.path().join("state/index.sqlite"),
        "UPDATE snapshots SET time_unix_ns = time_unix_ns + 3155760000000000000;",
    );
    backup_ok(&cfg);
    assert_eq!(last_summary(t.path(), &key)["new_chunks"], 0);
    assert!(t.path().join("state/index.sqlite-prev.zst").exists());
    backup_ok(&cfg);
    assert_eq!(last_summary(t.path(), &key)["new_chunks"], 0);
}
