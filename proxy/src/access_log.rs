//! The access log: nginx's `combined` format followed by domain, user, cache status, time and
//! the rejecting budget.
//!
//! ```text
//! 127.0.0.1 - mirror [04/Dec/2026:16:13:16 +0000] "GET /concelier/exports/index.json HTTP/1.1" 200 512 "-" "curl/8.5.0" primary mirror HIT 0.000 -
//! ```
//!
//! The fields after the user agent are the domain id, the authenticated user, the
//! `X-Cache-Status` value, the request time in seconds with millisecond resolution, and the
//! label of the plugin and budget that rejected the request (`rate_limit:rate`,
//! `quota:index:principal`, `htpasswd`). An empty field is written as `-`. Quotes,
//! backslashes, control and non-ASCII bytes in quoted fields are written as `\xHH`, so a
//! client cannot forge log fields.
//!
//! With `log.access_log_format = "json"` each line is one JSON object with the same facts:
//!
//! ```text
//! {"time":"2026-12-04T16:13:16Z","remote_addr":"127.0.0.1","user":"mirror","method":"GET","target":"/concelier/exports/index.json","protocol":"HTTP/1.1","status":200,"body_bytes":512,"referer":null,"user_agent":"curl/8.5.0","domain":"primary","cache_status":"HIT","request_time":0.000,"rejected_by":null}
//! ```
//!
//! Lines are written by a background thread, so a slow disk never blocks a request.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{AccessLogFormat, AccessLogTarget};

/// What one access-log line records.
#[derive(Debug, Clone)]
pub struct AccessEntry<'a> {
    pub remote_addr: Option<IpAddr>,
    pub user: Option<&'a str>,
    pub time: SystemTime,
    /// The request line as received: method, target and version.
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub body_bytes: u64,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub domain: Option<&'a str>,
    pub cache_status: &'a str,
    pub duration: Duration,
    /// The label of the plugin that rejected the request (`RequestState::rejected_by`).
    pub rejected_by: Option<&'a str>,
    /// The budget or check within that plugin (`RequestState::rejected_reason`).
    pub rejected_reason: Option<&'a str>,
}

impl AccessEntry<'_> {
    /// Returns the rejection label: the plugin, then `:` and the reason if there is one.
    fn rejection(&self) -> Option<String> {
        let by = self.rejected_by?;
        Some(match self.rejected_reason {
            Some(reason) => format!("{by}:{reason}"),
            None => by.to_owned(),
        })
    }
}

/// Formats one JSON line, without the trailing newline.
pub fn format_json(e: &AccessEntry<'_>) -> String {
    let text = |value: Option<&str>| value.map_or_else(|| "null".to_string(), json_string);
    let secs = e.time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{{\"time\":\"{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z\",\"remote_addr\":{},\"user\":{},\"method\":{},\"target\":{},\"protocol\":{},\"status\":{},\"body_bytes\":{},\"referer\":{},\"user_agent\":{},\"domain\":{},\"cache_status\":{},\"request_time\":{}.{:03},\"rejected_by\":{}}}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        text(e.remote_addr.map(|a| a.to_string()).as_deref()),
        text(e.user),
        json_string(e.method),
        json_string(e.target),
        json_string(e.version),
        e.status,
        e.body_bytes,
        text(e.referer),
        text(e.user_agent),
        text(e.domain),
        json_string(e.cache_status),
        e.duration.as_secs(),
        e.duration.subsec_millis(),
        text(e.rejection().as_deref()),
    )
}

/// Quotes `value` as a JSON string; control characters become `\u` escapes.
fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Formats one line, without the trailing newline.
pub fn format_line(e: &AccessEntry<'_>) -> String {
    let mut line = String::with_capacity(256);
    let addr = e.remote_addr.map(|a| a.to_string());
    let _ = write!(
        line,
        "{} - {} [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {} {} {}.{:03} {}",
        addr.as_deref().unwrap_or("-"),
        field(e.user),
        format_time(e.time),
        escape(e.method),
        escape(e.target),
        escape(e.version),
        e.status,
        e.body_bytes,
        escape(e.referer.unwrap_or("-")),
        escape(e.user_agent.unwrap_or("-")),
        field(e.domain),
        field(e.user),
        e.cache_status,
        e.duration.as_secs(),
        e.duration.subsec_millis(),
        field(e.rejection().as_deref()),
    );
    line
}

/// An unquoted field: `-` when empty, and escaped like quoted ones.
fn field(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => escape(v).replace(' ', "\\x20"),
        _ => "-".into(),
    }
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte == b'"' || byte == b'\\' || !(0x20..0x7f).contains(&byte) {
            let _ = write!(out, "\\x{byte:02X}");
        } else {
            out.push(byte as char);
        }
    }
    out
}

