//! End-to-end: concurrent misses coalesce into one origin fetch, and what the cache stores.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Starts a gateway in front of `origin` with the index and bundle TTL rules and a catch-all
/// rule for everything else; `catch_all_404` sets its `cache_not_found`.
fn start(origin: std::net::SocketAddr, dir: &std::path::Path, catch_all_404: bool) -> TestGateway {
    start_with(origin, dir, catch_all_404, "")
}

/// Starts the gateway of [`start`] with `domain_keys` added to the domain's table.
fn start_with(
    origin: std::net::SocketAddr,
    dir: &std::path::Path,
    catch_all_404: bool,
    domain_keys: &str,
) -> TestGateway {
    let config = format!(
        r#"{BASE_CONFIG}debug_headers = true

[domains.primary]
hosts = ["127.0.0.1"]
{domain_keys}
[domains.primary.origins.web]
kind = "http"
addresses = ["{}"]
host = "concelier.internal"
[[domains.primary.routes]]
prefix = "/"
origin = "web"
[[domains.primary.plugins]]
name = "ttl"
[[domains.primary.plugins.rules]]
pattern = "/concelier/exports/index.json"
ttl_secs = 60
cache_control = "public, max-age=60"
[[domains.primary.plugins.rules]]
pattern = "/concelier/exports/mirror/**"
ttl_secs = 300
cache_control = "public, max-age=300, immutable"
[[domains.primary.plugins.rules]]
pattern = "/**"
ttl_secs = 60
cache_not_found = {catch_all_404}
"#,
        origin
    );
    TestGateway::start(dir, &config)
}

/// Returns a reply chosen by the request path, for the storage tests.
fn by_path(target: &str) -> Reply {
    let mut reply = Reply::ok(&format!("body of {target}"));
    match target {
        "/error" => reply.status = 503,
        "/missing" => reply.status = 404,
        "/no-store" => reply.headers = vec![("cache-control".into(), "no-store".into())],
        "/private" => reply.headers = vec![("cache-control".into(), "private".into())],
        "/cookie" => reply
            .headers
            .push(("set-cookie".into(), "s=1; Path=/".into())),
        _ => {}
    }
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_coalesce() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("{\"bundle\":\"one\"}");
        reply.delay = Duration::from_millis(300);
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    let results = stampede(&url, 100).await;
    assert_eq!(origin.count(), 1);
    for (status, cache, body) in &results {
        assert_eq!(*status, 200, "a {cache} response");
        assert_eq!(body, "{\"bundle\":\"one\"}", "a {cache} response");
    }
    let misses = results.iter().filter(|(_, c, _)| c == "MISS").count();
    let hits = results.iter().filter(|(_, c, _)| c == "HIT").count();
    assert_eq!((misses, hits), (1, 99));
}

/// Sends `count` concurrent GETs of `url`. Returns each response's status, its cache status
/// (followed by the `X-Cache-Reason`, if any, after a space) and its body.
async fn stampede(url: &str, count: usize) -> Vec<(u16, String, String)> {
    let client = client();
    let requests = (0..count).map(|_| {
        let request = client.get(url).send();
        async move {
            let resp = request.await.expect("request");
            let status = resp.status().as_u16();
            let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
            let cache = match header("x-cache-reason") {
                Some(reason) => format!("{} {reason}", header("x-cache-status").expect("status")),
                None => header("x-cache-status").expect("status").to_string(),
            };
            (status, cache, resp.text().await.expect("body"))
        }
    });
    futures::future::join_all(requests).await
}

/// Starts an origin that accepts each connection, waits `delay` and closes it unanswered.
/// Returns its address and the number of connections it accepted.
async fn closing_origin(delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                drop(stream);
            });
        }
    });
    (addr, accepted)
}

/// Each fill fails before the origin's header. The waiters compete once more after the first
/// failure, then every waiter gets a 502 at once instead of fetching on its own, and the next
/// request starts one new fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_fill_fails_its_waiters() {
    let (addr, accepted) = closing_origin(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(addr, dir.path(), false);
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    let started = Instant::now();
    let results = stampede(&url, 50).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the waiters took {:?}",
        started.elapsed()
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "origin connections");
    assert!(
        results.iter().all(|(status, ..)| *status == 502),
        "{results:?}"
    );
    let waiters = results.iter().filter(|(_, c, _)| c == "BYPASS fill_failed");
    assert_eq!(waiters.count(), 48, "{results:?}");
    assert_eq!(stampede(&url, 1).await[0].0, 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "one new fill");
}

