//! End-to-end: the `rate_limit` plugin and the client IP behind trusted proxies.
//!
//! The rate tests refill one request per 100 s, so no refill happens while a test runs. Each test
//! uses its own domain id, since counts are kept per domain id for the life of the process.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    basic, client, htpasswd_line, rate_limited_config, wait_for_lines, Reply, TestGateway,
    TestOrigin, BASE_CONFIG,
};

/// Returns a config with one domain `id` in front of `origin`, limited to `burst` requests,
/// with `trusted` as `server.trusted_proxies` and the access log in `access.log`.
fn config(id: &str, origin: std::net::SocketAddr, burst: u32, trusted: &str) -> String {
    rate_limited_config(id, origin, burst, &format!("trusted_proxies = [{trusted}]"))
}

/// Sends a GET of `path` with `X-Forwarded-For: forwarded` (if any) and returns the response.
async fn get(gateway: &TestGateway, path: &str, forwarded: Option<&str>) -> reqwest::Response {
    let mut request = client().get(gateway.url(path));
    if let Some(value) = forwarded {
        request = request.header("x-forwarded-for", value);
    }
    request.send().await.expect("request")
}

async fn status(gateway: &TestGateway, path: &str, forwarded: Option<&str>) -> u16 {
    get(gateway, path, forwarded).await.status().as_u16()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    let value = response.headers().get(name)?;
    value.to_str().ok().map(str::to_owned)
}