/// Formats a time as nginx's `$time_local` in UTC: `04/Dec/2026:16:13:16 +0000`.
pub fn format_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Converts days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian
/// calendar, by Howard Hinnant's published `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The access-log writer. Cloning shares the same background writer.
#[derive(Clone)]
pub struct AccessLog {
    sender: Option<mpsc::Sender<Message>>,
    format: AccessLogFormat,
}

enum Message {
    Line(String),
    /// Close and open the log file again, after logrotate moved it.
    Reopen,
    /// Write out every line queued before, then reply.
    Flush(mpsc::Sender<()>),
}

impl AccessLog {
    /// Opens the log target and starts its writer thread; `Off` writes nothing.
    pub fn open(target: &AccessLogTarget, format: AccessLogFormat) -> io::Result<Self> {
        let writer = match target {
            AccessLogTarget::Off => {
                return Ok(Self {
                    sender: None,
                    format,
                })
            }
            target => open_target(target)?,
        };
        let (sender, receiver) = mpsc::channel::<Message>();
        let target = target.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(receiver, writer, &target))?;
        Ok(Self {
            sender: Some(sender),
            format,
        })
    }

    /// Queues one entry.
    /// Returns whether lines go anywhere, so that a caller can skip building an entry.
    pub fn is_on(&self) -> bool {
        self.sender.is_some()
    }

    pub fn log(&self, entry: &AccessEntry<'_>) {
        if let Some(sender) = &self.sender {
            // The writer thread only stops when every sender is gone, so this cannot fail
            // while `self` exists.
            let line = match self.format {
                AccessLogFormat::Combined => format_line(entry),
                AccessLogFormat::Json => format_json(entry),
            };
            let _ = sender.send(Message::Line(line));
        }
    }

    /// Writes out every line queued so far, waiting at most `wait` for the writer thread.
    /// The process exits right after a shutdown, which would lose lines still queued.
    pub fn flush(&self, wait: std::time::Duration) {
        if let Some(sender) = &self.sender {
            let (done, flushed) = mpsc::channel();
            if sender.send(Message::Flush(done)).is_ok() {
                let _ = flushed.recv_timeout(wait);
            }
        }
    }

    /// Reopens a log file (after logrotate renamed it); lines queued before are written to the
    /// old file.
    pub fn reopen(&self) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(Message::Reopen);
        }
    }
}

fn open_target(target: &AccessLogTarget) -> io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        AccessLogTarget::Off | AccessLogTarget::Stdout => Box::new(io::stdout()),
        AccessLogTarget::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        ),
    })
}

