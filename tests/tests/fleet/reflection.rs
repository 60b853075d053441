//! Server reflection (v1 and v1alpha) and health, as clients that are not ours see them.

use ember_fleet_tests::{Fleet, wait_for};
use std::process::Command;
use std::time::Duration;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn python_grpcio_discovers_and_calls_the_api_through_reflection() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let _compute = fleet.start_agent("compute", "compute1", "");
    let admin = fleet.tls("admin-admin");
    let addr = fleet.coordinator.as_ref().unwrap().addr.to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reflection_client.py");
    let out = wait_for("python to list the registered compute agent", Duration::from_secs(30), || {
        let out = Command::new("python3")
            .arg(script)
            .arg(&addr)
            .arg(&admin.ca)
            .arg(&admin.cert)
            .arg(&admin.key)
            .output()
            .expect("python3");
        async move {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            (v["response"]["services"][0]["host"] == "compute1").then_some(v)
        }
    })
    .await;
    let services: Vec<&str> = out["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for expected in
        ["ember.v1.VolumeService", "ember.v1.FleetService", "ember.v1.BackupService", "grpc.health.v1.Health"]
    {
        assert!(services.contains(&expected), "{expected} missing from {services:?}");
    }
    assert_eq!(out["response"]["services"][0]["role"], "SERVICE_ROLE_COMPUTE");
}

#[tokio::test]
async fn reflection_v1_and_health_answer_over_mtls() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let channel = fleet.admin();

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let first = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection answer {first:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ember.agent.v1.Registration"), "{names:?}");
    assert!(names.contains(&"grpc.reflection.v1.ServerReflection"), "{names:?}");

    let health = HealthClient::new(channel)
        .check(HealthCheckRequest { service: "ember.v1.VolumeService".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
}
