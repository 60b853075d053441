//! Backups: the stored row and `ember.v1.BackupService` (validation, the status compare-and-swap, quota and
//! the operation row in one transaction); the durable create / delete / restore flows are in [`flow`]. The
//! coordinator only decides and records; the backup agent reads the volume from the storage agent (and writes
//! restores back) directly.

use crate::auth::{can_see, require_admin, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op};
use crate::volumes::store as volumes;
use crate::{idempotency, quota, snapshots, validate};
use ember_common::identity::{Identity, Role, valid_name};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::backup_service_server::BackupService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

mod flow;
mod placement;
mod verify;
pub use flow::{
    RestoreFailed, create_flow, delete_flow, describe_flow, import_flow, release_unheld, restore_done, restore_flow,
    restore_into,
};
use placement::choose_repository;
pub use placement::reported_repositories;

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
     parent_id, host, repository, stored_bytes, new_bytes, logical_bytes, progress, created_at, snapshot_id, data_timestamp, \
     availability_zone, progress_data_bytes FROM backups";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> BackupRow {
    let (stored, logical): (i64, i64) = (r.get(12), r.get(14));
    let status: String = r.get(5);
    // The column follows a running backup or restore; otherwise the backup's own data is what was moved.
    let data_moved = if matches!(status.as_str(), "creating" | "restoring") { r.get(20) } else { logical };
    let row = Backup {
        id: r.get(0),
        project: r.get(1),
        volume_id: r.get(2),
        name: r.get(3),
        description: r.get(4),
        status,
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
        snapshot_id: r.get(17),
        data_timestamp: Some(timestamp(r.get(18))),
        availability_zone: r.get(19),
        progress_data_bytes: data_moved as u64,
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
pub async fn begin_restore(ctx: &Ctx, conn: &mut SqliteConnection, b: &BackupRow) -> Result<()> {
    require_up(ctx, conn, &b.host, &format!("backup {}", b.id)).await?;
    if !set_status(conn, &b.id, &["available"], "restoring", "").await? {
        return Err(Error::FailedPrecondition(format!("backup {} is {}; a restore needs available", b.id, b.status)));
    }
    sqlx::query("UPDATE backups SET progress = 0, progress_data_bytes = 0 WHERE id = ?")
        .bind(&b.id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether backup agent `host` (the `host` part of `host@repository`) is up, by its heartbeats.
pub async fn agent_is_up(ctx: &Ctx, conn: &mut SqliteConnection, host: &str) -> Result<bool> {
    let beat: Option<i64> =
        sqlx::query_scalar("SELECT last_heartbeat FROM services WHERE role = 'backup' AND host = ? LIMIT 1")
            .bind(host)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(beat.is_some_and(|t| crate::fleet::is_up(t, now_ms(), ctx.service_down_ms)))
}

/// Splits `text`, a repository's location `host@repository`, given in request field `field`.
pub fn parse_location<'a>(field: &'static str, text: &'a str) -> Result<(&'a str, &'a str)> {
    text.split_once('@')
        .filter(|(h, r)| valid_name(h) && valid_name(r))
        .ok_or_else(|| Error::invalid(field, format!("{text:?} is not backup-host@repository")))
}

/// Whether `host@repository` is served: its backup agent is up and reports that repository.
pub async fn location_served(ctx: &Ctx, conn: &mut SqliteConnection, host: &str, repository: &str) -> Result<bool> {
    Ok(agent_is_up(ctx, conn, host).await? && reports_repository(conn, host, repository).await?)
}

/// Whether backup agent `host` has registered repository `repository` (up or not).
pub async fn reports_repository(conn: &mut SqliteConnection, host: &str, repository: &str) -> Result<bool> {
    Ok(placement::reported(conn, host, repository).await?.is_some())
}

/// The availability zone of repository `host@repository` as its agent reports it (empty when it does not).
pub async fn repository_zone(conn: &mut SqliteConnection, host: &str, repository: &str) -> Result<String> {
    Ok(placement::reported(conn, host, repository).await?.map(|r| r.availability_zone).unwrap_or_default())
}

/// Backup statuses in which no operation is reading or writing the backup's repository: such a backup may move
/// to another repository or be forgotten. A `deleting` backup's operation reads the backup's row at each
/// attempt, so it finishes on the new location, or at once when the row is gone.
pub const SETTLED: [&str; 4] = ["available", "error", "deleting", "error_deleting"];

/// Every status a backup can be in.
const STATUSES: [&str; 6] = ["creating", "available", "error", "deleting", "error_deleting", "restoring"];

/// Refuses work that needs backup agent `host`, which holds `what`, while that agent is down: a create would
/// hold its volume `backing-up` until the agent came back, and a restore would fail and leave its target in
/// error although nothing touched it.
async fn require_up(ctx: &Ctx, conn: &mut SqliteConnection, host: &str, what: &str) -> Result<()> {
    if agent_is_up(ctx, conn, host).await? {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "backup agent {host}, which holds {what}, is down; try again when it is up, \
         or serve its repository from another backup agent (import-repository)"
    )))
}

