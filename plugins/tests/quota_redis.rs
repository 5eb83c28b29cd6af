//! The `quota` plugin against a real `redis-server`: budgets shared by two replicas, and what
//! happens when Redis stops and comes back.
//!
//! Each test starts its own `redis-server` (Debian package `redis-server`) on a free loopback
//! port, without persistence, and kills it by PID at the end. Without `redis-server` on the
//! PATH the tests fail, as CI installs it.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Method};
use mirror_plugins::quota::{Class, QuotaPlugin, Registry};
use mirror_plugins::{BuildContext, RequestInfo, RequestState, Verdict};

const INDEX: &str = "/concelier/exports/index.json";

/// A `redis-server` child process on a loopback port.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Whether the server keeps its data across restarts.
    persistent: bool,
}

impl RedisServer {
    /// Starts a server on a free port that loses its data when stopped, and waits until it
    /// responds to PING.
    fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a server that writes every command to its append-only file before it replies,
    /// so that a restart after a kill keeps every count it reported.
    fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = Self {
            child: None,
            port,
            dir,
            persistent,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on the same port and waits until it responds to PING.
    fn restart(&mut self) {
        let append_only: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .args(append_only)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install the Debian package redis-server \
                     (scripts/setup-debian.sh does): these tests need a real Redis"
                )
            });
        self.child = Some(child);
        wait_for_pong(self.port);
    }

    /// Kills the server by PID and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends signal `name` (such as `-STOP`) to the server by PID with `kill`.
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {name} {pid}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Connects a plain client for reading and setting keys.
    fn admin(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection())
            .expect("connect to redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Waits up to 10 s for `+PONG` on `port`.
fn wait_for_pong(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ping(port) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server on port {port} did not answer PING within 10 s");
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// Builds a replica: a plugin with its own local counts, as another gateway process has.
fn replica(server: &RedisServer, budget: u64, mode: &str) -> Arc<QuotaPlugin> {
    replica_with(server, budget, mode, "")
}

/// Builds a replica with `extra` settings lines and the default reserve.
fn replica_with(server: &RedisServer, budget: u64, mode: &str, extra: &str) -> Arc<QuotaPlugin> {
    replica_from(server, budget, mode, extra, "")
}

/// Builds a replica that counts `reserve` requests of a principal in Redis ahead of use.
fn replica_reserving(server: &RedisServer, budget: u64, reserve: u64) -> Arc<QuotaPlugin> {
    replica_from(
        server,
        budget,
        "fail_open",
        "",
        &format!("reserve = {reserve}"),
    )
}

/// Builds a replica with `extra` settings lines and `redis_extra` lines in its `redis` table.
fn replica_from(
    server: &RedisServer,
    budget: u64,
    mode: &str,
    extra: &str,
    redis_extra: &str,
) -> Arc<QuotaPlugin> {
    let text = format!(
        "index_per_hour = {budget}\ndownload_per_hour = {budget}\n{extra}\n\
         [redis]\nurl = \"{}\"\nkey_prefix = \"test\"\ntimeout_ms = 2000\nfailure_mode = \"{mode}\"\n\
         {redis_extra}",
        server.url()
    );
    let settings = toml::Value::Table(text.parse().expect("valid TOML"));
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    match QuotaPlugin::with_registry(settings, &ctx, &Registry::new()) {
        Ok(plugin) => Arc::new(plugin),
        Err(errors) => panic!("settings rejected: {errors:?}"),
    }
}

/// Checks one index request as `user` at `now`; returns the verdict and the request's state.
async fn check(plugin: &QuotaPlugin, user: &str, now: SystemTime) -> (Verdict, RequestState) {
    let headers = HeaderMap::new();
    let mut state = RequestState {
        user: Some(user.to_owned()),
        ..RequestState::default()
    };
    let req = RequestInfo {
        domain: "primary",
        method: &Method::GET,
        path: INDEX,
        query: None,
        headers: &headers,
        client_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        received: std::time::Instant::now(),
    };
    let verdict = plugin.check_at(&req, &mut state, now).await;
    (verdict, state)
}

/// Sends one index request as `user`; returns the status (200 when let through) and body.
async fn send(plugin: &QuotaPlugin, user: &str, now: SystemTime) -> (u16, String) {
    match check(plugin, user, now).await.0 {
        Verdict::Continue => (200, String::new()),
        Verdict::Respond(local) => (
            local.status.as_u16(),
            String::from_utf8_lossy(&local.body).into_owned(),
        ),
    }
}

/// Sends one index request as `user` that misses the cache: checked, then counted as it goes
/// to the origin.
async fn send_miss(plugin: &QuotaPlugin, user: &str, now: SystemTime) {
    let (_, mut state) = check(plugin, user, now).await;
    plugin.count_upstream_at(&mut state, now);
}

async fn statuses(plugin: &QuotaPlugin, user: &str, n: usize, now: SystemTime) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(send(plugin, user, now).await.0);
    }
    out
}

/// Sends `n` concurrent requests as `user`, alternating between the replicas; returns how
/// many were let through.
async fn passed_together(replicas: &[Arc<QuotaPlugin>], user: &str, n: usize) -> usize {
    let now = SystemTime::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let plugin = Arc::clone(&replicas[i % replicas.len()]);
            let user = user.to_owned();
            tokio::spawn(async move { send(&plugin, &user, now).await.0 == 200 })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += usize::from(task.await.expect("task runs"));
    }
    passed
}

