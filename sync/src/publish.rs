//! Operations on the destination root: find the current snapshot, move a finished snapshot
//! into place, switch `latest` atomically, remove leftovers and old snapshots.
//!
//! Only names starting with `.` are ever half-made: a snapshot is built as `.tmp-<id>` and
//! renamed to `<id>` whole, and the new `latest` is made as `.tmp-latest-<id>` and renamed
//! over `latest` (`rename(2)` replaces it atomically), so a reader sees the old or the new
//! snapshot, never a mix, and a crash leaves only `.tmp-*` entries behind. Cleaning up removes
//! only entries named as a run names them, so other files in the root are left alone.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::SyncError;
use crate::export_id;
use crate::manifest;

/// Name of the symlink naming the published snapshot.
pub const LATEST_LINK: &str = "latest";

/// Prefix of every temporary entry under the root.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The retention rules of [`prune`].
#[derive(Debug, Clone, Copy)]
pub struct PrunePolicy<'a> {
    /// The newest snapshots kept, whatever their age.
    pub keep: usize,
    /// How long a snapshot is kept after a newer one replaced it.
    pub grace: Duration,
    /// Ids never removed.
    pub pinned: &'a [String],
    pub now: SystemTime,
}

/// Returns the path of the staging directory of snapshot `id`.
pub fn staging_dir(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{TEMP_PREFIX}{id}"))
}

/// The kind of `.tmp-*` entries a removal cleans up, named in its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// Entries left by earlier runs that crashed or were killed.
    Interrupted,
    /// The unpublished snapshot of the run that just failed.
    FailedRun,
}

/// Returns whether `name` is a temporary entry that a run makes: `.tmp-<id>` (a snapshot
/// being built), `.tmp-latest-<id>` (the next `latest`) or `.tmp-prune-<id>` (a snapshot
/// being removed), where `<id>` is an export id. Other names are never removed.
pub fn is_run_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
        return false;
    };
    let id = rest
        .strip_prefix("latest-")
        .or_else(|| rest.strip_prefix("prune-"))
        .unwrap_or(rest);
    export_id::parse(id).is_some()
}

/// Removes the temporary entries of `root` that runs make (see [`is_run_temp`]). They are
/// leftovers of crashed runs or of the run that just failed, and `leftovers` selects the
/// wording of the log line.
///
/// An entry that cannot be removed is logged as a warning and left: it is not served, and a
/// new run uses new names, so it only takes space. Call it only while holding the run lock.
/// Returns how many entries were removed.
pub fn remove_leftovers(root: &Path, leftovers: Leftovers) -> Result<usize, SyncError> {
    let mut removed = 0;
    for entry in read_dir(root)? {
        let entry = entry.map_err(|e| SyncError::io("reading", root, e))?;
        let is_temp = entry.file_name().to_str().is_some_and(is_run_temp);
        if !is_temp {
            continue;
        }
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(kind) if kind.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e,
                "could not remove a temporary entry of the sync; it is not served, remove it \
                 by hand (for example after fixing its owner or permissions)");
            continue;
        }
        match leftovers {
            Leftovers::Interrupted => tracing::info!(path = %path.display(),
                "removed the leftover of an interrupted run"),
            Leftovers::FailedRun => tracing::info!(path = %path.display(),
                "removed the unpublished snapshot of the failed run"),
        }
        removed += 1;
    }
    Ok(removed)
}

