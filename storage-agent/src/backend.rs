//! One face for the drivers: the service asks a [`Backend`] for volumes and snapshots and does not care
//! whether they are files or logical volumes.

use crate::config::{BackendConfig, TargetKind};
use crate::error::{AgentError, Result};
use crate::file_backend::{FileBackend, Kind};
use crate::image::ImageFacts;
use crate::lvm::LvmBackend;
use ember_proto::agent::v1::Pool;
use std::path::PathBuf;

/// Where a volume or snapshot can hold data, when its driver knows better than `SEEK_DATA` does: a thin LV's
/// blocks that its pool has mapped. Everything else reads as zeros and takes no space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMap {
    /// Byte ranges `(start, end)`, in order, adjacent ones merged.
    pub extents: Vec<(u64, u64)>,
    /// The unit of allocation (the pool's data block size, bytes): discarding a whole one unmaps it.
    pub block: u64,
}

/// What a driver records about a volume or snapshot beyond its data, for adopting one the coordinator has no
/// record of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The id of the volume a snapshot was taken of, when the driver keeps that (an LV's origin); a snapshot
    /// file is a plain copy and keeps none.
    pub origin_volume: Option<String>,
    /// True when a copy, restore or migration copy into it never finished (an LV still tagged incomplete, a file
    /// still marked): its data is partial.
    pub incomplete: bool,
    /// True when ember did not make it: an LV without ember's owner tag, which the agent never lists (so the
    /// coordinator could not look after it) and does not take over.
    pub foreign: bool,
}

/// A configured backend.
#[derive(Debug)]
pub enum Backend {
    /// Sparse or preallocated files in a directory.
    File(FileBackend),
    /// LVs in a volume group.
    Lvm(LvmBackend),
}

impl Backend {
    /// Opens the backend `cfg` describes (its directory or volume group must exist). `state_dir`: the agent's
    /// own directory, for the files a driver needs while it works.
    pub async fn open(cfg: BackendConfig, state_dir: &std::path::Path) -> Result<Backend> {
        Ok(match cfg.driver.as_str() {
            "lvm" => Backend::Lvm(LvmBackend::open(cfg, state_dir).await?),
            _ => Backend::File(FileBackend::open(cfg)?),
        })
    }

    /// Its configuration.
    pub fn cfg(&self) -> &BackendConfig {
        match self {
            Backend::File(b) => &b.cfg,
            Backend::Lvm(b) => &b.cfg,
        }
    }

    /// The target that exports its volumes.
    pub fn target(&self) -> TargetKind {
        self.cfg().target
    }

    /// The file or block device holding a volume or snapshot.
    pub fn path(&self, kind: Kind, id: &uuid::Uuid) -> PathBuf {
        match self {
            Backend::File(b) => b.path(kind, id),
            Backend::Lvm(b) => b.path(kind, id),
        }
    }

    /// Where a volume or snapshot may hold data when the driver knows it better than `SEEK_DATA` on its file
    /// or device does (thin LVs); `None` otherwise.
    pub async fn data_map(&self, kind: Kind, id: &uuid::Uuid) -> Result<Option<DataMap>> {
        match self {
            Backend::File(_) => Ok(None),
            Backend::Lvm(b) => b.data_map(kind, id).await,
        }
    }

    /// Where volume `volume` may differ from its snapshot `snapshot`, when the driver records it (LVM: the
    /// blocks a thin LV and its snapshot do not share, a thick snapshot's copy-on-write store); `None`: anywhere.
    pub async fn differing(&self, volume: &uuid::Uuid, snapshot: &uuid::Uuid) -> Result<Option<Vec<(u64, u64)>>> {
        match self {
            Backend::File(_) => Ok(None),
            Backend::Lvm(b) => b.differing(volume, snapshot).await,
        }
    }

    /// True when the volume or snapshot exists.
    pub async fn exists(&self, kind: Kind, id: &uuid::Uuid) -> Result<bool> {
        match self {
            Backend::File(b) => {
                let path = b.path(kind, id);
                on_blocking_thread(b, move |_| Ok(path.exists())).await
            }
            Backend::Lvm(b) => b.exists(kind, id).await,
        }
    }

    /// What the driver records about a volume or snapshot; `None` when it holds none of that id.
    pub async fn record(&self, kind: Kind, id: &uuid::Uuid) -> Result<Option<Record>> {
        match self {
            // A file with the final name is complete unless a restore or a migration's copy into it left its
            // mark (copies are renamed into place), and is no more than its data.
            Backend::File(b) => {
                let (path, id) = (b.path(kind, id), *id);
                on_blocking_thread(b, move |b| {
                    let incomplete = kind == Kind::Volume && b.is_incomplete(&id);
                    Ok(path.exists().then_some(Record { incomplete, ..Record::default() }))
                })
                .await
            }
            Backend::Lvm(b) => b.record(kind, id).await,
        }
    }

    /// Marks volume `id` as being written by a restore or a migration's copy (`incomplete`), durably, before the
    /// first write, or clears the mark once every byte is written and flushed. A mark left by a write cut short
    /// makes `manage` refuse the volume: its data is partial.
    pub async fn mark_incomplete(&self, id: &uuid::Uuid, incomplete: bool) -> Result<()> {
        match self {
            Backend::File(b) => {
                let id = *id;
                on_blocking_thread(b, move |b| b.mark_incomplete(&id, incomplete)).await
            }
            Backend::Lvm(b) => b.mark_incomplete(id, incomplete).await,
        }
    }

    /// Creates a blank volume; repeating it is a no-op.
    pub async fn create_blank(&self, id: &uuid::Uuid, size_gb: u64) -> Result<u64> {
        match self {
            Backend::File(b) => {
                let id = *id;
                on_blocking_thread(b, move |b| b.create_blank(&id, size_gb)).await
            }
            Backend::Lvm(b) => b.create_blank(id, size_gb).await,
        }
    }

