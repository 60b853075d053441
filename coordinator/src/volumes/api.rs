//! `ember.v1.VolumeService`: validation, the status compare-and-swap, quota and the operation row, all in one
//! transaction; the agents are called afterwards by the operation's worker ([`super::flow`]).

use super::store::{self, VolumeRow};
use crate::auth::{owner_project, who};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::{encryption, failpoint, idempotency, operations, quota, validate, volume_types};
use ember_common::identity::{Identity, Role};
use ember_proto::v1::volume_service_server::VolumeService;
use ember_proto::v1::*;
use sqlx::SqliteConnection;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Largest volume, in GiB.
pub const MAX_SIZE_GB: u64 = 65536;
/// Statuses in which nothing more happens without a new request.
pub const FINAL_STATUSES: &[&str] =
    &["available", "in-use", "awaiting-transfer", "error", "error_deleting", "error_extending", "error_restoring"];

/// Statuses a volume can be deleted from: settled and not in use. A restore that failed onto a volume left it
/// `error_restoring`, with partial data; it is deleted like a volume whose create failed.
const DELETABLE: &[&str] = &["available", "error", "error_extending", "error_restoring", "error_deleting"];

/// The gRPC service.
pub struct Volumes {
    ctx: Arc<Ctx>,
}

impl Volumes {
    /// Serves volumes.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Volumes { ctx }
    }
}

fn check_metadata(field: &'static str, md: &HashMap<String, String>) -> Result<()> {
    if md.len() > 64 {
        return Err(Error::invalid(field, "at most 64 entries"));
    }
    for (k, v) in md {
        validate::spec_key(field, k)?;
        validate::spec_value(field, k, v)?;
    }
    Ok(())
}

/// A digest of the parameters of a create as the client gave them, to tell a repeat from a conflicting reuse
/// of its key. Taken from the request alone (not from what it resolves to), so that a repeat is recognised
/// before anything is looked up or held.
fn request_digest(req: &CreateVolumeRequest) -> String {
    let md: BTreeMap<_, _> = req.metadata.iter().collect();
    idempotency::digest(serde_json::json!([
        req.size_gb,
        req.name,
        req.description,
        req.volume_type,
        req.availability_zone,
        md,
        req.bootable,
        req.snapshot_id,
        req.source_volume_id,
        req.backup_id,
        req.image,
        req.scheduler_hints.as_ref().map(|h| (&h.same_host, &h.different_host))
    ]))
}

/// Gives new volume `id` its key: a fresh one for a blank volume of an encrypted type, its source's for a copy
/// of encrypted data. Refuses a copy of encrypted data into a plain type (it would read as noise), and plain
/// data into an encrypted type (it would not open).
async fn key_new_volume(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    vtype: &VolumeType,
    source: Option<&Source>,
    id: &str,
) -> Result<()> {
    let spec = encryption::spec(&vtype.extra_specs).map_err(|e| Error::invalid("volume_type", e))?;
    match (spec, source, source.and_then(|s| s.key_from.as_deref())) {
        (None, _, None) => Ok(()),
        (Some(spec), None, _) => encryption::create_key(conn, &ctx.master_key, id, &spec).await.map(drop),
        (Some(_), Some(_), Some(from)) => encryption::copy_key(conn, &ctx.master_key, from, id).await.map(drop),
        (None, _, Some(from)) => Err(Error::invalid(
            "volume_type",
            format!(
                "{from} holds encrypted data; a volume made from it needs an encrypted type too, not {}",
                vtype.name
            ),
        )),
        (Some(_), Some(_), None) => Err(Error::invalid(
            "volume_type",
            format!("type {} is encrypted: its volumes are made blank or from an encrypted volume", vtype.name),
        )),
    }
}

/// The type's extra spec `multiattach` says `<is> True`.
pub fn type_allows_multiattach(specs: &HashMap<String, String>) -> bool {
    specs.get("multiattach").map(|v| crate::scheduler::spec_matches("True", v)).unwrap_or(false)
}

