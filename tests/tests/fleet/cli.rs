//! The `ember` CLI's own paths (certificates, finding the coordinator) and the README's all-in-one fleet.

use ember_common::identity::{Identity, Role};
use ember_fleet_tests::{Fleet, bin};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test]
async fn certs_made_by_the_cli_carry_the_identity_and_work() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let dir = fleet.subdir("cli-ca");
    let run = |args: &[&str]| {
        let out = Command::new(bin("ember")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let d = dir.to_str().unwrap();
    let (ok, _, err) = run(&["certs", "init", "--dir", d]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["certs", "init", "--dir", d]);
    assert!(!ok && err.contains("ca.pem"), "a second init must not overwrite the CA: {err}");
    let (ok, out, err) =
        run(&["--json", "certs", "issue", "--dir", d, "--role", "member", "--name", "carol", "--project", "proj-c"]);
    assert!(ok, "{err}");
    let paths: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pem = std::fs::read_to_string(paths["cert"].as_str().unwrap()).unwrap();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(
        Identity::from_der(&parsed.contents).unwrap(),
        Identity { role: Role::Member, name: "carol".into(), project: Some("proj-c".into()) }
    );
    let (ok, _, err) = run(&["certs", "issue", "--dir", d, "--role", "member", "--name", "dave"]);
    assert!(!ok && err.contains("--project"), "{err}");
    let (ok, _, err) = run(&["certs", "issue", "--dir", d, "--role", "root", "--name", "eve"]);
    assert!(!ok && err.contains("unknown role"), "{err}");
    let (ok, _, err) = run(&["certs", "issue", "--dir", d, "--role", "admin", "--name", "Bad/Name"]);
    assert!(!ok && err.contains("not valid"), "{err}");

    // A CLI config file is enough to find the coordinator.
    let cfg = fleet.dir.path().join("cli.toml");
    let admin = fleet.tls("admin-admin");
    std::fs::write(
        &cfg,
        format!(
            "coordinator = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            fleet.coordinator_url(),
            admin.ca.display(),
            admin.cert.display(),
            admin.key.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("ember")).args(["type", "list"]).env("EMBER_CLI_CONFIG", &cfg).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("__DEFAULT__"));

    // With nothing configured the CLI says what is missing, in one line.
    let out = Command::new(bin("ember"))
        .args(["type", "list"])
        .env_remove("EMBER_COORDINATOR")
        .env_remove("EMBER_CLI_CONFIG")
        .env("HOME", fleet.dir.path().join("nowhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("ember: no coordinator: pass --coordinator"), "{err}");
}

/// The README's first command brings up a working fleet and stops cleanly on Ctrl-C.
#[tokio::test]
async fn readme_fleet_script_starts_a_working_fleet_and_stops_on_ctrl_c() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port_block();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // Ctrl-C must reach the script even when this suite was started with SIGINT ignored (a background job of
    // a non-interactive shell): bash cannot trap a signal ignored on entry, so restore its default first.
    let mut script = Command::new("env")
        .args(["--default-signal=INT", "bash"])
        .arg(format!("{root}/scripts/fleet.sh"))
        .env("EMBER_STATE", state.path())
        .env("EMBER_PORT", port.to_string())
        .env("EMBER_FLEET_BUILT", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = script.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("buf curl") {
            break;
        }
    }
    assert!(banner.contains("ember fleet running"), "{banner}");
    assert!(banner.contains(&format!("https://127.0.0.1:{port}")), "{banner}");

    let cli_config = state.path().join("cli.toml");
    let list =
        ember_fleet_tests::wait_for("the script's fleet to show three services up", Duration::from_secs(60), || {
            let out = Command::new(bin("ember"))
                .args(["--json", "service", "list"])
                .env("EMBER_CLI_CONFIG", &cli_config)
                .output()
                .unwrap();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                let rows = v.as_array()?.clone();
                (rows.len() == 3 && rows.iter().all(|r| r["state"] == "up")).then_some(rows)
            }
        })
        .await;
    let hosts: Vec<_> = list.iter().map(|r| r["host"].as_str().unwrap().to_string()).collect();
    assert_eq!(hosts, ["backup1", "compute1", "storage1@file1"]);

    let _ = Command::new("kill").args(["-INT", &script.id().to_string()]).status();
    let status = script.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "coordinator still listening");
}

/// A port p with p..p+3 free right now.
fn free_port_block() -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        if p < 65000 && (1..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free block of four ports");
}

