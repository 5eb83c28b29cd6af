//! The `quota` plugin: hourly request budgets per principal and per domain, for index and
//! download requests.
//!
//! # Window
//!
//! Budgets count requests in fixed windows aligned to the UTC clock hour: every count starts
//! at 0 at :00:00. `RateLimit-Reset` and `Retry-After` give the seconds to the next hour.
//!
//! # Principal
//!
//! A request counts against the user that an authentication plugin earlier in the list
//! accepted (`user:<name>`), else its client address (`ip:<v4 address>` or the `/64` network
//! of an IPv6 address), else one shared `unknown` principal. The domain-wide ceilings count
//! every principal together.
//!
//! # Counting
//!
//! A request whose path is in a class is counted at most once. By default a request is checked and
//! counted in one atomic step before the cache lookup, so cache hits count too. With
//! `count_cache_hits = false` it is checked before the cache lookup and counted only when it
//! goes to the origin, in the upstream request filter, which Pingora runs once it has the origin
//! connection. Concurrent misses may then pass a budget by as many requests as are between
//! their check and their count at once (with Redis, until the count reached Redis), because
//! each is checked before the others are counted.
//!
//! # Stores
//!
//! Counts live in a process-wide [`Registry`] keyed by domain id and class, so a plugin built
//! again for the same domain (a config reload) keeps them, and a changed budget applies to the
//! count so far. With a `redis` table the counts live in Redis and are shared by every gateway
//! that uses it. While Redis does not respond, the plugin counts locally (`fail_open`) or
//! rejects counted requests with 429 (`fail_closed`). A `state_file` keeps the local counts
//! across restarts.

mod config;
mod redis_store;
mod state_file;
mod store;
mod window;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;
use tracing::{info, warn};

use crate::limits::{client_network, too_many_requests, BudgetState};
use crate::settings::SettingError;
use crate::ttl::PathPattern;
use crate::{BuildContext, LocalResponse, Plugin, RequestInfo, RequestState, Verdict};
pub use config::{FailureMode, DEFAULT_DOWNLOAD_PATHS, DEFAULT_INDEX_PATHS};
use redis_store::{Op, RedisStore, Unavailable};
pub use state_file::FORMAT_VERSION as STATE_FILE_VERSION;
use state_file::{Saver, StateFile};
pub use store::{
    Class, ClassCounts, ClassUsage, Counts, Decision, Limits, Reason, Registry, RejectionCount,
    Scope,
};
pub use window::Window;

/// Label recorded in [`RequestState::rejected_by`] for requests this plugin turns away.
pub const REJECTED_BY: &str = "quota";

/// Builds the plugin from its settings table, with the process-wide counts.
pub fn build(
    settings: toml::Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    Ok(Arc::new(QuotaPlugin::new(settings, ctx)?))
}

/// Returns the rejections counted in this process per domain, class and reason.
pub fn rejection_counts() -> Vec<RejectionCount> {
    Registry::global().rejections()
}

/// Returns the requests counted in `domain` in `now`'s hour per class, with the budgets of
/// the domain's live `quota` plugin; empty when the domain has none.
///
/// The counts are this process's. With a `redis` table each is at least the shared count in
/// this process's last Redis reply, and it grows with requests counted locally while Redis was
/// unreachable.
pub fn usage(domain: &str, now: SystemTime) -> Vec<ClassUsage> {
    Registry::global().usage(domain, Window::at(now).hour)
}

/// Writes every state file whose counts changed since its last write. Call it on a graceful
/// shutdown, because the periodic writes may be up to 5 seconds old.
pub fn save_state_files() {
    state_file::save_all(SystemTime::now());
}

/// Settles this process's counts with Redis before it ends. Gives back the requests that Redis
/// counted ahead for busy principals (their reserves). Adds the requests counted here alone
/// while Redis was unreachable, so that other replicas, and this one after a restart, count
/// them. Call it once the server has stopped, outside any Tokio runtime. It waits up to each
/// plugin's Redis timeout per step.
pub fn settle_with_redis() {
    redis_store::settle_all(Window::at(SystemTime::now()));
}

/// A request that was checked before the cache lookup and is counted if it goes to the
/// origin (`count_cache_hits = false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCount {
    class: Class,
    principal: PrincipalName,
    budget: BudgetState,
}

