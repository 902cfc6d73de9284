#![allow(clippy::unwrap_used)]
//! End-to-end tests of the `vaultik` binary against real S3 servers over HTTP.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::*;

#[test]
fn s3_roundtrip_keeps_every_metadata_case() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fidelity_tree(&src, true);
    let key = keygen(t.path());
    let cfg = s3_config(
        t.path(),
        &s3.endpoint,
        "host1",
        &[&src],
        &key,
        "chunk_size: 1MiB\n",
    );

    backup_ok(&cfg);
    let env = s3_env(&s3.endpoint, &key);
    let snaps = snapshot_list(BUCKET, "host1", &env);
    assert_eq!(snaps.len(), 1);
    let id = snaps[0]["id"].as_str().unwrap().to_string();
    // Identical content is stored once: 3 MiB random twice, plus 3 GiB of mostly zeros.
    let new_bytes = snaps[0]["summary"]["new_bytes"].as_u64().unwrap();
    assert!(new_bytes < 8 << 20, "new_bytes {new_bytes}");

    let target = t.path().join("restore");
    let out = vaultik(
        &["restore", BUCKET, "host1", &id, target.to_str().unwrap()],
        &env,
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let back = restored(&target, &src);
    assert_same_tree(&src, &back);
    let sparse = std::fs::metadata(back.join("sparse-3g")).unwrap();
    assert_eq!(sparse.len(), 3 << 30);
    assert!(
        sparse.blocks() * 512 < 8 << 20,
        "sparse file came back with {} blocks",
        sparse.blocks()
    );

    // An unchanged re-run stores nothing new and reads no file contents.
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    assert!(out.status.success(), "second backup: {}", stderr(&out));
    assert!(
        out.stderr.is_empty() && out.stdout.is_empty(),
        "--cron printed: {}",
        stderr(&out)
    );
    let snaps = snapshot_list(BUCKET, "host1", &env);
    assert_eq!(snaps.len(), 2);
    let second = &snaps[1]["summary"];
    assert_eq!(second["new_chunks"].as_u64(), Some(0));
    assert_eq!(second["bytes_read"].as_u64(), Some(0));
    assert_eq!(second["files"], snaps[0]["summary"]["files"]);
}

#[test]
fn rclone_roundtrip() {
    let s3 = Rclone::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fidelity_tree(&src, false);
    let key = keygen(t.path());
    let cfg = s3_config(
        t.path(),
        &s3.endpoint,
        "host1",
        &[&src],
        &key,
        "chunk_size: 256KiB\nblob_size_limit: 2MiB\n",
    );
    backup_ok(&cfg);
    let env = s3_env(&s3.endpoint, &key);
    let target = t.path().join("restore");
    let out = vaultik(
        &[
            "restore",
            BUCKET,
            "host1",
            "latest",
            target.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "restore from rclone: {}",
        stderr(&out)
    );
    assert_same_tree(&src, &restored(&target, &src));
    // Several blobs were written: the 2 MiB limit was honoured.
    let blobs = common::walk(&s3.root.path().join(BUCKET).join("host1/blobs"))
        .into_iter()
        .filter(|(_, m)| m.is_file())
        .count();
    assert!(blobs >= 2, "only {blobs} blobs");
}

#[test]
fn fetch_downloads_only_what_it_needs() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("large.bin"), pseudo_random(40 << 20, 5)).unwrap();
    std::fs::write(src.join("small.txt"), b"the one file we want back").unwrap();
    std::fs::write(src.join("zz-after.bin"), pseudo_random(2 << 20, 6)).unwrap();
    let key = keygen(t.path());
    let cfg = s3_config(t.path(), &s3.endpoint, "host1", &[&src], &key, "");
    backup_ok(&cfg);
    assert_eq!(
        data_blobs(&s3.bucket_dir().join("host1"), &key).len(),
        1,
        "expected one blob of file content"
    );

    let proxy = CountingProxy::start(&s3.endpoint);
    let env = s3_env(&proxy.endpoint, &key);
    let out_file = t.path().join("got.txt");
    let wanted = src.join("small.txt");
    let out = vaultik(
        &[
            "fetch",
            BUCKET,
            "host1",
            "latest",
            wanted.to_str().unwrap(),
            out_file.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "fetch: {}", stderr(&out));
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        b"the one file we want back"
    );
    let down = proxy.down.load(Ordering::Relaxed);
    assert!(
        down < 1 << 20,
        "fetch of a small file downloaded {down} bytes of a 42 MiB blob"
    );

    // Into an existing directory, under its own name.
    let dir = t.path().join("into");
    std::fs::create_dir(&dir).unwrap();
    let out = vaultik(
        &[
            "fetch",
            BUCKET,
            "host1",
            "latest",
            wanted.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "fetch into dir: {}", stderr(&out));
    assert_eq!(
        std::fs::read(dir.join("small.txt")).unwrap(),
        b"the one file we want back"
    );

    let out = vaultik(
        &[
            "fetch",
            BUCKET,
            "host1",
            "latest",
            "/not/there",
            dir.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not/there is not in the snapshot"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn metadata_opens_with_stock_age_zstd_and_sqlite3() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fidelity_tree(&src, false);
    let key = keygen(t.path());
    let repo = t.path().join("repo");
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let meta = std::fs::read_dir(repo.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "metadata"))
        .unwrap();
    let db = t.path().join("m.sqlite");
    decrypt_metadata(&key, &meta, &db);
    let text = sqlite(
        &db,
        "SELECT count(*) FROM nodes WHERE kind = 'file'; SELECT value FROM meta WHERE key = 'format';
         SELECT count(*) = (SELECT count(*) FROM file_chunks) FROM file_chunks f
             JOIN chunks c ON c.id = f.chunk JOIN blobs b ON b.id = c.blob
             WHERE length(c.hash) = 32 AND length(b.name) = 64;",
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].parse::<u32>().unwrap() >= 10, "{text}");
    assert_eq!(lines[1], "4");
    assert_eq!(
        lines[2], "1",
        "every chunk of every file lies in a named blob"
    );
    // The manifest is plain age too.
    let manifest = meta.with_extension("snapshot");
    let out = Command::new("age")
        .args(["-d", "-i"])
        .arg(&key.file)
        .arg(&manifest)
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["format"], 3);
    assert_eq!(m["agent"].as_str().unwrap().len(), 32);
}

