//! The sidecar's counters, gauges and latency histograms: updated on the request path with atomics,
//! read by the admin endpoint. Nothing here blocks or allocates per request once a key exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tracing::warn;

use super::striped::Striped;

/// The topic (and group) label of everything counted past a family's series limit.
pub const OTHER_LABEL: &str = "_other";

/// Upper bounds (ms) of the latency buckets: the RocketMQ client's `send_cost_time` bounds plus
/// 800 ms (a common "slow send" rule) and 5 s.
pub const LATENCY_BOUNDS_MS: [u64; 9] = [1, 5, 10, 20, 50, 200, 500, 800, 5000];

/// A fixed-bucket latency histogram, kept per serving thread.
#[derive(Default)]
pub struct Histogram {
    cells: Striped<HistogramCells>,
}

#[derive(Default)]
struct HistogramCells {
    /// One count per bound, plus the overflow bucket.
    buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// A point-in-time copy of a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts at each bound of [`LATENCY_BOUNDS_MS`].
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_ms: f64,
}

impl HistogramSnapshot {
    /// The smallest bucket bound at or above quantile `q` (an upper estimate), in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil() as u64;
        LATENCY_BOUNDS_MS
            .iter()
            .zip(&self.cumulative)
            .find(|(_, cumulative)| **cumulative >= rank)
            .map(|(bound, _)| *bound)
            .or(Some(u64::MAX))
    }
}

impl Histogram {
    pub fn record(&self, elapsed: Duration) {
        let nanos = elapsed.as_nanos();
        let index = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| nanos <= u128::from(*bound) * 1_000_000)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        let stripe = self.cells.local();
        let cells = stripe.value;
        if let Some(bucket) = cells.buckets.get(index) {
            stripe.add(bucket, 1);
        }
        stripe.add(&cells.sum_micros, elapsed.as_micros() as u64);
        stripe.add(&cells.count, 1);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0u64; LATENCY_BOUNDS_MS.len()];
        let (mut count, mut sum_micros) = (0, 0);
        for cells in self.cells.all() {
            for (total, bucket) in buckets.iter_mut().zip(&cells.buckets) {
                *total += bucket.load(Ordering::Relaxed);
            }
            count += cells.count.load(Ordering::Relaxed);
            sum_micros += cells.sum_micros.load(Ordering::Relaxed);
        }
        let mut running = 0;
        let cumulative = buckets
            .iter()
            .map(|bucket| {
                running += bucket;
                running
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count,
            sum_ms: sum_micros as f64 / 1000.0,
        }
    }
}

/// Traffic to one upstream endpoint.
pub struct HostStats {
    pub cluster: String,
    pub broker_name: String,
    pub address: SocketAddr,
    /// Requests and errors.
    counts: Striped<[AtomicU64; 2]>,
    latency: Histogram,
}

impl HostStats {
    pub fn new(cluster: &str, broker_name: &str, address: SocketAddr) -> Self {
        Self {
            cluster: cluster.to_owned(),
            broker_name: broker_name.to_owned(),
            address,
            counts: Striped::default(),
            latency: Histogram::default(),
        }
    }

    pub fn record(&self, elapsed: Duration, ok: bool) {
        let stripe = self.counts.local();
        let [requests, errors] = stripe.value;
        stripe.add(requests, 1);
        if !ok {
            stripe.add(errors, 1);
        }
        self.latency.record(elapsed);
    }

    pub fn requests(&self) -> u64 {
        self.counts
            .all()
            .map(|[requests, _]| requests.load(Ordering::Relaxed))
            .sum()
    }

    pub fn errors(&self) -> u64 {
        self.counts
            .all()
            .map(|[_, errors]| errors.load(Ordering::Relaxed))
            .sum()
    }

    pub fn latency(&self) -> HistogramSnapshot {
        self.latency.snapshot()
    }
}

/// How many label sets a metric family may hold; the ones past it share [`OTHER_LABEL`].
struct SeriesLimit {
    family: &'static str,
    max: usize,
    series: AtomicUsize,
    warned: AtomicBool,
}

