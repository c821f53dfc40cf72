//! LOCK_BATCH_MQ and UNLOCK_BATCH_MQ: orderly consumers lock the queues they consume.

use std::time::Instant;

use crate::broker::state::BrokerState;
use crate::remoting::body::{
    JsonBody, LockBatchRequestBody, LockBatchResponseBody, MessageQueue, UnlockBatchRequestBody,
};
use crate::remoting::{RemotingCommand, ResponseCode};

fn body<B: JsonBody>(request: &RemotingCommand) -> Result<B, RemotingCommand> {
    B::from_json(&request.body).map_err(|error| {
        RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            format!("invalid lock body: {error}"),
        )
    })
}

/// The group and every queue's topic of a lock body.
fn check_names(
    request: &RemotingCommand,
    group: &str,
    queues: &[MessageQueue],
) -> Result<(), RemotingCommand> {
    super::check_group(request, group)?;
    queues
        .iter()
        .try_for_each(|queue| super::check_topic(request, &queue.topic))
}

pub fn lock(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let body: LockBatchRequestBody = match body(request) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(response) = check_names(request, &body.consumer_group, &body.mq_set) {
        return response;
    }
    let granted = state.queue_locks.try_lock(
        &body.consumer_group,
        &body.client_id,
        body.mq_set
            .iter()
            .map(|queue| (queue.topic.as_str(), queue.queue_id)),
        Instant::now(),
    );
    let lock_ok_mq_set = granted
        .into_iter()
        .map(|(topic, queue_id)| MessageQueue {
            broker_name: state.config.broker_name.clone(),
            queue_id,
            topic: topic.to_owned(),
        })
        .collect();
    match (LockBatchResponseBody { lock_ok_mq_set }).to_json() {
        Ok(json) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(json),
        Err(error) => {
            RemotingCommand::error_response(request, ResponseCode::SYSTEM_ERROR, error.to_string())
        }
    }
}

pub fn unlock(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    match body::<UnlockBatchRequestBody>(request) {
        Ok(body) => {
            if let Err(response) = check_names(request, &body.consumer_group, &body.mq_set) {
                return response;
            }
            state.queue_locks.unlock(
                &body.consumer_group,
                &body.client_id,
                body.mq_set
                    .iter()
                    .map(|queue| (queue.topic.as_str(), queue.queue_id)),
            );
            RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        }
        Err(response) => response,
    }
}
