//! Isolation and identity, tried as an attacker would, on both brokers: an enrolled
//! agent reaching under another's prefix, a revoked agent's live session, expired and
//! foreign certificates, no certificate, spent and expired tokens.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Agent, Broker, Fleet, Rclone, eventually};
use controller::link::{Endpoint, connack, options};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, QoS};
use wire::message::{EventBody, Hello, SnapshotRecord, Status, Up};

fn endpoint(fleet: &Fleet) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port: fleet.mqtt,
        ca_pem: std::fs::read(fleet.data.join("pki/ca.crt")).unwrap(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects with `cert`/`key` (PEM) as `id`; Ok with the live client, or the error.
async fn connect(
    ep: &Endpoint,
    id: &str,
    cert: Vec<u8>,
    key: Vec<u8>,
) -> Result<(AsyncClient, EventLoop), String> {
    let (client, mut ev) = AsyncClient::new(options(ep, id, cert, key), 16);
    connack(&mut ev, Duration::from_secs(10)).await?;
    Ok((client, ev))
}

/// Everything that arrives for `secs`: (topic, payload).
async fn collect(ev: &mut EventLoop, secs: u64) -> Vec<String> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => got.push(p.topic),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    got
}

fn fake_hello() -> Up {
    Up::Hello(Hello {
        version: "evil".try_into().unwrap(),
        os: "x".try_into().unwrap(),
        arch: "x".try_into().unwrap(),
        hostname: "x".try_into().unwrap(),
        capabilities: Default::default(),
        policy_revision: None,
        outbox: [9; 16],
    })
}

fn fake_snapshot() -> Up {
    let mut list = wire::heapless::Vec::new();
    let _ = list.push(wire::message::Event {
        id: 1_000_000,
        at_ms: 0,
        body: EventBody::Snapshot(SnapshotRecord {
            id: [0xee; 16],
            time_ms: 0,
            hostname: "forged".try_into().unwrap(),
            files: 1,
            bytes: 1,
        }),
    });
    Up::Events(list)
}

fn ca_issuer(fleet: &Fleet) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(fleet.data.join("pki/ca.key")).unwrap())
        .unwrap();
    Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(fleet.data.join("pki/ca.crt")).unwrap(),
        key,
    )
    .unwrap()
}

/// A certificate for CN `cn` signed by `issuer`, valid between the two offsets (days).
fn cert(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    from_days: i64,
    to_days: i64,
) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(from_days);
    p.not_after = now + time::Duration::days(to_days);
    let c = p.signed_by(&key, issuer).unwrap();
    (c.pem().into_bytes(), key.serialize_pem().into_bytes())
}