impl SeriesLimit {
    fn new(family: &'static str, max: usize) -> Self {
        Self {
            family,
            max,
            series: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// Whether a new series fits (the caller then adds it); logs the first refusal.
    fn has_room(&self) -> bool {
        if self.series.load(Ordering::Relaxed) < self.max {
            return true;
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                family = self.family,
                limit = self.max,
                "topic series limit reached; further topics are counted as {OTHER_LABEL:?} (limits.max_topic_series)"
            );
        }
        false
    }

    fn added(&self) {
        self.series.fetch_add(1, Ordering::Relaxed);
    }

    fn removed(&self, count: usize) {
        self.series.fetch_sub(count, Ordering::Relaxed);
    }
}

/// Whether a table that shrank to `len` entries holds much more room than it needs.
pub(crate) fn is_sparse(len: usize, capacity: usize) -> bool {
    capacity > 64 && capacity > len.saturating_mul(4)
}

/// Values by topic with a capped number of topics. Lookups of known topics borrow the name;
/// only a new topic allocates. Values are shared, so a connection can keep the one of a topic it
/// sends to and skip the lookup while [`ByTopic::generation`] stays the same.
struct ByTopic<V> {
    map: DashMap<String, Arc<V>, foldhash::fast::RandomState>,
    limit: SeriesLimit,
    /// Moves whenever a topic is forgotten: a kept value may then count for nobody.
    generation: AtomicU64,
}

impl<V: Default> ByTopic<V> {
    fn new(family: &'static str, max: usize) -> Self {
        Self {
            map: DashMap::default(),
            limit: SeriesLimit::new(family, max),
            generation: AtomicU64::new(0),
        }
    }

