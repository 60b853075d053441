//! Volumes: the public API ([`api`]), the durable create/delete/extend flows ([`flow`]), adopting volumes the
//! coordinator has no record of ([`manage`]), and the persisted rows ([`store`]).

pub mod api;
pub mod flow;
pub mod manage;
pub mod store;
