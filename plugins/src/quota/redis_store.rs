//! The shared store: counts in Redis, one key per domain, class, principal and hour, checked
//! and counted by one Lua script, so every replica works on the same counts.
//!
//! Requests do not call Redis one by one. Each puts its check in a queue, and one task per store
//! sends whatever is queued as one script call (up to [`MAX_BATCH`] checks). Checks that queue
//! while a call is on the way wait for its reply and then go out together, but for at most
//! 1/[`QUEUE_WAIT_DIVISOR`] of the timeout. Then they go out in a call of their own, with up to
//! [`MAX_CALLS_IN_FLIGHT`] calls on the way at once, each over a connection of its own. So a check
//! whose round trip takes up to 7/8 of the timeout gets its reply in time, also under load.
//! Redis runs each call atomically, so the counts stay exact in whatever order the calls run.
//! Checks with the same keys, limits and operation form one group, which the script counts in
//! one step. Each request of a group gets the decision it would get if the checks were made one
//! after the other. Under load a round trip carries many requests, and a lone request waits for
//! one round trip.
//!
//! Each check carries its deadline (the configured timeout after the request queued it), and
//! the task that runs its call replies to every check by then. A check whose deadline passed in
//! the queue, or whose request went away, is dropped instead of counted. A call that Redis has
//! not replied to by the earliest deadline of its batch fails every check in it. Requests thus
//! need no timer of their own. A check already on the way is counted by Redis; when the reply
//! comes within [`LATE_REPLY_WAIT`] after the deadline, the count is taken back. A Redis that
//! stalls for longer than that and then runs the check leaves it counted.
//!
//! A key is unusable when its value is not a count the script can use: a decimal integer from
//! 0 to 2^53 - 1, stored as a string. An unusable key fails only the checks on that key. They
//! fall back as while Redis is unavailable, but the store stays available and its backoff is
//! untouched. A warning names the key, at most once per [`UNUSABLE_KEY_WARN_EVERY`].
//!
//! While Redis does not respond, [`RedisStore::run`] returns [`Unavailable`] at once, without
//! waiting, and the caller falls back (see the plugin's failure mode). One request probes Redis
//! again after a backoff that starts at 250 ms and doubles up to 5 s. The switch to the fallback
//! and the recovery are each logged once.
//!
//! A principal with room in its budgets gets a reserve: a count call for it also counts
//! `reserve` more requests in Redis, when both budgets keep at least 64 times that many left
//! after them. [`RedisStore::take_reserved`] lets the principal's next requests through from
//! the reserve without a call. Reserved requests are counted before they arrive, so the budget
//! is never exceeded. A reserve that no request used for a tick of [`RESERVE_IDLE`] goes back
//! to Redis, so that other replicas can use it, and so do all reserves of a dropped store.
//!
//! Requests that the fallback counts locally stay marked as unshared in
//! [`ClassCounts`], as do those that a plugin without Redis counted before a reload added the
//! `redis` table. Local counts are Redis's counts plus those. So a Redis that comes and goes
//! does not hand out a fresh local budget on each outage, and a reload does not reset a
//! budget. Once Redis replies, a background task adds the unshared counts to Redis, so the
//! other replicas see them too. While that task's `INCRBY` is on the way, the counts it
//! carries are not added to replies a second time (see [`ClassCounts::take_unshared`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Script};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::config::{FailureMode, RedisConfig};
use super::store::{
    over_budget, Class, ClassCounts, Counts, Decision, Limits, Observed, Scope, SharingTurn,
};
use super::window::Window;
use super::PrincipalName;

/// First wait before Redis is tried again after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Maximum wait between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Seconds a key outlives its hour, for replicas whose clocks run a little behind.
const EXPIRY_MARGIN_SECS: u64 = 120;
/// How much longer than a request a call's task waits for a reply, so that it can take back
/// the counts of requests that stopped waiting.
const LATE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Checks sent to Redis in one script call at most.
pub const MAX_BATCH: usize = 128;
/// Script calls on the way to Redis at once, at most. With the wait of [`QUEUE_WAIT_DIVISOR`],
/// a Redis that replies within the timeout needs fewer than this.
const MAX_CALLS_IN_FLIGHT: usize = 8;
/// Checks that queue while calls are on the way wait for them for at most this fraction
/// (1/n) of the timeout before they go out in a call of their own.
const QUEUE_WAIT_DIVISOR: u32 = 8;
/// Keys remembered per request class. The memo starts afresh when full or when the hour turns.
const KEY_MEMO_ENTRIES: usize = 65_536;
/// `Retry-After` of a request whose key is unusable. The key stays unusable until someone
/// deletes it or its hour ends.
const UNUSABLE_KEY_RETRY_SECS: u64 = 5;
/// Minimum time between two warnings about the same unusable key.
const UNUSABLE_KEY_WARN_EVERY: Duration = Duration::from_secs(60);
/// Unusable keys remembered for [`UNUSABLE_KEY_WARN_EVERY`]. While that many were warned about
/// within the period, warnings about further keys are left out.
const UNUSABLE_KEYS_REMEMBERED: usize = 1024;
/// Pause after a turn of sending unshared counts that left some unsent or found none, before
/// the next turn may start. Counts that Redis does not take (their key is unusable) are
/// thus sent again at most this often.
const SHARE_PAUSE: Duration = Duration::from_secs(1);
/// A principal's reserve that no request took from or added to for a whole tick of this long
/// is given back to Redis, so that other replicas can use its requests.
const RESERVE_IDLE: Duration = Duration::from_millis(500);
/// The limits of an [`Op::Add`], which checks none.
const NO_LIMITS: Limits = Limits {
    principal: u64::MAX,
    domain: None,
};

/// Checks and counts atomically, for a batch of groups of checks in order. A group is the checks
/// with the same keys, limits and operation. The script takes each group as one step, with the
/// result of running its checks one after the other. `ARGV[1]` is the keys' lifetime in seconds.
/// For group `i` (from 0), KEYS[2i+1] is the principal's key and KEYS[2i+2] the domain's.
/// ARGV[5i+2..5i+6] are the principal limit, the domain limit (0 for none), the operation, the
/// number of requests and the reserve. The operation is `count` (count as many as both budgets
/// take), `peek` (check only) or `add` (count all without a check). A count increments first
/// and takes back what does not fit, so a group that fits, the common case, costs two commands.
/// A count with a reserve `r` above 0 counts `r` more requests with the group when both
/// budgets keep at least `64 * r` requests left after them, and only the group otherwise.
///
/// The result is one string with three fields per group, separated by spaces: how many
/// requests were counted (reserve included), then the principal's and the domain's counts
/// before the group. They
/// are formatted with `%d` because Lua's own number formatting writes 10^14 and more with an
/// exponent. A group whose principal key (`p`) or domain key (`d`) is unusable gets that
/// letter in place of the first number and `0 0` after it, and leaves both keys as they were.
/// A key is unusable when its value is not a decimal integer from 0 to 2^53 - 1 or not a
/// string, or when the increment would take it past 2^53 - 1. Above that, Lua's numbers skip
/// integers. `GET` and `INCRBY` run through `redis.pcall`, so their errors (not an integer,
/// overflow, wrong type) reach the script instead of failing the whole call.
/// NOTE: Lua numbers are doubles, so budgets above 2^53 are compared after rounding.
const SCRIPT_SOURCE: &str = r"
local out = {}
local lifetime = ARGV[1]
local max_count = 9007199254740991

-- Returns the count in key: 0 when it is missing, nil when it is unusable.
local function read(key)
  local value = redis.pcall('GET', key)
  if value == false then return 0 end
  if type(value) == 'string' and (value == '0' or string.find(value, '^[1-9]%d*$')) then
    local count = tonumber(value)
    if count <= max_count then return count end
  end
  return nil
end

-- Adds n to key and returns the count before. Returns nil, with the key as it was, when the
-- key is unusable.
local function add(key, n)
  local after = redis.pcall('INCRBY', key, n)
  if type(after) ~= 'number' then return nil end
  local before = after - n
  if before < 0 or after > max_count then
    redis.call('DECRBY', key, n)
    return nil
  end
  if before == 0 then redis.call('EXPIRE', key, lifetime) end
  return before
