//! The shared store: counts in Redis, one key per domain, class, principal and hour, checked
//! and counted by one Lua script, so every replica works on the same counts.
//!
//! Requests do not call Redis one by one. Each puts its check in a queue, and one task per store
//! sends whatever is queued as one script call (up to [`MAX_BATCH`] checks). Redis runs the call
//! atomically, one check after the other in queue order. Under load a round trip carries many
//! requests; a lone request waits for one round trip as before. A check whose request stopped
//! waiting (its timeout passed) is dropped from the queue instead of counted. A check already
//! on the way is counted by Redis; when the reply comes within [`LATE_REPLY_WAIT`] after the
//! request gave up, the count is taken back. A Redis that stalls for longer than that and then
//! runs the check leaves it counted.
//!
//! While Redis does not respond, [`RedisStore::run`] returns [`Unavailable`] at once, without
//! waiting, and the caller falls back (see the plugin's failure mode). One request probes Redis
//! again after a backoff that starts at 250 ms and doubles up to 5 s. The switch to the fallback
//! and the recovery are each logged once.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Script};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::config::{FailureMode, RedisConfig};
use super::store::{Class, ClassCounts, Counts, Decision, Limits, Scope};
use super::window::Window;

/// First wait before Redis is tried again after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Maximum wait between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Seconds a key outlives its hour, for replicas whose clocks run a little behind.
const EXPIRY_MARGIN_SECS: u64 = 120;
/// How much longer than a request the sending task waits for a reply, so that it can take back
/// the counts of requests that stopped waiting.
const LATE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Checks sent to Redis in one script call at most.
pub const MAX_BATCH: usize = 128;
/// Principals whose hashed key part is remembered; the memo starts afresh when full.
const TAG_MEMO_ENTRIES: usize = 65_536;

/// Checks and counts atomically, for a batch of checks in order. For check `i` (from 0):
/// KEYS[2i+1] is the principal's key, KEYS[2i+2] the domain's; ARGV[4i+1..4i+4] are the
/// principal limit, the domain limit (0 for none), the keys' lifetime in seconds, and the
/// operation: `count` (check, then count if both fit), `peek` (check only) or `add` (count
/// without a check). Returns one string with four numbers per check, separated by spaces:
/// allowed (1 or 0), principal count, domain count, and the scope that did not fit (1 for the
/// principal's budget, 2 for the domain's, 0 when allowed).
const SCRIPT_SOURCE: &str = r"
local out = {}
for i = 0, #ARGV / 4 - 1 do
  local pk, dk = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local op = ARGV[4 * i + 4]
  local p = tonumber(redis.call('GET', pk) or '0')
  local d = tonumber(redis.call('GET', dk) or '0')
  local ceiling = tonumber(ARGV[4 * i + 2])
  if op ~= 'add' and p >= tonumber(ARGV[4 * i + 1]) then
    out[#out + 1] = '0 ' .. p .. ' ' .. d .. ' 1'
  elseif op ~= 'add' and ceiling > 0 and d >= ceiling then
    out[#out + 1] = '0 ' .. p .. ' ' .. d .. ' 2'
  elseif op == 'peek' then
    out[#out + 1] = '1 ' .. p .. ' ' .. d .. ' 0'
  else
    p = redis.call('INCR', pk)
    d = redis.call('INCR', dk)
    if p == 1 then redis.call('EXPIRE', pk, ARGV[4 * i + 3]) end
    if d == 1 then redis.call('EXPIRE', dk, ARGV[4 * i + 3]) end
    out[#out + 1] = '1 ' .. p .. ' ' .. d .. ' 0'
  end
end
return table.concat(out, ' ')
";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SCRIPT_SOURCE));

/// Lowers each key by one, not below zero: the counts of requests that stopped waiting.
const REFUND_SOURCE: &str = r"
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
";

static REFUND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFUND_SOURCE));

/// The operation on a request's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Check both budgets and count the request if it fits.
    Count,
    /// Check both budgets without counting.
    Peek,
    /// Count without checking.
    Add,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Count => "count",
            Op::Peek => "peek",
            Op::Add => "add",
        }
    }
}

