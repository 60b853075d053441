//! Private volume types (Cinder's `is_public = False` and type access): admins and the projects granted a private
//! type see and use it; to everyone else it does not exist (NOT_FOUND, as an absent type), so its name leaks to
//! no one. A grant taken away leaves the project's volumes of the type as they are.

use crate::error::{Error, Result};
use crate::{validate, volume_types};
use ember_common::identity::{Identity, Role};
use ember_proto::v1::{TypeAccessRequest, TypeAccessResponse};
use sqlx::{SqliteConnection, SqlitePool};

/// The condition on a volume type `t` that a caller may see it: bind whether the caller is an admin (?1), then
/// the caller's project (?2).
pub const VISIBLE_SQL: &str = "(?1 OR t.is_public = 1 OR EXISTS (SELECT 1 FROM volume_type_access a \
                               WHERE a.type_id = t.id AND a.project = ?2))";

/// Whether `who` may see and use type `type_id`.
pub async fn usable(conn: &mut SqliteConnection, who: &Identity, type_id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM volume_types t WHERE t.id = ?3 AND {VISIBLE_SQL})"
    )))
    .bind(who.role == Role::Admin)
    .bind(who.project.as_deref().unwrap_or_default())
    .bind(type_id)
    .fetch_one(&mut *conn)
    .await?)
}

/// The id of type `id_or_name` as `who` may see it: NOT_FOUND when absent or private to other projects.
pub async fn resolve_for(conn: &mut SqliteConnection, who: &Identity, id_or_name: &str) -> Result<String> {
    let id = volume_types::resolve(conn, id_or_name).await?;
    if usable(conn, who, &id).await? { Ok(id) } else { Err(Error::not_found("volume type", id_or_name)) }
}

/// The projects granted private type `type_id`.
pub async fn granted(conn: &mut SqliteConnection, type_id: &str) -> Result<TypeAccessResponse> {
    let projects = sqlx::query_scalar("SELECT project FROM volume_type_access WHERE type_id = ? ORDER BY project")
        .bind(type_id)
        .fetch_all(&mut *conn)
        .await?;
    Ok(TypeAccessResponse { volume_type_id: type_id.to_string(), projects })
}

/// Grants (`add`) or takes away project `req.project`'s use of private type `req.id_or_name`.
pub async fn change(db: &SqlitePool, req: TypeAccessRequest, add: bool) -> Result<TypeAccessResponse> {
    validate::project("project", &req.project)?;
    let mut tx = crate::db::write(db).await?;
    let id = volume_types::resolve(&mut tx, &req.id_or_name).await?;
    let t = volume_types::load(&mut tx, &id).await?;
    if t.is_public {
        return Err(Error::FailedPrecondition(format!(
            "volume type {} is public, so every project may use it; make it private first",
            t.name
        )));
    }
    let sql = if add {
        "INSERT INTO volume_type_access (type_id, project) VALUES (?, ?) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM volume_type_access WHERE type_id = ? AND project = ?"
    };
    sqlx::query(sql).bind(&id).bind(&req.project).execute(&mut *tx).await?;
    let now = granted(&mut tx, &id).await?;
    tx.commit().await?;
    tracing::info!(volume_type_id = %id, project = %req.project, add, "volume type access changed");
    Ok(now)
}
