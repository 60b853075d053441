//! Keeps tgtd running and holding every export: starts (and owns) a tgtd when configured to, restarts it when
//! it dies, and re-creates exports that a tgtd restart lost.

use crate::config::TgtConfig;
use crate::service::Storage;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How often the keeper checks tgtd and the exports.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Starts a tgtd in the foreground, owned by this process (killed when the handle is dropped).
fn spawn_tgtd(cfg: &TgtConfig) -> std::io::Result<Child> {
    let mut cmd = Command::new("tgtd");
    cmd.arg("-f");
    if cfg.control_port != 0 {
        cmd.args(["-C", &cfg.control_port.to_string()]);
    }
    cmd.args(["--iscsi", &format!("portal={}", cfg.portal)])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    tracing::info!(control_port = cfg.control_port, portal = %cfg.portal, "starting tgtd");
    cmd.spawn()
}

/// One round: make sure tgtd answers (starting ours if needed), then re-create missing exports.
pub async fn check_once(storage: &Storage, cfg: &TgtConfig, child: &mut Option<Child>) {
    if !storage.tgt.alive().await {
        if !cfg.manage {
            tracing::warn!("tgtd does not answer and is not ours to start");
            return;
        }
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            tracing::warn!(%status, "our tgtd exited; restarting it");
            *child = None;
        }
        if child.is_none() {
            match spawn_tgtd(cfg) {
                Ok(c) => *child = Some(c),
                Err(e) => {
                    tracing::error!("cannot start tgtd: {e}");
                    return;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !storage.tgt.alive().await {
            if Instant::now() > deadline {
                tracing::error!("tgtd did not answer within 10 s");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    match storage.ensure_exports().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(recreated = n, "tgtd had lost exports; re-created them"),
        Err(e) => tracing::error!("re-creating exports failed: {e}"),
    }
}

/// Runs forever: the first check before returning control, then one every second.
pub async fn start(storage: Arc<Storage>, cfg: TgtConfig) -> tokio::task::JoinHandle<()> {
    let mut child = None;
    check_once(&storage, &cfg, &mut child).await;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CHECK_INTERVAL);
        loop {
            ticker.tick().await;
            check_once(&storage, &cfg, &mut child).await;
        }
    })
}
