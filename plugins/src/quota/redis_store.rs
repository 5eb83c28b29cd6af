//! The shared store: counts in Redis, one key per domain, class, principal and hour, checked
//! and counted by one Lua script, so every replica works on the same counts.
//!
//! While Redis does not respond, [`RedisStore::run`] returns [`Unavailable`] at once, without
//! waiting, and the caller falls back (see the plugin's failure mode). One request probes Redis
//! again after a backoff that starts at 250 ms and doubles up to 5 s. The switch to the fallback
//! and the recovery are each logged once.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Script};
use sha2::{Digest, Sha256};
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

/// Checks and counts atomically. KEYS: the principal's key, the domain's key. ARGV: the
/// principal limit, the domain limit (0 for none), the keys' lifetime in seconds, and the
/// operation: `count` (check, then count if both fit), `peek` (check only) or `add` (count
/// without a check). Returns {allowed, principal count, domain count, scope}, where scope is
/// 1 for the principal's budget and 2 for the domain's when the request does not fit.
const SCRIPT_SOURCE: &str = r"
local p = tonumber(redis.call('GET', KEYS[1]) or '0')
local d = tonumber(redis.call('GET', KEYS[2]) or '0')
local op = ARGV[4]
if op ~= 'add' then
  if p >= tonumber(ARGV[1]) then return {0, p, d, 1} end
  local ceiling = tonumber(ARGV[2])
  if ceiling > 0 and d >= ceiling then return {0, p, d, 2} end
  if op == 'peek' then return {1, p, d, 0} end
end
p = redis.call('INCR', KEYS[1])
d = redis.call('INCR', KEYS[2])
if p == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if d == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return {1, p, d, 0}
";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SCRIPT_SOURCE));

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
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    failure_mode: FailureMode,
    conn: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    health: Mutex<Health>,
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
            client: config.client.clone(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            failure_mode: config.failure_mode,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
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
    /// configured timeout.
    pub async fn run(
        &self,
        op: Op,
        class: Class,
        principal: &str,
        limits: Limits,
        window: Window,
    ) -> Result<Decision, Unavailable> {
        let probe = self.admit(Instant::now())?;
        let attempt = self.eval(op, class, principal, limits, window);
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(decision)) => Ok(decision),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
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
        let who = match principal {
            Some(name) => hex16(&Sha256::digest(name.as_bytes())),
            None => "all".to_owned(),
        };
        format!(
            "{}:{}:{}:{who}:{hour}",
            self.prefix,
            self.domain,
            class.label()
        )
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

    async fn eval(
        &self,
        op: Op,
        class: Class,
        principal: &str,
        limits: Limits,
        window: Window,
    ) -> RedisResult<Decision> {
        let mut conn = self.connection().await?;
        let (allowed, principal_count, domain_count, scope): (i64, u64, u64, i64) = SCRIPT
            .key(self.key(class, Some(principal), window.hour))
            .key(self.key(class, None, window.hour))
            .arg(limits.principal)
            .arg(limits.domain.unwrap_or(0))
            .arg(window.reset_secs + EXPIRY_MARGIN_SECS)
            .arg(op.label())
            .invoke_async(&mut conn)
            .await?;
        let counts = Counts {
            principal: principal_count,
            domain: domain_count,
        };
        Ok(match (allowed, scope) {
            (1, _) => Decision::Allowed(counts),
            (_, 2) => Decision::Rejected(Scope::Domain, counts),
            _ => Decision::Rejected(Scope::Principal, counts),
        })
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.conn.lock().clone() {
            return Ok(conn);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(conn) = self.conn.lock().clone() {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.conn.lock() = Some(conn.clone());
        Ok(conn)
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
        *self.conn.lock() = None;
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
