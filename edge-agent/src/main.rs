//! The `vaultik` command line. Exit codes: 0 success; 1 failure; 2 usage error;
//! 3 finished, but some files were skipped (backup) or are damaged (restore, fetch,
//! verify).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use edge_agent::config::{Config, DEFAULT_INDEX_PREFIX, Destination, S3Target};
use edge_agent::crypt::{Identities, keygen};
use edge_agent::progress::Progress;
use edge_agent::restore::{self, Selection};
use edge_agent::snapshot::Manifest;
use edge_agent::store::Repo;
use edge_agent::{backup, store};

const EXIT_PARTIAL: u8 = 3;

#[derive(Parser)]
#[command(
    name = "vaultik",
    version,
    about = "Zero-trust incremental backups to S3, encrypted to age public keys"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up the directories of CONFIG (needs no private key).
    Backup {
        config: PathBuf,
        /// Print nothing unless something fails.
        #[arg(long)]
        cron: bool,
        /// Keep running and back up every `backup_interval`.
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
        snapshot_id: String,
        target_dir: PathBuf,
        #[command(flatten)]
        opts: RestoreArgs,
    },
    /// Restore one file or directory of a snapshot.
    Fetch {
        #[command(flatten)]
        repo: RepoArgs,
        snapshot_id: String,
        /// Path as backed up, e.g. /etc/hosts.
        filepath: String,
        /// Where to put it: an existing directory, or a new path.
        target: PathBuf,
        #[command(flatten)]
        opts: RestoreArgs,
    },
    /// List snapshots.
    Snapshots {
        #[command(flatten)]
        repo: RepoArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots by retention rules and delete blobs no kept snapshot uses.
    Prune {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Delete only blobs uploaded longer ago than this: longer than your longest
        /// backup plus 6 hours (at least 7h unless --allow-short-margin).
        #[arg(long, default_value = "48h", value_parser = edge_agent::prune::parse_duration)]
        safety_margin: Duration,
        /// Accept a safety margin under 7h (only when no backup can run meanwhile).
        #[arg(long)]
        allow_short_margin: bool,
        /// Print the plan and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go on even if a snapshot is dated more than 15 minutes ahead of this
        /// machine's clock (by default that stops prune: a wrong clock or a forgery).
        #[arg(long)]
        allow_future_snapshots: bool,
    },
    /// Check that snapshots are complete. With <bucket> <prefix> (and the private key):
    /// every snapshot, optionally reading blob data. With only --config (on the agent, no
    /// key): the blobs of the newest snapshot exist with the right sizes.
    Verify {
        bucket: Option<String>,
        prefix: Option<String>,
        /// Agent config (for agent mode, or for S3 settings).
        #[arg(long)]
        config: Option<PathBuf>,
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
    Keygen {
        /// Write the key file here (mode 0600) instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RepoArgs {
    /// Bucket name, or a URL: s3://bucket, file:///path.
    bucket: String,
    /// Key prefix inside the bucket ("" for none).
    prefix: String,
    /// Agent config to take the S3 endpoint and credentials from (else AWS_* variables).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_INDEX_PREFIX)]
    index_prefix: String,
}

#[derive(Args)]
struct PolicyArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every snapshot within this long of the newest (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = edge_agent::prune::parse_duration)]
    keep_within: Option<Duration>,
    /// Apply the rules per agent index (each config's index is one agent), per host
    /// name, or per host name and set of paths. Host names can be forged by anyone who
    /// can write to the bucket; agent ids cannot be guessed.
    #[arg(long, value_enum, default_value = "agent")]
    group_by: GroupArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GroupArg {
    Host,
    HostPaths,
    Agent,
}

impl PolicyArgs {
    fn policy(&self) -> edge_agent::prune::Policy {
        edge_agent::prune::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            group_by: match self.group_by {
                GroupArg::Host => edge_agent::prune::GroupBy::Host,
                GroupArg::HostPaths => edge_agent::prune::GroupBy::HostPaths,
                GroupArg::Agent => edge_agent::prune::GroupBy::Agent,
            },
        }
    }
}

