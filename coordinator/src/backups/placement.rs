//! Where a new backup goes: a repository of an up, enabled backup agent, in the zone the create asked for, or
//! else in the volume's availability zone when there is one there, with the most free space. Agents report
//! each repository's zone and space at registration and with every heartbeat.

use crate::context::Ctx;
use crate::error::{Error, Result};
use sqlx::{Row, SqliteConnection};

/// One repository as a backup agent's stored report describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedRepository {
    /// Repository name, unique on its agent.
    pub name: String,
    /// Availability zone it serves.
    pub availability_zone: String,
    /// Size of its filesystem; 0 when the agent could not tell.
    pub total_bytes: u64,
    /// Space left on its filesystem.
    pub free_bytes: u64,
}

impl ReportedRepository {
    /// Reports a size and no space left. (A repository whose size is unknown is not taken for full.)
    fn is_full(&self) -> bool {
        self.total_bytes > 0 && self.free_bytes == 0
    }
}

/// The repositories in a backup agent's stored report.
pub fn reported_repositories(report: &str) -> Result<Vec<ReportedRepository>> {
    let report: serde_json::Value = serde_json::from_str(report)?;
    let text = |repo: &serde_json::Value, key: &str| repo[key].as_str().unwrap_or_default().to_string();
    Ok(report["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|repo| ReportedRepository {
            name: text(repo, "name"),
            availability_zone: text(repo, "availability_zone"),
            total_bytes: repo["total_bytes"].as_u64().unwrap_or(0),
            free_bytes: repo["free_bytes"].as_u64().unwrap_or(0),
        })
        .collect())
}

/// Picks from `candidates` (agent host, repository), in host order, where a backup goes. `zone` is a zone the
/// backup must go to (`strict`), or the volume's zone, preferred. Among the repositories that are not full,
/// those in `zone` (only those when `strict`; else all when there are none), and of those the one with the most
/// free space, the first on a tie. `None` when there is none.
pub fn pick<'a>(
    candidates: &'a [(String, ReportedRepository)],
    zone: &str,
    strict: bool,
) -> Option<&'a (String, ReportedRepository)> {
    let open: Vec<_> = candidates.iter().filter(|(_, r)| !r.is_full()).collect();
    let in_zone: Vec<_> = open.iter().copied().filter(|(_, r)| r.availability_zone == zone).collect();
    let pool = if in_zone.is_empty() && !strict { open } else { in_zone };
    // max_by_key keeps the last of equals; walk backwards so that the first wins a tie.
    pool.into_iter().rev().max_by_key(|(_, r)| r.free_bytes)
}

/// Chooses the agent host and repository for a new backup: of a volume in `zone`, or, when `strict`, one that
/// must go to `zone` (which the caller asked for in `availability_zone`).
pub async fn choose_repository(
    ctx: &Ctx,
    conn: &mut SqliteConnection,
    zone: &str,
    strict: bool,
) -> Result<(String, ReportedRepository)> {
    let rows =
        sqlx::query("SELECT host, report, last_heartbeat, enabled FROM services WHERE role = 'backup' ORDER BY host")
            .fetch_all(&mut *conn)
            .await?;
    let now = crate::clock::now_ms();
    let (mut candidates, mut zone_known) = (Vec::new(), false);
    for r in rows {
        let host: String = r.get(0);
        let repositories = reported_repositories(r.get::<&str, _>(1))?;
        zone_known |= repositories.iter().any(|repo| repo.availability_zone == zone);
        if r.get::<i64, _>(3) != 0 && crate::fleet::is_up(r.get(2), now, ctx.service_down_ms) {
            candidates.extend(repositories.into_iter().map(|repo| (host.clone(), repo)));
        }
    }
    if strict && !zone_known {
        return Err(Error::invalid("availability_zone", format!("{zone:?} is not a zone with a backup repository")));
    }
    if let Some((host, repo)) = pick(&candidates, zone, strict) {
        return Ok((host.clone(), repo.clone()));
    }
    let considered: Vec<_> = candidates.iter().filter(|(_, r)| !strict || r.availability_zone == zone).collect();
    let place = if strict { format!(" in zone {zone}") } else { String::new() };
    if considered.is_empty() {
        return Err(Error::FailedPrecondition(format!("no backup repository{place} is up and enabled")));
    }
    Err(Error::ResourceExhausted(format!(
        "every backup repository{place} that is up and enabled is full: {}",
        considered.iter().map(|(h, r)| format!("{h}@{}", r.name)).collect::<Vec<_>>().join(", ")
    )))
}

