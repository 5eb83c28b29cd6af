//! Checks a built snapshot before it is published: the digests its own manifests and indexes
//! list, and, with a public key, the signature of every `bundle.json`.
//!
//! A digest reference is any JSON object, in a file named `manifest.json` or `index.json`,
//! with a string `sha256` and a string `path` (or, under a `bundle` key, no `path`, meaning
//! `bundle.json`). The path is looked up relative to the document's directory, then to the
//! snapshot root. An optional numeric `size` is checked too.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::SyncError;
use crate::key::check_key;
use crate::manifest::FileEntry;
use crate::signature::{self, PublicKey};

/// Largest manifest or index parsed, in bytes.
const MAX_DOCUMENT_LEN: u64 = 64 * 1024 * 1024;

/// Names of the documents whose digest references are checked.
const DOCUMENTS: [&str; 2] = ["manifest.json", "index.json"];

/// Counts of the checks a verification made, and the export time the documents carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Digest references checked.
    pub digests: usize,
    /// Signatures checked.
    pub signatures: usize,
    /// The newest top-level `generatedAt` of the checked documents, in seconds since the Unix
    /// epoch (see [`crate::export_time`]).
    pub generated_at: Option<i64>,
}

/// Checks the snapshot in `dir`, whose files are `files`.
///
/// Fails with [`SyncError::Verify`] naming the file and the reason: a document that is not
/// JSON, a reference to a missing file, a digest or size that differs, a missing or
/// non-matching signature.
pub fn verify_snapshot(
    dir: &Path,
    files: &[FileEntry],
    key: Option<&PublicKey>,
) -> Result<Verified, SyncError> {
    let by_key: HashMap<&str, &FileEntry> = files.iter().map(|f| (f.key.as_str(), f)).collect();
    let mut verified = Verified::default();
    for file in files
        .iter()
        .filter(|f| DOCUMENTS.contains(&file_name(&f.key)))
    {
        let (digests, generated_at) = check_document(dir, file, &by_key)?;
        verified.digests += digests;
        verified.generated_at = verified.generated_at.max(generated_at);
    }
    if let Some(key) = key {
        for file in files.iter().filter(|f| file_name(&f.key) == "bundle.json") {
            check_signature(dir, file, &by_key, key)?;
            verified.signatures += 1;
        }
    }
    Ok(verified)
}

/// Checks the digest references of one document; returns how many it has and its
/// top-level `generatedAt`.
fn check_document(
    dir: &Path,
    doc: &FileEntry,
    files: &HashMap<&str, &FileEntry>,
) -> Result<(usize, Option<i64>), SyncError> {
    let fail = |reason: String| SyncError::Verify {
        key: doc.key.clone(),
        reason,
    };
    if doc.size > MAX_DOCUMENT_LEN {
        return Err(fail(format!("is over {MAX_DOCUMENT_LEN} bytes")));
    }
    let data = std::fs::read(dir.join(&doc.key)).map_err(|e| fail(format!("reading: {e}")))?;
    let value: Value =
        serde_json::from_slice(&data).map_err(|e| fail(format!("is not valid JSON: {e}")))?;
    let mut refs = Vec::new();
    collect_refs(&value, None, &mut refs);
    for r in &refs {
        let target = resolve(&doc.key, &r.path, files)
            .ok_or_else(|| fail(format!("lists {:?}, which is not in the export", r.path)))?;
        if !target.sha256.eq_ignore_ascii_case(&r.sha256) {
            return Err(fail(format!(
                "lists sha256 {} for {:?}, but the file has {}",
                r.sha256, target.key, target.sha256
            )));
        }
        if r.size.is_some_and(|size| size != target.size) {
            return Err(fail(format!(
                "lists size {} for {:?}, but the file has {} bytes",
                r.size.unwrap_or_default(),
                target.key,
                target.size
            )));
        }
    }
    Ok((refs.len(), crate::export_time::generated_at(&value)))
}

fn check_signature(
    dir: &Path,
    bundle: &FileEntry,
    files: &HashMap<&str, &FileEntry>,
    key: &PublicKey,
) -> Result<(), SyncError> {
    let fail = |reason: String| SyncError::Verify {
        key: bundle.key.clone(),
        reason,
    };
    let sig_key = format!("{}.jws", bundle.key);
    if !files.contains_key(sig_key.as_str()) {
        return Err(fail(format!("has no signature {sig_key:?}")));
    }
    let sig =
        std::fs::read(dir.join(&sig_key)).map_err(|e| fail(format!("reading {sig_key:?}: {e}")))?;
    let sha256 = unhex(&bundle.sha256).ok_or_else(|| fail("bad digest in the manifest".into()))?;
    signature::verify(key, &sig, &dir.join(&bundle.key), &sha256)
        .map_err(|reason| fail(format!("{sig_key:?}: {reason}")))
}

/// A digest reference found in a document.
struct DigestRef {
    path: String,
    sha256: String,
    size: Option<u64>,
}

fn collect_refs(value: &Value, parent: Option<&str>, out: &mut Vec<DigestRef>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(sha256)) = map.get("sha256") {
                let path = match map.get("path") {
                    Some(Value::String(path)) => Some(path.clone()),
                    None if parent == Some("bundle") => Some("bundle.json".to_string()),
                    _ => None,
                };
                if let Some(path) = path {
                    let size = map.get("size").and_then(Value::as_u64);
                    out.push(DigestRef {
                        path,
                        sha256: sha256.clone(),
                        size,
                    });
                }
            }
            for (name, child) in map {
                collect_refs(child, Some(name), out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, parent, out)),
        _ => {}
    }
}

/// Finds the file a reference names: relative to the document's directory, then to the root.
fn resolve<'a>(
    doc_key: &str,
    path: &str,
    files: &HashMap<&str, &'a FileEntry>,
) -> Option<&'a FileEntry> {
    check_key(path).ok()?;
    let relative = match doc_key.rsplit_once('/') {
        Some((doc_dir, _)) => format!("{doc_dir}/{path}"),
        None => path.to_string(),
    };
    files
        .get(relative.as_str())
        .or_else(|| files.get(path))
        .copied()
}

fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
