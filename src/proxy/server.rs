//! Listeners and downstream connections, and the sidecar's lifecycle: start, then a graceful
//! shutdown that stops accepting, lets requests in flight finish until a deadline, and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::config::{ConfigError, SidecarConfig};
use super::direct::{DirectSends, Handover};
use super::dispatch::{self, Downstream};
use super::listeners::BrokerListeners;
use super::output::Output;
use super::routes::{RouteTable, Routes};
use super::stats::ProxyStats;
use super::upstream::Upstreams;
use super::{Proxy, relay};
use crate::inbound::{ConnectionGate, FrameReader, ReadError};
use crate::log_throttle::LogThrottle;
use crate::remoting::RemotingCommand;
use crate::remoting::frame;
use crate::remoting::raw::{Outgoing, RawCommand};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the serving threads: {0}")]
    Workers(std::io::Error),
}

/// Broker requests waiting to be relayed before new ones are dropped.
const RELAY_QUEUE: usize = 1024;

/// Lines a peer can provoke at will are logged at most once a second (`skipped` counts the rest).
static MALFORMED_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static REFUSED_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static TIMEOUT_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// A started sidecar.
pub struct RunningSidecar {
    /// The bound address of each configured listener, in order.
    pub listeners: Vec<SocketAddr>,
    /// The bound admin address, when the admin server is on.
    pub admin: Option<SocketAddr>,
    pub proxy: Arc<Proxy>,
    /// Accept loops: each ends once its connections have answered what they were serving.
    serving: JoinSet<()>,
    /// Admin server and relay.
    background: JoinSet<()>,
}

/// Binds every listener (and the admin server) and starts serving.
pub async fn start(config: SidecarConfig) -> Result<RunningSidecar, SidecarError> {
    let table = RouteTable::from_config(&config)?;
    let mut bound = Vec::new();
    for listener_config in &config.listeners {
        let listener = TcpListener::bind(listener_config.address)
            .await
            .map_err(|source| SidecarError::Bind {
                address: listener_config.address,
                source,
            })?;
        let local = listener.local_addr().map_err(|source| SidecarError::Bind {
            address: listener_config.address,
            source,
        })?;
        let advertised: Arc<str> = listener_config
            .advertised_address
            .clone()
            .unwrap_or_else(|| local.to_string())
            .into();
        bound.push((listener, local, advertised));
    }
    let Some((_, main_local, main_advertised)) = bound.first() else {
        return Err(ConfigError::Invalid {
            field: "listeners".into(),
            reason: "at least one listener is needed".into(),
        }
        .into());
    };
    let broker_listeners = BrokerListeners::new(&config, *main_local, main_advertised)?;
    let (inbound_sender, inbound) = mpsc::channel(RELAY_QUEUE);
    let workers = super::workers::Workers::start(config.workers).map_err(SidecarError::Workers)?;
    let (shutdown, _) = watch::channel(false);
    let proxy = Arc::new(Proxy {
        routes: Routes::new(RouteTable::default()),
        upstreams: Upstreams::new(
            inbound_sender,
            config.limits.max_frame_size,
            workers.handles(),
        ),
        clients: Default::default(),
        stats: ProxyStats::new(config.limits.max_topic_series),
        clusters: Default::default(),
        checks: Default::default(),
        next_queue: AtomicUsize::new(0),
        next_connection: AtomicU64::new(0),
        gate: ConnectionGate::new(
            config.limits.max_connections,
            config.limits.max_connections_per_peer,
        ),
        read_budget: Arc::new(crate::inbound::BufferBudget::new(
            config.limits.max_buffered_bytes,
        )),
        draining: AtomicBool::new(false),
        broker_listeners,
        pullpop: super::pullpop::PullPop::new(config.consume.clone()),
        shutdown,
        current: ArcSwap::from_pointee(config.clone()),
        ondemand: std::sync::OnceLock::new(),
        workers,
        config,
    });
    proxy.install_routes(table);
    let mut serving = JoinSet::new();
    let mut background = JoinSet::new();
    if let Some(xds) = &proxy.config.xds {
        let ondemand = super::ondemand::OnDemand::start(xds.clone(), &proxy);
        let _ = proxy.ondemand.set(ondemand.clone());
        background.spawn(ondemand.sweep_forever());
    }
    let mut listeners = Vec::new();
    for (listener, local, advertised) in bound {
        info!(listen = %local, %advertised, "sidecar listening");
        listeners.push(local);
        let stop = Stop::new(proxy.shutdown.subscribe(), None);
        serving.spawn(accept(proxy.clone(), listener, advertised, None, stop));
    }
    let admin = match proxy.config.admin.address {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| SidecarError::Bind { address, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| SidecarError::Bind { address, source })?;
            info!(admin = %local, "admin endpoint listening");
            background.spawn(crate::admin::serve(listener, proxy.clone()));
            Some(local)
        }
        None => None,
    };
    background.spawn(relay::run(proxy.clone(), inbound));
    background.spawn(super::failover::health_checks(proxy.clone()));
    background.spawn(super::pullpop::PullPop::renew(proxy.clone()));
    Ok(RunningSidecar {
        listeners,
        admin,
        proxy,
        serving,
        background,
    })
}

