//! The storage agent's gRPC service: volume and snapshot operations on the file backends, and exports over
//! tgt. Every call is idempotent, because the coordinator repeats calls after a crash.

use crate::backend::{Backend, Record};
use crate::config::TargetKind;
use crate::copy::{self, ChunkWriter, Peers};
use crate::data;
use crate::error::{AgentError, Result};
use crate::exports::{ExportRecord, ExportStore};
use crate::file_backend::{Kind, checked_id};
use crate::lio::{Lio, LioSpec};
use crate::tgt::{TargetSpec, Tgt};
use ember_common::failpoint;
use ember_proto::agent::v1::storage_agent_server::StorageAgent;
use ember_proto::agent::v1::*;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The agent's state shared by calls and the export keeper.
pub struct Storage {
    /// Backends by name.
    pub backends: BTreeMap<String, Backend>,
    /// The target daemon.
    pub tgt: Tgt,
    /// The kernel target, for backends configured `target = "lio"`.
    pub lio: Lio,
    /// The portal initiators connect to.
    pub portal: String,
    /// IQN prefix.
    pub iqn_prefix: String,
    /// Desired exports; the lock also serialises every tgtadm change.
    pub exports: Mutex<ExportStore>,
    /// How other storage agents are reached (a migration's source).
    pub peers: Peers,
    /// The agent's own directory (exports; short-lived key files, never on a pool).
    pub state_dir: std::path::PathBuf,
    /// Where local images may be read from (`image_dirs`).
    pub image_dirs: Vec<std::path::PathBuf>,
}

impl Storage {
    fn backend(&self, name: &str) -> Result<&Backend> {
        self.backends.get(name).ok_or_else(|| AgentError::NotFound(format!("backend {name:?}")))
    }

