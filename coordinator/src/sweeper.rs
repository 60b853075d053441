//! The orphan sweeper: removes volume and snapshot files that a storage agent holds but the coordinator does
//! not place there (a create that failed on an agent that then went away, a crash between an agent call and
//! its record). It lists the agent first and reads the database second, so a volume placed on the backend
//! while the sweep runs is always seen as placed, never as an orphan.
//!
//! It removes only files this coordinator made and still owns. A file whose id no operation of its names is
//! not its to remove: a database that was lost, replaced by an empty one or restored from an older copy knows
//! nothing of the volumes made since, and those files are someone's data. Nor is one it let go of (unmanaged),
//! nor one whose operations were all purged (`operations::purge_finished`). Such files are left alone and
//! reported once each, for an operator to look into.
//!
//! The other way round, a settled volume or snapshot the database places on a backend that does not hold it (a
//! database restored from an older copy that still lists what was deleted since, or data removed by hand) is
//! reported once too; its record is left as it is.

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use ember_proto::agent::v1 as agent;
use sqlx::Row;
use std::collections::HashSet;
use std::sync::Mutex;

/// Reports already logged, so each is logged once per coordinator process (per spell, see [`Unknown`]).
static REPORTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Operations by which this coordinator let go of a file it made: after one, the file is not its to remove.
const LET_GO: [&str; 4] = ["unmanage_volume", "unmanage_snapshot", "forget_volume", "forget_snapshot"];

/// What this coordinator's operations say of a file on a backend that its database does not place there.
enum Unknown {
    /// It made the file and has not let go of it: an orphan, to remove.
    Orphan,
    /// Not its to remove: made elsewhere, or before the database it has (`since` is empty), or let go of by
    /// the unmanage or forget operation `since`. Each such spell is reported once.
    LeftAlone { since: String },
}

/// Classifies file `id`: an orphan when this coordinator made it and has not let go of it since (the latest of
/// its operations that named it as the volume or snapshot it was about is not an unmanage, or a forced backup
/// named it as the temporary snapshot it made); left alone otherwise.
async fn classify(ctx: &Ctx, id: &str, snapshot: bool) -> Result<Unknown> {
    let latest: Option<(String, String)> = sqlx::query_as(
        "SELECT id, kind FROM operations WHERE resource_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&ctx.db)
    .await?;
    let owned = latest.as_ref().is_some_and(|(_, kind)| !LET_GO.contains(&kind.as_str()));
    // Only a snapshot file can be a forced backup's temporary snapshot; this one looks through every backup made.
    let temporary = snapshot
        && sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM operations WHERE kind = 'create_backup' \
                            AND json_extract(payload, '$.temp_snapshot') = ?)",
        )
        .bind(id)
        .fetch_one(&ctx.db)
        .await?;
    Ok(if owned || temporary {
        Unknown::Orphan
    } else {
        Unknown::LeftAlone { since: latest.map(|(op, _)| op).unwrap_or_default() }
    })
}

/// Logs, once per spell, that `kind` file `id` on `pool` is left alone, and how an admin adopts it.
fn report_unknown(kind: &str, id: &str, pool: &str, since: &str) {
    let mut reported = REPORTED.lock().expect("reported");
    if reported.get_or_insert_with(HashSet::new).insert(format!("{pool}/{id}/{since}")) {
        let adopt = match kind {
            "volume" => format!("`ember volume manage {pool} {id}` adopts it"),
            _ => format!("`ember snapshot manage VOLUME {id}` adopts it once its volume is known"),
        };
        let why = if since.is_empty() { "a lost or replaced database?" } else { "it was unmanaged or forgotten" };
        tracing::warn!(id, pool, "a {kind} file this coordinator has no record of is left alone ({why}); {adopt}");
    }
}

/// Logs, once per process, that the database records `kind` `id` on `pool` but the backend does not hold it.
fn report_missing(kind: &str, id: &str, pool: &str) {
    let mut reported = REPORTED.lock().expect("reported");
    if reported.get_or_insert_with(HashSet::new).insert(format!("missing {pool}/{id}")) {
        tracing::error!(
            id,
            pool,
            "{kind} {id} is recorded on {pool}, but the backend does not hold it (a database restored from an older \
             copy, or data removed by hand?)"
        );
    }
}

/// Reports the settled volumes and snapshots recorded on `host@backend` that `held` (listed at `listed_at`)
/// lacks. Only rows last changed before the listing count: a create that finished since may have made its file
/// after the agent listed its files.
async fn report_records_without_data(
    ctx: &Ctx,
    host: &str,
    backend: &str,
    held: &agent::ListResourcesResponse,
    listed_at: i64,
) -> Result<()> {
    let pool = format!("{host}@{backend}");
    let volumes: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM volumes WHERE host = ? AND backend = ? AND status IN ('available', 'in-use') \
         AND updated_at < ?",
    )
    .bind(host)
    .bind(backend)
    .bind(listed_at)
    .fetch_all(&ctx.db)
    .await?;
    let held_volumes: HashSet<&String> = held.volume_ids.iter().collect();
    for id in volumes.iter().filter(|id| !held_volumes.contains(id)) {
        report_missing("volume", id, &pool);
    }
    let snapshots: Vec<String> = sqlx::query_scalar(
        "SELECT s.id FROM snapshots s JOIN volumes v ON v.id = s.volume_id WHERE v.host = ? AND v.backend = ? \
         AND s.status = 'available' AND s.updated_at < ?",
    )
    .bind(host)
    .bind(backend)
    .bind(listed_at)
    .fetch_all(&ctx.db)
    .await?;
    let held_snapshots: HashSet<&String> = held.snapshot_ids.iter().collect();
    for id in snapshots.iter().filter(|id| !held_snapshots.contains(id)) {
        report_missing("snapshot", id, &pool);
    }
    Ok(())
}

/// Snapshots that running backups of in-use volumes made and still read.
pub(crate) async fn temporary_snapshots(ctx: &Ctx) -> Result<Vec<String>> {
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
        let listed_at = now_ms();
        let Ok(held) = client.list_resources(agent::ListResourcesRequest { backend: backend.clone() }).await else {
            continue;
        };
        let held = held.into_inner();
        report_records_without_data(ctx, &host, &backend, &held, listed_at).await?;
        // A migrating volume is placed on the pool it moves to as well.
        let placed: HashSet<String> = sqlx::query_scalar(
            "SELECT id FROM volumes WHERE (host = ?1 AND backend = ?2) OR (migrate_host = ?1 AND migrate_backend = ?2)",
        )
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
            if let Unknown::LeftAlone { since } = classify(ctx, id, false).await? {
                report_unknown("volume", id, &pool, &since);
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
            if let Unknown::LeftAlone { since } = classify(ctx, id, true).await? {
                report_unknown("snapshot", id, &pool, &since);
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
