//! Starting and stopping the controller's parts in order: database and PKI, the
//! broker's files, the broker, the enrollment endpoint, the link. On SIGTERM or
//! Ctrl-C the link stops reading, commits what it has, and the broker stops last.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicI32;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use controller::broker::{self, BrokerFiles, Reloader};
use controller::db::Db;
use controller::enroll::{self, Enroller};
use controller::link::{self, Endpoint, Settings};
use controller::pki::Ca;

use crate::cli::{ServeArgs, open_db};

pub fn run(data: &Path, args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(data, args))
}

fn names(args: &ServeArgs) -> Vec<String> {
    if !args.names.is_empty() {
        return args.names.clone();
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(h) = rustix::system::uname().nodename().to_str()
        && !h.is_empty()
    {
        names.push(h.to_string());
    }
    names
}

/// Where the controller's own MQTT client connects, and how it makes the broker reload.
fn broker_endpoint(args: &ServeArgs, pid: &Arc<AtomicI32>) -> Result<(String, u16, Reloader)> {
    let Some(url) = &args.broker_url else {
        let ip = args.listen_mqtt.ip();
        let host = if ip.is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            ip.to_string()
        };
        return Ok((
            host,
            args.listen_mqtt.port(),
            Reloader::Supervised(pid.clone()),
        ));
    };
    let Some(rest) = url.strip_prefix("mqtts://") else {
        bail!("--broker-url {url}: use mqtts://HOST:PORT (TLS is required)");
    };
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .with_context(|| format!("--broker-url {url}: expected mqtts://HOST:PORT"))?;
    let reload = match &args.broker_pid_file {
        Some(p) => Reloader::PidFile(p.clone()),
        None => {
            tracing::warn!(
                "no --broker-pid-file: the external broker will not reload revocations by itself"
            );
            Reloader::None
        }
    };
    Ok((host, port, reload))
}

async fn wait_for_port(host: &str, port: u16) -> Result<()> {
    let addr: SocketAddr = (host, port)
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{host}:{port} does not resolve"))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the broker does not listen on {addr} after 10 s")
}

async fn serve(data: &Path, args: ServeArgs) -> Result<()> {
    let db = open_db(data)?;
    let ca = Arc::new(Ca::load_or_create(data)?);
    ca.write_service_certs(&names(&args))?;
    let files = BrokerFiles::new(data)?;
    files.write_acl(&db.revoked_agents()?)?;
    files.write_crl(&ca.crl_pem(&db.revoked_serials()?, 1)?)?;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // The broker stops last, after the link has committed what it read.
    let (broker_stop_tx, broker_stop) = tokio::sync::watch::channel(false);
    let pid = Arc::new(AtomicI32::new(0));
    let (host, port, reloader) = broker_endpoint(&args, &pid)?;
    let mut tasks = Vec::new();
    let supervised = args.broker_url.is_none();
    if supervised {
        files.write_config(&ca.layout, args.listen_mqtt)?;
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let broker = tokio::spawn(broker::supervise(
            args.mosquitto.clone(),
            files.config(),
            pid.clone(),
            broker_stop,
            started_tx,
        ));
        started.await.context("the broker supervisor ended")??;
        wait_for_port(&host, port).await?;
        tasks.push(("broker", broker));
    }

    let listener = enroll::bind(args.listen_https).await?;
    let tls = enroll::tls_config(
        &std::fs::read(ca.layout.server_cert())?,
        &std::fs::read(ca.layout.server_key())?,
    )?;
    let (public_host, public_port) = match &args.broker_public {
        Some(hp) => {
            let (h, p) = hp
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .with_context(|| format!("--broker-public {hp}: expected HOST:PORT"))?;
            (Some(h), p)
        }
        None if supervised => (None, args.listen_mqtt.port()),
        None => (Some(host.clone()), port),
    };
    let enroller = Arc::new(Enroller {
        db: std::sync::Mutex::new(Db::open(&data.join("controller.sqlite"))?),
        ca: ca.clone(),
        cert_validity: args.agent_cert_validity,
        broker_host: public_host,
        broker_port: public_port,
    });
    let https = tokio::spawn(enroll::serve(
        listener,
        tls,
        enroll::router(enroller),
        stop.clone(),
    ));

    let settings = Settings {
        endpoint: Endpoint {
            host,
            port,
            ca_pem: ca.cert_pem.clone().into_bytes(),
        },
        cert_pem: std::fs::read(ca.layout.client_cert())?,
        key_pem: std::fs::read(ca.layout.client_key())?,
        agent_cert_validity: args.agent_cert_validity,
        offline_after: args.offline_after,
        resend_after: Duration::from_secs(30),
    };
    let link = tokio::spawn(link::run(settings, db, ca, (files, reloader), stop.clone()));
    tracing::info!(
        "serving: enrollment on https://{}, broker on {}",
        args.listen_https,
        if supervised {
            args.listen_mqtt.to_string()
        } else {
            args.broker_url.clone().unwrap_or_default()
        }
    );

    shutdown_signal().await;
    tracing::info!("stopping: committing what has arrived");
    let _ = stop_tx.send(true);
    let _ = link.await;
    let _ = https.await;
    let _ = broker_stop_tx.send(true);
    for (name, task) in tasks {
        if task.await.is_err() {
            tracing::error!("the {name} task failed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