#[test]
fn incompressible_chunks_are_stored_as_is_and_read_back() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let noise = pseudo_random(3 << 20, 5);
    let text = "a line of plain text that zstd shrinks\n".repeat(2000);
    write_file(&src.join("noise.bin"), &noise);
    write_file(&src.join("small-noise.bin"), &noise[..900]);
    write_file(&src.join("text.txt"), text.as_bytes());
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "chunk_size: 1MiB\n");
    backup_ok(&cfg);

    // The blob, opened with the stock age CLI, holds the random bytes verbatim and the
    // text compressed.
    let blob = data_blobs(&t.path().join("repo"), &key).remove(0);
    let out = Command::new("age")
        .args(["-d", "-i"])
        .arg(&key.file)
        .arg(&blob)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let plain = out.stdout;
    assert_eq!(&plain[..8], b"VKBLOB\0\x02");
    let holds = |needle: &[u8]| plain.windows(needle.len()).any(|w| w == needle);
    assert!(holds(&noise[..900]), "random bytes are stored as is");
    assert!(holds(&noise[2 << 20..(2 << 20) + 4096]));
    assert!(!holds(&text.as_bytes()[..200]), "text is compressed");
    assert!(plain.len() < noise.len() + 900 + text.len() / 4);

    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let target = t.path().join("restored");
    let out = restore_latest(&local_repo(t.path()), "", &target, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(&src, &restored(&target, &src));
    let out = vaultik(&["verify", &local_repo(t.path()), "", "--read-data"], &env);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

#[test]
fn a_damaged_blob_names_the_files_and_the_rest_restores() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("victim.bin"), pseudo_random(6 << 20, 11)).unwrap();
    for i in 0..20 {
        std::fs::write(
            src.join(format!("small-{i:02}.txt")),
            format!("small file {i}\n"),
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
        "chunk_size: 256KiB\n",
    );
    backup_ok(&cfg);
    let blob = data_blobs(&s3.bucket_dir().join("host1"), &key).remove(0);
    // Flip one byte in the middle: inside the victim's chunks, not the age header.
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();

    let env = s3_env(&s3.endpoint, &key);
    let target = t.path().join("restore");
    let out = vaultik(
        &[
            "restore",
            BUCKET,
            "host1",
            "latest",
            target.to_str().unwrap(),
        ],
        &env,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("damaged: ") && err.contains("victim.bin"),
        "{err}"
    );
    assert!(!err.contains("small-"), "undamaged files reported: {err}");
    let back = restored(&target, &src);
    for i in 0..20 {
        let name = format!("small-{i:02}.txt");
        assert_eq!(
            std::fs::read(back.join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap()
        );
    }
}

#[test]
fn backup_writes_no_temp_file_and_no_plaintext() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let marker = b"PLAINTEXT-MARKER-7f3a9c";
    let mut content = Vec::new();
    for _ in 0..50_000 {
        content.extend_from_slice(marker);
    }
    std::fs::write(src.join("doc.txt"), &content).unwrap();
    std::fs::write(src.join("small.txt"), marker).unwrap();
    let key = keygen(t.path());
    let repo = t.path().join("repo");
    let state = t.path().join("state");
    let cfg = local_config(t.path(), &[&src], &key, "");
    // Any attempt to create a temporary file fails: TMPDIR does not exist.
    let env = [("TMPDIR", "/nonexistent/vaultik-tmp")];
    let out = vaultik(&["backup", cfg.to_str().unwrap()], &env);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        assert!(
            [
                "index.sqlite",
                // The newest snapshot's metadata (names, stat data, chunk ids).
                "index.sqlite-prev.zst",
                "index.sqlite-wal",
                "index.sqlite-shm",
                "index.sqlite.lock"
            ]
            .contains(&n.as_str()),
            "unexpected file in the state dir: {n}"
        );
    }
    // Object names reveal nothing: only random ids in the documented layout.
    for (p, m) in common::walk(&repo) {
        if !m.is_file() {
            continue;
        }
        let rel = p
            .strip_prefix(&repo)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let ok = match rel.split('/').collect::<Vec<_>>()[..] {
            ["blobs", shard, id] => hex(shard, 2) && hex(id, 64) && id.starts_with(shard),
            ["index", name] => name
                .strip_suffix(".snapshot")
                .or_else(|| name.strip_suffix(".metadata"))
                .is_some_and(|id| hex(id, 32)),
            _ => false,
        };
        assert!(ok, "object name {rel:?} is outside the opaque layout");
    }
    for dir in [&state, &repo] {
        for (p, m) in common::walk(dir) {
            if m.is_file() {
                let data = std::fs::read(&p).unwrap();
                assert!(
                    !data.windows(marker.len()).any(|w| w == marker),
                    "plaintext found in {}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn missing_source_fails_the_backup_unless_optional() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    let key = keygen(t.path());
    let missing = t.path().join("usb-disk");
    // An unmounted disk: no snapshot, exit 1, and the message names it.
    let cfg = local_config(t.path(), &[&src, &missing], &key, "");
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("optional"),
        "{err}"
    );
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let repo = local_repo(t.path());
    assert!(
        !t.path().join("repo/index").exists(),
        "a snapshot was written"
    );
    // Marked optional, it is skipped with a note and the rest is backed up.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!(", {}]", missing.display()),
        &format!(", {{path: {}, optional: true}}]", missing.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("optional source") && err.contains("skipped"),
        "{err}"
    );
    assert_eq!(snapshot_list(&repo, "", &env).len(), 1);
}

#[test]
fn sources_through_symlinks_back_up_and_restore_their_real_paths() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    std::fs::create_dir_all(real.join("data/sub")).unwrap();
    std::fs::write(real.join("data/sub/f.txt"), b"through a link").unwrap();
    // One source below a symlinked ancestor, one that is itself a symlink.
    std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
    std::os::unix::fs::symlink(real.join("data/sub"), t.path().join("sublink")).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(
        t.path(),
        &[&t.path().join("link/data"), &t.path().join("sublink")],
        &key,
        "",
    );
    let out = vaultik(&["backup", cfg.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("resolves to"), "{err}");
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let repo = local_repo(t.path());
    // A bare absolute path works where a destination is expected.
    let bare = t.path().join("repo");
    let snaps = snapshot_list(bare.to_str().unwrap(), "", &env);
    assert_eq!(
        snaps[0]["source_dirs"][0].as_str().unwrap(),
        real.join("data").to_str().unwrap()
    );
    let target = t.path().join("r");
    let out = vaultik(
        &["restore", &repo, "", "latest", target.to_str().unwrap()],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(&real.join("data"), &restored(&target, &real.join("data")));
}

#[test]
fn hostile_path_in_metadata_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hi").unwrap();
    let key = keygen(t.path());
    let repo = t.path().join("repo");
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let pristine = t.path().join("pristine");
    copy_dir(&repo.join("index"), &pristine);
    for evil in [
        "../../escaped.txt",
        "/tmp/absolute-escape.txt",
        "a/\u{0}/b",
        "a//b",
        "",
    ] {
        copy_dir(&pristine, &repo.join("index"));
        tamper_metadata(
            &repo,
            &key,
            &format!(
                "UPDATE nodes SET path = CAST(x'{}' AS BLOB) WHERE kind = 'file'",
                hex::encode(evil)
            ),
        );
        let target = t.path().join("r");
        let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
        let url = format!("file://{}", repo.display());
        let out = vaultik(
            &["restore", &url, "", "latest", target.to_str().unwrap()],
            &env,
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{evil:?}: {err}");
        assert!(err.contains("hostile entry refused: /"), "{evil:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // Nothing is written for the refused entry; the directories around it are.
        assert!(restored(&target, &src).is_dir(), "{evil:?}: {err}");
        assert!(!restored(&target, &src).join("hello.txt").exists());
        std::fs::remove_dir_all(&target).unwrap();
        assert!(
            !t.path().join("escaped.txt").exists()
                && !Path::new("/tmp/absolute-escape.txt").exists()
        );
    }
}

/// Two snapshots within one second: `latest` must be the second.
#[test]
fn regression_latest_is_newest_within_one_second() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f.txt"), b"first").unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    for content in [&b"first"[..], b"second, longer"] {
        std::fs::write(src.join("f.txt"), content).unwrap();
        backup_ok(&cfg);
    }
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let repo = local_repo(t.path());
    let got = t.path().join("got");
    let out = vaultik(
        &[
            "fetch",
            &repo,
            "",
            "latest",
            src.join("f.txt").to_str().unwrap(),
            got.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&got).unwrap(), b"second, longer");
}

/// Keys from the stock `age-keygen` work for backup and restore; the restore side takes
/// endpoint and credentials from `--config` when no AWS_* variables are set.
#[test]
fn stock_age_keygen_keys_and_config_credentials() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f.txt"), b"made with age-keygen").unwrap();
    let file = t.path().join("age-key.txt");
    let st = Command::new("age-keygen")
        .arg("-o")
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("age-keygen is needed: run ./scripts/test.sh");
    assert!(st.success());
    let key = Key::from_file(file);
    let cfg = s3_config(t.path(), &s3.endpoint, "h", &[&src], &key, "");
    backup_ok(&cfg);
    let got = t.path().join("got");
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let out = vaultik(
        &[
            "fetch",
            "--config",
            cfg.to_str().unwrap(),
            BUCKET,
            "h",
            "latest",
            src.join("f.txt").to_str().unwrap(),
            got.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&got).unwrap(), b"made with age-keygen");
}

/// Chunk lengths and offsets in metadata are untrusted: absurd values are damage, not a
/// panic or a giant allocation.
#[test]
fn regression_hostile_chunk_lengths_are_reported_as_damage() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("victim.bin"), pseudo_random(200_000, 4)).unwrap();
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    backup_ok(&cfg);
    let repo = t.path().join("repo");
    let pristine = t.path().join("pristine");
    copy_dir(&repo.join("index"), &pristine);
    for sql in [
        "UPDATE chunks SET clen = 4000000000",
        "UPDATE chunks SET ulen = 4000000000",
        "UPDATE chunks SET offset = 9000000000000",
    ] {
        copy_dir(&pristine, &repo.join("index"));
        tamper_metadata(&repo, &key, sql);
        let target = t.path().join("r");
        let _ = std::fs::remove_dir_all(&target);
        let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
        let out = vaultik(
            &[
                "restore",
                &local_repo(t.path()),
                "",
                "latest",
                target.to_str().unwrap(),
                "-q",
            ],
            &env,
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{sql}: {err}");
        assert!(
            err.contains("damaged: ") && err.contains("victim.bin"),
            "{sql}: {err}"
        );
    }
}