/// Sends requests as a throw-away user through each replica until each counts in Redis
/// again; panics after 15 s.
async fn wait_until_shared(replicas: &[Arc<QuotaPlugin>]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for plugin in replicas {
        while plugin.redis_available() != Some(true) {
            assert!(
                Instant::now() < deadline,
                "replica did not go back to Redis"
            );
            send(plugin, "probe", SystemTime::now()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn replicas_share_budget_exactly() {
    let server = RedisServer::start();
    let replicas = [
        replica(&server, 100, "fail_open"),
        replica(&server, 100, "fail_open"),
    ];
    assert_eq!(passed_together(&replicas, "alice", 300).await, 100);
}

/// Concurrent checks of one principal reach Redis together. Each request that passes gets its
/// own place in the budget (`RateLimit-Remaining` from 99 down to 0, each once), as if the
/// checks had run one at a time, and the other 60 are turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_checks_get_their_own_counts() {
    let server = RedisServer::start();
    let plugin = replica(&server, 100, "fail_open");
    let now = SystemTime::now();
    let tasks: Vec<_> = (0..160)
        .map(|_| {
            let plugin = Arc::clone(&plugin);
            tokio::spawn(async move {
                let (verdict, state) = check(&plugin, "alice", now).await;
                let passed = matches!(verdict, Verdict::Continue);
                let remaining = state.rate_limit.map(|budget| budget.remaining);
                (passed, remaining)
            })
        })
        .collect();
    let mut passed_remaining = Vec::new();
    let mut rejected = 0;
    for task in tasks {
        match task.await.expect("task runs") {
            (true, Some(remaining)) => passed_remaining.push(remaining),
            (false, _) => rejected += 1,
            (true, None) => panic!("a counted request carries its budget"),
        }
    }
    passed_remaining.sort_unstable();
    assert_eq!(passed_remaining, (0..100).collect::<Vec<u64>>());
    assert_eq!(rejected, 60);
}

/// The domain-wide ceiling is kept across replicas, and the requests that either budget turns
/// away leave no count behind in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn replicas_share_domain_ceiling_exactly() {
    let server = RedisServer::start();
    let ceiling = |n: u64| format!("domain_index_per_hour = {n}");
    let replicas = [
        replica_with(&server, 2, "fail_open", &ceiling(50)),
        replica_with(&server, 2, "fail_open", &ceiling(50)),
    ];
    // 40 users send 3 requests each: 80 fit their own budget, 50 fit the domain's.
    let now = SystemTime::now();
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let plugin = Arc::clone(&replicas[i % 2]);
            let user = format!("user{}", i % 40);
            tokio::spawn(async move { send(&plugin, &user, now).await.0 == 200 })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += usize::from(task.await.expect("task runs"));
    }
    assert_eq!(passed, 50);

    // The domain's count is 50, not more: with a ceiling of 52, two more requests pass.
    let wider = replica_with(&server, 2, "fail_open", &ceiling(52));
    assert_eq!(statuses(&wider, "newcomer", 2, now).await, [200, 200]);
    let (status, body) = send(&wider, "latecomer", now).await;
    assert_eq!(status, 429);
    assert!(
        body.contains("domain-wide index requests per hour"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_see_each_others_counts() {
    let server = RedisServer::start();
    let (a, b) = (
        replica(&server, 3, "fail_open"),
        replica(&server, 3, "fail_open"),
    );
    let now = SystemTime::now();
    statuses(&a, "alice", 3, now).await;
    assert_eq!(statuses(&b, "alice", 1, now).await, [429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_fail_open_counts_locally() {
    let mut server = RedisServer::start();
    let plugin = replica(&server, 10, "fail_open");
    let now = SystemTime::now();
    assert_eq!(statuses(&plugin, "alice", 4, now).await, [200; 4]);
    server.stop();
    let after = statuses(&plugin, "alice", 7, now).await;
    assert_eq!(after, [200, 200, 200, 200, 200, 200, 429]);
    assert_eq!(plugin.redis_available(), Some(false));
}

/// Local counting during an outage starts from the counts Redis last reported, even when a
/// Redis that restarted empty reported lower counts than this process had seen before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_starts_from_last_redis_counts() {
    let mut server = RedisServer::start();
    let plugin = replica(&server, 10, "fail_open");
    let now = SystemTime::now();
    assert_eq!(statuses(&plugin, "alice", 8, now).await, [200; 8]);
    server.stop();
    // A request during the outage switches the plugin to local counting.
    send(&plugin, "bob", now).await;
    assert_eq!(plugin.redis_available(), Some(false));
    server.restart();
    wait_until_shared(std::slice::from_ref(&plugin)).await;
    assert_eq!(statuses(&plugin, "alice", 2, now).await, [200; 2]);
    server.stop();
    let during = statuses(&plugin, "alice", 9, now).await;
    assert_eq!(plugin.redis_available(), Some(false));
    assert_eq!(during, [200, 200, 200, 200, 200, 200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_fail_closed_rejects() {
    let mut server = RedisServer::start();
    let plugin = replica(&server, 10, "fail_closed");
    let now = SystemTime::now();
    assert_eq!(send(&plugin, "alice", now).await.0, 200);
    server.stop();
    let (status, body) = send(&plugin, "alice", now).await;
    assert_eq!(status, 429);
    assert!(body.contains("budget store is unavailable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn redis_restarted_shares_counts_again() {
    let mut server = RedisServer::start();
    let replicas = [
        replica(&server, 100, "fail_open"),
        replica(&server, 100, "fail_open"),
    ];
    let now = SystemTime::now();
    send(&replicas[0], "alice", now).await;
    server.stop();
    send(&replicas[0], "alice", now).await;
    send(&replicas[1], "alice", now).await;
    server.restart();
    wait_until_shared(&replicas).await;
    assert_eq!(passed_together(&replicas, "carol", 300).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_fail_closed_lets_requests_through() {
    let mut server = RedisServer::start();
    let plugin = replica(&server, 10, "fail_closed");
    send(&plugin, "alice", SystemTime::now()).await;
    server.stop();
    let (down, _) = send(&plugin, "alice", SystemTime::now()).await;
    server.restart();
    wait_until_shared(std::slice::from_ref(&plugin)).await;
    let (up, _) = send(&plugin, "alice", SystemTime::now()).await;
    assert_eq!((down, up), (429, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_counts_reach_other_replica() {
    let server = RedisServer::start();
    let late = "count_cache_hits = false";
    let a = replica_with(&server, 2, "fail_open", late);
    let b = replica_with(&server, 2, "fail_open", late);
    let now = SystemTime::now();
    send_miss(&a, "alice", now).await;
    send_miss(&a, "alice", now).await;
    // The origin counts go to Redis in the background, so poll the other replica.
    let deadline = Instant::now() + Duration::from_secs(5);
    while send(&b, "alice", now).await.0 == 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(&b, "alice", now).await.0, 429);
}

/// A check sent just before Redis pauses is counted by Redis once it resumes. The request gave
/// up long before and was turned away, so its count is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_count_taken_back() {
    let server = RedisServer::start();
    let text = format!(
        "index_per_hour = 3\ndownload_per_hour = 3\n\
         [redis]\nurl = \"{}\"\nkey_prefix = \"test\"\ntimeout_ms = 100\nfailure_mode = \"fail_closed\"",
        server.url()
    );
    let settings = toml::Value::Table(text.parse().expect("valid TOML"));
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    let plugin = QuotaPlugin::with_registry(settings, &ctx, &Registry::new())
        .unwrap_or_else(|errors| panic!("settings rejected: {errors:?}"));
    let now = SystemTime::now();
    assert_eq!(send(&plugin, "alice", now).await.0, 200);

    server.signal("-STOP");
    let (paused, _) = send(&plugin, "alice", now).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("-CONT");
    // The reply arrives, the count is taken back, and the backoff before the next probe passes.
    tokio::time::sleep(Duration::from_millis(700)).await;

    assert_eq!(paused, 429);
    assert_eq!(statuses(&plugin, "alice", 3, now).await, [200, 200, 429]);
}

/// How long the fault-injecting proxy holds back a chunk from the gateway to Redis.
#[derive(Debug, Default, Clone, Copy)]
struct Delays {
    /// A chunk with a call of the quota script (it names an operation such as `count`).
    check: Duration,
    /// A chunk with another script call: the one that takes counts back.
    refund: Duration,
}

/// The two directions of one connection through a test proxy.
struct Relay {
    from_client: tokio::net::tcp::OwnedReadHalf,
    to_client: tokio::net::tcp::OwnedWriteHalf,
    from_server: tokio::net::tcp::OwnedReadHalf,
    to_server: tokio::net::tcp::OwnedWriteHalf,
}

/// Starts a loopback proxy in front of `upstream` that connects to it for each client and
/// hands both connections to `relay`. Returns the proxy's port.
async fn start_proxy<F, Fut>(upstream: u16, relay: F) -> u16
where
    F: Fn(Relay) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let relay = Arc::new(relay);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let relay = Arc::clone(&relay);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                // Redis sets `TCP_NODELAY` on its sockets too. Without it, a reply written
                // while the previous one is not yet acknowledged waits for the client's
                // delayed acknowledgement, up to 40 ms on Linux.
                if client.set_nodelay(true).is_err() || server.set_nodelay(true).is_err() {
                    return;
                }
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                relay(Relay {
                    from_client,
                    to_client,
                    from_server,
                    to_server,
                })
                .await;
            });
        }
    });
    port
}

/// Starts a loopback proxy in front of `upstream` that holds back each chunk with a script call
/// by `delays`, counted from the chunk's arrival, as network latency would. A chunk never
/// overtakes an earlier one, and replies pass at once. Returns the proxy's port.
async fn start_delaying_proxy(upstream: u16, delays: Arc<parking_lot::Mutex<Delays>>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    start_proxy(upstream, move |relay| {
        let delays = Arc::clone(&delays);
        async move {
            let Relay {
                mut from_client,
                mut to_client,
                mut from_server,
                mut to_server,
            } = relay;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            });
            let (held, mut to_release) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some((release_at, chunk)) = to_release.recv().await {
                    tokio::time::sleep_until(release_at).await;
                    let chunk: Vec<u8> = chunk;
                    if to_server.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let mut buf = vec![0u8; 65536];
            while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                let chunk = &buf[..n];
                let has = |needle: &[u8]| chunk.windows(needle.len()).any(|w| w == needle);
                let mut delay = Duration::ZERO;
                if has(b"EVALSHA") {
                    let d = *delays.lock();
                    let check =
                        has(b"\r\ncount\r\n") || has(b"\r\npeek\r\n") || has(b"\r\nadd\r\n");
                    delay = if check { d.check } else { d.refund };
                }
                let release_at = tokio::time::Instant::now() + delay;
                if held.send((release_at, chunk.to_vec())).is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// A request that goes away while its check is on the way has its count taken back. Taking it
/// back must not hold up the checks queued meanwhile: they get their reply within their own
/// timeout, and Redis is not marked unavailable, even when the take-back call is slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_take_back_holds_up_no_check() {
    let server = RedisServer::start();
    let delays = Arc::new(parking_lot::Mutex::new(Delays::default()));
    let port = start_delaying_proxy(server.port, Arc::clone(&delays)).await;
    let text = format!(
        "index_per_hour = 100\ndownload_per_hour = 100\n\
         [redis]\nurl = \"redis://127.0.0.1:{port}/0\"\nkey_prefix = \"test\"\ntimeout_ms = 300\nfailure_mode = \"fail_open\""
    );
    let settings = toml::Value::Table(text.parse().expect("valid TOML"));
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    let plugin = Arc::new(
        QuotaPlugin::with_registry(settings, &ctx, &Registry::new())
            .unwrap_or_else(|errors| panic!("settings rejected: {errors:?}")),
    );
    let now = SystemTime::now();
    assert_eq!(send(&plugin, "warmup", now).await.0, 200);

    *delays.lock() = Delays {
        check: Duration::from_millis(100),
        refund: Duration::from_secs(5),
    };
    let for_carol = Arc::clone(&plugin);
    let cancelled = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_millis(50), send(&for_carol, "carol", now))
            .await
            .is_err()
    });
    tokio::time::sleep(Duration::from_millis(70)).await;
    let started = Instant::now();
    let (status, _) = send(&plugin, "bob", now).await;
    let waited = started.elapsed();
    assert!(
        cancelled.await.expect("task runs"),
        "carol's request went away"
    );
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_millis(300),
        "bob waited {waited:?}, longer than timeout_ms"
    );
    assert_eq!(plugin.redis_available(), Some(true));
}

/// Builds a replica whose Redis is at `url`, with `timeout_ms` and `mode`.
fn replica_at(url: &str, budget: u64, timeout_ms: u64, mode: &str) -> Arc<QuotaPlugin> {
    let text = format!(
        "index_per_hour = {budget}\ndownload_per_hour = {budget}\n\
         [redis]\nurl = \"{url}\"\nkey_prefix = \"test\"\ntimeout_ms = {timeout_ms}\n\
         failure_mode = \"{mode}\""
    );
    let settings = toml::Value::Table(text.parse().expect("valid TOML"));
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    match QuotaPlugin::with_registry(settings, &ctx, &Registry::new()) {
        Ok(plugin) => Arc::new(plugin),
        Err(errors) => panic!("settings rejected: {errors:?}"),
    }
}

/// Returns the index keys in Redis.
fn index_keys(admin: &mut redis::Connection) -> HashSet<String> {
    redis::cmd("KEYS")
        .arg("test:primary:index:*")
        .query(admin)
        .expect("KEYS")
}

/// Sends one request as `user`, which must be new, and returns the Redis key of its count:
/// the one principal key that the request added.
async fn key_of(plugin: &QuotaPlugin, admin: &mut redis::Connection, user: &str) -> String {
    let before = index_keys(admin);
    assert_eq!(send(plugin, user, SystemTime::now()).await.0, 200);
    let added: Vec<String> = index_keys(admin)
        .difference(&before)
        .filter(|key| !key.contains(":all:"))
        .cloned()
        .collect();
    match added.as_slice() {
        [key] => key.clone(),
        other => panic!("expected one new key for {user}, found {other:?}"),
    }
}

/// Returns Redis's count of `user`, read through `reader`, a replica that only peeks
/// (`count_cache_hits = false`) with a budget of [`READER_BUDGET`]. `None` while `reader`
/// cannot reach Redis.
async fn redis_count(reader: &QuotaPlugin, user: &str) -> Option<u64> {
    let (_, state) = check(reader, user, SystemTime::now()).await;
    let remaining = state.rate_limit.map(|budget| budget.remaining);
    match reader.redis_available() {
        Some(true) => remaining.map(|left| READER_BUDGET - left),
        _ => None,
    }
}

/// The budget of the replicas that [`redis_count`] reads through; above every count read.
const READER_BUDGET: u64 = 1000;

/// Returns a replica for [`redis_count`] to read through.
fn count_reader(server: &RedisServer) -> Arc<QuotaPlugin> {
    replica_with(
        server,
        READER_BUDGET,
        "fail_open",
        "count_cache_hits = false",
    )
}

/// Polls Redis's count of `user` through `reader` until it is `expected`, for up to 5 s;
/// returns the last count read.
async fn wait_for_count(reader: &QuotaPlugin, user: &str, expected: u64) -> Option<u64> {
    poll_until(Some(expected), async || redis_count(reader, user).await).await
}

/// Calls `read` every 20 ms until it returns `expected`, for up to 5 s; returns the last
/// value read.
async fn poll_until<T: PartialEq>(expected: T, mut read: impl AsyncFnMut() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = read().await;
        if value == expected || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A principal key whose value is not an integer turns that principal's requests away
/// (`fail_closed`), alone: other principals keep counting in Redis, Redis stays available,
/// and the key is left as it was. The same holds for a count that an increment would
/// overflow, a negative count and a key of another type.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_key_fails_only_its_principal() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let plugin = replica(&server, 100, "fail_closed");
    let other = replica(&server, 100, "fail_closed");
    let now = SystemTime::now();

    let alice = key_of(&plugin, &mut admin, "alice").await;
    redis::cmd("SET")
        .arg(&alice)
        .arg("abc")
        .query::<()>(&mut admin)
        .expect("SET");
    let (status, body) = send(&plugin, "alice", now).await;
    assert_eq!(status, 429);
    assert!(body.contains("budget_store_unavailable"), "{body}");
    assert_eq!(plugin.redis_available(), Some(true));
    assert_eq!(statuses(&plugin, "bob", 3, now).await, [200; 3]);
    assert_eq!(plugin.redis_available(), Some(true));
    // Bob's requests are in Redis: the other replica counts on from them.
    let (_, state) = check(&other, "bob", now).await;
    assert_eq!(state.rate_limit.map(|b| b.remaining), Some(96));

    // Checks of both principals in the same calls.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let plugin = Arc::clone(&plugin);
            let user = if i % 2 == 0 { "alice" } else { "bob" };
            tokio::spawn(async move { (user, send(&plugin, user, now).await.0) })
        })
        .collect();
    for task in tasks {
        let (user, status) = task.await.expect("task runs");
        let expected = if user == "alice" { 429 } else { 200 };
        assert_eq!(status, expected, "{user}");
    }
    assert_eq!(plugin.redis_available(), Some(true));
    let value: String = redis::cmd("GET")
        .arg(&alice)
        .query(&mut admin)
        .expect("GET");
    assert_eq!(value, "abc");

    // Other values that the script cannot count with. Each is left as it was.
    let cases: [(&str, &str, &str); 3] = [
        ("carol", "SET", "9223372036854775807"),
        ("dave", "SET", "-3"),
        ("erin", "RPUSH", "1"),
    ];
    for (user, command, value) in cases {
        let key = key_of(&plugin, &mut admin, user).await;
        redis::cmd("DEL")
            .arg(&key)
            .query::<()>(&mut admin)
            .expect("DEL");
        redis::cmd(command)
            .arg(&key)
            .arg(value)
            .query::<()>(&mut admin)
            .expect("set the key");
        assert_eq!(send(&plugin, user, now).await.0, 429, "{user}");
        assert_eq!(plugin.redis_available(), Some(true), "{user}");
        assert_eq!(send(&plugin, "bob", now).await.0, 200, "bob after {user}");
        if command == "SET" {
            let stored: String = redis::cmd("GET").arg(&key).query(&mut admin).expect("GET");
            assert_eq!(stored, value, "{user}'s key changed");
        } else {
            let stored: Vec<String> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut admin)
                .expect("LRANGE");
            assert_eq!(stored, [value], "{user}'s key changed");
        }
    }
}

/// With `fail_open`, the requests of a principal whose key is not an integer are counted in
/// this process, while other principals count in Redis. Once the key is deleted, the local
/// counts are added to Redis, so the other replicas see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_key_fail_open_counts_locally() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let plugin = replica(&server, 3, "fail_open");
    let reader = count_reader(&server);
    let now = SystemTime::now();

    let alice = key_of(&plugin, &mut admin, "alice").await;
    redis::cmd("SET")
        .arg(&alice)
        .arg("abc")
        .query::<()>(&mut admin)
        .expect("SET");
    assert_eq!(statuses(&plugin, "alice", 3, now).await, [200, 200, 429]);
    assert_eq!(plugin.local_count(Class::Index, "user:alice", now), 3);
    assert_eq!(statuses(&plugin, "bob", 2, now).await, [200, 200]);
    assert_eq!(plugin.redis_available(), Some(true));
    assert_eq!(redis_count(&reader, "bob").await, Some(2));

    redis::cmd("DEL")
        .arg(&alice)
        .query::<()>(&mut admin)
        .expect("DEL");
    // A reply to any check of the class starts adding the two local counts to Redis; a
    // failed try is repeated a second later.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut shared = None;
    for i in 0.. {
        send(&plugin, &format!("trigger{i}"), now).await;
        shared = redis_count(&reader, "alice").await;
        if shared == Some(2) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shared, Some(2));
}

/// Replies that take 70 % of `timeout_ms` keep every request in Redis, also with 30 clients
/// on two replicas at once. A check that queues while a call is on the way goes out in a call
/// of its own after an eighth of the timeout, instead of waiting for that call's reply. The timeout is 200 ms, not the default
/// 50 ms. The 60 ms left over then absorb scheduling delays on a busy test machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn slow_replies_within_timeout_keep_redis() {
    let server = RedisServer::start();
    let delays = Arc::new(parking_lot::Mutex::new(Delays::default()));
    let port = start_delaying_proxy(server.port, Arc::clone(&delays)).await;
    let url = format!("redis://127.0.0.1:{port}/0");
    let replicas = [
        replica_at(&url, 1_000_000, 200, "fail_closed"),
        replica_at(&url, 1_000_000, 200, "fail_closed"),
    ];
    // The first call loads the script, which takes a second round trip.
    for plugin in &replicas {
        assert_eq!(send(plugin, "warmup", SystemTime::now()).await.0, 200);
    }
    *delays.lock() = Delays {
        check: Duration::from_millis(140),
        refund: Duration::ZERO,
    };

    let stop_at = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let plugin = Arc::clone(&replicas[i % 2]);
            tokio::spawn(async move {
                let user = format!("client{i}");
                let mut statuses = Vec::new();
                while statuses.len() < 15 && Instant::now() < stop_at {
                    statuses.push(send(&plugin, &user, SystemTime::now()).await.0);
                }
                statuses
            })
        })
        .collect();
    let mut sent = 0;
    let mut rejected = 0;
    for client in clients {
        let statuses = client.await.expect("client runs");
        sent += statuses.len();
        rejected += statuses.iter().filter(|&&status| status != 200).count();
    }
    assert!(sent >= 30, "only {sent} requests sent");
    assert_eq!(rejected, 0, "{rejected} of {sent} requests fell back");
    for plugin in &replicas {
        assert_eq!(plugin.redis_available(), Some(true));
    }
}

