//! Local counts: a registry of counters per domain and request class, each with an exact
//! check-and-count per principal and for the whole domain.
//!
//! A principal's counter contains the count of one window (hour). A count from an older hour reads
//! as 0 and is replaced on the next count; entries of older hours are pruned when a shard first
//! sees a newer hour. A clock that steps back keeps counting against the newest hour it saw.
//!
//! With a shared store (Redis), the counters contain the counts of the store's last replies.
//! Requests counted here and not in the store are also kept apart as unshared counts until the
//! store took them. They come from the time the store was unavailable, or from a plugin
//! without a store before a reload added one (see [`ClassCounts::observe`],
//! [`ClassCounts::take_unshared`] and [`ClassCounts::shared`]).
//!
//! Counts end at [`MAX_COUNT`]: a count read from a state file is cut to it, and counts that
//! grow saturate instead of wrapping, so no input makes a count overflow.

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
/// The highest count that is restored: the largest TOML integer, which the state file writes
/// at most. It is above every budget.
pub const MAX_COUNT: u64 = i64::MAX as u64;

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

impl Reason {
    /// Returns the label of a rejection of `class` for this reason, as recorded in
    /// `RequestState::rejected_reason`: `<class>:<reason>`, such as `index:principal`.
    pub fn rejection_label(self, class: Class) -> &'static str {
        match (class, self) {
            (Class::Index, Reason::Principal) => "index:principal",
            (Class::Index, Reason::Domain) => "index:domain",
            (Class::Index, Reason::StoreUnavailable) => "index:store_unavailable",
            (Class::Download, Reason::Principal) => "download:principal",
            (Class::Download, Reason::Domain) => "download:domain",
            (Class::Download, Reason::StoreUnavailable) => "download:store_unavailable",
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

/// One counter: the hour it counts, its count, and the parts of the count that the shared store
/// has not taken yet.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    hour: u64,
    count: u64,
    /// Requests counted here and not in the shared store, and not yet sent to it; included in
    /// `count`.
    unshared: u64,
    /// The store's count once it has run the `INCRBY`s of the last sending turn, at least:
    /// its count as last seen before the turn plus the amounts sent. 0 before a turn. Counts
    /// on the way to the store are in `count` and in the floor, and no longer in `unshared`.
    floor: u64,
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
            floor: 0,
        }
    }

    /// Counts one request that the shared store counted too, and raises the count to at least
    /// `reported`, the store's count with it.
    fn add_shared(&mut self, hour: u64, reported: u64) -> u64 {
        if hour > self.hour {
            *self = Slot::fresh(hour, 0);
        }
        self.count = self.count.saturating_add(1).max(self.seen(hour, reported));
        self.count
    }

    /// Returns the count of `hour` by this slot and `stored`, a count of the shared
    /// store: the larger of its own count and `stored` plus the requests of `hour` that the
    /// store has not taken.
    fn seen(&self, hour: u64, stored: u64) -> u64 {
        if self.hour == hour {
            stored.saturating_add(self.unshared).max(self.count)
        } else {
            stored.max(self.current(hour))
        }
    }

    /// Counts one request here, as not yet in the shared store.
    fn add(&mut self, hour: u64) -> u64 {
        if hour > self.hour {
            *self = Slot::fresh(hour, 0);
        }
        self.count = self.count.saturating_add(1);
        self.unshared = self.unshared.saturating_add(1);
        self.count
    }

    /// Sets the count of `hour` from `shared`, the shared store's count, unless the slot counts
    /// a later hour. `counted` is how many requests the store counted in the reply (0 or 1);
    /// they are included in `shared`.
    ///
    /// The count becomes the store's count plus the counts the store has not taken yet. After a
    /// sending turn, the store's part is at least the floor plus `counted`. A reply that Redis
    /// made after it ran the turn's `INCRBY`s is at least that high and is taken as it is
    /// (it includes the amounts sent). A lower reply was made before (its call ran first, even
    /// if its reply is read later), so the amounts sent are missing from it. They are then
    /// counted once through the floor, instead of being added on top of every reply.
    fn observe(&mut self, hour: u64, shared: u64, counted: u64) {
        if hour > self.hour {
            *self = Slot::fresh(hour, shared);
        } else if hour == self.hour {
            // Without a floor, `counted` (at most `shared`) changes nothing.
            let stored = shared.max(self.floor.saturating_add(counted));
            self.count = stored.saturating_add(self.unshared);
        }
    }

    /// Takes back one request that the shared store counted and that is taken back from it.
    fn take_back(&mut self, hour: u64) {
        if self.hour == hour && self.count > self.unshared {
            self.count -= 1;
        }
    }

    /// Returns how much the count of `hour` exceeds `shared`, the shared store's count: the
    /// counts the store has not taken, or may not have taken yet.
    fn beyond(&self, hour: u64, shared: u64) -> u64 {
        if self.hour == hour {
            self.count.saturating_sub(shared)
        } else {
            0
        }
    }

    fn unshared_in(&self, hour: u64) -> u64 {
        if self.hour == hour {
            self.unshared
        } else {
            0
        }
    }

    /// Marks `amount` of the unshared counts of `hour` as on the way to the shared store, and
    /// sets the floor to the store's part of the count with them.
    fn send(&mut self, hour: u64, amount: u64) {
        if self.hour == hour {
            self.unshared -= amount.min(self.unshared);
            self.floor = self.count.saturating_sub(self.unshared);
        }
    }

    /// Records that `amount` of the counts sent in `hour` did not reach the shared store: they
    /// are unshared again, and no longer part of the floor.
    fn unsent(&mut self, hour: u64, amount: u64) {
        if self.hour == hour {
            let amount = amount.min(self.count.saturating_sub(self.unshared));
            self.unshared += amount;
            self.floor = self.floor.saturating_sub(amount);
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

/// The result of [`ClassCounts::observe`]: how the local counts compare with a reply of the
/// shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observed {
    /// How much the local counts (the principal's, the domain's) exceed the reply's: the
    /// counts the store has not taken, or may not have taken yet. The best estimate of the
    /// true counts is the reply's plus these.
    pub beyond: Counts,
    /// Whether counts of the hour wait to be sent to the store.
    pub unshared: bool,
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
    ///
    /// The count is also kept as unshared until [`Self::shared`] reports that a shared store
    /// took it, so that a plugin with a store (after a reload, or once an unavailable store
    /// replies again) adds it to the store.
    pub fn try_count(&self, principal: &[u8], limits: Limits, hour: u64) -> Decision {
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
                principal: slot.add(hour),
                domain: domain.add(hour),
            })
        })
    }

    /// Counts a request that the shared store counted before it arrived (from a reserve) if
    /// both budgets have room in `hour`. The counts checked are the larger of `reported`, the
    /// counts the store's reserve gives the request, less the request, and the local counts,
    /// which include the requests counted here and not in the store yet. The local counts
    /// rise to at least `reported`. Returns the decision with the larger counts, and whether
    /// counts of the hour wait to be sent to the store. A rejection counts nothing.
    pub fn try_count_reserved(
        &self,
        principal: &[u8],
        limits: Limits,
        hour: u64,
        reported: Counts,
    ) -> (Decision, bool) {
        self.with_slots(principal, hour, |slot, domain| {
            let unshared = domain.unshared_in(hour) > 0;
            let before = Counts {
                principal: slot.seen(hour, reported.principal.saturating_sub(1)),
                domain: domain.seen(hour, reported.domain.saturating_sub(1)),
            };
            if let Some(scope) = over_budget(limits, before) {
                return (Decision::Rejected(scope, before), unshared);
            }
            self.changes.fetch_add(1, Ordering::Relaxed);
            let after = Counts {
                principal: slot.add_shared(hour, reported.principal),
                domain: domain.add_shared(hour, reported.domain),
            };
            (Decision::Allowed(after), unshared)
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

    /// Counts the request without checking the budgets; returns the counts after it. The
    /// count is kept as unshared, as with [`Self::try_count`].
    pub fn add(&self, principal: &[u8], hour: u64) -> Counts {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.with_slots(principal, hour, |slot, domain| Counts {
            principal: slot.add(hour),
            domain: domain.add(hour),
        })
    }

    /// Sets the counts of `hour` from `counts`, as a shared store reported them, plus the
    /// counts of `hour` that the store has not taken yet. `counted` is how many requests the
    /// store counted in this reply (1 for a request it counted, else 0). Local counting starts
    /// from these counts when the store becomes unavailable. Higher counts that a store
    /// restarted empty lost are dropped, except that after a sending turn the store's part
    /// stays at least the turn's floor (see [`Self::take_unshared`]).
    pub fn observe(&self, principal: &[u8], hour: u64, counts: Counts, counted: u64) -> Observed {
        let observed = self.with_slots(principal, hour, |slot, domain| {
            slot.observe(hour, counts.principal, counted);
            domain.observe(hour, counts.domain, counted);
            Observed {
                beyond: Counts {
                    principal: slot.beyond(hour, counts.principal),
                    domain: domain.beyond(hour, counts.domain),
                },
                unshared: domain.unshared_in(hour) > 0,
            }
        });
        self.changes.fetch_add(1, Ordering::Relaxed);
        observed
    }

    /// Returns the counters with unshared counts of `hour`, and marks those counts as on the
    /// way to the shared store. The caller reports each with [`Self::shared`] once the store
    /// took it, or with [`Self::unsent`] when it did not.
    ///
    /// A reply of the store may or may not include counts sent to it, because Redis may have
    /// run the call of that reply before or after the `INCRBY`, and the replies may be read
    /// in either order. Adding them on top of every reply until the `INCRBY`'s reply is read
    /// would count them twice in the first case. Instead each counter keeps a floor for the
    /// rest of the hour: the store's count as last seen plus the amount sent, which the
    /// store's count reaches once it ran the `INCRBY`. [`Self::observe`] takes the store's
    /// part as the larger of the reply and the floor. That never counts a request twice while
    /// the store's counts only grow. It is exact when no other replica counted the principal
    /// since this process last saw its count, and otherwise misses at most the amount sent,
    /// until the store has run the `INCRBY`.
    pub fn take_unshared(&self, hour: u64) -> Vec<Unshared> {
        let mut out = Vec::new();
        for (index, shard) in self.shards.iter().enumerate() {
            let mut shard = shard.lock();
            let mut domain = self.domain.lock();
            for (name, slot) in shard.entries.iter_mut() {
                if slot.hour != hour || slot.unshared == 0 {
                    continue;
                }
                let count = slot.unshared;
                slot.send(hour, count);
                domain.send(hour, count);
                out.push(Unshared {
                    principal: name.clone(),
                    count,
                    shard: index,
                });
            }
        }
        out
    }

    /// Records that the shared store took the counts of `sent` in `hour` and reported `counts`
    /// after them, which [`Self::observe`] then sets. The amount sent is in the floor already,
    /// and the store's count includes it now.
    pub fn shared(&self, sent: &Unshared, hour: u64, counts: Counts) {
        self.with_slots_in(sent.shard, &sent.principal, hour, |slot, domain| {
            slot.observe(hour, counts.principal, 0);
            domain.observe(hour, counts.domain, 0);
        });
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one request of `principal` in `hour` out of the counts that the shared store
    /// reported, because it is being taken back from the store. The count the store will have
    /// then is what a sending turn's floor starts from.
    pub fn taken_back(&self, principal: &[u8], hour: u64) {
        self.with_slots(principal, hour, |slot, domain| {
            slot.take_back(hour);
            domain.take_back(hour);
        });
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that the shared store did not take the counts of `sent` in `hour`: they are
    /// unshared again, to be sent in a later turn.
    pub fn unsent(&self, sent: &Unshared, hour: u64) {
        let amount = sent.count;
        self.with_slots_in(sent.shard, &sent.principal, hour, |slot, domain| {
            slot.unsent(hour, amount);
            domain.unsent(hour, amount);
        });
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

    /// Raises one counter of `hour` to at least `count`, cut to [`MAX_COUNT`]; `None` is the
    /// domain's counter.
    pub fn restore(&self, principal: Option<&[u8]>, hour: u64, count: u64) {
        let count = count.min(MAX_COUNT);
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

    fn observed(set: &ClassCounts, name: &[u8], hour: u64, reply: Counts) -> Counts {
        set.observe(name, hour, reply, 0).beyond
    }

    /// Counts made in place of the shared store stay on top of the store's counts until the
    /// store reports that it took them.
    #[test]
    fn unshared_counts_survive_observe() {
        let set = Registry::new().counts("d", Class::Index);
        assert_eq!(observed(&set, b"alice", HOUR, counts(3, 5)), counts(0, 0));
        set.try_count(b"alice", LIMITS, HOUR);
        set.add(b"alice", HOUR);
        assert_eq!(observed(&set, b"alice", HOUR, counts(4, 6)), counts(2, 2));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(6, 8));
        assert_eq!(set.take_unshared(HOUR + 1), Vec::new());
        let unshared = set.take_unshared(HOUR);
        assert_eq!(names_and_counts(&unshared), [("alice".to_owned(), 2)]);
        assert_eq!(set.take_unshared(HOUR), Vec::new(), "already on the way");

        set.shared(&unshared[0], HOUR, counts(7, 9));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(7, 9));
        assert_eq!(set.take_unshared(HOUR), Vec::new());
        assert_eq!(
            set.observe(b"alice", HOUR, counts(7, 9), 0),
            Observed::default()
        );
    }

    /// A request from a reserve never lowers the local counts to the older counts of the
    /// reserve, and is checked against the local counts with the unshared requests: the
    /// counts a fallback starts from stay those of the newest reply.
    #[test]
    fn reserved_requests_keep_newer_counts() {
        let set = Registry::new().counts("d", Class::Index);
        let limits = Limits {
            principal: 1000,
            domain: Some(1000),
        };
        observed(&set, b"bob", HOUR, counts(1, 900));
        let (decision, unshared) = set.try_count_reserved(b"alice", limits, HOUR, counts(2, 5));
        assert_eq!(decision, Decision::Allowed(counts(2, 901)));
        assert!(!unshared);
        assert_eq!(set.domain_count(HOUR), 901);
        assert_eq!(set.take_unshared(HOUR), Vec::new(), "Redis has counted it");

        let (decision, _) = set.try_count_reserved(b"alice", limits, HOUR, counts(900, 905));
        assert_eq!(decision, Decision::Allowed(counts(900, 905)));

        // Requests counted here while Redis was away put alice over her budget.
        for _ in 0..100 {
            set.add(b"alice", HOUR);
        }
        let (decision, unshared) = set.try_count_reserved(b"alice", limits, HOUR, counts(901, 906));
        assert_eq!(
            decision,
            Decision::Rejected(Scope::Principal, counts(1000, 1005))
        );
        assert!(unshared);
    }

    /// Counts made without a shared store (before a reload added one) are unshared too, so the
    /// first reply of the store does not lower them to the store's count.
    #[test]
    fn counts_without_store_are_unshared() {
        let set = Registry::new().counts("d", Class::Index);
        for _ in 0..5 {
            set.try_count(b"alice", LIMITS, HOUR);
        }
        set.add(b"bob", HOUR);
        let observed = set.observe(b"alice", HOUR, counts(1, 1), 1);
        assert_eq!(observed.beyond, counts(5, 6));
        assert!(observed.unshared);
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(6, 7));
    }

    /// Counts sent to the store count once, whether a reply includes them or not, and in
    /// whatever order the replies are read. The case: a budget of 10, the store at 3, and 4
    /// counted here while it was away.
    #[test]
    fn counts_sent_count_once() {
        let set = Registry::new().counts("d", Class::Index);
        let limits = LIMITS;
        observed(&set, b"alice", HOUR, counts(3, 3));
        for _ in 0..4 {
            set.try_count(b"alice", limits, HOUR);
        }
        let sent = set.take_unshared(HOUR);
        assert_eq!(names_and_counts(&sent), [("alice".to_owned(), 4)]);
        assert_eq!(set.take_unshared(HOUR), Vec::new(), "already on the way");
        assert_eq!(set.peek(b"alice", limits, HOUR).counts(), counts(7, 7));

        // The store runs a request S (3 to 4), the INCRBY (to 8), and a request P (8 to 9).
        // P's reply is read first: it includes the 4, which are not added again.
        let p = set.observe(b"alice", HOUR, counts(9, 9), 1);
        assert_eq!(p, Observed::default());
        // S's reply does not include the 4: they count through the floor, once.
        let s = set.observe(b"alice", HOUR, counts(4, 4), 1);
        assert_eq!(s.beyond, counts(4, 4));
        // The INCRBY's reply, read last, leaves the store's part at the floor or above.
        set.shared(&sent[0], HOUR, counts(8, 8));
        assert_eq!(set.peek(b"alice", limits, HOUR).counts(), counts(8, 8));
        // A later request that the store counts takes the store's count as it is.
        assert_eq!(
            set.observe(b"alice", HOUR, counts(10, 10), 1),
            Observed::default()
        );
        assert_eq!(set.peek(b"alice", limits, HOUR).counts(), counts(10, 10));
        assert_eq!(set.take_unshared(HOUR), Vec::new());
    }

    /// A reply to a request that the store counted after the INCRBY, read while the INCRBY's
    /// reply is held back, includes the counts sent once: 7 before the request, not 7 + 4.
    #[test]
    fn reply_after_incrby_counts_sent_once() {
        let set = Registry::new().counts("d", Class::Index);
        observed(&set, b"alice", HOUR, counts(3, 3));
        for _ in 0..4 {
            set.try_count(b"alice", LIMITS, HOUR);
        }
        let _sent = set.take_unshared(HOUR);
        let seen = set.observe(b"alice", HOUR, counts(8, 8), 1);
        assert_eq!(seen.beyond, counts(0, 0));
        // A count made here meanwhile is unshared, on top of the store's part.
        set.try_count(b"alice", LIMITS, HOUR);
        assert_eq!(
            set.observe(b"alice", HOUR, counts(8, 8), 0).beyond,
            counts(1, 1)
        );
        assert_eq!(
            names_and_counts(&set.take_unshared(HOUR)),
            [("alice".to_owned(), 1)]
        );
    }

    /// A request taken back from the store leaves the counts, and the floor of a sending turn
    /// that starts after it.
    #[test]
    fn taken_back_request_is_not_in_the_floor() {
        let set = Registry::new().counts("d", Class::Index);
        for _ in 0..5 {
            set.try_count(b"alice", LIMITS, HOUR);
        }
        // The store counted a request (0 to 1) that the 5 counted here put over the budget.
        assert_eq!(
            set.observe(b"alice", HOUR, counts(1, 1), 1).beyond,
            counts(5, 5)
        );
        set.taken_back(b"alice", HOUR);
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(5, 5));
        let sent = set.take_unshared(HOUR);
        set.shared(&sent[0], HOUR, counts(5, 5));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(5, 5));
    }

    /// Counts that the store did not take are unshared again.
    #[test]
    fn unsent_counts_are_unshared_again() {
        let set = Registry::new().counts("d", Class::Index);
        for _ in 0..3 {
            set.try_count(b"alice", LIMITS, HOUR);
        }
        let sent = set.take_unshared(HOUR);
        set.unsent(&sent[0], HOUR);
        // The store's count without them is taken as it is again.
        assert_eq!(
            set.observe(b"alice", HOUR, counts(1, 1), 1).beyond,
            counts(3, 3)
        );
        assert_eq!(
            names_and_counts(&set.take_unshared(HOUR)),
            [("alice".to_owned(), 3)]
        );
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(4, 4));
    }

    /// Unshared counts that the store took only in part keep the rest on top.
    #[test]
    fn shared_in_part_keeps_the_rest() {
        let set = Registry::new().counts("d", Class::Index);
        for _ in 0..3 {
            set.try_count(b"alice", LIMITS, HOUR);
        }
        let mut part = set.take_unshared(HOUR).remove(0);
        let rest = Unshared {
            count: 1,
            ..part.clone()
        };
        part.count = 2;
        set.unsent(&rest, HOUR);
        set.shared(&part, HOUR, counts(2, 2));
        assert_eq!(set.peek(b"alice", LIMITS, HOUR).counts(), counts(3, 3));
        assert_eq!(
            names_and_counts(&set.take_unshared(HOUR)),
            [("alice".to_owned(), 1)]
        );
    }

    /// Unshared counts of an earlier hour are dropped when the hour turns.
    #[test]
    fn unshared_counts_end_with_their_hour() {
        let set = Registry::new().counts("d", Class::Index);
        set.try_count(b"alice", LIMITS, HOUR);
        assert_eq!(
            observed(&set, b"alice", HOUR + 1, counts(1, 1)),
            counts(0, 0)
        );
        assert_eq!(set.take_unshared(HOUR), Vec::new());
        assert_eq!(set.take_unshared(HOUR + 1), Vec::new());
    }

    /// Counts saturate at the top instead of overflowing, and a restored count is cut to
    /// [`MAX_COUNT`].
    #[test]
    fn counts_saturate() {
        let set = Registry::new().counts("d", Class::Index);
        set.restore(Some(b"alice"), HOUR, u64::MAX);
        set.restore(None, HOUR, u64::MAX);
        let unlimited = Limits {
            principal: u64::MAX,
            domain: None,
        };
        assert_eq!(
            set.peek(b"alice", unlimited, HOUR).counts(),
            counts(MAX_COUNT, MAX_COUNT)
        );
        assert_eq!(
            set.try_count(b"bob", LIMITS, HOUR),
            Decision::Allowed(counts(1, MAX_COUNT + 1))
        );
        let mut slot = Slot::fresh(HOUR, u64::MAX);
        assert_eq!(slot.add(HOUR), u64::MAX);
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
