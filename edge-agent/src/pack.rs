//! Blob format v2 (see docs/FORMAT.md; reads v1). Pure: encodes chunks into frames, lays
//! out frames and parses trailers.
//!
//! ```text
//! blob plaintext := MAGIC || frame_1 || … || frame_n || entry_1 || … || entry_n || n:u32le || TRAILER_MAGIC
//! frame          := one zstd frame holding exactly one chunk, or (v2) the chunk as is
//!                   when zstd would not make it smaller: then clen = ulen
//! entry          := chunk_id[32] || offset:u64le || clen:u32le || ulen:u32le
//! ```
//! The whole plaintext is one age stream, so any frame can be read by decrypting only the
//! 64 KiB STREAM pieces that cover it. The trailer makes a blob self-describing, which
//! is what `verify --read-data` checks every chunk against.

use std::fmt;

use crate::chunk::ChunkId;

pub const BLOB_MAGIC: &[u8; 8] = b"VKBLOB\x00\x02";
/// Blobs of format 1 hold zstd frames only; they read the same way.
const BLOB_MAGIC_V1: &[u8; 8] = b"VKBLOB\x00\x01";
pub const TRAILER_MAGIC: &[u8; 8] = b"VKIDX\x00\x00\x01";
pub const ENTRY_LEN: usize = 32 + 8 + 4 + 4;
/// A blob is closed at this many chunks whatever its size, so that the entries a
/// writer holds (and the trailer) stay small even for millions of tiny chunks.
pub const MAX_CHUNKS: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("blob {blob}: {what}")]
    Blob { blob: String, what: String },
    #[error("chunk {chunk}: {what}")]
    Chunk { chunk: String, what: String },
}

/// Random 256-bit blob name. Random rather than content-derived so the name says nothing
/// about the data and is known before the streaming upload starts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn random() -> Self {
        BlobId(rand::random())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// `name` in the form object keys use, if it is a blob id at all: case cannot make
    /// two names of one blob differ.
    pub fn canonical(name: String) -> String {
        Self::parse(&name).map_or(name, |b| b.to_hex())
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(BlobId(b))
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_hex()[..16])
    }
}

/// Where one chunk sits inside a blob's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub chunk: ChunkId,
    pub offset: u64,
    pub clen: u32,
    pub ulen: u32,
}

impl Placement {
    /// Appends its trailer entry ([`ENTRY_LEN`] bytes) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.chunk.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.clen.to_le_bytes());
        out.extend_from_slice(&self.ulen.to_le_bytes());
    }

    /// Reads a trailer entry; `None` unless `e` is [`ENTRY_LEN`] bytes.
    pub fn decode(e: &[u8]) -> Option<Self> {
        let e: &[u8; ENTRY_LEN] = e.try_into().ok()?;
        let (chunk, rest) = e.split_first_chunk::<32>()?;
        let (offset, rest) = rest.split_first_chunk::<8>()?;
        let (clen, ulen) = rest.split_first_chunk::<4>()?;
        Some(Placement {
            chunk: ChunkId(*chunk),
            offset: u64::from_le_bytes(*offset),
            clen: u32::from_le_bytes(*clen),
            ulen: u32::from_le_bytes(ulen.try_into().ok()?),
        })
    }
}

/// Tracks the layout of a blob being written.
#[derive(Debug, Default)]
pub struct BlobLayout {
    entries: Vec<Placement>,
    len: u64,
}

impl BlobLayout {
    pub fn new() -> Self {
        BlobLayout {
            entries: Vec::new(),
            len: BLOB_MAGIC.len() as u64,
        }
    }

