//! The counters of one domain: a GCRA bucket per principal and in-flight requests per client IP.
//!
//! The generic cell rate algorithm keeps one instant per principal, its *theoretical arrival
//! time* (TAT): when the principal's bucket would be full again. A request at `now` is allowed
//! when `max(TAT, now) + interval` lies at most `burst * interval` after `now`, and then becomes
//! the new TAT. This is a token bucket of `burst` tokens refilled at one per `interval`, kept
//! exact with a single number.
//!
//! Tables live in a process-wide registry keyed by domain id, so a plugin rebuilt for the same
//! domain (a config reload) keeps every count. Both maps are split into shards, each behind its
//! own mutex, so concurrent requests from different clients rarely wait for each other.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::limits::BudgetState;

/// The owner of a rate budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A user that an authentication plugin accepted.
    User(String),
    /// The client IP of an anonymous request.
    Ip(IpAddr),
}

/// The rate of one budget: `burst` requests at once, refilled at one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Time to refill one request; at least 1 ns.
    pub interval: Duration,
    /// Requests allowed at once from a full bucket; at least 1.
    pub burst: u32,
}

/// The outcome of [`ClientTable::check_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// The request passes; the state is what the budget has left after it.
    Allow(BudgetState),
    /// The bucket is empty; a request passes again after `retry_after` (rounded up to seconds).
    Reject {
        state: BudgetState,
        retry_after_secs: u64,
    },
}

/// The counters of one domain.
pub struct ClientTable {
    /// Instants are kept as offsets from this one, so arithmetic cannot overflow an `Instant`.
    epoch: Instant,
    hasher: RandomState,
    buckets: [Mutex<BucketShard>; SHARDS],
    in_flight: [Mutex<HashMap<IpAddr, u32, RandomState>>; SHARDS],
}

/// A held place among a client IP's concurrent requests; the last clone to drop gives it back.
#[derive(Clone)]
pub struct ConcurrencySlot(Arc<Slot>);

/// Returns the table of `domain`, creating it on first use. Every call for the same domain id
/// returns the same table for the life of the process.
pub fn shared_table(domain: &str) -> Arc<ClientTable> {
    static TABLES: LazyLock<Mutex<HashMap<String, Arc<ClientTable>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut tables = TABLES.lock();
    Arc::clone(
        tables
            .entry(domain.to_string())
            .or_insert_with(|| Arc::new(ClientTable::new())),
    )
}

