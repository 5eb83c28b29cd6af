//! End-to-end: a gateway whose config has a `[sync]` section runs the sync jobs itself, on
//! a schedule, and serves what they publish without a `sync` command.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{basic, client, htpasswd_line, TestGateway, BASE_CONFIG};

const ADMIN: (&str, &str) = ("admin", "admin-pass");
const FILE: &str = "/concelier/hello.txt";

/// A gateway serving `dir/concelier`, which its `concelier` job fills from `dir/source`.
struct Fixture {
    gateway: TestGateway,
    admin: SocketAddr,
    source: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Starts the gateway with `source/mirror/hello.txt` holding `body`; `sync` is added to
    /// the `[sync]` table.
    fn start(body: &str, sync: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("mirror")).expect("mkdir");
        std::fs::write(source.join("mirror/hello.txt"), body).expect("write");
        std::fs::create_dir(dir.path().join("concelier")).expect("mkdir");
        let config = config_text(dir.path(), sync);
        let gateway = TestGateway::start(dir.path(), &config);
        let admin = gateway.running.admin_addr().expect("admin listener");
        Self {
            gateway,
            admin,
            source,
            _dir: dir,
        }
    }

    /// Returns the status and body of GET `path` on the proxy listener.
    async fn get(&self, path: &str) -> (u16, String) {
        let resp = client()
            .get(self.gateway.url(path))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    /// Polls `path` every 100 ms until it responds 200 with `body`. Panics after 10 s with the
    /// last response.
    async fn wait_for_body(&self, path: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            last = self.get(path).await;
            if last == (200, body.to_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{path} did not respond 200 {body:?} within 10 s; last response: {last:?}");
    }

    /// Returns the status and body of GET `/readyz` on the admin listener, without
    /// credentials.
    async fn readyz(&self) -> (u16, String) {
        let resp = client()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .expect("readyz");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    /// Polls `/readyz` until it responds 503, for at most 10 s, and returns the last response.
    async fn wait_until_not_ready(&self) -> (u16, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            last = self.readyz().await;
            if last.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    }

    /// Returns the status and body of GET `path` on the admin listener, with credentials.
    async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = client()
            .get(format!("http://{}{path}", self.admin))
            .header("authorization", basic(ADMIN.0, ADMIN.1))
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }
}

/// Writes the admin htpasswd file into `dir` and returns the gateway's config, with a
/// `concelier` job run every second; `sync` is added to the `[sync]` table.
fn config_text(dir: &Path, sync: &str) -> String {
    let section = format!(
        r#"[sync]
interval_secs = 1
jitter_secs = 0
{sync}
{CONCELIER_JOB}"#
    );
    gateway_config(dir, &section)
}

/// The job that fills `dir/concelier` from `dir/source`.
const CONCELIER_JOB: &str = r#"[sync.jobs.concelier]
destination = "concelier"
source = { kind = "directory", path = "source" }
"#;

/// Writes the admin htpasswd file into `dir` and returns a gateway config serving
/// `dir/concelier`, followed by `sync_section` (which may be empty).
fn gateway_config(dir: &Path, sync_section: &str) -> String {
    let line = htpasswd_line(&["-B", "-C", "5"], ADMIN.0, ADMIN.1);
    std::fs::write(dir.join("admin.htpasswd"), line + "\n").expect("write");
    format!(
        r#"{BASE_CONFIG}
[admin]
listen = "127.0.0.1:0"
htpasswd = "admin.htpasswd"

[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.tree]
kind = "export_tree"
root = "concelier"
[[domains.primary.routes]]
prefix = "/concelier/"
origin = "tree"
origin_path = "/mirror/"

{sync_section}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_serves_first_run() {
    let fixture = Fixture::start("one\n", "");
    fixture.wait_for_body(FILE, "one\n").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_picks_up_change() {
    let fixture = Fixture::start("one\n", "");
    fixture.wait_for_body(FILE, "one\n").await;
    std::fs::write(fixture.source.join("mirror/hello.txt"), "two, longer\n").expect("write");
    fixture.wait_for_body(FILE, "two, longer\n").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_ready_while_fresh() {
    let fixture = Fixture::start("one\n", "max_lag_secs = 60");
    fixture.wait_for_body(FILE, "one\n").await;
    let (status, body) = fixture.readyz().await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_reports_lag_hook() {
    let fixture = Fixture::start("one\n", "max_lag_secs = 60");
    fixture.wait_for_body(FILE, "one\n").await;
    let freshness = fixture.gateway.running.monitor().health.sync_freshness();
    let freshness = freshness.expect("the sync service installs the lag hook");
    assert_eq!(freshness.max_lag, Duration::from_secs(60));
    let lag = freshness.lag.expect("a run finished");
    assert!(lag < Duration::from_secs(10), "{lag:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_counts_runs() {
    let fixture = Fixture::start("one\n", "");
    fixture.wait_for_body(FILE, "one\n").await;
    let (status, text) = fixture.admin_get("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let line = "mirror_gateway_sync_runs_total{job=\"concelier\",result=\"ok\"}";
    assert!(text.contains(line), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_service_not_ready_when_stale() {
    let fixture = Fixture::start("one\n", "max_lag_secs = 1");
    // Every run fails from now on, so the served export's time stays and the lag grows.
    fixture.wait_for_body(FILE, "one\n").await;
    std::fs::remove_dir_all(&fixture.source).expect("remove the source");
    let last = fixture.wait_until_not_ready().await;
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("over the 1 s limit"), "{}", last.1);
}

#[test]
fn sync_service_rejects_invalid_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("concelier")).expect("mkdir");
    let config = config_text(dir.path(), "").replace("jitter_secs = 0", "jitter_secs = 5");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    let errors = mirror_proxy::config::load(&path, Vec::new())
        .err()
        .expect("an invalid [sync] is a config error");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("sync.jitter_secs = 5: must be less than interval_secs (1)")),
        "{messages:?}"
    );
}

/// The gateway's `[sync]` comes from the same document as the rest of its config, with the
/// environment overrides applied: a sync key and an origin's pinned export set by a variable
/// reach the jobs the gateway runs.
#[test]
fn sync_section_takes_env_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pinned = dir.path().join("concelier/20260101T120000Z");
    std::fs::create_dir_all(pinned).expect("mkdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_text(dir.path(), "")).expect("write config");
    let env = [
        ("MIRROR_GATEWAY__SYNC__INTERVAL_SECS", "60"),
        (
            "MIRROR_GATEWAY__DOMAINS__PRIMARY__ORIGINS__TREE__PINNED_EXPORT",
            "20260101T120000Z",
        ),
    ]
    .map(|(name, value)| (name.to_string(), value.to_string()));
    let config = mirror_proxy::config::load(&path, env).expect("valid");
    let sync = config.sync.expect("the [sync] section");
    assert_eq!(sync.interval, Duration::from_secs(60));
    assert_eq!(sync.jobs[0].pinned, ["20260101T120000Z"]);
}

impl Fixture {
    /// Returns the count of successful runs of `job` in `/metrics` (0 before the first).
    async fn ok_runs(&self, job: &str) -> u64 {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let prefix = format!("mirror_gateway_sync_runs_total{{job=\"{job}\",result=\"ok\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map_or(0, |count| count.trim().parse().expect("a count"))
    }

    /// Polls the metrics every 100 ms until `job` has at least `count` successful runs.
    /// Panics after `limit` with the last count.
    async fn wait_for_runs(&self, job: &str, count: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = 0;
        while Instant::now() < deadline {
            last = self.ok_runs(job).await;
            if last >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {job} had {last} successful runs after {limit:?}, expected {count}");
    }

    /// Writes `config` over the gateway's config file and reloads it.
    fn reload(&self, config: &str) {
        std::fs::write(self.gateway.dir.join("gateway.toml"), config).expect("write config");
        let outcome = self.gateway.running.reload(Vec::new());
        assert_eq!(outcome, mirror_proxy::reload::ReloadOutcome::Applied);
    }

    /// Returns the value of the metric line starting with `series`, if present.
    async fn metric(&self, series: &str) -> Option<f64> {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map(|value| value.trim().parse().expect("a number"))
    }
}

/// Returns a `[sync]` section with the concelier job and `interval_secs = interval`.
fn schedule(interval: u64) -> String {
    format!("[sync]\ninterval_secs = {interval}\njitter_secs = 0\n{CONCELIER_JOB}")
}

/// 2026-01-01T00:00:00Z, the `generatedAt` of the stale export below.
const OLD_EXPORT_UNIX: u64 = 1_767_225_600;

/// Starts a gateway with `max_lag_secs = 900` whose source export was generated at
/// [`OLD_EXPORT_UNIX`], and waits until it serves that export's index.
async fn serve_old_export() -> Fixture {
    let fixture = Fixture::start("one\n", "max_lag_secs = 900");
    let index = r#"{"kind": "concelier.mirror-index", "generatedAt": "2026-01-01T00:00:00Z"}"#;
    std::fs::write(fixture.source.join("mirror/index.json"), index).expect("write");
    fixture.wait_for_body("/concelier/index.json", index).await;
    fixture
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_lag_counts_from_export_time() {
    let fixture = serve_old_export().await;
    let series = "mirror_gateway_sync_source_export_timestamp_seconds{job=\"concelier\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut exported = None;
    while Instant::now() < deadline && exported != Some(OLD_EXPORT_UNIX as f64) {
        exported = fixture.metric(series).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(exported, Some(OLD_EXPORT_UNIX as f64));
    let lag = fixture
        .metric("mirror_gateway_sync_lag_seconds{job=\"concelier\"}")
        .await
        .expect("a lag");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let expected = now - OLD_EXPORT_UNIX as f64;
    assert!(
        (lag - expected).abs() < 30.0,
        "lag {lag}, expected about {expected}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_old_export_not_ready() {
    let fixture = serve_old_export().await;
    // The runs succeed, but the export itself is old: the gateway is not ready. A run records
    // the export's time after it publishes, so readiness can follow the served export by the
    // rest of that run.
    let (status, body) = fixture.wait_until_not_ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("over the 900 s limit"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reload_shortens_interval() {
    let fixture = Fixture::start("one\n", "");
    let dir = fixture.gateway.dir.clone();
    fixture.reload(&gateway_config(&dir, &schedule(3600)));
    fixture
        .wait_for_runs("concelier", 1, Duration::from_secs(10))
        .await;
    let before = fixture.ok_runs("concelier").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_wait = fixture.ok_runs("concelier").await;
    assert_eq!(
        after_wait, before,
        "a one-hour interval ran again within 3 s"
    );

    fixture.reload(&gateway_config(&dir, &schedule(1)));
    let limit = Duration::from_secs(10);
    fixture
        .wait_for_runs("concelier", after_wait + 2, limit)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reload_removes_job() {
    let fixture = Fixture::start("one\n", "");
    fixture
        .wait_for_runs("concelier", 1, Duration::from_secs(10))
        .await;
    let dir = fixture.gateway.dir.clone();
    fixture.reload(&gateway_config(&dir, ""));
    let monitor = fixture.gateway.running.monitor();
    assert_eq!(monitor.health.sync_freshness(), None);
    // A run in progress at the reload still finishes; none starts after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = fixture.ok_runs("concelier").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fixture.ok_runs("concelier").await, after);
    let lag = fixture
        .metric("mirror_gateway_sync_lag_seconds{job=\"concelier\"}")
        .await;
    assert_eq!(lag, None, "the removed job's lag is still exported");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reload_adds_job() {
    let fixture = Fixture::start("one\n", "");
    let dir = fixture.gateway.dir.clone();
    let both = format!(
        "{}\n[sync.jobs.excititor]\ndestination = \"excititor\"\n\
         source = {{ kind = \"directory\", path = \"source\" }}\n",
        schedule(3600)
    );
    fixture.reload(&gateway_config(&dir, &both));
    fixture
        .wait_for_runs("excititor", 1, Duration::from_secs(10))
        .await;
    let published = dir.join("excititor/latest/mirror/hello.txt");
    assert_eq!(std::fs::read_to_string(published).expect("read"), "one\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reload_adds_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source/mirror");
    std::fs::create_dir_all(&source).expect("mkdir");
    std::fs::write(source.join("hello.txt"), "one\n").expect("write");
    std::fs::create_dir(dir.path().join("concelier")).expect("mkdir");
    let gateway = TestGateway::start(dir.path(), &gateway_config(dir.path(), ""));
    assert_eq!(gateway.running.monitor().health.sync_freshness(), None);
    let config = gateway_config(dir.path(), &schedule(3600));
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let outcome = gateway.running.reload(Vec::new());
    assert_eq!(outcome, mirror_proxy::reload::ReloadOutcome::Applied);
    let published = dir.path().join("concelier/latest/mirror/hello.txt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !published.exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published.exists(), "no run within 10 s of the reload");
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reload_rejects_invalid_section() {
    let fixture = Fixture::start("one\n", "");
    let dir = fixture.gateway.dir.clone();
    let invalid = schedule(1).replace("jitter_secs = 0", "jitter_secs = 5");
    std::fs::write(dir.join("gateway.toml"), gateway_config(&dir, &invalid)).expect("write");
    let outcome = fixture.gateway.running.reload(Vec::new());
    let mirror_proxy::reload::ReloadOutcome::Rejected(errors) = outcome else {
        panic!("an invalid [sync] section was applied");
    };
    let joined = errors.join("\n");
    assert!(joined.contains("sync.jitter_secs = 5"), "{joined}");
    let before = fixture.ok_runs("concelier").await;
    fixture
        .wait_for_runs("concelier", before + 1, Duration::from_secs(10))
        .await;
}
