//! Topic and consumer-group names: one set of rules, checked wherever a name comes in from the
//! network or from disk, because names become directory names and keys of the metadata files.
//!
//! The rules are RocketMQ's: a name is 1 or more characters of `[%|a-zA-Z0-9_-]`; a topic has at
//! most 127 of them (the commit-log record stores its length in one byte). A group has at most 120:
//! Java's client allows 255, but the broker builds the topics `%RETRY%<group>` and `%DLQ%<group>`
//! from it, which must themselves be valid topics (Apache RocketMQ lowered its own limit to 120
//! for the same reason, apache/rocketmq#9563). With these characters a name can never be `.`,
//! `..`, or hold a path separator, so a name is always exactly one path component.
//!
//! System topics that the broker creates for itself may not be written by clients directly.

use std::fmt;

/// Longest topic name.
pub const TOPIC_MAX_LEN: usize = 127;
/// Longest consumer group name: `%RETRY%` + group fits in [`TOPIC_MAX_LEN`].
pub const GROUP_MAX_LEN: usize = TOPIC_MAX_LEN - RETRY_PREFIX.len();
/// Queues per topic, and so one more than the highest queue id the store accepts.
pub const MAX_QUEUES: i32 = 1024;

pub const RETRY_PREFIX: &str = "%RETRY%";
pub const DLQ_PREFIX: &str = "%DLQ%";
/// Java's prefix for the broker's own topics (revive topics, POP logs, ...).
pub const SYSTEM_TOPIC_PREFIX: &str = "rmq_sys_";
/// The topic Java producers ask the route of when theirs does not exist yet.
pub const AUTO_CREATE_TOPIC: &str = "TBW102";
pub const SCHEDULE_TOPIC: &str = "SCHEDULE_TOPIC_XXXX";
pub const HALF_TOPIC: &str = "RMQ_SYS_TRANS_HALF_TOPIC";
pub const OP_TOPIC: &str = "RMQ_SYS_TRANS_OP_HALF_TOPIC";

/// Topics only the broker writes: Java's not-allowed-to-send set, plus the auto-create template.
const RESERVED_TOPICS: &[&str] = &[
    AUTO_CREATE_TOPIC,
    SCHEDULE_TOPIC,
    "SCHEDULE_TOPIC_XXXX_V2",
    HALF_TOPIC,
    OP_TOPIC,
    "TRANS_CHECK_MAX_TIME_TOPIC",
    "SELF_TEST_TOPIC",
    "OFFSET_MOVED_EVENT",
];

/// What a name names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Topic,
    Group,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Topic => "topic",
            NameKind::Group => "consumer group",
        })
    }
}

/// Why a name or queue id was refused. `shown` is the name escaped and cut short, so a hostile
/// name cannot make error messages and logs arbitrarily long or unprintable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the {kind} name is blank")]
    Blank { kind: NameKind },
    #[error("the {kind} name {shown} is {len} characters long, longer than the maximum of {max}")]
    TooLong {
        kind: NameKind,
        shown: String,
        len: usize,
        max: usize,
    },
    #[error(
        "the {kind} name {shown} contains illegal characters, allowing only ^[%|a-zA-Z0-9_-]+$"
    )]
    IllegalCharacters { kind: NameKind, shown: String },
    #[error("the topic {shown} is reserved for the broker's own use; clients may not write it")]
    Reserved { shown: String },
    #[error("queue id {queue_id} of topic {shown} is outside 0..{max}", max = MAX_QUEUES)]
    QueueId { shown: String, queue_id: i32 },
}

/// At most this many characters of a refused name go into a message.
const SHOWN_CHARS: usize = 64;

/// `name` quoted and escaped, cut to [`SHOWN_CHARS`] characters.
pub fn shown(name: &str) -> String {
    let mut out = String::new();
    let mut chars = name.chars();
    for c in chars.by_ref().take(SHOWN_CHARS) {
        out.extend(c.escape_debug());
    }
    if chars.next().is_some() {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

fn legal(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'%' | b'|' | b'_' | b'-')
}

fn validate(kind: NameKind, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Blank { kind });
    }
    if !name.bytes().all(legal) {
        return Err(NameError::IllegalCharacters {
            kind,
            shown: shown(name),
        });
    }
    // Only ASCII is left, so bytes are characters.
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            shown: shown(name),
            len: name.len(),
            max,
        });
    }
    Ok(())
}

/// Any valid topic name, system topics included (reads, and what the broker writes itself).
pub fn validate_topic(topic: &str) -> Result<(), NameError> {
    validate(NameKind::Topic, topic, TOPIC_MAX_LEN)
}

pub fn validate_group(group: &str) -> Result<(), NameError> {
    validate(NameKind::Group, group, GROUP_MAX_LEN)
}

/// Whether only the broker may write `topic`.
pub fn is_reserved_topic(topic: &str) -> bool {
    RESERVED_TOPICS.contains(&topic) || topic.starts_with(SYSTEM_TOPIC_PREFIX)
}