end

-- Whether a budget of limit (0: none) with count before keeps room for a reserve of r after
-- the total.
local function roomy(limit, before, total, r)
  return limit == 0 or limit - before >= total + 64 * r
end

for i = 0, (#ARGV - 1) / 5 - 1 do
  local pk, dk = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local limit = tonumber(ARGV[5 * i + 2])
  local ceiling = tonumber(ARGV[5 * i + 3])
  local op = ARGV[5 * i + 4]
  local size = tonumber(ARGV[5 * i + 5])
  local reserve = 0
  if op == 'count' then reserve = tonumber(ARGV[5 * i + 6]) end
  local counted, p, d, unusable = 0, 0, 0, nil
  if op == 'peek' then
    p, d = read(pk), read(dk)
    if p == nil then unusable = 'p' elseif d == nil then unusable = 'd' end
  else
    local total = size + reserve
    p = add(pk, total)
    if p ~= nil and reserve > 0 and not roomy(limit, p, total, reserve) then
      redis.call('DECRBY', pk, reserve)
      total, reserve = size, 0
    end
    if p == nil then
      unusable = 'p'
    else
      counted = total
      if op ~= 'add' then counted = math.max(0, math.min(total, limit - p)) end
      if counted < total then redis.call('DECRBY', pk, total - counted) end
      if counted > 0 then
        d = add(dk, counted)
        if d == nil then
          redis.call('DECRBY', pk, counted)
          unusable = 'd'
        else
          if reserve > 0 and not roomy(ceiling, d, counted, reserve) then
            redis.call('DECRBY', dk, reserve)
            redis.call('DECRBY', pk, reserve)
            counted = counted - reserve
          end
          if op ~= 'add' and ceiling > 0 and d + counted > ceiling then
            local excess = math.min(counted, d + counted - ceiling)
            redis.call('DECRBY', dk, excess)
            redis.call('DECRBY', pk, excess)
            counted = counted - excess
          end
        end
      else
        d = read(dk)
        if d == nil then unusable = 'd' end
      end
    end
  end
  if unusable then
    out[#out + 1] = unusable .. ' 0 0'
  else
    out[#out + 1] = string.format('%d %d %d', counted, p, d)
  end
end
return table.concat(out, ' ')
";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SCRIPT_SOURCE));

/// Lowers each key `KEYS[i]` by `ARGV[i]`, not below zero: the counts of requests that stopped
/// waiting. A key whose value is not an integer is left as it is.
const REFUND_SOURCE: &str = r"
for i = 1, #KEYS do
  local count = tonumber(redis.pcall('GET', KEYS[i]))
  if count and count > 0 then
    redis.pcall('DECRBY', KEYS[i], math.min(count, tonumber(ARGV[i])))
  end
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

/// The error of a check that Redis did not decide. Redis is tried again in `retry_after_secs`
/// at the earliest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub retry_after_secs: u64,
}

/// The Redis connections of one plugin instance, with their health.
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
    /// Requests counted ahead of use per principal call; 0 for none.
    reserve: u64,
    health: Mutex<Health>,
    /// The keys that held no count, for warning about each at most once a period.
    unusable_keys: Mutex<KeyWarnings>,
}

/// The keys of one hour, per request class.
#[derive(Default)]
struct KeyMemo {
    hour: u64,
    principals: [HashMap<Box<[u8]>, Arc<PrincipalEntry>, RandomState>; 2],
    domain: [Option<Arc<str>>; 2],
}

/// One principal's keys in one class and hour, with the requests counted for it in Redis
/// ahead of use.
struct PrincipalEntry {
    /// The principal's key and the domain's.
    keys: [Arc<str>; 2],
    reserved: Mutex<Reserved>,
    /// Whether a call on the way requests a reserve for the principal from Redis. One call
    /// at a time, so that a principal has at most one reserve.
    asking: AtomicBool,
}

impl PrincipalEntry {
    /// Returns the right to ask for a reserve, while the principal has none and no call on
    /// the way requests one.
    fn ask(self: &Arc<Self>) -> Option<ReserveAsk> {
        if self.reserved.lock().requests > 0 || self.asking.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(ReserveAsk(Arc::clone(self)))
    }
}

/// A call's request for a reserve for the principal of its entry; lets the next call ask once
/// the call is dropped.
struct ReserveAsk(Arc<PrincipalEntry>);

impl ReserveAsk {
    /// Lets the next call ask, once this call's reply is in.
    fn release(&self) {
        self.0.asking.store(false, Ordering::Release);
    }
}

impl Drop for ReserveAsk {
    fn drop(&mut self) {
        self.release();
    }
}

/// Requests of a principal that Redis counted before they arrived, to let through without a
/// call, with the counts that the next of them reports.
#[derive(Debug, Default, Clone, Copy)]
struct Reserved {
    requests: u64,
    /// The counts after the last request let through from the reserve, or after the call
    /// that reserved them.
    counts: Counts,
    /// The [`ReserveBook::tick`] in which a request last took from the reserve or added to it.
    used_in: u64,
    /// Whether the principal is in [`ReserveBook::entries`].
    listed: bool,
}

/// The principals of a store that hold reserved requests, and a clock of ticks of
/// [`RESERVE_IDLE`] by which reserves that no request used are given back to Redis.
#[derive(Default)]
struct ReserveBook {
    tick: AtomicU64,
    entries: Mutex<Vec<Arc<PrincipalEntry>>>,
    /// Whether the task that gives idle reserves back runs.
    sweeping: AtomicBool,
    /// Whether the last sweep failed to give reserves back, so that the failure is logged
    /// once until a sweep succeeds.
    failing: AtomicBool,
}

/// The connections to Redis; shared with the store, which drops the ones for checks after a
/// failure so that the next call connects afresh.
struct Link {
    client: redis::Client,
    timeout: Duration,
    /// The connections of the script calls that check and count, one per place of a call on
    /// the way. A connection carries one call at a time, so Nagle's algorithm never delays a
    /// call: the previous request on it was acknowledged with its reply. A second call
    /// on the way goes over a second connection, opened when first needed.
    checks: [LazyConnection; MAX_CALLS_IN_FLIGHT],
    /// The connection of the calls that take counts back. It is separate so that a slow
    /// take-back, which a connection would deliver before any later call, holds up no check.
    refunds: LazyConnection,
    /// The principals that hold reserved requests.
    reserved: ReserveBook,
    /// A copy of the store's `health.down`, written under its lock, so that requests need not
    /// take the lock while Redis is up, and the sweeps of reserves can see it.
    down: AtomicBool,
    /// Whether the store is gone, so that a reserve that arrives later goes back at once.
    closed: AtomicBool,
}

/// A connection that is opened on first use, and again after [`LazyConnection::reset`].
#[derive(Default)]
struct LazyConnection {
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Held while connecting, so that calls that find no connection open one together.
    connecting: tokio::sync::Mutex<()>,
}

impl LazyConnection {
    /// Drops the connection, so that the next call connects afresh.
    fn reset(&self) {
        *self.conn.lock() = None;
    }
}

/// One request's check, waiting in the queue.
struct Check {
    call: Call,
    /// The instant the request stops waiting, by which it must have its reply.
    deadline: Instant,
    reply: oneshot::Sender<Result<Decision, CheckError>>,
}

/// The part of a check that goes to Redis.
struct Call {
    keys: [Arc<str>; 2],
    /// Requests to count ahead for the principal of [`Op::Count`], and the principal's entry
    /// that takes them; 0 and `None` for no reserve.
    reserve: u64,
    holder: Option<ReserveAsk>,
    limits: Limits,
    lifetime_secs: u64,
    op: Op,
    /// The requests the check stands for: 1, or for [`Op::Add`] the unshared counts of one
    /// principal.
    amount: u64,
}

/// The reason a check got no decision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CheckError {
    /// Redis did not reply in time, or failed the whole call.
    Store(String),
    /// Redis ran the call, but this key is unusable.
    UnusableKey(Arc<str>),
}

#[derive(Debug)]
struct Health {
    down: bool,
    retry_at: Instant,
    backoff: Duration,
    probing: bool,
}

