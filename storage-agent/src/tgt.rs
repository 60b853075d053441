//! The tgt iSCSI target (tgtd, driven with tgtadm): one target per exported volume, LUN 1 backed by the
//! volume file, CHAP always. tgt has no per-initiator ACL worth the name, so like Cinder we bind the target
//! to all addresses and let the per-volume CHAP secret keep others out.

use crate::error::{AgentError, Result};
use ember_common::runner::{self, CommandError};
use std::path::Path;
use std::time::Duration;

const TGTADM_TIMEOUT: Duration = Duration::from_secs(30);

/// One target as `tgtadm --mode target --op show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetInfo {
    /// Target id.
    pub tid: u32,
    /// Target IQN.
    pub iqn: String,
    /// Backing-store paths of its LUNs (LUN 0, the controller, has none).
    pub backing: Vec<String>,
    /// CHAP accounts bound to it.
    pub accounts: Vec<String>,
    /// Initiator addresses or names allowed.
    pub acl: Vec<String>,
    /// The initiators' connections, by session (I_T nexus).
    pub connections: Vec<IscsiConnection>,
    /// Whether the target serves commands (`State: ready`); a LUN refresh takes it `offline` for a moment.
    pub ready: bool,
}

/// One initiator connection to a target: the session (I_T nexus) and the connection's id within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IscsiConnection {
    /// The session's id (tgt's I_T nexus id).
    pub session: u64,
    /// The connection's id within its session.
    pub connection: u32,
}

/// Parses `tgtadm --lld iscsi --mode target --op show`.
pub fn parse_targets(text: &str) -> Vec<TargetInfo> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Nexus,
        Accounts,
        Acl,
    }
    let mut targets: Vec<TargetInfo> = Vec::new();
    let mut section = Section::Other;
    let mut session = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Target ")
            && let Some((tid, iqn)) = rest.split_once(": ")
            && let Ok(tid) = tid.trim().parse()
        {
            targets.push(TargetInfo { tid, iqn: iqn.trim().to_string(), ..Default::default() });
            section = Section::Other;
            continue;
        }
        let Some(target) = targets.last_mut() else { continue };
        let trimmed = line.trim();
        let indent = line.len() - line.trim_start().len();
        if indent == 4 {
            section = match trimmed {
                "I_T nexus information:" => Section::Nexus,
                "Account information:" => Section::Accounts,
                "ACL information:" => Section::Acl,
                _ => Section::Other,
            };
            continue;
        }
        match section {
            Section::Nexus => {
                if let Some(id) = trimmed.strip_prefix("I_T nexus: ") {
                    session = id.trim().parse().ok();
                } else if let Some(id) = trimmed.strip_prefix("Connection: ")
                    && let (Some(session), Ok(connection)) = (session, id.trim().parse())
                {
                    target.connections.push(IscsiConnection { session, connection });
                }
            }
            Section::Accounts if indent == 8 && !trimmed.is_empty() => target.accounts.push(trimmed.to_string()),
            Section::Acl if indent == 8 && !trimmed.is_empty() => target.acl.push(trimmed.to_string()),
            Section::Other => {
                if let Some(path) = trimmed.strip_prefix("Backing store path: ")
                    && path != "None"
                {
                    target.backing.push(path.to_string());
                } else if let Some(state) = trimmed.strip_prefix("State: ") {
                    target.ready = state == "ready";
                }
            }
            _ => {}
        }
    }
    targets
}

/// What a target must look like.
#[derive(Debug, Clone)]
pub struct TargetSpec<'a> {
    /// Target IQN.
    pub iqn: &'a str,
    /// The volume file.
    pub backing: &'a Path,
    /// CHAP user.
    pub username: &'a str,
    /// CHAP secret.
    pub password: &'a str,
}

/// A handle on one tgtd.
#[derive(Debug, Clone)]
pub struct Tgt {
    /// tgtd's management port; 0 uses tgtd's default.
    pub control_port: u16,
}

/// How long a LUN refresh waits for the commands in flight to drain (its target offline), and how often it asks.
const LUN_IDLE_WAIT: Duration = Duration::from_secs(15);
const LUN_IDLE_POLL: Duration = Duration::from_millis(50);

/// Whether tgtadm refused a LUN's removal because commands are still queued on it.
fn lun_in_use(e: &CommandError) -> bool {
    already(e, "logical unit is still active")
}

fn already(e: &CommandError, what: &str) -> bool {
    matches!(e, CommandError::Failed { stderr, .. } if stderr.contains(what))
}

impl Tgt {
    async fn tgtadm(&self, args: &[&str]) -> Result<String, CommandError> {
        let port = self.control_port.to_string();
        let mut argv: Vec<&str> = Vec::with_capacity(args.len() + 4);
        if self.control_port != 0 {
            argv.extend(["-C", &port]);
        }
        argv.extend(["--lld", "iscsi"]);
        argv.extend(args);
        Ok(runner::run("tgtadm", &argv, TGTADM_TIMEOUT).await?.stdout)
    }

