//! Connections to brokers: a small pool per endpoint, many requests in flight on each connection
//! (every request gets a fresh opaque; the caller restores the client's), connect and request
//! timeouts, reconnection with exponential backoff, and an in-flight limit per endpoint.
//!
//! Two lanes per endpoint. Ordinary requests share the pool's few connections. Long polls (pulls
//! and pops a broker may park for seconds) get connections of their own, opened as needed with at
//! most the broker's per-connection limit on each: parked polls then can never fill a connection
//! a send is waiting on (head-of-line blocking). A poll whose caller went away still counts on its
//! connection until the broker answers it (or its deadline passes), because the broker holds it
//! that long; the endpoint-wide slot is free at once.
//!
//! Every call ends in exactly one outcome: the response, or an [`UpstreamError`]. A connection that
//! dies fails all its waiting calls at once. Requests a broker sends the other way
//! (CHECK_TRANSACTION_STATE, NOTIFY_CONSUMER_IDS_CHANGED) are handed to the [`Inbound`] channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use super::stats::HostStats;
use crate::remoting::frame::{self, CodecError, FrameLimits};
use crate::remoting::raw::{Outgoing, RawCommand};
use crate::remoting::{RemotingCodec, RemotingCommand};

/// Why an upstream call produced no response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: SocketAddr, reason: String },
    #[error("{address} is in reconnect backoff after {failures} failed connects ({reason})")]
    Backoff {
        address: SocketAddr,
        failures: u32,
        reason: String,
    },
    #[error("no response from {address} within {timeout:?}")]
    Timeout {
        address: SocketAddr,
        timeout: Duration,
    },
    #[error("{address} has {limit} requests in flight, the configured limit")]
    Busy { address: SocketAddr, limit: usize },
    #[error("the connection to {address} closed before the response")]
    Closed { address: SocketAddr },
    #[error("{address} answered with a malformed header: {reason}")]
    Malformed { address: SocketAddr, reason: String },
}

impl UpstreamError {
    /// Overload rather than failure: the client may retry elsewhere or later (SYSTEM_BUSY).
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy { .. })
    }
}

/// A request a broker sent to the sidecar, and the endpoint it came from.
#[derive(Debug)]
pub struct Inbound {
    pub from: SocketAddr,
    pub request: RemotingCommand,
}

/// How to reach one endpoint.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub pool_size: usize,
    /// Ordinary requests in flight to the endpoint; capped further by what `pool_size`
    /// connections of `per_connection` each can carry.
    pub max_in_flight: usize,
    /// What one connection may carry in flight before the broker stops reading from it.
    pub per_connection: usize,
    /// Long polls parked at the endpoint, on connections of their own.
    pub max_parked: usize,
    pub max_frame: usize,
}

impl PoolSettings {
    fn ordinary_limit(&self) -> usize {
        self.max_in_flight
            .min(
                self.pool_size
                    .max(1)
                    .saturating_mul(self.per_connection.max(1)),
            )
            .max(1)
    }

    fn parked_connections(&self) -> usize {
        self.max_parked.div_ceil(self.per_connection.max(1)).max(1)
    }
}

