//! End-to-end in a real browser: headless Chromium loads `/status` with the admin credentials
//! in the URL and must show each domain's request count from `/status.json`.
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium`, installed by scripts/setup-debian.sh).
//! `STATUS_PAGE_SCREENSHOT=docs/status-page.png cargo test --test status_page` also saves the
//! screenshot there.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{basic, client, htpasswd_line, raw_get, Reply, TestGateway, TestOrigin, BASE_CONFIG};

const CHROMIUM: &str = "/usr/bin/chromium";
const USER: &str = "admin";
const PASSWORD: &str = "admin-pass";
/// Maximum time a Chromium run may take before the test kills it.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn status_page_shows_domains() {
    require_chromium();
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, admin) = start(dir.path(), origin.addr).await;
    let traffic = [
        ("127.0.0.1", "/a", 5, 200),
        ("127.0.0.1", "/missing", 2, 404),
        ("community.test", "/b", 3, 200),
        ("down.test", "/c", 1, 502),
    ];
    for (host, path, count, status) in traffic {
        for _ in 0..count {
            let resp = raw_get(gateway.addr, path, &[("host", host)]).await;
            assert_eq!(resp.status, status, "{host}{path}");
        }
    }
    let url = format!("http://{USER}:{PASSWORD}@{admin}/status");
    let dom = run_chromium(dir.path(), &["--dump-dom".to_string(), url.clone()]);
    let requests = |domain| cell(&dom, domain, "requests");
    assert_eq!(requests("primary").as_deref(), Some("7"), "{dom}");
    assert_eq!(requests("community").as_deref(), Some("3"), "{dom}");
    let quota = cell(&dom, "community", "quota").unwrap_or_default();
    assert!(quota.starts_with("index: 3 of 50"), "{dom}");
    let unmetered = cell(&dom, "primary", "quota");
    assert_eq!(unmetered.as_deref(), Some("not configured"), "{dom}");
    let origin_cell = cell(&dom, "down", "origin");
    assert!(
        origin_cell.is_some_and(|text| text.starts_with("errors: 1 ")),
        "{dom}"
    );
    assert!(
        dom.contains(">live<"),
        "the page did not load /status.json:\n{dom}"
    );

    let png = dir.path().join("status.png");
    let args = [
        format!("--screenshot={}", png.display()),
        "--window-size=1200,800".to_string(),
        url,
    ];
    run_chromium(dir.path(), &args);
    let image = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(image.starts_with(b"\x89PNG"), "not a PNG");
    if let Some(target) = std::env::var_os("STATUS_PAGE_SCREENSHOT") {
        std::fs::write(&target, &image).expect("write STATUS_PAGE_SCREENSHOT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_is_self_contained() {
    let origin = TestOrigin::start(origin_reply).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gateway, admin) = start(dir.path(), origin.addr).await;
    let resp = client()
        .get(format!("http://{admin}/status"))
        .header("authorization", basic(USER, PASSWORD))
        .send()
        .await
        .expect("status page");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers().get("content-type").cloned();
    assert_eq!(
        content_type.as_ref().and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    let html = resp.text().await.expect("body");
    for external in ["http://", "https://", "src=", "href="] {
        assert!(!html.contains(external), "the page refers to {external}");
    }
}

/// Fails the test with instructions when Chromium is missing.
fn require_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} not found: this test needs a real browser; install Debian's `chromium` \
         package (scripts/setup-debian.sh installs it)"
    );
}

/// Runs headless Chromium with a fresh profile under `dir` and `args`; returns its standard
/// output. Panics when it fails or runs past [`BROWSER_TIMEOUT`].
fn run_chromium(dir: &Path, args: &[String]) -> String {
    let profile = tempfile::tempdir_in(dir).expect("profile dir");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    while child.try_wait().expect("chromium status").is_none() {
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium ran longer than {BROWSER_TIMEOUT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("chromium output");
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Returns the text (tags removed) of the cell of class `class` in the row of `domain`, in
/// dumped DOM.
fn cell(dom: &str, domain: &str, class: &str) -> Option<String> {
    let row_start = dom.find(&format!("<tr data-domain=\"{domain}\">"))?;
    let row = &dom[row_start..];
    let row = &row[..row.find("</tr>")?];
    let start = row.find(&format!("<td class=\"{class} "))?;
    let cell = &row[start..];
    let cell = &cell[cell.find('>')? + 1..cell.find("</td>")?];
    let mut text = String::new();
    let mut in_tag = false;
    for c in cell.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    Some(text)
}

/// Answers `/missing` with 404 and anything else with a cacheable 200.
fn origin_reply(req: &common::Recorded) -> Reply {
    let mut reply = Reply::ok(&format!("body of {}", req.target));
    if req.target == "/missing" {
        reply.status = 404;
        reply.headers.clear();
    }
    reply
}

/// Starts a gateway with an admin listener and the domains `primary` (host `127.0.0.1`) and
/// `community` (`community.test`, with a `quota` plugin counting `/b` as an index request) in
/// front of `origin`, and `down` (`down.test`) in front of a port where nothing listens.
async fn start(dir: &Path, origin: SocketAddr) -> (TestGateway, SocketAddr) {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .and_then(|l| l.local_addr())
        .expect("free port");
    let line = htpasswd_line(&["-B", "-C", "5"], USER, PASSWORD);
    std::fs::write(dir.join("admin.htpasswd"), line + "\n").expect("write");
    let mut config = format!(
        "{BASE_CONFIG}\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
        dir.join("admin.htpasswd").display()
    );
    let domains = [
        ("primary", "127.0.0.1", origin),
        ("community", "community.test", origin),
        ("down", "down.test", closed),
    ];
    for (id, host, origin) in domains {
        config.push_str(&format!(
            "[domains.{id}]\nhosts = [\"{host}\"]\n[domains.{id}.origins.web]\nkind = \"http\"\naddresses = [\"{origin}\"]\n[[domains.{id}.routes]]\nprefix = \"/\"\norigin = \"web\"\n"
        ));
    }
    config.push_str(
        "[[domains.community.plugins]]\nname = \"quota\"\nindex_per_hour = 100\n\
         download_per_hour = 100\ndomain_index_per_hour = 50\nindex_paths = [\"/b\"]\n",
    );
    let gateway = TestGateway::start(dir, &config);
    let admin = gateway.running.admin_addr().expect("admin listener");
    (gateway, admin)
}
