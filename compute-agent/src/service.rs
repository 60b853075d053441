//! The compute agent's gRPC service. Attach, detach and instances arrive with the compute-agent work; until
//! then each call answers UNIMPLEMENTED.

use ember_common::not_yet;
use ember_proto::agent::v1::compute_agent_server::ComputeAgent;
use ember_proto::agent::v1::*;

/// The service.
pub struct Compute;

#[tonic::async_trait]
impl ComputeAgent for Compute {
    not_yet!(attach_volume, AttachVolumeRequest, AttachVolumeResponse, "attaching volumes");
    not_yet!(detach_volume, DetachVolumeRequest, DetachVolumeResponse, "detaching volumes");
    not_yet!(start_instance, StartInstanceRequest, StartInstanceResponse, "starting instances");
    not_yet!(destroy_instance, DestroyInstanceRequest, DestroyInstanceResponse, "destroying instances");
    not_yet!(get_console_log, GetConsoleLogRequest, GetConsoleLogResponse, "console logs");
}
