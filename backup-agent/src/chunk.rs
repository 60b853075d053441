//! One chunk on disk: an 8-byte header (`EMBCHNK` and an encoding byte: 0 raw, 1 zlib) and the payload.
//! Chunks are named by the sha256 of their plaintext, so reading one back always re-checks it.

use ember_common::direct_io::AlignedBuf;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use sha2::{Digest, Sha256};
use std::cell::RefCell;

/// The header's magic.
pub const MAGIC: &[u8; 7] = b"EMBCHNK";
/// Payload stored as is.
pub const RAW: u8 = 0;
/// Payload is a zlib stream.
pub const ZLIB: u8 = 1;

/// How much of a chunk is compressed first to judge whether compressing it pays.
const SAMPLE: usize = 64 << 10;

/// [`encode_into`] into a new vector (for tests).
#[cfg(test)]
pub fn encode(plain: &[u8]) -> Vec<u8> {
    let mut out = AlignedBuf::default();
    encode_into(plain, &mut out);
    out.as_slice().to_vec()
}

/// Encodes a chunk straight into `out` (ready for direct I/O): zlib level 1 unless that does not shrink it. A
/// 64 KiB sample is tried first, so random (incompressible) data costs a sample, not a whole compression,
/// before it is stored raw. Returns the stored length.
pub fn encode_into(plain: &[u8], out: &mut AlignedBuf) -> usize {
    let buf = out.prepare(plain.len() + 8);
    buf[..7].copy_from_slice(MAGIC);
    let worth_trying = plain.len() <= SAMPLE || deflate(&plain[..SAMPLE], &mut [0u8; SAMPLE * 97 / 100]).is_some();
    if worth_trying {
        // Room for less than the plaintext: a stream that does not fit there did not shrink it.
        if let Some(n) = deflate(plain, &mut buf[8..8 + plain.len() - 1]) {
            buf[7] = ZLIB;
            out.truncate(8 + n);
            return 8 + n;
        }
    }
    buf[7] = RAW;
    buf[8..].copy_from_slice(plain);
    plain.len() + 8
}

/// Compresses `data` (zlib level 1) into `room`; the stream's length, or None when it does not fit there.
fn deflate(data: &[u8], room: &mut [u8]) -> Option<usize> {
    let mut z = Compress::new(Compression::new(1), true);
    match z.compress(data, room, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => Some(z.total_out() as usize),
        _ => None,
    }
}

/// Why a stored chunk cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a chunk file, or an unknown encoding.
    Malformed,
    /// The payload does not decompress.
    Undecodable,
    /// The plaintext does not hash to the chunk's name.
    WrongDigest,
}

thread_local! {
    /// Each thread's inflate state, reset per chunk rather than allocated (tens of KiB each time).
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(true));
}

/// Inflates a whole zlib stream in one pass into a vector sized for a default chunk up front (growing only for
/// bigger ones), so the plaintext is written once: no reader buffer, no copies as the vector grows.
fn inflate(stream: &[u8]) -> Option<Vec<u8>> {
    INFLATE.with_borrow_mut(|z| {
        z.reset(true);
        let mut out = Vec::with_capacity(1 << 20);
        loop {
            let consumed = z.total_in() as usize;
            match z.decompress_vec(&stream[consumed..], &mut out, FlushDecompress::Finish).ok()? {
                Status::StreamEnd => return Some(out),
                _ if out.len() == out.capacity() => out.reserve(out.capacity()),
                _ => return None, // input ended before the stream did
            }
        }
    })
}

/// Decodes a stored chunk and checks that it hashes to `digest`.
pub fn decode(stored: &[u8], digest: &[u8; 32]) -> Result<Vec<u8>, ChunkError> {
    if stored.len() < 8 || &stored[..7] != MAGIC {
        return Err(ChunkError::Malformed);
    }
    let plain = match stored[7] {
        RAW => stored[8..].to_vec(),
        ZLIB => inflate(&stored[8..]).ok_or(ChunkError::Undecodable)?,
        _ => return Err(ChunkError::Malformed),
    };
    if Sha256::digest(&plain).as_slice() != digest {
        return Err(ChunkError::WrongDigest);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let text: Vec<u8> = b"ember block storage ".iter().cycle().take(1 << 20).copied().collect();
        let mut x = 1u32;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for (plain, enc) in [(&text, ZLIB), (&random, RAW)] {
            let digest: [u8; 32] = Sha256::digest(plain).into();
            let stored = encode(plain);
            assert_eq!(stored[7], enc);
            assert_eq!(&decode(&stored, &digest).unwrap(), plain);
            let mut bad = stored.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode(&bad, &digest).is_err(), "a flipped byte is caught");
        }
        assert!(encode(&text).len() < 100_000, "text compresses");
        assert_eq!(decode(b"garbage!", &[0; 32]), Err(ChunkError::Malformed));
    }

    #[test]
    fn chunks_bigger_than_the_default_inflate_and_truncated_streams_do_not() {
        let text: Vec<u8> = b"a larger chunk, 4 MiB of it; ".iter().cycle().take(4 << 20).copied().collect();
        let digest: [u8; 32] = Sha256::digest(&text).into();
        let stored = encode(&text);
        assert_eq!(stored[7], ZLIB);
        assert_eq!(decode(&stored, &digest).unwrap(), text, "the output grows past the default chunk size");
        let cut = &stored[..stored.len() / 2];
        assert_eq!(decode(cut, &digest), Err(ChunkError::Undecodable));
        assert_eq!(decode(&stored, &digest).unwrap().len(), 4 << 20, "the thread's inflate state is reset");
    }
}