/// How long past its call's deadline an abandoned poll may still be parked at the broker.
const ABANDONED_GRACE: Duration = Duration::from_secs(5);

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Responses a connection's writer may have queued before callers wait.
const WRITE_QUEUE: usize = 1024;
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// A request on its way to a broker; the connection stamps its opaque.
pub enum UpstreamRequest {
    Command(RemotingCommand),
    /// Relayed bytes, with the ext fields to set on the way.
    Raw(RawCommand, Vec<(&'static str, String)>),
}

impl UpstreamRequest {
    fn stamped(self, opaque: i32) -> Outgoing {
        match self {
            UpstreamRequest::Command(mut command) => {
                command.opaque = opaque;
                Outgoing::Command(command)
            }
            UpstreamRequest::Raw(raw, changes) => {
                let changes: Vec<(&str, &str)> = changes
                    .iter()
                    .map(|(key, value)| (*key, value.as_str()))
                    .collect();
                raw.relayed(opaque, &changes)
            }
        }
    }

    fn set_oneway(&mut self) {
        match self {
            UpstreamRequest::Command(command) => command.set_oneway(true),
            // A relayed oneway request already carries the flag.
            UpstreamRequest::Raw(..) => {}
        }
    }
}

struct Connection {
    outbound: mpsc::Sender<Outgoing>,
    waiting: Mutex<HashMap<i32, oneshot::Sender<RawCommand>>>,
    /// Polls whose callers went away, with when the broker must have answered them by.
    abandoned: Mutex<HashMap<i32, Instant>>,
    next_opaque: AtomicI32,
    open: AtomicBool,
    /// Dropped with the connection: its reader then stops and the socket closes. The pool and
    /// each call in flight hold the connection, so a retired pool's connections close once their
    /// last call is answered.
    _alive: oneshot::Sender<()>,
}

impl Connection {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire) && !self.outbound.is_closed()
    }

    /// Requests the broker may still be holding on this connection.
    fn load(&self) -> usize {
        let now = Instant::now();
        let mut abandoned = self
            .abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        abandoned.retain(|_, until| *until > now);
        abandoned.len()
            + self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
    }

