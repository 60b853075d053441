//! The data path for backups and restores: streaming a volume's chunks with their sha256 while never reading
//! its holes, and writing chunks back. Called by backup agents directly, never through the coordinator.

use crate::backend::DataMap;
use crate::error::{AgentError, Result};
use crate::sparse;
use ember_common::direct_io::{AlignedBuf, DirectFile};
use ember_proto::agent::v1::VolumeChunk;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tonic::codegen::Bytes;

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

/// Where `file` can hold data: the `known` extents when the driver gave them (a thin LV's mapped blocks), else what
/// `SEEK_DATA` finds.
pub fn extents_or_seek(file: &File, known: Option<Vec<(u64, u64)>>) -> Result<Vec<(u64, u64)>> {
    match known {
        Some(known) => Ok(known),
        None => sparse::data_extents(file).map_err(AgentError::io("finding data extents")),
    }
}

/// Streams `path` chunk by chunk into `tx` (run on a blocking thread). The first message carries only the
/// volume size. Holes are never read: those outside `extents` when the backend knows where the data is (thin
/// LVs), otherwise those `SEEK_DATA` finds. All-zero chunks are not sent; chunks whose digest is in `known` go
/// without data.
pub fn stream_chunks(
    path: PathBuf,
    extents: Option<Vec<(u64, u64)>>,
    chunk_size: u32,
    known: HashSet<[u8; 32]>,
    tx: mpsc::Sender<Result<VolumeChunk, tonic::Status>>,
) -> Result<()> {
    let file = File::open(&path).map_err(AgentError::io(format!("opening {}", path.display())))?;
    let size = sparse::byte_len(&file).map_err(AgentError::io("reading size"))?;
    let extents = extents_or_seek(&file, extents)?;
    if tx.blocking_send(Ok(VolumeChunk { volume_size: size, ..Default::default() })).is_err() {
        return Ok(());
    }
    let cs = u64::from(chunk_size);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8);
    let positions = chunks_with_data(&extents, cs);
    let pool = BufferPool::default();
    // Every core reads (pread) and hashes the next chunk not yet taken; this thread sends the results in
    // order. A worker takes a ticket before each chunk and the sender hands one back per chunk sent, so at
    // most `window` chunks are in memory however uneven the work.
    let window = workers * 4;
    let (ticket_tx, ticket_rx) = std::sync::mpsc::sync_channel::<()>(window);
    (0..window).for_each(|_| ticket_tx.send(()).expect("room for every ticket"));
    let ticket_rx = Mutex::new(ticket_rx);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Result<Hashed>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (done_tx, ticket_rx, next, positions) = (done_tx.clone(), &ticket_rx, &next, &positions);
            let (file, extents, pool, path) = (&file, &extents, &pool, &path);
            scope.spawn(move || {
                while ticket_rx.lock().expect("tickets").recv().is_ok() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(index) = positions.get(i) else { break };
                    let offset = index * cs;
                    let mut buf = pool.take(cs.min(size - offset) as usize);
                    let hashed = read_chunk(file, extents, offset, &mut buf.0)
                        .map_err(AgentError::io(format!("reading {}", path.display())))
                        .map(|()| {
                            let digest = (!is_zero(&buf.0)).then(|| Sha256::digest(&buf.0).into());
                            (offset, buf, digest)
                        });
                    if done_tx.send((i, hashed)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let sent = send_in_order(done_rx, &ticket_tx, &known, &tx);
        drop(ticket_tx); // wakes and ends any worker still waiting for a ticket
        sent
    })
}

