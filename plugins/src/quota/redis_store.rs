//! The shared store: counts in Redis, one key per domain, class, principal and hour, checked
//! and counted by one Lua script, so every replica works on the same counts.
//!
//! Requests do not call Redis one by one. Each puts its check in a queue, and one task per store
//! sends whatever is queued as one script call (up to [`MAX_BATCH`] checks). Redis runs the call
//! atomically. Checks with the same keys, limits and operation form one group, which the script
//! counts in one step. Each request of a group gets the decision it would get if the checks
//! were made one after the other. Under load a round trip carries many requests, and a lone
//! request waits for one round trip.
//!
//! Each check carries its deadline (the configured timeout after the request queued it), and
//! the sending task replies to every check by then. A check whose deadline passed in the queue,
//! or whose request went away, is dropped instead of counted. A call that Redis has not replied
//! to by the earliest deadline of its batch fails every check in it. Requests thus need no
//! timer of their own. A check already on the way is counted by Redis; when the reply comes within
//! [`LATE_REPLY_WAIT`] after the deadline, the count is taken back. A Redis that stalls for
//! longer than that and then runs the check leaves it counted.
//!
//! While Redis does not respond, [`RedisStore::run`] returns [`Unavailable`] at once, without
//! waiting, and the caller falls back (see the plugin's failure mode). One request probes Redis
//! again after a backoff that starts at 250 ms and doubles up to 5 s. The switch to the fallback
//! and the recovery are each logged once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Script};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::config::{FailureMode, RedisConfig};
use super::store::{over_budget, Class, ClassCounts, Counts, Decision, Limits, Scope};
use super::window::Window;
use super::PrincipalName;

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
/// Keys remembered per request class. The memo starts afresh when full or when the hour turns.
const KEY_MEMO_ENTRIES: usize = 65_536;

