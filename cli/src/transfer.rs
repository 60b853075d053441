//! `ember transfer`: hand a volume to another project, as `cinder transfer-create` / `transfer-accept`.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::transfer_service_client::TransferServiceClient;
use ember_proto::v1::*;

/// `ember transfer …`
#[derive(Debug, clap::Args)]
pub struct TransferCmd {
    #[command(subcommand)]
    action: TransferAction,
}

#[derive(Debug, clap::Subcommand)]
enum TransferAction {
    /// Offer an available volume (with its snapshots) to another project; prints the transfer id and its key,
    /// which the receiver needs and which is shown this once only.
    Create {
        /// Volume id.
        volume: String,
        /// Name.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the transfers your project offers (admins: all).
    List {
        /// Only this volume's.
        #[arg(long, default_value = "")]
        volume: String,
    },
    /// Show one transfer.
    Show {
        /// Transfer id.
        id: String,
    },
    /// Withdraw an offer: the volume is available again.
    Delete {
        /// Transfer id.
        id: String,
    },
    /// Accept a transfer into your project: the volume and its snapshots become yours.
    Accept {
        /// Transfer id.
        id: String,
        /// The key `ember transfer create` printed.
        auth_key: String,
        /// Admin: the project to receive the volume.
        #[arg(long, default_value = "")]
        project: String,
    },
}

fn print(list: &[Transfer], json: bool) {
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|t| {
                let mut item = serde_json::json!({"id": t.id, "volume_id": t.volume_id, "name": t.name, "project": t.project, "created_at": output::time(&t.created_at)});
                if !t.auth_key.is_empty() {
                    item["auth_key"] = t.auth_key.clone().into();
                }
                if t.accepted_at.is_some() {
                    item["accepted_at"] = output::time(&t.accepted_at).into();
                }
                item
            })
            .collect();
        output::json(&serde_json::Value::Array(items));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![t.id.clone(), t.volume_id.clone(), t.name.clone(), t.project.clone(), output::time(&t.created_at)]
        })
        .collect();
    output::table(&["ID", "Volume", "Name", "Project", "Created"], &rows);
}

/// Runs `ember transfer …`.
pub async fn run(cmd: TransferCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = TransferServiceClient::new(conn.channel()?);
    match cmd.action {
        TransferAction::Create { volume, name } => {
            let t = client.create_transfer(CreateTransferRequest { volume_id: volume, name }).await?.into_inner();
            if json {
                print(std::slice::from_ref(&t), json);
            } else {
                println!("volume {} is awaiting transfer", t.volume_id);
                println!("transfer_id {}", t.id);
                println!("auth_key    {}", t.auth_key);
                println!("the receiver runs: ember transfer accept {} {}", t.id, t.auth_key);
            }
        }
        TransferAction::List { volume } => {
            let all = output::all_pages(|page| {
                let mut c = client.clone();
                let req = ListTransfersRequest { volume_id: volume.clone(), page: Some(page) };
                async move { c.list_transfers(req).await.map(|r| r.into_inner()).map(|r| (r.transfers, r.page)) }
            })
            .await?;
            print(&all, json);
        }
        TransferAction::Show { id } => {
            print(&[client.get_transfer(GetTransferRequest { id }).await?.into_inner()], json)
        }
        TransferAction::Delete { id } => {
            client.delete_transfer(DeleteTransferRequest { id: id.clone() }).await?;
            output::confirm(
                json,
                "transfer",
                &id,
                "deleted",
                &format!("transfer {id} deleted; its volume is available again"),
            );
        }
        TransferAction::Accept { id, auth_key, project } => {
            let t = client.accept_transfer(AcceptTransferRequest { id, auth_key, project }).await?.into_inner();
            if json {
                print(std::slice::from_ref(&t), json);
            } else {
                println!("volume {} transferred to project {}", t.volume_id, t.project);
            }
        }
    }
    Ok(())
}
