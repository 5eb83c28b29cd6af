//! Start-up checks of a cache directory: format file, orphaned temp files, the entry scan.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora::cache::key::HashBinary;

use super::files::{self, ReadFailure};
use super::format::unix_secs;
use super::index::Slot;
use super::DiskError;

/// Name of the file that records the directory's format.
const FORMAT_FILE: &str = "FORMAT";
/// Start of the name of the empty file that config validation creates and removes to check
/// that a directory takes new files. A cache directory contains one while a `check` runs.
pub const WRITE_PROBE_PREFIX: &str = ".mirror-gateway-check-";
/// Content of the format file; change it whenever old entries must not be read.
const FORMAT_LINE: &str = "mirror-gateway disk cache, format 1";
/// Corrupt entries logged one by one per scan; the rest only appear in the summary.
const CORRUPT_LOG_LIMIT: u64 = 100;
/// Age after which a temp file counts as abandoned even if its writer's pid is running.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// Upper bound on scan threads.
const MAX_SCAN_THREADS: usize = 8;

/// An entry file found by the scan.
pub struct Found {
    pub name: HashBinary,
    pub mtime: SystemTime,
    pub slot: Slot,
}

/// Result of the entry scan.
#[derive(Default)]
pub struct Scan {
    pub found: Vec<Found>,
    pub corrupt: u64,
}

/// Checks the format file, writing it into a new or empty directory.
///
/// Rejects a non-empty directory without a format file: it may be a mistyped path that
/// contains someone else's data, which the cache would otherwise delete.
pub fn check_format(root: &Path) -> Result<(), DiskError> {
    match read_format(root)? {
        Some(()) => Ok(()),
        None => write_format(root, &root.join(FORMAT_FILE)),
    }
}

/// Checks without writing anything that [`check_format`] would accept `root`: a directory
/// with this build's format file, or one without other files.
pub fn check_format_read_only(root: &Path) -> Result<(), DiskError> {
    match read_format(root)? {
        Some(()) => Ok(()),
        None if has_foreign_files(root)? => Err(DiskError::NotACache(root.to_path_buf())),
        None => Ok(()),
    }
}

/// Reads the format file of `root`: `Some` when it names this build's format, `None` when
/// there is none, and an error for another format or a failed read.
fn read_format(root: &Path) -> Result<Option<()>, DiskError> {
    let path = root.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(found) if found.trim_end() == FORMAT_LINE => Ok(Some(())),
        Ok(found) => Err(DiskError::Format {
            path,
            found: found.trim().chars().take(80).collect(),
            expected: FORMAT_LINE,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DiskError::io("read", &path, e)),
    }
}

/// Deletes temp files whose writer is gone; returns how many it deleted.
///
/// A temp file belongs to a live writer only if the process named in its file name is running
/// and is not this one (a restarted process has no writes in flight yet), and the file was
/// written to within [`STALE_TEMP_AGE`] of `now` (the pid may have been reused). A process
/// that has exited but that its parent has not reaped yet (a zombie) is not running.
pub fn clean_temp(tmp: &Path, now: SystemTime) -> Result<u64, DiskError> {
    let proc_available = Path::new("/proc/self").exists();
    let me = std::process::id();
    let mut removed = 0;
    for item in fs::read_dir(tmp).map_err(|e| DiskError::io("list", tmp, e))? {
        let item = item.map_err(|e| DiskError::io("list", tmp, e))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let owner_running = files::temp_owner(&name)
            .is_some_and(|pid| pid != me && proc_available && is_running(pid));
        let recent = item
            .metadata()
            .and_then(|md| md.modified())
            .is_ok_and(|mtime| mtime + STALE_TEMP_AGE > now);
        if !(owner_running && recent) {
            files::remove_quietly(&item.path());
            removed += 1;
        }
    }
    Ok(removed)
}

