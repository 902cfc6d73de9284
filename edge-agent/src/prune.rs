//! Retention and garbage collection. Planning is pure (values in, a printable plan
//! out); `run` does the I/O and deletes only what a plan lists.
//!
//! Safety rules (docs/FORMAT.md, "Prune safety"; docs/SECURITY.md):
//! - the newest snapshot of every agent identity is always kept, because each agent
//!   index deduplicates against its own newest snapshot;
//! - a manifest dated ahead of this machine's clock stops prune: it would make every
//!   real snapshot of its group look old;
//! - a blob is deleted only if no kept snapshot references it and it was uploaded more
//!   than the safety margin ago by the storage server's clock (blob times and "now"
//!   both come from the server), so blobs of a backup still running (or of a run that
//!   was interrupted and is being resumed) are never deleted;
//! - a manifest that cannot be read stops prune: it cannot see what that snapshot uses.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::crypt::Identities;
use crate::error::{Error, Result};
use crate::pack::BlobId;
use crate::snapshot::{Manifest, SnapshotId};
use crate::store::{Object, Repo};

pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(48 * 3600);
/// The shortest safety margin prune accepts without `--allow-short-margin`: agents
/// reuse blobs of an interrupted run for `index::SALVAGE_WINDOW_NS` (6 h), and a backup
/// takes time of its own.
pub const MIN_SAFETY_MARGIN: Duration = Duration::from_secs(7 * 3600);
/// How far ahead of this machine's clock a manifest may be dated (clock skew).
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(15 * 60);
/// Durations on the command line are at most this long.
const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(
        "snapshot {id} of {host} is dated {time}, ahead of this machine's clock: a wrong clock or a forged manifest; fix the clock or check the snapshot, and pass --allow-future-snapshots only if it is genuine"
    )]
    Future {
        id: String,
        host: String,
        time: String,
    },
    #[error(
        "{count} snapshot manifests could not be read, so prune cannot see what they use and deletes nothing (first: {first}); remove or restore those objects first"
    )]
    Unreadable { count: usize, first: String },
    #[error(
        "a safety margin of {0} is shorter than 7h: agents reuse blobs of interrupted backups for 6 hours, so prune could delete blobs a backup is about to reference; use a margin longer than your longest backup plus 6 hours, or --allow-short-margin if no backup can run meanwhile"
    )]
    ShortMargin(String),
    #[error("the storage server reports no usable time (last modified {0} ns): cannot age blobs")]
    ServerClock(i64),
}

/// `d` in nanoseconds, saturated to `i64::MAX`.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// How snapshots are grouped before retention rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    Host,
    /// Host and the set of backed-up paths (a "snapshot name").
    HostPaths,
    /// The agent index that made the snapshot.
    #[default]
    Agent,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<Duration>,
    pub group_by: GroupBy,
}

impl Policy {
    /// With no rule at all, every snapshot is kept and prune only collects garbage.
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_within.is_none()
    }
}

/// What the planner needs to know of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    /// The agent index that made it (`Manifest::identity`).
    pub identity: String,
    pub host: String,
    pub paths: Vec<String>,
    pub time_ns: i64,
}