/// When a connection or accept loop stops: at shutdown, or when its broker listener retires.
#[derive(Clone)]
pub struct Stop {
    shutdown: watch::Receiver<bool>,
    retired: Option<watch::Receiver<bool>>,
}

impl Stop {
    pub fn new(shutdown: watch::Receiver<bool>, retired: Option<watch::Receiver<bool>>) -> Self {
        Self { shutdown, retired }
    }

    /// Resolves once either signal is raised (or its sender is gone).
    pub async fn wait(&mut self) {
        let shutdown = self.shutdown.wait_for(|stop| *stop);
        match &mut self.retired {
            Some(retired) => {
                tokio::select! {
                    _ = shutdown => {}
                    _ = retired.wait_for(|stop| *stop) => {}
                }
            }
            None => {
                let _ = shutdown.await;
            }
        }
    }
}

impl RunningSidecar {
    /// Stops accepting, lets requests in flight finish until the configured drain deadline, then
    /// closes every connection.
    pub async fn shutdown(mut self) {
        self.proxy.draining.store(true, Ordering::Release);
        let _ = self.proxy.shutdown.send(true);
        for task in self.proxy.broker_listeners.take_tasks() {
            self.serving.spawn(async move {
                let _ = task.await;
            });
        }
        let deadline = Duration::from_millis(self.proxy.config.limits.drain_timeout_ms);
        let serving = &mut self.serving;
        let drained = tokio::time::timeout(deadline, async {
            while serving.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                active = self.proxy.stats.requests_active(),
                "drain deadline passed with requests in flight"
            );
        }
        self.serving.abort_all();
        self.background.abort_all();
        if let Some(ondemand) = self.proxy.ondemand() {
            ondemand.stop();
        }
        while self.serving.join_next().await.is_some() {}
        while self.background.join_next().await.is_some() {}
        info!("sidecar stopped");
    }
}

