//! The MQTT broker: Debian's `mosquitto`, either run and supervised by the controller
//! (the default) or run by the admin with the shipped config (`deploy/mosquitto/`).
//! Either way the controller writes the files that carry the policy, in
//! `<data>/broker/`:
//! - `acl`: an agent may write only its own `up` and `status` and read only its own
//!   `down`; its name is its certificate's subject (`use_identity_as_username`);
//!   a revoked agent is denied everything;
//! - `crl.pem`: the serials of revoked agents' certificates, so they cannot connect.
//!
//! and signals the broker (SIGHUP) to reload both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use wire::id::{AgentId, CONTROLLER};
use wire::topic::ROOT;

use crate::files;
use crate::pki::Layout;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "starting {program}: {source} (install Debian's `mosquitto` package, or give --broker-url)"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the broker's pid file {path} does not hold a process id")]
    BadPid { path: PathBuf },
    #[error("signalling the broker (pid {pid}): {source}")]
    Signal { pid: i32, source: std::io::Error },
}

/// The broker's files under `<data>/broker`.
#[derive(Clone)]
pub struct BrokerFiles {
    pub dir: PathBuf,
}

impl BrokerFiles {
    pub fn new(data: &Path) -> Result<Self, BrokerError> {
        let dir = data.join("broker");
        files::private_dir(&dir.join("data")).map_err(|source| BrokerError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(BrokerFiles { dir })
    }
    pub fn acl(&self) -> PathBuf {
        self.dir.join("acl")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("mosquitto.conf")
    }

    fn write(&self, path: &Path, text: &str) -> Result<(), BrokerError> {
        files::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| BrokerError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn write_acl(&self, revoked: &[AgentId]) -> Result<(), BrokerError> {
        self.write(&self.acl(), &acl(revoked))
    }

    pub fn write_crl(&self, pem: &str) -> Result<(), BrokerError> {
        self.write(&self.crl(), pem)
    }

    /// The config of the broker the controller runs itself.
    pub fn write_config(&self, pki: &Layout, listen: SocketAddr) -> Result<(), BrokerError> {
        let text = config(self, pki, listen, rustix::process::geteuid().is_root());
        self.write(&self.config(), &text)
    }
}

/// The access rules. Patterns use `%u`, the certificate subject; a user's own `deny`
/// line is checked before the patterns, which is how a revoked agent is muted.
pub fn acl(revoked: &[AgentId]) -> String {
    let mut out = String::from(
        "# Written by vaultik-controller; it is rewritten at every start and revocation.\n",
    );
    out += &format!("pattern write {ROOT}/%u/up\n");
    out += &format!("pattern write {ROOT}/%u/status\n");
    out += &format!("pattern read {ROOT}/%u/down\n\n");
    out += &format!("user {CONTROLLER}\ntopic readwrite {ROOT}/#\n");
    for a in revoked {
        out += &format!("\nuser {a}\ntopic deny #\n");
    }
    out
}

fn config(files: &BrokerFiles, pki: &Layout, listen: SocketAddr, root: bool) -> String {
    let d = files.dir.display();
    // As root, mosquitto would switch to the `mosquitto` user, which cannot read
    // the controller's private files; it stays the controller's user instead.
    let user = if root { "user root\n" } else { "" };
    format!(
        "# Written by vaultik-controller at every start; edits are lost.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         {user}\
         persistence true\n\
         persistence_location {d}/data/\n\
         autosave_interval 30\n\
         max_queued_messages 10000\n\
         max_packet_size 65536\n\
         acl_file {acl}\n\
         pid_file {d}/mosquitto.pid\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         connection_messages false\n\
         \n\
         # The only listener: TLS with a client certificate required. No plain TCP.\n\
         listener {port} {host}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         crlfile {crl}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         tls_version tlsv1.2\n",
        acl = files.acl().display(),
        port = listen.port(),
        host = listen.ip(),
        ca = pki.ca_cert().display(),
        cert = pki.server_cert().display(),
        key = pki.server_key().display(),
        crl = files.crl().display(),
    )
}

/// How the controller reaches its broker's process to make it reload.
#[derive(Clone)]
pub enum Reloader {
    /// The broker the controller runs: its current pid (0 while it is down).
    Supervised(Arc<AtomicI32>),
    /// An external mosquitto that writes its pid to this file.
    PidFile(PathBuf),
    /// An external broker the controller cannot signal.
    None,
}

impl Reloader {
    /// Asks the broker to reread its ACL and CRL.
    pub fn reload(&self) -> Result<(), BrokerError> {
        let pid = match self {
            Reloader::Supervised(pid) => pid.load(Ordering::SeqCst),
            Reloader::PidFile(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| BrokerError::Io {
                    path: path.clone(),
                    source,
                })?;
                text.trim()
                    .parse()
                    .map_err(|_| BrokerError::BadPid { path: path.clone() })?
            }
            Reloader::None => return Ok(()),
        };
        signal(pid, rustix::process::Signal::HUP)
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) -> Result<(), BrokerError> {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return Ok(());
    };
    rustix::process::kill_process(p, sig).map_err(|e| BrokerError::Signal {
        pid,
        source: e.into(),
    })
}

/// Stops a broker left running from our config by a controller that was killed
/// (SIGKILL gives it no chance to stop its child), so that the new one can listen.
async fn stop_stale(config: &Path) {
    let Some(dir) = config.parent() else { return };
    let Ok(text) = std::fs::read_to_string(dir.join("mosquitto.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let needle = config.as_os_str().as_encoded_bytes();
        c.windows(needle.len()).any(|w| w == needle)
    });
    if !ours {
        return;
    }
    tracing::warn!("stopping a broker (pid {pid}) left running by an earlier controller");
    let _ = signal(pid, rustix::process::Signal::TERM);
    for _ in 0..50 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = signal(pid, rustix::process::Signal::KILL);
}

/// Runs `mosquitto -c <config>`, restarting it (after a pause that grows to 30 s) if it
/// exits, until `stop` fires; then stops it with SIGTERM and waits for it.
pub async fn supervise(
    program: String,
    config: PathBuf,
    pid: Arc<AtomicI32>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    started: tokio::sync::oneshot::Sender<Result<(), BrokerError>>,
) {
    let mut started = Some(started);
    let mut pause = Duration::from_millis(500);
    stop_stale(&config).await;
    loop {
        let child = tokio::process::Command::new(&program)
            .arg("-c")
            .arg(&config)
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(source) => {
                let e = BrokerError::Spawn {
                    program: program.clone(),
                    source,
                };
                match started.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    None => tracing::error!("{e}"),
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let raw = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_default();
        pid.store(raw, Ordering::SeqCst);
        if let Some(tx) = started.take() {
            let _ = tx.send(Ok(()));
        }
        tokio::select! {
            status = child.wait() => {
                pid.store(0, Ordering::SeqCst);
                tracing::error!("the broker exited ({}); restarting it in {pause:?}",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()));
            }
            _ = crate::stopped(&mut stop) => {
                pid.store(0, Ordering::SeqCst);
                let _ = signal(raw, rustix::process::Signal::TERM);
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = crate::stopped(&mut stop) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_confines_agents_to_their_own_leaves_and_mutes_the_revoked() {
        let a = AgentId([0xaa; 16]);
        let text = acl(&[a]);
        assert!(text.contains("pattern write vaultik/agents/%u/up\n"));
        assert!(text.contains("pattern read vaultik/agents/%u/down\n"));
        assert!(!text.contains("pattern readwrite"));
        assert!(text.contains(&format!("user {a}\ntopic deny #\n")));
        assert!(text.contains("user controller\ntopic readwrite vaultik/agents/#\n"));
    }

    #[test]
    fn the_config_has_one_tls_listener_with_client_certificates() {
        let files = BrokerFiles {
            dir: PathBuf::from("/d/broker"),
        };
        let text = config(
            &files,
            &Layout::new(Path::new("/d")),
            "127.0.0.1:8883".parse().unwrap(),
            false,
        );
        assert_eq!(text.matches("listener ").count(), 1);
        assert!(text.contains("listener 8883 127.0.0.1\n"));
        for line in [
            "allow_anonymous false",
            "require_certificate true",
            "use_identity_as_username true",
            "crlfile /d/broker/crl.pem",
        ] {
            assert!(text.contains(line), "{line}");
        }
        assert!(!text.contains("user root"));
    }
}
