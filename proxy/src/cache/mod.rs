//! Cache wiring: the memory and disk tiers, cache keys, cacheability and `X-Cache-Status`.

mod by_domain;
mod clock;
pub mod disk;
mod lock;
pub mod memory;
mod policy;
pub mod preconditions;
mod purge_log;
pub mod ranges;
mod raw_header;
mod status;
mod stored_meta;
mod sweep;
pub mod tiered;

use pingora::cache::key::CacheHashKey;
use pingora::cache::lock::CacheKeyLockImpl;
use pingora::cache::predictor::Predictor;
use pingora::cache::{CacheKey, CacheOptionOverrides, HttpCache, Storage};

pub use clock::{CacheClock, TestClock};
pub use disk::{DiskError, DiskSnapshot, DiskStorage};
pub use memory::{FreshHit, MemoryStorage, TierSnapshot, TierStats};
pub use policy::{decide_cacheability, refuses_shared_caching, validator_conflicts, NoStoreReason};
pub use status::cache_status;
pub use sweep::DiskSweeper;

use crate::config::CacheSettings;

/// A map keyed by cache key hashes, with foldhash in place of SipHash. The keys are BLAKE2b
/// hashes, which clients cannot steer into collisions. Moving these maps and the host table off
/// SipHash saved about 390 instructions per cached hit (`bench/quota.sh instructions`).
pub(crate) type KeyHashMap<V> =
    std::collections::HashMap<pingora::cache::key::HashBinary, V, foldhash::fast::RandomState>;

/// Shards of the predictor, and keys it remembers per shard.
const PREDICTOR_SHARDS: usize = 16;
const PREDICTOR_KEYS_PER_SHARD: usize = 1024;

/// The cache objects one gateway instance uses for every request.
///
/// Pingora needs `'static` references to the storage, predictor and lock, so they are leaked
/// once per gateway instance: a process that starts one gateway leaks a fixed amount. Each tier
/// keeps itself within its byte budget, so no Pingora eviction manager is used.
pub struct CacheTier {
    memory: &'static MemoryStorage,
    disk: Option<&'static DiskStorage>,
    /// Time between two sweeps of the disk tier's expired entries; `None` without a disk tier.
    disk_sweep_interval: Option<std::time::Duration>,
    /// The storage Pingora reads and writes: the memory tier alone, or memory in front of disk,
    /// with fills that honour purges made while they run.
    storage: &'static purge_log::PurgeAware,
    lock: &'static lock::FillAwareLock,
    /// Remembers keys whose response outgrew `max_object_bytes`, so that their next requests
    /// bypass the cache instead of failing again mid-body.
    predictor: &'static Predictor<PREDICTOR_SHARDS>,
    lock_wait_timeout: std::time::Duration,
    /// Largest response stored in any tier.
    max_object_bytes: usize,
    /// The time responses are stored and judged by.
    clock: CacheClock,
}

