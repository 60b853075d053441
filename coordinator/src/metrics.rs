//! The fleet's metrics in Prometheus' text exposition format (0.0.4), for `FleetService.GetMetrics` and
//! `ember metrics`. Everything is read when asked, from the database and the access log's call counters, so
//! nothing is kept twice. No project name is ever a label: the exposition goes to monitoring systems that
//! tenants' names have no business in.

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use crate::scheduler::Capacity;
use ember_proto::v1::ComputeHostUsage;
use std::fmt::Write;

/// A label value with `\`, `"` and line breaks escaped, as the format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family: its help and type lines, then one sample per `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(Vec<(&str, String)>, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// `(status, count)` of a table's rows, as samples labelled `status`.
async fn by_status(ctx: &Ctx, table: &str) -> Result<Vec<(Vec<(&'static str, String)>, f64)>> {
    let sql = format!("SELECT status, COUNT(*) FROM {table} GROUP BY status ORDER BY status");
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&ctx.db).await?;
    Ok(rows.into_iter().map(|(status, n)| (vec![("status", status)], n as f64)).collect())
}

/// The whole exposition.
pub async fn render(ctx: &Ctx) -> Result<String> {
    let mut out = String::new();
    for (table, what) in
        [("volumes", "Volumes"), ("snapshots", "Snapshots"), ("backups", "Backups"), ("instances", "Instances")]
    {
        let samples = by_status(ctx, table).await?;
        family(&mut out, &format!("ember_{table}"), "gauge", &format!("{what} by status."), &samples);
    }

    let running: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, COUNT(*) FROM operations WHERE state = 'running' GROUP BY kind ORDER BY kind")
            .fetch_all(&ctx.db)
            .await?;
    let samples: Vec<_> = running.into_iter().map(|(kind, n)| (vec![("kind", kind)], n as f64)).collect();
    family(&mut out, "ember_operations_running", "gauge", "Operations under way, by kind.", &samples);

    let services: Vec<(String, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT role, host, backend, enabled, last_heartbeat, certificate_expires_at FROM services \
         ORDER BY role, host, backend",
    )
    .fetch_all(&ctx.db)
    .await?;
    let now = now_ms();
    let label = |role: &str, host: &str, backend: &str| {
        vec![("role", role.to_string()), ("host", host.to_string()), ("backend", backend.to_string())]
    };
    let up: Vec<_> = services
        .iter()
        .map(|(r, h, b, _, last, _)| {
            (label(r, h, b), crate::fleet::is_up(*last, now, ctx.service_down_ms) as i64 as f64)
        })
        .collect();
    family(&mut out, "ember_service_up", "gauge", "1 when the agent heartbeats in time, 0 when it is down.", &up);
    let enabled: Vec<_> = services.iter().map(|(r, h, b, e, _, _)| (label(r, h, b), *e as f64)).collect();
    family(&mut out, "ember_service_enabled", "gauge", "1 when the service takes new work.", &enabled);
    // Seconds since the epoch, as node_exporter's and blackbox_exporter's certificate expiries are, so that one
    // alert rule (`… - time() < 86400 * 14`) covers them all.
    let expiry: Vec<_> = services
        .iter()
        .filter(|s| s.5 != 0)
        .map(|(r, h, b, _, _, expires_ms)| (label(r, h, b), (*expires_ms / 1000) as f64))
        .collect();
    family(
        &mut out,
        "ember_service_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate an agent registered with expires, seconds since the epoch.",
        &expiry,
    );
    family(
        &mut out,
        "ember_coordinator_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the coordinator's own certificate expires, seconds since the epoch.",
        &[(vec![], ctx.own_certificate.borrow().expires_at as f64)],
    );

    let pools = crate::pools::up(ctx).await?;
    let gb = |c: &Capacity| match c {
        Capacity::Gb(v) => Some(*v),
        Capacity::Infinite | Capacity::Unknown => None,
    };
    let pool = |p: &crate::scheduler::PoolState| vec![("pool", format!("{}@{}", p.host, p.backend))];
    let total: Vec<_> = pools.iter().filter_map(|p| gb(&p.total).map(|v| (pool(p), v))).collect();
    family(&mut out, "ember_pool_total_gb", "gauge", "A pool's size, GiB, as its storage agent reports it.", &total);
    let free: Vec<_> = pools.iter().filter_map(|p| gb(&p.free).map(|v| (pool(p), v))).collect();
    family(
        &mut out,
        "ember_pool_free_gb",
        "gauge",
        "A pool's free space, GiB, as its storage agent reports it.",
        &free,
    );
    let provisioned: Vec<_> = pools.iter().map(|p| (pool(p), p.provisioned_gb)).collect();
    family(&mut out, "ember_pool_provisioned_gb", "gauge", "GiB of volumes placed on a pool.", &provisioned);

    let hosts = {
        let mut conn = ctx.db.acquire().await?;
        crate::placement::compute_hosts(&mut conn, "", ctx.service_down_ms).await?
    };
    type Gauge = (&'static str, &'static str, fn(&ComputeHostUsage) -> f64);
    let compute: [Gauge; 5] = [
        ("ember_compute_instances", "Instances placed on a compute host, in any status.", |u| u.instances.into()),
        ("ember_compute_vcpus", "vCPUs a compute host offers (after its allocation ratio).", |u| u.vcpus.into()),
        ("ember_compute_vcpus_used", "vCPUs of the instances placed on a compute host.", |u| u.vcpus_used.into()),
        ("ember_compute_memory_mb", "MiB a compute host offers (after reserved memory and its ratio).", |u| {
            u.memory_mb as f64
        }),
        ("ember_compute_memory_mb_used", "MiB of the instances placed on a compute host.", |u| u.memory_mb_used as f64),
    ];
    for (name, help, value) in compute {
        let samples: Vec<_> = hosts.iter().map(|h| (vec![("host", h.host.clone())], value(&h.usage))).collect();
        family(&mut out, name, "gauge", help, &samples);
    }

    let calls = ember_common::access_log::call_counts();
    let counted: Vec<_> =
        calls.iter().map(|(m, c, n, _)| (vec![("method", m.clone()), ("code", c.clone())], *n as f64)).collect();
    family(&mut out, "ember_api_calls_total", "counter", "Calls the coordinator served since it started.", &counted);
    let seconds: Vec<_> = calls
        .iter()
        .map(|(m, c, _, ms)| (vec![("method", m.clone()), ("code", c.clone())], *ms as f64 / 1000.0))
        .collect();
    family(&mut out, "ember_api_call_seconds_total", "counter", "Time spent serving those calls, seconds.", &seconds);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_in_the_text_format() {
        let mut out = String::new();
        family(&mut out, "ember_x", "gauge", "An x.", &[(vec![("status", "a\"b".into())], 2.0), (vec![], 1.5)]);
        assert_eq!(out, "# HELP ember_x An x.\n# TYPE ember_x gauge\nember_x{status=\"a\\\"b\"} 2\nember_x 1.5\n");
    }
}
