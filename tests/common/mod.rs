//! Test fixtures: the real gateway on port 0, a real HTTP origin on loopback, export trees.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirror_proxy::app::{App, RunningGateway};
pub use mirror_proxy::cache::TestClock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A gateway running in this process on a loopback port picked by the OS.
pub struct TestGateway {
    pub running: RunningGateway,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl TestGateway {
    /// Writes `config` to `dir/gateway.toml` and starts the gateway; `[server]` must listen on
    /// `127.0.0.1:0`.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_inner(dir, config, None)
    }

    /// Starts the gateway like [`TestGateway::start`], with the cache's freshness following
    /// the returned clock, which the test moves forward instead of sleeping.
    pub fn start_with_clock(dir: &Path, config: &str) -> (Self, TestClock) {
        let clock = TestClock::new();
        (Self::start_inner(dir, config, Some(&clock)), clock)
    }

    fn start_inner(dir: &Path, config: &str, clock: Option<&TestClock>) -> Self {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let config = mirror_proxy::config::load(&path, Vec::new())
            .unwrap_or_else(|errors| panic!("invalid test config: {errors:#?}"));
        let app = match clock {
            Some(clock) => App::build_with_cache_clock(&config, clock),
            None => App::build(&config),
        }
        .expect("gateway builds");
        let addr = app.listen_addrs()[0];
        let running = app.spawn();
        wait_for_port(addr);
        Self {
            running,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// Returns the URL of `path` on this gateway.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn wait_for_port(addr: SocketAddr) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("gateway did not accept connections on {addr}");
}

/// The `[server]`, `[log]` and `[cache]` sections every test config starts with.
pub const BASE_CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:0"]
threads = 2
grace_period_secs = 0
shutdown_timeout_secs = 1

[log]
access_log = "off"
level = "warn"

[cache]
memory_bytes = "64MiB"
max_object_bytes = "32MiB"
lock_wait_timeout_secs = 10
lock_age_timeout_secs = 20
"#;

/// Returns the config tables of domain `id` for the host names `hosts`, with one HTTP origin at
/// `origin` for every path.
pub fn http_domain(id: &str, hosts: &[&str], origin: SocketAddr) -> String {
    let hosts = hosts
        .iter()
        .map(|host| format!("{host:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[domains.{id}]
hosts = [{hosts}]
[domains.{id}.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.{id}.routes]]
prefix = "/"
origin = "web"
"#
    )
}

/// Returns a config with the lines `server_keys` added to `[server]`, the access log in
/// `access.log`, and one domain `id` for hosts `127.0.0.1` and `a.test` in front of `origin`.
/// Its `rate_limit` plugin allows `burst` requests per client address and refills one per
/// 100 s, so no refill happens while a test runs.
pub fn rate_limited_config(id: &str, origin: SocketAddr, burst: u32, server_keys: &str) -> String {
    let base = BASE_CONFIG
        .replace("[server]\n", &format!("[server]\n{server_keys}\n"))
        .replace("access_log = \"off\"", "access_log = \"access.log\"");
    let domain = http_domain(id, &["127.0.0.1", "a.test"], origin);
    format!(
        r#"{base}
{domain}
[[domains.{id}.plugins]]
name = "rate_limit"
requests_per_second = 0.01
burst = {burst}
"#
    )
}

/// Waits up to 5 s for the file at `path` to have `lines` lines and returns its lines.
pub fn wait_for_lines(path: &Path, lines: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<String> = text.lines().map(str::to_owned).collect();
        if found.len() >= lines || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns an HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// Returns the first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the origin sends back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before sending the response header.
    pub delay: Duration,
}

impl Reply {
    /// A 200 with `body` and `Cache-Control: max-age=60`.
    pub fn ok(body: &str) -> Self {
        Self {
            status: 200,
            headers: vec![("cache-control".into(), "max-age=60".into())],
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A real HTTP/1.1 origin on a loopback port, recording every request it gets.
pub struct TestOrigin {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestOrigin {
    /// Starts an origin that answers every request with `responder`'s reply.
    pub async fn start(responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let responder: Responder = Arc::new(responder);
        let recorded = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let responder = Arc::clone(&responder);
                let recorded = Arc::clone(&recorded);
                tokio::spawn(serve_connection(stream, responder, recorded));
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    /// Returns every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// Returns how many requests were received.
    pub fn count(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    responder: Responder,
    recorded: Arc<Mutex<Vec<Recorded>>>,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        let request = Recorded {
            method,
            target,
            headers,
        };
        let length: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        recorded.lock().expect("lock").push(request.clone());
        let reply = responder(&request);
        tokio::time::sleep(reply.delay).await;
        let mut head = format!(
            "HTTP/1.1 {} X\r\ncontent-length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let stream = reader.get_mut();
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if request.method != "HEAD" && stream.write_all(&reply.body).await.is_err() {
            return;
        }
    }
}

/// Builds an export tree under `root` with exports `20260101T000000Z` (old) and
/// `20260102T000000Z` (new) and `latest` pointing at the new one. Each export has
/// `mirror/index.json` and `mirror/primary/{manifest.json,bundle.json,bundle.json.jws}` whose
/// contents name the export.
pub fn export_tree(root: &Path) {
    for id in ["20260101T000000Z", "20260102T000000Z"] {
        let dir = root.join(id).join("mirror/primary");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            root.join(id).join("mirror/index.json"),
            format!("{{\"exportId\":\"{id}\"}}"),
        )
        .expect("write");
        std::fs::write(
            dir.join("manifest.json"),
            format!("{{\"manifest\":\"{id}\"}}"),
        )
        .expect("write");
        std::fs::write(dir.join("bundle.json"), format!("{{\"bundle\":\"{id}\"}}")).expect("write");
        std::fs::write(dir.join("bundle.json.jws"), format!("sig-{id}")).expect("write");
    }
    std::os::unix::fs::symlink("20260102T000000Z", root.join("latest")).expect("symlink");
}

/// Returns a counter value for unique names within one test process.
pub fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A response read off the wire by [`raw_get`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the response was chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Returns the first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Returns the body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` byte for byte and returns everything the server sends until it closes.
/// Panics after 10 s without the end of the response, or on a connection error.
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> Vec<u8> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let first_line = request.lines().next().unwrap_or("");
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete response to {first_line:?} within 10 s"))
        .unwrap_or_else(|e| panic!("{first_line:?} failed: {e}"))
}

/// Reads one response with a `Content-Length` body (none for a HEAD request) off a kept-alive
/// connection, or returns `None` when the connection ends before a status line. Panics after
/// 10 s, or on a response that is not HTTP.
pub async fn read_response(
    reader: &mut BufReader<tokio::net::TcpStream>,
    head: bool,
) -> Option<RawResponse> {
    let read = async {
        let mut line = String::new();
        if reader.read_line(&mut line).await.expect("read status line") == 0 {
            return None;
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut field = String::new();
            reader.read_line(&mut field).await.expect("read header");
            let field = field.trim_end();
            if field.is_empty() {
                break;
            }
            let (name, value) = field.split_once(':').expect("header field");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map_or(0, |(_, value)| value.parse().expect("content-length"));
        let mut body = vec![0; if head { 0 } else { length }];
        reader.read_exact(&mut body).await.expect("read body");
        Some(RawResponse {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response within 10 s")
}

/// Returns whether the server ends the connection within 10 s without sending more bytes.
pub async fn closed(reader: &mut BufReader<tokio::net::TcpStream>) -> bool {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut rest)).await;
    matches!(read, Ok(Ok(0)))
}

/// Sends `GET <raw_target> HTTP/1.1` byte for byte, so that no client library rewrites the
/// path, and reads the whole response (the request carries `Connection: close`).
///
/// `Host` defaults to `127.0.0.1`; an entry of `extra_headers` named `host` replaces it.
/// Panics after 10 s without the end of the response, or on a response that is not HTTP.
pub async fn raw_get(
    addr: SocketAddr,
    raw_target: &str,
    extra_headers: &[(&str, &str)],
) -> RawResponse {
    let mut request = format!("GET {raw_target} HTTP/1.1\r\n");
    if !extra_headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        request.push_str("Host: 127.0.0.1\r\n");
    }
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    let raw = raw_exchange(addr, &request).await;
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "GET {raw_target:?} got no valid HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<RawResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Runs the real `htpasswd` tool (apache2-utils) and returns the `user:hash` line it prints.
///
/// `flags` picks the hash, e.g. `["-B", "-C", "5"]`, `["-m"]` or `["-s"]`.
pub fn htpasswd_line(flags: &[&str], user: &str, password: &str) -> String {
    let output = std::process::Command::new("htpasswd")
        .arg("-nb")
        .args(flags)
        .arg(user)
        .arg(password)
        .output()
        .expect("run htpasswd (install apache2-utils)");
    assert!(
        output.status.success(),
        "htpasswd {flags:?} {user} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("htpasswd prints UTF-8");
    text.lines()
        .next()
        .expect("htpasswd prints a line")
        .to_string()
}

/// Returns the `Authorization` value for Basic credentials `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// Starts the real binary on `dir/gateway.toml` and reads its listen address from the start-up
/// log line, which needs `[log] level` at `info` or lower.
pub fn spawn_gateway(dir: &Path) -> (std::process::Child, SocketAddr) {
    let (child, addr, _log) = spawn_gateway_logged(dir);
    (child, addr)
}

/// Starts the gateway as [`spawn_gateway`] does and also returns every log line written after
/// the start-up line, as it arrives.
pub fn spawn_gateway_logged(
    dir: &Path,
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mirror-gateway"))
        .args(["run", "-c"])
        .arg(dir.join("gateway.toml"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mirror-gateway");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("mirror-gateway exited before logging its listeners");
        };
        if let Some(start) = line.find("http://") {
            let rest = &line[start + "http://".len()..];
            let end = rest.find(['"', ' ', ']']).unwrap_or(rest.len());
            break rest[..end].to_string();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let collected = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            collected.lock().expect("log lines").push(line);
        }
    });
    let addr: SocketAddr = addr.parse().expect("the logged listen address");
    wait_for_port(addr);
    (child, addr, log)
}

/// GETs `/readyz` without credentials, again while the server is still starting its services
/// (the sockets accept before that), for at most 5 seconds.
pub async fn readyz(admin: SocketAddr) -> (u16, String) {
    for _ in 0..250 {
        let resp = client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("body");
        if !body.contains("have not started") {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway did not start its services within 5 s");
}

/// Returns a loopback address where nothing listens: the port of a listener that is closed
/// again, so connections to it are refused.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// Waits up to 5 s until `addr` refuses connections, after its origin was dropped.
pub async fn wait_until_closed(addr: SocketAddr) {
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} still accepts connections 5 s after its origin was dropped");
}
