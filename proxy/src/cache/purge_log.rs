//! Purges that a fill running at the time of the purge honours.
//!
//! A purge removes what the tiers hold. A fill that started earlier publishes its response
//! when it ends, which would bring back what the purge removed. So every purge is recorded
//! first, each fill notes the record count when it starts, and a fill that ends after a purge
//! covering its key removes what it just published. The published entry is visible for the
//! moment between its publication and its removal.
//!
//! A fill starts when its request takes the cache lock's write permit, before the request to
//! the origin. Pingora requests the miss handler from the storage only once the origin's
//! response header has arrived. So the cache lock notes the count per key when it grants the permit
//! ([`PurgeLog::fill_started`]), and the miss handler takes it from there.

use std::any::Any;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::PurgeOutcome;
use pingora::cache::storage::{HandleMiss, MissFinishType, PurgeType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, HitHandler, MissHandler, PurgeTarget, Storage};
use pingora::Result;

use super::disk::DiskStorage;
use super::memory::MemoryStorage;
use super::{key_parts, PurgeScope};
use crate::cache::KeyHashMap;

/// Purges kept; a fill that started before all of them treats its key as purged.
const KEPT_PURGES: usize = 256;

/// A fill start older than this is dropped, because its write permit was then dropped without
/// a release, or the origin took longer than this to send the response header. The miss
/// handler of such a fill takes the mark when it is created instead.
const FILL_START_MAX_AGE: Duration = Duration::from_secs(600);

/// The number of keys at which the map of fill starts is first checked for old starts. After
/// each check, the next one comes when the map has doubled.
const FILL_START_PRUNE_AT: usize = 1024;

/// The recent purges of one cache, numbered from 1.
#[derive(Debug, Default)]
pub struct PurgeLog {
    /// Number of the last purge recorded.
    last: AtomicU64,
    recent: Mutex<VecDeque<(u64, PurgeScope)>>,
    /// Numbers of the recorded purges still removing entries.
    running: Mutex<BTreeSet<u64>>,
    /// Marks of the fills whose write permit is held, by primary key hash.
    fills: Mutex<FillStarts>,
}

/// The marks of running fills: for each key, one mark with the time it was noted per fill.
#[derive(Debug)]
struct FillStarts {
    starts: KeyHashMap<Vec<(u64, Instant)>>,
    prune_at: usize,
}

impl Default for FillStarts {
    fn default() -> Self {
        Self {
            starts: KeyHashMap::default(),
            prune_at: FILL_START_PRUNE_AT,
        }
    }
}

/// A recorded purge while it removes entries; dropping it marks the purge finished.
#[must_use = "dropping it at once marks the purge finished before it removed anything"]
pub struct RunningPurge<'a> {
    log: &'a PurgeLog,
    number: u64,
}

impl Drop for RunningPurge<'_> {
    fn drop(&mut self) {
        self.log.running.lock().remove(&self.number);
    }
}

impl PurgeLog {
    /// Returns the number of the last purge, to note when a fill starts. A fill fetches from
    /// the origin, so a purge recorded before it starts does not concern it.
    pub fn mark(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// Returns the number to note when a read of stored entries starts, such as a disk hit
    /// that copies its object into memory. It is the purge before the first one still
    /// removing entries, because a running purge may not have reached the entry read yet.
    pub fn read_mark(&self) -> u64 {
        let running = self.running.lock();
        match running.first() {
            Some(first) => first - 1,
            None => self.last.load(Ordering::Acquire),
        }
    }

    /// Records a purge; call it before the purge removes anything, and keep the result until
    /// the removal has ended.
    pub fn record(&self, scope: PurgeScope) -> RunningPurge<'_> {
        let mut recent = self.recent.lock();
        let number = self.last.load(Ordering::Acquire) + 1;
        recent.push_back((number, scope));
        if recent.len() > KEPT_PURGES {
            recent.pop_front();
        }
        // Under the lock `read_mark` takes, so that `read_mark` never reads the new number
        // while the purge is missing from `running`.
        let mut running = self.running.lock();
        running.insert(number);
        self.last.store(number, Ordering::Release);
        drop(running);
        RunningPurge { log: self, number }
    }

    /// Notes the mark of a fill of `key` (a primary key hash) that starts now. Call it when the
    /// fill's request takes the cache lock's write permit, and [`Self::fill_ended`] when it
    /// releases the permit.
    pub fn fill_started(&self, key: HashBinary) {
        self.fill_started_at(key, Instant::now());
    }

