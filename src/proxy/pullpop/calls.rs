//! The broker requests conversion makes on its own account: acks, invisible-time changes and
//! dead-lettering, with standard POP codes and JSON headers (binary headers truncate codes above
//! 32767), so any 5.x broker serves them.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{debug, info};

use super::vqueue::Receipt;
use crate::proxy::Proxy;
use crate::proxy::routes::Endpoint;
use crate::remoting::body::{BatchAck, BatchAckMessageRequestBody, JsonBody};
use crate::remoting::extra_info::ExtraInfo;
use crate::remoting::header::{
    AckMessageRequestHeader, ChangeInvisibleTimeRequestHeader, ChangeInvisibleTimeResponseHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode, SerializeType};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no broker named {0:?} is known to rocketmesh")]
    UnknownBroker(String),
    #[error("broker {broker}: {reason}")]
    Failed { broker: String, reason: String },
}

fn json(mut request: RemotingCommand) -> RemotingCommand {
    request.serialize_type = SerializeType::Json;
    request
}

fn endpoint(proxy: &Proxy, broker: &str) -> Result<Arc<Endpoint>, CallError> {
    proxy
        .routes
        .snapshot()
        .broker(broker)
        .ok_or_else(|| CallError::UnknownBroker(broker.to_owned()))
}

/// Sends `request` to the named broker and insists on SUCCESS.
async fn call(
    proxy: &Proxy,
    broker: &str,
    request: RemotingCommand,
) -> Result<RemotingCommand, CallError> {
    let endpoint = endpoint(proxy, broker)?;
    let failed = |reason: String| CallError::Failed {
        broker: broker.to_owned(),
        reason,
    };
    let response = proxy
        .pool(&endpoint)
        .call(request, endpoint.request_timeout)
        .await
        .map_err(|error| failed(error.to_string()))?;
    if response.code != ResponseCode::SUCCESS.0 {
        return Err(failed(format!(
            "code {}: {}",
            response.code,
            response.remark.unwrap_or_default()
        )));
    }
    Ok(response)
}

fn refused_as_unsupported(error: &CallError) -> bool {
    matches!(error, CallError::Failed { reason, .. }
        if reason.starts_with(&format!("code {}:", ResponseCode::REQUEST_CODE_NOT_SUPPORTED.0)))
}

/// Acks receipts of one group, by BATCH_ACK_MESSAGE per broker where the broker has it (5.1.3
/// on), else one ACK_MESSAGE each. Returns how many acks failed.
pub async fn ack_all(proxy: &Proxy, group: &str, receipts: Vec<Receipt>) -> usize {
    let engine = &proxy.pullpop;
    let mut by_broker: BTreeMap<Arc<str>, Vec<Receipt>> = BTreeMap::new();
    for receipt in receipts {
        by_broker
            .entry(receipt.broker.clone())
            .or_default()
            .push(receipt);
    }
    let mut failures = 0;
    for (broker, receipts) in by_broker {
        if !engine.batch_ack_refused(&broker) {
            match batch_ack(proxy, group, &broker, &receipts).await {
                Ok(()) => continue,
                Err(error) if refused_as_unsupported(&error) => {
                    info!(%broker, "broker has no BATCH_ACK_MESSAGE: acking one message at a time");
                    engine.refuse_batch_ack(&broker);
                }
                Err(error) => {
                    debug!(%error, "batch ack failed, acking one message at a time");
                }
            }
        }
        for receipt in &receipts {
            if let Err(error) = ack(proxy, group, receipt).await {
                debug!(%error, "ack failed: the message will be served again");
                failures += 1;
            }
        }
    }
    failures
}

