//! What the sidecar does with each request code.
//!
//! - Answered here: GET_ROUTEINFO_BY_TOPIC (route data naming the real brokers at the sidecar's
//!   address), HEART_BEAT, UNREGISTER_CLIENT and GET_CONSUMER_LIST_BY_GROUP (the sidecar's own view
//!   of its clients; heartbeats and unregistrations are also passed on to every broker so that
//!   broker-side features keep working).
//! - Routed by topic: sends to a writable broker of the route (queue id rewritten, or kept on an
//!   `ordered` route), pops to a readable one.
//! - Routed by name: acks to the broker inside the receipt handle, everything else to the broker the
//!   request addresses: `bname`, else the broker whose listener the connection arrived on, else a
//!   lock body's queue, an END_TRANSACTION's offset message id, or the only broker of the topic.
//! - Fanned out: QUERY_ASSIGNMENT (answers merged), SET_MESSAGE_REQUEST_MODE, and VIEW_MESSAGE_BY_ID
//!   or QUERY_MESSAGE that address no broker.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, warn};

use super::Proxy;
use super::failover;
use super::pullpop::{Intercept, PullPop};
use super::routes::{Endpoint, RouteAction, RouteTable};
use super::upstream::{UpstreamError, UpstreamRequest};
use crate::balance::Outcome;
use crate::client_registry::ConnectionId;
use crate::names::{self, NameError};
use crate::remoting::body::{
    BatchAckMessageRequestBody, ConsumerList, HeartbeatData, JsonBody, LockBatchRequestBody,
    MessageQueue, QueryAssignmentRequestBody, SetMessageRequestModeRequestBody,
    UnlockBatchRequestBody,
};
use crate::remoting::extra_info::ExtraInfo;
use crate::remoting::header::{
    GetConsumerListByGroupRequestHeader, GetRouteInfoRequestHeader, UnregisterClientRequestHeader,
};
use crate::remoting::message::{OffsetMessageId, sys_flag};
use crate::remoting::raw::{Outgoing, RawCommand};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};

/// The client connection a request came from.
pub struct Downstream {
    pub connection: ConnectionId,
    pub peer: SocketAddr,
    /// The address of the listener the client dialled, as route data gives it.
    pub advertised: Arc<str>,
    /// The broker name whose own listener the client dialled: how clients that send no `bname`
    /// address a broker. `None` on the main listener.
    pub broker: Option<Arc<str>>,
}

/// Handles one request; `None` for oneway requests, which get no response.
pub async fn handle(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: RemotingCommand,
) -> Option<Outgoing> {
    proxy.stats.request(request.code);
    let _active = proxy.stats.active_request();
    let oneway = request.is_oneway();
    if let Err(error) = check_names(&request) {
        return finish(
            proxy,
            oneway,
            Some(refuse_name(request.opaque, &error).into()),
        );
    }
    if is_send(request.request_code()) {
        let response = send(proxy, downstream, Relayed::Decoded(request), Vec::new()).await;
        return finish(proxy, oneway, response);
    }
    let response = match request.request_code() {
        RequestCode::GET_ROUTEINFO_BY_TOPIC => Some(route_info(proxy, downstream, &request).await),
        RequestCode::HEART_BEAT => Some(heartbeat(proxy, downstream, &request)),
        RequestCode::UNREGISTER_CLIENT => Some(unregister(proxy, downstream, &request)),
        RequestCode::GET_CONSUMER_LIST_BY_GROUP => Some(consumer_list(proxy, downstream, &request)),
        RequestCode::POP_MESSAGE => {
            if let Some(group) = request.ext("consumerGroup") {
                proxy.pullpop.pops_itself(proxy, group);
            }
            pop(proxy, downstream, request).await
        }
        RequestCode::ACK_MESSAGE | RequestCode::CHANGE_MESSAGE_INVISIBLETIME => {
            by_receipt(proxy, downstream, request).await
        }
        RequestCode::BATCH_ACK_MESSAGE => batch_ack(proxy, downstream, request).await,
        RequestCode::QUERY_ASSIGNMENT | RequestCode::SET_MESSAGE_REQUEST_MODE => {
            if request.request_code() == RequestCode::QUERY_ASSIGNMENT
                && let Ok(body) = QueryAssignmentRequestBody::from_json(&request.body)
            {
                proxy.pullpop.pops_itself(proxy, &body.consumer_group);
            }
            to_every_broker(proxy, request).await
        }
        RequestCode::VIEW_MESSAGE_BY_ID | RequestCode::QUERY_MESSAGE
            if request.ext(BNAME).is_none_or(str::is_empty) && downstream.broker.is_none() =>
        {
            to_every_broker(proxy, request).await
        }
        RequestCode::PULL_MESSAGE
        | RequestCode::LITE_PULL_MESSAGE
        | RequestCode::QUERY_CONSUMER_OFFSET
        | RequestCode::UPDATE_CONSUMER_OFFSET
        | RequestCode::GET_MAX_OFFSET
        | RequestCode::GET_MIN_OFFSET
        | RequestCode::SEARCH_OFFSET_BY_TIMESTAMP
        | RequestCode::GET_EARLIEST_MSG_STORETIME
        | RequestCode::LOCK_BATCH_MQ
        | RequestCode::UNLOCK_BATCH_MQ
        | RequestCode::CONSUMER_SEND_MSG_BACK
        | RequestCode::END_TRANSACTION
        | RequestCode::VIEW_MESSAGE_BY_ID
        | RequestCode::QUERY_MESSAGE => to_named_broker(proxy, downstream, request).await,
        code => Some(RemotingCommand::error_response(
            &request,
            ResponseCode::REQUEST_CODE_NOT_SUPPORTED,
            format!(
                "request code {} ({}) is not supported by the rocketmesh sidecar",
                code.0,
                request.code_name().unwrap_or("unknown")
            ),
        )),
    };
    finish(proxy, oneway, response.map(Outgoing::from))
}

