//! `ember quota`: project quotas, like `cinder quota-show` / `quota-update` / `quota-usage`.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::*;

/// `ember quota …`
#[derive(Debug, clap::Args)]
pub struct QuotaCmd {
    #[command(subcommand)]
    action: QuotaAction,
}

#[derive(Debug, clap::Subcommand)]
enum QuotaAction {
    /// Show limits and usage (your own project when none is named).
    Show {
        /// Project.
        #[arg(default_value = "")]
        project: String,
    },
    /// Set limits `resource=N` (-1 = unlimited). Admin.
    Set {
        /// Project.
        project: String,
        /// `resource=N` pairs.
        #[arg(required = true)]
        limits: Vec<String>,
    },
    /// Compare recorded usage with what exists (volumes, snapshots, backups, instances), every project or one;
    /// `--fix` corrects the records. Admin.
    Check {
        /// Project (every project when none is named).
        #[arg(default_value = "")]
        project: String,
        /// Set each differing record to what exists.
        #[arg(long)]
        fix: bool,
    },
}

fn print(q: &Quota, json: bool) {
    if json {
        let items: Vec<_> = q
            .items
            .iter()
            .map(|i| serde_json::json!({"resource": i.resource, "limit": i.limit, "in_use": i.in_use, "reserved": i.reserved}))
            .collect();
        output::json(&serde_json::json!({ "project": q.project, "quotas": items }));
        return;
    }
    let rows: Vec<Vec<String>> = q
        .items
        .iter()
        .map(|i| vec![i.resource.clone(), i.limit.to_string(), i.in_use.to_string(), i.reserved.to_string()])
        .collect();
    println!("project: {}", q.project);
    output::table(&["Resource", "Limit", "In Use", "Reserved"], &rows);
}

fn print_check(r: &CheckQuotaUsageResponse, json: bool) {
    let drifts = r.drifts.iter();
    if json {
        let drifts: Vec<_> = drifts
            .map(|d| serde_json::json!({"project": d.project, "resource": d.resource, "recorded": d.recorded, "counted": d.counted}))
            .collect();
        output::json(&serde_json::json!({ "projects": r.projects, "drifts": drifts, "fixed": r.fixed }));
        return;
    }
    if r.drifts.is_empty() {
        println!("usage matches what exists ({} project(s) checked)", r.projects);
        return;
    }
    let rows: Vec<Vec<String>> = drifts
        .map(|d| vec![d.project.clone(), d.resource.clone(), d.recorded.to_string(), d.counted.to_string()])
        .collect();
    output::table(&["Project", "Resource", "Recorded", "Exists"], &rows);
    if r.fixed {
        println!("corrected: the records now say what exists");
    } else {
        println!("run again with --fix to correct the records");
    }
}

/// Runs `ember quota …`.
pub async fn run(cmd: QuotaCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = QuotaServiceClient::new(conn.channel()?);
    let q = match cmd.action {
        QuotaAction::Show { project } => client.get_quota(GetQuotaRequest { project }).await?.into_inner(),
        QuotaAction::Check { project, fix } => {
            let r = client.check_quota_usage(CheckQuotaUsageRequest { project, fix }).await?.into_inner();
            print_check(&r, json);
            return Ok(());
        }
        QuotaAction::Set { project, limits } => {
            let mut parsed = std::collections::HashMap::new();
            for (k, v) in crate::types::parse_pairs(&limits)? {
                let n: i64 = v.parse().map_err(|_| CliError::Other(format!("{k}: {v:?} is not a number")))?;
                parsed.insert(k, n);
            }
            client.set_quota(SetQuotaRequest { project, limits: parsed }).await?.into_inner()
        }
    };
    print(&q, json);
    Ok(())
}