    /// Records a frame appended at the current end and returns its placement.
    pub fn push(&mut self, chunk: ChunkId, clen: u32, ulen: u32) -> Placement {
        let p = Placement {
            chunk,
            offset: self.len,
            clen,
            ulen,
        };
        self.len += u64::from(clen);
        self.entries.push(p);
        p
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// True once the blob should be closed: `limit` bytes or [`MAX_CHUNKS`] chunks.
    pub fn is_full(&self, limit: u64) -> bool {
        self.len >= limit || self.entries.len() >= MAX_CHUNKS
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn trailer(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(self.entries.len() * ENTRY_LEN + 12);
        for e in &self.entries {
            e.encode(&mut t);
        }
        t.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        t.extend_from_slice(TRAILER_MAGIC);
        t
    }

    /// Total plaintext size once the trailer is written.
    pub fn finished_len(&self) -> u64 {
        self.len + (self.entries.len() * ENTRY_LEN + 12) as u64
    }

    pub fn into_entries(self) -> Vec<Placement> {
        self.entries
    }
}

/// Parses a complete blob plaintext and returns its placements, checking that every frame
/// lies inside the data region. Used by verification and recovery.
pub fn parse_blob(blob: &str, plain: &[u8]) -> Result<Vec<Placement>, FormatError> {
    let bad = |what: &str| FormatError::Blob {
        blob: blob.to_string(),
        what: what.to_string(),
    };
    if plain.len() < BLOB_MAGIC.len() + 12
        || (&plain[..8] != BLOB_MAGIC && &plain[..8] != BLOB_MAGIC_V1)
    {
        return Err(bad("not a vaultik blob (bad magic)"));
    }
    let tail = &plain[plain.len() - 12..];
    if &tail[4..] != TRAILER_MAGIC {
        return Err(bad("truncated (no trailer)"));
    }
    let n = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as usize;
    let table_len = n
        .checked_mul(ENTRY_LEN)
        .filter(|l| *l + 20 <= plain.len())
        .ok_or_else(|| bad("trailer entry count exceeds the blob"))?;
    let data_end = (plain.len() - 12 - table_len) as u64;
    let table = &plain[plain.len() - 12 - table_len..plain.len() - 12];
    let mut out = Vec::with_capacity(n);
    for e in table.chunks_exact(ENTRY_LEN) {
        let p = Placement::decode(e).ok_or_else(|| bad("entry"))?;
        let end = p.offset.checked_add(u64::from(p.clen));
        if p.offset < 8 || end.is_none_or(|e| e > data_end) {
            return Err(bad("trailer entry points outside the data region"));
        }
        out.push(p);
    }
    Ok(out)
}

/// Chunks at least this long are sampled before zstd runs over all of them.
const SAMPLE: usize = 64 * 1024;

/// The frame for one chunk: a zstd frame, or the chunk itself when zstd would not make
/// it smaller (already-compressed media, random data). Large chunks are judged by two
/// samples first, so incompressible data does not pay for compressing all of it.
pub fn encode(z: &mut zstd::bulk::Compressor<'_>, chunk: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if chunk.len() >= 4 * SAMPLE {
        let mid = chunk.len() / 2;
        let head = z.compress(&chunk[..SAMPLE])?.len();
        let middle = z.compress(&chunk[mid..mid + SAMPLE])?.len();
        // Under 1% saved in both samples: not worth a zstd frame.
        if head.min(middle) >= SAMPLE - SAMPLE / 100 {
            return Ok(chunk);
        }
    }
    let frame = z.compress(&chunk)?;
    Ok(if frame.len() < chunk.len() {
        frame
    } else {
        chunk
    })
}

/// Decompresses one frame and checks it against its id and expected length.
pub fn open_frame(
    frame: &[u8],
    ulen: u32,
    expect: ChunkId,
    hasher: &crate::chunk::ChunkHasher,
) -> Result<Vec<u8>, FormatError> {
    FrameOpener::new(hasher.clone())?.open(frame, ulen, expect)
}

/// [`open_frame`] for many frames: one zstd context, made once (making one per chunk
/// costs more than decompressing a small chunk).
pub struct FrameOpener {
    z: zstd::bulk::Decompressor<'static>,
    hasher: crate::chunk::ChunkHasher,
}

impl FrameOpener {
    pub fn new(hasher: crate::chunk::ChunkHasher) -> Result<Self, FormatError> {
        let z = zstd::bulk::Decompressor::new().map_err(|e| FormatError::Chunk {
            chunk: String::new(),
            what: format!("cannot start zstd: {e}"),
        })?;
        Ok(FrameOpener { z, hasher })
    }

