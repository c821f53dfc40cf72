//! Pull ⇄ POP on the wire: the POP request a converted pull becomes, the receipts in a POP
//! answer, and the pull answer built from them. No I/O and no state.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::vqueue::{Receipt, ReceiptState};
use crate::remoting::extra_info::{ExtraInfo, StartOffsetEntry, TopicType, parse_info};
use crate::remoting::header::{
    PopMessageRequestHeader, PopMessageResponseHeader, PullMessageRequestHeader,
    PullMessageResponseHeader,
};
use crate::remoting::message::{MessageRecord, RecordError, RecordHead, property};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode, SerializeType};

/// Pull `sysFlag` bits.
pub mod pull_flag {
    pub const COMMIT_OFFSET: i32 = 0x1;
    pub const SUSPEND: i32 = 0x2;
}

/// Where a record's queue id and queue offset sit in the stored layout.
const QUEUE_ID_AT: usize = 12;
const QUEUE_OFFSET_AT: usize = 20;

const RETRY_PREFIX: &str = "%RETRY%";

/// What a converted pull asks the broker for.
pub struct PopAsk<'a> {
    pub pull: &'a PullMessageRequestHeader,
    pub broker: &'a str,
    pub invisible_time_ms: i64,
    pub poll_time_ms: i64,
    pub max_messages: i32,
    /// Start at the queue's first message (0) or its end (1) when the group has no offset yet.
    pub init_mode: i32,
    pub expression: Option<&'a Subscription>,
    pub now_ms: i64,
}

/// The POP request for a pull; JSON header, because binary headers truncate codes above 32767.
pub fn pop_request(ask: &PopAsk<'_>) -> RemotingCommand {
    let header = PopMessageRequestHeader {
        consumer_group: ask.pull.consumer_group.clone(),
        topic: ask.pull.topic.clone(),
        queue_id: ask.pull.queue_id,
        max_msg_nums: ask.max_messages,
        invisible_time: ask.invisible_time_ms,
        poll_time: ask.poll_time_ms,
        born_time: ask.now_ms,
        init_mode: ask.init_mode,
        exp_type: ask.expression.map(|s| s.expression_type.clone()),
        exp: ask.expression.map(|s| s.expression.clone()),
        order: Some(false),
        broker_name: Some(ask.broker.to_owned()),
        ..Default::default()
    };
    let mut request = RemotingCommand::request(RequestCode::POP_MESSAGE, 0).with_header(&header);
    request.serialize_type = SerializeType::Json;
    request
}

/// A group's subscription to one topic, as POP's `exp`/`expType` and the tags to re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub expression_type: String,
    pub expression: String,
    /// The tags of a TAG expression; empty means every message.
    tags: Vec<String>,
}