    fn fail_all(&self) {
        self.open.store(false, Ordering::Release);
        // Dropping the senders wakes every waiting call with `Closed`.
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    reason: String,
}

/// The connections to one endpoint.
pub struct Pool {
    address: SocketAddr,
    settings: PoolSettings,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
    next_slot: AtomicUsize,
    in_flight: Arc<Semaphore>,
    /// The long-poll lane: its connections, and its endpoint-wide slots.
    parked_connections: tokio::sync::Mutex<Vec<Arc<Connection>>>,
    parked: Arc<Semaphore>,
    backoff: Mutex<Backoff>,
    inbound: mpsc::Sender<Inbound>,
    /// The serving threads' runtimes: slot `i`'s connection runs on runtime `i % len` (on the
    /// caller's runtime when empty).
    runtimes: Arc<[Handle]>,
    pub stats: Arc<HostStats>,
    connects: AtomicU64,
    /// Set when the endpoint left the route table: new connections serve one call and close.
    retired: AtomicBool,
}

impl Pool {
    fn new(
        address: SocketAddr,
        settings: PoolSettings,
        inbound: mpsc::Sender<Inbound>,
        runtimes: Arc<[Handle]>,
        stats: Arc<HostStats>,
    ) -> Self {
        let slots = (0..settings.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Self {
            address,
            in_flight: Arc::new(Semaphore::new(settings.ordinary_limit())),
            parked_connections: tokio::sync::Mutex::new(Vec::new()),
            parked: Arc::new(Semaphore::new(settings.max_parked.max(1))),
            settings,
            slots,
            next_slot: AtomicUsize::new(0),
            backoff: Mutex::new(Backoff::default()),
            inbound,
            runtimes,
            stats,
            connects: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }
    }

    /// Stops keeping connections: each closes once the calls it carries are answered.
    async fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        for slot in &self.slots {
            slot.lock().await.take();
        }
        self.parked_connections.lock().await.clear();
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Whether the endpoint is usable now: not in reconnect backoff.
    pub fn healthy(&self) -> bool {
        let backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
        backoff.until.is_none_or(|until| Instant::now() >= until)
    }

    pub fn consecutive_connect_failures(&self) -> u32 {
        self.backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures
    }

    /// Ordinary requests in flight (parked polls not counted: they do not load the broker).
    pub fn in_flight(&self) -> usize {
        let limit = self.settings.ordinary_limit();
        limit - self.in_flight.available_permits().min(limit)
    }

    /// Long polls parked at the endpoint now.
    pub fn parked(&self) -> usize {
        let limit = self.settings.max_parked.max(1);
        limit - self.parked.available_permits().min(limit)
    }

    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Sends `request` and waits for its response, within `timeout` overall. The response carries
    /// the upstream opaque; the caller restores its own.
    pub async fn call(
        &self,
        request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, UpstreamError> {
        let response = self
            .call_on(Lane::Ordinary, UpstreamRequest::Command(request), timeout)
            .await?;
        self.decoded(&response)
    }

    /// Relays a request as bytes; the response comes back as bytes too (upstream opaque).
    pub async fn relay(
        &self,
        request: UpstreamRequest,
        timeout: Duration,
    ) -> Result<RawCommand, UpstreamError> {
        self.call_on(Lane::Ordinary, request, timeout).await
    }

    fn decoded(&self, response: &RawCommand) -> Result<RemotingCommand, UpstreamError> {
        response.decode().map_err(|error| UpstreamError::Malformed {
            address: self.address,
            reason: error.to_string(),
        })
    }

    /// As [`Pool::call`], for a request the broker may park (a long-polling pull or pop): it
    /// travels on the long-poll lane.
    pub async fn call_parked(
        &self,
        request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, UpstreamError> {
        let response = self
            .call_on(Lane::Parked, UpstreamRequest::Command(request), timeout)
            .await?;
        self.decoded(&response)
    }

    async fn call_on(
        &self,
        lane: Lane,
        request: UpstreamRequest,
        timeout: Duration,
    ) -> Result<RawCommand, UpstreamError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let (slots, limit) = match lane {
            Lane::Ordinary => (&self.in_flight, self.settings.ordinary_limit()),
            Lane::Parked => (&self.parked, self.settings.max_parked),
        };
        // Back-pressure: wait for an in-flight slot within the deadline, else SYSTEM_BUSY. A free
        // slot is taken without arming a timer.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(Ok(permit)),
            Err(_) => tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await,
        };
        let result = match permit {
            Ok(Ok(permit)) => {
                let outcome =
                    tokio::time::timeout_at(deadline, self.exchange(lane, request, deadline))
                        .await
                        .unwrap_or(Err(UpstreamError::Timeout {
                            address: self.address,
                            timeout,
                        }));
                drop(permit);
                outcome
            }
            _ => Err(UpstreamError::Busy {
                address: self.address,
                limit,
            }),
        };
        self.stats.record(started.elapsed(), result.is_ok());
        result
    }

    async fn exchange(
        &self,
        lane: Lane,
        request: UpstreamRequest,
        deadline: tokio::time::Instant,
    ) -> Result<RawCommand, UpstreamError> {
        let connection = match lane {
            Lane::Ordinary => self.connection().await?,
            Lane::Parked => self.parked_connection().await?,
        };
        let opaque = connection.next_opaque.fetch_add(1, Ordering::Relaxed);
        let request = request.stamped(opaque);
        let (sender, receiver) = oneshot::channel();
        connection
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(opaque, sender);
        let closed = UpstreamError::Closed {
            address: self.address,
        };
        if connection.outbound.send(request).await.is_err() {
            connection.fail_all();
            return Err(closed);
        }
        // On timeout the caller drops this future; the guard forgets the waiter either way.
        let guard = WaiterGuard {
            connection: &connection,
            opaque,
            parked_until: (lane == Lane::Parked).then(|| deadline.into_std() + ABANDONED_GRACE),
        };
        let response = receiver.await.map_err(|_| closed);
        drop(guard);
        response
    }

    /// Sends a oneway request: no response is expected or waited for.
    pub async fn send_oneway(&self, request: RemotingCommand) -> Result<(), UpstreamError> {
        self.relay_oneway(UpstreamRequest::Command(request)).await
    }

    /// As [`Pool::send_oneway`], for any request form.
    pub async fn relay_oneway(&self, mut request: UpstreamRequest) -> Result<(), UpstreamError> {
        let connection = self.connection().await?;
        request.set_oneway();
        let request = request.stamped(connection.next_opaque.fetch_add(1, Ordering::Relaxed));
        connection
            .outbound
            .send(request)
            .await
            .map_err(|_| UpstreamError::Closed {
                address: self.address,
            })
    }

    /// An open connection from the pool, connecting (or reconnecting) the next slot if needed.
    async fn connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        // A serving thread keeps to its own slots: the connection's tasks then run on it too.
        let turn = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let index = super::workers::pool_slot(self.slots.len(), turn);
        let Some(slot) = self.slots.get(index) else {
            return Err(UpstreamError::Closed {
                address: self.address,
            });
        };
        // Uncontended, the slot is taken without a trip through the async lock's queue.
        let mut slot = match slot.try_lock() {
            Ok(slot) => slot,
            Err(_) => slot.lock().await,
        };
        if let Some(connection) = slot.as_ref().filter(|connection| connection.is_open()) {
            return Ok(connection.clone());
        }
        let connection = self.connect_with_backoff(Some(index)).await?;
        if !self.retired.load(Ordering::Acquire) {
            *slot = Some(connection.clone());
        }
        Ok(connection)
    }