    /// Whether tgtd answers on its management channel.
    pub async fn alive(&self) -> bool {
        self.tgtadm(&["--mode", "sys", "--op", "show"]).await.is_ok()
    }

    /// Every target.
    pub async fn targets(&self) -> Result<Vec<TargetInfo>> {
        Ok(parse_targets(&self.tgtadm(&["--mode", "target", "--op", "show"]).await?))
    }

    /// Creates the target if absent and completes it if a crash left it half-made. Idempotent.
    pub async fn ensure(&self, spec: &TargetSpec<'_>) -> Result<()> {
        let targets = self.targets().await?;
        let backing = spec.backing.to_string_lossy();
        let target = match targets.iter().find(|t| t.iqn == spec.iqn) {
            Some(t) => t.clone(),
            None => {
                let tid = targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
                let tid_s = tid.to_string();
                self.tgtadm(&["--mode", "target", "--op", "new", "--tid", &tid_s, "--targetname", spec.iqn]).await?;
                TargetInfo { tid, iqn: spec.iqn.to_string(), ready: true, ..Default::default() }
            }
        };
        let tid = target.tid.to_string();
        if !target.backing.iter().any(|b| *b == backing) {
            self.add_lun(&tid, &backing).await?;
        }
        if !target.accounts.iter().any(|a| a == spec.username) {
            match self
                .tgtadm(&["--mode", "account", "--op", "new", "--user", spec.username, "--password", spec.password])
                .await
            {
                Err(e) if !already(&e, "already exists") => return Err(e.into()),
                _ => {}
            }
            self.tgtadm(&["--mode", "account", "--op", "bind", "--tid", &tid, "--user", spec.username]).await?;
        }
        if target.acl.is_empty() {
            self.tgtadm(&["--mode", "target", "--op", "bind", "--tid", &tid, "--initiator-address", "ALL"]).await?;
        }
        // Left offline by an agent that stopped inside a LUN refresh.
        if !target.ready {
            self.resume(&tid).await?;
        }
        Ok(())
    }

    /// Sets target `tid`'s state: `offline` refuses logins and leaves new commands unanswered (see
    /// [`Tgt::resume`]), `ready` serves again.
    async fn set_state(&self, tid: &str, state: &str) -> Result<()> {
        self.tgtadm(&["--mode", "target", "--op", "update", "--tid", tid, "--name", "state", "--value", state]).await?;
        Ok(())
    }

    /// Adds LUN 1 backed by `backing` to target `tid`.
    async fn add_lun(&self, tid: &str, backing: &str) -> Result<()> {
        self.tgtadm(&["--mode", "logicalunit", "--op", "new", "--tid", tid, "--lun", "1", "--backing-store", backing])
            .await?;
        Ok(())
    }

    /// Re-reads the backing file's size (after an extend) by re-creating LUN 1; initiators then see the new
    /// capacity. A target that is not there is left alone.
    ///
    /// tgtd refuses to remove a LUN while initiator commands are queued on it, which a busy guest keeps it from
    /// ever being. So the target is taken offline first: tgtd stops executing new commands, those in flight
    /// drain, and the LUN goes. The target is then resumed whatever happened; should the agent stop in between,
    /// its keeper does that (see [`Tgt::ensure`]).
    pub async fn refresh_lun(&self, iqn: &str, backing: &Path) -> Result<()> {
        let Some(t) = self.targets().await?.into_iter().find(|t| t.iqn == iqn) else { return Ok(()) };
        let (tid, backing) = (t.tid.to_string(), backing.to_string_lossy());
        self.set_state(&tid, "offline").await?;
        ember_common::failpoint::abort_if_armed("storage.abort_in_lun_refresh");
        let remade = self.remake_lun(&tid, &backing).await;
        let resumed = self.resume(&tid).await;
        remade.and(resumed)
    }

    /// Serves target `tid` again after it was offline.
    ///
    /// tgtd never answers a command that reaches an offline target: it drops it, and QEMU's initiator (which
    /// sets no command timeout) would wait for it forever, hanging the guest's I/O and anything that drains it,
    /// such as a block resize. An initiator re-sends its outstanding commands when it logs in again, so the
    /// target's connections are closed first, while logins are still refused; the initiators retry, and log in
    /// once the target is ready. Closing before the state change keeps this crash-safe: a target found offline
    /// is resumed again whole.
    async fn resume(&self, tid: &str) -> Result<()> {
        let closed = self.close_connections(tid).await;
        let ready = self.set_state(tid, "ready").await;
        closed.and(ready)
    }

