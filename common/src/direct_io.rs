//! Bulk data I/O that bypasses the page cache (`O_DIRECT`) through buffers that are reused, not allocated per
//! chunk.
//!
//! Why: restores and backups move whole volumes once; caching them helps nothing, and on the VMs ember runs on
//! here the first touch of a page the kernel has not used lately costs about 2 ms per MB (the pattern of
//! free-page reporting to the host). Writing 700 MB of new data through the page cache took 1.6 s of system
//! time; the same with `O_DIRECT` took 0.25 s. Measured with `dd`; see docs/backup-format.md, "Speed: where
//! the time goes".
//!
//! `O_DIRECT` needs the buffer, the file offset and the length aligned to the device's block size. Whatever is
//! not aligned (a short last chunk, a chunk file whose length is not a multiple of 4 KiB) goes through a
//! second, ordinary descriptor; a filesystem that refuses `O_DIRECT` (tmpfs) gets ordinary I/O throughout.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment for buffers, offsets and lengths of direct I/O (covers 512-byte and 4 KiB block devices).
pub const ALIGN: usize = 4096;

/// A byte buffer whose contents start on an [`ALIGN`] boundary, reused from one chunk to the next.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Makes room for `len` bytes (keeping nothing) and returns them, aligned.
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        let needed = len.next_multiple_of(ALIGN) + ALIGN;
        if self.raw.len() < needed {
            self.raw = vec![0u8; needed];
        }
        self.start = self.raw.as_ptr().align_offset(ALIGN);
        self.len = len;
        &mut self.raw[self.start..self.start + len]
    }

    /// Keeps only the first `len` bytes of those prepared.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes last prepared.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes last prepared, padded with what follows them to a multiple of [`ALIGN`].
    fn padded(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len.next_multiple_of(ALIGN)]
    }
}

/// A file opened twice: once with `O_DIRECT` (when the filesystem allows it) and once without.
pub struct DirectFile {
    direct: Option<File>,
    buffered: File,
}

fn open_with(path: &Path, write: bool, create_new: bool, flags: i32) -> io::Result<File> {
    OpenOptions::new().read(true).write(write).create_new(create_new).custom_flags(flags).open(path)
}

impl DirectFile {
    /// Opens an existing file for reading, and for writing when `write`.
    pub fn open(path: &Path, write: bool) -> io::Result<DirectFile> {
        let buffered = open_with(path, write, false, 0)?;
        let direct = open_with(path, write, false, libc_o_direct()).ok();
        Ok(DirectFile { direct, buffered })
    }

    /// Creates a new file (failing when it exists) for writing and reading.
    pub fn create_new(path: &Path) -> io::Result<DirectFile> {
        let buffered = open_with(path, true, true, 0)?;
        let direct = open_with(path, true, false, libc_o_direct()).ok();
        Ok(DirectFile { direct, buffered })
    }

