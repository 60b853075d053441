//! Instances: `ember.v1.InstanceService` and its durable flows — what Nova does for boot from volume, kept
//! small. Create reserves the boot volume with an attachment record (instance = the instance id, device
//! `vda`), exports it, and has the compute agent define and start a libvirt domain whose UUID is the instance
//! id; delete destroys the domain, then detaches every volume of the instance (disconnect, unexport), and
//! deletes the boot volume when asked to. Booting from a snapshot first creates the volume from it.

use crate::agents::{compute_transient, transient};
use crate::attachments::{export_attachment, settle_volume, stored_connection, unexport_unless_shared};
use crate::auth::{can_see, who};
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::{self, Op, Outcome};
use crate::volumes::store as volumes;
use crate::{placement, quota, validate};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::instance_service_server::InstanceService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const SELECT: &str = "SELECT id, project, name, host, status, boot_volume_id, vcpus, memory_mb, delete_on_terminate, \
     created_at, status_reason FROM instances";

fn to_proto(r: &sqlx::sqlite::SqliteRow) -> Instance {
    Instance {
        id: r.get(0),
        project: r.get(1),
        name: r.get(2),
        host: r.get(3),
        status: r.get(4),
        boot_volume_id: r.get(5),
        vcpus: r.get::<i64, _>(6) as u32,
        memory_mb: r.get::<i64, _>(7) as u32,
        delete_on_terminate: r.get::<i64, _>(8) != 0,
        created_at: Some(timestamp(r.get(9))),
        status_reason: r.get(10),
    }
}

async fn find(conn: &mut SqliteConnection, id: &str) -> Result<Option<Instance>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = ?"))).bind(id).fetch_optional(conn).await?;
    Ok(row.as_ref().map(to_proto))
}

async fn visible(conn: &mut SqliteConnection, who: &Identity, id: &str) -> Result<Instance> {
    validate::uuid("id", id)?;
    match find(conn, id).await? {
        Some(i) if can_see(who, &i.project) => Ok(i),
        _ => Err(Error::not_found("instance", id)),
    }
}

/// The coordinator acting on its own behalf (deleting a delete-on-terminate volume).
fn system() -> Identity {
    Identity { role: Role::Admin, name: "coordinator".into(), project: None }
}

/// The gRPC service.
pub struct Instances {
    ctx: Arc<Ctx>,
}

