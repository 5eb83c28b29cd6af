//! End-to-end: the `htpasswd` plugin guarding a domain, with files made by the real tool.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{basic, client, htpasswd_line, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use reqwest::header::HeaderValue;

const REALM: &str = "test-realm";
const PATH: &str = "/concelier/exports/index.json";
/// `openssl passwd -6 -salt saltsalt pw-six`: SHA-512 crypt, which the plugin rejects.
const SHA512_CRYPT: &str =
    "$6$saltsalt$aiGsNchNt20dQRa.SYtRIpCj84VO0OCCMtDuLLvxvVeJdShmqO1nkEBbj68x9arT/fklSflOWSIZbcCd8Oq6i1";

/// A running gateway guarding an HTTP origin with `users.htpasswd`.
struct Fixture {
    origin: TestOrigin,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Writes `htpasswd` to the domain's file and starts the origin and the gateway.
    async fn start(htpasswd: &str) -> Self {
        let origin = TestOrigin::start(|req| Reply::ok(&format!("body of {}", req.target))).await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("users.htpasswd"), htpasswd).expect("write htpasswd");
        let config = format!(
            r#"{BASE_CONFIG}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{}"]
host = "concelier.internal"
[[domains.primary.routes]]
prefix = "/"
origin = "web"
[[domains.primary.plugins]]
name = "htpasswd"
file = "users.htpasswd"
realm = "{REALM}"
cache_ttl_secs = 60
cache_entries = 100
reload_check_ms = 50
"#,
            origin.addr
        );
        let gateway = TestGateway::start(dir.path(), &config);
        Self {
            origin,
            gateway,
            _dir: dir,
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.gateway.dir.join("users.htpasswd")
    }

    /// Returns the status of a GET of [`PATH`] as `user` with `password`.
    async fn login(&self, user: &str, password: &str) -> u16 {
        let value = basic(user, password);
        self.status(PATH, Some(value.as_bytes())).await
    }

    /// Returns the status of a GET of `path` with `authorization`, if any.
    async fn status(&self, path: &str, authorization: Option<&[u8]>) -> u16 {
        self.get(path, authorization).await.status().as_u16()
    }

    async fn get(&self, path: &str, authorization: Option<&[u8]>) -> reqwest::Response {
        let mut request = client().get(self.gateway.url(path));
        if let Some(value) = authorization {
            let value = HeaderValue::from_bytes(value).expect("header value");
            request = request.header("authorization", value);
        }
        request.send().await.expect("request")
    }
}

