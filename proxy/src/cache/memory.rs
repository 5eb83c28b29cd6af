//! The memory tier: responses held in memory, bounded in bytes.
//!
//! A fill streams: while the origin's body arrives, every request for the key (the filling
//! request's own client included) reads the chunks stored so far and waits for the next. The
//! entry is published as complete only when its miss handler finishes. A fill that is dropped
//! (origin error, client gone, too large) leaves nothing behind, and its readers get an error
//! instead of a clean end, so a truncated body is never taken for a whole one.
//! The tier keeps itself within its byte budget: each published entry is admitted to a sharded
//! LRU list (`pingora-lru`), and the least recently used entries are dropped until the total
//! fits. Objects larger than `max_object_bytes` stream to their readers but are not kept, so one
//! large bundle never pushes the small, hot indexes out.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora::cache::storage::streaming_write::U64WriteId;
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::{Error, ErrorType, Result};
use tokio::sync::watch;

use super::by_domain::EntriesByDomain;
use super::stored_meta::{with_body_length, StoredMeta};
use crate::cache::KeyHashMap;

/// Largest chunk a hit hands to the downstream writer at once.
const READ_CHUNK: usize = 1024 * 1024;

/// Counters of one cache tier, readable at any time.
#[derive(Debug, Default)]
pub struct TierStats {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub write_errors: AtomicU64,
}

/// A snapshot of [`TierStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierSnapshot {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub write_errors: u64,
    /// Damaged entries found and deleted; `None` for a tier that cannot hold damaged entries
    /// (memory).
    pub corrupt_entries: Option<u64>,
    /// Entries deleted by the sweep after their stale windows ended; `None` for a tier that
    /// is not swept (memory).
    pub expired_entries: Option<u64>,
}

impl TierStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> TierSnapshot {
        TierSnapshot {
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            corrupt_entries: None,
            expired_entries: None,
        }
    }
}

/// A fresh stored response, copied out of the memory tier.
pub struct FreshHit {
    pub header: pingora::http::ResponseHeader,
    /// The time the response's age counts from.
    pub epoch: SystemTime,
    pub body: Bytes,
}

/// Splits `body` into the chunks a lookup's reader hands out.
pub fn body_chunks(body: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..body.len())
        .step_by(READ_CHUNK)
        .map(|start| body.slice(start..body.len().min(start + READ_CHUNK)))
}

struct Entry {
    meta: StoredMeta,
    body: Bytes,
    /// The key as the eviction manager knows it, and the primary key bytes, for purges.
    compact: CompactCacheKey,
    primary: Vec<u8>,
}

/// A fill in progress: the chunks received so far and how far the writer got.
struct InFlight {
    id: u64,
    meta: StoredMeta,
    compact: CompactCacheKey,
    primary: Vec<u8>,
    chunks: RwLock<Vec<Bytes>>,
    progress: watch::Sender<Progress>,
}

/// How far a fill got, in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Writing(usize),
    Done(usize),
    /// The writer went away before the end of the body.
    Aborted,
}

/// Shards of the LRU list; more shards mean less lock contention.
const LRU_SHARDS: usize = 16;

/// The memory tier. Entries are keyed by the combined cache key (primary key and variance).
pub struct MemoryStorage {
    entries: RwLock<KeyHashMap<Entry>>,
    lru: pingora_lru::Lru<HashBinary, LRU_SHARDS>,
    /// At most one fill per key is visible to readers: the latest one started.
    in_flight: RwLock<KeyHashMap<Arc<InFlight>>>,
    next_write_id: AtomicU64,
    /// Maximum total bytes of the bodies the tier keeps.
    budget_bytes: usize,
    /// Largest body kept once complete.
    max_object_bytes: usize,
    /// Largest body a fill may stream; larger fills fail.
    max_stream_bytes: usize,
    stats: TierStats,
    by_domain: Mutex<EntriesByDomain>,
}

