//! PULL_MESSAGE and LITE_PULL_MESSAGE, with tag filtering and long polling.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{bad_request, consumable, illegal_queue, store_failure};
use crate::broker::clients::ConnectionId;
use crate::broker::state::BrokerState;
use crate::broker::store::{QueueEntry, StoreError};
use crate::remoting::body::SubscriptionData;
use crate::remoting::header::{PullMessageRequestHeader, PullMessageResponseHeader};
use crate::remoting::message::{MessageRecord, java_string_hash};
use crate::remoting::{RemotingCommand, ResponseCode};

/// `PullSysFlag` bits.
pub mod pull_flag {
    pub const COMMIT_OFFSET: i32 = 0x1;
    pub const SUSPEND: i32 = 0x2;
    pub const SUBSCRIPTION: i32 = 0x4;
}

/// Most messages one pull returns, whatever the client asks.
const MAX_PULL_BATCH: i32 = 256;
/// Longest a pull may stay parked, whatever the client asks.
const MAX_SUSPEND: Duration = Duration::from_secs(60);

/// A tag filter from a subscription expression (`*`, or `a || b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    All,
    Tags { codes: Vec<i64>, tags: Vec<String> },
}

impl TagFilter {
    /// Whether a message passes: the tag code first, then the record's own tag.
    pub fn passes(&self, entry: &QueueEntry, raw: &Bytes) -> bool {
        self.passes_code(entry) && self.passes_record(raw)
    }

    pub fn parse(expression: &str) -> Self {
        let tags: Vec<String> = expression
            .split("||")
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
            .map(str::to_owned)
            .collect();
        if tags.is_empty() || tags.iter().any(|tag| tag == "*") {
            return TagFilter::All;
        }
        let codes = tags
            .iter()
            .map(|tag| i64::from(java_string_hash(tag)))
            .collect();
        TagFilter::Tags { codes, tags }
    }

    fn from_subscription(subscription: &SubscriptionData) -> Self {
        Self::parse(&subscription.sub_string)
    }

    /// First check: the tag code in the consume queue.
    fn passes_code(&self, entry: &QueueEntry) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags { codes, .. } => codes.contains(&entry.tag_code),
        }
    }

    /// Second check on the record itself, since different tags can share a hash.
    fn passes_record(&self, raw: &Bytes) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags { tags, .. } => MessageRecord::decode(raw, false)
                .ok()
                .and_then(|(record, _)| record.tags().map(|tag| tags.iter().any(|t| t == tag)))
                .unwrap_or(false),
        }
    }
}

/// What one look at the queue found.
struct PullOutcome {
    code: ResponseCode,
    remark: &'static str,
    next_begin_offset: u64,
    min_offset: u64,
    max_offset: u64,
    body: Bytes,
}

pub async fn handle(
    state: &BrokerState,
    connection: ConnectionId,
    request: &RemotingCommand,
) -> RemotingCommand {
    let header = match request.decode_header::<PullMessageRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    let (topic, _) = match consumable(
        state,
        request,
        &header.topic,
        &header.consumer_group,
        header.expression_type.as_deref(),
    ) {
        Ok(found) => found,
        Err(response) => return response,
    };
    if header.queue_id < 0 || header.queue_id >= topic.read_queue_nums {
        return illegal_queue(request, header.queue_id, &topic);
    }
    state.clients.pulled(
        connection,
        &header.consumer_group,
        &header.topic,
        header.queue_id,
    );
    let filter = if header.sys_flag & pull_flag::SUBSCRIPTION != 0 {
        TagFilter::parse(header.subscription.as_deref().unwrap_or("*"))
    } else {
        match state
            .clients
            .subscription(&header.consumer_group, &header.topic)
        {
            Some(subscription) => TagFilter::from_subscription(&subscription),
            None => {
                return RemotingCommand::error_response(
                    request,
                    ResponseCode::SUBSCRIPTION_NOT_EXIST,
                    format!(
                        "the consumer's subscription not exist, group: {} topic: {}",
                        header.consumer_group, header.topic
                    ),
                );
            }
        }
    };
    if header.sys_flag & pull_flag::COMMIT_OFFSET != 0
        && header.commit_offset >= 0
        && let Err(error) = state.metadata.commit_offset(
            &header.consumer_group,
            &header.topic,
            header.queue_id,
            header.commit_offset,
        )
    {
        return store_failure(request, error);
    }

    let mut outcome = match look(state, &header, &filter) {
        Ok(outcome) => outcome,
        Err(error) => return store_failure(request, error),
    };
    let may_park =
        outcome.code == ResponseCode::PULL_NOT_FOUND && header.sys_flag & pull_flag::SUSPEND != 0;
    if may_park && state.parked_pulls.fetch_add(1, Ordering::AcqRel) < state.config.max_parked_pulls
    {
        let suspend =
            Duration::from_millis(header.suspend_timeout_millis.max(0) as u64).min(MAX_SUSPEND);
        let deadline = tokio::time::Instant::now() + suspend;
        let arrivals = state.arrivals.watch(&header.topic);
        loop {
            let arrival = arrivals.notified();
            tokio::pin!(arrival);
            // Register before looking again, so an arrival between the look and the wait counts.
            arrival.as_mut().enable();
            match look(state, &header, &filter) {
                Ok(again) if again.code != ResponseCode::PULL_NOT_FOUND => {
                    outcome = again;
                    break;
                }
                Ok(again) => outcome = again,
                Err(error) => {
                    state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
                    return store_failure(request, error);
                }
            }
            if tokio::time::timeout_at(deadline, arrival).await.is_err() {
                break;
            }
        }
        state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
    } else if may_park {
        state.parked_pulls.fetch_sub(1, Ordering::AcqRel);
    }

    let response_header = PullMessageResponseHeader {
        suggest_which_broker_id: 0,
        next_begin_offset: outcome.next_begin_offset as i64,
        min_offset: outcome.min_offset as i64,
        max_offset: outcome.max_offset as i64,
        ..Default::default()
    };
    RemotingCommand::response_to(request, outcome.code)
        .with_remark(outcome.remark)
        .with_header(&response_header)
        .with_body(outcome.body)
}

