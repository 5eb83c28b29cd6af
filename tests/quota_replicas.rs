//! End-to-end: two gateway processes share one hourly budget through a real `redis-server`,
//! and the admin listener reports rejections.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    basic, client, htpasswd_line, spawn_gateway, Reply, TestGateway, TestOrigin, BASE_CONFIG,
};

/// A `redis-server` child on a free loopback port, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (install the Debian package redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_redis_budget() {
    let redis = Redis::start();
    let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"{}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
[[domains.primary.plugins]]
name = "quota"
index_per_hour = 10
download_per_hour = 10
redis = {{ url = "redis://127.0.0.1:{}/0", key_prefix = "replicas-{}", timeout_ms = 1000 }}
"#,
        BASE_CONFIG.replace("level = \"warn\"", "level = \"info\""),
        origin.addr,
        redis.port,
        std::process::id()
    );
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (mut first, first_addr) = spawn_gateway(dir.path());
    let (mut second, second_addr) = spawn_gateway(dir.path());

    // Budgets reset at every UTC hour; stay clear of the boundary.
    let into_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 3600);
    if into_hour > 3590 {
        tokio::time::sleep(Duration::from_secs(3601 - into_hour)).await;
    }
    let mut passed = 0;
    let mut rejected = 0;
    for i in 0..30 {
        let addr = if i % 2 == 0 { first_addr } else { second_addr };
        let url = format!("http://{addr}/concelier/exports/index.json");
        let status = client().get(url).send().await.expect("request").status();
        match status.as_u16() {
            200 => passed += 1,
            429 => rejected += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    for child in [&mut first, &mut second] {
        child.kill().expect("stop gateway");
        child.wait().expect("reap gateway");
    }
    assert_eq!(passed, 10);
    assert_eq!(rejected, 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reports_rejections() {
    let origin = TestOrigin::start(|_| Reply::ok("x")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = htpasswd_line(&["-B", "-C", "5"], "admin", "secret");
    std::fs::write(dir.path().join("admin.htpasswd"), users).expect("write htpasswd");
    let config = format!(
        r#"{BASE_CONFIG}
[admin]
listen = "127.0.0.1:0"
htpasswd = "admin.htpasswd"

[domains.limited-{id}]
hosts = ["127.0.0.1"]
[domains.limited-{id}.origins.web]
kind = "http"
addresses = ["{addr}"]
[[domains.limited-{id}.routes]]
prefix = "/"
origin = "web"
[[domains.limited-{id}.plugins]]
name = "rate_limit"
requests_per_second = 0.01
burst = 2
"#,
        id = std::process::id(),
        addr = origin.addr
    );
    let gateway = TestGateway::start(dir.path(), &config);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = client()
            .get(gateway.url("/x"))
            .send()
            .await
            .expect("request");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    let admin = gateway.running.admin_addr().expect("admin listener");
    let stats = client()
        .get(format!("http://{admin}/limits/stats"))
        .header("authorization", basic("admin", "secret"))
        .send()
        .await
        .expect("stats")
        .text()
        .await
        .expect("body");
    let expected = format!(
        "{{\"domain\":\"limited-{}\",\"plugin\":\"rate_limit\",\"count\":3}}",
        std::process::id()
    );
    assert!(stats.contains(&expected), "{stats}");
}
