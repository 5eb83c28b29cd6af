//! Process-wide logging through `tracing`, with Pingora's `log` records forwarded to it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (a filter directive); `RUST_LOG` wins when set.
/// Logs go to standard error, so standard output carries only the access log. Colours are
/// used only when standard error is a terminal, so log files and pipes get plain text.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
