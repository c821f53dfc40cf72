//! POP_MESSAGE, ACK_MESSAGE, BATCH_ACK_MESSAGE, CHANGE_MESSAGE_INVISIBLETIME, and the assignment
//! codes that let clients choose POP (QUERY_ASSIGNMENT, SET_MESSAGE_REQUEST_MODE).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::pull::TagFilter;
use super::{
    bad_request, check_group, check_topic, consumable, illegal_queue, invalid_name, store_failure,
};
use crate::broker::pop::{ORDER_REVIVE_QID, PopRequest, Popped};
use crate::broker::schedule::now_ms;
use crate::broker::state::BrokerState;
use crate::broker::store::{PutResult, RequestMode, StoreError};
use crate::names;
use crate::remoting::body::{
    BatchAckMessageRequestBody, JsonBody, MessageQueue, MessageQueueAssignment,
    QueryAssignmentRequestBody, QueryAssignmentResponseBody, SetMessageRequestModeRequestBody,
};
use crate::remoting::extra_info::{
    ExtraInfo, MsgOffsetEntry, StartOffsetEntry, TopicType, format_info,
};
use crate::remoting::header::{
    AckMessageRequestHeader, ChangeInvisibleTimeRequestHeader, ChangeInvisibleTimeResponseHeader,
    PopMessageRequestHeader, PopMessageResponseHeader,
};
use crate::remoting::{RemotingCommand, ResponseCode};

/// Most messages one pop returns (Java rejects more than 32).
const MAX_POP_BATCH: i32 = 32;
/// Longest a pop may stay parked.
const MAX_POLL: Duration = Duration::from_secs(60);

async fn durable(state: &BrokerState, put: Option<PutResult>) -> Result<(), StoreError> {
    match put {
        Some(put) => state.store.wait_durable(put.end).await,
        None => Ok(()),
    }
}

pub async fn pop(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<PopMessageRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if header.max_msg_nums < 1 || header.max_msg_nums > MAX_POP_BATCH {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            format!(
                "the max message number {} is outside 1..={MAX_POP_BATCH}",
                header.max_msg_nums
            ),
        );
    }
    if header.invisible_time < 0 {
        return negative_invisible_time(request, header.invisible_time);
    }
    let (topic, group) = match consumable(
        state,
        request,
        &header.topic,
        &header.consumer_group,
        header.exp_type.as_deref(),
    ) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let queue_ids: Vec<i32> = if header.queue_id < 0 {
        (0..topic.read_queue_nums).collect()
    } else if header.queue_id < topic.read_queue_nums {
        vec![header.queue_id]
    } else {
        return illegal_queue(request, header.queue_id, &topic);
    };
    let filter = TagFilter::parse(header.exp.as_deref().unwrap_or("*"));
    let order = header.order.unwrap_or(false);
    let invisible_ms = header.invisible_time.max(1);
    // Start at a different queue each time so one busy queue does not starve the others.
    let mut queue_ids = queue_ids;
    let rotate = (now_ms() as usize) % queue_ids.len().max(1);
    queue_ids.rotate_left(rotate);
    let dead_letter_topic = match names::dead_letter_topic(&header.consumer_group) {
        Ok(topic) => topic,
        Err(error) => return invalid_name(request, &error),
    };
    let pop_once = || {
        let pop_request = PopRequest {
            group: &header.consumer_group,
            topic: &header.topic,
            queue_ids: queue_ids.clone(),
            max_messages: header.max_msg_nums as usize,
            invisible_ms,
            now_ms: now_ms(),
            init_at_end: header.init_mode == 1,
            order,
            max_attempts: group.retry_max_times.max(1) + 1,
            dead_letter_topic: dead_letter_topic.clone(),
        };
        state.pop.pop(&state.store, &pop_request, |entry, raw| {
            filter.passes(entry, raw)
        })
    };

    let born = if header.born_time > 0 {
        header.born_time
    } else {
        now_ms()
    };
    let poll = Duration::from_millis(header.poll_time.max(0) as u64).min(MAX_POLL);
    let deadline_ms = born + poll.as_millis() as i64;
    let mut outcome = match pop_once() {
        Ok(outcome) => outcome,
        Err(error) => return store_failure(request, error),
    };
    if outcome.messages.is_empty()
        && !poll.is_zero()
        && state.parked_pulls.fetch_add(1, Ordering::AcqRel) < state.config.max_parked_pulls
    {
        loop {
            let arrival = state.arrivals.pops().notified();
            tokio::pin!(arrival);
            arrival.as_mut().enable();
            let now = now_ms();
            if now >= deadline_ms {
                break;
            }
            // Wake for a new message, or when an in-flight one becomes visible again.
            let wake_at = outcome
                .next_revive_ms
                .map_or(deadline_ms, |revive| revive.min(deadline_ms));
            let nap = Duration::from_millis((wake_at - now).max(1) as u64);
            let _ = tokio::time::timeout(nap, arrival).await;
            match pop_once() {
                Ok(again) if !again.messages.is_empty() => {
                    outcome = again;
                    break;
                }
                Ok(again) => outcome = again,
                Err(error) => {
                    state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
                    return store_failure(request, error);
                }
            }
        }
        state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
    } else if outcome.messages.is_empty() && !poll.is_zero() {
        state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
        return RemotingCommand::error_response(
            request,
            ResponseCode::POLLING_FULL,
            "too many parked pops",
        );
    }
    if let Err(error) = durable(state, outcome.last_put).await {
        return store_failure(request, error);
    }
    if outcome.messages.is_empty() {
        return RemotingCommand::error_response(
            request,
            ResponseCode::POLLING_TIMEOUT,
            "NO_MESSAGE_IN_QUEUE",
        );
    }
    // Every message of one response shares the pop time the checkpoint recorded.
    let pop_time = outcome
        .messages
        .first()
        .and_then(|message| {
            state.pop.pop_time(
                &header.consumer_group,
                &header.topic,
                message.queue_id,
                message.queue_offset,
            )
        })
        .unwrap_or_else(now_ms);
    let (start_offset_info, msg_offset_info) = offset_infos(&header.topic, &outcome.messages);
    let response_header = PopMessageResponseHeader {
        pop_time,
        invisible_time: invisible_ms,
        revive_qid: if order { ORDER_REVIVE_QID } else { 0 },
        rest_num: outcome.rest as i64,
        start_offset_info: Some(start_offset_info),
        msg_offset_info: Some(msg_offset_info),
        ..Default::default()
    };
    let body: Vec<Bytes> = outcome
        .messages
        .into_iter()
        .map(|message| message.record)
        .collect();
    RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        .with_remark("FOUND")
        .with_header(&response_header)
        .with_body(Bytes::from(body.concat()))
}