/// Returns whether process `pid` exists and has not exited: its `/proc/<pid>/stat` names a
/// state other than zombie (`Z`) or dead (`X`). A process whose `stat` this one may not read
/// (`/proc` mounted with `hidepid`) counts as running.
fn is_running(pid: u32) -> bool {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) => return e.kind() == io::ErrorKind::PermissionDenied,
    };
    // The state follows the command name, which is in parentheses and may contain any byte.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Reads the header of every entry file under `root`, deleting torn and corrupt ones.
pub fn scan_entries(root: &Path) -> Result<Scan, DiskError> {
    let mut shards = Vec::new();
    for item in fs::read_dir(root).map_err(|e| DiskError::io("list", root, e))? {
        let item = item.map_err(|e| DiskError::io("list", root, e))?;
        if is_shard_name(&item.file_name().to_string_lossy()) {
            shards.push(item.path());
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_SCAN_THREADS);
    let logged = AtomicU64::new(0);
    let results: Vec<Result<Scan, DiskError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&PathBuf> = shards.iter().skip(t).step_by(threads).collect();
                let logged = &logged;
                scope.spawn(move || scan_shards(&mine, logged))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(DiskError::ScanPanicked)))
            .collect()
    });
    let mut total = Scan::default();
    for result in results {
        let part = result?;
        total.found.extend(part.found);
        total.corrupt += part.corrupt;
    }
    Ok(total)
}

fn write_format(root: &Path, path: &Path) -> Result<(), DiskError> {
    if has_foreign_files(root)? {
        return Err(DiskError::NotACache(root.to_path_buf()));
    }
    publish_format(root, path).map_err(|e| DiskError::io("write", path, e))
}

/// Returns whether `root` contains anything but format files, their temp files and a config
/// check's probe file. An entry that cannot be read counts as foreign.
fn has_foreign_files(root: &Path) -> Result<bool, DiskError> {
    let mut items = fs::read_dir(root).map_err(|e| DiskError::io("list", root, e))?;
    Ok(items.any(|item| {
        item.map_or(true, |i| {
            let name = i.file_name();
            let name = name.to_string_lossy();
            !(name.starts_with(FORMAT_FILE) || name.starts_with(WRITE_PROBE_PREFIX))
        })
    }))
}

/// Writes the format file of a cache directory that the running tier creates again, after it
/// was deleted under it. Does nothing when the file is there.
///
/// The directory may already hold the temp and shard directories that concurrent fills
/// created again, but nothing else: a directory with other files is left without a format
/// file, so that the next start rejects it.
pub fn restore_format(root: &Path) -> io::Result<()> {
    let path = root.join(FORMAT_FILE);
    if path.exists() {
        return Ok(());
    }
    for item in fs::read_dir(root)? {
        let name = item?.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with(FORMAT_FILE) || name.starts_with(WRITE_PROBE_PREFIX);
        if !(ours || name == "tmp" || is_shard_name(&name)) {
            return Err(io::Error::other(format!(
                "{} contains {name:?}, which the cache never writes; not marking it as a cache",
                root.display()
            )));
        }
    }
    publish_format(root, &path)?;
    tracing::warn!(dir = %root.display(), "disk cache: created the deleted cache directory again");
    Ok(())
}

/// Writes the format file to a temp file and renames it to `path`, so that a reader never
/// finds a partial one.
fn publish_format(root: &Path, path: &Path) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seq = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = root.join(format!("{FORMAT_FILE}.{}-{seq}.tmp", std::process::id()));
    let written = fs::write(&tmp, format!("{FORMAT_LINE}\n")).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        files::remove_quietly(&tmp);
    }
    written
}

fn scan_shards(shards: &[&PathBuf], logged: &AtomicU64) -> Result<Scan, DiskError> {
    let mut scan = Scan::default();
    for shard in shards {
        for sub in fs::read_dir(shard).map_err(|e| DiskError::io("list", shard, e))? {
            let sub = sub.map_err(|e| DiskError::io("list", shard, e))?;
            if is_shard_name(&sub.file_name().to_string_lossy()) {
                scan_dir(&sub.path(), &mut scan, logged)?;
            }
        }
    }
    Ok(scan)
}

