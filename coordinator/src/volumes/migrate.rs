//! Moving a volume to another pool (Cinder's migrate, host-assisted in Cinder; here the destination's
//! storage agent reads the source's directly, agent to agent, and holes stay holes).
//!
//! The call places the volume on a destination pool with the scheduler's filters, under the scheduling lock,
//! and records it (`migrate_host`/`migrate_backend`, counted against that pool's capacity) with the volume
//! `migrating`. The operation then runs, each step recorded before the next:
//! `creating` (an empty volume of the same id on the destination) → `copying` (the destination fills it from the
//! source) → the row moves to the new pool in one transaction → `cleaning` (the old copy is wiped and removed)
//! → `available`. A failed create or copy removes the partial copy and leaves the volume `available` where it
//! was, with the reason. Whatever copy an agent that cannot be reached keeps is an orphan, which the sweeper
//! removes once that agent is back.
//!
//! An attached (`in-use`) volume moves too, its guest running: see `swap.rs` for its steps in place of `copying`.

use super::store::{self, VolumeRow};
use super::swap::{self, AttachedLeg};
use crate::agents::transient;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::scheduler::{self, PoolState, Request};
use crate::{failpoint, pools, validate, volume_types};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::agent::v1::storage_agent_client::StorageAgentClient;
use ember_proto::v1::{MigrateVolumeRequest, Volume, VolumeType};
use std::sync::Arc;

/// Starts migrating volume `req.id` to pool `req.pool`, or to the pool the scheduler picks.
pub async fn migrate(ctx: &Arc<Ctx>, who: &Identity, req: MigrateVolumeRequest) -> Result<Volume> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may migrate a volume".into()));
    }
    validate::uuid("id", &req.id)?;
    let wanted = req.pool.trim();
    let named = if wanted.is_empty() { None } else { Some(super::manage::parse_pool(wanted)?) };
    let _guard = ctx.schedule_lock.lock().await;
    let pools = pools::candidates(ctx).await?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let v = store::visible(&mut tx, who, &req.id).await?;
    let current = format!("{}@{}", v.host, v.backend);
    if named.is_some() && wanted == current {
        return Err(Error::invalid("pool", format!("volume {} is already on {current}", v.id)));
    }
    let leg = check_movable(&mut tx, &v, "migrate").await?;
    let pools = match (&leg, named) {
        (None, _) => pools,
        (Some(_), Some((host, _))) => {
            swap::check_destination(&v, host)?;
            pools
        }
        (Some(_), None) => pools.into_iter().filter(|p| p.host != v.host).collect(),
    };
    let vtype = volume_types::load(&mut tx, &v.volume_type_id).await?;
    let request = Request {
        size_gb: v.size_gb as u64,
        // The scheduler keeps the volume in its zone; a pool named by the admin may be in another.
        availability_zone: named.is_none().then(|| v.availability_zone.clone()),
        extra_specs: vtype.extra_specs.into_iter().collect(),
        tried: vec![current.clone()],
        only: named.map(|_| wanted.to_string()),
        ..Default::default()
    };
    let pool = match scheduler::choose(&request, &pools, ctx.capacity_weight_multiplier) {
        Ok(pool) => pool,
        Err(_) if named.is_some() && !pools.iter().any(|p| p.name() == wanted) => {
            return Err(Error::invalid("pool", format!("{wanted} is not an up, enabled storage pool")));
        }
        Err(none) => {
            return Err(Error::FailedPrecondition(format!("volume {} cannot move: {none}", v.id)));
        }
    };
    begin(ctx, tx, &v, pool, None, leg).await
}

