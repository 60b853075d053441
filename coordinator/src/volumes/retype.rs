//! Retype (Cinder's retype). In place, with migration policy `never` (the default): a volume takes another type
//! when the pool it is on already satisfies that type. No agent is asked and no data moves, so it is one
//! transaction: the checks, the per-type quota moving from the old type to the new, and the new type on the row.
//! With policy `on-demand`, a volume whose pool does not satisfy the new type moves to one that does, and takes
//! the type on arrival (see [`super::migrate`]).

use super::store;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::scheduler::{self, Request};
use crate::{operations, pools, quota, validate, volume_types};
use ember_common::identity::Identity;
use ember_proto::v1::{RetypeVolumeRequest, Volume};
use std::sync::Arc;

/// The per-type part of the quota a volume and its snapshots count under type `type_name` (`volumes_<type>`,
/// `gigabytes_<type>`, `snapshots_<type>`): what a retype moves. The totals stay as they are.
pub fn per_type_usage(type_name: &str, size_gb: i64, snapshot_sizes: &[i64]) -> Vec<quota::Delta> {
    let suffix = format!("_{type_name}");
    let all = quota::volume_with_snapshots(type_name, size_gb, snapshot_sizes);
    all.into_iter().filter(|d| d.resource.ends_with(&suffix)).collect()
}

/// Retypes volume `req.id` where it lies or, when its policy allows and its pool does not satisfy the new type,
/// starts moving it to a pool that does.
pub async fn retype(ctx: &Arc<Ctx>, who: &Identity, req: RetypeVolumeRequest) -> Result<Volume> {
    validate::uuid("id", &req.id)?;
    let on_demand = match req.migration_policy.as_str() {
        "" | "never" => false,
        "on-demand" => true,
        other => return Err(Error::invalid("migration_policy", format!("{other:?} is not never or on-demand"))),
    };
    // A retype that may move the volume places it: the scheduling lock comes before the write transaction, in
    // the order every placement takes them.
    let _guard = if on_demand { Some(ctx.schedule_lock.lock().await) } else { None };
    let candidates = if on_demand { pools::candidates(ctx).await? } else { Vec::new() };
    let mut tx = crate::db::write(&ctx.db).await?;
    let v = store::visible(&mut tx, who, &req.id).await?;
    let new_id = crate::type_access::resolve_for(&mut tx, who, &req.volume_type)
        .await
        .map_err(|_| Error::invalid("volume_type", format!("no volume type {:?}", req.volume_type)))?;
    if new_id == v.volume_type_id {
        return Err(Error::invalid(
            "volume_type",
            format!("volume {} is already of type {}", v.id, v.volume_type_name),
        ));
    }
    if !matches!(v.status.as_str(), "available" | "in-use") {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is {}; retype needs available or in-use",
            v.id, v.status
        )));
    }
    let new_type = volume_types::load(&mut tx, &new_id).await?;
    let old_type = volume_types::load(&mut tx, &v.volume_type_id).await?;
    let encrypted = |t: &ember_proto::v1::VolumeType| crate::encryption::spec(&t.extra_specs).ok().flatten();
    if encrypted(&old_type).is_some() != encrypted(&new_type).is_some() {
        return Err(Error::invalid(
            "volume_type",
            format!(
                "types {} and {} differ in encryption; a volume's data is not re-encrypted",
                old_type.name, new_type.name
            ),
        ));
    }
    volume_types::check_size(&new_type, "volume_type", v.size_gb as u64)?;
    if v.status == "in-use" {
        // Cinder's rule too: a guest's disk keeps the limits it was attached with, wherever the volume goes.
        let old_type = volume_types::load(&mut tx, &v.volume_type_id).await?;
        if volume_types::front_end_qos(&old_type.extra_specs)? != volume_types::front_end_qos(&new_type.extra_specs)? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is attached, and types {} and {} set different front-end QoS (qos:), which its guest's \
                 disk keeps until it is detached; detach it first",
                v.id, old_type.name, new_type.name
            )));
        }
    }
    let pool = pools::current(ctx, &v.host, &v.backend).await?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "pool {}@{} is down, so whether it satisfies type {} cannot be checked",
            v.host, v.backend, new_type.name
        ))
    })?;
    let wanted = Request { extra_specs: new_type.extra_specs.clone().into_iter().collect(), ..Default::default() };
    if let Err(why) = scheduler::fits_in_place(&wanted, &pool) {
        if on_demand {
            return super::migrate::retype_elsewhere(ctx, tx, &v, &new_type, &candidates).await;
        }
        return Err(Error::FailedPrecondition(format!(
            "pool {} does not satisfy type {}: {why}; migration policy on-demand moves the volume to one that does",
            pool.name(),
            new_type.name
        )));
    }
    let multiattach = super::api::type_allows_multiattach(&new_type.extra_specs);
    let attachments: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM attachments WHERE volume_id = ?")
        .bind(&v.id)
        .fetch_one(&mut *tx)
        .await?;
    if !multiattach && attachments > 1 {
        return Err(Error::FailedPrecondition(format!(
            "volume {} has {attachments} attachments and type {} does not allow multiattach",
            v.id, new_type.name
        )));
    }
    // A snapshot being made or deleted would count or release its quota under the type it began with.
    let in_flight = |s: &str| s == "creating" || s == "deleting";
    let sizes = crate::snapshots::sizes_unless(&mut tx, &v.id, in_flight, "retype when it has ended").await?;
    ctx.quota.consume(&mut tx, &v.project, &per_type_usage(&new_type.name, v.size_gb, &sizes)).await?;
    ctx.quota.release(&mut tx, &v.project, &per_type_usage(&v.volume_type_name, v.size_gb, &sizes)).await?;
    sqlx::query("UPDATE volumes SET volume_type_id = ?, multiattach = ?, updated_at = ? WHERE id = ?")
        .bind(&new_id)
        .bind(multiattach as i64)
        .bind(crate::clock::now_ms())
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
    operations::record_done(&mut tx, "retype_volume", "volume", &v.id).await?;
    let retyped = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &v.id))?;
    let shown = store::to_proto(&mut tx, &retyped).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    tracing::info!(volume_id = %v.id, from = %v.volume_type_name, to = %new_type.name, "volume retyped in place");
    Ok(shown)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retype_moves_only_the_per_type_usage() {
        let moved: Vec<(String, i64)> =
            super::per_type_usage("gold", 10, &[10, 5]).into_iter().map(|d| (d.resource, d.amount)).collect();
        assert_eq!(
            moved,
            [("gigabytes_gold".to_string(), 25), ("snapshots_gold".to_string(), 2), ("volumes_gold".to_string(), 1)]
        );
    }
}
