//! Exports over the kernel's LIO target, driven through configfs directly (what targetcli's rtslib does,
//! without a Python process per call): an iblock backstore on the volume's block device, one target per
//! volume with LUN 1, a portal, and one ACL per initiator IQN with its CHAP credentials. Only initiators
//! with an ACL may log in (`generate_node_acls = 0`).
//!
//! Every step checks what exists first, so `ensure` completes a target a crash left half-made, and `remove`
//! takes apart whatever is there.

use crate::error::{AgentError, Result};
use std::path::{Path, PathBuf};

/// Where configfs shows LIO.
pub const CONFIGFS_ROOT: &str = "/sys/kernel/config/target";

/// What an LIO target must look like.
#[derive(Debug, Clone)]
pub struct LioSpec<'a> {
    /// Target IQN.
    pub iqn: &'a str,
    /// Backstore name (the volume's LV name).
    pub name: &'a str,
    /// The block device.
    pub device: &'a Path,
    /// CHAP user.
    pub username: &'a str,
    /// CHAP secret.
    pub password: &'a str,
    /// Initiator IQNs allowed to log in.
    pub initiators: &'a [String],
}

/// A handle on the kernel target.
#[derive(Debug, Clone)]
pub struct Lio {
    /// configfs root of LIO (a parameter so a test can point it elsewhere).
    pub root: PathBuf,
    /// The portal `ip:port` every target listens on.
    pub portal: String,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> AgentError {
    AgentError::io(context)
}

fn mkdir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(format!("creating {}", path.display()))(e)),
    }
}

fn rmdir(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", path.display()))(e)),
    }
}

/// Writes a configfs attribute. No trailing newline: LIO keeps CHAP values byte for byte.
fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io(format!("writing {}", path.display())))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Entries of a configfs directory (empty when it is absent).
fn entries(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    if std::fs::symlink_metadata(link).is_ok() {
        return Ok(());
    }
    std::os::unix::fs::symlink(target, link).map_err(io(format!("linking {}", link.display())))
}

/// Removes every symlink inside `dir`, then `dir`.
fn unlink_all_and_rmdir(dir: &Path) -> Result<()> {
    for entry in entries(dir) {
        if std::fs::symlink_metadata(&entry).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&entry).map_err(io(format!("unlinking {}", entry.display())))?;
        }
    }
    rmdir(dir)
}

impl Lio {
    fn backstore(&self, name: &str) -> PathBuf {
        self.root.join("core/iblock_0").join(name)
    }

    fn tpg(&self, iqn: &str) -> PathBuf {
        self.root.join("iscsi").join(iqn).join("tpgt_1")
    }

    /// IQNs of every target.
    pub fn targets(&self) -> Vec<String> {
        entries(&self.root.join("iscsi"))
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("iqn."))
            .collect()
    }

    /// The initiator IQNs with an ACL on a target.
    pub fn acls(&self, iqn: &str) -> Vec<String> {
        entries(&self.tpg(iqn).join("acls"))
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// Creates or completes the target; ACLs of initiators not in the spec are removed.
    pub fn ensure(&self, spec: &LioSpec<'_>) -> Result<()> {
        let store = self.backstore(spec.name);
        mkdir(&self.root.join("core/iblock_0"))?;
        mkdir(&store)?;
        if read(&store.join("enable")) != "1" {
            write(&store.join("control"), &format!("udev_path={}", spec.device.display()))?;
            write(&store.join("enable"), "1")?;
        }
        mkdir(&self.root.join("iscsi"))?;
        mkdir(&self.root.join("iscsi").join(spec.iqn))?;
        let tpg = self.tpg(spec.iqn);
        mkdir(&tpg)?;
        let lun = tpg.join("lun/lun_1");
        mkdir(&lun)?;
        symlink(&store, &lun.join("ember_lun"))?;
        mkdir(&tpg.join("np").join(&self.portal))?;
        write(&tpg.join("attrib/authentication"), "1")?;
        write(&tpg.join("attrib/generate_node_acls"), "0")?;
        write(&tpg.join("attrib/demo_mode_write_protect"), "0")?;
        for initiator in spec.initiators {
            let acl = tpg.join("acls").join(initiator);
            mkdir(&acl)?;
            write(&acl.join("auth/userid"), spec.username)?;
            write(&acl.join("auth/password"), spec.password)?;
            let mapped = acl.join("lun_1");
            mkdir(&mapped)?;
            symlink(&lun, &mapped.join("ember_lun"))?;
        }
        for stale in self.acls(spec.iqn).into_iter().filter(|a| !spec.initiators.contains(a)) {
            self.remove_acl(&tpg, &stale)?;
        }
        if read(&tpg.join("enable")) != "1" {
            write(&tpg.join("enable"), "1")?;
        }
        Ok(())
    }

    fn remove_acl(&self, tpg: &Path, initiator: &str) -> Result<()> {
        let acl = tpg.join("acls").join(initiator);
        for mapped in
            entries(&acl).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("lun_")))
        {
            unlink_all_and_rmdir(&mapped)?;
        }
        rmdir(&acl)
    }

    /// Takes the target apart (ending its sessions) and drops the backstore. Removing what is gone succeeds.
    pub fn remove(&self, iqn: &str, name: &str) -> Result<()> {
        let tpg = self.tpg(iqn);
        if tpg.exists() {
            if read(&tpg.join("enable")) == "1" {
                write(&tpg.join("enable"), "0")?;
            }
            for acl in self.acls(iqn) {
                self.remove_acl(&tpg, &acl)?;
            }
            for lun in entries(&tpg.join("lun")) {
                unlink_all_and_rmdir(&lun)?;
            }
            for np in entries(&tpg.join("np")) {
                rmdir(&np)?;
            }
            rmdir(&tpg)?;
        }
        rmdir(&self.root.join("iscsi").join(iqn))?;
        rmdir(&self.backstore(name))
    }
}
