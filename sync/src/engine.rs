//! One run of one job: lock, list, plan, build, verify, publish, prune.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::build::{build, BuildContext, Plan};
use crate::config::JobSettings;
use crate::error::SyncError;
use crate::export_id;
use crate::export_time::{self, ExportTime};
use crate::key::check_listing;
use crate::lock::RunLock;
use crate::manifest::{self, FileEntry, Manifest};
use crate::progress::Progress;
use crate::publish::{self, Leftovers, PrunePolicy};
use crate::source::{DirSource, Listed, Source};
use crate::verify::{verify_snapshot, Verified};

/// Run settings beyond the job's own.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Publishes even when more than `max_delete_fraction` of the files would go.
    pub allow_mass_delete: bool,
    /// The time of the run's start: names the snapshot and ages old ones.
    pub now: SystemTime,
    /// Draws a progress bar on standard error (pass whether it is a terminal).
    pub progress: bool,
    /// Test hook: stops the run after this many downloads as a crash would, leaving its
    /// temporary files behind.
    #[doc(hidden)]
    pub crash_after_downloads: Option<usize>,
}

impl RunOptions {
    /// Returns the defaults for a run starting at `now`.
    pub fn new(now: SystemTime) -> Self {
        Self {
            allow_mass_delete: false,
            now,
            progress: false,
            crash_after_downloads: None,
        }
    }
}

/// The result of a successful run.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    pub job: String,
    /// The snapshot `latest` names after the run.
    pub export_id: String,
    /// Whether a new snapshot was published (false: the source had not changed).
    pub published: bool,
    /// Objects listed and kept.
    pub listed: usize,
    pub downloaded: usize,
    pub linked: usize,
    /// Files of the previous snapshot that the new one lacks.
    pub deleted: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    pub verified: Verified,
    /// When the source made the export that `latest` holds after the run (see
    /// [`crate::export_time`]); `None` when the source gives no time at all.
    pub export_time: Option<ExportTime>,
    /// Old snapshots removed.
    pub pruned: Vec<String>,
    pub duration: Duration,
}

impl JobReport {
    /// Returns the report of a run of `job` that listed `listed` objects and published
    /// nothing, leaving `export_id` as `latest`.
    pub fn unpublished(job: &str, export_id: &str, listed: usize) -> Self {
        Self {
            job: job.to_string(),
            export_id: export_id.to_string(),
            published: false,
            listed,
            downloaded: 0,
            linked: 0,
            deleted: 0,
            bytes: 0,
            verified: Verified::default(),
            export_time: None,
            pruned: Vec::new(),
            duration: Duration::ZERO,
        }
    }
}

/// Runs `job` once from `source`.
///
/// On any error nothing is published and nothing is deleted: `latest` and the snapshot it
/// names are untouched, and the new snapshot's temporary directory is removed (except after
/// the crash test hook, whose leftovers the next run removes).
pub async fn run_job(
    job: &JobSettings,
    source: &dyn Source,
    options: &RunOptions,
) -> Result<JobReport, SyncError> {
    let started = Instant::now();
    let root = job.destination.as_path();
    if root.exists() && !root.is_dir() {
        return Err(SyncError::io(
            "using as the destination",
            root,
            std::io::Error::other("it is not a directory; point `destination` at a directory"),
        ));
    }
    std::fs::create_dir_all(root).map_err(|e| SyncError::io("creating", root, e))?;
    let _lock = RunLock::acquire(root)?;
    tracing::info!(job = %job.name, source = %source.name(), root = %root.display(), "sync run started");
    publish::remove_leftovers(root, Leftovers::Interrupted)?;
    let current = publish::current(root)?;
    let progress = Progress::new(options.progress, &job.name);
    let staged = tokio::time::timeout(
        job.deadline,
        stage(job, source, options, current.as_deref(), &progress, started),
    )
    .await
    .unwrap_or(Err(SyncError::Deadline {
        secs: job.deadline.as_secs(),
    }));
    progress.finish();
    let mut report = match staged {
        Ok(report) => report,
        Err(e) => {
            if !matches!(e, SyncError::Interrupted { .. }) {
                // The run's own error matters more than a failed clean-up; the next run
                // removes what is left.
                if let Err(cleanup) = publish::remove_leftovers(root, Leftovers::FailedRun) {
                    tracing::warn!(error = %cleanup, "could not clean up after the failed run");
                }
            }
            return Err(e);
        }
    };
    if report.published {
        let staging = publish::staging_dir(root, &report.export_id);
        publish::install(root, &staging, &report.export_id)?;
    }
    let policy = PrunePolicy {
        keep: job.keep_snapshots,
        grace: job.grace,
        pinned: &job.pinned,
        now: options.now + started.elapsed(),
    };
    report.pruned = publish::prune(root, &report.export_id, policy)?;
    report.duration = started.elapsed();
    log_report(&report);
    Ok(report)
}

