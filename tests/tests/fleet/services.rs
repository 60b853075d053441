//! Registration, heartbeats and the service list, with the real binaries.

use ember_fleet_tests::{Fleet, SERVICE_DOWN_SECONDS, wait_for};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

async fn services(fleet: &Fleet) -> Vec<Service> {
    let mut client = FleetServiceClient::new(fleet.admin());
    client.list_services(ListServicesRequest::default()).await.expect("list services").into_inner().services
}

fn find<'a>(list: &'a [Service], name: &str) -> Option<&'a Service> {
    list.iter().find(|s| s.name == name)
}

#[tokio::test]
async fn agents_register_go_down_when_killed_and_come_back_with_a_new_instance() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let backend_dir = fleet.subdir("file1");
    let repo_dir = fleet.subdir("repo1");
    let storage_toml = format!(
        "availability_zone = \"az1\"\n[[backends]]\nname = \"file1\"\ndriver = \"file\"\ndirectory = \"{}\"\n",
        backend_dir.display()
    );
    let mut storage = fleet.start_agent("storage", "storage1", &storage_toml);
    let _compute = fleet.start_agent("compute", "compute1", "");
    let _backup = fleet.start_agent(
        "backup",
        "backup1",
        &format!("[[repositories]]\nname = \"repo1\"\ndirectory = \"{}\"\n", repo_dir.display()),
    );

    let list = wait_for("all three agents up", Duration::from_secs(20), || async {
        let list = services(&fleet).await;
        (list.len() == 3 && list.iter().all(|s| s.up)).then_some(list)
    })
    .await;
    let storage_row = find(&list, "storage1@file1").expect("storage row named host@backend");
    assert_eq!(storage_row.role, ServiceRole::Storage as i32);
    assert_eq!(storage_row.backend, "file1");
    assert_eq!(storage_row.availability_zone, "az1");
    assert!(storage_row.enabled);
    assert!(storage_row.endpoint.starts_with("https://127.0.0.1:"));
    assert_eq!(find(&list, "compute1").expect("compute row").role, ServiceRole::Compute as i32);
    assert_eq!(find(&list, "backup1").expect("backup row").role, ServiceRole::Backup as i32);
    let first_instance = storage_row.instance_id.clone();

    // The pools it reported are stored for the scheduler.
    let report: String = {
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", fleet.database().display())).await.unwrap();
        sqlx::query_scalar("SELECT report FROM services WHERE host = 'storage1'").fetch_one(&pool).await.unwrap()
    };
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["pools"][0]["total_capacity_gb"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["pools"][0]["capabilities"]["volume_backend_name"], "file1");

    storage.kill();
    let deadline = Duration::from_secs(u64::from(SERVICE_DOWN_SECONDS) + 5);
    wait_for("the killed storage agent to be down", deadline, || async {
        let list = services(&fleet).await;
        let s = find(&list, "storage1@file1")?;
        (!s.up).then_some(())
    })
    .await;
    let list = services(&fleet).await;
    assert!(find(&list, "compute1").unwrap().up, "the others stay up");

    let _storage = fleet.start_agent("storage", "storage1", &storage_toml);
    let restarted = wait_for("the restarted storage agent up", Duration::from_secs(20), || async {
        let list = services(&fleet).await;
        let s = find(&list, "storage1@file1")?.clone();
        (s.up && s.instance_id != first_instance).then_some(s)
    })
    .await;
    assert_ne!(restarted.instance_id, first_instance);
}

#[tokio::test]
async fn disabling_and_enabling_a_backend_through_the_cli() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let dir = fleet.subdir("b");
    let _storage = fleet.start_agent(
        "storage",
        "node1",
        &format!("[[backends]]\nname = \"fast\"\ndriver = \"file\"\ndirectory = \"{}\"\n", dir.display()),
    );
    wait_for("storage registered", Duration::from_secs(20), || async {
        (!services(&fleet).await.is_empty()).then_some(())
    })
    .await;

    let (ok, out, err) = fleet.cli(&["service", "disable", "node1@fast", "--reason", "disk replacement"]);
    assert!(ok, "{err}");
    assert!(out.contains("disabled") && out.contains("disk replacement"), "{out}");
    let row = find(&services(&fleet).await, "node1@fast").cloned().unwrap();
    assert!(!row.enabled);
    assert_eq!(row.disabled_reason, "disk replacement");

    let (ok, out, _) = fleet.cli(&["--json", "service", "list"]);
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["host"], "node1@fast");
    assert_eq!(rows[0]["status"], "disabled");
    assert_eq!(rows[0]["binary"], "ember-storage");

    let (ok, _, err) = fleet.cli(&["service", "enable", "node1@fast"]);
    assert!(ok, "{err}");
    let row = find(&services(&fleet).await, "node1@fast").cloned().unwrap();
    assert!(row.enabled && row.disabled_reason.is_empty());

    let (ok, _, err) = fleet.cli(&["service", "disable", "nosuch@host"]);
    assert!(!ok);
    assert!(err.starts_with("ember: NOT_FOUND: service nosuch@host"), "{err}");
}