/// Returns the id of the snapshot the gateway serves when nothing is pinned.
///
/// That is the target of `latest`, else the newest export directory, else `None`.
pub fn current(root: &Path) -> Result<Option<String>, SyncError> {
    let link = root.join(LATEST_LINK);
    match fs::read_link(&link) {
        Ok(target) => {
            let id = target
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string);
            match id {
                Some(id) if root.join(&id).is_dir() => Ok(Some(id)),
                _ => {
                    tracing::warn!(link = %link.display(), target = %target.display(), "latest does not name an export directory; ignoring it");
                    newest(root)
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => newest(root),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(SyncError::io(
            "reading the link",
            &link,
            io::Error::other(
                "it is not a symlink (a tree copied there by another tool?); move it out of \
                 the destination, and the sync makes `latest` a symlink to a snapshot",
            ),
        )),
        Err(e) => Err(SyncError::io("reading the link", &link, e)),
    }
}

/// Returns the newest directory of `root` named like an export id.
pub fn newest(root: &Path) -> Result<Option<String>, SyncError> {
    Ok(export_dirs(root)?.pop())
}

/// Moves the finished snapshot `staging` to `<root>/<id>` and points `latest` at it.
///
/// Flushes every directory of the snapshot first, so that after a power loss `latest` never
/// names a snapshot with missing entries.
pub fn install(root: &Path, staging: &Path, id: &str) -> Result<(), SyncError> {
    sync_tree(staging)?;
    let dir = root.join(id);
    fs::rename(staging, &dir).map_err(|e| SyncError::io("renaming the snapshot to", &dir, e))?;
    sync_dir(root)?;
    let temp_link = root.join(format!("{TEMP_PREFIX}latest-{id}"));
    std::os::unix::fs::symlink(id, &temp_link)
        .map_err(|e| SyncError::io("creating the link", &temp_link, e))?;
    let link = root.join(LATEST_LINK);
    fs::rename(&temp_link, &link).map_err(|e| SyncError::io("replacing the link", &link, e))?;
    sync_dir(root)
}

/// Removes old snapshots made by this task, as `policy` allows; returns their ids.
///
/// Never removes `latest`, anything newer, a pinned id, the `keep` newest, a directory
/// without a sync manifest, or a snapshot replaced less than `grace` ago (when the next
/// newer snapshot was published). Failures are logged and skipped.
pub fn prune(root: &Path, latest: &str, policy: PrunePolicy<'_>) -> Result<Vec<String>, SyncError> {
    let ids = export_dirs(root)?;
    let mut removed = Vec::new();
    let keep_from = ids.len().saturating_sub(policy.keep);
    for (i, id) in ids.iter().enumerate().take(keep_from) {
        if id.as_str() >= latest || policy.pinned.contains(id) {
            continue;
        }
        let dir = root.join(id);
        if !dir.join(manifest::MANIFEST_FILE).is_file() {
            continue;
        }
        let Some(successor) = ids.get(i + 1) else {
            continue;
        };
        let replaced_at = published_at(&root.join(successor));
        // A grace that runs past the clock's range never ends.
        let in_grace = replaced_at
            .checked_add(policy.grace)
            .is_none_or(|until| policy.now < until);
        if in_grace {
            continue;
        }
        let doomed = root.join(format!("{TEMP_PREFIX}prune-{id}"));
        let result = fs::rename(&dir, &doomed).and_then(|()| fs::remove_dir_all(&doomed));
        match result {
            Ok(()) => removed.push(id.clone()),
            Err(e) => {
                tracing::warn!(snapshot = %dir.display(), error = %e, "could not remove an old snapshot")
            }
        }
    }
    Ok(removed)
}

/// Returns when snapshot `dir` was published: from its manifest, else from its id.
fn published_at(dir: &Path) -> SystemTime {
    // A time past the clock's range (a damaged manifest) falls back to the snapshot's id.
    let recorded = manifest::read(dir)
        .ok()
        .flatten()
        .and_then(|m| UNIX_EPOCH.checked_add(Duration::from_secs(m.published_unix)));
    if let Some(time) = recorded {
        return time;
    }
    let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    export_id::parse(id).unwrap_or(UNIX_EPOCH)
}

/// Lists the directories of `root` named like export ids, oldest first.
fn export_dirs(root: &Path) -> Result<Vec<String>, SyncError> {
    let mut ids = Vec::new();
    for entry in read_dir(root)? {
        let entry = entry.map_err(|e| SyncError::io("reading", root, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && export_id::parse(&name).is_some() {
            ids.push(name);
        }
    }
    ids.sort();
    Ok(ids)
}

fn read_dir(root: &Path) -> Result<fs::ReadDir, SyncError> {
    fs::read_dir(root).map_err(|e| SyncError::io("reading", root, e))
}

/// Flushes directory `dir` itself (its entries, not their content).
fn sync_dir(dir: &Path) -> Result<(), SyncError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| SyncError::io("flushing", dir, e))
}

/// Flushes every directory under and including `dir`.
fn sync_tree(dir: &Path) -> Result<(), SyncError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in read_dir(&dir)? {
            let entry = entry.map_err(|e| SyncError::io("reading", &dir, e))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
        sync_dir(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_run_temp;

    #[test]
    fn run_temp_names() {
        for name in [
            ".tmp-20261205T204738Z",
            ".tmp-latest-20261205T204738Z",
            ".tmp-prune-20261205T204738Z",
        ] {
            assert!(is_run_temp(name), "{name}");
        }
        for name in [
            ".tmp-editor-swap",
            ".tmp-build",
            ".tmp-",
            ".tmp-latest-",
            ".tmp-other-20261205T204738Z",
            "20261205T204738Z",
            "latest",
        ] {
            assert!(!is_run_temp(name), "{name}");
        }
    }
}
