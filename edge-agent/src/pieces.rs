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
/// Version of the list itself, inside the metadata object. Format 2 adds delta pieces
/// (`bases`, `base`); format 1 lists read as they are.
pub const LIST_FORMAT: u32 = 2;
/// The longest chain of delta pieces (a piece against its base, against its base…) a
/// writer makes and a reader follows: a reader opens at most this many deltas on top
/// of a whole piece.
pub const MAX_CHAIN: usize = 8;

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
    /// Pieces of earlier databases that delta pieces are stored against (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<Piece>,
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
    /// Format 2: the piece is a delta frame against [`PieceList::bases`]`[base]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u32>,
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
    /// Where the piece starts in the database file; for a base, in the space after it.
    pub at: u64,
    /// Position in [`Checked::bases`] of the piece this one is a delta against.
    pub base: Option<usize>,
    /// Deltas between this piece and a whole one: 0 for a whole piece.
    pub depth: usize,
}

/// A list whose every number and name was checked.
#[derive(Debug)]
pub struct Checked {
    pub list: PieceList,
    pub chunk_key: [u8; 32],
    pub blob_ids: Vec<BlobId>,
    pub pieces: Vec<Located>,
    pub bases: Vec<Located>,
}

impl Located {
    /// Where it lies in its blob, as a trailer entry says.
    pub fn placement(&self) -> Placement {
        Placement {
            chunk: self.id,
            offset: self.offset,
            clen: self.clen,
            ulen: self.ulen,
        }
    }
}

impl Checked {
    /// Every piece and base, each once: what a reader fetches.
    pub fn all(&self) -> impl Iterator<Item = &Located> {
        self.pieces.iter().chain(&self.bases)
    }
}

impl PieceList {
    /// Checks a decoded list for snapshot `snapshot`: every id well formed, every piece
    /// inside its blob, every delta chain at most [`MAX_CHAIN`] long, sizes (database
    /// and bases) that add up to at most `max_size` (a list may name one piece many
    /// times: without a cap, a short list would fill a disk). Errors name the first
    /// problem.
    pub fn check(self, snapshot: &str, max_size: u64) -> Result<Checked, String> {
        if self.format == 0 || self.format > LIST_FORMAT {
            return Err(format!(
                "piece list has format {}; this vaultik reads up to {LIST_FORMAT}: upgrade vaultik",
                self.format
            ));
        }
        if self.format == 1
            && (!self.bases.is_empty() || self.pieces.iter().any(|p| p.base.is_some()))
        {
            return Err("piece list of format 1 has delta pieces".into());
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
        let (pieces, size) = self.locate(&self.pieces, 0, "piece")?;
        if size != self.size {
            return Err(format!(
                "piece list pieces add up to {size} bytes, the list says {}",
                self.size
            ));
        }
        let (mut bases, end) = self.locate(&self.bases, size, "base")?;
        // Each delta reads its base once more: a list of many deltas on one large base
        // must not cost more than the cap either.
        let reads = self
            .pieces
            .iter()
            .chain(&self.bases)
            .filter_map(|p| self.bases.get(usize::try_from(p.base?).ok()?))
            .fold(end, |sum, b| sum.saturating_add(u64::from(b.ulen)));
        if reads > max_size {
            return Err(format!(
                "piece list makes a database of {reads} bytes (with its bases), more than {max_size}: it is damaged or hostile"
            ));
        }
        let mut pieces = pieces;
        chain_depths(&mut bases, &mut pieces)?;
        Ok(Checked {
            list: self,
            chunk_key,
            blob_ids,
            pieces,
            bases,
        })
    }

    /// Checks `entries` one by one and lays them out from `at`; returns them and where
    /// they end.
    fn locate(
        &self,
        entries: &[Piece],
        mut at: u64,
        what: &str,
    ) -> Result<(Vec<Located>, u64), String> {
        let mut out = Vec::with_capacity(entries.len());
        for (n, p) in entries.iter().enumerate() {
            let bad = |why: &str| format!("{what} {n} of the list {why}");
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
            let base = match p.base {
                None => None,
                Some(b) => Some(
                    usize::try_from(b)
                        .ok()
                        .filter(|b| *b < self.bases.len())
                        .ok_or_else(|| bad("names no listed base"))?,
                ),
            };
            out.push(Located {
                id,
                blob,
                offset: p.offset,
                clen: p.clen,
                ulen: p.ulen,
                at,
                base,
                depth: 0,
            });
            at = at
                .checked_add(u64::from(p.ulen))
                .ok_or_else(|| bad("makes the database too large"))?;
        }
        Ok((out, at))
    }
}

fn placement(id: ChunkId, p: &Piece) -> Placement {
    Placement {
        chunk: id,
        offset: p.offset,
        clen: p.clen,
        ulen: p.ulen,
    }
}

/// Sets every entry's depth, following bases; refuses chains longer than [`MAX_CHAIN`]
/// (which a loop of bases always is).
fn chain_depths(bases: &mut [Located], pieces: &mut [Located]) -> Result<(), String> {
    let depth = |from: Option<usize>| {
        let mut depth = 0;
        let mut next = from;
        while let Some(b) = next {
            depth += 1;
            if depth > MAX_CHAIN {
                return Err(format!(
                    "piece list has a chain of deltas longer than {MAX_CHAIN} (or a loop) through base {b}"
                ));
            }
            next = bases[b].base;
        }
        Ok(depth)
    };
    let base_depths = bases
        .iter()
        .map(|b| depth(b.base))
        .collect::<Result<Vec<_>, _>>()?;
    let piece_depths = pieces
        .iter()
        .map(|p| depth(p.base))
        .collect::<Result<Vec<_>, _>>()?;
    for (b, d) in bases.iter_mut().zip(base_depths) {
        b.depth = d;
    }
    for (p, d) in pieces.iter_mut().zip(piece_depths) {
        p.depth = d;
    }
    Ok(())
}

/// Builds a list piece by piece, each blob and each base listed once.
#[derive(Debug, Default)]
pub struct ListBuilder {
    pieces: Vec<Piece>,
    bases: Vec<Piece>,
    blobs: Vec<PieceBlob>,
    blob_pos: HashMap<String, u32>,
    /// A base is listed once per (id, chain under it): sharing only by id could put a
    /// deeper chain under a piece than the writer measured.
    base_pos: HashMap<(String, Option<u32>), u32>,
    size: u64,
}

impl ListBuilder {
    /// Appends a piece at `place` in `blob`: a delta frame against `base` (a position
    /// [`Self::base`] returned) or, without one, a whole piece.
    pub fn push(&mut self, blob: &PieceBlob, place: Placement, base: Option<u32>) {
        self.size += u64::from(place.ulen);
        let entry = self.entry(blob, place, base);
        self.pieces.push(entry);
    }

