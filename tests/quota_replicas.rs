//! End-to-end: two gateway processes share one hourly budget through a real `redis-server`,
//! and the admin listener reports rejections.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    basic, client, htpasswd_line, http_domain, spawn_gateway, Reply, TestGateway, TestOrigin,
    BASE_CONFIG,
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
        let child = Self::spawn(port, dir.path());
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Kills the server by PID and waits for it to exit.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new server, without the old one's data, on the same port, once the old one
    /// is stopped.
    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, self._dir.path());
    }

    /// Starts `redis-server` on `port`, without persistence, and waits until it listens.
    fn spawn(port: u16, dir: &std::path::Path) -> Child {
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
            .arg(dir)
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
        child
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns a gateway config (logging at `info`, which `spawn_gateway` needs) with one domain
/// in front of `origin` whose quota of `budget` requests per hour counts in the Redis on
/// `redis_port` under `prefix`.
fn quota_config(
    origin: std::net::SocketAddr,
    redis_port: u16,
    budget: u64,
    prefix: &str,
) -> String {
    format!(
        r#"{}
{}
[[domains.primary.plugins]]
name = "quota"
index_per_hour = {budget}
download_per_hour = {budget}
redis = {{ url = "redis://127.0.0.1:{redis_port}/0", key_prefix = "{prefix}", timeout_ms = 1000 }}
"#,
        BASE_CONFIG.replace("level = \"warn\"", "level = \"info\""),
        http_domain("primary", &["127.0.0.1"], origin)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_redis_budget() {
    let redis = Redis::start();
    let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("replicas-{}", std::process::id());
    let config = quota_config(origin.addr, redis.port, 10, &prefix);
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

/// A gateway process that is killed by PID when dropped, so that a failed assertion does not
/// leave it running.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the integer in `key` with `redis-cli`; 0 when the key is missing.
fn redis_get(port: u16, key: &str) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "GET", key])
        .output()
        .expect("redis-cli runs (Debian package redis-tools)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Lists the keys matching `pattern` with `redis-cli`.
fn redis_keys(port: u16, pattern: &str) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw", "KEYS", pattern])
        .output()
        .expect("redis-cli runs (Debian package redis-tools)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|key| !key.is_empty())
        .collect()
}

/// A gateway that stops gives the requests it reserved in Redis back, so that only the
/// requests it let through stay counted.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_gives_reserve_back() {
    let redis = Redis::start();
    let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("reserve-{}", std::process::id());
    let config = quota_config(origin.addr, redis.port, 1_000_000, &prefix);
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (child, addr) = spawn_gateway(dir.path());
    let mut gateway = Stopped(child);
    let url = format!("http://{addr}/concelier/exports/index.json");
    for _ in 0..3 {
        let status = client().get(&url).send().await.expect("request").status();
        assert_eq!(status.as_u16(), 200);
    }
    let keys = redis_keys(redis.port, &format!("{prefix}:primary:index:*"));
    let principal = keys
        .iter()
        .find(|key| !key.contains(":all:"))
        .expect("a principal key");
    assert_eq!(
        redis_get(redis.port, principal),
        1 + 64,
        "the first request and a reserve of 64; the other two came from it"
    );

    let pid = nix::unistd::Pid::from_raw(gateway.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    gateway.0.wait().expect("reap gateway");
    assert_eq!(redis_get(redis.port, principal), 3);
    for key in &keys {
        assert_eq!(redis_get(redis.port, key), 3, "{key}");
    }
}

/// Requests that a gateway counted alone while Redis was down, and had not sent yet, go to
/// Redis when the gateway stops, so that a restart or another replica counts them.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_sends_outage_counts() {
    let mut redis = Redis::start();
    let origin = TestOrigin::start(|_| Reply::ok("{\"domains\":[]}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("outage-{}", std::process::id());
    let config = quota_config(origin.addr, redis.port, 1000, &prefix);
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (child, addr) = spawn_gateway(dir.path());
    let mut gateway = Stopped(child);
    let url = format!("http://{addr}/concelier/exports/index.json");
    let status = || async { client().get(&url).send().await.expect("request").status() };
    assert_eq!(status().await.as_u16(), 200);

    // Redis goes away with its data; the next requests are counted in the gateway alone.
    redis.stop();
    for _ in 0..5 {
        assert_eq!(status().await.as_u16(), 200);
    }
    redis.restart();
    let pid = nix::unistd::Pid::from_raw(gateway.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    gateway.0.wait().expect("reap gateway");

    let keys = redis_keys(redis.port, &format!("{prefix}:primary:index:*"));
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        assert_eq!(redis_get(redis.port, key), 5, "{key}");
    }
}
