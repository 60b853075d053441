//! Fleet-level tests: each module starts the real binaries on loopback and checks outcomes from outside.
//!
//! They are one test binary, not one per file: each binary links the whole dependency tree (tens of MB with
//! line tables), so thirty-odd of them cost gigabytes of disk and minutes of linking on every CI run, and a CI
//! machine with little free disk failed building them.

mod access_log;
mod affinity;
mod agent_restarts;
mod attach;
mod backup_cancel;
mod backup_faults;
mod backup_placement;
mod backup_sources;
mod backup_takeover;
mod backup_update;
mod backup_verify;
mod backups;
mod cascade;
mod cli;
mod crash;
mod database_copy;
mod deploy;
mod encryption;
mod frozen_peers;
mod idempotency;
mod images;
mod instances;
mod metrics;
mod migrate;
mod migrate_attached;
mod operations_history;
mod quotas;
mod reflection;
mod retype;
mod revert;
mod security;
mod services;
mod transfers;
mod unmanage;
mod volume_rules;
mod volume_types;
mod volumes;
