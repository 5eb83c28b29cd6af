//! The client listeners' connection handler: the PROXY protocol header when
//! `server.proxy_protocol` is on (see [`crate::proxy_protocol`]), then on the TLS listeners the
//! handshake, run by the gateway so that it learns how each one ends.
//!
//! Pingora's own TLS listener logs a failed handshake and drops it, so no code of the gateway
//! learns about failures inside OpenSSL. The TLS listeners are therefore plain TCP listeners
//! whose connections [`ProxyListener`] hands to [`Handshaker`] first: it runs Pingora's
//! handshake with this module's callbacks, counts the outcome by domain and reason, and passes
//! the TLS connection on to the HTTP proxy.
//!
//! Before the handshake, [`Handshaker`] reads the first bytes of the connection. When they
//! start a plain HTTP/1.x request, the client gets a 400 response in plain HTTP instead of a
//! handshake (see [`plain_http`]). Other bytes are put back for the handshake to read.

mod h2_preface;

pub use h2_preface::PREFACE_WAIT as H2_PREFACE_WAIT;
mod plain_http;

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::ServerApp;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::tls::{TlsRef, ALPN};
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::server::ShutdownWatch;
use pingora::tls::ssl::{
    select_next_proto, AlpnError, NameType, SslAcceptor, SslMethod, SslRef, SslVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{CertStore, HandshakeFailure, TlsConnection, TlsStore};
use crate::proxy_protocol::ProxyProtocol;
use crate::status::Monitor;
use plain_http::Prefix;

/// Maximum time from accepting a TLS connection, or from the end of its PROXY header with
/// `server.proxy_protocol`, to the end of its handshake, the read of its first bytes
/// included. Pingora 0.9.1 puts the same limit on the handshakes of its own listeners.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum time to send the 400 response to a plain HTTP request and then wait for the client
/// to close the connection.
const PLAIN_HTTP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Maximum number of bytes read and discarded after the 400 response to a plain HTTP request.
const PLAIN_HTTP_DISCARD_LIMIT: u64 = 64 * 1024;

/// ALPN protocols in order of preference, in wire format: HTTP/2, then HTTP/1.1.
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";

/// The label of handshakes that failed before a server name selected a domain.
const NO_DOMAIN: &str = "-";

/// A listener's connection handler: the PROXY header and the TLS handshake when the listener
/// has them, then `app`.
pub struct ProxyListener<A> {
    app: Arc<A>,
    proxy_protocol: Option<Arc<ProxyProtocol>>,
    tls: Option<Handshaker>,
    connections: Option<Arc<crate::status::Connections>>,
    /// Maximum wait for an HTTP/2 client's connection preface.
    h2_preface_wait: Duration,
}

/// Runs the TLS handshakes of the TLS listeners and counts how each one ends.
pub struct Handshaker {
    acceptor: SslAcceptor,
    timeout: Duration,
    store: Arc<TlsStore>,
    monitor: Arc<Monitor>,
}

/// One handshake's callbacks, and what they learned for counting its outcome.
struct Attempt {
    /// The certificates of the generation in use when the connection was accepted, so both
    /// callbacks see the same one across a reload.
    store: Arc<CertStore>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    domain: Option<Arc<str>>,
    /// Set when the callbacks know why the handshake must fail.
    failure: Option<HandshakeFailure>,
}

impl<A> ProxyListener<A> {
    /// Hands plain-TCP connections to `app`.
    pub fn plain(app: Arc<A>) -> Self {
        Self {
            app,
            proxy_protocol: None,
            tls: None,
            connections: None,
            h2_preface_wait: h2_preface::PREFACE_WAIT,
        }
    }

    /// Runs the TLS handshake on each connection, then hands it to `app`.
    pub fn tls(app: Arc<A>, handshaker: Handshaker) -> Self {
        Self {
            app,
            proxy_protocol: None,
            tls: Some(handshaker),
            connections: None,
            h2_preface_wait: h2_preface::PREFACE_WAIT,
        }
    }

    /// Closes an HTTP/2 connection whose client sends no connection preface within `wait`.
    pub fn with_h2_preface_wait(mut self, wait: Duration) -> Self {
        self.h2_preface_wait = wait;
        self
    }

    /// Counts each connection in `connections` from the end of its TLS handshake (or of its
    /// PROXY header, or its accept) until it closes.
    pub fn counted(mut self, connections: Arc<crate::status::Connections>) -> Self {
        self.connections = Some(connections);
        self
    }

    /// Reads the PROXY header of each connection first, before the TLS handshake if any.
    pub fn with_proxy_protocol(mut self, proxy_protocol: Arc<ProxyProtocol>) -> Self {
        self.proxy_protocol = Some(proxy_protocol);
        self
    }

    /// Reads the PROXY header and runs the TLS handshake, as far as the listener has them.
    /// Returns `None` when the connection must close.
    async fn prepare(&self, stream: Stream) -> Option<Stream> {
        if self.proxy_protocol.is_none() && self.tls.is_none() {
            return Some(stream);
        }
        // Pingora's TCP listeners pass their `l4` stream boxed. Rewinding read bytes, which
        // both steps need, and the handshake need it unboxed.
        let stream = match stream.into_any().downcast::<L4Stream>() {
            Ok(tcp) => *tcp,
            Err(_) => {
                tracing::error!(
                    "a client listener received a connection that is not a TCP stream; closing it"
                );
                if let Some(handshaker) = &self.tls {
                    let reason = Err(HandshakeFailure::Other);
                    handshaker.monitor.metrics.tls_handshake(NO_DOMAIN, reason);
                }
                return None;
            }
        };
        let stream = match &self.proxy_protocol {
            Some(proxy_protocol) => proxy_protocol.accept(stream).await?,
            None => stream,
        };
        match &self.tls {
            Some(handshaker) => handshaker.accept(stream).await,
            None => Some(Box::new(stream)),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ProxyListener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream = self.prepare(stream).await?;
        let stream = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            h2_preface::await_preface(stream, self.h2_preface_wait, shutdown).await?
        } else {
            stream
        };
        // Counted from here: a connection still in its TLS handshake, PROXY header or HTTP/2
        // preface has sent no request, and a shutdown need not wait for it.
        let _open = self.connections.as_ref().map(|c| c.open());
        // The keep-alive loop runs here, not in Pingora's listener, which would pass each
        // reused connection to this method again as if it were new.
        let mut reused = self.app.process_new(stream, shutdown).await;
        while let Some(stream) = reused {
            reused = self.app.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

impl Handshaker {
    /// Creates the handshake settings of the TLS listeners: certificates from `store`, counts
    /// in `monitor`'s metrics.
    ///
    /// The base is OpenSSL's Mozilla intermediate profile (version 5), as Pingora's
    /// `TlsSettings::with_callbacks` uses: ECDHE (and DHE) key exchange with AES-GCM or
    /// ChaCha20-Poly1305 for TLS 1.2, the three standard TLS 1.3 suites. On top: TLS 1.2 as
    /// the lowest version, ALPN preferring `h2` over `http/1.1`, and OCSP stapling for
    /// certificates that have a response.
    ///
    /// # Errors
    ///
    /// OpenSSL's message when it cannot create the context.
    pub fn new(store: &Arc<TlsStore>, monitor: &Arc<Monitor>) -> Result<Self, String> {
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
            .map_err(|e| format!("cannot create the TLS context: {e}"))?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| format!("cannot set the lowest TLS version: {e}"))?;
        // The certificate callback sets the response, and this callback makes OpenSSL send it.
        builder
            .set_status_callback(|ssl| Ok(ssl.ocsp_status().is_some()))
            .map_err(|e| format!("cannot turn on OCSP stapling: {e}"))?;
        builder.set_alpn_select_callback(prefer_h2);
        Ok(Self {
            acceptor: builder.build(),
            timeout: HANDSHAKE_TIMEOUT,
            store: Arc::clone(store),
            monitor: Arc::clone(monitor),
        })
    }

    /// Runs the handshake on a new connection and counts its outcome; `None` when it failed.
    ///
    /// A connection whose first bytes start a plain HTTP/1.x request gets no handshake: the
    /// client gets a 400 response, and the failure counts with the reason `plain_http`.
    ///
    /// Logs the PROXY header's source address as the peer when the header named one.
    async fn accept(&self, mut stream: L4Stream) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned());

        // The first bytes and the handshake share one deadline, so a client that sends its
        // first bytes slowly gets no extra time.
        let deadline = Instant::now() + self.timeout;
        let prefix = tokio::time::timeout_at(deadline, read_prefix(&mut stream)).await;
        match prefix {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(method))) => {
                let error = format!(
                    "the client sent a plain HTTP request ({method}), which gets a 400 response"
                );
                self.count_failure(
                    peer.as_ref(),
                    NO_DOMAIN,
                    HandshakeFailure::PlainHttp,
                    &error,
                );
                answer_plain_http(stream, peer.as_ref()).await;
                return None;
            }
            Ok(Err(e)) => {
                let error = format!("failed to read the first bytes: {e}");
                self.count_failure(peer.as_ref(), NO_DOMAIN, HandshakeFailure::Aborted, &error);
                return None;
            }
            Err(_) => {
                let error = self.timeout_message();
                self.count_failure(peer.as_ref(), NO_DOMAIN, HandshakeFailure::Timeout, &error);
                return None;
            }
        }

        let attempt = Attempt {
            store: self.store.current(),
            seen: Mutex::default(),
        };
        let handshake = handshake_with_callback(&self.acceptor, stream, &attempt);
        let result = tokio::time::timeout_at(deadline, handshake).await;

        let Seen { domain, failure } = std::mem::take(&mut *attempt.seen.lock());
        let label = domain.as_deref().unwrap_or(NO_DOMAIN);
        let (reason, error) = match result {
            Ok(Ok(tls)) => {
                self.monitor.metrics.tls_handshake(label, Ok(()));
                return Some(Box::new(tls));
            }
            Ok(Err(e)) => (HandshakeFailure::of_accept_error(&e), e.to_string()),
            Err(_) => (HandshakeFailure::Timeout, self.timeout_message()),
        };
        // What the callbacks learned beats OpenSSL's error: with no certificate installed, the
        // error names a missing cipher or signature algorithm.
        let reason = failure.unwrap_or(reason);
        self.count_failure(peer.as_ref(), label, reason, &error);
        None
    }

    /// Counts a failed handshake and logs it. The level is debug because any client can cause
    /// failures at will.
    fn count_failure(
        &self,
        peer: Option<&SocketAddr>,
        domain: &str,
        reason: HandshakeFailure,
        error: &str,
    ) {
        self.monitor.metrics.tls_handshake(domain, Err(reason));
        tracing::debug!(
            peer = ?peer,
            domain,
            %reason,
            %error,
            "TLS handshake failed"
        );
    }

    fn timeout_message(&self) -> String {
        let millis = self.timeout.as_millis();
        format!("the handshake did not finish within {millis} ms")
    }
}

