//! The commands: each opens what it needs, drives the library, and prints the result.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use edge_agent::backup::{self, Scope};
use edge_agent::config::{Config, Destination, S3Target};
use edge_agent::crypt::{Identities, keygen};
use edge_agent::progress::{self, Progress};
use edge_agent::restore::{self, Selection};
use edge_agent::store::retry::{DEFAULT_RETRY_FOR, Notice, RetryNotices};
use edge_agent::store::{self, OpenOptions, Repo, StoreError};
use edge_agent::verify::{self, ReadData};
use edge_agent::{scan, watch};

mod agent;
pub mod args;
mod show;

use args::{Cli, Cmd, RepoArgs, RestoreArgs};

const EXIT_PARTIAL: u8 = 3;

/// The error and its causes on one line, each distinct message once.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// What `--verbose` adds under the error line: the failed request and its whole chain.
pub fn details(e: &anyhow::Error) -> Vec<String> {
    e.chain()
        .filter_map(|c| {
            c.downcast_ref::<StoreError>()
                .or_else(|| match c.downcast_ref() {
                    Some(edge_agent::Error::Store(s)) => Some(s),
                    _ => None,
                })
        })
        .filter_map(StoreError::detail)
        .map(|d| format!("detail: {d}"))
        .collect()
}

/// Prints a line for each storage retry, unless `quiet` (cron mode), so that a long
/// outage is visible while it is ridden out.
fn announce_retries(window: Duration, verbose: bool, quiet: bool) {
    if quiet {
        return;
    }
    let window = humantime::format_duration(window).to_string();
    let on_notice = move |n: &Notice| {
        let mut line = format!(
            "vaultik: storage: {}; retry {} in {:.0}s (retrying for up to {window}, see --retry-for)",
            n.reason,
            n.attempt,
            n.wait.as_secs_f64().ceil()
        );
        if verbose {
            line = format!("{line}\n  detail: {}", n.detail);
        }
        progress::notice(&line);
    };
    // Only fails if a subscriber is installed already, and then that one reports.
    let _ = tracing::subscriber::set_global_default(RetryNotices::new(on_notice));
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let Cli {
        verbose,
        retry_for,
        cmd,
    } = cli;
    match cmd {
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
            let side = AgentSide::open(&config, retry_for, verbose, cron, true)?;
            if daemon {
                return daemon_loop(&side.cfg, &side.repo, rehash);
            }
            backup_once(&side.cfg, &side.repo, !cron, rehash, Scope::Everything)
        }
        Cmd::Enroll {
            controller,
            token,
            config,
            state_dir,
            name,
        } => {
            let state = agent::state_dir(config.as_deref(), state_dir.as_deref())?;
            agent::enroll(&state, &controller, &token, name)
        }
        Cmd::Agent { config } => {
            let AgentSide { cfg, repo, _rt: rt } =
                AgentSide::open(&config, retry_for, verbose, false, true)?;
            let code = agent::run(cfg, repo);
            drop(rt);
            code
        }
        Cmd::Snapshots { repo, json } => {
            snapshots(&RestoreSide::open(&repo, retry_for, verbose, false)?, json)
        }
        Cmd::Ls {
            repo,
            snapshot,
            path,
            long,
            recursive,
            json,
        } => {
            let side = RestoreSide::open(&repo, retry_for, verbose, false)?;
            let meta = side.metadata(&snapshot.snapshot)?;
            ls(&meta, path.as_deref().unwrap_or("/"), long, recursive, json)
        }
        Cmd::Verify {
            bucket,
            prefix,
            config,
            index_prefix,
            read_data,
            read_data_subset,
        } => {
            let read = match (read_data, read_data_subset) {
                (true, _) => ReadData::All,
                (false, Some(p)) => ReadData::Subset(p),
                (false, None) => ReadData::None,
            };
            let repo = bucket.map(|bucket| RepoArgs {
                bucket,
                prefix: prefix.unwrap_or_default(),
                config: config.clone(),
                index_prefix,
            });
            verify(repo, config, read, retry_for, verbose)
        }
        Cmd::Prune {
            repo,
            policy,
            safety_margin,
            dry_run,
            allow_future_snapshots,
            allow_short_margin,
        } => {
            let side = RestoreSide::open(&repo, retry_for, verbose, false)?;
            let opts = edge_agent::prune::Options {
                policy: policy.policy(),
                margin: safety_margin,
                dry_run,
                allow_future: allow_future_snapshots,
                allow_short_margin,
            };
            edge_agent::prune::run(&side.repo, &side.ids, &opts, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            repo,
            snapshot,
            target_dir,
            opts,
        } => {
            refuse_non_directory(&target_dir)?;
            let side = RestoreSide::open(&repo, retry_for, verbose, opts.quiet)?;
            side.restore(&snapshot.snapshot, &Selection::all(&target_dir), &opts)
        }
        Cmd::Fetch {
            repo,
            snapshot,
            filepath,
            target,
            opts,
        } => {
            refuse_non_directory(&target)?;
            let side = RestoreSide::open(&repo, retry_for, verbose, opts.quiet)?;
            side.restore(
                &snapshot.snapshot,
                &Selection::one(&filepath, &target),
                &opts,
            )
        }
    }
}