/// Reads the queue once and classifies the result as the Java broker does.
fn look(
    state: &BrokerState,
    header: &PullMessageRequestHeader,
    filter: &TagFilter,
) -> Result<PullOutcome, StoreError> {
    let (min, max) = state.store.queue_offsets(&header.topic, header.queue_id);
    let outcome = |code, remark, next| PullOutcome {
        code,
        remark,
        next_begin_offset: next,
        min_offset: min,
        max_offset: max,
        body: Bytes::new(),
    };
    // A negative offset lies below every queue's minimum: moved to the minimum, as in Java.
    let Ok(requested) = u64::try_from(header.queue_offset) else {
        let remark = if max == 0 {
            "NO_MESSAGE_IN_QUEUE"
        } else {
            "OFFSET_TOO_SMALL"
        };
        return Ok(outcome(ResponseCode::PULL_OFFSET_MOVED, remark, min));
    };
    if max == 0 {
        let code = if requested == 0 {
            ResponseCode::PULL_NOT_FOUND
        } else {
            ResponseCode::PULL_OFFSET_MOVED
        };
        return Ok(outcome(code, "NO_MESSAGE_IN_QUEUE", 0));
    }
    if requested < min {
        return Ok(outcome(
            ResponseCode::PULL_OFFSET_MOVED,
            "OFFSET_TOO_SMALL",
            min,
        ));
    }
    if requested == max {
        return Ok(outcome(
            ResponseCode::PULL_NOT_FOUND,
            "OFFSET_OVERFLOW_ONE",
            requested,
        ));
    }
    if requested > max {
        return Ok(outcome(
            ResponseCode::PULL_OFFSET_MOVED,
            "OFFSET_OVERFLOW_BADLY",
            max,
        ));
    }
    let wanted = header.max_msg_nums.clamp(1, MAX_PULL_BATCH) as usize;
    let max_bytes = header
        .max_msg_bytes
        .filter(|bytes| *bytes > 0)
        .map_or(usize::MAX, |bytes| bytes as usize);
    let entries = state
        .store
        .queue_entries(&header.topic, header.queue_id, requested, wanted)?;
    let mut body = BytesMut::new();
    let mut next = requested;
    for entry in &entries {
        if !body.is_empty() && body.len() + entry.size as usize > max_bytes {
            break;
        }
        next += 1;
        if !filter.passes_code(entry) {
            continue;
        }
        let raw = state.store.read_at(entry.commit_offset)?;
        if filter.passes_record(&raw) {
            body.extend_from_slice(&raw);
        }
    }
    if body.is_empty() {
        return Ok(outcome(
            ResponseCode::PULL_RETRY_IMMEDIATELY,
            "NO_MATCHED_MESSAGE",
            next,
        ));
    }
    Ok(PullOutcome {
        code: ResponseCode::SUCCESS,
        remark: "FOUND",
        next_begin_offset: next,
        min_offset: min,
        max_offset: max,
        body: body.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_expressions() {
        assert_eq!(TagFilter::parse("*"), TagFilter::All);
        assert_eq!(TagFilter::parse(""), TagFilter::All);
        let TagFilter::Tags { codes, tags } = TagFilter::parse("TagA || TagB") else {
            panic!("tags expected")
        };
        assert_eq!(tags, vec!["TagA", "TagB"]);
        assert_eq!(codes[0], 2598919);
    }
}
