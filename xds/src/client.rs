//! The on-demand delta xDS client: one task owning one delta ADS stream, subscribing names when
//! they are first demanded and unsubscribing them when released, so a sidecar holds only the
//! resources its applications use.
//!
//! Modelled on istio/ztunnel's client (`src/xds/client.rs`): the [`ResourceHandler`] applies a
//! response first, then waiters are told; rejected resources are not recorded as known, so a
//! reconnect fetches them again; a reconnect offers what is known as `initial_resource_versions`.
//! Unlike ztunnel, a demand is bounded by `request_timeout`, names are unsubscribed on release,
//! and a demand for a subscribed but unresolved name (a previous demand timed out) subscribes
//! it again, which obliges the server to answer (unlike Envoy 1.38's stuck ODCDS, #44742).
//!
//! Concurrency: the state sits behind one mutex, which is also held while the handler runs, so
//! handler calls (responses and releases) are serialised and a release can never be overtaken by
//! a response for the released name. The handler must therefore not call back into the client.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::harness::now_ms;
use crate::protocol::WILDCARD;
use crate::resource::VersionedResource;
use crate::types::short_name;

/// Requests queued towards the server per stream. A full queue means the server stopped reading:
/// the stream is dropped and re-established (which resends the whole state).
const OUTBOX_DEPTH: usize = 256;
/// NACK reasons are cut to this many bytes.
const MAX_REASON_BYTES: usize = 4096;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const NACK_CODE: i32 = 3;

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The control plane, as a URI (`http://127.0.0.1:15010`).
    pub address: String,
    /// The node id sent on the first request of every stream.
    pub node_id: String,
    /// How long a demand waits for the server's answer (Envoy ODCDS defaults to 5 s).
    pub request_timeout: Duration,
    /// TCP connect plus stream establishment.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubled on each failure up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// HTTP/2 keepalive pings, to notice a dead control plane on an idle stream.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Subscribed names per type; demands beyond fail with [`DemandError::TooManyNames`].
    pub max_names_per_type: usize,
    /// Demands waiting at once, all names; beyond fail with [`DemandError::Overloaded`].
    pub max_pending_demands: usize,
    /// Largest response accepted from the server.
    pub max_message_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            address: "http://127.0.0.1:15010".to_owned(),
            node_id: "rocketmesh-sidecar".to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_names_per_type: 10_000,
            max_pending_demands: 10_000,
            max_message_bytes: 4 << 20,
        }
    }
}

/// Applies resources to whatever the client feeds (the sidecar's route and cluster tables).
///
/// Called from the client's task (responses) or from [`XdsClient::release`], one call at a time,
/// with the client's state locked: it must not call the client.
pub trait ResourceHandler: Send + Sync {
    /// `added`: new or changed resources of `type_url` (only names subscribed); `removed`: names
    /// the handler held that are gone (deleted on the server, or released). `Err(reason)` rejects
    /// the whole response: it is NACKed with `reason` and its versions are not recorded, so the
    /// handler should keep its last good state.
    fn apply(
        &self,
        type_url: &str,
        added: &[VersionedResource],
        removed: &[String],
    ) -> Result<(), String>;
}

/// What a demand found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "version", rename_all = "snake_case")]
pub enum Demanded {
    /// The resource is held (the handler has it) at this version.
    Present(String),
    /// The server says it does not exist.
    Absent,
}

/// Why a demand failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemandError {
    #[error("no answer for {type_url} {name} within {after:?}")]
    Timeout {
        type_url: String,
        name: String,
        after: Duration,
    },
    #[error("the handler rejected {name}: {reason}")]
    Rejected { name: String, reason: String },
    #[error("{name} was released while demanded")]
    Released { name: String },
    #[error("{type_url} already has {max} subscribed names")]
    TooManyNames { type_url: String, max: usize },
    #[error("{max} demands are already waiting")]
    Overloaded { max: usize },
    #[error("invalid resource name {0:?}")]
    InvalidName(String),
    #[error("the xDS client stopped")]
    Stopped,
}

