//! Quota accounting inside the caller's transaction, so usage always equals what exists: a create consumes
//! in the same transaction that inserts the row, a delete releases in the one that removes it, and a change in
//! flight (an extend) holds a reservation that is committed or rolled back with the operation.

use crate::error::{Error, Result};
use crate::quotas::default_limits;
use sqlx::SqliteConnection;
use std::collections::BTreeMap;

/// A change to one quota resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Resource name, e.g. `gigabytes` or `volumes_gold`.
    pub resource: String,
    /// Amount (positive).
    pub amount: i64,
}

/// The deltas of a volume of `size_gb` GiB of type `type_name`.
pub fn volume_deltas(type_name: &str, size_gb: i64) -> Vec<Delta> {
    vec![
        Delta { resource: "volumes".into(), amount: 1 },
        Delta { resource: "gigabytes".into(), amount: size_gb },
        Delta { resource: format!("volumes_{type_name}"), amount: 1 },
        Delta { resource: format!("gigabytes_{type_name}"), amount: size_gb },
    ]
}

/// The deltas of a snapshot of `size_gb` GiB of a volume of type `type_name`.
pub fn snapshot_deltas(type_name: &str, size_gb: i64) -> Vec<Delta> {
    vec![
        Delta { resource: "snapshots".into(), amount: 1 },
        Delta { resource: "gigabytes".into(), amount: size_gb },
        Delta { resource: format!("snapshots_{type_name}"), amount: 1 },
        Delta { resource: format!("gigabytes_{type_name}"), amount: size_gb },
    ]
}

/// The deltas of an instance with `vcpus` virtual CPUs and `memory_mb` MiB of memory.
pub fn instance_deltas(vcpus: u32, memory_mb: u32) -> Vec<Delta> {
    vec![
        Delta { resource: "instances".into(), amount: 1 },
        Delta { resource: "cores".into(), amount: vcpus.into() },
        Delta { resource: "ram".into(), amount: memory_mb.into() },
    ]
}

/// The deltas of a volume of type `type_name` and `size_gb` GiB together with its snapshots (their sizes), one
/// per resource: what moves when the volume changes project or type.
pub fn volume_with_snapshots(type_name: &str, size_gb: i64, snapshot_sizes: &[i64]) -> Vec<Delta> {
    let mut sum: BTreeMap<String, i64> = BTreeMap::new();
    let snapshots = snapshot_sizes.iter().flat_map(|s| snapshot_deltas(type_name, *s));
    for d in volume_deltas(type_name, size_gb).into_iter().chain(snapshots) {
        *sum.entry(d.resource).or_default() += d.amount;
    }
    sum.into_iter().map(|(resource, amount)| Delta { resource, amount }).collect()
}

/// The limit of a resource for a project: admin-set, else configured default, else unlimited.
async fn limit(
    conn: &mut SqliteConnection,
    defaults: &BTreeMap<String, i64>,
    project: &str,
    resource: &str,
) -> Result<i64> {
    let set: Option<i64> = sqlx::query_scalar("SELECT hard_limit FROM quota_limits WHERE project = ? AND resource = ?")
        .bind(project)
        .bind(resource)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(set.or_else(|| defaults.get(resource).copied()).unwrap_or(-1))
}

async fn usage(conn: &mut SqliteConnection, project: &str, resource: &str) -> Result<(i64, i64)> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT in_use, reserved FROM quota_usages WHERE project = ? AND resource = ?")
            .bind(project)
            .bind(resource)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.unwrap_or((0, 0)))
}

async fn check(
    conn: &mut SqliteConnection,
    defaults: &BTreeMap<String, i64>,
    project: &str,
    deltas: &[Delta],
) -> Result<()> {
    for d in deltas {
        let lim = limit(conn, defaults, project, &d.resource).await?;
        if lim < 0 {
            continue;
        }
        let (in_use, reserved) = usage(conn, project, &d.resource).await?;
        if in_use + reserved + d.amount > lim {
            return Err(Error::ResourceExhausted(format!(
                "quota exceeded for {}: requested {}, in use {}, reserved {}, limit {lim}",
                d.resource, d.amount, in_use, reserved
            )));
        }
    }
    Ok(())
}

async fn add(conn: &mut SqliteConnection, project: &str, resource: &str, in_use: i64, reserved: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO quota_usages (project, resource, in_use, reserved) VALUES (?1, ?2, MAX(?3, 0), MAX(?4, 0)) \
         ON CONFLICT (project, resource) DO UPDATE SET in_use = MAX(in_use + ?3, 0), reserved = MAX(reserved + ?4, 0)",
    )
    .bind(project)
    .bind(resource)
    .bind(in_use)
    .bind(reserved)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves the per-type limits and usage of volume type `old` to its new name `new` (a rename), in the caller's