/// The `quota` plugin of one domain.
pub struct QuotaPlugin {
    index: ClassRule,
    download: ClassRule,
    count_cache_hits: bool,
    redis: Option<Arc<RedisStore>>,
    state_file: Option<Arc<StateFile>>,
    /// Writes the state file periodically; dropped (and written a last time) with the plugin.
    _saver: Option<Saver>,
    /// Keeps this plugin's budgets in [`usage`] while the plugin lives.
    _registered_limits: [Arc<Limits>; 2],
}

struct ClassRule {
    class: Class,
    patterns: Vec<PathPattern>,
    limits: Limits,
    counts: Arc<ClassCounts>,
}

/// The result of a check: a decision, or no store to decide with.
type Checked = Result<Decision, Unavailable>;

impl QuotaPlugin {
    /// Builds the plugin with the process-wide counts, loading the state file if one is set.
    pub fn new(settings: toml::Value, ctx: &BuildContext<'_>) -> Result<Self, Vec<SettingError>> {
        Self::with_registry(settings, ctx, &Registry::global())
    }

    /// Builds the plugin with the counts of `registry`; a separate registry acts like a
    /// separate gateway process.
    pub fn with_registry(
        settings: toml::Value,
        ctx: &BuildContext<'_>,
        registry: &Registry,
    ) -> Result<Self, Vec<SettingError>> {
        let config = config::parse(settings, ctx)?;
        let rule = |class, patterns, limits| ClassRule {
            class,
            patterns,
            limits,
            counts: registry.counts(ctx.domain, class),
        };
        let index = rule(Class::Index, config.index_paths, config.index);
        let download = rule(Class::Download, config.download_paths, config.download);
        let redis = config.redis.as_ref().map(|r| {
            let counts = [Arc::clone(&index.counts), Arc::clone(&download.counts)];
            RedisStore::tracked(ctx.domain, r, counts)
        });
        let state_file = config.state_file.map(|path| {
            let sets = vec![
                (Class::Index, Arc::clone(&index.counts)),
                (Class::Download, Arc::clone(&download.counts)),
            ];
            let file = StateFile::new(path, ctx.domain, sets);
            load_state(ctx.domain, &file);
            file.mark_saved();
            file
        });
        let registered_limits = [
            index.counts.register_limits(index.limits),
            download.counts.register_limits(download.limits),
        ];
        Ok(Self {
            _saver: state_file.as_ref().map(|f| Saver::start(Arc::clone(f))),
            _registered_limits: registered_limits,
            index,
            download,
            count_cache_hits: config.count_cache_hits,
            redis,
            state_file,
        })
    }

    /// Returns the class whose patterns match `path`, index first; `None` is not counted.
    pub fn class_of(&self, path: &str) -> Option<Class> {
        self.rule_for(path).map(|rule| rule.class)
    }

    /// Runs the request filter with `now` as the time: checks the request's budgets and counts
    /// it, unless counting waits for the origin. Rejects it with 429 when a budget ran out, or
    /// when the shared store is unreachable and the plugin fails closed.
    pub async fn check_at(
        &self,
        req: &RequestInfo<'_>,
        state: &mut RequestState,
        now: SystemTime,
    ) -> Verdict {
        let Some(check) = self.check_of(req, state, now) else {
            return Verdict::Continue;
        };
        let checked = self
            .decide(check.rule, check.op, &check.principal, check.window)
            .await;
        settle(check, checked, state)
    }

    /// Runs the request filter like [`Self::check_at`] when that needs no wait: when the
    /// counts are in this process, or when the principal has requests reserved in Redis.
    /// Returns `None` otherwise, because deciding then means waiting for a reply from Redis.
    pub fn check_local_at(
        &self,
        req: &RequestInfo<'_>,
        state: &mut RequestState,
        now: SystemTime,
    ) -> Option<Verdict> {
        if self.redis.is_some() && !self.count_cache_hits {
            return None;
        }
        let Some(check) = self.check_of(req, state, now) else {
            return Some(Verdict::Continue);
        };
        let decision = match &self.redis {
            None => decide_local(check.rule, check.op, &check.principal, check.window),
            Some(redis) => from_reserve(redis, check.rule, &check.principal, check.window)?,
        };
        Some(settle(check, Ok(decision), state))
    }

