//! The two cache tiers together: memory in front of disk.
//!
//! A lookup tries memory first (fills in progress, then complete entries), then fills of large
//! objects in progress, then disk. A disk hit of an object small enough for memory is read
//! whole and its checksum checked before the response starts, so a damaged entry is a miss.
//! The body is then copied into memory, and the next request is served from there. Only one
//! request per key copies at a time, and the bodies being copied at once total at most
//! [`TieredStorage::promotion_limit`]. A request that finds no room streams the entry from
//! disk instead, like a larger body. A larger body streams from disk, and damage found at its
//! end cuts the response off.
//!
//! A fill of an object whose `Content-Length` fits the memory tier writes to both tiers:
//! readers stream it from memory while the disk copy is written, and the disk entry is
//! published before the memory one. A disk write error turns the disk copy off for that
//! object only; the client still gets the response and the memory copy.
//!
//! A fill of a larger object, or of one without `Content-Length`, goes to disk only, and its
//! readers follow the temp file as it is written, so memory stays bounded whatever the
//! object's size. A disk write error turns the disk copy off: nothing is stored, and the
//! requests that joined the fill get an error, like an origin error would give them. The
//! request that fills still sends the whole response: its reader takes the rest of the body
//! from a [`Relay`] in memory, which keeps what its client has not read yet, up to
//! [`RELAY_MAX_BYTES`]. NOTE: when the disk tier cannot even create the temp file, a fill
//! without `Content-Length` falls back to the memory tier and is held there whole, up to the
//! largest object size of either tier.
//!
//! Each tier bounds itself; a purge removes from both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::any::Any;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::streaming_write::U64WriteId;
use pingora::cache::storage::{
    HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::{Error, ErrorType, Result};

use super::disk::{DiskHit, DiskMiss, DiskStorage, FileTap, Relay, RELAY_MAX_BYTES};
use super::lock::FillState;
use super::memory::MemoryStorage;
use super::purge_log::PurgeLog;
use crate::cache::KeyHashMap;

/// Write ids of large fills have this bit set, so they never clash with the memory tier's.
const LARGE_FILL_BIT: u64 = 1 << 63;

/// Memory in front of disk, as one Pingora `Storage`.
pub struct TieredStorage {
    memory: &'static MemoryStorage,
    disk: &'static DiskStorage,
    /// The cache's purges, which a disk hit checks before its copy in memory may stay.
    purges: &'static PurgeLog,
    /// Fills of objects too large for memory, readable through their temp files.
    large_fills: RwLock<KeyHashMap<Arc<LargeFill>>>,
    next_large_id: AtomicU64,
    /// Disk hits being read whole to copy them into memory.
    promotions: Mutex<Promotions>,
}

/// A fill that goes to disk only.
struct LargeFill {
    id: u64,
    meta: (Vec<u8>, Vec<u8>),
    tap: FileTap,
    /// The rest of the body for the filling request's reader when the disk copy fails.
    relay: Arc<Relay>,
}

/// The keys (combined hashes) of the disk hits being copied into memory, and their total
/// body bytes.
#[derive(Default)]
struct Promotions {
    keys: HashSet<HashBinary>,
    bytes: u64,
}

/// One disk hit being copied into memory; dropping it ends the copy.
struct Promotion {
    storage: &'static TieredStorage,
    key: HashBinary,
    bytes: u64,
}

impl Drop for Promotion {
    fn drop(&mut self) {
        let mut promotions = self.storage.promotions.lock();
        promotions.keys.remove(&self.key);
        promotions.bytes -= self.bytes;
    }
}

impl TieredStorage {
    /// Puts `memory` in front of `disk`.
    pub fn new(
        memory: &'static MemoryStorage,
        disk: &'static DiskStorage,
        purges: &'static PurgeLog,
    ) -> Self {
        Self {
            memory,
            disk,
            purges,
            large_fills: RwLock::default(),
            next_large_id: AtomicU64::new(1),
            promotions: Mutex::default(),
        }
    }

    /// Returns the most body bytes that disk hits copy into memory at once: a quarter of the
    /// memory tier's budget, and at least its largest object, so that one copy can always
    /// run. Each copy keeps its whole body in memory until the memory tier takes it.
    pub fn promotion_limit(&self) -> u64 {
        let quarter = self.memory.budget_bytes() / 4;
        quarter.max(self.memory.max_object_bytes()) as u64
    }

    /// Starts copying the disk hit of `key`, with a body of `bytes`, into memory. Returns
    /// `None` when another request copies the same key, or when the copy would take the
    /// bytes being copied past [`Self::promotion_limit`].
    fn start_promotion(&'static self, key: HashBinary, bytes: u64) -> Option<Promotion> {
        let mut promotions = self.promotions.lock();
        let over_limit = promotions.bytes > 0 && promotions.bytes + bytes > self.promotion_limit();
        if over_limit || !promotions.keys.insert(key) {
            return None;
        }
        promotions.bytes += bytes;
        Some(Promotion {
            storage: self,
            key,
            bytes,
        })
    }

    /// Returns a reader of the large fill of `key` in progress (of fill `id`, when given).
    fn large_fill_hit(&self, key: &CacheKey, id: Option<u64>) -> Option<(CacheMeta, HitHandler)> {
        let fill = self.large_fills.read().get(&key.combined_bin()).cloned()?;
        if id.is_some_and(|id| id != fill.id) {
            return None;
        }
        let meta = CacheMeta::deserialize(&fill.meta.0, &fill.meta.1).ok()?;
        // The file is gone once the fill is published or failed; the caller then looks on disk.
        // The filling request looks its fill up by id, and only its reader gets the relay.
        let reader = match id {
            Some(_) => fill.tap.reader_with_relay(&fill.relay),
            None => fill.tap.reader(),
        }
        .ok()?;
        Some((meta, Box::new(reader)))
    }

    fn end_large_fill(&self, key: &HashBinary, id: u64) {
        let mut fills = self.large_fills.write();
        if fills.get(key).is_some_and(|fill| fill.id == id) {
            fills.remove(key);
        }
    }

    /// Starts a disk-only fill with readers, when the object is too large for memory or of
    /// unknown size (no `Content-Length`), and the disk accepts it.
    ///
    /// A fill of unknown size that turns out small enough for memory gets there on its first
    /// disk hit, like any small disk entry.
    async fn start_large_fill(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
    ) -> Option<MissHandler> {
        let length = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .map(|value| value.to_str().ok()?.parse::<usize>().ok());
        match length {
            // No usable length: the size is known only when the body ends.
            None | Some(None) => {}
            Some(Some(length)) if length > self.memory.max_object_bytes() => {}
            Some(Some(_)) => return None,
        }
        let mut disk = match self.disk.start_fill(key, meta).await {
            Ok(disk) => disk,
            Err(e) => {
                tracing::debug!(error = %e, "not writing this object to the disk cache");
                return None;
            }
        };
        let id = self.next_large_id.fetch_add(1, Ordering::Relaxed) | LARGE_FILL_BIT;
        let relay = Arc::new(Relay::default());
        disk.relay_on_failure(Arc::clone(&relay));
        let fill = LargeFill {
            id,
            meta: meta.serialize().ok()?,
            tap: disk.tap(),
            relay: Arc::clone(&relay),
        };
        let name = key.combined_bin();
        self.large_fills.write().insert(name, Arc::new(fill));
        Some(Box::new(LargeMiss {
            storage: self,
            disk: Some(disk),
            relay,
            name,
            id,
            tag: U64WriteId::from(id),
        }))
    }
}

impl TieredStorage {
    /// Reads the body of a disk hit small enough for memory whole, checking its checksum
    /// before anything is sent, then copies it into memory. A damaged or unreadable body
    /// makes the lookup a miss; the disk tier deletes a damaged entry and logs it.
    async fn verified_hit(
        &'static self,
        key: &CacheKey,
        meta: CacheMeta,
        mut inner: HitHandler,
        mark: u64,
        body_len: u64,
    ) -> Option<(CacheMeta, HitHandler)> {
        let mut body = BytesMut::with_capacity(usize::try_from(body_len).unwrap_or(0));
        loop {
            match inner.read_body().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, key = %key.primary_key_str().unwrap_or_default(),
                        "disk cache entry unusable; treating the request as a miss");
                    return None;
                }
            }
        }
        let body = body.freeze();
        if let Ok(serialized) = meta.serialize() {
            self.memory.promote(key, serialized, body.clone());
            // Checked after the copy is in memory: a purge recorded before this check is seen
            // here, and one recorded after it removes the copy itself.
            let (domain, primary) = (&key.user_tag, key.primary_key());
            if self.purges.purged_since(mark, domain, primary) {
                self.memory
                    .purge_matching(|d, p| d == domain.as_str() && p == primary);
            }
        }
        Some((meta, super::memory::bytes_hit(body)))
    }
}

