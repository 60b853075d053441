//! The `lvm` driver, with Cinder's LVM behaviour: one volume group per backend; volumes are LVs named
//! `volume-<id>`, snapshots `_snapshot-<id>`; `lvm_type` thick, thin (LVs in the thin pool) or auto.
//!
//! Every LV the agent makes carries the `ember` tag, so the agent rebuilds what it owns from the node itself.
//! A thick copy in progress carries `ember-incomplete` as well, so a create repeated after a crash redoes the
//! copy rather than trusting a half-copied LV; so does an LV a restore or a migration is writing, so that
//! `manage` refuses one cut short. Every LVM command runs with a deadline: a hung `lvs` fails one
//! call, it never hangs the agent.

use crate::backend::{Capacity, DataMap, Record};
use crate::config::{BackendConfig, LvmType, Wipe};
use crate::error::{AgentError, Result};
use crate::file_backend::Kind;
use crate::image::{self, ImageFacts};
use crate::thin_map::ThinPool;
use ember_common::runner::{self, CommandError};
use ember_proto::agent::v1::Pool;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// The tag on every LV the agent owns.
pub const OWNER_TAG: &str = "ember";
/// The tag on an LV whose data copy, restore or migration copy has not finished.
pub const INCOMPLETE_TAG: &str = "ember-incomplete";

/// One logical volume, as `lvs` reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lv {
    /// LV name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `lv_attr`, e.g. `Vwi-a-tz--`.
    pub attr: String,
    /// The thin pool holding it (thin LVs).
    pub pool: String,
    /// The origin of a snapshot.
    pub origin: String,
    /// Percent of a thin pool's (or snapshot's) data space in use.
    pub data_percent: Option<f64>,
    /// LVM tags.
    pub tags: Vec<String>,
    /// The device id of a thin LV inside its pool's metadata.
    pub thin_id: Option<u32>,
}

impl Lv {
    /// Whether ember made (or adopted) the LV: it carries the owner tag.
    fn is_owned(&self) -> bool {
        self.tags.iter().any(|t| t == OWNER_TAG)
    }

    /// Whether the LV carries the tag of a copy or restore that has not finished.
    fn is_incomplete(&self) -> bool {
        self.tags.iter().any(|t| t == INCOMPLETE_TAG)
    }
}

/// A volume group's size and free space in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vg {
    /// Size in bytes.
    pub size: u64,
    /// Unallocated bytes.
    pub free: u64,
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    lv: Vec<LvRow>,
}

#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    thin_id: String,
}

#[derive(Deserialize)]
struct VgSection {
    vg: Vec<VgRow>,
}

#[derive(Deserialize)]
struct VgRow {
    vg_size: String,
    vg_free: String,
}

fn bad_report(what: &str, detail: impl std::fmt::Display) -> AgentError {
    AgentError::Io { context: format!("parsing {what} output"), source: std::io::Error::other(detail.to_string()) }
}

fn bytes(what: &str, text: &str) -> Result<u64> {
    text.trim().parse().map_err(|_| bad_report(what, format!("size {text:?} is not a byte count")))
}

/// Parses `lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,lv_attr,pool_lv,origin,
/// data_percent,lv_tags,thin_id`. Hidden LVs (`[pool_tdata]`) are skipped.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>> {
    let report: Report<LvSection> = serde_json::from_str(json).map_err(|e| bad_report("lvs", e))?;
    let mut out = Vec::new();
    for row in report.report.into_iter().flat_map(|s| s.lv) {
        if row.lv_name.starts_with('[') {
            continue;
        }
        out.push(Lv {
            size: bytes("lvs", &row.lv_size)?,
            data_percent: row.data_percent.trim().parse().ok(),
            tags: row.lv_tags.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect(),
            thin_id: row.thin_id.trim().parse().ok(),
            name: row.lv_name,
            attr: row.lv_attr,
            pool: row.pool_lv,
            origin: row.origin,
        });
    }
    Ok(out)
}

/// Parses `vgs --reportformat json --units b --nosuffix -o vg_size,vg_free` for one VG.
pub fn parse_vg(json: &str) -> Result<Vg> {
    let report: Report<VgSection> = serde_json::from_str(json).map_err(|e| bad_report("vgs", e))?;
    let row = report.report.into_iter().flat_map(|s| s.vg).next().ok_or_else(|| bad_report("vgs", "no VG"))?;
    Ok(Vg { size: bytes("vgs", &row.vg_size)?, free: bytes("vgs", &row.vg_free)? })
}

