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
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Build on the volume's latest available backup.
        #[arg(long)]
        incremental: bool,
        /// Allow an in-use volume (a temporary snapshot is backed up).
        #[arg(long)]
        force: bool,
        /// Back up this available snapshot of the volume instead (the volume may be in use).
        #[arg(long, default_value = "")]
        snapshot: String,
        /// Client-chosen key making the create safe to repeat.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Put the backup in a repository of this zone (e.g. another site than the volume's).
        #[arg(long, default_value = "")]
        availability_zone: String,
        /// Wait until done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// List backups.
    List {
        /// Only this volume's.
        #[arg(long, default_value = "")]
        volume: String,
        /// Only those in this status.
        #[arg(long, default_value = "")]
        status: String,
        /// Only those held by this backup agent (`host`) or repository (`host@repository`).
        #[arg(long, default_value = "")]
        host: String,
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
        /// Admin: drop the record without its repository, which no backup agent serves any more (a lost
        /// backup node); files left there stay, and import-repository can adopt them again.
        #[arg(long, conflicts_with = "wait")]
        forget: bool,
        /// Also a backup still being made, or a Cinder import still running: it stops, and nothing of it is kept.
        #[arg(long, conflicts_with = "forget")]
        force: bool,
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
        /// Size of the new volume in GiB (default: the backup's; at least that).
        #[arg(long, default_value_t = 0)]
        size: u64,
        /// Volume type (id or name) of the new volume (default type when omitted).
        #[arg(long = "type", default_value = "")]
        volume_type: String,
        /// Availability zone of the new volume.
        #[arg(long, default_value = "")]
        availability_zone: String,
        /// Wait until done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Rename a backup or change its description.
    Update {
        /// Backup id.
        id: String,
        #[command(flatten)]
        renaming: output::Renaming,
    },
    /// Re-read and re-hash every chunk of a backup.
    Verify {
        /// Backup id.
        id: String,
    },
    /// Re-read and re-hash every chunk of every backup in a repository, each chunk once (admin).
    VerifyRepository {
        /// Backup host and repository, `host@repository` (see `ember service list`).
        host: String,
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
    /// Adopt the backups a repository holds that the coordinator does not know, e.g. after its database was
    /// lost (admin). Each goes to the project its manifest records. Also takes over a repository another
    /// backup agent served (its node died, its NFS share now mounted here): its backups move to this one.
    ImportRepository {
        /// Backup host and repository, `host@repository` (see `ember service list`).
        host: String,
        /// Owner of backups whose manifest records no project (default admin).
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
        "new_bytes": b.new_bytes, "dedup_ratio": b.dedup_ratio, "progress": b.progress_percent,
        "progress_data_bytes": b.progress_data_bytes, "host": b.host,
        "created_at": output::time(&b.created_at), "snapshot_id": b.snapshot_id,
        "data_timestamp": output::time(&b.data_timestamp), "description": b.description,
        "availability_zone": b.availability_zone,
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
                b.host.clone(),
                b.availability_zone.clone(),
                b.status_reason.clone(),
            ]
        })
        .collect();
    output::table(
        &["ID", "Volume", "Status", "Size", "Kind", "Stored", "New", "Dedup", "Host", "Zone", "Reason"],
        &rows,
    );
}

/// How often `--wait` looks at a running backup or restore.
const POLL: Duration = Duration::from_millis(50);

/// One line of progress: `<id> <status> [=====>    ]  42%   1.3s   331 MB/s`. The bar and the percentage are of
/// the volume passed, holes included; the rate is of `data_bytes`, the data moved: a sparse terabyte passed in
/// seconds is not a transfer of hundreds of GB/s. A delete moves no data, so it gets the status and the time
/// alone, as `ember volume delete --wait` shows.
pub fn progress_line(id: &str, status: &str, percent: u32, data_bytes: u64, elapsed: Duration) -> String {
    const WIDTH: usize = 30;
    let secs = elapsed.as_secs_f64();
    if status == "deleting" {
        return format!("{id} {status:<10} {secs:>6.1}s");
    }
    let percent = percent.min(100);
    let filled = WIDTH * percent as usize / 100;
    let bar: String = (0..WIDTH)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let rate = if secs > 0.0 { data_bytes as f64 / 1e6 / secs } else { 0.0 };
    format!("{id} {status:<10} [{bar}] {percent:>3}% {secs:>6.1}s {rate:>7.0} MB/s")
}

fn draw(line: &str) {
    eprint!("\r{line}");
    let _ = std::io::stderr().flush();
}

