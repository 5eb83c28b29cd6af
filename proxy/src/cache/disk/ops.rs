//! Pingora's `Storage` for the disk tier: lookups, fills, purges and meta rewrites.

use std::any::Any;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{HitHandler, MissHandler, PurgeOutcome, PurgeTarget, PurgeType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::{Error, ErrorType, Result};

use super::files::{self, blocking_io, io_error, ReadFailure};
use super::format::{meta_times, unix_secs, EntryKey, Header};
use super::hit::DiskHit;
use super::index::Slot;
use super::miss::DiskMiss;
use super::DiskStorage;
use crate::cache::stored_meta::with_body_length;

/// Number of reads of a header that fails its checks before the entry counts as corrupt,
/// because another process may be rewriting that header in place.
const HEADER_READS: usize = 3;
/// Shortest interval, in seconds, between two mtime updates of an entry that is read.
const TOUCH_SECS: u64 = 60;

/// Change that `rewrite_meta` applies to an entry's meta.
enum MetaChange {
    /// Store this serialized meta, with its (fresh until, stale until) times.
    Replace((Vec<u8>, Vec<u8>), (u64, u64)),
    /// Make the stored meta stale at this time (keeps the rest).
    ExpireAt(SystemTime),
}

#[async_trait]
impl Storage for DiskStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let name = key.combined_bin();
        let found = run(move || self.open_entry(name)).await?;
        let counter = if found.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found.map(|(meta, hit)| (meta, Box::new(hit) as HitHandler)))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(self.start_fill(key, meta).await?))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let name = target.key().combined_bin();
        let removed = blocking_io(move || self.remove_entry(&name))
            .await
            .map_err(|e| {
                io_error(
                    ErrorType::InternalError,
                    "purge",
                    &self.entry_path(&name),
                    e,
                )
            })?;
        if !removed {
            return Ok(PurgeOutcome::NotFound);
        }
        if matches!(purge_type, PurgeType::Eviction) {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PurgeOutcome::Purged(None))
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let name = target.key().combined_bin();
        let change = MetaChange::ExpireAt(SystemTime::now());
        let expired = run(move || self.rewrite_meta(name, change)).await?;
        Ok(if expired {
            PurgeOutcome::Expired
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
        let name = key.combined_bin();
        let change = MetaChange::Replace(meta.serialize()?, times_of(meta));
        run(move || self.rewrite_meta(name, change)).await
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

impl DiskStorage {
    /// Opens a published entry for reading; a corrupt one is deleted and reported as absent.
    fn open_entry(&'static self, name: HashBinary) -> Result<Option<(CacheMeta, DiskHit)>> {
        let path = self.entry_path(&name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Deleted behind this process's back (by the other process during an upgrade,
                // or by hand): the index must not keep claiming it.
                self.index.lock().remove(&name);
                return Ok(None);
            }
            Err(e) => return Err(io_error(ErrorType::FileOpenError, "open", &path, e)),
        };
        let (header, md) = match self.read_checked(&file, &name) {
            Ok(found) => found,
            Err((ReadFailure::Io(e), _)) => {
                return Err(io_error(ErrorType::FileReadError, "read", &path, e))
            }
            Err((ReadFailure::Corrupt(reason), ino)) => {
                self.discard(&name, ino, &reason);
                return Ok(None);
            }
        };
        let meta = match CacheMeta::deserialize(&header.meta.0, &header.meta.1) {
            Ok(meta) => meta,
            Err(e) => {
                self.discard(&name, md.ino(), &format!("meta does not deserialize: {e}"));
                return Ok(None);
            }
        };
        self.note_read(name, &header, &md, &file);
        let hit = DiskHit::new(self, name, Arc::new(file), md.ino(), &header);
        let meta = with_body_length(&meta, header.body_len).unwrap_or(meta);
        Ok(Some((meta, hit)))
    }

    /// Reads and checks a header, retrying one that may be mid-rewrite by another process.
    ///
    /// A failure carries the inode of the file, for a guarded delete.
    fn read_checked(
        &self,
        file: &File,
        name: &HashBinary,
    ) -> std::result::Result<(Header, Metadata), (ReadFailure, u64)> {
        let _reading = self.stripe(name).read();
        let mut attempt = 1;
        loop {
            let md = file.metadata().map_err(|e| (ReadFailure::Io(e), 0))?;
            let result = files::read_header(file, md.len()).and_then(|h| {
                if h.key.combined() == *name {
                    Ok(h)
                } else {
                    Err(ReadFailure::Corrupt(
                        "key data does not match the file name".into(),
                    ))
                }
            });
            match result {
                Ok(header) => return Ok((header, md)),
                Err(ReadFailure::Corrupt(_)) if attempt < HEADER_READS => {
                    attempt += 1;
                    std::thread::yield_now();
                }
                Err(failure) => return Err((failure, md.ino())),
            }
        }
    }

    /// Marks an entry as read: moves it to the front of the LRU order, adopts a file this
    /// process did not write, and refreshes the file's mtime when it is old.
    fn note_read(&self, name: HashBinary, header: &Header, md: &Metadata, file: &File) {
        let now = unix_secs(SystemTime::now());
        let mut touch_file = false;
        let victims = {
            let mut index = self.index.lock();
            match index.touch(&name) {
                Some(slot) if slot.ino == md.ino() => {
                    touch_file = now.saturating_sub(slot.touched) >= TOUCH_SECS;
                    if touch_file {
                        slot.touched = now;
                    }
                    Vec::new()
                }
                _ => {
                    let mtime = md.modified().map_or(now, unix_secs);
                    let key = Arc::new(header.key.clone());
                    let slot = Slot::new(md.len(), md.ino(), header.stale_until, mtime, key);
                    index.insert(name, slot);
                    index.evict_over(self.budget, Some(&name))
                }
            }
        };
        if touch_file {
            // Recency is a hint: a failure only makes the entry look older after a restart.
            let _ = file.set_modified(SystemTime::now());
        }
        self.delete_victims(victims);
    }

    /// Deletes an entry's file and removes it from the index; returns whether there was one.
    fn remove_entry(&self, name: &HashBinary) -> io::Result<bool> {
        let known = self.index.lock().remove(name).is_some();
        match std::fs::remove_file(self.entry_path(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(known),
            Err(e) => Err(e),
        }
    }

    /// Rewrites the meta of a published entry; returns `false` when there is none.
    fn rewrite_meta(&self, name: HashBinary, change: MetaChange) -> Result<bool> {
        let path = self.entry_path(&name);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error(ErrorType::FileOpenError, "open", &path, e)),
        };
        let (old, md) = match self.read_checked(&file, &name) {
            Ok(found) => found,
            Err((ReadFailure::Io(e), _)) => {
                return Err(io_error(ErrorType::FileReadError, "read", &path, e))
            }
            Err((ReadFailure::Corrupt(reason), ino)) => {
                self.discard(&name, ino, &reason);
                return Ok(false);
            }
        };
        let (meta, times) = match change {
            MetaChange::Replace(meta, times) => (meta, times),
            MetaChange::ExpireAt(at) => {
                let mut meta = CacheMeta::deserialize(&old.meta.0, &old.meta.1)?;
                meta.expire_at(at);
                (meta.serialize()?, times_of(&meta))
            }
        };
        let new = old.with_meta(meta, times).map_err(|reason| {
            Error::explain(ErrorType::InternalError, format!("disk cache: {reason}"))
        })?;
        if new.body_offset == old.body_offset {
            self.rewrite_in_place(&file, &new, &path)?;
            self.update_slot(name, md.ino(), md.len(), &new);
        } else {
            let (ino, size) = self.rewrite_by_copy(&file, &old, &new, &md, &path)?;
            self.update_slot(name, ino, size, &new);
        }
        Ok(true)
    }

    fn rewrite_in_place(&self, file: &File, new: &Header, path: &Path) -> Result<()> {
        let name = new.key.combined();
        let _writing = self.stripe(&name).write();
        file.write_all_at(&new.encode(), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error(ErrorType::FileWriteError, "rewrite the header of", path, e))
    }

    /// Copies the entry with a larger header to a temp file and renames it into place.
    ///
    /// Returns the new file's inode and size.
    fn rewrite_by_copy(
        &self,
        src: &File,
        old: &Header,
        new: &Header,
        md: &Metadata,
        path: &Path,
    ) -> Result<(u64, u64)> {
        let tmp = self.new_temp_path();
        let copied = copy_entry(src, old, new, &tmp).and_then(|ino| {
            // Another process may have published a new body meanwhile: keep that one.
            match std::fs::symlink_metadata(path) {
                Ok(now) if now.ino() == md.ino() => std::fs::rename(&tmp, path).map(|()| ino),
                Ok(_) => Err(io::Error::other(
                    "entry replaced by another writer during the meta rewrite; keeping it",
                )),
                Err(e) => Err(e),
            }
        });
        copied.map(|ino| (ino, new.file_len())).map_err(|e| {
            files::remove_quietly(&tmp);
            io_error(ErrorType::FileWriteError, "copy with a new header", path, e)
        })
    }

    fn update_slot(&self, name: HashBinary, ino: u64, size: u64, header: &Header) {
        let victims = {
            let mut index = self.index.lock();
            let touched = index.get(&name).map_or(0, |s| s.touched);
            let key = Arc::new(header.key.clone());
            index.insert(name, Slot::new(size, ino, header.stale_until, touched, key));
            index.evict_over(self.budget, Some(&name))
        };
        self.delete_victims(victims);
    }
}