/// Starts retyping volume `v` by moving it (Cinder's retype with migration policy `on-demand`), its pool not
/// satisfying `new_type`: the scheduler places it for the new type in its zone, and the new type's per-type
/// quota is reserved until it arrives.
pub(crate) async fn retype_elsewhere(
    ctx: &Arc<Ctx>,
    mut tx: crate::db::WriteTx,
    v: &VolumeRow,
    new_type: &VolumeType,
    pools: &[PoolState],
) -> Result<Volume> {
    let leg = check_movable(&mut tx, v, "retype it elsewhere").await?;
    let pools: Vec<PoolState> = pools.iter().filter(|p| leg.is_none() || p.host != v.host).cloned().collect();
    let request = Request {
        size_gb: v.size_gb as u64,
        availability_zone: Some(v.availability_zone.clone()),
        extra_specs: new_type.extra_specs.clone().into_iter().collect(),
        tried: vec![format!("{}@{}", v.host, v.backend)],
        ..Default::default()
    };
    let pool = scheduler::choose(&request, &pools, ctx.capacity_weight_multiplier).map_err(|none| {
        Error::FailedPrecondition(format!(
            "pool {}@{} does not satisfy type {}, and no other pool of zone {} can take the volume: {none}",
            v.host, v.backend, new_type.name, v.availability_zone
        ))
    })?;
    ctx.quota.reserve(&mut tx, &v.project, &super::retype::per_type_usage(&new_type.name, v.size_gb, &[])).await?;
    begin(ctx, tx, v, pool, Some(new_type), leg).await
}

/// Refuses to move a volume that is neither `available` nor `in-use` (`what` the caller tried), or whose data
/// something else still relies on where it is. Returns the attachment an `in-use` volume moves with.
async fn check_movable(conn: &mut sqlx::SqliteConnection, v: &VolumeRow, what: &str) -> Result<Option<AttachedLeg>> {
    if v.status != "available" && v.status != "in-use" {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is {}; to {what} it must be available or in-use",
            v.id, v.status
        )));
    }
    refuse_if_held(conn, v).await?;
    store::refuse_if_exported(conn, v, what).await?;
    swap::attached_leg(conn, v).await
}

/// Records in `tx`, and starts, the move of volume `v` (with its attachment `leg`, if in use) to `pool`: the
/// volume is `migrating` (`retyping` when it takes `new_type` on arrival), and the destination is on its row.
async fn begin(
    ctx: &Arc<Ctx>,
    mut tx: crate::db::WriteTx,
    v: &VolumeRow,
    pool: &PoolState,
    new_type: Option<&VolumeType>,
    leg: Option<AttachedLeg>,
) -> Result<Volume> {
    let status = if new_type.is_some() { "retyping" } else { "migrating" };
    if !store::transition(&mut tx, &v.id, &[v.status.as_str()], status, "").await? {
        return Err(Error::FailedPrecondition(format!("volume {} changed meanwhile; try again", v.id)));
    }
    sqlx::query("UPDATE volumes SET migrate_host = ?, migrate_backend = ? WHERE id = ?")
        .bind(&pool.host)
        .bind(&pool.backend)
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
    let mut payload = serde_json::json!({
        "from_host": v.host, "from_backend": v.backend,
        "to_host": pool.host, "to_backend": pool.backend, "to_zone": pool.availability_zone,
    });
    if let Some(t) = new_type {
        payload["retype_to"] = serde_json::json!({ "id": t.id, "name": t.name });
    }
    if let Some(leg) = &leg {
        payload["attachment"] = leg.to_json();
    }
    let op = operations::insert(&mut tx, "migrate_volume", "volume", &v.id, "creating", payload).await?;
    let shown = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &v.id))?;
    let shown = store::to_proto(&mut tx, &shown).await?;
    tx.commit().await?;
    tracing::info!(volume_id = %v.id, to = %pool.name(), status, attached = leg.is_some(), "volume migration started");
    operations::spawn(ctx, op);
    Ok(shown)
}

/// Refuses a volume whose data something else still relies on where it is: its snapshots (which live on its
/// pool, as in Cinder), a clone being made of it there, and a backup reading it.
async fn refuse_if_held(conn: &mut sqlx::SqliteConnection, v: &VolumeRow) -> Result<()> {
    let (snapshots, clones) = store::snapshots_and_clones(conn, &v.id).await?;
    if clones > 0 {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is the source of a volume being created; migrate it when that one is available",
            v.id
        )));
    }
    if snapshots > 0 {
        return Err(Error::FailedPrecondition(format!(
            "volume {} has {snapshots} snapshot(s), which cannot move with it; delete them first",
            v.id
        )));
    }
    if let Some(backup) = store::backup_in_progress(conn, &v.id).await? {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is being backed up (backup {backup}); migrate it when the backup ends",
            v.id
        )));
    }
    Ok(())
}

/// Where a migration moves a volume from and to, as its operation recorded them.
struct Route {
    from_host: String,
    from_backend: String,
    to_host: String,
    to_backend: String,
    to_zone: String,
    /// The type (id, name) the volume takes on arrival, for a retype that moves it.
    retype_to: Option<(String, String)>,
    /// The attachment of a volume that moves while in use.
    attached: Option<AttachedLeg>,
}

