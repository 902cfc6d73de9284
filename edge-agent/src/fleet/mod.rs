//! The agent as a fleet member: its identity and enrollment, its schedule, and the
//! host metrics it reports. The daemon (`vaultik agent`) drives the backup engine with
//! these; the engine itself knows nothing of the fleet.

pub mod identity;
pub mod metrics;
pub mod schedule;

use std::path::Path;

/// Creates `dir` mode 0700 (and its parents), or tightens it.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