    pub fn open(
        &mut self,
        frame: &[u8],
        ulen: u32,
        expect: ChunkId,
    ) -> Result<Vec<u8>, FormatError> {
        let bad = |what: String| FormatError::Chunk {
            chunk: hex::encode(&expect.0[..8]),
            what,
        };
        // Lengths come from untrusted metadata: never allocate more than a chunk can be.
        if ulen as usize > fastcdc::v2020::MAXIMUM_MAX {
            return Err(bad(format!("claims {ulen} bytes, more than any chunk")));
        }
        // A frame as long as its chunk is the chunk stored as is; zstd may, rarely, make
        // a frame of exactly that length too, which the hash tells apart.
        if frame.len() == ulen as usize && self.hasher.id(frame) == expect {
            return Ok(frame.to_vec());
        }
        if crate::delta::base_of(frame).is_some() {
            return Err(bad(
                "is a delta frame: it opens only against its base".into()
            ));
        }
        let data = self
            .z
            .decompress(frame, ulen as usize)
            .map_err(|e| bad(format!("does not decompress: {e}")))?;
        if data.len() != ulen as usize {
            return Err(bad(format!("is {} bytes, expected {ulen}", data.len())));
        }
        if self.hasher.id(&data) != expect {
            return Err(bad("hash mismatch (damaged data)".into()));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkHasher;
    use crate::chunk::tests::pseudo_random as noise;

    fn build(chunks: &[&[u8]], h: &ChunkHasher) -> (Vec<u8>, Vec<Placement>) {
        let mut plain = BLOB_MAGIC.to_vec();
        let mut layout = BlobLayout::new();
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        for c in chunks {
            let frame = encode(&mut z, c.to_vec()).unwrap();
            layout.push(h.id(c), frame.len() as u32, c.len() as u32);
            plain.extend_from_slice(&frame);
        }
        plain.extend_from_slice(&layout.trailer());
        assert_eq!(plain.len() as u64, layout.finished_len());
        (plain, layout.into_entries())
    }

    #[test]
    fn roundtrip() {
        let h = ChunkHasher::new([3; 32]);
        let (plain, entries) = build(&[b"hello", b"", b"world world world"], &h);
        let parsed = parse_blob("b", &plain).unwrap();
        assert_eq!(parsed, entries);
        for (p, want) in parsed
            .iter()
            .zip([&b"hello"[..], b"", b"world world world"])
        {
            let frame = &plain[p.offset as usize..(p.offset + u64::from(p.clen)) as usize];
            assert_eq!(open_frame(frame, p.ulen, p.chunk, &h).unwrap(), want);
        }
    }

    #[test]
    fn incompressible_chunks_are_stored_as_is() {
        let h = ChunkHasher::new([3; 32]);
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        let text = b"a line of text, again and again\n".repeat(20_000);
        for (chunk, raw) in [
            (noise(1500, 1), true),
            (noise(1 << 20, 2), true),
            (b"short text short text short text".to_vec(), false),
            (text.clone(), false),
            // Random at the first sample, text at the second: compressed.
            (
                [noise(SAMPLE, 3), text[..SAMPLE * 3].to_vec()].concat(),
                false,
            ),
        ] {
            let frame = encode(&mut z, chunk.clone()).unwrap();
            assert_eq!(frame == chunk, raw, "{} bytes", chunk.len());
            assert!(frame.len() <= chunk.len());
            let back = open_frame(&frame, chunk.len() as u32, h.id(&chunk), &h).unwrap();
            assert_eq!(back, chunk);
        }
    }

    #[test]
    fn a_zstd_frame_as_long_as_its_chunk_still_decompresses() {
        let h = ChunkHasher::new([3; 32]);
        // Random bytes, then text: find the mix for which zstd's frame is exactly as
        // long as the data.
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(8);
        // (zstd keeps a compressed block only if it saves srcSize/64 + 2 bytes, which
        // the frame's header can match only in short chunks.)
        let chunk = (0..64)
            .flat_map(|r| (0..text.len()).map(move |t| (r, t)))
            .map(|(r, t)| [noise(100 + r, 9), text[..t].to_vec()].concat())
            .find(|c| zstd::bulk::compress(c, 3).unwrap().len() == c.len())
            .unwrap();
        let frame = zstd::bulk::compress(&chunk, 3).unwrap();
        let back = open_frame(&frame, chunk.len() as u32, h.id(&chunk), &h).unwrap();
        assert_eq!(back, chunk);
        // Damaged bytes of that length are neither the chunk nor a frame.
        let mut bad = frame.clone();
        bad[frame.len() / 2] ^= 1;
        assert!(open_frame(&bad, chunk.len() as u32, h.id(&chunk), &h).is_err());
    }

    #[test]
    fn format_1_blobs_still_parse() {
        let h = ChunkHasher::new([3; 32]);
        let (mut plain, entries) = build(&[b"hello hello hello hello"], &h);
        plain[..8].copy_from_slice(BLOB_MAGIC_V1);
        assert_eq!(parse_blob("b", &plain).unwrap(), entries);
        plain[7] = 3;
        assert!(parse_blob("b", &plain).is_err(), "a newer blob format");
    }

    #[test]
    fn blobs_close_at_a_size_or_a_chunk_count() {
        let mut l = BlobLayout::new();
        l.push(ChunkId([0; 32]), 100, 100);
        assert!(!l.is_full(1000) && l.is_full(100));
        let mut tiny = BlobLayout::new();
        for _ in 0..MAX_CHUNKS - 1 {
            tiny.push(ChunkId([0; 32]), 9, 0);
        }
        assert!(!tiny.is_full(u64::MAX));
        tiny.push(ChunkId([0; 32]), 9, 0);
        assert!(tiny.is_full(u64::MAX));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let h = ChunkHasher::new([3; 32]);
        let (plain, entries) = build(&[b"abc"], &h);
        assert!(parse_blob("b", b"short").is_err());
        assert!(parse_blob("b", &plain[..plain.len() - 1]).is_err());
        let mut huge = plain.clone();
        let n = huge.len() - 12;
        huge[n..n + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_blob("b", &huge).is_err());
        // An entry whose offset + length wraps around u64 (once a panic in verify).
        let mut wrap = plain.clone();
        let at = wrap.len() - 12 - ENTRY_LEN + 32;
        wrap[at..at + 8].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        assert!(parse_blob("b", &wrap).is_err());
        let p = entries[0];
        let frame = &plain[p.offset as usize..(p.offset + u64::from(p.clen)) as usize];
        let mut flipped = frame.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open_frame(&flipped, p.ulen, p.chunk, &h).is_err());
        assert!(open_frame(frame, p.ulen, ChunkId([0; 32]), &h).is_err());
        assert!(open_frame(frame, p.ulen + 1, p.chunk, &h).is_err());
    }
}
