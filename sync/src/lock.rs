//! The run lock of a destination root: an exclusive `flock` on `<root>/.mirror-sync.lock`,
//! held for the whole run and released when the process exits, however it exits.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

use crate::error::SyncError;

/// Name of the lock file inside a destination root.
pub const LOCK_FILE: &str = ".mirror-sync.lock";

/// A held run lock; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

/// How often, and how far apart, a held lock is tried again.
const LOCK_ATTEMPTS: u32 = 20;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

impl RunLock {
    /// Takes the lock of `root`, waiting at most about one second.
    ///
    /// Fails with [`SyncError::Locked`] when another run, in this process or another, still
    /// holds it then, and with [`SyncError::Io`] when the lock file cannot be opened.
    pub fn acquire(root: &Path) -> Result<Self, SyncError> {
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SyncError::io("opening the lock file", &path, e))?;
        // A lock released a moment ago can still look held: a child process forked by another
        // thread shares the descriptor until it calls exec. So a held lock is tried again for
        // up to one second before the run gives up.
        for _ in 0..LOCK_ATTEMPTS {
            match file.try_lock_exclusive() {
                Ok(true) => return Ok(Self { _file: file, path }),
                Ok(false) => std::thread::sleep(LOCK_RETRY_PAUSE),
                Err(e) => return Err(SyncError::io("locking", &path, e)),
            }
        }
        Err(SyncError::Locked { path })
    }

    /// Returns the lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_twice_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = RunLock::acquire(dir.path()).expect("first");
        let err = RunLock::acquire(dir.path()).expect_err("must fail");
        assert!(matches!(err, SyncError::Locked { .. }), "{err}");
    }

    #[test]
    fn acquire_after_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(RunLock::acquire(dir.path()).expect("first"));
        assert!(RunLock::acquire(dir.path()).is_ok());
    }
}
