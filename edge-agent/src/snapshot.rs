//! Snapshot identity, the small encrypted manifest that commits a snapshot, and the
//! schema of the metadata database (see docs/FORMAT.md).

use std::fmt;

use serde::{Deserialize, Serialize};

/// 2 stores extended attribute values as chunks (`xattrs.chunk_id`) instead of inline
/// (`xattrs.value`), so no value is ever plaintext on the agent's disk. 3 may point at
/// chunks stored as is (blob format 2), which readers of 2 cannot open.
pub const METADATA_FORMAT: u32 = 4;
/// 2 adds `agent`, the identity of the index that made the snapshot. 3 makes the
/// metadata object a list of the database's pieces (`crate::pieces`) instead of the
/// database itself.
pub const MANIFEST_FORMAT: u32 = 3;

/// A 16-byte random id written as 32 hex digits.
macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub fn random() -> Self {
                $name(rand::random())
            }
            pub fn parse(s: &str) -> Option<Self> {
                let mut b = [0u8; 16];
                hex::decode_to_slice(s, &mut b).ok()?;
                Some($name(b))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
    };
}

random_id!(
    /// 128 random bits: names a snapshot without revealing its time or host.
    SnapshotId
);

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

/// Counts reported at the end of a backup and kept in the manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    /// Files that were not in the previous snapshot of this agent.
    #[serde(default)]
    pub files_new: u64,
    /// Files whose size, times or inode changed since then.
    #[serde(default)]
    pub files_changed: u64,
    #[serde(default)]
    pub files_unmodified: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of regular-file content in the snapshot.
    pub bytes: u64,
    /// Bytes of file content that were read and chunked (changed or new files).
    pub bytes_read: u64,
    /// Uncompressed bytes of chunks that were not stored before.
    pub new_bytes: u64,
    pub new_chunks: u64,
    /// Bytes uploaded for blobs (encrypted, compressed).
    pub uploaded_bytes: u64,
    pub new_blobs: u64,
    /// Bytes uploaded for the metadata: its new pieces and their list (format 3).
    #[serde(default)]
    pub metadata_bytes: u64,
    /// Entries that could not be read and are not in the snapshot.
    pub skipped: u64,
}

/// The manifest: `age(JSON)`. Its upload is the last write of a backup, so a snapshot is
/// listed only once its metadata and every blob it references are complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// Random identity of the agent index that made the snapshot (format 2): that index
    /// deduplicates against its newest snapshot, so prune keeps it. Absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub hostname: String,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Nanoseconds since the epoch; orders snapshots taken within one second.
    pub time_unix_ns: i64,
    pub source_dirs: Vec<String>,
    pub metadata_size: u64,
    /// BLAKE3 of the encrypted metadata object, hex.
    pub metadata_hash: String,
    pub summary: Summary,
}

impl Manifest {
    /// Parses a decrypted manifest and checks the values that readers rely on.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let m: Manifest =
            serde_json::from_slice(json).map_err(|e| format!("manifest is not valid: {e}"))?;
        if SnapshotId::parse(&m.id).is_none() {
            return Err(format!("manifest id {:?} is not a snapshot id", m.id));
        }
        match (&m.agent, m.format) {
            (Some(a), _) if AgentId::parse(a).is_none() => {
                return Err("manifest agent is not an agent id".into());
            }
            (None, f) if f >= 2 => return Err("manifest has no agent id".into()),
            _ => {}
        }
        if m.hostname.len() > 255 {
            return Err("manifest hostname is longer than a host name can be".into());
        }
        // These strings reach terminals: no escape sequences.
        let printable = |s: &str| !s.chars().any(char::is_control);
        if !printable(&m.hostname)
            || !printable(&m.time)
            || !m.source_dirs.iter().all(|d| printable(d))
        {
            return Err("manifest holds control characters".into());
        }
        if m.metadata_hash.len() != 64 {
            return Err("manifest metadata hash is not a BLAKE3 hash".into());
        }
        Ok(m)
    }

    /// The identity prune keeps the newest snapshot of: the agent index, or for format-1
    /// manifests (which have none) the host name.
    pub fn identity(&self) -> String {
        match &self.agent {
            Some(a) => format!("agent {a}"),
            None => format!("host {}", self.hostname),
        }
    }
}

random_id!(
    /// 128 random bits made once per agent index: names the index that deduplicates
    /// against a snapshot, whatever the host is called.
    AgentId
);

/// Shortest prefix length, at least `min`, that tells every id of `ids` apart: tables
/// show ids this long, and any unique prefix is accepted where an id is.
pub fn short_id_len(ids: &[&str], min: usize) -> usize {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let common = sorted
        .windows(2)
        .map(|w| {
            w[0].bytes()
                .zip(w[1].bytes())
                .take_while(|(a, b)| a == b)
                .count()
        })
        .max()
        .unwrap_or(0);
    let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
    (common + 1).max(min).min(longest)
}

/// Schema of the metadata database, part 1: nodes and their extended attributes. Paths
/// are raw bytes relative to `/`.
pub const NODE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink', 'hardlink')),
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    target BLOB,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_inode ON nodes (dev, ino);
CREATE TABLE IF NOT EXISTS xattrs (
    node_id INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB,
    chunk INTEGER,
    PRIMARY KEY (node_id, name)
) WITHOUT ROWID;
";

/// Part 2: file contents as chunk lists, and where chunks live. A chunk's id (its
/// keyed hash) and a blob's name are stored once; rows refer to them by number, which
/// keeps the database, and the copy the agent keeps of it, small. The run database
/// looks chunks up by id through an index of its own outside it (`index`); readers
/// unpack the numbers into ids (`restore::catalog`).
pub const CHUNK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS file_chunks (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    blob INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    clen INTEGER NOT NULL,
    ulen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    plain_size INTEGER NOT NULL,
    payload_start INTEGER NOT NULL,
    hash BLOB NOT NULL
);
";

/// The whole metadata database (also the run database while a backup is in progress).
pub fn metadata_schema() -> String {
    format!("{NODE_SCHEMA}{CHUNK_SCHEMA}")
}

/// Node kinds as stored in `nodes.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Hardlink,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::File => "file",
            NodeKind::Dir => "dir",
            NodeKind::Symlink => "symlink",
            NodeKind::Hardlink => "hardlink",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "file" => NodeKind::File,
            "dir" => NodeKind::Dir,
            "symlink" => NodeKind::Symlink,
            "hardlink" => NodeKind::Hardlink,
            _ => return None,
        })
    }
}

/// Reads a `meta` value.
pub fn meta_value(conn: &rusqlite::Connection, key: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_unique_and_at_least_the_minimum() {
        assert_eq!(short_id_len(&[], 8), 0);
        assert_eq!(short_id_len(&["0123456789abcdef"], 8), 8);
        assert_eq!(
            short_id_len(&["0123456789abcdef", "0123456789abffff", "ffff"], 8),
            13
        );
        assert_eq!(short_id_len(&["abc", "abd"], 8), 3);
    }
}