fn scan_dir(dir: &Path, scan: &mut Scan, logged: &AtomicU64) -> Result<(), DiskError> {
    for item in fs::read_dir(dir).map_err(|e| DiskError::io("list", dir, e))? {
        let item = item.map_err(|e| DiskError::io("list", dir, e))?;
        let file_name = item.file_name().to_string_lossy().into_owned();
        let Some(name) = files::parse_name(&file_name) else {
            tracing::debug!(path = %item.path().display(), "disk cache: ignoring unknown file");
            continue;
        };
        let path = item.path();
        match inspect(&path, name) {
            Ok(Some(found)) => scan.found.push(found),
            Ok(None) => {}
            Err((ReadFailure::Corrupt(reason), ino)) => {
                scan.corrupt += 1;
                if logged.fetch_add(1, Ordering::Relaxed) < CORRUPT_LOG_LIMIT {
                    let path = path.display();
                    // Quoted, like the same line from a read at run time.
                    let reason = reason.to_string();
                    tracing::warn!(%path, reason = reason.as_str(), "disk cache: deleting corrupt entry");
                }
                if let Err(e) = files::remove_if_same(&path, ino) {
                    let path = path.display();
                    tracing::warn!(%path, error = %e, "disk cache: cannot delete corrupt entry");
                }
            }
            Err((ReadFailure::Io(e), _)) => {
                let path = path.display();
                tracing::warn!(%path, error = %e, "disk cache: cannot read entry, skipping it");
            }
        }
    }
    Ok(())
}

/// Reads one entry's header; a corrupt entry comes back with its inode for a guarded delete.
fn inspect(path: &Path, name: HashBinary) -> Result<Option<Found>, (ReadFailure, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err((ReadFailure::Io(e), 0)),
    };
    let md = file.metadata().map_err(|e| (ReadFailure::Io(e), 0))?;
    let header = files::read_header(&file, md.len()).map_err(|f| (f, md.ino()))?;
    if header.key.combined() != name {
        let reason = "key data does not match the file name".to_string();
        return Err((ReadFailure::Corrupt(reason), md.ino()));
    }
    let mtime = md.modified().unwrap_or(UNIX_EPOCH);
    let slot = Slot::new(
        md.len(),
        md.ino(),
        header.stale_until,
        unix_secs(mtime),
        Arc::new(header.key),
    );
    Ok(Some(Found { name, mtime, slot }))
}

fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp file of a writer that exited is deleted even before its parent reaps it.
    #[test]
    fn clean_temp_removes_zombie_writers_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while is_running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_running(pid), "child {pid} did not exit");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "child reaped too early"
        );
        let orphan = dir.path().join(format!("{pid}-1-0.tmp"));
        fs::write(&orphan, b"partial").expect("temp file");
        let live = dir
            .path()
            .join(format!("{}-1-0.tmp", std::os::unix::process::parent_id()));
        fs::write(&live, b"in flight").expect("temp file");

        let removed = clean_temp(dir.path(), SystemTime::now()).expect("clean");

        child.wait().expect("reap child");
        assert_eq!(removed, 1);
        assert!(!orphan.exists(), "zombie writer's temp file kept");
        assert!(live.exists(), "running writer's temp file removed");
    }

    /// A `check` that runs while the gateway starts leaves its probe file for a moment, and
    /// the start still treats the directory as empty.
    #[test]
    fn write_probe_is_not_foreign() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(format!("{WRITE_PROBE_PREFIX}4242")), b"").expect("probe");
        assert!(check_format_read_only(dir.path()).is_ok());
        check_format(dir.path()).expect("format written");
        assert!(dir.path().join(FORMAT_FILE).exists());

        fs::write(dir.path().join("notes.txt"), b"keep").expect("foreign file");
        fs::remove_file(dir.path().join(FORMAT_FILE)).expect("remove format");
        assert!(matches!(
            check_format_read_only(dir.path()),
            Err(DiskError::NotACache(_))
        ));
    }

    #[test]
    fn running_process_is_running() {
        assert!(is_running(std::process::id()));
        assert!(!is_running(u32::MAX));
    }
}