/// A Redis that stops and comes back several times within an hour lets one replica pass at
/// most one budget for a principal in total (`fail_open`). Requests counted locally during
/// each outage reach Redis once it is back, so another replica counts on from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flapping_redis_keeps_one_budget() {
    let budget = 12;
    let mut server = RedisServer::start_persistent();
    let a = replica(&server, budget, "fail_open");
    let b = replica(&server, budget, "fail_open");
    let reader = count_reader(&server);
    let now = SystemTime::now();
    let passed = |statuses: Vec<u16>| statuses.iter().filter(|&&s| s == 200).count() as u64;

    let mut total = 0;
    for round in 0..4 {
        total += passed(statuses(&a, "alice", 2, now).await);
        server.stop();
        total += passed(statuses(&a, "alice", 4, now).await);
        assert_eq!(a.redis_available(), Some(false), "round {round}");
        server.restart();
        wait_until_shared(std::slice::from_ref(&a)).await;
        let shared = wait_for_count(&reader, "alice", total).await;
        assert_eq!(shared, Some(total), "round {round}: Redis's count of alice");
    }
    assert_eq!(total, budget);
    assert_eq!(statuses(&b, "alice", 1, now).await, [429]);
}

/// Requests counted alone during an outage count as soon as Redis is back, before the
/// background task has added them to Redis. A principal that used its budget alone stays
/// rejected, and Redis ends with exactly the budget, because the rejected request that Redis
/// counted is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_counts_hold_after_recovery() {
    let budget = 5;
    let mut server = RedisServer::start();
    let plugin = replica(&server, budget, "fail_open");
    let reader = count_reader(&server);
    let now = SystemTime::now();
    server.stop();
    let during = statuses(&plugin, "alice", 6, now).await;
    assert_eq!(during, [200, 200, 200, 200, 200, 429]);
    assert_eq!(plugin.redis_available(), Some(false));
    server.restart();
    // The first request after the backoff goes to Redis, which has no count of alice yet.
    let deadline = Instant::now() + Duration::from_secs(15);
    while plugin.redis_available() != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the replica did not go back to Redis"
        );
        assert_eq!(send(&plugin, "alice", now).await.0, 429);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(statuses(&plugin, "alice", 3, now).await, [429; 3]);
    assert_eq!(wait_for_count(&reader, "alice", budget).await, Some(budget));
}

