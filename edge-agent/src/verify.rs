//! `vaultik verify`: checks that what snapshots reference is there and intact.
//!
//! With the private key: every blob any snapshot references exists with the recorded
//! size; with `--read-data` (or a random subset) blobs are downloaded, their BLAKE3
//! checked, decrypted, and every chunk decompressed and hash-checked. Without the key
//! (on the agent): every blob of the agent's newest snapshot exists with the right size,
//! which needs only HEAD (GetObject) permission.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;

use crate::crypt::Identities;
use crate::error::Result;
use crate::pack::{BlobId, open_frame, parse_blob};
use crate::restore::{Metadata, open_manifest, open_metadata};
use crate::store::{Object, Repo, StoreError};

/// How much blob data to download and check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    None,
    All,
    /// A random share, in percent.
    Subset(f64),
}

/// One problem, with what it affects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Damage {
    pub what: String,
    pub snapshots: BTreeSet<String>,
    pub files: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub snapshots: usize,
    pub blobs: usize,
    pub blobs_read: usize,
    /// Keyed by the damaged object.
    pub damage: BTreeMap<String, Damage>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }

    fn add(&mut self, object: &str, what: String, snapshot: &str, files: Vec<String>) {
        let d = self.damage.entry(object.to_string()).or_default();
        if d.what.is_empty() {
            d.what = what;
        }
        d.snapshots.insert(snapshot.to_string());
        d.files.extend(files);
    }

    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (object, d) in &self.damage {
            writeln!(out, "damaged: {object}: {}", d.what)?;
            if !d.snapshots.is_empty() {
                let s: Vec<&str> = d.snapshots.iter().map(String::as_str).collect();
                writeln!(out, "  snapshots: {}", s.join(" "))?;
            }
            for f in d.files.iter().take(20) {
                writeln!(out, "  file: /{f}")?;
            }
            if d.files.len() > 20 {
                writeln!(out, "  … and {} more files", d.files.len() - 20)?;
            }
        }
        writeln!(
            out,
            "{} snapshots, {} blobs checked, {} blobs read in full: {}",
            self.snapshots,
            self.blobs,
            self.blobs_read,
            if self.is_clean() {
                "no problems found".to_string()
            } else {
                format!("{} damaged objects", self.damage.len())
            }
        )
    }
}

struct BlobRecord {
    size: u64,
    hash: Vec<u8>,
    snapshot: String,
}