async fn batch_ack(
    proxy: &Proxy,
    group: &str,
    broker: &str,
    receipts: &[Receipt],
) -> Result<(), CallError> {
    // One entry per checkpoint: the receipts of one pop of one queue share it. They mostly come
    // in runs, so each receipt is first compared with the entry it most likely joins.
    let same_checkpoint = |a: &Receipt, b: &Receipt| {
        let (x, y) = (&a.handle, &b.handle);
        a.ack_topic == b.ack_topic
            && x.queue_id == y.queue_id
            && x.ck_queue_offset == y.ck_queue_offset
            && x.pop_time == y.pop_time
            && x.invisible_time == y.invisible_time
            && x.revive_qid == y.revive_qid
            && x.topic_type == y.topic_type
    };
    let mut checkpoints: Vec<(&Receipt, Vec<i64>)> = Vec::new();
    for receipt in receipts {
        let joined = match checkpoints.last_mut() {
            Some((first, offsets)) if same_checkpoint(first, receipt) => {
                offsets.push(receipt.queue_offset);
                true
            }
            _ => false,
        };
        if joined {
            continue;
        }
        match checkpoints
            .iter_mut()
            .find(|(first, _)| same_checkpoint(first, receipt))
        {
            Some((_, offsets)) => offsets.push(receipt.queue_offset),
            None => checkpoints.push((receipt, vec![receipt.queue_offset])),
        }
    }
    let mut acks = Vec::with_capacity(checkpoints.len());
    for (first, offsets) in checkpoints {
        let handle = &first.handle;
        let mut ack = BatchAck {
            consumer_group: group.to_owned(),
            topic: first.ack_topic.to_string(),
            retry: handle.topic_type.as_str().to_owned(),
            start_offset: handle.ck_queue_offset,
            queue_id: handle.queue_id,
            revive_queue_id: handle.revive_qid,
            pop_time: handle.pop_time,
            invisible_time: handle.invisible_time,
            bit_set: String::new(),
        };
        ack.set_offsets(offsets)
            .map_err(|error| CallError::Failed {
                broker: broker.to_owned(),
                reason: error.to_string(),
            })?;
        acks.push(ack);
    }
    let body = BatchAckMessageRequestBody {
        acks,
        broker_name: broker.to_owned(),
    }
    .to_json()
    .map_err(|error| CallError::Failed {
        broker: broker.to_owned(),
        reason: error.to_string(),
    })?;
    let request = json(RemotingCommand::request(RequestCode::BATCH_ACK_MESSAGE, 0).with_body(body));
    call(proxy, broker, request).await.map(|_| ())
}

pub async fn ack(proxy: &Proxy, group: &str, receipt: &Receipt) -> Result<(), CallError> {
    let header = AckMessageRequestHeader {
        consumer_group: group.to_owned(),
        topic: receipt.ack_topic.to_string(),
        queue_id: receipt.handle.queue_id,
        extra_info: receipt.handle.to_string(),
        offset: receipt.queue_offset,
        broker_name: Some(receipt.broker.to_string()),
        ..Default::default()
    };
    let request = json(RemotingCommand::request(RequestCode::ACK_MESSAGE, 0).with_header(&header));
    call(proxy, &receipt.broker, request).await.map(|_| ())
}

/// Makes a message invisible for `invisible_ms` from now; returns the new handle, which replaces
/// the old one (the broker writes a new checkpoint and acks the old).
pub async fn change_invisible_time(
    proxy: &Proxy,
    group: &str,
    receipt: &Receipt,
    invisible_ms: i64,
) -> Result<ExtraInfo, CallError> {
    let header = ChangeInvisibleTimeRequestHeader {
        consumer_group: group.to_owned(),
        topic: receipt.ack_topic.to_string(),
        queue_id: receipt.handle.queue_id,
        extra_info: receipt.handle.to_string(),
        offset: receipt.queue_offset,
        invisible_time: invisible_ms,
        broker_name: Some(receipt.broker.to_string()),
        ..Default::default()
    };
    let request = json(
        RemotingCommand::request(RequestCode::CHANGE_MESSAGE_INVISIBLETIME, 0).with_header(&header),
    );
    let response = call(proxy, &receipt.broker, request).await?;
    let answer = response
        .decode_header::<ChangeInvisibleTimeResponseHeader>()
        .map_err(|error| CallError::Failed {
            broker: receipt.broker.to_string(),
            reason: format!("invalid answer to an invisible-time change: {error}"),
        })?;
    Ok(ExtraInfo {
        ck_queue_offset: receipt.queue_offset,
        pop_time: answer.pop_time,
        invisible_time: answer.invisible_time,
        revive_qid: answer.revive_qid,
        queue_offset: Some(receipt.queue_offset),
        ..receipt.handle.clone()
    })
}

/// Moves a message to the group's dead-letter topic the way the 5.x proxy does: a send-back with
/// delay level −1, which every broker turns into a dead-letter write.
pub async fn dead_letter(
    proxy: &Proxy,
    send_back: &RemotingCommand,
    broker: &str,
) -> Result<(), CallError> {
    let mut request = send_back.clone();
    request.opaque = 0;
    request.set_oneway(false);
    request
        .ext_fields
        .insert("delayLevel".to_owned(), "-1".to_owned());
    request
        .ext_fields
        .insert("bname".to_owned(), broker.to_owned());
    call(proxy, broker, request).await.map(|_| ())
}
