//! Tests the export-tree file server: decisions, streaming over a session, and a real server.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mirror_proxy::origin::export_tree::ExportTree;
use mirror_proxy::origin::file_server::{
    content_type, file_server_service, FileResponse, FileServerApp, ResponseBody,
};
use pingora::apps::HttpServerApp;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

const OLD: &str = "20260101T120000Z";
const NEW: &str = "20260102T120000Z";
const INDEX: &[u8] = br#"{"domains":["primary"]}"#;

/// Builds a tree with two exports and `latest -> NEW`.
fn tree_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for id in [OLD, NEW] {
        let primary = tmp.path().join(id).join("mirror/primary");
        fs::create_dir_all(&primary).expect("mkdir");
        fs::write(tmp.path().join(id).join("mirror/index.json"), INDEX).expect("write");
        fs::write(primary.join("bundle.json"), format!("bundle of {id}")).expect("write");
        fs::write(primary.join("bundle.json.jws"), "sig").expect("write");
    }
    symlink(NEW, tmp.path().join("latest")).expect("symlink");
    tmp
}

fn app(root: &Path) -> FileServerApp {
    FileServerApp::new(Arc::new(ExportTree::new(root, None).expect("tree")))
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut req = RequestHeader::build(method, path.as_bytes(), None).expect("request");
    for (name, value) in headers {
        req.append_header(name.to_string(), *value).expect("header");
    }
    req
}

async fn get(app: &FileServerApp, path: &str, headers: &[(&str, &str)]) -> FileResponse {
    app.respond(&request("GET", path, headers), SystemTime::now())
        .await
}

fn header(response: &FileResponse, name: &str) -> Option<String> {
    let value = response.header.headers.get(name)?;
    value.to_str().ok().map(str::to_string)
}

fn status(response: &FileResponse) -> u16 {
    response.header.status.as_u16()
}

async fn etag_of(app: &FileServerApp, path: &str) -> String {
    header(&get(app, path, &[]).await, "etag").expect("etag")
}

#[tokio::test]
async fn get_ok_status() {
    let tmp = tree_dir();
    let response = get(&app(tmp.path()), &format!("/{NEW}/mirror/index.json"), &[]).await;
    assert_eq!(status(&response), 200);
}

#[tokio::test]
async fn get_ok_headers() {
    let tmp = tree_dir();
    let response = get(&app(tmp.path()), &format!("/{NEW}/mirror/index.json"), &[]).await;
    let len = INDEX.len().to_string();
    assert_eq!(
        header(&response, "content-length").as_deref(),
        Some(len.as_str())
    );
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(&response, "x-export-id").as_deref(), Some(NEW));
    assert_eq!(header(&response, "accept-ranges").as_deref(), Some("none"));
    assert!(header(&response, "last-modified").is_some());
    assert!(header(&response, "date").is_some());
}

#[tokio::test]
async fn get_ok_body_is_file() {
    let tmp = tree_dir();
    let response = get(&app(tmp.path()), &format!("/{OLD}/mirror/index.json"), &[]).await;
    let ResponseBody::File(file) = response.body else {
        panic!("expected a file body, got {:?}", response.body);
    };
    assert_eq!(file.len(), INDEX.len() as u64);
}

#[tokio::test]
async fn get_jws_content_type() {
    let tmp = tree_dir();
    let path = format!("/{OLD}/mirror/primary/bundle.json.jws");
    let response = get(&app(tmp.path()), &path, &[]).await;
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/jose")
    );
}

#[tokio::test]
async fn etag_is_strong_quoted_hex() {
    let tmp = tree_dir();
    let etag = etag_of(&app(tmp.path()), &format!("/{NEW}/mirror/index.json")).await;
    let inner = etag.strip_prefix('"').and_then(|e| e.strip_suffix('"'));
    assert!(inner.is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())));
}

#[tokio::test]
async fn etag_differs_between_exports() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    let old = etag_of(&app, &format!("/{OLD}/mirror/index.json")).await;
    let new = etag_of(&app, &format!("/{NEW}/mirror/index.json")).await;
    assert_ne!(old, new);
}

#[tokio::test]
async fn head_has_length_no_body() {
    let tmp = tree_dir();
    let req = request("HEAD", &format!("/{NEW}/mirror/index.json"), &[]);
    let response = app(tmp.path()).respond(&req, SystemTime::now()).await;
    let len = INDEX.len().to_string();
    assert_eq!(
        header(&response, "content-length").as_deref(),
        Some(len.as_str())
    );
    assert!(matches!(response.body, ResponseBody::Empty));
}