/// The client's state for the sidecar's config dump and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSnapshot {
    pub address: String,
    pub node_id: String,
    pub connected: bool,
    /// A stream was established at least once.
    pub ever_connected: bool,
    /// The client's task is alive (false only if it died, which is a bug).
    pub running: bool,
    /// When the client last connected or disconnected (ms since the epoch); `None` before the
    /// first attempt finished.
    pub since_ms: Option<u64>,
    /// Why the last stream ended or the last connect failed.
    pub last_error: Option<String>,
    pub types: BTreeMap<String, TypeSnapshot>,
    pub counters: Counters,
}

/// One type in a [`ClientSnapshot`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeSnapshot {
    /// Subscribed name → what is known of it.
    pub subscribed: BTreeMap<String, NameSnapshot>,
    pub last_ack_nonce: Option<String>,
    pub last_nack: Option<NackSnapshot>,
    /// Names with demands waiting.
    pub pending: Vec<PendingSnapshot>,
}

/// One subscribed name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NameSnapshot {
    /// The version held, if any.
    pub version: Option<String>,
    /// The server said it does not exist.
    pub absent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NackSnapshot {
    pub nonce: String,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingSnapshot {
    pub name: String,
    pub waiters: usize,
    /// How long the oldest waiter has waited.
    pub waited_ms: u64,
}

/// Counters since the client started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Names newly subscribed.
    pub subscriptions: u64,
    /// Names released while subscribed.
    pub unsubscriptions: u64,
    pub demands: u64,
    /// Time demands waited, summed (answered at once counts ~0).
    pub demand_hold_us_total: u64,
    pub timeouts: u64,
    pub presents: u64,
    pub absents: u64,
    /// Demands failed because the handler rejected the resource.
    pub rejections: u64,
    pub nacks: u64,
    pub acks: u64,
    /// Streams established after the first one.
    pub reconnects: u64,
    pub connect_failures: u64,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    subscriptions: AtomicU64,
    unsubscriptions: AtomicU64,
    demands: AtomicU64,
    demand_hold_us_total: AtomicU64,
    timeouts: AtomicU64,
    presents: AtomicU64,
    absents: AtomicU64,
    rejections: AtomicU64,
    nacks: AtomicU64,
    acks: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            subscriptions: get(&self.subscriptions),
            unsubscriptions: get(&self.unsubscriptions),
            demands: get(&self.demands),
            demand_hold_us_total: get(&self.demand_hold_us_total),
            timeouts: get(&self.timeouts),
            presents: get(&self.presents),
            absents: get(&self.absents),
            rejections: get(&self.rejections),
            nacks: get(&self.nacks),
            acks: get(&self.acks),
            reconnects: get(&self.reconnects),
            connect_failures: get(&self.connect_failures),
        }
    }
}

type Reply = Result<Demanded, DemandError>;

struct Waiter {
    tx: oneshot::Sender<Reply>,
    since: Instant,
}

/// One subscribed name.
#[derive(Default)]
struct NameState {
    version: Option<String>,
    absent: bool,
    waiters: Vec<Waiter>,
}

impl NameState {
    fn resolved(&self) -> Option<Demanded> {
        match (&self.version, self.absent) {
            (Some(v), _) => Some(Demanded::Present(v.clone())),
            (None, true) => Some(Demanded::Absent),
            (None, false) => None,
        }
    }

    /// Drops waiters whose demand gave up; returns how many are left.
    fn prune(&mut self) -> usize {
        self.waiters.retain(|w| !w.tx.is_closed());
        self.waiters.len()
    }

    fn wake(&mut self, reply: &Reply) -> usize {
        let waiters = std::mem::take(&mut self.waiters);
        let n = waiters.len();
        for w in waiters {
            // The demand may have given up already.
            let _ = w.tx.send(reply.clone());
        }
        n
    }
}

#[derive(Default)]
struct TypeState {
    /// The names wanted (subscribed, or to be on the next stream).
    names: BTreeMap<String, NameState>,
    /// Names the server was told on the current stream.
    wire: BTreeSet<String>,
    /// Names to subscribe again on the current stream even if on the wire (a subscribe obliges
    /// the server to answer).
    nudge: BTreeSet<String>,
    /// A request of this type went out on the current stream (responses of other types are
    /// never ACKed: an ACK would be the type's first request, i.e. a legacy wildcard).
    on_stream: bool,
    last_ack_nonce: Option<String>,
    last_nack: Option<NackSnapshot>,
}