/// Repository `host@repository` as its backup agent last reported it (`None`: not reported), up or not.
pub async fn reported(conn: &mut SqliteConnection, host: &str, repository: &str) -> Result<Option<ReportedRepository>> {
    let report: Option<String> = sqlx::query_scalar("SELECT report FROM services WHERE host = ? AND role = 'backup'")
        .bind(host)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(report) = report else { return Ok(None) };
    Ok(reported_repositories(&report)?.into_iter().find(|r| r.name == repository))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(host: &str, name: &str, zone: &str, total: u64, free: u64) -> (String, ReportedRepository) {
        let r = ReportedRepository {
            name: name.into(),
            availability_zone: zone.into(),
            total_bytes: total,
            free_bytes: free,
        };
        (host.into(), r)
    }

    fn picked(candidates: &[(String, ReportedRepository)], az: &str) -> Option<String> {
        pick(candidates, az, false).map(|(h, r)| format!("{h}@{}", r.name))
    }

    #[test]
    fn the_zone_first_then_the_most_free_space_and_never_a_full_repository() {
        let fleet = [
            repo("b1", "r1", "nova", 100, 10),
            repo("b2", "r2", "nova", 100, 60),
            repo("b3", "r3", "east", 100, 90),
            repo("b4", "r4", "nova", 100, 0),
        ];
        assert_eq!(picked(&fleet, "nova").as_deref(), Some("b2@r2"), "most free in the zone");
        assert_eq!(picked(&fleet, "east").as_deref(), Some("b3@r3"));
        assert_eq!(picked(&fleet, "west").as_deref(), Some("b3@r3"), "no repository in the zone: any, most free");
        let full_zone = [repo("b1", "r1", "nova", 100, 0), repo("b3", "r3", "east", 100, 5)];
        assert_eq!(picked(&full_zone, "nova").as_deref(), Some("b3@r3"), "the zone's only one is full");
        assert_eq!(picked(&[repo("b1", "r1", "nova", 100, 0)], "nova"), None, "full everywhere");
        assert_eq!(picked(&[], "nova"), None);
    }

    #[test]
    fn a_zone_asked_for_is_the_only_one_considered() {
        let fleet =
            [repo("b1", "r1", "nova", 100, 90), repo("b2", "r2", "east", 100, 10), repo("b3", "r3", "east", 100, 0)];
        let strict = |az: &str| pick(&fleet, az, true).map(|(h, r)| format!("{h}@{}", r.name));
        assert_eq!(strict("east").as_deref(), Some("b2@r2"), "less room, but in the zone asked for");
        assert_eq!(strict("west"), None, "no repository there: no fallback to another zone");
        assert_eq!(pick(&fleet[2..], "east", true), None, "the zone's only repository is full");
    }

    #[test]
    fn ties_go_to_the_first_and_an_unknown_size_is_not_full() {
        let tie = [repo("b1", "r1", "nova", 100, 50), repo("b2", "r2", "nova", 100, 50)];
        assert_eq!(picked(&tie, "nova").as_deref(), Some("b1@r1"));
        let unknown = [repo("b1", "r1", "nova", 0, 0)];
        assert_eq!(picked(&unknown, "nova").as_deref(), Some("b1@r1"), "statvfs failed: still usable");
    }

    #[test]
    fn a_stored_report_reads_back_and_older_reports_lack_the_sizes() {
        let report = r#"{"repositories":[{"name":"r1","availability_zone":"nova","total_bytes":100,"free_bytes":7},
                                          {"name":"r2","availability_zone":"east"}]}"#;
        let repos = reported_repositories(report).unwrap();
        assert_eq!(repos[0], repo("", "r1", "nova", 100, 7).1);
        assert_eq!(repos[1], repo("", "r2", "east", 0, 0).1);
    }
}