fn files_in_blob(meta: &Metadata, blob: i64) -> Result<Vec<String>> {
    let mut q = meta.conn.prepare_cached(
        "SELECT DISTINCT n.path FROM nodes n JOIN file_chunks f ON f.node_id = n.id
         JOIN chunks c ON c.id = f.chunk WHERE c.blob = ?1 ORDER BY n.path",
    )?;
    // A path may be TEXT or BLOB (restore takes both) or, hostile, anything.
    let rows = q.query_map([blob], |r| crate::restore::text(r, 0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A blob row of a snapshot's metadata: its number, and its name, size and hash if they
/// are valid.
type BlobRow = (i64, Option<(String, u64, Vec<u8>)>);

/// The blobs a snapshot's metadata names, read tolerantly, so that one malformed row is
/// damage in its snapshot, not the end of the verify.
fn blob_rows(meta: &Metadata) -> Result<Vec<BlobRow>> {
    let mut q = meta
        .conn
        .prepare("SELECT id, name, size, hash FROM blobs")?;
    let rows = q.query_map([], |r| {
        let record = (|| {
            // A name as restore and prune read it: TEXT or BLOB, in canonical form.
            let name = String::from_utf8_lossy(r.get_ref(1).ok()?.as_bytes().ok()?).into_owned();
            let name = BlobId::canonical(name);
            let size = u64::try_from(r.get::<_, i64>(2).ok()?).ok()?;
            Some((name, size, r.get(3).ok()?))
        })();
        Ok((r.get(0)?, record))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Verifies every snapshot of the repository (needs the private key).
pub fn verify(repo: &Repo, ids: &Identities, read: ReadData) -> Result<Report> {
    let mut report = Report::default();
    let stored: HashMap<String, u64> = repo
        .list(&repo.blobs_dir())?
        .into_iter()
        .filter_map(|o| match repo.object(&o.key)? {
            Object::Blob(id) => Some((id.to_hex(), o.size)),
            _ => None,
        })
        .collect();
    let mut to_read: BTreeMap<String, BlobRecord> = BTreeMap::new();
    let mut affected: HashMap<String, Vec<String>> = HashMap::new();
    // Each blob is downloaded once, however many snapshots share it.
    let mut seen: HashSet<String> = HashSet::new();
    let mut checked: HashSet<String> = HashSet::new();
    for obj in repo.list(&repo.index_dir())? {
        let Some(Object::Manifest(id)) = repo.object(&obj.key) else {
            continue;
        };
        report.snapshots += 1;
        let sid = id.to_string();
        let manifest = match open_manifest(repo, ids, &id, obj.size) {
            Ok(m) => m,
            Err(crate::Error::Key(e @ crate::crypt::KeyError::WrongKey { .. })) => {
                return Err(e.into());
            }
            Err(e) => {
                report.add(
                    &obj.key,
                    format!("manifest unreadable: {e}"),
                    &sid,
                    Vec::new(),
                );
                continue;
            }
        };
        let meta = match open_metadata(repo, ids, manifest) {
            Ok(m) => m,
            Err(e) => {
                let key = repo.metadata_key(&id).to_string();
                let what = match e {
                    crate::Error::Store(StoreError::NotFound { .. }) => {
                        "metadata object is missing".to_string()
                    }
                    e => format!("metadata unreadable: {e}"),
                };
                report.add(&key, what, &sid, Vec::new());
                continue;
            }
        };
        for (row, blob) in blob_rows(&meta)? {
            let Some((blob, size, hash)) = blob else {
                let key = repo.metadata_key(&id).to_string();
                let what = format!("blob row {row} has no valid name, size or hash");
                report.add(&key, what, &sid, files_in_blob(&meta, row)?);
                continue;
            };
            let problem = match stored.get(&blob) {
                None => Some("blob is missing".to_string()),
                Some(s) if *s != size => Some(format!("blob is {s} bytes, expected {size}")),
                Some(_) => None,
            };
            checked.insert(blob.clone());
            if let Some(what) = problem {
                report.add(&blob, what, &sid, files_in_blob(&meta, row)?);
                continue;
            }
            if read != ReadData::None && seen.insert(blob.clone()) {
                affected
                    .entry(blob.clone())
                    .or_default()
                    .extend(files_in_blob(&meta, row)?);
                to_read.entry(blob).or_insert(BlobRecord {
                    size,
                    hash,
                    snapshot: sid.clone(),
                });
            }
        }
        if read != ReadData::None {
            read_blobs(repo, ids, &meta, &mut to_read, &affected, read, &mut report)?;
        }
    }
    report.blobs = checked.len();
    Ok(report)
}

/// Downloads and checks the blobs queued by one snapshot (each blob once overall).
fn read_blobs(
    repo: &Repo,
    ids: &Identities,
    meta: &Metadata,
    queue: &mut BTreeMap<String, BlobRecord>,
    affected: &HashMap<String, Vec<String>>,
    read: ReadData,
    report: &mut Report,
) -> Result<()> {
    let queued: Vec<(String, BlobRecord)> = std::mem::take(queue).into_iter().collect();
    for (blob, rec) in queued {
        if let ReadData::Subset(pct) = read
            && rand::random::<f64>() * 100.0 >= pct
        {
            continue;
        }
        if report.damage.contains_key(&blob) {
            continue;
        }
        report.blobs_read += 1;
        let files = affected.get(&blob).cloned().unwrap_or_default();
        if let Err(what) = check_blob(repo, ids, meta, &blob, &rec) {
            report.add(&blob, what, &rec.snapshot, files);
        }
    }
    Ok(())
}

fn check_blob(
    repo: &Repo,
    ids: &Identities,
    meta: &Metadata,
    blob: &str,
    rec: &BlobRecord,
) -> std::result::Result<(), String> {
    let id = BlobId::parse(blob).ok_or_else(|| "blob name is not valid".to_string())?;
    let data = repo.get(&repo.blob_key(&id)).map_err(|e| e.to_string())?;
    if data.len() as u64 != rec.size {
        return Err(format!(
            "blob is {} bytes, expected {}",
            data.len(),
            rec.size
        ));
    }
    if blake3::hash(&data).as_bytes()[..] != rec.hash[..] {
        return Err("blob content does not match its recorded hash".into());
    }
    let mut plain = Vec::new();
    ids.decrypt(&data[..], blob)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut plain)
        .map_err(|e| format!("does not decrypt: {e}"))?;
    let entries = parse_blob(blob, &plain).map_err(|e| e.to_string())?;
    for p in &entries {
        let frame = &plain[p.offset as usize..(p.offset + u64::from(p.clen)) as usize];
        // A delta frame (a metadata piece) opens only against its base, in another
        // blob: every one a snapshot lists was opened and hash-checked when its
        // metadata was read, and the blob's hash covers its bytes here.
        if p.clen < p.ulen && crate::delta::base_of(frame).is_some() {
            continue;
        }
        open_frame(frame, p.ulen, p.chunk, &meta.hasher).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Verifies, without the private key, that every blob of the agent's newest snapshot
/// (from its local index) exists with the right size.
pub fn verify_from_index(repo: &Repo, index: &crate::index::Index) -> Result<Report> {
    let mut report = Report::default();
    let blobs = index.blob_sizes()?;
    if blobs.is_empty() {
        return Err(crate::Error::Pipeline(
            "the local index holds no completed snapshot: nothing to verify".into(),
        ));
    }
    for (blob, size) in blobs {
        report.blobs += 1;
        let Some(id) = BlobId::parse(&blob) else {
            continue;
        };
        let problem = match repo.size(&repo.blob_key(&id)) {
            Ok(s) if s == size => None,
            Ok(s) => Some(format!("blob is {s} bytes, expected {size}")),
            Err(StoreError::NotFound { .. }) => Some("blob is missing".to_string()),
            Err(e) => return Err(e.into()),
        };
        if let Some(what) = problem {
            report.add(
                &blob,
                what,
                "newest snapshot in the local index",
                Vec::new(),
            );
        }
    }
    Ok(report)
}