impl Route {
    fn of(op: &Op) -> Route {
        let field = |k: &str| op.payload[k].as_str().unwrap_or_default().to_string();
        Route {
            from_host: field("from_host"),
            from_backend: field("from_backend"),
            to_host: field("to_host"),
            to_backend: field("to_backend"),
            to_zone: field("to_zone"),
            retype_to: op.payload["retype_to"]["id"]
                .as_str()
                .map(|id| (id.to_string(), op.payload["retype_to"]["name"].as_str().unwrap_or_default().to_string())),
            attached: AttachedLeg::of(op),
        }
    }

    /// The per-type quota reserved for the type the volume takes on arrival, if any.
    fn reserved(&self, v: &VolumeRow) -> Vec<crate::quota::Delta> {
        match &self.retype_to {
            Some((_, name)) => super::retype::per_type_usage(name, v.size_gb, &[]),
            None => Vec::new(),
        }
    }

    fn to(&self) -> String {
        format!("{}@{}", self.to_host, self.to_backend)
    }
}

/// The migration's worker: see the module documentation for its steps.
pub async fn migrate_flow(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    let route = Route::of(&op);
    loop {
        let mut conn = ctx.db.acquire().await?;
        let Some(v) = store::find(&mut conn, &op.resource_id).await? else {
            operations::finish(&mut conn, &op, Some("volume no longer exists")).await?;
            return Ok(Outcome::Finished);
        };
        drop(conn);
        match op.step.as_str() {
            "creating" => {
                // An agent no longer registered (its service removed) will not come back under that name.
                let mut dest = match ctx.agents.storage(&route.to_host).await {
                    Ok(dest) => dest,
                    Err(e) => return give_up(ctx, &op, &v, &route, &e.to_string()).await,
                };
                let create = agent::CreateVolumeRequest {
                    volume_id: v.id.clone(),
                    backend: route.to_backend.clone(),
                    size_gb: v.size_gb as u64,
                    ..Default::default()
                };
                match dest.create_volume(create).await {
                    Ok(_) => {
                        let mut conn = ctx.db.acquire().await?;
                        let next = if route.attached.is_some() { "exporting" } else { "copying" };
                        operations::advance(&mut conn, &mut op, next).await?;
                    }
                    Err(status) if transient(&status) && both_up(ctx, &route).await? => {
                        return Ok(Outcome::Retry(format!("storage agent {}: {}", route.to_host, status.message())));
                    }
                    Err(status) => return give_up(ctx, &op, &v, &route, status.message()).await,
                }
            }
            "copying" => {
                let agents =
                    (ctx.agents.storage(&route.to_host).await, ctx.agents.endpoint(&route.from_host, "storage").await);
                let (mut dest, source_endpoint) = match agents {
                    (Ok(dest), Ok(source)) => (dest, source),
                    (Err(e), _) | (_, Err(e)) => return give_up(ctx, &op, &v, &route, &e.to_string()).await,
                };
                let copy = agent::CopyVolumeFromRequest {
                    volume_id: v.id.clone(),
                    backend: route.to_backend.clone(),
                    source_endpoint,
                    source_backend: route.from_backend.clone(),
                };
                match copy_with_progress(ctx, &mut dest, copy).await {
                    Ok(written) => {
                        failpoint::hit("migrate_volume.copied");
                        arrive(ctx, &mut op, &v, &route, None).await?;
                        tracing::info!(volume_id = %v.id, to = %route.to(), written, "volume moved to its new pool");
                    }
                    Err(status) if transient(&status) && both_up(ctx, &route).await? => {
                        return Ok(Outcome::Retry(format!("storage agent {}: {}", route.to_host, status.message())));
                    }
                    Err(status) => return give_up(ctx, &op, &v, &route, status.message()).await,
                }
            }
            "exporting" | "swapping" => {
                let Some(leg) = route.attached.clone() else {
                    return give_up(ctx, &op, &v, &route, "an attached step without an attachment").await;
                };
                let step = if op.step == "exporting" {
                    swap::export_new_copy(ctx, &mut op, &v, &leg, &route.to_host, &route.to_backend).await?
                } else {
                    match swap::swap_domain(ctx, &op, &v, &leg).await? {
                        Ok(connection) => {
                            failpoint::hit("migrate_volume.swapped");
                            arrive(ctx, &mut op, &v, &route, Some((&leg.attachment_id, &connection))).await?;
                            tracing::info!(volume_id = %v.id, to = %route.to(), "attached volume moved to its new pool");
                            swap::Step::Next
                        }
                        Err(step) => step,
                    }
                };
                match step {
                    swap::Step::Next => {}
                    swap::Step::Retry(why) => return Ok(Outcome::Retry(why)),
                    swap::Step::GiveUp(why) => return give_up(ctx, &op, &v, &route, &why).await,
                }
            }
            "cleaning" => {
                // The row already names the new pool, so the old copy is an orphan: should this fail, the sweeper
                // removes it later. The old export goes first: the guest has let go of it.
                if let Some(leg) = &route.attached {
                    swap::unexport(ctx, &v, leg, &route.from_host, &route.from_backend).await;
                }
                let old = agent::DeleteVolumeRequest { volume_id: v.id.clone(), backend: route.from_backend.clone() };
                let removed = match ctx.agents.storage(&route.from_host).await {
                    Ok(mut source) => source.delete_volume(old).await.map_err(|s| s.message().to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(why) = removed {
                    tracing::warn!(volume_id = %v.id, from = %route.from_host, %why, "old copy left to the sweeper");
                }
                let mut tx = crate::db::write(&ctx.db).await?;
                let settled = crate::attachments::settled_status(&mut tx, &v.id).await?;
                store::transition(&mut tx, &v.id, &["migrating", "retyping"], settled, "").await?;
                operations::finish(&mut tx, &op, None).await?;
                tx.commit().await?;
                return Ok(Outcome::Finished);
            }
            other => {
                let mut conn = ctx.db.acquire().await?;
                operations::finish(&mut conn, &op, Some(&format!("unknown migrate step {other}"))).await?;
                return Ok(Outcome::Finished);
            }
        }
    }
}

/// Has the destination agent fill the volume from the source's, recording its progress as it reports it.
/// Returns the data bytes written; a stream that ends before the copy is done is UNAVAILABLE, worth a retry.
async fn copy_with_progress(
    ctx: &Ctx,
    dest: &mut StorageAgentClient<ember_common::access_log::Traced>,
    copy: agent::CopyVolumeFromRequest,
) -> std::result::Result<u64, tonic::Status> {
    let id = copy.volume_id.clone();
    let stream = dest.copy_volume_from(copy).await?.into_inner();
    let last = follow_progress(ctx, &id, stream, "copy", |p| (p.done, p.position_bytes, p.size_bytes)).await?;
    Ok(last.bytes_written)
}

/// Follows an agent's progress stream for the migration of volume `id` (`what` it does): each report's
/// (done, of total) bytes is recorded on the row until the message that says the work is `done`, which is
/// returned. A stream that ends before is UNAVAILABLE, worth a retry: the agent's repeat resumes or redoes it.
pub(crate) async fn follow_progress<M>(
    ctx: &Ctx,
    id: &str,
    mut stream: tonic::Streaming<M>,
    what: &str,
    read: impl Fn(&M) -> (bool, u64, u64),
) -> std::result::Result<M, tonic::Status> {
    while let Some(message) = stream.message().await? {
        let (finished, done, total) = read(&message);
        if finished {
            return Ok(message);
        }
        if let Err(e) = record_progress(ctx, id, done, total).await {
            tracing::warn!(volume_id = %id, %e, "recording the {what}'s progress");
        }
    }
    Err(tonic::Status::unavailable(format!("the {what}'s stream ended before the {what} was done")))
}

/// Records that a migration's copy of volume `id` has done `done` of `total` bytes, for GetVolume and the
/// watchers of the volume to show.
async fn record_progress(ctx: &Ctx, id: &str, done: u64, total: u64) -> Result<()> {
    let percent = if total == 0 { 0 } else { (done.min(total) as u128 * 100 / total as u128) as i64 };
    sqlx::query("UPDATE volumes SET migrate_progress = ? WHERE id = ? AND migrate_host != ''")
        .bind(percent)
        .bind(id)
        .execute(&ctx.db)
        .await?;
    ctx.changed(id);
    Ok(())
}

/// Whether the agents of both pools are up, so that an error reaching one is worth waiting out; a migration
/// does not wait for a node that is down.
async fn both_up(ctx: &Ctx, route: &Route) -> Result<bool> {
    let mut conn = ctx.db.acquire().await?;
    Ok(super::manage::pool_served(ctx, &mut conn, &route.to_host, &route.to_backend).await?
        && super::manage::pool_served(ctx, &mut conn, &route.from_host, &route.from_backend).await?)
}

/// The volume has arrived on its new pool: in one transaction its row names that pool (and, for a retype, the
/// new type), an attached volume's attachment records its new `connection`, and the operation moves on to
/// `cleaning`.
async fn arrive(
    ctx: &Ctx,
    op: &mut Op,
    v: &VolumeRow,
    route: &Route,
    connection: Option<(&str, &serde_json::Value)>,
) -> Result<()> {
    let mut tx = crate::db::write(&ctx.db).await?;
    sqlx::query(
        "UPDATE volumes SET host = ?, backend = ?, availability_zone = ?, migrate_host = '', migrate_backend = '', \
         migrate_progress = 0 WHERE id = ?",
    )
    .bind(&route.to_host)
    .bind(&route.to_backend)
    .bind(&route.to_zone)
    .bind(&v.id)
    .execute(&mut *tx)
    .await?;
    if let Some((type_id, type_name)) = &route.retype_to {
        arrive_as(ctx, &mut tx, v, type_id, type_name, &route.reserved(v)).await?;
    }
    if let Some((attachment_id, connection)) = connection {
        crate::attachments::record_connection(&mut tx, attachment_id, connection).await?;
    }
    operations::advance(&mut tx, op, "cleaning").await?;
    tx.commit().await?;
    Ok(())
}

/// Ends a migration that could not create or fill the copy (or swap an attached volume onto it): the partial
/// copy is removed with its export (or left to the sweeper when its agent does not answer), and the volume is
/// `available` (or `in-use`) where it was, with the reason.
async fn give_up(ctx: &Ctx, op: &Op, v: &VolumeRow, route: &Route, why: &str) -> Result<Outcome> {
    let what = if route.retype_to.is_some() { "retype by migration" } else { "migration" };
    let reason = format!("{what} to {} failed: {why}", route.to());
    let partial = agent::DeleteVolumeRequest { volume_id: v.id.clone(), backend: route.to_backend.clone() };
    let removed = match ctx.agents.storage(&route.to_host).await {
        Ok(mut dest) => dest.delete_volume(partial).await.map_err(|s| s.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(left) = removed {
        tracing::warn!(volume_id = %v.id, to = %route.to(), %left, "partial copy left to the sweeper");
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    sqlx::query("UPDATE volumes SET migrate_host = '', migrate_backend = '', migrate_progress = 0 WHERE id = ?")
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
    ctx.quota.rollback(&mut tx, &v.project, &route.reserved(v)).await?;
    let settled = crate::attachments::settled_status(&mut tx, &v.id).await?;
    store::transition(&mut tx, &v.id, &["migrating", "retyping"], settled, &reason).await?;
    operations::finish(&mut tx, op, Some(&reason)).await?;
    tx.commit().await?;
    tracing::warn!(volume_id = %v.id, %reason, "volume migration failed");
    Ok(Outcome::Finished)
}

/// A retyped volume arrives on its new pool: it takes the new type, whose reserved per-type quota is committed,
/// and the old type's per-type usage is released (the totals stay).
async fn arrive_as(
    ctx: &Ctx,
    tx: &mut sqlx::SqliteConnection,
    v: &VolumeRow,
    type_id: &str,
    type_name: &str,
    reserved: &[crate::quota::Delta],
) -> Result<()> {
    let new_type = volume_types::load(tx, type_id).await?;
    let multiattach = super::api::type_allows_multiattach(&new_type.extra_specs);
    sqlx::query("UPDATE volumes SET volume_type_id = ?, multiattach = ? WHERE id = ?")
        .bind(type_id)
        .bind(multiattach as i64)
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
    ctx.quota.commit(tx, &v.project, reserved).await?;
    ctx.quota.release(tx, &v.project, &super::retype::per_type_usage(&v.volume_type_name, v.size_gb, &[])).await?;
    tracing::info!(volume_id = %v.id, from = %v.volume_type_name, to = %type_name, "volume retyped on its new pool");
    Ok(())
}