    /// Returns the check that the request filter makes for `req` at `now`; `None` when the
    /// request's path is in no class or the request is the gateway's own background refresh of
    /// a cache entry. The check counts at once, or with `count_cache_hits = false` only peeks
    /// and counts when the request goes to the origin.
    fn check_of(
        &self,
        req: &RequestInfo<'_>,
        state: &RequestState,
        now: SystemTime,
    ) -> Option<Check<'_>> {
        if state.background_refresh {
            return None;
        }
        let rule = self.rule_for(req.path)?;
        Some(Check {
            rule,
            principal: principal_of(req, state),
            window: Window::at(now),
            op: if self.count_cache_hits {
                Op::Count
            } else {
                Op::Peek
            },
        })
    }

    /// Runs the upstream request filter with `now` as the time: counts a request that
    /// [`Self::check_at`] left pending. With Redis the count is sent in the background.
    pub fn count_upstream_at(&self, state: &mut RequestState, now: SystemTime) {
        let Some(pending) = state.quota_pending.take() else {
            return;
        };
        let rule = self.rule(pending.class);
        let window = Window::at(now);
        let budget = match &self.redis {
            Some(redis) => {
                redis.spawn_add(
                    rule.class,
                    pending.principal,
                    window,
                    Arc::clone(&rule.counts),
                );
                BudgetState {
                    remaining: pending.budget.remaining.saturating_sub(1),
                    ..pending.budget
                }
            }
            None => {
                let counts = rule.counts.add(pending.principal.as_bytes(), window.hour);
                budget_state(rule.limits, counts, window)
            }
        };
        state.rate_limit = Some(budget);
    }

    /// Returns the count of `principal` in `class` for `now`'s hour in this process's counters.
    pub fn local_count(&self, class: Class, principal: &str, now: SystemTime) -> u64 {
        let rule = self.rule(class);
        let unlimited = Limits {
            principal: u64::MAX,
            domain: None,
        };
        rule.counts
            .peek(principal.as_bytes(), unlimited, Window::at(now).hour)
            .counts()
            .principal
    }

    /// Returns whether the last Redis call succeeded; `None` without a `redis` table.
    pub fn redis_available(&self) -> Option<bool> {
        self.redis.as_ref().map(|r| r.available())
    }

    /// Writes the state file now if the counts changed; returns whether it wrote. `Ok(false)`
    /// without a `state_file`.
    ///
    /// # Errors
    ///
    /// The I/O error of the write; the previous file stays in place.
    pub fn save_state(&self, now: SystemTime) -> std::io::Result<bool> {
        match &self.state_file {
            Some(file) => file.save(now),
            None => Ok(false),
        }
    }

    fn rule_for(&self, path: &str) -> Option<&ClassRule> {
        [&self.index, &self.download]
            .into_iter()
            .find(|rule| rule.patterns.iter().any(|p| p.matches(path)))
    }

    fn rule(&self, class: Class) -> &ClassRule {
        match class {
            Class::Index => &self.index,
            Class::Download => &self.download,
        }
    }

    /// Checks (and for [`Op::Count`] counts) in Redis when configured, else locally; falls
    /// back to local counting while Redis is away unless the plugin fails closed.
    async fn decide(
        &self,
        rule: &ClassRule,
        op: Op,
        principal: &PrincipalName,
        window: Window,
    ) -> Checked {
        let local = || decide_local(rule, op, principal, window);
        let Some(redis) = &self.redis else {
            return Ok(local());
        };
        if op == Op::Count {
            if let Some(decision) = from_reserve(redis, rule, principal, window) {
                return Ok(decision);
            }
        }
        match redis
            .run(op, rule.class, principal.as_bytes(), rule.limits, window)
            .await
        {
            Ok(decision) => {
                let decision = from_redis(redis, rule, op, principal, window, decision);
                // A reserve may have arrived while this check was on the way. Redis counted its
                // requests for this principal already, so one of them lets this request through.
                if op == Op::Count && matches!(decision, Decision::Rejected(..)) {
                    if let Some(reserved) = from_reserve(redis, rule, principal, window) {
                        return Ok(reserved);
                    }
                }
                Ok(decision)
            }
            Err(unavailable) => match redis.failure_mode() {
                // Every local count is kept as unshared, so counts made here are added to
                // Redis once it replies again.
                FailureMode::FailOpen => Ok(local()),
                FailureMode::FailClosed => Err(unavailable),
            },
        }
    }
}

