//! The scheduler's view of the fleet: one [`PoolState`] per pool of every storage backend that is up and
//! enabled, from its latest report, with provisioned capacity counted from the coordinator's own records (so
//! creates already placed but not yet finished are reserved).

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::error::Result;
use crate::scheduler::{Capacity, PoolState};
use serde_json::Value;
use sqlx::Row;
use std::collections::BTreeMap;

/// A reported capacity: a number of GiB, `"infinite"`, or anything else (negative, `"unknown"`) as unknown.
fn capacity(v: &Value) -> Capacity {
    match (v.as_f64(), v.as_str()) {
        (Some(gb), _) if gb >= 0.0 => Capacity::Gb(gb),
        (_, Some(s)) if s.eq_ignore_ascii_case("infinite") => Capacity::Infinite,
        _ => Capacity::Unknown,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Builds the pool states of one backend report.
pub fn pools_of(host: &str, backend: &str, az: &str, report: &Value, provisioned_gb: f64) -> Vec<PoolState> {
    let mut out = Vec::new();
    for p in report["pools"].as_array().into_iter().flatten() {
        let mut caps: BTreeMap<String, String> = BTreeMap::new();
        for key in ["storage_protocol", "vendor_name", "driver_version", "driver"] {
            caps.insert(key.into(), text(&report[key]));
        }
        for key in [
            "thin_provisioning_support",
            "thick_provisioning_support",
            "multiattach",
            "reserved_percentage",
            "max_over_subscription_ratio",
            "total_capacity_gb",
            "free_capacity_gb",
        ] {
            caps.insert(key.into(), text(&p[key]));
        }
        if let Some(extra) = p["capabilities"].as_object() {
            for (k, v) in extra {
                caps.insert(k.clone(), text(v));
            }
        }
        caps.entry("volume_backend_name".into()).or_insert_with(|| backend.to_string());
        let thin = p["thin_provisioning_support"].as_bool().unwrap_or(false);
        out.push(PoolState {
            host: host.to_string(),
            backend: backend.to_string(),
            availability_zone: az.to_string(),
            total: capacity(&p["total_capacity_gb"]),
            free: capacity(&p["free_capacity_gb"]),
            provisioned_gb,
            reserved_percentage: p["reserved_percentage"].as_u64().unwrap_or(0) as u32,
            // Cinder: the ratio only means something for thin pools.
            max_over_subscription_ratio: if thin {
                p["max_over_subscription_ratio"].as_f64().unwrap_or(20.0)
            } else {
                1.0
            },
            thin,
            thick: p["thick_provisioning_support"].as_bool().unwrap_or(false),
            capabilities: caps,
        });
    }
    out
}

/// Pools of every up, enabled storage backend.
pub async fn candidates(ctx: &Ctx) -> Result<Vec<PoolState>> {
    reported(ctx, None, true).await
}

/// The pools of every storage backend that is up, enabled or not.
pub async fn up(ctx: &Ctx) -> Result<Vec<PoolState>> {
    reported(ctx, None, false).await
}

/// The pool `host@backend` as its latest report describes it, if its service is up (enabled or not: a volume
/// already there is not being placed).
pub async fn current(ctx: &Ctx, host: &str, backend: &str) -> Result<Option<PoolState>> {
    Ok(reported(ctx, Some((host, backend)), false).await?.into_iter().next())
}

/// The pools of the storage backends that are up (`only`: just that `(host, backend)`; `enabled_only`: not the
/// disabled ones), from their latest reports, with provisioned capacity counted from the coordinator's records
/// (a migrating volume counts on both its pools).
async fn reported(ctx: &Ctx, only: Option<(&str, &str)>, enabled_only: bool) -> Result<Vec<PoolState>> {
    let rows = sqlx::query(
        "SELECT s.host, s.backend, s.availability_zone, s.report, s.last_heartbeat, \
         (SELECT COALESCE(SUM(v.size_gb), 0) FROM volumes v WHERE (v.host = s.host AND v.backend = s.backend) \
          OR (v.migrate_host = s.host AND v.migrate_backend = s.backend)) \
         FROM services s WHERE s.role = 'storage' AND s.backend != '' AND (?1 = 0 OR s.enabled = 1) \
         AND (?2 IS NULL OR (s.host = ?2 AND s.backend = ?3))",
    )
    .bind(enabled_only)
    .bind(only.map(|(host, _)| host))
    .bind(only.map(|(_, backend)| backend))
    .fetch_all(&ctx.db)
    .await?;
    let now = now_ms();
    let mut pools = Vec::new();
    for r in rows {
        if !crate::fleet::is_up(r.get(4), now, ctx.service_down_ms) {
            continue;
        }
        let report: Value = serde_json::from_str(r.get::<&str, _>(3))?;
        pools.extend(pools_of(r.get(0), r.get(1), r.get(2), &report, r.get::<i64, _>(5) as f64));
    }
    Ok(pools)
}

/// Availability zones that have storage.
pub async fn zones(ctx: &Ctx) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT DISTINCT availability_zone FROM services WHERE role = 'storage' ORDER BY 1")
        .fetch_all(&ctx.db)
        .await?)
}

/// Shows a capacity as the agent reported it.
fn capacity_text(c: Capacity) -> String {
    match c {
        Capacity::Gb(gb) => format!("{gb}"),
        Capacity::Infinite => "infinite".into(),
        Capacity::Unknown => "unknown".into(),
    }
}

/// The API view of a pool, with the virtual free capacity the scheduler computes for its default provisioning.
pub fn to_proto(p: &PoolState) -> ember_proto::v1::Pool {
    let default = crate::scheduler::Request::default();
    ember_proto::v1::Pool {
        name: p.name(),
        availability_zone: p.availability_zone.clone(),
        total_capacity_gb: capacity_text(p.total),
        free_capacity_gb: capacity_text(p.free),
        provisioned_gb: p.provisioned_gb,
        virtual_free_gb: crate::scheduler::virtual_free_gb(&default, p),
        thin: p.thin,
        thick: p.thick,
        reserved_percentage: p.reserved_percentage,
        max_over_subscription_ratio: p.max_over_subscription_ratio,
        capabilities: p.capabilities.clone().into_iter().collect(),
    }
}
