//! Typed custom headers and their conversion to and from ext fields.
//!
//! Each header is a plain struct whose fields map one-to-one onto ext field keys (Java field names,
//! typos included). Non-`Option` fields are required: reading a header without them is an error
//! naming the key. Values are parsed as Java's `decodeCommandCustomHeader` does: integers strictly,
//! booleans with `Boolean.parseBoolean` (anything but "true", any case, is false).

use super::command::ExtFields;

/// Why a typed header could not be read from ext fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the custom field {field} is missing")]
    Missing { field: &'static str },
    #[error("the custom field {field} = {value:?} is not a valid {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// A typed custom header.
pub trait CommandHeader: Sized {
    /// The ext field keys this header reads and writes, in declaration order.
    const KEYS: &'static [&'static str];

    /// Writes every present field into `fields`, replacing existing keys.
    fn write_ext_fields(&self, fields: &mut ExtFields);

    /// Reads the header, failing on a missing required field or an unparsable value.
    fn from_ext_fields(fields: &ExtFields) -> Result<Self, HeaderError>;

    /// The header as a fresh ext field map.
    fn to_ext_fields(&self) -> ExtFields {
        let mut fields = ExtFields::new();
        self.write_ext_fields(&mut fields);
        fields
    }
}

/// One field of a header: how it is read from and written to its key.
pub trait HeaderField: Sized {
    fn read_field(fields: &ExtFields, key: &'static str) -> Result<Self, HeaderError>;
    fn write_field(&self, fields: &mut ExtFields, key: &'static str);
}

/// A scalar value that travels as a string.
pub trait HeaderScalar: Sized {
    const EXPECTED: &'static str;
    fn parse_scalar(text: &str) -> Option<Self>;
    fn render_scalar(&self) -> String;
}

impl HeaderScalar for String {
    const EXPECTED: &'static str = "string";
    fn parse_scalar(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
    fn render_scalar(&self) -> String {
        self.clone()
    }
}

impl HeaderScalar for bool {
    const EXPECTED: &'static str = "boolean";
    fn parse_scalar(text: &str) -> Option<Self> {
        Some(text.eq_ignore_ascii_case("true"))
    }
    fn render_scalar(&self) -> String {
        self.to_string()
    }
}

macro_rules! integer_scalar {
    ($($ty:ty => $expected:literal),*) => {$(
        impl HeaderScalar for $ty {
            const EXPECTED: &'static str = $expected;
            fn parse_scalar(text: &str) -> Option<Self> {
                text.trim().parse().ok()
            }
            fn render_scalar(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integer_scalar!(i32 => "32-bit integer", i64 => "64-bit integer");

fn parse_present<T: HeaderScalar>(key: &'static str, text: &str) -> Result<T, HeaderError> {
    T::parse_scalar(text).ok_or_else(|| HeaderError::Invalid {
        field: key,
        value: text.to_owned(),
        expected: T::EXPECTED,
    })
}

macro_rules! required_field {
    ($($ty:ty),*) => {$(
        impl HeaderField for $ty {
            fn read_field(fields: &ExtFields, key: &'static str) -> Result<Self, HeaderError> {
                let text = fields.get(key).ok_or(HeaderError::Missing { field: key })?;
                parse_present(key, text)
            }
            fn write_field(&self, fields: &mut ExtFields, key: &'static str) {
                fields.insert(key.to_owned(), self.render_scalar());
            }
        }
    )*};
}
required_field!(String, bool, i32, i64);

impl<T: HeaderScalar> HeaderField for Option<T> {
    fn read_field(fields: &ExtFields, key: &'static str) -> Result<Self, HeaderError> {
        fields
            .get(key)
            .map(|text| parse_present(key, text))
            .transpose()
    }
    fn write_field(&self, fields: &mut ExtFields, key: &'static str) {
        match self {
            Some(value) => {
                fields.insert(key.to_owned(), value.render_scalar());
            }
            None => {
                fields.remove(key);
            }
        }
    }
}

/// Declares a header struct and its ext field mapping.
macro_rules! command_header {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* $field:ident : $ty:ty => $key:literal),* $(,)?
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        #[cfg_attr(test, derive(proptest_derive::Arbitrary))]
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl CommandHeader for $name {
            const KEYS: &'static [&'static str] = &[$($key),*];

            fn write_ext_fields(&self, fields: &mut ExtFields) {
                $(HeaderField::write_field(&self.$field, fields, $key);)*
            }

            fn from_ext_fields(fields: &ExtFields) -> Result<Self, HeaderError> {
                Ok(Self { $($field: HeaderField::read_field(fields, $key)?,)* })
            }
        }
    )*};
}

command_header! {
    /// The base fields of every topic-scoped request (`RpcRequestHeader`, `TopicRequestHeader`).
    /// `bname` is what RocketMQ 5.x proxies route on.
    pub struct RpcBase {
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// SEND_MESSAGE (10): the long-key send header.
    pub struct SendMessageRequestHeader {
        producer_group: String => "producerGroup",
        topic: String => "topic",
        default_topic: String => "defaultTopic",
        default_topic_queue_nums: i32 => "defaultTopicQueueNums",
        queue_id: i32 => "queueId",
        sys_flag: i32 => "sysFlag",
        born_timestamp: i64 => "bornTimestamp",
        flag: i32 => "flag",
        properties: Option<String> => "properties",
        reconsume_times: Option<i32> => "reconsumeTimes",
        unit_mode: Option<bool> => "unitMode",
        batch: Option<bool> => "batch",
        max_reconsume_times: Option<i32> => "maxReconsumeTimes",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// SEND_MESSAGE_V2 (310) and SEND_BATCH_MESSAGE (320): the one-letter-key send header.
    pub struct SendMessageRequestHeaderV2 {
        producer_group: String => "a",
        topic: String => "b",
        default_topic: String => "c",
        default_topic_queue_nums: i32 => "d",
        queue_id: i32 => "e",
        sys_flag: i32 => "f",
        born_timestamp: i64 => "g",
        flag: i32 => "h",
        properties: Option<String> => "i",
        reconsume_times: Option<i32> => "j",
        unit_mode: Option<bool> => "k",
        max_reconsume_times: Option<i32> => "l",
        batch: Option<bool> => "m",
        broker_name: Option<String> => "n",
    }

    /// Response to the send codes. `MSG_REGION` and `TRACE_ON` are the extra ext fields the broker adds.
    pub struct SendMessageResponseHeader {
        msg_id: String => "msgId",
        queue_id: i32 => "queueId",
        queue_offset: i64 => "queueOffset",
        transaction_id: Option<String> => "transactionId",
        batch_uniq_id: Option<String> => "batchUniqId",
        recall_handle: Option<String> => "recallHandle",
        msg_region: Option<String> => "MSG_REGION",
        trace_on: Option<String> => "TRACE_ON",
    }

    /// PULL_MESSAGE (11) and LITE_PULL_MESSAGE (361).
    pub struct PullMessageRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        queue_offset: i64 => "queueOffset",
        max_msg_nums: i32 => "maxMsgNums",
        sys_flag: i32 => "sysFlag",
        commit_offset: i64 => "commitOffset",
        suspend_timeout_millis: i64 => "suspendTimeoutMillis",
        subscription: Option<String> => "subscription",
        sub_version: i64 => "subVersion",
        expression_type: Option<String> => "expressionType",
        max_msg_bytes: Option<i32> => "maxMsgBytes",
        request_source: Option<i32> => "requestSource",
        proxy_forward_client_id: Option<String> => "proxyFrowardClientId",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// Response to a pull; the four offsets are mandatory because the Java client unboxes them.
    pub struct PullMessageResponseHeader {
        suggest_which_broker_id: i64 => "suggestWhichBrokerId",
        next_begin_offset: i64 => "nextBeginOffset",
        min_offset: i64 => "minOffset",
        max_offset: i64 => "maxOffset",
        offset_delta: Option<i64> => "offsetDelta",
        topic_sys_flag: Option<i32> => "topicSysFlag",
        group_sys_flag: Option<i32> => "groupSysFlag",
        forbidden_type: Option<i32> => "forbiddenType",
    }

    /// POP_MESSAGE (200050). `queue_id` −1 means every queue of the topic.
    pub struct PopMessageRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        max_msg_nums: i32 => "maxMsgNums",
        invisible_time: i64 => "invisibleTime",
        poll_time: i64 => "pollTime",
        born_time: i64 => "bornTime",
        init_mode: i32 => "initMode",
        exp_type: Option<String> => "expType",
        exp: Option<String> => "exp",
        order: Option<bool> => "order",
        attempt_id: Option<String> => "attemptId",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// Response to a pop; the info strings are parsed by [`super::extra_info`].
    pub struct PopMessageResponseHeader {
        pop_time: i64 => "popTime",
        invisible_time: i64 => "invisibleTime",
        revive_qid: i32 => "reviveQid",
        rest_num: i64 => "restNum",
        start_offset_info: Option<String> => "startOffsetInfo",
        msg_offset_info: Option<String> => "msgOffsetInfo",
        order_count_info: Option<String> => "orderCountInfo",
    }

    /// ACK_MESSAGE (200051). `topic` is the real topic (original or retry) per the extraInfo.
    pub struct AckMessageRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        extra_info: String => "extraInfo",
        offset: i64 => "offset",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// CHANGE_MESSAGE_INVISIBLETIME (200053).
    pub struct ChangeInvisibleTimeRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        extra_info: String => "extraInfo",
        offset: i64 => "offset",
        invisible_time: i64 => "invisibleTime",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    pub struct ChangeInvisibleTimeResponseHeader {
        pop_time: i64 => "popTime",
        invisible_time: i64 => "invisibleTime",
        revive_qid: i32 => "reviveQid",
    }

    /// GET_ROUTEINFO_BY_TOPIC (105).
    pub struct GetRouteInfoRequestHeader {
        topic: String => "topic",
        accept_standard_json_only: Option<bool> => "acceptStandardJsonOnly",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// QUERY_CONSUMER_OFFSET (14).
    pub struct QueryConsumerOffsetRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        set_zero_if_not_found: Option<bool> => "setZeroIfNotFound",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// Response carrying one offset: QUERY_CONSUMER_OFFSET, GET_MAX_OFFSET, GET_MIN_OFFSET and
    /// SEARCH_OFFSET_BY_TIMESTAMP all answer with this shape.
    pub struct OffsetResponseHeader {
        offset: i64 => "offset",
    }

    /// UPDATE_CONSUMER_OFFSET (15); Java clients send it oneway.
    pub struct UpdateConsumerOffsetRequestHeader {
        consumer_group: String => "consumerGroup",
        topic: String => "topic",
        queue_id: i32 => "queueId",
        commit_offset: i64 => "commitOffset",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// GET_MAX_OFFSET (30).
    pub struct GetMaxOffsetRequestHeader {
        topic: String => "topic",
        queue_id: i32 => "queueId",
        committed: Option<bool> => "committed",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// GET_MIN_OFFSET (31).
    pub struct GetMinOffsetRequestHeader {
        topic: String => "topic",
        queue_id: i32 => "queueId",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// SEARCH_OFFSET_BY_TIMESTAMP (29). `boundary_type` is `lower` or `upper`.
    pub struct SearchOffsetRequestHeader {
        topic: String => "topic",
        queue_id: i32 => "queueId",
        timestamp: i64 => "timestamp",
        boundary_type: Option<String> => "boundaryType",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    /// Extra ext fields a broker puts on its HEART_BEAT response.
    pub struct HeartbeatResponseHeader {
        support_heartbeat_v2: Option<bool> => "IS_SUPPORT_HEART_BEAT_V2",
        subscription_changed: Option<bool> => "IS_SUB_CHANGE",
    }

    /// UNREGISTER_CLIENT (35).
    pub struct UnregisterClientRequestHeader {
        client_id: String => "clientID",
        producer_group: Option<String> => "producerGroup",
        consumer_group: Option<String> => "consumerGroup",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// GET_CONSUMER_LIST_BY_GROUP (38); the answer is a [`super::body::ConsumerList`] body.
    pub struct GetConsumerListByGroupRequestHeader {
        consumer_group: String => "consumerGroup",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// CONSUMER_SEND_MSG_BACK (36). `offset` is the message's commit-log offset.
    pub struct ConsumerSendMsgBackRequestHeader {
        offset: i64 => "offset",
        group: String => "group",
        delay_level: i32 => "delayLevel",
        origin_msg_id: Option<String> => "originMsgId",
        origin_topic: Option<String> => "originTopic",
        unit_mode: Option<bool> => "unitMode",
        max_reconsume_times: Option<i32> => "maxReconsumeTimes",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// END_TRANSACTION (37). `commit_or_rollback`: 0 unknown, 8 commit, 12 rollback.
    pub struct EndTransactionRequestHeader {
        topic: Option<String> => "topic",
        producer_group: String => "producerGroup",
        tran_state_table_offset: i64 => "tranStateTableOffset",
        commit_log_offset: i64 => "commitLogOffset",
        commit_or_rollback: i32 => "commitOrRollback",
        from_transaction_check: Option<bool> => "fromTransactionCheck",
        msg_id: String => "msgId",
        transaction_id: Option<String> => "transactionId",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// CHECK_TRANSACTION_STATE (39), broker to producer; the body is the half message record.
    pub struct CheckTransactionStateRequestHeader {
        topic: Option<String> => "topic",
        tran_state_table_offset: i64 => "tranStateTableOffset",
        commit_log_offset: i64 => "commitLogOffset",
        msg_id: Option<String> => "msgId",
        transaction_id: Option<String> => "transactionId",
        offset_msg_id: Option<String> => "offsetMsgId",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// NOTIFY_CONSUMER_IDS_CHANGED (40), broker to consumer.
    pub struct NotifyConsumerIdsChangedRequestHeader {
        consumer_group: String => "consumerGroup",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// LOCK_BATCH_MQ (41) and UNLOCK_BATCH_MQ (42) carry no fields of their own; their bodies do.
    pub struct LockBatchMqRequestHeader {
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// VIEW_MESSAGE_BY_ID (33). `offset` is the commit-log offset from an offset message id.
    pub struct ViewMessageRequestHeader {
        topic: Option<String> => "topic",
        offset: i64 => "offset",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
    }

    /// QUERY_MESSAGE (12). `unique_key_query` asks for a UNIQ_KEY lookup instead of KEYS.
    pub struct QueryMessageRequestHeader {
        topic: String => "topic",
        key: String => "key",
        max_num: i32 => "maxNum",
        begin_timestamp: i64 => "beginTimestamp",
        end_timestamp: i64 => "endTimestamp",
        unique_key_query: Option<bool> => "_UNIQUE_KEY_QUERY",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }

    pub struct QueryMessageResponseHeader {
        index_last_update_timestamp: i64 => "indexLastUpdateTimestamp",
        index_last_update_phyoffset: i64 => "indexLastUpdatePhyoffset",
    }

    /// UPDATE_AND_CREATE_TOPIC (17).
    pub struct CreateTopicRequestHeader {
        topic: String => "topic",
        default_topic: String => "defaultTopic",
        read_queue_nums: i32 => "readQueueNums",
        write_queue_nums: i32 => "writeQueueNums",
        perm: i32 => "perm",
        topic_filter_type: String => "topicFilterType",
        topic_sys_flag: Option<i32> => "topicSysFlag",
        order: bool => "order",
        attributes: Option<String> => "attributes",
        force: Option<bool> => "force",
        namespace: Option<String> => "ns",
        namespaced: Option<bool> => "nsd",
        broker_name: Option<String> => "bname",
        oneway: Option<bool> => "oway",
        logical: Option<bool> => "lo",
    }
}

impl From<SendMessageRequestHeader> for SendMessageRequestHeaderV2 {
    fn from(v1: SendMessageRequestHeader) -> Self {
        Self {
            producer_group: v1.producer_group,
            topic: v1.topic,
            default_topic: v1.default_topic,
            default_topic_queue_nums: v1.default_topic_queue_nums,
            queue_id: v1.queue_id,
            sys_flag: v1.sys_flag,
            born_timestamp: v1.born_timestamp,
            flag: v1.flag,
            properties: v1.properties,
            reconsume_times: v1.reconsume_times,
            unit_mode: v1.unit_mode,
            max_reconsume_times: v1.max_reconsume_times,
            batch: v1.batch,
            broker_name: v1.broker_name,
        }
    }
}

impl From<SendMessageRequestHeaderV2> for SendMessageRequestHeader {
    fn from(v2: SendMessageRequestHeaderV2) -> Self {
        Self {
            producer_group: v2.producer_group,
            topic: v2.topic,
            default_topic: v2.default_topic,
            default_topic_queue_nums: v2.default_topic_queue_nums,
            queue_id: v2.queue_id,
            sys_flag: v2.sys_flag,
            born_timestamp: v2.born_timestamp,
            flag: v2.flag,
            properties: v2.properties,
            reconsume_times: v2.reconsume_times,
            unit_mode: v2.unit_mode,
            batch: v2.batch,
            max_reconsume_times: v2.max_reconsume_times,
            broker_name: v2.broker_name,
            ..Self::default()
        }
    }
}

/// SEND_BATCH_MESSAGE uses the V2 header; the body is a batch (see [`super::message::encode_batch`]).
pub type SendBatchMessageRequestHeader = SendMessageRequestHeaderV2;
/// UNLOCK_BATCH_MQ has the same (empty) header shape as LOCK_BATCH_MQ.
pub type UnlockBatchMqRequestHeader = LockBatchMqRequestHeader;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::{RemotingCodec, RemotingCommand, RequestCode, SerializeType};
    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::{Decoder, Encoder};

    fn through_frame(command: &RemotingCommand) -> RemotingCommand {
        let mut buf = BytesMut::new();
        let mut codec = RemotingCodec::default();
        codec.encode(command, &mut buf).expect("encode");
        codec
            .decode(&mut buf)
            .expect("decode")
            .expect("whole frame")
    }

    /// A binary header turns empty strings into absent fields, so compare only non-empty headers there.
    fn has_empty_value(fields: &ExtFields) -> bool {
        fields.values().any(String::is_empty)
    }

    macro_rules! round_trip_props {
        ($($test:ident: $header:ty),* $(,)?) => {
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(64))]
                $(
                    #[test]
                    fn $test(header: $header, binary: bool) {
                        let fields = header.to_ext_fields();
                        prop_assert_eq!(&<$header>::from_ext_fields(&fields).expect("ext fields"), &header);
                        let mut command = RemotingCommand::request(RequestCode::SEND_MESSAGE_V2, 1).with_header(&header);
                        if binary {
                            prop_assume!(!has_empty_value(&fields));
                            command.serialize_type = SerializeType::Binary;
                        }
                        let decoded = through_frame(&command);
                        prop_assert_eq!(&decoded, &command);
                        prop_assert_eq!(decoded.decode_header::<$header>().expect("decoded header"), header);
                    }
                )*
            }
        };
    }

    round_trip_props! {
        rpc_base: RpcBase,
        send_v1: SendMessageRequestHeader,
        send_v2: SendMessageRequestHeaderV2,
        send_response: SendMessageResponseHeader,
        pull: PullMessageRequestHeader,
        pull_response: PullMessageResponseHeader,
        pop: PopMessageRequestHeader,
        pop_response: PopMessageResponseHeader,
        ack: AckMessageRequestHeader,
        change_invisible: ChangeInvisibleTimeRequestHeader,
        change_invisible_response: ChangeInvisibleTimeResponseHeader,
        route: GetRouteInfoRequestHeader,
        query_offset: QueryConsumerOffsetRequestHeader,
        offset_response: OffsetResponseHeader,
        update_offset: UpdateConsumerOffsetRequestHeader,
        max_offset: GetMaxOffsetRequestHeader,
        min_offset: GetMinOffsetRequestHeader,
        search_offset: SearchOffsetRequestHeader,
        heartbeat_response: HeartbeatResponseHeader,
        unregister: UnregisterClientRequestHeader,
        consumer_list: GetConsumerListByGroupRequestHeader,
        send_back: ConsumerSendMsgBackRequestHeader,
        end_transaction: EndTransactionRequestHeader,
        check_transaction: CheckTransactionStateRequestHeader,
        notify_ids_changed: NotifyConsumerIdsChangedRequestHeader,
        lock_batch: LockBatchMqRequestHeader,
        view_message: ViewMessageRequestHeader,
        query_message: QueryMessageRequestHeader,
        query_message_response: QueryMessageResponseHeader,
        create_topic: CreateTopicRequestHeader,
    }

    proptest! {
        #[test]
        fn send_v1_and_v2_convert_without_loss(header: SendMessageRequestHeaderV2) {
            let v1 = SendMessageRequestHeader::from(header.clone());
            prop_assert_eq!(SendMessageRequestHeaderV2::from(v1), header);
        }
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let mut fields = ExtFields::new();
        fields.insert("a".into(), "group".into());
        assert_eq!(
            SendMessageRequestHeaderV2::from_ext_fields(&fields),
            Err(HeaderError::Missing { field: "b" })
        );
        let mut pull = PullMessageRequestHeader::default().to_ext_fields();
        pull.insert("queueId".into(), "x1".into());
        let error = PullMessageRequestHeader::from_ext_fields(&pull).expect_err("bad int");
        assert_eq!(
            error.to_string(),
            "the custom field queueId = \"x1\" is not a valid 32-bit integer"
        );
    }

    #[test]
    fn booleans_parse_like_java() {
        let mut fields = CreateTopicRequestHeader::default().to_ext_fields();
        fields.insert("order".into(), "TRUE".into());
        assert!(
            CreateTopicRequestHeader::from_ext_fields(&fields)
                .expect("header")
                .order
        );
        fields.insert("order".into(), "yes".into());
        assert!(
            !CreateTopicRequestHeader::from_ext_fields(&fields)
                .expect("header")
                .order
        );
    }
}
