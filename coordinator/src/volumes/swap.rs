//! Migrating an attached volume (Cinder's migration of an `in-use` volume, where Nova swaps the disk): the guest
//! keeps running and writing while its compute host's QEMU mirrors the disk onto the new copy and switches to it.
//!
//! After the destination's `creating` step, the migration takes two steps of its own:
//! `exporting` (the new copy is exported to the compute host's initiator, with the volume's CHAP credentials, and
//! the connection facts are recorded in the operation) → `swapping` (the compute agent mirrors and pivots; see
//! `compute-agent/src/swap.rs`) → the row and the attachment's connection move to the new pool in one
//! transaction → `cleaning`, which also removes the old export. A swap the compute agent refuses leaves the
//! domain on the old copy, so the migration gives up as a failed copy does, removing the new export too.
//!
//! What is refused, and why: a volume attached more than once or read-only (the mirror writes through the new
//! export), and a destination on the same storage host (an export there is named after the volume, so the two
//! copies would collide). A swap waits for a compute agent that cannot be reached, as a detach does; an admin
//! whose compute host is gone for good forces the detach, and the migration then gives up.

use super::store::VolumeRow;
use crate::agents::compute_transient;
use crate::attachments;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::operations::Op;
use ember_proto::agent::v1 as agent;
use ember_proto::agent::v1::compute_agent_client::ComputeAgentClient;
use sqlx::Row;
use std::sync::Arc;

/// The one attachment of a volume being migrated while in use, as recorded in the operation.
#[derive(Debug, Clone)]
pub(crate) struct AttachedLeg {
    /// Attachment id.
    pub attachment_id: String,
    /// The libvirt domain.
    pub instance: String,
    /// Its compute host.
    pub compute_host: String,
    /// The host's initiator IQN, which the new export admits.
    pub initiator: String,
}

impl AttachedLeg {
    /// For the operation's payload.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.attachment_id, "instance": self.instance, "host": self.compute_host,
            "initiator": self.initiator,
        })
    }

    /// From the operation's payload (`None` for a volume that was available).
    pub fn of(op: &Op) -> Option<AttachedLeg> {
        let a = &op.payload["attachment"];
        let field = |k: &str| a[k].as_str().unwrap_or_default().to_string();
        a.is_object().then(|| AttachedLeg {
            attachment_id: field("id"),
            instance: field("instance"),
            compute_host: field("host"),
            initiator: field("initiator"),
        })
    }
}

/// For an `in-use` volume, its attachment if the volume can move while attached (see the module documentation);
/// `None` for a volume that is not attached.
pub(crate) async fn attached_leg(conn: &mut sqlx::SqliteConnection, v: &VolumeRow) -> Result<Option<AttachedLeg>> {
    if v.status != "in-use" {
        return Ok(None);
    }
    let rows = sqlx::query("SELECT id, instance, host, status, mode, connector FROM attachments WHERE volume_id = ?")
        .bind(&v.id)
        .fetch_all(&mut *conn)
        .await?;
    let [a] = rows.as_slice() else {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is attached {} times; an attached volume moves only with one attachment",
            v.id,
            rows.len()
        )));
    };
    if a.get::<&str, _>(3) != "attached" {
        return Err(Error::FailedPrecondition(format!("volume {}'s attachment is {}", v.id, a.get::<&str, _>(3))));
    }
    if v.read_only || a.get::<&str, _>(4) == "ro" {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is attached read-only, and the copy writes through the new export; detach it first",
            v.id
        )));
    }
    let connector: serde_json::Value = serde_json::from_str(a.get::<&str, _>(5))?;
    Ok(Some(AttachedLeg {
        attachment_id: a.get(0),
        instance: a.get(1),
        compute_host: a.get(2),
        initiator: connector["initiator"].as_str().unwrap_or_default().to_string(),
    }))
}

/// Refuses a destination on the volume's own storage host for an attached volume.
pub(crate) fn check_destination(v: &VolumeRow, to_host: &str) -> Result<()> {
    if to_host == v.host {
        return Err(Error::invalid(
            "pool",
            format!(
                "volume {} is attached, and an attached volume moves only to another storage host (its export is \
                 named after the volume); {to_host} is its own",
                v.id
            ),
        ));
    }
    Ok(())
}

/// What a step of an attached migration came to.
pub(crate) enum Step {
    /// Done; the flow goes on to the step now recorded.
    Next,
    /// A failure worth waiting out.
    Retry(String),
    /// A failure to give up on, with the reason.
    GiveUp(String),
}

