//! Repositories damaged on purpose, against a real S3 server: what `verify` and
//! `restore` say about each. Also: a backup with write-only credentials.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;

struct Fixture {
    s3: S3Server,
    t: tempfile::TempDir,
    src: PathBuf,
    key: Key,
    cfg: PathBuf,
    id: String,
}

impl Fixture {
    fn new() -> Self {
        let s3 = S3Server::start();
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.bin"), pseudo_random(600_000, 1)).unwrap();
        std::fs::write(src.join("b.bin"), pseudo_random(600_000, 2)).unwrap();
        for i in 0..5 {
            std::fs::write(src.join(format!("s{i}.txt")), format!("small {i}\n")).unwrap();
        }
        let s0 = std::fs::File::open(src.join("s0.txt")).unwrap();
        s0.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000))
            .unwrap();
        s0.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let key = keygen(t.path());
        let cfg = s3_config(
            t.path(),
            &s3.endpoint,
            "host1",
            &[&src],
            &key,
            "chunk_size: 64KiB\nblob_size_limit: 256KiB\n",
        );
        backup_ok(&cfg);
        let env = s3_env(&s3.endpoint, &key);
        let v = snapshot_list(BUCKET, "host1", &env);
        let id = v[0]["id"].as_str().unwrap().to_string();
        Fixture {
            s3,
            t,
            src,
            key,
            cfg,
            id,
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        s3_env(&self.s3.endpoint, &self.key)
    }

    /// The blob object holding the first chunk of `name`, found with stock tools.
    fn blob_of(&self, name: &str) -> PathBuf {
        let meta = self
            .s3
            .bucket_dir()
            .join(format!("host1/index/{}.metadata", self.id));
        let db = self.t.path().join("probe.sqlite");
        let _ = std::fs::remove_file(&db);
        decrypt_metadata(&self.key, &meta, &db);
        let q = format!(
            "SELECT b.name FROM nodes n JOIN file_chunks f ON f.node_id = n.id JOIN chunks c ON c.id = f.chunk
             JOIN blobs b ON b.id = c.blob WHERE CAST(n.path AS TEXT) LIKE '%/{name}' AND f.seq = 0"
        );
        let blob = sqlite(&db, &q).trim().to_string();
        assert_eq!(blob.len(), 64, "no blob for {name}");
        self.s3
            .bucket_dir()
            .join(format!("host1/blobs/{}/{blob}", &blob[..2]))
    }

    /// The blob objects holding the snapshot's metadata pieces.
    fn metadata_blobs(&self) -> Vec<PathBuf> {
        let meta = self
            .s3
            .bucket_dir()
            .join(format!("host1/index/{}.metadata", self.id));
        piece_list(&self.key, &meta)["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let id = b["id"].as_str().unwrap();
                self.s3
                    .bucket_dir()
                    .join(format!("host1/blobs/{}/{id}", &id[..2]))
            })
            .collect()
    }

    fn verify(&self, extra: &[&str]) -> (Option<i32>, String) {
        let mut args = vec!["verify", BUCKET, "host1"];
        args.extend_from_slice(extra);
        let out = vaultik(&args, &self.env());
        (
            out.status.code(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)),
        )
    }

    /// Restores; returns the exit code, stderr, and the damaged paths it named.
    fn restore(&self) -> (Option<i32>, String, Vec<String>) {
        let target = self.t.path().join("restore");
        let _ = std::fs::remove_dir_all(&target);
        let out = vaultik(
            &[
                "restore",
                BUCKET,
                "host1",
                &self.id,
                target.to_str().unwrap(),
                "-q",
            ],
            &self.env(),
        );
        let err = stderr(&out);
        let damaged = err
            .lines()
            .filter_map(|l| l.strip_prefix("damaged: "))
            .map(|l| l.split(": ").next().unwrap().to_string())
            .collect();
        (out.status.code(), err, damaged)
    }

    /// Every file restore did not name as damaged is byte-exact.
    fn undamaged_files_exact(&self, damaged: &[String]) {
        let back = restored(&self.t.path().join("restore"), &self.src);
        for e in std::fs::read_dir(&self.src).unwrap() {
            let name = e.unwrap().file_name();
            let path = back.join(&name);
            if damaged.iter().any(|d| *d == path) {
                continue;
            }
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(self.src.join(&name)).unwrap(),
                "{name:?}"
            );
        }
    }
}