/// Sends carried as bytes: the relay reads the few fields it routes on and rewrites only those.
/// `None` when a send's fields are not all plain (the caller decodes it in full instead).
pub fn relayable(raw: &RawCommand) -> bool {
    if !is_send(RequestCode(raw.code)) || raw.is_response() {
        return false;
    }
    let keys = SendKeys::choose(raw.has_plain_ext("b"));
    [keys.topic, keys.queue, keys.sys_flag, keys.bname]
        .into_iter()
        .all(|key| raw.ext_is_text(key))
}

/// Handles a send carried as bytes (see [`relayable`]).
pub async fn handle_relayed(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: RawCommand,
) -> Option<Outgoing> {
    proxy.stats.request(request.code);
    let _active = proxy.stats.active_request();
    let oneway = request.flag & crate::remoting::FLAG_ONEWAY != 0;
    let request = Relayed::Raw(request);
    let topic_key = SendKeys::of(&request).topic;
    if let Some(Err(error)) = request.ext(topic_key).map(names::validate_client_topic) {
        return finish(
            proxy,
            oneway,
            Some(refuse_name(request.opaque(), &error).into()),
        );
    }
    let response = send(proxy, downstream, request, Vec::new()).await;
    finish(proxy, oneway, response)
}

/// Sends again a relayed send that failed on `failed` (a client connection's own upstream
/// connection died, timed out or the broker was busy): the balancer picks another broker.
pub async fn resend_relayed(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: RawCommand,
    failed: SocketAddr,
) -> Option<Outgoing> {
    let _active = proxy.stats.active_request();
    let response = send(proxy, downstream, Relayed::Raw(request), vec![failed]).await;
    finish(proxy, false, response)
}

fn is_send(code: RequestCode) -> bool {
    matches!(
        code,
        RequestCode::SEND_MESSAGE | RequestCode::SEND_MESSAGE_V2 | RequestCode::SEND_BATCH_MESSAGE
    )
}

/// Counts the response, or for a oneway request logs a failure nobody else will hear of.
fn finish(proxy: &Proxy, oneway: bool, response: Option<Outgoing>) -> Option<Outgoing> {
    if oneway {
        if let Some(response) =
            response.filter(|response| response.code() != ResponseCode::SUCCESS.0)
        {
            // A oneway request has no one to tell; the log is the only trace.
            match &response {
                Outgoing::Command(command) => {
                    warn!(code = command.code, remark = ?command.remark, "oneway request not delivered")
                }
                other => warn!(code = other.code(), "oneway request not delivered"),
            }
        }
        return None;
    }
    if let Some(response) = &response {
        proxy.stats.response(response.code());
    }
    response
}

/// A send as it arrived: decoded, or bytes with its routing fields located.
enum Relayed {
    Decoded(RemotingCommand),
    Raw(RawCommand),
}

impl Relayed {
    fn ext(&self, key: &str) -> Option<&str> {
        match self {
            Relayed::Decoded(command) => command.ext(key),
            Relayed::Raw(raw) => raw.ext(key).ok().flatten(),
        }
    }

    fn opaque(&self) -> i32 {
        match self {
            Relayed::Decoded(command) => command.opaque,
            Relayed::Raw(raw) => raw.opaque,
        }
    }

    fn code(&self) -> i32 {
        match self {
            Relayed::Decoded(command) => command.code,
            Relayed::Raw(raw) => raw.code,
        }
    }

    fn body(&self) -> &Bytes {
        match self {
            Relayed::Decoded(command) => &command.body,
            Relayed::Raw(raw) => &raw.body,
        }
    }

    fn is_oneway(&self) -> bool {
        match self {
            Relayed::Decoded(command) => command.is_oneway(),
            Relayed::Raw(raw) => raw.flag & crate::remoting::FLAG_ONEWAY != 0,
        }
    }

    /// The upstream request with `changes` applied to its ext fields.
    fn upstream(&self, changes: Vec<(&'static str, String)>) -> UpstreamRequest {
        match self {
            Relayed::Decoded(command) => {
                let mut attempt = command.clone();
                for (key, value) in changes {
                    attempt.ext_fields.insert(key.to_owned(), value);
                }
                UpstreamRequest::Command(attempt)
            }
            Relayed::Raw(raw) => UpstreamRequest::Raw(raw.clone(), changes),
        }
    }
}

/// The ext keys of a send: V2 headers (SEND_MESSAGE_V2, and batches from current clients) use
/// one-letter keys.
pub(super) struct SendKeys {
    pub topic: &'static str,
    pub queue: &'static str,
    pub sys_flag: &'static str,
    pub bname: &'static str,
}

impl SendKeys {
    fn of(request: &Relayed) -> Self {
        Self::choose(request.ext("b").is_some())
    }