/// Checks and counts atomically, for a batch of groups of checks in order. A group is the checks
/// with the same keys, limits and operation. The script takes each group as one step, with the
/// result of running its checks one after the other. ARGV[1] is the keys' lifetime in seconds.
/// For group `i` (from 0), KEYS[2i+1] is the principal's key and KEYS[2i+2] the domain's.
/// ARGV[4i+2..4i+5] are the principal limit, the domain limit (0 for none), the operation and
/// the number of checks. The operation is `count` (count as many as both budgets take), `peek`
/// (check only) or `add` (count all without a check). A count increments first and takes back
/// what does not fit, so a group that fits, the common case, costs two commands. The result is
/// one string with three numbers per group, separated by spaces: how many checks were counted,
/// then the principal's and the domain's counts before the group. They are formatted with `%d`
/// because Lua's own number formatting writes 10^14 and more with an exponent.
/// NOTE: Lua numbers are doubles, so budgets above 2^53 are compared after rounding.
const SCRIPT_SOURCE: &str = r"
local out = {}
local lifetime = ARGV[1]
for i = 0, (#ARGV - 1) / 4 - 1 do
  local pk, dk = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local limit = tonumber(ARGV[4 * i + 2])
  local ceiling = tonumber(ARGV[4 * i + 3])
  local op = ARGV[4 * i + 4]
  local size = tonumber(ARGV[4 * i + 5])
  local counted, p, d = 0, 0, 0
  if op == 'peek' then
    p = tonumber(redis.call('GET', pk) or '0')
    d = tonumber(redis.call('GET', dk) or '0')
  else
    p = redis.call('INCRBY', pk, size) - size
    if p == 0 then redis.call('EXPIRE', pk, lifetime) end
    counted = size
    if op ~= 'add' then counted = math.max(0, math.min(size, limit - p)) end
    if counted < size then redis.call('DECRBY', pk, size - counted) end
    if counted > 0 then
      d = redis.call('INCRBY', dk, counted) - counted
      if d == 0 then redis.call('EXPIRE', dk, lifetime) end
      if op ~= 'add' and ceiling > 0 and d + counted > ceiling then
        local excess = math.min(counted, d + counted - ceiling)
        redis.call('DECRBY', dk, excess)
        redis.call('DECRBY', pk, excess)
        counted = counted - excess
      end
    else
      d = tonumber(redis.call('GET', dk) or '0')
    end
  end
  out[#out + 1] = string.format('%d %d %d', counted, p, d)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The keys of this hour's recent principals and of the domain, so that a request builds
    /// and hashes none.
    keys: Mutex<KeyMemo>,
    health: Mutex<Health>,
    /// A copy of `health.down`, written under its lock, so that requests need not take the lock
    /// while Redis is up.
    down: AtomicBool,
}

/// The keys of one hour, per request class.
#[derive(Default)]
struct KeyMemo {
    hour: u64,
    principals: [HashMap<Box<[u8]>, Arc<str>, RandomState>; 2],
    domain: [Option<Arc<str>>; 2],
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
    call: Call,
    /// The instant the request stops waiting, by which the sending task must reply.
    deadline: Instant,
    reply: oneshot::Sender<Result<Decision, String>>,
}

/// The part of a check that goes to Redis.
struct Call {
    keys: [Arc<str>; 2],
    limits: Limits,
    lifetime_secs: u64,
    op: Op,
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
            keys: Mutex::new(KeyMemo::default()),
            down: AtomicBool::new(false),
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
        !self.down.load(Ordering::Acquire)
    }

    /// Runs `op` on the principal's and the domain's keys of `window`, waiting at most the
    /// configured timeout. Needs a Tokio runtime.
    pub async fn run(
        &self,
        op: Op,
        class: Class,
        principal: &[u8],
        limits: Limits,
        window: Window,
    ) -> Result<Decision, Unavailable> {
        let now = Instant::now();
        let probe = self.admit(now)?;
        let (reply, answer) = oneshot::channel();
        let check = Check {
            call: Call {
                keys: self.keys(class, principal, window.hour),
                limits,
                lifetime_secs: window.reset_secs + EXPIRY_MARGIN_SECS,
                op,
            },
            deadline: now + self.timeout,
            reply,
        };
        // The sending task replies by the deadline, so this waits no longer than that.
        let result = match self.queue().send(check) {
            Err(_) => Err("the Redis sending task has stopped".to_owned()),
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err("the Redis sending task dropped the check".to_owned())),
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
    pub fn key(&self, class: Class, principal: Option<&[u8]>, hour: u64) -> String {
        let tag = principal.map(|name| hex16(&Sha256::digest(name)));
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
        principal: PrincipalName,
        window: Window,
        local: Arc<ClassCounts>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            local.add(principal.as_bytes(), window.hour);
            return;
        };
        let store = Arc::clone(self);
        let no_limits = Limits {
            principal: u64::MAX,
            domain: None,
        };
        runtime.spawn(async move {
            match store
                .run(Op::Add, class, principal.as_bytes(), no_limits, window)
                .await
            {
                Ok(decision) => {
                    local.observe(principal.as_bytes(), window.hour, decision.counts());
                }
                Err(_) => {
                    local.add(principal.as_bytes(), window.hour);
                }
            }
        });
    }

    /// Returns the keys of `principal` and of the domain in `class` and `hour`, from the memo
    /// when they are there.
    fn keys(&self, class: Class, principal: &[u8], hour: u64) -> [Arc<str>; 2] {
        let slot = class as usize;
        let mut memo = self.keys.lock();
        if memo.hour != hour {
            *memo = KeyMemo {
                hour,
                ..KeyMemo::default()
            };
        }
        let own = match memo.principals[slot].get(principal) {
            Some(key) => Arc::clone(key),
            None => {
                let key: Arc<str> = self.key(class, Some(principal), hour).into();
                let principals = &mut memo.principals[slot];
                if principals.len() >= KEY_MEMO_ENTRIES {
                    principals.clear();
                }
                principals.insert(Box::from(principal), Arc::clone(&key));
                key
            }
        };
        let domain =
            Arc::clone(memo.domain[slot].get_or_insert_with(|| self.key(class, None, hour).into()));
        [own, domain]
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
        if !self.down.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut health = self.health.lock();
        if !health.down {
            return Ok(None);
        }
        if health.probing || now < health.retry_at {
            return Err(Unavailable {
                retry_after_secs: whole_secs_until(health.retry_at, now),
            });
        }
        health.probing = true;
        Ok(Some(ProbeGuard(self)))
    }

    fn succeeded(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut health = self.health.lock();
        if health.down {
            health.down = false;
            self.down.store(false, Ordering::Release);
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
            self.down.store(true, Ordering::Release);
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
            retry_after_secs: whole_secs_until(health.retry_at, now),
        }
    }
}

