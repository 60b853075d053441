//! Which parts of a thin LV hold data, read from the thin pool's own metadata, so that the backup data path
//! reads only those: a 1 TiB thin volume holding 10 MiB is read as 10 MiB. A thin LV is a block device, and
//! `SEEK_DATA` on a block device calls all of it data; the pool's mapping btree is what knows.
//!
//! How: the pool's live metadata changes under us, so the kernel is asked for a metadata snapshot
//! (`dmsetup message <pool>-tpool 0 reserve_metadata_snap`, which commits the pending transaction first),
//! `thin_dump --metadata-snap --dev-id N` reads that snapshot's mappings of the LV's thin device, and the
//! snapshot is released. A pool has at most one metadata snapshot, so an agent takes them one at a time; one
//! left reserved by an agent that died between reserve and release is released and taken again.
//!
//! Output format (thin-provisioning-tools 0.9, captured in `testdata/lvm/thin_dump-metadata-snap.xml`):
//! `<superblock data_block_size="SECTORS">` holding `<device dev_id="N">` with `<range_mapping
//! origin_begin="B" length="L"/>` and `<single_mapping origin_block="B"/>`; blocks are counted in units of the
//! pool's data block size, in 512-byte sectors.

use crate::error::{AgentError, Result};
use crate::lvm::dm_name;
use ember_common::runner::{self, CommandError};
use std::time::Duration;

/// Byte ranges `(start, end)` of thin device `dev_id` that are mapped, in order, adjacent ones merged, cut at
/// `size` (the LV's size: a pool's block may run past a volume's end).
pub fn mapped_extents(xml: &str, dev_id: u32, size: u64) -> Result<Vec<(u64, u64)>> {
    let bad = |detail: String| AgentError::Io {
        context: "parsing thin_dump output".into(),
        source: std::io::Error::other(detail),
    };
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(e.to_string()))?;
    let number = |node: roxmltree::Node, name: &str| -> Result<u64> {
        node.attribute(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("<{}> has no number {name}", node.tag_name().name())))
    };
    let superblock = doc.root_element();
    let block = number(superblock, "data_block_size")? * 512;
    let device = superblock
        .children()
        .find(|n| n.has_tag_name("device") && n.attribute("dev_id") == Some(dev_id.to_string().as_str()))
        .ok_or_else(|| bad(format!("thin device {dev_id} is not in the pool's metadata")))?;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for mapping in device.children().filter(|n| n.is_element()) {
        let (first, blocks) = match mapping.tag_name().name() {
            "range_mapping" => (number(mapping, "origin_begin")?, number(mapping, "length")?),
            "single_mapping" => (number(mapping, "origin_block")?, 1),
            other => return Err(bad(format!("unexpected <{other}>"))),
        };
        let (start, end) = (first * block, ((first + blocks) * block).min(size));
        if start >= end {
            continue;
        }
        match extents.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => extents.push((start, end)),
        }
    }
    extents.sort_unstable();
    Ok(extents)
}

/// True when the pool refused a metadata snapshot because one is already reserved.
fn is_busy(e: &CommandError) -> bool {
    matches!(e, CommandError::Failed { stderr, .. } if stderr.contains("Device or resource busy"))
}

/// A thin pool whose metadata tells which blocks of its thin LVs are mapped.
#[derive(Debug)]
pub struct ThinPool {
    /// The pool's data-path device, which takes the messages (`/dev/mapper/<vg>-<pool>-tpool`).
    tpool: String,
    /// The pool's metadata device that `thin_dump` reads (`/dev/mapper/<vg>-<pool>_tmeta`).
    tmeta: String,
    timeout: Duration,
    /// One metadata snapshot at a time per pool.
    lock: tokio::sync::Mutex<()>,
}

