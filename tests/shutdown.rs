//! End-to-end: SIGTERM lets a slow download of a large bundle finish, then the process exits.

mod common;

use std::time::{Duration, Instant};

use common::{client, spawn_gateway, BASE_CONFIG};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const BODY: usize = 4 << 20;
const CHUNK: usize = 256 * 1024;

/// An origin that sends `BODY` bytes in `CHUNK` pieces 50 ms apart (about 0.8 s in all).
async fn slow_origin() -> std::net::SocketAddr {
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if stream.write_all(&piece).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_download() {
    let origin = slow_origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = BASE_CONFIG
        .replace("grace_period_secs = 0", "grace_period_secs = 5")
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
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (mut child, addr) = spawn_gateway(dir.path());

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
    let mut received = first;
    while let Some(chunk) = response
        .chunk()
        .await
        .expect("the download goes on during the drain")
    {
        received += chunk.len();
    }
    assert_eq!(received, BODY);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the gateway") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status:?}");
}
