//! VIEW_MESSAGE_BY_ID and QUERY_MESSAGE.

use bytes::Bytes;

use super::{bad_request, store_failure};
use crate::broker::state::BrokerState;
use crate::remoting::header::{
    QueryMessageRequestHeader, QueryMessageResponseHeader, ViewMessageRequestHeader,
};
use crate::remoting::{RemotingCommand, ResponseCode};

pub fn view_message(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<ViewMessageRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    let Ok(offset) = u64::try_from(header.offset) else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            "negative offset",
        );
    };
    match state.store.read_at(offset) {
        Ok(raw) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(raw),
        Err(error) => RemotingCommand::error_response(
            request,
            ResponseCode::SYSTEM_ERROR,
            format!("can not find message by the offset, {offset}: {error}"),
        ),
    }
}

pub fn query_message(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<QueryMessageRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = super::check_topic(request, &header.topic) {
        return response;
    }
    let max = usize::try_from(header.max_num).unwrap_or(0).clamp(1, 64);
    let found = state.store.query_by_key(
        &header.topic,
        &header.key,
        header.unique_key_query.unwrap_or(false),
        header.begin_timestamp,
        header.end_timestamp,
        max,
    );
    let found = match found {
        Ok(found) => found,
        Err(error) => return store_failure(request, error),
    };
    if found.is_empty() {
        return RemotingCommand::error_response(
            request,
            ResponseCode::QUERY_NOT_FOUND,
            "can not find message, maybe time range not correct",
        );
    }
    let response_header = QueryMessageResponseHeader {
        index_last_update_timestamp: 0,
        index_last_update_phyoffset: state.store.commit_log().max_offset() as i64,
    };
    RemotingCommand::response_to(request, ResponseCode::SUCCESS)
        .with_header(&response_header)
        .with_body(Bytes::from(found.concat()))
}
