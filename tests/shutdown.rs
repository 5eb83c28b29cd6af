//! End-to-end: SIGTERM lets a slow download of a large bundle finish within the grace period,
//! then the process exits. A download still running when the grace period ends is cut.

mod common;

use std::time::{Duration, Instant};

use common::{client, read_response, spawn_gateway, Reply, TestOrigin, BASE_CONFIG};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const BODY: usize = 4 << 20;
const CHUNK: usize = 256 * 1024;

/// Starts an origin that sends `BODY` bytes in 16 pieces of `CHUNK`, `pause` apart.
async fn slow_origin(pause: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\ncache-control: max-age=60\r\n\r\n");
                let stream = reader.get_mut();
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b'b'; CHUNK];
                for _ in 0..BODY / CHUNK {
                    tokio::time::sleep(pause).await;
                    if stream.write_all(&piece).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Starts the gateway in front of `origin` with the two shutdown settings, requests the
/// bundle, reads its first chunk and sends SIGTERM. Returns the gateway's process, the
/// response being read and the bytes received so far.
async fn download_then_sigterm(
    origin: std::net::SocketAddr,
    dir: &std::path::Path,
    grace_period_secs: u64,
    shutdown_timeout_secs: u64,
) -> (std::process::Child, reqwest::Response, usize) {
    let base = BASE_CONFIG
        .replace(
            "grace_period_secs = 0",
            &format!("grace_period_secs = {grace_period_secs}"),
        )
        .replace(
            "shutdown_timeout_secs = 1",
            &format!("shutdown_timeout_secs = {shutdown_timeout_secs}"),
        )
        .replace("level = \"warn\"", "level = \"info\"");
    let config = format!(
        r#"{base}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
"#
    );
    std::fs::write(dir.join("gateway.toml"), config).expect("write config");
    let (child, addr) = spawn_gateway(dir);

    let mut response = client()
        .get(format!("http://{addr}/bundle.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let first = response
        .chunk()
        .await
        .expect("first chunk")
        .map_or(0, |c| c.len());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    (child, response, first)
}

/// Waits up to 20 seconds for the gateway to exit and returns its exit status.
fn wait_for_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("poll the gateway") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads the rest of a download that goes on during the drain; returns its whole length,
/// `first` bytes having been read already.
async fn read_rest(response: &mut reqwest::Response, first: usize) -> usize {
    let mut received = first;
    while let Some(chunk) = response
        .chunk()
        .await
        .expect("the download goes on during the drain")
    {
        received += chunk.len();
    }
    received
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_download() {
    // About 0.8 s in all, within the grace period of 5 s.
    let origin = slow_origin(Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, mut response, first) = download_then_sigterm(origin, dir.path(), 5, 1).await;
    assert_eq!(read_rest(&mut response, first).await, BODY);

    let status = wait_for_exit(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// Pingora 0.9.1 shuts its runtimes down when the grace period ends, which cancels the
/// requests still running: `shutdown_timeout_secs` gives them no more time.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cuts_download_after_grace() {
    // About 3.2 s in all: longer than the grace period of 1 s, shorter than 1 s + 5 s.
    let origin = slow_origin(Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, mut response, first) = download_then_sigterm(origin, dir.path(), 1, 5).await;
    let signalled = Instant::now();
    let mut received = first;
    let outcome = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let elapsed = signalled.elapsed();
    assert!(
        outcome.is_err(),
        "the download finished ({received} bytes) {elapsed:?} after SIGTERM"
    );
    assert!(received < BODY, "{received} bytes");

    let status = wait_for_exit(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// The process exits once the last download ends, long before a grace period of 30 s: Pingora
/// 0.9.1 alone would sleep through all of it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_once_idle() {
    let origin = slow_origin(Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, mut response, first) = download_then_sigterm(origin, dir.path(), 30, 1).await;
    let signalled = Instant::now();
    assert_eq!(read_rest(&mut response, first).await, BODY);
    // The client keeps its connection for reuse; the gateway closes it, being shut down.

    let status = wait_for_exit(&mut child);
    let elapsed = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "exited {elapsed:?} after SIGTERM"
    );
}

/// A response to a request that was in flight when the shutdown began carries
/// `Connection: close`, so that the client does not send its next request on a connection
/// that is about to close.
#[tokio::test(flavor = "multi_thread")]
async fn response_during_drain_closes() {
    let origin = TestOrigin::start(|_| Reply {
        delay: Duration::from_millis(1500),
        ..Reply::ok("late")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = BASE_CONFIG
        .replace("grace_period_secs = 0", "grace_period_secs = 10")
        .replace("level = \"warn\"", "level = \"info\"");
    let domain = common::http_domain("primary", &["127.0.0.1"], origin.addr);
    std::fs::write(dir.path().join("gateway.toml"), format!("{base}\n{domain}"))
        .expect("write config");
    let (mut child, addr) = spawn_gateway(dir.path());

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /late HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    // SIGTERM while the gateway waits for the origin's response header.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let mut reader = tokio::io::BufReader::new(stream);
    let response = read_response(&mut reader, false).await.expect("response");
    assert_eq!((response.status, response.text()), (200, "late".to_owned()));
    assert_eq!(response.header("connection"), Some("close"));

    let status = wait_for_exit(&mut child);
    assert!(status.success(), "exit status {status:?}");
}
