//! End-to-end: the disk tier behind the memory tier, across restarts, crashes and corruption.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{client, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use mirror_proxy::cache::{DiskSnapshot, PurgeScope};
use mirror_proxy::reload::ReloadOutcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY_LEN: usize = 256 * 1024;

/// A lock that every test of this file holds for reading, and [`large_fill_streams_from_disk`]
/// for writing so that it runs alone. That test bounds the growth of the whole process's
/// resident memory, which the other tests' origins, clients and gateways raised by more than
/// 100 MiB when they ran beside it.
static MEMORY_TURN: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn body() -> String {
    (0..BODY_LEN)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// A config with a disk tier in `dir/disk`, a memory tier that keeps objects up to 64 KiB (so
/// the 256 KiB body lives on disk only) and one HTTP origin.
fn config(dir: &Path, origin: std::net::SocketAddr, listen: &str) -> String {
    let base = BASE_CONFIG
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"{listen}\"]"),
        )
        .replace(
            "max_object_bytes = \"32MiB\"",
            "max_object_bytes = \"64KiB\"",
        );
    format!(
        r#"{base}
disk_dir = "{}"
disk_bytes = "256MiB"
disk_max_object_bytes = "128MiB"

[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
"#,
        dir.join("disk").display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_entry_survives_restart() {
    let _beside = MEMORY_TURN.read().await;
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin.addr, "127.0.0.1:0");

    let first = TestGateway::start(dir.path(), &text);
    let response = client()
        .get(first.url("/bundle.json"))
        .send()
        .await
        .expect("fill");
    assert_eq!(response.headers()["x-cache-status"], "MISS");
    assert_eq!(response.text().await.expect("body"), payload);
    let hit = client()
        .get(first.url("/bundle.json"))
        .send()
        .await
        .expect("hit");
    assert_eq!(hit.headers()["x-cache-status"], "HIT");
    assert_eq!(
        first.running.memory_stats().entries,
        0,
        "too large for memory"
    );
    first.running.shutdown();

    let second = TestGateway::start(dir.path(), &text);
    let after = client()
        .get(second.url("/bundle.json"))
        .send()
        .await
        .expect("after restart");
    assert_eq!(after.headers()["x-cache-status"], "HIT");
    assert_eq!(after.text().await.expect("body"), payload);
    assert_eq!(origin.count(), 1);
}

/// Deleting the whole disk directory while the gateway runs (to empty the cache) does not turn
/// the disk tier off: the next fill creates the directories again and is stored.
#[tokio::test(flavor = "multi_thread")]
async fn disk_dir_deleted_while_running() {
    let _beside = MEMORY_TURN.read().await;
    let (payload, origin, dir, gateway) = start_body_gateway().await;
    let disk = dir.path().join("disk");

    assert_eq!(
        get_with_status(gateway.url("/a.json"), "MISS").await,
        payload
    );
    // The entry is published once the whole body has arrived, which can be just after the
    // client has all of it.
    wait_for_entries(&disk, 1).await;
    std::fs::remove_dir_all(&disk).expect("delete the disk directory");

    assert_eq!(
        get_with_status(gateway.url("/b.json"), "MISS").await,
        payload
    );
    assert_eq!(
        get_with_status(gateway.url("/b.json"), "HIT").await,
        payload
    );
    assert_eq!(entry_files(&disk).len(), 1, "b stored on disk again");
    assert_eq!(origin.count(), 2);
}

/// After the disk directory was deleted while the gateway ran and a fill created it again, the
/// gateway starts on that directory again and serves the new entry from it.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_disk_dir_survives_restart() {
    let _beside = MEMORY_TURN.read().await;
    let (payload, origin, dir, gateway) = start_body_gateway().await;
    let disk = dir.path().join("disk");

    assert_eq!(
        get_with_status(gateway.url("/a.json"), "MISS").await,
        payload
    );
    std::fs::remove_dir_all(&disk).expect("delete the disk directory");
    assert_eq!(
        get_with_status(gateway.url("/b.json"), "MISS").await,
        payload
    );
    wait_for_entries(&disk, 1).await;
    gateway.running.shutdown();

    // Panics with the start error when the gateway rejects the recreated directory.
    let text = config(dir.path(), origin.addr, "127.0.0.1:0");
    let restarted = TestGateway::start(dir.path(), &text);
    assert_eq!(
        get_with_status(restarted.url("/b.json"), "HIT").await,
        payload
    );
    assert_eq!(origin.count(), 2);
}

