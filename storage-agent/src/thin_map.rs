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
//!
//! The same metadata snapshot answers where two thin LVs of one pool differ (a volume and its snapshot, for a
//! revert): `thin_delta --metadata-snap --snap1 A --snap2 B` compares their mapping trees, and blocks both map
//! to the same data block are the same data. Output (0.9, `testdata/lvm/thin_delta-metadata.xml`): `<diff>`
//! holding `<same|different|left_only|right_only begin="B" length="L"/>`, in blocks.

use crate::backend::DataMap;
use crate::error::{AgentError, Result};
use crate::lvm::dm_name;
use crate::ranges;
use ember_common::runner::{self, CommandError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The value of attribute `name` in one element's line, e.g. `length` in `<range_mapping ... length="16"/>`.
fn attribute<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}=\""))? + name.len() + 3;
    line[at..].split('"').next()
}

/// The byte ranges `(start, end)` of thin device `dev_id` that are mapped, in order, adjacent ones merged, cut
/// at `size` (the LV's size: a pool's block may run past a volume's end), and the pool's block size.
///
/// Read a line at a time, not as a document: thin_dump writes one element per line, and a volume in a pool
/// shared with other writers gets a `single_mapping` line per 64 KiB block (its blocks interleave with theirs
/// in the pool), so a busy volume's dump can run to hundreds of MB. Memory stays the merged ranges.
pub fn data_map(dump: impl std::io::BufRead, dev_id: u32, size: u64) -> Result<DataMap> {
    let bad = |detail: String| AgentError::Io {
        context: "parsing thin_dump output".into(),
        source: std::io::Error::other(detail),
    };
    let number = |line: &str, name: &str| -> Result<u64> {
        attribute(line, name).and_then(|v| v.parse().ok()).ok_or_else(|| bad(format!("no number {name} in {line:?}")))
    };
    let wanted = dev_id.to_string();
    let (mut block, mut found, mut inside) = (None, false, false);
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for line in dump.lines() {
        let line = line.map_err(AgentError::io("reading thin_dump output"))?;
        let element = line.trim_start();
        let (first, blocks) = if element.starts_with("<superblock") {
            block = Some(number(element, "data_block_size")? * 512);
            continue;
        } else if element.starts_with("<device") {
            inside = attribute(element, "dev_id") == Some(wanted.as_str());
            found |= inside;
            continue;
        } else if element.starts_with("</device") {
            inside = false;
            continue;
        } else if !inside {
            continue;
        } else if element.starts_with("<range_mapping") {
            (number(element, "origin_begin")?, number(element, "length")?)
        } else if element.starts_with("<single_mapping") {
            (number(element, "origin_block")?, 1)
        } else {
            return Err(bad(format!("unexpected line {element:?}")));
        };
        let block = block.ok_or_else(|| bad("a mapping before the superblock".into()))?;
        let (start, end) = (first * block, ((first + blocks) * block).min(size));
        if start >= end {
            continue;
        }
        // Joined as they come: thin_dump lists them in order, so a large device's list stays short.
        ranges::push_joined(&mut extents, start, end);
    }
    let (Some(block), true) = (block, found) else {
        return Err(bad(format!("thin device {dev_id} is not in the pool's metadata")));
    };
    // thin_dump walks the mappings in order; should a version not, ranges that touch are still joined.
    Ok(DataMap { extents: ranges::normalize(extents), block })
}

