//! Broker identity without `bname`: every broker-addressed request code, sent with no `bname` to a
//! broker's own sidecar address, reaches that broker and gets the answer that broker gives
//! directly. Two bundled brokers hold different data, so an answer from the wrong one shows.
//! Topic-routed requests stay balanced; ordered sends and half messages keep their broker.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::RunningBroker;
use common::raw::RawClient;
use rocketmesh::proxy;
use rocketmesh::remoting::body::{
    ConsumerData, HeartbeatData, JsonBody, LockBatchRequestBody, LockBatchResponseBody,
    MessageQueue, TopicRouteData,
};
use rocketmesh::remoting::header::{
    ConsumerSendMsgBackRequestHeader, EndTransactionRequestHeader,
    GetConsumerListByGroupRequestHeader, GetMaxOffsetRequestHeader, GetMinOffsetRequestHeader,
    GetRouteInfoRequestHeader, LockBatchMqRequestHeader, PullMessageRequestHeader,
    QueryConsumerOffsetRequestHeader, QueryMessageRequestHeader, SearchOffsetRequestHeader,
    SendMessageRequestHeader, UpdateConsumerOffsetRequestHeader, ViewMessageRequestHeader,
};
use rocketmesh::remoting::message::{MessageRecord, OffsetMessageId};
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};

const TOPIC: &str = "IdentityTopic";
const GROUP: &str = "identity_group";

fn send_request(topic: &str, queue_id: i32, properties: String, sys_flag: i32) -> RemotingCommand {
    let header = SendMessageRequestHeader {
        producer_group: "identity_producer".into(),
        topic: topic.into(),
        default_topic: "TBW102".into(),
        default_topic_queue_nums: 4,
        queue_id,
        sys_flag,
        born_timestamp: rocketmesh::broker::schedule::now_ms(),
        properties: Some(properties),
        ..Default::default()
    };
    RemotingCommand::request(RequestCode::SEND_MESSAGE, 0).with_header(&header)
}

/// Sends `count` messages straight to a broker's queue 0, keyed `key`; returns their offset ids.
async fn seed(broker: SocketAddr, key: &str, count: usize) -> Vec<OffsetMessageId> {
    let mut client = RawClient::connect(broker).await;
    let mut ids = Vec::new();
    for index in 0..count {
        let request = send_request(TOPIC, 0, format!("KEYS\u{1}{key}\u{2}"), 0)
            .with_body(format!("{key}-{index}"));
        let response = client.call(request).await;
        assert_eq!(response.code, 0, "seed send: {:?}", response.remark);
        let id = response
            .ext("msgId")
            .and_then(|id| id.parse::<OffsetMessageId>().ok())
            .expect("an offset message id");
        ids.push(id);
    }
    ids
}

/// What identifies an answer: code, header fields and body (the opaque differs by connection).
fn fingerprint(response: &RemotingCommand) -> (i32, BTreeMap<String, String>, Vec<u8>) {
    let fields = response
        .ext_fields
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    (response.code, fields, response.body.to_vec())
}

fn bodies(response: &RemotingCommand) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut rest = response.body.clone();
    while !rest.is_empty() {
        let Ok((record, used)) = MessageRecord::decode(&rest, true) else {
            break;
        };
        bodies.push(String::from_utf8_lossy(&record.body).into_owned());
        rest = rest.slice(used..);
    }
    bodies
}

struct Mesh {
    a: RunningBroker,
    b: RunningBroker,
    sidecar: proxy::RunningSidecar,
    /// broker name → its sidecar address
    through: BTreeMap<String, SocketAddr>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn mesh() -> Mesh {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = RunningBroker::start_with(dir_a.path(), |config| {
        config.broker_name = "broker-a".into();
    })
    .await;
    let b = RunningBroker::start_with(dir_b.path(), |config| {
        config.broker_name = "broker-b".into();
    })
    .await;
    let sidecar = proxy::start(common::sidecar_config(
        &[("broker-a", a.addr), ("broker-b", b.addr)],
        common::ORDERED_THEN_ALL,
    ))
    .await
    .expect("sidecar");
    let through = sidecar
        .proxy
        .broker_listeners
        .listening()
        .into_iter()
        .map(|listener| (listener.broker_name, listener.local))
        .collect();
    Mesh {
        a,
        b,
        sidecar,
        through,
        _dirs: (dir_a, dir_b),
    }
}

impl Mesh {
    fn direct(&self, broker: &str) -> SocketAddr {
        match broker {
            "broker-a" => self.a.addr,
            _ => self.b.addr,
        }
    }

