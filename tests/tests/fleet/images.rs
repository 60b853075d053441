//! Volumes filled from images (`image` on create): qcow2 and raw are converted by qemu-img on the storage
//! node, the volume becomes bootable with the image's facts in its metadata; other formats, images with a
//! backing file, images larger than the volume and sources that are not absolute paths or URLs are refused
//! with the reason, leaving nothing on the backend.

use ember_fleet_tests::volumes::{files_in, wait_backend, wait_settled, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use tonic::Code;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn head(path: &Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    std::fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    buf
}

#[tokio::test]
async fn volumes_are_filled_from_raw_and_qcow2_images_and_bad_images_are_refused() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let images = fleet.subdir("images");
    let volumes = VolumeServiceClient::new(fleet.admin());
    let create = |image: String, size_gb: u64| {
        let mut c = volumes.clone();
        async move { c.create_volume(CreateVolumeRequest { size_gb, image, ..Default::default() }).await }
    };

    // A qcow2 image holding a pattern at 1 MiB, and a raw one.
    let qcow2 = images.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &qcow2.to_string_lossy(), "64M"]);
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k"]).arg(&qcow2).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let raw = images.join("disk.raw");
    std::fs::write(&raw, vec![0x5a; 3 << 20]).unwrap();

    let v = create(qcow2.to_string_lossy().into(), 1).await.unwrap().into_inner();
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.bootable, "a volume from an image is bootable");
    assert_eq!(v.metadata["image_format"], "qcow2");
    assert_eq!(v.metadata["image_virtual_size"], (64u64 << 20).to_string());
    assert_eq!(v.metadata["image_source"], qcow2.to_string_lossy());
    let file = dir.join(format!("volume-{}", v.id));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30, "grown to the volume's size");
    let data = head(&file, (1 << 20) + 65536);
    assert!(data[..1 << 20].iter().all(|b| *b == 0) && data[1 << 20..].iter().all(|b| *b == 0xab));

    let r = create(raw.to_string_lossy().into(), 1).await.unwrap().into_inner();
    let r = wait_volume(&volumes, &r.id, "available").await;
    assert_eq!(r.metadata["image_format"], "raw");
    assert!(head(&dir.join(format!("volume-{}", r.id)), 3 << 20).iter().all(|b| *b == 0x5a));

    // Refused on the storage node: the volume ends in error with the reason, and no file is left.
    let vmdk = images.join("disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &vmdk.to_string_lossy(), "16M"]);
    let child = images.join("child.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &qcow2.to_string_lossy(), "-F", "qcow2", &child.to_string_lossy()]);
    let big = images.join("big.raw");
    std::fs::File::create(&big).unwrap().set_len(2 << 30).unwrap();
    let before = files_in(&dir);
    for (image, why) in [(vmdk, "vmdk"), (child, "backing file"), (big, "exceeds the volume")] {
        let bad = create(image.to_string_lossy().into(), 1).await.unwrap().into_inner();
        let bad = wait_settled(&volumes, &bad.id).await;
        assert_eq!(bad.status, "error", "{bad:?}");
        assert!(bad.status_reason.contains(why), "{why}: {}", bad.status_reason);
        assert!(!bad.bootable);
    }
    wait_for("no temporary file left", std::time::Duration::from_secs(10), || async {
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        (files_in(&dir) == before && names.len() == before.len()).then_some(())
    })
    .await;

    // Refused by the API at once, naming the field.
    for bad in ["relative.qcow2", "json:{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}", "/srv/../etc/passwd"] {
        let err = create(bad.into(), 1).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(err.message().starts_with("image"), "{}", err.message());
    }
    let err = create(raw.to_string_lossy().into(), 0).await.unwrap_err();
    assert!(err.message().starts_with("size_gb"), "{}", err.message());
}

/// Filling a volume from an image never becomes a way to read the storage node: a path must lead to a file in
/// the node's `image_dirs` (symlinks followed), a qcow2 image must keep its data in itself, and only admins may
/// have the node fetch a URL. A member uses the published images like anyone.
#[tokio::test]
async fn an_image_source_cannot_read_the_storage_nodes_other_files() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let images = fleet.subdir("images");
    let private = fleet.subdir("private");
    let secret = private.join("secret");
    std::fs::write(&secret, b"THE-NODE-SECRET").unwrap();
    let member = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let create = |image: String| {
        let mut c = member.clone();
        async move { c.create_volume(CreateVolumeRequest { size_gb: 1, image, ..Default::default() }).await }
    };

    // A published image works for a member.
    let published = images.join("published.raw");
    std::fs::write(&published, vec![0x42; 1 << 20]).unwrap();
    let v = create(published.to_string_lossy().into()).await.unwrap().into_inner();
    let v = wait_volume(&member, &v.id, "available").await;
    assert!(head(&dir.join(format!("volume-{}", v.id)), 1 << 20).iter().all(|b| *b == 0x42));

    // Refused on the node, each leaving an `error` volume with the reason and no data on the backend.
    let link = images.join("link.raw");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let external = images.join("external.qcow2");
    let data_file = private.join("data");
    let options = format!("data_file={},data_file_raw=on", data_file.display());
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &options, &external.to_string_lossy(), "1M"]);
    std::fs::write(&data_file, b"THE-NODE-SECRET").unwrap();
    let outside = "not an image file in this storage node's image directories";
    let before = files_in(&dir);
    for (image, why) in [
        (secret.clone(), outside),
        (fleet.ca_dir().join("ca.key"), outside),
        (link, outside),
        (std::path::PathBuf::from("/dev/zero"), outside),
        (images.join("no-such.raw"), outside),
        (external, "external file"),
    ] {
        let bad = create(image.to_string_lossy().into()).await.unwrap().into_inner();
        let bad = wait_settled(&member, &bad.id).await;
        assert_eq!(bad.status, "error", "{image:?}: {bad:?}");
        assert!(bad.status_reason.contains(why), "{image:?}: {}", bad.status_reason);
    }
    assert_eq!(files_in(&dir), before, "nothing was written for a refused image");

    // A URL: refused to a member at once, recording nothing; an admin may (here, one that cannot be fetched).
    let url = "http://127.0.0.1:9/disk.raw";
    let err = create(url.into()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().starts_with("image: only admins"), "{}", err.message());
    let listed = member.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    assert_eq!(listed.len(), 7, "the published one and the six refused on the node: {listed:?}");
    let admin = VolumeServiceClient::new(fleet.admin());
    let v = admin
        .clone()
        .create_volume(CreateVolumeRequest { size_gb: 1, image: url.into(), ..Default::default() })
        .await
        .expect("an admin may name a URL")
        .into_inner();
    let v = wait_settled(&admin, &v.id).await;
    assert_eq!(v.status, "error", "nothing listens there: {v:?}");
}
