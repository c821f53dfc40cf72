//! JSON bodies: route data, heartbeats, consumer lists, cluster info, batch acks, queue locks and
//! assignment. Reading accepts standard JSON and fastjson's bare-key dialect and tolerates explicit
//! nulls and missing fields; writing emits standard JSON with keys in Java's sorted order, or the
//! fastjson dialect for clients that predate version 401.

use std::collections::BTreeMap;

use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::code::version;
use super::fastjson::{self, FastjsonError};

/// Why a body could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("invalid JSON body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid JSON body: {0}")]
    Fastjson(#[from] FastjsonError),
    #[error("invalid base64 bit set {value:?}: {reason}")]
    Base64 { value: String, reason: String },
    #[error(
        "offset {offset} is outside the {MAX_BATCH_ACK_SPAN} offsets a batch ack starting at {start} may cover"
    )]
    AckOutOfRange { start: i64, offset: i64 },
}

/// A JSON body type.
pub trait JsonBody: Serialize + DeserializeOwned {
    /// Reads standard JSON or fastjson's dialect.
    fn from_json(bytes: &[u8]) -> Result<Self, BodyError> {
        let normalized = fastjson::normalize(bytes)?;
        Ok(serde_json::from_slice(&normalized)?)
    }

    /// Writes standard JSON.
    fn to_json(&self) -> Result<Vec<u8>, BodyError> {
        Ok(serde_json::to_vec(self)?)
    }
}

/// Reads `null` as the type's default, since Java peers write explicit nulls for empty fields.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    deserializer: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A Java enum by constant name. The C++ client 2.x writes enums as ordinals (`"messageModel":1`),
/// so numbers are mapped to the names by `names` (Java's declaration order); an unknown ordinal
/// keeps its number as text.
fn enum_name<'de, D: Deserializer<'de>>(
    deserializer: D,
    names: &[&str],
) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Name(String),
        Ordinal(i64),
    }
    Ok(match Option::<Form>::deserialize(deserializer)? {
        None => String::new(),
        Some(Form::Name(name)) => name,
        Some(Form::Ordinal(ordinal)) => usize::try_from(ordinal)
            .ok()
            .and_then(|index| names.get(index))
            .map_or_else(|| ordinal.to_string(), |name| (*name).to_owned()),
    })
}

fn consume_from_where<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    enum_name(
        deserializer,
        &[
            "CONSUME_FROM_LAST_OFFSET",
            "CONSUME_FROM_LAST_OFFSET_AND_FROM_MIN_WHEN_BOOT_FIRST",
            "CONSUME_FROM_MIN_OFFSET",
            "CONSUME_FROM_MAX_OFFSET",
            "CONSUME_FROM_FIRST_OFFSET",
            "CONSUME_FROM_TIMESTAMP",
        ],
    )
}

fn consume_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    enum_name(
        deserializer,
        &["CONSUME_ACTIVELY", "CONSUME_PASSIVELY", "CONSUME_POP"],
    )
}

fn message_model<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    enum_name(deserializer, &["BROADCASTING", "CLUSTERING"])
}

/// A number that may come as a JSON string (the C++ client writes `"subVersion":"1796…"`).
fn number_or_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Number(i64),
        Text(String),
    }
    match Option::<Form>::deserialize(deserializer)? {
        None => Ok(0),
        Some(Form::Number(number)) => Ok(number),
        Some(Form::Text(text)) => text
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a number"))),
    }
}

/// A batch ack's bit set: Java (fastjson) sends `byte[]` as a base64 string, rocketmq-client-rust
/// as an array of numbers. Both are kept as base64.
fn bit_set_as_base64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Base64(String),
        Bytes(Vec<u8>),
    }
    Ok(match Option::<Form>::deserialize(deserializer)? {
        None => String::new(),
        Some(Form::Base64(text)) => text,
        Some(Form::Bytes(bytes)) => base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

macro_rules! json_bodies {
    ($($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* })*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[cfg_attr(test, derive(proptest_derive::Arbitrary))]
        #[serde(rename_all = "camelCase", default)]
        pub struct $name { $($body)* }
        impl JsonBody for $name {}
    )*};
}

