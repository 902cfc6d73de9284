//! `vaultik backup`: the pipeline driver.
//!
//! ```text
//! scan thread ──chunks──▶ compress workers ──frames──▶ packer thread ──bytes──▶ upload task
//!   (walk, stat, CDC,        (zstd, one per core)        (blob layout, age)     (multipart)
//!    hash, dedup, index) ◀──────────────── BlobDone ─────────┘
//! ```
//! Every queue is bounded, so memory is a few chunks plus a few multipart parts whatever
//! the size of the tree. Nothing is written to disk but the index and run databases.

mod metadata;
mod partial;

use partial::PartialWalk;
pub use partial::{Changes, Scope};

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::chunk::{ChunkHasher, ChunkId, chunks};
use crate::config::Config;
use crate::crypt::{Counted, Recipients};
use crate::error::{Error, Result};
use crate::index::{BlobDone, CarryKey, FileStat, Index, NewNode, RunTotals};
use crate::pack::{BLOB_MAGIC, BlobId, BlobLayout};
use crate::progress::Progress;
use crate::scan::{Entry, Excludes, Visit, relative_bytes, resolve_roots, walk};
use crate::snapshot::{MANIFEST_FORMAT, METADATA_FORMAT, Manifest, NodeKind, SnapshotId, Summary};
use crate::store::Repo;

