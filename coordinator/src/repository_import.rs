//! Adopting the backups a repository holds that this coordinator does not know. A repository describes itself
//! (docs/backup-format.md): when the coordinator's database is lost, or a new coordinator takes over a backup
//! node, the backups are still there, and this gives them back to their projects. And taking over a repository
//! that another backup agent served: when a backup node dies, its NFS share survives it, and another agent
//! that mounts the share serves its backups from then on.

use crate::backups::{
    BackupRow, SETTLED, deltas, find, location_served, parse_location, reports_repository, repository_zone,
};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::validate;
use ember_common::identity::valid_name;
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{ImportRepositoryBackupsRequest, ImportRepositoryBackupsResponse};
use sqlx::SqliteConnection;
use tonic::Status;

/// Imports every complete backup of repository `req.host` (`host@repository`) whose id is unknown here, as
/// `available`, in one transaction: all of them or, when a quota refuses one, none. The agent's own status
/// (unavailable, say) is passed on as it is.
pub async fn import(
    ctx: &Ctx,
    req: ImportRepositoryBackupsRequest,
) -> std::result::Result<ImportRepositoryBackupsResponse, Status> {
    let (host, repository) = parse_location("host", &req.host)?;
    let fallback = if req.project.is_empty() { "admin" } else { req.project.as_str() };
    validate::project("project", fallback)?;
    {
        let mut conn = ctx.db.acquire().await.map_err(Error::from)?;
        if !reports_repository(&mut conn, host, repository).await? {
            return Err(Error::not_found("repository", &req.host).into());
        }
    }
    let listed = ctx
        .agents
        .backup(host)
        .await?
        .list_stored_backups(agent::ListStoredBackupsRequest { repository: repository.into() })
        .await?
        .into_inner();
    Ok(adopt(ctx, host, repository, fallback, listed).await?)
}

/// Records the listed backups this coordinator does not know (backups whose manifest names no project go to
/// `fallback`), and moves here the listed backups it knows at a location that is no longer served.
async fn adopt(
    ctx: &Ctx,
    host: &str,
    repository: &str,
    fallback: &str,
    listed: agent::ListStoredBackupsResponse,
) -> Result<ImportRepositoryBackupsResponse> {
    let mut found: Vec<(i64, agent::StoredBackup)> =
        listed.backups.into_iter().map(|s| (rfc3339_ms(&s.started_at).unwrap_or_else(now_ms), s)).collect();
    // An incremental starts after its parent is complete: oldest first lists parents before their children.
    found.sort_by(|a, b| (a.0, &a.1.backup_id).cmp(&(b.0, &b.1.backup_id)));

    let mut out = ImportRepositoryBackupsResponse { skipped: listed.unreadable, ..Default::default() };
    let (mut imported, mut moved) = (Vec::new(), Vec::new());
    let mut tx = crate::db::write(&ctx.db).await?;
    let zone = repository_zone(&mut tx, host, repository).await?;
    for (started, s) in found {
        if let Err(why) = check_ids(&s) {
            out.skipped.push(format!("{}: {why}", s.backup_id));
            continue;
        }
        if let Some(known) = find(&mut tx, &s.backup_id).await? {
            if (known.host.as_str(), known.repository.as_str()) == (host, repository) {
                out.already_known += 1;
                continue;
            }
            match move_here(ctx, &mut tx, &known, &s, (host, repository, &zone)).await? {
                Some(why) => out.skipped.push(format!("{}: {why}", s.backup_id)),
                None => moved.push(s.backup_id),
            }
            continue;
        }
        let project = if s.project.is_empty() { fallback } else { s.project.as_str() };
        if !valid_name(project) {
            out.skipped.push(format!("{}: project {project:?} is not a valid project name", s.backup_id));
            continue;
        }
        let size_gb = s.volume_size.div_ceil(1 << 30) as i64;
        ctx.quota.consume(&mut tx, project, &deltas(size_gb)).await?;
        sqlx::query(
            "INSERT INTO backups (id, project, volume_id, name, description, status, size_gb, incremental, parent_id, \
             host, repository, availability_zone, stored_bytes, new_bytes, logical_bytes, progress, created_at, snapshot_id, \
             data_timestamp, updated_at) VALUES (?, ?, ?, ?, ?, 'available', ?, ?, ?, ?, ?, ?, ?, ?, ?, 100, ?, ?, ?, ?)",
        )
        .bind(&s.backup_id)
        .bind(project)
        .bind(&s.volume_id)
        .bind(&s.name)
        .bind(&s.description)
        .bind(size_gb)
        .bind(!s.parent_id.is_empty() as i64)
        .bind(&s.parent_id)
        .bind(host)
        .bind(repository)
        .bind(&zone)
        .bind(s.stored_bytes as i64)
        .bind(s.new_bytes as i64)
        .bind(s.logical_bytes as i64)
        .bind(started)
        .bind(&s.snapshot_id)
        .bind(rfc3339_ms(&s.data_timestamp).unwrap_or(started))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        if let Some(key) = &s.key
            && !crate::encryption::adopt_sealed(&mut tx, &ctx.master_key, &s.backup_id, key).await?
        {
            tracing::warn!(backup_id = %s.backup_id, "the backup's key does not open with this master key");
            out.locked.push(s.backup_id.clone());
        }
        imported.push(s.backup_id);
    }
    for id in &imported {
        out.imported.push(find(&mut tx, id).await?.ok_or_else(|| Error::not_found("backup", id))?.row);
    }
    for id in &moved {
        out.moved.push(find(&mut tx, id).await?.ok_or_else(|| Error::not_found("backup", id))?.row);
    }
    tx.commit().await?;
    tracing::info!(
        host,
        repository,
        imported = imported.len(),
        moved = moved.len(),
        already_known = out.already_known,
        skipped = out.skipped.len(),
        "repository backups imported"
    );
    Ok(out)
}