impl FillState for TieredStorage {
    fn fill_running(&self, key: &HashBinary) -> bool {
        self.memory.fill_running(key) || self.large_fills.read().contains_key(key)
    }

    fn stored(&self, key: &HashBinary) -> bool {
        self.memory.stored(key) || self.disk.contains(key)
    }
}

#[async_trait]
impl Storage for TieredStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(hit) = self.memory.lookup(key, trace).await? {
            return Ok(Some(hit));
        }
        if let Some(hit) = self.large_fill_hit(key, None) {
            return Ok(Some(hit));
        }
        // Noted before the read, so that a purge made while the body is read, or one still
        // removing entries, is seen.
        let mark = self.purges.read_mark();
        let Some((meta, inner)) = self.disk.lookup(key, trace).await? else {
            return Ok(None);
        };
        let body_len = inner
            .as_any()
            .downcast_ref::<DiskHit>()
            .map(DiskHit::body_len)
            .filter(|len| *len <= self.memory.max_object_bytes() as u64);
        let promotion = body_len.and_then(|len| self.start_promotion(key.combined_bin(), len));
        let (Some(body_len), Some(_promotion)) = (body_len, promotion) else {
            // Streamed from disk as the client reads it. The checksum is known only at the end,
            // so a damaged body is cut off there with an error, and the entry is deleted.
            return Ok(Some((meta, inner)));
        };
        Ok(self.verified_hit(key, meta, inner, mark, body_len).await)
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let id = streaming_write_tag
            .and_then(|tag| U64WriteId::try_from(tag).ok())
            .map(u64::from);
        match id {
            Some(id) if id & LARGE_FILL_BIT != 0 => Ok(self.large_fill_hit(key, Some(id))),
            Some(_) => {
                self.memory
                    .lookup_streaming_write(key, streaming_write_tag, trace)
                    .await
            }
            None => self.lookup(key, trace).await,
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<MissHandler> {
        if let Some(large) = self.start_large_fill(key, meta).await {
            return Ok(large);
        }
        let memory = self.memory.get_miss_handler(key, meta, trace).await?;
        let disk = match self.disk.get_miss_handler(key, meta, trace).await {
            Ok(handler) => Some(handler),
            Err(e) => {
                tracing::debug!(error = %e, "not writing this object to the disk cache");
                None
            }
        };
        Ok(Box::new(TeeMiss { memory, disk }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let memory = self.memory.purge(target, purge_type, trace).await?;
        let disk = self.disk.purge(target, purge_type, trace).await?;
        Ok(either_removed(memory, disk))
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        // The memory copy is dropped; the disk copy stays, marked stale, for revalidation.
        let memory = self
            .memory
            .purge(target, PurgeType::Invalidation, trace)
            .await?;
        let disk = self.disk.expire(target, trace).await?;
        Ok(either_removed(memory, disk))
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<bool> {
        let memory = self.memory.update_meta(key, meta, trace).await?;
        let disk = self.disk.update_meta(key, meta, trace).await?;
        Ok(memory || disk)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

fn either_removed(memory: PurgeOutcome, disk: PurgeOutcome) -> PurgeOutcome {
    match (memory, disk) {
        (PurgeOutcome::NotFound, other) => other,
        (removed, _) => removed,
    }
}

/// Writes a fill to both tiers; readers stream it from the memory side.
struct TeeMiss {
    memory: MissHandler,
    /// `None` when the disk copy failed or was never started.
    disk: Option<MissHandler>,
}

#[async_trait]
impl HandleMiss for TeeMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if let Some(disk) = self.disk.as_mut() {
            if let Err(e) = disk.write_body(data.clone(), eof).await {
                // The disk tier logs and counts its own write errors; dropping the handler
                // removes the partial file.
                tracing::debug!(error = %e, "disk cache write failed; keeping the memory copy only");
                self.disk = None;
            }
        }
        self.memory.write_body(data, eof).await
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        if let Some(disk) = self.disk {
            if let Err(e) = disk.finish().await {
                tracing::debug!(error = %e, "disk cache publish failed; keeping the memory copy only");
            }
        }
        self.memory.finish().await
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        self.memory.streaming_write_tag()
    }
}

/// A disk-only fill whose readers follow the temp file.
struct LargeMiss {
    storage: &'static TieredStorage,
    /// Taken by `finish`; `None` after a write error turned the disk copy off.
    disk: Option<DiskMiss>,
    /// Takes the body for the filling request's reader once the disk copy is off.
    relay: Arc<Relay>,
    name: HashBinary,
    id: u64,
    tag: U64WriteId,
}

#[async_trait]
impl HandleMiss for LargeMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if let Some(disk) = self.disk.as_mut() {
            let Err(e) = disk.write_body(data.clone(), eof).await else {
                return Ok(());
            };
            // The disk tier counted and logged the error, deleted the temp file and diverted
            // the relay. Requests that look the key up now start a fill of their own.
            tracing::debug!(error = %e, "disk cache write failed; the filling request goes on from memory");
            self.disk = None;
            self.storage.end_large_fill(&self.name, self.id);
        }
        // Without a reader on the relay, the filling request sends the origin's body itself.
        if !self.relay.claimed() || self.relay.push(data) {
            return Ok(());
        }
        Error::e_explain(
            ErrorType::InternalError,
            format!(
                "disk cache: the disk copy failed, and the client is more than \
                 {RELAY_MAX_BYTES} bytes behind the origin"
            ),
        )
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        // A disk copy that failed stores nothing, but the fill itself succeeded: an error here
        // would make Pingora drop the filling request's reader before it read the end.
        let finished = match self.disk.take() {
            Some(disk) => Box::new(disk).finish().await.or_else(|e| {
                tracing::debug!(error = %e, "disk cache publish failed; nothing stored");
                Ok(MissFinishType::Created(0))
            }),
            None => Ok(MissFinishType::Created(0)),
        };
        self.relay.end(true);
        self.storage.end_large_fill(&self.name, self.id);
        finished
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.tag.as_bytes())
    }
}

