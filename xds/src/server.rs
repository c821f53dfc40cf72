//! The delta ADS server (and delta CDS): one task per stream driving a [`StreamState`] from
//! the client's requests and the store's change feed, with a bounded outgoing queue so a slow
//! client only ever slows itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{Event, Harness, now_ms};
use crate::protocol::{Ack, Lookup, ResourceView, StreamState};
use crate::resource::VersionedResource;
use crate::spec::invalid_cluster;
use crate::store::{Change, Resolver, Store};
use crate::types;

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Responses queued per stream before its task waits for the client.
    pub queue_depth: usize,
    /// How long the resolver may take for a name before it is answered as absent.
    pub resolve_timeout: Duration,
    /// After pushing a Cluster, push its ClusterLoadAssignment again to streams subscribed to
    /// it: Envoy finishes warming an updated EDS cluster only on an endpoint response.
    pub resend_endpoints_after_cluster: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            queue_depth: 16,
            resolve_timeout: Duration::from_secs(5),
            resend_endpoints_after_cluster: true,
        }
    }
}

/// The delta xDS server. Cheap to clone; every clone serves the same store and harness.
#[derive(Clone)]
pub struct XdsServer {
    store: Arc<Store>,
    harness: Arc<Harness>,
    resolver: Option<Arc<dyn Resolver>>,
    config: ServerConfig,
    /// Set by [`serve`]: turns true (or its sender goes away) when that serve shuts down, and
    /// every stream it opened then ends.
    stop: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer")
            .field("config", &self.config)
            .field("resolver", &self.resolver.is_some())
            .finish()
    }
}

/// Response stream of a delta RPC.
pub type DeltaStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
/// State-of-the-world is not served; this stream type only exists to satisfy the traits.
pub type SotwStream = tokio_stream::Empty<Result<DiscoveryResponse, Status>>;

impl XdsServer {
    pub fn new(store: Arc<Store>, harness: Arc<Harness>) -> Self {
        Self {
            store,
            harness,
            resolver: None,
            config: ServerConfig::default(),
            stop: None,
        }
    }

    /// Consults `resolver` for subscribed names the store lacks.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn harness(&self) -> &Arc<Harness> {
        &self.harness
    }

    /// The tonic ADS service.
    pub fn ads_service(&self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self.clone())
    }

    /// The tonic CDS service (delta only), for clients using a separate ODCDS stream.
    pub fn cds_service(&self) -> ClusterDiscoveryServiceServer<Self> {
        ClusterDiscoveryServiceServer::new(self.clone())
    }

    fn open(
        &self,
        inbound: Streaming<DeltaDiscoveryRequest>,
        fixed_type: Option<&'static str>,
    ) -> DeltaStream {
        let (tx, rx) = mpsc::channel(self.config.queue_depth.max(1));
        let (id, close) = self.harness.open_stream();
        // Subscribed before the task starts, so no change made after the RPC began is missed.
        let changes = self.store.subscribe();
        let task = StreamTask {
            stop: self.stop.clone(),
            server: self.clone(),
            id,
            node: String::new(),
            fixed_type,
            state: StreamState::new(),
            out: tx,
        };
        tokio::spawn(task.run(inbound, changes, close));
        ReceiverStream::new(rx)
    }
}

/// Serves ADS and CDS on `listener` until `shutdown` completes.
///
/// On shutdown the listener is closed at once and every stream opened through this call ends
/// with `UNAVAILABLE` ("control plane shutting down"), so the graceful drain finishes and clients
/// reconnect (to a successor on the same port, say) instead of holding the old process open:
/// xDS streams never end on their own, and an HTTP/2 GOAWAY does not end them either.
/// Dropping the returned future ends those streams too.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut server: XdsServer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    server.stop = Some(stop_rx);
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(server.ads_service())
        .add_service(server.cds_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await
}

/// Completes when the serve that opened a stream shuts down (never for a stream opened outside
/// [`serve`]).
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        // An error means the sender is gone: the serve future was dropped.
        Some(rx) => drop(rx.wait_for(|stop| *stop).await),
        None => std::future::pending().await,
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world xDS is not served; use delta (DELTA_GRPC)",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(Response::new(self.open(request.into_inner(), None)))
    }
}