#[derive(Args)]
struct RestoreArgs {
    /// Blobs downloaded at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vaultik: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen { output } => {
            let (text, public) = keygen();
            match output {
                Some(path) => write_key(&path, &text)?,
                None => print!("{text}"),
            }
            eprintln!("Public key: {public}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backup {
            config,
            cron,
            daemon,
            rehash,
        } => {
            let cfg = Config::load(&config)?;
            let rt = runtime()?;
            let repo = Repo::open(
                &cfg.destination,
                &cfg.index_prefix,
                true,
                rt.handle().clone(),
            )?;
            if daemon {
                return daemon_loop(&cfg, &repo, rehash);
            }
            backup_once(&cfg, &repo, !cron, rehash)
        }
        Cmd::Snapshots { repo, json } => {
            let rt = runtime()?;
            let (repo, ids) = open_restore_side(&repo, &rt)?;
            let catalog = restore::list_snapshots(&repo, &ids)?;
            for w in catalog.warnings() {
                eprintln!("{w}");
            }
            let list = catalog.snapshots;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &list)?;
                writeln!(out)?;
            } else {
                print_snapshots(&list, &mut out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            bucket,
            prefix,
            config,
            index_prefix,
            read_data,
            read_data_subset,
        } => {
            let rt = runtime()?;
            let read = match (read_data, read_data_subset) {
                (true, _) => edge_agent::verify::ReadData::All,
                (false, Some(p)) => edge_agent::verify::ReadData::Subset(p),
                (false, None) => edge_agent::verify::ReadData::None,
            };
            let report = match (bucket, config) {
                (Some(bucket), config) => {
                    let args = RepoArgs {
                        bucket,
                        prefix: prefix.unwrap_or_default(),
                        config,
                        index_prefix,
                    };
                    let (repo, ids) = open_restore_side(&args, &rt)?;
                    edge_agent::verify::verify(&repo, &ids, read)?
                }
                (None, Some(config)) => {
                    if read != edge_agent::verify::ReadData::None {
                        bail!(
                            "reading blob data needs the private key: give <bucket> <prefix> and set VAULTIK_PRIVATE_KEY"
                        );
                    }
                    let cfg = Config::load(&config)?;
                    let repo = Repo::open(
                        &cfg.destination,
                        &cfg.index_prefix,
                        false,
                        rt.handle().clone(),
                    )?;
                    if !cfg.index_path.exists() {
                        bail!(
                            "no local index at {}: nothing to verify until a backup has run",
                            cfg.index_path.display()
                        );
                    }
                    let index = edge_agent::index::Index::open_read_only(&cfg.index_path)?;
                    edge_agent::verify::verify_from_index(&repo, &index)?
                }
                (None, None) => {
                    bail!("give <bucket> <prefix> (with the private key) or --config (agent mode)")
                }
            };
            report.print(&mut std::io::stdout().lock())?;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_PARTIAL)
            })
        }
        Cmd::Prune {
            repo,
            policy,
            safety_margin,
            dry_run,
            allow_future_snapshots,
            allow_short_margin,
        } => {
            let rt = runtime()?;
            let (repo, ids) = open_restore_side(&repo, &rt)?;
            let opts = edge_agent::prune::Options {
                policy: policy.policy(),
                margin: safety_margin,
                dry_run,
                allow_future: allow_future_snapshots,
                allow_short_margin,
            };
            edge_agent::prune::run(&repo, &ids, &opts, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            repo,
            snapshot_id,
            target_dir,
            opts,
        } => {
            if target_dir.exists() && !target_dir.is_dir() {
                bail!(
                    "{} exists and is not a directory: refusing to overwrite it",
                    target_dir.display()
                );
            }
            let sel = Selection::all(&target_dir);
            restore_cmd(&repo, &snapshot_id, &sel, &opts)
        }
        Cmd::Fetch {
            repo,
            snapshot_id,
            filepath,
            target,
            opts,
        } => {
            if target.exists() && !target.is_dir() {
                bail!(
                    "{} exists and is not a directory: refusing to overwrite it",
                    target.display()
                );
            }
            let sel = Selection::one(&filepath, &target);
            restore_cmd(&repo, &snapshot_id, &sel, &opts)
        }
    }
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

fn write_key(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing key file {}", path.display()))
}

