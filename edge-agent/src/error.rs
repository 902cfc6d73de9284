//! Error policy: every module has a `thiserror` enum that names what went wrong; they
//! convert into [`Error`], which the CLI prints as one line. Nothing here is stringly
//! typed until it reaches `main`.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::crypt::KeyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Prune(#[from] crate::prune::PruneError),
    #[error(transparent)]
    Source(#[from] crate::scan::SourceError),
    #[error(transparent)]
    Format(#[from] crate::pack::FormatError),
    #[error("local index {path}: {source}")]
    Index {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("snapshot metadata: {0}")]
    Metadata(#[from] rusqlite::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    #[error(
        "another backup is running with the index {0} (it holds {0}.lock); wait for it to finish"
    )]
    Busy(PathBuf),
    #[error("snapshot {0} not found (run `vaultik snapshots` to list them)")]
    SnapshotNotFound(String),
    #[error(
        "{0:?} is not a snapshot id: give an id or a prefix of one (hex, as `vaultik snapshots` shows them), or `latest`"
    )]
    BadSnapshotId(String),
    #[error("snapshot id {0} is ambiguous: it matches {1} snapshots")]
    SnapshotAmbiguous(String, usize),
    #[error("{0} is not in the snapshot")]
    PathNotInSnapshot(String),
    #[error("backup pipeline stopped: {0}")]
    Pipeline(String),
    /// An object read from the bucket is damaged, or not what vaultik wrote.
    #[error("{0}")]
    Damaged(String),
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
