//! Every message that crosses between an agent and its controller. Sizes are bounded by
//! `heapless` types so that the agent holds any message in fixed memory; a policy
//! carries no secret and no shell command, by construction. Enum variants differ in
//! size on purpose: each is its fixed bound, and a side holds one message at a time.

use heapless::{String as Str, Vec as List};
use serde::{Deserialize, Serialize};

use crate::id::{CommandId, JobId};

/// Host names, versions, destination names.
pub type Name = Str<64>;
/// A reason or a short detail.
pub type Text = Str<256>;
/// A path or an exclude pattern.
pub type PathText = Str<256>;
/// One line of a running job's log.
pub type LogLine = Str<512>;
/// Events per [`Up::Events`] and ids per [`Down::Acked`].
pub const BATCH: usize = 16;

/// `s` cut to at most `N` bytes at a character boundary, for text that may be long
/// (host names, mount points, reasons) but must fit its bound.
pub fn truncated<const N: usize>(s: &str) -> Str<N> {
    let mut out = Str::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

/// Agent → controller, on the agent's `up` topic.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Up {
    Hello(Hello),
    Heartbeat(Heartbeat),
    /// Events from the agent's outbox, oldest first; each stays there until the
    /// controller acknowledges its id ([`Down::Acked`]).
    Events(List<Event, BATCH>),
    /// A certificate signing request (PEM) for a renewal, made with the agent's key.
    Renew {
        csr_pem: Str<2048>,
    },
}

/// Controller → agent, on the agent's `down` topic.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Down {
    Command(Command),
    /// The controller has committed these events to its database.
    Acked(List<u64, BATCH>),
    /// A renewed client certificate (PEM) for the agent's key.
    Certificate {
        pem: Str<4096>,
    },
}

/// The agent's retained `status` message; `Offline` is its last will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Online,
    Offline,
}

/// Sent on every (re)connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: Name,
    pub os: Name,
    pub arch: Name,
    pub hostname: Name,
    pub capabilities: List<Capability, 8>,
    /// The revision of the policy the agent runs, if it has one.
    pub policy_revision: Option<u64>,
    /// The random id of the agent's outbox: event ids count within it, so a wiped
    /// state directory starts a new count the controller does not mistake for repeats.
    pub outbox: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Capability {
    Backup,
    Verify,
    Cancel,
    /// Learns changed directories from inotify between full scans.
    Inotify,
}

/// Host metrics, sent periodically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub at_ms: i64,
    /// CPU use over the last interval, in thousandths.
    pub cpu_permille: u16,
    pub memory_used: u64,
    pub memory_total: u64,
    pub disks: List<Disk, 4>,
    /// When the next scheduled backup is due, if one is.
    pub next_backup_ms: Option<i64>,
    /// Events waiting in the outbox for an acknowledgement.
    pub outbox: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub role: DiskRole,
    pub mount: PathText,
    pub total: u64,
    pub available: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskRole {
    /// Holds a source directory.
    Source,
    /// Holds the agent's state (index, outbox).
    State,
}

/// One outbox entry. `id` increases per agent; the controller ignores ids it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub at_ms: i64,
    pub body: EventBody,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    Job(JobEvent),
    Log {
        job: JobId,
        level: Level,
        line: LogLine,
    },
    Snapshot(SnapshotRecord),
    /// A command was received: accepted, or refused with a reason.
    CommandAck {
        command: CommandId,
        accepted: bool,
        reason: Text,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job: JobId,
    pub kind: JobKind,
    /// The command that asked for it; `None` for a scheduled run.
    pub command: Option<CommandId>,
    pub state: JobState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Backup,
    Verify,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Started,
    /// Dropped first when the outbox is full.
    Progress {
        files: u64,
        bytes: u64,
        total_bytes: Option<u64>,
    },
    Finished(JobTotals),
    Failed {
        reason: Text,
    },
    Skipped {
        reason: Text,
    },
    Cancelled,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTotals {
    pub files: u64,
    pub files_new: u64,
    pub files_changed: u64,
    pub bytes: u64,
    pub new_bytes: u64,
    pub uploaded_bytes: u64,
    pub skipped: u64,
    pub duration_ms: u64,
    pub snapshot: Option<[u8; 16]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: [u8; 16],
    pub time_ms: i64,
    pub hostname: Name,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: CommandId,
    pub body: CommandBody,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandBody {
    RunBackup,
    ApplyPolicy(Policy),
    Verify,
    Cancel { job: JobId },
}

/// What and when an agent backs up, and what the controller's prune keeps. Never a
/// secret (keys and credentials stay in the agent's config) and never a command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Increases with every change; an agent ignores a revision older than its own.
    pub revision: u64,
    pub source_dirs: List<PathText, 16>,
    pub exclude: List<PathText, 32>,
    pub schedule: Schedule,
    pub min_time_between_runs_s: u64,
    pub full_scan_interval_s: u64,
    pub retention: Retention,
    /// A destination defined in the agent's config, by name.
    pub destination: Name,
}

/// Parses a five-field cron expression (minute hour day month weekday), the one
/// check both the controller (before sending a policy) and the agent (before
/// adopting one) apply.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    if expr.split_whitespace().count() != 5 {
        return Err("needs five fields: minute hour day month weekday".into());
    }
    expr.parse::<croner::Cron>().map_err(|e| e.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    Every {
        seconds: u64,
    },
    /// Five-field cron expression.
    Cron(Str<64>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within_s: Option<u64>,
}