struct Conn {
    connected: bool,
    ever_connected: bool,
    since_ms: Option<u64>,
    last_error: Option<String>,
}

struct State {
    types: BTreeMap<String, TypeState>,
    conn: Conn,
    /// Live waiters over all names (an upper bound: closed ones are pruned lazily).
    pending: usize,
}

struct Shared {
    config: ClientConfig,
    handler: Arc<dyn ResourceHandler>,
    state: Mutex<State>,
    counters: AtomicCounters,
    /// Wakes the task to send subscription changes.
    wake: Notify,
    connected: watch::Sender<bool>,
}

/// The on-demand delta xDS client. Dropping it stops its task (and ends the stream).
pub struct XdsClient {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("address", &self.shared.config.address)
            .field("node_id", &self.shared.config.node_id)
            .finish()
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Registered {
    Ready(Demanded),
    Wait(oneshot::Receiver<Reply>),
}

impl XdsClient {
    /// Spawns the task owning the stream (on the current tokio runtime) and returns at once;
    /// the task connects, and reconnects with backoff, for as long as the client lives.
    pub fn start(config: ClientConfig, handler: Arc<dyn ResourceHandler>) -> Self {
        let shared = Arc::new(Shared {
            config,
            handler,
            state: Mutex::new(State {
                types: BTreeMap::new(),
                conn: Conn {
                    connected: false,
                    ever_connected: false,
                    since_ms: None,
                    last_error: None,
                },
                pending: 0,
            }),
            counters: AtomicCounters::default(),
            wake: Notify::new(),
            connected: watch::channel(false).0,
        });
        let task = tokio::spawn(run(shared.clone()));
        Self { shared, task }
    }

