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

/// What a database copy holds.
#[derive(Debug)]
pub struct Copy {
    /// Volumes in it.
    pub volumes: i64,
    /// Snapshots in it.
    pub snapshots: i64,
    /// Backups in it.
    pub backups: i64,
}

/// Why a database copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The destination exists: a copy never overwrites.
    #[error("{0} exists; name a new file")]
    Exists(std::path::PathBuf),
    /// The database is not there.
    #[error("no database at {0}")]
    NoDatabase(std::path::PathBuf),
    /// SQLite refused.
    #[error("{0}")]
    Sqlite(#[from] sqlx::Error),
    /// The copy is damaged.
    #[error("the copy {path} failed its integrity check: {report}")]
    Damaged {
        /// The copy.
        path: std::path::PathBuf,
        /// What `PRAGMA integrity_check` said.
        report: String,
    },
    /// The copy could not be made durable.
    #[error("syncing {path}: {source}")]
    Sync {
        /// The copy.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Writes a consistent copy of the database at `path` to `to` with `VACUUM INTO`, which reads one snapshot of
/// the database and so may run while a coordinator writes to it (WAL lets readers and the writer be). It never
/// migrates the database (a newer binary must not change one an older coordinator is using) and never
/// overwrites. The copy is made durable and checked (`PRAGMA integrity_check`) before this returns.
pub async fn backup(path: &Path, to: &Path) -> Result<Copy, CopyError> {
    if to.exists() {
        return Err(CopyError::Exists(to.to_path_buf()));
    }
    if !path.exists() {
        return Err(CopyError::NoDatabase(path.to_path_buf()));
    }
    let source = SqliteConnectOptions::new().filename(path).busy_timeout(Duration::from_secs(10));
    let mut conn: sqlx::SqliteConnection = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&source).await?;
    sqlx::query("VACUUM INTO ?").bind(to.to_string_lossy().into_owned()).execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(to).map_err(|source| CopyError::Sync { path: to.to_path_buf(), source })?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync(dir).map_err(|source| CopyError::Sync { path: dir.to_path_buf(), source })?;
    }
    let copy = SqliteConnectOptions::new().filename(to).read_only(true);
    let mut conn: sqlx::SqliteConnection = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&copy).await?;
    let report: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&mut conn).await?;
    if report != ["ok"] {
        return Err(CopyError::Damaged { path: to.to_path_buf(), report: report.join("; ") });
    }
    let count = |table: &'static str| format!("SELECT COUNT(*) FROM {table}");
    let mut counted = [0i64; 3];
    for (n, table) in ["volumes", "snapshots", "backups"].into_iter().enumerate() {
        counted[n] = sqlx::query_scalar(sqlx::AssertSqlSafe(count(table))).fetch_one(&mut conn).await?;
    }
    let [volumes, snapshots, backups] = counted;
    Ok(Copy { volumes, snapshots, backups })
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
