//! Which consumer groups the sidecar converts, and why: a pure decision from the configuration,
//! the group's heartbeat and what the group has been seen doing.

use serde::Serialize;

use super::config::{ConsumeConfig, ConsumeMode};
use crate::remoting::body::ConsumerData;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Pop,
    Pull,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub mode: Mode,
    pub reason: String,
}

impl Decision {
    fn pull(reason: impl Into<String>) -> Self {
        Self {
            mode: Mode::Pull,
            reason: reason.into(),
        }
    }

    fn pop(reason: impl Into<String>) -> Self {
        Self {
            mode: Mode::Pop,
            reason: reason.into(),
        }
    }
}

/// What the sidecar knows about a group when it decides.
pub struct GroupFacts<'a> {
    pub group: &'a str,
    /// A member's latest heartbeat entry for the group.
    pub consumer: &'a ConsumerData,
    /// The group has locked queues (LOCK_BATCH_MQ): it consumes orderly.
    pub orderly: bool,
    /// The group pulls with PULL_MESSAGE while registered as CONSUME_ACTIVELY: the legacy pull
    /// consumer, which picks its own offsets (the lite pull consumer uses LITE_PULL_MESSAGE).
    pub legacy_pull: bool,
}

/// The mode of a group. `route_mode` gives the mode a topic's route sets, if any.
pub fn decide(
    config: &ConsumeConfig,
    facts: &GroupFacts<'_>,
    route_mode: impl Fn(&str) -> Option<ConsumeMode>,
) -> Decision {
    let configured = config.groups.get(facts.group).copied();
    if configured == Some(ConsumeMode::Pull) {
        return Decision::pull("consume.groups sets pull for the group");
    }
    if facts
        .consumer
        .message_model
        .eq_ignore_ascii_case("BROADCASTING")
    {
        return Decision::pull(
            "broadcasting: every consumer must see every message, POP shares them",
        );
    }
    if facts.orderly {
        return Decision::pull("orderly: the group locks its queues (LOCK_BATCH_MQ)");
    }
    if facts
        .consumer
        .consume_type
        .eq_ignore_ascii_case("CONSUME_POP")
    {
        return Decision::pull("the client pops by itself");
    }
    if facts.legacy_pull {
        return Decision::pull("legacy pull consumer: it chooses its own offsets");
    }
    if configured == Some(ConsumeMode::Pop) {
        return Decision::pop("consume.groups sets pop for the group");
    }
    let topics = facts
        .consumer
        .subscription_data_set
        .iter()
        .map(|subscription| subscription.topic.as_str())
        .filter(|topic| !topic.starts_with("%RETRY%"));
    let mut by_route = false;
    for topic in topics {
        match route_mode(topic) {
            Some(ConsumeMode::Pull) => {
                return Decision::pull(format!("the route of topic {topic} sets pull"));
            }
            Some(ConsumeMode::Pop) => by_route = true,
            Some(ConsumeMode::Auto) | None => {}
        }
    }
    if by_route {
        return Decision::pop("the group's routes set pop");
    }
    match config.mode {
        ConsumeMode::Pull => Decision::pull("consume.mode is pull"),
        ConsumeMode::Pop => Decision::pop("consume.mode is pop"),
        ConsumeMode::Auto => Decision::pop("auto: a clustering, concurrently consuming group"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::body::SubscriptionData;

    fn consumer(model: &str, kind: &str, topics: &[&str]) -> ConsumerData {
        ConsumerData {
            message_model: model.into(),
            consume_type: kind.into(),
            group_name: "g".into(),
            subscription_data_set: topics
                .iter()
                .map(|topic| SubscriptionData {
                    topic: (*topic).into(),
                    ..SubscriptionData::default()
                })
                .collect(),
            ..ConsumerData::default()
        }
    }

    fn facts<'a>(consumer: &'a ConsumerData, orderly: bool, legacy_pull: bool) -> GroupFacts<'a> {
        GroupFacts {
            group: "g",
            consumer,
            orderly,
            legacy_pull,
        }
    }

    #[test]
    fn auto_converts_clustering_concurrent_groups_only() {
        let config = ConsumeConfig {
            mode: ConsumeMode::Auto,
            ..ConsumeConfig::default()
        };
        let push = consumer("CLUSTERING", "CONSUME_PASSIVELY", &["T", "%RETRY%g"]);
        let none = |_: &str| None;
        assert_eq!(
            decide(&config, &facts(&push, false, false), none).mode,
            Mode::Pop
        );
        assert_eq!(
            decide(&config, &facts(&push, true, false), none).mode,
            Mode::Pull
        );
        let lite = consumer("CLUSTERING", "CONSUME_ACTIVELY", &["T"]);
        assert_eq!(
            decide(&config, &facts(&lite, false, false), none).mode,
            Mode::Pop
        );
        assert_eq!(
            decide(&config, &facts(&lite, false, true), none).mode,
            Mode::Pull
        );
        let broadcast = consumer("BROADCASTING", "CONSUME_PASSIVELY", &["T"]);
        let decision = decide(&config, &facts(&broadcast, false, false), none);
        assert_eq!(decision.mode, Mode::Pull);
        assert!(decision.reason.contains("broadcasting"));
    }

    #[test]
    fn overrides_win_over_routes_and_routes_over_the_default() {
        let mut config = ConsumeConfig {
            mode: ConsumeMode::Pull,
            ..ConsumeConfig::default()
        };
        let push = consumer("CLUSTERING", "CONSUME_PASSIVELY", &["T", "U"]);
        let pop_route = |_: &str| Some(ConsumeMode::Pop);
        assert_eq!(
            decide(&config, &facts(&push, false, false), pop_route).mode,
            Mode::Pop
        );
        let mixed = |topic: &str| (topic == "U").then_some(ConsumeMode::Pull);
        let decision = decide(&config, &facts(&push, false, false), mixed);
        assert_eq!(decision.mode, Mode::Pull);
        assert!(decision.reason.contains("topic U"));
        config.groups.insert("g".into(), ConsumeMode::Pop);
        assert_eq!(
            decide(&config, &facts(&push, false, false), mixed).mode,
            Mode::Pop
        );
        let broadcast = consumer("BROADCASTING", "CONSUME_PASSIVELY", &["T"]);
        assert_eq!(
            decide(&config, &facts(&broadcast, false, false), mixed).mode,
            Mode::Pull,
            "a forced pop still cannot serve broadcasting"
        );
    }
}