/// Capacity as Cinder's LVM driver reports it, in bytes: `(total, free, provisioned)`. Thin: the pool's size,
/// its unused data space, and the sum of the thin LVs in it. Thick: the VG's size and free space, and the
/// sum of the LVs the agent owns.
pub fn capacity(vg: Vg, lvs: &[Lv], thin_pool: Option<&str>) -> (u64, u64, u64) {
    match thin_pool.and_then(|p| lvs.iter().find(|lv| lv.name == p)) {
        Some(pool) => {
            let used = pool.data_percent.unwrap_or(0.0).clamp(0.0, 100.0) / 100.0;
            let free = (pool.size as f64 * (1.0 - used)) as u64;
            let provisioned = lvs.iter().filter(|lv| lv.pool == pool.name).map(|lv| lv.size).sum();
            (pool.size, free, provisioned)
        }
        None => {
            let provisioned = lvs.iter().filter(|lv| lv.is_owned()).map(|lv| lv.size).sum();
            (vg.size, vg.free, provisioned)
        }
    }
}

/// Maps a failed LVM command to what the caller should see: no space → RESOURCE_EXHAUSTED, a missing LV →
/// NOT_FOUND, anything else stays an internal error with LVM's words.
pub fn classify(e: CommandError) -> AgentError {
    if let CommandError::Failed { stderr, .. } = &e {
        let lower = stderr.to_lowercase();
        if lower.contains("insufficient free space") || lower.contains("insufficient suitable") {
            return AgentError::NoSpace(format!("volume group full: {}", stderr.trim()));
        }
        if lower.contains("failed to find logical volume") {
            return AgentError::NotFound(stderr.trim().to_string());
        }
    }
    AgentError::Command(e)
}

/// Refuses a `dd of=` path that is not a block device: a missing device node would make dd create a regular
/// file under /dev (RAM) and "succeed" without touching the LV.
fn block_device(path: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let context = format!("writing to {path}");
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(AgentError::Io { context, source: std::io::Error::other("not a block device") }),
        Err(source) => Err(AgentError::Io { context, source }),
    }
}

/// The device-mapper name of an LV (`-` doubled inside each part).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The LV name of a volume or snapshot.
pub fn lv_name(kind: Kind, id: &uuid::Uuid) -> String {
    match kind {
        Kind::Volume => format!("volume-{id}"),
        Kind::Snapshot => format!("_snapshot-{id}"),
    }
}

/// A snapshot's origin volume (ember's snapshots are taken of volumes, named `volume-<id>`; a thin volume's
/// origin is only where its blocks came from), whether the LV still carries the tag of an unfinished copy, and
/// whether it lacks ember's owner tag.
fn record_of(lv: &Lv) -> Record {
    let snapshot = lv.name.starts_with("_snapshot-");
    Record {
        origin_volume: lv.origin.strip_prefix("volume-").filter(|_| snapshot).map(str::to_string),
        incomplete: lv.is_incomplete(),
        foreign: !lv.is_owned(),
    }
}

/// How an LV of thin pool `pool` (empty: none) is described: thick, or thin in that pool.
fn lv_kind(pool: &str) -> String {
    if pool.is_empty() { "thick".into() } else { format!("thin, in pool {pool}") }
}

/// The ids of the volume and snapshot LVs in `lvs` that carry ember's owner tag (`owned`), or of those named
/// the same way that do not (ids that are not UUIDs left out: those LVs are no volume of anyone's).
fn ids_of(lvs: &[Lv], owned: bool) -> (Vec<String>, Vec<String>) {
    let (mut volumes, mut snapshots) = (Vec::new(), Vec::new());
    for lv in lvs.iter().filter(|lv| lv.is_owned() == owned) {
        let is_uuid = |id: &str| owned || ember_common::identity::canonical_uuid(id).is_some();
        if let Some(id) = lv.name.strip_prefix("volume-").filter(|id| is_uuid(id)) {
            volumes.push(id.to_string());
        } else if let Some(id) = lv.name.strip_prefix("_snapshot-").filter(|id| is_uuid(id)) {
            snapshots.push(id.to_string());
        }
    }
    volumes.sort();
    snapshots.sort();
    (volumes, snapshots)
}

