//! Pull→POP through the sidecar with real, unmodified clients as separate processes: the
//! rocketmq-client-rust push and lite pull consumers (this test binary, re-run as a child) and the
//! Apache C++ push consumer (`tests/cpp/client.py stream`). Two bundled brokers serve POP; every
//! consumer pulls. Each child prints one line per delivery, so the test sees every message,
//! duplicate and `reconsumeTimes` as it happens, and can SIGSTOP, SIGCONT or SIGKILL a consumer
//! mid-stream.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RunningBroker, STEP_TIMEOUT, client_config, harness};
use rocketmesh::proxy::{self, RunningSidecar, SidecarConfig};
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, ConsumeOrderlyStatus,
    DefaultLitePullConsumerBuilder, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Set in a child process: which consumer to run, as
/// `kind|namesrv|group|topic|instance|fail|max_reconsume_times`.
const CHILD: &str = "ROCKETMESH_PTP_CHILD";

// ---------------------------------------------------------------------------------------------
// The child side: a real client that prints every delivery.

/// Runs only in a child process (the parent tests start it with [`CHILD`] set).
#[test]
fn consumer_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<String> = spec.split('|').map(str::to_owned).collect();
    let [kind, namesrv, group, topic, instance, fail, max_reconsume] = parts.as_slice() else {
        panic!("bad {CHILD}: {spec}");
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run_child(
        kind,
        namesrv.parse().expect("namesrv address"),
        group,
        topic,
        instance,
        fail,
        max_reconsume.parse().unwrap_or(-1),
    ));
}

fn print_delivery(message: &MessageExt) {
    let body = String::from_utf8_lossy(message.body().as_deref().unwrap_or_default()).into_owned();
    let mut out = std::io::stdout().lock();
    // The stored position tells a redelivery (same position) from a message stored twice.
    let _ = writeln!(
        out,
        "got {body} {} {}:{}",
        message.reconsume_times(),
        message.queue_id(),
        message.queue_offset()
    );
    let _ = out.flush();
}

/// Prints each delivery; bodies starting with `fail` are answered "reconsume later".
struct Printer {
    fail: String,
}

impl MessageListenerConcurrently for Printer {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut later = false;
        for message in msgs {
            print_delivery(message);
            let body = message.body().unwrap_or_default();
            later |= !self.fail.is_empty() && body.starts_with(self.fail.as_bytes());
        }
        Ok(if later {
            ConsumeConcurrentlyStatus::ReconsumeLater
        } else {
            ConsumeConcurrentlyStatus::ConsumeSuccess
        })
    }
}

/// Resolves when the parent closes the child's standard input.
fn stdin_closed() -> Arc<Notify> {
    let closed = Arc::new(Notify::new());
    let signal = closed.clone();
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
        signal.notify_one();
    });
    closed
}

fn announce_started() {
    let mut out = std::io::stdout().lock();
    // On a line of its own: the test harness may have printed "test consumer_process ... ".
    let _ = writeln!(out, "\nstarted");
    let _ = out.flush();
}

async fn run_child(
    kind: &str,
    namesrv: SocketAddr,
    group: &str,
    topic: &str,
    instance: &str,
    fail: &str,
    max_reconsume_times: i32,
) {
    let closed = stdin_closed();
    match kind {
        "lite" => {
            let consumer = DefaultLitePullConsumerBuilder::new(harness().runtime.clone())
                .name_server_addr(namesrv.to_string())
                .client_ip("127.0.0.1")
                .instance_name(instance)
                .consumer_group(group)
                .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
                .build()
                .expect("lite pull consumer");
            consumer.subscribe(topic).await.expect("subscribe");
            consumer.start().await.expect("lite pull consumer start");
            announce_started();
            let stop = closed.notified();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    messages = consumer.poll_with_timeout(500) => {
                        for message in &messages {
                            print_delivery(message);
                        }
                    }
                }
            }
            consumer.shutdown().await;
        }
        "push" | "broadcast" | "orderly" => {
            let model = if kind == "broadcast" {
                MessageModel::Broadcasting
            } else {
                MessageModel::Clustering
            };
            let mut builder = DefaultMQPushConsumer::builder(harness().runtime.clone())
                .client_config(client_config(namesrv, instance))
                .consumer_group(group)
                .message_model(model)
                .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset);
            if max_reconsume_times >= 0 {
                builder = builder.max_reconsume_times(max_reconsume_times);
            }
            let mut consumer = builder.build();
            consumer.subscribe(topic, "*").await.expect("subscribe");
            if kind == "orderly" {
                consumer.register_message_listener_orderly(
                    |msgs: &[&MessageExt], _context: &mut rocketmq_client_rust::ConsumeOrderlyContext| {
                        for message in msgs {
                            print_delivery(message);
                        }
                        Ok(ConsumeOrderlyStatus::Success)
                    },
                );
            } else {
                consumer.register_message_listener_concurrently(Printer {
                    fail: fail.to_owned(),
                });
            }
            tokio::time::timeout(STEP_TIMEOUT, consumer.start())
                .await
                .expect("in time")
                .expect("push consumer start");
            announce_started();
            closed.notified().await;
            consumer.shutdown().await;
        }
        other => panic!("unknown consumer kind {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The parent side.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RustPush,
    RustLite,
    CppPush,
    RustBroadcast,
    RustOrderly,
    CppBroadcast,
}

