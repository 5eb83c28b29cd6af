//! Integration tests of the disk cache tier, on real files in temp dirs.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mirror_proxy::cache::disk::{DiskError, DiskStorage};
use pingora::cache::key::CacheHashKey;
use pingora::cache::storage::{HitHandler, PurgeOutcome, PurgeTarget, PurgeType};
use pingora::cache::trace::{Span, SpanHandle};
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::ResponseHeader;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Size of an entry's header region for the small metas these tests use.
const HEADER: usize = 4096;

fn trace() -> SpanHandle {
    Span::inactive().handle()
}

fn open(dir: &Path, budget: u64, max_object: u64) -> &'static DiskStorage {
    let storage = DiskStorage::open(dir, budget, max_object).expect("open disk cache");
    Box::leak(Box::new(storage))
}

fn key(name: &str) -> CacheKey {
    CacheKey::new(
        format!("7:primary3:GET0:{}:{name}0:", name.len()),
        "primary",
    )
}

fn meta_with(fresh: Duration, extra: Option<(&'static str, String)>) -> CacheMeta {
    let now = SystemTime::now();
    let mut header = ResponseHeader::build(200, None).expect("status");
    header
        .insert_header("content-type", "application/json")
        .expect("header");
    if let Some((name, value)) = extra {
        header.insert_header(name, value).expect("header");
    }
    CacheMeta::new(now + fresh, now, 0, 0, header)
}

fn meta() -> CacheMeta {
    meta_with(Duration::from_secs(300), None)
}

/// Returns `len` bytes that differ from chunk to chunk.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn fill(storage: &'static DiskStorage, key: &CacheKey, body: &[u8], chunk: usize) {
    let mut miss = storage
        .get_miss_handler(key, &meta(), &trace())
        .await
        .expect("miss handler");
    for part in body.chunks(chunk.max(1)) {
        miss.write_body(Bytes::copy_from_slice(part), false)
            .await
            .expect("write body");
    }
    miss.write_body(Bytes::new(), true).await.expect("eof");
    miss.finish().await.expect("finish");
}

async fn lookup(storage: &'static DiskStorage, key: &CacheKey) -> Option<(CacheMeta, HitHandler)> {
    storage.lookup(key, &trace()).await.expect("lookup")
}

/// Reads a body to its end; returns the bytes, the chunk count and the final result.
async fn read_all(hit: &mut HitHandler) -> (Vec<u8>, usize, pingora::Result<()>) {
    let mut body = Vec::new();
    let mut chunks = 0;
    loop {
        match hit.read_body().await {
            Ok(Some(chunk)) => {
                chunks += 1;
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, chunks, Ok(())),
            Err(e) => return (body, chunks, Err(e)),
        }
    }
}

fn entry_path(dir: &Path, key: &CacheKey) -> PathBuf {
    let hex = key.combined();
    dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir.join("tmp"))
        .expect("tmp dir")
        .map(|e| e.expect("entry").path())
        .collect()
}

/// Sums the sizes of the published entry files under `dir`.
fn entry_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for shard in fs::read_dir(dir).expect("dir") {
        let shard = shard.expect("entry").path();
        if !shard.is_dir() || shard.ends_with("tmp") {
            continue;
        }
        for sub in fs::read_dir(&shard).expect("shard") {
            for file in fs::read_dir(sub.expect("sub").path()).expect("sub dir") {
                total += file.expect("file").metadata().expect("stat").len();
            }
        }
    }
    total
}

fn set_mtime(path: &Path, when: SystemTime) {
    let file = OpenOptions::new().write(true).open(path).expect("open");
    file.set_modified(when).expect("set mtime");
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).expect("open");
    file.write_all_at(bytes, at).expect("patch");
}

fn rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