    fn get(&self, topic: &str) -> Arc<V> {
        if let Some(value) = self.map.get(topic) {
            return value.clone();
        }
        let topic = if self.limit.has_room() {
            topic
        } else {
            OTHER_LABEL
        };
        self.map
            .entry(topic.to_owned())
            .or_insert_with(|| {
                self.limit.added();
                Arc::default()
            })
            .clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn forget(&self, topic: &str) {
        if self.map.remove(topic).is_some() {
            self.limit.removed(1);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    fn shrink(&self) {
        if is_sparse(self.map.len(), self.map.capacity()) {
            self.map.shrink_to_fit();
        }
    }

    fn read<R>(&self, value: impl Fn(&V) -> R) -> Vec<(String, R)> {
        let mut values: Vec<(String, R)> = self
            .map
            .iter()
            .map(|entry| (entry.key().clone(), value(entry.value())))
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    }
}

/// Counters by (topic, group) with a capped number of pairs; past the cap both labels are
/// [`OTHER_LABEL`].
struct ByTopicAndGroup {
    topics: DashMap<String, DashMap<String, AtomicU64>>,
    limit: SeriesLimit,
}

impl ByTopicAndGroup {
    fn new(family: &'static str, max: usize) -> Self {
        Self {
            topics: DashMap::new(),
            limit: SeriesLimit::new(family, max),
        }
    }

    fn add(&self, topic: &str, group: &str, by: u64) {
        if let Some(groups) = self.topics.get(topic)
            && let Some(counter) = groups.get(group)
        {
            counter.fetch_add(by, Ordering::Relaxed);
            return;
        }
        let (topic, group) = if self.limit.has_room() {
            (topic, group)
        } else {
            (OTHER_LABEL, OTHER_LABEL)
        };
        let groups = self.topics.entry(topic.to_owned()).or_default().downgrade();
        groups
            .entry(group.to_owned())
            .or_insert_with(|| {
                self.limit.added();
                AtomicU64::new(0)
            })
            .fetch_add(by, Ordering::Relaxed);
    }

    fn forget(&self, topic: &str) {
        if let Some((_, groups)) = self.topics.remove(topic) {
            self.limit.removed(groups.len());
        }
    }

    fn shrink(&self) {
        if is_sparse(self.topics.len(), self.topics.capacity()) {
            self.topics.shrink_to_fit();
        }
    }

    fn read(&self) -> Vec<((String, String), u64)> {
        let mut values: Vec<((String, String), u64)> = self
            .topics
            .iter()
            .flat_map(|topic| {
                topic
                    .value()
                    .iter()
                    .map(|group| {
                        (
                            (topic.key().clone(), group.key().clone()),
                            group.value().load(Ordering::Relaxed),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    }
}

/// `rocketmq_messages_in_total` and `rocketmq_send_cost_time` of one topic.
#[derive(Default)]
pub struct TopicSends {
    messages: Striped<AtomicU64>,
    cost: Histogram,
}

impl TopicSends {
    /// A send of `count` messages was stored, `elapsed` after it arrived.
    pub fn record(&self, count: u64, elapsed: Duration) {
        let stripe = self.messages.local();
        stripe.add(stripe.value, count);
        self.cost.record(elapsed);
    }

    fn messages(&self) -> u64 {
        self.messages
            .all()
            .map(|messages| messages.load(Ordering::Relaxed))
            .sum()
    }
}

/// A topic's send counters as a connection keeps them: valid while the stats' topic generation is
/// still `generation` (see [`ProxyStats::topic_sends`]).
pub struct KeptTopicSends {
    pub sends: Arc<TopicSends>,
    pub generation: u64,
}

/// Everything the sidecar counts.
pub struct ProxyStats {
    requests: ByCode,
    responses: ByCode,
    decode_errors: AtomicU64,
    connections_total: AtomicU64,
    connections_active: AtomicI64,
    /// Signed, as two's complement (see [`Stripe::add`](super::striped::Stripe::add)).
    requests_active: Striped<AtomicU64>,
    requests_pending: AtomicI64,
    /// `rocketmq_messages_in_total` and `rocketmq_send_cost_time`: one lookup per send.
    sends: ByTopic<TopicSends>,
    messages_out: ByTopicAndGroup,
    hosts: DashMap<SocketAddr, Arc<HostStats>, foldhash::fast::RandomState>,
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self::new(crate::proxy::config::Limits::default().max_topic_series)
    }
}

/// Counters by request or response code: the common codes (below [`DIRECT_CODES`]) in a plain
/// array of atomics, so the hot path takes no lock; the rest (the POP family's 200000s, unknown
/// codes) in a map.
struct ByCode {
    direct: Striped<Box<[AtomicU64]>>,
    others: DashMap<i32, AtomicU64>,
}

const DIRECT_CODES: usize = 512;

impl Default for ByCode {
    fn default() -> Self {
        Self {
            direct: Striped::from_fn(|| (0..DIRECT_CODES).map(|_| AtomicU64::new(0)).collect()),
            others: DashMap::new(),
        }
    }
}

impl ByCode {
    fn bump(&self, code: i32) {
        let stripe = self.direct.local();
        match usize::try_from(code)
            .ok()
            .and_then(|index| stripe.value.get(index))
        {
            Some(counter) => stripe.add(counter, 1),
            None => bump(&self.others, code, 1),
        }
    }

    fn read(&self) -> Vec<(i32, u64)> {
        let mut totals = vec![0u64; DIRECT_CODES];
        for stripe in self.direct.all() {
            for (total, counter) in totals.iter_mut().zip(stripe.iter()) {
                *total += counter.load(Ordering::Relaxed);
            }
        }
        let mut values: Vec<(i32, u64)> = totals
            .into_iter()
            .enumerate()
            .filter(|&(_, count)| count > 0)
            .map(|(code, count)| (i32::try_from(code).unwrap_or(i32::MAX), count))
            .collect();
        values.extend(read(&self.others));
        values.sort_unstable();
        values
    }
}

fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K, by: u64) {
    if let Some(counter) = map.get(&key) {
        counter.fetch_add(by, Ordering::Relaxed);
        return;
    }
    map.entry(key).or_default().fetch_add(by, Ordering::Relaxed);
}

fn read<K: Clone + Ord + std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>) -> Vec<(K, u64)> {
    let mut values: Vec<(K, u64)> = map
        .iter()
        .map(|entry| (entry.key().clone(), entry.value().load(Ordering::Relaxed)))
        .collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    values
}

/// Counts a gauge up for as long as it lives.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request counted active until dropped. Each end counts on the thread it happens on, so that
/// a serving thread's stripe is written by that thread alone.
pub struct ActiveRequest<'a>(&'a ProxyStats);

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

fn raise(gauge: &AtomicI64) -> GaugeGuard<'_> {
    gauge.fetch_add(1, Ordering::Relaxed);
    GaugeGuard(gauge)
}

impl ProxyStats {
    /// Counts at most `max_topic_series` topics (or topic and group pairs) per family.
    pub fn new(max_topic_series: usize) -> Self {
        Self {
            requests: ByCode::default(),
            responses: ByCode::default(),
            decode_errors: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_active: AtomicI64::new(0),
            requests_active: Striped::default(),
            requests_pending: AtomicI64::new(0),
            sends: ByTopic::new(
                "rocketmq_messages_in_total and rocketmq_send_cost_time",
                max_topic_series,
            ),
            messages_out: ByTopicAndGroup::new("rocketmq_messages_out_total", max_topic_series),
            hosts: DashMap::default(),
        }
    }

    pub fn request(&self, code: i32) {
        self.requests.bump(code);
    }

    pub fn response(&self, code: i32) {
        self.responses.bump(code);
    }

    pub fn decode_error(&self) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection(&self) -> GaugeGuard<'_> {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        raise(&self.connections_active)
    }

    pub fn active_request(&self) -> ActiveRequest<'_> {
        self.request_began();
        ActiveRequest(self)
    }

    /// As [`ProxyStats::active_request`], for a request whose end is not a scope: each call is
    /// matched by one [`ProxyStats::request_ended`].
    pub fn request_began(&self) {
        let stripe = self.requests_active.local();
        stripe.add(stripe.value, 1);
    }

    pub fn request_ended(&self) {
        let stripe = self.requests_active.local();
        stripe.add(stripe.value, -1i64 as u64);
    }

    /// A request waiting for a route or an upstream slot.
    pub fn pending_request(&self) -> GaugeGuard<'_> {
        raise(&self.requests_pending)
    }