json_bodies! {
    /// GET_ROUTEINFO_BY_TOPIC answer (`TopicRouteData`). Fields are declared in Java's sorted order.
    pub struct TopicRouteData {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<BrokerData>()"))]
        pub broker_datas: Vec<BrokerData>,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_map::<String, Vec<String>>()"))]
        pub filter_server_table: BTreeMap<String, Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub order_topic_conf: Option<String>,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<QueueData>()"))]
        pub queue_datas: Vec<QueueData>,
        /// Static-topic mappings, kept as raw JSON since only static topics use them.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[cfg_attr(test, proptest(value = "None"))]
        pub topic_queue_mapping_by_broker: Option<serde_json::Value>,
    }

    /// One broker group of a route: its addresses by broker id (0 is the master).
    pub struct BrokerData {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_map::<i64, String>()"))]
        pub broker_addrs: BTreeMap<i64, String>,
        #[serde(deserialize_with = "null_as_default")]
        pub broker_name: String,
        #[serde(deserialize_with = "null_as_default")]
        pub cluster: String,
        #[serde(deserialize_with = "null_as_default")]
        pub enable_acting_master: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub zone_name: Option<String>,
    }

    /// The queues a broker serves for a topic. `perm`: 4 read, 2 write, 1 inherit.
    pub struct QueueData {
        #[serde(deserialize_with = "null_as_default")]
        pub broker_name: String,
        #[serde(deserialize_with = "null_as_default")]
        pub perm: i32,
        #[serde(deserialize_with = "null_as_default")]
        pub read_queue_nums: i32,
        #[serde(alias = "topicSynFlag", deserialize_with = "null_as_default")]
        pub topic_sys_flag: i32,
        #[serde(deserialize_with = "null_as_default")]
        pub write_queue_nums: i32,
    }

    /// HEART_BEAT body (`HeartbeatData`).
    pub struct HeartbeatData {
        #[serde(rename = "clientID", deserialize_with = "null_as_default")]
        pub client_id: String,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<ConsumerData>()"))]
        pub consumer_data_set: Vec<ConsumerData>,
        #[serde(deserialize_with = "null_as_default")]
        pub heartbeat_fingerprint: i64,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<ProducerData>()"))]
        pub producer_data_set: Vec<ProducerData>,
        #[serde(deserialize_with = "null_as_default")]
        pub without_sub: bool,
    }

    pub struct ProducerData {
        #[serde(deserialize_with = "null_as_default")]
        pub group_name: String,
    }

    /// A consumer group's registration. Enum-valued fields keep Java's constant names as text, so
    /// values from newer peers survive.
    pub struct ConsumerData {
        /// `CONSUME_FROM_LAST_OFFSET`, `CONSUME_FROM_FIRST_OFFSET`, `CONSUME_FROM_TIMESTAMP`, …
        #[serde(deserialize_with = "consume_from_where")]
        pub consume_from_where: String,
        /// `CONSUME_ACTIVELY` (pull), `CONSUME_PASSIVELY` (push) or `CONSUME_POP`.
        #[serde(deserialize_with = "consume_type")]
        pub consume_type: String,
        #[serde(deserialize_with = "null_as_default")]
        pub group_name: String,
        /// `CLUSTERING` or `BROADCASTING`.
        #[serde(deserialize_with = "message_model")]
        pub message_model: String,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<SubscriptionData>()"))]
        pub subscription_data_set: Vec<SubscriptionData>,
        #[serde(deserialize_with = "null_as_default")]
        pub unit_mode: bool,
    }

    pub struct SubscriptionData {
        #[serde(deserialize_with = "null_as_default")]
        pub class_filter_mode: bool,
        /// Java `String.hashCode` of each tag, what the consume queue stores.
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<i32>()"))]
        pub code_set: Vec<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub expression_type: Option<String>,
        #[serde(deserialize_with = "null_as_default")]
        pub sub_string: String,
        #[serde(deserialize_with = "number_or_text")]
        pub sub_version: i64,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<String>()"))]
        pub tags_set: Vec<String>,
        #[serde(deserialize_with = "null_as_default")]
        pub topic: String,
    }

    /// GET_CONSUMER_LIST_BY_GROUP answer.
    pub struct ConsumerList {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<String>()"))]
        pub consumer_id_list: Vec<String>,
    }

    /// GET_BROKER_CLUSTER_INFO answer (`ClusterInfo`).
    pub struct ClusterInfo {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_map::<String, BrokerData>()"))]
        pub broker_addr_table: BTreeMap<String, BrokerData>,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_map::<String, Vec<String>>()"))]
        pub cluster_addr_table: BTreeMap<String, Vec<String>>,
    }

    /// BATCH_ACK_MESSAGE body.
    pub struct BatchAckMessageRequestBody {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<BatchAck>()"))]
        pub acks: Vec<BatchAck>,
        #[serde(deserialize_with = "null_as_default")]
        pub broker_name: String,
    }

    /// One queue's acks within a batch; `bit_set` is `java.util.BitSet.toByteArray()` in base64,
    /// bit i acknowledging offset `start_offset + i`.
    pub struct BatchAck {
        #[serde(rename = "c", deserialize_with = "null_as_default")]
        pub consumer_group: String,
        #[serde(rename = "t", deserialize_with = "null_as_default")]
        pub topic: String,
        /// Retry flavour: "0" normal, "1" retry V1, "2" retry V2.
        #[serde(rename = "r", deserialize_with = "null_as_default")]
        pub retry: String,
        #[serde(rename = "so", deserialize_with = "null_as_default")]
        pub start_offset: i64,
        #[serde(rename = "q", deserialize_with = "null_as_default")]
        pub queue_id: i32,
        #[serde(rename = "rq", deserialize_with = "null_as_default")]
        pub revive_queue_id: i32,
        #[serde(rename = "pt", deserialize_with = "null_as_default")]
        pub pop_time: i64,
        #[serde(rename = "it", deserialize_with = "null_as_default")]
        pub invisible_time: i64,
        #[serde(rename = "b", deserialize_with = "bit_set_as_base64")]
        pub bit_set: String,
    }

    /// A queue as the Java `MessageQueue` serializes it.
    pub struct MessageQueue {
        #[serde(deserialize_with = "null_as_default")]
        pub broker_name: String,
        #[serde(deserialize_with = "null_as_default")]
        pub queue_id: i32,
        #[serde(deserialize_with = "null_as_default")]
        pub topic: String,
    }

    /// LOCK_BATCH_MQ body.
    pub struct LockBatchRequestBody {
        #[serde(deserialize_with = "null_as_default")]
        pub client_id: String,
        #[serde(deserialize_with = "null_as_default")]
        pub consumer_group: String,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<MessageQueue>()"))]
        pub mq_set: Vec<MessageQueue>,
        #[serde(deserialize_with = "null_as_default")]
        pub only_this_broker: bool,
    }

    /// LOCK_BATCH_MQ answer: the queues now locked by the caller.
    pub struct LockBatchResponseBody {
        #[serde(rename = "lockOKMQSet", deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<MessageQueue>()"))]
        pub lock_ok_mq_set: Vec<MessageQueue>,
    }

    /// UNLOCK_BATCH_MQ body.
    pub struct UnlockBatchRequestBody {
        #[serde(deserialize_with = "null_as_default")]
        pub client_id: String,
        #[serde(deserialize_with = "null_as_default")]
        pub consumer_group: String,
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<MessageQueue>()"))]
        pub mq_set: Vec<MessageQueue>,
        #[serde(deserialize_with = "null_as_default")]
        pub only_this_broker: bool,
    }

    /// QUERY_ASSIGNMENT body.
    pub struct QueryAssignmentRequestBody {
        #[serde(deserialize_with = "null_as_default")]
        pub client_id: String,
        #[serde(deserialize_with = "null_as_default")]
        pub consumer_group: String,
        #[serde(deserialize_with = "null_as_default")]
        pub message_model: String,
        #[serde(deserialize_with = "null_as_default")]
        pub strategy_name: String,
        #[serde(deserialize_with = "null_as_default")]
        pub topic: String,
    }

    /// QUERY_ASSIGNMENT answer.
    pub struct QueryAssignmentResponseBody {
        #[serde(deserialize_with = "null_as_default")]
        #[cfg_attr(test, proptest(strategy = "small_vec::<MessageQueueAssignment>()"))]
        pub message_queue_assignments: Vec<MessageQueueAssignment>,
    }

    pub struct MessageQueueAssignment {
        #[serde(skip_serializing_if = "Option::is_none")]
        #[cfg_attr(test, proptest(strategy = "proptest::option::of(small_map::<String, String>())"))]
        pub attachments: Option<BTreeMap<String, String>>,
        #[serde(deserialize_with = "null_as_default")]
        pub message_queue: MessageQueue,
        /// `PULL` or `POP`.
        #[serde(deserialize_with = "null_as_default")]
        pub mode: String,
    }

    /// SET_MESSAGE_REQUEST_MODE body.
    pub struct SetMessageRequestModeRequestBody {
        #[serde(deserialize_with = "null_as_default")]
        pub consumer_group: String,
        #[serde(deserialize_with = "null_as_default")]
        pub mode: String,
        #[serde(deserialize_with = "null_as_default")]
        pub pop_share_queue_num: i32,
        #[serde(deserialize_with = "null_as_default")]
        pub topic: String,
    }
}

