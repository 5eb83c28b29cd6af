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

use std::time::Duration;

use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::lock::{CacheKeyLock, CacheLock, LockStatus, Locked, WritePermit};
use pingora::cache::CacheKey;

/// What the lock checks in the storage about a key (the combined cache key hash).
pub trait FillState: Send + Sync {
    /// Returns whether a fill of `key` is running and readable.
    fn fill_running(&self, key: &HashBinary) -> bool;

    /// Returns whether a complete response for `key` is stored, fresh or not.
    fn stored(&self, key: &HashBinary) -> bool;
}

/// Pingora's [`CacheLock`] that grants no write permit while the storage can already serve
/// the key; see the module documentation.
pub struct FillAwareLock {
    inner: CacheLock,
    storage: &'static dyn FillState,
    age_timeout: Duration,
}

impl FillAwareLock {
    /// Wraps a [`CacheLock`] with `age_timeout`, checking `storage` before each write permit.
    pub fn new(age_timeout: Duration, storage: &'static dyn FillState) -> Self {
        Self {
            inner: CacheLock::new(age_timeout),
            storage,
            age_timeout,
        }
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
            locked => locked,
        }
    }

    fn release(&self, key: &CacheKey, permit: WritePermit, reason: LockStatus) {
        self.inner.release(key, permit, reason);
    }

    fn custom_lock_status(&self, custom_no_cache: &'static str) -> LockStatus {
        self.inner.custom_lock_status(custom_no_cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        (fake, FillAwareLock::new(Duration::from_secs(10), fake))
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
