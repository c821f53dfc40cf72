//! `rocketmesh bench`: produce or consume load against any address speaking the remoting protocol
//! (the bundled broker, a sidecar, another broker), with latency percentiles from an HDR histogram.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rocketmesh::remoting::body::{
    BatchAck, BatchAckMessageRequestBody, ConsumerData, HeartbeatData, JsonBody, SubscriptionData,
    TopicRouteData,
};
use rocketmesh::remoting::header::{
    GetMaxOffsetRequestHeader, GetRouteInfoRequestHeader, PopMessageRequestHeader,
    PullMessageRequestHeader, SendMessageRequestHeaderV2,
};
use rocketmesh::remoting::message::decode_records;
use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, ResponseCode};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio_util::codec::Framed;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Address of the broker or sidecar to load.
    #[arg(long, default_value = "127.0.0.1:10911")]
    pub target: SocketAddr,
    #[arg(long, default_value = "BenchTopic")]
    pub topic: String,
    /// Connections to open.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per connection (1 behaves like a synchronous client).
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Stop after this many seconds…
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// …or after this many messages, whichever comes first.
    #[arg(long)]
    pub count: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Debug, clap::Subcommand)]
pub enum Workload {
    /// Send messages.
    Produce {
        /// Body size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// sync: wait for each response before the next send on that slot; async: keep
        /// `--inflight` sends outstanding; oneway: no responses at all.
        #[arg(long, value_enum, default_value_t = SendMode::Async)]
        mode: SendMode,
    },
    /// Receive messages.
    Consume {
        #[arg(long, default_value = "bench_consumer")]
        group: String,
        #[arg(long, value_enum, default_value_t = ConsumeMode::Pull)]
        mode: ConsumeMode,
    },
    /// Keep `--inflight` long-polling pulls parked per connection at the end of each queue (the
    /// load of many idle consumers); answered polls are issued again.
    Park {
        #[arg(long, default_value = "bench_parked")]
        group: String,
        /// How long the broker may hold each pull.
        #[arg(long, default_value_t = 20_000)]
        suspend_ms: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendMode {
    Sync,
    Async,
    Oneway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumeMode {
    Pull,
    Pop,
}

/// One multiplexed connection: requests go out tagged with an opaque, responses find their waiter.
/// How many request bytes may queue before the writer must flush them.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

struct Connection {
    outbound: mpsc::Sender<RemotingCommand>,
    waiting: Arc<Mutex<HashMap<i32, oneshot::Sender<RemotingCommand>>>>,
    next_opaque: AtomicI32,
}

impl Connection {
    async fn open(target: SocketAddr) -> anyhow::Result<Arc<Self>> {
        let socket = TcpStream::connect(target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        socket.set_nodelay(true)?;
        let mut framed = Framed::new(socket, RemotingCodec::default());
        framed.set_backpressure_boundary(WRITE_BATCH_BYTES);
        let (mut sink, mut stream) = framed.split();
        let (outbound, mut queue) = mpsc::channel::<RemotingCommand>(1024);
        let waiting: Arc<Mutex<HashMap<i32, oneshot::Sender<RemotingCommand>>>> = Arc::default();
        tokio::spawn(async move {
            // Queue every request that is ready, then flush once, as a real client's writer would.
            while let Some(command) = queue.recv().await {
                let mut written = sink.feed(command).await;
                while written.is_ok() {
                    match queue.try_recv() {
                        Ok(command) => written = sink.feed(command).await,
                        Err(_) => break,
                    }
                }
                if written.and(sink.flush().await).is_err() {
                    break;
                }
            }
        });
        let responses = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(command)) = stream.next().await {
                if command.is_response()
                    && let Some(waiter) = responses.lock().await.remove(&command.opaque)
                {
                    let _ = waiter.send(command);
                }
            }
        });
        Ok(Arc::new(Self {
            outbound,
            waiting,
            next_opaque: AtomicI32::new(1),
        }))
    }

    async fn call(
        &self,
        mut request: RemotingCommand,
        timeout: Duration,
    ) -> anyhow::Result<RemotingCommand> {
        request.opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().await.insert(request.opaque, tx);
        let opaque = request.opaque;
        self.outbound
            .send(request)
            .await
            .context("connection closed")?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => bail!("connection closed"),
            Err(_) => {
                self.waiting.lock().await.remove(&opaque);
                bail!("no response within {timeout:?}")
            }
        }
    }

    async fn send_oneway(&self, mut request: RemotingCommand) -> anyhow::Result<()> {
        request.opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        request.set_oneway(true);
        self.outbound
            .send(request)
            .await
            .context("connection closed")
    }
}

/// Shared counters of a run.
struct Tally {
    done: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: std::sync::Mutex<Histogram<u64>>,
    stop: AtomicBool,
}