/// A purge that arrives while a fill of an object for the disk tier alone still waits for the
/// origin's response header also removes what that fill stores when it ends.
#[tokio::test(flavor = "multi_thread")]
async fn purge_before_header_disk_only() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _beside = MEMORY_TURN.read().await;
    // Version 1 comes 1.5 s after the request, version 2 at once; both are too large for the
    // memory tier.
    let version = std::sync::Arc::new(AtomicUsize::new(1));
    let current = std::sync::Arc::clone(&version);
    let origin = TestOrigin::start(move |_| {
        let v = current.load(Ordering::SeqCst);
        let digit = char::from_digit(v as u32, 10).expect("a digit");
        let mut reply = Reply::ok(&digit.to_string().repeat(BODY_LEN));
        reply.headers = vec![("cache-control".into(), "max-age=3600".into())];
        if v == 1 {
            reply.delay = Duration::from_millis(1500);
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start_with_admin(dir.path(), origin.addr);

    let url = gateway.url("/o/hp");
    let filler = tokio::spawn(async move {
        let response = client().get(url).send().await.expect("fill");
        let cache = response.headers()["x-cache-status"].clone();
        (cache, response.text().await.expect("fill body"))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = admin_post(admin, "/cache/purge?domain=primary&path=/o/hp").await;
    assert_eq!(status, 200, "{body}");
    version.store(2, Ordering::SeqCst);
    let (cache, filled) = filler.await.expect("filler");
    assert_eq!(cache, "MISS");
    assert_eq!(filled, "1".repeat(BODY_LEN), "the filling client's body");

    let after = client()
        .get(gateway.url("/o/hp"))
        .send()
        .await
        .expect("after the purge");
    assert_eq!(
        after.headers()["x-cache-status"],
        "MISS",
        "the purged response stayed cached"
    );
    assert_eq!(after.text().await.expect("body"), "2".repeat(BODY_LEN));
    assert_eq!(origin.count(), 2);
}

/// User and password of the admin listener that [`start_with_admin`] configures.
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pass";

/// Starts a gateway with the disk tier of [`config`] and an admin listener with one user;
/// returns it with the admin address.
fn start_with_admin(
    dir: &Path,
    origin: std::net::SocketAddr,
) -> (TestGateway, std::net::SocketAddr) {
    let line = common::htpasswd_line(&["-B", "-C", "5"], ADMIN_USER, ADMIN_PASSWORD);
    std::fs::write(dir.join("admin.htpasswd"), line + "\n").expect("write htpasswd");
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"admin.htpasswd\"\n";
    let text = config(dir, origin, "127.0.0.1:0") + admin;
    let gateway = TestGateway::start(dir, &text);
    let addr = gateway.running.admin_addr().expect("admin listener");
    (gateway, addr)
}

/// Sends POST `target` to the admin listener with valid credentials; returns status and body.
async fn admin_post(admin: std::net::SocketAddr, target: &str) -> (u16, String) {
    let response = client()
        .post(format!("http://{admin}{target}"))
        .header("authorization", common::basic(ADMIN_USER, ADMIN_PASSWORD))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin {target}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("admin body"))
}

/// Waits up to 5 s until `disk` contains `count` entry files.
async fn wait_for_entries(disk: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while entry_files(disk).len() != count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        entry_files(disk).len(),
        count,
        "entry files in {}",
        disk.display()
    );
}

/// Checks that entries found on disk at start count for readiness: after a restart with the
/// memory tier empty and the origin stopped, the domain is servable from disk.
#[tokio::test(flavor = "multi_thread")]
async fn disk_entries_keep_ready_after_restart() {
    let _beside = MEMORY_TURN.read().await;
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let origin_addr = origin.addr;
    let dir = tempfile::tempdir().expect("tempdir");
    let line = common::htpasswd_line(&["-B", "-C", "5"], "admin", "admin-pass");
    std::fs::write(dir.path().join("admin.htpasswd"), line + "\n").expect("write htpasswd");
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"admin.htpasswd\"\n";
    let text = config(dir.path(), origin_addr, "127.0.0.1:0") + admin;

    let first = TestGateway::start(dir.path(), &text);
    let fill = client()
        .get(first.url("/bundle.json"))
        .send()
        .await
        .expect("fill");
    assert_eq!(fill.headers()["x-cache-status"], "MISS");
    assert_eq!(fill.text().await.expect("body"), payload);
    first.running.shutdown();
    drop(origin);
    common::wait_until_closed(origin_addr).await;

    let second = TestGateway::start(dir.path(), &text);
    assert_eq!(second.running.memory_stats().entries, 0);
    let disk = second.running.disk_stats().expect("disk tier");
    assert_eq!(disk.entries, 1);
    let admin = second.running.admin_addr().expect("admin listener");
    let (status, body) = common::readyz(admin).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn small_disk_hit_promoted_to_memory() {
    let _beside = MEMORY_TURN.read().await;
    let origin = TestOrigin::start(|_| Reply::ok("{\"small\":true}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin.addr, "127.0.0.1:0");
    let first = TestGateway::start(dir.path(), &text);
    let filled = client()
        .get(first.url("/index.json"))
        .send()
        .await
        .expect("fill");
    // The fill finishes when the body has been streamed.
    filled.bytes().await.expect("fill body");
    first.running.shutdown();

    let second = TestGateway::start(dir.path(), &text);
    assert_eq!(second.running.memory_stats().entries, 0);
    let from_disk = client()
        .get(second.url("/index.json"))
        .send()
        .await
        .expect("disk hit");
    assert_eq!(from_disk.headers()["x-cache-status"], "HIT");
    assert_eq!(from_disk.text().await.expect("body"), "{\"small\":true}");
    // The copy into memory happens when the gateway reads the end of the body, which can be
    // just after the client has all of it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while second.running.memory_stats().entries == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(second.running.memory_stats().entries, 1, "promoted");
    let from_memory = client()
        .get(second.url("/index.json"))
        .send()
        .await
        .expect("memory hit");
    assert_eq!(from_memory.headers()["x-cache-status"], "HIT");
    assert_eq!(second.running.memory_stats().hits, 1);
}

/// A purge made while a disk hit streams its body keeps that hit's copy out of memory, so the
/// next request goes to the origin. The client stops reading after the header, which pauses the
/// gateway's disk read mid-body (the body is larger than the sockets' buffers).
#[tokio::test(flavor = "multi_thread")]
async fn purge_during_disk_hit_not_promoted() {
    let _beside = MEMORY_TURN.read().await;
    const BIG: usize = 16 << 20;
    let payload: String = (0..BIG)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A memory tier that keeps the body, so that a disk hit copies it there.
    let text = config(dir.path(), origin.addr, "127.0.0.1:0").replace(
        "max_object_bytes = \"64KiB\"",
        "max_object_bytes = \"32MiB\"",
    );
    let first = TestGateway::start(dir.path(), &text);
    let filled = client()
        .get(first.url("/big.bin"))
        .send()
        .await
        .expect("fill");
    assert_eq!(filled.bytes().await.expect("fill body").len(), BIG);
    first.running.shutdown();

    let second = TestGateway::start(dir.path(), &text);
    let mut stream = TcpStream::connect(second.addr).await.expect("connect");
    let request = "GET /big.bin HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut first_bytes = vec![0u8; 4096];
    let read = stream.read(&mut first_bytes).await.expect("first bytes");
    let head = String::from_utf8_lossy(&first_bytes[..read]).to_lowercase();
    assert!(head.contains("x-cache-status: hit"), "{head}");

    let scope = PurgeScope::Url {
        domain: "primary".into(),
        path: "/big.bin".into(),
        query: None,
    };
    assert_eq!(second.running.purge(&scope), 1, "the disk entry");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .expect("rest of the body");
    assert!(
        read + rest.len() > BIG,
        "{} bytes in all",
        read + rest.len()
    );

    // A copy into memory would be made when the gateway reads the end of the body, before it
    // closes the connection. The pause is a margin.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        second.running.memory_stats().entries,
        0,
        "copy kept in memory"
    );
    let again = client()
        .get(second.url("/big.bin"))
        .send()
        .await
        .expect("again");
    assert_eq!(again.headers()["x-cache-status"], "MISS");
    assert_eq!(again.bytes().await.expect("body").len(), BIG);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_hit_serves_range() {
    let _beside = MEMORY_TURN.read().await;
    let (payload, _origin, _dir, gateway) = start_body_gateway().await;
    let filled = client()
        .get(gateway.url("/bundle.json"))
        .send()
        .await
        .expect("fill");
    // The fill finishes when the body has been streamed.
    filled.bytes().await.expect("fill body");
    let ranged = client()
        .get(gateway.url("/bundle.json"))
        .header("range", "bytes=1000-1099")
        .send()
        .await
        .expect("range");
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.headers()["x-cache-status"], "HIT");
    assert_eq!(ranged.text().await.expect("body"), &payload[1000..1100]);

    // The stored response has no ETag, so no entity tag in If-Match can match it.
    let failed = client()
        .get(gateway.url("/bundle.json"))
        .header("if-match", "\"v1\"")
        .send()
        .await
        .expect("If-Match");
    assert_eq!(failed.status(), 412);
    assert_eq!(failed.headers()["x-cache-status"], "HIT");
    assert_eq!(failed.bytes().await.expect("body").len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_disk_entry_never_served_whole() {
    let _beside = MEMORY_TURN.read().await;
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin.addr, "127.0.0.1:0");
    store_then_damage(dir.path(), &text, "/bundle.json").await;

    let second = TestGateway::start(dir.path(), &text);
    let corrupt = client().get(second.url("/bundle.json")).send().await;
    let whole = match corrupt {
        Ok(response) => response.text().await.map(|t| t == payload).unwrap_or(false),
        Err(_) => false,
    };
    assert!(!whole, "a corrupt entry was served as a whole body");
    let fresh = client()
        .get(second.url("/bundle.json"))
        .send()
        .await
        .expect("refetch");
    assert_eq!(fresh.headers()["x-cache-status"], "MISS");
    assert_eq!(fresh.text().await.expect("body"), payload);
    assert_eq!(origin.count(), 2);
}

/// Runs a gateway with config `text` in `dir` until it has stored `path` on disk, stops it,
/// and flips a byte near the end of the largest entry file, inside the stored body.
async fn store_then_damage(dir: &Path, text: &str, path: &str) {
    let gateway = TestGateway::start(dir, text);
    let filled = client().get(gateway.url(path)).send().await.expect("fill");
    // The fill finishes when the body has been streamed.
    filled.bytes().await.expect("fill body");
    gateway.running.shutdown();

    let entry = entry_files(&dir.join("disk"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("one entry file");
    let mut bytes = std::fs::read(&entry).expect("read entry");
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    std::fs::write(&entry, bytes).expect("corrupt entry");
}

/// A body small enough for the memory tier is checked before the response starts, so a
/// damaged disk copy is a miss: the client gets the origin's body whole.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_small_entry_is_a_miss() {
    let _beside = MEMORY_TURN.read().await;
    let payload: String = body().chars().take(16 * 1024).collect();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin.addr, "127.0.0.1:0");
    store_then_damage(dir.path(), &text, "/small.json").await;

    let second = TestGateway::start(dir.path(), &text);
    assert_eq!(
        get_with_status(second.url("/small.json"), "MISS").await,
        payload
    );
    assert_eq!(origin.count(), 2);
    assert_eq!(
        second.running.disk_stats().map(|s| s.corrupt_entries),
        Some(1)
    );

    assert_eq!(
        get_with_status(second.url("/small.json"), "HIT").await,
        payload
    );
    assert_eq!(origin.count(), 2);
}

/// Sends a GET for `url`, checks that it gets 200 with `X-Cache-Status: cache_status`, and
/// returns the body.
async fn get_with_status(url: String, cache_status: &str) -> String {
    let response = client().get(&url).send().await.expect("request");
    assert_eq!(response.status(), 200, "{url}");
    assert_eq!(response.headers()["x-cache-status"], cache_status, "{url}");
    response.text().await.expect("body")
}

/// Kills the gateway process with SIGKILL while it fills an entry from a slow origin, then
/// starts it again on the same disk directory: the torn fill must not be a hit.
#[tokio::test(flavor = "multi_thread")]
async fn crash_mid_fill_leaves_no_entry() {
    let _beside = MEMORY_TURN.read().await;
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |req| {
        let mut reply = Reply::ok(&served);
        if req.target == "/slow.json" {
            reply.delay = Duration::from_millis(1500);
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin.addr, "127.0.0.1:0")
        .replace("level = \"warn\"", "level = \"info\"");
    std::fs::write(dir.path().join("gateway.toml"), &text).expect("write config");

    let (mut child, addr) = common::spawn_gateway(dir.path());
    let url = format!("http://{addr}/slow.json");
    let pending = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.count(), 1, "the fill reached the origin");
    child.kill().expect("SIGKILL the gateway");
    child.wait().expect("reap the gateway");
    let _ = pending.await;

    let (mut restarted, addr) = common::spawn_gateway(dir.path());
    let after = client()
        .get(format!("http://{addr}/slow.json"))
        .send()
        .await
        .expect("after crash");
    let status = after.headers()["x-cache-status"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let text = after.text().await.expect("body");
    restarted.kill().expect("stop the gateway");
    restarted.wait().expect("reap the gateway");
    assert_eq!(status, "MISS");
    assert_eq!(text, payload);
    assert_eq!(origin.count(), 2);
}

/// With `disk_sweep_interval_secs = 1` and no stale windows, the sweep deletes an entry whose
/// 1 s TTL has passed from the directory and from the index, keeps a fresh one, and counts the
/// deleted entry in `/metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn expired_entry_swept_from_disk() {
    let _beside = MEMORY_TURN.read().await;
    let (payload, origin) = start_ttl_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = sweep_config(dir.path(), origin.addr);
    let (gateway, clock) = TestGateway::start_with_clock(dir.path(), &text);
    let disk = dir.path().join("disk");
    for path in ["/short.json", "/long.json"] {
        assert_eq!(get_with_status(gateway.url(path), "MISS").await, payload);
    }
    wait_for_entries(&disk, 2).await;
    // An entry is indexed just after its file is renamed into place.
    let stats = wait_for_disk_stats(&gateway, |stats| stats.entries == 2).await;
    assert_eq!(stats.entries, 2, "entries in the index before the sweep");

    clock.advance(Duration::from_secs(10));
    // A sweep counts what it deleted once it has deleted all of it.
    let stats = wait_for_disk_stats(&gateway, |stats| stats.expired == 1).await;
    assert_eq!(stats.entries, 1, "entries in the index");
    assert_eq!(stats.expired, 1, "entries counted as swept");
    assert_eq!(
        entry_files(&disk),
        [entry_path(&disk, "/long.json")],
        "only the fresh entry stays on disk"
    );

    let admin = gateway.running.admin_addr().expect("admin listener");
    let (status, stats) = admin_get(admin, "/cache/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert!(stats.contains("\"expired_entries\":1"), "{stats}");
    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    let series = "mirror_gateway_cache_expired_entries_total{tier=\"disk\"} 1";
    assert!(
        metrics.lines().any(|l| l == series),
        "{series} missing:\n{metrics}"
    );
    let memory = "mirror_gateway_cache_expired_entries_total{tier=\"memory\"}";
    assert!(
        !metrics.contains(memory),
        "the memory tier is not swept:\n{metrics}"
    );

    get_with_status(gateway.url("/long.json"), "HIT").await;
    assert_eq!(
        get_with_status(gateway.url("/short.json"), "MISS").await,
        payload
    );
    assert_eq!(origin.count(), 3);
}

/// A reload keeps the sweeper that started with the gateway: after a reload that changes
/// `disk_sweep_interval_secs` (a `[cache]` key, so the change waits for a restart), the 1 s
/// sweep still deletes an expired entry.
#[tokio::test(flavor = "multi_thread")]
async fn sweep_survives_reload() {
    let _beside = MEMORY_TURN.read().await;
    let (payload, origin) = start_ttl_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = sweep_config(dir.path(), origin.addr);
    let (gateway, clock) = TestGateway::start_with_clock(dir.path(), &text);
    let disk = dir.path().join("disk");

    let hourly = replaced(
        &text,
        "disk_sweep_interval_secs = 1\n",
        "disk_sweep_interval_secs = 3600\n",
    );
    std::fs::write(dir.path().join("gateway.toml"), hourly).expect("write config");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert_eq!(gateway.running.restart_pending(), ["cache"]);

    assert_eq!(
        get_with_status(gateway.url("/short.json"), "MISS").await,
        payload
    );
    wait_for_entries(&disk, 1).await;
    let stats = wait_for_disk_stats(&gateway, |stats| stats.entries == 1).await;
    assert_eq!(stats.entries, 1, "entries in the index before the sweep");

    clock.advance(Duration::from_secs(10));
    let stats = wait_for_disk_stats(&gateway, |stats| stats.expired == 1).await;
    assert_eq!(stats.entries, 0, "entries in the index");
    assert_eq!(stats.expired, 1, "entries counted as swept");
    assert!(
        entry_files(&disk).is_empty(),
        "the expired entry stays on disk"
    );
}

/// Starts an origin that responds with [`body`], fresh for 1 s on `/short.json` and for 600 s
/// on every other path. Returns the body and the origin.
async fn start_ttl_origin() -> (String, TestOrigin) {
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |request| {
        let max_age = if request.target == "/short.json" {
            1
        } else {
            600
        };
        let mut reply = Reply::ok(&served);
        reply.headers = vec![("cache-control".into(), format!("max-age={max_age}"))];
        reply
    })
    .await;
    (payload, origin)
}

/// Writes the admin user of [`start_with_admin`] to `dir` and returns [`config`] with a disk
/// sweep every second, no stale windows for `primary`, and an admin listener.
fn sweep_config(dir: &Path, origin: std::net::SocketAddr) -> String {
    let line = common::htpasswd_line(&["-B", "-C", "5"], ADMIN_USER, ADMIN_PASSWORD);
    std::fs::write(dir.join("admin.htpasswd"), line + "\n").expect("write htpasswd");
    let text = config(dir, origin, "127.0.0.1:0");
    let text = replaced(
        &text,
        "disk_bytes = \"256MiB\"\n",
        "disk_bytes = \"256MiB\"\ndisk_sweep_interval_secs = 1\n",
    );
    let text = replaced(
        &text,
        "hosts = [\"127.0.0.1\"]\n",
        "hosts = [\"127.0.0.1\"]\nstale_while_revalidate_secs = 0\nstale_if_error_secs = 0\n",
    );
    text + "\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"admin.htpasswd\"\n"
}

/// Returns `text` with its one `from` replaced by `to`.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} in:\n{text}");
    text.replacen(from, to, 1)
}

/// Returns the path of the disk entry of `path` on domain `primary` under `disk`.
fn entry_path(disk: &Path, path: &str) -> std::path::PathBuf {
    let hash = mirror_proxy::cache::key_hash("primary", None, path, None);
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    disk.join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

/// Waits up to 5 s until the disk tier's counters satisfy `done`; returns the last counters.
async fn wait_for_disk_stats(
    gateway: &TestGateway,
    done: impl Fn(&DiskSnapshot) -> bool,
) -> DiskSnapshot {
    let stats = || gateway.running.disk_stats().expect("disk tier");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&stats()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stats()
}

/// Sends GET `target` to the admin listener with valid credentials; returns status and body.
async fn admin_get(admin: std::net::SocketAddr, target: &str) -> (u16, String) {
    let response = client()
        .get(format!("http://{admin}{target}"))
        .header("authorization", common::basic(ADMIN_USER, ADMIN_PASSWORD))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin {target}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("admin body"))
}

/// Starts an origin that responds to every path with [`body`] and a gateway with a disk tier in
/// front of it. Returns the body, the origin, the gateway's directory and the gateway.
async fn start_body_gateway() -> (String, TestOrigin, tempfile::TempDir, TestGateway) {
    let payload = body();
    let served = payload.clone();
    let origin = TestOrigin::start(move |_| Reply::ok(&served)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(dir.path(), origin.addr, "127.0.0.1:0"));
    (payload, origin, dir, gateway)
}

fn entry_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "tmp") {
                    stack.push(path);
                }
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 32)
            {
                found.push(path);
            }
        }
    }
    found
}

