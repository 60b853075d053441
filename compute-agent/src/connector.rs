//! Connectors: how a compute host reaches a volume, chosen from the connection facts the storage agent
//! returned. `iscsi` goes through QEMU's own initiator (a libvirt secret holds the CHAP password; no host
//! device at all) or through the kernel initiator (iscsiadm; a `/dev/disk/by-path` device); `file` is a
//! volume file on an NFS share (mounted once per share) or in a local directory.
//!
//! Connect and disconnect are idempotent: repeating either, or running one after a crash, finishes the work.

use crate::domain_xml::{DiskSource, luks_secret_xml, secret_xml};
use crate::error::{ComputeError, Result};
use crate::virsh::Virsh;
use ember_common::runner::{self, CommandError};
use ember_proto::agent::v1::Connection;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which initiator serves `iscsi` connections on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IscsiMode {
    /// QEMU's built-in libiscsi initiator.
    Qemu,
    /// The kernel initiator driven by iscsiadm.
    Kernel,
}

const ISCSIADM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a logged-in LUN may take to appear as a device.
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// The host's connectors.
#[derive(Debug, Clone)]
pub struct Connectors {
    /// The libvirt that holds secrets.
    pub virsh: Virsh,
    /// The initiator for `iscsi`.
    pub iscsi_mode: IscsiMode,
    /// This host's initiator IQN.
    pub initiator: String,
    /// Where the agent writes short-lived files (secret XML, the secret's value) and mounts NFS shares.
    pub state_dir: PathBuf,
}

/// The libvirt secret of a volume: its UUID is the volume id, its usage name `ember-volume-<id>`.
pub fn secret_usage(volume_id: &str) -> String {
    format!("ember-volume-{volume_id}")
}

/// The by-path name udev gives a kernel-initiator LUN.
pub fn by_path(portal: &str, iqn: &str, lun: u32) -> PathBuf {
    PathBuf::from(format!("/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-{lun}"))
}

fn failed_with(e: &ComputeError, codes: &[i32]) -> bool {
    matches!(e, ComputeError::Command(CommandError::Failed { code: Some(c), .. }) if codes.contains(c))
}

impl Connectors {
    /// True when `iscsi` connections go through the kernel initiator (sessions the host holds), not QEMU's own.
    pub fn kernel_initiator(&self) -> bool {
        self.iscsi_mode == IscsiMode::Kernel
    }

    /// Writes `bytes` to a private file in the state dir, runs `f` with its path, and removes it.
    async fn with_private_file<T>(
        &self,
        name: &str,
        bytes: &[u8],
        f: impl AsyncFnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        use std::io::Write;
        let path = self.state_dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(ComputeError::io(format!("creating {}", path.display())))?;
        file.write_all(bytes).map_err(ComputeError::io(format!("writing {}", path.display())))?;
        drop(file);
        let out = f(&path).await;
        let _ = std::fs::remove_file(&path);
        out
    }

    /// Defines the libvirt secret `xml` describes and gives secret `uuid` its `value`, each through a private file
    /// named after `stem` (never on the command line).
    async fn define_secret(&self, stem: &str, xml: &str, uuid: &str, value: &str) -> Result<()> {
        self.with_private_file(&format!("{stem}.xml"), xml.as_bytes(), async |p| self.virsh.define_secret(p).await)
            .await?;
        self.with_private_file(&format!("{stem}.value"), value.as_bytes(), async |p| {
            self.virsh.set_secret_value(uuid, p).await
        })
        .await
    }

    /// Files an encrypted volume's passphrase as a libvirt secret (QEMU reads it when it opens the disk).
    async fn define_luks_secret(&self, volume_id: &str, c: &Connection) -> Result<()> {
        crate::error::checked_id("connection.luks_secret_uuid", &c.luks_secret_uuid)?;
        let xml = luks_secret_xml(&c.luks_secret_uuid, volume_id);
        self.define_secret(&format!("luks-{volume_id}"), &xml, &c.luks_secret_uuid, &c.luks_passphrase).await
    }

