//! `ember certs`: the fleet CA and per-role certificates.

use crate::connect::CliError;
use ember_common::certs::{IssueRequest, init_ca, issue};
use ember_common::identity::{Identity, Role};
use std::net::IpAddr;
use std::path::PathBuf;

/// `ember certs …`
#[derive(Debug, clap::Args)]
pub struct CertsCmd {
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(Debug, clap::Subcommand)]
enum CertsAction {
    /// Create a new fleet CA (ca.pem, ca.key) in --dir.
    Init {
        /// Directory for the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "ember fleet CA")]
        common_name: String,
    },
    /// Issue a certificate and key signed by the CA in --dir.
    Issue {
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// coordinator, storage-agent, compute-agent, backup-agent, admin or member.
        #[arg(long)]
        role: Role,
        /// Node or user name (1-63 of a-z 0-9 - _ .).
        #[arg(long)]
        name: String,
        /// The member's project (members only).
        #[arg(long)]
        project: Option<String>,
        /// DNS names the certificate serves (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses the certificate serves (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Where to write <name>.pem and <name>.key; default --dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

/// Runs `ember certs …`.
pub fn run(cmd: CertsCmd, json: bool) -> Result<(), CliError> {
    let (cert, key) = match cmd.action {
        CertsAction::Init { dir, common_name } => init_ca(&dir, &common_name).map_err(|e| e.to_string())?,
        CertsAction::Issue { dir, role, name, project, dns, ip, out, days } => {
            let req = IssueRequest { identity: Identity { role, name: name.clone(), project }, dns, ips: ip, days };
            issue(&dir, &req, out.as_deref().unwrap_or(&dir), &name).map_err(|e| e.to_string())?
        }
    };
    if json {
        crate::output::json(&serde_json::json!({ "cert": cert, "key": key }));
    } else {
        println!("certificate: {}\nkey:         {}", cert.display(), key.display());
    }
    Ok(())
}