/// A partial scan is used only if the whole tree was walked more recently than this.
const WALK_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Every entry is visited (extended attributes, owner and mode read again, whatever
/// the stat data says) at least this often, and after a run that skipped entries:
/// filesystems whose ctime does not move with every change are caught up with.
const VISIT_EVERY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Batches waiting for a compressor, and batches waiting for the packer.
const QUEUE_DEPTH: usize = 1;
/// Chunks travel between threads in batches of about this many bytes, so trees of
/// small files do not pay a thread hand-off per file.
const BATCH_BYTES: usize = 1 << 20;

pub struct Options {
    pub progress: Progress,
    /// Re-read and re-hash every file even when its stat data is unchanged.
    pub rehash: bool,
    /// Set from another thread to stop the backup at the next file; the run then
    /// ends as a crash would, and the next one continues from it.
    pub cancel: Option<Arc<AtomicBool>>,
    /// What to look at; a partial scope is used only when the previous snapshot's
    /// metadata is at hand and no full scan is due.
    pub scope: Scope,
}

/// What a finished backup reports.
#[derive(Debug)]
pub struct Outcome {
    pub snapshot: SnapshotId,
    pub summary: Summary,
    pub elapsed: Duration,
    /// Entries that could not be read, with the reason; they are not in the snapshot.
    pub skipped: Vec<String>,
    /// The snapshot's time and host, as its manifest has them.
    pub time_unix_ns: i64,
    pub hostname: String,
    /// How many changed directories a partial scan listed; `None` after a full scan.
    pub rescanned: Option<usize>,
}

/// A second walk of the tree, stat only, that adds up the bytes the backup will read
/// and gives the total to the progress line. Dropping it stops and joins it, on every
/// path out of the backup.
struct ScanAhead {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ScanAhead {
    fn start(roots: Vec<std::path::PathBuf>, excludes: Excludes, progress: Progress) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut total = 0u64;
            // The backup reads a hard-linked file once.
            let mut linked: HashSet<(u64, u64)> = HashSet::new();
            let walked = walk(
                &roots,
                &excludes,
                |e: Entry| {
                    if stopped.load(Ordering::Relaxed) {
                        return Err(());
                    }
                    let m = &e.meta;
                    if m.is_file() && (m.nlink() < 2 || linked.insert((m.dev(), m.ino()))) {
                        total = total.saturating_add(m.len());
                    }
                    Ok(Visit::Continue)
                },
                |_, _| {},
            );
            if walked.is_ok() {
                progress.set_total(total);
            }
        });
        ScanAhead {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ScanAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a file compares with the previous snapshot, for the summary.
#[derive(Clone, Copy)]
enum Change {
    New,
    Changed,
    Unmodified,
}

struct NewChunk {
    id: ChunkId,
    data: Vec<u8>,
}

struct Frame {
    id: ChunkId,
    ulen: u32,
    data: Vec<u8>,
}

pub fn run(config: &Config, repo: &Repo, opts: Options) -> Result<Outcome> {
    let started = Instant::now();
    let recipients = Recipients::parse(&config.recipients)?;
    let roots = resolve_roots(&config.source_dirs)?;
    for note in &roots.notes {
        opts.progress.warn(note);
    }
    let excludes =
        Excludes::new(&config.exclude).map_err(|message| crate::config::ConfigError::Invalid {
            path: "exclude".into(),
            message,
        })?;
    let mut index = Index::open(&config.index_path)?;
    let hasher = ChunkHasher::new(index.chunk_key()?);
    index.begin_run()?;
    // The previous snapshot's size is the estimate until the scan ahead (on a
    // terminal only: it is a second walk) is done.
    if opts.progress.is_watched()
        && let Some(bytes) = index.last_snapshot_bytes()?
    {
        opts.progress.set_total(bytes);
    }
    let ahead = if opts.progress.is_shown() {
        Some(ScanAhead::start(
            roots.paths.clone(),
            excludes.clone(),
            opts.progress.clone(),
        ))
    } else {
        None
    };
    let started_ns = crate::index::now_ns();
    let last_full = index.last_full_scan_ns()?;
    let full_scan_due = match (config.full_scan_interval, last_full) {
        (Some(every), Some(t)) => is_due(started_ns, t, every),
        _ => false,
    };
    let rehash = opts.rehash || full_scan_due;

    // Compression workers and the packer.
    let workers = thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let (chunk_tx, chunk_rx) = sync_channel::<Vec<NewChunk>>(QUEUE_DEPTH);
    let chunk_rx = Arc::new(Mutex::new(chunk_rx));
    let (frame_tx, frame_rx) = sync_channel::<Vec<Frame>>(QUEUE_DEPTH);
    let (done_tx, done_rx) = channel::<BlobDone>();
    let mut compressors = Vec::new();
    for _ in 0..workers {
        let rx = chunk_rx.clone();
        let tx = frame_tx.clone();
        let level = config.compression_level;
        compressors.push(thread::spawn(move || compress_worker(rx, tx, level)));
    }
    drop(frame_tx);
    let packer = {
        let repo = repo.clone();
        let recipients = recipients.clone();
        let limit = config.blob_size_limit;
        thread::spawn(move || packer(frame_rx, repo, recipients, limit, done_tx))
    };

    let sources: Vec<String> = roots
        .paths
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let source_json = serde_json::to_string(&sources).unwrap_or_default();
    let exclude_json = serde_json::to_string(&config.exclude).unwrap_or_default();
    // Events a watcher cannot see (writes through mmap, network filesystems) are
    // caught by walking everything at least this often.
    let walk_due = index
        .last_walk_ns()?
        .is_none_or(|t| is_due(started_ns, t, WALK_EVERY));
    // Unless every file is to be read again, the run starts as the previous snapshot
    // and the walk visits only what changed.
    let key = CarryKey {
        format: &METADATA_FORMAT.to_string(),
        source_dirs: &source_json,
        excludes: &exclude_json,
    };
    let visit_due = index
        .last_visit_ns()?
        .is_none_or(|t| is_due(started_ns, t, VISIT_EVERY));
    let plan = match &opts.scope {
        _ if rehash || visit_due || !index.carry_previous(&key)? => Plan::Walk,
        Scope::Changed(c) if !walk_due && c.roots == roots.paths => Plan::Changed(&c.dirs),
        _ => Plan::Carried,
    };
    for notice in index.take_notices() {
        opts.progress.warn(&notice);
    }
    let mut scan = Scanner {
        index: &index,
        hasher: &hasher,
        config,
        chunk_tx: Some(chunk_tx),
        batch: Vec::new(),
        batch_bytes: 0,
        done_rx: &done_rx,
        pending: HashMap::new(),
        summary: Summary::default(),
        skipped: Vec::new(),
        progress: &opts.progress,
        rehash,
        last_commit: Instant::now(),
    };
    let mut walk_skipped = Vec::new();
    let mut visit = |e| {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(Error::Cancelled);
        }
        scan.visit(e)
    };
    let mut warn = |path: &Path, err| {
        let line = format!("warning: skipped {}: {err}", path.display());
        opts.progress.warn(&line);
        walk_skipped.push(line);
    };
    let partial = PartialWalk::new(&index, &excludes, &mut visit, &mut warn);
    let (walked, rescanned) = match plan {
        Plan::Changed(dirs) => match partial.run(&roots.paths, dirs) {
            Ok(n) => (Ok(()), Some(n)),
            Err(e) => (Err(e), None),
        },
        Plan::Carried => (
            partial.run_full(&roots.paths, &opts.progress).map(|_| ()),
            None,
        ),
        Plan::Walk => (walk(&roots.paths, &excludes, visit, warn), None),
    };
    drop(ahead);
    // Closing the chunk queue lets the workers and then the packer drain and stop.
    let flushed = scan.flush();
    scan.chunk_tx = None;
    let mut drain_result = Ok(());
    if walked.is_ok() && flushed.is_ok() {
        drain_result = scan.drain_until_closed();
    }
    for c in compressors {
        let _ = c.join();
    }
    let packed = packer
        .join()
        .unwrap_or_else(|_| Err(Error::Pipeline("the packer thread panicked".into())));
    // The packer's error is the cause; the scanner's is usually its echo.
    packed?;
    walked?;
    flushed?;
    drain_result?;
    if !scan.pending.is_empty() {
        return Err(Error::Pipeline(format!(
            "{} chunks were queued but never stored",
            scan.pending.len()
        )));
    }
    let mut summary = scan.summary;
    if !matches!(plan, Plan::Walk) {
        carried_totals(&mut summary, &index.run_totals()?);
    }
    let mut skipped = walk_skipped;
    skipped.extend(scan.skipped);
    summary.skipped = skipped.len() as u64;

    // Write order: blobs (done), metadata, manifest. The manifest is the commit point.
    let id = SnapshotId::random();
    let now = SystemTime::now();
    let time_unix_ns = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let hostname = config.hostname.clone().unwrap_or_else(hostname);
    let run_db = index.finish_run(&[
        ("format", METADATA_FORMAT.to_string()),
        ("snapshot_id", id.to_string()),
        ("hostname", hostname.clone()),
        ("time_unix_ns", time_unix_ns.to_string()),
        ("source_dirs", source_json),
        ("excludes", exclude_json),
        ("chunk_hash", "blake3-keyed".into()),
        ("chunk_key", hex::encode(hasher.key())),
        ("tool", format!("vaultik {}", env!("CARGO_PKG_VERSION"))),
    ])?;
    let previous = index.previous_pieces()?;
    let to = metadata::Target {
        repo,
        recipients: &recipients,
        blob_size_limit: config.blob_size_limit,
    };
    let previous = previous.as_ref().map(|list| metadata::Previous {
        list,
        db: index.previous_db(),
    });
    let stored = metadata::store(&to, &run_db, &id, &hasher, previous)?;
    summary.metadata_bytes = stored.uploaded_bytes.saturating_add(stored.object.size);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.to_string(),
        agent: Some(index.agent_id()?.to_string()),
        hostname: hostname.clone(),
        time: humantime::format_rfc3339_millis(now).to_string(),
        time_unix_ns,
        source_dirs: sources,
        metadata_size: stored.object.size,
        metadata_hash: hex::encode(stored.object.hash),
        summary: summary.clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Pipeline(format!("encoding manifest: {e}")))?;
    let mut w = recipients.encrypt(Vec::new(), "snapshot manifest")?;
    w.write_all(&json)
        .map_err(|e| Error::io("encrypting", "snapshot manifest", e))?;
    let sealed = w
        .finish()
        .map_err(|e| Error::io("encrypting", "snapshot manifest", e))?;
    index.mark_manifest_pending(&id.to_string(), time_unix_ns)?;
    repo.put_new(&repo.manifest_key(&id), sealed)?;
    let pieces = serde_json::to_string(&stored.list)
        .map_err(|e| Error::Pipeline(format!("encoding the piece list: {e}")))?;
    index.commit_snapshot(&id.to_string(), time_unix_ns, &pieces)?;
    if rehash || last_full.is_none() {
        index.set_last_full_scan_ns(started_ns)?;
    }
    if !skipped.is_empty() {
        // What could not be read this time is looked for again only by a walk that
        // visits everything.
        index.set_last_walk_ns(0)?;
        index.set_last_visit_ns(0)?;
    } else if rescanned.is_none() {
        index.set_last_walk_ns(started_ns)?;
        if matches!(plan, Plan::Walk) {
            index.set_last_visit_ns(started_ns)?;
        }
    }
    opts.progress.finish();
    Ok(Outcome {
        snapshot: id,
        summary,
        elapsed: started.elapsed(),
        skipped,
        time_unix_ns,
        hostname,
        rescanned,
    })
}