impl TopicRouteData {
    /// The body to send to a client of `client_version`: standard JSON from version 401 on or when
    /// the client asked for it, fastjson's bare-key form otherwise (older clients expect it).
    pub fn to_json_for_client(
        &self,
        client_version: i32,
        accept_standard_json_only: bool,
    ) -> Result<Vec<u8>, BodyError> {
        if accept_standard_json_only || client_version >= version::STANDARD_JSON_ROUTE {
            self.to_json()
        } else {
            self.to_fastjson()
        }
    }

    /// fastjson's form, with bare broker-id keys.
    pub fn to_fastjson(&self) -> Result<Vec<u8>, BodyError> {
        to_fastjson(self)
    }
}

impl ClusterInfo {
    /// fastjson's form, which Java always uses for cluster info.
    pub fn to_fastjson(&self) -> Result<Vec<u8>, BodyError> {
        to_fastjson(self)
    }
}

fn to_fastjson<T: Serialize>(body: &T) -> Result<Vec<u8>, BodyError> {
    let value = serde_json::to_value(body)?;
    let mut out = Vec::new();
    fastjson::write_with_bare_keys(&value, &["brokerAddrs"], &mut out);
    Ok(out)
}

/// How far past its start offset one batch ack may reach. A pop returns at most 32 messages per
/// queue; the cap keeps a hostile bit set from asking for gigabytes.
pub const MAX_BATCH_ACK_SPAN: i64 = 1 << 16;