    /// Makes the volume reachable and says how QEMU should open it.
    pub async fn connect(&self, volume_id: &str, c: &Connection) -> Result<DiskSource> {
        if !c.luks_secret_uuid.is_empty() {
            self.define_luks_secret(volume_id, c).await?;
        }
        match c.driver_volume_type.as_str() {
            "iscsi" if self.iscsi_mode == IscsiMode::Qemu => {
                let usage = secret_usage(volume_id);
                let xml = secret_xml(volume_id, &usage);
                self.define_secret(&format!("secret-{volume_id}"), &xml, volume_id, &c.auth_password).await?;
                Ok(DiskSource::IscsiNetwork {
                    portal: c.target_portal.clone(),
                    iqn: c.target_iqn.clone(),
                    lun: c.target_lun,
                    username: c.auth_username.clone(),
                    secret_usage: usage,
                    initiator: self.initiator.clone(),
                })
            }
            "iscsi" => Ok(DiskSource::Block(self.kernel_login(c).await?.to_string_lossy().into_owned())),
            "file" | "nfs" => Ok(DiskSource::File(self.file_path(c).await?.to_string_lossy().into_owned())),
            other => Err(ComputeError::InvalidArgument {
                field: "connection.driver_volume_type",
                message: format!("{other:?} is not a connection type this host supports (iscsi, file)"),
            }),
        }
    }