#[tokio::test]
async fn head_error_has_no_body() {
    let tmp = tree_dir();
    let req = request("HEAD", &format!("/{NEW}/absent.json"), &[]);
    let response = app(tmp.path()).respond(&req, SystemTime::now()).await;
    assert!(matches!(response.body, ResponseBody::Empty));
}

#[tokio::test]
async fn if_none_match_hit_is_304() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    let path = format!("/{NEW}/mirror/index.json");
    let etag = etag_of(&app, &path).await;
    let response = get(&app, &path, &[("if-none-match", &etag)]).await;
    assert_eq!(status(&response), 304);
    assert_eq!(header(&response, "etag"), Some(etag));
    assert!(matches!(response.body, ResponseBody::Empty));
}

#[tokio::test]
async fn if_none_match_list_is_304() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    let path = format!("/{NEW}/mirror/index.json");
    let list = format!("\"other\", {}", etag_of(&app, &path).await);
    assert_eq!(
        status(&get(&app, &path, &[("if-none-match", &list)]).await),
        304
    );
}

#[tokio::test]
async fn if_none_match_star_is_304() {
    let tmp = tree_dir();
    let path = format!("/{NEW}/mirror/index.json");
    let response = get(&app(tmp.path()), &path, &[("if-none-match", "*")]).await;
    assert_eq!(status(&response), 304);
}

#[tokio::test]
async fn if_none_match_weak_is_200() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    let path = format!("/{NEW}/mirror/index.json");
    let weak = format!("W/{}", etag_of(&app, &path).await);
    assert_eq!(
        status(&get(&app, &path, &[("if-none-match", &weak)]).await),
        200
    );
}

#[tokio::test]
async fn if_none_match_miss_beats_if_modified_since() {
    let tmp = tree_dir();
    let headers = [
        ("if-none-match", "\"other\""),
        ("if-modified-since", "Fri, 01 Jan 9999 00:00:00 GMT"),
    ];
    let path = format!("/{NEW}/mirror/index.json");
    assert_eq!(status(&get(&app(tmp.path()), &path, &headers).await), 200);
}

#[tokio::test]
async fn if_modified_since_later_is_304() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    let path = format!("/{NEW}/mirror/index.json");
    let last_modified = header(&get(&app, &path, &[]).await, "last-modified").expect("date");
    let headers = [("if-modified-since", last_modified.as_str())];
    assert_eq!(status(&get(&app, &path, &headers).await), 304);
}

#[tokio::test]
async fn if_modified_since_earlier_is_200() {
    let tmp = tree_dir();
    let headers = [("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")];
    let path = format!("/{NEW}/mirror/index.json");
    assert_eq!(status(&get(&app(tmp.path()), &path, &headers).await), 200);
}

#[tokio::test]
async fn not_found_cases() {
    let tmp = tree_dir();
    let outside = tempfile::tempdir().expect("tempdir");
    fs::write(outside.path().join("secret.json"), "secret").expect("write");
    let mirror = tmp.path().join(NEW).join("mirror");
    symlink(
        outside.path().join("secret.json"),
        mirror.join("outside.json"),
    )
    .expect("symlink");
    let other = tmp.path().join(OLD).join("mirror/index.json");
    symlink(other, mirror.join("other-export.json")).expect("symlink");
    symlink("/etc/hostname", mirror.join("etc.json")).expect("symlink");
    symlink("primary", mirror.join("dirlink")).expect("symlink");
    let app = app(tmp.path());
    for path in [
        format!("/{NEW}/mirror/absent.json"),
        format!("/{NEW}/mirror/primary"),
        format!("/{NEW}/mirror/dirlink"),
        format!("/{NEW}/mirror/index.json/x"),
        format!("/{NEW}/mirror/outside.json"),
        format!("/{NEW}/mirror/other-export.json"),
        format!("/{NEW}/mirror/etc.json"),
        format!("/{NEW}"),
        "/20250101T000000Z/mirror/index.json".to_string(),
        "/latest/mirror/index.json".to_string(),
    ] {
        assert_eq!(status(&get(&app, &path, &[]).await), 404, "{path}");
    }
}

