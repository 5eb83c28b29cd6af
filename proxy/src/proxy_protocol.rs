//! The PROXY protocol on the client listeners (`server.proxy_protocol`): a load balancer in
//! front of the gateway names the client's address in a header before the HTTP request or
//! the TLS handshake.
//!
//! The header's address is believed only from a peer in `server.trusted_proxies`, read from
//! the configuration in use when the connection is accepted, so a reload applies to new
//! connections. The rules, for each new connection:
//! - A trusted peer must start with a valid header, version 1 or 2. The header's source
//!   address becomes the connection's peer address, which the client address, the access
//!   log and the `X-Forwarded-For` sent to origins read. A `LOCAL` header (the proxy's own
//!   connection, such as a health check) keeps the socket's peer. A relayed connection whose
//!   client the header does not name (`UNKNOWN`, families UNSPEC and UNIX) gets the
//!   unspecified address (`0.0.0.0` or `::`) as its peer, so that its `X-Forwarded-For`,
//!   written by the client, is not read. A missing or invalid header closes the connection.
//! - Any other peer may send a header or not. A valid header is read and ignored, so the
//!   client is the socket's peer. Without a header, the connection is served as it is.
//! - An invalid header closes the connection whatever the peer, because its end, and so the
//!   start of the request, is unknown.
//! - The first bytes, and a whole header, must arrive within `server.proxy_protocol_timeout_ms`
//!   of the accept, whatever the peer; else the connection is closed.
//!
//! Closed connections count in `mirror_gateway_proxy_protocol_rejections_total` by
//! [`Rejection`], and ignored headers in `mirror_gateway_proxy_protocol_ignored_total`.

mod header;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use tokio::io::AsyncReadExt;

use crate::gateway::GatewayState;
use crate::status::Monitor;
use header::{Detection, Version};
pub use header::{Header, HeaderError};

/// The reason a connection was closed while its PROXY header was read, the `reason` label of
/// `mirror_gateway_proxy_protocol_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A trusted peer sent no header.
    Missing,
    /// The header is invalid.
    Malformed,
    /// The first bytes or the rest of the header did not arrive in time.
    Timeout,
    /// The connection closed or broke within the header.
    Aborted,
}

impl Rejection {
    /// Returns the metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Timeout => "timeout",
            Self::Aborted => "aborted",
        }
    }
}

/// Reads the PROXY header of new connections on the client listeners.
pub struct ProxyProtocol {
    timeout: Duration,
    /// The state in use, read for `trusted_proxies` at each accept.
    state: Arc<ArcSwap<GatewayState>>,
    monitor: Arc<Monitor>,
}

impl ProxyProtocol {
    /// Reads headers within `timeout` of the accept, trusting the peers in the
    /// `trusted_proxies` of the state in `state`, and counts closes in `monitor`.
    pub fn new(
        timeout: Duration,
        state: Arc<ArcSwap<GatewayState>>,
        monitor: Arc<Monitor>,
    ) -> Self {
        Self {
            timeout,
            state,
            monitor,
        }
    }