/// Builds a plugin from settings `text` with the counts of `registry`, as a config reload
/// builds it again in the same process.
fn plugin_in(registry: &Registry, text: &str) -> Arc<QuotaPlugin> {
    let settings = toml::Value::Table(text.parse().expect("valid TOML"));
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    match QuotaPlugin::with_registry(settings, &ctx, registry) {
        Ok(plugin) => Arc::new(plugin),
        Err(errors) => panic!("settings rejected: {errors:?}"),
    }
}

/// A reload that adds a `redis` table keeps the counts made without it: they count on top
/// of Redis's replies at once, and are added to Redis, so that the other replicas see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_adding_redis_keeps_local_counts() {
    let server = RedisServer::start();
    let registry = Registry::new();
    let now = SystemTime::now();
    let budget = "index_per_hour = 5\ndownload_per_hour = 5";
    let local = plugin_in(&registry, budget);
    assert_eq!(statuses(&local, "alice", 5, now).await, [200; 5]);

    let with_redis = format!(
        "{budget}\n[redis]\nurl = \"{}\"\nkey_prefix = \"test\"\ntimeout_ms = 2000\n\
         failure_mode = \"fail_open\"",
        server.url()
    );
    let reloaded = plugin_in(&registry, &with_redis);
    drop(local);
    assert_eq!(statuses(&reloaded, "alice", 2, now).await, [429, 429]);

    // The five counts reach Redis; the rejected requests that Redis counted are taken back.
    let reader = count_reader(&server);
    assert_eq!(wait_for_count(&reader, "alice", 5).await, Some(5));
    let other = replica(&server, 5, "fail_open");
    assert_eq!(statuses(&other, "alice", 1, now).await, [429]);
}

