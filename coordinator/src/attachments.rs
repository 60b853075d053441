//! Attachments: `ember.v1.AttachmentService` and the durable attach/detach flows. A volume moves
//! available → attaching → in-use and back through detaching. Attach: the storage agent exports the volume to
//! the compute host's initiator, then the compute agent connects it and adds the disk to the libvirt domain.
//! Detach reverses it: the compute agent removes the disk (confirmed gone) and disconnects, then the export
//! goes. Both agents' calls are idempotent, so the reconciler re-runs a flow from the start after any crash;
//! a failed attach is undone on both agents before the record goes. A forced detach leaves the host out; what
//! that may leave in its guest is released once the host answers (`leftovers.rs`).

use crate::agents::{compute_transient, transient};
use crate::auth::{can_see, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::leftovers;
use crate::operations::{self, Op, Outcome};
use crate::validate;
use crate::volumes::store as volumes;
use ember_common::identity::{Identity, Role, valid_name};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::attachment_service_server::AttachmentService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const SELECT: &str = "SELECT a.id, a.volume_id, a.instance, a.host, a.status, a.device, a.mode, a.status_reason, a.created_at, \
     a.connector, v.project, a.connection FROM attachments a JOIN volumes v ON v.id = a.volume_id";

fn to_proto(r: &sqlx::sqlite::SqliteRow) -> Attachment {
    Attachment {
        id: r.get(0),
        volume_id: r.get(1),
        instance: r.get(2),
        host: r.get(3),
        status: r.get(4),
        device: r.get(5),
        mode: r.get(6),
        status_reason: r.get(7),
        created_at: Some(timestamp(r.get(8))),
    }
}

async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<sqlx::sqlite::SqliteRow> {
    validate::uuid("attachment_id", id)?;
    match sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE a.id = ?")))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    {
        Some(r) if can_see(who, r.get::<&str, _>(10)) => Ok(r),
        _ => Err(Error::not_found("attachment", id)),
    }
}

/// The status a volume settles to with its attachments as they are now: `in-use` or `available`.
pub(crate) async fn settled_status(conn: &mut SqliteConnection, volume_id: &str) -> Result<&'static str> {
    let attached: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM attachments WHERE volume_id = ? AND status = 'attached'")
            .bind(volume_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(if attached > 0 { "in-use" } else { "available" })
}

/// Moves a volume that is attaching, detaching or in-use to the status its attachments now give it.
pub(crate) async fn settle_volume(conn: &mut SqliteConnection, volume_id: &str, reason: &str) -> Result<()> {
    let to = settled_status(conn, volume_id).await?;
    volumes::transition(conn, volume_id, &["attaching", "detaching", "in-use"], to, reason).await?;
    Ok(())
}