    /// Reads the header of a new connection and applies the rules of the module
    /// documentation. Returns the connection positioned after the header, or `None` when it
    /// must close.
    pub async fn accept(&self, mut stream: L4Stream) -> Option<L4Stream> {
        let Some(peer) = peer_addr(&stream) else {
            // Only TCP listeners get here, and every TCP connection has a peer address.
            tracing::warn!("closing a connection without a peer address before its PROXY header");
            return None;
        };
        let trusted = self.state.load().trusted_proxies.contains(peer.ip());
        let read = tokio::time::timeout(self.timeout, read_header(&mut stream)).await;
        let header = match read {
            Ok(Ok(header)) => header,
            Ok(Err(ReadError::Closed { read: 0 })) => {
                tracing::trace!(%peer, "connection closed before its first byte");
                return None;
            }
            Ok(Err(e)) => {
                self.reject(peer, e.rejection(), &e.to_string());
                return None;
            }
            Err(_) => {
                let millis = self.timeout.as_millis();
                let error =
                    format!("no complete PROXY header or first request byte within {millis} ms");
                self.reject(peer, Rejection::Timeout, &error);
                return None;
            }
        };
        match (header, trusted) {
            (Some(Header::Proxied { source }), true) => set_peer_addr(&mut stream, source),
            // The proxy relays a client it cannot name. Its requests may carry an
            // `X-Forwarded-For` that the client wrote, which a trusted peer's connection would
            // have read. So an unspecified address, which no trusted range should cover,
            // stands for the client instead.
            (Some(Header::Unknown), true) => {
                let unknown = match peer.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                set_peer_addr(&mut stream, SocketAddr::new(unknown, 0));
            }
            (Some(Header::Local), true) | (None, false) => {}
            (Some(header), false) => {
                self.monitor.metrics.proxy_protocol_ignored();
                tracing::debug!(
                    %peer,
                    ?header,
                    "ignoring the PROXY header of a peer outside server.trusted_proxies"
                );
            }
            (None, true) => {
                let error = "a peer in server.trusted_proxies sent no PROXY header";
                self.reject(peer, Rejection::Missing, error);
                return None;
            }
        }
        Some(stream)
    }

    /// Counts a closed connection and logs it. The level is debug because any client can
    /// cause most of these at will; the counter shows a proxy that sends no headers.
    fn reject(&self, peer: SocketAddr, reason: Rejection, error: &str) {
        self.monitor.metrics.proxy_protocol_rejected(reason);
        tracing::debug!(
            %peer,
            reason = reason.label(),
            %error,
            "closing the connection: PROXY protocol header rejected"
        );
    }
}

/// A failure to read a header.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("invalid PROXY header: {0}")]
    Malformed(#[from] HeaderError),
    #[error("the connection closed after {read} bytes, within the PROXY header")]
    Closed { read: usize },
    #[error("failed to read the PROXY header: {0}")]
    Io(io::Error),
}

impl ReadError {
    fn rejection(&self) -> Rejection {
        match self {
            Self::Malformed(_) => Rejection::Malformed,
            Self::Closed { .. } | Self::Io(_) => Rejection::Aborted,
        }
    }
}

/// Reads the PROXY header at the start of `stream`, if there is one. Returns `None` when the
/// first bytes start no header; they are then put back ([`L4Stream::rewind`]) for the
/// protocol after it to read.
///
/// No read requests more bytes than the header can still have, so the bytes after a valid
/// header (the request, or the TLS ClientHello, often in the same segment) stay in the
/// stream. A cancelled call loses the bytes read so far, so the caller must close the
/// connection then.
async fn read_header(stream: &mut L4Stream) -> Result<Option<Header>, ReadError> {
    let mut buffer = [0; header::V1_MAX_LEN];
    // No valid header is shorter than `DETECT_LEN` bytes, so reading that many to decide never
    // reads past the end of a header.
    let mut len = 0;
    let version = loop {
        match header::detect(&buffer[..len]) {
            Detection::Header(version) => break version,
            Detection::NotProxy => {
                stream.rewind(&buffer[..len]);
                return Ok(None);
            }
            Detection::Incomplete => {
                len += read_some(stream, &mut buffer[len..header::DETECT_LEN], len).await?
            }
        }
    };
    match version {
        Version::V1 => read_v1(stream, &mut buffer, len).await.map(Some),
        Version::V2 => read_v2(stream, &buffer[..len]).await.map(Some),
    }
}

/// Reads the rest of a version 1 line, of which `buffer` contains the first `len` bytes, up to
/// its LF, one byte at a time. Pingora's L4 stream buffers reads (64 KiB by default), so only
/// the first of these reads reaches the socket.
async fn read_v1(
    stream: &mut L4Stream,
    buffer: &mut [u8; header::V1_MAX_LEN],
    mut len: usize,
) -> Result<Header, ReadError> {
    loop {
        if let Some(end) = buffer[..len].iter().position(|b| *b == b'\n') {
            let parsed = header::parse_v1(&buffer[..=end])?;
            // Only a line shorter than any valid header can end within the bytes read to
            // detect it, and it fails to parse, but the rest belongs to the stream anyway.
            stream.rewind(&buffer[end + 1..len]);
            return Ok(parsed);
        }
        if len == buffer.len() {
            return Err(HeaderError::V1TooLong.into());
        }
        len += read_some(stream, &mut buffer[len..=len], len).await?;
    }
}

