//! The broker's TCP front: accepts connections, decodes frames, runs each request on its own task
//! (so a parked pull never blocks the sends behind it) and writes responses back in completion
//! order, as remoting allows.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::codec::FramedWrite;
use tracing::{debug, info, warn};

use super::handlers;
use super::state::BrokerState;
use crate::inbound::{BufferBudget, ConnectionGate, FrameReader, ReadError};
use crate::log_throttle::LogThrottle;
use crate::remoting::raw::Outgoing;
use crate::remoting::{RemotingCodec, RemotingCommand};

/// Lines a peer can provoke at will are logged at most once a second (`skipped` counts the rest).
static MALFORMED_LOG: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(1));
static REFUSED_LOG: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(1));
static TIMEOUT_LOG: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(1));

/// Accepts connections on `listener` until `shutdown` completes, then flushes the store.
pub async fn serve(
    listener: TcpListener,
    state: Arc<BrokerState>,
    shutdown: impl Future<Output = ()>,
) {
    let housekeeper = tokio::spawn(housekeeping(state.clone()));
    let scheduler = tokio::spawn(deliver_delayed(state.clone()));
    let checker = tokio::spawn(check_transactions(state.clone()));
    let next_connection = AtomicU64::new(1);
    let gate = ConnectionGate::new(
        state.config.max_connections,
        state.config.max_connections_per_peer,
    );
    let budget = Arc::new(BufferBudget::new(state.config.max_buffered_bytes));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: keep serving the connections we have.
                warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admission = match gate.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(refusal) => {
                if let Some(skipped) = REFUSED_LOG.allow() {
                    warn!(%peer, %refusal, skipped, "connection refused");
                }
                continue;
            }
        };
        let connection = next_connection.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            serve_connection(state, connection, peer, socket, budget).await;
            drop(admission);
        });
    }
    housekeeper.abort();
    scheduler.abort();
    checker.abort();
    info!("broker stopping: flushing the store");
    if let Err(error) = state.store.flush() {
        warn!(%error, "final flush failed");
    }
    if let Err(error) = state.metadata.persist() {
        warn!(%error, "final metadata persist failed");
    }
}

/// How many response bytes may queue before the writer must flush them.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

async fn serve_connection(
    state: Arc<BrokerState>,
    connection: u64,
    peer: SocketAddr,
    socket: TcpStream,
    budget: Arc<BufferBudget>,
) {
    let _ = socket.set_nodelay(true);
    let read_limits = state.config.read_limits();
    let (reader, writer) = socket.into_split();
    let mut sink = FramedWrite::new(writer, RemotingCodec::new(read_limits.frame));
    sink.set_backpressure_boundary(WRITE_BATCH_BYTES);
    let mut stream = FrameReader::new(reader, read_limits, budget);
    let (outbound, mut responses) =
        mpsc::channel::<Outgoing>(state.config.max_in_flight_per_connection);
    state.clients.connected(connection, outbound.clone(), None);
    debug!(%peer, connection, "connected");

    let writer = tokio::spawn(async move {
        // Queue every response that is ready, then flush once: one write for many responses.
        while let Some(command) = responses.recv().await {
            let mut written = sink.feed(command).await;
            while written.is_ok() {
                match responses.try_recv() {
                    Ok(command) => written = sink.feed(command).await,
                    Err(_) => break,
                }
            }
            if let Err(error) = written.and(SinkExt::<Outgoing>::flush(&mut sink).await) {
                debug!(%error, "write failed");
                break;
            }
        }
    });
    let max_in_flight = state.config.max_in_flight_per_connection;
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let busy = || in_flight.available_permits() < max_in_flight;
    while let Some(frame) = stream.next(busy).await {
        let request = match frame {
            Ok(command) if command.is_response() => continue,
            Ok(command) => command,
            Err(error) => {
                log_read_error(peer, &error);
                break;
            }
        };
        // Back-pressure: stop reading while this connection has too many requests in flight.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut handled = Box::pin(handle_request(
            state.clone(),
            connection,
            peer,
            request,
            outbound.clone(),
            permit,
        ));
        // Most requests (a send under async flush, an offset query) finish without waiting: run
        // them here and save a task per request. Parked pulls and pops and fsync waits go on as
        // their own task, so they never hold up the requests behind them.
        if futures::poll!(handled.as_mut()).is_pending() {
            tokio::spawn(handled);
        }
    }
    state.clients.disconnected(connection);
    drop(outbound);
    // The writer ends once every in-flight handler has dropped its sender.
    let _ = writer.await;
    debug!(%peer, connection, "disconnected");
}

/// Without a decoded header there is no opaque to answer: the connection closes, and the line is
/// throttled because a peer can provoke it at will.
fn log_read_error(peer: SocketAddr, error: &ReadError) {
    match error {
        error if error.is_closed_connection() => debug!(%peer, %error, "connection closed"),
        ReadError::Idle(_) => debug!(%peer, %error, "closing an idle connection"),
        ReadError::FrameTimeout { .. } | ReadError::BudgetExhausted { .. } => {
            if let Some(skipped) = TIMEOUT_LOG.allow() {
                warn!(%peer, %error, skipped, "closing the connection");
            }
        }
        error => {
            if let Some(skipped) = MALFORMED_LOG.allow() {
                warn!(%peer, %error, skipped, "malformed frame, closing the connection");
            }
        }
    }
}

