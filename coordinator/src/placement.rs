//! Where an instance goes: a compute host that is up and enabled and has room for it (Nova's compute, CPU and
//! RAM filters), the one running the fewest instances. Room is what the host's agent offers (its CPUs and memory
//! after allocation ratios and reserved memory, `services.report.capacity`) less what the instances placed
//! there have, whatever their status. A host whose agent reports no capacity is not limited.

use crate::clock::now_ms;
use crate::error::{Error, Result};
use ember_proto::v1::ComputeHostUsage;
use sqlx::{Row, SqliteConnection};

/// A compute host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeHost {
    /// Host name.
    pub host: String,
    /// Heartbeating and not disabled.
    pub available: bool,
    /// Its capacity and use.
    pub usage: ComputeHostUsage,
}

/// The compute hosts (only `only_host` when not empty), by name.
pub async fn compute_hosts(
    conn: &mut SqliteConnection,
    only_host: &str,
    down_after_ms: i64,
) -> Result<Vec<ComputeHost>> {
    let rows = sqlx::query(
        "SELECT s.host, s.enabled = 1 AND s.last_heartbeat >= ?2, \
                COALESCE(json_extract(s.report, '$.capacity.vcpus'), 0), \
                COALESCE(json_extract(s.report, '$.capacity.memory_mb'), 0), \
                COUNT(i.id), COALESCE(SUM(i.vcpus), 0), COALESCE(SUM(i.memory_mb), 0) \
         FROM services s LEFT JOIN instances i ON i.host = s.host \
         WHERE s.role = 'compute' AND (?1 = '' OR s.host = ?1) GROUP BY s.host ORDER BY s.host",
    )
    .bind(only_host)
    .bind(now_ms() - down_after_ms)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| ComputeHost {
            host: r.get(0),
            available: r.get::<bool, _>(1),
            usage: ComputeHostUsage {
                instances: r.get::<i64, _>(4) as u32,
                vcpus: r.get::<i64, _>(2) as u32,
                vcpus_used: r.get::<i64, _>(5) as u32,
                memory_mb: r.get::<i64, _>(3) as u64,
                memory_mb_used: r.get::<i64, _>(6) as u64,
            },
        })
        .collect())
}

/// Why `usage` has no room for an instance of `vcpus` and `memory_mb`; `None` when it has (or reports no
/// capacity).
pub fn lacks_room(usage: &ComputeHostUsage, vcpus: u32, memory_mb: u64) -> Option<String> {
    let free_vcpus = usage.vcpus.saturating_sub(usage.vcpus_used);
    let free_memory = usage.memory_mb.saturating_sub(usage.memory_mb_used);
    if usage.vcpus > 0 && vcpus > free_vcpus {
        return Some(format!("{free_vcpus} of {} vCPUs free, {vcpus} needed", usage.vcpus));
    }
    if usage.memory_mb > 0 && memory_mb > free_memory {
        return Some(format!("{free_memory} of {} MiB of memory free, {memory_mb} needed", usage.memory_mb));
    }
    None
}

/// The host for an instance of `vcpus` and `memory_mb` among `hosts`: `wanted` if named (it must exist and have
/// room; an admin may place on a host that is disabled or down), else the available host with room running the
/// fewest instances.
pub fn choose(hosts: &[ComputeHost], wanted: &str, vcpus: u32, memory_mb: u64) -> Result<String> {
    if !wanted.is_empty() {
        let h = hosts.iter().find(|h| h.host == wanted).ok_or_else(|| Error::not_found("compute host", wanted))?;
        return match lacks_room(&h.usage, vcpus, memory_mb) {
            Some(why) => Err(Error::ResourceExhausted(format!("host: compute host {wanted} has no room: {why}"))),
            None => Ok(h.host.clone()),
        };
    }
    let available: Vec<&ComputeHost> = hosts.iter().filter(|h| h.available).collect();
    if available.is_empty() {
        return Err(Error::FailedPrecondition("no compute host is up and enabled".into()));
    }
    let fitting = available.iter().filter(|h| lacks_room(&h.usage, vcpus, memory_mb).is_none());
    match fitting.min_by_key(|h| (h.usage.instances, h.host.as_str())) {
        Some(h) => Ok(h.host.clone()),
        None => {
            let why: Vec<String> = available
                .iter()
                .filter_map(|h| lacks_room(&h.usage, vcpus, memory_mb).map(|w| format!("{}: {w}", h.host)))
                .collect();
            Err(Error::ResourceExhausted(format!(
                "no compute host has room for {vcpus} vCPUs and {memory_mb} MiB ({})",
                why.join("; ")
            )))
        }
    }
}

/// [`choose`] over the hosts as the database has them now.
pub async fn place(
    conn: &mut SqliteConnection,
    wanted: &str,
    vcpus: u32,
    memory_mb: u64,
    down_after_ms: i64,
) -> Result<String> {
    choose(&compute_hosts(conn, wanted, down_after_ms).await?, wanted, vcpus, memory_mb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, available: bool, instances: u32, vcpus: (u32, u32), memory: (u64, u64)) -> ComputeHost {
        ComputeHost {
            host: name.into(),
            available,
            usage: ComputeHostUsage {
                instances,
                vcpus: vcpus.0,
                vcpus_used: vcpus.1,
                memory_mb: memory.0,
                memory_mb_used: memory.1,
            },
        }
    }

    #[test]
    fn room_counts_vcpus_and_memory_and_an_unreported_capacity_is_unlimited() {
        let h = host("a", true, 1, (4, 3), (1024, 512)).usage;
        assert_eq!(lacks_room(&h, 1, 512), None);
        assert_eq!(lacks_room(&h, 2, 64).unwrap(), "1 of 4 vCPUs free, 2 needed");
        assert_eq!(lacks_room(&h, 1, 513).unwrap(), "512 of 1024 MiB of memory free, 513 needed");
        assert_eq!(lacks_room(&host("b", true, 9, (0, 40), (0, 99_999)).usage, 16, 65_536), None);
        let overcommitted = host("c", true, 2, (2, 3), (1024, 2048)).usage;
        assert_eq!(lacks_room(&overcommitted, 1, 64).unwrap(), "0 of 2 vCPUs free, 1 needed");
    }

    #[test]
    fn the_least_busy_available_host_with_room_is_chosen() {
        let hosts = [
            host("a", true, 1, (2, 2), (4096, 512)),
            host("b", true, 2, (8, 2), (4096, 1024)),
            host("c", false, 0, (8, 0), (4096, 0)),
            host("d", true, 3, (8, 2), (4096, 1024)),
        ];
        assert_eq!(choose(&hosts, "", 1, 512).unwrap(), "b", "a is full, c is down, d is busier");
        assert_eq!(choose(&hosts, "c", 1, 512).unwrap(), "c", "named: down or disabled is the admin's call");
        let full = choose(&hosts, "a", 1, 64).unwrap_err().to_string();
        assert!(full.contains("compute host a has no room: 0 of 2 vCPUs free"), "{full}");
        assert!(matches!(choose(&hosts, "zz", 1, 64), Err(Error::NotFound { .. })));
        let none = choose(&hosts, "", 7, 64).unwrap_err().to_string();
        assert!(
            none.contains("no compute host has room for 7 vCPUs") && none.contains("b: 6 of 8 vCPUs free"),
            "{none}"
        );
        let down = choose(&hosts[2..3], "", 1, 64).unwrap_err().to_string();
        assert!(down.contains("no compute host is up and enabled"), "{down}");
    }
}