/// A topic a client may send to or create: valid and not reserved. Retry and dead-letter topics
/// are allowed, as in Java: clients resend to `%RETRY%<group>` when a send-back fails.
pub fn validate_client_topic(topic: &str) -> Result<(), NameError> {
    validate_topic(topic)?;
    if is_reserved_topic(topic) {
        return Err(NameError::Reserved {
            shown: shown(topic),
        });
    }
    Ok(())
}

/// A queue id the store can hold.
pub fn validate_queue_id(topic: &str, queue_id: i32) -> Result<(), NameError> {
    if (0..MAX_QUEUES).contains(&queue_id) {
        Ok(())
    } else {
        Err(NameError::QueueId {
            shown: shown(topic),
            queue_id,
        })
    }
}

/// The retry topic of a valid group.
pub fn retry_topic(group: &str) -> Result<String, NameError> {
    validate_group(group)?;
    Ok(format!("{RETRY_PREFIX}{group}"))
}

/// The dead-letter topic of a valid group.
pub fn dead_letter_topic(group: &str) -> Result<String, NameError> {
    validate_group(group)?;
    Ok(format!("{DLQ_PREFIX}{group}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_legal_characters_pass() {
        for topic in [
            "T",
            "TopicTest",
            "%RETRY%g",
            "ns%Topic|x-y_z",
            "rmq_sys_POP_LOG",
        ] {
            assert_eq!(validate_topic(topic), Ok(()), "{topic}");
        }
        assert_eq!(validate_topic(&"t".repeat(TOPIC_MAX_LEN)), Ok(()));
        assert_eq!(validate_group(&"g".repeat(GROUP_MAX_LEN)), Ok(()));
        assert_eq!(GROUP_MAX_LEN, 120);
    }

    #[test]
    fn traversal_separators_nul_and_unicode_are_illegal() {
        for name in [
            "../../../tmp/x",
            "..",
            ".",
            "a/b",
            "a\\b",
            "a\0b",
            "a b",
            "a.b",
            "é",
            "/abs",
        ] {
            assert!(
                matches!(
                    validate_group(name),
                    Err(NameError::IllegalCharacters { .. })
                ),
                "{name:?}"
            );
            assert!(validate_topic(name).is_err(), "{name:?}");
        }
        assert_eq!(
            validate_topic(""),
            Err(NameError::Blank {
                kind: NameKind::Topic
            })
        );
    }

    #[test]
    fn lengths_are_bounded() {
        let error = validate_topic(&"t".repeat(TOPIC_MAX_LEN + 1)).expect_err("too long");
        assert!(matches!(
            error,
            NameError::TooLong {
                len: 128,
                max: 127,
                ..
            }
        ));
        let error = validate_group(&"g".repeat(300)).expect_err("too long");
        assert!(error.to_string().contains("300 characters"), "{error}");
        assert!(
            error.to_string().len() < 200,
            "the name is cut short: {error}"
        );
        // A valid group always gives valid retry and dead-letter topics.
        let longest = "g".repeat(GROUP_MAX_LEN);
        let retry = retry_topic(&longest).expect("retry topic");
        assert_eq!(validate_topic(&retry), Ok(()));
        let dead = dead_letter_topic(&longest).expect("dlq topic");
        assert_eq!(validate_topic(&dead), Ok(()));
        assert!(retry_topic("../../VictimTopic").is_err());
        assert!(dead_letter_topic(&"g".repeat(GROUP_MAX_LEN + 1)).is_err());
    }

    #[test]
    fn clients_cannot_write_system_topics() {
        for topic in [
            SCHEDULE_TOPIC,
            HALF_TOPIC,
            OP_TOPIC,
            AUTO_CREATE_TOPIC,
            "rmq_sys_REVIVE_LOG_DefaultCluster",
            "rmq_sys_POP_LOG",
        ] {
            assert!(
                matches!(
                    validate_client_topic(topic),
                    Err(NameError::Reserved { .. })
                ),
                "{topic}"
            );
        }
        for topic in [
            "TopicTest",
            "%RETRY%group",
            "%DLQ%group",
            "RMQ_SYS_TRACE_TOPIC",
        ] {
            assert_eq!(validate_client_topic(topic), Ok(()), "{topic}");
        }
    }

    #[test]
    fn queue_ids_and_shown_names() {
        assert_eq!(validate_queue_id("T", 0), Ok(()));
        assert_eq!(validate_queue_id("T", MAX_QUEUES - 1), Ok(()));
        assert!(validate_queue_id("T", -3).is_err());
        assert!(validate_queue_id("T", MAX_QUEUES).is_err());
        assert_eq!(shown("a\0b"), "\"a\\0b\"");
        assert!(shown(&"x".repeat(500)).ends_with("...\""));
    }
}