/// The unusable keys warned about recently, with the instant of the last warning.
#[derive(Default)]
struct KeyWarnings {
    warned: HashMap<Arc<str>, Instant>,
}

impl KeyWarnings {
    /// Returns whether a warning about `key` is due at `now`, and records it when it is.
    fn due(&mut self, key: &Arc<str>, now: Instant) -> bool {
        let recent = |at: &Instant| now.saturating_duration_since(*at) < UNUSABLE_KEY_WARN_EVERY;
        if let Some(at) = self.warned.get(key) {
            if recent(at) {
                return false;
            }
        } else if self.warned.len() >= UNUSABLE_KEYS_REMEMBERED {
            self.warned.retain(|_, at| recent(at));
            if self.warned.len() >= UNUSABLE_KEYS_REMEMBERED {
                return false;
            }
        }
        self.warned.insert(Arc::clone(key), now);
        true
    }
}

impl RedisStore {
    /// Prepares the store; nothing connects until the first request.
    fn new(domain: &str, config: &RedisConfig) -> Self {
        Self {
            domain: domain.to_owned(),
            link: Arc::new(Link::new(config.client.clone(), config.timeout)),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            failure_mode: config.failure_mode,
            queue: OnceLock::new(),
            keys: Mutex::new(KeyMemo::default()),
            reserve: config.reserve,
            health: Mutex::new(Health {
                down: false,
                retry_at: Instant::now(),
                backoff: BACKOFF_FIRST,
                probing: false,
            }),
            unusable_keys: Mutex::new(KeyWarnings::default()),
        }
    }

    /// Prepares the store of a plugin whose local counts are `counts` (index, download), and
    /// keeps track of it, so that [`settle_all`] settles it when the process ends.
    pub fn tracked(domain: &str, config: &RedisConfig, counts: [Arc<ClassCounts>; 2]) -> Arc<Self> {
        let store = Arc::new(Self::new(domain, config));
        let mut stores = STORES.lock();
        stores.retain(|tracked| tracked.store.strong_count() > 0);
        stores.push(Tracked {
            store: Arc::downgrade(&store),
            counts,
        });
        store
    }

    /// Adds the unshared counts of `window` in `counts` (index, download) to Redis in one
    /// pipeline over a connection of its own, waiting up to the timeout for each step, without
    /// a Tokio runtime. Logs a warning with the number of requests that Redis did not take.
    fn send_unshared_blocking(&self, counts: &[Arc<ClassCounts>; 2], window: Window) {
        let mut pipe = redis::pipe();
        let mut requests = 0;
        let lifetime = window.reset_secs + EXPIRY_MARGIN_SECS;
        for (class, counts) in [Class::Index, Class::Download].into_iter().zip(counts) {
            for unshared in counts.take_unshared(window.hour) {
                let keys = [
                    self.key(class, Some(&unshared.principal), window.hour),
                    self.key(class, None, window.hour),
                ];
                for key in keys {
                    pipe.incr(&key, unshared.count).ignore();
                    pipe.expire(&key, lifetime as i64).ignore();
                }
                requests += unshared.count;
            }
        }
        if requests == 0 {
            return;
        }
        let send = || -> RedisResult<()> {
            let mut conn = self.link.connect_blocking()?;
            pipe.query::<()>(&mut conn)
        };
        match send() {
            Ok(()) => info!(domain = %self.domain, requests,
                "quota: added requests counted while Redis was unavailable to Redis at shutdown"),
            Err(e) => warn!(domain = %self.domain, requests, error = %e,
                "quota: cannot add requests counted while Redis was unavailable to Redis at \
                 shutdown; other replicas will not count them"),
        }
    }

