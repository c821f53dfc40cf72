//! Sends relayed on upstream connections a client connection owns ("lanes"), driven by the
//! connection's own task: a send is scanned, routed and rewritten straight into its lane's write
//! buffer, and its answer is read, matched and written back in the same task. No channel, writer
//! task, waiter map, oneshot or boxed future sits between the client and the broker, and one timer
//! serves every send in flight.
//!
//! Only the plain case travels here: a send (not oneway) whose route is known now, not ordered and
//! not a transaction's half message, to a broker with a free in-flight slot. Everything else, and
//! a send whose lane failed it (the connection died or timed out, or the broker answered busy),
//! goes to the general path in `dispatch`, which retries on another broker.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use super::Proxy;
use super::dispatch::{self, SendKeys};
use super::outbox::{Outbox, WRITE_PIECES};
use super::routes::Endpoint;
use super::topic_cache::{SendTopic, TopicCache};
use super::upstream::{Pool, UpstreamError};
use crate::balance::{Outcome, Picked};
use crate::remoting::frame::{self, FrameLimits};
use crate::remoting::message::sys_flag;
use crate::remoting::raw::{Outgoing, RawCommand, RawHead};
use crate::remoting::{FLAG_ONEWAY, RequestCode, ResponseCode};

/// A lane with this many sends written and unanswered holds new ones until an answer arrives
/// (or `COALESCE_BYTES` gather): a deep pipeline is clocked by its answers, so sends go out in
/// batches, as they do from an L4 proxy that reads late. A shallow one writes at once.
const COALESCE_DEPTH: usize = 8;
/// Measured (same-run A/B, send 4×64): 16 KiB spent ~4% less CPU per send than 32 KiB, 64 KiB
/// ~10% more; holding sends longer idles the broker between batches.
const COALESCE_BYTES: usize = 16 * 1024;
/// Bytes a lane reads per turn before it lets the connection's other work run.
const READ_TURN: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// A send the general path takes over, with the connection's in-flight slot it holds.
pub struct Handover {
    pub request: RawCommand,
    pub permit: OwnedSemaphorePermit,
    /// The broker it failed on, when it was tried here first.
    pub failed: Option<SocketAddr>,
}

impl Handover {
    /// A send the lanes did not take: the general path sends it as if it came straight there.
    pub fn untried(request: RawCommand, permit: OwnedSemaphorePermit) -> Self {
        Self {
            request,
            permit,
            failed: None,
        }
    }
}

/// The lanes of one client connection and what they produced for it.
pub struct DirectSends {
    proxy: Arc<Proxy>,
    limits: FrameLimits,
    lanes: Vec<Lane>,
    /// Fires at the earliest deadline of a send in flight.
    timer: Option<Pin<Box<Sleep>>>,
    /// Answers for the client, and sends for the general path.
    answers: Vec<Outgoing>,
    handovers: Vec<Handover>,
    /// Reused space for a rewritten header.
    scratch: Vec<u8>,
    topics: TopicCache,
    /// The client connection's in-flight slots of the sends here.
    connection_slots: HeldSlots,
    /// Turns the queue choice: each connection rotates on its own (no counter shared between
    /// threads), starting where the sidecar-wide rotation stood when it opened.
    next_queue: usize,
}

struct Lane {
    address: SocketAddr,
    pool: Arc<Pool>,
    state: LaneState,
    read: BytesMut,
    write: Outbox,
    /// Sends in flight, in the order they were written: slot `i` has opaque `base + i`, and a
    /// slot is `None` once answered. Deadlines follow the same order.
    waiting: VecDeque<Option<Pending>>,
    base: i32,
    live: usize,
    /// Set once a flush is due: the lane's turn then writes what the socket takes. Until then,
    /// sends gather in `write`, so that those read together go out in one write.
    flushing: bool,
    /// Sends in `write` not yet taken by the socket.
    buffered: usize,
    /// The pool's in-flight slots taken for the sends on this lane, and of those, how many
    /// belong to sends that have ended (given back at the next `release_settled_slots`).
    endpoint_slots: usize,
    endpoint_slots_finished: usize,
}

