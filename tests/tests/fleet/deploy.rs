//! The deployment material in `deploy/` (docs/deploy.md): systemd units that systemd accepts, each starting a
//! binary this workspace builds with a config file whose example is in `deploy/` (the daemons' own unit tests
//! read those examples).

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn the_systemd_units_verify_and_start_the_daemons_with_the_example_configs() {
    let units: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    let names: Vec<String> = units.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["ember-backup-agent", "ember-compute-agent", "ember-coordinator", "ember-storage-agent"]);
    let checked = tempfile::tempdir().unwrap();
    for (unit, name) in units.iter().zip(&names) {
        let text = std::fs::read_to_string(unit).unwrap();
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart");
        let argv: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(argv[0], format!("/usr/local/bin/{name}"), "{unit:?}");
        let config = argv.windows(2).find(|w| w[0] == "--config").map(|w| w[1]).expect("--config");
        let example = config.strip_prefix("/etc/ember/").expect("a config in /etc/ember");
        assert!(deploy_dir().join(example).is_file(), "{unit:?} names {config}, which deploy/ has no example of");
        // Verified with the binary this workspace built in the place the unit names.
        let built = ember_fleet_tests::bin(name);
        assert!(built.is_file(), "{built:?}");
        let copy = checked.path().join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace(argv[0], built.to_str().unwrap())).unwrap();
        let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{unit:?}: {said}");
    }
}
