//! Content-defined chunking and chunk identity. Pure: works on readers and byte slices.
//!
//! A chunk id is BLAKE3 keyed with a per-repository secret-less key (stored in the local
//! index and in the encrypted metadata), so an id seen outside the encrypted metadata
//! cannot be used to confirm that some known content was backed up.

use std::fmt;
use std::io::Read;

use fastcdc::v2020::{self, StreamCDC};

/// Chunk boundaries: `max` is the configured `chunk_size`; the CDC average is a quarter
/// and the minimum a sixteenth of it, within FastCDC's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    pub fn from_max(max: u64) -> Result<Self, String> {
        let lo = v2020::MAXIMUM_MIN as u64 * 16;
        let hi = v2020::MAXIMUM_MAX as u64;
        if !(lo..=hi).contains(&max) {
            return Err(format!(
                "{max} bytes is outside {} KiB ..= {} MiB",
                lo >> 10,
                hi >> 20
            ));
        }
        // FastCDC wants even sizes.
        let max = (max & !1) as u32;
        let avg = (max / 4).clamp(v2020::AVERAGE_MIN as u32, v2020::AVERAGE_MAX as u32) & !1;
        let min = (max / 16).clamp(v2020::MINIMUM_MIN as u32, v2020::MINIMUM_MAX as u32) & !1;
        Ok(ChunkParams { min, avg, max })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(ChunkId)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", hex::encode(&self.0[..8]))
    }
}

/// Keyed BLAKE3 over a chunk's plaintext.
#[derive(Clone)]
pub struct ChunkHasher {
    key: [u8; 32],
}

impl ChunkHasher {
    pub fn new(key: [u8; 32]) -> Self {
        ChunkHasher { key }
    }

    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    pub fn id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.key, data).as_bytes())
    }
}

/// Splits a reader into content-defined chunks; yields owned buffers so they can move
/// through the pipeline without copying. `size_hint` is the expected length: input no
/// larger than one chunk is read into an exact-size buffer, because the streaming
/// chunker allocates and zeroes a `max`-sized buffer per reader.
pub fn chunks<R: Read + 'static>(
    mut reader: R,
    size_hint: u64,
    params: ChunkParams,
) -> Box<dyn Iterator<Item = std::io::Result<Vec<u8>>>> {
    if size_hint <= u64::from(params.max) {
        let mut data = Vec::with_capacity(size_hint as usize + 1);
        if let Err(e) = reader
            .by_ref()
            .take(u64::from(params.max) + 1)
            .read_to_end(&mut data)
        {
            return Box::new(std::iter::once(Err(e)));
        }
        if data.len() <= params.max as usize {
            return Box::new(split_in_memory(data, params).into_iter().map(Ok));
        }
        // The file grew past one chunk since it was stat'ed: stream the rest.
        return Box::new(stream(std::io::Cursor::new(data).chain(reader), params));
    }
    Box::new(stream(reader, params))
}

fn stream<R: Read + 'static>(
    reader: R,
    params: ChunkParams,
) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    StreamCDC::new(
        reader,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
    )
    .map(|r| {
        r.map(|c| c.data).map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })
    })
}

/// The same cut points as the streaming chunker, for data already in memory.
fn split_in_memory(data: Vec<u8>, params: ChunkParams) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return Vec::new();
    }
    if data.len() <= params.min as usize {
        return vec![data];
    }
    let cuts: Vec<(usize, usize)> = v2020::FastCDC::new(
        &data,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
    )
    .map(|c| (c.offset, c.length))
    .collect();
    if cuts.len() == 1 {
        return vec![data];
    }
    cuts.into_iter()
        .map(|(o, l)| data[o..o + l].to_vec())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn params_follow_max() {
        let p = ChunkParams::from_max(4 << 20).unwrap();
        assert_eq!((p.min, p.avg, p.max), (256 << 10, 1 << 20, 4 << 20));
        assert!(ChunkParams::from_max(1000).is_err());
        assert!(ChunkParams::from_max(1 << 30).is_err());
    }

    #[test]
    fn chunking_is_deterministic_and_lossless() {
        let data = pseudo_random(3_000_000, 7);
        let p = ChunkParams::from_max(256 << 10).unwrap();
        let a: Vec<Vec<u8>> = chunks(std::io::Cursor::new(data.clone()), data.len() as u64, p)
            .map(|c| c.unwrap())
            .collect();
        let b: Vec<Vec<u8>> = chunks(std::io::Cursor::new(data.clone()), 0, p)
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(a, b);
        assert!(a.len() > 5);
        assert!(a.iter().all(|c| c.len() <= p.max as usize));
        assert_eq!(a.concat(), data);
    }

    #[test]
    fn insertion_shifts_only_nearby_chunks() {
        let data = pseudo_random(2_000_000, 9);
        let mut edited = data.clone();
        edited.splice(1_000_000..1_000_000, b"inserted".iter().copied());
        let p = ChunkParams::from_max(128 << 10).unwrap();
        let h = ChunkHasher::new([1; 32]);
        let ids = |d: &[u8]| -> Vec<ChunkId> {
            chunks(std::io::Cursor::new(d.to_vec()), d.len() as u64, p)
                .map(|c| h.id(&c.unwrap()))
                .collect()
        };
        let (a, b) = (ids(&data), ids(&edited));
        let shared = b.iter().filter(|id| a.contains(id)).count();
        assert!(
            shared + 3 >= a.len(),
            "only {shared} of {} chunks survived",
            a.len()
        );
    }

    #[test]
    fn in_memory_cuts_match_streaming_cuts() {
        let p = ChunkParams::from_max(64 << 10).unwrap();
        for len in [0, 1, 4095, 4096, 4097, 30_000, 65_536] {
            let data = pseudo_random(len, len as u64);
            let mem: Vec<Vec<u8>> = chunks(std::io::Cursor::new(data.clone()), len as u64, p)
                .map(|c| c.unwrap())
                .collect();
            let streamed: Vec<Vec<u8>> = stream(std::io::Cursor::new(data.clone()), p)
                .map(|c| c.unwrap())
                .collect();
            assert_eq!(mem, streamed, "len {len}");
            // A file that grew after stat: the hint is too small.
            let grown: Vec<Vec<u8>> = chunks(std::io::Cursor::new(data.clone()), 10, p)
                .map(|c| c.unwrap())
                .collect();
            assert_eq!(grown.concat(), data);
        }
    }

    #[test]
    fn key_changes_ids() {
        assert_ne!(
            ChunkHasher::new([1; 32]).id(b"x"),
            ChunkHasher::new([2; 32]).id(b"x")
        );
    }
}