enum LaneState {
    Connecting(Pin<Box<dyn Future<Output = Result<TcpStream, String>> + Send>>),
    Open(TcpStream),
    Closed,
}

struct Pending {
    request: RawCommand,
    started: Instant,
    deadline: Instant,
    endpoint: Arc<Endpoint>,
    route: Arc<SendTopic>,
    picked: Picked<SocketAddr>,
    messages: u64,
}

/// Where a send goes, once routing said it can travel here.
struct Plan {
    endpoint: Arc<Endpoint>,
    route: Arc<SendTopic>,
    picked: Picked<SocketAddr>,
    pool: Arc<Pool>,
    keys: SendKeys,
    queues: i32,
}

impl DirectSends {
    pub fn new(proxy: Arc<Proxy>, limits: FrameLimits) -> Self {
        let next_queue = proxy.next_queue.fetch_add(1, Ordering::Relaxed);
        Self {
            proxy,
            limits,
            lanes: Vec::new(),
            timer: None,
            answers: Vec::new(),
            handovers: Vec::new(),
            scratch: Vec::new(),
            topics: TopicCache::default(),
            connection_slots: HeldSlots::default(),
            next_queue,
        }
    }

    /// Whether any lane is open or opening (its socket needs watching).
    pub fn is_active(&self) -> bool {
        !self.lanes.is_empty()
    }

    /// Sends still waiting for their answer.
    pub fn has_pending(&self) -> bool {
        self.lanes.iter().any(|lane| lane.live > 0)
    }

