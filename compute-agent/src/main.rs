//! `ember-compute-agent`: runs on a compute node, connects volumes and attaches them to libvirt guests.
//! It registers its connector (host, IP, initiator IQN, connection types) with the coordinator.

mod capacity;
mod connector;
mod domain_xml;
mod error;
mod instances;
mod libvirtd;
mod service;
mod swap;
mod virsh;

use clap::Parser;
use ember_common::agent::{AgentArgs, AgentSettings, serve_agent, start_process};
use ember_common::identity::{Role, require_roles};
use ember_proto::agent::v1::compute_agent_server::ComputeAgentServer;
use ember_proto::agent::v1::{AgentRole, ComputeConnector, RegisterRequest};
use serde::Deserialize;
use tonic::service::RoutesBuilder;

/// The compute agent's TOML config.
#[derive(Debug, Clone, Default, Deserialize)]
struct ComputeConfig {
    /// Keys every agent has.
    #[serde(flatten)]
    agent: AgentSettings,
    /// IP address initiators connect from; default 127.0.0.1.
    ip: Option<String>,
    /// iSCSI initiator IQN; default read from /etc/iscsi/initiatorname.iscsi.
    initiator: Option<String>,
    /// Where the agent keeps short-lived files and NFS mounts (default /var/lib/ember/compute-agent).
    state_dir: Option<std::path::PathBuf>,
    /// The libvirt to use (default `qemu:///system`).
    libvirt_uri: Option<String>,
    /// Start virtlogd and libvirtd when none answers (and stop them on exit). Default true.
    manage_libvirt: Option<bool>,
    /// `qemu` (QEMU's own initiator, no host device) or `kernel` (iscsiadm). Default: qemu when QEMU's iSCSI
    /// driver is installed, else kernel.
    iscsi_mode: Option<connector::IscsiMode>,
    /// Seconds a guest may take to release a detached disk (default 30).
    detach_timeout_secs: Option<u64>,
    /// The most MiB per second QEMU's mirror copies when an attached volume moves to another pool, so that a
    /// migration does not starve the guests' own I/O; 0 (the default) for no limit.
    #[serde(default)]
    swap_bandwidth_mib: u64,
    /// How instances boot (`[boot] kernel/initrd/cmdline` for direct kernel boot; BIOS otherwise).
    #[serde(default)]
    boot: instances::BootConfig,
    /// What the host offers instances (`[capacity]`: host totals and Nova's ratios).
    #[serde(default)]
    capacity: capacity::CapacityConfig,
}

/// QEMU's iSCSI block driver, which the `qemu` mode needs.
const QEMU_ISCSI_DRIVER: &str = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so";

#[derive(Debug, Parser)]
#[command(name = "ember-compute-agent", version, about = "ember's compute node agent")]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Run one connector step by hand instead of the agent (operators finishing or undoing a connection;
    /// the real-kernel tests).
    #[command(subcommand)]
    tool: Option<IscsiTool>,
}

/// Kernel-initiator connector steps an operator can run by hand.
#[derive(Debug, clap::Subcommand)]
enum IscsiTool {
    /// Log in to an iSCSI LUN with the kernel initiator and print its device (CHAP secret from
    /// $EMBER_CHAP_PASSWORD, never the command line).
    #[command(name = "iscsi-connect")]
    Connect(IscsiTarget),
    /// Flush and remove an iSCSI LUN's device, logging out when no other LUN of the target is in use.
    #[command(name = "iscsi-disconnect")]
    Disconnect(IscsiTarget),
    /// Make a logged-in LUN's device show the size its target has grown to (after an extend).
    #[command(name = "iscsi-rescan")]
    Rescan {
        /// The LUN.
        #[command(flatten)]
        target: IscsiTarget,
        /// The size in bytes the device must reach.
        #[arg(long)]
        size: u64,
    },
}

/// One iSCSI LUN.
#[derive(Debug, clap::Args)]
struct IscsiTarget {
    /// Portal `ip:port`.
    #[arg(long)]
    portal: String,
    /// Target IQN.
    #[arg(long)]
    iqn: String,
    /// LUN.
    #[arg(long, default_value_t = 1)]
    lun: u32,
    /// CHAP user.
    #[arg(long, default_value = "")]
    username: String,
}

