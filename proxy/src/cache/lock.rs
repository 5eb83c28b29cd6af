//! Pingora's cache lock, made to check the storage before it lets a request start a fill.
//!
//! With a storage that streams fills (`support_streaming_partial_write`), Pingora 0.9.1 releases
//! a key's lock as soon as the filling request has its miss handler, because later requests can
//! read the fill from the storage. A request looks the key up first and takes the lock after,
//! and the two steps are not atomic. A fill can start and release the lock between them, which
//! under load is likely because a disk lookup takes a blocking-thread round trip. The request
//! then found nothing and finds no lock, so it becomes a second writer and fetches from the
//! origin again. The same happens to a request that found a stale entry while a refresh of it
//! starts.
//!
//! [`FillAwareLock`] closes that gap. When Pingora's lock would hand out a write permit, it
//! first asks the storage whether a fill of the key is running, or, for a request that found
//! nothing, whether a response is stored by now. Both are published before the filling
//! request releases its lock, so this check cannot miss them. If so, the request gets a read
//! lock that is already released instead: it serves its stale response while the fill runs
//! (stale-while-revalidate) or looks the key up again and reads the fill.
//!
//! It also ends the wait for a fill that fails before the origin's response header while
//! nothing is stored for the key: the origin is unreachable, closes the connection, times out
//! or returns a 5xx status. Pingora would let the waiting requests compete for the lock again,
//! one new origin request after another, and after its retry limit send every one still
//! waiting to the origin on its own. Instead the lock records the failure in [`FailedFills`]
//! and releases the waiters as it would for an uncacheable response. Each waiter then finds
//! the record and sends a 502 of its own without an origin request (see the gateway's
//! `proxy_upstream_filter`). The next request starts one new fill.
//!
//! Each write permit it grants starts a fill, so it notes the purge log's mark for the key
//! then ([`PurgeLog::fill_started`]), and removes it when the permit is released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::lock::{CacheKeyLock, CacheLock, LockStatus, Locked, WritePermit};
use pingora::cache::CacheKey;

use super::purge_log::PurgeLog;
use super::CacheClock;
use crate::cache::KeyHashMap;

/// A fill that fails within this time after the key's last failure, with no success between,
/// is a repeated failure. Longer than the default origin read timeout (30 s), so that the fill
/// the waiters of a first failure start counts as a repeat when it fails too.
const FAILED_FILL_MEMORY: Duration = Duration::from_secs(60);

/// The size at which a [`TimedMap`] first drops its old records.
const FAILED_FILL_PRUNE_AT: usize = 1024;

/// A status noted by a filling request is used only by a failure within this time.
const NOTED_STATUS_MEMORY: Duration = Duration::from_secs(1);

/// The status that the waiters of a failed fill get when the filling request noted none.
const DEFAULT_FAILED_STATUS: u16 = 502;

/// What the lock checks in the storage about a key (the combined cache key hash).
pub trait FillState: Send + Sync {
    /// Returns whether a fill of `key` is running and readable.
    fn fill_running(&self, key: &HashBinary) -> bool;

    /// Returns whether a complete response for `key` is stored, fresh or not.
    fn stored(&self, key: &HashBinary) -> bool;
}

/// Records by primary key hash, each with the time it was made. Once the map contains
/// [`FAILED_FILL_PRUNE_AT`] records, and then each time it has doubled since the last pruning,
/// an insert drops the records older than the map's limit. So pruning costs a constant time per
/// insert on average, however many keys fail at once.
struct TimedMap<V> {
    records: KeyHashMap<V>,
    prune_at: usize,
    /// Records older than this are dropped when the map is pruned.
    keep: Duration,
}

impl<V> TimedMap<V> {
    fn new(keep: Duration) -> Self {
        Self {
            records: KeyHashMap::default(),
            prune_at: FAILED_FILL_PRUNE_AT,
            keep,
        }
    }

    /// Inserts `value` for `key` at `now`, first pruning when the map is due. `made_at`
    /// returns when a record was made. Returns the record that `value` replaced.
    fn insert(
        &mut self,
        key: HashBinary,
        value: V,
        now: Instant,
        made_at: impl Fn(&V) -> Instant,
    ) -> Option<V> {
        if self.records.len() >= self.prune_at {
            let keep = self.keep;
            self.records
                .retain(|_, record| now.saturating_duration_since(made_at(record)) < keep);
            self.prune_at = (self.records.len() * 2).max(FAILED_FILL_PRUNE_AT);
        }
        self.records.insert(key, value)
    }
}

