//! Errors of a sync run: each names what failed, on which value, and what to do.

use std::io;
use std::path::PathBuf;

/// Says why a sync run published nothing.
///
/// Whatever the variant, the published tree (`latest` and the snapshot it names) is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Another run holds the lock of the destination root.
    #[error(
        "another sync run holds the lock {}; wait until it ends (the lock is released when \
         that process exits)",
        path.display()
    )]
    Locked { path: PathBuf },
    /// A file system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Listing the source failed or was cut short.
    #[error("listing {source_name} failed: {reason}; nothing was published or deleted")]
    Listing { source_name: String, reason: String },
    /// The source listed no object, or only hidden ones (a segment starting with `.`).
    #[error(
        "listing {source_name} returned no object to publish (hidden names, starting with \
         `.`, are skipped); nothing was published or deleted (check the bucket, prefix or path)"
    )]
    EmptyListing { source_name: String },
    /// A key could escape the snapshot directory or cannot be a file name.
    #[error("source key {key:?} {reason}; fix the key at the source, nothing was published")]
    InvalidKey { key: String, reason: &'static str },
    /// One key is a file and also a directory of another key.
    #[error(
        "source keys {file:?} and {nested:?} clash: {file:?} would be both a file and a \
         directory; remove one of them at the source"
    )]
    KeyClash { file: String, nested: String },
    /// The source contains export directories rather than the content of one export.
    #[error(
        "source {source_name} holds export directories (key {key:?}); point the source at one \
         export, e.g. its `latest/` prefix or directory"
    )]
    NestedExports { source_name: String, key: String },
    /// The new snapshot would remove too large a share of the current files.
    #[error(
        "the new snapshot would remove {removed} of {total} current files, more than \
         max_delete_fraction = {max_fraction}; check the source, or pass --allow-mass-delete"
    )]
    MassDelete {
        removed: usize,
        total: usize,
        max_fraction: f64,
    },
    /// Downloading one object failed after the retries.
    #[error("downloading {key:?} failed: {reason}")]
    Download { key: String, reason: String },
    /// A digest or signature check of the new snapshot failed.
    #[error("verification of {key:?} failed: {reason}; the snapshot was not published")]
    Verify { key: String, reason: String },
    /// The run did not finish within `deadline_secs`.
    #[error(
        "the run did not finish within deadline_secs = {secs}; nothing was published (raise \
         deadline_secs or check the source's speed)"
    )]
    Deadline { secs: u64 },
    /// A test hook stopped the run as a crash would, leaving its temporary files behind.
    #[error("the run was stopped by a test hook after {downloads} download(s)")]
    Interrupted { downloads: usize },
}

impl SyncError {
    /// Builds an [`SyncError::Io`] for `action` on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