struct Source {
    size_gb: u64,
    only: Option<String>,
    /// The volume whose data the new one copies, when that data is encrypted: the new volume takes its key.
    key_from: Option<String>,
}

async fn resolve_source(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    who: &Identity,
    req: &CreateVolumeRequest,
) -> Result<Option<Source>> {
    let given = [
        !req.snapshot_id.is_empty(),
        !req.source_volume_id.is_empty(),
        !req.backup_id.is_empty(),
        !req.image.is_empty(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(Error::invalid(
            "snapshot_id",
            "give at most one of snapshot_id, source_volume_id, backup_id, image",
        ));
    }
    if !req.backup_id.is_empty() {
        let b = crate::backups::visible(conn, who, &req.backup_id).await?;
        // The backup stays `restoring` (and so undeletable) until the volume is built.
        crate::backups::begin_restore(ctx, conn, &b).await?;
        let key_from = encryption::has_key(conn, &b.id).await?.then(|| b.id.clone());
        return Ok(Some(Source { size_gb: b.size_gb as u64, only: None, key_from }));
    }
    if !req.image.is_empty() {
        ember_common::image_source::check(&req.image).map_err(|e| Error::invalid("image", e))?;
        // The storage node fetches a URL from inside the fleet's network, and the answer lands in the volume:
        // a member could read whatever that node can reach (an internal service, a metadata endpoint).
        if ember_common::image_source::is_url(&req.image) && who.role != ember_common::identity::Role::Admin {
            return Err(Error::PermissionDenied(
                "image: only admins may fill a volume from a URL; members name an image in the storage nodes' \
                 image directories"
                    .into(),
            ));
        }
        if req.size_gb == 0 {
            return Err(Error::invalid("size_gb", "a volume from an image needs a size (at least the image's)"));
        }
        return Ok(None);
    }
    if !req.snapshot_id.is_empty() {
        let snap = crate::snapshots::visible(conn, who, &req.snapshot_id).await?;
        if snap.status != "available" {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} is {}; it must be available",
                snap.id, snap.status
            )));
        }
        let vol =
            store::find(conn, &snap.volume_id).await?.ok_or_else(|| Error::not_found("volume", &snap.volume_id))?;
        let key_from = encryption::has_key(conn, &vol.id).await?.then(|| vol.id.clone());
        let only = Some(format!("{}@{}", vol.host, vol.backend));
        return Ok(Some(Source { size_gb: snap.size_gb as u64, only, key_from }));
    }
    if !req.source_volume_id.is_empty() {
        crate::validate::uuid("source_volume_id", &req.source_volume_id)?;
        let src = store::visible(conn, who, &req.source_volume_id).await?;
        if !matches!(src.status.as_str(), "available" | "in-use") {
            return Err(Error::FailedPrecondition(format!(
                "source volume {} is {}; it must be available or in-use",
                src.id, src.status
            )));
        }
        let key_from = encryption::has_key(conn, &src.id).await?.then(|| src.id.clone());
        let only = Some(format!("{}@{}", src.host, src.backend));
        return Ok(Some(Source { size_gb: src.size_gb as u64, only, key_from }));
    }
    Ok(None)
}

impl Volumes {
    /// Validates and records a create, and starts its operation.
    pub async fn create(&self, who: &Identity, req: CreateVolumeRequest) -> Result<Volume> {
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let (shown, op) = self.create_in(&mut tx, who, req).await?;
        tx.commit().await?;
        if let Some(op) = op {
            failpoint::hit("create_volume.accepted");
            operations::spawn(&self.ctx, op);
        }
        Ok(shown)
    }

