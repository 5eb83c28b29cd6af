//! End-to-end: how the cache streams fills, rejects broken bodies, serves stale entries and
//! serves ranges.
//!
//! The expiry tests never sleep: they start the gateway with a cache clock
//! (`TestGateway::start_with_clock`) and move it forward past a TTL and into or out of a
//! stale window, one second before and after each edge.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, Recorded, Reply, TestClock, TestGateway, TestOrigin, BASE_CONFIG};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Pause between the body pieces of the slow origins.
const PIECE_GAP: Duration = Duration::from_millis(200);
/// Pause before the origin responds to a background refresh, so that the tests can see stale
/// responses served while it runs.
const REFRESH_DELAY: Duration = Duration::from_millis(500);

/// NOTE: the gateway holds up to 2 KiB of a `Content-Length` response (header included)
/// before writing to the client, so with 1000-byte pieces the first bytes arrive with the
/// second or third piece, well before the fifth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stampede_streams_one_fetch() {
    let pieces = five_pieces();
    let body = pieces.concat();
    let origin = ScriptOrigin::start(move |_, _| Script::pieces(pieces.clone())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/stampede.bin");

    let client = client();
    let clients = (0..20).map(|_| {
        let request = client.get(&url).send();
        async move {
            let mut resp = request.await?;
            let mut first = None;
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                first.get_or_insert_with(Instant::now);
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((first, body))
        }
    });
    let results = futures::future::join_all(clients).await;

    let last_piece = origin
        .last_piece_at()
        .expect("the origin wrote its last piece");
    assert_eq!(origin.count(), 1, "origin requests");
    for (i, result) in results.into_iter().enumerate() {
        let (first, got) = result.unwrap_or_else(|e| panic!("client {i} failed: {e}"));
        assert_eq!(got, body, "client {i} body");
        let first = first.expect("a non-empty body has a first chunk");
        assert!(
            first < last_piece,
            "client {i} got its first bytes {:?} after the origin began its last piece",
            first - last_piece
        );
    }
}

/// The first client leaves after one piece. Pingora keeps the fill going without it, so the
/// clients that joined the fill get the whole body and the entry is stored complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filler_disconnect_keeps_fill() {
    let pieces = five_pieces();
    let body = pieces.concat();
    let origin = ScriptOrigin::start(move |_, _| Script::pieces(pieces.clone())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/filler.bin");

    let mut filler = TcpStream::connect(gateway.addr).await.expect("connect");
    filler
        .write_all(b"GET /filler.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send the filler's request");
    read_first_body_bytes(&mut filler).await;

    // Each waiter has its response header, so it is attached to the fill, before the filler goes.
    let client = client();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(client.get(&url).send().await.expect("waiter header"));
    }
    drop(filler);

    for (i, waiter) in waiters.into_iter().enumerate() {
        let got = waiter.bytes().await;
        assert_eq!(got.expect("waiter body").as_ref(), body, "waiter {i}");
    }

    let after = fetch(&url, &[]).await;
    assert_eq!(after.cache, "HIT");
    assert_eq!(after.body, body, "stored body");
    assert_eq!(origin.count(), 1, "origin requests");
}