/// The error of a failed Redis call. Redis is tried again in `retry_after_secs` at the
/// earliest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub retry_after_secs: u64,
}

/// The Redis connection of one plugin instance, with its health.
pub struct RedisStore {
    domain: String,
    link: Arc<Link>,
    prefix: String,
    timeout: Duration,
    failure_mode: FailureMode,
    /// The queue of the task that sends checks to Redis, started by the first check.
    queue: OnceLock<mpsc::UnboundedSender<Check>>,
    /// The hashed key part of recent principals.
    tags: Mutex<HashMap<String, Arc<str>>>,
    health: Mutex<Health>,
}

/// The connection that the sending task uses; shared with the store, which drops it after a
/// failure so that the next batch connects afresh.
struct Link {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
}

/// One request's check, waiting in the queue.
struct Check {
    keys: [String; 2],
    principal_limit: u64,
    domain_limit: u64,
    lifetime_secs: u64,
    op: Op,
    reply: oneshot::Sender<Result<Decision, String>>,
}

#[derive(Debug)]
struct Health {
    down: bool,
    retry_at: Instant,
    backoff: Duration,
    probing: bool,
}

impl RedisStore {
    /// Prepares the store; nothing connects until the first request.
    pub fn new(domain: &str, config: &RedisConfig) -> Self {
        Self {
            domain: domain.to_owned(),
            link: Arc::new(Link {
                client: config.client.clone(),
                timeout: config.timeout,
                conn: Mutex::new(None),
            }),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            failure_mode: config.failure_mode,
            queue: OnceLock::new(),
            tags: Mutex::new(HashMap::new()),
            health: Mutex::new(Health {
                down: false,
                retry_at: Instant::now(),
                backoff: BACKOFF_FIRST,
                probing: false,
            }),
        }
    }