/// What a garbage collection asked for `wanted` answers: the totals, unless nothing was collected — then
/// INVALID_ARGUMENT when `wanted` named no repository, FAILED_PRECONDITION with the reasons when every
/// repository asked for was skipped.
fn gc_outcome(wanted: &str, total: CollectGarbageResponse) -> Result<CollectGarbageResponse> {
    if !total.collected.is_empty() {
        return Ok(total);
    }
    if total.skipped.is_empty() {
        if wanted.is_empty() {
            return Ok(total);
        }
        return Err(Error::invalid("host", format!("{wanted:?} is not a registered backup agent or repository")));
    }
    Err(Error::FailedPrecondition(format!("no repository was collected: {}", total.skipped.join("; "))))
}

/// The quota deltas of a backup of `size_gb`.
pub fn deltas(size_gb: i64) -> Vec<quota::Delta> {
    vec![
        quota::Delta { resource: "backups".into(), amount: 1 },
        quota::Delta { resource: "backup_gigabytes".into(), amount: size_gb },
    ]
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
        if !req.availability_zone.is_empty() && !valid_name(&req.availability_zone) {
            return Err(Error::invalid("availability_zone", format!("{:?} is not a zone name", req.availability_zone)));
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        let mut asked =
            serde_json::json!([req.volume_id, req.name, req.description, req.incremental, req.force, req.snapshot_id]);
        if !req.availability_zone.is_empty() {
            // Only when given, so that keys recorded before the field existed still match their repeats.
            asked.as_array_mut().expect("an array").push(req.availability_zone.clone().into());
        }
        let digest = idempotency::digest(asked);
        let key = &req.idempotency_key;
        if let Some(id) = idempotency::earlier(&mut tx, idempotency::Table::Backups, &v.project, key, &digest).await? {
            return Ok(find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("backup", &id))?.row);
        }
        let now = now_ms();
        let source = hold_source(&mut tx, who, &v, &req).await?;
        let (size_gb, data_timestamp) = match &source {
            Source::Snapshot(s) => (s.size_gb, s.created_at),
            _ => (v.size_gb, now),
        };
        let (parent_id, host, repository, zone) = if req.incremental {
            // Only the volume's own project's backups: a volume handed over by a transfer leaves its backups
            // with the old project, and an incremental built on one of them would tie the two projects' backups
            // together (the old owner could not delete theirs, the new one could not see their parent).
            let parent: Option<(String, String, String)> = sqlx::query_as(
                "SELECT id, host, repository FROM backups WHERE volume_id = ? AND project = ? AND status = 'available' \
                 AND data_timestamp <= ? ORDER BY data_timestamp DESC, created_at DESC LIMIT 1",
            )
            .bind(&v.id)
            .bind(&v.project)
            .bind(data_timestamp)
            .fetch_optional(&mut *tx)
            .await?;
            let parent = parent.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume {} has no available backup {}in project {} to build an incremental on; make a full one first",
                    v.id,
                    if matches!(source, Source::Snapshot(_)) { "older than the snapshot " } else { "" },
                    v.project
                ))
            })?;
            // An incremental is made where its parent is.
            require_up(&self.ctx, &mut tx, &parent.1, &format!("the parent backup {}", parent.0)).await?;
            let (id, host, repository) = parent;
            let zone = repository_zone(&mut tx, &host, &repository).await?;
            if !req.availability_zone.is_empty() && req.availability_zone != zone {
                return Err(Error::invalid(
                    "availability_zone",
                    format!(
                        "an incremental is made in its parent's repository, and parent {id} is in {host}@{repository}, \
                         zone {zone:?}"
                    ),
                ));
            }
            (id, host, repository, zone)
        } else {
            let (zone, strict) = match req.availability_zone.as_str() {
                "" => (v.availability_zone.as_str(), false),
                asked => (asked, true),
            };
            let (h, r) = choose_repository(&self.ctx, &mut tx, zone, strict).await?;
            (String::new(), h, r.name, r.availability_zone)
        };
        let (snapshot_id, temp_snapshot) = match source {
            Source::Volume => (String::new(), None),
            Source::TemporarySnapshot(t) => (String::new(), Some(t)),
            Source::Snapshot(s) => (s.id, None),
        };
        self.ctx.quota.consume(&mut tx, &v.project, &deltas(size_gb)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO backups (id, project, volume_id, name, description, status, size_gb, incremental, parent_id, host, \
             repository, availability_zone, idempotency_key, request_digest, snapshot_id, data_timestamp, created_at, \
             updated_at) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&v.project)
        .bind(&v.id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(size_gb)
        .bind(req.incremental as i64)
        .bind(&parent_id)
        .bind(&host)
        .bind(&repository)
        .bind(&zone)
        .bind(idempotency::column(key))
        .bind(&digest)
        .bind(&snapshot_id)
        .bind(data_timestamp)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // The backup holds the volume's ciphertext as it is now, so it keeps the volume's key as it is now.
        crate::encryption::copy_key(&mut tx, &self.ctx.master_key, &v.id, &id).await?;
        let payload = serde_json::json!({ "temp_snapshot": temp_snapshot });
        let op = operations::insert(&mut tx, "create_backup", "backup", &id, "running", payload).await?;
        let b = find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("backup", &id))?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(b.row)
    }

    async fn update(&self, who: &Identity, req: UpdateBackupRequest) -> Result<Backup> {
        validate::uuid("id", &req.id)?;
        if let Some(n) = &req.name {
            validate::text("name", n, 255)?;
        }
        if let Some(d) = &req.description {
            validate::text("description", d, 255)?;
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let b = visible(&mut tx, who, &req.id).await?;
        let (name, description) =
            (req.name.as_ref().unwrap_or(&b.row.name), req.description.as_ref().unwrap_or(&b.row.description));
        let changed = (name, description) != (&b.row.name, &b.row.description);
        sqlx::query("UPDATE backups SET name = ?, description = ?, updated_at = ? WHERE id = ?")
            .bind(name)
            .bind(description)
            .bind(now_ms())
            .bind(&b.id)
            .execute(&mut *tx)
            .await?;
        // The repository keeps its own record of the names (its manifests), for a coordinator that adopts it:
        // an operation carries the change there, now or when the backup is complete and its agent is up.
        let op = if changed {
            Some(
                operations::insert(&mut tx, "describe_backup", "backup", &b.id, "describing", serde_json::json!({}))
                    .await?,
            )
        } else {
            None
        };
        let b = find(&mut tx, &b.id).await?.ok_or_else(|| Error::not_found("backup", &req.id))?;
        tx.commit().await?;
        if let Some(op) = op {
            operations::spawn(&self.ctx, op);
        }
        Ok(b.row)
    }

    async fn delete(&self, who: &Identity, id: &str, forget: bool, force: bool) -> Result<()> {
        validate::uuid("id", id)?;
        if forget && who.role != Role::Admin {
            return Err(Error::PermissionDenied("only admins may forget a backup (forget)".into()));
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let Some(b) = find(&mut tx, id).await? else { return Ok(()) };
        if !can_see(who, &b.project) {
            return Err(Error::not_found("backup", id));
        }
        if b.status == "deleting" && !forget {
            return Ok(());
        }
        let children: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM backups WHERE parent_id = ?").bind(id).fetch_one(&mut *tx).await?;
        if children > 0 {
            return Err(Error::FailedPrecondition(format!(
                "backup {id} has {children} incremental backup(s) built on it; delete them first"
            )));
        }
        if forget {
            return self.forget(tx, &b).await;
        }
        // `error_deleting` may be retried, as for volumes and snapshots: the repository's trouble (an I/O
        // error, a dead NFS server) is usually gone by the time the user asks again. A backup being made is
        // deleted only when asked with force: the agent stops it before it removes its files, and the create
        // flow, finding it deleting, releases what it held. A Cinder import stops the same way.
        let from: &[&str] = if force {
            &["available", "error", "error_deleting", "creating"]
        } else {
            &["available", "error", "error_deleting"]
        };
        if !set_status(&mut tx, id, from, "deleting", "").await? {
            let hint = if b.status == "creating" { "; pass force to stop it and delete it" } else { "" };
            return Err(Error::FailedPrecondition(format!(
                "backup {id} is {}; delete needs available, error or error_deleting{hint}",
                b.status
            )));
        }
        let op = operations::insert(&mut tx, "delete_backup", "backup", id, "deleting", serde_json::json!({})).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(())
    }

    /// Removes backup `b`'s record and releases its quota without its repository, which no agent serves any
    /// more (a backup node lost with its disks): a delete would wait for that agent for ever. Whatever files
    /// are left there stay; should the repository come back, import-repository adopts them again.
    async fn forget(&self, mut tx: sqlx::Transaction<'_, sqlx::Sqlite>, b: &BackupRow) -> Result<()> {
        if !SETTLED.contains(&b.status.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "backup {} is {}; forget needs {}",
                b.id,
                b.status,
                SETTLED.join(", ")
            )));
        }
        if location_served(&self.ctx, &mut tx, &b.host, &b.repository).await? {
            return Err(Error::FailedPrecondition(format!(
                "backup {} is in repository {}@{}, which is served; delete it without forget",
                b.id, b.host, b.repository
            )));
        }
        flow::remove_record(&self.ctx, &mut tx, b).await?;
        tx.commit().await?;
        tracing::warn!(backup_id = %b.id, location = %format!("{}@{}", b.host, b.repository), "backup forgotten");
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
        crate::encryption::key_for_restore(&mut tx, &self.ctx.master_key, &b.id, &v.id).await?;
        if v.size_gb < b.size_gb {
            return Err(Error::invalid(
                "volume_id",
                format!("volume {} ({} GiB) is smaller than the backup ({} GiB)", v.id, v.size_gb, b.size_gb),
            ));
        }
        // A volume a restore failed on holds partial data that nothing vouches for: restoring onto it again is
        // how it is put right.
        if !volumes::transition(&mut tx, &v.id, &["available", "error_restoring"], "restoring-backup", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}; a restore needs available or error_restoring",
                v.id, v.status
            )));
        }
        begin_restore(&self.ctx, &mut tx, &b).await?;
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
        let (host, repository) = choose_repository(&self.ctx, &mut tx, "", false).await?;
        // The size is known once the agent has read Cinder's files; count the backup now, its GiB after.
        self.ctx.quota.consume(&mut tx, &project, &deltas(0)).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO backups (id, project, volume_id, name, description, status, size_gb, host, repository, \
             availability_zone, created_at, data_timestamp, updated_at) \
             VALUES (?, ?, '', ?, 'imported from Cinder', 'creating', 0, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&project)
        .bind(format!("cinder-{}", r.cinder_backup_id))
        .bind(&host)
        .bind(&repository.name)
        .bind(&repository.availability_zone)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let payload = serde_json::json!({ "directory": r.directory, "cinder_backup_id": r.cinder_backup_id });
        let op = operations::insert(&mut tx, "import_backup", "backup", &id, "importing", payload).await?;
        // Run it now and answer with the outcome; a crash leaves the operation for the reconciler, which is
        // kept off it meanwhile: claimed before the commit makes it visible, so no reconcile pass can start a
        // second worker on it. It runs as a task of its own: a caller that goes away (its request dropped)
        // must not take the import with it, or the operation would stay marked as running here, out of the
        // reconciler's reach, and the backup `creating` until a restart.
        self.ctx.workers.claim(&op);
        if let Err(e) = tx.commit().await {
            self.ctx.workers.release(&op);
            return Err(e.into());
        }
        let ctx = self.ctx.clone();
        let flow = Op {
            id: op.clone(),
            kind: "import_backup".into(),
            resource_id: id.clone(),
            step: "importing".into(),
            attempt: 0,
            payload: serde_json::json!({ "directory": r.directory, "cinder_backup_id": r.cinder_backup_id }),
            request_id: ember_common::access_log::current_request_id().unwrap_or_default(),
        };
        let op_id = op.clone();
        let import = tokio::spawn(async move {
            let request_id = flow.request_id.clone();
            let done = ember_common::access_log::with_request_id(request_id, import_flow(&ctx, flow)).await;
            ctx.workers.release(&op);
            done
        });
        match import.await {
            Ok(done) => {
                done?;
            }
            Err(stopped) => {
                // The task panicked: the operation is left to the reconciler.
                self.ctx.workers.release(&op_id);
                return Err(Error::FailedPrecondition(format!(
                    "backup {id}: the import stopped ({stopped}); the coordinator resumes it in the background"
                )));
            }
        }
        let mut conn = self.ctx.db.acquire().await?;
        match find(&mut conn, &id).await? {
            Some(b) if b.status != "deleting" => Ok(b.row),
            _ => Err(Error::FailedPrecondition(format!("backup {id}: the import was stopped, its backup deleted"))),
        }
    }
}
/// What a new backup reads.
enum Source {
    /// The available volume itself, held `backing-up` meanwhile.
    Volume,
    /// A temporary snapshot (this id) of an in-use volume, made and removed by the create flow.
    TemporarySnapshot(String),
    /// An available snapshot of the volume, held `backing-up` meanwhile.
    Snapshot(snapshots::SnapshotRow),
}

