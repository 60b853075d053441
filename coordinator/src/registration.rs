//! The agents' side door: registration and heartbeats (`ember.agent.v1.Registration`). An agent may only
//! register under the name and role its certificate carries.

use crate::clock::now_ms;
use crate::error::{Error, Result};
use ember_common::identity::{Identity, Role, caller, peer_certificate_expiry, valid_name};
use ember_proto::agent::v1::registration_server::Registration;
use ember_proto::agent::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC service.
pub struct Registrar {
    ctx: Arc<crate::context::Ctx>,
    heartbeat_interval_seconds: u32,
}

impl Registrar {
    /// Registers agents into the state of `ctx`, asking them to heartbeat every `heartbeat_interval_seconds`.
    pub fn new(ctx: Arc<crate::context::Ctx>, heartbeat_interval_seconds: u32) -> Self {
        Registrar { ctx, heartbeat_interval_seconds }
    }
}

/// The `services.role` column value for an agent role.
pub fn role_column(role: AgentRole) -> Option<&'static str> {
    match role {
        AgentRole::Storage => Some("storage"),
        AgentRole::Compute => Some("compute"),
        AgentRole::Backup => Some("backup"),
        AgentRole::Unspecified => None,
    }
}

fn cert_role(role: AgentRole) -> Option<Role> {
    match role {
        AgentRole::Storage => Some(Role::StorageAgent),
        AgentRole::Compute => Some(Role::ComputeAgent),
        AgentRole::Backup => Some(Role::BackupAgent),
        AgentRole::Unspecified => None,
    }
}

/// Checks that the caller's certificate names this agent and role.
fn check_claim(id: &Identity, name: &str, role: i32) -> Result<&'static str> {
    let role = AgentRole::try_from(role).unwrap_or(AgentRole::Unspecified);
    let column = role_column(role).ok_or_else(|| Error::invalid("role", "must be storage, compute or backup"))?;
    if cert_role(role) != Some(id.role) {
        return Err(Error::PermissionDenied(format!("role: certificate is for {}, not a {column} agent", id.role)));
    }
    if id.name != name {
        return Err(Error::PermissionDenied(format!(
            "name: certificate is for {:?}; it may not act as {name:?}",
            id.name
        )));
    }
    Ok(column)
}

/// The per-row report documents for a registration: one row per backend for storage agents.
fn rows_of(req: &RegisterRequest) -> Result<Vec<(String, String, serde_json::Value)>> {
    if req.role == AgentRole::Storage as i32 && !req.backends.is_empty() {
        let mut rows = Vec::new();
        for b in &req.backends {
            if !valid_name(&b.name) {
                return Err(Error::invalid("backends", format!("backend name {:?} is not valid", b.name)));
            }
            let az = if b.availability_zone.is_empty() {
                req.availability_zone.clone()
            } else {
                b.availability_zone.clone()
            };
            rows.push((b.name.clone(), az, backend_report(b)));
        }
        return Ok(rows);
    }
    let report = match &req.connector {
        Some(c) => {
            let mut report = serde_json::json!({ "connector": { "host": c.host, "ip": c.ip, "initiator": c.initiator, "connection_types": c.connection_types } });
            // Read back by instance placement (`instances::placement`).
            if let Some(cap) = &req.compute_capacity {
                report["capacity"] = serde_json::json!({ "vcpus": cap.vcpus, "memory_mb": cap.memory_mb });
            }
            report
        }
        None => repositories_report(&req.repositories),
    };
    Ok(vec![(String::new(), req.availability_zone.clone(), report)])
}

/// A backup agent's repositories as stored in `services.report`; choosing where a backup goes reads it back
/// (`backups::reported_repositories`).
fn repositories_report(repositories: &[Repository]) -> serde_json::Value {
    let each = |r: &Repository| {
        serde_json::json!({
            "name": r.name, "availability_zone": r.availability_zone,
            "total_bytes": r.total_bytes, "free_bytes": r.free_bytes,
        })
    };
    serde_json::json!({ "repositories": repositories.iter().map(each).collect::<Vec<_>>() })
}