impl CacheTier {
    /// Creates the memory tier, the disk tier when configured (scanning its directory), the
    /// predictor and the cache lock; freshness follows `clock`.
    pub fn new(settings: &CacheSettings, clock: CacheClock) -> Result<Self, DiskError> {
        let disk = match &settings.disk {
            Some(disk) => {
                let storage =
                    DiskStorage::open(&disk.dir, disk.budget_bytes, disk.max_object_bytes)?;
                let report = storage.scan_report();
                tracing::info!(
                    dir = %disk.dir.display(),
                    entries = report.entries,
                    bytes = report.bytes,
                    corrupt_removed = report.corrupt_removed,
                    temp_removed = report.temp_removed,
                    evicted = report.evicted,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    sweep_interval_secs = disk.sweep_interval.as_secs(),
                    "disk cache loaded"
                );
                Some(&*Box::leak(Box::new(storage)))
            }
            None => None,
        };
        let max_object_bytes = settings
            .disk
            .as_ref()
            .map_or(settings.max_object_bytes, |d| {
                usize::try_from(d.max_object_bytes).unwrap_or(usize::MAX)
            })
            .max(settings.max_object_bytes);
        let memory: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(
            settings.memory_bytes,
            settings.max_object_bytes,
            max_object_bytes,
        )));
        let log: &'static purge_log::PurgeLog = Box::leak(Box::default());
        let (storage, fills): (&'static (dyn Storage + Sync), &'static dyn lock::FillState) =
            match disk {
                Some(disk) => {
                    let tiered = Box::leak(Box::new(tiered::TieredStorage::new(memory, disk, log)));
                    (tiered, tiered)
                }
                None => (memory, memory),
            };
        let lock = Box::new(lock::FillAwareLock::new(
            settings.lock_age_timeout,
            fills,
            log,
            clock.clone(),
        ));
        // Only Pingora's own reasons (response too large) are remembered: the gateway's reasons
        // (`Custom`) keep looking up, and coalescing, every request.
        let predictor = Predictor::new(PREDICTOR_KEYS_PER_SHARD, Some(|_| true));
        let storage = Box::leak(Box::new(purge_log::PurgeAware::new(
            storage, memory, disk, log,
        )));
        Ok(Self {
            memory,
            disk,
            disk_sweep_interval: settings.disk.as_ref().map(|d| d.sweep_interval),
            storage,
            lock: Box::leak(lock),
            predictor: Box::leak(Box::new(predictor)),
            lock_wait_timeout: settings.lock_wait_timeout,
            max_object_bytes,
            clock,
        })
    }

    /// Turns the cache on for one request, with the lock that coalesces concurrent misses;
    /// `lock_wait_timeout` overrides the cache-wide wait for another request's fill.
    pub fn enable(&self, cache: &mut HttpCache, lock_wait_timeout: Option<std::time::Duration>) {
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(lock_wait_timeout.unwrap_or(self.lock_wait_timeout));
        cache.enable(
            self.storage,
            None,
            Some(self.predictor),
            Some(self.lock as &'static CacheKeyLockImpl),
            Some(overrides),
        );
        cache.set_max_file_size_bytes(self.max_object_bytes);
    }

    /// Returns a copy of the memory tier's entry of `key` (a hash of [`key_hash`]), counting a
    /// memory hit. It does so only when the entry is fresh by the cache clock and a copy of it
    /// is the complete response to a plain GET or HEAD.
    pub fn fresh_memory_hit(&self, key: &pingora::cache::key::HashBinary) -> Option<FreshHit> {
        self.memory.fresh_hit(key, self.clock.now())
    }

    /// Returns the status for a request that started at `since` and that the cache lock sent
    /// to the origin. It is `Some` when the request waited on a fill of `key` (a hash of
    /// [`key_hash`]) that failed before its response header.
    pub fn fill_failed_since(
        &self,
        key: &pingora::cache::key::HashBinary,
        since: std::time::Instant,
    ) -> Option<u16> {
        self.lock.failed_fills().failed_since(key, since)
    }

    /// Returns whether the last fill or refresh of `key` failed within `window`, by the cache
    /// clock: moving a test clock forward ends the window too.
    pub fn fill_failed_within(
        &self,
        key: &pingora::cache::key::HashBinary,
        window: std::time::Duration,
    ) -> bool {
        let now = std::time::Instant::now() + self.clock.offset();
        self.lock.failed_fills().failed_within(key, window, now)
    }

    /// Notes that the stored entry of `key` is expired and outside its stale-if-error window,
    /// so that the requests waiting on a failed refresh of it get an error instead of
    /// competing for the next refresh.
    pub fn note_stale_unservable(&self, key: pingora::cache::key::HashBinary) {
        let failed = self.lock.failed_fills();
        failed.note_unservable(key, std::time::Instant::now());
    }

    /// Notes `status` as what the requests waiting on this request's fill of `key` get if the
    /// fill fails now.
    pub fn note_fill_status(&self, key: pingora::cache::key::HashBinary, status: u16) {
        let failed = self.lock.failed_fills();
        failed.note_status(key, status, std::time::Instant::now());
    }

    /// Returns the clock that stored responses are stamped and judged by.
    pub fn clock(&self) -> &CacheClock {
        &self.clock
    }

    /// Returns the cache-wide wait for another request's fill.
    pub fn lock_wait_timeout(&self) -> std::time::Duration {
        self.lock_wait_timeout
    }

    /// Returns the memory tier's counters.
    pub fn memory_stats(&self) -> TierSnapshot {
        self.memory.stats().snapshot()
    }

    /// Returns the disk tier's counters, when there is a disk tier.
    pub fn disk_stats(&self) -> Option<DiskSnapshot> {
        self.disk.map(DiskStorage::stats)
    }

    /// Returns the time between two sweeps of the disk tier; `None` without a disk tier.
    pub fn disk_sweep_interval(&self) -> Option<std::time::Duration> {
        self.disk_sweep_interval
    }

    /// Deletes the disk tier's entries whose stale windows ended before now by the cache
    /// clock, and returns them; `None` without a disk tier. Blocks on file deletions.
    pub fn sweep_disk(&self) -> Option<disk::PurgeReport> {
        let now = self.clock.now();
        self.disk
            .map(|disk| disk.sweep_expired(now, std::time::Duration::ZERO))
    }

    /// Returns the number of entries of `domain` (a domain id) in the memory tier plus those
    /// in the disk tier. A response held in both tiers counts twice.
    pub fn domain_entries(&self, domain: &str) -> u64 {
        let disk = self.disk.map_or(0, |disk| disk.domain_entries(domain));
        self.memory.domain_entries(domain) + disk
    }

    /// Removes the stored responses in `scope` from every tier and returns how many responses
    /// were removed (one held in both tiers counts once). It does blocking file I/O when there
    /// is a disk tier.
    pub fn purge(&self, scope: &PurgeScope) -> usize {
        // Recorded first, so that a fill publishing during the removal below still finds it.
        // A disk hit that starts before the removal ends counts it as after its start.
        let _running = self.storage.log().record(scope.clone());
        let matches = |domain: &str, primary: &[u8]| scope.covers_key(domain, primary);
        let mut removed: std::collections::HashSet<_> = self
            .memory
            .purge_matching(matches)
            .iter()
            .map(pingora::cache::key::CacheHashKey::combined_bin)
            .collect();
        if let Some(disk) = self.disk {
            let keys = disk.purge_matching(matches).keys;
            removed.extend(
                keys.iter()
                    .map(pingora::cache::key::CacheHashKey::combined_bin),
            );
        }
        removed.len()
    }
}