    pub(super) fn choose(v2: bool) -> Self {
        if v2 {
            Self {
                topic: "b",
                queue: "e",
                sys_flag: "f",
                bname: "n",
            }
        } else {
            Self {
                topic: "topic",
                queue: "queueId",
                sys_flag: "sysFlag",
                bname: BNAME,
            }
        }
    }
}

const BNAME: &str = "bname";

/// The codes the broker answers for the same names: INVALID_PARAMETER (which clients do not
/// retry), NO_PERMISSION for a system topic a client may not write.
fn refuse_name(opaque: i32, error: &NameError) -> RemotingCommand {
    let code = match error {
        NameError::Reserved { .. } => ResponseCode::NO_PERMISSION,
        _ => ResponseCode::INVALID_PARAMETER,
    };
    reply(opaque, code, error.to_string())
}

/// Checks every topic and group name a request carries before it is forwarded: a broker that does
/// not check names (an older rocketmesh, a misconfigured one) must not be handed a name that becomes
/// a path. Absent fields pass; the broker answers for a malformed header.
fn check_names(request: &RemotingCommand) -> Result<(), NameError> {
    let topic = |key: &str| request.ext(key).map_or(Ok(()), names::validate_topic);
    let group = |key: &str| request.ext(key).map_or(Ok(()), names::validate_group);
    let queues = |group: &str, queues: &[MessageQueue]| {
        names::validate_group(group)?;
        queues
            .iter()
            .try_for_each(|queue| names::validate_topic(&queue.topic))
    };
    match request.request_code() {
        RequestCode::SEND_MESSAGE
        | RequestCode::SEND_MESSAGE_V2
        | RequestCode::SEND_BATCH_MESSAGE => {
            let key = if request.ext("b").is_some() {
                "b"
            } else {
                "topic"
            };
            request
                .ext(key)
                .map_or(Ok(()), names::validate_client_topic)
        }
        RequestCode::PULL_MESSAGE
        | RequestCode::LITE_PULL_MESSAGE
        | RequestCode::POP_MESSAGE
        | RequestCode::ACK_MESSAGE
        | RequestCode::CHANGE_MESSAGE_INVISIBLETIME
        | RequestCode::QUERY_CONSUMER_OFFSET
        | RequestCode::UPDATE_CONSUMER_OFFSET => {
            topic("topic")?;
            group("consumerGroup")
        }
        RequestCode::GET_ROUTEINFO_BY_TOPIC
        | RequestCode::GET_MAX_OFFSET
        | RequestCode::GET_MIN_OFFSET
        | RequestCode::SEARCH_OFFSET_BY_TIMESTAMP
        | RequestCode::GET_EARLIEST_MSG_STORETIME
        | RequestCode::QUERY_MESSAGE => topic("topic"),
        RequestCode::GET_CONSUMER_LIST_BY_GROUP => group("consumerGroup"),
        RequestCode::CONSUMER_SEND_MSG_BACK => {
            group("group")?;
            request
                .ext("originTopic")
                .filter(|origin| !origin.is_empty())
                .map_or(Ok(()), names::validate_topic)
        }
        RequestCode::HEART_BEAT => match HeartbeatData::from_json(&request.body) {
            Ok(heartbeat) => heartbeat.consumer_data_set.iter().try_for_each(|consumer| {
                names::validate_group(&consumer.group_name)?;
                consumer
                    .subscription_data_set
                    .iter()
                    .try_for_each(|subscription| names::validate_topic(&subscription.topic))
            }),
            Err(_) => Ok(()),
        },
        RequestCode::LOCK_BATCH_MQ => match LockBatchRequestBody::from_json(&request.body) {
            Ok(body) => queues(&body.consumer_group, &body.mq_set),
            Err(_) => Ok(()),
        },
        RequestCode::UNLOCK_BATCH_MQ => match UnlockBatchRequestBody::from_json(&request.body) {
            Ok(body) => queues(&body.consumer_group, &body.mq_set),
            Err(_) => Ok(()),
        },
        RequestCode::BATCH_ACK_MESSAGE => {
            match BatchAckMessageRequestBody::from_json(&request.body) {
                Ok(body) => body.acks.iter().try_for_each(|ack| {
                    names::validate_topic(&ack.topic)?;
                    names::validate_group(&ack.consumer_group)
                }),
                Err(_) => Ok(()),
            }
        }
        RequestCode::QUERY_ASSIGNMENT => {
            match QueryAssignmentRequestBody::from_json(&request.body) {
                Ok(body) => {
                    names::validate_topic(&body.topic)?;
                    names::validate_group(&body.consumer_group)
                }
                Err(_) => Ok(()),
            }
        }
        RequestCode::SET_MESSAGE_REQUEST_MODE => {
            match SetMessageRequestModeRequestBody::from_json(&request.body) {
                Ok(body) => {
                    names::validate_topic(&body.topic)?;
                    names::validate_group(&body.consumer_group)
                }
                Err(_) => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

fn reply(opaque: i32, code: ResponseCode, remark: impl Into<String>) -> RemotingCommand {
    let template = RemotingCommand {
        opaque,
        ..RemotingCommand::default()
    };
    RemotingCommand::error_response(&template, code, remark)
}

fn no_route(opaque: i32, topic: &str) -> RemotingCommand {
    not_routed(opaque, no_route_remark(topic))
}

fn not_routed(opaque: i32, remark: String) -> RemotingCommand {
    reply(opaque, ResponseCode::TOPIC_NOT_EXIST, remark)
}

type Routed = (Arc<RouteTable>, Arc<RouteAction>);

/// The route of (`topic`, `code`). With xDS, a topic the table does not hold yet is asked for
/// and the request held until it arrives; a static route is the fallback (at once while the
/// control plane is unreachable). Without xDS, a missing route is waited for up to
/// `route_wait_ms`. `Err` is the remark for TOPIC_NOT_EXIST.
async fn route(proxy: &Proxy, topic: &str, code: i32) -> Result<Routed, String> {
    let table = proxy.routes.snapshot();
    let Some(ondemand) = proxy.ondemand() else {
        if let Some(action) = table.lookup(topic, code) {
            return Ok((table, action));
        }
        let wait = Duration::from_millis(proxy.current.load().route_wait_ms);
        if wait.is_zero() {
            return Err(no_route_remark(topic));
        }
        let _pending = proxy.stats.pending_request();
        return proxy
            .routes
            .route_for(topic, code, wait)
            .await
            .ok_or_else(|| no_route_remark(topic));
    };
    if table.has_xds_topic(topic) {
        return match table.lookup(topic, code) {
            Some(action) => Ok((table, action)),
            None => Err(no_route_remark(topic)),
        };
    }
    if let Some(action) = table.lookup(topic, code)
        && ondemand.unreachable()
    {
        return Ok((table, action));
    }
    let resolved = {
        let _pending = proxy.stats.pending_request();
        ondemand.resolve(topic).await
    };
    let table = proxy.routes.snapshot();
    match (table.lookup(topic, code), resolved) {
        (Some(action), _) => Ok((table, action)),
        (None, Err(why)) => Err(why.to_string()),
        (None, Ok(())) => Err(format!(
            "the control plane's route for topic {topic} does not cover request code {code}"
        )),
    }
}

fn no_route_remark(topic: &str) -> String {
    format!("No topic route info in rocketmesh for the topic: {topic}")
}

/// Sends `request` to `endpoint`; the answer carries the client's opaque (`None` for oneway).
async fn forward_raw(
    proxy: &Proxy,
    endpoint: &Endpoint,
    request: RemotingCommand,
) -> Result<Option<RemotingCommand>, UpstreamError> {
    let pool = proxy.pool(endpoint);
    let opaque = request.opaque;
    if request.is_oneway() {
        return pool.send_oneway(request).await.map(|()| None);
    }
    let poll = long_poll_time(&request);
    let timeout = endpoint.request_timeout + poll;
    let mut response = if poll.is_zero() {
        pool.call(request, timeout).await?
    } else {
        pool.call_parked(request, timeout).await?
    };
    response.opaque = opaque;
    Ok(Some(response))
}

/// The client's answer for an upstream outcome: failures become SYSTEM_BUSY (overload) or
/// SYSTEM_ERROR with a remark naming the broker and the cause.
pub(super) fn answer(
    result: Result<Option<RemotingCommand>, UpstreamError>,
    opaque: i32,
    endpoint: &Endpoint,
) -> Option<RemotingCommand> {
    match result {
        Ok(response) => response,
        Err(error) => {
            let code = if error.is_busy() {
                ResponseCode::SYSTEM_BUSY
            } else {
                ResponseCode::SYSTEM_ERROR
            };
            Some(reply(
                opaque,
                code,
                format!(
                    "rocketmesh: broker {} failed: {error}",
                    endpoint.metadata.broker_name
                ),
            ))
        }
    }
}

/// Sends a request to the broker it names (not one the balancer picked); the outcome still
/// moves that broker's weight, so acks and pulls to a dying broker count against it too.
async fn forward(
    proxy: &Proxy,
    endpoint: &Endpoint,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let opaque = request.opaque;
    let result = forward_raw(proxy, endpoint, request).await;
    proxy.observe(endpoint, failover::outcome_of(&result));
    answer(result, opaque, endpoint)
}

/// Longest long-poll a request may ask a broker to hold it for.
const MAX_LONG_POLL: Duration = Duration::from_secs(300);

/// Whether a broker may park `request` (a long-polling pull or pop) rather than answer at once.
pub fn may_park(request: &RemotingCommand) -> bool {
    !long_poll_time(request).is_zero()
}

/// How long the broker may hold a long-polling pull or pop before answering: added to the request
/// timeout, so a parked request is not mistaken for a dead broker.
fn long_poll_time(request: &RemotingCommand) -> Duration {
    let key = match request.request_code() {
        RequestCode::PULL_MESSAGE | RequestCode::LITE_PULL_MESSAGE => "suspendTimeoutMillis",
        RequestCode::POP_MESSAGE => "pollTime",
        _ => return Duration::ZERO,
    };
    request
        .ext(key)
        .and_then(|millis| millis.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
        .min(MAX_LONG_POLL)
}

/// How many stored records (or batch entries) a body holds: each starts with its total size.
pub(super) fn count_records(body: &Bytes) -> u64 {
    let mut offset = 0usize;
    let mut count = 0;
    while let Some(size) = body
        .get(offset..offset + 4)
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(i32::from_be_bytes)
    {
        let Ok(size) = usize::try_from(size) else {
            break;
        };
        if size < 4 {
            break;
        }
        offset += size;
        count += 1;
    }
    count
}

async fn route_info(
    proxy: &Proxy,
    downstream: &Downstream,
    request: &RemotingCommand,
) -> RemotingCommand {
    let header = match request.decode_header::<GetRouteInfoRequestHeader>() {
        Ok(header) => header,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::INVALID_PARAMETER,
                error.to_string(),
            );
        }
    };
    let (table, action) = match route(proxy, &header.topic, request.code).await {
        Ok(routed) => routed,
        Err(why) => return not_routed(request.opaque, why),
    };
    let brokers = proxy.broker_listeners.advertised();
    let route = table.topic_route(&action, |name| {
        brokers
            .get(name)
            .map_or(&downstream.advertised, |address| address)
    });
    if route.queue_datas.is_empty() {
        return no_route(request.opaque, &header.topic);
    }
    let standard_only = request
        .ext("acceptStandardJsonOnly")
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    match route.to_json_for_client(request.version, standard_only) {
        Ok(body) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body),
        Err(error) => {
            RemotingCommand::error_response(request, ResponseCode::SYSTEM_ERROR, error.to_string())
        }
    }
}

/// Passes a client's registration on to brokers in the background: the brokers then treat the
/// sidecar's connections as the client's (transaction checks, consumer membership, POP), and a
/// slow broker never delays the client's heartbeat. A registration sent to a broker's own listener
/// goes to that broker only (the client sends one to each broker it uses); one sent to the main
/// listener goes to every broker.
fn to_brokers_in_background(proxy: &Arc<Proxy>, broker: Option<&str>, request: &RemotingCommand) {
    let table = proxy.routes.snapshot();
    let endpoints = table
        .all_endpoints()
        .filter(|endpoint| broker.is_none_or(|name| endpoint.metadata.broker_name == name));
    for endpoint in endpoints {
        let proxy = proxy.clone();
        let endpoint = endpoint.clone();
        let request = request.clone();
        tokio::spawn(async move {
            let pool = proxy.pool(&endpoint);
            if let Err(error) = pool.call(request, endpoint.request_timeout).await {
                debug!(%error, broker = %endpoint.metadata.broker_name, "registration not passed on");
            }
        });
    }
}

fn heartbeat(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: &RemotingCommand,
) -> RemotingCommand {
    let heartbeat = match HeartbeatData::from_json(&request.body) {
        Ok(heartbeat) => heartbeat,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::INVALID_PARAMETER,
                format!("invalid heartbeat body: {error}"),
            );
        }
    };
    proxy.clients.heartbeat(downstream.connection, &heartbeat);
    proxy.pullpop.heartbeat(&heartbeat.client_id);
    let mut upstream = request.clone();
    upstream.set_oneway(false);
    let unseen: Vec<String> = match proxy.ondemand() {
        Some(_) => {
            let table = proxy.routes.snapshot();
            let topics: BTreeSet<&str> = heartbeat
                .consumer_data_set
                .iter()
                .flat_map(|consumer| &consumer.subscription_data_set)
                .map(|subscription| subscription.topic.as_str())
                .collect();
            for topic in &topics {
                table.touch(topic);
            }
            topics
                .into_iter()
                .filter(|topic| !table.has_xds_topic(topic))
                .map(str::to_owned)
                .collect()
        }
        None => Vec::new(),
    };
    if unseen.is_empty() {
        to_brokers_in_background(proxy, downstream.broker.as_deref(), &upstream);
    } else {
        // A consumer's registration must reach the brokers of its topics: learn them first.
        let proxy = proxy.clone();
        let broker = downstream.broker.clone();
        tokio::spawn(async move {
            let lookups = unseen
                .iter()
                .map(|topic| route(&proxy, topic, RequestCode::HEART_BEAT.0));
            futures::future::join_all(lookups).await;
            to_brokers_in_background(&proxy, broker.as_deref(), &upstream);
        });
    }
    RemotingCommand::response_to(request, ResponseCode::SUCCESS)
}

fn unregister(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: &RemotingCommand,
) -> RemotingCommand {
    match request.decode_header::<UnregisterClientRequestHeader>() {
        Ok(header) => {
            proxy.clients.unregister(
                &header.client_id,
                header.producer_group.as_deref(),
                header.consumer_group.as_deref(),
            );
            if let Some(group) = header.consumer_group.as_deref() {
                proxy
                    .pullpop
                    .client_gone(proxy, &header.client_id, Some(group));
            }
            let mut upstream = request.clone();
            upstream.set_oneway(false);
            to_brokers_in_background(proxy, downstream.broker.as_deref(), &upstream);
            RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        }
        Err(error) => RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            error.to_string(),
        ),
    }
}