/// Starts a loopback proxy in front of `upstream` that holds back Redis's reply to each call
/// that adds counts (the operation `add`) by `hold`, while Redis has already run it. Other
/// traffic passes at once. Returns the proxy's port.
async fn start_add_reply_holding_proxy(upstream: u16, hold: Duration) -> u16 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    start_proxy(upstream, move |relay| async move {
        let Relay {
            mut from_client,
            mut to_client,
            mut from_server,
            mut to_server,
        } = relay;
        // Calls with an `add` whose reply has not come yet. The connection carries one call
        // at a time, so the next reply is theirs.
        let adds = Arc::new(AtomicUsize::new(0));
        let adds_in_replies = Arc::clone(&adds);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                let pending = adds_in_replies.load(Ordering::SeqCst);
                if pending > 0 {
                    adds_in_replies.store(pending - 1, Ordering::SeqCst);
                    // An error (`-NOSCRIPT`) is followed by the call again.
                    if buf[0] != b'-' {
                        tokio::time::sleep(hold).await;
                    }
                }
                if to_client.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 65536];
        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
            let chunk = &buf[..n];
            let has = |needle: &[u8]| chunk.windows(needle.len()).any(|w| w == needle);
            if has(b"EVALSHA") && has(b"\r\nadd\r\n") {
                adds.fetch_add(1, Ordering::SeqCst);
            }
            if to_server.write_all(chunk).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Counts made during an outage go to Redis with an `INCRBY` once it is back. A reply to a
/// check that Redis ran after that `INCRBY` may arrive before the `INCRBY`'s own reply. It
/// already includes the counts, and they are not added a second time, so no request is
/// rejected while the principal has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_counts_on_the_way_count_once() {
    let hold = Duration::from_millis(1500);
    let mut server = RedisServer::start_persistent();
    let port = start_add_reply_holding_proxy(server.port, hold).await;
    let plugin = replica_at(
        &format!("redis://127.0.0.1:{port}/0"),
        10,
        3000,
        "fail_open",
    );
    let reader = count_reader(&server);
    let now = SystemTime::now();
    assert_eq!(statuses(&plugin, "alice", 3, now).await, [200; 3]);
    server.stop();
    assert_eq!(statuses(&plugin, "alice", 4, now).await, [200; 4]);
    assert_eq!(plugin.redis_available(), Some(false));
    server.restart();
    // After the first backoff (250 ms) one request tries Redis again. Its reply ends the
    // outage and starts sending alice's 4 counts; Redis runs the INCRBY (7) at once, and its
    // reply is held back. A request before the backoff would be counted here and sent too,
    // in a call of its own whose reply is held as well.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&plugin, "probe", now).await.0, 200);
    assert_eq!(plugin.redis_available(), Some(true));
    let sent = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(redis_count(&reader, "alice").await, Some(7));

    let during = statuses(&plugin, "alice", 4, now).await;
    assert!(
        sent.elapsed() < hold,
        "the checks took {:?}, longer than the INCRBY's reply was held",
        sent.elapsed()
    );
    assert_eq!(during, [200, 200, 200, 429]);
    tokio::time::sleep(hold).await;
    assert_eq!(wait_for_count(&reader, "alice", 10).await, Some(10));
    assert_eq!(statuses(&plugin, "alice", 1, now).await, [429]);
}

