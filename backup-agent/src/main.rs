//! `ember-backup-agent`: runs on a backup node and keeps deduplicated backups in repositories (directories,
//! local or NFS). It registers its repositories with the coordinator.

mod chunk;
mod cinder;
mod repo;
mod restore;
mod service;
mod stops;
mod verify;

use clap::Parser;
use ember_common::agent::{AgentArgs, AgentSettings, filesystem_space, serve_agent, start_process};
use ember_common::identity::{Role, require_roles, valid_name};
use ember_common::nfs::StartMounts;
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
    /// Unreferenced chunks younger than this many seconds survive garbage collection (default 60).
    gc_grace_seconds: Option<u64>,
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
    /// Chunk size in bytes for a new repository (default 1 MiB); an existing repository keeps its own.
    chunk_size: Option<u32>,
    /// An NFS share (`server:/path`) the agent mounts on `directory` itself.
    nfs_share: Option<String>,
    /// Mount options for `nfs_share` (default: NFS 4.2, soft, bounded retries).
    nfs_mount_options: Option<String>,
}

#[derive(Debug, Parser)]
#[command(name = "ember-backup-agent", version, about = "ember's backup node agent")]
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
        eprintln!("ember-backup-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file: BackupConfig = ember_common::config::load(args.agent.config.as_deref())?;
    let id = args.agent.resolve(file.agent.clone())?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let holder = format!("backup agent {} on host {}, process {}", id.name, host.trim(), std::process::id());
    // A refused start (a repository another agent holds, a bad setting) leaves no share mounted that it mounted.
    let mut mounts = StartMounts::default();
    let opened = open_repositories(&file, &holder, &mut mounts).await;
    let repos = mounts.undo_if_refused(opened).await?;
    let backups = std::sync::Arc::new(service::Backups {
        repos,
        tls: id.tls.clone(),
        peer_timeout: id.peer_timeout,
        running: Default::default(),
        workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2),
        gc_grace: std::time::Duration::from_secs(file.gc_grace_seconds.unwrap_or(60)),
        progress: Default::default(),
        restoring: Default::default(),
        stops: Default::default(),
    });
    let (name, az, repos) = (id.name.clone(), id.availability_zone.clone(), file.repositories.clone());
    let mut routes = RoutesBuilder::default();
    routes.add_service(BackupAgentServer::with_interceptor(
        service::BackupService(backups),
        require_roles(&[Role::Coordinator]),
    ));
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
        compute_capacity: None,
        crl_number: 0, // the registration loop sets it
    })
    .await
}

/// Opens the configured repositories, mounting NFS shares first; the directories of the shares it mounted
/// itself go into `mounted_now`, so that a failed start can unmount them.
async fn open_repositories(
    file: &BackupConfig,
    holder: &str,
    mounts: &mut StartMounts,
) -> Result<std::collections::BTreeMap<String, std::sync::Arc<repo::Repository>>, Box<dyn std::error::Error>> {
    let mut repos = std::collections::BTreeMap::new();
    for r in &file.repositories {
        if !valid_name(&r.name) {
            return Err(format!("repository name {:?} is not valid", r.name).into());
        }
        if let Some(share) = &r.nfs_share {
            let options = r.nfs_mount_options.as_deref().unwrap_or(ember_common::nfs::DEFAULT_OPTIONS);
            mounts.ensure(share, &r.directory, options).await?;
        }
        let chunk_size = r.chunk_size.unwrap_or(repo::DEFAULT_CHUNK_SIZE);
        if !chunk_size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&chunk_size) {
            return Err(
                format!("repository {}: chunk_size must be a power of two from 64 KiB to 64 MiB", r.name).into()
            );
        }
        if repos.contains_key(&r.name) {
            return Err(format!("repository name {:?} appears twice", r.name).into());
        }
        let opened = repo::Repository::open(&r.directory, chunk_size, holder)
            .map_err(|e| format!("repository {} at {}: {e}", r.name, r.directory.display()))?;
        repos.insert(r.name.clone(), std::sync::Arc::new(opened));
    }
    Ok(repos)
}

#[cfg(test)]
mod tests {
    /// The example a deployment starts from (docs/deploy.md) says what it means to say.
    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/backup-agent.toml");
        let cfg: super::BackupConfig = ember_common::config::load(Some(std::path::Path::new(example))).unwrap();
        assert_eq!(cfg.agent.name.as_deref(), Some("backup1"));
        assert!(cfg.agent.advertise.is_some() && cfg.agent.coordinator.is_some() && cfg.agent.tls.is_some());
        assert_eq!(cfg.gc_grace_seconds, Some(60));
        assert_eq!(cfg.repositories.len(), 1);
        assert_eq!(cfg.repositories[0].name, "repo1");
        assert_eq!(cfg.repositories[0].nfs_share.as_deref(), Some("nfs.example.net:/export/ember-backups"));
    }
}
