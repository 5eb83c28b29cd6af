//! Resolves which export of a product's export tree is served right now.
//!
//! A tree contains one directory per export, named by a UTC timestamp (`20260101T120000Z`), and an
//! optional `latest` symlink naming one of them. The active export is, in order: the pinned
//! export id, the target of `latest`, the newest export directory.
//!
//! On a local filesystem a [`RootWatch`] reports when an entry of the root changed, and until
//! then the last resolution is reused. Elsewhere, or when no watch can start, the root is read
//! on every call.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::root_watch::{RootWatch, Seen, WatchError};

/// Name of the symlink that points at the export to serve.
pub const LATEST_LINK: &str = "latest";

/// Maximum length of an export id, in bytes.
pub const MAX_EXPORT_ID_LEN: usize = 128;

/// How long a listing of the root, made when neither a pin nor `latest` exists, is reused.
const NEWEST_CACHE_TTL: Duration = Duration::from_secs(1);

/// Resolves the active export of one product's export tree.
///
/// The root is canonicalized once, in [`ExportTree::new`]; every directory handed out lies
/// directly under that canonical root.
#[derive(Debug)]
pub struct ExportTree {
    root: PathBuf,
    configured_root: PathBuf,
    pinned: Option<String>,
    newest: Mutex<Option<NewestListing>>,
    warned: AtomicBool,
    last_warning: Mutex<String>,
    /// The watch on the root and the resolution it keeps valid, started by the first
    /// resolution, so that a tree that is never asked gets none. `None` inside when the root
    /// gets no watch.
    watched: OnceLock<Option<Mutex<Watched>>>,
    /// Set when the root gets no watch, or its watch ended and no new one could start: every
    /// call then reads the root, without taking the watch's lock.
    unwatched: AtomicBool,
    /// How many times the active export was resolved by reading the root.
    reads: AtomicU64,
}

/// A watch on the root and the last successful resolution, reused while the watch reports
/// no change.
#[derive(Debug)]
struct Watched {
    /// `None` once a watch ended and no new one could be started.
    watch: Option<RootWatch>,
    last: Option<ActiveExport>,
}

/// The export to serve: its id and its canonical directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveExport {
    /// The export id, the directory's name under the root.
    pub id: String,
    /// The canonical path of the export directory.
    pub dir: PathBuf,
}

/// Says why the export tree or its active export cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportTreeError {
    /// An export id does not have the allowed form.
    #[error(
        "export id {id:?} is invalid: {reason}; use 1 to {MAX_EXPORT_ID_LEN} characters from \
         A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    InvalidId { id: String, reason: &'static str },
    /// The root is missing, not a directory or unreadable.
    #[error("export root {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    /// The pinned export is not a directory directly under the root.
    #[error("pinned export {}: {reason}", path.display())]
    Pinned { path: PathBuf, reason: String },
    /// The `latest` link exists but does not name an export directory under the root.
    #[error("link {}: {reason}", path.display())]
    Latest { path: PathBuf, reason: String },
    /// There is no pin, no `latest` link and no export directory.
    #[error(
        "export root {} contains no export directory (named like 20260101T120000Z) and no \
         `latest` link; run the sync task or pin an export",
        path.display()
    )]
    NoExport { path: PathBuf },
}

impl ExportTree {
    /// Opens the tree at `root`, serving `pinned` when it is set.
    ///
    /// Checks the pinned id's form and that `root` is a directory. Whether the pinned export
    /// exists is checked by [`ExportTree::active_export`], on every call.
    pub fn new(root: impl Into<PathBuf>, pinned: Option<String>) -> Result<Self, ExportTreeError> {
        let given = root.into();
        if let Some(id) = &pinned {
            validate_export_id(id).map_err(|reason| ExportTreeError::InvalidId {
                id: id.clone(),
                reason,
            })?;
        }
        let root_err = |reason: String| ExportTreeError::Root {
            path: given.clone(),
            reason,
        };
        let meta = fs::metadata(&given).map_err(|e| root_err(format!("stat failed: {e}")))?;
        if !meta.is_dir() {
            return Err(root_err("is not a directory".to_string()));
        }
        let root = fs::canonicalize(&given)
            .map_err(|e| root_err(format!("resolving the path failed: {e}")))?;
        let configured_root = std::path::absolute(&given).unwrap_or_else(|_| root.clone());
        Ok(Self {
            root,
            configured_root,
            pinned,
            newest: Mutex::new(None),
            warned: AtomicBool::new(false),
            last_warning: Mutex::new(String::new()),
            watched: OnceLock::new(),
            unwatched: AtomicBool::new(false),
            reads: AtomicU64::new(0),
        })
    }

