//! Status is the lock: every change of a resource's status is one compare-and-swap
//! (`UPDATE … SET status = ? WHERE id = ? AND status IN (…)`); zero rows changed means the resource was not in
//! a state that allows the change, and the caller answers FAILED_PRECONDITION (or moves on).

use crate::clock::now_ms;
use crate::error::Result;
use sqlx::SqliteConnection;

/// The resource tables: their rows carry a status (and, see [`crate::idempotency`], the key of the create
/// that made them).
#[derive(Debug, Clone, Copy)]
pub enum Table {
    /// `volumes`.
    Volumes,
    /// `snapshots`.
    Snapshots,
    /// `backups`.
    Backups,
}

impl Table {
    /// The SQL table.
    pub fn name(self) -> &'static str {
        match self {
            Table::Volumes => "volumes",
            Table::Snapshots => "snapshots",
            Table::Backups => "backups",
        }
    }

    /// One row's resource, as messages name it.
    pub fn resource(self) -> &'static str {
        match self {
            Table::Volumes => "volume",
            Table::Snapshots => "snapshot",
            Table::Backups => "backup",
        }
    }
}

/// Moves row `id` of `table` from one of `from` to `to`, recording `reason`. Returns whether it moved.
pub async fn transition(
    conn: &mut SqliteConnection,
    table: Table,
    id: &str,
    from: &[&str],
    to: &str,
    reason: &str,
) -> Result<bool> {
    let placeholders = vec!["?"; from.len()].join(", ");
    // Only the table name (from the enum above) and placeholders are spliced in; values are bound.
    let sql = format!(
        "UPDATE {} SET status = ?, status_reason = ?, updated_at = ? WHERE id = ? AND status IN ({placeholders})",
        table.name()
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(to).bind(reason).bind(now_ms()).bind(id);
    for f in from {
        q = q.bind(*f);
    }
    let moved = q.execute(&mut *conn).await?.rows_affected() == 1;
    if moved {
        tracing::info!(table = table.name(), id, status = to, reason, "status");
    }
    Ok(moved)
}