/// Returns (fresh until, stale until) of a meta in Unix seconds.
fn times_of(meta: &CacheMeta) -> (u64, u64) {
    meta_times(
        meta.fresh_until(),
        meta.stale_while_revalidate_sec(),
        meta.stale_if_error_sec(),
    )
}

/// Writes `new` and the body of `src` to a new file at `tmp`; returns its inode.
fn copy_entry(src: &File, old: &Header, new: &Header, tmp: &Path) -> io::Result<u64> {
    let mut dst = files::create_temp_file(tmp)?;
    let head = new.encode();
    dst.write_all(&head)?;
    dst.set_len(new.body_offset)?;
    dst.seek(SeekFrom::Start(new.body_offset))?;
    let mut reader = src;
    reader.seek(SeekFrom::Start(old.body_offset))?;
    let copied = io::copy(&mut io::Read::take(reader, old.body_len), &mut dst)?;
    if copied != old.body_len {
        return Err(io::Error::other(format!(
            "copied {copied} of {} body bytes",
            old.body_len
        )));
    }
    dst.sync_data()?;
    Ok(dst.metadata()?.ino())
}

/// Runs blocking work that returns a Pingora result on a blocking thread.
async fn run<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Error::because(
            ErrorType::InternalError,
            "disk cache: blocking file task failed",
            e,
        )
    })?
}

impl DiskStorage {
    /// Starts a fill of `key`: the concrete miss handler, so that the caller can also
    /// [`DiskMiss::tap`] it.
    pub async fn start_fill(&'static self, key: &CacheKey, meta: &CacheMeta) -> Result<DiskMiss> {
        let entry = EntryKey::new(key, key.primary_key());
        let header = Header::new(entry, meta.serialize()?, times_of(meta)).map_err(|reason| {
            self.note_write_error(&reason);
            Error::explain(ErrorType::InternalError, format!("disk cache: {reason}"))
        })?;
        let expected = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        DiskMiss::start(self, key.combined_bin(), header, expected).await
    }
}