/// Has every guest the volume is attached to see its new size (`bytes`), through each compute agent. Returns,
/// for each one that could not be told, why. A call that fails is not retried: the volume has grown either way,
/// and the guest sees the new size at its next attach or boot.
pub(crate) async fn tell_guests_of_new_size(ctx: &Arc<Ctx>, volume_id: &str, bytes: u64) -> Result<Vec<String>> {
    let attached =
        sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE a.volume_id = ? AND a.status = 'attached'")))
            .bind(volume_id)
            .fetch_all(&ctx.db)
            .await?;
    let mut untold = Vec::new();
    for a in attached {
        let (instance, host): (String, String) = (a.get(2), a.get(3));
        let connection = stored_connection(&a);
        // What the guest sees: an encrypted volume's LUKS header is not part of its disk.
        let visible = bytes.saturating_sub(connection.luks_header_bytes);
        let request = agent::ExtendAttachedVolumeRequest {
            volume_id: volume_id.to_string(),
            instance: instance.clone(),
            connection: Some(connection),
            new_size_bytes: bytes,
        };
        let told = match ctx.agents.compute(&host).await {
            Ok(mut compute) => compute.extend_volume(request).await.map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        match told {
            Ok(r) if r.get_ref().capacity_bytes >= visible => {
                tracing::info!(volume_id, %instance, %host, "the guest sees the new size");
            }
            Ok(r) => untold.push(format!(
                "instance {instance} on {host} sees {} bytes, not {visible}",
                r.get_ref().capacity_bytes
            )),
            Err(why) => untold.push(format!("instance {instance} on {host} was not told of the new size: {why}")),
        }
    }
    Ok(untold)
}

/// The gRPC service.
pub struct Attachments {
    ctx: Arc<Ctx>,
}

/// The compute host an attach goes to, after checking who may attach to `instance` there. An admin may name
/// any libvirt domain of a host (one ember did not create too); a member only an ember instance of their own
/// project (by its id, or its domain name `ember-<id>`), as Nova lets a user attach only to their own servers:
/// otherwise a member could put a disk into another project's guest. `host` may be left empty for an ember
/// instance, which runs where it was placed. An ember instance must be `active`, as Nova's attach asks: one
/// being deleted would otherwise take a disk that its delete, already under way, does not know of.
async fn target_host(conn: &mut SqliteConnection, who: &Identity, instance: &str, host: &str) -> Result<String> {
    let ours: Option<(String, String, String, String)> =
        sqlx::query_as("SELECT id, project, host, status FROM instances WHERE id = ?1 OR 'ember-' || id = ?1")
            .bind(instance)
            .fetch_optional(&mut *conn)
            .await?;
    let ours = ours.filter(|(_, project, _, _)| can_see(who, project));
    if let Some((id, _, _, status)) = &ours
        && status != "active"
    {
        return Err(Error::FailedPrecondition(format!("instance {id} is {status}; attach needs active")));
    }
    let ours = ours.map(|(_, project, runs_on, _)| (project, runs_on));
    if who.role != Role::Admin && ours.is_none() {
        // One answer whether it is another project's instance or no instance of ember's: nothing leaks.
        return Err(Error::PermissionDenied(format!(
            "instance {instance} is not one of your project's instances; members attach only to those (an admin \
             may attach to any libvirt domain)"
        )));
    }
    match (ours, host) {
        (Some((_, runs_on)), "") => Ok(runs_on),
        (Some((_, runs_on)), asked) if asked != runs_on => {
            Err(Error::invalid("host", format!("instance {instance} runs on {runs_on}, not on {asked}")))
        }
        (_, "") => Err(Error::invalid("host", "required for a libvirt domain that ember did not create")),
        (_, asked) => Ok(asked.to_string()),
    }
}

impl Attachments {
    /// Serves attachments.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Attachments { ctx }
    }

    async fn attach(&self, who: &Identity, mut req: AttachRequest) -> Result<Attachment> {
        validate::uuid("volume_id", &req.volume_id)?;
        validate::required_name("instance", &req.instance)?;
        if !req.host.is_empty() && !valid_name(&req.host) {
            return Err(Error::invalid("host", format!("{:?} is not a host name", req.host)));
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        req.host = target_host(&mut tx, who, &req.instance, &req.host).await?;
        let connector: Option<String> =
            sqlx::query_scalar("SELECT report FROM services WHERE host = ? AND role = 'compute'")
                .bind(&req.host)
                .fetch_optional(&mut *tx)
                .await?;
        let connector = connector.ok_or_else(|| Error::not_found("compute host", &req.host))?;
        let connector: serde_json::Value = serde_json::from_str(&connector)?;
        let v = volumes::visible(&mut tx, who, &req.volume_id).await?;
        let twice: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM attachments WHERE volume_id = ? AND instance = ?")
            .bind(&v.id)
            .bind(&req.instance)
            .fetch_one(&mut *tx)
            .await?;
        if twice > 0 {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is already attached to instance {}",
                v.id, req.instance
            )));
        }
        let from: &[&str] = if v.multiattach { &["available", "in-use"] } else { &["available"] };
        if !volumes::transition(&mut tx, &v.id, from, "attaching", "").await? {
            let why = if v.status == "in-use" { " and its type does not allow multiattach" } else { "" };
            return Err(Error::FailedPrecondition(format!(
                "volume {} is {}{why}; attach needs available",
                v.id, v.status
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO attachments (id, volume_id, instance, host, status, mode, connector, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 'attaching', ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&v.id)
        .bind(&req.instance)
        .bind(&req.host)
        // A read-only volume is attached read-only whatever the request asks (Cinder's v3 attachments do so too).
        .bind(if req.read_only || v.read_only { "ro" } else { "rw" })
        .bind(connector["connector"].to_string())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let op = operations::insert(&mut tx, "attach", "attachment", &id, "exporting", serde_json::json!({})).await?;
        let shown = to_proto(&visible(&mut tx, who, &id).await?);
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(shown)
    }

    async fn detach(&self, who: &Identity, id: &str, force: bool) -> Result<()> {
        if force && who.role != Role::Admin {
            return Err(Error::PermissionDenied("only admins may force a detach".into()));
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let a = visible(&mut tx, who, id).await?;
        let status: String = a.get(4);
        if status == "detaching" {
            if force {
                operations::force(&mut tx, "detach", id).await?;
                tx.commit().await?;
                operations::wake(&self.ctx, id).await;
            }
            return Ok(());
        }
        if status == "attaching" && force {
            abandon_running_attach(&mut tx, id, a.get(1)).await?;
            tx.commit().await?;
            operations::wake(&self.ctx, id).await;
            return Ok(());
        }
        let volume_id: String = a.get(1);
        let volume_status = volumes::find(&mut tx, &volume_id).await?.map(|v| v.status).unwrap_or_default();
        if volume_status == "extending" {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is extending; detach it once the extend has ended"
            )));
        }
        // A migration swaps the guest's disk; a forced detach (a compute host gone for good) makes it give up.
        if matches!(volume_status.as_str(), "migrating" | "retyping") && !force {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is {volume_status}; detach it once that has ended (an admin may force the detach \
                 of a compute host that is gone)"
            )));
        }
        let moved = sqlx::query(
            "UPDATE attachments SET status = 'detaching', updated_at = ? WHERE id = ? AND status = 'attached'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            let hint = if status == "attaching" { " (an admin may force it)" } else { "" };
            return Err(Error::FailedPrecondition(format!("attachment {id} is {status}; detach needs attached{hint}")));
        }
        volumes::transition(&mut tx, &volume_id, &["in-use"], "detaching", "").await?;
        let payload = serde_json::json!({ "force": force });
        let op = operations::insert(&mut tx, "detach", "attachment", id, "unexporting", payload).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(())
    }
}

