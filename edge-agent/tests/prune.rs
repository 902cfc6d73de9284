//! Prune against a real S3 server: plans, dry runs, safety margin, and prune racing
//! backups.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Safety margin of the racing test: longer than any backup there takes, even on a busy
/// machine, as the docs require of a real margin.
const MARGIN: &str = "8s";

fn stored_blobs(s3: &S3Server) -> usize {
    let dir = s3.bucket_dir().join("host1/blobs");
    if !dir.exists() {
        return 0;
    }
    common::walk(&dir)
        .into_iter()
        .filter(|(_, m)| m.is_file())
        .count()
}

fn snapshot_ids(env: &[(&str, &str)]) -> Vec<String> {
    let v = snapshot_list(BUCKET, "host1", env);
    v.iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn prune(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut a = vec!["prune", BUCKET, "host1"];
    a.extend_from_slice(args);
    let out = vaultik(&a, env);
    assert!(out.status.success(), "prune {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn restore_equals(
    env: &[(&str, &str)],
    id: &str,
    dir: &Path,
    src: &Path,
    want: &BTreeMap<PathBuf, Desc>,
) {
    let target = dir.join(format!("r-{id}"));
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
    assert!(out.status.success(), "restore {id}: {}", stderr(&out));
    assert_eq!(
        &describe(&restored(&target, src)),
        want,
        "snapshot {id} differs"
    );
}

#[test]
fn dry_run_then_prune_keeps_every_kept_snapshot_whole() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let key = keygen(t.path());
    let cfg = s3_config(
        t.path(),
        &s3.endpoint,
        "host1",
        &[&src],
        &key,
        "chunk_size: 64KiB\nblob_size_limit: 256KiB\n",
    );
    let mut trees = Vec::new();
    for generation in 0..4u64 {
        std::fs::write(
            src.join(format!("gen-{generation}.bin")),
            pseudo_random(700_000, generation),
        )
        .unwrap();
        std::fs::write(
            src.join("changing.bin"),
            pseudo_random(1_200_000, 50 + generation),
        )
        .unwrap();
        backup_ok(&cfg);
        trees.push(describe(&src));
    }
    let env = s3_env(&s3.endpoint, &key);
    let ids = snapshot_ids(&env);
    assert_eq!(ids.len(), 4);
    let before = stored_blobs(&s3);

    // Dry run: a plan, and nothing deleted.
    let plan = prune(
        &env,
        &[
            "--keep-last",
            "2",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
            "--dry-run",
        ],
    );
    assert_eq!(plan.matches("forget  ").count(), 2, "{plan}");
    assert!(
        plan.contains(&format!("forget  {}", ids[0]))
            && plan.contains(&format!("forget  {}", ids[1])),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("keep    {}", ids[3])) && plan.contains("newest of its agent"),
        "{plan}"
    );
    assert!(!plan.contains(" 0 blobs to delete"), "{plan}");
    assert_eq!(stored_blobs(&s3), before);
    assert_eq!(snapshot_ids(&env).len(), 4);

    // The default margin protects these young blobs: snapshots go, blobs stay.
    let plan = prune(&env, &["--keep-last", "3"]);
    assert!(plan.contains(" 0 blobs to delete"), "{plan}");
    assert_eq!(stored_blobs(&s3), before);
    assert_eq!(snapshot_ids(&env), ids[1..].to_vec());

    // With no margin the unreferenced blobs go; what is kept restores exactly.
    prune(
        &env,
        &[
            "--keep-last",
            "2",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
        ],
    );
    assert!(stored_blobs(&s3) < before, "nothing was deleted");
    assert_eq!(snapshot_ids(&env), ids[2..].to_vec());
    for (n, id) in ids.iter().enumerate().skip(2) {
        restore_equals(&env, id, t.path(), &src, &trees[n]);
    }
    // A later backup after the prune is whole too.
    std::fs::write(src.join("after.bin"), pseudo_random(200_000, 99)).unwrap();
    backup_ok(&cfg);
    let last = snapshot_ids(&env).pop().unwrap();
    restore_equals(&env, &last, t.path(), &src, &describe(&src));
}