    /// Returns the handling of counted requests while Redis does not respond.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure_mode
    }

    /// Returns whether the last exchange with Redis succeeded (true before the first one).
    pub fn available(&self) -> bool {
        !self.health.lock().down
    }

    /// Runs `op` on the principal's and the domain's keys of `window`, waiting at most the
    /// configured timeout. Needs a Tokio runtime.
    pub async fn run(
        &self,
        op: Op,
        class: Class,
        principal: &str,
        limits: Limits,
        window: Window,
    ) -> Result<Decision, Unavailable> {
        let probe = self.admit(Instant::now())?;
        let (reply, answer) = oneshot::channel();
        let check = Check {
            keys: [
                self.key(class, Some(principal), window.hour),
                self.key(class, None, window.hour),
            ],
            principal_limit: limits.principal,
            domain_limit: limits.domain.unwrap_or(0),
            lifetime_secs: window.reset_secs + EXPIRY_MARGIN_SECS,
            op,
            reply,
        };
        let result = match self.queue().send(check) {
            Err(_) => Err("the Redis sending task has stopped".to_owned()),
            Ok(()) => match tokio::time::timeout(self.timeout, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the Redis sending task dropped the check".to_owned()),
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            },
        };
        match result {
            Ok(decision) => {
                self.succeeded();
                Ok(decision)
            }
            Err(reason) => Err(self.failed(&reason, probe.is_some())),
        }
    }

    /// Returns the key of one principal's (or, for `None`, the domain's) count in `hour`.
    ///
    /// The principal appears as the first 16 hex digits of its SHA-256, so user names and
    /// addresses are not stored in Redis.
    pub fn key(&self, class: Class, principal: Option<&str>, hour: u64) -> String {
        let tag = principal.map(|name| self.tag(name));
        let principal_part = tag.as_deref().unwrap_or("all");
        let mut hour_digits = itoa::Buffer::new();
        let hour = hour_digits.format(hour);
        let mut key = String::with_capacity(
            self.prefix.len() + self.domain.len() + principal_part.len() + hour.len() + 12,
        );
        for part in [&self.prefix, &self.domain, class.label(), principal_part] {
            key.push_str(part);
            key.push(':');
        }
        key.push_str(hour);
        key
    }

    /// Counts a request that reaches the origin, in the background when a Tokio runtime is
    /// running and at once in `local` otherwise. A count that Redis does not take is kept in
    /// `local`.
    pub fn spawn_add(
        self: &Arc<Self>,
        class: Class,
        principal: String,
        window: Window,
        local: Arc<ClassCounts>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            local.add(&principal, window.hour);
            return;
        };
        let store = Arc::clone(self);
        let no_limits = Limits {
            principal: u64::MAX,
            domain: None,
        };
        runtime.spawn(async move {
            match store
                .run(Op::Add, class, &principal, no_limits, window)
                .await
            {
                Ok(decision) => local.observe(&principal, window.hour, decision.counts()),
                Err(_) => {
                    local.add(&principal, window.hour);
                }
            }
        });
    }

    /// Returns the hashed key part of `principal`, from the memo when it is there.
    fn tag(&self, principal: &str) -> Arc<str> {
        if let Some(tag) = self.tags.lock().get(principal) {
            return Arc::clone(tag);
        }
        let tag: Arc<str> = hex16(&Sha256::digest(principal.as_bytes())).into();
        let mut tags = self.tags.lock();
        if tags.len() >= TAG_MEMO_ENTRIES {
            tags.clear();
        }
        tags.insert(principal.to_owned(), Arc::clone(&tag));
        tag
    }

    /// Returns the queue of the sending task, starting the task on first use.
    fn queue(&self) -> &mpsc::UnboundedSender<Check> {
        self.queue.get_or_init(|| {
            let (queue, checks) = mpsc::unbounded_channel();
            tokio::spawn(send_batches(Arc::clone(&self.link), checks));
            queue
        })
    }
    /// Decides whether a request may call Redis. While Redis is up, every request may. While
    /// it is down, only one request may once the backoff has passed: the probe (`Some`).
    fn admit(&self, now: Instant) -> Result<Option<ProbeGuard<'_>>, Unavailable> {
        let mut health = self.health.lock();
        if !health.down {
            return Ok(None);
        }
        if health.probing || now < health.retry_at {
            let wait = health.retry_at.saturating_duration_since(now);
            return Err(Unavailable {
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        health.probing = true;
        Ok(Some(ProbeGuard(self)))
    }

    fn succeeded(&self) {
        let mut health = self.health.lock();
        if health.down {
            health.down = false;
            health.backoff = BACKOFF_FIRST;
            info!(domain = %self.domain, "quota: Redis responds again; counting in Redis");
        }
    }

    /// Records a failure: the first one switches to the fallback, a failed probe doubles the
    /// backoff. The connection is dropped so the next try connects afresh.
    fn failed(&self, reason: &str, probe: bool) -> Unavailable {
        *self.link.conn.lock() = None;
        let now = Instant::now();
        let mut health = self.health.lock();
        if !health.down {
            health.down = true;
            health.backoff = BACKOFF_FIRST;
            health.retry_at = now + health.backoff;
            let fallback = match self.failure_mode {
                FailureMode::FailOpen => "counting in this process alone",
                FailureMode::FailClosed => "turning counted requests away (fail_closed)",
            };
            warn!(domain = %self.domain, error = %reason,
                "quota: Redis call failed; {fallback} until Redis responds again");
        } else if probe {
            health.backoff = (health.backoff * 2).min(BACKOFF_MAX);
            health.retry_at = now + health.backoff;
        }
        Unavailable {
            retry_after_secs: health
                .retry_at
                .saturating_duration_since(now)
                .as_secs()
                .max(1),
        }
    }
}

/// Sends the queued checks to Redis, a batch per round trip, until the store is dropped.
async fn send_batches(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Check>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A request that stopped waiting has fallen back already; counting it too would count
        // it twice.
        batch.retain(|check| !check.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        match link.eval(&batch).await {
            Ok(decisions) => {
                let mut refunds = Vec::new();
                for (check, decision) in batch.drain(..).zip(decisions) {
                    let counted = check.op != Op::Peek && matches!(decision, Decision::Allowed(_));
                    // The request gave up while its check was on the way and fell back; a
                    // count it made in Redis is taken back.
                    if check.reply.send(Ok(decision)).is_err() && counted {
                        refunds.extend(check.keys);
                    }
                }
                if !refunds.is_empty() {
                    if let Err(e) = link.refund(&refunds).await {
                        warn!(error = %e, keys = refunds.len(),
                            "quota: cannot take back counts of requests that stopped waiting for Redis");
                    }
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for check in batch.drain(..) {
                    let _ = check.reply.send(Err(reason.clone()));
                }
            }
        }
    }
}

impl Link {
    /// Runs the script on `batch`; returns one decision per check, in order.
    async fn eval(&self, batch: &[Check]) -> RedisResult<Vec<Decision>> {
        let mut conn = self.connection().await?;
        let mut invocation = SCRIPT.prepare_invoke();
        for check in batch {
            invocation
                .key(check.keys[0].as_str())
                .key(check.keys[1].as_str())
                .arg(check.principal_limit)
                .arg(check.domain_limit)
                .arg(check.lifetime_secs)
                .arg(check.op.label());
        }
        let reply: String = invocation.invoke_async(&mut conn).await?;
        parse_decisions(&reply, batch.len()).ok_or_else(|| {
            let excerpt: String = reply.chars().take(80).collect();
            redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected reply from the quota script",
                format!("{} checks, reply {excerpt:?}", batch.len()),
            ))
        })
    }

    /// Lowers each of `keys` by one, not below zero.
    async fn refund(&self, keys: &[String]) -> RedisResult<()> {
        let mut conn = self.connection().await?;
        let mut invocation = REFUND_SCRIPT.prepare_invoke();
        for key in keys {
            invocation.key(key.as_str());
        }
        invocation.invoke_async::<i64>(&mut conn).await.map(|_| ())
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.conn.lock().clone() {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout + LATE_REPLY_WAIT);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.conn.lock() = Some(conn.clone());
        Ok(conn)
    }
}

