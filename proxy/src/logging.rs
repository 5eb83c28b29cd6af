//! Process-wide logging through `tracing`, with Pingora's `log` records forwarded to it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (a filter directive); `RUST_LOG` wins when set.
/// Logs go to standard error, so standard output carries only the access log. Colours are
/// used only when standard error is a terminal, so log files and pipes get plain text.
pub fn init(level: &str) {
    let _ = subscriber(level).try_init();
}

/// Runs `load`, which reads the config, with warnings and errors going to standard error.
/// The global subscriber needs the log level from the config, so it is installed only after
/// the config is read. Without this scope, what the reading logs would be lost (an htpasswd
/// line that is skipped, say). `RUST_LOG` wins here too.
pub fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    tracing::subscriber::with_default(subscriber("warn").finish(), load)
}

fn subscriber(
    level: &str,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    EnvFilter,
    fn() -> std::io::Stderr,
> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
}
