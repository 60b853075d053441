//! `ember-compute-agent`: runs on a compute node, connects volumes and attaches them to libvirt guests.
//! It registers its connector (host, IP, initiator IQN, connection types) with the coordinator.

mod service;

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
}

#[derive(Debug, Parser)]
#[command(name = "ember-compute-agent", version, about = "ember's compute node agent")]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
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
    let args = Args::parse();
    start_process(args.agent.log_json);
    if let Err(e) = run(args).await {
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
    let connector = ComputeConnector {
        host: id.name.clone(),
        ip: file.ip.clone().unwrap_or_else(|| "127.0.0.1".into()),
        initiator,
        connection_types: vec!["iscsi-qemu".into(), "file".into()],
    };
    let (name, az) = (id.name.clone(), id.availability_zone.clone());
    let mut routes = RoutesBuilder::default();
    routes.add_service(ComputeAgentServer::with_interceptor(service::Compute, require_roles(&[Role::Coordinator])));
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
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_initiator_name() {
        let text = "## DO NOT EDIT\n#InitiatorName=iqn.old\nInitiatorName=iqn.1993-08.org.debian:01:abc\n";
        assert_eq!(super::parse_initiator_name(text).as_deref(), Some("iqn.1993-08.org.debian:01:abc"));
        assert_eq!(super::parse_initiator_name("# nothing\n"), None);
    }
}
