//! A harness for fleet tests: a fresh CA and certificates in a temporary directory, the real daemons
//! started as processes on loopback (each on a port it picks and announces), and mTLS clients.

pub mod backups;
pub mod iscsi;
pub mod libvirt;
pub mod volumes;

use ember_common::certs::{IssueRequest, init_ca, issue};
use ember_common::identity::{Identity, Role};
use ember_common::tls::TlsFiles;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::transport::Channel;

/// How often the test fleet's agents heartbeat.
pub const HEARTBEAT_SECONDS: u32 = 1;
/// After how long without a heartbeat the test fleet's coordinator calls a service down.
pub const SERVICE_DOWN_SECONDS: u32 = 3;

/// The path of one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where its logs go.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` and waits for its `EMBER_LISTENING <addr>` line.
    pub fn start(mut cmd: Command, log: PathBuf) -> Daemon {
        let err = std::fs::File::create(&log).expect("log file");
        cmd.stdout(Stdio::piped()).stderr(err).stdin(Stdio::null()).env("EMBER_LOG", "info,ember=debug");
        let mut child = cmd.spawn().expect("starting daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("EMBER_LISTENING ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("address"));
                    break;
                }
            }
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("daemon did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        Daemon { child, addr, log }
    }

    /// The daemon's https URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits for the process to exit by itself (e.g. at a failpoint).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("process did not exit within {timeout:?}; the end of its log:\n{}", tail(&self.log_text(), 40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().expect("wait")
    }

    /// Sends signal `name` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{name} {}", self.child.id());
    }

    /// Whether the process is stopped (by SIGSTOP), from its state in `/proc`.
    pub fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until an agent has registered with the coordinator: from then on the coordinator reaches it (a
    /// restarted agent listens on a new port).
    pub async fn wait_registered(&self) {
        wait_for("the agent to register", Duration::from_secs(60), || async {
            self.log_text().contains("registered with the coordinator").then_some(())
        })
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test fleet in a temporary directory.
pub struct Fleet {
    /// Everything lives here.
    pub dir: TempDir,
    /// The coordinator, once started.
    pub coordinator: Option<Daemon>,
    /// tgtd control port and iSCSI portal port of each storage agent, by agent name.
    tgt_ports: std::sync::Mutex<std::collections::HashMap<String, (u16, u16)>>,
    /// Process ids of the storage agents started, to end them (and then their tgtds) with the fleet.
    storage_agents: std::sync::Mutex<Vec<u32>>,
    /// Seconds between the coordinator's reconcile passes (1 unless a test needs them out of the way).
    pub reconcile_interval_seconds: u32,
    /// Seconds without a heartbeat before the coordinator counts a service down ([`SERVICE_DOWN_SECONDS`]
    /// unless a test needs a service to stay up while its agent restarts).
    pub service_down_seconds: u32,
}

/// A free TCP port on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tgtd management port no other test in this run uses (they only name a local socket).
fn next_control_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 1_000 + (std::process::id() % 30_000) as u16; // tgtadm accepts up to 32767
    base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How many lines of each daemon's log a failing test prints.
const LOG_TAIL_LINES: usize = 100;

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Fleet {
    /// Prints the end of every daemon's log to stderr. A failing test calls it (from `drop`), because its
    /// temporary directory, and the logs with it, go when the fleet does: without them a failure seen once in
    /// CI cannot be explained.
    fn print_log_tails(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return };
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| (p.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), p))
            .collect();
        logs.sort();
        for (_, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            eprintln!("----- the end of {name} (the test failed) -----\n{}", tail(&text, LOG_TAIL_LINES));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        // Agents killed outright leave their tgtd running (by design: exports survive); end them here. A
        // storage agent still running would start its tgtd again, so the agents go first (a test's locals may
        // outlive its fleet). The command-line check keeps a reused pid safe. tgtd ignores SIGTERM while it
        // holds targets.
        let dir = self.dir.path().to_string_lossy().into_owned();
        for pid in self.storage_agents.lock().unwrap().iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        for (control, _) in self.tgt_ports.lock().unwrap().values() {
            let _ = Command::new("pkill").args(["-KILL", "-f", &format!("^tgtd -f -C {control} ")]).status();
        }
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    /// A new fleet with a CA and certificates for the coordinator and an admin.
    pub fn new() -> Fleet {
        ember_common::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(&dir.path().join("ca"), "test fleet CA").expect("CA");
        let fleet = Fleet {
            dir,
            coordinator: None,
            tgt_ports: Default::default(),
            storage_agents: Default::default(),
            reconcile_interval_seconds: 1,
            service_down_seconds: SERVICE_DOWN_SECONDS,
        };
        fleet.issue(Role::Coordinator, "coordinator", None);
        fleet.issue(Role::Admin, "admin", None);
        fleet
    }

    /// The CA directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues a certificate (once) and returns its TLS files.
    pub fn issue(&self, role: Role, name: &str, project: Option<&str>) -> TlsFiles {
        let out = self.dir.path().join("certs");
        let stem = format!("{role}-{name}");
        if !out.join(format!("{stem}.pem")).exists() {
            let req = IssueRequest {
                identity: Identity { role, name: name.into(), project: project.map(String::from) },
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                days: 2,
            };
            issue(&self.ca_dir(), &req, &out, &stem).expect("issue");
        }
        self.tls(&stem)
    }

    /// TLS files for a certificate stem under `certs/`.
    pub fn tls(&self, stem: &str) -> TlsFiles {
        let out = self.dir.path().join("certs");
        TlsFiles {
            ca: self.ca_dir().join("ca.pem"),
            cert: out.join(format!("{stem}.pem")),
            key: out.join(format!("{stem}.key")),
            crl: Some(self.crl()),
        }
    }

    /// The fleet CA's revocation list, which every daemon of the fleet is configured to read
    /// (`ember certs revoke --dir <ca_dir>` writes it; until then it does not exist).
    pub fn crl(&self) -> PathBuf {
        self.ca_dir().join(ember_common::certs::CRL)
    }

    /// Starts the coordinator with a SQLite file in the fleet directory.
    pub fn start_coordinator(&mut self) -> &Daemon {
        self.start_coordinator_with(&[])
    }

    /// Starts (or restarts, on the same address and database) the coordinator with extra environment, e.g.
    /// `EMBER_FAILPOINTS`.
    pub fn start_coordinator_with(&mut self, env: &[(&str, &str)]) -> &Daemon {
        let tls = self.tls("coordinator-coordinator");
        let listen = self.coordinator.as_ref().map(|d| d.addr.to_string()).unwrap_or_else(|| "127.0.0.1:0".into());
        if let Some(old) = self.coordinator.as_mut() {
            old.kill();
        }
        let mut cmd = Command::new(bin("ember-coordinator"));
        cmd.envs(env.iter().copied());
        let reconcile = self.reconcile_interval_seconds.to_string();
        cmd.args(["--listen", &listen, "--reconcile-interval", &reconcile, "--database"])
            .arg(self.database())
            .arg("--ca")
            .arg(&tls.ca)
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .arg("--crl")
            .arg(self.crl())
            .args(["--heartbeat-interval", &HEARTBEAT_SECONDS.to_string()])
            .args(["--service-down", &self.service_down_seconds.to_string()]);
        let log = self.dir.path().join(format!("coordinator-{}.log", self.next_log()));
        self.coordinator = Some(Daemon::start(cmd, log));
        self.coordinator.as_ref().unwrap()
    }

    fn next_log(&self) -> usize {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A file backend section for a storage agent's config, with its directory created.
    pub fn file_backend(&self, backend: &str, extra: &str) -> (String, PathBuf) {
        let dir = self.subdir(&format!("backend-{backend}"));
        (
            format!(
                "[[backends]]\nname = \"{backend}\"\ndriver = \"file\"\ndirectory = \"{}\"\n{extra}\n",
                dir.display()
            ),
            dir,
        )
    }

    /// A read-only connection to the coordinator's database, for checking outcomes.
    pub async fn db(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", self.database().display())).await.expect("database")
    }

    /// The coordinator's SQLite file.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("ember.db")
    }

    /// Waits until the coordinator has paused an operation to retry it: what `what` names now waits for an agent
    /// that cannot be reached.
    pub async fn wait_operation_paused(&self, what: &str) {
        let coordinator = self.coordinator.as_ref().expect("a coordinator");
        wait_for(what, Duration::from_secs(60), || async {
            coordinator.log_text().contains("operation paused").then_some(())
        })
        .await
    }

    /// The state and error of the operation of `kind` on `resource_id`, if there is one (the latest).
    pub async fn operation(&self, kind: &str, resource_id: &str) -> Option<(String, String)> {
        sqlx::query_as(
            "SELECT state, error FROM operations WHERE kind = ? AND resource_id = ? ORDER BY created_at DESC LIMIT 1",
        )
        .bind(kind)
        .bind(resource_id)
        .fetch_optional(&self.db().await)
        .await
        .expect("reading operations")
    }

    /// The coordinator's URL.
    pub fn coordinator_url(&self) -> String {
        self.coordinator.as_ref().expect("coordinator started").url()
    }

    /// Starts an agent (`storage`, `compute` or `backup`) named `name`, with `extra_toml` appended to its
    /// config (backends, repositories, ...).
    pub fn start_agent(&self, kind: &str, name: &str, extra_toml: &str) -> Daemon {
        self.start_agent_with(kind, name, extra_toml, &[])
    }

    /// [`Fleet::start_agent`] with extra environment.
    pub fn start_agent_with(&self, kind: &str, name: &str, extra_toml: &str, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = self.agent_command(kind, name, extra_toml);
        cmd.envs(env.iter().copied());
        self.spawn_agent(kind, name, cmd)
    }

    /// [`Fleet::start_agent`] with no revocation list file of its own (no `[tls] crl`): it learns of
    /// revocations from the coordinator only.
    pub fn start_agent_without_crl(&self, kind: &str, name: &str, extra_toml: &str) -> Daemon {
        let cmd = self.agent_command(kind, name, extra_toml);
        let config = self.dir.path().join(format!("{kind}-{name}.toml"));
        let text = std::fs::read_to_string(&config).expect("agent config");
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("crl = ")).collect();
        std::fs::write(&config, kept.join("\n")).expect("agent config");
        self.spawn_agent(kind, name, cmd)
    }

    fn spawn_agent(&self, kind: &str, name: &str, cmd: Command) -> Daemon {
        let daemon = Daemon::start(cmd, self.dir.path().join(format!("{kind}-{name}-{}.log", self.next_log())));
        if kind == "storage" {
            self.storage_agents.lock().unwrap().push(daemon.child.id());
        }
        daemon
    }

    /// Starts an agent that is expected to refuse to run; returns its exit status and what it wrote to stderr.
    /// Panics if it is still running after `timeout`.
    pub fn agent_refusing_to_start(
        &self,
        kind: &str,
        name: &str,
        extra_toml: &str,
        timeout: Duration,
    ) -> (std::process::ExitStatus, String) {
        let log = self.dir.path().join(format!("{kind}-{name}-{}.log", self.next_log()));
        let mut child = self
            .agent_command(kind, name, extra_toml)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting agent");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent {name} is still running; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// The command that runs agent `kind` named `name`, with a certificate issued for it and `extra_toml` in
    /// its config.
    fn agent_command(&self, kind: &str, name: &str, extra_toml: &str) -> Command {
        let role = match kind {
            "storage" => Role::StorageAgent,
            "compute" => Role::ComputeAgent,
            "backup" => Role::BackupAgent,
            other => panic!("unknown agent kind {other}"),
        };
        let tls = self.issue(role, name, None);
        let config = self.dir.path().join(format!("{kind}-{name}.toml"));
        let (head, tail) = if role == Role::StorageAgent {
            let (control, portal) = self.tgt_ports(name);
            (
                // Images come from the fleet's `images` directory only (tests make theirs there).
                format!(
                    "state_dir = \"{}\"\nimage_dirs = [\"{}\"]\n",
                    self.subdir(&format!("state-{name}")).display(),
                    self.subdir("images").display()
                ),
                format!("[tgt]\ncontrol_port = {control}\nportal = \"127.0.0.1:{portal}\"\n"),
            )
        } else if role == Role::ComputeAgent {
            let state = self.subdir(&format!("state-{name}"));
            let head = format!(
                "state_dir = \"{}\"\nlibvirt_uri = \"{}\"\nmanage_libvirt = false\ndetach_timeout_secs = {}\n",
                state.display(),
                libvirt::URI,
                libvirt::DETACH_TIMEOUT.as_secs()
            );
            (head, String::new())
        } else {
            (String::new(), String::new())
        };
        let text = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ncoordinator = \"{}\"\n{head}{extra_toml}\n{tail}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncrl = \"{}\"\n",
            self.coordinator_url(),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
            self.crl().display()
        );
        std::fs::write(&config, text).expect("agent config");
        let mut cmd = Command::new(bin(&format!("ember-{kind}-agent")));
        cmd.arg("--config").arg(&config);
        cmd
    }

    /// The tgtd control port and portal port of storage agent `name` (stable across its restarts).
    pub fn tgt_ports(&self, name: &str) -> (u16, u16) {
        *self.tgt_ports.lock().unwrap().entry(name.to_string()).or_insert_with(|| (next_control_port(), free_port()))
    }

    /// `tgtadm --op show --mode target` of storage agent `name`'s tgtd.
    pub fn tgt_show(&self, name: &str) -> String {
        let (control, _) = self.tgt_ports(name);
        let out = Command::new("tgtadm")
            .args(["-C", &control.to_string(), "--lld", "iscsi", "--mode", "target", "--op", "show"])
            .output()
            .expect("tgtadm");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A directory inside the fleet directory, created.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("subdir");
        p
    }

    /// A channel to the coordinator as the holder of `tls`.
    pub fn channel(&self, tls: &TlsFiles) -> Channel {
        tls.channel(&self.coordinator_url()).expect("channel")
    }

    /// A channel to the coordinator as admin.
    pub fn admin(&self) -> Channel {
        self.channel(&self.tls("admin-admin"))
    }

    /// A channel to the coordinator as a member of `project`.
    pub fn member(&self, name: &str, project: &str) -> Channel {
        let tls = self.issue(Role::Member, name, Some(project));
        self.channel(&tls)
    }

    /// Runs the `ember` CLI as admin against this fleet; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_as(&self.tls("admin-admin"), args)
    }

    /// [`Fleet::cli`] for a command that takes a while (it waits for a guest, say): it runs off the test's
    /// runtime, which meanwhile answers the coordinator's pings on the test's own channels. Blocked for longer
    /// than the peer timeout, the runtime would let the coordinator close them.
    pub async fn cli_off_runtime(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = self.cli_command(args);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("running ember");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// Runs the `ember` CLI with the given identity.
    pub fn cli_as(&self, tls: &TlsFiles, args: &[&str]) -> (bool, String, String) {
        let out = self.cli_command_as(tls, args).output().expect("running ember");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// The `ember` CLI as admin against this fleet, ready to spawn (for a test that acts while it runs).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        self.cli_command_as(&self.tls("admin-admin"), args)
    }

    fn cli_command_as(&self, tls: &TlsFiles, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("ember"));
        cmd.args(args)
            .env("EMBER_COORDINATOR", self.coordinator_url())
            .env("EMBER_CA", &tls.ca)
            .env("EMBER_CERT", &tls.cert)
            .env("EMBER_KEY", &tls.key)
            .env_remove("EMBER_CLI_CONFIG")
            .env("HOME", self.dir.path());
        cmd
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. This waits for a condition
/// to become true; it is not a sleep standing in for synchronisation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
