//! Runs of a directory source: first sync, no-change runs, rewrites, crashes, pruning.

mod common;

use std::fs::File;
use std::time::Duration;

use common::*;
use mirror_sync::{run_job, DirSource, SyncError};

fn sample_tree(dir: &std::path::Path, gen: u32) {
    let index = format!("{{\"gen\": {gen}}}");
    let bundle = format!("bundle gen {gen}");
    write_tree(
        dir,
        &[
            ("mirror/index.json", index.as_bytes()),
            ("mirror/primary/bundle.json", bundle.as_bytes()),
            ("mirror/primary/static.txt", b"unchanged"),
        ],
    );
}

#[tokio::test]
async fn first_sync_publishes_tree() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    let report = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    assert_eq!(latest(dest.path()), "20260101T120000Z");
    assert_eq!(
        read_latest(dest.path(), "mirror/primary/bundle.json"),
        "bundle gen 0"
    );
    assert_eq!(report.downloaded, 3);
}

#[tokio::test]
async fn first_sync_writes_manifest() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    let manifest = manifest_of(dest.path(), "20260101T120000Z");
    let index = manifest
        .files
        .iter()
        .find(|f| f.key == "mirror/index.json")
        .expect("entry");
    assert_eq!(index.sha256, sha256_hex(b"{\"gen\": 0}"));
}

#[tokio::test]
async fn no_change_run_reads_nothing() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    let source = Counting::new(DirSource::new(src.path()));
    run_job(&job, &source, &at(0)).await.expect("first");
    let report = run_job(&job, &source, &at(60)).await.expect("second");
    assert_eq!(source.fetches(), 3, "only the first run downloads");
    assert!(!report.published);
    assert_eq!(latest(dest.path()), "20260101T120000Z");
}

#[tokio::test]
async fn changed_file_downloaded_others_linked() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first");
    write_tree(src.path(), &[("mirror/index.json", b"{\"gen\": 10}")]);
    let report = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect("second");
    assert_eq!((report.downloaded, report.linked), (1, 2));
    assert_eq!(
        read_latest(dest.path(), "mirror/index.json"),
        "{\"gen\": 10}"
    );
}

#[tokio::test]
async fn unchanged_file_is_hard_link() {
    use std::os::unix::fs::MetadataExt;
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first");
    write_tree(src.path(), &[("mirror/index.json", b"{}")]);
    run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect("second");
    let old = std::fs::metadata(
        dest.path()
            .join("20260101T120000Z/mirror/primary/static.txt"),
    );
    let new = std::fs::metadata(
        dest.path()
            .join("20260101T120100Z/mirror/primary/static.txt"),
    );
    assert_eq!(old.expect("old").ino(), new.expect("new").ino());
}

#[tokio::test]
async fn same_size_rewrite_with_old_mtime_picked_up() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    write_tree(src.path(), &[("mirror/data.txt", b"aaaa")]);
    let path = src.path().join("mirror/data.txt");
    let mtime = std::fs::metadata(&path)
        .expect("test i/o")
        .modified()
        .expect("test i/o");
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first");
    std::fs::write(&path, b"bbbb").expect("test i/o");
    File::options()
        .write(true)
        .open(&path)
        .expect("test i/o")
        .set_modified(mtime)
        .expect("test i/o");
    let report = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect("second");
    assert_eq!(report.downloaded, 1);
    assert_eq!(read_latest(dest.path(), "mirror/data.txt"), "bbbb");
}

#[tokio::test]
async fn crash_keeps_latest_and_next_run_cleans() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    sample_tree(src.path(), 0);
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first");
    sample_tree(src.path(), 1);
    let mut crash = at(60);
    crash.crash_after_downloads = Some(1);
    let err = run_job(&job, &DirSource::new(src.path()), &crash)
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Interrupted { .. }), "{err}");
    assert_eq!(
        read_latest(dest.path(), "mirror/index.json"),
        "{\"gen\": 0}"
    );
    assert_eq!(
        temp_entries(dest.path()).len(),
        1,
        "the crash left its staging dir"
    );
    run_job(&job, &DirSource::new(src.path()), &at(120))
        .await
        .expect("third");
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
    assert_eq!(
        read_latest(dest.path(), "mirror/index.json"),
        "{\"gen\": 1}"
    );
}

#[tokio::test]
async fn hidden_source_files_left_out() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    write_tree(
        src.path(),
        &[("a.json", b"{}"), (".mirror-sync-manifest.json", b"x")],
    );
    let job = dir_job(src.path(), dest.path());
    let report = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    assert_eq!(report.listed, 1);
}

#[tokio::test]
async fn prune_keeps_newest_and_pinned() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut job = dir_job(src.path(), dest.path());
    job.keep_snapshots = 2;
    job.grace = Duration::from_secs(600);
    job.pinned = vec!["20260101T120000Z".to_string()];
    for gen in 0..5u32 {
        sample_tree(src.path(), gen);
        let secs = u64::from(gen) * 3600;
        run_job(&job, &DirSource::new(src.path()), &at(secs))
            .await
            .expect("run");
    }
    let ids: Vec<String> = names(dest.path())
        .into_iter()
        .filter(|n| n.starts_with("2026"))
        .collect();
    assert_eq!(
        ids,
        ["20260101T120000Z", "20260101T150000Z", "20260101T160000Z"]
    );
}

#[tokio::test]
async fn prune_waits_for_grace() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut job = dir_job(src.path(), dest.path());
    job.keep_snapshots = 1;
    for gen in 0..3u32 {
        sample_tree(src.path(), gen);
        run_job(&job, &DirSource::new(src.path()), &at(u64::from(gen) * 60))
            .await
            .expect("run");
    }
    let ids: Vec<String> = names(dest.path())
        .into_iter()
        .filter(|n| n.starts_with("2026"))
        .collect();
    assert_eq!(ids.len(), 3, "replaced under 600 s ago: {ids:?}");
}
