//! Serves the files of an export tree over HTTP/1.1 on a Unix socket, as the gateway's origin.
//!
//! Requests name the export explicitly: `GET /<export-id>/<relative path>`. Only regular files
//! inside that export directory are served; symlinks may point anywhere inside the same export.
//! Responses carry a strong `ETag`, `Last-Modified`, `Content-Type` by extension, `X-Export-Id`
//! and `Accept-Ranges: none`; bodies stream from disk in bounded chunks.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::{debug, error, warn};

use super::export_tree::{validate_export_id, ExportTree};

/// Response header naming the export a response was read from.
pub const EXPORT_ID_HEADER: &str = "x-export-id";

/// Size of the first body chunk. Later chunks double up to [`MAX_CHUNK`].
const FIRST_CHUNK: usize = 64 * 1024;
/// Largest body chunk read and written at once, bounding memory per response.
const MAX_CHUNK: usize = 1024 * 1024;
/// Seconds an idle keep-alive connection is held open.
pub const KEEPALIVE_SECS: u64 = 60;
/// Maximum wait for one write to the gateway before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Latest time `httpdate` can format: the last second of year 9999.
const MAX_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// Serves one export tree's files to the gateway (implements Pingora's [`HttpServerApp`]).
pub struct FileServerApp {
    tree: Arc<ExportTree>,
}

/// A response decided by [`FileServerApp::respond`], before it is written to a connection.
#[derive(Debug)]
pub struct FileResponse {
    /// Status and headers.
    pub header: ResponseHeader,
    /// Body sent after the headers.
    pub body: ResponseBody,
}

/// The body of a [`FileResponse`].
#[derive(Debug)]
pub enum ResponseBody {
    /// No body: a HEAD request or a 304.
    Empty,
    /// A short text body of an error response.
    Text(Bytes),
    /// An open file to stream, whose length equals the `Content-Length` header.
    File(ServedFile),
}

/// An open regular file with the identity its headers were derived from.
#[derive(Debug)]
pub struct ServedFile {
    file: tokio::fs::File,
    path: PathBuf,
    content_type: &'static str,
    stamp: FileStamp,
}

/// Builds a listening service that serves `tree` on the Unix socket `socket_path` (mode 0600).
///
/// Pingora removes a stale socket file at that path when it binds. Pingora takes the path as
/// a string, so a non-UTF-8 path is logged and replaced by its lossy form.
///
/// NOTE: Pingora sets the mode just after `bind`, so for a moment the socket has the umask's
/// mode. Keep it in a directory that only the gateway's user can enter.
pub fn file_server_service(
    name: &str,
    tree: Arc<ExportTree>,
    socket_path: &Path,
) -> Service<FileServerApp> {
    let path = socket_path.to_string_lossy();
    if socket_path.to_str().is_none() {
        warn!(socket = %path, "socket path is not valid UTF-8; Pingora binds its lossy form");
    }
    let mut service = Service::new(name.to_string(), FileServerApp::new(tree));
    service.add_uds(&path, Some(std::fs::Permissions::from_mode(0o600)));
    service
}

impl FileServerApp {
    /// Creates an app serving the exports under `tree`'s root.
    pub fn new(tree: Arc<ExportTree>) -> Self {
        Self { tree }
    }

    /// Decides the response to `req`, with `now` as the `Date` header.
    ///
    /// Status codes: 405 for methods other than GET and HEAD, 400 for a malformed target,
    /// 404 for anything that is not a regular file inside the named export, 304 for a
    /// satisfied `If-None-Match` / `If-Modified-Since`, 500 for I/O errors (logged).
    pub async fn respond(&self, req: &RequestHeader, now: SystemTime) -> FileResponse {
        let mut response = match req.method {
            Method::GET | Method::HEAD => self.respond_get(req, now).await,
            _ => return method_not_allowed(now),
        };
        if req.method == Method::HEAD {
            response.body = ResponseBody::Empty;
        }
        response
    }