/// The last failure of a key's fill.
#[derive(Debug, Clone, Copy)]
struct Failure {
    at: Instant,
    /// `at` plus the offset of the cache clock then, which only tests move.
    clock_at: Instant,
    /// The status that the requests which waited on the fill get.
    status: u16,
}

/// The fills that failed before their response header, by primary key hash: for each key
/// whose last fill failed, that failure.
pub struct FailedFills {
    failures: Mutex<TimedMap<Failure>>,
    /// Whether `failures` has entries, so that a successful fill skips the lock.
    any: AtomicBool,
    /// The status each filling request noted for its waiters, and when.
    noted: Mutex<TimedMap<(Instant, u16)>>,
    /// When a request last found the stored entry of each key expired and outside its
    /// stale-if-error window, so that a failed refresh cannot serve the waiters.
    unservable: Mutex<TimedMap<Instant>>,
}

impl Default for FailedFills {
    fn default() -> Self {
        Self {
            failures: Mutex::new(TimedMap::new(FAILED_FILL_MEMORY)),
            any: AtomicBool::new(false),
            noted: Mutex::new(TimedMap::new(NOTED_STATUS_MEMORY)),
            unservable: Mutex::new(TimedMap::new(FAILED_FILL_MEMORY)),
        }
    }
}

impl FailedFills {
    /// Records that the fill of `key` failed at `now`, when the cache clock was `offset` ahead.
    /// Returns whether the key's previous fill had failed too, within [`FAILED_FILL_MEMORY`].
    fn record(&self, key: HashBinary, now: Instant, offset: Duration) -> bool {
        let noted = lock(&self.noted).records.remove(&key);
        let status = noted
            .filter(|(at, _)| now.saturating_duration_since(*at) < NOTED_STATUS_MEMORY)
            .map_or(DEFAULT_FAILED_STATUS, |(_, status)| status);
        let mut failures = lock(&self.failures);
        self.any.store(true, Ordering::Relaxed);
        let failure = Failure {
            at: now,
            clock_at: now + offset,
            status,
        };
        let previous = failures.insert(key, failure, now, |failure| failure.at);
        previous
            .is_some_and(|previous| now.saturating_duration_since(previous.at) < FAILED_FILL_MEMORY)
    }

    /// Forgets the failures of `key`, whose fill succeeded.
    fn clear(&self, key: &HashBinary) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut failures = lock(&self.failures);
        failures.records.remove(key);
        if failures.records.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
    }

    /// Notes that a request found the stored entry of `key` expired and outside its
    /// stale-if-error window at `now`.
    pub fn note_unservable(&self, key: HashBinary, now: Instant) {
        lock(&self.unservable).insert(key, now, now, |at| *at);
    }

    /// Returns whether the stored entry of `key` was found unservable on error within
    /// [`FAILED_FILL_MEMORY`] before `now`, and removes that note.
    fn take_unservable(&self, key: &HashBinary, now: Instant) -> bool {
        let noted = lock(&self.unservable).records.remove(key);
        noted.is_some_and(|at| now.saturating_duration_since(at) < FAILED_FILL_MEMORY)
    }

    /// Notes `status` as what the waiters get if the fill of `key`, which the caller runs,
    /// fails now: the origin's 5xx, or 503 when no origin slot was free.
    pub fn note_status(&self, key: HashBinary, status: u16, now: Instant) {
        lock(&self.noted).insert(key, (now, status), now, |(at, _)| *at);
    }

    /// Returns the status for the waiters of the last fill of `key` when that fill failed at
    /// or after `since`. A request that started at `since` and that the lock then sent to the
    /// origin was waiting on that fill.
    pub fn failed_since(&self, key: &HashBinary, since: Instant) -> Option<u16> {
        let failure = lock(&self.failures).records.get(key).copied()?;
        (failure.at >= since).then_some(failure.status)
    }

    /// Returns whether the last fill of `key` failed within `window` before `now`, both times
    /// plus the cache clock's offset.
    pub fn failed_within(&self, key: &HashBinary, window: Duration, now: Instant) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let failures = lock(&self.failures);
        failures
            .records
            .get(key)
            .is_some_and(|failure| now.saturating_duration_since(failure.clock_at) < window)
    }
}

/// Locks `map`, also after a panic of another holder: the maps stay consistent.
fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pingora's [`CacheLock`] that grants no write permit while the storage can already serve
/// the key and ends the wait of a failed fill; see the module documentation.
pub struct FillAwareLock {
    inner: CacheLock,
    storage: &'static dyn FillState,
    purges: &'static PurgeLog,
    age_timeout: Duration,
    failed: FailedFills,
    clock: CacheClock,
}