impl MemoryStorage {
    /// Creates an empty tier of `budget_bytes` that keeps objects up to `max_object_bytes` and
    /// streams fills up to `max_stream_bytes` (at least `max_object_bytes`).
    pub fn new(budget_bytes: usize, max_object_bytes: usize, max_stream_bytes: usize) -> Self {
        // The capacity is only a preallocation hint: an estimate of 16 KiB per object.
        let capacity = (budget_bytes / (16 * 1024)).max(64);
        Self {
            entries: RwLock::default(),
            lru: pingora_lru::Lru::with_capacity(budget_bytes, capacity),
            in_flight: RwLock::default(),
            next_write_id: AtomicU64::new(1),
            budget_bytes,
            max_object_bytes,
            max_stream_bytes: max_stream_bytes.max(max_object_bytes),
            stats: TierStats::default(),
            by_domain: Mutex::default(),
        }
    }

    /// Returns the tier's counters.
    pub fn stats(&self) -> &TierStats {
        &self.stats
    }

    /// Returns the number of complete entries of `domain` (the key's user tag).
    pub fn domain_entries(&self, domain: &str) -> u64 {
        self.by_domain.lock().get(domain)
    }

    fn remove(&self, key: &HashBinary) -> bool {
        self.lru.remove(lru_key(key));
        let removed = self.entries.write().remove(key);
        if let Some(entry) = &removed {
            self.by_domain.lock().remove(&entry.compact.user_tag);
            self.stats.entries.fetch_sub(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_sub(entry.body.len() as u64, Ordering::Relaxed);
        }
        removed.is_some()
    }

    /// Publishes a complete entry, then drops least recently used entries until the tier fits
    /// its budget. An entry larger than `max_object_bytes` is not kept.
    fn insert(&self, key: HashBinary, entry: Entry) {
        let size = entry.body.len() as u64;
        if entry.body.len() > self.max_object_bytes {
            return;
        }
        self.by_domain.lock().add(&entry.compact.user_tag);
        let replaced = self.entries.write().insert(key, entry);
        match replaced {
            Some(old) => {
                self.by_domain.lock().remove(&old.compact.user_tag);
                self.stats
                    .bytes
                    .fetch_sub(old.body.len() as u64, Ordering::Relaxed);
            }
            None => {
                self.stats.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.bytes.fetch_add(size, Ordering::Relaxed);
        self.lru.admit(lru_key(&key), key, size as usize);
        for (evicted, _) in self.lru.evict_to_limit() {
            if let Some(old) = self.entries.write().remove(&evicted) {
                self.by_domain.lock().remove(&old.compact.user_tag);
                self.stats.entries.fetch_sub(1, Ordering::Relaxed);
                self.stats
                    .bytes
                    .fetch_sub(old.body.len() as u64, Ordering::Relaxed);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Publishes a complete object read from another tier, when it fits this one.
    pub fn promote(&self, key: &CacheKey, meta: (Vec<u8>, Vec<u8>), body: Bytes) {
        let entry = Entry {
            meta: StoredMeta::from_serialized(meta),
            body,
            compact: key.to_compact(),
            primary: key.primary_key().to_vec(),
        };
        self.insert(key.combined_bin(), entry);
    }

    /// Returns a copy of the complete entry of `key` when it is fresh at `now` and a copy of it
    /// is the complete response (see [`StoredMeta::fresh_at`]), counting a hit as a lookup
    /// does. Returns `None`, counting nothing, while a fill of `key` runs, because a lookup
    /// would join that fill.
    pub fn fresh_hit(&self, key: &HashBinary, now: SystemTime) -> Option<FreshHit> {
        if self.in_flight.read().contains_key(key) {
            return None;
        }
        let hit = {
            let entries = self.entries.read();
            let entry = entries.get(key)?;
            let (header, epoch) = entry.meta.fresh_at(now)?;
            FreshHit {
                header: header.clone(),
                epoch,
                body: entry.body.clone(),
            }
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.lru.promote(lru_key(key));
        Some(hit)
    }

    /// Returns the largest body this tier keeps.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// Returns the maximum total bytes of the bodies this tier keeps.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }
}

impl super::lock::FillState for MemoryStorage {
    fn fill_running(&self, key: &HashBinary) -> bool {
        self.in_flight.read().contains_key(key)
    }

    fn stored(&self, key: &HashBinary) -> bool {
        self.entries.read().contains_key(key)
    }
}

/// The LRU list's key: the first 8 bytes of the combined cache key hash.
fn lru_key(key: &HashBinary) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[..8]);
    u64::from_le_bytes(bytes)
}

impl MemoryStorage {
    /// Removes every complete entry whose domain (the key's user tag) and primary key bytes
    /// `matches` accepts, and returns their keys.
    pub fn purge_matching(&self, matches: impl Fn(&str, &[u8]) -> bool) -> Vec<CompactCacheKey> {
        let mut removed = Vec::new();
        let mut removed_keys = Vec::new();
        let mut bytes = 0u64;
        self.entries.write().retain(|key, entry| {
            let keep = !matches(&entry.compact.user_tag, &entry.primary);
            if !keep {
                bytes += entry.body.len() as u64;
                removed.push(entry.compact.clone());
                removed_keys.push(*key);
            }
            keep
        });
        // Not under the `entries` lock, which eviction takes before this one.
        let mut by_domain = self.by_domain.lock();
        for key in &removed {
            by_domain.remove(&key.user_tag);
        }
        drop(by_domain);
        // The LRU list must forget them too, or their bytes keep counting against the budget.
        for key in &removed_keys {
            self.lru.remove(lru_key(key));
        }
        self.stats
            .entries
            .fetch_sub(removed.len() as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
        removed
    }

    /// Returns a reader of the complete entry of `key`, counting a hit, if there is one.
    fn complete_hit(&self, key: &HashBinary) -> Result<Option<(CacheMeta, HitHandler)>> {
        let found = {
            let entries = self.entries.read();
            entries.get(key).map(|e| (e.meta.rebuild(), e.body.clone()))
        };
        let Some((meta, body)) = found else {
            return Ok(None);
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.lru.promote(lru_key(key));
        Ok(Some((meta?, bytes_hit(body))))
    }

    fn partial_hit(
        &self,
        key: &HashBinary,
        write_id: Option<u64>,
    ) -> Option<(CacheMeta, HitHandler)> {
        let fill = self.in_flight.read().get(key).cloned()?;
        if write_id.is_some_and(|id| id != fill.id) {
            return None;
        }
        let meta = fill.meta.rebuild().ok()?;
        let progress = fill.progress.subscribe();
        Some((
            meta,
            Box::new(PartialHit {
                fill,
                progress,
                next: 0,
            }),
        ))
    }

    /// Drops the in-flight record of fill `id`, unless a newer fill replaced it.
    fn end_fill(&self, key: &HashBinary, id: u64) {
        let mut in_flight = self.in_flight.write();
        if in_flight.get(key).is_some_and(|fill| fill.id == id) {
            in_flight.remove(key);
        }
    }
}

fn compact_key(target: PurgeTarget<'_>) -> &CompactCacheKey {
    target.key()
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let key = key.combined_bin();
        // A fill in progress is newer than a complete entry of the same key (it refreshes a
        // stale one), and Pingora has already released the key's lock to let readers join it.
        if let Some(partial) = self.partial_hit(&key, None) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(partial));
        }
        // A fill that finished after the check above published its entry before dropping its
        // in-flight record, so the entry is there now.
        if let Some(hit) = self.complete_hit(&key)? {
            return Ok(Some(hit));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let write_id = streaming_write_tag
            .and_then(|tag| U64WriteId::try_from(tag).ok())
            .map(u64::from);
        match write_id {
            Some(id) => Ok(self.partial_hit(&key.combined_bin(), Some(id))),
            None => self.lookup(key, trace).await,
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let id = self.next_write_id.fetch_add(1, Ordering::Relaxed);
        let fill = Arc::new(InFlight {
            id,
            meta: StoredMeta::of(meta)?,
            compact: key.to_compact(),
            primary: key.primary_key().to_vec(),
            chunks: RwLock::new(Vec::new()),
            progress: watch::channel(Progress::Writing(0)).0,
        });
        let key = key.combined_bin();
        self.in_flight.write().insert(key, Arc::clone(&fill));
        Ok(Box::new(MemoryMiss {
            storage: self,
            key,
            fill,
            tag: U64WriteId::from(id),
            size: 0,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let removed = self.remove(&compact_key(target).combined_bin());
        if removed && matches!(purge_type, PurgeType::Eviction) {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(if removed {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let stored = StoredMeta::of(meta)?;
        let mut entries = self.entries.write();
        match entries.get_mut(&key.combined_bin()) {
            Some(entry) => {
                entry.meta = stored;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Reads a body while its fill is still running, waiting for each next chunk.
struct PartialHit {
    fill: Arc<InFlight>,
    progress: watch::Receiver<Progress>,
    /// Index of the next chunk to hand out.
    next: usize,
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        let mut waited = false;
        loop {
            let progress = *self.progress.borrow_and_update();
            let available = match progress {
                Progress::Aborted => {
                    return Error::e_explain(
                        ErrorType::ReadError,
                        "the cache fill this response streams from was aborted",
                    )
                }
                Progress::Writing(n) | Progress::Done(n) => n,
            };
            if self.next < available {
                if !waited {
                    // All readers of a fill wake together when its first chunks arrive.
                    // Without a turn for the others between chunks, one reader would write
                    // everything received so far before the next wrote its first byte. The
                    // turn comes before the chunk is taken: Pingora may drop this future while
                    // it waits, and a chunk taken by then would be lost.
                    tokio::task::yield_now().await;
                    waited = true;
                    continue;
                }
                let chunk = self.fill.chunks.read().get(self.next).cloned();
                self.next += 1;
                if let Some(chunk) = chunk {
                    return Ok(Some(chunk));
                }
            } else if matches!(progress, Progress::Done(_)) {
                return Ok(None);
            } else if self.progress.changed().await.is_err() {
                // The writer is gone, so its last state decides whether the body is whole.
                if !matches!(*self.progress.borrow(), Progress::Done(_)) {
                    return Error::e_explain(
                        ErrorType::ReadError,
                        "the cache fill this response streams from stopped",
                    );
                }
            } else {
                waited = true;
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Returns a reader of `body`, a complete body held in memory.
pub fn bytes_hit(body: Bytes) -> HitHandler {
    let end = body.len();
    Box::new(BytesHit {
        body,
        start: 0,
        end,
    })
}

/// Reads a complete body from memory; seekable, so ranges are served from the cache.
struct BytesHit {
    body: Bytes,
    start: usize,
    end: usize,
}

#[async_trait]
impl HandleHit for BytesHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.start >= self.end {
            return Ok(None);
        }
        let stop = self.end.min(self.start + READ_CHUNK);
        let chunk = self.body.slice(self.start..stop);
        self.start = stop;
        Ok(Some(chunk))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.body.len();
        if start >= len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} is past the end of a {len}-byte body"),
            );
        }
        self.start = start;
        self.end = end.map_or(len, |end| end.min(len));
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Streams a body into an in-flight record and publishes it when the fill finishes; dropping
/// it first marks the fill aborted, so its readers fail instead of ending early.
struct MemoryMiss {
    storage: &'static MemoryStorage,
    key: HashBinary,
    fill: Arc<InFlight>,
    tag: U64WriteId,
    size: usize,
    finished: bool,
}

#[async_trait]
impl HandleMiss for MemoryMiss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.size + data.len() > self.storage.max_stream_bytes {
            self.storage
                .stats
                .write_errors
                .fetch_add(1, Ordering::Relaxed);
            return Error::e_explain(
                ErrorType::InternalError,
                format!(
                    "object exceeds the cache's limit of {} bytes",
                    self.storage.max_stream_bytes
                ),
            );
        }
        if data.is_empty() {
            return Ok(());
        }
        self.size += data.len();
        let count = {
            let mut chunks = self.fill.chunks.write();
            chunks.push(data);
            chunks.len()
        };
        self.fill.progress.send_replace(Progress::Writing(count));
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        let body = {
            let chunks = self.fill.chunks.read();
            let mut body = BytesMut::with_capacity(self.size);
            for chunk in chunks.iter() {
                body.extend_from_slice(chunk);
            }
            body.freeze()
        };
        let count = self.fill.chunks.read().len();
        let meta = match self.fill.meta.rebuild() {
            Ok(meta) => with_body_length(&meta, body.len() as u64)
                .and_then(|complete| StoredMeta::of(&complete).ok()),
            Err(_) => None,
        };
        // Publish the complete entry before the in-flight record goes, so a lookup in between
        // finds one of the two.
        let entry = Entry {
            meta: meta.unwrap_or_else(|| self.fill.meta.clone()),
            body,
            compact: self.fill.compact.clone(),
            primary: self.fill.primary.clone(),
        };
        self.storage.insert(self.key, entry);
        self.fill.progress.send_replace(Progress::Done(count));
        self.storage.end_fill(&self.key, self.fill.id);
        self.finished = true;
        Ok(MissFinishType::Created(self.size))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.tag.as_bytes())
    }
}

impl Drop for MemoryMiss {
    fn drop(&mut self) {
        if !self.finished {
            self.fill.progress.send_replace(Progress::Aborted);
            self.storage.end_fill(&self.key, self.fill.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn inactive() -> SpanHandle {
        pingora::cache::trace::Span::inactive().handle()
    }

    fn storage() -> &'static MemoryStorage {
        Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)))
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).expect("valid status");
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    async fn fill(storage: &'static MemoryStorage, key: &CacheKey, body: &'static [u8]) {
        let trace = inactive();
        let mut miss = storage
            .get_miss_handler(key, &meta(), &trace)
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(body), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
    }

    #[tokio::test]
    async fn memory_counts_entries_by_domain() {
        let storage = storage();
        fill(storage, &CacheKey::new("a/1", "a"), b"one").await;
        fill(storage, &CacheKey::new("a/1", "a"), b"one again").await;
        fill(storage, &CacheKey::new("a/2", "a"), b"two").await;
        fill(storage, &CacheKey::new("b/1", "b"), b"three").await;
        assert_eq!(storage.domain_entries("a"), 2);
        assert_eq!(storage.domain_entries("b"), 1);

        let purged = storage.purge_matching(|domain, _| domain == "a");
        assert_eq!(purged.len(), 2);
        assert_eq!(storage.domain_entries("a"), 0);
        assert_eq!(storage.domain_entries("b"), 1);
    }

    #[tokio::test]
    async fn memory_eviction_updates_domain_count() {
        // A budget of 8 bytes keeps one of two 5-byte bodies.
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(8, 1024, 1024)));
        fill(storage, &CacheKey::new("a/1", "a"), b"first").await;
        fill(storage, &CacheKey::new("b/1", "b"), b"other").await;
        let total = storage.domain_entries("a") + storage.domain_entries("b");
        assert_eq!(total, storage.stats().snapshot().entries);
        assert_eq!(total, 1);
    }

    #[tokio::test]
    async fn memory_fill_then_hit() {
        let storage = storage();
        let key = CacheKey::new("k", "primary");
        let trace = inactive();
        assert!(storage
            .lookup(&key, &trace)
            .await
            .expect("lookup")
            .is_none());
        fill(storage, &key, b"hello").await;
        let (_, mut hit) = storage
            .lookup(&key, &trace)
            .await
            .expect("lookup")
            .expect("hit");
        assert_eq!(
            hit.read_body().await.expect("read"),
            Some(Bytes::from_static(b"hello"))
        );
        assert_eq!(hit.read_body().await.expect("read"), None);
        let stats = storage.stats().snapshot();
        assert_eq!(
            (stats.entries, stats.bytes, stats.hits, stats.misses),
            (1, 5, 1, 1)
        );
    }

    #[tokio::test]
    async fn memory_dropped_fill_leaves_nothing() {
        let storage = storage();
        let key = CacheKey::new("k", "primary");
        let trace = inactive();
        let mut miss = storage
            .get_miss_handler(&key, &meta(), &trace)
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(b"part"), false)
            .await
            .expect("write");
        drop(miss);
        assert!(storage
            .lookup(&key, &trace)
            .await
            .expect("lookup")
            .is_none());
    }

    #[tokio::test]
    async fn memory_rejects_oversized_object() {
        let storage = storage();
        let key = CacheKey::new("big", "primary");
        let trace = inactive();
        let mut miss = storage
            .get_miss_handler(&key, &meta(), &trace)
            .await
            .expect("miss");
        let big = Bytes::from(vec![0u8; 2048]);
        assert!(miss.write_body(big, true).await.is_err());
        assert_eq!(storage.stats().snapshot().write_errors, 1);
    }

    #[tokio::test]
    async fn memory_seek_serves_range() {
        let storage = storage();
        let key = CacheKey::new("r", "primary");
        fill(storage, &key, b"0123456789").await;
        let (_, mut hit) = storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .expect("hit");
        hit.seek(2, Some(5)).expect("seek");
        assert_eq!(
            hit.read_body().await.expect("read"),
            Some(Bytes::from_static(b"234"))
        );
        assert!(hit.seek(10, None).is_err());
    }

    #[tokio::test]
    async fn memory_purge_removes_entry() {
        let storage = storage();
        let key = CacheKey::new("p", "primary");
        fill(storage, &key, b"x").await;
        let compact = key.to_compact();
        let trace = inactive();
        let outcome = storage
            .purge(PurgeTarget::Active(&compact), PurgeType::Eviction, &trace)
            .await
            .expect("purge");
        assert_eq!(outcome, PurgeOutcome::Purged(None));
        assert_eq!(storage.stats().snapshot().evictions, 1);
        assert_eq!(storage.stats().snapshot().bytes, 0);
    }
}

#[cfg(test)]
mod streaming_tests {
    use super::*;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn inactive() -> SpanHandle {
        pingora::cache::trace::Span::inactive().handle()
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).expect("valid status");
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    #[tokio::test]
    async fn partial_reader_follows_writer() {
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)));
        let key = CacheKey::new("s", "primary");
        let mut miss = storage
            .get_miss_handler(&key, &meta(), &inactive())
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(b"ab"), false)
            .await
            .expect("write");
        let (_, mut reader) = storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .expect("partial");
        assert_eq!(
            reader.read_body().await.expect("read"),
            Some(Bytes::from_static(b"ab"))
        );
        let pending = tokio::spawn(async move { reader.read_body().await.map(|b| (b, reader)) });
        miss.write_body(Bytes::from_static(b"cd"), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        let (chunk, mut reader) = pending.await.expect("join").expect("read");
        assert_eq!(chunk, Some(Bytes::from_static(b"cd")));
        assert_eq!(reader.read_body().await.expect("end"), None);
        let (_, mut whole) = storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .expect("hit");
        assert_eq!(
            whole.read_body().await.expect("read"),
            Some(Bytes::from_static(b"abcd"))
        );
    }

    #[tokio::test]
    async fn partial_reader_fails_on_abort() {
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)));
        let key = CacheKey::new("a", "primary");
        let mut miss = storage
            .get_miss_handler(&key, &meta(), &inactive())
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(b"half"), false)
            .await
            .expect("write");
        let (_, mut reader) = storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .expect("partial");
        assert_eq!(
            reader.read_body().await.expect("first chunk"),
            Some(Bytes::from_static(b"half"))
        );
        drop(miss);
        assert!(reader.read_body().await.is_err());
        assert!(storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .is_none());
    }

    /// Starts a fill of `key` that has received `chunks` chunks, and returns it with a reader.
    async fn fill_with_reader(
        storage: &'static MemoryStorage,
        key: &CacheKey,
        chunks: &[&'static [u8]],
    ) -> (MissHandler, HitHandler) {
        let mut miss = storage
            .get_miss_handler(key, &meta(), &inactive())
            .await
            .expect("miss");
        for chunk in chunks {
            miss.write_body(Bytes::from_static(chunk), false)
                .await
                .expect("write");
        }
        let (_, reader) = storage
            .lookup(key, &inactive())
            .await
            .expect("ok")
            .expect("partial");
        (miss, reader)
    }

    /// Two readers of a fill whose chunks have all arrived take turns, chunk by chunk, instead
    /// of one reading everything before the other reads its first chunk.
    #[tokio::test(flavor = "current_thread")]
    async fn partial_readers_take_turns() {
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)));
        let key = CacheKey::new("turns", "primary");
        let (_miss, first) = fill_with_reader(storage, &key, &[b"a", b"b", b"c"]).await;
        let (_, second) = storage
            .lookup(&key, &inactive())
            .await
            .expect("ok")
            .expect("partial");

        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let read_three = |name: &'static str, mut reader: HitHandler| {
            let order = Arc::clone(&order);
            tokio::spawn(async move {
                for _ in 0..3 {
                    let chunk = reader.read_body().await.expect("read").expect("chunk");
                    order
                        .lock()
                        .push(format!("{name}{}", String::from_utf8_lossy(&chunk)));
                }
            })
        };
        let reading = [read_three("1", first), read_three("2", second)];
        for task in reading {
            task.await.expect("join");
        }