/// Sends hashed chunks arriving in any order to `tx` in position order, handing back a ticket per chunk.
fn send_in_order(
    done: std::sync::mpsc::Receiver<(usize, Result<Hashed>)>,
    tickets: &std::sync::mpsc::SyncSender<()>,
    known: &HashSet<[u8; 32]>,
    tx: &mpsc::Sender<Result<VolumeChunk, tonic::Status>>,
) -> Result<()> {
    let mut waiting = std::collections::BTreeMap::new();
    let mut expected = 0;
    for (i, hashed) in done {
        waiting.insert(i, hashed);
        while let Some(hashed) = waiting.remove(&expected) {
            expected += 1;
            let _ = tickets.try_send(());
            let (offset, buf, digest) = hashed?;
            let Some(digest) = digest else { continue }; // all zero: not sent
            let known_chunk = known.contains(&digest);
            let msg = VolumeChunk {
                offset,
                length: buf.0.len() as u32,
                sha256: digest.to_vec(),
                known: known_chunk,
                data: if known_chunk { Default::default() } else { Bytes::from_owner(buf) },
                ..Default::default()
            };
            let carries_data = !msg.data.is_empty();
            if tx.blocking_send(Ok(msg)).is_err() {
                return Ok(()); // the reader went away
            }
            if carries_data {
                ember_common::failpoint::abort_if_armed("storage.abort_in_read_volume");
            }
        }
    }
    Ok(())
}

/// A chunk read and hashed: its offset, its bytes, and its sha256 unless it is all zero.
type Hashed = (u64, Pooled, Option<[u8; 32]>);

/// The parts of `[start, end)` inside `extents` (sorted, not overlapping), in order. A thin LV can have many
/// thousands of extents: the first is found by binary search, not by a scan.
pub fn overlaps(extents: &[(u64, u64)], start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let first = extents.partition_point(|(_, e)| *e <= start);
    extents[first..].iter().take_while(move |(s, _)| *s < end).map(move |(s, e)| ((*s).max(start), (*e).min(end)))
}

/// Reads the chunk at `offset` (as long as `buf`) from `file`: only the parts inside data `extents`; the rest
/// is zero.
pub fn read_chunk(file: &File, extents: &[(u64, u64)], offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let end = offset + buf.len() as u64;
    let mut parts = overlaps(extents, offset, end).peekable();
    if parts.peek() != Some(&(offset, end)) {
        buf.fill(0); // holes inside the chunk (a reused buffer holds old data)
    }
    for (from, to) in parts {
        file.read_exact_at(&mut buf[(from - offset) as usize..(to - offset) as usize], from)?;
    }
    Ok(())
}

/// Chunk buffers handed back after their message is sent, so a stream reuses warm memory instead of
/// allocating (and zeroing) a new buffer per chunk; see `ember_common::direct_io` for why that matters here.
#[derive(Default, Clone)]
struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// A buffer from a [`BufferPool`], returned to it when dropped.
struct Pooled(Vec<u8>, BufferPool);

