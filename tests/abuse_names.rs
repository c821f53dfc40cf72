//! Hostile topic and group names, straight to the bundled broker and through the sidecar: path
//! traversal through CONSUMER_SEND_MSG_BACK and heartbeats, names that must not reach topics.json,
//! client writes to the schedule topic, and schedule entries planted with bad targets. Each refusal
//! is checked by code and remark, and the disk is checked for what must not be there.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::RunningBroker;
use common::raw::RawClient;
use rocketmesh::broker::schedule::{self, SCHEDULE_TOPIC, property};
use rocketmesh::broker::store::MessageStore;
use rocketmesh::broker::{BrokerConfig, BrokerState};
use rocketmesh::proxy;
use rocketmesh::remoting::body::{ConsumerData, HeartbeatData, JsonBody, SubscriptionData};
use rocketmesh::remoting::header::{
    ChangeInvisibleTimeRequestHeader, ConsumerSendMsgBackRequestHeader, GetMaxOffsetRequestHeader,
    PopMessageRequestHeader, PullMessageRequestHeader, SendMessageRequestHeader,
};
use rocketmesh::remoting::message::{MessageRecord, OffsetMessageId, Properties};
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};

const TOPIC: &str = "AbuseTopic";
const VICTIM: &str = "VictimTopic";
const ILLEGAL: &str = "contains illegal characters, allowing only ^[%|a-zA-Z0-9_-]+$";

fn send_request(topic: &str, queue_id: i32, properties: &str, body: &str) -> RemotingCommand {
    RemotingCommand::request(RequestCode::SEND_MESSAGE, 0)
        .with_header(&SendMessageRequestHeader {
            producer_group: "abuse_producer".into(),
            topic: topic.into(),
            default_topic: "TBW102".into(),
            default_topic_queue_nums: 4,
            queue_id,
            born_timestamp: schedule::now_ms(),
            properties: Some(properties.to_owned()),
            ..Default::default()
        })
        .with_body(body.to_owned())
}

/// Sends one message and returns its commit-log offset.
async fn send_one(client: &mut RawClient, topic: &str, queue_id: i32, body: &str) -> i64 {
    let answer = client.call(send_request(topic, queue_id, "", body)).await;
    assert_eq!(answer.code, 0, "send: {:?}", answer.remark);
    answer
        .ext("msgId")
        .and_then(|id| id.parse::<OffsetMessageId>().ok())
        .expect("an offset message id")
        .commit_log_offset
}

fn send_back(offset: i64, group: &str, delay_level: i32, bname: Option<&str>) -> RemotingCommand {
    RemotingCommand::request(RequestCode::CONSUMER_SEND_MSG_BACK, 0).with_header(
        &ConsumerSendMsgBackRequestHeader {
            offset,
            group: group.into(),
            delay_level,
            origin_topic: Some(TOPIC.into()),
            broker_name: bname.map(str::to_owned),
            ..Default::default()
        },
    )
}

