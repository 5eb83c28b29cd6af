//! Runs the sync jobs of the gateway's `[sync]` section inside the gateway, on a schedule that
//! a config reload can change.
//!
//! Every job runs once shortly after the server starts (or after a reload adds it), then
//! again after each pause of `interval_secs` ± a random `jitter_secs` (see [`schedule`]).
//! Runs of this process never overlap: they go one after the other, and the sync lock keeps
//! other processes out. A reload hands the new section to the scheduler through
//! [`SyncControl::apply`]; a run in progress finishes on the settings it started with, and
//! the next run uses the new ones.
//!
//! Each finished run is counted in the metrics, and the monitor's sync lag hook makes
//! `/readyz` fail when a job's data is older than `max_lag_secs`, measured from the source
//! export's time (see [`freshness`]).

mod freshness;
pub mod schedule;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mirror_sync::{DirSource, JobReport, JobSettings, RunOptions, S3Source, SourceSettings};
use mirror_sync::{SyncConfig, SyncError};
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::status::Monitor;
use freshness::Freshness;
pub use schedule::next_pause;
use schedule::Schedule;

/// Pause between a job's appearance (the server's start, or a reload that adds the job) and
/// its first run.
pub const FIRST_RUN_DELAY: Duration = Duration::from_secs(1);

/// Builds the gateway's sync service for `config` (`None`: no `[sync]` section, so the
/// scheduler idles until a reload brings one). Returns the handle that reloads use and the
/// background service that runs the jobs.
pub fn service(
    config: Option<SyncConfig>,
    monitor: Arc<Monitor>,
) -> (Arc<SyncControl>, GenBackgroundService<SyncScheduler>) {
    let (control, scheduler) = scheduler(config, monitor, Arc::new(SourceRunner));
    (control, background_service("sync scheduler", scheduler))
}

/// Builds the control handle and the scheduler that runs jobs with `runner`.
fn scheduler(
    config: Option<SyncConfig>,
    monitor: Arc<Monitor>,
    runner: Arc<dyn JobRunner>,
) -> (Arc<SyncControl>, SyncScheduler) {
    let (sender, receiver) = watch::channel(None);
    let freshness = Arc::new(Freshness::default());
    let control = Arc::new(SyncControl {
        sender,
        freshness: Arc::clone(&freshness),
        monitor: Arc::clone(&monitor),
    });
    control.apply(config);
    let scheduler = SyncScheduler {
        configs: receiver,
        freshness,
        monitor,
        runner,
    };
    (control, scheduler)
}

/// Runs one job once. The gateway's runner, [`SourceRunner`], builds the job's source and
/// calls `mirror_sync::run_job`; tests put a stalling runner in its place.
#[async_trait]
trait JobRunner: Send + Sync {
    async fn run(&self, job: &JobSettings, options: &RunOptions) -> Result<JobReport, String>;
}

/// Runs jobs from their configured source.
struct SourceRunner;

#[async_trait]
impl JobRunner for SourceRunner {
    async fn run(&self, job: &JobSettings, options: &RunOptions) -> Result<JobReport, String> {
        run_configured(job, options).await
    }
}

/// The handle through which a reload changes the sync jobs and schedule.
pub struct SyncControl {
    sender: watch::Sender<Option<Arc<SyncConfig>>>,
    freshness: Arc<Freshness>,
    monitor: Arc<Monitor>,
}

impl SyncControl {
    /// Makes `config` the running `[sync]` section (`None`: no section, so no job runs).
    ///
    /// The lag hook changes at once: it is installed with the new `max_lag_secs`, or removed
    /// when there is no section. The scheduler picks up the jobs and timing before it starts
    /// its next run.
    pub fn apply(&self, config: Option<SyncConfig>) {
        let jobs = config.as_ref().map_or(&[][..], |c| c.jobs.as_slice());
        let previous = self.sender.borrow().clone();
        for old in previous.iter().flat_map(|c| c.jobs.iter()) {
            if !jobs.iter().any(|job| job.name == old.name) {
                self.monitor.metrics.remove_sync_job(&old.name);
            }
        }
        self.freshness.set_jobs(jobs, SystemTime::now());
        match &config {
            Some(config) => {
                let hook = Arc::clone(&self.freshness);
                self.monitor
                    .health
                    .set_sync_lag_provider(config.max_lag, move || hook.lag(SystemTime::now()));
            }
            None => self.monitor.health.clear_sync_lag_provider(),
        }
        self.sender.send_replace(config.map(Arc::new));
    }
}

