//! Pull→POP: unmodified pull and push consumers served by POP/ACK, so no queue belongs to one
//! consumer and a hung consumer strands nothing.
//!
//! For a converted group the sidecar answers GET_CONSUMER_LIST_BY_GROUP with the asking client
//! alone, so every client pulls every queue and never rebalances. Each PULL on (broker, queue)
//! becomes a POP of that queue; the records are renumbered with per-(client, queue) virtual
//! offsets ([`vqueue`]), and the client's commits become ACKs of every receipt below them. Offset
//! queries are answered from the virtual space, send-backs become invisible-time changes, and the
//! receipts a client still holds are renewed while it is alive and released when it leaves.
//!
//! - [`config`]: the `consume:` section.
//! - [`mode`]: which groups convert, and why.
//! - [`translate`]: the POP request of a pull, and the pull answer of a POP answer.
//! - [`vqueue`]: virtual offsets and receipts of one client's queue.
//! - [`calls`]: acks, invisible-time changes and dead-lettering at the brokers.

pub mod calls;
pub mod config;
pub mod mode;
pub mod translate;
pub mod vqueue;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

pub use config::{ConsumeConfig, ConsumeMode};
use mode::{Decision, GroupFacts, Mode};
use translate::{PopAsk, PopContext, Subscription, pull_flag};
use vqueue::{Receipt, ReceiptState, VirtualQueue};

use super::Proxy;
use super::dispatch::Downstream;
use super::routes::Endpoint;
use crate::remoting::header::{
    ConsumerSendMsgBackRequestHeader, GetMaxOffsetRequestHeader, OffsetResponseHeader,
    PullMessageRequestHeader, QueryConsumerOffsetRequestHeader, SearchOffsetRequestHeader,
    UpdateConsumerOffsetRequestHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};

/// What the engine did with a request.
pub enum Intercept {
    /// Answered for a converted group (`None`: nothing to send back).
    Answered(Option<RemotingCommand>),
    /// Not a converted group's: forward it as it is.
    Forward(RemotingCommand),
}

/// One client's view of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueueKey {
    client: Arc<str>,
    group: String,
    topic: String,
    broker: Arc<str>,
    queue_id: i32,
}

/// Counters per (group, client), shown by the admin endpoint.
#[derive(Debug, Default, Serialize)]
pub struct ClientStats {
    pub in_flight: AtomicI64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub ack_failures: AtomicU64,
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    pub nacks: AtomicU64,
    pub released: AtomicU64,
    pub lapsed: AtomicU64,
    pub filtered: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl ClientStats {
    fn add(counter: &AtomicU64, count: usize) {
        counter.fetch_add(count as u64, Ordering::Relaxed);
    }
}

struct GroupState {
    decision: Decision,
    orderly: bool,
    legacy_pull: bool,
    /// The group pops by itself (QUERY_ASSIGNMENT or POP_MESSAGE): its pulls, of the retry topic
    /// the broker keeps on PULL, must stay pulls.
    pops_itself: bool,
}

/// The Pull→POP engine; one per sidecar.
pub struct PullPop {
    config: ConsumeConfig,
    groups: DashMap<String, GroupState>,
    queues: DashMap<QueueKey, VirtualQueue>,
    stats: DashMap<(String, Arc<str>), Arc<ClientStats>>,
    /// Local time each client was last heard from: only live clients get renewals.
    seen: DashMap<Arc<str>, i64>,
    /// (group, broker) pairs whose broker refused POP: they stay PULL.
    fallbacks: DashMap<(String, String), ()>,
    no_batch_ack: DashMap<String, ()>,
    fallback_count: AtomicU64,
    /// The pop made ahead for a queue's next pull, when the last one came back full. Dropping
    /// one (rewind, client gone) makes its task release what it brings.
    ahead: DashMap<QueueKey, oneshot::Receiver<PopOutcome>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// The broker's delay levels, in seconds; level 0 means "3 + reconsume times" as the broker does.
const DELAY_LEVEL_SECONDS: [i64; 18] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
];

fn retry_delay_ms(delay_level: i32, reconsume_times: i32) -> i64 {
    let level = if delay_level <= 0 {
        3 + reconsume_times.max(0)
    } else {
        delay_level
    };
    let index = (level.clamp(1, DELAY_LEVEL_SECONDS.len() as i32) - 1) as usize;
    DELAY_LEVEL_SECONDS.get(index).copied().unwrap_or(7200) * 1000
}

fn reply(
    request: &RemotingCommand,
    code: ResponseCode,
    remark: impl Into<String>,
) -> RemotingCommand {
    RemotingCommand::error_response(request, code, remark)
}

fn offset_answer(request: &RemotingCommand, offset: i64) -> RemotingCommand {
    RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        .with_header(&OffsetResponseHeader { offset })
}

impl PullPop {
    pub fn new(config: ConsumeConfig) -> Self {
        Self {
            config,
            groups: DashMap::new(),
            queues: DashMap::new(),
            stats: DashMap::new(),
            seen: DashMap::new(),
            fallbacks: DashMap::new(),
            no_batch_ack: DashMap::new(),
            fallback_count: AtomicU64::new(0),
            ahead: DashMap::new(),
        }
    }

