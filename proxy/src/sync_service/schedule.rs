//! When each sync job runs next. Pure bookkeeping: the caller passes the time and the random
//! numbers, so tests need no clock.
//!
//! Each job has its own next run. A job runs [`FIRST_RUN_DELAY`] after it first appears (at
//! start, or when a reload adds it), then again a pause of `interval` ± `jitter` after each
//! run ends. A new `[sync]` section from a reload is applied with [`Schedule::apply`]:
//!
//! - a job that was removed is dropped;
//! - a new job, or a job whose settings changed, runs [`FIRST_RUN_DELAY`] after the reload;
//! - an unchanged job keeps its next run, except that after an `interval_secs` or
//!   `jitter_secs` change it is moved to the end of its last run plus a pause of the new
//!   length (possibly at once).
//!
//! No time computed here can panic: pauses are cut to [`MAX_PAUSE`] and additions are checked,
//! so even a pause longer than the config allows only puts the next run far away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mirror_sync::{JobSettings, SyncConfig};
use tokio::time::Instant;

use super::FIRST_RUN_DELAY;

/// Maximum pause the schedule keeps: 30 years of 365 days, three times the largest
/// `interval_secs` the config accepts (`mirror_sync::config::MAX_SECS`). A run this far away
/// is never reached, and the clock reading it gives is far inside what `Instant` and Tokio's
/// timer can hold.
pub const MAX_PAUSE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// The next run of every configured job.
#[derive(Debug, Default)]
pub struct Schedule {
    interval: Duration,
    jitter: Duration,
    /// Jobs by name.
    jobs: BTreeMap<String, Slot>,
}

#[derive(Debug)]
struct Slot {
    settings: Arc<JobSettings>,
    next: Instant,
    /// When the job's last run in this process ended.
    last_end: Option<Instant>,
}

impl Schedule {
    /// Replaces the jobs and timing with those of `config` at `now`. `None` means no `[sync]`
    /// section, so no job. `unit` is a random number in `[0, 1]` that picks the jitter.
    pub fn apply(&mut self, config: Option<&SyncConfig>, now: Instant, unit: f64) {
        let Some(config) = config else {
            self.jobs.clear();
            return;
        };
        let retimed = (config.interval, config.jitter) != (self.interval, self.jitter);
        self.interval = config.interval;
        self.jitter = config.jitter;
        let pause = next_pause(config.interval, config.jitter, unit);
        let mut old = std::mem::take(&mut self.jobs);
        for job in &config.jobs {
            let slot = match old.remove(&job.name) {
                Some(slot) if *slot.settings == *job => Slot {
                    next: match slot.last_end {
                        Some(end) if retimed => after(end, pause),
                        _ => slot.next,
                    },
                    ..slot
                },
                previous => Slot {
                    settings: Arc::new(job.clone()),
                    next: after(now, FIRST_RUN_DELAY),
                    last_end: previous.and_then(|slot| slot.last_end),
                },
            };
            self.jobs.insert(job.name.clone(), slot);
        }
    }

    /// Returns the earliest next run, or `None` when there is no job.
    pub fn next_due(&self) -> Option<Instant> {
        self.jobs.values().map(|slot| slot.next).min()
    }

    /// Returns the settings of the job due first at `now`, if one is due. Ties go to the job
    /// whose name sorts first.
    pub fn due(&self, now: Instant) -> Option<Arc<JobSettings>> {
        self.jobs
            .values()
            .filter(|slot| slot.next <= now)
            .min_by_key(|slot| slot.next)
            .map(|slot| Arc::clone(&slot.settings))
    }

    /// Records that a run of `job` ended at `now` and schedules its next run after a pause
    /// picked by `unit` (see [`next_pause`]). A job no longer configured is ignored.
    pub fn finished(&mut self, job: &str, now: Instant, unit: f64) {
        if let Some(slot) = self.jobs.get_mut(job) {
            slot.last_end = Some(now);
            slot.next = after(now, next_pause(self.interval, self.jitter, unit));
        }
    }

    /// Returns the names of the configured jobs, sorted.
    pub fn job_names(&self) -> Vec<&str> {
        self.jobs.keys().map(String::as_str).collect()
    }
}

/// Returns the pause before a job's next run: `interval - jitter` plus `2 * jitter` times
/// `unit`, a random number in `[0, 1]` (clamped into it; NaN counts as 0.5). The sum saturates
/// at `Duration::MAX` instead of overflowing.
pub fn next_pause(interval: Duration, jitter: Duration, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    let span = jitter.saturating_mul(2);
    // The product is at most `span`, but its conversion back from `f64` seconds can round
    // above `Duration::MAX`, which `try_from_secs_f64` reports instead of panicking.
    let share = Duration::try_from_secs_f64(span.as_secs_f64() * unit).unwrap_or(span);
    interval.saturating_sub(jitter).saturating_add(share)
}

