//! End-to-end: `server.proxy_protocol` on the real gateway, with raw TCP clients that send
//! PROXY headers from trusted and untrusted loopback addresses.
//!
//! The trusted proxy is 127.0.0.1; a client socket bound to 127.0.0.2 is an untrusted peer.
//! The `rate_limit` plugin allows one request per client address, so a 200 or a 429 shows
//! which address the gateway counted. Each test uses its own domain id, since counts are kept
//! per domain id for the life of the process.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rate_limited_config, wait_for_lines, Reply, TestGateway, TestOrigin};
use mirror_proxy::metrics::ScrapeInputs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRUSTED: &str = "127.0.0.1";
const UNTRUSTED: &str = "127.0.0.2";

/// Returns a config with the PROXY protocol on, 127.0.0.1 and 10.0.0.0/8 trusted, the lines
/// `extra` in `[server]`, and one domain `id` in front of `origin` that allows `burst`
/// requests per client address.
fn config(id: &str, origin: SocketAddr, burst: u32, extra: &str) -> String {
    let server_keys = format!(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n{extra}"
    );
    rate_limited_config(id, origin, burst, &server_keys)
}

/// Returns a GET of `path` with `Connection: close` and the extra header lines `headers`.
fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

fn v1(source: &str, port: u16) -> Vec<u8> {
    let family = if source.contains(':') { "TCP6" } else { "TCP4" };
    let destination = if source.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {family} {source} {destination} {port} 80\r\n").into_bytes()
}

/// Returns a version 2 PROXY command header from `source` to 127.0.0.1:80, or to [::1]:80 for
/// an IPv6 source, with one NOOP TLV after the addresses.
fn v2(source: SocketAddr) -> Vec<u8> {
    let mut addresses = Vec::new();
    let family = match source.ip() {
        IpAddr::V4(ip) => {
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&[127, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(ip) => {
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&80u16.to_be_bytes());
    addresses.extend_from_slice(b"\x04\x00\x01\x00");
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    header.push(family);
    let length = u16::try_from(addresses.len()).expect("header length");
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(&addresses);
    header
}

/// Connects to `addr` from the loopback address `from`, sends `bytes` in one write, and returns
/// everything received until the server closes. Panics after 10 s.
async fn exchange_from(from: &str, addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().expect("loopback address");
    socket.bind(local).expect("bind the client address");
    let exchange = async {
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(bytes).await?;
        let mut received = Vec::new();
        match stream.read_to_end(&mut received).await {
            // A reset after a close with unread bytes ends the exchange as well.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => {
                other?;
            }
        }
        Ok::<_, std::io::Error>(received)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the gateway closed the connection within 10 s")
        .expect("exchange")
}

/// Returns the status code of each HTTP response in `received`, in order.
fn statuses(received: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(received);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text[at + 9..].get(..3)?.parse().ok())
        .collect()
}

/// Waits up to 5 s for the access log at `path` to have `lines` lines and returns the client
/// address of each, the first field of the combined format, sorted.
fn logged_clients(path: &Path, lines: usize) -> Vec<String> {
    let mut clients: Vec<String> = wait_for_lines(path, lines)
        .iter()
        .map(|line| line.split(' ').next().unwrap_or("").to_owned())
        .collect();
    clients.sort();
    clients
}

/// Returns the gateway's metrics in the Prometheus text format.
fn metrics(gateway: &TestGateway) -> String {
    let monitor = gateway.running.monitor();
    monitor
        .metrics
        .render(&ScrapeInputs::default())
        .expect("render metrics")
}

fn rejections(reason: &str, count: u32) -> String {
    format!("mirror_gateway_proxy_protocol_rejections_total{{reason=\"{reason}\"}} {count}")
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxy_names_each_client() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("pp-trusted", origin.addr, 1, ""));
    let addr = gateway.addr;

    // The request goes in the same write as the header.
    let bytes = [v1("192.0.2.1", 4000), get("/a", "")].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    let source: SocketAddr = "192.0.2.2:4001".parse().expect("address");
    let bytes = [v2(source), get("/c", "")].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    let source: SocketAddr = "[2001:db8::7]:4002".parse().expect("address");
    let bytes = [v2(source), get("/d", "")].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    // A new connection for the first client: still over its budget.
    let bytes = [v1("192.0.2.1", 4003), get("/e", "")].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [429]);

    // An IPv4-mapped source is the IPv4 client, for origins too.
    let bytes = [v1("::ffff:192.0.2.3", 4004), get("/f", "")].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    let forwarded: Vec<_> = origin
        .requests()
        .iter()
        .map(|r| r.header("x-forwarded-for").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        forwarded,
        ["192.0.2.1", "192.0.2.2", "2001:db8::7", "192.0.2.3"]
    );
    let clients = logged_clients(&dir.path().join("access.log"), 5);
    let expected = [
        "192.0.2.1",
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "2001:db8::7",
    ];
    assert_eq!(clients, expected);
}