impl FillAwareLock {
    /// Wraps a [`CacheLock`] with `age_timeout`, checking `storage` before each write permit
    /// and noting the start of each fill in `purges`. Failures are also timed by `clock`.
    pub fn new(
        age_timeout: Duration,
        storage: &'static dyn FillState,
        purges: &'static PurgeLog,
        clock: CacheClock,
    ) -> Self {
        Self {
            inner: CacheLock::new(age_timeout),
            storage,
            purges,
            age_timeout,
            failed: FailedFills::default(),
            clock,
        }
    }

    /// Returns the fills that failed before their response header.
    pub fn failed_fills(&self) -> &FailedFills {
        &self.failed
    }

    /// Returns whether the request would only repeat a fill the storage already has.
    fn storage_serves(&self, key: &CacheKey, stale_writer: bool) -> bool {
        let name = key.combined_bin();
        // A stale writer found the stored response itself, so only a running fill counts.
        self.storage.fill_running(&name) || (!stale_writer && self.storage.stored(&name))
    }
}

impl CacheKeyLock for FillAwareLock {
    fn lock(&self, key: &CacheKey, stale_writer: bool) -> Locked {
        match self.inner.lock(key, stale_writer) {
            Locked::Write(permit) if self.storage_serves(key, stale_writer) => {
                // Readers that joined this permit meanwhile look the key up again, too.
                self.inner.release(key, permit, LockStatus::Done);
                let (mut released, stub) =
                    WritePermit::new(self.age_timeout, stale_writer, Default::default());
                released.unlock(LockStatus::Done);
                Locked::Read(stub.read_lock())
            }
            Locked::Write(permit) => {
                self.purges.fill_started(key.primary_bin());
                Locked::Write(permit)
            }
            locked => locked,
        }
    }

    fn release(&self, key: &CacheKey, permit: WritePermit, reason: LockStatus) {
        let name = key.primary_bin();
        self.purges.fill_ended(&name);
        if reason != LockStatus::TransientError {
            self.failed.clear(&name);
            self.inner.release(key, permit, reason);
            return;
        }
        let now = Instant::now();
        let again = self.failed.record(name, now, self.clock.offset());
        // The waiters compete once more after a first failure, so that one request the
        // origin rejects does not fail them all. A stored entry within its stale-if-error
        // window still serves them, so they always compete then.
        let serves_stale =
            self.storage.stored(&key.combined_bin()) && !self.failed.take_unservable(&name, now);
        if again && !serves_stale {
            self.inner.release(key, permit, LockStatus::GiveUp);
        } else {
            self.inner.release(key, permit, reason);
        }
    }

