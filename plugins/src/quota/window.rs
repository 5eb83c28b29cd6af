//! The fixed hourly window: UTC clock hours, from :00:00 to the next :00:00.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds in one window.
pub const WINDOW_SECS: u64 = 3600;

/// The window that contains one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Hours since the Unix epoch: the window's number, used in store keys.
    pub hour: u64,
    /// Seconds until the next window starts, from 1 to 3600.
    pub reset_secs: u64,
}

impl Window {
    /// Returns the window that contains `now`.
    ///
    /// An instant before the Unix epoch (a clock set far back) falls in window 0.
    pub fn at(now: SystemTime) -> Self {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        Self {
            hour: secs / WINDOW_SECS,
            reset_secs: WINDOW_SECS - secs % WINDOW_SECS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2026-01-01T12:00:00Z.
    const NOON: u64 = 1_767_268_800;

    fn at(secs: u64) -> Window {
        Window::at(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn window_starts_on_the_hour() {
        assert_eq!(
            at(NOON),
            Window {
                hour: NOON / 3600,
                reset_secs: 3600
            }
        );
    }

    #[test]
    fn window_last_second_resets_in_one() {
        assert_eq!(at(NOON + 3599).reset_secs, 1);
    }

    #[test]
    fn window_changes_at_the_next_hour() {
        assert_eq!(at(NOON + 3600).hour, at(NOON).hour + 1);
    }

    #[test]
    fn window_reset_counts_down() {
        let resets: Vec<u64> = [0, 1, 59, 1800, 3599]
            .iter()
            .map(|offset| at(NOON + offset).reset_secs)
            .collect();
        assert_eq!(resets, [3600, 3599, 3541, 1800, 1]);
    }

    #[test]
    fn window_ignores_subsecond_part() {
        let now = UNIX_EPOCH + Duration::from_millis((NOON + 10) * 1000 + 999);
        assert_eq!(Window::at(now).reset_secs, 3590);
    }

    #[test]
    fn window_before_epoch_is_zero() {
        let now = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(Window::at(now).hour, 0);
    }
}