/// Returns the seconds from `now` until `then`, rounded up and at least 1. A client that waits
/// that long comes back after the next try of Redis.
fn whole_secs_until(then: Instant, now: Instant) -> u64 {
    let wait = then.saturating_duration_since(now);
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Sends the queued checks to Redis, a batch per round trip, until the store is dropped.
async fn send_batches(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Check>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let now = Instant::now();
        let mut calls = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut deadline = None::<Instant>;
        for check in batch.drain(..) {
            if check.reply.is_closed() {
                // The request went away, so it is not counted.
                continue;
            }
            if check.deadline <= now {
                let _ = check.reply.send(Err(link.no_answer()));
                continue;
            }
            deadline = Some(deadline.map_or(check.deadline, |d| d.min(check.deadline)));
            calls.push(check.call);
            replies.push(check.reply);
        }
        let Some(deadline) = deadline else {
            continue;
        };
        let call_link = Arc::clone(&link);
        let mut call = Box::pin(async move {
            let result = call_link.eval(&calls).await;
            (result, calls)
        });
        match tokio::time::timeout_at(deadline.into(), &mut call).await {
            Ok((result, calls)) => answer(&link, result, &calls, replies),
            Err(_) => {
                for reply in replies {
                    let _ = reply.send(Err(link.no_answer()));
                }
                // Every request of the batch has fallen back. Redis may still run the call, so
                // its counts are taken back when the reply comes, if it comes within the
                // connection's response timeout.
                let late_link = Arc::clone(&link);
                tokio::spawn(async move {
                    let (result, calls) = call.await;
                    answer(&late_link, result, &calls, Vec::new());
                });
            }
        }
    }
}

/// Sends each check of a call its decision, in order, and takes back the counts of checks whose
/// request no longer waits: those past `replies` and those whose request went away. The counts
/// are taken back in a task of their own, so that the sending task never waits for Redis
/// beyond the deadlines of the checks it sent.
fn answer(
    link: &Arc<Link>,
    result: RedisResult<Vec<Decision>>,
    calls: &[Call],
    replies: Vec<oneshot::Sender<Result<Decision, String>>>,
) {
    let decisions = match result {
        Ok(decisions) => decisions,
        Err(e) => {
            let reason = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(reason.clone()));
            }
            return;
        }
    };
    let mut replies = replies.into_iter();
    let mut refunds = Vec::new();
    for (call, decision) in calls.iter().zip(decisions) {
        let counted = call.op != Op::Peek && matches!(decision, Decision::Allowed(_));
        let delivered = replies
            .next()
            .is_some_and(|reply| reply.send(Ok(decision)).is_ok());
        if counted && !delivered {
            refunds.extend(call.keys.iter().cloned());
        }
    }
    if !refunds.is_empty() {
        let link = Arc::clone(link);
        tokio::spawn(async move {
            if let Err(e) = link.refund(&refunds).await {
                warn!(error = %e, keys = refunds.len(),
                    "quota: cannot take back counts of requests that stopped waiting for Redis");
            }
        });
    }
}