    /// Closes every initiator connection to target `tid`; one that went meanwhile counts as closed.
    async fn close_connections(&self, tid: &str) -> Result<()> {
        let Some(target) = self.targets().await?.into_iter().find(|t| t.tid.to_string() == tid) else {
            return Ok(());
        };
        for c in &target.connections {
            let (sid, cid) = (c.session.to_string(), c.connection.to_string());
            match self.tgtadm(&["--mode", "conn", "--op", "delete", "--tid", tid, "--sid", &sid, "--cid", &cid]).await {
                Ok(_) => tracing::info!(tid, sid, cid, "initiator connection closed to resume the target"),
                Err(e) if already(&e, "can't find") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes LUN 1 of target `tid`, once the commands in flight on it have drained, and adds it again.
    async fn remake_lun(&self, tid: &str, backing: &str) -> Result<()> {
        self.once_lun_idle(tid, &["--mode", "logicalunit", "--op", "delete", "--tid", tid, "--lun", "1"]).await?;
        self.add_lun(tid, backing).await
    }

    /// Runs `args` (a removal that tgtd refuses while the LUN of target `tid` has commands in flight), asking
    /// again until the LUN has drained or [`LUN_IDLE_WAIT`] has passed.
    async fn once_lun_idle(&self, tid: &str, args: &[&str]) -> Result<()> {
        let mut waited = Duration::ZERO;
        loop {
            match self.tgtadm(args).await {
                Err(e) if lun_in_use(&e) && waited < LUN_IDLE_WAIT => {
                    tracing::debug!(tid, "LUN busy with initiator commands; asking again");
                    tokio::time::sleep(LUN_IDLE_POLL).await;
                    waited += LUN_IDLE_POLL;
                }
                done => return Ok(done.map(drop)?),
            }
        }
    }

    /// Removes the target (ending its sessions) and its account. Removing what is gone succeeds.
    pub async fn remove(&self, iqn: &str, username: &str) -> Result<()> {
        if let Some(t) = self.targets().await?.into_iter().find(|t| t.iqn == iqn) {
            self.delete_target(&t.tid.to_string()).await?;
        }
        if username.is_empty() {
            return Ok(());
        }
        match self.tgtadm(&["--mode", "account", "--op", "delete", "--user", username]).await {
            Err(e) if !already(&e, "can't find") => Err(AgentError::from(e)),
            _ => Ok(()),
        }
    }

    /// Deletes target `tid`, ending its sessions.
    ///
    /// tgtd refuses to, even forced, while initiator commands are in flight on its LUN, which busy initiators keep
    /// it from ever being. So a busy target is taken offline (tgtd stops executing new commands) and the delete is
    /// asked again as the LUN drains. Should it not drain, the target serves again (see [`Tgt::resume`]) and the
    /// refusal is returned; should the agent stop in between, its keeper resumes the target (its export is still
    /// recorded) and the next removal asked starts over.
    async fn delete_target(&self, tid: &str) -> Result<()> {
        let delete = ["--mode", "target", "--op", "delete", "--force", "--tid", tid];
        match self.tgtadm(&delete).await {
            Err(e) if lun_in_use(&e) => tracing::info!(tid, "target busy with initiator commands; taking it offline"),
            done => return Ok(done.map(drop)?),
        }
        self.set_state(tid, "offline").await?;
        let deleted = self.once_lun_idle(tid, &delete).await;
        if deleted.is_err() {
            self.resume(tid).await?;
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_tgtadm_output() {
        let text = include_str!("../testdata/tgtadm-show-target.txt");
        let targets = parse_targets(text);
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].tid, 1);
        assert_eq!(targets[0].iqn, "iqn.2026-11.org.ember:volume-x");
        assert_eq!(targets[0].backing, ["/tmp/t1.img"]);
        assert_eq!(targets[0].accounts, ["u1"]);
        assert_eq!(targets[0].acl, ["ALL"]);
        assert!(targets[0].connections.is_empty());
        assert!(targets[0].ready);
        assert_eq!(targets[1].tid, 3);
        assert_eq!(targets[1].backing, ["/tmp/t2.img"]);
        assert!(targets[1].accounts.is_empty() && targets[1].acl.is_empty());
        assert!(parse_targets("").is_empty());
    }

    #[test]
    fn a_lun_with_commands_in_flight_is_recognised_as_busy() {
        let failed = |stderr: &str| CommandError::Failed {
            program: "tgtadm".into(),
            args: String::new(),
            code: Some(22),
            stderr: stderr.into(),
            stdout: String::new(),
        };
        assert!(lun_in_use(&failed("tgtadm: this logical unit is still active\n")));
        assert!(!lun_in_use(&failed("tgtadm: can't find the logical unit\n")));
    }

    #[test]
    fn lists_the_connections_of_captured_sessions() {
        // Two qemu-img readers logged in to one target.
        let text = include_str!("../testdata/tgtadm-show-target-sessions.txt");
        let t = &parse_targets(text)[0];
        let expected = [IscsiConnection { session: 6, connection: 0 }, IscsiConnection { session: 7, connection: 0 }];
        assert_eq!((t.tid, t.connections.as_slice(), t.backing.len(), t.acl.len()), (1, &expected[..], 1, 1));
        assert!(t.ready);
        let offline = text.replace("State: ready", "State: offline");
        assert!(!parse_targets(&offline)[0].ready, "a target a LUN refresh left offline");
    }
}