#[tokio::test]
async fn disk_fill_then_hit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), 64 * MIB as u64, 8 * MIB as u64);
    let k = key("/bundle.json");
    assert!(lookup(storage, &k).await.is_none());
    let body = pattern(700 * KIB);
    fill(storage, &k, &body, 100 * KIB).await;
    let (meta, mut hit) = lookup(storage, &k).await.expect("hit");
    let (read, chunks, end) = read_all(&mut hit).await;
    assert!(end.is_ok());
    assert_eq!(read, body);
    assert!(chunks > 1, "body came in {chunks} chunk(s)");
    assert_eq!(meta.response_header().status, 200);
    let stats = storage.stats();
    assert_eq!((stats.entries, stats.hits, stats.misses), (1, 1, 1));
    assert_eq!(stats.bytes, (HEADER + body.len()) as u64);
    assert_eq!(hit.get_eviction_weight(), HEADER + body.len());
}

#[tokio::test]
async fn disk_empty_body_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/empty");
    fill(storage, &k, b"", 1).await;
    let (_, mut hit) = lookup(storage, &k).await.expect("hit");
    let (read, _, end) = read_all(&mut hit).await;
    assert!(end.is_ok());
    assert!(read.is_empty());
}

#[tokio::test]
async fn disk_restart_keeps_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("/index.json");
    let body = pattern(10 * KIB);
    fill(open(dir.path(), MIB as u64, MIB as u64), &k, &body, 4 * KIB).await;
    let reopened = open(dir.path(), MIB as u64, MIB as u64);
    assert_eq!(reopened.scan_report().entries, 1);
    assert_eq!(reopened.stats().bytes, (HEADER + body.len()) as u64);
    let (meta, mut hit) = lookup(reopened, &k).await.expect("hit after restart");
    assert_eq!(read_all(&mut hit).await.0, body);
    assert_eq!(
        meta.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
}

#[tokio::test]
async fn disk_eviction_stays_under_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = HEADER + 8 * KIB;
    let budget = (10 * entry) as u64;
    let storage = open(dir.path(), budget, 8 * KIB as u64);
    for n in 0..30 {
        fill(storage, &key(&format!("/f{n}")), &pattern(8 * KIB), 4 * KIB).await;
        assert!(
            storage.stats().bytes <= budget,
            "over budget after fill {n}"
        );
        assert!(
            entry_bytes(dir.path()) <= budget,
            "disk over budget after fill {n}"
        );
    }
    let stats = storage.stats();
    assert_eq!((stats.entries, stats.evictions), (10, 20));
}

#[tokio::test]
async fn disk_eviction_follows_lru_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = HEADER + KIB;
    let storage = open(dir.path(), (3 * entry) as u64, KIB as u64);
    for name in ["/a", "/b", "/c"] {
        fill(storage, &key(name), &pattern(KIB), KIB).await;
    }
    assert!(lookup(storage, &key("/a")).await.is_some());
    fill(storage, &key("/d"), &pattern(KIB), KIB).await;
    assert!(
        lookup(storage, &key("/b")).await.is_none(),
        "b was least recently used"
    );
    assert!(
        lookup(storage, &key("/a")).await.is_some(),
        "a was read after b"
    );
    assert!(!entry_path(dir.path(), &key("/b")).exists());
}

#[tokio::test]
async fn disk_restart_evicts_oldest_over_smaller_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = HEADER + KIB;
    let storage = open(dir.path(), (3 * entry) as u64, KIB as u64);
    for name in ["/a", "/b", "/c"] {
        fill(storage, &key(name), &pattern(KIB), KIB).await;
    }
    let now = SystemTime::now();
    set_mtime(
        &entry_path(dir.path(), &key("/a")),
        now - Duration::from_secs(60),
    );
    set_mtime(
        &entry_path(dir.path(), &key("/b")),
        now - Duration::from_secs(3600),
    );
    set_mtime(
        &entry_path(dir.path(), &key("/c")),
        now - Duration::from_secs(30),
    );
    let reopened = open(dir.path(), (2 * entry) as u64, KIB as u64);
    assert_eq!(reopened.scan_report().evicted, 1);
    assert_eq!(reopened.stats().bytes, (2 * entry) as u64);
    assert!(
        !entry_path(dir.path(), &key("/b")).exists(),
        "b had the oldest mtime"
    );
}