/// A backend's stats as stored in `services.report`; the scheduler reads this back.
pub fn backend_report(b: &Backend) -> serde_json::Value {
    serde_json::json!({
        "driver": b.driver,
        "storage_protocol": b.storage_protocol,
        "vendor_name": b.vendor_name,
        "driver_version": b.driver_version,
        "pools": b.pools.iter().map(|p| serde_json::json!({
            "name": p.name,
            "total_capacity_gb": p.total_capacity_gb,
            "free_capacity_gb": p.free_capacity_gb,
            "provisioned_capacity_gb": p.provisioned_capacity_gb,
            "allocated_capacity_gb": p.allocated_capacity_gb,
            "thin_provisioning_support": p.thin_provisioning_support,
            "thick_provisioning_support": p.thick_provisioning_support,
            "reserved_percentage": p.reserved_percentage,
            "max_over_subscription_ratio": p.max_over_subscription_ratio,
            "multiattach": p.multiattach,
            "capabilities": p.capabilities,
        })).collect::<Vec<_>>(),
    })
}

/// Logs a warning when the certificate an agent registers with (expiring at `expires_ms`; 0 when not known)
/// expires within [`ember_common::own_certificate::EXPIRY_WARNING_DAYS`]: the agent warns daily too, but the
/// coordinator's log is the one place that sees the whole fleet.
pub fn warn_if_expiring(host: &str, role: &str, expires_ms: i64, now_ms: i64) {
    let days_left = ember_common::own_certificate::days_left_if_expiring(expires_ms / 1000, now_ms / 1000);
    if let Some(days_left) = days_left.filter(|_| expires_ms != 0) {
        tracing::warn!(
            %host,
            role,
            days_left,
            "the certificate expires soon: renew it (ember certs renew) and copy the new files over the old ones"
        );
    }
}

