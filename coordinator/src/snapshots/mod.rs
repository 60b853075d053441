//! Snapshots: `ember.v1.SnapshotService` and the durable create/delete flows. A snapshot lives on its
//! volume's backend; volumes made from it are placed there too. Adopting one the coordinator has no record
//! of is [`manage`]; deleting them with their volume, [`cascade`].

pub mod cascade;
pub mod manage;

pub use cascade::{Cascade, delete_all_of, start_cascade};

use crate::agents::transient;
use crate::auth::{can_see, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::volumes::store as volumes;
use crate::{failpoint, idempotency, quota, validate};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::snapshot_service_server::SnapshotService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// A snapshot as stored.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    /// Id.
    pub id: String,
    /// Project.
    pub project: String,
    /// Volume.
    pub volume_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// GiB.
    pub size_gb: i64,
    /// Status.
    pub status: String,
    /// Reason for an error.
    pub status_reason: String,
    /// Created.
    pub created_at: i64,
}

const SELECT: &str =
    "SELECT id, project, volume_id, name, description, size_gb, status, status_reason, created_at FROM snapshots";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> SnapshotRow {
    SnapshotRow {
        id: r.get(0),
        project: r.get(1),
        volume_id: r.get(2),
        name: r.get(3),
        description: r.get(4),
        size_gb: r.get(5),
        status: r.get(6),
        status_reason: r.get(7),
        created_at: r.get(8),
    }
}

fn to_proto(s: &SnapshotRow) -> Snapshot {
    Snapshot {
        id: s.id.clone(),
        project: s.project.clone(),
        volume_id: s.volume_id.clone(),
        name: s.name.clone(),
        description: s.description.clone(),
        size_gb: s.size_gb as u64,
        status: s.status.clone(),
        status_reason: s.status_reason.clone(),
        created_at: Some(timestamp(s.created_at)),
    }
}

async fn find(conn: &mut SqliteConnection, id: &str) -> Result<Option<SnapshotRow>> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = ?")))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(from_row))
}

/// The snapshot as `who` may see it (NOT_FOUND otherwise).
pub async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<SnapshotRow> {
    validate::uuid("snapshot_id", id)?;
    match find(conn, id).await? {
        Some(s) if can_see(who, &s.project) => Ok(s),
        _ => Err(Error::not_found("snapshot", id)),
    }
}

/// Moves snapshot `id` from one of `from` to `to`; false when it was in none of them.
pub(crate) async fn transition(
    conn: &mut SqliteConnection,
    id: &str,
    from: &[&str],
    to: &str,
    reason: &str,
) -> Result<bool> {
    crate::status::transition(conn, crate::status::Table::Snapshots, id, from, to, reason).await
}

/// Refuses to delete snapshot `id` while a volume is being created from it.
pub(crate) async fn refuse_if_building_from(conn: &mut SqliteConnection, id: &str) -> Result<()> {
    let building: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE source_snapshot_id = ? AND status = 'creating'")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
    if building > 0 {
        return Err(Error::FailedPrecondition(format!("snapshot {id} is the source of a volume being created")));
    }
    Ok(())
}

/// Removes snapshot `id`'s row and gives back the quota it counted against `project` (its volume is of type
/// `type_name`): when it is deleted, let go of, or forgotten with its volume.
pub async fn remove_record(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    id: &str,
    project: &str,
    type_name: &str,
    size_gb: i64,
) -> Result<()> {
    // Only the call that removed the row gives its quota back, however many race to remove it.
    let removed = sqlx::query("DELETE FROM snapshots WHERE id = ?").bind(id).execute(&mut *conn).await?;
    if removed.rows_affected() == 0 {
        return Ok(());
    }
    ctx.quota.release(conn, project, &quota::snapshot_deltas(type_name, size_gb)).await
}

/// The sizes of volume `volume_id`'s snapshots, for an action that moves their quota with the volume's (a transfer,
/// a retype): refused, naming the snapshot and what to do (`then`), if one is in a status `refused` names.
pub async fn sizes_unless(
    conn: &mut SqliteConnection,
    volume_id: &str,
    refused: impl Fn(&str) -> bool,
    then: &str,
) -> Result<Vec<i64>> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, status, size_gb FROM snapshots WHERE volume_id = ? ORDER BY id")
            .bind(volume_id)
            .fetch_all(&mut *conn)
            .await?;
    if let Some((id, status, _)) = rows.iter().find(|(_, status, _)| refused(status)) {
        return Err(Error::FailedPrecondition(format!("snapshot {id} of volume {volume_id} is {status}; {then}")));
    }
    Ok(rows.into_iter().map(|(_, _, size)| size).collect())
}