impl Instances {
    /// Serves instances.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Instances { ctx }
    }

    async fn create(&self, who: &Identity, req: CreateInstanceRequest) -> Result<Instance> {
        validate::required_name("name", &req.name)?;
        let vcpus = if req.vcpus == 0 { 1 } else { req.vcpus };
        if vcpus > 16 {
            return Err(Error::invalid("vcpus", "at most 16"));
        }
        let memory_mb = if req.memory_mb == 0 { 512 } else { req.memory_mb };
        if !(64..=65536).contains(&memory_mb) {
            return Err(Error::invalid("memory_mb", "between 64 and 65536"));
        }
        if req.boot_volume_id.is_empty() == req.boot_snapshot_id.is_empty() {
            return Err(Error::invalid("boot_volume_id", "give exactly one of boot_volume_id and boot_snapshot_id"));
        }
        // One transaction for everything the create records, the boot volume made from a snapshot included: a
        // refusal (no room on the host, a quota) makes nothing, also when creates race for the last room.
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let deltas = quota::instance_deltas(vcpus, memory_mb);
        // The boot volume named, or none yet when it is to be made from a snapshot.
        let (project, named_volume) = if req.boot_snapshot_id.is_empty() {
            let v = volumes::visible(&mut tx, who, &req.boot_volume_id).await?;
            if v.status != "available" {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is {}; booting needs available",
                    v.id, v.status
                )));
            }
            if v.read_only {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is read-only; an instance cannot boot from it",
                    v.id
                )));
            }
            (v.project, Some(v.id))
        } else {
            (crate::snapshots::visible(&mut tx, who, &req.boot_snapshot_id).await?.project, None)
        };
        let host = placement::place(&mut tx, &req.host, vcpus, memory_mb.into(), self.ctx.service_down_ms).await?;
        self.ctx.quota.consume(&mut tx, &project, &deltas).await?;
        let (boot_volume_id, volume_op) = match named_volume {
            Some(id) => (id, None),
            None => {
                let create = CreateVolumeRequest {
                    name: format!("{}-boot", req.name),
                    snapshot_id: req.boot_snapshot_id.clone(),
                    ..Default::default()
                };
                let volumes = crate::volumes::api::Volumes::new(self.ctx.clone());
                let (v, op) = volumes.create_in(&mut tx, who, create).await?;
                (v.id, op)
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO instances (id, project, name, host, status, boot_volume_id, vcpus, memory_mb, \
             delete_on_terminate, created_at, updated_at) VALUES (?, ?, ?, ?, 'building', ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&project)
        .bind(&req.name)
        .bind(&host)
        .bind(&boot_volume_id)
        .bind(vcpus as i64)
        .bind(memory_mb as i64)
        .bind(req.delete_on_terminate as i64)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let op =
            operations::insert(&mut tx, "boot_instance", "instance", &id, "building", serde_json::json!({})).await?;
        let shown = find(&mut tx, &id).await?.ok_or_else(|| Error::not_found("instance", &id))?;
        tx.commit().await?;
        tracing::info!(instance_id = %id, volume_id = %boot_volume_id, %host, "instance create accepted");
        if let Some(volume_op) = volume_op {
            operations::spawn(&self.ctx, volume_op);
        }
        operations::spawn(&self.ctx, op);
        Ok(shown)
    }

    async fn delete(&self, who: &Identity, id: &str, force: bool) -> Result<()> {
        if force && who.role != Role::Admin {
            return Err(Error::PermissionDenied("only admins may force an instance's delete".into()));
        }
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let i = visible(&mut tx, who, id).await?;
        if i.status == "deleting" {
            if force {
                operations::force(&mut tx, "delete_instance", id).await?;
                tx.commit().await?;
                operations::wake(&self.ctx, id).await;
            }
            return Ok(());
        }
        // A boot waiting for a host that is down is ended by a forced delete: the boot operation gives up at its
        // next step (`boot_flow`), and the delete waits for that.
        let moved = sqlx::query(
            "UPDATE instances SET status = 'deleting', updated_at = ? \
             WHERE id = ? AND (status IN ('active', 'error') OR (? AND status = 'building'))",
        )
        .bind(now_ms())
        .bind(id)
        .bind(force)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            let hint = if i.status == "building" { " (an admin may force it)" } else { "" };
            return Err(Error::FailedPrecondition(format!(
                "instance {id} is {}; delete needs active or error{hint}",
                i.status
            )));
        }
        let payload = serde_json::json!({ "force": force });
        let op = operations::insert(&mut tx, "delete_instance", "instance", id, "deleting", payload).await?;
        tx.commit().await?;
        operations::spawn(&self.ctx, op);
        Ok(())
    }
}

async fn set_status(ctx: &Ctx, op: &Op, id: &str, status: &str, reason: &str) -> Result<Outcome> {
    let mut tx = crate::db::write(&ctx.db).await?;
    sqlx::query("UPDATE instances SET status = ?, status_reason = ?, updated_at = ? WHERE id = ?")
        .bind(status)
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    operations::finish(&mut tx, op, (!reason.is_empty()).then_some(reason)).await?;
    tx.commit().await?;
    Ok(Outcome::Finished)
}

