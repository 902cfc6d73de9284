//! Delta frames: a metadata piece compressed with the previous version of the same
//! piece as zstd's prefix, so that a piece a few changed rows touched costs those rows,
//! not the whole piece. Pure.
//!
//! ```text
//! delta frame := 0x184D2A5E:u32le || 32:u32le || base_id[32] || zstd frame
//! ```
//! The head is a zstd skippable frame naming the base piece by its chunk id; the zstd
//! frame decompresses with the base's plaintext as a raw-content dictionary
//! (`zstd -d --patch-from=BASE` by hand).

use crate::chunk::{ChunkHasher, ChunkId};
use crate::pack::FormatError;

/// A zstd skippable-frame magic (`0x184D2A5?`), chosen for delta frames.
const MAGIC: u32 = 0x184D_2A5E;
/// Magic, length, base id.
pub const HEAD_LEN: usize = 4 + 4 + 32;

/// The base a delta frame names, or `None` when `frame` is not a delta frame.
pub fn base_of(frame: &[u8]) -> Option<ChunkId> {
    let head = frame.get(..HEAD_LEN)?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if word(0) != MAGIC || word(4) != 32 {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&head[8..]);
    Some(ChunkId(id))
}

/// The delta frame of `piece` against `base` (whose id is `base_id`).
pub fn encode(level: i32, base: &[u8], base_id: ChunkId, piece: &[u8]) -> Result<Vec<u8>, String> {
    let mut z = zstd::zstd_safe::CCtx::create();
    z.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
        .map_err(name)?;
    z.ref_prefix(base).map_err(name)?;
    // zstd writes its output from the start of the buffer it is given.
    let mut body = Vec::with_capacity(zstd::zstd_safe::compress_bound(piece.len()));
    z.compress2(&mut body, piece).map_err(name)?;
    let mut out = Vec::with_capacity(HEAD_LEN + body.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&32u32.to_le_bytes());
    out.extend_from_slice(&base_id.0);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a delta frame against the plaintext of its base (`base`, id `base_id`), and
/// checks the result against `ulen` and `expect`. Everything here is untrusted.
pub fn open(
    frame: &[u8],
    base: &[u8],
    base_id: ChunkId,
    ulen: u32,
    expect: ChunkId,
    hasher: &ChunkHasher,
) -> Result<Vec<u8>, FormatError> {
    let bad = |what: String| FormatError::Chunk {
        chunk: hex::encode(&expect.0[..8]),
        what,
    };
    if base_of(frame) != Some(base_id) {
        return Err(bad("is not a delta frame against its listed base".into()));
    }
    if ulen as usize > crate::pieces::MAX_PIECE as usize {
        return Err(bad(format!("claims {ulen} bytes, more than any piece")));
    }
    let mut z = zstd::zstd_safe::DCtx::create();
    z.ref_prefix(base)
        .map_err(|c| bad(format!("cannot use its base: {}", name(c))))?;
    let mut data = Vec::with_capacity(ulen as usize);
    z.decompress(&mut data, &frame[HEAD_LEN..])
        .map_err(|c| bad(format!("does not decompress: {}", name(c))))?;
    if data.len() != ulen as usize {
        return Err(bad(format!("is {} bytes, expected {ulen}", data.len())));
    }
    if hasher.id(&data) != expect {
        return Err(bad("hash mismatch (damaged data)".into()));
    }
    Ok(data)
}

fn name(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chunk::tests::pseudo_random as noise;

    fn pair() -> (Vec<u8>, Vec<u8>) {
        let base = noise(65536, 7);
        let mut piece = base.clone();
        piece[1000..1010].copy_from_slice(b"0123456789");
        (base, piece)
    }

    #[test]
    fn a_small_change_costs_a_small_frame_and_opens_against_its_base() {
        let h = ChunkHasher::new([1; 32]);
        let (base, piece) = pair();
        let frame = encode(2, &base, h.id(&base), &piece).unwrap();
        assert!(frame.len() < 200, "{} bytes", frame.len());
        assert_eq!(base_of(&frame), Some(h.id(&base)));
        let got = open(&frame, &base, h.id(&base), 65536, h.id(&piece), &h).unwrap();
        assert_eq!(got, piece);
    }

    #[test]
    fn a_wrong_base_or_a_lie_is_refused_by_name() {
        let h = ChunkHasher::new([1; 32]);
        let (base, piece) = pair();
        let frame = encode(2, &base, h.id(&base), &piece).unwrap();
        let other = noise(65536, 8);
        let id = h.id(&piece);
        let e = open(&frame, &other, h.id(&other), 65536, id, &h).unwrap_err();
        assert!(e.to_string().contains("listed base"), "{e}");
        // The right name on the wrong bytes decodes to something else.
        let e = open(&frame, &other, h.id(&base), 65536, id, &h).unwrap_err();
        assert!(e.to_string().contains("hash mismatch"), "{e}");
        let e = open(&frame, &base, h.id(&base), 65537, id, &h).unwrap_err();
        assert!(e.to_string().contains("expected 65537"), "{e}");
        let e = open(&frame, &base, h.id(&base), 65535, id, &h).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = open(&frame, &base, h.id(&base), u32::MAX, id, &h).unwrap_err();
        assert!(e.to_string().contains("more than any piece"), "{e}");
        let e = open(&frame[..60], &base, h.id(&base), 65536, id, &h).unwrap_err();
        assert!(e.to_string().contains("does not decompress"), "{e}");
        let e = crate::pack::open_frame(&frame, 65536, id, &h).unwrap_err();
        assert!(e.to_string().contains("opens only against its base"), "{e}");
        assert_eq!(base_of(&piece), None);
        assert_eq!(base_of(&frame[..HEAD_LEN - 1]), None);
    }
}
