//! File-system helpers of the disk tier: paths, header reads, guarded deletes, throttled logs.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pingora::cache::key::HashBinary;
use pingora::{Error, ErrorType};

use super::format::{FormatError, Header, FIRST_READ};

/// Failure to use an entry file.
#[derive(Debug)]
pub enum ReadFailure {
    /// The file system failed; the file may be fine.
    Io(io::Error),
    /// The file is torn, truncated or not ours: delete it.
    Corrupt(String),
}

impl From<io::Error> for ReadFailure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Corrupt("file shorter than its header".into())
        } else {
            Self::Io(e)
        }
    }
}

/// Returns `<root>/ab/cd/<32 hex digits>` for a combined key hash.
pub fn entry_path(root: &Path, name: &HashBinary) -> PathBuf {
    let hex = hex_name(name);
    root.join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

/// Returns the lowercase hex form of a key hash.
pub fn hex_name(name: &HashBinary) -> String {
    name.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a file name written by [`hex_name`]; anything else returns `None`.
pub fn parse_name(name: &str) -> Option<HashBinary> {
    let parsed = pingora::cache::key::str2hex(name)?;
    (hex_name(&parsed) == name).then_some(parsed)
}

/// Creates a directory (and missing parents) readable by the owner only.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Creates a new file readable by the owner only; fails if it exists.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Creates a new temp file like [`create_private_file`] in the temp directory, a direct
/// subdirectory of the cache directory. When the temp directory is missing, because an
/// operator deleted the cache directory or its contents to empty it while the gateway runs,
/// it first creates both again with [`restore_root`].
pub fn create_temp_file(path: &Path) -> io::Result<File> {
    match create_private_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("."));
            restore_root(dir.parent().unwrap_or(Path::new(".")))?;
            create_one_dir(dir)?;
            tracing::warn!(dir = %dir.display(), "disk cache: created the missing temp directory again");
            create_private_file(path)
        }
        other => other,
    }
}

/// Creates `dir`, a directory below the cache directory `root`, and the directories between
/// them. When `root` itself is missing, it first creates it again with [`restore_root`],
/// instead of a bare directory that the next start would reject for its missing format file.
pub fn create_dir_below(root: &Path, dir: &Path) -> io::Result<()> {
    let relative = dir.strip_prefix(root).map_err(|_| {
        io::Error::other(format!("{} is not below {}", dir.display(), root.display()))
    })?;
    match create_each(root, relative) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            restore_root(root)?;
            create_each(root, relative)
        }
        other => other,
    }
}

/// Creates each component of `relative` below `root` in turn, without creating `root`.
fn create_each(root: &Path, relative: &Path) -> io::Result<()> {
    let mut path = root.to_path_buf();
    for part in relative.components() {
        path.push(part);
        create_one_dir(&path)?;
    }
    Ok(())
}

/// Creates one directory readable by the owner only; an existing one is fine.
fn create_one_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Creates the cache directory `root` again (its parent must exist) and writes its format
/// file, so that a restart accepts the directory that the running tier filled again.
pub fn restore_root(root: &Path) -> io::Result<()> {
    create_one_dir(root)?;
    super::scan::restore_format(root)
}

/// Returns a temp file name that no other writer (in this or another process) uses.
pub fn temp_name(seq: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{seq}-{nanos:08x}.tmp", std::process::id())
}

/// Returns the process id a [`temp_name`] was made by.
pub fn temp_owner(name: &str) -> Option<u32> {
    name.strip_suffix(".tmp")?.split('-').next()?.parse().ok()
}

/// Reads and checks the header of an open entry file of `file_len` bytes.
pub fn read_header(file: &File, file_len: u64) -> Result<Header, ReadFailure> {
    let first = file_len.min(FIRST_READ as u64) as usize;
    let mut buf = vec![0; first];
    file.read_exact_at(&mut buf, 0)?;
    let header = match Header::decode(&buf) {
        Err(FormatError::Short(need)) if need > buf.len() && need as u64 <= file_len => {
            buf.resize(need, 0);
            file.read_exact_at(&mut buf, 0)?;
            Header::decode(&buf)
        }
        other => other,
    }
    .map_err(|e| ReadFailure::Corrupt(e.to_string()))?;
    if header.file_len() != file_len {
        return Err(ReadFailure::Corrupt(format!(
            "file is {file_len} bytes, its header says {}",
            header.file_len()
        )));
    }
    Ok(header)
}