/// The attachment reserving the boot volume for the instance, made once the volume is available.
async fn reserve_boot_volume(ctx: &Ctx, i: &Instance, v: &volumes::VolumeRow) -> Result<Result<String, String>> {
    let mut tx = crate::db::write(&ctx.db).await?;
    let existing: Option<String> =
        sqlx::query_scalar("SELECT id FROM attachments WHERE volume_id = ? AND instance = ?")
            .bind(&v.id)
            .bind(&i.id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(id) = existing {
        return Ok(Ok(id));
    }
    if !volumes::transition(&mut tx, &v.id, &["available"], "attaching", "").await? {
        return Ok(Err(format!("boot volume {} is {}", v.id, v.status)));
    }
    let connector: String = sqlx::query_scalar("SELECT report FROM services WHERE host = ? AND role = 'compute'")
        .bind(&i.host)
        .fetch_one(&mut *tx)
        .await?;
    let connector: serde_json::Value = serde_json::from_str(&connector)?;
    let id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO attachments (id, volume_id, instance, host, status, mode, connector, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 'attaching', 'rw', ?, ?, ?)",
    )
    .bind(&id)
    .bind(&v.id)
    .bind(&i.id)
    .bind(&i.host)
    .bind(connector["connector"].to_string())
    .bind(now_ms())
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    Ok(Ok(id))
}