impl ClientTable {
    /// Builds an empty table. Instants passed to it later should not be earlier than this
    /// call; an earlier instant counts as the moment of this call.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            hasher: RandomState::default(),
            buckets: std::array::from_fn(|_| Mutex::new(BucketShard::default())),
            in_flight: std::array::from_fn(|_| Mutex::new(HashMap::default())),
        }
    }

    /// Counts a request of `principal` at `now` against `rate` and returns whether it passes.
    ///
    /// A rejected request does not use up anything. `RateLimit-Limit` is the burst,
    /// `RateLimit-Remaining` the whole requests left, and `RateLimit-Reset` the seconds until
    /// the bucket is full (allowed) or until the next request passes (rejected).
    pub fn check_rate(&self, principal: &Principal, rate: Rate, now: Instant) -> RateDecision {
        // Whole nanoseconds in a u64 cover 584 years after the epoch, and a window that long
        // lets every request through, as a longer one would.
        let now = nanos(now.saturating_duration_since(self.epoch));
        let interval = nanos(rate.interval).max(1);
        let burst = rate.burst.max(1);
        let window = interval.saturating_mul(burst.into());

        let mut shard = self.buckets[self.shard(principal)].lock();
        shard.prune(now);
        let shard = &mut *shard;
        let known = shard.tats.get_mut(principal);
        let tat = known
            .as_deref()
            .map_or(now, |bucket| bucket.tat_at(interval, now));
        let next = tat.saturating_add(interval);
        let used = next - now;

        if used > window {
            let wait = ceil_secs(used - window);
            let state = BudgetState {
                limit: burst.into(),
                remaining: 0,
                reset_secs: wait,
            };
            return RateDecision::Reject {
                state,
                retry_after_secs: wait,
            };
        }

        let bucket = Bucket {
            tat: next,
            interval,
        };
        match known {
            Some(known) => *known = bucket,
            None => {
                shard.tats.insert(principal.clone(), bucket);
            }
        }
        RateDecision::Allow(BudgetState {
            limit: burst.into(),
            remaining: (window - used) / interval,
            reset_secs: ceil_secs(used),
        })
    }

    /// Takes one of `max` places for concurrent requests from `ip`; `None` when all are held.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<ConcurrencySlot> {
        let mut counts = self.in_flight[self.shard(&ip)].lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(ConcurrencySlot(Arc::new(Slot {
            table: Arc::clone(self),
            ip,
        })))
    }

    /// Returns how many requests from `ip` hold a concurrency place now.
    pub fn in_flight(&self, ip: IpAddr) -> u32 {
        let counts = self.in_flight[self.shard(&ip)].lock();
        counts.get(&ip).copied().unwrap_or(0)
    }

    /// Returns how many principals have a bucket that is not full, pruning first when due.
    pub fn tracked(&self, now: Instant) -> usize {
        let now = nanos(now.saturating_duration_since(self.epoch));
        self.buckets
            .iter()
            .map(|shard| {
                let mut shard = shard.lock();
                shard.prune(now);
                shard.tats.len()
            })
            .sum()
    }

    fn release(&self, ip: IpAddr) {
        let mut counts = self.in_flight[self.shard(&ip)].lock();
        if let Some(count) = counts.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }

    fn shard(&self, key: &impl Hash) -> usize {
        // The remainder is below SHARDS, so it fits in usize.
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }
}

impl Default for ClientTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ClientTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTable")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl ConcurrencySlot {
    /// Returns the client IP the place is held for.
    pub fn ip(&self) -> IpAddr {
        self.0.ip
    }
}

impl fmt::Debug for ConcurrencySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConcurrencySlot").field(&self.0.ip).finish()
    }
}

/// Number of shards of each map.
const SHARDS: usize = 16;

/// How often a shard drops the buckets that are full again, in nanoseconds.
const PRUNE_EVERY: u64 = 10_000_000_000;

/// Buckets of one shard, by principal.
#[derive(Default)]
struct BucketShard {
    tats: HashMap<Principal, Bucket, RandomState>,
    next_prune: u64,
}

/// One principal's bucket: its TAT in nanoseconds after the table's epoch, and the interval
/// of the rate that set it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tat: u64,
    interval: u64,
}

impl Bucket {
    /// Returns the TAT at `now` for a rate of one request per `interval`, at least `now`.
    ///
    /// A reload may change the rate. The requests the bucket still owes for (the time from
    /// `now` to the TAT, in intervals of the old rate) then count at the new rate, so the new
    /// limit applies to the requests made so far. A faster rate frees a client at once as far
    /// as its new burst allows, and a slower one makes it wait longer.
    fn tat_at(&self, interval: u64, now: u64) -> u64 {
        let owed = self.tat.saturating_sub(now);
        if owed == 0 || interval == self.interval {
            return self.tat.max(now);
        }
        let rescaled = u128::from(owed) * u128::from(interval) / u128::from(self.interval.max(1));
        now.saturating_add(u64::try_from(rescaled).unwrap_or(u64::MAX))
    }
}

impl BucketShard {
    /// Drops every bucket that is full at `now`, at most once per [`PRUNE_EVERY`]. A full
    /// bucket is the same as no bucket, so pruning never changes a decision.
    fn prune(&mut self, now: u64) {
        if now < self.next_prune {
            return;
        }
        self.tats.retain(|_, bucket| bucket.tat > now);
        self.next_prune = now.saturating_add(PRUNE_EVERY);
    }
}