/// transaction: the type's volumes and snapshots are then counted, and limited, under the name they will be
/// released under. Rows left under `new` by a type of that name deleted earlier are dropped first.
pub async fn rename_type(conn: &mut SqliteConnection, old: &str, new: &str) -> Result<()> {
    forget_type(conn, new).await?;
    for prefix in crate::quotas::PER_TYPE_PREFIXES {
        for table in ["quota_limits", "quota_usages"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {table} SET resource = ?1 WHERE resource = ?2")))
                .bind(format!("{prefix}{new}"))
                .bind(format!("{prefix}{old}"))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Drops the per-type limits and usage of volume type `name` (deleted: it holds nothing), so that a type
/// given the same name later starts from the defaults.
pub async fn forget_type(conn: &mut SqliteConnection, name: &str) -> Result<()> {
    for prefix in crate::quotas::PER_TYPE_PREFIXES {
        for table in ["quota_limits", "quota_usages"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE resource = ?")))
                .bind(format!("{prefix}{name}"))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The quota engine: limits with configured defaults.
#[derive(Debug, Clone)]
pub struct QuotaEngine {
    defaults: BTreeMap<String, i64>,
}

impl QuotaEngine {
    /// An engine with configured defaults over the built-in ones.
    pub fn new(configured: &BTreeMap<String, i64>) -> Self {
        QuotaEngine { defaults: default_limits(configured) }
    }

    /// Checks a volume size (`field`, in GiB) against the project's `per_volume_gigabytes` limit.
    pub async fn check_volume_size(
        &self,
        conn: &mut SqliteConnection,
        project: &str,
        field: &str,
        size_gb: u64,
    ) -> Result<()> {
        let lim = limit(conn, &self.defaults, project, "per_volume_gigabytes").await?;
        if lim >= 0 && size_gb > lim as u64 {
            return Err(Error::ResourceExhausted(format!(
                "{field}: {size_gb} GiB is over project {project}'s per_volume_gigabytes limit of {lim}"
            )));
        }
        Ok(())
    }

    /// Checks the limits and counts the resources as in use (they exist from this transaction on).
    pub async fn consume(&self, conn: &mut SqliteConnection, project: &str, deltas: &[Delta]) -> Result<()> {
        check(conn, &self.defaults, project, deltas).await?;
        for d in deltas {
            add(conn, project, &d.resource, d.amount, 0).await?;
        }
        Ok(())
    }

    /// Gives back resources that no longer exist.
    pub async fn release(&self, conn: &mut SqliteConnection, project: &str, deltas: &[Delta]) -> Result<()> {
        for d in deltas {
            add(conn, project, &d.resource, -d.amount, 0).await?;
        }
        Ok(())
    }

    /// Checks the limits and holds the resources for an operation in flight.
    pub async fn reserve(&self, conn: &mut SqliteConnection, project: &str, deltas: &[Delta]) -> Result<()> {
        check(conn, &self.defaults, project, deltas).await?;
        for d in deltas {
            add(conn, project, &d.resource, 0, d.amount).await?;
        }
        Ok(())
    }

    /// Turns a reservation into use.
    pub async fn commit(&self, conn: &mut SqliteConnection, project: &str, deltas: &[Delta]) -> Result<()> {
        for d in deltas {
            add(conn, project, &d.resource, d.amount, -d.amount).await?;
        }
        Ok(())
    }

    /// Drops a reservation.
    pub async fn rollback(&self, conn: &mut SqliteConnection, project: &str, deltas: &[Delta]) -> Result<()> {
        for d in deltas {
            add(conn, project, &d.resource, 0, -d.amount).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_volume_with_snapshots_sums_per_resource() {
        let usage: std::collections::BTreeMap<String, i64> =
            super::volume_with_snapshots("gold", 10, &[10, 10]).into_iter().map(|d| (d.resource, d.amount)).collect();
        assert_eq!(usage["volumes"], 1);
        assert_eq!(usage["snapshots"], 2);
        assert_eq!(usage["gigabytes"], 30);
        assert_eq!(usage["gigabytes_gold"], 30);
        assert_eq!(usage["volumes_gold"], 1);
        assert_eq!(usage["snapshots_gold"], 2);
    }
}
