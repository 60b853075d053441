//! `ember service`: the fleet's services, like `cinder service-list`; `ember zone`, its availability zones; and
//! `ember pool`, its storage pools as the scheduler sees them, like `cinder get-pools --detail`.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::*;

/// `ember service …`
#[derive(Debug, clap::Args)]
pub struct ServiceCmd {
    #[command(subcommand)]
    action: ServiceAction,
}

#[derive(Debug, clap::Subcommand)]
enum ServiceAction {
    /// List services with their state.
    List {
        /// Only this host.
        #[arg(long, default_value = "")]
        host: String,
    },
    /// List compute hosts with their instances and the vCPUs and memory those take of what the host offers,
    /// like `openstack hypervisor list --long`.
    Hypervisors,
    /// Disable a service (`host` or `host@backend`): nothing new is scheduled on it.
    Disable {
        /// `host` or `host@backend`.
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Enable a disabled service.
    Enable {
        /// `host` or `host@backend`.
        name: String,
    },
    /// Remove a service that is gone for good (down, holding nothing) from the list.
    Delete {
        /// `host` or `host@backend`.
        name: String,
        /// The role, when the host runs agents of several.
        #[arg(long, value_parser = ["storage", "compute", "backup"])]
        role: Option<String>,
    },
}

/// `ember zone …`
#[derive(Debug, clap::Args)]
pub struct ZoneCmd {
    #[command(subcommand)]
    action: ZoneAction,
}

#[derive(Debug, clap::Subcommand)]
enum ZoneAction {
    /// List the availability zones volumes can be created in.
    List,
}

/// Runs `ember zone …`.
pub async fn run_zones(cmd: ZoneCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let ZoneAction::List = cmd.action;
    let zones = FleetServiceClient::new(conn.channel()?)
        .list_availability_zones(ListAvailabilityZonesRequest {})
        .await?
        .into_inner()
        .zones;
    if json {
        let list = zones.iter().map(|z| serde_json::json!({"name": z.name, "available": z.available})).collect();
        output::json(&serde_json::Value::Array(list));
    } else {
        let state = |z: &AvailabilityZone| if z.available { "available" } else { "unavailable" }.to_string();
        let rows: Vec<Vec<String>> = zones.iter().map(|z| vec![z.name.clone(), state(z)]).collect();
        output::table(&["Name", "Status"], &rows);
    }
    Ok(())
}

/// `ember pool …`
#[derive(Debug, clap::Args)]
pub struct PoolCmd {
    #[command(subcommand)]
    action: PoolAction,
}

#[derive(Debug, clap::Subcommand)]
enum PoolAction {
    /// Admin: list the pools the scheduler places volumes on, with their capacity figures.
    List,
}

fn pool_json(p: &Pool) -> serde_json::Value {
    serde_json::json!({
        "name": p.name, "availability_zone": p.availability_zone, "total_capacity_gb": p.total_capacity_gb,
        "free_capacity_gb": p.free_capacity_gb, "provisioned_gb": p.provisioned_gb, "virtual_free_gb": p.virtual_free_gb,
        "thin": p.thin, "thick": p.thick, "reserved_percentage": p.reserved_percentage,
        "max_over_subscription_ratio": p.max_over_subscription_ratio, "capabilities": p.capabilities,
    })
}

/// Runs `ember metrics`: the exposition as the coordinator wrote it (it is already a machine format).
pub async fn run_metrics(conn: &ConnectArgs) -> Result<(), CliError> {
    let metrics = FleetServiceClient::new(conn.channel()?).get_metrics(GetMetricsRequest {}).await?.into_inner();
    print!("{}", metrics.text);
    Ok(())
}

/// A capacity as pools report it (GiB, or a word such as `infinite`), to two decimals for people.
fn gib(reported: &str) -> String {
    match reported.parse::<f64>() {
        Ok(v) => format!("{v:.2}"),
        Err(_) => reported.to_string(),
    }
}

/// Runs `ember pool …`.
pub async fn run_pools(cmd: PoolCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let PoolAction::List = cmd.action;
    let pools = FleetServiceClient::new(conn.channel()?).list_pools(ListPoolsRequest {}).await?.into_inner().pools;
    if json {
        output::json(&serde_json::Value::Array(pools.iter().map(pool_json).collect()));
        return Ok(());
    }
    let kinds =
        |p: &Pool| [(p.thin, "thin"), (p.thick, "thick")].iter().filter(|k| k.0).map(|k| k.1).collect::<Vec<_>>();
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.availability_zone.clone(),
                gib(&p.total_capacity_gb),
                gib(&p.free_capacity_gb),
                format!("{}", p.provisioned_gb),
                p.virtual_free_gb.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
                kinds(p).join(","),
            ]
        })
        .collect();
    output::table(
        &["Pool", "Zone", "Total GiB", "Free GiB", "Provisioned GiB", "Virtual Free GiB", "Provisioning"],
        &rows,
    );
    Ok(())
}

fn role_name(role: i32) -> &'static str {
    match ServiceRole::try_from(role).unwrap_or(ServiceRole::Unspecified) {
        ServiceRole::Storage => "ember-storage",
        ServiceRole::Compute => "ember-compute",
        ServiceRole::Backup => "ember-backup",
        ServiceRole::Unspecified => "?",
    }
}

