//! Runs that must publish and delete nothing: bad keys, mass deletes, locks, empty or failed
//! listings, deadlines.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mirror_sync::lock::RunLock;
use mirror_sync::{run_job, DirSource, SyncError};

/// Publishes one snapshot with `n` files from a directory; returns (src, dest) dirs.
async fn published(n: usize) -> (tempfile::TempDir, tempfile::TempDir) {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    for i in 0..n {
        write_tree(src.path(), &[(&format!("files/{i}.txt"), b"data")]);
    }
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first run");
    (src, dest)
}

#[tokio::test]
async fn hostile_keys_fail_cleanly() {
    let (src, dest) = published(2).await;
    let job = dir_job(src.path(), dest.path());
    for key in [
        "../evil",
        "/etc/evil",
        "a//b",
        "a\\b",
        "a\u{1}b",
        "a/./b",
        "a/",
    ] {
        let source = Memory::new(&[(key, b"x"), ("ok.txt", b"y")]);
        let err = run_job(&job, &source, &at(60))
            .await
            .expect_err("must fail");
        assert!(
            matches!(err, SyncError::InvalidKey { .. }),
            "{key:?}: {err}"
        );
        assert_eq!(latest(dest.path()), "20260101T120000Z", "{key:?}");
    }
    assert!(!dest
        .path()
        .parent()
        .expect("test i/o")
        .join("evil")
        .exists());
}

#[tokio::test]
async fn hostile_key_leaves_no_temp() {
    let (src, dest) = published(2).await;
    let job = dir_job(src.path(), dest.path());
    let source = Memory::new(&[("ok.txt", b"y"), ("../evil", b"x")]);
    run_job(&job, &source, &at(60))
        .await
        .expect_err("must fail");
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test]
async fn file_and_directory_clash_fails() {
    let (src, dest) = published(2).await;
    let job = dir_job(src.path(), dest.path());
    let source = Memory::new(&[("a", b"file"), ("a/b", b"nested")]);
    let err = run_job(&job, &source, &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::KeyClash { .. }), "{err}");
    assert_eq!(latest(dest.path()), "20260101T120000Z");
}

#[tokio::test]
async fn mass_delete_refused() {
    let (src, dest) = published(10).await;
    for i in 0..6 {
        std::fs::remove_file(src.path().join(format!("files/{i}.txt"))).expect("test i/o");
    }
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            SyncError::MassDelete {
                removed: 6,
                total: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(latest(dest.path()), "20260101T120000Z");
}

#[tokio::test]
async fn mass_delete_allowed_by_flag() {
    let (src, dest) = published(10).await;
    for i in 0..6 {
        std::fs::remove_file(src.path().join(format!("files/{i}.txt"))).expect("test i/o");
    }
    let job = dir_job(src.path(), dest.path());
    let mut options = at(60);
    options.allow_mass_delete = true;
    let report = run_job(&job, &DirSource::new(src.path()), &options)
        .await
        .expect("run");
    assert_eq!(report.deleted, 6);
}

#[tokio::test]
async fn delete_under_fraction_published() {
    let (src, dest) = published(10).await;
    std::fs::remove_file(src.path().join("files/0.txt")).expect("test i/o");
    let job = dir_job(src.path(), dest.path());
    let report = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect("run");
    assert_eq!((report.deleted, report.linked), (1, 9));
}

#[tokio::test]
async fn empty_listing_publishes_nothing() {
    let (src, dest) = published(2).await;
    std::fs::remove_dir_all(src.path().join("files")).expect("test i/o");
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::EmptyListing { .. }), "{err}");
    assert_eq!(names(dest.path().join("latest/files").as_path()).len(), 2);
}

#[tokio::test]
async fn failed_listing_publishes_nothing() {
    let (src, dest) = published(2).await;
    let job = dir_job(src.path(), dest.path());
    let missing = src.path().join("no-such-dir");
    let err = run_job(&job, &DirSource::new(&missing), &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Listing { .. }), "{err}");
    assert_eq!(latest(dest.path()), "20260101T120000Z");
}

#[tokio::test]
async fn export_tree_source_rejected() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    write_tree(src.path(), &[("20260101T000000Z/mirror/index.json", b"{}")]);
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::NestedExports { .. }), "{err}");
}