/// Polls a backup until it leaves `creating`/`deleting`/`restoring`, drawing a progress bar with MB/s.
async fn wait(client: &mut BackupServiceClient<Channel>, id: &str) -> Result<Option<Backup>, CliError> {
    let started = Instant::now();
    loop {
        match client.get_backup(GetBackupRequest { id: id.into() }).await {
            Ok(b) => {
                let b = b.into_inner();
                draw(&progress_line(&b.id, &b.status, b.progress_percent, b.progress_data_bytes, started.elapsed()));
                if !matches!(b.status.as_str(), "creating" | "deleting" | "restoring") {
                    eprintln!();
                    return Ok(Some(b));
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                eprintln!();
                return Ok(None);
            }
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for the volume a restore writes to reach a final state (watching it), drawing the restore's
/// progress from its backup meanwhile. Returns the volume, or None when it is gone.
async fn wait_restore(
    backups: &mut BackupServiceClient<Channel>,
    volumes: &mut VolumeServiceClient<Channel>,
    backup_id: &str,
    volume_id: &str,
) -> Result<Option<Volume>, CliError> {
    let started = Instant::now();
    let mut watch = volumes.watch_volume(GetVolumeRequest { id: volume_id.into() }).await?.into_inner();
    let mut ticker = tokio::time::interval(POLL);
    // The volume's status; the restore's percentage and data written, from its backup.
    let mut last = (String::new(), 0u32, 0u64);
    loop {
        tokio::select! {
            update = watch.message() => match update? {
                Some(v) => last.0 = v.status,
                None => break, // a final state, or gone
            },
            _ = ticker.tick() => {
                if let Ok(b) = backups.get_backup(GetBackupRequest { id: backup_id.into() }).await {
                    let b = b.into_inner();
                    if b.status == "restoring" {
                        (last.1, last.2) = (b.progress_percent, b.progress_data_bytes);
                    }
                }
            }
        }
        draw(&progress_line(volume_id, &last.0, last.1, last.2, started.elapsed()));
    }
    let v = match volumes.get_volume(GetVolumeRequest { id: volume_id.into() }).await {
        Ok(v) => v.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            eprintln!();
            return Ok(None);
        }
        Err(s) => return Err(s.into()),
    };
    // Done, the restore wrote all of the backup's data (which its backup now shows again).
    let (percent, written) = if v.status == "available" {
        let b = backups.get_backup(GetBackupRequest { id: backup_id.into() }).await.map(|b| b.into_inner());
        (100, b.map_or(last.2, |b| b.progress_data_bytes))
    } else {
        (last.1, last.2)
    };
    draw(&progress_line(volume_id, &v.status, percent, written, started.elapsed()));
    eprintln!();
    Ok(Some(v))
}

/// Runs `ember backup …`.
pub async fn run(cmd: BackupCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let channel = conn.channel()?;
    let mut client = BackupServiceClient::new(channel.clone());
    match cmd.action {
        BackupAction::Create {
            volume,
            name,
            description,
            incremental,
            force,
            snapshot,
            idempotency_key,
            availability_zone,
            wait: w,
        } => {
            let mut b = client
                .create_backup(CreateBackupRequest {
                    volume_id: volume,
                    name,
                    description,
                    incremental,
                    force,
                    idempotency_key,
                    snapshot_id: snapshot,
                    availability_zone,
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
        BackupAction::List { volume, status, host } => {
            let all = output::all_pages(|page| {
                let mut c = client.clone();
                let req = ListBackupsRequest {
                    volume_id: volume.clone(),
                    page: Some(page),
                    status: status.clone(),
                    host: host.clone(),
                };
                async move { c.list_backups(req).await.map(|r| r.into_inner()).map(|r| (r.backups, r.page)) }
            })
            .await?;
            print(&all, json);
        }
        BackupAction::Show { id } => print(&[client.get_backup(GetBackupRequest { id }).await?.into_inner()], json),
        BackupAction::Delete { id, wait: _, forget: true, force: _ } => {
            client.delete_backup(DeleteBackupRequest { id: id.clone(), forget: true, force: false }).await?;
            output::confirm(json, "backup", &id, "forgotten", &format!("backup {id} forgotten"));
        }
        BackupAction::Delete { id, wait: w, forget: false, force } => {
            client.delete_backup(DeleteBackupRequest { id: id.clone(), forget: false, force }).await?;
            if w && let Some(b) = wait(&mut client, &id).await? {
                return Err(CliError::Other(format!("backup {} is {}: {}", b.id, b.status, b.status_reason)));
            }
            let status = if w { "deleted" } else { "deleting" };
            output::confirm(json, "backup", &id, status, &format!("backup {id} {status}"));
        }
        BackupAction::Restore { id, volume, name, size, volume_type, availability_zone, wait: w } => {
            let r = client
                .restore_backup(RestoreBackupRequest {
                    backup_id: id,
                    volume_id: volume,
                    name,
                    size_gb: size,
                    volume_type,
                    availability_zone,
                })
                .await?
                .into_inner();
            if w {
                let mut volumes = VolumeServiceClient::new(channel);
                let v = wait_restore(&mut client, &mut volumes, &r.backup_id, &r.volume_id).await?;
                if let Some(v) = v
                    && v.status != "available"
                {
                    return Err(CliError::Other(format!("volume {} is {}: {}", v.id, v.status, v.status_reason)));
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
        BackupAction::Update { id, renaming: output::Renaming { name, description } } => {
            let b = client.update_backup(UpdateBackupRequest { id, name, description }).await?.into_inner();
            print(&[b], json);
        }
        BackupAction::VerifyRepository { host } => {
            let r = client.verify_repository(VerifyRepositoryRequest { host: host.clone() }).await?.into_inner();
            let faults = r.damaged.len() + r.unreadable.len() + r.absent.len();
            if json {
                let damaged: Vec<_> = r
                    .damaged
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "id": d.backup_id,
                            "missing_chunks": d.missing_chunks,
                            "corrupt_chunks": d.corrupt_chunks,
                        })
                    })
                    .collect();
                output::json(&serde_json::json!({
                    "repository": host, "ok": faults == 0, "backups_checked": r.backups_checked,
                    "chunks_checked": r.chunks_checked, "damaged": damaged, "unreadable": r.unreadable, "absent": r.absent,
                }));
            } else {
                println!("repository {host}: {} backups, {} chunks checked", r.backups_checked, r.chunks_checked);
                for d in &r.damaged {
                    println!(
                        "damaged {}: {} missing, {} corrupt chunk(s)",
                        d.backup_id,
                        d.missing_chunks.len(),
                        d.corrupt_chunks.len()
                    );
                    for c in &d.missing_chunks {
                        println!("  missing {c}");
                    }
                    for c in &d.corrupt_chunks {
                        println!("  corrupt {c}");
                    }
                }
                for why in &r.unreadable {
                    println!("unreadable {why}");
                }
                for id in &r.absent {
                    println!("absent {id}: recorded in this repository, which does not hold it");
                }
            }
            if faults > 0 {
                return Err(CliError::Other(format!(
                    "repository {host}: {} damaged, {} unreadable, {} absent backup(s)",
                    r.damaged.len(),
                    r.unreadable.len(),
                    r.absent.len()
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
        BackupAction::ImportRepository { host, project } => {
            let r =
                client.import_repository_backups(ImportRepositoryBackupsRequest { host, project }).await?.into_inner();
            if json {
                output::json(&serde_json::json!({
                    "imported": r.imported.iter().map(to_json).collect::<Vec<_>>(),
                    "moved": r.moved.iter().map(to_json).collect::<Vec<_>>(),
                    "already_known": r.already_known,
                    "skipped": r.skipped,
                    "locked": r.locked,
                }));
            } else {
                let listed: Vec<Backup> = r.imported.iter().chain(&r.moved).cloned().collect();
                print(&listed, false);
                println!(
                    "imported {}, moved {}, already known {}, skipped {}",
                    r.imported.len(),
                    r.moved.len(),
                    r.already_known,
                    r.skipped.len()
                );
                for why in &r.skipped {
                    println!("  skipped {why}");
                }
                for id in &r.locked {
                    println!("  {id}: its key does not open with this coordinator's master key; restores wait for it");
                }
            }
        }
        BackupAction::Gc { host } => {
            let r = client.collect_garbage(CollectGarbageRequest { host }).await?.into_inner();
            if json {
                output::json(&serde_json::json!({
                    "chunks_removed": r.chunks_removed, "bytes_freed": r.bytes_freed,
                    "collected": r.collected, "skipped": r.skipped,
                }));
            } else {
                println!(
                    "removed {} chunk(s), freed {:.1} MB on {}",
                    r.chunks_removed,
                    r.bytes_freed as f64 / 1e6,
                    r.collected.join(", ")
                );
                for s in &r.skipped {
                    println!("skipped {s}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_a_bar_a_percentage_and_a_rate() {
        let line = progress_line("b1", "creating", 50, 537 << 20, Duration::from_secs(1));
        assert!(line.contains("[===============>              ]  50%"), "{line}");
        assert!(line.ends_with("    563 MB/s"), "{line}");
        let full = progress_line("b1", "available", 100, 1 << 30, Duration::from_secs(2));
        assert!(full.contains(&format!("[{}] 100%", "=".repeat(30))), "{full}");
        assert!(progress_line("b1", "creating", 0, 0, Duration::ZERO).ends_with(" 0 MB/s"));
        // A terabyte holding 10 MiB, passed in two seconds: the rate is of the data, not of the terabyte.
        let sparse = progress_line("b1", "creating", 100, 10 << 20, Duration::from_secs(2));
        assert!(sparse.ends_with("      5 MB/s"), "{sparse}");
        // A finished backup's progress stays at 100 %; its delete is not a transfer at all.
        assert_eq!(progress_line("b1", "deleting", 100, 1 << 30, Duration::from_millis(400)), "b1 deleting      0.4s");
    }
}