#[test]
fn prune_racing_backups_never_breaks_a_snapshot() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        std::fs::write(
            src.join(format!("stable-{i}.bin")),
            pseudo_random(500_000, i),
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
        "chunk_size: 64KiB\nblob_size_limit: 256KiB\n",
    );
    let env = s3_env(&s3.endpoint, &key);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut prunes = 0;
    std::thread::scope(|s| {
        let backups = s.spawn(|| {
            let mut runs = 0u64;
            while Instant::now() < deadline && runs < 40 {
                let churn = pseudo_random(6 << 20, 1000 + runs);
                std::fs::write(src.join("churn.bin"), &churn).unwrap();
                backup_ok(&cfg);
                // The snapshot just made is the newest, so prune keeps it: it must be
                // whole even though prunes ran while it was written.
                let got = t.path().join(format!("churn-{runs}"));
                let wanted = src.join("churn.bin");
                let out = vaultik(
                    &[
                        "fetch",
                        BUCKET,
                        "host1",
                        "latest",
                        wanted.to_str().unwrap(),
                        got.to_str().unwrap(),
                    ],
                    &env,
                );
                assert!(
                    out.status.success(),
                    "snapshot of run {runs} is broken: {}",
                    stderr(&out)
                );
                assert!(
                    std::fs::read(&got).unwrap() == churn,
                    "run {runs} restored different bytes"
                );
                std::fs::remove_file(&got).unwrap();
                runs += 1;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            runs
        });
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && prunes < 40 {
            let out = vaultik(
                &[
                    "prune",
                    BUCKET,
                    "host1",
                    "--keep-last",
                    "1",
                    "--safety-margin",
                    MARGIN,
                    "--allow-short-margin",
                ],
                &env,
            );
            assert!(out.status.success(), "prune {prunes}: {}", stderr(&out));
            prunes += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(backups.join().unwrap() >= 5);
    });
    assert!(prunes >= 3, "only {prunes} prunes ran");
    // One last backup and prune, then every kept snapshot must restore exactly.
    backup_ok(&cfg);
    std::thread::sleep(Duration::from_secs(9));
    prune(
        &env,
        &[
            "--keep-last",
            "1",
            "--safety-margin",
            MARGIN,
            "--allow-short-margin",
        ],
    );
    let ids = snapshot_ids(&env);
    assert_eq!(ids.len(), 1);
    restore_equals(&env, &ids[0], t.path(), &src, &describe(&src));
    let out = vaultik(&["verify", BUCKET, "host1", "--read-data"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Garbage was collected along the way: far fewer blobs than were ever uploaded (at
    // least 6 runs of about 26 churn blobs each). The kept snapshot alone holds about
    // 35 (stable and churn data, metadata pieces and the bases of its deltas).
    assert!(stored_blobs(&s3) <= 60, "{} blobs left", stored_blobs(&s3));
}

/// Restores the newest snapshot of `src` and checks it byte for byte, then reads every
/// blob of the repository back.
fn latest_restores_exactly(env: &[(&str, &str)], dir: &Path, src: &Path, tag: &str) {
    let target = dir.join(format!("check-{tag}"));
    let out = restore_latest(BUCKET, "host1", &target, env);
    assert!(
        out.status.success(),
        "restore after {tag}: {}",
        stderr(&out)
    );
    assert_same_tree(src, &restored(&target, src));
    let out = vaultik(&["verify", BUCKET, "host1", "--read-data"], env);
    assert!(out.status.success(), "verify after {tag}: {}", stderr(&out));
}

/// Sets the modification time of every object the server holds `secs` into the past:
/// the server's clock has moved on by that much.
fn age_bucket(s3: &S3Server, secs: i64) {
    let when = filetime::FileTime::from_unix_time(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - secs,
        0,
    );
    for (p, m) in common::walk(&s3.bucket_dir()) {
        if m.is_file() {
            filetime::set_file_mtime(&p, when).unwrap();
        }
    }
}

#[test]
fn prune_keeps_the_dedup_base_of_every_agent_sharing_a_host_name() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let key = keygen(t.path());
    let env = s3_env(&s3.endpoint, &key);
    // Two agents (two configs, two indexes) on hosts that are both called raspberrypi.
    let mut agents = Vec::new();
    for (name, seed) in [("a", 1), ("b", 2)] {
        let home = t.path().join(name);
        let src = home.join("src");
        std::fs::create_dir_all(&src).unwrap();
        write_file(&src.join("data.bin"), &pseudo_random(300_000, seed));
        let cfg = s3_config(
            &home,
            &s3.endpoint,
            "host1",
            &[&src],
            &key,
            "hostname: raspberrypi\n",
        );
        agents.push((src, cfg));
    }
    backup_ok(&agents[1].1);
    backup_ok(&agents[0].1);
    write_file(&agents[0].0.join("more.bin"), &pseudo_random(100_000, 3));
    backup_ok(&agents[0].1);
    // Grouped by host name, the rule keeps one snapshot of "raspberrypi": only the
    // per-agent protection keeps agent b's dedup base.
    let plan = prune(
        &env,
        &[
            "--keep-last",
            "1",
            "--group-by",
            "host",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
        ],
    );
    assert!(plan.contains("newest of its agent"), "{plan}");
    assert_eq!(snapshot_ids(&env).len(), 2, "{plan}");
    // Agent b deduplicates against its own last snapshot: it must still be whole.
    write_file(&agents[1].0.join("new.bin"), &pseudo_random(50_000, 4));
    backup_ok(&agents[1].1);
    latest_restores_exactly(&env, t.path(), &agents[1].0, "second backup of b");
}

#[test]
fn prune_stops_at_a_snapshot_dated_in_the_future() {
    let setup = Setup::with_snapshots(2);
    let (s3, key, env) = (&setup.s3, &setup.key, setup.env());
    // A bucket writer (or a wrong clock) dates one manifest ten years ahead.
    let ids = snapshot_ids(&env);
    let forged = ids[0].clone();
    let manifest = s3
        .bucket_dir()
        .join(format!("host1/index/{forged}.snapshot"));
    rewrite_manifest(&manifest, key, |m| {
        let t = m["time_unix_ns"].as_i64().unwrap() + 10 * 365 * 86_400 * 1_000_000_000;
        m["time_unix_ns"] = t.into();
        m["time"] = "2036-11-20T00:00:00.000Z".into();
    });
    let out = vaultik(
        &[
            "prune",
            BUCKET,
            "host1",
            "--keep-within",
            "1d",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
        ],
        &env,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&forged) && err.contains("ahead of this machine's clock"),
        "{err}"
    );
    assert_eq!(
        snapshot_ids(&env).len(),
        2,
        "prune deleted something: {err}"
    );
    let plan = prune(
        &env,
        &[
            "--keep-within",
            "1d",
            "--allow-future-snapshots",
            "--dry-run",
        ],
    );
    assert!(plan.contains(&forged), "{plan}");
}

#[test]
fn a_failed_manifest_upload_is_not_adopted_as_dedup_base() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_file(&src.join("old.bin"), &pseudo_random(200_000, 1));
    let key = keygen(t.path());
    let env = s3_env(&s3.endpoint, &key);
    let good = s3_config(t.path(), &s3.endpoint, "host1", &[&src], &key, "");
    let cfg_for = |endpoint: &str, name: &str| {
        let text = std::fs::read_to_string(&good)
            .unwrap()
            .replace(&s3.endpoint, endpoint);
        let p = t.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let no_manifest = cfg_for(&s3.no_put_endpoint, "no-manifest.yaml");
    let dead = cfg_for("http://127.0.0.1:1", "dead.yaml");
    let text = std::fs::read_to_string(&dead).unwrap();
    std::fs::write(&dead, format!("{text}retry_for: 1s\n")).unwrap();
    backup_ok(&good);
    // New data whose blobs upload, but whose manifest does not.
    write_file(&src.join("new.bin"), &pseudo_random(200_000, 2));
    let run = |cfg: &Path| vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let out = run(&no_manifest);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The next run fails too (the uplink is down) after it has looked at its index.
    let out = run(&dead);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Three days pass, for the server and the agent alike; prune removes the blobs that
    // no snapshot references.
    age_bucket(&s3, 3 * 86_400);
    let index = t.path().join("state/index.sqlite");
    sqlite(
        &index,
        "UPDATE partial_blobs SET uploaded_ns = uploaded_ns - 259200000000000",
    );
    prune(&env, &["--keep-last", "1"]);
    backup_ok(&good);
    latest_restores_exactly(&env, t.path(), &src, "the backup after the failures");
}

/// Objects whose names only resemble ours (a manifest copy in another directory, a
/// blob or metadata name in upper case) must not make prune forget, or delete, the
/// objects they resemble.
#[test]
fn alias_object_names_cannot_make_prune_delete_what_it_keeps() {
    let setup = Setup::with_snapshots(3);
    let (s3, t, src, env) = (&setup.s3, &setup.t, &setup.src, setup.env());
    let root = s3.bucket_dir().join("host1");
    let ids = snapshot_ids(&env);
    for id in &ids {
        let copy = root.join("index/alias").tap_mkdir();
        std::fs::copy(
            root.join(format!("index/{id}.snapshot")),
            copy.join(format!("{id}.snapshot")),
        )
        .unwrap();
        std::fs::copy(
            root.join(format!("index/{id}.metadata")),
            root.join(format!("index/{}.metadata", id.to_uppercase())),
        )
        .unwrap();
    }
    for (p, m) in common::walk(&root.join("blobs")) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if m.is_file() && !name.contains('#') {
            std::fs::copy(&p, p.with_file_name(name.to_uppercase())).unwrap();
        }
    }
    age_bucket(s3, 3 * 86_400);
    prune(&env, &["--keep-last", "3"]);
    assert_eq!(snapshot_ids(&env), ids);
    latest_restores_exactly(&env, t.path(), src, "prune among aliases");
}

/// An S3 server with `n` snapshots of a growing `src` under prefix `host1`.
struct Setup {
    s3: S3Server,
    t: tempfile::TempDir,
    src: PathBuf,
    key: Key,
}

impl Setup {
    fn env(&self) -> Vec<(&str, &str)> {
        s3_env(&self.s3.endpoint, &self.key)
    }

    fn with_snapshots(n: u64) -> Self {
        let s3 = S3Server::start();
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src").tap_mkdir();
        let key = keygen(t.path());
        let cfg = s3_config(t.path(), &s3.endpoint, "host1", &[&src], &key, "");
        for seed in 0..n {
            write_file(
                &src.join(format!("{seed}.bin")),
                &pseudo_random(100_000, seed),
            );
            backup_ok(&cfg);
        }
        Setup { s3, t, src, key }
    }
}

/// The ids of the blobs a snapshot's piece list names.
fn piece_blobs(s3: &S3Server, key: &Key, id: &str) -> Vec<String> {
    let meta = s3.bucket_dir().join(format!("host1/index/{id}.metadata"));
    piece_list(key, &meta)["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn metadata_pieces_are_shared_between_snapshots_and_kept_by_prune() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    // Enough entries for a metadata database of many pieces.
    for d in 0..55 {
        for f in 0..150 {
            write_file(
                &src.join(format!("d{d:02}/file-{f:03}.txt")),
                format!("{d} {f}\n").as_bytes(),
            );
        }
    }
    let key = keygen(t.path());
    let env = s3_env(&s3.endpoint, &key);
    let cfg = s3_config(t.path(), &s3.endpoint, "host1", &[&src], &key, "");
    backup_ok(&cfg);
    write_file(&src.join("d07/file-042.txt"), b"edited\n");
    backup_ok(&cfg);
    backup_ok(&cfg);
    let ids = snapshot_ids(&env);
    // Each piece as (its id, the blob it lies in): a piece stored again would lie in
    // a new blob.
    let pieces: Vec<Vec<(String, String)>> = ids
        .iter()
        .map(|id| {
            let meta = s3.bucket_dir().join(format!("host1/index/{id}.metadata"));
            let list = piece_list(&key, &meta);
            let blobs = list["blobs"].as_array().unwrap();
            list["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let blob = &blobs[p["blob"].as_u64().unwrap() as usize];
                    (p["id"].to_string(), blob["id"].to_string())
                })
                .collect()
        })
        .collect();
    let new_in = |n: usize| {
        pieces[n]
            .iter()
            .filter(|p| !pieces[n - 1].contains(p))
            .count()
    };
    assert!(pieces[0].len() >= 25, "{} pieces", pieces[0].len());
    // One edited file touches a few pages (more when a page splits); an unchanged
    // tree the header's, and the rows of the sources' ancestors if they changed (other
    // tests write to /tmp). Every other piece is where the snapshot before put it.
    assert!(
        new_in(1) * 2 < pieces[1].len(),
        "{} of {} pieces stored after one edit",
        new_in(1),
        pieces[1].len()
    );
    assert!(
        new_in(2) * 4 < pieces[2].len(),
        "{} of {} pieces stored with nothing changed",
        new_in(2),
        pieces[2].len()
    );
    let ids = snapshot_ids(&env);
    // The edit's pieces are deltas against the first snapshot's: pruning that snapshot
    // must keep their bases.
    let meta = s3
        .bucket_dir()
        .join(format!("host1/index/{}.metadata", ids[2]));
    let bases = piece_list(&key, &meta)["bases"].clone();
    assert!(
        bases.as_array().is_some_and(|b| !b.is_empty()),
        "the newest snapshot lists no delta piece"
    );
    let oldest = piece_blobs(&s3, &key, &ids[0]);
    assert!(
        piece_blobs(&s3, &key, &ids[2])
            .iter()
            .any(|b| oldest.contains(b)),
        "the newest snapshot reuses no piece of the first"
    );

    // The first two snapshots go; the blobs holding pieces the third still lists stay.
    prune(
        &env,
        &[
            "--keep-last",
            "1",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
        ],
    );
    assert_eq!(snapshot_ids(&env), ids[2..].to_vec());
    latest_restores_exactly(&env, t.path(), &src, "prune of the older snapshots");
    // And the agent still builds on them.
    write_file(&src.join("d19/new.txt"), b"new\n");
    backup_ok(&cfg);
    latest_restores_exactly(&env, t.path(), &src, "a backup after the prune");
}