    /// Opens the tree as [`ExportTree::new`] does, without a watch: every call reads the root.
    #[cfg(test)]
    fn unwatched(root: &Path, pinned: Option<String>) -> Result<Self, ExportTreeError> {
        let tree = Self::new(root, pinned)?;
        tree.unwatched.store(true, Ordering::Relaxed);
        Ok(tree)
    }

    /// Returns whether a watch on the root is in use, so that resolutions are reused. Starts
    /// the watch if no resolution has yet.
    pub fn is_watched(&self) -> bool {
        !self.unwatched.load(Ordering::Relaxed) && self.watched().is_some()
    }

    /// Returns the watch, starting it on the first call.
    fn watched(&self) -> Option<&Mutex<Watched>> {
        let start = || match RootWatch::new(&self.root) {
            Ok(watch) => Some(Mutex::new(Watched {
                watch: Some(watch),
                last: None,
            })),
            Err(e @ WatchError::NotLocal(_)) => {
                info!(root = %self.root.display(), reason = %e, "not watching the export root; reading it on every request");
                None
            }
            Err(e) => {
                warn!(root = %self.root.display(), error = %e, "cannot watch the export root; reading it on every request");
                None
            }
        };
        self.watched.get_or_init(start).as_ref()
    }

    /// Returns how many times the active export was resolved by reading the root.
    pub fn root_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Returns the canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the pinned export id, if any.
    pub fn pinned(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    /// Resolves the export to serve now.
    ///
    /// With a watch on the root, costs one non-blocking `read` while no entry of the root
    /// changed. Reading the root costs one `readlink` and one `lstat` when `latest` exists,
    /// one `lstat` with a pin. An error is logged at warn level once until the resolution
    /// changes or succeeds again, and is never reused: the next call reads the root again.
    pub fn active_export(&self) -> Result<ActiveExport, ExportTreeError> {
        self.active_export_at(Instant::now())
    }

    /// Resolves the export to serve, as [`ExportTree::active_export`], with `now` as the clock
    /// that ages the cached listing of the root (used only without pin and `latest`).
    pub fn active_export_at(&self, now: Instant) -> Result<ActiveExport, ExportTreeError> {
        if self.unwatched.load(Ordering::Relaxed) {
            return self.read_root(now, true);
        }
        let Some(watched) = self.watched() else {
            self.unwatched.store(true, Ordering::Relaxed);
            return self.read_root(now, true);
        };
        // The lock is held while the root is read, so that no call reuses a resolution
        // that a change seen by another call has made stale.
        let mut watched = watched.lock();
        let Some(watch) = watched.watch.as_mut() else {
            return self.read_root(now, true);
        };
        match watch.look() {
            Seen::Nothing => {
                if let Some(active) = &watched.last {
                    return Ok(active.clone());
                }
            }
            Seen::Changed => watched.last = None,
            Seen::Ended => {
                watched.last = None;
                // A new watch on what the path names now, started before the root is read.
                match RootWatch::new(&self.root) {
                    Ok(fresh) => {
                        info!(root = %self.root.display(), "the export root's path changed or its watch lost events; watching it again");
                        watched.watch = Some(fresh);
                    }
                    Err(e) => {
                        warn!(root = %self.root.display(), error = %e, "cannot watch the export root again; reading it on every request until a reload");
                        watched.watch = None;
                        self.unwatched.store(true, Ordering::Relaxed);
                        return self.read_root(now, false);
                    }
                }
            }
        }
        // The watch saw the change, so a listing of the root kept from before it is stale.
        let result = self.read_root(now, false);
        watched.last = result.as_ref().ok().cloned();
        result
    }

    /// Resolves the active export from the root as it is on disk. Without pin and `latest`,
    /// `reuse_listing` lets a listing of the root younger than [`NEWEST_CACHE_TTL`] serve.
    fn read_root(
        &self,
        now: Instant,
        reuse_listing: bool,
    ) -> Result<ActiveExport, ExportTreeError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let result = match &self.pinned {
            Some(id) => self.pinned_export(id),
            None => match self.read_latest()? {
                Some(target) => self.latest_export(&target),
                None => self.newest_export(now, reuse_listing),
            },
        };
        self.note_outcome(&result);
        result
    }