    pub fn config(&self) -> &ConsumeConfig {
        &self.config
    }

    pub(crate) fn batch_ack_refused(&self, broker: &str) -> bool {
        self.no_batch_ack.contains_key(broker)
    }

    pub(crate) fn refuse_batch_ack(&self, broker: &str) {
        self.no_batch_ack.insert(broker.to_owned(), ());
    }

    fn client_stats(&self, group: &str, client: &Arc<str>) -> Arc<ClientStats> {
        self.stats
            .entry((group.to_owned(), client.clone()))
            .or_default()
            .clone()
    }

    fn saw(&self, client: &Arc<str>) {
        self.seen.insert(client.clone(), now_ms());
    }

    fn is_live(&self, client: &str, now: i64) -> bool {
        self.seen
            .get(client)
            .is_some_and(|seen| now - *seen <= self.config.client_liveness_ms as i64)
    }

    /// The mode of `group`; `code` is the request that asks, from `client`. A group with no
    /// heartbeat yet is left undecided and served as PULL.
    fn mode(&self, proxy: &Arc<Proxy>, group: &str, client: &str, code: RequestCode) -> Mode {
        let legacy_now = code == RequestCode::PULL_MESSAGE;
        if let Some(state) = self.groups.get(group) {
            let stays = state.decision.mode == Mode::Pull || state.legacy_pull || !legacy_now;
            if stays {
                return state.decision.mode;
            }
        }
        let Some(consumer) = proxy.clients.consumer_data(group) else {
            return Mode::Pull;
        };
        // The asker's own heartbeat tells (a push member pulls with the same code); a connection
        // that never sent one (the C++ pull consumer pulls on such) goes by the group's.
        let legacy_pull = legacy_now
            && proxy
                .clients
                .member_data(group, client)
                .as_ref()
                .unwrap_or(&consumer)
                .consume_type
                .eq_ignore_ascii_case("CONSUME_ACTIVELY");
        if let Some(state) = self.groups.get(group)
            && !legacy_pull
        {
            return state.decision.mode;
        }
        if self
            .groups
            .get(group)
            .is_some_and(|state| state.pops_itself)
        {
            return Mode::Pull;
        }
        let orderly = self.groups.get(group).is_some_and(|state| state.orderly);
        self.decide(proxy, group, &consumer, orderly, legacy_pull)
    }

    /// A QUERY_ASSIGNMENT or POP_MESSAGE from `group`: the client runs POP itself.
    pub fn pops_itself(&self, proxy: &Arc<Proxy>, group: &str) {
        if self
            .groups
            .get(group)
            .is_some_and(|state| state.pops_itself)
        {
            return;
        }
        let was = self.groups.insert(
            group.to_owned(),
            GroupState {
                decision: Decision {
                    mode: Mode::Pull,
                    reason: "the client pops by itself (QUERY_ASSIGNMENT or POP_MESSAGE)".into(),
                },
                orderly: false,
                legacy_pull: false,
                pops_itself: true,
            },
        );
        proxy.clients.set_quiet(group, false);
        if was.is_some_and(|state| state.decision.mode == Mode::Pop) {
            // What it pulled while converted is still being consumed; its commits ack it.
            info!(
                group,
                "the group pops by itself: its pulls are forwarded from now on"
            );
            proxy.clients.notify_group(group);
        }
    }

    fn decide(
        &self,
        proxy: &Arc<Proxy>,
        group: &str,
        consumer: &crate::remoting::body::ConsumerData,
        orderly: bool,
        legacy_pull: bool,
    ) -> Mode {
        let table = proxy.routes.snapshot();
        let decision = mode::decide(
            &self.config,
            &GroupFacts {
                group,
                consumer,
                orderly,
                legacy_pull,
            },
            |topic| {
                table
                    .lookup(topic, RequestCode::PULL_MESSAGE.0)
                    .and_then(|action| action.consume_mode)
            },
        );
        let previous = self.groups.insert(
            group.to_owned(),
            GroupState {
                decision: decision.clone(),
                orderly,
                legacy_pull,
                pops_itself: false,
            },
        );
        let was = previous.map(|state| state.decision.mode);
        if was != Some(decision.mode) {
            info!(group, mode = ?decision.mode, reason = %decision.reason, "consumer group mode");
        }
        proxy.clients.set_quiet(group, decision.mode == Mode::Pop);
        if was == Some(Mode::Pop) && decision.mode == Mode::Pull {
            // The group's members now need the real membership, and their receipts go back.
            self.release_group(proxy, group);
            proxy.clients.notify_group(group);
        }
        decision.mode
    }

