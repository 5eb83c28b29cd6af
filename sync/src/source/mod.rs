//! Sources of snapshots: a directory or an S3 bucket, behind one trait.

mod aws_profile;
pub mod dir;
pub mod s3;

use std::path::Path;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::SyncError;

pub use dir::DirSource;
pub use s3::S3Source;

/// One object of a listing, kept small: a listing of many keys stays in memory whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key relative to the source's root or prefix, `/`-separated.
    pub key: Box<str>,
    /// Size in bytes.
    pub size: u64,
    /// Version tag that changes whenever the content may have changed: the S3 ETag, or a
    /// stat fingerprint for a directory (see [`DirSource`]).
    pub etag: Box<str>,
    /// Last modification, in seconds since the Unix epoch: the S3 `LastModified`, or a
    /// file's mtime. `None` when the source gives none.
    pub modified: Option<i64>,
}

impl Listed {
    /// Builds an entry without a modification time.
    pub fn new(key: &str, size: u64, etag: &str) -> Self {
        Self {
            key: key.into(),
            size,
            etag: etag.into(),
            modified: None,
        }
    }

    /// Sets the modification time, in seconds since the Unix epoch.
    pub fn with_modified(mut self, unix_secs: i64) -> Self {
        self.modified = Some(unix_secs);
        self
    }
}

/// The result of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written.
    pub size: u64,
    /// The version tag of the content written, which may differ from the listed one when
    /// the object was replaced after the listing.
    pub etag: String,
    /// SHA-256 of the bytes written.
    pub sha256: [u8; 32],
}

/// A source of objects: listed in full, then downloaded one by one.
#[async_trait]
pub trait Source: Send + Sync {
    /// Names the source in logs and errors, e.g. `s3://bucket/prefix/` or a directory path.
    fn name(&self) -> String;

    /// Lists every object under the source's root.
    ///
    /// Fails when any page of the listing failed: a partial listing is never returned.
    async fn list(&self) -> Result<Vec<Listed>, SyncError>;

    /// Downloads `entry` into the new file `dest`, retrying transient failures.
    ///
    /// Fails with [`SyncError::Download`] once retries are spent. `dest` may be left partly
    /// written on failure; the caller removes it.
    async fn fetch(&self, entry: &Listed, dest: &Path) -> Result<Fetched, SyncError>;
}

/// Writes chunks to a new file at `dest`, hashing them, and flushes the file to disk.
///
/// Returns the byte count and SHA-256. Errors name `dest`.
pub(crate) async fn write_chunks<S, E>(
    dest: &Path,
    mut chunks: S,
) -> Result<(u64, [u8; 32]), String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures::StreamExt;
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| format!("creating {}: {e}", dest.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| format!("reading the body: {e}"))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("flushing {}: {e}", dest.display()))?;
    Ok((size, hasher.finalize().into()))
}
