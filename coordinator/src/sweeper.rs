//! The orphan sweeper: removes volume and snapshot files that a storage agent holds but the coordinator does
//! not place there (a create that failed on an agent that then went away, a crash between an agent call and
//! its record). It lists the agent first and reads the database second, so a volume placed on the backend
//! while the sweep runs is always seen as placed, never as an orphan.
//!
//! It removes only what this coordinator made: a file whose id no operation of its names. A database that was
//! lost, replaced by an empty one or restored from an older copy knows nothing of volumes made since, and those
//! files are someone's data: they are left alone and reported once each, for an operator to look into.

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use ember_proto::agent::v1 as agent;
use sqlx::Row;
use std::collections::HashSet;
use std::sync::Mutex;

/// Files left alone already reported, so each is reported once per coordinator process.
static REPORTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Whether an operation of this coordinator ever named `id`: as the volume or snapshot it was about, or as the
/// temporary snapshot a forced backup made.
async fn made_here(ctx: &Ctx, id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM operations WHERE resource_id = ?1) \
         OR EXISTS (SELECT 1 FROM operations WHERE kind = 'create_backup' \
                    AND json_extract(payload, '$.temp_snapshot') = ?1)",
    )
    .bind(id)
    .fetch_one(&ctx.db)
    .await?)
}

/// Logs, once per process, that `kind` file `id` on `pool` is left alone, and how an admin adopts it.
fn report_unknown(kind: &str, id: &str, pool: &str) {
    let mut reported = REPORTED.lock().expect("reported");
    if reported.get_or_insert_with(HashSet::new).insert(format!("{pool}/{id}")) {
        let adopt = match kind {
            "volume" => format!("`ember volume manage {pool} {id}` adopts it"),
            _ => format!("`ember snapshot manage VOLUME {id}` adopts it once its volume is known"),
        };
        tracing::warn!(
            id,
            pool,
            "a {kind} file this coordinator has no record of is left alone (a lost or replaced database?); {adopt}"
        );
    }
}

/// Snapshots that running backups of in-use volumes made and still read.
async fn temporary_snapshots(ctx: &Ctx) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT json_extract(payload, '$.temp_snapshot') FROM operations \
         WHERE state = 'running' AND kind = 'create_backup' AND json_extract(payload, '$.temp_snapshot') IS NOT NULL",
    )
    .fetch_all(&ctx.db)
    .await?)
}

/// One sweep over every up storage backend. Returns how many orphans were removed.
pub async fn sweep(ctx: &Ctx) -> Result<usize> {
    let rows =
        sqlx::query("SELECT host, backend, last_heartbeat FROM services WHERE role = 'storage' AND backend != ''")
            .fetch_all(&ctx.db)
            .await?;
    let now = now_ms();
    let mut removed = 0;
    for r in rows {
        let (host, backend): (String, String) = (r.get(0), r.get(1));
        if !crate::fleet::is_up(r.get(2), now, ctx.service_down_ms) {
            continue;
        }
        let Ok(mut client) = ctx.agents.storage(&host).await else { continue };
        let Ok(held) = client.list_resources(agent::ListResourcesRequest { backend: backend.clone() }).await else {
            continue;
        };
        let held = held.into_inner();
        let placed: HashSet<String> = sqlx::query_scalar("SELECT id FROM volumes WHERE host = ? AND backend = ?")
            .bind(&host)
            .bind(&backend)
            .fetch_all(&ctx.db)
            .await?
            .into_iter()
            .collect();
        let snapshots: HashSet<String> = sqlx::query_scalar(
            "SELECT s.id FROM snapshots s JOIN volumes v ON v.id = s.volume_id WHERE v.host = ? AND v.backend = ?",
        )
        .bind(&host)
        .bind(&backend)
        .fetch_all(&ctx.db)
        .await?
        .into_iter()
        .chain(temporary_snapshots(ctx).await?)
        .collect();
        let pool = format!("{host}@{backend}");
        for id in held.volume_ids.iter().filter(|id| !placed.contains(*id)) {
            if !made_here(ctx, id).await? {
                report_unknown("volume", id, &pool);
                continue;
            }
            tracing::warn!(volume_id = %id, %host, %backend, "removing orphaned volume file");
            if client
                .delete_volume(agent::DeleteVolumeRequest { volume_id: id.clone(), backend: backend.clone() })
                .await
                .is_ok()
            {
                removed += 1;
            }
        }
        for id in held.snapshot_ids.iter().filter(|id| !snapshots.contains(*id)) {
            if !made_here(ctx, id).await? {
                report_unknown("snapshot", id, &pool);
                continue;
            }
            tracing::warn!(snapshot_id = %id, %host, %backend, "removing orphaned snapshot file");
            if client
                .delete_snapshot(agent::DeleteSnapshotRequest { snapshot_id: id.clone(), backend: backend.clone() })
                .await
                .is_ok()
            {
                removed += 1;
            }
        }
    }
    Ok(removed)
}
