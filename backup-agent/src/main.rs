//! `ember-backup-agent`: runs on a backup node and keeps deduplicated backups in repositories (directories,
//! local or NFS). It registers its repositories with the coordinator.

mod service;

use clap::Parser;
use ember_common::agent::{AgentArgs, AgentSettings, filesystem_space, serve_agent, start_process};
use ember_common::identity::{Role, require_roles, valid_name};
use ember_proto::agent::v1::backup_agent_server::BackupAgentServer;
use ember_proto::agent::v1::{AgentRole, RegisterRequest, Repository};
use serde::Deserialize;
use std::path::PathBuf;
use tonic::service::RoutesBuilder;

/// The backup agent's TOML config.
#[derive(Debug, Clone, Default, Deserialize)]
struct BackupConfig {
    /// Keys every agent has.
    #[serde(flatten)]
    agent: AgentSettings,
    /// The node's repositories.
    #[serde(default)]
    repositories: Vec<RepositoryConfig>,
}

/// One repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepositoryConfig {
    /// Repository name.
    name: String,
    /// Its directory.
    directory: PathBuf,
    /// Availability zone, default the agent's.
    availability_zone: Option<String>,
}

#[derive(Debug, Parser)]
#[command(name = "ember-backup-agent", version, about = "ember's backup node agent")]
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
        eprintln!("ember-backup-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file: BackupConfig = ember_common::config::load(args.agent.config.as_deref())?;
    let id = args.agent.resolve(file.agent.clone())?;
    for r in &file.repositories {
        if !valid_name(&r.name) {
            return Err(format!("repository name {:?} is not valid", r.name).into());
        }
        std::fs::create_dir_all(&r.directory).map_err(|e| format!("repository {}: {e}", r.directory.display()))?;
    }
    let (name, az, repos) = (id.name.clone(), id.availability_zone.clone(), file.repositories.clone());
    let mut routes = RoutesBuilder::default();
    routes.add_service(BackupAgentServer::with_interceptor(service::Backups, require_roles(&[Role::Coordinator])));
    serve_agent(id, routes, &["ember.agent.v1.BackupAgent"], move |endpoint, instance_id| RegisterRequest {
        name: name.clone(),
        role: AgentRole::Backup as i32,
        endpoint: endpoint.to_string(),
        instance_id: instance_id.to_string(),
        version: ember_common::VERSION.to_string(),
        api_version: ember_proto::AGENT_API_VERSION.to_string(),
        availability_zone: az.clone(),
        backends: vec![],
        connector: None,
        repositories: repos
            .iter()
            .map(|r| {
                let (total, free) = filesystem_space(&r.directory).unwrap_or((0, 0));
                Repository {
                    name: r.name.clone(),
                    availability_zone: r.availability_zone.clone().unwrap_or_else(|| az.clone()),
                    total_bytes: total,
                    free_bytes: free,
                }
            })
            .collect(),
    })
    .await
}
