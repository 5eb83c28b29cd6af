//! The sync task of mirror-gateway: fills an export tree from S3 or a directory so that
//! readers only ever see whole snapshots. See `docs/sync.md` for what a run does.

#![forbid(unsafe_code)]

pub mod build;
pub mod config;
pub mod engine;
pub mod error;
pub mod export_id;
pub mod export_time;
pub mod key;
pub mod lock;
pub mod manifest;
pub mod progress;
pub mod publish;
pub mod signature;
pub mod source;
pub mod verify;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::SystemTime;

pub use config::{JobSettings, SourceSettings, SyncConfig};
pub use engine::{run_job, JobReport, RunOptions};
pub use error::SyncError;
pub use export_time::{ExportTime, TimeBasis};
pub use source::{DirSource, S3Source, Source};

/// The arguments of the `sync` subcommand.
#[derive(Debug, Clone, Default)]
pub struct SyncArgs {
    /// The file holding the `[sync]` section.
    pub config: PathBuf,
    /// Jobs to run, by name; all of them when empty.
    pub jobs: Vec<String>,
    /// Publishes even when a snapshot removes more than `max_delete_fraction` of the files.
    pub allow_mass_delete: bool,
    /// The environment: the `MIRROR_GATEWAY__...` overrides of the config file, and the S3
    /// client's settings (`AWS_*`).
    pub env: Vec<(String, String)>,
}

/// Runs the configured jobs once, one after the other, and logs each result.
///
/// Returns `true` when every job succeeded. Config errors are printed to standard error, one
/// a line; a failed job does not stop the next one.
pub fn run_once(args: &SyncArgs) -> bool {
    let config = match config::load(&args.config, &args.env) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            eprintln!(
                "{}: {} error(s); nothing was synced",
                args.config.display(),
                errors.len()
            );
            return false;
        }
    };
    let jobs = match select_jobs(&config, &args.jobs) {
        Ok(jobs) => jobs,
        Err(message) => {
            eprintln!("error: {message}");
            return false;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return false;
        }
    };
    let mut ok = true;
    for job in jobs {
        let mut options = RunOptions::new(SystemTime::now());
        options.allow_mass_delete = args.allow_mass_delete;
        options.progress = std::io::stderr().is_terminal();
        ok &= runtime.block_on(run_configured(job, &args.env, &options));
    }
    ok
}

/// Builds the job's source and runs it; logs and returns whether it succeeded.
async fn run_configured(job: &JobSettings, env: &[(String, String)], options: &RunOptions) -> bool {
    let started = std::time::Instant::now();
    let result = match &job.source {
        SourceSettings::Directory { path } => run_job(job, &DirSource::new(path), options).await,
        SourceSettings::S3(s3) => match S3Source::new(s3, env, Default::default()) {
            Ok(source) => run_job(job, &source, options).await,
            Err(reason) => {
                tracing::error!(job = %job.name, error = %reason, "sync run failed: cannot set up the S3 client");
                return false;
            }
        },
    };
    match result {
        Ok(_) => true,
        Err(e) => {
            let duration_ms = started.elapsed().as_millis() as u64;
            tracing::error!(job = %job.name, error = %e, duration_ms, "sync run failed; the published export is unchanged");
            false
        }
    }
}

fn select_jobs<'a>(
    config: &'a SyncConfig,
    names: &[String],
) -> Result<Vec<&'a JobSettings>, String> {
    if names.is_empty() {
        return Ok(config.jobs.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            config.jobs.iter().find(|j| &j.name == name).ok_or_else(|| {
                let known: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
                format!(
                    "no sync job {name:?} in {}; the jobs are {known:?}",
                    config.path.display()
                )
            })
        })
        .collect()
}
