//! Process-wide logging through `tracing`, with Pingora's `log` records forwarded to it.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_log::{AsLog, LogTracer};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (a filter directive); `RUST_LOG` wins when set.
/// Logs go to standard error, so standard output carries only the access log. Colours are
/// used only when standard error is a terminal, so log files and pipes get plain text.
pub fn init(level: &str) {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_ok()
        && log::set_boxed_logger(Box::new(PingoraLog(LogTracer::new()))).is_ok()
    {
        log::set_max_level(LevelFilter::current().as_log());
    }
}

/// Forwards Pingora's `log` records to `tracing`, with the level of a few records lowered.
/// Pingora 0.9.1 logs at error level events that are no fault of the gateway and need no
/// action, so an alert on error lines would fire on every health check.
struct PingoraLog(LogTracer);

impl log::Log for PingoraLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        match lowered_level(record) {
            Some(level) => self.0.log(
                &log::Record::builder()
                    .args(*record.args())
                    .level(level)
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
            None => self.0.log(record),
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Returns the level that `record` is logged at instead of its own, if it is one of:
///
/// - `Fail to proxy: ..., downstream session type: ...` from `pingora_proxy`: a client
///   connection that closed, timed out or broke before it sent a whole request header, as a
///   TCP or TLS health check does (debug);
/// - `Fail to serve cache: Downstream ...` from `pingora_proxy`'s cache: a client that went
///   away or stopped reading while a response came from the cache (debug);
/// - `Downstream Error ignored during caching: ...` from `pingora_proxy`: a client that went
///   away while its request filled the cache, which goes on for the other clients (debug);
/// - `HTTP server fails to read from downstream: ...` from Pingora's HTTP server (the admin
///   listener's): the same for a client of the admin listener (debug);
/// - `No incoming socket transfer, sleep 1s and try again` from the upgrade hand-over: a
///   `run --upgrade` process that waits for the old one's sockets (info);
/// - `failed to acquire reusable stream` from Pingora's connectors: an idle origin connection
///   that the pool's idle watcher still held when a request took it, so the request opens a
///   new connection instead (debug). Pingora 0.9.1 logs this at error level although nothing
///   fails; under 400 concurrent requests to one origin it came 38 times.
fn lowered_level(record: &log::Record<'_>) -> Option<log::Level> {
    if record.level() > log::Level::Warn {
        return None;
    }
    let target = record.target();
    let message = record.args().to_string();
    LOWERED
        .iter()
        .find(|lowered| {
            let module = target
                .strip_prefix(lowered.target)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
            module && (lowered.matches)(&message)
        })
        .map(|lowered| lowered.level)
}

/// A Pingora line that [`lowered_level`] lowers.
struct Lowered {
    /// The module it comes from; its submodules count too.
    target: &'static str,
    /// The level it is logged at instead.
    level: log::Level,
    /// Tells whether a message of `target` is this line.
    matches: fn(&str) -> bool,
}

/// The lines of [`lowered_level`].
const LOWERED: [Lowered; 6] = [
    Lowered {
        target: "pingora_proxy",
        level: log::Level::Debug,
        matches: |m| m.starts_with("Fail to proxy: ") && m.contains("downstream session type:"),
    },
    Lowered {
        target: "pingora_proxy::proxy_cache",
        level: log::Level::Debug,
        matches: |m| m.starts_with("Fail to serve cache: Downstream "),
    },
    Lowered {
        target: "pingora_proxy",
        level: log::Level::Debug,
        matches: |m| m.starts_with("Downstream Error ignored during caching: "),
    },
    Lowered {
        target: "pingora_core::apps::http_app",
        level: log::Level::Debug,
        matches: |m| m.starts_with("HTTP server fails to read from downstream: "),
    },
    Lowered {
        target: "pingora_core::server::transfer_fd",
        level: log::Level::Info,
        matches: |m| m.starts_with("No incoming socket transfer"),
    },
    Lowered {
        target: "pingora_core::connectors",
        level: log::Level::Debug,
        matches: |m| m == "failed to acquire reusable stream",
    },
];

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

    /// Returns the level [`lowered_level`] gives a record of `level`, `target` and `message`.
    fn lowered(level: log::Level, target: &str, message: &str) -> Option<log::Level> {
        lowered_level(
            &log::Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{message}"))
                .build(),
        )
    }

    #[test]
    fn pingora_noise_lowered() {
        let closed = "Fail to proxy: Downstream ConnectionClosed context: while reading request \
                      headers, bytes already read: 1, downstream session type: h1";
        let error = log::Level::Error;
        assert_eq!(
            lowered(error, "pingora_proxy", closed),
            Some(log::Level::Debug)
        );
        let admin = "HTTP server fails to read from downstream:  ConnectionClosed context: while \
                     reading request headers, bytes already read: 25";
        assert_eq!(
            lowered(error, "pingora_core::apps::http_app", admin),
            Some(log::Level::Debug)
        );
        let cache = "pingora_proxy::proxy_cache";
        let stopped = "Fail to serve cache: Downstream WriteTimedout context: while writing h2 \
                       request body, timeout: 60s, GET /a, Host: a.test";
        assert_eq!(lowered(error, cache, stopped), Some(log::Level::Debug));
        let aborted = "Fail to serve cache:  ReadError context: the cache fill this response \
                       streams from was aborted, GET /a, Host: a.test";
        assert_eq!(lowered(error, cache, aborted), None);
        let filling = "Downstream Error ignored during caching:  ConnectionClosed context: \
                       Prematurely before response body is complete, GET /dg, Host: a.test";
        assert_eq!(
            lowered(log::Level::Warn, "pingora_proxy::proxy_h1", filling),
            Some(log::Level::Debug)
        );
        let waiting = "No incoming socket transfer, sleep 1s and try again";
        let transfer = "pingora_core::server::transfer_fd";
        assert_eq!(lowered(error, transfer, waiting), Some(log::Level::Info));
        let pool = "failed to acquire reusable stream";
        assert_eq!(
            lowered(error, "pingora_core::connectors", pool),
            Some(log::Level::Debug)
        );
    }

    #[test]
    fn other_pingora_errors_kept() {
        let error = log::Level::Error;
        let upstream = "Fail to proxy: Upstream ConnectRefused, status: 502, tries: 1";
        assert_eq!(lowered(error, "pingora_proxy", upstream), None);
        let closed = "Fail to proxy: x, downstream session type: h1";
        assert_eq!(lowered(error, "pingora_core", closed), None);
        assert_eq!(lowered(log::Level::Info, "pingora_proxy", closed), None);
    }
}