#[tokio::test]
async fn disk_truncated_file_is_miss_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/t");
    fill(storage, &k, &pattern(20 * KIB), 8 * KIB).await;
    let path = entry_path(dir.path(), &k);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len((HEADER + 5 * KIB) as u64)
        .expect("truncate");
    assert!(lookup(storage, &k).await.is_none());
    assert!(!path.exists());
    assert_eq!(storage.stats().corrupt_entries, 1);
    assert_eq!(storage.stats().entries, 0);
}

#[tokio::test]
async fn disk_truncated_header_is_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("/torn");
    fill(open(dir.path(), MIB as u64, MIB as u64), &k, b"abc", 3).await;
    let path = entry_path(dir.path(), &k);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(50)
        .expect("truncate");
    let reopened = open(dir.path(), MIB as u64, MIB as u64);
    assert_eq!(reopened.scan_report().corrupt_removed, 1);
    assert!(!path.exists());
}

#[tokio::test]
async fn disk_flipped_body_byte_fails_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), 4 * MIB as u64, 4 * MIB as u64);
    let k = key("/flip");
    let body = pattern(600 * KIB);
    fill(storage, &k, &body, 64 * KIB).await;
    let path = entry_path(dir.path(), &k);
    patch(&path, (HEADER + 10) as u64, &[body[10] ^ 0xff]);
    let (_, mut hit) = lookup(storage, &k).await.expect("header still valid");
    let (read, _, end) = read_all(&mut hit).await;
    assert!(end.is_err(), "a corrupt body must end in an error");
    assert!(read.len() < body.len(), "the last chunk must be withheld");
    assert!(!path.exists());
    assert_eq!(storage.stats().corrupt_entries, 1);
}

#[tokio::test]
async fn disk_partial_read_skips_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/range-flip");
    let body = pattern(100 * KIB);
    fill(storage, &k, &body, 64 * KIB).await;
    patch(
        &entry_path(dir.path(), &k),
        HEADER as u64,
        &[body[0] ^ 0xff],
    );
    let (_, mut hit) = lookup(storage, &k).await.expect("hit");
    hit.seek(10, Some(20)).expect("seek");
    let (read, _, end) = read_all(&mut hit).await;
    assert!(end.is_ok());
    assert_eq!(read, &body[10..20]);
}

#[tokio::test]
async fn disk_bad_magic_is_miss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/magic");
    fill(storage, &k, b"body", 4).await;
    patch(&entry_path(dir.path(), &k), 0, b"X");
    assert!(lookup(storage, &k).await.is_none());
    assert!(!entry_path(dir.path(), &k).exists());
}

#[tokio::test]
async fn disk_other_version_is_miss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/version");
    fill(storage, &k, b"body", 4).await;
    patch(&entry_path(dir.path(), &k), 8, &[99]);
    assert!(lookup(storage, &k).await.is_none());
    assert_eq!(storage.stats().corrupt_entries, 1);
}

#[tokio::test]
async fn disk_dropped_fill_leaves_no_temp_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/dropped");
    let mut miss = storage
        .get_miss_handler(&k, &meta(), &trace())
        .await
        .expect("miss handler");
    miss.write_body(Bytes::from(pattern(300 * KIB)), false)
        .await
        .expect("write");
    assert_eq!(temp_files(dir.path()).len(), 1);
    drop(miss);
    assert!(temp_files(dir.path()).is_empty());
    assert!(lookup(storage, &k).await.is_none());
}

