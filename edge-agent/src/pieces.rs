//! The metadata database in pieces (manifest format 3): the database file is cut into
//! fixed [`PIECE`]-byte pieces, each stored as a chunk in a blob, and the snapshot's
//! metadata object is the list of them. The run database starts as a byte copy of the
//! previous snapshot's and is changed in place, so a piece no change touched is the
//! same chunk as before and is not uploaded again: an unchanged tree costs a list.
//!
//! This module is the list and its checks; reading and writing the pieces is done by
//! `backup` and `restore`. The list is read from the bucket: hostile input.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::pack::{BlobId, Placement};

/// Bytes per piece: sixteen SQLite pages. Small enough that a few changed rows cost a
/// few pieces, large enough that each compresses nearly as well as the whole file.
pub const PIECE: usize = 64 << 10;
/// The largest piece a reader accepts (writers use [`PIECE`]).
pub const MAX_PIECE: u32 = 1 << 20;
/// The largest frame a piece of [`MAX_PIECE`] bytes compresses to (zstd's bound).
const MAX_FRAME: u32 = MAX_PIECE + (MAX_PIECE >> 7) + 4096;
/// Version of the list itself, inside the metadata object.
pub const LIST_FORMAT: u32 = 1;

/// The metadata object of a manifest-format-3 snapshot: `age(zstd(JSON))`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceList {
    pub format: u32,
    /// The snapshot the database belongs to.
    pub snapshot: String,
    /// Hex key of the keyed BLAKE3 that names the pieces (the database's `chunk_key`).
    pub chunk_key: String,
    /// Bytes of the database: the sum of the pieces' `ulen`.
    pub size: u64,
    /// In file order.
    pub pieces: Vec<Piece>,
    /// The blobs the pieces lie in.
    pub blobs: Vec<PieceBlob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piece {
    /// Hex chunk id of the piece's plaintext.
    pub id: String,
    /// Position in [`PieceList::blobs`].
    pub blob: u32,
    pub offset: u64,
    pub clen: u32,
    pub ulen: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceBlob {
    pub id: String,
    /// Encrypted object size.
    pub size: u64,
    pub plain_size: u64,
    pub payload_start: u64,
    /// Hex BLAKE3 of the encrypted object.
    pub hash: String,
}

/// A piece checked against its list: where it lies in its blob and in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub id: ChunkId,
    pub blob: usize,
    pub offset: u64,
    pub clen: u32,
    pub ulen: u32,
    /// Where the piece starts in the database file.
    pub at: u64,
}

/// A list whose every number and name was checked.
#[derive(Debug)]
pub struct Checked {
    pub list: PieceList,
    pub chunk_key: [u8; 32],
    pub blob_ids: Vec<BlobId>,
    pub pieces: Vec<Located>,
}