/// The `startOffsetInfo` and `msgOffsetInfo` strings of a pop answer, as Java's broker writes them.
/// Clients build each receipt's checkpoint offset from the start offset of its queue, so the
/// messages of one queue share a checkpoint and one BATCH_ACK entry acks them all (without it,
/// every message would be a checkpoint of its own). The start is the lowest offset handed out in
/// that queue, so every message's place in the ack bitset is non-negative.
fn offset_infos(topic: &str, messages: &[Popped]) -> (String, String) {
    let topic_type = TopicType::of_popped_topic(topic);
    let mut queues: Vec<MsgOffsetEntry> = Vec::with_capacity(1);
    for message in messages {
        let offset = message.queue_offset as i64;
        match queues
            .iter_mut()
            .find(|entry| entry.queue_id == message.queue_id)
        {
            Some(entry) => entry.offsets.push(offset),
            None => queues.push(MsgOffsetEntry {
                topic_type,
                queue_id: message.queue_id,
                offsets: vec![offset],
            }),
        }
    }
    let starts: Vec<StartOffsetEntry> = queues
        .iter()
        .map(|entry| StartOffsetEntry {
            topic_type,
            queue_id: entry.queue_id,
            start_offset: entry.offsets.iter().copied().min().unwrap_or_default(),
        })
        .collect();
    (format_info(&starts), format_info(&queues))
}

/// Java answers a negative invisible time with an error too; silently clamping it would hide a
/// client bug and make messages visible again at once.
fn negative_invisible_time(request: &RemotingCommand, invisible_time: i64) -> RemotingCommand {
    RemotingCommand::error_response(
        request,
        ResponseCode::INVALID_PARAMETER,
        format!("invisibleTime {invisible_time} is negative; it must be 0 or more milliseconds"),
    )
}