/// Parses the script's reply: four numbers per check. `None` when it does not hold exactly
/// `checks` groups of numbers.
fn parse_decisions(reply: &str, checks: usize) -> Option<Vec<Decision>> {
    let mut numbers = reply.split_ascii_whitespace().map(str::parse::<u64>);
    let mut decisions = Vec::with_capacity(checks);
    for _ in 0..checks {
        let mut next = || numbers.next()?.ok();
        let (allowed, principal, domain, scope) = (next()?, next()?, next()?, next()?);
        let counts = Counts { principal, domain };
        decisions.push(match (allowed, scope) {
            (1, _) => Decision::Allowed(counts),
            (_, 2) => Decision::Rejected(Scope::Domain, counts),
            _ => Decision::Rejected(Scope::Principal, counts),
        });
    }
    numbers.next().is_none().then_some(decisions)
}

/// Ends a probe when dropped, also when the request is cancelled mid-way.
struct ProbeGuard<'a>(&'a RedisStore);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.health.lock().probing = false;
    }
}

/// Formats the first 8 bytes of `digest` as 16 lower-case hex digits.
fn hex16(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(16);
    for byte in digest.iter().take(8) {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_group_per_check() {
        let decisions = parse_decisions("1 3 9 0 0 5 9 1 0 2 10 2", 3).expect("three checks");
        let counts = |principal, domain| Counts { principal, domain };
        assert_eq!(
            decisions,
            vec![
                Decision::Allowed(counts(3, 9)),
                Decision::Rejected(Scope::Principal, counts(5, 9)),
                Decision::Rejected(Scope::Domain, counts(2, 10)),
            ]
        );
    }

    #[test]
    fn rejects_malformed_replies() {
        assert_eq!(parse_decisions("1 3 9", 1), None);
        assert_eq!(parse_decisions("1 3 9 0 1", 1), None);
        assert_eq!(parse_decisions("1 3 x 0", 1), None);
        assert_eq!(parse_decisions("1 3 9 0", 2), None);
        assert_eq!(parse_decisions("", 0), Some(Vec::new()));
    }
}