/// The background task running the sync jobs; see the module documentation.
pub struct SyncScheduler {
    configs: watch::Receiver<Option<Arc<SyncConfig>>>,
    freshness: Arc<Freshness>,
    monitor: Arc<Monitor>,
    runner: Arc<dyn JobRunner>,
}

impl SyncScheduler {
    /// Runs `job` once, records its outcome and logs it.
    async fn run(&self, job: &JobSettings) {
        let started = SystemTime::now();
        // A panic in a run must not end the scheduler, which would stop every later run.
        let options = RunOptions::new(started);
        let run = std::panic::AssertUnwindSafe(self.runner.run(job, &options));
        let result = match futures::FutureExt::catch_unwind(run).await {
            Ok(result) => result,
            Err(panic) => Err(format!(
                "the run stopped with a panic ({}); the next run is scheduled as usual",
                panic_message(panic.as_ref())
            )),
        };
        let export_time = match &result {
            Ok(report) => report.export_time.map(|time| time.system_time()),
            Err(_) => None,
        };
        let now = SystemTime::now();
        let recorded = self.freshness.record(&job.name, export_time, now);
        if let Some((lag, export_time)) = recorded {
            let metrics = &self.monitor.metrics;
            metrics.sync_run(&job.name, result.is_ok(), lag.as_secs_f64(), export_time);
        }
        let lag_secs = recorded.map(|(lag, _)| lag.as_secs());
        match result {
            Ok(report) => tracing::info!(
                job = %job.name,
                export_id = %report.export_id,
                published = report.published,
                export_time_unix = report.export_time.map(|t| t.unix),
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
        let mut configs = self.configs.clone();
        let mut schedule = Schedule::default();
        let mut current = configs.borrow_and_update().clone();
        schedule.apply(current.as_deref(), Instant::now(), rand::random());
        // False once every control handle is gone: no reload can change the jobs again.
        let mut controlled = true;
        loop {
            let due = schedule.next_due();
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                changed = configs.changed(), if controlled => {
                    match changed {
                        Ok(()) => {
                            let config = configs.borrow_and_update().clone();
                            apply_logged(&mut schedule, current.as_deref(), config.as_deref());
                            current = config;
                        }
                        Err(_) => controlled = false,
                    }
                    continue;
                }
                () = sleep_until(due) => {}
            }
            let Some(job) = schedule.due(Instant::now()) else {
                continue;
            };
            if !self.run_or_stop(&job, &mut shutdown).await {
                return;
            }
            schedule.finished(&job.name, Instant::now(), rand::random());
        }
    }
}

impl SyncScheduler {
    /// Runs `job` until it ends or a shutdown stops it; returns `false` on shutdown.
    async fn run_or_stop(&self, job: &JobSettings, shutdown: &mut ShutdownWatch) -> bool {
        tokio::select! {
            () = self.run(job) => true,
            _ = shutdown.changed() => {
                tracing::info!(job = %job.name, "sync run stopped by the shutdown; the next run removes its leftovers");
                false
            }
        }
    }
}

/// Applies a new `[sync]` section to the schedule and logs the jobs it now has. The removal
/// of the section is logged only when `previous`, the section before, existed.
fn apply_logged(
    schedule: &mut Schedule,
    previous: Option<&SyncConfig>,
    config: Option<&SyncConfig>,
) {
    schedule.apply(config, Instant::now(), rand::random());
    let jobs = schedule.job_names();
    match (previous, config) {
        (_, Some(config)) => tracing::info!(
            ?jobs,
            interval_secs = config.interval.as_secs(),
            jitter_secs = config.jitter.as_secs(),
            "sync schedule updated"
        ),
        (Some(_), None) => {
            tracing::info!("no [sync] section any more; the gateway runs no sync job")
        }
        (None, None) => {}
    }
}

/// Returns the message of a panic's payload, when it is text.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Sleeps until `due`, or forever when there is nothing due.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
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
    .map_err(|e: SyncError| e.to_string())
}

#[cfg(test)]
mod tests;