/// Turns attachment `id`, whose attach is still running (typically retrying against a compute host that is gone),
/// into a forced detach: the attachment and its volume move to `detaching`, and the attach operation, seeing
/// that, removes the export instead of going on (`abandon_attach`). The same operation undoes what it did, so no
/// export of a still-running attempt can outlive the undo.
async fn abandon_running_attach(conn: &mut SqliteConnection, id: &str, volume_id: String) -> Result<()> {
    let attach_running: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM operations WHERE kind = 'attach' AND resource_id = ? AND state = 'running'",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if attach_running == 0 {
        // An instance's boot reserves its volume with an attachment of its own: its boot operation ends it.
        return Err(Error::FailedPrecondition(format!(
            "attachment {id} is being made by an instance boot; delete the instance instead"
        )));
    }
    sqlx::query(
        "UPDATE attachments SET status = 'detaching', status_reason = ?, updated_at = ? \
         WHERE id = ? AND status = 'attaching'",
    )
    .bind(ABANDONED)
    .bind(now_ms())
    .bind(id)
    .execute(&mut *conn)
    .await?;
    volumes::transition(conn, &volume_id, &["attaching"], "detaching", "").await?;
    tracing::warn!(attachment_id = %id, volume_id = %volume_id, "attach abandoned by a forced detach: the compute host will not be asked");
    Ok(())
}

/// The reason recorded on an attach that a forced detach ended.
const ABANDONED: &str = "attach abandoned: detach forced by an admin";

/// Ends an attach that a forced detach took over: the initiator's access goes (unless shared), the compute host is
/// not asked, the record goes and the volume settles.
async fn abandon_attach(
    ctx: &Arc<Ctx>,
    op: &Op,
    v: &volumes::VolumeRow,
    host: &str,
    initiator: &str,
) -> Result<Outcome> {
    let reason = match unexport_unless_shared(ctx, &op.resource_id, v, initiator).await? {
        Ok(()) => format!("{ABANDONED}; {host} was not asked"),
        Err(status) if transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
        // Retrying a refusal would hold the volume for ever; the reason names the export left behind.
        Err(status) => format!("{ABANDONED}; its export on {} was refused removal: {}", v.host, status.message()),
    };
    fail_attach(ctx, op, v, &reason, true).await
}

