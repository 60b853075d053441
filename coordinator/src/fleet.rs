//! `FleetService`: the service list with up/down state, and disabling/enabling services (admin only, as
//! Cinder's os-services API); and the availability zones, which anyone may list.

use crate::auth::require_admin;
use crate::clock::{now_ms, timestamp};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::validate;
use ember_proto::v1::fleet_service_server::FleetService;
use ember_proto::v1::*;
use sqlx::Row;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC service.
pub struct Fleet {
    ctx: Arc<Ctx>,
}

impl Fleet {
    /// Lists the services of `ctx`'s database; a service silent for longer than its `service_down_ms` is down.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Fleet { ctx }
    }
}

fn role_of(column: &str) -> ServiceRole {
    match column {
        "storage" => ServiceRole::Storage,
        "compute" => ServiceRole::Compute,
        "backup" => ServiceRole::Backup,
        _ => ServiceRole::Unspecified,
    }
}

fn role_column(role: ServiceRole) -> Option<&'static str> {
    match role {
        ServiceRole::Storage => Some("storage"),
        ServiceRole::Compute => Some("compute"),
        ServiceRole::Backup => Some("backup"),
        ServiceRole::Unspecified => None,
    }
}

/// Whether a service last heard from at `last_heartbeat_ms` counts as up at `now_ms`.
pub fn is_up(last_heartbeat_ms: i64, now_ms: i64, down_after_ms: i64) -> bool {
    now_ms - last_heartbeat_ms <= down_after_ms
}

/// Splits `host` or `host@backend`.
fn split_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((h, b)) => (h, Some(b)),
        None => (name, None),
    }
}

impl Fleet {
    async fn list(&self, req: &ListServicesRequest) -> Result<Vec<Service>> {
        let role = ServiceRole::try_from(req.role).map_err(|_| Error::invalid("role", "unknown role"))?;
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT host, role, backend, availability_zone, enabled, disabled_reason, last_heartbeat, instance_id, \
             endpoint, version, certificate_expires_at, crl_number FROM services WHERE (?1 IS NULL OR role = ?1) AND (?2 = '' OR host = ?2) \
             ORDER BY role, host, backend",
        )
        .bind(role_column(role))
        .bind(&req.host)
        .fetch_all(&self.ctx.db)
        .await?;
        let mut conn = self.ctx.db.acquire().await?;
        let compute: std::collections::HashMap<String, ComputeHostUsage> =
            crate::placement::compute_hosts(&mut conn, &req.host, self.ctx.service_down_ms)
                .await?
                .into_iter()
                .map(|h| (h.host, h.usage))
                .collect();
        Ok(rows
            .into_iter()
            .map(|r| {
                let host: String = r.get(0);
                let role = role_of(r.get::<&str, _>(1));
                let usage = if role == ServiceRole::Compute { compute.get(&host).cloned() } else { None };
                let backend: String = r.get(2);
                let last: i64 = r.get(6);
                Service {
                    name: if backend.is_empty() { host.clone() } else { format!("{host}@{backend}") },
                    host,
                    compute: usage,
                    role: role as i32,
                    backend,
                    availability_zone: r.get(3),
                    enabled: r.get::<i64, _>(4) != 0,
                    disabled_reason: r.get(5),
                    up: is_up(last, now, self.ctx.service_down_ms),
                    last_heartbeat: Some(timestamp(last)),
                    instance_id: r.get(7),
                    endpoint: r.get(8),
                    version: r.get(9),
                    certificate_expires_at: Some(r.get::<i64, _>(10)).filter(|ms| *ms != 0).map(timestamp),
                    revocation_list_number: r.get::<i64, _>(11).max(0) as u64,
                }
            })
            .collect())
    }

    async fn set_enabled(&self, name: &str, enabled: bool, reason: &str) -> Result<Service> {
        if name.is_empty() {
            return Err(Error::invalid("name", "must be `host` or `host@backend`"));
        }
        validate::text("reason", reason, 255)?;
        let (host, backend) = split_name(name);
        let changed = sqlx::query(
            "UPDATE services SET enabled = ?, disabled_reason = ? WHERE host = ? AND (?4 IS NULL OR backend = ?4)",
        )
        .bind(enabled as i64)
        .bind(if enabled { "" } else { reason })
        .bind(host)
        .bind(backend)
        .execute(&self.ctx.db)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(Error::not_found("service", name));
        }
        tracing::info!(service = name, enabled, reason, "service state changed");
        let rows = self.list(&ListServicesRequest { role: 0, host: host.to_string() }).await?;
        rows.into_iter()
            .find(|s| backend.is_none_or(|b| s.backend == b))
            .ok_or_else(|| Error::not_found("service", name))
    }
}

/// What a service of `role` on `host` (one `backend`, or all) still holds, worded for an error; empty when nothing.
async fn holdings(conn: &mut sqlx::SqliteConnection, role: &str, host: &str, backend: Option<&str>) -> Result<String> {
    let counts: &[(&str, &str, &str)] = match role {
        "storage" => &[(
            "SELECT COUNT(*) FROM volumes WHERE host = ?1 AND (?2 IS NULL OR backend = ?2)",
            "volume(s)",
            "delete them, or forget them (ember volume delete --forget)",
        )],
        "compute" => &[
            ("SELECT COUNT(*) FROM attachments WHERE host = ?1", "attachment(s)", "detach them (--force)"),
            ("SELECT COUNT(*) FROM instances WHERE host = ?1", "instance(s)", "delete them (--force)"),
        ],
        _ => &[(
            "SELECT COUNT(*) FROM backups WHERE host = ?1",
            "backup(s)",
            "serve its repositories from another agent (ember backup import-repository), or forget them",
        )],
    };
    let mut held = Vec::new();
    for (query, noun, remedy) in counts {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(*query)).bind(host).bind(backend).fetch_one(&mut *conn).await?;
        if n > 0 {
            held.push(format!("{n} {noun}: {remedy}"));
        }
    }
    Ok(held.join("; "))
}

