//! Every message type against garbage: random bytes, every truncation and single-byte
//! mutations of real encodings. Decoding returns a value or an error, never panics, and
//! whatever decodes encodes again within the size limit.
#![allow(clippy::unwrap_used)]

use heapless::{String as Str, Vec as List};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use wire::message::*;
use wire::{CommandId, DecodeError, JobId, decode, encode};

fn s<const N: usize>(text: &str) -> Str<N> {
    Str::try_from(text).unwrap()
}

fn list<T, const N: usize>(items: impl IntoIterator<Item = T>) -> List<T, N> {
    let mut l = List::new();
    for i in items {
        assert!(l.push(i).is_ok(), "sample too long");
    }
    l
}

fn job(state: JobState) -> Event {
    Event {
        id: 7,
        at_ms: 1_700_000_000_000,
        body: EventBody::Job(JobEvent {
            job: JobId([3; 16]),
            kind: JobKind::Backup,
            command: Some(CommandId([4; 16])),
            state,
        }),
    }
}

fn ups() -> Vec<Up> {
    let totals = JobTotals {
        files: 10,
        files_new: 2,
        files_changed: 1,
        bytes: 1 << 40,
        new_bytes: 5,
        uploaded_bytes: 6,
        skipped: 0,
        duration_ms: 1234,
        snapshot: Some([9; 16]),
    };
    vec![
        Up::Hello(Hello {
            version: s("0.1.0"),
            os: s("linux"),
            arch: s("aarch64"),
            hostname: s("nas-1"),
            capabilities: list([Capability::Backup, Capability::Inotify]),
            policy_revision: Some(3),
            outbox: [8; 16],
        }),
        Up::Heartbeat(Heartbeat {
            at_ms: -1,
            cpu_permille: 1000,
            memory_used: u64::MAX,
            memory_total: 1 << 30,
            disks: list([Disk {
                role: DiskRole::Source,
                mount: s("/srv"),
                total: 1 << 40,
                available: 1 << 39,
            }]),
            next_backup_ms: None,
            outbox: 12,
        }),
        Up::Events(list([
            job(JobState::Started),
            job(JobState::Progress {
                files: 1,
                bytes: 2,
                total_bytes: Some(3),
            }),
            job(JobState::Finished(totals)),
            job(JobState::Failed {
                reason: s("cannot reach http://x: connection refused"),
            }),
            job(JobState::Skipped { reason: s("busy") }),
            job(JobState::Cancelled),
            Event {
                id: 8,
                at_ms: 0,
                body: EventBody::Log {
                    job: JobId([1; 16]),
                    level: Level::Warn,
                    line: s("warning: skipped /x: permission denied"),
                },
            },
            Event {
                id: 9,
                at_ms: 0,
                body: EventBody::Snapshot(SnapshotRecord {
                    id: [2; 16],
                    time_ms: 5,
                    hostname: s("nas-1"),
                    files: 1,
                    bytes: 2,
                }),
            },
            Event {
                id: u64::MAX,
                at_ms: i64::MIN,
                body: EventBody::CommandAck {
                    command: CommandId([5; 16]),
                    accepted: false,
                    reason: s("unknown destination"),
                },
            },
        ])),
        Up::Renew {
            csr_pem: s("-----BEGIN CERTIFICATE REQUEST-----"),
        },
    ]
}

fn downs() -> Vec<Down> {
    let policy = Policy {
        revision: 4,
        source_dirs: list([s("/srv/data"), s("/etc")]),
        exclude: list([s("*.tmp")]),
        schedule: Schedule::Cron(s("0 3 * * *")),
        min_time_between_runs_s: 900,
        full_scan_interval_s: 86_400,
        retention: Retention {
            keep_daily: Some(7),
            ..Retention::default()
        },
        destination: s("default"),
    };
    let cmd = |body| {
        Down::Command(Command {
            id: CommandId([6; 16]),
            body,
        })
    };
    vec![
        cmd(CommandBody::RunBackup),
        cmd(CommandBody::ApplyPolicy(policy)),
        cmd(CommandBody::Verify),
        cmd(CommandBody::Cancel {
            job: JobId([1; 16]),
        }),
        Down::Acked(list([1, 2, u64::MAX])),
        Down::Certificate {
            pem: s("-----BEGIN CERTIFICATE-----"),
        },
    ]
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let bytes = encode(msg).unwrap();
    assert_eq!(&decode::<T>(&bytes).unwrap(), msg);
    // Every proper prefix is an error, not a panic and not a different message.
    for cut in 0..bytes.len() {
        assert!(decode::<T>(&bytes[..cut]).is_err(), "prefix {cut} decoded");
    }
}

#[test]
fn every_message_round_trips_and_no_truncation_decodes() {
    for m in ups() {
        round_trip(&m);
    }
    for m in downs() {
        round_trip(&m);
    }
    round_trip(&Status::Online);
    round_trip(&Status::Offline);
}

#[test]
fn a_string_over_its_bound_is_refused() {
    // A Hello whose version field claims `n` bytes, where at most 64 fit.
    let with_version = |n: u8| {
        let mut b = encode(&Status::Online).unwrap();
        b.truncate(1); // the format
        b.push(0); // Up::Hello
        b.push(n);
        b.extend(std::iter::repeat_n(b'a', n.into()));
        b.extend([0, 0, 0, 0, 0]); // os, arch, hostname, capabilities, no revision
        b.extend([0; 16]); // outbox id
        b
    };
    assert!(matches!(decode::<Up>(&with_version(64)), Ok(Up::Hello(_))));
    assert!(matches!(
        decode::<Up>(&with_version(65)),
        Err(DecodeError::Malformed(_))
    ));
}

/// Decodes `bytes` as `T`; if that works, the value must encode again.
fn no_panic<T: Serialize + DeserializeOwned>(bytes: &[u8]) {
    if let Ok(v) = decode::<T>(bytes) {
        assert!(encode(&v).is_ok());
    }
}

fn all_types(bytes: &[u8]) {
    no_panic::<Up>(bytes);
    no_panic::<Down>(bytes);
    no_panic::<Status>(bytes);
    no_panic::<Policy>(bytes);
    no_panic::<Event>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        all_types(&bytes);
        // With the right format in front, the decoder gets past the version check.
        let mut framed = vec![1u8];
        framed.extend(&bytes);
        all_types(&framed);
    }

    #[test]
    fn mutated_encodings_never_panic(which in 0usize..10, at in any::<usize>(), to in any::<u8>()) {
        let samples: Vec<Vec<u8>> = ups().iter().map(|m| encode(m).unwrap())
            .chain(downs().iter().map(|m| encode(m).unwrap()))
            .collect();
        let mut bytes = samples[which % samples.len()].clone();
        let i = at % bytes.len();
        bytes[i] = to;
        all_types(&bytes);
    }
}
