//! Consumer offsets and queue offset queries.

use super::{bad_request, check_group, check_topic, store_failure};
use crate::broker::state::BrokerState;
use crate::broker::store::Boundary;
use crate::remoting::header::{
    GetMaxOffsetRequestHeader, GetMinOffsetRequestHeader, OffsetResponseHeader,
    QueryConsumerOffsetRequestHeader, SearchOffsetRequestHeader, UpdateConsumerOffsetRequestHeader,
};
use crate::remoting::{RemotingCommand, ResponseCode};

fn offset_response(request: &RemotingCommand, offset: u64) -> RemotingCommand {
    RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_header(
        &OffsetResponseHeader {
            offset: offset as i64,
        },
    )
}

pub fn query_consumer_offset(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<QueryConsumerOffsetRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = check_topic(request, &header.topic)
        .and_then(|()| check_group(request, &header.consumer_group))
    {
        return response;
    }
    if let Some(offset) =
        state
            .metadata
            .consumer_offset(&header.consumer_group, &header.topic, header.queue_id)
    {
        return offset_response(request, offset.max(0) as u64);
    }
    // No committed offset yet: a queue that still holds its first message starts at 0, as in Java.
    let (min, _) = state.store.queue_offsets(&header.topic, header.queue_id);
    if min == 0 && header.set_zero_if_not_found != Some(false) {
        return offset_response(request, 0);
    }
    RemotingCommand::error_response(
        request,
        ResponseCode::QUERY_NOT_FOUND,
        "Not found, V3_0_6_SNAPSHOT maybe this group consumer boot first",
    )
}

pub fn update_consumer_offset(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<UpdateConsumerOffsetRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = check_topic(request, &header.topic)
        .and_then(|()| check_group(request, &header.consumer_group))
    {
        return response;
    }
    match state.metadata.commit_offset(
        &header.consumer_group,
        &header.topic,
        header.queue_id,
        header.commit_offset,
    ) {
        Ok(()) => RemotingCommand::response_to(request, ResponseCode::SUCCESS),
        Err(error) => store_failure(request, error),
    }
}

pub fn max_offset(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    match request.decode_header::<GetMaxOffsetRequestHeader>() {
        Ok(header) => match check_topic(request, &header.topic) {
            Ok(()) => offset_response(
                request,
                state.store.queue_offsets(&header.topic, header.queue_id).1,
            ),
            Err(response) => response,
        },
        Err(error) => bad_request(request, error),
    }
}

pub fn min_offset(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    match request.decode_header::<GetMinOffsetRequestHeader>() {
        Ok(header) => match check_topic(request, &header.topic) {
            Ok(()) => offset_response(
                request,
                state.store.queue_offsets(&header.topic, header.queue_id).0,
            ),
            Err(response) => response,
        },
        Err(error) => bad_request(request, error),
    }
}

pub fn search_offset(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<SearchOffsetRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = check_topic(request, &header.topic) {
        return response;
    }
    let boundary = match header.boundary_type.as_deref() {
        Some(kind) if kind.eq_ignore_ascii_case("upper") => Boundary::Upper,
        _ => Boundary::Lower,
    };
    match state
        .store
        .search_offset(&header.topic, header.queue_id, header.timestamp, boundary)
    {
        Ok(offset) => offset_response(request, offset),
        Err(error) => store_failure(request, error),
    }
}