/// Tells brokers that the clients registered over a closed connection are gone, where the
/// registration went: a broker listener's own broker, unless the client is still connected
/// through that listener; every broker for the main listener, unless the client is still
/// connected at all.
pub fn client_disconnected(proxy: &Arc<Proxy>, downstream: &Downstream) {
    for registration in proxy.clients.registrations_of(downstream.connection) {
        let others = &registration.other_connections;
        let target = match &downstream.broker {
            None if others.is_empty() => None,
            Some(broker) if !others.iter().flatten().any(|other| other == broker) => {
                Some(broker.as_ref())
            }
            _ => continue,
        };
        let groups = registration
            .producer_groups
            .iter()
            .map(|group| (Some(group), None))
            .chain(
                registration
                    .consumer_groups
                    .iter()
                    .map(|group| (None, Some(group))),
            );
        for (producer_group, consumer_group) in groups {
            let header = UnregisterClientRequestHeader {
                client_id: registration.client_id.clone(),
                producer_group: producer_group.cloned(),
                consumer_group: consumer_group.cloned(),
                ..Default::default()
            };
            let request =
                RemotingCommand::request(RequestCode::UNREGISTER_CLIENT, 0).with_header(&header);
            to_brokers_in_background(proxy, target, &request);
        }
    }
    let registrations = proxy.clients.registrations_of(downstream.connection);
    proxy.clients.disconnected(downstream.connection);
    for registration in registrations {
        if !proxy.clients.is_connected(&registration.client_id) {
            proxy
                .pullpop
                .client_gone(proxy, &registration.client_id, None);
        }
    }
}