    fn fill_started_at(&self, key: HashBinary, now: Instant) {
        let mark = self.mark();
        let mut fills = self.fills.lock();
        if fills.starts.len() >= fills.prune_at {
            fills.starts.retain(|_, starts| {
                starts.retain(|(_, at)| now.saturating_duration_since(*at) < FILL_START_MAX_AGE);
                !starts.is_empty()
            });
            fills.prune_at = (fills.starts.len() * 2).max(FILL_START_PRUNE_AT);
        }
        fills.starts.entry(key).or_default().push((mark, now));
    }

    /// Removes one fill start of `key`: the latest one.
    ///
    /// Fills of one key run at once when a write permit outlived its age timeout, or for
    /// several variants of a response with `Vary`. Removing the latest start keeps the
    /// starts left no later than those of the fills still running, so a fill never takes a
    /// mark from after its own start. It may take an earlier one, and then drops its entry
    /// for a purge that came before it started.
    pub fn fill_ended(&self, key: &HashBinary) {
        let mut fills = self.fills.lock();
        let Some(starts) = fills.starts.get_mut(key) else {
            return;
        };
        if let Some(latest) = (0..starts.len()).max_by_key(|&i| starts[i].0) {
            starts.swap_remove(latest);
        }
        if starts.is_empty() {
            fills.starts.remove(key);
        }
    }

    /// Returns the mark of the earliest running fill of `key` noted within
    /// [`FILL_START_MAX_AGE`], for its miss handler.
    pub fn fill_mark(&self, key: &HashBinary) -> Option<u64> {
        self.fill_mark_at(key, Instant::now())
    }

    fn fill_mark_at(&self, key: &HashBinary, now: Instant) -> Option<u64> {
        let fills = self.fills.lock();
        fills
            .starts
            .get(key)?
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(*at) < FILL_START_MAX_AGE)
            .map(|(mark, _)| *mark)
            .min()
    }

    /// Returns whether a purge recorded after `mark` covers the key of `domain` and `primary`.
    pub fn purged_since(&self, mark: u64, domain: &str, primary: &[u8]) -> bool {
        if self.mark() == mark {
            return false;
        }
        let recent = self.recent.lock();
        // Purges after `mark` were dropped from the log: any of them may have covered the key.
        if recent.front().is_some_and(|(number, _)| *number > mark + 1) {
            return true;
        }
        let Some(parts) = key_parts(primary) else {
            return false;
        };
        recent
            .iter()
            .any(|(number, scope)| *number > mark && scope.covers(domain, &parts))
    }
}

/// The storage Pingora uses, with fills that honour purges made while they ran.
pub struct PurgeAware {
    inner: &'static (dyn Storage + Sync),
    memory: &'static MemoryStorage,
    disk: Option<&'static DiskStorage>,
    log: &'static PurgeLog,
}

impl PurgeAware {
    /// Wraps `inner`, the storage made of `memory` and `disk`, whose purges go to `log`.
    pub fn new(
        inner: &'static (dyn Storage + Sync),
        memory: &'static MemoryStorage,
        disk: Option<&'static DiskStorage>,
        log: &'static PurgeLog,
    ) -> Self {
        Self {
            inner,
            memory,
            disk,
            log,
        }
    }

    /// Returns the log that purges are recorded in.
    pub fn log(&self) -> &PurgeLog {
        self.log
    }

    /// Removes the entries of one key from both tiers. Blocks on file I/O with a disk tier.
    fn remove(&self, domain: &str, primary: &[u8]) {
        let matches = |d: &str, p: &[u8]| d == domain && p == primary;
        self.memory.purge_matching(matches);
        if let Some(disk) = self.disk {
            disk.purge_matching(matches);
        }
    }
}