impl Subscription {
    pub fn new(expression_type: Option<&str>, expression: Option<&str>) -> Self {
        let expression_type = expression_type
            .filter(|kind| !kind.is_empty())
            .unwrap_or("TAG")
            .to_owned();
        let expression = expression
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .unwrap_or("*")
            .to_owned();
        let tags = if expression_type.eq_ignore_ascii_case("TAG") && expression != "*" {
            expression
                .split("||")
                .map(str::trim)
                .filter(|tag| !tag.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            expression_type,
            expression,
            tags,
        }
    }

    /// The client-side check Java makes after the broker's tag-hash filter: with a tag
    /// expression, a message passes only with one of its tags (a tagless one does not).
    pub fn passes(&self, record: &MessageRecord) -> bool {
        self.passes_tags(record.tags())
    }

    /// [`Subscription::passes`] for a message with the TAGS property `tags`.
    pub fn passes_tags(&self, tags: Option<&str>) -> bool {
        self.tags.is_empty() || tags.is_some_and(|tag| self.tags.iter().any(|wanted| wanted == tag))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("the pop answer has an invalid header: {0}")]
    Header(String),
    #[error("the pop answer has an invalid record: {0}")]
    Record(#[from] RecordError),
}

/// A pop answer taken apart.
#[derive(Debug, Default)]
pub struct Popped {
    /// Records for the client, each as stored, with its receipt.
    pub delivered: Vec<(Bytes, Receipt)>,
    /// Receipts of records the subscription rejects: ack them, the client would drop them.
    pub filtered: Vec<Receipt>,
    /// The broker's backlog behind this batch.
    pub backlog: i64,
}

/// What [`read_pop`] needs besides the answer.
pub struct PopContext<'a> {
    pub topic: &'a str,
    pub group: &'a str,
    pub broker: &'a Arc<str>,
    pub subscription: &'a Subscription,
    /// Local clock when the pop was sent: the invisible time runs from no later than that.
    pub sent_at_ms: i64,
}

/// The receipts of a successful POP answer. Handles are built as the Java client builds them:
/// a record's own `POP_CK` (the broker adds it to retried messages), else the batch's start
/// offset for the record's queue and kind, else its own offset.
pub fn read_pop(
    response: &RemotingCommand,
    context: &PopContext<'_>,
) -> Result<Popped, TranslateError> {
    let header = response
        .decode_header::<PopMessageResponseHeader>()
        .map_err(|error| TranslateError::Header(error.to_string()))?;
    let starts: Vec<StartOffsetEntry> = header
        .start_offset_info
        .as_deref()
        .map(parse_info)
        .transpose()
        .map_err(|error| TranslateError::Header(error.to_string()))?
        .unwrap_or_default();
    let popping_retry_topic = context.topic.starts_with(RETRY_PREFIX);
    let mut popped = Popped {
        backlog: header.rest_num.max(0),
        ..Popped::default()
    };
    let mut rest = response.body.clone();
    // The ack topic of each kind of handle, made once per answer rather than once per message.
    let mut ack_topics: Vec<(TopicType, Arc<str>)> = Vec::with_capacity(1);
    while !rest.is_empty() {
        let head = RecordHead::peek(&rest)?;
        let handle = match head
            .property(property::POP_CK)
            .and_then(|text| text.parse::<ExtraInfo>().ok())
        {
            Some(handle) => handle,
            None => {
                let topic_type = if popping_retry_topic || !head.topic.starts_with(RETRY_PREFIX) {
                    TopicType::Normal
                } else if head.topic.contains('+') {
                    TopicType::RetryV2
                } else {
                    TopicType::RetryV1
                };
                // Java's broker labels a retry topic popped by name as a retry kind, while the
                // handle acks it as the topic popped: either label names this queue's start.
                let labelled = TopicType::of_popped_topic(head.topic);
                let start = starts
                    .iter()
                    .find(|entry| {
                        entry.queue_id == head.queue_id
                            && (entry.topic_type == topic_type || entry.topic_type == labelled)
                    })
                    .map_or(head.queue_offset, |entry| entry.start_offset);
                ExtraInfo {
                    ck_queue_offset: start,
                    pop_time: header.pop_time,
                    invisible_time: header.invisible_time,
                    revive_qid: header.revive_qid,
                    topic_type,
                    broker_name: context.broker.to_string(),
                    queue_id: head.queue_id,
                    queue_offset: Some(head.queue_offset),
                    commit_log_offset: None,
                }
            }
        };
        let ack_topic = match ack_topics
            .iter()
            .find(|(kind, _)| *kind == handle.topic_type)
        {
            Some((_, topic)) => topic.clone(),
            None => {
                // A retry topic popped for itself acks under its own name (reference §5.3 trap 6).
                let topic: Arc<str> = if popping_retry_topic {
                    Arc::from(context.topic)
                } else {
                    Arc::from(handle.topic_type.real_topic(context.topic, context.group))
                };
                ack_topics.push((handle.topic_type, topic.clone()));
                topic
            }
        };
        let passes = context
            .subscription
            .passes_tags(head.property(property::TAGS));
        // Brokers with popResponseReturnActualRetryTopic name the retry topic: show the topic
        // the client subscribed to, as a pull would.
        let renamed = head.topic != context.topic && !popping_retry_topic;
        let receipt = Receipt {
            broker: context.broker.clone(),
            ack_topic,
            queue_offset: handle.queue_offset.unwrap_or(head.queue_offset),
            handle,
            commit_log_offset: head.physical_offset,
            reconsume_times: head.reconsume_times,
            visible_at_ms: context.sent_at_ms + header.invisible_time.max(0),
            popped_at_ms: context.sent_at_ms,
            state: ReceiptState::Held,
        };
        let size = head.size;
        let raw = rest.split_to(size);
        if !passes {
            popped.filtered.push(receipt);
            continue;
        }
        let raw = if renamed {
            let (mut record, _) = MessageRecord::decode(&raw, false)?;
            record.topic = context.topic.to_owned();
            let mut out = BytesMut::new();
            record.encode(&mut out)?;
            out.freeze()
        } else {
            raw
        };
        popped.delivered.push((raw, receipt));
    }
    Ok(popped)
}

/// The FOUND answer to a pull: the records renumbered `first_offset..` in the client's queue.
/// Only the queue id and queue offset change; the body CRC covers the body alone.
pub fn found(
    request: &RemotingCommand,
    records: &[Bytes],
    first_offset: i64,
    queue_id: i32,
    backlog: i64,
) -> RemotingCommand {
    let mut body = BytesMut::with_capacity(records.iter().map(Bytes::len).sum());
    for (index, record) in records.iter().enumerate() {
        let start = body.len();
        body.extend_from_slice(record);
        let offset = first_offset + index as i64;
        if let Some(field) = body.get_mut(start + QUEUE_ID_AT..start + QUEUE_ID_AT + 4) {
            field.copy_from_slice(&queue_id.to_be_bytes());
        }
        if let Some(field) = body.get_mut(start + QUEUE_OFFSET_AT..start + QUEUE_OFFSET_AT + 8) {
            field.copy_from_slice(&offset.to_be_bytes());
        }
    }
    let next = first_offset + records.len() as i64;
    pull_answer(request, ResponseCode::SUCCESS, next, next + backlog.max(0))
        .with_remark("FOUND")
        .with_body(body.freeze())
}

/// NO_NEW_MSG at `next`: nothing arrived within the client's suspend time.
pub fn no_new_message(request: &RemotingCommand, next: i64, max: i64) -> RemotingCommand {
    pull_answer(request, ResponseCode::PULL_NOT_FOUND, next, max.max(next))
        .with_remark("no new message")
}

/// A pull answer with the four offsets every client needs, as JSON strings.
fn pull_answer(
    request: &RemotingCommand,
    code: ResponseCode,
    next: i64,
    max: i64,
) -> RemotingCommand {
    RemotingCommand::response_to(request, code).with_header(&PullMessageResponseHeader {
        suggest_which_broker_id: 0,
        next_begin_offset: next,
        min_offset: 0,
        max_offset: max,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::message::decode_records;

    fn record(topic: &str, queue_id: i32, queue_offset: i64, tags: Option<&str>) -> MessageRecord {
        let mut record = MessageRecord {
            topic: topic.into(),
            queue_id,
            queue_offset,
            physical_offset: queue_offset * 1000,
            body: Bytes::from(format!("m{queue_offset}")),
            ..MessageRecord::default()
        };
        if let Some(tags) = tags {
            record.properties.insert(property::TAGS.into(), tags.into());
        }
        record
    }

    fn pop_answer(records: &[MessageRecord], start_offset_info: Option<&str>) -> RemotingCommand {
        let mut body = BytesMut::new();
        for record in records {
            record.encode(&mut body).expect("encode");
        }
        RemotingCommand::response_to(&RemotingCommand::default(), ResponseCode::SUCCESS)
            .with_header(&PopMessageResponseHeader {
                pop_time: 5_000,
                invisible_time: 60_000,
                revive_qid: 3,
                rest_num: 7,
                start_offset_info: start_offset_info.map(str::to_owned),
                ..Default::default()
            })
            .with_body(body.freeze())
    }

    fn context<'a>(broker: &'a Arc<str>, subscription: &'a Subscription) -> PopContext<'a> {
        PopContext {
            topic: "T",
            group: "g",
            broker,
            subscription,
            sent_at_ms: 100,
        }
    }

    #[test]
    fn receipts_carry_java_handles_and_records_are_renumbered() {
        let broker: Arc<str> = Arc::from("broker-a");
        let all = Subscription::new(None, Some("*"));
        let answer = pop_answer(
            &[record("T", 2, 40, None), record("T", 2, 41, None)],
            Some("0 2 40"),
        );
        let popped = read_pop(&answer, &context(&broker, &all)).expect("read");
        assert_eq!(popped.backlog, 7);
        let handles: Vec<String> = popped
            .delivered
            .iter()
            .map(|(_, receipt)| receipt.handle.to_string())
            .collect();
        assert_eq!(
            handles,
            vec![
                "40 5000 60000 3 0 broker-a 2 40",
                "40 5000 60000 3 0 broker-a 2 41"
            ]
        );
        assert_eq!(popped.delivered[1].1.commit_log_offset, 41_000);
        assert_eq!(popped.delivered[0].1.visible_at_ms, 60_100);
        let records: Vec<Bytes> = popped.delivered.into_iter().map(|(raw, _)| raw).collect();
        let pull = RemotingCommand::request(RequestCode::PULL_MESSAGE, 9);
        let answer = found(&pull, &records, 100, 5, 7);
        assert_eq!(answer.ext("nextBeginOffset"), Some("102"));
        assert_eq!(answer.ext("maxOffset"), Some("109"));
        assert_eq!(answer.ext("minOffset"), Some("0"));
        let decoded = decode_records(&answer.body, true).expect("still valid records");
        let positions: Vec<(i32, i64)> = decoded
            .iter()
            .map(|r| (r.queue_id, r.queue_offset))
            .collect();
        assert_eq!(positions, vec![(5, 100), (5, 101)]);
        assert_eq!(decoded[1].body, Bytes::from("m41"));
    }

    #[test]
    fn retried_messages_keep_the_brokers_handle_and_ack_on_the_retry_topic() {
        let broker: Arc<str> = Arc::from("broker-a");
        let all = Subscription::new(None, None);
        let mut retried = record("T", 0, 3, None);
        retried.properties.insert(
            property::POP_CK.into(),
            "2 4000 60000 0 1 broker-a 0 3".into(),
        );
        let popped =
            read_pop(&pop_answer(&[retried], None), &context(&broker, &all)).expect("read");
        let receipt = &popped.delivered[0].1;
        assert_eq!(&*receipt.ack_topic, "%RETRY%g_T");
        assert_eq!(receipt.handle.pop_time, 4000);
    }

    #[test]
    fn a_record_named_after_the_retry_topic_is_shown_under_the_subscribed_topic() {
        let broker: Arc<str> = Arc::from("broker-a");
        let all = Subscription::new(None, None);
        let popped = read_pop(
            &pop_answer(&[record("%RETRY%g_T", 0, 3, None)], Some("1 0 3")),
            &context(&broker, &all),
        )
        .expect("read");
        let (raw, receipt) = &popped.delivered[0];
        assert_eq!(&*receipt.ack_topic, "%RETRY%g_T");
        let (shown, _) = MessageRecord::decode(raw, true).expect("decode");
        assert_eq!(shown.topic, "T");
    }

    #[test]
    fn the_subscription_is_rechecked_and_tagless_messages_fail_a_tag_filter() {
        let broker: Arc<str> = Arc::from("broker-a");
        let tagged = Subscription::new(Some("TAG"), Some("a || b"));
        let popped = read_pop(
            &pop_answer(
                &[
                    record("T", 0, 1, Some("a")),
                    record("T", 0, 2, Some("c")),
                    record("T", 0, 3, None),
                    record("T", 0, 4, Some("b")),
                ],
                None,
            ),
            &context(&broker, &tagged),
        )
        .expect("read");
        let kept: Vec<i64> = popped
            .delivered
            .iter()
            .map(|(_, r)| r.queue_offset)
            .collect();
        assert_eq!(kept, vec![1, 4]);
        assert_eq!(popped.filtered.len(), 2);
        let sql = Subscription::new(Some("SQL92"), Some("a > 1"));
        assert!(sql.passes(&record("T", 0, 1, None)));
    }

    #[test]
    fn a_pull_becomes_a_json_pop_of_the_same_queue() {
        let pull = PullMessageRequestHeader {
            consumer_group: "g".into(),
            topic: "T".into(),
            queue_id: 3,
            ..Default::default()
        };
        let subscription = Subscription::new(Some("TAG"), Some("a"));
        let request = pop_request(&PopAsk {
            pull: &pull,
            broker: "broker-a",
            invisible_time_ms: 60_000,
            poll_time_ms: 15_000,
            max_messages: 32,
            init_mode: 0,
            expression: Some(&subscription),
            now_ms: 1,
        });
        assert_eq!(request.code, RequestCode::POP_MESSAGE.0);
        assert_eq!(request.serialize_type, SerializeType::Json);
        assert_eq!(request.ext("queueId"), Some("3"));
        assert_eq!(request.ext("exp"), Some("a"));
        assert_eq!(request.ext("bname"), Some("broker-a"));
    }
}