/// Some filesystems keep file content in extended attributes: their values travel as
/// chunks in blobs and never sit in plaintext in the run database. The manifest upload
/// is refused here, so the finished run database stays on disk to be searched.
#[test]
fn xattr_values_never_reach_the_agent_disk_in_plaintext() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    let marker = b"XATTR-PLAINTEXT-5b1e";
    std::fs::write(src.join("f.txt"), b"content").unwrap();
    xattr::set(src.join("f.txt"), "user.secret", marker).unwrap();
    let key = keygen(t.path());
    let cfg = s3_config(t.path(), &s3.no_put_endpoint, "h", &[&src], &key, "");
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let state = t.path().join("state");
    assert!(state.join("index.sqlite-run").exists());
    for (p, m) in common::walk(&state) {
        if m.is_file() {
            let data = std::fs::read(&p).unwrap();
            assert!(
                !data.windows(marker.len()).any(|w| w == marker),
                "xattr value in plaintext in {}",
                p.display()
            );
        }
    }
    // With the manifest allowed, the value comes back from its blob.
    let cfg = s3_config(t.path(), &s3.endpoint, "h", &[&src], &key, "");
    backup_ok(&cfg);
    let target = t.path().join("r");
    let out = vaultik(
        &["restore", BUCKET, "h", "latest", target.to_str().unwrap()],
        &s3_env(&s3.endpoint, &key),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = xattr::get(restored(&target, &src).join("f.txt"), "user.secret").unwrap();
    assert_eq!(got.as_deref(), Some(&marker[..]));
}