impl Tally {
    fn record(&self, started: Instant) {
        let micros = started.elapsed().as_micros() as u64;
        if let Ok(mut histogram) = self.latency.lock() {
            let _ = histogram.record(micros.max(1));
        }
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(bench(args))
}

async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let first = Connection::open(args.target).await?;
    let route = route(&first, &args.topic).await;
    let (broker_name, queues) = match &route {
        Some(route) => (
            route
                .queue_datas
                .first()
                .map(|q| q.broker_name.clone())
                .unwrap_or_default(),
            route
                .queue_datas
                .first()
                .map_or(4, |q| q.write_queue_nums.max(1)),
        ),
        // A topic created by the first send: the broker will tell us more next time.
        None => (String::new(), 4),
    };
    let tally = Arc::new(Tally {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        latency: std::sync::Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        stop: AtomicBool::new(false),
    });
    let mut connections = vec![first];
    for _ in 1..args.connections {
        connections.push(Connection::open(args.target).await?);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let progress = tokio::spawn(progress(tally.clone(), started, args.json));
    let mut workers = Vec::new();
    match &args.workload {
        Workload::Produce { size, mode } => {
            let body = Bytes::from(vec![b'x'; *size]);
            let slots = if *mode == SendMode::Sync {
                1
            } else {
                args.inflight
            };
            for (index, connection) in connections.iter().enumerate() {
                let limit = Arc::new(Semaphore::new(slots));
                workers.push(tokio::spawn(produce(
                    connection.clone(),
                    limit,
                    tally.clone(),
                    args.topic.clone(),
                    broker_name.clone(),
                    queues,
                    index as i32,
                    body.clone(),
                    *mode,
                    deadline,
                    args.count,
                )));
            }
        }
        Workload::Park { group, suspend_ms } => {
            for (index, connection) in connections.iter().enumerate() {
                for slot in 0..args.inflight {
                    let queue_id = ((index * args.inflight + slot) % queues as usize) as i32;
                    workers.push(tokio::spawn(park(
                        connection.clone(),
                        tally.clone(),
                        args.topic.clone(),
                        broker_name.clone(),
                        group.clone(),
                        queue_id,
                        *suspend_ms,
                        deadline,
                    )));
                }
            }
        }
        Workload::Consume { group, mode } => {
            if *mode == ConsumeMode::Pull {
                for (index, connection) in connections.iter().enumerate() {
                    register_push_consumer(connection, group, &args.topic, index).await?;
                }
            }
            for queue_id in 0..queues {
                let connection = connections[queue_id as usize % connections.len()].clone();
                workers.push(tokio::spawn(consume(
                    connection,
                    tally.clone(),
                    args.topic.clone(),
                    broker_name.clone(),
                    group.clone(),
                    queue_id,
                    *mode,
                    deadline,
                    args.count,
                )));
            }
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
    // Measured before the progress task winds down, which may take up to one tick.
    let elapsed = started.elapsed();
    tally.stop.store(true, Ordering::Relaxed);
    let _ = progress.await;
    summary(args, &tally, elapsed);
    Ok(())
}

async fn route(connection: &Connection, topic: &str) -> Option<TopicRouteData> {
    let header = GetRouteInfoRequestHeader {
        topic: topic.to_owned(),
        ..Default::default()
    };
    let request =
        RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(&header);
    let response = connection
        .call(request, Duration::from_secs(5))
        .await
        .ok()?;
    (response.code == ResponseCode::SUCCESS.0)
        .then(|| TopicRouteData::from_json(&response.body).ok())
        .flatten()
}

fn reached(tally: &Tally, deadline: Instant, count: Option<u64>) -> bool {
    Instant::now() >= deadline
        || count.is_some_and(|count| tally.done.load(Ordering::Relaxed) >= count)
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    connection: Arc<Connection>,
    limit: Arc<Semaphore>,
    tally: Arc<Tally>,
    topic: String,
    broker_name: String,
    queues: i32,
    first_queue: i32,
    body: Bytes,
    mode: SendMode,
    deadline: Instant,
    count: Option<u64>,
) {
    let mut sequence = first_queue;
    while !reached(&tally, deadline, count) {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        sequence = sequence.wrapping_add(1);
        let header = SendMessageRequestHeaderV2 {
            producer_group: "bench_producer".into(),
            topic: topic.clone(),
            default_topic: "TBW102".into(),
            default_topic_queue_nums: 4,
            queue_id: sequence.rem_euclid(queues),
            born_timestamp: rocketmesh::broker::schedule::now_ms(),
            properties: Some("WAIT\u{1}true\u{2}".into()),
            broker_name: (!broker_name.is_empty()).then(|| broker_name.clone()),
            ..Default::default()
        };
        let request = RemotingCommand::request(RequestCode::SEND_MESSAGE_V2, 0)
            .with_header(&header)
            .with_body(body.clone());
        let size = body.len() as u64;
        if mode == SendMode::Oneway {
            let started = Instant::now();
            match connection.send_oneway(request).await {
                Ok(()) => {
                    tally.done.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(size, Ordering::Relaxed);
                    tally.record(started);
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            drop(permit);
            continue;
        }
        let connection = connection.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            match connection.call(request, Duration::from_secs(10)).await {
                Ok(response) if response.code == ResponseCode::SUCCESS.0 => {
                    tally.done.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(size, Ordering::Relaxed);
                    tally.record(started);
                }
                _ => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    // Let the last sends finish.
    let _ = limit.acquire_many(limit.available_permits() as u32).await;
}

/// Registers the connection as a push consumer of `group`, as a real client's heartbeat does:
/// a sidecar that converts pulls into POP then knows the group is clustering and concurrent.
async fn register_push_consumer(
    connection: &Connection,
    group: &str,
    topic: &str,
    index: usize,
) -> anyhow::Result<()> {
    let heartbeat = HeartbeatData {
        client_id: format!("127.0.0.1@bench-{}-{index}", std::process::id()),
        consumer_data_set: vec![ConsumerData {
            consume_from_where: "CONSUME_FROM_FIRST_OFFSET".into(),
            consume_type: "CONSUME_PASSIVELY".into(),
            group_name: group.to_owned(),
            message_model: "CLUSTERING".into(),
            subscription_data_set: vec![SubscriptionData {
                topic: topic.to_owned(),
                sub_string: "*".into(),
                expression_type: Some("TAG".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let request =
        RemotingCommand::request(RequestCode::HEART_BEAT, 0).with_body(heartbeat.to_json()?);
    let response = connection.call(request, Duration::from_secs(10)).await?;
    if response.code != ResponseCode::SUCCESS.0 {
        bail!(
            "heartbeat refused: {} {}",
            response.code,
            response.remark.unwrap_or_default()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    connection: Arc<Connection>,
    tally: Arc<Tally>,
    topic: String,
    broker_name: String,
    group: String,
    queue_id: i32,
    mode: ConsumeMode,
    deadline: Instant,
    count: Option<u64>,
) {
    let mut offset = 0i64;
    while !reached(&tally, deadline, count) {
        let started = Instant::now();
        let request = match mode {
            // As a push consumer does: each pull commits what the previous one brought.
            ConsumeMode::Pull => RemotingCommand::request(RequestCode::PULL_MESSAGE, 0)
                .with_header(&PullMessageRequestHeader {
                    consumer_group: group.clone(),
                    topic: topic.clone(),
                    queue_id,
                    queue_offset: offset,
                    commit_offset: offset,
                    max_msg_nums: 32,
                    sys_flag: 0x2 | 0x4 | if offset > 0 { 0x1 } else { 0 },
                    suspend_timeout_millis: 1_000,
                    subscription: Some("*".into()),
                    broker_name: (!broker_name.is_empty()).then(|| broker_name.clone()),
                    ..Default::default()
                }),
            ConsumeMode::Pop => RemotingCommand::request(RequestCode::POP_MESSAGE, 0).with_header(
                &PopMessageRequestHeader {
                    consumer_group: group.clone(),
                    topic: topic.clone(),
                    queue_id,
                    max_msg_nums: 32,
                    invisible_time: 60_000,
                    poll_time: 1_000,
                    born_time: rocketmesh::broker::schedule::now_ms(),
                    broker_name: (!broker_name.is_empty()).then(|| broker_name.clone()),
                    ..Default::default()
                },
            ),
        };
        let response = match connection.call(request, Duration::from_secs(10)).await {
            Ok(response) => response,
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if response.code != ResponseCode::SUCCESS.0 {
            if let Some(next) = response.ext("nextBeginOffset").and_then(|n| n.parse().ok()) {
                offset = next;
            }
            continue;
        }
        let Ok(records) = decode_records(&response.body, false) else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tally.record(started);
        tally
            .done
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        tally.bytes.fetch_add(
            records.iter().map(|r| r.body.len() as u64).sum(),
            Ordering::Relaxed,
        );
        match mode {
            ConsumeMode::Pull => {
                offset = response
                    .ext("nextBeginOffset")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(offset);
            }
            ConsumeMode::Pop => {
                let pop_time = response
                    .ext("popTime")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let mut ack = BatchAck {
                    consumer_group: group.clone(),
                    topic: topic.clone(),
                    retry: "0".into(),
                    start_offset: records.iter().map(|r| r.queue_offset).min().unwrap_or(0),
                    queue_id,
                    pop_time,
                    invisible_time: 60_000,
                    ..Default::default()
                };
                if ack
                    .set_offsets(records.iter().map(|r| r.queue_offset))
                    .is_ok()
                {
                    let body = BatchAckMessageRequestBody {
                        acks: vec![ack],
                        broker_name: broker_name.clone(),
                    };
                    if let Ok(json) = body.to_json() {
                        let request = RemotingCommand::request(RequestCode::BATCH_ACK_MESSAGE, 0)
                            .with_body(json);
                        if connection
                            .call(request, Duration::from_secs(10))
                            .await
                            .is_err()
                        {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// One parked long poll after another at the end of `queue_id`, until `deadline`.
#[allow(clippy::too_many_arguments)]
async fn park(
    connection: Arc<Connection>,
    tally: Arc<Tally>,
    topic: String,
    broker_name: String,
    group: String,
    queue_id: i32,
    suspend_ms: i64,
    deadline: Instant,
) {
    let broker = (!broker_name.is_empty()).then(|| broker_name.clone());
    let max_offset = RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 0).with_header(
        &GetMaxOffsetRequestHeader {
            topic: topic.clone(),
            queue_id,
            broker_name: broker.clone(),
            ..Default::default()
        },
    );
    let mut offset = match connection.call(max_offset, Duration::from_secs(10)).await {
        Ok(response) => response
            .ext("offset")
            .and_then(|offset| offset.parse().ok())
            .unwrap_or(0),
        Err(_) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let wait = Duration::from_millis(suspend_ms.max(0) as u64) + Duration::from_secs(10);
    while Instant::now() < deadline {
        let started = Instant::now();
        let request = RemotingCommand::request(RequestCode::PULL_MESSAGE, 0).with_header(
            &PullMessageRequestHeader {
                consumer_group: group.clone(),
                topic: topic.clone(),
                queue_id,
                queue_offset: offset,
                max_msg_nums: 32,
                sys_flag: 0x2 | 0x4,
                suspend_timeout_millis: suspend_ms,
                subscription: Some("*".into()),
                broker_name: broker.clone(),
                ..Default::default()
            },
        );
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, connection.call(request, wait)).await {
            // The run ended with the poll still parked: that is the point, not an error.
            Err(_) => break,
            Ok(Ok(response))
                if [
                    ResponseCode::SUCCESS.0,
                    ResponseCode::PULL_NOT_FOUND.0,
                    ResponseCode::PULL_RETRY_IMMEDIATELY.0,
                ]
                .contains(&response.code) =>
            {
                tally.done.fetch_add(1, Ordering::Relaxed);
                tally.record(started);
                if let Some(next) = response.ext("nextBeginOffset").and_then(|n| n.parse().ok()) {
                    offset = next;
                }
            }
            Ok(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn progress(tally: Arc<Tally>, started: Instant, quiet: bool) {
    let live = !quiet && std::io::stderr().is_terminal();
    let mut last = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while !tally.stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let done = tally.done.load(Ordering::Relaxed);
        if live {
            let p99 = tally
                .latency
                .lock()
                .map(|h| h.value_at_quantile(0.99))
                .unwrap_or(0);
            eprint!(
                "\r{:>5.1}s  {:>9} msgs/s  total {:>10}  errors {:>6}  p99 {:>8} µs ",
                started.elapsed().as_secs_f64(),
                done - last,
                done,
                tally.errors.load(Ordering::Relaxed),
                p99
            );
        }
        last = done;
    }
    if live {
        eprintln!();
    }
}

fn summary(args: &BenchArgs, tally: &Tally, elapsed: Duration) {
    let done = tally.done.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let bytes = tally.bytes.load(Ordering::Relaxed);
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let (p50, p90, p99, p999, max) = tally
        .latency
        .lock()
        .map(|h| {
            (
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
            )
        })
        .unwrap_or_default();
    let workload = match &args.workload {
        Workload::Produce { size, mode } => format!("produce {size} B {mode:?}").to_lowercase(),
        Workload::Consume { mode, .. } => format!("consume {mode:?}").to_lowercase(),
        Workload::Park { suspend_ms, .. } => format!("park {suspend_ms} ms"),
    };
    if args.json {
        let report = serde_json::json!({
            "target": args.target.to_string(),
            "workload": workload,
            "connections": args.connections,
            "inflight": args.inflight,
            "seconds": seconds,
            "messages": done,
            "errors": errors,
            "msgs_per_sec": done as f64 / seconds,
            "mb_per_sec": bytes as f64 / seconds / 1e6,
            "latency_us": {"p50": p50, "p90": p90, "p99": p99, "p99_9": p999, "max": max},
        });
        println!("{report}");
    } else {
        println!(
            "{workload} against {}: {done} messages in {seconds:.2} s = {:.0} msgs/s ({:.1} MB/s), {errors} errors\n\
             latency µs: p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}",
            args.target,
            done as f64 / seconds,
            bytes as f64 / seconds / 1e6
        );
    }
}
