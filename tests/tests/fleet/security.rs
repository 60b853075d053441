//! mTLS and authorization: who may call what, and project isolation, against the real coordinator and agents.

use ember_common::certs::{IssueRequest, init_ca, issue};
use ember_common::identity::{Identity, Role};
use ember_common::tls::TlsFiles;
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::agent::v1::registration_client::RegistrationClient;
use ember_proto::agent::v1::storage_agent_client::StorageAgentClient;
use ember_proto::agent::v1::{AgentRole, ListResourcesRequest, RegisterRequest};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn register_as(name: &str, role: AgentRole) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        role: role as i32,
        endpoint: "https://127.0.0.1:1".into(),
        instance_id: "test-instance".into(),
        version: "test".into(),
        api_version: "v1".into(),
        availability_zone: "nova".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn connections_without_a_fleet_certificate_are_refused() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();

    // No client certificate at all.
    let ca = std::fs::read(fleet.ca_dir().join("ca.pem")).unwrap();
    let no_cert = Endpoint::from_shared(fleet.coordinator_url())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect_lazy();
    let err = FleetServiceClient::new(no_cert).list_services(ListServicesRequest::default()).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_ne!(err.code(), Code::PermissionDenied, "refused at the TLS layer, not by the handler: {err:?}");

    // An admin certificate from another CA.
    let other = fleet.subdir("other-ca");
    init_ca(&other, "impostor CA").unwrap();
    let req = IssueRequest {
        identity: Identity { role: Role::Admin, name: "admin".into(), project: None },
        dns: vec![],
        ips: vec![],
        days: 1,
    };
    issue(&other, &req, &other, "admin").unwrap();
    let impostor = TlsFiles {
        ca: fleet.ca_dir().join("ca.pem"),
        cert: other.join("admin.pem"),
        key: other.join("admin.key"),
        crl: None,
    };
    let err = FleetServiceClient::new(fleet.channel(&impostor))
        .list_services(ListServicesRequest::default())
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_ne!(err.code(), Code::PermissionDenied, "{err:?}");

    // The real admin gets through on the same coordinator.
    FleetServiceClient::new(fleet.admin()).list_services(ListServicesRequest::default()).await.expect("admin call");
}

