//! Verifying a whole repository: the agent reads each chunk once, however many backups share it, and names the
//! damaged backups; the coordinator adds the backups it records there that the repository does not hold.

use super::{parse_location, reports_repository, require_up};
use crate::context::Ctx;
use crate::error::Error;
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{DamagedBackup, VerifyRepositoryResponse};
use std::collections::HashSet;
use tonic::Status;

/// Verifies repository `location` (`host@repository`).
pub async fn verify_repository(ctx: &Ctx, location: &str) -> std::result::Result<VerifyRepositoryResponse, Status> {
    let (host, repository) = parse_location("host", location)?;
    {
        let mut conn = ctx.db.acquire().await.map_err(Error::from)?;
        if !reports_repository(&mut conn, host, repository).await? {
            return Err(Error::not_found("repository", location).into());
        }
        require_up(ctx, &mut conn, host, &format!("repository {location}")).await?;
    }
    let report = ctx
        .agents
        .backup(host)
        .await?
        .verify_repository(agent::VerifyRepositoryRequest { repository: repository.into() })
        .await?
        .into_inner();
    // Read after the agent answered: a backup completed meanwhile is on disk by now, so it is not reported
    // absent (at worst one deleted meanwhile is missed).
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM backups WHERE host = ? AND repository = ? AND status IN ('available', 'restoring') ORDER BY id",
    )
    .bind(host)
    .bind(repository)
    .fetch_all(&ctx.db)
    .await
    .map_err(Error::from)?;
    let held: HashSet<&str> = report.backups_checked.iter().map(String::as_str).collect();
    let absent: Vec<String> = recorded.into_iter().filter(|id| !held.contains(id.as_str())).collect();
    tracing::info!(
        location,
        backups = report.backups_checked.len(),
        chunks = report.chunks_checked,
        damaged = report.damaged.len(),
        absent = absent.len(),
        "repository verified"
    );
    Ok(VerifyRepositoryResponse {
        chunks_checked: report.chunks_checked,
        backups_checked: report.backups_checked.len() as u64,
        damaged: report
            .damaged
            .into_iter()
            .map(|d| DamagedBackup {
                backup_id: d.backup_id,
                missing_chunks: d.missing_chunks,
                corrupt_chunks: d.corrupt_chunks,
            })
            .collect(),
        unreadable: report.unreadable,
        absent,
    })
}