    /// Returns the handling of counted requests while Redis does not respond.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure_mode
    }

    /// Returns whether Redis responded to the last exchange (true before the first one). A call
    /// that Redis ran counts as a response, also when a key of it is unusable.
    pub fn available(&self) -> bool {
        !self.link.down.load(Ordering::Acquire)
    }

    /// Runs `op` on the principal's and the domain's keys of `window`, waiting at most the
    /// configured timeout. Needs a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Unavailable`] when Redis does not respond, and also when one of the two keys is
    /// unusable. Only the first case marks Redis as unavailable.
    pub async fn run(
        &self,
        op: Op,
        class: Class,
        principal: &[u8],
        limits: Limits,
        window: Window,
    ) -> Result<Decision, Unavailable> {
        self.run_amount(op, class, principal, limits, window, 1)
            .await
    }

    /// Runs `op` for `amount` requests, which only [`Op::Add`] takes more than one of.
    async fn run_amount(
        &self,
        op: Op,
        class: Class,
        principal: &[u8],
        limits: Limits,
        window: Window,
        amount: u64,
    ) -> Result<Decision, Unavailable> {
        let now = Instant::now();
        let probe = self.admit(now)?;
        let (reply, answer) = oneshot::channel();
        let entry = self.entry(class, principal, window.hour);
        let holder = if op == Op::Count && amount == 1 && self.reserve > 0 {
            entry.ask()
        } else {
            None
        };
        let reserve = if holder.is_some() { self.reserve } else { 0 };
        let check = Check {
            call: Call {
                keys: entry.keys.clone(),
                reserve,
                holder,
                limits,
                lifetime_secs: window.reset_secs + EXPIRY_MARGIN_SECS,
                op,
                amount,
            },
            deadline: now + self.timeout,
            reply,
        };
        // The call's task replies by the deadline, so this waits no longer than that.
        let stopped = |what: &str| Err(CheckError::Store(format!("the Redis sending task {what}")));
        let result = match self.queue().send(check) {
            Err(_) => stopped("has stopped"),
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| stopped("dropped the check")),
        };
        match result {
            Ok(decision) => {
                self.succeeded();
                Ok(decision)
            }
            Err(CheckError::UnusableKey(key)) => {
                // Redis ran the call, so it is available: only the checks on this key fall back.
                self.succeeded();
                self.warn_unusable_key(&key);
                Err(Unavailable {
                    retry_after_secs: UNUSABLE_KEY_RETRY_SECS,
                })
            }
            Err(CheckError::Store(reason)) => Err(self.failed(&reason, probe.is_some())),
        }
    }

    /// Records the counts of a Redis reply for `principal` in `local`; `counted` is how many
    /// requests Redis counted in it (0 or 1). Returns how much the local counts of the
    /// principal and of the domain in `window` exceed the reply's (the counts that Redis has
    /// not taken, or may not have taken yet), and whether counts wait to be sent to Redis.
    /// The caller then starts sending them with [`Self::share`], after any take-back of this
    /// request, so that the sending turn starts from the counts without it.
    pub fn observe(
        &self,
        local: &ClassCounts,
        principal: &[u8],
        window: Window,
        counts: Counts,
        counted: u64,
    ) -> Observed {
        local.observe(principal, window.hour, counts, counted)
    }

    /// Takes back one request of `principal` that Redis counted but the plugin rejected: from
    /// the counts in `local` at once, and from Redis in the background.
    pub fn take_back(
        self: &Arc<Self>,
        class: Class,
        local: &ClassCounts,
        principal: &[u8],
        window: Window,
    ) {
        local.taken_back(principal, window.hour);
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let keys = self.entry(class, principal, window.hour).keys.clone();
        Arc::clone(&self.link).spawn_refund(keys.map(|key| (key, 1)).to_vec());
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
    /// `local` as unshared, to be added to Redis later.
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
        runtime.spawn(async move {
            let name = principal.as_bytes();
            match store.run(Op::Add, class, name, NO_LIMITS, window).await {
                Ok(decision) => {
                    let observed = store.observe(&local, name, window, decision.counts(), 1);
                    if observed.unshared {
                        store.share(class, &local, window);
                    }
                }
                Err(_) => {
                    local.add(name, window.hour);
                }
            }
        });
    }

    /// Starts a background task that adds the unshared counts of `local` in `window` to Redis,
    /// unless one runs already or the last one asked for a [`SHARE_PAUSE`] that has not passed.
    pub fn share(self: &Arc<Self>, class: Class, local: &Arc<ClassCounts>, window: Window) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(turn) = local.begin_sharing(Instant::now()) else {
            return;
        };
        let store = Arc::clone(self);
        runtime.spawn(store.send_unshared(class, Arc::clone(local), window, turn));
    }

    /// Adds the unshared counts of `local` in `window` to Redis, [`MAX_BATCH`] principals at a
    /// time, and records in `local` what Redis took. Stops when Redis becomes unavailable.
    ///
    /// The counts are marked as on the way before any is sent, and each goes back to unshared
    /// when Redis does not take it, also when its turn stops early.
    async fn send_unshared(
        self: Arc<Self>,
        class: Class,
        local: Arc<ClassCounts>,
        window: Window,
        mut turn: SharingTurn,
    ) {
        let pending = local.take_unshared(window.hour);
        // A turn that finds nothing was started by a domain count that the principals' unshared
        // counts do not add up to. It pauses too, so that such a count costs a scan of the
        // counters at most once per pause.
        let mut complete = !pending.is_empty();
        let (mut principals, mut requests) = (0, 0);
        let mut chunks = pending.chunks(MAX_BATCH);
        for chunk in chunks.by_ref() {
            let mut sends = tokio::task::JoinSet::new();
            let mut sent_by_task = HashMap::with_capacity(chunk.len());
            for unshared in chunk {
                let store = Arc::clone(&self);
                let principal = unshared.principal.clone();
                let amount = unshared.count;
                let task = sends.spawn(async move {
                    store
                        .run_amount(Op::Add, class, &principal, NO_LIMITS, window, amount)
                        .await
                });
                sent_by_task.insert(task.id(), unshared);
            }
            while let Some(joined) = sends.join_next_with_id().await {
                let (id, result) = match joined {
                    Ok((id, result)) => (id, Some(result)),
                    Err(e) => (e.id(), None),
                };
                let Some(unshared) = sent_by_task.remove(&id) else {
                    continue;
                };
                match result {
                    Some(Ok(decision)) => {
                        local.shared(unshared, window.hour, decision.counts());
                        principals += 1;
                        requests += unshared.count;
                    }
                    // The count is unshared again, for the next turn.
                    _ => {
                        local.unsent(unshared, window.hour);
                        complete = false;
                    }
                }
            }
            if !self.available() {
                complete = false;
                break;
            }
        }
        for unshared in chunks.flatten() {
            local.unsent(unshared, window.hour);
        }
        if principals > 0 {
            info!(domain = %self.domain, class = class.label(), principals, requests,
                "quota: added requests counted while Redis was unavailable to Redis");
        }
        if !complete {
            turn.retry_at(Instant::now() + SHARE_PAUSE);
        }
    }

    /// Returns the entry of `principal` in `class` and `hour`, with its key and the domain's,
    /// from the memo when it is there.
    fn entry(&self, class: Class, principal: &[u8], hour: u64) -> Arc<PrincipalEntry> {
        let slot = class as usize;
        let mut memo = self.keys.lock();
        if memo.hour != hour {
            *memo = KeyMemo {
                hour,
                ..KeyMemo::default()
            };
        }
        if let Some(entry) = memo.principals[slot].get(principal) {
            return Arc::clone(entry);
        }
        let domain =
            Arc::clone(memo.domain[slot].get_or_insert_with(|| self.key(class, None, hour).into()));
        let entry = Arc::new(PrincipalEntry {
            keys: [self.key(class, Some(principal), hour).into(), domain],
            reserved: Mutex::new(Reserved::default()),
            asking: AtomicBool::new(false),
        });
        let principals = &mut memo.principals[slot];
        if principals.len() >= KEY_MEMO_ENTRIES {
            // Entries that hold a reserve stay in the book until the reserve is given back.
            principals.clear();
        }
        principals.insert(Box::from(principal), Arc::clone(&entry));
        entry
    }

    /// Lets one request of `principal` through from its reserve, without a call: returns the
    /// counts it reports, or `None` when the principal has no reserve in `class` and `hour`
    /// or Redis is not responding.
    pub fn take_reserved(&self, class: Class, principal: &[u8], hour: u64) -> Option<Counts> {
        if self.reserve == 0 || !self.available() {
            return None;
        }
        let memo = self.keys.lock();
        if memo.hour != hour {
            return None;
        }
        let entry = memo.principals[class as usize].get(principal)?;
        let mut reserved = entry.reserved.lock();
        if reserved.requests == 0 {
            return None;
        }
        reserved.requests -= 1;
        reserved.counts = Counts {
            principal: reserved.counts.principal.saturating_add(1),
            domain: reserved.counts.domain.saturating_add(1),
        };
        reserved.used_in = self.link.reserved.tick.load(Ordering::Relaxed);
        Some(reserved.counts)
    }

    /// Gives the reserve of `principal` back to Redis, with `unused` requests taken from it
    /// and not let through, so that the principal's requests are checked in Redis again.
    pub fn give_back_reserve(&self, class: Class, principal: &[u8], hour: u64, unused: u64) {
        let entry = {
            let memo = self.keys.lock();
            if memo.hour != hour {
                return;
            }
            match memo.principals[class as usize].get(principal) {
                Some(entry) => Arc::clone(entry),
                None => return,
            }
        };
        let requests = std::mem::take(&mut entry.reserved.lock().requests).saturating_add(unused);
        if requests > 0 {
            self.link.refund_reserve(&entry, requests);
        }
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
        if !self.link.down.load(Ordering::Acquire) {
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
        if !self.link.down.load(Ordering::Acquire) {
            return;
        }
        let mut health = self.health.lock();
        if health.down {
            health.down = false;
            self.link.down.store(false, Ordering::Release);
            health.backoff = BACKOFF_FIRST;
            info!(domain = %self.domain, "quota: Redis responds again; counting in Redis");
        }
    }

    /// Records a failure: the first one switches to the fallback, a failed probe doubles the
    /// backoff. The connection is dropped so the next try connects afresh.
    fn failed(&self, reason: &str, probe: bool) -> Unavailable {
        for connection in &self.link.checks {
            connection.reset();
        }
        let now = Instant::now();
        let mut health = self.health.lock();
        if !health.down {
            health.down = true;
            self.link.down.store(true, Ordering::Release);
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

    /// Logs that `key` is unusable, at most once per [`UNUSABLE_KEY_WARN_EVERY`] for each
    /// key.
    fn warn_unusable_key(&self, key: &Arc<str>) {
        if !self.unusable_keys.lock().due(key, Instant::now()) {
            return;
        }
        let fallback = match self.failure_mode {
            FailureMode::FailOpen => "are counted in this process alone",
            FailureMode::FailClosed => "are rejected with 429 (fail_closed)",
        };
        warn!(domain = %self.domain, key = %key,
            "quota: Redis key {key:?} holds a value that is not an integer from 0 to 2^53 - 1, \
             so its requests {fallback}; delete the key with `redis-cli DEL {key:?}` to count \
             them in Redis again");
    }
}

/// Returns the seconds from `now` until `then`, rounded up and at least 1. A client that waits
/// that long comes back after the next try of Redis.
fn whole_secs_until(then: Instant, now: Instant) -> u64 {
    let wait = then.saturating_duration_since(now);
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The places of calls on the way, each with its connection (see [`Link::checks`]).
struct Places {
    count: Arc<Semaphore>,
    /// The free places' connection indexes; the most recently freed is taken first, so that a
    /// Redis that keeps up uses one connection.
    free: Arc<Mutex<Vec<usize>>>,
}

/// A place taken for one call; given back when dropped.
struct Place {
    index: usize,
    free: Arc<Mutex<Vec<usize>>>,
    _permit: OwnedSemaphorePermit,
}

impl Places {
    fn new() -> Self {
        Self {
            count: Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT)),
            free: Arc::new(Mutex::new((0..MAX_CALLS_IN_FLIGHT).rev().collect())),
        }
    }

    /// Waits for a free place; `None` once the semaphore is closed, which it never is.
    async fn take(&self) -> Option<Place> {
        let permit = Arc::clone(&self.count).acquire_owned().await.ok()?;
        // A permit guarantees a free index: indexes go back before their permits.
        let index = self.free.lock().pop()?;
        Some(Place {
            index,
            free: Arc::clone(&self.free),
            _permit: permit,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // Runs before the permit field is dropped, so the index is free before the permit.
        self.free.lock().push(self.index);
    }
}

/// Sends the queued checks to Redis until the store is dropped: each batch as one script call,
/// in a task of its own, with up to [`MAX_CALLS_IN_FLIGHT`] calls on the way at once.
///
/// A batch goes out at once when no call is on the way. Otherwise its checks wait for the calls
/// on the way to end, so that they go out together, but the oldest waits no longer than
/// 1/[`QUEUE_WAIT_DIVISOR`] of the timeout. A fast Redis thus gets one call at a time with
/// large batches. A slow one gets a new call every so often, so a check whose round trip fits
/// in the rest of its timeout gets its reply in time.
async fn send_batches(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Check>) {
    let places = Places::new();
    // How long a call on the way holds back the checks queued behind it.
    let patience = link.timeout / QUEUE_WAIT_DIVISOR;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // The place is taken before the batch is topped up. While all places are taken, checks
        // wait in the queue and go out together in the next call.
        let Some(place) = places.take().await else {
            return;
        };
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(check) => batch.push(check),
                Err(_) => break,
            }
        }
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
                let _ = check.reply.send(Err(CheckError::Store(link.no_answer())));
                continue;
            }
            deadline = Some(deadline.map_or(check.deadline, |d| d.min(check.deadline)));
            calls.push(check.call);
            replies.push(check.reply);
        }
        let Some(deadline) = deadline else {
            continue;
        };
        let mut call = Box::pin(send_call(
            Arc::clone(&link),
            calls,
            replies,
            deadline,
            place,
        ));
        // The call is awaited here, so that the checks queued meanwhile go out together in the
        // next call, without a task of its own for the common fast reply. A call still on the
        // way after `patience` goes on in a task, and the next batch goes out beside it.
        if tokio::time::timeout(patience, &mut call).await.is_err() {
            tokio::spawn(call);
        }
    }
}

