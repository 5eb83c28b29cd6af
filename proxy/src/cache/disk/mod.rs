//! The disk tier: complete responses streamed to and from files, bounded in bytes.
//!
//! # Layout
//!
//! `<dir>/FORMAT` names the directory format; `<dir>/tmp/` holds fills in progress;
//! `<dir>/ab/cd/<32 hex digits>` holds one published entry per combined cache key (primary
//! hash plus variance), in the layout documented in `format.rs`: a header with the key data,
//! the serialized `CacheMeta` and checksums, then the body.
//!
//! # Crash safety and sharing
//!
//! A fill is written to a temp file, checksummed, fsynced and renamed into place, so readers
//! (in this process or in another one sharing the directory during an upgrade) see a complete
//! old entry or a complete new one. `update_meta` rewrites the header in place when the new
//! meta fits the room left after the old one; the header carries its own checksum, readers
//! retry a header that does not check out, and a header torn by a crash is found and deleted.
//! Otherwise it copies the entry to a temp file and renames it. A body checksum is verified
//! whenever a whole body is read; a mismatch is an error before the last chunk, so a corrupt
//! body is never served as complete. The shard directory is not fsynced after a rename: after
//! a power loss a just-published entry may be missing (its temp file is deleted at the next
//! open), but never torn.
//!
//! # Eviction
//!
//! The tier enforces its byte budget itself instead of relying on Pingora's eviction manager:
//! its index (rebuilt by scanning the directory at [`DiskStorage::open`]) keeps every entry in
//! least-recently-used order, and each publish evicts the least recently used entries until
//! the total size of the entry files (headers included) is within the budget. The budget
//! therefore holds from the first request after a restart, with no eviction state to load or
//! save. Recency survives a restart through file mtimes, set when an entry is written and
//! touched at most once a minute when it is read. Sizes are apparent file sizes (header and
//! body); `MissFinishType::Created` and `get_eviction_weight` report the same value. Give
//! Pingora no eviction manager for this tier, or one whose limit is not smaller than this
//! budget (its purges are honoured). Eviction removes expired entries only in their LRU turn.
//! [`DiskStorage::sweep_expired`] removes those past their stale windows. The gateway calls it
//! every `cache.disk_sweep_interval_secs` (see `cache/sweep.rs`), so such an entry takes
//! budget until the next sweep at the latest.
//!
//! The budget may be larger than the filesystem holds. A write that finds the filesystem full
//! evicts least recently used entries and writes again (`room.rs`).
//!
//! Two processes sharing the directory each keep their own index: while both run, the
//! directory can hold up to twice the budget. Entries written by the other process are
//! adopted when read.

mod files;
mod format;
mod hit;
mod index;
mod miss;
mod ops;
mod room;
mod scan;
mod tail;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use pingora::cache::key::{CompactCacheKey, HashBinary};

use self::files::LogLimiter;
use self::format::{from_unix_secs, unix_secs};
pub use self::hit::DiskHit;
use self::index::{Index, Slot};
pub use self::miss::DiskMiss;
pub use self::scan::{check_format_read_only, WRITE_PROBE_PREFIX};
pub use self::tail::{FileTap, Relay, TailHit, TailProgress, RELAY_MAX_BYTES};
use super::TierSnapshot;

/// Number of lock stripes that order in-place header rewrites against header reads.
const STRIPES: usize = 64;
/// Shortest time between two logged write errors.
const WRITE_ERROR_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Error from opening a cache directory.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk cache: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk cache: {} holds {found:?}, this build writes {expected:?}; \
         empty the directory or choose another one",
        path.display()
    )]
    Format {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error(
        "disk cache: {} is not empty and has no FORMAT file; refusing to use it as a cache \
         (its files would be deleted): choose an empty or new directory",
        .0.display()
    )]
    NotACache(PathBuf),
    #[error("disk cache: {0}")]
    Config(String),
    #[error("disk cache: a scan thread panicked while reading the directory")]
    ScanPanicked,
}

