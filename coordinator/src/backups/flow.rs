//! The durable backup operations the coordinator's workers run: create (with its temporary or named
//! snapshot), delete, restore and the Cinder import. Each records its outcome in the backup's row; the agents
//! move the data.

use super::{BackupRow, agent_is_up, deltas, find, set_status};
use crate::agents::transient;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::volumes::store as volumes;
use crate::{quota, snapshots};
use ember_proto::agent::v1 as agent;
use sqlx::SqliteConnection;
use std::sync::Arc;

/// Import flow: the backup agent converts Cinder's files into its repository → available, sized.
pub async fn import_flow(ctx: &Ctx, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(b) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("backup no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    if b.status != "creating" {
        // Deleted (with force) while it was imported: the delete stops the agent's import and removes its files.
        operations::finish(&mut conn, &op, Some(&format!("backup is {}", b.status))).await?;
        return Ok(Outcome::Finished);
    }
    drop(conn);
    let mut client = ctx.agents.backup(&b.host).await?;
    let call = client
        .import_cinder_backup(agent::ImportCinderBackupRequest {
            backup_id: b.id.clone(),
            repository: b.repository.clone(),
            directory: op.payload["directory"].as_str().unwrap_or_default().into(),
            cinder_backup_id: op.payload["cinder_backup_id"].as_str().unwrap_or_default().into(),
            project: b.project.clone(),
            name: b.row.name.clone(),
        })
        .await;
    let mut tx = crate::db::write(&ctx.db).await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM backups WHERE id = ?").bind(&b.id).fetch_optional(&mut *tx).await?;
    if status.as_deref() != Some("creating") {
        // Deleted meanwhile: its delete owns the row, and releases the quota taken at the start; this import's
        // size is never counted.
        operations::finish(&mut tx, &op, Some("the backup was deleted while it was imported")).await?;
        tx.commit().await?;
        return Ok(Outcome::Finished);
    }
    match call {
        Ok(resp) => {
            let r = resp.into_inner();
            let size_gb = r.volume_size.div_ceil(1 << 30) as i64;
            sqlx::query("UPDATE backups SET volume_id = ?, size_gb = ?, stored_bytes = ?, new_bytes = ?, logical_bytes = ?, progress = 100 WHERE id = ?")
                .bind(&r.volume_id)
                .bind(size_gb)
                .bind(r.stored_bytes as i64)
                .bind(r.new_bytes as i64)
                .bind(r.logical_bytes as i64)
                .bind(&b.id)
                .execute(&mut *tx)
                .await?;
            ctx.quota
                .consume(&mut tx, &b.project, &[quota::Delta { resource: "backup_gigabytes".into(), amount: size_gb }])
                .await?;
            set_status(&mut tx, &b.id, &["creating"], "available", "").await?;
            operations::finish(&mut tx, &op, None).await?;
        }
        Err(s) if s.code() == tonic::Code::Unavailable => return Ok(Outcome::Retry(s.message().to_string())),
        Err(s) => {
            let reason = format!("import failed: {}", s.message());
            set_status(&mut tx, &b.id, &["creating"], "error", &reason).await?;
            operations::finish(&mut tx, &op, Some(&reason)).await?;
        }
    }
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// Where the backup's data lives, for the backup agent: the named snapshot, the temporary one, or the volume.
async fn source_of(
    ctx: &Ctx,
    v: &volumes::VolumeRow,
    b: &BackupRow,
    temporary: Option<&str>,
) -> Result<agent::VolumeSource> {
    let (id, snapshot, size_gb) = match (b.row.snapshot_id.as_str(), temporary) {
        ("", None) => (v.id.clone(), false, v.size_gb),
        ("", Some(t)) => (t.to_string(), true, v.size_gb),
        (named, _) => (named.to_string(), true, b.size_gb),
    };
    location(ctx, v, id, snapshot, size_gb).await
}

/// Volume `v`'s data, or its snapshot `id`'s, on the volume's storage backend.
async fn location(
    ctx: &Ctx,
    v: &volumes::VolumeRow,
    id: String,
    snapshot: bool,
    size_gb: i64,
) -> Result<agent::VolumeSource> {
    Ok(agent::VolumeSource {
        storage_endpoint: ctx.agents.endpoint(&v.host, "storage").await?,
        backend: v.backend.clone(),
        id,
        snapshot,
        size_bytes: (size_gb as u64) << 30,
    })
}

/// Create flow: (temporary snapshot for an in-use volume) → the backup agent backs up → available.
pub async fn create_flow(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(b) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("backup no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    let v = volumes::find(&mut conn, &b.volume_id).await?.ok_or_else(|| Error::not_found("volume", &b.volume_id))?;
    drop(conn);
    let temp = op.payload["temp_snapshot"].as_str().map(String::from);
    if b.status != "creating" {
        // Deleted (with force) before the agent was asked, e.g. while the coordinator was down: only the
        // volume or snapshot it held is left to release.
        return finish_create(ctx, &op, &b, &v, temp.as_deref(), Err(format!("the backup is {}", b.status))).await;
    }
    let mut storage = ctx.agents.storage(&v.host).await?;
    if let Some(t) = &temp {
        let snap = storage
            .create_snapshot(agent::CreateSnapshotRequest {
                snapshot_id: t.clone(),
                volume_id: v.id.clone(),
                backend: v.backend.clone(),
            })
            .await;
        if let Err(s) = snap {
            return finish_create(
                ctx,
                &op,
                &b,
                &v,
                temp.as_deref(),
                Err(format!("temporary snapshot: {}", s.message())),
            )
            .await;
        }
    }
    crate::failpoint::hit("create_backup.calling");
    let mut client = ctx.agents.backup(&b.host).await?;
    // An encrypted volume's backup records its key, sealed, so that the backup can be adopted with it.
    let key = crate::encryption::sealed(&mut *ctx.db.acquire().await?, &b.id).await?;
    let request = agent::CreateBackupRequest {
        backup_id: b.id.clone(),
        repository: b.repository.clone(),
        parent_id: b.parent_id.clone(),
        source: Some(source_of(ctx, &v, &b, temp.as_deref()).await?),
        volume_id: v.id.clone(),
        project: b.project.clone(),
        name: b.row.name.clone(),
        description: b.row.description.clone(),
        snapshot_id: b.row.snapshot_id.clone(),
        data_timestamp: b.row.data_timestamp.map(|t| t.to_string()).unwrap_or_default(),
        key,
    };
    let call = with_progress(ctx, client.clone(), &b.id, "creating", client.create_backup(request)).await;
    match call {
        Ok(resp) => finish_create(ctx, &op, &b, &v, temp.as_deref(), Ok(resp.into_inner())).await,
        // Unreachable, the call cut short by the agent's death, or the storage agent it read from gone mid-way
        // (the backup agent says so, UNAVAILABLE): a restarting agent is waited for, and asked again when an agent
        // registers (the backup agent refuses a second run of a backup it is still making, and answers for one it
        // finished), for as long as a service stays up without heartbeats from the first failure. A backup agent
        // that is down (it was up when the backup was accepted), or a wait that ran out, fails the backup, so that
        // its volume or snapshot is not held until the agent comes back.
        Err(s) if crate::agents::ask_again(&s) => {
            let mut tx = crate::db::write(&ctx.db).await?;
            let up = agent_is_up(ctx, &mut tx, &b.host).await?;
            if operations::wait_for_agent(&mut tx, &mut op, up, ctx.service_down_ms).await? {
                tx.commit().await?;
                return Ok(Outcome::Retry(format!("backup agent {}: {}", b.host, s.message())));
            }
            drop(tx);
            let why = if up {
                format!("backup agent {}: {}", b.host, s.message())
            } else {
                format!("backup agent {} is down ({})", b.host, s.message())
            };
            finish_create(ctx, &op, &b, &v, temp.as_deref(), Err(why)).await
        }
        // The agent's own refusal: the reason names the agent, whose log says more.
        Err(s) => {
            let why = format!("backup agent {}: {}", b.host, s.message());
            finish_create(ctx, &op, &b, &v, temp.as_deref(), Err(why)).await
        }
    }
}

async fn finish_create(
    ctx: &Ctx,
    op: &Op,
    b: &BackupRow,
    v: &volumes::VolumeRow,
    temp: Option<&str>,
    result: std::result::Result<agent::CreateBackupResponse, String>,
) -> Result<Outcome> {
    if let Some(t) = temp
        && let Ok(mut storage) = ctx.agents.storage(&v.host).await
    {
        let _ = storage
            .delete_snapshot(agent::DeleteSnapshotRequest { snapshot_id: t.to_string(), backend: v.backend.clone() })
            .await;
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    // Release what the create held: the volume, or the named snapshot (a temporary one is gone already).
    if !b.row.snapshot_id.is_empty() {
        snapshots::end_backup(&mut tx, &b.row.snapshot_id).await?;
    } else if temp.is_none() {
        volumes::transition(&mut tx, &v.id, &["backing-up"], "available", "").await?;
    }
    match result {
        Ok(r) => {
            sqlx::query(
                "UPDATE backups SET stored_bytes = ?, new_bytes = ?, logical_bytes = ?, progress = 100 WHERE id = ?",
            )
            .bind(r.stored_bytes as i64)
            .bind(r.new_bytes as i64)
            .bind(r.logical_bytes as i64)
            .bind(&b.id)
            .execute(&mut *tx)
            .await?;
            set_status(&mut tx, &b.id, &["creating"], "available", "").await?;
            operations::finish(&mut tx, op, None).await?;
        }
        Err(msg) => {
            let reason = format!("backup failed: {msg}");
            set_status(&mut tx, &b.id, &["creating"], "error", &reason).await?;
            operations::finish(&mut tx, op, Some(&reason)).await?;
        }
    }
    tx.commit().await?;
    ctx.changed(&v.id);
    Ok(Outcome::Finished)
}

/// Delete flow: the backup agent drops the manifest and index → row and quota gone.
pub async fn delete_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(b) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    let mut client = ctx.agents.backup(&b.host).await?;
    if let Err(s) = client
        .delete_backup(agent::DeleteBackupRequest { backup_id: b.id.clone(), repository: b.repository.clone() })
        .await
    {
        if transient(&s) {
            return Ok(Outcome::Retry(s.message().to_string()));
        }
        let mut tx = crate::db::write(&ctx.db).await?;
        set_status(&mut tx, &b.id, &["deleting"], "error_deleting", s.message()).await?;
        operations::finish(&mut tx, &op, Some(s.message())).await?;
        tx.commit().await?;
        return Ok(Outcome::Finished);
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    remove_record(ctx, &mut tx, &b).await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// Describe flow: the backup's name and description as the coordinator has them now → its manifest. Waits
/// while the backup is still being made (its manifest is written at the end, with the names it started with)
/// and while its agent cannot be reached; ends without a call when the backup has no manifest to keep.
pub async fn describe_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let b = find(&mut conn, &op.resource_id).await?;
    let b = match b {
        Some(b) if b.status == "creating" => return Ok(Outcome::Waiting("the backup is still being made".into())),
        Some(b) if matches!(b.status.as_str(), "available" | "restoring") => b,
        _ => {
            operations::finish(&mut conn, &op, None).await?;
            return Ok(Outcome::Finished);
        }
    };
    drop(conn);
    let mut client = ctx.agents.backup(&b.host).await?;
    let call = client
        .describe_backup(agent::DescribeBackupRequest {
            backup_id: b.id.clone(),
            repository: b.repository.clone(),
            name: b.row.name.clone(),
            description: b.row.description.clone(),
        })
        .await;
    let failed = match call {
        Ok(_) => None,
        Err(s) if transient(&s) => return Ok(Outcome::Retry(s.message().to_string())),
        Err(s) => {
            tracing::warn!(backup_id = %b.id, code = ?s.code(), message = s.message(), "manifest not described");
            Some(s.message().to_string())
        }
    };
    let mut conn = ctx.db.acquire().await?;
    operations::finish(&mut conn, &op, failed.as_deref()).await?;
    Ok(Outcome::Finished)
}

/// Removes backup `b`'s row and releases its quota, once: the row may be gone already, e.g. forgotten by an
/// admin while a delete that still reached the agent was on its way.
pub async fn remove_record(ctx: &Ctx, conn: &mut SqliteConnection, b: &BackupRow) -> Result<()> {
    let deleted = sqlx::query("DELETE FROM backups WHERE id = ?").bind(&b.id).execute(&mut *conn).await?;
    crate::encryption::delete_key(conn, &b.id).await?;
    if deleted.rows_affected() == 1 {
        ctx.quota.release(conn, &b.project, &deltas(b.size_gb)).await?;
    }
    Ok(())
}

/// Awaits `call`, an agent call working on backup `id`, while copying the agent's progress into the backup's
/// row (as long as the row is in `status`) every 200 ms, for GetBackup and the CLI's progress bar.
async fn with_progress<T>(
    ctx: &Ctx,
    mut watcher: agent::backup_agent_client::BackupAgentClient<ember_common::access_log::Traced>,
    id: &str,
    status: &str,
    call: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(call);
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            done = &mut call => return done,
            _ = ticker.tick() => {
                let Ok(p) = watcher.get_progress(agent::GetProgressRequest { backup_id: id.into() }).await else {
                    continue;
                };
                let p = p.into_inner();
                if p.running && p.bytes_total > 0 {
                    let percent = (p.bytes_done * 100 / p.bytes_total).min(99) as i64;
                    let _ = sqlx::query(
                        "UPDATE backups SET progress = ?, progress_data_bytes = ? WHERE id = ? AND status = ?",
                    )
                        .bind(percent)
                        .bind(p.data_bytes as i64)
                        .bind(id)
                        .bind(status)
                        .execute(&ctx.db)
                        .await;
                }
            }
        }
    }
}

/// Why a restore failed: what to tell the user, and the backup agent's answer when the call to it failed.
pub struct RestoreFailed {
    /// The reason, naming the backup.
    pub message: String,
    /// The backup agent's host and its answer, when the call to it failed (rather than, say, the backup's
    /// record being gone).
    pub agent: Option<(String, tonic::Status)>,
}

/// Writes backup `backup_id` into volume `v` through the backup agent; `blank` when `v` is new.
pub async fn restore_into(
    ctx: &Ctx,
    backup_id: &str,
    v: &volumes::VolumeRow,
    blank: bool,
) -> std::result::Result<(), RestoreFailed> {
    let failed = |message: String| RestoreFailed { message, agent: None };
    let b = {
        let mut conn = ctx.db.acquire().await.map_err(|e| failed(e.to_string()))?;
        find(&mut conn, backup_id)
            .await
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed(format!("backup {backup_id} no longer exists")))?
    };
    let mut client = ctx.agents.backup(&b.host).await.map_err(|e| failed(e.to_string()))?;
    let target = location(ctx, v, v.id.clone(), false, v.size_gb).await.map_err(|e| failed(e.to_string()))?;
    let request = agent::RestoreBackupRequest {
        backup_id: b.id.clone(),
        repository: b.repository.clone(),
        target: Some(target),
        target_is_blank: blank,
    };
    with_progress(ctx, client.clone(), &b.id, "restoring", client.restore_backup(request)).await.map(|_| ()).map_err(
        |s| RestoreFailed {
            message: format!("restore of backup {}: {}", b.id, s.message()),
            agent: Some((b.host.clone(), s)),
        },
    )
}

