//! `ember.v1.TransferService`: a volume offered by one project and accepted into another, as Cinder's volume
//! transfers. The data stays where it is, so each call is one transaction: an offer moves the volume to
//! `awaiting-transfer`, and an accept moves the volume, its snapshots and their quota usage between projects at
//! once, or changes nothing. The key is kept only as a salted sha256.
//!
//! One agent call comes first in an accept: the volume's storage agent closes every export the offering project
//! made (`InitializeConnection`), and the accept then forgets the volume's CHAP credentials, so the next export
//! gets new ones. Without it the old owner could go on reading and writing the volume with the target and
//! secret it already had (Cinder keeps both). The close is idempotent; a crash after it leaves the offer as it
//! was, and an accept that cannot reach the agent is refused.

use crate::auth::{can_see, project_for, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::volumes::store as volumes;
use crate::{operations, quota, validate};
use ember_common::identity::{Identity, Role};
use ember_proto::v1::transfer_service_server::TransferService;
use ember_proto::v1::*;
use sha2::Digest;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const SELECT: &str = "SELECT id, volume_id, name, project, salt, key_sha256, created_at FROM transfers";

/// One transfer row.
struct TransferRow {
    id: String,
    volume_id: String,
    name: String,
    project: String,
    salt: String,
    key_sha256: String,
    created_at: i64,
}

fn from_row(r: &sqlx::sqlite::SqliteRow) -> TransferRow {
    TransferRow {
        id: r.get(0),
        volume_id: r.get(1),
        name: r.get(2),
        project: r.get(3),
        salt: r.get(4),
        key_sha256: r.get(5),
        created_at: r.get(6),
    }
}

fn to_proto(t: &TransferRow) -> Transfer {
    Transfer {
        id: t.id.clone(),
        volume_id: t.volume_id.clone(),
        name: t.name.clone(),
        project: t.project.clone(),
        created_at: Some(timestamp(t.created_at)),
        ..Default::default()
    }
}

/// The stored form of a key: hex sha256 of salt and key.
fn key_digest(salt: &str, key: &str) -> String {
    hex::encode(sha2::Sha256::new().chain_update(salt.as_bytes()).chain_update(key.as_bytes()).finalize())
}

/// Whether `key` is the transfer's key, compared without an early exit.
fn key_matches(t: &TransferRow, key: &str) -> bool {
    let (given, stored) = (key_digest(&t.salt, key), t.key_sha256.as_bytes());
    given.len() == stored.len() && given.bytes().zip(stored).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Transfer `id` if `who` may see it (its offering project, or an admin).
async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<TransferRow> {
    validate::uuid("id", id)?;
    match find(conn, id).await? {
        Some(t) if can_see(who, &t.project) => Ok(t),
        _ => Err(Error::not_found("transfer", id)),
    }
}

async fn find(conn: &mut SqliteConnection, id: &str) -> Result<Option<TransferRow>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = ?"))).bind(id).fetch_optional(conn).await?;
    Ok(row.as_ref().map(from_row))
}

/// The sizes of volume `volume_id`'s snapshots, all of which must be `available`: one being made, deleted or read
/// by a backup would end against the project it started in.
async fn settled_snapshot_sizes(conn: &mut SqliteConnection, volume_id: &str) -> Result<Vec<i64>> {
    crate::snapshots::sizes_unless(conn, volume_id, |s| s != "available", "a transfer needs every snapshot available")
        .await
}

/// Removes the offer of volume `volume_id`, if any (the volume is forgotten).
pub async fn remove_for_volume(conn: &mut SqliteConnection, volume_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM transfers WHERE volume_id = ?").bind(volume_id).execute(conn).await?;
    Ok(())
}

/// The gRPC service.
pub struct Transfers {
    ctx: Arc<Ctx>,
}

impl Transfers {
    /// Serves transfers.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Transfers { ctx }
    }

    async fn create(&self, who: &Identity, req: CreateTransferRequest) -> Result<Transfer> {
        validate::uuid("volume_id", &req.volume_id)?;
        validate::text("name", &req.name, 255)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        settled_snapshot_sizes(&mut tx, &v.id).await?;
        if !volumes::transition(&mut tx, &v.id, &["available"], "awaiting-transfer", "").await? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}; a transfer needs available",
                v.id, v.status
            )));
        }
        let key = crate::volumes::exports::random_string(16);
        let t = TransferRow {
            id: uuid::Uuid::new_v4().to_string(),
            volume_id: v.id.clone(),
            name: req.name,
            project: v.project.clone(),
            salt: crate::volumes::exports::random_string(16),
            key_sha256: String::new(),
            created_at: now_ms(),
        };
        sqlx::query(
            "INSERT INTO transfers (id, volume_id, name, project, salt, key_sha256, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.volume_id)
        .bind(&t.name)
        .bind(&t.project)
        .bind(&t.salt)
        .bind(key_digest(&t.salt, &key))
        .bind(t.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.ctx.changed(&v.id);
        tracing::info!(transfer_id = %t.id, volume_id = %v.id, project = %v.project, "volume offered for transfer");
        Ok(Transfer { auth_key: key, ..to_proto(&t) })
    }

    async fn delete(&self, who: &Identity, id: &str) -> Result<()> {
        validate::uuid("id", id)?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let Some(t) = find(&mut tx, id).await? else { return Ok(()) };
        if !can_see(who, &t.project) {
            return Err(Error::not_found("transfer", id));
        }
        sqlx::query("DELETE FROM transfers WHERE id = ?").bind(id).execute(&mut *tx).await?;
        volumes::transition(&mut tx, &t.volume_id, &["awaiting-transfer"], "available", "").await?;
        tx.commit().await?;
        self.ctx.changed(&t.volume_id);
        tracing::info!(transfer_id = %id, volume_id = %t.volume_id, "transfer withdrawn");
        Ok(())
    }

    /// Has the volume's storage agent remove every export of it (all initiators, the target, its CHAP account).
    async fn close_exports(&self, v: &volumes::VolumeRow) -> Result<()> {
        let request = ember_proto::agent::v1::UnexportVolumeRequest {
            volume_id: v.id.clone(),
            backend: v.backend.clone(),
            initiator: String::new(),
        };
        self.ctx.agents.storage(&v.host).await?.unexport_volume(request).await.map_err(|s| {
            let what = format!(
                "volume {}: its exports must be closed before it changes hands, and storage node {} could not do it",
                v.id, v.host
            );
            Error::from_agent(&what, &s)
        })?;
        tracing::info!(volume_id = %v.id, "exports closed for a transfer");
        Ok(())
    }

    async fn accept(&self, who: &Identity, req: AcceptTransferRequest) -> Result<Transfer> {
        validate::uuid("id", &req.id)?;
        if req.auth_key.is_empty() {
            return Err(Error::invalid("auth_key", "must not be empty"));
        }
        let receiver = project_for(who, &req.project)?;
        // Every check first, in a transaction rolled back: a refusal (a wrong key, the receiver's quota) must
        // not cost the owner their exports. Then the exports are closed, outside any transaction (an agent
        // call), and the same checks run again in the transaction that moves the volume.
        let (_, v, _) = self.move_volume(&mut *crate::db::write(&self.ctx.db).await?, &req, &receiver).await?;
        self.close_exports(&v).await?;
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let (t, v, snapshots) = self.move_volume(&mut tx, &req, &receiver).await?;
        operations::record_done(&mut tx, "transfer_volume", "volume", &v.id).await?;
        tx.commit().await?;
        self.ctx.changed(&v.id);
        tracing::info!(transfer_id = %t.id, volume_id = %v.id, from = %t.project, to = %receiver, snapshots, "volume transferred");
        Ok(Transfer { project: receiver, accepted_at: Some(timestamp(now_ms())), ..to_proto(&t) })
    }

    /// Checks an accept and moves the volume, its snapshots and their quota usage to `receiver` in `tx` (which
    /// the caller commits or drops). Returns the transfer, the volume as it was, and its number of snapshots.
    async fn move_volume(
        &self,
        tx: &mut SqliteConnection,
        req: &AcceptTransferRequest,
        receiver: &str,
    ) -> Result<(TransferRow, volumes::VolumeRow, usize)> {
        // Anyone given the id and the key may accept: the offering project need not be visible to them.
        let Some(t) = find(tx, &req.id).await? else { return Err(Error::not_found("transfer", &req.id)) };
        if !key_matches(&t, &req.auth_key) {
            tracing::warn!(transfer_id = %t.id, project = %receiver, "transfer accept with a wrong key");
            return Err(Error::PermissionDenied(format!("auth_key: not the key of transfer {}", t.id)));
        }
        if receiver == t.project {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is already in project {receiver}; delete the transfer instead",
                t.volume_id
            )));
        }
        let v = volumes::find(tx, &t.volume_id).await?.ok_or_else(|| Error::not_found("volume", &t.volume_id))?;
        let snapshot_sizes = settled_snapshot_sizes(tx, &v.id).await?;
        let usage = quota::volume_with_snapshots(&v.volume_type_name, v.size_gb, &snapshot_sizes);
        self.ctx.quota.consume(tx, receiver, &usage).await?;
        self.ctx.quota.release(tx, &t.project, &usage).await?;
        // Idempotency keys belong to the offering project's requests; kept, they could clash with the receiver's.
        // The CHAP credentials go too (the old owner knew them): the next export makes new ones.
        sqlx::query(
            "UPDATE volumes SET project = ?, idempotency_key = NULL, status = 'available', status_reason = '', \
             chap_username = '', chap_password = '', updated_at = ? WHERE id = ? AND status = 'awaiting-transfer'",
        )
        .bind(receiver)
        .bind(now_ms())
        .bind(&v.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE snapshots SET project = ?, idempotency_key = NULL, updated_at = ? WHERE volume_id = ?")
            .bind(receiver)
            .bind(now_ms())
            .bind(&v.id)
            .execute(&mut *tx)
            .await?;
        // The storage agent closed them all before this transaction.
        sqlx::query("DELETE FROM exports WHERE volume_id = ?").bind(&v.id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM transfers WHERE id = ?").bind(&t.id).execute(&mut *tx).await?;
        Ok((t, v, snapshot_sizes.len()))
    }
}

