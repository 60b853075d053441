//! `ember`: the command line for people. It finds the coordinator and its certificate from flags, the
//! environment (`EMBER_COORDINATOR`, `EMBER_CA`, `EMBER_CERT`, `EMBER_KEY`) or a config file
//! (`EMBER_CLI_CONFIG`, default `~/.config/ember/cli.toml`), prints tables for people and `--json` for scripts,
//! and reports failures as the gRPC status in one line.

mod backup;
mod bench;
mod certs;
mod connect;
mod instance;
mod output;
mod quota;
mod service;
mod snapshot;
mod transfer;
mod types;
mod volume;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ember", version, about = "ember block storage: the command line")]
struct Cli {
    #[command(flatten)]
    conn: connect::ConnectArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the fleet CA and issue certificates.
    Certs(certs::CertsCmd),
    /// List, disable and enable services (admin).
    Service(service::ServiceCmd),
    /// Availability zones volumes can be created in.
    Zone(service::ZoneCmd),
    /// Storage pools as the scheduler sees them (admin).
    Pool(service::PoolCmd),
    /// Manage volume types and their extra specs.
    Type(types::TypeCmd),
    /// Show and set project quotas.
    Quota(quota::QuotaCmd),
    /// Create, list, show, update, extend, delete, attach, export, manage and unmanage volumes.
    Volume(volume::VolumeCmd),
    /// Snapshots of volumes.
    Snapshot(snapshot::SnapshotCmd),
    /// Hand volumes to other projects.
    Transfer(transfer::TransferCmd),
    /// Instances booted from volumes.
    Instance(instance::InstanceCmd),
    /// Attachments of volumes to instances.
    Attachment(volume::AttachmentCmd),
    /// Back up volumes and restore them.
    Backup(backup::BackupCmd),
    /// Measure the fleet (volume create/delete latency and throughput).
    Bench(bench::BenchCmd),
    /// Print the fleet's metrics in Prometheus' text format, e.g. for node_exporter's textfile collector (admin).
    Metrics,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    ember_common::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(c) => certs::run(c, cli.json),
        Command::Service(c) => service::run(c, &cli.conn, cli.json).await,
        Command::Type(c) => types::run(c, &cli.conn, cli.json).await,
        Command::Zone(c) => service::run_zones(c, &cli.conn, cli.json).await,
        Command::Pool(c) => service::run_pools(c, &cli.conn, cli.json).await,
        Command::Quota(c) => quota::run(c, &cli.conn, cli.json).await,
        Command::Volume(c) => volume::run(c, &cli.conn, cli.json).await,
        Command::Snapshot(c) => snapshot::run(c, &cli.conn, cli.json).await,
        Command::Transfer(c) => transfer::run(c, &cli.conn, cli.json).await,
        Command::Instance(c) => instance::run(c, &cli.conn, cli.json).await,
        Command::Attachment(c) => volume::run_attachments(c, &cli.conn, cli.json).await,
        Command::Backup(c) => backup::run(c, &cli.conn, cli.json).await,
        Command::Bench(c) => bench::run(c, &cli.conn, cli.json).await,
        Command::Metrics => service::run_metrics(&cli.conn).await,
    };
    if let Err(e) = result {
        eprintln!("ember: {e}");
        std::process::exit(1);
    }
}