/// One LVM backend.
#[derive(Debug)]
pub struct LvmBackend {
    /// Its configuration.
    pub cfg: BackendConfig,
    /// The volume group.
    vg: String,
    /// The thin pool the volumes live in, which also tells which blocks of them hold data; `None` for thick.
    thin_pool: Option<Box<ThinPool>>,
    timeout: Duration,
    /// The last capacity report (registration is synchronous; [`LvmBackend::refresh`] updates it).
    cached: std::sync::Mutex<Pool>,
}

impl LvmBackend {
    /// Opens a backend: checks the VG exists and settles `lvm_type` (auto: thin when the pool exists or the VG
    /// is empty — the pool is then created —, thick otherwise). `state_dir` holds the thin map's work files.
    pub async fn open(cfg: BackendConfig, state_dir: &std::path::Path) -> Result<LvmBackend> {
        let vg = cfg.volume_group.clone().unwrap_or_default();
        let pool_name = format!("{vg}-pool");
        let mut backend = LvmBackend {
            timeout: Duration::from_secs(cfg.command_timeout_secs),
            vg,
            thin_pool: None,
            cached: std::sync::Mutex::new(Pool::default()),
            cfg,
        };
        let lvs = backend.lvs().await?;
        let pool_exists = lvs.iter().any(|lv| lv.name == pool_name);
        let thin = match backend.cfg.lvm_type {
            LvmType::Thick => false,
            LvmType::Thin => true,
            LvmType::Auto => pool_exists || lvs.is_empty(),
        };
        if thin && !pool_exists {
            // Cinder sizes a new pool at 95% of the VG's free space, leaving room for the pool's metadata.
            let target = format!("{}/{pool_name}", backend.vg);
            backend.lvm("lvcreate", &["-q", "-y", "-T", "-l", "95%FREE", "--addtag", "ember-pool", &target]).await?;
            tracing::info!(vg = %backend.vg, pool = %pool_name, "thin pool created");
        }
        if thin {
            backend.thin_pool = Some(Box::new(ThinPool::new(&backend.vg, &pool_name, backend.timeout, state_dir)));
        }
        backend.refresh().await?;
        Ok(backend)
    }

    /// True when volumes are thin LVs.
    pub fn is_thin(&self) -> bool {
        self.thin_pool.is_some()
    }

    async fn lvm(&self, program: &str, args: &[&str]) -> Result<String> {
        runner::run(program, args, self.timeout).await.map(|o| o.stdout).map_err(classify)
    }

    /// The VG's LVs.
    pub async fn lvs(&self) -> Result<Vec<Lv>> {
        let fields = "lv_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_tags,thin_id";
        let args = ["--reportformat", "json", "--units", "b", "--nosuffix", "-a", "-o", fields, &self.vg];
        parse_lvs(&self.lvm("lvs", &args).await?)
    }

    async fn find(&self, name: &str) -> Result<Option<Lv>> {
        Ok(self.lvs().await?.into_iter().find(|lv| lv.name == name))
    }

