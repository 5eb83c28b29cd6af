//! Corking the client's socket while a cached body goes out, as nginx's `tcp_nopush` does.
//!
//! Pingora writes a response header and each body chunk of up to 1 MiB with a `sendto` of its
//! own, and the client connection has `TCP_NODELAY`. So each write ends in a short segment
//! of its own: the header alone, and the tail of every chunk (1 MiB is not a whole number of
//! segments). Corking keeps those back until they fill a segment, and uncorking sends the
//! rest. For a large cached body that means fewer, fuller packets, and the header leaves in
//! the same segment as the first body bytes.
//!
//! That last point matters to a Linux client's receive window (`net/ipv4/tcp_input.c`). The
//! client grows its receive buffer by what it reads per estimated round trip. One estimate
//! comes from the timestamp echo, in whole milliseconds, of a segment that carries a new echo.
//! Only a full-sized segment gives a sample, and recent kernels take none for a difference of 0
//! ms (older ones count it as 1 ms). The other estimate is the shortest time in which one
//! window arrived. A header sent alone carries the echo of the request without giving a sample.
//! Corked, the first full segment carries it, and the sample spans the time the request waited
//! at the server. On loopback under load that is often 1 ms or more, whereas the window
//! estimate alone stays at a fraction of a millisecond and keeps the window small. On a 2 vCPU
//! AMD virtual machine (Linux 6.18) wrk's windows to an uncorked gateway were 1 to 4 MB,
//! against 7 to 18 MB corked. In `bench/compare.sh` runs there, 1 MB hits came to 0.78 times
//! Varnish's rate uncorked and to 0.94 and 0.97 times corked. Hence `server.tcp_nopush` is on
//! by default. On a 2 vCPU Intel virtual machine, an earlier comparison of a few rounds found
//! corked 1 MB bodies 8 to 15% slower, with the client woken more often per response.
//!
//! Only bodies whole in the cache are corked. A client that reads a fill still in progress
//! gets each piece as the origin sends it, so its tail must not wait (`gateway.rs` checks that
//! the hit handler can seek, which a reader of a fill cannot).
//!
//! Pingora 0.9.1 lends the socket as a descriptor number only (no `AsFd`), so setting the
//! option borrows the descriptor with the one `unsafe` call of this crate.

use std::os::fd::{BorrowedFd, RawFd};

use pingora::proxy::Session;

/// Bodies at least this long, whole in the cache, are sent with the socket corked.
const MIN_BODY: u64 = 64 * 1024;

/// A corked client socket, uncorked when dropped.
#[derive(Debug)]
pub struct Cork {
    fd: RawFd,
}

impl Cork {
    /// Corks the socket of `session`'s HTTP/1 connection for a body of `body_len` bytes that is
    /// whole in the cache. `None` for a body under [`MIN_BODY`], for HTTP/2 and for a socket
    /// that is not TCP.
    pub fn for_body(session: &Session, body_len: u64) -> Option<Cork> {
        if body_len < MIN_BODY {
            return None;
        }
        let fd = session.as_downstream().stream()?.id();
        Cork::on_fd(fd)
    }

    /// Corks the TCP socket `fd`, which must stay open until the `Cork` is dropped.
    fn on_fd(fd: RawFd) -> Option<Cork> {
        if fd < 0 {
            return None;
        }
        set_cork(fd, true).ok()?;
        Some(Cork { fd })
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if let Err(e) = set_cork(self.fd, false) {
            tracing::debug!(fd = self.fd, error = %e, "uncorking the client socket failed");
        }
    }
}

#[allow(unsafe_code)]
fn set_cork(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: `fd` is the socket of a live client session. A `Cork` is dropped before the
    // session's descriptor closes. A memory-tier hit drops its own when the body is written,
    // and `Gateway::logging`, which Pingora 0.9.1 calls before it finishes the session, drops
    // any other.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&socket).set_tcp_cork(on)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn cork_set_and_released() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let corked = || {
            socket2::SockRef::from(&server)
                .tcp_cork()
                .expect("read TCP_CORK")
        };

        let cork = Cork::on_fd(server.as_raw_fd()).expect("cork");
        assert!(corked());
        drop(cork);
        assert!(!corked());
        drop(client);
    }

    #[test]
    fn cork_skips_non_tcp() {
        let file = tempfile::tempfile().expect("tempfile");
        assert!(Cork::on_fd(file.as_raw_fd()).is_none());
        assert!(Cork::on_fd(-1).is_none());
    }
}
