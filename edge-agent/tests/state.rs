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
}
