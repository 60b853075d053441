//! `ember backup`: deduplicated backups of volumes (like `cinder backup-*`).

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::io::Write;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// `ember backup …`
#[derive(Debug, clap::Args)]
pub struct BackupCmd {
    #[command(subcommand)]
    action: BackupAction,
}

#[derive(Debug, clap::Subcommand)]
enum BackupAction {
    /// Back up a volume (full, or --incremental on its latest backup).
    Create {
        /// Volume id.
        volume: String,
        /// Name.
        #[arg(long, default_value = "")]
        name: String,
        /// Build on the volume's latest available backup.
        #[arg(long)]
        incremental: bool,
        /// Allow an in-use volume (a temporary snapshot is backed up).
        #[arg(long)]
        force: bool,
        /// Wait until done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// List backups.
    List {
        /// Only this volume's.
        #[arg(long, default_value = "")]
        volume: String,
    },
    /// Show one backup.
    Show {
        /// Backup id.
        id: String,
    },
    /// Delete a backup (refused while incrementals depend on it).
    Delete {
        /// Backup id.
        id: String,
        /// Wait until gone.
        #[arg(long)]
        wait: bool,
    },
    /// Restore into a new volume, or onto an existing one with --volume.
    Restore {
        /// Backup id.
        id: String,
        /// Existing available volume to overwrite.
        #[arg(long, default_value = "")]
        volume: String,
        /// Name of the new volume.
        #[arg(long, default_value = "")]
        name: String,
        /// Wait until done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Re-read and re-hash every chunk of a backup.
    Verify {
        /// Backup id.
        id: String,
    },
    /// Import a backup written by Cinder's posix/NFS driver (admin): DIR is its backup_posix_path, readable
    /// by the backup agent.
    ImportCinder {
        /// Cinder's backup directory (absolute).
        directory: String,
        /// Cinder's backup id.
        backup_id: String,
        /// Project that will own it.
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Remove chunks no backup references (admin).
    Gc {
        /// Only this backup host (`host` or `host@repository`).
        #[arg(long, default_value = "")]
        host: String,
    },
}

fn to_json(b: &Backup) -> serde_json::Value {
    serde_json::json!({
        "id": b.id, "volume_id": b.volume_id, "name": b.name, "status": b.status, "status_reason": b.status_reason,
        "size_gb": b.size_gb, "incremental": b.incremental, "parent_id": b.parent_id, "stored_bytes": b.stored_bytes,
        "new_bytes": b.new_bytes, "dedup_ratio": b.dedup_ratio, "progress": b.progress_percent, "host": b.host,
        "created_at": output::time(&b.created_at),
    })
}

fn print(list: &[Backup], json: bool) {
    if json {
        output::json(&serde_json::Value::Array(list.iter().map(to_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.volume_id.clone(),
                b.status.clone(),
                b.size_gb.to_string(),
                if b.incremental { "incremental" } else { "full" }.into(),
                format!("{:.1} MB", b.stored_bytes as f64 / 1e6),
                format!("{:.1} MB", b.new_bytes as f64 / 1e6),
                format!("{:.2}", b.dedup_ratio),
                b.status_reason.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "Volume", "Status", "Size", "Kind", "Stored", "New", "Dedup", "Reason"], &rows);
}

/// Polls a backup until it leaves `creating`/`deleting`/`restoring`, drawing elapsed time and MB/s.
async fn wait(client: &mut BackupServiceClient<Channel>, id: &str) -> Result<Option<Backup>, CliError> {
    let started = Instant::now();
    loop {
        match client.get_backup(GetBackupRequest { id: id.into() }).await {
            Ok(b) => {
                let b = b.into_inner();
                let secs = started.elapsed().as_secs_f64();
                let done = (b.size_gb << 30) as f64 * f64::from(b.progress_percent) / 100.0;
                let rate = if secs > 0.0 { done / 1e6 / secs } else { 0.0 };
                eprint!("\r{} {:<10} {:>3}% {:>6.1}s {:>7.0} MB/s", b.id, b.status, b.progress_percent, secs, rate);
                let _ = std::io::stderr().flush();
                if !matches!(b.status.as_str(), "creating" | "deleting" | "restoring") {
                    let mbs = if secs > 0.0 { (b.size_gb << 30) as f64 / 1e6 / secs } else { 0.0 };
                    eprintln!("  {mbs:.0} MB/s (volume size / time)");
                    return Ok(Some(b));
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                eprintln!();
                return Ok(None);
            }
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `ember backup …`.
pub async fn run(cmd: BackupCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let channel = conn.channel()?;
    let mut client = BackupServiceClient::new(channel.clone());
    match cmd.action {
        BackupAction::Create { volume, name, incremental, force, wait: w } => {
            let mut b = client
                .create_backup(CreateBackupRequest {
                    volume_id: volume,
                    name,
                    incremental,
                    force,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if w {
                b = wait(&mut client, &b.id).await?.unwrap_or(b);
                if b.status != "available" {
                    print(std::slice::from_ref(&b), json);
                    return Err(CliError::Other(format!("backup {} is {}: {}", b.id, b.status, b.status_reason)));
                }
            }
            print(&[b], json);
        }
        BackupAction::List { volume } => print(
            &client.list_backups(ListBackupsRequest { volume_id: volume, page: None }).await?.into_inner().backups,
            json,
        ),
        BackupAction::Show { id } => print(&[client.get_backup(GetBackupRequest { id }).await?.into_inner()], json),
        BackupAction::Delete { id, wait: w } => {
            client.delete_backup(DeleteBackupRequest { id: id.clone() }).await?;
            if w && let Some(b) = wait(&mut client, &id).await? {
                return Err(CliError::Other(format!("backup {} is {}: {}", b.id, b.status, b.status_reason)));
            }
            println!("backup {id} {}", if w { "deleted" } else { "deleting" });
        }
        BackupAction::Restore { id, volume, name, wait: w } => {
            let r = client
                .restore_backup(RestoreBackupRequest { backup_id: id, volume_id: volume, name })
                .await?
                .into_inner();
            if w {
                let started = Instant::now();
                let mut volumes = VolumeServiceClient::new(channel);
                let v = crate::volume::wait_volume(&mut volumes, &r.volume_id).await?;
                if let Some(v) = v {
                    let mbs = (v.size_gb << 30) as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!("restored {} GiB in {:.2}s ({mbs:.0} MB/s)", v.size_gb, started.elapsed().as_secs_f64());
                    if v.status != "available" {
                        return Err(CliError::Other(format!("volume {} is {}: {}", v.id, v.status, v.status_reason)));
                    }
                }
            }
            if json {
                output::json(&serde_json::json!({ "backup_id": r.backup_id, "volume_id": r.volume_id }));
            } else {
                println!("restoring backup {} into volume {}", r.backup_id, r.volume_id);
            }
        }
        BackupAction::Verify { id } => {
            let r = client.verify_backup(VerifyBackupRequest { id: id.clone() }).await?.into_inner();
            let ok = r.missing_chunks.is_empty() && r.corrupt_chunks.is_empty();
            if json {
                output::json(
                    &serde_json::json!({ "id": id, "ok": ok, "chunks_checked": r.chunks_checked, "missing_chunks": r.missing_chunks, "corrupt_chunks": r.corrupt_chunks }),
                );
            } else {
                println!("backup {id}: {} chunks checked", r.chunks_checked);
                for c in &r.missing_chunks {
                    println!("missing {c}");
                }
                for c in &r.corrupt_chunks {
                    println!("corrupt {c}");
                }
            }
            if !ok {
                return Err(CliError::Other(format!(
                    "backup {id} is damaged: {} missing, {} corrupt chunk(s)",
                    r.missing_chunks.len(),
                    r.corrupt_chunks.len()
                )));
            }
        }
        BackupAction::ImportCinder { directory, backup_id, project } => {
            let b = client
                .import_cinder_backup(ImportCinderBackupRequest { directory, cinder_backup_id: backup_id, project })
                .await?
                .into_inner();
            if b.status != "available" {
                print(std::slice::from_ref(&b), json);
                return Err(CliError::Other(format!("import {} is {}: {}", b.id, b.status, b.status_reason)));
            }
            print(&[b], json);
        }
        BackupAction::Gc { host } => {
            let r = client.collect_garbage(CollectGarbageRequest { host }).await?.into_inner();
            if json {
                output::json(&serde_json::json!({ "chunks_removed": r.chunks_removed, "bytes_freed": r.bytes_freed }));
            } else {
                println!("removed {} chunk(s), freed {:.1} MB", r.chunks_removed, r.bytes_freed as f64 / 1e6);
            }
        }
    }
    Ok(())
}