/// Returns how many script calls Redis has run since it started.
fn script_calls(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(admin)
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a number of calls"))
}

/// Reads the count in `key`; 0 when the key is missing.
fn count_in(admin: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("GET")
        .arg(key)
        .query::<Option<u64>>(admin)
        .expect("GET")
        .unwrap_or(0)
}

/// Polls the count in `key` until it is `expected`, for up to 5 s; returns the last count read.
async fn settled_count(admin: &mut redis::Connection, key: &str, expected: u64) -> u64 {
    poll_until(expected, async || count_in(admin, key)).await
}

/// With room in the budget, the first request of a principal counts the reserve in Redis
/// too, and the next requests up to the reserve pass without a script call, reporting the
/// counts they would get one by one. Once the reserve is used up, a request calls Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_lets_requests_through_without_calls() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let plugin = replica_reserving(&server, 100_000, 8);
    let key = key_of(&plugin, &mut admin, "alice").await;
    assert_eq!(
        count_in(&mut admin, &key),
        9,
        "the request and a reserve of 8"
    );
    let calls = script_calls(&mut admin);
    let now = SystemTime::now();
    for n in 2..=9 {
        let (verdict, state) = check(&plugin, "alice", now).await;
        assert!(matches!(verdict, Verdict::Continue));
        let budget = state
            .rate_limit
            .expect("a counted request reports its budget");
        assert_eq!(budget.remaining, 100_000 - n, "request {n}");
    }
    assert_eq!(script_calls(&mut admin), calls, "the reserve made no calls");
    assert_eq!(count_in(&mut admin, &key), 9);
    assert_eq!(send(&plugin, "alice", now).await.0, 200);
    assert_eq!(script_calls(&mut admin), calls + 1);
    assert_eq!(
        count_in(&mut admin, &key),
        18,
        "10 requests and a fresh reserve of 8"
    );
    assert_eq!(plugin.local_count(Class::Index, "user:alice", now), 10);
}