/// Writes lines as they come, flushing whenever the queue is empty.
fn write_lines(
    receiver: mpsc::Receiver<Message>,
    writer: Box<dyn Write + Send>,
    target: &AccessLogTarget,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    let mut failed = false;
    while let Ok(first) = receiver.recv() {
        let mut result = Ok(());
        for message in std::iter::once(first).chain(std::iter::from_fn(|| receiver.try_recv().ok()))
        {
            match message {
                Message::Line(line) => result = result.and_then(|()| writeln!(out, "{line}")),
                Message::Flush(done) => {
                    result = result.and_then(|()| out.flush());
                    let _ = done.send(());
                }
                Message::Reopen => {
                    result = result.and_then(|()| out.flush());
                    match open_target(target) {
                        Ok(writer) => out = BufWriter::with_capacity(64 * 1024, writer),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reopen the access log; writing to the old file")
                        }
                    }
                }
            }
        }
        result = result.and_then(|()| out.flush());
        match result {
            Err(e) if !failed => {
                tracing::error!(error = %e, "cannot write the access log; lines are lost until it works again");
                failed = true;
            }
            Ok(()) => failed = false,
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_matches_nginx_format() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_400_796);
        assert_eq!(format_time(t), "04/Dec/2026:16:13:16 +0000");
        assert_eq!(format_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn line_has_combined_fields_and_extras() {
        let entry = AccessEntry {
            remote_addr: Some("127.0.0.1".parse().expect("ip")),
            user: Some("mirror"),
            time: UNIX_EPOCH + Duration::from_secs(1_796_400_796),
            method: "GET",
            target: "/concelier/exports/index.json",
            version: "HTTP/1.1",
            status: 200,
            body_bytes: 512,
            referer: None,
            user_agent: Some("curl/8.5.0"),
            domain: Some("primary"),
            cache_status: "HIT",
            duration: Duration::from_micros(1_500),
            rejected_by: None,
            rejected_reason: None,
        };
        assert_eq!(
            format_line(&entry),
            "127.0.0.1 - mirror [04/Dec/2026:16:13:16 +0000] \"GET /concelier/exports/index.json HTTP/1.1\" 200 512 \"-\" \"curl/8.5.0\" primary mirror HIT 0.001 -"
        );
    }

    #[test]
    fn json_line_has_every_field() {
        let entry = AccessEntry {
            remote_addr: Some("127.0.0.1".parse().expect("ip")),
            user: None,
            time: UNIX_EPOCH + Duration::from_secs(1_796_400_796),
            method: "GET",
            target: "/a\"b",
            version: "HTTP/1.1",
            status: 200,
            body_bytes: 512,
            referer: None,
            user_agent: Some("curl\n"),
            domain: Some("primary"),
            cache_status: "HIT",
            duration: Duration::from_micros(1_500),
            rejected_by: None,
            rejected_reason: None,
        };
        assert_eq!(
            format_json(&entry),
            "{\"time\":\"2026-12-04T16:13:16Z\",\"remote_addr\":\"127.0.0.1\",\"user\":null,\"method\":\"GET\",\"target\":\"/a\\\"b\",\"protocol\":\"HTTP/1.1\",\"status\":200,\"body_bytes\":512,\"referer\":null,\"user_agent\":\"curl\\u000a\",\"domain\":\"primary\",\"cache_status\":\"HIT\",\"request_time\":0.001,\"rejected_by\":null}"
        );
    }

    /// A rejected request's line names the plugin and its budget, in both formats.
    #[test]
    fn rejection_label_in_both_formats() {
        let entry = |by, reason| AccessEntry {
            remote_addr: Some("192.0.2.1".parse().expect("ip")),
            user: None,
            time: UNIX_EPOCH,
            method: "GET",
            target: "/x",
            version: "HTTP/1.1",
            status: 429,
            body_bytes: 0,
            referer: None,
            user_agent: None,
            domain: Some("primary"),
            cache_status: "BYPASS",
            duration: Duration::ZERO,
            rejected_by: by,
            rejected_reason: reason,
        };
        let cases = [
            (Some("rate_limit"), Some("rate"), "rate_limit:rate"),
            (
                Some("rate_limit"),
                Some("concurrency"),
                "rate_limit:concurrency",
            ),
            (
                Some("quota"),
                Some("index:principal"),
                "quota:index:principal",
            ),
            (Some("htpasswd"), None, "htpasswd"),
        ];
        for (by, reason, label) in cases {
            let line = format_line(&entry(by, reason));
            assert!(line.ends_with(&format!(" BYPASS 0.000 {label}")), "{line}");
            let json = format_json(&entry(by, reason));
            assert!(
                json.ends_with(&format!(",\"rejected_by\":\"{label}\"}}")),
                "{json}"
            );
        }
        let line = format_line(&entry(None, Some("rate")));
        assert!(line.ends_with(" BYPASS 0.000 -"), "{line}");
    }

    #[test]
    fn line_escapes_forged_fields() {
        let entry = AccessEntry {
            remote_addr: None,
            user: Some("a b"),
            time: UNIX_EPOCH,
            method: "GET",
            target: "/x\"\n",
            version: "HTTP/1.1",
            status: 400,
            body_bytes: 0,
            referer: None,
            user_agent: Some("é"),
            domain: None,
            cache_status: "BYPASS",
            duration: Duration::ZERO,
            rejected_by: None,
            rejected_reason: None,
        };
        let line = format_line(&entry);
        assert!(line.contains("\"GET /x\\x22\\x0A HTTP/1.1\""), "{line}");
        assert!(line.contains("\"\\xC3\\xA9\""), "{line}");
        assert!(line.starts_with("- - a\\x20b ["), "{line}");
    }
}