/// The topic and group of an ACK, BATCH_ACK or CHANGE_MESSAGE_INVISIBLETIME entry.
fn check_names(request: &RemotingCommand, topic: &str, group: &str) -> Result<(), RemotingCommand> {
    check_topic(request, topic)?;
    check_group(request, group)
}

/// The receipt handle and message offset of an ACK or CHANGE_MESSAGE_INVISIBLETIME.
fn parse_handle(
    request: &RemotingCommand,
    extra_info: &str,
    offset: i64,
) -> Result<(ExtraInfo, u64), RemotingCommand> {
    let illegal = |remark: String| {
        RemotingCommand::error_response(request, ResponseCode::MESSAGE_ILLEGAL, remark)
    };
    let handle = extra_info
        .parse::<ExtraInfo>()
        .map_err(|error| illegal(format!("invalid extraInfo: {error}")))?;
    let offset = u64::try_from(offset).map_err(|_| illegal(format!("negative offset {offset}")))?;
    Ok((handle, offset))
}

pub async fn ack(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<AckMessageRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = check_names(request, &header.topic, &header.consumer_group) {
        return response;
    }
    let (handle, offset) = match parse_handle(request, &header.extra_info, header.offset) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    match state.pop.ack(
        &state.store,
        &header.consumer_group,
        &header.topic,
        header.queue_id,
        offset,
        handle.pop_time,
    ) {
        Ok(put) => match durable(state, put).await {
            Ok(()) => {
                // An ack can free an orderly queue for the pops parked on it.
                state.arrivals.notify(&header.topic);
                RemotingCommand::response_to(request, ResponseCode::SUCCESS)
            }
            Err(error) => store_failure(request, error),
        },
        Err(error) => store_failure(request, error),
    }
}

pub async fn batch_ack(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let body = match BatchAckMessageRequestBody::from_json(&request.body) {
        Ok(body) => body,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::MESSAGE_ILLEGAL,
                format!("invalid batch ack body: {error}"),
            );
        }
    };
    for ack in &body.acks {
        if let Err(response) = check_names(request, &ack.topic, &ack.consumer_group) {
            return response;
        }
    }
    let mut last = None;
    for ack in &body.acks {
        let offsets = match ack.offsets() {
            Ok(offsets) => offsets,
            Err(error) => {
                return RemotingCommand::error_response(
                    request,
                    ResponseCode::MESSAGE_ILLEGAL,
                    error.to_string(),
                );
            }
        };
        let offsets: Vec<u64> = offsets
            .into_iter()
            .filter_map(|offset| u64::try_from(offset).ok())
            .collect();
        match state.pop.ack_many(
            &state.store,
            &ack.consumer_group,
            &ack.topic,
            ack.queue_id,
            &offsets,
            ack.pop_time,
        ) {
            Ok((_, Some(put))) => last = Some(put),
            Ok((_, None)) => {}
            Err(error) => return store_failure(request, error),
        }
    }
    match durable(state, last).await {
        Ok(()) => RemotingCommand::response_to(request, ResponseCode::SUCCESS),
        Err(error) => store_failure(request, error),
    }
}

pub async fn change_invisible_time(
    state: &BrokerState,
    request: &RemotingCommand,
) -> RemotingCommand {
    let header = match request.decode_header::<ChangeInvisibleTimeRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = check_names(request, &header.topic, &header.consumer_group) {
        return response;
    }
    if header.invisible_time < 0 {
        return negative_invisible_time(request, header.invisible_time);
    }
    let (handle, offset) = match parse_handle(request, &header.extra_info, header.offset) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let now = now_ms();
    let changed = state.pop.change_invisible_time(
        &state.store,
        &header.consumer_group,
        &header.topic,
        header.queue_id,
        offset,
        handle.pop_time,
        header.invisible_time,
        now,
    );
    let pop_time = match changed {
        Ok(Some((pop_time, put))) => {
            if let Err(error) = state.store.wait_durable(put.end).await {
                return store_failure(request, error);
            }
            // Parked pops recompute when this message becomes visible again.
            state.arrivals.notify(&header.topic);
            pop_time
        }
        // A stale handle: nothing to move; answer as Java does with the requested times.
        Ok(None) => now,
        Err(error) => return store_failure(request, error),
    };
    let response_header = ChangeInvisibleTimeResponseHeader {
        pop_time,
        invisible_time: header.invisible_time,
        revive_qid: handle.revive_qid,
    };
    RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_header(&response_header)
}