/// Concurrent requests for an object too large for memory share one origin request and stream
/// it from the disk tier's temp file; the process's peak memory does not grow with the object.
#[tokio::test(flavor = "multi_thread")]
async fn large_fill_streams_from_disk() {
    const LARGE: usize = 48 << 20;
    let _alone = MEMORY_TURN.write().await;
    let (origin, requests) = streaming_origin(LARGE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(dir.path(), origin, "127.0.0.1:0"));
    let before = resident_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(before));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(resident_kib(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut clients = Vec::new();
    for _ in 0..8 {
        let url = gateway.url("/big.bin");
        clients.push(tokio::spawn(async move {
            let mut response = client().get(url).send().await.expect("request");
            let mut received = 0usize;
            while let Some(chunk) = response.chunk().await.expect("chunk") {
                assert!(chunk.iter().all(|b| *b == b'x'), "unexpected bytes");
                received += chunk.len();
            }
            received
        }));
    }
    for handle in clients {
        assert_eq!(handle.await.expect("client"), LARGE);
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().expect("sampler");
    let growth_mib = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before)
        / 1024;
    let origin_requests = requests.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(origin_requests, 1, "origin requests");
    assert_eq!(gateway.running.memory_stats().entries, 0);
    assert!(
        growth_mib < 32,
        "peak memory grew by {growth_mib} MiB for a 48 MiB object"
    );
    let hit = client()
        .get(gateway.url("/big.bin"))
        .send()
        .await
        .expect("hit");
    assert_eq!(hit.headers()["x-cache-status"], "HIT");
    assert_eq!(hit.bytes().await.expect("body").len(), LARGE);
}

/// An origin that sends `len` bytes of `x` in 64 KiB writes from one static buffer, so that it
/// holds no copy of the body; returns its address and a request counter.
async fn streaming_origin(
    len: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    counting_origin(move |_, mut stream| async move {
        use tokio::io::AsyncWriteExt;
        static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ncache-control: max-age=60\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut sent = 0;
        while sent < len {
            let n = CHUNK.len().min(len - sent);
            if stream.write_all(&CHUNK[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    })
    .await
}

/// Starts an origin on a loopback port that reads and counts each connection's first request
/// head, then hands the request line and the connection to `respond`. Returns its address and
/// the request counter.
async fn counting_origin<F, R>(
    respond: F,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)
where
    F: Fn(String, tokio::net::TcpStream) -> R + Clone + Send + 'static,
    R: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (counter, respond) = (counter.clone(), respond.clone());
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream);
                let Some(request_line) = read_head(&mut reader).await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                respond(request_line, reader.into_inner()).await;
            });
        }
    });
    (addr, requests)
}