    /// Treats an origin 5xx as a failed fill. Any other reason not to store the response sends
    /// the waiting requests to the origin on their own, as Pingora does.
    fn custom_lock_status(&self, custom_no_cache: &'static str) -> LockStatus {
        if custom_no_cache == super::NoStoreReason::OriginError.label() {
            LockStatus::TransientError
        } else {
            self.inner.custom_lock_status(custom_no_cache)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::lock::ReadLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Fake {
        running: AtomicBool,
        stored: AtomicBool,
    }

    impl FillState for Fake {
        fn fill_running(&self, _key: &HashBinary) -> bool {
            self.running.load(Ordering::SeqCst)
        }

        fn stored(&self, _key: &HashBinary) -> bool {
            self.stored.load(Ordering::SeqCst)
        }
    }

    fn setup() -> (&'static Fake, FillAwareLock) {
        let fake: &'static Fake = Box::leak(Box::default());
        let purges: &'static PurgeLog = Box::leak(Box::default());
        let lock = FillAwareLock::new(Duration::from_secs(10), fake, purges, CacheClock::system());
        (fake, lock)
    }

    fn release(lock: &FillAwareLock, key: &CacheKey, locked: Locked) {
        match locked {
            Locked::Write(permit) => lock.release(key, permit, LockStatus::Done),
            Locked::Read(_) => panic!("expected a write permit"),
        }
    }

    #[tokio::test]
    async fn lock_grants_write_when_nothing_runs() {
        let (_, lock) = setup();
        let key = CacheKey::new("k", "t");
        let first = lock.lock(&key, false);
        assert!(first.is_write());
        assert!(!lock.lock(&key, false).is_write(), "second request waits");
        release(&lock, &key, first);
    }

    #[tokio::test]
    async fn lock_sends_late_miss_to_running_fill() {
        let (fake, lock) = setup();
        let key = CacheKey::new("k", "t");
        fake.running.store(true, Ordering::SeqCst);
        let Locked::Read(read) = lock.lock(&key, false) else {
            panic!("a write permit while a fill runs");
        };
        assert_eq!(read.lock_status(), LockStatus::Done);
        assert!(!read.locked(), "the read lock is already released");
        fake.running.store(false, Ordering::SeqCst);
        release(&lock, &key, lock.lock(&key, false));
    }

    /// Takes the write permit and one read lock of `key`.
    fn writer_and_reader(lock: &FillAwareLock, key: &CacheKey) -> (WritePermit, ReadLock) {
        lock_pair(lock, key, false)
    }

    /// Takes the write permit and one read lock of `key` as two requests that found its
    /// stored entry expired.
    fn refresher_and_reader(lock: &FillAwareLock, key: &CacheKey) -> (WritePermit, ReadLock) {
        lock_pair(lock, key, true)
    }

    fn lock_pair(lock: &FillAwareLock, key: &CacheKey, stale: bool) -> (WritePermit, ReadLock) {
        let Locked::Write(permit) = lock.lock(key, stale) else {
            panic!("the first request waits");
        };
        let Locked::Read(read) = lock.lock(key, stale) else {
            panic!("the second request writes");
        };
        (permit, read)
    }

    /// Fails one fill of `key` without waiting requests.
    fn fail_alone(lock: &FillAwareLock, key: &CacheKey) {
        let Locked::Write(permit) = lock.lock(key, false) else {
            panic!("the filling request waits");
        };
        lock.release(key, permit, LockStatus::TransientError);
    }

    #[tokio::test]
    async fn first_failure_lets_waiters_compete() {
        let (_, lock) = setup();
        let key = CacheKey::new("k", "t");
        let before = Instant::now();
        let (permit, read) = writer_and_reader(&lock, &key);
        lock.release(&key, permit, LockStatus::TransientError);
        read.wait().await;
        assert_eq!(read.lock_status(), LockStatus::TransientError);
        let failed = lock.failed_fills();
        assert_eq!(failed.failed_since(&key.primary_bin(), before), Some(502));
    }

    #[tokio::test]
    async fn second_failure_ends_the_wait() {
        let (_, lock) = setup();
        let key = CacheKey::new("k", "t");
        fail_alone(&lock, &key);
        let before = Instant::now();
        let (permit, read) = writer_and_reader(&lock, &key);
        lock.release(&key, permit, LockStatus::TransientError);
        read.wait().await;
        assert_eq!(read.lock_status(), LockStatus::GiveUp, "no new competition");
        let name = key.primary_bin();
        assert_eq!(lock.failed_fills().failed_since(&name, before), Some(502));
        assert_eq!(
            lock.failed_fills().failed_since(&name, Instant::now()),
            None
        );
        // The next request fills anew: `release` panics on a read lock.
        release(&lock, &key, lock.lock(&key, false));
    }

    #[test]
    fn pruning_waits_for_the_map_to_double() {
        let mut map = TimedMap::new(Duration::from_secs(60));
        let now = Instant::now();
        let key = |i: usize| {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            key
        };
        for i in 0..=FAILED_FILL_PRUNE_AT {
            map.insert(key(i), now, now, |at| *at);
        }
        assert_eq!(
            map.prune_at,
            2 * FAILED_FILL_PRUNE_AT,
            "nothing was old enough"
        );
        assert_eq!(map.records.len(), FAILED_FILL_PRUNE_AT + 1);
    }

    #[test]
    fn old_failure_is_no_repeat() {
        let failed = FailedFills::default();
        let now = Instant::now();
        let long_ago = now
            .checked_sub(FAILED_FILL_MEMORY)
            .expect("a monotonic past");
        assert!(
            !failed.record([1; 16], long_ago, Duration::ZERO),
            "a first failure"
        );
        assert!(
            !failed.record([1; 16], now, Duration::ZERO),
            "after a long pause"
        );
        assert!(failed.record([1; 16], now, Duration::ZERO), "at once");
    }

    #[tokio::test]
    async fn noted_status_reaches_waiters() {
        let (_, lock) = setup();
        let key = CacheKey::new("k", "t");
        let name = key.primary_bin();
        let failed = lock.failed_fills();
        let before = Instant::now();
        failed.note_status(name, 503, Instant::now());
        fail_alone(&lock, &key);
        assert_eq!(failed.failed_since(&name, before), Some(503));
        let long_ago = Instant::now()
            .checked_sub(NOTED_STATUS_MEMORY * 2)
            .expect("a monotonic past");
        failed.note_status(name, 504, long_ago);
        fail_alone(&lock, &key);
        assert_eq!(failed.failed_since(&name, before), Some(502), "an old note");
    }

    #[tokio::test]
    async fn failed_refresh_keeps_competition() {
        let (fake, lock) = setup();
        let key = CacheKey::new("k", "t");
        fake.stored.store(true, Ordering::SeqCst);
        for attempt in 1..=2 {
            let (permit, read) = refresher_and_reader(&lock, &key);
            lock.release(&key, permit, LockStatus::TransientError);
            read.wait().await;
            assert_eq!(read.lock_status(), LockStatus::TransientError, "{attempt}");
        }
        let failed = lock.failed_fills();
        let window = Duration::from_secs(1);
        assert!(failed.failed_within(&key.primary_bin(), window, Instant::now()));
        let later = Instant::now() + window;
        assert!(!failed.failed_within(&key.primary_bin(), window, later));
    }

    #[tokio::test]
    async fn failed_refresh_without_stale_ends_the_wait() {
        let (fake, lock) = setup();
        let key = CacheKey::new("k", "t");
        let name = key.primary_bin();
        fake.stored.store(true, Ordering::SeqCst);
        let mut statuses = Vec::new();
        for _ in 0..2 {
            lock.failed_fills().note_unservable(name, Instant::now());
            let (permit, read) = refresher_and_reader(&lock, &key);
            lock.release(&key, permit, LockStatus::TransientError);
            read.wait().await;
            statuses.push(read.lock_status());
        }
        assert_eq!(statuses, [LockStatus::TransientError, LockStatus::GiveUp]);
    }

    #[tokio::test]
    async fn finished_fill_forgets_failure() {
        let (_, lock) = setup();
        let key = CacheKey::new("k", "t");
        let before = Instant::now();
        fail_alone(&lock, &key);
        let (permit, read) = writer_and_reader(&lock, &key);
        lock.release(&key, permit, LockStatus::Done);
        read.wait().await;
        assert_eq!(read.lock_status(), LockStatus::Done);
        assert_eq!(
            lock.failed_fills().failed_since(&key.primary_bin(), before),
            None
        );
        // A failure after the success is a first failure again: the waiters compete.
        let (permit, read) = writer_and_reader(&lock, &key);
        lock.release(&key, permit, LockStatus::TransientError);
        read.wait().await;
        assert_eq!(read.lock_status(), LockStatus::TransientError);
    }

    #[test]
    fn origin_error_is_a_failed_fill() {
        let (_, lock) = setup();
        let origin_error = crate::cache::NoStoreReason::OriginError.label();
        assert_eq!(
            lock.custom_lock_status(origin_error),
            LockStatus::TransientError
        );
        let not_stored = crate::cache::NoStoreReason::OriginNoStore.label();
        assert_eq!(lock.custom_lock_status(not_stored), LockStatus::GiveUp);
    }

    #[test]
    fn failed_fills_prune_old_records() {
        let failed = FailedFills::default();
        let start = Instant::now();
        let old = start
            .checked_sub(FAILED_FILL_MEMORY)
            .expect("a monotonic past");
        for i in 0..FAILED_FILL_PRUNE_AT {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            failed.record(key, old, Duration::ZERO);
        }
        failed.record([0xff; 16], start, Duration::ZERO);
        let failures = lock(&failed.failures);
        assert_eq!(failures.records.len(), 1, "only the new record is left");
        assert_eq!(failures.prune_at, FAILED_FILL_PRUNE_AT);
    }

    #[tokio::test]
    async fn write_permit_notes_fill_start() {
        let (fake, lock) = setup();
        let key = CacheKey::new("k", "t");
        let name = key.primary_bin();
        let first = lock.lock(&key, false);
        assert_eq!(
            lock.purges.fill_mark(&name),
            Some(0),
            "noted with the permit"
        );
        release(&lock, &key, first);
        assert_eq!(lock.purges.fill_mark(&name), None, "forgotten on release");
        fake.running.store(true, Ordering::SeqCst);
        assert!(!lock.lock(&key, false).is_write());
        assert_eq!(lock.purges.fill_mark(&name), None, "no fill starts");
    }

    #[tokio::test]
    async fn lock_stale_writer_ignores_stored_entry() {
        let (fake, lock) = setup();
        let key = CacheKey::new("k", "t");
        fake.stored.store(true, Ordering::SeqCst);
        assert!(!lock.lock(&key, false).is_write(), "a miss when stored");
        let stale = lock.lock(&key, true);
        assert!(stale.is_write(), "the refresh of a stored entry");
        release(&lock, &key, stale);
    }
}
