//! HTTP/1.1 pipelining: requests that a client sends ahead on one connection are served in order.

mod common;

use std::time::Duration;

use common::{closed, http_domain, read_response, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Starts an origin whose response body names the request target. It responds to `/slow`
/// after 300 ms and to `/missing` with 404.
async fn origin() -> TestOrigin {
    TestOrigin::start(|request| {
        let mut reply = Reply::ok(&format!("body of {}", request.target));
        if request.target == "/slow" {
            reply.delay = Duration::from_millis(300);
        }
        if request.target == "/missing" {
            reply.status = 404;
        }
        reply
    })
    .await
}

fn config(origin: &TestOrigin, server_keys: &str) -> String {
    let base = BASE_CONFIG.replace("[server]\n", &format!("[server]\n{server_keys}\n"));
    format!(
        "{base}\n{}",
        http_domain("primary", &["127.0.0.1"], origin.addr)
    )
}

/// Starts the origin of [`origin`] and a gateway in front of it, with the lines `server_keys`
/// added to `[server]`. The directory holds the gateway's files until it is dropped.
async fn start(server_keys: &str) -> (TestOrigin, tempfile::TempDir, TestGateway) {
    let origin = origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(&origin, server_keys));
    (origin, dir, gateway)
}

fn get(method: &str, target: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_served_in_order() {
    let (origin, _dir, gateway) = start("").await;

    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let requests = [
        ("GET", "/slow"),
        ("GET", "/a"),
        ("HEAD", "/a"),
        ("GET", "/missing"),
        ("GET", "/a"),
    ];
    let batch: String = requests.iter().map(|(m, t)| get(m, t)).collect();
    stream.write_all(batch.as_bytes()).await.expect("send");
    let mut reader = BufReader::new(stream);

    let mut answers = Vec::new();
    for (method, _) in requests {
        let response = read_response(&mut reader, method == "HEAD")
            .await
            .expect("a response to every pipelined request");
        answers.push((response.status, response.text()));
    }
    let expected = [
        (200, "body of /slow"),
        (200, "body of /a"),
        (200, ""),
        (404, "body of /missing"),
        (200, "body of /a"),
    ];
    let expected: Vec<(u16, String)> = expected
        .iter()
        .map(|(status, body)| (*status, body.to_string()))
        .collect();
    assert_eq!(answers, expected);
    // One request at a time: `/a` reached the origin only after `/slow` was served, and the
    // later requests for `/a` were served from the cache.
    let targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/slow", "/a", "/missing"]);

    // The connection stays open for the next request.
    reader
        .get_mut()
        .write_all(get("GET", "/b").as_bytes())
        .await
        .expect("send after the batch");
    let last = read_response(&mut reader, false).await.expect("response");
    assert_eq!((last.status, last.text()), (200, "body of /b".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_during_slow_miss_served() {
    let (_origin, _dir, gateway) = start("").await;

    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream
        .write_all(get("GET", "/slow").as_bytes())
        .await
        .expect("send first");
    // The second request arrives while the gateway waits for the origin's response to the first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(get("GET", "/a").as_bytes())
        .await
        .expect("send second");
    let mut reader = BufReader::new(stream);
    let first = read_response(&mut reader, false).await.expect("first");
    let second = read_response(&mut reader, false).await.expect("second");
    assert_eq!(
        (first.status, first.text()),
        (200, "body of /slow".to_owned())
    );
    assert_eq!(
        (second.status, second.text()),
        (200, "body of /a".to_owned())
    );
    assert_eq!(second.header("connection"), Some("keep-alive"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_after_rejected_body_unread() {
    let (origin, _dir, gateway) = start("").await;

    // Request smuggling relies on a server that parses bytes after a body of disputed length.
    // The gateway rejects the body and reads nothing after it.
    let batch = format!(
        "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nabcde{}",
        get("GET", "/b")
    );
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(batch.as_bytes()).await.expect("send");
    let mut reader = BufReader::new(stream);
    let rejected = read_response(&mut reader, false).await.expect("response");
    assert_eq!(rejected.status, 400);
    assert_eq!(rejected.header("connection"), Some("close"));
    assert!(closed(&mut reader).await, "connection closed after the 400");
    assert_eq!(origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelining_off_closes_after_first() {
    let (origin, _dir, gateway) = start("pipelining = false").await;

    let batch = format!("{}{}", get("GET", "/a"), get("GET", "/b"));
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(batch.as_bytes()).await.expect("send");
    let mut reader = BufReader::new(stream);
    let first = read_response(&mut reader, false).await.expect("first");
    assert_eq!((first.status, first.text()), (200, "body of /a".to_owned()));
    assert!(
        closed(&mut reader).await,
        "connection closed, second request dropped"
    );
    assert_eq!(origin.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn half_closed_client_still_served() {
    let (_origin, _dir, gateway) = start("").await;

    // A request that misses and waits for the origin, then the end of the client's sending side.
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream
        .write_all(get("GET", "/slow").as_bytes())
        .await
        .expect("send");
    stream.shutdown().await.expect("shut down the sending side");
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, false).await.expect("response");
    assert_eq!(
        (response.status, response.text()),
        (200, "body of /slow".to_owned())
    );
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        closed(&mut reader).await,
        "connection closed after the response"
    );
}

/// Requests sent ahead, then the end of the client's sending side. Pingora reads the end of
/// the stream while the first request waits for the origin and turns keep-alive off. So only
/// the first is served, marked `Connection: close`, and the client must send the rest again.
#[tokio::test(flavor = "multi_thread")]
async fn half_closed_batch_served_first() {
    let (_origin, _dir, gateway) = start("").await;

    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let batch = format!("{}{}", get("GET", "/a"), get("GET", "/b"));
    stream.write_all(batch.as_bytes()).await.expect("send");
    stream.shutdown().await.expect("shut down the sending side");
    let mut reader = BufReader::new(stream);
    let first = read_response(&mut reader, false).await.expect("first");
    assert_eq!((first.status, first.text()), (200, "body of /a".to_owned()));
    assert_eq!(first.header("connection"), Some("close"));
    assert!(
        closed(&mut reader).await,
        "connection closed after the first"
    );
}
