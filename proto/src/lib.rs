//! ember's gRPC contract, generated from `proto/ember/**.proto`.
//!
//! - [`v1`]: the public API served by the coordinator.
//! - [`agent::v1`]: the fleet-internal API (registration on the coordinator; the agents' services).

/// The public API (`ember.v1`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ember.v1");
}

/// The fleet-internal API.
pub mod agent {
    /// `ember.agent.v1`.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("ember.agent.v1");
    }
}

/// The encoded `FileDescriptorSet` of every ember proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ember_descriptor.bin"));

/// Version of the agent API this build speaks.
pub const AGENT_API_VERSION: &str = "v1";