/// A reserve that no request uses for a while goes back to Redis, so that Redis counts the
/// requests that went through and no more. A plugin that is dropped (a reload) gives its
/// reserves back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reserve_goes_back_to_redis() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let plugin = replica_reserving(&server, 100_000, 8);
    let key = key_of(&plugin, &mut admin, "alice").await;
    assert_eq!(count_in(&mut admin, &key), 9);
    for _ in 0..2 {
        assert_eq!(send(&plugin, "alice", SystemTime::now()).await.0, 200);
    }
    assert_eq!(
        settled_count(&mut admin, &key, 3).await,
        3,
        "the idle reserve of 6 went back"
    );

    let dropped = replica_reserving(&server, 100_000, 8);
    let key = key_of(&dropped, &mut admin, "bob").await;
    assert_eq!(count_in(&mut admin, &key), 9);
    drop(dropped);
    // The dropped plugin's idle sweeps stop with it, so only the drop gives the reserve back.
    assert_eq!(
        settled_count(&mut admin, &key, 1).await,
        1,
        "the dropped plugin's reserve went back"
    );
}

/// Reserves never let two replicas through more than their budget together, and hold back
/// no request for long. With a budget of 600 and a reserve of 2, reserves stop once fewer
/// than 130 requests beyond a call's own are left. A burst of 900 requests at once may end with some of
/// the last reserves unused on one replica while the other turned requests away. Those go
/// back to Redis within a second and later requests use them, so exactly 600 pass in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn replicas_with_reserves_share_budget_exactly() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let replicas = [
        replica_reserving(&server, 600, 2),
        replica_reserving(&server, 600, 2),
    ];
    let burst = passed_together(&replicas, "alice", 900).await;
    assert!(burst <= 600, "{burst} of 900 passed a budget of 600");
    let key = index_keys(&mut admin)
        .into_iter()
        .find(|key| !key.contains(":all:"))
        .expect("a principal key");
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_in(&mut admin, &key) != burst as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count_in(&mut admin, &key),
        burst as u64,
        "unused reserves went back"
    );
    let mut later = 0;
    for i in 0..(600 - burst + 20) {
        let plugin = &replicas[i % 2];
        later += usize::from(send(plugin, "alice", SystemTime::now()).await.0 == 200);
    }
    assert_eq!(burst + later, 600, "{burst} in the burst, {later} after it");
    assert_eq!(count_in(&mut admin, &key), 600);
}

