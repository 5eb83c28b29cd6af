//! A local directory as a source, for rsync-style shares and tests.
//!
//! The version tag of a file is a stat fingerprint, `<inode>-<size>-<mtime ns>-<ctime ns>`
//! in hex: any rewrite changes the ctime, even one that keeps the size and restores the mtime,
//! so a same-size rewrite is always copied again, without reading unchanged files.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Fetched, Listed, Source};
use crate::error::SyncError;

/// Deepest directory nesting walked under the root.
const MAX_DEPTH: usize = 64;

/// How often a file that changes while it is copied is copied again.
const MAX_ATTEMPTS: usize = 3;

/// Reads objects from a directory tree.
///
/// The root itself may be a symlink (e.g. another tree's `latest`); it is resolved once per
/// listing. Inside the tree, symlinks and special files are skipped, not followed.
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// Reads from the directory `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

#[async_trait]
impl Source for DirSource {
    fn name(&self) -> String {
        self.root.display().to_string()
    }

    async fn list(&self) -> Result<Vec<Listed>, SyncError> {
        let root = self.root.clone();
        let name = self.name();
        let walked = tokio::task::spawn_blocking(move || walk(&root))
            .await
            .map_err(|e| format!("the listing task failed: {e}"))
            .and_then(|r| r);
        walked.map_err(|reason| SyncError::Listing {
            source_name: name,
            reason,
        })
    }

    async fn fetch(&self, entry: &Listed, dest: &Path) -> Result<Fetched, SyncError> {
        let path = self.root.join(&*entry.key);
        let dest = dest.to_path_buf();
        let expected = entry.etag.to_string();
        let copied = tokio::task::spawn_blocking(move || copy_stable(&path, &dest, &expected))
            .await
            .map_err(|e| format!("the copy task failed: {e}"))
            .and_then(|r| r);
        copied.map_err(|reason| SyncError::Download {
            key: entry.key.to_string(),
            reason,
        })
    }
}

/// Returns the version tag of a file from its metadata.
pub fn fingerprint(meta: &Metadata) -> String {
    let mtime = meta.mtime() as i128 * 1_000_000_000 + i128::from(meta.mtime_nsec());
    let ctime = meta.ctime() as i128 * 1_000_000_000 + i128::from(meta.ctime_nsec());
    format!("{:x}-{:x}-{:x}-{:x}", meta.ino(), meta.len(), mtime, ctime)
}

fn walk(root: &Path) -> Result<Vec<Listed>, String> {
    let root = fs::canonicalize(root).map_err(|e| format!("resolving {}: {e}", root.display()))?;
    let mut out = Vec::new();
    let mut stack = vec![(root.clone(), String::new(), 0usize)];
    let mut skipped = 0usize;
    while let Some((dir, prefix, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(format!(
                "{} is nested over {MAX_DEPTH} levels",
                dir.display()
            ));
        }
        let entries = fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|name| format!("{}: the name {name:?} is not UTF-8", dir.display()))?;
            let key = format!("{prefix}{name}");
            let kind = entry
                .file_type()
                .map_err(|e| format!("stat of {}: {e}", entry.path().display()))?;
            if kind.is_dir() {
                stack.push((entry.path(), format!("{key}/"), depth + 1));
            } else if kind.is_file() {
                let meta = entry
                    .metadata()
                    .map_err(|e| format!("stat of {}: {e}", entry.path().display()))?;
                let listed = Listed::new(&key, meta.len(), &fingerprint(&meta));
                out.push(listed.with_modified(meta.mtime()));
            } else {
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(root = %root.display(), skipped, "skipped symlinks and special files");
    }
    Ok(out)
}

/// Copies `path` to `dest`, again when the file changed during the copy.
///
/// The copy is accepted when the file's fingerprint is the same before and after it; a
/// fingerprint other than `expected` only means the file was replaced after the listing.
fn copy_stable(path: &Path, dest: &Path, expected: &str) -> Result<Fetched, String> {
    for attempt in 1..=MAX_ATTEMPTS {
        let mut file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let before = file
            .metadata()
            .map_err(|e| format!("stat of {}: {e}", path.display()))?;
        if !before.is_file() {
            return Err(format!("{} is no longer a regular file", path.display()));
        }
        let (size, sha256) = copy_hashed(&mut file, dest)?;
        let after = fs::metadata(path).map_err(|e| format!("stat of {}: {e}", path.display()))?;
        let etag = fingerprint(&before);
        if etag == fingerprint(&after) && size == before.len() {
            if etag != expected {
                tracing::info!(file = %path.display(), "file changed after the listing; copied its new content");
            }
            return Ok(Fetched { size, etag, sha256 });
        }
        tracing::warn!(file = %path.display(), attempt, "file changed while it was copied; copying again");
    }
    Err(format!(
        "{} kept changing during {MAX_ATTEMPTS} copies; retry when the source is quiet",
        path.display()
    ))
}

fn copy_hashed(file: &mut File, dest: &Path) -> Result<(u64, [u8; 32]), String> {
    let write_err = |e: io::Error| format!("writing {}: {e}", dest.display());
    let mut out = File::create(dest).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("reading the source file: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        size += n as u64;
    }
    out.sync_all().map_err(write_err)?;
    Ok((size, hasher.finalize().into()))
}
