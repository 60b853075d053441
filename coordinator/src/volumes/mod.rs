//! Volumes: the public API ([`api`]), the durable create/delete/extend flows ([`flow`]), and the persisted
//! rows ([`store`]).

pub mod api;
pub mod flow;
pub mod store;