fn heartbeat(group: &str) -> RemotingCommand {
    let heartbeat = HeartbeatData {
        client_id: "127.0.0.1@abuse".into(),
        consumer_data_set: vec![ConsumerData {
            group_name: group.into(),
            consume_type: "CONSUME_PASSIVELY".into(),
            message_model: "CLUSTERING".into(),
            consume_from_where: "CONSUME_FROM_FIRST_OFFSET".into(),
            subscription_data_set: vec![SubscriptionData {
                topic: TOPIC.into(),
                sub_string: "*".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    RemotingCommand::request(RequestCode::HEART_BEAT, 0)
        .with_body(heartbeat.to_json().expect("heartbeat"))
}

fn assert_refused(answer: &RemotingCommand, code: ResponseCode, remark: &str) {
    assert_eq!(answer.code, code.0, "remark: {:?}", answer.remark);
    let text = answer.remark.as_deref().unwrap_or_default();
    assert!(text.contains(remark), "remark {text:?} lacks {remark:?}");
    println!("refused with code {}: {text}", answer.code);
}

/// Every path below `root`, relative to it, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .expect("below root")
                    .display()
                    .to_string(),
            );
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A group that climbs out of the consume-queue directory and names `target` (absolute).
fn escaping_group(target: &Path) -> String {
    let climb = "../".repeat(30);
    format!(
        "{climb}{}",
        target.display().to_string().trim_start_matches('/')
    )
}

/// The max offsets of queues 0..4 of `topic`.
async fn offsets(address: SocketAddr, topic: &str) -> Vec<i64> {
    let mut client = RawClient::connect(address).await;
    let mut offsets = Vec::new();
    for queue_id in 0..4 {
        let answer = client
            .call(
                RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 0).with_header(
                    &GetMaxOffsetRequestHeader {
                        topic: topic.into(),
                        queue_id,
                        ..Default::default()
                    },
                ),
            )
            .await;
        offsets.push(
            answer
                .ext("offset")
                .and_then(|offset| offset.parse().ok())
                .unwrap_or(-1),
        );
    }
    offsets
}

fn topics_json(data: &Path) -> String {
    std::fs::read_to_string(data.join("config").join("topics.json")).unwrap_or_default()
}

async fn sidecar_for(broker: SocketAddr) -> proxy::RunningSidecar {
    proxy::start(common::sidecar_config(&[("broker-a", broker)], ""))
        .await
        .expect("sidecar")
}

async fn start_named(data: &Path) -> RunningBroker {
    RunningBroker::start_with(data, |config| config.broker_name = "broker-a".into()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_back_traversal_straight_to_the_broker_creates_nothing_outside_the_data_dir() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data = parent.path().join("data");
    let broker = start_named(&data).await;
    let mut client = RawClient::connect(broker.addr).await;
    let offset = send_one(&mut client, TOPIC, 0, "give-back").await;
    let group = escaping_group(&parent.path().join("escaped"));
    // Delay level -1 goes to %DLQ%<group>, 0 to %RETRY%<group>: both build a path.
    for delay_level in [-1, 0] {
        let answer = client
            .call(send_back(offset, &group, delay_level, None))
            .await;
        assert_refused(&answer, ResponseCode::INVALID_PARAMETER, ILLEGAL);
    }
    broker.state.metadata.persist().expect("persist");
    assert_eq!(
        tree(parent.path()).first().map(String::as_str),
        Some("data")
    );
    assert!(
        tree(parent.path())
            .iter()
            .all(|path| path.starts_with("data")),
        "{:?}",
        tree(parent.path())
    );
    assert!(!topics_json(&data).contains(".."), "{}", topics_json(&data));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_back_traversal_through_the_sidecar_creates_nothing_outside_the_data_dir() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data = parent.path().join("data");
    let broker = start_named(&data).await;
    let sidecar = sidecar_for(broker.addr).await;
    let offset = send_one(&mut RawClient::connect(broker.addr).await, TOPIC, 0, "x").await;
    let mut through = RawClient::connect(sidecar.listeners[0]).await;
    let group = escaping_group(&parent.path().join("escaped"));
    for delay_level in [-1, 0] {
        let answer = through
            .call(send_back(offset, &group, delay_level, Some("broker-a")))
            .await;
        assert_refused(&answer, ResponseCode::INVALID_PARAMETER, ILLEGAL);
    }
    broker.state.metadata.persist().expect("persist");
    assert!(
        tree(parent.path())
            .iter()
            .all(|path| path.starts_with("data")),
        "{:?}",
        tree(parent.path())
    );
    assert!(!topics_json(&data).contains(".."));
    sidecar.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victim_topics_queues_do_not_change_straight_through_the_sidecar_or_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start_named(dir.path()).await;
    let mut client = RawClient::connect(broker.addr).await;
    for index in 0..2 {
        send_one(&mut client, VICTIM, 0, &format!("victim-{index}")).await;
    }
    let offset = send_one(&mut client, TOPIC, 0, "give-back").await;
    let before = offsets(broker.addr, VICTIM).await;
    assert_eq!(before, vec![2, 0, 0, 0]);

    let sidecar = sidecar_for(broker.addr).await;
    let mut through = RawClient::connect(sidecar.listeners[0]).await;
    for group in ["../../VictimTopic", "../VictimTopic", "x/../../VictimTopic"] {
        for delay_level in [-1, 0] {
            let straight = client
                .call(send_back(offset, group, delay_level, None))
                .await;
            assert_refused(&straight, ResponseCode::INVALID_PARAMETER, ILLEGAL);
            let relayed = through
                .call(send_back(offset, group, delay_level, Some("broker-a")))
                .await;
            assert_refused(&relayed, ResponseCode::INVALID_PARAMETER, ILLEGAL);
        }
    }
    assert_eq!(offsets(broker.addr, VICTIM).await, before);
    sidecar.shutdown().await;
    broker.stop().await;

    let broker = start_named(dir.path()).await;
    assert_eq!(
        offsets(broker.addr, VICTIM).await,
        before,
        "after a restart"
    );
    let queues = tree(&dir.path().join("consumequeue"));
    assert!(queues.iter().all(|path| !path.contains("..")), "{queues:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_with_traversal_nul_or_overlong_groups_leave_topics_json_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start_named(dir.path()).await;
    let sidecar = sidecar_for(broker.addr).await;
    let mut client = RawClient::connect(broker.addr).await;
    let mut through = RawClient::connect(sidecar.listeners[0]).await;
    let offset = send_one(&mut client, TOPIC, 0, "give-back").await;
    // A good heartbeat first, so topics.json exists and holds its retry topic.
    assert_eq!(client.call(heartbeat("good_group")).await.code, 0);
    broker.state.metadata.persist().expect("persist");
    let before = topics_json(dir.path());
    assert!(before.contains("%RETRY%good_group"), "{before}");

    let long = "g".repeat(300);
    let cases: [(&str, &str); 4] = [
        ("../x", ILLEGAL),
        ("../../VictimTopic", ILLEGAL),
        ("bad\0group", ILLEGAL),
        (&long, "300 characters long, longer than the maximum of 120"),
    ];
    for (group, remark) in cases {
        for connection in [&mut client, &mut through] {
            let answer = connection.call(heartbeat(group)).await;
            assert_refused(&answer, ResponseCode::INVALID_PARAMETER, remark);
            for delay_level in [-1, 0] {
                let answer = connection
                    .call(send_back(offset, group, delay_level, Some("broker-a")))
                    .await;
                assert_refused(&answer, ResponseCode::INVALID_PARAMETER, remark);
            }
        }
    }
    broker.state.metadata.persist().expect("persist");
    assert_eq!(topics_json(dir.path()), before);
    let groups = std::fs::read_to_string(dir.path().join("config").join("subscriptionGroup.json"))
        .unwrap_or_default();
    assert!(
        !groups.contains("..") && !groups.contains(&long),
        "{groups}"
    );
    sidecar.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_send_to_the_schedule_topic_or_other_system_topics() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data = parent.path().join("data");
    let broker = start_named(&data).await;
    let sidecar = sidecar_for(broker.addr).await;
    let mut client = RawClient::connect(broker.addr).await;
    let mut through = RawClient::connect(sidecar.listeners[0]).await;
    let escaped = escaping_group(&parent.path().join("escaped"));
    let due = schedule::now_ms() + 1_000;
    // A client's own REAL_TOPIC / REAL_QID, as the probe sent them.
    let planted = [
        format!("REAL_TOPIC\u{1}{escaped}\u{2}REAL_QID\u{1}0\u{2}TIMER_DELIVER_MS\u{1}{due}\u{2}"),
        format!("REAL_TOPIC\u{1}{TOPIC}\u{2}REAL_QID\u{1}-3\u{2}TIMER_DELIVER_MS\u{1}{due}\u{2}"),
        format!("REAL_TOPIC\u{1}TBW102\u{2}REAL_QID\u{1}0\u{2}TIMER_DELIVER_MS\u{1}{due}\u{2}"),
    ];
    for properties in &planted {
        for connection in [&mut client, &mut through] {
            let answer = connection
                .call(send_request(SCHEDULE_TOPIC, 0, properties, "planted"))
                .await;
            assert_refused(
                &answer,
                ResponseCode::NO_PERMISSION,
                "is reserved for the broker's own use",
            );
        }
    }
    for topic in [
        "RMQ_SYS_TRANS_HALF_TOPIC",
        "RMQ_SYS_TRANS_OP_HALF_TOPIC",
        "TBW102",
        "rmq_sys_REVIVE_LOG_DefaultCluster",
        "rmq_sys_POP_LOG",
    ] {
        for connection in [&mut client, &mut through] {
            let answer = connection.call(send_request(topic, 0, "", "x")).await;
            assert_refused(&answer, ResponseCode::NO_PERMISSION, "reserved");
        }
    }
    let answer = client.call(send_request("a/../b", 0, "", "x")).await;
    assert_refused(&answer, ResponseCode::INVALID_PARAMETER, ILLEGAL);
    assert_eq!(broker.state.scheduler.pending(), 0);
    assert_eq!(broker.state.store.queue_offsets(SCHEDULE_TOPIC, 0), (0, 0));
    sidecar.shutdown().await;
    broker.stop().await;
    assert!(
        tree(parent.path())
            .iter()
            .all(|path| path.starts_with("data"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_schedule_entries_with_bad_targets_are_skipped_after_a_restart() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data = parent.path().join("data");
    let config = BrokerConfig {
        data_dir: data.clone(),
        segment_size: 8 << 20,
        ..BrokerConfig::default()
    };
    // Entries an older broker accepted from clients, written straight into the store.
    {
        let store = MessageStore::open(config.store_config()).expect("store");
        let escaped = escaping_group(&parent.path().join("escaped"));
        for (topic, qid) in [
            (escaped.as_str(), "0"),
            (TOPIC, "-3"),
            ("TBW102", "0"),
            (TOPIC, "2"),
        ] {
            store
                .put(MessageRecord {
                    topic: SCHEDULE_TOPIC.into(),
                    body: format!("to {qid}").into(),
                    properties: Properties::from([
                        (property::REAL_TOPIC.to_owned(), topic.to_owned()),
                        (property::REAL_QID.to_owned(), qid.to_owned()),
                        (property::TIMER_DELIVER_MS.to_owned(), "1".to_owned()),
                    ]),
                    born_host: "127.0.0.1:1".parse().expect("addr"),
                    ..MessageRecord::default()
                })
                .expect("plant");
        }
        store.flush().expect("flush");
    }
    // The restart: the scheduler rebuilds its pending set from the schedule queue.
    let state = BrokerState::open(config.clone()).expect("open");
    assert_eq!(state.scheduler.pending(), 4);
    let delivered = state
        .scheduler
        .deliver_due(&state.store, schedule::now_ms())
        .expect("deliver");
    assert_eq!(delivered, 1, "only the good entry goes out");
    assert_eq!(state.store.queue_offsets(TOPIC, 2), (0, 1));
    assert_eq!(state.store.queue_offsets("TBW102", 0), (0, 0));
    state.scheduler.persist().expect("persist");
    drop(state);
    assert!(
        tree(parent.path())
            .iter()
            .all(|path| path.starts_with("data")),
        "{:?}",
        tree(parent.path())
    );
    let queues = tree(&data.join("consumequeue"));
    assert!(
        queues.iter().all(|path| !path.contains("-3")),
        "no queue -3: {queues:?}"
    );
    // The low-water mark moved past the bad entries: nothing is pending after another restart.
    let state = BrokerState::open(config).expect("reopen");
    assert_eq!(state.scheduler.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_pull_offsets_move_to_the_minimum_and_negative_invisible_times_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start_named(dir.path()).await;
    let mut client = RawClient::connect(broker.addr).await;
    send_one(&mut client, TOPIC, 0, "one").await;
    let pull = |queue_id: i32| {
        RemotingCommand::request(RequestCode::PULL_MESSAGE, 0).with_header(
            &PullMessageRequestHeader {
                consumer_group: "abuse_group".into(),
                topic: TOPIC.into(),
                queue_id,
                queue_offset: -5,
                max_msg_nums: 8,
                sys_flag: 0x4,
                subscription: Some("*".into()),
                ..Default::default()
            },
        )
    };
    for queue_id in [0, 1] {
        let answer = client.call(pull(queue_id)).await;
        assert_eq!(
            answer.code,
            ResponseCode::PULL_OFFSET_MOVED.0,
            "{:?}",
            answer.remark
        );
        assert_eq!(answer.ext("nextBeginOffset"), Some("0"));
        assert_eq!(answer.ext("minOffset"), Some("0"));
        assert!(answer.body.is_empty());
    }

    let pop = RemotingCommand::request(RequestCode::POP_MESSAGE, 0).with_header(
        &PopMessageRequestHeader {
            consumer_group: "abuse_group".into(),
            topic: TOPIC.into(),
            queue_id: -1,
            max_msg_nums: 1,
            invisible_time: -1,
            ..Default::default()
        },
    );
    assert_refused(
        &client.call(pop).await,
        ResponseCode::INVALID_PARAMETER,
        "invisibleTime -1 is negative",
    );
    let change = RemotingCommand::request(RequestCode::CHANGE_MESSAGE_INVISIBLETIME, 0)
        .with_header(&ChangeInvisibleTimeRequestHeader {
            consumer_group: "abuse_group".into(),
            topic: TOPIC.into(),
            queue_id: 0,
            extra_info: "0 1 1000 0 0 broker-a 0 0".into(),
            offset: 0,
            invisible_time: -1000,
            ..Default::default()
        });
    assert_refused(
        &client.call(change).await,
        ResponseCode::INVALID_PARAMETER,
        "invisibleTime -1000 is negative",
    );
    broker.stop().await;
}