    fn main(&self) -> SocketAddr {
        self.sidecar.listeners[0]
    }

    /// The answer through `broker`'s sidecar address, checked against the broker's own answer.
    async fn same_as_direct(&self, broker: &str, request: &RemotingCommand) -> RemotingCommand {
        let mut through = RawClient::connect(self.through[broker]).await;
        let mut direct = RawClient::connect(self.direct(broker)).await;
        let mesh_answer = through.call(request.clone()).await;
        let direct_answer = direct.call(request.clone()).await;
        assert_eq!(
            fingerprint(&mesh_answer),
            fingerprint(&direct_answer),
            "{} without bname at {broker}'s sidecar address must be answered by {broker}",
            request.code_name().unwrap_or("request")
        );
        mesh_answer
    }

    /// Checks `request` at both sidecar addresses and that the two brokers answer differently, so
    /// the check can tell a misrouted request.
    async fn routed_by_address(
        &self,
        request: RemotingCommand,
    ) -> (RemotingCommand, RemotingCommand) {
        let a = self.same_as_direct("broker-a", &request).await;
        let b = self.same_as_direct("broker-b", &request).await;
        assert_ne!(
            fingerprint(&a),
            fingerprint(&b),
            "{}: the brokers' answers must differ for this check to mean anything",
            request.code_name().unwrap_or("request")
        );
        println!(
            "{:<28} broker-a: code {} {:?}; broker-b: code {} {:?}",
            request.code_name().unwrap_or("?"),
            a.code,
            summary(&a),
            b.code,
            summary(&b)
        );
        (a, b)
    }

    async fn stop(self) {
        self.sidecar.shutdown().await;
        self.a.stop().await;
        self.b.stop().await;
    }
}

fn summary(response: &RemotingCommand) -> String {
    if let Some(offset) = response.ext("offset") {
        return format!("offset {offset}");
    }
    let records = bodies(response);
    if !records.is_empty() {
        return format!("{} records {:?}", records.len(), records.first());
    }
    response.remark.clone().unwrap_or_default()
}

fn max_offset(topic: &str, queue_id: i32) -> RemotingCommand {
    RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 0).with_header(
        &GetMaxOffsetRequestHeader {
            topic: topic.into(),
            queue_id,
            ..Default::default()
        },
    )
}

