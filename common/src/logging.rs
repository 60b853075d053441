//! Structured logs with `tracing`: human-readable text by default, one JSON object per line with `--log-json`.
//! The filter comes from `EMBER_LOG` (e.g. `debug`, `ember_coordinator=trace`), default `info`.

/// Installs the global subscriber. Logs go to stderr; stdout is kept for machine-readable lines.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal: escape codes in a log file get in the way of everyone who greps it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
