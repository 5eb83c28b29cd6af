//! End-to-end: `/metrics` counts known traffic exactly; `/healthz`, `/readyz`, `/status.json`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    basic, client, closed_port, htpasswd_line, raw_get, readyz, wait_until_closed, Reply,
    TestGateway, TestOrigin, BASE_CONFIG,
};

const ADMIN: (&str, &str) = ("admin", "admin-pass");
const MIRROR: (&str, &str) = ("mirror", "mirror-pass");

/// The known traffic: host, path, whether it carries the `mirror` user's credentials, and the
/// status it gets.
const PLAN: [(&str, &str, bool, u16); 12] = [
    ("127.0.0.1", "/a", false, 401),
    ("127.0.0.1", "/a", false, 401),
    ("127.0.0.1", "/a", true, 200),
    ("127.0.0.1", "/a", true, 200),
    ("127.0.0.1", "/a", true, 200),
    ("127.0.0.1", "/b", true, 200),
    ("127.0.0.1", "/missing", true, 404),
    ("127.0.0.1", "/boom", true, 500),
    ("community.test", "/c", false, 200),
    ("community.test", "/c", false, 200),
    ("down.test", "/d", false, 502),
    ("nowhere.test", "/x", false, 421),
];

/// `mirror_gateway_requests_total` after [`PLAN`]: domain, status class, cache status, count.
const EXPECTED_REQUESTS: [(&str, &str, &str, f64); 8] = [
    ("primary", "4xx", "BYPASS", 3.0),
    ("primary", "2xx", "MISS", 2.0),
    ("primary", "2xx", "HIT", 2.0),
    ("primary", "5xx", "BYPASS", 1.0),
    ("community", "2xx", "MISS", 1.0),
    ("community", "2xx", "HIT", 1.0),
    ("down", "5xx", "BYPASS", 1.0),
    ("-", "4xx", "BYPASS", 1.0),
];

#[tokio::test(flavor = "multi_thread")]
async fn traffic_counts_exactly() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr, closed_port().await);
    let credentials = basic(MIRROR.0, MIRROR.1);
    let mut bytes: BTreeMap<&str, usize> = BTreeMap::new();
    for (host, path, auth, expected) in PLAN {
        let mut headers = vec![("host", host)];
        if auth {
            headers.push(("authorization", credentials.as_str()));
        }
        let resp = raw_get(gateway.addr, path, &headers).await;
        assert_eq!(resp.status, expected, "{host}{path}");
        *bytes.entry(host).or_default() += resp.body.len();
    }

    let (status, content_type, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/plain; version=0.0.4");
    let metrics = parse_metrics(&text);
    for (domain, class, cache, count) in EXPECTED_REQUESTS {
        let labels = [
            ("cache_status", cache),
            ("domain", domain),
            ("method", "GET"),
            ("status_class", class),
        ];
        let got = metrics.get("mirror_gateway_requests_total", &labels);
        assert_eq!(got, Some(count), "{domain} {class} {cache}\n{text}");
    }
    let series = metrics.count("mirror_gateway_requests_total");
    assert_eq!(series, EXPECTED_REQUESTS.len(), "{text}");
    let primary_bytes = bytes.get("127.0.0.1").map(|&n| n as f64);
    let primary = [("domain", "primary")];
    let sent = metrics.get("mirror_gateway_response_body_bytes_total", &primary);
    assert_eq!(sent, primary_bytes, "{text}");
    check_primary(&metrics, &text);
    check_memory_tier(&metrics, gateway.running.memory_stats());
}

/// Checks the `primary` and `down` domains' durations, rejections and origin errors.
fn check_primary(metrics: &Samples, text: &str) {
    let primary = [("domain", "primary")];
    let durations = metrics.get("mirror_gateway_request_duration_seconds_count", &primary);
    assert_eq!(durations, Some(8.0), "{text}");
    let upstream = metrics.get("mirror_gateway_upstream_duration_seconds_count", &primary);
    assert_eq!(upstream, Some(4.0), "/a, /b, /missing, /boom\n{text}");
    let auth_failures = metrics.get("mirror_gateway_auth_failures_total", &primary);
    assert_eq!(auth_failures, Some(2.0), "{text}");
    let community = [("domain", "community")];
    let none = metrics.get("mirror_gateway_auth_failures_total", &community);
    assert_eq!(none, Some(0.0), "{text}");
    let htpasswd = [("domain", "primary"), ("plugin", "htpasswd")];
    let rejections = metrics.get("mirror_gateway_rejections_total", &htpasswd);
    assert_eq!(rejections, Some(2.0), "{text}");
    let status_5xx = [("domain", "primary"), ("kind", "status_5xx")];
    let errors = metrics.get("mirror_gateway_origin_errors_total", &status_5xx);
    assert_eq!(errors, Some(1.0), "{text}");
    let connect = [("domain", "down"), ("kind", "connect")];
    let errors = metrics.get("mirror_gateway_origin_errors_total", &connect);
    assert_eq!(errors, Some(1.0), "{text}");
}