/// Large bodies read from the cache go out corked, but not to a client that joins a fill still
/// in progress. There a corked tail would wait for the next piece or for Linux's 200 ms cork
/// ceiling. Each waiter here must get the first piece while the origin still holds back the
/// last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fill_reader_not_corked() {
    let pieces = vec![vec![b'a'; 10_000], vec![b'b'; 70_000]];
    let origin = ScriptOrigin::start(move |_, _| Script {
        gap: Duration::from_secs(5),
        ..Script::pieces(pieces.clone())
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let request = b"GET /large-fill.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    let mut filler = TcpStream::connect(gateway.addr).await.expect("connect");
    filler
        .write_all(request)
        .await
        .expect("send the filler's request");
    read_first_body_bytes(&mut filler).await;

    // The fastest of three waiters, so that one slow scheduling round does not decide.
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let mut waiter = TcpStream::connect(gateway.addr).await.expect("connect");
        let sent = Instant::now();
        waiter
            .write_all(request)
            .await
            .expect("send the waiter's request");
        read_first_body_bytes(&mut waiter).await;
        fastest = fastest.min(sent.elapsed());
    }
    assert!(
        origin.last_piece_at().is_none(),
        "the origin sent its last piece before the waiters were done"
    );
    assert_eq!(origin.count(), 1, "origin requests");
    assert!(
        fastest < Duration::from_millis(150),
        "the fastest waiter got its first body bytes after {fastest:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_death_not_stored() {
    let origin = ScriptOrigin::start(|_, _| Script {
        announced: Some(1000),
        ..Script::pieces(vec![vec![b'x'; 300]])
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/truncated.bin");
    // The origin may fail before the gateway sent the header (a clean 502) or after (a broken
    // 200 body): either is fine, a 200 that ends cleanly is not.
    let first = match client().get(&url).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            resp.bytes().await.map(|b| (status, b.len()))
        }
        Err(e) => Err(e),
    };
    if let Ok((status, len)) = first {
        assert_eq!(status, 502, "a {status} with a clean {len}-byte body");
    }

    if let Ok(resp) = client().get(&url).send().await {
        assert_ne!(resp.headers()["x-cache-status"], "HIT");
        let _ = resp.bytes().await;
    }
    assert_eq!(origin.count(), 2, "the second request reached the origin");
}

/// Moves the cache clock to either side of each edge: one second before and after the TTL
/// (60 s), then three seconds before and one after the end of the stale-while-revalidate
/// window (10 s). The cache clock also runs with real time, and the refresh of `/a` in between
/// takes a second or more, so the check before the window's end keeps a wider margin. Paths
/// `/a`, `/b` and `/c` are stored at the same moment, so each edge is checked on a path that no
/// earlier step refreshed.
#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_window_edges() {
    let refreshing = Arc::new(AtomicBool::new(false));
    let origin_refreshing = Arc::clone(&refreshing);
    let origin = ScriptOrigin::start(move |_, _| {
        if origin_refreshing.load(Ordering::SeqCst) {
            Script {
                delay: REFRESH_DELAY,
                ..Script::ok("v2", "max-age=60")
            }
        } else {
            Script::ok("v1", "max-age=60")
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 10\nstale_if_error_secs = 0";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    for path in ["/a", "/b", "/c"] {
        assert_eq!(fetch(&gateway.url(path), &[]).await.cache, "MISS", "{path}");
    }
    refreshing.store(true, Ordering::SeqCst);

    clock.advance(secs(59));
    let before_ttl = fetch(&gateway.url("/a"), &[]).await;
    assert_eq!(before_ttl.cache, "HIT", "1 s before the TTL ends");
    assert_eq!(origin.count_of("/a"), 1);

    clock.advance(secs(2));
    for round in 1..=3 {
        let stale = fetch(&gateway.url("/a"), &[]).await;
        assert_eq!(stale.cache, "UPDATING", "1 s after the TTL, round {round}");
        assert_eq!(stale.text(), "v1", "round {round}");
    }
    assert!(
        origin.replied_at(3).is_none(),
        "the stale responses waited for the refresh"
    );
    let fresh = fetch_until_body(&gateway.url("/a"), "v2").await;
    assert_eq!(fresh.cache, "HIT");
    assert_eq!(origin.count_of("/a"), 2, "background refreshes of /a");

    clock.advance(secs(6));
    let before_end = fetch(&gateway.url("/b"), &[]).await;
    assert_eq!(before_end.cache, "UPDATING", "3 s before the window ends");
    assert_eq!(before_end.text(), "v1");
    fetch_until_body(&gateway.url("/b"), "v2").await;
    assert_eq!(origin.count_of("/b"), 2, "background refreshes of /b");

    clock.advance(secs(4));
    let after_end = fetch(&gateway.url("/c"), &[]).await;
    assert_eq!(after_end.cache, "EXPIRED", "1 s after the window ends");
    assert_eq!(after_end.text(), "v2");
    assert_eq!(origin.count_of("/c"), 2);
}

/// A purge that arrives while a stale-while-revalidate refresh waits for the origin's response
/// header removes what the refresh stores, so the next request goes to the origin again.
#[tokio::test(flavor = "multi_thread")]
async fn purge_during_refresh_holds() {
    // The origin sends v1, then v2 (the refresh) after 1.5 s, then v3.
    let origin = ScriptOrigin::start(|_, index| match index {
        0 => Script::ok("v1", "max-age=60"),
        1 => Script {
            delay: Duration::from_millis(1500),
            ..Script::ok("v2", "max-age=60")
        },
        _ => Script::ok("v3", "max-age=60"),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 60\nstale_if_error_secs = 0";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/r");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    clock.advance(secs(61));
    let stale = fetch(&url, &[]).await;
    assert_eq!(stale.cache, "UPDATING");
    assert_eq!(stale.text(), "v1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scope = mirror_proxy::cache::PurgeScope::Url {
        domain: "primary".into(),
        path: "/r".into(),
        query: None,
    };
    assert_eq!(gateway.running.purge(&scope), 1, "the stale v1 is purged");

    // The refresh's response arrives 1.5 s after its request; its body follows at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.replied_at(1).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        origin.replied_at(1).is_some(),
        "the refresh got no response"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fetch(&url, &[]).await;
    assert_eq!(
        after.cache, "MISS",
        "the refresh kept what the purge removed"
    );
    assert_eq!(after.text(), "v3");
    assert_eq!(origin.count_of("/r"), 3);
}

/// Moves the cache clock across the TTL (60 s) and the stale-if-error window (30 s) while the
/// origin responds with 503, then brings the origin back.
#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_window_edges() {
    let phase = Arc::new(AtomicU8::new(UP_FIRST));
    let origin_phase = Arc::clone(&phase);
    let origin = ScriptOrigin::start(move |_, _| phased_reply(&origin_phase)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0\nstale_if_error_secs = 30";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/sie.json");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");
    phase.store(DOWN, Ordering::SeqCst);

    clock.advance(secs(59));
    assert_eq!(
        fetch(&url, &[]).await.cache,
        "HIT",
        "1 s before the TTL ends"
    );
    assert_eq!(origin.count(), 1);

    let edges = [(2, "1 s after the TTL"), (28, "1 s before the window ends")];
    expect_stale_at(&clock, &url, &edges).await;

    clock.advance(secs(2));
    let past = fetch(&url, &[]).await;
    assert_eq!(past.status, 503, "1 s after the window ends");
    assert_eq!(past.text(), "origin down");

    phase.store(UP_AGAIN, Ordering::SeqCst);
    let recovered = fetch(&url, &[]).await;
    assert_eq!(recovered.status, 200);
    assert_eq!(recovered.text(), "v2");
    assert_eq!(fetch(&url, &[]).await.cache, "HIT");
    assert_eq!(origin.count(), 5, "origin requests");
}

/// A stampede on an expired entry within its stale-if-error window while the origin returns
/// 503: one refresh reaches the origin, and every client gets the stored entry, the waiters
/// without a refresh of their own. Once the cache clock is past the one-second back-off, the
/// next request tries the origin again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_if_error_serves_stampede() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, gateway, clock) = expired_while_down(dir.path(), 30).await;
    let url = gateway.url("/expired.json");
    for got in stampede_on(&url, 50).await {
        assert_eq!((got.status, got.cache.as_str()), (200, "STALE"));
        assert_eq!(got.text(), "v1");
    }
    assert_eq!(origin.count(), 2, "origin requests");

    clock.advance(secs(2));
    let again = fetch(&url, &[]).await;
    assert_eq!((again.status, again.cache.as_str()), (200, "STALE"));
    assert_eq!(origin.count(), 3, "a refresh after the back-off");
}

/// A stampede on an expired entry without a stale-if-error window while the origin returns
/// 503: the waiters compete once more after the first failed refresh, then all get the 503
/// without a refresh of their own. That is two refreshes after the stored request. On a busy
/// machine a client can arrive only after a failure and start one more, so the test accepts
/// up to four. Without the lock's failure record each client makes its own (51).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_refresh_fails_waiters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, gateway, _clock) = expired_while_down(dir.path(), 0).await;
    let url = gateway.url("/expired.json");
    for got in stampede_on(&url, 50).await {
        assert_eq!(got.status, 503, "a {} response", got.cache);
    }
    let refreshes = origin.count() - 1;
    assert!((2..=4).contains(&refreshes), "{refreshes} refreshes");
}

/// Stores `/expired.json` from an origin that then returns 503 one second after each request,
/// and moves the cache clock past the entry's 60 s lifetime. The domain has no
/// stale-while-revalidate window and a stale-if-error window of `stale_if_error` seconds.
async fn expired_while_down(
    dir: &Path,
    stale_if_error: u64,
) -> (ScriptOrigin, TestGateway, TestClock) {
    let phase = Arc::new(AtomicU8::new(UP_FIRST));
    let origin_phase = Arc::clone(&phase);
    let origin = ScriptOrigin::start(move |_, _| Script {
        delay: Duration::from_secs(1),
        ..phased_reply(&origin_phase)
    })
    .await;
    let domain = format!("stale_while_revalidate_secs = 0\nstale_if_error_secs = {stale_if_error}");
    let (gateway, clock) = start_clocked(dir, origin.addr, &domain);
    assert_eq!(
        fetch(&gateway.url("/expired.json"), &[]).await.cache,
        "MISS"
    );
    phase.store(DOWN, Ordering::SeqCst);
    clock.advance(secs(61));
    (origin, gateway, clock)
}

/// Sends `count` concurrent GETs of `url` and returns the responses. The requests share one
/// client: building a client per request loads the TLS root store each time, one after the
/// other, which spread 50 requests over about two seconds of a debug build.
async fn stampede_on(url: &str, count: usize) -> Vec<Fetched> {
    let shared = client();
    futures::future::join_all((0..count).map(|_| fetch_with(&shared, url, &[]))).await
}

