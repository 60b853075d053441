//! `ember-coordinator`: owns the fleet's state in SQLite and serves the public API (`ember.v1`) and the
//! agents' registration service (`ember.agent.v1.Registration`) over mutual TLS.

mod agents;
mod attachments;
mod auth;
mod backups;
mod clock;
mod config;
mod context;
mod db;
mod encryption;
mod error;
mod failpoint;
mod fleet;
mod idempotency;
mod instances;
mod leftovers;
mod metrics;
mod operations;
mod paging;
mod placement;
mod pools;
mod quota;
mod quota_check;
mod quotas;
mod registration;
mod repository_import;
mod scheduler;
mod snapshots;
mod status;
mod sweeper;
mod transfers;
mod type_access;
mod validate;
mod volume_types;
mod volumes;

use clap::Parser;
use config::CoordinatorConfig;
use ember_common::identity::{Role, require_roles};
use ember_common::server;
use ember_proto::agent::v1::registration_server::RegistrationServer;
use ember_proto::v1::attachment_service_server::AttachmentServiceServer;
use ember_proto::v1::backup_service_server::BackupServiceServer;
use ember_proto::v1::fleet_service_server::FleetServiceServer;
use ember_proto::v1::instance_service_server::InstanceServiceServer;
use ember_proto::v1::quota_service_server::QuotaServiceServer;
use ember_proto::v1::snapshot_service_server::SnapshotServiceServer;
use ember_proto::v1::transfer_service_server::TransferServiceServer;
use ember_proto::v1::volume_service_server::VolumeServiceServer;
use ember_proto::v1::volume_type_service_server::VolumeTypeServiceServer;
use std::path::PathBuf;
use tonic::service::RoutesBuilder;

/// Who may call the public API.
const PUBLIC: &[Role] = &[Role::Admin, Role::Member];
/// Who may register.
const AGENTS: &[Role] = &[Role::StorageAgent, Role::ComputeAgent, Role::BackupAgent];

#[derive(Debug, Parser)]
#[command(name = "ember-coordinator", version, about = "ember's coordinator: fleet state and the public gRPC API")]
struct Args {
    /// TOML config file.
    #[arg(long, short = 'c', env = "EMBER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address (port 0 picks one and prints `EMBER_LISTENING <addr>`).
    #[arg(long)]
    listen: Option<String>,
    /// SQLite database file.
    #[arg(long, global = true)]
    database: Option<PathBuf>,
    /// TLS material.
    #[command(flatten)]
    tls: ember_common::tls::TlsArgs,
    /// Seconds between agent heartbeats.
    #[arg(long)]
    heartbeat_interval: Option<u32>,
    /// Seconds without a heartbeat before a service is down.
    #[arg(long)]
    service_down: Option<u32>,
    /// Seconds between reconciler passes.
    #[arg(long)]
    reconcile_interval: Option<u32>,
    /// Seconds a silent agent is given before its connection is dropped and the calls on it fail.
    #[arg(long, env = "EMBER_PEER_TIMEOUT")]
    peer_timeout: Option<u32>,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    log_json: bool,
    /// Instead of serving, do this and exit.
    #[command(subcommand)]
    command: Option<Command>,
}

/// What the coordinator binary does besides serving.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Write a consistent copy of the database (the one `--database` or the config names) to FILE, also while a
    /// coordinator is using it, and check the copy. Keep it with the master key file: without that, the keys of
    /// encrypted volumes in it cannot be unwrapped.
    BackupDb {
        /// Where to write the copy; it must not exist yet.
        file: PathBuf,
    },
}

fn settings(args: &Args) -> Result<CoordinatorConfig, Box<dyn std::error::Error>> {
    let mut cfg: CoordinatorConfig = ember_common::config::load(args.config.as_deref())?;
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
    }
    if let Some(d) = &args.database {
        cfg.database = d.clone();
    }
    if let Some(h) = args.heartbeat_interval {
        cfg.heartbeat_interval_seconds = h;
    }
    if let Some(s) = args.service_down {
        cfg.service_down_seconds = s;
    }
    if let Some(r) = args.reconcile_interval {
        cfg.reconcile_interval_seconds = r.max(1);
    }
    if let Some(p) = args.peer_timeout {
        cfg.peer_timeout_seconds = p;
    }
    cfg.tls = args.tls.over(cfg.tls.take());
    Ok(cfg)
}

