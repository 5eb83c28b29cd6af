//! End-to-end: hostile and odd request paths against an export tree, sent byte for byte.

mod common;

use common::{basic, export_tree, htpasswd_line, raw_get, TestGateway, BASE_CONFIG};

const SECRET: &str = "TOP-SECRET-CONTENT";
const NEW: &str = "20260102T000000Z";
const INDEX_BODY: &str = "{\"exportId\":\"20260102T000000Z\"}";

/// A gateway serving `dir/concelier` to `127.0.0.1` (open) and `locked.test` (htpasswd), with
/// `dir/secret.txt` outside the tree and symlinks in the new export pointing out of it.
struct Fixture {
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("concelier");
        export_tree(&root);
        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, SECRET).expect("write secret");
        let mirror = root.join(NEW).join("mirror");
        let link = |target: &std::path::Path, name: &str| {
            std::os::unix::fs::symlink(target, mirror.join(name)).expect("symlink");
        };
        link(&secret, "primary/leak.json");
        link(dir.path(), "outside");
        link(
            "../../../20260101T000000Z/mirror/primary/bundle.json".as_ref(),
            "primary/old.json",
        );
        link("bundle.json".as_ref(), "primary/alias.json");
        for name in ["with space.json", "caf\u{e9}.json", "50%.json"] {
            std::fs::write(mirror.join("primary").join(name), name).expect("write odd name");
        }
        let users = htpasswd_line(&["-B", "-C", "5"], "alice", "secret");
        std::fs::write(dir.path().join("users.htpasswd"), users).expect("write htpasswd");
        let mut config = BASE_CONFIG.to_string();
        config.push_str(&domain("open", "127.0.0.1", ""));
        let auth = "\n[[domains.locked.plugins]]\nname = \"htpasswd\"\nfile = \"users.htpasswd\"\n";
        config.push_str(&domain("locked", "locked.test", auth));
        let gateway = TestGateway::start(dir.path(), &config);
        Self { gateway, _dir: dir }
    }

    async fn open(&self, target: &str) -> common::RawResponse {
        raw_get(self.gateway.addr, target, &[]).await
    }

    async fn locked(&self, target: &str, authorization: Option<&str>) -> common::RawResponse {
        let mut headers = vec![("Host", "locked.test")];
        if let Some(value) = authorization {
            headers.push(("Authorization", value));
        }
        raw_get(self.gateway.addr, target, &headers).await
    }
}