/// Which stored responses a purge removes. Paths are normalised request paths; every export
/// of an export-tree origin is covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeScope {
    /// One path of a domain, with the query or, when `query` is `None`, with any query.
    Url {
        domain: String,
        path: String,
        query: Option<String>,
    },
    /// Every path of a domain that starts with `prefix`.
    Prefix { domain: String, prefix: String },
    /// Everything stored for a domain.
    Domain(String),
}

impl std::fmt::Display for PurgeScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url {
                domain,
                path,
                query: Some(query),
            } => write!(f, "domain {domain}, path {path}, query {query}"),
            Self::Url {
                domain,
                path,
                query: None,
            } => write!(f, "domain {domain}, path {path} with any query"),
            Self::Prefix { domain, prefix } => write!(f, "domain {domain}, prefix {prefix}"),
            Self::Domain(domain) => write!(f, "all of domain {domain}"),
        }
    }
}

impl PurgeScope {
    /// Returns whether the purge covers the stored response of `domain` whose primary key
    /// (made by [`cache_key`]) is `primary`.
    pub fn covers_key(&self, domain: &str, primary: &[u8]) -> bool {
        key_parts(primary).is_some_and(|parts| self.covers(domain, &parts))
    }

    fn covers(&self, domain: &str, parts: &KeyParts<'_>) -> bool {
        match self {
            Self::Url {
                domain: d,
                path,
                query,
            } => {
                d == domain
                    && parts.path == path
                    && query.as_deref().is_none_or(|q| q == parts.query)
            }
            Self::Prefix { domain: d, prefix } => {
                d == domain && parts.path.starts_with(prefix.as_str())
            }
            Self::Domain(d) => d == domain,
        }
    }
}

/// The fields of a primary key made by [`cache_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub domain: &'a str,
    pub export: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

/// Splits a primary key made by [`cache_key`] into its fields; `None` for any other bytes.
pub fn key_parts(primary: &[u8]) -> Option<KeyParts<'_>> {
    let mut rest = std::str::from_utf8(primary).ok()?;
    let mut fields = [""; 5];
    for field in &mut fields {
        let (len, tail) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        *field = tail.get(..len)?;
        rest = &tail[len..];
    }
    rest.is_empty().then_some(KeyParts {
        domain: fields[0],
        export: fields[2],
        path: fields[3],
        query: fields[4],
    })
}