#[async_trait]
impl Plugin for QuotaPlugin {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn request_filter_now(
        &self,
        req: &RequestInfo<'_>,
        state: &mut RequestState,
    ) -> Option<Verdict> {
        self.check_local_at(req, state, SystemTime::now())
    }

    async fn request_filter(&self, req: &RequestInfo<'_>, state: &mut RequestState) -> Verdict {
        self.check_at(req, state, SystemTime::now()).await
    }

    fn upstream_request_filter(
        &self,
        _req: &mut RequestHeader,
        state: &mut RequestState,
    ) -> pingora::Result<()> {
        self.count_upstream_at(state, SystemTime::now());
        Ok(())
    }
}

/// Lets a counted request through from the requests that Redis counted ahead for its
/// principal, without a call; `None` when the principal has none. A request that the local
/// counts put over a budget (requests counted here while Redis was away, and not sent to it
/// yet) gives the reserve back and gets `None`, so that Redis decides it.
fn from_reserve(
    redis: &Arc<RedisStore>,
    rule: &ClassRule,
    principal: &PrincipalName,
    window: Window,
) -> Option<Decision> {
    let name = principal.as_bytes();
    let reported = redis.take_reserved(rule.class, name, window.hour)?;
    let (decision, unshared) =
        rule.counts
            .try_count_reserved(name, rule.limits, window.hour, reported);
    if unshared {
        redis.share(rule.class, &rule.counts, window);
    }
    match decision {
        Decision::Allowed(_) => Some(decision),
        Decision::Rejected(..) => {
            redis.give_back_reserve(rule.class, name, window.hour, 1);
            None
        }
    }
}

/// Completes a decision that Redis made: records its counts in this process's counters, adds
/// the requests counted here that Redis has not taken yet (see [`with_unshared`]) and starts
/// sending those.
fn from_redis(
    redis: &Arc<RedisStore>,
    rule: &ClassRule,
    op: Op,
    principal: &PrincipalName,
    window: Window,
    decision: Decision,
) -> Decision {
    let name = principal.as_bytes();
    let counted = u64::from(op == Op::Count && matches!(decision, Decision::Allowed(_)));
    let observed = redis.observe(&rule.counts, name, window, decision.counts(), counted);
    let (decision, take_back) = with_unshared(decision, observed.beyond, rule.limits, op);
    if take_back {
        redis.take_back(rule.class, &rule.counts, name, window);
    }
    if observed.unshared {
        redis.share(rule.class, &rule.counts, window);
    }
    decision
}

/// Checks (and for [`Op::Count`] and [`Op::Add`] counts) in this process's counters. The
/// counts are kept as unshared until a shared store takes them.
fn decide_local(rule: &ClassRule, op: Op, principal: &PrincipalName, window: Window) -> Decision {
    let principal = principal.as_bytes();
    match op {
        Op::Count => rule.counts.try_count(principal, rule.limits, window.hour),
        Op::Peek => rule.counts.peek(principal, rule.limits, window.hour),
        Op::Add => Decision::Allowed(rule.counts.add(principal, window.hour)),
    }
}

/// Adds the requests this process counted alone (while Redis was away, or before a reload
/// added the `redis` table), and that Redis has not taken yet, to a decision that Redis made
/// without them. `unshared` is how much the local counts exceed the reply's (see
/// [`ClassCounts::observe`]). Returns the decision and whether Redis counted a request that
/// they put over a budget, which is then rejected and whose count must be taken back. Without
/// this, a replica whose principal used its budget during an outage would let further
/// requests through until the background task adds its counts.
fn with_unshared(decision: Decision, unshared: Counts, limits: Limits, op: Op) -> (Decision, bool) {
    let plus = |counts: Counts, amount: Counts| Counts {
        principal: counts.principal.saturating_add(amount.principal),
        domain: counts.domain.saturating_add(amount.domain),
    };
    if unshared == Counts::default() || op == Op::Add {
        return (decision, false);
    }
    match decision {
        Decision::Allowed(counts) => {
            // A count reports the counts after the request, a peek those before it.
            let counted = op == Op::Count;
            let this = u64::from(counted);
            let before = Counts {
                principal: counts.principal.saturating_sub(this),
                domain: counts.domain.saturating_sub(this),
            };
            let seen = plus(before, unshared);
            match store::over_budget(limits, seen) {
                Some(scope) => (Decision::Rejected(scope, seen), counted),
                None => (Decision::Allowed(plus(counts, unshared)), false),
            }
        }
        Decision::Rejected(scope, counts) => {
            (Decision::Rejected(scope, plus(counts, unshared)), false)
        }
    }
}

