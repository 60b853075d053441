//! Volume rows: reading them, showing them, and the conditional status changes that act as locks.

use crate::clock::timestamp;
use crate::error::{Error, Result};
use ember_common::identity::{Identity, Role};
use ember_proto::v1::{Volume, VolumeAttachment, VolumeExport};
use sqlx::{Row, SqliteConnection};
use std::collections::HashMap;

/// A volume as stored.
#[derive(Debug, Clone)]
pub struct VolumeRow {
    /// Id.
    pub id: String,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// GiB.
    pub size_gb: i64,
    /// Status.
    pub status: String,
    /// Reason for an error status.
    pub status_reason: String,
    /// Type id.
    pub volume_type_id: String,
    /// Type name.
    pub volume_type_name: String,
    /// AZ.
    pub availability_zone: String,
    /// Storage host.
    pub host: String,
    /// Backend on that host.
    pub backend: String,
    /// User metadata.
    pub metadata: HashMap<String, String>,
    /// Bootable flag.
    pub bootable: bool,
    /// Multiattach allowed.
    pub multiattach: bool,
    /// Source snapshot.
    pub source_snapshot_id: String,
    /// Source volume.
    pub source_volume_id: String,
    /// Source backup.
    pub source_backup_id: String,
    /// CHAP user (empty until first export).
    pub chap_username: String,
    /// CHAP secret.
    pub chap_password: String,
    /// Created.
    pub created_at: i64,
    /// Changed.
    pub updated_at: i64,
    /// While migrating: the host of the pool it moves to; empty otherwise.
    pub migrate_host: String,
    /// While migrating: the backend of that pool.
    pub migrate_backend: String,
    /// Attachments and exports are read-only.
    pub read_only: bool,
    /// While migrating: percent of the copy done.
    pub migrate_progress: i64,
}

const COLUMNS: &str = "v.id, v.project, v.name, v.description, v.size_gb, v.status, v.status_reason, v.volume_type_id, \
     t.name, v.availability_zone, v.host, v.backend, v.metadata, v.bootable, v.multiattach, v.source_snapshot_id, \
     v.source_volume_id, v.chap_username, v.chap_password, v.created_at, v.updated_at, v.source_backup_id, \
     v.migrate_host, v.migrate_backend, v.read_only, v.migrate_progress";

/// `SELECT … FROM volumes v JOIN volume_types t` with the columns [`from_row`] reads.
pub fn select_sql(where_clause: &str) -> String {
    format!("SELECT {COLUMNS} FROM volumes v JOIN volume_types t ON t.id = v.volume_type_id {where_clause}")
}

/// Reads a row selected with [`select_sql`].
pub fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0),
        project: r.get(1),
        name: r.get(2),
        description: r.get(3),
        size_gb: r.get(4),
        status: r.get(5),
        status_reason: r.get(6),
        volume_type_id: r.get(7),
        volume_type_name: r.get(8),
        availability_zone: r.get(9),
        host: r.get(10),
        backend: r.get(11),
        metadata: serde_json::from_str(r.get::<&str, _>(12))?,
        bootable: r.get::<i64, _>(13) != 0,
        multiattach: r.get::<i64, _>(14) != 0,
        source_snapshot_id: r.get(15),
        source_volume_id: r.get(16),
        chap_username: r.get(17),
        chap_password: r.get(18),
        created_at: r.get(19),
        updated_at: r.get(20),
        source_backup_id: r.get(21),
        migrate_host: r.get(22),
        migrate_backend: r.get(23),
        read_only: r.get::<i64, _>(24) != 0,
        migrate_progress: r.get(25),
    })
}

/// The volume, if it exists.
pub async fn find(conn: &mut SqliteConnection, id: &str) -> Result<Option<VolumeRow>> {
    let row =
        sqlx::query(sqlx::AssertSqlSafe(select_sql("WHERE v.id = ?"))).bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// The volume as `who` may see it: NOT_FOUND when absent or in another project (no leak of existence).
pub async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<VolumeRow> {
    crate::validate::uuid("id", id)?;
    match find(conn, id).await? {
        Some(v) if who.role == Role::Admin || who.project.as_deref() == Some(v.project.as_str()) => Ok(v),
        _ => Err(Error::not_found("volume", id)),
    }
}

/// Refuses to `what` (e.g. "migrate") volume `v` while it is exported with InitializeConnection: an initiator
/// outside ember may be reading or writing it, and would lose it (a move) or see its data change beneath it (a
/// revert).
pub async fn refuse_if_exported(conn: &mut SqliteConnection, v: &VolumeRow, what: &str) -> Result<()> {
    let initiators: Vec<String> =
        sqlx::query_scalar("SELECT initiator FROM exports WHERE volume_id = ? ORDER BY created_at")
            .bind(&v.id)
            .fetch_all(&mut *conn)
            .await?;
    if initiators.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "volume {} is exported to {} (ember volume export); to {what} it, unexport it first",
        v.id,
        initiators.join(", ")
    )))
}

