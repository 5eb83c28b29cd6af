//! End-to-end: the gateway in front of a real HTTP origin and an export tree.

mod common;

use common::{client, export_tree, Reply, TestGateway, TestOrigin, BASE_CONFIG};

fn http_origin_config(origin: std::net::SocketAddr) -> String {
    format!(
        r#"{BASE_CONFIG}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{origin}"]
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
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http_origin_miss_then_hit() {
    let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &http_origin_config(origin.addr));
    let url = gateway.url("/concelier/exports/index.json");

    let first = client().get(&url).send().await.expect("first");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache-status"], "MISS");
    assert_eq!(first.headers()["cache-control"], "public, max-age=60");
    assert_eq!(first.text().await.expect("body"), "{\"domains\":[]}");

    let second = client().get(&url).send().await.expect("second");
    assert_eq!(second.headers()["x-cache-status"], "HIT");
    assert_eq!(origin.count(), 1);
    let seen = &origin.requests()[0];
    assert_eq!(seen.header("host"), Some("concelier.internal"));
}

#[tokio::test(flavor = "multi_thread")]
async fn export_tree_serves_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("concelier");
    export_tree(&tree);
    let config = format!(
        r#"{BASE_CONFIG}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.tree]
kind = "export_tree"
root = "concelier"
[[domains.primary.routes]]
prefix = "/concelier/exports/index.json"
origin = "tree"
origin_path = "/mirror/index.json"
[[domains.primary.routes]]
prefix = "/concelier/exports/mirror/"
origin = "tree"
origin_path = "/mirror/"
[[domains.primary.plugins]]
name = "ttl"
[[domains.primary.plugins.rules]]
pattern = "/concelier/exports/mirror/**"
ttl_secs = 300
cache_control = "public, max-age=300, immutable"
"#
    );
    let gateway = TestGateway::start(dir.path(), &config);
    let url = gateway.url("/concelier/exports/mirror/primary/bundle.json");
    let first = client().get(&url).send().await.expect("first");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache-status"], "MISS");
    assert_eq!(first.headers()["content-type"], "application/json");
    assert_eq!(
        first.headers()["cache-control"],
        "public, max-age=300, immutable"
    );
    assert!(first.headers().contains_key("etag"));
    assert!(first.headers().contains_key("last-modified"));
    assert_eq!(
        first.text().await.expect("body"),
        "{\"bundle\":\"20260102T000000Z\"}"
    );

    let head = client().head(&url).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache-status"], "HIT");
    assert_eq!(head.headers()["content-length"], "29");
}

/// A request whose origin refuses the connection gets a 502 and exactly one error line, which
/// names the domain and the path.
#[tokio::test(flavor = "multi_thread")]
async fn origin_down_logs_one_error() {
    let dead = common::closed_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = http_origin_config(dead).replace(r#"level = "warn""#, r#"level = "info""#);
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (mut child, addr, log) = common::spawn_gateway_logged(dir.path());

    let resp = client()
        .get(format!("http://{addr}/concelier/exports/index.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 502);
    let error_lines = || -> Vec<String> {
        let lines = log.lock().expect("log lines");
        lines
            .iter()
            .filter(|l| l.contains("ERROR"))
            .cloned()
            .collect()
    };
    // The lines are read by another thread: wait for the first, then a little longer so that a
    // second one would have arrived too.
    for _ in 0..50 {
        if !error_lines().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let _ = child.kill();
    let _ = child.wait();
    let errors = error_lines();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("domain=\"primary\""), "{}", errors[0]);
    assert!(
        errors[0].contains("/concelier/exports/index.json"),
        "{}",
        errors[0]
    );
}
