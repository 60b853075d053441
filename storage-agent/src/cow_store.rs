//! Where a thick LV differs from one of its snapshots, read from the snapshot's copy-on-write store.
//!
//! A thick snapshot is device-mapper's `snapshot` target over a `-cow` device in LVM's persistent format: before
//! a chunk of the origin is first overwritten (or a chunk of the snapshot first written), the kernel copies it
//! into the store and records an *exception* `(old_chunk, new_chunk)`, durably, before the write completes. So
//! the chunks named by the exceptions are the only ones where the volume and the snapshot can differ, and a
//! revert need compare only those instead of reading both LVs whole.
//!
//! The format (the kernel's `dm-snap-persistent.c`): chunk 0 is a header (little-endian `u32`s: magic `SnAp`,
//! valid, version 1, chunk size in 512-byte sectors). Metadata areas follow, the first at chunk 1: each is one
//! chunk of 16-byte exceptions (`u64` old chunk, `u64` new chunk), followed by the data chunks those exceptions
//! point at, so area `a` sits at chunk `1 + a * (per_area + 1)`. The first exception whose new chunk is 0 ends
//! the list; an area filled to the end continues in the next one.

use std::io;

/// The magic number of a persistent store, "SnAp" read as a little-endian `u32`.
const MAGIC: u32 = 0x7041_6e53;
/// The only version of the format.
const VERSION: u32 = 1;
/// Bytes of one exception: the origin's chunk, and where its old data is in the store.
const EXCEPTION_BYTES: usize = 16;

/// What the header of a store says.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes per chunk, the unit of every exception.
    pub chunk_bytes: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// Reads the header at the start of a store. Refuses anything but a valid store of version 1: an invalid
/// snapshot (one that overflowed) no longer holds its data, and nothing can be said about another format.
pub fn parse_header(block: &[u8]) -> Result<Header, String> {
    if block.len() < 16 {
        return Err(format!("{} bytes are too short for a header", block.len()));
    }
    let (magic, valid, version, sectors) = (le32(block, 0), le32(block, 4), le32(block, 8), le32(block, 12));
    if magic != MAGIC {
        return Err(format!("magic {magic:#010x} is not a persistent snapshot store's"));
    }
    if valid == 0 {
        return Err("the snapshot is invalid (it overflowed, or its store failed)".into());
    }
    if version != VERSION {
        return Err(format!("version {version} is not {VERSION}"));
    }
    if sectors == 0 || !sectors.is_power_of_two() {
        return Err(format!("chunk size of {sectors} sectors is not a power of two"));
    }
    Ok(Header { chunk_bytes: u64::from(sectors) * 512 })
}

/// Adds the origin chunks one metadata area names to `chunks`. Returns true when the area is full, so the list
/// may go on in the next one.
pub fn parse_area(area: &[u8], chunks: &mut Vec<u64>) -> bool {
    for entry in area.chunks_exact(EXCEPTION_BYTES) {
        if le64(entry, 8) == 0 {
            return false;
        }
        chunks.push(le64(entry, 0));
    }
    true
}

/// The chunk index of metadata area `area` in a store of `chunk_bytes` chunks.
pub fn area_chunk(area: u64, chunk_bytes: u64) -> u64 {
    let per_area = chunk_bytes / EXCEPTION_BYTES as u64;
    1 + area * (per_area + 1)
}

/// Byte ranges `(start, end)`, in order and merged, covering `chunks` of `chunk_bytes` each.
pub fn ranges(mut chunks: Vec<u64>, chunk_bytes: u64) -> Vec<(u64, u64)> {
    chunks.sort_unstable();
    chunks.dedup();
    let mut out = Vec::new();
    for c in chunks {
        crate::ranges::push_joined(&mut out, c * chunk_bytes, (c + 1) * chunk_bytes);
    }
    out
}

/// Reads a whole store through `read(offset, len)` (which must bypass the page cache: the kernel writes the
/// store beneath it) and returns the byte ranges of the origin where it and the snapshot may differ.
pub fn differing_ranges(mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>) -> io::Result<Vec<(u64, u64)>> {
    let header = parse_header(&read(0, 4096)?).map_err(io::Error::other)?;
    let cb = header.chunk_bytes;
    let mut chunks = Vec::new();
    let mut area = 0;
    while parse_area(&read(area_chunk(area, cb) * cb, cb as usize)?, &mut chunks) {
        area += 1;
    }
    Ok(ranges(chunks, cb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real store's first 4 KiB, then its first five metadata areas one after the other (the data chunks
    /// between them left out), captured in the real-kernel guest (tests/realkernel/lvm-fleet.sh; Debian 12,
    /// kernel 6.1): the snapshot of a 2 GiB thick LV after the origin's first 4 MiB were overwritten.
    const CAPTURED: &[u8] = include_bytes!("../testdata/lvm-snapshot-cow-head.bin");

    #[test]
    fn a_captured_store_names_the_overwritten_chunks() {
        let header = parse_header(&CAPTURED[..4096]).unwrap();
        let cb = header.chunk_bytes;
        assert_eq!(cb, 4096, "LVM's default snapshot chunk");
        // Where the capture holds what the store holds at `offset`: its header, or one of its areas.
        let read = |offset: u64, len: usize| -> io::Result<Vec<u8>> {
            let at = match (0..5).find(|&a| area_chunk(a, cb) * cb == offset) {
                Some(a) => 4096 + (a * cb) as usize,
                None if offset == 0 => 0,
                None => panic!("the parser read {offset}, neither the header nor an area"),
            };
            Ok(CAPTURED[at..at + len].to_vec())
        };
        assert_eq!(differing_ranges(read).unwrap(), vec![(0, 4 << 20)]);
    }

    fn store(chunk_sectors: u32, valid: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        for (at, v) in [(0, MAGIC), (4, valid), (8, VERSION), (12, chunk_sectors)] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn headers_other_than_a_valid_version_1_store_are_refused() {
        assert!(parse_header(&store(8, 0)).unwrap_err().contains("invalid"));
        assert!(parse_header(&store(3, 1)).unwrap_err().contains("power of two"));
        assert!(parse_header(&[0u8; 4096]).unwrap_err().contains("magic"));
        assert!(parse_header(&[0u8; 8]).is_err());
        let mut v2 = store(8, 1);
        v2[8] = 2;
        assert!(parse_header(&v2).unwrap_err().contains("version"));
    }

    #[test]
    fn a_full_area_continues_in_the_next_and_ranges_merge() {
        // 1 KiB chunks (2 sectors): 64 exceptions per area, so area 1 is at chunk 1 + 65 = 66.
        let cb = 1024u64;
        assert_eq!(area_chunk(1, cb), 66);
        let mut dev = store(2, 1);
        dev.resize((67 * cb) as usize, 0);
        let put = |dev: &mut Vec<u8>, at: u64, old: u64, new: u64| {
            let at = at as usize;
            dev[at..at + 8].copy_from_slice(&old.to_le_bytes());
            dev[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
        };
        for i in 0..64u64 {
            // Area 0, full: origin chunks 100..164 in reverse order, held at chunks 2...
            put(&mut dev, cb + i * 16, 163 - i, 2 + i);
        }
        put(&mut dev, 66 * cb, 7, 67); // area 1: one more, then the end
        let read = |offset: u64, len: usize| -> io::Result<Vec<u8>> {
            let (start, end) = (offset as usize, offset as usize + len);
            Ok(dev.get(start..end).map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; len]))
        };
        assert_eq!(differing_ranges(read).unwrap(), vec![(7 * cb, 8 * cb), (100 * cb, 164 * cb)]);
    }
}
