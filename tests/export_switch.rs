//! End-to-end: switching `latest` while the gateway runs never mixes two exports.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{client, export_tree, unique, TestGateway, BASE_CONFIG};

const OLD: &str = "20260101T000000Z";
const NEW: &str = "20260102T000000Z";
const INDEX: &str = "/concelier/exports/index.json";
const BUNDLE: &str = "/concelier/exports/mirror/primary/bundle.json";
const SIGNATURE: &str = "/concelier/exports/mirror/primary/bundle.json.jws";

/// A gateway serving the export tree `dir/concelier`.
struct Fixture {
    gateway: TestGateway,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// One response: status, `X-Cache-Status`, `X-Export-Id` and body.
struct Fetched {
    status: u16,
    cache: String,
    export: String,
    body: String,
}

impl Fixture {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("concelier");
        export_tree(&root);
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
pattern = "/concelier/exports/index.json"
ttl_secs = 60
cache_control = "public, max-age=60"
[[domains.primary.plugins.rules]]
pattern = "/concelier/exports/mirror/**"
ttl_secs = 300
cache_control = "public, max-age=300, immutable"
"#
        );
        let gateway = TestGateway::start(dir.path(), &config);
        Self {
            gateway,
            root,
            _dir: dir,
        }
    }

    async fn fetch(&self, path: &str) -> Fetched {
        let resp = client()
            .get(self.gateway.url(path))
            .send()
            .await
            .expect("request");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (cache, export) = (header("x-cache-status"), header("x-export-id"));
        Fetched {
            status: resp.status().as_u16(),
            cache,
            export,
            body: resp.text().await.expect("body"),
        }
    }
}

/// Points `root/latest` at `export` atomically: a new link under a temporary name, renamed
/// over the old one.
fn flip_latest(root: &Path, export: &str) {
    let staged = root.join(format!(".latest-{}", unique()));
    std::os::unix::fs::symlink(export, &staged).expect("stage link");
    std::fs::rename(&staged, root.join("latest")).expect("rename over latest");
}

/// Returns the export id a fixture file names (`export_tree` writes it into every file).
fn named_export(body: &str) -> &str {
    [OLD, NEW]
        .into_iter()
        .find(|id| body.contains(id))
        .unwrap_or("none")
}

#[tokio::test(flavor = "multi_thread")]
async fn switch_serves_old_export() {
    let fx = Fixture::start();
    for expected_cache in ["MISS", "HIT"] {
        let before = fx.fetch(INDEX).await;
        assert_eq!(before.cache, expected_cache);
        assert_eq!(before.body, format!("{{\"exportId\":\"{NEW}\"}}"));
    }
    flip_latest(&fx.root, OLD);
    for expected_cache in ["MISS", "HIT"] {
        let after = fx.fetch(INDEX).await;
        assert_eq!(after.status, 200);
        assert_eq!(after.cache, expected_cache, "after the switch");
        assert_eq!(after.body, format!("{{\"exportId\":\"{OLD}\"}}"));
        assert_eq!(after.export, OLD);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn switch_back_hits_new_entries() {
    let fx = Fixture::start();
    assert_eq!(fx.fetch(INDEX).await.cache, "MISS");
    flip_latest(&fx.root, OLD);
    assert_eq!(fx.fetch(INDEX).await.cache, "MISS");
    flip_latest(&fx.root, NEW);
    let back = fx.fetch(INDEX).await;
    assert_eq!(back.cache, "HIT");
    assert_eq!(back.export, NEW);
    assert_eq!(named_export(&back.body), NEW);
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_and_signature_match() {
    let fx = Fixture::start();
    for path in [BUNDLE, SIGNATURE] {
        let warm = fx.fetch(path).await;
        assert_eq!(warm.export, NEW, "{path}");
        assert_eq!(named_export(&warm.body), NEW, "{path}");
    }
    flip_latest(&fx.root, OLD);
    let bundle = fx.fetch(BUNDLE).await;
    let signature = fx.fetch(SIGNATURE).await;
    assert_eq!(bundle.status, 200);
    assert_eq!(signature.status, 200);
    assert_eq!(named_export(&bundle.body), OLD);
    assert_eq!(named_export(&signature.body), OLD);
    assert_eq!(bundle.export, OLD);
    assert_eq!(signature.export, OLD);
}

#[tokio::test(flavor = "multi_thread")]
async fn flips_never_mix_exports() {
    let fx = Fixture::start();
    // A bound on the loop, not a speed check: 20 rounds took over 5 s in a debug build on a
    // busy 2-core machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0..20 {
        assert!(Instant::now() < deadline, "took too long, round {round}");
        let target = if round % 2 == 0 { OLD } else { NEW };
        let flip = {
            let root = fx.root.clone();
            tokio::task::spawn_blocking(move || flip_latest(&root, target))
        };
        let fetches = [BUNDLE, SIGNATURE, INDEX, BUNDLE, SIGNATURE].map(|p| fx.fetch(p));
        for fetched in futures::future::join_all(fetches).await {
            assert_eq!(fetched.status, 200, "round {round}");
            let named = named_export(&fetched.body);
            assert_eq!(named, fetched.export, "round {round}: body vs header");
        }
        flip.await.expect("flip");
    }
}