/// Gives back, once per [`RESERVE_IDLE`], the reserves that no request took from during the
/// last whole tick, until the store is gone.
async fn sweep_reserves(link: std::sync::Weak<Link>) {
    loop {
        tokio::time::sleep(RESERVE_IDLE).await;
        let Some(link) = link.upgrade() else {
            return;
        };
        // While Redis does not respond, reserves can be neither used nor given back, so they
        // wait, and the clock stops.
        if link.down.load(Ordering::Acquire) {
            continue;
        }
        let tick = link.reserved.tick.fetch_add(1, Ordering::Relaxed);
        let reserves = link.take_reserves(Some(tick));
        if !reserves.is_empty() {
            link.give_back(reserves).await;
        }
    }
}

/// Returns the keys of each principal in `reserves` and of its domain, each with the requests to
/// give back. A domain key appears once per principal.
fn refund_keys(reserves: &[(Arc<PrincipalEntry>, u64)]) -> Vec<(Arc<str>, u64)> {
    reserves
        .iter()
        .flat_map(|(entry, requests)| entry.keys.iter().map(|key| (Arc::clone(key), *requests)))
        .collect()
}

/// Runs one script call and replies to its checks by `deadline`, then gives back `place`
/// once the call has ended.
async fn send_call(
    link: Arc<Link>,
    calls: Vec<Call>,
    replies: Vec<oneshot::Sender<Result<Decision, CheckError>>>,
    deadline: Instant,
    place: Place,
) {
    let call_link = Arc::clone(&link);
    let index = place.index;
    let mut call = Box::pin(async move {
        let result = call_link.eval(&calls, index).await;
        (result, calls)
    });
    match tokio::time::timeout_at(deadline.into(), &mut call).await {
        Ok((result, calls)) => {
            drop(place);
            answer(&link, result, &calls, replies);
        }
        Err(_) => {
            for reply in replies {
                let _ = reply.send(Err(CheckError::Store(link.no_answer())));
            }
            // Every request of the batch has fallen back. Redis may still run the call, so its
            // counts are taken back when the reply comes, if it comes within the connection's
            // response timeout. The place stays taken until then, so that no other call
            // queues behind this one on its connection.
            let (result, calls) = call.await;
            drop(place);
            answer(&link, result, &calls, Vec::new());
        }
    }
}

/// Sends each check of a call its decision, in order, and takes back the counts of checks whose
/// request no longer waits: those past `replies` and those whose request went away. The counts
/// are taken back in a task and over a connection of their own, so that neither a call's task
/// nor later checks wait for them.
fn answer(
    link: &Arc<Link>,
    result: RedisResult<Evaluated>,
    calls: &[Call],
    replies: Vec<oneshot::Sender<Result<Decision, CheckError>>>,
) {
    let Evaluated {
        decisions,
        reserves,
    } = match result {
        Ok(evaluated) => evaluated,
        Err(e) => {
            let reason = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(CheckError::Store(reason.clone())));
            }
            return;
        }
    };
    // A reserve belongs to the principal, not to the request that asked for it, so it is kept
    // also when that request went away. It is in place before the requests of the call wake up.
    // A reply after the deadline finds the requests fallen back and Redis taken for
    // unavailable, so its reserve goes back with the counts of its requests.
    let in_time = !replies.is_empty();
    let mut refunds = Vec::new();
    for deposit in reserves {
        let call = &calls[deposit.call];
        match &call.holder {
            Some(ReserveAsk(entry)) if in_time => {
                link.deposit(entry, deposit.requests, deposit.counts);
            }
            _ => refunds.extend(
                call.keys
                    .iter()
                    .map(|key| (Arc::clone(key), deposit.requests)),
            ),
        }
    }
    // The requests of the call may run on as soon as they have their replies, before this
    // call is dropped, so the next call for their principals may ask for a reserve from then.
    for ask in calls.iter().filter_map(|call| call.holder.as_ref()) {
        ask.release();
    }
    let mut replies = replies.into_iter();
    for (call, decision) in calls.iter().zip(decisions) {
        let counted = call.op != Op::Peek && matches!(decision, Ok(Decision::Allowed(_)));
        let delivered = replies.next().is_some_and(|reply| {
            reply
                .send(decision.map_err(CheckError::UnusableKey))
                .is_ok()
        });
        if counted && !delivered {
            refunds.extend(call.keys.iter().map(|key| (Arc::clone(key), call.amount)));
        }
    }
    if !refunds.is_empty() {
        Arc::clone(link).spawn_refund(refunds);
    }
}

