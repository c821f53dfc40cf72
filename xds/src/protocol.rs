//! Delta xDS protocol state of one stream, pure and synchronous (no sockets, no clocks).
//!
//! Server side: [`StreamState`] decides per type what the client subscribed to, what it is
//! believed to hold, which responses are un-ACKed, and what to send next. Client side:
//! [`ClientState`] tracks what a client holds so a reconnect can offer it as
//! `initial_resource_versions`.
//!
//! Rules (xds_protocol.rst, and the bugs other control planes had):
//! - ACK vs NACK is decided by `error_detail` alone. A NACKed response's resources revert to
//!   what the client held before and are not re-sent until they change again (no NACK loop).
//! - Subscription changes count even with a stale or unknown nonce.
//! - A subscribe always gets an answer, even for names the client holds (go-control-plane
//!   #1450), and unknown names are answered in `removed_resources` (#565).
//! - `initial_resource_versions` on a type's first request: held at that version, not re-sent
//!   while unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use serde::Serialize;

use crate::resource::VersionedResource;

/// The wildcard resource name.
pub const WILDCARD: &str = "*";

/// Un-ACKed responses remembered per type; older ones are forgotten (a client that never ACKs
/// must not grow our memory).
const MAX_IN_FLIGHT: usize = 64;

/// Resource bytes per response; more waits for the next response (gRPC peers commonly refuse
/// messages over 4 MiB). A single larger resource is still sent alone.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A request the protocol cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("type_url is required")]
    MissingTypeUrl,
}

/// What the stream's resource view says about one name.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The resource exists at this version.
    Present(Arc<VersionedResource>),
    /// It does not exist.
    Absent,
    /// Do not answer for it yet (being resolved, or silenced by a fault); ask again later.
    Withheld,
}

/// The resources a stream's responses are computed from.
pub trait ResourceView {
    fn lookup(&self, type_url: &str, name: &str) -> Lookup;
    /// All names of a type, for wildcard subscriptions.
    fn names(&self, type_url: &str) -> Vec<String>;
}

/// How a request acknowledged a response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ack {
    Ack {
        nonce: String,
    },
    Nack {
        nonce: String,
        error: String,
    },
    /// A nonce this stream has no un-ACKed response for (stale, foreign or garbage).
    Stale {
        nonce: String,
        nack: bool,
    },
}

/// What one request changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    pub type_url: String,
    /// First request of this type on the stream.
    pub first: bool,
    pub ack: Option<Ack>,
    /// Names newly of interest (subscribe and, on a first request, initial versions), deduped,
    /// without `*`. The server consults its resolver for those it does not have.
    pub interest: Vec<String>,
    pub unsubscribed: Vec<String>,
    /// Wildcard state after the request.
    pub wildcard: bool,
}

/// What the server believes the client holds for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// `Some(version)` held, `None` told absent.
    version: Option<String>,
    /// The un-ACKed response that set it; `None` once ACKed (or from initial versions).
    nonce: Option<u64>,
}

#[derive(Debug, Clone)]
struct SentEntry {
    name: String,
    /// What was sent: a version, or `None` for a removal.
    sent: Option<String>,
    /// What the client held before, to revert to on NACK.
    previous: Option<Held>,
}

/// Per-type state of one stream.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    subscribed: BTreeSet<String>,
    held: HashMap<String, Held>,
    /// Names that must be answered whatever the client holds.
    forced: BTreeSet<String>,
    /// Names whose resource changed since the last response.
    dirty: BTreeSet<String>,
    /// Compare everything (after a lagged change feed).
    resync: bool,
    /// Name → the version (or removal, `None`) the client rejected; not re-sent while current.
    rejected: HashMap<String, Option<String>>,
    in_flight: BTreeMap<u64, Vec<SentEntry>>,
    last_nack: Option<Nack>,
}

/// The last NACK of a type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    pub nonce: String,
    pub error: String,
}

/// A read-only summary of one type's state, for the harness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeSummary {
    pub wildcard: bool,
    pub subscribed: Vec<String>,
    /// Name → version the client ACKed (or announced in `initial_resource_versions`).
    pub acked: BTreeMap<String, String>,
    /// Names told absent and ACKed.
    pub absent: Vec<String>,
    pub unacked_nonces: Vec<String>,
    pub last_nack: Option<Nack>,
}

