//! Finding snapshots and opening their metadata: manifests listed and decrypted,
//! metadata downloaded, hash-checked, decompressed under a size cap into a private
//! temporary SQLite file, and opened defensively. Everything here is read from the
//! bucket and therefore hostile input (docs/SECURITY.md).

use std::io::{Read, Write};
use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension};

use super::schema;
use crate::chunk::ChunkHasher;
use crate::crypt::{Identities, KeyError};
use crate::error::{Error, Result};
use crate::pieces::{Checked, PieceList};
use crate::snapshot::{MANIFEST_FORMAT, METADATA_FORMAT, Manifest, SnapshotId, meta_value};
use crate::store::{Object, Repo, StoreError};

/// A manifest is a few kilobytes; anything much larger is not one.
const MAX_MANIFEST: u64 = 1 << 20;
/// Decompressed metadata may be at most this many times its compressed size, plus
/// [`METADATA_SLACK`]: SQLite compresses well, but not a thousandfold.
const METADATA_RATIO: u64 = 200;
const METADATA_SLACK: u64 = 256 << 20;
/// A piece list names 64 KiB of database in about 200 bytes of JSON: 64 MiB of list is
/// a database of 20 GiB.
const MAX_PIECE_LIST: u64 = 64 << 20;
/// The database a piece list makes may be at most this many times the metadata object's
/// size, plus [`METADATA_SLACK`]: a real list is about 1,500 times smaller.
const PIECES_RATIO: u64 = 4096;

/// The snapshots of a repository, and the manifest objects that could not be read.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Oldest first.
    pub snapshots: Vec<Manifest>,
    /// (object key, why): foreign, undecryptable or malformed manifests, skipped.
    pub unreadable: Vec<(String, String)>,
}

impl Catalog {
    /// One warning line per unreadable manifest.
    pub fn warnings(&self) -> impl Iterator<Item = String> + '_ {
        self.unreadable
            .iter()
            .map(|(key, why)| format!("warning: skipped {key}: {why}"))
    }
}

/// Lists all snapshots, decrypting their manifests, oldest first. A manifest that does
/// not decrypt with the key or does not parse is skipped and reported, so one foreign
/// object cannot hide every snapshot; a wrong key for all of them is an error.
pub fn list_snapshots(repo: &Repo, ids: &Identities) -> Result<Catalog> {
    let mut cat = Catalog::default();
    let mut wrong_key = None;
    let mut seen = std::collections::HashSet::new();
    for obj in repo.list(&repo.index_dir())? {
        let Some(Object::Manifest(id)) = repo.object(&obj.key) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        match open_manifest(repo, ids, &id, obj.size) {
            Ok(m) => cat.snapshots.push(m),
            Err(Error::Store(e)) => return Err(e.into()),
            Err(e) => {
                if let Error::Key(KeyError::WrongKey { what }) = &e {
                    wrong_key.get_or_insert_with(|| what.clone());
                }
                cat.unreadable.push((obj.key.clone(), e.to_string()));
            }
        }
    }
    if cat.snapshots.is_empty()
        && let Some(what) = wrong_key
    {
        return Err(Error::Key(KeyError::WrongKey { what }));
    }
    cat.snapshots
        .sort_by(|a, b| (a.time_unix_ns, &a.id).cmp(&(b.time_unix_ns, &b.id)));
    Ok(cat)
}

pub fn read_manifest(repo: &Repo, ids: &Identities, id: &SnapshotId) -> Result<Manifest> {
    let size = repo
        .size(&repo.manifest_key(id))
        .map_err(|e| not_found(e, id))?;
    open_manifest(repo, ids, id, size)
}

fn not_found(e: StoreError, id: &SnapshotId) -> Error {
    match e {
        StoreError::NotFound { .. } => Error::SnapshotNotFound(id.to_string()),
        e => e.into(),
    }
}

/// Reads and checks the manifest of `id`, whose object is `size` bytes (as listed):
/// nothing larger than a manifest can be is downloaded.
pub fn open_manifest(
    repo: &Repo,
    ids: &Identities,
    id: &SnapshotId,
    size: u64,
) -> Result<Manifest> {
    let what = format!("snapshot {id}");
    if size > MAX_MANIFEST {
        return Err(KeyError::Decrypt {
            what,
            message: format!("{size} bytes is too large for a manifest"),
        }
        .into());
    }
    let sealed = repo
        .get(&repo.manifest_key(id))
        .map_err(|e| not_found(e, id))?;
    let mut json = Vec::new();
    ids.decrypt(&sealed[..], &what)?
        .take(MAX_MANIFEST)
        .read_to_end(&mut json)
        .map_err(|e| KeyError::Decrypt {
            what: what.clone(),
            message: e.to_string(),
        })?;
    let m = Manifest::from_json(&json).map_err(|message| KeyError::Decrypt {
        what: what.clone(),
        message,
    })?;
    if m.format > MANIFEST_FORMAT {
        return Err(Error::Damaged(format!(
            "{what} has manifest format {}; this vaultik reads up to {MANIFEST_FORMAT}: upgrade vaultik",
            m.format,
        )));
    }
    if m.id != id.to_string() {
        return Err(KeyError::Decrypt {
            what,
            message: format!("manifest names snapshot {}, not its own", m.id),
        }
        .into());
    }
    Ok(m)
}