        // After every read, neither reader is more than one chunk ahead of the other.
        let order = order.lock().clone();
        assert_eq!(order.len(), 6, "{order:?}");
        let mut counts = [0i32; 2];
        for read in &order {
            counts[usize::from(read.starts_with('2'))] += 1;
            assert!((counts[0] - counts[1]).abs() <= 1, "{order:?}");
        }
        for name in ["1", "2"] {
            let chunks: String = order
                .iter()
                .filter_map(|read| read.strip_prefix(name))
                .collect();
            assert_eq!(chunks, "abc", "{order:?}");
        }
    }

    /// A read dropped while it gives other readers their turn loses no chunk: the next read
    /// returns the chunk the dropped one would have returned.
    #[tokio::test(flavor = "current_thread")]
    async fn dropped_partial_read_loses_nothing() {
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)));
        let key = CacheKey::new("dropped", "primary");
        let (_miss, mut reader) = fill_with_reader(storage, &key, &[b"x", b"y"]).await;
        {
            let read = reader.read_body();
            tokio::pin!(read);
            let first_poll = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(read.as_mut(), cx))
            })
            .await;
            assert!(first_poll.is_pending(), "the read gives way first");
        }
        assert_eq!(
            reader.read_body().await.expect("read"),
            Some(Bytes::from_static(b"x"))
        );
        assert_eq!(
            reader.read_body().await.expect("read"),
            Some(Bytes::from_static(b"y"))
        );
    }

    #[tokio::test]
    async fn streaming_write_lookup_finds_own_fill() {
        let storage: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 1024, 1024)));
        let key = CacheKey::new("t", "primary");
        let miss = storage
            .get_miss_handler(&key, &meta(), &inactive())
            .await
            .expect("miss");
        let tag = miss.streaming_write_tag().expect("tag").to_vec();
        let found = storage
            .lookup_streaming_write(&key, Some(&tag), &inactive())
            .await;
        assert!(found.expect("ok").is_some());
        let other = U64WriteId::from(u64::MAX);
        let missing = storage
            .lookup_streaming_write(&key, Some(other.as_bytes()), &inactive())
            .await;
        assert!(missing.expect("ok").is_none());
    }
}
