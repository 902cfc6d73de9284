//! A fleet on 127.0.0.1 for tests: the real controller binary with its mosquitto (or
//! an external mosquitto started from the shipped config), real agents (the `vaultik`
//! binary) enrolled over HTTPS, and `rclone serve s3` as the bucket.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AK: &str = "fleetak";
pub const SK: &str = "fleetsecretkey";
pub const BUCKET: &str = "fleet";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn controller_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vaultik-controller"))
}

/// The agent binary, built beside the controller by `cargo test --workspace`.
pub fn agent_bin() -> PathBuf {
    let p = controller_bin().with_file_name("vaultik");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// Waits until `f` holds, for at most `secs`; panics with `what` otherwise.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

fn wait_port(port: u16) {
    eventually(20, &format!("127.0.0.1:{port} to listen"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

pub use rustix::process::Signal;

pub fn signal(pid: u32, sig: Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    let _ = rustix::process::kill_process(pid, sig);
}

pub fn kill(child: &mut Child, sig: Signal) {
    signal(child.id(), sig);
}

pub struct Rclone {
    pub endpoint: String,
    pub root: tempfile::TempDir,
    child: Child,
}

impl Rclone {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new("rclone")
            .args(["serve", "s3", "--auth-key", &format!("{AK},{SK}")])
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rclone is needed: run ./scripts/test.sh, which installs it");
        wait_port(port);
        Rclone {
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            child,
        }
    }

    /// Snapshot manifests under `prefix` (one per finished backup).
    pub fn manifests(&self, prefix: &str) -> usize {
        fn count(dir: &Path) -> usize {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        count(&p)
                    } else {
                        usize::from(p.to_string_lossy().ends_with(".snapshot"))
                    }
                })
                .sum()
        }
        count(&self.root.path().join(BUCKET).join(prefix))
    }
}

impl Drop for Rclone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which broker the fleet uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// The controller runs mosquitto itself (the default).
    Embedded,
    /// The test runs mosquitto from deploy/mosquitto/vaultik.conf.
    External,
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub https: u16,
    pub mqtt: u16,
    pub broker: Broker,
    pub controller: Option<Child>,
    pub mosquitto: Option<Child>,
}

impl Fleet {
    pub fn start(broker: Broker) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("controller");
        let mut f = Fleet {
            data,
            dir,
            https: free_port(),
            mqtt: free_port(),
            broker,
            controller: None,
            mosquitto: None,
        };
        f.start_controller();
        if broker == Broker::External {
            eventually(20, "the controller's broker files", || {
                f.data.join("broker/crl.pem").exists() && f.data.join("pki/server.crt").exists()
            });
            f.start_mosquitto();
        }
        f.wait_linked();
        f
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("controller.log")
    }

    pub fn start_controller(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut cmd = Command::new(controller_bin());
        cmd.arg("--data").arg(&self.data).arg("serve");
        cmd.args(["--listen-https", &format!("127.0.0.1:{}", self.https)]);
        cmd.args(["--name", "127.0.0.1", "--offline-after", "4s"]);
        match self.broker {
            Broker::Embedded => {
                cmd.args(["--listen-mqtt", &format!("127.0.0.1:{}", self.mqtt)]);
            }
            Broker::External => {
                cmd.args(["--broker-url", &format!("mqtts://127.0.0.1:{}", self.mqtt)]);
                cmd.arg("--broker-pid-file")
                    .arg(self.dir.path().join("mosquitto.pid"));
            }
        }
        cmd.env("VAULTIK_LOG", "info");
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        self.controller = Some(cmd.spawn().unwrap());
        wait_port(self.https);
    }

    /// Mosquitto from the shipped config, with this test's paths and port.
    pub fn start_mosquitto(&mut self) {
        let shipped = include_str!("../../../deploy/mosquitto/vaultik.conf");
        let user = if rustix::process::geteuid().is_root() {
            "user root"
        } else {
            ""
        };
        let conf = shipped
            .replace("/var/lib/vaultik-controller", &self.data.to_string_lossy())
            .replace(
                "/run/mosquitto/vaultik.pid",
                &self.dir.path().join("mosquitto.pid").to_string_lossy(),
            )
            .replace(
                "listener 8883 0.0.0.0",
                &format!("listener {} 127.0.0.1", self.mqtt),
            )
            .replace("user vaultik-controller", user);
        let path = self.dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto is needed: run ./scripts/test.sh, which installs it");
        self.mosquitto = Some(child);
        wait_port(self.mqtt);
    }

    /// Until the controller's own client is connected to the broker.
    pub fn wait_linked(&self) {
        let log = self.log();
        eventually(30, "the controller to connect to its broker", || {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.matches("connected to the broker").count() > 0)
        });
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(controller_bin())
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn token(&self, valid_for: &str) -> String {
        let out = self.ctl(&["token", "create", "--valid-for", valid_for]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.https)
    }

    /// Stops the controller: SIGTERM (graceful) or SIGKILL.
    pub fn stop_controller(&mut self, sig: Signal) {
        if let Some(mut c) = self.controller.take() {
            kill(&mut c, sig);
            let _ = c.wait();
        }
    }

    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.data.join("controller.sqlite")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// The pid of the mosquitto the controller supervises.
    pub fn embedded_broker_pid(&self) -> Option<u32> {
        let out = Command::new("pgrep")
            .args([
                "-f",
                &format!("{}/broker/mosquitto.conf", self.data.display()),
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_controller(Signal::TERM);
        if let Some(mut m) = self.mosquitto.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// One agent: its config, state, sources, and the running `vaultik agent`.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub id: String,
    pub child: Option<Child>,
}

impl Agent {
    /// Writes a config (sources with a little data, the rclone bucket) and enrolls.
    pub fn enroll(fleet: &Fleet, s3: &Rclone, name: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("docs")).unwrap();
        for i in 0..20 {
            std::fs::write(
                src.join(format!("docs/{name}-{i}.txt")),
                format!("{name} {i}\n").repeat(100),
            )
            .unwrap();
        }
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "source_dirs: [{src}]\nage_recipient: age1dt9fd0f6ces2mkxh02yfuz7w7xauncwptqdtdkxseczm5f2ff5lscn5a5x\n\
                 s3:\n  endpoint: {ep}\n  bucket: {BUCKET}\n  prefix: {name}/\n  access_key_id: {AK}\n  secret_access_key: {SK}\n  region: us-east-1\n\
                 index_path: {state}/index.sqlite\nheartbeat_interval: 1s\nretry_for: 5s\n{extra}",
                src = src.display(),
                ep = s3.endpoint,
                state = dir.path().join("state").display(),
            ),
        )
        .unwrap();
        let token = fleet.token("10m");
        let out = Command::new(agent_bin())
            .args([
                "enroll",
                "--controller",
                &fleet.url(),
                "--token",
                &token,
                "--name",
                name,
            ])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let link: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("state/link/link.json")).unwrap(),
        )
        .unwrap();
        let id = link["agent_id"].as_str().unwrap().to_string();
        Agent {
            dir,
            config,
            id,
            child: None,
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(agent_bin())
            .arg("agent")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, Signal::TERM);
            let _ = c.wait();
        }
    }

    pub fn link_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("state/link").join(name)).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
