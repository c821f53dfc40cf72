//! Replays every committed fuzz corpus through the same entry points the fuzz targets use, so a
//! crash once found by fuzzing stays fixed in an ordinary `cargo test`.
//!
//! `ROCKETMESH_WRITE_SEEDS=1 cargo test --test fuzz_corpus -- --ignored` rewrites the seed inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use rocketmesh::remoting::body::{BrokerData, HeartbeatData, JsonBody, QueueData, TopicRouteData};
use rocketmesh::remoting::fuzzing::TARGETS;
use rocketmesh::remoting::header::SendMessageRequestHeaderV2;
use rocketmesh::remoting::message::{BatchEntry, MessageRecord, Properties, encode_batch};
use rocketmesh::remoting::{
    RemotingCodec, RemotingCommand, RequestCode, ResponseCode, SerializeType,
};
use tokio_util::codec::Encoder;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

#[test]
fn replay_fuzz_corpora() {
    for (name, target) in TARGETS {
        let dir = corpus_root().join(name);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        let mut count = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            target(&data);
            count += 1;
        }
        assert!(count > 0, "corpus {name} is empty");
        println!("{name}: replayed {count} inputs");
    }
}

fn frame(command: &RemotingCommand) -> Vec<u8> {
    let mut out = BytesMut::new();
    RemotingCodec::default()
        .encode(command, &mut out)
        .expect("encode");
    out.to_vec()
}

fn send_request(serialize_type: SerializeType) -> RemotingCommand {
    let header = SendMessageRequestHeaderV2 {
        producer_group: "group".into(),
        topic: "TopicTest".into(),
        default_topic: "TBW102".into(),
        default_topic_queue_nums: 4,
        queue_id: 1,
        born_timestamp: 1_700_000_000_000,
        properties: Some("TAGS\u{1}TagA\u{2}KEYS\u{1}k1\u{2}WAIT\u{1}true\u{2}".into()),
        ..Default::default()
    };
    let mut command = RemotingCommand::request(RequestCode::SEND_MESSAGE_V2, 42)
        .with_header(&header)
        .with_body(&b"hello rocketmesh"[..]);
    command.serialize_type = serialize_type;
    command
}

fn record(v2: bool, ipv6: bool) -> Vec<u8> {
    let host = if ipv6 {
        "[::1]:10911"
    } else {
        "127.0.0.1:10911"
    };
    let record = MessageRecord {
        v2,
        topic: "TopicTest".into(),
        body: Bytes::from_static(b"payload"),
        born_host: host.parse().expect("addr"),
        store_host: host.parse().expect("addr"),
        properties: Properties::from([("TAGS".to_owned(), "TagA".to_owned())]),
        queue_offset: 7,
        physical_offset: 1024,
        ..MessageRecord::default()
    };
    let mut out = BytesMut::new();
    record.encode(&mut out).expect("encode");
    out.to_vec()
}

