//! Files that plugins read again while they run (htpasswd files, quota state files): opening
//! them without blocking on special files, and the metadata stamp that shows a file changed.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Age below which a modification time is not trusted, so the file is read again on the next
/// check even with unchanged metadata. File systems keep coarse modification times, and two
/// writes close together can leave the same time and size.
const SETTLE_TIME: Duration = Duration::from_secs(2);

/// Opens `path` for reading without waiting for a writer, as opening a FIFO would. Reads from
/// a regular file are unaffected; callers check [`Metadata::is_file`] before they read.
pub fn open_nonblocking(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Metadata compared between checks to detect a changed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    /// The inode change time. A tool that copies in place and sets the old modification time
    /// back (`cp -p`, `rsync --inplace -t`) changes only this.
    changed: Option<SystemTime>,
}

impl FileStamp {
    /// Takes the stamp of a file's metadata.
    pub fn of(meta: &Metadata) -> Self {
        let (device, inode) = device_and_inode(meta);
        Self {
            device,
            inode,
            len: meta.len(),
            modified: meta.modified().ok(),
            changed: change_time(meta),
        }
    }

    /// Tells whether the file was modified so shortly before `now` that a further write could
    /// leave the same stamp. Such a file must be read again even if its stamp is unchanged.
    pub fn is_unsettled(&self, now: SystemTime) -> bool {
        let latest = self.modified.max(self.changed);
        match latest.map(|latest| now.duration_since(latest)) {
            Some(Ok(age)) => age < SETTLE_TIME,
            Some(Err(_)) | None => true,
        }
    }
}

fn device_and_inode(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

fn change_time(meta: &Metadata) -> Option<SystemTime> {
    let secs = u64::try_from(meta.ctime()).ok()?;
    let nanos = u32::try_from(meta.ctime_nsec()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_of_fresh_file_unsettled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("users");
        std::fs::write(&path, "alice:x\n").expect("write");
        let meta = open_nonblocking(&path)
            .and_then(|file| file.metadata())
            .expect("metadata");
        let stamp = FileStamp::of(&meta);
        assert!(stamp.is_unsettled(SystemTime::now()));
        assert!(!stamp.is_unsettled(SystemTime::now() + SETTLE_TIME * 2));
    }
}
