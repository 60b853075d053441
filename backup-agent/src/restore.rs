//! Restores: a backup's chunks, read, checked and inflated a few at a time, streamed in order into a volume on
//! its storage agent, which keeps the volume marked incomplete until the stream ends whole.

use crate::repo::hex;
use crate::service::{Backups, check_id, failpoint, io_status, load_backup, off_runtime, storage_lost};
use ember_common::revocation::revokes;
use ember_proto::agent::v1::*;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tonic::Status;

/// A restore's hold on its target volume, taken by [`Restoring::claim`] and freed for the next restore when
/// dropped (the restore ended, or its caller went away).
struct Restoring<'a>(&'a Mutex<HashSet<String>>, String);

impl<'a> Restoring<'a> {
    /// Holds `volume_id` in `restoring`, or refuses (UNAVAILABLE: ask again later) while a restore into it is
    /// still running here.
    fn claim(restoring: &'a Mutex<HashSet<String>>, volume_id: &str) -> Result<Self, Status> {
        if !restoring.lock().expect("restoring").insert(volume_id.to_string()) {
            return Err(Status::unavailable(format!("a restore into volume {volume_id} is still ending here")));
        }
        Ok(Restoring(restoring, volume_id.to_string()))
    }
}

impl Drop for Restoring<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("restoring").remove(&self.1);
    }
}

