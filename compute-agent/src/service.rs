//! The compute agent's gRPC service: attach and detach volumes to libvirt domains, and instances booted from
//! volumes (see `instances.rs`).
//!
//! Attach: connect → add the disk (next free `vdX`, serial = volume id) live and persistent → confirm it in the
//! live XML. Detach: remove the disk → confirm it left the live XML (a guest that does not answer the unplug
//! within the deadline is an error, never a silent success) → disconnect. Both are idempotent, so the
//! coordinator may repeat them after any crash. Swapping an attached volume onto another copy is in `swap.rs`.

use crate::connector::Connectors;
use crate::domain_xml::{DiskSpec, disk_xml, next_free_target};
use crate::error::{ComputeError, Result, checked_id, checked_iotune};
use crate::virsh::{DomainState, Virsh};
use ember_proto::agent::v1::compute_agent_server::ComputeAgent;
use ember_proto::agent::v1::*;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The agent's state.
pub struct Compute {
    /// The local libvirt.
    pub virsh: Virsh,
    /// How volumes are reached.
    pub connectors: Connectors,
    /// How long a guest may take to release a detached disk.
    pub detach_timeout: Duration,
    /// The most MiB/s a swap's mirror copies; 0 for no limit.
    pub swap_bandwidth_mib: u64,
    /// Serialises disk changes, so two attaches never pick the same device name.
    pub lock: tokio::sync::Mutex<()>,
    /// How instances boot.
    pub boot: crate::instances::BootConfig,
}

