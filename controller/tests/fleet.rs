//! The fleet link end to end, over real TLS and real brokers on 127.0.0.1: the
//! controller's own mosquitto and an external one started from the shipped config.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Agent, Broker, Fleet, Rclone, eventually};

fn q(sql: &str, id: &str) -> String {
    sql.replace("$A", &format!("'{id}'"))
}

fn end_to_end(broker: Broker) {
    let s3 = Rclone::start();
    let fleet = Fleet::start(broker);
    let mut a = Agent::enroll(&fleet, &s3, "pi", "");
    // A fifo is skipped with a note, which reaches the controller as a job log line.
    let fifo = a.dir.path().join("src/pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    a.start();
    eventually(30, "the hello", || {
        fleet.count(&q(
            "SELECT count(*) FROM agents WHERE id = $A AND online = 1 AND version IS NOT NULL AND arch IS NOT NULL
             AND capabilities = 'backup,verify,cancel,inotify'",
            &a.id,
        )) == 1
    });
    eventually(30, "a heartbeat", || {
        fleet.count(&q(
            "SELECT count(*) FROM heartbeats WHERE agent = $A AND memory_total > 0",
            &a.id,
        )) > 0
    });
    let out = fleet.ctl(&["run-backup", &a.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let command = String::from_utf8(out.stdout).unwrap().trim().to_string();
    eventually(60, "the snapshot at the controller", || {
        fleet.count(&q("SELECT count(*) FROM snapshots WHERE agent = $A", &a.id)) == 1
    });
    assert_eq!(s3.manifests("pi"), 1, "the backup is in the bucket");
    let (state, files, snapshot, cmd): (String, i64, String, String) = fleet
        .db()
        .query_row(
            &q(
                "SELECT state, files, snapshot, command FROM jobs WHERE agent = $A",
                &a.id,
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), files), ("finished", 20));
    assert_eq!(cmd, command, "the job names the command that asked for it");
    let line: String = fleet
        .db()
        .query_row(
            &q(
                "SELECT level || ' ' || line FROM job_logs WHERE agent = $A",
                &a.id,
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        line.starts_with("info note: not backing up special file") && line.contains("src/pipe"),
        "{line}"
    );
    let recorded: String = fleet
        .db()
        .query_row(
            &q("SELECT id FROM snapshots WHERE agent = $A", &a.id),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recorded, snapshot);
    assert_eq!(
        fleet.count(&format!(
            "SELECT count(*) FROM commands WHERE id = '{command}' AND accepted = 1"
        )),
        1,
        "the command was acknowledged"
    );
    let agents = fleet.ctl(&["agents"]);
    let listing = String::from_utf8_lossy(&agents.stdout);
    assert!(
        listing.contains(&a.id) && listing.contains("online"),
        "{listing}"
    );

    // A graceful stop says offline at once.
    a.stop();
    eventually(15, "offline after the agent stops", || {
        fleet.count(&q(
            "SELECT count(*) FROM agents WHERE id = $A AND online = 0",
            &a.id,
        )) == 1
    });
}

#[test]
fn end_to_end_over_the_embedded_broker() {
    end_to_end(Broker::Embedded);
}

#[test]
fn end_to_end_over_an_external_mosquitto() {
    end_to_end(Broker::External);
}

/// Waits until the controller has the agent's hello.
fn wait_online(fleet: &Fleet, agent: &str) {
    eventually(30, "the agent online", || {
        fleet.count(&q(
            "SELECT count(*) FROM agents WHERE id = $A AND online = 1 AND version IS NOT NULL",
            agent,
        )) == 1
    });
}

/// Waits until the controller knows `n` jobs of `agent` have started.
fn wait_started(fleet: &Fleet, agent: &str, n: i64) {
    eventually(60, "a started job", || {
        fleet.count(&q("SELECT count(*) FROM jobs WHERE agent = $A", agent)) == n
    });
}

#[test]
fn a_killed_broker_or_controller_loses_nothing_and_repeats_nothing() {
    let s3 = Rclone::start();
    let mut fleet = Fleet::start(Broker::Embedded);
    let mut a = Agent::enroll(&fleet, &s3, "nas", "");
    // Enough data that the backup is still running when the kill comes.
    let big = a.dir.path().join("src/big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..40u32 {
        let bytes: Vec<u8> = (0..1_000_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
            .collect();
        std::fs::write(big.join(format!("{i}.bin")), bytes).unwrap();
    }
    a.start();
    wait_online(&fleet, &a.id);

    // 1. The broker dies mid-run; the controller's supervisor restarts it.
    let broker = fleet.embedded_broker_pid().unwrap();
    assert!(fleet.ctl(&["run-backup", &a.id]).status.success());
    wait_started(&fleet, &a.id, 1);
    common::signal(broker, common::Signal::KILL);
    eventually(
        90,
        "the first job reported after the broker came back",
        || {
            fleet.count(&q(
                "SELECT count(*) FROM jobs WHERE agent = $A AND state = 'finished'",
                &a.id,
            )) == 1
        },
    );
    assert_ne!(fleet.embedded_broker_pid(), Some(broker), "a new broker");

    // 2. The controller dies mid-run (SIGKILL: nothing is flushed) and comes back.
    assert!(fleet.ctl(&["run-backup", &a.id]).status.success());
    std::fs::write(a.dir.path().join("src/docs/changed.txt"), "new").unwrap();
    wait_started(&fleet, &a.id, 2);
    fleet.stop_controller(common::Signal::KILL);
    std::thread::sleep(Duration::from_secs(2));
    fleet.start_controller();
    eventually(
        90,
        "the second job reported after the controller came back",
        || {
            fleet.count(&q(
                "SELECT count(*) FROM jobs WHERE agent = $A AND state = 'finished'",
                &a.id,
            )) == 2
        },
    );
    eventually(30, "both snapshots", || {
        fleet.count(&q("SELECT count(*) FROM snapshots WHERE agent = $A", &a.id)) == 2
    });
    assert_eq!(s3.manifests("nas"), 2);
    // Every event took effect once: two jobs, two snapshots, two acknowledged commands.
    assert_eq!(
        fleet.count(&q("SELECT count(*) FROM jobs WHERE agent = $A", &a.id)),
        2
    );
    assert_eq!(
        fleet.count(&q(
            "SELECT count(*) FROM commands WHERE agent = $A AND acked_ms IS NOT NULL",
            &a.id
        )),
        2
    );
    // The agent's outbox is empty: everything was acknowledged.
    eventually(30, "an empty outbox", || {
        let c = rusqlite::Connection::open(a.dir.path().join("state/outbox.sqlite")).unwrap();
        c.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .unwrap()
            == 0
    });
}

#[test]
fn backups_run_on_time_while_the_controller_is_down_and_are_reported_later() {
    let s3 = Rclone::start();
    let mut fleet = Fleet::start(Broker::Embedded);
    let mut a = Agent::enroll(&fleet, &s3, "pi", "");
    a.start();
    wait_online(&fleet, &a.id);
    let out = fleet.ctl(&["policy", &a.id, "--every", "2s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(30, "the policy acknowledged", || {
        fleet.count(&q(
            "SELECT count(*) FROM commands WHERE agent = $A AND accepted = 1",
            &a.id,
        )) == 1
    });
    eventually(30, "a first scheduled backup", || s3.manifests("pi") >= 1);

    fleet.stop_controller(common::Signal::TERM);
    let before = s3.manifests("pi");
    std::thread::sleep(Duration::from_secs(9));
    let during = s3.manifests("pi") - before;
    assert!(
        during >= 3,
        "{during} backups in 9 s on a 2 s schedule with the controller down"
    );

    fleet.start_controller();
    fleet.wait_linked();
    eventually(
        60,
        "every snapshot made while it was down, reported",
        || {
            fleet.count(&q("SELECT count(*) FROM snapshots WHERE agent = $A", &a.id)) as usize
                >= before + during
        },
    );
    let times: Vec<i64> = {
        let db = fleet.db();
        let mut st = db
            .prepare(&q(
                "SELECT time_ms FROM snapshots WHERE agent = $A ORDER BY time_ms",
                &a.id,
            ))
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // The schedule counts from when a job is started; a snapshot's time is taken after
    // the job's own start-up, which varies with load by a few hundred ms. A run fired
    // twice per period would show a gap of one run's length instead.
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= 1_500,
            "runs keep the 2 s schedule: {times:?}"
        );
    }
}