/// The origin returns 503 to every fill. The waiters get the origin's status, and after
/// the first stampede the origin gets one request per stampede.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_error_fails_its_waiters() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("overloaded");
        reply.status = 503;
        reply.delay = Duration::from_secs(1);
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    for (round, origin_requests, waiters) in [(1, 2, 48), (2, 3, 49)] {
        let results = stampede(&url, 50).await;
        assert_eq!(origin.count(), origin_requests, "after stampede {round}");
        assert!(results.iter().all(|(s, ..)| *s == 503), "{results:?}");
        let failed = results.iter().filter(|(_, c, _)| c == "BYPASS fill_failed");
        assert_eq!(failed.count(), waiters, "stampede {round}: {results:?}");
    }
}

/// The first fill fails and the one the waiters start next succeeds, so one request that the
/// origin rejects does not fail the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_failure_refills_for_waiters() {
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    let origin = TestOrigin::start(move |_| {
        let mut reply = Reply::ok("{\"bundle\":\"two\"}");
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            reply.status = 503;
        }
        reply.delay = Duration::from_millis(500);
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    let results = stampede(&url, 30).await;
    assert_eq!(origin.count(), 2, "origin requests");
    let rejected = results.iter().filter(|(s, ..)| *s == 503).count();
    assert_eq!(rejected, 1, "{results:?}");
    let served: Vec<_> = results.iter().filter(|(s, ..)| *s == 200).collect();
    assert_eq!(served.len(), 29, "{results:?}");
    assert!(served
        .iter()
        .all(|(_, _, body)| body == "{\"bundle\":\"two\"}"));
}

/// The origin takes longer than the domain's lock wait: the waiters get a 504 when their wait
/// ends, without an origin request, and the filling request gets the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_timeout_answers_504() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("{\"bundle\":\"slow\"}");
        reply.delay = Duration::from_secs(3);
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_with(origin.addr, dir.path(), false, "lock_wait_timeout_secs = 1");
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    let results = stampede(&url, 20).await;
    assert_eq!(origin.count(), 1, "origin requests");
    let served = results.iter().filter(|(s, ..)| *s == 200).count();
    assert_eq!(served, 1, "{results:?}");
    let timed_out = results
        .iter()
        .filter(|(s, c, _)| *s == 504 && c == "BYPASS lock_timeout");
    assert_eq!(timed_out.count(), 19, "{results:?}");
}

/// Reads one request head from `reader` and returns its request line; `None` when the
/// connection ends first.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
        return None;
    }
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
            return None;
        }
        if header.trim_end().is_empty() {
            return Some(line);
        }
    }
}

/// Starts an origin that sends a small 200 for every request on a connection, kept alive,
/// except `/dead`, which it counts and then closes the connection on. Returns its address
/// and the number of `/dead` requests.
async fn dead_path_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dead = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&dead);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                for _ in 0..1000 {
                    let Some(line) = read_request(&mut reader).await else {
                        return;
                    };
                    if line.split(' ').nth(1) == Some("/dead") {
                        count.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, dead)
}

/// A request whose reused origin connection fails is retried once on another connection,
/// not once per idle connection in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reused_connection_retried_once() {
    let (addr, dead) = dead_path_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(addr, dir.path(), false);
    // Fills the gateway's pool with idle origin connections.
    let warm = (0..8).map(|i| get_status(gateway.url(&format!("/warm/{i}"))));
    for status in futures::future::join_all(warm).await {
        assert_eq!(status, 200);
    }
    let resp = client()
        .get(gateway.url("/dead"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 502);
    assert_eq!(dead.load(Ordering::SeqCst), 2, "origin requests for /dead");
}

/// Sends one GET of `url` and returns its status.
async fn get_status(url: String) -> u16 {
    let resp = client().get(url).send().await.expect("request");
    resp.status().as_u16()
}