/// A request filter's check: the class rule of the request's path, its principal, the window
/// and the operation on the counts.
struct Check<'a> {
    rule: &'a ClassRule,
    principal: PrincipalName,
    window: Window,
    op: Op,
}

/// Turns the outcome of `check` into the request filter's verdict, recording in `state` the
/// budget sent downstream and, for [`Op::Peek`], the count left for the origin request.
fn settle(check: Check<'_>, checked: Checked, state: &mut RequestState) -> Verdict {
    let Check {
        rule,
        principal,
        window,
        op,
    } = check;
    match checked {
        Ok(Decision::Allowed(counts)) => {
            let budget = budget_state(rule.limits, counts, window);
            state.rate_limit = Some(budget);
            if op == Op::Peek {
                state.quota_pending = Some(PendingCount {
                    class: rule.class,
                    principal,
                    budget,
                });
            }
            Verdict::Continue
        }
        Ok(Decision::Rejected(scope, _)) => {
            rule.counts.record_rejection(scope.into());
            reject(rule, scope, window, state)
        }
        Err(unavailable) => {
            rule.counts.record_rejection(Reason::StoreUnavailable);
            state.rejected_by = Some(REJECTED_BY);
            state.rejected_reason = Some(Reason::StoreUnavailable.rejection_label(rule.class));
            // No counts are known, so no plugin's `RateLimit-*` fields go out.
            state.rate_limit = None;
            Verdict::Respond(store_unavailable(rule, unavailable))
        }
    }
}

/// Returns the principal a request counts against: the user, the client address (an IPv6
/// address's `/64` network), or `unknown`.
pub fn principal_of(req: &RequestInfo<'_>, state: &RequestState) -> PrincipalName {
    if let Some(user) = &state.user {
        return PrincipalName::named(format!("user:{user}"));
    }
    match req.client_addr.map(client_network) {
        Some(IpAddr::V4(addr)) => v4_principal(addr),
        // The network in canonical form (RFC 5952), as `2001:db8::/64` is written.
        Some(IpAddr::V6(network)) => PrincipalName::named(format!("ip:{network}/64")),
        None => PrincipalName::named("unknown".to_owned()),
    }
}

/// The name of a principal, UTF-8 text. The counters take it as bytes, so an IPv4 address,
/// which every anonymous request has, is written into the value itself: no allocation, and no
/// UTF-8 check to read it back.
#[derive(Clone)]
pub struct PrincipalName(Name);

#[derive(Clone)]
enum Name {
    /// `ip:` and a dotted IPv4 address, in the first `len` bytes (at most 18).
    Address {
        bytes: [u8; 18],
        len: u8,
    },
    Named(String),
}

impl PrincipalName {
    fn named(name: String) -> Self {
        Self(Name::Named(name))
    }

    /// Returns the name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Name::Address { bytes, len } => &bytes[..usize::from(*len)],
            Name::Named(name) => name.as_bytes(),
        }
    }
}

impl PartialEq for PrincipalName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for PrincipalName {}

impl std::fmt::Display for PrincipalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl std::fmt::Debug for PrincipalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&String::from_utf8_lossy(self.as_bytes()), f)
    }
}

