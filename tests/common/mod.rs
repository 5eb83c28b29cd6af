//! Test fixtures: the real gateway on port 0, a real HTTP origin on loopback, export trees.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirror_proxy::app::{App, RunningGateway};
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
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let config = mirror_proxy::config::load(&path, Vec::new())
            .unwrap_or_else(|errors| panic!("invalid test config: {errors:#?}"));
        let app = App::build(&config).expect("gateway builds");
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

/// An HTTP client that never uses a proxy from the environment.
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

/// A counter for unique names within one test process.
pub fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
