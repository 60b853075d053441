//! The durable volume flows run by operation workers: create (schedule → agent create → available, with
//! reschedule on failure), delete (agent wipe+remove → row and quota gone) and extend. Each step is recorded
//! before the next begins, so a restarted coordinator resumes exactly where it stopped.

use super::store;
use crate::agents::transient;
use crate::backups::RestoreFailed;
use crate::context::Ctx;
use crate::error::Result;
use crate::operations::{self, Op, Outcome};
use crate::scheduler::{self, Request};
use crate::snapshots::Cascade;
use crate::{failpoint, pools, quota, volume_types};
use ember_proto::agent::v1 as agent;
use std::sync::Arc;

fn tried(op: &Op) -> Vec<String> {
    op.payload["tried"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
}

/// Create: `accepted` (schedule) → `scheduled` (agent create) → available.
pub async fn create(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    loop {
        let mut conn = ctx.db.acquire().await?;
        let Some(v) = store::find(&mut conn, &op.resource_id).await? else {
            operations::finish(&mut conn, &op, Some("volume no longer exists")).await?;
            return Ok(Outcome::Finished);
        };
        if v.status != "creating" {
            operations::finish(&mut conn, &op, None).await?;
            return Ok(Outcome::Finished);
        }
        drop(conn);
        match op.step.as_str() {
            "accepted" => {
                // Under the scheduling lock, so that a hinted volume placed just before counts where it went.
                let _guard = ctx.schedule_lock.lock().await;
                let (vtype, same_host, different_host) = {
                    let mut conn = ctx.db.acquire().await?;
                    let hints = &op.payload["hints"];
                    (
                        volume_types::load(&mut conn, &v.volume_type_id).await?,
                        super::affinity::hosts(&mut conn, hints, "same_host").await?,
                        super::affinity::hosts(&mut conn, hints, "different_host").await?,
                    )
                };
                let pools = pools::candidates(ctx).await?;
                let request = Request {
                    size_gb: v.size_gb as u64,
                    availability_zone: (!v.availability_zone.is_empty()).then(|| v.availability_zone.clone()),
                    extra_specs: vtype.extra_specs.into_iter().collect(),
                    tried: tried(&op),
                    only: op.payload["only"].as_str().map(String::from),
                    same_host,
                    different_host,
                };
                let mut tx = crate::db::write(&ctx.db).await?;
                match scheduler::choose(&request, &pools, ctx.capacity_weight_multiplier) {
                    Ok(pool) => {
                        sqlx::query("UPDATE volumes SET host = ?, backend = ?, availability_zone = ? WHERE id = ?")
                            .bind(&pool.host)
                            .bind(&pool.backend)
                            .bind(&pool.availability_zone)
                            .bind(&v.id)
                            .execute(&mut *tx)
                            .await?;
                        let mut tried = tried(&op);
                        tried.push(pool.name());
                        op.payload["tried"] = serde_json::json!(tried);
                        op.attempt += 1;
                        operations::advance(&mut tx, &mut op, "scheduled").await?;
                        tx.commit().await?;
                        tracing::info!(volume_id = %v.id, pool = %pool.name(), attempt = op.attempt, "volume scheduled");
                        failpoint::hit("create_volume.scheduled");
                    }
                    Err(none) => {
                        let reason = if op.attempt > 0 {
                            format!(
                                "{} (after {} failed attempt(s): {})",
                                none,
                                op.attempt,
                                op.payload["last_error"].as_str().unwrap_or("")
                            )
                        } else {
                            none.to_string()
                        };
                        fail_create(&mut tx, &v, &op, &reason).await?;
                        tx.commit().await?;
                        return Ok(Outcome::Finished);
                    }
                }
            }
            "scheduled" => {
                let luks = luks_format(ctx, &v).await?;
                let mut client = ctx.agents.storage(&v.host).await?;
                let call = client
                    .create_volume(agent::CreateVolumeRequest {
                        volume_id: v.id.clone(),
                        backend: v.backend.clone(),
                        size_gb: v.size_gb as u64,
                        source_snapshot_id: v.source_snapshot_id.clone(),
                        source_volume_id: v.source_volume_id.clone(),
                        provisioning: String::new(),
                        image: op.payload["image"].as_str().unwrap_or_default().to_string(),
                        luks,
                    })
                    .await;
                match call {
                    Ok(created) => {
                        let created = created.into_inner();
                        failpoint::hit("create_volume.created");
                        // A volume from a backup is filled before it becomes available.
                        let restored = if v.source_backup_id.is_empty() {
                            Ok(())
                        } else {
                            crate::backups::restore_into(ctx, &v.source_backup_id, &v, true).await
                        };
                        if let Err(RestoreFailed { agent: Some((host, status)), .. }) = &restored
                            && backup_agent_restarting(ctx, &mut op, &v, "creating", host, status).await?
                        {
                            // The create is asked again when the agent is back, and finds its volume made.
                            return Ok(Outcome::Retry(format!("{host}: {}", status.message())));
                        }
                        let mut tx = crate::db::write(&ctx.db).await?;
                        if !v.source_backup_id.is_empty() {
                            crate::backups::restore_done(&mut tx, &v.source_backup_id).await?;
                        }
                        if !created.image_format.is_empty() {
                            let image = op.payload["image"].as_str().unwrap_or_default();
                            store::record_image(&mut tx, &v, image, &created.image_format, created.image_virtual_size)
                                .await?;
                        }
                        match restored {
                            Ok(()) => {
                                store::transition(&mut tx, &v.id, &["creating"], "available", "").await?;
                                operations::finish(&mut tx, &op, None).await?;
                            }
                            Err(failed) => {
                                store::transition(&mut tx, &v.id, &["creating"], "error", &failed.message).await?;
                                operations::finish(&mut tx, &op, Some(&failed.message)).await?;
                            }
                        }
                        tx.commit().await?;
                        return Ok(Outcome::Finished);
                    }
                    Err(status) if unreachable_for_now(ctx, &mut op, &v, &status).await? => {
                        return Ok(Outcome::Retry(format!("{}@{}: {}", v.host, v.backend, status.message())));
                    }
                    Err(status) => {
                        let pool = format!("{}@{}", v.host, v.backend);
                        tracing::warn!(volume_id = %v.id, %pool, code = ?status.code(), message = status.message(), "create failed on the backend");
                        op.payload.as_object_mut().map(|p| p.remove("unreachable_since_ms"));
                        // Leave nothing behind on the backend that failed; the orphan sweeper catches what
                        // an unreachable agent still holds.
                        let _ = client
                            .delete_volume(agent::DeleteVolumeRequest {
                                volume_id: v.id.clone(),
                                backend: v.backend.clone(),
                            })
                            .await;
                        op.payload["last_error"] = serde_json::json!(format!("{pool}: {}", status.message()));
                        let mut tx = crate::db::write(&ctx.db).await?;
                        let pinned = op.payload["only"].is_string();
                        if !pinned && op.attempt < i64::from(ctx.max_attempts) {
                            sqlx::query("UPDATE volumes SET host = '', backend = '' WHERE id = ?")
                                .bind(&v.id)
                                .execute(&mut *tx)
                                .await?;
                            operations::advance(&mut tx, &mut op, "accepted").await?;
                            tx.commit().await?;
                            continue;
                        }
                        let reason = format!(
                            "create failed after {} attempt(s); last: {pool}: {}",
                            op.attempt,
                            status.message()
                        );
                        fail_create(&mut tx, &v, &op, &reason).await?;
                        tx.commit().await?;
                        return Ok(Outcome::Finished);
                    }
                }
            }
            other => {
                let mut conn = ctx.db.acquire().await?;
                operations::finish(&mut conn, &op, Some(&format!("unknown step {other}"))).await?;
                return Ok(Outcome::Finished);
            }
        }
    }
}

/// Whether the create on `v`'s pool, whose agent did not answer (`status`), should wait for that agent rather
/// than go elsewhere ([`operations::wait_for_agent`]): an agent that restarts then builds the volume as soon as
/// it registers again, instead of the create failing when no other pool can take it; one that stays
/// unreachable (frozen, or serving an address the coordinator cannot reach while its heartbeats arrive) gives
/// the volume to the next pool, or to `error`, as any failed attempt does.
async fn unreachable_for_now(ctx: &Ctx, op: &mut Op, v: &store::VolumeRow, status: &tonic::Status) -> Result<bool> {
    if !crate::agents::unreachable(status) {
        return Ok(false);
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    let served = super::manage::pool_served(ctx, &mut tx, &v.host, &v.backend).await?;
    let pool = format!("{}@{}", v.host, v.backend);
    waits(ctx, tx, op, v, "creating", served, unreachable_reason(&pool, status)).await
}

/// Whether the restore into volume `v` (in `state`: `creating`, or `restoring-backup` when it existed), whose
/// backup agent `host` answered `status`, should wait for that agent ([`operations::wait_for_agent`]) and be
/// asked again: when the agent refused the connection (it is not running, as while it restarts), when the call
/// was cut short (the agent died while restoring), or when the agent is UNAVAILABLE (it is still ending an
/// earlier run into `v`, whose caller's connection was lost). A restore that was cut short left `v` marked
/// incomplete on its storage agent, and the repeated one writes all of the backup again. A restore the agent
/// answered with a failure still fails, leaving the volume in error.
pub(crate) async fn backup_agent_restarting(
    ctx: &Ctx,
    op: &mut Op,
    v: &store::VolumeRow,
    state: &str,
    host: &str,
    status: &tonic::Status,
) -> Result<bool> {
    if !crate::agents::ask_again(status) {
        return Ok(false);
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    let up = crate::backups::agent_is_up(ctx, &mut tx, host).await?;
    waits(ctx, tx, op, v, state, up, unreachable_reason(host, status)).await
}

/// The status reason of a volume whose operation waits for `agent`, which answered `status` (saying why in its
/// own words: a restore still ending there, the storage agent it wrote to gone) or did not answer at all.
fn unreachable_reason(agent: &str, status: &tonic::Status) -> String {
    let answered = std::error::Error::source(status).is_none() && status.code() == tonic::Code::Unavailable;
    if answered {
        format!("waiting for {agent}: {}", status.message())
    } else {
        format!("waiting for {agent}, which cannot be reached: {}", status.message())
    }
}

/// [`operations::wait_for_agent`] for volume `v`, in `state`, with the reason in its `status_reason`.
async fn waits(
    ctx: &Ctx,
    mut tx: crate::db::WriteTx,
    op: &mut Op,
    v: &store::VolumeRow,
    state: &str,
    up: bool,
    reason: String,
) -> Result<bool> {
    if !operations::wait_for_agent(&mut tx, op, up, ctx.service_down_ms).await? {
        return Ok(false);
    }
    store::transition(&mut tx, &v.id, &[state], state, &reason).await?;
    tx.commit().await?;
    tracing::warn!(volume_id = %v.id, %reason, "volume waits for an agent");
    Ok(true)
}

/// Ends the create of `v` in `error` with `reason`. A volume that was to be restored from a backup releases
/// that backup, which the restore held `restoring` (and so undeletable) until the volume was built.
async fn fail_create(tx: &mut sqlx::SqliteConnection, v: &store::VolumeRow, op: &Op, reason: &str) -> Result<()> {
    if store::transition(tx, &v.id, &["creating"], "error", reason).await? && !v.source_backup_id.is_empty() {
        crate::backups::restore_done(tx, &v.source_backup_id).await?;
    }
    operations::finish(tx, op, Some(reason)).await
}

/// How the agent formats a new blank volume of an encrypted type (with the key `create` made for it); `None`
/// for a plain volume, and for a copy, whose data (LUKS header included) comes from its source.
async fn luks_format(ctx: &Ctx, v: &store::VolumeRow) -> Result<Option<agent::LuksFormat>> {
    if !v.source_snapshot_id.is_empty() || !v.source_volume_id.is_empty() || !v.source_backup_id.is_empty() {
        return Ok(None);
    }
    let mut conn = ctx.db.acquire().await?;
    let Some(key) = crate::encryption::load(&mut conn, &ctx.master_key, &v.id).await? else { return Ok(None) };
    let vtype = volume_types::load(&mut conn, &v.volume_type_id).await?;
    let spec = crate::encryption::spec(&vtype.extra_specs).map_err(crate::error::Error::Keys)?;
    let cipher_alg = spec.map(|s| s.qemu_cipher_alg()).unwrap_or("aes-128").to_string();
    Ok(Some(agent::LuksFormat { passphrase: key.passphrase, cipher_alg }))
}

/// Removes a volume's row and gives its quota back; `done` says why, for the log ("deleted", "unmanaged").
pub(super) async fn forget(ctx: &Ctx, tx: &mut sqlx::SqliteConnection, v: &store::VolumeRow, done: &str) -> Result<()> {
    sqlx::query("DELETE FROM volumes WHERE id = ?").bind(&v.id).execute(&mut *tx).await?;
    crate::encryption::delete_key(tx, &v.id).await?;
    ctx.quota.release(tx, &v.project, &quota::volume_deltas(&v.volume_type_name, v.size_gb)).await?;
    tracing::info!(volume_id = %v.id, "volume {done}");
    Ok(())
}

/// Delete: (with cascade, each snapshot removed) → agent wipe and remove (idempotent) → row and quota gone.
pub async fn delete(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(v) = store::find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    // A cascade delete removes the volume's snapshots first (an LVM origin cannot go before them).
    if let Some(failed) = crate::snapshots::delete_all_of(ctx, &v).await? {
        return match failed {
            Cascade::Retry(why) => Ok(Outcome::Retry(why)),
            Cascade::Failed(reason) => {
                let mut tx = crate::db::write(&ctx.db).await?;
                store::transition(&mut tx, &v.id, &["deleting"], "error_deleting", &reason).await?;
                operations::finish(&mut tx, &op, Some(&reason)).await?;
                tx.commit().await?;
                Ok(Outcome::Finished)
            }
        };
    }
    if !v.host.is_empty() {
        let mut client = ctx.agents.storage(&v.host).await?;
        if let Err(status) = client
            .delete_volume(agent::DeleteVolumeRequest { volume_id: v.id.clone(), backend: v.backend.clone() })
            .await
        {
            if transient(&status) {
                return Ok(Outcome::Retry(format!("storage agent {}: {}", v.host, status.message())));
            }
            let reason = format!("delete failed on {}@{}: {}", v.host, v.backend, status.message());
            let mut tx = crate::db::write(&ctx.db).await?;
            store::transition(&mut tx, &v.id, &["deleting"], "error_deleting", &reason).await?;
            operations::finish(&mut tx, &op, Some(&reason)).await?;
            tx.commit().await?;
            return Ok(Outcome::Finished);
        }
        failpoint::hit("delete_volume.deleted");
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    forget(ctx, &mut tx, &v, "deleted").await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// Extend: the storage agent grows the volume (and has its iSCSI target report the new size) → the new size is
/// recorded and its reservation committed (step `resizing`) → each guest the volume is attached to is told, through
/// its compute agent → available, or in-use. Telling guests is best effort, as in Cinder and Nova: the volume has
/// grown either way, a host that could not be told is named in the volume's status reason, and its guest sees the
/// size at its next attach or boot.
pub async fn extend(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(v) = store::find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("volume no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    let new_size = op.payload["new_size_gb"].as_u64().unwrap_or(0);
    if op.step == "extending" {
        let deltas = super::api::extend_deltas(&v.volume_type_name, op.payload["delta"].as_i64().unwrap_or(0));
        let mut client = ctx.agents.storage(&v.host).await?;
        let call = client
            .extend_volume(agent::ExtendVolumeRequest {
                volume_id: v.id.clone(),
                backend: v.backend.clone(),
                new_size_gb: new_size,
            })
            .await;
        let mut tx = crate::db::write(&ctx.db).await?;
        match call {
            Ok(_) => {
                sqlx::query("UPDATE volumes SET size_gb = ? WHERE id = ?")
                    .bind(new_size as i64)
                    .bind(&v.id)
                    .execute(&mut *tx)
                    .await?;
                ctx.quota.commit(&mut tx, &v.project, &deltas).await?;
                operations::advance(&mut tx, &mut op, "resizing").await?;
            }
            Err(status) if transient(&status) => {
                return Ok(Outcome::Retry(format!("storage agent {}: {}", v.host, status.message())));
            }
            Err(status) => {
                // The agent refused, so the volume is as it was. An attached one stays usable (and detachable).
                let reason = format!("extend failed on {}@{}: {}", v.host, v.backend, status.message());
                let attached = crate::attachments::settled_status(&mut tx, &v.id).await? == "in-use";
                let to = if attached { "in-use" } else { "error_extending" };
                store::transition(&mut tx, &v.id, &["extending"], to, &reason).await?;
                ctx.quota.rollback(&mut tx, &v.project, &deltas).await?;
                operations::finish(&mut tx, &op, Some(&reason)).await?;
                tx.commit().await?;
                return Ok(Outcome::Finished);
            }
        }
        tx.commit().await?;
        failpoint::hit("extend_volume.extended");
    }
    let untold = crate::attachments::tell_guests_of_new_size(ctx, &v.id, new_size << 30).await?;
    let reason = untold.join("; ");
    let mut tx = crate::db::write(&ctx.db).await?;
    let to = crate::attachments::settled_status(&mut tx, &v.id).await?;
    store::transition(&mut tx, &v.id, &["extending"], to, &reason).await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    if !untold.is_empty() {
        tracing::warn!(volume_id = %v.id, %reason, "volume extended; some guests were not told");
    }
    Ok(Outcome::Finished)
}
