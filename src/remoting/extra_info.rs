//! POP receipt strings: the `extraInfo` (`POP_CK`) handle and the pop response's
//! `startOffsetInfo`, `msgOffsetInfo` and `orderCountInfo` headers (Java's `ExtraInfoUtil` format).
//!
//! extraInfo is space-separated: ckQueueOffset popTime invisibleTime reviveQid topicType brokerName
//! queueId [queueOffset [commitLogOffset]]. Info strings are `;`-separated items of
//! space-separated fields.

use std::fmt;
use std::str::FromStr;

/// The revive queue id that marks an orderly pop.
pub const ORDER_REVIVE_QID: i32 = 999;

/// Why a POP string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtraInfoError {
    #[error("{what} {text:?} has {found} fields, needs at least {needed}")]
    TooFewFields {
        what: &'static str,
        text: String,
        found: usize,
        needed: usize,
    },
    #[error("{what} field {field} = {value:?} is not valid")]
    InvalidField {
        what: &'static str,
        field: &'static str,
        value: String,
    },
}

/// Whether a popped message came from its topic or from a pop retry topic (extraInfo field 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum TopicType {
    #[default]
    Normal,
    /// `%RETRY%<group>_<topic>`.
    RetryV1,
    /// `%RETRY%<group>+<topic>`.
    RetryV2,
}

impl TopicType {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicType::Normal => "0",
            TopicType::RetryV1 => "1",
            TopicType::RetryV2 => "2",
        }
    }

    fn parse(what: &'static str, field: &'static str, text: &str) -> Result<Self, ExtraInfoError> {
        match text {
            "0" => Ok(TopicType::Normal),
            "1" => Ok(TopicType::RetryV1),
            "2" => Ok(TopicType::RetryV2),
            _ => Err(ExtraInfoError::InvalidField {
                what,
                field,
                value: text.to_owned(),
            }),
        }
    }

    /// How Java's broker labels a popped topic in `startOffsetInfo` and `msgOffsetInfo`
    /// (`ExtraInfoUtil.getRetry`): any retry topic is a retry kind, V2 when it has a `+`.
    pub fn of_popped_topic(topic: &str) -> Self {
        match topic.strip_prefix("%RETRY%") {
            Some(rest) if rest.contains('+') => TopicType::RetryV2,
            Some(_) => TopicType::RetryV1,
            None => TopicType::Normal,
        }
    }

    /// The topic the broker stores the message under, given the original topic and consumer group.
    pub fn real_topic(self, topic: &str, group: &str) -> String {
        match self {
            TopicType::Normal => topic.to_owned(),
            TopicType::RetryV1 => format!("%RETRY%{group}_{topic}"),
            TopicType::RetryV2 => format!("%RETRY%{group}+{topic}"),
        }
    }
}

/// A parsed extraInfo receipt handle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ExtraInfo {
    /// Start offset of the pop batch (the checkpoint's offset).
    pub ck_queue_offset: i64,
    pub pop_time: i64,
    pub invisible_time: i64,
    /// Revive queue, or [`ORDER_REVIVE_QID`] for an orderly pop.
    pub revive_qid: i32,
    pub topic_type: TopicType,
    /// The broker that served the pop; acks must go back to it.
    #[cfg_attr(test, proptest(regex = "[A-Za-z0-9_.-]{1,24}"))]
    pub broker_name: String,
    pub queue_id: i32,
    /// This message's queue offset, when the handle carries it.
    pub queue_offset: Option<i64>,
    /// Commit-log offset, appended by 5.x proxies; only present with `queue_offset`.
    pub commit_log_offset: Option<i64>,
}

const EXTRA_INFO: &str = "extraInfo";

fn field<T: FromStr>(
    what: &'static str,
    name: &'static str,
    text: &str,
) -> Result<T, ExtraInfoError> {
    text.parse().map_err(|_| ExtraInfoError::InvalidField {
        what,
        field: name,
        value: text.to_owned(),
    })
}

impl ExtraInfo {
    pub fn is_order(&self) -> bool {
        self.revive_qid == ORDER_REVIVE_QID
    }
}

impl FromStr for ExtraInfo {
    type Err = ExtraInfoError;

    fn from_str(text: &str) -> Result<Self, ExtraInfoError> {
        let parts: Vec<&str> = text.split(' ').collect();
        let [
            ck,
            pop_time,
            invisible,
            revive,
            topic_type,
            broker,
            queue_id,
            rest @ ..,
        ] = parts.as_slice()
        else {
            return Err(ExtraInfoError::TooFewFields {
                what: EXTRA_INFO,
                text: text.to_owned(),
                found: parts.len(),
                needed: 7,
            });
        };
        if broker.is_empty() {
            return Err(ExtraInfoError::InvalidField {
                what: EXTRA_INFO,
                field: "brokerName",
                value: String::new(),
            });
        }
        Ok(Self {
            ck_queue_offset: field(EXTRA_INFO, "ckQueueOffset", ck)?,
            pop_time: field(EXTRA_INFO, "popTime", pop_time)?,
            invisible_time: field(EXTRA_INFO, "invisibleTime", invisible)?,
            revive_qid: field(EXTRA_INFO, "reviveQid", revive)?,
            topic_type: TopicType::parse(EXTRA_INFO, "topicType", topic_type)?,
            broker_name: (*broker).to_owned(),
            queue_id: field(EXTRA_INFO, "queueId", queue_id)?,
            queue_offset: rest
                .first()
                .map(|t| field(EXTRA_INFO, "queueOffset", t))
                .transpose()?,
            commit_log_offset: rest
                .get(1)
                .map(|t| field(EXTRA_INFO, "commitLogOffset", t))
                .transpose()?,
        })
    }
}

