//! Volume types and extra specs end to end: the CLI as a person uses it, and bad input refused with the field
//! named and the database untouched.

use ember_fleet_tests::Fleet;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use sqlx::Row;
use tonic::Code;

/// Every volume type and extra spec in the database, as text, to compare before and after.
async fn snapshot_types(fleet: &Fleet) -> Vec<String> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", fleet.database().display())).await.unwrap();
    let mut rows: Vec<String> = sqlx::query(
        "SELECT t.id, t.name, t.description, t.is_default, COALESCE(s.key, ''), COALESCE(s.value, '') \
         FROM volume_types t LEFT JOIN volume_type_extra_specs s ON s.type_id = t.id ORDER BY 1, 5",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        format!(
            "{}|{}|{}|{}|{}|{}",
            r.get::<String, _>(0),
            r.get::<String, _>(1),
            r.get::<String, _>(2),
            r.get::<i64, _>(3),
            r.get::<String, _>(4),
            r.get::<String, _>(5)
        )
    })
    .collect();
    rows.sort();
    pool.close().await;
    rows
}

#[tokio::test]
async fn type_lifecycle_through_the_cli() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();

    let (ok, out, err) = fleet.cli(&[
        "--json",
        "type",
        "create",
        "gold",
        "--description",
        "fast disks",
        "--spec",
        "volume_backend_name=fast",
        "--spec",
        "capabilities:thin_provisioning_support=<is> True",
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created[0]["name"], "gold");
    assert_eq!(created[0]["extra_specs"]["volume_backend_name"], "fast");
    assert_eq!(created[0]["is_default"], false);

    let (ok, _, err) = fleet.cli(&["type", "set", "gold", "provisioning:type=thin", "multiattach=<is> True"]);
    assert!(ok, "{err}");
    let (ok, _, err) = fleet.cli(&["type", "unset", "gold", "volume_backend_name", "not-there"]);
    assert!(ok, "{err}");
    let (ok, out, _) = fleet.cli(&["--json", "type", "show", "gold"]);
    assert!(ok);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let specs = shown[0]["extra_specs"].as_object().unwrap();
    let mut keys: Vec<_> = specs.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["capabilities:thin_provisioning_support", "multiattach", "provisioning:type"]);

    // The human table.
    let (ok, out, _) = fleet.cli(&["type", "list"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(out.contains("__DEFAULT__") && out.contains("gold") && out.contains("provisioning:type=thin"), "{out}");

    // Default handling: the default type cannot be deleted; making gold the default frees __DEFAULT__.
    let (ok, _, err) = fleet.cli(&["type", "delete", "__DEFAULT__"]);
    assert!(!ok);
    assert!(err.starts_with("ember: FAILED_PRECONDITION: volume type __DEFAULT__ is the default"), "{err}");
    let (ok, _, err) = fleet.cli(&["type", "update", "gold", "--default"]);
    assert!(ok, "{err}");
    let (ok, _, err) = fleet.cli(&["type", "delete", "__DEFAULT__"]);
    assert!(ok, "{err}");
    let (ok, out, _) = fleet.cli(&["--json", "type", "list"]);
    assert!(ok);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["is_default"], true);

    // A type used by a volume cannot be deleted.
    let (ok, _, err) = fleet.cli(&["type", "create", "silver"]);
    assert!(ok, "{err}");
    {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", fleet.database().display())).await.unwrap();
        sqlx::query(
            "INSERT INTO volumes (id, project, size_gb, status, volume_type_id, created_at, updated_at) \
             SELECT 'f0f0f0f0-0000-4000-8000-000000000001', 'p', 1, 'available', id, 0, 0 \
             FROM volume_types WHERE name = 'silver'",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let (ok, _, err) = fleet.cli(&["type", "delete", "silver"]);
    assert!(!ok);
    assert!(err.contains("FAILED_PRECONDITION") && err.contains("in use by 1 volume"), "{err}");
    let (ok, _, _) = fleet.cli(&["type", "show", "silver"]);
    assert!(ok, "silver survives");

    let (ok, _, err) = fleet.cli(&["type", "create", "gold"]);
    assert!(!ok);
    assert!(err.starts_with("ember: ALREADY_EXISTS: name:"), "{err}");
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let mut client = VolumeTypeServiceClient::new(fleet.admin());
    client
        .create_volume_type(CreateVolumeTypeRequest {
            name: "gold".into(),
            extra_specs: [("volume_backend_name".to_string(), "fast".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = snapshot_types(&fleet).await;

    let long = "x".repeat(256);
    let cases: Vec<(CreateVolumeTypeRequest, &str)> = vec![
        (CreateVolumeTypeRequest { name: String::new(), ..Default::default() }, "name:"),
        (CreateVolumeTypeRequest { name: long.clone(), ..Default::default() }, "name:"),
        (CreateVolumeTypeRequest { name: " padded".into(), ..Default::default() }, "name:"),
        (
            CreateVolumeTypeRequest { name: "ok".into(), description: long.clone(), ..Default::default() },
            "description:",
        ),
        (
            CreateVolumeTypeRequest {
                name: "ok".into(),
                extra_specs: [("bad key!".to_string(), "v".to_string())].into(),
                ..Default::default()
            },
            "extra_specs:",
        ),
        (
            CreateVolumeTypeRequest {
                name: "ok".into(),
                extra_specs: [("k".to_string(), long.clone())].into(),
                ..Default::default()
            },
            "extra_specs:",
        ),
    ];
    for (req, field) in cases {
        let err = client.create_volume_type(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        assert!(err.message().starts_with(field), "{req:?}: {}", err.message());
    }

    let err = client
        .set_extra_specs(SetExtraSpecsRequest {
            id_or_name: "gold".into(),
            extra_specs: [("good".to_string(), "v".to_string()), ("".to_string(), "v".to_string())].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("extra_specs:"), "{}", err.message());
    let err =
        client.unset_extra_specs(UnsetExtraSpecsRequest { id_or_name: "gold".into(), keys: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("keys:"), "{}", err.message());
    let err = client
        .update_volume_type(UpdateVolumeTypeRequest {
            id_or_name: "gold".into(),
            name: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    for unknown in ["no-such-type", "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e"] {
        let err = client.get_volume_type(GetVolumeTypeRequest { id_or_name: unknown.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains(unknown), "{}", err.message());
        let err = client
            .set_extra_specs(SetExtraSpecsRequest {
                id_or_name: unknown.into(),
                extra_specs: [("k".to_string(), "v".to_string())].into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = client.delete_volume_type(DeleteVolumeTypeRequest { id_or_name: unknown.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let err = client.get_volume_type(GetVolumeTypeRequest { id_or_name: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("id_or_name:"));

    assert_eq!(snapshot_types(&fleet).await, before, "refused requests changed the database");

    // Quota bad input too.
    let mut quotas = ember_proto::v1::quota_service_client::QuotaServiceClient::new(fleet.admin());
    for (limits, needle) in [
        (vec![("nonsense".to_string(), 1i64)], "unknown quota resource"),
        (vec![("volumes".to_string(), -5)], "limit must be -1"),
    ] {
        let err = quotas
            .set_quota(SetQuotaRequest { project: "p1".into(), limits: limits.into_iter().collect() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("limits:") && err.message().contains(needle), "{}", err.message());
    }
    let err = quotas
        .set_quota(SetQuotaRequest { project: "Bad/Project".into(), limits: [("volumes".to_string(), 1)].into() })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("project:"), "{}", err.message());
    let q = quotas.get_quota(GetQuotaRequest { project: "p1".into() }).await.unwrap().into_inner();
    assert!(q.items.iter().any(|i| i.resource == "gigabytes_gold"), "per-type quotas exist for each type");
    assert_eq!(q.items.iter().find(|i| i.resource == "volumes").unwrap().limit, 10, "unchanged");
}

/// A private type (Cinder's is_public=False and type access): only admins and the projects granted it see and
/// use it; to other projects it does not exist. Taking a grant away leaves the project's volumes as they are.
#[tokio::test]
async fn a_private_type_is_seen_and_used_only_by_the_projects_granted_it() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@file1").await;
    let (ok, out, err) = fleet.cli(&["--json", "type", "create", "secret", "--private"]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created[0]["is_public"], false);
    let (ok, out, err) = fleet.cli(&["--json", "type", "access", "add", "secret", "p1"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"p1\""), "{out}");

    let types_of = |project: &'static str| {
        let channel = fleet.member(project, project);
        async move {
            let list = VolumeTypeServiceClient::new(channel).list_volume_types(ListVolumeTypesRequest {}).await;
            list.unwrap().into_inner().volume_types.into_iter().map(|t| t.name).collect::<Vec<_>>()
        }
    };
    let create = |project: &'static str| {
        let channel = fleet.member(project, project);
        async move {
            let req = CreateVolumeRequest { size_gb: 1, volume_type: "secret".into(), ..Default::default() };
            VolumeServiceClient::new(channel).create_volume(req).await
        }
    };
    assert_eq!(types_of("p1").await, ["__DEFAULT__", "secret"]);
    assert_eq!(types_of("p2").await, ["__DEFAULT__"], "p2 does not see it");
    let err = VolumeTypeServiceClient::new(fleet.member("p2", "p2"))
        .get_volume_type(GetVolumeTypeRequest { id_or_name: "secret".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = create("p2").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("volume_type"), "{err:?}");
    let mine = create("p1").await.unwrap().into_inner();
    let mine = ember_fleet_tests::volumes::wait_volume(
        &VolumeServiceClient::new(fleet.member("p1", "p1")),
        &mine.id,
        "available",
    )
    .await;
    assert_eq!(mine.volume_type_name, "secret");

    // Refused, naming why: a member granting access; a grant on a public type; the default made private.
    let err = VolumeTypeServiceClient::new(fleet.member("p1", "p1"))
        .add_type_access(TypeAccessRequest { id_or_name: "secret".into(), project: "p1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let admin = VolumeTypeServiceClient::new(fleet.admin());
    let err = admin
        .clone()
        .add_type_access(TypeAccessRequest { id_or_name: "__DEFAULT__".into(), project: "p2".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let private_default =
        UpdateVolumeTypeRequest { id_or_name: "__DEFAULT__".into(), is_public: Some(false), ..Default::default() };
    let err = admin.clone().update_volume_type(private_default).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("is_public"), "{err:?}");
    assert_eq!(types_of("p2").await, ["__DEFAULT__"], "nothing changed");

    // A grant taken away: p1 no longer sees or uses the type, and keeps its volume of it.
    let (ok, out, err) = fleet.cli(&["--json", "type", "access", "remove", "secret", "p1"]);
    assert!(ok, "{err}");
    let left: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(left["projects"], serde_json::json!([]), "{out}");
    assert_eq!(types_of("p1").await, ["__DEFAULT__"]);
    assert_eq!(create("p1").await.unwrap_err().code(), Code::NotFound);
    let kept = VolumeServiceClient::new(fleet.member("p1", "p1"))
        .get_volume(GetVolumeRequest { id: mine.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((kept.volume_type_name.as_str(), kept.status.as_str()), ("secret", "available"));
    // Made public, everyone uses it.
    let (ok, _, err) = fleet.cli(&["type", "update", "secret", "--public"]);
    assert!(ok, "{err}");
    assert_eq!(types_of("p2").await, ["__DEFAULT__", "secret"]);
}

/// A type's per-type quota follows it when it is renamed (its limits still hold, its volumes are counted and
/// given back under the new name), and goes when it is deleted (a later type of that name starts afresh).
#[tokio::test]
async fn per_type_quotas_follow_a_renamed_type_and_go_with_a_deleted_one() {
    use ember_fleet_tests::volumes::{usage, wait_backend, wait_gone};
    use ember_proto::v1::quota_service_client::QuotaServiceClient;
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let mut types = VolumeTypeServiceClient::new(fleet.admin());
    let mut quotas = QuotaServiceClient::new(fleet.admin());
    types.create_volume_type(CreateVolumeTypeRequest { name: "gold".into(), ..Default::default() }).await.unwrap();
    let limit =
        |resource: &str, n: i64| SetQuotaRequest { project: "p1".into(), limits: [(resource.to_string(), n)].into() };
    quotas.set_quota(limit("volumes_gold", 1)).await.unwrap();
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let of_type = |t: &str| CreateVolumeRequest { size_gb: 1, volume_type: t.into(), ..Default::default() };
    let first = volumes.clone().create_volume(of_type("gold")).await.unwrap().into_inner();
    ember_fleet_tests::volumes::wait_volume(&volumes, &first.id, "available").await;

    let rename =
        UpdateVolumeTypeRequest { id_or_name: "gold".into(), name: Some("platinum".into()), ..Default::default() };
    types.update_volume_type(rename).await.unwrap();
    let shown = quotas.get_quota(GetQuotaRequest { project: "p1".into() }).await.unwrap().into_inner();
    let item = shown.items.iter().find(|i| i.resource == "volumes_platinum").expect("volumes_platinum");
    assert_eq!((item.limit, item.in_use), (1, 1), "{item:?}");
    assert!(!shown.items.iter().any(|i| i.resource.ends_with("_gold")), "{shown:?}");
    let err = volumes.clone().create_volume(of_type("platinum")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "the limit still holds: {err:?}");
    assert!(err.message().contains("volumes_platinum"), "{err:?}");

    volumes.clone().delete_volume(DeleteVolumeRequest { id: first.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&volumes, &first.id).await;
    assert_eq!(usage(&fleet, "p1", "volumes_platinum").await, 0, "given back under the new name");
    assert_eq!(usage(&fleet, "p1", "gigabytes_platinum").await, 0);
    let db = fleet.db().await;
    let stale: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quota_usages WHERE resource LIKE '%_gold'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stale, 0, "nothing is left under the old name");

    // Deleted, and made again under the same name: the old limit does not come back.
    types.delete_volume_type(DeleteVolumeTypeRequest { id_or_name: "platinum".into() }).await.unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM quota_limits WHERE resource LIKE '%_platinum') + \
                (SELECT COUNT(*) FROM quota_usages WHERE resource LIKE '%_platinum')",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(left, 0);
    types.create_volume_type(CreateVolumeTypeRequest { name: "platinum".into(), ..Default::default() }).await.unwrap();
    let shown = quotas.get_quota(GetQuotaRequest { project: "p1".into() }).await.unwrap().into_inner();
    let item = shown.items.iter().find(|i| i.resource == "volumes_platinum").expect("volumes_platinum");
    assert_eq!(item.limit, -1, "{item:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