    /// Resolves a resource: at once if known (present or absent), otherwise by subscribing it
    /// and waiting (at most `request_timeout`) for the server's answer. Concurrent demands of
    /// one name share one subscription.
    pub async fn demand(&self, type_url: &str, name: &str) -> Result<Demanded, DemandError> {
        let started = Instant::now();
        let counters = &self.shared.counters;
        inc(&counters.demands);
        let out = match self.shared.register(type_url, name, started) {
            Err(e) => Err(e),
            Ok(Registered::Ready(d)) => Ok(d),
            Ok(Registered::Wait(rx)) => {
                self.shared.wake.notify_one();
                match tokio::time::timeout(self.shared.config.request_timeout, rx).await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(_)) => Err(DemandError::Stopped),
                    Err(_) => Err(DemandError::Timeout {
                        type_url: type_url.to_owned(),
                        name: name.to_owned(),
                        after: self.shared.config.request_timeout,
                    }),
                }
            }
        };
        let held = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters
            .demand_hold_us_total
            .fetch_add(held, Ordering::Relaxed);
        match &out {
            Ok(Demanded::Present(_)) => inc(&counters.presents),
            Ok(Demanded::Absent) => inc(&counters.absents),
            Err(DemandError::Timeout { .. }) => {
                inc(&counters.timeouts);
                tracing::warn!(
                    type_url = short_name(type_url),
                    name,
                    "xDS demand timed out"
                );
            }
            Err(DemandError::Rejected { .. }) => inc(&counters.rejections),
            Err(_) => {}
        }
        out
    }

    /// Unsubscribes names; the handler is told those it held are gone. Demands waiting for them
    /// fail with [`DemandError::Released`]. Names not subscribed are ignored.
    pub fn release<I, S>(&self, type_url: &str, names: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if self.shared.release(type_url, names) {
            self.shared.wake.notify_one();
        }
    }

    /// Connection state, subscriptions, (N)ACKs, pending demands and counters.
    pub fn snapshot(&self) -> ClientSnapshot {
        let mut state = self.shared.lock();
        let now = Instant::now();
        let types = state
            .types
            .iter_mut()
            .map(|(type_url, ts)| {
                let mut pending = Vec::new();
                let mut subscribed = BTreeMap::new();
                for (name, ns) in &mut ts.names {
                    if ns.prune() > 0 {
                        let oldest = ns.waiters.iter().map(|w| w.since).min().unwrap_or(now);
                        pending.push(PendingSnapshot {
                            name: name.clone(),
                            waiters: ns.waiters.len(),
                            waited_ms: millis(now.saturating_duration_since(oldest)),
                        });
                    }
                    subscribed.insert(
                        name.clone(),
                        NameSnapshot {
                            version: ns.version.clone(),
                            absent: ns.absent,
                        },
                    );
                }
                let snap = TypeSnapshot {
                    subscribed,
                    last_ack_nonce: ts.last_ack_nonce.clone(),
                    last_nack: ts.last_nack.clone(),
                    pending,
                };
                (type_url.clone(), snap)
            })
            .collect();
        state.recount_pending();
        ClientSnapshot {
            address: self.shared.config.address.clone(),
            node_id: self.shared.config.node_id.clone(),
            connected: state.conn.connected,
            ever_connected: state.conn.ever_connected,
            running: !self.task.is_finished(),
            since_ms: state.conn.since_ms,
            last_error: state.conn.last_error.clone(),
            types,
            counters: self.shared.counters.snapshot(),
        }
    }

    /// No stream is up, and the client knows the control plane is unreachable: a stream ended
    /// or an attempt failed (as opposed to the first attempt still under way).
    pub fn unreachable(&self) -> bool {
        let state = self.shared.lock();
        !state.conn.connected && (state.conn.ever_connected || state.conn.last_error.is_some())
    }

    /// Stops the client's task (and its stream); demands then fail with `Stopped`.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Watches whether a stream is up (to wait for the first connection, or for health).
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.shared.connected.subscribe()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    fn recount_pending(&mut self) {
        self.pending = self
            .types
            .values_mut()
            .flat_map(|t| t.names.values_mut())
            .map(NameState::prune)
            .sum();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The handler, a panic in it being a rejection (the task must survive a buggy handler).
    fn apply(
        &self,
        type_url: &str,
        added: &[VersionedResource],
        removed: &[String],
    ) -> Result<(), String> {
        let call = AssertUnwindSafe(|| self.handler.apply(type_url, added, removed));
        std::panic::catch_unwind(call).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("handler panicked: {what}"))
        })
    }

    fn register(
        &self,
        type_url: &str,
        name: &str,
        now: Instant,
    ) -> Result<Registered, DemandError> {
        if name.is_empty() || name == WILDCARD || type_url.is_empty() {
            return Err(DemandError::InvalidName(name.to_owned()));
        }
        let config = &self.config;
        let mut state = self.lock();
        if let Some(done) = state
            .types
            .get(type_url)
            .and_then(|t| t.names.get(name))
            .and_then(NameState::resolved)
        {
            return Ok(Registered::Ready(done));
        }
        if state.pending >= config.max_pending_demands {
            state.recount_pending();
            if state.pending >= config.max_pending_demands {
                return Err(DemandError::Overloaded {
                    max: config.max_pending_demands,
                });
            }
        }
        let ts = state.types.entry(type_url.to_owned()).or_default();
        if !ts.names.contains_key(name) && ts.names.len() >= config.max_names_per_type {
            return Err(DemandError::TooManyNames {
                type_url: type_url.to_owned(),
                max: config.max_names_per_type,
            });
        }
        let ns = match ts.names.get_mut(name) {
            Some(ns) => ns,
            None => {
                inc(&self.counters.subscriptions);
                tracing::debug!(type_url = short_name(type_url), name, "subscribing");
                ts.names.entry(name.to_owned()).or_default()
            }
        };
        if ns.prune() == 0 {
            // Nobody is waiting for it on the wire (new, or an earlier demand gave up): a
            // subscribe obliges the server to answer. Otherwise join the demand under way.
            ts.nudge.insert(name.to_owned());
        }
        let (tx, rx) = oneshot::channel();
        ns.waiters.push(Waiter { tx, since: now });
        state.pending += 1;
        Ok(Registered::Wait(rx))
    }

    /// Returns whether the server must be told.
    fn release<I, S>(&self, type_url: &str, names: I) -> bool
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut state = self.lock();
        let Some(ts) = state.types.get_mut(type_url) else {
            return false;
        };
        let mut removed = Vec::new();
        let mut tell = false;
        for name in names {
            let name = name.as_ref();
            let Some(mut ns) = ts.names.remove(name) else {
                continue;
            };
            inc(&self.counters.unsubscriptions);
            tracing::debug!(type_url = short_name(type_url), name, "unsubscribing");
            ns.wake(&Err(DemandError::Released {
                name: name.to_owned(),
            }));
            ts.nudge.remove(name);
            tell |= ts.wire.contains(name);
            if ns.version.is_some() {
                removed.push(name.to_owned());
            }
        }
        if !removed.is_empty()
            && let Err(reason) = self.apply(type_url, &[], &removed)
        {
            tracing::warn!(type_url = short_name(type_url), %reason, "handler refused a release");
        }
        state.recount_pending();
        tell
    }

    /// The first requests of a new stream: per type, every wanted name and the versions known.
    fn start_stream(&self) -> Vec<DeltaDiscoveryRequest> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for (type_url, ts) in &mut state.types {
            ts.nudge.clear();
            ts.wire = ts.names.keys().cloned().collect();
            ts.on_stream = !ts.wire.is_empty();
            if !ts.on_stream {
                continue;
            }
            out.push(DeltaDiscoveryRequest {
                type_url: type_url.clone(),
                resource_names_subscribe: ts.wire.iter().cloned().collect(),
                initial_resource_versions: ts
                    .names
                    .iter()
                    .filter_map(|(n, s)| Some((n.clone(), s.version.clone()?)))
                    .collect(),
                ..Default::default()
            });
        }
        out
    }

    /// Subscription changes since the last call, one request per type.
    fn drain(&self) -> Vec<DeltaDiscoveryRequest> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for (type_url, ts) in &mut state.types {
            let subscribe: Vec<String> = ts
                .names
                .keys()
                .filter(|n| !ts.wire.contains(*n) || ts.nudge.contains(*n))
                .cloned()
                .collect();
            let unsubscribe: Vec<String> = ts
                .wire
                .iter()
                .filter(|n| !ts.names.contains_key(*n))
                .cloned()
                .collect();
            ts.nudge.clear();
            if subscribe.is_empty() && unsubscribe.is_empty() {
                continue;
            }
            ts.wire = ts.names.keys().cloned().collect();
            ts.on_stream = true;
            out.push(DeltaDiscoveryRequest {
                type_url: type_url.clone(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            });
        }
        out
    }

    /// Applies a response (handler first, then waiters) and returns its ACK or NACK, or `None`
    /// if it must not be answered.
    fn on_response(&self, resp: DeltaDiscoveryResponse) -> Option<DeltaDiscoveryRequest> {
        let type_url = resp.type_url.as_str();
        let mut state = self.lock();
        let Some(ts) = state.types.get_mut(type_url).filter(|t| t.on_stream) else {
            tracing::warn!(%type_url, nonce = %resp.nonce, "response of a type never requested; ignored");
            return None;
        };
        let verdict = validate(&resp).and_then(|added| {
            // Only names still wanted: a push may cross an unsubscribe.
            let added: Vec<VersionedResource> = added
                .into_iter()
                .filter(|r| ts.names.contains_key(&r.name))
                .collect();
            let changed: Vec<VersionedResource> = added
                .iter()
                .filter(|r| {
                    ts.names
                        .get(&r.name)
                        .is_none_or(|n| n.version.as_deref() != Some(r.version.as_str()))
                })
                .cloned()
                .collect();
            let removed: Vec<String> = resp
                .removed_resources
                .iter()
                .filter(|n| ts.names.contains_key(*n))
                .cloned()
                .collect();
            let gone: Vec<String> = removed
                .iter()
                .filter(|n| ts.names.get(*n).is_some_and(|s| s.version.is_some()))
                .cloned()
                .collect();
            if !changed.is_empty() || !gone.is_empty() {
                self.apply(type_url, &changed, &gone)
                    .map_err(|reason| truncate(reason, MAX_REASON_BYTES))?;
            }
            Ok((added, removed))
        });
        let mut reply = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match verdict {
            Ok((added, removed)) => {
                inc(&self.counters.acks);
                ts.last_ack_nonce = Some(resp.nonce.clone());
                for r in added {
                    if let Some(ns) = ts.names.get_mut(&r.name) {
                        ns.version = Some(r.version.clone());
                        ns.absent = false;
                        ns.wake(&Ok(Demanded::Present(r.version)));
                    }
                }
                for name in removed {
                    if let Some(ns) = ts.names.get_mut(&name) {
                        ns.version = None;
                        ns.absent = true;
                        ns.wake(&Ok(Demanded::Absent));
                    }
                }
                tracing::debug!(type_url = short_name(type_url), nonce = %resp.nonce, "ACK");
            }
            Err(reason) => {
                inc(&self.counters.nacks);
                tracing::warn!(type_url = short_name(type_url), nonce = %resp.nonce, %reason, "NACK");
                let names = resp
                    .resources
                    .iter()
                    .map(|r| &r.name)
                    .chain(&resp.removed_resources);
                for name in names {
                    if let Some(ns) = ts.names.get_mut(name) {
                        ns.wake(&Err(DemandError::Rejected {
                            name: name.clone(),
                            reason: reason.clone(),
                        }));
                    }
                }
                ts.last_nack = Some(NackSnapshot {
                    nonce: resp.nonce.clone(),
                    reason: reason.clone(),
                    at_ms: now_ms(),
                });
                reply.error_detail = Some(RpcStatus {
                    code: NACK_CODE,
                    message: reason,
                    details: Vec::new(),
                });
            }
        }
        state.recount_pending();
        // Without a nonce there is nothing to acknowledge.
        (!resp.nonce.is_empty()).then_some(reply)
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        {
            let mut state = self.lock();
            state.conn.connected = connected;
            state.conn.ever_connected |= connected;
            state.conn.since_ms = Some(now_ms());
            if error.is_some() {
                state.conn.last_error = error;
            }
            if !connected {
                for ts in state.types.values_mut() {
                    ts.wire.clear();
                    ts.nudge.clear();
                    ts.on_stream = false;
                }
            }
        }
        self.connected.send_replace(connected);
    }
}

