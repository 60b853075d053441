//! The data path for backups and restores: streaming a volume's chunks with their sha256 while never reading
//! its holes, and writing chunks back. Called by backup agents directly, never through the coordinator.

use crate::error::{AgentError, Result};
use crate::sparse;
use ember_common::direct_io::{AlignedBuf, DirectFile};
use ember_proto::agent::v1::VolumeChunk;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Smallest and largest chunk sizes accepted.
pub const CHUNK_SIZE_RANGE: (u32, u32) = (64 << 10, 64 << 20);

/// Checks a chunk size: a power of two within [`CHUNK_SIZE_RANGE`].
pub fn check_chunk_size(size: u32) -> Result<()> {
    if size.is_power_of_two() && (CHUNK_SIZE_RANGE.0..=CHUNK_SIZE_RANGE.1).contains(&size) {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument {
            field: "chunk_size",
            message: format!("{size} is not a power of two from 64 KiB to 64 MiB"),
        })
    }
}

/// Parses concatenated 32-byte digests.
pub fn parse_known(bytes: &[u8]) -> Result<HashSet<[u8; 32]>> {
    if !bytes.len().is_multiple_of(32) {
        return Err(AgentError::InvalidArgument {
            field: "known_digests",
            message: "length is not a multiple of 32".into(),
        });
    }
    Ok(bytes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect())
}

/// Whether every byte is zero, 16 bytes at a time.
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    let tail = words.remainder();
    words.into_iter().all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0) && tail.iter().all(|b| *b == 0)
}

/// Indices of the chunks that overlap data extents, in order, each once.
pub fn chunks_with_data(extents: &[(u64, u64)], chunk: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for (start, end) in extents {
        for i in start / chunk..=(end - 1) / chunk {
            if out.last() != Some(&i) {
                out.push(i);
            }
        }
    }
    out
}

