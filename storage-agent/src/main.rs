//! `ember-storage-agent`: runs on a storage node, carves volumes out of its backends and exports them.
//! It registers its backends (with pools, capacity and capabilities) with the coordinator and heartbeats.

mod config;
mod service;

use clap::Parser;
use ember_common::agent::{AgentArgs, serve_agent, start_process};
use ember_common::identity::{Role, require_roles};
use ember_proto::agent::v1::storage_agent_server::StorageAgentServer;
use ember_proto::agent::v1::{AgentRole, RegisterRequest};
use tonic::service::RoutesBuilder;

/// Callers of the storage agent's API: the coordinator (and, for data, backup agents).
const CALLERS: &[Role] = &[Role::Coordinator, Role::BackupAgent];

#[derive(Debug, Parser)]
#[command(name = "ember-storage-agent", version, about = "ember's storage node agent")]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    start_process(args.agent.log_json);
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        eprintln!("ember-storage-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file: config::StorageConfig = ember_common::config::load(args.agent.config.as_deref())?;
    let id = args.agent.resolve(file.agent.clone())?;
    let backends = file.checked_backends()?;
    let az = id.availability_zone.clone();
    let name = id.name.clone();
    let mut routes = RoutesBuilder::default();
    routes.add_service(StorageAgentServer::with_interceptor(service::Storage, require_roles(CALLERS)));
    serve_agent(id, routes, &["ember.agent.v1.StorageAgent"], move |endpoint, instance_id| RegisterRequest {
        name: name.clone(),
        role: AgentRole::Storage as i32,
        endpoint: endpoint.to_string(),
        instance_id: instance_id.to_string(),
        version: ember_common::VERSION.to_string(),
        api_version: ember_proto::AGENT_API_VERSION.to_string(),
        availability_zone: az.clone(),
        backends: backends.iter().map(|b| b.report(&az)).collect(),
        connector: None,
        repositories: vec![],
    })
    .await
}
