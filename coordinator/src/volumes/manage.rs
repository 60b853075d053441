//! Adopting a volume a storage backend holds that the coordinator has no record of, as Cinder's `manage` does:
//! after the database was lost or replaced, the orphan sweeper leaves such volumes alone and reports them, and
//! an admin brings each back under its own id, into a project, counted against that project's quotas. And the
//! reverse, Cinder's `unmanage`: ember lets go of a volume and leaves its data where it is (to hand it to
//! another system, or to manage it again into another project). And, for a storage node lost for good, forgetting
//! a volume without it.

use super::api::type_id_for;
use super::store;
use crate::auth::owner_project;
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::{quota, validate, volume_types};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{ManageVolumeRequest, UnmanageVolumeRequest, Volume};
use std::sync::Arc;

/// `host@backend`, each part non-empty.
pub(crate) fn parse_pool(pool: &str) -> Result<(&str, &str)> {
    match pool.split_once('@') {
        Some((host, backend)) if !host.is_empty() && !backend.is_empty() && !backend.contains('@') => {
            Ok((host, backend))
        }
        _ => Err(Error::invalid("pool", format!("{pool:?} is not host@backend"))),
    }
}

/// Pool `name` (`host@backend`) as the scheduler sees it; FAILED_PRECONDITION unless it is up and enabled, as
/// adopting from it, or listing what it holds, needs its agent.
pub(crate) async fn up_pool(ctx: &Ctx, name: &str) -> Result<crate::scheduler::PoolState> {
    let (host, backend) = parse_pool(name)?;
    crate::pools::candidates(ctx)
        .await?
        .into_iter()
        .find(|p| p.host == host && p.backend == backend)
        .ok_or_else(|| Error::FailedPrecondition(format!("pool {name} is not up and enabled")))
}

/// Whole GiB in `bytes`, or `None` when it is not a whole number of them (ember makes volumes in whole GiB).
pub(crate) fn whole_gib(bytes: u64) -> Option<u64> {
    (bytes > 0 && bytes.is_multiple_of(1 << 30)).then_some(bytes >> 30)
}

/// The error for an agent's refusal to inspect `kind` `id` on `pool`: NOT_FOUND when it holds none, else why
/// it would not (the agent is down, the data is partial).
pub(crate) fn refused_by_agent(kind: &'static str, id: &str, pool: &str, status: &tonic::Status) -> Error {
    match status.code() {
        tonic::Code::NotFound => Error::not_found(kind, format!("{id} on {pool}")),
        _ => Error::from_agent(&format!("asking {pool}"), status),
    }
}

/// Adopts volume `req.id` of pool `req.pool`: the agent must hold it, and no volume of that id may be known.
/// With `req.foreign`, an LV another system made (Cinder's, named the same way) is taken too: every check is
/// made first, in a transaction rolled back, so a refused manage changes nothing; then the agent tags the LV as
/// ember's, and the same transaction runs again and commits. (Should that second one fail, or the coordinator
/// stop in between, the LV is ember's and unknown: `manageable` lists it, and manage takes it.)
pub async fn manage(ctx: &Ctx, who: &Identity, req: ManageVolumeRequest) -> Result<Volume> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may manage a volume".into()));
    }
    let (host, backend) = parse_pool(&req.pool)?;
    validate::uuid("id", &req.id)?;
    validate::text("name", &req.name, 255)?;
    validate::text("description", &req.description, 255)?;
    let project = owner_project(who, &req.project)?;
    let pool = up_pool(ctx, &req.pool).await?;
    let mut conn = ctx.db.acquire().await?;
    if store::find(&mut conn, &req.id).await?.is_some() {
        return Err(Error::AlreadyExists(format!("volume {} is already known", req.id)));
    }
    drop(conn);
    let mut storage = ctx.agents.storage(host).await?;
    let inspect = agent::InspectVolumeRequest {
        volume_id: req.id.clone(),
        backend: backend.to_string(),
        allow_foreign: req.foreign,
    };
    let held = storage
        .inspect_volume(inspect)
        .await
        .map_err(|s| refused_by_agent("volume", &req.id, &req.pool, &s))?
        .into_inner();
    let size_gb = whole_gib(held.size_bytes).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume {} holds {} bytes, not a whole number of GiB; ember cannot size it",
            req.id, held.size_bytes
        ))
    })?;
    let adopted = Adopted { project, size_gb, availability_zone: pool.availability_zone };
    if req.foreign {
        record_managed(ctx, who, &req, &adopted).await?.0.rollback().await?; // the checks alone
        let adopt = agent::AdoptForeignRequest { id: req.id.clone(), backend: backend.to_string(), snapshot: false };
        storage.adopt_foreign(adopt).await.map_err(|s| refused_by_agent("volume", &req.id, &req.pool, &s))?;
    }
    let (tx, shown) = record_managed(ctx, who, &req, &adopted).await?;
    tx.commit().await?;
    tracing::warn!(volume_id = %req.id, pool = %req.pool, project = %adopted.project, size_gb, foreign = req.foreign, "volume managed (adopted)");
    Ok(shown)
}

