//! Uploading the run database as pieces (`crate::pieces`): each piece is hashed; one
//! the previous snapshot already stored is listed where it lies, a new one is
//! compressed into a metadata blob. The list, `age(zstd(JSON))`, is the snapshot's
//! metadata object.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use super::{OpenBlob, close_blob, open_blob};
use crate::chunk::{ChunkHasher, ChunkId};
use crate::crypt::Recipients;
use crate::error::{Error, Result};
use crate::index::BlobDone;
use crate::pack::{BlobId, Placement};
use crate::pieces::{ListBuilder, PIECE, PieceBlob, PieceList};
use crate::snapshot::SnapshotId;
use crate::store::{Repo, Uploaded};

/// The metadata database is mostly chunk ids, which do not compress: level 2 makes it
/// as small as 3 does, faster.
const METADATA_ZSTD_LEVEL: i32 = 2;

/// What storing the metadata produced.
pub(super) struct Stored {
    /// The metadata object (the list), for the manifest.
    pub object: Uploaded,
    pub list: PieceList,
    /// Bytes of the blobs written for new pieces.
    pub uploaded_bytes: u64,
}

/// Where a listed piece lies: in a blob an earlier snapshot wrote, or in one of this run.
enum Home {
    Old(PieceBlob),
    New(BlobId),
}

pub(super) struct Target<'a> {
    pub repo: &'a Repo,
    pub recipients: &'a Recipients,
    pub blob_size_limit: u64,
}

/// Stores the database at `db` for snapshot `id`, reusing the pieces of `previous`.
pub(super) fn store(
    to: &Target<'_>,
    db: &Path,
    id: &SnapshotId,
    hasher: &ChunkHasher,
    previous: Option<&PieceList>,
) -> Result<Stored> {
    let io_err = |e: io::Error| Error::io("uploading metadata from", db, e);
    let mut src = File::open(db).map_err(io_err)?;
    let known = previous.map(PieceList::known).unwrap_or_default();
    let mut writer = PieceWriter::new(to)?;
    let mut order: Vec<(Home, Placement)> = Vec::new();
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = read_full(&mut src, &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        let pid = hasher.id(piece);
        order.push(match known.get(&pid) {
            Some((blob, place)) => (Home::Old((*blob).clone()), *place),
            None => writer.put(pid, piece)?,
        });
    }
    let (done, uploaded_bytes) = writer.finish()?;
    let mut list = ListBuilder::default();
    for (home, place) in order {
        let blob = match home {
            Home::Old(b) => b,
            Home::New(b) => done
                .get(&b)
                .cloned()
                .ok_or_else(|| Error::Pipeline("a metadata blob was never closed".into()))?,
        };
        list.push(&blob, place);
    }
    let list = list.finish(&id.to_string(), hasher.key());
    let object = put_list(to, &list, id)?;
    Ok(Stored {
        object,
        list,
        uploaded_bytes,
    })
}

fn put_list(to: &Target<'_>, list: &PieceList, id: &SnapshotId) -> Result<Uploaded> {
    let what = "snapshot metadata";
    let json = serde_json::to_vec(list)
        .map_err(|e| Error::Pipeline(format!("encoding the piece list: {e}")))?;
    let packed = zstd::bulk::compress(&json, METADATA_ZSTD_LEVEL)
        .map_err(|e| Error::io("compressing", what, e))?;
    let mut w = to
        .recipients
        .encrypt(to.repo.upload(to.repo.metadata_key(id)), what)?;
    w.write_all(&packed)
        .map_err(|e| Error::io("uploading", what, e))?;
    let up = w.finish().map_err(|e| Error::io("uploading", what, e))?;
    Ok(up.finish()?)
}

/// New pieces, compressed one by one into blobs of their own.
struct PieceWriter<'a> {
    to: &'a Target<'a>,
    z: zstd::bulk::Compressor<'static>,
    open: Option<OpenBlob>,
    /// Pieces written by this run: a piece that repeats (empty pages) is stored once.
    made: HashMap<ChunkId, (BlobId, Placement)>,
    done: HashMap<BlobId, PieceBlob>,
    bytes: u64,
}

impl<'a> PieceWriter<'a> {
    fn new(to: &'a Target<'a>) -> Result<Self> {
        let z = zstd::bulk::Compressor::new(METADATA_ZSTD_LEVEL)
            .map_err(|e| Error::io("starting zstd for", "snapshot metadata", e))?;
        Ok(PieceWriter {
            to,
            z,
            open: None,
            made: HashMap::new(),
            done: HashMap::new(),
            bytes: 0,
        })
    }

    fn put(&mut self, id: ChunkId, piece: &[u8]) -> Result<(Home, Placement)> {
        if let Some((blob, place)) = self.made.get(&id) {
            return Ok((Home::New(*blob), *place));
        }
        let frame = crate::pack::encode(&mut self.z, piece.to_vec())
            .map_err(|e| Error::io("compressing", "snapshot metadata", e))?;
        let blob = match self.open.as_mut() {
            Some(b) => b,
            None => self
                .open
                .insert(open_blob(self.to.repo, self.to.recipients)?),
        };
        blob.w
            .write_all(&frame)
            .map_err(|e| Error::io("writing blob", blob.id.to_hex(), e))?;
        let place = blob.layout.push(id, frame.len() as u32, piece.len() as u32);
        let home = blob.id;
        self.made.insert(id, (home, place));
        if blob.layout.is_full(self.to.blob_size_limit) {
            self.close()?;
        }
        Ok((Home::New(home), place))
    }

    fn close(&mut self) -> Result<()> {
        if let Some(b) = self.open.take() {
            let done = close_blob(b)?;
            self.bytes += done.uploaded.size;
            self.done.insert(done.id, listed(&done));
        }
        Ok(())
    }

    /// Closes the open blob; returns every blob written and their bytes.
    fn finish(mut self) -> Result<(HashMap<BlobId, PieceBlob>, u64)> {
        self.close()?;
        Ok((self.done, self.bytes))
    }
}

fn listed(b: &BlobDone) -> PieceBlob {
    PieceBlob {
        id: b.id.to_hex(),
        size: b.uploaded.size,
        plain_size: b.plain_size,
        payload_start: b.payload_start,
        hash: hex::encode(b.uploaded.hash),
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