impl Backups {
    /// Writes backup `req.backup_id` into `req.target`: every chunk is checked against its name before it is
    /// sent, and a zero chunk is written only when the target is not blank. One restore at a time per volume.
    pub(crate) async fn restore(&self, req: RestoreBackupRequest) -> Result<RestoreBackupResponse, Status> {
        check_id("backup_id", &req.backup_id)?;
        let repo = self.repo(&req.repository)?;
        let target = req.target.ok_or_else(|| Status::invalid_argument("target: is required"))?;
        check_id("target.id", &target.id)?;
        let (manifest, index) = load_backup(&repo, &req.backup_id).await?.map_err(io_status("backup"))?;
        if target.size_bytes != 0 && target.size_bytes < manifest.volume_size {
            return Err(Status::failed_precondition(format!(
                "target holds {} bytes; the backup needs {}",
                target.size_bytes, manifest.volume_size
            )));
        }
        // Refuse early when a chunk is missing altogether.
        let (r, entries) = (repo.clone(), Arc::new(index.entries));
        let all = entries.clone();
        if let Some(d) = off_runtime(move || all.values().find(|d| !r.chunk_path(d).exists()).copied()).await? {
            return Err(Status::data_loss(format!("chunk {} is missing", hex(&d))));
        }
        let cs = u64::from(index.chunk_size);
        let positions = manifest.volume_size.div_ceil(cs);
        let (tx, rx) = tokio::sync::mpsc::channel::<VolumeChunk>(16);
        let first = VolumeChunk {
            volume_id: target.id.clone(),
            backend: target.backend.clone(),
            volume_size: manifest.volume_size,
            ..Default::default()
        };
        let blank = req.target_is_blank;
        let _restoring = Restoring::claim(&self.restoring, &target.id)?;
        let (_tracked, done, moved) = self.track(&req.backup_id, manifest.volume_size);
        let workers = self.workers;
        let (mut client, storage_node) = self.storage_noting_server(&target)?;
        let producer = tokio::spawn(async move {
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            let mut zero_run: Option<(u64, u64)> = None;
            let reads = futures::stream::iter(0..positions)
                .map(|pos| {
                    let (repo, entries) = (repo.clone(), entries.clone());
                    async move {
                        match entries.get(&pos).copied() {
                            Some(d) => tokio::task::spawn_blocking(move || {
                                failpoint("backup.restore_chunk");
                                repo.read_chunk(&d).map(|p| (pos, Some(p)))
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string())),
                            None => Ok((pos, None)),
                        }
                    }
                })
                .buffered(workers * 2);
            futures::pin_mut!(reads);
            while let Some(item) = reads.next().await {
                let (pos, data) = item?;
                done.store((pos * cs).min(manifest.volume_size), Ordering::Relaxed);
                // A node whose certificate was revoked since the restore connected gets no more of the volume.
                if revokes(&storage_node) {
                    return Err("the storage agent's certificate was revoked during the restore".to_string());
                }
                match data {
                    Some(plain) => {
                        moved.fetch_add(plain.len() as u64, Ordering::Relaxed);
                        if let Some((off, len)) = zero_run.take() {
                            let _ = tx.send(VolumeChunk { offset: off, zero_length: len, ..Default::default() }).await;
                        }
                        if tx
                            .send(VolumeChunk { offset: pos * cs, data: plain.into(), ..Default::default() })
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    None if !blank => {
                        let len = cs.min(manifest.volume_size - pos * cs);
                        zero_run = match zero_run {
                            Some((off, l)) => Some((off, l + len)),
                            None => Some((pos * cs, len)),
                        };
                    }
                    None => {}
                }
            }
            if let Some((off, len)) = zero_run {
                let _ = tx.send(VolumeChunk { offset: off, zero_length: len, ..Default::default() }).await;
            }
            // Only now, after every chunk checked out: the storage agent keeps the volume marked incomplete
            // until a stream ends with this.
            let _ = tx.send(VolumeChunk { last: true, ..Default::default() }).await;
            Ok::<(), String>(())
        });
        let started = std::time::Instant::now();
        let written = client.write_volume(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        // A chunk that fails its check stops the stream; that failure, not the short write, is the answer.
        match producer.await.map_err(|e| Status::internal(e.to_string()))? {
            Err(msg) => Err(Status::data_loss(format!("restore stopped: {msg}"))),
            Ok(()) => {
                let bytes_written = written
                    .map_err(|s| storage_lost(&target.storage_endpoint, "restore", s))?
                    .into_inner()
                    .bytes_written;
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(backup_id = %req.backup_id, volume_id = %target.id, bytes_written, ms, "restore complete");
                Ok(RestoreBackupResponse { bytes_written })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_agent_lost_mid_way_is_unavailable_and_its_own_answers_pass_on() {
        let endpoint = "https://127.0.0.1:7001";
        let cut = Status::from_error(Box::new(std::io::Error::other("error reading a body from connection")));
        assert_eq!(cut.code(), tonic::Code::Unknown, "tonic's status for a cut connection");
        let lost = storage_lost(endpoint, "restore", cut);
        assert_eq!(lost.code(), tonic::Code::Unavailable);
        assert_eq!(
            lost.message(),
            "the storage agent at https://127.0.0.1:7001 went away mid-restore: error reading a body from connection"
        );
        let refused = storage_lost(endpoint, "backup", Status::unavailable("tcp connect error"));
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(refused.message(), "the storage agent at https://127.0.0.1:7001: tcp connect error");
        let answered = storage_lost(endpoint, "backup", Status::unknown("passed on from elsewhere"));
        assert_eq!((answered.code(), answered.message()), (tonic::Code::Unknown, "passed on from elsewhere"));
        let refusal = storage_lost(endpoint, "restore", Status::not_found("volume v1"));
        assert_eq!((refusal.code(), refusal.message()), (tonic::Code::NotFound, "volume v1"));
    }

    #[test]
    fn a_volume_has_one_restore_at_a_time_and_is_free_once_it_ends() {
        let restoring = Mutex::new(HashSet::new());
        let first = Restoring::claim(&restoring, "v1").expect("the first restore into v1");
        let second = Restoring::claim(&restoring, "v1").err().expect("a second restore into v1 is refused");
        assert_eq!(second.code(), tonic::Code::Unavailable, "{second:?}");
        assert!(second.message().contains("v1"), "{second:?}");
        let other = Restoring::claim(&restoring, "v2").expect("another volume is restored meanwhile");
        drop(first);
        let again = Restoring::claim(&restoring, "v1").expect("v1 again, its first restore ended");
        drop((again, other));
        assert!(restoring.lock().unwrap().is_empty(), "every hold was freed");
    }
}