/// Decides what a backup of `v` asked for by `req` reads, refusing what cannot be backed up, and holds it
/// (`backing-up`) in the create's transaction.
async fn hold_source(
    conn: &mut SqliteConnection,
    who: &Identity,
    v: &volumes::VolumeRow,
    req: &CreateBackupRequest,
) -> Result<Source> {
    if !req.snapshot_id.is_empty() {
        let s = snapshots::visible(conn, who, &req.snapshot_id).await?;
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot_id",
                format!("{} is a snapshot of volume {}, not of volume_id {}", s.id, s.volume_id, v.id),
            ));
        }
        snapshots::begin_backup(conn, &s).await?;
        return Ok(Source::Snapshot(s));
    }
    match v.status.as_str() {
        "available" => {
            volumes::transition(conn, &v.id, &["available"], "backing-up", "").await?;
            Ok(Source::Volume)
        }
        "in-use" if req.force => Ok(Source::TemporarySnapshot(uuid::Uuid::new_v4().to_string())),
        "in-use" => Err(Error::FailedPrecondition(format!("volume {} is in-use; pass force to back it up", v.id))),
        other => Err(Error::FailedPrecondition(format!("volume {} is {other}; a backup needs available", v.id))),
    }
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
        let (status, host) = (&req.get_ref().status, &req.get_ref().host);
        if !status.is_empty() && !STATUSES.contains(&status.as_str()) {
            return Err(Error::invalid("status", format!("{status:?} is not one of {}", STATUSES.join(", "))).into());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE (?1 = '' OR project = ?1) AND (?2 = '' OR volume_id = ?2) \
             AND (?6 = '' OR status = ?6) AND (?7 = '' OR host = ?7 OR host || '@' || repository = ?7) \
             AND (created_at, id) > (?3, ?4) ORDER BY created_at, id LIMIT ?5"
        )))
        .bind(&project)
        .bind(&req.get_ref().volume_id)
        .bind(page.after_ts)
        .bind(&page.after_id)
        .bind(page.limit())
        .bind(status)
        .bind(host)
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        let mut rows: Vec<(i64, Backup)> = rows.iter().map(|r| (r.get(16), from_row(r).row)).collect();
        let next = page.cut(&mut rows, |(ts, b)| (*ts, b.id.as_str()));
        Ok(Response::new(ListBackupsResponse { backups: rows.into_iter().map(|(_, b)| b).collect(), page: Some(next) }))
    }

    async fn update_backup(&self, req: Request<UpdateBackupRequest>) -> Result<Response<Backup>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.update(&who, req.into_inner()).await?))
    }

    async fn delete_backup(&self, req: Request<DeleteBackupRequest>) -> Result<Response<DeleteBackupResponse>, Status> {
        let who = who(&req)?;
        self.delete(&who, &req.get_ref().id, req.get_ref().forget, req.get_ref().force).await?;
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
            let b = visible(&mut conn, &who, &req.get_ref().id).await?;
            if b.status != "available" {
                return Err(Error::FailedPrecondition(format!("backup {} is {}", b.id, b.status)).into());
            }
            require_up(&self.ctx, &mut conn, &b.host, &format!("backup {}", b.id)).await?;
            b
        };
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
        let wanted = req.into_inner().host;
        let rows = sqlx::query("SELECT host, report, last_heartbeat FROM services WHERE role = 'backup' ORDER BY host")
            .fetch_all(&self.ctx.db)
            .await
            .map_err(Error::from)?;
        let mut total = CollectGarbageResponse::default();
        for r in rows {
            let host: String = r.get(0);
            let up = crate::fleet::is_up(r.get(2), now_ms(), self.ctx.service_down_ms);
            for placement::ReportedRepository { name, .. } in reported_repositories(r.get::<&str, _>(1))? {
                let repository = format!("{host}@{name}");
                if !(wanted.is_empty() || wanted == host || wanted == repository) {
                    continue;
                }
                if !up {
                    total.skipped.push(format!("{repository}: its backup agent is down"));
                    continue;
                }
                let collected = match self.ctx.agents.backup(&host).await {
                    Ok(mut client) => client
                        .collect_garbage(agent::CollectGarbageRequest { repository: name })
                        .await
                        .map(|g| g.into_inner())
                        .map_err(|s| s.message().to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match collected {
                    Ok(g) => {
                        total.chunks_removed += g.chunks_removed;
                        total.bytes_freed += g.bytes_freed;
                        total.collected.push(repository);
                    }
                    Err(why) => total.skipped.push(format!("{repository}: {why}")),
                }
            }
        }
        gc_outcome(&wanted, total).map(Response::new).map_err(Status::from)
    }

    async fn import_cinder_backup(&self, req: Request<ImportCinderBackupRequest>) -> Result<Response<Backup>, Status> {
        require_admin(&req, "import Cinder backups")?;
        let r = req.into_inner();
        Ok(Response::new(self.import(r).await?))
    }

    async fn verify_repository(
        &self,
        req: Request<VerifyRepositoryRequest>,
    ) -> Result<Response<VerifyRepositoryResponse>, Status> {
        require_admin(&req, "verify a repository")?;
        Ok(Response::new(verify::verify_repository(&self.ctx, &req.get_ref().host).await?))
    }

    async fn import_repository_backups(
        &self,
        req: Request<ImportRepositoryBackupsRequest>,
    ) -> Result<Response<ImportRepositoryBackupsResponse>, Status> {
        require_admin(&req, "import a repository's backups")?;
        Ok(Response::new(crate::repository_import::import(&self.ctx, req.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(collected: &[&str], skipped: &[&str]) -> CollectGarbageResponse {
        CollectGarbageResponse {
            chunks_removed: 3,
            bytes_freed: 300,
            collected: collected.iter().map(|s| s.to_string()).collect(),
            skipped: skipped.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn garbage_collection_fails_only_when_nothing_it_asked_for_was_collected() {
        let partial = response(&["b1@r1"], &["b2@r2: its backup agent is down"]);
        assert_eq!(gc_outcome("", partial.clone()).unwrap(), partial, "one down agent does not fail the rest");
        assert_eq!(gc_outcome("", response(&[], &[])).unwrap(), response(&[], &[]), "no repositories at all");
        let unknown = gc_outcome("b9", response(&[], &[])).unwrap_err();
        assert_eq!(tonic::Status::from(unknown).code(), tonic::Code::InvalidArgument);
        let down = gc_outcome("b2", response(&[], &["b2@r2: its backup agent is down"])).unwrap_err();
        let status = tonic::Status::from(down);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("b2@r2: its backup agent is down"), "{}", status.message());
    }
}
