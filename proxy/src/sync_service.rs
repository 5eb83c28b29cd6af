//! Runs the sync jobs of the gateway's `[sync]` section inside the gateway, on a schedule.
//!
//! Every job runs once shortly after the server starts, then again after each pause of
//! `interval_secs` ± a random `jitter_secs`. Runs of this process never overlap (they go one
//! after the other); the sync lock keeps other processes out. Each finished run is counted in
//! the metrics, and the monitor's sync lag hook makes `/readyz` fail when the newest
//! successful run is older than `max_lag_secs`.
//!
//! The lag of a job is the time since its last successful run started: the sources give no
//! export time, and a successful run means the served data matched the source at its listing,
//! just after the start. Until its first success in this process, a job's data dates from the
//! `published_unix` of its current snapshot's manifest, else from the service's start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use mirror_sync::{DirSource, JobReport, JobSettings, RunOptions, S3Source, SourceSettings};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};

use crate::status::Monitor;

/// Pause between the server's start and the first run of every job.
pub const FIRST_RUN_DELAY: Duration = Duration::from_secs(1);

/// Reads the `[sync]` section of the gateway's config file at `path` and returns the service
/// that runs its jobs, with the monitor's sync lag hook installed. Returns `Ok(None)`, and
/// installs nothing, when the file has no `[sync]` section.
///
/// Errors: the file cannot be read or parsed, or `[sync]` is invalid; one message per problem,
/// naming the key, the value and the fix.
pub fn from_gateway_config(
    path: &Path,
    monitor: Arc<Monitor>,
) -> Result<Option<GenBackgroundService<SyncScheduler>>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "{}: cannot read the config file: {e}",
            path.display()
        )]
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| vec![format!("{}: invalid TOML: {e}", path.display())])?;
    if !table.contains_key("sync") {
        return Ok(None);
    }
    let config = mirror_sync::config::load_str(&text, path)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let scheduler = SyncScheduler::new(config, monitor, SystemTime::now());
    Ok(Some(background_service("sync scheduler", scheduler)))
}

/// The background task running the sync jobs; see the module documentation.
pub struct SyncScheduler {
    config: mirror_sync::SyncConfig,
    monitor: Arc<Monitor>,
    freshness: Arc<Freshness>,
}

impl SyncScheduler {
    /// Creates the scheduler of `config`'s jobs and installs the monitor's sync lag hook, with
    /// `started` as the service's start time.
    pub fn new(
        config: mirror_sync::SyncConfig,
        monitor: Arc<Monitor>,
        started: SystemTime,
    ) -> Self {
        let jobs = config
            .jobs
            .iter()
            .map(|job| (job.name.clone(), JobFreshness::seeded(published_time(job))))
            .collect();
        let freshness = Arc::new(Freshness {
            started,
            jobs: Mutex::new(jobs),
        });
        let hook = Arc::clone(&freshness);
        monitor
            .health
            .set_sync_lag_provider(config.max_lag, move || hook.lag(SystemTime::now()));
        Self {
            config,
            monitor,
            freshness,
        }
    }

    /// Runs `job` once, records its outcome and logs it.
    async fn run(&self, job: &JobSettings) {
        let started = SystemTime::now();
        let result = run_configured(job, &RunOptions::new(started)).await;
        let ok = result.is_ok();
        let now = SystemTime::now();
        let lag = self.freshness.record(&job.name, ok.then_some(started), now);
        self.monitor
            .metrics
            .sync_run(&job.name, ok, lag.as_secs_f64());
        let lag_secs = lag.as_secs();
        match result {
            Ok(report) => tracing::info!(
                job = %job.name,
                export_id = %report.export_id,
                published = report.published,
                lag_secs,
                "scheduled sync run succeeded"
            ),
            Err(error) => tracing::error!(
                job = %job.name,
                %error,
                lag_secs,
                "scheduled sync run failed; the published export is unchanged"
            ),
        }
    }
}

#[async_trait]
impl BackgroundService for SyncScheduler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut pause = FIRST_RUN_DELAY;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            for job in &self.config.jobs {
                tokio::select! {
                    () = self.run(job) => {}
                    _ = shutdown.changed() => {
                        tracing::info!(job = %job.name, "sync run stopped by the shutdown; the next run removes its leftovers");
                        return;
                    }
                }
            }
            pause = next_pause(
                self.config.interval,
                self.config.jitter,
                rand::random::<f64>(),
            );
        }
    }
}

/// Returns the pause before the next round of runs: `interval - jitter` plus `2 * jitter`
/// times `unit`, a random number in `[0, 1]` (clamped into it).
pub fn next_pause(interval: Duration, jitter: Duration, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    interval.saturating_sub(jitter) + (jitter * 2).mul_f64(unit)
}

/// The data age of every job, shared by the scheduler and the lag hook.
struct Freshness {
    started: SystemTime,
    jobs: Mutex<BTreeMap<String, JobFreshness>>,
}

