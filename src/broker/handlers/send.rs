//! SEND_MESSAGE, SEND_MESSAGE_V2 and SEND_BATCH_MESSAGE.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use super::{bad_request, check_client_topic, store_failure};
use crate::broker::state::BrokerState;
use crate::broker::{schedule, transaction};
use crate::remoting::header::{
    SendMessageRequestHeader, SendMessageRequestHeaderV2, SendMessageResponseHeader,
};
use crate::remoting::message::{self, MessageRecord, Properties, parse_properties, property};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};

pub async fn handle(
    state: &BrokerState,
    peer: SocketAddr,
    request: &RemotingCommand,
) -> RemotingCommand {
    let header = match request.request_code() {
        RequestCode::SEND_MESSAGE => request.decode_header::<SendMessageRequestHeader>(),
        _ => request
            .decode_header::<SendMessageRequestHeaderV2>()
            .map(SendMessageRequestHeader::from),
    };
    let header = match header {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    // Schedule, transaction, POP-log and template topics are the broker's own: a client writing
    // them could pick where a message is later re-delivered (REAL_TOPIC, REAL_QID).
    if let Err(response) = check_client_topic(request, &header.topic) {
        return response;
    }
    let topic = match state.topic_for_send(&header.topic) {
        Ok(Some(topic)) => topic,
        Ok(None) => {
            return RemotingCommand::error_response(
                request,
                ResponseCode::TOPIC_NOT_EXIST,
                format!("topic[{}] not exist, apply first please!", header.topic),
            );
        }
        Err(error) => return store_failure(request, error),
    };
    if topic.perm & crate::broker::store::metadata::perm::WRITE == 0 {
        return RemotingCommand::error_response(
            request,
            ResponseCode::NO_PERMISSION,
            format!("the topic[{}] sending is forbidden", header.topic),
        );
    }
    let queue_id = if header.queue_id < 0 {
        state.pick_queue(topic.write_queue_nums)
    } else if header.queue_id >= topic.write_queue_nums {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            format!(
                "request queueId[{}] is illegal, topic {} has {} write queues",
                header.queue_id, header.topic, topic.write_queue_nums
            ),
        );
    } else {
        header.queue_id
    };

    let batch = request.request_code() == RequestCode::SEND_BATCH_MESSAGE;
    let messages: Vec<(Bytes, Properties, i32)> = if batch {
        match message::decode_batch(&request.body) {
            Ok(entries) => entries
                .into_iter()
                .map(|e| (e.body, e.properties, e.flag))
                .collect(),
            Err(error) => {
                return RemotingCommand::error_response(
                    request,
                    ResponseCode::MESSAGE_ILLEGAL,
                    format!("invalid batch body: {error}"),
                );
            }
        }
    } else {
        let properties = parse_properties(header.properties.as_deref().unwrap_or(""));
        vec![(request.body.clone(), properties, header.flag)]
    };
    if messages.is_empty() {
        return RemotingCommand::error_response(
            request,
            ResponseCode::MESSAGE_ILLEGAL,
            "the batch is empty",
        );
    }
    if let Some(size) = messages
        .iter()
        .map(|(body, _, _)| body.len())
        .find(|len| *len > state.config.max_message_size)
    {
        return RemotingCommand::error_response(
            request,
            ResponseCode::MESSAGE_ILLEGAL,
            format!(
                "the message body size {size} exceeds the limit of {} bytes",
                state.config.max_message_size
            ),
        );
    }

    let records: Vec<MessageRecord> = messages
        .into_iter()
        .map(|(body, mut properties, flag)| {
            if !properties.contains_key(property::UNIQ_KEY) {
                properties.insert(property::UNIQ_KEY.to_owned(), state.uniq_keys.next());
            }
            properties.insert(property::CLUSTER.to_owned(), state.config.cluster.clone());
            MessageRecord {
                queue_id,
                flag,
                sys_flag: header.sys_flag,
                born_timestamp: header.born_timestamp,
                born_host: peer,
                reconsume_times: header.reconsume_times.unwrap_or(0),
                body,
                topic: header.topic.clone(),
                properties,
                ..MessageRecord::default()
            }
        })
        .collect();
    let uniq_keys: Vec<String> = records
        .iter()
        .filter_map(|r| r.uniq_key().map(str::to_owned))
        .collect();
    let now = schedule::now_ms();
    let max_delay = Duration::from_secs(state.config.max_delay_secs);
    let mut due = None;
    for record in &records {
        match schedule::delivery_time(&record.properties, &state.delay_levels, max_delay, now) {
            Ok(None) => {}
            Ok(Some(_)) if batch => {
                return RemotingCommand::error_response(
                    request,
                    ResponseCode::MESSAGE_ILLEGAL,
                    "delayed messages cannot be sent in a batch",
                );
            }
            Ok(Some(time)) => due = Some(time),
            Err(error) => {
                return RemotingCommand::error_response(
                    request,
                    ResponseCode::MESSAGE_ILLEGAL,
                    error.to_string(),
                );
            }
        }
    }
    let transactional = !batch
        && records
            .first()
            .and_then(|record| record.properties.get(transaction::TRAN_MSG))
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    let stored = match due {
        // A half message waits for its producer's decision, not a clock.
        _ if transactional => match records.into_iter().next() {
            Some(record) => state
                .transactions
                .prepare(&state.store, record)
                .map(|put| vec![put]),
            None => Ok(Vec::new()),
        },
        Some(due) => match records.into_iter().next() {
            Some(record) => state
                .scheduler
                .schedule(&state.store, record, due)
                .map(|put| vec![put]),
            None => Ok(Vec::new()),
        },
        None => state.store.put_batch(records),
    };
    let puts = match stored {
        Ok(puts) => puts,
        Err(error) => return store_failure(request, error),
    };
    let Some(last) = puts.last() else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::SYSTEM_ERROR,
            "nothing was stored",
        );
    };
    if let Err(error) = state.store.wait_durable(last.end).await {
        return store_failure(request, error);
    }
    if transactional {
        // Invisible until END_TRANSACTION commits it.
    } else if due.is_some() {
        state.scheduled.notify_one();
    } else {
        state.arrivals.notify(&header.topic);
    }

    let store_host = state.store.config().store_host;
    let msg_ids: Vec<String> = puts
        .iter()
        .map(|put| {
            message::OffsetMessageId {
                store_host,
                commit_log_offset: put.commit_offset as i64,
            }
            .to_string()
        })
        .collect();
    let response_header = SendMessageResponseHeader {
        msg_id: msg_ids.join(","),
        queue_id,
        queue_offset: puts[0].queue_offset as i64,
        transaction_id: (!batch).then(|| uniq_keys.first().cloned()).flatten(),
        msg_region: Some("DefaultRegion".into()),
        trace_on: Some("true".into()),
        ..Default::default()
    };
    RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_header(&response_header)
}