/// Holds an available snapshot `backing-up` while a backup reads it, so that it cannot be deleted meanwhile.
pub async fn begin_backup(conn: &mut SqliteConnection, s: &SnapshotRow) -> Result<()> {
    if !transition(conn, &s.id, &["available"], "backing-up", "").await? {
        return Err(Error::FailedPrecondition(format!("snapshot {} is {}; a backup needs available", s.id, s.status)));
    }
    Ok(())
}

/// Gives a snapshot back after the backup that read it ended, whichever way.
pub async fn end_backup(conn: &mut SqliteConnection, id: &str) -> Result<()> {
    transition(conn, id, &["backing-up"], "available", "").await?;
    Ok(())
}

/// The gRPC service.
pub struct Snapshots {
    ctx: Arc<Ctx>,
}

impl Snapshots {
    /// Serves snapshots.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Snapshots { ctx }
    }

    async fn create(&self, who: &Identity, req: CreateSnapshotRequest) -> Result<Snapshot> {
        validate::text("name", &req.name, 255)?;
        validate::text("description", &req.description, 255)?;
        validate::uuid("volume_id", &req.volume_id)?;
        idempotency::check_key(&req.idempotency_key)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        let digest = idempotency::digest(serde_json::json!([req.volume_id, req.name, req.description, req.force]));
        let key = &req.idempotency_key;
        if let Some(id) = idempotency::earlier(&mut tx, idempotency::Table::Snapshots, &v.project, key, &digest).await?
        {
            let s = find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("snapshot", &id))?;
            return Ok(to_proto(&s));
        }
        match v.status.as_str() {
            "available" => {}
            "in-use" if req.force => {}
            "in-use" => {
                return Err(Error::FailedPrecondition(format!("volume {} is in-use; pass force to snapshot it", v.id)));
            }
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is {other}; a snapshot needs available",
                    v.id
                )));
            }
        }
        self.ctx.quota.consume(&mut tx, &v.project, &quota::snapshot_deltas(&v.volume_type_name, v.size_gb)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO snapshots (id, project, volume_id, name, description, size_gb, status, idempotency_key, \
             request_digest, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&v.project)
        .bind(&v.id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(v.size_gb)
        .bind(idempotency::column(key))
        .bind(&digest)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // Status is the lock: re-check the volume did not move while we inserted.
        let still: Option<String> =
            sqlx::query_scalar("SELECT status FROM volumes WHERE id = ?").bind(&v.id).fetch_optional(&mut *tx).await?;
        if still.as_deref() != Some(v.status.as_str()) {
            return Err(Error::FailedPrecondition(format!("volume {} changed state; try again", v.id)));
        }
        let op =
            operations::insert(&mut tx, "create_snapshot", "snapshot", &id, "creating", serde_json::json!({})).await?;
        let s = find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("snapshot", &id))?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(to_proto(&s))
    }

    async fn update(&self, who: &Identity, req: UpdateSnapshotRequest) -> Result<Snapshot> {
        validate::uuid("id", &req.id)?;
        if let Some(n) = &req.name {
            validate::text("name", n, 255)?;
        }
        if let Some(d) = &req.description {
            validate::text("description", d, 255)?;
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let s = visible(&mut tx, who, &req.id).await?;
        sqlx::query("UPDATE snapshots SET name = ?, description = ?, updated_at = ? WHERE id = ?")
            .bind(req.name.as_ref().unwrap_or(&s.name))
            .bind(req.description.as_ref().unwrap_or(&s.description))
            .bind(now_ms())
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
        let s = find(&mut tx, &s.id).await?.ok_or_else(|| Error::not_found("snapshot", &req.id))?;
        tx.commit().await?;
        Ok(to_proto(&s))
    }

    async fn delete(&self, who: &Identity, id: &str) -> Result<()> {
        validate::uuid("id", id)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let Some(s) = find(&mut tx, id).await? else { return Ok(()) };
        if !can_see(who, &s.project) {
            return Err(Error::not_found("snapshot", id));
        }
        if s.status == "deleting" {
            return Ok(());
        }
        refuse_if_building_from(&mut tx, id).await?;
        if !transition(&mut tx, id, &["available", "error", "error_deleting"], "deleting", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} is {}; delete needs available, error or error_deleting",
                s.status
            )));
        }
        let op =
            operations::insert(&mut tx, "delete_snapshot", "snapshot", id, "deleting", serde_json::json!({})).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(())
    }
}