/// Accepts client connections on `listener` until `stop`; `broker` is the broker name of a broker
/// listener, the identity of every connection accepted there.
pub(super) async fn accept(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    advertised: Arc<str>,
    broker: Option<Arc<str>>,
    mut stop: Stop,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.wait() => break,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: back off briefly instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admission = match proxy.gate.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(refusal) => {
                if let Some(skipped) = REFUSED_LOG.allow() {
                    warn!(%peer, %refusal, skipped, "client connection refused");
                }
                continue;
            }
        };
        let downstream = Downstream {
            connection: proxy.next_connection.fetch_add(1, Ordering::Relaxed),
            peer,
            advertised: advertised.clone(),
            broker: broker.clone(),
        };
        // The socket moves to a serving thread's reactor: registered with this accept loop's,
        // each of its events would wake this runtime first and then the serving thread.
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(error) => {
                debug!(%peer, %error, "cannot hand the connection to a serving thread");
                continue;
            }
        };
        let (proxy_for_connection, stop_for_connection) = (proxy.clone(), stop.clone());
        connections.spawn_on(
            async move {
                match TcpStream::from_std(socket) {
                    Ok(socket) => {
                        serve_connection(
                            proxy_for_connection,
                            downstream,
                            socket,
                            stop_for_connection,
                        )
                        .await
                    }
                    Err(error) => debug!(%peer, %error, "cannot serve the connection"),
                }
                drop(admission);
            },
            proxy.workers.next(),
        );
        // Reap finished connections so the set does not grow with churn.
        while connections.try_join_next().is_some() {}
    }
    // Free the port at once (a retired broker's port may be wanted again).
    drop(listener);
    // Connections stop reading on the same signal and end once their requests are answered.
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    downstream: Downstream,
    socket: TcpStream,
    mut stop: Stop,
) {
    let _connection = proxy.stats.connection();
    let _ = socket.set_nodelay(true);
    let read_limits = proxy.config.limits.read_limits();
    let (reader, writer) = socket.into_split();
    let mut output = Output::new(writer, read_limits.frame);
    let mut stream = FrameReader::new(reader, read_limits, proxy.read_budget.clone());
    let in_flight = proxy.config.limits.max_in_flight_per_connection;
    let (outbound, mut responses) = mpsc::channel::<Outgoing>(in_flight);
    proxy.clients.connected(
        downstream.connection,
        outbound.clone(),
        downstream.broker.clone(),
    );
    let peer = downstream.peer;
    debug!(%peer, connection = downstream.connection, "client connected");

    let downstream = Arc::new(downstream);
    let permits = Arc::new(Semaphore::new(in_flight));
    // Requests waiting on a broker run inside this task (no task per request); long polls get
    // tasks of their own, so a client that leaves can have them aborted.
    let mut handlers: FuturesUnordered<HandlerFuture> = FuturesUnordered::new();
    let mut polls = JoinSet::new();
    // Plain sends travel on this connection's own upstream connections, served right here.
    let mut direct = proxy
        .config
        .direct_sends
        .then(|| DirectSends::new(proxy.clone(), read_limits.frame));
    let general = GeneralPath {
        proxy: &proxy,
        downstream: &downstream,
        outbound: &outbound,
    };
    let mut stopping = false;
    // One wait for the connection's life: made anew each turn, it would take the shutdown
    // signal's lock and join and leave its waiter list (shared by every connection) each time.
    let stopped = stop.wait();
    tokio::pin!(stopped);
    loop {
        // Frames already whole in the read buffer are handled back to back: the work and the
        // waits below run once per read, not once per frame.
        let buffered = (permits.available_permits() > 0 && output.has_room())
            .then(|| stream.buffered_frame())
            .flatten();
        let frame = match buffered {
            Some(frame) => Some(frame),
            None => {
                if let Some(direct) = &mut direct {
                    direct.write_idle_lanes();
                }
                // Everything answered so far goes out in one write, once nothing else is ready:
                // settle the handlers that can finish now first. (Polling them here with a no-op
                // waker is safe: the select below polls them again with this task's.)
                while let Some(Some(())) = handlers.next().now_or_never() {}
                if let Some(direct) = &mut direct {
                    settle_direct(direct, &mut output, &mut handlers, &general);
                }
                while output.has_room()
                    && let Ok(response) = responses.try_recv()
                {
                    output.push(response);
                }
                output.write_now();
                if output.failed() {
                    break;
                }
                let direct_active = direct.as_ref().is_some_and(DirectSends::is_active);
                let direct_unflushed = direct.as_ref().is_some_and(DirectSends::has_unflushed);
                let busy = || permits.available_permits() < in_flight;
                // Back-pressure: stop reading while this connection has too many requests in
                // flight, or while the client does not read its answers.
                let room = permits.available_permits() > 0 && output.has_room();
                tokio::select! {
                    biased;
                    Some(()) = handlers.next(), if !handlers.is_empty() => continue,
                    () = progress(&mut direct), if direct_active => continue,
                    Some(response) = responses.recv(), if output.has_room() => {
                        output.push(response);
                        continue;
                    }
                    () = output.writable(), if output.has_pending() => continue,
                    Some(_) = polls.join_next(), if !polls.is_empty() => continue,
                    frame = stream.next_frame(busy), if room => frame,
                    // Sends gathered for the brokers go out once the client has no more to read
                    // now, after one turn for the other connections of this thread (their
                    // answers and sends).
                    () = tokio::task::yield_now(), if direct_unflushed => {
                        if let Some(direct) = &mut direct {
                            direct.write_now();
                        }
                        continue;
                    }
                    () = &mut stopped => {
                        stopping = true;
                        break;
                    }
                }
            }
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                log_read_error(&proxy, peer, &error);
                break;
            }
            None => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            break;
        };
        // Sends travel as bytes: only their routing fields are read and rewritten.
        if let Some(raw) = RawCommand::scan(&frame, &read_limits.frame).filter(dispatch::relayable)
        {
            let handover = match &mut direct {
                Some(direct) => direct.take(raw, permit, stream.last_read()),
                None => Some(Handover::untried(raw, permit)),
            };
            if let Some(handover) = handover {
                handlers.push(general.relay(handover));
            }
            continue;
        }
        let request = match frame::decode_frame(frame, &read_limits.frame) {
            Ok(command) if command.is_response() => {
                // Clients answer broker requests (e.g. a transaction check) with END_TRANSACTION,
                // not with responses; a stray response has nowhere to go.
                debug!(%peer, opaque = command.opaque, "response from a client dropped");
                continue;
            }
            Ok(command) => command,
            Err(error) => {
                log_read_error(&proxy, peer, &error.into());
                break;
            }
        };
        let handled = Handled {
            proxy: proxy.clone(),
            downstream: downstream.clone(),
            request,
            outbound: outbound.clone(),
            permit,
        };
        if dispatch::may_park(&handled.request) {
            polls.spawn(handled.run());
        } else {
            handlers.push(Box::pin(handled.run()));
        }
    }
    if !stopping {
        // The client is gone: nobody can take a parked poll's messages, so give its slot back
        // now rather than when the broker answers.
        polls.abort_all();
    }
    // Answer what is in flight (graceful shutdown aborts this task at its deadline).
    loop {
        let direct_pending = match &mut direct {
            Some(direct) => {
                settle_direct(direct, &mut output, &mut handlers, &general);
                direct.write_now();
                direct.has_pending()
            }
            None => false,
        };
        if handlers.is_empty() && polls.is_empty() && !direct_pending {
            break;
        }
        tokio::select! {
            Some(()) = handlers.next(), if !handlers.is_empty() => {}
            Some(_) = polls.join_next(), if !polls.is_empty() => {}
            () = progress(&mut direct), if direct_pending => {}
            Some(response) = responses.recv() => output.push(response),
        }
    }
    drop(direct);
    dispatch::client_disconnected(&proxy, &downstream);
    drop(outbound);
    while let Ok(response) = responses.try_recv() {
        output.push(response);
    }
    output.finish().await;
    debug!(%peer, connection = downstream.connection, "client disconnected");
}

