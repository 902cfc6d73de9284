//! The command line: `serve` (the default) and the admin commands that work on the
//! database beside a running controller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use controller::db::{Db, now_ms};
use controller::pki::Ca;
use wire::id::AgentId;
use wire::message::{CommandBody, Policy, Retention, Schedule};

#[derive(Parser)]
#[command(
    name = "vaultik-controller",
    version,
    about = "The vaultik fleet controller: enrollment, the MQTT link, and the fleet's records"
)]
pub struct Cli {
    /// Directory for the database, the PKI and the broker's files.
    #[arg(
        long,
        global = true,
        env = "VAULTIK_CONTROLLER_DATA",
        default_value = "/var/lib/vaultik-controller"
    )]
    pub data: PathBuf,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the controller (the default): its broker, the enrollment endpoint, ingest.
    Serve(ServeArgs),
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List the enrolled agents.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its certificates stop working and its live session is closed.
    Revoke { agent: String },
    /// Ask an agent to back up now.
    RunBackup { agent: String },
    /// Ask an agent to verify its newest snapshot.
    Verify { agent: String },
    /// Set an agent's policy: what and when it backs up.
    Policy(PolicyArgs),
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a single-use enrollment token.
    Create {
        /// How long the token stays usable, e.g. 30m, 24h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        /// A note for the records (which machine it is for).
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// The enrollment endpoint (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen_https: SocketAddr,
    /// The broker's TLS listener, for the broker the controller runs.
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub listen_mqtt: SocketAddr,
    /// Names (DNS or IP) agents use to reach this controller; they go into the server
    /// certificate. Default: localhost, 127.0.0.1 and this host's name.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Use an external broker (mosquitto with deploy/mosquitto/vaultik.conf) at
    /// mqtts://HOST:PORT instead of running one.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// The external broker's pid file, to make it reload the ACL and CRL.
    #[arg(long, requires = "broker_url")]
    pub broker_pid_file: Option<PathBuf>,
    /// Where agents reach the broker, when not at the controller's own address, as
    /// HOST:PORT.
    #[arg(long)]
    pub broker_public: Option<String>,
    /// The mosquitto program the controller runs.
    #[arg(long, default_value = "mosquitto")]
    pub mosquitto: String,
    /// How long an agent certificate is valid; agents renew at two thirds of it.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub agent_cert_validity: Duration,
    /// An agent silent this long is offline (agents send a heartbeat every 30 s).
    #[arg(long, default_value = "95s", value_parser = humantime::parse_duration)]
    pub offline_after: Duration,
}

#[derive(Args)]
pub struct PolicyArgs {
    pub agent: String,
    /// Back up at this interval, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "cron")]
    pub every: Option<Duration>,
    /// Back up on this five-field cron schedule, e.g. "0 3 * * *".
    #[arg(long)]
    pub cron: Option<String>,
    /// Source directories (default: those of the agent's config).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Exclude patterns (default: those of the agent's config).
    #[arg(long = "exclude")]
    pub excludes: Vec<String>,
    /// Never start two scheduled backups closer than this.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub min_gap: Duration,
    /// Stat every file at this interval; between full scans only directories inotify
    /// reported changed are scanned.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub full_scan: Duration,
    #[arg(long)]
    pub keep_last: Option<u32>,
    #[arg(long)]
    pub keep_daily: Option<u32>,
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// A destination named in the agent's config (default: its only one).
    #[arg(long, default_value = "default")]
    pub destination: String,
}

pub fn run(cli: Cli) -> Result<()> {
    let data = cli.data;
    match cli.cmd {
        None => crate::serve::run(&data, default_serve()),
        Some(Cmd::Serve(args)) => crate::serve::run(&data, args),
        Some(Cmd::Token {
            cmd: TokenCmd::Create { valid_for, note },
        }) => {
            let db = open_db(&data)?;
            let ca = Ca::load_or_create(&data)?;
            let secret = db.create_token(valid_for, &note)?;
            let until = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + valid_for);
            println!("{secret}.{}", ca.fingerprint());
            eprintln!(
                "Single use, valid until {until}. On the agent:\n  vaultik enroll --controller https://HOST:PORT --token <the token above>"
            );
            Ok(())
        }
        Some(Cmd::Agents { json }) => agents(&open_db(&data)?, json),
        Some(Cmd::Revoke { agent }) => {
            let agent = agent_id(&agent)?;
            open_db(&data)?.revoke(&agent)?;
            println!("revoked {agent}");
            Ok(())
        }
        Some(Cmd::RunBackup { agent }) => queue(&data, &agent, CommandBody::RunBackup),
        Some(Cmd::Verify { agent }) => queue(&data, &agent, CommandBody::Verify),
        Some(Cmd::Policy(p)) => policy(&data, p),
    }
}

