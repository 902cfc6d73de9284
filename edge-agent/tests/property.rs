//! Property test: random trees, backed up twice with random edits in between; both
//! snapshots must restore to exactly what was backed up.
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;

const NAMES: [&[u8]; 7] = [
    b"a",
    b"b",
    b"dir",
    "\u{fc}ml".as_bytes(),
    b"\xff\xfe",
    b"sp ace",
    b"new\nline",
];

#[derive(Debug, Clone)]
enum Kind {
    File { len: usize, seed: u64 },
    Dir,
    Symlink,
    Hardlink,
}

#[derive(Debug, Clone)]
struct Spec {
    path: Vec<usize>,
    kind: Kind,
    mode: u32,
}

fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![
        4 => (prop_oneof![Just(0usize), 1usize..5000, 60_000usize..400_000], 0u64..4)
            .prop_map(|(len, seed)| Kind::File { len, seed }),
        2 => Just(Kind::Dir),
        1 => Just(Kind::Symlink),
        1 => Just(Kind::Hardlink),
    ];
    (
        prop::collection::vec(0..NAMES.len(), 1..4),
        kind,
        prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o400]),
    )
        .prop_map(|(path, kind, mode)| Spec { path, kind, mode })
}

fn rel(path: &[usize]) -> PathBuf {
    path.iter().map(|i| OsStr::from_bytes(NAMES[*i])).collect()
}

/// Builds what it can of `specs` under `root`; entries that collide are skipped.
fn build(root: &Path, specs: &[Spec]) {
    std::fs::create_dir_all(root).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for s in specs {
        let p = root.join(rel(&s.path));
        if std::fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        let parent_ok = p.parent().is_some_and(|d| {
            std::fs::create_dir_all(d).is_ok()
                && std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir())
        });
        if !parent_ok {
            continue;
        }
        match &s.kind {
            Kind::File { len, seed } => {
                std::fs::write(&p, pseudo_random(*len, *seed)).unwrap();
                files.push(p.clone());
            }
            Kind::Dir => std::fs::create_dir(&p).unwrap(),
            Kind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(NAMES[s.path[0]]), &p).unwrap()
            }
            Kind::Hardlink => match files.first() {
                Some(first) => std::fs::hard_link(first, &p).unwrap(),
                None => continue,
            },
        }
        if !matches!(s.kind, Kind::Symlink | Kind::Hardlink) {
            use std::os::unix::fs::PermissionsExt;
            let mode = if matches!(s.kind, Kind::Dir) {
                0o755
            } else {
                s.mode
            };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

/// Edits: overwrite the middle of some files, append to others, delete a few.
fn mutate(root: &Path, seed: u64) {
    let mut n = seed;
    for (p, m) in common::walk(root) {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if !m.is_file() {
            continue;
        }
        match n >> 62 {
            0 => {
                let mut d = std::fs::read(&p).unwrap();
                let mid = d.len() / 2;
                d.splice(mid..mid, b"inserted bytes".iter().copied());
                std::fs::write(&p, d).unwrap();
            }
            1 => std::fs::remove_file(&p).unwrap(),
            2 => {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
                f.write_all(&pseudo_random(70_000, n)).unwrap();
            }
            _ => {}
        }
    }
}

fn backup_restore_case(specs: Vec<Spec>, edit_seed: u64) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build(&src, &specs);
    let key = keygen(t.path());
    let cfg = local_config(
        t.path(),
        &[&src],
        &key,
        "chunk_size: 64KiB\nblob_size_limit: 256KiB\n",
    );
    let backup = || {
        backup_ok(&cfg);
    };
    backup();
    let first = describe(&src);
    mutate(&src, edit_seed);
    backup();

    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let repo = local_repo(t.path());
    let snaps = snapshot_list(&repo, "", &env);
    assert_eq!(snaps.len(), 2);
    for (i, snap) in snaps.iter().enumerate() {
        let target = t.path().join(format!("r{i}"));
        let id = snap["id"].as_str().unwrap();
        let out = vaultik(
            &["restore", &repo, "", id, target.to_str().unwrap(), "-q"],
            &env,
        );
        assert!(out.status.success(), "restore {i}: {}", stderr(&out));
        let back = restored(&target, &src);
        if i == 0 {
            assert_eq!(first, describe(&back), "first snapshot differs");
        } else {
            assert_same_tree(&src, &back);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_trees_restore_exactly(specs in prop::collection::vec(spec(), 1..40), edit_seed in any::<u64>()) {
        backup_restore_case(specs, edit_seed);
    }
}