/// The filling client leaves before the origin's header: the fill goes on for the waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filler_gone_before_header_keeps_fill() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("{\"bundle\":\"late\"}");
        reply.delay = Duration::from_millis(600);
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let path = "/concelier/exports/mirror/primary/bundle.json";
    let mut filler = TcpStream::connect(gateway.addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    filler
        .write_all(request.as_bytes())
        .await
        .expect("send the filler's request");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiters = tokio::spawn({
        let url = gateway.url(path);
        async move { stampede(&url, 10).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(filler);
    for (status, cache, _) in waiters.await.expect("waiters") {
        assert_eq!(status, 200, "a {cache} response");
    }
    assert_eq!(origin.count(), 1, "origin requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_headers_per_class() {
    let origin = TestOrigin::start(|req| {
        let mut reply = Reply::ok(&req.target);
        reply.headers = vec![("cache-control".into(), "max-age=5, must-revalidate".into())];
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let cases = [
        ("/concelier/exports/index.json", "public, max-age=60"),
        (
            "/concelier/exports/mirror/primary/bundle.json",
            "public, max-age=300, immutable",
        ),
        (
            "/concelier/exports/mirror/primary/bundle.json.jws",
            "public, max-age=300, immutable",
        ),
    ];
    for (path, expected) in cases {
        for round in ["MISS", "HIT"] {
            let resp = client().get(gateway.url(path)).send().await.expect("get");
            assert_eq!(resp.headers()["x-cache-status"], round, "{path}");
            assert_eq!(resp.headers()["cache-control"], expected, "{path} {round}");
        }
    }
    assert_eq!(origin.count(), 3);
}

/// A HEAD on a cold path fills the cache for the next GET, as nginx does: the origin gets
/// one GET. The origin sends the body 100 ms after the header, so the gateway cannot read both
/// at once.
#[tokio::test(flavor = "multi_thread")]
async fn head_miss_then_get_hit() {
    let (addr, methods) = slow_body_origin(b"{\"exportId\":\"x\"}").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"{}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{addr}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
"#,
        BASE_CONFIG.replace("lock_wait_timeout_secs = 10", "lock_wait_timeout_secs = 2")
    );
    let gateway = TestGateway::start(dir.path(), &config);
    let url = gateway.url("/concelier/exports/index.json");
    let head = client().head(&url).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache-status"], "MISS");
    assert_eq!(head.headers()["content-length"], "16");

    let started = std::time::Instant::now();
    let get = client().get(&url).send().await.expect("get");
    let waited = started.elapsed();
    assert_eq!(get.status(), 200);
    assert!(
        waited < Duration::from_secs(1),
        "GET waited {waited:?} on the HEAD's fill"
    );
    assert_eq!(get.headers()["x-cache-status"], "HIT");
    assert_eq!(get.text().await.expect("body"), "{\"exportId\":\"x\"}");
    assert_eq!(*methods.lock().expect("lock"), ["GET"]);
}

/// Starts an origin that replies to every request with `body`: the header, a 100 ms pause,
/// then the body. Returns its address and the methods it received.
async fn slow_body_origin(body: &'static [u8]) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let methods = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&methods);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_slow(stream, body, Arc::clone(&seen)));
        }
    });
    (addr, methods)
}

async fn serve_slow(stream: TcpStream, body: &'static [u8], seen: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(stream);
    for _ in 0..100 {
        let Some(line) = read_request(&mut reader).await else {
            return;
        };
        let method = line.split(' ').next().unwrap_or("").to_string();
        seen.lock().expect("lock").push(method.clone());
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncache-control: max-age=60\r\n\r\n",
            body.len()
        );
        let stream = reader.get_mut();
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if method != "HEAD" && stream.write_all(body).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uncacheable_not_stored() {
    let origin = TestOrigin::start(|req| by_path(&req.target)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), false);
    let cases = [
        ("/error", 503),
        ("/missing", 404),
        ("/no-store", 200),
        ("/private", 200),
        ("/cookie", 200),
    ];
    for (path, status) in cases {
        for round in 1..=2 {
            let resp = client().get(gateway.url(path)).send().await.expect("get");
            assert_eq!(resp.status(), status, "{path} round {round}");
            assert_ne!(resp.headers()["x-cache-status"], "HIT", "{path}");
        }
        let reached = origin
            .requests()
            .iter()
            .filter(|r| r.target == path)
            .count();
        assert_eq!(reached, 2, "{path} was stored");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn not_found_stored_when_enabled() {
    let origin = TestOrigin::start(|req| by_path(&req.target)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start(origin.addr, dir.path(), true);
    let url = gateway.url("/missing");
    let first = client().get(&url).send().await.expect("first");
    assert_eq!(first.status(), 404);
    assert_eq!(first.headers()["x-cache-status"], "MISS");
    let second = client().get(&url).send().await.expect("second");
    assert_eq!(second.status(), 404);
    assert_eq!(second.headers()["x-cache-status"], "HIT");
    assert_eq!(origin.count(), 1);
}
