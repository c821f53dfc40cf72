//! CONSUMER_SEND_MSG_BACK: a consumer gives a message back; it returns through the group's retry
//! topic after the delay of its attempt, or goes to the group's dead-letter topic once it has been
//! delivered the group's maximum number of times.

use std::time::Duration;

use super::{bad_request, check_group, check_topic, invalid_name, store_failure};
use crate::broker::schedule::{self, property as schedule_property};
use crate::broker::state::BrokerState;
use crate::names;
use crate::remoting::header::ConsumerSendMsgBackRequestHeader;
use crate::remoting::message::MessageRecord;
use crate::remoting::{RemotingCommand, ResponseCode};

/// Properties that trace a retried message back to where it came from.
pub mod property {
    pub const RETRY_TOPIC: &str = "RETRY_TOPIC";
    pub const ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
    pub const DLQ_ORIGIN_TOPIC: &str = "DLQ_ORIGIN_TOPIC";
    pub const DLQ_ORIGIN_MESSAGE_ID: &str = "DLQ_ORIGIN_MESSAGE_ID";
}

pub async fn send_back(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<ConsumerSendMsgBackRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    // The group becomes part of a topic name, and so of a directory path.
    if let Err(response) = check_group(request, &header.group) {
        return response;
    }
    if let Some(origin) = header.origin_topic.as_deref().filter(|t| !t.is_empty())
        && let Err(response) = check_topic(request, origin)
    {
        return response;
    }
    let original = u64::try_from(header.offset)
        .ok()
        .and_then(|offset| state.store.read_at(offset).ok())
        .and_then(|raw| MessageRecord::decode(&raw, false).ok())
        .map(|(record, _)| record);
    let Some(original) = original else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::SYSTEM_ERROR,
            format!("look message by offset failed, {}", header.offset),
        );
    };
    let group = match state.group(&header.group) {
        Ok(group) => group,
        Err(error) => return store_failure(request, error),
    };
    let max_attempts = header.max_reconsume_times.unwrap_or(group.retry_max_times);
    let origin_id = header
        .origin_msg_id
        .clone()
        .or_else(|| original.uniq_key().map(str::to_owned))
        .unwrap_or_else(|| original.offset_msg_id());
    let first_topic = original
        .properties
        .get(property::RETRY_TOPIC)
        .cloned()
        .unwrap_or_else(|| original.topic.clone());

    let mut message = original.clone();
    message.queue_id = 0;
    message.properties.remove(schedule_property::DELAY);
    message
        .properties
        .entry(property::ORIGIN_MESSAGE_ID.to_owned())
        .or_insert(origin_id.clone());
    let to_dead_letters = original.reconsume_times >= max_attempts || header.delay_level < 0;
    let target = if to_dead_letters {
        names::dead_letter_topic(&header.group)
    } else {
        names::retry_topic(&header.group)
    };
    let topic = match target {
        Ok(topic) => topic,
        Err(error) => return invalid_name(request, &error),
    };
    if let Err(error) = state.ensure_system_topic(&topic) {
        return store_failure(request, error);
    }
    message.topic = topic;
    let stored = if to_dead_letters {
        message
            .properties
            .insert(property::DLQ_ORIGIN_TOPIC.to_owned(), first_topic);
        message
            .properties
            .insert(property::DLQ_ORIGIN_MESSAGE_ID.to_owned(), origin_id);
        state.store.put(message)
    } else {
        message.reconsume_times = original.reconsume_times + 1;
        message
            .properties
            .insert(property::RETRY_TOPIC.to_owned(), first_topic);
        let level = if header.delay_level == 0 {
            3 + original.reconsume_times
        } else {
            header.delay_level
        };
        message
            .properties
            .insert(schedule_property::DELAY.to_owned(), level.to_string());
        let max_delay = Duration::from_secs(state.config.max_delay_secs);
        match schedule::delivery_time(
            &message.properties,
            &state.delay_levels,
            max_delay,
            schedule::now_ms(),
        ) {
            Ok(Some(due)) => {
                let put = state.scheduler.schedule(&state.store, message, due);
                state.scheduled.notify_one();
                put
            }
            _ => state.store.put(message),
        }
    };
    match stored {
        Ok(put) => {
            if let Err(error) = state.store.wait_durable(put.end).await {
                return store_failure(request, error);
            }
            state.arrivals.notify_all();
            RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        }
        Err(error) => store_failure(request, error),
    }
}
