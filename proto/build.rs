//! Compiles the .proto files with protox (pure Rust, no system protoc), keeps the descriptor set for server
//! reflection, and generates the tonic clients and servers.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ember/v1/common.proto",
    "ember/v1/types.proto",
    "ember/v1/services.proto",
    "ember/v1/quotas.proto",
    "ember/v1/volumes.proto",
    "ember/v1/snapshots.proto",
    "ember/v1/backups.proto",
    "ember/v1/attachments.proto",
    "ember/v1/instances.proto",
    "ember/v1/transfers.proto",
    "ember/agent/v1/registration.proto",
    "ember/agent/v1/storage.proto",
    "ember/agent/v1/compute.proto",
    "ember/agent/v1/backup.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ember");
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ember_descriptor.bin"), fds.encode_to_vec())?;
    // Volume data as `Bytes`: decoding slices it out of the receive buffer instead of copying every chunk.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".ember.agent.v1.VolumeChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