/// Has an attach wait, with the reason shown on its attachment.
async fn wait_for_release(ctx: &Ctx, attachment_id: &str, why: String) -> Result<Outcome> {
    sqlx::query("UPDATE attachments SET status_reason = ?, updated_at = ? WHERE id = ? AND status = 'attaching'")
        .bind(&why)
        .bind(now_ms())
        .bind(attachment_id)
        .execute(&ctx.db)
        .await?;
    Ok(Outcome::Waiting(why))
}

pub(crate) async fn load(ctx: &Ctx, id: &str) -> Result<Option<(sqlx::sqlite::SqliteRow, volumes::VolumeRow)>> {
    let mut conn = ctx.db.acquire().await?;
    let Some(a) = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE a.id = ?")))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let v = volumes::find(&mut conn, a.get::<&str, _>(1))
        .await?
        .ok_or_else(|| Error::not_found("volume", a.get::<String, _>(1)))?;
    Ok(Some((a, v)))
}

/// The connection facts of an attachment, as stored (without the CHAP secret).
pub(crate) fn stored_connection(a: &sqlx::sqlite::SqliteRow) -> agent::Connection {
    connection_from_json(&serde_json::from_str(a.get::<&str, _>(11)).unwrap_or_default())
}

/// Connection facts as stored (without the CHAP secret).
pub(crate) fn connection_from_json(c: &serde_json::Value) -> agent::Connection {
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    agent::Connection {
        driver_volume_type: text("driver_volume_type"),
        target_portal: text("target_portal"),
        target_iqn: text("target_iqn"),
        target_lun: c["target_lun"].as_u64().unwrap_or(0) as u32,
        auth_username: text("auth_username"),
        auth_password: String::new(),
        export: text("export"),
        path: text("path"),
        mount_options: text("mount_options"),
        read_only: c["read_only"].as_bool().unwrap_or(false),
        luks_passphrase: String::new(),
        luks_secret_uuid: text("luks_secret_uuid"),
        luks_header_bytes: c["luks_header_bytes"].as_u64().unwrap_or(0),
    }
}

/// Removes the initiator's access to the volume unless another attachment of the volume, or an export made with
/// InitializeConnection, uses the same initiator (the storage node knows initiators, not who asked for them).
/// `Err(status)` is the storage agent's refusal.
pub(crate) async fn unexport_unless_shared(
    ctx: &Arc<Ctx>,
    attachment_id: &str,
    v: &volumes::VolumeRow,
    initiator: &str,
) -> Result<Result<(), Status>> {
    let shared: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM attachments \
                 WHERE volume_id = ?1 AND id != ?2 AND json_extract(connector, '$.initiator') = ?3) \
              + (SELECT COUNT(*) FROM exports WHERE volume_id = ?1 AND initiator = ?3)",
    )
    .bind(&v.id)
    .bind(attachment_id)
    .bind(initiator)
    .fetch_one(&ctx.db)
    .await?;
    if shared > 0 {
        return Ok(Ok(()));
    }
    let mut client = ctx.agents.storage(&v.host).await?;
    let call = client
        .unexport_volume(agent::UnexportVolumeRequest {
            volume_id: v.id.clone(),
            backend: v.backend.clone(),
            initiator: initiator.to_string(),
        })
        .await;
    Ok(call.map(drop))
}

/// Ends a failed attach: the record goes and the volume settles, with the reason on both. An attach a forced
/// detach ended (`forced`) may have reached its host, which is asked to release the disk later.
async fn fail_attach(ctx: &Arc<Ctx>, op: &Op, v: &volumes::VolumeRow, reason: &str, forced: bool) -> Result<Outcome> {
    let mut tx = crate::db::write(&ctx.db).await?;
    if forced {
        leftovers::record_disk(&mut tx, &op.resource_id).await?;
    }
    sqlx::query("DELETE FROM attachments WHERE id = ?").bind(&op.resource_id).execute(&mut *tx).await?;
    settle_volume(&mut tx, &v.id, reason).await?;
    operations::finish(&mut tx, op, Some(reason)).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    tracing::warn!(attachment_id = %op.resource_id, volume_id = %v.id, reason, "attach failed");
    Ok(Outcome::Finished)
}