fn backup_once(cfg: &Config, repo: &Repo, show: bool, rehash: bool) -> Result<ExitCode> {
    let progress = Progress::new(show, "backup");
    let out = backup::run(cfg, repo, backup::Options { progress, rehash })?;
    let s = &out.summary;
    if show {
        eprintln!(
            "snapshot {} saved to {}: {} files, {} dirs, {} links, {} in {:.1}s; {} new in {} chunks, {} uploaded in {} blobs",
            out.snapshot,
            store::describe(&cfg.destination),
            s.files,
            s.dirs,
            s.symlinks + s.hardlinks,
            human(s.bytes),
            out.elapsed.as_secs_f64(),
            human(s.new_bytes),
            s.new_chunks,
            human(s.uploaded_bytes),
            s.new_blobs,
        );
    }
    if !out.skipped.is_empty() {
        eprintln!(
            "vaultik: snapshot {} is missing {} entries that could not be read (listed above)",
            out.snapshot,
            out.skipped.len()
        );
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    Ok(ExitCode::SUCCESS)
}

/// Backs up every `backup_interval` (default 1h), never closer than
/// `min_time_between_run`. A failed run is reported and retried at the next tick.
fn daemon_loop(cfg: &Config, repo: &Repo, rehash: bool) -> Result<ExitCode> {
    let every = cfg.backup_interval.unwrap_or(Duration::from_secs(3600));
    let min_gap = cfg.min_time_between_run.unwrap_or(Duration::ZERO);
    loop {
        let started = Instant::now();
        if let Err(e) = backup_once(cfg, repo, false, rehash) {
            eprintln!("vaultik: backup failed: {}", chain(&e));
        }
        std::thread::sleep(every.max(min_gap).saturating_sub(started.elapsed()));
    }
}

fn open_restore_side(args: &RepoArgs, rt: &tokio::runtime::Runtime) -> Result<(Repo, Identities)> {
    let s3: Option<S3Target> = match &args.config {
        Some(path) => match Config::load(path)?.destination {
            Destination::S3(t) => Some(t),
            Destination::Local { .. } => None,
        },
        None => None,
    };
    let dest = Destination::from_bucket_arg(&args.bucket, &args.prefix, s3.as_ref())?;
    let ids = Identities::from_env()?;
    let repo = Repo::open(&dest, &args.index_prefix, false, rt.handle().clone())?;
    Ok((repo, ids))
}

fn restore_cmd(
    args: &RepoArgs,
    snapshot: &str,
    sel: &Selection,
    opts: &RestoreArgs,
) -> Result<ExitCode> {
    let rt = runtime()?;
    let (repo, ids) = open_restore_side(args, &rt)?;
    let manifest = restore::resolve(&repo, &ids, snapshot)?;
    let meta = restore::open_metadata(&repo, &ids, manifest)?;
    let progress = Progress::new(!opts.quiet, "restore");
    let report = restore::restore(
        &repo,
        &ids,
        &meta,
        sel,
        restore::Options {
            progress,
            parallel: opts.parallel,
        },
    )?;
    restore::print_report(&report, &mut std::io::stderr())?;
    if !report.hostile.is_empty() {
        eprintln!(
            "vaultik: refused {} entries that break the restore rules (listed above): the snapshot metadata is hostile or damaged; the rest were restored",
            report.hostile.len()
        );
    }
    if !report.damaged.is_empty() {
        eprintln!(
            "vaultik: {} of {} files are damaged (listed above); the rest were restored",
            report.damaged.len(),
            report.files
        );
    }
    if !report.is_clean() {
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    if !opts.quiet {
        eprintln!(
            "restored {} files, {} dirs, {} links ({}) into {}",
            report.files,
            report.dirs,
            report.links,
            human(report.bytes),
            sel.root.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_snapshots(list: &[Manifest], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32}  {:<24}  {:<16}  {:>8}  {:>10}  paths",
        "id", "time", "host", "files", "size"
    )?;
    for m in list {
        writeln!(
            out,
            "{:<32}  {:<24}  {:<16}  {:>8}  {:>10}  {}",
            m.id,
            m.time,
            m.hostname,
            m.summary.files,
            human(m.summary.bytes),
            m.source_dirs.join(" ")
        )?;
    }
    Ok(())
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