/// A stale response sent because the origin refused the connection or responded with 503 has
/// `Connection: close`: Pingora 0.9.1 closes the client connection after it, and a client that
/// sent its next request into that connection would see a reset.
#[tokio::test(flavor = "multi_thread")]
async fn stale_after_origin_error_closes() {
    let mut origin = ScriptOrigin::start(|_, _| Script::ok("v1", "max-age=60")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0\nstale_if_error_secs = 30";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    assert_eq!(fetch(&gateway.url("/close.json"), &[]).await.cache, "MISS");
    origin.stop().await;
    clock.advance(secs(61));
    let refused_heads = keep_alive_heads(gateway.addr, "/close.json", 2).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let (_origin, gateway, _clock) = expired_while_down(dir.path(), 30).await;
    let heads_503 = keep_alive_heads(gateway.addr, "/expired.json", 2).await;

    for (case, heads) in [("refused", refused_heads), ("503", heads_503)] {
        assert_eq!(heads.len(), 1, "{case}: {heads:?}");
        assert!(
            heads[0].contains("x-cache-status: stale"),
            "{case}: {heads:?}"
        );
        assert!(heads[0].contains("connection: close"), "{case}: {heads:?}");
    }
}

/// Sends up to `count` GETs of `path` one after another on one connection and returns each
/// response's head in lower case. Stops after a response with `Connection: close`.
/// Panics when the exchange takes over 10 s.
async fn keep_alive_heads(addr: SocketAddr, path: &str, count: usize) -> Vec<String> {
    let exchange = async {
        let mut reader = BufReader::new(TcpStream::connect(addr).await.expect("connect"));
        let mut heads = Vec::new();
        for _ in 0..count {
            let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            reader
                .get_mut()
                .write_all(request.as_bytes())
                .await
                .expect("write");
            let mut head = String::new();
            loop {
                let mut line = String::new();
                let read = reader.read_line(&mut line).await.expect("read");
                assert!(
                    read > 0,
                    "connection closed before the end of a head: {head:?}"
                );
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line.to_ascii_lowercase());
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.expect("body");
            let closes = head.contains("connection: close");
            heads.push(head);
            if closes {
                break;
            }
        }
        heads
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("responses within 10 s")
}

/// Like [`stale_if_error_window_edges`], with the origin refusing connections.
#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_unreachable_edges() {
    let mut origin = ScriptOrigin::start(|_, index| match index {
        0 => Script::ok("v1", "max-age=60"),
        _ => Script::ok("v2", "max-age=60"),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0\nstale_if_error_secs = 30";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/down.json");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    origin.stop().await;
    let edges = [
        (61, "1 s after the TTL"),
        (28, "1 s before the window ends"),
    ];
    expect_stale_at(&clock, &url, &edges).await;
    clock.advance(secs(2));
    let past = fetch(&url, &[]).await;
    assert_eq!(past.status, 502, "1 s after the window ends");

    origin.restart().await;
    let recovered = fetch(&url, &[]).await;
    assert_eq!(recovered.status, 200);
    assert_eq!(recovered.text(), "v2");
    assert_eq!(fetch(&url, &[]).await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn not_modified_revalidates() {
    let origin = etag_origin("\"e1\"").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, clock) = start_expiring(dir.path(), &origin).await;
    let url = gateway.url("/etag.json");

    clock.advance(secs(61));
    let revalidated = fetch(&url, &[]).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.text(), "original");
    assert_eq!(revalidated.cache, "REVALIDATED");

    let requests = origin.requests();
    assert_eq!(requests.len(), 2, "origin requests");
    assert_eq!(requests[1].header("if-none-match"), Some("\"e1\""));
    // The 304 gave the entry 60 s more from the moment of revalidation.
    clock.advance(secs(59));
    assert_eq!(fetch(&url, &[]).await.cache, "HIT");
    assert_eq!(origin.count(), 2, "origin requests");
}

/// Starts an origin that sends "original" with `ETag: "e1"` and a 60 s lifetime, and sends
/// a 304 that carries `not_modified_etag` for a revalidation with `If-None-Match: "e1"`.
async fn etag_origin(not_modified_etag: &'static str) -> ScriptOrigin {
    ScriptOrigin::start(move |req, _| {
        if req.header("if-none-match") == Some("\"e1\"") {
            let mut reply = Script::pieces(Vec::new());
            reply.status = 304;
            reply.headers = vec![
                ("etag".into(), not_modified_etag.into()),
                ("cache-control".into(), "max-age=60".into()),
            ];
            reply
        } else {
            let mut reply = Script::ok("original", "max-age=60");
            reply.headers.push(("etag".into(), "\"e1\"".into()));
            reply
        }
    })
    .await
}

/// Starts a gateway with a test clock and no stale-while-revalidate window in front of
/// `origin`, and stores `/etag.json` (a miss).
async fn start_expiring(dir: &Path, origin: &ScriptOrigin) -> (TestGateway, TestClock) {
    let domain = "stale_while_revalidate_secs = 0";
    let (gateway, clock) = start_clocked(dir, origin.addr, domain);
    assert_eq!(fetch(&gateway.url("/etag.json"), &[]).await.cache, "MISS");
    (gateway, clock)
}

/// A 304 that names another strong `ETag` validates another representation: the client gets
/// the stored body with its own `ETag`, and the entry is not refreshed.
#[tokio::test(flavor = "multi_thread")]
async fn not_modified_other_etag_refreshes_nothing() {
    let origin = etag_origin("\"e2\"").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (gateway, clock) = start_expiring(dir.path(), &origin).await;
    let url = gateway.url("/etag.json");

    clock.advance(secs(61));
    let served = fetch(&url, &[]).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.text(), "original");
    assert_eq!(served.header("etag"), Some("\"e1\""));
    assert_eq!(origin.count(), 2, "origin requests");

    // Not refreshed: the next request revalidates again.
    let again = fetch(&url, &[]).await;
    assert_eq!(again.text(), "original");
    assert_ne!(again.cache, "HIT");
    assert_eq!(origin.count(), 3, "origin requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_and_conditionals_from_cache() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("0123456789abcdefghij");
        reply.headers.push(("etag".into(), "\"r1\"".into()));
        reply.headers.push((
            "last-modified".into(),
            "Wed, 01 Jan 2025 00:00:00 GMT".into(),
        ));
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/range.bin");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    let range = fetch(&url, &[("range", "bytes=0-9")]).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.text(), "0123456789");
    assert_eq!(range.header("content-range"), Some("bytes 0-9/20"));
    assert_eq!(range.cache, "HIT");

    let if_range = [("range", "bytes=0-9"), ("if-range", "\"r1\"")];
    assert_eq!(
        fetch(&url, &if_range).await.status,
        206,
        "matching If-Range"
    );
    let wrong = fetch(&url, &[("range", "bytes=0-9"), ("if-range", "\"old\"")]).await;
    assert_eq!(wrong.status, 200, "stale If-Range");
    assert_eq!(wrong.text(), "0123456789abcdefghij");
    let weak = fetch(&url, &[("range", "bytes=0-9"), ("if-range", "W/\"r1\"")]).await;
    assert_eq!(weak.status, 200, "weak If-Range");

    let empty = fetch(&url, &[("range", "bytes=-0")]).await;
    assert_eq!(empty.status, 416, "zero-length suffix range");
    assert_eq!(empty.header("content-range"), Some("bytes */20"));

    let not_modified = fetch(&url, &[("if-none-match", "\"r1\"")]).await;
    assert_eq!(not_modified.status, 304, "If-None-Match");
    assert_eq!(not_modified.cache, "HIT");

    let since = [("if-modified-since", "Thu, 01 Jan 2026 00:00:00 GMT")];
    assert_eq!(fetch(&url, &since).await.status, 304, "If-Modified-Since");

    let failed = fetch(&url, &[("if-match", "\"old\"")]).await;
    assert_eq!(failed.status, 412, "If-Match of another version");
    assert_eq!(failed.body.len(), 0, "412 body");
    assert_eq!(failed.cache, "HIT");
    let matching = fetch(&url, &[("if-match", "\"r1\"")]).await;
    assert_eq!(matching.status, 200, "matching If-Match");
    assert_eq!(matching.text(), "0123456789abcdefghij");
    let ranged = [("if-match", "\"old\""), ("range", "bytes=0-9")];
    assert_eq!(
        fetch(&url, &ranged).await.status,
        412,
        "If-Match before Range"
    );
    let unmodified = [("if-unmodified-since", "Tue, 31 Dec 2024 00:00:00 GMT")];
    let failed = fetch(&url, &unmodified).await;
    assert_eq!(
        failed.status, 412,
        "If-Unmodified-Since before Last-Modified"
    );
    let unmodified = [("if-unmodified-since", "Wed, 01 Jan 2025 00:00:00 GMT")];
    assert_eq!(
        fetch(&url, &unmodified).await.status,
        200,
        "If-Unmodified-Since"
    );
    assert_eq!(origin.count(), 1, "origin requests");

    // On a miss the client gets the 412 and the response is still stored.
    let other = gateway.url("/other.bin");
    let missed = fetch(&other, &[("if-match", "\"old\"")]).await;
    assert_eq!((missed.status, missed.cache.as_str()), (412, "MISS"));
    assert_eq!(missed.body.len(), 0, "412 body on a miss");
    assert_eq!(fetch(&other, &[]).await.cache, "HIT");
    assert_eq!(origin.count(), 2, "origin requests");
}

/// A body that the origin sent chunked has a known length once it is stored: hits carry
/// `Content-Length` and serve ranges.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_body_answers_ranges_once_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, gateway) = start_chunked_origin(dir.path()).await;
    let url = gateway.url("/chunked.bin");
    let first = fetch(&url, &[]).await;
    assert_eq!(first.cache, "MISS");
    assert_eq!(first.body.len(), 5000);
    let hit = fetch(&url, &[]).await;
    assert_eq!(hit.cache, "HIT");
    assert_eq!(hit.header("content-length"), Some("5000"));
    assert_eq!(hit.header("transfer-encoding"), None);
    let range = fetch(&url, &[("range", "bytes=999-1001")]).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.header("content-range"), Some("bytes 999-1001/5000"));
    assert_eq!(range.body, b"abb");
    assert_eq!(origin.count(), 1, "origin requests");
}