/// What reaching volume `v` takes: its CHAP user and secret (made now if it has none) and, when it is encrypted,
/// its key.
pub(crate) async fn volume_secrets(
    ctx: &Ctx,
    v: &volumes::VolumeRow,
) -> Result<(String, String, Option<crate::encryption::VolumeKey>)> {
    let mut tx = crate::db::write(&ctx.db).await?;
    let (user, password) = crate::volumes::exports::ensure_chap(&mut tx, v).await?;
    tx.commit().await?;
    let key = crate::encryption::load(&mut *ctx.db.acquire().await?, &ctx.master_key, &v.id).await?;
    Ok((user, password, key))
}

/// Exports volume `v`'s copy on `host`/`backend` to `initiator`, with the volume's CHAP credentials. Returns the
/// connection (with the CHAP secret, for a compute agent) and its facts to store (without it). `Err(status)` is
/// the storage agent's refusal.
pub(crate) async fn export_copy(
    ctx: &Arc<Ctx>,
    v: &volumes::VolumeRow,
    host: &str,
    backend: &str,
    initiator: &str,
    read_only: bool,
) -> Result<Result<(agent::Connection, serde_json::Value), Status>> {
    let (user, password, key) = volume_secrets(ctx, v).await?;
    let mut storage = ctx.agents.storage(host).await?;
    let export = match storage
        .export_volume(agent::ExportVolumeRequest {
            volume_id: v.id.clone(),
            backend: backend.to_string(),
            initiator: initiator.to_string(),
            chap_username: user.clone(),
            chap_password: password.clone(),
            read_only,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let stored = serde_json::json!({
        "driver_volume_type": export.driver_volume_type, "target_portal": export.target_portal,
        "target_iqn": export.target_iqn, "target_lun": export.target_lun, "auth_username": user,
        "export": export.export, "path": export.path, "mount_options": export.mount_options, "read_only": read_only,
        "luks_secret_uuid": key.as_ref().map(|k| k.secret_uuid.clone()).unwrap_or_default(),
        "luks_header_bytes": key.as_ref().map(|k| k.header_bytes).unwrap_or_default(),
    });
    let mut connection = connection_from_json(&stored);
    connection.auth_password = password;
    connection.luks_passphrase = key.map(|k| k.passphrase).unwrap_or_default();
    Ok(Ok((connection, stored)))
}

/// Exports the volume to the attachment's initiator and records the connection facts on the attachment (before
/// any compute agent is called, so an undo after a crash knows what to disconnect). `Err(status)` is the
/// storage agent's refusal.
pub(crate) async fn export_attachment(
    ctx: &Arc<Ctx>,
    attachment_id: &str,
    v: &volumes::VolumeRow,
    initiator: &str,
    read_only: bool,
) -> Result<Result<agent::Connection, Status>> {
    let (connection, stored) = match export_copy(ctx, v, &v.host, &v.backend, initiator, read_only).await? {
        Ok(exported) => exported,
        Err(status) => return Ok(Err(status)),
    };
    record_connection(&mut *ctx.db.acquire().await?, attachment_id, &stored).await?;
    Ok(Ok(connection))
}

/// Records the connection facts (without the CHAP secret) an attachment reaches its volume by.
pub(crate) async fn record_connection(
    conn: &mut SqliteConnection,
    attachment_id: &str,
    stored: &serde_json::Value,
) -> Result<()> {
    sqlx::query("UPDATE attachments SET connection = ?, updated_at = ? WHERE id = ?")
        .bind(stored.to_string())
        .bind(now_ms())
        .bind(attachment_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Attach flow: export to the compute host's initiator → the compute agent connects and adds the disk →
/// attached (with its device name), volume in-use.
pub async fn attach_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let Some((a, v)) = load(ctx, &op.resource_id).await? else {
        let mut conn = ctx.db.acquire().await?;
        operations::finish(&mut conn, &op, Some("attachment no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    let connector: serde_json::Value = serde_json::from_str(a.get::<&str, _>(9))?;
    let initiator = connector["initiator"].as_str().unwrap_or_default().to_string();
    let read_only = a.get::<&str, _>(6) == "ro";
    let (instance, host): (String, String) = (a.get(2), a.get(3));
    if a.get::<&str, _>(4) == "detaching" {
        return abandon_attach(ctx, &op, &v, &host, &initiator).await;
    }
    if let Some(why) = leftovers::wait_reason(&mut *ctx.db.acquire().await?, &v.id, &host).await? {
        return wait_for_release(ctx, &op.resource_id, why).await;
    }
    let export_started = std::time::Instant::now();
    let connection = match export_attachment(ctx, &op.resource_id, &v, &initiator, read_only).await? {
        Ok(c) => c,
        Err(status) if transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
        Err(status) => {
            let reason = format!("attach failed: export on {}: {}", v.host, status.message());
            return fail_attach(ctx, &op, &v, &reason, false).await;
        }
    };
    let export_ms = export_started.elapsed().as_millis() as u64;
    crate::failpoint::hit("attach.exported");
    let iotune = crate::volume_types::disk_limits(&mut *ctx.db.acquire().await?, &v.volume_type_id).await?;
    let compute_started = std::time::Instant::now();
    let mut compute = ctx.agents.compute(&host).await?;
    let attached = compute
        .attach_volume(agent::AttachVolumeRequest {
            volume_id: v.id.clone(),
            instance: instance.clone(),
            connection: Some(connection.clone()),
            iotune,
        })
        .await;
    let device = match attached {
        Ok(r) => r.into_inner().device,
        Err(status) if compute_transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
        Err(status) => {
            // Undo on both agents before the record goes: nothing may be left connected or exported.
            let undo = compute
                .detach_volume(agent::DetachVolumeRequest {
                    volume_id: v.id.clone(),
                    instance,
                    connection: Some(connection),
                })
                .await;
            if let Err(e) = undo {
                return Ok(Outcome::Retry(format!("undoing a failed attach on {host}: {}", e.message())));
            }
            if let Err(e) = unexport_unless_shared(ctx, &op.resource_id, &v, &initiator).await? {
                return Ok(Outcome::Retry(format!("undoing a failed attach on {}: {}", v.host, e.message())));
            }
            let reason = format!("attach failed on {host}: {}", status.message());
            return fail_attach(ctx, &op, &v, &reason, false).await;
        }
    };
    let compute_ms = compute_started.elapsed().as_millis() as u64;
    crate::failpoint::hit("attach.attached");
    let mut tx = crate::db::write(&ctx.db).await?;
    let attached = sqlx::query(
        "UPDATE attachments SET status = 'attached', device = ?, status_reason = '', updated_at = ? \
         WHERE id = ? AND status = 'attaching'",
    )
    .bind(&device)
    .bind(now_ms())
    .bind(&op.resource_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if attached == 0 {
        // A detach was forced while the host attached: as with any forced detach, the host is not asked now; the
        // disk its guest got is released later, as a leftover.
        drop(tx);
        return abandon_attach(ctx, &op, &v, &host, &initiator).await;
    }
    settle_volume(&mut tx, &v.id, "").await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    tracing::info!(attachment_id = %op.resource_id, volume_id = %v.id, %device, export_ms, compute_ms, "attached");
    Ok(Outcome::Finished)
}

/// Detach flow: the compute agent removes the disk (confirmed gone from the live XML) and disconnects → the
/// initiator's access goes (unless another attachment of this volume uses it) → record gone, volume available
/// (or still in-use for its other attachments). A guest that keeps the disk leaves the attachment attached,
/// with the reason.
pub async fn detach_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let Some((a, v)) = load(ctx, &op.resource_id).await? else {
        let mut conn = ctx.db.acquire().await?;
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    let connector: serde_json::Value = serde_json::from_str(a.get::<&str, _>(9))?;
    let initiator = connector["initiator"].as_str().unwrap_or_default().to_string();
    let (instance, host): (String, String) = (a.get(2), a.get(3));
    let compute_started = std::time::Instant::now();
    let refused = if op.payload["force"].as_bool().unwrap_or(false) {
        tracing::warn!(attachment_id = %op.resource_id, volume_id = %v.id, %host, "forced detach: the host is not asked");
        None
    } else {
        let mut compute = ctx.agents.compute(&host).await?;
        let detached = compute
            .detach_volume(agent::DetachVolumeRequest {
                volume_id: v.id.clone(),
                instance,
                connection: Some(stored_connection(&a)),
            })
            .await;
        match detached {
            Ok(_) => None,
            Err(status) if compute_transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
            Err(status) => Some(format!("detach failed on {host}: {}", status.message())),
        }
    };
    let compute_ms = compute_started.elapsed().as_millis() as u64;
    let unexport_started = std::time::Instant::now();
    if refused.is_none() {
        crate::failpoint::hit("detach.detached");
    }
    let refused = match refused {
        Some(r) => Some(r),
        None => match unexport_unless_shared(ctx, &op.resource_id, &v, &initiator).await? {
            Ok(()) => None,
            Err(status) if transient(&status) => return Ok(Outcome::Retry(status.message().to_string())),
            Err(status) => Some(format!("detach failed: unexport on {}: {}", v.host, status.message())),
        },
    };
    let mut tx = crate::db::write(&ctx.db).await?;
    if let Some(reason) = refused {
        sqlx::query("UPDATE attachments SET status = 'attached', status_reason = ?, updated_at = ? WHERE id = ?")
            .bind(&reason)
            .bind(now_ms())
            .bind(&op.resource_id)
            .execute(&mut *tx)
            .await?;
        settle_volume(&mut tx, &v.id, &reason).await?;
        operations::finish(&mut tx, &op, Some(&reason)).await?;
        tx.commit().await?;
        ctx.changed(&v.id);
        tracing::warn!(attachment_id = %op.resource_id, volume_id = %v.id, reason, "detach failed");
        return Ok(Outcome::Finished);
    }
    if op.payload["force"].as_bool().unwrap_or(false) {
        leftovers::record_disk(&mut tx, &op.resource_id).await?;
    }
    sqlx::query("DELETE FROM attachments WHERE id = ?").bind(&op.resource_id).execute(&mut *tx).await?;
    settle_volume(&mut tx, &v.id, "").await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    let unexport_ms = unexport_started.elapsed().as_millis() as u64;
    tracing::info!(attachment_id = %op.resource_id, volume_id = %v.id, compute_ms, unexport_ms, "detached");
    Ok(Outcome::Finished)
}

#[tonic::async_trait]
impl AttachmentService for Attachments {
    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<Attachment>, Status> {
        let who = who(&req)?;
        Ok(Response::new(Attachments::attach(self, &who, req.into_inner()).await?))
    }

    async fn detach(&self, req: Request<DetachRequest>) -> Result<Response<DetachResponse>, Status> {
        let who = who(&req)?;
        let r = req.get_ref();
        Attachments::detach(self, &who, &r.attachment_id, r.force).await?;
        Ok(Response::new(DetachResponse {}))
    }

    async fn get_attachment(&self, req: Request<GetAttachmentRequest>) -> Result<Response<Attachment>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(to_proto(&visible(&mut conn, &who, &req.get_ref().id).await?)))
    }

    async fn list_attachments(
        &self,
        req: Request<ListAttachmentsRequest>,
    ) -> Result<Response<ListAttachmentsResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let project = if who.role == ember_common::identity::Role::Admin {
            String::new()
        } else {
            who.project.clone().unwrap_or_default()
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE (?1 = '' OR v.project = ?1) AND (?2 = '' OR a.volume_id = ?2) AND (?3 = '' OR a.instance = ?3) \
             ORDER BY a.created_at"
        )))
        .bind(&project)
        .bind(&r.volume_id)
        .bind(&r.instance)
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        Ok(Response::new(ListAttachmentsResponse { attachments: rows.iter().map(to_proto).collect() }))
    }
}