    /// Hands back table space left by forgotten topics (hash tables keep their peak size).
    pub fn shrink(&self) {
        self.sends.shrink();
        self.messages_out.shrink();
    }

    /// Drops a topic's series (its route was given up): stats follow the topics in use.
    pub fn forget_topic(&self, topic: &str) {
        self.sends.forget(topic);
        self.messages_out.forget(topic);
    }

    /// A send of `count` messages to `topic` was stored, `elapsed` after it arrived.
    pub fn messages_sent(&self, topic: &str, count: u64, elapsed: Duration) {
        self.sends.get(topic).record(count, elapsed);
    }

    /// `topic`'s send counters, to record into without a lookup while
    /// [`ProxyStats::topic_sends_generation`] still equals the one they came with.
    pub fn topic_sends(&self, topic: &str) -> KeptTopicSends {
        // Read first: a topic forgotten after this read moves the generation past it.
        let generation = self.sends.generation();
        KeptTopicSends {
            sends: self.sends.get(topic),
            generation,
        }
    }

    pub fn topic_sends_generation(&self) -> u64 {
        self.sends.generation()
    }

    pub fn messages_out(&self, topic: &str, group: &str, count: u64) {
        self.messages_out.add(topic, group, count);
    }

    /// The stats of one endpoint, created on first use.
    pub fn host(&self, cluster: &str, broker_name: &str, address: SocketAddr) -> Arc<HostStats> {
        self.hosts
            .entry(address)
            .or_insert_with(|| Arc::new(HostStats::new(cluster, broker_name, address)))
            .clone()
    }