impl From<&Manifest> for SnapshotInfo {
    fn from(m: &Manifest) -> Self {
        SnapshotInfo {
            id: m.id.clone(),
            identity: m.identity(),
            host: m.hostname.clone(),
            paths: m.source_dirs.clone(),
            time_ns: m.time_unix_ns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub snapshot: SnapshotInfo,
    /// Why it is kept; empty means it is forgotten.
    pub reasons: Vec<&'static str>,
}

impl Verdict {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Civil date (UTC) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// ISO-8601 week-numbering year and week of a day count.
fn iso_week(days: i64) -> (i64, i64) {
    let weekday = (days + 3).rem_euclid(7); // Monday = 0; 1970-01-01 was a Thursday
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let jan1 = days_from_civil(year, 1, 1);
    (year, (thursday - jan1) / 7 + 1)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Calendar buckets of a time for the hourly/daily/weekly/monthly/yearly rules.
fn buckets(time_ns: i64) -> [i64; 5] {
    let secs = time_ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let hour = secs.div_euclid(3600);
    let (y, m, _) = civil_from_days(days);
    let (wy, w) = iso_week(days);
    [hour, days, wy * 100 + w, y * 100 + i64::from(m), y]
}

/// Decides which snapshots to keep. Pure.
pub fn plan_snapshots(snaps: &[SnapshotInfo], policy: &Policy) -> Vec<Verdict> {
    let mut groups: BTreeMap<(String, Vec<String>), Vec<&SnapshotInfo>> = BTreeMap::new();
    for s in snaps {
        let key = match policy.group_by {
            GroupBy::Host => (s.host.clone(), Vec::new()),
            GroupBy::HostPaths => {
                let mut p = s.paths.clone();
                p.sort();
                (s.host.clone(), p)
            }
            GroupBy::Agent => (s.identity.clone(), Vec::new()),
        };
        groups.entry(key).or_default().push(s);
    }
    let mut newest_of_agent: BTreeMap<&str, &SnapshotInfo> = BTreeMap::new();
    for s in snaps {
        let e = newest_of_agent.entry(&s.identity).or_insert(s);
        if (s.time_ns, &s.id) > (e.time_ns, &e.id) {
            *e = s;
        }
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(|a, b| (b.time_ns, &b.id).cmp(&(a.time_ns, &a.id)));
        let newest = group.first().map_or(0, |s| s.time_ns);
        let rules = [
            (policy.keep_hourly, "hourly"),
            (policy.keep_daily, "daily"),
            (policy.keep_weekly, "weekly"),
            (policy.keep_monthly, "monthly"),
            (policy.keep_yearly, "yearly"),
        ];
        let mut last_bucket: [Option<i64>; 5] = [None; 5];
        let mut kept_in: [u32; 5] = [0; 5];
        for (i, s) in group.iter().enumerate() {
            let mut reasons = Vec::new();
            if policy.is_empty() {
                reasons.push("no retention rule given");
            }
            if newest_of_agent
                .get(s.identity.as_str())
                .is_some_and(|n| n.id == s.id)
            {
                reasons.push("newest of its agent");
            }
            if policy.keep_last.is_some_and(|n| (i as u32) < n) {
                reasons.push("last");
            }
            if let Some(w) = policy.keep_within
                && newest.saturating_sub(s.time_ns) <= nanos(w)
            {
                reasons.push("within");
            }
            let b = buckets(s.time_ns);
            for (k, (limit, name)) in rules.iter().enumerate() {
                let Some(limit) = limit else { continue };
                if kept_in[k] < *limit && last_bucket[k] != Some(b[k]) {
                    kept_in[k] += 1;
                    last_bucket[k] = Some(b[k]);
                    reasons.push(name);
                }
            }
            out.push(Verdict {
                snapshot: (*s).clone(),
                reasons,
            });
        }
    }
    out.sort_by(|a, b| {
        (a.snapshot.time_ns, &a.snapshot.id).cmp(&(b.snapshot.time_ns, &b.snapshot.id))
    });
    out
}

/// A stored object the blob plan considers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub id: String,
    pub size: u64,
    pub modified_ns: i64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlobPlan {
    pub delete: Vec<StoredBlob>,
    pub bytes_freed: u64,
    /// Unreferenced but younger than the margin: kept this time.
    pub young_unreferenced: u64,
    pub referenced: u64,
}

/// Decides which blobs to delete. Pure.
pub fn plan_blobs(
    stored: &[StoredBlob],
    referenced: &HashSet<String>,
    margin: Duration,
    now_ns: i64,
) -> BlobPlan {
    let cutoff = now_ns.saturating_sub(nanos(margin));
    let mut plan = BlobPlan::default();
    for b in stored {
        if referenced.contains(&b.id) {
            plan.referenced += 1;
        } else if b.modified_ns < cutoff {
            plan.bytes_freed += b.size;
            plan.delete.push(b.clone());
        } else {
            plan.young_unreferenced += 1;
        }
    }
    plan
}

/// Parses a `--keep-within`/`--safety-margin` duration such as `30d` or `48h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e})"))?;
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than 100 years"));
    }
    Ok(d)
}

/// Stops prune at the first manifest dated more than [`FUTURE_TOLERANCE`] after `now_ns`.
pub fn check_not_future(snaps: &[Manifest], now_ns: i64) -> std::result::Result<(), PruneError> {
    let limit = now_ns.saturating_add(nanos(FUTURE_TOLERANCE));
    match snaps.iter().find(|m| m.time_unix_ns > limit) {
        Some(m) => Err(PruneError::Future {
            id: m.id.clone(),
            host: m.hostname.clone(),
            time: m.time.clone(),
        }),
        None => Ok(()),
    }
}

/// A whole prune plan, ready to print or carry out.
#[derive(Debug)]
pub struct Plan {
    pub verdicts: Vec<Verdict>,
    pub blobs: BlobPlan,
    /// Older than the margin and part of no snapshot: metadata objects without a
    /// manifest (interrupted backups) and clock probes of killed prunes.
    pub leftovers: Vec<Object>,
    /// Server time before which unreferenced objects may go.
    pub cutoff_ns: i64,
}

impl Plan {
    pub fn forget(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| !v.keep())
    }

    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for v in &self.verdicts {
            let s = &v.snapshot;
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_nanos(s.time_ns.max(0) as u64),
            );
            if v.keep() {
                writeln!(
                    out,
                    "keep    {} {when} {} ({})",
                    s.id,
                    s.host,
                    v.reasons.join(", ")
                )?;
            } else {
                writeln!(out, "forget  {} {when} {}", s.id, s.host)?;
            }
        }
        writeln!(
            out,
            "{} snapshots kept, {} forgotten; {} blobs referenced; {} blobs to delete ({} bytes freed); {} unreferenced blobs younger than the safety margin kept; {} leftover objects to delete",
            self.verdicts.iter().filter(|v| v.keep()).count(),
            self.forget().count(),
            self.blobs.referenced,
            self.blobs.delete.len(),
            self.blobs.bytes_freed,
            self.blobs.young_unreferenced,
            self.leftovers.len()
        )
    }
}