#[tokio::test]
async fn disk_orphan_temp_files_cleaned_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    open(dir.path(), MIB as u64, MIB as u64);
    let tmp = dir.path().join("tmp");
    let me = std::process::id();
    for name in [
        "junk".to_string(),
        format!("{me}-1-0.tmp"),
        "999999999-1-0.tmp".into(),
    ] {
        fs::write(tmp.join(name), b"partial").expect("write temp");
    }
    // pid 1 is always running: its recent temp file belongs to a live writer, its old one not.
    fs::write(tmp.join("1-1-0.tmp"), b"live").expect("write temp");
    fs::write(tmp.join("1-2-0.tmp"), b"stalled").expect("write temp");
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    set_mtime(&tmp.join("1-2-0.tmp"), two_hours_ago);
    let reopened = open(dir.path(), MIB as u64, MIB as u64);
    assert_eq!(reopened.scan_report().temp_removed, 4);
    assert_eq!(temp_files(dir.path()), vec![tmp.join("1-1-0.tmp")]);
}

#[tokio::test]
async fn disk_oversize_object_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, KIB as u64);
    let k = key("/big");
    let mut miss = storage
        .get_miss_handler(&k, &meta(), &trace())
        .await
        .expect("miss handler");
    miss.write_body(Bytes::from(pattern(600)), false)
        .await
        .expect("first write fits");
    assert!(miss
        .write_body(Bytes::from(pattern(600)), true)
        .await
        .is_err());
    assert!(temp_files(dir.path()).is_empty());
    assert!(miss.finish().await.is_err());
    assert!(lookup(storage, &k).await.is_none());
    assert_eq!(storage.stats().write_errors, 1);
}

#[tokio::test]
async fn disk_update_meta_in_place_keeps_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/meta");
    let body = pattern(50 * KIB);
    fill(storage, &k, &body, 16 * KIB).await;
    let new = meta_with(Duration::from_secs(900), Some(("etag", "\"v2\"".into())));
    assert!(storage
        .update_meta(&k, &new, &trace())
        .await
        .expect("update"));
    let (meta, mut hit) = lookup(storage, &k).await.expect("hit");
    assert_eq!(
        meta.headers().get("etag").map(|v| v.as_bytes()),
        Some(&b"\"v2\""[..])
    );
    assert_eq!(read_all(&mut hit).await.0, body);
    assert_eq!(storage.stats().bytes, (HEADER + body.len()) as u64);
}

#[tokio::test]
async fn disk_update_meta_grown_header_copies_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/meta-big");
    let body = pattern(50 * KIB);
    fill(storage, &k, &body, 16 * KIB).await;
    // Random-looking text that compression cannot shrink below the reserved room.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: String = (0..12_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let new = meta_with(Duration::from_secs(900), Some(("x-long", noise)));
    assert!(storage
        .update_meta(&k, &new, &trace())
        .await
        .expect("update"));
    let (meta, mut hit) = lookup(storage, &k).await.expect("hit");
    assert!(meta.headers().get("x-long").is_some());
    assert_eq!(read_all(&mut hit).await.0, body);
    assert!(storage.stats().bytes > (HEADER + body.len()) as u64);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn disk_update_meta_absent_is_false() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let updated = storage.update_meta(&key("/none"), &meta(), &trace()).await;
    assert!(!updated.expect("update"));
}

#[tokio::test]
async fn disk_expire_keeps_body_but_stales() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/expire");
    fill(storage, &k, b"payload", 7).await;
    let compact = k.to_compact();
    let outcome = storage
        .expire(PurgeTarget::Active(&compact), &trace())
        .await
        .expect("expire");
    assert_eq!(outcome, PurgeOutcome::Expired);
    let (meta, mut hit) = lookup(storage, &k).await.expect("hit");
    assert!(!meta.is_fresh(SystemTime::now()));
    assert_eq!(read_all(&mut hit).await.0, b"payload");
}

#[tokio::test]
async fn disk_seek_serves_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), 4 * MIB as u64, 2 * MIB as u64);
    let k = key("/range");
    let body = pattern(MIB);
    fill(storage, &k, &body, 64 * KIB).await;
    let (_, mut hit) = lookup(storage, &k).await.expect("hit");
    assert!(hit.can_seek());
    hit.seek(1000, Some(300_000)).expect("seek");
    assert_eq!(read_all(&mut hit).await.0, &body[1000..300_000]);
    hit.seek(MIB - 5, None).expect("seek to tail");
    assert_eq!(read_all(&mut hit).await.0, &body[MIB - 5..]);
    assert!(hit.seek(MIB, None).is_err());
}