/// How a run finds what changed.
#[derive(Clone, Copy)]
enum Plan<'s> {
    /// Walk and visit everything.
    Walk,
    /// The run carries the previous snapshot over; list every directory, visit what
    /// changed.
    Carried,
    /// The run carries the previous snapshot over; list these directories (a watcher's).
    Changed(&'s std::collections::BTreeSet<std::path::PathBuf>),
}

/// True when `every` has passed since `last`, or `last` lies in the future (the
/// clock was stepped back, or `last` was set by a clock that ran ahead).
fn is_due(now: i64, last: i64, every: Duration) -> bool {
    let every = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX);
    last > now || now.saturating_sub(last) >= every
}

/// After a partial scan the counts cover the whole snapshot, carried entries too.
fn carried_totals(s: &mut Summary, t: &RunTotals) {
    s.files = t.files;
    s.files_unmodified = t
        .files
        .saturating_sub(s.files_new)
        .saturating_sub(s.files_changed);
    s.dirs = t.dirs;
    s.symlinks = t.symlinks;
    s.hardlinks = t.hardlinks;
    s.bytes = t.bytes;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Nanoseconds since the epoch, clamped to what an i64 holds (years 1677..2262).
fn time_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// True when a time lies outside what [`time_ns`] represents exactly.
fn time_clamped(secs: i64) -> bool {
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(999_999_999))
        .is_none()
}

