//! Durable operations. An operation row is written in the same transaction that moves a resource into a
//! transitional state, before any agent is called, and advanced after each step. Workers run the steps; at
//! start (and every few seconds) the reconciler hands every unfinished operation to a worker again, which
//! resumes at the recorded step. Agent calls are idempotent, so repeating the step in flight is safe.

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// One operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Operation id.
    pub id: String,
    /// `create_volume`, `delete_volume`, `extend_volume`, `create_snapshot`, `delete_snapshot`, `attach`,
    /// `detach`.
    pub kind: String,
    /// The resource it acts on.
    pub resource_id: String,
    /// The step reached.
    pub step: String,
    /// Attempts made so far (creates reschedule).
    pub attempt: i64,
    /// Step data (backends tried, target size, ...).
    pub payload: serde_json::Value,
    /// The request that recorded it (empty if none did); agent calls made for it carry this id.
    pub request_id: String,
}

/// Records a new operation; call inside the transaction that changes the resource.
pub async fn insert(
    conn: &mut SqliteConnection,
    kind: &str,
    resource_type: &str,
    resource_id: &str,
    step: &str,
    payload: serde_json::Value,
) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    let request_id = ember_common::access_log::current_request_id().unwrap_or_default();
    sqlx::query(
        "INSERT INTO operations (id, kind, resource_type, resource_id, step, payload, created_at, updated_at, \
         request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(kind)
    .bind(resource_type)
    .bind(resource_id)
    .bind(step)
    .bind(payload.to_string())
    .bind(now)
    .bind(now)
    .bind(request_id)
    .execute(&mut *conn)
    .await?;
    tracing::info!(op_id = %id, kind, resource_id, step, "operation recorded");
    Ok(id)
}

/// Moves an operation to `step` with new step data.
pub async fn advance(conn: &mut SqliteConnection, op: &mut Op, step: &str) -> Result<()> {
    op.step = step.to_string();
    sqlx::query("UPDATE operations SET step = ?, attempt = ?, payload = ?, updated_at = ? WHERE id = ?")
        .bind(step)
        .bind(op.attempt)
        .bind(op.payload.to_string())
        .bind(now_ms())
        .bind(&op.id)
        .execute(&mut *conn)
        .await?;
    tracing::info!(op_id = %op.id, kind = %op.kind, resource_id = %op.resource_id, step, attempt = op.attempt, "operation step");
    Ok(())
}

/// Whether an operation whose agent did not answer should pause and try again later rather than fail: while
/// the agent's service is `up`, and for at most `limit_ms` (the time a silent service is given before it counts
/// as down) from the first such failure, which is recorded in the operation (`unreachable_since_ms`). So an
/// agent being restarted finds the work waiting for it when it registers again, and one that stays away (or
/// that the coordinator cannot reach while its heartbeats arrive) lets the operation fail after all.
pub async fn wait_for_agent(conn: &mut SqliteConnection, op: &mut Op, up: bool, limit_ms: i64) -> Result<bool> {
    let now = now_ms();
    let since = op.payload["unreachable_since_ms"].as_i64();
    if !up || since.is_some_and(|since| now - since >= limit_ms) {
        return Ok(false);
    }
    if since.is_none() {
        op.payload["unreachable_since_ms"] = serde_json::json!(now);
        let step = op.step.clone();
        advance(conn, op, &step).await?;
    }
    Ok(true)
}

/// Records an operation that was done whole inside the caller's transaction, with no agent to call: kept, like
/// every operation, as the history the orphan sweeper reads (until [`purge_finished`]).
pub async fn record_done(
    conn: &mut SqliteConnection,
    kind: &str,
    resource_type: &str,
    resource_id: &str,
) -> Result<()> {
    let id = insert(conn, kind, resource_type, resource_id, "done", serde_json::json!({})).await?;
    sqlx::query("UPDATE operations SET state = 'done' WHERE id = ?").bind(&id).execute(&mut *conn).await?;
    Ok(())
}

/// Marks the running operation of `kind` on `resource_id` forced (`payload.force`): its next attempt leaves out
/// the compute host it waits for.
pub async fn force(conn: &mut SqliteConnection, kind: &str, resource_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE operations SET payload = json_set(payload, '$.force', json('true')), updated_at = ? \
         WHERE kind = ? AND resource_id = ? AND state = 'running'",
    )
    .bind(now_ms())
    .bind(kind)
    .bind(resource_id)
    .execute(&mut *conn)
    .await?;
    tracing::warn!(kind, resource_id, "forced: the compute host will not be asked");
    Ok(())
}

/// Ends an operation.
pub async fn finish(conn: &mut SqliteConnection, op: &Op, failed: Option<&str>) -> Result<()> {
    sqlx::query("UPDATE operations SET state = ?, error = ?, updated_at = ? WHERE id = ?")
        .bind(if failed.is_some() { "failed" } else { "done" })
        .bind(failed.unwrap_or(""))
        .bind(now_ms())
        .bind(&op.id)
        .execute(&mut *conn)
        .await?;
    tracing::info!(op_id = %op.id, kind = %op.kind, resource_id = %op.resource_id, error = failed.unwrap_or(""), "operation finished");
    Ok(())
}