impl DiskError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The counters of the disk tier at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// Published entries.
    pub entries: u64,
    /// Total size of the entry files, headers included.
    pub bytes: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// Entries removed to stay within the budget, or purged for eviction.
    pub evictions: u64,
    /// Entries removed by [`DiskStorage::sweep_expired`].
    pub expired: u64,
    /// Fills that failed: I/O errors (disk full, ...) and objects over the size limit.
    pub write_errors: u64,
    /// Torn, truncated or corrupt entries found and deleted (at open or when read).
    pub corrupt_entries: u64,
}

impl DiskSnapshot {
    /// Returns the counters shared by every tier.
    pub fn tier(&self) -> TierSnapshot {
        TierSnapshot {
            entries: self.entries,
            bytes: self.bytes,
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
            write_errors: self.write_errors,
            corrupt_entries: Some(self.corrupt_entries),
            expired_entries: Some(self.expired),
        }
    }
}

/// Summary of the directory scan done by [`DiskStorage::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub entries: u64,
    pub bytes: u64,
    pub corrupt_removed: u64,
    pub temp_removed: u64,
    /// Entries evicted because the directory contained more than the budget.
    pub evicted: u64,
    pub elapsed: Duration,
}

/// One published entry, as listed by [`DiskStorage::entries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub key: CompactCacheKey,
    /// The primary key bytes given to `CacheKey::new`.
    pub primary: Vec<u8>,
    /// Size of the entry file, header included.
    pub size: u64,
    /// When the entry is past its freshness and stale windows.
    pub stale_until: SystemTime,
}

/// Entries removed by a purge or sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// The keys of the removed entries (for an eviction manager that tracks them).
    pub keys: Vec<CompactCacheKey>,
    /// Total size of the removed entry files.
    pub bytes: u64,
}

/// The handling of an index entry whose file cannot be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undeletable {
    /// It goes back into the index, so the budget keeps counting its file (the expiry sweep).
    KeepInIndex,
    /// It stays out of the index, so it is not served from the index again (purges).
    LeaveIndex,
}

/// The disk tier. Implements Pingora's `Storage`; see the module documentation.
pub struct DiskStorage {
    root: PathBuf,
    tmp: PathBuf,
    budget: u64,
    max_object: u64,
    index: Mutex<Index>,
    stripes: Vec<RwLock<()>>,
    counters: Counters,
    write_log: LogLimiter,
    /// Limits the log lines of evictions that make room on a full filesystem.
    room_log: LogLimiter,
    scan: ScanReport,
    next_write: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expired: AtomicU64,
    write_errors: AtomicU64,
    corrupt: AtomicU64,
}

impl DiskStorage {
    /// Opens (or creates, mode 0700) a cache directory and rebuilds the index by scanning it.
    ///
    /// `budget_bytes` bounds the total size of the entry files; `max_object_bytes` bounds one
    /// body and must not exceed the budget. Deletes orphaned temp files and corrupt entries, and
    /// evicts the least recently used entries if the directory contains more than the budget.
    /// Blocks while scanning: call it before serving, or from a blocking thread.
    pub fn open(dir: &Path, budget_bytes: u64, max_object_bytes: u64) -> Result<Self, DiskError> {
        check_limits(budget_bytes, max_object_bytes)?;
        let started = Instant::now();
        files::create_private_dir(dir).map_err(|e| DiskError::io("create", dir, e))?;
        scan::check_format(dir)?;
        let tmp = dir.join("tmp");
        files::create_private_dir(&tmp).map_err(|e| DiskError::io("create", &tmp, e))?;
        let temp_removed = scan::clean_temp(&tmp, SystemTime::now())?;
        let found = scan::scan_entries(dir)?;

        let mut storage = Self {
            root: dir.to_path_buf(),
            tmp,
            budget: budget_bytes,
            max_object: max_object_bytes,
            index: Mutex::new(Index::default()),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            counters: Counters::default(),
            write_log: LogLimiter::new(WRITE_ERROR_LOG_PERIOD),
            room_log: LogLimiter::new(WRITE_ERROR_LOG_PERIOD),
            scan: ScanReport::default(),
            next_write: AtomicU64::new(0),
        };

        storage
            .counters
            .corrupt
            .store(found.corrupt, Ordering::Relaxed);
        let evicted = storage.load_index(found.found);
        let (entries, bytes) = {
            let index = storage.index.lock();
            (index.len() as u64, index.bytes())
        };
        storage.scan = ScanReport {
            entries,
            bytes,
            corrupt_removed: found.corrupt,
            temp_removed,
            evicted,
            elapsed: started.elapsed(),
        };
        Ok(storage)
    }