/// Reads the first bytes of a connection until [`plain_http::classify`] decides, at most
/// [`plain_http::MAX_PREFIX`] of them. Returns the method when they start a plain HTTP/1.x
/// request. Otherwise the bytes go back into `stream` ([`L4Stream::rewind`]), so that the
/// handshake reads them as if they had not been read.
///
/// An end of stream before the decision also puts the bytes back, so the handshake fails on
/// the end of stream and counts the failure by OpenSSL's error. A cancelled call loses the
/// bytes read so far, so the caller must close the connection then.
async fn read_prefix(stream: &mut L4Stream) -> io::Result<Option<String>> {
    let mut prefix = [0; plain_http::MAX_PREFIX];
    let mut len = 0;
    loop {
        let read = stream.read(&mut prefix[len..]).await?;
        len += read;
        let bytes = &prefix[..len];
        match plain_http::classify(bytes) {
            Prefix::PlainHttp => return Ok(Some(plain_http::method(bytes).to_owned())),
            Prefix::Incomplete if read > 0 && len < prefix.len() => {}
            Prefix::Incomplete | Prefix::NotHttp => {
                stream.rewind(bytes);
                return Ok(None);
            }
        }
    }
}

/// Sends the 400 response to a plain HTTP request, ends the sending side, and discards what
/// the client still sends until it closes, within [`PLAIN_HTTP_CLOSE_TIMEOUT`] and at most
/// [`PLAIN_HTTP_DISCARD_LIMIT`] bytes.
///
/// Linux resets a connection that is closed with received bytes still unread, and a client
/// that gets the reset before it has read the response may lose the response. Reading the
/// rest of the request before closing avoids that for requests up to the limit.
async fn answer_plain_http(mut stream: L4Stream, peer: Option<&SocketAddr>) {
    let exchange = async {
        stream.write_all(plain_http::RESPONSE).await?;
        // Flushes the write buffer, then sends FIN.
        stream.shutdown().await?;
        let mut rest = (&mut stream).take(PLAIN_HTTP_DISCARD_LIMIT);
        tokio::io::copy(&mut rest, &mut tokio::io::sink()).await
    };
    let error = match tokio::time::timeout(PLAIN_HTTP_CLOSE_TIMEOUT, exchange).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => {
            let millis = PLAIN_HTTP_CLOSE_TIMEOUT.as_millis();
            format!("the client did not close the connection within {millis} ms")
        }
    };
    tracing::debug!(
        peer = ?peer,
        %error,
        "closing a plain HTTP connection on a TLS listener after the 400 response"
    );
}

