//! Adopting a snapshot a volume's backend holds that the coordinator has no record of, as Cinder's
//! `snapshot-manage` does: after the database was lost or replaced, an admin first brings the volume back
//! ([`crate::volumes::manage`]), then each of its snapshots, into the volume's project and quotas. Until then
//! such a snapshot is left alone by the sweeper, and on LVM it keeps its volume from being deleted. And the
//! reverse, Cinder's `snapshot-unmanage`: ember forgets a snapshot and leaves its data where it is.

use super::{SnapshotRow, find, to_proto};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::volumes::manage::{refused_by_agent, whole_gib};
use crate::volumes::store as volumes;
use crate::{operations, quota, validate};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{ManageSnapshotRequest, Snapshot, UnmanageSnapshotRequest};

/// Volume states a snapshot can be adopted under: settled ones, where nothing is being made or removed.
const SETTLED: [&str; 2] = ["available", "in-use"];

/// Checks what the agent holds against the volume the admin named: the recorded origin, when the backend keeps
/// one, must be that volume, and a snapshot cannot be larger than its volume (it only ever grows). Returns the
/// snapshot's size in GiB.
fn check_held(held: &agent::SnapshotResult, volume_id: &str, volume_gb: i64) -> Result<i64> {
    if !held.volume_id.is_empty() && held.volume_id != volume_id {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {} is a snapshot of volume {}, not of volume {volume_id}",
            held.snapshot_id, held.volume_id
        )));
    }
    let size_gb = whole_gib(held.size_bytes).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "snapshot {} holds {} bytes, not a whole number of GiB; ember cannot size it",
            held.snapshot_id, held.size_bytes
        ))
    })? as i64;
    if size_gb > volume_gb {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {} is {size_gb} GiB, larger than volume {volume_id} ({volume_gb} GiB): it is not of that volume",
            held.snapshot_id
        )));
    }
    Ok(size_gb)
}

/// Adopts snapshot `req.id` of volume `req.volume_id`: the volume's backend must hold it, and no snapshot of
/// that id may be known. With `req.foreign`, an LV another system made is taken too, as a volume is
/// ([`crate::volumes::manage::manage`]): the checks run first in a transaction rolled back, then the agent tags
/// the LV, then the transaction runs again and commits.
pub async fn manage(ctx: &Ctx, who: &Identity, req: ManageSnapshotRequest) -> Result<Snapshot> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may manage a snapshot".into()));
    }
    validate::uuid("volume_id", &req.volume_id)?;
    validate::uuid("id", &req.id)?;
    validate::text("name", &req.name, 255)?;
    validate::text("description", &req.description, 255)?;
    let mut conn = ctx.db.acquire().await?;
    let v = volumes::visible(&mut conn, who, &req.volume_id).await?;
    if find(&mut conn, &req.id).await?.is_some() {
        return Err(Error::AlreadyExists(format!("snapshot {} is already known", req.id)));
    }
    drop(conn);
    let pool = format!("{}@{}", v.host, v.backend);
    let mut storage = ctx.agents.storage(&v.host).await?;
    let inspect = agent::InspectSnapshotRequest {
        snapshot_id: req.id.clone(),
        backend: v.backend.clone(),
        allow_foreign: req.foreign,
    };
    let held = storage
        .inspect_snapshot(inspect)
        .await
        .map_err(|s| refused_by_agent("snapshot", &req.id, &pool, &s))?
        .into_inner();
    let size_gb = check_held(&held, &v.id, v.size_gb)?;
    if req.foreign {
        record_managed(ctx, &req, &v, size_gb).await?.0.rollback().await?; // the checks alone
        let adopt = agent::AdoptForeignRequest { id: req.id.clone(), backend: v.backend.clone(), snapshot: true };
        storage.adopt_foreign(adopt).await.map_err(|s| refused_by_agent("snapshot", &req.id, &pool, &s))?;
    }
    let (tx, s) = record_managed(ctx, &req, &v, size_gb).await?;
    tx.commit().await?;
    tracing::warn!(snapshot_id = %req.id, volume_id = %v.id, %pool, project = %v.project, size_gb, foreign = req.foreign, "snapshot managed (adopted)");
    Ok(to_proto(&s))
}