/// A converted group's member sees itself alone: it then pulls every queue, and POP shares the
/// messages among the members.
fn consumer_list(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: &RemotingCommand,
) -> RemotingCommand {
    let header = match request.decode_header::<GetConsumerListByGroupRequestHeader>() {
        Ok(header) => header,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::INVALID_PARAMETER,
                error.to_string(),
            );
        }
    };
    if proxy
        .pullpop
        .answers_membership(proxy, &header.consumer_group)
        && let Some(client) = proxy.clients.client_id_of(downstream.connection)
    {
        return match (ConsumerList {
            consumer_id_list: vec![client],
        })
        .to_json()
        {
            Ok(body) => {
                RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body)
            }
            Err(error) => RemotingCommand::error_response(
                request,
                ResponseCode::SYSTEM_ERROR,
                error.to_string(),
            ),
        };
    }
    proxy
        .clients
        .consumer_list_response(request, &header.consumer_group)
}

/// Whether `endpoint` is one of the route's endpoints.
fn serves(action: &RouteAction, endpoint: &Arc<Endpoint>) -> bool {
    action
        .endpoints()
        .any(|candidate| Arc::ptr_eq(candidate, endpoint))
}

/// The broker a request addresses: its `bname` (a fast path some clients give), else the broker
/// whose listener the client dialled. `Err` names a broker the sidecar does not know.
fn addressed_broker(
    table: &RouteTable,
    downstream: &Downstream,
    bname: Option<&str>,
) -> Result<Option<Arc<Endpoint>>, String> {
    let Some(name) = bname
        .filter(|name| !name.is_empty())
        .or(downstream.broker.as_deref())
    else {
        return Ok(None);
    };
    table
        .broker(name)
        .map(Some)
        .ok_or_else(|| format!("no broker named {name:?} is known to rocketmesh"))
}

/// `sysFlag` bits that give a message's transaction type.
pub(super) const TRANSACTION_TYPE_MASK: i32 = 0xC;

