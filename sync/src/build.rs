//! Builds a new snapshot in its staging directory: hard links for unchanged files, downloads
//! for the others, each download written under `.partial/` first and renamed into place
//! once complete.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;

use crate::error::SyncError;
use crate::manifest::{hex, FileEntry};
use crate::progress::Progress;
use crate::source::{Listed, Source};

/// Name of the directory, inside a staging snapshot, that downloads are written to.
const PARTIAL_DIR: &str = ".partial";

/// The content of the new snapshot, sorted by origin.
#[derive(Debug, Default)]
pub struct Plan {
    /// Unchanged files: the listing entry and the current snapshot's entry.
    pub link: Vec<(Listed, FileEntry)>,
    /// New or changed files.
    pub download: Vec<Listed>,
    /// Files of the current snapshot that the new one will not have.
    pub removed: usize,
}

/// The files of a built snapshot and how they got there.
#[derive(Debug, Default)]
pub struct Built {
    /// Every file, sorted by key.
    pub files: Vec<FileEntry>,
    pub linked: usize,
    pub downloaded: usize,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// The inputs of [`build`].
pub struct BuildContext<'a> {
    /// The staging directory; it must not exist yet.
    pub staging: &'a Path,
    /// The current snapshot, source of hard links.
    pub current: Option<&'a Path>,
    pub source: &'a dyn Source,
    pub concurrency: usize,
    pub progress: &'a Progress,
    /// Test hook: fail as a crash would after this many downloads.
    pub crash_after: Option<usize>,
}

/// Builds the snapshot `plan` describes in `ctx.staging`.
///
/// A file planned as a link that is missing from the current snapshot, or has another size,
/// is downloaded instead. On error the staging directory is left for the caller to remove.
pub async fn build(ctx: &BuildContext<'_>, plan: Plan) -> Result<Built, SyncError> {
    let partial = ctx.staging.join(PARTIAL_DIR);
    fs::create_dir_all(&partial).map_err(|e| SyncError::io("creating", &partial, e))?;
    let staging = ctx.staging.to_path_buf();
    let current = ctx.current.map(Path::to_path_buf);
    let link = plan.link;
    let (mut files, fallback) =
        tokio::task::spawn_blocking(move || link_all(&staging, current.as_deref(), link))
            .await
            .map_err(|e| SyncError::io("linking into", ctx.staging, io::Error::other(e)))??;
    let linked = files.len();
    let mut downloads = plan.download;
    downloads.extend(fallback);
    ctx.progress
        .set_length(downloads.iter().map(|d| d.size).sum());
    let fetched = download_all(ctx, &partial, downloads).await?;
    let downloaded = fetched.len();
    let bytes = fetched.iter().map(|f| f.size).sum();
    files.extend(fetched);
    files.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    fs::remove_dir(&partial).map_err(|e| SyncError::io("removing", &partial, e))?;
    Ok(Built {
        files,
        linked,
        downloaded,
        bytes,
    })
}

/// Hard-links unchanged files; returns the linked entries and those to download instead.
fn link_all(
    staging: &Path,
    current: Option<&Path>,
    link: Vec<(Listed, FileEntry)>,
) -> Result<(Vec<FileEntry>, Vec<Listed>), SyncError> {
    let mut dirs = HashSet::new();
    let mut linked = Vec::with_capacity(link.len());
    let mut fallback = Vec::new();
    let Some(current) = current else {
        return Ok((linked, link.into_iter().map(|(l, _)| l).collect()));
    };
    for (listed, entry) in link {
        let from = current.join(&entry.key);
        let to = staging.join(&entry.key);
        make_parent(&to, &mut dirs)?;
        let same_size =
            fs::symlink_metadata(&from).is_ok_and(|m| m.is_file() && m.len() == entry.size);
        if !same_size {
            tracing::warn!(file = %from.display(), "file of the current snapshot is missing or changed; downloading it again");
            fallback.push(listed);
            continue;
        }
        fs::hard_link(&from, &to).map_err(|e| SyncError::io("hard-linking to", &to, e))?;
        linked.push(entry);
    }
    Ok((linked, fallback))
}

fn make_parent(path: &Path, made: &mut HashSet<PathBuf>) -> Result<(), SyncError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    if made.insert(parent.to_path_buf()) {
        fs::create_dir_all(parent).map_err(|e| SyncError::io("creating", parent, e))?;
    }
    Ok(())
}

async fn download_all(
    ctx: &BuildContext<'_>,
    partial: &Path,
    downloads: Vec<Listed>,
) -> Result<Vec<FileEntry>, SyncError> {
    // After the first failure no new download starts, and those running are waited for. A
    // directory source copies on blocking threads that dropping their futures does not stop,
    // so they would write into the staging directory while it is being removed.
    let failed = AtomicBool::new(false);
    let failed = &failed;
    let mut stream = futures::stream::iter(downloads.into_iter().enumerate())
        .map(|(i, entry)| async move {
            if failed.load(Ordering::Relaxed) {
                return Ok(None);
            }
            download_one(ctx, partial, i, entry).await.map(Some)
        })
        .buffer_unordered(ctx.concurrency.max(1));
    let mut done = Vec::new();
    let mut first_error = None;
    while let Some(result) = stream.next().await {
        match result {
            Ok(Some(entry)) => done.push(entry),
            Ok(None) => {}
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
        if first_error.is_none() && ctx.crash_after.is_some_and(|n| done.len() >= n) {
            return Err(SyncError::Interrupted {
                downloads: done.len(),
            });
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

async fn download_one(
    ctx: &BuildContext<'_>,
    partial: &Path,
    index: usize,
    entry: Listed,
) -> Result<FileEntry, SyncError> {
    let temp = partial.join(index.to_string());
    let fetched = ctx.source.fetch(&entry, &temp).await?;
    let dest = ctx.staging.join(&*entry.key);
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| SyncError::io("creating", parent, e))?;
    }
    tokio::fs::rename(&temp, &dest)
        .await
        .map_err(|e| SyncError::io("moving a download to", &dest, e))?;
    ctx.progress.advance(fetched.size);
    Ok(FileEntry {
        key: entry.key.to_string(),
        size: fetched.size,
        etag: fetched.etag,
        sha256: hex(&fetched.sha256),
    })
}