impl fmt::Display for ExtraInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {}",
            self.ck_queue_offset,
            self.pop_time,
            self.invisible_time,
            self.revive_qid,
            self.topic_type.as_str(),
            self.broker_name,
            self.queue_id
        )?;
        if let Some(offset) = self.queue_offset {
            write!(f, " {offset}")?;
            if let Some(commit_log_offset) = self.commit_log_offset {
                write!(f, " {commit_log_offset}")?;
            }
        }
        Ok(())
    }
}

/// One `startOffsetInfo` item: where the pop started in one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StartOffsetEntry {
    pub topic_type: TopicType,
    pub queue_id: i32,
    pub start_offset: i64,
}

/// One `msgOffsetInfo` item: the offsets popped from one queue, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MsgOffsetEntry {
    pub topic_type: TopicType,
    pub queue_id: i32,
    pub offsets: Vec<i64>,
}

/// One `orderCountInfo` item: the reconsume count of a queue, or of one offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct OrderCountEntry {
    pub topic_type: TopicType,
    pub queue_id: i32,
    /// Present in the `qo<queueId>%<offset>` form.
    pub queue_offset: Option<i64>,
    pub count: i32,
}

/// An item of one of the `;`-joined pop info strings.
pub trait InfoItem: Sized {
    const WHAT: &'static str;
    fn parse_item(item: &str) -> Result<Self, ExtraInfoError>;
    fn write_item(&self, out: &mut String);
}

/// Parses a `;`-joined info string; an empty string has no items.
pub fn parse_info<T: InfoItem>(text: &str) -> Result<Vec<T>, ExtraInfoError> {
    text.split(';')
        .filter(|item| !item.is_empty())
        .map(T::parse_item)
        .collect()
}

/// Builds a `;`-joined info string.
pub fn format_info<T: InfoItem>(items: &[T]) -> String {
    let mut out = String::new();
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push(';');
        }
        item.write_item(&mut out);
    }
    out
}

fn three_fields<'a>(what: &'static str, item: &'a str) -> Result<[&'a str; 3], ExtraInfoError> {
    let parts: Vec<&str> = item.split(' ').collect();
    match parts.as_slice() {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(ExtraInfoError::TooFewFields {
            what,
            text: item.to_owned(),
            found: parts.len(),
            needed: 3,
        }),
    }
}

impl InfoItem for StartOffsetEntry {
    const WHAT: &'static str = "startOffsetInfo";
    fn parse_item(item: &str) -> Result<Self, ExtraInfoError> {
        let [topic_type, queue_id, offset] = three_fields(Self::WHAT, item)?;
        Ok(Self {
            topic_type: TopicType::parse(Self::WHAT, "type", topic_type)?,
            queue_id: field(Self::WHAT, "queueId", queue_id)?,
            start_offset: field(Self::WHAT, "startOffset", offset)?,
        })
    }
    fn write_item(&self, out: &mut String) {
        out.push_str(&format!(
            "{} {} {}",
            self.topic_type.as_str(),
            self.queue_id,
            self.start_offset
        ));
    }
}

impl InfoItem for MsgOffsetEntry {
    const WHAT: &'static str = "msgOffsetInfo";
    fn parse_item(item: &str) -> Result<Self, ExtraInfoError> {
        let [topic_type, queue_id, offsets] = three_fields(Self::WHAT, item)?;
        Ok(Self {
            topic_type: TopicType::parse(Self::WHAT, "type", topic_type)?,
            queue_id: field(Self::WHAT, "queueId", queue_id)?,
            offsets: offsets
                .split(',')
                .filter(|offset| !offset.is_empty())
                .map(|offset| field(Self::WHAT, "offset", offset))
                .collect::<Result<_, _>>()?,
        })
    }
    fn write_item(&self, out: &mut String) {
        let offsets: Vec<String> = self.offsets.iter().map(i64::to_string).collect();
        out.push_str(&format!(
            "{} {} {}",
            self.topic_type.as_str(),
            self.queue_id,
            offsets.join(",")
        ));
    }
}