    /// A LOCK_BATCH_MQ for `group`: it consumes orderly, which POP cannot serve here.
    pub fn locked(&self, proxy: &Arc<Proxy>, group: &str) {
        if self
            .groups
            .get(group)
            .is_some_and(|state| state.orderly || state.pops_itself)
        {
            return;
        }
        let legacy_pull = self
            .groups
            .get(group)
            .is_some_and(|state| state.legacy_pull);
        match proxy.clients.consumer_data(group) {
            Some(consumer) => {
                self.decide(proxy, group, &consumer, true, legacy_pull);
            }
            None => {
                self.groups.insert(
                    group.to_owned(),
                    GroupState {
                        decision: Decision {
                            mode: Mode::Pull,
                            reason: "orderly: the group locks its queues (LOCK_BATCH_MQ)".into(),
                        },
                        orderly: true,
                        legacy_pull,
                        pops_itself: false,
                    },
                );
            }
        }
    }

    /// Whether GET_CONSUMER_LIST_BY_GROUP for `group` gets the asking client alone.
    pub fn answers_membership(&self, proxy: &Arc<Proxy>, group: &str) -> bool {
        self.mode(proxy, group, "", RequestCode::GET_CONSUMER_LIST_BY_GROUP) == Mode::Pop
    }

    /// A heartbeat from `client`: it is alive.
    pub fn heartbeat(&self, client: &str) {
        self.saw(&Arc::from(client));
    }

    fn client_of(proxy: &Proxy, downstream: &Downstream) -> Arc<str> {
        proxy
            .clients
            .client_id_of(downstream.connection)
            .map_or_else(
                || Arc::from(format!("connection-{}", downstream.connection)),
                Arc::from,
            )
    }

    fn converted(
        &self,
        proxy: &Arc<Proxy>,
        group: &str,
        client: &str,
        broker: &str,
        code: RequestCode,
    ) -> bool {
        self.mode(proxy, group, client, code) == Mode::Pop
            && !self
                .fallbacks
                .contains_key(&(group.to_owned(), broker.to_owned()))
    }

    /// Takes the requests of converted groups; everything else is given back to forward.
    pub async fn intercept(
        proxy: &Arc<Proxy>,
        downstream: &Downstream,
        endpoint: &Arc<Endpoint>,
        request: RemotingCommand,
    ) -> Intercept {
        let engine = &proxy.pullpop;
        let broker = endpoint.metadata.broker_name.as_str();
        let code = request.request_code();
        match code {
            RequestCode::PULL_MESSAGE | RequestCode::LITE_PULL_MESSAGE => {
                let Ok(header) = request.decode_header::<PullMessageRequestHeader>() else {
                    return Intercept::Forward(request);
                };
                let client = Self::client_of(proxy, downstream);
                if !engine.converted(proxy, &header.consumer_group, &client, broker, code) {
                    return Intercept::Forward(request);
                }
                Self::pull(proxy, client, endpoint.clone(), request, header).await
            }
            RequestCode::UPDATE_CONSUMER_OFFSET => {
                let Ok(header) = request.decode_header::<UpdateConsumerOffsetRequestHeader>()
                else {
                    return Intercept::Forward(request);
                };
                let client = Self::client_of(proxy, downstream);
                let key = QueueKey {
                    client,
                    group: header.consumer_group.clone(),
                    topic: header.topic.clone(),
                    broker: Arc::from(broker),
                    queue_id: header.queue_id,
                };
                if !engine.converted(proxy, &header.consumer_group, &key.client, broker, code) {
                    // A group that left POP still settles the receipts it took while converted.
                    if engine.queues.contains_key(&key) {
                        Self::commit(proxy, &key, header.commit_offset);
                    }
                    return Intercept::Forward(request);
                }
                engine.saw(&key.client);
                Self::commit(proxy, &key, header.commit_offset);
                Intercept::Answered(Some(RemotingCommand::response_to(
                    &request,
                    ResponseCode::SUCCESS,
                )))
            }
            RequestCode::QUERY_CONSUMER_OFFSET => {
                let Ok(header) = request.decode_header::<QueryConsumerOffsetRequestHeader>() else {
                    return Intercept::Forward(request);
                };
                let client = Self::client_of(proxy, downstream);
                if !engine.converted(proxy, &header.consumer_group, &client, broker, code) {
                    return Intercept::Forward(request);
                }
                engine.saw(&client);
                let key = QueueKey {
                    client,
                    group: header.consumer_group,
                    topic: header.topic,
                    broker: Arc::from(broker),
                    queue_id: header.queue_id,
                };
                // Never QUERY_NOT_FOUND: that sends clients to GET_MAX_OFFSET or SEARCH_OFFSET.
                let committed = engine.queues.get(&key).map_or(0, |queue| queue.committed());
                Intercept::Answered(Some(offset_answer(&request, committed)))
            }
            RequestCode::GET_MAX_OFFSET
            | RequestCode::GET_MIN_OFFSET
            | RequestCode::SEARCH_OFFSET_BY_TIMESTAMP => {
                engine.queue_offsets(proxy, downstream, broker, request)
            }
            RequestCode::CONSUMER_SEND_MSG_BACK => {
                let Ok(header) = request.decode_header::<ConsumerSendMsgBackRequestHeader>() else {
                    return Intercept::Forward(request);
                };
                let client = Self::client_of(proxy, downstream);
                if !engine.converted(proxy, &header.group, &client, broker, code) {
                    return Intercept::Forward(request);
                }
                Self::send_back(proxy, client, broker, request, header).await
            }
            _ => Intercept::Forward(request),
        }
    }