/// Reads the rest of a version 2 header, whose first bytes are `start`: the fixed part, then
/// the length that the fixed part gives. Only the fixed part and the address block stay in
/// memory. The TLVs after them, up to 64 KiB from any peer, are read through a small buffer
/// and dropped.
async fn read_v2(stream: &mut L4Stream, start: &[u8]) -> Result<Header, ReadError> {
    const FIXED: usize = header::V2_FIXED_LEN;
    let mut fixed = [0; FIXED];
    fixed[..start.len()].copy_from_slice(start);
    read_exact(stream, &mut fixed[start.len()..], start.len()).await?;
    let rest_len = header::v2_rest_len(&fixed)?;
    let addresses = rest_len.min(header::V2_MAX_ADDRESSES_LEN);
    let mut trimmed = [0; FIXED + header::V2_MAX_ADDRESSES_LEN];
    trimmed[..FIXED].copy_from_slice(&fixed);
    read_exact(stream, &mut trimmed[FIXED..FIXED + addresses], FIXED).await?;
    let mut skipped = 0;
    let mut scratch = [0; 256];
    while addresses + skipped < rest_len {
        let want = (rest_len - addresses - skipped).min(scratch.len());
        let before = FIXED + addresses + skipped;
        skipped += read_some(stream, &mut scratch[..want], before).await?;
    }
    // The trimmed header: its length field now covers the address block alone.
    let addresses_len = u16::try_from(addresses).unwrap_or(u16::MAX);
    trimmed[14..FIXED].copy_from_slice(&addresses_len.to_be_bytes());
    Ok(header::parse_v2(&trimmed[..FIXED + addresses])?)
}

/// Reads at least one byte into `buffer`; `before` is the number of header bytes read
/// earlier, for the error.
async fn read_some(
    stream: &mut L4Stream,
    buffer: &mut [u8],
    before: usize,
) -> Result<usize, ReadError> {
    match stream.read(buffer).await {
        Ok(0) => Err(ReadError::Closed { read: before }),
        Ok(read) => Ok(read),
        Err(e) => Err(ReadError::Io(e)),
    }
}

async fn read_exact(
    stream: &mut L4Stream,
    buffer: &mut [u8],
    before: usize,
) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buffer.len() {
        filled += read_some(stream, &mut buffer[filled..], before + filled).await?;
    }
    Ok(())
}

/// Returns the peer address of a TCP connection.
fn peer_addr(stream: &L4Stream) -> Option<SocketAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr()?.as_inet().copied()
}