/// The byte ranges `(start, end)` where the two thin devices `thin_delta` compared may differ (mapped to
/// different data blocks, or mapped in one only), in order, adjacent ones merged. Blocks both map to one data
/// block, and blocks neither maps, are the same.
pub fn delta_ranges(delta: impl std::io::BufRead) -> Result<Vec<(u64, u64)>> {
    let bad = |detail: String| AgentError::Io {
        context: "parsing thin_delta output".into(),
        source: std::io::Error::other(detail),
    };
    let number = |line: &str, name: &str| -> Result<u64> {
        attribute(line, name).and_then(|v| v.parse().ok()).ok_or_else(|| bad(format!("no number {name} in {line:?}")))
    };
    let (mut block, mut differing) = (None, Vec::new());
    for line in delta.lines() {
        let line = line.map_err(AgentError::io("reading thin_delta output"))?;
        let element = line.trim_start();
        if element.starts_with("<superblock") {
            block = Some(number(element, "data_block_size")? * 512);
            continue;
        }
        let differs = ["<different ", "<left_only ", "<right_only "].iter().any(|k| element.starts_with(k));
        if !differs {
            // Anything but the known frame is a format this parser does not know: say so rather than guess.
            let known = ["<same ", "<diff ", "</diff>", "</superblock>"].iter().any(|k| element.starts_with(k));
            if known || element.is_empty() {
                continue;
            }
            return Err(bad(format!("unexpected line {element:?}")));
        }
        let block = block.ok_or_else(|| bad("a range before the superblock".into()))?;
        let (begin, length) = (number(element, "begin")?, number(element, "length")?);
        ranges::push_joined(&mut differing, begin * block, (begin + length) * block);
    }
    if block.is_none() {
        return Err(bad("no superblock".into()));
    }
    Ok(ranges::normalize(differing))
}

/// True when the pool refused a metadata snapshot because one is already reserved.
fn is_busy(e: &CommandError) -> bool {
    matches!(e, CommandError::Failed { stderr, .. } if stderr.contains("Device or resource busy"))
}

/// How the names of `thin_dump` output files begin.
const DUMP_PREFIX: &str = ".thin_dump-";

/// A thin pool, whose metadata tells which blocks of its thin LVs are mapped.
#[derive(Debug)]
pub struct ThinPool {
    /// The pool LV's name.
    name: String,
    /// The pool's data-path device, which takes the messages (`/dev/mapper/<vg>-<pool>-tpool`).
    tpool: String,
    /// The pool's metadata device that `thin_dump` reads (`/dev/mapper/<vg>-<pool>_tmeta`).
    tmeta: String,
    timeout: Duration,
    /// Where `thin_dump` writes its output: the agent's state directory. Not `/tmp`, which is memory on many
    /// nodes (tmpfs), while a busy volume's dump can run to hundreds of MB.
    work_dir: PathBuf,
    /// One metadata snapshot at a time per pool.
    lock: tokio::sync::Mutex<()>,
}

impl ThinPool {
    /// The thin pool `pool` of volume group `vg`; its dumps go to `work_dir`, where any an agent that died
    /// left behind are removed now.
    pub fn new(vg: &str, pool: &str, timeout: Duration, work_dir: &Path) -> ThinPool {
        let pool = ThinPool {
            name: pool.to_string(),
            tpool: format!("/dev/mapper/{}-tpool", dm_name(vg, pool)),
            tmeta: format!("/dev/mapper/{}", dm_name(vg, &format!("{pool}_tmeta"))),
            timeout,
            work_dir: work_dir.to_path_buf(),
            lock: tokio::sync::Mutex::new(()),
        };
        let leftovers = std::fs::read_dir(work_dir).into_iter().flatten().flatten();
        for stale in leftovers.filter(|e| e.file_name().to_string_lossy().starts_with(DUMP_PREFIX)) {
            let _ = std::fs::remove_file(stale.path());
        }
        pool
    }

