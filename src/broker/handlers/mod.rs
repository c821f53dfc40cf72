//! Request handlers of the bundled broker, one module per family of codes.

mod clients;
mod locks;
mod offsets;
mod pop;
pub mod pull;
mod query;
pub mod retry;
mod route;
pub mod send;
mod transaction;

use std::net::SocketAddr;

use super::clients::ConnectionId;
use super::state::BrokerState;
use super::store::{StoreError, SubscriptionGroupConfig, TopicConfig};
use crate::names::{self, NameError};
use crate::remoting::{HeaderError, RemotingCommand, RequestCode, ResponseCode};

/// Handles one request; `None` for oneway requests, which get no response.
pub async fn handle(
    state: &BrokerState,
    connection: ConnectionId,
    peer: SocketAddr,
    request: RemotingCommand,
) -> Option<RemotingCommand> {
    let response = match request.request_code() {
        RequestCode::SEND_MESSAGE
        | RequestCode::SEND_MESSAGE_V2
        | RequestCode::SEND_BATCH_MESSAGE => send::handle(state, peer, &request).await,
        RequestCode::PULL_MESSAGE | RequestCode::LITE_PULL_MESSAGE => {
            pull::handle(state, connection, &request).await
        }
        RequestCode::QUERY_CONSUMER_OFFSET => offsets::query_consumer_offset(state, &request),
        RequestCode::UPDATE_CONSUMER_OFFSET => offsets::update_consumer_offset(state, &request),
        RequestCode::GET_MAX_OFFSET => offsets::max_offset(state, &request),
        RequestCode::GET_MIN_OFFSET => offsets::min_offset(state, &request),
        RequestCode::SEARCH_OFFSET_BY_TIMESTAMP => offsets::search_offset(state, &request),
        RequestCode::CONSUMER_SEND_MSG_BACK => retry::send_back(state, &request).await,
        RequestCode::POP_MESSAGE => pop::pop(state, &request).await,
        RequestCode::ACK_MESSAGE => pop::ack(state, &request).await,
        RequestCode::BATCH_ACK_MESSAGE => pop::batch_ack(state, &request).await,
        RequestCode::CHANGE_MESSAGE_INVISIBLETIME => {
            pop::change_invisible_time(state, &request).await
        }
        RequestCode::QUERY_ASSIGNMENT => pop::query_assignment(state, &request),
        RequestCode::SET_MESSAGE_REQUEST_MODE => pop::set_request_mode(state, &request),
        RequestCode::LOCK_BATCH_MQ => locks::lock(state, &request),
        RequestCode::UNLOCK_BATCH_MQ => locks::unlock(state, &request),
        RequestCode::END_TRANSACTION => transaction::end_transaction(state, &request).await,
        RequestCode::HEART_BEAT => clients::heartbeat(state, connection, &request),
        RequestCode::UNREGISTER_CLIENT => clients::unregister(state, &request),
        RequestCode::GET_CONSUMER_LIST_BY_GROUP => clients::consumer_list(state, &request),
        RequestCode::GET_ROUTEINFO_BY_TOPIC => route::topic_route(state, &request),
        RequestCode::GET_BROKER_CLUSTER_INFO => route::cluster_info(state, &request),
        RequestCode::UPDATE_AND_CREATE_TOPIC => route::create_topic(state, &request),
        RequestCode::VIEW_MESSAGE_BY_ID => query::view_message(state, &request),
        RequestCode::QUERY_MESSAGE => query::query_message(state, &request),
        code => RemotingCommand::error_response(
            &request,
            ResponseCode::REQUEST_CODE_NOT_SUPPORTED,
            format!(" request type {} not supported", code.0),
        ),
    };
    (!request.is_oneway()).then_some(response)
}

/// Checks shared by the consuming codes: the topic exists, the group may consume, the filter is
/// by tag. Returns the topic's and the group's configuration.
fn consumable(
    state: &BrokerState,
    request: &RemotingCommand,
    topic: &str,
    group: &str,
    expression_type: Option<&str>,
) -> Result<(TopicConfig, SubscriptionGroupConfig), RemotingCommand> {
    check_topic(request, topic)?;
    check_group(request, group)?;
    let Some(topic_config) = state.metadata.topic(topic) else {
        return Err(RemotingCommand::error_response(
            request,
            ResponseCode::TOPIC_NOT_EXIST,
            format!("topic[{topic}] not exist, apply first please!"),
        ));
    };
    let group_config = state
        .group(group)
        .map_err(|error| store_failure(request, error))?;
    if !group_config.consume_enable {
        return Err(RemotingCommand::error_response(
            request,
            ResponseCode::NO_PERMISSION,
            format!("subscription group [{group}] no permission to consume"),
        ));
    }
    if expression_type.is_some_and(|kind| !kind.eq_ignore_ascii_case("TAG")) {
        return Err(RemotingCommand::error_response(
            request,
            ResponseCode::SUBSCRIPTION_PARSE_FAILED,
            "this broker filters by TAG only; SQL92 filtering is not supported",
        ));
    }
    Ok((topic_config, group_config))
}

/// A queue id outside the topic's read queues.
fn illegal_queue(request: &RemotingCommand, queue_id: i32, topic: &TopicConfig) -> RemotingCommand {
    RemotingCommand::error_response(
        request,
        ResponseCode::INVALID_PARAMETER,
        format!(
            "queueId[{queue_id}] is illegal, topic {} has {} read queues",
            topic.topic_name, topic.read_queue_nums
        ),
    )
}

/// A name the broker refuses. INVALID_PARAMETER rather than Java's SYSTEM_ERROR: producers retry
/// SYSTEM_ERROR, and a bad name never becomes good. Reserved topics get NO_PERMISSION, as in Java.
fn invalid_name(request: &RemotingCommand, error: &NameError) -> RemotingCommand {
    let code = match error {
        NameError::Reserved { .. } => ResponseCode::NO_PERMISSION,
        _ => ResponseCode::INVALID_PARAMETER,
    };
    RemotingCommand::error_response(request, code, error.to_string())
}

/// Any valid topic name (reads, offsets, routes).
fn check_topic(request: &RemotingCommand, topic: &str) -> Result<(), RemotingCommand> {
    names::validate_topic(topic).map_err(|error| invalid_name(request, &error))
}

/// A topic a client may write.
fn check_client_topic(request: &RemotingCommand, topic: &str) -> Result<(), RemotingCommand> {
    names::validate_client_topic(topic).map_err(|error| invalid_name(request, &error))
}

fn check_group(request: &RemotingCommand, group: &str) -> Result<(), RemotingCommand> {
    names::validate_group(group).map_err(|error| invalid_name(request, &error))
}

/// A request whose header does not parse.
fn bad_request(request: &RemotingCommand, error: HeaderError) -> RemotingCommand {
    RemotingCommand::error_response(request, ResponseCode::INVALID_PARAMETER, error.to_string())
}

/// A request the store could not serve.
fn store_failure(request: &RemotingCommand, error: StoreError) -> RemotingCommand {
    let code = match error {
        StoreError::InvalidRecord(_)
        | StoreError::EntryTooLarge { .. }
        | StoreError::EmptyEntry => ResponseCode::MESSAGE_ILLEGAL,
        StoreError::Failed | StoreError::Closed => ResponseCode::SERVICE_NOT_AVAILABLE,
        StoreError::InvalidName(error) => return invalid_name(request, &error),
        StoreError::OutsideDataDir { .. } => ResponseCode::INVALID_PARAMETER,
        _ => ResponseCode::SYSTEM_ERROR,
    };
    RemotingCommand::error_response(request, code, format!("store error: {error}"))
}