    pub fn requests_by_code(&self) -> Vec<(i32, u64)> {
        self.requests.read()
    }

    pub fn responses_by_code(&self) -> Vec<(i32, u64)> {
        self.responses.read()
    }

    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }

    pub fn connections_total(&self) -> u64 {
        self.connections_total.load(Ordering::Relaxed)
    }

    pub fn connections_active(&self) -> i64 {
        self.connections_active.load(Ordering::Relaxed)
    }

    pub fn requests_active(&self) -> i64 {
        self.requests_active.all().fold(0u64, |sum, active| {
            sum.wrapping_add(active.load(Ordering::Relaxed))
        }) as i64
    }

    pub fn requests_pending(&self) -> i64 {
        self.requests_pending.load(Ordering::Relaxed)
    }

    pub fn messages_in_by_topic(&self) -> Vec<(String, u64)> {
        self.sends.read(TopicSends::messages)
    }

    pub fn messages_out_by_topic_group(&self) -> Vec<((String, String), u64)> {
        self.messages_out.read()
    }

    pub fn send_cost_by_topic(&self) -> Vec<(String, HistogramSnapshot)> {
        self.sends.read(|sends| sends.cost.snapshot())
    }

    pub fn hosts(&self) -> Vec<Arc<HostStats>> {
        let mut hosts: Vec<_> = self
            .hosts
            .iter()
            .map(|entry| entry.value().clone())
            .collect();
        hosts.sort_by_key(|host| host.address);
        hosts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_are_upper_bounds() {
        let histogram = Histogram::default();
        for millis in [0.5, 3.0, 3.0, 700.0, 9000.0] {
            histogram.record(Duration::from_secs_f64(millis / 1000.0));
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 5);
        assert_eq!(snapshot.cumulative, vec![1, 3, 3, 3, 3, 3, 3, 4, 4]);
        assert_eq!(snapshot.quantile_ms(0.5), Some(5));
        assert_eq!(snapshot.quantile_ms(0.8), Some(800));
        assert_eq!(snapshot.quantile_ms(1.0), Some(u64::MAX));
        assert!((snapshot.sum_ms - 9706.5).abs() < 0.01);
    }

    #[test]
    fn gauges_fall_when_guards_drop() {
        let stats = ProxyStats::default();
        {
            let _one = stats.active_request();
            let _two = stats.active_request();
            assert_eq!(stats.requests_active(), 2);
        }
        assert_eq!(stats.requests_active(), 0);
        stats.request(310);
        stats.request(310);
        stats.request(10);
        assert_eq!(stats.requests_by_code(), vec![(10, 1), (310, 2)]);
    }

    #[test]
    fn topics_past_the_series_limit_count_as_other() {
        let stats = ProxyStats::new(2);
        for topic in ["a", "b", "c", "d", "a"] {
            stats.messages_sent(topic, 1, Duration::from_millis(1));
            stats.messages_out(topic, "g", 2);
        }
        stats.messages_out("a", "h", 2);
        assert_eq!(
            stats.messages_in_by_topic(),
            vec![
                ("_other".to_owned(), 2),
                ("a".to_owned(), 2),
                ("b".to_owned(), 1)
            ]
        );
        let costs: Vec<(String, u64)> = stats
            .send_cost_by_topic()
            .into_iter()
            .map(|(topic, snapshot)| (topic, snapshot.count))
            .collect();
        assert_eq!(
            costs,
            vec![
                ("_other".to_owned(), 2),
                ("a".to_owned(), 2),
                ("b".to_owned(), 1)
            ]
        );
        let pair = |topic: &str, group: &str| (topic.to_owned(), group.to_owned());
        assert_eq!(
            stats.messages_out_by_topic_group(),
            vec![
                (pair("_other", "_other"), 6),
                (pair("a", "g"), 4),
                (pair("b", "g"), 2),
            ]
        );
    }
}
