//! Fault injection for the agents' tests. `EMBER_FAILPOINTS=name,…` arms named points; unset in production,
//! where each check reads one environment variable and finds nothing.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether failpoint `name` is armed.
pub fn armed(name: &str) -> bool {
    std::env::var("EMBER_FAILPOINTS").map(|v| v.split(',').any(|p| p.trim() == name)).unwrap_or(false)
}

/// If `name` is armed, aborts the process at once, as SIGKILL would (no destructor runs, nothing is flushed).
pub fn abort_if_armed(name: &str) {
    if armed(name) {
        tracing::error!(failpoint = name, "failpoint hit: aborting");
        std::process::abort();
    }
}

/// If `name` is armed, stops the whole process (SIGSTOP) the first time any freeze point is reached, as a hung
/// host would: its sockets stay open and nothing answers. It goes on where it stopped when sent SIGCONT.
pub fn freeze_once(name: &str) {
    static FROZEN: AtomicBool = AtomicBool::new(false);
    if armed(name) && !FROZEN.swap(true, Ordering::SeqCst) {
        tracing::warn!(failpoint = name, "failpoint hit: freezing");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