    /// The size of a volume or snapshot `backend` holds and what its driver records about it, for adopting it;
    /// NOT_FOUND when it holds none of that id. One ember did not make is refused unless `allow_foreign`.
    async fn inspect(&self, backend: &str, kind: Kind, id: &uuid::Uuid, allow_foreign: bool) -> Result<(u64, Record)> {
        let b = self.backend(backend)?;
        let record = b
            .record(kind, id)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("{} {id} on backend {backend}", kind.noun())))?;
        if record.foreign && !allow_foreign {
            return Err(AgentError::FailedPrecondition(format!(
                "{} {id} on backend {backend} was not made by ember (its LV lacks the `ember` tag); manage it with \
                 foreign (--foreign) to adopt it",
                kind.noun()
            )));
        }
        let path = b.path(kind, id);
        // Off the async threads: the file may be on an NFS mount.
        let size = tokio::task::spawn_blocking(move || crate::sparse::byte_len(&std::fs::File::open(&path)?))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
            .map_err(AgentError::io("reading the size"))?;
        Ok((size, record))
    }

    fn iqn(&self, volume: &uuid::Uuid) -> String {
        format!("{}:volume-{volume}", self.iqn_prefix)
    }

    /// Makes tgtd hold every export in the state file (after an agent or tgtd restart). Returns how many
    /// targets had to be re-created.
    pub async fn ensure_exports(&self) -> Result<usize> {
        let store = self.exports.lock().await;
        // A tgt target counts only whole: a LUN refresh that an agent stopped inside can leave it offline, or
        // without its LUN.
        let tgt_targets = self.tgt.targets().await?.into_iter();
        let mut present: Vec<String> =
            tgt_targets.filter(|t| t.ready && !t.backing.is_empty()).map(|t| t.iqn).collect();
        present.extend(self.lio.targets());
        let mut recreated = 0;
        for (volume, rec) in &store.exports {
            if present.contains(&rec.iqn) {
                continue;
            }
            self.apply_export(&checked_id("volume_id", volume)?, rec).await?;
            tracing::info!(volume_id = %volume, iqn = %rec.iqn, "export re-created");
            recreated += 1;
        }
        Ok(recreated)
    }

    /// Makes the backend's target match an export record (target, LUN, CHAP, ACLs).
    async fn apply_export(&self, id: &uuid::Uuid, rec: &ExportRecord) -> Result<()> {
        let backend = self.backend(&rec.backend)?;
        let backing = backend.path(Kind::Volume, id);
        match backend.target() {
            TargetKind::Tgt => {
                let spec =
                    TargetSpec { iqn: &rec.iqn, backing: &backing, username: &rec.username, password: &rec.password };
                self.tgt.ensure(&spec).await
            }
            TargetKind::Lio => {
                let initiators: Vec<String> = rec.initiators.iter().filter(|i| !i.is_empty()).cloned().collect();
                let name = backing.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let spec = LioSpec {
                    iqn: &rec.iqn,
                    name: &name,
                    device: &backing,
                    username: &rec.username,
                    password: &rec.password,
                    initiators: &initiators,
                };
                self.lio.ensure(&spec)
            }
        }
    }

    /// Removes a volume's target from the backend's target.
    async fn remove_target(&self, id: &uuid::Uuid, rec: &ExportRecord) -> Result<()> {
        let backend = self.backend(&rec.backend)?;
        match backend.target() {
            TargetKind::Tgt => self.tgt.remove(&rec.iqn, &rec.username).await,
            TargetKind::Lio => {
                let backing = backend.path(Kind::Volume, id);
                self.lio.remove(&rec.iqn, &backing.file_name().unwrap_or_default().to_string_lossy())
            }
        }
    }

    /// The portal initiators of `backend` connect to.
    fn portal(&self, backend: &Backend) -> String {
        match backend.target() {
            TargetKind::Tgt => self.portal.clone(),
            TargetKind::Lio => self.lio.portal.clone(),
        }
    }

    async fn export(&self, req: ExportVolumeRequest) -> Result<ExportVolumeResponse> {
        let id = checked_id("volume_id", &req.volume_id)?;
        let backend = self.backend(&req.backend)?;
        if !backend.exists(Kind::Volume, &id).await? {
            return Err(AgentError::NotFound(format!("volume {id}")));
        }
        if backend.target() == TargetKind::Lio && req.initiator.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "initiator",
                message: "an LIO export needs the initiator's IQN (its ACL)".into(),
            });
        }
        if req.chap_username.is_empty() || req.chap_password.len() < 12 {
            return Err(AgentError::InvalidArgument {
                field: "chap_password",
                message: "CHAP credentials are required (secret of 12 characters or more)".into(),
            });
        }
        let iqn = self.iqn(&id);
        let mut store = self.exports.lock().await;
        let stale = store
            .exports
            .get(&req.volume_id)
            .filter(|r| r.backend != req.backend || r.username != req.chap_username || r.password != req.chap_password);
        if let Some(stale) = stale.cloned() {
            // The coordinator's credentials are the truth: they change when a volume changes hands, and whoever
            // held the old ones must lose the target (its sessions go with it) rather than keep it.
            self.remove_target(&id, &stale).await?;
            store.exports.remove(&req.volume_id);
            store.save()?;
            tracing::warn!(volume_id = %id, "export with other CHAP credentials replaced");
        }
        let rec = store.exports.entry(req.volume_id.clone()).or_insert_with(|| ExportRecord {
            backend: req.backend.clone(),
            iqn: iqn.clone(),
            username: req.chap_username.clone(),
            password: req.chap_password.clone(),
            initiators: Default::default(),
        });
        rec.initiators.insert(req.initiator.clone());
        let rec = rec.clone();
        store.save()?;
        self.apply_export(&id, &rec).await?;
        tracing::info!(volume_id = %id, iqn = %iqn, initiator = %req.initiator, "exported");
        Ok(ExportVolumeResponse {
            driver_volume_type: "iscsi".into(),
            target_portal: self.portal(backend),
            target_iqn: iqn,
            target_lun: 1,
            ..Default::default()
        })
    }

    async fn unexport(&self, volume_id: &str, initiator: &str) -> Result<()> {
        let id = checked_id("volume_id", volume_id)?;
        let mut store = self.exports.lock().await;
        let Some(rec) = store.exports.get_mut(volume_id) else {
            // Nothing recorded; still make sure no target lingers from a crash before the record was saved.
            self.lio.remove(&self.iqn(&id), &format!("volume-{id}"))?;
            return self.tgt.remove(&self.iqn(&id), "").await;
        };
        if !initiator.is_empty() {
            rec.initiators.remove(initiator);
            if !rec.initiators.is_empty() {
                let rec = rec.clone();
                store.save()?;
                // tgt admits any initiator with the CHAP secret; LIO drops the departed initiator's ACL.
                return self.apply_export(&id, &rec).await;
            }
        }
        let rec = rec.clone();
        self.remove_target(&id, &rec).await?;
        store.exports.remove(volume_id);
        store.save()?;
        tracing::info!(volume_id = %id, "unexported");
        Ok(())
    }

    /// Reverts a volume to one of its snapshots in place (see `revert.rs`).
    async fn revert(&self, r: RevertVolumeRequest) -> Result<u64> {
        let id = checked_id("volume_id", &r.volume_id)?;
        let snap = checked_id("snapshot_id", &r.snapshot_id)?;
        let backend = self.backend(&r.backend)?;
        if !backend.exists(Kind::Volume, &id).await? {
            return Err(AgentError::NotFound(format!("volume {id}")));
        }
        let Some(record) = backend.record(Kind::Snapshot, &snap).await? else {
            return Err(AgentError::NotFound(format!("snapshot {snap}")));
        };
        if let Some(origin) = record.origin_volume.filter(|o| *o != r.volume_id) {
            return Err(AgentError::FailedPrecondition(format!("snapshot {snap} is of volume {origin}, not {id}")));
        }
        // Read before anything is written: where each side can hold data (a thin LV's mapped blocks).
        let volume_map = backend.data_map(Kind::Volume, &id).await?;
        let snapshot_map = backend.data_map(Kind::Snapshot, &snap).await?;
        let may_differ = backend.differing(&id, &snap).await?;
        let (volume_path, snapshot_path) = (backend.path(Kind::Volume, &id), backend.path(Kind::Snapshot, &snap));
        let done = tokio::task::spawn_blocking(move || {
            let open = |p: &std::path::Path| {
                std::fs::File::open(p).map_err(AgentError::io(format!("opening {}", p.display())))
            };
            let (volume, snapshot) = (open(&volume_path)?, open(&snapshot_path)?);
            let extents = |f: &std::fs::File, map: &Option<crate::backend::DataMap>| {
                data::extents_or_seek(f, map.as_ref().map(|m| m.extents.clone()))
            };
            let (volume_x, snapshot_x) = (extents(&volume, &volume_map)?, extents(&snapshot, &snapshot_map)?);
            let size = |f: &std::fs::File| crate::sparse::byte_len(f).map_err(AgentError::io("reading a size"));
            let volume_side = crate::revert::Side { file: &volume, size: size(&volume)?, extents: &volume_x };
            let snapshot_side = crate::revert::Side { file: &snapshot, size: size(&snapshot)?, extents: &snapshot_x };
            let target = ember_common::direct_io::DirectFile::open(&volume_path, true)
                .map_err(AgentError::io(format!("opening {}", volume_path.display())))?;
            crate::revert::revert(&target, &volume_side, &snapshot_side, volume_map.as_ref(), may_differ.as_deref())
        })
        .await
        .map_err(|e| AgentError::Io { context: "reverting".into(), source: std::io::Error::other(e) })??;
        let (compared, changed) = (done.compared, done.changed);
        tracing::info!(volume_id = %id, snapshot_id = %snap, compared, changed, "volume reverted to its snapshot");
        Ok(changed)
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<VolumeResult> {
        let id = checked_id("volume_id", &req.volume_id)?;
        if failpoint::armed("storage.create_volume") {
            return Err(AgentError::Io {
                context: "injected failure (EMBER_FAILPOINTS)".into(),
                source: std::io::Error::other("failpoint"),
            });
        }
        // Tests: `storage.freeze_in_create_volume` freezes the agent here, mid-call.
        failpoint::freeze_once("storage.freeze_in_create_volume");
        // Tests: `storage.abort_in_create_volume` kills the agent here, mid-call, as an operator's restart would.
        failpoint::abort_if_armed("storage.abort_in_create_volume");
        let backend = self.backend(&req.backend)?;
        if req.size_gb == 0 {
            return Err(AgentError::InvalidArgument { field: "size_gb", message: "must be at least 1".into() });
        }
        if !req.image.is_empty() {
            let source = crate::image::resolve(&req.image, &self.image_dirs)?;
            let (size, facts) = backend.create_from_image(&id, req.size_gb, &source).await?;
            tracing::info!(volume_id = %id, backend = %req.backend, size, format = %facts.format, "volume created from an image");
            return Ok(VolumeResult {
                volume_id: req.volume_id,
                size_bytes: size,
                image_format: facts.format,
                image_virtual_size: facts.virtual_size,
            });
        }
        let size = if !req.source_snapshot_id.is_empty() {
            let src = checked_id("source_snapshot_id", &req.source_snapshot_id)?;
            backend.create_from(Kind::Volume, &id, Kind::Snapshot, &src, Some(req.size_gb)).await?
        } else if !req.source_volume_id.is_empty() {
            let src = checked_id("source_volume_id", &req.source_volume_id)?;
            backend.create_from(Kind::Volume, &id, Kind::Volume, &src, Some(req.size_gb)).await?
        } else {
            backend.create_blank(&id, req.size_gb).await?
        };
        if let Some(luks) = &req.luks {
            // A copy brings its source's container along (header and key slots included).
            if !req.source_snapshot_id.is_empty() || !req.source_volume_id.is_empty() {
                return Err(AgentError::FailedPrecondition("LUKS formatting is offered for blank volumes".into()));
            }
            crate::luks::format(&backend.path(Kind::Volume, &id), size, luks, &self.state_dir).await?;
            tracing::info!(volume_id = %id, cipher = %luks.cipher_alg, "volume formatted as LUKS");
        }
        tracing::info!(volume_id = %id, backend = %req.backend, size, "volume created");
        Ok(VolumeResult { volume_id: req.volume_id, size_bytes: size, ..Default::default() })
    }
}

