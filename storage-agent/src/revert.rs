//! Reverting a volume to one of its snapshots, in place, the same way for files and LVs: chunk by chunk, the
//! snapshot's data is compared with the volume's and only the pages that differ are written, or cleared where
//! the snapshot reads as zeros (a hole punched in a file, the blocks given back to a thin pool). Writing only
//! what differs is what keeps a thin volume's blocks shared with its snapshots: rewriting identical data would
//! break that sharing and provision every block again (Cinder's generic revert copies it all). Nothing is read
//! where neither side holds data, nor, on LVM, where LVM records that the two are the same. Repeating a revert
//! that was cut short finishes it.

use crate::backend::DataMap;
use crate::data::{apply_chunk, chunks_with_data, is_zero, read_chunk};
use crate::error::{AgentError, Result};
use ember_common::direct_io::{AlignedBuf, DirectFile};
use ember_proto::agent::v1::VolumeChunk;
use std::fs::File;

/// The unit compared and written.
const CHUNK: u64 = 1 << 20;

/// One side of a revert: an open volume or snapshot, its size, and where it can hold data.
pub struct Side<'a> {
    /// Open for reading (buffered).
    pub file: &'a File,
    /// Its size in bytes.
    pub size: u64,
    /// Byte ranges that may hold data, in order; the rest reads as zeros.
    pub extents: &'a [(u64, u64)],
}

/// The unit rewritten within a chunk that differs: what the page cache, `O_DIRECT` and a thick snapshot's
/// copy-on-write store (4 KiB chunks by default) work in.
const PAGE: usize = 4096;

/// The runs `(start, end)` of `want` that differ from `have` (same length), in whole pages, adjacent ones
/// joined. Rewriting only those leaves the rest alone: a thin LV's blocks stay shared with its snapshot, and a
/// thick snapshot's store copies nothing more.
fn differing_runs(want: &[u8], have: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    for (page, (w, h)) in want.chunks(PAGE).zip(have.chunks(PAGE)).enumerate() {
        if w != h {
            crate::ranges::push_joined(&mut runs, page * PAGE, page * PAGE + w.len());
        }
    }
    runs
}

/// What a revert did, in bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reverted {
    /// Read from both sides and compared.
    pub compared: u64,
    /// Rewritten or cleared, because they differed (whole pages).
    pub changed: u64,
}

/// The chunk indices where either side may hold data, in order, each once; of those, only the ones that meet
/// `may_differ` when the driver knows where the two sides can differ.
fn positions(volume: &Side, snapshot: &Side, may_differ: Option<&[(u64, u64)]>) -> Vec<u64> {
    let mut all = chunks_with_data(volume.extents, CHUNK);
    all.extend(chunks_with_data(snapshot.extents, CHUNK));
    all.sort_unstable();
    all.dedup();
    if let Some(ranges) = may_differ {
        // Past the snapshot's end the volume must read as zeros, whatever the driver recorded.
        let mut ranges = ranges.to_vec();
        if volume.size > snapshot.size {
            ranges.push((snapshot.size, volume.size));
        }
        let wanted: std::collections::BTreeSet<u64> =
            ranges.iter().filter(|(a, b)| a < b).flat_map(|&(a, b)| a / CHUNK..=(b - 1) / CHUNK).collect();
        all.retain(|i| wanted.contains(i));
    }
    all
}