/// Without a decoded header there is no opaque to answer: the connection closes, and the line is
/// throttled because a peer can provoke it at will.
fn log_read_error(proxy: &Proxy, peer: SocketAddr, error: &ReadError) {
    match error {
        error if error.is_closed_connection() => debug!(%peer, %error, "client connection closed"),
        ReadError::Idle(_) => debug!(%peer, %error, "closing an idle client connection"),
        ReadError::FrameTimeout { .. } | ReadError::BudgetExhausted { .. } => {
            if let Some(skipped) = TIMEOUT_LOG.allow() {
                warn!(%peer, %error, skipped, "closing the client connection");
            }
        }
        error => {
            proxy.stats.decode_error();
            if let Some(skipped) = MALFORMED_LOG.allow() {
                warn!(%peer, %error, skipped, "malformed frame from client, closing its connection");
            }
        }
    }
}

/// One decoded request, ready to run.
struct Handled {
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    request: RemotingCommand,
    outbound: mpsc::Sender<Outgoing>,
    permit: OwnedSemaphorePermit,
}

impl Handled {
    async fn run(self) {
        if let Some(response) = dispatch::handle(&self.proxy, &self.downstream, self.request).await
        {
            let _ = self.outbound.send(response).await;
        }
        drop(self.permit);
    }
}

type HandlerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What a send handed to the general path needs from its connection.
struct GeneralPath<'a> {
    proxy: &'a Arc<Proxy>,
    downstream: &'a Arc<Downstream>,
    outbound: &'a mpsc::Sender<Outgoing>,
}

impl GeneralPath<'_> {
    fn relay(&self, handover: Handover) -> HandlerFuture {
        relay_request(
            self.proxy.clone(),
            self.downstream.clone(),
            handover,
            self.outbound.clone(),
        )
    }
}

fn relay_request(
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    handover: Handover,
    outbound: mpsc::Sender<Outgoing>,
) -> HandlerFuture {
    Box::pin(async move {
        let Handover {
            request,
            permit,
            failed,
        } = handover;
        let response = match failed {
            None => dispatch::handle_relayed(&proxy, &downstream, request).await,
            Some(failed) => dispatch::resend_relayed(&proxy, &downstream, request, failed).await,
        };
        if let Some(response) = response {
            let _ = outbound.send(response).await;
        }
        drop(permit);
    })
}

/// Moves what the connection's lanes produced on: answers to the client's output, sends they
/// gave up on to the general path.
fn settle_direct(
    direct: &mut DirectSends,
    output: &mut Output,
    handlers: &mut FuturesUnordered<HandlerFuture>,
    general: &GeneralPath<'_>,
) {
    if !direct.has_output() {
        return;
    }
    let (answers, handovers) = direct.drain();
    for answer in answers {
        output.push(answer);
    }
    for handover in handovers {
        handlers.push(general.relay(handover));
    }
}

/// Resolves when the lanes made progress (never without lanes).
async fn progress(direct: &mut Option<DirectSends>) {
    match direct {
        Some(direct) => direct.progress().await,
        None => std::future::pending().await,
    }
}
