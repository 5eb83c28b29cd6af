//! Local counts: a registry of counters per domain and request class, each with an exact
//! check-and-count per principal and for the whole domain.
//!
//! A principal's counter contains the count of one window (hour). A count from an older hour reads
//! as 0 and is replaced on the next count; entries of older hours are pruned when a shard first
//! sees a newer hour. A clock that steps back keeps counting against the newest hour it saw.
//!
//! With a shared store (Redis), the counters contain the counts of the store's last replies.
//! Requests counted here while the store was unavailable are also kept apart as unshared counts
//! until the store took them (see [`ClassCounts::observe`] and [`ClassCounts::shared`]).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Instant;

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tracing::warn;

/// Shards per counter set; a power of two.
const SHARDS: usize = 32;
/// Principals tracked per domain and class in one hour. Beyond it, new principals share the
/// [`OVERFLOW_PRINCIPAL`] counter, so a flood of addresses cannot exhaust memory.
pub const MAX_PRINCIPALS: usize = 1 << 20;
/// The shared counter of principals beyond [`MAX_PRINCIPALS`].
pub const OVERFLOW_PRINCIPAL: &str = "overflow";

/// The request classes that have budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Index,
    Download,
}

impl Class {
    /// Returns the class's name in keys, state files and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Class::Index => "index",
            Class::Download => "download",
        }
    }

    /// Parses a label written by [`Class::label`].
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "index" => Some(Class::Index),
            "download" => Some(Class::Download),
            _ => None,
        }
    }
}

/// The budget that a decision concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One principal's budget.
    Principal,
    /// The domain-wide ceiling.
    Domain,
}

/// The reason a request was rejected, for the rejection counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The principal's budget ran out.
    Principal,
    /// The domain-wide ceiling was reached.
    Domain,
    /// The shared store could not be reached and the plugin fails closed.
    StoreUnavailable,
}

impl Reason {
    const ALL: [Reason; 3] = [Reason::Principal, Reason::Domain, Reason::StoreUnavailable];

    /// Returns the reason's name in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Principal => "principal",
            Reason::Domain => "domain",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }
}

impl From<Scope> for Reason {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Principal => Reason::Principal,
            Scope::Domain => Reason::Domain,
        }
    }
}

/// The budgets that apply to one class of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per principal per hour.
    pub principal: u64,
    /// Requests of the whole domain per hour, if capped.
    pub domain: Option<u64>,
}

/// Counts of the current hour: the principal's and the domain's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub principal: u64,
    pub domain: u64,
}

/// The result of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request fits; the counts include it when it was counted.
    Allowed(Counts),
    /// The request does not fit `Scope`'s budget and was not counted.
    Rejected(Scope, Counts),
}

impl Decision {
    /// Returns the counts the decision saw.
    pub fn counts(&self) -> Counts {
        match self {
            Decision::Allowed(counts) | Decision::Rejected(_, counts) => *counts,
        }
    }
}

/// Rejections of one domain, class and reason since the process started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionCount {
    pub domain: String,
    /// `"index"` or `"download"`.
    pub class: &'static str,
    /// `"principal"`, `"domain"` or `"store_unavailable"`.
    pub reason: &'static str,
    pub count: u64,
}

/// Requests of one class of one domain counted in one hour, with the budgets that apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassUsage {
    /// `"index"` or `"download"`.
    pub class: &'static str,
    /// Requests of every principal together in the hour.
    pub requests_this_hour: u64,
    /// Requests per principal per hour.
    pub principal_limit: u64,
    /// Requests of the whole domain per hour, if capped.
    pub domain_limit: Option<u64>,
}

/// The counter sets of every domain and class, looked up by domain id.
///
/// The process-wide registry ([`Registry::global`]) outlives plugin instances, so a plugin
/// built again for the same domain (a config reload) continues the counts.
#[derive(Debug, Default)]
pub struct Registry {
    sets: Mutex<HashMap<(String, Class), Arc<ClassCounts>>>,
}

impl Registry {
    /// Creates an empty registry, as a separate gateway process would have.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the registry shared by every plugin of this process.
    pub fn global() -> Arc<Registry> {
        static GLOBAL: LazyLock<Arc<Registry>> = LazyLock::new(|| Arc::new(Registry::new()));
        Arc::clone(&GLOBAL)
    }

    /// Returns the counters of `class` in `domain`, creating them empty on first use.
    pub fn counts(&self, domain: &str, class: Class) -> Arc<ClassCounts> {
        let mut sets = self.sets.lock();
        Arc::clone(
            sets.entry((domain.to_owned(), class))
                .or_insert_with(|| Arc::new(ClassCounts::new(domain))),
        )
    }