/// How to prune.
#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Policy,
    pub margin: Duration,
    pub dry_run: bool,
    /// Accept manifests dated ahead of this machine's clock.
    pub allow_future: bool,
    /// Accept a safety margin under [`MIN_SAFETY_MARGIN`].
    pub allow_short_margin: bool,
}

/// Plans a prune of `repo`, prints the plan, and unless `dry_run` carries it out.
pub fn run(
    repo: &Repo,
    ids: &Identities,
    opts: &Options,
    out: &mut dyn std::io::Write,
) -> Result<Plan> {
    let plan = plan(repo, ids, opts)?;
    plan.print(out)
        .map_err(|e| Error::io("writing", "the prune plan", e))?;
    if !opts.dry_run {
        execute(repo, &plan)?;
    }
    Ok(plan)
}

/// Reads the repository and decides; deletes nothing.
pub fn plan(repo: &Repo, ids: &Identities, opts: &Options) -> Result<Plan> {
    if opts.margin < MIN_SAFETY_MARGIN && !opts.allow_short_margin {
        let shown = humantime::format_duration(opts.margin).to_string();
        return Err(PruneError::ShortMargin(shown).into());
    }
    let catalog = crate::restore::list_snapshots(repo, ids)?;
    if let Some((key, why)) = catalog.unreadable.first() {
        return Err(PruneError::Unreadable {
            count: catalog.unreadable.len(),
            first: format!("{key}: {why}"),
        }
        .into());
    }
    let manifests = catalog.snapshots;
    if !opts.allow_future {
        check_not_future(&manifests, crate::index::now_ns())?;
    }
    // Blob ages are the server's times, so "now" is the server's too.
    let now = repo.server_now()?;
    if now <= 0 {
        return Err(PruneError::ServerClock(now).into());
    }
    let cutoff = now.saturating_sub(nanos(opts.margin));
    let infos: Vec<SnapshotInfo> = manifests.iter().map(SnapshotInfo::from).collect();
    let verdicts = plan_snapshots(&infos, &opts.policy);
    let mut referenced = HashSet::new();
    for v in verdicts.iter().filter(|v| v.keep()) {
        let Some(m) = manifests.iter().find(|m| m.id == v.snapshot.id) else {
            continue;
        };
        // A kept snapshot whose metadata cannot be read stops the prune: its blobs
        // would otherwise look unreferenced.
        let meta = crate::restore::open_metadata(repo, ids, m.clone())?;
        let mut q = meta.conn.prepare("SELECT name FROM blobs")?;
        // A name stored as BLOB is read as restore reads it.
        let names = q.query_map([], |r| crate::restore::text(r, 0))?;
        for id in names {
            // Compared in canonical form, so case cannot make a used blob look unused.
            referenced.insert(BlobId::canonical(id?));
        }
    }
    // Listed after the snapshots were read: anything a backup adds meanwhile is young.
    let index_objects = repo.list(&repo.index_dir())?;
    // Only canonical keys count: an alias (other case, other directory) names nothing.
    let stored: Vec<StoredBlob> = repo
        .list(&repo.blobs_dir())?
        .into_iter()
        .filter_map(|o| match repo.object(&o.key)? {
            Object::Blob(id) => Some(StoredBlob {
                id: id.to_hex(),
                size: o.size,
                modified_ns: o.modified_ns,
            }),
            _ => None,
        })
        .collect();
    let blobs = plan_blobs(&stored, &referenced, opts.margin, now);
    let manifest_ids: HashSet<SnapshotId> = index_objects
        .iter()
        .filter_map(|o| match repo.object(&o.key)? {
            Object::Manifest(id) => Some(id),
            _ => None,
        })
        .collect();
    let leftovers = index_objects
        .iter()
        .filter(|o| o.modified_ns < cutoff)
        .filter_map(|o| match repo.object(&o.key)? {
            obj @ Object::Metadata(id) if !manifest_ids.contains(&id) => Some(obj),
            obj @ Object::Clock(_) => Some(obj),
            _ => None,
        })
        .collect();
    Ok(Plan {
        verdicts,
        blobs,
        leftovers,
        cutoff_ns: cutoff,
    })
}

