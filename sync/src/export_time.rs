//! The source export's time: when the source made the export that a snapshot contains.
//!
//! Stella Ops exports carry their own time: every index and manifest document has a top-level
//! `generatedAt` (RFC 3339, e.g. `2026-12-02T00:00:00Z`). When a snapshot has such documents,
//! the newest of their `generatedAt` values is the export's time. Otherwise the time is the
//! newest modification time among the listed objects: the S3 `LastModified`, or a file's
//! mtime for a directory source. The gateway measures the sync lag from this time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::source::Listed;

/// When the source made the export, and where that time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTime {
    /// Seconds since the Unix epoch.
    pub unix: i64,
    pub basis: TimeBasis,
}

/// The origin of an [`ExportTime`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeBasis {
    /// The newest top-level `generatedAt` of the export's `index.json` and `manifest.json`
    /// documents.
    GeneratedAt,
    /// The newest modification time among the listed objects.
    NewestModified,
}

impl TimeBasis {
    /// Returns the label used in logs and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GeneratedAt => "generated_at",
            Self::NewestModified => "newest_modified",
        }
    }
}

impl ExportTime {
    /// Returns the export time from a snapshot's newest `generatedAt`, falling back to the
    /// newest modification time of its listing; `None` when neither is known. A time after
    /// `now` becomes `now` (see [`Self::not_after`]).
    pub fn choose(
        generated_at: Option<i64>,
        newest_modified: Option<i64>,
        now: SystemTime,
    ) -> Option<Self> {
        let time = match (generated_at, newest_modified) {
            (Some(unix), _) => Some(Self {
                unix,
                basis: TimeBasis::GeneratedAt,
            }),
            (None, Some(unix)) => Some(Self {
                unix,
                basis: TimeBasis::NewestModified,
            }),
            (None, None) => None,
        };
        time.map(|time| time.not_after(now))
    }

    /// Returns this time, or `now` when it is later.
    ///
    /// An export time in the future (a wrong clock where the export was made) would make the
    /// data look fresh until that time, so the lag alarm could not fire. More than a minute
    /// ahead is logged as a warning.
    pub fn not_after(self, now: SystemTime) -> Self {
        let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
        if self.unix <= now_unix {
            return self;
        }
        if self.unix - now_unix > 60 {
            tracing::warn!(
                export_time = self.unix,
                now = now_unix,
                basis = self.basis.as_str(),
                "the export's time is in the future (a wrong clock where it was made?); \
                 the lag counts from this sync's time instead"
            );
        }
        Self {
            unix: now_unix,
            ..self
        }
    }

    /// Returns the time as a [`SystemTime`]; times before the epoch clamp to it.
    pub fn system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.unix).unwrap_or(0))
    }
}

/// Returns the newest modification time in `listing`, if any entry has one.
pub fn newest_modified(listing: &[Listed]) -> Option<i64> {
    listing.iter().filter_map(|entry| entry.modified).max()
}

/// Returns the top-level `generatedAt` of a JSON document, in seconds since the Unix epoch.
///
/// `None` when the document is not an object, has no `generatedAt`, or its value is not an
/// RFC 3339 time.
pub fn generated_at(document: &serde_json::Value) -> Option<i64> {
    let text = document.get("generatedAt")?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn generated_at_parses_utc() {
        let doc = json!({"generatedAt": "2026-12-02T00:00:00Z"});
        assert_eq!(generated_at(&doc), Some(1_796_169_600));
    }

    #[test]
    fn generated_at_applies_offset() {
        let doc = json!({"generatedAt": "2026-12-02T02:00:00+02:00"});
        assert_eq!(generated_at(&doc), Some(1_796_169_600));
    }

    #[test]
    fn generated_at_ignores_nested_field() {
        let doc = json!({"bundle": {"generatedAt": "2026-12-02T00:00:00Z"}});
        assert_eq!(generated_at(&doc), None);
    }

    #[test]
    fn generated_at_rejects_invalid_time() {
        let doc = json!({"generatedAt": "yesterday"});
        assert_eq!(generated_at(&doc), None);
    }

    #[test]
    fn newest_modified_takes_max() {
        let listing = vec![
            Listed::new("a", 1, "e").with_modified(100),
            Listed::new("b", 1, "e"),
            Listed::new("c", 1, "e").with_modified(300),
        ];
        assert_eq!(newest_modified(&listing), Some(300));
    }

    #[test]
    fn newest_modified_none_without_times() {
        assert_eq!(newest_modified(&[Listed::new("a", 1, "e")]), None);
    }

    #[test]
    fn choose_prefers_generated_at() {
        let time = ExportTime::choose(Some(10), Some(20), at(100)).expect("a time");
        assert_eq!(time.unix, 10);
        assert_eq!(time.basis, TimeBasis::GeneratedAt);
    }

    #[test]
    fn choose_falls_back_to_modified() {
        let time = ExportTime::choose(None, Some(20), at(100)).expect("a time");
        assert_eq!(time.unix, 20);
        assert_eq!(time.basis, TimeBasis::NewestModified);
    }

    #[test]
    fn choose_none_without_either() {
        assert_eq!(ExportTime::choose(None, None, at(100)), None);
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn choose_clamps_future_times() {
        let time = ExportTime::choose(Some(253_402_300_799), Some(20), at(100)).expect("a time");
        assert_eq!((time.unix, time.basis), (100, TimeBasis::GeneratedAt));
        let time = ExportTime::choose(None, Some(130), at(100)).expect("a time");
        assert_eq!(time.unix, 100);
    }

    #[test]
    fn system_time_clamps_negative() {
        let time = ExportTime {
            unix: -5,
            basis: TimeBasis::NewestModified,
        };
        assert_eq!(time.system_time(), UNIX_EPOCH);
    }
}