    fn pinned_export(&self, id: &str) -> Result<ActiveExport, ExportTreeError> {
        let dir = self.root.join(id);
        let pinned_err = |reason: String| ExportTreeError::Pinned {
            path: dir.clone(),
            reason,
        };
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(ActiveExport {
                id: id.to_string(),
                dir,
            }),
            Ok(meta) if meta.is_symlink() => Err(pinned_err(
                "is a symlink; pin the export directory itself".to_string(),
            )),
            Ok(_) => Err(pinned_err("is not a directory".to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(pinned_err(
                "does not exist; pin an export present under the root".to_string(),
            )),
            Err(e) => Err(pinned_err(format!("stat failed: {e}"))),
        }
    }

    /// Reads the `latest` link, or returns `None` when there is no such entry.
    fn read_latest(&self) -> Result<Option<PathBuf>, ExportTreeError> {
        let link = self.root.join(LATEST_LINK);
        match fs::read_link(&link) {
            Ok(target) => Ok(Some(target)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(ExportTreeError::Latest {
                path: link,
                reason: "is not a symlink; make it a symlink to an export directory or remove it"
                    .to_string(),
            }),
            Err(e) => Err(ExportTreeError::Latest {
                path: link,
                reason: format!("readlink failed: {e}"),
            }),
        }
    }

    fn latest_export(&self, target: &Path) -> Result<ActiveExport, ExportTreeError> {
        let latest_err = |reason: String| ExportTreeError::Latest {
            path: self.root.join(LATEST_LINK),
            reason,
        };
        let Some(id) = self.target_name(target) else {
            return Err(latest_err(format!(
                "points to {}, which is not a directory directly under the export root; \
                 point it at an export directory under the root",
                target.display()
            )));
        };
        validate_export_id(id).map_err(|reason| {
            latest_err(format!("points to {id:?}, not an export id: {reason}"))
        })?;
        let dir = self.root.join(id);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(ActiveExport {
                id: id.to_string(),
                dir,
            }),
            Ok(meta) if meta.is_symlink() => Err(latest_err(format!(
                "points to {}, which is itself a symlink",
                dir.display()
            ))),
            Ok(_) => Err(latest_err(format!(
                "points to {}, which is not a directory",
                dir.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(latest_err(format!(
                "is dangling: {} does not exist; point it at an existing export directory",
                dir.display()
            ))),
            Err(e) => Err(latest_err(format!("stat of {} failed: {e}", dir.display()))),
        }
    }

    /// Returns the name a link target gives to an entry directly under the root, if it does.
    fn target_name<'a>(&self, target: &'a Path) -> Option<&'a str> {
        if target.is_absolute() {
            let parent = target.parent()?;
            if parent != self.root && parent != self.configured_root {
                return None;
            }
            return target.file_name()?.to_str();
        }
        let mut parts = target.components().filter(|c| *c != Component::CurDir);
        match (parts.next(), parts.next()) {
            (Some(Component::Normal(name)), None) => name.to_str(),
            _ => None,
        }
    }

    fn newest_export(
        &self,
        now: Instant,
        reuse_listing: bool,
    ) -> Result<ActiveExport, ExportTreeError> {
        let mtime = fs::metadata(&self.root)
            .and_then(|m| m.modified())
            .map_err(|e| ExportTreeError::Root {
                path: self.root.clone(),
                reason: format!("stat failed: {e}"),
            })?;
        let mut cache = self.newest.lock();
        if let Some(listing) = cache.as_ref().filter(|_| reuse_listing) {
            let age = now.saturating_duration_since(listing.listed_at);
            if listing.root_mtime == mtime && age < NEWEST_CACHE_TTL {
                return Ok(listing.active.clone());
            }
        }
        let result = self.list_newest();
        // A failed listing is not kept: the next call lists again.
        *cache = result.as_ref().ok().map(|active| NewestListing {
            root_mtime: mtime,
            listed_at: now,
            active: active.clone(),
        });
        result
    }

    fn list_newest(&self) -> Result<ActiveExport, ExportTreeError> {
        let list_err = |e: io::Error| ExportTreeError::Root {
            path: self.root.clone(),
            reason: format!("listing failed: {e}"),
        };
        let mut newest: Option<String> = None;
        for entry in fs::read_dir(&self.root).map_err(list_err)? {
            let entry = entry.map_err(list_err)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !is_timestamp_id(&name) || newest.as_ref().is_some_and(|n| *n >= name) {
                continue;
            }
            if entry.file_type().map_err(list_err)?.is_dir() {
                newest = Some(name);
            }
        }
        let id = newest.ok_or_else(|| ExportTreeError::NoExport {
            path: self.root.clone(),
        })?;
        debug!(root = %self.root.display(), export = %id, "no pin and no latest link; serving the newest export");
        Ok(ActiveExport {
            dir: self.root.join(&id),
            id,
        })
    }

    /// Logs a failed resolution once per distinct message, and the recovery after one.
    fn note_outcome(&self, result: &Result<ActiveExport, ExportTreeError>) {
        match result {
            Ok(active) => {
                if self.warned.swap(false, Ordering::Relaxed) {
                    self.last_warning.lock().clear();
                    info!(root = %self.root.display(), export = %active.id, "active export resolves again");
                }
            }
            Err(e) => {
                let message = e.to_string();
                let mut last = self.last_warning.lock();
                if *last != message {
                    warn!(root = %self.root.display(), error = %message, "failed to resolve the active export");
                    *last = message;
                }
                self.warned.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Checks that `id` can name an export directory and travel in a URL path unescaped.
///
/// Allowed: 1 to [`MAX_EXPORT_ID_LEN`] bytes of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// (which rules out `.`, `..` and hidden or temporary names such as `.tmp-*`).
pub fn validate_export_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("it is empty");
    }
    if id.len() > MAX_EXPORT_ID_LEN {
        return Err("it is too long");
    }
    if id.starts_with('.') {
        return Err("it starts with '.'");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !id.bytes().all(allowed) {
        return Err("it contains a character outside A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

/// Tells whether `name` is a timestamp export id, `YYYYMMDDTHHMMSSZ` in UTC.
///
/// Checks the shape and the field ranges (month 01-12, day 01-31, hour 00-23, minute 00-59,
/// second 00-60), not the calendar (`20260231T...` passes).
pub fn is_timestamp_id(name: &str) -> bool {
    let b = name.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    if !digits(0..8) || !digits(9..15) {
        return false;
    }
    let field = |at: usize| u32::from(b[at] - b'0') * 10 + u32::from(b[at + 1] - b'0');
    (1..=12).contains(&field(4))
        && (1..=31).contains(&field(6))
        && field(9) < 24
        && field(11) < 60
        && field(13) <= 60
}

/// The last successful listing of the root, valid while the root's mtime is unchanged.
#[derive(Debug)]
struct NewestListing {
    root_mtime: SystemTime,
    listed_at: Instant,
    active: ActiveExport,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const OLD: &str = "20260101T120000Z";
    const NEW: &str = "20260102T120000Z";

    /// Builds a root with two exports, each holding `mirror/index.json`.
    fn two_exports() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        for id in [OLD, NEW] {
            let mirror = tmp.path().join(id).join("mirror");
            fs::create_dir_all(&mirror).expect("mkdir");
            fs::write(mirror.join("index.json"), id).expect("write");
        }
        tmp
    }

    fn active(tree: &ExportTree) -> Result<String, ExportTreeError> {
        tree.active_export().map(|a| a.id)
    }

    /// Sets the root's mtime back to `mtime`, as if nothing had changed in it.
    fn set_mtime(dir: &Path, mtime: SystemTime) {
        let handle = fs::File::open(dir).expect("open dir");
        handle.set_modified(mtime).expect("set mtime");
    }

    #[test]
    fn pin_wins_over_latest() {
        let tmp = two_exports();
        symlink(NEW, tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), Some(OLD.to_string())).expect("tree");
        assert_eq!(active(&tree), Ok(OLD.to_string()));
    }

    #[test]
    fn pin_dir_is_canonical() {
        let tmp = two_exports();
        let tree = ExportTree::new(tmp.path(), Some(OLD.to_string())).expect("tree");
        let canonical = fs::canonicalize(tmp.path().join(OLD)).expect("canonicalize");
        assert_eq!(tree.active_export().map(|a| a.dir), Ok(canonical));
    }

    #[test]
    fn pin_missing_is_error() {
        let tmp = two_exports();
        let tree = ExportTree::new(tmp.path(), Some("20250101T000000Z".to_string())).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Pinned { .. })));
    }

    #[test]
    fn pin_symlink_is_error() {
        let tmp = two_exports();
        symlink(OLD, tmp.path().join("rollback")).expect("symlink");
        let tree = ExportTree::new(tmp.path(), Some("rollback".to_string())).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Pinned { .. })));
    }

