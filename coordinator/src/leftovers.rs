//! What forced detaches and forced instance deletes leave on compute hosts. These do not ask the host (it is down,
//! or an admin gave up on it), so a guest may keep a disk and the host its connection to the volume, or a deleted
//! instance's domain may still run there. Each one is recorded, in the transaction that ends the attachment or the
//! instance, as an operation that has the host let go once it answers again: `release_disk` (remove the disk and
//! disconnect) or `destroy_domain` (stop and undefine the domain).
//!
//! A connection left on a host could reach the volume again as soon as it is exported to that host once more, and a
//! release made after a new attach would remove the new disk. So, while a release is pending, no attach or boot of
//! the same volume on the same host goes further than recording its intent: it waits ([`wait_reason`]), and the
//! release wakes it when done.

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use crate::operations::{self, Op, Outcome};
use ember_proto::agent::v1 as agent;
use sqlx::SqliteConnection;
use std::sync::Arc;

/// The operation kind of a pending disk release.
pub const DISK_KIND: &str = "release_disk";

/// The operation kind of a pending destruction of a deleted instance's domain.
pub const DOMAIN_KIND: &str = "destroy_domain";

/// Records for release what attachment `attachment_id`, ended without its compute host (a forced detach or
/// instance delete), may have left there; in the transaction that removes the attachment. An attachment with no
/// connection recorded never reached its host, so it leaves nothing.
pub async fn record_disk(conn: &mut SqliteConnection, attachment_id: &str) -> Result<()> {
    let row: Option<(String, String, String, String)> =
        sqlx::query_as("SELECT volume_id, instance, host, coalesce(connection, '') FROM attachments WHERE id = ?")
            .bind(attachment_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((volume_id, instance, host, connection)) = row else { return Ok(()) };
    let Ok(connection) = serde_json::from_str::<serde_json::Value>(&connection) else { return Ok(()) };
    if connection.as_object().is_none_or(|c| c.is_empty()) {
        return Ok(());
    }
    let payload = serde_json::json!({
        "volume_id": volume_id, "instance": instance, "host": host, "connection": connection,
    });
    operations::insert(conn, DISK_KIND, "attachment", attachment_id, "releasing", payload).await?;
    tracing::warn!(
        attachment_id,
        %volume_id,
        %host,
        %instance,
        "the disk left without the host will be released when the host answers"
    );
    Ok(())
}

/// Records, in the caller's transaction (the one that removes the instance), that instance `instance_id`'s domain
/// may still run on `host`.
pub async fn record_domain(conn: &mut SqliteConnection, instance_id: &str, host: &str) -> Result<String> {
    let payload = serde_json::json!({ "instance": instance_id, "host": host });
    let op = operations::insert(conn, DOMAIN_KIND, "instance", instance_id, "destroying", payload).await?;
    tracing::warn!(
        instance_id,
        host,
        "the domain of an instance deleted without its host will be destroyed when the host answers"
    );
    Ok(op)
}

/// Why an attach or boot of `volume_id` on `host` must wait, if it must: a disk left there by a forced detach or
/// instance delete is not released yet.
pub async fn wait_reason(conn: &mut SqliteConnection, volume_id: &str, host: &str) -> Result<Option<String>> {
    let pending: Option<(String, String)> = sqlx::query_as(
        "SELECT json_extract(payload, '$.instance'), coalesce(json_extract(payload, '$.refused'), '') \
         FROM operations WHERE kind = ?1 AND state = 'running' \
         AND json_extract(payload, '$.volume_id') = ?2 AND json_extract(payload, '$.host') = ?3 \
         ORDER BY created_at LIMIT 1",
    )
    .bind(DISK_KIND)
    .bind(volume_id)
    .bind(host)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(pending.map(|(instance, refused)| {
        let why = if refused.is_empty() { String::new() } else { format!(" (last try: {refused})") };
        format!("waiting for {host} to release the disk left in instance {instance} by a forced detach or delete{why}")
    }))
}

/// Release flow: the compute agent removes the disk from the domain (if it still has it) and disconnects, or
/// (`destroy_domain`) stops and undefines the domain. A host that cannot be reached is retried until it answers;
/// so is a refusal (a guest that does not let the disk go), which is kept on the operation for the attaches it
/// holds back to show. Then the attaches and boots that waited for it go on.
pub async fn release_flow(ctx: &Arc<Ctx>, mut op: Op) -> Result<Outcome> {
    let text = |k: &str| op.payload[k].as_str().unwrap_or_default().to_string();
    let (volume_id, instance, host) = (text("volume_id"), text("instance"), text("host"));
    let mut compute = ctx.agents.compute(&host).await?;
    let released = if op.kind == DOMAIN_KIND {
        compute.destroy_instance(agent::DestroyInstanceRequest { instance_id: instance.clone() }).await.map(drop)
    } else {
        let connection = crate::attachments::connection_from_json(&op.payload["connection"]);
        let request = agent::DetachVolumeRequest {
            volume_id: volume_id.clone(),
            instance: instance.clone(),
            connection: Some(connection),
        };
        compute.detach_volume(request).await.map(drop)
    };
    match released {
        Ok(()) => {}
        Err(status) if crate::agents::compute_transient(&status) => {
            return Ok(Outcome::Retry(format!("{host} cannot let go of a leftover yet: {}", status.message())));
        }
        Err(status) => {
            op.payload["refused"] = serde_json::Value::from(status.message());
            let step = op.step.clone();
            operations::advance(&mut *ctx.db.acquire().await?, &mut op, &step).await?;
            return Ok(Outcome::Retry(format!("{host} refused to let go of a leftover: {}", status.message())));
        }
    }
    operations::finish(&mut *ctx.db.acquire().await?, &op, None).await?;
    tracing::info!(kind = %op.kind, resource_id = %op.resource_id, %volume_id, %host, %instance, "leftover let go");
    // Attaches wait on their attachment, boots on their instance.
    let waiting: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM attachments WHERE volume_id = ?1 AND host = ?2 \
         UNION SELECT id FROM instances WHERE boot_volume_id = ?1 AND host = ?2",
    )
    .bind(&volume_id)
    .bind(&host)
    .fetch_all(&ctx.db)
    .await?;
    for resource in waiting {
        operations::wake(ctx, &resource).await;
    }
    Ok(Outcome::Finished)
}

/// Ends, as not done, the releases (disks and domains) pending on compute host `host`, which an admin is removing
/// from the fleet as gone for good; returns how many. Inside the caller's transaction.
pub async fn give_up_on_host(conn: &mut SqliteConnection, host: &str) -> Result<u64> {
    let ended = sqlx::query(
        "UPDATE operations SET state = 'failed', error = ?, updated_at = ? \
         WHERE kind IN (?, ?) AND state = 'running' AND json_extract(payload, '$.host') = ?",
    )
    .bind(format!("not done: compute host {host} was removed from the fleet"))
    .bind(now_ms())
    .bind(DISK_KIND)
    .bind(DOMAIN_KIND)
    .bind(host)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(ended)
}
