//! The `X-Cache-Status` value of a response, from the cache phase Pingora reports.

use pingora::cache::CachePhase;

/// Maps the cache phase at response time to the `X-Cache-Status` value nginx operators know.
///
/// `HIT` is a fresh stored response, `MISS` a response fetched from the origin, `EXPIRED` a
/// stale entry replaced by a new origin response, `STALE` a stale entry served because the
/// origin failed, `UPDATING` a stale entry served while a refresh runs, `REVALIDATED` a stale
/// entry the origin confirmed with a 304, and `BYPASS` a response the cache did not handle.
pub fn cache_status(phase: &CachePhase) -> &'static str {
    match phase {
        CachePhase::Hit => "HIT",
        CachePhase::Miss => "MISS",
        CachePhase::Expired => "EXPIRED",
        CachePhase::Stale => "STALE",
        CachePhase::StaleUpdating => "UPDATING",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        CachePhase::Bypass
        | CachePhase::Disabled(_)
        | CachePhase::Uninit
        | CachePhase::CacheKey => "BYPASS",
    }
}
