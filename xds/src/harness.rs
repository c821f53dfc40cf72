//! Test-harness state: what every stream subscribed to, ACKed and NACKed, a bounded event log
//! per stream, fault injection and metrics. Shared by the server (writer) and the admin API.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::protocol::{Ack, TypeSummary};
use crate::types::type_url_from_alias;

/// Events kept per stream (oldest dropped first).
const DEFAULT_LOG_CAPACITY: usize = 512;
/// Closed streams kept for inspection (oldest forgotten first).
const CLOSED_STREAMS_KEPT: usize = 256;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One entry of a stream's log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Request {
        at_ms: u64,
        type_url: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        subscribe: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        unsubscribe: Vec<String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        initial_versions: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        nonce: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        ack: Option<Ack>,
    },
    Response {
        at_ms: u64,
        type_url: String,
        nonce: String,
        /// Name → version sent.
        resources: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        removed: Vec<String>,
        /// Dropped by a fault: logged, never sent.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        dropped: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        delayed_ms: Option<u64>,
    },
    Closed {
        at_ms: u64,
        reason: String,
    },
}

/// A fault, applied to a type or to one resource of it. Effects combine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Type URL or alias (`clusters`, `endpoints`, `topics`).
    #[serde(rename = "type")]
    pub type_url: String,
    /// One resource; all of the type when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hold responses this long before sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Log responses as dropped and do not send them.
    #[serde(default)]
    pub drop: bool,
    /// Never answer for these names (the client's timeout path).
    #[serde(default)]
    pub silence: bool,
    /// Replace the resource by one the client rejects.
    #[serde(default)]
    pub invalid: bool,
}

impl Fault {
    fn normalized(mut self) -> Self {
        self.type_url = type_url_from_alias(&self.type_url).to_owned();
        self
    }

    fn matches(&self, type_url: &str, name: &str) -> bool {
        self.type_url == type_url && self.name.as_deref().is_none_or(|n| n == name)
    }
}

/// What the faults do to one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFault {
    pub delay: Option<Duration>,
    pub drop: bool,
}

/// Counters readable from the harness.
#[derive(Debug, Default)]
struct Metrics {
    requests: AtomicU64,
    responses: AtomicU64,
    dropped: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    pushes: AtomicU64,
    push_latency_us_total: AtomicU64,
    push_latency_us_max: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub requests: u64,
    pub responses: u64,
    pub dropped: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Responses caused by a store change rather than by a request.
    pub pushes: u64,
    /// Store change to response queued, summed over pushes.
    pub push_latency_us_total: u64,
    pub push_latency_us_max: u64,
}

/// A stream as the harness shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamInfo {
    pub id: u64,
    /// Node id from the first request that carried one (empty until then).
    pub node: String,
    pub opened_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_ms: Option<u64>,
    /// Type URL → subscriptions, ACKed versions, un-ACKed nonces, last NACK.
    pub types: BTreeMap<String, TypeSummary>,
}

#[derive(Debug)]
struct StreamRecord {
    info: StreamInfo,
    log: VecDeque<Event>,
    close: Option<oneshot::Sender<String>>,
}

/// The harness state. One per control plane, shared by `Arc`.
#[derive(Debug)]
pub struct Harness {
    streams: Mutex<BTreeMap<u64, StreamRecord>>,
    faults: RwLock<Vec<Fault>>,
    metrics: Metrics,
    next_id: AtomicU64,
    log_capacity: usize,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new(DEFAULT_LOG_CAPACITY)
    }
}