    /// Validates and records a create in `tx`, for a caller that records more in the same transaction (an
    /// instance booting from a snapshot, which so never leaves a boot volume behind when it is refused). Returns
    /// the volume and the id of its operation, to start once `tx` commits (none for a repeat of an earlier
    /// create).
    pub async fn create_in(
        &self,
        tx: &mut SqliteConnection,
        who: &Identity,
        req: CreateVolumeRequest,
    ) -> Result<(Volume, Option<String>)> {
        validate::text("name", &req.name, 255)?;
        validate::text("description", &req.description, 255)?;
        check_metadata("metadata", &req.metadata)?;
        idempotency::check_key(&req.idempotency_key)?;
        let project = owner_project(who, &req.project)?;
        if !req.snapshot_id.is_empty() {
            validate::uuid("snapshot_id", &req.snapshot_id)?;
        }
        if req.size_gb > MAX_SIZE_GB {
            return Err(Error::invalid("size_gb", format!("must be at most {MAX_SIZE_GB} GiB")));
        }
        // A repeat is answered before anything else: by now its source may be held (a backup `restoring`).
        let digest = request_digest(&req);
        if let Some(id) =
            idempotency::earlier(tx, idempotency::Table::Volumes, &project, &req.idempotency_key, &digest).await?
        {
            let v = store::find(tx, &id).await?.ok_or_else(|| Error::not_found("volume", &id))?;
            return Ok((store::to_proto(tx, &v).await?, None));
        }
        let type_id = type_id_for(tx, who, &req.volume_type).await?;
        let vtype = volume_types::load(tx, &type_id).await?;
        let source = resolve_source(&self.ctx, tx, who, &req).await?;
        let hints = super::affinity::accept(tx, who, req.scheduler_hints.as_ref()).await?;
        if !req.image.is_empty() && encryption::spec(&vtype.extra_specs).is_ok_and(|s| s.is_some()) {
            return Err(Error::invalid(
                "image",
                format!("type {} is encrypted; images fill plain volumes", vtype.name),
            ));
        }
        let size_gb = match (&source, req.size_gb) {
            (Some(s), 0) => s.size_gb,
            (Some(s), n) if n < s.size_gb => {
                return Err(Error::invalid("size_gb", format!("must be at least the source's {} GiB", s.size_gb)));
            }
            (None, 0) => return Err(Error::invalid("size_gb", "must be at least 1 GiB")),
            (_, n) => n,
        };
        if !req.availability_zone.is_empty() && !crate::pools::zones(&self.ctx).await?.contains(&req.availability_zone)
        {
            return Err(Error::invalid(
                "availability_zone",
                format!("{:?} is not a zone with storage", req.availability_zone),
            ));
        }
        check_new_size(&self.ctx, tx, &project, &vtype, "size_gb", size_gb).await?;
        self.ctx.quota.consume(tx, &project, &quota::volume_deltas(&vtype.name, size_gb as i64)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        key_new_volume(&self.ctx, tx, &vtype, source.as_ref(), &id).await?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO volumes (id, project, name, description, size_gb, status, volume_type_id, availability_zone, \
             metadata, bootable, multiattach, source_snapshot_id, source_volume_id, source_backup_id, idempotency_key, \
             request_digest, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&project)
        .bind(&req.name)
        .bind(&req.description)
        .bind(size_gb as i64)
        .bind(&type_id)
        .bind(&req.availability_zone)
        .bind(serde_json::to_string(&req.metadata)?)
        .bind(req.bootable as i64)
        .bind(type_allows_multiattach(&vtype.extra_specs) as i64)
        .bind(&req.snapshot_id)
        .bind(&req.source_volume_id)
        .bind(&req.backup_id)
        .bind(idempotency::column(&req.idempotency_key))
        .bind(&digest)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let only = source.and_then(|s| s.only);
        let payload = serde_json::json!({ "tried": [], "only": only, "image": req.image, "hints": hints });
        let op = operations::insert(tx, "create_volume", "volume", &id, "accepted", payload).await?;
        let v = store::find(tx, &id).await?.ok_or_else(|| Error::not_found("volume", &id))?;
        tracing::info!(volume_id = %id, project = %project, size_gb, volume_type = %vtype.name, "volume create accepted");
        Ok((store::to_proto(tx, &v).await?, Some(op)))
    }

    async fn list(&self, who: &Identity, req: &ListVolumesRequest) -> Result<ListVolumesResponse> {
        let project = match who.role {
            Role::Admin => req.project.clone(),
            _ => who.project.clone().unwrap_or_default(),
        };
        let (host, backend) = match req.pool.as_str() {
            "" => ("", ""),
            _ if who.role != Role::Admin => {
                return Err(Error::PermissionDenied("pool: only admins may list volumes by pool".into()));
            }
            pool => super::manage::parse_pool(pool)?,
        };
        let page = crate::paging::Page::of(req.page.as_ref())?;
        let mut conn = self.ctx.db.acquire().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(store::select_sql(
            "WHERE (?1 = '' OR v.project = ?1) AND (?2 = '' OR v.status = ?2) AND (?3 = '' OR v.name = ?3) \
             AND (?7 = '' OR (v.host = ?7 AND v.backend = ?8)) \
             AND (v.created_at, v.id) > (?4, ?5) ORDER BY v.created_at, v.id LIMIT ?6",
        )))
        .bind(&project)
        .bind(&req.status)
        .bind(&req.name)
        .bind(page.after_ts)
        .bind(&page.after_id)
        .bind(page.limit())
        .bind(host)
        .bind(backend)
        .fetch_all(&mut *conn)
        .await?;
        let mut rows: Vec<VolumeRow> = rows.iter().map(store::from_row).collect::<Result<_>>()?;
        let next = page.cut(&mut rows, |v| (v.created_at, v.id.as_str()));
        let mut volumes = Vec::new();
        for v in &rows {
            volumes.push(store::to_proto(&mut conn, v).await?);
        }
        Ok(ListVolumesResponse { volumes, page: Some(next) })
    }