fn to_json(s: &Service) -> serde_json::Value {
    serde_json::json!({
        "binary": role_name(s.role), "host": s.name, "zone": s.availability_zone,
        "status": if s.enabled { "enabled" } else { "disabled" }, "state": if s.up { "up" } else { "down" },
        "updated_at": output::time(&s.last_heartbeat), "disabled_reason": s.disabled_reason,
        "instance_id": s.instance_id, "endpoint": s.endpoint, "version": s.version,
        "certificate_expires_at": output::time(&s.certificate_expires_at),
        "revocation_list_number": s.revocation_list_number,
        "compute": s.compute.as_ref().map(|c| serde_json::json!({
            "instances": c.instances, "vcpus": c.vcpus, "vcpus_used": c.vcpus_used,
            "memory_mb": c.memory_mb, "memory_mb_used": c.memory_mb_used,
        })),
    })
}

/// `used/total`, or just `used` when the host reports no total (it is then not limited).
fn used_of(used: u64, total: u64) -> String {
    if total == 0 { format!("{used} (no limit)") } else { format!("{used}/{total}") }
}

fn print_hypervisors(services: &[Service], json: bool) {
    let compute: Vec<&Service> = services.iter().filter(|s| s.role == ServiceRole::Compute as i32).collect();
    if json {
        output::json(&serde_json::Value::Array(compute.iter().map(|s| to_json(s)).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = compute
        .iter()
        .map(|s| {
            let c = s.compute.unwrap_or_default();
            vec![
                s.name.clone(),
                if s.up { "up" } else { "down" }.into(),
                if s.enabled { "enabled" } else { "disabled" }.into(),
                c.instances.to_string(),
                used_of(c.vcpus_used.into(), c.vcpus.into()),
                used_of(c.memory_mb_used, c.memory_mb),
            ]
        })
        .collect();
    output::table(&["Host", "State", "Status", "Instances", "vCPUs Used", "Memory MiB Used"], &rows);
}

/// The day a certificate expires, and how soon when that is within a month.
fn expires(at: &Option<prost_types::Timestamp>) -> String {
    let Some(at) = at else { return String::new() };
    let day = at.to_string().chars().take(10).collect::<String>();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    match (at.seconds - now).div_euclid(86_400) {
        days if days < 0 => format!("{day} (EXPIRED)"),
        days if days < 30 => format!("{day} (in {days} days)"),
        _ => day,
    }
}

fn print(services: &[Service], json: bool) {
    if json {
        output::json(&serde_json::Value::Array(services.iter().map(to_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                role_name(s.role).into(),
                s.name.clone(),
                s.availability_zone.clone(),
                if s.enabled { "enabled" } else { "disabled" }.into(),
                if s.up { "up" } else { "down" }.into(),
                output::time(&s.last_heartbeat),
                expires(&s.certificate_expires_at),
                s.revocation_list_number.to_string(),
                s.disabled_reason.clone(),
            ]
        })
        .collect();
    let header = ["Binary", "Host", "Zone", "Status", "State", "Updated At", "Cert Expires", "CRL", "Disabled Reason"];
    output::table(&header, &rows);
}

/// Runs `ember service …`.
pub async fn run(cmd: ServiceCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = FleetServiceClient::new(conn.channel()?);
    match cmd.action {
        ServiceAction::List { host } => {
            let resp = client.list_services(ListServicesRequest { role: 0, host }).await?.into_inner();
            print(&resp.services, json);
        }
        ServiceAction::Hypervisors => {
            let req = ListServicesRequest { role: ServiceRole::Compute as i32, host: String::new() };
            print_hypervisors(&client.list_services(req).await?.into_inner().services, json);
        }
        ServiceAction::Disable { name, reason } => {
            let s = client.disable_service(DisableServiceRequest { name, reason }).await?.into_inner();
            print(&[s], json);
        }
        ServiceAction::Enable { name } => {
            let s = client.enable_service(EnableServiceRequest { name }).await?.into_inner();
            print(&[s], json);
        }
        ServiceAction::Delete { name, role } => {
            let role = match role.as_deref() {
                Some("storage") => ServiceRole::Storage,
                Some("compute") => ServiceRole::Compute,
                Some("backup") => ServiceRole::Backup,
                _ => ServiceRole::Unspecified,
            };
            let req = DeleteServiceRequest { name, role: role as i32 };
            let removed = client.delete_service(req).await?.into_inner().removed;
            if json {
                print(&removed, json);
            } else {
                for s in removed {
                    println!("service {} ({}) removed", s.name, role_name(s.role));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn use_is_shown_against_the_total_when_there_is_one() {
        assert_eq!(super::used_of(3, 8), "3/8");
        assert_eq!(super::used_of(3, 0), "3 (no limit)");
    }

    #[test]
    fn capacities_are_shown_to_two_decimals() {
        assert_eq!(super::gib("251.9722785949707"), "251.97");
        assert_eq!(super::gib("infinite"), "infinite");
    }
}
