//! Checking recorded quota usage against what exists (Cinder's `cinder-manage quota check|sync`). Usage is
//! counted in the transaction of every change, so the two should never differ; this is how an operator proves
//! it, or finds and corrects what a bug (or a database edited by hand) left.

use crate::error::Result;
use ember_proto::v1::QuotaDrift;
use sqlx::SqliteConnection;
use std::collections::BTreeMap;

/// Usage per `(project, resource)`.
type Usage = BTreeMap<(String, String), i64>;

/// What exists, per project and resource, counted the way each change counts it: volumes and snapshots (and
/// their gigabytes, in total and per type), backups and their gigabytes, instances with their cores and ram.
async fn counted(conn: &mut SqliteConnection) -> Result<Usage> {
    let mut usage = Usage::new();
    let mut add = |project: String, resource: String, amount: i64| {
        *usage.entry((project, resource)).or_default() += amount;
    };
    let volumes: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT v.project, t.name, v.size_gb FROM volumes v JOIN volume_types t ON t.id = v.volume_type_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (project, type_name, size_gb) in volumes {
        for d in crate::quota::volume_deltas(&type_name, size_gb) {
            add(project.clone(), d.resource, d.amount);
        }
    }
    let snapshots: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT s.project, t.name, s.size_gb FROM snapshots s JOIN volumes v ON v.id = s.volume_id \
         JOIN volume_types t ON t.id = v.volume_type_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (project, type_name, size_gb) in snapshots {
        for d in crate::quota::snapshot_deltas(&type_name, size_gb) {
            add(project.clone(), d.resource, d.amount);
        }
    }
    let backups: Vec<(String, i64)> =
        sqlx::query_as("SELECT project, size_gb FROM backups").fetch_all(&mut *conn).await?;
    for (project, size_gb) in backups {
        for d in crate::backups::deltas(size_gb) {
            add(project.clone(), d.resource, d.amount);
        }
    }
    let instances: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT project, vcpus, memory_mb FROM instances").fetch_all(&mut *conn).await?;
    for (project, vcpus, memory_mb) in instances {
        for d in crate::quota::instance_deltas(vcpus as u32, memory_mb as u32) {
            add(project.clone(), d.resource, d.amount);
        }
    }
    Ok(usage)
}

/// What the usage records say (`in_use`).
async fn recorded(conn: &mut SqliteConnection) -> Result<Usage> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT project, resource, in_use FROM quota_usages").fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().map(|(p, r, n)| ((p, r), n)).collect())
}

/// Where `recorded` and `counted` differ (a missing entry is 0), for `project` (or every project when empty).
pub fn differences(recorded: &Usage, counted: &Usage, project: &str) -> Vec<QuotaDrift> {
    let keys: std::collections::BTreeSet<&(String, String)> = recorded.keys().chain(counted.keys()).collect();
    keys.into_iter()
        .filter(|(p, _)| project.is_empty() || p == project)
        .filter_map(|key| {
            let (r, c) = (recorded.get(key).copied().unwrap_or(0), counted.get(key).copied().unwrap_or(0));
            (r != c).then(|| QuotaDrift { project: key.0.clone(), resource: key.1.clone(), recorded: r, counted: c })
        })
        .collect()
}

/// Compares the records with what exists in `conn` (a write transaction, so that nothing changes meanwhile)
/// and, with `fix`, sets each differing record to what exists. Returns the differences and the number of
/// projects looked at.
pub async fn check(conn: &mut SqliteConnection, project: &str, fix: bool) -> Result<(Vec<QuotaDrift>, u32)> {
    let (recorded, counted) = (recorded(conn).await?, counted(conn).await?);
    let drifts = differences(&recorded, &counted, project);
    let projects: std::collections::BTreeSet<&String> =
        recorded.keys().chain(counted.keys()).map(|(p, _)| p).filter(|p| project.is_empty() || *p == project).collect();
    if fix {
        for d in &drifts {
            sqlx::query(
                "INSERT INTO quota_usages (project, resource, in_use, reserved) VALUES (?1, ?2, ?3, 0) \
                 ON CONFLICT (project, resource) DO UPDATE SET in_use = ?3",
            )
            .bind(&d.project)
            .bind(&d.resource)
            .bind(d.counted)
            .execute(&mut *conn)
            .await?;
            tracing::warn!(project = %d.project, resource = %d.resource, recorded = d.recorded, counted = d.counted, "quota usage corrected");
        }
    }
    Ok((drifts, projects.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_differences_are_reported() {
        let key = |p: &str, r: &str| (p.to_string(), r.to_string());
        let recorded: Usage = [(key("a", "volumes"), 2), (key("a", "gigabytes"), 0), (key("b", "volumes"), 1)].into();
        let counted: Usage = [(key("a", "volumes"), 2), (key("b", "volumes"), 3), (key("b", "snapshots"), 1)].into();
        let found: Vec<_> = differences(&recorded, &counted, "")
            .into_iter()
            .map(|d| (d.project, d.resource, d.recorded, d.counted))
            .collect();
        assert_eq!(
            found,
            [("b".into(), "snapshots".into(), 0, 1), ("b".into(), "volumes".into(), 1, 3)]
                as [(String, String, i64, i64); 2]
        );
        assert!(differences(&recorded, &counted, "a").is_empty());
    }
}