/// Polls the live XML until `present(disk with this serial)` holds, or the deadline passes.
async fn wait_for_disk(virsh: &Virsh, uuid: &str, serial: &str, present: bool, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if virsh.disks(uuid, false).await?.iter().any(|d| d.serial == serial) == present {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Compute {
    async fn attach(&self, r: AttachVolumeRequest) -> Result<String> {
        checked_id("volume_id", &r.volume_id)?;
        let conn = r.connection.unwrap_or_default();
        let _guard = self.lock.lock().await;
        let uuid = self.virsh.resolve(&r.instance).await?;
        if let DomainState::Other(state) = self.virsh.state(&uuid).await? {
            return Err(ComputeError::FailedPrecondition(format!(
                "instance {} is {state}; volumes attach to running instances",
                r.instance
            )));
        }
        let live = self.virsh.disks(&uuid, false).await?;
        if let Some(d) = live.iter().find(|d| d.serial == r.volume_id) {
            return Ok(d.target.clone()); // a repeat after a crash: already there
        }
        let started = Instant::now();
        let source = self.connectors.connect(&r.volume_id, &conn).await?;
        let connect_ms = started.elapsed().as_millis() as u64;
        let mut used: Vec<String> = live.into_iter().map(|d| d.target).collect();
        used.extend(self.virsh.disks(&uuid, true).await?.into_iter().map(|d| d.target));
        let spec = DiskSpec {
            source,
            target: next_free_target(&used),
            serial: r.volume_id.clone(),
            read_only: conn.read_only,
            iotune: checked_iotune(r.iotune)?,
            luks_secret: conn.luks_secret_uuid.clone(),
        };
        let xml_file = self.connectors.state_dir.join(format!("disk-{}.xml", r.volume_id));
        std::fs::write(&xml_file, disk_xml(&spec)).map_err(ComputeError::io("writing the disk XML"))?;
        let libvirt_started = Instant::now();
        let attached = self.virsh.attach_device(&uuid, &xml_file).await;
        let libvirt_ms = libvirt_started.elapsed().as_millis() as u64;
        let _ = std::fs::remove_file(&xml_file);
        if let Err(e) = attached {
            let _ = self.connectors.disconnect(&r.volume_id, &conn).await;
            return Err(e);
        }
        let confirm_started = Instant::now();
        if !wait_for_disk(&self.virsh, &uuid, &r.volume_id, true, Duration::from_secs(10)).await? {
            return Err(ComputeError::DeadlineExceeded(format!("disk {} did not appear in the live XML", spec.target)));
        }
        let confirm_ms = confirm_started.elapsed().as_millis() as u64;
        tracing::info!(instance = %r.instance, device = %spec.target, connect_ms, libvirt_ms, confirm_ms, "volume attached");
        Ok(spec.target)
    }

    /// Makes the domain see the attached volume's new size. A domain whose disk already has it is left as it is.
    async fn extend(&self, r: ExtendAttachedVolumeRequest) -> Result<u64> {
        checked_id("volume_id", &r.volume_id)?;
        let conn = r.connection.unwrap_or_default();
        let _guard = self.lock.lock().await;
        let uuid = self.virsh.resolve(&r.instance).await?;
        let live = self.virsh.disks(&uuid, false).await?;
        let Some(disk) = live.iter().find(|d| d.serial == r.volume_id) else {
            return Err(ComputeError::FailedPrecondition(format!(
                "volume {} is not attached to instance {}",
                r.volume_id, r.instance
            )));
        };
        // QEMU's LUKS layer hides its header from the guest: the disk grows to the new size less the header, and
        // QEMU grows what lies under it to exactly the new size.
        let guest_bytes = r.new_size_bytes.saturating_sub(conn.luks_header_bytes);
        if self.virsh.block_capacity(&uuid, &disk.target).await? == guest_bytes {
            return Ok(guest_bytes);
        }
        self.connectors.rescan(&conn, r.new_size_bytes).await?;
        self.virsh.blockresize(&uuid, &disk.target, guest_bytes).await?;
        let capacity = self.virsh.block_capacity(&uuid, &disk.target).await?;
        tracing::info!(instance = %r.instance, device = %disk.target, capacity, "volume resized in the domain");
        Ok(capacity)
    }

    async fn detach(&self, r: DetachVolumeRequest) -> Result<()> {
        checked_id("volume_id", &r.volume_id)?;
        let conn = r.connection.unwrap_or_default();
        let _guard = self.lock.lock().await;
        let (mut libvirt_ms, mut confirm_ms) = (0u64, 0u64);
        let uuid = match self.virsh.resolve(&r.instance).await {
            Ok(uuid) => Some(uuid),
            Err(ComputeError::NotFound(_)) => None, // the domain is gone, and the disk with it
            Err(e) => return Err(e),
        };
        if let Some(uuid) = uuid {
            // A paused guest still holds its disks: only a domain that is off has no live disks to release.
            let active = self.virsh.state(&uuid).await?.is_active();
            let live = self.virsh.disks(&uuid, false).await?;
            let persistent = self.virsh.disks(&uuid, true).await?;
            let in_live = live.iter().find(|d| d.serial == r.volume_id).filter(|_| active);
            let in_config = persistent.iter().find(|d| d.serial == r.volume_id);
            if let Some(d) = in_live.or(in_config) {
                let libvirt_started = Instant::now();
                // A retry after a timeout asks the guest again (QEMU lets an unplug request be repeated once the
                // guest has ignored one, as Linux does while a disk it just got is still powering on). libvirt may
                // refuse the request while the guest works on an earlier one; the live XML decides either way.
                let requested = self.virsh.detach_disk(&uuid, &d.target, in_live.is_some(), in_config.is_some()).await;
                let why = match requested {
                    Ok(()) => String::new(),
                    Err(e) if in_live.is_some() => format!(" (libvirt: {e})"),
                    Err(e) => return Err(e),
                };
                libvirt_ms = libvirt_started.elapsed().as_millis() as u64;
                let confirm_started = Instant::now();
                if in_live.is_some()
                    && !wait_for_disk(&self.virsh, &uuid, &r.volume_id, false, self.detach_timeout).await?
                {
                    return Err(ComputeError::DeadlineExceeded(format!(
                        "instance {} did not release {} within {:?}; the disk is still attached{why}",
                        r.instance, d.target, self.detach_timeout
                    )));
                }
                confirm_ms = confirm_started.elapsed().as_millis() as u64;
            }
        }
        let disconnect_started = Instant::now();
        self.connectors.disconnect(&r.volume_id, &conn).await?;
        let disconnect_ms = disconnect_started.elapsed().as_millis() as u64;
        tracing::info!(instance = %r.instance, libvirt_ms, confirm_ms, disconnect_ms, "volume detached");
        Ok(())
    }
}

/// The gRPC face of [`Compute`].
pub struct ComputeService(pub std::sync::Arc<Compute>);

#[tonic::async_trait]
impl ComputeAgent for ComputeService {
    async fn attach_volume(&self, req: Request<AttachVolumeRequest>) -> Result<Response<AttachVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("attach_volume", volume_id = %r.volume_id);
        // Tests: `compute.freeze_in_attach_volume` freezes the agent here, once the coordinator's call reached it.
        ember_common::failpoint::freeze_once("compute.freeze_in_attach_volume");
        let device = self.0.attach(r).instrument(span).await?;
        Ok(Response::new(AttachVolumeResponse { device }))
    }

    async fn detach_volume(&self, req: Request<DetachVolumeRequest>) -> Result<Response<DetachVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("detach_volume", volume_id = %r.volume_id);
        self.0.detach(r).instrument(span).await?;
        Ok(Response::new(DetachVolumeResponse {}))
    }

    async fn extend_volume(
        &self,
        req: Request<ExtendAttachedVolumeRequest>,
    ) -> Result<Response<ExtendAttachedVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("extend_volume", volume_id = %r.volume_id);
        let capacity_bytes = self.0.extend(r).instrument(span).await?;
        Ok(Response::new(ExtendAttachedVolumeResponse { capacity_bytes }))
    }

    type SwapVolumeStream = tokio_stream::wrappers::ReceiverStream<Result<SwapVolumeProgress, Status>>;

    async fn swap_volume(&self, req: Request<SwapVolumeRequest>) -> Result<Response<Self::SwapVolumeStream>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("swap_volume", volume_id = %r.volume_id, instance = %r.instance);
        // The swap runs on its own task and reports on the stream; a dropped stream (the coordinator gone) does
        // not stop it, and the coordinator's repeat finds it where it is.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let compute = self.0.clone();
        tokio::spawn(
            async move {
                let report = |p: SwapVolumeProgress| drop(tx.try_send(Ok(p)));
                let last = compute.swap(r, report).await.map_err(Status::from);
                let _ = tx.send(last).await;
            }
            .instrument(span),
        );
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn start_instance(
        &self,
        req: Request<StartInstanceRequest>,
    ) -> Result<Response<StartInstanceResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("start_instance", instance_id = %r.instance_id, volume_id = %r.boot_volume_id);
        Ok(Response::new(self.0.start_instance(r).instrument(span).await?))
    }

    async fn destroy_instance(
        &self,
        req: Request<DestroyInstanceRequest>,
    ) -> Result<Response<DestroyInstanceResponse>, Status> {
        let id = req.into_inner().instance_id;
        let span = tracing::info_span!("destroy_instance", instance_id = %id);
        self.0.destroy_instance(&id).instrument(span).await?;
        Ok(Response::new(DestroyInstanceResponse {}))
    }

    async fn get_console_log(
        &self,
        req: Request<GetConsoleLogRequest>,
    ) -> Result<Response<GetConsoleLogResponse>, Status> {
        Ok(Response::new(GetConsoleLogResponse { text: self.0.console_log(&req.get_ref().instance_id)? }))
    }
}