#[async_trait]
impl TlsAccept for Attempt {
    /// Installs the certificate of the domain that the server name selects. OpenSSL requests
    /// it after it accepted the client's TLS version, and resumed sessions skip this step.
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let name = ssl.servername(NameType::HOST_NAME).map(str::to_owned);
        match self.store.select(name.as_deref()) {
            Some((domain, cert)) => {
                let mut seen = self.seen.lock();
                seen.domain = Some(Arc::clone(domain));
                if let Err(e) = cert.install(ssl) {
                    tracing::warn!(
                        %domain,
                        error = %e,
                        "cannot use the domain's certificate; the handshake fails"
                    );
                    seen.failure = Some(HandshakeFailure::Other);
                }
            }
            None => {
                tracing::debug!(
                    server_name = ?name,
                    "TLS handshake rejected: no domain certificate for this server name, no default"
                );
                // The label is a configured id, never the client's name, to bound the series.
                let mut seen = self.seen.lock();
                seen.domain = self.store.domain_of(name.as_deref()).cloned();
                seen.failure = Some(HandshakeFailure::UnknownSni);
            }
        }
    }

    /// Records the server name and domain for the requests on the connection. Runs after
    /// every completed handshake, resumed ones too.
    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let name = ssl.servername(NameType::HOST_NAME);
        let domain = self.store.select(name).map(|(id, _)| Arc::clone(id));
        self.seen.lock().domain.clone_from(&domain);
        Some(Arc::new(TlsConnection {
            server_name: name.map(str::to_owned),
            domain,
        }))
    }
}

