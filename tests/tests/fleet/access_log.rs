//! The access log: every call a daemon serves is logged with its caller, its method, its outcome and a request id
//! that the caller receives, refused calls included.

use ember_common::identity::Role;
use ember_fleet_tests::volumes::{wait_backend, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

/// The request id a response or an error status carries.
fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    let id = metadata.get("x-request-id").expect("an x-request-id").to_str().unwrap().to_string();
    assert!(id.starts_with("req-") && uuid::Uuid::parse_str(&id[4..]).is_ok(), "{id}");
    id
}

/// The access-log line of call `id` in `log`, once it is there.
async fn logged_call(log: impl Fn() -> String, id: &str) -> String {
    wait_for(&format!("call {id} in the log"), Duration::from_secs(10), || {
        let text = log();
        let line = text.lines().find(|l| l.contains(&format!("request_id={id} ")) && l.contains(" call "));
        std::future::ready(line.map(str::to_string))
    })
    .await
}

/// The access-log line of the first `method` call in storage agent log `log`.
fn agent_call(log: &str, method: &str) -> String {
    let method = format!("method=ember.agent.v1.StorageAgent/{method} ");
    let line = log.lines().find(|l| l.contains(" call ") && l.contains(&method));
    line.unwrap_or_else(|| panic!("no {method} call in the storage agent's log:\n{log}")).to_string()
}

#[tokio::test]
async fn every_call_is_logged_with_its_caller_its_outcome_and_a_request_id_the_caller_gets() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let coordinator_log = || fleet.coordinator.as_ref().unwrap().log_text();

    // A member's create: the caller gets the id, and the coordinator's line names the member and the outcome.
    let mut alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let created = alice
        .create_volume(CreateVolumeRequest { size_gb: 1, name: "audited".into(), ..Default::default() })
        .await
        .unwrap();
    let create_id = request_id(created.metadata());
    let volume = wait_volume(&alice, &created.into_inner().id, "available").await;
    let line = logged_call(coordinator_log, &create_id).await;
    for field in ["method=ember.v1.VolumeService/CreateVolume", "caller=alice", "role=member", "project=p1", "code=OK"]
    {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    // What the handler logged while serving the call carries the same request id.
    let handler_lines: Vec<String> = coordinator_log()
        .lines()
        .filter(|l| l.contains(&format!("request_id={create_id}")) && l.contains(&volume.id))
        .map(str::to_string)
        .collect();
    assert!(handler_lines.iter().any(|l| l.contains("volume create accepted")), "{handler_lines:?}");

    // Another project's member is refused, and the refusal is logged with who tried.
    let mut bob = VolumeServiceClient::new(fleet.member("bob", "p2"));
    let refused =
        bob.delete_volume(DeleteVolumeRequest { id: volume.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let refused_id = request_id(refused.metadata());
    let line = logged_call(coordinator_log, &refused_id).await;
    for field in ["method=ember.v1.VolumeService/DeleteVolume", "caller=bob", "project=p2", "code=NOT_FOUND"] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert_eq!(wait_volume(&alice, &volume.id, "available").await.status, "available");

    // A call refused for its role is logged too.
    let agent_cert = fleet.issue(Role::StorageAgent, "intruder", None);
    let mut intruder = VolumeServiceClient::new(fleet.channel(&agent_cert));
    let refused = intruder.list_volumes(ListVolumesRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let line = logged_call(coordinator_log, &request_id(refused.metadata())).await;
    assert!(line.contains("caller=intruder") && line.contains("role=storage-agent"), "{line}");
    assert!(line.contains("code=PERMISSION_DENIED"), "{line}");

    // The CLI prints the request id with an error, and the operator finds the call by it.
    let bob_cert = fleet.issue(Role::Member, "bob", Some("p2"));
    let (ok, _, stderr) = fleet.cli_as(&bob_cert, &["volume", "delete", &volume.id]);
    assert!(!ok);
    let shown = stderr.split("(request ").nth(1).and_then(|rest| rest.split(')').next()).expect(&stderr).to_string();
    let line = logged_call(coordinator_log, &shown).await;
    assert!(line.contains("caller=bob") && line.contains("code=NOT_FOUND"), "{line}");

    // The storage agent logs the coordinator's calls the same way, under the id of the request they serve: the
    // create's operation made the call after the create was answered.
    let line = agent_call(&storage.log_text(), "CreateVolume");
    assert!(
        line.contains("caller=coordinator") && line.contains("role=coordinator") && line.contains("code=OK"),
        "{line}"
    );
    assert!(line.contains(&format!("request_id={create_id} ")), "{line}");

    // A member cannot choose the id its call is logged under.
    let mut forged = tonic::Request::new(GetVolumeRequest { id: volume.id.clone() });
    forged.metadata_mut().insert("x-request-id", "req-forged".parse().unwrap());
    let answered = alice.get_volume(forged).await.unwrap();
    assert_ne!(request_id(answered.metadata()), "req-forged");
    assert!(!coordinator_log().contains("req-forged"));

    // A caller that gives up before the answer (the storage node is frozen, so the export waits on it) is
    // logged too, as CANCELLED.
    storage.signal("STOP");
    let export = InitializeConnectionRequest {
        volume_id: volume.id.clone(),
        connector: Some(Connector { initiator: "iqn.2026-11.test:impatient".into(), ..Default::default() }),
    };
    let gave_up = tokio::time::timeout(Duration::from_millis(500), alice.clone().initialize_connection(export)).await;
    assert!(gave_up.is_err(), "the frozen node cannot have answered: {gave_up:?}");
    let line = wait_for("the abandoned call in the log", Duration::from_secs(10), || {
        let log = coordinator_log();
        let line = log
            .lines()
            .find(|l| l.contains(" call ") && l.contains("VolumeService/InitializeConnection"))
            .map(str::to_string);
        std::future::ready(line)
    })
    .await;
    assert!(line.contains("caller=alice") && line.contains("code=CANCELLED"), "{line}");
    storage.signal("CONT");

    // Logs written to a file carry no terminal colour codes.
    assert!(!coordinator_log().contains('\u{1b}'));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// An operation keeps the id of the request that recorded it: after a crash, the restarted coordinator's calls
/// for it still carry that id.
#[tokio::test]
async fn an_operation_resumed_after_a_crash_calls_agents_under_its_requests_id() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "create_volume.scheduled")]);
    let (backend, _dir) = fleet.file_backend("file1", "");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let created = VolumeServiceClient::new(fleet.admin())
        .create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() })
        .await
        .unwrap();
    let create_id = request_id(created.metadata());
    let id = created.into_inner().id;
    assert!(!fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30)).success());
    let recorded: String = sqlx::query_scalar("SELECT request_id FROM operations WHERE resource_id = ?")
        .bind(&id)
        .fetch_one(&fleet.db().await)
        .await
        .unwrap();
    assert_eq!(recorded, create_id);

    fleet.start_coordinator();
    wait_volume(&VolumeServiceClient::new(fleet.admin()), &id, "available").await;
    let line = agent_call(&storage.log_text(), "CreateVolume");
    assert!(line.contains(&format!("request_id={create_id} ")) && line.contains("code=OK"), "{line}");
    let coordinator_log = fleet.coordinator.as_ref().unwrap().log_text();
    assert!(
        coordinator_log
            .lines()
            .any(|l| l.contains(&format!("request_id={create_id}")) && l.contains("operation finished")),
        "the resumed worker logs under the request's id:\n{coordinator_log}"
    );
}