impl PartialEq<&str> for PrincipalName {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// Returns `ip:` and the dotted form of `addr`, written without the formatting machinery, as
/// every anonymous request needs it.
fn v4_principal(addr: Ipv4Addr) -> PrincipalName {
    let mut bytes = [0; 18];
    bytes[..2].copy_from_slice(b"ip");
    let mut len = 2;
    for octet in addr.octets() {
        // Each octet writes four bytes (a dot and up to three digits) and keeps as many as its
        // text has, so the next octet overwrites the rest. The last write ends at byte 18.
        let (text, used) = OCTET_TEXT[usize::from(octet)];
        bytes[len..len + 4].copy_from_slice(&text);
        len += usize::from(used);
    }
    bytes[2] = b':';
    // At most 18 bytes (`ip:255.255.255.255`), which fits in a u8.
    PrincipalName(Name::Address {
        bytes,
        len: len as u8,
    })
}

/// A dot and the decimal digits of each octet value, padded to four bytes, with the number of
/// bytes that count.
const OCTET_TEXT: [([u8; 4], u8); 256] = {
    let mut table = [([0; 4], 0); 256];
    let mut octet = 0;
    while octet < 256 {
        let n = octet as u8;
        table[octet] = if n >= 100 {
            ([b'.', b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10], 4)
        } else if n >= 10 {
            ([b'.', b'0' + n / 10, b'0' + n % 10, 0], 3)
        } else {
            ([b'.', b'0' + n, 0, 0], 2)
        };
        octet += 1;
    }
    table
};

/// Returns the name a 429 gives the budget of `class` and `scope`.
pub fn budget_name(class: Class, scope: Scope) -> &'static str {
    match (class, scope) {
        (Class::Index, Scope::Principal) => "index requests per hour",
        (Class::Download, Scope::Principal) => "download requests per hour",
        (Class::Index, Scope::Domain) => "domain-wide index requests per hour",
        (Class::Download, Scope::Domain) => "domain-wide download requests per hour",
    }
}

/// Returns the budget state sent downstream: of the principal's budget, or of the domain's
/// ceiling when fewer requests are left there.
fn budget_state(limits: Limits, counts: Counts, window: Window) -> BudgetState {
    let own = BudgetState {
        limit: limits.principal,
        remaining: limits.principal.saturating_sub(counts.principal),
        reset_secs: window.reset_secs,
    };
    match limits.domain {
        Some(ceiling) if ceiling.saturating_sub(counts.domain) < own.remaining => BudgetState {
            limit: ceiling,
            remaining: ceiling.saturating_sub(counts.domain),
            ..own
        },
        _ => own,
    }
}

/// Turns the request away with the 429 of the budget that ran out.
fn reject(rule: &ClassRule, scope: Scope, window: Window, state: &mut RequestState) -> Verdict {
    let limit = match scope {
        Scope::Principal => rule.limits.principal,
        Scope::Domain => rule.limits.domain.unwrap_or(rule.limits.principal),
    };
    let budget = BudgetState {
        limit,
        remaining: 0,
        reset_secs: window.reset_secs,
    };
    state.rejected_by = Some(REJECTED_BY);
    state.rejected_reason = Some(Reason::from(scope).rejection_label(rule.class));
    state.rate_limit = Some(budget);
    Verdict::Respond(too_many_requests(
        budget_name(rule.class, scope),
        budget,
        window.reset_secs,
    ))
}

/// Builds the 429 sent while the shared store is away and the plugin fails closed: no
/// `RateLimit-*` fields, as the counts are unknown.
fn store_unavailable(rule: &ClassRule, unavailable: Unavailable) -> LocalResponse {
    let retry = unavailable.retry_after_secs.max(1);
    let name = budget_name(rule.class, Scope::Principal);
    let budget = BudgetState {
        limit: rule.limits.principal,
        remaining: 0,
        reset_secs: retry,
    };
    let mut response = too_many_requests(name, budget, retry);
    response
        .headers
        .retain(|(header, _)| !header.as_str().starts_with("ratelimit-"));
    response.body = Bytes::from(format!(
        "{{\"error\":\"budget_store_unavailable\",\"budget\":\"{name}\",\
         \"message\":\"the budget store is unavailable; try again later\",\
         \"retry_after_secs\":{retry}}}\n"
    ));
    response
}

/// Loads the state file into the counters, logging what happened.
fn load_state(domain: &str, file: &StateFile) {
    match file.load(SystemTime::now()) {
        Ok(0) => {}
        Ok(taken) => info!(domain, file = %file.path().display(), counts = taken,
            "quota counts of this hour loaded from the state file"),
        Err(reason) => warn!(domain, file = %file.path().display(),
            "ignoring the quota state file: {reason}; counting starts from the counts in memory"),
    }
}