fn stat_of(meta: &std::fs::Metadata) -> FileStat {
    FileStat {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: time_ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: time_ns(meta.ctime(), meta.ctime_nsec()),
    }
}

struct Scanner<'a> {
    index: &'a Index,
    hasher: &'a ChunkHasher,
    config: &'a Config,
    chunk_tx: Option<SyncSender<Vec<NewChunk>>>,
    batch: Vec<NewChunk>,
    batch_bytes: usize,
    done_rx: &'a Receiver<BlobDone>,
    /// Chunks sent to the packer whose blob has not finished yet.
    /// Chunks queued for upload and not yet in a finished blob, with their rows.
    pending: HashMap<ChunkId, i64>,
    summary: Summary,
    skipped: Vec<String>,
    progress: &'a Progress,
    rehash: bool,
    last_commit: Instant,
}

impl Scanner<'_> {
    fn visit(&mut self, e: Entry) -> Result<Visit> {
        self.absorb_done()?;
        if self.last_commit.elapsed() > Duration::from_secs(2) {
            self.index.checkpoint()?;
            self.last_commit = Instant::now();
            self.progress.message(format!(
                "{} files, {} new chunks",
                self.summary.files, self.summary.new_chunks
            ));
        }
        let ft = e.meta.file_type();
        let rel = relative_bytes(&e.path);
        let stat = stat_of(&e.meta);
        if time_clamped(e.meta.mtime()) {
            self.progress.warn(&format!(
                "warning: {}: modification time {} s since 1970 is outside 1677..2262; stored as {} ns",
                e.path.display(),
                e.meta.mtime(),
                stat.mtime_ns
            ));
        }
        let mut node = NewNode {
            path: rel,
            kind: NodeKind::File,
            mode: e.meta.mode(),
            uid: e.meta.uid(),
            gid: e.meta.gid(),
            size: 0,
            mtime_ns: stat.mtime_ns,
            target: None,
            stat,
        };
        let link_target;
        if ft.is_dir() {
            node.kind = NodeKind::Dir;
            self.summary.dirs += 1;
        } else if ft.is_symlink() {
            link_target = match std::fs::read_link(&e.path) {
                Ok(t) => t,
                Err(err) => {
                    self.skip(&e.path, &err);
                    return Ok(Visit::Continue);
                }
            };
            node.kind = NodeKind::Symlink;
            node.target = Some(link_target.as_os_str().as_bytes());
            self.summary.symlinks += 1;
        } else if ft.is_file() {
            if e.meta.nlink() > 1
                && let Some(first) = self.index.find_inode(stat.dev, stat.ino)?
            {
                node.kind = NodeKind::Hardlink;
                node.target = Some(&first);
                self.index.insert_node(&node)?;
                self.summary.hardlinks += 1;
                return Ok(Visit::Continue);
            }
            node.size = stat.size;
            let id = self.index.insert_node(&node)?;
            self.copy_xattrs(&e.path, id)?;
            return self.file(&e.path, id, stat).map(|_| Visit::Continue);
        } else {
            self.progress.warn(&format!(
                "note: not backing up special file {} (sockets, fifos and devices are skipped)",
                e.path.display()
            ));
            return Ok(Visit::Continue);
        }
        if rel.is_empty() {
            return Ok(Visit::Continue);
        }
        let id = self.index.insert_node(&node)?;
        self.copy_xattrs(&e.path, id)?;
        Ok(Visit::Continue)
    }

    fn skip(&mut self, path: &Path, err: &dyn std::fmt::Display) {
        self.skipped_line(format!("warning: skipped {}: {err}", path.display()));
    }

    /// Shows a warning now and lists it again at the end (exit 3).
    fn skipped_line(&mut self, line: String) {
        self.progress.warn(&line);
        self.skipped.push(line);
    }

    /// Records a node's extended attributes. One that cannot be read is a warning and
    /// makes the backup end with exit 3, like an unreadable file.
    fn copy_xattrs(&mut self, path: &Path, node: i64) -> Result<()> {
        let names = match xattr::list(path) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
            Err(e) => {
                self.skip_xattrs(path, &e);
                return Ok(());
            }
        };
        for name in names {
            match xattr::get(path, &name) {
                Ok(Some(value)) => {
                    // The value travels as a chunk: it may hold file content.
                    let id = self.hasher.id(&value);
                    let row = self.store_chunk(id, value)?;
                    self.index.insert_xattr(node, name.as_bytes(), row)?;
                }
                Ok(None) => {} // removed since it was listed
                Err(e) => self.skip_xattrs(path, &e),
            }
        }
        Ok(())
    }

    fn skip_xattrs(&mut self, path: &Path, err: &dyn std::fmt::Display) {
        self.skipped_line(format!(
            "warning: extended attributes of {} not backed up: {err}",
            path.display()
        ));
    }

    fn file(&mut self, path: &Path, node: i64, stat: FileStat) -> Result<()> {
        let prev = self.index.prev_file(relative_bytes(path))?;
        let change = match &prev {
            None => Change::New,
            Some((_, p)) if *p == stat => Change::Unmodified,
            Some(_) => Change::Changed,
        };
        if !self.rehash
            && let Some((old, prev)) = prev
            && prev == stat
        {
            self.index.reuse_chunks(old, node)?;
            self.count_file(change);
            self.summary.bytes += stat.size;
            self.progress.add_bytes(stat.size);
            return Ok(());
        }
        let f = match File::open(path) {
            Ok(f) => f,
            Err(err) => {
                self.skip(path, &err);
                return self.index.remove_node(node);
            }
        };
        let mut offset = 0u64;
        for (seq, chunk) in chunks(f, stat.size, self.config.chunk).enumerate() {
            let data = match chunk {
                Ok(d) => d,
                Err(err) => {
                    self.skip(path, &err);
                    return self.index.remove_node(node);
                }
            };
            let id = self.hasher.id(&data);
            let len = data.len() as u64;
            let row = self.store_chunk(id, data)?;
            self.index.add_file_chunk(node, seq as u64, offset, row)?;
            offset += len;
            self.progress.add_bytes(len);
        }
        if offset != stat.size {
            // The file changed while it was read; record what was actually stored.
            self.index.set_size(node, offset)?;
        }
        self.count_file(change);
        self.summary.bytes += offset;
        self.summary.bytes_read += offset;
        Ok(())
    }

    fn count_file(&mut self, change: Change) {
        self.progress.add_file();
        let s = &mut self.summary;
        s.files += 1;
        match change {
            Change::New => s.files_new += 1,
            Change::Changed => s.files_changed += 1,
            Change::Unmodified => s.files_unmodified += 1,
        }
    }

    /// Queues a chunk for upload unless it is stored already or on its way; returns
    /// its row.
    fn store_chunk(&mut self, id: ChunkId, data: Vec<u8>) -> Result<i64> {
        if let Some(row) = self.pending.get(&id) {
            return Ok(*row);
        }
        if let Some(row) = self.index.chunk_ref(&id)? {
            return Ok(row);
        }
        let row = self.index.new_chunk(&id)?;
        self.pending.insert(id, row);
        self.summary.new_chunks += 1;
        self.summary.new_bytes += data.len() as u64;
        self.send(NewChunk { id, data })?;
        Ok(row)
    }

    fn send(&mut self, c: NewChunk) -> Result<()> {
        self.batch_bytes += c.data.len();
        self.batch.push(c);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        // Blocking is safe: the packer reports finished blobs on an unbounded channel,
        // so it never waits for this thread.
        self.chunk_tx
            .as_ref()
            .ok_or_else(|| Error::Pipeline("chunk queue closed".into()))?
            .send(batch)
            .map_err(|_| Error::Pipeline("the compressors stopped".into()))?;
        // Record blobs that finished meanwhile: a big file can span several blobs.
        self.absorb_done()
    }

    fn absorb_done(&mut self) -> Result<()> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.record(done)?;
        }
        Ok(())
    }

    fn record(&mut self, done: BlobDone) -> Result<()> {
        let rows = done
            .entries
            .iter()
            .map(|p| {
                self.pending.remove(&p.chunk).ok_or_else(|| {
                    Error::Pipeline(format!(
                        "blob {} holds a chunk never queued",
                        done.id.to_hex()
                    ))
                })
            })
            .collect::<Result<Vec<i64>>>()?;
        self.index.record_blob(&done, &rows)?;
        self.summary.new_blobs += 1;
        self.summary.uploaded_bytes += done.uploaded.size;
        Ok(())
    }

    fn drain_until_closed(&mut self) -> Result<()> {
        while let Ok(done) = self.done_rx.recv() {
            self.record(done)?;
        }
        Ok(())
    }
}