    /// Takes `request` when it can travel on a lane; otherwise hands it back for the general path.
    #[must_use]
    /// `arrived` is when the client's bytes came: the send's latency and deadline count from it.
    pub fn take(
        &mut self,
        request: RawCommand,
        permit: OwnedSemaphorePermit,
        arrived: Instant,
    ) -> Option<Handover> {
        let Some(plan) = self.plan(&request) else {
            return Some(Handover::untried(request, permit));
        };
        let Plan {
            endpoint,
            route,
            picked,
            pool,
            keys,
            queues,
        } = plan;
        let Some(index) = self.lane_for(&pool) else {
            route.cluster.balancer.release(picked);
            return Some(Handover::untried(request, permit));
        };
        let queue = (self.next_queue % queues as usize) as i32;
        self.next_queue = self.next_queue.wrapping_add(1);
        let mut digits = itoa::Buffer::new();
        let changes = [
            (keys.queue, digits.format(queue)),
            (keys.bname, endpoint.metadata.broker_name.as_str()),
        ];
        let Some(lane) = self.lanes.get_mut(index) else {
            route.cluster.balancer.release(picked);
            return Some(Handover::untried(request, permit));
        };
        // Never refused in practice: a connection's permits share one semaphore.
        if !self.connection_slots.holds_same(&permit) || !lane.pool.try_take_ordinary_slot() {
            route.cluster.balancer.release(picked);
            return Some(Handover::untried(request, permit));
        }
        let opaque = lane
            .base
            .wrapping_add(i32::try_from(lane.waiting.len()).unwrap_or(i32::MAX));
        let written = request.write_relayed_head(
            opaque,
            &changes,
            &self.limits,
            &mut self.scratch,
            lane.write.heads(),
        );
        if let Err(error) = written {
            debug!(%error, "send not relayed on the client's lane");
            route.cluster.balancer.release(picked);
            lane.pool.give_back_ordinary_slots(1);
            return Some(Handover::untried(request, permit));
        }
        lane.write.push_body(&request.body);
        self.connection_slots.hold(permit);
        lane.endpoint_slots += 1;
        self.proxy.stats.request(request.code);
        self.proxy.stats.request_began();
        route.cluster.record_send();
        let messages = if request.code == RequestCode::SEND_BATCH_MESSAGE.0 {
            dispatch::count_records(&request.body)
        } else {
            1
        };
        let started = arrived;
        let deadline = started + endpoint.request_timeout;
        lane.waiting.push_back(Some(Pending {
            request,
            started,
            deadline,
            endpoint,
            route,
            picked,
            messages,
        }));
        lane.live += 1;
        lane.buffered += 1;
        match &mut self.timer {
            Some(timer) if timer.deadline() <= deadline => {}
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        None
    }

    /// Writes now the sends of lanes that had nothing in flight before them: once the client's
    /// read is handled, a lone request (a synchronous producer) waits for nothing, and the sends
    /// of one read still go out together.
    pub fn write_idle_lanes(&mut self) {
        for index in 0..self.lanes.len() {
            if self
                .lanes
                .get(index)
                .is_some_and(|lane| lane.live == lane.buffered && !lane.write.is_empty())
            {
                self.flush_lane(index);
            }
        }
    }

    fn plan(&mut self, request: &RawCommand) -> Option<Plan> {
        if request.flag & FLAG_ONEWAY != 0 {
            return None;
        }
        let keys = SendKeys::choose(request.has_plain_ext("b"));
        let topic = request.ext(keys.topic).ok()??;
        let max_message_size = self.proxy.config.limits.max_message_size;
        if max_message_size > 0 && request.body.len() > max_message_size {
            return None;
        }
        let half_message = request
            .ext(keys.sys_flag)
            .ok()
            .flatten()
            .and_then(|flag| flag.parse::<i32>().ok())
            .is_some_and(|flag| {
                flag & dispatch::TRANSACTION_TYPE_MASK == sys_flag::TRANSACTION_PREPARED
            });
        if half_message {
            return None;
        }
        let route = self.topics.resolve(&self.proxy, topic, request.code)?;
        let action = &route.action;
        if action.ordered {
            return None;
        }
        let (endpoint, picked) = route.cluster.pick(
            &action.cluster,
            action,
            |endpoint| action.writable(endpoint),
            // An open lane proves its endpoint reachable without a look at the shared pools.
            |address| self.has_open_lane(address) || self.proxy.upstreams.connectable(address),
            &[],
        )?;
        // An open lane knows its pool (no lookup) and proves the endpoint reachable (no backoff
        // to check).
        let open_lane = self.lanes.iter().find(|lane| {
            lane.address == endpoint.address
                && matches!(lane.state, LaneState::Open(_))
                && !lane.pool.is_retired()
        });
        let pool = match open_lane {
            Some(lane) => lane.pool.clone(),
            None => self.proxy.pool(&endpoint),
        };
        let usable = open_lane.is_some() || (!pool.is_retired() && pool.backoff_error().is_none());
        if !usable {
            route.cluster.balancer.release(picked);
            return None;
        }
        let queues = action.write_queues(&endpoint).max(1);
        Some(Plan {
            endpoint,
            route,
            picked,
            pool,
            keys,
            queues,
        })
    }

    fn has_open_lane(&self, address: SocketAddr) -> bool {
        self.lanes
            .iter()
            .any(|lane| lane.address == address && matches!(lane.state, LaneState::Open(_)))
    }

    /// The lane to `pool`'s endpoint, opened if there is none. `None` while an older lane to the
    /// same address (of a retired pool) still has sends in flight.
    fn lane_for(&mut self, pool: &Arc<Pool>) -> Option<usize> {
        let address = pool.address();
        if let Some(index) = self.lanes.iter().position(|lane| lane.address == address) {
            let lane = self.lanes.get_mut(index)?;
            let current = Arc::ptr_eq(&lane.pool, pool);
            if current && !matches!(lane.state, LaneState::Closed) {
                return Some(index);
            }
            if lane.live > 0 {
                return None;
            }
            self.lanes.swap_remove(index);
        }
        let opening = pool.clone();
        self.lanes.push(Lane {
            address,
            pool: pool.clone(),
            state: LaneState::Connecting(Box::pin(async move { opening.open_socket().await })),
            read: BytesMut::new(),
            write: Outbox::default(),
            waiting: VecDeque::new(),
            base: 1,
            live: 0,
            flushing: false,
            buffered: 0,
            endpoint_slots: 0,
            endpoint_slots_finished: 0,
        });
        Some(self.lanes.len() - 1)
    }

    /// Whether sends wait in a lane's buffer for [`DirectSends::write_now`].
    pub fn has_unflushed(&self) -> bool {
        self.lanes
            .iter()
            .any(|lane| !lane.flushing && !lane.write.is_empty() && !lane.holds())
    }

    /// Writes what each open lane's socket takes now, without waiting; what it does not take is
    /// written by the lane's turns as the socket drains.
    pub fn write_now(&mut self) {
        for index in 0..self.lanes.len() {
            self.flush_lane(index);
        }
    }

    fn flush_lane(&mut self, index: usize) {
        let Some(lane) = self.lanes.get_mut(index) else {
            return;
        };
        if lane.write.is_empty() || lane.holds() {
            return;
        }
        lane.flushing = true;
        let LaneState::Open(stream) = &lane.state else {
            return;
        };
        let mut failed = None;
        while !lane.write.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_PIECES];
            let count = lane.write.slices(&mut slices);
            match stream.try_write_vectored(slices.get(..count).unwrap_or_default()) {
                Ok(0) => {
                    failed = Some(std::io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(written) => lane.write.advance(written),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        lane.flushed_if_empty();
        if let Some(error) = failed {
            self.close_lane(index, &error.to_string());
            self.release_settled_slots();
        }
    }

    /// Moves what the lanes produced out: answers for the client, sends for the general path.
    pub fn drain(&mut self) -> (std::vec::Drain<'_, Outgoing>, std::vec::Drain<'_, Handover>) {
        (self.answers.drain(..), self.handovers.drain(..))
    }

    pub fn has_output(&self) -> bool {
        !self.answers.is_empty() || !self.handovers.is_empty()
    }

    /// Resolves once a lane made progress: an answer or handover is ready, a lane opened or
    /// closed, or a deadline passed.
    pub async fn progress(&mut self) {
        std::future::poll_fn(|cx| self.poll_progress(cx)).await
    }

    fn poll_progress(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut progressed = false;
        for index in 0..self.lanes.len() {
            progressed |= self.poll_lane(index, cx);
        }
        if let Some(timer) = &mut self.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            self.expire();
            progressed = true;
        }
        let before = self.lanes.len();
        self.lanes.retain(|lane| {
            let spent = matches!(lane.state, LaneState::Closed) || lane.pool.is_retired();
            !(spent && lane.live == 0)
        });
        progressed |= self.lanes.len() != before;
        self.release_settled_slots();
        if progressed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// One lane's turn: finish connecting, write, read and settle answers.
    fn poll_lane(&mut self, index: usize, cx: &mut Context<'_>) -> bool {
        let Some(lane) = self.lanes.get_mut(index) else {
            return false;
        };
        let mut progressed = false;
        if let LaneState::Connecting(connecting) = &mut lane.state {
            match connecting.as_mut().poll(cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(stream)) => {
                    lane.pool.connect_succeeded();
                    lane.state = LaneState::Open(stream);
                    lane.flushing = true;
                    progressed = true;
                }
                Poll::Ready(Err(reason)) => {
                    let error = lane.pool.connect_failed(reason);
                    self.fail_lane(index, &error);
                    return true;
                }
            }
        }
        let LaneState::Open(stream) = &mut lane.state else {
            return progressed;
        };
        let mut read = 0;
        let mut ended = None;
        while read < READ_TURN {
            if lane.read.capacity() - lane.read.len() < READ_CHUNK / 4 {
                lane.read.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut lane.read) {
                Poll::Ready(Ok(0)) => {
                    ended = Some("the broker closed the connection".to_owned());
                    break;
                }
                Poll::Ready(Ok(count)) => read += count,
                Poll::Ready(Err(error)) => {
                    ended = Some(error.to_string());
                    break;
                }
                Poll::Pending => break,
            }
        }
        if read > 0 {
            progressed = true;
            self.settle_frames(index);
        }
        if let Some(reason) = ended {
            self.close_lane(index, &reason);
            return true;
        }
        let Some(lane) = self.lanes.get_mut(index) else {
            return progressed;
        };
        // Answers came: what they held back goes now.
        if read > 0 && !lane.write.is_empty() && !lane.holds() {
            lane.flushing = true;
        }
        let LaneState::Open(stream) = &mut lane.state else {
            return progressed;
        };
        while lane.flushing && !lane.write.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_PIECES];
            let count = lane.write.slices(&mut slices);
            let pieces = slices.get(..count).unwrap_or_default();
            match Pin::new(&mut *stream).poll_write_vectored(cx, pieces) {
                Poll::Ready(Ok(0)) => {
                    self.close_lane(index, "the broker stopped taking bytes");
                    return true;
                }
                Poll::Ready(Ok(written)) => {
                    lane.write.advance(written);
                    progressed = true;
                }
                Poll::Ready(Err(error)) => {
                    self.close_lane(index, &error.to_string());
                    return true;
                }
                Poll::Pending => break,
            }
        }
        lane.flushed_if_empty();
        progressed
    }

