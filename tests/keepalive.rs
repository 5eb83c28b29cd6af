//! Idle HTTP/1 connections: `server.keepalive_timeout_secs` bounds the wait for the next
//! request, whatever the client asks for.

mod common;

use std::time::{Duration, Instant};

use common::{closed, http_domain, read_response, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn config(origin: &TestOrigin, timeout_secs: u64) -> String {
    let base = BASE_CONFIG.replace(
        "[server]\n",
        &format!("[server]\nkeepalive_timeout_secs = {timeout_secs}\n"),
    );
    format!(
        "{base}\n{}",
        http_domain("primary", &["127.0.0.1"], origin.addr)
    )
}

/// Starts an origin that answers `ok` and a gateway in front of it with
/// `keepalive_timeout_secs = timeout_secs`. The directory holds the gateway's files until it is
/// dropped.
async fn start(timeout_secs: u64) -> (TestOrigin, tempfile::TempDir, TestGateway) {
    let origin = TestOrigin::start(|_| Reply::ok("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(&origin, timeout_secs));
    (origin, dir, gateway)
}

/// Sends `request` on a new connection and reads its response; returns the connection.
async fn exchange(gateway: &TestGateway, request: &str) -> (BufReader<TcpStream>, u16, String) {
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, false).await.expect("a response");
    let connection = response.header("connection").unwrap_or("").to_owned();
    (reader, response.status, connection)
}

/// Returns how long the gateway took to close `reader`'s idle connection.
async fn time_to_close(reader: &mut BufReader<TcpStream>) -> Duration {
    let start = Instant::now();
    assert!(closed(reader).await, "connection closed within 10 s");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connection_closed_after_timeout() {
    let (_origin, _dir, gateway) = start(1).await;

    // The client's own `Keep-Alive: timeout` does not lengthen the wait.
    let request = "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nKeep-Alive: timeout=600\r\n\r\n";
    let (mut reader, status, connection) = exchange(&gateway, request).await;
    assert_eq!(status, 200);
    assert_eq!(connection, "keep-alive");
    let waited = time_to_close(&mut reader).await;
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_next_request_times_out() {
    let (origin, _dir, gateway) = start(1).await;

    // The start of a second request that never ends.
    let request = "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nHo";
    let (mut reader, status, _) = exchange(&gateway, request).await;
    assert_eq!(status, 200);
    let waited = time_to_close(&mut reader).await;
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert_eq!(origin.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_turns_keepalive_off() {
    let (_origin, _dir, gateway) = start(0).await;

    let request = "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let (mut reader, status, connection) = exchange(&gateway, request).await;
    assert_eq!(status, 200);
    assert_eq!(connection, "close");
    let waited = time_to_close(&mut reader).await;
    assert!(waited < Duration::from_secs(1), "closed after {waited:?}");
}