/// Returns the TOML of a domain serving the export tree, with `extra_plugins` before `ttl`.
fn domain(id: &str, host: &str, extra_plugins: &str) -> String {
    format!(
        r#"
[domains.{id}]
hosts = ["{host}"]
[domains.{id}.origins.tree]
kind = "export_tree"
root = "concelier"
[[domains.{id}.routes]]
prefix = "/concelier/exports/index.json"
origin = "tree"
origin_path = "/mirror/index.json"
[[domains.{id}.routes]]
prefix = "/concelier/exports/mirror/"
origin = "tree"
origin_path = "/mirror/"
{extra_plugins}
[[domains.{id}.plugins]]
name = "ttl"
[[domains.{id}.plugins.rules]]
pattern = "/concelier/exports/index.json"
ttl_secs = 60
cache_control = "public, max-age=60"
[[domains.{id}.plugins.rules]]
pattern = "/concelier/exports/mirror/**"
ttl_secs = 300
cache_control = "public, max-age=300, immutable"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_never_leaks() {
    let fx = Fixture::start();
    let targets = [
        "/concelier/exports/mirror/../../../../secret.txt",
        "/concelier/exports/mirror/primary/../../../../../../../secret.txt",
        "/concelier/exports/mirror/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/concelier/exports/mirror/%2E%2e/%2E%2e/%2E%2e/%2E%2e/%2E%2e/secret.txt",
        "/concelier/exports/mirror/primary/%2E%2e/%2E%2e/%2E%2e/%2E%2e/%2E%2e/secret.txt",
        "/concelier/exports/mirror/..%2f..%2f..%2f..%2fsecret.txt",
        "/concelier/exports/mirror/..%2F..%2F..%2F..%2Fsecret.txt",
        "/concelier/exports/mirror/%2f..%2f..%2f..%2fsecret.txt",
        "/concelier/exports/mirror/%252e%252e/%252e%252e/%252e%252e/%252e%252e/secret.txt",
        "/concelier/exports/mirror/%252e%252e%252f%252e%252e%252fsecret.txt",
        "/concelier/exports/mirror/..\\..\\..\\..\\secret.txt",
        "/concelier/exports/mirror/..%5c..%5c..%5c..%5csecret.txt",
        "/concelier/exports/mirror/primary/bundle.json%00/../../../../../secret.txt",
        "/concelier/exports/mirror/secret.txt%00.json",
        "/concelier/exports/mirror/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
        "/concelier/exports/mirror/%c0%ae%c0%ae/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/secret.txt",
        "/concelier/exports/mirror/outside/secret.txt",
        "/concelier/exports/mirror/outside/concelier/20260101T000000Z/mirror/index.json",
    ];
    for target in targets {
        let resp = fx.open(target).await;
        assert!(
            resp.status == 400 || resp.status == 404,
            "{target}: status {}",
            resp.status
        );
        assert!(!resp.text().contains(SECRET), "{target} leaked the secret");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn symlink_out_of_export_404() {
    let fx = Fixture::start();
    let leak = fx.open("/concelier/exports/mirror/primary/leak.json").await;
    assert_eq!(leak.status, 404);
    assert!(!leak.text().contains(SECRET));
    let old = fx.open("/concelier/exports/mirror/primary/old.json").await;
    assert_eq!(old.status, 404);
    assert!(
        !old.text().contains("20260101T000000Z"),
        "old export leaked"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn symlink_inside_export_served() {
    let fx = Fixture::start();
    let alias = fx
        .open("/concelier/exports/mirror/primary/alias.json")
        .await;
    assert_eq!(alias.status, 200);
    assert_eq!(alias.text(), format!("{{\"bundle\":\"{NEW}\"}}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_404() {
    let fx = Fixture::start();
    for target in [
        "/concelier/exports/mirror/",
        "/concelier/exports/mirror/primary",
        "/concelier/exports/mirror/primary/",
        "/concelier/exports/mirror/outside",
    ] {
        let resp = fx.open(target).await;
        assert_eq!(resp.status, 404, "{target}");
        let body = resp.text();
        assert!(
            !body.contains("bundle.json"),
            "{target} listed the directory"
        );
        assert!(
            !body.contains("secret.txt"),
            "{target} listed the directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_spellings_need_auth() {
    let fx = Fixture::start();
    for target in ODD_INDEX_SPELLINGS {
        let resp = fx.locked(target, None).await;
        assert_eq!(resp.status, 401, "{target}");
        assert!(!resp.text().contains("exportId"), "{target} leaked content");
    }
    let bundle = fx
        .locked("/concelier/exports/mirror/primary/%62undle.json", None)
        .await;
    assert_eq!(bundle.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_spellings_share_entry() {
    let fx = Fixture::start();
    let auth = basic("alice", "secret");
    for (i, target) in ODD_INDEX_SPELLINGS.iter().enumerate() {
        let resp = fx.locked(target, Some(&auth)).await;
        assert_eq!(resp.status, 200, "{target}");
        assert_eq!(resp.text(), INDEX_BODY, "{target}");
        let expected = if i == 0 { "MISS" } else { "HIT" };
        assert_eq!(resp.header("x-cache-status"), Some(expected), "{target}");
    }
    let canonical = fx
        .locked("/concelier/exports/index.json", Some(&auth))
        .await;
    assert_eq!(canonical.header("x-cache-status"), Some("HIT"));
}

/// Spellings of `/concelier/exports/index.json` that normalise to it.
const ODD_INDEX_SPELLINGS: [&str; 6] = [
    "//concelier//exports/./index.json",
    "/concelier/exports/mirror/../index.json",
    "/concelier/exports/mirror/primary/../../index.json",
    "/concelier/%2e/exports/index.json",
    "/concelier/exports/mirror/%2E%2E/index.json",
    "/concelier/exports/%69ndex.json",
];

#[tokio::test(flavor = "multi_thread")]
async fn names_needing_escapes_served() {
    let fx = Fixture::start();
    let cases = [
        (
            "/concelier/exports/mirror/primary/with%20space.json",
            "with space.json",
        ),
        (
            "/concelier/exports/mirror/primary/caf%C3%A9.json",
            "caf\u{e9}.json",
        ),
        ("/concelier/exports/mirror/primary/50%25.json", "50%.json"),
    ];
    for (target, body) in cases {
        let response = fx.open(target).await;
        assert_eq!(response.status, 200, "{target}");
        assert_eq!(response.text(), body, "{target}");
    }
}
