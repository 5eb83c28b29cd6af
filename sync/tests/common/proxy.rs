//! A small HTTP proxy in front of moto that counts requests by kind and can break the
//! second page of a listing or drop a page's continuation token. One request per connection
//! (every response carries `Connection: close`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Requests seen, by kind, and the fault to inject.
#[derive(Default)]
pub struct Stats {
    /// `GET /bucket?list-type=2...`: listing pages.
    pub lists: AtomicUsize,
    /// Listings with `start-after`: the check that a listing was complete.
    pub end_checks: AtomicUsize,
    /// `GET /bucket/key`
    pub gets: AtomicUsize,
    pub heads: AtomicUsize,
    /// Break listing pages after the first: one 503 SlowDown, then a cut-off body.
    pub break_page_two: AtomicBool,
    /// Remove `NextContinuationToken` from listing pages, leaving `IsTruncated` as it is.
    pub drop_continuation_token: AtomicBool,
    page_two_seen: AtomicUsize,
}

impl Stats {
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
    pub fn heads(&self) -> usize {
        self.heads.load(Ordering::SeqCst)
    }
    pub fn lists(&self) -> usize {
        self.lists.load(Ordering::SeqCst)
    }
    pub fn end_checks(&self) -> usize {
        self.end_checks.load(Ordering::SeqCst)
    }
    /// Resets the counters.
    pub fn reset(&self) {
        self.lists.store(0, Ordering::SeqCst);
        self.gets.store(0, Ordering::SeqCst);
        self.heads.store(0, Ordering::SeqCst);
        self.end_checks.store(0, Ordering::SeqCst);
    }
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub port: u16,
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stats = Arc::new(Stats::default());
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let stats = shared.clone();
                tokio::spawn(async move {
                    let _ = handle(client, upstream, &stats).await;
                });
            }
        });
        Self { port, stats, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, upstream: u16, stats: &Stats) -> std::io::Result<()> {
    let (head, body) = read_request(&mut client).await?;
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let is_list = target.contains("list-type=2");
    let is_end_check = is_list && target.contains("start-after");
    match (method, is_list) {
        ("GET", true) if is_end_check => stats.end_checks.fetch_add(1, Ordering::SeqCst),
        ("GET", true) => stats.lists.fetch_add(1, Ordering::SeqCst),
        ("GET", false) => stats.gets.fetch_add(1, Ordering::SeqCst),
        ("HEAD", _) => stats.heads.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };
    if is_list
        && target.contains("continuation-token")
        && stats.break_page_two.load(Ordering::SeqCst)
    {
        let response = match stats.page_two_seen.fetch_add(1, Ordering::SeqCst) {
            0 => canned(
                "503 Service Unavailable",
                "<Error><Code>SlowDown</Code></Error>",
            ),
            _ => canned(
                "200 OK",
                "<?xml version=\"1.0\"?><ListBucketResult><Contents><Key>x",
            ),
        };
        return client.write_all(response.as_bytes()).await;
    }
    let mut server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    server.write_all(with_close(&head).as_bytes()).await?;
    server.write_all(&body).await?;
    let mut response = Vec::new();
    server.read_to_end(&mut response).await?;
    if is_list && !is_end_check && stats.drop_continuation_token.load(Ordering::SeqCst) {
        response = without_continuation_token(&response);
    }
    client.write_all(&close_response(response)).await?;
    client.shutdown().await
}

/// Reads a request head (as text) and its `Content-Length` body.
async fn read_request(client: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((head, body))
}

/// Replaces the `Connection` header of a head with `Connection: close`.
fn with_close(head: &str) -> String {
    let mut lines: Vec<&str> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

fn close_response(response: Vec<u8>) -> Vec<u8> {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return response;
    };
    let head = String::from_utf8_lossy(&response[..end]).to_string();
    let mut out = with_close(&head).into_bytes();
    out.extend_from_slice(&response[end + 4..]);
    out
}

/// Returns a listing response without its `NextContinuationToken` element, with the
/// `Content-Length` made to match.
fn without_continuation_token(response: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return response.to_vec();
    };
    let body = match (
        body.find("<NextContinuationToken>"),
        body.find("</NextContinuationToken>"),
    ) {
        (Some(start), Some(end)) => {
            format!(
                "{}{}",
                &body[..start],
                &body[end + "</NextContinuationToken>".len()..]
            )
        }
        _ => body.to_string(),
    };
    let head: Vec<String> = head
        .lines()
        .map(
            |line| match line.to_ascii_lowercase().starts_with("content-length:") {
                true => format!("Content-Length: {}", body.len()),
                false => line.to_string(),
            },
        )
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

fn canned(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}