    /// Lists `from.bases[base]` and the chain under it as bases of this list; returns
    /// its position here. `None` in, `None` out; `Err` when `from`'s chain is broken.
    pub fn carry(&mut self, from: &PieceList, base: Option<u32>) -> Result<Option<u32>, String> {
        let mut chain = Vec::new();
        let mut next = base;
        while let Some(b) = next {
            let entry = usize::try_from(b)
                .ok()
                .and_then(|b| from.bases.get(b))
                .filter(|_| chain.len() < MAX_CHAIN)
                .ok_or_else(|| format!("the kept piece list has a broken chain at base {b}"))?;
            chain.push(entry);
            next = entry.base;
        }
        let mut under = None;
        for entry in chain.into_iter().rev() {
            under = Some(self.base(from, entry, under)?);
        }
        Ok(under)
    }

    /// Lists `entry` of `from` (a piece or a base) as a base of this list, a delta against
    /// `under` (a position here) or whole; returns its position.
    pub fn base(
        &mut self,
        from: &PieceList,
        entry: &Piece,
        under: Option<u32>,
    ) -> Result<u32, String> {
        if let Some(pos) = self.base_pos.get(&(entry.id.clone(), under)) {
            return Ok(*pos);
        }
        let blob = usize::try_from(entry.blob)
            .ok()
            .and_then(|b| from.blobs.get(b))
            .ok_or_else(|| format!("the kept piece list names no blob {}", entry.blob))?;
        let id = hex_id(&entry.id).ok_or("the kept piece list has a piece without an id")?;
        let listed = self.entry(blob, placement(id, entry), under);
        let pos = self.bases.len() as u32;
        self.bases.push(listed);
        self.base_pos.insert((entry.id.clone(), under), pos);
        Ok(pos)
    }

    fn entry(&mut self, blob: &PieceBlob, place: Placement, base: Option<u32>) -> Piece {
        let next = self.blobs.len() as u32;
        let pos = *self.blob_pos.entry(blob.id.clone()).or_insert(next);
        if pos == next {
            self.blobs.push(blob.clone());
        }
        Piece {
            id: hex::encode(place.chunk.0),
            blob: pos,
            offset: place.offset,
            clen: place.clen,
            ulen: place.ulen,
            base,
        }
    }