#[tokio::test]
async fn disk_purge_removes_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/purge");
    fill(storage, &k, b"x", 1).await;
    let compact = k.to_compact();
    let target = PurgeTarget::Active(&compact);
    let first = storage
        .purge(target, PurgeType::Invalidation, &trace())
        .await;
    assert_eq!(first.expect("purge"), PurgeOutcome::Purged(None));
    let again = storage
        .purge(target, PurgeType::Invalidation, &trace())
        .await;
    assert_eq!(again.expect("purge"), PurgeOutcome::NotFound);
    assert!(!entry_path(dir.path(), &k).exists());
    assert_eq!(storage.stats().bytes, 0);
}

#[tokio::test]
async fn disk_purge_domain_and_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    let other = CacheKey::new("9:community3:GET0:2:/a0:", "community");
    for k in [key("/a/1"), key("/a/2"), key("/b/1"), other.clone()] {
        fill(storage, &k, b"x", 1).await;
    }
    let prefix = storage.purge_prefix("primary", b"7:primary3:GET0:4:/a/");
    assert_eq!(prefix.keys.len(), 2);
    assert!(lookup(storage, &key("/b/1")).await.is_some());
    let domain = storage.purge_domain("primary");
    assert_eq!(domain.keys.len(), 1);
    assert!(lookup(storage, &other).await.is_some());
    assert_eq!(storage.entries().len(), 1);
}

#[tokio::test]
async fn disk_sweep_removes_long_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    fill(storage, &key("/old"), b"x", 1).await;
    let now = SystemTime::now();
    let kept = storage.sweep_expired(now, Duration::from_secs(3600));
    assert!(kept.keys.is_empty());
    let later = now + Duration::from_secs(300 + 7200);
    let swept = storage.sweep_expired(later, Duration::from_secs(3600));
    assert_eq!(swept.keys, vec![key("/old").to_compact()]);
    assert_eq!(storage.stats().expired, 1);
}

#[tokio::test]
async fn disk_second_instance_adopts_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open(dir.path(), MIB as u64, MIB as u64);
    let second = open(dir.path(), MIB as u64, MIB as u64);
    let k = key("/shared");
    fill(first, &k, b"shared body", 4).await;
    let (_, mut hit) = lookup(second, &k)
        .await
        .expect("hit written by the other instance");
    assert_eq!(read_all(&mut hit).await.0, b"shared body");
    assert_eq!(second.stats().entries, 1);
}

#[test]
fn disk_refuses_foreign_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("precious.txt"), b"data").expect("write");
    let err = DiskStorage::open(dir.path(), MIB as u64, KIB as u64).err();
    assert!(matches!(err, Some(DiskError::NotACache(_))), "{err:?}");
    assert!(dir.path().join("precious.txt").exists());
}

#[test]
fn disk_refuses_other_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("FORMAT"),
        b"mirror-gateway disk cache, format 0\n",
    )
    .expect("write");
    let err = DiskStorage::open(dir.path(), MIB as u64, KIB as u64).err();
    assert!(matches!(err, Some(DiskError::Format { .. })), "{err:?}");
}

#[test]
fn disk_rejects_object_limit_over_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = DiskStorage::open(dir.path(), KIB as u64, MIB as u64).err();
    assert!(matches!(err, Some(DiskError::Config(_))), "{err:?}");
}