impl InfoItem for OrderCountEntry {
    const WHAT: &'static str = "orderCountInfo";
    fn parse_item(item: &str) -> Result<Self, ExtraInfoError> {
        let [topic_type, queue, count] = three_fields(Self::WHAT, item)?;
        let (queue_id, queue_offset) = match queue.strip_prefix("qo") {
            Some(rest) => {
                let (queue_id, offset) =
                    rest.split_once('%')
                        .ok_or_else(|| ExtraInfoError::InvalidField {
                            what: Self::WHAT,
                            field: "queue",
                            value: queue.to_owned(),
                        })?;
                (
                    field(Self::WHAT, "queueId", queue_id)?,
                    Some(field(Self::WHAT, "queueOffset", offset)?),
                )
            }
            None => (field(Self::WHAT, "queueId", queue)?, None),
        };
        Ok(Self {
            topic_type: TopicType::parse(Self::WHAT, "type", topic_type)?,
            queue_id,
            queue_offset,
            count: field(Self::WHAT, "count", count)?,
        })
    }
    fn write_item(&self, out: &mut String) {
        match self.queue_offset {
            Some(offset) => out.push_str(&format!(
                "{} qo{}%{} {}",
                self.topic_type.as_str(),
                self.queue_id,
                offset,
                self.count
            )),
            None => out.push_str(&format!(
                "{} {} {}",
                self.topic_type.as_str(),
                self.queue_id,
                self.count
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_broker_handle() {
        let info: ExtraInfo = "100 1700000000000 60000 3 0 broker-a 2 105"
            .parse()
            .expect("parse");
        assert_eq!(info.ck_queue_offset, 100);
        assert_eq!(info.revive_qid, 3);
        assert_eq!(info.broker_name, "broker-a");
        assert_eq!(info.queue_id, 2);
        assert_eq!(info.queue_offset, Some(105));
        assert_eq!(info.commit_log_offset, None);
        assert_eq!(
            info.to_string(),
            "100 1700000000000 60000 3 0 broker-a 2 105"
        );
        assert_eq!(TopicType::RetryV1.real_topic("T", "G"), "%RETRY%G_T");
        assert_eq!(TopicType::RetryV2.real_topic("T", "G"), "%RETRY%G+T");
    }

    #[test]
    fn bad_handles_are_errors() {
        assert!(matches!(
            "1 2 3".parse::<ExtraInfo>(),
            Err(ExtraInfoError::TooFewFields { .. })
        ));
        assert!(matches!(
            "x 2 3 4 0 b 1".parse::<ExtraInfo>(),
            Err(ExtraInfoError::InvalidField {
                field: "ckQueueOffset",
                ..
            })
        ));
        assert!(matches!(
            "1 2 3 4 7 b 1".parse::<ExtraInfo>(),
            Err(ExtraInfoError::InvalidField {
                field: "topicType",
                ..
            })
        ));
        assert!(parse_info::<OrderCountEntry>("0 qo1 3").is_err());
    }

    #[test]
    fn popped_topics_are_labelled_as_java_labels_them() {
        assert_eq!(TopicType::of_popped_topic("Orders"), TopicType::Normal);
        assert_eq!(TopicType::of_popped_topic("%RETRY%g"), TopicType::RetryV1);
        assert_eq!(
            TopicType::of_popped_topic("%RETRY%g_Orders"),
            TopicType::RetryV1
        );
        assert_eq!(
            TopicType::of_popped_topic("%RETRY%g+Orders"),
            TopicType::RetryV2
        );
    }

    #[test]
    fn info_strings_match_java_examples() {
        let start = parse_info::<StartOffsetEntry>("0 0 10;1 3 4").expect("start");
        assert_eq!(start[1].topic_type, TopicType::RetryV1);
        let offsets = parse_info::<MsgOffsetEntry>("0 0 10,11,12").expect("offsets");
        assert_eq!(offsets[0].offsets, vec![10, 11, 12]);
        let order = parse_info::<OrderCountEntry>("0 qo2%15 3;0 1 0").expect("order");
        assert_eq!(order[0].queue_offset, Some(15));
        assert_eq!(format_info(&order), "0 qo2%15 3;0 1 0");
    }

    proptest! {
        #[test]
        fn extra_info_round_trips(mut info: ExtraInfo) {
            if info.queue_offset.is_none() {
                info.commit_log_offset = None;
            }
            prop_assert_eq!(info.to_string().parse::<ExtraInfo>().expect("parse"), info);
        }

        #[test]
        fn info_strings_round_trip(
            start in proptest::collection::vec(any::<StartOffsetEntry>(), 0..5),
            msg in proptest::collection::vec(any::<MsgOffsetEntry>().prop_filter("has offsets", |e| !e.offsets.is_empty()), 0..5),
            order in proptest::collection::vec(any::<OrderCountEntry>(), 0..5),
        ) {
            prop_assert_eq!(parse_info::<StartOffsetEntry>(&format_info(&start)).expect("start"), start);
            prop_assert_eq!(parse_info::<MsgOffsetEntry>(&format_info(&msg)).expect("msg"), msg);
            prop_assert_eq!(parse_info::<OrderCountEntry>(&format_info(&order)).expect("order"), order);
        }
    }
}