/// Makes `source` the connection's peer address, which Pingora's `Session::client_addr`
/// returns for every request on it (Pingora 0.9.1 reads it from the socket digest). An
/// IPv4-mapped IPv6 source becomes the IPv4 address, the form the access log and the client
/// address use, so that origins get it in `X-Forwarded-For` in that form too.
fn set_peer_addr(stream: &mut L4Stream, source: SocketAddr) {
    let source = match source {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => source,
        },
        SocketAddr::V4(_) => source,
    };
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    // A new digest has no peer address yet, so the set succeeds. The local address is read
    // from the socket when first asked for, as before.
    let _ = digest.peer_addr.set(Some(source.into()));
    stream.set_socket_digest(digest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sends each of `chunks` on a new loopback connection, with a 5 ms gap between them,
    /// then closes, and reads the header on the server's side. Returns the result and every
    /// byte the server's stream contains after it, read for at most 2 s.
    async fn read_from(chunks: Vec<Vec<u8>>) -> (Result<Option<Header>, String>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            for chunk in chunks {
                stream.write_all(&chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stream.shutdown().await.expect("shutdown");
        });
        let (server, _) = listener.accept().await.expect("accept");
        let mut stream = L4Stream::from(server);
        let result = read_header(&mut stream).await.map_err(|e| e.to_string());
        client.await.expect("client");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest));
        read.await
            .expect("the client closed")
            .expect("read the rest");
        (result, rest)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";

    fn v2_inet() -> Vec<u8> {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        header.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0x12, 0x34, 0x01, 0xbb]);
        header
    }

    fn proxied(text: &str) -> Result<Option<Header>, String> {
        let source = text.parse().expect("test address");
        Ok(Some(Header::Proxied { source }))
    }

    #[tokio::test]
    async fn header_then_request_in_one_write() {
        let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 4660 80\r\n".to_vec();
        for header in [v1, v2_inet()] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(REQUEST);
            let (result, rest) = read_from(vec![bytes]).await;
            assert_eq!(result, proxied("192.0.2.1:4660"), "{header:?}");
            assert_eq!(rest, REQUEST, "{header:?}");
        }
    }

    /// A version 2 header with 60,000 bytes of TLVs, in chunks: the TLVs are read and
    /// dropped, and the request after them is intact.
    #[tokio::test]
    async fn long_tlvs_are_skipped() {
        let tlvs_len: u16 = 60_000;
        let mut header = v2_inet();
        header[14..16].copy_from_slice(&(12 + tlvs_len).to_be_bytes());
        // One NOOP TLV (type 4) whose value fills the rest.
        header.extend_from_slice(&[0x04]);
        header.extend_from_slice(&(tlvs_len - 3).to_be_bytes());
        header.resize(16 + 12 + usize::from(tlvs_len), 0);
        let mut chunks: Vec<Vec<u8>> = header.chunks(7_000).map(<[u8]>::to_vec).collect();
        chunks.push(REQUEST.to_vec());
        let (result, rest) = read_from(chunks).await;
        assert_eq!(result, proxied("192.0.2.1:4660"));
        assert_eq!(rest, REQUEST);
    }

    #[tokio::test]
    async fn headers_byte_by_byte() {
        let v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4660 80\r\n".to_vec();
        for header in [v1, v2_inet()] {
            let mut chunks: Vec<Vec<u8>> = header.iter().map(|b| vec![*b]).collect();
            chunks.push(REQUEST.to_vec());
            let (result, rest) = read_from(chunks).await;
            assert!(
                matches!(result, Ok(Some(Header::Proxied { .. }))),
                "{header:?} read as {result:?}"
            );
            assert_eq!(rest, REQUEST, "{header:?}");
        }
    }

    #[tokio::test]
    async fn no_header_is_put_back() {
        let starts: [&[u8]; 3] = [
            REQUEST,
            b"POST /x HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
        ];
        for start in starts {
            let (result, rest) = read_from(vec![start.to_vec()]).await;
            let text = String::from_utf8_lossy(start);
            assert_eq!(result, Ok(None), "{text}");
            assert_eq!(rest, start, "{text}");
        }
    }

    #[tokio::test]
    async fn close_within_signature_is_error() {
        let (result, rest) = read_from(vec![b"PROX".to_vec()]).await;
        let error = "the connection closed after 4 bytes, within the PROXY header";
        assert_eq!(result, Err(error.into()));
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn bad_headers_are_errors() {
        let mut past_end = v2_inet();
        past_end[15] = 0x40;
        let cases: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.1 198.51.100.2 70000 80\r\nGET".to_vec(),
            format!("PROXY UNKNOWN {}", "x".repeat(200)).into_bytes(),
            b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c".to_vec(),
            past_end,
            b"PROXY TCP4 192.0.2.1".to_vec(),
        ];
        for bytes in cases {
            let (result, _) = read_from(vec![bytes.clone()]).await;
            let text = String::from_utf8_lossy(&bytes);
            assert!(result.is_err(), "{text:?} read as {result:?}");
        }
    }
}