/// Computes the variance of a request for a stored response with a `Vary` header: a hash of
/// the request's values of the headers `Vary` names, so each combination gets its own entry.
/// Every field line of a name counts, in order, and a missing header differs from an empty
/// one, so no two different requests share an entry. `None` when the response has no `Vary`.
pub fn variance(
    stored: &pingora::cache::CacheMeta,
    req: &pingora::http::RequestHeader,
) -> Option<pingora::cache::key::HashBinary> {
    let mut builder = pingora::cache::VarianceBuilder::new();
    for value in stored.headers().get_all(http::header::VARY) {
        let Ok(names) = value.to_str() else { continue };
        for name in names
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
        {
            let value = vary_value(req.headers.get_all(name.as_str()));
            builder.add_owned_name_value(name, value);
        }
    }
    builder.finalize()
}

/// Encodes the field lines of one header for the variance: `0` when there are none, else each
/// line as `1`, its length (4 bytes) and its bytes, so lines cannot run into each other.
fn vary_value(lines: http::header::GetAll<'_, http::HeaderValue>) -> Vec<u8> {
    let mut encoded = Vec::new();
    for line in lines {
        let bytes = line.as_bytes();
        encoded.push(1);
        encoded.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        encoded.extend_from_slice(bytes);
    }
    if encoded.is_empty() {
        encoded.push(0);
    }
    encoded
}

/// Builds the cache key of a request.
///
/// The primary key frames each part with its length so that no two different requests share a
/// key: the domain id (no entry is ever served to another domain), the method class (`GET` and
/// `HEAD` share entries; nothing else is cached), the export id for export-tree origins (a new
/// export never hits an old export's entries), the normalised path and the query.
pub fn cache_key(domain: &str, export: Option<&str>, path: &str, query: Option<&str>) -> CacheKey {
    let primary = primary_key(domain, export, path, query);
    let hash = primary_hash(&primary);
    let mut key = CacheKey::new(primary, domain);
    // Pingora hashes the primary key again on every `primary_bin` call (the lookup, the lock,
    // the storage), so the hash is computed once here and kept as the override.
    key.set_primary_bin_override(hash);
    key
}

/// Returns the hash that the key of [`cache_key`] has, without building the key.
pub fn key_hash(
    domain: &str,
    export: Option<&str>,
    path: &str,
    query: Option<&str>,
) -> pingora::cache::key::HashBinary {
    primary_hash(&primary_key(domain, export, path, query))
}

fn primary_key(domain: &str, export: Option<&str>, path: &str, query: Option<&str>) -> Vec<u8> {
    let mut primary = Vec::with_capacity(domain.len() + path.len() + 48);
    let mut digits = itoa::Buffer::new();
    for part in [
        domain,
        "GET",
        export.unwrap_or(""),
        path,
        query.unwrap_or(""),
    ] {
        primary.extend_from_slice(digits.format(part.len()).as_bytes());
        primary.push(b':');
        primary.extend_from_slice(part.as_bytes());
    }
    primary
}

/// Primary keys hashed on this thread lately, at most this many.
const PRIMARY_HASH_MEMO: usize = 1024;
/// Maximum length of a primary key kept in the memo, so that one thread's memo stays under
/// 512 KiB of keys. Longer keys (long queries of HTTP origins) are hashed every time.
const PRIMARY_HASH_MEMO_KEY_BYTES: usize = 512;

type HashMemo = std::collections::HashMap<
    Box<[u8]>,
    pingora::cache::key::HashBinary,
    foldhash::fast::RandomState,
>;

thread_local! {
    /// A primary key's hash never changes, so the hashes of recent keys are looked up (a few
    /// hundred instructions) instead of computed again (BLAKE2b: about 3,300 for a short key,
    /// measured with callgrind).
    static PRIMARY_HASHES: std::cell::RefCell<HashMemo> = std::cell::RefCell::default();
}

