//! `ember volume` and `ember attachment`: volumes (like `cinder create/list/show/delete/extend`), exports,
//! and attaching to instances.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::io::Write;
use tonic::transport::Channel;

/// `ember volume …`
#[derive(Debug, clap::Args)]
pub struct VolumeCmd {
    #[command(subcommand)]
    action: VolumeAction,
}

/// What a new or adopted volume is called, and its type.
#[derive(Debug, clap::Args)]
struct Naming {
    /// Name.
    #[arg(long, default_value = "")]
    name: String,
    /// Description.
    #[arg(long, default_value = "")]
    description: String,
    /// Volume type id or name (default type when omitted).
    #[arg(long = "type", default_value = "")]
    volume_type: String,
}

#[derive(Debug, clap::Subcommand)]
enum VolumeAction {
    /// Create a volume (blank, from a snapshot, a clone, from a backup, or from an image).
    Create {
        /// Size in GiB (may be omitted with --snapshot, --source-volume or --backup).
        #[arg(long, default_value_t = 0)]
        size: u64,
        #[command(flatten)]
        naming: Naming,
        /// Availability zone.
        #[arg(long, default_value = "")]
        availability_zone: String,
        /// Metadata `key=value` (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
        /// Mark bootable.
        #[arg(long)]
        bootable: bool,
        /// Build from this snapshot.
        #[arg(long, default_value = "")]
        snapshot: String,
        /// Clone this volume.
        #[arg(long, default_value = "")]
        source_volume: String,
        /// Restore this backup into the new volume (as `ember backup restore` does).
        #[arg(long, default_value = "")]
        backup: String,
        /// Fill from this image: a raw or qcow2 file (absolute path on the storage node) or an http(s) URL; the
        /// volume becomes bootable.
        #[arg(long, default_value = "")]
        image: String,
        /// Client-chosen key making the create safe to repeat.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Put it on the storage host of this volume (repeatable; Cinder's `--hint same_host=`).
        #[arg(long = "same-host", value_name = "VOLUME_ID")]
        same_host: Vec<String>,
        /// Keep it off the storage host of this volume (repeatable; Cinder's `--hint different_host=`).
        #[arg(long = "different-host", value_name = "VOLUME_ID")]
        different_host: Vec<String>,
        /// Wait until the volume is available (or failed), showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// List volumes.
    List {
        /// Only this status.
        #[arg(long, default_value = "")]
        status: String,
        /// Only this name.
        #[arg(long, default_value = "")]
        name: String,
        /// Admin: only this project.
        #[arg(long, default_value = "")]
        project: String,
        /// Admin: only volumes on this pool, host@backend.
        #[arg(long, default_value = "")]
        pool: String,
    },
    /// Show one volume.
    Show {
        /// Volume id.
        id: String,
    },
    /// Rename a volume, change its description or bootable flag, or set and unset its metadata.
    Update {
        /// Volume id.
        id: String,
        #[command(flatten)]
        renaming: output::Renaming,
        /// Mark bootable (`true`) or not (`false`).
        #[arg(long)]
        bootable: Option<bool>,
        /// Make every attachment and export read-only (`true`) or not (`false`); only while available.
        #[arg(long)]
        read_only: Option<bool>,
        /// Metadata `key=value` to set (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
        /// Metadata key to remove (repeatable).
        #[arg(long = "unset-property")]
        unset_properties: Vec<String>,
    },
    /// Delete a volume.
    Delete {
        /// Volume id.
        id: String,
        /// Admin: its storage node is lost for good; drop the records of the volume, its snapshots and its
        /// attachments without it (files left there stay).
        #[arg(long)]
        forget: bool,
        /// Delete its snapshots with it.
        #[arg(long, conflicts_with = "forget")]
        cascade: bool,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Admin: adopt a volume a backend holds that the coordinator has no record of (after its database was lost
    /// or replaced; the coordinator's log names each such volume it leaves alone).
    Manage {
        /// The pool that holds it, host@backend.
        pool: String,
        /// Its id on that backend.
        id: String,
        /// Owning project (default admin).
        #[arg(long, default_value = "")]
        project: String,
        #[command(flatten)]
        naming: Naming,
        /// Take over an LV ember did not make but that is named as ember names volumes, `volume-<id>` (a Cinder
        /// LVM volume, which keeps its id); ember tags it as its own.
        #[arg(long)]
        foreign: bool,
    },
    /// Admin: list what a pool holds that the coordinator has no record of (what `manage` could adopt), with
    /// sizes and, for snapshots, the volume each was taken of where the backend records it.
    Manageable {
        /// The pool, host@backend.
        pool: String,
    },
    /// Admin: stop managing an available volume without snapshots, leaving its data on the backend (`manage`
    /// takes it back, into any project).
    Unmanage {
        /// Volume id.
        id: String,
        /// Wait until ember has let go of it.
        #[arg(long)]
        wait: bool,
    },
    /// Revert a detached volume to one of its snapshots, in place.
    Revert {
        /// Volume id.
        id: String,
        /// Snapshot id (of this volume).
        snapshot: String,
        /// Wait until it is done.
        #[arg(long)]
        wait: bool,
    },
    /// Admin: move a volume without snapshots to another pool; its data is copied from storage node to storage
    /// node, and the old copy is wiped and removed. An attached volume moves to another storage host while its
    /// guest runs (the compute host mirrors the disk and switches to the new copy).
    Migrate {
        /// Volume id.
        id: String,
        /// The destination pool, host@backend; without it the scheduler chooses one in the volume's zone.
        #[arg(long, default_value = "")]
        pool: String,
        /// Wait until the volume is on its new pool.
        #[arg(long)]
        wait: bool,
    },
    /// Change a volume's type: where it lies when its pool satisfies the new type, else (with
    /// `--migration-policy on-demand`) by moving it to a pool that does.
    Retype {
        /// Volume id.
        id: String,
        /// The new type (name or id).
        volume_type: String,
        /// `never`: only in place; `on-demand`: move a detached volume when its pool does not fit the type.
        #[arg(long, default_value = "never", value_parser = ["never", "on-demand"])]
        migration_policy: String,
        /// Wait until a retype that moves the volume is done.
        #[arg(long)]
        wait: bool,
    },
    /// Grow a volume, attached or not (its guests are told of the new size).
    Extend {
        /// Volume id.
        id: String,
        /// New size in GiB.
        size: u64,
        /// Wait until it is done.
        #[arg(long)]
        wait: bool,
    },
    /// Attach a volume to an instance on a compute host.
    Attach {
        /// Volume id.
        id: String,
        /// Instance: an ember instance's id (members: of their project), or for an admin any libvirt domain
        /// (name or UUID) of the host.
        #[arg(long)]
        instance: String,
        /// Compute host; defaults to the one an ember instance runs on.
        #[arg(long, default_value = "")]
        host: String,
        /// Read-only.
        #[arg(long)]
        read_only: bool,
        /// Wait until attached.
        #[arg(long)]
        wait: bool,
    },
    /// Detach an attachment (by attachment id, or by volume id when it has exactly one).
    Detach {
        /// Attachment or volume id.
        id: String,
        /// Admin: without the compute host, for a host that is down; the host loses access to the volume now,
        /// and is asked to take the disk from its guest if it comes back. Also takes over a detach, or ends an
        /// attach, waiting for that host.
        #[arg(long)]
        force: bool,
        /// Wait until detached.
        #[arg(long)]
        wait: bool,
    },
    /// Export a volume to an initiator and print how to connect (for acting as a compute node by hand).
    Export {
        /// Volume id.
        id: String,
        /// Initiator IQN.
        #[arg(long)]
        initiator: String,
        /// Initiator host name.
        #[arg(long, default_value = "")]
        host: String,
        /// Initiator IP.
        #[arg(long, default_value = "")]
        ip: String,
    },
    /// Remove an initiator's access.
    Unexport {
        /// Volume id.
        id: String,
        /// Initiator IQN.
        #[arg(long)]
        initiator: String,
    },
}

/// `ember attachment …`
#[derive(Debug, clap::Args)]
pub struct AttachmentCmd {
    #[command(subcommand)]
    action: AttachmentAction,
}

#[derive(Debug, clap::Subcommand)]
enum AttachmentAction {
    /// List attachments.
    List {
        /// Only this volume.
        #[arg(long, default_value = "")]
        volume: String,
    },
}

/// A volume as JSON.
pub fn volume_json(v: &Volume) -> serde_json::Value {
    serde_json::json!({
        "id": v.id, "project": v.project, "name": v.name, "description": v.description, "size_gb": v.size_gb,
        "status": v.status, "status_reason": v.status_reason, "volume_type": v.volume_type_name,
        "availability_zone": v.availability_zone, "host": v.host, "metadata": v.metadata, "bootable": v.bootable,
        "multiattach": v.multiattach, "source_snapshot_id": v.source_snapshot_id, "source_volume_id": v.source_volume_id,
        "source_backup_id": v.source_backup_id, "migrating_to": v.migrating_to, "migration_progress": v.migration_progress, "read_only": v.read_only,
        "encrypted": v.encrypted,
        "attachments": v.attachments.iter().map(|a| serde_json::json!({"id": a.id, "instance": a.instance, "host": a.host, "device": a.device})).collect::<Vec<_>>(),
        "exports": v.exports.iter().map(|e| serde_json::json!({"initiator": e.initiator, "read_only": e.read_only, "exported_by": e.exported_by, "created_at": output::time(&e.created_at)})).collect::<Vec<_>>(),
        "created_at": output::time(&v.created_at), "updated_at": output::time(&v.updated_at),
    })
}

fn print_volumes(volumes: &[Volume], json: bool) {
    if json {
        output::json(&serde_json::Value::Array(volumes.iter().map(volume_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            // Initiators given the volume with `ember volume export` are users too.
            let attached: Vec<String> = v
                .attachments
                .iter()
                .map(|a| a.instance.clone())
                .chain(v.exports.iter().map(|e| format!("{} (export)", e.initiator)))
                .collect();
            vec![
                v.id.clone(),
                v.name.clone(),
                v.status.clone(),
                v.size_gb.to_string(),
                v.volume_type_name.clone(),
                if v.migrating_to.is_empty() {
                    v.host.clone()
                } else {
                    format!("{} → {} ({}%)", v.host, v.migrating_to, v.migration_progress)
                },
                attached.join(","),
                v.status_reason.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "Name", "Status", "Size", "Type", "Host", "Attached to", "Reason"], &rows);
}

fn print_manageable(list: &ListManageableResponse, json: bool) {
    let as_json = |m: &Manageable| {
        serde_json::json!({"id": m.id, "size_gb": m.size_gb, "safe_to_manage": m.safe_to_manage,
            "reason_not_safe": m.reason_not_safe, "volume_id": m.volume_id, "foreign": m.foreign})
    };
    if json {
        let volumes: Vec<_> = list.volumes.iter().map(as_json).collect();
        let snapshots: Vec<_> = list.snapshots.iter().map(as_json).collect();
        output::json(&serde_json::json!({"volumes": volumes, "snapshots": snapshots}));
        return;
    }
    let rows = |kind: &str, items: &[Manageable]| -> Vec<Vec<String>> {
        let safe =
            |m: &Manageable| if m.safe_to_manage { "yes".to_string() } else { format!("no: {}", m.reason_not_safe) };
        items
            .iter()
            .map(|m| vec![kind.into(), m.id.clone(), m.size_gb.to_string(), safe(m), m.volume_id.clone()])
            .collect()
    };
    let mut all = rows("volume", &list.volumes);
    all.extend(rows("snapshot", &list.snapshots));
    output::table(&["Kind", "ID", "Size", "Safe to manage", "Of volume"], &all);
}

/// Follows a volume until a final state, printing each status change to stderr. Returns the last state, or
/// `None` when it was deleted.
pub async fn wait_volume(client: &mut VolumeServiceClient<Channel>, id: &str) -> Result<Option<Volume>, CliError> {
    let mut stream = client.watch_volume(GetVolumeRequest { id: id.into() }).await?.into_inner();
    let started = std::time::Instant::now();
    while let Some(v) = stream.message().await? {
        let progress = if v.migrating_to.is_empty() { String::new() } else { format!(" {:>3}%", v.migration_progress) };
        eprint!("\r{} {:<12} {:>5.1}s{progress}", v.id, v.status, started.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
    }
    eprintln!();
    // The stream ends at a final state, or when the volume is gone.
    match client.get_volume(GetVolumeRequest { id: id.into() }).await {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

/// Prints volume `v`, after waiting for its operation to end when asked; fails when it ended in an error state.
async fn finish(client: &mut VolumeServiceClient<Channel>, v: Volume, wait: bool, json: bool) -> Result<(), CliError> {
    finish_when(client, v, wait, json, |_| true).await
}

/// [`finish`], failing also when the volume, once settled, is not as `done` expects: an operation that fails
/// can leave the volume usable as it was (an attached volume that could not grow stays `in-use`), with the
/// reason.
async fn finish_when(
    client: &mut VolumeServiceClient<Channel>,
    v: Volume,
    wait: bool,
    json: bool,
    done: impl Fn(&Volume) -> bool,
) -> Result<(), CliError> {
    if !wait {
        print_volumes(&[v], json);
        return Ok(());
    }
    match wait_volume(client, &v.id).await? {
        Some(v) if v.status.starts_with("error") || !done(&v) => {
            print_volumes(std::slice::from_ref(&v), json);
            Err(CliError::Other(format!("volume {} is {}: {}", v.id, v.status, v.status_reason)))
        }
        Some(v) => {
            print_volumes(&[v], json);
            Ok(())
        }
        None => {
            output::confirm(json, "volume", &v.id, "deleted", &format!("volume {} deleted", v.id));
            Ok(())
        }
    }
}

/// Runs `ember volume …`.
pub async fn run(cmd: VolumeCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let channel = conn.channel()?;
    let mut client = VolumeServiceClient::new(channel.clone());
    match cmd.action {
        VolumeAction::Create {
            size,
            naming: Naming { name, description, volume_type },
            availability_zone,
            properties,
            bootable,
            snapshot,
            source_volume,
            backup,
            image,
            idempotency_key,
            same_host,
            different_host,
            wait,
        } => {
            let hinted = !same_host.is_empty() || !different_host.is_empty();
            let scheduler_hints = hinted.then_some(SchedulerHints { same_host, different_host });
            let req = CreateVolumeRequest {
                size_gb: size,
                name,
                description,
                volume_type,
                availability_zone,
                metadata: crate::types::parse_pairs(&properties)?,
                bootable,
                snapshot_id: snapshot,
                source_volume_id: source_volume,
                backup_id: backup,
                image,
                idempotency_key,
                scheduler_hints,
                ..Default::default()
            };
            let v = client.create_volume(req).await?.into_inner();
            finish(&mut client, v, wait, json).await
        }
        VolumeAction::List { status, name, project, pool } => {
            let all = output::all_pages(|page| {
                let mut c = client.clone();
                let req = ListVolumesRequest {
                    status: status.clone(),
                    name: name.clone(),
                    project: project.clone(),
                    page: Some(page),
                    pool: pool.clone(),
                };
                async move { c.list_volumes(req).await.map(|r| r.into_inner()).map(|r| (r.volumes, r.page)) }
            })
            .await?;
            print_volumes(&all, json);
            Ok(())
        }
        VolumeAction::Show { id } => {
            let v = client.get_volume(GetVolumeRequest { id }).await?.into_inner();
            print_volumes(&[v], json);
            Ok(())
        }
        VolumeAction::Update {
            id,
            renaming: output::Renaming { name, description },
            bootable,
            read_only,
            properties,
            unset_properties,
        } => {
            let req = UpdateVolumeRequest {
                id,
                name,
                description,
                bootable,
                read_only,
                set_metadata: crate::types::parse_pairs(&properties)?,
                unset_metadata: unset_properties,
            };
            print_volumes(&[client.update_volume(req).await?.into_inner()], json);
            Ok(())
        }
        VolumeAction::Manageable { pool } => {
            let list = client.list_manageable(ListManageableRequest { pool }).await?.into_inner();
            print_manageable(&list, json);
            Ok(())
        }
        VolumeAction::Unmanage { id, wait } => {
            let v = client.unmanage_volume(UnmanageVolumeRequest { id: id.clone() }).await?.into_inner();
            if wait && let Some(v) = wait_volume(&mut client, &id).await? {
                return Err(CliError::Other(format!("volume {} is {}: {}", v.id, v.status, v.status_reason)));
            }
            let status = if wait { "unmanaged" } else { "unmanaging" };
            output::confirm(
                json,
                "volume",
                &v.id,
                status,
                &format!("volume {} {status}; its data stays on {}", v.id, v.host),
            );
            Ok(())
        }
        VolumeAction::Delete { id, forget, cascade, wait } => {
            client.delete_volume(DeleteVolumeRequest { id: id.clone(), forget, cascade }).await?;
            if forget {
                output::confirm(json, "volume", &id, "forgotten", &format!("volume {id} forgotten"));
                return Ok(());
            }
            if wait && let Some(v) = wait_volume(&mut client, &id).await? {
                return Err(CliError::Other(format!("volume {} is {}: {}", v.id, v.status, v.status_reason)));
            }
            let status = if wait { "deleted" } else { "deleting" };
            output::confirm(json, "volume", &id, status, &format!("volume {id} {status}"));
            Ok(())
        }
        VolumeAction::Manage { pool, id, project, naming: Naming { name, description, volume_type }, foreign } => {
            let req = ManageVolumeRequest { pool, id, project, name, description, volume_type, foreign };
            let v = client.manage_volume(req).await?.into_inner();
            print_volumes(&[v], json);
            Ok(())
        }
        VolumeAction::Revert { id, snapshot, wait } => {
            let v = client.revert_volume(RevertVolumeRequest { id, snapshot_id: snapshot }).await?.into_inner();
            finish(&mut client, v, wait, json).await
        }
        VolumeAction::Migrate { id, pool, wait } => {
            let v = client.migrate_volume(MigrateVolumeRequest { id, pool }).await?.into_inner();
            let (from, to) = (v.host.clone(), v.migrating_to.clone());
            if !wait {
                if json {
                    print_volumes(&[v], json);
                } else {
                    println!("volume {} migrating from {from} to {to}", v.id);
                }
                return Ok(());
            }
            match wait_volume(&mut client, &v.id).await? {
                Some(moved) if moved.host == to => {
                    print_volumes(&[moved], json);
                    Ok(())
                }
                Some(stayed) => Err(CliError::Other(format!(
                    "volume {} stayed on {}: {}",
                    stayed.id, stayed.host, stayed.status_reason
                ))),
                None => Err(CliError::Other(format!("volume {} was deleted", v.id))),
            }
        }
        VolumeAction::Retype { id, volume_type, migration_policy, wait } => {
            let req = RetypeVolumeRequest { id, volume_type: volume_type.clone(), migration_policy };
            let v = client.retype_volume(req).await?.into_inner();
            if !wait || v.status != "retyping" {
                print_volumes(&[v], json);
                return Ok(());
            }
            match wait_volume(&mut client, &v.id).await? {
                Some(done) if done.volume_type_name == volume_type || done.volume_type_id == volume_type => {
                    print_volumes(&[done], json);
                    Ok(())
                }
                Some(stayed) => Err(CliError::Other(format!(
                    "volume {} kept type {} on {}: {}",
                    stayed.id, stayed.volume_type_name, stayed.host, stayed.status_reason
                ))),
                None => Err(CliError::Other(format!("volume {} was deleted", v.id))),
            }
        }
        VolumeAction::Extend { id, size, wait } => {
            let v = client.extend_volume(ExtendVolumeRequest { id, new_size_gb: size }).await?.into_inner();
            finish_when(&mut client, v, wait, json, |v| v.size_gb == size).await
        }
        VolumeAction::Attach { id, instance, host, read_only, wait } => {
            let mut attachments = AttachmentServiceClient::new(channel);
            let mut a = attachments
                .attach(AttachRequest { volume_id: id.clone(), instance, host, read_only })
                .await?
                .into_inner();
            if wait {
                let v = wait_volume(&mut client, &id).await?;
                if let Some(v) = v.filter(|v| v.status != "in-use") {
                    return Err(CliError::Other(format!(
                        "attach did not complete: volume {} is {}: {}",
                        v.id, v.status, v.status_reason
                    )));
                }
                // As it is now: attached, with the device the guest sees.
                a = attachments.get_attachment(GetAttachmentRequest { id: a.id }).await?.into_inner();
            }
            print_attachments(&[a], json);
            Ok(())
        }
        VolumeAction::Detach { id, force, wait } => {
            let mut attachments = AttachmentServiceClient::new(channel);
            let list = attachments
                .list_attachments(ListAttachmentsRequest { volume_id: id.clone(), instance: String::new() })
                .await?
                .into_inner();
            let (attachment_id, volume_id) = match list.attachments.as_slice() {
                [one] => (one.id.clone(), one.volume_id.clone()),
                [] => {
                    let a = attachments.get_attachment(GetAttachmentRequest { id: id.clone() }).await?.into_inner();
                    (a.id, a.volume_id)
                }
                _ => {
                    return Err(CliError::Other(format!(
                        "volume {id} has several attachments; name the attachment id"
                    )));
                }
            };
            attachments.detach(DetachRequest { attachment_id: attachment_id.clone(), force }).await?;
            if wait {
                let v = wait_volume(&mut client, &volume_id).await?;
                // A guest that keeps the disk ends the detach with the attachment still there, and the reason.
                match attachments.get_attachment(GetAttachmentRequest { id: attachment_id.clone() }).await {
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(s.into()),
                    Ok(_) => {
                        let (status, reason) = v.map(|v| (v.status, v.status_reason)).unwrap_or_default();
                        return Err(CliError::Other(format!(
                            "detach did not complete: volume {volume_id} is {status}: {reason}"
                        )));
                    }
                }
            }
            let status = if wait { "detached" } else { "detaching" };
            output::confirm(
                json,
                "attachment",
                &attachment_id,
                status,
                &format!("attachment {attachment_id} {status}"),
            );
            Ok(())
        }
        VolumeAction::Export { id, initiator, host, ip } => {
            let info = client
                .initialize_connection(InitializeConnectionRequest {
                    volume_id: id,
                    connector: Some(Connector { host, ip, initiator, read_only: false }),
                })
                .await?
                .into_inner();
            let value = serde_json::json!({
                "driver_volume_type": info.driver_volume_type, "target_portal": info.target_portal,
                "target_iqn": info.target_iqn, "target_lun": info.target_lun, "auth_method": info.auth_method,
                "auth_username": info.auth_username, "auth_password": info.auth_password, "volume_id": info.volume_id,
                "access_mode": info.access_mode,
            });
            if json {
                output::json(&value);
            } else {
                for (k, v) in value.as_object().into_iter().flatten() {
                    println!("{k:<20} {}", v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
                }
            }
            Ok(())
        }
        VolumeAction::Unexport { id, initiator } => {
            client
                .terminate_connection(TerminateConnectionRequest {
                    volume_id: id.clone(),
                    connector: Some(Connector { initiator, ..Default::default() }),
                })
                .await?;
            output::confirm(json, "volume", &id, "unexported", &format!("volume {id} unexported"));
            Ok(())
        }
    }
}

fn print_attachments(list: &[Attachment], json: bool) {
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|a| serde_json::json!({"id": a.id, "volume_id": a.volume_id, "instance": a.instance, "host": a.host, "status": a.status, "device": a.device, "mode": a.mode}))
            .collect();
        output::json(&serde_json::Value::Array(items));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.volume_id.clone(),
                a.instance.clone(),
                a.host.clone(),
                a.status.clone(),
                a.device.clone(),
                a.mode.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "Volume", "Instance", "Host", "Status", "Device", "Mode"], &rows);
}

/// Runs `ember attachment …`.
pub async fn run_attachments(cmd: AttachmentCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = AttachmentServiceClient::new(conn.channel()?);
    match cmd.action {
        AttachmentAction::List { volume } => {
            let list = client
                .list_attachments(ListAttachmentsRequest { volume_id: volume, instance: String::new() })
                .await?
                .into_inner();
            print_attachments(&list.attachments, json);
        }
    }
    Ok(())
}
