//! `ember-coordinator backup-db`: a copy of the coordinator's database taken while it serves, creates running,
//! and a coordinator started again on that copy after the database is lost. What the copy holds is served as
//! it was (a create it caught half-way resumes); what was made after it is left alone, data intact, for an
//! admin to adopt; and a copy never overwrites a file.

use ember_fleet_tests::volumes::{new_volume, usage, wait_backend, wait_left_alone, wait_volume};
use ember_fleet_tests::{Fleet, bin};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::process::Command;
use tonic::Code;

#[tokio::test]
async fn a_database_copy_taken_while_serving_brings_the_fleet_back_after_the_database_is_lost() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let kept = new_volume(&volumes, 1).await;

    // The copy, while four creates run.
    let copy = fleet.dir.path().join("copy.db");
    let backup_db = {
        let (db, copy) = (fleet.database(), copy.clone());
        move || Command::new(bin("ember-coordinator")).arg("--database").arg(&db).arg("backup-db").arg(&copy).output()
    };
    let creates: Vec<_> = (0..4)
        .map(|_| {
            let mut c = volumes.clone();
            tokio::spawn(async move {
                c.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap().into_inner().id
            })
        })
        .collect();
    let out = tokio::task::spawn_blocking(backup_db.clone()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("integrity ok") && stdout.contains("master.key"), "{stdout}");
    let mut made = vec![kept.id.clone()];
    for c in creates {
        made.push(c.await.unwrap());
    }
    for id in &made {
        wait_volume(&volumes, id, "available").await;
    }
    let later = new_volume(&volumes, 1).await;
    made.push(later.id.clone());

    // A copy never overwrites.
    let before = std::fs::read(&copy).unwrap();
    let again = backup_db().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"), "{again:?}");
    assert_eq!(std::fs::read(&copy).unwrap(), before, "the first copy is untouched");

    // The database is lost; the coordinator starts again on the copy.
    fleet.coordinator.as_mut().unwrap().kill();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", fleet.database().display()));
    }
    std::fs::copy(&copy, fleet.database()).unwrap();
    fleet.start_coordinator();
    wait_backend(&fleet, "storage1@file1").await;

    // Each volume the copy holds is served (one it caught in `creating` resumes); the others are left alone.
    let mut held = 0;
    for id in &made {
        match volumes.clone().get_volume(GetVolumeRequest { id: id.clone() }).await {
            Ok(_) => {
                wait_volume(&volumes, id, "available").await;
                held += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                wait_left_alone(&fleet, id).await;
            }
        }
        assert!(dir.join(format!("volume-{id}")).exists(), "the data of {id} is still there");
    }
    assert!(held >= 1, "the copy holds the volume made before it");
    wait_volume(&volumes, &kept.id, "available").await;
    let err = volumes.clone().get_volume(GetVolumeRequest { id: later.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "made after the copy: {err:?}");
    assert_eq!(usage(&fleet, "p1", "volumes").await, held, "the quota counts what the copy holds");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