/// Finds a snapshot by full id, unique prefix, or `latest`.
pub fn resolve(repo: &Repo, ids: &Identities, arg: &str) -> Result<Manifest> {
    // Ids are lowercase hex; a prefix typed in capitals means the same snapshot.
    let lower = arg.to_ascii_lowercase();
    let arg = if arg == "latest" { arg } else { lower.as_str() };
    if arg.is_empty() || (arg != "latest" && !arg.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(Error::BadSnapshotId(arg.into()));
    }
    if let Some(id) = SnapshotId::parse(arg) {
        return read_manifest(repo, ids, &id);
    }
    let all = list_snapshots(repo, ids)?.snapshots;
    if arg == "latest" {
        return all
            .into_iter()
            .last()
            .ok_or_else(|| Error::SnapshotNotFound(arg.into()));
    }
    let mut hits: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(arg)).collect();
    match hits.len() {
        0 => Err(Error::SnapshotNotFound(arg.into())),
        1 => Ok(hits.remove(0)),
        n => Err(Error::SnapshotAmbiguous(arg.into(), n)),
    }
}

/// A snapshot's metadata database, decrypted into a private temporary file.
pub struct Metadata {
    pub manifest: Manifest,
    file: tempfile::NamedTempFile,
    pub conn: Connection,
    pub hasher: ChunkHasher,
}

impl Metadata {
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Settings for every connection to a downloaded metadata database: nothing in its
/// schema may run code or write where it should not.
pub(crate) fn harden(conn: &Connection) -> Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_VIEW, false)?;
    // Stable plans: no re-preparing a statement whenever a parameter is rebound.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Decompresses `plain` into `out`, stopping with an error past `limit` bytes.
fn decompress_capped(plain: impl Read, out: &mut impl Write, limit: u64, what: &str) -> Result<()> {
    let z = zstd::stream::Decoder::new(plain).map_err(|e| Error::io("decompressing", what, e))?;
    let copied = std::io::copy(&mut z.take(limit.saturating_add(1)), out)
        .map_err(|e| Error::io("decompressing", what, e))?;
    if copied > limit {
        return Err(Error::Damaged(format!(
            "{what} decompresses to more than {limit} bytes: it is damaged or hostile"
        )));
    }
    Ok(())
}

/// Reads the database a piece list describes into `out`.
fn read_pieces(
    repo: &Repo,
    ids: &Identities,
    json: &[u8],
    manifest: &Manifest,
    out: &std::fs::File,
    what: &str,
) -> Result<Checked> {
    let list: PieceList = serde_json::from_slice(json)
        .map_err(|e| Error::Damaged(format!("{what}: the piece list is not valid: {e}")))?;
    let max_size = manifest
        .metadata_size
        .saturating_mul(PIECES_RATIO)
        .saturating_add(METADATA_SLACK);
    let list = list
        .check(&manifest.id, max_size)
        .map_err(|e| Error::Damaged(format!("{what}: {e}")))?;
    super::blobs::fetch_pieces(repo, ids, &list, out, what)?;
    Ok(list)
}

/// Adds the pieces, the bases of delta pieces and their blobs to the private copy's
/// `chunks` and `blobs`, so that prune keeps them and verify checks them like any other.
fn list_pieces(conn: &Connection, list: &Checked) -> Result<()> {
    let mut blob = conn.prepare(
        "INSERT OR IGNORE INTO blobs (name, size, plain_size, payload_start, hash)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (b, id) in list.list.blobs.iter().zip(&list.blob_ids) {
        let hash = hex::decode(&b.hash).unwrap_or_default();
        blob.execute(rusqlite::params![
            id.to_hex(),
            b.size as i64,
            b.plain_size as i64,
            b.payload_start as i64,
            hash
        ])?;
    }
    let mut chunk = conn.prepare(
        "INSERT INTO chunks (hash, blob, offset, clen, ulen)
         SELECT ?1, id, ?3, ?4, ?5 FROM blobs WHERE name = ?2",
    )?;
    for p in list.all() {
        chunk.execute(rusqlite::params![
            &p.id.0[..],
            list.blob_ids[p.blob].to_hex(),
            p.offset as i64,
            p.clen,
            p.ulen
        ])?;
    }
    Ok(())
}