impl Link {
    /// Runs the script on `calls` and returns one decision per call, in order.
    async fn eval(&self, calls: &[Call]) -> RedisResult<Vec<Decision>> {
        let mut conn = self.connection().await?;
        let (groups, group_of) = group(calls);
        // The command is built by hand: `Script::prepare_invoke` would allocate once per
        // argument, and a command keeps all of its arguments in one buffer.
        let mut command = redis::cmd("EVALSHA");
        command.arg(SCRIPT.get_hash()).arg(groups.len() * 2);
        for group in &groups {
            let keys = &calls[group.first].keys;
            command.arg(&*keys[0]).arg(&*keys[1]);
        }
        // Keys of one hour die together, with the latest lifetime of the batch.
        let lifetime = calls.iter().map(|c| c.lifetime_secs).max().unwrap_or(0);
        command.arg(lifetime);
        for group in &groups {
            let call = &calls[group.first];
            command
                .arg(call.limits.principal)
                .arg(call.limits.domain.unwrap_or(0))
                .arg(call.op.label())
                .arg(group.size);
        }
        let reply: Vec<u8> = match command.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                SCRIPT.load_async(&mut conn).await?;
                command.query_async(&mut conn).await?
            }
            reply => reply?,
        };
        let Some(outcomes) = parse_outcomes(&reply, &groups) else {
            let excerpt: String = String::from_utf8_lossy(&reply).chars().take(80).collect();
            return Err(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected reply from the quota script",
                format!("{} groups of checks, reply {excerpt:?}", groups.len()),
            )));
        };
        let mut seen = vec![0; groups.len()];
        let decisions = calls
            .iter()
            .zip(group_of)
            .map(|(call, g)| {
                let nth = seen[g];
                seen[g] += 1;
                outcomes[g].decision(call, nth)
            })
            .collect();
        Ok(decisions)
    }

    /// Lowers each of `keys` by one, not below zero.
    async fn refund(&self, keys: &[Arc<str>]) -> RedisResult<()> {
        let mut conn = self.connection().await?;
        let mut invocation = REFUND_SCRIPT.prepare_invoke();
        for key in keys {
            invocation.key(&**key);
        }
        invocation.invoke_async::<i64>(&mut conn).await.map(|_| ())
    }

    /// Returns the error of a check not answered within the timeout.
    fn no_answer(&self) -> String {
        format!("no answer within {} ms", self.timeout.as_millis())
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

/// Checks of one batch that the script takes as one step: those with the same keys, limits
/// and operation. `first` is the index of the first of them in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    first: usize,
    size: u64,
}

/// The number of groups searched for a check's group. A check that matches none of them starts a
/// group of its own, so the work per check stays bounded when a batch has many principals.
const GROUP_SEARCH: usize = 32;

/// Sorts `calls` into groups, in the order of each group's first check, and returns the groups
/// and the group of each call. Keys are compared by address, because a store hands out one key
/// per principal and hour, so two checks of one principal share it.
fn group(calls: &[Call]) -> (Vec<Group>, Vec<usize>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of = Vec::with_capacity(calls.len());
    for (index, call) in calls.iter().enumerate() {
        let same = |group: &Group| {
            let other = &calls[group.first];
            Arc::ptr_eq(&other.keys[0], &call.keys[0])
                && Arc::ptr_eq(&other.keys[1], &call.keys[1])
                && other.limits == call.limits
                && other.op == call.op
        };
        match groups.iter().take(GROUP_SEARCH).position(same) {
            Some(g) => {
                groups[g].size += 1;
                group_of.push(g);
            }
            None => {
                group_of.push(groups.len());
                groups.push(Group {
                    first: index,
                    size: 1,
                });
            }
        }
    }
    (groups, group_of)
}

/// The script's result for one group: how many of its checks it counted, and the counts before
/// the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    counted: u64,
    before: Counts,
}

impl Outcome {
    /// Returns the decision for `call`, the `nth` check of the group (from 0): the one it would
    /// get if the group's checks ran one after the other.
    fn decision(&self, call: &Call, nth: u64) -> Decision {
        let after = |n: u64| Counts {
            principal: self.before.principal.saturating_add(n),
            domain: self.before.domain.saturating_add(n),
        };
        if call.op == Op::Peek {
            return match over_budget(call.limits, self.before) {
                Some(scope) => Decision::Rejected(scope, self.before),
                None => Decision::Allowed(self.before),
            };
        }
        if nth < self.counted {
            return Decision::Allowed(after(nth + 1));
        }
        let counts = after(self.counted);
        let scope = over_budget(call.limits, counts).unwrap_or(Scope::Principal);
        Decision::Rejected(scope, counts)
    }
}

