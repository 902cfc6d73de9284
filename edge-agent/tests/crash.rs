//! Crash safety against a real S3 server: SIGKILL at many points of a backup, some of
//! them followed by a simulated power loss of the index's write-ahead log.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BLOB_LIMIT: u64 = 1 << 20;
const KILLS: u64 = 12;

fn blob_bytes(dir: &std::path::Path) -> (u64, usize) {
    let blobs: Vec<_> = common::walk(dir)
        .into_iter()
        .filter(|(p, m)| m.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    (blobs.iter().map(|(_, m)| m.len()).sum(), blobs.len())
}

#[test]
fn sigkill_anywhere_then_resume_uploads_nothing_twice() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("small")).unwrap();
    for i in 0..6 {
        std::fs::write(
            src.join(format!("big-{i}.bin")),
            pseudo_random(4 << 20, 100 + i),
        )
        .unwrap();
    }
    for i in 0..300 {
        std::fs::write(
            src.join(format!("small/{i:03}.txt")),
            pseudo_random(3000, i),
        )
        .unwrap();
    }
    let key = keygen(t.path());
    let cfg = s3_config(
        t.path(),
        &s3.endpoint,
        "host1",
        &[&src],
        &key,
        &format!("chunk_size: 64KiB\nblob_size_limit: {BLOB_LIMIT}\n"),
    );
    assert!(
        kill_rounds(&cfg, KILLS, None) < KILLS,
        "every run finished before its kill"
    );
    backup_ok(&cfg);

    // Every snapshot in the bucket is complete and restores without damage.
    let env = s3_env(&s3.endpoint, &key);
    let snaps = snapshot_list(BUCKET, "host1", &env);
    for copy in restore_every_snapshot(&env, t.path(), "restore", &src) {
        assert_same_tree(&src, &copy);
    }

    check_reuse(&s3, &t, &key, snaps.last().unwrap()["id"].as_str().unwrap());

    // Power loss: after some kills the index loses the tail of its log. Reuse may be
    // lost then, but never correctness.
    for i in 0..3 {
        std::fs::write(
            src.join(format!("big-{i}.bin")),
            pseudo_random(4 << 20, 200 + i),
        )
        .unwrap();
    }
    let wal = t.path().join("state/index.sqlite-wal");
    kill_rounds(&cfg, 6, Some(&wal));
    backup_ok(&cfg);
    let copies = restore_every_snapshot(&env, t.path(), "after-power-loss", &src);
    assert_same_tree(&src, copies.last().unwrap());
}

/// Restores every snapshot in the bucket; each must restore without damage. Returns
/// where each one's copy of `src` is, oldest first.
fn restore_every_snapshot(
    env: &[(&str, &str)],
    dir: &std::path::Path,
    label: &str,
    src: &std::path::Path,
) -> Vec<std::path::PathBuf> {
    let snaps = snapshot_list(BUCKET, "host1", env);
    assert!(!snaps.is_empty());
    let mut copies = Vec::new();
    for (n, s) in snaps.iter().enumerate() {
        let target = dir.join(format!("{label}-{n}"));
        let id = s["id"].as_str().unwrap();
        let out = vaultik(
            &[
                "restore",
                BUCKET,
                "host1",
                id,
                target.to_str().unwrap(),
                "-q",
            ],
            env,
        );
        assert!(out.status.success(), "snapshot {id}: {}", stderr(&out));
        copies.push(restored(&target, src));
    }
    copies
}

/// Starts and SIGKILLs `rounds` backups at spread-out moments; with `wal`, cuts the
/// index's log after every other kill. Returns how many runs finished before their kill.
fn kill_rounds(cfg: &std::path::Path, rounds: u64, wal: Option<&std::path::Path>) -> u64 {
    let mut finished = 0;
    for i in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vaultik"))
            .args(["backup", cfg.to_str().unwrap(), "--cron"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Spread the kills over the whole run: start-up, uploads, metadata, commit.
        std::thread::sleep(Duration::from_millis(15 + i * 37 % 400));
        if child.try_wait().unwrap().is_some() {
            finished += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
        if let Some(wal) = wal.filter(|w| i % 2 == 1 && w.exists()) {
            let len = std::fs::metadata(wal).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(wal).unwrap();
            f.set_len(len * (i % 5) / 5).unwrap();
        }
    }
    finished
}

/// Blobs that finished uploading were reused, not uploaded again.
fn check_reuse(s3: &S3Server, t: &tempfile::TempDir, key: &Key, last: &str) {
    // Blobs that finished uploading were reused, not uploaded again: what the bucket
    // holds beyond the last snapshot's blobs is at most the blob in flight at each kill
    // (plus one finished in the instant before its record was committed).
    let meta = s3.bucket_dir().join(format!("host1/index/{last}.metadata"));
    let db = t.path().join("last.sqlite");
    decrypt_metadata(key, &meta, &db);
    let data: u64 = sqlite(&db, "SELECT sum(size) FROM blobs")
        .trim()
        .parse()
        .unwrap();
    let metadata: u64 = piece_list(key, &meta)["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["size"].as_u64().unwrap())
        .sum();
    let referenced = data + metadata;
    let (stored, count) = blob_bytes(&s3.bucket_dir().join("host1/blobs"));
    let slack = KILLS * (BLOB_LIMIT + (256 << 10));
    assert!(
        stored <= referenced + slack,
        "{count} blobs hold {stored} bytes; the snapshot references {referenced}: more than {KILLS} kills can explain"
    );
}
