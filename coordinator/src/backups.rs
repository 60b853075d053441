//! Backups: `ember.v1.BackupService` and the durable create / delete / restore flows. The coordinator only
//! decides and records; the backup agent reads the volume from the storage agent (and writes restores back)
//! directly.

use crate::auth::{can_see, require_admin, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::volumes::{flow::transient, store as volumes};
use crate::{idempotency, quota, validate};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::backup_service_server::BackupService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// A backup as stored.
#[derive(Debug, Clone)]
pub struct BackupRow {
    /// Id.
    pub id: String,
    /// Project.
    pub project: String,
    /// Volume.
    pub volume_id: String,
    /// Status.
    pub status: String,
    /// Volume size in GiB.
    pub size_gb: i64,
    /// Parent for incrementals.
    pub parent_id: String,
    /// Backup host.
    pub host: String,
    /// Repository on that host.
    pub repository: String,
    /// As the API shows it.
    pub row: Backup,
}

const SELECT: &str = "SELECT id, project, volume_id, name, description, status, status_reason, size_gb, incremental, \
     parent_id, host, repository, stored_bytes, new_bytes, logical_bytes, progress, created_at FROM backups";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> BackupRow {
    let (stored, logical): (i64, i64) = (r.get(12), r.get(14));
    let row = Backup {
        id: r.get(0),
        project: r.get(1),
        volume_id: r.get(2),
        name: r.get(3),
        description: r.get(4),
        status: r.get(5),
        status_reason: r.get(6),
        size_gb: r.get::<i64, _>(7) as u64,
        incremental: r.get::<i64, _>(8) != 0,
        parent_id: r.get(9),
        stored_bytes: stored as u64,
        new_bytes: r.get::<i64, _>(13) as u64,
        dedup_ratio: if stored > 0 { logical as f64 / stored as f64 } else { 1.0 },
        progress_percent: r.get::<i64, _>(15) as u32,
        host: format!("{}@{}", r.get::<String, _>(10), r.get::<String, _>(11)),
        created_at: Some(timestamp(r.get(16))),
    };
    BackupRow {
        id: row.id.clone(),
        project: row.project.clone(),
        volume_id: row.volume_id.clone(),
        status: row.status.clone(),
        size_gb: row.size_gb as i64,
        parent_id: row.parent_id.clone(),
        host: r.get(10),
        repository: r.get(11),
        row,
    }
}

/// The backup with this id, whoever owns it.
pub async fn find(conn: &mut SqliteConnection, id: &str) -> Result<Option<BackupRow>> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = ?")))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(from_row))
}

/// The backup as `who` may see it (NOT_FOUND otherwise).
pub async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<BackupRow> {
    validate::uuid("backup_id", id)?;
    match find(conn, id).await? {
        Some(b) if can_see(who, &b.project) => Ok(b),
        _ => Err(Error::not_found("backup", id)),
    }
}

async fn set_status(conn: &mut SqliteConnection, id: &str, from: &[&str], to: &str, reason: &str) -> Result<bool> {
    crate::status::transition(conn, crate::status::Table::Backups, id, from, to, reason).await
}

/// Takes backup `b` for a restore: `available` → `restoring`, its progress back to 0 (it follows the restore
/// now). The status is the lock: the backup stays undeletable, with one restore at a time, until
/// [`restore_done`].
pub async fn begin_restore(conn: &mut SqliteConnection, b: &BackupRow) -> Result<()> {
    if !set_status(conn, &b.id, &["available"], "restoring", "").await? {
        return Err(Error::FailedPrecondition(format!("backup {} is {}; a restore needs available", b.id, b.status)));
    }
    sqlx::query("UPDATE backups SET progress = 0 WHERE id = ?").bind(&b.id).execute(&mut *conn).await?;
    Ok(())
}