    /// Undoes [`Connectors::connect`]; what is already undone is fine.
    pub async fn disconnect(&self, volume_id: &str, c: &Connection) -> Result<()> {
        if crate::error::checked_id("connection.luks_secret_uuid", &c.luks_secret_uuid).is_ok() {
            self.virsh.undefine_secret(&c.luks_secret_uuid).await?;
        }
        match c.driver_volume_type.as_str() {
            "iscsi" => {
                // Both kinds are cleaned, so a change of iscsi_mode between attach and detach leaks nothing.
                self.virsh.undefine_secret(volume_id).await?;
                if self.iscsi_mode == IscsiMode::Kernel {
                    self.kernel_logout(c).await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn iscsiadm(&self, args: &[&str]) -> Result<String> {
        Ok(runner::run("iscsiadm", args, ISCSIADM_TIMEOUT).await?.stdout)
    }

    /// Kernel initiator: node new → update (manual start, CHAP) → login → wait for the by-path device.
    pub async fn kernel_login(&self, c: &Connection) -> Result<PathBuf> {
        let (t, p) = (c.target_iqn.as_str(), c.target_portal.as_str());
        let device = by_path(p, t, c.target_lun);
        if device.exists() {
            return Ok(device);
        }
        self.iscsiadm(&["-m", "node", "-T", t, "-p", p, "-o", "new"]).await?;
        for (key, value) in [
            ("node.startup", "manual"),
            ("node.session.scan", "manual"),
            ("node.session.auth.authmethod", "CHAP"),
            ("node.session.auth.username", c.auth_username.as_str()),
            ("node.session.auth.password", c.auth_password.as_str()),
        ] {
            self.iscsiadm(&["-m", "node", "-T", t, "-p", p, "-o", "update", "-n", key, "-v", value]).await?;
        }
        match self.iscsiadm(&["-m", "node", "-T", t, "-p", p, "--login"]).await {
            Ok(_) => {}
            Err(e) if failed_with(&e, &[15]) => {} // ISCSI_ERR_SESS_EXISTS: a crash left us logged in
            Err(e) => return Err(e),
        }
        // node.session.scan is manual, so LUNs appear when this node's session is rescanned.
        let deadline = tokio::time::Instant::now() + DEVICE_WAIT;
        while !device.exists() {
            if tokio::time::Instant::now() > deadline {
                return Err(ComputeError::DeadlineExceeded(format!(
                    "logged in to {t} but {} did not appear within {DEVICE_WAIT:?}",
                    device.display()
                )));
            }
            let _ = self.iscsiadm(&["-m", "node", "-T", t, "-p", p, "--rescan"]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(device)
    }

    /// Makes this host see a volume's new size before QEMU is asked to grow the disk: the kernel initiator's
    /// SCSI device re-reads its capacity (a session rescan, then the device's own rescan, as os-brick does).
    /// QEMU's own initiator re-reads the capacity itself when resized, and a file has grown already.
    ///
    /// A tgt target closes its initiators' connections when it re-makes the grown LUN, so the session may be
    /// logging in again (and its first command answered with a unit attention) when this runs: the rescan is
    /// repeated until the device shows the size, for up to [`DEVICE_WAIT`].
    pub async fn rescan(&self, c: &Connection, new_size: u64) -> Result<()> {
        if c.driver_volume_type != "iscsi" || self.iscsi_mode != IscsiMode::Kernel {
            return Ok(());
        }
        let (t, p) = (c.target_iqn.as_str(), c.target_portal.as_str());
        let device = by_path(p, t, c.target_lun);
        let deadline = tokio::time::Instant::now() + DEVICE_WAIT;
        loop {
            let not_yet = match self.rescan_device(t, p, &device).await {
                Ok((_, size)) if size >= new_size => return Ok(()),
                Ok((dev, size)) => ComputeError::FailedPrecondition(format!(
                    "{dev} is {size} bytes after a rescan, not {new_size}: the target has not grown"
                )),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(not_yet);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One rescan of the session and of `device`'s SCSI device; returns the device and the size it shows.
    async fn rescan_device(&self, t: &str, p: &str, device: &Path) -> Result<(String, u64)> {
        self.iscsiadm(&["-m", "node", "-T", t, "-p", p, "--rescan"]).await?;
        let real =
            std::fs::canonicalize(device).map_err(ComputeError::io(format!("resolving {}", device.display())))?;
        let name = real.file_name().unwrap_or_default();
        let rescan = PathBuf::from("/sys/block").join(name).join("device/rescan");
        if rescan.exists() {
            tokio::fs::write(&rescan, "1").await.map_err(ComputeError::io(format!("writing {}", rescan.display())))?;
        }
        let dev = real.to_string_lossy().into_owned();
        let out = runner::run("blockdev", &["--getsize64", &dev], ISCSIADM_TIMEOUT).await?.stdout;
        let size = out.trim().parse::<u64>().map_err(|_| {
            ComputeError::FailedPrecondition(format!("blockdev printed {:?} for {dev}, not a size", out.trim()))
        })?;
        Ok((dev, size))
    }

    /// Kernel initiator: flush and delete our SCSI device, then log out and delete the node unless another
    /// LUN of the same target is still in use on this host.
    pub async fn kernel_logout(&self, c: &Connection) -> Result<()> {
        let (t, p) = (c.target_iqn.as_str(), c.target_portal.as_str());
        let device = by_path(p, t, c.target_lun);
        if let Ok(real) = std::fs::canonicalize(&device) {
            let dev = real.to_string_lossy().into_owned();
            runner::run("blockdev", &["--flushbufs", &dev], ISCSIADM_TIMEOUT).await?;
            if let Some(name) = real.file_name() {
                let delete = PathBuf::from("/sys/block").join(name).join("device/delete");
                if delete.exists() {
                    std::fs::write(&delete, "1").map_err(ComputeError::io(format!("writing {}", delete.display())))?;
                }
            }
        }
        let prefix = format!("ip-{p}-iscsi-{t}-lun-");
        let others = std::fs::read_dir("/dev/disk/by-path")
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
            .unwrap_or(false);
        if others {
            return Ok(());
        }
        let logout: &[&str] = &["-m", "node", "-T", t, "-p", p, "--logout"];
        let delete: &[&str] = &["-m", "node", "-T", t, "-p", p, "-o", "delete"];
        for args in [logout, delete] {
            match self.iscsiadm(args).await {
                Ok(_) => {}
                Err(e) if failed_with(&e, &[21]) => {} // ISCSI_ERR_NO_OBJS_FOUND: already gone
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `file`: the volume file, on its NFS share (mounted under the state dir, once per share) or local.
    async fn file_path(&self, c: &Connection) -> Result<PathBuf> {
        if c.export.is_empty() {
            return Ok(PathBuf::from(&c.path));
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(c.export.as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let mount = self.state_dir.join("mnt").join(name);
        std::fs::create_dir_all(&mount).map_err(ComputeError::io(format!("creating {}", mount.display())))?;
        let options = if c.mount_options.is_empty() { ember_common::nfs::DEFAULT_OPTIONS } else { &c.mount_options };
        ember_common::nfs::ensure_mounted(&c.export, &mount, options).await.map_err(|e| ComputeError::Io {
            context: format!("mounting {}", c.export),
            source: std::io::Error::other(e),
        })?;
        let name = Path::new(&c.path).file_name().unwrap_or_default();
        Ok(mount.join(name))
    }
}