    /// GET_MAX_OFFSET, GET_MIN_OFFSET and SEARCH_OFFSET_BY_TIMESTAMP name no group: they are the
    /// virtual queue's when the client consumes the topic in a converted group.
    fn queue_offsets(
        &self,
        proxy: &Arc<Proxy>,
        downstream: &Downstream,
        broker: &str,
        request: RemotingCommand,
    ) -> Intercept {
        let (topic, queue_id) = match request.request_code() {
            RequestCode::SEARCH_OFFSET_BY_TIMESTAMP => {
                match request.decode_header::<SearchOffsetRequestHeader>() {
                    Ok(header) => (header.topic, header.queue_id),
                    Err(_) => return Intercept::Forward(request),
                }
            }
            _ => match request.decode_header::<GetMaxOffsetRequestHeader>() {
                Ok(header) => (header.topic, header.queue_id),
                Err(_) => return Intercept::Forward(request),
            },
        };
        let client = Self::client_of(proxy, downstream);
        let group = proxy
            .clients
            .groups_of(&client, &topic)
            .into_iter()
            .find(|group| {
                self.converted(proxy, group, &client, broker, RequestCode::GET_MAX_OFFSET)
            });
        let Some(group) = group else {
            return Intercept::Forward(request);
        };
        let key = QueueKey {
            client,
            group,
            topic,
            broker: Arc::from(broker),
            queue_id,
        };
        let queue = self.queues.get(&key);
        let offset = match request.request_code() {
            RequestCode::GET_MIN_OFFSET => 0,
            RequestCode::GET_MAX_OFFSET => queue.map_or(0, |queue| queue.cursor() + queue.backlog),
            _ => queue.map_or(0, |queue| queue.committed()),
        };
        Intercept::Answered(Some(offset_answer(&request, offset)))
    }

    async fn pull(
        proxy: &Arc<Proxy>,
        client: Arc<str>,
        endpoint: Arc<Endpoint>,
        request: RemotingCommand,
        header: PullMessageRequestHeader,
    ) -> Intercept {
        let engine = &proxy.pullpop;
        let config = &engine.config;
        engine.saw(&client);
        let key = QueueKey {
            client: client.clone(),
            group: header.consumer_group.clone(),
            topic: header.topic.clone(),
            broker: Arc::from(endpoint.metadata.broker_name.as_str()),
            queue_id: header.queue_id,
        };
        let stats = engine.client_stats(&key.group, &client);
        if header.sys_flag & pull_flag::COMMIT_OFFSET != 0 && header.commit_offset > 0 {
            Self::commit(proxy, &key, header.commit_offset);
        }
        let (ticket, released, max_offset, ahead) = {
            let mut queue = engine.queues.entry(key.clone()).or_default();
            let before = queue.held() as i64;
            // A pop made ahead serves only the pull that continues where the last one ended.
            let ahead = engine.ahead.remove(&key).map(|(_, ahead)| ahead);
            let ahead = ahead.filter(|_| queue.cursor() == header.queue_offset);
            let (ticket, released) = queue.begin_pull(header.queue_offset);
            stats
                .in_flight
                .fetch_add(queue.held() as i64 - before, Ordering::Relaxed);
            (ticket, released, queue.cursor() + queue.backlog, ahead)
        };
        engine.release(proxy, &key.group, &stats, released);
        let suspend_ms = if header.sys_flag & pull_flag::SUSPEND != 0 {
            header
                .suspend_timeout_millis
                .clamp(0, config.max_long_poll_ms as i64)
        } else {
            0
        };
        if stats.in_flight.load(Ordering::Relaxed) >= config.max_receipts_per_client as i64 {
            // Over its bound: nothing more until it commits. The wait keeps it from spinning.
            drop(ahead);
            tokio::time::sleep(Duration::from_millis(suspend_ms.clamp(0, 1000) as u64)).await;
            return Intercept::Answered(Some(translate::no_new_message(
                &request,
                header.queue_offset,
                max_offset,
            )));
        }
        let pop = PopPlan::new(proxy, &key, &header);
        let max_messages = pop.max_messages;
        let ended = || {
            PopOutcome::Failed(
                ResponseCode::SYSTEM_ERROR,
                "rocketmesh: pop task ended".into(),
            )
        };
        let mut outcome = match ahead {
            Some(ahead) => ahead.await.unwrap_or_else(|_| ended()),
            None => PopOutcome::Empty,
        };
        let stale_after = now_ms() + config.renew_ahead_ms as i64;
        if let PopOutcome::Popped { receipts, .. } = &outcome
            && receipts
                .iter()
                .any(|receipt| receipt.visible_at_ms <= stale_after)
            && let PopOutcome::Popped { receipts, .. } =
                std::mem::replace(&mut outcome, PopOutcome::Empty)
        {
            // Popped ahead, then kept waiting (the client paused) until it is about to be served
            // again elsewhere: let it go rather than hand out what may be taken twice.
            engine.release(proxy, &key.group, &stats, receipts);
        }
        if matches!(outcome, PopOutcome::Empty | PopOutcome::Failed(..)) {
            // Nothing ahead, or it found nothing: the pull's own pop, long-polling as asked.
            let receiver = pop.start(proxy, &key, &endpoint, suspend_ms);
            outcome = receiver.await.unwrap_or_else(|_| ended());
        }
        let answer = match outcome {
            PopOutcome::Popped {
                records,
                receipts,
                backlog,
            } => {
                let count = receipts.len();
                let handed = match engine.queues.get_mut(&key) {
                    Some(mut queue) => queue.hand_out(ticket, receipts, backlog),
                    None => Err(receipts),
                };
                match handed {
                    Ok(first) => {
                        stats.in_flight.fetch_add(count as i64, Ordering::Relaxed);
                        ClientStats::add(&stats.delivered, count);
                        proxy
                            .stats
                            .messages_out(&key.topic, &key.group, count as u64);
                        if config.read_ahead && count as i32 >= max_messages {
                            // A full batch: more is likely waiting, so the next pull's pop starts
                            // now and the client does not wait for the broker.
                            if let Some(queue) = engine.queues.get(&key) {
                                let next = pop.start(proxy, &key, &endpoint, 0);
                                engine.ahead.insert(key.clone(), next);
                                drop(queue);
                            }
                        }
                        translate::found(&request, &records, first, header.queue_id, backlog)
                    }
                    Err(receipts) => {
                        // The client left, or asked again meanwhile: nobody takes these.
                        engine.release(proxy, &key.group, &stats, receipts);
                        translate::no_new_message(&request, header.queue_offset, max_offset)
                    }
                }
            }
            PopOutcome::Empty => {
                let max_offset = engine
                    .queues
                    .get(&key)
                    .map_or(max_offset, |queue| queue.cursor() + queue.backlog);
                translate::no_new_message(&request, header.queue_offset, max_offset)
            }
            PopOutcome::Unsupported(remark) => {
                let fallback = (key.group.clone(), key.broker.to_string());
                if engine.fallbacks.insert(fallback, ()).is_none() {
                    engine.fallback_count.fetch_add(1, Ordering::Relaxed);
                    warn!(group = %key.group, broker = %key.broker, %remark, "the broker refuses POP: the group stays PULL on it");
                }
                return Intercept::Forward(request);
            }
            PopOutcome::Failed(code, remark) => reply(&request, code, remark),
        };
        Intercept::Answered(Some(answer))
    }

