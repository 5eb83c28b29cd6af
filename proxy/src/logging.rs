//! Process-wide logging through `tracing`, with Pingora's `log` records forwarded to it.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (a filter directive); `RUST_LOG` wins when set.
/// Logs go to standard error, so standard output carries only the access log. Colours are
/// used only when standard error is a terminal, so log files and pipes get plain text.
pub fn init(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Runs `load`, which reads the config, with warnings and errors going to standard error.
/// The global subscriber needs the log level from the config, so it is installed only after
/// the config is read. Without this scope, what the reading logs would be lost (an htpasswd
/// line that is skipped, say). `RUST_LOG` wins here too.
///
/// Each event is printed as one line, `warning: <message> (<fields>)` (or `error:`, `info:`
/// and so on by level), without a timestamp, like the `error:` lines of config validation.
pub fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter("warn"))
        .with_writer(std::io::stderr)
        .event_format(LoadingLine)
        .finish();
    tracing::subscriber::with_default(subscriber, load)
}

/// Pingora 0.9.1's cache warns once per process that no header compression dictionary is
/// set. The gateway sets none on purpose: disk entries written without a dictionary can be read
/// only without one. The warning would only confuse operators, so it is not shown.
const QUIET_TARGETS: &str = "pingora_cache::meta=error";

fn filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    match QUIET_TARGETS.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The line format of [`while_loading`]: `<level>: <message> (<field>=<value>, ...)`.
struct LoadingLine;

impl<S, N> FormatEvent<S, N> for LoadingLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let label = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(writer, "{label}: {}", fields.message)?;
        if !fields.others.is_empty() {
            write!(writer, " ({})", fields.others.join(", "))?;
        }
        writeln!(writer)
    }
}

/// An event's message and its other fields as `name=value`, values in `Debug` form.
#[derive(Default)]
struct EventFields {
    message: String,
    others: Vec<String>,
}

impl Visit for EventFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.others.push(format!("{}={value:?}", field.name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn loading_line_is_plain_warning() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(LoadingLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(line = 3, user = "", "htpasswd line ignored");
        });
        let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("UTF-8");
        assert_eq!(text, "warning: htpasswd line ignored (line=3, user=\"\")\n");
    }
}