/// Streams `path` chunk by chunk into `tx` (run on a blocking thread). The first message carries only the
/// volume size. Holes are never read; all-zero chunks are not sent; chunks whose digest is in `known` go
/// without data.
pub fn stream_chunks(
    path: PathBuf,
    chunk_size: u32,
    known: HashSet<[u8; 32]>,
    tx: mpsc::Sender<Result<VolumeChunk, tonic::Status>>,
) -> Result<()> {
    let file = File::open(&path).map_err(AgentError::io(format!("opening {}", path.display())))?;
    let size = sparse::byte_len(&file).map_err(AgentError::io("reading size"))?;
    let extents = sparse::data_extents(&file).map_err(AgentError::io("finding data extents"))?;
    if tx.blocking_send(Ok(VolumeChunk { volume_size: size, ..Default::default() })).is_err() {
        return Ok(());
    }
    let cs = u64::from(chunk_size);
    let hashers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8);
    let positions = chunks_with_data(&extents, cs);
    // Read a batch in order, hash it on every core, send it in order: the reader is never the bottleneck on
    // a page-cached or fast disk, the hashing is.
    for batch in positions.chunks(hashers * 2) {
        let mut bufs = Vec::with_capacity(batch.len());
        for index in batch {
            let offset = index * cs;
            let len = cs.min(size - offset) as usize;
            let mut buf = vec![0u8; len];
            // Read only the parts of this chunk that hold data; the rest stays zero.
            for (s, e) in extents.iter().filter(|(s, e)| *s < offset + len as u64 && *e > offset) {
                let (from, to) = ((*s).max(offset), (*e).min(offset + len as u64));
                file.read_exact_at(&mut buf[(from - offset) as usize..(to - offset) as usize], from)
                    .map_err(AgentError::io(format!("reading {}", path.display())))?;
            }
            bufs.push((offset, buf));
        }
        let digests: Vec<Option<[u8; 32]>> = std::thread::scope(|scope| {
            let per = bufs.len().div_ceil(hashers).max(1);
            let handles: Vec<_> = bufs
                .chunks(per)
                .map(|group| {
                    scope.spawn(move || {
                        group.iter().map(|(_, b)| (!is_zero(b)).then(|| Sha256::digest(b).into())).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("hashing thread")).collect()
        });
        for ((offset, buf), digest) in bufs.into_iter().zip(digests) {
            let Some(digest) = digest else { continue }; // all zero: not sent
            let known_chunk = known.contains(&digest);
            let msg = VolumeChunk {
                offset,
                length: buf.len() as u32,
                sha256: digest.to_vec(),
                known: known_chunk,
                data: if known_chunk { Default::default() } else { buf.into() },
                ..Default::default()
            };
            if tx.blocking_send(Ok(msg)).is_err() {
                return Ok(()); // the reader went away
            }
        }
    }
    Ok(())
}

/// Applies one written chunk to `file` of `size` bytes: data is written (around the page cache, through
/// `scratch`), `zero_length` is deallocated.
pub fn apply_chunk(file: &DirectFile, size: u64, chunk: &VolumeChunk, scratch: &mut AlignedBuf) -> Result<u64> {
    let len = if chunk.data.is_empty() { chunk.zero_length } else { chunk.data.len() as u64 };
    if chunk.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(AgentError::InvalidArgument {
            field: "offset",
            message: format!("chunk at {} of {len} bytes is past the end ({size})", chunk.offset),
        });
    }
    if !chunk.data.is_empty() {
        file.write_at(&chunk.data, chunk.offset, scratch).map_err(AgentError::io("writing a chunk"))?;
        return Ok(len);
    }
    if len > 0 {
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if nix::fcntl::fallocate(file.file(), flags, chunk.offset as i64, len as i64).is_err() {
            // No hole punching here (e.g. NFS 3, a block device): write the zeros.
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut off = chunk.offset;
            while off < chunk.offset + len {
                let n = (chunk.offset + len - off).min(zeros.len() as u64) as usize;
                file.write_at(&zeros[..n], off, scratch).map_err(AgentError::io("zeroing"))?;
                off += n as u64;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_math() {
        assert_eq!(chunks_with_data(&[(0, 10), (5 << 20, (5 << 20) + 1)], 1 << 20), vec![0, 5]);
        assert_eq!(chunks_with_data(&[(100, (3 << 20) + 1)], 1 << 20), vec![0, 1, 2, 3]);
        assert_eq!(chunks_with_data(&[(0, 1 << 20), ((1 << 20) + 5, 2 << 20)], 1 << 20), vec![0, 1]);
        assert!(is_zero(&[0u8; 100]));
        let mut b = [0u8; 100];
        b[99] = 1;
        assert!(!is_zero(&b));
        assert!(check_chunk_size(1 << 20).is_ok());
        assert!(check_chunk_size(3 << 20).is_err());
        assert!(parse_known(&[0u8; 33]).is_err());
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn streams_data_chunks_in_order_with_a_short_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let f = File::create(&path).unwrap();
        let size = (3u64 << 20) + 5; // not a multiple of the chunk size
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 10], 0).unwrap();
        f.write_all_at(&[2u8; 5], 3 << 20).unwrap();
        f.write_all_at(&[0u8; 4096], 2 << 20).unwrap(); // written zeros: data, but an all-zero chunk
        let known_digest: [u8; 32] = {
            let mut first = vec![0u8; 1 << 20];
            first[..10].fill(1);
            Sha256::digest(&first).into()
        };
        let (tx, mut rx) = mpsc::channel(16);
        stream_chunks(path, 1 << 20, [known_digest].into(), tx).unwrap();
        let mut msgs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            msgs.push(m.unwrap());
        }
        assert_eq!(msgs[0].volume_size, size);
        let chunks: Vec<_> = msgs[1..].iter().map(|m| (m.offset, m.length, m.known, m.data.len())).collect();
        assert_eq!(chunks, vec![(0, 1 << 20, true, 0), (3 << 20, 5, false, 5)]);
    }
}
