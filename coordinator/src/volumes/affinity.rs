//! Scheduler hints of a create (Cinder's `same_host` / `different_host`): the volumes named are checked when the
//! create is accepted (well-formed ids the caller can see), kept by id in the create operation, and turned into
//! storage hosts each time the scheduler runs, so a volume that moved meanwhile counts where it is now.

use super::store;
use crate::error::{Error, Result};
use crate::validate;
use ember_common::identity::Identity;
use ember_proto::v1::SchedulerHints;

/// The most volumes one hint may name.
const MAX_VOLUMES: usize = 32;

/// Checks each hint names at most [`MAX_VOLUMES`] volumes, each a volume the caller can see. Returns the hints
/// for the create operation's payload.
pub(crate) async fn accept(
    conn: &mut sqlx::SqliteConnection,
    who: &Identity,
    hints: Option<&SchedulerHints>,
) -> Result<serde_json::Value> {
    let Some(hints) = hints else { return Ok(serde_json::json!({})) };
    let named = [
        ("scheduler_hints.same_host", "scheduler_hints.same_host: volume", &hints.same_host),
        ("scheduler_hints.different_host", "scheduler_hints.different_host: volume", &hints.different_host),
    ];
    for (field, kind, ids) in named {
        if ids.len() > MAX_VOLUMES {
            return Err(Error::invalid(field, format!("names {} volumes; at most {MAX_VOLUMES}", ids.len())));
        }
        for id in ids {
            validate::uuid(field, id)?;
            if store::visible(conn, who, id).await.is_err() {
                return Err(Error::not_found(kind, id.as_str()));
            }
        }
    }
    Ok(serde_json::json!({ "same_host": hints.same_host, "different_host": hints.different_host }))
}

/// The storage hosts of the volumes a hint in `payload` (the create operation's `hints`) names: those that still
/// exist and are placed.
pub(crate) async fn hosts(
    conn: &mut sqlx::SqliteConnection,
    payload: &serde_json::Value,
    hint: &str,
) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for id in payload[hint].as_array().into_iter().flatten().filter_map(|v| v.as_str()) {
        if let Some(v) = store::find(conn, id).await?
            && !v.host.is_empty()
            && !hosts.contains(&v.host)
        {
            hosts.push(v.host);
        }
    }
    Ok(hosts)
}
