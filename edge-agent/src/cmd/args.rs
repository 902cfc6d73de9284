//! Every argument of the command line, with the help a user reads.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use edge_agent::config::DEFAULT_INDEX_PREFIX;
use edge_agent::prune::parse_duration;

const AFTER_HELP: &str = "\
Exit status: 0 success; 1 failure; 2 usage error; 3 finished, but some files were
skipped (backup) or are damaged or refused (restore, fetch, verify).

Commands that read backups need the private key: set VAULTIK_PRIVATE_KEY to the
contents of the key file (or VAULTIK_PRIVATE_KEY_FILE to its path). S3 settings come
from --config or from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_REGION.";

#[derive(Parser)]
#[command(
    name = "vaultik",
    version,
    about = "Zero-trust incremental backups to S3, encrypted to age public keys",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Show the full detail of storage errors and of each retry.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Keep retrying a failing storage request (refused or dropped connections,
    /// timeouts, 5xx answers) for this long before giving up, e.g. 30s, 10m, 1h.
    /// Default: the config's `retry_for`, else 10m.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub retry_for: Option<Duration>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Back up the directories of CONFIG (needs no private key).
    Backup {
        /// The agent's YAML config: source_dirs, exclude, age_recipient(s), the
        /// destination (s3: or destination:), index_path and tuning; see the README.
        config: PathBuf,
        /// Print nothing unless something fails.
        #[arg(long)]
        cron: bool,
        /// Keep running and back up every `backup_interval` of the config.
        #[arg(long, conflicts_with = "cron")]
        daemon: bool,
        /// Re-read every file even if its size, times and inode are unchanged.
        #[arg(long)]
        rehash: bool,
    },
    /// Restore a whole snapshot into TARGET_DIR.
    Restore {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        snapshot: SnapshotArg,
        /// Directory that receives the snapshot with its full paths: /srv/a.txt comes
        /// back as TARGET_DIR/srv/a.txt. Created if missing.
        target_dir: PathBuf,
        #[command(flatten)]
        opts: RestoreArgs,
    },
    /// Restore one file or directory of a snapshot.
    Fetch {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        snapshot: SnapshotArg,
        /// The path as backed up, e.g. /etc/hosts (`vaultik ls` shows them). A
        /// directory comes back with everything below it.
        filepath: String,
        /// An existing directory to put it in, or a new path to restore it as.
        target: PathBuf,
        #[command(flatten)]
        opts: RestoreArgs,
    },
    /// List the files and directories of a snapshot.
    Ls {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        snapshot: SnapshotArg,
        /// Directory to list (its children), or a single entry to show; default: the
        /// top of the snapshot.
        path: Option<String>,
        /// Show type and mode, owner, size and modification time (UTC).
        #[arg(long, short)]
        long: bool,
        /// List everything below PATH, not only its children.
        #[arg(long, short = 'R')]
        recursive: bool,
        /// Machine-readable output: one JSON array of entries.
        #[arg(long, conflicts_with = "long")]
        json: bool,
    },
    /// List snapshots, oldest first.
    Snapshots {
        #[command(flatten)]
        repo: RepoArgs,
        /// Machine-readable output, with full ids.
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots by retention rules and delete blobs no kept snapshot uses.
    ///
    /// Rules apply per agent (see --group-by); a snapshot is kept if any rule keeps
    /// it, and the newest snapshot of every agent is always kept. With no rule, every
    /// snapshot is kept and only unused blobs are deleted.
    Prune {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Delete only blobs uploaded longer ago than this: longer than your longest
        /// backup plus 6 hours (at least 7h unless --allow-short-margin).
        #[arg(long, default_value = "48h", value_parser = parse_duration)]
        safety_margin: Duration,
        /// Accept a safety margin under 7h (only when no backup can run meanwhile).
        #[arg(long)]
        allow_short_margin: bool,
        /// Print the plan and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go on even if a snapshot is dated more than 15 minutes ahead of the storage
        /// server's clock (by default that stops prune: a wrong clock or a forgery).
        #[arg(long)]
        allow_future_snapshots: bool,
    },
    /// Check that snapshots are complete.
    ///
    /// With BUCKET PREFIX (and the private key): every snapshot, optionally reading
    /// blob data. With only --config (on the agent, no key needed): the blobs of the
    /// newest snapshot exist with the right sizes.
    Verify {
        /// Bucket name or URL (s3://bucket, file:///path), as for `restore`.
        bucket: Option<String>,
        /// Key prefix inside the bucket ("" for none).
        prefix: Option<String>,
        /// The agent's config: agent mode, or where S3 settings come from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where manifests and metadata live below the prefix.
        #[arg(long, default_value = DEFAULT_INDEX_PREFIX)]
        index_prefix: String,
        /// Download, decrypt and hash-check every blob.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Download and check a random share of the blobs, e.g. 10%.
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        read_data_subset: Option<f64>,
    },
    /// Print a new age key pair (the public key also goes to stderr).
    ///
    /// The public key (age1…) goes into the agent's config as `age_recipient`; keep
    /// the private key (AGE-SECRET-KEY-1…) off the backed-up hosts.
    Keygen {
        /// Write the key file here (mode 0600) instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Join a fleet: make this agent's key, have the controller sign its certificate,
    /// and keep both in the state directory (needs no private age key).
    Enroll {
        /// The controller's enrollment endpoint, e.g. https://controller:8443.
        #[arg(long)]
        controller: String,
        /// The token `vaultik-controller token create` printed (single use).
        #[arg(long, env = "VAULTIK_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The agent's config: its `state_dir` (default: the directory of
        /// `index_path`) receives the identity.
        #[arg(long, conflicts_with = "state_dir")]
        config: Option<PathBuf>,
        /// Put the identity here instead (default: /var/lib/vaultik).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// A name for people to recognise this host by (default: its hostname).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run as the fleet's agent: back up on the controller's schedule (or the
    /// config's `backup_interval`), run its commands, report to it. Keeps backing up
    /// on schedule when the controller is unreachable.
    Agent {
        /// The agent's YAML config, as for `backup`.
        config: PathBuf,
    },
}

/// Where the backups are.
#[derive(Args)]
pub struct RepoArgs {
    /// Bucket name (S3 settings from --config or the AWS_* variables), or a URL:
    /// s3://bucket, file:///path/to/dir.
    pub bucket: String,
    /// Key prefix inside the bucket that the agent wrote to (its config's s3.prefix);
    /// "" for none.
    pub prefix: String,
    /// An agent config to take the S3 endpoint and credentials from.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where manifests and metadata live below the prefix.
    #[arg(long, default_value = DEFAULT_INDEX_PREFIX)]
    pub index_prefix: String,
}

#[derive(Args)]
pub struct SnapshotArg {
    /// A snapshot id as `vaultik snapshots` shows it, any unique prefix of one, or
    /// `latest` for the newest.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: String,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// For the last N hours that have snapshots, keep the newest of each hour (UTC).
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// For the last N days that have snapshots, keep the newest of each day (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// For the last N ISO weeks that have snapshots, keep the newest of each week.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// For the last N months that have snapshots, keep the newest of each month.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// For the last N years that have snapshots, keep the newest of each year.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot taken within this long of the group's newest (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_within: Option<Duration>,
    /// Apply the rules per agent (each agent's index has a random id), per host
    /// name, or per host name and set of paths. Host names can be forged by anyone who
    /// can write to the bucket; agent ids cannot be guessed.
    #[arg(long, value_enum, default_value = "agent")]
    pub group_by: GroupArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GroupArg {
    Host,
    HostPaths,
    Agent,
}

impl PolicyArgs {
    pub fn policy(&self) -> edge_agent::prune::Policy {
        use edge_agent::prune::GroupBy;
        edge_agent::prune::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            group_by: match self.group_by {
                GroupArg::Host => GroupBy::Host,
                GroupArg::HostPaths => GroupBy::HostPaths,
                GroupArg::Agent => GroupBy::Agent,
            },
        }
    }
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Blobs downloaded at once (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub parallel: usize,
    /// No progress display and no summary.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if (0.0..=100.0).contains(&n) && n > 0.0 {
        Ok(n)
    } else {
        Err(format!("{s:?} is outside 0% ..= 100%"))
    }
}