/// Puts a backup back to `available` after a restore (whatever its outcome); its progress is its own again.
pub async fn restore_done(conn: &mut SqliteConnection, backup_id: &str) -> Result<()> {
    if set_status(conn, backup_id, &["restoring"], "available", "").await? {
        sqlx::query("UPDATE backups SET progress = 100 WHERE id = ?").bind(backup_id).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Puts back to `available` every backup held `restoring` by no unfinished restore (neither the create of a
/// volume from it nor a restore onto a volume), and returns their ids. The hold and its operation are recorded
/// in one transaction and every restore releases its backup as it ends, so this finds only what an earlier
/// version left held (a create that failed before its restore began did not release it), which could then
/// neither be deleted nor restored again.
pub async fn release_unheld(ctx: &Ctx) -> Result<Vec<String>> {
    let mut tx = crate::db::write(&ctx.db).await?;
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT b.id FROM backups b WHERE b.status = 'restoring' \
         AND NOT EXISTS (SELECT 1 FROM operations o JOIN volumes v ON v.id = o.resource_id \
                         WHERE o.state = 'running' AND o.kind = 'create_volume' AND v.source_backup_id = b.id) \
         AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.state = 'running' AND o.kind = 'restore_backup' \
                         AND json_extract(o.payload, '$.backup_id') = b.id)",
    )
    .fetch_all(&mut *tx)
    .await?;
    for id in &ids {
        restore_done(&mut tx, id).await?;
        tracing::warn!(backup_id = %id, "backup held by no restore released");
    }
    tx.commit().await?;
    Ok(ids)
}

/// Restore onto an existing volume: `restoring-backup` → available, or `error_restoring`.
pub async fn restore_flow(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    let backup_id = op.payload["backup_id"].as_str().unwrap_or_default().to_string();
    let mut conn = ctx.db.acquire().await?;
    let Some(v) = volumes::find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("volume no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    let result = restore_into(ctx, &backup_id, &v, false).await;
    if let Err(RestoreFailed { agent: Some((host, status)), .. }) = &result
        && crate::volumes::flow::backup_agent_restarting(ctx, &mut op, &v, "restoring-backup", host, status).await?
    {
        return Ok(Outcome::Retry(format!("{host}: {}", status.message())));
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    restore_done(&mut tx, &backup_id).await?;
    match result {
        Ok(()) => {
            volumes::transition(&mut tx, &v.id, &["restoring-backup"], "available", "").await?;
            operations::finish(&mut tx, &op, None).await?;
        }
        Err(failed) => {
            let msg = failed.message;
            volumes::transition(&mut tx, &v.id, &["restoring-backup"], "error_restoring", &msg).await?;
            operations::finish(&mut tx, &op, Some(&msg)).await?;
        }
    }
    tx.commit().await?;
    Ok(Outcome::Finished)
}
