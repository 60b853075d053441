//! Per-project quotas (Cinder's `quota-show` / `quota-update`). Limits come from admin-set rows, else the
//! configured defaults, else the built-in ones. Per-type variants (`volumes_<type>`, `gigabytes_<type>`,
//! `snapshots_<type>`) exist for every volume type and default to unlimited.

use crate::auth::{project_for, require_admin, who};
use crate::error::{Error, Result};
use crate::validate;
use ember_proto::v1::quota_service_server::QuotaService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::collections::BTreeMap;
use tonic::{Request, Response, Status};

/// Resources every project has, with Cinder's default limits (and Nova's for instances, their `cores` and their
/// `ram` in MiB). `per_volume_gigabytes` bounds the size of any one volume; it is checked, never counted.
pub const BASE_RESOURCES: [(&str, i64); 9] = [
    ("volumes", 10),
    ("gigabytes", 1000),
    ("snapshots", 10),
    ("backups", 10),
    ("backup_gigabytes", 1000),
    ("per_volume_gigabytes", -1),
    ("instances", 10),
    ("cores", 20),
    ("ram", 51200),
];

/// Per-type resource prefixes.
pub const PER_TYPE_PREFIXES: [&str; 3] = ["volumes_", "gigabytes_", "snapshots_"];

/// The gRPC service.
pub struct Quotas {
    db: SqlitePool,
    defaults: BTreeMap<String, i64>,
}

impl Quotas {
    /// Serves quotas from `db`, with configured `defaults` over the built-in ones.
    pub fn new(db: SqlitePool, configured: &BTreeMap<String, i64>) -> Self {
        Quotas { db, defaults: default_limits(configured) }
    }
}

/// The built-in defaults with the configured ones applied.
pub fn default_limits(configured: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut limits: BTreeMap<String, i64> = BASE_RESOURCES.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    limits.extend(configured.iter().map(|(k, v)| (k.clone(), *v)));
    limits
}

/// Every resource name valid for these type names.
pub fn resource_names(type_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = BASE_RESOURCES.iter().map(|(k, _)| k.to_string()).collect();
    for t in type_names {
        names.extend(PER_TYPE_PREFIXES.iter().map(|p| format!("{p}{t}")));
    }
    names.sort();
    names
}

/// Reads a project's quota: limits and usage for every resource.
pub async fn read(conn: &mut SqliteConnection, defaults: &BTreeMap<String, i64>, project: &str) -> Result<Quota> {
    let types: Vec<String> = sqlx::query_scalar("SELECT name FROM volume_types").fetch_all(&mut *conn).await?;
    let set: BTreeMap<String, i64> = sqlx::query("SELECT resource, hard_limit FROM quota_limits WHERE project = ?")
        .bind(project)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let usage: BTreeMap<String, (i64, i64)> =
        sqlx::query("SELECT resource, in_use, reserved FROM quota_usages WHERE project = ?")
            .bind(project)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
    let items = resource_names(&types)
        .into_iter()
        .map(|resource| {
            let limit = set.get(&resource).or(defaults.get(&resource)).copied().unwrap_or(-1);
            let (in_use, reserved) = usage.get(&resource).copied().unwrap_or((0, 0));
            QuotaItem { resource, limit, in_use, reserved }
        })
        .collect();
    Ok(Quota { project: project.to_string(), items })
}

impl Quotas {
    async fn set(&self, req: SetQuotaRequest) -> Result<Quota> {
        validate::project("project", &req.project)?;
        if req.limits.is_empty() {
            return Err(Error::invalid("limits", "must name at least one resource"));
        }
        let mut tx = crate::db::write(&self.db).await?;
        let current = read(&mut tx, &self.defaults, &req.project).await?;
        for (resource, limit) in &req.limits {
            let item = current
                .items
                .iter()
                .find(|i| &i.resource == resource)
                .ok_or_else(|| Error::invalid("limits", format!("unknown quota resource {resource:?}")))?;
            if *limit < -1 {
                return Err(Error::invalid("limits", format!("{resource}: limit must be -1 (unlimited) or more")));
            }
            if *limit != -1 && *limit < item.in_use + item.reserved {
                return Err(Error::invalid(
                    "limits",
                    format!("{resource}: limit {limit} is below current usage {}", item.in_use + item.reserved),
                ));
            }
        }
        for (resource, limit) in &req.limits {
            sqlx::query(
                "INSERT INTO quota_limits (project, resource, hard_limit) VALUES (?, ?, ?) \
                 ON CONFLICT (project, resource) DO UPDATE SET hard_limit = excluded.hard_limit",
            )
            .bind(&req.project)
            .bind(resource)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
        }
        let updated = read(&mut tx, &self.defaults, &req.project).await?;
        tx.commit().await?;
        tracing::info!(project = %req.project, limits = ?req.limits, "quota limits set");
        Ok(updated)
    }
}

#[tonic::async_trait]
impl QuotaService for Quotas {
    async fn get_quota(&self, req: Request<GetQuotaRequest>) -> Result<Response<Quota>, Status> {
        let id = who(&req)?;
        let project = project_for(&id, &req.get_ref().project)?;
        validate::project("project", &project)?;
        let mut conn = self.db.acquire().await.map_err(Error::from)?;
        Ok(Response::new(read(&mut conn, &self.defaults, &project).await?))
    }

    async fn set_quota(&self, req: Request<SetQuotaRequest>) -> Result<Response<Quota>, Status> {
        require_admin(&req, "set quotas")?;
        Ok(Response::new(self.set(req.into_inner()).await?))
    }

    async fn check_quota_usage(
        &self,
        req: Request<CheckQuotaUsageRequest>,
    ) -> Result<Response<CheckQuotaUsageResponse>, Status> {
        require_admin(&req, "check quota usage")?;
        let r = req.into_inner();
        if !r.project.is_empty() {
            validate::project("project", &r.project)?;
        }
        let mut tx = crate::db::write(&self.db).await.map_err(Error::from)?;
        let (drifts, projects) = crate::quota_check::check(&mut tx, &r.project, r.fix).await?;
        let fixed = r.fix && !drifts.is_empty();
        if fixed {
            tx.commit().await.map_err(Error::from)?;
        }
        Ok(Response::new(CheckQuotaUsageResponse { drifts, fixed, projects }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_defaults() {
        let names = resource_names(&["gold".into()]);
        assert!(names.contains(&"gigabytes_gold".to_string()));
        assert!(names.contains(&"volumes".to_string()));
        let mut cfg = BTreeMap::new();
        cfg.insert("volumes".to_string(), 3);
        let d = default_limits(&cfg);
        assert_eq!(d["volumes"], 3);
        assert_eq!(d["gigabytes"], 1000);
    }
}