    /// The pool LV's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn message(&self, what: &str) -> std::result::Result<(), CommandError> {
        runner::run("dmsetup", &["message", &self.tpool, "0", what], self.timeout).await.map(|_| ())
    }

    /// Runs `program args…` (a thin tool reading the metadata snapshot) with its output in a file in the work
    /// directory, while the pool holds a metadata snapshot; returns that file.
    async fn on_metadata_snapshot(&self, program: &str, args: &[&str]) -> Result<tempfile::NamedTempFile> {
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
        // Into a file, not through a pipe into memory: the output can be large (see `data_map`).
        let file = tempfile::Builder::new()
            .prefix(DUMP_PREFIX)
            .tempfile_in(&self.work_dir)
            .map_err(AgentError::io(format!("creating a file for {program}")))?;
        let stdout = file.reopen().map_err(AgentError::io(format!("opening the file for {program}")))?;
        let mut argv = vec!["--metadata-snap"];
        argv.extend_from_slice(args);
        argv.push(&self.tmeta);
        let ran = runner::run_to_file(program, &argv, self.timeout, stdout).await;
        let released = self.message("release_metadata_snap").await;
        ran.map_err(AgentError::Command)?;
        released.map_err(AgentError::Command)?;
        Ok(file)
    }

    /// Parses a tool's output file off the async threads.
    async fn parse<T: Send + 'static>(
        file: tempfile::NamedTempFile,
        parse: impl FnOnce(std::io::BufReader<std::fs::File>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(move || {
            parse(std::io::BufReader::new(file.reopen().map_err(AgentError::io("reading a thin tool's output"))?))
        })
        .await
        .map_err(|e| AgentError::Io {
            context: "parsing a thin tool's output".into(),
            source: std::io::Error::other(e),
        })?
    }

    /// The mapped byte ranges of thin device `dev_id` (an LV of `size` bytes).
    pub async fn data_map(&self, dev_id: u32, size: u64) -> Result<DataMap> {
        let file = self.on_metadata_snapshot("thin_dump", &["--dev-id", &dev_id.to_string()]).await?;
        Self::parse(file, move |dump| data_map(dump, dev_id, size)).await
    }

    /// The byte ranges where thin devices `left` and `right` may differ (see [`delta_ranges`]).
    pub async fn differing(&self, left: u32, right: u32) -> Result<Vec<(u64, u64)>> {
        let (left, right) = (left.to_string(), right.to_string());
        let file = self.on_metadata_snapshot("thin_delta", &["--snap1", &left, "--snap2", &right]).await?;
        Self::parse(file, delta_ranges).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = include_str!("../testdata/lvm/thin_dump-metadata-snap.xml");
    /// thin_delta 0.9.0 (the guest's, Debian 12) comparing devices 2 and 1 of metadata that thin_restore made
    /// from a dump: blocks 0–1 shared, 2–3 mapped by both to different data blocks, 8 shared, 9 mapped only by
    /// device 1, 12 only by device 2; the pool's blocks are 64 KiB.
    const DELTA: &str = include_str!("../testdata/lvm/thin_delta-metadata.xml");

    #[test]
    fn delta_ranges_of_real_thin_delta_output() {
        let k = 64 * 1024;
        assert_eq!(delta_ranges(DELTA.as_bytes()).unwrap(), vec![(2 * k, 4 * k), (9 * k, 10 * k), (12 * k, 13 * k)]);
        let same_only = "<superblock data_block_size=\"128\">\n<diff left=\"1\" right=\"2\">\n<same begin=\"0\" length=\"9\"/>\n</diff>\n</superblock>\n";
        assert_eq!(delta_ranges(same_only.as_bytes()).unwrap(), vec![]);
        assert!(delta_ranges("".as_bytes()).is_err(), "no superblock");
        let verbose = DELTA.replace("<different begin=\"2\" length=\"2\"/>", "<different>");
        assert!(delta_ranges(verbose.as_bytes()).is_err(), "a format it does not know");
    }
    const MIB: u64 = 1 << 20;

    fn extents(dump: &[u8], dev_id: u32, size: u64) -> Vec<(u64, u64)> {
        data_map(dump, dev_id, size).unwrap().extents
    }

    #[test]
    fn data_map_of_a_real_dump() {
        // Captured in the real-kernel guest: a 1 GiB thin LV (device 1) written at 10–13 MiB, one 4 KiB block
        // at 20,480,000, 1 MiB at 1023 MiB; a thin snapshot of it (device 2); then 1 MiB at 500 MiB into the
        // origin only; and an empty thin LV (device 3). Pool blocks are 64 KiB (128 sectors).
        let origin = extents(DUMP.as_bytes(), 1, 1 << 30);
        assert_eq!(
            origin,
            vec![(10 * MIB, 13 * MIB), (312 << 16, 313 << 16), (500 * MIB, 501 * MIB), (1023 * MIB, 1024 * MIB)]
        );
        assert!(origin[1].0 <= 20_480_000 && 20_480_000 + 4096 <= origin[1].1, "the 4 KiB write is covered");
        let snapshot = extents(DUMP.as_bytes(), 2, 1 << 30);
        assert_eq!(snapshot, vec![(10 * MIB, 13 * MIB), (312 << 16, 313 << 16), (1023 * MIB, 1024 * MIB)]);
        assert_eq!(extents(DUMP.as_bytes(), 3, 2 << 30), vec![], "an unwritten thin LV has no data");
        assert_eq!(data_map(DUMP.as_bytes(), 1, 1 << 30).unwrap().block, 64 << 10, "the pool's block size");
    }

    #[test]
    fn blocks_that_interleave_with_other_volumes_merge_into_one_range() {
        // A volume written while others wrote too gets its blocks scattered in the pool: one single_mapping
        // per block, contiguous in the volume. Those make one range; the gap after them stays a gap.
        let dump = "<superblock uuid=\"\" time=\"0\" data_block_size=\"128\" nr_data_blocks=\"0\">
  <device dev_id=\"4\" mapped_blocks=\"4\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">
    <single_mapping origin_block=\"0\" data_block=\"7\" time=\"0\"/>
    <single_mapping origin_block=\"1\" data_block=\"9\" time=\"0\"/>
    <single_mapping origin_block=\"2\" data_block=\"3\" time=\"0\"/>
    <single_mapping origin_block=\"5\" data_block=\"11\" time=\"0\"/>
  </device>
</superblock>
";
        assert_eq!(extents(dump.as_bytes(), 4, 1 << 30), vec![(0, 3 << 16), (5 << 16, 6 << 16)]);
        assert!(data_map(dump.as_bytes(), 5, 1 << 30).is_err(), "another device");
    }

    #[test]
    fn mappings_out_of_order_still_make_sorted_joined_ranges() {
        let dump = "<superblock uuid=\"\" time=\"0\" data_block_size=\"128\" nr_data_blocks=\"0\">
  <device dev_id=\"4\" mapped_blocks=\"5\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">
    <single_mapping origin_block=\"8\" data_block=\"1\" time=\"0\"/>
    <range_mapping origin_begin=\"2\" data_begin=\"4\" length=\"2\" time=\"0\"/>
    <single_mapping origin_block=\"1\" data_block=\"2\" time=\"0\"/>
    <single_mapping origin_block=\"4\" data_block=\"3\" time=\"0\"/>
  </device>
</superblock>
";
        assert_eq!(extents(dump.as_bytes(), 4, 1 << 30), vec![(1 << 16, 5 << 16), (8 << 16, 9 << 16)]);
    }

    #[test]
    fn extents_are_cut_at_the_volume_size() {
        let cut = extents(DUMP.as_bytes(), 1, 1023 * MIB + 4096);
        assert_eq!(cut.last(), Some(&(1023 * MIB, 1023 * MIB + 4096)));
        assert_eq!(extents(DUMP.as_bytes(), 1, 11 * MIB), vec![(10 * MIB, 11 * MIB)]);
    }

    #[test]
    fn a_device_missing_from_the_dump_is_an_error_not_an_empty_volume() {
        let unknown = include_str!("../testdata/lvm/thin_dump-unknown-dev-id.xml");
        let err = data_map(unknown.as_bytes(), 9, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("thin device 9"), "{err}");
        assert!(
            data_map(include_str!("../testdata/lvm/thin_dump-no-metadata-snap.txt").as_bytes(), 1, 1 << 30).is_err()
        );
        assert!(data_map("<superblock data_block_size=\"x\">".as_bytes(), 1, 1).is_err());
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
    fn pool_device_names_follow_device_mapper_and_leftover_dumps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!("{DUMP_PREFIX}abc123"));
        std::fs::write(&stale, "a dump an agent that died left").unwrap();
        std::fs::write(dir.path().join("exports.json"), "{}").unwrap();
        let pool = ThinPool::new("ember-thin", "ember-thin-pool", Duration::from_secs(1), dir.path());
        assert!(!stale.exists(), "a leftover dump is removed");
        assert!(dir.path().join("exports.json").exists(), "nothing else is");
        assert_eq!(pool.tpool, "/dev/mapper/ember--thin-ember--thin--pool-tpool");
        assert_eq!(pool.tmeta, "/dev/mapper/ember--thin-ember--thin--pool_tmeta");
    }
}
