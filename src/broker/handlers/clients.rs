//! HEART_BEAT, UNREGISTER_CLIENT and GET_CONSUMER_LIST_BY_GROUP.

use super::bad_request;
use crate::broker::clients::ConnectionId;
use crate::broker::state::BrokerState;
use crate::remoting::body::{HeartbeatData, JsonBody};
use crate::remoting::header::{GetConsumerListByGroupRequestHeader, UnregisterClientRequestHeader};
use crate::remoting::{RemotingCommand, ResponseCode};

pub fn heartbeat(
    state: &BrokerState,
    connection: ConnectionId,
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
    // Every name is checked before anything is stored: a group becomes a retry topic, and so a
    // topics.json entry and a directory.
    for consumer in &heartbeat.consumer_data_set {
        if let Err(response) = super::check_group(request, &consumer.group_name) {
            return response;
        }
        for subscription in &consumer.subscription_data_set {
            if let Err(response) = super::check_topic(request, &subscription.topic) {
                return response;
            }
        }
    }
    for consumer in &heartbeat.consumer_data_set {
        // Consumers subscribe to their retry topic from the start; it must exist for their pulls.
        let created = state.group(&consumer.group_name).and_then(|_| {
            let retry = crate::names::retry_topic(&consumer.group_name)?;
            state.ensure_system_topic(&retry)
        });
        if let Err(error) = created {
            return super::store_failure(request, error);
        }
    }
    state.clients.heartbeat(connection, &heartbeat);
    RemotingCommand::response_to(request, ResponseCode::SUCCESS)
}

pub fn unregister(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    match request.decode_header::<UnregisterClientRequestHeader>() {
        Ok(header) => {
            state.clients.unregister(
                &header.client_id,
                header.producer_group.as_deref(),
                header.consumer_group.as_deref(),
            );
            RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        }
        Err(error) => bad_request(request, error),
    }
}

pub fn consumer_list(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<GetConsumerListByGroupRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = super::check_group(request, &header.consumer_group) {
        return response;
    }
    state
        .clients
        .consumer_list_response(request, &header.consumer_group)
}
