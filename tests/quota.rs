//! End-to-end: the `quota` plugin behind `htpasswd` in the real gateway, with a real origin.
//!
//! Each test uses its own domain id, since counts are kept per domain id for the life of the
//! process.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{
    basic, client, htpasswd_line, http_domain, unique, Reply, TestGateway, TestOrigin, BASE_CONFIG,
};
use mirror_plugins::quota::Window;
use mirror_proxy::app::App;

const INDEX: &str = "/concelier/exports/index.json";

/// A gateway with `htpasswd`, `ttl` and `quota` (3 index requests per hour) in front of an
/// origin, and users `alice` and `bob` (password `pw`).
struct Fixture {
    origin: TestOrigin,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(quota_extra: &str) -> Self {
        Self::start_with(&format!("quota{}", unique()), quota_extra, Vec::new()).await
    }

    /// Starts the fixture with domain id `id` and environment overrides `env`.
    async fn start_with(id: &str, quota_extra: &str, env: Vec<(String, String)>) -> Self {
        wait_clear_of_hour_end();
        let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let users = [("alice", "pw"), ("bob", "pw")]
            .map(|(user, pw)| htpasswd_line(&["-B", "-C", "4"], user, pw))
            .join("\n");
        std::fs::write(dir.path().join("users.htpasswd"), users).expect("write htpasswd");
        let text = config(id, origin.addr, quota_extra);
        let gateway = start_gateway(dir.path(), &text, env);
        Self {
            origin,
            gateway,
            _dir: dir,
        }
    }

    async fn get(&self, user: &str) -> reqwest::Response {
        client()
            .get(self.gateway.url(INDEX))
            .header("authorization", basic(user, "pw"))
            .send()
            .await
            .expect("request")
    }

    async fn statuses(&self, user: &str, n: usize) -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.get(user).await.status().as_u16());
        }
        out
    }
}

fn config(id: &str, origin: SocketAddr, quota_extra: &str) -> String {
    let domain = http_domain(id, &["127.0.0.1"], origin);
    format!(
        r#"{BASE_CONFIG}
{domain}
[[domains.{id}.plugins]]
name = "htpasswd"
file = "users.htpasswd"
[[domains.{id}.plugins]]
name = "ttl"
[[domains.{id}.plugins.rules]]
pattern = "{INDEX}"
ttl_secs = 60
cache_control = "public, max-age=60"
[[domains.{id}.plugins]]
name = "quota"
index_per_hour = 3
download_per_hour = 3
{quota_extra}
"#
    )
}

/// Starts the gateway like [`TestGateway::start`], with environment overrides `env`.
fn start_gateway(dir: &Path, text: &str, env: Vec<(String, String)>) -> TestGateway {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    let config = mirror_proxy::config::load(&path, env)
        .unwrap_or_else(|errors| panic!("invalid test config: {errors:#?}"));
    let app = App::build(&config).expect("gateway builds");
    let addr = app.listen_addrs()[0];
    let running = app.spawn();
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return TestGateway {
                running,
                addr,
                dir: dir.to_path_buf(),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("gateway did not accept connections on {addr}");
}

/// Waits for the next hour when this one ends within 15 s, so that no test's window resets
/// while it runs.
fn wait_clear_of_hour_end() {
    let left = Window::at(SystemTime::now()).reset_secs;
    if left < 15 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    let value = response.headers().get(name)?;
    value.to_str().ok().map(str::to_owned)
}

fn seconds(response: &reqwest::Response, name: &str) -> u64 {
    header(response, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {name} header"))
}

#[tokio::test(flavor = "multi_thread")]
async fn budget_spent_gets_429() {
    let fixture = Fixture::start("").await;
    assert_eq!(fixture.statuses("alice", 4).await, [200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejection_has_retry_after_and_ratelimit_headers() {
    let fixture = Fixture::start("").await;
    fixture.statuses("alice", 3).await;
    let response = fixture.get("alice").await;
    let retry = seconds(&response, "retry-after");
    assert!((1..=3600).contains(&retry), "Retry-After {retry}");
    assert_eq!(seconds(&response, "ratelimit-reset"), retry);
    assert_eq!(header(&response, "ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(
        header(&response, "ratelimit-remaining").as_deref(),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejection_body_is_json_naming_budget() {
    let fixture = Fixture::start("").await;
    fixture.statuses("alice", 3).await;
    let response = fixture.get("alice").await;
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json")
    );
    let body = response.text().await.expect("body");
    assert!(
        body.contains("\"budget\":\"index requests per hour\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejection_never_reaches_origin() {
    let fixture = Fixture::start("count_cache_hits = true").await;
    fixture.statuses("alice", 5).await;
    assert_eq!(fixture.origin.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn counted_response_carries_ratelimit_headers() {
    let fixture = Fixture::start("").await;
    let response = fixture.get("alice").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(
        header(&response, "ratelimit-remaining").as_deref(),
        Some("2")
    );
    assert!((1..=3600).contains(&seconds(&response, "ratelimit-reset")));
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_hit_counts() {
    let fixture = Fixture::start("").await;
    let first = fixture.get("alice").await;
    let second = fixture.get("alice").await;
    assert_eq!(header(&first, "x-cache-status").as_deref(), Some("MISS"));
    assert_eq!(header(&second, "x-cache-status").as_deref(), Some("HIT"));
    assert_eq!(header(&second, "ratelimit-remaining").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_hit_uncounted_when_disabled() {
    let fixture = Fixture::start("count_cache_hits = false").await;
    let got = fixture.statuses("alice", 6).await;
    assert_eq!(got, [200; 6]);
    assert_eq!(fixture.origin.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn users_have_separate_budgets() {
    let fixture = Fixture::start("").await;
    fixture.statuses("alice", 4).await;
    assert_eq!(fixture.statuses("bob", 4).await, [200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_login_is_not_counted() {
    let fixture = Fixture::start("").await;
    let wrong = client()
        .get(fixture.gateway.url(INDEX))
        .header("authorization", basic("alice", "wrong"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    assert_eq!(fixture.statuses("alice", 3).await, [200, 200, 200]);
}

#[tokio::test(flavor = "multi_thread")]
async fn env_alias_sets_budget() {
    let id = format!("quota{}", unique());
    let var = format!(
        "MIRROR_GATEWAY__DOMAINS__{}__MAXINDEXREQUESTSPERHOUR",
        id.to_ascii_uppercase()
    );
    let fixture = Fixture::start_with(&id, "", vec![(var, "1".to_string())]).await;
    assert_eq!(fixture.statuses("alice", 2).await, [200, 429]);
}