/// Disconnects and unexports one attachment of a (destroyed) instance and drops its record. `Err` = retry. A
/// forced delete (`without_host`) does not ask the host: what it left there is released once it answers.
async fn release(
    ctx: &Arc<Ctx>,
    instance_id: &str,
    attachment_id: &str,
    without_host: bool,
) -> Result<Result<(), String>> {
    let Some((a, v)) = crate::attachments::load(ctx, attachment_id).await? else { return Ok(Ok(())) };
    let connector: serde_json::Value = serde_json::from_str(a.get::<&str, _>(9))?;
    let initiator = connector["initiator"].as_str().unwrap_or_default().to_string();
    if !without_host {
        let mut compute = ctx.agents.compute(a.get::<&str, _>(3)).await?;
        let detach = agent::DetachVolumeRequest {
            volume_id: v.id.clone(),
            instance: instance_id.to_string(),
            connection: Some(stored_connection(&a)),
        };
        if let Err(s) = compute.detach_volume(detach).await {
            return Ok(Err(format!("disconnecting volume {}: {}", v.id, s.message())));
        }
    }
    if let Err(s) = unexport_unless_shared(ctx, attachment_id, &v, &initiator).await? {
        return Ok(Err(format!("unexporting volume {}: {}", v.id, s.message())));
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    if without_host {
        crate::leftovers::record_disk(&mut tx, attachment_id).await?;
    }
    sqlx::query("DELETE FROM attachments WHERE id = ?").bind(attachment_id).execute(&mut *tx).await?;
    settle_volume(&mut tx, &v.id, "").await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    Ok(Ok(()))
}

/// The error recorded on a boot that a forced delete ended.
const BOOT_ABANDONED: &str = "boot abandoned: the instance was deleted by force";

/// Boot flow: wait for the boot volume → reserve it → export → the compute agent defines and starts the
/// domain → active. A refusal undoes everything and leaves the instance in `error` with the reason.
pub async fn boot_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(i) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, Some("instance no longer exists")).await?;
        return Ok(Outcome::Finished);
    };
    if i.status == "deleting" {
        operations::finish(&mut conn, &op, Some(BOOT_ABANDONED)).await?;
        return Ok(Outcome::Finished);
    }
    let Some(v) = volumes::find(&mut conn, &i.boot_volume_id).await? else {
        drop(conn);
        return set_status(ctx, &op, &i.id, "error", "the boot volume no longer exists").await;
    };
    drop(conn);
    if v.status == "creating" {
        return Ok(Outcome::Retry(format!("boot volume {} is still being created", v.id)));
    }
    if let Some(why) = crate::leftovers::wait_reason(&mut *ctx.db.acquire().await?, &v.id, &i.host).await? {
        sqlx::query("UPDATE instances SET status_reason = ?, updated_at = ? WHERE id = ?")
            .bind(&why)
            .bind(now_ms())
            .bind(&i.id)
            .execute(&ctx.db)
            .await?;
        return Ok(Outcome::Waiting(why));
    }
    let attachment = match reserve_boot_volume(ctx, &i, &v).await? {
        Ok(a) => a,
        Err(reason) => return set_status(ctx, &op, &i.id, "error", &reason).await,
    };
    let connection = match export_attachment(ctx, &attachment, &v, &initiator_of(ctx, &attachment).await?, false)
        .await?
    {
        Ok(c) => c,
        Err(s) if transient(&s) => return Ok(Outcome::Retry(s.message().to_string())),
        Err(s) => return fail_boot(ctx, &op, &i, &attachment, &format!("export on {}: {}", v.host, s.message())).await,
    };
    let mut compute = ctx.agents.compute(&i.host).await?;
    let started = compute
        .start_instance(agent::StartInstanceRequest {
            instance_id: i.id.clone(),
            name: i.name.clone(),
            boot_volume_id: v.id.clone(),
            connection: Some(connection),
            vcpus: i.vcpus,
            memory_mb: i.memory_mb,
            iotune: crate::volume_types::disk_limits(&mut *ctx.db.acquire().await?, &v.volume_type_id).await?,
        })
        .await;
    match started {
        Ok(_) => {}
        Err(s) if compute_transient(&s) => return Ok(Outcome::Retry(s.message().to_string())),
        Err(s) => return fail_boot(ctx, &op, &i, &attachment, &format!("start on {}: {}", i.host, s.message())).await,
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    let active = sqlx::query(
        "UPDATE instances SET status = 'active', status_reason = '', updated_at = ? \
         WHERE id = ? AND status = 'building'",
    )
    .bind(now_ms())
    .bind(&i.id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if active == 0 {
        // A forced delete took the instance over while the host started it: the delete, waiting for this
        // operation to end, has the host destroy the domain when it can.
        operations::finish(&mut tx, &op, Some(BOOT_ABANDONED)).await?;
        tx.commit().await?;
        return Ok(Outcome::Finished);
    }
    sqlx::query("UPDATE attachments SET status = 'attached', device = 'vda', updated_at = ? WHERE id = ?")
        .bind(now_ms())
        .bind(&attachment)
        .execute(&mut *tx)
        .await?;
    settle_volume(&mut tx, &v.id, "").await?;
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    ctx.changed(&v.id);
    tracing::info!(instance_id = %i.id, volume_id = %v.id, "instance active");
    Ok(Outcome::Finished)
}

async fn initiator_of(ctx: &Ctx, attachment_id: &str) -> Result<String> {
    let connector: String = sqlx::query_scalar("SELECT connector FROM attachments WHERE id = ?")
        .bind(attachment_id)
        .fetch_one(&ctx.db)
        .await?;
    let connector: serde_json::Value = serde_json::from_str(&connector)?;
    Ok(connector["initiator"].as_str().unwrap_or_default().to_string())
}

async fn fail_boot(ctx: &Arc<Ctx>, op: &Op, i: &Instance, attachment: &str, why: &str) -> Result<Outcome> {
    let mut compute = ctx.agents.compute(&i.host).await?;
    if let Err(s) = compute.destroy_instance(agent::DestroyInstanceRequest { instance_id: i.id.clone() }).await {
        return Ok(Outcome::Retry(format!("undoing a failed boot: {}", s.message())));
    }
    if let Err(reason) = release(ctx, &i.id, attachment, false).await? {
        return Ok(Outcome::Retry(format!("undoing a failed boot: {reason}")));
    }
    set_status(ctx, op, &i.id, "error", &format!("boot failed: {why}")).await
}

/// Delete flow: destroy the domain → release every volume attached to the instance → delete the boot volume
/// when asked → the record goes. A forced delete leaves the host out: the volumes are only unexported, and what
/// the host may still have (the domain, its disks) is released once it answers (`leftovers.rs`).
pub async fn delete_flow(ctx: &Arc<Ctx>, op: Op) -> Result<Outcome> {
    let mut conn = ctx.db.acquire().await?;
    let Some(i) = find(&mut conn, &op.resource_id).await? else {
        operations::finish(&mut conn, &op, None).await?;
        return Ok(Outcome::Finished);
    };
    let attachments: Vec<String> = sqlx::query_scalar("SELECT id FROM attachments WHERE instance IN (?, ?)")
        .bind(&i.id)
        .bind(format!("ember-{}", i.id))
        .fetch_all(&mut *conn)
        .await?;
    let booting: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM operations WHERE kind = 'boot_instance' AND resource_id = ? AND state = 'running'",
    )
    .bind(&i.id)
    .fetch_one(&mut *conn)
    .await?;
    if booting > 0 {
        // It ends at its next step, seeing the instance deleting, and wakes this operation.
        return Ok(Outcome::Waiting(format!("the boot of instance {} ends first", i.id)));
    }
    drop(conn);
    let forced = op.payload["force"].as_bool().unwrap_or(false);
    if forced {
        tracing::warn!(instance_id = %i.id, host = %i.host, "forced delete: the host is not asked");
    } else {
        let mut compute = ctx.agents.compute(&i.host).await?;
        match compute.destroy_instance(agent::DestroyInstanceRequest { instance_id: i.id.clone() }).await {
            Ok(_) => {}
            Err(s) if compute_transient(&s) => return Ok(Outcome::Retry(s.message().to_string())),
            Err(s) => return set_status(ctx, &op, &i.id, "error", &format!("delete failed: {}", s.message())).await,
        }
    }
    for a in attachments {
        if let Err(reason) = release(ctx, &i.id, &a, forced).await? {
            return Ok(Outcome::Retry(reason));
        }
    }
    if i.delete_on_terminate {
        match crate::volumes::api::Volumes::new(ctx.clone()).delete(&system(), &i.boot_volume_id, false).await {
            Ok(()) => {}
            Err(Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(instance_id = %i.id, volume_id = %i.boot_volume_id, "boot volume not deleted: {e}")
            }
        }
    }
    let mut tx = crate::db::write(&ctx.db).await?;
    if forced {
        crate::leftovers::record_domain(&mut tx, &i.id, &i.host).await?;
    }
    let removed = sqlx::query("DELETE FROM instances WHERE id = ?").bind(&i.id).execute(&mut *tx).await?;
    if removed.rows_affected() == 1 {
        ctx.quota.release(&mut tx, &i.project, &quota::instance_deltas(i.vcpus, i.memory_mb)).await?;
    }
    operations::finish(&mut tx, &op, None).await?;
    tx.commit().await?;
    tracing::info!(instance_id = %i.id, "instance deleted");
    Ok(Outcome::Finished)
}

