//! The disk tier's expiry sweep: a background service that deletes, every
//! `cache.disk_sweep_interval_secs`, the disk entries whose stale windows have ended.
//!
//! Such an entry can no longer be served without going to the origin, yet eviction removes it
//! only in its least-recently-used turn. The sweep frees its space earlier. The first sweep
//! runs when the service starts, so entries that expired while the gateway was stopped go at
//! once.
//!
//! One sweeper runs per [`CacheTier`]: `App::build` starts it with the tier, and a reload keeps
//! both (a changed `[cache]` section takes effect at the next restart). It keeps only a weak
//! reference to the tier, so it ends at the gateway's shutdown or at the first tick after the
//! tier is dropped.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::MissedTickBehavior;

use super::CacheTier;

/// Deletes the disk tier's expired entries at a fixed interval.
pub struct DiskSweeper {
    tier: Weak<CacheTier>,
    interval: Duration,
}

impl DiskSweeper {
    /// Returns the sweeper of `tier`'s disk tier; `None` when the tier has no disk tier.
    pub fn for_tier(tier: &Arc<CacheTier>) -> Option<Self> {
        let interval = tier.disk_sweep_interval()?;
        Some(Self {
            tier: Arc::downgrade(tier),
            interval,
        })
    }

    /// Runs one sweep on a blocking thread, because it deletes files, and logs what it
    /// deleted. Returns `false` when the tier is gone.
    async fn sweep(&self) -> bool {
        let Some(tier) = self.tier.upgrade() else {
            return false;
        };
        let started = Instant::now();
        let swept = tokio::task::spawn_blocking(move || tier.sweep_disk()).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match swept {
            Ok(Some(report)) if !report.keys.is_empty() => tracing::info!(
                entries = report.keys.len(),
                bytes = report.bytes,
                elapsed_ms,
                "disk cache: deleted entries past their stale windows"
            ),
            Ok(_) => tracing::debug!(elapsed_ms, "disk cache: sweep found no expired entries"),
            Err(e) => tracing::error!(
                error = %e,
                "disk cache: the expiry sweep failed; the next one runs after the interval"
            ),
        }
        true
    }
}

#[async_trait]
impl BackgroundService for DiskSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tracing::debug!(
            interval_secs = self.interval.as_secs(),
            "disk cache: expiry sweep started"
        );
        let mut tick = tokio::time::interval(self.interval);
        // A sweep that outlasts the interval is followed by a whole interval, not a burst.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    if !self.sweep().await {
                        break;
                    }
                }
            }
        }
        tracing::debug!("disk cache: expiry sweep stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheClock;
    use crate::config::{CacheSettings, DiskCacheSettings};

    fn tier(disk: Option<DiskCacheSettings>) -> Arc<CacheTier> {
        let settings = CacheSettings {
            memory_bytes: 1 << 20,
            max_object_bytes: 1 << 20,
            lock_wait_timeout: Duration::from_secs(10),
            lock_age_timeout: Duration::from_secs(20),
            debug_headers: false,
            disk,
        };
        Arc::new(CacheTier::new(&settings, CacheClock::system()).expect("cache tier"))
    }

    fn disk_tier(dir: &std::path::Path, interval: Duration) -> Arc<CacheTier> {
        tier(Some(DiskCacheSettings {
            dir: dir.to_path_buf(),
            budget_bytes: 16 << 20,
            max_object_bytes: 1 << 20,
            sweep_interval: interval,
        }))
    }

    #[test]
    fn sweeper_absent_without_disk() {
        assert!(DiskSweeper::for_tier(&tier(None)).is_none());
    }

    #[tokio::test]
    async fn sweeper_stops_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = disk_tier(dir.path(), Duration::from_secs(3600));
        let sweeper = DiskSweeper::for_tier(&tier).expect("disk tier");
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { sweeper.start(shutdown).await });
        stop.send(true).expect("send shutdown");
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(ended.is_ok(), "the sweeper ran on after the shutdown");
    }

    #[tokio::test]
    async fn sweeper_stops_when_tier_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = disk_tier(dir.path(), Duration::from_millis(50));
        let sweeper = DiskSweeper::for_tier(&tier).expect("disk tier");
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        drop(tier);
        let task = tokio::spawn(async move { sweeper.start(shutdown).await });
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            ended.is_ok(),
            "the sweeper ran on after its tier was dropped"
        );
    }
}
