//! Reverting a volume to one of its snapshots (Cinder's revert to snapshot). The request moves the volume to
//! `reverting` and the snapshot to `restoring` (so neither can be deleted, attached or snapshotted meanwhile)
//! and records the operation in one transaction; the storage agent then rewrites, in place, the chunks of the
//! volume that differ from the snapshot. Repeating that is harmless, so a crash anywhere resumes it. A revert
//! the agent fails part-way leaves the volume `error` (its data is partly the snapshot's), from which a new
//! revert puts it right.

use super::store;
use crate::agents::transient;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::{snapshots, validate};
use ember_common::identity::Identity;
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{RevertVolumeRequest, Volume};
use std::sync::Arc;

/// Starts reverting volume `req.id` to snapshot `req.snapshot_id`.
pub async fn revert(ctx: &Arc<Ctx>, who: &Identity, req: RevertVolumeRequest) -> Result<Volume> {
    validate::uuid("id", &req.id)?;
    validate::uuid("snapshot_id", &req.snapshot_id)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let v = store::visible(&mut tx, who, &req.id).await?;
    let s = snapshots::visible(&mut tx, who, &req.snapshot_id).await?;
    if s.volume_id != v.id {
        return Err(Error::invalid(
            "snapshot_id",
            format!("snapshot {} is of volume {}, not {}", s.id, s.volume_id, v.id),
        ));
    }
    store::refuse_if_exported(&mut tx, &v, "revert").await?;
    if !snapshots::transition(&mut tx, &s.id, &["available"], "restoring", "").await? {
        return Err(Error::FailedPrecondition(format!("snapshot {} is {}; a revert needs available", s.id, s.status)));
    }
    if !store::transition(&mut tx, &v.id, &["available", "error"], "reverting", "").await? {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is {}; a revert needs available (detached), or error after a failed revert",
            v.id, v.status
        )));
    }
    let payload = serde_json::json!({ "snapshot_id": s.id });
    let op = operations::insert(&mut tx, "revert_volume", "volume", &v.id, "reverting", payload).await?;
    let reverting = store::find(&mut tx, &v.id).await?.ok_or_else(|| Error::not_found("volume", &v.id))?;
    let shown = store::to_proto(&mut tx, &reverting).await?;
    tx.commit().await?;
    tracing::info!(volume_id = %v.id, snapshot_id = %s.id, "revert to snapshot requested");
    operations::spawn(ctx, op);
    Ok(shown)
}

/// The revert operation: the storage agent rewrites what differs → volume and snapshot `available`.
pub async fn revert_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let snapshot_id = op.payload["snapshot_id"].as_str().unwrap_or_default().to_string();
    let mut conn = ctx.db.acquire().await?;
    let v = store::find(&mut conn, &op.resource_id).await?.filter(|v| v.status == "reverting");
    let Some(v) = v else {
        operations::finish(&mut conn, &op, Some("volume no longer reverting")).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    crate::failpoint::hit("revert_volume.recorded");
    let mut client = ctx.agents.storage(&v.host).await?;
    let call = client
        .revert_volume(agent::RevertVolumeRequest {
            volume_id: v.id.clone(),
            backend: v.backend.clone(),
            snapshot_id: snapshot_id.clone(),
        })
        .await;
    let (to, reason) = match call {
        Ok(r) => {
            let changed = r.into_inner().bytes_changed;
            tracing::info!(volume_id = %v.id, %snapshot_id, changed, "volume reverted");
            ("available", String::new())
        }
        Err(status) if transient(&status) => {
            return Ok(Outcome::Retry(format!("storage agent {}: {}", v.host, status.message())));
        }
        Err(status) => {
            let reason = format!(
                "revert to snapshot {snapshot_id} failed on {}@{}: {}; the data may be partly reverted: revert \
                 again or delete",
                v.host,
                v.backend,
                status.message()
            );
            ("error", reason)
        }
    };
    let mut tx = crate::db::write(&ctx.db).await?;
    store::transition(&mut tx, &v.id, &["reverting"], to, &reason).await?;
    snapshots::transition(&mut tx, &snapshot_id, &["restoring"], "available", "").await?;
    operations::finish(&mut tx, &op, (!reason.is_empty()).then_some(reason.as_str())).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    Ok(Outcome::Finished)
}
