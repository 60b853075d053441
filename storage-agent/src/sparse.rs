//! Working with sparse files without touching their holes: finding the data extents (SEEK_DATA/SEEK_HOLE),
//! zeroing only those extents, and asking how much is really allocated.
//!
//! Why: a 1 TiB volume holding 1 GiB of data must be wiped, copied and backed up in time proportional to the
//! 1 GiB, never the 1 TiB.

use ember_common::direct_io::{AlignedBuf, DirectFile};
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;

/// The size of a file or of a block device (whose metadata says 0).
pub fn byte_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    Ok(lseek(file.as_fd(), 0, Whence::SeekEnd)? as u64)
}

/// The byte ranges `[start, end)` of `file` that hold data, in order. Filesystems without SEEK_DATA support
/// report the whole file as one extent, which is correct, only slower; a block device is one extent.
pub fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = byte_len(file)?;
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let start = match lseek(file.as_fd(), pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(file.as_fd(), start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(e) => return Err(e.into()),
        };
        if end > start {
            extents.push((start, end));
        }
        pos = end;
    }
    Ok(extents)
}

// BLKDISCARD from <linux/fs.h>: _IO(0x12, 119), taking {start, length} in bytes.
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// Discards `len` bytes at `offset` of a block device (`BLKDISCARD`): the device may deallocate them. A
/// regular file, or a device that takes no discards, returns an error and is left unchanged.
pub fn discard(device: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, which points at `range` for the whole call; the
    // descriptor is open for as long as `device` is borrowed.
    unsafe { blkdiscard(device.as_raw_fd(), &range) }?;
    Ok(())
}

/// Overwrites every data extent of `file` with zeros (around the page cache) and flushes it to stable
/// storage; holes are neither read nor written. Returns the number of bytes zeroed.
pub fn zero_data_extents(file: &DirectFile) -> io::Result<u64> {
    let mut scratch = AlignedBuf::default();
    let mut zeroed = 0;
    for (start, end) in data_extents(file.file())? {
        file.write_zeros(start, end - start, &mut scratch)?;
        zeroed += end - start;
    }
    file.sync_data()?;
    Ok(zeroed)
}

/// Bytes the filesystem really allocated for `file`.
pub fn allocated_bytes(meta: &std::fs::Metadata) -> u64 {
    meta.blocks() * 512
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_skip_holes_and_zeroing_touches_only_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let len = 64u64 << 20; // 64 MiB apparent, two 64 KiB islands of data
        file.set_len(len).unwrap();
        file.write_all_at(&[0xAB; 65536], 1 << 20).unwrap();
        file.write_all_at(&[0xCD; 65536], 40 << 20).unwrap();
        file.sync_all().unwrap();
        let extents = data_extents(&file).unwrap();
        let covered: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 8 << 20, "extents must not cover the holes: {extents:?}");
        assert!(extents.iter().any(|(s, e)| *s <= 1 << 20 && *e >= (1 << 20) + 65536), "{extents:?}");

        let zeroed = zero_data_extents(&DirectFile::open(&path, true).unwrap()).unwrap();
        assert_eq!(zeroed, covered);
        let mut all = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut all).unwrap();
        assert!(all.iter().all(|b| *b == 0), "data remains after wipe");
        assert!(allocated_bytes(&std::fs::metadata(&path).unwrap()) < 8 << 20, "the wipe allocated the holes");
    }

    #[test]
    fn a_regular_file_takes_no_discard_and_keeps_its_data() {
        // What lets a restore fall back to writing zeros: the discard fails and changes nothing.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(discard(&file, 0, 1 << 20).is_err());
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 7));
    }
}
