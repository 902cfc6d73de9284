//! The kept copy of the newest snapshot's metadata database: zstd-compressed between
//! runs (`<index>-prev.zst`, about a third of the database), unpacked into the working
//! copy `<index>-prev` when the index opens and that deleted again when it closes.
//!
//! A working copy without a packed one is what agents before the packed copy kept, or
//! what a run that could not write the packed copy left: it is used as it is.

use std::io::Write;
use std::path::Path;

use super::{Index, private_file, remove_if_there};
use crate::error::{Error, Result};

/// zstd level of the packed copy: level 3 packs the database of 300,000 small files in
/// about a quarter of a second; higher levels cost several times that for a few percent.
const LEVEL: i32 = 3;

impl Index {
    /// Unpacks the packed copy, when there is one, into the working copy (read-only:
    /// into a private temporary file, leaving the state directory untouched). A packed
    /// copy that does not unpack is forgotten, with a notice.
    pub(super) fn unpack_kept(&mut self) -> Result<()> {
        if !self.kept_path.exists() {
            return Ok(());
        }
        let unpacked = if self.read_only {
            let tmp = tempfile::Builder::new()
                .prefix("vaultik-prev-")
                .tempfile()
                .map_err(|e| Error::io("creating", std::env::temp_dir(), e))?;
            let done = unpack(&self.kept_path, tmp.path());
            self.prev_path = tmp.path().to_path_buf();
            self.scratch = Some(tmp);
            done
        } else {
            private_file(&self.prev_path)?;
            unpack(&self.kept_path, &self.prev_path)
        };
        if let Err(reason) = unpacked {
            self.notices.push(format!(
                "warning: the kept copy of the newest snapshot's metadata ({}) is damaged (it does not unpack: {reason}); this backup reads and uploads everything again",
                self.kept_path.display()
            ));
            if !self.read_only {
                remove_if_there(&self.kept_path)?;
            }
            remove_if_there(&self.prev_path)?;
        }
        Ok(())
    }

    /// Packs the finished run database `db` as the kept copy: written beside it, made
    /// durable, then renamed over the old one. When that fails (a full disk), the old
    /// packed copy is removed, so the working copy the run leaves is the one used.
    pub(super) fn pack_kept(&mut self, db: &Path) -> Result<()> {
        let tmp = super::beside(&self.path, "-prev.zst.tmp");
        let packed = pack(db, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &self.kept_path))
            .map_err(|e| Error::io("packing the kept copy into", &tmp, e));
        if let Err(e) = packed {
            let _ = std::fs::remove_file(&tmp);
            remove_if_there(&self.kept_path)?;
            self.notices.push(format!(
                "warning: {e}; the newest snapshot's metadata is kept unpacked ({})",
                self.prev_path.display()
            ));
        }
        Ok(())
    }

    /// Removes the working copy if a packed one holds the same database.
    pub(super) fn drop_working_copy(&self) {
        if !self.read_only && self.kept_path.exists() {
            let _ = std::fs::remove_file(&self.prev_path);
        }
    }
}

fn unpack(from: &Path, to: &Path) -> std::io::Result<()> {
    let packed = std::fs::File::open(from)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(to)?;
    let mut z = zstd::stream::Decoder::new(packed)?;
    std::io::copy(&mut z, &mut out)?;
    out.flush()
}

fn pack(from: &Path, to: &Path) -> std::io::Result<()> {
    private_file(to).map_err(std::io::Error::other)?;
    let mut db = std::fs::File::open(from)?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(to)?;
    let mut z = zstd::stream::Encoder::new(out, LEVEL)?;
    std::io::copy(&mut db, &mut z)?;
    z.finish()?.sync_all()
}
