//! Running libvirt on an all-in-one or test host: when no libvirtd answers and the agent is configured to
//! manage it, the agent starts virtlogd and libvirtd itself and stops exactly those processes when it stops.

use crate::virsh::Virsh;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Daemons this agent started (empty when libvirt was already running).
#[derive(Default)]
pub struct Started {
    children: Vec<Child>,
}

fn spawn(program: &str, args: &[&str], log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    tracing::info!(program, ?args, "starting");
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
}

/// Makes sure libvirt answers on `virsh.uri`, starting virtlogd and libvirtd (in the foreground, as our
/// children) if it does not.
pub async fn ensure(virsh: &Virsh, log_dir: &Path) -> Result<Started, String> {
    if virsh.alive().await {
        return Ok(Started::default());
    }
    std::fs::create_dir_all("/run/libvirt").map_err(|e| format!("creating /run/libvirt: {e}"))?;
    let mut started = Started::default();
    let log = |name: &str| log_dir.join(name);
    started.children.push(spawn("virtlogd", &[], &log("virtlogd.log")).map_err(|e| format!("virtlogd: {e}"))?);
    started.children.push(spawn("libvirtd", &[], &log("libvirtd.log")).map_err(|e| format!("libvirtd: {e}"))?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virsh.alive().await {
        if Instant::now() > deadline {
            return Err("libvirtd did not answer within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started)
}

impl Started {
    /// Stops what we started (SIGTERM; both daemons honour it), libvirtd first. Domains keep running.
    pub async fn stop(mut self) {
        for child in self.children.iter_mut().rev() {
            if let Some(pid) = child.id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}