#[test]
fn disk_creates_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("new/cache");
    DiskStorage::open(&cache, MIB as u64, KIB as u64).expect("open");
    let mode = fs::metadata(&cache).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `dir`; `None` when this process may not mount.
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn disk_full_fails_fill_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(_mount) = Tmpfs::mount(dir.path(), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let cache = dir.path().join("cache");
    let storage = open(&cache, 64 * MIB as u64, 8 * MIB as u64);
    let k = key("/too-big-for-the-disk");
    let mut miss = storage
        .get_miss_handler(&k, &meta(), &trace())
        .await
        .expect("miss handler");
    let chunk = Bytes::from(pattern(64 * KIB));
    let mut failed = false;
    for _ in 0..32 {
        if miss.write_body(chunk.clone(), false).await.is_err() {
            failed = true;
            break;
        }
    }
    let finished = miss.finish().await;
    assert!(failed || finished.is_err(), "2 MiB cannot fit a 1 MiB disk");
    assert!(temp_files(&cache).is_empty());
    assert_eq!(entry_bytes(&cache), 0);
    assert_eq!(storage.stats().write_errors, 1);
    fill(storage, &key("/small"), b"fits", 4).await;
    assert!(lookup(storage, &key("/small")).await.is_some());
}

/// Env var that makes the memory-bound test run its measurement in a fresh child process.
const RSS_CHILD: &str = "MIRROR_DISK_RSS_CHILD";

#[test]
fn disk_streaming_memory_bound() {
    let exe = std::env::current_exe().expect("test binary");
    let output = Command::new(exe)
        .args([
            "disk_streaming_memory_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(RSS_CHILD, "1")
        .output()
        .expect("run child");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    println!("{text}");
    assert!(output.status.success(), "child failed: {text}");
    assert!(text.contains("1 passed"), "child did not run: {text}");
}

/// Streams 64 MiB through the miss and hit handlers; run by `disk_streaming_memory_bound`.
#[tokio::test]
#[ignore = "run in a child process by disk_streaming_memory_bound"]
async fn disk_streaming_memory_child() {
    if std::env::var_os(RSS_CHILD).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), 128 * MIB as u64, 96 * MIB as u64);
    let k = key("/stream");
    let chunk = Bytes::from(pattern(64 * KIB));
    let before = rss_kib();
    let mut miss = storage
        .get_miss_handler(&k, &meta(), &trace())
        .await
        .expect("miss handler");
    for _ in 0..1024 {
        miss.write_body(chunk.clone(), false).await.expect("write");
    }
    miss.finish().await.expect("finish");
    let after_write = rss_kib();
    let (_, mut hit) = lookup(storage, &k).await.expect("hit");
    let mut total = 0;
    while let Some(part) = hit.read_body().await.expect("read") {
        total += part.len();
    }
    let after_read = rss_kib();
    println!("rss KiB: before {before}, after write {after_write}, after read {after_read}");
    assert_eq!(total, 64 * MIB);
    assert!(
        after_write.saturating_sub(before) < 20 * 1024,
        "write grew RSS"
    );
    assert!(
        after_read.saturating_sub(before) < 20 * 1024,
        "read grew RSS"
    );
}

/// Rewrites an entry's meta 300 times while `reader` looks it up 300 times.
async fn rewrite_while_reading(writer: &'static DiskStorage, reader: &'static DiskStorage) {
    let k = key("/busy");
    fill(writer, &k, &pattern(8 * KIB), 8 * KIB).await;
    let reads = tokio::spawn({
        let k = k.clone();
        async move {
            let mut lost = 0;
            for _ in 0..300 {
                if lookup(reader, &k).await.is_none() {
                    lost += 1;
                }
            }
            lost
        }
    });
    for n in 0..300u32 {
        let m = meta_with(Duration::from_secs(60), Some(("etag", format!("\"{n}\""))));
        assert!(writer.update_meta(&k, &m, &trace()).await.expect("update"));
    }
    assert_eq!(reads.await.expect("reader"), 0, "hits lost during rewrites");
    assert_eq!(reader.stats().corrupt_entries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_header_rewrite_survives_concurrent_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path(), MIB as u64, MIB as u64);
    rewrite_while_reading(storage, storage).await;
}

/// Two instances on one directory stand in for two processes: no shared locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_header_rewrite_by_other_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), MIB as u64, MIB as u64);
    let reader = open(dir.path(), MIB as u64, MIB as u64);
    rewrite_while_reading(writer, reader).await;
}