#[tonic::async_trait]
impl ClusterDiscoveryService for XdsServer {
    type StreamClustersStream = SotwStream;
    type DeltaClustersStream = DeltaStream;

    async fn stream_clusters(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world CDS is not served; use delta (DELTA_GRPC)",
        ))
    }

    async fn delta_clusters(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(Response::new(
            self.open(request.into_inner(), Some(types::CLUSTER)),
        ))
    }

    async fn fetch_clusters(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "REST/fetch CDS is not served; use delta (DELTA_GRPC)",
        ))
    }
}

/// The store as one stream sees it, faults applied.
struct StreamView<'a> {
    store: &'a Store,
    harness: &'a Harness,
}

impl ResourceView for StreamView<'_> {
    fn lookup(&self, type_url: &str, name: &str) -> Lookup {
        if self.harness.is_silenced(type_url, name) {
            return Lookup::Withheld;
        }
        match self.store.get(type_url, name) {
            Some(_) if self.harness.is_invalid(type_url, name) => {
                Lookup::Present(Arc::new(invalid_resource(type_url, name)))
            }
            Some(r) => Lookup::Present(r),
            None if self.store.is_resolving(type_url, name) => Lookup::Withheld,
            None => Lookup::Absent,
        }
    }

    fn names(&self, type_url: &str) -> Vec<String> {
        self.store.names(type_url)
    }
}

/// A resource the client must reject: a Cluster of type EDS without an EDS config (Envoy's
/// "cannot create an EDS cluster without an EDS config"), or bytes that do not decode.
fn invalid_resource(type_url: &str, name: &str) -> VersionedResource {
    if type_url == types::CLUSTER {
        VersionedResource::from_cluster(&invalid_cluster(name))
    } else {
        // 0xff starts a varint that never ends: no message decodes from it.
        VersionedResource::from_bytes(name, type_url, vec![0xff])
    }
}

/// Why a stream task stops.
enum Stop {
    /// The client went away (or its response stream was dropped).
    Gone,
    /// A protocol error or a harness close, reported to the client as this status.
    Status(Status),
}