    async fn update(&self, who: &Identity, req: UpdateVolumeRequest) -> Result<Volume> {
        if let Some(n) = &req.name {
            validate::text("name", n, 255)?;
        }
        if let Some(d) = &req.description {
            validate::text("description", d, 255)?;
        }
        check_metadata("set_metadata", &req.set_metadata)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let mut v = store::visible(&mut tx, who, &req.id).await?;
        if req.read_only.is_some_and(|ro| ro != v.read_only) && v.status != "available" {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}; its read-only flag changes only while it is available",
                v.id, v.status
            )));
        }
        v.metadata.extend(req.set_metadata.clone());
        for k in &req.unset_metadata {
            v.metadata.remove(k);
        }
        if v.metadata.len() > 64 {
            return Err(Error::invalid("set_metadata", "at most 64 entries"));
        }
        sqlx::query(
            "UPDATE volumes SET name = ?, description = ?, bootable = ?, read_only = ?, metadata = ?, updated_at = ? \
             WHERE id = ?",
        )
        .bind(req.name.as_ref().unwrap_or(&v.name))
        .bind(req.description.as_ref().unwrap_or(&v.description))
        .bind(req.bootable.unwrap_or(v.bootable) as i64)
        .bind(req.read_only.unwrap_or(v.read_only) as i64)
        .bind(serde_json::to_string(&v.metadata)?)
        .bind(now_ms())
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
        let v = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &req.id))?;
        let shown = store::to_proto(&mut tx, &v).await?;
        tx.commit().await?;
        Ok(shown)
    }

    async fn extend(&self, who: &Identity, req: ExtendVolumeRequest) -> Result<Volume> {
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let v = store::visible(&mut tx, who, &req.id).await?;
        if req.new_size_gb <= v.size_gb as u64 {
            return Err(Error::invalid("new_size_gb", format!("must be larger than the current {} GiB", v.size_gb)));
        }
        if req.new_size_gb > MAX_SIZE_GB {
            return Err(Error::invalid("new_size_gb", format!("must be at most {MAX_SIZE_GB} GiB")));
        }
        let vtype = volume_types::load(&mut tx, &v.volume_type_id).await?;
        check_new_size(&self.ctx, &mut tx, &v.project, &vtype, "new_size_gb", req.new_size_gb).await?;
        // A failed extend leaves the volume as it was (the agent refused it): asking again is how it is retried.
        // An attached volume grows under its guests, which are told (Cinder's extend of in-use volumes).
        let from = ["available", "in-use", "error_extending"];
        if !store::transition(&mut tx, &v.id, &from, "extending", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}; extend needs available, in-use or error_extending",
                v.id, v.status
            )));
        }
        let delta = req.new_size_gb as i64 - v.size_gb;
        let deltas = extend_deltas(&v.volume_type_name, delta);
        self.ctx.quota.reserve(&mut tx, &v.project, &deltas).await?;
        let payload = serde_json::json!({ "new_size_gb": req.new_size_gb, "delta": delta });
        let op = operations::insert(&mut tx, "extend_volume", "volume", &v.id, "extending", payload).await?;
        let v = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &req.id))?;
        let shown = store::to_proto(&mut tx, &v).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(shown)
    }

    pub(crate) async fn delete(&self, who: &Identity, id: &str, cascade: bool) -> Result<()> {
        validate::uuid("id", id)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let Some(v) = store::find(&mut tx, id).await? else {
            return Ok(()); // already gone
        };
        if !crate::auth::can_see(who, &v.project) {
            return Err(Error::not_found("volume", id));
        }
        if v.status == "deleting" {
            return Ok(());
        }
        let snapshots: Vec<(String, String)> =
            sqlx::query_as("SELECT id, status FROM snapshots WHERE volume_id = ? ORDER BY created_at")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        if !snapshots.is_empty() && !cascade {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} has {} snapshot(s); delete them first, or delete with cascade",
                snapshots.len()
            )));
        }
        let attachments: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM attachments WHERE volume_id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if attachments > 0 {
            return Err(Error::FailedPrecondition(format!("volume {id} is attached; detach it first")));
        }
        // A forced backup of an in-use volume reads a temporary snapshot of it and leaves the volume in-use, so
        // a detach does not wait for it; the delete does, as the snapshot lives and dies with its volume.
        if let Some(backup) = store::backup_in_progress(&mut tx, id).await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is being backed up (backup {backup}); delete it when the backup ends"
            )));
        }
        if !store::transition(&mut tx, id, DELETABLE, "deleting", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is {}; delete needs {}",
                v.status,
                DELETABLE.join(", ")
            )));
        }
        crate::snapshots::start_cascade(&mut tx, id, &snapshots).await?;
        let payload = serde_json::json!({ "cascade": cascade });
        let op = operations::insert(&mut tx, "delete_volume", "volume", id, "deleting", payload).await?;
        tx.commit().await?;
        failpoint::hit("delete_volume.accepted");
        operations::spawn(&self.ctx, op);
        Ok(())
    }
}