/// Checks the memory tier's series: /a, /b and /c stored, three hits, and the other series
/// equal to the tier's own counters.
fn check_memory_tier(metrics: &Samples, stats: mirror_proxy::cache::TierSnapshot) {
    let memory = [("tier", "memory")];
    let get = |name| metrics.get(name, &memory);
    assert_eq!(get("mirror_gateway_cache_entries"), Some(3.0));
    assert_eq!(get("mirror_gateway_cache_hits_total"), Some(3.0));
    assert_eq!(
        get("mirror_gateway_cache_misses_total"),
        Some(stats.misses as f64)
    );
    assert_eq!(get("mirror_gateway_cache_bytes"), Some(stats.bytes as f64));
    let evictions = get("mirror_gateway_cache_evictions_total");
    assert_eq!(evictions, Some(stats.evictions as f64));
}

/// Checks that an origin timeout served with a stale entry, which never reaches
/// `fail_to_proxy`, still counts as an origin error.
#[tokio::test(flavor = "multi_thread")]
async fn stale_on_timeout_counts_origin_error() {
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let origin = TestOrigin::start(move |_| {
        let mut reply = Reply::ok("v1");
        reply.headers = vec![("cache-control".into(), "max-age=1".into())];
        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            reply.delay = Duration::from_secs(3);
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // No background refresh, and an origin read timeout well under the origin's delay.
    let community = (
        "stale_while_revalidate_secs = 0\n",
        "read_timeout_ms = 300\n",
    );
    let (gateway, admin) = start_with(dir.path(), origin.addr, origin.addr, community);
    let host = [("host", "community.test")];
    let first = raw_get(gateway.addr, "/s", &host).await;
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    let stale = first_after_expiry(gateway.addr, &host).await;
    assert_eq!((stale.status, stale.text().as_str()), (200, "v1"));
    assert_eq!(stale.header("x-cache-status"), Some("STALE"));

    let (_, _, text) = admin_get(admin, "/metrics").await;
    let metrics = parse_metrics(&text);
    let timeout = [("domain", "community"), ("kind", "timeout")];
    let errors = metrics.get("mirror_gateway_origin_errors_total", &timeout);
    assert_eq!(errors, Some(1.0), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_credentials() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    for path in ["/metrics", "/status", "/status.json"] {
        let resp = client().get(format!("http://{admin}{path}")).send().await;
        let status = resp.expect("request").status();
        assert_eq!(status, 401, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_without_credentials() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    let resp = client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "ok\n");
}

/// Sends `request` on a new connection to `addr` and returns all it gets until the gateway
/// closes the connection; fails after 5 s.
async fn exchange_until_close(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_closes_when_client_asks() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    for request in [
        "GET /healthz HTTP/1.0\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ] {
        let answer = exchange_until_close(admin, request)
            .await
            .to_ascii_lowercase();
        assert!(answer.contains(" 200 "), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(!answer.contains("keep-alive"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_reachable_origin() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "{\"ready\":true,\"reasons\":[]}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_unreachable_origin_empty_cache() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = closed_port().await;
    let (_gateway, admin) = start(dir.path(), origin.addr, closed);
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("{\"ready\":false,\"reasons\":["), "{body}");
    let reason = format!("domain down: origin web is unreachable ({closed}: ");
    assert!(body.contains(&reason), "{body}");
    assert!(!body.contains("domain primary"), "{body}");
}

/// Checks that readiness judges each domain by its own cache: a warm cache of `primary` does
/// not make up for `down`, whose origin stopped before anything of it was cached.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_domain_without_origin_or_cache() {
    let origin = TestOrigin::start(origin_reply).await;
    let down_origin = TestOrigin::start(origin_reply).await;
    let down_addr = down_origin.addr;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr, down_addr);
    let credentials = basic(MIRROR.0, MIRROR.1);
    let headers = [
        ("host", "127.0.0.1"),
        ("authorization", credentials.as_str()),
    ];
    assert_eq!(raw_get(gateway.addr, "/a", &headers).await.status, 200);
    assert_eq!(gateway.running.memory_stats().entries, 1);

    drop(down_origin);
    wait_until_closed(down_addr).await;
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    let reason = format!("domain down: origin web is unreachable ({down_addr}: ");
    assert!(body.contains(&reason), "{body}");
    assert!(
        body.contains("and the domain has no cache entries"),
        "{body}"
    );
    assert!(!body.contains("domain primary"), "{body}");
    assert!(!body.contains("domain community"), "{body}");

    let (_, _, json) = admin_get(admin, "/status.json").await;
    let primary = "\"readiness\":{\"servable\":true,\"cache_entries\":1,\"origins_probed\":false,\"problems\":[]}";
    assert!(json.contains(primary), "{json}");
    let community = "\"readiness\":{\"servable\":true,\"cache_entries\":0,\"origins_probed\":true,\"problems\":[]}";
    assert!(json.contains(community), "{json}");
    let down = format!(
        "\"readiness\":{{\"servable\":false,\"cache_entries\":0,\"origins_probed\":true,\"problems\":[\"origin web is unreachable ({down_addr}: "
    );
    assert!(json.contains(&down), "{json}");
}

/// Checks that a domain whose origin stopped after its cache was filled stays servable.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_warm_cache_covers_stopped_origin() {
    let origin = TestOrigin::start(origin_reply).await;
    let down_origin = TestOrigin::start(origin_reply).await;
    let down_addr = down_origin.addr;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr, down_addr);
    let resp = raw_get(gateway.addr, "/d", &[("host", "down.test")]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gateway.running.memory_stats().entries, 1);

    drop(down_origin);
    wait_until_closed(down_addr).await;
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "{\"ready\":true,\"reasons\":[]}");
    let resp = raw_get(gateway.addr, "/d", &[("host", "down.test")]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-cache-status"), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_sync_lag_over_limit() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    let lag = Duration::from_secs(7200);
    let monitor = gateway.running.monitor();
    monitor
        .health
        .set_sync_lag_provider(Duration::from_secs(3600), move || Some(lag));
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the synced data is 7200 s old, over the 3600 s limit"),
        "{body}"
    );
}

/// Checks that a request on a connection opened before a graceful shutdown gets `draining`.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_draining_after_shutdown() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_text(dir.path(), origin.addr, origin.addr, ("", ""));
    // The grace period keeps open connections served while the shutdown runs.
    let config = config.replace("grace_period_secs = 0", "grace_period_secs = 3");
    let gateway = TestGateway::start(dir.path(), &config);
    let admin = gateway.running.admin_addr().expect("admin listener");
    let monitor = gateway.running.monitor();
    // Wait until the services have started; the sockets accept before that.
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 200, "{body}");
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let (status, body) = keep_alive_get(&mut stream, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    let stopper = std::thread::spawn(move || drop(gateway));
    for _ in 0..250 {
        if monitor.health.is_draining() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(monitor.health.is_draining(), "no shutdown within 5 s");
    let (status, body) = keep_alive_get(&mut stream, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let expected = "{\"ready\":false,\"reasons\":[\"draining: the gateway is shutting down\"]}";
    assert_eq!(body.trim(), expected);
    stopper.join().expect("gateway stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_fields() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr, origin.addr);
    for _ in 0..2 {
        let resp = raw_get(gateway.addr, "/c", &[("host", "community.test")]).await;
        assert_eq!(resp.status, 200);
    }
    let (status, content_type, json) = admin_get(admin, "/status.json").await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let body_bytes = 2 * "body of /c".len();
    let community = format!(
        "{{\"id\":\"community\",\"requests\":2,\"status\":{{\"1xx\":0,\"2xx\":2,\"3xx\":0,\"4xx\":0,\"5xx\":0,\"none\":0}},\"cache_hits\":1,\"cache_lookups\":2,\"body_bytes\":{body_bytes},\"rejections\":{{}},\"quota_rejections\":[],\"quota\":[],\"origin\":{{\"errors\":0,\"last_error\":null}},\"sync\":{{\"configured\":false}},\"readiness\":{{\"servable\":true,\"cache_entries\":1,\"origins_probed\":false,\"problems\":[]}}}}"
    );
    assert!(json.contains(&community), "{json}");
    for field in [
        "\"time\":",
        "\"uptime_seconds\":",
        "\"draining\":false",
        "\"disk\":null",
    ] {
        assert!(json.contains(field), "{field} missing: {json}");
    }
    assert!(json.contains("\"memory\":{\"entries\":1,"), "{json}");
}

/// Checks that `/status.json` lists the requests that the `quota` plugin counted this hour.
#[tokio::test(flavor = "multi_thread")]
async fn status_json_quota_usage() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A domain id of its own, because the quota counts are process-wide by domain id.
    let quota = "[[domains.metered.plugins]]\nname = \"quota\"\nindex_per_hour = 10\ndownload_per_hour = 5\ndomain_index_per_hour = 100\nindex_paths = [\"/index.json\"]\ndownload_paths = [\"/files/**\"]\n";
    let mut config = config_text(dir.path(), origin.addr, origin.addr, ("", ""));
    config.push_str(&format!(
        "[domains.metered]\nhosts = [\"metered.test\"]\n[domains.metered.origins.web]\nkind = \"http\"\naddresses = [\"{}\"]\n[[domains.metered.routes]]\nprefix = \"/\"\norigin = \"web\"\n{quota}",
        origin.addr
    ));
    let gateway = TestGateway::start(dir.path(), &config);
    let admin = gateway.running.admin_addr().expect("admin listener");
    // Cache hits count too (`count_cache_hits` is on by default); `/other` is in no class.
    for path in [
        "/index.json",
        "/index.json",
        "/index.json",
        "/files/a",
        "/other",
    ] {
        let resp = raw_get(gateway.addr, path, &[("host", "metered.test")]).await;
        assert_eq!(resp.status, 200, "{path}");
    }
    let (status, _, json) = admin_get(admin, "/status.json").await;
    assert_eq!(status, 200, "{json}");
    // NOTE: traffic that straddles a clock hour starts the count again and fails this check.
    let index = "{\"class\":\"index\",\"requests_this_hour\":3,\"principal_limit\":10,\"domain_limit\":100}";
    let download = "{\"class\":\"download\",\"requests_this_hour\":1,\"principal_limit\":5,\"domain_limit\":null}";
    let usage = format!("\"quota\":[{index},{download}]");
    assert!(domain_object(&json, "metered").contains(&usage), "{json}");
    let community = domain_object(&json, "community");
    assert!(community.contains("\"quota\":[]"), "{json}");
}

/// Returns the text of domain `id`'s object in a `/status.json` document, up to the next
/// domain's; empty when the document has no such domain.
fn domain_object<'a>(json: &'a str, id: &str) -> &'a str {
    let start = format!("{{\"id\":\"{id}\",");
    let Some(rest) = json.split_once(&start).map(|(_, rest)| rest) else {
        return "";
    };
    rest.split("{\"id\":").next().unwrap_or(rest)
}

/// Answers `/missing` with 404, `/boom` with 500 and anything else with a cacheable 200.
fn origin_reply(req: &common::Recorded) -> Reply {
    let mut reply = Reply::ok(&format!("body of {}", req.target));
    match req.target.as_str() {
        "/missing" => reply.status = 404,
        "/boom" => reply.status = 500,
        _ => return reply,
    }
    reply.headers.clear();
    reply
}

/// Starts a gateway with an admin listener and three domains: `primary` (host `127.0.0.1`,
/// htpasswd) and `community` (`community.test`) in front of `origin`, and `down`
/// (`down.test`) in front of `down_origin`.
fn start(dir: &Path, origin: SocketAddr, down_origin: SocketAddr) -> (TestGateway, SocketAddr) {
    start_with(dir, origin, down_origin, ("", ""))
}

/// Does what [`start`] does, with `community`'s two strings added to the `community` domain's
/// table and to its origin's table.
fn start_with(
    dir: &Path,
    origin: SocketAddr,
    down_origin: SocketAddr,
    community: (&str, &str),
) -> (TestGateway, SocketAddr) {
    let config = config_text(dir, origin, down_origin, community);
    let gateway = TestGateway::start(dir, &config);
    let admin = gateway.running.admin_addr().expect("admin listener");
    (gateway, admin)
}

/// Writes the htpasswd files of [`start_with`] into `dir` and returns its config.
fn config_text(
    dir: &Path,
    origin: SocketAddr,
    down_origin: SocketAddr,
    community: (&str, &str),
) -> String {
    let line = |(user, password)| htpasswd_line(&["-B", "-C", "5"], user, password);
    std::fs::write(dir.join("admin.htpasswd"), line(ADMIN) + "\n").expect("write");
    std::fs::write(dir.join("users.htpasswd"), line(MIRROR) + "\n").expect("write");
    let mut config = format!(
        "{BASE_CONFIG}\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
        dir.join("admin.htpasswd").display()
    );
    let domains = [
        ("primary", "127.0.0.1", origin),
        ("community", "community.test", origin),
        ("down", "down.test", down_origin),
    ];
    for (id, host, address) in domains {
        let (domain_extra, origin_extra) = if id == "community" {
            community
        } else {
            ("", "")
        };
        config.push_str(&format!(
            "[domains.{id}]\nhosts = [\"{host}\"]\n{domain_extra}[domains.{id}.origins.web]\nkind = \"http\"\naddresses = [\"{address}\"]\nconnect_timeout_ms = 1000\n{origin_extra}[[domains.{id}.routes]]\nprefix = \"/\"\norigin = \"web\"\n"
        ));
    }
    let plugin = "[[domains.primary.plugins]]\nname = \"htpasswd\"\nfile = \"users.htpasswd\"\n";
    config.push_str(plugin);
    config
}

/// Returns the first response to GET `/s` that is not a `HIT`, polling every 100 ms from 1.1 s
/// on (a `max-age=1` entry expires then); panics after 4 s.
async fn first_after_expiry(addr: SocketAddr, headers: &[(&str, &str)]) -> common::RawResponse {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..30 {
        let resp = raw_get(addr, "/s", headers).await;
        if resp.header("x-cache-status") != Some("HIT") {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/s was still fresh 4 s after a max-age=1 fill");
}

/// Sends GET `path` on `stream`, keeping the connection open, and returns the status and the
/// body (read by `Content-Length`); panics after 10 s.
async fn keep_alive_get(stream: &mut tokio::net::TcpStream, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut data = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(response) = complete_response(&data) {
                return response;
            }
            let read = stream.read(&mut chunk).await.expect("read");
            assert!(read > 0, "connection closed before the response ended");
            data.extend_from_slice(&chunk[..read]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("response within 10 s")
}

/// Returns the status and body of `data` once it holds a whole `Content-Length` response.
fn complete_response(data: &[u8]) -> Option<(u16, String)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    let body = data.get(end + 4..end + 4 + length)?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, String::from_utf8_lossy(body).into_owned()))
}

/// GETs `path` from the admin listener with credentials; returns status, type and body.
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String, String) {
    let resp = client()
        .get(format!("http://{admin}{path}"))
        .header("authorization", basic(ADMIN.0, ADMIN.1))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin {path}: {e}"));
    let content_type = resp.headers().get("content-type");
    let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    let (status, content_type) = (resp.status().as_u16(), content_type.to_string());
    (status, content_type, resp.text().await.expect("body"))
}

/// Samples of a text exposition, by metric name and then by sorted `label="value"` list.
struct Samples(BTreeMap<String, BTreeMap<String, f64>>);

impl Samples {
    /// Returns the value of the series `name` with exactly `labels`, given in name order.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key: Vec<String> = labels.iter().map(|(n, v)| format!("{n}=\"{v}\"")).collect();
        self.0.get(name)?.get(&key.join(",")).copied()
    }

    /// Returns how many series `name` has.
    fn count(&self, name: &str) -> usize {
        self.0.get(name).map_or(0, BTreeMap::len)
    }
}

/// Parses `name{labels} value` lines, skipping comments; panics on a malformed line.
fn parse_metrics(text: &str) -> Samples {
    let mut samples: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
        labels.sort_unstable();
        let entry = samples.entry(name.to_string()).or_default();
        entry.insert(labels.join(","), value);
    }
    Samples(samples)
}