/// The quota deltas of a backup of `size_gb`.
pub fn deltas(size_gb: i64) -> Vec<quota::Delta> {
    vec![
        quota::Delta { resource: "backups".into(), amount: 1 },
        quota::Delta { resource: "backup_gigabytes".into(), amount: size_gb },
    ]
}

/// Picks an up, enabled backup agent repository, preferring the volume's zone.
async fn choose_repository(ctx: &Ctx, conn: &mut SqliteConnection, az: &str) -> Result<(String, String)> {
    let rows = sqlx::query("SELECT host, availability_zone, report, last_heartbeat FROM services WHERE role = 'backup' AND enabled = 1 ORDER BY host")
        .fetch_all(&mut *conn)
        .await?;
    let now = now_ms();
    let mut fallback = None;
    for r in rows {
        if !crate::fleet::is_up(r.get(3), now, ctx.service_down_ms) {
            continue;
        }
        for (name, zone) in reported_repositories(r.get::<&str, _>(2))? {
            let choice = (r.get::<String, _>(0), name);
            if zone == az {
                return Ok(choice);
            }
            fallback.get_or_insert(choice);
        }
    }
    fallback.ok_or_else(|| Error::FailedPrecondition("no backup repository is up and enabled".into()))
}

/// The (name, availability zone) of each repository in a backup agent's stored registration report.
pub fn reported_repositories(report: &str) -> Result<Vec<(String, String)>> {
    let report: serde_json::Value = serde_json::from_str(report)?;
    let field = |repo: &serde_json::Value, key: &str| repo[key].as_str().unwrap_or_default().to_string();
    Ok(report["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|repo| (field(repo, "name"), field(repo, "availability_zone")))
        .collect())
}

/// The gRPC service.
pub struct Backups {
    ctx: Arc<Ctx>,
}

impl Backups {
    /// Serves backups.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Backups { ctx }
    }

    async fn create(&self, who: &Identity, req: CreateBackupRequest) -> Result<Backup> {
        validate::uuid("volume_id", &req.volume_id)?;
        validate::text("name", &req.name, 255)?;
        validate::text("description", &req.description, 255)?;
        idempotency::check_key(&req.idempotency_key)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        let digest = idempotency::digest(serde_json::json!([
            req.volume_id,
            req.name,
            req.description,
            req.incremental,
            req.force
        ]));
        let key = &req.idempotency_key;
        if let Some(id) = idempotency::earlier(&mut tx, idempotency::Table::Backups, &v.project, key, &digest).await? {
            return Ok(find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("backup", &id))?.row);
        }
        let temp_snapshot = match v.status.as_str() {
            "available" => None,
            "in-use" if req.force => Some(uuid::Uuid::new_v4().to_string()),
            "in-use" => {
                return Err(Error::FailedPrecondition(format!("volume {} is in-use; pass force to back it up", v.id)));
            }
            other => {
                return Err(Error::FailedPrecondition(format!("volume {} is {other}; a backup needs available", v.id)));
            }
        };
        let (parent_id, host, repository) = if req.incremental {
            let parent: Option<(String, String, String)> = sqlx::query_as(
                "SELECT id, host, repository FROM backups WHERE volume_id = ? AND status = 'available' ORDER BY created_at DESC LIMIT 1",
            )
            .bind(&v.id)
            .fetch_optional(&mut *tx)
            .await?;
            parent.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume {} has no available backup to build an incremental on; make a full one first",
                    v.id
                ))
            })?
        } else {
            let (h, r) = choose_repository(&self.ctx, &mut tx, &v.availability_zone).await?;
            (String::new(), h, r)
        };
        if temp_snapshot.is_none() {
            volumes::transition(&mut tx, &v.id, &["available"], "backing-up", "").await?;
        }
        self.ctx.quota.consume(&mut tx, &v.project, &deltas(v.size_gb)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO backups (id, project, volume_id, name, description, status, size_gb, incremental, parent_id, host, \
             repository, idempotency_key, request_digest, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&v.project)
        .bind(&v.id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(v.size_gb)
        .bind(req.incremental as i64)
        .bind(&parent_id)
        .bind(&host)
        .bind(&repository)
        .bind(idempotency::column(key))
        .bind(&digest)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let payload = serde_json::json!({ "temp_snapshot": temp_snapshot });
        let op = operations::insert(&mut tx, "create_backup", "backup", &id, "running", payload).await?;
        let b = find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("backup", &id))?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(b.row)
    }

    async fn delete(&self, who: &Identity, id: &str) -> Result<()> {
        validate::uuid("id", id)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let Some(b) = find(&mut tx, id).await? else { return Ok(()) };
        if !can_see(who, &b.project) {
            return Err(Error::not_found("backup", id));
        }
        if b.status == "deleting" {
            return Ok(());
        }
        let children: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM backups WHERE parent_id = ?").bind(id).fetch_one(&mut *tx).await?;
        if children > 0 {
            return Err(Error::FailedPrecondition(format!(
                "backup {id} has {children} incremental backup(s) built on it; delete them first"
            )));
        }
        // `error_deleting` may be retried, as for volumes and snapshots: the repository's trouble (an I/O
        // error, a dead NFS server) is usually gone by the time the user asks again.
        if !set_status(&mut tx, id, &["available", "error", "error_deleting"], "deleting", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "backup {id} is {}; delete needs available, error or error_deleting",
                b.status
            )));
        }
        let op = operations::insert(&mut tx, "delete_backup", "backup", id, "deleting", serde_json::json!({})).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(())
    }

    async fn restore(&self, who: &Identity, req: RestoreBackupRequest) -> Result<RestoreBackupResponse> {
        validate::uuid("backup_id", &req.backup_id)?;
        if req.volume_id.is_empty() {
            // A new volume, scheduled like any create; its create flow restores into it.
            let b = {
                let mut conn = self.ctx.db.acquire().await?;
                visible(&mut conn, who, &req.backup_id).await?
            };
            // Size 0 becomes the backup's; a smaller one is refused by the create, naming size_gb.
            let create = CreateVolumeRequest {
                size_gb: req.size_gb,
                name: req.name.clone(),
                volume_type: req.volume_type.clone(),
                availability_zone: req.availability_zone.clone(),
                backup_id: req.backup_id.clone(),
                project: if who.role == Role::Admin { b.project.clone() } else { String::new() },
                ..Default::default()
            };
            let v = crate::volumes::api::Volumes::new(self.ctx.clone()).create(who, create).await?;
            return Ok(RestoreBackupResponse { backup_id: req.backup_id, volume_id: v.id });
        }
        validate::uuid("volume_id", &req.volume_id)?;
        for (field, given) in [
            ("name", !req.name.is_empty()),
            ("size_gb", req.size_gb != 0),
            ("volume_type", !req.volume_type.is_empty()),
            ("availability_zone", !req.availability_zone.is_empty()),
        ] {
            if given {
                return Err(Error::invalid(field, "is for a new volume; an existing volume keeps its own"));
            }
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let b = visible(&mut tx, who, &req.backup_id).await?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        if v.size_gb < b.size_gb {
            return Err(Error::invalid(
                "volume_id",
                format!("volume {} ({} GiB) is smaller than the backup ({} GiB)", v.id, v.size_gb, b.size_gb),
            ));
        }
        if !volumes::transition(&mut tx, &v.id, &["available"], "restoring-backup", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}; a restore needs available",
                v.id, v.status
            )));
        }
        begin_restore(&mut tx, &b).await?;
        let op = operations::insert(
            &mut tx,
            "restore_backup",
            "volume",
            &v.id,
            "restoring",
            serde_json::json!({ "backup_id": b.id }),
        )
        .await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(RestoreBackupResponse { backup_id: req.backup_id, volume_id: req.volume_id })
    }
}

