//! The TLS listeners' handshake, run by the gateway so that it learns how each one ends.
//!
//! Pingora's own TLS listener logs a failed handshake and drops it, so no code of the gateway
//! learns about failures inside OpenSSL. The TLS listeners are therefore plain TCP listeners
//! whose connections [`ProxyListener`] hands to [`Handshaker`] first: it runs Pingora's
//! handshake with this module's callbacks, counts the outcome by domain and reason, and passes
//! the TLS connection on to the HTTP proxy.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::ServerApp;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::tls::ssl::{
    select_next_proto, AlpnError, NameType, SslAcceptor, SslMethod, SslRef, SslVersion,
};

use super::{CertStore, HandshakeFailure, TlsConnection, TlsStore};
use crate::status::Monitor;

/// Maximum time from accepting a TLS connection to the end of its handshake. Pingora 0.9.1
/// puts the same limit on the handshakes of its own listeners.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// ALPN protocols in order of preference, in wire format: HTTP/2, then HTTP/1.1.
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";

/// The label of handshakes that failed before a server name selected a domain.
const NO_DOMAIN: &str = "-";

/// A listener's connection handler: the TLS handshake when the listener has one, then `app`.
pub struct ProxyListener<A> {
    app: Arc<A>,
    tls: Option<Handshaker>,
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
        Self { app, tls: None }
    }

    /// Runs the TLS handshake on each connection, then hands it to `app`.
    pub fn tls(app: Arc<A>, handshaker: Handshaker) -> Self {
        Self {
            app,
            tls: Some(handshaker),
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
        // Pingora passes back a kept-alive connection, which already has its TLS layer.
        let stream = match &self.tls {
            Some(handshaker) if stream.get_ssl().is_none() => handshaker.accept(stream).await?,
            _ => stream,
        };
        self.app.process_new(stream, shutdown).await
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
    async fn accept(&self, stream: Stream) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned());
        // Pingora's TCP listeners pass their `l4` stream boxed; the handshake needs it unboxed.
        let stream = match stream.into_any().downcast::<L4Stream>() {
            Ok(tcp) => *tcp,
            Err(_) => {
                tracing::error!(
                    peer = ?peer,
                    "TLS listener received a connection that is not a TCP stream; closing it"
                );
                let reason = Err(HandshakeFailure::Other);
                self.monitor.metrics.tls_handshake(NO_DOMAIN, reason);
                return None;
            }
        };

        let attempt = Attempt {
            store: self.store.current(),
            seen: Mutex::default(),
        };
        let handshake = handshake_with_callback(&self.acceptor, stream, &attempt);
        let result = tokio::time::timeout(self.timeout, handshake).await;

        let Seen { domain, failure } = std::mem::take(&mut *attempt.seen.lock());
        let label = domain.as_deref().unwrap_or(NO_DOMAIN);
        let (reason, error) = match result {
            Ok(Ok(tls)) => {
                self.monitor.metrics.tls_handshake(label, Ok(()));
                return Some(Box::new(tls));
            }
            Ok(Err(e)) => (HandshakeFailure::of_accept_error(&e), e.to_string()),
            Err(_) => {
                let millis = self.timeout.as_millis();
                let error = format!("the handshake did not finish within {millis} ms");
                (HandshakeFailure::Timeout, error)
            }
        };
        // What the callbacks learned beats OpenSSL's error: with no certificate installed, the
        // error names a missing cipher or signature algorithm.
        let reason = failure.unwrap_or(reason);
        self.monitor.metrics.tls_handshake(label, Err(reason));
        tracing::debug!(
            peer = ?peer,
            domain = label,
            %reason,
            %error,
            "TLS handshake failed"
        );
        None
    }
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

    /// Accepts one connection on a handshaker with no certificates and a 200 ms timeout, after
    /// `client` wrote to it; returns whether the handshake succeeded and the metrics text.
    async fn accept_one(client: &'static [u8]) -> (bool, String) {
        let monitor = Arc::new(Monitor::default());
        let store = Arc::new(TlsStore::new(CertStore::default()));
        let mut handshaker = Handshaker::new(&store, &monitor).expect("handshaker");
        handshaker.timeout = Duration::from_millis(200);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.write_all(client).await.expect("write");
            // Keep the connection open past the handshake timeout.
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
        let (server, _) = listener.accept().await.expect("accept");
        let stream: Stream = Box::new(L4Stream::from(server));
        let accepted = handshaker.accept(stream).await.is_some();
        client.await.expect("client");
        let text = monitor
            .metrics
            .render(&ScrapeInputs::default())
            .expect("render");
        (accepted, text)
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let (accepted, text) = accept_one(b"").await;
        assert!(!accepted);
        let line = "mirror_gateway_tls_handshake_failures_total{domain=\"-\",reason=\"timeout\"} 1";
        assert!(text.contains(line), "{text}");
    }

    #[tokio::test]
    async fn plain_http_is_malformed() {
        let (accepted, text) = accept_one(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
        assert!(!accepted);
        let line =
            "mirror_gateway_tls_handshake_failures_total{domain=\"-\",reason=\"malformed\"} 1";
        assert!(text.contains(line), "{text}");
    }
}