impl Link {
    fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            checks: std::array::from_fn(|_| LazyConnection::default()),
            refunds: LazyConnection::default(),
            reserved: ReserveBook::default(),
            down: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Adds `requests` that Redis counted ahead to the reserve of `entry`, with `counts`, the
    /// counts after the call's own requests. Starts the task that gives idle reserves back.
    fn deposit(self: &Arc<Self>, entry: &Arc<PrincipalEntry>, requests: u64, counts: Counts) {
        if self.closed.load(Ordering::Acquire) {
            self.refund_reserve(entry, requests);
            return;
        }
        let tick = self.reserved.tick.load(Ordering::Relaxed);
        let list = {
            let mut reserved = entry.reserved.lock();
            // A reserve that is still there was counted before this call, so the counts of the
            // call are the later ones.
            reserved.counts = Counts {
                principal: counts.principal.max(reserved.counts.principal),
                domain: counts.domain.max(reserved.counts.domain),
            };
            reserved.requests = reserved.requests.saturating_add(requests);
            reserved.used_in = tick;
            !std::mem::replace(&mut reserved.listed, true)
        };
        if list {
            self.reserved.entries.lock().push(Arc::clone(entry));
        }
        if self.closed.load(Ordering::Acquire) {
            // The store went away while this reserve was being added; give it back.
            let requests = std::mem::take(&mut entry.reserved.lock().requests);
            if requests > 0 {
                self.refund_reserve(entry, requests);
            }
            return;
        }
        if !self.reserved.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep_reserves(Arc::downgrade(self)));
        }
    }

    /// Gives `requests` of the reserve of `entry` back to Redis, in the background.
    fn refund_reserve(self: &Arc<Self>, entry: &PrincipalEntry, requests: u64) {
        let keys = entry.keys.clone().map(|key| (key, requests));
        Arc::clone(self).spawn_refund(keys.to_vec());
    }

    /// Takes the reserves off their principals: all of them, or with `idle_before` those
    /// last used before that tick. Returns the principals with the requests to give back.
    fn take_reserves(&self, idle_before: Option<u64>) -> Vec<(Arc<PrincipalEntry>, u64)> {
        let mut reserves = Vec::new();
        self.reserved.entries.lock().retain(|entry| {
            let mut reserved = entry.reserved.lock();
            let idle = idle_before.is_none_or(|tick| reserved.used_in < tick);
            if idle && reserved.requests > 0 {
                reserves.push((Arc::clone(entry), std::mem::take(&mut reserved.requests)));
            }
            let keep = reserved.requests > 0;
            reserved.listed = keep;
            keep
        });
        reserves
    }

    /// Opens a blocking connection that waits up to the timeout to connect and for each read
    /// and write.
    fn connect_blocking(&self) -> RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// Gives the reserves of `reserves` back to Redis over a connection of its own, waiting up to
    /// the timeout for each step, without a Tokio runtime. Logs a warning when Redis does not
    /// take them; they stay counted until their hour ends.
    fn give_back_blocking(&self, reserves: &[(Arc<PrincipalEntry>, u64)]) {
        let give_back = || -> RedisResult<()> {
            let mut conn = self.connect_blocking()?;
            let mut invocation = REFUND_SCRIPT.prepare_invoke();
            for (key, amount) in refund_keys(reserves) {
                invocation.key(&*key).arg(amount);
            }
            invocation.invoke::<i64>(&mut conn).map(|_| ())
        };
        if let Err(e) = give_back() {
            warn!(error = %e, principals = reserves.len(),
                "quota: cannot give reserved requests back to Redis; they stay counted until \
                 their hour ends");
        }
    }

    /// Gives the reserves of `reserves` back to Redis. A reserve that Redis does not take goes
    /// back to its principal, to be given back by a later sweep or used once Redis responds.
    async fn give_back(self: &Arc<Self>, reserves: Vec<(Arc<PrincipalEntry>, u64)>) {
        let keys = refund_keys(&reserves);
        match self.refund(&keys).await {
            Ok(()) => {
                if self.reserved.failing.swap(false, Ordering::AcqRel) {
                    info!("quota: reserved requests go back to Redis again");
                }
            }
            Err(e) => {
                self.refunds.reset();
                if !self.reserved.failing.swap(true, Ordering::AcqRel) {
                    warn!(error = %e, principals = reserves.len(),
                        "quota: cannot give reserved requests back to Redis; trying again \
                         every second");
                }
                for (entry, requests) in &reserves {
                    self.deposit(entry, *requests, Counts::default());
                }
            }
        }
    }

    /// Sends `command`, a call of [`SCRIPT`], over the connection of place `place`, loading
    /// the script first when Redis does not have it. A connection that Redis closed since its
    /// last call (after a restart, for example) fails at once. The call then goes once more
    /// over a new connection, so that the first requests after a restart are not refused.
    /// NOTE: a connection reset after Redis ran the call also leads to the second try, which
    /// then counts its requests twice. That turns requests away, but never lets too many
    /// through.
    async fn query(&self, command: &redis::Cmd, place: usize) -> RedisResult<Vec<u8>> {
        let slot = &self.checks[place];
        let mut retried = false;
        loop {
            let mut conn = self.connection(slot).await?;
            let result = match command.query_async(&mut conn).await {
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                    SCRIPT.load_async(&mut conn).await?;
                    command.query_async(&mut conn).await
                }
                result => result,
            };
            match result {
                Err(e) if e.is_connection_dropped() && !retried => {
                    slot.reset();
                    retried = true;
                }
                result => return result,
            }
        }
    }

    /// Runs the script on `calls` over the connection of place `place` and returns one
    /// decision per call, in order, or the key of the call's unusable key, and the requests
    /// that Redis counted ahead for the principals of the calls.
    async fn eval(&self, calls: &[Call], place: usize) -> RedisResult<Evaluated> {
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
                .arg(group.size)
                .arg(group.reserve);
        }
        let reply = self.query(&command, place).await?;
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
                let before = seen[g];
                seen[g] += call.amount;
                match outcomes[g] {
                    Ok(outcome) => Ok(outcome.decision(call, before)),
                    Err(Scope::Principal) => Err(Arc::clone(&call.keys[0])),
                    Err(Scope::Domain) => Err(Arc::clone(&call.keys[1])),
                }
            })
            .collect();
        let reserves = groups
            .iter()
            .zip(&outcomes)
            .filter_map(|(group, outcome)| {
                let outcome = outcome.as_ref().ok()?;
                let requests = outcome.counted.checked_sub(group.size).filter(|&n| n > 0)?;
                Some(Deposit {
                    call: group.first,
                    requests,
                    counts: Counts {
                        principal: outcome.before.principal.saturating_add(group.size),
                        domain: outcome.before.domain.saturating_add(group.size),
                    },
                })
            })
            .collect();
        Ok(Evaluated {
            decisions,
            reserves,
        })
    }

    /// Lowers each key by its amount in a task of its own, over the connection for take-backs,
    /// and logs a warning when Redis does not take them.
    fn spawn_refund(self: Arc<Self>, keys: Vec<(Arc<str>, u64)>) {
        tokio::spawn(async move {
            if let Err(e) = self.refund(&keys).await {
                self.refunds.reset();
                warn!(error = %e, keys = keys.len(), "quota: cannot take back counts in Redis");
            }
        });
    }

    /// Lowers each key by its amount, not below zero.
    async fn refund(&self, keys: &[(Arc<str>, u64)]) -> RedisResult<()> {
        let mut conn = self.connection(&self.refunds).await?;
        let mut invocation = REFUND_SCRIPT.prepare_invoke();
        for (key, amount) in keys {
            invocation.key(&**key).arg(*amount);
        }
        invocation.invoke_async::<i64>(&mut conn).await.map(|_| ())
    }

    /// Returns the error of a check not answered within the timeout.
    fn no_answer(&self) -> String {
        format!("no answer within {} ms", self.timeout.as_millis())
    }

    /// Returns the connection in `slot`, connecting when it has none.
    async fn connection(&self, slot: &LazyConnection) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = slot.conn.lock().clone() {
            return Ok(conn);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(conn) = slot.conn.lock().clone() {
            return Ok(conn);
        }
        // `TCP_NODELAY` stays off: with one call per connection at a time it would only add
        // packets, and it cost 2 to 3% of the gateway's requests per second in paired runs.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout + LATE_REPLY_WAIT);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot.conn.lock() = Some(conn.clone());
        Ok(conn)
    }
}

/// The result of one script call.
struct Evaluated {
    /// Per call, in order: its decision, or its unusable key.
    decisions: Vec<Result<Decision, Arc<str>>>,
    /// The requests counted ahead, per group that got any.
    reserves: Vec<Deposit>,
}

/// Requests that Redis counted ahead for the principal of a group, with the counts after the
/// group's own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deposit {
    /// The first call of the group, whose principal entry takes them.
    call: usize,
    requests: u64,
    counts: Counts,
}

/// Checks of one batch that the script takes as one step: those with the same keys, limits,
/// operation and reserve. `first` is the index of the first of them in the batch, and `size` the
/// requests they stand for together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    first: usize,
    size: u64,
    /// The requests counted ahead for the group's principal, when it requests a reserve.
    reserve: u64,
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
                && other.reserve == call.reserve
        };
        match groups.iter().take(GROUP_SEARCH).position(same) {
            Some(g) => {
                groups[g].size += call.amount;
                group_of.push(g);
            }
            None => {
                group_of.push(groups.len());
                groups.push(Group {
                    first: index,
                    size: call.amount,
                    reserve: call.reserve,
                });
            }
        }
    }
    (groups, group_of)
}

/// The script's result for one group: how many of its requests it counted, and the counts
/// before the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    counted: u64,
    before: Counts,
}