/// Returns the instant `pause` after `start`, with the pause cut to [`MAX_PAUSE`]. Should even
/// that overflow the clock, the next run is a day away, or at `start` as the last resort.
fn after(start: Instant, pause: Duration) -> Instant {
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    [pause.min(MAX_PAUSE), DAY]
        .into_iter()
        .find_map(|pause| start.checked_add(pause))
        .unwrap_or(start)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use mirror_sync::SourceSettings;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn job(name: &str, source: &str) -> JobSettings {
        let source = SourceSettings::Directory {
            path: PathBuf::from(source),
        };
        JobSettings::new(name, source, format!("/srv/{name}"))
    }

    fn config(interval: Duration, jobs: Vec<JobSettings>) -> SyncConfig {
        SyncConfig {
            path: PathBuf::from("gateway.toml"),
            jobs,
            interval,
            jitter: Duration::ZERO,
            max_lag: MINUTE * 15,
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
    fn new_job_runs_after_first_delay() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        assert_eq!(schedule.next_due(), Some(now + FIRST_RUN_DELAY));
        assert!(schedule.due(now).is_none());
        let due = schedule.due(now + FIRST_RUN_DELAY).expect("due");
        assert_eq!(due.name, "a");
    }

    #[test]
    fn finished_job_waits_interval() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        schedule.finished("a", now + MINUTE, 0.5);
        assert_eq!(schedule.next_due(), Some(now + MINUTE * 2));
    }

    #[test]
    fn shorter_interval_moves_next_run() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE * 60, vec![job("a", "/s")])), now, 0.5);
        schedule.finished("a", now, 0.5);
        let later = now + MINUTE * 5;
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), later, 0.5);
        assert_eq!(schedule.next_due(), Some(now + MINUTE));
        assert!(schedule.due(later).is_some());
    }

    #[test]
    fn unchanged_config_keeps_next_run() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        let same = config(MINUTE * 60, vec![job("a", "/s")]);
        schedule.apply(Some(&same), now, 0.5);
        schedule.finished("a", now, 0.5);
        schedule.apply(Some(&same), now + MINUTE, 0.9);
        assert_eq!(schedule.next_due(), Some(now + MINUTE * 60));
    }

    #[test]
    fn changed_job_runs_soon_with_new_settings() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE * 60, vec![job("a", "/old")])), now, 0.5);
        schedule.finished("a", now, 0.5);
        let later = now + MINUTE;
        schedule.apply(
            Some(&config(MINUTE * 60, vec![job("a", "/new")])),
            later,
            0.5,
        );
        assert_eq!(schedule.next_due(), Some(later + FIRST_RUN_DELAY));
        let due = schedule.due(later + FIRST_RUN_DELAY).expect("due");
        assert_eq!(due.source, job("a", "/new").source);
    }

    #[test]
    fn removed_job_never_due() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        let two = vec![job("a", "/s"), job("b", "/s")];
        schedule.apply(Some(&config(MINUTE, two)), now, 0.5);
        schedule.apply(Some(&config(MINUTE, vec![job("b", "/s")])), now, 0.5);
        assert_eq!(schedule.job_names(), ["b"]);
        let due = schedule.due(now + MINUTE).expect("due");
        assert_eq!(due.name, "b");
    }

    #[test]
    fn no_section_removes_every_job() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        schedule.apply(None, now, 0.5);
        assert_eq!(schedule.next_due(), None);
        assert!(schedule.due(now + MINUTE).is_none());
    }

    /// The largest `interval_secs` TOML can hold, far over what the config accepts.
    const HUGE: Duration = Duration::from_secs(i64::MAX as u64);

    #[test]
    fn next_pause_saturates() {
        assert_eq!(next_pause(HUGE, Duration::ZERO, 0.5), HUGE);
        assert_eq!(next_pause(Duration::MAX, Duration::MAX, 1.0), Duration::MAX);
        assert_eq!(next_pause(Duration::MAX, HUGE, 1.0), Duration::MAX);
    }

    #[test]
    fn huge_interval_on_reload_waits_max_pause() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        schedule.finished("a", now, 0.5);
        schedule.apply(Some(&config(HUGE, vec![job("a", "/s")])), now, 0.5);
        assert_eq!(schedule.next_due(), Some(now + MAX_PAUSE));
        // A good config reloaded afterwards schedules the job as usual.
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        assert_eq!(schedule.next_due(), Some(now + MINUTE));
    }

    #[test]
    fn huge_interval_after_run_waits_max_pause() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        let huge = SyncConfig {
            jitter: Duration::MAX,
            ..config(Duration::MAX, vec![job("a", "/s")])
        };
        schedule.apply(Some(&huge), now, 0.5);
        schedule.finished("a", now, 1.0);
        assert_eq!(schedule.next_due(), Some(now + MAX_PAUSE));
    }

    #[tokio::test]
    async fn timer_takes_max_pause() {
        let far = Instant::now() + MAX_PAUSE;
        let slept = tokio::time::timeout(Duration::from_millis(10), tokio::time::sleep_until(far));
        assert!(slept.await.is_err(), "the far run came due");
    }

    #[test]
    fn finished_removed_job_ignored() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.apply(Some(&config(MINUTE, vec![job("a", "/s")])), now, 0.5);
        schedule.finished("gone", now, 0.5);
        assert_eq!(schedule.job_names(), ["a"]);
    }
}
