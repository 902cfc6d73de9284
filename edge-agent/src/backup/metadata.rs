//! Uploading the run database as pieces (`crate::pieces`): each piece is hashed; one
//! the previous snapshot already stored is listed where it lies, a new one is
//! compressed into a metadata blob, as a delta frame (`crate::delta`) against the
//! previous snapshot's piece at the same place when that one is at hand and the chain
//! under it is short enough. The list, `age(zstd(JSON))`, is the snapshot's metadata
//! object.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{OpenBlob, close_blob, open_blob};
use crate::chunk::{ChunkHasher, ChunkId};
use crate::crypt::Recipients;
use crate::error::{Error, Result};
use crate::index::BlobDone;
use crate::pack::{BlobId, Placement};
use crate::pieces::{Checked, ListBuilder, MAX_CHAIN, PIECE, PieceBlob, PieceList};
use crate::snapshot::SnapshotId;
use crate::store::{Repo, Uploaded};

/// The metadata database is mostly chunk ids, which do not compress: level 2 makes it
/// as small as 3 does, faster.
const METADATA_ZSTD_LEVEL: i32 = 2;
/// A delta frame larger than this share of its piece (1/8) is compared with the whole
/// piece compressed alone: after a rebuild, pieces at the same place hold other rows.
const DELTA_WORTH: usize = 8;

/// What storing the metadata produced.
pub(super) struct Stored {
    /// The metadata object (the list), for the manifest.
    pub object: Uploaded,
    pub list: PieceList,
    /// Bytes of the blobs written for new pieces.
    pub uploaded_bytes: u64,
}

/// The previous snapshot's metadata: its piece list and the database it describes.
pub(super) struct Previous<'a> {
    pub list: &'a PieceList,
    pub db: &'a Path,
}

/// One piece of the new list.
enum Listed {
    /// Piece `n` of the previous list, as it lies (with the chain under it).
    Reused(usize),
    /// Written by this run: whole, or a delta against piece `base` of the previous list.
    New {
        blob: BlobId,
        place: Placement,
        base: Option<usize>,
    },
}

pub(super) struct Target<'a> {
    pub repo: &'a Repo,
    pub recipients: &'a Recipients,
    pub blob_size_limit: u64,
}

/// Stores the database at `db` for snapshot `id`, reusing the pieces of `previous` and
/// storing changed ones as deltas against them.
pub(super) fn store(
    to: &Target<'_>,
    db: &Path,
    id: &SnapshotId,
    hasher: &ChunkHasher,
    previous: Option<Previous<'_>>,
) -> Result<Stored> {
    // The kept list is the agent's own, but a damaged one must not make a list no
    // reader accepts: one that fails a reader's checks is not used at all.
    let prev = previous.and_then(|p| {
        let checked = p.list.clone().check(&p.list.snapshot, u64::MAX).ok()?;
        Some((checked, File::open(p.db).ok()))
    });
    let mut writer = PieceWriter::new(to)?;
    let order = write_pieces(&mut writer, db, hasher, prev.as_ref())?;
    let (done, uploaded_bytes) = writer.finish()?;
    let list = build_list(order, prev.as_ref().map(|(c, _)| c), &done)
        .map_err(|e| Error::Pipeline(format!("listing the metadata pieces: {e}")))?;
    let list = list.finish(&id.to_string(), hasher.key());
    // What readers would refuse is never uploaded: stored whole instead.
    if let Err(e) = list.clone().check(&id.to_string(), u64::MAX) {
        if prev.is_some() {
            return store(to, db, id, hasher, None);
        }
        return Err(Error::Pipeline(format!("the metadata piece list: {e}")));
    }
    let object = put_list(to, &list, id)?;
    Ok(Stored {
        object,
        list,
        uploaded_bytes,
    })
}

/// Reads the database piece by piece and writes each piece the previous list lacks.
fn write_pieces(
    writer: &mut PieceWriter<'_>,
    db: &Path,
    hasher: &ChunkHasher,
    prev: Option<&(Checked, Option<File>)>,
) -> Result<Vec<Listed>> {
    let io_err = |e: io::Error| Error::io("uploading metadata from", db, e);
    let mut src = File::open(db).map_err(io_err)?;
    let known: HashMap<ChunkId, usize> = prev
        .map(|(c, _)| {
            c.pieces
                .iter()
                .enumerate()
                .map(|(n, p)| (p.id, n))
                .collect()
        })
        .unwrap_or_default();
    let mut order = Vec::new();
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = read_full(&mut src, &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        let pid = hasher.id(piece);
        let listed = match known.get(&pid) {
            Some(n) => Listed::Reused(*n),
            None => {
                let at = order.len();
                let base = prev.and_then(|(c, f)| base_at(c, f.as_ref()?, at, hasher));
                writer.put(pid, piece, base)?
            }
        };
        order.push(listed);
    }
    Ok(order)
}

