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

/// Writes the admin htpasswd file into `dir` and returns the gateway's config.
fn config_text(dir: &Path, sync: &str) -> String {
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

[sync]
interval_secs = 1
jitter_secs = 0
{sync}
[sync.jobs.concelier]
destination = "concelier"
source = {{ kind = "directory", path = "source" }}
"#
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
    let client = client();
    let resp = client
        .get(format!("http://{}/readyz", fixture.admin))
        .send()
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
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
    // Every run fails from now on; the lag counts from the last success.
    fixture.wait_for_body(FILE, "one\n").await;
    std::fs::remove_dir_all(&fixture.source).expect("remove the source");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        let resp = client()
            .get(format!("http://{}/readyz", fixture.admin))
            .send()
            .await
            .expect("readyz");
        last = (resp.status().as_u16(), resp.text().await.expect("body"));
        if last.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let config = mirror_proxy::config::load(&path, Vec::new()).expect("gateway config valid");
    let error = mirror_proxy::app::App::build(&config)
        .err()
        .expect("an invalid [sync] is a start error");
    let message = error.to_string();
    assert!(
        message.contains("sync.jitter_secs = 5: must be less than interval_secs (1)"),
        "{message}"
    );
}