impl Backups {
    async fn import(&self, r: ImportCinderBackupRequest) -> Result<Backup> {
        if !r.directory.starts_with('/')
            || r.directory.split('/').any(|c| c == "..")
            || r.directory.chars().any(char::is_control)
        {
            return Err(Error::invalid("directory", "must be an absolute path without '..'"));
        }
        validate::uuid("cinder_backup_id", &r.cinder_backup_id)?;
        let project = if r.project.is_empty() { "admin".to_string() } else { r.project.clone() };
        validate::project("project", &project)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let (host, repository) = choose_repository(&self.ctx, &mut tx, "").await?;
        // The size is known once the agent has read Cinder's files; count the backup now, its GiB after.
        self.ctx.quota.consume(&mut tx, &project, &deltas(0)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO backups (id, project, volume_id, name, description, status, size_gb, host, repository, created_at, updated_at) \
             VALUES (?, ?, '', ?, 'imported from Cinder', 'creating', 0, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&project)
        .bind(format!("cinder-{}", r.cinder_backup_id))
        .bind(&host)
        .bind(&repository)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let payload = serde_json::json!({ "directory": r.directory, "cinder_backup_id": r.cinder_backup_id });
        let op = operations::insert(&mut tx, "import_backup", "backup", &id, "importing", payload).await?;
        tx.commit().await?;
        // Run it now and answer with the outcome; a crash leaves the operation for the reconciler, which is
        // kept off it meanwhile.
        self.ctx.running_ops.lock().expect("op set").insert(op.clone());
        let done = import_flow(
            &self.ctx,
            Op {
                id: op.clone(),
                kind: "import_backup".into(),
                resource_id: id.clone(),
                step: "importing".into(),
                attempt: 0,
                payload: serde_json::json!({ "directory": r.directory, "cinder_backup_id": r.cinder_backup_id }),
            },
        )
        .await;
        self.ctx.running_ops.lock().expect("op set").remove(&op);
        done?;
        let mut conn = self.ctx.db.acquire().await?;
        Ok(find(&mut conn, &id).await?.ok_or_else(|| Error::not_found("backup", &id))?.row)
    }
}

/// Import flow: the backup agent converts Cinder's files into its repository → available, sized.
pub async fn import_flow(ctx: &Ctx, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(b) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("backup no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
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

/// Where a volume's data lives, for the backup agent.
async fn source_of(ctx: &Ctx, v: &volumes::VolumeRow, snapshot: Option<&str>) -> Result<agent::VolumeSource> {
    Ok(agent::VolumeSource {
        storage_endpoint: ctx.agents.endpoint(&v.host, "storage").await?,
        backend: v.backend.clone(),
        id: snapshot.map(String::from).unwrap_or_else(|| v.id.clone()),
        snapshot: snapshot.is_some(),
        size_bytes: (v.size_gb as u64) << 30,
    })
}

/// Create flow: (temporary snapshot for an in-use volume) → the backup agent backs up → available.
pub async fn create_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(b) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("backup no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    let v = volumes::find(&mut conn, &b.volume_id).await?.ok_or_else(|| Error::not_found("volume", &b.volume_id))?;
    drop(conn);
    let temp = op.payload["temp_snapshot"].as_str().map(String::from);
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
    let request = agent::CreateBackupRequest {
        backup_id: b.id.clone(),
        repository: b.repository.clone(),
        parent_id: b.parent_id.clone(),
        source: Some(source_of(ctx, &v, temp.as_deref()).await?),
        volume_id: v.id.clone(),
        project: b.project.clone(),
        name: b.row.name.clone(),
        description: b.row.description.clone(),
    };
    let call = with_progress(ctx, client.clone(), &b.id, "creating", client.create_backup(request)).await;
    match call {
        Ok(resp) => finish_create(ctx, &op, &b, &v, temp.as_deref(), Ok(resp.into_inner())).await,
        Err(s) if s.code() == tonic::Code::Unavailable => {
            Ok(Outcome::Retry(format!("backup agent {}: {}", b.host, s.message())))
        }
        Err(s) => finish_create(ctx, &op, &b, &v, temp.as_deref(), Err(s.message().to_string())).await,
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
    volumes::transition(&mut tx, &v.id, &["backing-up"], "available", "").await?;
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
    sqlx::query("DELETE FROM backups WHERE id = ?").bind(&b.id).execute(&mut *tx).await?;
    ctx.quota.release(&mut tx, &b.project, &deltas(b.size_gb)).await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// Awaits `call`, an agent call working on backup `id`, while copying the agent's progress into the backup's
/// row (as long as the row is in `status`) every 200 ms, for GetBackup and the CLI's progress bar.
async fn with_progress<T>(
    ctx: &Ctx,
    mut watcher: agent::backup_agent_client::BackupAgentClient<tonic::transport::Channel>,
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
                    let _ = sqlx::query("UPDATE backups SET progress = ? WHERE id = ? AND status = ?")
                        .bind(percent)
                        .bind(id)
                        .bind(status)
                        .execute(&ctx.db)
                        .await;
                }
            }
        }
    }
}

/// Writes backup `backup_id` into volume `v` through the backup agent; `blank` when `v` is new.
pub async fn restore_into(
    ctx: &Ctx,
    backup_id: &str,
    v: &volumes::VolumeRow,
    blank: bool,
) -> std::result::Result<(), String> {
    let b = {
        let mut conn = ctx.db.acquire().await.map_err(|e| e.to_string())?;
        find(&mut conn, backup_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("backup {backup_id} no longer exists"))?
    };
    let mut client = ctx.agents.backup(&b.host).await.map_err(|e| e.to_string())?;
    let target = source_of(ctx, v, None).await.map_err(|e| e.to_string())?;
    let request = agent::RestoreBackupRequest {
        backup_id: b.id.clone(),
        repository: b.repository.clone(),
        target: Some(target),
        target_is_blank: blank,
    };
    with_progress(ctx, client.clone(), &b.id, "restoring", client.restore_backup(request))
        .await
        .map(|_| ())
        .map_err(|s| format!("restore of backup {}: {}", b.id, s.message()))
}

/// Puts a backup back to `available` after a restore (whatever its outcome); its progress is its own again.
pub async fn restore_done(conn: &mut SqliteConnection, backup_id: &str) -> Result<()> {
    if set_status(conn, backup_id, &["restoring"], "available", "").await? {
        sqlx::query("UPDATE backups SET progress = 100 WHERE id = ?").bind(backup_id).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Restore onto an existing volume: `restoring-backup` → available, or `error_restoring`.
pub async fn restore_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let backup_id = op.payload["backup_id"].as_str().unwrap_or_default().to_string();
    let mut conn = ctx.db.acquire().await?;
    let Some(v) = volumes::find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("volume no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    drop(conn);
    let result = restore_into(ctx, &backup_id, &v, false).await;
    let mut tx = crate::db::write(&ctx.db).await?;
    restore_done(&mut tx, &backup_id).await?;
    match result {
        Ok(()) => {
            volumes::transition(&mut tx, &v.id, &["restoring-backup"], "available", "").await?;
            operations::finish(&mut tx, &op, None).await?;
        }
        Err(msg) => {
            volumes::transition(&mut tx, &v.id, &["restoring-backup"], "error_restoring", &msg).await?;
            operations::finish(&mut tx, &op, Some(&msg)).await?;
        }
    }
    tx.commit().await?;
    Ok(Outcome::Finished)
}

#[tonic::async_trait]
impl BackupService for Backups {
    async fn create_backup(&self, req: Request<CreateBackupRequest>) -> Result<Response<Backup>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.create(&who, req.into_inner()).await?))
    }