    /// Returns the rejection counters of every domain, class and reason, sorted.
    pub fn rejections(&self) -> Vec<RejectionCount> {
        let sets = self.sets.lock();
        let mut out: Vec<RejectionCount> = sets
            .iter()
            .flat_map(|((domain, class), counts)| {
                Reason::ALL.iter().map(move |reason| RejectionCount {
                    domain: domain.clone(),
                    class: class.label(),
                    reason: reason.label(),
                    count: counts.rejected[*reason as usize].load(Ordering::Relaxed),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.domain, a.class, a.reason).cmp(&(&b.domain, b.class, b.reason)));
        out
    }

    /// Returns the count of `hour` of each class of `domain` that a live plugin budgets, index
    /// first. A class without a live plugin (quota not configured, or removed by a reload) is
    /// left out.
    pub fn usage(&self, domain: &str, hour: u64) -> Vec<ClassUsage> {
        let sets = self.sets.lock();
        [Class::Index, Class::Download]
            .into_iter()
            .filter_map(|class| {
                let counts = sets.get(&(domain.to_owned(), class))?;
                let limits = counts.limits()?;
                Some(ClassUsage {
                    class: class.label(),
                    requests_this_hour: counts.domain_count(hour),
                    principal_limit: limits.principal,
                    domain_limit: limits.domain,
                })
            })
            .collect()
    }
}

/// The counters of one class of one domain.
#[derive(Debug)]
pub struct ClassCounts {
    domain_id: String,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    domain: Mutex<Slot>,
    /// Incremented on every change, so a state file is written only when something changed.
    changes: AtomicU64,
    rejected: [AtomicU64; 3],
    overflow_logged: AtomicBool,
    /// The budgets of the plugins built on these counters, oldest first. An entry lives as
    /// long as its plugin.
    limits: Mutex<Vec<Weak<Limits>>>,
    sharing: Mutex<Sharing>,
}

/// The state of sending unshared counts to the shared store.
#[derive(Debug, Default)]
struct Sharing {
    /// Whether a [`SharingTurn`] is alive.
    running: bool,
    /// The earliest instant the next turn may start, as the last turn set it.
    not_before: Option<Instant>,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<Box<[u8]>, Slot, RandomState>,
    /// The newest hour this shard has seen; older entries are gone.
    hour: u64,
}

/// One counter: the hour it counts, its count, and the part of the count that the shared store
/// has not taken yet.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    hour: u64,
    count: u64,
    /// Requests counted here while the shared store was unavailable and not yet taken by it;
    /// included in `count`.
    unshared: u64,
}

impl Slot {
    fn current(&self, hour: u64) -> u64 {
        if self.hour >= hour {
            self.count
        } else {
            0
        }
    }

    fn fresh(hour: u64, count: u64) -> Self {
        Slot {
            hour,
            count,
            unshared: 0,
        }
    }

    fn add(&mut self, hour: u64, mode: CountMode) -> u64 {
        if hour > self.hour {
            *self = Slot::fresh(hour, 0);
        }
        self.count += 1;
        if mode == CountMode::Unshared {
            self.unshared += 1;
        }
        self.count
    }

    /// Sets the count of `hour` to `shared`, the shared store's count, plus the counts the store
    /// has not taken yet, unless the slot counts a later hour.
    fn observe(&mut self, hour: u64, shared: u64) {
        if hour > self.hour {
            *self = Slot::fresh(hour, shared);
        } else if hour == self.hour {
            self.count = shared.saturating_add(self.unshared);
        }
    }

    fn unshared_in(&self, hour: u64) -> u64 {
        if self.hour == hour {
            self.unshared
        } else {
            0
        }
    }

    fn raise(&mut self, hour: u64, count: u64) {
        if hour > self.hour {
            *self = Slot::fresh(hour, count);
        } else if hour == self.hour {
            self.count = self.count.max(count);
        }
    }
}

/// Whether a count is made beside the shared store (or without one), or in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountMode {
    /// Counted here alone, as without a shared store, or as the shared store reported it.
    Local,
    /// Counted here while the shared store was unavailable; to be sent to it later.
    Unshared,
}

