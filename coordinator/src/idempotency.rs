//! Idempotent creates. A client that lost the answer to a create (a timeout, a dropped connection) repeats
//! it with the same `idempotency_key` and gets what the first call made instead of a second resource and a
//! second charge against its quota. The key is scoped to the owning project; reusing it with different
//! parameters is ALREADY_EXISTS, since answering with a resource the client did not ask for would be worse.

use crate::error::{Error, Result};
pub use crate::status::Table;
use crate::validate;
use sha2::Digest;
use sqlx::SqliteConnection;

/// Checks a request's key: empty (no idempotency) or 1–255 characters.
pub fn check_key(key: &str) -> Result<()> {
    validate::text("idempotency_key", key, 255)
}

/// A digest of a create's parameters, given as canonical JSON (fixed order, maps sorted), to tell a repeat
/// from a conflicting reuse of its key.
pub fn digest(parameters: serde_json::Value) -> String {
    hex::encode(sha2::Sha256::digest(parameters.to_string().as_bytes()))
}

/// The id of what `project` created earlier with `key`, if anything; ALREADY_EXISTS if that create had other
/// parameters. Call it inside the create's write transaction, before any state check, so that a repeat is
/// answered even after the first create moved things on.
pub async fn earlier(
    conn: &mut SqliteConnection,
    table: Table,
    project: &str,
    key: &str,
    digest: &str,
) -> Result<Option<String>> {
    if key.is_empty() {
        return Ok(None);
    }
    let sql = format!("SELECT id, request_digest FROM {} WHERE project = ? AND idempotency_key = ?", table.name());
    let existing: Option<(String, String)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(project).bind(key).fetch_optional(&mut *conn).await?;
    match existing {
        Some((id, d)) if d != digest => Err(Error::AlreadyExists(format!(
            "idempotency_key: {key:?} was used for {} {id} with different parameters",
            table.resource()
        ))),
        found => Ok(found.map(|(id, _)| id)),
    }
}

/// The value to store in the row's `idempotency_key` column (NULL when there is none, so that the unique
/// index ignores it).
pub fn column(key: &str) -> Option<&str> {
    (!key.is_empty()).then_some(key)
}