#[tokio::test]
async fn fifo_is_not_found() {
    let tmp = tree_dir();
    let fifo = tmp.path().join(NEW).join("mirror/pipe.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let path = format!("/{NEW}/mirror/pipe.json");
    assert_eq!(status(&get(&app(tmp.path()), &path, &[]).await), 404);
}

#[tokio::test]
async fn symlink_inside_export_is_served() {
    let tmp = tree_dir();
    symlink("mirror/index.json", tmp.path().join(NEW).join("index.json")).expect("symlink");
    let response = get(&app(tmp.path()), &format!("/{NEW}/index.json"), &[]).await;
    assert_eq!(status(&response), 200);
}

#[tokio::test]
async fn symlink_type_from_requested_name() {
    let tmp = tree_dir();
    let mirror = tmp.path().join(NEW).join("mirror");
    fs::write(mirror.join("blob"), INDEX).expect("write");
    symlink("blob", mirror.join("linked.json")).expect("symlink");
    let response = get(&app(tmp.path()), &format!("/{NEW}/mirror/linked.json"), &[]).await;
    let content_type = header(&response, "content-type");
    assert_eq!(content_type.as_deref(), Some("application/json"));
}

#[tokio::test]
async fn bad_request_cases() {
    let tmp = tree_dir();
    let app = app(tmp.path());
    for path in [
        format!("/{NEW}/mirror/../mirror/index.json"),
        format!("/{NEW}/./mirror/index.json"),
        format!("/{NEW}//mirror/index.json"),
        format!("/{NEW}/mirror/"),
        format!("/{NEW}/mirror/%2e%2e/index.json"),
        format!("/{NEW}%2Fmirror/index.json"),
        "/../etc/passwd".to_string(),
        "/.tmp-1/mirror/index.json".to_string(),
        "/".to_string(),
        "*".to_string(),
    ] {
        assert_eq!(status(&get(&app, &path, &[]).await), 400, "{path}");
    }
}

#[tokio::test]
async fn post_is_405() {
    let tmp = tree_dir();
    let req = request("POST", &format!("/{NEW}/mirror/index.json"), &[]);
    let response = app(tmp.path()).respond(&req, SystemTime::now()).await;
    assert_eq!(status(&response), 405);
    assert_eq!(header(&response, "allow").as_deref(), Some("GET, HEAD"));
}

#[test]
fn content_type_table() {
    let cases = [
        ("a.json", "application/json"),
        ("a.json.jws", "application/jose"),
        ("a.jsonl", "application/x-ndjson"),
        ("a.sig", "text/plain"),
        ("a.txt", "text/plain; charset=utf-8"),
        ("a.tar.gz", "application/gzip"),
        ("a.tar", "application/x-tar"),
        ("index", "application/octet-stream"),
    ];
    for (name, expected) in cases {
        assert_eq!(content_type(Path::new(name)), expected, "{name}");
    }
}

// ---- Streaming over a real Pingora session (in-memory duplex pipe) ----

/// A parsed HTTP/1.1 response: status, headers (lowercase names) and body.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Reads one response head, then, when `has_body`, `Content-Length` body bytes (fewer at EOF).
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S, has_body: bool) -> RawResponse {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: buf[head_end..].to_vec(),
    };
    let want = if has_body {
        response.content_length()
    } else {
        0
    };
    read_body(stream, &mut response.body, want).await;
    response
}

/// Reads into `body` until it holds `want` bytes or the stream ends.
async fn read_body<S: AsyncRead + Unpin>(stream: &mut S, body: &mut Vec<u8>, want: usize) {
    let mut chunk = vec![0u8; 256 * 1024];
    while body.len() < want {
        let n = stream.read(&mut chunk).await.expect("read body");
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, method: &str, path: &str) {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: origin\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
}

/// Serves one request arriving on an in-memory pipe; returns the client end and the task,
/// whose output says whether the connection was handed back for reuse.
fn serve_one(
    app: FileServerApp,
    pipe_size: usize,
) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<bool>) {
    let (client, server) = tokio::io::duplex(pipe_size);
    let app = Arc::new(app);
    let task = tokio::spawn(async move {
        let (_tx, shutdown) = watch::channel(false);
        let session = ServerSession::new_http1(Box::new(server));
        app.process_new_http(session, &shutdown).await.is_some()
    });
    (client, task)
}

/// Writes a file of `len` bytes whose content is a repeating byte pattern.
fn pattern_file(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    fs::write(path, &data).expect("write");
    data
}

#[tokio::test]
async fn stream_large_file_exact() {
    let tmp = tree_dir();
    let path = tmp.path().join(NEW).join("mirror/primary/bundle.json");
    let data = pattern_file(&path, 3 * 1024 * 1024 + 17);
    let (mut client, task) = serve_one(app(tmp.path()), 64 * 1024);
    send(
        &mut client,
        "GET",
        &format!("/{NEW}/mirror/primary/bundle.json"),
    )
    .await;
    let response = read_response(&mut client, true).await;
    assert!(response.body == data, "body differs from the file");
    assert!(task.await.expect("join"), "connection not reusable");
}