/// Returns (request path, client address) of each access log line, sorted by path. Requests on
/// separate connections may be logged out of order.
fn logged_clients(lines: &[String]) -> Vec<(&str, &str)> {
    let mut pairs: Vec<(&str, &str)> = lines
        .iter()
        .map(|line| {
            let client = line.split(' ').next().unwrap_or("");
            let path = line
                .split("\"GET ")
                .nth(1)
                .and_then(|r| r.split(' ').next());
            (path.unwrap_or(""), client)
        })
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test(flavor = "multi_thread")]
async fn burst_over_limit_gets_429() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("rl-burst", origin.addr, 3, ""));

    let mut remaining = Vec::new();
    for n in 0..3 {
        let response = get(&gateway, &format!("/file-{n}"), None).await;
        assert_eq!(response.status(), 200, "request {n}");
        assert_eq!(header(&response, "ratelimit-limit").as_deref(), Some("3"));
        remaining.push(header(&response, "ratelimit-remaining"));
    }
    assert_eq!(
        remaining,
        [Some("2".into()), Some("1".into()), Some("0".into())]
    );

    let rejected = get(&gateway, "/file-3", None).await;
    assert_eq!(rejected.status(), 429);
    let retry: u64 = header(&rejected, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("numeric Retry-After");
    assert!((90..=100).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        header(&rejected, "ratelimit-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(
        header(&rejected, "ratelimit-reset"),
        Some(retry.to_string())
    );
    let body = rejected.text().await.expect("body");
    assert!(body.contains("\"budget\":\"request rate of "), "{body}");
    assert_eq!(origin.count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxy_separates_clients() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config("rl-trusted", origin.addr, 1, "\"127.0.0.1/32\"");
    let gateway = TestGateway::start(dir.path(), &config);

    assert_eq!(status(&gateway, "/a", Some("192.0.2.1")).await, 200);
    assert_eq!(status(&gateway, "/b", Some("192.0.2.2")).await, 200);
    assert_eq!(status(&gateway, "/c", Some("192.0.2.1")).await, 429);
    assert_eq!(
        status(&gateway, "/d", Some("192.0.2.9, 192.0.2.2")).await,
        429
    );

    let seen = origin.requests();
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        Some("192.0.2.1, 127.0.0.1")
    );
    let lines = wait_for_lines(&dir.path().join("access.log"), 4);
    assert_eq!(
        logged_clients(&lines),
        [
            ("/a", "192.0.2.1"),
            ("/b", "192.0.2.2"),
            ("/c", "192.0.2.1"),
            ("/d", "192.0.2.2")
        ]
    );

    // Two header lines are one list: the origin gets both, then the peer, in one line.
    let two_lines = client()
        .get(gateway.url("/e"))
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-forwarded-for", "192.0.2.3")
        .send()
        .await
        .expect("request");
    assert_eq!(two_lines.status(), 200);
    let seen = origin.requests();
    let forwarded: Vec<&str> = seen[2]
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(forwarded, ["198.51.100.7, 192.0.2.3, 127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_peer_cannot_spoof() {
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("rl-untrusted", origin.addr, 1, ""));

    assert_eq!(status(&gateway, "/a", Some("192.0.2.1")).await, 200);
    assert_eq!(status(&gateway, "/b", Some("192.0.2.2")).await, 429);
    assert_eq!(status(&gateway, "/c", None).await, 429);

    let lines = wait_for_lines(&dir.path().join("access.log"), 3);
    assert!(
        lines.iter().all(|l| l.starts_with("127.0.0.1 ")),
        "{lines:?}"
    );
}

/// Starts an origin that replies to `/slow` after 800 ms and to every other path at once.
async fn slow_origin() -> TestOrigin {
    TestOrigin::start(|req| Reply {
        delay: Duration::from_millis(if req.target == "/slow" { 800 } else { 0 }),
        ..Reply::ok("{}")
    })
    .await
}

/// Sends `GET /slow` in a task of its own and waits until the origin received it, so that
/// the request takes the client's place among its concurrent requests.
async fn hold_slow_request(
    gateway: &TestGateway,
    origin: &TestOrigin,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let slow = tokio::spawn(client().get(gateway.url("/slow")).send());
    for _ in 0..200 {
        if origin.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    slow
}

/// Sends requests to fresh paths until one gets 200, at most 50 of them 20 ms apart, and
/// returns every status. A place among the concurrent requests is given back just after the
/// response that held it is sent, so the first requests may still get 429.
async fn statuses_until_ok(gateway: &TestGateway) -> Vec<u16> {
    let mut statuses = Vec::new();
    for n in 0..50 {
        let got = status(gateway, &format!("/after-{n}"), None).await;
        statuses.push(got);
        if got == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_cap_releases_at_end() {
    let origin = slow_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config("rl-concurrent", origin.addr, 100, "").replace(
        "requests_per_second = 0.01",
        "requests_per_second = 1000\nmax_concurrent_per_ip = 1",
    );
    let gateway = TestGateway::start(dir.path(), &config);

    let slow = hold_slow_request(&gateway, &origin).await;
    let busy = get(&gateway, "/busy", None).await;
    assert_eq!(busy.status(), 429);
    assert_eq!(header(&busy, "ratelimit-limit").as_deref(), Some("1"));
    let body = busy.text().await.expect("body");
    assert!(
        body.contains("\"budget\":\"concurrent requests\""),
        "{body}"
    );

    let finished = slow.await.expect("task").expect("slow request");
    assert_eq!(finished.status(), 200);
    assert_eq!(statuses_until_ok(&gateway).await.last(), Some(&200));
}

/// Rate and concurrency rejections have distinct reasons in the metrics, in `/limits/stats`
/// and in the access log, which names the budget of each rejected request.
#[tokio::test(flavor = "multi_thread")]
async fn rejections_name_their_reason() {
    let origin = slow_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let htpasswd = dir.path().join("admin.htpasswd");
    std::fs::write(
        &htpasswd,
        htpasswd_line(&["-B", "-C", "5"], "admin", "secret") + "\n",
    )
    .expect("write");
    let config = config("rl-reasons", origin.addr, 2, "")
        .replace("burst = 2", "burst = 2\nmax_concurrent_per_ip = 1")
        + &format!(
            "\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
            htpasswd.display()
        );
    let gateway = TestGateway::start(dir.path(), &config);

    let slow = hold_slow_request(&gateway, &origin).await;
    assert_eq!(status(&gateway, "/busy", None).await, 429);
    let finished = slow.await.expect("task").expect("slow request");
    assert_eq!(finished.status(), 200);
    // The burst of 2 has 1 request left after `/slow`.
    let statuses = statuses_until_ok(&gateway).await;
    assert_eq!(statuses.last(), Some(&200));
    assert_eq!(status(&gateway, "/over", None).await, 429);
    let concurrency = statuses.len() as u64;

    let lines = wait_for_lines(&dir.path().join("access.log"), 3 + statuses.len());
    let label = |path: &str| {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("\"GET {path} ")))
            .unwrap_or_else(|| panic!("{path} not logged: {lines:?}"));
        line.rsplit(' ').next().unwrap_or("").to_owned()
    };
    assert_eq!(label("/busy"), "rate_limit:concurrency");
    assert_eq!(label("/over"), "rate_limit:rate");
    assert_eq!(label("/slow"), "-");

    let admin = gateway.running.admin_addr().expect("admin listener");
    let fetch = |path: &'static str| async move {
        client()
            .get(format!("http://{admin}{path}"))
            .header("authorization", basic("admin", "secret"))
            .send()
            .await
            .expect("admin request")
            .text()
            .await
            .expect("body")
    };
    let metrics = fetch("/metrics").await;
    for line in [
        format!(
            "mirror_gateway_rate_limit_rejections_total{{domain=\"rl-reasons\",reason=\"concurrency\"}} {concurrency}"
        ),
        "mirror_gateway_rate_limit_rejections_total{domain=\"rl-reasons\",reason=\"rate\"} 1"
            .to_owned(),
        format!(
            "mirror_gateway_rejections_total{{domain=\"rl-reasons\",plugin=\"rate_limit\"}} {}",
            concurrency + 1
        ),
    ] {
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
    let stats = fetch("/limits/stats").await;
    let expected =
        format!("{{\"domain\":\"rl-reasons\",\"reason\":\"concurrency\",\"count\":{concurrency}}}");
    assert!(stats.contains(&expected), "{stats}");
    assert!(
        stats.contains("{\"domain\":\"rl-reasons\",\"reason\":\"rate\",\"count\":1}"),
        "{stats}"
    );
}

#[test]
fn bad_trusted_proxies_are_reported() {
    let text = format!(
        "{}\n[domains.a]\nhosts = [\"a.example\"]\n",
        BASE_CONFIG.replace(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"10.0.0.1/8\", \"proxy.internal\"]\n"
        )
    );
    let errors = mirror_proxy::config::load_str(&text, Path::new("gateway.toml"), Vec::new())
        .err()
        .expect("invalid networks");
    let find = |key: &str| errors.iter().find(|e| e.key == key);
    let host_bits = find("server.trusted_proxies[0]").expect("first entry reported");
    assert_eq!(host_bits.value.as_deref(), Some("\"10.0.0.1/8\""));
    assert!(host_bits.reason.contains("\"10.0.0.0/8\""), "{host_bits}");
    let name = find("server.trusted_proxies[1]").expect("second entry reported");
    assert!(name.reason.contains("not an IP address"), "{name}");
}

/// A request that gets the gateway's own error (here 502, because the origin rejects
/// connections) used up its budget, so its response carries the budget fields like any other.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_errors_carry_budget_fields() {
    let origin = common::closed_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config("rl_errors", origin, 5, ""));

    for remaining in ["4", "3"] {
        let response = get(&gateway, "/down.json", None).await;
        assert_eq!(response.status(), 502);
        assert_eq!(
            header(&response, "x-cache-status").as_deref(),
            Some("BYPASS")
        );
        assert_eq!(header(&response, "ratelimit-limit").as_deref(), Some("5"));
        assert_eq!(
            header(&response, "ratelimit-remaining").as_deref(),
            Some(remaining)
        );
        assert!(header(&response, "ratelimit-reset").is_some());
    }
}