/// A principal has one reserve at a time. Of 50 requests at once, the first call requests a
/// reserve and the calls on the way meanwhile do not, so Redis counts the 50 and one reserve
/// of 8 at most. The unused part goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_reserve_per_principal_at_a_time() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let plugin = replica_reserving(&server, 100_000, 8);
    assert_eq!(
        passed_together(&[Arc::clone(&plugin)], "alice", 50).await,
        50
    );
    let key = index_keys(&mut admin)
        .into_iter()
        .find(|key| !key.contains(":all:"))
        .expect("a principal key");
    let counted = count_in(&mut admin, &key);
    assert!((50..=58).contains(&counted), "Redis counts {counted}");
    assert_eq!(settled_count(&mut admin, &key, 50).await, 50);
}

/// A reserve survives a Redis outage: the sweep that cannot give it back keeps it, and gives
/// it back once Redis responds again, instead of leaving it counted for the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_survives_redis_outage() {
    let mut server = RedisServer::start_persistent();
    let mut admin = server.admin();
    let plugin = replica_reserving(&server, 100_000, 8);
    let key = key_of(&plugin, &mut admin, "alice").await;
    assert_eq!(count_in(&mut admin, &key), 9);
    server.stop();
    // Two sweeps at least fail while Redis is away.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let mut admin = server.admin();
    assert_eq!(count_in(&mut admin, &key), 9, "the restart kept the count");
    assert_eq!(
        settled_count(&mut admin, &key, 1).await,
        1,
        "the reserve went back"
    );
}

/// A Redis that restarted since the last call closed the store's connection. The next call
/// goes over a new connection at once instead of failing, so a `fail_closed` plugin turns
/// no request away once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_after_redis_restart_reconnects() {
    let mut server = RedisServer::start();
    let plugin = replica(&server, 10, "fail_closed");
    assert_eq!(send(&plugin, "alice", SystemTime::now()).await.0, 200);
    server.stop();
    server.restart();
    assert_eq!(send(&plugin, "alice", SystemTime::now()).await.0, 200);
    assert_eq!(plugin.redis_available(), Some(true));
}

/// A call that asked for a reserve and whose reply came after the deadline (Redis paused)
/// takes its reserve back with the request's count: Redis counts nothing for a request that
/// was turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reply_takes_reserve_back() {
    let server = RedisServer::start();
    let mut admin = server.admin();
    let text = format!(
        "index_per_hour = 100000\ndownload_per_hour = 100000\n[redis]\nurl = \"{}\"\n\
         key_prefix = \"test\"\ntimeout_ms = 100\nfailure_mode = \"fail_closed\"\nreserve = 8",
        server.url()
    );
    let plugin = plugin_in(&Registry::new(), &text);
    // Connects the store, as a pause would stall the connection's set-up instead of the call.
    let connected = key_of(&plugin, &mut admin, "bob").await;
    server.signal("-STOP");
    let (paused, _) = send(&plugin, "alice", SystemTime::now()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("-CONT");
    assert_eq!(paused, 429);
    // Redis runs the call once it resumes, and the take-back after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let key = loop {
        let principal = index_keys(&mut admin)
            .into_iter()
            .find(|key| !key.contains(":all:") && *key != connected);
        match principal {
            Some(key) => break key,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None => panic!("Redis did not run the paused call"),
        }
    };
    assert_eq!(settled_count(&mut admin, &key, 0).await, 0);
}