    /// A long-poll lane connection with room for one more parked request, opening one if all
    /// are full.
    async fn parked_connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        let mut connections = self.parked_connections.lock().await;
        connections.retain(|connection| connection.is_open());
        let per_connection = self.settings.per_connection.max(1);
        if let Some(connection) = connections
            .iter()
            .find(|connection| connection.load() < per_connection)
        {
            return Ok(connection.clone());
        }
        if connections.len() >= self.settings.parked_connections() {
            // Only abandoned polls the broker still holds can fill every connection.
            return Err(UpstreamError::Busy {
                address: self.address,
                limit: self.settings.max_parked,
            });
        }
        let connection = self.connect_with_backoff(None).await?;
        if !self.retired.load(Ordering::Acquire) {
            connections.push(connection.clone());
        }
        Ok(connection)
    }

    /// Connects unless the endpoint is in reconnect backoff; a failure extends the backoff.
    async fn connect_with_backoff(
        &self,
        slot: Option<usize>,
    ) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(error) = self.backoff_error() {
            return Err(error);
        }
        match self.connect(slot).await {
            Ok(connection) => {
                self.connect_succeeded();
                Ok(connection)
            }
            Err(reason) => Err(self.connect_failed(reason)),
        }
    }

    /// The error for a connect attempt while the endpoint is in reconnect backoff.
    pub fn backoff_error(&self) -> Option<UpstreamError> {
        let backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
        backoff
            .until
            .filter(|until| Instant::now() < *until)
            .map(|_| UpstreamError::Backoff {
                address: self.address,
                failures: backoff.failures,
                reason: backoff.reason.clone(),
            })
    }

    /// A connection to the endpoint was made (here or by a client connection's own lane): the
    /// backoff ends.
    pub fn connect_succeeded(&self) {
        *self.backoff.lock().unwrap_or_else(PoisonError::into_inner) = Backoff::default();
    }

    /// A connect failed: the backoff grows. Returns the error the caller reports.
    pub fn connect_failed(&self, reason: String) -> UpstreamError {
        let mut backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
        backoff.failures = backoff.failures.saturating_add(1);
        let delay = BACKOFF_START
            .saturating_mul(1 << backoff.failures.min(16).saturating_sub(1))
            .min(BACKOFF_MAX);
        backoff.until = Some(Instant::now() + delay);
        backoff.reason = reason.clone();
        warn!(address = %self.address, failures = backoff.failures, ?delay, %reason, "upstream connect failed");
        UpstreamError::Connect {
            address: self.address,
            reason,
        }
    }

    /// Opens a socket to the endpoint within the connect timeout (counted in `connects`).
    pub async fn open_socket(&self) -> Result<TcpStream, String> {
        let socket = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(self.address),
        )
        .await
        .map_err(|_| format!("timed out after {:?}", self.settings.connect_timeout))?
        .map_err(|error| error.to_string())?;
        let _ = socket.set_nodelay(true);
        self.connects.fetch_add(1, Ordering::Relaxed);
        Ok(socket)
    }

    /// Takes an ordinary in-flight slot if one is free now. The taker keeps count and gives it
    /// back with [`Pool::give_back_ordinary_slots`]: no permit object, so no reference count on
    /// the semaphore that the threads sharing this pool would write in turn.
    pub fn try_take_ordinary_slot(&self) -> bool {
        self.in_flight
            .try_acquire()
            .map(|slot| slot.forget())
            .is_ok()
    }

    /// Gives back `count` slots taken with [`Pool::try_take_ordinary_slot`].
    pub fn give_back_ordinary_slots(&self, count: usize) {
        if count > 0 {
            self.in_flight.add_permits(count);
        }
    }

    /// Whether the endpoint left the route table (its connections drain and close).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Where a connection's reader and writer run: on its slot's serving thread, so the requests
    /// of that thread's clients and their answers stay on it.
    fn runtime_for(&self, slot: Option<usize>) -> Handle {
        slot.filter(|_| !self.runtimes.is_empty())
            .and_then(|slot| self.runtimes.get(slot % self.runtimes.len()))
            .cloned()
            .unwrap_or_else(Handle::current)
    }

    async fn connect(&self, slot: Option<usize>) -> Result<Arc<Connection>, String> {
        let socket = self.open_socket().await?;
        let limits = FrameLimits {
            max_frame: self.settings.max_frame,
            ..FrameLimits::default()
        };
        let mut framed = Framed::new(socket, RelayCodec(RemotingCodec::new(limits)));
        framed.set_backpressure_boundary(WRITE_BATCH_BYTES);
        let (mut sink, mut stream) = framed.split();
        let (outbound, mut queue) = mpsc::channel::<Outgoing>(WRITE_QUEUE);
        let (alive, mut dropped) = oneshot::channel::<()>();
        let connection = Arc::new(Connection {
            outbound,
            waiting: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(HashMap::new()),
            next_opaque: AtomicI32::new(1),
            open: AtomicBool::new(true),
            _alive: alive,
        });
        let address = self.address;
        let runtime = self.runtime_for(slot);
        runtime.spawn(async move {
            if let Err(error) = write_batches(&mut queue, &mut sink).await {
                debug!(%address, %error, "upstream write failed");
            }
        });
        let reader = Arc::downgrade(&connection);
        let inbound = self.inbound.clone();
        runtime.spawn(async move {
            loop {
                let frame = tokio::select! {
                    frame = stream.next() => frame,
                    _ = &mut dropped => {
                        debug!(%address, "upstream connection no longer used, closing it");
                        break;
                    }
                };
                match frame {
                    Some(Ok(Incoming::Response(command))) => {
                        let Some(connection) = reader.upgrade() else {
                            break;
                        };
                        let waiter = connection
                            .waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&command.opaque);
                        match waiter {
                            Some(waiter) => {
                                let _ = waiter.send(command);
                            }
                            None => {
                                connection
                                    .abandoned
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .remove(&command.opaque);
                                debug!(%address, opaque = command.opaque, "late or unknown response dropped")
                            }
                        }
                    }
                    Some(Ok(Incoming::Request(request))) => {
                        if inbound
                            .try_send(Inbound {
                                from: address,
                                request,
                            })
                            .is_err()
                        {
                            warn!(%address, "broker request dropped: the relay queue is full");
                        }
                    }
                    Some(Err(error)) if error.is_closed_connection() => {
                        debug!(%address, %error, "upstream connection closed");
                        break;
                    }
                    Some(Err(error)) => {
                        warn!(%address, %error, "malformed frame from upstream, closing the connection");
                        break;
                    }
                    None => {
                        debug!(%address, "upstream closed the connection");
                        break;
                    }
                }
            }
            if let Some(connection) = reader.upgrade() {
                connection.fail_all();
            }
        });
        Ok(connection)
    }
}

