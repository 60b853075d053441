//! Exports outside attachments (Cinder's legacy InitializeConnection / TerminateConnection, `ember volume
//! export`): an initiator named by the caller is given the volume over iSCSI with the volume's CHAP
//! credentials. Each export is recorded (table `exports`, shown on the volume) before the storage agent is
//! asked, and forgotten once it has unexported, so the record never misses an export; a volume with exports
//! neither migrates nor reverts (`store::refuse_if_exported`). Deleting, unmanaging or transferring the
//! volume closes them all.

use super::store::{self, VolumeRow};
use crate::context::Ctx;
use crate::encryption;
use crate::error::{Error, Result};
use crate::validate;
use ember_common::identity::Identity;
use ember_proto::agent::v1 as agent;
use ember_proto::v1::*;
use sqlx::SqliteConnection;
use std::sync::Arc;

/// Gives `req.connector`'s initiator volume `req.volume_id` (InitializeConnection) and says how to reach it.
/// Calling it again for the same initiator is harmless and answers the same.
pub async fn initialize(ctx: &Arc<Ctx>, who: &Identity, req: InitializeConnectionRequest) -> Result<ConnectionInfo> {
    let connector = req.connector.ok_or_else(|| Error::invalid("connector", "is required"))?;
    check_connector(&connector)?;
    let mut tx = crate::db::write(&ctx.db).await?;
    let v = store::visible(&mut tx, who, &req.volume_id).await?;
    if !matches!(v.status.as_str(), "available" | "in-use" | "attaching") {
        return Err(Error::FailedPrecondition(format!("volume {} is {}; it cannot be exported", v.id, v.status)));
    }
    let why = "its key goes only to ember's compute agents; attach it to an instance instead";
    encryption::refuse_if_encrypted(&mut tx, &v.id, "exported to another initiator", why).await?;
    // A read-only volume is exported read-only whatever the connector asks.
    let read_only = connector.read_only || v.read_only;
    let (user, password) = ensure_chap(&mut tx, &v).await?;
    // Recorded before the agent is asked, so that the volume never has an export its record does not show.
    let recorded = record_export(&mut tx, &v.id, &connector.initiator, read_only, &who.name).await?;
    tx.commit().await?;
    let exported = async {
        let mut client = ctx.agents.storage(&v.host).await?;
        client
            .export_volume(agent::ExportVolumeRequest {
                volume_id: v.id.clone(),
                backend: v.backend.clone(),
                initiator: connector.initiator.clone(),
                chap_username: user.clone(),
                chap_password: password.clone(),
                read_only,
            })
            .await
            .map_err(|s| Error::from_agent(&format!("exporting on {}", v.host), &s))
    }
    .await;
    let export = match exported {
        Ok(export) => export.into_inner(),
        Err(e) => {
            if recorded == Recorded::New {
                forget_export(ctx, &v.id, &connector.initiator).await?;
            }
            return Err(e);
        }
    };
    tracing::info!(volume_id = %v.id, initiator = %connector.initiator, "connection initialized");
    Ok(ConnectionInfo {
        driver_volume_type: export.driver_volume_type,
        target_portal: export.target_portal,
        target_iqn: export.target_iqn,
        target_lun: export.target_lun,
        auth_method: "CHAP".into(),
        auth_username: user,
        auth_password: password,
        volume_id: v.id,
        access_mode: if read_only { "ro" } else { "rw" }.into(),
        export: export.export,
        path: export.path,
        mount_options: export.mount_options,
    })
}