    /// Returns the directory the tier lives in.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Returns what the scan at open found.
    pub fn scan_report(&self) -> ScanReport {
        self.scan
    }

    /// Returns whether the index contains a published entry named `name` (a combined key hash).
    pub fn contains(&self, name: &HashBinary) -> bool {
        self.index.lock().get(name).is_some()
    }

    /// Returns the number of published entries of `domain` (the key's user tag).
    pub fn domain_entries(&self, domain: &str) -> u64 {
        self.index.lock().domain_len(domain)
    }

    /// Returns the tier's counters.
    pub fn stats(&self) -> DiskSnapshot {
        let (entries, bytes) = {
            let index = self.index.lock();
            (index.len() as u64, index.bytes())
        };
        let c = &self.counters;
        DiskSnapshot {
            entries,
            bytes,
            budget_bytes: self.budget,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            corrupt_entries: c.corrupt.load(Ordering::Relaxed),
        }
    }

    /// Lists the published entries, least recently used first.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let index = self.index.lock();
        index
            .iter_lru()
            .map(|(_, slot)| EntryInfo {
                key: slot.key.compact(),
                primary: slot.key.primary.to_vec(),
                size: slot.size(),
                stale_until: from_unix_secs(slot.stale_until),
            })
            .collect()
    }

    /// Deletes every entry whose cache key carries `user_tag` (the domain).
    ///
    /// Blocks on file deletions: call it from a blocking thread when many entries may match.
    pub fn purge_domain(&self, user_tag: &str) -> PurgeReport {
        let names = self.index.lock().select(|s| &*s.key.user_tag == user_tag);
        self.remove_names(&names)
    }

    /// Deletes every entry of `user_tag` whose primary key starts with `primary_prefix`.
    ///
    /// Blocks on file deletions, like [`Self::purge_domain`].
    pub fn purge_prefix(&self, user_tag: &str, primary_prefix: &[u8]) -> PurgeReport {
        let names = self
            .index
            .lock()
            .select(|s| &*s.key.user_tag == user_tag && s.key.primary.starts_with(primary_prefix));
        self.remove_names(&names)
    }

    /// Deletes every entry for which `matches(user_tag, primary_key)` is true.
    ///
    /// Takes the same predicate as the memory tier's `purge_matching`. Blocks on file
    /// deletions, like [`Self::purge_domain`].
    pub fn purge_matching(&self, matches: impl Fn(&str, &[u8]) -> bool) -> PurgeReport {
        let names = self
            .index
            .lock()
            .select(|slot| matches(&slot.key.user_tag, &slot.key.primary));
        self.remove_names(&names)
    }

    /// Deletes entries whose stale windows ended more than `keep_stale_for` before `now`.
    ///
    /// Eviction only removes entries when space is needed; this removes entries that can no
    /// longer be served without a revalidation, so a request for one of them then fetches the
    /// whole response. Times are compared in whole seconds. Blocks on file deletions, so the
    /// gateway calls it from a blocking thread every `cache.disk_sweep_interval_secs`.
    pub fn sweep_expired(&self, now: SystemTime, keep_stale_for: Duration) -> PurgeReport {
        let limit = unix_secs(now).saturating_sub(keep_stale_for.as_secs());
        let names = self.expired_names(limit);
        self.remove_expired(&names, limit)
    }

    /// Returns the names of the entries whose stale windows ended before `limit` (Unix seconds).
    fn expired_names(&self, limit: u64) -> Vec<HashBinary> {
        self.index.lock().select(|slot| slot.stale_until < limit)
    }

    /// Deletes those of `names` whose stale windows still end before `limit`, and counts them.
    ///
    /// The index lock is released between the selection and each deletion, and a
    /// revalidation or a new fill may refresh an entry meanwhile. Checking the time again
    /// under the lock keeps such an entry.
    fn remove_expired(&self, names: &[HashBinary], limit: u64) -> PurgeReport {
        let report = self.remove_names_if(
            names,
            |slot| slot.stale_until < limit,
            Undeletable::KeepInIndex,
        );
        self.counters
            .expired
            .fetch_add(report.keys.len() as u64, Ordering::Relaxed);
        report
    }

    fn load_index(&mut self, mut found: Vec<scan::Found>) -> u64 {
        found.sort_by(|a, b| a.mtime.cmp(&b.mtime).then(a.name.cmp(&b.name)));
        let victims = {
            let index = self.index.get_mut();
            for item in found {
                index.insert(item.name, item.slot);
            }
            index.evict_over(self.budget, None)
        };
        let evicted = victims.len() as u64;
        self.delete_victims(victims);
        evicted
    }

    /// Publishes an entry renamed into place and evicts what no longer fits the budget.
    fn publish(&self, name: HashBinary, slot: Slot) {
        let victims = {
            let mut index = self.index.lock();
            index.insert(name, slot);
            index.evict_over(self.budget, Some(&name))
        };
        self.delete_victims(victims);
    }

    fn delete_victims(&self, victims: Vec<(HashBinary, Slot)>) {
        for (name, slot) in victims {
            let path = self.entry_path(&name);
            if let Err(e) = files::remove_if_same(&path, slot.ino) {
                let path = path.display();
                tracing::warn!(%path, error = %e, "disk cache: cannot evict entry");
            }
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove_names(&self, names: &[HashBinary]) -> PurgeReport {
        self.remove_names_if(names, |_| true, Undeletable::LeaveIndex)
    }

    /// Deletes the entries of `names` whose slot, read under the index lock, satisfies `remove`.
    ///
    /// An entry whose file cannot be deleted (on a read-only filesystem, for example) is kept
    /// in the index and left out of the report with [`Undeletable::KeepInIndex`], and taken
    /// out of both like the others with [`Undeletable::LeaveIndex`]. One warning per call gives
    /// the number of such entries and the first error.
    fn remove_names_if(
        &self,
        names: &[HashBinary],
        remove: impl Fn(&Slot) -> bool,
        undeletable: Undeletable,
    ) -> PurgeReport {
        let mut report = PurgeReport::default();
        let mut failed = 0u64;
        let mut first_failure = None;
        for name in names {
            let removed = {
                let mut index = self.index.lock();
                match index.get(name) {
                    Some(slot) if remove(slot) => index.remove(name),
                    _ => None,
                }
            };
            let Some(slot) = removed else {
                continue;
            };
            let path = self.entry_path(name);
            if let Err(e) = files::remove_if_same(&path, slot.ino) {
                failed += 1;
                first_failure.get_or_insert_with(|| format!("{}: {e}", path.display()));
                if undeletable == Undeletable::KeepInIndex {
                    let mut index = self.index.lock();
                    if index.get(name).is_none() {
                        index.insert(*name, slot);
                    }
                    continue;
                }
            }
            report.keys.push(slot.key.compact());
            report.bytes += slot.size();
        }
        if let Some(first) = first_failure {
            let outcome = match undeletable {
                Undeletable::KeepInIndex => "they stay in the tier and count against its budget",
                Undeletable::LeaveIndex => "their files stay on disk until a restart scans them",
            };
            tracing::warn!(
                entries = failed,
                first = %first,
                "disk cache: cannot delete entry files; {outcome}; check that the gateway's user \
                 can write to disk_dir"
            );
        }
        report
    }

    /// Deletes a corrupt entry file (if it is still the one that was read) and counts it.
    fn discard(&self, name: &HashBinary, ino: u64, reason: &str) {
        let path = self.entry_path(name);
        self.index.lock().remove_if_ino(name, ino);
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), reason, "disk cache: deleting corrupt entry");
        if let Err(e) = files::remove_if_same(&path, ino) {
            let path = path.display();
            tracing::warn!(%path, error = %e, "disk cache: cannot delete corrupt entry");
        }
    }

    /// Counts a failed fill and logs it, at most once per period.
    fn note_write_error(&self, what: &str) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.write_log.allow() {
            tracing::warn!(
                dir = %self.root.display(),
                suppressed,
                "disk cache: fill failed, response not stored: {what}"
            );
        }
    }

    fn entry_path(&self, name: &HashBinary) -> PathBuf {
        files::entry_path(&self.root, name)
    }

    fn stripe(&self, name: &HashBinary) -> &RwLock<()> {
        &self.stripes[usize::from(name[0]) % STRIPES]
    }

    fn new_temp_path(&self) -> PathBuf {
        let seq = self.next_write.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(files::temp_name(seq))
    }
}