/// Moves backup `known` to location `to` (host, repository, zone), which lists it as `stored`, when
/// [`move_refusal`] allows; otherwise returns why not.
async fn move_here(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    known: &BackupRow,
    stored: &agent::StoredBackup,
    (host, repository, zone): (&str, &str, &str),
) -> Result<Option<String>> {
    let old_served = location_served(ctx, conn, &known.host, &known.repository).await?;
    let parent_here = match find(conn, &known.parent_id).await? {
        Some(p) => (p.host.as_str(), p.repository.as_str()) == (host, repository),
        None => known.parent_id.is_empty(),
    };
    if let Some(why) = move_refusal(known, stored, old_served, parent_here) {
        return Ok(Some(why));
    }
    sqlx::query("UPDATE backups SET host = ?, repository = ?, availability_zone = ?, updated_at = ? WHERE id = ?")
        .bind(host)
        .bind(repository)
        .bind(zone)
        .bind(now_ms())
        .bind(&known.id)
        .execute(&mut *conn)
        .await?;
    tracing::info!(backup_id = %known.id, from = %format!("{}@{}", known.host, known.repository), "backup moved");
    Ok(None)
}

/// Why backup `known`, which this coordinator records at another location, may not move to the repository
/// that lists it as `stored` (None: it may). A backup moves only from a location no one serves any more, so
/// a copied repository cannot take backups from the agent still serving the original; and never ahead of its
/// parent, since an incremental is restored through its parent's index in the same repository.
fn move_refusal(
    known: &BackupRow,
    stored: &agent::StoredBackup,
    old_served: bool,
    parent_here: bool,
) -> Option<String> {
    let old = format!("{}@{}", known.host, known.repository);
    if (stored.volume_id.as_str(), stored.parent_id.as_str()) != (known.volume_id.as_str(), known.parent_id.as_str()) {
        return Some(format!(
            "this repository's copy is of volume {:?} with parent {:?}, but the backup known here is of volume {:?} \
             with parent {:?}",
            stored.volume_id, stored.parent_id, known.volume_id, known.parent_id
        ));
    }
    if old_served {
        return Some(format!(
            "recorded at {old}, which is still served; a backup moves only from a repository whose agent is down \
             or no longer reports it"
        ));
    }
    if !SETTLED.contains(&known.status.as_str()) {
        return Some(format!("is {} at {old}; only a backup that is {} moves", known.status, SETTLED.join(", ")));
    }
    if !parent_here {
        return Some(format!(
            "its parent {} is not recorded in this repository; move the parent first",
            known.parent_id
        ));
    }
    None
}