    /// Handles every whole frame a lane read.
    fn settle_frames(&mut self, index: usize) {
        let mut answered_at = None;
        loop {
            let Some(lane) = self.lanes.get_mut(index) else {
                return;
            };
            let address = lane.address;
            let bytes = match frame::split_frame(&mut lane.read, &self.limits) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return,
                Err(error) => {
                    warn!(%address, %error, "malformed frame from upstream, closing the connection");
                    self.close_lane(index, &format!("malformed frame: {error}"));
                    return;
                }
            };
            // Only an answer's top level is read: its ext fields pass through unread.
            let response = match RawHead::scan(&bytes, &self.limits) {
                Some(head) if head.is_response() => head,
                scanned => {
                    // A broker's request, or a header the scanner declines: decoded in full; a
                    // response is then re-encoded so the relay holds bytes it can vouch for.
                    let decoded = match scanned {
                        Some(head) => head.decode(),
                        None => frame::decode_frame(bytes, &self.limits),
                    };
                    match decoded {
                        Ok(command) if !command.is_response() => {
                            self.proxy.upstreams.deliver(address, command);
                            continue;
                        }
                        Ok(command) => match RawCommand::from_command(&command, &self.limits) {
                            Some(raw) => RawHead::from(raw),
                            None => continue,
                        },
                        Err(error) => {
                            warn!(%address, %error, "malformed frame from upstream, closing the connection");
                            self.close_lane(index, &format!("malformed frame: {error}"));
                            return;
                        }
                    }
                }
            };
            let slot = response.opaque.wrapping_sub(lane.base) as u32 as usize;
            let Some(pending) = lane.waiting.get_mut(slot).and_then(Option::take) else {
                debug!(%address, opaque = response.opaque, "late or unknown response dropped");
                continue;
            };
            lane.live -= 1;
            lane.endpoint_slots_finished += 1;
            lane.forget_answered();
            // One clock read serves every answer of this read.
            let now = *answered_at.get_or_insert_with(Instant::now);
            lane.pool.stats.record(now - pending.started, true);
            self.answered(address, pending, response, now);
        }
    }

    /// A broker's answer to `pending`.
    fn answered(&mut self, address: SocketAddr, pending: Pending, response: RawHead, now: Instant) {
        let elapsed = now - pending.started;
        let code = response.code;
        let busy =
            code == ResponseCode::SYSTEM_BUSY.0 || code == ResponseCode::SERVICE_NOT_AVAILABLE.0;
        let outcome = if busy {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        pending
            .route
            .cluster
            .balancer
            .report(pending.picked, outcome);
        if busy && now < pending.deadline && pending.route.cluster.may_retry(1) {
            debug!(%address, "send failed, retrying on another broker");
            self.hand_over(pending.request, address, pending.endpoint);
            return;
        }
        self.connection_slots.finish_one();
        if code == ResponseCode::SUCCESS.0 {
            pending
                .route
                .record_sent(&self.proxy.stats, pending.messages, elapsed);
        }
        self.proxy.stats.response(code);
        self.proxy.stats.request_ended();
        self.answers
            .push(Outgoing::Answer(response, pending.request.opaque));
    }

    /// `pending` got no answer: it goes to the general path while a retry fits its deadline and
    /// the cluster's budget, else its client hears why.
    fn failed(&mut self, address: SocketAddr, pending: Pending, error: &UpstreamError) {
        if let Some(lane) = self.lanes.iter().find(|lane| lane.address == address) {
            lane.pool.stats.record(pending.started.elapsed(), false);
        }
        pending
            .route
            .cluster
            .balancer
            .report(pending.picked, Outcome::Failure);
        if Instant::now() < pending.deadline && pending.route.cluster.may_retry(1) {
            debug!(%address, %error, "send failed, retrying on another broker");
            self.hand_over(pending.request, address, pending.endpoint);
            return;
        }
        self.connection_slots.finish_one();
        let answer = dispatch::answer(
            Err(error.clone()),
            pending.request.opaque,
            &pending.endpoint,
        );
        self.proxy.stats.request_ended();
        if let Some(answer) = answer {
            self.proxy.stats.response(answer.code);
            self.answers.push(answer.into());
        }
    }

    fn hand_over(&mut self, request: RawCommand, failed: SocketAddr, endpoint: Arc<Endpoint>) {
        // The general path counts the request active again while it runs.
        self.proxy.stats.request_ended();
        // The send's own slot moves with it: one is held for each send in flight here.
        let Some(permit) = self.connection_slots.take_one() else {
            warn!(%failed, "no connection slot held for a send to retry; answered as failed");
            let error = UpstreamError::Closed { address: failed };
            if let Some(answer) = dispatch::answer(Err(error), request.opaque, &endpoint) {
                self.proxy.stats.response(answer.code);
                self.answers.push(answer.into());
            }
            return;
        };
        self.handovers.push(Handover {
            request,
            permit,
            failed: Some(failed),
        });
    }

    /// Gives back the in-flight slots of the sends settled since the last call: one release per
    /// batch of answers, not one per answer (each locks the semaphore's waiter list).
    fn release_settled_slots(&mut self) {
        self.connection_slots.release_finished();
        for lane in &mut self.lanes {
            lane.release_finished_slots();
        }
    }

    /// Fails the sends whose deadline passed, and sets the timer for the next one.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for index in 0..self.lanes.len() {
            while let Some(lane) = self.lanes.get_mut(index) {
                lane.forget_answered();
                let due = match lane.waiting.front() {
                    Some(Some(pending)) if pending.deadline <= now => true,
                    Some(Some(pending)) => {
                        next = Some(next.map_or(pending.deadline, |at| at.min(pending.deadline)));
                        false
                    }
                    _ => false,
                };
                if !due {
                    break;
                }
                let Some(Some(pending)) = lane.waiting.pop_front() else {
                    break;
                };
                lane.base = lane.base.wrapping_add(1);
                lane.live -= 1;
                lane.endpoint_slots_finished += 1;
                let address = lane.address;
                let error = UpstreamError::Timeout {
                    address,
                    timeout: pending.endpoint.request_timeout,
                };
                self.failed(address, pending, &error);
            }
        }
        match (next, &mut self.timer) {
            (Some(at), Some(timer)) => timer.as_mut().reset(at),
            (Some(at), None) => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            (None, _) => self.timer = None,
        }
    }

    /// The lane's connection is gone: every send on it fails with why.
    fn close_lane(&mut self, index: usize, reason: &str) {
        let Some(lane) = self.lanes.get(index) else {
            return;
        };
        debug!(address = %lane.address, reason, "client lane to the broker closed");
        let error = UpstreamError::Closed {
            address: lane.address,
        };
        self.fail_lane(index, &error);
    }

    fn fail_lane(&mut self, index: usize, error: &UpstreamError) {
        let Some(lane) = self.lanes.get_mut(index) else {
            return;
        };
        lane.state = LaneState::Closed;
        lane.write.clear();
        lane.read.clear();
        let address = lane.address;
        let waiting: Vec<Pending> = lane.waiting.drain(..).flatten().collect();
        lane.live = 0;
        lane.pool.give_back_ordinary_slots(lane.endpoint_slots);
        lane.endpoint_slots = 0;
        lane.endpoint_slots_finished = 0;
        for pending in waiting {
            self.failed(address, pending, error);
        }
    }
}