/// Returns the BLAKE2b hash that Pingora gives `primary`.
fn primary_hash(primary: &[u8]) -> pingora::cache::key::HashBinary {
    if primary.len() > PRIMARY_HASH_MEMO_KEY_BYTES {
        return CacheKey::new(primary, "").primary_bin();
    }
    PRIMARY_HASHES.with_borrow_mut(|memo| {
        if let Some(hash) = memo.get(primary) {
            return *hash;
        }
        let hash = CacheKey::new(primary, "").primary_bin();
        if memo.len() >= PRIMARY_HASH_MEMO {
            memo.clear();
        }
        memo.insert(primary.into(), hash);
        hash
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::key::CacheHashKey;

    #[test]
    fn variance_counts_every_line() {
        let mut stored = pingora::http::ResponseHeader::build(200, None).expect("status");
        stored.insert_header("vary", "X-User").expect("vary");
        let now = std::time::SystemTime::now();
        let meta = pingora::cache::CacheMeta::new(now, now, 0, 0, stored);
        let request = |lines: &[&str]| {
            let mut req = pingora::http::RequestHeader::build("GET", b"/x", None).expect("request");
            for line in lines {
                req.append_header("x-user", *line).expect("header");
            }
            variance(&meta, &req).expect("a variance")
        };
        let victim = request(&["victim"]);
        assert_eq!(victim, request(&["victim"]));
        assert_ne!(victim, request(&["victim", "attacker"]));
        assert_ne!(request(&["a", "b"]), request(&["b", "a"]));
        assert_ne!(request(&["ab"]), request(&["a", "b"]));
        assert_ne!(request(&[]), request(&[""]));
    }

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
    fn key_parts_round_trip() {
        let key = cache_key("primary", Some("20260101T000000Z"), "/a:b/c", Some("x=1"));
        let parts = key_parts(key.primary_key()).expect("parts");
        assert_eq!(parts.domain, "primary");
        assert_eq!(parts.export, "20260101T000000Z");
        assert_eq!(parts.path, "/a:b/c");
        assert_eq!(parts.query, "x=1");
        assert!(key_parts(b"garbage").is_none());
    }

    #[test]
    fn purge_scope_covers() {
        let key = cache_key("primary", None, "/concelier/exports/index.json", None);
        let parts = key_parts(key.primary_key()).expect("parts");
        let url = PurgeScope::Url {
            domain: "primary".into(),
            path: "/concelier/exports/index.json".into(),
            query: None,
        };
        assert!(url.covers("primary", &parts));
        assert!(!url.covers("community", &parts));
        let prefix = PurgeScope::Prefix {
            domain: "primary".into(),
            prefix: "/concelier/".into(),
        };
        assert!(prefix.covers("primary", &parts));
        let other = PurgeScope::Prefix {
            domain: "primary".into(),
            prefix: "/excititor/".into(),
        };
        assert!(!other.covers("primary", &parts));
        assert!(PurgeScope::Domain("primary".into()).covers("primary", &parts));
    }

    #[test]
    fn key_hashes_are_pingoras() {
        for round in 0..3 {
            for i in 0..(PRIMARY_HASH_MEMO + 10) {
                let path = format!("/p/{i}");
                let key = cache_key("primary", Some("1"), &path, None);
                let unhashed = CacheKey::new(key.primary_key().to_vec(), "primary");
                assert_eq!(
                    key.primary_bin(),
                    unhashed.primary_bin(),
                    "round {round}, {path}"
                );
                assert_eq!(
                    key_hash("primary", Some("1"), &path, None),
                    key.combined_bin()
                );
            }
        }
    }

    #[test]
    fn hash_memo_bytes_are_bounded() {
        let query = "q".repeat(60 * 1024);
        for i in 0..PRIMARY_HASH_MEMO {
            let path = format!("/long/{i}");
            let key = cache_key("primary", None, &path, Some(&query));
            let unhashed = CacheKey::new(key.primary_key().to_vec(), "primary");
            assert_eq!(key.primary_bin(), unhashed.primary_bin(), "{path}");
        }
        let memo_bytes: usize =
            PRIMARY_HASHES.with_borrow(|memo| memo.keys().map(|key| key.len()).sum());
        assert!(
            memo_bytes <= PRIMARY_HASH_MEMO * PRIMARY_HASH_MEMO_KEY_BYTES,
            "one thread's memo holds {memo_bytes} bytes of primary keys"
        );
    }

    #[test]
    fn cache_key_framing_is_unambiguous() {
        let a = cache_key("ab", None, "/c", None);
        let b = cache_key("a", None, "b/c", None);
        assert_ne!(a.combined_bin(), b.combined_bin());
    }
}
