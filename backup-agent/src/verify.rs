//! Verification: every chunk a backup (or every backup in a repository) references is read back, decoded and
//! re-hashed; chunks that are missing or whose plaintext does not hash to their name are reported by name.

use crate::repo::{Repository, hex};
use crate::service::{Backups, check_id, io_status, load_backup, off_runtime};
use ember_proto::agent::v1::*;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use tonic::Status;

/// What checking a set of chunks found wrong, by digest.
#[derive(Default)]
struct Findings {
    missing: HashSet<[u8; 32]>,
    corrupt: HashSet<[u8; 32]>,
}

impl Findings {
    /// The named chunks among `digests` that are missing and corrupt, each list sorted.
    fn of<'a>(&self, digests: impl IntoIterator<Item = &'a [u8; 32]>) -> (Vec<String>, Vec<String>) {
        let (mut missing, mut corrupt) = (BTreeSet::new(), BTreeSet::new());
        for d in digests {
            if self.missing.contains(d) {
                missing.insert(hex(d));
            } else if self.corrupt.contains(d) {
                corrupt.insert(hex(d));
            }
        }
        (missing.into_iter().collect(), corrupt.into_iter().collect())
    }
}

impl Backups {
    /// Checks each chunk of `digests` once, `workers` at a time, each on a blocking thread.
    async fn check_chunks(&self, repo: &Arc<Repository>, digests: HashSet<[u8; 32]>) -> Findings {
        let checks = futures::stream::iter(digests)
            .map(|d| {
                let repo = repo.clone();
                async move {
                    let failed = tokio::task::spawn_blocking(move || repo.read_chunk(&d).err())
                        .await
                        .unwrap_or_else(|e| Some(e.to_string()));
                    (d, failed)
                }
            })
            .buffer_unordered(self.workers);
        futures::pin_mut!(checks);
        let mut found = Findings::default();
        while let Some((d, failed)) = checks.next().await {
            match failed {
                Some(e) if e.contains("missing") => found.missing.insert(d),
                Some(_) => found.corrupt.insert(d),
                None => false,
            };
        }
        found
    }

    /// Verifies one backup.
    pub async fn verify(&self, req: VerifyBackupRequest) -> Result<VerifyBackupResponse, Status> {
        check_id("backup_id", &req.backup_id)?;
        let repo = self.repo(&req.repository)?;
        let (_, index) = load_backup(&repo, &req.backup_id).await?.map_err(io_status("backup"))?;
        let unique: HashSet<[u8; 32]> = index.entries.values().copied().collect();
        let found = self.check_chunks(&repo, unique.clone()).await;
        let (missing_chunks, corrupt_chunks) = found.of(&unique);
        Ok(VerifyBackupResponse { chunks_checked: unique.len() as u64, missing_chunks, corrupt_chunks })
    }

    /// Verifies every complete backup in repository `name`, reading each chunk once however many backups
    /// share it (a per-backup verify of a deduplicated repository reads shared chunks again for each).
    pub async fn verify_repository(&self, name: &str) -> Result<VerifyRepositoryResponse, Status> {
        let repo = self.repo(name)?;
        let lister = repo.clone();
        let ids = off_runtime(move || lister.backups()).await?.map_err(io_status("listing backups"))?;
        let mut out = VerifyRepositoryResponse::default();
        let mut indexes = BTreeMap::new();
        for id in ids {
            match load_backup(&repo, &id).await? {
                Ok((m, _)) if m.backup_id != id => {
                    out.unreadable.push(format!("{id}: its manifest names backup {:?}", m.backup_id))
                }
                Ok((_, index)) => {
                    indexes.insert(id, index.entries.into_values().collect::<HashSet<_>>());
                }
                Err(e) => out.unreadable.push(format!("{id}: {e}")),
            }
        }
        let unique: HashSet<[u8; 32]> = indexes.values().flatten().copied().collect();
        out.chunks_checked = unique.len() as u64;
        let found = self.check_chunks(&repo, unique).await;
        for (id, digests) in indexes {
            let (missing_chunks, corrupt_chunks) = found.of(&digests);
            if !missing_chunks.is_empty() || !corrupt_chunks.is_empty() {
                out.damaged.push(DamagedBackup { backup_id: id.clone(), missing_chunks, corrupt_chunks });
            }
            out.backups_checked.push(id);
        }
        tracing::info!(
            repository = name,
            backups = out.backups_checked.len(),
            chunks = out.chunks_checked,
            damaged = out.damaged.len(),
            unreadable = out.unreadable.len(),
            "repository verified"
        );
        Ok(out)
    }
}