impl ClassCounts {
    fn new(domain: &str) -> Self {
        Self {
            domain_id: domain.to_owned(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::default(),
            domain: Mutex::new(Slot::default()),
            changes: AtomicU64::new(0),
            rejected: Default::default(),
            overflow_logged: AtomicBool::new(false),
            limits: Mutex::new(Vec::new()),
            sharing: Mutex::new(Sharing::default()),
        }
    }

    /// Records the budgets of a plugin built on these counters. They are the current budgets
    /// until a newer plugin registers or the returned handle is dropped; the plugin keeps it.
    pub fn register_limits(&self, limits: Limits) -> Arc<Limits> {
        let handle = Arc::new(limits);
        let mut all = self.limits.lock();
        all.retain(|entry| entry.strong_count() > 0);
        all.push(Arc::downgrade(&handle));
        handle
    }

    /// Returns the budgets of the newest plugin still alive; `None` without one.
    pub fn limits(&self) -> Option<Limits> {
        let all = self.limits.lock();
        all.iter()
            .rev()
            .find_map(|entry| entry.upgrade().map(|l| *l))
    }

    /// Returns the domain-wide count of `hour`: every principal's requests together.
    pub fn domain_count(&self, hour: u64) -> u64 {
        self.domain.lock().current(hour)
    }

    /// Counts the request if both the principal's budget and the domain ceiling have room in
    /// `hour`; otherwise counts nothing. Check and count are one atomic step.
    pub fn try_count(&self, principal: &[u8], limits: Limits, hour: u64) -> Decision {
        self.try_count_as(principal, limits, hour, CountMode::Local)
    }

    /// Counts like [`Self::try_count`], in place of a shared store that is unavailable. The
    /// count is also kept as unshared until [`Self::shared`] reports that the store took it.
    pub fn try_count_unshared(&self, principal: &[u8], limits: Limits, hour: u64) -> Decision {
        self.try_count_as(principal, limits, hour, CountMode::Unshared)
    }

    fn try_count_as(
        &self,
        principal: &[u8],
        limits: Limits,
        hour: u64,
        mode: CountMode,
    ) -> Decision {
        self.with_slots(principal, hour, |slot, domain| {
            let counts = Counts {
                principal: slot.current(hour),
                domain: domain.current(hour),
            };
            if let Some(scope) = over_budget(limits, counts) {
                return Decision::Rejected(scope, counts);
            }
            self.changes.fetch_add(1, Ordering::Relaxed);
            Decision::Allowed(Counts {
                principal: slot.add(hour, mode),
                domain: domain.add(hour, mode),
            })
        })
    }

    /// Checks the budgets like [`Self::try_count`] without counting.
    pub fn peek(&self, principal: &[u8], limits: Limits, hour: u64) -> Decision {
        self.with_slots(principal, hour, |slot, domain| {
            let counts = Counts {
                principal: slot.current(hour),
                domain: domain.current(hour),
            };
            match over_budget(limits, counts) {
                Some(scope) => Decision::Rejected(scope, counts),
                None => Decision::Allowed(counts),
            }
        })
    }

    /// Counts the request without checking the budgets; returns the counts after it.
    pub fn add(&self, principal: &[u8], hour: u64) -> Counts {
        self.add_as(principal, hour, CountMode::Local)
    }

    /// Counts like [`Self::add`], in place of a shared store that is unavailable. The count is
    /// also kept as unshared until [`Self::shared`] reports that the store took it.
    pub fn add_unshared(&self, principal: &[u8], hour: u64) -> Counts {
        self.add_as(principal, hour, CountMode::Unshared)
    }

    fn add_as(&self, principal: &[u8], hour: u64, mode: CountMode) -> Counts {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.with_slots(principal, hour, |slot, domain| Counts {
            principal: slot.add(hour, mode),
            domain: domain.add(hour, mode),
        })
    }

    /// Sets the counts of `hour` to `counts`, as a shared store reported them, plus the counts
    /// of `hour` that the store has not taken yet. Local counting starts from these counts when
    /// the store becomes unavailable. Higher counts that a store restarted empty lost are
    /// dropped. Returns the counts of `hour` that wait to be sent to the store: the principal's
    /// and the domain's (every principal's together).
    pub fn observe(&self, principal: &[u8], hour: u64, counts: Counts) -> Counts {
        let unshared = self.with_slots(principal, hour, |slot, domain| {
            slot.observe(hour, counts.principal);
            domain.observe(hour, counts.domain);
            Counts {
                principal: slot.unshared_in(hour),
                domain: domain.unshared_in(hour),
            }
        });
        self.changes.fetch_add(1, Ordering::Relaxed);
        unshared
    }

    /// Returns the counters with unshared counts of `hour`.
    pub fn unshared(&self, hour: u64) -> Vec<Unshared> {
        let mut out = Vec::new();
        for (index, shard) in self.shards.iter().enumerate() {
            let shard = shard.lock();
            out.extend(
                shard
                    .entries
                    .iter()
                    .filter(|(_, slot)| slot.hour == hour && slot.unshared > 0)
                    .map(|(name, slot)| Unshared {
                        principal: name.clone(),
                        count: slot.unshared,
                        shard: index,
                    }),
            );
        }
        out
    }

    /// Records that the shared store took the counts of `sent` in `hour` and reported `counts`
    /// after them, which [`Self::observe`] then sets.
    pub fn shared(&self, sent: &Unshared, hour: u64, counts: Counts) {
        let amount = sent.count;
        self.with_slots_in(sent.shard, &sent.principal, hour, |slot, domain| {
            for (slot, count) in [(slot, counts.principal), (domain, counts.domain)] {
                if slot.hour == hour {
                    slot.unshared = slot.unshared.saturating_sub(amount);
                }
                slot.observe(hour, count);
            }
        });
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a turn of sending the unshared counts to the shared store at `now`. Returns
    /// `None` while another turn runs, or before the time that the last turn set with
    /// `SharingTurn::retry_at`.
    pub fn begin_sharing(self: &Arc<Self>, now: Instant) -> Option<SharingTurn> {
        let mut sharing = self.sharing.lock();
        if sharing.running || sharing.not_before.is_some_and(|at| now < at) {
            return None;
        }
        sharing.running = true;
        sharing.not_before = None;
        Some(SharingTurn {
            counts: Arc::clone(self),
            retry_at: None,
        })
    }

    /// Raises one counter of `hour` to at least `count`; `None` is the domain's counter.
    pub fn restore(&self, principal: Option<&[u8]>, hour: u64, count: u64) {
        match principal {
            Some(principal) => self.with_slots(principal, hour, |slot, _| slot.raise(hour, count)),
            None => self.domain.lock().raise(hour, count),
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the non-zero counters of `hour`: principals with their names, the domain's
    /// counter with `None`.
    pub fn snapshot(&self, hour: u64) -> Vec<(Option<String>, u64)> {
        let mut out = Vec::new();
        let domain = self.domain.lock().current(hour);
        if domain > 0 {
            out.push((None, domain));
        }
        for shard in self.shards.iter() {
            let shard = shard.lock();
            out.extend(
                shard
                    .entries
                    .iter()
                    .filter(|(_, slot)| slot.hour == hour && slot.count > 0)
                    .map(|(name, slot)| {
                        (Some(String::from_utf8_lossy(name).into_owned()), slot.count)
                    }),
            );
        }
        out
    }

    /// Returns a number that changes whenever a count changes.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Counts one rejection.
    pub fn record_rejection(&self, reason: Reason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the rejections counted for `reason`.
    pub fn rejections(&self, reason: Reason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Runs `f` on the principal's slot and the domain's slot, locked in that order.
    fn with_slots<T>(
        &self,
        principal: &[u8],
        hour: u64,
        f: impl FnOnce(&mut Slot, &mut Slot) -> T,
    ) -> T {
        let index = self.hasher.hash_one(principal) as usize & (SHARDS - 1);
        self.with_slots_in(index, principal, hour, f)
    }

    /// Runs `f` like [`Self::with_slots`], on the principal's slot in shard `index`. The
    /// shared [`OVERFLOW_PRINCIPAL`] counter has a slot in each full shard, so it is found by
    /// the shard, not by its name.
    fn with_slots_in<T>(
        &self,
        index: usize,
        principal: &[u8],
        hour: u64,
        f: impl FnOnce(&mut Slot, &mut Slot) -> T,
    ) -> T {
        let mut shard = self.shards[index].lock();
        if hour > shard.hour {
            shard.entries.retain(|_, slot| slot.hour >= hour);
            shard.hour = hour;
        }
        let mut domain = self.domain.lock();
        if let Some(slot) = shard.entries.get_mut(principal) {
            return f(slot, &mut domain);
        }
        let key = if shard.entries.len() < MAX_PRINCIPALS / SHARDS {
            principal
        } else {
            self.log_overflow();
            OVERFLOW_PRINCIPAL.as_bytes()
        };
        let out = match shard.entries.get_mut(key) {
            Some(slot) => f(slot, &mut domain),
            None => {
                let mut slot = Slot::default();
                let out = f(&mut slot, &mut domain);
                if slot.count > 0 {
                    shard.entries.insert(Box::from(key), slot);
                }
                out
            }
        };
        out
    }

    fn log_overflow(&self) {
        if !self.overflow_logged.swap(true, Ordering::Relaxed) {
            warn!(domain = %self.domain_id, max = MAX_PRINCIPALS,
                "quota tracks too many principals this hour; new ones share one budget");
        }
    }
}

/// Requests of one principal that were counted in place of the shared store and that the
/// store has not taken yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unshared {
    /// The principal's name, or [`OVERFLOW_PRINCIPAL`] for those beyond [`MAX_PRINCIPALS`].
    pub principal: Box<[u8]>,
    pub count: u64,
    /// The shard that contains the counter.
    shard: usize,
}

/// A turn of sending unshared counts to the shared store; the next turn can start once this
/// one is dropped.
#[derive(Debug)]
pub struct SharingTurn {
    counts: Arc<ClassCounts>,
    retry_at: Option<Instant>,
}

impl SharingTurn {
    /// Delays the next turn until `at`.
    pub fn retry_at(&mut self, at: Instant) {
        self.retry_at = Some(at);
    }
}

impl Drop for SharingTurn {
    fn drop(&mut self) {
        let mut sharing = self.counts.sharing.lock();
        sharing.running = false;
        sharing.not_before = self.retry_at;
    }
}

/// Returns the budget that `counts` leave no room in, if any.
pub fn over_budget(limits: Limits, counts: Counts) -> Option<Scope> {
    if counts.principal >= limits.principal {
        Some(Scope::Principal)
    } else if limits
        .domain
        .is_some_and(|ceiling| counts.domain >= ceiling)
    {
        Some(Scope::Domain)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 7;
    const LIMITS: Limits = Limits {
        principal: 10,
        domain: None,
    };

    fn counts(principal: u64, domain: u64) -> Counts {
        Counts { principal, domain }
    }

    fn names_and_counts(unshared: &[Unshared]) -> Vec<(String, u64)> {
        unshared
            .iter()
            .map(|u| (String::from_utf8_lossy(&u.principal).into_owned(), u.count))
            .collect()
    }

    /// Counts made in place of the shared store stay on top of the store's counts until the
    /// store reports that it took them.
    #[test]
    fn unshared_counts_survive_observe() {
        let set = Registry::new().counts("d", Class::Index);
        assert_eq!(set.observe(b"alice", HOUR, counts(3, 5)), counts(0, 0));
        set.try_count_unshared(b"alice", LIMITS, HOUR);
        set.add_unshared(b"alice", HOUR);
        set.try_count(b"bob", LIMITS, HOUR);
        assert_eq!(set.observe(b"alice", HOUR, counts(4, 6)), counts(2, 2));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(6, 8));
        let unshared = set.unshared(HOUR);
        assert_eq!(names_and_counts(&unshared), [("alice".to_owned(), 2)]);
        assert_eq!(set.unshared(HOUR + 1), Vec::new());

        set.shared(&unshared[0], HOUR, counts(7, 9));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(7, 9));
        assert_eq!(set.unshared(HOUR), Vec::new());
        assert_eq!(set.observe(b"alice", HOUR, counts(7, 9)), counts(0, 0));
    }

    /// Unshared counts that the store took only in part keep the rest on top.
    #[test]
    fn shared_in_part_keeps_the_rest() {
        let set = Registry::new().counts("d", Class::Index);
        for _ in 0..3 {
            set.try_count_unshared(b"alice", LIMITS, HOUR);
        }
        let mut part = set.unshared(HOUR).remove(0);
        part.count = 2;
        set.shared(&part, HOUR, counts(2, 2));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(3, 3));
        assert_eq!(
            names_and_counts(&set.unshared(HOUR)),
            [("alice".to_owned(), 1)]
        );
    }

    /// Unshared counts of an earlier hour are dropped when the hour turns.
    #[test]
    fn unshared_counts_end_with_their_hour() {
        let set = Registry::new().counts("d", Class::Index);
        set.try_count_unshared(b"alice", LIMITS, HOUR);
        assert_eq!(set.observe(b"alice", HOUR + 1, counts(1, 1)), counts(0, 0));
        assert_eq!(set.unshared(HOUR), Vec::new());
        assert_eq!(set.unshared(HOUR + 1), Vec::new());
    }

    /// One sharing turn runs at a time, and a turn can delay the next.
    #[test]
    fn sharing_turns_one_at_a_time() {
        let set = Registry::new().counts("d", Class::Index);
        let start = Instant::now();
        let mut turn = set.begin_sharing(start).expect("first turn");
        assert!(set.begin_sharing(start).is_none());
        turn.retry_at(start + std::time::Duration::from_secs(1));
        drop(turn);
        assert!(set.begin_sharing(start).is_none());
        let later = start + std::time::Duration::from_secs(1);
        let turn = set.begin_sharing(later).expect("turn after the retry time");
        drop(turn);
        assert!(set.begin_sharing(later).is_some());
    }
}
