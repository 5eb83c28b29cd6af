//! Corking the client's socket while a cached body goes out, as nginx's `tcp_nopush` does.
//!
//! Pingora writes a response header and each body chunk of up to 1 MiB with a `sendto` of its
//! own, and the client connection has `TCP_NODELAY`. So each write ends in a short segment
//! of its own: the header alone, and the tail of every chunk (1 MiB is not a whole number of
//! segments). Corking keeps those back until they fill a segment, and uncorking sends the
//! rest. For a large cached body that means fewer, fuller packets, and the header leaves in
//! the same segment as the first body bytes.
//!
//! That last point matters to the client's receive window. Linux grows a receive buffer by what
//! the application reads per estimated round trip, and it has two estimators for that round
//! trip (`net/ipv4/tcp_input.c`). One takes the timestamp echoed by the first segment after a
//! new echo, at millisecond resolution, but only when that segment is full-sized. The other
//! keeps the shortest time in which one receive window arrived. A header sent alone uses up the
//! echo of the request without a timestamp sample. So on a path under a millisecond (loopback,
//! one rack) the second estimator wins, and because a small window arrives in a fraction of a
//! millisecond, the buffer and the window stay small. The body then goes out in window-sized
//! pieces on the client's own CPU, and the rate drops. On a 2 vCPU AMD virtual machine (Linux
//! 6.18), wrk's windows to an uncorked gateway were 1 to 4 MB with a round trip estimate of 0.1
//! to 0.3 ms, against 7 to 18 MB and 1 ms corked, and uncorked 1 MB hits ran at 0.59 to 0.76
//! times Varnish's rate against 0.70 to 1.16 corked. Hence `server.tcp_nopush` is on by
//! default. On a 2 vCPU Intel virtual machine, an earlier comparison of few rounds found corked
//! 1 MB bodies 8 to 15% slower, with the client woken more often per response.
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
    // SAFETY: `fd` is the socket of a live client session: the callers keep the `Cork`
    // within the request that owns the session, so the descriptor stays open meanwhile.
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