impl Lane {
    fn release_finished_slots(&mut self) {
        let finished = self.endpoint_slots_finished.min(self.endpoint_slots);
        self.pool.give_back_ordinary_slots(finished);
        self.endpoint_slots -= finished;
        self.endpoint_slots_finished = 0;
    }

    /// Whether new sends wait for an answer to make room (see `COALESCE_DEPTH`).
    fn holds(&self) -> bool {
        self.live.saturating_sub(self.buffered) >= COALESCE_DEPTH
            && self.write.len() < COALESCE_BYTES
    }

    fn flushed_if_empty(&mut self) {
        if self.write.is_empty() {
            self.flushing = false;
            self.buffered = 0;
        }
    }

    /// Drops answered slots at the front.
    fn forget_answered(&mut self) {
        while matches!(self.waiting.front(), Some(None)) {
            self.waiting.pop_front();
            self.base = self.base.wrapping_add(1);
        }
    }
}

/// In-flight slots of one semaphore, held together for the sends in flight and given back in
/// batches (see [`DirectSends::release_settled_slots`]).
#[derive(Default)]
struct HeldSlots {
    held: Option<OwnedSemaphorePermit>,
    /// Of `held`, the slots of sends that have ended.
    finished: usize,
}

impl HeldSlots {
    /// Whether `permit` can join the slots held (it is of the same semaphore).
    fn holds_same(&self, permit: &OwnedSemaphorePermit) -> bool {
        self.held
            .as_ref()
            .is_none_or(|held| Arc::ptr_eq(held.semaphore(), permit.semaphore()))
    }