    /// Makes a volume or snapshot `kind`/`id` from the volume or snapshot `source_kind`/`source`, at least
    /// `size_gb` GiB; repeating it is a no-op.
    pub async fn create_from(
        &self,
        kind: Kind,
        id: &uuid::Uuid,
        source_kind: Kind,
        source: &uuid::Uuid,
        size_gb: Option<u64>,
    ) -> Result<u64> {
        match self {
            Backend::File(b) => {
                let (id, source) = (*id, b.path(source_kind, source));
                on_blocking_thread(b, move |b| block_on(b.create_copy(kind, &id, &source, size_gb))).await
            }
            Backend::Lvm(b) => b.create_from(kind, id, source_kind, source, size_gb).await,
        }
    }

    /// Creates a volume filled from an image; repeating it is a no-op.
    pub async fn create_from_image(&self, id: &uuid::Uuid, size_gb: u64, source: &str) -> Result<(u64, ImageFacts)> {
        match self {
            Backend::File(b) => {
                let (id, source) = (*id, source.to_string());
                on_blocking_thread(b, move |b| block_on(b.create_from_image(&id, size_gb, &source))).await
            }
            Backend::Lvm(b) => b.create_from_image(id, size_gb, source).await,
        }
    }

    /// Grows a volume.
    pub async fn extend(&self, id: &uuid::Uuid, new_gb: u64) -> Result<u64> {
        match self {
            Backend::File(b) => {
                let id = *id;
                on_blocking_thread(b, move |b| b.extend(&id, new_gb)).await
            }
            Backend::Lvm(b) => b.extend(id, new_gb).await,
        }
    }

    /// Wipes (as configured) and removes a volume or snapshot; what is gone succeeds.
    pub async fn remove(&self, kind: Kind, id: &uuid::Uuid) -> Result<()> {
        match self {
            Backend::File(b) => {
                let id = *id;
                on_blocking_thread(b, move |b| block_on(b.remove(kind, &id))).await
            }
            Backend::Lvm(b) => b.remove(kind, id).await,
        }
    }

    /// Ids of the volumes and snapshots present.
    pub async fn list(&self) -> Result<(Vec<String>, Vec<String>)> {
        match self {
            Backend::File(b) => on_blocking_thread(b, |b| b.list()).await,
            Backend::Lvm(b) => b.list().await,
        }
    }

    /// Ids of the volumes and snapshots named as ember names them that ember did not make (LVs without its
    /// owner tag); a file backend has none: its files carry no owner.
    pub async fn list_foreign(&self) -> Result<(Vec<String>, Vec<String>)> {
        match self {
            Backend::File(_) => Ok((Vec::new(), Vec::new())),
            Backend::Lvm(b) => b.list_foreign().await,
        }
    }

    /// Makes volume or snapshot `kind`/`id`, which another system made, ember's (an admin adopts it).
    pub async fn adopt_foreign(&self, kind: Kind, id: &uuid::Uuid) -> Result<()> {
        match self {
            Backend::File(_) => Ok(()),
            Backend::Lvm(b) => b.adopt_foreign(kind, id).await,
        }
    }

    /// Capacity and capabilities for the scheduler.
    pub fn pool(&self) -> Pool {
        match self {
            Backend::File(b) => b.pool(),
            Backend::Lvm(b) => b.pool(),
        }
    }
}

/// Runs a file backend operation on a blocking thread. Every file call can block for minutes on an NFS mount
/// whose server has gone (until the soft mount gives up), and the agent's async threads must stay free
/// meanwhile for heartbeats and other requests.
async fn on_blocking_thread<T: Send + 'static>(
    b: &FileBackend,
    op: impl FnOnce(FileBackend) -> Result<T> + Send + 'static,
) -> Result<T> {
    let b = b.clone();
    tokio::task::spawn_blocking(move || op(b))
        .await
        .map_err(|e| AgentError::Io { context: "file backend task".into(), source: std::io::Error::other(e) })?
}

/// Drives an async file backend operation (one that also runs commands) to its end on the blocking thread
/// [`on_blocking_thread`] gave it.
fn block_on<T>(op: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Handle::current().block_on(op)
}

/// A pool's space in bytes, as a driver measured it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    /// All the pool has.
    pub total: u64,
    /// Not yet used.
    pub free: u64,
    /// Sum of the sizes of the volumes in it (thin over-subscription is measured against this).
    pub provisioned: u64,
    /// Really used by volumes and snapshots.
    pub allocated: u64,
}

/// The pool report the scheduler reads, the same shape for every driver: capacity in GiB, the backend's
/// limits, and capabilities (`volume_backend_name`, `storage_protocol`, `driver`, plus the driver's `extra`).
pub fn pool_report(cfg: &BackendConfig, thin: bool, space: Capacity, extra: &[(&str, &str)]) -> Pool {
    let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut capabilities: std::collections::HashMap<String, String> = [
        ("volume_backend_name".to_string(), cfg.name.clone()),
        ("storage_protocol".to_string(), "iSCSI".to_string()),
        ("driver".to_string(), cfg.driver.clone()),
    ]
    .into();
    capabilities.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Pool {
        name: cfg.name.clone(),
        total_capacity_gb: gb(space.total),
        free_capacity_gb: gb(space.free),
        provisioned_capacity_gb: gb(space.provisioned),
        allocated_capacity_gb: gb(space.allocated),
        thin_provisioning_support: thin,
        thick_provisioning_support: !thin,
        reserved_percentage: cfg.reserved_percentage,
        max_over_subscription_ratio: cfg.max_over_subscription_ratio,
        multiattach: true,
        capabilities,
    }
}