#[derive(Debug, Clone)]
struct Delivery {
    consumer: String,
    reconsume_times: i32,
    /// `queue:offset` as the client saw it.
    stored_at: String,
    at: Instant,
}

/// Every delivery any consumer printed, by body.
#[derive(Clone, Default)]
struct Deliveries {
    by_body: Arc<Mutex<BTreeMap<String, Vec<Delivery>>>>,
    arrived: Arc<Notify>,
}

impl Deliveries {
    fn record(&self, consumer: &str, body: &str, reconsume_times: i32, stored_at: &str) {
        self.by_body
            .lock()
            .expect("deliveries")
            .entry(body.to_owned())
            .or_default()
            .push(Delivery {
                consumer: consumer.to_owned(),
                reconsume_times,
                stored_at: stored_at.to_owned(),
                at: Instant::now(),
            });
        self.arrived.notify_one();
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<Delivery>> {
        self.by_body.lock().expect("deliveries").clone()
    }

    /// (missing, duplicate deliveries) of `expected`.
    fn tally(&self, expected: &[String]) -> (Vec<String>, usize) {
        let seen = self.by_body.lock().expect("deliveries");
        let missing = expected
            .iter()
            .filter(|body| !seen.contains_key(*body))
            .cloned()
            .collect();
        let duplicates = seen.values().map(|list| list.len().saturating_sub(1)).sum();
        (missing, duplicates)
    }

    /// Prints every delivery of each body delivered more than once.
    fn print_duplicates(&self, since: Instant) {
        for (body, list) in self.by_body.lock().expect("deliveries").iter() {
            if list.len() < 2 {
                continue;
            }
            let seen: Vec<String> = list
                .iter()
                .map(|delivery| {
                    format!(
                        "{} at {:.1?} (reconsume {}, stored at {})",
                        delivery.consumer,
                        delivery.at.saturating_duration_since(since),
                        delivery.reconsume_times,
                        delivery.stored_at
                    )
                })
                .collect();
            println!("duplicate {body}: {}", seen.join("; "));
        }
    }

    fn count_by(&self, consumer: &str) -> usize {
        self.by_body
            .lock()
            .expect("deliveries")
            .values()
            .flatten()
            .filter(|delivery| delivery.consumer == consumer)
            .count()
    }

    /// Waits until `done` holds of the deliveries, or panics after `limit` with `what`.
    async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<String, Vec<Delivery>>) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.by_body.lock().expect("deliveries")) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}: not within {limit:?}");
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(500)),
                self.arrived.notified(),
            )
            .await;
        }
    }

    /// Waits until every one of `expected` arrived.
    async fn wait_for_all(&self, expected: &[String], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (missing, _) = self.tally(expected);
            if missing.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {} messages never arrived within {limit:?}, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(5)]
            );
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(500)),
                self.arrived.notified(),
            )
            .await;
        }
    }
}

/// What one consumer process runs.
#[derive(Clone, Copy)]
struct Spec<'a> {
    kind: Kind,
    group: &'a str,
    topic: &'a str,
    name: &'a str,
    /// Bodies starting with this are answered "reconsume later" (empty: none).
    fail: &'a str,
    /// The client's max reconsume times (-1: its default).
    max_reconsume: i32,
}

/// One consumer process.
struct Consumer {
    name: String,
    child: Child,
}

