//! Reading and writing volumes over iSCSI the way an initiator does, with libiscsi's userspace initiator in
//! `qemu-img` (no kernel iSCSI here), using the connection info the coordinator returns.

use ember_proto::v1::ConnectionInfo;
use std::path::Path;
use std::process::Command;

/// The `iscsi://user%password@portal/iqn/lun` URL for `info`, with `password` (pass the real one, or a wrong
/// one to test refusals).
pub fn url(info: &ConnectionInfo, password: &str) -> String {
    format!(
        "iscsi://{}%{}@{}/{}/{}",
        info.auth_username, password, info.target_portal, info.target_iqn, info.target_lun
    )
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("qemu-img").args(args).env("LC_ALL", "C").output().expect("qemu-img");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Writes `file` to the start of the LUN.
pub fn write(url: &str, file: &Path) -> Result<(), String> {
    run(&["convert", "-n", "-f", "raw", "-O", "raw", &file.to_string_lossy(), url]).map(|_| ())
}

/// Reads the first `mib` MiB of the LUN.
pub fn read(url: &str, mib: u64, scratch: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(scratch);
    run(&[
        "dd",
        "-f",
        "raw",
        "-O",
        "raw",
        "bs=1M",
        &format!("count={mib}"),
        &format!("if={url}"),
        &format!("of={}", scratch.display()),
    ])?;
    Ok(std::fs::read(scratch).expect("scratch"))
}

/// The LUN's size in bytes as the initiator sees it.
pub fn size(url: &str) -> Result<u64, String> {
    let out = run(&["info", "--output=json", url])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v["virtual-size"].as_u64().ok_or_else(|| format!("no virtual-size in {out}"))
}

/// A deterministic pattern of `len` bytes distinct for each `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}
