//! The source export's time a run reports and records: the documents' `generatedAt`, else the
//! newest modification time of the listing.

mod common;

use std::fs::File;
use std::time::{Duration, SystemTime};

use common::*;
use mirror_sync::{run_job, DirSource, RunOptions, TimeBasis};

/// 2026-12-02T00:00:00Z.
const GENERATED: i64 = 1_796_169_600;

fn export_tree(dir: &std::path::Path, generated: &str) {
    let index =
        format!("{{\"kind\": \"concelier.mirror-index\", \"generatedAt\": \"{generated}\"}}");
    let manifest =
        "{\"kind\": \"concelier.mirror-manifest\", \"generatedAt\": \"2026-12-01T23:59:00Z\"}";
    write_tree(
        dir,
        &[
            ("mirror/index.json", index.as_bytes()),
            ("mirror/primary/manifest.json", manifest.as_bytes()),
            ("mirror/primary/bundle.json", b"{}"),
        ],
    );
}

/// Returns run options `secs` after the hour that follows [`GENERATED`]: the runs come
/// after the export was made, so its time is not in their future.
fn after_export(secs: u64) -> RunOptions {
    RunOptions::new(SystemTime::UNIX_EPOCH + Duration::from_secs(GENERATED as u64 + 3600 + secs))
}

/// Sets the modification time of `path` to `unix` seconds.
fn set_mtime(path: &std::path::Path, unix: u64) {
    let file = File::options().write(true).open(path).expect("open");
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
        .expect("set mtime");
}

#[tokio::test]
async fn export_time_from_generated_at() {
    let (src, dest) = (
        tempfile::tempdir().expect("src"),
        tempfile::tempdir().expect("dest"),
    );
    export_tree(src.path(), "2026-12-02T00:00:00Z");
    let job = dir_job(src.path(), dest.path());
    let report = run_job(&job, &DirSource::new(src.path()), &after_export(0))
        .await
        .expect("run");
    let time = report.export_time.expect("an export time");
    assert_eq!(time.unix, GENERATED);
    assert_eq!(time.basis, TimeBasis::GeneratedAt);
    let manifest = manifest_of(dest.path(), &report.export_id);
    assert_eq!(manifest.export_time, Some(time));
}

#[tokio::test]
async fn export_time_from_newest_mtime() {
    let (src, dest) = (
        tempfile::tempdir().expect("src"),
        tempfile::tempdir().expect("dest"),
    );
    write_tree(
        src.path(),
        &[("mirror/a.txt", b"a"), ("mirror/b.txt", b"b")],
    );
    set_mtime(&src.path().join("mirror/a.txt"), 1_000_000);
    set_mtime(&src.path().join("mirror/b.txt"), 2_000_000);
    let job = dir_job(src.path(), dest.path());
    let report = run_job(&job, &DirSource::new(src.path()), &after_export(0))
        .await
        .expect("run");
    let time = report.export_time.expect("an export time");
    assert_eq!(time.unix, 2_000_000);
    assert_eq!(time.basis, TimeBasis::NewestModified);
}

/// A synced export: the source and destination directories, the job and its source, after
/// a first run of an export generated at 2026-12-02T00:00:00Z.
struct Synced {
    src: tempfile::TempDir,
    _dest: tempfile::TempDir,
    job: mirror_sync::JobSettings,
    source: DirSource,
}

async fn first_run() -> Synced {
    let (src, dest) = (
        tempfile::tempdir().expect("src"),
        tempfile::tempdir().expect("dest"),
    );
    export_tree(src.path(), "2026-12-02T00:00:00Z");
    let job = dir_job(src.path(), dest.path());
    let source = DirSource::new(src.path());
    run_job(&job, &source, &after_export(0))
        .await
        .expect("first run");
    Synced {
        src,
        _dest: dest,
        job,
        source,
    }
}

#[tokio::test]
async fn export_time_kept_without_change() {
    let synced = first_run().await;
    let report = run_job(&synced.job, &synced.source, &after_export(60))
        .await
        .expect("second run");
    assert!(!report.published);
    let time = report.export_time.expect("an export time");
    assert_eq!(time.unix, GENERATED);
    assert_eq!(time.basis, TimeBasis::GeneratedAt);
}

#[tokio::test]
async fn export_time_follows_new_export() {
    let synced = first_run().await;
    export_tree(synced.src.path(), "2026-12-02T00:05:00Z");
    let report = run_job(&synced.job, &synced.source, &after_export(60))
        .await
        .expect("second run");
    assert!(report.published);
    let time = report.export_time.expect("an export time");
    assert_eq!(time.unix, GENERATED + 300);
}

#[tokio::test]
async fn export_time_in_future_counts_from_run() {
    let (src, dest) = (
        tempfile::tempdir().expect("src"),
        tempfile::tempdir().expect("dest"),
    );
    export_tree(src.path(), "9999-12-31T23:59:59Z");
    let job = dir_job(src.path(), dest.path());
    let options = after_export(0);
    let report = run_job(&job, &DirSource::new(src.path()), &options)
        .await
        .expect("run");
    let time = report.export_time.expect("an export time");
    let run_start = options
        .now
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    assert!(
        (run_start..run_start + 60).contains(&time.unix),
        "{} is not the run's time {run_start}",
        time.unix
    );
}