/// Lists, plans, builds and verifies the new snapshot in its staging directory.
async fn stage(
    job: &JobSettings,
    source: &dyn Source,
    options: &RunOptions,
    current: Option<&str>,
    progress: &Progress,
    started: Instant,
) -> Result<JobReport, SyncError> {
    let root = job.destination.as_path();
    let listing = source.list().await?;
    if listing.is_empty() {
        return Err(SyncError::EmptyListing {
            source_name: source.name(),
        });
    }
    let listing = check_listing(&source.name(), listing)?;
    if listing.is_empty() {
        return Err(SyncError::EmptyListing {
            source_name: source.name(),
        });
    }
    let listed = listing.len();
    tracing::info!(job = %job.name, listed, "listing complete");
    let newest_modified = export_time::newest_modified(&listing);
    let previous = previous_files(root, current).await?;
    let plan = plan(listing, previous.as_ref());
    let mut report = JobReport::unpublished(&job.name, current.unwrap_or_default(), listed);
    if let Some(Previous::Manifest(m)) = &previous {
        if plan.download.is_empty() && plan.removed == 0 {
            // The published snapshot matches the source, so its export time still holds; a
            // manifest from before export times were recorded falls back to the listing.
            let now = options.now + started.elapsed();
            let fallback = ExportTime::choose(None, newest_modified, now);
            report.export_time = m.export_time.map(|time| time.not_after(now)).or(fallback);
            return Ok(report);
        }
    }
    check_deletions(job, options, &plan, previous.as_ref())?;
    let id = export_id::next(options.now, publish::newest(root)?.as_deref());
    let staging = publish::staging_dir(root, &id);
    let current_dir = current.map(|id| root.join(id));
    let ctx = BuildContext {
        staging: &staging,
        current: current_dir.as_deref(),
        source,
        concurrency: job.concurrency,
        progress,
        crash_after: options.crash_after_downloads,
    };
    let removed = plan.removed;
    let built = build(&ctx, plan).await?;
    let verified = verify(&staging, &built.files, job).await?;
    let export_time = ExportTime::choose(
        verified.generated_at,
        newest_modified,
        options.now + started.elapsed(),
    );
    let manifest = Manifest {
        format: manifest::FORMAT,
        export_id: id.clone(),
        source: source.name(),
        published_unix: unix_secs(options.now + started.elapsed()),
        export_time,
        files: built.files,
    };
    manifest::write(&staging, &manifest)
        .map_err(|e| SyncError::io("writing the manifest into", &staging, e))?;
    report.export_id = id;
    report.published = true;
    report.downloaded = built.downloaded;
    report.linked = built.linked;
    report.deleted = removed;
    report.bytes = built.bytes;
    report.verified = verified;
    report.export_time = export_time;
    Ok(report)
}

/// The known facts about the current snapshot's files.
enum Previous {
    /// Its sync manifest.
    Manifest(Manifest),
    /// Only its keys: it was not made by this task, or its manifest is unreadable.
    Keys(HashSet<String>),
}

async fn previous_files(root: &Path, current: Option<&str>) -> Result<Option<Previous>, SyncError> {
    let Some(id) = current else {
        return Ok(None);
    };
    let dir = root.join(id);
    match manifest::read(&dir) {
        Ok(Some(m)) => return Ok(Some(Previous::Manifest(m))),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the current snapshot's manifest; every file will be downloaded")
        }
    }
    let keys = DirSource::new(&dir)
        .list()
        .await?
        .into_iter()
        .filter(|l| !l.key.split('/').any(|s| s.starts_with('.')))
        .map(|l| l.key.into_string())
        .collect();
    Ok(Some(Previous::Keys(keys)))
}

/// Sorts the listing into links and downloads, and counts the files that go away.
fn plan(listing: Vec<Listed>, previous: Option<&Previous>) -> Plan {
    let mut plan = Plan::default();
    let mut kept = 0usize;
    let old: std::collections::HashMap<&str, &FileEntry> = match previous {
        Some(Previous::Manifest(m)) => m.files.iter().map(|f| (f.key.as_str(), f)).collect(),
        _ => Default::default(),
    };
    let total = match previous {
        Some(Previous::Manifest(m)) => m.files.len(),
        Some(Previous::Keys(keys)) => keys.len(),
        None => 0,
    };
    for entry in listing {
        let known = match previous {
            Some(Previous::Keys(keys)) => keys.contains(&*entry.key),
            _ => old.contains_key(&*entry.key),
        };
        kept += usize::from(known);
        match old.get(&*entry.key) {
            Some(f) if f.size == entry.size && *f.etag == *entry.etag => {
                let f = (*f).clone();
                plan.link.push((entry, f));
            }
            _ => plan.download.push(entry),
        }
    }
    plan.removed = total - kept;
    plan
}

fn check_deletions(
    job: &JobSettings,
    options: &RunOptions,
    plan: &Plan,
    previous: Option<&Previous>,
) -> Result<(), SyncError> {
    let total = match previous {
        Some(Previous::Manifest(m)) => m.files.len(),
        Some(Previous::Keys(keys)) => keys.len(),
        None => 0,
    };
    let too_many = total > 0 && plan.removed as f64 / total as f64 > job.max_delete_fraction;
    if too_many && !options.allow_mass_delete {
        return Err(SyncError::MassDelete {
            removed: plan.removed,
            total,
            max_fraction: job.max_delete_fraction,
        });
    }
    Ok(())
}

async fn verify(
    staging: &Path,
    files: &[FileEntry],
    job: &JobSettings,
) -> Result<Verified, SyncError> {
    let staging = staging.to_path_buf();
    let files = files.to_vec();
    let key = job.public_key.clone();
    tokio::task::spawn_blocking(move || verify_snapshot(&staging, &files, key.as_deref()))
        .await
        .map_err(|e| SyncError::Verify {
            key: String::new(),
            reason: format!("the verification task failed: {e}"),
        })?
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn log_report(r: &JobReport) {
    tracing::info!(
        job = %r.job,
        export_id = %r.export_id,
        published = r.published,
        listed = r.listed,
        downloaded = r.downloaded,
        linked = r.linked,
        deleted = r.deleted,
        bytes = r.bytes,
        digests = r.verified.digests,
        signatures = r.verified.signatures,
        export_time_unix = r.export_time.map(|t| t.unix),
        export_time_basis = r.export_time.map(|t| t.basis.as_str()),
        pruned = ?r.pruned,
        duration_ms = r.duration.as_millis() as u64,
        "sync run finished"
    );
}
