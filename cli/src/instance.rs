//! `ember instance`: instances booted from volumes (a libvirt domain on a compute host).

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::instance_service_client::InstanceServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

/// `ember instance …`
#[derive(Debug, clap::Args)]
pub struct InstanceCmd {
    #[command(subcommand)]
    action: InstanceAction,
}

#[derive(Debug, clap::Subcommand)]
enum InstanceAction {
    /// Boot an instance from a volume (or from a snapshot, through a new volume).
    Create {
        /// Name.
        name: String,
        /// Bootable volume to boot from.
        #[arg(long, default_value = "")]
        boot_volume: String,
        /// Snapshot to boot from (a volume is created from it first).
        #[arg(long, default_value = "")]
        boot_snapshot: String,
        /// Compute host (default: the first enabled one).
        #[arg(long, default_value = "")]
        host: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Delete the boot volume with the instance.
        #[arg(long)]
        delete_on_terminate: bool,
        /// Wait until it is active (or failed).
        #[arg(long)]
        wait: bool,
    },
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Instance id.
        id: String,
    },
    /// Print the instance's serial console.
    ConsoleLog {
        /// Instance id.
        id: String,
    },
    /// Delete an instance: stop it, detach its volumes (and delete the boot volume if asked at create).
    Delete {
        /// Instance id.
        id: String,
        /// Admin: without its compute host, which is down (its domain is destroyed if it comes back).
        #[arg(long)]
        force: bool,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
    },
}

fn print(list: &[Instance], json: bool) {
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|i| serde_json::json!({"id": i.id, "name": i.name, "host": i.host, "status": i.status, "status_reason": i.status_reason, "boot_volume_id": i.boot_volume_id, "vcpus": i.vcpus, "memory_mb": i.memory_mb, "delete_on_terminate": i.delete_on_terminate, "created_at": output::time(&i.created_at)}))
            .collect();
        output::json(&serde_json::Value::Array(items));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                i.name.clone(),
                i.host.clone(),
                i.status.clone(),
                i.boot_volume_id.clone(),
                i.status_reason.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "Name", "Host", "Status", "Boot volume", "Reason"], &rows);
}

/// Polls until the instance leaves `building`/`deleting`; `None` once it is gone.
async fn wait(
    client: &mut InstanceServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Result<Option<Instance>, CliError> {
    loop {
        match client.get_instance(GetInstanceRequest { id: id.into() }).await {
            Ok(i) => {
                let i = i.into_inner();
                if !matches!(i.status.as_str(), "building" | "deleting") {
                    return Ok(Some(i));
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `ember instance …`.
pub async fn run(cmd: InstanceCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = InstanceServiceClient::new(conn.channel()?);
    match cmd.action {
        InstanceAction::Create {
            name,
            boot_volume,
            boot_snapshot,
            host,
            vcpus,
            memory,
            delete_on_terminate,
            wait: w,
        } => {
            let req = CreateInstanceRequest {
                name,
                boot_volume_id: boot_volume,
                boot_snapshot_id: boot_snapshot,
                host,
                vcpus,
                memory_mb: memory,
                delete_on_terminate,
            };
            let mut i = client.create_instance(req).await?.into_inner();
            if w {
                i = wait(&mut client, &i.id).await?.unwrap_or(i);
                if i.status != "active" {
                    print(std::slice::from_ref(&i), json);
                    return Err(CliError::Other(format!("instance {} is {}: {}", i.id, i.status, i.status_reason)));
                }
            }
            print(&[i], json);
        }
        InstanceAction::List => {
            print(&client.list_instances(ListInstancesRequest {}).await?.into_inner().instances, json)
        }
        InstanceAction::Show { id } => {
            print(&[client.get_instance(GetInstanceRequest { id }).await?.into_inner()], json)
        }
        InstanceAction::ConsoleLog { id } => {
            print!("{}", client.get_console_log(GetInstanceRequest { id }).await?.into_inner().text)
        }
        InstanceAction::Delete { id, force, wait: w } => {
            client.delete_instance(DeleteInstanceRequest { id: id.clone(), force }).await?;
            if w && let Some(i) = wait(&mut client, &id).await? {
                return Err(CliError::Other(format!("instance {} is {}: {}", i.id, i.status, i.status_reason)));
            }
            let status = if w { "deleted" } else { "deleting" };
            output::confirm(json, "instance", &id, status, &format!("instance {id} {status}"));
        }
    }
    Ok(())
}