    #[test]
    fn pin_bad_form_is_rejected() {
        let tmp = two_exports();
        for bad in ["", ".", "..", "a/b", ".tmp-1", "a b", "é"] {
            let result = ExportTree::new(tmp.path(), Some(bad.to_string()));
            assert!(
                matches!(result, Err(ExportTreeError::InvalidId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn root_missing_is_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let result = ExportTree::new(tmp.path().join("absent"), None);
        assert!(matches!(result, Err(ExportTreeError::Root { .. })));
    }

    #[test]
    fn root_file_is_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("file"), "x").expect("write");
        let result = ExportTree::new(tmp.path().join("file"), None);
        assert!(matches!(result, Err(ExportTreeError::Root { .. })));
    }

    #[test]
    fn latest_relative() {
        let tmp = two_exports();
        symlink(OLD, tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert_eq!(active(&tree), Ok(OLD.to_string()));
    }

    #[test]
    fn latest_dot_slash() {
        let tmp = two_exports();
        symlink(format!("./{OLD}/"), tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert_eq!(active(&tree), Ok(OLD.to_string()));
    }

    #[test]
    fn latest_absolute_inside() {
        let tmp = two_exports();
        symlink(tmp.path().join(OLD), tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert_eq!(active(&tree), Ok(OLD.to_string()));
    }

    #[test]
    fn latest_switch_is_seen_at_once() {
        let tmp = two_exports();
        let link = tmp.path().join(LATEST_LINK);
        symlink(OLD, &link).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        let before = active(&tree);
        fs::remove_file(&link).expect("unlink");
        symlink(NEW, &link).expect("symlink");
        assert_eq!((before, active(&tree)), (Ok(OLD.into()), Ok(NEW.into())));
    }

    #[test]
    fn latest_dangling_is_error() {
        let tmp = two_exports();
        symlink("20300101T000000Z", tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Latest { .. })));
    }

    #[test]
    fn latest_parent_dir_is_error() {
        let tmp = two_exports();
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().join(OLD);
        fs::create_dir(&target).expect("mkdir");
        let relative = format!(
            "../{}/{OLD}",
            outside
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
        );
        symlink(relative, tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Latest { .. })));
    }

    #[test]
    fn latest_absolute_outside_is_error() {
        let tmp = two_exports();
        let outside = tempfile::tempdir().expect("tempdir");
        fs::create_dir(outside.path().join(OLD)).expect("mkdir");
        symlink(outside.path().join(OLD), tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Latest { .. })));
    }

    #[test]
    fn latest_to_file_is_error() {
        let tmp = two_exports();
        fs::write(tmp.path().join("notes"), "x").expect("write");
        symlink("notes", tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Latest { .. })));
    }

    #[test]
    fn latest_plain_dir_is_error() {
        let tmp = two_exports();
        fs::create_dir(tmp.path().join(LATEST_LINK)).expect("mkdir");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(active(&tree), Err(ExportTreeError::Latest { .. })));
    }

    #[test]
    fn newest_fallback() {
        let tmp = two_exports();
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert_eq!(active(&tree), Ok(NEW.to_string()));
    }

    #[test]
    fn newest_skips_non_exports() {
        let tmp = two_exports();
        for name in [".tmp-20990101T000000Z", "20990101T000000Z.partial", "zzz"] {
            fs::create_dir(tmp.path().join(name)).expect("mkdir");
        }
        fs::write(tmp.path().join("20990101T000000Z"), "a file").expect("write");
        symlink(OLD, tmp.path().join("20980101T000000Z")).expect("symlink");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert_eq!(active(&tree), Ok(NEW.to_string()));
    }

    #[test]
    fn newest_none_is_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = ExportTree::new(tmp.path(), None).expect("tree");
        assert!(matches!(
            active(&tree),
            Err(ExportTreeError::NoExport { .. })
        ));
    }

    #[test]
    fn newest_listing_cached_within_ttl() {
        let tmp = two_exports();
        let tree = ExportTree::unwatched(tmp.path(), None).expect("tree");
        let start = Instant::now();
        let mtime = fs::metadata(tmp.path())
            .and_then(|m| m.modified())
            .expect("mtime");
        tree.active_export_at(start).expect("first");
        fs::create_dir(tmp.path().join("20260103T120000Z")).expect("mkdir");
        set_mtime(tmp.path(), mtime);
        let id = tree
            .active_export_at(start + Duration::from_millis(500))
            .map(|a| a.id);
        assert_eq!(id, Ok(NEW.to_string()));
    }

    #[test]
    fn newest_listing_expires() {
        let tmp = two_exports();
        let tree = ExportTree::unwatched(tmp.path(), None).expect("tree");
        let start = Instant::now();
        let mtime = fs::metadata(tmp.path())
            .and_then(|m| m.modified())
            .expect("mtime");
        tree.active_export_at(start).expect("first");
        fs::create_dir(tmp.path().join("20260103T120000Z")).expect("mkdir");
        set_mtime(tmp.path(), mtime);
        let id = tree
            .active_export_at(start + Duration::from_secs(2))
            .map(|a| a.id);
        assert_eq!(id, Ok("20260103T120000Z".to_string()));
    }

    #[test]
    fn newest_listing_follows_mtime() {
        let tmp = two_exports();
        let tree = ExportTree::unwatched(tmp.path(), None).expect("tree");
        let start = Instant::now();
        let mtime = fs::metadata(tmp.path())
            .and_then(|m| m.modified())
            .expect("mtime");
        tree.active_export_at(start).expect("first");
        fs::create_dir(tmp.path().join("20260103T120000Z")).expect("mkdir");
        set_mtime(tmp.path(), mtime + Duration::from_secs(1));
        let id = tree.active_export_at(start).map(|a| a.id);
        assert_eq!(id, Ok("20260103T120000Z".to_string()));
    }

    /// Opens a tree with a watch, or returns `None` (and prints why) where the temp directory's
    /// filesystem gets none.
    fn watched_tree(root: &Path, pinned: Option<String>) -> Option<ExportTree> {
        if RootWatch::local_filesystem(root).ok().flatten().is_none() {
            eprintln!("skipped: the temp directory is on a filesystem without watches");
            return None;
        }
        let tree = ExportTree::new(root, pinned).expect("tree");
        assert!(tree.is_watched(), "a tree on a local filesystem is watched");
        Some(tree)
    }

    #[test]
    fn watched_reuse_until_switch() {
        let tmp = two_exports();
        let link = tmp.path().join(LATEST_LINK);
        symlink(OLD, &link).expect("symlink");
        let Some(tree) = watched_tree(tmp.path(), None) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));
        assert_eq!(active(&tree), Ok(OLD.into()));
        // A file written inside an export does not change which export is active.
        fs::write(tmp.path().join(OLD).join("mirror").join("extra.json"), "{}").expect("write");
        assert_eq!(active(&tree), Ok(OLD.into()));
        assert_eq!(tree.root_reads(), 1);

        // The sync task's publish: a new link under a temporary name, renamed over `latest`.
        symlink(NEW, tmp.path().join(".latest.tmp")).expect("symlink");
        fs::rename(tmp.path().join(".latest.tmp"), &link).expect("rename");
        assert_eq!(active(&tree), Ok(NEW.into()));
        assert_eq!(active(&tree), Ok(NEW.into()));
        assert_eq!(tree.root_reads(), 2);
    }

    #[test]
    fn watched_removed_pin_reread() {
        let tmp = two_exports();
        let Some(tree) = watched_tree(tmp.path(), Some(OLD.to_string())) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));
        fs::remove_dir_all(tmp.path().join(OLD)).expect("rm");
        assert!(matches!(active(&tree), Err(ExportTreeError::Pinned { .. })));
        assert!(matches!(active(&tree), Err(ExportTreeError::Pinned { .. })));
        assert_eq!(tree.root_reads(), 3, "an error is read again on every call");
        fs::create_dir(tmp.path().join(OLD)).expect("mkdir");
        assert_eq!(active(&tree), Ok(OLD.into()));
    }

    /// Moves `latest` in `root` to `id` the way the sync task publishes.
    fn publish(root: &Path, id: &str) {
        let temporary = root.join(".latest.tmp");
        symlink(id, &temporary).expect("symlink");
        fs::rename(&temporary, root.join(LATEST_LINK)).expect("rename");
    }

    #[test]
    fn watched_root_replaced_rewatched() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("concelier");
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        symlink(OLD, root.join(LATEST_LINK)).expect("symlink");
        let Some(tree) = watched_tree(&root, None) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));

        // The root is moved away and a new one takes its path: the watch followed the old
        // directory, so a new watch starts on the new one.
        fs::rename(&root, parent.path().join("old-root")).expect("rename");
        fs::create_dir_all(root.join(NEW)).expect("mkdir");
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        symlink(NEW, root.join(LATEST_LINK)).expect("symlink");
        assert_eq!(active(&tree), Ok(NEW.into()));
        assert!(tree.is_watched());
        let reads = tree.root_reads();
        assert_eq!(active(&tree), Ok(NEW.into()));
        assert_eq!(
            tree.root_reads(),
            reads,
            "the new watch keeps the resolution"
        );

        publish(&root, OLD);
        assert_eq!(active(&tree), Ok(OLD.into()));
    }

    #[test]
    fn watched_root_removed_unwatched() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("concelier");
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        let Some(tree) = watched_tree(&root, Some(OLD.to_string())) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));
        fs::remove_dir_all(&root).expect("rm");
        assert!(matches!(active(&tree), Err(ExportTreeError::Pinned { .. })));
        assert!(!tree.is_watched(), "nothing is left to watch");

        // Reading the path on every request finds the root when it comes back.
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        assert_eq!(active(&tree), Ok(OLD.into()));
    }

    #[test]
    fn watched_parent_swap_followed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("mirror").join("concelier");
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        symlink(OLD, root.join(LATEST_LINK)).expect("symlink");
        let Some(tree) = watched_tree(&root, None) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));

        // A blue/green swap of the directory above the root.
        let next = parent.path().join("mirror.new").join("concelier");
        fs::create_dir_all(next.join(NEW)).expect("mkdir");
        fs::create_dir_all(next.join(OLD)).expect("mkdir");
        symlink(NEW, next.join(LATEST_LINK)).expect("symlink");
        fs::rename(
            parent.path().join("mirror"),
            parent.path().join("mirror.old"),
        )
        .expect("mv");
        fs::rename(
            parent.path().join("mirror.new"),
            parent.path().join("mirror"),
        )
        .expect("mv");
        assert_eq!(active(&tree), Ok(NEW.into()));
        assert!(tree.is_watched());

        // Publishing in the swapped-in tree is seen at once.
        publish(&root, OLD);
        assert_eq!(active(&tree), Ok(OLD.into()));
    }

    #[test]
    fn watched_overflow_rewatched() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("concelier");
        fs::create_dir_all(root.join(OLD)).expect("mkdir");
        fs::create_dir_all(root.join(NEW)).expect("mkdir");
        symlink(OLD, root.join(LATEST_LINK)).expect("symlink");
        let Some(tree) = watched_tree(&root, None) else {
            return;
        };
        assert_eq!(active(&tree), Ok(OLD.into()));

        // Unrelated entries come and go beside the root until the event queue overflows
        // (16,384 events by default).
        let limit = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(16_384);
        let other = parent.path().join("other");
        for _ in 0..limit.min(100_000) / 2 + 1 {
            fs::create_dir(&other).expect("mkdir");
            fs::remove_dir(&other).expect("rmdir");
        }
        assert_eq!(active(&tree), Ok(OLD.into()));
        assert!(
            tree.is_watched(),
            "a new watch replaced the one that lost events"
        );
        publish(&root, NEW);
        assert_eq!(active(&tree), Ok(NEW.into()));
    }

    #[test]
    fn failed_listing_not_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = ExportTree::unwatched(tmp.path(), None).expect("tree");
        let start = Instant::now();
        let mtime = fs::metadata(tmp.path())
            .and_then(|m| m.modified())
            .expect("mtime");
        let first = tree.active_export_at(start);
        assert!(matches!(first, Err(ExportTreeError::NoExport { .. })));
        fs::create_dir(tmp.path().join(OLD)).expect("mkdir");
        set_mtime(tmp.path(), mtime);
        let id = tree
            .active_export_at(start + Duration::from_millis(100))
            .map(|a| a.id);
        assert_eq!(id, Ok(OLD.to_string()));
    }

    #[test]
    fn watched_newest_ignores_old_listing() {
        let tmp = two_exports();
        let Some(tree) = watched_tree(tmp.path(), None) else {
            return;
        };
        let start = Instant::now();
        let mtime = fs::metadata(tmp.path())
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(tree.active_export_at(start).map(|a| a.id), Ok(NEW.into()));
        // A newer export whose creation left the root's mtime as it was (coarse timestamps).
        fs::create_dir(tmp.path().join("20260103T120000Z")).expect("mkdir");
        set_mtime(tmp.path(), mtime);
        let id = tree
            .active_export_at(start + Duration::from_millis(100))
            .map(|a| a.id);
        assert_eq!(id, Ok("20260103T120000Z".to_string()));
    }

    #[test]
    fn unwatched_reads_every_call() {
        let tmp = two_exports();
        symlink(OLD, tmp.path().join(LATEST_LINK)).expect("symlink");
        let tree = ExportTree::unwatched(tmp.path(), None).expect("tree");
        assert!(!tree.is_watched());
        for _ in 0..3 {
            assert_eq!(active(&tree), Ok(OLD.into()));
        }
        assert_eq!(tree.root_reads(), 3);
    }

    #[test]
    fn timestamp_id_shapes() {
        let cases = [
            ("20260101T120000Z", true),
            ("20261301T120000Z", false),
            ("20260100T120000Z", false),
            ("20260101T240000Z", false),
            ("20260101T120000", false),
            ("2026010xT120000Z", false),
            ("20260101t120000Z", false),
        ];
        for (name, expected) in cases {
            assert_eq!(is_timestamp_id(name), expected, "{name}");
        }
    }
}