/// Takes volume `req.volume_id` away from `req.connector`'s initiator (TerminateConnection), on the storage
/// node first and then in the record.
pub async fn terminate(ctx: &Arc<Ctx>, who: &Identity, req: TerminateConnectionRequest) -> Result<()> {
    let connector = req.connector.ok_or_else(|| Error::invalid("connector", "is required"))?;
    check_connector(&connector)?;
    let mut conn = ctx.db.acquire().await?;
    let v = store::visible(&mut conn, who, &req.volume_id).await?;
    // The storage node grants access per initiator: if a compute host reaches the volume for an attachment with
    // this same initiator, taking it away would cut that guest off. Only the record goes then.
    let attached: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM attachments WHERE volume_id = ? AND json_extract(connector, '$.initiator') = ?",
    )
    .bind(&v.id)
    .bind(&connector.initiator)
    .fetch_one(&mut *conn)
    .await?;
    drop(conn);
    if attached == 0 {
        let mut client = ctx.agents.storage(&v.host).await?;
        client
            .unexport_volume(agent::UnexportVolumeRequest {
                volume_id: v.id.clone(),
                backend: v.backend.clone(),
                initiator: connector.initiator.clone(),
            })
            .await
            .map_err(|s| Error::from_agent(&format!("unexporting on {}", v.host), &s))?;
    }
    forget_export(ctx, &v.id, &connector.initiator).await?;
    tracing::info!(volume_id = %v.id, initiator = %connector.initiator, kept_for_attachment = attached > 0, "connection terminated");
    Ok(())
}

/// Whether [`record_export`] found the initiator already recorded.
#[derive(Debug, PartialEq, Eq)]
enum Recorded {
    New,
    Known,
}

/// Records that `initiator` is (about to be) given volume `volume_id` with InitializeConnection.
async fn record_export(
    conn: &mut SqliteConnection,
    volume_id: &str,
    initiator: &str,
    read_only: bool,
    by: &str,
) -> Result<Recorded> {
    let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM exports WHERE volume_id = ? AND initiator = ?")
        .bind(volume_id)
        .bind(initiator)
        .fetch_optional(&mut *conn)
        .await?;
    if known.is_some() {
        sqlx::query("UPDATE exports SET read_only = ? WHERE volume_id = ? AND initiator = ?")
            .bind(read_only as i64)
            .bind(volume_id)
            .bind(initiator)
            .execute(&mut *conn)
            .await?;
        return Ok(Recorded::Known);
    }
    sqlx::query(
        "INSERT INTO exports (volume_id, initiator, read_only, exported_by, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(volume_id)
    .bind(initiator)
    .bind(read_only as i64)
    .bind(by)
    .bind(crate::clock::now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(Recorded::New)
}

/// Removes the record of `initiator`'s export of volume `volume_id`, once the storage agent has unexported it
/// (or never exported it).
async fn forget_export(ctx: &Ctx, volume_id: &str, initiator: &str) -> Result<()> {
    let mut tx = crate::db::write(&ctx.db).await?;
    sqlx::query("DELETE FROM exports WHERE volume_id = ? AND initiator = ?")
        .bind(volume_id)
        .bind(initiator)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Checks a connector: an iSCSI initiator name is required (`iqn.`/`eui.`/`naa.`, at most 223 bytes).
pub fn check_connector(c: &Connector) -> Result<()> {
    let i = &c.initiator;
    if i.len() > 223 || !(i.starts_with("iqn.") || i.starts_with("eui.") || i.starts_with("naa.")) {
        return Err(Error::invalid("connector.initiator", format!("{i:?} is not an iSCSI initiator name")));
    }
    if i.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(Error::invalid("connector.initiator", "must not contain white space"));
    }
    validate::text("connector.host", &c.host, 255)?;
    validate::text("connector.ip", &c.ip, 64)
}

/// A random string of `len` characters that cannot be misread (no 0/O, 1/l/I).
pub(crate) fn random_string(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..len).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// The volume's CHAP credentials, made (20-character user, 16-character secret, as Cinder) on first export.
pub async fn ensure_chap(conn: &mut SqliteConnection, v: &VolumeRow) -> Result<(String, String)> {
    if !v.chap_username.is_empty() {
        return Ok((v.chap_username.clone(), v.chap_password.clone()));
    }
    let (user, password) = (random_string(20), random_string(16));
    sqlx::query("UPDATE volumes SET chap_username = ?, chap_password = ? WHERE id = ? AND chap_username = ''")
        .bind(&user)
        .bind(&password)
        .bind(&v.id)
        .execute(&mut *conn)
        .await?;
    let (u, p): (String, String) = sqlx::query_as("SELECT chap_username, chap_password FROM volumes WHERE id = ?")
        .bind(&v.id)
        .fetch_one(&mut *conn)
        .await?;
    Ok((u, p))
}