fn default_serve() -> ServeArgs {
    match Cli::parse_from(["vaultik-controller", "serve"]).cmd {
        Some(Cmd::Serve(args)) => args,
        _ => unreachable!("`serve` parses as Cmd::Serve"),
    }
}

pub fn open_db(data: &Path) -> Result<Db> {
    controller::files::private_dir(data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    Ok(Db::open(&data.join("controller.sqlite"))?)
}

fn agent_id(s: &str) -> Result<AgentId> {
    match AgentId::parse(s) {
        Some(a) => Ok(a),
        None => bail!(
            "{s:?} is not an agent id (32 lowercase hex digits; see `vaultik-controller agents`)"
        ),
    }
}

fn queue(data: &Path, agent: &str, body: CommandBody) -> Result<()> {
    let id = open_db(data)?.queue_command(&agent_id(agent)?, &body)?;
    println!("{id}");
    Ok(())
}

fn agents(db: &Db, json: bool) -> Result<()> {
    let rows = db.agents()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32}  {:<8}  {:<20}  {:<20}  SNAPSHOTS",
        "AGENT", "STATE", "NAME", "LAST BACKUP"
    );
    for r in rows {
        let state = if r.revoked {
            "revoked"
        } else if r.online {
            "online"
        } else {
            "offline"
        };
        let last = r.last_backup_ms.map_or_else(|| "never".into(), ago);
        let name = controller::text::printable(&r.display_name, 20);
        println!(
            "{:<32}  {state:<8}  {name:<20}  {last:<20}  {}",
            r.id, r.snapshots
        );
    }
    Ok(())
}

fn ago(ms: i64) -> String {
    let secs = u64::try_from(now_ms().saturating_sub(ms) / 1000).unwrap_or(0);
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn policy(data: &Path, p: PolicyArgs) -> Result<()> {
    let agent = agent_id(&p.agent)?;
    let schedule = match (p.every, p.cron) {
        (Some(every), None) => Schedule::Every {
            seconds: every.as_secs().max(1),
        },
        (None, Some(expr)) => {
            croner_check(&expr)?;
            Schedule::Cron(bounded(&expr, "--cron")?)
        }
        _ => bail!("give the schedule: --every DURATION or --cron EXPRESSION"),
    };
    let policy = Policy {
        revision: 0,
        source_dirs: list(&p.sources, "--source")?,
        exclude: list(&p.excludes, "--exclude")?,
        schedule,
        min_time_between_runs_s: p.min_gap.as_secs(),
        full_scan_interval_s: p.full_scan.as_secs(),
        retention: Retention {
            keep_last: p.keep_last,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
            ..Retention::default()
        },
        destination: bounded(&p.destination, "--destination")?,
    };
    let revision = open_db(data)?.set_policy(&agent, policy)?;
    println!("policy revision {revision} queued for {agent}");
    Ok(())
}

fn croner_check(expr: &str) -> Result<()> {
    match wire::message::parse_cron(expr) {
        Ok(_) => Ok(()),
        Err(why) => bail!("--cron {expr:?}: {why}"),
    }
}

fn bounded<const N: usize>(s: &str, what: &str) -> Result<wire::heapless::String<N>> {
    wire::heapless::String::try_from(s)
        .map_err(|_| anyhow::anyhow!("{what} {s:?}: longer than {N} bytes"))
}

fn list<const N: usize, const M: usize>(
    items: &[String],
    what: &str,
) -> Result<wire::heapless::Vec<wire::heapless::String<M>, N>> {
    let mut out = wire::heapless::Vec::new();
    for i in items {
        out.push(bounded(i, what)?)
            .map_err(|_| anyhow::anyhow!("{what}: at most {N} of them"))?;
    }
    Ok(out)
}