#[tonic::async_trait]
impl InstanceService for Instances {
    async fn create_instance(&self, req: Request<CreateInstanceRequest>) -> Result<Response<Instance>, Status> {
        let who = who(&req)?;
        Ok(Response::new(Instances::create(self, &who, req.into_inner()).await?))
    }

    async fn get_instance(&self, req: Request<GetInstanceRequest>) -> Result<Response<Instance>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(visible(&mut conn, &who, &req.get_ref().id).await?))
    }

    async fn list_instances(
        &self,
        req: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let who = who(&req)?;
        let project = if who.role == Role::Admin { String::new() } else { who.project.clone().unwrap_or_default() };
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE (?1 = '' OR project = ?1) ORDER BY created_at")))
                .bind(&project)
                .fetch_all(&self.ctx.db)
                .await
                .map_err(Error::from)?;
        Ok(Response::new(ListInstancesResponse { instances: rows.iter().map(to_proto).collect() }))
    }

    async fn get_console_log(&self, req: Request<GetInstanceRequest>) -> Result<Response<ConsoleLog>, Status> {
        let who = who(&req)?;
        let mut conn = self.ctx.db.acquire().await.map_err(Error::from)?;
        let i = visible(&mut conn, &who, &req.get_ref().id).await?;
        drop(conn);
        let mut compute = self.ctx.agents.compute(&i.host).await?;
        let text = compute.get_console_log(agent::GetConsoleLogRequest { instance_id: i.id }).await?.into_inner().text;
        Ok(Response::new(ConsoleLog { text }))
    }

    async fn delete_instance(
        &self,
        req: Request<DeleteInstanceRequest>,
    ) -> Result<Response<DeleteInstanceResponse>, Status> {
        let who = who(&req)?;
        let r = req.get_ref();
        Instances::delete(self, &who, &r.id, r.force).await?;
        Ok(Response::new(DeleteInstanceResponse {}))
    }
}