#[tokio::test]
async fn coordinator_stops_cleanly_on_sigterm_and_keeps_its_state() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (ok, _, err) = fleet.cli(&["type", "create", "kept"]);
    assert!(ok, "{err}");
    let status = fleet.coordinator.as_mut().unwrap().terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(fleet.coordinator.as_ref().unwrap().log_text().contains("coordinator stopped"));
    fleet.start_coordinator();
    let (ok, out, _) = fleet.cli(&["type", "show", "kept"]);
    assert!(ok && out.contains("kept"), "{out}");
}

/// `--log-json` gives one JSON object per line; a TOML config file works with a flag overriding it.
#[tokio::test]
async fn json_logs_and_a_config_file_with_flag_overrides() {
    let fleet = Fleet::new();
    let tls = fleet.tls("coordinator-coordinator");
    let config = fleet.dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndatabase = \"{}\"\nservice_down_seconds = 7\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            fleet.dir.path().join("from-config.db").display(),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(ember_fleet_tests::bin("ember-coordinator"));
    // The flag overrides the file's unusable listen address.
    cmd.arg("--config").arg(&config).args(["--listen", "127.0.0.1:0", "--log-json"]);
    let mut d = ember_fleet_tests::Daemon::start(cmd, fleet.dir.path().join("json.log"));
    assert!(d.terminate().success());
    assert!(fleet.dir.path().join("from-config.db").exists(), "the database path came from the file");
    let text = d.log_text();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "coordinator serving"), "{text}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{text}");
}

#[tokio::test]
async fn a_storage_agent_whose_backend_will_not_open_refuses_to_start_naming_it() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (good, _) = fleet.file_backend("file1", "");
    // The settings are valid; the volume group is not there (nor, on this host, LVM itself).
    let bad = "[[backends]]\nname = \"lvm1\"\ndriver = \"lvm\"\nvolume_group = \"ember-no-such-vg\"\n";
    let (status, log) =
        fleet.agent_refusing_to_start("storage", "storage1", &format!("{good}{bad}"), Duration::from_secs(30));
    assert!(!status.success(), "{log}");
    assert!(log.contains("ember-storage-agent: backend lvm1: "), "{log}");
    assert!(find(&services(&fleet).await, "storage1").is_none(), "the refused agent never registered");
}