impl Drop for LargeMiss {
    fn drop(&mut self) {
        // Ends a relay that `finish` did not end: the fill failed.
        self.relay.end(false);
        self.storage.end_large_fill(&self.name, self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use pingora::cache::trace::Span;
    use pingora::http::ResponseHeader;

    use super::*;
    use crate::cache::{cache_key, PurgeScope};

    #[test]
    fn promotion_once_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = DiskStorage::open(dir.path(), 1 << 30, 1 << 20).expect("disk tier");
        let disk: &'static DiskStorage = Box::leak(Box::new(disk));
        // A budget of 4 MiB: a quarter is 1 MiB, the largest object 512 KiB.
        let memory: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(4 << 20, 512 << 10, 1 << 20)));
        let log: &'static PurgeLog = Box::leak(Box::default());
        let tiered: &'static TieredStorage =
            Box::leak(Box::new(TieredStorage::new(memory, disk, log)));
        assert_eq!(tiered.promotion_limit(), 1 << 20);

        let first = tiered.start_promotion([1; 16], 512 << 10);
        assert!(first.is_some());
        assert!(tiered.start_promotion([1; 16], 1).is_none(), "same key");
        let second = tiered.start_promotion([2; 16], 512 << 10);
        assert!(second.is_some(), "within the limit");
        assert!(
            tiered.start_promotion([3; 16], 1).is_none(),
            "over the limit"
        );
        drop(first);
        drop(second);
        let alone = tiered.start_promotion([3; 16], 4 << 20);
        assert!(alone.is_some(), "one copy always runs");
    }

    /// Replays a purge's steps (record, memory, disk) with a disk hit between the memory and
    /// the disk step: the purge is still running, so the hit's copy must not stay in memory.
    #[tokio::test]
    async fn disk_hit_during_purge_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = DiskStorage::open(dir.path(), 1 << 30, 1 << 20).expect("disk tier");
        let disk: &'static DiskStorage = Box::leak(Box::new(disk));
        let memory: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(1 << 20, 64 * 1024, 1 << 20)));
        let log: &'static PurgeLog = Box::leak(Box::default());
        let tiered: &'static TieredStorage =
            Box::leak(Box::new(TieredStorage::new(memory, disk, log)));
        let trace = Span::inactive().handle();

        let key = cache_key("primary", None, "/a", None);
        let body = b"stored body";
        let mut header = ResponseHeader::build(200, None).expect("status");
        header
            .append_header("content-length", body.len().to_string())
            .expect("header");
        let now = SystemTime::now();
        let meta = CacheMeta::new(now + Duration::from_secs(600), now, 0, 0, header);
        let mut miss = tiered
            .get_miss_handler(&key, &meta, &trace)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(body), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        memory.purge_matching(|_, _| true);
        assert!(disk.contains(&key.combined_bin()), "stored on disk");

        let scope = PurgeScope::Url {
            domain: "primary".into(),
            path: "/a".into(),
            query: None,
        };
        let matches = |domain: &str, primary: &[u8]| scope.covers_key(domain, primary);
        let running = log.record(scope.clone());
        memory.purge_matching(matches);

        let (_, mut hit) = tiered
            .lookup(&key, &trace)
            .await
            .expect("lookup")
            .expect("a disk hit");
        while hit.read_body().await.expect("read").is_some() {}

        disk.purge_matching(matches);
        drop(running);
        assert!(!disk.contains(&key.combined_bin()), "purged from disk");
        assert!(
            !memory.stored(&key.combined_bin()),
            "the purged body stays in memory"
        );
    }
}