    /// The device of a volume or snapshot.
    pub fn path(&self, kind: Kind, id: &uuid::Uuid) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{}", self.vg, lv_name(kind, id)))
    }

    fn target(&self, name: &str) -> String {
        format!("{}/{name}", self.vg)
    }

    /// Where a volume or snapshot holds data, when the pool can tell: a thin LV's mapped
    /// blocks. `None`: every byte may hold data (a thick LV).
    pub async fn data_map(&self, kind: Kind, id: &uuid::Uuid) -> Result<Option<DataMap>> {
        let Some(pool) = &self.thin_pool else { return Ok(None) };
        let name = lv_name(kind, id);
        let lv = self.find(&name).await?.ok_or_else(|| AgentError::NotFound(format!("LV {name}")))?;
        // A thin id means something only in its own pool's metadata.
        match lv.thin_id.filter(|_| lv.pool == pool.name()) {
            Some(dev_id) => pool.data_map(dev_id, lv.size).await.map(Some),
            None => Ok(None),
        }
    }

    /// Where volume `volume` may differ from its snapshot `snapshot`, read from what LVM keeps: for a thin pool,
    /// the blocks the two do not share (`thin_delta`, `thin_map.rs`); for a thick one, the origin chunks the
    /// snapshot's copy-on-write store names (`cow_store.rs`). `None` when that cannot be read: the revert then
    /// compares everything, which is slower and as correct.
    pub async fn differing(&self, volume: &uuid::Uuid, snapshot: &uuid::Uuid) -> Result<Option<Vec<(u64, u64)>>> {
        let read = match &self.thin_pool {
            Some(pool) => self.thin_delta(pool, volume, snapshot).await,
            None => self.cow_store(snapshot).await,
        };
        match read {
            Ok(ranges) => Ok(Some(ranges)),
            Err(e) => {
                tracing::warn!(volume_id = %volume, snapshot_id = %snapshot, error = %e,
                    "where the volume changed since its snapshot is unknown; comparing them whole");
                Ok(None)
            }
        }
    }

    async fn thin_delta(&self, pool: &ThinPool, volume: &uuid::Uuid, snapshot: &uuid::Uuid) -> Result<Vec<(u64, u64)>> {
        let mut ids = Vec::new();
        for name in [lv_name(Kind::Volume, volume), lv_name(Kind::Snapshot, snapshot)] {
            let lv = self.find(&name).await?.ok_or_else(|| AgentError::NotFound(format!("LV {name}")))?;
            let in_pool = lv.thin_id.filter(|_| lv.pool == pool.name());
            ids.push(in_pool.ok_or_else(|| AgentError::FailedPrecondition(format!("LV {name} is not in the pool")))?);
        }
        pool.differing(ids[0], ids[1]).await
    }

    async fn cow_store(&self, snapshot: &uuid::Uuid) -> Result<Vec<(u64, u64)>> {
        let store = PathBuf::from(format!("/dev/mapper/{}-cow", dm_name(&self.vg, &lv_name(Kind::Snapshot, snapshot))));
        tokio::task::spawn_blocking(move || {
            let device = ember_common::direct_io::DirectFile::open(&store, false)?;
            let mut buf = ember_common::direct_io::AlignedBuf::default();
            crate::cow_store::differing_ranges(|offset, len| {
                device.read_exact_at(offset, len, &mut buf).map(<[u8]>::to_vec)
            })
        })
        .await
        .map_err(|e| AgentError::Io { context: "reading a snapshot store".into(), source: std::io::Error::other(e) })?
        .map_err(AgentError::io("reading the snapshot's copy-on-write store"))
    }

    /// True when the LV exists.
    pub async fn exists(&self, kind: Kind, id: &uuid::Uuid) -> Result<bool> {
        Ok(self.find(&lv_name(kind, id)).await?.is_some())
    }

    /// What LVM records about a volume or snapshot; `None` when there is no such LV.
    pub async fn record(&self, kind: Kind, id: &uuid::Uuid) -> Result<Option<Record>> {
        Ok(self.find(&lv_name(kind, id)).await?.as_ref().map(record_of))
    }

    /// Tags volume `id` as being written (`incomplete`) or untags it; a no-op when the tags already say so.
    pub async fn mark_incomplete(&self, id: &uuid::Uuid, incomplete: bool) -> Result<()> {
        let name = lv_name(Kind::Volume, id);
        let lv = self.find(&name).await?.ok_or_else(|| AgentError::NotFound(format!("volume {id}")))?;
        if lv.is_incomplete() == incomplete {
            return Ok(());
        }
        self.tag_incomplete(&name, incomplete).await
    }

    /// Adds or removes LV `name`'s `ember-incomplete` tag.
    async fn tag_incomplete(&self, name: &str, incomplete: bool) -> Result<()> {
        let op = if incomplete { "--addtag" } else { "--deltag" };
        self.lvm("lvchange", &["-q", op, INCOMPLETE_TAG, &self.target(name)]).await.map(drop)
    }

    /// Creates a blank volume. Repeating it is a no-op; a different size is refused.
    pub async fn create_blank(&self, id: &uuid::Uuid, size_gb: u64) -> Result<u64> {
        let name = lv_name(Kind::Volume, id);
        let bytes = size_gb * GIB;
        if let Some(lv) = self.find(&name).await? {
            return if lv.size == bytes {
                Ok(bytes)
            } else {
                Err(AgentError::FailedPrecondition(format!("volume {id} exists with another size ({} bytes)", lv.size)))
            };
        }
        self.lvcreate(&name, bytes, &[OWNER_TAG]).await?;
        self.refresh().await?;
        Ok(bytes)
    }

    /// Creates an LV of `bytes` for a volume (thin in the pool, or thick) with `tags`.
    async fn lvcreate(&self, name: &str, bytes: u64, tags: &[&str]) -> Result<()> {
        let size = format!("{bytes}b");
        let pool = self.thin_pool.as_ref().map(|p| self.target(p.name()));
        let mut args = vec!["-q", "-y"];
        match &pool {
            Some(_) => args.extend(["-T", "-V", &size, "-n", name]),
            None => args.extend(["-L", &size, "-n", name]),
        }
        for tag in tags {
            args.extend(["--addtag", tag]);
        }
        args.push(pool.as_deref().unwrap_or(&self.vg));
        self.lvm("lvcreate", &args).await.map(drop)
    }

    /// Creates a volume of `size_gb` GiB filled from an image. The LV carries `ember-incomplete` until the
    /// image is fully written, so a repeat after a crash writes it again.
    pub async fn create_from_image(&self, id: &uuid::Uuid, size_gb: u64, source: &str) -> Result<(u64, ImageFacts)> {
        let bytes = size_gb * GIB;
        let facts = image::inspect(source, bytes).await?;
        let name = lv_name(Kind::Volume, id);
        let existing = self.find(&name).await?;
        if existing.as_ref().is_some_and(|lv| !lv.is_incomplete()) {
            return Ok((bytes, facts));
        }
        if existing.is_none() {
            self.lvcreate(&name, bytes, &[OWNER_TAG, INCOMPLETE_TAG]).await?;
        }
        let device = PathBuf::from(format!("/dev/{}", self.target(&name)));
        image::convert(source, &facts, &device, true, self.is_thin()).await?;
        self.tag_incomplete(&name, false).await?;
        self.refresh().await?;
        Ok((bytes, facts))
    }

    /// Makes `kind`/`id` from a source volume or snapshot, at least `size_gb` GiB. Thin: a thin snapshot of the
    /// source, grown when asked. Thick: a snapshot with a copy-on-write area as large as the origin, or (for a
    /// new volume) a new LV filled with a direct-I/O copy. Repeating it finishes what a crash interrupted.
    pub async fn create_from(
        &self,
        kind: Kind,
        id: &uuid::Uuid,
        source_kind: Kind,
        source: &uuid::Uuid,
        size_gb: Option<u64>,
    ) -> Result<u64> {
        let name = lv_name(kind, id);
        let source_name = lv_name(source_kind, source);
        let existing = self.find(&name).await?;
        let source_lv = match self.find(&source_name).await? {
            Some(lv) => lv,
            None if existing.is_some() => existing.clone().unwrap(),
            None => return Err(AgentError::NotFound(format!("source {source_name}"))),
        };
        let bytes = size_gb.map(|g| g * GIB).unwrap_or(source_lv.size).max(source_lv.size);
        let target = self.target(&name);
        let source_target = self.target(&source_name);
        if self.is_thin() {
            if existing.is_none() {
                // -kn: thin snapshots skip activation by default; a volume or a snapshot to read must be active.
                self.lvm("lvcreate", &["-q", "-y", "-s", "-kn", "-n", &name, "--addtag", OWNER_TAG, &source_target])
                    .await?;
            }
            if kind == Kind::Volume {
                self.grow(&name, bytes).await?;
            }
        } else if kind == Kind::Snapshot {
            if existing.is_none() {
                let cow = format!("{}b", source_lv.size);
                self.lvm(
                    "lvcreate",
                    &["-q", "-y", "-s", "-L", &cow, "-n", &name, "--addtag", OWNER_TAG, &source_target],
                )
                .await?;
            }
        } else {
            let complete = existing.as_ref().is_some_and(|lv| !lv.is_incomplete());
            if !complete {
                if existing.is_none() {
                    self.lvcreate(&name, bytes, &[OWNER_TAG, INCOMPLETE_TAG]).await?;
                }
                self.copy(&source_target, &target, source_lv.size).await?;
                self.tag_incomplete(&name, false).await?;
            }
            self.grow(&name, bytes).await?;
        }
        self.refresh().await?;
        Ok(if kind == Kind::Volume { bytes } else { source_lv.size })
    }

    /// Copies `len` bytes from one LV to another with direct I/O (the page cache would only be polluted).
    async fn copy(&self, from: &str, to: &str, len: u64) -> Result<()> {
        block_device(&format!("/dev/{to}"))?;
        let (src, dst) = (format!("if=/dev/{from}"), format!("of=/dev/{to}"));
        let count = format!("count={}", len.div_ceil(MIB));
        let args = [src.as_str(), &dst, "bs=1M", &count, "iflag=direct", "oflag=direct", "conv=fdatasync"];
        runner::run("dd", &args, runner::data_deadline(len)).await?;
        Ok(())
    }

    /// Extends LV `name` to `bytes` unless it is already that large.
    async fn grow(&self, name: &str, bytes: u64) -> Result<()> {
        let current = self.find(name).await?.map(|lv| lv.size).unwrap_or(0);
        if current < bytes {
            self.lvm("lvextend", &["-q", "-y", "-L", &format!("{bytes}b"), &self.target(name)]).await?;
        }
        Ok(())
    }

    /// Grows a volume. Asking for its current size again is a no-op; shrinking is refused.
    pub async fn extend(&self, id: &uuid::Uuid, new_gb: u64) -> Result<u64> {
        let name = lv_name(Kind::Volume, id);
        let lvs = self.lvs().await?;
        let lv = lvs.iter().find(|lv| lv.name == name).ok_or_else(|| AgentError::NotFound(format!("volume {id}")))?;
        let bytes = new_gb * GIB;
        if bytes < lv.size {
            return Err(AgentError::FailedPrecondition(format!("volume {id} is larger than {new_gb} GiB")));
        }
        // LVM resizes a thick snapshot origin only while it is inactive, which an exported volume never is.
        if bytes > lv.size && !self.is_thin() && lvs.iter().any(|s| s.origin == name) {
            return Err(AgentError::FailedPrecondition(format!(
                "thick volume {id} has snapshots; LVM cannot extend it until they are deleted"
            )));
        }
        self.grow(&name, bytes).await?;
        self.refresh().await?;
        Ok(bytes)
    }

    /// Removes a volume or snapshot; what is already gone succeeds. A volume with snapshots is refused. Thick
    /// LVs are wiped first (zeros over `wipe_size_mb`, 0 = all; a thick snapshot's copy-on-write area, where its
    /// private data is); thin LVs are not, as the pool never hands out unwritten blocks with old data.
    pub async fn remove(&self, kind: Kind, id: &uuid::Uuid) -> Result<()> {
        let name = lv_name(kind, id);
        let lvs = self.lvs().await?;
        let Some(lv) = lvs.iter().find(|lv| lv.name == name) else {
            return Ok(());
        };
        if let Some(snap) = lvs.iter().find(|s| s.origin == name && s.name.starts_with("_snapshot-")) {
            return Err(AgentError::FailedPrecondition(format!("volume {id} has snapshot {}", snap.name)));
        }
        if !self.is_thin() && self.cfg.wipe == Wipe::Zero {
            let device = match kind {
                Kind::Volume => format!("/dev/{}", self.target(&name)),
                Kind::Snapshot => format!("/dev/mapper/{}-cow", dm_name(&self.vg, &name)),
            };
            let mut mib = lv.size.div_ceil(MIB);
            if self.cfg.wipe_size_mb > 0 {
                mib = mib.min(self.cfg.wipe_size_mb);
            }
            block_device(&device)?;
            let (of, count) = (format!("of={device}"), format!("count={mib}"));
            let args = ["if=/dev/zero", of.as_str(), "bs=1M", &count, "oflag=direct", "conv=fdatasync"];
            runner::run("dd", &args, runner::data_deadline(mib * MIB)).await?;
            tracing::info!(%id, wiped_mib = mib, "wiped");
        }
        match self.lvm("lvremove", &["-q", "-f", &self.target(&name)]).await {
            Ok(_) | Err(AgentError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.refresh().await
    }

    /// Ids of the volumes and snapshots the agent owns here.
    pub async fn list(&self) -> Result<(Vec<String>, Vec<String>)> {
        Ok(ids_of(&self.lvs().await?, true))
    }

    /// Ids of the LVs named as ember names volumes and snapshots that lack its owner tag: another system made
    /// them (Cinder's LVM driver names its LVs the same way).
    pub async fn list_foreign(&self) -> Result<(Vec<String>, Vec<String>)> {
        Ok(ids_of(&self.lvs().await?, false))
    }

    /// Tags volume or snapshot `kind`/`id` as ember's: an admin adopts an LV another system made. A no-op for
    /// one that is ember's already.
    pub async fn adopt_foreign(&self, kind: Kind, id: &uuid::Uuid) -> Result<()> {
        let name = lv_name(kind, id);
        let lv = self.find(&name).await?.ok_or_else(|| AgentError::NotFound(format!("{} {id}", kind.noun())))?;
        if lv.is_owned() {
            return Ok(());
        }
        // Ember reads a thin LV's blocks from its pool's metadata, and makes its snapshots and clones there: an LV
        // of another pool (or a thin one on a thick backend, or the reverse) is not one it can look after.
        let pool = self.thin_pool.as_ref().map(|p| p.name()).unwrap_or_default();
        if lv.pool != pool {
            let (has, wants) = (lv_kind(&lv.pool), lv_kind(pool));
            return Err(AgentError::FailedPrecondition(format!(
                "LV {name} is {has}, and this backend's volumes are {wants}; ember cannot look after it here"
            )));
        }
        self.lvm("lvchange", &["-q", "--addtag", OWNER_TAG, &self.target(&name)]).await?;
        tracing::warn!(%id, lv = %name, "an LV ember did not make is ember's now");
        self.refresh().await
    }

    /// Re-reads capacity from `vgs` and `lvs`.
    pub async fn refresh(&self) -> Result<()> {
        let args = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_size,vg_free", &self.vg];
        let vg = parse_vg(&self.lvm("vgs", &args).await?)?;
        let lvs = self.lvs().await?;
        let (total, free, provisioned) = capacity(vg, &lvs, self.thin_pool.as_ref().map(|p| p.name()));
        let allocated = lvs.iter().filter(|lv| lv.is_owned()).map(|lv| lv.size).sum::<u64>();
        let space = Capacity { total, free, provisioned, allocated };
        let lvm_type = if self.is_thin() { "thin" } else { "thick" };
        // QEMU's LUKS formats an LV in place as it does a file (`luks.rs`).
        let extra = [("lvm_type", lvm_type), ("luks_encryption", "True")];
        let pool = crate::backend::pool_report(&self.cfg, self.is_thin(), space, &extra);
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = pool;
        Ok(())
    }

    /// The last capacity report.
    pub fn pool(&self) -> Pool {
        self.cached.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LVS: &str = include_str!("../testdata/lvm/lvs.json");
    const VGS: &str = include_str!("../testdata/lvm/vgs.json");

    #[test]
    fn parses_real_lvs_output_and_skips_hidden_lvs() {
        let lvs = parse_lvs(LVS).unwrap();
        let names: Vec<_> = lvs.iter().map(|lv| lv.name.as_str()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with('[')));
        let pool = lvs.iter().find(|lv| lv.name == "ember-pool").unwrap();
        assert_eq!((pool.size, pool.data_percent), (536870912, Some(3.91)));
        let thick = lvs.iter().find(|lv| lv.name == "volume-11111111-1111-1111-1111-111111111111").unwrap();
        assert_eq!(thick.tags, ["ember-volume"]);
        assert_eq!(thick.size, 64 << 20);
        let snap = lvs.iter().find(|lv| lv.name.starts_with("_snapshot-4444")).unwrap();
        assert_eq!(
            (snap.origin.as_str(), snap.pool.as_str()),
            ("volume-33333333-3333-3333-3333-333333333333", "ember-pool")
        );
    }

    #[test]
    fn records_a_snapshots_origin_volume_an_unfinished_copy_and_a_foreign_lv() {
        // This capture predates the owner tag; the tags are set here as the agent sets them.
        let lvs = parse_lvs(LVS).unwrap();
        let owned = |name: &str, tags: &[&str]| {
            let lv = lvs.iter().find(|lv| lv.name.starts_with(name)).unwrap();
            Lv { tags: tags.iter().map(|t| t.to_string()).collect(), ..lv.clone() }
        };
        let snap = owned("_snapshot-4444", &[OWNER_TAG]);
        let origin = Some("33333333-3333-3333-3333-333333333333".to_string());
        assert_eq!(record_of(&snap), Record { origin_volume: origin, ..Record::default() });
        assert_eq!(record_of(&owned("volume-1111", &[OWNER_TAG])), Record::default());
        assert!(record_of(&owned("volume-1111", &[OWNER_TAG, INCOMPLETE_TAG])).incomplete);
        assert!(record_of(&owned("volume-1111", &["ember-volume"])).foreign);
    }

    #[test]
    fn lists_ember_s_lvs_apart_from_those_another_system_named_the_same_way() {
        let lv = |name: &str, tags: &[&str]| Lv {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Lv::default()
        };
        let (a, b) = ("0e40aaaa-0000-4000-8000-000000000001", "7eafbbbb-0000-4000-8000-000000000002");
        let lvs = [
            lv(&format!("volume-{a}"), &[OWNER_TAG]),
            lv(&format!("_snapshot-{a}"), &[OWNER_TAG]),
            lv(&format!("volume-{b}"), &[]),                // Cinder's
            lv(&format!("_snapshot-{b}"), &["cinder-ish"]), // Cinder's
            lv("volume-not-a-uuid", &[]),                   // nobody's volume
            lv("root", &[]),
            lv("ember-thin-pool", &[]),
        ];
        assert_eq!(ids_of(&lvs, true), (vec![a.to_string()], vec![a.to_string()]));
        assert_eq!(ids_of(&lvs, false), (vec![b.to_string()], vec![b.to_string()]));
    }

    #[test]
    fn parses_the_thin_device_ids_of_thin_lvs() {
        // Captured in the real-kernel guest with the fields `lvs` asks for, thin_id included.
        let lvs = parse_lvs(include_str!("../testdata/lvm/lvs-thin-ids.json")).unwrap();
        let ids: Vec<_> = lvs.iter().map(|lv| (&lv.name[..11], lv.thin_id)).collect();
        assert_eq!(
            ids,
            [("ember-thin-", None), ("volume-0e40", Some(3)), ("volume-7eaf", Some(2)), ("volume-dc57", Some(1))]
        );
    }

    #[test]
    fn parses_real_vgs_output_and_missing_vg_is_an_error() {
        assert_eq!(parse_vg(VGS).unwrap(), Vg { size: 4290772992, free: 3611295744 });
        let missing = include_str!("../testdata/lvm/vgs-missing.txt");
        let json: String = missing
            .lines()
            .filter(|l| !l.contains("not found") && !l.contains("Cannot"))
            .take_while(|l| !l.starts_with("rc="))
            .collect();
        assert!(parse_vg(&json).is_err());
    }

    #[test]
    fn capacity_thin_uses_pool_data_percent_and_thick_uses_the_vg() {
        let lvs = parse_lvs(LVS).unwrap();
        let vg = parse_vg(VGS).unwrap();
        let (total, free, provisioned) = capacity(vg, &lvs, Some("ember-pool"));
        assert_eq!(total, 536870912);
        assert_eq!(free, (536870912f64 * (1.0 - 0.0391)) as u64);
        assert_eq!(provisioned, 2 << 30, "the thin volume and its thin snapshot");
        let (total, free, provisioned) = capacity(vg, &lvs, None);
        assert_eq!((total, free), (4290772992, 3611295744));
        assert_eq!(provisioned, 0, "no LV carries the owner tag in the capture");
    }

    fn failed(stderr: &str) -> CommandError {
        CommandError::Failed {
            program: "lvcreate".into(),
            args: String::new(),
            code: Some(5),
            stderr: stderr.into(),
            stdout: String::new(),
        }
    }

    fn stderr_of(capture: &str) -> String {
        capture.lines().filter(|l| !l.starts_with("rc=")).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn errors_map_to_statuses() {
        let full = stderr_of(include_str!("../testdata/lvm/lvcreate-full.txt"));
        assert!(matches!(classify(failed(&full)), AgentError::NoSpace(_)));
        let status: tonic::Status = classify(failed(&full)).into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let missing = stderr_of(include_str!("../testdata/lvm/lvremove-missing.txt"));
        assert!(matches!(classify(failed(&missing)), AgentError::NotFound(_)));
        assert!(matches!(classify(failed("  Device or resource busy")), AgentError::Command(_)));
    }

    #[test]
    fn only_a_block_device_is_written_to() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("regular");
        std::fs::write(&file, b"x").unwrap();
        let refused = block_device(file.to_str().unwrap()).unwrap_err().to_string();
        assert!(refused.contains("not a block device"), "{refused}");
        let missing = dir.path().join("missing");
        assert!(matches!(block_device(missing.to_str().unwrap()), Err(AgentError::Io { .. })));
        assert!(!missing.exists());
        // A character device is no LV either; the real-kernel tier writes to real LV devices.
        assert!(block_device("/dev/null").unwrap_err().to_string().contains("not a block device"));
    }

    #[test]
    fn names() {
        let id = uuid::Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap();
        assert_eq!(lv_name(Kind::Volume, &id), "volume-11111111-2222-3333-4444-555555555555");
        assert_eq!(lv_name(Kind::Snapshot, &id), "_snapshot-11111111-2222-3333-4444-555555555555");
        assert_eq!(dm_name("vg-a", "_snapshot-1-2"), "vg--a-_snapshot--1--2");
    }
}