#[tokio::test]
async fn held_lock_fails_second_run() {
    let (src, dest) = published(2).await;
    let _held = RunLock::acquire(dest.path()).expect("lock");
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn lock_held_by_other_process_fails_run() {
    let (src, dest) = published(2).await;
    let lock = dest.path().join(".mirror-sync.lock");
    let mut child = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .expect("flock(1) from util-linux");
    let start = Instant::now();
    while RunLock::acquire(dest.path()).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "flock never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let job = dir_job(src.path(), dest.path());
    let result = run_job(&job, &DirSource::new(src.path()), &at(60)).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(result, Err(SyncError::Locked { .. })),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_run() {
    let (src, dest) = published(2).await;
    let mut job = dir_job(src.path(), dest.path());
    job.deadline = Duration::from_secs(5);
    let source = Memory {
        stall: true,
        ..Memory::new(&[("slow.txt", b"x")])
    };
    let mut options = at(60);
    options.allow_mass_delete = true;
    let err = run_job(&job, &source, &options)
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Deadline { secs: 5 }), "{err}");
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

/// A directory source whose copies run on blocking threads and take a while, except for
/// one key, whose download fails at once.
struct SlowCopiesOneFailure {
    root: std::path::PathBuf,
    failing: &'static str,
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl mirror_sync::source::Source for SlowCopiesOneFailure {
    fn name(&self) -> String {
        self.root.display().to_string()
    }

    async fn list(&self) -> Result<Vec<mirror_sync::source::Listed>, SyncError> {
        DirSource::new(&self.root).list().await
    }

    async fn fetch(
        &self,
        entry: &mirror_sync::source::Listed,
        dest: &std::path::Path,
    ) -> Result<mirror_sync::source::Fetched, SyncError> {
        use std::sync::atomic::Ordering;
        if &*entry.key == self.failing {
            // Fail only once other copies are under way.
            for _ in 0..100 {
                if self.running.load(Ordering::SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return Err(SyncError::Download {
                key: entry.key.to_string(),
                reason: "injected failure".to_string(),
            });
        }
        let running = std::sync::Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            running.fetch_sub(1, Ordering::SeqCst);
        })
        .await
        .expect("blocking task");
        DirSource::new(&self.root).fetch(entry, dest).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_download_waits_for_running_copies() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    for i in 0..32 {
        write_tree(src.path(), &[(&format!("files/{i:02}.txt"), b"data")]);
    }
    let mut job = dir_job(src.path(), dest.path());
    job.concurrency = 16;
    let source = SlowCopiesOneFailure {
        root: src.path().to_path_buf(),
        failing: "files/00.txt",
        running: Default::default(),
    };
    let err = run_job(&job, &source, &at(0)).await.expect_err("must fail");
    assert!(matches!(err, SyncError::Download { .. }), "{err}");
    assert_eq!(
        source.running.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the run returned while copies it started were still running"
    );
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test]
async fn hidden_keys_only_publish_nothing() {
    let (src, dest) = published(2).await;
    std::fs::remove_dir_all(src.path().join("files")).expect("test i/o");
    write_tree(src.path(), &[(".hidden", b"x"), ("dir/.also-hidden", b"y")]);
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::EmptyListing { .. }), "{err}");
    assert_eq!(latest(dest.path()), "20260101T120000Z");
    assert_eq!(names(dest.path().join("latest/files").as_path()).len(), 2);
}

#[tokio::test]
async fn foreign_temp_names_kept() {
    let (src, dest) = published(2).await;
    write_tree(
        dest.path(),
        &[(".tmp-editor-swap", b"keep"), (".tmp-build/data", b"keep")],
    );
    let own = dest.path().join(".tmp-20250101T000000Z");
    write_tree(&own, &[("files/0.txt", b"half")]);
    write_tree(src.path(), &[("files/new.txt", b"new")]);
    let job = dir_job(src.path(), dest.path());
    run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect("run");
    assert!(!own.exists(), "the leftover of a run is removed");
    let foreign = std::fs::read(dest.path().join(".tmp-build/data")).expect("kept");
    assert_eq!(foreign, b"keep");
    assert!(dest.path().join(".tmp-editor-swap").is_file());
}

#[tokio::test]
async fn latest_directory_named_in_error() {
    let src = tempfile::tempdir().expect("tempdir");
    let dest = tempfile::tempdir().expect("tempdir");
    write_tree(src.path(), &[("files/0.txt", b"data")]);
    write_tree(
        dest.path(),
        &[("latest/files/0.txt", b"copied by another tool")],
    );
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("is not a symlink"), "{err}");
    assert!(dest.path().join("latest/files/0.txt").is_file());
}

#[tokio::test]
async fn destination_file_rejected() {
    let src = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    write_tree(src.path(), &[("files/0.txt", b"data")]);
    let file = dir.path().join("destfile");
    std::fs::write(&file, b"not a directory").expect("test i/o");
    let job = dir_job(src.path(), &file);
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("not a directory"), "{err}");
    assert_eq!(std::fs::read(&file).expect("kept"), b"not a directory");
}
