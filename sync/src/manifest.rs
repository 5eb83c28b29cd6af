//! The manifest a snapshot carries: one line of facts per file, so the next run can tell
//! unchanged files (hard-linked) from changed ones (downloaded) without reading them.
//!
//! Stored as JSON in the hidden file [`MANIFEST_FILE`] at the root of the snapshot directory,
//! outside the `mirror/` paths the gateway's routes map.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::export_time::ExportTime;

/// Name of the manifest file inside a snapshot directory.
pub const MANIFEST_FILE: &str = ".mirror-sync-manifest.json";

/// Version of the manifest format this code writes and reads.
pub const FORMAT: u32 = 1;

/// The files of one snapshot and where they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`]; another value is treated as no manifest.
    pub format: u32,
    pub export_id: String,
    /// The source, as [`crate::source::Source::name`] gives it.
    pub source: String,
    /// When the snapshot was published (seconds since the Unix epoch).
    pub published_unix: u64,
    /// When the source made the export (see [`crate::export_time`]). Absent in manifests
    /// written before this field existed, which format 1 still reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_time: Option<ExportTime>,
    /// Files, sorted by key.
    pub files: Vec<FileEntry>,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub key: String,
    pub size: u64,
    /// The source's version tag (ETag) of the content.
    pub etag: String,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
}

/// Reads the manifest of the snapshot `dir`.
///
/// Returns `Ok(None)` when the snapshot has no manifest (it was not made by this task), and
/// an error when the file is unreadable, not valid, or of another format version.
pub fn read(dir: &Path) -> Result<Option<Manifest>, String> {
    let path = dir.join(MANIFEST_FILE);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&data)
        .map_err(|e| format!("{} is not a valid manifest: {e}", path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "{} has format {}, this version reads {FORMAT}",
            path.display(),
            manifest.format
        ));
    }
    Ok(Some(manifest))
}

/// Writes `manifest` into the snapshot `dir` and flushes it to disk.
pub fn write(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let data = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
    let mut file = File::create(dir.join(MANIFEST_FILE))?;
    file.write_all(&data)?;
    file.sync_all()
}

/// Formats a SHA-256 digest as lowercase hex.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            export_id: "20260101T120000Z".into(),
            source: "s3://b/p/".into(),
            published_unix: 1_767_268_800,
            export_time: Some(ExportTime {
                unix: 1_767_268_000,
                basis: crate::export_time::TimeBasis::GeneratedAt,
            }),
            files: vec![FileEntry {
                key: "mirror/index.json".into(),
                size: 3,
                etag: "\"e\"".into(),
                sha256: hex(&[0xab; 32]),
            }],
        }
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &sample()).expect("write");
        assert_eq!(read(dir.path()), Ok(Some(sample())));
    }

    #[test]
    fn read_without_export_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"{"format":1,"export_id":"20260101T120000Z","source":"s","published_unix":1,"files":[]}"#;
        std::fs::write(dir.path().join(MANIFEST_FILE), text).expect("write");
        let manifest = read(dir.path()).expect("readable").expect("present");
        assert_eq!(manifest.export_time, None);
    }

    #[test]
    fn read_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()), Ok(None));
    }

    #[test]
    fn read_rejects_other_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            &Manifest {
                format: 2,
                ..sample()
            },
        )
        .expect("write");
        assert!(read(dir.path()).is_err());
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(&hex(&[0xAB; 32])[..4], "abab");
    }
}