/// Create flow: the agent copies the volume's file → available.
pub async fn create_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(s) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("snapshot no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    let vol = volumes::find(&mut conn, &s.volume_id).await?.ok_or_else(|| Error::not_found("volume", &s.volume_id))?;
    drop(conn);
    let mut client = ctx.agents.storage(&vol.host).await?;
    let call = client
        .create_snapshot(agent::CreateSnapshotRequest {
            snapshot_id: s.id.clone(),
            volume_id: vol.id.clone(),
            backend: vol.backend.clone(),
        })
        .await;
    let mut tx = crate::db::write(&ctx.db).await?;
    match call {
        Ok(_) => {
            transition(&mut tx, &s.id, &["creating"], "available", "").await?;
            operations::finish(&mut tx, &op, None).await?;
        }
        Err(status) if transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
        Err(status) => {
            let reason = format!("snapshot failed on {}@{}: {}", vol.host, vol.backend, status.message());
            transition(&mut tx, &s.id, &["creating"], "error", &reason).await?;
            operations::finish(&mut tx, &op, Some(&reason)).await?;
        }
    }
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// Delete flow: the agent removes the file → row and quota gone.
pub async fn delete_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(s) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    let vol = volumes::find(&mut conn, &s.volume_id).await?.ok_or_else(|| Error::not_found("volume", &s.volume_id))?;
    drop(conn);
    let mut client = ctx.agents.storage(&vol.host).await?;
    let call = client
        .delete_snapshot(agent::DeleteSnapshotRequest { snapshot_id: s.id.clone(), backend: vol.backend.clone() })
        .await;
    let mut tx = crate::db::write(&ctx.db).await?;
    match call {
        Ok(_) => {
            remove_record(ctx, &mut tx, &s.id, &s.project, &vol.volume_type_name, s.size_gb).await?;
            operations::finish(&mut tx, &op, None).await?;
            tracing::info!(snapshot_id = %s.id, "snapshot deleted");
        }
        Err(status) if transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
        Err(status) => {
            let reason = format!("snapshot delete failed on {}@{}: {}", vol.host, vol.backend, status.message());
            transition(&mut tx, &s.id, &["deleting"], "error_deleting", &reason).await?;
            operations::finish(&mut tx, &op, Some(&reason)).await?;
        }
    }
    tx.commit().await?;
    failpoint::hit("delete_snapshot.done");
    Ok(Outcome::Finished)
}

#[tonic::async_trait]
impl SnapshotService for Snapshots {
    async fn create_snapshot(&self, req: Request<CreateSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.create(&who, req.into_inner()).await?))
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(to_proto(&visible(&mut conn, &who, &req.get_ref().id).await?)))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let project = if who.role == Role::Admin { String::new() } else { who.project.clone().unwrap_or_default() };
        let page = crate::paging::Page::of(r.page.as_ref())?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE (?1 = '' OR project = ?1) AND (?2 = '' OR volume_id = ?2) AND (?3 = '' OR status = ?3) \
             AND (created_at, id) > (?4, ?5) ORDER BY created_at, id LIMIT ?6"
        )))
        .bind(&project)
        .bind(&r.volume_id)
        .bind(&r.status)
        .bind(page.after_ts)
        .bind(&page.after_id)
        .bind(page.limit())
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        let mut rows: Vec<_> = rows.iter().map(from_row).collect();
        let next = page.cut(&mut rows, |s| (s.created_at, s.id.as_str()));
        Ok(Response::new(ListSnapshotsResponse { snapshots: rows.iter().map(to_proto).collect(), page: Some(next) }))
    }

    async fn update_snapshot(&self, req: Request<UpdateSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.update(&who, req.into_inner()).await?))
    }

    async fn unmanage_snapshot(
        &self,
        req: Request<UnmanageSnapshotRequest>,
    ) -> Result<Response<UnmanageSnapshotResponse>, Status> {
        let who = who(&req)?;
        manage::unmanage(&self.ctx, &who, req.into_inner()).await?;
        Ok(Response::new(UnmanageSnapshotResponse {}))
    }

    async fn manage_snapshot(&self, req: Request<ManageSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let who = who(&req)?;
        Ok(Response::new(manage::manage(&self.ctx, &who, req.into_inner()).await?))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let who = who(&req)?;
        self.delete(&who, &req.get_ref().id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }
}