async fn load(ctx: &Ctx, id: &str) -> Result<Option<Op>> {
    let row = sqlx::query(
        "SELECT id, kind, resource_id, step, attempt, payload, request_id FROM operations \
         WHERE id = ? AND state = 'running'",
    )
    .bind(id)
    .fetch_optional(&ctx.db)
    .await?;
    Ok(match row {
        Some(r) => Some(Op {
            id: r.get(0),
            kind: r.get(1),
            resource_id: r.get(2),
            step: r.get(3),
            attempt: r.get(4),
            payload: serde_json::from_str(r.get::<&str, _>(5))?,
            request_id: r.get(6),
        }),
        None => None,
    })
}

/// What a worker reports when it stops.
pub enum Outcome {
    /// The operation reached its end (done or failed) and is recorded so.
    Finished,
    /// A dependency (an agent) could not be reached; the operation stays running and is retried later.
    Retry(String),
    /// The operation waits, as designed, for another one on its resource to end (an update of a backup still
    /// being made). It stays running, and runs again when that one finishes or at the next reconcile pass.
    Waiting(String),
}

/// The operations with a worker running in this process, each with whether it was asked to run again while
/// it ran. A wake that finds a worker busy (an agent registering while the worker waits on that agent's old
/// connection, say) is not lost: the worker runs the operation once more instead of leaving it paused until
/// the next reconcile pass.
#[derive(Default)]
pub struct Workers(std::sync::Mutex<std::collections::HashMap<String, bool>>);

impl Workers {
    /// Claims operation `id` for a new worker. False if a worker has it already, which is then asked to run it
    /// once more when it stops short of the end.
    pub fn claim(&self, id: &str) -> bool {
        let mut running = self.0.lock().expect("worker set");
        match running.get_mut(id) {
            Some(again) => {
                *again = true;
                false
            }
            None => {
                running.insert(id.to_string(), false);
                true
            }
        }
    }

    /// Whether the worker of `id`, which stopped short of the end, should run it again; if not, it is released.
    fn again(&self, id: &str) -> bool {
        let mut running = self.0.lock().expect("worker set");
        if running.get(id) == Some(&true) {
            running.insert(id.to_string(), false);
            return true;
        }
        running.remove(id);
        false
    }

    /// Releases operation `id`: its worker has stopped.
    pub fn release(&self, id: &str) {
        self.0.lock().expect("worker set").remove(id);
    }
}

/// Starts a worker for operation `id` unless one is running in this process.
pub fn spawn(ctx: &Arc<Ctx>, id: String) {
    if !ctx.workers.claim(&id) {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        loop {
            let (result, resource) = match load(&ctx, &id).await {
                Ok(Some(op)) => {
                    let resource = op.resource_id.clone();
                    // The worker runs on behalf of the request that recorded the operation, here or after a
                    // restart.
                    let span = tracing::info_span!("operation", request_id = %op.request_id, op_id = %op.id);
                    let work = run(&ctx, op.clone()).instrument(span);
                    let result = ember_common::access_log::with_request_id(op.request_id, work).await;
                    ctx.changed(&resource);
                    (result, Some(resource))
                }
                Ok(None) => (Ok(Outcome::Finished), None),
                Err(e) => (Err(e), None),
            };
            match result {
                Ok(Outcome::Finished) => {
                    ctx.workers.release(&id);
                    if let Some(resource) = resource {
                        wake(&ctx, &resource).await;
                    }
                    return;
                }
                Ok(Outcome::Retry(why)) => tracing::warn!(op_id = %id, %why, "operation paused; will retry"),
                Ok(Outcome::Waiting(why)) => tracing::debug!(op_id = %id, %why, "operation waiting"),
                Err(e) => tracing::error!(op_id = %id, "operation worker failed: {e}; will retry"),
            }
            if !ctx.workers.again(&id) {
                return;
            }
            tracing::info!(op_id = %id, "operation woken while it ran; running it again");
        }
    });
}

/// Runs now, rather than at the next reconcile pass, the operations still running on `resource`: one may
/// have been waiting for an operation that just ended, or been changed (a detach forced). Every operation may
/// run at any time (the reconcile pass runs them all), so running one early is safe; one already running in
/// this process is left to its worker.
pub async fn wake(ctx: &Arc<Ctx>, resource: &str) {
    let running: Vec<String> =
        match sqlx::query_scalar("SELECT id FROM operations WHERE state = 'running' AND resource_id = ?")
            .bind(resource)
            .fetch_all(&ctx.db)
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(resource_id = %resource, "finding operations to wake: {e}");
                return;
            }
        };
    for id in running {
        spawn(ctx, id);
    }
}