/// Reads a request head and returns its request line, or `None` when the connection ends
/// first.
async fn read_head(reader: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return None;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        if line.trim_end().is_empty() {
            return Some(request_line);
        }
    }
}

fn resident_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of the chunked body that [`chunked_origin`] sends for `/chunked.bin`.
const CHUNKED_LEN: usize = 300 << 20;
/// Bytes that [`chunked_origin`] sends for `/cut.bin` before it closes the connection without
/// the terminating chunk.
const CUT_AFTER: usize = 3 << 20;
/// Size of each chunk [`chunked_origin`] writes.
const CHUNK: usize = 64 * 1024;

/// A fill without `Content-Length` goes to the disk tier as it arrives. The gateway process's
/// peak resident memory stays bounded while it caches and serves a 300 MiB body, and the
/// second request is a hit from disk with the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_fill_streams_to_disk() {
    let _beside = MEMORY_TURN.read().await;
    chunked_fill_case(CHUNKED_LEN).await;
}

/// Checks what [`chunked_fill_streams_to_disk`] checks, with a 2 GiB body.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes 2 GiB to disk twice over and takes about a minute; run by hand to measure"]
async fn chunked_fill_2gib_streams_to_disk() {
    let _beside = MEMORY_TURN.read().await;
    chunked_fill_case(2 << 30).await;
}

