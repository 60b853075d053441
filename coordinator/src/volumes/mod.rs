//! Volumes: the public API ([`api`]), the durable create/delete/extend flows ([`flow`]), adopting volumes the
//! coordinator has no record of and letting go of them ([`manage`]), listing what could be adopted
//! ([`manageable`]), moving it to another pool ([`migrate`]), changing its type where it lies ([`retype`]),
//! reverting it to a snapshot ([`revert`]), and the persisted rows ([`store`]).

pub mod affinity;
pub mod api;
pub mod exports;
pub mod flow;
pub mod manage;
pub mod manageable;
pub mod migrate;
pub mod retype;
pub mod revert;
pub mod store;
pub mod swap;
