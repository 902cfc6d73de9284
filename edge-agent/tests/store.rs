//! Object storage behaviour that safety rests on, against each kind of server the tests
//! have: conditional create (never overwrite an object), and the staging files a killed
//! upload leaves in a local directory.
#![allow(clippy::unwrap_used)]

mod common;

use edge_agent::config::{Destination, S3Target};
use edge_agent::store::{OpenOptions, Repo, StoreError};

use common::*;

fn s3(endpoint: &str) -> Destination {
    Destination::S3(S3Target {
        endpoint: Some(endpoint.to_string()),
        bucket: BUCKET.into(),
        prefix: "p".into(),
        access_key_id: Some(AK.into()),
        secret_access_key: Some(SK.into()),
        region: Some("us-east-1".into()),
    })
}

/// Puts one object twice with `put_new`; returns the second outcome and what is stored.
fn put_twice(dest: &Destination) -> (Result<(), StoreError>, Vec<u8>) {
    put_twice_with(dest, b"second")
}

fn put_twice_with(dest: &Destination, second: &[u8]) -> (Result<(), StoreError>, Vec<u8>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = OpenOptions {
        index_prefix: "index",
        create: true,
        retry_for: std::time::Duration::from_secs(5),
    };
    let repo = Repo::open(dest, &opts, rt.handle().clone()).unwrap();
    let id = edge_agent::snapshot::SnapshotId::random();
    let key = repo.manifest_key(&id);
    repo.put_new(&key, b"first".to_vec()).unwrap();
    let second = repo.put_new(&key, second.to_vec());
    (second, repo.get(&key).unwrap().to_vec())
}

#[test]
fn conditional_create_refuses_to_overwrite_on_s3s_and_local_directories() {
    let server = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let local = Destination::Local {
        root: t.path().join("repo"),
        prefix: String::new(),
    };
    for dest in [s3(&server.endpoint), local] {
        let (second, stored) = put_twice(&dest);
        assert!(
            matches!(second, Err(StoreError::Exists { .. })),
            "{second:?}"
        );
        assert_eq!(stored, b"first");
        // A create retried after the server committed it (but did not answer) finds
        // its own bytes: that is success, not a conflict.
        let (again, stored) = put_twice_with(&dest, b"first");
        assert!(again.is_ok(), "{again:?}");
        assert_eq!(stored, b"first");
    }
}

/// rclone 1.75's S3 server ignores `If-None-Match`: the second write replaces the
/// first. docs/FORMAT.md says so; this test notices if that ever changes.
#[test]
fn rclone_ignores_conditional_create_as_documented() {
    let rclone = Rclone::start();
    let (second, stored) = put_twice(&s3(&rclone.endpoint));
    assert!(second.is_ok(), "{second:?}");
    assert_eq!(stored, b"second");
}

/// Also the clock probe a killed prune leaves in the index directory.
#[test]
fn prune_sweeps_old_staging_files_of_killed_local_uploads() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src").tap_mkdir();
    std::fs::write(src.join("f"), b"x").unwrap();
    let key = keygen(t.path());
    backup_ok(&local_config(t.path(), &[&src], &key, ""));
    // What a killed multipart upload leaves: invisible to listings, never completed.
    let blobs = t.path().join("repo/blobs/ab").tap_mkdir();
    let old = blobs.join(format!("{}#1", "ab".repeat(32)));
    let young = blobs.join(format!("{}#2", "ab".repeat(32)));
    std::fs::write(&old, b"partial").unwrap();
    std::fs::write(&young, b"partial").unwrap();
    let three_days_ago = filetime::FileTime::from_unix_time(
        filetime::FileTime::now().unix_seconds() - 3 * 86_400,
        0,
    );
    filetime::set_file_mtime(&old, three_days_ago).unwrap();
    let probe = t
        .path()
        .join(format!("repo/index/{}.clock", "cd".repeat(16)));
    std::fs::write(&probe, b"clock").unwrap();
    filetime::set_file_mtime(&probe, three_days_ago).unwrap();
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let out = vaultik(&["prune", &local_repo(t.path()), ""], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!old.exists(), "an old staging file survived prune");
    assert!(
        young.exists(),
        "a young staging file (an upload in progress) was removed"
    );
    assert!(!probe.exists(), "an old clock probe survived prune");
}