/// An HTTP/1.0 client cannot read chunked framing: an origin's chunked body reaches it as the
/// plain bytes, ended by the connection's close.
#[tokio::test(flavor = "multi_thread")]
async fn http10_client_gets_unchunked_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, gateway) = start_chunked_origin(dir.path()).await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream
        .write_all(b"GET /old-client.bin HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the gateway closes the connection after the body")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    let expected: String = five_pieces()
        .into_iter()
        .map(|piece| String::from_utf8(piece).expect("ASCII"))
        .collect();
    assert_eq!(body, expected);
    assert_eq!(origin.count(), 1, "origin requests");
}

/// A client that stops reading is given up once a write has waited `send_timeout_secs`: the
/// connection closes, so the response chunk it held is freed.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_client_dropped_after_send_timeout() {
    const PIECES: usize = 24;
    let origin = ScriptOrigin::start(|_, _| {
        let pieces = (0..PIECES).map(|_| vec![b'x'; 1 << 20]).collect();
        Script::pieces(pieces)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(origin.addr, "", false)
        .replace("[server]\n", "[server]\nsend_timeout_secs = 1\n");
    let gateway = TestGateway::start(dir.path(), &config);
    let url = gateway.url("/large.bin");
    assert_eq!(fetch(&url, &[]).await.body.len(), PIECES << 20, "fill");

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut stream = socket.connect(gateway.addr).await.expect("connect");
    stream
        .write_all(b"GET /large.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.expect("status line");
    assert_eq!(&first, b"HTTP/1.1 200");
    // Not reading for three times the timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the gateway closed the connection");
    let received = 12 + rest.len();
    assert!(
        read.is_err() || received < PIECES << 20,
        "a stalled client still got the whole body ({received} bytes)"
    );
}

/// An origin's `Age` (the response came through a cache upstream) reaches the client on the
/// miss that stores it, and the hits count on from it.
#[tokio::test(flavor = "multi_thread")]
async fn origin_age_kept_on_miss() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("aged");
        reply.headers = vec![
            ("cache-control".into(), "max-age=600".into()),
            ("age".into(), "100".into()),
        ];
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/aged.json");

    let miss = fetch(&url, &[]).await;
    let hit = fetch(&url, &[]).await;

    assert_eq!(miss.cache, "MISS");
    assert_eq!(miss.header("age"), Some("100"));
    assert_eq!(miss.headers.get_all("age").iter().count(), 1);
    assert_eq!(hit.cache, "HIT");
    let hit_age: u64 = hit
        .header("age")
        .and_then(|a| a.parse().ok())
        .expect("hit age");
    assert!((100..=102).contains(&hit_age), "hit age {hit_age}");
}

/// An expired entry fetched again in full sends the new response's `Age`, not the old one's,
/// whether the new response is stored or not.
#[tokio::test(flavor = "multi_thread")]
async fn origin_age_kept_on_refetch() {
    let origin = ScriptOrigin::start(|_, index| {
        let (age, cache_control) = match index {
            0 => ("100", "max-age=200"),
            1 => ("7", "max-age=200"),
            _ => ("5", "no-store"),
        };
        let mut script = Script::ok(&format!("v{index}"), cache_control);
        script.headers.push(("age".into(), age.into()));
        script
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0\nstale_if_error_secs = 0";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/refetch.json");
    assert_eq!(fetch(&url, &[]).await.header("age"), Some("100"));

    clock.advance(secs(101));
    let refetched = fetch(&url, &[]).await;

    assert_eq!(refetched.cache, "EXPIRED");
    assert_eq!(refetched.text(), "v1");
    assert_eq!(refetched.header("age"), Some("7"));

    // A refetch that is not stored passes the origin's `Age` on, not the old entry's.
    clock.advance(secs(200));
    let unstored = fetch(&url, &[]).await;
    assert_eq!(unstored.text(), "v2");
    assert_eq!(unstored.header("age"), Some("5"), "{}", unstored.cache);
}

/// A `ttl` rule's `Cache-Control` goes downstream on responses the gateway may store, and never
/// replaces an origin's `no-store`, `private`, `Set-Cookie` or `Vary: *`, which a CDN in front
/// must see.
#[tokio::test(flavor = "multi_thread")]
async fn rule_cache_control_keeps_origin_refusals() {
    let origin = TestOrigin::start(|req| {
        // `Cache-Control: max-age=60` unless replaced below.
        let mut reply = Reply::ok("body");
        let field = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        match req.target.as_str() {
            "/r/no-store" => reply.headers = vec![field("cache-control", "no-store")],
            "/r/private" => reply.headers = vec![field("cache-control", "private, max-age=60")],
            "/r/cookie" => reply.headers.push(field("set-cookie", "sid=abc; Path=/")),
            "/r/vary" => reply.headers.push(field("vary", "*")),
            // Slow, so that concurrent requests wait on this request's fill and then give up.
            "/r/slow-private" => {
                reply.headers = vec![field("cache-control", "private")];
                reply.delay = Duration::from_millis(300);
            }
            _ => {}
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = ttl_rule("/r/*", "public, max-age=300");
    let gateway = start_gateway(dir.path(), origin.addr, &ttl, false);

    let stored = fetch(&gateway.url("/r/plain"), &[]).await;
    assert_eq!(stored.cache, "MISS");
    assert_eq!(stored.header("cache-control"), Some("public, max-age=300"));
    let hit = fetch(&gateway.url("/r/plain"), &[]).await;
    assert_eq!(hit.cache, "HIT");
    assert_eq!(hit.header("cache-control"), Some("public, max-age=300"));

    let origin_choices = [
        ("/r/no-store", Some("no-store")),
        ("/r/private", Some("private, max-age=60")),
        ("/r/cookie", Some("max-age=60")),
        ("/r/vary", Some("max-age=60")),
    ];
    for (path, expected) in origin_choices {
        let resp = fetch(&gateway.url(path), &[]).await;
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.cache, "BYPASS", "{path}");
        assert_eq!(resp.header("cache-control"), expected, "{path}");
    }

    for resp in stampede_on(&gateway.url("/r/slow-private"), 8).await {
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("cache-control"),
            Some("private"),
            "{}",
            resp.cache
        );
    }
}

/// The gateway serves a plain GET or HEAD of a fresh entry straight from the memory tier, and
/// a request with a conditional field through Pingora's cache phases. Both must give the same
/// response: status, fields (only `Date` and `Age` may move with the clock) and body.
#[tokio::test(flavor = "multi_thread")]
async fn plain_hits_match_the_cache_path() {
    let origin = TestOrigin::start(|_| {
        let mut reply = Reply::ok("stored body");
        reply.headers.push(("etag".into(), "\"p1\"".into()));
        reply
            .headers
            .push(("cache-control".into(), "max-age=60".into()));
        reply.headers.push(("x-origin-field".into(), "kept".into()));
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A plugin field too, whose place among the others must not change.
    let ttl = ttl_rule("/plain.json", "public, max-age=30");
    let gateway = start_gateway(dir.path(), origin.addr, &ttl, false);
    let url = gateway.url("/plain.json");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    let plain = fetch(&url, &[]).await;
    // An If-None-Match that matches nothing gets 200 with the stored response.
    let through_cache = fetch(&url, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.cache, "HIT");
    assert_eq!(plain.text(), "stored body");
    assert_eq!(through_cache.status, plain.status);
    assert_eq!(through_cache.body, plain.body);
    assert_eq!(fields(&plain), fields(&through_cache));
    assert!(plain
        .header("age")
        .is_some_and(|age| age.parse::<u64>().is_ok()));
    assert_eq!(plain.header("accept-ranges"), Some("bytes"));

    let head = client()
        .head(&url)
        .send()
        .await
        .expect("HEAD of a stored response");
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("11")
    );
    assert_eq!(
        head.headers()
            .get("x-cache-status")
            .and_then(|v| v.to_str().ok()),
        Some("HIT")
    );
    assert!(head.bytes().await.expect("HEAD body").is_empty());
    assert_eq!(origin.count(), 1, "origin requests");
}

/// Returns the fields of `resp` other than `Date` and `Age`, in the order they came.
fn fields(resp: &Fetched) -> Vec<(String, String)> {
    resp.headers
        .iter()
        .filter(|(name, _)| *name != "date" && *name != "age")
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("?").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn vary_stores_each_variant() {
    let origin = TestOrigin::start(|req| {
        let encoding = req.header("accept-encoding").unwrap_or("none");
        let mut reply = Reply::ok(&format!("encoding={encoding}"));
        let vary = if req.target == "/any" {
            "*"
        } else {
            "Accept-Encoding"
        };
        reply.headers.push(("vary".into(), vary.into()));
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", true);
    let url = gateway.url("/vary");
    for encoding in ["gzip", "br"] {
        for round in ["MISS", "HIT"] {
            let resp = fetch(&url, &[("accept-encoding", encoding)]).await;
            assert_eq!(resp.cache, round, "{encoding}");
            assert_eq!(
                resp.text(),
                format!("encoding={encoding}"),
                "{encoding} {round}"
            );
        }
    }
    assert_eq!(origin.count(), 2, "origin requests for two variants");

    let any = gateway.url("/any");
    for round in 1..=2 {
        let resp = fetch(&any, &[("accept-encoding", "gzip")]).await;
        assert_ne!(resp.cache, "HIT", "Vary: * round {round}");
        assert_eq!(resp.header("x-cache-reason"), Some("vary_any"));
    }
    assert_eq!(origin.count(), 4, "Vary: * was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_cap_serialises() {
    let origin = ScriptOrigin::start(|req, _| Script {
        delay: Duration::from_millis(300),
        ..Script::ok(&format!("body of {}", req.target), "max-age=60")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "max_origin_requests = 1";
    let gateway = start_gateway(dir.path(), origin.addr, domain, false);
    let (url_a, url_b) = (gateway.url("/slow/a"), gateway.url("/slow/b"));
    let (a, b) = tokio::join!(fetch(&url_a, &[]), fetch(&url_b, &[]));
    assert_eq!(a.text(), "body of /slow/a");
    assert_eq!(b.text(), "body of /slow/b");
    assert_eq!(origin.count(), 2, "origin requests");
    assert_eq!(origin.max_in_flight(), 1, "requests in flight at once");
}

/// A GET or HEAD that announces a body gets 400 at once and never reaches the origin, even
/// when the body never arrives. So it cannot hold the domain's only origin slot, nor be passed
/// on as the start of another request.
#[tokio::test(flavor = "multi_thread")]
async fn request_body_rejected_slot_kept() {
    let origin =
        ScriptOrigin::start(|req, _| Script::ok(&format!("body of {}", req.target), "max-age=60"))
            .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "max_origin_requests = 1", false);
    let requests = [
        "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nabc",
        "GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "HEAD /c HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n",
    ];
    for request in requests {
        let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut head = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
            .await
            .expect("an answer within 5 s, not a hang");
        read.expect("status line");
        assert_eq!(&head, b"HTTP/1.1 400", "{request:?}");
    }
    let empty = fetch(&gateway.url("/d"), &[("content-length", "0")]).await;
    assert_eq!(empty.status, 200, "Content-Length: 0 is no body");
    let plain = tokio::time::timeout(Duration::from_secs(5), fetch(&gateway.url("/e"), &[]))
        .await
        .expect("the origin slot is free");
    assert_eq!(plain.text(), "body of /e");
    assert_eq!(origin.count(), 2, "only /d and /e reached the origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_header_names_status() {
    let origin = TestOrigin::start(|req| {
        let mut reply = Reply::ok("unavailable");
        reply.status = if req.target == "/broken" { 503 } else { 429 };
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", true);
    let resp = fetch(&gateway.url("/broken"), &[]).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-cache-reason"), Some("origin_error"));
    let resp = fetch(&gateway.url("/busy"), &[]).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("x-cache-reason"), Some("status"));

    // An origin that refuses the connection: the gateway's own 502 names the same reason.
    let refused_dir = tempfile::tempdir().expect("tempdir");
    let refused = start_gateway(refused_dir.path(), common::closed_port().await, "", true);
    let resp = fetch(&refused.url("/down"), &[]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-cache-reason"), Some("origin_error"));
}

/// An origin `Age` is time the response already spent in caches: hits carry at least that
/// `Age`, and the origin's lifetime is shortened by it. Statuses other than the storable ones
/// are never stored, whatever lifetime the origin gives them.
#[tokio::test(flavor = "multi_thread")]
async fn origin_age_and_unstorable_statuses() {
    let origin = TestOrigin::start(|req| match req.target.as_str() {
        "/aged" => {
            let mut reply = Reply::ok("aged");
            reply.headers = vec![
                ("cache-control".into(), "max-age=300".into()),
                ("age".into(), "290".into()),
            ];
            reply
        }
        _ => {
            let mut reply = Reply::ok("slow down");
            reply.status = 429;
            reply
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0\nstale_if_error_secs = 0";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/aged");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");
    let hit = fetch(&url, &[]).await;
    assert_eq!(hit.cache, "HIT");
    let age: u64 = hit.header("age").and_then(|a| a.parse().ok()).expect("Age");
    assert!((290..=300).contains(&age), "Age {age}");
    clock.advance(secs(11));
    assert_eq!(
        fetch(&url, &[]).await.cache,
        "EXPIRED",
        "300 s lifetime, 290 s old on arrival, 11 s later"
    );
    assert_eq!(origin.count(), 2);

    for round in 1..=2 {
        let resp = fetch(&gateway.url("/limited"), &[]).await;
        assert_eq!(resp.status, 429, "round {round}");
        assert_ne!(resp.cache, "HIT", "round {round}");
    }
    assert_eq!(origin.count(), 4, "a 429 was stored");
}

/// The first piece and the header together are larger than the gateway's 2 KiB downstream
/// write buffer, so the filler's header reaches it at once and the waiter joins the fill
/// before the origin dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_death_fails_waiters() {
    let origin = ScriptOrigin::start(|_, _| Script {
        announced: Some(5000),
        ..Script::pieces(vec![vec![b'x'; 2000], vec![b'y'; 500]])
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/dies.bin");

    let filler = client().get(&url).send().await.expect("filler header");
    let waiter = client().get(&url).send().await.expect("waiter header");
    assert_eq!(
        waiter.headers()["x-cache-status"],
        "HIT",
        "the waiter joined the fill"
    );

    let (filler, waiter) = tokio::join!(filler.bytes(), waiter.bytes());
    assert!(
        filler.is_err(),
        "filler got a clean {:?}-byte body",
        filler.map(|b| b.len())
    );
    assert!(
        waiter.is_err(),
        "waiter got a clean {:?}-byte body",
        waiter.map(|b| b.len())
    );
    assert_eq!(origin.count(), 1, "origin requests");
}

/// With a `Content-Length` over `max_object_bytes` Pingora never starts a fill. A chunked body
/// outgrows the limit mid-fill: Pingora then gives up that request (its client sees a broken
/// body, never a clean short one) and remembers the key, so later requests bypass the cache.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_object_served_whole() {
    let pieces = vec![vec![b'a'; 3000], vec![b'b'; 3000]];
    let body = pieces.concat();
    let origin = ScriptOrigin::start(move |req, _| Script {
        chunked: req.target == "/chunked",
        ..Script::pieces(pieces.clone())
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(origin.addr, "", false).replace(
        "max_object_bytes = \"32MiB\"",
        "max_object_bytes = \"4KiB\"",
    );
    let gateway = TestGateway::start(dir.path(), &config);

    for round in 1..=2 {
        let resp = fetch(&gateway.url("/length"), &[]).await;
        assert_eq!(resp.body.len(), body.len(), "/length round {round}");
        assert_ne!(resp.cache, "HIT", "/length round {round}");
    }

    let url = gateway.url("/chunked");
    let first = match client().get(&url).send().await {
        Ok(resp) => resp.bytes().await.map(|b| b.len()),
        Err(e) => Err(e),
    };
    if let Ok(len) = first {
        assert_eq!(len, body.len(), "a clean but short chunked body");
    }
    for round in 2..=3 {
        let resp = fetch(&url, &[]).await;
        assert_eq!(resp.body.len(), body.len(), "/chunked round {round}");
        assert_ne!(resp.cache, "HIT", "/chunked round {round}");
    }
    assert_eq!(origin.count(), 5, "origin requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_survives_503() {
    let phase = Arc::new(AtomicU8::new(UP_FIRST));
    let origin_phase = Arc::clone(&phase);
    let origin = ScriptOrigin::start(move |_, _| phased_reply(&origin_phase)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 30";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/swr-503.json");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    phase.store(DOWN, Ordering::SeqCst);
    clock.advance(secs(61));
    let stale = fetch(&url, &[]).await;
    assert_eq!(stale.cache, "UPDATING");
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), "v1");
    poll(|| origin.count() == 2, "the background refresh").await;

    for round in 1..=3 {
        let resp = fetch(&url, &[]).await;
        assert_eq!(resp.status, 200, "round {round}");
        assert_eq!(resp.text(), "v1", "round {round}");
    }
}

/// A fill of one variant in progress never serves another variant's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vary_during_fill() {
    let origin = ScriptOrigin::start(|req, _| {
        let encoding = req.header("accept-encoding").unwrap_or("none");
        let head = format!("{encoding}:").into_bytes();
        let mut reply = Script::pieces(vec![[head, vec![b'.'; 2000]].concat(), b"end".to_vec()]);
        reply
            .headers
            .push(("vary".into(), "Accept-Encoding".into()));
        reply
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(dir.path(), origin.addr, "", false);
    let url = gateway.url("/vary-slow");

    let get = |encoding: &'static str| {
        client()
            .get(&url)
            .header("accept-encoding", encoding)
            .send()
    };
    let gzip_filler = get("gzip").await.expect("gzip filler header");
    let br = get("br").await.expect("br header");
    let gzip_waiter = get("gzip").await.expect("gzip waiter header");

    let starts = |resp: reqwest::Response, encoding: &'static str| async move {
        let body = resp.bytes().await.expect("body");
        assert!(
            body.starts_with(format!("{encoding}:").as_bytes()),
            "{encoding} got {:?}",
            String::from_utf8_lossy(&body[..10.min(body.len())])
        );
    };
    starts(gzip_filler, "gzip").await;
    starts(br, "br").await;
    starts(gzip_waiter, "gzip").await;
    assert_eq!(origin.count(), 2, "origin requests");
}

/// A request that finds no free origin slot in time gets the stale entry, as for any other
/// origin failure, and so do the requests that waited on it.
#[tokio::test(flavor = "multi_thread")]
async fn origin_cap_serves_stale() {
    let origin = ScriptOrigin::start(|req, index| match (req.target.as_str(), index) {
        // The header comes at once, so no cache lock is held, and the body takes 2.8 s.
        ("/busy", _) => Script {
            headers: vec![("cache-control".into(), "no-store".into())],
            ..Script::pieces(vec![b"x".to_vec(); 15])
        },
        (_, 0) => Script::ok("v1", "max-age=60"),
        _ => Script::ok("v2", "max-age=60"),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "stale_while_revalidate_secs = 0
max_origin_requests = 1
lock_wait_timeout_secs = 1";
    let (gateway, clock) = start_clocked(dir.path(), origin.addr, domain);
    let url = gateway.url("/stale.json");
    assert_eq!(fetch(&url, &[]).await.cache, "MISS");

    clock.advance(secs(61));
    let busy_url = gateway.url("/busy");
    let busy = tokio::spawn(async move { fetch(&busy_url, &[]).await });
    poll(
        || origin.count() == 2,
        "the request that takes the only slot",
    )
    .await;

    for stale in stampede_on(&url, 30).await {
        assert_eq!(stale.status, 200);
        assert_eq!(stale.text(), "v1");
        assert_eq!(stale.cache, "STALE");
    }
    busy.abort();
}

/// A request that finds no free origin slot in time and has no stale entry gets a 503 whose
/// reason names the busy slots, not an origin error.
#[tokio::test(flavor = "multi_thread")]
async fn origin_cap_without_stale_is_busy() {
    let origin = ScriptOrigin::start(|req, _| match req.target.as_str() {
        // The header comes at once, so no cache lock is held, and the body takes 2.8 s.
        "/busy" => Script {
            headers: vec![("cache-control".into(), "no-store".into())],
            ..Script::pieces(vec![b"x".to_vec(); 15])
        },
        _ => Script::ok("fresh", "max-age=60"),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "max_origin_requests = 1\nlock_wait_timeout_secs = 1";
    let gateway = start_gateway(dir.path(), origin.addr, domain, true);
    let busy_url = gateway.url("/busy");
    let busy = tokio::spawn(async move { fetch(&busy_url, &[]).await });
    poll(
        || origin.count() == 1,
        "the request that takes the only slot",
    )
    .await;

    let busy_reply = fetch(&gateway.url("/fresh.json"), &[]).await;

    assert_eq!(busy_reply.status, 503);
    assert_eq!(busy_reply.header("x-cache-reason"), Some("origin_busy"));
    assert_eq!(origin.count(), 1, "origin requests");
    busy.abort();
}

/// Starts a gateway with domain `primary` on host `127.0.0.1` in front of the HTTP origin at
/// `origin`, no TTL rules (the origin's `Cache-Control` decides), `domain_keys` added to the
/// domain table and `[cache] debug_headers` set to `debug`.
fn start_gateway(dir: &Path, origin: SocketAddr, domain_keys: &str, debug: bool) -> TestGateway {
    TestGateway::start(dir, &gateway_config(origin, domain_keys, debug))
}

/// Starts the gateway of [`start_gateway`] without debug headers, with a cache clock that the
/// test moves forward.
fn start_clocked(dir: &Path, origin: SocketAddr, domain_keys: &str) -> (TestGateway, TestClock) {
    TestGateway::start_with_clock(dir, &gateway_config(origin, domain_keys, false))
}

/// Returns the domain keys of a `ttl` plugin with one rule for `pattern`: a 60 s TTL and
/// `cache_control` downstream.
fn ttl_rule(pattern: &str, cache_control: &str) -> String {
    format!(
        r#"
[[domains.primary.plugins]]
name = "ttl"
[[domains.primary.plugins.rules]]
pattern = "{pattern}"
ttl_secs = 60
cache_control = "{cache_control}"
"#
    )
}

/// Returns the config that [`start_gateway`] starts.
fn gateway_config(origin: SocketAddr, domain_keys: &str, debug: bool) -> String {
    format!(
        r#"{BASE_CONFIG}debug_headers = {debug}

[domains.primary]
hosts = ["127.0.0.1"]
{domain_keys}
[domains.primary.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
"#
    )
}

/// Starts an origin that sends [`five_pieces`] chunked, and a gateway in front of it.
async fn start_chunked_origin(dir: &Path) -> (ScriptOrigin, TestGateway) {
    let origin = ScriptOrigin::start(|_, _| Script {
        chunked: true,
        ..Script::pieces(five_pieces())
    })
    .await;
    let gateway = start_gateway(dir, origin.addr, "", false);
    (origin, gateway)
}

/// Returns five 1000-byte pieces, each of one letter.
fn five_pieces() -> Vec<Vec<u8>> {
    (b'a'..=b'e').map(|c| vec![c; 1000]).collect()
}

const UP_FIRST: u8 = 0;
const DOWN: u8 = 1;
const UP_AGAIN: u8 = 2;

/// Returns `v1`, a 503, or `v2` (each storable one fresh for 60 s) by `phase`.
fn phased_reply(phase: &AtomicU8) -> Script {
    match phase.load(Ordering::SeqCst) {
        UP_FIRST => Script::ok("v1", "max-age=60"),
        DOWN => Script {
            status: 503,
            ..Script::ok("origin down", "no-store")
        },
        _ => Script::ok("v2", "max-age=60"),
    }
}

/// A response read in full.
struct Fetched {
    status: u16,
    headers: reqwest::header::HeaderMap,
    /// `X-Cache-Status`, empty when absent.
    cache: String,
    body: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends GET `url` with `headers` and reads the whole response. Panics on a transport error.
async fn fetch(url: &str, headers: &[(&str, &str)]) -> Fetched {
    fetch_with(&client(), url, headers).await
}

/// Like [`fetch`], on a client the caller built.
async fn fetch_with(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Fetched {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let resp = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("body of GET {url}: {e}"));
    let cache = headers
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Fetched {
        status,
        headers,
        cache,
        body: body.to_vec(),
    }
}

/// Fetches `url` until its body is `body`, every 20 ms for up to 5 s, and returns that response.
async fn fetch_until_body(url: &str, body: &str) -> Fetched {
    for _ in 0..250 {
        let resp = fetch(url, &[]).await;
        if resp.text() == body {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} did not serve {body:?} within 5 s");
}

/// Moves `clock` forward by each step's seconds in turn and checks that `url` then serves its
/// stale `v1` as `STALE`. Each step's label names the edge in failure messages.
async fn expect_stale_at(clock: &TestClock, url: &str, steps: &[(u64, &str)]) {
    for &(step, edge) in steps {
        clock.advance(secs(step));
        let stale = fetch(url, &[]).await;
        assert_eq!(stale.status, 200, "{edge}");
        assert_eq!(stale.text(), "v1", "{edge}");
        assert_eq!(stale.cache, "STALE", "{edge}");
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Polls `done` every 20 ms for up to 5 s, and panics naming `what` when it stays false.
async fn poll(done: impl Fn() -> bool, what: &str) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 5 s");
}

/// Reads from `stream` until the response header and at least one body byte have arrived.
async fn read_first_body_bytes(stream: &mut TcpStream) {
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("read the response");
            assert!(n > 0, "the gateway closed the connection early");
            raw.extend_from_slice(&buf[..n]);
            let end = raw.windows(4).position(|w| w == b"\r\n\r\n");
            if end.is_some_and(|end| raw.len() > end + 4) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the first body bytes within 10 s");
}

/// What the scripted origin sends for one request.
#[derive(Debug, Clone)]
struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    /// Body pieces, written one by one with `gap` before each piece after the first.
    pieces: Vec<Vec<u8>>,
    /// Pause before each body piece after the first: [`PIECE_GAP`] unless a test sets it.
    gap: Duration,
    /// A `Content-Length` that differs from the body's length. The origin then closes the
    /// connection after the last piece, as an origin that dies mid-body does.
    announced: Option<usize>,
    /// Pause before the response header.
    delay: Duration,
    /// Sends the body with `Transfer-Encoding: chunked`, one chunk per piece, instead of a
    /// `Content-Length`.
    chunked: bool,
}

impl Script {
    /// Builds a 200 with `body` in one piece and `Cache-Control: cache_control`.
    fn ok(body: &str, cache_control: &str) -> Self {
        Self {
            headers: vec![("cache-control".into(), cache_control.into())],
            ..Self::pieces(vec![body.as_bytes().to_vec()])
        }
    }

    /// Builds a 200 of `pieces`, fresh for 60 s.
    fn pieces(pieces: Vec<Vec<u8>>) -> Self {
        Self {
            status: 200,
            headers: vec![("cache-control".into(), "max-age=60".into())],
            pieces,
            gap: PIECE_GAP,
            announced: None,
            delay: Duration::ZERO,
            chunked: false,
        }
    }
}

type ScriptFn = Arc<dyn Fn(&Recorded, usize) -> Script + Send + Sync>;

/// What the scripted origin saw.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<Recorded>>,
    /// When each reply's header was written, by request index.
    replied_at: Mutex<Vec<(usize, Instant)>>,
    /// When the origin last began writing the final piece of a body.
    last_piece_at: Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// An HTTP/1.1 origin on loopback that replies to each request with the `Script` its function
/// returns for the request and its index (0 for the first request).
struct ScriptOrigin {
    addr: SocketAddr,
    script: ScriptFn,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptOrigin {
    async fn start(script: impl Fn(&Recorded, usize) -> Script + Send + Sync + 'static) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::listen(any_port, Arc::new(script), Arc::default()).await
    }

    async fn listen(addr: SocketAddr, script: ScriptFn, seen: Arc<Seen>) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let task = accept_loop(listener, Arc::clone(&script), Arc::clone(&seen));
        Self {
            addr,
            script,
            seen,
            task,
        }
    }

    /// Closes the listener and every open connection, so the port refuses connections.
    async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Listens again on the same port with the same script and records.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind origin again");
        self.task = accept_loop(listener, Arc::clone(&self.script), Arc::clone(&self.seen));
    }

    fn count(&self) -> usize {
        self.seen.requests.lock().expect("lock").len()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.seen.requests.lock().expect("lock").clone()
    }

    /// Returns how many requests for `target` the origin received.
    fn count_of(&self, target: &str) -> usize {
        let requests = self.seen.requests.lock().expect("lock");
        requests.iter().filter(|r| r.target == target).count()
    }

    fn replied_at(&self, index: usize) -> Option<Instant> {
        let replies = self.seen.replied_at.lock().expect("lock");
        replies.iter().find(|(i, _)| *i == index).map(|(_, t)| *t)
    }

    fn last_piece_at(&self) -> Option<Instant> {
        *self.seen.last_piece_at.lock().expect("lock")
    }

    fn max_in_flight(&self) -> usize {
        self.seen.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections on `listener` until the returned task is aborted, which closes the
/// connections too.
fn accept_loop(
    listener: TcpListener,
    script: ScriptFn,
    seen: Arc<Seen>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(serve_script(stream, Arc::clone(&script), Arc::clone(&seen)));
        }
    })
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Seen);

impl<'a> InFlight<'a> {
    fn enter(seen: &'a Seen) -> Self {
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(seen)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_script(stream: TcpStream, script: ScriptFn, seen: Arc<Seen>) {
    let mut reader = BufReader::new(stream);
    for _ in 0..100 {
        let Some(request) = read_request(&mut reader).await else {
            return;
        };
        let index = {
            let mut requests = seen.requests.lock().expect("lock");
            requests.push(request.clone());
            requests.len() - 1
        };
        let _busy = InFlight::enter(&seen);
        let reply = script(&request, index);
        if !write_reply(reader.get_mut(), &request, &reply, index, &seen).await {
            return;
        }
    }
}

/// Reads one request head, or returns `None` at the end of the connection.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Recorded> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header).await.ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            return Some(Recorded {
                method,
                target,
                headers,
            });
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    None
}

/// Writes `reply` and returns whether the connection can serve another request.
async fn write_reply(
    stream: &mut TcpStream,
    request: &Recorded,
    reply: &Script,
    index: usize,
    seen: &Seen,
) -> bool {
    tokio::time::sleep(reply.delay).await;
    let length: usize = reply.pieces.iter().map(Vec::len).sum();
    let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
    if reply.chunked {
        head.push_str("transfer-encoding: chunked\r\n");
    } else if reply.status != 304 {
        let announced = reply.announced.unwrap_or(length);
        head.push_str(&format!("content-length: {announced}\r\n"));
    }
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");

    seen.replied_at
        .lock()
        .expect("lock")
        .push((index, Instant::now()));
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    if request.method == "HEAD" || reply.status == 304 {
        return true;
    }

    for (i, piece) in reply.pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(reply.gap).await;
        }
        if i + 1 == reply.pieces.len() {
            *seen.last_piece_at.lock().expect("lock") = Some(Instant::now());
        }
        let framed = if reply.chunked {
            [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat()
        } else {
            piece.clone()
        };
        if stream.write_all(&framed).await.is_err() {
            return false;
        }
    }
    if reply.chunked && stream.write_all(b"0\r\n\r\n").await.is_err() {
        return false;
    }
    reply.announced.is_none_or(|announced| announced == length)
}