async fn chunked_fill_case(len: usize) {
    let (origin, requests) = chunked_origin(len).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = format!("{}MiB", (len >> 20) * 2 + 64);
    let text = config(dir.path(), origin, "127.0.0.1:0")
        .replace("level = \"warn\"", "level = \"info\"")
        .replace(
            "disk_bytes = \"256MiB\"",
            &format!("disk_bytes = \"{budget}\""),
        )
        .replace(
            "disk_max_object_bytes = \"128MiB\"",
            &format!("disk_max_object_bytes = \"{budget}\""),
        );
    std::fs::write(dir.path().join("gateway.toml"), &text).expect("write config");
    let (mut child, addr) = common::spawn_gateway(dir.path());
    let started_kib = proc_status_kib(child.id(), "VmHWM");
    let expected = chunked_digest(len);

    let url = format!("http://{addr}/chunked.bin");
    let (first_status, first_digest, first_len) = fetch_digest(&url).await;
    let (second_status, second_digest, second_len) = fetch_digest(&url).await;
    // Once stored, the body's length is known, so the disk entry serves a range.
    let last = len - 1;
    let ranged = client()
        .get(&url)
        .header("range", format!("bytes={last}-"))
        .send()
        .await
        .expect("range");
    let ranged_status = ranged.status().as_u16();
    let ranged_range = ranged.headers().get("content-range").cloned();
    let ranged_body = ranged.bytes().await.expect("range body");
    let peak_kib = proc_status_kib(child.id(), "VmHWM");
    child.kill().expect("stop the gateway");
    child.wait().expect("reap the gateway");

    let growth_mib = peak_kib.saturating_sub(started_kib) / 1024;
    eprintln!(
        "{} MiB chunked body: gateway VmHWM {} MiB at start, {} MiB at peak (+{growth_mib} MiB)",
        len >> 20,
        started_kib / 1024,
        peak_kib / 1024
    );
    assert_eq!(first_status, "MISS");
    assert_eq!(first_len, len, "first body length");
    assert!(
        first_digest == expected,
        "first body differs from the origin's"
    );
    assert_eq!(second_status, "HIT");
    assert_eq!(second_len, len, "second body length");
    assert!(
        second_digest == expected,
        "cached body differs from the origin's"
    );
    assert_eq!(ranged_status, 206, "range of the stored chunked body");
    assert_eq!(
        ranged_range.as_ref().and_then(|v| v.to_str().ok()),
        Some(format!("bytes {last}-{last}/{len}").as_str())
    );
    assert_eq!(ranged_body.len(), 1);
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    let entries = entry_files(&dir.path().join("disk"));
    assert_eq!(entries.len(), 1, "disk entries");
    assert!(
        growth_mib < 100,
        "peak memory grew by {growth_mib} MiB for a {} MiB body",
        len >> 20
    );
}