    /// Holds `permit`; the caller checked [`HeldSlots::holds_same`].
    fn hold(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.held {
            Some(held) if Arc::ptr_eq(held.semaphore(), permit.semaphore()) => held.merge(permit),
            Some(_) => debug_assert!(false, "slots of two semaphores held together"),
            None => self.held = Some(permit),
        }
    }

    /// A send's slot is free: given back at the next [`HeldSlots::release_finished`].
    fn finish_one(&mut self) {
        self.finished += 1;
    }

    /// A send's slot, moving with the send to another holder.
    fn take_one(&mut self) -> Option<OwnedSemaphorePermit> {
        self.held.as_mut()?.split(1)
    }

    fn release_finished(&mut self) {
        if self.finished > 0 {
            if let Some(held) = &mut self.held {
                drop(held.split(self.finished));
            }
            self.finished = 0;
        }
    }
}

impl Drop for Lane {
    /// The slots of sends still in flight go back with the lane (the connection task ended).
    fn drop(&mut self) {
        self.pool.give_back_ordinary_slots(self.endpoint_slots);
    }
}

impl Drop for DirectSends {
    /// A connection task aborted at the shutdown deadline: its sends' balancer slots and gauge
    /// are given back.
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            for pending in lane.waiting.drain(..).flatten() {
                pending.route.cluster.balancer.release(pending.picked);
                self.proxy.stats.request_ended();
            }
        }
    }
}