/// What manage learnt of the volume it adopts.
struct Adopted {
    project: String,
    size_gb: u64,
    availability_zone: String,
}

/// Records adopted volume `req.id` in a write transaction, checked and counted against its project's quotas,
/// and returns the transaction, not yet committed, with the volume as it will be shown.
async fn record_managed(
    ctx: &Ctx,
    who: &Identity,
    req: &ManageVolumeRequest,
    adopted: &Adopted,
) -> Result<(crate::db::WriteTx, Volume)> {
    let (host, backend) = parse_pool(&req.pool)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    // Asked again under the write lock: two manages of one volume race here, and one of them loses.
    if store::find(&mut tx, &req.id).await?.is_some() {
        return Err(Error::AlreadyExists(format!("volume {} is already known", req.id)));
    }
    let type_id = type_id_for(&mut tx, who, &req.volume_type).await?;
    let vtype = volume_types::load(&mut tx, &type_id).await?;
    if crate::encryption::spec(&vtype.extra_specs).is_ok_and(|s| s.is_some()) {
        return Err(Error::invalid(
            "volume_type",
            format!("type {} is encrypted, and ember has no key for data it did not make", vtype.name),
        ));
    }
    let size_gb = adopted.size_gb as i64;
    ctx.quota.consume(&mut tx, &adopted.project, &quota::volume_deltas(&vtype.name, size_gb)).await?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO volumes (id, project, name, description, size_gb, status, volume_type_id, availability_zone, \
         host, backend, multiattach, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'available', ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&req.id)
    .bind(&adopted.project)
    .bind(&req.name)
    .bind(&req.description)
    .bind(size_gb)
    .bind(&type_id)
    .bind(&adopted.availability_zone)
    .bind(host)
    .bind(backend)
    .bind(super::api::type_allows_multiattach(&vtype.extra_specs) as i64)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    operations::record_done(&mut tx, "manage_volume", "volume", &req.id).await?;
    let v = store::find(&mut tx, &req.id).await?.ok_or_else(|| Error::not_found("volume", &req.id))?;
    let shown = store::to_proto(&mut tx, &v).await?;
    Ok((tx, shown))
}

/// Starts letting go of volume `req.id`: it must be `available`, with no snapshots and nothing being made from
/// it. The volume is `unmanaging` until [`unmanage_flow`] has removed its export and forgotten it.
pub async fn unmanage(ctx: &Arc<Ctx>, who: &Identity, req: UnmanageVolumeRequest) -> Result<Volume> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may unmanage a volume".into()));
    }
    validate::uuid("id", &req.id)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let v = store::find(&mut tx, &req.id).await?.ok_or_else(|| Error::not_found("volume", &req.id))?;
    let why = "its key stays with ember, and its data would be unreadable without it";
    crate::encryption::refuse_if_encrypted(&mut tx, &v.id, "unmanaged", why).await?;
    let (snapshots, sources) = store::snapshots_and_clones(&mut tx, &v.id).await?;
    if snapshots > 0 {
        return Err(Error::FailedPrecondition(format!(
            "volume {} has {snapshots} snapshot(s); unmanage or delete them first",
            v.id
        )));
    }
    if sources > 0 {
        return Err(Error::FailedPrecondition(format!("volume {} is the source of a volume being created", v.id)));
    }
    if !store::transition(&mut tx, &v.id, &["available"], "unmanaging", "").await? {
        return Err(Error::FailedPrecondition(format!("volume {} is {}; unmanage needs available", v.id, v.status)));
    }
    let op =
        operations::insert(&mut tx, "unmanage_volume", "volume", &v.id, "unmanaging", serde_json::json!({})).await?;
    let v = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &req.id))?;
    let shown = store::to_proto(&mut tx, &v).await?;
    tx.commit().await?;
    operations::spawn(ctx, op);
    Ok(shown)
}

/// Unmanage: the agent removes the volume's export, if any (idempotent), and keeps its data → row and quota
/// gone. The operation that stays on record is what tells the sweeper to leave the file alone.
pub async fn unmanage_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(v) = store::find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    let call = ctx
        .agents
        .storage(&v.host)
        .await?
        .unexport_volume(agent::UnexportVolumeRequest {
            volume_id: v.id.clone(),
            backend: v.backend.clone(),
            initiator: String::new(),
        })
        .await;
    let mut tx = crate::db::write(&ctx.db).await?;
    match call {
        Ok(_) => super::flow::forget(ctx, &mut tx, &v, "unmanaged").await?,
        Err(s) if crate::agents::transient(&s) => {
            return Ok(Outcome::Retry(format!("storage agent {}: {}", v.host, s.message())));
        }
        Err(s) => {
            // Still ember's, as it was: the export could not be removed, so the volume is not let go of.
            let reason = format!("unmanage failed on {}@{}: {}", v.host, v.backend, s.message());
            store::transition(&mut tx, &v.id, &["unmanaging"], "available", &reason).await?;
            operations::finish(&mut tx, &op, Some(&reason)).await?;
            tx.commit().await?;
            return Ok(Outcome::Finished);
        }
    }
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    tracing::warn!(volume_id = %v.id, pool = %format!("{}@{}", v.host, v.backend), "volume unmanaged; its data stays");
    Ok(Outcome::Finished)
}