/// A chunked body that the origin cuts off (no terminating chunk) fails for the client and is
/// never stored: the next request goes to the origin again, and no entry or temp file is left.
/// The client's failure is a cut connection, or a clean 502 when the cut came before the
/// gateway wrote the response header.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_cut_not_stored() {
    let _beside = MEMORY_TURN.read().await;
    let (origin, requests) = chunked_origin(CHUNKED_LEN).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let text = config(dir.path(), origin, "127.0.0.1:0").replace(
        "access_log = \"off\"",
        &format!("access_log = \"{}\"", log.display()),
    );
    let gateway = TestGateway::start(dir.path(), &text);
    let url = gateway.url("/cut.bin");
    let mut sent = Vec::new();
    for round in 1..=2 {
        let (status, body) = match client().get(&url).send().await {
            Ok(response) => {
                let cache = response.headers()["x-cache-status"].clone();
                assert_ne!(cache, "HIT", "round {round}");
                sent.push(Some(cache.to_str().expect("ascii").to_owned()));
                let status = response.status().as_u16();
                (status, response.bytes().await.map(|b| b.len()))
            }
            Err(e) => {
                sent.push(None);
                (0, Err(e))
            }
        };
        assert!(
            body.is_err() || status == 502,
            "round {round}: a clean {body:?}-byte body with status {status}"
        );
    }
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 2);
    // The access log records the `X-Cache-Status` the client got, although the failed fill
    // turned the cache's own status to BYPASS after the header went out.
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(logged.len(), 2, "{logged:?}");
    for (line, header) in logged.iter().zip(&sent) {
        // The cache status is the field before the request's duration and the rejection.
        let cache = line
            .split_whitespace()
            .rev()
            .nth(2)
            .expect("a cache status field");
        if let Some(header) = header {
            assert_eq!(cache, header, "{line}");
        }
    }
    let disk = dir.path().join("disk");
    assert!(entry_files(&disk).is_empty(), "a cut body was stored");
    let deadline = Instant::now() + Duration::from_secs(5);
    while temp_files(&disk) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(&disk), 0, "temp files left behind");
    assert_eq!(gateway.running.disk_stats().expect("disk tier").entries, 0);
}

fn temp_files(disk: &Path) -> usize {
    std::fs::read_dir(disk.join("tmp")).map_or(0, |dir| dir.count())
}