fn compress_worker(
    rx: Arc<Mutex<Receiver<Vec<NewChunk>>>>,
    tx: SyncSender<Vec<Frame>>,
    level: i32,
) {
    let Ok(mut z) = zstd::bulk::Compressor::new(level) else {
        return;
    };
    loop {
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(batch) = next else { return };
        let mut frames = Vec::with_capacity(batch.len());
        for c in batch {
            let ulen = c.data.len() as u32;
            let Ok(data) = crate::pack::encode(&mut z, c.data) else {
                return;
            };
            frames.push(Frame {
                id: c.id,
                ulen,
                data,
            });
        }
        if tx.send(frames).is_err() {
            return;
        }
    }
}

type BlobWriter = age::stream::StreamWriter<Counted<crate::store::Upload>>;

struct OpenBlob {
    id: BlobId,
    w: BlobWriter,
    layout: BlobLayout,
    payload_start: u64,
}

fn packer(
    rx: Receiver<Vec<Frame>>,
    repo: Repo,
    recipients: Recipients,
    limit: u64,
    done: Sender<BlobDone>,
) -> Result<()> {
    let mut open: Option<OpenBlob> = None;
    for f in rx.into_iter().flatten() {
        let blob = match open.as_mut() {
            Some(b) => b,
            None => open.insert(open_blob(&repo, &recipients)?),
        };
        let what = |e| Error::io("writing blob", blob.id.to_hex(), e);
        blob.w.write_all(&f.data).map_err(what)?;
        blob.layout.push(f.id, f.data.len() as u32, f.ulen);
        if blob.layout.is_full(limit)
            && let Some(b) = open.take()
        {
            let _ = done.send(close_blob(b)?);
        }
    }
    if let Some(b) = open.take() {
        let _ = done.send(close_blob(b)?);
    }
    Ok(())
}

