//! The weighted priority failover balancer: a pure state machine (no I/O, no runtime; the clock
//! and the random source are passed in).
//!
//! - **Weights** fall on failure and climb on success ([`weight::WeightRules`]); an endpoint at its
//!   minimum is recovered only by passing health checks; new endpoints may start slow.
//! - **Priorities** follow Envoy: each level's health is its current weight over its maximum
//!   weight, boosted by the overprovisioning factor, and levels share traffic by the normalised
//!   formula ([`priority`]). A level below the panic threshold (while the total is short) ignores
//!   health. When every level is dead, picks spread over all endpoints by maximum weight (or fail,
//!   with `fail_when_all_down`).
//! - **Within a level**, an endpoint is drawn by its maximum weight from a prebuilt alias table (or
//!   round robin when all are equal) and kept with probability current/max: rejection sampling,
//!   so the draw is exactly proportional to current weights, lock-free and O(1) expected. The
//!   least-request policy draws two such candidates and keeps the one with the larger
//!   `weight / (1 + in_flight)^bias`.
//! - **Outliers**: consecutive failures eject an endpoint for base × ejections (capped); at most a
//!   configured share of a level (at least one endpoint) is ejected at once.
//! - **Hot update**: a new endpoint set is applied as a new snapshot (arc-swap); endpoints that stay
//!   keep their state, weights rescaled if their maximum changed.

pub mod alias;
pub mod priority;
pub mod weight;

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use alias::AliasTable;
use weight::{EndpointState, WeightRules, to_units};

/// Monotonic time in nanoseconds, injectable so tests control it.
pub trait Clock: Send + Sync {
    fn now_nanos(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now_nanos(&self) -> u64 {
        // Offset by one so that 0 can mean "never".
        self.0.elapsed().as_nanos() as u64 + 1
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::Relaxed) + 1
    }
}

/// Uniform random numbers for picks.
pub trait Random {
    fn next_u64(&mut self) -> u64;
}

impl Random for fastrand::Rng {
    fn next_u64(&mut self) -> u64 {
        self.u64(..)
    }
}

/// fastrand's thread-local generator: no shared state between threads.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadRandom;

impl Random for ThreadRandom {
    fn next_u64(&mut self) -> u64 {
        fastrand::u64(..)
    }
}

/// How an endpoint is chosen within a priority level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Exactly proportional to current weights.
    Weighted,
    /// Power of two choices on `weight / (1 + in_flight)^bias`.
    LeastRequest { bias: f64 },
}

/// Outlier ejection settings (Envoy's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint (0 disables ejection).
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Most of a level that may be ejected at once; at least one endpoint always may.
    pub max_ejection_share: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_share: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BalancerConfig {
    pub policy: Policy,
    pub overprovisioning_factor: f64,
    /// A level whose health is below this (while total health is short) ignores health.
    pub panic_threshold: f64,
    /// When every endpoint is down: fail picks (true) or spread over all of them (false).
    pub fail_when_all_down: bool,
    pub rules: WeightRules,
    pub outlier: OutlierConfig,
    /// Share of max weight a newly added endpoint starts at (1.0: no slow start).
    pub initial_weight_share: f64,
    /// Count requests in flight per endpoint under the weighted policy too (least request always
    /// counts). Off by default: it costs two atomic operations per request on shared cache lines.
    pub track_in_flight: bool,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Weighted,
            overprovisioning_factor: 1.4,
            panic_threshold: 0.5,
            fail_when_all_down: false,
            rules: WeightRules::default(),
            outlier: OutlierConfig::default(),
            initial_weight_share: 1.0,
            track_in_flight: false,
        }
    }
}

/// One endpoint as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec<K> {
    pub key: K,
    pub max_weight: f64,
    pub min_weight: f64,
    /// Lower is preferred.
    pub priority: u32,
    pub zone: Option<String>,
}

/// What a hot update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateResult<K> {
    pub added: Vec<K>,
    pub removed: Vec<K>,
    /// Kept, with a changed maximum or minimum weight, priority or zone.
    pub changed: Vec<K>,
}

/// How a picked endpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Known dead: drop to the minimum weight at once.
    Down,
}

/// A picked endpoint; hand it back with [`Balancer::report`] to release its in-flight slot.
#[derive(Debug)]
pub struct Picked<K> {
    pub key: K,
    ticket: Ticket,
}