#[tonic::async_trait]
impl TransferService for Transfers {
    async fn create_transfer(&self, req: Request<CreateTransferRequest>) -> Result<Response<Transfer>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.create(&who, req.into_inner()).await?))
    }

    async fn get_transfer(&self, req: Request<GetTransferRequest>) -> Result<Response<Transfer>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(to_proto(&visible(&mut conn, &who, &req.get_ref().id).await?)))
    }

    async fn list_transfers(
        &self,
        req: Request<ListTransfersRequest>,
    ) -> Result<Response<ListTransfersResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let project = if who.role == Role::Admin { String::new() } else { who.project.clone().unwrap_or_default() };
        let page = crate::paging::Page::of(r.page.as_ref())?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE (?1 = '' OR project = ?1) AND (?2 = '' OR volume_id = ?2) \
             AND (created_at, id) > (?3, ?4) ORDER BY created_at, id LIMIT ?5"
        )))
        .bind(&project)
        .bind(&r.volume_id)
        .bind(page.after_ts)
        .bind(&page.after_id)
        .bind(page.limit())
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        let mut rows: Vec<_> = rows.iter().map(from_row).collect();
        let next = page.cut(&mut rows, |t| (t.created_at, t.id.as_str()));
        Ok(Response::new(ListTransfersResponse { transfers: rows.iter().map(to_proto).collect(), page: Some(next) }))
    }

    async fn delete_transfer(
        &self,
        req: Request<DeleteTransferRequest>,
    ) -> Result<Response<DeleteTransferResponse>, Status> {
        let who = who(&req)?;
        self.delete(&who, &req.get_ref().id).await?;
        Ok(Response::new(DeleteTransferResponse {}))
    }

    async fn accept_transfer(&self, req: Request<AcceptTransferRequest>) -> Result<Response<Transfer>, Status> {
        let who = who(&req)?;
        Ok(Response::new(self.accept(&who, req.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_matches_only_itself() {
        let salt = "s4lt";
        let t = TransferRow {
            id: String::new(),
            volume_id: String::new(),
            name: String::new(),
            project: String::new(),
            salt: salt.into(),
            key_sha256: key_digest(salt, "right-key"),
            created_at: 0,
        };
        assert!(key_matches(&t, "right-key"));
        assert!(!key_matches(&t, "wrong-key"));
        assert!(!key_matches(&t, ""));
        assert_ne!(key_digest("other", "right-key"), t.key_sha256, "the salt is part of the digest");
    }
}