impl BatchAck {
    /// The acknowledged queue offsets.
    pub fn offsets(&self) -> Result<Vec<i64>, BodyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.bit_set)
            .map_err(|error| BodyError::Base64 {
                value: self.bit_set.clone(),
                reason: error.to_string(),
            })?;
        let mut offsets = Vec::new();
        for (byte_index, byte) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let position = (byte_index * 8 + bit) as i64;
                    let offset = self
                        .start_offset
                        .checked_add(position)
                        .filter(|_| position < MAX_BATCH_ACK_SPAN);
                    offsets.push(offset.ok_or(BodyError::AckOutOfRange {
                        start: self.start_offset,
                        offset: self.start_offset.saturating_add(position),
                    })?);
                }
            }
        }
        Ok(offsets)
    }

    /// Sets the bit set from offsets, which must lie within
    /// `start_offset .. start_offset + MAX_BATCH_ACK_SPAN`.
    pub fn set_offsets(&mut self, offsets: impl IntoIterator<Item = i64>) -> Result<(), BodyError> {
        let mut bytes: Vec<u8> = Vec::new();
        for offset in offsets {
            let position = offset
                .checked_sub(self.start_offset)
                .filter(|delta| (0..MAX_BATCH_ACK_SPAN).contains(delta))
                .and_then(|delta| usize::try_from(delta).ok())
                .ok_or(BodyError::AckOutOfRange {
                    start: self.start_offset,
                    offset,
                })?;
            let (byte_index, bit) = (position / 8, position % 8);
            if bytes.len() <= byte_index {
                bytes.resize(byte_index + 1, 0);
            }
            bytes[byte_index] |= 1 << bit;
        }
        self.bit_set = base64::engine::general_purpose::STANDARD.encode(bytes);
        Ok(())
    }
}