    /// One POP at the broker, read into receipts; the caller hands them out.
    async fn pop_for(
        proxy: Arc<Proxy>,
        key: QueueKey,
        pop: RemotingCommand,
        subscription: Subscription,
        endpoint: Arc<Endpoint>,
        poll: Duration,
    ) -> PopOutcome {
        let engine = &proxy.pullpop;
        let stats = engine.client_stats(&key.group, &key.client);
        let sent_at_ms = now_ms();
        let pool = proxy.pool(&endpoint);
        let timeout = endpoint.request_timeout + poll;
        let result = if poll.is_zero() {
            pool.call(pop, timeout).await
        } else {
            pool.call_parked(pop, timeout).await
        };
        let outcome = match &result {
            Ok(response)
                if response.code == ResponseCode::SYSTEM_BUSY.0
                    || response.code == ResponseCode::SERVICE_NOT_AVAILABLE.0 =>
            {
                crate::balance::Outcome::Failure
            }
            Ok(_) => crate::balance::Outcome::Success,
            Err(_) => crate::balance::Outcome::Failure,
        };
        proxy.observe(&endpoint, outcome);
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let code = if error.is_busy() {
                    ResponseCode::SYSTEM_BUSY
                } else {
                    ResponseCode::SYSTEM_ERROR
                };
                return PopOutcome::Failed(
                    code,
                    format!("rocketmesh: broker {} failed: {error}", key.broker),
                );
            }
        };
        match response.response_code() {
            ResponseCode::SUCCESS => {}
            ResponseCode::POLLING_TIMEOUT
            | ResponseCode::PULL_NOT_FOUND
            | ResponseCode::NO_MESSAGE => {
                return PopOutcome::Empty;
            }
            ResponseCode::POLLING_FULL => {
                // The broker holds too many polls: a short pause keeps clients from spinning.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return PopOutcome::Empty;
            }
            ResponseCode::REQUEST_CODE_NOT_SUPPORTED => {
                return PopOutcome::Unsupported(response.remark.unwrap_or_default());
            }
            _ => {
                let code = ResponseCode(response.code);
                return PopOutcome::Failed(code, response.remark.unwrap_or_default());
            }
        }
        let popped = match translate::read_pop(
            &response,
            &PopContext {
                topic: &key.topic,
                group: &key.group,
                broker: &key.broker,
                subscription: &subscription,
                sent_at_ms,
            },
        ) {
            Ok(popped) => popped,
            Err(error) => {
                // The messages stay invisible until their time runs out, then come back.
                warn!(broker = %key.broker, %error, "unreadable pop answer");
                return PopOutcome::Failed(ResponseCode::SYSTEM_ERROR, error.to_string());
            }
        };
        if !popped.filtered.is_empty() {
            ClientStats::add(&stats.filtered, popped.filtered.len());
            let (proxy, group) = (proxy.clone(), key.group.clone());
            tokio::spawn(async move {
                calls::ack_all(&proxy, &group, popped.filtered).await;
            });
        }
        let (records, receipts): (Vec<_>, Vec<_>) = popped.delivered.into_iter().unzip();
        if receipts.is_empty() {
            return PopOutcome::Empty;
        }
        PopOutcome::Popped {
            records,
            receipts,
            backlog: popped.backlog,
        }
    }

    /// The client consumed everything below `offset` in one queue: ack what it held there.
    fn commit(proxy: &Arc<Proxy>, key: &QueueKey, offset: i64) {
        let engine = &proxy.pullpop;
        let stats = engine.client_stats(&key.group, &key.client);
        let settled = {
            let Some(mut queue) = engine.queues.get_mut(key) else {
                return;
            };
            let before = queue.held() as i64;
            let settled = queue.commit(offset, now_ms());
            stats
                .in_flight
                .fetch_add(queue.held() as i64 - before, Ordering::Relaxed);
            settled
        };
        ClientStats::add(&stats.lapsed, settled.lapsed);
        if settled.to_ack.is_empty() {
            return;
        }
        let count = settled.to_ack.len();
        let (proxy, group) = (proxy.clone(), key.group.clone());
        tokio::spawn(async move {
            let failures = calls::ack_all(&proxy, &group, settled.to_ack).await;
            ClientStats::add(&stats.acked, count - failures);
            ClientStats::add(&stats.ack_failures, failures);
        });
    }

    /// CONSUMER_SEND_MSG_BACK: the message comes back after its retry delay (or goes to the
    /// dead-letter topic past the group's max), and no later commit acks it.
    async fn send_back(
        proxy: &Arc<Proxy>,
        client: Arc<str>,
        broker: &str,
        request: RemotingCommand,
        header: ConsumerSendMsgBackRequestHeader,
    ) -> Intercept {
        let engine = &proxy.pullpop;
        engine.saw(&client);
        let found = engine.queues.iter().find_map(|entry| {
            let key = entry.key();
            if key.client != client || key.group != header.group || &*key.broker != broker {
                return None;
            }
            entry
                .find_held(broker, header.offset)
                .map(|(offset, receipt)| (key.clone(), offset, receipt.clone()))
        });
        let Some((key, offset, receipt)) = found else {
            // Not one of ours (already settled, or from before the conversion): the broker's own
            // send-back still gives the message a retry.
            return Intercept::Forward(request);
        };
        let stats = engine.client_stats(&key.group, &client);
        let max = header
            .max_reconsume_times
            .filter(|max| *max >= 0)
            .unwrap_or(engine.config.default_max_reconsume_times);
        let result = if receipt.reconsume_times >= max {
            match calls::dead_letter(proxy, &request, broker).await {
                Ok(()) => {
                    ClientStats::add(&stats.dead_lettered, 1);
                    if let Err(error) = calls::ack(proxy, &key.group, &receipt).await {
                        debug!(%error, "ack after dead-lettering failed: the message may come back once");
                    }
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            let delay = retry_delay_ms(header.delay_level, receipt.reconsume_times);
            calls::change_invisible_time(proxy, &key.group, &receipt, delay)
                .await
                .map(|_| ClientStats::add(&stats.nacks, 1))
        };
        match result {
            Ok(()) => {
                if let Some(mut queue) = engine.queues.get_mut(&key)
                    && let Some(held) = queue.receipt_mut(offset, receipt.handle.pop_time)
                {
                    held.state = ReceiptState::Nacked;
                }
                Intercept::Answered(Some(RemotingCommand::response_to(
                    &request,
                    ResponseCode::SUCCESS,
                )))
            }
            // The client then sends the message to the retry topic itself, and commits past it.
            Err(error) => Intercept::Answered(Some(reply(
                &request,
                ResponseCode::SYSTEM_ERROR,
                format!("rocketmesh: send-back failed: {error}"),
            ))),
        }
    }

    /// Makes receipts visible again soon, for other consumers.
    fn release(
        &self,
        proxy: &Arc<Proxy>,
        group: &str,
        stats: &Arc<ClientStats>,
        receipts: Vec<Receipt>,
    ) {
        if receipts.is_empty() {
            return;
        }
        let (proxy, group, stats) = (proxy.clone(), group.to_owned(), stats.clone());
        let invisible = self.config.release_invisible_ms as i64;
        tokio::spawn(async move {
            for receipt in receipts {
                match calls::change_invisible_time(&proxy, &group, &receipt, invisible).await {
                    Ok(_) => ClientStats::add(&stats.released, 1),
                    Err(error) => {
                        debug!(%error, "release failed: the message comes back after its invisible time");
                    }
                }
            }
        });
    }

    fn release_matching(&self, proxy: &Arc<Proxy>, matches: impl Fn(&QueueKey) -> bool) {
        let keys: Vec<QueueKey> = self
            .queues
            .iter()
            .filter(|entry| matches(entry.key()))
            .map(|entry| entry.key().clone())
            .collect();
        for key in keys {
            let Some((key, mut queue)) = self.queues.remove(&key) else {
                continue;
            };
            self.ahead.remove(&key);
            let stats = self.client_stats(&key.group, &key.client);
            stats
                .in_flight
                .fetch_sub(queue.held() as i64, Ordering::Relaxed);
            self.release(proxy, &key.group, &stats, queue.drain());
        }
    }

    fn release_group(&self, proxy: &Arc<Proxy>, group: &str) {
        self.release_matching(proxy, |key| key.group == group);
    }

    /// A client left (UNREGISTER_CLIENT for `group`, or its last connection closed): what it
    /// still holds goes to the others within about a second.
    pub fn client_gone(&self, proxy: &Arc<Proxy>, client: &str, group: Option<&str>) {
        self.release_matching(proxy, |key| {
            &*key.client == client && group.is_none_or(|group| key.group == group)
        });
        if group.is_none() {
            self.seen.remove(client);
            self.stats.retain(|(_, id), _| &**id != client);
        }
    }

    /// A live client talks at least every few seconds (pulls, offset commits every 5 s,
    /// heartbeats). One silent past the liveness window is hung (SIGSTOP, a stuck process): what
    /// it holds goes to the others now instead of after the invisible time. If it wakes up, its
    /// late commits find nothing to ack, so they cannot ack what others took.
    fn release_silent(&self, proxy: &Arc<Proxy>, now: i64) {
        let liveness = self.config.client_liveness_ms as i64;
        let silent: Vec<Arc<str>> = self
            .seen
            .iter()
            .filter(|entry| now - *entry.value() > liveness)
            .map(|entry| entry.key().clone())
            .collect();
        for client in silent {
            self.seen.remove(&client);
            let holds = self.queues.iter().any(|entry| entry.key().client == client);
            if holds {
                info!(%client, "client silent past its liveness window: its receipts go to the others");
                self.release_matching(proxy, |key| key.client == client);
            }
        }
    }

    /// Renews, until the renewal limit, the receipts of live clients that would soon become
    /// visible; runs for the life of the sidecar.
    pub async fn renew(proxy: Arc<Proxy>) {
        let period =
            Duration::from_millis((proxy.pullpop.config.renew_ahead_ms / 4).clamp(100, 1000));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            Self::renew_due(&proxy).await;
        }
    }

    async fn renew_due(proxy: &Arc<Proxy>) {
        let engine = &proxy.pullpop;
        let config = &engine.config;
        let now = now_ms();
        engine.release_silent(proxy, now);
        let horizon = now + config.renew_ahead_ms as i64;
        let mut due = Vec::new();
        for entry in engine.queues.iter() {
            let key = entry.key();
            if !engine.is_live(&key.client, now) {
                continue;
            }
            for (offset, receipt) in entry.due(horizon) {
                if now - receipt.popped_at_ms < config.renew_max_ms as i64
                    && receipt.visible_at_ms > now
                {
                    due.push((key.clone(), offset, receipt.clone()));
                }
            }
        }
        let invisible = config.invisible_time_ms as i64;
        for batch in due.chunks(64) {
            let renewals = batch.iter().map(|(key, offset, receipt)| async move {
                let sent_at = now_ms();
                let result =
                    calls::change_invisible_time(proxy, &key.group, receipt, invisible).await;
                (key, *offset, receipt, sent_at, result)
            });
            for (key, offset, receipt, sent_at, result) in futures::future::join_all(renewals).await
            {
                let stats = engine.client_stats(&key.group, &key.client);
                match result {
                    Ok(handle) => {
                        ClientStats::add(&stats.renewals, 1);
                        if let Some(mut queue) = engine.queues.get_mut(key)
                            && let Some(held) = queue.receipt_mut(offset, receipt.handle.pop_time)
                        {
                            held.handle = handle;
                            held.visible_at_ms = sent_at + invisible;
                        }
                    }
                    Err(error) => {
                        ClientStats::add(&stats.renewal_failures, 1);
                        debug!(%error, "renewal failed: the message may be served again");
                    }
                }
            }
        }
    }

    /// The admin view: each group's mode and reason, and each client's receipts.
    pub fn view(&self) -> serde_json::Value {
        let mut groups: std::collections::BTreeMap<String, serde_json::Value> = self
            .groups
            .iter()
            .map(|entry| {
                (
                    entry.key().clone(),
                    serde_json::json!({
                        "mode": entry.decision.mode,
                        "reason": entry.decision.reason,
                        "clients": {},
                    }),
                )
            })
            .collect();
        for entry in self.stats.iter() {
            let ((group, client), stats) = (entry.key(), entry.value());
            let slot = groups.entry(group.clone()).or_insert_with(
                || serde_json::json!({"mode": "pull", "reason": "undecided", "clients": {}}),
            );
            if let Some(clients) = slot.get_mut("clients").and_then(|c| c.as_object_mut()) {
                clients.insert(
                    client.to_string(),
                    serde_json::to_value(&**stats).unwrap_or_default(),
                );
            }
        }
        let fallbacks: Vec<serde_json::Value> = self
            .fallbacks
            .iter()
            .map(|entry| serde_json::json!({"group": entry.key().0, "broker": entry.key().1}))
            .collect();
        serde_json::json!({
            "groups": groups,
            "pop_refused": fallbacks,
            "pop_refusals": self.fallback_count.load(Ordering::Relaxed),
            "virtual_queues": self.queues.len(),
        })
    }

    /// (group, mode, client, stats) for the metrics endpoint.
    pub fn client_series(&self) -> Vec<(String, Mode, String, Arc<ClientStats>)> {
        self.stats
            .iter()
            .map(|entry| {
                let (group, client) = entry.key();
                let mode = self
                    .groups
                    .get(group)
                    .map_or(Mode::Pull, |state| state.decision.mode);
                (
                    group.clone(),
                    mode,
                    client.to_string(),
                    entry.value().clone(),
                )
            })
            .collect()
    }

    /// (group, mode) of every decided group.
    pub fn group_modes(&self) -> Vec<(String, Mode)> {
        self.groups
            .iter()
            .map(|entry| (entry.key().clone(), entry.decision.mode))
            .collect()
    }

    pub fn pop_refusals(&self) -> u64 {
        self.fallback_count.load(Ordering::Relaxed)
    }
}