#[tokio::test]
async fn stream_error_keeps_connection() {
    let tmp = tree_dir();
    let (mut client, task) = serve_one(app(tmp.path()), 64 * 1024);
    send(&mut client, "GET", &format!("/{NEW}/absent.json")).await;
    let response = read_response(&mut client, true).await;
    assert_eq!(response.status, 404);
    assert!(task.await.expect("join"), "connection not reusable");
}

#[tokio::test]
async fn stream_head_has_no_body() {
    let tmp = tree_dir();
    let (mut client, task) = serve_one(app(tmp.path()), 64 * 1024);
    send(&mut client, "HEAD", &format!("/{NEW}/mirror/index.json")).await;
    let response = read_response(&mut client, false).await;
    assert_eq!(
        (response.content_length(), response.body.len()),
        (INDEX.len(), 0)
    );
    assert!(task.await.expect("join"), "connection not reusable");
}

#[tokio::test]
async fn stream_shrunk_file_aborts() {
    let tmp = tree_dir();
    let path = tmp.path().join(NEW).join("mirror/primary/bundle.json");
    pattern_file(&path, 4 * 1024 * 1024);
    let (mut client, task) = serve_one(app(tmp.path()), 64 * 1024);
    send(
        &mut client,
        "GET",
        &format!("/{NEW}/mirror/primary/bundle.json"),
    )
    .await;
    let mut response = read_response(&mut client, false).await;
    read_body(&mut client, &mut response.body, 100 * 1024).await;
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(1024 * 1024)
        .expect("truncate");
    read_body(&mut client, &mut response.body, usize::MAX).await;
    assert!(
        response.body.len() < response.content_length(),
        "short body looked complete"
    );
    assert!(!task.await.expect("join"), "aborted connection was reused");
}

#[tokio::test]
async fn stream_grown_file_aborts() {
    let tmp = tree_dir();
    let path = tmp.path().join(NEW).join("mirror/primary/bundle.json");
    pattern_file(&path, 2 * 1024 * 1024);
    let (mut client, task) = serve_one(app(tmp.path()), 64 * 1024);
    send(
        &mut client,
        "GET",
        &format!("/{NEW}/mirror/primary/bundle.json"),
    )
    .await;
    let mut response = read_response(&mut client, false).await;
    read_body(&mut client, &mut response.body, 100 * 1024).await;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut file, b"appended").expect("append");
    read_body(&mut client, &mut response.body, usize::MAX).await;
    assert!(
        response.body.len() < response.content_length(),
        "changed body looked complete"
    );
    assert!(!task.await.expect("join"), "aborted connection was reused");
}

// ---- A real Pingora server on a Unix socket ----

/// Stops the server when notified, without OS signals.
struct StopSignal(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// Connects to `socket`, retrying for up to 5 s while the server starts.
async fn connect(socket: &Path) -> tokio::net::UnixStream {
    for _ in 0..500 {
        if let Ok(stream) = tokio::net::UnixStream::connect(socket).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server did not listen on {} within 5 s", socket.display());
}

#[tokio::test]
async fn server_on_uds_reuses_connection() {
    let tmp = tree_dir();
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("origin.sock");
    let tree = Arc::new(ExportTree::new(tmp.path(), None).expect("tree"));
    let service = file_server_service("export tree", tree, &socket);
    let stop = Arc::new(Notify::new());
    let stop_signal = StopSignal(stop.clone());
    let server = thread::spawn(move || {
        let mut server = Server::new_with_opt_and_conf(None, ServerConf::default());
        server.bootstrap();
        server.add_service(service);
        server.run(RunArgs {
            shutdown_signal: Box::new(stop_signal),
        });
    });
    let mut stream = connect(&socket).await;
    send(&mut stream, "GET", &format!("/{NEW}/mirror/index.json")).await;
    let first = read_response(&mut stream, true).await;
    send(
        &mut stream,
        "GET",
        &format!("/{OLD}/mirror/primary/bundle.json"),
    )
    .await;
    let second = read_response(&mut stream, true).await;
    drop(stream);
    let mode = fs::metadata(&socket).map(|m| m.permissions().mode() & 0o777);
    stop.notify_one();
    let joined = tokio::task::spawn_blocking(move || server.join().is_ok()).await;
    assert_eq!(mode.ok(), Some(0o600), "socket mode");
    assert_eq!((first.status, first.body.as_slice()), (200, INDEX));
    assert_eq!(second.body, format!("bundle of {OLD}").into_bytes());
    assert_eq!(second.header("x-export-id"), Some(OLD));
    assert!(joined.unwrap_or(false), "server thread panicked");
}
