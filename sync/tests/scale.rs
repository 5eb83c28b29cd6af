//! Timings of a 10,000-file tree (directory source); run by hand:
//! `cargo test --release -p mirror-sync --test scale -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use common::*;
use mirror_sync::{run_job, DirSource};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "timing run; see the file's doc comment"]
async fn ten_thousand_files() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    for i in 0..10_000 {
        let key = format!("mirror/d{}/f{i}.json", i % 100);
        write_tree(src.path(), &[(&key, format!("{{\"n\": {i}}}").as_bytes())]);
    }
    let job = dir_job(src.path(), dest.path());
    let source = Counting::new(DirSource::new(src.path()));
    let start = Instant::now();
    run_job(&job, &source, &at(0)).await.expect("first");
    let first = start.elapsed();
    let start = Instant::now();
    let report = run_job(&job, &source, &at(60)).await.expect("no change");
    let unchanged = start.elapsed();
    write_tree(src.path(), &[("mirror/d0/f0.json", b"{\"n\": -1}")]);
    let start = Instant::now();
    let changed = run_job(&job, &source, &at(120)).await.expect("one change");
    let one = start.elapsed();
    eprintln!("first sync {first:?}; no-change run {unchanged:?}; one changed file {one:?}");
    assert!(!report.published);
    assert_eq!((changed.downloaded, changed.linked), (1, 9_999));
}