/// A node gone for good leaves its services listed `down` for ever; an admin removes them once they hold nothing
/// (Cinder's `cinder-manage service remove`). Refused while the agent is up and while anything is still on it;
/// an agent that comes back registers anew.
#[tokio::test]
async fn a_dead_service_that_holds_nothing_is_removed_from_the_list() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    let _compute = fleet.start_agent("compute", "compute1", "");
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = ember_fleet_tests::volumes::new_volume(&volumes, 1).await;
    let mut admin = FleetServiceClient::new(fleet.admin());
    let remove = |name: &str| DeleteServiceRequest { name: name.into(), role: 0 };

    let err = admin.delete_service(remove("storage1@file1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is up"), "{err:?}");
    let err =
        FleetServiceClient::new(fleet.member("alice", "p1")).delete_service(remove("compute1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    storage.kill();
    wait_for("the storage agent to be down", Duration::from_secs(u64::from(SERVICE_DOWN_SECONDS) + 5), || async {
        find(&services(&fleet).await, "storage1@file1").is_some_and(|s| !s.up).then_some(())
    })
    .await;
    let err = admin.delete_service(remove("storage1@file1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("1 volume(s)") && err.message().contains("--forget"), "{err:?}");
    assert!(find(&services(&fleet).await, "storage1@file1").is_some(), "a refusal changes nothing");

    let forget = DeleteVolumeRequest { id: v.id.clone(), forget: true, ..Default::default() };
    volumes.clone().delete_volume(forget).await.unwrap();
    let (ok, out, err) = fleet.cli(&["service", "delete", "storage1@file1"]);
    assert!(ok && out.contains("storage1@file1 (ember-storage) removed"), "{out}\n{err}");
    let list = services(&fleet).await;
    assert!(find(&list, "storage1@file1").is_none(), "{list:?}");
    assert!(find(&list, "compute1").is_some_and(|s| s.up), "the others stay");
    let err = admin.delete_service(remove("storage1@file1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_for("the agent to register anew", Duration::from_secs(20), || async {
        find(&services(&fleet).await, "storage1@file1").is_some_and(|s| s.up).then_some(())
    })
    .await;
}

/// Anyone lists the availability zones volumes can be created in (Cinder's availability-zone-list): the zones of
/// the storage pools, available while one of their pools is up and enabled.
#[tokio::test]
async fn members_list_the_availability_zones_and_which_can_take_volumes() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (b1, _d1) = fleet.file_backend("file1", "availability_zone = \"az1\"");
    let (b2, _d2) = fleet.file_backend("file2", "availability_zone = \"az2\"");
    let _s1 = fleet.start_agent("storage", "storage1", &b1);
    let _s2 = fleet.start_agent("storage", "storage2", &b2);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@file1").await;
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage2@file2").await;
    let zones = |fleet: &Fleet| {
        let channel = fleet.member("alice", "p1");
        async move {
            let list = FleetServiceClient::new(channel).list_availability_zones(ListAvailabilityZonesRequest {}).await;
            list.unwrap().into_inner().zones.into_iter().map(|z| (z.name, z.available)).collect::<Vec<_>>()
        }
    };
    assert_eq!(zones(&fleet).await, [("az1".to_string(), true), ("az2".to_string(), true)]);

    let disable = DisableServiceRequest { name: "storage2@file2".into(), reason: "maintenance".into() };
    FleetServiceClient::new(fleet.admin()).disable_service(disable).await.unwrap();
    assert_eq!(zones(&fleet).await, [("az1".to_string(), true), ("az2".to_string(), false)]);
    let tls = fleet.issue(ember_common::identity::Role::Member, "alice", Some("p1"));
    let (ok, out, err) = fleet.cli_as(&tls, &["zone", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("az1") && out.contains("available") && out.contains("unavailable"), "{out}");
    // A volume asked for in the zone that cannot take one now fails to be placed, naming why.
    let req = CreateVolumeRequest { size_gb: 1, availability_zone: "az2".into(), ..Default::default() };
    let v = VolumeServiceClient::new(fleet.member("alice", "p1")).create_volume(req).await.unwrap().into_inner();
    let failed = ember_fleet_tests::volumes::wait_settled(&VolumeServiceClient::new(fleet.admin()), &v.id).await;
    assert_eq!(failed.status, "error", "{failed:?}");
}

/// Admins see the pools as the scheduler does (Cinder's get-pools --detail): capacity as reported, what the
/// coordinator has placed there, and the capabilities types are matched against; a disabled pool is not one.
#[tokio::test]
async fn admins_list_the_pools_the_scheduler_places_volumes_on() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    ember_fleet_tests::volumes::new_volume(&volumes, 2).await;
    let list = || async {
        FleetServiceClient::new(fleet.admin()).list_pools(ListPoolsRequest {}).await.unwrap().into_inner().pools
    };
    let pools = list().await;
    assert_eq!(pools.len(), 1, "{pools:?}");
    let p = &pools[0];
    assert_eq!((p.name.as_str(), p.availability_zone.as_str(), p.provisioned_gb), ("storage1@file1", "nova", 2.0));
    assert!(p.total_capacity_gb.parse::<f64>().is_ok_and(|gb| gb > 0.0), "{p:?}");
    assert!(p.thin && p.virtual_free_gb.is_some(), "{p:?}");
    assert_eq!(p.capabilities.get("volume_backend_name").map(String::as_str), Some("file1"), "{p:?}");

    let err = FleetServiceClient::new(fleet.member("alice", "p1")).list_pools(ListPoolsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let (ok, out, err) = fleet.cli(&["pool", "list"]);
    assert!(ok && out.contains("storage1@file1") && out.contains("Provisioned GiB"), "{out}\n{err}");
    let total = format!("{:.2}", p.total_capacity_gb.parse::<f64>().unwrap());
    assert!(out.contains(&format!(" {total} ")), "capacities to two decimals ({total}): {out}");
    let disable = DisableServiceRequest { name: "storage1@file1".into(), reason: "drain".into() };
    FleetServiceClient::new(fleet.admin()).disable_service(disable).await.unwrap();
    assert!(list().await.is_empty(), "a disabled pool takes no volumes");
}

/// Certificates expire, and then a daemon can reach no one: the service list, the CLI and the metrics show when
/// each agent's certificate (the one it registered with) and the coordinator's expire, and the coordinator
/// warns about one that expires within 30 days (the test fleet's certificates last 2).
#[tokio::test]
async fn the_fleet_shows_when_each_certificate_expires_and_warns_before() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("b1", "");
    let agent = fleet.start_agent("storage", "storage1", &backend);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@b1").await;
    let not_after = |stem: &str| {
        let pem = std::fs::read(fleet.tls(stem).cert).unwrap();
        let der = ember_common::revocation::pem_block(&pem, "CERTIFICATE").unwrap();
        X509Certificate::from_der(&der).unwrap().1.validity().not_after.timestamp()
    };
    let (agent_expiry, coordinator_expiry) =
        (not_after("storage-agent-storage1"), not_after("coordinator-coordinator"));

    let listed = services(&fleet).await;
    let storage = find(&listed, "storage1@b1").expect("listed");
    assert_eq!(storage.certificate_expires_at.map(|t| t.seconds), Some(agent_expiry), "{storage:?}");
    let (ok, out, err) = fleet.cli(&["service", "list"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("storage1@b1")).unwrap_or_default();
    assert!(row.contains(" (in ") && row.contains(" days)"), "expiring within the month: {out}");
    let (ok, metrics, err) = fleet.cli(&["metrics"]);
    assert!(ok, "{err}");
    for sample in [
        format!(
            "ember_service_certificate_expiry_timestamp_seconds{{role=\"storage\",host=\"storage1\",backend=\"b1\"}} \
             {agent_expiry}"
        ),
        format!("ember_coordinator_certificate_expiry_timestamp_seconds {coordinator_expiry}"),
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample} missing:\n{metrics}");
    }
    let log = fleet.coordinator.as_ref().unwrap().log_text();
    let warned = log.lines().any(|l| l.contains("the certificate expires soon") && l.contains("host=storage1"));
    assert!(warned, "the coordinator warns of the agent's certificate: {log}");
    for (who, log) in [("coordinator", log.clone()), ("storage agent", agent.log_text())] {
        let own = log.lines().any(|l| l.contains("this daemon's certificate expires soon") && l.contains("days_left="));
        assert!(own, "the {who} warns of its own certificate: {log}");
    }

    // Renewed: the same identity and addresses for 90 days; the agent restarted with it shows the new expiry.
    let ca_dir = fleet.ca_dir();
    let renewed_dir = fleet.subdir("renewed");
    let (ok, out, err) = fleet.cli(&[
        "certs",
        "renew",
        "--dir",
        ca_dir.to_str().unwrap(),
        "--name",
        "storage1",
        "--days",
        "90",
        "--out",
        renewed_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("renewed storage-agent storage1 for 90 days (localhost, 127.0.0.1)"), "{out}");
    let mut agent = agent;
    tokio::task::spawn_blocking(move || agent.terminate()).await.unwrap();
    let in_place = fleet.tls("storage-agent-storage1");
    std::fs::copy(renewed_dir.join("storage1.pem"), &in_place.cert).unwrap();
    std::fs::copy(renewed_dir.join("storage1.key"), &in_place.key).unwrap();
    let renewed_expiry = not_after("storage-agent-storage1");
    assert!(renewed_expiry >= agent_expiry + 87 * 86_400, "{renewed_expiry} vs {agent_expiry}");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let listed = wait_for("the agent to register with its new certificate", Duration::from_secs(30), || async {
        let listed = services(&fleet).await;
        let s = find(&listed, "storage1@b1")?.clone();
        (s.up && s.certificate_expires_at.map(|t| t.seconds) == Some(renewed_expiry)).then_some(s)
    })
    .await;
    let (ok, out, _) = fleet.cli(&["service", "list"]);
    assert!(ok && !out.lines().any(|l| l.contains("storage1@b1") && l.contains("(in ")), "{out}\n{listed:?}");
}

/// An operation paused because its agent is down goes on the moment the agent registers again, not at the
/// coordinator's next reconcile pass (an hour away here): a volume deleted while its storage agent was down is
/// gone as soon as the agent is back.
#[tokio::test]
async fn a_paused_operation_goes_on_as_soon_as_its_agent_registers_again() {
    let mut fleet = Fleet::new();
    fleet.reconcile_interval_seconds = 3600;
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    storage.wait_registered().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let create = CreateVolumeRequest { size_gb: 1, ..Default::default() };
    let v = volumes.create_volume(create).await.unwrap().into_inner();
    wait_for("the volume to be available", Duration::from_secs(30), || async {
        let got = VolumeServiceClient::new(fleet.admin()).get_volume(GetVolumeRequest { id: v.id.clone() }).await;
        (got.ok()?.into_inner().status == "available").then_some(())
    })
    .await;

    storage.kill();
    volumes.delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    fleet.wait_operation_paused("the delete to pause while the storage agent is down").await;
    let (state, error) = fleet.operation("delete_volume", &v.id).await.expect("a delete operation");
    assert_eq!(state, "running", "{error}");
    assert!(dir.join(format!("volume-{}", v.id)).exists(), "the file went while its agent was down");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_for("the delete to finish once the agent is back", Duration::from_secs(30), || async {
        let got = VolumeServiceClient::new(fleet.admin()).get_volume(GetVolumeRequest { id: v.id.clone() }).await;
        (got.err()?.code() == tonic::Code::NotFound).then_some(())
    })
    .await;
    assert!(!dir.join(format!("volume-{}", v.id)).exists(), "the volume's file is left");
    assert_eq!(fleet.operation("delete_volume", &v.id).await.map(|o| o.0).as_deref(), Some("done"));
}

/// A registration that comes while the operation it would resume is still in its call to the agent's old,
/// frozen process is not lost: the worker runs the operation again as soon as that call gives up.
#[tokio::test]
async fn an_operation_woken_while_its_worker_waits_on_a_frozen_agent_runs_again_at_once() {
    let mut fleet = Fleet::new();
    fleet.reconcile_interval_seconds = 3600;
    // Long enough for the new agent to register while the extend still waits on the frozen one.
    fleet.start_coordinator_with(&[("EMBER_PEER_TIMEOUT", "10")]);
    let (backend, dir) = fleet.file_backend("file1", "");
    let freeze = [("EMBER_FAILPOINTS", "storage.freeze_in_extend_volume")];
    let frozen = fleet.start_agent_with("storage", "storage1", &backend, &freeze);
    frozen.wait_registered().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let v = volumes.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap().into_inner();
    let available = |size: u64| {
        let fleet = &fleet;
        let id = v.id.clone();
        async move {
            let got = VolumeServiceClient::new(fleet.admin()).get_volume(GetVolumeRequest { id }).await;
            let got = got.ok()?.into_inner();
            (got.status == "available" && got.size_gb == size).then_some(())
        }
    };
    wait_for("the volume to be available", Duration::from_secs(30), || available(1)).await;

    volumes.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    wait_for("the agent to freeze in the extend", Duration::from_secs(30), || async {
        frozen.is_stopped().then_some(())
    })
    .await;
    let restarted = fleet.start_agent("storage", "storage1", &backend);
    restarted.wait_registered().await;
    let coordinator_log = fleet.coordinator.as_ref().expect("a coordinator").log_text();
    assert!(
        !coordinator_log.contains("operation paused"),
        "the extend gave up on the frozen agent before the new one registered; the test proves nothing"
    );

    wait_for("the extend to finish through the new agent", Duration::from_secs(40), || available(2)).await;
    let file = std::fs::metadata(dir.join(format!("volume-{}", v.id))).expect("the volume's file");
    assert_eq!(file.len(), 2 << 30, "the file was not extended");
    assert_eq!(fleet.operation("extend_volume", &v.id).await.map(|o| o.0).as_deref(), Some("done"));
    let coordinator_log = fleet.coordinator.as_ref().expect("a coordinator").log_text();
    assert!(coordinator_log.contains("operation paused"), "the extend never waited on the frozen agent");
}