/// `tried`: brokers an earlier attempt of this send failed on (the retry budget already
/// counted that retry).
async fn send(
    proxy: &Proxy,
    downstream: &Downstream,
    request: Relayed,
    mut tried: Vec<SocketAddr>,
) -> Option<Outgoing> {
    let opaque = request.opaque();
    let refuse = |code: ResponseCode, remark: String| Some(reply(opaque, code, remark).into());
    let keys = SendKeys::of(&request);
    let Some(topic) = request.ext(keys.topic).map(str::to_owned) else {
        return refuse(
            ResponseCode::INVALID_PARAMETER,
            "the send request names no topic".into(),
        );
    };
    let max_message_size = proxy.config.limits.max_message_size;
    let body_size = request.body().len();
    if max_message_size > 0 && body_size > max_message_size {
        return refuse(
            ResponseCode::MESSAGE_ILLEGAL,
            format!(
                "the message body is {body_size} bytes, more than the sidecar's limit of {max_message_size} (limits.max_message_size)"
            ),
        );
    }
    let (table, action) = match route(proxy, &topic, request.code()).await {
        Ok(routed) => routed,
        Err(why) => return Some(not_routed(opaque, why).into()),
    };
    let Some(cluster) = proxy.cluster(&action.cluster.name) else {
        return Some(no_route(opaque, &topic).into());
    };
    if tried.is_empty() {
        cluster.record_send();
    }
    let requested_queue = request
        .ext(keys.queue)
        .and_then(|queue| queue.parse::<i32>().ok())
        .unwrap_or(-1);
    // An ordered route keeps the broker and queue the client chose: its order depends on them.
    // A transaction's half message stays there too, since the client sends the END_TRANSACTION
    // that decides it to the broker it chose.
    let half_message = request
        .ext(keys.sys_flag)
        .and_then(|flag| flag.parse::<i32>().ok())
        .is_some_and(|flag| flag & TRANSACTION_TYPE_MASK == sys_flag::TRANSACTION_PREPARED);
    let kept = (action.ordered || half_message)
        .then(|| addressed_broker(&table, downstream, request.ext(keys.bname)).ok())
        .flatten()
        .flatten()
        .filter(|endpoint| {
            action.writable(endpoint)
                && serves(&action, endpoint)
                && (0..action.write_queues(endpoint)).contains(&requested_queue)
        });
    let messages = if request.code() == RequestCode::SEND_BATCH_MESSAGE.0 {
        count_records(request.body())
    } else {
        1
    };
    let started = Instant::now();
    if let Some(endpoint) = kept {
        let result = relay(proxy, &endpoint, &request, Vec::new()).await;
        count_send(proxy, &topic, messages, started, &result);
        return relay_answer(result, opaque, &endpoint);
    }
    // Otherwise the balancer picks, and a failed send is retried on another writable broker
    // within the retry budget and the request's deadline.
    loop {
        let Some((endpoint, picked)) = cluster.pick(
            &action.cluster,
            &action,
            |e| action.writable(e),
            |address| proxy.upstreams.connectable(address),
            &tried,
        ) else {
            return refuse(
                ResponseCode::TOPIC_NOT_EXIST,
                format!("no writable broker serves the topic {topic} in rocketmesh"),
            );
        };
        let queues = action.write_queues(&endpoint).max(1);
        let queue = if action.ordered && requested_queue >= 0 {
            requested_queue % queues
        } else {
            (proxy.next_queue.fetch_add(1, Ordering::Relaxed) % queues as usize) as i32
        };
        let changes = vec![
            (keys.queue, queue.to_string()),
            (keys.bname, endpoint.metadata.broker_name.clone()),
        ];
        let result = relay(proxy, &endpoint, &request, changes).await;
        let outcome = failover::outcome_of(&result);
        cluster.balancer.report(picked, outcome);
        let in_time = started.elapsed() < endpoint.request_timeout;
        if outcome == Outcome::Failure
            && !action.ordered
            && in_time
            && cluster.may_retry(tried.len() as u32 + 1)
        {
            debug!(broker = %endpoint.metadata.broker_name, topic, "send failed, retrying on another broker");
            tried.push(endpoint.address);
            continue;
        }
        count_send(proxy, &topic, messages, started, &result);
        return relay_answer(result, opaque, &endpoint);
    }
}

