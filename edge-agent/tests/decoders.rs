//! Every decoder of bytes that come from outside (blob trailers and frames, manifests,
//! metadata values, config YAML) returns an error on bad input, never panics, and never
//! allocates what the input merely claims. A corpus of hostile cases lives in
//! `tests/corpus/<decoder>/`: `ok-*` must decode, `err-*` must be refused; proptest then
//! feeds random bytes and mutations of the corpus to each decoder.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use edge_agent::chunk::{ChunkHasher, ChunkId};
use edge_agent::config::Config;
use edge_agent::pack::{open_frame, parse_blob};
use edge_agent::restore::plan::{self, ChunkRef, RawNode, Tiling};
use edge_agent::snapshot::Manifest;

fn corpus(decoder: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(decoder);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p: PathBuf = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "corpus {decoder} is missing");
    out
}

fn blob(bytes: &[u8]) -> bool {
    let h = ChunkHasher::new([7; 32]);
    match parse_blob("corpus", bytes) {
        Ok(entries) => {
            for p in entries {
                let frame = &bytes[p.offset as usize..(p.offset + u64::from(p.clen)) as usize];
                let _ = open_frame(frame, p.ulen, p.chunk, &h);
            }
            true
        }
        Err(_) => false,
    }
}

fn manifest(bytes: &[u8]) -> bool {
    Manifest::from_json(bytes).is_ok()
}

fn config(bytes: &[u8]) -> bool {
    Config::parse(&String::from_utf8_lossy(bytes), Path::new("corpus.yaml")).is_ok()
}

fn check_corpus(decoder: &str, decode: fn(&[u8]) -> bool) {
    for (name, bytes) in corpus(decoder) {
        let ok = decode(&bytes);
        if name.starts_with("ok-") {
            assert!(ok, "{decoder}/{name} should decode");
        } else {
            assert!(!ok, "{decoder}/{name} should be refused");
        }
    }
}

#[test]
fn blob_corpus() {
    check_corpus("blob", blob);
}

#[test]
fn manifest_corpus() {
    check_corpus("manifest", manifest);
}

#[test]
fn config_corpus() {
    check_corpus("config", config);
}

/// A corpus entry with some bytes flipped, cut or repeated.
fn mutated(decoder: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let files: Vec<Vec<u8>> = corpus(decoder).into_iter().map(|(_, b)| b).collect();
    (
        0..files.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        any::<usize>(),
        any::<bool>(),
    )
        .prop_map(move |(i, flips, cut, dup)| {
            let mut b = files[i].clone();
            for (at, v) in flips {
                if !b.is_empty() {
                    let n = b.len();
                    b[at % n] ^= v;
                }
            }
            if dup && !b.is_empty() {
                let tail = b[cut % b.len()..].to_vec();
                b.extend_from_slice(&tail);
            } else if !b.is_empty() {
                b.truncate(cut % (b.len() + 1));
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn blob_never_panics(random in proptest::collection::vec(any::<u8>(), 0..512), m in mutated("blob")) {
        blob(&random);
        blob(&m);
    }

    #[test]
    fn frame_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..256), ulen in any::<u32>(), id in any::<[u8; 32]>()) {
        let h = ChunkHasher::new([1; 32]);
        prop_assert!(open_frame(&frame, ulen, ChunkId(id), &h).is_err());
    }

    #[test]
    fn manifest_never_panics(random in proptest::collection::vec(any::<u8>(), 0..512), m in mutated("manifest")) {
        manifest(&random);
        manifest(&m);
    }

    #[test]
    fn config_never_panics(random in "\\PC{0,300}", m in mutated("config")) {
        config(random.as_bytes());
        config(&m);
    }

    #[test]
    fn metadata_values_never_panic(
        path in proptest::collection::vec(any::<u8>(), 0..40),
        kind in prop_oneof![Just("file".to_string()), Just("dir".to_string()), Just("symlink".to_string()), Just("hardlink".to_string()), ".{0,8}"],
        nums in any::<[i64; 6]>(),
        target in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        chunks in proptest::collection::vec((any::<i64>(), proptest::option::of(any::<i64>()), 0usize..40), 0..8),
    ) {
        let raw = RawNode {
            id: nums[0],
            path,
            kind,
            mode: nums[1],
            uid: nums[2],
            gid: nums[3],
            size: nums[4],
            mtime_ns: nums[5],
            target,
        };
        if let Ok(n) = plan::node(raw.clone()) {
            prop_assert!(plan::check_path(&n.path).is_ok());
            prop_assert!(raw.uid >= 0 && raw.size >= 0);
        }
        // A tiling that passes covers exactly [0, size) with 32-byte ids.
        let mut t = Tiling::default();
        let mut all_pushed = true;
        let mut total: i128 = 0;
        for (offset, ulen, id_len) in chunks {
            if all_pushed && t.push(ChunkRef { offset, ulen, id_len }).is_ok() {
                prop_assert!(id_len == 32 && i128::from(offset) == total);
                total += i128::from(ulen.unwrap_or(0));
            } else {
                all_pushed = false;
            }
        }
        if let Ok(size) = u64::try_from(nums[4]) && all_pushed && t.finish(size).is_ok() {
            prop_assert_eq!(total, i128::from(size));
        }
    }
}