/// The quota deltas of growing a volume by `delta` GiB.
pub fn extend_deltas(type_name: &str, delta: i64) -> Vec<quota::Delta> {
    quota::volume_deltas(type_name, delta).into_iter().filter(|d| d.resource.starts_with("gigabytes")).collect()
}

/// Checks a size a volume is to have (`field`, GiB) against its type's bounds and its project's
/// `per_volume_gigabytes`.
async fn check_new_size(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    project: &str,
    vtype: &VolumeType,
    field: &'static str,
    size_gb: u64,
) -> Result<()> {
    volume_types::check_size(vtype, field, size_gb)?;
    ctx.quota.check_volume_size(conn, project, field, size_gb).await
}

type VolumeStream = Pin<Box<dyn Stream<Item = Result<Volume, Status>> + Send>>;

#[tonic::async_trait]
impl VolumeService for Volumes {
    type WatchVolumeStream = VolumeStream;

    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.create(&who, req.into_inner()).await?))
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        let v = store::visible(&mut conn, &who, &req.get_ref().id).await?;
        Ok(Response::new(store::to_proto(&mut conn, &v).await?))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.list(&who, req.get_ref()).await?))
    }

    async fn update_volume(&self, req: Request<UpdateVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.update(&who, req.into_inner()).await?))
    }

    async fn revert_volume(&self, req: Request<RevertVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::revert::revert(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn retype_volume(&self, req: Request<RetypeVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::retype::retype(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn migrate_volume(&self, req: Request<MigrateVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::migrate::migrate(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn extend_volume(&self, req: Request<ExtendVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.extend(&who, req.into_inner()).await?))
    }

    async fn manage_volume(&self, req: Request<ManageVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::manage::manage(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn list_manageable(
        &self,
        req: Request<ListManageableRequest>,
    ) -> Result<Response<ListManageableResponse>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::manageable::list(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn unmanage_volume(&self, req: Request<UnmanageVolumeRequest>) -> Result<Response<Volume>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::manage::unmanage(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let who = who(&req)?;
        if req.get_ref().forget {
            super::manage::forget(&self.ctx, &who, &req.get_ref().id).await?;
        } else {
            self.delete(&who, &req.get_ref().id, req.get_ref().cascade).await?;
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn watch_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<Self::WatchVolumeStream>, Status> {
        let who = who(&req)?;
        let id = req.into_inner().id;
        {
            let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
            store::visible(&mut conn, &who, &id).await?;
        }
        let db = self.ctx.db.clone();
        let mut changes = self.ctx.changes.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = i64::MIN;
            loop {
                let current = match db.acquire().await {
                    Ok(mut conn) => match store::find(&mut conn, &id).await {
                        // Transferred to another project since the watch began: it is gone for this caller.
                        Ok(Some(v)) if !crate::auth::can_see(&who, &v.project) => None,
                        Ok(Some(v)) if v.updated_at != last => {
                            last = v.updated_at;
                            let done = FINAL_STATUSES.contains(&v.status.as_str());
                            let shown = store::to_proto(&mut conn, &v).await.map_err(Status::from);
                            if tx.send(shown).await.is_err() || done {
                                return;
                            }
                            Some(())
                        }
                        Ok(Some(_)) => Some(()),
                        Ok(None) => None,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                if current.is_none() {
                    return; // deleted
                }
                // Wake on a committed change to this volume; re-read at least every second regardless.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match changes.recv().await {
                            Ok(changed) if changed == id => return,
                            Ok(_) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(_) => std::future::pending::<()>().await,
                        }
                    }
                })
                .await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn initialize_connection(
        &self,
        req: Request<InitializeConnectionRequest>,
    ) -> Result<Response<ConnectionInfo>, Status> {
        let who = who(&req)?;
        Ok(Response::new(super::exports::initialize(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn terminate_connection(
        &self,
        req: Request<TerminateConnectionRequest>,
    ) -> Result<Response<TerminateConnectionResponse>, Status> {
        let who = who(&req)?;
        super::exports::terminate(&self.ctx, &who, req.into_inner()).await?;
        Ok(Response::new(TerminateConnectionResponse {}))
    }
}

/// The id of volume type `name` (a name or an id; empty: the default type, which is public) as `who` may use it.
pub(crate) async fn type_id_for(conn: &mut SqliteConnection, who: &Identity, name: &str) -> Result<String> {
    if name.is_empty() {
        return sqlx::query_scalar("SELECT id FROM volume_types WHERE is_default = 1")
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::FailedPrecondition("no default volume type; name one in volume_type".into()));
    }
    crate::type_access::resolve_for(conn, who, name).await.map_err(|e| match e {
        Error::NotFound { id, .. } => Error::NotFound { kind: "volume_type", id },
        other => other,
    })
}