/// GETs `url` with a client that allows minutes for the body, and returns `X-Cache-Status`,
/// the SHA-256 of the body and its length.
async fn fetch_digest(url: &str) -> (String, Vec<u8>, usize) {
    use sha2::Digest;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client");
    let mut response = client.get(url).send().await.expect("request");
    let status = response.headers()["x-cache-status"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let mut hasher = sha2::Sha256::new();
    let mut len = 0;
    while let Some(chunk) = response.chunk().await.expect("body chunk") {
        hasher.update(&chunk);
        len += chunk.len();
    }
    (status, hasher.finalize().to_vec(), len)
}

/// Returns a field of `/proc/<pid>/status` in KiB (`VmHWM`: peak resident memory).
fn proc_status_kib(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Returns chunk `index` of the chunked origin's body: a fixed pseudo-random pattern that
/// starts with the chunk's index, so that a lost, repeated or reordered chunk changes the
/// digest.
fn body_chunk(pattern: &[u8], index: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(pattern);
    out[..8].copy_from_slice(&(index as u64).to_le_bytes());
}

fn chunk_pattern() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..CHUNK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Returns the SHA-256 of the body [`chunked_origin`] sends for `/chunked.bin`.
fn chunked_digest(len: usize) -> Vec<u8> {
    use sha2::Digest;
    let pattern = chunk_pattern();
    let mut hasher = sha2::Sha256::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut sent = 0;
    for index in 0.. {
        if sent == len {
            break;
        }
        body_chunk(&pattern, index, &mut chunk);
        let n = CHUNK.min(len - sent);
        hasher.update(&chunk[..n]);
        sent += n;
    }
    hasher.finalize().to_vec()
}

/// An origin that responds to `/chunked.bin` with `len` bytes in `Transfer-Encoding: chunked`,
/// generated as it writes them, and `/cut.bin` with [`CUT_AFTER`] bytes of chunks and then a
/// closed connection; returns its address and a request counter.
async fn chunked_origin(
    len: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    counting_origin(move |target, mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let (total, cut) = if target.contains("/cut.bin") {
            (CUT_AFTER, true)
        } else {
            (len, false)
        };
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                    cache-control: max-age=60\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let pattern = chunk_pattern();
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut sent = 0;
        let mut index = 0;
        while sent < total {
            body_chunk(&pattern, index, &mut chunk);
            let n = CHUNK.min(total - sent);
            let size = format!("{n:x}\r\n");
            let written = async {
                stream.write_all(size.as_bytes()).await?;
                stream.write_all(&chunk[..n]).await?;
                stream.write_all(b"\r\n").await
            };
            if written.await.is_err() {
                return;
            }
            sent += n;
            index += 1;
        }
        if !cut {
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        let _ = stream.shutdown().await;
    })
    .await
}

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `path`, creating the
    /// directory. Returns the error text when the mount fails (it needs root).
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy: detach it now, the kernel frees it when the last file closes.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status();
        }
    }
}

/// Returns the byte that [`sized_origin`] repeats in the body of `path`.
fn fill_byte(path: &str) -> u8 {
    let sum: u32 = path.bytes().map(u32::from).sum();
    b'a' + (sum % 26) as u8
}

/// Starts an origin whose body for each path is [`fill_byte`] repeated: 1,000,000 bytes chunked for a
/// path with `chunked`, 8,000,000 bytes for a path with `huge`, else 1,800,000 bytes, the
/// last two with `Content-Length`. Returns its address and a request counter.
async fn sized_origin() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    counting_origin(|request_line, mut stream| async move {
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let chunk = [fill_byte(&path); 64 * 1024];
        let chunked = path.contains("chunked");
        let len = if chunked {
            1_000_000
        } else if path.contains("huge") {
            8_000_000
        } else {
            1_800_000
        };
        let framing = if chunked {
            "transfer-encoding: chunked".to_string()
        } else {
            format!("content-length: {len}")
        };
        let head = format!("HTTP/1.1 200 OK\r\n{framing}\r\ncache-control: max-age=600\r\n\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            let written = if chunked {
                let size = format!("{n:x}\r\n");
                async {
                    stream.write_all(size.as_bytes()).await?;
                    stream.write_all(&chunk[..n]).await?;
                    stream.write_all(b"\r\n").await
                }
                .await
            } else {
                stream.write_all(&chunk[..n]).await
            };
            if written.is_err() {
                return;
            }
            sent += n;
        }
        if chunked {
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    })
    .await
}

/// What a client got for one GET of [`sized_origin`]'s bodies.
#[derive(Debug)]
struct Fetched {
    cache: String,
    len: usize,
    /// Whether every byte was the path's [`fill_byte`].
    intact: bool,
}