impl<K> Picked<K> {
    /// The priority level the endpoint had when it was picked.
    pub fn priority(&self) -> u32 {
        self.ticket.priority()
    }
}

/// The rest of a pick packed into one word, so that a [`Picked`] of a small key is a pair of
/// scalars and travels in two registers: bit 63 is always set (a niche, so `Option<Picked>` needs
/// no extra tag), bit 62 says whether the pick holds an in-flight slot, bits 32..62 hold the
/// endpoint's index in the snapshot it was picked from, and the low 32 bits its priority. A report
/// finds the endpoint by index without a lookup; the key is compared, so an index into a newer
/// snapshot is harmless (the same key there is the same endpoint, with the same state).
#[derive(Debug, Clone, Copy)]
struct Ticket(NonZeroU64);

impl Ticket {
    const VALID: u64 = 1 << 63;
    const COUNTED: u64 = 1 << 62;
    /// Index bits all set: no usable index (the report looks the key up).
    const NO_INDEX: u64 = (1 << 30) - 1;

    #[inline]
    fn new(index: usize, priority: u32, counted: bool) -> Self {
        let index = u64::try_from(index)
            .ok()
            .filter(|i| *i < Self::NO_INDEX)
            .unwrap_or(Self::NO_INDEX);
        let counted = if counted { Self::COUNTED } else { 0 };
        let bits = Self::VALID | counted | index << 32 | u64::from(priority);
        Self(NonZeroU64::new(bits).unwrap_or(NonZeroU64::MIN))
    }

    #[inline]
    fn counted(self) -> bool {
        self.0.get() & Self::COUNTED != 0
    }

    #[inline]
    fn index(self) -> Option<usize> {
        let index = (self.0.get() >> 32) & Self::NO_INDEX;
        (index != Self::NO_INDEX).then_some(index as usize)
    }

    fn priority(self) -> u32 {
        self.0.get() as u32
    }
}

/// A read-only view of one endpoint, for admin pages.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView<K> {
    pub key: K,
    pub priority: u32,
    pub zone: Option<String>,
    pub max_weight: f64,
    pub min_weight: f64,
    pub current_weight: f64,
    pub in_flight: u32,
    pub ejected: bool,
    pub ejections: u32,
}

struct Member<K> {
    key: K,
    zone: Option<String>,
    priority: u32,
    state: Arc<EndpointState>,
}

struct Group {
    priority: u32,
    /// Indices into the snapshot's members.
    members: Vec<usize>,
    max_total: u64,
    current_total: Arc<AtomicI64>,
    /// Over maximum weights; `None` when all are equal (round robin) or all zero.
    alias: Option<AliasTable>,
    round_robin: AtomicUsize,
}

impl Group {
    fn health(&self) -> f64 {
        if self.max_total == 0 {
            return 0.0;
        }
        (self.current_total.load(Ordering::Relaxed).max(0) as f64 / self.max_total as f64).min(1.0)
    }

    /// A member (its snapshot index) drawn by maximum weight.
    #[inline]
    fn draw(&self, random: &mut impl Random) -> Option<usize> {
        let slot = match &self.alias {
            Some(alias) => alias.sample(random.next_u64()),
            None => {
                let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
                turn.checked_rem(self.members.len())?
            }
        };
        self.members.get(slot).copied()
    }

    #[inline]
    fn fully_healthy(&self) -> bool {
        self.max_total > 0 && self.current_total.load(Ordering::Relaxed) >= self.max_total as i64
    }
}

struct Snapshot<K> {
    members: Vec<Member<K>>,
    groups: Vec<Group>,
    by_key: HashMap<K, usize>,
}

impl<K: Eq + Hash> Snapshot<K> {
    fn member(&self, key: &K) -> Option<&Member<K>> {
        self.by_key.get(key).and_then(|&i| self.members.get(i))
    }
}

impl<K> Default for Snapshot<K> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            groups: Vec::new(),
            by_key: HashMap::new(),
        }
    }
}

/// Tries of rejection sampling before a full scan of the level.
const SAMPLE_TRIES: usize = 16;