impl Registrar {
    async fn register(&self, id: &Identity, req: RegisterRequest, certificate_expiry: Option<i64>) -> Result<()> {
        let role = check_claim(id, &req.name, req.role)?;
        if !(req.endpoint.starts_with("https://") && req.endpoint.len() > 8) {
            return Err(Error::invalid("endpoint", "must be an https:// URL"));
        }
        if req.instance_id.is_empty() || req.instance_id.len() > 64 {
            return Err(Error::invalid("instance_id", "must be 1-64 characters"));
        }
        if !valid_name(&req.availability_zone) {
            return Err(Error::invalid("availability_zone", format!("{:?} is not valid", req.availability_zone)));
        }
        let rows = rows_of(&req)?;
        let now = now_ms();
        let expires_ms = certificate_expiry.map_or(0, |secs| secs.saturating_mul(1000));
        warn_if_expiring(&req.name, role, expires_ms, now);
        let mut tx = crate::db::write(&self.ctx.db).await?;
        // Backends the agent no longer reports go; the rest keep their enabled/disabled state.
        let keep: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let existing: Vec<String> = sqlx::query_scalar("SELECT backend FROM services WHERE host = ? AND role = ?")
            .bind(&req.name)
            .bind(role)
            .fetch_all(&mut *tx)
            .await?;
        for gone in existing.iter().filter(|b| !keep.contains(&b.as_str())) {
            sqlx::query("DELETE FROM services WHERE host = ? AND role = ? AND backend = ?")
                .bind(&req.name)
                .bind(role)
                .bind(gone)
                .execute(&mut *tx)
                .await?;
        }
        for (backend, az, report) in rows {
            sqlx::query(
                "INSERT INTO services (host, role, backend, availability_zone, endpoint, instance_id, version, \
                 api_version, report, created_at, last_heartbeat, certificate_expires_at, crl_number) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (host, role, backend) DO UPDATE SET availability_zone = excluded.availability_zone, \
                 endpoint = excluded.endpoint, instance_id = excluded.instance_id, version = excluded.version, \
                 api_version = excluded.api_version, report = excluded.report, last_heartbeat = excluded.last_heartbeat, \
                 certificate_expires_at = excluded.certificate_expires_at, crl_number = excluded.crl_number",
            )
            .bind(&req.name)
            .bind(role)
            .bind(&backend)
            .bind(&az)
            .bind(&req.endpoint)
            .bind(&req.instance_id)
            .bind(&req.version)
            .bind(&req.api_version)
            .bind(report.to_string())
            .bind(now)
            .bind(now)
            .bind(expires_ms)
            .bind(list_number(req.crl_number))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(host = %req.name, role, instance_id = %req.instance_id, endpoint = %req.endpoint, "agent registered");
        Ok(())
    }

    /// Records a heartbeat, and the certificate the agent presented with it (`certificate_expiry`): an agent
    /// whose certificate was renewed presents the new one on its next connection, without registering again.
    async fn heartbeat(&self, id: &Identity, req: HeartbeatRequest, certificate_expiry: Option<i64>) -> Result<()> {
        let role = check_claim(id, &req.name, req.role)?;
        let now = now_ms();
        let expires_ms = certificate_expiry.map(|secs| secs.saturating_mul(1000));
        let mut tx = crate::db::write(&self.ctx.db).await?;
        let touched = sqlx::query(
            "UPDATE services SET last_heartbeat = ?, certificate_expires_at = COALESCE(?, certificate_expires_at), \
             crl_number = ? WHERE host = ? AND role = ? AND instance_id = ?",
        )
        .bind(now)
        .bind(expires_ms)
        .bind(list_number(req.crl_number))
        .bind(&req.name)
        .bind(role)
        .bind(&req.instance_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if touched == 0 {
            return Err(Error::not_found("service instance", format!("{}/{}", req.name, req.instance_id)));
        }
        for b in &req.backends {
            sqlx::query("UPDATE services SET report = ? WHERE host = ? AND role = ? AND backend = ?")
                .bind(backend_report(b).to_string())
                .bind(&req.name)
                .bind(role)
                .bind(&b.name)
                .execute(&mut *tx)
                .await?;
        }
        // A backup agent's repositories fill up and free up; where the next backup goes depends on it.
        if !req.repositories.is_empty() {
            sqlx::query("UPDATE services SET report = ? WHERE host = ? AND role = ? AND backend = ''")
                .bind(repositories_report(&req.repositories).to_string())
                .bind(&req.name)
                .bind(role)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let id = caller(&req)?.clone();
        let expiry = peer_certificate_expiry(&req);
        let req = req.into_inner();
        let crl = newer_revocations(req.crl_number);
        self.register(&id, req, expiry).await?;
        // An agent registers when it starts: the operations paused while it was away (a delete, the release of a
        // disk a forced detach left) go on now rather than at the next reconcile pass. It serves before it
        // registers, so they reach it.
        tokio::spawn(crate::operations::resume_all(self.ctx.clone()));
        Ok(Response::new(RegisterResponse { heartbeat_interval_seconds: self.heartbeat_interval_seconds, crl }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let id = caller(&req)?.clone();
        let expiry = peer_certificate_expiry(&req);
        let req = req.into_inner();
        let crl = newer_revocations(req.crl_number);
        self.heartbeat(&id, req, expiry).await?;
        Ok(Response::new(HeartbeatResponse { crl }))
    }
}

/// The revocation list in force here (PEM) when it is later than the agent's list number `agent_has`, else empty:
/// revocations reach the agents through the coordinator, so a list copied here is handed on.
fn newer_revocations(agent_has: u64) -> Vec<u8> {
    let list = ember_common::revocation::current();
    if list.number > agent_has { list.pem.clone() } else { Vec::new() }
}

/// A list number as stored (SQLite integers are signed).
fn list_number(number: u64) -> i64 {
    i64::try_from(number).unwrap_or(i64::MAX)
}
