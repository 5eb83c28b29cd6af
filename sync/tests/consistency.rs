//! A reader hammering the tree while 20 snapshots are published reads only whole snapshots.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use mirror_sync::manifest;
use mirror_sync::{run_job, DirSource};

const FILES: usize = 12;

fn generation(dir: &Path, gen: usize) {
    for i in 0..FILES {
        let body = format!("gen {gen} file {i} {}", "x".repeat(i * 37 + gen));
        write_tree(
            dir,
            &[(&format!("mirror/d{}/f{i}.json", i % 3), body.as_bytes())],
        );
    }
}

/// Reads the snapshot `latest` names once; returns an error naming any inconsistency.
fn read_once(root: &Path) -> Result<bool, String> {
    let Ok(id) = std::fs::read_link(root.join("latest")) else {
        return Ok(false);
    };
    let dir = root.join(id);
    let m = manifest::read(&dir)?.ok_or("a published snapshot has no manifest")?;
    let mut gens = std::collections::HashSet::new();
    for file in &m.files {
        let data = std::fs::read(dir.join(&file.key)).map_err(|e| format!("{}: {e}", file.key))?;
        if sha256_hex(&data) != file.sha256 {
            return Err(format!(
                "{}/{} does not match its manifest",
                m.export_id, file.key
            ));
        }
        gens.insert(
            String::from_utf8_lossy(&data)
                .split(' ')
                .nth(1)
                .map(str::to_string),
        );
    }
    if gens.len() != 1 || m.files.len() != FILES {
        return Err(format!("{} mixes generations {gens:?}", m.export_id));
    }
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_sees_only_whole_snapshots() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let job = dir_job(src.path(), dest.path());
    let stop = Arc::new(AtomicBool::new(false));
    let root = dest.path().to_path_buf();
    let flag = stop.clone();
    let reader = std::thread::spawn(move || {
        let (mut reads, mut errors) = (0usize, Vec::new());
        while !flag.load(Ordering::SeqCst) && reads < 1_000_000 {
            match read_once(&root) {
                Ok(read) => reads += usize::from(read),
                Err(e) => errors.push(e),
            }
        }
        (reads, errors)
    });
    for gen in 0..20 {
        generation(src.path(), gen);
        let report = run_job(&job, &DirSource::new(src.path()), &at(gen as u64 * 60)).await;
        assert!(report.expect("run").published, "run {gen}");
    }
    stop.store(true, Ordering::SeqCst);
    let (reads, errors) = reader.join().expect("reader");
    assert_eq!(errors, Vec::<String>::new());
    assert!(reads > 0, "the reader never saw a snapshot");
}