/// Server-side delta state of one stream, all types.
#[derive(Debug)]
pub struct StreamState {
    types: BTreeMap<String, TypeState>,
    last_nonce: u64,
    max_response_bytes: usize,
}

impl Default for StreamState {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamState {
    pub fn new() -> Self {
        Self::with_max_response_bytes(DEFAULT_MAX_RESPONSE_BYTES)
    }

    /// Caps the resource bytes of one response (see [`DEFAULT_MAX_RESPONSE_BYTES`]).
    pub fn with_max_response_bytes(max_response_bytes: usize) -> Self {
        Self {
            types: BTreeMap::new(),
            last_nonce: 0,
            max_response_bytes,
        }
    }

    /// Applies a request: (N)ACK bookkeeping, then subscription changes (whatever the nonce).
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
    ) -> Result<RequestOutcome, ProtocolError> {
        if req.type_url.is_empty() {
            return Err(ProtocolError::MissingTypeUrl);
        }
        let first = !self.types.contains_key(&req.type_url);
        let ts = self.types.entry(req.type_url.clone()).or_default();
        let ack = (!req.response_nonce.is_empty())
            .then(|| ts.acknowledge(&req.response_nonce, req.error_detail.as_ref()));

        let subscribe: BTreeSet<&str> = req
            .resource_names_subscribe
            .iter()
            .map(String::as_str)
            .collect();
        let unsubscribe: BTreeSet<&str> = req
            .resource_names_unsubscribe
            .iter()
            .map(String::as_str)
            .collect();
        let was_wildcard = ts.wildcard;
        if first && subscribe.is_empty() && !unsubscribe.contains(WILDCARD) {
            // Legacy wildcard: a first request naming nothing means "everything" until `*` is
            // unsubscribed explicitly.
            ts.wildcard = true;
        }
        let mut interest = Vec::new();
        if first {
            for (name, version) in &req.initial_resource_versions {
                if name == WILDCARD {
                    continue;
                }
                ts.held.insert(
                    name.clone(),
                    Held {
                        version: Some(version.clone()),
                        nonce: None,
                    },
                );
                // Compared by version on the first response: sent only if changed or gone.
                ts.dirty.insert(name.clone());
                if !ts.wildcard {
                    ts.subscribed.insert(name.clone());
                }
                interest.push(name.clone());
            }
        }
        for name in &subscribe {
            if *name == WILDCARD {
                ts.wildcard = true;
                continue;
            }
            ts.subscribed.insert((*name).to_owned());
            // A reconnecting client lists what it holds in both; those are diffed by version.
            if !(first && req.initial_resource_versions.contains_key(*name)) {
                ts.forced.insert((*name).to_owned());
            }
            if !interest.iter().any(|n| n == name) {
                interest.push((*name).to_owned());
            }
        }
        let mut unsubscribed = Vec::new();
        for name in &unsubscribe {
            if *name == WILDCARD {
                ts.wildcard = false;
                // Names held only through the wildcard are no longer tracked; the client drops them.
                let subscribed = &ts.subscribed;
                ts.held.retain(|n, _| subscribed.contains(n));
                continue;
            }
            // Phantom unsubscribes (never subscribed) are harmless.
            let was = ts.subscribed.remove(*name);
            ts.forced.remove(*name);
            ts.dirty.remove(*name);
            ts.rejected.remove(*name);
            if ts.wildcard {
                // Still of interest through `*`: the client dropped it, so answer it again
                // (the resource, or removed if it does not exist).
                ts.held.remove(*name);
                ts.forced.insert((*name).to_owned());
            } else {
                // Forget it, so a later resubscribe re-sends (go-control-plane #583/#586).
                ts.held.remove(*name);
            }
            if was {
                unsubscribed.push((*name).to_owned());
            }
        }
        if ts.wildcard && !was_wildcard {
            // Everything of the type is now of interest: compare all of it.
            ts.resync = true;
        }
        interest.retain(|n| ts.wildcard || ts.subscribed.contains(n));
        Ok(RequestOutcome {
            type_url: req.type_url.clone(),
            first,
            ack,
            interest,
            unsubscribed,
            wildcard: ts.wildcard,
        })
    }

    /// Notes that these resources changed (or were resolved); only names the stream cares
    /// about are kept. Types the stream never asked for are ignored.
    pub fn mark_changed(&mut self, type_url: &str, names: &[String]) {
        let Some(ts) = self.types.get_mut(type_url) else {
            return;
        };
        for name in names {
            if ts.wildcard || ts.subscribed.contains(name) || ts.held.contains_key(name) {
                ts.dirty.insert(name.clone());
            }
        }
    }