impl IscsiTarget {
    fn connection(&self) -> ember_proto::agent::v1::Connection {
        ember_proto::agent::v1::Connection {
            driver_volume_type: "iscsi".into(),
            target_portal: self.portal.clone(),
            target_iqn: self.iqn.clone(),
            target_lun: self.lun,
            auth_username: self.username.clone(),
            auth_password: std::env::var("EMBER_CHAP_PASSWORD").unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// Runs a [`IscsiTool`] with the kernel connector.
async fn run_tool(tool: IscsiTool) -> Result<(), Box<dyn std::error::Error>> {
    let connectors = connector::Connectors {
        virsh: virsh::Virsh { uri: String::new(), timeout: std::time::Duration::from_secs(60) },
        iscsi_mode: connector::IscsiMode::Kernel,
        initiator: String::new(),
        state_dir: std::env::temp_dir(),
    };
    match tool {
        IscsiTool::Connect(t) => println!("{}", connectors.kernel_login(&t.connection()).await?.display()),
        IscsiTool::Disconnect(t) => connectors.kernel_logout(&t.connection()).await?,
        IscsiTool::Rescan { target, size } => connectors.rescan(&target.connection(), size).await?,
    }
    Ok(())
}

/// The IQN in an open-iscsi `initiatorname.iscsi` file (`InitiatorName=iqn…`).
fn parse_initiator_name(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("InitiatorName="))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    start_process(args.agent.log_json);
    let result = match args.tool.take() {
        Some(tool) => run_tool(tool).await,
        None => run(args).await,
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        eprintln!("ember-compute-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file: ComputeConfig = ember_common::config::load(args.agent.config.as_deref())?;
    let id = args.agent.resolve(file.agent.clone())?;
    let initiator = file
        .initiator
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/etc/iscsi/initiatorname.iscsi").ok().and_then(|t| parse_initiator_name(&t))
        })
        .unwrap_or_else(|| format!("iqn.2026-11.org.ember:{}", id.name));
    let compute_capacity = capacity::of_host(&file.capacity)?;
    tracing::info!(
        vcpus = compute_capacity.vcpus,
        memory_mb = compute_capacity.memory_mb,
        "capacity offered to instances"
    );
    let state_dir = file.state_dir.clone().unwrap_or_else(|| "/var/lib/ember/compute-agent".into());
    std::fs::create_dir_all(&state_dir)?;
    let virsh = virsh::Virsh {
        uri: file.libvirt_uri.clone().unwrap_or_else(|| "qemu:///system".into()),
        timeout: std::time::Duration::from_secs(60),
    };
    let libvirt = if file.manage_libvirt.unwrap_or(true) {
        libvirtd::ensure(&virsh, &state_dir).await?
    } else {
        libvirtd::Started::default()
    };
    let iscsi_mode = file.iscsi_mode.unwrap_or(if std::path::Path::new(QEMU_ISCSI_DRIVER).exists() {
        connector::IscsiMode::Qemu
    } else {
        connector::IscsiMode::Kernel
    });
    tracing::info!(?iscsi_mode, uri = %virsh.uri, "compute agent ready");
    let connector = ComputeConnector {
        host: id.name.clone(),
        ip: file.ip.clone().unwrap_or_else(|| "127.0.0.1".into()),
        initiator: initiator.clone(),
        connection_types: vec!["iscsi".into(), "file".into()],
    };
    let compute = service::Compute {
        connectors: connector::Connectors { virsh: virsh.clone(), iscsi_mode, initiator, state_dir },
        virsh,
        detach_timeout: std::time::Duration::from_secs(file.detach_timeout_secs.unwrap_or(30)),
        swap_bandwidth_mib: file.swap_bandwidth_mib,
        lock: Default::default(),
        boot: file.boot.clone(),
    };
    let (name, az) = (id.name.clone(), id.availability_zone.clone());
    let mut routes = RoutesBuilder::default();
    routes.add_service(ComputeAgentServer::with_interceptor(
        service::ComputeService(std::sync::Arc::new(compute)),
        require_roles(&[Role::Coordinator]),
    ));
    let served =
        serve_agent(id, routes, &["ember.agent.v1.ComputeAgent"], move |endpoint, instance_id| RegisterRequest {
            name: name.clone(),
            role: AgentRole::Compute as i32,
            endpoint: endpoint.to_string(),
            instance_id: instance_id.to_string(),
            version: ember_common::VERSION.to_string(),
            api_version: ember_proto::AGENT_API_VERSION.to_string(),
            availability_zone: az.clone(),
            backends: vec![],
            connector: Some(connector.clone()),
            repositories: vec![],
            compute_capacity: Some(compute_capacity),
            crl_number: 0, // the registration loop sets it
        })
        .await;
    libvirt.stop().await;
    served
}

#[cfg(test)]
mod tests {
    /// The example a deployment starts from (docs/deploy.md) says what it means to say.
    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compute-agent.toml");
        let cfg: super::ComputeConfig = ember_common::config::load(Some(std::path::Path::new(example))).unwrap();
        assert_eq!(cfg.agent.name.as_deref(), Some("compute1"));
        assert!(cfg.agent.advertise.is_some() && cfg.agent.coordinator.is_some() && cfg.agent.tls.is_some());
        assert_eq!(cfg.ip.as_deref(), Some("192.0.2.21"));
        assert_eq!(cfg.libvirt_uri.as_deref(), Some("qemu:///system"));
        assert_eq!(cfg.manage_libvirt, Some(false));
        assert_eq!(cfg.iscsi_mode, Some(super::connector::IscsiMode::Kernel));
        assert_eq!(cfg.detach_timeout_secs, Some(30));
        assert!(cfg.state_dir.is_some());
        assert_eq!(cfg.capacity.cpu_allocation_ratio, 4.0);
        assert_eq!(cfg.capacity.reserved_host_memory_mb, 512);
    }

    #[test]
    fn reads_initiator_name() {
        let text = "## DO NOT EDIT\n#InitiatorName=iqn.old\nInitiatorName=iqn.1993-08.org.debian:01:abc\n";
        assert_eq!(super::parse_initiator_name(text).as_deref(), Some("iqn.1993-08.org.debian:01:abc"));
        assert_eq!(super::parse_initiator_name("# nothing\n"), None);
    }
}