/// Whether storage pool `host`@`backend` is served: its agent's heartbeats are recent and report the backend.
pub(crate) async fn pool_served(
    ctx: &Ctx,
    conn: &mut sqlx::SqliteConnection,
    host: &str,
    backend: &str,
) -> Result<bool> {
    let heartbeat: Option<i64> =
        sqlx::query_scalar("SELECT last_heartbeat FROM services WHERE role = 'storage' AND host = ? AND backend = ?")
            .bind(host)
            .bind(backend)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(heartbeat.is_some_and(|hb| crate::fleet::is_up(hb, now_ms(), ctx.service_down_ms)))
}

/// Volume states whose operation fails by itself once the storage node cannot be reached, releasing what it
/// holds (a create fails once its agent is down; a backup or restore fails on the agent-to-agent stream).
const SETTLES_ALONE: [&str; 3] = ["creating", "backing-up", "restoring-backup"];

/// Ends the extends of volume `v` that wait for its lost node for ever, giving back the quota they reserved.
async fn end_extends(ctx: &Ctx, conn: &mut sqlx::SqliteConnection, v: &store::VolumeRow) -> Result<()> {
    let extends: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT id, payload, step FROM operations WHERE kind = 'extend_volume' AND resource_id = ? AND state = 'running'",
    )
    .bind(&v.id)
    .fetch_all(&mut *conn)
    .await?;
    for (op, payload, step) in extends {
        // Past `extending`, the reservation is committed: it is part of the volume's usage, released with it.
        if step == "extending" {
            let delta = serde_json::from_str::<serde_json::Value>(&payload)?["delta"].as_i64().unwrap_or(0);
            ctx.quota.rollback(conn, &v.project, &super::api::extend_deltas(&v.volume_type_name, delta)).await?;
        }
        sqlx::query("UPDATE operations SET state = 'failed', error = 'volume forgotten', updated_at = ? WHERE id = ?")
            .bind(now_ms())
            .bind(&op)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Removes the records of volume `id`, its snapshots and its attachments, and releases their quota, without its
/// storage node, which is lost for good: a delete would wait for it for ever. No agent is asked; the operations
/// still waiting on them end on their own when they find the records gone. The finished operations it records
/// tell the sweeper to leave the files alone, should the node come back.
pub async fn forget(ctx: &Ctx, who: &Identity, id: &str) -> Result<()> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may forget a volume (forget)".into()));
    }
    validate::uuid("id", id)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let Some(v) = store::find(&mut tx, id).await? else { return Ok(()) };
    let pool = format!("{}@{}", v.host, v.backend);
    if !v.host.is_empty() && pool_served(ctx, &mut tx, &v.host, &v.backend).await? {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is on {pool}, which is up; delete it without forget"
        )));
    }
    if SETTLES_ALONE.contains(&v.status.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is {}, which ends on its own now that {pool} is down; forget it then",
            v.status
        )));
    }
    if v.status == "extending" {
        end_extends(ctx, &mut tx, &v).await?;
    }
    let booting: Option<String> = sqlx::query_scalar("SELECT id FROM instances WHERE boot_volume_id = ? LIMIT 1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(instance) = booting {
        return Err(Error::FailedPrecondition(format!("instance {instance} boots from volume {id}; delete it first")));
    }
    let snapshots: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, size_gb FROM snapshots WHERE volume_id = ?").bind(id).fetch_all(&mut *tx).await?;
    for (snapshot, size_gb) in &snapshots {
        crate::snapshots::remove_record(ctx, &mut tx, snapshot, &v.project, &v.volume_type_name, *size_gb).await?;
        operations::record_done(&mut tx, "forget_snapshot", "snapshot", snapshot).await?;
    }
    let attachments = sqlx::query("DELETE FROM attachments WHERE volume_id = ?").bind(id).execute(&mut *tx).await?;
    crate::transfers::remove_for_volume(&mut tx, id).await?;
    super::flow::forget(ctx, &mut tx, &v, "forgotten").await?;
    operations::record_done(&mut tx, "forget_volume", "volume", id).await?;
    tx.commit().await?;
    tracing::warn!(
        volume_id = %id,
        %pool,
        snapshots = snapshots.len(),
        attachments = attachments.rows_affected(),
        "volume forgotten without its storage node"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_sizes() {
        assert_eq!(parse_pool("storage1@file1").unwrap(), ("storage1", "file1"));
        for bad in ["storage1", "@file1", "storage1@", "a@b@c", ""] {
            assert!(parse_pool(bad).is_err(), "{bad}");
        }
        assert_eq!(whole_gib(3 << 30), Some(3));
        assert_eq!(whole_gib((1 << 30) + 512), None);
        assert_eq!(whole_gib(0), None);
    }
}
