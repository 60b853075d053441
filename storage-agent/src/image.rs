//! Filling a volume from an image with `qemu-img`: the image is inspected first (raw or qcow2 only, no backing
//! file, no larger than the volume), then converted to raw into the volume. The source is the one
//! user-supplied string that reaches a command line, so its shape is checked first.

use crate::error::{AgentError, Result};
use ember_common::runner;
use std::path::{Path, PathBuf};
use std::time::Duration;

const INFO_TIMEOUT: Duration = Duration::from_secs(120);

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// `raw` or `qcow2`.
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument { field: "image", message: message.into() }
}

/// Checks the source's shape (see [`ember_common::image_source`]).
pub fn check_source(source: &str) -> Result<()> {
    ember_common::image_source::check(source).map_err(invalid)
}

/// What qemu-img is given for `source`: a URL as it is (the coordinator lets only admins name one), or the
/// real path of a local image, which must be a regular file inside one of `image_dirs` once every symlink is
/// followed. The answer is the same for a file that does not exist and one outside the directories, so a
/// caller cannot probe the node's files.
pub fn resolve(source: &str, image_dirs: &[PathBuf]) -> Result<String> {
    check_source(source)?;
    if ember_common::image_source::is_url(source) {
        return Ok(source.to_string());
    }
    if image_dirs.is_empty() {
        return Err(invalid("this storage node serves no local images (its image_dirs is empty)"));
    }
    let outside = || invalid(format!("{source} is not an image file in this storage node's image directories"));
    let real = std::fs::canonicalize(source).map_err(|_| outside())?;
    let inside = image_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| real.starts_with(d));
    let regular = std::fs::metadata(&real).is_ok_and(|m| m.is_file());
    match real.to_str() {
        Some(path) if inside && regular => Ok(path.to_string()),
        _ => Err(outside()),
    }
}

/// Parses `qemu-img info --output=json` and applies the rules.
pub fn parse_info(json: &str, volume_bytes: u64) -> Result<ImageFacts> {
    let info: serde_json::Value = serde_json::from_str(json).map_err(|e| invalid(format!("unreadable image: {e}")))?;
    let format = info["format"].as_str().unwrap_or_default().to_string();
    if format != "raw" && format != "qcow2" {
        return Err(invalid(format!("format {format:?} is not raw or qcow2")));
    }
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(invalid(format!("the image has a backing file ({backing}); give a standalone image")));
    }
    // A qcow2 image may keep its data in another file, named in its header: qemu-img would read that file.
    if let Some(data_file) = info["format-specific"]["data"].get("data-file") {
        return Err(invalid(format!(
            "the image keeps its data in an external file ({data_file}); give a standalone image"
        )));
    }
    let virtual_size = info["virtual-size"].as_u64().ok_or_else(|| invalid("qemu-img reported no virtual size"))?;
    if virtual_size > volume_bytes {
        return Err(invalid(format!(
            "the image's virtual size ({virtual_size} bytes) exceeds the volume ({volume_bytes} bytes)"
        )));
    }
    Ok(ImageFacts { format, virtual_size })
}

/// Inspects `source` for a volume of `volume_bytes`.
pub async fn inspect(source: &str, volume_bytes: u64) -> Result<ImageFacts> {
    check_source(source)?;
    let out = runner::run("qemu-img", &["info", "--output=json", source], INFO_TIMEOUT)
        .await
        .map_err(|e| invalid(format!("cannot read the image: {e}")))?;
    parse_info(&out.stdout, volume_bytes)
}

/// Writes the image as raw data into `dest`. `existing` targets (block devices) are written in place;
/// `reads_zero` says the target already reads as zeros (a new file or thin LV), so zero runs are skipped.
pub async fn convert(source: &str, facts: &ImageFacts, dest: &Path, existing: bool, reads_zero: bool) -> Result<()> {
    check_source(source)?;
    let dest = dest.to_string_lossy();
    let mut args = vec!["convert", "-f", facts.format.as_str(), "-O", "raw", "-t", "none"];
    if existing {
        args.push("-n");
        if reads_zero {
            args.push("--target-is-zero");
        }
    }
    args.extend([source, dest.as_ref()]);
    runner::run("qemu-img", &args, runner::data_deadline(facts.virtual_size)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_images_come_only_from_the_image_directories() {
        let root = tempfile::tempdir().unwrap();
        let (images, private) = (root.path().join("images"), root.path().join("private"));
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        std::fs::write(images.join("sub/disk.raw"), b"x").unwrap();
        std::fs::write(private.join("key"), b"secret").unwrap();
        std::os::unix::fs::symlink(private.join("key"), images.join("link.raw")).unwrap();
        let dirs = [images.clone()];
        let real = |p: &Path| std::fs::canonicalize(p).unwrap().to_str().unwrap().to_string();

        let disk = images.join("sub/disk.raw");
        assert_eq!(resolve(disk.to_str().unwrap(), &dirs).unwrap(), real(&disk));
        assert_eq!(resolve("https://example.org/a.qcow2", &dirs).unwrap(), "https://example.org/a.qcow2");
        let refused = [
            private.join("key"),        // outside
            images.join("link.raw"),    // a symlink leading outside
            images.join("sub"),         // not a file
            images.join("missing.raw"), // answered as an outside file is
            std::path::PathBuf::from("/dev/zero"),
        ];
        for path in refused {
            let err = resolve(path.to_str().unwrap(), &dirs).unwrap_err().to_string();
            assert!(err.contains("not an image file in this storage node's image directories"), "{path:?}: {err}");
        }
        let err = resolve(disk.to_str().unwrap(), &[]).unwrap_err().to_string();
        assert!(err.contains("serves no local images"), "{err}");
    }

    #[test]
    fn info_rules() {
        let qcow2 = r#"{"virtual-size": 67108864, "filename": "a.qcow2", "format": "qcow2", "actual-size": 200704}"#;
        assert_eq!(parse_info(qcow2, 1 << 30).unwrap(), ImageFacts { format: "qcow2".into(), virtual_size: 67108864 });
        let backed = r#"{"virtual-size": 1, "format": "qcow2", "backing-filename": "base.qcow2"}"#;
        assert!(parse_info(backed, 1 << 30).unwrap_err().to_string().contains("backing file"));
        let vmdk = r#"{"virtual-size": 1, "format": "vmdk"}"#;
        assert!(parse_info(vmdk, 1 << 30).unwrap_err().to_string().contains("vmdk"));
        let external = r#"{"virtual-size": 1, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "data-file": "/etc/shadow", "data-file-raw": true}}}"#;
        assert!(parse_info(external, 1 << 30).unwrap_err().to_string().contains("external file"));
        let big = r#"{"virtual-size": 2147483648, "format": "raw"}"#;
        assert!(parse_info(big, 1 << 30).unwrap_err().to_string().contains("exceeds"));
    }
}
