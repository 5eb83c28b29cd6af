//! Drives the `htpasswd` plugin with files made by Apache's `htpasswd` tool (apache2-utils).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use mirror_plugins::htpasswd::{Htpasswd, ReloadOutcome};
use mirror_plugins::{build_plugin, BuildContext, Plugin, RequestInfo, RequestState, Verdict};

const TOOL: &str = "/usr/bin/htpasswd";

/// A temporary directory holding one htpasswd file.
struct Users {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Users {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("htpasswd");
        Self { dir, path }
    }

    /// Adds or updates `user` with the tool; `format` is its hash flag (`-B`, `-m`, ...).
    fn set(&self, format: &[&str], user: &str, password: &str) -> &Self {
        let mut args = vec![if self.path.exists() { "-b" } else { "-cb" }];
        args.extend_from_slice(format);
        let path = self.path.to_str().expect("UTF-8 temp path");
        args.extend_from_slice(&[path, user, password]);
        let output = Command::new(TOOL)
            .args(&args)
            .output()
            .expect("run htpasswd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "htpasswd {args:?}: {stderr}");
        self
    }

    fn plugin(&self, extra: &str) -> Htpasswd {
        let settings = format!("file = \"htpasswd\"\nreload_check_ms = 0\n{extra}");
        let table = settings.parse::<toml::Table>().expect("valid TOML");
        Htpasswd::new(toml::Value::Table(table), &context(self.dir.path())).expect("plugin")
    }
}

fn context(dir: &Path) -> BuildContext<'_> {
    BuildContext {
        domain: "mirror-primary",
        config_dir: dir,
    }
}

/// Tells whether the tool is installed, saying so when it is not.
fn tool_present() -> bool {
    let present = Path::new(TOOL).exists();
    if !present {
        eprintln!("SKIPPED: {TOOL} is absent; install apache2-utils to run this test");
    }
    present
}

/// Sends one request with Basic credentials through `request_filter`; returns the accepted
/// user, or `None` after checking that the answer is a proper 401 challenge.
async fn login(plugin: &dyn Plugin, user: &str, password: &str) -> Option<String> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Basic {token}")).expect("header value");
    headers.insert(AUTHORIZATION, value);
    let req = RequestInfo {
        domain: "mirror-primary",
        method: &Method::GET,
        path: "/concelier/exports/index.json",
        query: None,
        headers: &headers,
        client_addr: None,
        received: std::time::Instant::now(),
    };
    let mut state = RequestState::default();
    match plugin.request_filter(&req, &mut state).await {
        Verdict::Continue => state.user,
        Verdict::Respond(resp) => {
            assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
            let challenge = resp
                .headers
                .iter()
                .find(|(name, _)| name == WWW_AUTHENTICATE);
            let expected = "Basic realm=\"Stella Ops mirror\", charset=\"UTF-8\"";
            assert_eq!(
                challenge.map(|(_, v)| v.as_bytes()),
                Some(expected.as_bytes())
            );
            assert_eq!(state.user, None);
            None
        }
    }
}

/// A file with one user per accepted format: bcrypt, apr1 and SHA-1.
fn accepted_formats() -> Users {
    let users = Users::new();
    users
        .set(&["-B", "-C", "5"], "alice", "correct horse")
        .set(&["-m"], "bob", "pa:ss")
        .set(&["-s"], "carol", "s3cret");
    users
}

#[tokio::test]
async fn tool_bcrypt_accepted() {
    if !tool_present() {
        return;
    }
    let p = accepted_formats().plugin("");
    let user = login(&p, "alice", "correct horse").await;
    assert_eq!(user.as_deref(), Some("alice"));
}

#[tokio::test]
async fn tool_apr1_accepted() {
    if !tool_present() {
        return;
    }
    let p = accepted_formats().plugin("");
    assert_eq!(login(&p, "bob", "pa:ss").await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn tool_sha_accepted() {
    if !tool_present() {
        return;
    }
    let p = accepted_formats().plugin("");
    assert_eq!(login(&p, "carol", "s3cret").await.as_deref(), Some("carol"));
}

#[tokio::test]
async fn tool_wrong_passwords_rejected() {
    if !tool_present() {
        return;
    }
    let p = accepted_formats().plugin("");
    assert_eq!(login(&p, "alice", "correct horsE").await, None);
    assert_eq!(login(&p, "bob", "pa").await, None);
    assert_eq!(login(&p, "carol", "s3cret ").await, None);
}

#[tokio::test]
async fn tool_unknown_user_rejected() {
    if !tool_present() {
        return;
    }
    let p = accepted_formats().plugin("");
    assert_eq!(login(&p, "mallory", "correct horse").await, None);
}

#[tokio::test]
async fn tool_plain_fails_closed() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    users.set(&["-p"], "dave", "plainpw");
    let p = users.plugin("");
    assert_eq!(login(&p, "dave", "plainpw").await, None);
    assert_eq!(p.user_count(), 3);
}

#[tokio::test]
async fn tool_crypt_fails_closed() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    users.set(&["-d"], "erin", "cryptpw");
    let p = users.plugin("");
    assert_eq!(login(&p, "erin", "cryptpw").await, None);
    assert_eq!(p.user_count(), 3);
}

#[tokio::test]
async fn tool_sha512_crypt_fails_closed() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    users.set(&["-5"], "frank", "sha512pw");
    let p = users.plugin("");
    assert_eq!(login(&p, "frank", "sha512pw").await, None);
}

#[tokio::test]
async fn tool_rewrite_swaps_password() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    let p = users.plugin("");
    assert_eq!(
        login(&p, "alice", "correct horse").await.as_deref(),
        Some("alice")
    );
    users.set(&["-B", "-C", "5"], "alice", "battery staple");
    let new = login(&p, "alice", "battery staple").await;
    assert_eq!(new.as_deref(), Some("alice"));
    assert_eq!(login(&p, "alice", "correct horse").await, None);
}

#[tokio::test]
async fn tool_added_user_accepted() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    let p = users.plugin("");
    assert_eq!(login(&p, "grace", "new user").await, None);
    users.set(&["-B", "-C", "5"], "grace", "new user");
    assert_eq!(
        login(&p, "grace", "new user").await.as_deref(),
        Some("grace")
    );
}

#[tokio::test]
async fn tool_deleted_file_keeps_users() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    let p = users.plugin("cache_ttl_secs = 0");
    std::fs::remove_file(&users.path).expect("remove htpasswd file");
    let outcome = p.check_reload(std::time::Instant::now());
    assert_eq!(outcome, ReloadOutcome::Failed { logged: true });
    let user = login(&p, "alice", "correct horse").await;
    assert_eq!(user.as_deref(), Some("alice"));
}

#[tokio::test]
async fn tool_registry_builds_plugin() {
    if !tool_present() {
        return;
    }
    let users = accepted_formats();
    let table = "file = \"htpasswd\""
        .parse::<toml::Table>()
        .expect("valid TOML");
    let built = build_plugin(
        "htpasswd",
        toml::Value::Table(table),
        &context(users.dir.path()),
    );
    let plugin: Arc<dyn Plugin> = built.expect("plugin");
    let user = login(plugin.as_ref(), "carol", "s3cret").await;
    assert_eq!(user.as_deref(), Some("carol"));
}
