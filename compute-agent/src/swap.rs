//! Swapping an attached volume's disk onto a new connection while its guest runs (Nova's swap_volume, which
//! Cinder's migration of an in-use volume relies on): connect the new copy → QEMU mirrors the disk onto it
//! (`virsh blockcopy`, guest writes included) → once both sides match, the domain pivots to it, and libvirt
//! records the new source in the persistent definition too → the old connection is let go.
//!
//! The pivot is the one point of no return. Before it, any failure cancels the copy and the domain keeps the
//! old connection, which is what an error from here means; after it, the call succeeds. A repeat after a crash
//! finds the copy job still running (it lives in QEMU) and waits for it, or finds the domain already on the new
//! connection and only lets the old one go.

use crate::domain_xml::{DiskSource, DiskSpec, DomainDisk, disk_xml};
use crate::error::{ComputeError, Result, checked_id};
use crate::service::Compute;
use ember_proto::agent::v1::{SwapVolumeProgress, SwapVolumeRequest};
use std::time::{Duration, Instant};

/// How long a copy may go without progress before it is cancelled.
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// How long a copy that has caught up may take to become ready to pivot.
const PIVOT_LIMIT: Duration = Duration::from_secs(60);
/// How often the copy's progress is read.
const POLL: Duration = Duration::from_millis(200);
/// How often the copy's progress is reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

impl Compute {
    /// The live disk of `volume_id` in domain `uuid`.
    async fn live_disk(&self, uuid: &str, instance: &str, volume_id: &str) -> Result<DomainDisk> {
        self.virsh.disks(uuid, false).await?.into_iter().find(|d| d.serial == volume_id).ok_or_else(|| {
            ComputeError::FailedPrecondition(format!("volume {volume_id} is not attached to instance {instance}"))
        })
    }

    /// See the module documentation. `progress` hears about once a second how far the copy is; the result is
    /// the last report, `done`.
    pub(crate) async fn swap(
        &self,
        r: SwapVolumeRequest,
        progress: impl Fn(SwapVolumeProgress),
    ) -> Result<SwapVolumeProgress> {
        checked_id("volume_id", &r.volume_id)?;
        let (old, new) = (r.old_connection.unwrap_or_default(), r.new_connection.unwrap_or_default());
        let uuid = self.virsh.resolve(&r.instance).await?;
        let (disk, source) = {
            let _guard = self.lock.lock().await;
            let disk = self.live_disk(&uuid, &r.instance, &r.volume_id).await?;
            let source = self.connectors.connect(&r.volume_id, &new).await?;
            if disk.source != source.identity() && self.virsh.block_job(&uuid, &disk.target).await?.is_none() {
                let dest = DiskSpec {
                    source: source.clone(),
                    target: disk.target.clone(),
                    serial: r.volume_id.clone(),
                    read_only: new.read_only,
                    iotune: Default::default(),
                    luks_secret: new.luks_secret_uuid.clone(),
                };
                let xml_file = self.connectors.state_dir.join(format!("swap-{}.xml", r.volume_id));
                std::fs::write(&xml_file, disk_xml(&dest)).map_err(ComputeError::io("writing the disk XML"))?;
                let started = self.virsh.blockcopy(&uuid, &disk.target, &xml_file, self.swap_bandwidth_mib).await;
                let _ = std::fs::remove_file(&xml_file);
                if let Err(e) = started {
                    self.let_go(&r.volume_id, &old, &new, &new).await;
                    return Err(e);
                }
                tracing::info!(instance = %r.instance, device = %disk.target, to = %source.identity(), "copy started");
            }
            (disk, source)
        };
        // Tests: `compute.abort_in_swap` stops the agent here, with the copy running in QEMU.
        ember_common::failpoint::abort_if_armed("compute.abort_in_swap");
        let mut bytes_copied = 0;
        if disk.source != source.identity() {
            // Tests: `compute.refuse_swap` fails the copy once it runs, so that it is cancelled as a real failure is.
            let mirrored = if ember_common::failpoint::armed("compute.refuse_swap") {
                Err(ComputeError::FailedPrecondition("failpoint compute.refuse_swap".into()))
            } else {
                self.mirror_and_pivot(&uuid, &disk.target, &source, &progress).await
            };
            match mirrored {
                Ok(copied) => bytes_copied = copied,
                Err(e) => {
                    // The domain never left the old connection: cancel the copy and let the new one go.
                    if let Err(abort) = self.virsh.abort_block_job(&uuid, &disk.target).await {
                        tracing::warn!(%abort, "cancelling the copy");
                    }
                    self.let_go(&r.volume_id, &old, &new, &new).await;
                    return Err(e);
                }
            }
        }
        let persistent = self.virsh.disks(&uuid, true).await?;
        if !persistent.iter().any(|d| d.serial == r.volume_id && d.source == source.identity()) {
            // libvirt records the pivot in the persistent definition; say so loudly should a version not do it.
            tracing::error!(instance = %r.instance, "the persistent definition does not name the new source");
        }
        self.let_go(&r.volume_id, &old, &new, &old).await;
        tracing::info!(instance = %r.instance, device = %disk.target, bytes_copied, "volume swapped");
        Ok(SwapVolumeProgress {
            copied_bytes: bytes_copied,
            total_bytes: bytes_copied,
            done: true,
            device: disk.target,
        })
    }