/// GETs `path` from `addr`; an error is a failed request or a body cut off.
async fn fetch_sized(addr: std::net::SocketAddr, path: &str) -> Result<Fetched, reqwest::Error> {
    let mut response = client().get(format!("http://{addr}{path}")).send().await?;
    let cache = response.headers()["x-cache-status"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let expected = fill_byte(path);
    let (mut len, mut intact) = (0, true);
    while let Some(chunk) = response.chunk().await? {
        intact &= chunk.iter().all(|b| *b == expected);
        len += chunk.len();
    }
    Ok(Fetched { cache, len, intact })
}

/// A disk tier on a filesystem smaller than its budget: a fill that finds the filesystem full
/// evicts older entries and is stored, and one that cannot fit at all still reaches its client
/// whole and is not stored. No client gets a short body presented as complete.
#[tokio::test(flavor = "multi_thread")]
async fn full_disk_serves_whole_bodies() {
    let _beside = MEMORY_TURN.read().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk");
    let _tmpfs = match Tmpfs::mount(&disk, "6m") {
        Ok(mount) => mount,
        Err(e) => {
            eprintln!("SKIPPED full_disk_serves_whole_bodies: cannot mount a tmpfs: {e}");
            return;
        }
    };
    let (origin, requests) = sized_origin().await;
    let text = config(dir.path(), origin, "127.0.0.1:0")
        .replace(
            "max_object_bytes = \"64KiB\"",
            "max_object_bytes = \"1MiB\"",
        )
        .replace("disk_bytes = \"256MiB\"", "disk_bytes = \"1GiB\"")
        .replace(
            "disk_max_object_bytes = \"128MiB\"",
            "disk_max_object_bytes = \"64MiB\"",
        );
    let gateway = TestGateway::start(dir.path(), &text);
    let addr = gateway.addr;
    let whole = |path: &str, got: &Fetched, len: usize| {
        assert_eq!(got.len, len, "{path}: body length");
        assert!(got.intact, "{path}: body bytes differ from the origin's");
    };

    // Three 1.8 MB entries leave less than 1 MB of the 6 MiB free.
    for path in ["/f1.bin", "/f2.bin", "/f3.bin"] {
        let got = fetch_sized(addr, path).await.expect(path);
        whole(path, &got, 1_800_000);
    }
    for (path, len) in [("/new.bin", 1_800_000), ("/chunked.bin", 1_000_000)] {
        let first = fetch_sized(addr, path).await.expect(path);
        assert_eq!(first.cache, "MISS", "{path}");
        whole(path, &first, len);
        let second = fetch_sized(addr, path).await.expect(path);
        assert_eq!(
            second.cache, "HIT",
            "{path}: stored after evicting older entries"
        );
        whole(path, &second, len);
    }
    let stats = gateway.running.disk_stats().expect("disk tier");
    assert!(stats.evictions >= 2, "{stats:?}");

    // 8 MB never fits: the client still gets it whole, twice, and it is not stored.
    for round in 1..=2 {
        let got = fetch_sized(addr, "/huge.bin").await.expect("huge");
        assert_eq!(got.cache, "MISS", "round {round}");
        whole("/huge.bin", &got, 8_000_000);
    }
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tokio::spawn(fetch_sized(addr, "/huge2.bin")));
    }
    let mut complete = 0;
    for client in clients {
        // A request that waited on the failed fill may fail, but never with a short body.
        if let Ok(got) = client.await.expect("client") {
            whole("/huge2.bin", &got, 8_000_000);
            complete += 1;
        }
    }
    assert!(complete >= 1, "the filling client got no whole body");
    let stats = gateway.running.disk_stats().expect("disk tier");
    assert!(stats.write_errors >= 3, "{stats:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while temp_files(&disk) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(&disk), 0, "temp files left behind");
    let fetched = requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(fetched >= 8, "origin requests: {fetched}");
    gateway.running.shutdown();
}

/// Forty clients that request one disk entry at once, right after a restart, do not each read
/// its body into memory to copy it to the memory tier. One copies it and the others stream it
/// from disk, so the gateway's peak memory grows by a few copies of the body at most.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_disk_hits_promote_once() {
    const LEN: usize = 24 << 20;
    const CLIENTS: usize = 40;
    let _beside = MEMORY_TURN.read().await;
    let (origin, requests) = streaming_origin(LEN).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(dir.path(), origin, "127.0.0.1:0")
        .replace("level = \"warn\"", "level = \"info\"")
        .replace("memory_bytes = \"64MiB\"", "memory_bytes = \"256MiB\"")
        .replace(
            "max_object_bytes = \"64KiB\"",
            "max_object_bytes = \"64MiB\"",
        );
    std::fs::write(dir.path().join("gateway.toml"), &text).expect("write config");

    let (mut first, addr) = common::spawn_gateway(dir.path());
    let filled = fetch_digest(&format!("http://{addr}/big.bin")).await;
    assert_eq!(filled.2, LEN, "fill length");
    wait_for_entries(&dir.path().join("disk"), 1).await;
    first.kill().expect("stop the gateway");
    first.wait().expect("reap the gateway");

    let (mut second, addr) = common::spawn_gateway(dir.path());
    let started_kib = proc_status_kib(second.id(), "VmHWM");
    // All connections are open before the first request goes out, so that the requests arrive
    // together, while the first one still reads the body.
    let mut connections = Vec::new();
    for _ in 0..CLIENTS {
        connections.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let request = "GET /big.bin HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    for stream in &mut connections {
        stream.write_all(request.as_bytes()).await.expect("send");
    }
    let clients: Vec<_> = connections
        .into_iter()
        .map(|stream| tokio::spawn(read_counted(stream)))
        .collect();
    for handle in clients {
        let (cache, received) = handle.await.expect("client");
        assert_eq!(cache, "HIT");
        assert_eq!(received, LEN, "body length");
    }
    let peak_kib = proc_status_kib(second.id(), "VmHWM");
    second.kill().expect("stop the gateway");
    second.wait().expect("reap the gateway");

    let growth_mib = peak_kib.saturating_sub(started_kib) / 1024;
    eprintln!(
        "{CLIENTS} disk hits of {} MiB: gateway VmHWM {} MiB at start, +{growth_mib} MiB at peak",
        LEN >> 20,
        started_kib / 1024
    );
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    // One copy of the body for the memory tier, plus the chunks on their way to 40 clients:
    // 67 to 92 MiB in all on a 2-core VM. A copy per request was 1.25 to 1.4 GiB.
    assert!(
        growth_mib < 6 * (LEN >> 20),
        "peak memory grew by {growth_mib} MiB for {CLIENTS} hits of a {} MiB entry",
        LEN >> 20
    );
}

/// Reads one response from `stream` until the connection closes, and returns its
/// `X-Cache-Status` and the number of body bytes after the header.
async fn read_counted(stream: TcpStream) -> (String, usize) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut cache = String::new();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line).await.expect("response header");
        assert!(read > 0, "connection closed in the response header");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("x-cache-status") {
                cache = value.trim().to_string();
            }
        }
    }
    let mut buf = vec![0; 256 * 1024];
    let mut received = 0;
    loop {
        let n = reader.read(&mut buf).await.expect("response body");
        if n == 0 {
            return (cache, received);
        }
        received += n;
    }
}