/// Makes `target` (the volume, open for writing) hold `snapshot`'s data, with zeros past the snapshot's end.
/// `volume` describes the same file as read before any write; `mapped`: a thin LV's mapped blocks, where
/// clearing gives blocks back; `may_differ`: the byte ranges outside which the two sides are known to be the
/// same (what LVM records: the blocks a thin LV and its snapshot do not share, the chunks a thick snapshot's
/// store holds), `None` when they may differ anywhere.
pub fn revert(
    target: &DirectFile,
    volume: &Side,
    snapshot: &Side,
    mapped: Option<&DataMap>,
    may_differ: Option<&[(u64, u64)]>,
) -> Result<Reverted> {
    if snapshot.size > volume.size {
        return Err(AgentError::FailedPrecondition(format!(
            "the snapshot ({} bytes) is larger than the volume ({} bytes)",
            snapshot.size, volume.size
        )));
    }
    let (mut want, mut have, mut scratch) =
        (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize], AlignedBuf::default());
    let mut done = Reverted::default();
    for index in positions(volume, snapshot, may_differ) {
        let offset = index * CHUNK;
        if offset >= volume.size {
            break;
        }
        let len = CHUNK.min(volume.size - offset) as usize;
        let (want, have) = (&mut want[..len], &mut have[..len]);
        let from_snapshot = snapshot.size.saturating_sub(offset).min(len as u64) as usize;
        want[from_snapshot..].fill(0);
        read_chunk(snapshot.file, snapshot.extents, offset, &mut want[..from_snapshot])
            .map_err(AgentError::io("reading the snapshot"))?;
        read_chunk(volume.file, volume.extents, offset, have).map_err(AgentError::io("reading the volume"))?;
        done.compared += len as u64;
        if want == have {
            continue;
        }
        for (start, end) in differing_runs(want, have) {
            let (part, at) = (&want[start..end], offset + start as u64);
            if is_zero(part) {
                let clear = VolumeChunk { offset: at, zero_length: part.len() as u64, ..Default::default() };
                apply_chunk(target, volume.size, mapped, &clear, &mut scratch)?;
            } else {
                target.write_at(part, at, &mut scratch).map_err(AgentError::io("writing the volume"))?;
            }
            done.changed += part.len() as u64;
        }
    }
    target.sync_data().map_err(AgentError::io("syncing the volume"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn side<'a>(file: &'a File, extents: &'a [(u64, u64)]) -> Side<'a> {
        Side { file, size: file.metadata().unwrap().len(), extents }
    }

    #[test]
    fn only_differing_chunks_are_rewritten_and_the_rest_reads_as_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (vol_path, snap_path) = (dir.path().join("volume"), dir.path().join("snapshot"));
        let snap = File::create(&snap_path).unwrap();
        snap.set_len(4 << 20).unwrap();
        snap.write_all_at(&[1u8; 4096], 0).unwrap(); // chunk 0: data the volume changed since
        snap.write_all_at(&[2u8; 4096], 2 << 20).unwrap(); // chunk 2: data the volume still has
        let vol = File::create(&vol_path).unwrap();
        vol.set_len(6 << 20).unwrap(); // extended since the snapshot
        vol.write_all_at(&[9u8; 4096], 0).unwrap();
        vol.write_all_at(&[7u8; 4096], 1 << 20).unwrap(); // written since, where the snapshot has a hole
        vol.write_all_at(&[2u8; 4096], 2 << 20).unwrap();
        vol.write_all_at(&[5u8; 4096], 5 << 20).unwrap(); // past the snapshot's end
        let (snap_r, vol_r) = (File::open(&snap_path).unwrap(), File::open(&vol_path).unwrap());
        let (snap_x, vol_x) =
            (crate::sparse::data_extents(&snap_r).unwrap(), crate::sparse::data_extents(&vol_r).unwrap());
        let target = DirectFile::open(&vol_path, true).unwrap();
        let done = revert(&target, &side(&vol_r, &vol_x), &side(&snap_r, &snap_x), None, None).unwrap();
        assert_eq!(done.changed, 3 * 4096, "a page of chunks 0, 1 and 5 each; chunk 2 was already the snapshot's");
        let mut got = vec![0u8; 6 << 20];
        File::open(&vol_path).unwrap().read_exact_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 6 << 20];
        want[..4096].fill(1);
        want[2 << 20..(2 << 20) + 4096].fill(2);
        assert!(got == want, "the volume reads as the snapshot, zeros past its end");
        let vol_r = File::open(&vol_path).unwrap();
        let vol_x = crate::sparse::data_extents(&vol_r).unwrap();
        let again = revert(&target, &side(&vol_r, &vol_x), &side(&snap_r, &snap_x), None, None).unwrap();
        assert_eq!(again.changed, 0, "a repeat finds nothing to do");
        assert_eq!(File::open(&vol_path).unwrap().metadata().unwrap().len(), 6 << 20, "the size stays");
    }

    /// A thick LV reads as data everywhere; its snapshot store says where it changed.
    #[test]
    fn only_the_chunks_the_store_names_are_compared_and_the_tail_always_is() {
        let dir = tempfile::tempdir().unwrap();
        let (vol_path, snap_path) = (dir.path().join("volume"), dir.path().join("snapshot"));
        std::fs::write(&snap_path, vec![3u8; 4 << 20]).unwrap();
        let mut vol = vec![3u8; 5 << 20]; // extended by a chunk since
        vol[(2 << 20) + 10] = 4; // changed since, where the store says
        vol[(5 << 20) - 1] = 6; // past the snapshot's end
        std::fs::write(&vol_path, &vol).unwrap();
        let (snap_r, vol_r) = (File::open(&snap_path).unwrap(), File::open(&vol_path).unwrap());
        let (whole_vol, whole_snap) = ([(0, 5u64 << 20)], [(0, 4u64 << 20)]);
        let target = DirectFile::open(&vol_path, true).unwrap();
        let store = [((2 << 20) + 8192, (2 << 20) + 12288)]; // one 4 KiB chunk of the store
        let done = revert(&target, &side(&vol_r, &whole_vol), &side(&snap_r, &whole_snap), None, Some(&store)).unwrap();
        let changed = 4096 + (1 << 20); // the page of chunk 2; all of the tail, which must read as zeros
        assert_eq!(done, Reverted { compared: 2 << 20, changed });
        let mut want = vec![3u8; 4 << 20];
        want.resize(5 << 20, 0);
        assert!(std::fs::read(&vol_path).unwrap() == want, "the volume reads as the snapshot, zeros past its end");
    }

    #[test]
    fn only_the_pages_that_differ_are_rewritten() {
        let have = vec![1u8; 6 * PAGE + 100];
        let mut want = have.clone();
        want[10] = 2; // page 0
        want[2 * PAGE] = 2; // pages 2 and 3: one run
        want[4 * PAGE - 1] = 2;
        want[6 * PAGE + 99] = 2; // the short last page
        assert_eq!(differing_runs(&want, &have), vec![(0, PAGE), (2 * PAGE, 4 * PAGE), (6 * PAGE, 6 * PAGE + 100)]);
        assert!(differing_runs(&have, &have).is_empty());
    }

    #[test]
    fn a_snapshot_larger_than_the_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (vol_path, snap_path) = (dir.path().join("volume"), dir.path().join("snapshot"));
        File::create(&snap_path).unwrap().set_len(2 << 20).unwrap();
        File::create(&vol_path).unwrap().set_len(1 << 20).unwrap();
        let (snap_r, vol_r) = (File::open(&snap_path).unwrap(), File::open(&vol_path).unwrap());
        let target = DirectFile::open(&vol_path, true).unwrap();
        let err = revert(&target, &side(&vol_r, &[]), &side(&snap_r, &[]), None, None).unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
    }
}
