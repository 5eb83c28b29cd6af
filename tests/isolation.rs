//! End-to-end: domains sharing one origin never share cache entries, hosts or credentials.

mod common;

use common::{client, Reply, TestGateway, TestOrigin, BASE_CONFIG};

/// A gateway with domains `a` (`a.test`), `b` (`b.test`, forwarding `Authorization` under
/// `/fwd/`) and `c` (`*.c.test`), all in front of one origin.
struct Fixture {
    origin: TestOrigin,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        let origin = TestOrigin::start(|req| {
            let host = req.header("host").unwrap_or("-");
            Reply::ok(&format!("{host} {}", req.target))
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = BASE_CONFIG.to_string();
        for (id, host) in [("a", "a.test"), ("b", "b.test"), ("c", "*.c.test")] {
            config.push_str(&domain(id, host, origin.addr));
        }
        config.push_str(
            r#"
[[domains.b.routes]]
prefix = "/fwd/"
origin = "web"
forward_authorization = true
"#,
        );
        let gateway = TestGateway::start(dir.path(), &config);
        Self {
            origin,
            gateway,
            _dir: dir,
        }
    }

    async fn get(&self, host: &str, path: &str) -> reqwest::Response {
        client()
            .get(self.gateway.url(path))
            .header("host", host)
            .send()
            .await
            .expect("request")
    }
}

/// Returns the TOML of domain `id` serving `host` from origin host `<id>.origin`.
fn domain(id: &str, host: &str, origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[domains.{id}]
hosts = ["{host}"]
[domains.{id}.origins.web]
kind = "http"
addresses = ["{origin}"]
host = "{id}.origin"
[[domains.{id}.routes]]
prefix = "/"
origin = "web"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn same_path_separate_entries() {
    let fx = Fixture::start().await;
    for host in ["a", "b"] {
        let resp = fx.get(&format!("{host}.test"), "/shared.json").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cache-status"], "MISS", "first on {host}");
        let body = resp.text().await.expect("body");
        assert_eq!(body, format!("{host}.origin /shared.json"));
    }
    for host in ["a", "b"] {
        let resp = fx.get(&format!("{host}.test"), "/shared.json").await;
        assert_eq!(resp.headers()["x-cache-status"], "HIT", "second on {host}");
        let body = resp.text().await.expect("body");
        assert_eq!(body, format!("{host}.origin /shared.json"));
    }
    assert_eq!(fx.origin.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_case_and_port_ignored() {
    let fx = Fixture::start().await;
    let upper = fx.get("A.TEST", "/x").await;
    assert_eq!(upper.text().await.expect("body"), "a.origin /x");
    let with_port = fx.get("a.test:8443", "/x").await;
    assert_eq!(with_port.headers()["x-cache-status"], "HIT");
    assert_eq!(with_port.text().await.expect("body"), "a.origin /x");
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_not_forwarded() {
    let fx = Fixture::start().await;
    let resp = client()
        .get(fx.gateway.url("/private.json"))
        .header("host", "a.test")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let seen = fx.origin.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(seen[0].header("host"), Some("a.origin"));
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_forwarded_when_enabled() {
    let fx = Fixture::start().await;
    let send = |path: &'static str| {
        client()
            .get(fx.gateway.url(path))
            .header("host", "b.test")
            .header("authorization", "Basic dXNlcjpwYXNz")
            .send()
    };
    assert_eq!(send("/fwd/doc.json").await.expect("fwd").status(), 200);
    assert_eq!(send("/other.json").await.expect("other").status(), 200);
    let seen = fx.origin.requests();
    assert_eq!(seen.len(), 2);
    let by_target = |t: &str| seen.iter().find(|r| r.target == t).expect("recorded");
    let fwd = by_target("/fwd/doc.json").header("authorization");
    assert_eq!(fwd, Some("Basic dXNlcjpwYXNz"));
    assert_eq!(by_target("/other.json").header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_response_not_shared() {
    let fx = Fixture::start().await;
    let with_auth = client()
        .get(fx.gateway.url("/fwd/doc.json"))
        .header("host", "b.test")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("with auth");
    assert_eq!(with_auth.status(), 200);
    let anonymous = fx.get("b.test", "/fwd/doc.json").await;
    assert_ne!(anonymous.headers()["x-cache-status"], "HIT");
    assert_eq!(fx.origin.count(), 2);
    assert_eq!(fx.origin.requests()[1].header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_421() {
    let fx = Fixture::start().await;
    for host in ["nope.test", "test", "c.test", "a.test.evil"] {
        let resp = fx.get(host, "/x").await;
        assert_eq!(resp.status(), 421, "host {host}");
        assert_eq!(resp.headers()["x-cache-status"], "BYPASS", "host {host}");
    }
    assert_eq!(fx.origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_host_matches() {
    let fx = Fixture::start().await;
    for host in ["x.c.test", "y.x.c.test"] {
        let resp = fx.get(host, "/w").await;
        assert_eq!(resp.status(), 200, "host {host}");
        assert_eq!(resp.text().await.expect("body"), "c.origin /w");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn post_405_with_allow() {
    let fx = Fixture::start().await;
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let resp = client()
            .request(method.clone(), fx.gateway.url("/x"))
            .header("host", "a.test")
            .body("payload")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(resp.headers()["allow"], "GET, HEAD", "{method}");
        assert_eq!(resp.headers()["x-cache-status"], "BYPASS", "{method}");
    }
    assert_eq!(fx.origin.count(), 0);
}

/// Sends `request` as raw bytes and returns the whole response as text.
async fn raw_text(addr: std::net::SocketAddr, request: &str) -> String {
    String::from_utf8_lossy(&common::raw_exchange(addr, request).await).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_host_is_400() {
    let fx = Fixture::start().await;
    let answer = raw_text(
        fx.gateway.addr,
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(fx.origin.count(), 0);
}

/// A request target must be a path or an absolute http URL, whose host wins over `Host`.
#[tokio::test(flavor = "multi_thread")]
async fn request_target_forms() {
    let fx = Fixture::start().await;
    for target in ["x", "x/../../y", "..", "a.test:80", "ftp://a.test/x"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        let answer = raw_text(fx.gateway.addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{target}: {answer}");
        assert!(
            answer.contains("invalid request target"),
            "{target}: {answer}"
        );
    }
    let answer = raw_text(
        fx.gateway.addr,
        "GET /x HTTP/1.1\r\nHost: a.t\u{e9}st\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("invalid Host header"), "{answer}");
    assert_eq!(fx.origin.count(), 0);

    // HTTP/1.0 needs no Host header: the absolute URL names the domain.
    let answer = raw_text(
        fx.gateway.addr,
        "GET http://b.test/y HTTP/1.0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with("/y"), "{answer}");
    assert_eq!(fx.origin.count(), 1);
}

/// Header fields over nginx's default limits get 431 and never reach the origin.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_header_fields_431() {
    let fx = Fixture::start().await;
    let get = |fields: Vec<(String, String)>| {
        let mut request = client().get(fx.gateway.url("/x")).header("host", "a.test");
        for (name, value) in fields {
            request = request.header(name, value);
        }
        request.send()
    };
    let big = |n: usize| "v".repeat(n);
    let big_field = get(vec![("x-big".into(), big(9000))])
        .await
        .expect("request");
    assert_eq!(big_field.status(), 431);
    assert!(big_field.text().await.expect("body").contains("x-big"));
    let many: Vec<_> = (0..5).map(|i| (format!("x-part-{i}"), big(7000))).collect();
    assert_eq!(get(many).await.expect("request").status(), 431);
    assert_eq!(fx.origin.count(), 0);

    let fits = get(vec![("x-big".into(), big(7000))])
        .await
        .expect("request");
    assert_eq!(fits.status(), 200);
    assert_eq!(fx.origin.count(), 1);
}

/// An origin that responds in HTTP/1.0 does not make the gateway respond in HTTP/1.0.
#[tokio::test(flavor = "multi_thread")]
async fn origin_version_not_passed_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin_addr = listener.local_addr().expect("addr");
    let origin = tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 2048];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("{BASE_CONFIG}{}", domain("a", "a.test", origin_addr));
    let gateway = TestGateway::start(dir.path(), &config);
    let request = "GET /old HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let answer = raw_text(gateway.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    origin.abort();
}
