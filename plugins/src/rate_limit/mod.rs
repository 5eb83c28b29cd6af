//! The `rate_limit` plugin: a request rate per client and a cap on concurrent requests per IP.
//!
//! Each request of a domain is counted against its principal's bucket: the user that an
//! authentication plugin listed earlier accepted, else the client IP that the gateway resolved
//! (the socket peer, or the `X-Forwarded-For` client behind a trusted proxy). An IPv6 client
//! counts as its `/64` network, for the rate and for concurrent requests alike. A bucket of `burst`
//! requests refills at `requests_per_second`; [`table`] describes the algorithm. A
//! request without a user and without a client IP is not counted.
//!
//! With `max_concurrent_per_ip`, a request also takes one of that many places of its client IP
//! (whatever the user) and holds it in [`RequestState::concurrency_slot`] until the gateway
//! drops the request's state, when the request ends, errors included. A request that an earlier
//! plugin rejected never took a place, so it has none to give back.
//!
//! A request over either limit gets `429 Too Many Requests` with `Retry-After` and `RateLimit-*`
//! fields. Allowed requests carry `RateLimit-*` fields for the rate budget, unless the `quota`
//! plugin set its own (see [`RequestState::rate_limit`]).

pub mod table;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::limits::{client_network, too_many_requests, BudgetState};
use crate::settings::{self, SettingError};
use crate::{BuildContext, Plugin, RequestInfo, RequestState, Verdict};

pub use table::{shared_table, ClientTable, ConcurrencySlot, Principal, Rate, RateDecision};

/// The label this plugin records in [`RequestState::rejected_by`].
pub const REJECTED_BY: &str = "rate_limit";
/// The reason recorded in [`RequestState::rejected_reason`] for a request over the rate.
pub const REASON_RATE: &str = "rate";
/// The reason recorded in [`RequestState::rejected_reason`] for a request over the
/// concurrency cap.
pub const REASON_CONCURRENCY: &str = "concurrency";

/// The limits of one domain, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rate: Rate,
    /// Concurrent requests allowed per client IP; `None` for no cap.
    pub max_concurrent_per_ip: Option<u32>,
}

/// The `rate_limit` plugin of one domain.
#[derive(Debug)]
pub struct RateLimitPlugin {
    limits: Limits,
    table: Arc<ClientTable>,
    /// The budget named in the body of a 429 for the request rate.
    rate_budget: String,
}

impl RateLimitPlugin {
    /// Builds the plugin on `table`, which keeps the counts and may outlive the plugin.
    pub fn new(limits: Limits, table: Arc<ClientTable>) -> Self {
        let rate_budget = rate_budget(limits.rate);
        Self {
            limits,
            table,
            rate_budget,
        }
    }

    /// Returns the table that keeps this plugin's counts.
    pub fn table(&self) -> &Arc<ClientTable> {
        &self.table
    }

    /// Decides on a request at `now`: the body of the request filter, with the clock passed in.
    /// The gateway's background cache refreshes are not counted.
    pub fn admit(&self, req: &RequestInfo<'_>, state: &mut RequestState, now: Instant) -> Verdict {
        if state.background_refresh {
            return Verdict::Continue;
        }
        let client = req.client_addr.map(client_network);
        let principal = match (&state.user, client) {
            (Some(user), _) => Principal::User(user.clone()),
            (None, Some(ip)) => Principal::Ip(ip),
            (None, None) => return Verdict::Continue,
        };
        let slot = match (self.limits.max_concurrent_per_ip, client) {
            (Some(max), Some(ip)) => match self.table.acquire(ip, max) {
                Some(slot) => Some(slot),
                None => return reject_concurrency(max, state),
            },
            _ => None,
        };
        match self.table.check_rate(&principal, self.limits.rate, now) {
            RateDecision::Allow(budget) => {
                state.rate_limit.get_or_insert(budget);
                if slot.is_some() {
                    state.concurrency_slot = slot;
                }
                Verdict::Continue
            }
            RateDecision::Reject {
                state: budget,
                retry_after_secs,
            } => {
                tracing::debug!(
                    domain = req.domain,
                    ?principal,
                    "request rate over the limit"
                );
                state.rate_limit = Some(budget);
                state.rejected_by = Some(REJECTED_BY);
                state.rejected_reason = Some(REASON_RATE);
                Verdict::Respond(too_many_requests(
                    &self.rate_budget,
                    budget,
                    retry_after_secs,
                ))
            }
        }
    }
}

/// Builds the plugin from its settings table, on the shared table of `ctx.domain`.
pub fn build(
    settings: toml::Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    let parsed: RateLimitSettings = settings::parse(settings)?;
    let limits = parsed.validate()?;
    Ok(Arc::new(RateLimitPlugin::new(
        limits,
        shared_table(ctx.domain),
    )))
}

