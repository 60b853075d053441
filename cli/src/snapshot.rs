//! `ember snapshot`: point-in-time copies of volumes.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

/// `ember snapshot …`
#[derive(Debug, clap::Args)]
pub struct SnapshotCmd {
    #[command(subcommand)]
    action: SnapshotAction,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotAction {
    /// Snapshot a volume.
    Create {
        /// Volume id.
        volume: String,
        /// Name.
        #[arg(long, default_value = "")]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Allow an in-use volume.
        #[arg(long)]
        force: bool,
        /// Client-chosen key making the create safe to repeat.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Wait until available.
        #[arg(long)]
        wait: bool,
    },
    /// List snapshots.
    List {
        /// Only this volume's.
        #[arg(long, default_value = "")]
        volume: String,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id.
        id: String,
    },
    /// Rename a snapshot or change its description.
    Update {
        /// Snapshot id.
        id: String,
        #[command(flatten)]
        renaming: output::Renaming,
    },
    /// Admin: adopt a snapshot the volume's backend holds that the coordinator has no record of (after its
    /// database was lost or replaced). Adopt the volume first (`ember volume manage`).
    Manage {
        /// The volume it is a snapshot of.
        volume: String,
        /// The snapshot's id on the volume's backend (its file or LV is named by it).
        id: String,
        /// Name.
        #[arg(long, default_value = "")]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Take over an LV ember did not make but that is named as ember names snapshots, `_snapshot-<id>` (a
        /// Cinder LVM snapshot); ember tags it as its own.
        #[arg(long)]
        foreign: bool,
    },
    /// Admin: forget an available snapshot, leaving its data on the backend (`manage` takes it back).
    Unmanage {
        /// Snapshot id.
        id: String,
    },
    /// Delete a snapshot.
    Delete {
        /// Snapshot id.
        id: String,
        /// Wait until gone.
        #[arg(long)]
        wait: bool,
    },
}

fn print(list: &[Snapshot], json: bool) {
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|s| serde_json::json!({"id": s.id, "project": s.project, "volume_id": s.volume_id, "name": s.name, "description": s.description, "status": s.status, "status_reason": s.status_reason, "size_gb": s.size_gb, "created_at": output::time(&s.created_at)}))
            .collect();
        output::json(&serde_json::Value::Array(items));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.volume_id.clone(),
                s.name.clone(),
                s.status.clone(),
                s.size_gb.to_string(),
                s.status_reason.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "Volume", "Name", "Status", "Size", "Reason"], &rows);
}

/// Polls until the snapshot leaves its transitional state; `None` once it is gone.
async fn wait(
    client: &mut SnapshotServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Result<Option<Snapshot>, CliError> {
    loop {
        match client.get_snapshot(GetSnapshotRequest { id: id.into() }).await {
            Ok(s) => {
                let s = s.into_inner();
                if !matches!(s.status.as_str(), "creating" | "deleting") {
                    return Ok(Some(s));
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `ember snapshot …`.
pub async fn run(cmd: SnapshotCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = SnapshotServiceClient::new(conn.channel()?);
    match cmd.action {
        SnapshotAction::Create { volume, name, description, force, idempotency_key, wait: w } => {
            let mut s = client
                .create_snapshot(CreateSnapshotRequest { volume_id: volume, name, description, force, idempotency_key })
                .await?
                .into_inner();
            if w {
                s = wait(&mut client, &s.id).await?.unwrap_or(s);
                if s.status != "available" {
                    print(std::slice::from_ref(&s), json);
                    return Err(CliError::Other(format!("snapshot {} is {}: {}", s.id, s.status, s.status_reason)));
                }
            }
            print(&[s], json);
        }
        SnapshotAction::List { volume } => {
            let all = output::all_pages(|page| {
                let mut c = client.clone();
                let req = ListSnapshotsRequest { volume_id: volume.clone(), page: Some(page), ..Default::default() };
                async move { c.list_snapshots(req).await.map(|r| r.into_inner()).map(|r| (r.snapshots, r.page)) }
            })
            .await?;
            print(&all, json);
        }
        SnapshotAction::Show { id } => {
            print(&[client.get_snapshot(GetSnapshotRequest { id }).await?.into_inner()], json)
        }
        SnapshotAction::Update { id, renaming: output::Renaming { name, description } } => {
            let req = UpdateSnapshotRequest { id, name, description };
            print(&[client.update_snapshot(req).await?.into_inner()], json);
        }
        SnapshotAction::Manage { volume, id, name, description, foreign } => {
            let req = ManageSnapshotRequest { volume_id: volume, id, name, description, foreign };
            print(&[client.manage_snapshot(req).await?.into_inner()], json);
        }
        SnapshotAction::Unmanage { id } => {
            client.unmanage_snapshot(UnmanageSnapshotRequest { id: id.clone() }).await?;
            let text = format!("snapshot {id} unmanaged; its data stays on the backend");
            output::confirm(json, "snapshot", &id, "unmanaged", &text);
        }
        SnapshotAction::Delete { id, wait: w } => {
            client.delete_snapshot(DeleteSnapshotRequest { id: id.clone() }).await?;
            if w && let Some(s) = wait(&mut client, &id).await? {
                return Err(CliError::Other(format!("snapshot {} is {}: {}", s.id, s.status, s.status_reason)));
            }
            let status = if w { "deleted" } else { "deleting" };
            output::confirm(json, "snapshot", &id, status, &format!("snapshot {id} {status}"));
        }
    }
    Ok(())
}