impl PieceList {
    /// Checks a decoded list for snapshot `snapshot`: every id well formed, every piece
    /// inside its blob, sizes that add up to at most `max_size` (a list may name one
    /// piece many times: without a cap, a short list would fill a disk). Errors name the
    /// first problem.
    pub fn check(self, snapshot: &str, max_size: u64) -> Result<Checked, String> {
        if self.format != LIST_FORMAT {
            return Err(format!(
                "piece list has format {}; this vaultik reads {LIST_FORMAT}",
                self.format
            ));
        }
        if self.snapshot != snapshot {
            return Err(format!(
                "piece list names snapshot {:?}, not {snapshot}",
                self.snapshot
            ));
        }
        let mut chunk_key = [0u8; 32];
        hex::decode_to_slice(&self.chunk_key, &mut chunk_key)
            .map_err(|_| "piece list chunk key is not 32 bytes of hex".to_string())?;
        let blob_ids = self
            .blobs
            .iter()
            .map(|b| {
                check_blob(b).ok_or_else(|| format!("piece list blob {:?} is not valid", b.id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut at = 0u64;
        let mut pieces = Vec::with_capacity(self.pieces.len());
        for (n, p) in self.pieces.iter().enumerate() {
            let bad = |what: &str| format!("piece {n} of the list {what}");
            let id = hex_id(&p.id).ok_or_else(|| bad("has no valid id"))?;
            let blob = usize::try_from(p.blob)
                .ok()
                .filter(|b| *b < self.blobs.len())
                .ok_or_else(|| bad("names no listed blob"))?;
            if p.ulen == 0 || p.ulen > MAX_PIECE || p.clen == 0 || p.clen > MAX_FRAME {
                return Err(bad("has an impossible length"));
            }
            let end = p.offset.checked_add(u64::from(p.clen));
            if p.offset < crate::pack::BLOB_MAGIC.len() as u64
                || end.is_none_or(|e| e > self.blobs[blob].plain_size)
            {
                return Err(bad("lies outside its blob"));
            }
            pieces.push(Located {
                id,
                blob,
                offset: p.offset,
                clen: p.clen,
                ulen: p.ulen,
                at,
            });
            at = at
                .checked_add(u64::from(p.ulen))
                .ok_or_else(|| bad("makes the database too large"))?;
        }
        if at != self.size {
            return Err(format!(
                "piece list pieces add up to {at} bytes, the list says {}",
                self.size
            ));
        }
        if at > max_size {
            return Err(format!(
                "piece list makes a database of {at} bytes, more than {max_size}: it is damaged or hostile"
            ));
        }
        Ok(Checked {
            list: self,
            chunk_key,
            blob_ids,
            pieces,
        })
    }

    /// Where each piece of this (trusted, own) list lies, by id: what a new list may
    /// reuse without uploading.
    pub fn known(&self) -> HashMap<ChunkId, (&PieceBlob, Placement)> {
        self.pieces
            .iter()
            .filter_map(|p| {
                let id = hex_id(&p.id)?;
                let blob = self.blobs.get(usize::try_from(p.blob).ok()?)?;
                let place = Placement {
                    chunk: id,
                    offset: p.offset,
                    clen: p.clen,
                    ulen: p.ulen,
                };
                Some((id, (blob, place)))
            })
            .collect()
    }
}

/// Builds a list piece by piece, each blob listed once.
#[derive(Debug, Default)]
pub struct ListBuilder {
    pieces: Vec<Piece>,
    blobs: Vec<PieceBlob>,
    blob_pos: HashMap<String, u32>,
    size: u64,
}

impl ListBuilder {
    /// Appends a piece at `place` in `blob`.
    pub fn push(&mut self, blob: &PieceBlob, place: Placement) {
        let next = self.blobs.len() as u32;
        let pos = *self.blob_pos.entry(blob.id.clone()).or_insert(next);
        if pos == next {
            self.blobs.push(blob.clone());
        }
        self.size += u64::from(place.ulen);
        self.pieces.push(Piece {
            id: hex::encode(place.chunk.0),
            blob: pos,
            offset: place.offset,
            clen: place.clen,
            ulen: place.ulen,
        });
    }

    pub fn finish(self, snapshot: &str, chunk_key: &[u8; 32]) -> PieceList {
        PieceList {
            format: LIST_FORMAT,
            snapshot: snapshot.to_string(),
            chunk_key: hex::encode(chunk_key),
            size: self.size,
            pieces: self.pieces,
            blobs: self.blobs,
        }
    }
}

fn hex_id(s: &str) -> Option<ChunkId> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).ok()?;
    Some(ChunkId(b))
}

fn check_blob(b: &PieceBlob) -> Option<BlobId> {
    let id = BlobId::parse(&b.id)?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&b.hash, &mut hash).ok()?;
    (b.payload_start <= b.size
        && i64::try_from(b.size).is_ok()
        && i64::try_from(b.plain_size).is_ok())
    .then_some(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn blob(n: u8) -> PieceBlob {
        PieceBlob {
            id: hex::encode([n; 32]),
            size: 10_000,
            plain_size: 9_000,
            payload_start: 100,
            hash: hex::encode([7u8; 32]),
        }
    }

    fn place(n: u8, offset: u64, ulen: u32) -> Placement {
        Placement {
            chunk: ChunkId([n; 32]),
            offset,
            clen: 100,
            ulen,
        }
    }

    fn list() -> PieceList {
        let mut b = ListBuilder::default();
        b.push(&blob(1), place(1, 8, 65536));
        b.push(&blob(2), place(2, 8, 65536));
        b.push(&blob(1), place(3, 108, 4096));
        b.finish("s", &[9; 32])
    }

    #[test]
    fn a_built_list_checks_and_locates_its_pieces() {
        let l = list();
        assert_eq!(l.blobs.len(), 2, "each blob listed once");
        assert_eq!(l.size, 65536 * 2 + 4096);
        let c = l.check("s", 1 << 20).unwrap();
        assert_eq!(c.chunk_key, [9; 32]);
        let at: Vec<u64> = c.pieces.iter().map(|p| p.at).collect();
        assert_eq!(at, [0, 65536, 131072]);
        assert_eq!(c.pieces[2].blob, 0);
        assert_eq!(c.pieces[1].blob, 1);
    }

    #[test]
    fn every_lie_in_a_list_is_named() {
        type Lie = fn(&mut PieceList);
        let cases: Vec<(Lie, &str)> = vec![
            (|l| l.format = 2, "format 2"),
            (|l| l.snapshot = "t".into(), "names snapshot"),
            (|l| l.chunk_key = "zz".into(), "chunk key"),
            (|l| l.blobs[0].id = "../x".into(), "is not valid"),
            (|l| l.blobs[0].payload_start = 20_000, "is not valid"),
            (|l| l.pieces[0].id = "00".into(), "no valid id"),
            (|l| l.pieces[1].blob = 2, "names no listed blob"),
            (|l| l.pieces[0].ulen = MAX_PIECE + 1, "impossible length"),
            (|l| l.pieces[0].ulen = 0, "impossible length"),
            (|l| l.pieces[0].clen = u32::MAX, "impossible length"),
            (|l| l.pieces[0].offset = 8_950, "outside its blob"),
            (|l| l.pieces[0].offset = u64::MAX, "outside its blob"),
            (|l| l.pieces[0].offset = 0, "outside its blob"),
            (|l| l.size += 1, "add up"),
            (
                |l| {
                    // The same piece, many times over.
                    let p = l.pieces[0].clone();
                    l.pieces.extend(std::iter::repeat_n(p, 20));
                    l.size += 20 * 65536;
                },
                "more than 1048576",
            ),
        ];
        for (lie, said) in cases {
            let mut l = list();
            lie(&mut l);
            let e = l.check("s", 1 << 20).unwrap_err();
            assert!(e.contains(said), "{said}: {e}");
        }
    }

    #[test]
    fn known_pieces_are_found_by_id_with_their_blob() {
        let l = list();
        let k = l.known();
        assert_eq!(k.len(), 3);
        let (b, p) = k[&ChunkId([3; 32])];
        assert_eq!(b.id, hex::encode([1u8; 32]));
        assert_eq!((p.offset, p.ulen), (108, 4096));
    }
}
