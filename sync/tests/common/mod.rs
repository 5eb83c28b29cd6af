//! Helpers shared by the sync tests: trees on disk, in-memory and counting sources.

#![allow(dead_code)]

pub mod moto;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use mirror_sync::config::{JobSettings, SourceSettings};
use mirror_sync::manifest::{self, Manifest};
use mirror_sync::source::{Fetched, Listed, Source};
use mirror_sync::{RunOptions, SyncError};
use sha2::{Digest, Sha256};

/// 2026-01-01T12:00:00Z, the clock of the first run.
pub const T0: u64 = 1_767_268_800;

/// Returns run options at `T0 + secs`.
pub fn at(secs: u64) -> RunOptions {
    RunOptions::new(UNIX_EPOCH + Duration::from_secs(T0 + secs))
}

/// Writes `files` under `dir`, creating directories.
pub fn write_tree(dir: &Path, files: &[(&str, &[u8])]) {
    for (key, data) in files {
        let path = dir.join(key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, data).expect("write");
    }
}

/// Returns a job copying the directory `src` into `dest`.
pub fn dir_job(src: &Path, dest: &Path) -> JobSettings {
    JobSettings::new(
        "test",
        SourceSettings::Directory {
            path: src.to_path_buf(),
        },
        dest,
    )
}

/// Returns the id `latest` names under `root`.
pub fn latest(root: &Path) -> String {
    std::fs::read_link(root.join("latest"))
        .expect("latest link")
        .to_str()
        .expect("utf-8")
        .to_string()
}

/// Reads `key` from the snapshot `latest` names.
pub fn read_latest(root: &Path, key: &str) -> String {
    std::fs::read_to_string(root.join("latest").join(key)).expect("read")
}

/// Reads the manifest of snapshot `id`.
pub fn manifest_of(root: &Path, id: &str) -> Manifest {
    manifest::read(&root.join(id))
        .expect("readable")
        .expect("present")
}

/// Lists the names under `root` that start with `.tmp-`.
pub fn temp_entries(root: &Path) -> Vec<String> {
    names(root)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Lists the names of `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    names
}

/// Returns the SHA-256 of `data` in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    manifest::hex(&Sha256::digest(data).into())
}

/// A source wrapper that counts listings and downloads.
pub struct Counting<S> {
    pub inner: S,
    pub lists: AtomicUsize,
    pub fetches: AtomicUsize,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            lists: AtomicUsize::new(0),
            fetches: AtomicUsize::new(0),
        }
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl<S: Source> Source for Counting<S> {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn list(&self) -> Result<Vec<Listed>, SyncError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list().await
    }

    async fn fetch(&self, entry: &Listed, dest: &Path) -> Result<Fetched, SyncError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch(entry, dest).await
    }
}

/// A source held in memory, whose keys may be anything; the ETag is the content's SHA-256.
#[derive(Default)]
pub struct Memory {
    pub objects: Mutex<Vec<(String, Vec<u8>)>>,
    /// Makes `fetch` wait forever.
    pub stall: bool,
}

impl Memory {
    pub fn new(objects: &[(&str, &[u8])]) -> Self {
        Self {
            objects: Mutex::new(
                objects
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect(),
            ),
            stall: false,
        }
    }
}

#[async_trait]
impl Source for Memory {
    fn name(&self) -> String {
        "memory".to_string()
    }

    async fn list(&self) -> Result<Vec<Listed>, SyncError> {
        let objects = self.objects.lock().expect("lock");
        Ok(objects
            .iter()
            .map(|(k, v)| Listed::new(k, v.len() as u64, &sha256_hex(v)))
            .collect())
    }

    async fn fetch(&self, entry: &Listed, dest: &Path) -> Result<Fetched, SyncError> {
        if self.stall {
            std::future::pending::<()>().await;
        }
        let data = {
            let objects = self.objects.lock().expect("lock");
            objects
                .iter()
                .find(|(k, _)| *k == *entry.key)
                .map(|(_, v)| v.clone())
                .expect("listed key")
        };
        std::fs::write(dest, &data).expect("write");
        Ok(Fetched {
            size: data.len() as u64,
            etag: sha256_hex(&data),
            sha256: Sha256::digest(&data).into(),
        })
    }
}

/// Returns the workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Returns `UNIX_EPOCH + secs`.
pub fn time(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