#[tokio::main]
async fn main() {
    ember_common::private_files();
    ember_common::install_crypto_provider();
    let args = Args::parse();
    ember_common::logging::init(args.log_json);
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        eprintln!("ember-coordinator: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = settings(&args)?;
    if let Some(Command::BackupDb { file }) = &args.command {
        let copy = db::backup(&cfg.database, file).await?;
        let key_file = cfg.key_file.clone().unwrap_or_else(|| cfg.database.with_file_name("master.key"));
        println!(
            "database {} copied to {}: {} volume(s), {} snapshot(s), {} backup(s); integrity ok",
            cfg.database.display(),
            file.display(),
            copy.volumes,
            copy.snapshots,
            copy.backups
        );
        println!("keep it with the master key {}: encrypted volumes' keys need it", key_file.display());
        return Ok(());
    }
    let tls = cfg.tls.clone().ok_or("tls (--ca, --cert, --key or [tls] in the config) is required")?;
    let db = db::open(&cfg.database).await?;
    let peer_timeout = std::time::Duration::from_secs(cfg.peer_timeout_seconds.into());
    tracing::info!(database = %cfg.database.display(), "database open and migrated");
    let key_file = cfg.key_file.clone().unwrap_or_else(|| cfg.database.with_file_name("master.key"));
    let master_key = encryption::MasterKey::load_or_create(&key_file)?;
    // Before the first call to an agent: the certificate presented follows renewals (and is warned about
    // daily when it expires soon).
    let own_certificate = ember_common::own_certificate::watch(&tls)?;

    let ctx = std::sync::Arc::new(context::Ctx {
        db: db.clone(),
        agents: agents::Agents::new(tls.clone(), db.clone(), peer_timeout),
        quota: quota::QuotaEngine::new(&cfg.default_quotas),
        schedule_lock: tokio::sync::Mutex::new(()),
        max_attempts: cfg.max_attempts.max(1),
        capacity_weight_multiplier: cfg.capacity_weight_multiplier,
        service_down_ms: i64::from(cfg.service_down_seconds) * 1000,
        workers: Default::default(),
        changes: tokio::sync::broadcast::channel(1024).0,
        master_key,
        own_certificate,
    });
    // Before the first call to an agent: a revoked certificate is refused from the start.
    ember_common::revocation::watch(&tls)?;
    let reconciler = tokio::spawn(operations::reconcile_forever(
        ctx.clone(),
        std::time::Duration::from_secs(cfg.reconcile_interval_seconds.into()),
    ));
    let retention = std::time::Duration::from_secs(u64::from(cfg.operations_retention_days) * 86_400);
    let purger = tokio::spawn(operations::purge_forever(db.clone(), retention));
    let shutdown = server::shutdown_signal();
    let (listener, addr) = server::bind(&cfg.listen).await?;
    let public = require_roles(PUBLIC);
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(VolumeTypeServiceServer::with_interceptor(
            volume_types::VolumeTypes::new(db.clone()),
            public.clone(),
        ))
        .add_service(FleetServiceServer::with_interceptor(fleet::Fleet::new(ctx.clone()), public.clone()))
        .add_service(QuotaServiceServer::with_interceptor(
            quotas::Quotas::new(db.clone(), &cfg.default_quotas),
            public.clone(),
        ))
        .add_service(VolumeServiceServer::with_interceptor(volumes::api::Volumes::new(ctx.clone()), public.clone()))
        .add_service(SnapshotServiceServer::with_interceptor(snapshots::Snapshots::new(ctx.clone()), public.clone()))
        .add_service(BackupServiceServer::with_interceptor(backups::Backups::new(ctx.clone()), public.clone()))
        .add_service(AttachmentServiceServer::with_interceptor(
            attachments::Attachments::new(ctx.clone()),
            public.clone(),
        ))
        .add_service(InstanceServiceServer::with_interceptor(instances::Instances::new(ctx.clone()), public.clone()))
        .add_service(TransferServiceServer::with_interceptor(transfers::Transfers::new(ctx.clone()), public))
        .add_service(RegistrationServer::with_interceptor(
            registration::Registrar::new(ctx.clone(), cfg.heartbeat_interval_seconds),
            require_roles(AGENTS),
        ));
    tracing::info!(%addr, "coordinator serving");
    server::serve(
        listener,
        &tls,
        routes,
        &["ember.v1.VolumeService", "ember.v1.FleetService", "ember.agent.v1.Registration"],
        shutdown,
        peer_timeout,
    )
    .await?;
    reconciler.abort();
    purger.abort();
    db.close().await;
    tracing::info!("coordinator stopped");
    Ok(())
}