enum PopOutcome {
    Popped {
        records: Vec<bytes::Bytes>,
        receipts: Vec<Receipt>,
        backlog: i64,
    },
    Empty,
    Unsupported(String),
    Failed(ResponseCode, String),
}

/// The POP a client's pull asks for, reusable for the pop made ahead of its next pull.
struct PopPlan {
    header: PullMessageRequestHeader,
    subscription: Subscription,
    init_mode: i32,
    max_messages: i32,
}

impl PopPlan {
    fn new(proxy: &Arc<Proxy>, key: &QueueKey, header: &PullMessageRequestHeader) -> Self {
        let subscription = header
            .subscription
            .as_deref()
            .filter(|text| !text.is_empty())
            .map(|text| Subscription::new(header.expression_type.as_deref(), Some(text)))
            .or_else(|| {
                proxy
                    .clients
                    .subscription(&key.group, &key.topic)
                    .map(|data| {
                        Subscription::new(data.expression_type.as_deref(), Some(&data.sub_string))
                    })
            })
            .unwrap_or_else(|| Subscription::new(None, None));
        let from_first = key.topic.starts_with("%RETRY%")
            || proxy
                .clients
                .member_data(&key.group, &key.client)
                .is_some_and(|consumer| {
                    consumer
                        .consume_from_where
                        .eq_ignore_ascii_case("CONSUME_FROM_FIRST_OFFSET")
                });
        Self {
            header: header.clone(),
            subscription,
            init_mode: if from_first { 0 } else { 1 },
            max_messages: header
                .max_msg_nums
                .clamp(1, proxy.pullpop.config.max_pop_batch),
        }
    }