/// A person's volume workflow with the CLI: create with --wait, snapshot, update both, clone from the snapshot,
/// extend, list, delete.
#[tokio::test]
async fn volume_workflow_through_the_cli() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    ember_fleet_tests::volumes::wait_backend(&fleet, "storage1@file1").await;
    let json = |args: &[&str]| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, out, err) = fleet.cli(&all);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let v = json(&["volume", "create", "--size", "1", "--name", "web", "--property", "tier=gold", "--wait"]);
    assert_eq!(v[0]["status"], "available");
    assert_eq!(v[0]["metadata"]["tier"], "gold");
    let id = v[0]["id"].as_str().unwrap().to_string();
    assert!(dir.join(format!("volume-{id}")).exists());

    let s = json(&["snapshot", "create", &id, "--name", "snap1", "--wait"]);
    assert_eq!(s[0]["status"], "available");
    let sid = s[0]["id"].as_str().unwrap().to_string();
    let update = format!("volume update {id} --name web2 --description front-end --bootable true --property owner=ops");
    let updated = json(&format!("{update} --unset-property tier").split(' ').collect::<Vec<_>>());
    let facts = (&updated[0]["name"], &updated[0]["description"], &updated[0]["bootable"], &updated[0]["metadata"]);
    assert_eq!(facts, (&"web2".into(), &"front-end".into(), &true.into(), &serde_json::json!({"owner": "ops"})));
    let renamed = json(&["snapshot", "update", &sid, "--name", "before-upgrade", "--description", "weekly"]);
    assert_eq!((&renamed[0]["name"], &renamed[0]["description"]), (&"before-upgrade".into(), &"weekly".into()));
    let shown = json(&["snapshot", "show", &sid]);
    assert_eq!((&shown[0]["name"], &shown[0]["status"]), (&"before-upgrade".into(), &"available".into()));
    let long = "n".repeat(256);
    let (ok, _, err) = fleet.cli(&["volume", "update", &id, "--name", &long, "--description", "lost"]);
    assert!(!ok && err.starts_with("ember: INVALID_ARGUMENT: name:"), "{err}");
    let (ok, _, err) = fleet.cli(&["snapshot", "update", &sid, "--name", &long, "--description", "lost"]);
    assert!(!ok && err.starts_with("ember: INVALID_ARGUMENT: name:"), "{err}");
    let (ok, _, err) = fleet.cli(&["snapshot", "update", "not-a-uuid", "--name", "x"]);
    assert!(!ok && err.starts_with("ember: INVALID_ARGUMENT: id:"), "{err}");
    let (v, s) = (json(&["volume", "show", &id]), json(&["snapshot", "show", &sid]));
    let unchanged = (&v[0]["name"], &v[0]["description"], &s[0]["name"], &s[0]["description"]);
    assert_eq!(unchanged, (&"web2".into(), &"front-end".into(), &"before-upgrade".into(), &"weekly".into()));
    let from = json(&["volume", "create", "--snapshot", &sid, "--wait"]);
    assert_eq!((from[0]["status"].as_str(), from[0]["size_gb"].as_u64()), (Some("available"), Some(1)));
    let ext = json(&["volume", "extend", &id, "2", "--wait"]);
    assert_eq!(ext[0]["size_gb"], 2);

    let (ok, out, _) = fleet.cli(&["volume", "list"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("available")).count(), 2, "{out}");

    let (ok, _, err) = fleet.cli(&["volume", "delete", &id]);
    assert!(!ok && err.contains("FAILED_PRECONDITION") && err.contains("snapshot"), "{err}");
    let (ok, out, err) = fleet.cli(&["snapshot", "delete", &sid, "--wait"]);
    assert!(ok && out.contains("deleted"), "{err}");
    let from_id = from[0]["id"].as_str().unwrap().to_string();
    let (ok, out, err) = fleet.cli(&["volume", "delete", &id, "--wait"]);
    assert!(ok && out.contains("deleted"), "{err}");
    // Scripts get JSON from a delete too.
    let gone = json(&["volume", "delete", &from_id, "--wait"]);
    assert_eq!(gone, serde_json::json!({ "kind": "volume", "id": from_id, "status": "deleted" }));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no files left");
    let (ok, _, err) = fleet.cli(&["volume", "show", &id]);
    assert!(!ok && err.starts_with("ember: NOT_FOUND: volume"), "{err}");
    let (ok, _, err) = fleet.cli(&["volume", "create", "--size", "0"]);
    assert!(!ok && err.starts_with("ember: INVALID_ARGUMENT: size_gb:"), "{err}");
}