/// Records adopted snapshot `req.id` of volume `v` in a write transaction, checked and counted against the
/// volume's project's quotas, and returns the transaction, not yet committed, with the snapshot's row.
async fn record_managed(
    ctx: &Ctx,
    req: &ManageSnapshotRequest,
    v: &volumes::VolumeRow,
    size_gb: i64,
) -> Result<(crate::db::WriteTx, SnapshotRow)> {
    let mut tx = crate::db::write(&ctx.db).await?;
    // Asked again under the write lock: a second manage of it, or a delete of the volume, may have run since.
    if find(&mut tx, &req.id).await?.is_some() {
        return Err(Error::AlreadyExists(format!("snapshot {} is already known", req.id)));
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM volumes WHERE id = ?").bind(&v.id).fetch_optional(&mut *tx).await?;
    match status.as_deref() {
        Some(s) if SETTLED.contains(&s) => {}
        Some(s) => {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {s}; adopting its snapshot needs available or in-use",
                v.id
            )));
        }
        None => return Err(Error::not_found("volume", &v.id)),
    }
    ctx.quota.consume(&mut tx, &v.project, &quota::snapshot_deltas(&v.volume_type_name, size_gb)).await?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO snapshots (id, project, volume_id, name, description, size_gb, status, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, 'available', ?, ?)",
    )
    .bind(&req.id)
    .bind(&v.project)
    .bind(&v.id)
    .bind(&req.name)
    .bind(&req.description)
    .bind(size_gb)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    operations::record_done(&mut tx, "manage_snapshot", "snapshot", &req.id).await?;
    let s: SnapshotRow = find(&mut tx, &req.id).await?.ok_or_else(|| Error::not_found("snapshot", &req.id))?;
    Ok((tx, s))
}

/// Forgets snapshot `req.id`, which must be `available` and the source of no volume being made, and leaves its
/// data on the backend. No agent is called (a snapshot has no export), so it is one transaction; the finished
/// operation it records is what tells the sweeper to leave the file alone.
pub async fn unmanage(ctx: &Ctx, who: &Identity, req: UnmanageSnapshotRequest) -> Result<()> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may unmanage a snapshot".into()));
    }
    validate::uuid("id", &req.id)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let s = find(&mut tx, &req.id).await?.ok_or_else(|| Error::not_found("snapshot", &req.id))?;
    if s.status != "available" {
        return Err(Error::FailedPrecondition(format!("snapshot {} is {}; unmanage needs available", s.id, s.status)));
    }
    let building: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE source_snapshot_id = ? AND status = 'creating'")
            .bind(&s.id)
            .fetch_one(&mut *tx)
            .await?;
    if building > 0 {
        return Err(Error::FailedPrecondition(format!("snapshot {} is the source of a volume being created", s.id)));
    }
    let v = volumes::find(&mut tx, &s.volume_id).await?.ok_or_else(|| Error::not_found("volume", &s.volume_id))?;
    super::remove_record(ctx, &mut tx, &s.id, &s.project, &v.volume_type_name, s.size_gb).await?;
    operations::record_done(&mut tx, "unmanage_snapshot", "snapshot", &s.id).await?;
    tx.commit().await?;
    tracing::warn!(snapshot_id = %s.id, volume_id = %v.id, "snapshot unmanaged; its data stays");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOLUME: &str = "11111111-2222-4333-8444-555555555555";

    fn held(volume_id: &str, size_bytes: u64) -> agent::SnapshotResult {
        agent::SnapshotResult { snapshot_id: "s".into(), size_bytes, volume_id: volume_id.into() }
    }

    #[test]
    fn a_held_snapshot_must_be_of_the_named_volume_and_fit_it() {
        assert_eq!(check_held(&held(VOLUME, 2 << 30), VOLUME, 2).unwrap(), 2);
        assert_eq!(check_held(&held("", 1 << 30), VOLUME, 2).unwrap(), 1, "taken before an extend");
        let other = check_held(&held("99999999-2222-4333-8444-555555555555", 1 << 30), VOLUME, 2).unwrap_err();
        assert!(other.to_string().contains("is a snapshot of volume 99999999"), "{other}");
        let larger = check_held(&held("", 3 << 30), VOLUME, 2).unwrap_err();
        assert!(larger.to_string().contains("larger than volume"), "{larger}");
        assert!(check_held(&held("", (1 << 30) + 4096), VOLUME, 2).is_err());
    }
}
