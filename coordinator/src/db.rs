//! Opening the SQLite database: created when missing, WAL journal, foreign keys on, migrations applied.

use crate::clock::now_ms;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::time::Duration;

/// Opens (creating if needed) and migrates the database at `path`.
pub async fn open(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a committed transaction survives power loss, which the crash-safety promise needs.
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options).await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    ensure_default_type(&pool).await?;
    Ok(pool)
}

/// A write transaction, as [`write`] begins it.
pub type WriteTx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Starts a write transaction. `BEGIN IMMEDIATE` takes SQLite's write lock up front, so two transactions
/// that both read and then write queue behind each other (busy timeout) instead of one failing with
/// "database is locked" when it tries to upgrade its read lock.
pub async fn write(pool: &SqlitePool) -> Result<WriteTx, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Cinder always has a default volume type (`__DEFAULT__`); so do we, created on first start.
async fn ensure_default_type(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let none: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM volume_types)").fetch_one(pool).await?;
    if none {
        sqlx::query(
            "INSERT INTO volume_types (id, name, description, is_default, created_at) \
             VALUES (?, '__DEFAULT__', 'Default Volume Type', 1, ?)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(now_ms())
        .execute(pool)
        .await?;
    }
    Ok(())
}