/// The API view of a volume, with its attachments and exports.
pub async fn to_proto(conn: &mut SqliteConnection, v: &VolumeRow) -> Result<Volume> {
    let attachments =
        sqlx::query("SELECT id, instance, host, device FROM attachments WHERE volume_id = ? ORDER BY created_at")
            .bind(&v.id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| VolumeAttachment { id: r.get(0), instance: r.get(1), host: r.get(2), device: r.get(3) })
            .collect();
    let encrypted = crate::encryption::has_key(conn, &v.id).await?;
    let exports = sqlx::query(
        "SELECT initiator, read_only, exported_by, created_at FROM exports WHERE volume_id = ? ORDER BY created_at",
    )
    .bind(&v.id)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| VolumeExport {
        initiator: r.get(0),
        read_only: r.get::<i64, _>(1) != 0,
        exported_by: r.get(2),
        created_at: Some(timestamp(r.get(3))),
    })
    .collect();
    Ok(Volume {
        id: v.id.clone(),
        project: v.project.clone(),
        name: v.name.clone(),
        description: v.description.clone(),
        size_gb: v.size_gb as u64,
        status: v.status.clone(),
        status_reason: v.status_reason.clone(),
        volume_type_id: v.volume_type_id.clone(),
        volume_type_name: v.volume_type_name.clone(),
        availability_zone: v.availability_zone.clone(),
        host: if v.host.is_empty() { String::new() } else { format!("{}@{}", v.host, v.backend) },
        metadata: v.metadata.clone(),
        bootable: v.bootable,
        multiattach: v.multiattach,
        source_snapshot_id: v.source_snapshot_id.clone(),
        source_volume_id: v.source_volume_id.clone(),
        source_backup_id: v.source_backup_id.clone(),
        attachments,
        created_at: Some(timestamp(v.created_at)),
        updated_at: Some(timestamp(v.updated_at)),
        migrating_to: if v.migrate_host.is_empty() {
            String::new()
        } else {
            format!("{}@{}", v.migrate_host, v.migrate_backend)
        },
        read_only: v.read_only,
        migration_progress: v.migrate_progress.clamp(0, 100) as u32,
        encrypted,
        exports,
    })
}

/// What still needs volume `id` where it lies: (its snapshots, the volumes being created from it as clones).
pub async fn snapshots_and_clones(conn: &mut SqliteConnection, id: &str) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM snapshots WHERE volume_id = ?1), \
                (SELECT COUNT(*) FROM volumes WHERE source_volume_id = ?1 AND status = 'creating')",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?)
}

/// The backup still being made of volume `id`, if any: it reads the volume where it lies (or a temporary
/// snapshot of it there).
pub async fn backup_in_progress(conn: &mut SqliteConnection, id: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM backups WHERE volume_id = ? AND status = 'creating' LIMIT 1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Compare-and-swap on a volume's status (see [`crate::status`]).
pub async fn transition(conn: &mut SqliteConnection, id: &str, from: &[&str], to: &str, reason: &str) -> Result<bool> {
    crate::status::transition(conn, crate::status::Table::Volumes, id, from, to, reason).await
}

/// Marks a volume filled from an image bootable and keeps the image's facts in its metadata (`image_source`,
/// `image_format`, `image_virtual_size`), as Cinder keeps volume_image_metadata.
pub async fn record_image(
    conn: &mut SqliteConnection,
    v: &VolumeRow,
    source: &str,
    format: &str,
    virtual_size: u64,
) -> Result<()> {
    let mut metadata = v.metadata.clone();
    metadata.insert("image_source".into(), source.into());
    metadata.insert("image_format".into(), format.into());
    metadata.insert("image_virtual_size".into(), virtual_size.to_string());
    sqlx::query("UPDATE volumes SET bootable = 1, metadata = ? WHERE id = ?")
        .bind(serde_json::to_string(&metadata)?)
        .bind(&v.id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