/// What a broker sends: responses stay bytes for the relay; requests (transaction checks,
/// consumer notices) are decoded for the sidecar to handle.
enum Incoming {
    Response(RawCommand),
    Request(RemotingCommand),
}

/// The upstream codec: writes either form, reads frames as [`Incoming`].
struct RelayCodec(RemotingCodec);

impl tokio_util::codec::Decoder for RelayCodec {
    type Item = Incoming;
    type Error = CodecError;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Incoming>, CodecError> {
        let limits = self.0.limits();
        let Some(bytes) = frame::split_frame(src, &limits)? else {
            return Ok(None);
        };
        if let Some(raw) = RawCommand::scan(&bytes, &limits) {
            return Ok(Some(if raw.is_response() {
                Incoming::Response(raw)
            } else {
                Incoming::Request(raw.decode()?)
            }));
        }
        // A header the scanner declines: decode it in full, and re-encode a response so the
        // relay gets bytes it can vouch for.
        let command = frame::decode_frame(bytes, &limits)?;
        if !command.is_response() {
            return Ok(Some(Incoming::Request(command)));
        }
        RawCommand::from_command(&command, &limits)
            .map(|raw| Some(Incoming::Response(raw)))
            .ok_or(CodecError::HeaderTooLarge {
                size: limits.max_header,
                max: limits.max_header,
            })
    }
}

