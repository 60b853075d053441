//! `ember metrics` (`FleetService.GetMetrics`): the fleet's state and the coordinator's API traffic in
//! Prometheus' text format, for admins only, naming no project.

use ember_fleet_tests::Fleet;
use ember_fleet_tests::volumes::{new_volume, wait_backend};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use tonic::Code;

/// Checks the exposition's syntax: every family has its HELP and TYPE lines before its samples, and every sample
/// is `name{label="value",...} number` or `name number`.
fn well_formed(text: &str) {
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{line}");
        assert!(typed.contains(name), "sample before its TYPE line: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
    }
}

#[tokio::test]
async fn the_fleets_metrics_are_prometheus_text_for_admins_and_name_no_project() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "secret-project"));
    new_volume(&volumes, 3).await;
    let missing = GetVolumeRequest { id: "00000000-0000-4000-8000-000000000000".into() };
    assert_eq!(volumes.clone().get_volume(missing).await.unwrap_err().code(), Code::NotFound);

    let (ok, out, err) = fleet.cli(&["metrics"]);
    assert!(ok, "{err}");
    well_formed(&out);
    for sample in [
        "ember_volumes{status=\"available\"} 1",
        "ember_service_up{role=\"storage\",host=\"storage1\",backend=\"file1\"} 1",
        "ember_service_enabled{role=\"storage\",host=\"storage1\",backend=\"file1\"} 1",
        "ember_pool_provisioned_gb{pool=\"storage1@file1\"} 3",
        "ember_api_calls_total{method=\"ember.v1.VolumeService/CreateVolume\",code=\"OK\"} 1",
        "ember_api_calls_total{method=\"ember.v1.VolumeService/GetVolume\",code=\"NOT_FOUND\"} 1",
    ] {
        assert!(out.lines().any(|l| l == sample), "{sample} missing:\n{out}");
    }
    assert!(out.lines().any(|l| l.starts_with("ember_pool_free_gb{pool=\"storage1@file1\"} ")), "{out}");
    assert!(!out.contains("secret-project") && !out.contains("alice"), "tenants stay out of monitoring:\n{out}");

    let err = FleetServiceClient::new(fleet.member("alice", "secret-project"))
        .get_metrics(GetMetricsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}