fn bcrypt(user: &str, password: &str) -> String {
    htpasswd_line(&["-B", "-C", "5"], user, password)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credentials_challenged() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    let resp = fx.get(PATH, None).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert!(
        challenge.starts_with(&format!("Basic realm=\"{REALM}\"")),
        "challenge {challenge:?}"
    );
    assert_eq!(resp.headers()["x-cache-status"], "BYPASS");
    assert_eq!(fx.origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_user_rejected() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    assert_eq!(fx.login("mallory", "secret").await, 401);
    assert_eq!(fx.origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_rejected() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    assert_eq!(fx.login("alice", "Secret").await, 401);
    assert_eq!(fx.login("alice", "").await, 401);
    assert_eq!(fx.origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_hash_format_logs_in() {
    let file = [
        bcrypt("bob", "pw-bcrypt"),
        htpasswd_line(&["-m"], "amy", "pw-apr1"),
        htpasswd_line(&["-s"], "sam", "pw-sha"),
    ]
    .join("\n");
    let fx = Fixture::start(&file).await;
    for (user, password) in [("bob", "pw-bcrypt"), ("amy", "pw-apr1"), ("sam", "pw-sha")] {
        let ok = fx.get(PATH, Some(basic(user, password).as_bytes())).await;
        assert_eq!(ok.status(), 200, "user {user}");
        assert_eq!(ok.text().await.expect("body"), format!("body of {PATH}"));
        assert_eq!(
            fx.login(user, "nope").await,
            401,
            "user {user} with a wrong password"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn handmade_lines_parsed() {
    let file = format!(
        "# comment line\r\n\r\n   \r\n{}\r\nplain:pw-plain\r\nsix:{SHA512_CRYPT}\r\n# last\r\n",
        htpasswd_line(&["-s"], "sam", "pw-sha")
    );
    let fx = Fixture::start(&file).await;
    assert_eq!(fx.login("sam", "pw-sha").await, 200);
    assert_eq!(fx.login("plain", "pw-plain").await, 401);
    assert_eq!(fx.login("six", "pw-six").await, 401);
    assert_eq!(fx.login("six", SHA512_CRYPT).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_user_first_wins() {
    let file = [
        format!("  {}  ", htpasswd_line(&["-s"], "sam", "first")),
        htpasswd_line(&["-s"], "sam", "second"),
    ]
    .join("\n");
    let fx = Fixture::start(&file).await;
    assert_eq!(fx.login("sam", "first").await, 200);
    assert_eq!(fx.login("sam", "second").await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_headers_get_401() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("scheme alone", b"Basic".to_vec()),
        ("scheme and blank", b"Basic   ".to_vec()),
        ("not base64", b"Basic !!!".to_vec()),
        (
            "no colon",
            format!("Basic {}", b64(b"alicesecret")).into_bytes(),
        ),
        ("bearer", b"Bearer x".to_vec()),
        (
            "invalid UTF-8",
            format!("Basic {}", b64(b"alice:\xff\xfe")).into_bytes(),
        ),
        (
            "invalid UTF-8 user",
            format!("Basic {}", b64(b"\xc3(:secret")).into_bytes(),
        ),
        ("raw high bytes", b"Basic \xff\xfe\xfd".to_vec()),
        (
            "7 KB",
            format!("Basic {}", "QUFB".repeat(1750)).into_bytes(),
        ),
    ];
    for (name, value) in cases {
        let status = fx.status(PATH, Some(&value)).await;
        assert_eq!(status, 401, "case {name}");
    }
    // Over the gateway's 8 KiB limit per header field, before any plugin runs.
    let oversized = [
        format!("Basic {}", "QUFB".repeat(2560)),
        format!("{}{}", basic("alice", "secret"), "A".repeat(10_240)),
    ];
    for value in oversized {
        let status = fx.status(PATH, Some(value.as_bytes())).await;
        assert_eq!(status, 431, "{} bytes", value.len());
    }
    assert_eq!(fx.origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_authorization_headers_rejected() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    let good = basic("alice", "secret");
    let resp = client()
        .get(fx.gateway.url(PATH))
        .header("authorization", &good)
        .header("authorization", &good)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn scheme_case_insensitive() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    let token = basic("alice", "secret");
    let token = token.trim_start_matches("Basic ");
    for scheme in ["basic", "BASIC", "bAsIc"] {
        let value = format!("{scheme} {token}");
        let status = fx.status(PATH, Some(value.as_bytes())).await;
        assert_eq!(status, 200, "scheme {scheme}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn password_with_colon() {
    let fx = Fixture::start(&bcrypt("carol", "a:b:c")).await;
    assert_eq!(fx.login("carol", "a:b:c").await, 200);
    assert_eq!(fx.login("carol", "a").await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn utf8_password() {
    let fx = Fixture::start(&bcrypt("dora", "pässwörd")).await;
    assert_eq!(fx.login("dora", "pässwörd").await, 200);
    assert_eq!(fx.login("dora", "passwoerd").await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_object_still_needs_auth() {
    let file = [bcrypt("alice", "pw-a"), bcrypt("bob", "pw-b")].join("\n");
    let fx = Fixture::start(&file).await;
    let first = fx.get(PATH, Some(basic("alice", "pw-a").as_bytes())).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache-status"], "MISS");

    let second = fx.get(PATH, Some(basic("bob", "pw-b").as_bytes())).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-cache-status"], "HIT");
    assert_eq!(
        second.text().await.expect("body"),
        format!("body of {PATH}")
    );

    let anonymous = fx.get(PATH, None).await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["x-cache-status"], "BYPASS");
    let body = anonymous.text().await.expect("body");
    assert!(!body.contains("body of"), "401 leaked the cached body");

    assert_eq!(fx.login("bob", "pw-a").await, 401);
    assert_eq!(fx.origin.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_rewrite_applies() {
    let fx = Fixture::start(&bcrypt("alice", "old-pw")).await;
    let old = basic("alice", "old-pw");
    let new = basic("alice", "new-pw");
    assert_eq!(fx.status(PATH, Some(old.as_bytes())).await, 200);
    assert_eq!(fx.status(PATH, Some(new.as_bytes())).await, 401);

    std::fs::write(fx.file(), bcrypt("alice", "new-pw")).expect("rewrite htpasswd");
    let switched = poll_until(Duration::from_millis(1500), || async {
        fx.status(PATH, Some(new.as_bytes())).await == 200
            && fx.status(PATH, Some(old.as_bytes())).await == 401
    })
    .await;
    assert!(
        switched,
        "new password not accepted or old one not rejected"
    );
    assert_eq!(fx.status(PATH, Some(old.as_bytes())).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_replaced_by_rename() {
    let fx = Fixture::start(&bcrypt("alice", "old-pw")).await;
    let old = basic("alice", "old-pw");
    let new = basic("erin", "erin-pw");
    assert_eq!(fx.status(PATH, Some(old.as_bytes())).await, 200);

    let staged = fx.gateway.dir.join("users.htpasswd.tmp");
    std::fs::write(&staged, bcrypt("erin", "erin-pw")).expect("write staged file");
    std::fs::rename(&staged, fx.file()).expect("rename over htpasswd");
    let switched = poll_until(Duration::from_millis(1500), || async {
        fx.status(PATH, Some(new.as_bytes())).await == 200
            && fx.status(PATH, Some(old.as_bytes())).await == 401
    })
    .await;
    assert!(switched, "renamed-in file not picked up");
}

#[tokio::test(flavor = "multi_thread")]
async fn file_deleted_keeps_users() {
    let fx = Fixture::start(&bcrypt("alice", "secret")).await;
    let good = basic("alice", "secret");
    assert_eq!(fx.status(PATH, Some(good.as_bytes())).await, 200);
    std::fs::remove_file(fx.file()).expect("delete htpasswd");
    // Spans several `reload_check_ms` periods, so the plugin notices the file is gone.
    let deadline = Instant::now() + Duration::from_millis(400);
    while Instant::now() < deadline {
        assert_eq!(fx.status(PATH, Some(good.as_bytes())).await, 200);
        assert_eq!(fx.status(PATH, None).await, 401);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(fx.login("alice", "nope").await, 401);
}

/// Calls `check` every 25 ms until it returns true or `limit` passes, and returns whether it did.
async fn poll_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