impl tokio_util::codec::Encoder<Outgoing> for RelayCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Outgoing, dst: &mut bytes::BytesMut) -> Result<(), CodecError> {
        self.0.encode(item, dst)
    }
}

/// Writes what `queue` yields, as few writes as it takes. Requests that arrive together (the
/// sends of one client read) get a turn to join the batch: when a drain found more than one, the
/// writer yields once before writing, so a burst costs one write; a lone request goes at once.
async fn write_batches<S>(
    queue: &mut mpsc::Receiver<Outgoing>,
    sink: &mut S,
) -> Result<(), S::Error>
where
    S: futures::Sink<Outgoing> + Unpin,
{
    while let Some(first) = queue.recv().await {
        sink.feed(first).await?;
        let mut drained = 1;
        while let Ok(next) = queue.try_recv() {
            sink.feed(next).await?;
            drained += 1;
        }
        if drained > 1 {
            tokio::task::yield_now().await;
            while let Ok(next) = queue.try_recv() {
                sink.feed(next).await?;
            }
        }
        sink.flush().await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Ordinary,
    Parked,
}

/// Forgets a waiter whose call ended (answered, timed out or cancelled). An unanswered poll is
/// remembered as abandoned until `parked_until`: the broker still holds it on the connection.
struct WaiterGuard<'a> {
    connection: &'a Connection,
    opaque: i32,
    parked_until: Option<Instant>,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let unanswered = self
            .connection
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.opaque)
            .is_some();
        if let Some(until) = self.parked_until.filter(|_| unanswered) {
            self.connection
                .abandoned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(self.opaque, until);
        }
    }
}

/// Every pool, by endpoint address, created on first use.
pub struct Upstreams {
    pools: DashMap<SocketAddr, Arc<Pool>, foldhash::fast::RandomState>,
    inbound: mpsc::Sender<Inbound>,
    max_frame: usize,
    runtimes: Arc<[Handle]>,
}

impl Upstreams {
    /// `runtimes`: the serving threads' runtimes, which pool slots' connections run on.
    pub fn new(inbound: mpsc::Sender<Inbound>, max_frame: usize, runtimes: Vec<Handle>) -> Self {
        Self {
            pools: DashMap::default(),
            inbound,
            max_frame,
            runtimes: runtimes.into(),
        }
    }

    /// Hands a request a broker sent on a connection outside the pools to the relay.
    pub fn deliver(&self, from: SocketAddr, request: RemotingCommand) {
        if self.inbound.try_send(Inbound { from, request }).is_err() {
            warn!(%from, "broker request dropped: the relay queue is full");
        }
    }