    async fn respond_get(&self, req: &RequestHeader, now: SystemTime) -> FileResponse {
        let Some(decoded) = decode_target(req.uri.path()) else {
            debug!(path = %req.uri.path(), "rejecting a request target that is not in canonical form");
            return error_response(StatusCode::BAD_REQUEST, now);
        };
        let target = match parse_target(&decoded) {
            Ok(target) => target,
            Err(reason) => {
                debug!(path = %req.uri.path(), reason, "rejecting a malformed request target");
                return error_response(StatusCode::BAD_REQUEST, now);
            }
        };
        let served = match self.open(&target).await {
            Ok(served) => served,
            Err(OpenError::NotFound) => {
                debug!(path = %req.uri.path(), "no regular file at this path in its export");
                return error_response(StatusCode::NOT_FOUND, now);
            }
            Err(OpenError::Io) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, now),
        };
        let etag = served.stamp.etag();
        let status = if is_not_modified(&req.headers, &etag, served.stamp.mtime) {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::OK
        };
        let fields = match file_fields(status, &served, &etag, target.export_id, now) {
            Ok(fields) => fields,
            Err(e) => {
                error!(path = %served.path.display(), error = %e, "failed to build response headers");
                return error_response(StatusCode::INTERNAL_SERVER_ERROR, now);
            }
        };
        let body = if status == StatusCode::NOT_MODIFIED {
            ResponseBody::Empty
        } else {
            ResponseBody::File(served)
        };
        FileResponse {
            header: response_header(status, fields),
            body,
        }
    }

    /// Opens the file `target` names, if it is a regular file inside its export directory.
    async fn open(&self, target: &Target<'_>) -> Result<ServedFile, OpenError> {
        let export_dir = self.tree.root().join(target.export_id);
        match tokio::fs::symlink_metadata(&export_dir).await {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(OpenError::NotFound),
            Err(e) => return Err(classify(&export_dir, e)),
        }
        if target.relative.is_empty() {
            return Err(OpenError::NotFound);
        }
        let requested = export_dir.join(target.relative);
        let resolved = tokio::fs::canonicalize(&requested)
            .await
            .map_err(|e| classify(&requested, e))?;
        if !resolved.starts_with(&export_dir) {
            warn!(
                requested = %requested.display(),
                resolved = %resolved.display(),
                export_dir = %export_dir.display(),
                "refusing a path that resolves outside its export"
            );
            return Err(OpenError::NotFound);
        }
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&resolved)
            .await
            .map_err(|e| classify(&resolved, e))?;
        let meta = file.metadata().await.map_err(|e| classify(&resolved, e))?;
        if !meta.is_file() {
            return Err(OpenError::NotFound);
        }
        Ok(ServedFile {
            file,
            path: resolved,
            content_type: content_type(Path::new(target.relative)),
            stamp: FileStamp::of(&meta),
        })
    }

    /// Writes the response to the request already read from `session`.
    ///
    /// An error means the connection must be closed rather than reused.
    async fn serve(&self, session: &mut ServerSession) -> Result<(), ServeError> {
        let response = self.respond(session.req_header(), SystemTime::now()).await;
        session
            .write_response_header(Box::new(response.header))
            .await
            .map_err(|e| ServeError::Write(e.to_string()))?;
        match response.body {
            ResponseBody::Empty => Ok(()),
            ResponseBody::Text(text) => session
                .write_response_body(text, true)
                .await
                .map_err(|e| ServeError::Write(e.to_string())),
            ResponseBody::File(served) => stream_file(session, served).await,
        }
    }
}

#[async_trait]
impl HttpServerApp for FileServerApp {
    /// Serves one request, then hands the connection back for reuse when it ended cleanly.
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                debug!(error = %e, "failed to read a request from the gateway");
                return None;
            }
        }
        let keepalive = if *shutdown.borrow() {
            None
        } else {
            Some(KEEPALIVE_SECS)
        };
        session.set_keepalive(keepalive);
        session.set_write_timeout(Some(WRITE_TIMEOUT));
        if let Err(e) = self.serve(&mut session).await {
            match e {
                ServeError::Write(reason) => debug!(reason, "dropping the connection"),
                ServeError::Abort => {}
            }
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(reusable) => {
                reusable.map(|stream| ReusedHttpStream::from_reusable_stream(stream, settings))
            }
            Err(e) => {
                debug!(error = %e, "failed to finish the response; closing the connection");
                None
            }
        }
    }
}