pub fn set_request_mode(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let body = match SetMessageRequestModeRequestBody::from_json(&request.body) {
        Ok(body) => body,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::INVALID_PARAMETER,
                format!("invalid body: {error}"),
            );
        }
    };
    if !matches!(body.mode.as_str(), "PULL" | "POP") {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            format!("unknown mode {}", body.mode),
        );
    }
    if let Err(response) = check_names(request, &body.topic, &body.consumer_group) {
        return response;
    }
    if body.topic.starts_with(names::RETRY_PREFIX) {
        return RemotingCommand::error_response(
            request,
            ResponseCode::NO_PERMISSION,
            "retry topics are always consumed by PULL",
        );
    }
    if let Err(error) = state.metadata.set_request_mode(
        &body.consumer_group,
        &body.topic,
        RequestMode {
            mode: body.mode,
            pop_share_queue_num: body.pop_share_queue_num,
        },
    ) {
        return store_failure(request, error);
    }
    match state.metadata.persist() {
        Ok(()) => RemotingCommand::response_to(request, ResponseCode::SUCCESS),
        Err(error) => store_failure(request, error),
    }
}

pub fn query_assignment(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let body = match QueryAssignmentRequestBody::from_json(&request.body) {
        Ok(body) => body,
        Err(error) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::INVALID_PARAMETER,
                format!("invalid body: {error}"),
            );
        }
    };
    if let Err(response) = check_names(request, &body.topic, &body.consumer_group) {
        return response;
    }
    let Some(topic) = state.metadata.topic(&body.topic) else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::TOPIC_NOT_EXIST,
            format!("topic[{}] not exist, apply first please!", body.topic),
        );
    };
    let mode = if body.topic.starts_with(names::RETRY_PREFIX) {
        "PULL".to_owned()
    } else {
        state
            .metadata
            .request_mode(&body.consumer_group, &body.topic)
            .map(|mode| mode.mode)
            .unwrap_or_else(|| state.config.default_message_request_mode.clone())
    };
    let queue = |queue_id| MessageQueue {
        broker_name: state.config.broker_name.clone(),
        queue_id,
        topic: body.topic.clone(),
    };
    let queue_ids: Vec<i32> = if mode == "POP" || body.message_model == "BROADCASTING" {
        // POP: every client pops every queue; the broker hands each message to one of them.
        (0..topic.read_queue_nums).collect()
    } else {
        // PULL: queues shared out evenly among the group's clients, in client id order.
        let clients = state
            .clients
            .consumer_ids(&body.consumer_group)
            .unwrap_or_default();
        let Some(index) = clients.iter().position(|client| *client == body.client_id) else {
            return assignment_response(request, Vec::new());
        };
        (0..topic.read_queue_nums)
            .filter(|queue_id| (*queue_id as usize) % clients.len() == index)
            .collect()
    };
    let assignments = queue_ids
        .into_iter()
        .map(|queue_id| MessageQueueAssignment {
            attachments: None,
            message_queue: queue(queue_id),
            mode: mode.clone(),
        })
        .collect();
    assignment_response(request, assignments)
}

fn assignment_response(
    request: &RemotingCommand,
    message_queue_assignments: Vec<MessageQueueAssignment>,
) -> RemotingCommand {
    match (QueryAssignmentResponseBody {
        message_queue_assignments,
    })
    .to_json()
    {
        Ok(body) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body),
        Err(error) => {
            RemotingCommand::error_response(request, ResponseCode::SYSTEM_ERROR, error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn popped(queue_id: i32, queue_offset: u64) -> Popped {
        Popped {
            queue_id,
            queue_offset,
            record: Bytes::new(),
        }
    }

    #[test]
    fn offset_infos_give_each_queue_one_start_at_its_lowest_offset() {
        // A revived message (offset 3) can come before new ones of the same queue.
        let messages = [popped(1, 7), popped(1, 8), popped(0, 20), popped(1, 3)];
        let (starts, offsets) = offset_infos("Orders", &messages);
        assert_eq!(starts, "0 1 3;0 0 20");
        assert_eq!(offsets, "0 1 7,8,3;0 0 20");
        let (starts, _) = offset_infos("%RETRY%g", &[popped(0, 5)]);
        assert_eq!(starts, "1 0 5");
    }
}