async fn offset_at(address: SocketAddr, request: RemotingCommand) -> i64 {
    let answer = RawClient::connect(address).await.call(request).await;
    answer
        .ext("offset")
        .and_then(|offset| offset.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_addressed_codes_without_bname_reach_the_broker_they_address() {
    let mesh = mesh().await;
    assert_eq!(mesh.through.len(), 2, "one sidecar address per broker name");

    // Route data names each broker at its own sidecar address.
    let mut main = RawClient::connect(mesh.main()).await;
    let route = main
        .call(
            RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(
                &GetRouteInfoRequestHeader {
                    topic: TOPIC.into(),
                    ..Default::default()
                },
            ),
        )
        .await;
    let route = TopicRouteData::from_json(&route.body).expect("route data");
    for broker in &route.broker_datas {
        let advertised = broker.broker_addrs.get(&0).expect("a master address");
        assert_eq!(
            advertised,
            &mesh.through[&broker.broker_name].to_string(),
            "route data gives {} its own sidecar address",
            broker.broker_name
        );
        assert_ne!(advertised, &mesh.main().to_string());
    }

    // Different data on each broker: 5 messages on broker-a, 3 on broker-b.
    let on_a = seed(mesh.a.addr, "key-a", 5).await;
    let on_b = seed(mesh.b.addr, "key-b", 3).await;
    let beyond_b = on_a.last().expect("seeded").commit_log_offset;
    assert!(beyond_b > on_b.last().expect("seeded").commit_log_offset);

    mesh.routed_by_address(max_offset(TOPIC, 0)).await;
    mesh.same_as_direct(
        "broker-a",
        &RemotingCommand::request(RequestCode::GET_MIN_OFFSET, 0).with_header(
            &GetMinOffsetRequestHeader {
                topic: TOPIC.into(),
                queue_id: 0,
                ..Default::default()
            },
        ),
    )
    .await;
    mesh.routed_by_address(
        RemotingCommand::request(RequestCode::SEARCH_OFFSET_BY_TIMESTAMP, 0).with_header(
            &SearchOffsetRequestHeader {
                topic: TOPIC.into(),
                queue_id: 0,
                timestamp: rocketmesh::broker::schedule::now_ms() + 3_600_000,
                ..Default::default()
            },
        ),
    )
    .await;
    let mut earliest = RemotingCommand::request(RequestCode::GET_EARLIEST_MSG_STORETIME, 0);
    earliest.ext_fields.insert("topic".into(), TOPIC.into());
    earliest.ext_fields.insert("queueId".into(), "0".into());
    mesh.same_as_direct("broker-a", &earliest).await;
    mesh.same_as_direct("broker-b", &earliest).await;

    for code in [RequestCode::PULL_MESSAGE, RequestCode::LITE_PULL_MESSAGE] {
        let pull = RemotingCommand::request(code, 0).with_header(&PullMessageRequestHeader {
            consumer_group: GROUP.into(),
            topic: TOPIC.into(),
            queue_id: 0,
            queue_offset: 0,
            max_msg_nums: 32,
            // The subscription travels with the request (no heartbeat registered it).
            sys_flag: 4,
            subscription: Some("*".into()),
            expression_type: Some("TAG".into()),
            ..Default::default()
        });
        let (a, b) = mesh.routed_by_address(pull).await;
        assert_eq!(bodies(&a).len(), 5);
        assert!(bodies(&b).iter().all(|body| body.starts_with("key-b")));
    }

    // Offsets committed through each address land on that broker only.
    for (broker, committed) in [("broker-a", 2), ("broker-b", 1)] {
        let update = RemotingCommand::request(RequestCode::UPDATE_CONSUMER_OFFSET, 0).with_header(
            &UpdateConsumerOffsetRequestHeader {
                consumer_group: GROUP.into(),
                topic: TOPIC.into(),
                queue_id: 0,
                commit_offset: committed,
                ..Default::default()
            },
        );
        let answer = RawClient::connect(mesh.through[broker])
            .await
            .call(update)
            .await;
        assert_eq!(answer.code, 0, "{:?}", answer.remark);
    }
    let query = RemotingCommand::request(RequestCode::QUERY_CONSUMER_OFFSET, 0).with_header(
        &QueryConsumerOffsetRequestHeader {
            consumer_group: GROUP.into(),
            topic: TOPIC.into(),
            queue_id: 0,
            ..Default::default()
        },
    );
    let (a, b) = mesh.routed_by_address(query).await;
    assert_eq!((a.ext("offset"), b.ext("offset")), (Some("2"), Some("1")));

    // A lock taken through broker-a's address holds on broker-a.
    let lock_body = |client_id: &str| {
        LockBatchRequestBody {
            client_id: client_id.into(),
            consumer_group: GROUP.into(),
            mq_set: vec![MessageQueue {
                broker_name: "broker-a".into(),
                queue_id: 1,
                topic: TOPIC.into(),
            }],
            only_this_broker: false,
        }
        .to_json()
        .expect("lock body")
    };
    let lock = |code, client_id: &str| {
        RemotingCommand::request(code, 0)
            .with_header(&LockBatchMqRequestHeader::default())
            .with_body(lock_body(client_id))
    };
    let locked_count = |answer: &RemotingCommand| {
        LockBatchResponseBody::from_json(&answer.body)
            .map(|body| body.lock_ok_mq_set.len())
            .unwrap_or(0)
    };
    let mut through_a = RawClient::connect(mesh.through["broker-a"]).await;
    let mut direct_a = RawClient::connect(mesh.a.addr).await;
    let mine = through_a
        .call(lock(RequestCode::LOCK_BATCH_MQ, "client-1"))
        .await;
    assert_eq!(locked_count(&mine), 1, "the lock is granted");
    let theirs = direct_a
        .call(lock(RequestCode::LOCK_BATCH_MQ, "client-2"))
        .await;
    assert_eq!(
        locked_count(&theirs),
        0,
        "broker-a holds the sidecar client's lock"
    );
    let unlocked = through_a
        .call(lock(RequestCode::UNLOCK_BATCH_MQ, "client-1"))
        .await;
    assert_eq!(unlocked.code, 0);
    let theirs = direct_a
        .call(lock(RequestCode::LOCK_BATCH_MQ, "client-2"))
        .await;
    assert_eq!(locked_count(&theirs), 1, "the unlock reached broker-a");
    println!("LOCK_BATCH_MQ / UNLOCK_BATCH_MQ through broker-a's address held on broker-a");

    // Commit-log offsets are per broker: this one exists on broker-a only.
    let view = RemotingCommand::request(RequestCode::VIEW_MESSAGE_BY_ID, 0).with_header(
        &ViewMessageRequestHeader {
            topic: Some(TOPIC.into()),
            offset: beyond_b as i64,
            ..Default::default()
        },
    );
    let (a, _) = mesh.routed_by_address(view.clone()).await;
    assert_eq!(bodies(&a), vec!["key-a-4".to_owned()]);
    // At the main address with no bname, an offset only broker-a has is found there...
    let found = main.call(view).await;
    assert_eq!(bodies(&found), vec!["key-a-4".to_owned()]);
    // ...and one both brokers have is refused rather than answered with either message.
    let ambiguous = main
        .call(
            RemotingCommand::request(RequestCode::VIEW_MESSAGE_BY_ID, 0).with_header(
                &ViewMessageRequestHeader {
                    topic: Some(TOPIC.into()),
                    offset: on_a[0].commit_log_offset as i64,
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(ambiguous.code, ResponseCode::SYSTEM_ERROR.0);
    println!(
        "VIEW_MESSAGE_BY_ID at the main address: {:?}",
        ambiguous.remark
    );

    let by_key = |key: &str| {
        RemotingCommand::request(RequestCode::QUERY_MESSAGE, 0).with_header(
            &QueryMessageRequestHeader {
                topic: TOPIC.into(),
                key: key.into(),
                max_num: 32,
                begin_timestamp: 0,
                end_timestamp: i64::MAX,
                ..Default::default()
            },
        )
    };
    let (a, _) = mesh.routed_by_address(by_key("key-a")).await;
    assert_eq!(bodies(&a).len(), 5);

    let send_back = RemotingCommand::request(RequestCode::CONSUMER_SEND_MSG_BACK, 0).with_header(
        &ConsumerSendMsgBackRequestHeader {
            offset: beyond_b as i64,
            group: GROUP.into(),
            delay_level: 3,
            origin_topic: Some(TOPIC.into()),
            max_reconsume_times: Some(16),
            ..Default::default()
        },
    );
    let (a, _) = mesh.routed_by_address(send_back).await;
    assert_eq!(a.code, 0, "{:?}", a.remark);

    // A half message sent to broker-b's address stays on broker-b, and an END_TRANSACTION that
    // names it by neither bname nor an offset id commits it there.
    let mut through_b = RawClient::connect(mesh.through["broker-b"]).await;
    for _ in 0..8 {
        let half = send_request(
            "TxTopic",
            0,
            "TRAN_MSG\u{1}true\u{2}PGROUP\u{1}tx_group\u{2}".into(),
            4,
        )
        .with_body("half");
        let sent = through_b.call(half).await;
        assert_eq!(sent.code, 0, "{:?}", sent.remark);
        let id: OffsetMessageId = sent
            .ext("msgId")
            .and_then(|id| id.parse().ok())
            .expect("offset id");
        assert_eq!(
            id.store_host, mesh.b.addr,
            "the half message is on broker-b"
        );
        let end = RemotingCommand::request(RequestCode::END_TRANSACTION, 0).with_header(
            &EndTransactionRequestHeader {
                producer_group: "tx_group".into(),
                tran_state_table_offset: sent
                    .ext("queueOffset")
                    .and_then(|offset| offset.parse().ok())
                    .unwrap_or_default(),
                commit_log_offset: id.commit_log_offset as i64,
                commit_or_rollback: 8,
                msg_id: "no-offset-id-here".into(),
                ..Default::default()
            },
        );
        let ended = through_b.call(end).await;
        assert_eq!(ended.code, 0, "{:?}", ended.remark);
    }
    assert_eq!(offset_at(mesh.b.addr, max_offset("TxTopic", 0)).await, 8);
    assert_eq!(offset_at(mesh.a.addr, max_offset("TxTopic", 0)).await, 0);
    println!(
        "8 half messages through broker-b's address stayed there; END_TRANSACTION without bname committed all 8 on broker-b"
    );

    // Ordered route: broker and queue kept; plain sends are still balanced over both brokers.
    for _ in 0..20 {
        let sent = through_b
            .call(send_request("OrderedTopic", 2, String::new(), 0).with_body("o"))
            .await;
        assert_eq!((sent.code, sent.ext("queueId")), (0, Some("2")));
    }
    assert_eq!(
        offset_at(mesh.b.addr, max_offset("OrderedTopic", 2)).await,
        20
    );
    for _ in 0..40 {
        let sent = through_b
            .call(send_request("BalancedTopic", 0, String::new(), 0).with_body("x"))
            .await;
        assert_eq!(sent.code, 0);
    }
    let mut on_each = Vec::new();
    for broker in [mesh.a.addr, mesh.b.addr] {
        let mut total = 0;
        for queue in 0..4 {
            total += offset_at(broker, max_offset("BalancedTopic", queue)).await;
        }
        on_each.push(total);
    }
    println!(
        "ordered sends to broker-b's address: 20 of 20 on broker-b queue 2; plain sends there balanced {on_each:?}"
    );
    assert_eq!(on_each.iter().sum::<i64>(), 40);
    assert!(on_each.iter().all(|count| *count > 0), "{on_each:?}");

    // A heartbeat at broker-a's address registers with broker-a only.
    let heartbeat = HeartbeatData {
        client_id: "127.0.0.1@identity".into(),
        consumer_data_set: vec![ConsumerData {
            group_name: "heartbeat_group".into(),
            consume_type: "CONSUME_PASSIVELY".into(),
            message_model: "CLUSTERING".into(),
            consume_from_where: "CONSUME_FROM_FIRST_OFFSET".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let answer = through_a
        .call(
            RemotingCommand::request(RequestCode::HEART_BEAT, 0)
                .with_body(heartbeat.to_json().expect("heartbeat")),
        )
        .await;
    assert_eq!(answer.code, 0);
    // Broker-a's registration is awaited; broker-b is watched as long, and must never get one.
    let registered = |address: SocketAddr| async move {
        let mut client = RawClient::connect(address).await;
        let list = RemotingCommand::request(RequestCode::GET_CONSUMER_LIST_BY_GROUP, 0)
            .with_header(&GetConsumerListByGroupRequestHeader {
                consumer_group: "heartbeat_group".into(),
                ..Default::default()
            });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if client.call(list.clone()).await.code == 0 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    };
    let (on_a, on_b) = tokio::join!(registered(mesh.a.addr), registered(mesh.b.addr));
    assert!(on_a, "broker-a got the heartbeat sent to its address");
    assert!(!on_b, "broker-b did not");
    println!("HEART_BEAT at broker-a's address registered with broker-a only");

    mesh.stop().await;
}