fn isolation(broker: Broker) {
    let s3 = Rclone::start();
    let fleet = Fleet::start(broker);
    let mallory = Agent::enroll(&fleet, &s3, "mallory", "");
    let mut victim = Agent::enroll(&fleet, &s3, "victim", "");
    victim.start();
    let v = victim.id.clone();
    eventually(30, "the victim online", || {
        fleet.count(&format!(
            "SELECT count(*) FROM agents WHERE id = '{v}' AND online = 1 AND version IS NOT NULL"
        )) == 1
    });
    let ep = endpoint(&fleet);
    let rt = rt();

    // An enrolled agent under another's prefix: it hears nothing and changes nothing.
    rt.block_on(async {
        let (client, mut ev) = connect(
            &ep,
            &mallory.id,
            mallory.link_file("agent.crt"),
            mallory.link_file("agent.key"),
        )
        .await
        .expect("mallory's own certificate connects");
        for filter in [
            format!("vaultik/agents/{v}/down"),
            format!("vaultik/agents/{v}/#"),
            "vaultik/#".into(),
            "#".into(),
        ] {
            client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        }
        for (leaf, payload) in [
            ("up", wire::codec::encode(&fake_hello()).unwrap()),
            ("up", wire::codec::encode(&fake_snapshot()).unwrap()),
            ("status", wire::codec::encode(&Status::Offline).unwrap()),
        ] {
            client
                .publish(
                    format!("vaultik/agents/{v}/{leaf}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
        // Garbage and an oversized payload on its own topics are counted and dropped.
        let m = &mallory.id;
        for (leaf, payload) in [
            ("up", b"\xff\xff\xff garbage".to_vec()),
            ("up", vec![1u8; 40 * 1024]),
            ("status", vec![]),
        ] {
            client
                .publish(
                    format!("vaultik/agents/{m}/{leaf}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
        // The victim gets a command and answers it meanwhile.
        assert!(fleet.ctl(&["run-backup", &v]).status.success());
        let heard = collect(&mut ev, 8).await;
        let foreign: Vec<_> = heard.iter().filter(|t| !t.contains(&mallory.id)).collect();
        assert!(foreign.is_empty(), "mallory heard {foreign:?}");
    });
    eventually(60, "the victim's own backup", || {
        fleet.count(&format!(
            "SELECT count(*) FROM snapshots WHERE agent = '{v}'"
        )) == 1
    });
    assert_eq!(
        fleet.count(
            "SELECT coalesce(sum(value), 0) FROM counters WHERE name = 'malformed_messages'"
        ),
        3,
        "each bad payload counted; the controller stayed up (the victim's backup above)"
    );
    assert_eq!(
        fleet.count(&format!(
            "SELECT count(*) FROM agents WHERE id = '{v}' AND version = 'evil'"
        )),
        0
    );
    assert_eq!(
        fleet.count("SELECT count(*) FROM snapshots WHERE hostname = 'forged'"),
        0
    );
    assert_eq!(
        fleet.count(&format!(
            "SELECT count(*) FROM agents WHERE id = '{v}' AND online = 1"
        )),
        1
    );

    // Certificates that must not connect.
    let ours = ca_issuer(&fleet);
    let foreign_ca = {
        let mut p = CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "vaultik fleet CA");
        Issuer::new(p, KeyPair::generate().unwrap())
    };
    rt.block_on(async {
        let (c, k) = cert(&ours, &mallory.id, -10, -1);
        let e = connect(&ep, &mallory.id, c, k)
            .await
            .err()
            .expect("an expired certificate is refused");
        assert!(!e.is_empty());
        let (c, k) = cert(&foreign_ca, &v, -1, 10);
        connect(&ep, &v, c, k)
            .await
            .err()
            .expect("a certificate from another CA is refused");
        let mut no_cert = options(&ep, &mallory.id, vec![], vec![]);
        no_cert.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
            ca: ep.ca_pem.clone(),
            alpn: None,
            client_auth: None,
        }));
        let (_c, mut ev) = AsyncClient::new(no_cert, 4);
        let r = connack(&mut ev, Duration::from_secs(10)).await;
        assert!(r.is_err(), "a client without a certificate is refused");
        // Plain MQTT on the broker's port gets no session: the port speaks only TLS.
        let plain = rumqttc::MqttOptions::new("plain", "127.0.0.1", fleet.mqtt);
        let (_c, mut ev) = AsyncClient::new(plain, 4);
        let r = connack(&mut ev, Duration::from_secs(5)).await;
        assert!(r.is_err(), "plain TCP must not get a session");
    });

    // Revocation cuts the live session and every later connection.
    rt.block_on(async {
        let (_client, mut ev) = connect(
            &ep,
            &mallory.id,
            mallory.link_file("agent.crt"),
            mallory.link_file("agent.key"),
        )
        .await
        .unwrap();
        let out = fleet.ctl(&["revoke", &mallory.id]);
        assert!(out.status.success());
        let cut = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                if ev.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(cut.is_ok(), "the revoked agent's live session was not cut");
        tokio::time::sleep(Duration::from_millis(500)).await;
        connect(
            &ep,
            &mallory.id,
            mallory.link_file("agent.crt"),
            mallory.link_file("agent.key"),
        )
        .await
        .err()
        .expect("a revoked certificate is refused");
    });
    assert!(
        !fleet.ctl(&["run-backup", &mallory.id]).status.success(),
        "no commands for the revoked"
    );
    // The victim is unaffected.
    assert!(victim.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[test]
fn isolation_on_the_embedded_broker() {
    isolation(Broker::Embedded);
}

#[test]
fn isolation_on_an_external_mosquitto() {
    isolation(Broker::External);
}

#[test]
fn tokens_are_single_use_expire_and_name_their_controller() {
    let s3 = Rclone::start();
    let fleet = Fleet::start(Broker::Embedded);
    let enroll = |token: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(common::agent_bin())
            .args(["enroll", "--controller", &fleet.url(), "--token", token])
            .arg("--state-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let token = fleet.token("10m");
    assert!(enroll(&token).0);
    let (ok, err) = enroll(&token);
    assert!(!ok && err.contains("unknown, used or expired"), "{err}");
    let short = fleet.token("1s");
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, err) = enroll(&short);
    assert!(!ok && err.contains("unknown, used or expired"), "{err}");
    // A token whose fingerprint is not this controller's CA is never sent.
    let fresh = fleet.token("10m");
    let (secret, _) = fresh.split_once('.').unwrap();
    let (ok, err) = enroll(&format!("{secret}.{}", "0".repeat(64)));
    assert!(!ok && err.contains("does not match"), "{err}");
    assert!(
        enroll(&fresh).0,
        "the secret was not spent by the refused attempt"
    );
    let (ok, err) = enroll("garbage");
    assert!(!ok && err.contains("malformed"), "{err}");
    assert_eq!(fleet.count("SELECT count(*) FROM agents"), 2);
    drop(s3);
}