impl ServedFile {
    /// Returns the canonical path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the length in bytes announced in `Content-Length`.
    pub fn len(&self) -> u64 {
        self.stamp.size
    }

    /// Tells whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.stamp.size == 0
    }
}

/// The parts of a request target: `/<export_id>/<relative>`.
struct Target<'a> {
    export_id: &'a str,
    relative: &'a str,
}

/// Reason a file cannot be served.
enum OpenError {
    NotFound,
    Io,
}

/// Reason a connection cannot be reused after a response started.
enum ServeError {
    Write(String),
    Abort,
}

/// The identity of a file's content: device, inode, size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    mtime: SystemTime,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns,
            mtime: meta.modified().unwrap_or(UNIX_EPOCH),
        }
    }

    /// Returns the strong ETag: a quoted hex SHA-256 prefix (128 bits) over
    /// `<dev>-<ino>-<size>-<mtime ns>` in hex, so inode numbers do not reach clients.
    fn etag(&self) -> String {
        let identity = format!(
            "{:x}-{:x}-{:x}-{:x}",
            self.dev, self.ino, self.size, self.mtime_ns
        );
        let digest = Sha256::digest(identity.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("\"{hex}\"")
    }
}

/// Streams `served` as the body, aborting when the file changed since its headers were sent.
///
/// Reads at most [`MAX_CHUNK`] bytes at a time. Before the last chunk it checks the file's
/// size and mtime again: a body that no longer matches its headers must not look complete.
async fn stream_file(
    session: &mut ServerSession,
    mut served: ServedFile,
) -> Result<(), ServeError> {
    let mut remaining = served.stamp.size;
    let mut chunk = FIRST_CHUNK;
    while remaining > 0 {
        let want = usize::try_from(remaining).map_or(chunk, |r| r.min(chunk));
        let mut buf = vec![0u8; want];
        if let Err(e) = served.file.read_exact(&mut buf).await {
            log_read_failure(&served.path, &e);
            return Err(ServeError::Abort);
        }
        remaining -= want as u64;
        if remaining == 0 && changed_since_open(&served).await {
            return Err(ServeError::Abort);
        }
        session
            .write_response_body(Bytes::from(buf), remaining == 0)
            .await
            .map_err(|e| ServeError::Write(e.to_string()))?;
        chunk = (chunk * 2).min(MAX_CHUNK);
    }
    Ok(())
}

/// Tells (and logs) whether the open file's size or mtime differ from when it was opened.
async fn changed_since_open(served: &ServedFile) -> bool {
    match served.file.metadata().await {
        Ok(meta) if FileStamp::of(&meta) == served.stamp => false,
        Ok(_) => {
            warn!(path = %served.path.display(), "file changed while streaming; aborting the response");
            true
        }
        Err(e) => {
            error!(path = %served.path.display(), error = %e, "stat failed while streaming; aborting the response");
            true
        }
    }
}

fn log_read_failure(path: &Path, e: &io::Error) {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        warn!(path = %path.display(), "file shrank while streaming; aborting the response");
    } else {
        error!(path = %path.display(), error = %e, "read failed while streaming; aborting the response");
    }
}

/// Percent-decodes a request path, accepting only the exact form the gateway sends: a
/// normalised path encoded by `crate::path::encode`. Any other spelling (dot segments, `//`,
/// encoded `.` or `/`, needless escapes) is rejected, so one file has one request path.
fn decode_target(raw: &str) -> Option<String> {
    let decoded = crate::path::normalize(raw).ok()?;
    (crate::path::encode(&decoded) == raw).then_some(decoded)
}

