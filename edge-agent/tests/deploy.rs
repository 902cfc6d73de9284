//! The shipped systemd units: valid for systemd, and confined ("OK" or better in
//! `systemd-analyze security`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 4] = [
    "vaultik-agent.service",
    "vaultik-backup.service",
    "vaultik-backup.timer",
    "vaultik-controller.service",
];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The units with their binaries pointed at ones that exist here (`verify` checks
/// that `ExecStart=` is executable).
fn staged() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for u in UNITS {
        let text = std::fs::read_to_string(systemd_dir().join(u)).unwrap();
        let text = text
            .replace("/usr/bin/vaultik-controller ", "/bin/true ")
            .replace(
                "/usr/bin/vaultik ",
                &format!("{} ", env!("CARGO_BIN_EXE_vaultik")),
            );
        std::fs::write(t.path().join(u), text).unwrap();
    }
    t
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze comes with systemd (./scripts/test.sh installs it)")
}

#[test]
fn the_units_verify() {
    let t = staged();
    let paths: Vec<String> = UNITS
        .iter()
        .map(|u| t.path().join(u).display().to_string())
        .collect();
    let mut args = vec!["verify"];
    args.extend(paths.iter().map(String::as_str));
    let out = analyze(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn every_service_is_confined() {
    let t = staged();
    for u in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let path = t.path().join(u);
        let out = analyze(&["security", "--offline=true", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default().to_string();
        // "→ Overall exposure level for NAME: 1.8 OK 🙂"
        let exposure: f64 = last
            .rsplit(": ")
            .next()
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in {last:?}"));
        assert!(exposure < 2.0, "{u}: {last}");
        assert!(
            last.contains(" OK ") || last.contains(" SAFE "),
            "{u}: {last}"
        );
        // The agent may read everything and nothing more.
        let unit = std::fs::read_to_string(&path).unwrap();
        if u.starts_with("vaultik-agent") || u.starts_with("vaultik-backup") {
            assert!(unit.contains("CapabilityBoundingSet=CAP_DAC_READ_SEARCH\n"));
            assert!(
                unit.contains("ProtectSystem=strict\n")
                    && unit.contains("StateDirectory=vaultik\n")
            );
        }
    }
}
