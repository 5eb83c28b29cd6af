//! Whether an origin response is stored, and for how long.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use mirror_plugins::CachePolicy;
use pingora::cache::cache_control::CacheControl;
use pingora::cache::filters::resp_cacheable;
use pingora::cache::{CacheMeta, CacheMetaDefaults, NoCacheReason, RespCacheable};
use pingora::http::ResponseHeader;

use crate::config::StaleWindows;

/// Why a response was not stored. The labels are stable: logs, metrics and tests use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    /// The origin sent `Cache-Control: no-store` or `private`.
    OriginNoStore,
    /// The response sets a cookie, so it belongs to one client.
    SetCookie,
    /// The origin responded with a 5xx status.
    OriginError,
    /// A status other than 5xx that is never stored (4xx unless configured, 206, ...).
    Status,
    /// Neither the TTL policy nor the origin gave the response a lifetime.
    NoLifetime,
    /// The response varies on everything (`Vary: *`).
    VaryAny,
    /// The origin saw the client's credentials and did not mark the response `public`.
    Authorization,
    /// The origin request that this request waited for failed before its response header, so
    /// this request got that failure's status instead of a fetch of its own.
    FillFailed,
    /// The wait for another request's origin request timed out, so this request got a 504
    /// instead of a fetch of its own.
    LockTimeout,
    /// Every origin slot of the domain (`max_origin_requests`) stayed busy for the whole wait,
    /// so the request never went to the origin and got a 503.
    OriginBusy,
    /// A 304 from the origin names a strong `ETag` that the stored response does not have, so
    /// it validates some other representation and the stored one is not refreshed.
    ValidatorMismatch,
}

impl NoStoreReason {
    /// Returns the stable label of this reason.
    pub fn label(self) -> &'static str {
        match self {
            Self::OriginNoStore => "origin_no_store",
            Self::SetCookie => "set_cookie",
            Self::OriginError => "origin_error",
            Self::Status => "status",
            Self::NoLifetime => "no_lifetime",
            Self::VaryAny => "vary_any",
            Self::Authorization => "authorization",
            Self::ValidatorMismatch => "validator_mismatch",
            Self::FillFailed => "fill_failed",
            Self::LockTimeout => "lock_timeout",
            Self::OriginBusy => "origin_busy",
        }
    }
}

/// Returns whether the origin of `resp` forbade shared caches to keep it, whatever its status:
/// so a CDN in front must get the origin's own `Cache-Control`, not a `ttl` rule's.
/// `authorization_forwarded` is true when the origin saw the client's credentials.
pub fn refuses_shared_caching(resp: &ResponseHeader, authorization_forwarded: bool) -> bool {
    let cc = CacheControl::from_resp_headers(resp);
    sharing_refusal(resp, cc.as_ref(), authorization_forwarded).is_some()
}

/// Returns the reason shared caches must not keep `resp` by its origin's choice: `Set-Cookie`,
/// `Vary: *`, `no-store` or `private` in `cc`, or credentials the origin saw without marking
/// the response `public` (RFC 9111, section 3.5).
fn sharing_refusal(
    resp: &ResponseHeader,
    cc: Option<&CacheControl>,
    authorization_forwarded: bool,
) -> Option<NoStoreReason> {
    if resp.headers.contains_key(http::header::SET_COOKIE) {
        return Some(NoStoreReason::SetCookie);
    }
    let vary_any = resp.headers.get_all(http::header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|n| n.trim() == "*"))
    });
    if vary_any {
        return Some(NoStoreReason::VaryAny);
    }
    if cc.is_some_and(|cc| cc.no_store() || cc.private()) {
        return Some(NoStoreReason::OriginNoStore);
    }
    if authorization_forwarded && !cc.is_some_and(CacheControl::public) {
        return Some(NoStoreReason::Authorization);
    }
    None
}

/// Returns whether a 304 with `new_etag` validates some other representation than the stored
/// response with `stored_etag`: the 304 names a strong `ETag` that the stored response does
/// not have (RFC 9111, section 4.3.4). A weak or missing `ETag` on the 304 selects nothing
/// by strong validator, so it never conflicts.
pub fn validator_conflicts(stored_etag: Option<&[u8]>, new_etag: Option<&[u8]>) -> bool {
    match new_etag.map(<[u8]>::trim_ascii) {
        None => false,
        Some(new) if new.starts_with(b"W/") => false,
        Some(new) => stored_etag.map(<[u8]>::trim_ascii) != Some(new),
    }
}

