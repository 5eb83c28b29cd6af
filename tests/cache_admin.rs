//! End-to-end: the admin listener's access control, cache statistics and purges.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{
    basic, client, htpasswd_line, http_domain, raw_get, Reply, TestGateway, TestOrigin, BASE_CONFIG,
};

const USER: &str = "admin";
const PASSWORD: &str = "secret";

#[tokio::test(flavor = "multi_thread")]
async fn admin_off_without_section() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(origin.addr, "");
    let gateway = TestGateway::start(dir.path(), &config);
    assert_eq!(gateway.running.admin_addr(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_needs_credentials() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    let url = format!("http://{admin}/cache/stats");

    let anonymous = client().get(&url).send().await.expect("stats");
    assert_eq!(anonymous.status(), 401);
    let challenge = anonymous.headers().get("www-authenticate");
    let challenge = challenge.and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(challenge.starts_with("Basic "), "challenge {challenge:?}");

    let wrong = client()
        .get(&url)
        .header("authorization", basic(USER, "not the password"))
        .send()
        .await
        .expect("stats");
    assert_eq!(wrong.status(), 401, "wrong password");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_count_filled_objects() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);
    for path in ["/a", "/bb"] {
        assert_eq!(get_cache_status(&gateway, PRIMARY, path).await, "MISS");
    }
    let (status, stats) = admin_request(admin, "GET", "/cache/stats").await;
    assert_eq!(status, 200, "{stats}");
    let expected_bytes = "body of /a".len() + "body of /bb".len();
    assert_eq!(memory_field(&stats, "entries"), Some(2), "{stats}");
    assert_eq!(
        memory_field(&stats, "bytes"),
        Some(expected_bytes as u64),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_one_path() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);
    fill(&gateway, PRIMARY, &["/a", "/b"]).await;
    let (status, body) = admin_request(admin, "POST", "/cache/purge?domain=primary&path=/a").await;
    assert_eq!((status, body.trim()), (200, "{\"purged\":1}"));
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/a").await, "MISS");
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/b").await, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_by_prefix() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);
    fill(&gateway, PRIMARY, &["/dir/a", "/dir/b", "/other"]).await;
    let target = "/cache/purge?domain=primary&prefix=%2Fdir%2F";
    let (status, body) = admin_request(admin, "POST", target).await;
    assert_eq!((status, body.trim()), (200, "{\"purged\":2}"));
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/dir/a").await, "MISS");
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/dir/b").await, "MISS");
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/other").await, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_whole_domain() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);
    fill(&gateway, PRIMARY, &["/a", "/b"]).await;
    fill(&gateway, COMMUNITY, &["/a"]).await;
    let (status, body) = admin_request(admin, "POST", "/cache/purge?domain=primary").await;
    assert_eq!((status, body.trim()), (200, "{\"purged\":2}"));
    assert_eq!(get_cache_status(&gateway, PRIMARY, "/a").await, "MISS");
    assert_eq!(get_cache_status(&gateway, COMMUNITY, "/a").await, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_bad_requests() {
    let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    let cases = [
        ("POST", "/cache/purge?domain=nowhere&path=/a", 404),
        ("POST", "/cache/purge?path=/a", 400),
        ("POST", "/cache/purge?domain=primary&paht=/a", 400),
        ("POST", "/cache/purge?domain=primary&path=/a&path=/b", 400),
        ("POST", "/cache/purge?domain=primary&prefix=/a&query=x", 400),
        ("POST", "/cache/purge?domain=primary&path=/a?x=1", 400),
        ("POST", "/cache/purge?domain=primary&path=/a%3Fx%3D1", 400),
        ("POST", "/cache/purge?domain=primary&path=/a%23frag", 400),
        ("POST", "/cache/purge?domain=primary&prefix=/a?x", 400),
        ("GET", "/cache/purge?domain=primary", 405),
    ];
    for (method, target, expected) in cases {
        let (status, body) = admin_request(admin, method, target).await;
        assert_eq!(status, expected, "{method} {target}: {body}");
    }
    let wrong_method = client()
        .get(format!("http://{admin}/cache/purge?domain=primary"))
        .header("authorization", basic(USER, PASSWORD))
        .send()
        .await
        .expect("purge with GET");
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_names_first_unknown_parameter() {
    let origin = TestOrigin::start(|_| Reply::ok("body")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    let target = "/cache/purge?domain=primary&x9=1&x1=2&x5=3";
    let (status, body) = admin_request(admin, "POST", target).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown parameter \\\"x9\\\""), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_answer_head() {
    let origin = TestOrigin::start(|_| Reply::ok("body")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    for endpoint in ["/cache/stats", "/limits/stats"] {
        let response = client()
            .head(format!("http://{admin}{endpoint}"))
            .header("authorization", basic(USER, PASSWORD))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(response.status(), 200, "{endpoint}");
        let length: usize = response.headers()["content-length"]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("numeric Content-Length");
        assert!(length > 2, "{endpoint}: Content-Length {length}");
        assert!(
            response.bytes().await.expect("body").is_empty(),
            "{endpoint}"
        );
    }
    let wrong_method = client()
        .delete(format!("http://{admin}/cache/stats"))
        .header("authorization", basic(USER, PASSWORD))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_endpoint_lists_all() {
    let origin = TestOrigin::start(|_| Reply::ok("body")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    let (status, body) = admin_request(admin, "GET", "/nothing-here").await;
    assert_eq!(status, 404, "{body}");
    let endpoints = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/status,",
        "/status.json",
        "/limits/stats",
        "/cache/stats",
        "/cache/purge",
    ];
    for endpoint in endpoints {
        assert!(body.contains(endpoint), "{endpoint} missing from {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_unknown_domain_lists_ids() {
    let origin = TestOrigin::start(|_| Reply::ok("body")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start_with_admin(dir.path(), origin.addr);
    let (status, body) = admin_request(admin, "POST", "/cache/purge?domain=nosuch").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no domain \\\"nosuch\\\""), "{body}");
    assert!(body.contains("primary"), "{body}");
    assert!(body.contains("community"), "{body}");
}

/// Purged bytes leave the memory budget: after purging two of three 300 KiB objects from a
/// 1 MiB tier, two new ones fit without evicting the third.
#[tokio::test(flavor = "multi_thread")]
async fn purge_frees_memory_budget() {
    let origin = TestOrigin::start(|req| {
        let mut reply = Reply::ok("");
        reply.body = vec![req.target.as_bytes()[1]; 300 * 1024];
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = BASE_CONFIG
        .replace("memory_bytes = \"64MiB\"", "memory_bytes = \"1MiB\"")
        .replace(
            "max_object_bytes = \"32MiB\"",
            "max_object_bytes = \"1MiB\"",
        );
    let (gateway, admin) = start_with_admin_base(dir.path(), origin.addr, &base);
    fill(&gateway, PRIMARY, &["/a", "/b", "/c"]).await;

    for path in ["/a", "/b"] {
        let target = format!("/cache/purge?domain=primary&path={path}");
        let (status, body) = admin_request(admin, "POST", &target).await;
        assert_eq!(status, 200, "{body}");
    }
    fill(&gateway, PRIMARY, &["/d", "/e"]).await;

    assert_eq!(get_cache_status(&gateway, PRIMARY, "/c").await, "HIT");
    let (_, stats) = admin_request(admin, "GET", "/cache/stats").await;
    assert_eq!(memory_field(&stats, "entries"), Some(3), "{stats}");
    assert_eq!(memory_field(&stats, "evictions"), Some(0), "{stats}");
}

#[test]
fn admin_listen_needs_htpasswd() {
    let text = format!("{BASE_CONFIG}\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    let path = Path::new("/nonexistent/gateway.toml");
    let errors = match mirror_proxy::config::load_str(&text, path, Vec::new()) {
        Ok(_) => panic!("[admin] listen without htpasswd was accepted"),
        Err(errors) => errors,
    };
    assert!(
        errors.iter().any(|e| e.key == "admin.htpasswd"),
        "{errors:#?}"
    );
}

/// A purge that arrives while a fill runs also removes what that fill stores when it ends.
#[tokio::test(flavor = "multi_thread")]
async fn purge_during_fill_holds() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // An origin that sends the header and half the body, then the rest 500 ms later.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin_addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    let origin = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\
                            cache-control: max-age=300\r\n\r\nfirst";
                let _ = stream.write_all(head.as_bytes()).await;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let _ = stream.write_all(b"end").await;
            });
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin_addr);

    let addr = gateway.addr;
    let filler = tokio::spawn(async move { raw_get(addr, "/slow", &[("host", PRIMARY)]).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, body) =
        admin_request(admin, "POST", "/cache/purge?domain=primary&path=/slow").await;
    assert_eq!(status, 200, "{body}");
    let filled = filler.await.expect("filler");
    assert_eq!(filled.status, 200);
    assert_eq!(filled.header("x-cache-status"), Some("MISS"));

    assert_eq!(get_cache_status(&gateway, PRIMARY, "/slow").await, "MISS");
    assert_eq!(served.load(Ordering::SeqCst), 2);
    origin.abort();
}

/// A purge that arrives while a fill still waits for the origin's response header also removes
/// what that fill stores when it ends, whether it names the path or the whole domain.
#[tokio::test(flavor = "multi_thread")]
async fn purge_before_origin_header_holds() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    // Version 1 of every path comes 1.5 s after the request, version 2 at once.
    let version = Arc::new(AtomicUsize::new(1));
    let current = Arc::clone(&version);
    let origin = TestOrigin::start(move |req| {
        let v = current.load(Ordering::SeqCst);
        let mut reply = Reply::ok(&format!("v{v} of {}", req.target));
        reply.headers = vec![("cache-control".into(), "max-age=3600".into())];
        if v == 1 {
            reply.delay = Duration::from_millis(1500);
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);

    let cases = [
        ("/o/hp", "/cache/purge?domain=primary&path=/o/hp"),
        ("/o/hd", "/cache/purge?domain=primary"),
    ];
    for (path, purge) in cases {
        version.store(1, Ordering::SeqCst);
        let addr = gateway.addr;
        let filler = tokio::spawn(async move { raw_get(addr, path, &[("host", PRIMARY)]).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, body) = admin_request(admin, "POST", purge).await;
        assert_eq!(status, 200, "{purge}: {body}");
        version.store(2, Ordering::SeqCst);

        let filled = filler.await.expect("filler");
        assert_eq!(filled.status, 200, "{path}");
        assert_eq!(filled.header("x-cache-status"), Some("MISS"), "{path}");
        assert_eq!(filled.text(), format!("v1 of {path}"));

        let after = raw_get(gateway.addr, path, &[("host", PRIMARY)]).await;
        assert_eq!(after.status, 200, "{path}");
        assert_eq!(
            after.header("x-cache-status"),
            Some("MISS"),
            "{path}: the purged response stayed cached"
        );
        assert_eq!(after.text(), format!("v2 of {path}"));
        let fetched = origin
            .requests()
            .iter()
            .filter(|r| r.target == path)
            .count();
        assert_eq!(fetched, 2, "origin requests for {path}");
    }
}

/// Host of the `primary` domain.
const PRIMARY: &str = "127.0.0.1";
/// Host of the `community` domain.
const COMMUNITY: &str = "community.test";

/// Returns a config with domains `primary` (host [`PRIMARY`]) and `community` (host
/// [`COMMUNITY`]), both in front of `origin` with no TTL rules, and `admin` (an `[admin]`
/// table or nothing) before them.
fn gateway_config(origin: SocketAddr, admin: &str) -> String {
    let mut config = format!("{BASE_CONFIG}\n{admin}\n");
    for (id, host) in [("primary", PRIMARY), ("community", COMMUNITY)] {
        config.push('\n');
        config.push_str(&http_domain(id, &[host], origin));
    }
    config
}

/// An admin address that another program has bound stops the start with an error that names
/// `admin.listen`, not the proxy's `server.listen`.
#[tokio::test(flavor = "multi_thread")]
async fn admin_port_in_use_names_admin_listen() {
    let origin = TestOrigin::start(|_| Reply::ok("x")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("take a port");
    let port = taken.local_addr().expect("taken address").port();
    let admin = admin_table(dir.path(), &format!("127.0.0.1:{port}"));
    let path = dir.path().join("gateway.toml");
    let text = gateway_config(origin.addr, &admin);
    std::fs::write(&path, &text).expect("write config");
    let config = mirror_proxy::config::load_str(&text, &path, [])
        .unwrap_or_else(|errors| panic!("config invalid: {errors:?}"));
    let Err(error) = mirror_proxy::app::App::build(&config) else {
        panic!("the gateway started on a port another program holds");
    };
    let message = error.to_string();
    assert!(message.contains("admin.listen"), "{message}");
    assert!(message.contains(&port.to_string()), "{message}");
}

/// Starts a gateway with the admin listener on a free port and one admin user, and returns it
/// with the admin address.
fn start_with_admin(dir: &Path, origin: SocketAddr) -> (TestGateway, SocketAddr) {
    start_with_admin_base(dir, origin, BASE_CONFIG)
}

/// Does what [`start_with_admin`] does, with `base` in place of [`BASE_CONFIG`].
fn start_with_admin_base(dir: &Path, origin: SocketAddr, base: &str) -> (TestGateway, SocketAddr) {
    let admin = admin_table(dir, "127.0.0.1:0");
    let config = gateway_config(origin, &admin).replacen(BASE_CONFIG, base, 1);
    let gateway = TestGateway::start(dir, &config);
    let addr = gateway.running.admin_addr().expect("admin listener");
    (gateway, addr)
}

/// Writes an htpasswd file with the admin user into `dir` and returns an `[admin]` table that
/// listens on `listen` with it.
fn admin_table(dir: &Path, listen: &str) -> String {
    let users = dir.join("admin.htpasswd");
    let line = htpasswd_line(&["-B", "-C", "5"], USER, PASSWORD);
    std::fs::write(&users, format!("{line}\n")).expect("write htpasswd");
    format!(
        "[admin]\nlisten = \"{listen}\"\nhtpasswd = \"{}\"",
        users.display()
    )
}

/// Sends `method target` to the admin listener with valid credentials, and returns the status
/// and body.
async fn admin_request(admin: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let resp = client()
        .request(method, format!("http://{admin}{target}"))
        .header("authorization", basic(USER, PASSWORD))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin {target}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("admin body"))
}

/// Sends GET `path` to `host` and returns `X-Cache-Status`.
async fn get_cache_status(gateway: &TestGateway, host: &str, path: &str) -> String {
    let resp = raw_get(gateway.addr, path, &[("host", host)]).await;
    assert_eq!(resp.status, 200, "{host}{path}");
    resp.header("x-cache-status").unwrap_or("").to_string()
}

/// Fills every path of `paths` on `host`, and checks that the first request of each is a `MISS`
/// and the second a `HIT`.
async fn fill(gateway: &TestGateway, host: &str, paths: &[&str]) {
    for path in paths {
        assert_eq!(
            get_cache_status(gateway, host, path).await,
            "MISS",
            "{path}"
        );
        assert_eq!(get_cache_status(gateway, host, path).await, "HIT", "{path}");
    }
}

/// Reads the integer `field` of the `memory` object of a stats document.
fn memory_field(stats: &str, field: &str) -> Option<u64> {
    let memory = stats.split("\"memory\":{").nth(1)?.split('}').next()?;
    let value = memory.split(&format!("\"{field}\":")).nth(1)?;
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
