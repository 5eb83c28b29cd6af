//! The two cache tiers together: memory in front of disk.
//!
//! A lookup tries memory first (complete entries and fills in progress), then disk. A complete
//! disk hit of an object small enough for memory is copied into memory as it is read, so the
//! next request is served from memory. A fill writes to both tiers: readers stream it from
//! memory while the disk copy is written, and the disk entry is published before the memory one.
//! A disk write error turns the disk copy off for that object only; the client still gets the
//! response and the memory copy. Each tier bounds itself; a purge removes from both.

use std::any::Any;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::Result;

use super::disk::DiskStorage;
use super::memory::MemoryStorage;

/// Memory in front of disk, as one Pingora `Storage`.
pub struct TieredStorage {
    memory: &'static MemoryStorage,
    disk: &'static DiskStorage,
}

impl TieredStorage {
    /// Puts `memory` in front of `disk`.
    pub fn new(memory: &'static MemoryStorage, disk: &'static DiskStorage) -> Self {
        Self { memory, disk }
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
        let Some((meta, inner)) = self.disk.lookup(key, trace).await? else {
            return Ok(None);
        };
        let promotion = meta.serialize().ok().map(|serialized| Promotion {
            key: key.clone(),
            meta: serialized,
            body: BytesMut::new(),
        });
        let hit = PromotingHit {
            inner,
            memory: self.memory,
            promotion,
        };
        Ok(Some((meta, Box::new(hit))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        match streaming_write_tag {
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

/// What a disk hit collects to copy into memory.
struct Promotion {
    key: CacheKey,
    meta: (Vec<u8>, Vec<u8>),
    body: BytesMut,
}

/// A disk hit that copies the body into memory when it is read whole and fits there.
struct PromotingHit {
    inner: HitHandler,
    memory: &'static MemoryStorage,
    /// `None` once the object turned out too large, was read in ranges, or was promoted.
    promotion: Option<Promotion>,
}

#[async_trait]
impl HandleHit for PromotingHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        let chunk = self.inner.read_body().await?;
        match (&chunk, self.promotion.as_mut()) {
            (Some(data), Some(promotion)) => {
                if promotion.body.len() + data.len() <= self.memory.max_object_bytes() {
                    promotion.body.extend_from_slice(data);
                } else {
                    self.promotion = None;
                }
            }
            (None, Some(_)) => {
                // The disk tier checks the body's checksum before it reports the end, so only
                // a verified body gets here.
                if let Some(done) = self.promotion.take() {
                    self.memory
                        .promote(&done.key, done.meta, done.body.freeze());
                }
            }
            _ => {}
        }
        Ok(chunk)
    }

    async fn finish(
        self: Box<Self>,
        storage: &'static (dyn Storage + Sync),
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<()> {
        self.inner.finish(storage, key, trace).await
    }

    fn can_seek(&self) -> bool {
        self.inner.can_seek()
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        self.promotion = None;
        self.inner.seek(start, end)
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