    async fn get_backup(&self, req: Request<GetBackupRequest>) -> Result<Response<Backup>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(visible(&mut conn, &who, &req.get_ref().id).await?.row))
    }

    async fn list_backups(&self, req: Request<ListBackupsRequest>) -> Result<Response<ListBackupsResponse>, Status> {
        let who = who(&req)?;
        let project = if who.role == Role::Admin { String::new() } else { who.project.clone().unwrap_or_default() };
        let page = crate::paging::Page::of(req.get_ref().page.as_ref())?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE (?1 = '' OR project = ?1) AND (?2 = '' OR volume_id = ?2) \
             AND (created_at, id) > (?3, ?4) ORDER BY created_at, id LIMIT ?5"
        )))
        .bind(&project)
        .bind(&req.get_ref().volume_id)
        .bind(page.after_ts)
        .bind(&page.after_id)
        .bind(page.limit())
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        let mut rows: Vec<(i64, Backup)> = rows.iter().map(|r| (r.get(16), from_row(r).row)).collect();
        let next = page.cut(&mut rows, |(ts, b)| (*ts, b.id.as_str()));
        Ok(Response::new(ListBackupsResponse { backups: rows.into_iter().map(|(_, b)| b).collect(), page: Some(next) }))
    }

    async fn delete_backup(&self, req: Request<DeleteBackupRequest>) -> Result<Response<DeleteBackupResponse>, Status> {
        let who = who(&req)?;
        self.delete(&who, &req.get_ref().id).await?;
        Ok(Response::new(DeleteBackupResponse {}))
    }

    async fn restore_backup(
        &self,
        req: Request<RestoreBackupRequest>,
    ) -> Result<Response<RestoreBackupResponse>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.restore(&who, req.into_inner()).await?))
    }

    async fn verify_backup(&self, req: Request<VerifyBackupRequest>) -> Result<Response<VerifyBackupResponse>, Status> {
        let who = who(&req)?;
        let b = {
            let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
            visible(&mut conn, &who, &req.get_ref().id).await?
        };
        if b.status != "available" {
            return Err(Error::FailedPrecondition(format!("backup {} is {}", b.id, b.status)).into());
        }
        let mut client = self.ctx.agents.backup(&b.host).await?;
        let r = client
            .verify_backup(agent::VerifyBackupRequest { backup_id: b.id.clone(), repository: b.repository.clone() })
            .await?
            .into_inner();
        Ok(Response::new(VerifyBackupResponse {
            chunks_checked: r.chunks_checked,
            missing_chunks: r.missing_chunks,
            corrupt_chunks: r.corrupt_chunks,
        }))
    }

    async fn collect_garbage(
        &self,
        req: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        require_admin(&req, "collect garbage")?;
        let rows = sqlx::query("SELECT host, report FROM services WHERE role = 'backup'")
            .fetch_all(&self.ctx.db)
            .await
            .map_err(Error::from)?;
        let mut total = CollectGarbageResponse::default();
        for r in rows {
            let host: String = r.get(0);
            for (name, _) in reported_repositories(r.get::<&str, _>(1))? {
                let wanted = req.get_ref().host.is_empty()
                    || req.get_ref().host == host
                    || req.get_ref().host == format!("{host}@{name}");
                if !wanted {
                    continue;
                }
                let mut client = self.ctx.agents.backup(&host).await?;
                let g = client.collect_garbage(agent::CollectGarbageRequest { repository: name }).await?.into_inner();
                total.chunks_removed += g.chunks_removed;
                total.bytes_freed += g.bytes_freed;
            }
        }
        Ok(Response::new(total))
    }

    async fn import_cinder_backup(&self, req: Request<ImportCinderBackupRequest>) -> Result<Response<Backup>, Status> {
        require_admin(&req, "import Cinder backups")?;
        let r = req.into_inner();
        Ok(Response::new(self.import(r).await?))
    }

    async fn import_repository_backups(
        &self,
        req: Request<ImportRepositoryBackupsRequest>,
    ) -> Result<Response<ImportRepositoryBackupsResponse>, Status> {
        require_admin(&req, "import a repository's backups")?;
        Ok(Response::new(crate::repository_import::import(&self.ctx, req.into_inner()).await?))
    }
}
