//! Checks source keys before anything is written: every key must name a file inside the
//! snapshot, and no key may be both a file and a directory.

use std::collections::HashSet;

use crate::error::SyncError;
use crate::export_id;
use crate::source::Listed;

/// Maximum key length accepted, in bytes (S3's own limit is 1024).
pub const MAX_KEY_LEN: usize = 1024;

/// Longest path segment accepted, in bytes (the usual file name limit).
pub const MAX_SEGMENT_LEN: usize = 255;

/// The handling of a key that is safe to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Copy it into the snapshot.
    Keep,
    /// Leave it out: a segment starts with `.`, a name reserved for the task's own files.
    Hidden,
}

/// Classifies `key`, or returns why it could escape the snapshot or cannot be a file name.
pub fn check_key(key: &str) -> Result<KeyUse, &'static str> {
    if key.is_empty() {
        return Err("is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("is longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return Err("starts with '/'");
    }
    if key.contains('\\') {
        return Err("contains a backslash");
    }
    if key.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    let mut hidden = false;
    for segment in key.split('/') {
        match segment {
            "" => return Err("has an empty segment ('//' or a trailing '/')"),
            "." | ".." => return Err("has a '.' or '..' segment"),
            s if s.len() > MAX_SEGMENT_LEN => return Err("has a segment over 255 bytes"),
            s if s.starts_with('.') => hidden = true,
            _ => {}
        }
    }
    Ok(if hidden { KeyUse::Hidden } else { KeyUse::Keep })
}

/// Checks a whole listing and returns the entries to copy, sorted by key.
///
/// Drops hidden keys and empty "directory marker" objects (a zero-byte key that is also a
/// directory of other keys). Fails on the first unsafe key, on a key that is both a file and
/// a directory, and on duplicate keys. Also fails when the first segment of a key is an
/// export id, because then the source is a tree of exports rather than one export.
pub fn check_listing(source_name: &str, listing: Vec<Listed>) -> Result<Vec<Listed>, SyncError> {
    let mut kept = Vec::with_capacity(listing.len());
    for entry in listing {
        let use_ = check_key(&entry.key).map_err(|reason| SyncError::InvalidKey {
            key: entry.key.to_string(),
            reason,
        })?;
        if use_ == KeyUse::Hidden {
            tracing::debug!(key = %entry.key, "skipping a hidden key (a segment starts with '.')");
            continue;
        }
        let first = entry.key.split('/').next().unwrap_or_default();
        if export_id::parse(first).is_some() {
            return Err(SyncError::NestedExports {
                source_name: source_name.to_string(),
                key: entry.key.to_string(),
            });
        }
        kept.push(entry);
    }
    kept.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    if let Some(pair) = kept.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(SyncError::KeyClash {
            file: pair[0].key.to_string(),
            nested: pair[1].key.to_string(),
        });
    }
    drop_clashes(kept)
}

/// Removes empty directory markers; fails on any other key that is also a directory.
fn drop_clashes(entries: Vec<Listed>) -> Result<Vec<Listed>, SyncError> {
    let mut dirs: HashSet<&str> = HashSet::new();
    for entry in &entries {
        let key: &str = &entry.key;
        for (i, _) in key.match_indices('/') {
            dirs.insert(&key[..i]);
        }
    }
    let mut clash = None;
    let mut markers = HashSet::new();
    for entry in &entries {
        if dirs.contains(&*entry.key) {
            if entry.size == 0 {
                markers.insert(entry.key.clone());
            } else if clash.is_none() {
                clash = Some(entry.key.to_string());
            }
        }
    }
    if let Some(file) = clash {
        let prefix = format!("{file}/");
        let nested = entries
            .iter()
            .find(|e| e.key.starts_with(&prefix))
            .map(|e| e.key.to_string())
            .unwrap_or(prefix);
        return Err(SyncError::KeyClash { file, nested });
    }
    drop(dirs);
    Ok(entries
        .into_iter()
        .filter(|e| !markers.contains(&e.key))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64) -> Listed {
        Listed::new(key, size, "etag")
    }

    #[test]
    fn check_key_accepts_plain_paths() {
        assert_eq!(check_key("mirror/primary/bundle.json"), Ok(KeyUse::Keep));
    }

    #[test]
    fn check_key_marks_hidden() {
        assert_eq!(check_key("mirror/.keep"), Ok(KeyUse::Hidden));
    }

    #[test]
    fn check_key_rejects_hostile_keys() {
        for key in [
            "",
            "/etc/passwd",
            "a/../../b",
            "..",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "a\nb",
            "a\u{7f}b",
        ] {
            assert!(check_key(key).is_err(), "{key:?}");
        }
    }

    #[test]
    fn check_listing_rejects_file_and_dir() {
        let err =
            check_listing("src", vec![listed("a", 3), listed("a/b", 1)]).expect_err("must fail");
        assert!(matches!(err, SyncError::KeyClash { .. }), "{err}");
    }

    #[test]
    fn check_listing_drops_directory_markers() {
        let kept = check_listing("src", vec![listed("a/b", 1), listed("a", 0)]).expect("ok");
        let keys: Vec<&str> = kept.iter().map(|e| &*e.key).collect();
        assert_eq!(keys, ["a/b"]);
    }

    #[test]
    fn check_listing_rejects_export_trees() {
        let err = check_listing("src", vec![listed("20260101T120000Z/mirror/x", 1)])
            .expect_err("must fail");
        assert!(matches!(err, SyncError::NestedExports { .. }), "{err}");
    }

    #[test]
    fn check_listing_sorts_and_skips_hidden() {
        let kept = check_listing("src", vec![listed("b", 1), listed(".x", 1), listed("a", 1)])
            .expect("ok");
        let keys: Vec<&str> = kept.iter().map(|e| &*e.key).collect();
        assert_eq!(keys, ["a", "b"]);
    }
}