/// Defaults for `resp_cacheable`: every status it may store gets a placeholder lifetime, which
/// `decide_cacheability` replaces with the policy's TTL. Without a policy only the origin's own
/// `Cache-Control`/`Expires` lifetimes count, so the placeholder is never used then.
const POLICY_DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(placeholder_lifetime, 0, 0);
const ORIGIN_DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

fn placeholder_lifetime(status: StatusCode) -> Option<Duration> {
    matches!(status.as_u16(), 200 | 203 | 204 | 301 | 308 | 404 | 410)
        .then_some(Duration::from_secs(1))
}

/// Decides whether to store `resp`, applying the TTL `policy` of the request path, if any.
///
/// Only responses with status 200, 203, 204, 301, 308 or 410 are stored, and 404 only when the
/// rule sets `cache_not_found`. The policy's TTL replaces the origin's lifetime, but never
/// makes storable what the origin forbids (`no-store`, `private`, `Set-Cookie`). An origin
/// `no-cache` keeps the entry stale from the start, so it is revalidated on every use.
/// `authorization_forwarded` is true when the origin saw the client's credentials; such a
/// response is stored only when the origin marks it `public`.
///
/// An origin `Age` counts as time the response already spent in caches: the entry's age starts
/// there, so hits send an `Age` of at least that, and the origin's lifetime is shortened by it.
/// A rule's TTL counts from the response's arrival here.
///
/// The stale windows come from the rule, else from the origin's `stale-while-revalidate` and
/// `stale-if-error`, else from the domain's `stale`; an origin `must-revalidate`,
/// `proxy-revalidate`, `s-maxage` (which implies `proxy-revalidate`) or `no-cache` turns both
/// off.
pub fn decide_cacheability(
    resp: &ResponseHeader,
    policy: Option<&CachePolicy>,
    authorization_forwarded: bool,
    stale: StaleWindows,
    now: SystemTime,
) -> Result<RespCacheable, NoStoreReason> {
    if resp.status.is_server_error() {
        return Err(NoStoreReason::OriginError);
    }
    let cc = CacheControl::from_resp_headers(resp);
    if let Some(reason) = sharing_refusal(resp, cc.as_ref(), authorization_forwarded) {
        return Err(reason);
    }
    let storable = match resp.status.as_u16() {
        200 | 203 | 204 | 301 | 308 | 410 => true,
        404 => policy.is_some_and(|p| p.cache_not_found),
        _ => false,
    };
    if !storable {
        return Err(NoStoreReason::Status);
    }
    let defaults = if policy.is_some() {
        &POLICY_DEFAULTS
    } else {
        &ORIGIN_DEFAULTS
    };
    let origin_no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache());
    let no_stale = origin_no_cache
        || cc.as_ref().is_some_and(|cc| {
            cc.must_revalidate()
                || cc.proxy_revalidate()
                || cc.s_maxage().is_ok_and(|s| s.is_some())
        });
    let origin_windows = cc.as_ref().map(|cc| {
        (
            cc.stale_while_revalidate().ok().flatten(),
            cc.stale_if_error().ok().flatten(),
        )
    });
    let window = |rule: Option<Duration>, origin: Option<u32>, domain: Duration| -> u32 {
        if no_stale {
            return 0;
        }
        let chosen = rule
            .or(origin.map(|s| Duration::from_secs(s.into())))
            .unwrap_or(domain);
        u32::try_from(chosen.as_secs()).unwrap_or(u32::MAX)
    };
    let swr = window(
        policy.and_then(|p| p.stale_while_revalidate),
        origin_windows.and_then(|w| w.0),
        stale.while_revalidate,
    );
    let sie = window(
        policy.and_then(|p| p.stale_if_error),
        origin_windows.and_then(|w| w.1),
        stale.if_error,
    );
    // Credentials were checked above, so Pingora's own check of them is not needed.
    match resp_cacheable(cc.as_ref(), resp.clone(), false, defaults) {
        RespCacheable::Cacheable(meta) => {
            let age = origin_age(resp);
            let fresh_until = match policy {
                Some(policy) if !origin_no_cache => now + policy.ttl,
                _ => origin_fresh_until(&meta, now, age),
            };
            // The stored header carries no `Age`: hits send the age the entry's epoch gives,
            // and a revalidation must not count the origin's first `Age` twice.
            let mut header = meta.response_header_copy();
            header.remove_header(&http::header::AGE);
            let mut meta = CacheMeta::new(fresh_until, now, swr, sie, header);
            if !age.is_zero() {
                meta.set_epoch_override(now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH));
            }
            Ok(RespCacheable::Cacheable(meta))
        }
        RespCacheable::Uncacheable(NoCacheReason::OriginNotCache) if policy.is_none() => {
            Err(NoStoreReason::NoLifetime)
        }
        RespCacheable::Uncacheable(_) => Err(NoStoreReason::Status),
    }
}