fn check_limits(budget: u64, max_object: u64) -> Result<(), DiskError> {
    if budget == 0 || max_object == 0 {
        return Err(DiskError::Config(format!(
            "budget ({budget} bytes) and largest object ({max_object} bytes) must be positive"
        )));
    }
    if max_object > budget {
        return Err(DiskError::Config(format!(
            "largest object ({max_object} bytes) exceeds the budget ({budget} bytes): \
             lower the object limit or raise the budget"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format::{EntryKey, Header};
    use super::*;
    use pingora::cache::key::CacheHashKey;
    use pingora::cache::trace::Span;
    use pingora::cache::{CacheKey, CacheMeta, Storage};
    use pingora::http::ResponseHeader;
    use std::fs::OpenOptions;

    fn serialized_meta() -> (Vec<u8>, Vec<u8>) {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).expect("status");
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header);
        meta.serialize().expect("serialize")
    }

    /// Writes a valid entry file directly (no fsync), much faster than a fill.
    fn write_raw(root: &Path, key: &CacheKey, body: &[u8], meta: &(Vec<u8>, Vec<u8>)) -> PathBuf {
        write_raw_with_times(root, key, body, meta, (0, u64::MAX))
    }

    /// Writes an entry file like [`write_raw`], with `times` (fresh until, stale until) in Unix
    /// seconds in its header.
    fn write_raw_with_times(
        root: &Path,
        key: &CacheKey,
        body: &[u8],
        meta: &(Vec<u8>, Vec<u8>),
        times: (u64, u64),
    ) -> PathBuf {
        let entry = EntryKey::new(key, key.primary_key());
        let mut header = Header::new(entry, meta.clone(), times).expect("limits");
        header.body_len = body.len() as u64;
        header.body_crc = crc32fast::hash(body);
        let mut bytes = header.encode();
        bytes.resize(header.body_offset as usize, 0);
        bytes.extend_from_slice(body);
        let path = files::entry_path(root, &key.combined_bin());
        std::fs::create_dir_all(path.parent().expect("shard")).expect("mkdir");
        std::fs::write(&path, bytes).expect("write entry");
        path
    }

    fn rebuild(count: usize) -> ScanReport {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStorage::open(dir.path(), u64::MAX, 1).expect("create");
        let meta = serialized_meta();
        for n in 0..count {
            let key = CacheKey::new(format!("7:primary3:GET0:{n}"), "primary");
            write_raw(dir.path(), &key, b"body", &meta);
        }
        let storage = DiskStorage::open(dir.path(), u64::MAX, 1).expect("reopen");
        let report = storage.scan_report();
        println!("rebuilt {} entries in {:?}", report.entries, report.elapsed);
        report
    }

    #[test]
    fn disk_rebuild_2k_entries() {
        let report = rebuild(2_000);
        assert_eq!(report.entries, 2_000);
        assert!(report.elapsed < Duration::from_secs(10), "{report:?}");
    }

    #[test]
    #[ignore = "writes 100,000 files (about 400 MB); run by hand to measure"]
    fn disk_rebuild_100k_entries() {
        assert_eq!(rebuild(100_000).entries, 100_000);
    }

    #[test]
    fn disk_scan_deletes_misnamed_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStorage::open(dir.path(), u64::MAX, 1).expect("create");
        let key = CacheKey::new("k", "primary");
        let path = write_raw(dir.path(), &key, b"body", &serialized_meta());
        let other = files::entry_path(dir.path(), &CacheKey::new("j", "p").combined_bin());
        std::fs::create_dir_all(other.parent().expect("shard")).expect("mkdir");
        std::fs::rename(&path, &other).expect("rename");
        let storage = DiskStorage::open(dir.path(), u64::MAX, 1).expect("reopen");
        assert_eq!(storage.scan_report().corrupt_removed, 1);
        assert!(!other.exists());
    }

    #[tokio::test]
    async fn disk_read_refreshes_old_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStorage::open(dir.path(), u64::MAX, 1).expect("create");
        let key = CacheKey::new("k", "primary");
        let path = write_raw(dir.path(), &key, b"body", &serialized_meta());
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_modified(day_ago).expect("set mtime");
        let storage: &'static DiskStorage = Box::leak(Box::new(
            DiskStorage::open(dir.path(), u64::MAX, 1).expect("reopen"),
        ));
        let trace = Span::inactive().handle();
        assert!(storage
            .lookup(&key, &trace)
            .await
            .expect("lookup")
            .is_some());
        let mtime = std::fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime");
        assert!(mtime > day_ago + Duration::from_secs(3600));
    }

    /// A revalidation that refreshes an entry after the sweep selected it, and before the
    /// sweep reached it, keeps the entry on disk and in the index.
    #[tokio::test]
    async fn disk_sweep_keeps_entry_refreshed_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStorage::open(dir.path(), u64::MAX, 1).expect("create");
        let refreshed = CacheKey::new("refreshed", "primary");
        let expired = CacheKey::new("expired", "primary");
        let meta = serialized_meta();
        let refreshed_path = write_raw_with_times(dir.path(), &refreshed, b"body", &meta, (1, 1));
        let expired_path = write_raw_with_times(dir.path(), &expired, b"body", &meta, (1, 1));
        let storage: &'static DiskStorage = Box::leak(Box::new(
            DiskStorage::open(dir.path(), u64::MAX, 1).expect("reopen"),
        ));

        let now = SystemTime::now();
        let limit = unix_secs(now);
        let names = storage.expired_names(limit);
        assert_eq!(names.len(), 2, "entries selected by the sweep");

        let header = ResponseHeader::build(200, None).expect("status");
        let fresh = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header);
        let trace = Span::inactive().handle();
        let updated = storage.update_meta(&refreshed, &fresh, &trace).await;
        assert!(updated.expect("update_meta"), "the entry was not found");

        let report = storage.remove_expired(&names, limit);
        assert_eq!(report.keys.len(), 1, "entries deleted by the sweep");
        assert_eq!(storage.stats().expired, 1, "entries counted as expired");
        assert!(refreshed_path.exists(), "the refreshed entry was deleted");
        assert!(!expired_path.exists(), "the expired entry is still on disk");
        let hit = storage.lookup(&refreshed, &trace).await.expect("lookup");
        assert!(hit.is_some(), "the refreshed entry is not a hit");
    }

    #[tokio::test]
    async fn disk_undeletable_entry_handling() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStorage::open(dir.path(), u64::MAX, 1).expect("create");
        let key = CacheKey::new("expired", "primary");
        let meta = serialized_meta();
        let path = write_raw_with_times(dir.path(), &key, b"body", &meta, (1, 1));
        let storage = DiskStorage::open(dir.path(), u64::MAX, 1).expect("reopen");
        let before = storage.stats();
        assert_eq!(before.entries, 1, "entries after the scan");

        files::tests::FAIL_DELETES.with(|fail| fail.set(true));
        let swept = storage.sweep_expired(SystemTime::now(), Duration::ZERO);
        let after_sweep = storage.stats();
        let purged = storage.purge_matching(|_, _| true);
        let after_purge = storage.stats();
        files::tests::FAIL_DELETES.with(|fail| fail.set(false));

        assert!(
            swept.keys.is_empty(),
            "the sweep reported an entry it could not delete"
        );
        assert_eq!(after_sweep.expired, 0, "entries counted as expired");
        assert_eq!(
            after_sweep.entries, 1,
            "the sweep dropped the entry from the index"
        );
        assert_eq!(
            after_sweep.bytes, before.bytes,
            "bytes counted against the budget"
        );
        assert_eq!(purged.keys.len(), 1, "entries taken out by the purge");
        assert_eq!(
            after_purge.entries, 0,
            "the purge left the entry in the index"
        );
        assert!(path.exists(), "the file was deleted despite the failure");
    }

    #[test]
    fn disk_rejects_zero_budget() {
        assert!(matches!(check_limits(0, 0), Err(DiskError::Config(_))));
    }
}