/// Collections in generated test bodies stay small so nested bodies stay cheap.
#[cfg(test)]
fn small_vec<T: proptest::arbitrary::Arbitrary>()
-> impl proptest::strategy::Strategy<Value = Vec<T>> {
    proptest::collection::vec(proptest::arbitrary::any::<T>(), 0..4)
}

#[cfg(test)]
fn small_map<K: proptest::arbitrary::Arbitrary + Ord, V: proptest::arbitrary::Arbitrary>()
-> impl proptest::strategy::Strategy<Value = BTreeMap<K, V>> {
    proptest::collection::btree_map(
        proptest::arbitrary::any::<K>(),
        proptest::arbitrary::any::<V>(),
        0..4,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route() -> TopicRouteData {
        TopicRouteData {
            broker_datas: vec![BrokerData {
                broker_addrs: BTreeMap::from([
                    (0, "127.0.0.1:10911".to_owned()),
                    (1, "127.0.0.1:10921".to_owned()),
                ]),
                broker_name: "broker-a".into(),
                cluster: "DefaultCluster".into(),
                enable_acting_master: false,
                zone_name: None,
            }],
            queue_datas: vec![QueueData {
                broker_name: "broker-a".into(),
                perm: 6,
                read_queue_nums: 4,
                topic_sys_flag: 0,
                write_queue_nums: 4,
            }],
            ..TopicRouteData::default()
        }
    }

    #[test]
    fn route_json_matches_java_field_names_and_order() {
        let json = String::from_utf8(route().to_json().expect("json")).expect("utf8");
        assert_eq!(
            json,
            r#"{"brokerDatas":[{"brokerAddrs":{"0":"127.0.0.1:10911","1":"127.0.0.1:10921"},"brokerName":"broker-a","cluster":"DefaultCluster","enableActingMaster":false}],"filterServerTable":{},"queueDatas":[{"brokerName":"broker-a","perm":6,"readQueueNums":4,"topicSysFlag":0,"writeQueueNums":4}]}"#
        );
        let old =
            String::from_utf8(route().to_json_for_client(317, false).expect("json")).expect("utf8");
        assert!(
            old.contains(r#""brokerAddrs":{0:"127.0.0.1:10911",1:"127.0.0.1:10921"}"#),
            "{old}"
        );
        assert_eq!(
            TopicRouteData::from_json(old.as_bytes()).expect("parse fastjson"),
            route()
        );
    }

    #[test]
    fn route_parses_nulls_and_old_field_names() {
        let json = br#"{"brokerDatas":[{"brokerAddrs":{0:"a:1"},"brokerName":"b","cluster":null,"zoneName":null,"enableActingMaster":null}],
            "filterServerTable":null,"orderTopicConf":null,"queueDatas":[{"brokerName":"b","perm":6,"readQueueNums":8,"topicSynFlag":3,"writeQueueNums":8}],
            "topicQueueMappingByBroker":null,"somethingNew":{"x":[1]}}"#;
        let parsed = TopicRouteData::from_json(json).expect("parse");
        assert_eq!(
            parsed.broker_datas[0]
                .broker_addrs
                .get(&0)
                .map(String::as_str),
            Some("a:1")
        );
        assert_eq!(parsed.queue_datas[0].topic_sys_flag, 3);
    }

    #[test]
    fn heartbeat_from_a_java_client_parses() {
        let json = br#"{"clientID":"10.0.0.1@1234#5678","consumerDataSet":[{"consumeFromWhere":"CONSUME_FROM_LAST_OFFSET","consumeType":"CONSUME_PASSIVELY","groupName":"g","messageModel":"CLUSTERING","subscriptionDataSet":[{"classFilterMode":false,"codeSet":[2598919],"expressionType":"TAG","subString":"TagA","subVersion":1700000000000,"tagsSet":["TagA"],"topic":"T"}],"unitMode":false}],"heartbeatFingerprint":0,"producerDataSet":[{"groupName":"CLIENT_INNER_PRODUCER"}],"withoutSub":false}"#;
        let heartbeat = HeartbeatData::from_json(json).expect("parse");
        assert_eq!(heartbeat.client_id, "10.0.0.1@1234#5678");
        assert_eq!(
            heartbeat.consumer_data_set[0].subscription_data_set[0].code_set,
            vec![2598919]
        );
        assert_eq!(
            HeartbeatData::from_json(&heartbeat.to_json().expect("json")).expect("again"),
            heartbeat
        );
    }

    #[test]
    fn heartbeat_from_the_cpp_client_parses() {
        // As the Apache C++ client 2.x writes it: enums as ordinals, subVersion as a string.
        let json = br#"{"clientID":"26633-127.0.0.1@cpp-1","consumerDataSet":[{"consumeFromWhere":4,"consumeType":1,"groupName":"g1","messageModel":0,"subscriptionDataSet":[{"subString":"*","subVersion":"1796175268311","topic":"%RETRY%g1"},{"subString":"*","subVersion":"1796175268311","topic":"CT"}]}]}"#;
        let heartbeat = HeartbeatData::from_json(json).expect("parse");
        let consumer = &heartbeat.consumer_data_set[0];
        assert_eq!(consumer.consume_from_where, "CONSUME_FROM_FIRST_OFFSET");
        assert_eq!(consumer.consume_type, "CONSUME_PASSIVELY");
        assert_eq!(consumer.message_model, "BROADCASTING");
        assert_eq!(
            consumer.subscription_data_set[1].sub_version,
            1_796_175_268_311
        );
        let unknown = br#"{"consumerDataSet":[{"consumeFromWhere":99,"groupName":"g"}]}"#;
        let unknown = HeartbeatData::from_json(unknown).expect("parse");
        assert_eq!(unknown.consumer_data_set[0].consume_from_where, "99");
        let bad = br#"{"consumerDataSet":[{"subscriptionDataSet":[{"subVersion":"soon"}]}]}"#;
        assert!(HeartbeatData::from_json(bad).is_err());
    }

    #[test]
    fn batch_ack_bits_are_little_endian() {
        let mut ack = BatchAck {
            start_offset: 100,
            ..BatchAck::default()
        };
        ack.set_offsets([100, 102, 109]).expect("in range");
        // bits 0 and 2 in byte 0 (0b101 = 5), bit 1 in byte 1 (2): what BitSet.toByteArray gives.
        assert_eq!(
            ack.bit_set,
            base64::engine::general_purpose::STANDARD.encode([5u8, 2])
        );
        assert_eq!(ack.offsets().expect("offsets"), vec![100, 102, 109]);
        assert!(matches!(
            ack.set_offsets([99]),
            Err(BodyError::AckOutOfRange { .. })
        ));
        assert!(matches!(
            ack.set_offsets([100 + MAX_BATCH_ACK_SPAN]),
            Err(BodyError::AckOutOfRange { .. })
        ));
        ack.start_offset = i64::MAX;
        ack.bit_set = base64::engine::general_purpose::STANDARD.encode([2u8]);
        assert!(matches!(
            ack.offsets(),
            Err(BodyError::AckOutOfRange { .. })
        ));
        ack.bit_set = "!!".into();
        assert!(matches!(ack.offsets(), Err(BodyError::Base64 { .. })));
    }

    #[test]
    fn batch_ack_bit_sets_are_read_as_base64_or_as_byte_arrays() {
        // rocketmq-client-rust 1.0.0 writes the bytes as numbers; fastjson writes base64.
        let numbers = br#"{"brokerName":"b","acks":[{"c":"g","t":"T","r":"0","so":8,"q":1,"rq":0,"pt":5,"it":5000,"b":[5,2,0,0,0,0,0,0]}]}"#;
        let body = BatchAckMessageRequestBody::from_json(numbers).expect("numbers");
        let offsets = body.acks.first().map(|ack| ack.offsets().expect("offsets"));
        assert_eq!(offsets, Some(vec![8, 10, 17]));
        let text =
            br#"{"brokerName":"b","acks":[{"c":"g","t":"T","so":8,"q":1,"pt":5,"b":"BQI="}]}"#;
        let body = BatchAckMessageRequestBody::from_json(text).expect("base64");
        let offsets = body.acks.first().map(|ack| ack.offsets().expect("offsets"));
        assert_eq!(offsets, Some(vec![8, 10, 17]));
        let bad = br#"{"brokerName":"b","acks":[{"c":"g","t":"T","so":8,"q":1,"pt":5,"b":[300]}]}"#;
        assert!(BatchAckMessageRequestBody::from_json(bad).is_err());
    }

    fn round_trip<T: JsonBody + PartialEq + std::fmt::Debug>(
        body: &T,
    ) -> Result<(), TestCaseError> {
        let json = body.to_json().expect("json");
        prop_assert_eq!(&T::from_json(&json).expect("parse"), body);
        let value = serde_json::to_value(body).expect("value");
        let mut fast = Vec::new();
        fastjson::write_with_bare_keys(&value, &["brokerAddrs"], &mut fast);
        prop_assert_eq!(&T::from_json(&fast).expect("parse fastjson"), body);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn route_round_trips(body: TopicRouteData) { round_trip(&body)?; }
        #[test]
        fn heartbeat_round_trips(body: HeartbeatData) { round_trip(&body)?; }
        #[test]
        fn consumer_list_round_trips(body: ConsumerList) { round_trip(&body)?; }
        #[test]
        fn cluster_info_round_trips(body: ClusterInfo) { round_trip(&body)?; }
        #[test]
        fn batch_ack_round_trips(body: BatchAckMessageRequestBody) { round_trip(&body)?; }
        #[test]
        fn lock_bodies_round_trip(lock: LockBatchRequestBody, locked: LockBatchResponseBody, unlock: UnlockBatchRequestBody) {
            round_trip(&lock)?;
            round_trip(&locked)?;
            round_trip(&unlock)?;
        }
        #[test]
        fn assignment_bodies_round_trip(query: QueryAssignmentRequestBody, answer: QueryAssignmentResponseBody, mode: SetMessageRequestModeRequestBody) {
            round_trip(&query)?;
            round_trip(&answer)?;
            round_trip(&mode)?;
        }
        #[test]
        fn batch_ack_offsets_round_trip(start in 0i64..1_000_000, deltas in proptest::collection::btree_set(0i64..512, 0..40)) {
            let mut ack = BatchAck { start_offset: start, ..BatchAck::default() };
            let offsets: Vec<i64> = deltas.iter().map(|d| start + d).collect();
            ack.set_offsets(offsets.clone()).expect("in range");
            prop_assert_eq!(ack.offsets().expect("offsets"), offsets);
        }
    }
}
