//! `ember-storage-agent`: runs on a storage node, carves volumes out of its backends and exports them over
//! iSCSI (tgt). It registers its backends (with pools, capacity and capabilities) with the coordinator and
//! heartbeats.

mod backend;
mod config;
mod copy;
mod cow_store;
mod data;
mod error;
mod exports;
mod file_backend;
mod image;
mod keeper;
mod lio;
mod luks;
mod lvm;
mod ranges;
mod revert;
mod service;
mod sparse;
mod tgt;
mod thin_map;

use clap::Parser;
use ember_common::agent::{AgentArgs, serve_agent, start_process};
use ember_common::identity::{Role, require_roles};
use ember_common::nfs::StartMounts;
use ember_proto::agent::v1::storage_agent_server::StorageAgentServer;
use ember_proto::agent::v1::{AgentRole, Backend, RegisterRequest};
use service::{Storage, StorageService};
use std::sync::Arc;
use tonic::service::RoutesBuilder;

/// Callers of the storage agent's API: the coordinator (and, for data, backup agents, and the storage agents
/// that copy a migrating volume from this one).
const CALLERS: &[Role] = &[Role::Coordinator, Role::BackupAgent, Role::StorageAgent];

#[derive(Debug, Parser)]
#[command(name = "ember-storage-agent", version, about = "ember's storage node agent")]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
}

#[tokio::main]
async fn main() {
    ember_common::private_files();
    let args = Args::parse();
    start_process(args.agent.log_json);
    ember_common::direct_io::keep_freed_memory();
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        eprintln!("ember-storage-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file: config::StorageConfig = ember_common::config::load(args.agent.config.as_deref())?;
    let id = args.agent.resolve(file.agent.clone())?;
    let state_dir = file.state_dir.clone().unwrap_or_else(|| "/var/lib/ember/storage-agent".into());
    let exports = exports::ExportStore::load(&state_dir)?; // creates the state directory
    // A refused start (a backend that will not open) leaves no share mounted that it mounted.
    let mut mounts = StartMounts::default();
    let opened = open_backends(&file, &state_dir, &mut mounts).await;
    let backends = mounts.undo_if_refused(opened).await?;
    let storage = Arc::new(Storage {
        backends,
        tgt: tgt::Tgt { control_port: file.tgt.control_port },
        lio: lio::Lio { root: lio::CONFIGFS_ROOT.into(), portal: file.lio.portal.clone() },
        portal: file.tgt.portal.clone(),
        iqn_prefix: file.tgt.iqn_prefix.clone(),
        exports: tokio::sync::Mutex::new(exports),
        state_dir: state_dir.clone(),
        image_dirs: file.image_dirs.clone(),
        peers: copy::Peers {
            tls: id.tls.clone(),
            timeout: id.peer_timeout,
            bandwidth: file.copy_bandwidth_mib.saturating_mul(1 << 20),
        },
    });
    let keeper = keeper::start(storage.clone(), file.tgt.clone()).await;

    let az = id.availability_zone.clone();
    let name = id.name.clone();
    let reporter = storage.clone();
    let mut routes = RoutesBuilder::default();
    // Restores stream chunks of up to 64 MiB (the largest chunk size) to WriteVolume.
    let server = StorageAgentServer::new(StorageService(storage))
        .max_decoding_message_size(65 << 20)
        .max_encoding_message_size(65 << 20);
    routes.add_service(tonic::service::interceptor::InterceptedService::new(server, require_roles(CALLERS)));
    let served =
        serve_agent(id, routes, &["ember.agent.v1.StorageAgent"], move |endpoint, instance_id| RegisterRequest {
            name: name.clone(),
            role: AgentRole::Storage as i32,
            endpoint: endpoint.to_string(),
            instance_id: instance_id.to_string(),
            version: ember_common::VERSION.to_string(),
            api_version: ember_proto::AGENT_API_VERSION.to_string(),
            availability_zone: az.clone(),
            backends: reporter
                .backends
                .values()
                .map(|b| Backend {
                    name: b.cfg().name.clone(),
                    driver: b.cfg().driver.clone(),
                    availability_zone: b.cfg().availability_zone.clone().unwrap_or_else(|| az.clone()),
                    storage_protocol: "iSCSI".into(),
                    vendor_name: "ember".into(),
                    driver_version: ember_common::VERSION.into(),
                    pools: vec![b.pool()],
                })
                .collect(),
            connector: None,
            repositories: vec![],
            compute_capacity: None,
            crl_number: 0, // the registration loop sets it
        })
        .await;
    // Stopping the keeper drops our tgtd, which ends it; an agent killed outright leaves tgtd running with its
    // exports, and the next start adopts it.
    keeper.abort();
    let _ = keeper.await;
    served
}

/// Opens the configured backends, mounting the NFS shares of those that live on one.
async fn open_backends(
    file: &config::StorageConfig,
    state_dir: &std::path::Path,
    mounts: &mut StartMounts,
) -> Result<std::collections::BTreeMap<String, backend::Backend>, Box<dyn std::error::Error>> {
    let mut backends = std::collections::BTreeMap::new();
    for b in file.checked_backends()? {
        if let Some(share) = &b.nfs_share {
            let options = b.nfs_mount_options.as_deref().unwrap_or(ember_common::nfs::DEFAULT_OPTIONS);
            mounts.ensure(share, &b.directory, options).await?;
        }
        let name = b.name.clone();
        let opened = backend::Backend::open(b, state_dir).await.map_err(|e| format!("backend {name}: {e}"))?;
        backends.insert(name, opened);
    }
    Ok(backends)
}
