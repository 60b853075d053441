//! Finished operations are kept as the history the orphan sweeper reads (which files this coordinator made),
//! and purged once older than `operations_retention_days` (90 by default), so the table does not grow forever.
//! A purge only ever makes the sweeper more careful: a file whose history is gone is reported and left alone,
//! never removed.

use ember_fleet_tests::volumes::{new_volume, wait_backend, wait_gone, wait_left_alone};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use sqlx::sqlite::SqliteConnectOptions;
use std::time::Duration;

const DAY_MS: i64 = 86_400_000;

/// The operations recorded for resource `id`, as (kind, state).
async fn history(fleet: &Fleet, id: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, state FROM operations WHERE resource_id = ? ORDER BY created_at, rowid")
        .bind(id)
        .fetch_all(&fleet.db().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn finished_operations_are_purged_after_the_retention_and_their_files_are_then_left_alone() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let delete = |id: &str| DeleteVolumeRequest { id: id.into(), ..Default::default() };
    let (kept, old_gone, new_gone) =
        (new_volume(&volumes, 1).await, new_volume(&volumes, 1).await, new_volume(&volumes, 1).await);
    for v in [&old_gone, &new_gone] {
        volumes.clone().delete_volume(delete(&v.id)).await.unwrap();
        wait_gone(&volumes, &v.id).await;
    }
    assert_eq!(history(&fleet, &old_gone.id).await.len(), 2, "create and delete are recorded");

    // The operations of two of them finished 100 days ago; the coordinator purges them when it starts.
    let options = SqliteConnectOptions::new().filename(fleet.database());
    let db = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(
        "UPDATE operations SET created_at = created_at - ?1, updated_at = updated_at - ?1 WHERE resource_id IN (?2, ?3)",
    )
    .bind(100 * DAY_MS)
    .bind(&kept.id)
    .bind(&old_gone.id)
    .execute(&db)
    .await
    .unwrap();
    db.close().await;
    fleet.start_coordinator();
    wait_for("the old operations to be purged", Duration::from_secs(30), || async {
        history(&fleet, &old_gone.id).await.is_empty().then_some(())
    })
    .await;
    assert!(history(&fleet, &kept.id).await.is_empty(), "every operation older than 90 days goes");
    assert_eq!(history(&fleet, &new_gone.id).await.len(), 2, "recent ones stay");
    let log = fleet.coordinator.as_ref().unwrap().log_text();
    assert!(log.contains("finished operations purged purged=3 retention_days=90"), "{log}");

    // A volume without history is served as before.
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: kept.id.clone() }).await.unwrap().into_inner();
    assert_eq!(shown.status, "available");

    // Leftover files of both deleted volumes turn up on the backend (a delete lost on the node, say): the one
    // with history is this coordinator's orphan and is removed; the one whose history was purged is reported
    // and left alone, for an admin to look at.
    let (old_file, new_file) =
        (dir.join(format!("volume-{}", old_gone.id)), dir.join(format!("volume-{}", new_gone.id)));
    std::fs::write(&old_file, b"left over").unwrap();
    std::fs::write(&new_file, b"left over").unwrap();
    wait_for("the orphan with history to be removed", Duration::from_secs(30), || async {
        (!new_file.exists()).then_some(())
    })
    .await;
    wait_left_alone(&fleet, &old_gone.id).await;
    assert_eq!(std::fs::read(&old_file).unwrap(), b"left over");

    // And deleting the volume without history works, recording new history.
    volumes.clone().delete_volume(delete(&kept.id)).await.unwrap();
    wait_gone(&volumes, &kept.id).await;
    assert!(!dir.join(format!("volume-{}", kept.id)).exists());
    assert_eq!(history(&fleet, &kept.id).await, [("delete_volume".to_string(), "done".to_string())]);
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