/// The response's resources, or why the whole response is rejected.
fn validate(resp: &DeltaDiscoveryResponse) -> Result<Vec<VersionedResource>, String> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(resp.resources.len());
    for r in &resp.resources {
        if r.name.is_empty() {
            return Err("a resource has no name".to_owned());
        }
        if !seen.insert(r.name.as_str()) {
            return Err(format!("resource {} appears twice", r.name));
        }
        let Some(any) = &r.resource else {
            return Err(format!(
                "resource {} has no body (TTL heartbeats are not supported)",
                r.name
            ));
        };
        if any.type_url != resp.type_url {
            return Err(format!(
                "resource {} is a {}, not a {}",
                r.name, any.type_url, resp.type_url
            ));
        }
        out.push(VersionedResource {
            name: r.name.clone(),
            type_url: resp.type_url.clone(),
            version: r.version.clone(),
            any: any.clone(),
        });
    }
    if let Some(n) = resp
        .removed_resources
        .iter()
        .find(|n| seen.contains(n.as_str()))
    {
        return Err(format!("resource {n} is both added and removed"));
    }
    Ok(out)
}

/// An error with its sources (tonic's own text is just "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Exponential backoff with equal jitter: each delay is in [d/2, d], d doubling up to the max.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            next: initial,
            // Seeded per process and instance by std's random hasher keys.
            rng: RandomState::new().hash_one(Instant::now()) | 1,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d / 2;
        let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(self.rng % (span + 1))
    }
}