fn snapshots(side: &RestoreSide, json: bool) -> Result<ExitCode> {
    let catalog = restore::list_snapshots(&side.repo, &side.ids)?;
    for w in catalog.warnings() {
        eprintln!("{w}");
    }
    let list = catalog.snapshots;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &list)?;
        writeln!(out)?;
    } else {
        show::snapshots(&list, &mut out)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(
    meta: &restore::Metadata,
    path: &str,
    long: bool,
    recursive: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let mut list = show::JsonList::new(&mut out)?;
        restore::listing::list(&meta.conn, path, recursive, |e| list.push(e))?;
        list.finish()?;
    } else {
        restore::listing::list(&meta.conn, path, recursive, |e| {
            show::entry(e, long, &mut out)
        })?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// With a repository (and the key): every snapshot. With only a config: the agent's
/// newest snapshot, from its index, without the key.
fn verify(
    repo: Option<RepoArgs>,
    config: Option<std::path::PathBuf>,
    read: ReadData,
    retry_for: Option<Duration>,
    verbose: bool,
) -> Result<ExitCode> {
    let report = match (repo, config) {
        (Some(args), _) => {
            let side = RestoreSide::open(&args, retry_for, verbose, false)?;
            verify::verify(&side.repo, &side.ids, read)?
        }
        (None, Some(config)) => {
            if read != ReadData::None {
                bail!(
                    "reading blob data needs the private key: give <bucket> <prefix> and set VAULTIK_PRIVATE_KEY"
                );
            }
            let side = AgentSide::open(&config, retry_for, verbose, false, false)?;
            let index_path = &side.cfg.index_path;
            if !index_path.exists() {
                bail!(
                    "no local index at {}: nothing to verify until a backup has run",
                    index_path.display()
                );
            }
            let index = edge_agent::index::Index::open_read_only(index_path)?;
            verify::verify_from_index(&side.repo, &index)?
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

fn refuse_non_directory(target: &Path) -> Result<()> {
    if target.exists() && !target.is_dir() {
        bail!(
            "{} exists and is not a directory: refusing to overwrite it",
            target.display()
        );
    }
    Ok(())
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

fn backup_once(
    cfg: &Config,
    repo: &Repo,
    show: bool,
    rehash: bool,
    scope: Scope,
) -> Result<ExitCode> {
    let progress = Progress::new(show, "backup");
    let out = backup::run(
        cfg,
        repo,
        backup::Options {
            progress,
            rehash,
            cancel: None,
            scope,
        },
    )?;
    if let Some(n) = out.rescanned {
        eprintln!("vaultik: partial scan: {n} changed directories listed");
    }
    if show {
        eprintln!(
            "{}",
            show::backup_summary(&out, &store::describe(&cfg.destination))
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
    let (log, _watcher) = watch_sources(cfg);
    loop {
        let started = Instant::now();
        let scope = watch::take(&log);
        if let Err(e) = backup_once(cfg, repo, false, rehash, scope.clone()) {
            watch::give_back(&log, scope);
            eprintln!("vaultik: backup failed: {}", one_line(&e));
        }
        std::thread::sleep(every.max(min_gap).saturating_sub(started.elapsed()));
    }
}

/// Directories a change log may hold before the next run scans everything instead.
const WATCHED_DIRS_MAX: usize = 20_000;

/// Starts watching the config's sources. Without a watcher (inotify limits, a
/// source that is not there) every run scans everything, as it says once.
pub(crate) fn watch_sources(cfg: &Config) -> (watch::SharedLog, Option<watch::Watcher>) {
    let log = Arc::new(Mutex::new(watch::ChangeLog::new(WATCHED_DIRS_MAX)));
    let roots = match scan::resolve_roots(&cfg.source_dirs) {
        Ok(r) => r.paths,
        Err(_) => return (log, None),
    };
    match watch::Watcher::start(&roots, log.clone()) {
        Ok(w) => (log, Some(w)),
        Err(e) => {
            eprintln!(
                "vaultik: not watching the sources for changes ({e}); every backup scans everything"
            );
            (log, None)
        }
    }
}

/// What the commands that run on the agent share: its config and its repository.
struct AgentSide {
    cfg: Config,
    repo: Repo,
    _rt: tokio::runtime::Runtime,
}

impl AgentSide {
    /// `quiet` announces no retries (cron mode); `create` makes a missing local
    /// destination directory (backup).
    fn open(
        config: &Path,
        retry_for: Option<Duration>,
        verbose: bool,
        quiet: bool,
        create: bool,
    ) -> Result<Self> {
        let cfg = Config::load(config)?;
        let window = retry_for.unwrap_or(cfg.retry_for);
        announce_retries(window, verbose, quiet);
        let rt = runtime()?;
        let opts = OpenOptions {
            index_prefix: &cfg.index_prefix,
            create,
            retry_for: window,
        };
        let repo = Repo::open(&cfg.destination, &opts, rt.handle().clone())?;
        Ok(AgentSide { cfg, repo, _rt: rt })
    }
}

/// What the commands that read backups share: the repository and the private key.
struct RestoreSide {
    repo: Repo,
    ids: Identities,
    _rt: tokio::runtime::Runtime,
}

impl RestoreSide {
    /// `quiet` announces no retries (`restore --quiet`).
    fn open(
        args: &RepoArgs,
        retry_for: Option<Duration>,
        verbose: bool,
        quiet: bool,
    ) -> Result<Self> {
        let cfg = args.config.as_deref().map(Config::load).transpose()?;
        let s3: Option<&S3Target> = match cfg.as_ref().map(|c| &c.destination) {
            Some(Destination::S3(t)) => Some(t),
            _ => None,
        };
        let window = retry_for
            .or(cfg.as_ref().map(|c| c.retry_for))
            .unwrap_or(DEFAULT_RETRY_FOR);
        announce_retries(window, verbose, quiet);
        let dest = Destination::from_bucket_arg(&args.bucket, &args.prefix, s3)?;
        let ids = Identities::from_env()?;
        let rt = runtime()?;
        let opts = OpenOptions {
            index_prefix: &args.index_prefix,
            create: false,
            retry_for: window,
        };
        let repo = Repo::open(&dest, &opts, rt.handle().clone())?;
        Ok(RestoreSide { repo, ids, _rt: rt })
    }

    fn metadata(&self, snapshot: &str) -> Result<restore::Metadata> {
        let manifest = restore::resolve(&self.repo, &self.ids, snapshot)?;
        Ok(restore::open_metadata(&self.repo, &self.ids, manifest)?)
    }

    fn restore(&self, snapshot: &str, sel: &Selection, opts: &RestoreArgs) -> Result<ExitCode> {
        let meta = self.metadata(snapshot)?;
        let progress = Progress::new(!opts.quiet, "restore");
        let report = restore::restore(
            &self.repo,
            &self.ids,
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
                "restored {}, {}, {} ({}) into {}",
                show::count(report.files, "file"),
                show::count(report.dirs, "dir"),
                show::count(report.links, "link"),
                show::human(report.bytes),
                sel.root.display()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
