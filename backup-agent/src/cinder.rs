//! Importing a backup written by Cinder's chunked posix/NFS driver (format restated in ../shared/CINDER.md
//! §9): the container is `<dir>/<id[0:2]>/<id[2:4]>/<id>`, holding `<prefix>_metadata` (JSON: objects with
//! offset, length and compression; `parent_id` for incrementals), `<prefix>_sha256file` (a sha256 per
//! `chunk_size` block of the whole volume) and the objects `<prefix>-00001…`. The chain is applied oldest
//! first into a sparse scratch image, the image is checked block by block against the sha256 file, and then
//! cut into the repository's chunks like any backup.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A Cinder backup found on disk.
struct Found {
    dir: PathBuf,
    prefix: String,
    meta: Value,
}

fn check_id(id: &str) -> Result<(), String> {
    match ember_common::identity::canonical_uuid(id) {
        Some(_) => Ok(()),
        None => Err(format!("{id:?} is not a Cinder backup id (a UUID)")),
    }
}

fn find(root: &Path, id: &str) -> Result<Found, String> {
    check_id(id)?;
    let dir = root.join(&id[0..2]).join(&id[2..4]).join(id);
    let suffix = format!("_backup_{id}_metadata");
    let entries = fs::read_dir(&dir).map_err(|e| format!("Cinder backup {id}: {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(prefix) = name.strip_suffix("_metadata").filter(|_| name.ends_with(&suffix)) {
            let meta: Value = serde_json::from_slice(&fs::read(e.path()).map_err(|e| e.to_string())?)
                .map_err(|e| format!("Cinder backup {id}: metadata: {e}"))?;
            if meta["version"] != "1.0.0" {
                return Err(format!("Cinder backup {id}: metadata version {} is not 1.0.0", meta["version"]));
            }
            return Ok(Found { dir, prefix: prefix.to_string(), meta });
        }
    }
    Err(format!("Cinder backup {id}: no metadata in {}", dir.display()))
}

fn decompress(alg: &str, body: Vec<u8>) -> Result<Vec<u8>, String> {
    match alg.to_ascii_lowercase().as_str() {
        "none" | "off" | "no" => Ok(body),
        "zlib" | "gzip" => {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(body.as_slice()).read_to_end(&mut out).map_err(|e| format!("zlib: {e}"))?;
            Ok(out)
        }
        other => Err(format!("compression {other:?} is not supported (zlib and none are)")),
    }
}

/// What [`rebuild`] answers when `stop` said to stop.
pub const STOPPED: &str = "stopped";

/// Rebuilds the volume of Cinder backup `id` under `root` into `image` (created sparse), checks it against
/// the backup's sha256 file, and returns (volume id, volume size). Asks `stop` before each object and each
/// block it checks, and ends with [`STOPPED`] when it says so.
pub fn rebuild(root: &Path, id: &str, image: &Path, stop: &dyn Fn() -> bool) -> Result<(String, u64), String> {
    if !root.is_absolute() || root.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("directory {:?} must be an absolute path without '..'", root.display()));
    }
    let mut chain = vec![find(root, id)?];
    while let Some(parent) =
        chain.last().unwrap().meta["parent_id"].as_str().filter(|p| !p.is_empty()).map(String::from)
    {
        if chain.len() > 1000 {
            return Err("incremental chain longer than 1000".into());
        }
        chain.push(find(root, &parent)?);
    }
    let top = &chain[0];
    let shafile =
        fs::read(top.dir.join(format!("{}_sha256file", top.prefix))).map_err(|e| format!("sha256 file: {e}"))?;
    let shas: Value = serde_json::from_slice(&shafile).map_err(|e| format!("sha256 file: {e}"))?;
    let block = shas["chunk_size"].as_u64().filter(|b| *b > 0).ok_or("sha256 file: no chunk_size")?;
    let digests: Vec<&str> =
        shas["sha256s"].as_array().ok_or("sha256 file: no sha256s")?.iter().filter_map(Value::as_str).collect();
    let size = digests.len() as u64 * block;
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(image)
        .map_err(|e| e.to_string())?;
    out.set_len(size).map_err(|e| e.to_string())?;
    for found in chain.iter().rev() {
        for obj in found.meta["objects"].as_array().into_iter().flatten() {
            let (name, info) =
                obj.as_object().and_then(|o| o.iter().next()).ok_or("metadata: malformed object entry")?;
            if stop() {
                return Err(STOPPED.into());
            }
            if name.contains('/') || !name.starts_with(&found.prefix) {
                return Err(format!("metadata names an unexpected object {name:?}"));
            }
            let body = fs::read(found.dir.join(name)).map_err(|e| format!("object {name}: {e}"))?;
            let data = decompress(info["compression"].as_str().unwrap_or("none"), body)
                .map_err(|e| format!("object {name}: {e}"))?;
            let (offset, length) = (
                info["offset"].as_u64().ok_or("object without offset")?,
                info["length"].as_u64().ok_or("object without length")?,
            );
            if data.len() as u64 != length || offset + length > size {
                return Err(format!(
                    "object {name}: {} bytes at {offset} do not fit ({length} expected, volume {size})",
                    data.len()
                ));
            }
            out.write_all_at(&data, offset).map_err(|e| e.to_string())?;
        }
    }
    let mut buf = vec![0u8; block as usize];
    for (i, want) in digests.iter().enumerate() {
        if stop() {
            return Err(STOPPED.into());
        }
        out.read_exact_at(&mut buf, i as u64 * block).map_err(|e| e.to_string())?;
        if hex::encode(Sha256::digest(&buf)) != *want {
            return Err(format!("block {i} (offset {}) does not match Cinder's sha256 file", i as u64 * block));
        }
    }
    out.sync_all().map_err(|e| e.to_string())?;
    Ok((top.meta["volume_id"].as_str().unwrap_or_default().to_string(), size))
}

#[cfg(test)]
mod tests {
    #[test]
    fn refuses_relative_and_bad_ids() {
        let img = std::env::temp_dir().join("ember-cinder-test.img");
        assert!(
            super::rebuild(std::path::Path::new("relative"), "11111111-2222-4333-8444-555555555555", &img, &|| false)
                .is_err()
        );
        assert!(super::rebuild(std::path::Path::new("/tmp"), "../etc", &img, &|| false).unwrap_err().contains("UUID"));
    }
}
