//! How old the data each sync job serves is, for `/readyz`, the status page and the metrics.
//!
//! A job's lag is the time since the source made the export in the job's `latest` snapshot
//! (see `mirror_sync::export_time`): it grows while runs fail or the source publishes nothing
//! new. Until a job's export time is known (no snapshot with one yet), its lag counts from
//! when the job was configured in this process.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use mirror_sync::JobSettings;
use parking_lot::Mutex;

/// The data age of every configured job, shared by the scheduler, reloads and the lag hook.
#[derive(Debug, Default)]
pub struct Freshness {
    jobs: Mutex<BTreeMap<String, JobFreshness>>,
}

#[derive(Debug, Clone, Copy)]
struct JobFreshness {
    /// When the source made the export the job serves, when known.
    export_time: Option<SystemTime>,
    /// When the job was configured in this process: the lag counts from here until the
    /// export time is known.
    since: SystemTime,
    /// Whether a run finished in this process; the lag counts for readiness only from then.
    ran: bool,
}

impl Freshness {
    /// Makes `jobs` the tracked jobs at `now`: drops the others and seeds new ones with
    /// the export time of their current snapshot, read from its manifest.
    pub fn set_jobs(&self, jobs: &[JobSettings], now: SystemTime) {
        let mut tracked = self.jobs.lock();
        tracked.retain(|name, _| jobs.iter().any(|job| job.name == *name));
        for job in jobs {
            tracked
                .entry(job.name.clone())
                .or_insert_with(|| JobFreshness {
                    export_time: current_export_time(job),
                    since: now,
                    ran: false,
                });
        }
    }

    /// Records a finished run of `job`: `export_time` is the export time it reported when it
    /// succeeded. Returns the job's lag and export time at `now`, or `None` when the job is
    /// no longer configured.
    pub fn record(
        &self,
        job: &str,
        export_time: Option<SystemTime>,
        now: SystemTime,
    ) -> Option<(Duration, Option<SystemTime>)> {
        let mut jobs = self.jobs.lock();
        let entry = jobs.get_mut(job)?;
        entry.ran = true;
        if export_time.is_some() {
            entry.export_time = export_time;
        }
        Some((entry.lag(now), entry.export_time))
    }

    /// Returns the largest lag at `now` among the jobs that finished a run, or `None` before
    /// any did.
    pub fn lag(&self, now: SystemTime) -> Option<Duration> {
        let jobs = self.jobs.lock();
        jobs.values()
            .filter(|job| job.ran)
            .map(|job| job.lag(now))
            .max()
    }
}

impl JobFreshness {
    fn lag(&self, now: SystemTime) -> Duration {
        let since = self.export_time.unwrap_or(self.since);
        now.duration_since(since).unwrap_or(Duration::ZERO)
    }
}

/// Returns the export time recorded in the manifest of the job's current snapshot; `None`
/// when there is no snapshot, no readable manifest, or no time in it.
fn current_export_time(job: &JobSettings) -> Option<SystemTime> {
    let root = &job.destination;
    let id = mirror_sync::publish::current(root).ok()??;
    let manifest = mirror_sync::manifest::read(&root.join(id)).ok()??;
    manifest.export_time.map(|time| time.system_time())
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use mirror_sync::SourceSettings;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn job(name: &str, dir: &std::path::Path) -> JobSettings {
        let source = SourceSettings::Directory {
            path: dir.join("source"),
        };
        JobSettings::new(name, source, dir.join(name))
    }

    fn freshness(names: &[&str]) -> (Freshness, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let jobs: Vec<JobSettings> = names.iter().map(|n| job(n, dir.path())).collect();
        let state = Freshness::default();
        state.set_jobs(&jobs, UNIX_EPOCH + MINUTE);
        (state, dir)
    }

    #[test]
    fn lag_none_before_first_run() {
        let (state, _dir) = freshness(&["concelier"]);
        assert_eq!(state.lag(UNIX_EPOCH + MINUTE * 10), None);
    }

    #[test]
    fn lag_counts_from_export_time() {
        let (state, _dir) = freshness(&["concelier"]);
        let exported = UNIX_EPOCH + MINUTE * 4;
        let now = UNIX_EPOCH + MINUTE * 10;
        let recorded = state.record("concelier", Some(exported), now);
        assert_eq!(recorded, Some((MINUTE * 6, Some(exported))));
        assert_eq!(state.lag(now + MINUTE), Some(MINUTE * 7));
    }

    #[test]
    fn failed_run_keeps_export_time() {
        let (state, _dir) = freshness(&["concelier"]);
        let exported = UNIX_EPOCH + MINUTE * 4;
        state.record("concelier", Some(exported), UNIX_EPOCH + MINUTE * 5);
        let recorded = state.record("concelier", None, UNIX_EPOCH + MINUTE * 20);
        assert_eq!(recorded, Some((MINUTE * 16, Some(exported))));
    }

    #[test]
    fn unknown_export_time_counts_from_configured() {
        let (state, _dir) = freshness(&["concelier"]);
        let recorded = state.record("concelier", None, UNIX_EPOCH + MINUTE * 10);
        assert_eq!(recorded, Some((MINUTE * 9, None)));
    }

    #[test]
    fn lag_is_largest_of_ran_jobs() {
        let (state, _dir) = freshness(&["concelier", "excititor"]);
        let now = UNIX_EPOCH + MINUTE * 10;
        state.record("concelier", Some(UNIX_EPOCH + MINUTE * 2), now);
        state.record("excititor", Some(UNIX_EPOCH + MINUTE * 8), now);
        assert_eq!(state.lag(now), Some(MINUTE * 8));
    }

    #[test]
    fn removed_job_stops_counting() {
        let (state, dir) = freshness(&["concelier", "excititor"]);
        let now = UNIX_EPOCH + MINUTE * 10;
        state.record("concelier", Some(UNIX_EPOCH), now);
        state.set_jobs(&[job("excititor", dir.path())], now);
        assert_eq!(state.lag(now), None);
        assert_eq!(state.record("concelier", None, now), None);
    }

    #[test]
    fn seed_reads_manifest_export_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = job("concelier", dir.path());
        let snapshot = job.destination.join("20260101T120000Z");
        std::fs::create_dir_all(&snapshot).expect("mkdir");
        std::os::unix::fs::symlink("20260101T120000Z", job.destination.join("latest"))
            .expect("latest");
        let manifest = mirror_sync::manifest::Manifest {
            format: mirror_sync::manifest::FORMAT,
            export_id: "20260101T120000Z".into(),
            source: "test".into(),
            published_unix: 600,
            export_time: Some(mirror_sync::ExportTime {
                unix: 120,
                basis: mirror_sync::TimeBasis::GeneratedAt,
            }),
            files: Vec::new(),
        };
        mirror_sync::manifest::write(&snapshot, &manifest).expect("write manifest");
        let state = Freshness::default();
        state.set_jobs(std::slice::from_ref(&job), UNIX_EPOCH + MINUTE * 10);
        let recorded = state.record("concelier", None, UNIX_EPOCH + MINUTE * 10);
        assert_eq!(recorded, Some((MINUTE * 8, Some(UNIX_EPOCH + MINUTE * 2))));
    }
}