fn open_blob(repo: &Repo, recipients: &Recipients) -> Result<OpenBlob> {
    let id = BlobId::random();
    let count = Arc::new(AtomicU64::new(0));
    let up = Counted {
        inner: repo.upload(repo.blob_key(&id)),
        count: count.clone(),
    };
    let mut w = recipients.encrypt(up, "blob")?;
    // The age header and nonce are written by now: this is where the payload starts.
    let payload_start = count.load(Ordering::Relaxed);
    w.write_all(BLOB_MAGIC)
        .map_err(|e| Error::io("writing blob", id.to_hex(), e))?;
    Ok(OpenBlob {
        id,
        w,
        layout: BlobLayout::new(),
        payload_start,
    })
}

fn close_blob(mut b: OpenBlob) -> Result<BlobDone> {
    let what = |e| Error::io("finishing blob", b.id.to_hex(), e);
    b.w.write_all(&b.layout.trailer()).map_err(what)?;
    let counted =
        b.w.finish()
            .map_err(|e| Error::io("finishing blob", b.id.to_hex(), e))?;
    let uploaded = counted.inner.finish()?;
    let plain_size = b.layout.finished_len();
    Ok(BlobDone {
        id: b.id,
        uploaded,
        plain_size,
        payload_start: b.payload_start,
        entries: b.layout.into_entries(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_in_the_future_is_due() {
        let day = Duration::from_secs(86_400);
        let now = 100 * 86_400 * 1_000_000_000;
        assert!(!is_due(now, now - 1, day));
        assert!(is_due(now, now - 86_400 * 1_000_000_000, day));
        assert!(is_due(now, now + 1, day), "a clock stepped back");
        assert!(!is_due(now, 0, Duration::MAX));
        assert!(is_due(i64::MAX, i64::MIN, day));
    }

    #[test]
    fn far_times_clamp_instead_of_wrapping() {
        assert_eq!(time_ns(1, 5), 1_000_000_005);
        assert_eq!(time_ns(i64::MAX / 10, 0), i64::MAX);
        assert_eq!(time_ns(i64::MIN / 10, 0), i64::MIN);
        assert!(time_clamped(32_503_680_000)); // year 3000
        assert!(!time_clamped(1_800_000_000));
    }
}