async fn run(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    match op.kind.as_str() {
        "create_volume" => crate::volumes::flow::create(ctx, op).await,
        "delete_volume" => crate::volumes::flow::delete(ctx, op).await,
        "extend_volume" => crate::volumes::flow::extend(ctx, op).await,
        "unmanage_volume" => crate::volumes::manage::unmanage_flow(ctx, op).await,
        "revert_volume" => crate::volumes::revert::revert_flow(ctx, op).await,
        "migrate_volume" => crate::volumes::migrate::migrate_flow(ctx, op).await,
        "create_snapshot" => crate::snapshots::create_flow(ctx, op).await,
        "delete_snapshot" => crate::snapshots::delete_flow(ctx, op).await,
        "create_backup" => crate::backups::create_flow(ctx, op).await,
        "delete_backup" => crate::backups::delete_flow(ctx, op).await,
        "describe_backup" => crate::backups::describe_flow(ctx, op).await,
        "restore_backup" => crate::backups::restore_flow(ctx, op).await,
        "import_backup" => crate::backups::import_flow(ctx, op).await,
        "attach" => crate::attachments::attach_flow(ctx, op).await,
        "detach" => crate::attachments::detach_flow(ctx, op).await,
        crate::leftovers::DISK_KIND | crate::leftovers::DOMAIN_KIND => crate::leftovers::release_flow(ctx, op).await,
        "boot_instance" => crate::instances::boot_flow(ctx, op).await,
        "delete_instance" => crate::instances::delete_flow(ctx, op).await,
        other => {
            let mut conn = ctx.db.acquire().await?;
            finish(&mut conn, &op, Some(&format!("unknown operation kind {other}"))).await?;
            Ok(Outcome::Finished)
        }
    }
}

/// Hands every unfinished operation to a worker now, then again every `every`; sweeps orphans and releases
/// backups held by no restore each time.
pub async fn reconcile_forever(ctx: Arc<Ctx>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match crate::sweeper::sweep(&ctx).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(removed = n, "orphan sweep removed files"),
            Err(e) => tracing::error!("orphan sweep: {e}"),
        }
        if let Err(e) = crate::backups::release_unheld(&ctx).await {
            tracing::error!("releasing backups held by no restore: {e}");
        }
        resume_all(ctx.clone()).await;
    }
}

/// Hands every unfinished operation to a worker (those already running in this process keep theirs).
pub async fn resume_all(ctx: Arc<Ctx>) {
    match sqlx::query_scalar::<_, String>("SELECT id FROM operations WHERE state = 'running' ORDER BY created_at")
        .fetch_all(&ctx.db)
        .await
    {
        Ok(ids) => {
            for id in ids {
                spawn(&ctx, id);
            }
        }
        Err(e) => tracing::error!("resuming operations: {e}"),
    }
}

/// How many finished operations one purge statement removes, so that the write lock is held briefly.
const PURGE_BATCH: i64 = 1000;

/// Removes the operations that finished before `cutoff_ms` (ms since the epoch); returns how many.
///
/// This is safe for the orphan sweeper, which removes a file only when the latest operation naming it is not an
/// unmanage or forget. A resource runs one operation at a time, so each of its operations finished before the
/// next one began: a purge that removes an unmanage removes every earlier operation of that resource too, and
/// never leaves an older operation to claim a file that was let go. A file whose history is gone is left alone
/// and reported, never removed.
pub async fn purge_finished(db: &sqlx::SqlitePool, cutoff_ms: i64) -> Result<u64> {
    let mut purged = 0;
    loop {
        let mut tx = crate::db::write(db).await?;
        let removed = sqlx::query(
            "DELETE FROM operations WHERE rowid IN \
             (SELECT rowid FROM operations WHERE state != 'running' AND updated_at < ? LIMIT ?)",
        )
        .bind(cutoff_ms)
        .bind(PURGE_BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        purged += removed;
        if removed < PURGE_BATCH as u64 {
            return Ok(purged);
        }
    }
}

/// Purges operations finished more than `retention` ago, now and then every hour; a zero retention keeps them.
pub async fn purge_forever(db: sqlx::SqlitePool, retention: Duration) {
    if retention.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(3600));
    loop {
        ticker.tick().await;
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match purge_finished(&db, cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(purged = n, retention_days = retention.as_secs() / 86_400, "finished operations purged")
            }
            Err(e) => tracing::error!("purging finished operations: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Workers;

    #[test]
    fn a_wake_while_the_worker_runs_makes_it_run_once_more() {
        let workers = Workers::default();
        assert!(workers.claim("op1"), "the first claim starts a worker");
        assert!(!workers.claim("op1"), "a second worker started");
        assert!(!workers.claim("op1"), "a third worker started");
        assert!(workers.again("op1"), "the wakes were lost");
        assert!(!workers.again("op1"), "two wakes during one run make one more run, not two");
        assert!(workers.claim("op1"), "the worker that stopped still holds the operation");
    }

    #[test]
    fn a_released_operation_can_be_claimed_again() {
        let workers = Workers::default();
        assert!(workers.claim("op1"));
        assert!(!workers.claim("op1"));
        workers.release("op1");
        assert!(workers.claim("op1"), "a release left the operation claimed");
        assert!(!workers.again("op1"), "a fresh claim is asked to run again");
    }
}