    /// Waits until the copy job on `target` has caught up, then pivots the domain onto `source` and confirms it
    /// in the live XML. Returns the bytes the job copied.
    async fn mirror_and_pivot(
        &self,
        uuid: &str,
        target: &str,
        source: &DiskSource,
        progress: &impl Fn(SwapVolumeProgress),
    ) -> Result<u64> {
        let (mut last, mut progressed, mut reported) = (0, Instant::now(), Instant::now());
        let job = loop {
            let Some(job) = self.virsh.block_job(uuid, target).await? else {
                return Err(ComputeError::FailedPrecondition(format!(
                    "the copy of {target} ended before it was complete (see QEMU's log)"
                )));
            };
            if job.end > 0 && job.cur == job.end {
                break job;
            }
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                progress(SwapVolumeProgress { copied_bytes: job.cur, total_bytes: job.end, ..Default::default() });
            }
            if job.cur != last {
                (last, progressed) = (job.cur, Instant::now());
            } else if progressed.elapsed() > STALL_LIMIT {
                return Err(ComputeError::DeadlineExceeded(format!(
                    "the copy of {target} made no progress for {STALL_LIMIT:?} ({} of {} bytes)",
                    job.cur, job.end
                )));
            }
            tokio::time::sleep(POLL).await;
        };
        // A job that has caught up becomes ready a moment later (QEMU's BLOCK_JOB_READY); until then libvirt
        // refuses the pivot.
        let deadline = Instant::now() + PIVOT_LIMIT;
        loop {
            let _guard = self.lock.lock().await;
            match self.virsh.pivot(uuid, target).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) => tracing::debug!(%e, "not ready to pivot yet"),
            }
            drop(_guard);
            tokio::time::sleep(POLL).await;
        }
        let now = self.virsh.disks(uuid, false).await?;
        match now.iter().find(|d| d.target == target) {
            Some(d) if d.source == source.identity() => Ok(job.end),
            other => Err(ComputeError::FailedPrecondition(format!(
                "after the pivot, {target} reads from {:?}, not {}",
                other.map(|d| d.source.as_str()),
                source.identity()
            ))),
        }
    }

    /// Disconnects `leg` (one of `old` and `new`) unless the two reach the volume the same way on this host.
    /// QEMU's initiator keeps one libvirt secret per volume for both, so only kernel sessions and nothing else
    /// are let go. Failures are logged: a session left behind holds nothing the domain uses.
    async fn let_go(
        &self,
        volume_id: &str,
        old: &ember_proto::agent::v1::Connection,
        new: &ember_proto::agent::v1::Connection,
        leg: &ember_proto::agent::v1::Connection,
    ) {
        let same = old.target_portal == new.target_portal && old.target_iqn == new.target_iqn;
        if same || leg.driver_volume_type != "iscsi" || !self.connectors.kernel_initiator() {
            return;
        }
        if let Err(e) = self.connectors.kernel_logout(leg).await {
            tracing::warn!(volume_id, iqn = %leg.target_iqn, %e, "logging out of a swapped-out target");
        }
    }
}