impl BufferPool {
    /// A buffer of `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Pooled {
        let mut buf = self.0.lock().expect("buffer pool").pop().unwrap_or_default();
        buf.resize(len, 0);
        Pooled(buf, self.clone())
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = self.1.0.lock().expect("buffer pool");
        if pool.len() < 64 {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

/// Applies every chunk from `chunks` to `file` (see [`apply_chunk`]), in the calling (blocking) thread, until
/// the sender is done, and returns the data bytes written. The first error stops it and drops the queue, so
/// the sender learns of it at its next send.
pub fn apply_chunks(
    file: &DirectFile,
    size: u64,
    mapped: Option<&DataMap>,
    mut chunks: mpsc::Receiver<VolumeChunk>,
) -> Result<u64> {
    let (mut written, mut scratch) = (0, AlignedBuf::default());
    while let Some(chunk) = chunks.blocking_recv() {
        written += apply_chunk(file, size, mapped, &chunk, &mut scratch)?;
    }
    Ok(written)
}

/// Applies one written chunk to `file` of `size` bytes: data is written (around the page cache, through
/// `scratch`), `zero_length` is deallocated or zeroed. `mapped`: the only parts of the file that can hold
/// data, when the driver knows them (a thin LV's mapped blocks, read before the first write).
pub fn apply_chunk(
    file: &DirectFile,
    size: u64,
    mapped: Option<&DataMap>,
    chunk: &VolumeChunk,
    scratch: &mut AlignedBuf,
) -> Result<u64> {
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
    if len == 0 {
        return Ok(0);
    }
    if let Some(map) = mapped {
        // A thin LV cannot punch holes (dm-thin has no write-zeroes), and writing zeros over all of the range
        // would provision every block of it: only the mapped parts can hold old data, so only they are
        // cleared, and their whole blocks are given back to the pool.
        for (from, to) in overlaps(&map.extents, chunk.offset, chunk.offset + len) {
            unmap_or_zero(file, from, to, map.block, scratch).map_err(AgentError::io("zeroing"))?;
        }
        return Ok(0);
    }
    let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if nix::fcntl::fallocate(file.file(), flags, chunk.offset as i64, len as i64).is_err() {
        // No hole punching here (e.g. NFS 3, a thick LV): write the zeros.
        file.write_zeros(chunk.offset, len, scratch).map_err(AgentError::io("zeroing"))?;
    }
    Ok(0)
}

/// Makes `[from, to)` of a thin LV read as zeros. The whole pool blocks in it are discarded: dm-thin unmaps
/// them, and an unmapped block reads as zeros and takes no pool space. The partial blocks at its edges, which
/// a discard would leave as they are, are written with zeros. A device that takes no discards (a pool with
/// `discards=ignore`) gets zeros written over all of it.
fn unmap_or_zero(file: &DirectFile, from: u64, to: u64, block: u64, scratch: &mut AlignedBuf) -> std::io::Result<()> {
    if let Some((start, end)) = whole_blocks(from, to, block)
        && sparse::discard(file.file(), start, end - start).is_ok()
    {
        file.write_zeros(from, start - from, scratch)?;
        return file.write_zeros(end, to - end, scratch);
    }
    file.write_zeros(from, to - from, scratch)
}

/// The whole blocks of size `block` within `[from, to)`, if any.
fn whole_blocks(from: u64, to: u64, block: u64) -> Option<(u64, u64)> {
    let (start, end) = (from.checked_next_multiple_of(block)?, to.checked_div(block)? * block);
    (start < end).then_some((start, end))
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
    fn written_chunks_land_and_a_bad_one_stops_the_writer_and_its_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        std::fs::write(&path, vec![0xAAu8; 2 << 20]).unwrap();
        let file = DirectFile::open(&path, true).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let writer = std::thread::spawn(move || apply_chunks(&file, 2 << 20, None, rx));
        let data = |offset, byte| VolumeChunk { offset, data: vec![byte; 1 << 20].into(), ..Default::default() };
        tx.blocking_send(data(0, 7)).unwrap();
        tx.blocking_send(VolumeChunk { offset: 1 << 20, zero_length: 1 << 20, ..Default::default() }).unwrap();
        tx.blocking_send(data(2 << 20, 9)).unwrap(); // past the end
        // The writer drops its queue when it stops, so a sender that keeps going is told within a few sends.
        let refused = (0..1000).any(|_| tx.blocking_send(data(0, 5)).is_err());
        assert!(refused, "the sender was never told the writer stopped");
        assert!(matches!(writer.join().unwrap(), Err(AgentError::InvalidArgument { field: "offset", .. })));
        let back = std::fs::read(&path).unwrap();
        assert!(back[..1 << 20].iter().all(|b| *b == 7), "the chunk before the bad one was written");
        assert!(back[1 << 20..].iter().all(|b| *b == 0), "the zero run before it was cleared");
    }

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
        stream_chunks(path, None, 1 << 20, [known_digest].into(), tx).unwrap();
        let mut msgs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            msgs.push(m.unwrap());
        }
        assert_eq!(msgs[0].volume_size, size);
        let chunks: Vec<_> = msgs[1..].iter().map(|m| (m.offset, m.length, m.known, m.data.len())).collect();
        assert_eq!(chunks, vec![(0, 1 << 20, true, 0), (3 << 20, 5, false, 5)]);
    }

    #[test]
    fn extents_from_the_driver_are_all_that_is_read() {
        // A thin LV reads as a block device whose every byte SEEK_DATA calls data; the pool's map says which
        // 64 KiB blocks are mapped. Bytes outside the given extents are never read: they come out as zero.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let f = File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        f.write_all_at(&[9u8; 1 << 20], 2 << 20).unwrap();
        let mapped = vec![(64 << 10, 128 << 10), ((2 << 20) + (960 << 10), 3 << 20)];
        let (tx, mut rx) = mpsc::channel(16);
        stream_chunks(path, Some(mapped), 1 << 20, HashSet::new(), tx).unwrap();
        let mut chunks = Vec::new();
        while let Ok(m) = rx.try_recv() {
            chunks.push(m.unwrap());
        }
        let sent: Vec<_> = chunks[1..].iter().map(|m| m.offset).collect();
        assert_eq!(sent, vec![0, 2 << 20], "chunks with no mapped block are not read at all");
        let first = &chunks[1].data;
        assert!(first[..64 << 10].iter().all(|b| *b == 0) && first[64 << 10..128 << 10].iter().all(|b| *b == 7));
        assert!(first[128 << 10..].iter().all(|b| *b == 0));
        let third = &chunks[2].data;
        assert!(third[..960 << 10].iter().all(|b| *b == 0) && third[960 << 10..].iter().all(|b| *b == 9));
    }

    #[test]
    fn a_zero_run_is_zeroed_only_where_the_driver_says_data_can_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        std::fs::write(&path, vec![0xAAu8; 4 << 20]).unwrap();
        let file = DirectFile::open(&path, true).unwrap();
        let zero_run = VolumeChunk { offset: 0, zero_length: 4 << 20, ..Default::default() };
        let mut scratch = AlignedBuf::default();
        // A thin LV: blocks outside the map read as zero already and must not be written (that would
        // provision them); the mapped 1–2 MiB is zeroed. (A plain file stands in: what is left unwritten
        // still holds 0xAA, which shows what was not touched.)
        let mapped = DataMap { extents: vec![(1 << 20, 2 << 20)], block: 64 << 10 };
        assert_eq!(apply_chunk(&file, 4 << 20, Some(&mapped), &zero_run, &mut scratch).unwrap(), 0);
        let after = std::fs::read(&path).unwrap();
        assert!(after[1 << 20..2 << 20].iter().all(|b| *b == 0));
        assert!(after[..1 << 20].iter().chain(&after[2 << 20..]).all(|b| *b == 0xAA));
        // No map (a file, a thick LV): the whole run reads back as zero.
        apply_chunk(&file, 4 << 20, None, &zero_run, &mut scratch).unwrap();
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
        assert_eq!(overlaps(&[(0, 10), (20, 30), (40, 50)], 5, 25).collect::<Vec<_>>(), vec![(5, 10), (20, 25)]);
        assert_eq!(overlaps(&[(0, 10), (20, 30)], 10, 20).count(), 0);
    }

    #[test]
    fn only_whole_pool_blocks_are_discarded() {
        const B: u64 = 64 << 10;
        assert_eq!(whole_blocks(0, 4 * B, B), Some((0, 4 * B)));
        assert_eq!(whole_blocks(100, 4 * B + 5, B), Some((B, 4 * B)), "the partial edges are left to be zeroed");
        assert_eq!(whole_blocks(100, B + 5, B), None, "no whole block inside");
        assert_eq!(whole_blocks(B, 2 * B, B), Some((B, 2 * B)));
        assert_eq!(whole_blocks(0, B, 0), None, "an unknown block size discards nothing");
    }

    #[test]
    fn many_chunks_arrive_in_order_and_a_reader_that_leaves_stops_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let f = File::create(&path).unwrap();
        let cs = 64u64 << 10;
        f.set_len(100 * cs).unwrap();
        for i in (0..100u64).filter(|i| i % 7 != 3) {
            f.write_all_at(&vec![(i % 250 + 1) as u8; cs as usize], i * cs).unwrap();
        }
        let (tx, mut rx) = mpsc::channel(4);
        let reader = std::thread::spawn({
            let path = path.clone();
            move || stream_chunks(path, None, cs as u32, HashSet::new(), tx)
        });
        let mut offsets = Vec::new();
        while let Some(m) = rx.blocking_recv() {
            let m = m.unwrap();
            if m.length > 0 {
                assert_eq!(m.data[0], (m.offset / cs % 250 + 1) as u8);
                offsets.push(m.offset / cs);
            }
        }
        reader.join().unwrap().unwrap();
        assert_eq!(offsets, (0..100u64).filter(|i| i % 7 != 3).collect::<Vec<_>>());

        let (tx, mut rx) = mpsc::channel(1);
        let reader = std::thread::spawn(move || stream_chunks(path, None, cs as u32, HashSet::new(), tx));
        rx.blocking_recv().unwrap().unwrap();
        drop(rx);
        assert!(reader.join().unwrap().is_ok(), "the stream ends quietly when its reader leaves");
    }
}