#[tokio::test]
async fn roles_are_confined_to_their_apis() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let dir = fleet.subdir("b");
    let storage = fleet.start_agent(
        "storage",
        "storage1",
        &format!("[[backends]]\nname = \"b1\"\ndriver = \"file\"\ndirectory = \"{}\"\n", dir.display()),
    );

    // A member certificate calling an agent API.
    let member = fleet.issue(Role::Member, "alice", Some("proj-a"));
    let err = StorageAgentClient::new(member.channel(&storage.url()).unwrap())
        .list_resources(ListResourcesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("role member"), "{}", err.message());
    // ...while the coordinator's certificate reaches it.
    let coordinator = fleet.tls("coordinator-coordinator");
    let held = StorageAgentClient::new(coordinator.channel(&storage.url()).unwrap())
        .list_resources(ListResourcesRequest::default())
        .await
        .expect("the coordinator may call the storage agent")
        .into_inner();
    assert!(held.volume_ids.is_empty() && held.snapshot_ids.is_empty());

    // An agent certificate calling the public admin API.
    let agent = fleet.tls("storage-agent-storage1");
    let err =
        FleetServiceClient::new(fleet.channel(&agent)).list_services(ListServicesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A member calling admin-only calls.
    let err = FleetServiceClient::new(fleet.channel(&member))
        .disable_service(DisableServiceRequest { name: "storage1@b1".into(), reason: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = VolumeTypeServiceClient::new(fleet.channel(&member))
        .create_volume_type(CreateVolumeTypeRequest { name: "mine".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // An agent registering under another agent's name, or as another role; an admin registering at all.
    let mut registration = RegistrationClient::new(fleet.channel(&agent));
    let err = registration.register(register_as("storage2", AgentRole::Storage)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("storage2"), "{}", err.message());
    let err = registration.register(register_as("storage1", AgentRole::Compute)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err =
        RegistrationClient::new(fleet.admin()).register(register_as("admin", AgentRole::Storage)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // None of the refused registrations left a row behind.
    let list = wait_for("the real agent's row", Duration::from_secs(20), || async {
        let list = FleetServiceClient::new(fleet.admin())
            .list_services(ListServicesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .services;
        (!list.is_empty()).then_some(list)
    })
    .await;
    let names: Vec<_> = list.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["storage1@b1"]);
}

#[tokio::test]
async fn members_see_and_touch_only_their_own_project() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let admin = fleet.admin();
    QuotaServiceClient::new(admin.clone())
        .set_quota(SetQuotaRequest { project: "proj-b".into(), limits: [("volumes".to_string(), 3)].into() })
        .await
        .expect("admin sets B's quota");

    let mut alice = QuotaServiceClient::new(fleet.member("alice", "proj-a"));
    let mut bob = QuotaServiceClient::new(fleet.member("bob", "proj-b"));
    let volumes = |q: &Quota| q.items.iter().find(|i| i.resource == "volumes").unwrap().limit;

    let own = alice.get_quota(GetQuotaRequest::default()).await.unwrap().into_inner();
    assert_eq!(own.project, "proj-a");
    assert_eq!(volumes(&own), 10, "A keeps the default");
    let err = alice.get_quota(GetQuotaRequest { project: "proj-b".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = alice
        .set_quota(SetQuotaRequest { project: "proj-a".into(), limits: [("volumes".to_string(), 99)].into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let theirs = bob.get_quota(GetQuotaRequest::default()).await.unwrap().into_inner();
    assert_eq!(theirs.project, "proj-b");
    assert_eq!(volumes(&theirs), 3);

    // Members see no services; admins see the list.
    let err = FleetServiceClient::new(fleet.member("alice", "proj-a"))
        .list_services(ListServicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Members may read volume types.
    let types = VolumeTypeServiceClient::new(fleet.member("alice", "proj-a"))
        .list_volume_types(ListVolumeTypesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(types.volume_types.len(), 1);

    // The CLI says the same, in one line with the status.
    let alice_tls = fleet.issue(Role::Member, "alice", Some("proj-a"));
    let (ok, _, err) = fleet.cli_as(&alice_tls, &["quota", "show", "proj-b"]);
    assert!(!ok);
    assert!(err.starts_with("ember: PERMISSION_DENIED: project proj-b"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `ember certs revoke`: within seconds the coordinator and the agents refuse every call from a revoked
/// certificate, on connections opened before, and go on serving every other one. A list the fleet CA did not
/// sign lifts nothing in a running daemon and stops one that is starting.
#[tokio::test]
async fn a_revoked_certificate_is_refused_by_the_coordinator_and_the_agents() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let storage = fleet.start_agent("storage", "storage1", &fleet.file_backend("b1", "").0);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let alice_tls = fleet.issue(Role::Member, "alice", Some("p1"));
    let alice = VolumeServiceClient::new(fleet.channel(&alice_tls));
    let bob = VolumeServiceClient::new(fleet.member("bob", "p1"));
    alice.clone().list_volumes(ListVolumesRequest::default()).await.expect("alice, before");
    // A coordinator certificate of a host since retired still reaches the agents.
    let retired = fleet.issue(Role::Coordinator, "old-coordinator", None);
    let from_retired = StorageAgentClient::new(retired.channel(&storage.url()).unwrap());
    from_retired.clone().list_resources(ListResourcesRequest::default()).await.expect("retired, before");

    let ca_dir = fleet.ca_dir();
    let args = ["certs", "revoke", "--dir", ca_dir.to_str().unwrap()];
    let (ok, out, err) =
        fleet.cli(&[&args[..], &[alice_tls.cert.to_str().unwrap(), retired.cert.to_str().unwrap()]].concat());
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("member alice (project p1)") && out.contains("coordinator old-coordinator"), "{out}");
    assert!(out.contains("now revokes 2 certificate(s)"), "{out}");

    let refused = |e: &tonic::Status| e.code() == Code::Unauthenticated && e.message().contains("is revoked");
    let err = wait_for("the coordinator refuses alice", Duration::from_secs(30), || async {
        alice.clone().list_volumes(ListVolumesRequest::default()).await.err().filter(refused)
    })
    .await;
    assert!(err.message().contains("member alice"), "{err:?}");
    let err = wait_for("the storage agent refuses the retired coordinator", Duration::from_secs(30), || async {
        from_retired.clone().list_resources(ListResourcesRequest::default()).await.err().filter(refused)
    })
    .await;
    assert!(err.message().contains("coordinator old-coordinator"), "{err:?}");
    let err = VolumeServiceClient::new(fleet.channel(&alice_tls))
        .create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert!(refused(&err), "a new connection is refused too: {err:?}");
    let volumes = fleet.db().await;
    let made: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes").fetch_one(&volumes).await.unwrap();
    assert_eq!(made, 0, "a refused call changes nothing");

    // Everyone else is served: bob, the admin, and the fleet's coordinator at the agent.
    bob.clone().list_volumes(ListVolumesRequest::default()).await.expect("bob");
    FleetServiceClient::new(fleet.admin()).list_services(ListServicesRequest::default()).await.expect("admin");
    StorageAgentClient::new(fleet.tls("coordinator-coordinator").channel(&storage.url()).unwrap())
        .list_resources(ListResourcesRequest::default())
        .await
        .expect("the fleet's coordinator");

    // A revoked agent can no longer heartbeat: the coordinator shows it down, and gives it no work.
    // By name, as the CA recorded it: no certificate file needed.
    let (ok, out, err) = fleet.cli(&[&args[..], &["--name", "storage1"]].concat());
    assert!(
        ok && out.contains("storage-agent storage1") && out.contains("now revokes 3 certificate(s)"),
        "{out}\n{err}"
    );
    ember_fleet_tests::backups::wait_down(&fleet, "storage1@b1").await;
    let (ok, out, err) = fleet.cli(&["--json", "certs", "list", "--dir", ca_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let state = |name: &str| listed.iter().find(|c| c["name"] == name).map(|c| c["state"].clone());
    assert_eq!(state("alice"), Some("revoked".into()));
    assert_eq!(state("storage1"), Some("revoked".into()));
    assert_eq!(state("bob"), Some("valid".into()));
    assert!(storage.log_text().contains("is revoked"), "the agent's log says why");

    // A list from another CA: the running coordinator keeps the good one (alice stays refused), and an agent
    // starting with it stops, saying why.
    let other = fleet.subdir("other-ca");
    init_ca(&other, "impostor CA").unwrap();
    let req = IssueRequest {
        identity: Identity { role: Role::Member, name: "x".into(), project: Some("p1".into()) },
        dns: vec![],
        ips: vec![],
        days: 1,
    };
    let (x, _) = issue(&other, &req, &other, "x").unwrap();
    let forged = ember_common::certs::revoke(&other, &[x], &[], &[]).unwrap().crl;
    std::fs::copy(&forged, fleet.crl()).unwrap();
    let coordinator = fleet.coordinator.as_ref().unwrap();
    wait_for("the coordinator refuses the forged list", Duration::from_secs(30), || async {
        coordinator.log_text().contains("certificate revocation list refused").then_some(())
    })
    .await;
    let err = alice.clone().list_volumes(ListVolumesRequest::default()).await.unwrap_err();
    assert!(refused(&err), "the last good list stays in force: {err:?}");
    let (status, log) = fleet.agent_refusing_to_start("backup", "backup1", "", Duration::from_secs(30));
    assert!(!status.success());
    assert!(log.contains("not by the fleet CA"), "{log}");
}

/// A daemon checks the list as a client too: an agent does not register with a coordinator whose certificate is
/// revoked (a retired coordinator host, or one whose key was lost, cannot collect the fleet's agents), and says
/// why in its log.
#[tokio::test]
async fn an_agent_refuses_a_coordinator_whose_certificate_is_revoked() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let ca_dir = fleet.ca_dir();
    let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), "--name", "coordinator"]);
    assert!(ok && out.contains("coordinator coordinator"), "{out}\n{err}");

    let storage = fleet.start_agent("storage", "storage1", &fleet.file_backend("b1", "").0);
    wait_for("the agent to refuse the coordinator", Duration::from_secs(30), || async {
        let log = storage.log_text();
        (log.contains("refusing a server whose certificate is revoked") && log.contains("registration failed"))
            .then_some(())
    })
    .await;
    let services = FleetServiceClient::new(fleet.admin())
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert!(services.iter().all(|s| s.host != "storage1"), "registered anyway: {services:?}");
    let coordinator_log = fleet.coordinator.as_ref().unwrap().log_text();
    assert!(!coordinator_log.contains("Registration/Register caller=storage1"), "{coordinator_log}");
}

/// What the daemons keep of tenants' data and secrets is readable by their own user only: volume and snapshot
/// files, the export state (CHAP secrets), backup chunks and manifests, the database. A volume file left
/// readable by others (made by an older version) is made private when the storage agent starts.
#[tokio::test]
async fn the_daemons_files_are_private_to_their_user() {
    use ember_fleet_tests::backups::{OneSite, fill, wait_backup_settled};
    use ember_fleet_tests::volumes::{new_snapshot, new_volume, wait_backend};
    use ember_proto::v1::backup_service_client::BackupServiceClient;
    use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    /// Every file under `dir` that a group or others may read, with its mode.
    fn readable_by_others(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let (path, meta) = (entry.path(), entry.metadata().unwrap());
            if meta.is_dir() {
                found.extend(readable_by_others(&path));
            } else if meta.permissions().mode() & 0o077 != 0 {
                found.push((path, meta.permissions().mode() & 0o777));
            }
        }
        found
    }

    let mut site = OneSite::start().await;
    let fleet = &site.fleet;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let old = new_volume(&volumes, 1).await;
    let old_file = site.dir.join(format!("volume-{}", old.id));
    std::fs::set_permissions(&old_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let v = new_volume(&volumes, 1).await;
    let file = site.dir.join(format!("volume-{}", v.id));
    fill(&file, 0, 9, 1 << 20);
    new_snapshot(&SnapshotServiceClient::new(fleet.admin()), &v.id).await;
    let export = InitializeConnectionRequest {
        volume_id: v.id.clone(),
        connector: Some(Connector { initiator: "iqn.2026-11.test:h".into(), ..Default::default() }),
    };
    volumes.clone().initialize_connection(export).await.unwrap();
    let backups = BackupServiceClient::new(fleet.admin());
    let req = CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(req).await.unwrap().into_inner();
    assert_eq!(wait_backup_settled(&backups, &b.id).await.status, "available");

    assert_eq!(mode(&file), 0o600);
    let state = fleet.subdir("state-storage1");
    assert_eq!(mode(&state.join("exports.json")), 0o600, "it holds CHAP secrets");
    assert_eq!(mode(&fleet.database()), 0o600);
    assert!(site.repo.join("chunks").exists());
    assert_eq!(readable_by_others(&site.repo), [], "the backup repository");
    assert_eq!(readable_by_others(&state), []);
    assert_eq!(readable_by_others(&site.dir), [(old_file.clone(), 0o644)], "only the file made readable by hand");

    site.storage.terminate();
    site.storage = fleet.start_agent("storage", "storage1", &site.backend);
    wait_backend(fleet, "storage1@file1").await;
    assert_eq!(mode(&old_file), 0o600, "made private at the agent's start");
    assert_eq!(readable_by_others(&site.dir), []);
}

/// A revocation also ends the calls its certificate still has running, which the check at each call's start
/// cannot: a backup agent's ReadVolume of a tenant's volume (which would otherwise stream on to its end) and
/// WriteVolume into one, and a member's WatchVolume, end with UNAUTHENTICATED; the written volume stays marked
/// incomplete, and the access log records the calls so. Everyone else's calls run on.
#[tokio::test]
async fn a_revocation_ends_the_calls_its_certificate_has_running() {
    use ember_proto::agent::v1::{ReadVolumeRequest, VolumeChunk};
    use std::os::unix::fs::FileExt;
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("b1", "");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let carol_tls = fleet.issue(Role::Member, "carol", Some("p1"));
    let carol = VolumeServiceClient::new(fleet.channel(&carol_tls));
    let read = ember_fleet_tests::volumes::new_volume(&carol, 1).await;
    let written = ember_fleet_tests::volumes::new_volume(&carol, 1).await;
    // 128 MiB of data: far more than the connection's windows and the agent's read-ahead hold.
    const DATA: usize = 128 << 20;
    let data: Vec<u8> = (0..DATA).map(|i| (i % 251) as u8 + 1).collect();
    let file = std::fs::OpenOptions::new().write(true).open(dir.join(format!("volume-{}", read.id))).unwrap();
    file.write_all_at(&data, 0).unwrap();

    // A backup agent's certificate (its key leaked, say) reads one volume and writes another.
    let leaked = fleet.issue(Role::BackupAgent, "backup9", None);
    let agent = StorageAgentClient::new(leaked.channel(&storage.url()).unwrap());
    let read_request =
        ReadVolumeRequest { id: read.id.clone(), backend: "b1".into(), chunk_size: 1 << 20, ..Default::default() };
    let mut reading = agent.clone().read_volume(read_request.clone()).await.unwrap().into_inner();
    let mut received = reading.message().await.unwrap().expect("a first chunk").data.len();
    let (chunks, rx) = tokio::sync::mpsc::channel(4);
    let first =
        VolumeChunk { volume_id: written.id.clone(), backend: "b1".into(), volume_size: 1 << 30, ..Default::default() };
    chunks.send(first).await.unwrap();
    chunks.send(VolumeChunk { data: vec![7u8; 1 << 20].into(), ..Default::default() }).await.unwrap();
    let writing = tokio::spawn({
        let agent = agent.clone();
        async move { agent.clone().write_volume(tokio_stream::wrappers::ReceiverStream::new(rx)).await }
    });
    let incomplete = dir.join(format!(".incomplete-volume-{}", written.id));
    wait_for("the write to begin", Duration::from_secs(30), || async { incomplete.exists().then_some(()) }).await;

    let ca_dir = fleet.ca_dir();
    let revoke = |cert: &std::path::Path| {
        let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), cert.to_str().unwrap()]);
        assert!(ok && out.contains("now revokes"), "{out}\n{err}");
    };
    revoke(&leaked.cert);
    let revoked = |e: &tonic::Status| e.code() == Code::Unauthenticated && e.message().contains("revoked");
    wait_for("the storage agent to refuse the revoked backup agent", Duration::from_secs(30), || async {
        agent.clone().read_volume(read_request.clone()).await.err().filter(revoked)
    })
    .await;
    let bound = Duration::from_secs(30);
    let during =
        |e: &tonic::Status, who: &str| revoked(e) && e.message().contains(&format!("{who} was revoked during"));
    let err = tokio::time::timeout(bound, writing).await.expect("the write ends").unwrap().unwrap_err();
    assert!(during(&err, "backup-agent backup9"), "{err:?}");
    assert!(incomplete.exists(), "the cut write leaves the volume marked incomplete");
    let err = loop {
        match tokio::time::timeout(bound, reading.message()).await.expect("the read ends") {
            Ok(Some(chunk)) => received += chunk.data.len(),
            Ok(None) => panic!("the revoked reader got the whole volume ({received} bytes)"),
            Err(e) => break e,
        }
    };
    assert!(during(&err, "backup-agent backup9"), "{err:?}");
    assert!(received < DATA, "the read stopped short: {received} of {DATA} bytes");
    drop(chunks);
    let log = storage.log_text();
    for method in ["ReadVolume", "WriteVolume"] {
        assert!(
            log.lines().any(|l| l.contains(method) && l.contains("backup9") && l.contains("code=UNAUTHENTICATED")),
            "the access log records the cut {method}"
        );
    }

    // A member's watch of a volume being deleted (which waits for its storage node, stopped here). Stopped off
    // the runtime, which keeps this test's connections answering the agent while it shuts down.
    drop((agent, reading));
    let mut storage = storage;
    tokio::task::spawn_blocking(move || storage.terminate()).await.unwrap();
    carol.clone().delete_volume(DeleteVolumeRequest { id: read.id.clone(), ..Default::default() }).await.unwrap();
    let mut carols_watch =
        carol.clone().watch_volume(GetVolumeRequest { id: read.id.clone() }).await.unwrap().into_inner();
    assert_eq!(carols_watch.message().await.unwrap().unwrap().status, "deleting");
    let admin = VolumeServiceClient::new(fleet.admin());
    let mut admins_watch =
        admin.clone().watch_volume(GetVolumeRequest { id: read.id.clone() }).await.unwrap().into_inner();
    assert_eq!(admins_watch.message().await.unwrap().unwrap().status, "deleting");
    revoke(&carol_tls.cert);
    let err = tokio::time::timeout(bound, carols_watch.message()).await.expect("the watch ends").unwrap_err();
    assert!(during(&err, "member carol"), "{err:?}");
    // The admin's watch runs on, to the volume's end.
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let end = tokio::time::timeout(Duration::from_secs(60), admins_watch.message()).await.expect("the delete ends");
    assert!(matches!(end, Ok(None)), "the admin's watch ends with the volume: {end:?}");
}

/// The coordinator checks an agent's certificate against the list as a client too, and not only on its first
/// connection: once the storage agent's certificate is revoked, an export (which sends the volume's CHAP
/// secret) is refused although the coordinator already had a connection to that agent, and nothing reaches it.
#[tokio::test]
async fn the_coordinator_sends_nothing_to_an_agent_revoked_after_it_connected() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let storage = fleet.start_agent("storage", "storage1", &fleet.file_backend("b1", "").0);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = ember_fleet_tests::volumes::new_volume(&volumes, 1).await;
    let export = |initiator: &str| InitializeConnectionRequest {
        volume_id: v.id.clone(),
        connector: Some(Connector { initiator: initiator.into(), ..Default::default() }),
    };
    let before = "iqn.2026-11.org.example:before";
    volumes.clone().initialize_connection(export(before)).await.expect("exported before the revocation");
    let exports_sent = || {
        storage
            .log_text()
            .lines()
            .filter(|l| l.contains("access_log: call") && l.contains("StorageAgent/ExportVolume"))
            .count()
    };
    assert_eq!(exports_sent(), 1);

    let ca_dir = fleet.ca_dir();
    let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), "--name", "storage1"]);
    assert!(ok && out.contains("storage-agent storage1"), "{out}\n{err}");
    let coordinator = fleet.coordinator.as_ref().unwrap();
    wait_for("the coordinator to put the new list in force", Duration::from_secs(30), || async {
        coordinator.log_text().contains("new certificate revocation list in force").then_some(())
    })
    .await;
    let err = volumes.clone().initialize_connection(export("iqn.2026-11.org.example:after")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("exporting on storage1"), "{err:?}");
    assert!(coordinator.log_text().contains("refusing a server whose certificate is revoked"));
    assert_eq!(exports_sent(), 1, "no export reached the revoked agent");
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    let initiators: Vec<&str> = shown.exports.iter().map(|e| e.initiator.as_str()).collect();
    assert_eq!(initiators, [before], "the refused export is not recorded");
}

/// An agent checks the coordinator's certificate again when the list changes, not only when it first connects:
/// once the coordinator's certificate is revoked, the agent stops reporting to it (on the connection it already
/// had), says why in its log, and goes down in the coordinator's view.
#[tokio::test]
async fn an_agent_stops_reporting_to_a_coordinator_revoked_after_it_registered() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let storage = fleet.start_agent("storage", "storage1", &fleet.file_backend("b1", "").0);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let ca_dir = fleet.ca_dir();
    let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), "--name", "coordinator"]);
    assert!(ok && out.contains("coordinator coordinator"), "{out}\n{err}");
    wait_for("the agent to refuse the coordinator", Duration::from_secs(30), || async {
        storage.log_text().contains("refusing a server whose certificate is revoked").then_some(())
    })
    .await;
    ember_fleet_tests::backups::wait_down(&fleet, "storage1@b1").await;
}