#[test]
fn clean_repository_verifies() {
    let fx = Fixture::new();
    let (code, out) = fx.verify(&["--read-data"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("no problems found") && out.contains("1 snapshots"),
        "{out}"
    );
}

#[test]
fn missing_blob() {
    let fx = Fixture::new();
    std::fs::remove_file(fx.blob_of("a.bin")).unwrap();
    let (code, out) = fx.verify(&[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("blob is missing") && out.contains("a.bin") && out.contains(&fx.id),
        "{out}"
    );
    let (code, err, damaged) = fx.restore();
    assert_eq!(code, Some(3), "{err}");
    assert!(damaged.iter().any(|d| d.ends_with("a.bin")), "{err}");
    assert!(err.contains("not found"), "{err}");
    fx.undamaged_files_exact(&damaged);
}

/// A file of one chunk is created and finished where its chunk is written; when the
/// chunk is lost it is still there, a hole of its size with its mode and mtime.
#[test]
fn a_lost_small_file_is_a_hole_with_its_attributes() {
    let fx = Fixture::new();
    std::fs::remove_file(fx.blob_of("s0.txt")).unwrap();
    let (code, err, damaged) = fx.restore();
    assert_eq!(code, Some(3), "{err}");
    assert!(damaged.iter().any(|d| d.ends_with("s0.txt")), "{err}");
    let back = restored(&fx.t.path().join("restore"), &fx.src).join("s0.txt");
    let (was, now) = (
        std::fs::metadata(fx.src.join("s0.txt")).unwrap(),
        std::fs::metadata(&back).unwrap(),
    );
    assert_eq!(std::fs::read(&back).unwrap(), vec![0; was.len() as usize]);
    assert_eq!(now.permissions().mode() & 0o7777, 0o640);
    assert_eq!(now.modified().unwrap(), was.modified().unwrap());
    fx.undamaged_files_exact(&damaged);
}

#[test]
fn truncated_blob() {
    let fx = Fixture::new();
    let blob = fx.blob_of("b.bin");
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, out) = fx.verify(&[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(&format!("bytes, expected {len}")) && out.contains("b.bin"),
        "{out}"
    );
    let (code, err, damaged) = fx.restore();
    assert_eq!(code, Some(3), "{err}");
    assert!(damaged.iter().any(|d| d.ends_with("b.bin")), "{err}");
    fx.undamaged_files_exact(&damaged);
}

#[test]
fn flipped_byte_is_found_only_by_reading_data() {
    let fx = Fixture::new();
    let blob = fx.blob_of("a.bin");
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let (code, out) = fx.verify(&[]);
    assert_eq!(code, Some(0), "sizes still match: {out}");
    for args in [&["--read-data"][..], &["--read-data-subset", "100%"]] {
        let (code, out) = fx.verify(args);
        assert_eq!(code, Some(3), "{out}");
        assert!(
            out.contains("does not match its recorded hash") && out.contains("a.bin"),
            "{out}"
        );
    }
    let (code, err, damaged) = fx.restore();
    assert_eq!(code, Some(3), "{err}");
    assert!(damaged.iter().any(|d| d.ends_with("a.bin")), "{err}");
    fx.undamaged_files_exact(&damaged);
}

#[test]
fn missing_metadata() {
    let fx = Fixture::new();
    std::fs::remove_file(
        fx.s3
            .bucket_dir()
            .join(format!("host1/index/{}.metadata", fx.id)),
    )
    .unwrap();
    let (code, out) = fx.verify(&[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("metadata object is missing") && out.contains(&fx.id),
        "{out}"
    );
    let (code, err, _) = fx.restore();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("vaultik: ") && err.contains(".metadata not found"),
        "{err}"
    );
    let out = vaultik(&["snapshots", BUCKET, "host1"], &fx.env());
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&fx.id[..8]));
}

#[test]
fn agent_verifies_its_blobs_without_the_key() {
    let fx = Fixture::new();
    let out = vaultik(&["verify", "--config", fx.cfg.to_str().unwrap()], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    std::fs::remove_file(fx.blob_of("a.bin")).unwrap();
    let out = vaultik(&["verify", "--config", fx.cfg.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("blob is missing"), "{text}");
    let out = vaultik(
        &[
            "verify",
            "--config",
            fx.cfg.to_str().unwrap(),
            "--read-data",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("needs the private key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn backup_needs_only_write_access() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fidelity_tree(&src, false);
    let key = keygen(t.path());
    // The write-only endpoint refuses reads, listings and deletes.
    let env = s3_env(&s3.write_only_endpoint, &key);
    let out = vaultik(&["snapshots", BUCKET, "host1"], &env);
    assert_eq!(out.status.code(), Some(1), "listing should be refused");
    // A refused listing is an error, never "no objects": prune stops.
    let out = vaultik(
        &[
            "prune",
            BUCKET,
            "host1",
            "--safety-margin",
            "0s",
            "--allow-short-margin",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("list"), "{}", stderr(&out));
    let cfg = s3_config(
        t.path(),
        &s3.write_only_endpoint,
        "host1",
        &[&src],
        &key,
        "chunk_size: 256KiB\nblob_size_limit: 1MiB\n",
    );
    for round in 0..2 {
        std::fs::write(src.join("changing.txt"), format!("round {round}")).unwrap();
        backup_ok(&cfg);
    }
    let env = s3_env(&s3.endpoint, &key);
    let target = t.path().join("r");
    let out = vaultik(
        &[
            "restore",
            BUCKET,
            "host1",
            "latest",
            target.to_str().unwrap(),
            "-q",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn damaged_metadata_piece_is_named_and_nothing_restored() {
    let fx = Fixture::new();
    let blobs = fx.metadata_blobs();
    assert_eq!(blobs.len(), 1);
    let name = blobs[0].file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(&blobs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&blobs[0], &bytes).unwrap();

    let (code, out) = fx.verify(&[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("metadata unreadable") && out.contains(&name),
        "{out}"
    );
    let (code, err, _) = fx.restore();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("vaultik: metadata of snapshot") && err.contains(&name),
        "{err}"
    );
    assert!(!fx.t.path().join("restore").join("tmp").exists());

    // Gone altogether: the agent, without the key, sees it too.
    std::fs::remove_file(&blobs[0]).unwrap();
    let out = vaultik(&["verify", "--config", fx.cfg.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("blob is missing") && text.contains(&name),
        "{text}"
    );
}