/// The header's address is itself a trusted proxy (10.0.0.5), so `X-Forwarded-For` names the
/// client, and a LOCAL header leaves the trusted socket peer to walk from. An UNKNOWN header
/// relays a client that the header does not name, so its `X-Forwarded-For` is not read: the
/// client is the unspecified address.
#[tokio::test(flavor = "multi_thread")]
async fn trusted_source_walks_forwarded_for() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("pp-walk", origin.addr, 1, ""));
    let addr = gateway.addr;

    let forwarded = "X-Forwarded-For: 198.51.100.7\r\n";
    let bytes = [v1("10.0.0.5", 4000), get("/a", forwarded)].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    // A LOCAL command: no address, so the peer 127.0.0.1 walks the same header.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    let bytes = [local, get("/b", forwarded)].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [429]);
    let bytes = [b"PROXY UNKNOWN\r\n".to_vec(), get("/c", forwarded)].concat();
    assert_eq!(statuses(&exchange_from(TRUSTED, addr, &bytes).await), [200]);

    let seen = origin.requests();
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        Some("198.51.100.7, 10.0.0.5")
    );
    assert_eq!(
        seen[1].header("x-forwarded-for"),
        Some("198.51.100.7, 0.0.0.0")
    );
    let clients = logged_clients(&dir.path().join("access.log"), 3);
    assert_eq!(clients, ["0.0.0.0", "198.51.100.7", "198.51.100.7"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_peer_header_ignored() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("pp-untrusted", origin.addr, 2, ""));
    let addr = gateway.addr;

    let bytes = [v1("192.0.2.1", 4000), get("/a", "")].concat();
    assert_eq!(
        statuses(&exchange_from(UNTRUSTED, addr, &bytes).await),
        [200]
    );
    // No header: served as plain HTTP, counted as the same client.
    assert_eq!(
        statuses(&exchange_from(UNTRUSTED, addr, &get("/b", "")).await),
        [200]
    );
    let source: SocketAddr = "192.0.2.2:4001".parse().expect("address");
    let bytes = [v2(source), get("/c", "")].concat();
    assert_eq!(
        statuses(&exchange_from(UNTRUSTED, addr, &bytes).await),
        [429]
    );

    let seen = origin.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-forwarded-for"), Some(UNTRUSTED));
    let clients = logged_clients(&dir.path().join("access.log"), 3);
    assert_eq!(clients, [UNTRUSTED, UNTRUSTED, UNTRUSTED]);
    let text = metrics(&gateway);
    assert!(
        text.contains("mirror_gateway_proxy_protocol_ignored_total 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_without_header_rejected() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("pp-missing", origin.addr, 5, ""));

    let received = exchange_from(TRUSTED, gateway.addr, &get("/a", "")).await;
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(origin.count(), 0);
    let text = metrics(&gateway);
    assert!(text.contains(&rejections("missing", 1)), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_headers_rejected() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("pp-malformed", origin.addr, 20, ""));

    let mut wrong_version = v2("192.0.2.1:4000".parse().expect("address"));
    wrong_version[12] = 0x11;
    let headers: [&[u8]; 5] = [
        b"PROXY TCP4 192.0.2.1 127.0.0.1 65536 80\r\n",
        b"PROXY TCP6 192.0.2.1 127.0.0.1 4000 80\r\n",
        b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\n",
        b"PROXY TCP4 192.0.2.1  127.0.0.1 4000 80\r\n",
        &wrong_version,
    ];
    for (i, header) in headers.iter().enumerate() {
        for from in [TRUSTED, UNTRUSTED] {
            let bytes = [header.to_vec(), get("/a", "")].concat();
            let received = exchange_from(from, gateway.addr, &bytes).await;
            let header = String::from_utf8_lossy(header);
            assert!(received.is_empty(), "header {i} {header:?} from {from}");
        }
    }
    assert_eq!(origin.count(), 0);
    let text = metrics(&gateway);
    assert!(text.contains(&rejections("malformed", 10)), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connection_times_out() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "proxy_protocol_timeout_ms = 300";
    let gateway = TestGateway::start(dir.path(), &config("pp-silent", origin.addr, 5, extra));

    let starts: [(&str, &[u8]); 3] = [
        (TRUSTED, b""),
        (UNTRUSTED, b""),
        (TRUSTED, b"PROXY TCP4 192.0.2.1 "),
    ];
    for (from, start) in starts {
        // The client sends `start`, then nothing, and keeps the connection open.
        let started = Instant::now();
        let received = exchange_from(from, gateway.addr, start).await;
        let elapsed = started.elapsed();
        assert!(received.is_empty(), "{from} {start:?}");
        assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
    let text = metrics(&gateway);
    assert!(text.contains(&rejections("timeout", 3)), "{text}");
}

/// Writes a self-signed certificate for `a.test` to `a.pem` and `a.key` in `dir`.
fn self_signed_cert(dir: &Path) {
    let args = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=a.test \
                -addext subjectAltName=DNS:a.test -keyout a.key -out a.pem -days 2";
    let out = std::process::Command::new("timeout")
        .arg("10")
        .arg("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl req failed: {stderr}");
}

/// A relay on 127.0.0.1 that connects each client to a target from 127.0.0.1 and sends a
/// version 2 header first, as HAProxy's `send-proxy-v2` does.
struct ProxyRelay {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyRelay {
    /// Starts a relay to `target` whose headers name `source`.
    async fn start(target: SocketAddr, source: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    if upstream.write_all(&v2(source)).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for ProxyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn header_before_tls_handshake() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    self_signed_cert(dir.path());
    let hosts = "hosts = [\"127.0.0.1\", \"a.test\"]\n";
    let text = config("pp-tls", origin.addr, 1, "tls_listen = [\"127.0.0.1:0\"]").replace(
        hosts,
        &format!("{hosts}tls_cert = \"a.pem\"\ntls_key = \"a.key\"\n"),
    );
    let gateway = TestGateway::start(dir.path(), &text);
    let tls_addr = gateway.running.tls_addrs()[0];

    let source: SocketAddr = "192.0.2.9:4000".parse().expect("address");
    let relay = ProxyRelay::start(tls_addr, source).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .danger_accept_invalid_certs(true)
        .resolve("a.test", relay.addr)
        .build()
        .expect("client");
    let url = format!("https://a.test:{}/a", relay.addr.port());
    let first = client.get(&url).send().await.expect("first request");
    assert_eq!(first.status(), 200);
    // On the same kept-alive connection: the same client, over its budget.
    let second = client.get(&url).send().await.expect("second request");
    assert_eq!(second.status(), 429);
    assert_eq!(relay.connections.load(Ordering::Relaxed), 1);

    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("192.0.2.9"));
    let clients = logged_clients(&dir.path().join("access.log"), 2);
    assert_eq!(clients, ["192.0.2.9", "192.0.2.9"]);

    // A trusted peer that starts the handshake without a header is closed before it.
    let client_hello_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc";
    let received = exchange_from(TRUSTED, tls_addr, client_hello_start).await;
    assert!(received.is_empty(), "{received:?}");
    let text = metrics(&gateway);
    assert!(text.contains(&rejections("missing", 1)), "{text}");
    assert!(
        text.contains("mirror_gateway_tls_handshakes_total{domain=\"pp-tls\",result=\"ok\"}"),
        "{text}"
    );
}

/// A real HAProxy in `mode tcp` on a free loopback port, stopped when dropped.
struct Haproxy {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Haproxy {
    /// Starts HAProxy with the backend of the example in `docs/configuration.md`, pointed at
    /// the gateway's TLS listener `target`, and waits until it accepts connections. Tries
    /// again on another port when the one picked was taken before HAProxy could bind it.
    fn start(dir: &Path, target: SocketAddr) -> Self {
        let path = dir.join("haproxy.cfg");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("free port")
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            std::fs::write(&path, haproxy_config(addr, target)).expect("write haproxy.cfg");
            let child = std::process::Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("run haproxy (install the Debian package haproxy)");
            let mut haproxy = Self { child, addr };
            if haproxy.wait_listening() {
                return haproxy;
            }
        }
        panic!("haproxy did not start in five tries; its errors are above");
    }

    /// Waits up to 10 s for the listener; returns false when HAProxy exited instead.
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            if self.child.try_wait().expect("haproxy status").is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Returns an HAProxy config that relays `listen` to `target` with the documented backend.
/// Health checks run every 100 ms, so that three failed ones (HAProxy's default `fall`) would
/// take the server down within a test's first second.
fn haproxy_config(listen: SocketAddr, target: SocketAddr) -> String {
    format!(
        "global\n\
         \x20   log stderr format raw local0 warning\n\
         defaults\n\
         \x20   log global\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 10s\n\
         \x20   timeout server 10s\n\
         frontend mirror_https_in\n\
         \x20   mode tcp\n\
         \x20   bind {listen}\n\
         \x20   default_backend mirror_https\n\
         backend mirror_https\n\
         \x20   mode tcp\n\
         \x20   server gw1 {target} send-proxy-v2 check check-send-proxy inter 100ms\n"
    )
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documented HAProxy backend (`send-proxy-v2 check check-send-proxy`, TLS passed
/// through) against the real gateway: clients are named by their own address, and the
/// health checks' LOCAL headers are accepted and show as aborted handshakes. (In `mode tcp` a
/// check passes once its connection opens, so HAProxy itself never judges the header.)
#[tokio::test(flavor = "multi_thread")]
async fn haproxy_example_backend() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    self_signed_cert(dir.path());
    let hosts = "hosts = [\"127.0.0.1\", \"a.test\"]\n";
    let text = config(
        "pp-haproxy",
        origin.addr,
        1,
        "tls_listen = [\"127.0.0.1:0\"]",
    )
    .replace(
        hosts,
        &format!("{hosts}tls_cert = \"a.pem\"\ntls_key = \"a.key\"\n"),
    );
    let gateway = TestGateway::start(dir.path(), &text);
    let tls_addr = gateway.running.tls_addrs()[0];
    let haproxy = Haproxy::start(dir.path(), tls_addr);

    // With no client connected, only health checks reach the gateway: about ten a second, each
    // a connection that sends a LOCAL header and closes before a TLS handshake.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = aborted_handshakes(&gateway);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let checks = aborted_handshakes(&gateway) - before;
    assert!(
        checks >= 5,
        "{checks} health checks in 1 s counted as aborted"
    );

    // Two clients on their own loopback addresses, each within its budget of one request, ask
    // for different paths, so that both requests reach the origin.
    let mut statuses = Vec::new();
    for (client_ip, path) in [("127.0.0.5", "/a"), ("127.0.0.6", "/b")] {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .danger_accept_invalid_certs(true)
            .local_address(client_ip.parse::<IpAddr>().expect("address"))
            .resolve("a.test", haproxy.addr)
            .build()
            .expect("client");
        let url = format!("https://a.test:{}{path}", haproxy.addr.port());
        let response = client
            .get(&url)
            .send()
            .await
            .expect("request through haproxy");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200]);

    let forwarded: Vec<Option<String>> = origin
        .requests()
        .iter()
        .map(|r| r.header("x-forwarded-for").map(str::to_owned))
        .collect();
    assert_eq!(
        forwarded,
        [Some("127.0.0.5".to_owned()), Some("127.0.0.6".to_owned())]
    );
    let clients = logged_clients(&dir.path().join("access.log"), 2);
    assert_eq!(clients, ["127.0.0.5", "127.0.0.6"]);

    let text = metrics(&gateway);
    assert!(
        !text.contains("mirror_gateway_proxy_protocol_rejections_total{"),
        "a health check's LOCAL header was rejected: {text}"
    );
}

/// Returns `mirror_gateway_tls_handshake_failures_total` with reason `aborted`.
fn aborted_handshakes(gateway: &TestGateway) -> u64 {
    metrics(gateway)
        .lines()
        .find(|line| {
            line.starts_with("mirror_gateway_tls_handshake_failures_total{")
                && line.contains("reason=\"aborted\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