pub struct Balancer<K> {
    config: BalancerConfig,
    clock: Arc<dyn Clock>,
    snapshot: ArcSwap<Snapshot<K>>,
    /// Bumped after every snapshot swap; threads keep the snapshot of the generation they saw.
    generation: AtomicU64,
    /// Identifies this balancer in the per-thread snapshot caches.
    id: usize,
    updating: Mutex<()>,
}

static NEXT_BALANCER_ID: AtomicUsize = AtomicUsize::new(1);

/// Snapshots a thread has seen, by balancer: (balancer id, generation, snapshot).
type CachedSnapshot = (usize, u64, Arc<dyn std::any::Any + Send + Sync>);

/// Balancers a thread caches a snapshot for at most; the oldest entry makes room.
const CACHED_BALANCERS: usize = 16;

thread_local! {
    // Picks and reports read the snapshot from here while its generation is current: no atomic
    // read-modify-write on the hot path (an arc-swap guard costs two on this machine).
    static SNAPSHOTS: std::cell::RefCell<Vec<CachedSnapshot>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn uniform(random: &mut impl Random) -> f64 {
    (random.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl<K: Clone + Eq + Hash + Send + Sync + 'static> Balancer<K> {
    pub fn new(config: BalancerConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            config,
            clock,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            generation: AtomicU64::new(0),
            id: NEXT_BALANCER_ID.fetch_add(1, Ordering::Relaxed),
            updating: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    /// Applies a new endpoint set. Endpoints that stay keep their state (weight, in-flight,
    /// ejection), rescaled to a new maximum; new ones start at the slow-start share; removed ones go.
    pub fn update(&self, specs: Vec<EndpointSpec<K>>) -> UpdateResult<K> {
        let _one_at_a_time = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.snapshot.load_full();
        let mut result = UpdateResult {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        };
        let mut members = Vec::with_capacity(specs.len());
        let mut by_key = HashMap::with_capacity(specs.len());
        for spec in specs {
            if by_key.contains_key(&spec.key) {
                continue;
            }
            let max = spec.max_weight.max(0.0);
            let min = spec.min_weight.clamp(0.0, max);
            let state = match old.member(&spec.key) {
                Some(existing) => {
                    let state = existing.state.clone();
                    let (old_max, old_min) = (state.max_weight(), state.min_weight());
                    if old_max != max || old_min != min {
                        let share = if old_max > 0.0 {
                            state.current_weight() / old_max
                        } else {
                            1.0
                        };
                        state.max.store(to_units(max), Ordering::Relaxed);
                        state.min.store(to_units(min), Ordering::Relaxed);
                        state.update(|_, min, max| (share * max).clamp(min, max));
                    }
                    if old_max != max
                        || old_min != min
                        || existing.priority != spec.priority
                        || existing.zone != spec.zone
                    {
                        result.changed.push(spec.key.clone());
                    }
                    state
                }
                None => {
                    result.added.push(spec.key.clone());
                    Arc::new(EndpointState::new(
                        max,
                        min,
                        max * self.config.initial_weight_share.clamp(0.0, 1.0),
                    ))
                }
            };
            by_key.insert(spec.key.clone(), members.len());
            members.push(Member {
                key: spec.key,
                zone: spec.zone,
                priority: spec.priority,
                state,
            });
        }
        for member in &old.members {
            if !by_key.contains_key(&member.key) {
                result.removed.push(member.key.clone());
                member.state.group_total.0.store(None);
            }
        }
        let mut levels: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, member) in members.iter().enumerate() {
            levels.entry(member.priority).or_default().push(index);
        }
        let groups = levels
            .into_iter()
            .map(|(priority, indices)| {
                let max_weights: Vec<f64> = indices
                    .iter()
                    .filter_map(|&i| members.get(i))
                    .map(|m| m.state.max_weight())
                    .collect();
                let all_equal = max_weights.windows(2).all(|pair| pair[0] == pair[1]);
                let total = Arc::new(AtomicI64::new(0));
                for &i in &indices {
                    if let Some(member) = members.get(i) {
                        member.state.group_total.0.store(Some(total.clone()));
                    }
                }
                Group {
                    priority,
                    max_total: indices
                        .iter()
                        .filter_map(|&i| members.get(i))
                        .map(|m| m.state.max.load(Ordering::Relaxed))
                        .sum(),
                    current_total: total,
                    alias: if all_equal {
                        None
                    } else {
                        AliasTable::new(&max_weights)
                    },
                    round_robin: AtomicUsize::new(fastrand::usize(..)),
                    members: indices,
                }
            })
            .collect();
        let snapshot = Snapshot {
            members,
            groups,
            by_key,
        };
        resync(&snapshot);
        self.snapshot.store(Arc::new(snapshot));
        self.generation.fetch_add(1, Ordering::Release);
        result
    }

    /// Recomputes each level's total from its endpoints. Totals are kept exact by atomic deltas;
    /// only a report racing a hot update can skew them, which this repairs (call it periodically).
    pub fn resync(&self) {
        resync(&self.snapshot.load());
    }

    /// Runs `work` on the current snapshot, from this thread's cache when it is current. `work`
    /// must not call back into the balancer's pick or report.
    #[inline]
    fn with_snapshot<R>(&self, work: impl FnOnce(&Snapshot<K>) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        SNAPSHOTS.with(|cache| {
            // A failed borrow means re-entry (a key's Clone or Hash calling back in): no cache.
            let mut borrowed = cache.try_borrow_mut().ok();
            let cached = borrowed
                .as_deref_mut()
                .and_then(|cache| self.cached_snapshot(cache, generation));
            let loaded;
            let snapshot = match cached {
                Some(snapshot) => snapshot,
                None => {
                    loaded = self.load_snapshot();
                    &*loaded
                }
            };
            // One call site, so `work` is inlined and its result stays in registers.
            work(snapshot)
        })
    }

    /// This balancer's snapshot of `generation` from a thread's cache, stored there first if the
    /// cache holds an older one or none.
    #[inline]
    fn cached_snapshot<'c>(
        &self,
        cache: &'c mut Vec<CachedSnapshot>,
        generation: u64,
    ) -> Option<&'c Snapshot<K>> {
        let position = cache.iter().position(|(id, _, _)| *id == self.id);
        let at = match position {
            Some(at)
                if cache
                    .get(at)
                    .is_some_and(|(_, seen, _)| *seen == generation) =>
            {
                at
            }
            _ => self.cache_snapshot(cache, position, generation),
        };
        cache
            .get(at)
            .and_then(|(_, _, snapshot)| snapshot.downcast_ref::<Snapshot<K>>())
    }

    /// Out of line, to keep the cached path small enough to inline.
    #[inline(never)]
    fn load_snapshot(&self) -> Arc<Snapshot<K>> {
        self.snapshot.load_full()
    }

    #[inline(never)]
    fn cache_snapshot(
        &self,
        cache: &mut Vec<CachedSnapshot>,
        position: Option<usize>,
        generation: u64,
    ) -> usize {
        // Loaded after reading the generation: at least as new as that generation.
        let snapshot: Arc<dyn std::any::Any + Send + Sync> = self.snapshot.load_full();
        if let Some(at) = position
            && let Some(entry) = cache.get_mut(at)
        {
            *entry = (self.id, generation, snapshot);
            return at;
        }
        if cache.len() >= CACHED_BALANCERS {
            cache.remove(0);
        }
        cache.push((self.id, generation, snapshot));
        cache.len() - 1
    }

    /// A handle for one worker (a thread or a long-lived task) that picks repeatedly: it keeps
    /// the snapshot it last saw and its own random generator, so while the endpoint set is
    /// unchanged a pick or report costs one atomic load of the generation and the balancing work
    /// itself, with no thread-local lookup.
    pub fn picker(&self) -> Picker<'_, K> {
        self.picker_with(fastrand::Rng::new())
    }

    /// A [`picker`](Self::picker) drawing from `random` (a seeded one makes its picks repeatable).
    pub fn picker_with(&self, random: fastrand::Rng) -> Picker<'_, K> {
        let generation = self.generation.load(Ordering::Acquire);
        Picker {
            balancer: self,
            generation,
            // Loaded after reading the generation: at least as new as that generation.
            snapshot: self.snapshot.load_full(),
            random,
        }
    }

    #[inline]
    pub fn pick(&self, random: &mut impl Random) -> Option<Picked<K>> {
        self.pick_excluding(random, &[])
    }

    /// Picks an endpoint not in `exclude` (for retries).
    #[inline]
    pub fn pick_excluding(&self, random: &mut impl Random, exclude: &[K]) -> Option<Picked<K>> {
        self.with_snapshot(|snapshot| self.pick_from(snapshot, random, exclude))
    }

    /// The common case inline (nothing excluded, weighted policy, the best level at full weight:
    /// one draw by maximum weight, no priority arithmetic); everything else out of line.
    #[inline]
    fn pick_from(
        &self,
        snapshot: &Snapshot<K>,
        random: &mut impl Random,
        exclude: &[K],
    ) -> Option<Picked<K>> {
        if exclude.is_empty()
            && self.config.policy == Policy::Weighted
            && let Some(first) = snapshot.groups.first()
            && first.fully_healthy()
            && let Some(index) = first.draw(random)
            && let Some(member) = snapshot.members.get(index)
        {
            return Some(self.hand_out(member, index));
        }
        self.pick_general(snapshot, random, exclude)
    }

    #[inline(never)]
    fn pick_general(
        &self,
        snapshot: &Snapshot<K>,
        random: &mut impl Random,
        exclude: &[K],
    ) -> Option<Picked<K>> {
        let groups = &snapshot.groups;
        let first = groups.first()?;
        // The best level at full weight takes all traffic; no priority arithmetic.
        if exclude.is_empty()
            && first.fully_healthy()
            && let Some((index, member)) = self.pick_in(snapshot, first, false, random, exclude)
        {
            return Some(self.hand_out(member, index));
        }
        let factor = self.config.overprovisioning_factor;
        let health = groups.iter().map(Group::health);
        let normalized = priority::normalized_total(health.clone(), factor);
        let all_down = normalized <= 0.0;
        if all_down && self.config.fail_when_all_down {
            return None;
        }
        // Choose the level by its load (by maximum weight when everything is down).
        let mut chosen = 0;
        let r = uniform(random);
        if all_down {
            let total: u64 = groups.iter().map(|g| g.max_total).sum();
            let mut acc = 0.0;
            for (index, group) in groups.iter().enumerate() {
                acc += group.max_total as f64 / total.max(1) as f64;
                chosen = index;
                if r < acc {
                    break;
                }
            }
        } else {
            let mut acc = 0.0;
            let mut found = false;
            priority::for_each_load(health, factor, |load| {
                if !found {
                    acc += load;
                    if r < acc {
                        found = true;
                    } else {
                        chosen += 1;
                    }
                }
            });
            chosen = chosen.min(groups.len() - 1);
        }
        // The chosen level first, then the others in order if it has nothing to give.
        let order = std::iter::once(chosen).chain((0..groups.len()).filter(|i| *i != chosen));
        for index in order {
            let Some(group) = groups.get(index) else {
                continue;
            };
            let panic =
                all_down || (normalized < 1.0 && group.health() < self.config.panic_threshold);
            if let Some((index, member)) = self.pick_in(snapshot, group, panic, random, exclude) {
                return Some(self.hand_out(member, index));
            }
        }
        None
    }

    #[inline]
    fn counts_in_flight(&self) -> bool {
        self.config.track_in_flight || matches!(self.config.policy, Policy::LeastRequest { .. })
    }

    #[inline]
    fn hand_out(&self, member: &Member<K>, index: usize) -> Picked<K> {
        let counted = self.counts_in_flight();
        if counted {
            member.state.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        Picked {
            key: member.key.clone(),
            ticket: Ticket::new(index, member.priority, counted),
        }
    }

    fn pick_in<'a>(
        &self,
        snapshot: &'a Snapshot<K>,
        group: &Group,
        panic: bool,
        random: &mut impl Random,
        exclude: &[K],
    ) -> Option<(usize, &'a Member<K>)> {
        let first = self.candidate(snapshot, group, panic, random, exclude)?;
        match self.config.policy {
            Policy::Weighted => Some(first),
            Policy::LeastRequest { bias } => {
                let second = self
                    .candidate(snapshot, group, panic, random, exclude)
                    .unwrap_or(first);
                let score = |(_, member): (usize, &Member<K>)| {
                    let weight = if panic {
                        member.state.max_weight()
                    } else {
                        member.state.current_weight()
                    };
                    weight / (1.0 + f64::from(member.state.in_flight())).powf(bias)
                };
                Some(if score(second) > score(first) {
                    second
                } else {
                    first
                })
            }
        }
    }

    /// One endpoint (and its index) drawn proportionally to current weight (maximum weight in
    /// panic).
    fn candidate<'a>(
        &self,
        snapshot: &'a Snapshot<K>,
        group: &Group,
        panic: bool,
        random: &mut impl Random,
        exclude: &[K],
    ) -> Option<(usize, &'a Member<K>)> {
        let count = group.members.len();
        if count == 0 {
            return None;
        }
        // Fast path: everyone at full weight, nothing excluded: draw by maximum weight directly.
        let accept_all = exclude.is_empty() && group.fully_healthy();
        let mut now = None;
        for _ in 0..SAMPLE_TRIES {
            let Some((index, member)) = group
                .draw(random)
                .and_then(|i| snapshot.members.get(i).map(|member| (i, member)))
            else {
                continue;
            };
            if accept_all {
                return Some((index, member));
            }
            if exclude.contains(&member.key) {
                continue;
            }
            let now = *now.get_or_insert_with(|| self.clock.now_nanos());
            if !self.eligible(member, now) && !panic {
                continue;
            }
            let state = &member.state;
            let max = state.max.load(Ordering::Relaxed);
            let current = if panic {
                max
            } else {
                state.current.load(Ordering::Relaxed)
            };
            if current >= max
                || (max > 0 && ((random.next_u64() as u128 * max as u128) >> 64) < current as u128)
            {
                return Some((index, member));
            }
        }
        // Unlucky or mostly excluded: scan the level once.
        let now = now.unwrap_or_else(|| self.clock.now_nanos());
        let weights: Vec<(usize, u64)> = group
            .members
            .iter()
            .filter_map(|&i| snapshot.members.get(i).map(|m| (i, m)))
            .filter(|(_, m)| !exclude.contains(&m.key) && (panic || self.eligible(m, now)))
            .map(|(i, m)| {
                let weight = if panic {
                    m.state.max.load(Ordering::Relaxed)
                } else {
                    m.state.current.load(Ordering::Relaxed)
                };
                (i, weight)
            })
            .filter(|(_, weight)| *weight > 0)
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| *w).sum();
        if total == 0 {
            return None;
        }
        let mut point = ((random.next_u64() as u128 * total as u128) >> 64) as u64;
        for (index, weight) in weights {
            if point < weight {
                return snapshot.members.get(index).map(|member| (index, member));
            }
            point -= weight;
        }
        None
    }

    /// Not ejected (an expired ejection ends here, returning the endpoint at the recovery step).
    fn eligible(&self, member: &Member<K>, now: u64) -> bool {
        let state = &member.state;
        let until = state.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        if state
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            state.ejection_ended.store(until, Ordering::Relaxed);
            let rules = &self.config.rules;
            state.update(|current, min, max| rules.after_recovery(current, min, max));
        }
        true
    }

    /// Reports how a picked endpoint did and releases its in-flight slot. A report for an endpoint
    /// no longer in the balancer is ignored.
    #[inline]
    pub fn report(&self, picked: Picked<K>, outcome: Outcome) {
        let failing = self.with_snapshot(|snapshot| self.report_on(snapshot, &picked, outcome));
        if let Some(state) = failing {
            self.report_failure(&picked.key, &state, outcome);
        }
    }

    /// Hands back a pick that was not used: its in-flight slot is released, its weight is left
    /// as it was.
    pub fn release(&self, picked: Picked<K>) {
        self.with_snapshot(|snapshot| {
            if let Some(member) = picked
                .ticket
                .index()
                .and_then(|index| snapshot.members.get(index))
                .filter(|member| member.key == picked.key)
                .or_else(|| snapshot.member(&picked.key))
                && picked.ticket.counted()
            {
                member.state.release();
            }
        });
    }

    /// Records how a request the balancer did not pick went (one sent to the endpoint a client
    /// named, such as an ack for the broker that served a pop): the weight moves as for a report,
    /// with no in-flight slot to release. Such failures do not count towards ejection: clients
    /// keep naming a dead broker until they learn otherwise, and the ejection multiplier would
    /// otherwise keep a restarted broker out for minutes; health checks bring it back instead.
    /// Unknown keys are ignored.
    pub fn observe(&self, key: &K, outcome: Outcome) {
        self.with_snapshot(|snapshot| {
            let Some(member) = snapshot.member(key) else {
                return;
            };
            let state = &member.state;
            match outcome {
                Outcome::Success => self.success_on(state),
                Outcome::Failure | Outcome::Down => self.lower_weight(state, outcome),
            }
        });
    }

    /// The report's work on one snapshot. Successes (the hot path) finish here; a failure hands
    /// the endpoint's state back, since ejection needs the snapshot again.
    #[inline]
    fn report_on(
        &self,
        snapshot: &Snapshot<K>,
        picked: &Picked<K>,
        outcome: Outcome,
    ) -> Option<Arc<EndpointState>> {
        let member = picked
            .ticket
            .index()
            .and_then(|index| snapshot.members.get(index))
            .filter(|member| member.key == picked.key)
            .or_else(|| snapshot.member(&picked.key))?;
        let state = &member.state;
        if picked.ticket.counted() {
            state.release();
        }
        if outcome != Outcome::Success {
            return Some(state.clone());
        }
        self.success_on(state);
        None
    }

    #[inline]
    fn success_on(&self, state: &EndpointState) {
        // The common case, a healthy endpoint doing well, only reads.
        if state.consecutive_failures.load(Ordering::Relaxed) != 0
            || state.current.load(Ordering::Relaxed) < state.max.load(Ordering::Relaxed)
            || state.ejections() != 0
        {
            self.recover_on_success(state);
        }
    }

    #[inline(never)]
    fn recover_on_success(&self, state: &EndpointState) {
        if state.consecutive_failures.load(Ordering::Relaxed) != 0 {
            state.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if state.current.load(Ordering::Relaxed) < state.max.load(Ordering::Relaxed) {
            let rules = &self.config.rules;
            state.update(|c, min, max| rules.after_success(c, min, max));
        }
        self.forgive_ejection(state);
    }

    /// A failure halves the weight (to the minimum below 1% of max); `Down` drops it to the
    /// minimum at once.
    fn lower_weight(&self, state: &EndpointState, outcome: Outcome) {
        if outcome == Outcome::Down {
            state.update(|_, min, _| min);
        } else {
            let rules = &self.config.rules;
            state.update(|c, min, max| rules.after_failure(c, min, max));
        }
    }

    fn report_failure(&self, key: &K, state: &EndpointState, outcome: Outcome) {
        self.lower_weight(state, outcome);
        if outcome == Outcome::Down {
            return;
        }
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = self.config.outlier.consecutive_failures;
        if threshold > 0 && failures >= threshold {
            self.try_eject(key);
        }
    }

    /// Like Envoy's decaying multiplier: each base ejection time an endpoint stays in service
    /// after an ejection forgives one ejection, so the next one is shorter again.
    fn forgive_ejection(&self, state: &EndpointState) {
        if state.ejections() == 0 {
            return;
        }
        let ended = state.ejection_ended.load(Ordering::Relaxed);
        let now = self.clock.now_nanos();
        let period = self.config.outlier.base_ejection.as_nanos() as u64;
        if ended != 0
            && now >= ended.saturating_add(period)
            && state
                .ejection_ended
                .compare_exchange(ended, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let _ = state
                .ejections
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Ejects `key` unless its level already has its share ejected.
    fn try_eject(&self, key: &K) {
        let snapshot = self.snapshot.load();
        let Some(member) = snapshot.member(key) else {
            return;
        };
        let now = self.clock.now_nanos();
        if member.state.ejected_at(now) {
            return;
        }
        let Some(group) = snapshot
            .groups
            .iter()
            .find(|g| g.priority == member.priority)
        else {
            return;
        };
        let ejected = group
            .members
            .iter()
            .filter_map(|&i| snapshot.members.get(i))
            .filter(|m| m.state.ejected_at(now))
            .count();
        let allowed =
            ((group.members.len() as f64 * self.config.outlier.max_ejection_share).floor()
                as usize)
                .max(1);
        if ejected >= allowed {
            return;
        }
        let state = &member.state;
        let times = state
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let duration = self
            .config
            .outlier
            .base_ejection
            .saturating_mul(times)
            .min(self.config.outlier.max_ejection);
        state.ejected_until.store(
            now.saturating_add(duration.as_nanos() as u64),
            Ordering::Relaxed,
        );
        state.consecutive_failures.store(0, Ordering::Relaxed);
        state.update(|_, min, _| min);
    }

    /// Endpoints a health checker should probe: at their minimum weight and not ejected.
    pub fn check_candidates(&self) -> Vec<K> {
        let snapshot = self.snapshot.load();
        let now = self.clock.now_nanos();
        snapshot
            .members
            .iter()
            .filter(|m| m.state.is_down() && m.state.max.load(Ordering::Relaxed) > 0)
            .filter(|m| !m.state.ejected_at(now))
            .map(|m| m.key.clone())
            .collect()
    }

    /// Records a health check: passes at the minimum recover the weight step by step.
    pub fn check_result(&self, key: &K, passed: bool) {
        let snapshot = self.snapshot.load();
        let Some(member) = snapshot.member(key) else {
            return;
        };
        let state = &member.state;
        if !passed {
            state.consecutive_passes.store(0, Ordering::Relaxed);
            return;
        }
        let passes = state.consecutive_passes.fetch_add(1, Ordering::Relaxed) + 1;
        let rules = &self.config.rules;
        if passes >= rules.recover_after_passes.max(1) && state.is_down() {
            state.consecutive_passes.store(0, Ordering::Relaxed);
            state.update(|c, min, max| rules.after_recovery(c, min, max));
        }
    }

    /// Every endpoint's state, by priority then configuration order.
    pub fn endpoints(&self) -> Vec<EndpointView<K>> {
        let snapshot = self.snapshot.load();
        let now = self.clock.now_nanos();
        snapshot
            .groups
            .iter()
            .flat_map(|group| group.members.iter())
            .filter_map(|&i| snapshot.members.get(i))
            .map(|m| EndpointView {
                key: m.key.clone(),
                priority: m.priority,
                zone: m.zone.clone(),
                max_weight: m.state.max_weight(),
                min_weight: m.state.min_weight(),
                current_weight: m.state.current_weight(),
                in_flight: m.state.in_flight(),
                ejected: m.state.ejected_at(now),
                ejections: m.state.ejections(),
            })
            .collect()
    }

    /// (priority, health, traffic share) of each level.
    pub fn priority_loads(&self) -> Vec<(u32, f64, f64)> {
        let snapshot = self.snapshot.load();
        let health: Vec<f64> = snapshot.groups.iter().map(Group::health).collect();
        let loads = priority::loads(&health, self.config.overprovisioning_factor);
        snapshot
            .groups
            .iter()
            .zip(health)
            .zip(loads)
            .map(|((group, health), load)| (group.priority, health, load))
            .collect()
    }
}

/// A worker's own view of a [`Balancer`]; see [`Balancer::picker`]. Picks from it may be reported
/// to the balancer or to any picker of it.
pub struct Picker<'a, K> {
    balancer: &'a Balancer<K>,
    generation: u64,
    snapshot: Arc<Snapshot<K>>,
    random: fastrand::Rng,
}

impl<K: Clone + Eq + Hash + Send + Sync + 'static> Picker<'_, K> {
    /// The current snapshot, reloaded only when an update has happened since the last call.
    #[inline]
    fn refresh(&mut self) {
        let generation = self.balancer.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.snapshot = self.balancer.snapshot.load_full();
            self.generation = generation;
        }
    }

    #[inline]
    pub fn pick(&mut self) -> Option<Picked<K>> {
        self.pick_excluding(&[])
    }

    /// Picks an endpoint not in `exclude` (for retries).
    #[inline]
    pub fn pick_excluding(&mut self, exclude: &[K]) -> Option<Picked<K>> {
        self.refresh();
        self.balancer
            .pick_from(&self.snapshot, &mut self.random, exclude)
    }

    /// Same as [`Balancer::report`].
    #[inline]
    pub fn report(&mut self, picked: Picked<K>, outcome: Outcome) {
        self.refresh();
        if let Some(state) = self.balancer.report_on(&self.snapshot, &picked, outcome) {
            self.balancer.report_failure(&picked.key, &state, outcome);
        }
    }
}

fn resync<K>(snapshot: &Snapshot<K>) {
    for group in &snapshot.groups {
        let sum: u64 = group
            .members
            .iter()
            .filter_map(|&i| snapshot.members.get(i))
            .map(|m| m.state.current.load(Ordering::Relaxed))
            .sum();
        group.current_total.store(sum as i64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
