//! vaultik's backup engine: scan → chunk → dedup → compress → pack → encrypt → upload,
//! and the restore side that reverses it with the private key.
//!
//! Pure logic (`chunk`, `pack`, `delta`, `pieces`, `scan::exclude`, `restore::plan`) is kept apart from I/O
//! (`store`, `index`, `snapshot`, the pipeline drivers in `backup` and `restore`).

pub mod backup;
pub mod chunk;
pub mod config;
pub mod crypt;
pub mod delta;
pub mod error;
pub mod fleet;
pub mod index;
pub mod outbox;
pub mod pack;
pub mod pieces;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod scan;
pub mod snapshot;
pub mod store;
pub mod verify;
pub mod watch;

pub use error::Error;