/// The previous database's piece `n` and its position, when it can be a base: on
/// disk as listed, and with room in its chain for one more delta.
fn base_at(
    prev: &Checked,
    db: &File,
    n: usize,
    hasher: &ChunkHasher,
) -> Option<(Vec<u8>, ChunkId, usize)> {
    let p = prev.pieces.get(n)?;
    if p.depth >= MAX_CHAIN {
        return None;
    }
    let mut bytes = vec![0u8; p.ulen as usize];
    db.read_exact_at(&mut bytes, p.at).ok()?;
    (hasher.id(&bytes) == p.id).then_some((bytes, p.id, n))
}

/// The new list, in file order, each delta with the chain under it.
fn build_list(
    order: Vec<Listed>,
    prev: Option<&Checked>,
    done: &HashMap<BlobId, PieceBlob>,
) -> std::result::Result<ListBuilder, String> {
    let mut list = ListBuilder::default();
    let old = |n: usize| {
        let c = prev.ok_or("a reused piece without a previous list")?;
        let p = c
            .list
            .pieces
            .get(n)
            .ok_or("a reused piece the list lacks")?;
        Ok::<_, String>((&c.list, p, &c.pieces[n], &c.list.blobs[c.pieces[n].blob]))
    };
    for listed in order {
        match listed {
            Listed::Reused(n) => {
                let (from, entry, located, blob) = old(n)?;
                let base = list.carry(from, entry.base)?;
                list.push(blob, located.placement(), base);
            }
            Listed::New { blob, place, base } => {
                let blob = done.get(&blob).ok_or("a metadata blob was never closed")?;
                let base = match base {
                    Some(n) => {
                        let (from, entry, _, _) = old(n)?;
                        let under = list.carry(from, entry.base)?;
                        Some(list.base(from, entry, under)?)
                    }
                    None => None,
                };
                list.push(blob, place, base);
            }
        }
    }
    Ok(list)
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
    made: HashMap<ChunkId, (BlobId, Placement, Option<usize>)>,
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

    /// Writes `piece`, as a delta against `base` (its bytes, id and position in the
    /// previous list) when that makes it smaller.
    fn put(
        &mut self,
        id: ChunkId,
        piece: &[u8],
        base: Option<(Vec<u8>, ChunkId, usize)>,
    ) -> Result<Listed> {
        if let Some((blob, place, base)) = self.made.get(&id) {
            return Ok(Listed::New {
                blob: *blob,
                place: *place,
                base: *base,
            });
        }
        let (frame, base) = self.frame(piece, base)?;
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
        self.made.insert(id, (home, place, base));
        if blob.layout.is_full(self.to.blob_size_limit) {
            self.close()?;
        }
        Ok(Listed::New {
            blob: home,
            place,
            base,
        })
    }

    /// The smaller of the delta frame against `base` and the whole piece's frame; a
    /// delta is never as long as its piece, so it is never taken for a piece stored as is.
    fn frame(
        &mut self,
        piece: &[u8],
        base: Option<(Vec<u8>, ChunkId, usize)>,
    ) -> Result<(Vec<u8>, Option<usize>)> {
        let z_err = |e| Error::io("compressing", "snapshot metadata", e);
        let delta = match base {
            Some((bytes, base_id, n)) => {
                let frame = crate::delta::encode(METADATA_ZSTD_LEVEL, &bytes, base_id, piece)
                    .map_err(|e| z_err(io::Error::other(e)))?;
                (frame.len() < piece.len()).then_some((frame, n))
            }
            None => None,
        };
        match delta {
            Some((frame, n)) if frame.len() <= piece.len() / DELTA_WORTH => Ok((frame, Some(n))),
            delta => {
                let whole = crate::pack::encode(&mut self.z, piece.to_vec()).map_err(z_err)?;
                Ok(match delta {
                    Some((frame, n)) if frame.len() < whole.len() => (frame, Some(n)),
                    _ => (whole, None),
                })
            }
        }
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