/// Renewing certificates needs no restart: `ember certs renew`, the new files copied over the old ones, and
/// within seconds the coordinator and the agent present the new certificates on new connections, and the
/// service list and the metrics show the new expiry dates. The old certificates can then be revoked at once
/// and the fleet works on: the same agent process keeps reporting, and a volume is created through both.
#[tokio::test]
async fn certificates_renewed_in_place_are_taken_up_without_a_restart() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let storage = fleet.start_agent("storage", "storage1", &fleet.file_backend("b1", "").0);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let storage_service = || async {
        let listed = FleetServiceClient::new(fleet.admin()).list_services(ListServicesRequest::default()).await;
        listed.unwrap().into_inner().services.into_iter().find(|s| s.name == "storage1@b1").expect("listed")
    };
    let registered = storage_service().await;
    // (serial, not after) of a certificate file.
    let certificate = |path: &std::path::Path| {
        let der = ember_common::revocation::pem_block(&std::fs::read(path).unwrap(), "CERTIFICATE").unwrap();
        let cert = X509Certificate::from_der(&der).unwrap().1;
        (cert.tbs_certificate.serial.to_bytes_be(), cert.validity().not_after.timestamp())
    };

    let (ca_dir, old) = (fleet.ca_dir(), fleet.subdir("old"));
    let mut renewed = Vec::new();
    for (stem, name) in [("storage-agent-storage1", "storage1"), ("coordinator-coordinator", "coordinator")] {
        let in_place = fleet.tls(stem);
        let kept = old.join(format!("{name}.pem"));
        std::fs::copy(&in_place.cert, &kept).unwrap();
        let out = fleet.subdir(&format!("renewed-{name}"));
        let (ca, to) = (ca_dir.to_str().unwrap(), out.to_str().unwrap());
        let (ok, said, err) = fleet.cli(&["certs", "renew", "--dir", ca, "--name", name, "--days", "90", "--out", to]);
        assert!(ok && said.contains(&format!("{name} for 90 days")), "{said}\n{err}");
        // The key first: a daemon looking between the two copies sees a pair that does not match, and keeps
        // the old one until it does.
        std::fs::copy(out.join(format!("{name}.key")), &in_place.key).unwrap();
        std::fs::copy(out.join(format!("{name}.pem")), &in_place.cert).unwrap();
        let (old_serial, old_expiry) = certificate(&kept);
        let (serial, expiry) = certificate(&in_place.cert);
        assert!(serial != old_serial && expiry >= old_expiry + 87 * 86_400, "{name}: {expiry} vs {old_expiry}");
        renewed.push((kept, serial, expiry));
    }
    let [(old_storage, storage_serial, storage_expiry), (old_coordinator, coordinator_serial, coordinator_expiry)] =
        <[_; 2]>::try_from(renewed).unwrap();

    // Each daemon presents its new certificate: to a client connecting now, and to those it calls.
    let served_to_admin = |url: String| {
        let admin = fleet.tls("admin-admin");
        async move {
            let (channel, accepted) = admin.channel_noting_server(&url, Duration::from_secs(10)).unwrap();
            let _ = StorageAgentClient::new(channel).list_resources(ListResourcesRequest::default()).await;
            accepted.lock().unwrap().clone()
        }
    };
    wait_for("the coordinator to serve its renewed certificate", Duration::from_secs(30), || async {
        (served_to_admin(fleet.coordinator_url()).await == Some(coordinator_serial.clone())).then_some(())
    })
    .await;
    wait_for("the storage agent to serve its renewed certificate", Duration::from_secs(30), || async {
        (served_to_admin(registered.endpoint.clone()).await == Some(storage_serial.clone())).then_some(())
    })
    .await;
    wait_for("the agent to report with its renewed certificate", Duration::from_secs(30), || async {
        let s = storage_service().await;
        (s.certificate_expires_at.map(|t| t.seconds) == Some(storage_expiry)).then_some(())
    })
    .await;
    let (ok, metrics, err) = fleet.cli(&["metrics"]);
    let sample = format!("ember_coordinator_certificate_expiry_timestamp_seconds {coordinator_expiry}");
    assert!(ok && metrics.lines().any(|l| l == sample), "{sample} missing:\n{metrics}\n{err}");

    // The old certificates revoked, the fleet works on with the new ones.
    let (ca, s, c) = (ca_dir.to_str().unwrap(), old_storage.to_str().unwrap(), old_coordinator.to_str().unwrap());
    let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca, s, c]);
    assert!(ok && out.contains("now revokes 2 certificate(s)"), "{out}\n{err}");
    let coordinator = fleet.coordinator.as_ref().unwrap();
    wait_for("both daemons to put the new list in force", Duration::from_secs(30), || async {
        let in_force = |log: String| log.contains("new certificate revocation list in force");
        (in_force(coordinator.log_text()) && in_force(storage.log_text())).then_some(())
    })
    .await;
    let revoked_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = ember_fleet_tests::volumes::new_volume(&volumes, 1).await;
    assert_eq!(v.status, "available", "{v:?}");
    let reporting = wait_for("the agent to heartbeat after the revocation", Duration::from_secs(30), || async {
        let s = storage_service().await;
        (s.last_heartbeat.as_ref().is_some_and(|t| t.seconds > revoked_at)).then_some(s)
    })
    .await;
    assert!(reporting.up && reporting.instance_id == registered.instance_id, "the same agent: {reporting:?}");
    assert!(!storage.is_stopped());
    let log = storage.log_text();
    assert!(log.contains("presenting a renewed certificate"), "{log}");
    let troubles = ["refusing a server whose certificate is revoked", "registration failed", "heartbeat failed"];
    assert!(!troubles.iter().any(|t| log.contains(t)), "{log}");
}