pub fn open_metadata(repo: &Repo, ids: &Identities, manifest: Manifest) -> Result<Metadata> {
    let id = SnapshotId::parse(&manifest.id)
        .ok_or_else(|| Error::SnapshotNotFound(manifest.id.clone()))?;
    let what = format!("metadata of snapshot {id}");
    let key = repo.metadata_key(&id);
    let damaged = || {
        Error::Damaged(format!(
            "{what} is damaged: its size or hash does not match the manifest"
        ))
    };
    // Checked before downloading: the manifest bounds what is read and written.
    if repo.size(&key)? != manifest.metadata_size {
        return Err(damaged());
    }
    let mut file = tempfile::Builder::new()
        .prefix("vaultik-metadata-")
        .tempfile()
        .map_err(|e| Error::io("creating", std::env::temp_dir(), e))?;
    let limit = manifest
        .metadata_size
        .saturating_mul(METADATA_RATIO)
        .saturating_add(METADATA_SLACK);
    // Streamed: decrypted and decompressed as it arrives, hashed on the way; nothing
    // from the object is trusted until the hash matches.
    let mut sealed = repo.reader(&key)?;
    let plain = ids.decrypt(&mut sealed, &what)?;
    let pieces = if manifest.format >= 3 {
        let mut json = Vec::new();
        decompress_capped(plain, &mut json, MAX_PIECE_LIST, &what)?;
        Some(json)
    } else {
        decompress_capped(plain, file.as_file_mut(), limit, &what)?;
        None
    };
    let (count, hash) = sealed.digest();
    if count != manifest.metadata_size || hex::encode(hash) != manifest.metadata_hash {
        return Err(damaged());
    }
    let pieces = match pieces {
        Some(json) => Some(read_pieces(
            repo,
            ids,
            &json,
            &manifest,
            file.as_file(),
            &what,
        )?),
        None => None,
    };
    let conn = Connection::open(file.path())?;
    harden(&conn)?;
    // Any SQLite error from here on is about this snapshot's database: named as such.
    let key = make_ready(&conn, &what, pieces.as_ref()).map_err(|e| match e {
        Error::Metadata(e) => Error::Damaged(format!("{what}: {e}")),
        e => e,
    })?;
    Ok(Metadata {
        manifest,
        file,
        conn,
        hasher: ChunkHasher::new(key),
    })
}

/// Checks the downloaded database and readies it for queries (`schema`); returns its
/// chunk key.
fn make_ready(conn: &Connection, what: &str, pieces: Option<&Checked>) -> Result<[u8; 32]> {
    // A private, disposable copy: durability would only cost fsyncs. CHECK expressions
    // are never evaluated: they could ask for any amount of work on every row.
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
         PRAGMA ignore_check_constraints = ON;",
    )
    .map_err(|e| Error::Damaged(format!("{what} is not a database: {e}")))?;
    schema::check_objects(conn, what)?;
    schema::check_pages(conn, what)?;
    // Read before the indexes are rebuilt: from the table itself.
    let format: Option<String> = conn
        .query_row(
            "SELECT value FROM meta NOT INDEXED WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let format: u32 = format
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Damaged(format!("{what}: no format version")))?;
    if format > METADATA_FORMAT {
        return Err(Error::Damaged(format!(
            "{what} has format {format}; this vaultik reads up to {METADATA_FORMAT}: upgrade vaultik"
        )));
    }
    if format < 4 {
        schema::number_chunks(conn, format)
            .map_err(|e| Error::Damaged(format!("{what}: its chunk tables are not valid: {e}")))?;
    }
    schema::check_tables(conn, what)?;
    schema::normalize_references(conn)?;
    schema::rebuild_indexes(conn, what)?;
    let key = meta_value(conn, "chunk_key")?
        .and_then(|k| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(k, &mut b).ok().map(|_| b)
        })
        .ok_or_else(|| Error::Damaged(format!("{what}: no chunk key")))?;
    if let Some(list) = pieces {
        list_pieces(conn, list)?;
    }
    schema::add_reader_indexes(conn)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_is_capped() {
        let zeros = vec![0u8; 10 << 20];
        let packed = zstd::bulk::compress(&zeros, 3).unwrap();
        let mut out = Vec::new();
        let e = decompress_capped(&packed[..], &mut out, 1 << 20, "m").unwrap_err();
        assert!(e.to_string().contains("more than 1048576 bytes"), "{e}");
        assert!(out.len() <= (1 << 20) + 1);
        let mut out = Vec::new();
        decompress_capped(&packed[..], &mut out, 10 << 20, "m").unwrap();
        assert_eq!(out.len(), 10 << 20);
    }
}