/// Parses the script's reply: three numbers per group, each followed by one space but the
/// last. Returns `None` when the reply does not contain exactly one outcome per group, or
/// counts more checks than a group has.
fn parse_outcomes(reply: &[u8], groups: &[Group]) -> Option<Vec<Outcome>> {
    let mut numbers = reply.split(|&b| b == b' ').map(parse_number);
    let mut outcomes = Vec::with_capacity(groups.len());
    for group in groups {
        let mut next = || numbers.next()?;
        let (counted, principal, domain) = (next()?, next()?, next()?);
        if counted > group.size {
            return None;
        }
        outcomes.push(Outcome {
            counted,
            before: Counts { principal, domain },
        });
    }
    // An empty reply splits into one empty piece, which is no number.
    let rest = numbers.next();
    (rest.is_none() || (groups.is_empty() && reply.is_empty())).then_some(outcomes)
}

/// Parses decimal digits; `None` for anything else, an empty piece or an overflow.
fn parse_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
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
    use crate::quota::store::Registry;

    fn groups(sizes: &[u64]) -> Vec<Group> {
        sizes.iter().map(|&size| Group { first: 0, size }).collect()
    }

    #[test]
    fn retry_after_rounds_up() {
        let now = Instant::now();
        let after = |millis| whole_secs_until(now + Duration::from_millis(millis), now);
        assert_eq!(after(0), 1);
        assert_eq!(after(250), 1);
        assert_eq!(after(1000), 1);
        assert_eq!(after(1001), 2);
        assert_eq!(after(4500), 5);
        assert_eq!(whole_secs_until(now, now + Duration::from_secs(3)), 1);
    }

    #[test]
    fn parses_one_outcome_per_group() {
        let outcomes = parse_outcomes(b"2 3 9 0 5 9 1 2 10", &groups(&[2, 1, 1])).expect("three");
        let outcome = |counted, principal, domain| Outcome {
            counted,
            before: Counts { principal, domain },
        };
        assert_eq!(
            outcomes,
            vec![outcome(2, 3, 9), outcome(0, 5, 9), outcome(1, 2, 10)]
        );
    }

    #[test]
    fn rejects_malformed_replies() {
        let one = groups(&[1]);
        assert_eq!(parse_outcomes(b"0 3", &one), None);
        assert_eq!(parse_outcomes(b"0 3 9 1", &one), None);
        assert_eq!(parse_outcomes(b"0 3 x", &one), None);
        assert_eq!(parse_outcomes(b"0 3 9", &groups(&[1, 1])), None);
        assert_eq!(parse_outcomes(b"0 3 9 ", &one), None);
        assert_eq!(parse_outcomes(b"0  3 9", &one), None);
        assert_eq!(parse_outcomes(b"0 3 -9", &one), None);
        assert_eq!(parse_outcomes(b"0 3 99999999999999999999", &one), None);
        assert_eq!(
            parse_outcomes(b"2 3 9", &one),
            None,
            "counted more than the group"
        );
        assert_eq!(parse_outcomes(b"", &one), None);
        assert_eq!(parse_outcomes(b"", &[]), Some(Vec::new()));
    }

    fn call(keys: &[Arc<str>; 2], principal: u64, domain: Option<u64>, op: Op) -> Call {
        Call {
            keys: keys.clone(),
            limits: Limits { principal, domain },
            lifetime_secs: 60,
            op,
        }
    }

    #[test]
    fn groups_share_keys_limits_and_operation() {
        let a: [Arc<str>; 2] = ["p:a".into(), "d".into()];
        let b: [Arc<str>; 2] = ["p:b".into(), Arc::clone(&a[1])];
        // A key with equal text in another allocation starts another group. That is still
        // correct, only not merged.
        let a_again: [Arc<str>; 2] = ["p:a".into(), Arc::clone(&a[1])];
        let calls = [
            call(&a, 5, None, Op::Count),
            call(&b, 5, None, Op::Count),
            call(&a, 5, None, Op::Count),
            call(&a, 6, None, Op::Count),
            call(&a, 5, None, Op::Peek),
            call(&a, 5, Some(9), Op::Count),
            call(&a_again, 5, None, Op::Count),
            call(&b, 5, None, Op::Count),
        ];
        let (groups, group_of) = group(&calls);
        assert_eq!(group_of, [0, 1, 0, 2, 3, 4, 5, 1]);
        let sizes: Vec<_> = groups.iter().map(|g| (g.first, g.size)).collect();
        assert_eq!(sizes, [(0, 2), (1, 2), (3, 1), (4, 1), (5, 1), (6, 1)]);
    }

    #[test]
    fn group_search_is_bounded() {
        let calls: Vec<Call> = (0..GROUP_SEARCH + 2)
            .map(|i| call(&[format!("p:{i}").into(), "d".into()], 5, None, Op::Count))
            .chain(std::iter::once(call(
                &["late".into(), "d".into()],
                5,
                None,
                Op::Count,
            )))
            .collect();
        let mut calls = calls;
        // The last check repeats a group past the searched ones, so it starts its own.
        let last = calls.len() - 1;
        calls[last].keys = calls[GROUP_SEARCH + 1].keys.clone();
        let (groups, group_of) = group(&calls);
        assert_eq!(groups.len(), calls.len());
        assert_eq!(group_of[last], last);
        // One within the searched groups joins it.
        calls[last].keys = calls[3].keys.clone();
        let (groups, group_of) = group(&calls);
        assert_eq!(groups.len(), calls.len() - 1);
        assert_eq!(group_of[last], 3);
    }

    /// The decisions of a group match those of a store that takes the checks one at a time.
    #[test]
    fn outcomes_match_checks_one_by_one() {
        let keys: [Arc<str>; 2] = ["p".into(), "d".into()];
        for (limit, ceiling) in [(5, None), (5, Some(7)), (9, Some(4)), (1, Some(1))] {
            for (p0, d0) in [(0, 0), (3, 3), (4, 6), (5, 2), (0, 9), (7, 7)] {
                for size in 1..=6u64 {
                    let limits = Limits {
                        principal: limit,
                        domain: ceiling,
                    };
                    // One by one, as the local store counts.
                    let mut now = Counts {
                        principal: p0,
                        domain: d0,
                    };
                    let mut expected = Vec::new();
                    for _ in 0..size {
                        expected.push(match over_budget(limits, now) {
                            Some(scope) => Decision::Rejected(scope, now),
                            None => {
                                now.principal += 1;
                                now.domain += 1;
                                Decision::Allowed(now)
                            }
                        });
                    }
                    // As the script counts a group: as many as both budgets take.
                    let fits = |count: u64, budget: Option<u64>| {
                        budget.map_or(size, |b| b.saturating_sub(count).min(size))
                    };
                    let outcome = Outcome {
                        counted: fits(p0, Some(limit)).min(fits(d0, ceiling)),
                        before: Counts {
                            principal: p0,
                            domain: d0,
                        },
                    };
                    let check = call(&keys, limit, ceiling, Op::Count);
                    let got: Vec<_> = (0..size).map(|n| outcome.decision(&check, n)).collect();
                    assert_eq!(got, expected, "limit {limit} {ceiling:?} from {p0}/{d0}");
                }
            }
        }
    }

    /// A `redis-server` child on a free loopback port, without persistence, killed by PID when
    /// dropped.
    struct Server {
        child: std::process::Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Server {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port();
            let dir = tempfile::tempdir().expect("tempdir");
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server runs (Debian package redis-server)");
            Self {
                child,
                port,
                _dir: dir,
            }
        }

        /// Connects, waiting up to 10 s for the server to listen. Returns the store's link and
        /// a plain connection for setting up and reading keys.
        fn connect(&self) -> (Link, redis::Connection) {
            let client =
                redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port)).expect("url");
            let deadline = Instant::now() + Duration::from_secs(10);
            let admin = loop {
                match client.get_connection() {
                    Ok(conn) => break conn,
                    Err(e) if Instant::now() > deadline => panic!("redis-server: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let link = Link {
                client,
                timeout: Duration::from_secs(5),
                conn: Mutex::new(None),
            };
            (link, admin)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The script in a real Redis gives the decisions and totals of the local store. Each batch
    /// mixes principals that share the domain's key, operations and budgets. The local store
    /// takes the same checks one at a time, group after group.
    #[tokio::test]
    async fn script_matches_local_store_in_redis() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let domain: Arc<str> = "d".into();
        let principals: Vec<Arc<str>> = (0..40).map(|i| format!("p:{i}").into()).collect();
        let unlimited = Limits {
            principal: u64::MAX,
            domain: None,
        };
        let hour = 1;
        for round in 0..300 {
            redis::cmd("FLUSHDB")
                .query::<()>(&mut admin)
                .expect("FLUSHDB");
            let local = Registry::new().counts("d", Class::Index);
            let used = [1, 2, 4, 40][next(4) as usize];
            let mut preset = Vec::new();
            for key in principals.iter().take(used).chain([&domain]) {
                if next(2) == 0 {
                    let count = next(if Arc::ptr_eq(key, &domain) { 25 } else { 9 });
                    redis::cmd("SET")
                        .arg(&**key)
                        .arg(count)
                        .query::<()>(&mut admin)
                        .expect("SET");
                    let name = (!Arc::ptr_eq(key, &domain)).then_some(key.as_bytes());
                    local.restore(name, hour, count);
                    preset.push(Arc::clone(key));
                }
            }
            let ceiling = [None, Some(1), Some(3), Some(8), Some(20)][next(5) as usize];
            let calls: Vec<Call> = (0..=next(MAX_BATCH as u64))
                .map(|_| {
                    let key = &principals[next(used as u64) as usize];
                    let (op, limits) = match next(8) {
                        0 => (Op::Add, unlimited),
                        1 => (
                            Op::Peek,
                            Limits {
                                principal: 1 + next(7),
                                domain: ceiling,
                            },
                        ),
                        2 => (
                            Op::Count,
                            Limits {
                                principal: u64::MAX,
                                domain: ceiling,
                            },
                        ),
                        _ => (
                            Op::Count,
                            Limits {
                                principal: 1 + next(7),
                                domain: ceiling,
                            },
                        ),
                    };
                    call(
                        &[Arc::clone(key), Arc::clone(&domain)],
                        limits.principal,
                        limits.domain,
                        op,
                    )
                })
                .collect();
            let got = link.eval(&calls).await.expect("script runs");
            // One at a time in the order of the groups, as the script takes them.
            let (_, group_of) = group(&calls);
            let mut order: Vec<usize> = (0..calls.len()).collect();
            order.sort_by_key(|&i| (group_of[i], i));
            let mut expected = vec![None; calls.len()];
            for i in order {
                let (name, limits) = (calls[i].keys[0].as_bytes(), calls[i].limits);
                expected[i] = Some(match calls[i].op {
                    Op::Count => local.try_count(name, limits, hour),
                    Op::Peek => local.peek(name, limits, hour),
                    Op::Add => Decision::Allowed(local.add(name, hour)),
                });
            }
            let expected: Vec<Decision> = expected.into_iter().flatten().collect();
            assert_eq!(got, expected, "round {round}");
            for key in principals.iter().take(used).chain([&domain]) {
                let stored: Option<u64> = redis::cmd("GET")
                    .arg(&**key)
                    .query(&mut admin)
                    .expect("GET");
                let counts = local.peek(key.as_bytes(), unlimited, hour).counts();
                let want = if Arc::ptr_eq(key, &domain) {
                    counts.domain
                } else {
                    counts.principal
                };
                assert_eq!(stored.unwrap_or(0), want, "round {round}, {key}");
                let ttl: i64 = redis::cmd("TTL")
                    .arg(&**key)
                    .query(&mut admin)
                    .expect("TTL");
                let fresh = !preset.iter().any(|k| Arc::ptr_eq(k, key));
                assert!(
                    stored.is_none() || !fresh || ttl > 0,
                    "{key} lives for ever"
                );
            }
        }
    }

    /// Counts of 10^14 and more come back as plain digits, which Lua would otherwise write with
    /// an exponent.
    #[tokio::test]
    async fn script_returns_large_counts() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        let big = 9_007_199_254_740_000_u64;
        redis::cmd("SET")
            .arg("p:big")
            .arg(big)
            .query::<()>(&mut admin)
            .expect("SET");
        let keys: [Arc<str>; 2] = ["p:big".into(), "d".into()];
        let calls = [
            call(&keys, u64::MAX, None, Op::Add),
            call(&keys, u64::MAX, None, Op::Add),
        ];
        let got = link.eval(&calls).await.expect("script runs");
        let counts = |n: u64| Counts {
            principal: big + n,
            domain: n,
        };
        assert_eq!(
            got,
            [Decision::Allowed(counts(1)), Decision::Allowed(counts(2))]
        );
    }
}