/// A revocation reaches every agent through the coordinator: an agent with no list file of its own is handed the
/// coordinator's list with a heartbeat, checks the fleet CA's signature on it, and refuses the certificate it
/// revokes. Operators copy the list to the coordinator; the agents follow.
#[tokio::test]
async fn a_revocation_copied_to_the_coordinator_reaches_the_agents() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let storage = fleet.start_agent_without_crl("storage", "storage1", &fleet.file_backend("b1", "").0);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let retired = fleet.issue(Role::Coordinator, "old-coordinator", None);
    let from_retired = StorageAgentClient::new(retired.channel(&storage.url()).unwrap());
    from_retired.clone().list_resources(ListResourcesRequest::default()).await.expect("retired, before");

    let ca_dir = fleet.ca_dir();
    let (ok, out, err) =
        fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), retired.cert.to_str().unwrap()]);
    assert!(ok && out.contains("now revokes 1 certificate(s)"), "{out}\n{err}");
    let refused = |e: &tonic::Status| e.code() == Code::Unauthenticated && e.message().contains("is revoked");
    wait_for("the storage agent to refuse the retired coordinator", Duration::from_secs(30), || async {
        from_retired.clone().list_resources(ListResourcesRequest::default()).await.err().filter(refused)
    })
    .await;
    let log = storage.log_text();
    assert!(log.contains("new certificate revocation list in force, from the coordinator number=1"), "{log}");
    // The service list shows which list each agent has, so an operator sees the revocation reach it.
    wait_for("the agent to report the list it has", Duration::from_secs(30), || async {
        let listed = FleetServiceClient::new(fleet.admin()).list_services(ListServicesRequest::default()).await;
        let services = listed.unwrap().into_inner().services;
        services.iter().any(|s| s.name == "storage1@b1" && s.revocation_list_number == 1).then_some(())
    })
    .await;
    let (ok, out, err) = fleet.cli(&["service", "list"]);
    let row: Vec<String> = out
        .lines()
        .find(|l| l.contains("storage1@b1"))
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert!(ok && out.contains(" CRL ") && row.last().map(String::as_str) == Some("1"), "{out}\n{err}");
    // The fleet's own coordinator is still served, and the agent still reports to it.
    StorageAgentClient::new(fleet.tls("coordinator-coordinator").channel(&storage.url()).unwrap())
        .list_resources(ListResourcesRequest::default())
        .await
        .expect("the fleet's coordinator");
    let config = fleet.database().with_file_name("storage-storage1.toml");
    let config = std::fs::read_to_string(config).unwrap();
    assert!(!config.contains("crl ="), "the agent has no list file: {config}");

    // An agent that starts without the list gets it when it registers, before its first heartbeat.
    let late = fleet.start_agent_without_crl("storage", "storage2", &fleet.file_backend("b2", "").0);
    wait_for("storage2 to register", Duration::from_secs(30), || async {
        late.log_text().contains("registered with the coordinator").then_some(())
    })
    .await;
    let to_late = StorageAgentClient::new(retired.channel(&late.url()).unwrap());
    let err = to_late.clone().list_resources(ListResourcesRequest::default()).await.unwrap_err();
    assert!(refused(&err), "{err:?}");
    let log = late.log_text();
    let adopted = log.find("new certificate revocation list in force, from the coordinator number=1");
    assert!(adopted.is_some() && adopted < log.find("registered with the coordinator"), "{log}");
}