#[async_trait]
impl Storage for PurgeAware {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        self.inner.lookup(key, trace).await
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        self.inner
            .lookup_streaming_write(key, streaming_write_tag, trace)
            .await
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<MissHandler> {
        // A fill without a noted start took no write permit (a lookup error sends a request
        // to the origin without one), so its mark is taken now, with the response header in.
        let mark = self
            .log
            .fill_mark(&key.primary_bin())
            .unwrap_or_else(|| self.log.mark());
        let inner = self.inner.get_miss_handler(key, meta, trace).await?;
        Ok(Box::new(PurgeAwareMiss {
            inner,
            storage: self,
            domain: key.user_tag.clone(),
            primary: key.primary_key().to_vec(),
            mark,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        self.inner.purge(target, purge_type, trace).await
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<bool> {
        self.inner.update_meta(key, meta, trace).await
    }

    fn support_streaming_partial_write(&self) -> bool {
        self.inner.support_streaming_partial_write()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self.inner.as_any()
    }
}

/// A fill that removes its own entry again when a purge covered its key while it ran.
struct PurgeAwareMiss {
    inner: MissHandler,
    storage: &'static PurgeAware,
    /// The key's domain id (its user tag) and primary key bytes.
    domain: String,
    primary: Vec<u8>,
    /// The purge log's mark when the fill started.
    mark: u64,
}

#[async_trait]
impl HandleMiss for PurgeAwareMiss {
    async fn write_body(&mut self, data: bytes::Bytes, eof: bool) -> Result<()> {
        self.inner.write_body(data, eof).await
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let finished = self.inner.finish().await;
        if self
            .storage
            .log
            .purged_since(self.mark, &self.domain, &self.primary)
        {
            tracing::debug!(domain = %self.domain, "a purge covered this fill while it ran; not keeping it");
            self.storage.remove(&self.domain, &self.primary);
        }
        finished
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        self.inner.streaming_write_tag()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(path: &str) -> PurgeScope {
        PurgeScope::Url {
            domain: "primary".into(),
            path: path.into(),
            query: None,
        }
    }

    #[test]
    fn only_later_purges_count() {
        let log = PurgeLog::default();
        drop(log.record(url("/a")));
        let mark = log.mark();
        let key = crate::cache::cache_key("primary", Some("e1"), "/a", None);
        let primary = key.primary_key();
        assert!(!log.purged_since(mark, "primary", primary));
        drop(log.record(url("/b")));
        assert!(!log.purged_since(mark, "primary", primary));
        drop(log.record(url("/a")));
        assert!(log.purged_since(mark, "primary", primary));
        assert!(!log.purged_since(mark, "other", primary));
    }

    #[test]
    fn read_mark_stays_before_running_purges() {
        let log = PurgeLog::default();
        drop(log.record(url("/done")));
        assert_eq!(log.read_mark(), 1);
        let running = log.record(url("/a"));
        drop(log.record(url("/b")));
        assert_eq!(log.mark(), 3);
        assert_eq!(log.read_mark(), 1, "purge 2 still runs");
        drop(running);
        assert_eq!(log.read_mark(), 3);
    }

    #[test]
    fn fill_mark_is_from_fill_start() {
        let log = PurgeLog::default();
        let key = crate::cache::cache_key("primary", None, "/a", None);
        let name = key.primary_bin();
        assert_eq!(log.fill_mark(&name), None, "no fill started");
        log.fill_started(name);
        drop(log.record(url("/a")));
        let mark = log.fill_mark(&name).expect("a noted start");
        assert!(log.purged_since(mark, "primary", key.primary_key()));
        log.fill_ended(&name);
        assert_eq!(log.fill_mark(&name), None, "the fill ended");
    }

    #[test]
    fn fill_end_keeps_earliest_start() {
        let log = PurgeLog::default();
        let name = [7; 16];
        log.fill_started(name);
        drop(log.record(url("/a")));
        log.fill_started(name);
        log.fill_ended(&name);
        assert_eq!(log.fill_mark(&name), Some(0), "the earlier fill still runs");
        log.fill_ended(&name);
        assert_eq!(log.fill_mark(&name), None);
        log.fill_ended(&name);
        assert_eq!(log.fill_mark(&name), None, "an extra end changes nothing");
    }

    #[test]
    fn old_fill_starts_are_forgotten() {
        let log = PurgeLog::default();
        let now = Instant::now();
        let long_ago = now
            .checked_sub(FILL_START_MAX_AGE)
            .expect("a monotonic past");
        for i in 0..FILL_START_PRUNE_AT {
            let mut name = [0u8; 16];
            name[..8].copy_from_slice(&(i as u64).to_le_bytes());
            log.fill_started_at(name, long_ago);
        }
        assert_eq!(log.fill_mark_at(&[0; 16], now), None, "too old to use");
        log.fill_started_at([0xff; 16], now);
        let fills = log.fills.lock();
        assert_eq!(fills.starts.len(), 1, "only the new start is left");
        assert_eq!(fills.prune_at, FILL_START_PRUNE_AT);
    }

    #[test]
    fn dropped_purges_count_as_covering() {
        let log = PurgeLog::default();
        let mark = log.mark();
        for _ in 0..=KEPT_PURGES {
            drop(log.record(url("/elsewhere")));
        }
        let key = crate::cache::cache_key("primary", None, "/a", None);
        assert!(log.purged_since(mark, "primary", key.primary_key()));
    }
}