    /// Starts the pop on its own task, so that if the client goes away meanwhile, what it brings
    /// is released rather than left invisible.
    fn start(
        &self,
        proxy: &Arc<Proxy>,
        key: &QueueKey,
        endpoint: &Arc<Endpoint>,
        poll_ms: i64,
    ) -> oneshot::Receiver<PopOutcome> {
        let config = &proxy.pullpop.config;
        let pop = translate::pop_request(&PopAsk {
            pull: &self.header,
            broker: &key.broker,
            invisible_time_ms: config.invisible_time_ms as i64,
            poll_time_ms: poll_ms,
            max_messages: self.max_messages,
            init_mode: self.init_mode,
            expression: Some(&self.subscription),
            now_ms: now_ms(),
        });
        let (sender, receiver) = oneshot::channel();
        let (proxy, key, endpoint) = (proxy.clone(), key.clone(), endpoint.clone());
        let subscription = self.subscription.clone();
        tokio::spawn(async move {
            let outcome = PullPop::pop_for(
                proxy.clone(),
                key.clone(),
                pop,
                subscription,
                endpoint,
                Duration::from_millis(poll_ms.max(0) as u64),
            )
            .await;
            if let Err(PopOutcome::Popped { receipts, .. }) = sender.send(outcome) {
                let engine = &proxy.pullpop;
                let stats = engine.client_stats(&key.group, &key.client);
                engine.release(&proxy, &key.group, &stats, receipts);
            }
        });
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_follow_the_brokers_levels() {
        assert_eq!(retry_delay_ms(1, 0), 1_000);
        assert_eq!(
            retry_delay_ms(0, 0),
            10_000,
            "level 0 means 3 + reconsume times"
        );
        assert_eq!(retry_delay_ms(0, 1), 30_000);
        assert_eq!(retry_delay_ms(99, 0), 7_200_000);
    }
}