#[test]
#[ignore = "writes the seed corpora; run with ROCKETMESH_WRITE_SEEDS=1"]
fn write_seed_corpora() {
    if std::env::var("ROCKETMESH_WRITE_SEEDS").as_deref() != Ok("1") {
        return;
    }
    let mut seeds: BTreeMap<&str, Vec<(&str, Vec<u8>)>> = BTreeMap::new();
    let json_send = send_request(SerializeType::Json);
    let binary_send = send_request(SerializeType::Binary);
    let pop = RemotingCommand::response_to(&json_send, ResponseCode::SUCCESS)
        .with_body(Bytes::from(record(false, false)));
    let mut frames = frame(&json_send);
    frames.extend(frame(&binary_send));
    frames.extend(frame(&pop));
    seeds
        .entry("frame")
        .or_default()
        .push(("json-binary-response", frames));
    for capture in ["rust-client-producer.bin", "rust-client-push-consumer.bin"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(capture);
        if let Ok(bytes) = std::fs::read(path) {
            seeds.entry("frame").or_default().push((capture, bytes));
        }
    }
    let json_frame = frame(&json_send);
    let header_len =
        u32::from_be_bytes([json_frame[4], json_frame[5], json_frame[6], json_frame[7]]) as usize
            & 0xFF_FFFF;
    seeds
        .entry("json_header")
        .or_default()
        .push(("send-v2", json_frame[8..8 + header_len].to_vec()));
    seeds.entry("json_header").or_default().push((
        "lenient",
        br#"{"code":"310","extFields":{"d":4,"k":false,"x":null},"language":12,"opaque":5,"remark":""}"#.to_vec(),
    ));
    let binary_frame = frame(&binary_send);
    let header_len = u32::from_be_bytes([
        binary_frame[4],
        binary_frame[5],
        binary_frame[6],
        binary_frame[7],
    ]) as usize
        & 0xFF_FFFF;
    seeds
        .entry("binary_header")
        .or_default()
        .push(("send-v2", binary_frame[8..8 + header_len].to_vec()));
    seeds
        .entry("message_record")
        .or_default()
        .push(("v1-ipv4", record(false, false)));
    seeds
        .entry("message_record")
        .or_default()
        .push(("v2-ipv6", record(true, true)));
    let mut batch = BytesMut::new();
    let entries = vec![
        BatchEntry {
            flag: 0,
            body: Bytes::from_static(b"one"),
            properties: Properties::from([(
                "UNIQ_KEY".to_owned(),
                "7F0000010001000000000000000A0001".to_owned(),
            )]),
        },
        BatchEntry::default(),
    ];
    encode_batch(&entries, &mut batch).expect("batch");
    seeds
        .entry("batch_body")
        .or_default()
        .push(("two", batch.to_vec()));
    let route = TopicRouteData {
        broker_datas: vec![BrokerData {
            broker_addrs: BTreeMap::from([(0, "127.0.0.1:10911".to_owned())]),
            broker_name: "broker-a".into(),
            cluster: "DefaultCluster".into(),
            ..Default::default()
        }],
        queue_datas: vec![QueueData {
            broker_name: "broker-a".into(),
            perm: 6,
            read_queue_nums: 4,
            write_queue_nums: 4,
            topic_sys_flag: 0,
        }],
        ..Default::default()
    };
    seeds
        .entry("json_body")
        .or_default()
        .push(("route", route.to_json().expect("json")));
    seeds
        .entry("json_body")
        .or_default()
        .push(("route-fastjson", route.to_fastjson().expect("json")));
    let heartbeat = br#"{"clientID":"127.0.0.1@1#2","consumerDataSet":[{"consumeFromWhere":"CONSUME_FROM_LAST_OFFSET","consumeType":"CONSUME_PASSIVELY","groupName":"g","messageModel":"CLUSTERING","subscriptionDataSet":[{"classFilterMode":false,"codeSet":[],"expressionType":"TAG","subString":"*","subVersion":1,"tagsSet":[],"topic":"T"}],"unitMode":false}],"heartbeatFingerprint":0,"producerDataSet":[{"groupName":"CLIENT_INNER_PRODUCER"}],"withoutSub":false}"#;
    assert!(HeartbeatData::from_json(heartbeat).is_ok());
    seeds
        .entry("json_body")
        .or_default()
        .push(("heartbeat", heartbeat.to_vec()));
    seeds.entry("json_body").or_default().push((
        "cluster-fastjson",
        br#"{"brokerAddrTable":{"broker-a":{"brokerAddrs":{0:"127.0.0.1:10911"},"brokerName":"broker-a","cluster":"c"}},"clusterAddrTable":{"c":["broker-a"]}}"#.to_vec(),
    ));
    seeds.entry("extra_info").or_default().push((
        "handle",
        b"100 1700000000000 60000 3 0 broker-a 2 105".to_vec(),
    ));
    seeds.entry("extra_info").or_default().push((
        "proxy-handle",
        b"0 1700000000000 30000 999 1 b 0 5 4096".to_vec(),
    ));
    seeds
        .entry("extra_info")
        .or_default()
        .push(("offset-info", b"0 0 10,11,12;1 3 4".to_vec()));
    seeds
        .entry("extra_info")
        .or_default()
        .push(("order-info", b"0 qo2%15 3;0 1 0".to_vec()));

    for (name, _) in TARGETS {
        assert!(seeds.contains_key(name), "no seed for {name}");
    }
    for (target, inputs) in seeds {
        let dir = corpus_root().join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in inputs {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        }
    }
}