struct StreamTask {
    server: XdsServer,
    stop: Option<watch::Receiver<bool>>,
    id: u64,
    node: String,
    fixed_type: Option<&'static str>,
    state: StreamState,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl StreamTask {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut changes: broadcast::Receiver<Arc<Change>>,
        mut close: oneshot::Receiver<String>,
    ) {
        tracing::debug!(stream = self.id, "stream opened");
        let stop = loop {
            let mut push_at = None;
            tokio::select! {
                reason = &mut close => {
                    let reason = reason.unwrap_or_else(|_| "harness gone".to_owned());
                    break Stop::Status(Status::unavailable(reason));
                }
                () = stopped(&mut self.stop) => {
                    break Stop::Status(Status::unavailable("control plane shutting down"));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = self.on_request(req) {
                            break Stop::Status(status);
                        }
                    }
                    Ok(None) => break Stop::Gone,
                    Err(status) => {
                        tracing::debug!(stream = self.id, %status, "client stream error");
                        break Stop::Gone;
                    }
                },
                change = changes.recv() => {
                    let mut next = Some(change);
                    // Coalesce whatever else is already queued into one round of responses.
                    while let Some(change) = next {
                        match change {
                            Ok(change) => {
                                push_at = Some(push_at.map_or(change.at, |at: Instant| at.min(change.at)));
                                if change.whole_type {
                                    self.state.mark_resync_type(&change.type_url);
                                } else {
                                    self.state.mark_changed(&change.type_url, &change.names);
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::debug!(stream = self.id, missed = n, "change feed lagged; full resync");
                                self.state.mark_resync();
                            }
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                        next = match changes.try_recv() {
                            Ok(c) => Some(Ok(c)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
                            Err(_) => None,
                        };
                    }
                }
            }
            if self.flush(push_at).await.is_err() {
                break Stop::Gone;
            }
        };
        let reason = match stop {
            Stop::Gone => "client went away".to_owned(),
            Stop::Status(status) => {
                let reason = status.message().to_owned();
                // Best effort: the client may already be gone.
                let _ = self.out.try_send(Err(status));
                reason
            }
        };
        tracing::debug!(stream = self.id, node = %self.node, %reason, "stream closed");
        self.server.harness.close_recorded(self.id, &reason);
    }

    fn on_request(&mut self, mut req: DeltaDiscoveryRequest) -> Result<(), Status> {
        let harness = &self.server.harness;
        if self.node.is_empty() {
            // Later requests may omit the node; the first one that has it names the stream.
            if let Some(node) = req.node.as_ref().filter(|n| !n.id.is_empty()) {
                self.node = node.id.clone();
                harness.set_node(self.id, &self.node);
            }
        }
        if let Some(fixed) = self.fixed_type {
            if req.type_url.is_empty() {
                req.type_url = fixed.to_owned();
            } else if req.type_url != fixed {
                return Err(Status::invalid_argument(format!(
                    "this service serves {fixed}, not {}",
                    req.type_url
                )));
            }
        }
        let outcome = self
            .state
            .on_request(&req)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(Ack::Nack { error, .. }) = &outcome.ack {
            tracing::warn!(stream = self.id, node = %self.node, type_url = %req.type_url, %error, "NACK");
        }
        harness.record(
            self.id,
            Event::Request {
                at_ms: now_ms(),
                type_url: req.type_url.clone(),
                subscribe: req.resource_names_subscribe,
                unsubscribe: req.resource_names_unsubscribe,
                initial_versions: req.initial_resource_versions.into_iter().collect(),
                nonce: req.response_nonce,
                ack: outcome.ack,
            },
        );
        if let Some(resolver) = &self.server.resolver {
            for name in &outcome.interest {
                self.server.store.resolve_missing(
                    resolver,
                    self.server.config.resolve_timeout,
                    &req.type_url,
                    name,
                );
            }
        }
        if let Some(summary) = self.state.summary(&req.type_url) {
            harness.update_type(self.id, &req.type_url, summary);
        }
        Ok(())
    }

    /// Sends whatever is due, type by type. Err when the client is gone.
    async fn flush(&mut self, push_at: Option<Instant>) -> Result<(), ()> {
        // Until a round sends nothing: a response may be capped, or a Cluster may force its
        // endpoints.
        loop {
            let mut sent_any = false;
            for type_url in self.state.types_with_work() {
                sent_any |= self.send_next(&type_url, push_at).await?;
            }
            if !sent_any {
                return Ok(());
            }
        }
    }

    /// Sends (or drops, per faults) the next response of one type. Err when the client is gone.
    async fn send_next(&mut self, type_url: &str, push_at: Option<Instant>) -> Result<bool, ()> {
        let type_url = type_url.to_owned();
        {
            let view = StreamView {
                store: &self.server.store,
                harness: &self.server.harness,
            };
            let Some(resp) = self.state.next_response(&type_url, &view) else {
                return Ok(false);
            };
            let harness = &self.server.harness;
            if let Some(summary) = self.state.summary(&type_url) {
                harness.update_type(self.id, &type_url, summary);
            }
            let names = resp
                .resources
                .iter()
                .map(|r| r.name.as_str())
                .chain(resp.removed_resources.iter().map(String::as_str));
            let fault = harness.response_fault(&type_url, names);
            harness.record(
                self.id,
                Event::Response {
                    at_ms: now_ms(),
                    type_url: type_url.clone(),
                    nonce: resp.nonce.clone(),
                    resources: resp
                        .resources
                        .iter()
                        .map(|r| (r.name.clone(), r.version.clone()))
                        .collect::<BTreeMap<_, _>>(),
                    removed: resp.removed_resources.clone(),
                    dropped: fault.drop,
                    delayed_ms: fault
                        .delay
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                },
            );
            if type_url == types::CLUSTER && self.server.config.resend_endpoints_after_cluster {
                let clusters: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
                self.state.force(types::CLUSTER_LOAD_ASSIGNMENT, &clusters);
            }
            if fault.drop {
                tracing::debug!(stream = self.id, nonce = %resp.nonce, "response dropped by fault");
                return Ok(true);
            }
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(at) = push_at {
                harness.record_push(at.elapsed());
            }
            self.out.send(Ok(resp)).await.map_err(|_| ())?;
            Ok(true)
        }
    }
}