impl Consumer {
    fn start(
        spec: &Spec<'_>,
        namesrv: SocketAddr,
        deliveries: &Deliveries,
        home: &std::path::Path,
    ) -> Self {
        let Spec {
            kind,
            group,
            topic,
            name,
            fail,
            max_reconsume,
        } = *spec;
        let mut command = match kind {
            Kind::CppPush | Kind::CppBroadcast => {
                let mut command = Command::new(common::cpp::python());
                command
                    .arg(common::cpp::script())
                    .args([
                        "stream",
                        "--namesrv",
                        &namesrv.to_string(),
                        "--topic",
                        topic,
                    ])
                    .args(["--group", group, "--instance", name, "--fail-prefix", fail])
                    // The C++ client writes its logs under $HOME/logs.
                    .env("HOME", home);
                if kind == Kind::CppBroadcast {
                    command.arg("--broadcasting");
                }
                command
            }
            _ => {
                let child_kind = match kind {
                    Kind::RustLite => "lite",
                    Kind::RustBroadcast => "broadcast",
                    Kind::RustOrderly => "orderly",
                    _ => "push",
                };
                let mut command = Command::new(std::env::current_exe().expect("the test binary"));
                command
                    .args(["consumer_process", "--exact", "--nocapture"])
                    .arg("--test-threads=1")
                    .env(
                        CHILD,
                        format!(
                            "{child_kind}|{namesrv}|{group}|{topic}|{name}|{fail}|{max_reconsume}"
                        ),
                    );
                command
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("PTP_CHILD_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start a consumer process");
        let stdout = child.stdout.take().expect("stdout");
        let (started, is_started) = std::sync::mpsc::channel();
        let (deliveries, consumer) = (deliveries.clone(), name.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "started" {
                    let _ = started.send(());
                } else if let Some(rest) = line.strip_prefix("got ") {
                    let mut fields = rest.split(' ');
                    let body = fields.next().unwrap_or_default();
                    let times = fields.next().and_then(|times| times.parse().ok());
                    let stored_at = fields.next().unwrap_or("?");
                    deliveries.record(&consumer, body, times.unwrap_or(-1), stored_at);
                }
            }
        });
        is_started
            .recv_timeout(STEP_TIMEOUT)
            .unwrap_or_else(|_| panic!("consumer {name} ({kind:?}) did not start"));
        Self {
            name: name.to_owned(),
            child,
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// Asks the consumer to shut down (it unregisters) and waits for it.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two POP-serving bundled brokers behind a converting sidecar with its admin endpoint.
struct Mesh {
    brokers: Vec<RunningBroker>,
    sidecar: RunningSidecar,
    addr: SocketAddr,
    admin: SocketAddr,
    data: tempfile::TempDir,
}

impl Mesh {
    async fn start(consume_yaml: &str) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let mut brokers = Vec::new();
        for name in ["broker-a", "broker-b"] {
            brokers.push(
                RunningBroker::start_with(&data.path().join(name), |config| {
                    config.broker_name = name.into();
                })
                .await,
            );
        }
        let endpoints: String = brokers
            .iter()
            .zip(["broker-a", "broker-b"])
            .map(|(broker, name)| {
                format!(
                    "      - {{ address: \"{}\", metadata: {{ broker_name: {name}, cluster_name: DefaultCluster }} }}\n",
                    broker.addr
                )
            })
            .collect();
        let yaml = format!(
            "listeners: [{{ address: \"127.0.0.1:0\" }}]\n\
             admin: {{ address: \"127.0.0.1:0\" }}\n\
             {consume_yaml}\n\
             routes:\n\
             \x20 - {{ match: {{ topic: {{ prefix: \"\" }} }}, route: {{ cluster: local }} }}\n\
             clusters:\n\
             \x20 - name: local\n\
             \x20   request_timeout_ms: 10000\n\
             \x20   endpoints:\n{endpoints}"
        );
        let config = SidecarConfig::parse(&yaml).expect("sidecar config");
        let sidecar = proxy::start(config).await.expect("sidecar starts");
        let addr = sidecar.listeners[0];
        let admin = sidecar.admin.expect("admin endpoint");
        Self {
            brokers,
            sidecar,
            addr,
            admin,
            data,
        }
    }

    fn home(&self) -> &std::path::Path {
        self.data.path()
    }

    async fn stop(self) {
        tokio::time::timeout(STEP_TIMEOUT, self.sidecar.shutdown())
            .await
            .expect("sidecar stops");
        for broker in self.brokers {
            broker.stop().await;
        }
    }

    async fn admin_json(&self, path: &str) -> serde_json::Value {
        let mut socket = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin connect");
        socket
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("admin request");
        let mut text = String::new();
        tokio::time::timeout(STEP_TIMEOUT, socket.read_to_string(&mut text))
            .await
            .expect("admin answers in time")
            .expect("admin read");
        let (_, body) = text.split_once("\r\n\r\n").expect("http response");
        serde_json::from_str(body).expect("admin json")
    }

    /// The group's mode in the admin view.
    async fn mode_of(&self, group: &str) -> String {
        let view = self.admin_json("/consumers").await;
        view["groups"][group]["mode"]
            .as_str()
            .unwrap_or("none")
            .to_owned()
    }

    /// Waits until the admin view shows `group` in `mode`.
    async fn wait_for_mode(&self, group: &str, mode: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.mode_of(group).await != mode {
            assert!(
                Instant::now() < deadline,
                "{group} never went {mode}: {}",
                self.admin_json("/consumers").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The admin view's counters of the group's client whose id contains `name`.
    async fn client_stats(&self, group: &str, name: &str) -> serde_json::Value {
        let view = self.admin_json("/consumers").await;
        view["groups"][group]["clients"]
            .as_object()
            .and_then(|clients| {
                clients
                    .iter()
                    .find(|(client, _)| client.contains(name))
                    .map(|(_, stats)| stats.clone())
            })
            .unwrap_or_default()
    }

    /// Sum of one per-client counter over the group's clients.
    async fn group_total(&self, group: &str, counter: &str) -> u64 {
        let view = self.admin_json("/consumers").await;
        view["groups"][group]["clients"]
            .as_object()
            .map(|clients| {
                clients
                    .values()
                    .map(|stats| stats[counter].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Sends through the sidecar from its own producer; each acknowledged body is returned.
struct Sender {
    sent: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Sender {
    /// Sends `prefix-<n>` for n from 0, `per_second` a second (0: as fast as sync sends go), up
    /// to `count` messages or until stopped.
    async fn start(
        namesrv: SocketAddr,
        topic: &str,
        prefix: &str,
        per_second: u32,
        count: usize,
    ) -> Self {
        let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
            .client_config(client_config(namesrv, &format!("{prefix}-producer")))
            .producer_group(format!("{prefix}_producers"))
            .send_msg_timeout(10_000)
            .build();
        tokio::time::timeout(STEP_TIMEOUT, producer.start())
            .await
            .expect("in time")
            .expect("producer start");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(Notify::new());
        let (topic, prefix) = (topic.to_owned(), prefix.to_owned());
        let (record, stopped) = (sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let stopping = stopped.notified();
            tokio::pin!(stopping);
            for index in 0..count {
                if per_second > 0 {
                    let due = started + Duration::from_secs_f64(index as f64 / per_second as f64);
                    tokio::select! {
                        _ = &mut stopping => break,
                        _ = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                let body = format!("{prefix}-{index:06}");
                let message = Message::builder()
                    .topic(topic.as_str())
                    .body_slice(body.as_bytes())
                    .build()
                    .expect("message");
                match tokio::time::timeout(STEP_TIMEOUT, producer.send(message)).await {
                    Ok(Ok(Some(result))) if format!("{:?}", result.send_status) == "SendOk" => {
                        record.lock().expect("sent").push((body, Instant::now()));
                    }
                    other => panic!("send {index} failed: {other:?}"),
                }
            }
            producer.shutdown().await;
        });
        Self { sent, stop, task }
    }

    fn sent(&self) -> Vec<String> {
        self.sent_times()
            .into_iter()
            .map(|(body, _)| body)
            .collect()
    }

    /// Each acknowledged body with when its send was acknowledged.
    fn sent_times(&self) -> Vec<(String, Instant)> {
        self.sent.lock().expect("sent").clone()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.notify_one();
        tokio::time::timeout(STEP_TIMEOUT, self.task)
            .await
            .expect("sender stops in time")
            .expect("sender task");
        self.sent
            .lock()
            .expect("sent")
            .iter()
            .map(|(body, _)| body.clone())
            .collect()
    }
}

/// Deliveries per second between `from` and `to`, over every consumer but `except`.
fn rate(
    deliveries: &BTreeMap<String, Vec<Delivery>>,
    except: &str,
    from: Instant,
    to: Instant,
) -> f64 {
    let count = deliveries
        .values()
        .flatten()
        .filter(|delivery| delivery.consumer != except && delivery.at >= from && delivery.at < to)
        .count();
    count as f64 / to.saturating_duration_since(from).as_secs_f64().max(0.001)
}

const CONVERTING: &str = "consume: { mode: auto, invisible_time_ms: 20000, renew_ahead_ms: 5000, client_liveness_ms: 8000 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_consumers_share_a_converted_group_exactly_once() {
    let _serial = one_at_a_time().await;
    const TOPIC: &str = "PopShared";
    const GROUP: &str = "ptp_shared";
    const COUNT: usize = 20_000;
    let mesh = Mesh::start(CONVERTING).await;
    let deliveries = Deliveries::default();
    let consumers = [
        (Kind::RustPush, "rust-push"),
        (Kind::RustLite, "rust-lite"),
        (Kind::CppPush, "cpp-push"),
    ]
    .map(|(kind, name)| consumer(&mesh, kind, GROUP, TOPIC, name, &deliveries));
    mesh.wait_for_mode(GROUP, "pop").await;
    let started = Instant::now();
    // Four producers side by side, each sending a quarter with sync sends.
    let mut senders = Vec::new();
    for index in 0..4 {
        let prefix = format!("shared{index}");
        senders.push(Sender::start(mesh.addr, TOPIC, &prefix, 0, COUNT / 4).await);
    }
    let mut sent = Vec::new();
    for sender in senders {
        sent_at_least(&sender, COUNT / 4).await;
        sent.extend(sender.finish().await);
    }
    deliveries.wait_for_all(&sent, STEP_TIMEOUT).await;
    let elapsed = started.elapsed();
    // Late duplicates would come after an invisible time: wait one out.
    tokio::time::sleep(Duration::from_secs(22)).await;
    let (missing, duplicates) = deliveries.tally(&sent);
    let shares: Vec<String> = consumers
        .iter()
        .map(|consumer| format!("{} {}", consumer.name, deliveries.count_by(&consumer.name)))
        .collect();
    println!(
        "normal path: {COUNT} sent, {} missing, {duplicates} duplicates, all in {elapsed:.1?}; shares: {}",
        missing.len(),
        shares.join(", ")
    );
    assert_eq!(mesh.mode_of(GROUP).await, "pop");
    let acked = mesh.group_total(GROUP, "acked").await;
    println!("sidecar: {acked} acked for {GROUP}");
    if duplicates > 0 {
        deliveries.print_duplicates(started);
        println!("consumers: {}", mesh.admin_json("/consumers").await);
    }
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert_eq!(duplicates, 0, "each message delivered once");
    for consumer in consumers {
        assert!(
            deliveries.count_by(&consumer.name) > 0,
            "{} took part",
            consumer.name
        );
        consumer.stop();
    }
    mesh.stop().await;
}

/// Starts one consumer of `group` on `topic`, with no failures.
fn consumer(
    mesh: &Mesh,
    kind: Kind,
    group: &str,
    topic: &str,
    name: &str,
    deliveries: &Deliveries,
) -> Consumer {
    let spec = Spec {
        kind,
        group,
        topic,
        name,
        fail: "",
        max_reconsume: -1,
    };
    Consumer::start(&spec, mesh.addr, deliveries, mesh.home())
}

/// Waits until `sender` has had `count` sends acknowledged.
async fn sent_at_least(sender: &Sender, count: usize) {
    tokio::time::timeout(STEP_TIMEOUT, async {
        while sender.sent().len() < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("sends acknowledged in time");
}

const SEND_RATE: u32 = 200;

/// These tests time takeovers and rates with up to four client processes each: one at a time on
/// a 2-core machine.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_strands_nothing_and_its_late_commits_ack_nothing_taken() {
    let _serial = one_at_a_time().await;
    const TOPIC: &str = "PopHung";
    const GROUP: &str = "ptp_hung";
    // CONVERTING: invisible time 20 s, liveness 8 s.
    const INVISIBLE: Duration = Duration::from_secs(20);
    let mesh = Mesh::start(CONVERTING).await;
    let deliveries = Deliveries::default();
    let victim = consumer(&mesh, Kind::RustPush, GROUP, TOPIC, "victim", &deliveries);
    let others = [
        consumer(&mesh, Kind::RustLite, GROUP, TOPIC, "lite", &deliveries),
        consumer(&mesh, Kind::CppPush, GROUP, TOPIC, "cpp", &deliveries),
    ];
    mesh.wait_for_mode(GROUP, "pop").await;
    let sender = Sender::start(mesh.addr, TOPIC, "hung", SEND_RATE, usize::MAX).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    victim.signal("-STOP");
    let stopped_at = Instant::now();
    // The victim held a share of what was sent around the stop: the others must get all of it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let window = (stopped_at - Duration::from_secs(5))..(stopped_at + Duration::from_secs(5));
    let around: Vec<(String, Instant)> = sender
        .sent_times()
        .into_iter()
        .filter(|(_, at)| window.contains(at))
        .collect();
    let bodies: Vec<String> = around.iter().map(|(body, _)| body.clone()).collect();
    let limit = INVISIBLE + Duration::from_secs(5);
    deliveries.wait_for_all(&bodies, limit).await;
    let view = deliveries.snapshot();
    let lags: Vec<Duration> = around
        .iter()
        .filter_map(|(body, sent)| {
            let first = view.get(body)?.iter().map(|delivery| delivery.at).min()?;
            Some(first.saturating_duration_since(*sent))
        })
        .collect();
    let late = lags
        .iter()
        .filter(|lag| **lag > Duration::from_secs(1))
        .count();
    let last_revival = lags.iter().max().copied().unwrap_or_default();
    // Rates of the two others: before the stop, and once they took over.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let now = Instant::now();
    let view = deliveries.snapshot();
    let before = rate(
        &view,
        "victim",
        stopped_at - Duration::from_secs(5),
        stopped_at,
    );
    let after = rate(&view, "victim", now - Duration::from_secs(8), now);
    let victim_stats = mesh.client_stats(GROUP, "victim").await;
    println!(
        "hung consumer: SIGSTOP; of the {} messages sent within 5 s of it, all delivered, {late} more than 1 s after their send (the victim's, taken over), the latest {last_revival:.1?} after its send (invisible time {INVISIBLE:?}, liveness 8 s); the others' rate {before:.0}/s before, {after:.0}/s after (sending {SEND_RATE}/s); victim's receipts: {victim_stats}",
        around.len()
    );
    assert!(last_revival <= limit, "taken over within {limit:?}");
    assert!(
        after >= 0.9 * SEND_RATE as f64,
        "the others keep up with the whole load: {after:.0}/s"
    );
    // SIGCONT: the victim finishes what it had cached and commits it late.
    let acked_before = mesh.group_total(GROUP, "acked").await;
    victim.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let sent = sender.finish().await;
    deliveries.wait_for_all(&sent, limit).await;
    let (missing, duplicates) = deliveries.tally(&sent);
    let acked_after = mesh.group_total(GROUP, "acked").await;
    let victim_after = mesh.client_stats(GROUP, "victim").await;
    println!(
        "after SIGCONT: {} sent in all, {} missing, {duplicates} duplicates (the victim's cache, consumed late); group acks {acked_before} → {acked_after}; victim's receipts: {victim_after}",
        sent.len(),
        missing.len()
    );
    assert!(missing.is_empty());
    // Its late commits found no receipts (they were released), so it sent no stale ack.
    assert_eq!(victim_after["ack_failures"], 0, "{victim_after}");
    // Each message was acked at most once at the brokers: late commits found no receipts.
    assert!(
        acked_after <= sent.len() as u64,
        "{acked_after} acks for {} messages",
        sent.len()
    );
    victim.stop();
    for other in others {
        other.stop();
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_messages_go_to_the_survivors() {
    let _serial = one_at_a_time().await;
    const TOPIC: &str = "PopCrash";
    const GROUP: &str = "ptp_crash";
    let mesh = Mesh::start(CONVERTING).await;
    let deliveries = Deliveries::default();
    let victim = consumer(&mesh, Kind::CppPush, GROUP, TOPIC, "victim", &deliveries);
    let others = [
        consumer(&mesh, Kind::RustPush, GROUP, TOPIC, "push", &deliveries),
        consumer(&mesh, Kind::RustLite, GROUP, TOPIC, "lite", &deliveries),
    ];
    mesh.wait_for_mode(GROUP, "pop").await;
    let sender = Sender::start(mesh.addr, TOPIC, "crash", SEND_RATE, usize::MAX).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let killed_at = Instant::now();
    victim.kill();
    let victim_got = deliveries.count_by("victim");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let sent = sender.finish().await;
    deliveries
        .wait_for_all(&sent, Duration::from_secs(30))
        .await;
    let view = deliveries.snapshot();
    let duplicates: Vec<&String> = view
        .iter()
        .filter(|(_, list)| list.len() > 1)
        .map(|(body, _)| body)
        .collect();
    let from_victim = duplicates
        .iter()
        .filter(|body| {
            view[**body]
                .iter()
                .any(|delivery| delivery.consumer == "victim")
        })
        .count();
    let takeover = view
        .values()
        .filter(|list| list.len() > 1)
        .flat_map(|list| list.iter().filter(|delivery| delivery.at > killed_at))
        .map(|delivery| delivery.at - killed_at)
        .max()
        .unwrap_or_default();
    println!(
        "crash: SIGKILL of the C++ consumer after it got {victim_got}; {} sent, 0 missing, {} duplicated ({from_victim} of them ones it had), taken over within {takeover:.1?}",
        sent.len(),
        duplicates.len()
    );
    assert_eq!(
        from_victim,
        duplicates.len(),
        "only the killed consumer's messages come twice"
    );
    assert!(
        duplicates.len() <= victim_got,
        "duplicates bounded by what it held"
    );
    for other in others {
        other.stop();
    }
    mesh.stop().await;
}

/// A tiny deterministic generator, so a failing churn run can be replayed from its seed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound.max(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_churning_under_load_lose_nothing() {
    let _serial = one_at_a_time().await;
    const TOPIC: &str = "PopChurn";
    const GROUP: &str = "ptp_churn";
    const KINDS: [Kind; 3] = [Kind::RustPush, Kind::RustLite, Kind::CppPush];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |elapsed| elapsed.as_secs());
    let mut random = Lcg(seed);
    let mesh = Mesh::start(CONVERTING).await;
    let deliveries = Deliveries::default();
    let mut alive: Vec<Consumer> = vec![
        consumer(&mesh, Kind::RustPush, GROUP, TOPIC, "c0", &deliveries),
        consumer(&mesh, Kind::CppPush, GROUP, TOPIC, "c1", &deliveries),
    ];
    mesh.wait_for_mode(GROUP, "pop").await;
    let sender = Sender::start(mesh.addr, TOPIC, "churn", 150, usize::MAX).await;
    let (mut started, mut stopped, mut killed) = (2, 0, 0);
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2_000 + random.below(3_000))).await;
        let grow = alive.len() < 2 || (alive.len() < 4 && random.below(2) == 0);
        if grow {
            let kind = KINDS[random.below(3) as usize];
            let name = format!("c{started}");
            alive.push(consumer(&mesh, kind, GROUP, TOPIC, &name, &deliveries));
            started += 1;
        } else {
            let leaving = alive.remove(random.below(alive.len() as u64) as usize);
            if random.below(2) == 0 {
                leaving.kill();
                killed += 1;
            } else {
                tokio::task::spawn_blocking(move || leaving.stop());
                stopped += 1;
            }
        }
    }
    let sent = sender.finish().await;
    deliveries
        .wait_for_all(&sent, Duration::from_secs(60))
        .await;
    let (missing, duplicates) = deliveries.tally(&sent);
    println!(
        "churn (seed {seed}): 60 s, {started} consumers started, {stopped} stopped, {killed} killed; {} sent, {} missing, {duplicates} duplicates",
        sent.len(),
        missing.len()
    );
    assert!(missing.is_empty());
    for consumer in alive {
        consumer.stop();
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconsume_later_comes_back_with_growing_reconsume_times_then_dead_letters() {
    let _serial = one_at_a_time().await;
    const TOPIC: &str = "PopFail";
    const GROUP: &str = "ptp_fail";
    const MAX: i32 = 2;
    let mesh = Mesh::start(CONVERTING).await;
    let deliveries = Deliveries::default();
    let spec = Spec {
        kind: Kind::RustPush,
        group: GROUP,
        topic: TOPIC,
        name: "failing",
        fail: "fail-",
        max_reconsume: MAX,
    };
    let failing = Consumer::start(&spec, mesh.addr, &deliveries, mesh.home());
    mesh.wait_for_mode(GROUP, "pop").await;
    let good = Sender::start(mesh.addr, TOPIC, "ok", 0, 20).await;
    let bad = Sender::start(mesh.addr, TOPIC, "fail", 0, 3).await;
    sent_at_least(&good, 20).await;
    sent_at_least(&bad, 3).await;
    let (good, bad) = (good.finish().await, bad.finish().await);
    deliveries.wait_for_all(&good, STEP_TIMEOUT).await;
    // Retries come after the broker's delay levels: 10 s, then 30 s.
    deliveries
        .wait_until(
            Duration::from_secs(90),
            "each failing message seen MAX + 1 times",
            |seen| {
                bad.iter()
                    .all(|body| seen.get(body).is_some_and(|list| list.len() > MAX as usize))
            },
        )
        .await;
    let mut dead = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead < bad.len() as i64 && Instant::now() < deadline {
        dead = 0;
        for broker in &mesh.brokers {
            dead += common::messages_on(broker.addr, &format!("%DLQ%{GROUP}")).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = deliveries.snapshot();
    for body in &bad {
        let times: Vec<i32> = view[body]
            .iter()
            .map(|delivery| delivery.reconsume_times)
            .collect();
        println!("{body}: reconsumeTimes {times:?}");
        assert_eq!(times, (0..=MAX).collect::<Vec<_>>(), "{body}");
    }
    let nacks = mesh.group_total(GROUP, "nacks").await;
    let dead_lettered = mesh.group_total(GROUP, "dead_lettered").await;
    println!("failures: {nacks} nacks, {dead_lettered} dead-lettered, {dead} in %DLQ%{GROUP}");
    assert_eq!(
        dead,
        bad.len() as i64,
        "every failing message reached %DLQ%{GROUP}"
    );
    for body in &good {
        assert_eq!(view[body].len(), 1, "{body} consumed once");
    }
    failing.stop();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasting_and_orderly_groups_stay_pull() {
    let _serial = one_at_a_time().await;
    const COUNT: usize = 200;
    let mesh = Mesh::start(CONVERTING).await;
    let broadcast = Deliveries::default();
    let orderly = Deliveries::default();
    let consumers = [
        consumer(
            &mesh,
            Kind::RustBroadcast,
            "ptp_broadcast",
            "PopBroadcast",
            "b-rust",
            &broadcast,
        ),
        consumer(
            &mesh,
            Kind::CppBroadcast,
            "ptp_broadcast",
            "PopBroadcast",
            "b-cpp",
            &broadcast,
        ),
        consumer(
            &mesh,
            Kind::RustOrderly,
            "ptp_orderly",
            "PopOrderly",
            "o-1",
            &orderly,
        ),
        consumer(
            &mesh,
            Kind::RustOrderly,
            "ptp_orderly",
            "PopOrderly",
            "o-2",
            &orderly,
        ),
    ];
    let to_all = Sender::start(mesh.addr, "PopBroadcast", "all", 0, COUNT).await;
    let in_order = Sender::start(mesh.addr, "PopOrderly", "ord", 0, COUNT).await;
    sent_at_least(&to_all, COUNT).await;
    sent_at_least(&in_order, COUNT).await;
    let (to_all, in_order) = (to_all.finish().await, in_order.finish().await);
    broadcast
        .wait_until(
            STEP_TIMEOUT,
            "both broadcasting consumers get everything",
            |seen| {
                to_all.iter().all(|body| {
                    seen.get(body).is_some_and(|list| {
                        list.iter().any(|d| d.consumer == "b-rust")
                            && list.iter().any(|d| d.consumer == "b-cpp")
                    })
                })
            },
        )
        .await;
    orderly.wait_for_all(&in_order, STEP_TIMEOUT).await;
    let view = mesh.admin_json("/consumers").await;
    let (_, orderly_duplicates) = orderly.tally(&in_order);
    println!(
        "not converted: broadcasting {} ({}), orderly {} ({}), {} orderly duplicates",
        view["groups"]["ptp_broadcast"]["mode"],
        view["groups"]["ptp_broadcast"]["reason"],
        view["groups"]["ptp_orderly"]["mode"],
        view["groups"]["ptp_orderly"]["reason"],
        orderly_duplicates
    );
    assert_eq!(view["groups"]["ptp_broadcast"]["mode"], "pull", "{view}");
    assert_eq!(view["groups"]["ptp_orderly"]["mode"], "pull", "{view}");
    assert_eq!(orderly_duplicates, 0);
    for consumer in consumers {
        consumer.stop();
    }
    mesh.stop().await;
}
