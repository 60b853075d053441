//! `ember certs`: the fleet CA and per-role certificates.

use crate::connect::CliError;
use ember_common::certs::{IssueRequest, init_ca, issue, issued, renew, revoke};
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
    /// Issue a successor to NAME's newest certificate that is not revoked: the same role, project, DNS names and
    /// IP addresses, a new key, as many days as the old one (or --days). The old one stays valid: restart the
    /// daemon with the new files, then revoke the old one if it should not run to its end.
    Renew {
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Whose certificate.
        #[arg(long)]
        name: String,
        /// Where to write <name>.pem and <name>.key (which must not exist there).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days; default as long as the certificate it replaces.
        #[arg(long)]
        days: Option<i64>,
    },
    /// List the certificates the CA in --dir issued (as it recorded them), with their expiry and whether they
    /// are revoked.
    List {
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Revoke certificates: add them to the CA's revocation list (crl.pem in --dir). Every daemon whose
    /// `[tls] crl` names a copy of it refuses their calls within seconds of the copy changing.
    Revoke {
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Certificate files (PEM) to revoke.
        certs: Vec<PathBuf>,
        /// Serial number (hex) of a certificate whose file is lost (repeatable).
        #[arg(long)]
        serial: Vec<String>,
        /// Every certificate this CA issued to NAME, whatever its role (repeatable).
        #[arg(long)]
        name: Vec<String>,
    },
}

/// Runs `ember certs …`.
pub fn run(cmd: CertsCmd, json: bool) -> Result<(), CliError> {
    let (cert, key) = match cmd.action {
        CertsAction::List { dir } => return run_list(&dir, json),
        CertsAction::Revoke { dir, certs, serial, name } => return run_revoke(&dir, &certs, &serial, &name, json),
        CertsAction::Renew { dir, name, out, days } => return run_renew(&dir, &name, days, &out, json),
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

fn run_renew(
    dir: &std::path::Path,
    name: &str,
    days: Option<i64>,
    out: &std::path::Path,
    json: bool,
) -> Result<(), CliError> {
    let done = renew(dir, name, days, out).map_err(|e| e.to_string())?;
    let (old, req) = (&done.replaced, &done.request);
    if json {
        crate::output::json(&serde_json::json!({
            "cert": done.cert, "key": done.key, "days": req.days, "dns": req.dns, "ips": req.ips,
            "replaces": { "serial": old.serial, "expires": old.expires() },
        }));
        return Ok(());
    }
    let addresses: Vec<String> = req.dns.iter().cloned().chain(req.ips.iter().map(IpAddr::to_string)).collect();
    println!("renewed {} {} for {} days ({})", req.identity.role, req.identity.name, req.days, addresses.join(", "));
    println!("certificate: {}\nkey:         {}", done.cert.display(), done.key.display());
    println!(
        "it replaces serial {} (expires {}), which stays valid: copy the key, then the certificate, over the \
         daemon's files (it takes them up within seconds, without a restart, and logs \"presenting a renewed \
         certificate\"), then `ember certs revoke --dir {} --serial {}` if the old one should not run to its end",
        old.serial,
        old.expires(),
        dir.display(),
        old.serial
    );
    Ok(())
}

fn run_revoke(
    dir: &std::path::Path,
    certs: &[PathBuf],
    serials: &[String],
    names: &[String],
    json: bool,
) -> Result<(), CliError> {
    if certs.is_empty() && serials.is_empty() && names.is_empty() {
        return Err(CliError::Other("name the certificates to revoke (files, --serial or --name)".into()));
    }
    let done = revoke(dir, certs, serials, names).map_err(|e| e.to_string())?;
    let who = |r: &ember_common::certs::Revoked| match &r.identity {
        Some(i) => format!(
            "{} {}{}",
            i.role,
            i.name,
            i.project.as_ref().map(|p| format!(" (project {p})")).unwrap_or_default()
        ),
        None => String::new(),
    };
    if json {
        let revoked: Vec<_> = done
            .revoked
            .iter()
            .map(|r| serde_json::json!({ "serial": r.serial, "holder": who(r), "already_revoked": r.already }))
            .collect();
        crate::output::json(&serde_json::json!({ "crl": done.crl, "revoked": revoked, "total": done.total }));
        return Ok(());
    }
    for r in &done.revoked {
        let state = if r.already { "already revoked" } else { "revoked" };
        println!("{state:<16} {}  {}", r.serial, who(r));
    }
    println!(
        "{} now revokes {} certificate(s): copy it to the `crl` path of every daemon's [tls] section",
        done.crl.display(),
        done.total
    );
    Ok(())
}

fn run_list(dir: &std::path::Path, json: bool) -> Result<(), CliError> {
    let all = issued(dir).map_err(|e| e.to_string())?;
    if json {
        let list: Vec<_> = all
            .iter()
            .map(|c| {
                serde_json::json!({
                    "serial": c.serial, "role": c.identity.role.as_str(), "name": c.identity.name,
                    "project": c.identity.project.clone().unwrap_or_default(), "expires": c.expires(), "state": c.state(),
                })
            })
            .collect();
        crate::output::json(&serde_json::Value::Array(list));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            vec![
                c.identity.name.clone(),
                c.identity.role.to_string(),
                c.identity.project.clone().unwrap_or_default(),
                c.expires(),
                c.state().to_string(),
                c.serial.clone(),
            ]
        })
        .collect();
    crate::output::table(&["Name", "Role", "Project", "Expires", "State", "Serial"], &rows);
    Ok(())
}