struct Slot {
    table: Arc<ClientTable>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.release(self.ip);
    }
}

/// Returns the whole nanoseconds of `d`, at most `u64::MAX`.
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(d.subsec_nanos().into())
}

/// Rounds nanoseconds up to whole seconds.
fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_sec(rate: f64, burst: u32) -> Rate {
        Rate {
            interval: Duration::from_secs_f64(1.0 / rate),
            burst,
        }
    }

    fn ip(text: &str) -> Principal {
        Principal::Ip(text.parse().expect("test IP"))
    }

    fn allowed(decision: RateDecision) -> Option<BudgetState> {
        match decision {
            RateDecision::Allow(state) => Some(state),
            RateDecision::Reject { .. } => None,
        }
    }

    fn retry_after(decision: RateDecision) -> Option<u64> {
        match decision {
            RateDecision::Allow(_) => None,
            RateDecision::Reject {
                retry_after_secs, ..
            } => Some(retry_after_secs),
        }
    }

    #[test]
    fn rate_allows_burst_then_rejects() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(1.0, 3);
        let a = ip("192.0.2.1");
        let remaining: Vec<_> = (0..3)
            .map(|_| allowed(table.check_rate(&a, rate, t0)).map(|s| s.remaining))
            .collect();
        assert_eq!(remaining, [Some(2), Some(1), Some(0)]);
        assert_eq!(retry_after(table.check_rate(&a, rate, t0)), Some(1));
    }

    #[test]
    fn rate_reports_limit_and_reset() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(0.5, 2);
        let first = allowed(table.check_rate(&ip("192.0.2.1"), rate, t0));
        let expected = BudgetState {
            limit: 2,
            remaining: 1,
            reset_secs: 2,
        };
        assert_eq!(first, Some(expected));
    }

    #[test]
    fn rate_extremes_stay_exact() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        // One request a day with a burst of 100 years, the longest the settings accept.
        let slow = Rate {
            interval: Duration::from_secs(86_400),
            burst: 36_500,
        };
        let first = allowed(table.check_rate(&ip("192.0.2.1"), slow, t0));
        let expected = BudgetState {
            limit: 36_500,
            remaining: 36_499,
            reset_secs: 86_400,
        };
        assert_eq!(first, Some(expected));
        // One request per nanosecond, burst 1: the second request in the same instant waits
        // 1 ns, which `Retry-After` rounds up to a second.
        let fast = Rate {
            interval: Duration::from_nanos(1),
            burst: 1,
        };
        let b = ip("192.0.2.2");
        let first = allowed(table.check_rate(&b, fast, t0));
        assert_eq!(first.map(|s| (s.remaining, s.reset_secs)), Some((0, 1)));
        assert_eq!(retry_after(table.check_rate(&b, fast, t0)), Some(1));
        let later = t0 + Duration::from_nanos(1);
        assert!(allowed(table.check_rate(&b, fast, later)).is_some());
    }

    #[test]
    fn rate_change_carries_requests_over() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        // One request a day, burst 24: 24 requests use the whole bucket.
        let daily = Rate {
            interval: Duration::from_secs(86_400),
            burst: 24,
        };
        for _ in 0..24 {
            assert!(allowed(table.check_rate(&a, daily, t0)).is_some());
        }
        assert_eq!(retry_after(table.check_rate(&a, daily, t0)), Some(86_400));
        // A reload to 100 a second with a burst of 100: the 24 requests owed take 24 of the
        // new bucket's 100 places.
        let fast = per_sec(100.0, 100);
        let after = allowed(table.check_rate(&a, fast, t0));
        assert_eq!(after.map(|s| s.remaining), Some(75));
        // Back to a slower rate: the 25 requests owed now take 25 days to repay.
        let slower = Rate {
            interval: Duration::from_secs(86_400),
            burst: 10,
        };
        assert_eq!(
            retry_after(table.check_rate(&a, slower, t0)),
            Some(16 * 86_400)
        );
    }

    #[test]
    fn rate_refills_one_token_per_interval() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(0.5, 1);
        let a = ip("192.0.2.1");
        assert!(allowed(table.check_rate(&a, rate, t0)).is_some());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(retry_after(table.check_rate(&a, rate, at(500))), Some(2));
        assert_eq!(retry_after(table.check_rate(&a, rate, at(1_000))), Some(1));
        assert_eq!(retry_after(table.check_rate(&a, rate, at(1_999))), Some(1));
        assert!(allowed(table.check_rate(&a, rate, at(2_000))).is_some());
        assert_eq!(retry_after(table.check_rate(&a, rate, at(2_000))), Some(2));
    }

    #[test]
    fn rate_rejection_uses_nothing() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(1.0, 1);
        let a = ip("192.0.2.1");
        assert!(allowed(table.check_rate(&a, rate, t0)).is_some());
        for _ in 0..5 {
            assert!(allowed(table.check_rate(&a, rate, t0)).is_none());
        }
        let later = t0 + Duration::from_secs(1);
        assert!(allowed(table.check_rate(&a, rate, later)).is_some());
    }

    #[test]
    fn rate_separates_principals() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(1.0, 1);
        assert!(allowed(table.check_rate(&ip("192.0.2.1"), rate, t0)).is_some());
        assert!(allowed(table.check_rate(&ip("192.0.2.2"), rate, t0)).is_some());
        let user = Principal::User("mirror".into());
        assert!(allowed(table.check_rate(&user, rate, t0)).is_some());
        assert!(allowed(table.check_rate(&ip("192.0.2.1"), rate, t0)).is_none());
    }

    #[test]
    fn rate_full_bucket_after_idle() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(10.0, 5);
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            table.check_rate(&a, rate, t0);
        }
        let later = t0 + Duration::from_secs(3600);
        let state = allowed(table.check_rate(&a, rate, later));
        assert_eq!(state.map(|s| s.remaining), Some(4));
    }

    #[test]
    fn prune_drops_full_buckets() {
        let table = ClientTable::new();
        let t0 = Instant::now();
        let rate = per_sec(1.0, 2);
        for n in 0..50u8 {
            table.check_rate(&ip(&format!("192.0.2.{n}")), rate, t0);
        }
        assert_eq!(table.tracked(t0), 50);
        assert_eq!(table.tracked(t0 + Duration::from_secs(60)), 0);
    }

    #[test]
    fn acquire_caps_and_releases() {
        let table = Arc::new(ClientTable::new());
        let addr: IpAddr = "192.0.2.1".parse().expect("test IP");
        let first = table.acquire(addr, 2);
        let second = table.acquire(addr, 2);
        assert!(first.is_some());
        assert!(second.is_some());
        assert!(table.acquire(addr, 2).is_none());
        assert_eq!(table.in_flight(addr), 2);
        drop(first);
        assert_eq!(table.in_flight(addr), 1);
        assert!(table.acquire(addr, 2).is_some());
    }

    #[test]
    fn slot_clones_release_once() {
        let table = Arc::new(ClientTable::new());
        let addr: IpAddr = "192.0.2.1".parse().expect("test IP");
        let other = table.acquire(addr, 5);
        let slot = table.acquire(addr, 5).expect("free place");
        let copy = slot.clone();
        drop(slot);
        assert_eq!(table.in_flight(addr), 2);
        drop(copy);
        assert_eq!(table.in_flight(addr), 1);
        drop(other);
        assert_eq!(table.in_flight(addr), 0);
    }

    #[test]
    fn shared_table_is_per_domain() {
        let a = shared_table("table-test-a");
        let again = shared_table("table-test-a");
        let b = shared_table("table-test-b");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &b));
    }
}
