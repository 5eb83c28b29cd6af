//! The clock that the gateway's freshness decisions follow: the system clock, or, in tests, the
//! system clock moved forward by an offset.
//!
//! Pingora 0.9.1 judges a stored response by `SystemTime::now()` (`CacheMeta::is_fresh`, and the
//! stale-while-revalidate and stale-if-error windows), so a test cannot pause or move its time.
//! The gateway therefore stamps every response it stores with [`CacheClock::now`], and its
//! `cache_hit_filter` hands Pingora a stored response whose freshness is shifted back by the
//! clock's offset ([`CacheClock::forced_freshness`]). Pingora's own checks against the system
//! clock then decide as they would at the clock's time. With the system clock (the
//! only one a config can give) the offset is zero and the hook does nothing.
//!
//! NOTE: the `Age` header that Pingora computes on hits still uses the system clock, so with a
//! moved clock it is 0 on entries stored after a move.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::cache::{CacheMeta, ForcedFreshness};

/// The time the cache stores responses by and judges them by.
#[derive(Debug, Clone, Default)]
pub struct CacheClock {
    /// Nanoseconds ahead of the system clock; `None` for the system clock itself.
    offset: Option<Arc<AtomicU64>>,
}

impl CacheClock {
    /// Returns the system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Returns the current time of this clock.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + self.offset()
    }

    /// Returns how far this clock is ahead of the system clock.
    pub fn offset(&self) -> Duration {
        self.offset.as_ref().map_or(Duration::ZERO, |nanos| {
            Duration::from_nanos(nanos.load(Ordering::Relaxed))
        })
    }

    /// Decides how Pingora must treat a stored response that it is about to judge by the
    /// system clock, so that its decisions match this clock.
    ///
    /// `meta` was stored with times of this clock. Returns `None` when Pingora's own check
    /// decides right: always for the system clock, and for a response fresh at this clock's
    /// time (it is then fresh at the earlier system time too). Otherwise the response
    /// is expired at the system time `fresh_until - offset`, which keeps its stale windows
    /// the same length, measured from its expiry as seen by this clock.
    pub fn forced_freshness(&self, meta: &CacheMeta) -> Option<ForcedFreshness> {
        let offset = self.offset();
        if offset.is_zero() || meta.is_fresh(SystemTime::now() + offset) {
            return None;
        }
        let expired_at = meta
            .fresh_until()
            .checked_sub(offset)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Some(ForcedFreshness::ForceExpiredServeStale {
            expired_at: Some(expired_at),
        })
    }
}

/// A handle that moves a [`CacheClock`] forward, for tests of expiry and stale windows.
///
/// Only a test harness makes one ([`TestClock::new`], then `App::build_with_cache_clock`); no
/// config key reaches it.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct TestClock {
    offset: Arc<AtomicU64>,
}

impl TestClock {
    /// Creates a clock that starts at the system time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Returns the cache clock that this handle moves.
    pub fn cache_clock(&self) -> CacheClock {
        CacheClock {
            offset: Some(Arc::clone(&self.offset)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::ResponseHeader;

    fn stored_at(now: SystemTime, ttl: u64, swr: u32, sie: u32) -> CacheMeta {
        let header = ResponseHeader::build(200, None).expect("status");
        CacheMeta::new(now + Duration::from_secs(ttl), now, swr, sie, header)
    }

    #[test]
    fn system_clock_never_forces() {
        let clock = CacheClock::system();
        let meta = stored_at(SystemTime::UNIX_EPOCH, 1, 0, 0);
        assert!(clock.forced_freshness(&meta).is_none());
        assert_eq!(clock.offset(), Duration::ZERO);
    }

    #[test]
    fn moved_clock_expires_and_keeps_windows() {
        let test = TestClock::new();
        let clock = test.cache_clock();
        let mut meta = stored_at(clock.now(), 60, 10, 30);
        test.advance(Duration::from_secs(59));
        assert!(clock.forced_freshness(&meta).is_none(), "fresh 1 s before");

        test.advance(Duration::from_secs(2));
        let Some(ForcedFreshness::ForceExpiredServeStale {
            expired_at: Some(at),
        }) = clock.forced_freshness(&meta)
        else {
            panic!("a response 1 s past its TTL was not expired");
        };
        // What Pingora does with the result, then its own checks by the system clock.
        meta.expire_at(at);
        let now = SystemTime::now();
        assert!(!meta.is_fresh(now));
        assert!(meta.serve_stale_while_revalidate(now), "1 s into SWR");
        assert!(!meta.serve_stale_while_revalidate(now + Duration::from_secs(10)));
        assert!(meta.serve_stale_if_error(now + Duration::from_secs(28)));
        assert!(!meta.serve_stale_if_error(now + Duration::from_secs(30)));
    }
}