    /// The pool for `address`, made with `settings` the first time.
    pub fn pool(
        &self,
        address: SocketAddr,
        settings: impl FnOnce() -> (PoolSettings, Arc<HostStats>),
    ) -> Arc<Pool> {
        if let Some(pool) = self.pools.get(&address) {
            return pool.clone();
        }
        self.pools
            .entry(address)
            .or_insert_with(|| {
                let (mut settings, stats) = settings();
                settings.max_frame = self.max_frame;
                Arc::new(Pool::new(
                    address,
                    settings,
                    self.inbound.clone(),
                    self.runtimes.clone(),
                    stats,
                ))
            })
            .clone()
    }

    pub fn existing(&self, address: SocketAddr) -> Option<Arc<Pool>> {
        self.pools.get(&address).map(|pool| pool.clone())
    }

    /// Whether `address` can take a request now: not in reconnect backoff (an endpoint never
    /// used yet counts as connectable).
    pub fn connectable(&self, address: SocketAddr) -> bool {
        self.pools.get(&address).is_none_or(|pool| pool.healthy())
    }

    /// Drops the pools of endpoints not in `keep`; their connections drain (each closes after
    /// its last call in flight is answered).
    pub fn retain(&self, keep: &std::collections::HashSet<SocketAddr>) {
        let mut retired = Vec::new();
        self.pools.retain(|address, pool| {
            let stays = keep.contains(address);
            if !stays {
                retired.push(pool.clone());
            }
            stays
        });
        for pool in retired {
            debug!(address = %pool.address, "endpoint left the routes: draining its connections");
            tokio::spawn(async move { pool.retire().await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::{RequestCode, ResponseCode};
    use tokio::net::TcpListener;

    const LIMIT: Duration = Duration::from_secs(10);

    fn pool(address: SocketAddr, max_in_flight: usize) -> (Pool, mpsc::Receiver<Inbound>) {
        let (inbound, relayed) = mpsc::channel(8);
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(2),
            pool_size: 1,
            max_in_flight,
            per_connection: 1024,
            max_parked: 64,
            max_frame: 1 << 20,
        };
        let stats = Arc::new(HostStats::new("c", "b", address));
        (
            Pool::new(address, settings, inbound, Arc::from([]), stats),
            relayed,
        )
    }

    /// A broker stand-in that first sends a request of its own. With `reverse_pairs` it reads two
    /// requests and answers the second first, so answers must be matched by opaque; otherwise it
    /// answers each after `delay`.
    async fn fake_broker(
        delay: Duration,
        reverse_pairs: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let mut framed = Framed::new(socket, RemotingCodec::default());
            let mut notice = RemotingCommand::request(RequestCode::NOTIFY_CONSUMER_IDS_CHANGED, 7);
            notice.set_oneway(true);
            let _ = framed.send(notice).await;
            let answer = |request: &RemotingCommand| {
                RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_remark(format!(
                    "answer to {}",
                    request.ext("n").unwrap_or_default()
                ))
            };
            while let Some(Ok(first)) = framed.next().await {
                let mut batch = vec![first];
                if reverse_pairs && let Some(Ok(second)) = framed.next().await {
                    batch.push(second);
                }
                tokio::time::sleep(delay).await;
                for request in batch.iter().rev() {
                    if framed.send(answer(request)).await.is_err() {
                        return;
                    }
                }
            }
        });
        (address, task)
    }

    fn settings_for(address: SocketAddr) -> (PoolSettings, Arc<HostStats>) {
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(2),
            pool_size: 1,
            max_in_flight: 4,
            per_connection: 1024,
            max_parked: 64,
            max_frame: 1 << 20,
        };
        (settings, Arc::new(HostStats::new("c", "b", address)))
    }