/// Selects `h2` when the client offers it, else `http/1.1`. Other offers get no protocol.
fn prefer_h2<'a>(_: &mut SslRef, offered: &'a [u8]) -> Result<&'a [u8], AlpnError> {
    select_next_proto(ALPN_H2_H1, offered).ok_or(AlpnError::NOACK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ScrapeInputs;

    /// A test client's script: `chunks` with `gap` after each, then, with `half_close`, the end
    /// of its sending side.
    struct Client {
        chunks: Vec<&'static [u8]>,
        gap: Duration,
        half_close: bool,
    }

    impl Client {
        fn sends(bytes: &'static [u8]) -> Self {
            Self {
                chunks: vec![bytes],
                gap: Duration::ZERO,
                half_close: false,
            }
        }

        fn byte_by_byte(bytes: &'static [u8], gap: Duration) -> Self {
            Self {
                chunks: bytes.chunks(1).collect(),
                gap,
                half_close: false,
            }
        }

        fn then_closes(mut self) -> Self {
            self.half_close = true;
            self
        }
    }

    /// The server's side of one connection.
    struct Outcome {
        accepted: bool,
        /// Every byte the client received before the server closed.
        received: Vec<u8>,
        metrics: String,
    }

    /// Accepts one connection from `client` on a handshaker with no certificates and a 200 ms
    /// timeout. The client reads until the server closes, for at most 2 s.
    async fn accept_one(client: Client) -> Outcome {
        let monitor = Arc::new(Monitor::default());
        let store = Arc::new(TlsStore::new(CertStore::default()));
        let mut handshaker = Handshaker::new(&store, &monitor).expect("handshaker");
        handshaker.timeout = Duration::from_millis(200);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            for chunk in client.chunks {
                stream.write_all(chunk).await.expect("write");
                tokio::time::sleep(client.gap).await;
            }
            if client.half_close {
                stream.shutdown().await.expect("shutdown");
            }
            let mut received = Vec::new();
            let read = stream.read_to_end(&mut received);
            let read = tokio::time::timeout(Duration::from_secs(2), read).await;
            // A reset after the server's response counts as its end.
            let _ = read.expect("the server kept the connection open for 2 s");
            received
        });
        let (server, _) = listener.accept().await.expect("accept");
        let accepted = handshaker.accept(L4Stream::from(server)).await.is_some();
        let received = client.await.expect("client");
        let metrics = monitor
            .metrics
            .render(&ScrapeInputs::default())
            .expect("render");
        Outcome {
            accepted,
            received,
            metrics,
        }
    }

    /// Returns the failure series of `reason` with the value 1.
    fn failed_once(reason: &str) -> String {
        format!("mirror_gateway_tls_handshake_failures_total{{domain=\"-\",reason=\"{reason}\"}} 1")
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let outcome = accept_one(Client::sends(b"")).await;
        assert!(!outcome.accepted);
        assert!(outcome.received.is_empty());
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("timeout")), "{text}");
    }

    #[tokio::test]
    async fn plain_http_gets_400() {
        let request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        let outcome = accept_one(Client::sends(request)).await;
        assert!(!outcome.accepted);
        let received = String::from_utf8_lossy(&outcome.received);
        assert_eq!(outcome.received, plain_http::RESPONSE, "{received}");
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("plain_http")), "{text}");
        assert!(!text.contains("reason=\"malformed\""), "{text}");
    }

    #[tokio::test]
    async fn plain_http_byte_by_byte_gets_400() {
        let request = b"HEAD / HTTP/1.1\r\n\r\n";
        let client = Client::byte_by_byte(request, Duration::from_millis(5));
        let outcome = accept_one(client).await;
        assert!(!outcome.accepted);
        let received = String::from_utf8_lossy(&outcome.received);
        assert_eq!(outcome.received, plain_http::RESPONSE, "{received}");
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("plain_http")), "{text}");
    }

    #[tokio::test]
    async fn method_without_space_times_out() {
        let outcome = accept_one(Client::sends(b"GET")).await;
        assert!(!outcome.accepted);
        assert!(outcome.received.is_empty());
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("timeout")), "{text}");
    }

    #[tokio::test]
    async fn method_then_end_of_stream_aborted() {
        let outcome = accept_one(Client::sends(b"GET").then_closes()).await;
        assert!(!outcome.accepted);
        assert!(outcome.received.is_empty());
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("aborted")), "{text}");
    }

    #[tokio::test]
    async fn other_protocol_is_malformed() {
        let outcome = accept_one(Client::sends(b"SSH-2.0-OpenSSH_9.6\r\n").then_closes()).await;
        assert!(!outcome.accepted);
        assert!(!outcome.received.starts_with(b"HTTP/"));
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("malformed")), "{text}");
    }

    /// A TLS record header that announces a 512-byte handshake message, cut short: the bytes
    /// reach OpenSSL, and the client gets no HTTP response.
    #[tokio::test]
    async fn tls_record_goes_to_handshake() {
        let record: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        let outcome = accept_one(Client::sends(record).then_closes()).await;
        assert!(!outcome.accepted);
        assert!(!outcome.received.starts_with(b"HTTP/"));
        let text = outcome.metrics;
        assert!(text.contains(&failed_once("aborted")), "{text}");
    }
}