impl ThinPool {
    /// The thin pool `pool` of volume group `vg`.
    pub fn new(vg: &str, pool: &str, timeout: Duration) -> ThinPool {
        ThinPool {
            tpool: format!("/dev/mapper/{}-tpool", dm_name(vg, pool)),
            tmeta: format!("/dev/mapper/{}", dm_name(vg, &format!("{pool}_tmeta"))),
            timeout,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn message(&self, what: &str) -> std::result::Result<(), CommandError> {
        runner::run("dmsetup", &["message", &self.tpool, "0", what], self.timeout).await.map(|_| ())
    }

    /// The mapped byte ranges of thin device `dev_id` (an LV of `size` bytes).
    pub async fn mapped_extents(&self, dev_id: u32, size: u64) -> Result<Vec<(u64, u64)>> {
        let _one_at_a_time = self.lock.lock().await;
        if let Err(first) = self.message("reserve_metadata_snap").await {
            // Only a snapshot left by an agent that died holding it makes the pool busy: give it back, retry.
            if !is_busy(&first) {
                return Err(AgentError::Command(first));
            }
            tracing::warn!(pool = %self.tpool, "releasing a metadata snapshot left reserved");
            self.message("release_metadata_snap").await.map_err(AgentError::Command)?;
            self.message("reserve_metadata_snap").await.map_err(AgentError::Command)?;
        }
        let dump =
            runner::run("thin_dump", &["--metadata-snap", "--dev-id", &dev_id.to_string(), &self.tmeta], self.timeout)
                .await;
        let released = self.message("release_metadata_snap").await;
        let extents = mapped_extents(&dump.map_err(AgentError::Command)?.stdout, dev_id, size)?;
        released.map_err(AgentError::Command)?;
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = include_str!("../testdata/lvm/thin_dump-metadata-snap.xml");
    const MIB: u64 = 1 << 20;

    #[test]
    fn mapped_extents_of_a_real_dump() {
        // Captured in the real-kernel guest: a 1 GiB thin LV (device 1) written at 10–13 MiB, one 4 KiB block
        // at 20,480,000, 1 MiB at 1023 MiB; a thin snapshot of it (device 2); then 1 MiB at 500 MiB into the
        // origin only; and an empty thin LV (device 3). Pool blocks are 64 KiB (128 sectors).
        let origin = mapped_extents(DUMP, 1, 1 << 30).unwrap();
        assert_eq!(
            origin,
            vec![(10 * MIB, 13 * MIB), (312 << 16, 313 << 16), (500 * MIB, 501 * MIB), (1023 * MIB, 1024 * MIB)]
        );
        assert!(origin[1].0 <= 20_480_000 && 20_480_000 + 4096 <= origin[1].1, "the 4 KiB write is covered");
        let snapshot = mapped_extents(DUMP, 2, 1 << 30).unwrap();
        assert_eq!(snapshot, vec![(10 * MIB, 13 * MIB), (312 << 16, 313 << 16), (1023 * MIB, 1024 * MIB)]);
        assert_eq!(mapped_extents(DUMP, 3, 2 << 30).unwrap(), vec![], "an unwritten thin LV has no data");
    }

    #[test]
    fn extents_are_cut_at_the_volume_size() {
        let cut = mapped_extents(DUMP, 1, 1023 * MIB + 4096).unwrap();
        assert_eq!(cut.last(), Some(&(1023 * MIB, 1023 * MIB + 4096)));
        assert_eq!(mapped_extents(DUMP, 1, 11 * MIB).unwrap(), vec![(10 * MIB, 11 * MIB)]);
    }

    #[test]
    fn a_device_missing_from_the_dump_is_an_error_not_an_empty_volume() {
        let unknown = include_str!("../testdata/lvm/thin_dump-unknown-dev-id.xml");
        let err = mapped_extents(unknown, 9, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("thin device 9"), "{err}");
        assert!(mapped_extents(include_str!("../testdata/lvm/thin_dump-no-metadata-snap.txt"), 1, 1 << 30).is_err());
        assert!(mapped_extents("<superblock data_block_size=\"x\"/>", 1, 1).is_err());
    }

    #[test]
    fn a_second_reservation_is_recognised_as_busy() {
        let failed = |stderr: &str| CommandError::Failed {
            program: "dmsetup".into(),
            args: String::new(),
            code: Some(1),
            stderr: stderr.into(),
            stdout: String::new(),
        };
        assert!(is_busy(&failed(include_str!("../testdata/lvm/dmsetup-reserve-metadata-snap-busy.txt"))));
        assert!(!is_busy(&failed("device-mapper: message ioctl on x failed: No such device or address")));
    }

    #[test]
    fn pool_device_names_follow_device_mapper() {
        let pool = ThinPool::new("ember-thin", "ember-thin-pool", Duration::from_secs(1));
        assert_eq!(pool.tpool, "/dev/mapper/ember--thin-ember--thin--pool-tpool");
        assert_eq!(pool.tmeta, "/dev/mapper/ember--thin-ember--thin--pool_tmeta");
    }
}
