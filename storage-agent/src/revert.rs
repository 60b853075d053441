//! Reverting a volume to one of its snapshots, in place, the same way for files and LVs: chunk by chunk, the
//! snapshot's data is compared with the volume's and only the chunks that differ are written, or cleared where
//! the snapshot reads as zeros (a hole punched in a file, the blocks given back to a thin pool). Writing only
//! what differs is what keeps a thin volume's blocks shared with its snapshots: rewriting identical data would
//! break that sharing and provision every block again (Cinder's generic revert copies it all). Nothing is read
//! where neither side holds data. Repeating a revert that was cut short finishes it.

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

/// The chunk indices where either side may hold data, in order, each once.
fn positions(volume: &[(u64, u64)], snapshot: &[(u64, u64)]) -> Vec<u64> {
    let mut all = chunks_with_data(volume, CHUNK);
    all.extend(chunks_with_data(snapshot, CHUNK));
    all.sort_unstable();
    all.dedup();
    all
}

/// Makes `target` (the volume, open for writing) hold `snapshot`'s data, with zeros past the snapshot's end.
/// `volume` describes the same file as read before any write; `mapped`: a thin LV's mapped blocks, where
/// clearing gives blocks back. Returns the bytes rewritten or cleared.
pub fn revert(target: &DirectFile, volume: &Side, snapshot: &Side, mapped: Option<&DataMap>) -> Result<u64> {
    if snapshot.size > volume.size {
        return Err(AgentError::FailedPrecondition(format!(
            "the snapshot ({} bytes) is larger than the volume ({} bytes)",
            snapshot.size, volume.size
        )));
    }
    let (mut want, mut have, mut scratch) =
        (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize], AlignedBuf::default());
    let mut changed = 0;
    for index in positions(volume.extents, snapshot.extents) {
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
        if want == have {
            continue;
        }
        if is_zero(want) {
            let clear = VolumeChunk { offset, zero_length: len as u64, ..Default::default() };
            apply_chunk(target, volume.size, mapped, &clear, &mut scratch)?;
        } else {
            target.write_at(want, offset, &mut scratch).map_err(AgentError::io("writing the volume"))?;
        }
        changed += len as u64;
    }
    target.sync_data().map_err(AgentError::io("syncing the volume"))?;
    Ok(changed)
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
        let changed = revert(&target, &side(&vol_r, &vol_x), &side(&snap_r, &snap_x), None).unwrap();
        assert_eq!(changed, 3 << 20, "chunks 0, 1 and 5; chunk 2 was already the snapshot's");
        let mut got = vec![0u8; 6 << 20];
        File::open(&vol_path).unwrap().read_exact_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 6 << 20];
        want[..4096].fill(1);
        want[2 << 20..(2 << 20) + 4096].fill(2);
        assert!(got == want, "the volume reads as the snapshot, zeros past its end");
        let vol_r = File::open(&vol_path).unwrap();
        let vol_x = crate::sparse::data_extents(&vol_r).unwrap();
        let again = revert(&target, &side(&vol_r, &vol_x), &side(&snap_r, &snap_x), None).unwrap();
        assert_eq!(again, 0, "a repeat finds nothing to do");
        assert_eq!(File::open(&vol_path).unwrap().metadata().unwrap().len(), 6 << 20, "the size stays");
    }

    #[test]
    fn a_snapshot_larger_than_the_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (vol_path, snap_path) = (dir.path().join("volume"), dir.path().join("snapshot"));
        File::create(&snap_path).unwrap().set_len(2 << 20).unwrap();
        File::create(&vol_path).unwrap().set_len(1 << 20).unwrap();
        let (snap_r, vol_r) = (File::open(&snap_path).unwrap(), File::open(&vol_path).unwrap());
        let target = DirectFile::open(&vol_path, true).unwrap();
        let err = revert(&target, &side(&vol_r, &[]), &side(&snap_r, &[]), None).unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
    }
}