/// The client's task: a stream at a time, reconnecting with backoff.
async fn run(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut streams = 0u64;
    loop {
        let reason = session(&shared, &mut backoff, &mut streams).await;
        if *shared.connected.borrow() {
            tracing::warn!(address = %config.address, %reason, "xDS stream down");
        } else {
            inc(&shared.counters.connect_failures);
            tracing::debug!(address = %config.address, %reason, "xDS connect failed");
        }
        shared.set_connected(false, Some(reason));
        tokio::time::sleep(backoff.delay()).await;
    }
}

/// Connects and runs one stream until it ends; returns why.
async fn session(shared: &Shared, backoff: &mut Backoff, streams: &mut u64) -> String {
    let config = &shared.config;
    let endpoint = match Endpoint::from_shared(config.address.clone()) {
        Ok(e) => e,
        Err(e) => return format!("invalid address {}: {e}", config.address),
    };
    let mut endpoint = endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .keep_alive_timeout(config.keepalive_timeout);
    if let Some(interval) = config.keepalive_interval {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_while_idle(true);
    }
    let channel = match tokio::time::timeout(config.connect_timeout, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return format!("connect: {}", chain(&e)),
        Err(_) => return "connect: timed out".to_owned(),
    };
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes);
    let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
    let mut out = Outbox {
        tx,
        node: Some(Node {
            id: config.node_id.clone(),
            user_agent_name: "rocketmesh".to_owned(),
            ..Default::default()
        }),
    };
    // Queued before the call, so the stream opens with them.
    for req in shared.start_stream() {
        if let Err(e) = out.send(req) {
            return e;
        }
    }
    let call = grpc.delta_aggregated_resources(ReceiverStream::new(rx));
    let mut inbound = match tokio::time::timeout(config.connect_timeout, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return format!("stream: {status}"),
        Err(_) => return "stream: timed out".to_owned(),
    };
    *streams += 1;
    if *streams > 1 {
        inc(&shared.counters.reconnects);
    }
    tracing::info!(address = %config.address, node = %config.node_id, "xDS stream up");
    shared.set_connected(true, None);
    // Anything demanded while the stream was being set up.
    shared.wake.notify_one();
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(resp)) => {
                    backoff.reset();
                    if let Some(reply) = shared.on_response(resp)
                        && let Err(e) = out.send(reply)
                    {
                        return e;
                    }
                }
                Ok(None) => return "stream ended by the server".to_owned(),
                Err(status) => return format!("stream: {status}"),
            },
            () = shared.wake.notified() => {
                for req in shared.drain() {
                    if let Err(e) = out.send(req) {
                        return e;
                    }
                }
            }
        }
    }
}