/// Carries out a plan: forgotten snapshots' manifests first (they vanish at once), then
/// their metadata, then blobs, then leftovers of interrupted backups.
pub fn execute(repo: &Repo, plan: &Plan) -> Result<()> {
    for v in plan.forget() {
        let id = SnapshotId::parse(&v.snapshot.id)
            .ok_or_else(|| Error::SnapshotNotFound(v.snapshot.id.clone()))?;
        repo.delete(&repo.manifest_key(&id))?;
        repo.delete(&repo.metadata_key(&id))?;
    }
    for b in &plan.blobs.delete {
        if let Some(id) = BlobId::parse(&b.id) {
            repo.delete(&repo.blob_key(&id))?;
        }
    }
    for obj in &plan.leftovers {
        repo.delete(&repo.key_of(*obj))?;
    }
    repo.sweep_staging(plan.cutoff_ns)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600 * 1_000_000_000;
    const D: i64 = 24 * H;

    fn snap(id: &str, host: &str, time_ns: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            identity: format!("agent-of-{host}"),
            host: host.into(),
            paths: vec!["/data".into()],
            time_ns,
        }
    }

    #[test]
    fn newest_of_every_agent_is_kept_even_on_one_host() {
        // Two configs on one host share a prefix: each index dedups against its own.
        let mut a = snap("a-old", "pi", 1);
        a.identity = "agent 1".into();
        let mut a_new = snap("a-new", "pi", 2);
        a_new.identity = "agent 1".into();
        let mut b = snap("b-only", "pi", 0);
        b.identity = "agent 2".into();
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let v = plan_snapshots(&[a, a_new, b], &p);
        assert_eq!(kept(&v), ["b-only", "a-new"]);
        assert!(v[0].reasons.contains(&"newest of its agent"));
    }

    #[test]
    fn huge_durations_are_refused_or_saturate() {
        assert!(parse_duration("500y").unwrap_err().contains("100 years"));
        assert!(parse_duration("48h").is_ok());
        // Even a margin that does not fit in i64 nanoseconds deletes nothing young.
        let stored = vec![StoredBlob {
            id: "x".into(),
            size: 1,
            modified_ns: 5,
        }];
        let plan = plan_blobs(&stored, &HashSet::new(), Duration::MAX, 10);
        assert!(plan.delete.is_empty());
        let s = vec![snap("old", "a", i64::MIN), snap("new", "a", i64::MAX)];
        let p = Policy {
            keep_within: Some(Duration::from_secs(1)),
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["new"]);
    }

    fn kept(v: &[Verdict]) -> Vec<&str> {
        v.iter()
            .filter(|v| v.keep())
            .map(|v| v.snapshot.id.as_str())
            .collect()
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        // 2026-11-21 is a Saturday of ISO week 47; 2021-01-03 belongs to 2020-W53.
        assert_eq!(iso_week(days_from_civil(2026, 11, 21)), (2026, 47));
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
    }

    #[test]
    fn keep_last_and_newest_per_host() {
        let s = vec![
            snap("a1", "a", 1),
            snap("a2", "a", 2),
            snap("a3", "a", 3),
            snap("b1", "b", 0),
        ];
        let p = Policy {
            keep_last: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["b1", "a2", "a3"]);
    }

    #[test]
    fn keep_daily_takes_newest_of_each_day() {
        let base = days_from_civil(2026, 11, 1) * D;
        let s: Vec<_> = (0..10)
            .flat_map(|day| {
                (0..3).map(move |h| snap(&format!("d{day}h{h}"), "a", base + day * D + h * H))
            })
            .collect();
        let p = Policy {
            keep_daily: Some(3),
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["d7h2", "d8h2", "d9h2"]);
        let p = Policy {
            keep_weekly: Some(1),
            keep_hourly: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["d9h1", "d9h2"]);
    }

    #[test]
    fn keep_within_is_relative_to_the_newest() {
        let s = vec![
            snap("old", "a", 0),
            snap("mid", "a", 5 * D),
            snap("new", "a", 6 * D),
        ];
        let p = Policy {
            keep_within: Some(Duration::from_secs(2 * 86_400)),
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["mid", "new"]);
    }

    #[test]
    fn group_by_paths() {
        let mut other = snap("o", "a", 1);
        other.paths = vec!["/etc".into()];
        let s = vec![other, snap("d1", "a", 2), snap("d2", "a", 3)];
        let p = Policy {
            keep_last: Some(1),
            group_by: GroupBy::HostPaths,
            ..Policy::default()
        };
        assert_eq!(kept(&plan_snapshots(&s, &p)), ["o", "d2"]);
    }

    #[test]
    fn no_rules_keeps_everything() {
        let s = vec![snap("x", "a", 1), snap("y", "a", 2)];
        assert_eq!(kept(&plan_snapshots(&s, &Policy::default())), ["x", "y"]);
    }

    #[test]
    fn blobs_need_to_be_unreferenced_and_old() {
        let now = 100 * D;
        let b = |id: &str, age: i64| StoredBlob {
            id: id.into(),
            size: 10,
            modified_ns: now - age,
        };
        let stored = vec![b("ref", 10 * D), b("old", 3 * D), b("young", H)];
        let refs: HashSet<String> = ["ref".to_string()].into();
        let plan = plan_blobs(&stored, &refs, Duration::from_secs(48 * 3600), now);
        assert_eq!(
            plan.delete
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>(),
            ["old"]
        );
        assert_eq!(
            (plan.referenced, plan.young_unreferenced, plan.bytes_freed),
            (1, 1, 10)
        );
    }
}
