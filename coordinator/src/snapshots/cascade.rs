//! A volume deleted with its snapshots (Cinder's cascade delete). The call moves every snapshot to `deleting`
//! with the volume, in one transaction; the volume's delete operation then removes them one by one, newest
//! first, each record and its quota going as soon as its agent has removed it, so a restart goes on with the ones
//! left. One the agent refuses stops the cascade: it and those not reached are `error_deleting`, with the reason,
//! and so is the volume; deleting again (with cascade) goes on from there.

use crate::agents::transient;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::volumes::store::VolumeRow;
use ember_proto::agent::v1 as agent;
use sqlx::SqliteConnection;

/// Snapshot statuses a cascade delete takes over; one being made, or deleted by its own operation, is waited for.
const CASCADABLE: [&str; 3] = ["available", "error", "error_deleting"];

/// Why a cascade did not get through the snapshots.
pub enum Cascade {
    /// An agent could not be reached: the volume's delete runs again later.
    Retry(String),
    /// An agent refused a snapshot; the reason, for the volume.
    Failed(String),
}

/// Moves `snapshots` (id, status) of volume `volume_id` to `deleting`, refusing, naming it, one a cascade cannot
/// take or one that is the source of a volume being created.
pub async fn start_cascade(conn: &mut SqliteConnection, volume_id: &str, snapshots: &[(String, String)]) -> Result<()> {
    for (id, status) in snapshots {
        if !CASCADABLE.contains(&status.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id}'s snapshot {id} is {status}; a cascade delete needs its snapshots {}",
                CASCADABLE.join(", ")
            )));
        }
        super::refuse_if_building_from(conn, id).await?;
        super::transition(conn, id, &CASCADABLE, "deleting", "").await?;
    }
    Ok(())
}

/// Removes every snapshot of volume `v`, newest first; `None` once none is left.
pub async fn delete_all_of(ctx: &Ctx, v: &VolumeRow) -> Result<Option<Cascade>> {
    let snapshots: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, project, size_gb FROM snapshots WHERE volume_id = ? ORDER BY created_at DESC")
            .bind(&v.id)
            .fetch_all(&ctx.db)
            .await?;
    if snapshots.is_empty() {
        return Ok(None);
    }
    let mut client = ctx.agents.storage(&v.host).await?;
    for (id, project, size_gb) in snapshots {
        let call = client
            .delete_snapshot(agent::DeleteSnapshotRequest { snapshot_id: id.clone(), backend: v.backend.clone() });
        let mut tx = crate::db::write(&ctx.db).await?;
        match call.await {
            Ok(_) => {
                super::remove_record(ctx, &mut tx, &id, &project, &v.volume_type_name, size_gb).await?;
                tx.commit().await?;
                tracing::info!(snapshot_id = %id, volume_id = %v.id, "snapshot deleted with its volume");
                failpoint::hit("delete_volume.snapshot_deleted");
            }
            Err(status) if transient(&status) => {
                return Ok(Some(Cascade::Retry(format!("storage agent {}: {}", v.host, status.message()))));
            }
            Err(status) => {
                let reason =
                    format!("snapshot {id} could not be deleted on {}@{}: {}", v.host, v.backend, status.message());
                super::transition(&mut tx, &id, &["deleting"], "error_deleting", &reason).await?;
                let stopped = format!("the cascade delete of volume {} stopped at snapshot {id}", v.id);
                sqlx::query(
                    "UPDATE snapshots SET status = 'error_deleting', status_reason = ?, updated_at = ? \
                     WHERE volume_id = ? AND status = 'deleting'",
                )
                .bind(&stopped)
                .bind(crate::clock::now_ms())
                .bind(&v.id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Some(Cascade::Failed(format!("{stopped}: {reason}"))));
            }
        }
    }
    Ok(None)
}