/// Requests towards the server; the first one of the stream carries the node.
struct Outbox {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    node: Option<Node>,
}

impl Outbox {
    fn send(&mut self, mut req: DeltaDiscoveryRequest) -> Result<(), String> {
        if let Some(node) = self.node.take() {
            req.node = Some(node);
        }
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                "request queue full: server not reading".to_owned()
            }
            mpsc::error::TrySendError::Closed(_) => "request stream closed".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<Duration> = (0..5).map(|_| b.delay()).collect();
        let bounds = [100, 200, 400, 400, 400];
        for (d, max) in d.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(
                *d >= max / 2 && *d <= max,
                "{d:?} not in [{:?}, {max:?}]",
                max / 2
            );
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }

    #[test]
    fn malformed_responses_are_rejected() {
        use envoy_types::pb::envoy::service::discovery::v3::Resource;
        use envoy_types::pb::google::protobuf::Any;
        let t = crate::types::TOPIC_ROUTE;
        let res = |name: &str, type_url: &str| Resource {
            name: name.into(),
            version: "1".into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value: vec![],
            }),
            ..Default::default()
        };
        let resp = |resources: Vec<Resource>, removed: &[&str]| DeltaDiscoveryResponse {
            type_url: t.into(),
            nonce: "1".into(),
            resources,
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        assert_eq!(validate(&resp(vec![res("a", t)], &["b"])).unwrap().len(), 1);
        assert!(validate(&resp(vec![res("a", t), res("a", t)], &[])).is_err());
        assert!(validate(&resp(vec![res("a", "other")], &[])).is_err());
        assert!(validate(&resp(vec![res("", t)], &[])).is_err());
        assert!(validate(&resp(vec![res("a", t)], &["a"])).is_err());
        let mut bodiless = res("a", t);
        bodiless.resource = None;
        assert!(validate(&resp(vec![bodiless], &[])).is_err());
        assert_eq!(truncate("héllo".into(), 2), "h");
    }
}