    fn numbered(n: usize) -> RemotingCommand {
        let mut request = RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 99);
        request.ext_fields.insert("n".into(), n.to_string());
        request
    }

    #[tokio::test]
    async fn concurrent_calls_share_a_connection_and_get_their_own_answers() {
        let (address, _broker) = fake_broker(Duration::ZERO, true).await;
        let (pool, mut relayed) = pool(address, 64);
        let calls = (0..20).map(|n| pool.call(numbered(n), LIMIT));
        let answers = futures::future::join_all(calls).await;
        for (n, answer) in answers.into_iter().enumerate() {
            let answer = answer.expect("answered");
            assert_eq!(
                answer.remark.as_deref(),
                Some(format!("answer to {n}").as_str())
            );
        }
        assert_eq!(pool.connects(), 1, "one connection carried every call");
        let notice = tokio::time::timeout(LIMIT, relayed.recv())
            .await
            .expect("in time")
            .expect("relayed");
        assert_eq!(
            notice.request.request_code(),
            RequestCode::NOTIFY_CONSUMER_IDS_CHANGED
        );
        assert_eq!(notice.from, address);
    }

    #[tokio::test]
    async fn a_refused_connect_fails_then_backs_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        drop(listener);
        let (inbound, _relayed) = mpsc::channel(8);
        let upstreams = Upstreams::new(inbound, 1 << 20, Vec::new());
        assert!(upstreams.connectable(address), "never tried: connectable");
        let pool = upstreams.pool(address, || settings_for(address));
        let first = pool.call(numbered(0), LIMIT).await;
        assert!(
            matches!(first, Err(UpstreamError::Connect { .. })),
            "{first:?}"
        );
        assert!(!pool.healthy());
        assert!(
            !upstreams.connectable(address),
            "the balancer skips it while it backs off"
        );
        let second = pool.call(numbered(1), LIMIT).await;
        assert!(
            matches!(second, Err(UpstreamError::Backoff { failures: 1, .. })),
            "{second:?}"
        );
        assert_eq!(pool.stats.errors(), 2);
    }

    #[tokio::test]
    async fn slow_answers_time_out_and_the_in_flight_limit_answers_busy() {
        let (address, _broker) = fake_broker(Duration::from_millis(500), false).await;
        let (pool, _relayed) = pool(address, 1);
        let timed_out = pool.call(numbered(0), Duration::from_millis(100)).await;
        assert!(
            matches!(timed_out, Err(UpstreamError::Timeout { .. })),
            "{timed_out:?}"
        );
        let (slow, busy) = tokio::join!(
            pool.call(numbered(1), LIMIT),
            pool.call(numbered(2), Duration::from_millis(100))
        );
        assert!(slow.is_ok(), "{slow:?}");
        assert!(
            matches!(busy, Err(UpstreamError::Busy { limit: 1, .. })),
            "{busy:?}"
        );
    }

    #[tokio::test]
    async fn a_retired_pool_answers_its_calls_then_closes_its_connections() {
        let (address, broker) = fake_broker(Duration::from_millis(200), false).await;
        let (inbound, _relayed) = mpsc::channel(8);
        let upstreams = Upstreams::new(inbound, 1 << 20, Vec::new());
        let pool = upstreams.pool(address, || settings_for(address));
        let in_flight = tokio::spawn({
            let pool = pool.clone();
            async move { pool.call(numbered(7), LIMIT).await }
        });
        // Retire once the call is on the wire.
        while pool.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        upstreams.retain(&Default::default());
        assert!(upstreams.existing(address).is_none());
        let answer = in_flight.await.expect("join").expect("answered");
        assert_eq!(answer.remark.as_deref(), Some("answer to 7"));
        drop(pool);
        // The broker's side sees the connection close: its serving task ends.
        tokio::time::timeout(LIMIT, broker)
            .await
            .expect("the retired connection closed")
            .expect("join");
    }

    #[tokio::test]
    async fn a_dying_connection_fails_its_waiting_calls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        // Accepts, reads one request, and hangs up without answering.
        let broker = tokio::spawn(async move {
            if let Ok((socket, _)) = listener.accept().await {
                let mut framed = Framed::new(socket, RemotingCodec::default());
                let _ = framed.next().await;
            }
        });
        let (pool, _relayed) = pool(address, 4);
        let outcome = pool.call(numbered(0), LIMIT).await;
        assert!(
            matches!(outcome, Err(UpstreamError::Closed { .. })),
            "{outcome:?}"
        );
        let _ = broker.await;
    }
}