/// Splits and checks a decoded request path. The error describes what is wrong with it.
fn parse_target(path: &str) -> Result<Target<'_>, &'static str> {
    let rest = path.strip_prefix('/').ok_or("does not start with '/'")?;
    if rest.contains(['\\', '\0']) {
        return Err("contains '\\' or NUL");
    }
    let (export_id, relative) = rest.split_once('/').unwrap_or((rest, ""));
    validate_export_id(export_id)?;
    if rest.len() > export_id.len() {
        for segment in relative.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err("has an empty, '.' or '..' segment");
            }
        }
    }
    Ok(Target {
        export_id,
        relative,
    })
}

/// Maps an I/O error on `path` to 404 for absent paths and to a logged 500 otherwise.
fn classify(path: &Path, e: io::Error) -> OpenError {
    let absent = matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENAMETOOLONG));
    if absent {
        return OpenError::NotFound;
    }
    error!(path = %path.display(), error = %e, "failed to open export file");
    OpenError::Io
}

/// Evaluates `If-None-Match` (strong comparison, lists and `*`), else `If-Modified-Since`.
fn is_not_modified(headers: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    let mut if_none_match = headers.get_all(header::IF_NONE_MATCH).iter().peekable();
    if if_none_match.peek().is_some() {
        return if_none_match.any(|value| {
            value
                .to_str()
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .any(|t| t == "*" || t == etag)
                })
                .unwrap_or(false)
        });
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    since.is_some_and(|since| http_time(mtime) <= since)
}

/// Builds the headers of a 200 or 304 for `served`.
fn file_fields(
    status: StatusCode,
    served: &ServedFile,
    etag: &str,
    export_id: &str,
    now: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, http::header::InvalidHeaderValue> {
    let mut fields = vec![
        (header::DATE, http_date(now)),
        (header::ETAG, HeaderValue::from_str(etag)?),
        (header::LAST_MODIFIED, http_date(served.stamp.mtime)),
        (
            HeaderName::from_static(EXPORT_ID_HEADER),
            HeaderValue::from_str(export_id)?,
        ),
    ];
    if status == StatusCode::OK {
        fields.extend([
            (header::CONTENT_LENGTH, HeaderValue::from(served.stamp.size)),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(served.content_type),
            ),
            (header::ACCEPT_RANGES, HeaderValue::from_static("none")),
        ]);
    }
    Ok(fields)
}

/// Returns the media type for `path`'s extension, or `application/octet-stream` when unknown.
///
/// The server passes the requested name, so a symlink's target does not change the type.
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("jws") => "application/jose",
        Some("jsonl") => "application/x-ndjson",
        Some("sig") => "text/plain",
        Some("txt") => "text/plain; charset=utf-8",
        Some("gz") => "application/gzip",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
}

fn method_not_allowed(now: SystemTime) -> FileResponse {
    let allow = (header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    error_response_with(StatusCode::METHOD_NOT_ALLOWED, now, Some(allow))
}

fn error_response(status: StatusCode, now: SystemTime) -> FileResponse {
    error_response_with(status, now, None)
}

/// Builds an error response with a one-line text body such as `404 Not Found`.
fn error_response_with(
    status: StatusCode,
    now: SystemTime,
    extra: Option<(HeaderName, HeaderValue)>,
) -> FileResponse {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut fields = vec![
        (header::DATE, http_date(now)),
        (header::CONTENT_LENGTH, HeaderValue::from(text.len())),
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ),
    ];
    fields.extend(extra);
    FileResponse {
        header: response_header(status, fields),
        body: ResponseBody::Text(Bytes::from(text)),
    }
}

fn response_header(status: StatusCode, fields: Vec<(HeaderName, HeaderValue)>) -> ResponseHeader {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers.extend(fields);
    ResponseHeader::from(parts)
}

/// Formats `time` as an HTTP date, clamped to the range `httpdate` accepts.
fn http_date(time: SystemTime) -> HeaderValue {
    let text = httpdate::fmt_http_date(http_time(time));
    HeaderValue::from_str(&text)
        .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// Truncates `time` to whole seconds within 1970..=9999, as HTTP dates carry it.
fn http_time(time: SystemTime) -> SystemTime {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_HTTP_DATE_SECS);
    UNIX_EPOCH + Duration::from_secs(secs)
}