    /// Compares everything of one type on its next response (e.g. after a fault was lifted).
    pub fn mark_resync_type(&mut self, type_url: &str) {
        if let Some(ts) = self.types.get_mut(type_url) {
            ts.resync = true;
        }
    }

    /// Answers these names again even if the client holds them (only names it subscribed to,
    /// or all under a wildcard). Used to re-send endpoints after their cluster changed.
    pub fn force(&mut self, type_url: &str, names: &[String]) {
        let Some(ts) = self.types.get_mut(type_url) else {
            return;
        };
        for name in names {
            if ts.wildcard || ts.subscribed.contains(name) {
                ts.forced.insert(name.clone());
            }
        }
    }

    /// Compares everything on the next response of every type (the change feed lagged).
    pub fn mark_resync(&mut self) {
        for ts in self.types.values_mut() {
            ts.resync = true;
        }
    }

    /// Types with work pending.
    pub fn types_with_work(&self) -> Vec<String> {
        self.types
            .iter()
            .filter(|(_, ts)| ts.resync || !ts.forced.is_empty() || !ts.dirty.is_empty())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Names the server must answer for this type whatever the client holds.
    pub fn forced(&self, type_url: &str) -> Vec<String> {
        self.types
            .get(type_url)
            .map(|ts| ts.forced.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The next response for a type, if anything is to be sent. Allocates the nonce and records
    /// what the client will hold once it applies the response.
    pub fn next_response(
        &mut self,
        type_url: &str,
        view: &dyn ResourceView,
    ) -> Option<DeltaDiscoveryResponse> {
        let ts = self.types.get_mut(type_url)?;
        let mut candidates: BTreeSet<String> = ts.forced.union(&ts.dirty).cloned().collect();
        if ts.resync {
            candidates.extend(ts.subscribed.iter().cloned());
            candidates.extend(ts.held.keys().cloned());
            if ts.wildcard {
                candidates.extend(view.names(type_url));
            }
            ts.resync = false;
        }
        let mut resources: Vec<Arc<VersionedResource>> = Vec::new();
        let mut removed = Vec::new();
        let mut bytes = 0usize;
        for name in candidates {
            if bytes >= self.max_response_bytes {
                // Full: the rest stays forced/dirty for the next response.
                ts.dirty.insert(name);
                continue;
            }
            let forced = ts.forced.contains(&name);
            let interested = ts.wildcard || ts.subscribed.contains(&name);
            let held = ts.held.get(&name).and_then(|h| h.version.as_deref());
            let rejected = ts.rejected.get(&name);
            match view.lookup(type_url, &name) {
                // Stays forced/dirty: answered when the view has an answer.
                Lookup::Withheld => continue,
                Lookup::Present(r) => {
                    let current = held == Some(r.version.as_str())
                        || rejected == Some(&Some(r.version.clone()));
                    if interested && (forced || !current) {
                        bytes += r.any.value.len() + r.name.len();
                        resources.push(r);
                    }
                }
                Lookup::Absent => {
                    bytes += name.len();
                    let told = rejected == Some(&None);
                    if (interested || held.is_some()) && (forced || (held.is_some() && !told)) {
                        removed.push(name.clone());
                    }
                }
            }
            ts.forced.remove(&name);
            ts.dirty.remove(&name);
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        self.last_nonce += 1;
        let nonce = self.last_nonce;
        let mut entries = Vec::with_capacity(resources.len() + removed.len());
        let sent = resources
            .iter()
            .map(|r| (r.name.clone(), Some(r.version.clone())));
        for (name, version) in sent.chain(removed.iter().map(|n| (n.clone(), None))) {
            ts.rejected.remove(&name);
            let previous = ts.held.insert(
                name.clone(),
                Held {
                    version: version.clone(),
                    nonce: Some(nonce),
                },
            );
            entries.push(SentEntry {
                name,
                sent: version,
                previous,
            });
        }
        ts.in_flight.insert(nonce, entries);
        while ts.in_flight.len() > MAX_IN_FLIGHT {
            let Some((old, entries)) = ts.in_flight.pop_first() else {
                break;
            };
            ts.settle(old, &entries);
        }
        Some(DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            nonce: nonce.to_string(),
            resources: resources.iter().map(|r| r.to_resource()).collect(),
            removed_resources: removed,
            ..Default::default()
        })
    }

    /// Harness view of one type, `None` if the stream never asked for it.
    pub fn summary(&self, type_url: &str) -> Option<TypeSummary> {
        let ts = self.types.get(type_url)?;
        let mut acked = BTreeMap::new();
        let mut absent = Vec::new();
        for (name, h) in &ts.held {
            match (&h.version, h.nonce) {
                (Some(v), None) => {
                    acked.insert(name.clone(), v.clone());
                }
                (None, None) => absent.push(name.clone()),
                _ => {}
            }
        }
        absent.sort();
        Some(TypeSummary {
            wildcard: ts.wildcard,
            subscribed: ts.subscribed.iter().cloned().collect(),
            acked,
            absent,
            unacked_nonces: ts.in_flight.keys().map(u64::to_string).collect(),
            last_nack: ts.last_nack.clone(),
        })
    }

    /// Type URLs this stream has asked for.
    pub fn type_urls(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
}

impl TypeState {
    fn acknowledge(&mut self, nonce_text: &str, error: Option<&Status>) -> Ack {
        let nonce = nonce_text.parse::<u64>().ok();
        let entries = nonce.and_then(|n| self.in_flight.remove(&n).map(|e| (n, e)));
        let Some((nonce, entries)) = entries else {
            if let Some(e) = error {
                // Still worth showing: the client rejected something.
                self.last_nack = Some(Nack {
                    nonce: nonce_text.to_owned(),
                    error: e.message.clone(),
                });
            }
            return Ack::Stale {
                nonce: nonce_text.to_owned(),
                nack: error.is_some(),
            };
        };
        match error {
            None => {
                self.settle(nonce, &entries);
                Ack::Ack {
                    nonce: nonce_text.to_owned(),
                }
            }
            Some(status) => {
                for e in entries {
                    // Only revert names this response still owns (a later one may have superseded it).
                    if self.held.get(&e.name).and_then(|h| h.nonce) != Some(nonce) {
                        continue;
                    }
                    match e.previous {
                        Some(mut prev) => {
                            if prev.nonce.is_some_and(|n| !self.in_flight.contains_key(&n)) {
                                prev.nonce = None;
                            }
                            self.held.insert(e.name.clone(), prev);
                        }
                        None => {
                            self.held.remove(&e.name);
                        }
                    }
                    self.rejected.insert(e.name, e.sent);
                }
                self.last_nack = Some(Nack {
                    nonce: nonce_text.to_owned(),
                    error: status.message.clone(),
                });
                Ack::Nack {
                    nonce: nonce_text.to_owned(),
                    error: status.message.clone(),
                }
            }
        }
    }

    /// Marks names set by `nonce` as held for good.
    fn settle(&mut self, nonce: u64, entries: &[SentEntry]) {
        for e in entries {
            if let Some(h) = self
                .held
                .get_mut(&e.name)
                .filter(|h| h.nonce == Some(nonce))
            {
                h.nonce = None;
            }
        }
    }
}

/// Client-side delta state: what the client holds and wants, per type. Enough to build the
/// requests of an on-demand client and to reconnect with `initial_resource_versions`.
#[derive(Debug, Default, Clone)]
pub struct ClientState {
    types: BTreeMap<String, ClientType>,
}

#[derive(Debug, Default, Clone)]
struct ClientType {
    subscribed: BTreeSet<String>,
    known: BTreeMap<String, String>,
}

impl ClientState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A request subscribing to `names` (empty if all are already subscribed).
    pub fn subscribe(&mut self, type_url: &str, names: &[&str]) -> Option<DeltaDiscoveryRequest> {
        let t = self.types.entry(type_url.to_owned()).or_default();
        let new: Vec<String> = names
            .iter()
            .filter(|n| t.subscribed.insert((**n).to_owned()))
            .map(|n| (*n).to_owned())
            .collect();
        (!new.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: new,
            ..Default::default()
        })
    }

    /// A request unsubscribing from `names`; their resources are forgotten.
    pub fn unsubscribe(&mut self, type_url: &str, names: &[&str]) -> Option<DeltaDiscoveryRequest> {
        let t = self.types.get_mut(type_url)?;
        let gone: Vec<String> = names
            .iter()
            .filter(|n| t.subscribed.remove(**n))
            .map(|n| (*n).to_owned())
            .collect();
        for n in &gone {
            t.known.remove(n);
        }
        (!gone.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_unsubscribe: gone,
            ..Default::default()
        })
    }

    /// Applies a response the caller accepted (`rejection == None`) and returns its ACK, or
    /// leaves state unchanged and returns the NACK.
    pub fn on_response(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        rejection: Option<String>,
    ) -> DeltaDiscoveryRequest {
        let mut ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match rejection {
            Some(message) => {
                // Rejected resources are not recorded, so a reconnect fetches them again.
                ack.error_detail = Some(Status {
                    code: 3,
                    message,
                    details: Vec::new(),
                });
            }
            None => {
                let t = self.types.entry(resp.type_url.clone()).or_default();
                for r in &resp.resources {
                    t.known.insert(r.name.clone(), r.version.clone());
                }
                for n in &resp.removed_resources {
                    t.known.remove(n);
                }
            }
        }
        ack
    }

    /// Version held for a resource.
    pub fn version(&self, type_url: &str, name: &str) -> Option<&str> {
        self.types
            .get(type_url)?
            .known
            .get(name)
            .map(String::as_str)
    }

    /// The first request per type after a reconnect: every subscribed name and what is held.
    pub fn reconnect_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .filter(|(_, t)| !t.subscribed.is_empty())
            .map(|(type_url, t)| DeltaDiscoveryRequest {
                type_url: type_url.clone(),
                resource_names_subscribe: t.subscribed.iter().cloned().collect(),
                initial_resource_versions: t
                    .known
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CLUSTER, TOPIC_ROUTE};

    /// A plain map view; `withheld` names are answered later.
    #[derive(Default)]
    struct MapView {
        res: BTreeMap<String, Arc<VersionedResource>>,
        withheld: BTreeSet<String>,
    }

    impl MapView {
        fn put(&mut self, name: &str, content: &str) -> String {
            let r = VersionedResource::from_bytes(name, TOPIC_ROUTE, content.as_bytes().to_vec());
            let v = r.version.clone();
            self.res.insert(name.to_owned(), Arc::new(r));
            v
        }
    }

    impl ResourceView for MapView {
        fn lookup(&self, _: &str, name: &str) -> Lookup {
            if self.withheld.contains(name) {
                return Lookup::Withheld;
            }
            self.res
                .get(name)
                .map_or(Lookup::Absent, |r| Lookup::Present(r.clone()))
        }
        fn names(&self, _: &str) -> Vec<String> {
            self.res.keys().cloned().collect()
        }
    }

    fn req(sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: TOPIC_ROUTE.into(),
            resource_names_subscribe: sub.iter().map(|s| (*s).to_owned()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn ack(nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: TOPIC_ROUTE.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(nonce: &str, msg: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 13,
                message: msg.into(),
                details: vec![],
            }),
            ..ack(nonce)
        }
    }

    /// (names sent, names removed) of the next response, and its nonce.
    fn next(s: &mut StreamState, v: &MapView) -> Option<(Vec<String>, Vec<String>, String)> {
        s.next_response(TOPIC_ROUTE, v).map(|r| {
            (
                r.resources.iter().map(|r| r.name.clone()).collect(),
                r.removed_resources,
                r.nonce,
            )
        })
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn exchange(
        s: &mut StreamState,
        v: &MapView,
        r: DeltaDiscoveryRequest,
    ) -> Option<(Vec<String>, Vec<String>, String)> {
        s.on_request(&r).unwrap();
        let out = next(s, v);
        if let Some((_, _, nonce)) = &out {
            s.on_request(&ack(nonce)).unwrap();
        }
        out
    }

    #[test]
    fn type_url_is_required() {
        let mut s = StreamState::new();
        let r = DeltaDiscoveryRequest::default();
        assert_eq!(s.on_request(&r), Err(ProtocolError::MissingTypeUrl));
    }

    #[test]
    fn resubscribe_resends_even_when_client_holds_it() {
        // go-control-plane #1450.
        let mut v = MapView::default();
        v.put("a", "1");
        let mut s = StreamState::new();
        assert_eq!(
            exchange(&mut s, &v, req(&["a"], &[])).unwrap().0,
            names(&["a"])
        );
        assert_eq!(next(&mut s, &v), None, "nothing more to say");
        assert_eq!(
            exchange(&mut s, &v, req(&["a"], &[])).unwrap().0,
            names(&["a"])
        );
    }

    #[test]
    fn unknown_names_are_removed_remembered_and_pushed_later() {
        // go-control-plane #565: a never-existing name is answered at once.
        let mut v = MapView::default();
        let mut s = StreamState::new();
        let (sent, removed, _) = exchange(&mut s, &v, req(&["ghost"], &[])).unwrap();
        assert!(sent.is_empty());
        assert_eq!(removed, names(&["ghost"]));
        assert_eq!(s.summary(TOPIC_ROUTE).unwrap().absent, names(&["ghost"]));
        // It appears later: pushed without a new request.
        v.put("ghost", "1");
        s.mark_changed(TOPIC_ROUTE, &names(&["ghost"]));
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["ghost"]));
        // Deleting it again tells the client.
        v.res.clear();
        s.mark_changed(TOPIC_ROUTE, &names(&["ghost"]));
        assert_eq!(next(&mut s, &v).unwrap().1, names(&["ghost"]));
    }

    #[test]
    fn unsubscribe_then_resubscribe_resends() {
        // go-control-plane #583/#586.
        let mut v = MapView::default();
        v.put("a", "1");
        let mut s = StreamState::new();
        exchange(&mut s, &v, req(&["a"], &[])).unwrap();
        assert_eq!(
            exchange(&mut s, &v, req(&[], &["a"])),
            None,
            "no answer needed for an unsubscribe"
        );
        // A change while unsubscribed is not pushed.
        v.put("a", "2");
        s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
        assert_eq!(next(&mut s, &v), None);
        assert_eq!(
            exchange(&mut s, &v, req(&["a"], &[])).unwrap().0,
            names(&["a"])
        );
    }

    #[test]
    fn legacy_wildcard_lasts_until_star_is_unsubscribed() {
        let mut v = MapView::default();
        v.put("a", "1");
        v.put("b", "1");
        let mut s = StreamState::new();
        s.on_request(&req(&[], &[])).unwrap();
        let (sent, _, n) = next(&mut s, &v).unwrap();
        assert_eq!(sent, names(&["a", "b"]));
        s.on_request(&ack(&n)).unwrap();
        // Subscribing a name keeps the wildcard ("*" + "c").
        let out = s.on_request(&req(&["c"], &[])).unwrap();
        assert!(out.wildcard);
        let (_, removed, n) = next(&mut s, &v).unwrap();
        assert_eq!(removed, names(&["c"]));
        s.on_request(&ack(&n)).unwrap();
        v.put("d", "1");
        s.mark_changed(TOPIC_ROUTE, &names(&["d"]));
        assert_eq!(
            next(&mut s, &v).unwrap().0,
            names(&["d"]),
            "new names reach a wildcard subscriber"
        );
        // Unsubscribing "*" leaves only "c"; an empty request later is not wildcard again.
        assert!(!s.on_request(&req(&[], &["*"])).unwrap().wildcard);
        v.put("e", "1");
        s.mark_changed(TOPIC_ROUTE, &names(&["e"]));
        assert_eq!(next(&mut s, &v), None);
        assert!(!s.on_request(&req(&[], &[])).unwrap().wildcard);
        v.put("c", "1");
        s.mark_changed(TOPIC_ROUTE, &names(&["c"]));
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["c"]));
    }

    #[test]
    fn explicit_star_and_non_wildcard_first_requests() {
        let mut s = StreamState::new();
        // Istio-style "subscribe nothing": * subscribed and unsubscribed at once.
        assert!(!s.on_request(&req(&["*"], &["*"])).unwrap().wildcard);
        let mut s = StreamState::new();
        assert!(
            !s.on_request(&req(&["a"], &[])).unwrap().wildcard,
            "a named first request is not wildcard"
        );
        assert!(s.on_request(&req(&["*"], &[])).unwrap().wildcard);
        assert!(!s.on_request(&req(&[], &["*"])).unwrap().wildcard);
    }

    #[test]
    fn unsubscribing_a_name_under_wildcard_answers_it_again() {
        let mut v = MapView::default();
        v.put("a", "1");
        let mut s = StreamState::new();
        exchange(&mut s, &v, req(&["*", "a"], &[])).unwrap();
        assert_eq!(
            exchange(&mut s, &v, req(&[], &["a"])).unwrap().0,
            names(&["a"])
        );
    }

    #[test]
    fn subscription_changes_count_with_a_stale_nonce() {
        let mut v = MapView::default();
        v.put("a", "1");
        v.put("b", "1");
        let mut s = StreamState::new();
        exchange(&mut s, &v, req(&["a"], &[])).unwrap();
        let mut r = req(&["b"], &["a"]);
        r.response_nonce = "999".into();
        let out = s.on_request(&r).unwrap();
        assert_eq!(
            out.ack,
            Some(Ack::Stale {
                nonce: "999".into(),
                nack: false
            })
        );
        assert_eq!(out.interest, names(&["b"]));
        assert_eq!(out.unsubscribed, names(&["a"]));
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["b"]));
        assert_eq!(s.summary(TOPIC_ROUTE).unwrap().subscribed, names(&["b"]));
    }

    #[test]
    fn duplicate_names_are_sent_once() {
        let mut v = MapView::default();
        v.put("a", "1");
        let mut s = StreamState::new();
        let out = s
            .on_request(&req(&["a", "a", "ghost", "ghost"], &[]))
            .unwrap();
        assert_eq!(out.interest, names(&["a", "ghost"]));
        let (sent, removed, _) = next(&mut s, &v).unwrap();
        assert_eq!((sent, removed), (names(&["a"]), names(&["ghost"])));
    }

    #[test]
    fn nack_reverts_and_does_not_loop() {
        let mut v = MapView::default();
        let v1 = v.put("a", "1");
        let mut s = StreamState::new();
        exchange(&mut s, &v, req(&["a"], &[])).unwrap();
        v.put("a", "bad");
        s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
        let (_, _, n) = next(&mut s, &v).unwrap();
        let out = s
            .on_request(&nack(&n, "cannot create an EDS cluster"))
            .unwrap();
        assert_eq!(
            out.ack,
            Some(Ack::Nack {
                nonce: n.clone(),
                error: "cannot create an EDS cluster".into()
            })
        );
        let sum = s.summary(TOPIC_ROUTE).unwrap();
        assert_eq!(
            sum.acked.get("a"),
            Some(&v1),
            "client still holds what it had"
        );
        assert_eq!(sum.last_nack.unwrap().error, "cannot create an EDS cluster");
        assert!(sum.unacked_nonces.is_empty());
        // A resync or an unrelated change does not send the rejected version again.
        s.mark_resync();
        s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
        assert_eq!(next(&mut s, &v), None, "no NACK loop");
        // A fix is sent.
        v.put("a", "2");
        s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["a"]));
    }

    #[test]
    fn nack_of_a_superseded_response_keeps_the_newer_state() {
        let mut v = MapView::default();
        let mut s = StreamState::new();
        v.put("a", "1");
        s.on_request(&req(&["a"], &[])).unwrap();
        let (_, _, n1) = next(&mut s, &v).unwrap();
        let v2 = v.put("a", "2");
        s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
        let (_, _, n2) = next(&mut s, &v).unwrap();
        s.on_request(&nack(&n1, "old")).unwrap();
        s.on_request(&ack(&n2)).unwrap();
        assert_eq!(s.summary(TOPIC_ROUTE).unwrap().acked.get("a"), Some(&v2));
    }

    #[test]
    fn reconnect_with_initial_versions_gets_only_what_changed() {
        let mut v = MapView::default();
        let va = v.put("a", "1");
        v.put("b", "2");
        let mut s = StreamState::new();
        let mut r = req(&["a", "b", "gone"], &[]);
        r.initial_resource_versions = [("a", va.as_str()), ("b", "stale"), ("gone", "x")]
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let out = s.on_request(&r).unwrap();
        assert!(out.first && !out.wildcard);
        let (sent, removed, _) = next(&mut s, &v).unwrap();
        assert_eq!(sent, names(&["b"]), "a is unchanged");
        assert_eq!(removed, names(&["gone"]));
        // Initial versions alone (no subscribe list) also subscribe, unless wildcard.
        let mut s = StreamState::new();
        let mut r = req(&["b"], &[]);
        r.initial_resource_versions = [("a".to_owned(), va.clone())].into();
        s.on_request(&r).unwrap();
        assert_eq!(
            s.summary(TOPIC_ROUTE).unwrap().subscribed,
            names(&["a", "b"])
        );
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["b"]));
    }

    #[test]
    fn initial_versions_after_the_first_request_are_ignored() {
        let v = MapView::default();
        let mut s = StreamState::new();
        s.on_request(&req(&["x"], &[])).unwrap();
        let mut r = req(&[], &[]);
        r.initial_resource_versions = [("a".to_owned(), "1".to_owned())].into();
        s.on_request(&r).unwrap();
        assert_eq!(s.summary(TOPIC_ROUTE).unwrap().subscribed, names(&["x"]));
        assert_eq!(next(&mut s, &v).unwrap().1, names(&["x"]));
    }

    #[test]
    fn withheld_names_wait_for_an_answer() {
        let mut v = MapView::default();
        let mut s = StreamState::new();
        v.withheld.insert("a".into());
        s.on_request(&req(&["a"], &[])).unwrap();
        assert_eq!(next(&mut s, &v), None);
        assert_eq!(s.forced(TOPIC_ROUTE), names(&["a"]));
        assert_eq!(s.types_with_work(), vec![TOPIC_ROUTE.to_owned()]);
        v.withheld.clear();
        v.put("a", "1");
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["a"]));
    }

    #[test]
    fn types_are_independent_and_nonces_unique_per_stream() {
        let mut v = MapView::default();
        v.put("a", "1");
        let mut s = StreamState::new();
        s.on_request(&req(&["a"], &[])).unwrap();
        let mut c = req(&["a"], &[]);
        c.type_url = CLUSTER.into();
        s.on_request(&c).unwrap();
        let n1 = s.next_response(TOPIC_ROUTE, &v).unwrap().nonce;
        let n2 = s.next_response(CLUSTER, &v).unwrap().nonce;
        assert_ne!(n1, n2);
        // An ACK of the other type's nonce is stale for this type.
        let out = s.on_request(&ack(&n2)).unwrap();
        assert!(matches!(out.ack, Some(Ack::Stale { .. })));
        assert!(matches!(
            s.on_request(&ack("not-a-number")).unwrap().ack,
            Some(Ack::Stale { .. })
        ));
    }

    #[test]
    fn responses_are_bounded_in_size() {
        let mut v = MapView::default();
        let mut s = StreamState::with_max_response_bytes(100);
        for n in ["a", "b", "c"] {
            v.put(n, &"x".repeat(60));
        }
        s.on_request(&req(&["a", "b", "c"], &[])).unwrap();
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["a", "b"]));
        assert_eq!(next(&mut s, &v).unwrap().0, names(&["c"]));
        assert_eq!(next(&mut s, &v), None);
    }

    #[test]
    fn a_client_that_never_acks_does_not_grow_state() {
        let mut v = MapView::default();
        let mut s = StreamState::new();
        s.on_request(&req(&["a"], &[])).unwrap();
        for i in 0..(MAX_IN_FLIGHT * 2) {
            v.put("a", &i.to_string());
            s.mark_changed(TOPIC_ROUTE, &names(&["a"]));
            next(&mut s, &v).unwrap();
        }
        assert_eq!(
            s.summary(TOPIC_ROUTE).unwrap().unacked_nonces.len(),
            MAX_IN_FLIGHT
        );
    }

    #[test]
    fn client_state_acks_nacks_and_reconnects() {
        let mut v = MapView::default();
        let va = v.put("a", "1");
        let mut client = ClientState::new();
        let mut server = StreamState::new();
        let r = client.subscribe(TOPIC_ROUTE, &["a", "b"]).unwrap();
        assert!(client.subscribe(TOPIC_ROUTE, &["a"]).is_none());
        server.on_request(&r).unwrap();
        let resp = server.next_response(TOPIC_ROUTE, &v).unwrap();
        let ack = client.on_response(&resp, None);
        assert!(ack.error_detail.is_none());
        server.on_request(&ack).unwrap();
        assert_eq!(client.version(TOPIC_ROUTE, "a"), Some(va.as_str()));
        // Control plane restart: a new server state, the client offers what it holds.
        let mut server = StreamState::new();
        for r in client.reconnect_requests() {
            server.on_request(&r).unwrap();
        }
        let resp = server.next_response(TOPIC_ROUTE, &v).unwrap();
        assert!(resp.resources.is_empty(), "a is unchanged");
        assert_eq!(resp.removed_resources, names(&["b"]));
        let nack = client.on_response(&resp, Some("no".into()));
        assert_eq!(nack.error_detail.unwrap().message, "no");
        assert_eq!(
            client
                .unsubscribe(TOPIC_ROUTE, &["a"])
                .unwrap()
                .resource_names_unsubscribe,
            names(&["a"])
        );
        assert_eq!(client.version(TOPIC_ROUTE, "a"), None);
    }
}