/// Sends a send to `endpoint` with `changes` made to its ext fields; the answer carries the
/// client's opaque (`None` for oneway), in the form the request came in.
async fn relay(
    proxy: &Proxy,
    endpoint: &Endpoint,
    request: &Relayed,
    changes: Vec<(&'static str, String)>,
) -> Result<Option<Outgoing>, UpstreamError> {
    let upstream = request.upstream(changes);
    let pool = proxy.pool(endpoint);
    if request.is_oneway() {
        return pool.relay_oneway(upstream).await.map(|()| None);
    }
    let response = pool.relay(upstream, endpoint.request_timeout).await?;
    let opaque = request.opaque();
    Ok(Some(match request {
        Relayed::Raw(_) => Outgoing::Raw(response.with_opaque(opaque)),
        Relayed::Decoded(_) => {
            let mut response = response
                .decode()
                .map_err(|error| UpstreamError::Malformed {
                    address: endpoint.address,
                    reason: error.to_string(),
                })?;
            response.opaque = opaque;
            Outgoing::Command(response)
        }
    }))
}

fn relay_answer(
    result: Result<Option<Outgoing>, UpstreamError>,
    opaque: i32,
    endpoint: &Endpoint,
) -> Option<Outgoing> {
    match result {
        Ok(response) => response,
        Err(error) => answer(Err(error), opaque, endpoint).map(Outgoing::from),
    }
}

/// Counts an acknowledged (or oneway, hence unconfirmed but delivered) send.
fn count_send(
    proxy: &Proxy,
    topic: &str,
    messages: u64,
    started: Instant,
    result: &Result<Option<Outgoing>, UpstreamError>,
) {
    let delivered = match result {
        Ok(Some(response)) => response.code() == ResponseCode::SUCCESS.0,
        Ok(None) => true,
        Err(_) => false,
    };
    if delivered {
        proxy
            .stats
            .messages_sent(topic, messages, started.elapsed());
    }
}

async fn pop(
    proxy: &Proxy,
    downstream: &Downstream,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let Some(topic) = request.ext("topic").map(str::to_owned) else {
        return Some(reply(
            request.opaque,
            ResponseCode::INVALID_PARAMETER,
            "the pop request names no topic",
        ));
    };
    let group = request.ext("consumerGroup").unwrap_or_default().to_owned();
    let (table, action) = match route(proxy, &topic, request.code).await {
        Ok(routed) => routed,
        Err(why) => return Some(not_routed(request.opaque, why)),
    };
    let queue_id = request
        .ext("queueId")
        .and_then(|queue| queue.parse::<i32>().ok())
        .unwrap_or(-1);
    // A pop of one queue means that broker's queue; a pop of all queues may go anywhere readable.
    let named = (queue_id >= 0)
        .then(|| addressed_broker(&table, downstream, request.ext(BNAME)).ok())
        .flatten()
        .flatten()
        .filter(|endpoint| action.readable(endpoint) && serves(&action, endpoint));
    let opaque = request.opaque;
    let result = match named {
        Some(endpoint) => {
            let result = forward_raw(proxy, &endpoint, request).await;
            proxy.observe(&endpoint, failover::outcome_of(&result));
            (result, endpoint)
        }
        None => {
            let cluster = proxy.cluster(&action.cluster.name);
            let picked = cluster.as_ref().and_then(|cluster| {
                cluster.pick(
                    &action.cluster,
                    &action,
                    |e| action.readable(e),
                    |address| proxy.upstreams.connectable(address),
                    &[],
                )
            });
            let (Some(cluster), Some((endpoint, picked))) = (cluster, picked) else {
                return Some(reply(
                    opaque,
                    ResponseCode::TOPIC_NOT_EXIST,
                    format!("no readable broker serves the topic {topic} in rocketmesh"),
                ));
            };
            let result = forward_raw(proxy, &endpoint, request).await;
            cluster
                .balancer
                .report(picked, failover::outcome_of(&result));
            (result, endpoint)
        }
    };
    let (result, endpoint) = result;
    if let Ok(Some(response)) = &result
        && response.code == ResponseCode::SUCCESS.0
    {
        proxy
            .stats
            .messages_out(&topic, &group, count_records(&response.body));
    }
    answer(result, opaque, &endpoint)
}

/// ACK_MESSAGE and CHANGE_MESSAGE_INVISIBLETIME go to the broker that served the pop, named in
/// the receipt handle: no per-connection table, and acks still land after a reconnect.
async fn by_receipt(
    proxy: &Proxy,
    downstream: &Downstream,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let table = proxy.routes.snapshot();
    let handle = request
        .ext("extraInfo")
        .and_then(|text| text.parse::<ExtraInfo>().ok());
    let endpoint = match handle {
        Some(handle) => table.broker(&handle.broker_name).ok_or_else(|| {
            format!(
                "the receipt handle names broker {:?}, which rocketmesh does not know",
                handle.broker_name
            )
        }),
        None => named_broker(proxy, &table, downstream, &request),
    };
    match endpoint {
        Ok(endpoint) => forward(proxy, &endpoint, request).await,
        Err(reason) => Some(reply(request.opaque, ResponseCode::MESSAGE_ILLEGAL, reason)),
    }
}

async fn batch_ack(
    proxy: &Proxy,
    downstream: &Downstream,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let table = proxy.routes.snapshot();
    let endpoint = match BatchAckMessageRequestBody::from_json(&request.body) {
        Ok(body) if !body.broker_name.is_empty() => {
            table.broker(&body.broker_name).ok_or_else(|| {
                format!(
                    "the batch ack names broker {:?}, which rocketmesh does not know",
                    body.broker_name
                )
            })
        }
        Ok(_) => named_broker(proxy, &table, downstream, &request),
        Err(error) => Err(format!("invalid batch ack body: {error}")),
    };
    match endpoint {
        Ok(endpoint) => forward(proxy, &endpoint, request).await,
        Err(reason) => Some(reply(request.opaque, ResponseCode::MESSAGE_ILLEGAL, reason)),
    }
}

/// The broker a request names: `bname`; for END_TRANSACTION the broker that asked about it or the
/// store host of its offset message id; the broker whose listener the client dialled; a lock
/// body's first queue; or the only broker serving its topic.
fn named_broker(
    proxy: &Proxy,
    table: &RouteTable,
    downstream: &Downstream,
    request: &RemotingCommand,
) -> Result<Arc<Endpoint>, String> {
    let bname = request.ext(BNAME).filter(|name| !name.is_empty());
    if bname.is_some()
        && let Some(endpoint) = addressed_broker(table, downstream, bname)?
    {
        return Ok(endpoint);
    }
    let code = request.request_code();
    if code == RequestCode::END_TRANSACTION {
        // The answer to a relayed check goes back to the broker that asked; a first answer names
        // the half message by its offset message id, which holds the store host.
        let asked = ["msgId", "transactionId"]
            .iter()
            .filter_map(|key| request.ext(key))
            .find_map(|id| proxy.checks.broker_of(id));
        let stored_at = request
            .ext("msgId")
            .and_then(|id| id.parse::<OffsetMessageId>().ok())
            .map(|id| id.store_host);
        if let Some(endpoint) = asked
            .or(stored_at)
            .and_then(|address| table.endpoint_at(address))
        {
            return Ok(endpoint);
        }
    }
    if let Some(endpoint) = addressed_broker(table, downstream, None)? {
        return Ok(endpoint);
    }
    if (code == RequestCode::LOCK_BATCH_MQ || code == RequestCode::UNLOCK_BATCH_MQ)
        && let Ok(body) = LockBatchRequestBody::from_json(&request.body)
        && let Some(queue) = body.mq_set.first()
    {
        return table.broker(&queue.broker_name).ok_or_else(|| {
            format!(
                "no broker named {:?} is known to rocketmesh",
                queue.broker_name
            )
        });
    }
    let topic = request.ext("topic").unwrap_or_default();
    if let Some(action) = table.lookup(topic, request.code) {
        let names: BTreeSet<&str> = action
            .endpoints()
            .map(|endpoint| endpoint.metadata.broker_name.as_str())
            .collect();
        if let [only] = names.into_iter().collect::<Vec<_>>().as_slice() {
            return table
                .broker(only)
                .ok_or_else(|| format!("no broker named {only:?} is known to rocketmesh"));
        }
    }
    Err(format!(
        "cannot tell which broker should serve {} for topic {topic:?}: the request names none (no bname)",
        request.code_name().unwrap_or("the request")
    ))
}

async fn to_named_broker(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let mut table = proxy.routes.snapshot();
    if let Some(topic) = request.ext("topic").filter(|topic| !topic.is_empty())
        && proxy.ondemand().is_some()
    {
        if table.has_xds_topic(topic) {
            table.touch(topic);
        } else {
            // A client that kept its route data across a sidecar restart (or an idle spell)
            // names brokers this sidecar has not learned yet: learn them from the topic first.
            let _ = route(proxy, topic, request.code).await;
            table = proxy.routes.snapshot();
        }
    }
    let endpoint = match named_broker(proxy, &table, downstream, &request) {
        Ok(endpoint) => endpoint,
        Err(reason) => return Some(reply(request.opaque, ResponseCode::SYSTEM_ERROR, reason)),
    };
    if request.request_code() == RequestCode::LOCK_BATCH_MQ
        && let Ok(body) = LockBatchRequestBody::from_json(&request.body)
    {
        proxy.pullpop.locked(proxy, &body.consumer_group);
    }
    let request = match PullPop::intercept(proxy, downstream, &endpoint, request).await {
        Intercept::Answered(answer) => return answer,
        Intercept::Forward(request) => request,
    };
    let pull = matches!(
        request.request_code(),
        RequestCode::PULL_MESSAGE | RequestCode::LITE_PULL_MESSAGE
    );
    let counted = pull.then(|| {
        (
            request.ext("topic").unwrap_or_default().to_owned(),
            request.ext("consumerGroup").unwrap_or_default().to_owned(),
        )
    });
    let response = forward(proxy, &endpoint, request).await;
    if let (Some((topic, group)), Some(response)) = (counted, &response)
        && response.code == ResponseCode::SUCCESS.0
    {
        proxy
            .stats
            .messages_out(&topic, &group, count_records(&response.body));
    }
    response
}

/// The topic of a request, from its header or, for QUERY_ASSIGNMENT and SET_MESSAGE_REQUEST_MODE,
/// from its JSON body.
fn topic_of(request: &RemotingCommand) -> Option<String> {
    if let Some(topic) = request.ext("topic") {
        return Some(topic.to_owned());
    }
    let body: serde_json::Value = serde_json::from_slice(&request.body).ok()?;
    body.get("topic")?.as_str().map(str::to_owned)
}

/// Sends the request to every broker of its topic's route (or every known broker) and combines the
/// answers: QUERY_ASSIGNMENT assignments and QUERY_MESSAGE records are merged; a VIEW_MESSAGE_BY_ID
/// found on more than one broker is refused as ambiguous; otherwise the first success is returned,
/// or the last error when none succeeded.
async fn to_every_broker(proxy: &Proxy, request: RemotingCommand) -> Option<RemotingCommand> {
    let topic = topic_of(&request).unwrap_or_default();
    if !topic.is_empty() && proxy.ondemand().is_some() {
        // The brokers of a topic not held yet are learned first (a POP consumer's assignment
        // query may come before any route request through this sidecar).
        let _ = route(proxy, &topic, request.code).await;
    }
    let table = proxy.routes.snapshot();
    let mut brokers: Vec<Arc<Endpoint>> = Vec::new();
    let mut seen = BTreeSet::new();
    let endpoints: Vec<Arc<Endpoint>> = match table.lookup(&topic, request.code) {
        Some(action) => action.endpoints().cloned().collect(),
        None => table.all_endpoints().cloned().collect(),
    };
    for endpoint in endpoints {
        if seen.insert(endpoint.metadata.broker_name.clone())
            && let Some(master) = table.broker(&endpoint.metadata.broker_name)
        {
            brokers.push(master);
        }
    }
    if brokers.is_empty() {
        return Some(no_route(request.opaque, &topic));
    }
    let code = request.request_code();
    let oneway = request.is_oneway();
    let request_opaque = request.opaque;
    let offset = request.ext("offset").map(str::to_owned);
    let calls = brokers
        .iter()
        .map(|endpoint| forward(proxy, endpoint, request.clone()));
    let answers: Vec<(&Arc<Endpoint>, RemotingCommand)> = brokers
        .iter()
        .zip(futures::future::join_all(calls).await)
        .filter_map(|(broker, answer)| Some((broker, answer?)))
        .collect();
    if oneway {
        return None;
    }
    let (found, failures): (Vec<_>, Vec<_>) = answers
        .into_iter()
        .partition(|(_, answer)| answer.code == ResponseCode::SUCCESS.0);
    if code == RequestCode::VIEW_MESSAGE_BY_ID && found.len() > 1 {
        // Commit-log offsets are per broker: with several answers there is no telling which
        // message the client meant, and a wrong one is worse than none.
        let names: Vec<&str> = found
            .iter()
            .map(|(broker, _)| broker.metadata.broker_name.as_str())
            .collect();
        return Some(reply(
            request_opaque,
            ResponseCode::SYSTEM_ERROR,
            format!(
                "commit-log offset {} exists on brokers {}: ask at the broker's own address or name it with bname",
                offset.unwrap_or_default(),
                names.join(", ")
            ),
        ));
    }
    let successes: Vec<RemotingCommand> = found.into_iter().map(|(_, answer)| answer).collect();
    let Some(first) = successes.first().cloned() else {
        return failures.into_iter().map(|(_, answer)| answer).last();
    };
    Some(match code {
        RequestCode::QUERY_ASSIGNMENT => merge_assignments(first, &successes),
        RequestCode::QUERY_MESSAGE => {
            let body: Vec<u8> = successes
                .iter()
                .flat_map(|answer| answer.body.iter().copied())
                .collect();
            first.with_body(body)
        }
        _ => first,
    })
}

/// Concatenates the `messageQueueAssignments` of every broker's QUERY_ASSIGNMENT answer: each
/// broker assigns only its own queues.
fn merge_assignments(first: RemotingCommand, answers: &[RemotingCommand]) -> RemotingCommand {
    const KEY: &str = "messageQueueAssignments";
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for answer in answers {
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(&answer.body) else {
            continue;
        };
        if let Some(assignments) = body.get(KEY).and_then(serde_json::Value::as_array) {
            merged.extend(assignments.iter().cloned());
        }
    }
    let body = serde_json::json!({ KEY: merged });
    match serde_json::to_vec(&body) {
        Ok(bytes) => first.with_body(bytes),
        Err(_) => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::message::MessageRecord;

    #[test]
    fn records_are_counted_by_their_size_fields() {
        let mut body = bytes::BytesMut::new();
        for index in 0..3 {
            MessageRecord {
                topic: "T".into(),
                body: Bytes::from(vec![b'x'; index * 10]),
                ..MessageRecord::default()
            }
            .encode(&mut body)
            .expect("encode");
        }
        let body = body.freeze();
        assert_eq!(count_records(&body), 3);
        assert_eq!(count_records(&Bytes::from_static(&[0, 0, 0, 0])), 0);
        assert_eq!(count_records(&Bytes::new()), 0);
    }
}
