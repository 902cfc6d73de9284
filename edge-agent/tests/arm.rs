//! The agent as shipped to ARM boards, cross-built by `cross/build.sh` (which
//! `scripts/test.sh` runs first), run under qemu user emulation: a full round trip on
//! aarch64 against the S3 server on 127.0.0.1, and the basics on 32-bit ARM. Also
//! keeps the aarch64 binary's size in check.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Past this the aarch64 agent is too big for the boards it is for.
const AARCH64_MAX_BYTES: u64 = 10 << 20;

fn cross_binary(triple: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join(triple).join("edge/vaultik");
    assert!(
        bin.is_file(),
        "{} is missing: run `bash cross/build.sh {triple}` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs the cross-built `bin` under `qemu`.
fn emulated(qemu: &str, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(qemu);
    c.arg(bin).args(args).env_remove("VAULTIK_PRIVATE_KEY");
    // The armv7 build links glibc: Debian's libc6-armhf-cross provides its loader.
    c.env("QEMU_LD_PREFIX", "/usr/arm-linux-gnueabihf");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap_or_else(|e| {
        panic!("{qemu}: {e} (Debian's qemu-user-static; scripts/test.sh installs it)")
    })
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    o
}

#[test]
fn aarch64_agent_is_small_and_static() {
    let bin = cross_binary("aarch64-unknown-linux-musl");
    let size = std::fs::metadata(&bin).unwrap().len();
    assert!(
        size <= AARCH64_MAX_BYTES,
        "the aarch64 agent is {size} bytes, over {AARCH64_MAX_BYTES}"
    );
    let head = std::fs::read(&bin).unwrap();
    // ELF, 64-bit, machine 183 (AArch64), and no program interpreter: static.
    assert_eq!(&head[..5], b"\x7fELF\x02");
    assert_eq!(u16::from_le_bytes([head[18], head[19]]), 183);
    assert!(
        !head.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "the aarch64 agent must be static"
    );
}

#[test]
fn aarch64_round_trip_under_qemu() {
    let qemu = "qemu-aarch64-static";
    let bin = cross_binary("aarch64-unknown-linux-musl");
    let s3 = Rclone::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fidelity_tree(&src, false);
    let keyfile = t.path().join("key.txt");
    ok(
        emulated(
            qemu,
            &bin,
            &["keygen", "-o", keyfile.to_str().unwrap()],
            &[],
        ),
        "keygen on aarch64",
    );
    let key = Key::from_file(keyfile);
    let cfg = s3_config(&t.path().join("."), &s3.endpoint, "pi", &[&src], &key, "");
    let backup = || {
        ok(
            emulated(
                qemu,
                &bin,
                &["backup", cfg.to_str().unwrap(), "--cron"],
                &[],
            ),
            "backup on aarch64",
        )
    };
    backup();
    // An incremental run after edits reads only what changed.
    write_file(&src.join("dir/new.bin"), &pseudo_random(300_000, 7));
    std::fs::write(src.join("dir/hello.txt"), b"edited on the pi\n").unwrap();
    backup();
    let env = s3_env(&s3.endpoint, &key);
    let list = snapshot_list(BUCKET, "pi", &env);
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["summary"]["files_new"].as_u64(), Some(1));
    let target = t.path().join("restore");
    ok(
        emulated(
            qemu,
            &bin,
            &[
                "restore",
                BUCKET,
                "pi",
                "latest",
                target.to_str().unwrap(),
                "-q",
            ],
            &env,
        ),
        "restore on aarch64",
    );
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn armv7_agent_runs_under_qemu() {
    let qemu = "qemu-arm-static";
    let bin = cross_binary("armv7-unknown-linux-gnueabihf");
    let out = ok(
        emulated(qemu, &bin, &["--version"], &[]),
        "--version on armv7",
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vaultik "));
    let t = tempfile::tempdir().unwrap();
    let keyfile = t.path().join("key.txt");
    ok(
        emulated(
            qemu,
            &bin,
            &["keygen", "-o", keyfile.to_str().unwrap()],
            &[],
        ),
        "keygen on armv7",
    );
    let key = Key::from_file(keyfile);
    assert!(key.public.starts_with("age1"));
}