/// `exporting`: exports the new copy on `to_host`/`to_backend` to the attachment's initiator, records its
/// connection facts in the operation and moves it to `swapping`.
pub(crate) async fn export_new_copy(
    ctx: &Arc<Ctx>,
    op: &mut Op,
    v: &VolumeRow,
    leg: &AttachedLeg,
    to_host: &str,
    to_backend: &str,
) -> Result<Step> {
    match attachments::export_copy(ctx, v, to_host, to_backend, &leg.initiator, false).await? {
        Ok((_, stored)) => {
            op.payload["new_connection"] = stored;
            let mut conn = ctx.db.acquire().await?;
            crate::operations::advance(&mut conn, op, "swapping").await?;
            Ok(Step::Next)
        }
        Err(status) if crate::agents::transient(&status) => Ok(Step::Retry(status.message().to_string())),
        Err(status) => Ok(Step::GiveUp(format!("export on {to_host}: {}", status.message()))),
    }
}

/// `swapping`: has the compute agent move the domain onto the new copy. On success the caller records the move;
/// the attachment's stored connection is returned for that.
pub(crate) async fn swap_domain(
    ctx: &Arc<Ctx>,
    op: &Op,
    v: &VolumeRow,
    leg: &AttachedLeg,
) -> Result<Result<serde_json::Value, Step>> {
    let Some((a, _)) = attachments::load(ctx, &leg.attachment_id).await? else {
        return Ok(Err(Step::GiveUp("its attachment is gone (a forced detach)".into())));
    };
    if a.get::<&str, _>(4) != "attached" {
        return Ok(Err(Step::GiveUp(format!("its attachment is {} (a forced detach)", a.get::<&str, _>(4)))));
    }
    let (user, password, key) = attachments::volume_secrets(ctx, v).await?;
    let passphrase = key.map(|k| k.passphrase).unwrap_or_default();
    let with_secret = |mut c: agent::Connection| {
        c.auth_username = user.clone();
        c.auth_password = password.clone();
        c.luks_passphrase = passphrase.clone();
        c
    };
    let stored_new = op.payload["new_connection"].clone();
    let request = agent::SwapVolumeRequest {
        volume_id: v.id.clone(),
        instance: leg.instance.clone(),
        old_connection: Some(with_secret(attachments::stored_connection(&a))),
        new_connection: Some(with_secret(attachments::connection_from_json(&stored_new))),
    };
    let swapped = match ctx.agents.compute(&leg.compute_host).await {
        Ok(mut compute) => swap_with_progress(ctx, &mut compute, request).await,
        Err(e) => return Ok(Err(Step::Retry(e.to_string()))),
    };
    match swapped {
        Ok(done) => {
            tracing::info!(volume_id = %v.id, instance = %leg.instance, device = %done.device,
                bytes = done.copied_bytes, "the guest's disk now reads from the new copy");
            Ok(Ok(stored_new))
        }
        Err(status) if compute_transient(&status) => {
            Ok(Err(Step::Retry(format!("compute agent {}: {}", leg.compute_host, status.message()))))
        }
        Err(status) => Ok(Err(Step::GiveUp(format!("swap on {}: {}", leg.compute_host, status.message())))),
    }
}

/// Has the compute agent swap the disk, recording the mirror's progress as it reports it. Returns the last
/// message; a stream that ends before the swap is done is UNAVAILABLE, worth a retry (the agent's repeat finds
/// the mirror where it is).
async fn swap_with_progress(
    ctx: &Ctx,
    compute: &mut ComputeAgentClient<ember_common::access_log::Traced>,
    request: agent::SwapVolumeRequest,
) -> std::result::Result<agent::SwapVolumeProgress, tonic::Status> {
    let id = request.volume_id.clone();
    let stream = compute.swap_volume(request).await?.into_inner();
    super::migrate::follow_progress(ctx, &id, stream, "swap", |p| (p.done, p.copied_bytes, p.total_bytes)).await
}

/// Removes the export of the copy on `host`/`backend` to the attachment's initiator; a refusal is logged (the
/// copy's delete, which follows, removes its exports too).
pub(crate) async fn unexport(ctx: &Arc<Ctx>, v: &VolumeRow, leg: &AttachedLeg, host: &str, backend: &str) {
    let request = agent::UnexportVolumeRequest {
        volume_id: v.id.clone(),
        backend: backend.to_string(),
        initiator: leg.initiator.clone(),
    };
    let removed = match ctx.agents.storage(host).await {
        Ok(mut storage) => storage.unexport_volume(request).await.map(drop).map_err(|s| s.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = removed {
        tracing::warn!(volume_id = %v.id, host, %why, "export left for the volume's delete there");
    }
}
