//! `FleetService`: the service list with up/down state, and disabling/enabling services (admin only, as
//! Cinder's os-services API).

use crate::auth::require_admin;
use crate::clock::{now_ms, timestamp};
use crate::error::{Error, Result};
use crate::validate;
use ember_proto::v1::fleet_service_server::FleetService;
use ember_proto::v1::*;
use sqlx::{Row, SqlitePool};
use tonic::{Request, Response, Status};

/// The gRPC service.
pub struct Fleet {
    db: SqlitePool,
    service_down_ms: i64,
}

impl Fleet {
    /// Lists services in `db`; a service silent for longer than `service_down_seconds` is down.
    pub fn new(db: SqlitePool, service_down_seconds: u32) -> Self {
        Fleet { db, service_down_ms: i64::from(service_down_seconds) * 1000 }
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
             endpoint, version FROM services WHERE (?1 IS NULL OR role = ?1) AND (?2 = '' OR host = ?2) \
             ORDER BY role, host, backend",
        )
        .bind(role_column(role))
        .bind(&req.host)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let host: String = r.get(0);
                let backend: String = r.get(2);
                let last: i64 = r.get(6);
                Service {
                    name: if backend.is_empty() { host.clone() } else { format!("{host}@{backend}") },
                    host,
                    role: role_of(r.get::<&str, _>(1)) as i32,
                    backend,
                    availability_zone: r.get(3),
                    enabled: r.get::<i64, _>(4) != 0,
                    disabled_reason: r.get(5),
                    up: is_up(last, now, self.service_down_ms),
                    last_heartbeat: Some(timestamp(last)),
                    instance_id: r.get(7),
                    endpoint: r.get(8),
                    version: r.get(9),
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
        .execute(&self.db)
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

#[tonic::async_trait]
impl FleetService for Fleet {
    async fn list_services(&self, req: Request<ListServicesRequest>) -> Result<Response<ListServicesResponse>, Status> {
        require_admin(&req, "list services")?;
        Ok(Response::new(ListServicesResponse { services: self.list(req.get_ref()).await? }))
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