impl Outcome {
    /// Returns the decision for `call`, which follows checks for `before` requests in its group:
    /// the decision it would get if the group's checks ran one after the other.
    fn decision(&self, call: &Call, before: u64) -> Decision {
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
        let through = before.saturating_add(call.amount);
        if through <= self.counted {
            return Decision::Allowed(after(through));
        }
        let counts = after(self.counted);
        let scope = over_budget(call.limits, counts).unwrap_or(Scope::Principal);
        Decision::Rejected(scope, counts)
    }
}

/// Parses the script's reply: three fields per group, each followed by one space but the
/// last. The result of a group is its outcome, or the scope of its unusable key
/// (a `p` or `d` field in place of the counted requests). Returns `None` when the reply does
/// not contain exactly one result per group, or counts more requests than a group has with its
/// reserve.
fn parse_outcomes(reply: &[u8], groups: &[Group]) -> Option<Vec<Result<Outcome, Scope>>> {
    let mut fields = reply.split(|&b| b == b' ');
    let mut outcomes = Vec::with_capacity(groups.len());
    for group in groups {
        let mut next = || fields.next();
        let (first, principal, domain) = (next()?, next()?, next()?);
        let (principal, domain) = (parse_number(principal)?, parse_number(domain)?);
        let outcome = match first {
            b"p" => Err(Scope::Principal),
            b"d" => Err(Scope::Domain),
            digits => {
                let counted = parse_number(digits)?;
                if counted > group.size.saturating_add(group.reserve) {
                    return None;
                }
                Ok(Outcome {
                    counted,
                    before: Counts { principal, domain },
                })
            }
        };
        outcomes.push(outcome);
    }
    // An empty reply splits into one empty piece, which is no field.
    let rest = fields.next();
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

impl Drop for RedisStore {
    /// Gives every reserve back to Redis, so that a reload or a removed plugin leaves no
    /// requests counted that no request can use.
    fn drop(&mut self) {
        self.link.closed.store(true, Ordering::Release);
        let reserves = self.link.take_reserves(None);
        if reserves.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            Arc::clone(&self.link).spawn_refund(refund_keys(&reserves));
        } else {
            self.link.give_back_blocking(&reserves);
        }
    }
}

/// Every store with the local counts of its plugin (index, download), so that the process can
/// settle with Redis when it ends.
static STORES: LazyLock<Mutex<Vec<Tracked>>> = LazyLock::new(Mutex::default);

/// A store in [`STORES`].
struct Tracked {
    store: std::sync::Weak<RedisStore>,
    counts: [Arc<ClassCounts>; 2],
}