/// Backup agents (and other storage agents) may call only the data RPCs; everything else is the coordinator's.
fn only_coordinator<T>(req: &Request<T>) -> Result<(), Status> {
    match ember_common::identity::caller(req)?.role {
        ember_common::identity::Role::Coordinator => Ok(()),
        role => Err(Status::permission_denied(format!("role {role} may only call ReadVolume and WriteVolume"))),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<VolumeChunk, Status>> + Send>>;

/// The gRPC face of [`Storage`].
pub struct StorageService(pub Arc<Storage>);

#[tonic::async_trait]
impl StorageAgent for StorageService {
    type ReadVolumeStream = ChunkStream;

    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<VolumeResult>, Status> {
        only_coordinator(&req)?;
        let span = tracing::info_span!("create_volume", volume_id = %req.get_ref().volume_id);
        Ok(Response::new(self.0.create(req.into_inner()).instrument(span).await?))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let span = tracing::info_span!("delete_volume", volume_id = %r.volume_id);
        async {
            let id = checked_id("volume_id", &r.volume_id)?;
            let backend = self.0.backend(&r.backend)?;
            self.0.unexport(&r.volume_id, "").await?;
            backend.remove(Kind::Volume, &id).await?;
            tracing::info!("volume deleted");
            Ok::<_, AgentError>(())
        }
        .instrument(span)
        .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn extend_volume(&self, req: Request<ExtendVolumeRequest>) -> Result<Response<VolumeResult>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let id = checked_id("volume_id", &r.volume_id)?;
        let backend = self.0.backend(&r.backend)?;
        // Tests: `storage.freeze_in_extend_volume` freezes the agent here, mid-call.
        failpoint::freeze_once("storage.freeze_in_extend_volume");
        let size = backend.extend(&id, r.new_size_gb).await?;
        let store = self.0.exports.lock().await;
        // LIO's iblock reads the device size at each READ CAPACITY; tgt must re-create the LUN.
        if let Some(rec) = store.exports.get(&r.volume_id).filter(|_| backend.target() == TargetKind::Tgt) {
            self.0.tgt.refresh_lun(&rec.iqn, &backend.path(Kind::Volume, &id)).await?;
        }
        drop(store);
        tracing::info!(volume_id = %id, size, "volume extended");
        Ok(Response::new(VolumeResult { volume_id: r.volume_id, size_bytes: size, ..Default::default() }))
    }

    async fn revert_volume(&self, req: Request<RevertVolumeRequest>) -> Result<Response<RevertVolumeResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let span = tracing::info_span!("revert_volume", volume_id = %r.volume_id, snapshot_id = %r.snapshot_id);
        let bytes_changed = self.0.revert(r).instrument(span).await?;
        Ok(Response::new(RevertVolumeResponse { bytes_changed }))
    }

    async fn create_snapshot(&self, req: Request<CreateSnapshotRequest>) -> Result<Response<SnapshotResult>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let snap = checked_id("snapshot_id", &r.snapshot_id)?;
        let vol = checked_id("volume_id", &r.volume_id)?;
        let backend = self.0.backend(&r.backend)?;
        let size = backend.create_from(Kind::Snapshot, &snap, Kind::Volume, &vol, None).await?;
        tracing::info!(snapshot_id = %snap, volume_id = %vol, size, "snapshot created");
        Ok(Response::new(SnapshotResult { snapshot_id: r.snapshot_id, size_bytes: size, ..Default::default() }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let snap = checked_id("snapshot_id", &r.snapshot_id)?;
        if failpoint::armed("storage.delete_snapshot") {
            return Err(Status::internal("injected failure (EMBER_FAILPOINTS): delete_snapshot"));
        }
        self.0.backend(&r.backend)?.remove(Kind::Snapshot, &snap).await?;
        tracing::info!(snapshot_id = %snap, "snapshot deleted");
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn export_volume(&self, req: Request<ExportVolumeRequest>) -> Result<Response<ExportVolumeResponse>, Status> {
        only_coordinator(&req)?;
        Ok(Response::new(self.0.export(req.into_inner()).await?))
    }

    async fn unexport_volume(
        &self,
        req: Request<UnexportVolumeRequest>,
    ) -> Result<Response<UnexportVolumeResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        self.0.unexport(&r.volume_id, &r.initiator).await?;
        Ok(Response::new(UnexportVolumeResponse {}))
    }

    async fn inspect_volume(&self, req: Request<InspectVolumeRequest>) -> Result<Response<VolumeResult>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let id = checked_id("volume_id", &r.volume_id)?;
        let (size_bytes, record) = self.0.inspect(&r.backend, Kind::Volume, &id, r.allow_foreign).await?;
        if record.incomplete {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {id} on backend {} is a copy or restore that never finished; its data is partial",
                r.backend
            ))
            .into());
        }
        Ok(Response::new(VolumeResult { volume_id: r.volume_id, size_bytes, ..Default::default() }))
    }

    async fn inspect_snapshot(&self, req: Request<InspectSnapshotRequest>) -> Result<Response<SnapshotResult>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let id = checked_id("snapshot_id", &r.snapshot_id)?;
        let (size_bytes, record) = self.0.inspect(&r.backend, Kind::Snapshot, &id, r.allow_foreign).await?;
        let volume_id = record.origin_volume.unwrap_or_default();
        Ok(Response::new(SnapshotResult { snapshot_id: r.snapshot_id, size_bytes, volume_id }))
    }

    async fn adopt_foreign(&self, req: Request<AdoptForeignRequest>) -> Result<Response<AdoptForeignResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let id = checked_id("id", &r.id)?;
        let kind = if r.snapshot { Kind::Snapshot } else { Kind::Volume };
        self.0.backend(&r.backend)?.adopt_foreign(kind, &id).await?;
        Ok(Response::new(AdoptForeignResponse {}))
    }

    async fn list_resources(
        &self,
        req: Request<ListResourcesRequest>,
    ) -> Result<Response<ListResourcesResponse>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let mut out = ListResourcesResponse::default();
        for (name, backend) in &self.0.backends {
            if r.backend.is_empty() || r.backend == *name {
                let (v, s) = backend.list().await?;
                out.volume_ids.extend(v);
                out.snapshot_ids.extend(s);
                let (v, s) = backend.list_foreign().await?;
                out.foreign_volume_ids.extend(v);
                out.foreign_snapshot_ids.extend(s);
            }
        }
        Ok(Response::new(out))
    }

    async fn read_volume(&self, req: Request<ReadVolumeRequest>) -> Result<Response<Self::ReadVolumeStream>, Status> {
        let r = req.into_inner();
        let id = checked_id("id", &r.id)?;
        data::check_chunk_size(r.chunk_size)?;
        let known = data::parse_known(&r.known_digests)?;
        let backend = self.0.backend(&r.backend)?;
        let kind = if r.snapshot { Kind::Snapshot } else { Kind::Volume };
        let path = backend.path(kind, &id);
        if !backend.exists(kind, &id).await? {
            return Err(AgentError::NotFound(format!("{} {id}", if r.snapshot { "snapshot" } else { "volume" })).into());
        }
        // Where the data is, when the driver can tell (a thin LV's mapped blocks). Not knowing only costs
        // time: every byte is then read, and zero chunks are still skipped.
        let extents = match backend.data_map(kind, &id).await {
            Ok(map) => map.map(|m| m.extents),
            Err(e) => {
                tracing::warn!(volume_id = %id, error = %e, "data extents unknown; reading the whole device");
                None
            }
        };
        let mapped: Option<u64> = extents.as_ref().map(|x| x.iter().map(|(s, e)| e - s).sum());
        // A bounded queue: the reader's pace throttles the disk reads, and memory stays a few chunks.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let errors = tx.clone();
        let volume_id = id;
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            match data::stream_chunks(path, extents, r.chunk_size, known, tx) {
                Ok(()) => tracing::info!(%volume_id, ms = started.elapsed().as_millis() as u64, "volume data streamed"),
                Err(e) => {
                    let _ = errors.blocking_send(Err(e.into()));
                }
            }
        });
        match mapped {
            Some(mapped_bytes) => {
                tracing::info!(volume_id = %id, chunk_size = r.chunk_size, mapped_bytes, "streaming volume data (thin map)")
            }
            None => tracing::info!(volume_id = %id, chunk_size = r.chunk_size, "streaming volume data"),
        }
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn write_volume(
        &self,
        req: Request<tonic::Streaming<VolumeChunk>>,
    ) -> Result<Response<WriteVolumeResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("volume_id: empty stream"))?;
        let id = checked_id("volume_id", &first.volume_id)?;
        let backend = self.0.backend(&first.backend)?;
        let writer = ChunkWriter::open(backend, id, first.volume_size).await?;
        let mut next = Some(first);
        let (mut received, mut whole): (Result<(), Status>, bool) = (Ok(()), false);
        while let Some(chunk) = next {
            if whole {
                received = Err(Status::invalid_argument("last: a message followed the one marked last"));
                break;
            }
            whole = chunk.last;
            let carries_data = !chunk.data.is_empty();
            if !writer.send(chunk).await {
                break; // the writer stopped on an error; it is reported below
            }
            if carries_data {
                failpoint::abort_if_armed("storage.abort_in_write_volume");
            }
            next = match stream.message().await {
                Ok(n) => n,
                Err(e) => {
                    received = Err(e);
                    None
                }
            };
        }
        let written = writer.finish(backend, whole && received.is_ok()).await?;
        received?;
        tracing::info!(volume_id = %id, written, "volume data written");
        Ok(Response::new(WriteVolumeResponse { bytes_written: written }))
    }

    type CopyVolumeFromStream = tokio_stream::wrappers::ReceiverStream<Result<CopyVolumeProgress, Status>>;

    async fn copy_volume_from(
        &self,
        req: Request<CopyVolumeFromRequest>,
    ) -> Result<Response<Self::CopyVolumeFromStream>, Status> {
        only_coordinator(&req)?;
        let r = req.into_inner();
        let span = tracing::info_span!("copy_volume_from", volume_id = %r.volume_id, source = %r.source_endpoint);
        self.0.backend(&r.backend)?;
        if failpoint::armed("storage.copy_volume_from") {
            return Err(Status::internal("injected failure (EMBER_FAILPOINTS): copy_volume_from"));
        }
        // The copy runs on its own task and reports on the stream; a dropped stream (the coordinator gone) does
        // not stop it, and a repeated copy redoes it whole.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let storage = self.0.clone();
        tokio::spawn(
            async move {
                let backend = match storage.backend(&r.backend) {
                    Ok(b) => b,
                    Err(e) => return drop(tx.send(Err(e.into())).await),
                };
                let report = |p: CopyVolumeProgress| drop(tx.try_send(Ok(p)));
                let last = match copy::copy_from(backend, &storage.peers, r, report).await {
                    Ok(written) => Ok(CopyVolumeProgress { bytes_written: written, done: true, ..Default::default() }),
                    Err(e) => Err(e.into()),
                };
                let _ = tx.send(last).await;
            }
            .instrument(span),
        );
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
