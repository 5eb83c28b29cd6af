//! The wait for an HTTP/2 client's connection preface, bounded in time and by a shutdown.
//!
//! Pingora 0.9.1 waits for the 24-byte preface that opens every HTTP/2 connection without a
//! limit, and its idle timeout starts only after it. A TLS client that negotiated `h2` and then
//! sent nothing would keep its connection open, and a graceful shutdown waiting, for as long as
//! it liked. The listener reads the preface first and hands it back in front of the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef, ALPN};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Length of the HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// Maximum wait for the preface when the listener sets none.
pub const PREFACE_WAIT: Duration = Duration::from_secs(30);

/// Reads the preface of an HTTP/2 connection and returns the stream with it put back, or
/// `None` when the client sends no preface within `wait`, closes, or a shutdown begins first.
pub async fn await_preface(
    mut stream: Stream,
    wait: Duration,
    shutdown: &ShutdownWatch,
) -> Option<Stream> {
    let mut preface = [0u8; PREFACE_LEN];
    let mut shutdown = shutdown.clone();
    let read = tokio::time::timeout(wait, stream.read_exact(&mut preface));
    tokio::select! {
        result = read => match result {
            Ok(Ok(_)) => Some(Box::new(Prefixed::new(preface.to_vec(), stream))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 client closed before its connection preface");
                None
            }
            Err(_) => {
                tracing::debug!(wait_secs = wait.as_secs(), "HTTP/2 client sent no connection preface in time; closing");
                None
            }
        },
        _ = wait_for_shutdown(&mut shutdown) => None,
    }
}

/// Returns once a shutdown began; never when the sender is gone without one.
async fn wait_for_shutdown(shutdown: &mut ShutdownWatch) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
struct Prefixed {
    prefix: Vec<u8>,
    /// How much of `prefix` was read again.
    replayed: usize,
    inner: Stream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, inner: Stream) -> Self {
        Self {
            prefix,
            replayed: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.prefix.len() {
            let rest = &this.prefix[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Prefixed {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for Prefixed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Prefixed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Prefixed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Prefixed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Prefixed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest);
    }
}

#[async_trait]
impl Peek for Prefixed {}