/// The ids a manifest records must be ids this coordinator could have made (a repository is data from disk).
fn check_ids(s: &agent::StoredBackup) -> std::result::Result<(), String> {
    let uuid = |v: &str| validate::uuid("id", v).is_ok();
    if !uuid(&s.backup_id) {
        return Err("the backup id is not a lowercase UUID".into());
    }
    if !s.volume_id.is_empty() && !uuid(&s.volume_id) {
        return Err(format!("volume id {:?} is not a lowercase UUID", s.volume_id));
    }
    if !s.parent_id.is_empty() && !uuid(&s.parent_id) {
        return Err(format!("parent id {:?} is not a lowercase UUID", s.parent_id));
    }
    if !s.snapshot_id.is_empty() && !uuid(&s.snapshot_id) {
        return Err(format!("snapshot id {:?} is not a lowercase UUID", s.snapshot_id));
    }
    Ok(())
}

/// An RFC 3339 time in Unix milliseconds.
fn rfc3339_ms(text: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_times_and_ids_are_read_strictly() {
        assert_eq!(rfc3339_ms("2026-11-26T13:46:48.669Z"), Some(1_795_700_808_669));
        assert_eq!(rfc3339_ms("yesterday"), None);
        let good = agent::StoredBackup {
            backup_id: "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e".into(),
            volume_id: "1a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e".into(),
            ..Default::default()
        };
        assert!(check_ids(&good).is_ok());
        let bad_parent = agent::StoredBackup { parent_id: "../x".into(), ..good.clone() };
        assert!(check_ids(&bad_parent).unwrap_err().contains("parent id"));
        let bad_id = agent::StoredBackup { backup_id: "B1".into(), ..good };
        assert!(check_ids(&bad_id).is_err());
    }

    fn known(status: &str, parent: &str) -> BackupRow {
        BackupRow {
            id: "b".into(),
            project: "p1".into(),
            volume_id: "v".into(),
            status: status.into(),
            size_gb: 1,
            parent_id: parent.into(),
            host: "backup1".into(),
            repository: "repo1".into(),
            row: Default::default(),
        }
    }

    #[test]
    fn a_backup_moves_only_from_a_location_no_longer_served_and_never_ahead_of_its_parent() {
        let stored = |parent: &str| agent::StoredBackup {
            backup_id: "b".into(),
            volume_id: "v".into(),
            parent_id: parent.into(),
            ..Default::default()
        };
        for status in SETTLED {
            assert_eq!(move_refusal(&known(status, ""), &stored(""), false, true), None, "{status}");
        }
        let served = move_refusal(&known("available", ""), &stored(""), true, true).unwrap();
        assert!(served.contains("recorded at backup1@repo1, which is still served"), "{served}");
        for status in ["creating", "restoring"] {
            let busy = move_refusal(&known(status, ""), &stored(""), false, true).unwrap();
            assert!(busy.starts_with(&format!("is {status} at backup1@repo1")), "{busy}");
        }
        let orphan = move_refusal(&known("available", "p"), &stored("p"), false, false).unwrap();
        assert!(orphan.contains("its parent p is not recorded in this repository"), "{orphan}");
        let other = agent::StoredBackup { volume_id: "w".into(), ..stored("") };
        let differs = move_refusal(&known("available", ""), &other, false, true).unwrap();
        assert!(differs.contains("copy is of volume \"w\""), "{differs}");
        let reparented = move_refusal(&known("available", ""), &stored("p"), false, true).unwrap();
        assert!(reparented.contains("with parent \"p\""), "{reparented}");
    }
}
