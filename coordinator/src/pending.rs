//! Public services whose capability a later piece of work delivers. Each call answers UNIMPLEMENTED with a
//! message saying so — never a fake success — while the API contract is already complete and documented.

use ember_proto::v1::*;

/// Stand-in for the services not delivered yet.
pub struct Pending;

#[tonic::async_trait]
impl instance_service_server::InstanceService for Pending {
    ember_common::not_yet!(create_instance, CreateInstanceRequest, Instance, "creating instances");
    ember_common::not_yet!(get_instance, GetInstanceRequest, Instance, "reading instances");
    ember_common::not_yet!(list_instances, ListInstancesRequest, ListInstancesResponse, "listing instances");
    ember_common::not_yet!(get_console_log, GetInstanceRequest, ConsoleLog, "console logs");
    ember_common::not_yet!(delete_instance, DeleteInstanceRequest, DeleteInstanceResponse, "deleting instances");
}
