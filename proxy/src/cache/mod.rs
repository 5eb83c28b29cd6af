//! Cache wiring: the memory tier, cache keys, cacheability and `X-Cache-Status`.

pub mod memory;
mod policy;
mod status;

use pingora::cache::eviction::lru::Manager as LruManager;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{CacheKey, CacheOptionOverrides, HttpCache};

pub use memory::{MemoryStorage, TierSnapshot, TierStats};
pub use policy::{decide_cacheability, NoStoreReason};
pub use status::cache_status;

use crate::config::CacheSettings;

/// Shards of the LRU eviction manager; more shards mean less lock contention.
const EVICTION_SHARDS: usize = 16;

/// The cache objects one gateway instance uses for every request.
///
/// Pingora needs `'static` references to the storage, eviction manager and lock, so they are
/// leaked once per gateway instance: a process that starts one gateway leaks a fixed amount.
pub struct CacheTier {
    storage: &'static MemoryStorage,
    eviction: &'static LruManager<EVICTION_SHARDS>,
    lock: &'static CacheKeyLockImpl,
    lock_wait_timeout: std::time::Duration,
    max_object_bytes: usize,
}

impl CacheTier {
    /// Creates the memory tier and its eviction manager and cache lock.
    pub fn new(settings: &CacheSettings) -> Self {
        // Capacity per shard is only a hint for preallocation: an estimate of 16 KiB per object.
        let per_shard = (settings.memory_bytes / (16 * 1024) / EVICTION_SHARDS).max(64);
        let eviction =
            LruManager::<EVICTION_SHARDS>::with_capacity(settings.memory_bytes, per_shard);
        let lock: Box<CacheKeyLockImpl> = CacheLock::new_boxed(settings.lock_age_timeout);
        Self {
            storage: Box::leak(Box::new(MemoryStorage::new(settings.max_object_bytes))),
            eviction: Box::leak(Box::new(eviction)),
            lock: Box::leak(lock),
            lock_wait_timeout: settings.lock_wait_timeout,
            max_object_bytes: settings.max_object_bytes,
        }
    }

    /// Turns the cache on for one request, with the lock that coalesces concurrent misses.
    pub fn enable(&self, cache: &mut HttpCache) {
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.lock_wait_timeout);
        cache.enable(
            self.storage,
            Some(self.eviction),
            None,
            Some(self.lock),
            Some(overrides),
        );
        cache.set_max_file_size_bytes(self.max_object_bytes);
    }

    /// Returns the memory tier's counters.
    pub fn memory_stats(&self) -> TierSnapshot {
        self.storage.stats().snapshot()
    }
}

/// Builds the cache key of a request.
///
/// The primary key frames each part with its length so that no two different requests share a
/// key: the domain id (no entry is ever served to another domain), the method class (`GET` and
/// `HEAD` share entries; nothing else is cached), the export id for export-tree origins (a new
/// export never hits an old export's entries), the normalised path and the query.
pub fn cache_key(domain: &str, export: Option<&str>, path: &str, query: Option<&str>) -> CacheKey {
    let mut primary = Vec::with_capacity(domain.len() + path.len() + 48);
    for part in [
        domain,
        "GET",
        export.unwrap_or(""),
        path,
        query.unwrap_or(""),
    ] {
        primary.extend_from_slice(part.len().to_string().as_bytes());
        primary.push(b':');
        primary.extend_from_slice(part.as_bytes());
    }
    CacheKey::new(primary, domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::key::CacheHashKey;

    #[test]
    fn cache_key_separates_domains() {
        let a = cache_key("primary", None, "/x", None);
        let b = cache_key("community", None, "/x", None);
        assert_ne!(a.combined_bin(), b.combined_bin());
    }

    #[test]
    fn cache_key_separates_exports_and_queries() {
        let base = cache_key("primary", Some("1"), "/x", None);
        assert_ne!(
            base.combined_bin(),
            cache_key("primary", Some("2"), "/x", None).combined_bin()
        );
        assert_ne!(
            base.combined_bin(),
            cache_key("primary", Some("1"), "/x", Some("a=1")).combined_bin()
        );
    }

    #[test]
    fn cache_key_framing_is_unambiguous() {
        let a = cache_key("ab", None, "/c", None);
        let b = cache_key("a", None, "b/c", None);
        assert_ne!(a.combined_bin(), b.combined_bin());
    }
}