/// Gives the reserves of every store back to Redis and adds the unshared counts of `window`
/// to it, waiting up to each store's timeout per step. For the end of the process, outside
/// any Tokio runtime.
pub fn settle_all(window: Window) {
    let stores: Vec<(Arc<RedisStore>, [Arc<ClassCounts>; 2])> = STORES
        .lock()
        .iter()
        .filter_map(|tracked| Some((tracked.store.upgrade()?, tracked.counts.clone())))
        .collect();
    for (store, counts) in stores {
        let reserves = store.link.take_reserves(None);
        if !reserves.is_empty() {
            store.link.give_back_blocking(&reserves);
        }
        store.send_unshared_blocking(&counts, window);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::store::Registry;

    fn groups(sizes: &[u64]) -> Vec<Group> {
        sizes
            .iter()
            .map(|&size| Group {
                first: 0,
                size,
                reserve: 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn places_reuse_one_connection_when_free() {
        let places = Places::new();
        let first = places.take().await.expect("a place");
        assert_eq!(first.index, 0);
        drop(first);
        let again = places.take().await.expect("a place");
        assert_eq!(again.index, 0, "the freed place is taken again");
        let second = places.take().await.expect("a place");
        assert_eq!(second.index, 1, "a second call gets its own connection");
        let mut all = vec![again, second];
        for _ in 2..MAX_CALLS_IN_FLIGHT {
            all.push(places.take().await.expect("a place"));
        }
        let full = tokio::time::timeout(Duration::from_millis(50), places.take()).await;
        assert!(full.is_err(), "no place beyond {MAX_CALLS_IN_FLIGHT}");
        drop(all.pop());
        let freed = places.take().await.expect("a freed place");
        assert_eq!(freed.index, MAX_CALLS_IN_FLIGHT - 1);
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
        let outcome = |counted, principal, domain| {
            Ok(Outcome {
                counted,
                before: Counts { principal, domain },
            })
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

    /// Runs the script on `calls`, whose keys are all usable.
    async fn decisions(link: &Link, calls: &[Call]) -> Vec<Decision> {
        let results = link.eval(calls, 0).await.expect("script runs").decisions;
        results
            .into_iter()
            .map(|result| result.expect("every key is usable"))
            .collect()
    }

    #[test]
    fn parses_unusable_key_markers() {
        let outcomes = parse_outcomes(b"p 0 0 1 2 3 d 0 0", &groups(&[1, 1, 1])).expect("three");
        let counted = Outcome {
            counted: 1,
            before: Counts {
                principal: 2,
                domain: 3,
            },
        };
        assert_eq!(
            outcomes,
            vec![Err(Scope::Principal), Ok(counted), Err(Scope::Domain)]
        );
        let one = groups(&[1]);
        assert_eq!(parse_outcomes(b"x 0 0", &one), None);
        assert_eq!(parse_outcomes(b"p 0", &one), None);
        assert_eq!(parse_outcomes(b"pd 0 0", &one), None);
        assert_eq!(parse_outcomes(b"p 0 0 ", &one), None);
    }

    #[test]
    fn key_warnings_once_per_period() {
        let mut warnings = KeyWarnings::default();
        let start = Instant::now();
        let key: Arc<str> = "p:a".into();
        assert!(warnings.due(&key, start));
        assert!(!warnings.due(&key, start + Duration::from_secs(59)));
        assert!(warnings.due(&"p:b".into(), start + Duration::from_secs(1)));
        assert!(warnings.due(&key, start + UNUSABLE_KEY_WARN_EVERY));
    }

    #[test]
    fn key_warnings_bounded() {
        let mut warnings = KeyWarnings::default();
        let start = Instant::now();
        for i in 0..UNUSABLE_KEYS_REMEMBERED {
            assert!(warnings.due(&format!("p:{i}").into(), start));
        }
        let late: Arc<str> = "p:late".into();
        assert!(!warnings.due(&late, start + Duration::from_secs(1)));
        assert_eq!(warnings.warned.len(), UNUSABLE_KEYS_REMEMBERED);
        // Once the earlier warnings are a period old, they make room.
        assert!(warnings.due(&late, start + UNUSABLE_KEY_WARN_EVERY));
        assert_eq!(warnings.warned.len(), 1);
    }

    fn call(keys: &[Arc<str>; 2], principal: u64, domain: Option<u64>, op: Op) -> Call {
        Call {
            keys: keys.clone(),
            reserve: 0,
            holder: None,
            limits: Limits { principal, domain },
            lifetime_secs: 60,
            op,
            amount: 1,
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
            (Link::new(client, Duration::from_secs(5)), admin)
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
            let got = decisions(&link, &calls).await;
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

    /// Sets `key` to `value` with the admin connection.
    fn set(admin: &mut redis::Connection, key: &str, value: &str) {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query::<()>(admin)
            .expect("SET");
    }

    fn get(admin: &mut redis::Connection, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query(admin).expect("GET")
    }

    /// An unusable key fails the checks on it alone, leaves both of its keys as they
    /// were, and the other groups of the call are counted.
    #[tokio::test]
    async fn script_reports_unusable_keys() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        let domain: Arc<str> = "d".into();
        let max = "9007199254740992";
        let bad_values = [
            ("p:text", "abc"),
            ("p:overflow", "9223372036854775807"),
            ("p:negative", "-3"),
            ("p:fraction", "1.5"),
            ("p:leading-zero", "05"),
            ("p:hex", "0x10"),
            ("p:max", max),
        ];
        for (key, value) in bad_values {
            set(&mut admin, key, value);
        }
        redis::cmd("RPUSH")
            .arg("p:list")
            .arg("1")
            .query::<()>(&mut admin)
            .expect("RPUSH");
        set(&mut admin, "p:good", "2");

        let mut calls = Vec::new();
        let mut unusable = Vec::new();
        for key in bad_values.iter().map(|(key, _)| *key).chain(["p:list"]) {
            let keys: [Arc<str>; 2] = [key.into(), Arc::clone(&domain)];
            calls.push(call(&keys, 10, None, Op::Peek));
            unusable.push(key);
            calls.push(call(&keys, 10, Some(100), Op::Count));
            unusable.push(key);
        }
        let good: [Arc<str>; 2] = ["p:good".into(), Arc::clone(&domain)];
        calls.push(call(&good, 10, Some(100), Op::Count));
        let results = link.eval(&calls, 0).await.expect("script runs").decisions;
        let (last, failed) = results.split_last().expect("results");
        let failed_keys: Vec<&str> = failed
            .iter()
            .map(|result| match result {
                Err(key) => &**key,
                Ok(decision) => panic!("unexpected decision {decision:?}"),
            })
            .collect();
        assert_eq!(failed_keys, unusable);
        let counts = Counts {
            principal: 3,
            domain: 1,
        };
        assert_eq!(last, &Ok(Decision::Allowed(counts)));
        for (key, value) in bad_values {
            assert_eq!(get(&mut admin, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(get(&mut admin, "d").as_deref(), Some("1"));
    }

    /// An unusable domain key fails the checks on it, and the principal's count
    /// stays as it was, for a count that fits, one over the principal's budget, and a peek.
    #[tokio::test]
    async fn script_reports_unusable_domain_key() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        set(&mut admin, "d", "abc");
        set(&mut admin, "p:full", "5");
        let fresh: [Arc<str>; 2] = ["p:fresh".into(), "d".into()];
        let full: [Arc<str>; 2] = ["p:full".into(), Arc::clone(&fresh[1])];
        let calls = [
            call(&fresh, 5, None, Op::Count),
            call(&fresh, u64::MAX, None, Op::Add),
            call(&full, 5, None, Op::Count),
            call(&full, 5, None, Op::Peek),
        ];
        let results = link.eval(&calls, 0).await.expect("script runs").decisions;
        for result in &results {
            assert_eq!(result, &Err(Arc::clone(&fresh[1])));
        }
        assert_eq!(get(&mut admin, "p:fresh").unwrap_or_default(), "0");
        assert_eq!(get(&mut admin, "p:full").as_deref(), Some("5"));
        assert_eq!(get(&mut admin, "d").as_deref(), Some("abc"));
    }

    /// An add of several requests counts them all, and each check gets the counts after its
    /// own requests.
    #[tokio::test]
    async fn script_adds_amounts() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        let keys: [Arc<str>; 2] = ["p".into(), "d".into()];
        let mut five = call(&keys, u64::MAX, None, Op::Add);
        five.amount = 5;
        let calls = [five, call(&keys, u64::MAX, None, Op::Add)];
        let got = decisions(&link, &calls).await;
        let counts = |n| Counts {
            principal: n,
            domain: n,
        };
        assert_eq!(
            got,
            [Decision::Allowed(counts(5)), Decision::Allowed(counts(6))]
        );
        assert_eq!(get(&mut admin, "p").as_deref(), Some("6"));
        assert_eq!(get(&mut admin, "d").as_deref(), Some("6"));
    }

    /// A count with a reserve counts the reserve too while both budgets keep 64 times the
    /// reserve left after it, and reports it as a deposit for the group's first call. With
    /// less room it counts the group alone and leaves no trace of the reserve.
    #[tokio::test]
    async fn script_reserves_only_with_room() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        let keys: [Arc<str>; 2] = ["p".into(), "d".into()];
        let reserving = |principal, domain| {
            let mut c = call(&keys, principal, domain, Op::Count);
            c.reserve = 4;
            c
        };
        let counts = |n| Counts {
            principal: n,
            domain: n,
        };
        // 1,000 - 0 >= 2 + 4 + 64 * 4: both requests and the reserve are counted.
        let calls = [reserving(1000, None), reserving(1000, None)];
        let got = link.eval(&calls, 0).await.expect("script runs");
        assert_eq!(
            got.decisions,
            [
                Ok(Decision::Allowed(counts(1))),
                Ok(Decision::Allowed(counts(2)))
            ]
        );
        let deposit = Deposit {
            call: 0,
            requests: 4,
            counts: counts(2),
        };
        assert_eq!(got.reserves, [deposit]);
        assert_eq!(get(&mut admin, "p").as_deref(), Some("6"));
        assert_eq!(get(&mut admin, "d").as_deref(), Some("6"));

        // 266 - 6 < 1 + 4 + 256: the principal's budget has no room for the reserve.
        let got = link.eval(&[reserving(266, None)], 0).await.expect("runs");
        assert_eq!(got.decisions, [Ok(Decision::Allowed(counts(7)))]);
        assert!(got.reserves.is_empty());
        assert_eq!(get(&mut admin, "p").as_deref(), Some("7"));

        // 267 - 7 >= 1 + 4 + 256 for the principal, but the domain ceiling of 260 has no room.
        let got = link
            .eval(&[reserving(267, Some(260))], 0)
            .await
            .expect("runs");
        assert_eq!(got.decisions, [Ok(Decision::Allowed(counts(8)))]);
        assert!(got.reserves.is_empty());
        assert_eq!(get(&mut admin, "p").as_deref(), Some("8"));
        assert_eq!(get(&mut admin, "d").as_deref(), Some("8"));

        // With room in both, the reserve comes back.
        let got = link
            .eval(&[reserving(1000, Some(1000))], 0)
            .await
            .expect("runs");
        assert_eq!(got.decisions, [Ok(Decision::Allowed(counts(9)))]);
        assert_eq!(got.reserves.len(), 1);
        assert_eq!(get(&mut admin, "d").as_deref(), Some("13"));
    }

    /// Taking counts back lowers each key by its amount, not below zero, and passes over keys
    /// that hold no integer.
    #[tokio::test]
    async fn refund_skips_unusable_keys() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        set(&mut admin, "r:five", "5");
        set(&mut admin, "r:one", "1");
        set(&mut admin, "r:text", "abc");
        redis::cmd("RPUSH")
            .arg("r:list")
            .arg("1")
            .query::<()>(&mut admin)
            .expect("RPUSH");
        let refunds: Vec<(Arc<str>, u64)> = [
            ("r:text", 1),
            ("r:five", 2),
            ("r:list", 1),
            ("r:one", 3),
            ("r:missing", 1),
        ]
        .into_iter()
        .map(|(key, amount)| (key.into(), amount))
        .collect();
        link.refund(&refunds).await.expect("refund runs");
        assert_eq!(get(&mut admin, "r:five").as_deref(), Some("3"));
        assert_eq!(get(&mut admin, "r:one").as_deref(), Some("0"));
        assert_eq!(get(&mut admin, "r:text").as_deref(), Some("abc"));
        assert_eq!(get(&mut admin, "r:missing"), None);
    }

    /// Counts go up to 2^53 - 1, because Lua's numbers skip integers above it. A key that an
    /// increment would take past it is unusable.
    #[tokio::test]
    async fn script_counts_up_to_2_pow_53() {
        let server = Server::start();
        let (link, mut admin) = server.connect();
        set(&mut admin, "p:edge", "9007199254740990");
        let keys: [Arc<str>; 2] = ["p:edge".into(), "d".into()];
        let add = [call(&keys, u64::MAX, None, Op::Add)];
        let counts = Counts {
            principal: 9_007_199_254_740_991,
            domain: 1,
        };
        let results = link.eval(&add, 0).await.expect("script runs").decisions;
        assert_eq!(results, [Ok(Decision::Allowed(counts))]);
        let results = link.eval(&add, 0).await.expect("script runs").decisions;
        assert_eq!(results, [Err(Arc::clone(&keys[0]))]);
        assert_eq!(
            get(&mut admin, "p:edge").as_deref(),
            Some("9007199254740991")
        );
        assert_eq!(get(&mut admin, "d").as_deref(), Some("1"));
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
        let got = decisions(&link, &calls).await;
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