impl Harness {
    /// `log_capacity` events are kept per stream.
    pub fn new(log_capacity: usize) -> Self {
        Self {
            streams: Mutex::default(),
            faults: RwLock::default(),
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
            log_capacity: log_capacity.max(1),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, StreamRecord>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new stream; its id is stable for the life of the harness. The receiver
    /// fires (with a reason) when the harness wants the stream closed.
    pub fn open_stream(&self) -> (u64, oneshot::Receiver<String>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let info = StreamInfo {
            id,
            node: String::new(),
            opened_ms: now_ms(),
            closed_ms: None,
            types: BTreeMap::new(),
        };
        self.streams().insert(
            id,
            StreamRecord {
                info,
                log: VecDeque::new(),
                close: Some(tx),
            },
        );
        (id, rx)
    }

    pub fn set_node(&self, id: u64, node: &str) {
        if let Some(r) = self.streams().get_mut(&id) {
            r.info.node = node.to_owned();
        }
    }

    pub fn update_type(&self, id: u64, type_url: &str, summary: TypeSummary) {
        if let Some(r) = self.streams().get_mut(&id) {
            r.info.types.insert(type_url.to_owned(), summary);
        }
    }

    /// Appends to a stream's log and counts the event.
    pub fn record(&self, id: u64, event: Event) {
        match &event {
            Event::Request { ack, .. } => {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                match ack {
                    Some(Ack::Ack { .. }) => self.metrics.acks.fetch_add(1, Ordering::Relaxed),
                    Some(Ack::Nack { .. } | Ack::Stale { nack: true, .. }) => {
                        self.metrics.nacks.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => 0,
                };
            }
            Event::Response { dropped, .. } => {
                let counter = if *dropped {
                    &self.metrics.dropped
                } else {
                    &self.metrics.responses
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Event::Closed { .. } => {}
        }
        let mut streams = self.streams();
        if let Some(r) = streams.get_mut(&id) {
            if r.log.len() == self.log_capacity {
                r.log.pop_front();
            }
            r.log.push_back(event);
        }
    }

    /// Counts a response caused by a store change `latency` ago.
    pub fn record_push(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.metrics.pushes.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .push_latency_us_total
            .fetch_add(us, Ordering::Relaxed);
        self.metrics
            .push_latency_us_max
            .fetch_max(us, Ordering::Relaxed);
    }

    /// Marks a stream closed (kept for inspection, the oldest closed ones are forgotten).
    pub fn close_recorded(&self, id: u64, reason: &str) {
        self.record(
            id,
            Event::Closed {
                at_ms: now_ms(),
                reason: reason.to_owned(),
            },
        );
        let mut streams = self.streams();
        if let Some(r) = streams.get_mut(&id) {
            r.info.closed_ms = Some(now_ms());
            r.close = None;
        }
        let closed: Vec<u64> = streams
            .iter()
            .filter(|(_, r)| r.info.closed_ms.is_some())
            .map(|(id, _)| *id)
            .collect();
        for old in closed
            .iter()
            .take(closed.len().saturating_sub(CLOSED_STREAMS_KEPT))
        {
            streams.remove(old);
        }
    }

    /// Asks a stream to close. False if it is unknown or already closed.
    pub fn close_stream(&self, id: u64) -> bool {
        let tx = self.streams().get_mut(&id).and_then(|r| r.close.take());
        tx.is_some_and(|tx| tx.send("closed by the harness".to_owned()).is_ok())
    }

    /// Asks every open stream of a node to close; returns how many.
    pub fn close_node(&self, node: &str) -> usize {
        let senders: Vec<_> = self
            .streams()
            .values_mut()
            .filter(|r| r.info.node == node)
            .filter_map(|r| r.close.take())
            .collect();
        senders
            .into_iter()
            .filter(|tx| !tx.is_closed())
            .map(|tx| tx.send(format!("node {node} closed by the harness")))
            .filter(Result::is_ok)
            .count()
    }

    /// Every stream known, open and recently closed.
    pub fn stream_infos(&self) -> Vec<StreamInfo> {
        self.streams().values().map(|r| r.info.clone()).collect()
    }

    pub fn stream_info(&self, id: u64) -> Option<StreamInfo> {
        self.streams().get(&id).map(|r| r.info.clone())
    }

    pub fn stream_log(&self, id: u64) -> Option<Vec<Event>> {
        self.streams()
            .get(&id)
            .map(|r| r.log.iter().cloned().collect())
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.metrics;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: get(&m.requests),
            responses: get(&m.responses),
            dropped: get(&m.dropped),
            acks: get(&m.acks),
            nacks: get(&m.nacks),
            pushes: get(&m.pushes),
            push_latency_us_total: get(&m.push_latency_us_total),
            push_latency_us_max: get(&m.push_latency_us_max),
        }
    }

    /// Replaces the fault set; returns the previous one (to know which names to re-examine).
    pub fn set_faults(&self, faults: Vec<Fault>) -> Vec<Fault> {
        let faults = faults.into_iter().map(Fault::normalized).collect();
        std::mem::replace(
            &mut *self.faults.write().unwrap_or_else(PoisonError::into_inner),
            faults,
        )
    }

    pub fn faults(&self) -> Vec<Fault> {
        self.faults
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn any_fault(&self, type_url: &str, name: &str, pick: impl Fn(&Fault) -> bool) -> bool {
        let faults = self.faults.read().unwrap_or_else(PoisonError::into_inner);
        faults.iter().any(|f| pick(f) && f.matches(type_url, name))
    }

    pub fn is_silenced(&self, type_url: &str, name: &str) -> bool {
        self.any_fault(type_url, name, |f| f.silence)
    }

    pub fn is_invalid(&self, type_url: &str, name: &str) -> bool {
        self.any_fault(type_url, name, |f| f.invalid)
    }

    /// Delay and drop for a response touching `names` (a response is atomic, so a fault on
    /// any of its names applies to all of it).
    pub fn response_fault<'a>(
        &self,
        type_url: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> ResponseFault {
        let faults = self.faults.read().unwrap_or_else(PoisonError::into_inner);
        if faults.is_empty() {
            return ResponseFault::default();
        }
        let mut out = ResponseFault::default();
        for name in names {
            for f in faults.iter().filter(|f| f.matches(type_url, name)) {
                out.drop |= f.drop;
                if let Some(ms) = f.delay_ms {
                    out.delay = Some(out.delay.unwrap_or_default().max(Duration::from_millis(ms)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CLUSTER, TOPIC_ROUTE};

    #[test]
    fn faults_match_by_type_and_name() {
        let h = Harness::default();
        let faults: Vec<Fault> = serde_json::from_str(
            r#"[{"type":"clusters","name":"a","delay_ms":20,"invalid":true},{"type":"topics","drop":true,"silence":true}]"#,
        )
        .unwrap();
        h.set_faults(faults);
        assert!(h.is_invalid(CLUSTER, "a") && !h.is_invalid(CLUSTER, "b"));
        assert!(h.is_silenced(TOPIC_ROUTE, "anything"));
        assert_eq!(
            h.response_fault(CLUSTER, ["b", "a"]).delay,
            Some(Duration::from_millis(20))
        );
        assert!(h.response_fault(TOPIC_ROUTE, ["x"]).drop);
        assert_eq!(h.response_fault(CLUSTER, ["b"]), ResponseFault::default());
        assert_eq!(h.set_faults(vec![]).len(), 2);
        assert!(serde_json::from_str::<Fault>(r#"{"type":"clusters","explode":true}"#).is_err());
    }

    #[test]
    fn log_is_bounded_and_metrics_count() {
        let h = Harness::new(3);
        let (id, _rx) = h.open_stream();
        for i in 0..5 {
            h.record(
                id,
                Event::Request {
                    at_ms: i,
                    type_url: CLUSTER.into(),
                    subscribe: vec![],
                    unsubscribe: vec![],
                    initial_versions: BTreeMap::new(),
                    nonce: "1".into(),
                    ack: Some(if i % 2 == 0 {
                        Ack::Ack { nonce: "1".into() }
                    } else {
                        Ack::Nack {
                            nonce: "1".into(),
                            error: "e".into(),
                        }
                    }),
                },
            );
        }
        let log = h.stream_log(id).unwrap();
        assert_eq!(log.len(), 3);
        assert!(matches!(log[0], Event::Request { at_ms: 2, .. }));
        let m = h.metrics();
        assert_eq!((m.requests, m.acks, m.nacks), (5, 3, 2));
        let json = serde_json::to_value(&log[1]).unwrap();
        assert_eq!(json["ack"]["kind"], "nack");
        assert_eq!(json["ack"]["error"], "e");
    }

    #[tokio::test]
    async fn close_by_stream_and_by_node() {
        let h = Harness::default();
        let (a, rx_a) = h.open_stream();
        let (b, rx_b) = h.open_stream();
        h.set_node(a, "n1");
        h.set_node(b, "n1");
        assert!(h.close_stream(a));
        assert!(!h.close_stream(a), "already asked");
        assert_eq!(rx_a.await.unwrap(), "closed by the harness");
        assert_eq!(h.close_node("n1"), 1);
        assert!(rx_b.await.unwrap().contains("n1"));
        h.close_recorded(a, "gone");
        assert!(h.stream_info(a).unwrap().closed_ms.is_some());
        assert!(!h.close_stream(99));
    }
}