    /// The ordinary descriptor (for `fallocate`, `fadvise`, size queries).
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Writes `data` at `offset`. The aligned part goes straight to the device through `scratch`; an unaligned
    /// offset or tail goes through the page cache.
    pub fn write_at(&self, data: &[u8], offset: u64, scratch: &mut AlignedBuf) -> io::Result<()> {
        let direct_len = match &self.direct {
            Some(_) if offset.is_multiple_of(ALIGN as u64) => data.len() / ALIGN * ALIGN,
            _ => 0,
        };
        if let (Some(direct), true) = (&self.direct, direct_len > 0) {
            scratch.prepare(direct_len).copy_from_slice(&data[..direct_len]);
            direct.write_all_at(scratch.as_slice(), offset)?;
        }
        if direct_len < data.len() {
            self.buffered.write_all_at(&data[direct_len..], offset + direct_len as u64)?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`, a MiB at a time, the same way as [`DirectFile::write_at`].
    pub fn write_zeros(&self, offset: u64, len: u64, scratch: &mut AlignedBuf) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(STEP) as usize];
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(STEP) as usize;
            self.write_at(&zeros[..n], off, scratch)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Reads the whole file (of `len` bytes) into `buf` and returns it. With `O_DIRECT` the read is padded to
    /// [`ALIGN`]; the end of the file cuts it short.
    pub fn read_all<'a>(&self, len: usize, buf: &'a mut AlignedBuf) -> io::Result<&'a [u8]> {
        buf.prepare(len);
        let Some(direct) = &self.direct else {
            self.buffered.read_exact_at(&mut buf.raw[buf.start..buf.start + len], 0)?;
            return Ok(buf.as_slice());
        };
        let padded = len.next_multiple_of(ALIGN);
        let mut done = 0;
        while done < len {
            let n = direct.read_at(&mut buf.raw[buf.start + done..buf.start + padded], done as u64)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than expected"));
            }
            done += n;
        }
        Ok(buf.as_slice())
    }

    /// Reads exactly `len` bytes at `offset` into `buf` and returns them: with `O_DIRECT` when the offset and
    /// length are aligned (so that what the kernel wrote beneath the page cache is what is read), else through
    /// the page cache.
    pub fn read_exact_at<'a>(&self, offset: u64, len: usize, buf: &'a mut AlignedBuf) -> io::Result<&'a [u8]> {
        let into = buf.prepare(len);
        match &self.direct {
            Some(direct) if offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) => {
                direct.read_exact_at(into, offset)?
            }
            _ => self.buffered.read_exact_at(into, offset)?,
        }
        Ok(buf.as_slice())
    }

    /// Writes `buf` as the whole content of this (new) file: the aligned part directly, the tail through the
    /// page cache.
    pub fn write_all_from(&self, buf: &AlignedBuf) -> io::Result<()> {
        let data = buf.as_slice();
        let aligned = data.len() / ALIGN * ALIGN;
        match &self.direct {
            Some(direct) if aligned > 0 => {
                direct.write_all_at(&buf.padded()[..aligned], 0)?;
                self.buffered.write_all_at(&data[aligned..], aligned as u64)
            }
            _ => self.buffered.write_all_at(data, 0),
        }
    }

    /// `fdatasync`: the file's data and the metadata needed to read it back are durable.
    pub fn sync_data(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
}

/// Tells glibc's allocator to keep freed memory for reuse: chunk-sized buffers come from the heap rather than
/// from a fresh `mmap` each (threshold 32 MiB, glibc's maximum), and the heap is trimmed only past 256 MiB of
/// free memory. Freed chunk buffers are then reused while still warm; see this module's doc for why a fresh
/// page is expensive here. Measured: the storage agent's CPU in a 1 GiB restore fell from 0.9–1.3 s to
/// 0.6 s. Memory stays bounded by what the data paths hold at once (bounded queues), which is what RSS shows.
/// Call once at start of a daemon that moves volume data.
pub fn keep_freed_memory() {
    // SAFETY: mallopt only adjusts two of glibc's allocator parameters; it is safe to call at any time, from
    // any thread, and reports an invalid value by returning 0, which only means the default stays.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 32 << 20);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_reused() {
        let mut b = AlignedBuf::default();
        let p = b.prepare(10_000).as_ptr();
        assert_eq!(p as usize % ALIGN, 0);
        assert_eq!(b.as_slice().len(), 10_000);
        assert_eq!(b.prepare(5000).as_ptr(), p, "a smaller request reuses the buffer");
    }

    #[test]
    fn unaligned_writes_and_reads_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = DirectFile::create_new(&path).unwrap();
        let data: Vec<u8> = (0..3 * ALIGN + 123).map(|i| (i % 251) as u8).collect();
        let mut scratch = AlignedBuf::default();
        f.write_at(&data, 0, &mut scratch).unwrap(); // aligned part plus a tail
        f.write_at(&data[..100], 7, &mut scratch).unwrap(); // unaligned offset
        f.sync_data().unwrap();
        let mut expect = data.clone();
        expect[7..107].copy_from_slice(&data[..100]);
        assert_eq!(std::fs::read(&path).unwrap(), expect);

        let g = DirectFile::open(&path, false).unwrap();
        let mut buf = AlignedBuf::default();
        assert_eq!(g.read_all(expect.len(), &mut buf).unwrap(), &expect[..]);
        assert!(g.read_all(expect.len() + ALIGN, &mut buf).is_err(), "a short file is an error");

        let whole = dir.path().join("g");
        let mut content = AlignedBuf::default();
        content.prepare(data.len()).copy_from_slice(&data);
        DirectFile::create_new(&whole).unwrap().write_all_from(&content).unwrap();
        assert_eq!(std::fs::read(&whole).unwrap(), data);
        assert!(DirectFile::create_new(&whole).is_err(), "create_new refuses an existing file");
        let h = DirectFile::open(&whole, false).unwrap();
        assert_eq!(h.read_exact_at(ALIGN as u64, ALIGN, &mut buf).unwrap(), &data[ALIGN..2 * ALIGN], "aligned");
        assert_eq!(h.read_exact_at(5, 100, &mut buf).unwrap(), &data[5..105], "unaligned");
        assert!(h.read_exact_at(3 * ALIGN as u64, ALIGN, &mut buf).is_err(), "past the end");
    }
}
