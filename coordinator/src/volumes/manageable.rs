//! What a pool holds that the coordinator has no record of (Cinder's `manageable-list`): the volumes and
//! snapshots an admin could adopt with `manage`, each with its size, whether it can be adopted as it is, and for
//! a snapshot the volume it was taken of where the backend records it.

use super::manage::{up_pool, whole_gib};
use crate::context::Ctx;
use crate::error::{Error, Result};
use ember_common::identity::{Identity, Role};
use ember_proto::agent::v1 as agent;
use ember_proto::v1::{ListManageableRequest, ListManageableResponse, Manageable};
use std::collections::HashSet;

/// At most this many of each kind are inspected and listed in one answer; a pool holding more unknown files than
/// that has a bigger problem than a long list.
const MOST: usize = 1000;

/// One entry from what the agent said of it: its size, or why it cannot be adopted. `None` when it has gone.
/// `foreign`: ember did not make it, and manage takes it only when asked to take such.
fn entry(id: &str, foreign: bool, inspected: std::result::Result<(u64, String), tonic::Status>) -> Option<Manageable> {
    let (size_bytes, volume_id) = match inspected {
        Ok(facts) => facts,
        Err(s) if s.code() == tonic::Code::NotFound => return None,
        Err(s) => {
            return Some(Manageable {
                id: id.to_string(),
                reason_not_safe: s.message().to_string(),
                foreign,
                ..Default::default()
            });
        }
    };
    let size_gb = whole_gib(size_bytes).unwrap_or(0);
    let reason_not_safe = if size_gb == 0 {
        format!("holds {size_bytes} bytes, not a whole number of GiB")
    } else if foreign {
        "ember did not make it (an LV without the `ember` tag); manage with foreign (--foreign) takes it over".into()
    } else {
        String::new()
    };
    let safe_to_manage = reason_not_safe.is_empty();
    Some(Manageable { id: id.to_string(), size_gb, safe_to_manage, reason_not_safe, volume_id, foreign })
}

/// Lists what pool `req.pool` holds that no volume or snapshot record names.
pub async fn list(ctx: &Ctx, who: &Identity, req: ListManageableRequest) -> Result<ListManageableResponse> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("only admins may list what a pool holds".into()));
    }
    let pool = up_pool(ctx, &req.pool).await?;
    let (host, backend) = (pool.host.as_str(), pool.backend.as_str());
    let mut client = ctx.agents.storage(host).await?;
    let held = client
        .list_resources(agent::ListResourcesRequest { backend: backend.to_string() })
        .await
        .map_err(|s| Error::from_agent(&format!("asking {}", req.pool), &s))?
        .into_inner();
    // What the coordinator knows: its volumes and snapshots, and the temporary snapshots running backups read.
    let known: HashSet<String> = sqlx::query_scalar("SELECT id FROM volumes UNION ALL SELECT id FROM snapshots")
        .fetch_all(&ctx.db)
        .await?
        .into_iter()
        .chain(crate::sweeper::temporary_snapshots(ctx).await?)
        .collect();
    let mut out = ListManageableResponse::default();
    // Ember's own first, then those another system made under ember's naming (Cinder's LVs, say).
    let volumes =
        held.volume_ids.iter().map(|id| (id, false)).chain(held.foreign_volume_ids.iter().map(|id| (id, true)));
    for (id, foreign) in volumes.filter(|(id, _)| !known.contains(*id)).take(MOST) {
        let request =
            agent::InspectVolumeRequest { volume_id: id.clone(), backend: backend.to_string(), allow_foreign: foreign };
        let inspected = client.inspect_volume(request).await.map(|r| (r.get_ref().size_bytes, String::new()));
        out.volumes.extend(entry(id, foreign, inspected));
    }
    let snapshots =
        held.snapshot_ids.iter().map(|id| (id, false)).chain(held.foreign_snapshot_ids.iter().map(|id| (id, true)));
    for (id, foreign) in snapshots.filter(|(id, _)| !known.contains(*id)).take(MOST) {
        let request = agent::InspectSnapshotRequest {
            snapshot_id: id.clone(),
            backend: backend.to_string(),
            allow_foreign: foreign,
        };
        let inspected =
            client.inspect_snapshot(request).await.map(|r| (r.get_ref().size_bytes, r.into_inner().volume_id));
        out.snapshots.extend(entry(id, foreign, inspected));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_say_whether_and_why_not() {
        let whole = entry("v", false, Ok((2 << 30, String::new()))).unwrap();
        assert_eq!((whole.size_gb, whole.safe_to_manage, whole.reason_not_safe.as_str()), (2, true, ""));
        let odd = entry("v", false, Ok(((1 << 30) + 512, String::new()))).unwrap();
        assert!(!odd.safe_to_manage && odd.reason_not_safe.contains("not a whole number"), "{odd:?}");
        let partial = entry("v", false, Err(tonic::Status::failed_precondition("a copy that never finished"))).unwrap();
        assert!(!partial.safe_to_manage && partial.reason_not_safe.contains("never finished"), "{partial:?}");
        assert!(entry("v", false, Err(tonic::Status::not_found("gone"))).is_none());
        let snap = entry("s", false, Ok((1 << 30, "origin".into()))).unwrap();
        assert_eq!(snap.volume_id, "origin");
        let cinders = entry("v", true, Ok((1 << 30, String::new()))).unwrap();
        assert!(cinders.foreign && !cinders.safe_to_manage, "{cinders:?}");
        assert!(cinders.reason_not_safe.contains("--foreign"), "{cinders:?}");
    }
}