impl Plugin for RateLimitPlugin {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn request_filter_now(
        &self,
        req: &RequestInfo<'_>,
        state: &mut RequestState,
    ) -> Option<Verdict> {
        Some(self.admit(req, state, req.received))
    }
}

/// Lowest accepted rate: one request per day, so that an interval stays a sane duration.
const MIN_RATE: f64 = 1.0 / 86_400.0;
/// Highest accepted rate; one request per microsecond.
const MAX_RATE: f64 = 1_000_000.0;
/// Maximum time an empty bucket may take to fill up again (`burst` intervals), 100 years. The
/// counters keep times in nanoseconds in a u64, which reaches 584 years.
const MAX_REFILL_SECS: u64 = 100 * 365 * 86_400;

/// Settings of the `rate_limit` plugin as written in the config file.
#[derive(Debug, Deserialize)]
struct RateLimitSettings {
    requests_per_second: f64,
    burst: u32,
    max_concurrent_per_ip: Option<u32>,
}

impl RateLimitSettings {
    /// Checks every setting and returns the limits, or one error per bad setting.
    fn validate(self) -> Result<Limits, Vec<SettingError>> {
        let mut errors = Vec::new();
        let rps = self.requests_per_second;
        let interval = Some(rps)
            .filter(|r| (MIN_RATE..=MAX_RATE).contains(r))
            .and_then(|r| Duration::try_from_secs_f64(1.0 / r).ok());
        if interval.is_none() {
            // A huge number is echoed in exponent form, as 1e300 and not its 301 digits.
            let shown = if rps.abs() < 1e15 {
                rps.to_string()
            } else {
                format!("{rps:e}")
            };
            errors.push(SettingError::new(
                "requests_per_second",
                Some(shown),
                "must be a number from 0.0000116 (one request per day) to 1000000; \
                 write e.g. 10 or 0.5",
            ));
        }
        if self.burst == 0 {
            errors.push(SettingError::new(
                "burst",
                Some("0".into()),
                "must be at least 1, the number of requests a client may send at once",
            ));
        }
        if let Some(interval) = interval.filter(|_| self.burst > 0) {
            let refill_secs = interval.as_secs_f64() * f64::from(self.burst);
            if refill_secs > MAX_REFILL_SECS as f64 {
                errors.push(SettingError::new(
                    "burst",
                    Some(self.burst.to_string()),
                    format!(
                        "at {rps} requests per second an empty bucket of this size takes {:.0} \
                         years to fill up again; at most 100 years are accepted, so lower \
                         burst or raise requests_per_second",
                        refill_secs / (365.0 * 86_400.0)
                    ),
                ));
            }
        }
        if self.max_concurrent_per_ip == Some(0) {
            errors.push(SettingError::new(
                "max_concurrent_per_ip",
                Some("0".into()),
                "must be at least 1; leave the key out for no cap",
            ));
        }
        match interval {
            Some(interval) if errors.is_empty() => Ok(Limits {
                rate: Rate {
                    interval,
                    burst: self.burst,
                },
                max_concurrent_per_ip: self.max_concurrent_per_ip,
            }),
            _ => Err(errors),
        }
    }
}

/// Names the rate budget for a client: `request rate of 5 per second, bursts of 20`. The
/// body's `limit` is the burst, so the rate must be named next to it. A rate under one per
/// second is named per minute, hour or day, whichever gives a number of at least one.
fn rate_budget(rate: Rate) -> String {
    let per_second = 1e9 / rate.interval.as_nanos() as f64;
    let units = [("second", 1.0), ("minute", 60.0), ("hour", 3600.0)];
    let (unit, count) = units
        .iter()
        .map(|(unit, secs)| (*unit, per_second * secs))
        .find(|(_, count)| *count >= 1.0)
        .unwrap_or(("day", per_second * 86_400.0));
    let count = format!("{count:.3}");
    let count = count.trim_end_matches('0').trim_end_matches('.');
    format!(
        "request rate of {count} per {unit}, bursts of {}",
        rate.burst
    )
}

/// Builds the 429 for a client IP that holds all of its `max` places.
fn reject_concurrency(max: u32, state: &mut RequestState) -> Verdict {
    let budget = BudgetState {
        limit: max.into(),
        remaining: 0,
        reset_secs: 1,
    };
    state.rate_limit = Some(budget);
    state.rejected_by = Some(REJECTED_BY);
    state.rejected_reason = Some(REASON_CONCURRENCY);
    Verdict::Respond(too_many_requests("concurrent requests", budget, 1))
}

#[cfg(test)]
mod tests;