    pub fn finish(self, snapshot: &str, chunk_key: &[u8; 32]) -> PieceList {
        PieceList {
            format: LIST_FORMAT,
            snapshot: snapshot.to_string(),
            chunk_key: hex::encode(chunk_key),
            size: self.size,
            pieces: self.pieces,
            bases: self.bases,
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
        b.push(&blob(1), place(1, 8, 65536), None);
        b.push(&blob(2), place(2, 8, 65536), None);
        b.push(&blob(1), place(3, 108, 4096), None);
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
            (
                |l| l.format = 3,
                "format 3; this vaultik reads up to 2: upgrade",
            ),
            (|l| l.format = 0, "format 0"),
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

    /// `list()` again, its first piece now a delta against the old first piece, which
    /// is itself a delta against a piece older still; the third piece reused as is.
    fn deltas() -> PieceList {
        let mut old = ListBuilder::default();
        let whole = old.entry(&blob(3), place(7, 8, 65536), None);
        old.bases.push(whole);
        old.push(&blob(1), place(1, 8, 65536), Some(0));
        let old = old.finish("s0", &[9; 32]);
        let mut b = ListBuilder::default();
        let under = b.carry(&old, old.pieces[0].base).unwrap();
        let base = b.base(&old, &old.pieces[0], under).unwrap();
        b.push(&blob(2), place(4, 200, 65536), Some(base));
        b.push(&blob(2), place(2, 8, 65536), None);
        let under = b.carry(&old, old.pieces[0].base).unwrap();
        assert_eq!(under, Some(0), "a base is listed once");
        b.push(&blob(1), place(3, 108, 4096), None);
        b.finish("s", &[9; 32])
    }

    #[test]
    fn delta_pieces_carry_their_chain_and_check_with_their_depth() {
        let l = deltas();
        assert_eq!(l.bases.len(), 2);
        let c = l.check("s", 1 << 20).unwrap();
        let depths: Vec<usize> = c.pieces.iter().map(|p| p.depth).collect();
        assert_eq!(depths, [2, 0, 0]);
        assert_eq!(c.pieces[0].base, Some(1));
        assert_eq!(c.bases[1].base, Some(0));
        assert_eq!(c.bases[0].id, ChunkId([7; 32]));
        // Bases are laid out after the database.
        assert_eq!(c.bases[0].at, 65536 * 2 + 4096);
        assert_eq!(c.bases[1].at, 65536 * 3 + 4096);
        assert_eq!(c.all().count(), 5);
    }

    #[test]
    fn every_lie_about_deltas_is_named() {
        type Lie = fn(&mut PieceList);
        let cases: Vec<(Lie, &str)> = vec![
            (
                |l| l.pieces[1].base = Some(2),
                "piece 1 of the list names no listed base",
            ),
            (
                |l| l.bases[0].base = Some(u32::MAX),
                "base 0 of the list names no listed base",
            ),
            (|l| l.bases[0].base = Some(1), "longer than 8 (or a loop)"),
            (|l| l.bases[1].base = Some(1), "longer than 8 (or a loop)"),
            (|l| l.format = 1, "format 1 has delta pieces"),
            (
                |l| l.bases[1].offset = 9_000,
                "base 1 of the list lies outside",
            ),
            (
                |l| {
                    // Bases count against the cap as the database does.
                    let b = l.bases[0].clone();
                    l.bases.extend(std::iter::repeat_n(b, 13));
                },
                "more than 1048576",
            ),
            (
                |l| {
                    // A chain of nine deltas.
                    let whole = Piece {
                        ulen: 100,
                        ..l.bases[0].clone()
                    };
                    let deltas = (0..9u32).map(|n| Piece {
                        base: Some(n + 1),
                        ..whole.clone()
                    });
                    l.bases = deltas.chain([whole.clone()]).collect();
                    l.pieces[0].base = Some(0);
                },
                "longer than 8",
            ),
            (
                |l| {
                    // Tiny deltas, each reading a large base again.
                    let tiny = Piece {
                        ulen: 1,
                        base: Some(0),
                        ..l.pieces[2].clone()
                    };
                    l.pieces.extend(std::iter::repeat_n(tiny, 16));
                    l.size += 16;
                },
                "(with its bases), more than 1048576",
            ),
        ];
        for (lie, said) in cases {
            let mut l = deltas();
            lie(&mut l);
            let e = l.check("s", 1 << 20).unwrap_err();
            assert!(e.contains(said), "{said}: {e}");
        }
        let mut l = deltas();
        l.bases.truncate(1);
        l.bases[0].base = None;
        l.pieces[0].base = Some(0);
        assert_eq!(l.clone().check("s", 1 << 20).unwrap().pieces[0].depth, 1);
    }

    #[test]
    fn a_broken_kept_chain_is_an_error_not_a_list() {
        let mut old = deltas();
        old.bases[1].base = Some(5);
        let mut b = ListBuilder::default();
        let e = b.carry(&old, old.pieces[0].base).unwrap_err();
        assert!(e.contains("broken chain at base 5"), "{e}");
    }

    #[test]
    fn a_base_is_shared_only_with_the_same_chain_under_it() {
        let old = deltas();
        let mut b = ListBuilder::default();
        let r = b.base(&old, &old.bases[0], None).unwrap();
        let s = b.base(&old, &old.bases[1], None).unwrap();
        let r_on_s = b.base(&old, &old.bases[0], Some(s)).unwrap();
        assert_eq!((r, s), (0, 1));
        assert_eq!(
            r_on_s, 2,
            "the same piece on another chain is another entry"
        );
        assert_eq!(b.base(&old, &old.bases[0], None).unwrap(), r);
    }
}