#[derive(Debug, Clone, Copy)]
struct JobFreshness {
    /// When the job's served data last matched its source, when known.
    fresh_since: Option<SystemTime>,
    /// Whether a run finished in this process; the lag counts only from then.
    ran: bool,
}

impl JobFreshness {
    fn seeded(fresh_since: Option<SystemTime>) -> Self {
        Self {
            fresh_since,
            ran: false,
        }
    }
}

impl Freshness {
    /// Records a finished run of `job` (`success` is its start when it succeeded) and returns
    /// the job's lag at `now`.
    fn record(&self, job: &str, success: Option<SystemTime>, now: SystemTime) -> Duration {
        let mut jobs = self.jobs.lock();
        let entry = jobs
            .entry(job.to_string())
            .or_insert(JobFreshness::seeded(None));
        entry.ran = true;
        if success.is_some() {
            entry.fresh_since = success;
        }
        age(entry.fresh_since.unwrap_or(self.started), now)
    }

    /// Returns the largest lag at `now` among the jobs that finished a run, or `None` before
    /// any did.
    fn lag(&self, now: SystemTime) -> Option<Duration> {
        let jobs = self.jobs.lock();
        jobs.values()
            .filter(|job| job.ran)
            .map(|job| age(job.fresh_since.unwrap_or(self.started), now))
            .max()
    }
}

fn age(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

/// Builds the job's source and runs the job once.
async fn run_configured(job: &JobSettings, options: &RunOptions) -> Result<JobReport, String> {
    match &job.source {
        SourceSettings::Directory { path } => {
            let source = DirSource::new(path);
            mirror_sync::run_job(job, &source, options).await
        }
        SourceSettings::S3(settings) => {
            // Read per run, so that rotated credentials in the environment apply.
            let env: Vec<(String, String)> = std::env::vars().collect();
            let source = S3Source::new(settings, &env, Default::default())
                .map_err(|reason| format!("cannot set up the S3 client: {reason}"))?;
            mirror_sync::run_job(job, &source, options).await
        }
    }
    .map_err(|e| e.to_string())
}

/// Returns when the job's current snapshot was published, from its manifest; `None` when
/// there is no snapshot or it has no readable manifest.
fn published_time(job: &JobSettings) -> Option<SystemTime> {
    let root = &job.destination;
    let id = mirror_sync::publish::current(root).ok()??;
    let manifest = mirror_sync::manifest::read(&root.join(id)).ok()??;
    Some(UNIX_EPOCH + Duration::from_secs(manifest.published_unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn freshness(jobs: &[(&str, Option<SystemTime>)]) -> Freshness {
        let jobs = jobs
            .iter()
            .map(|(name, since)| (name.to_string(), JobFreshness::seeded(*since)))
            .collect();
        Freshness {
            started: UNIX_EPOCH + MINUTE,
            jobs: Mutex::new(jobs),
        }
    }

    #[test]
    fn next_pause_low_end() {
        assert_eq!(
            next_pause(MINUTE * 5, MINUTE / 2, 0.0),
            MINUTE * 5 - MINUTE / 2
        );
    }

    #[test]
    fn next_pause_high_end() {
        assert_eq!(
            next_pause(MINUTE * 5, MINUTE / 2, 1.0),
            MINUTE * 5 + MINUTE / 2
        );
    }

    #[test]
    fn next_pause_clamps_unit() {
        assert_eq!(next_pause(MINUTE, Duration::ZERO, 7.0), MINUTE);
    }

    #[test]
    fn lag_none_before_first_run() {
        let state = freshness(&[("concelier", Some(UNIX_EPOCH))]);
        assert_eq!(state.lag(UNIX_EPOCH + MINUTE * 10), None);
    }

    #[test]
    fn record_success_resets_lag() {
        let state = freshness(&[("concelier", Some(UNIX_EPOCH))]);
        let start = UNIX_EPOCH + MINUTE * 10;
        let lag = state.record("concelier", Some(start), start + MINUTE);
        assert_eq!(lag, MINUTE);
    }

    #[test]
    fn record_failure_keeps_seed() {
        let state = freshness(&[("concelier", Some(UNIX_EPOCH))]);
        let lag = state.record("concelier", None, UNIX_EPOCH + MINUTE * 10);
        assert_eq!(lag, MINUTE * 10);
    }

    #[test]
    fn record_failure_without_seed_counts_from_start() {
        let state = freshness(&[("concelier", None)]);
        let lag = state.record("concelier", None, UNIX_EPOCH + MINUTE * 10);
        assert_eq!(lag, MINUTE * 9);
    }

    #[test]
    fn lag_is_largest_of_ran_jobs() {
        let state = freshness(&[("concelier", None), ("excititor", None)]);
        state.record(
            "concelier",
            Some(UNIX_EPOCH + MINUTE * 8),
            UNIX_EPOCH + MINUTE * 8,
        );
        state.record(
            "excititor",
            Some(UNIX_EPOCH + MINUTE * 2),
            UNIX_EPOCH + MINUTE * 2,
        );
        assert_eq!(state.lag(UNIX_EPOCH + MINUTE * 10), Some(MINUTE * 8));
    }
}