async fn handle_request(
    state: Arc<BrokerState>,
    connection: u64,
    peer: SocketAddr,
    request: RemotingCommand,
    outbound: mpsc::Sender<Outgoing>,
    permit: OwnedSemaphorePermit,
) {
    if let Some(response) = handlers::handle(&state, connection, peer, request).await {
        let _ = outbound.send(response.into()).await;
    }
    drop(permit);
}

/// Periodic work: metadata to disk, index checkpoints, retention.
async fn housekeeping(state: Arc<BrokerState>) {
    let period = std::time::Duration::from_millis(state.config.persist_interval_ms.max(100));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let state = state.clone();
        // fsync and file deletion block; keep them off the request threads.
        let outcome = tokio::task::spawn_blocking(move || {
            state.metadata.persist()?;
            state.store.flush()?;
            // Only after the flush: delivered messages are on disk before progress says so.
            state.scheduler.persist()?;
            let max_bytes =
                (state.config.retention_bytes > 0).then_some(state.config.retention_bytes);
            let max_age = (state.config.retention_hours > 0)
                .then(|| std::time::Duration::from_secs(state.config.retention_hours * 3600));
            let report = state.store.apply_retention(max_bytes, max_age)?;
            if report.segments_deleted > 0 {
                info!(
                    segments = report.segments_deleted,
                    bytes = report.bytes_deleted,
                    min_offset = report.min_offset,
                    "retention deleted old commit-log segments"
                );
            }
            Ok::<(), crate::broker::store::StoreError>(())
        })
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "housekeeping failed"),
            Err(error) => warn!(%error, "housekeeping task failed"),
        }
    }
}

/// Moves delayed messages to their topics when due.
async fn deliver_delayed(state: Arc<BrokerState>) {
    // Bounded so that a clock jump or a missed wake-up costs at most this long.
    const LONGEST_NAP: std::time::Duration = std::time::Duration::from_millis(500);
    loop {
        let scheduled = state.scheduled.notified();
        tokio::pin!(scheduled);
        scheduled.as_mut().enable();
        let now = crate::broker::schedule::now_ms();
        let task_state = state.clone();
        match tokio::task::spawn_blocking(move || {
            task_state.scheduler.deliver_due(&task_state.store, now)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(_)) => state.arrivals.notify_all(),
            Ok(Err(error)) => warn!(%error, "delivering delayed messages failed"),
            Err(error) => warn!(%error, "delayed delivery task failed"),
        }
        let nap = state
            .scheduler
            .next_due()
            .map(|due| {
                std::time::Duration::from_millis(
                    due.saturating_sub(crate::broker::schedule::now_ms()).max(1) as u64,
                )
            })
            .unwrap_or(LONGEST_NAP)
            .min(LONGEST_NAP);
        let _ = tokio::time::timeout(nap, scheduled).await;
    }
}

/// Asks producers about half messages left undecided.
async fn check_transactions(state: Arc<BrokerState>) {
    let config = &state.config;
    let period = std::time::Duration::from_millis(
        (config.transaction_check_interval_ms / 4).clamp(100, 5_000),
    );
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let next_opaque = std::sync::atomic::AtomicI32::new(i32::MAX / 2);
    loop {
        ticker.tick().await;
        let task_state = state.clone();
        let checks = tokio::task::spawn_blocking(move || {
            let config = &task_state.config;
            task_state.transactions.due_checks(
                &task_state.store,
                crate::broker::schedule::now_ms(),
                config.transaction_timeout_ms as i64,
                config.transaction_check_interval_ms as i64,
                config.transaction_check_max,
            )
        })
        .await;
        let checks = match checks {
            Ok(Ok(checks)) => checks,
            Ok(Err(error)) => {
                warn!(%error, "transaction check scan failed");
                continue;
            }
            Err(error) => {
                warn!(%error, "transaction check task failed");
                continue;
            }
        };
        for check in checks {
            let Some(producer) = state
                .clients
                .producer_connection(&check.producer_group, None)
            else {
                debug!(group = %check.producer_group, "no live producer to check a transaction with");
                continue;
            };
            let uniq_key = check.message.uniq_key().map(str::to_owned);
            let header = crate::remoting::header::CheckTransactionStateRequestHeader {
                topic: Some(check.message.topic.clone()),
                tran_state_table_offset: check.half_queue_offset as i64,
                commit_log_offset: check.commit_offset as i64,
                msg_id: uniq_key.clone(),
                transaction_id: uniq_key,
                offset_msg_id: Some(check.message.offset_msg_id()),
                // As Java 5.x: clients echo it in END_TRANSACTION, so proxies can route the answer.
                broker_name: Some(state.config.broker_name.clone()),
                ..Default::default()
            };
            let opaque = next_opaque.fetch_add(1, Ordering::Relaxed);
            let mut request = RemotingCommand::request(
                crate::remoting::RequestCode::CHECK_TRANSACTION_STATE,
                opaque,
            )
            .with_header(&header)
            .with_body(check.body);
            request.set_oneway(true);
            let _ = producer.try_send(request.into());
        }
    }
}