/// Deletes `path` if it is still the file with inode `ino`; returns whether it did.
///
/// Another process sharing the directory may have replaced the file since it was opened;
/// the replacement is kept.
pub fn remove_if_same(path: &Path, ino: u64) -> io::Result<bool> {
    #[cfg(test)]
    if tests::FAIL_DELETES.with(std::cell::Cell::get) {
        return Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem));
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.ino() == ino => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes a file, treating "already gone" as success.
pub fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "disk cache: cannot delete file");
        }
    }
}

/// Builds a Pingora error for a failed file operation.
pub fn io_error(etype: ErrorType, action: &str, path: &Path, e: io::Error) -> Box<Error> {
    Error::because(
        etype,
        format!("disk cache: cannot {action} {}", path.display()),
        e,
    )
}

/// Runs blocking file work on Tokio's blocking threads, off the async workers.
pub async fn blocking_io<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("blocking file task failed: {e}"))))
}

/// Allows one log line per period and counts the lines it held back.
#[derive(Debug)]
pub struct LogLimiter {
    start: Instant,
    period: Duration,
    /// Milliseconds since `start` before which nothing is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// Creates a limiter that allows one line per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            start: Instant::now(),
            period,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns the number of lines held back since the last allowed one, or `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        let later = now + self.period.as_millis() as u64;
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    thread_local! {
        /// Makes [`remove_if_same`] fail on this thread, as on a read-only filesystem.
        pub(in crate::cache::disk) static FAIL_DELETES: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    #[test]
    fn temp_file_recreates_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("cache").join("tmp");
        let file = create_temp_file(&tmp.join("a.tmp"));
        assert!(file.is_ok(), "{file:?}");
        assert!(tmp.is_dir());
        let format = std::fs::read_to_string(dir.path().join("cache").join("FORMAT"));
        assert!(format.is_ok(), "no format file: {format:?}");
    }

    #[test]
    fn emptied_root_gets_format_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        let shard = entry_path(&root, &[0xab; 16]);
        let shard = shard.parent().expect("shard");
        create_private_dir(&root).expect("root");
        // The contents were deleted, but a fill recreated a shard before the temp directory.
        create_dir_below(&root, shard).expect("shard");
        assert!(!root.join("FORMAT").exists(), "the root itself was there");
        create_temp_file(&root.join("tmp").join("a.tmp")).expect("temp file");
        assert!(root.join("FORMAT").is_file());
    }

    #[test]
    fn shard_of_deleted_root_restores_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        let shard = entry_path(&root, &[0xcd; 16]);
        create_dir_below(&root, shard.parent().expect("shard")).expect("shard");
        assert!(root.join("FORMAT").is_file());
    }

    #[test]
    fn foreign_root_gets_no_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        create_private_dir(&root).expect("root");
        std::fs::write(root.join("notes.txt"), b"someone else's").expect("write");
        let file = create_temp_file(&root.join("tmp").join("a.tmp"));
        assert!(file.is_err(), "a temp file in a foreign directory");
        assert!(!root.join("FORMAT").exists());
    }

    #[test]
    fn files_name_round_trips() {
        let name = [0xab; 16];
        assert_eq!(parse_name(&hex_name(&name)), Some(name));
        assert_eq!(parse_name(&hex_name(&name).to_uppercase()), None);
    }

    #[test]
    fn files_path_is_sharded() {
        let mut name = [0; 16];
        name[0] = 0xab;
        name[1] = 0xcd;
        let path = entry_path(Path::new("/c"), &name);
        assert!(path.starts_with("/c/ab/cd"));
    }

    #[test]
    fn files_temp_owner_is_this_process() {
        assert_eq!(temp_owner(&temp_name(3)), Some(std::process::id()));
        assert_eq!(temp_owner("junk"), None);
    }

    #[test]
    fn files_limiter_allows_one_per_period() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
    }

    #[test]
    fn files_remove_if_same_keeps_replacement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"a").expect("write");
        let old = std::fs::metadata(&path).expect("stat").ino();
        std::fs::write(dir.path().join("g"), b"b").expect("write");
        std::fs::rename(dir.path().join("g"), &path).expect("rename");
        assert!(!remove_if_same(&path, old).expect("remove"));
        assert!(path.exists());
    }
}
