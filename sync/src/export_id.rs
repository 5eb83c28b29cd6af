//! Export ids: UTC timestamps written `YYYYMMDDTHHMMSSZ`, which sort as they are dated.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of an export id in bytes.
pub const EXPORT_ID_LEN: usize = 16;

/// Formats `time` (UTC, whole seconds, truncated) as an export id; times before 1970 give the
/// epoch.
pub fn format(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Parses an export id; returns `None` unless `id` is exactly `YYYYMMDDTHHMMSSZ` with a valid
/// date and time.
pub fn parse(id: &str) -> Option<SystemTime> {
    let b = id.as_bytes();
    if b.len() != EXPORT_ID_LEN || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = id.get(range)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || day < 1 {
        return None;
    }
    if day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year as i64, month as u32, day as u32);
    let secs = days as u64 * 86_400 + hour * 3600 + minute * 60 + second;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Returns the id for a snapshot made at `now`: `now` formatted, or one second after `newest`
/// when that is not later, so that a new snapshot always sorts after every existing one.
pub fn next(now: SystemTime, newest: Option<&str>) -> String {
    let candidate = format(now);
    match newest.and_then(|id| parse(id).map(|time| (id, time))) {
        Some((id, time)) if candidate.as_str() <= id => format(time + Duration::from_secs(1)),
        _ => candidate,
    }
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Converts days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Converts a date to days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn format_known_time() {
        assert_eq!(format(at(1_767_268_800)), "20260101T120000Z");
    }

    #[test]
    fn format_leap_day() {
        assert_eq!(format(at(1_709_164_799)), "20240228T235959Z");
        assert_eq!(format(at(1_709_164_800)), "20240229T000000Z");
    }

    #[test]
    fn parse_inverts_format() {
        for secs in [0, 951_782_400, 1_709_164_800, 1_767_268_800, 4_102_444_799] {
            assert_eq!(parse(&format(at(secs))), Some(at(secs)), "{secs}");
        }
    }

    #[test]
    fn parse_rejects_bad_forms() {
        for bad in [
            "",
            "latest",
            "20260101T120000",
            "20260101t120000Z",
            "20261301T120000Z",
            "20260230T120000Z",
            "20260101T240000Z",
            "+0260101T120000Z",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn next_uses_now_when_later() {
        assert_eq!(
            next(at(1_767_268_800), Some("20251231T000000Z")),
            "20260101T120000Z"
        );
    }

    #[test]
    fn next_steps_past_newest() {
        assert_eq!(
            next(at(1_767_268_800), Some("20260101T120000Z")),
            "20260101T120001Z"
        );
    }
}