impl Fleet {
    async fn delete(&self, req: &DeleteServiceRequest) -> Result<Vec<Service>> {
        if req.name.is_empty() {
            return Err(Error::invalid("name", "must be `host` or `host@backend`"));
        }
        ServiceRole::try_from(req.role).map_err(|_| Error::invalid("role", "unknown role"))?;
        let (host, backend) = split_name(&req.name);
        let listed = self.list(&ListServicesRequest { role: req.role, host: host.to_string() }).await?;
        let matching: Vec<Service> = listed.into_iter().filter(|s| backend.is_none_or(|b| s.backend == b)).collect();
        let Some(first) = matching.first() else { return Err(Error::not_found("service", &req.name)) };
        if matching.iter().any(|s| s.role != first.role) {
            return Err(Error::invalid("role", format!("host {host} runs agents of several roles; name one")));
        }
        if let Some(up) = matching.iter().find(|s| s.up) {
            return Err(Error::FailedPrecondition(format!(
                "service {} is up; stop its agent first (a running agent registers again)",
                up.name
            )));
        }
        let role = role_column(role_of_number(first.role)).unwrap_or_default();
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let held = holdings(&mut tx, role, host, backend).await?;
        if !held.is_empty() {
            return Err(Error::FailedPrecondition(format!("service {} still holds {held}", req.name)));
        }
        // A host gone for good will never release the disks forced detaches left on it.
        let abandoned = if role == "compute" { crate::leftovers::give_up_on_host(&mut tx, host).await? } else { 0 };
        sqlx::query("DELETE FROM services WHERE host = ?1 AND role = ?2 AND (?3 IS NULL OR backend = ?3)")
            .bind(host)
            .bind(role)
            .bind(backend)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for s in &matching {
            tracing::warn!(service = %s.name, role, "service removed");
        }
        if abandoned > 0 {
            tracing::warn!(host, abandoned, "releases of disks left by forced detaches given up with their host");
        }
        Ok(matching)
    }
}

/// The zones of storage pools as `(zone, up and enabled)` per pool, folded into one entry per zone, by name.
fn zones_of(pools: impl IntoIterator<Item = (String, bool)>) -> Vec<AvailabilityZone> {
    let mut zones: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
    for (name, usable) in pools {
        *zones.entry(name).or_default() |= usable;
    }
    zones.into_iter().map(|(name, available)| AvailabilityZone { name, available }).collect()
}

fn role_of_number(role: i32) -> ServiceRole {
    ServiceRole::try_from(role).unwrap_or(ServiceRole::Unspecified)
}

#[tonic::async_trait]
impl FleetService for Fleet {
    async fn list_services(&self, req: Request<ListServicesRequest>) -> Result<Response<ListServicesResponse>, Status> {
        require_admin(&req, "list services")?;
        Ok(Response::new(ListServicesResponse { services: self.list(req.get_ref()).await? }))
    }

    async fn list_availability_zones(
        &self,
        _req: Request<ListAvailabilityZonesRequest>,
    ) -> Result<Response<ListAvailabilityZonesResponse>, Status> {
        let rows: Vec<(String, bool, i64)> = sqlx::query_as(
            "SELECT availability_zone, enabled, last_heartbeat FROM services WHERE role = 'storage' AND backend != ''",
        )
        .fetch_all(&self.ctx.db)
        .await
        .map_err(Error::from)?;
        let now = now_ms();
        let pools =
            rows.into_iter().map(|(zone, enabled, hb)| (zone, enabled && is_up(hb, now, self.ctx.service_down_ms)));
        Ok(Response::new(ListAvailabilityZonesResponse { zones: zones_of(pools) }))
    }

    async fn list_pools(&self, req: Request<ListPoolsRequest>) -> Result<Response<ListPoolsResponse>, Status> {
        require_admin(&req, "list pools")?;
        let mut pools: Vec<Pool> =
            crate::pools::candidates(&self.ctx).await?.iter().map(crate::pools::to_proto).collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListPoolsResponse { pools }))
    }

    async fn disable_service(&self, req: Request<DisableServiceRequest>) -> Result<Response<Service>, Status> {
        require_admin(&req, "disable services")?;
        let r = req.into_inner();
        Ok(Response::new(self.set_enabled(&r.name, false, &r.reason).await?))
    }

    async fn enable_service(&self, req: Request<EnableServiceRequest>) -> Result<Response<Service>, Status> {
        require_admin(&req, "enable services")?;
        Ok(Response::new(self.set_enabled(&req.get_ref().name, true, "").await?))
    }

    async fn delete_service(
        &self,
        req: Request<DeleteServiceRequest>,
    ) -> Result<Response<DeleteServiceResponse>, Status> {
        require_admin(&req, "remove services")?;
        Ok(Response::new(DeleteServiceResponse { removed: self.delete(req.get_ref()).await? }))
    }

    async fn get_metrics(&self, req: Request<GetMetricsRequest>) -> Result<Response<Metrics>, Status> {
        require_admin(&req, "read the fleet's metrics")?;
        Ok(Response::new(Metrics { text: crate::metrics::render(&self.ctx).await? }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_down_boundary() {
        assert!(is_up(1_000, 4_000, 3_000));
        assert!(!is_up(1_000, 4_001, 3_000));
        assert_eq!(split_name("node1@lvm"), ("node1", Some("lvm")));
        assert_eq!(split_name("node1"), ("node1", None));
    }
}