/// Returns the end of the origin's lifetime in `meta`, moved to the time frame of `now` and
/// shortened by the `age` the response already had.
///
/// `resp_cacheable` measures the lifetime from the system clock. The cache clock may be ahead
/// of it (see `clock.rs`), so the lifetime is measured again from `now`.
fn origin_fresh_until(meta: &CacheMeta, now: SystemTime, age: Duration) -> SystemTime {
    let before = |d: Duration| now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH);
    match meta.fresh_until().duration_since(meta.created()) {
        Ok(lifetime) if lifetime >= age => now + (lifetime - age),
        Ok(lifetime) => before(age - lifetime),
        // An `Expires` in the past: the response expired that long before it was stored.
        Err(e) => before(e.duration().saturating_add(age)),
    }
}

/// Returns the origin's `Age` (RFC 9111, section 5.1): zero when the field is missing, appears
/// more than once or is not a whole number of seconds.
fn origin_age(resp: &ResponseHeader) -> Duration {
    let mut values = resp.headers.get_all(http::header::AGE).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            // A value too large for a u64 is as old as anything can be.
            .map(|v| v.parse::<u64>().unwrap_or(u64::MAX))
            .map_or(Duration::ZERO, Duration::from_secs),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validator_conflicts_on_other_strong_etag() {
        let tag = |text: &'static str| Some(text.as_bytes());
        assert!(!validator_conflicts(tag("\"a\""), tag("\"a\"")));
        assert!(!validator_conflicts(tag("\"a\""), tag(" \"a\" ")));
        assert!(validator_conflicts(tag("\"a\""), tag("\"b\"")));
        assert!(validator_conflicts(None, tag("\"b\"")));
        assert!(validator_conflicts(tag("W/\"a\""), tag("\"a\"")));
        assert!(!validator_conflicts(tag("\"a\""), tag("W/\"b\"")));
        assert!(!validator_conflicts(tag("\"a\""), None));
        assert!(!validator_conflicts(None, None));
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).expect("valid status");
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value)
                .expect("valid header");
        }
        resp
    }

    const STALE: StaleWindows = StaleWindows {
        while_revalidate: Duration::from_secs(60),
        if_error: Duration::from_secs(600),
    };

    fn policy(ttl: u64) -> CachePolicy {
        CachePolicy {
            pattern: "/x".into(),
            ttl: Duration::from_secs(ttl),
            cache_control: None,
            cache_not_found: false,
            stale_while_revalidate: None,
            stale_if_error: None,
        }
    }

    fn fresh_secs(result: Result<RespCacheable, NoStoreReason>, now: SystemTime) -> u64 {
        match result {
            Ok(RespCacheable::Cacheable(meta)) => meta
                .fresh_until()
                .duration_since(now)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            other => panic!("expected cacheable, got {:?}", other.err()),
        }
    }

    #[test]
    fn policy_ttl_replaces_origin_lifetime() {
        let now = SystemTime::now();
        let resp = response(200, &[("cache-control", "max-age=5")]);
        assert_eq!(
            fresh_secs(
                decide_cacheability(&resp, Some(&policy(300)), false, STALE, now),
                now
            ),
            300
        );
    }

    #[test]
    fn policy_applies_without_origin_headers() {
        let now = SystemTime::now();
        let resp = response(200, &[]);
        assert_eq!(
            fresh_secs(
                decide_cacheability(&resp, Some(&policy(60)), false, STALE, now),
                now
            ),
            60
        );
    }

    #[test]
    fn no_policy_follows_origin() {
        let now = SystemTime::now();
        assert_eq!(
            decide_cacheability(&response(200, &[]), None, false, STALE, now).err(),
            Some(NoStoreReason::NoLifetime)
        );
        let resp = response(200, &[("cache-control", "max-age=30")]);
        assert_eq!(
            fresh_secs(decide_cacheability(&resp, None, false, STALE, now), now),
            30
        );
    }

    #[test]
    fn never_stored_cases() {
        let now = SystemTime::now();
        let p = policy(300);
        let cases = [
            (
                response(200, &[("cache-control", "no-store")]),
                NoStoreReason::OriginNoStore,
            ),
            (
                response(200, &[("cache-control", "private")]),
                NoStoreReason::OriginNoStore,
            ),
            (
                response(200, &[("set-cookie", "a=b")]),
                NoStoreReason::SetCookie,
            ),
            (response(500, &[]), NoStoreReason::OriginError),
            (
                response(503, &[("cache-control", "max-age=60")]),
                NoStoreReason::OriginError,
            ),
            (
                response(502, &[("set-cookie", "a=b")]),
                NoStoreReason::OriginError,
            ),
            (response(404, &[]), NoStoreReason::Status),
            (response(206, &[]), NoStoreReason::Status),
        ];
        for (resp, reason) in cases {
            let status = resp.status;
            assert_eq!(
                decide_cacheability(&resp, Some(&p), false, STALE, now).err(),
                Some(reason),
                "{status}"
            );
        }
    }

    #[test]
    fn not_found_stored_when_configured() {
        let now = SystemTime::now();
        let mut p = policy(30);
        p.cache_not_found = true;
        assert_eq!(
            fresh_secs(
                decide_cacheability(&response(404, &[]), Some(&p), false, STALE, now),
                now
            ),
            30
        );
    }

    #[test]
    fn forwarded_authorization_needs_public() {
        let now = SystemTime::now();
        let p = policy(30);
        assert!(decide_cacheability(&response(200, &[]), Some(&p), true, STALE, now).is_err());
        let public = response(200, &[("cache-control", "public, max-age=10")]);
        assert!(decide_cacheability(&public, Some(&p), true, STALE, now).is_ok());
        // Lifetimes meant for shared caches do not make a response to credentials shared.
        for cc in [
            "max-age=300, must-revalidate",
            "s-maxage=300",
            "max-age=300",
        ] {
            let resp = response(200, &[("cache-control", cc)]);
            for rule in [None, Some(&p)] {
                assert_eq!(
                    decide_cacheability(&resp, rule, true, STALE, now).err(),
                    Some(NoStoreReason::Authorization),
                    "{cc}"
                );
            }
        }
    }

    #[test]
    fn only_listed_statuses_are_stored() {
        let now = SystemTime::now();
        let p = policy(300);
        let lifetimes: [&[(&str, &str)]; 3] = [
            &[],
            &[("cache-control", "max-age=60")],
            &[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")],
        ];
        for status in [302, 303, 307, 400, 401, 403, 405, 429, 451] {
            for headers in lifetimes {
                for rule in [None, Some(&p)] {
                    assert_eq!(
                        decide_cacheability(&response(status, headers), rule, false, STALE, now)
                            .err(),
                        Some(NoStoreReason::Status),
                        "{status} {headers:?} rule {}",
                        rule.is_some()
                    );
                }
            }
        }
        for status in [200, 203, 204, 301, 308, 410] {
            let resp = response(status, &[("cache-control", "max-age=60")]);
            assert_eq!(
                fresh_secs(decide_cacheability(&resp, None, false, STALE, now), now),
                60,
                "{status}"
            );
        }
    }

    /// Returns the entry's lifetime left at `now` and its age then.
    fn lifetime_and_age(
        result: Result<RespCacheable, NoStoreReason>,
        now: SystemTime,
    ) -> (i64, u64) {
        let Ok(RespCacheable::Cacheable(meta)) = result else {
            panic!("expected cacheable, got {:?}", result.err());
        };
        assert!(
            !meta.headers().contains_key(http::header::AGE),
            "the stored header keeps no Age"
        );
        let left = match meta.fresh_until().duration_since(now) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        let age = now
            .duration_since(meta.epoch())
            .unwrap_or_default()
            .as_secs();
        (left, age)
    }

    #[test]
    fn origin_age_counts() {
        let now = SystemTime::now();
        let decide = |headers: &[(&str, &str)], rule: Option<&CachePolicy>| {
            lifetime_and_age(
                decide_cacheability(&response(200, headers), rule, false, STALE, now),
                now,
            )
        };
        let max_age = ("cache-control", "max-age=300");
        assert_eq!(decide(&[max_age, ("age", "290")], None), (10, 290));
        assert_eq!(decide(&[max_age, ("age", "1000")], None), (-700, 1000));
        assert_eq!(decide(&[max_age], None), (300, 0));
        // A rule's TTL counts from now; the age still shows what the response had.
        assert_eq!(
            decide(&[max_age, ("age", "1000")], Some(&policy(60))),
            (60, 1000)
        );
        // Fields that are not one whole number of seconds are ignored.
        for bad in ["-5", "1.5", "", "abc", " 7"] {
            assert_eq!(decide(&[max_age, ("age", bad)], None), (300, 0), "{bad:?}");
        }
        assert_eq!(
            decide(&[max_age, ("age", "5"), ("age", "9")], None),
            (300, 0)
        );
        // A value beyond any clock leaves the entry expired, not a panic.
        let huge = decide(&[max_age, ("age", "99999999999999999999999")], None);
        assert!(huge.0 < 0, "{huge:?}");
    }

    #[test]
    fn origin_lifetime_counts_from_now() {
        // A cache clock an hour ahead of the system clock.
        let now = SystemTime::now() + Duration::from_secs(3600);
        let resp = response(200, &[("cache-control", "max-age=60")]);
        assert_eq!(
            fresh_secs(decide_cacheability(&resp, None, false, STALE, now), now),
            60
        );
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    const STALE: StaleWindows = StaleWindows {
        while_revalidate: Duration::from_secs(60),
        if_error: Duration::from_secs(600),
    };

    fn windows(headers: &[(&str, &str)], policy: Option<&CachePolicy>) -> (u32, u32) {
        let mut resp = ResponseHeader::build(200, None).expect("valid status");
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value)
                .expect("valid header");
        }
        match decide_cacheability(&resp, policy, false, STALE, SystemTime::now()) {
            Ok(RespCacheable::Cacheable(meta)) => {
                (meta.stale_while_revalidate_sec(), meta.stale_if_error_sec())
            }
            _ => panic!("expected a cacheable response"),
        }
    }

    fn rule(swr: Option<u64>) -> CachePolicy {
        CachePolicy {
            pattern: "/x".into(),
            ttl: Duration::from_secs(300),
            cache_control: None,
            cache_not_found: false,
            stale_while_revalidate: swr.map(Duration::from_secs),
            stale_if_error: None,
        }
    }

    #[test]
    fn stale_windows_default_to_domain() {
        assert_eq!(windows(&[("cache-control", "max-age=10")], None), (60, 600));
    }

    #[test]
    fn stale_windows_rule_beats_origin() {
        let headers = [("cache-control", "max-age=10, stale-while-revalidate=5")];
        assert_eq!(windows(&headers, None), (5, 600));
        assert_eq!(windows(&headers, Some(&rule(Some(30)))), (30, 600));
    }

    #[test]
    fn must_revalidate_disables_stale() {
        let headers = [("cache-control", "max-age=10, must-revalidate")];
        assert_eq!(windows(&headers, Some(&rule(Some(30)))), (0, 0));
    }

    #[test]
    fn s_maxage_disables_stale() {
        // RFC 9111, section 5.2.2.10: `s-maxage` implies `proxy-revalidate`.
        let headers = [("cache-control", "s-maxage=0, max-age=300")];
        assert_eq!(windows(&headers, None), (0, 0));
        assert_eq!(windows(&headers, Some(&rule(Some(30)))), (0, 0));
    }
}
