//! Named crash points for crash-safety tests. `EMBER_FAILPOINTS=create_volume.scheduled,…` makes the
//! coordinator abort (like a SIGKILL: no cleanup, no flush beyond what is committed) when it reaches one of
//! the named points. Unset in production, where each check is a string comparison against an empty list.

use std::sync::OnceLock;

fn armed() -> &'static Vec<String> {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("EMBER_FAILPOINTS")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        tracing::error!(failpoint = name, "failpoint hit: aborting");
        std::process::abort();
    }
}
