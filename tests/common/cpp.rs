//! The Apache RocketMQ C++ client 2.x (PyPI `rocketmq==0.4.4`, which bundles `librocketmq`),
//! driven by `tests/cpp/client.py`. The binding is installed on first use into a virtual
//! environment under the build directory (`target/tmp/cpp-client-0.4.4`). Also the scenarios that
//! more than one test binary runs with it (straight to a broker, through a sidecar, through `up`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rocketmesh::remoting::body::{ConsumerList, JsonBody};
use rocketmesh::remoting::header::{GetConsumerListByGroupRequestHeader, PullMessageRequestHeader};
use rocketmesh::remoting::message::MessageRecord;
use rocketmesh::remoting::{RemotingCommand, RequestCode};
use serde_json::Value;

use super::raw::RawClient;

const PACKAGE: &str = "rocketmq==0.4.4";

/// The virtual environment's python, installing the binding the first time.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv = root.join("cpp-client-0.4.4");
        let python = venv.join("bin").join("python");
        if python.exists() {
            return python;
        }
        // Built beside, then renamed into place: a half-made environment is never used.
        let building = root.join(format!("cpp-client-building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&building)
            .status()
            .expect("python3 is needed for the C++ client tests");
        assert!(status.success(), "python3 -m venv failed");
        let status = Command::new(building.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", PACKAGE])
            .status()
            .expect("pip");
        assert!(status.success(), "pip install {PACKAGE} failed");
        if std::fs::rename(&building, &venv).is_err() {
            // Another test process finished first; its environment is as good.
            let _ = std::fs::remove_dir_all(&building);
        }
        python
    })
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cpp/client.py")
}

/// The longest any one client run may take before it is killed.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Messages the producer of [`produce_and_consume`] sends with each mode.
pub const PER_MODE: usize = 100;

/// Runs `client.py` with `args` (blocking; killed after [`RUN_LIMIT`]) and returns its JSON line.
pub fn run_client(home: &Path, args: &[String]) -> Value {
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
        "the C++ client ({args:?}) failed: {value}\nits log's warnings and errors:\n{}",
        log_complaints(home)
    );
    println!("the C++ client ({args:?}): {value}");
    value
}

/// The last warnings and errors the C++ client wrote under `$HOME/logs`: a failed send says only
/// "No route info of this topic" whatever went wrong, and the log tells what did.
fn log_complaints(home: &Path) -> String {
    const KEEP: usize = 60;
    let mut files = vec![home.join("logs")];
    let mut lines = Vec::new();
    while let Some(path) = files.pop() {
        if let Ok(entries) = std::fs::read_dir(&path) {
            files.extend(entries.flatten().map(|entry| entry.path()));
        } else if let Ok(bytes) = std::fs::read(&path) {
            let text = String::from_utf8_lossy(&bytes);
            lines.extend(
                text.lines()
                    .filter(|line| line.contains("](error)") || line.contains("](warning)"))
                    .map(str::to_owned),
            );
        }
    }
    lines.sort();
    let start = lines.len().saturating_sub(KEEP);
    lines[start..].join("\n")
}

pub fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

pub async fn client(home: &Path, parts: Vec<String>) -> Value {
    let home = home.to_owned();
    tokio::task::spawn_blocking(move || run_client(&home, &parts))
        .await
        .expect("join")
}

/// The members of `group` that `namesrv` knows (the sidecar answers from its own registry).
pub async fn members(namesrv: SocketAddr, group: &str) -> usize {
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
pub async fn produce_and_consume(home: &Path, namesrv: SocketAddr, topic: &str, label: &str) {
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

/// Which (broker, queue) holds the messages of each key, read from each broker directly.
pub async fn placements(
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
pub async fn orderly_round(
    home: &Path,
    namesrv: SocketAddr,
    brokers: &[(&str, SocketAddr)],
    topic: &str,
    keys: usize,
    per_key: usize,
) -> BTreeMap<usize, (String, i32)> {
    // Ordered topics are created before use, as RocketMQ recommends, so no send creates one.
    for (_, broker) in brokers {
        super::create_topic(*broker, topic, 4).await;
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
        "{topic}: C++ send_orderly {total} ({keys} keys x {per_key}, {} retried by the test to the same queue); key -> broker/queue {map:?}; orderly consumer: {deliveries} deliveries, {out_of_order} out of send order",
        sent["retried"]
    );
    assert_eq!(deliveries, keys * per_key);
    assert_eq!(out_of_order, 0, "each key's messages arrive in send order");
    assert!(next.values().all(|count| *count == per_key));
    map
}
