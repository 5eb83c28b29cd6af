//! The S3 source against moto's server mode, through a counting and fault-injecting proxy.
//! Needs `.venv/bin/moto_server` (scripts/test.sh installs it); fails when it is missing.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::moto::{self, Moto};
use common::proxy::Proxy;
use common::*;
use mirror_sync::config::{JobSettings, SourceSettings};
use mirror_sync::source::s3::S3Tuning;
use mirror_sync::{run_job, S3Source, SyncError};

const BUCKET: &str = "mirror";
const PREFIX: &str = "concelier/latest/";

fn tuning() -> S3Tuning {
    S3Tuning {
        max_retries: 2,
        init_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        retry_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
    }
}

/// Starts moto with a bucket and a proxy in front; returns a job and a source through it.
async fn setup(dest: &std::path::Path) -> (Moto, Proxy, JobSettings, S3Source) {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = Proxy::start(moto.port).await;
    let settings = Moto::settings(proxy.port, BUCKET, PREFIX);
    let source = S3Source::new(&settings, &moto::env(), tuning()).expect("client");
    let job = JobSettings::new("s3", SourceSettings::S3(settings), dest);
    (moto, proxy, job, source)
}

fn objects(n: usize, tag: &str) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("{PREFIX}mirror/f{i:04}.txt"),
                format!("{tag} {i}").into_bytes(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sync_copies_objects() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    let mut files = objects(3, "v1");
    files.push(("other/outside.txt".into(), b"not synced".to_vec()));
    moto::put_all(&moto.client(BUCKET), files).await;
    let report = run_job(&job, &source, &at(0)).await.expect("run");
    assert_eq!(report.downloaded, 3);
    assert_eq!(read_latest(dest.path(), "mirror/f0002.txt"), "v1 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_change_run_makes_no_gets() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(5, "v1")).await;
    run_job(&job, &source, &at(0)).await.expect("first");
    proxy.stats.reset();
    let report = run_job(&job, &source, &at(60)).await.expect("second");
    assert!(!report.published);
    assert_eq!((proxy.stats.gets(), proxy.stats.heads()), (0, 0));
    assert_eq!(proxy.stats.lists(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_size_rewrite_picked_up() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    let client = moto.client(BUCKET);
    moto::put_all(&client, objects(3, "v1")).await;
    run_job(&job, &source, &at(0)).await.expect("first");
    let key = format!("{PREFIX}mirror/f0001.txt");
    moto::put_all(&client, vec![(key, b"v2 1".to_vec())]).await;
    proxy.stats.reset();
    let report = run_job(&job, &source, &at(60)).await.expect("second");
    assert_eq!((report.downloaded, report.linked), (1, 2));
    assert_eq!(read_latest(dest.path(), "mirror/f0001.txt"), "v2 1");
    assert_eq!(proxy.stats.gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_keys_one_page() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(1000, "v1")).await;
    let report = run_job(&job, &source, &at(0)).await.expect("run");
    assert_eq!((report.listed, proxy.stats.lists()), (1000, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_and_one_keys_two_pages() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(1001, "v1")).await;
    let report = run_job(&job, &source, &at(0)).await.expect("run");
    assert_eq!((report.listed, proxy.stats.lists()), (1001, 2));
    assert_eq!(read_latest(dest.path(), "mirror/f1000.txt"), "v1 1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_second_page_keeps_snapshot() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    let client = moto.client(BUCKET);
    moto::put_all(&client, objects(1001, "v1")).await;
    run_job(&job, &source, &at(0)).await.expect("first");
    moto::put_all(&client, objects(1001, "v2")).await;
    proxy.stats.break_page_two.store(true, Ordering::SeqCst);
    proxy.stats.reset();
    let err = run_job(&job, &source, &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Listing { .. }), "{err}");
    assert_eq!(read_latest(dest.path(), "mirror/f0000.txt"), "v1 0");
    assert_eq!(
        proxy.stats.lists(),
        3,
        "page 1, page 2 (503, retried), page 2 (cut off)"
    );
    assert_eq!(
        proxy.stats.gets(),
        0,
        "nothing downloaded after a failed listing"
    );
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_page_without_token_keeps_snapshot() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, job, source) = setup(dest.path()).await;
    let client = moto.client(BUCKET);
    moto::put_all(&client, objects(1001, "v1")).await;
    run_job(&job, &source, &at(0)).await.expect("first");
    assert_eq!(
        proxy.stats.end_checks(),
        1,
        "each listing ends with one check"
    );
    moto::put_all(&client, objects(1001, "v2")).await;
    // Page 1 still marks itself as truncated, but has no token for page 2: the client stops
    // there, and without the check the last key would be deleted.
    proxy
        .stats
        .drop_continuation_token
        .store(true, Ordering::SeqCst);
    proxy.stats.reset();
    let err = run_job(&job, &source, &at(60))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Listing { .. }), "{err}");
    assert!(err.to_string().contains("cut short"), "{err}");
    assert_eq!(proxy.stats.lists(), 1);
    assert_eq!(proxy.stats.gets(), 0, "nothing downloaded");
    assert_eq!(read_latest(dest.path(), "mirror/f0000.txt"), "v1 0");
    assert_eq!(read_latest(dest.path(), "mirror/f1000.txt"), "v1 1000");
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_marker_of_prefix_skipped() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(2, "v1")).await;
    // The S3 client would drop the trailing slash of the key.
    put_raw(moto.port, PREFIX, b"");
    let report = run_job(&job, &source, &at(0)).await.expect("run");
    assert_eq!((report.listed, report.downloaded), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_folder_object_named_in_error() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(2, "v1")).await;
    put_raw(moto.port, &format!("{PREFIX}mirror/empty-dir/"), b"");
    let err = run_job(&job, &source, &at(0)).await.expect_err("must fail");
    assert!(matches!(err, SyncError::Download { .. }), "{err}");
    assert!(err.to_string().contains("mirror/empty-dir"), "{err}");
    assert!(err.to_string().contains("ends in `/`"), "{err}");
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prefix_publishes_nothing() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    moto::put_all(
        &moto.client(BUCKET),
        vec![("elsewhere/a".into(), b"a".to_vec())],
    )
    .await;
    let err = run_job(&job, &source, &at(0)).await.expect_err("must fail");
    assert!(matches!(err, SyncError::EmptyListing { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_object_refetched_under_new_etag() {
    use mirror_sync::Source;
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, proxy, _job, source) = setup(dest.path()).await;
    let client = moto.client(BUCKET);
    moto::put_all(&client, objects(1, "v1")).await;
    let listed = source.list().await.expect("list").remove(0);
    moto::put_all(&client, objects(1, "v2 longer")).await;
    let fetched = source
        .fetch(&listed, &dest.path().join("out"))
        .await
        .expect("fetch");
    assert_eq!(
        std::fs::read_to_string(dest.path().join("out")).expect("test i/o"),
        "v2 longer 0"
    );
    assert_ne!(fetched.etag, *listed.etag);
    assert_eq!((proxy.stats.gets(), proxy.stats.heads()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_time_from_last_modified() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    let before = std::time::SystemTime::now() - Duration::from_secs(2);
    moto::put_all(&moto.client(BUCKET), objects(3, "v1")).await;
    // A run at the real time: the objects' LastModified is not in its future.
    let now = mirror_sync::RunOptions::new(std::time::SystemTime::now());
    let report = run_job(&job, &source, &now).await.expect("run");
    let time = report.export_time.expect("an export time");
    assert_eq!(time.basis, mirror_sync::TimeBasis::NewestModified);
    let age = std::time::SystemTime::now()
        .duration_since(time.system_time())
        .expect("LastModified is not in the future");
    assert!(
        time.system_time() >= before,
        "{time:?} is before the upload"
    );
    assert!(age < Duration::from_secs(60), "{age:?}");
}

/// Stores `body` under `key` exactly as written, through a plain HTTP PUT: the S3 client
/// library cannot write keys with `..` segments, which a hostile bucket may still hold.
fn put_raw(port: u16, key: &str, body: &[u8]) {
    use std::io::{Read, Write};
    let target = key.replace('.', "%2E");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to moto");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "PUT /{BUCKET}/{target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "PUT {key}: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segment_key_named_in_error() {
    let dest = tempfile::tempdir().expect("tempdir");
    let (moto, _proxy, job, source) = setup(dest.path()).await;
    moto::put_all(&moto.client(BUCKET), objects(2, "v1")).await;
    put_raw(moto.port, &format!("{PREFIX}mirror/../evil.txt"), b"x");
    let err = run_job(&job, &source, &at(0)).await.expect_err("must fail");
    match &err {
        SyncError::InvalidKey { key, .. } => assert_eq!(key, "mirror/../evil.txt"),
        other => panic!("expected an invalid key error, got {other}"),
    }
    assert!(
        err.to_string().contains("fix the key at the source"),
        "{err}"
    );
    assert!(!dest.path().join("latest").exists());
}
