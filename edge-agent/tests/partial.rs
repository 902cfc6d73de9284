//! Partial scans: the backup daemon watches its sources and lists only the directories
//! that changed, and a full walk visits only entries whose stat data changed; the
//! snapshot still holds the whole tree, exactly.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn snapshots(dir: &Path, key: &Key) -> usize {
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let out = vaultik(&["snapshots", &local_repo(dir), "", "--json"], &env);
    if !out.status.success() {
        return 0;
    }
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap()
        .len()
}

/// Waits (at most 60 s) until the repository holds `n` snapshots.
fn wait_snapshots(dir: &Path, key: &Key, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while snapshots(dir, key) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} snapshots in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn daemon(cfg: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vaultik"))
        .args(["backup", cfg.to_str().unwrap(), "--daemon"])
        .stderr(std::fs::File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// The directory counts of the partial scans in the daemon's log.
fn partial_scans(log: &Path) -> Vec<usize> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("vaultik: partial scan: "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Edits of every kind, each in a directory of its own, most far from the root.
fn mutate(src: &Path) {
    let p = |s: &str| src.join(s);
    std::fs::write(p("dir/hello.txt"), b"hello again\n").unwrap();
    write_file(&p("new/a/b/file"), b"a new subtree");
    std::fs::remove_dir_all(p("deep/level-00-dddddddddddddddddddddddddddddddddddddddd")).unwrap();
    std::fs::rename(p("dir/sub"), p("dir/moved")).unwrap();
    std::fs::remove_dir(p("dir/empty")).unwrap();
    std::fs::write(p("dir/empty"), b"was a directory").unwrap();
    std::os::unix::fs::symlink("moved", p("dir/newlink")).unwrap();
    // The first name of a hard-linked file goes; the others must keep its content,
    // also one in a directory nothing touched.
    std::fs::remove_file(p("hard-a")).unwrap();
    std::fs::remove_file(p("p/first")).unwrap();
    // Written through one name while the other sits in a directory nothing touched.
    std::fs::write(p("y/two"), b"written through y").unwrap();
    xattr::set(p("z/attr"), "user.changed", b"later").unwrap();
    // Another directory under an old name, filled before it got there: only its
    // parent's listing tells, and none of its old entries may stay.
    let outside = src.with_file_name("outside");
    write_file(&outside.join("fresh"), b"made elsewhere");
    std::fs::rename(p("r/inner"), p("r/inner.old")).unwrap();
    std::fs::rename(&outside, p("r/inner")).unwrap();
}

/// The tree `mutate` edits.
fn tree(src: &Path) {
    fidelity_tree(src, false);
    write_file(&src.join("x/one"), b"linked");
    std::fs::create_dir_all(src.join("y")).unwrap();
    std::fs::hard_link(src.join("x/one"), src.join("y/two")).unwrap();
    write_file(&src.join("z/attr"), b"attributes change");
    write_file(&src.join("p/first"), b"two names");
    std::fs::create_dir_all(src.join("q")).unwrap();
    std::fs::hard_link(src.join("p/first"), src.join("q/second")).unwrap();
    write_file(&src.join("r/inner/old"), b"moves away with its directory");
}

#[test]
fn a_walk_over_the_carried_snapshot_visits_only_changes_and_restores_exactly() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    tree(&src);
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let before = last_summary(t.path(), &key);
    backup_ok(&cfg);
    let same = last_summary(t.path(), &key);
    assert_eq!(same["bytes_read"], 0, "{same}");
    assert_eq!(same["files"], before["files"], "{same}");
    assert_eq!(same["bytes"], before["bytes"], "{same}");

    // Every kind of edit, a moved directory among them (its files are read again, as
    // a plain walk does, and deduplicated).
    mutate(&src);
    backup_ok(&cfg);
    let after = last_summary(t.path(), &key);
    assert!(after["bytes_read"].as_u64().unwrap() > 0, "{after}");
    assert_eq!(after["new_chunks"], 6, "only the edited contents: {after}");

    restore_latest_matches(t.path(), &key, &src, "restored");
}

#[test]
fn a_watching_daemon_lists_only_changed_directories_and_restores_exactly() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    tree(&src);
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "backup_interval: 1s\n");
    let log = t.path().join("daemon.log");
    let mut child = daemon(&cfg, &log);

    // The first run scans everything; the next ones only what changed (nothing).
    wait_snapshots(t.path(), &key, 2);
    mutate(&src);
    let now = snapshots(t.path(), &key);
    wait_snapshots(t.path(), &key, now + 2);
    let _ = child.kill();
    child.wait().unwrap();

    let scans = partial_scans(&log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("backup failed"), "{text}");
    assert!(
        scans.iter().any(|&n| n > 0),
        "a partial scan listed the changed directories: {text}"
    );
    let dirs = walk(&src).iter().filter(|(_, m)| m.is_dir()).count();
    assert!(
        scans.iter().all(|&n| n < 12 && n < dirs),
        "partial scans list a few of the {dirs} directories: {scans:?}"
    );

    restore_latest_matches(t.path(), &key, &src, "restored");
}

#[test]
fn a_hard_link_kept_from_the_snapshot_follows_its_inode_not_its_old_name() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_file(&src.join("data/cur/db.bin"), b"the shared content");
    std::fs::create_dir_all(src.join("data/snap")).unwrap();
    std::fs::hard_link(src.join("data/cur/db.bin"), src.join("data/snap/db.bin")).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    // The linked file moves with its directory (its own stat data stays the same) and
    // an unrelated file takes its old name.
    std::fs::rename(src.join("data/cur"), src.join("data/old")).unwrap();
    write_file(&src.join("data/cur/db.bin"), b"another file");
    backup_ok(&cfg);

    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let target = t.path().join("restored");
    let out = restore_latest(&local_repo(t.path()), "", &target, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = restored(&target, &src);
    assert_eq!(
        std::fs::read(back.join("data/snap/db.bin")).unwrap(),
        b"the shared content"
    );
    assert_same_tree(&src, &back);
}

/// Extended attributes of `file` in the newest snapshot, by name.
fn snapshot_xattrs(dir: &Path, key: &Key, file: &Path) -> Vec<String> {
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let target = dir.join(format!("r{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    let out = restore_latest(&local_repo(dir), "", &target, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = target.join(file.strip_prefix("/").unwrap());
    let names = xattr::list(&back).unwrap();
    names.map(|n| n.to_string_lossy().into_owned()).collect()
}

#[test]
fn every_entry_is_visited_again_when_a_visit_is_due() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let file = src.join("f");
    write_file(&file, b"content");
    xattr::set(&file, "user.kept", b"value").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    assert_eq!(snapshot_xattrs(t.path(), &key, &file), ["user.kept"]);
    // A kept snapshot that lost the attribute (as on a filesystem whose ctime does not
    // move): a run that visits only changed entries keeps what it holds...
    let state = t.path().join("state");
    edit_kept_copy(&state, |db| {
        sqlite(db, "DELETE FROM xattrs;");
    });
    backup_ok(&cfg);
    assert!(snapshot_xattrs(t.path(), &key, &file).is_empty());
    // ...and a visit of everything, once due, reads it again.
    sqlite(
        &state.join("index.sqlite"),
        "UPDATE settings SET value = '0' WHERE key = 'last_visit_ns';",
    );
    backup_ok(&cfg);
    assert_eq!(snapshot_xattrs(t.path(), &key, &file), ["user.kept"]);
}
