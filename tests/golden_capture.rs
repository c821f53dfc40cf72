//! Golden captures from a real third-party RocketMQ client.
//!
//! `rust_client_bytes_decode_with_our_codec` starts a loopback TCP server that
//! plays both nameserver and broker (`broker-a` at the same address), records
//! every byte each accepted connection sends, decodes the frames live with our
//! `RemotingCodec`, and answers just enough for a real `DefaultMQProducer`
//! (`rocketmq-client-rust` 1.0.0) to send a few messages and a real
//! `DefaultMQPushConsumer` to heartbeat, rebalance and pull. Afterwards every
//! captured byte stream is decoded again from scratch: it must split into
//! whole frames with no error and no leftover bytes.
//!
//! With `ROCKETMESH_WRITE_CAPTURES=1` the producer-side and consumer-side
//! captures are written to `tests/data/`; `committed_captures_decode` checks
//! those files when they exist.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{Decoder, Framed};

use rocketmesh::remoting::body::{
    BrokerData, ConsumerList, HeartbeatData, JsonBody, QueueData, TopicRouteData,
};
use rocketmesh::remoting::header::{
    GetConsumerListByGroupRequestHeader, GetMaxOffsetRequestHeader, GetMinOffsetRequestHeader,
    GetRouteInfoRequestHeader, OffsetResponseHeader, PullMessageRequestHeader,
    PullMessageResponseHeader, QueryConsumerOffsetRequestHeader, SearchOffsetRequestHeader,
    SendMessageRequestHeader, SendMessageRequestHeaderV2, SendMessageResponseHeader,
    UnregisterClientRequestHeader, UpdateConsumerOffsetRequestHeader,
};
use rocketmesh::remoting::message::{
    OffsetMessageId, Properties, UniqKey, decode_batch, parse_properties, property,
};
use rocketmesh::remoting::{
    CommandHeader, RemotingCodec, RemotingCommand, RequestCode, ResponseCode,
};

use rocketmq_client_rust::{
    ClientConfig, ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

const TOPIC: &str = "GoldenTopic";
const PRODUCER_GROUP: &str = "golden_producer_group";
const CONSUMER_GROUP: &str = "golden_consumer_group";
const BROKER_NAME: &str = "broker-a";
const CLUSTER_NAME: &str = "DefaultCluster";
const QUEUE_NUMS: i32 = 4;
const MESSAGE_COUNT: usize = 5;
const BATCH_SIZE: usize = 2;

/// Protocol delay before a pull is answered with PULL_NOT_FOUND, like a broker
/// whose long-polling window ends without a message. Not synchronisation.
const PULL_HOLD: Duration = Duration::from_millis(200);
/// Upper bound for the whole client conversation.
const CONVERSATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one client shutdown, and for the client to close its sockets.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

const PRODUCER_CAPTURE: &str = "tests/data/rust-client-producer.bin";
const CONSUMER_CAPTURE: &str = "tests/data/rust-client-push-consumer.bin";

/// Which client a connection belongs to: the side that was running when the
/// server accepted it (the producer runs alone first, then the consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Producer,
    Consumer,
}

/// Everything one accepted connection sent, in order.
struct ConnCapture {
    side: Side,
    peer: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Set when our codec failed on the live stream.
    live_error: Arc<Mutex<Option<String>>>,
}

/// What the server has seen so far; waiters watch it.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Request code -> number of requests, over all connections.
    codes: BTreeMap<i32, usize>,
    /// Connections accepted and not yet closed by the client.
    open: usize,
}

struct Server {
    addr: SocketAddr,
    side: Mutex<Side>,
    captures: Mutex<Vec<ConnCapture>>,
    /// Consumer group -> client IDs announced in heartbeats.
    consumers: Mutex<BTreeMap<String, BTreeSet<String>>>,
    next_queue_offset: AtomicI64,
    progress: watch::Sender<Progress>,
    stop: watch::Sender<bool>,
}

/// A stream that appends every byte read from it to a shared log; writes pass through.
struct Recording<S> {
    inner: S,
    log: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = &buf.filled()[before..];
            self.log.lock().unwrap().extend_from_slice(fresh);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How the server answers one request.
enum Reply {
    None,
    Now(RemotingCommand),
    After(Duration, RemotingCommand),
}

impl Server {
    async fn start() -> (Arc<Server>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server {
            addr,
            side: Mutex::new(Side::Producer),
            captures: Mutex::new(Vec::new()),
            consumers: Mutex::new(BTreeMap::new()),
            next_queue_offset: AtomicI64::new(0),
            progress: watch::channel(Progress::default()).0,
            stop: watch::channel(false).0,
        });
        let acceptor = tokio::spawn(Arc::clone(&server).accept_loop(listener));
        (server, acceptor)
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // The client then fails to connect and the test reports it.
                    eprintln!("golden server: accept failed: {error}");
                    return;
                }
            };
            let bytes = Arc::new(Mutex::new(Vec::new()));
            let live_error = Arc::new(Mutex::new(None));
            let side = *self.side.lock().unwrap();
            self.captures.lock().unwrap().push(ConnCapture {
                side,
                peer,
                bytes: Arc::clone(&bytes),
                live_error: Arc::clone(&live_error),
            });
            self.progress.send_modify(|p| p.open += 1);
            tokio::spawn(Arc::clone(&self).serve_connection(stream, bytes, live_error));
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        bytes: Arc<Mutex<Vec<u8>>>,
        live_error: Arc<Mutex<Option<String>>>,
    ) {
        let recording = Recording {
            inner: stream,
            log: bytes,
        };
        let (mut sink, mut frames) = Framed::new(recording, RemotingCodec::default()).split();
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<RemotingCommand>();
        // Responses go through one writer so that delayed pull answers do not
        // hold up the other requests multiplexed on this connection.
        let writer = tokio::spawn(async move {
            while let Some(response) = reply_rx.recv().await {
                if let Err(error) = sink.send(response).await {
                    eprintln!("golden server: write failed: {error}");
                    break;
                }
            }
        });
        let mut stop = self.stop.subscribe();
        loop {
            let next = tokio::select! {
                next = frames.next() => next,
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            let request = match next {
                None => break,
                Some(Ok(request)) => request,
                Some(Err(error)) => {
                    *live_error.lock().unwrap() = Some(error.to_string());
                    break;
                }
            };
            let reply = self.answer(&request);
            self.progress
                .send_modify(|p| *p.codes.entry(request.code).or_default() += 1);
            match reply {
                Reply::None => {}
                Reply::Now(response) => {
                    let _ = reply_tx.send(response);
                }
                Reply::After(delay, response) => {
                    let reply_tx = reply_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = reply_tx.send(response);
                    });
                }
            }
        }
        drop(reply_tx);
        self.progress.send_modify(|p| p.open -= 1);
        // The writer ends once the pending delayed replies are sent or dropped.
        let _ = tokio::time::timeout(PULL_HOLD * 5, writer).await;
    }

    fn answer(&self, request: &RemotingCommand) -> Reply {
        let code = request.request_code();
        // Side effects first: a oneway heartbeat still registers its client.
        if code == RequestCode::HEART_BEAT {
            self.register_heartbeat(&request.body);
        }
        if request.is_oneway() {
            return Reply::None;
        }
        let success = RemotingCommand::response_to(request, ResponseCode::SUCCESS);
        match code {
            RequestCode::GET_ROUTEINFO_BY_TOPIC => {
                let standard_only = request
                    .decode_header::<GetRouteInfoRequestHeader>()
                    .ok()
                    .and_then(|header| header.accept_standard_json_only)
                    .unwrap_or(false);
                let body = self
                    .route()
                    .to_json_for_client(request.version, standard_only)
                    .unwrap();
                Reply::Now(success.with_body(body))
            }
            RequestCode::HEART_BEAT
            | RequestCode::UNREGISTER_CLIENT
            | RequestCode::UPDATE_CONSUMER_OFFSET => Reply::Now(success),
            RequestCode::SEND_MESSAGE
            | RequestCode::SEND_MESSAGE_V2
            | RequestCode::SEND_BATCH_MESSAGE => {
                let queue_id = match code {
                    RequestCode::SEND_MESSAGE => request
                        .decode_header::<SendMessageRequestHeader>()
                        .map(|header| header.queue_id),
                    _ => request
                        .decode_header::<SendMessageRequestHeaderV2>()
                        .map(|header| header.queue_id),
                }
                .unwrap_or(0);
                let queue_offset = self.next_queue_offset.fetch_add(1, Ordering::Relaxed);
                Reply::Now(success.with_header(&SendMessageResponseHeader {
                    msg_id: self.offset_msg_id(queue_offset),
                    queue_id,
                    queue_offset,
                    msg_region: Some("DefaultRegion".to_string()),
                    ..Default::default()
                }))
            }
            RequestCode::GET_CONSUMER_LIST_BY_GROUP => {
                let group = request
                    .decode_header::<GetConsumerListByGroupRequestHeader>()
                    .map(|header| header.consumer_group)
                    .unwrap_or_default();
                let consumer_id_list = self
                    .consumers
                    .lock()
                    .unwrap()
                    .get(&group)
                    .map(|ids| ids.iter().cloned().collect())
                    .unwrap_or_default();
                let body = ConsumerList { consumer_id_list }.to_json().unwrap();
                Reply::Now(success.with_body(body))
            }
            RequestCode::QUERY_CONSUMER_OFFSET
            | RequestCode::GET_MAX_OFFSET
            | RequestCode::GET_MIN_OFFSET
            | RequestCode::SEARCH_OFFSET_BY_TIMESTAMP => {
                Reply::Now(success.with_header(&OffsetResponseHeader { offset: 0 }))
            }
            RequestCode::PULL_MESSAGE => {
                let not_found = RemotingCommand::response_to(request, ResponseCode::PULL_NOT_FOUND)
                    .with_remark("NO_MESSAGE_IN_QUEUE")
                    .with_header(&PullMessageResponseHeader {
                        suggest_which_broker_id: 0,
                        next_begin_offset: 0,
                        min_offset: 0,
                        max_offset: 0,
                        ..Default::default()
                    });
                Reply::After(PULL_HOLD, not_found)
            }
            other => Reply::Now(RemotingCommand::error_response(
                request,
                ResponseCode::REQUEST_CODE_NOT_SUPPORTED,
                format!(" request type {} not supported", other.0),
            )),
        }
    }

    /// Remembers the client ID of every consumer group named in a heartbeat.
    fn register_heartbeat(&self, body: &[u8]) {
        let heartbeat = match HeartbeatData::from_json(body) {
            Ok(heartbeat) => heartbeat,
            Err(error) => {
                eprintln!("golden server: unreadable heartbeat body ({error})");
                return;
            }
        };
        let mut consumers = self.consumers.lock().unwrap();
        for consumer in &heartbeat.consumer_data_set {
            consumers
                .entry(consumer.group_name.clone())
                .or_default()
                .insert(heartbeat.client_id.clone());
        }
    }

    /// Every topic lives on `broker-a`, which is this server.
    fn route(&self) -> TopicRouteData {
        TopicRouteData {
            broker_datas: vec![BrokerData {
                broker_addrs: BTreeMap::from([(0, self.addr.to_string())]),
                broker_name: BROKER_NAME.to_string(),
                cluster: CLUSTER_NAME.to_string(),
                ..Default::default()
            }],
            queue_datas: vec![QueueData {
                broker_name: BROKER_NAME.to_string(),
                perm: 6,
                read_queue_nums: QUEUE_NUMS,
                write_queue_nums: QUEUE_NUMS,
                topic_sys_flag: 0,
            }],
            ..Default::default()
        }
    }

    /// The broker-style message id of a message stored at `offset` on this server.
    fn offset_msg_id(&self, offset: i64) -> String {
        OffsetMessageId {
            store_host: self.addr,
            commit_log_offset: offset * 256,
        }
        .to_string()
    }

    fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits, bounded, until the client has closed every connection accepted so far.
    async fn wait_all_closed(&self, what: &str) -> bool {
        let mut rx = self.progress.subscribe();
        let closed = tokio::time::timeout(SHUTDOWN_TIMEOUT, rx.wait_for(|p| p.open == 0)).await;
        if closed.is_err() {
            eprintln!(
                "golden server: {what}: {} connection(s) still open after {SHUTDOWN_TIMEOUT:?}",
                self.progress().open
            );
        }
        closed.is_ok()
    }
}

/// Decodes one connection's byte stream (or several whole streams back to
/// back) with a fresh codec. Every byte must belong to a whole frame.
fn decode_all(stream: &[u8]) -> Result<Vec<RemotingCommand>, String> {
    let mut codec = RemotingCodec::default();
    let mut buf = BytesMut::from(stream);
    let mut frames = Vec::new();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => break,
            Err(error) => {
                return Err(format!(
                    "decode error after {} frame(s) at byte {}: {error}",
                    frames.len(),
                    stream.len() - buf.len()
                ));
            }
        }
    }
    if !buf.is_empty() {
        return Err(format!(
            "{} leftover byte(s) after {} frame(s)",
            buf.len(),
            frames.len()
        ));
    }
    Ok(frames)
}

fn count_codes(frames: &[RemotingCommand]) -> BTreeMap<i32, usize> {
    let mut codes = BTreeMap::new();
    for frame in frames {
        *codes.entry(frame.code).or_default() += 1;
    }
    codes
}

/// `NAME(code)xcount` for each request code.
fn format_codes(codes: &BTreeMap<i32, usize>) -> String {
    codes
        .iter()
        .map(|(code, count)| format!("{:?}x{count}", RequestCode(*code)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn has_any(codes: &BTreeMap<i32, usize>, alternatives: &[RequestCode]) -> bool {
    alternatives.iter().any(|code| codes.contains_key(&code.0))
}

/// Reads the typed header, and the JSON or message body, of a request whose
/// code we model, so the captures also pin down the field names and value
/// formats the client uses.
fn check_typed_parts(frame: &RemotingCommand) -> Result<(), String> {
    fn header<H: CommandHeader>(frame: &RemotingCommand) -> Result<H, String> {
        frame
            .decode_header::<H>()
            .map_err(|error| error.to_string())
    }
    /// What every message the producer sends carries.
    fn message_properties(properties: &Properties) -> Result<(), String> {
        let uniq_key = properties
            .get(property::UNIQ_KEY)
            .ok_or("no UNIQ_KEY property")?;
        uniq_key
            .parse::<UniqKey>()
            .map_err(|error| error.to_string())?;
        for key in [property::TAGS, property::KEYS] {
            if !properties.contains_key(key) {
                return Err(format!("no {key} property in {properties:?}"));
            }
        }
        Ok(())
    }
    match frame.request_code() {
        RequestCode::GET_ROUTEINFO_BY_TOPIC => header::<GetRouteInfoRequestHeader>(frame).map(drop),
        RequestCode::SEND_MESSAGE => {
            let header = header::<SendMessageRequestHeader>(frame)?;
            message_properties(&parse_properties(
                header.properties.as_deref().unwrap_or_default(),
            ))
        }
        RequestCode::SEND_MESSAGE_V2 => {
            let header = header::<SendMessageRequestHeaderV2>(frame)?;
            message_properties(&parse_properties(
                header.properties.as_deref().unwrap_or_default(),
            ))
        }
        RequestCode::SEND_BATCH_MESSAGE => {
            header::<SendMessageRequestHeaderV2>(frame)?;
            let entries = decode_batch(&frame.body).map_err(|error| error.to_string())?;
            if entries.is_empty() {
                return Err("empty batch body".to_string());
            }
            entries
                .iter()
                .try_for_each(|entry| message_properties(&entry.properties))
        }
        RequestCode::PULL_MESSAGE => header::<PullMessageRequestHeader>(frame).map(drop),
        RequestCode::QUERY_CONSUMER_OFFSET => {
            header::<QueryConsumerOffsetRequestHeader>(frame).map(drop)
        }
        RequestCode::UPDATE_CONSUMER_OFFSET => {
            header::<UpdateConsumerOffsetRequestHeader>(frame).map(drop)
        }
        RequestCode::GET_MAX_OFFSET => header::<GetMaxOffsetRequestHeader>(frame).map(drop),
        RequestCode::GET_MIN_OFFSET => header::<GetMinOffsetRequestHeader>(frame).map(drop),
        RequestCode::SEARCH_OFFSET_BY_TIMESTAMP => {
            header::<SearchOffsetRequestHeader>(frame).map(drop)
        }
        RequestCode::UNREGISTER_CLIENT => header::<UnregisterClientRequestHeader>(frame).map(drop),
        RequestCode::GET_CONSUMER_LIST_BY_GROUP => {
            header::<GetConsumerListByGroupRequestHeader>(frame).map(drop)
        }
        RequestCode::HEART_BEAT => {
            let heartbeat =
                HeartbeatData::from_json(&frame.body).map_err(|error| error.to_string())?;
            if heartbeat.client_id.is_empty() {
                return Err("heartbeat without clientID".to_string());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks the frames a client sent: all are requests, every modelled header
/// and body reads, and the codes `required` (each inner slice is a set of
/// alternatives) are present. Returns the code counts.
fn check_client_frames(
    name: &str,
    frames: &[RemotingCommand],
    required: &[&[RequestCode]],
) -> BTreeMap<i32, usize> {
    for (index, frame) in frames.iter().enumerate() {
        assert!(
            !frame.is_response(),
            "{name}: frame #{index} ({:?}) is a response, but the client only sends requests",
            frame.request_code()
        );
        if let Err(error) = check_typed_parts(frame) {
            panic!(
                "{name}: frame #{index} ({:?}): {error}; ext fields {:?}, body {:?}",
                frame.request_code(),
                frame.ext_fields,
                String::from_utf8_lossy(&frame.body)
            );
        }
    }
    let codes = count_codes(frames);
    for alternatives in required {
        assert!(
            has_any(&codes, alternatives),
            "{name}: none of the request codes {alternatives:?} was seen; codes: {}",
            format_codes(&codes)
        );
    }
    codes
}

const PRODUCER_REQUIRED: &[&[RequestCode]] = &[
    &[RequestCode::GET_ROUTEINFO_BY_TOPIC],
    &[RequestCode::SEND_MESSAGE_V2, RequestCode::SEND_MESSAGE],
    &[RequestCode::SEND_BATCH_MESSAGE],
];
const CONSUMER_REQUIRED: &[&[RequestCode]] = &[
    &[RequestCode::GET_ROUTEINFO_BY_TOPIC],
    &[RequestCode::HEART_BEAT],
    &[RequestCode::GET_CONSUMER_LIST_BY_GROUP],
    &[RequestCode::PULL_MESSAGE],
];
/// What the server must have seen, over both clients, before they shut down.
const CONVERSATION_REQUIRED: &[&[RequestCode]] = &[
    &[RequestCode::GET_ROUTEINFO_BY_TOPIC],
    &[RequestCode::HEART_BEAT],
    &[RequestCode::SEND_MESSAGE_V2, RequestCode::SEND_MESSAGE],
    &[RequestCode::GET_CONSUMER_LIST_BY_GROUP],
    &[RequestCode::PULL_MESSAGE],
];

/// The client runtime, its owner and its telemetry, torn down together.
struct ClientHarness {
    owner: RuntimeOwner,
    runtime: Arc<ClientRuntime>,
    telemetry: rocketmq_observability::TelemetryRuntimeGuard,
}

impl ClientHarness {
    fn start() -> ClientHarness {
        let mut config = RuntimeConfig {
            thread_name: "golden-client".to_string(),
            worker_threads: 2,
            ..Default::default()
        };
        // Push-consumer listeners run on the metadata-io blocking lane; its
        // default queue depth (16 on two cores) is known to reject under load.
        config.blocking_lane_policies.metadata_io.max_queue_depth = 1024;
        let owner = RuntimeOwner::plan(config).unwrap().build().unwrap();

        // The client logs to stderr, which the test harness does not capture:
        // errors only unless asked (ROCKETMESH_CLIENT_LOG=warn, info, ...).
        let mut telemetry_config = rocketmq_observability::TelemetryBootstrapConfig::default();
        telemetry_config.logging.filter =
            std::env::var("ROCKETMESH_CLIENT_LOG").unwrap_or_else(|_| "error".to_string());
        telemetry_config.logging.console.ansi = false;
        let telemetry = rocketmq_observability::install_global(&telemetry_config).unwrap();

        let runtime = ClientRuntime::try_new(
            owner.root_context().component("golden-client"),
            ClientRuntimeConfig {
                // Twice the default share of the process budget.
                managed_memory_numerator: 1,
                managed_memory_denominator: 2,
                ..Default::default()
            },
            telemetry.handle(),
        )
        .unwrap();
        ClientHarness {
            owner,
            runtime,
            telemetry,
        }
    }

    async fn shutdown(self) {
        let client = self.runtime.shutdown().await;
        if !client.is_healthy() {
            eprintln!("client runtime shutdown: {}", client.to_json());
        }
        let tasks = self.owner.shutdown_tasks().await;
        if !tasks.is_healthy() {
            eprintln!("client runtime owner tasks: {}", tasks.to_json());
        }
        let background = self.owner.shutdown_background();
        if !background.is_healthy() {
            eprintln!("client runtime owner background: {}", background.to_json());
        }
        let telemetry = self.telemetry.shutdown();
        if !telemetry.is_healthy() {
            eprintln!("client telemetry: {}", telemetry.to_json());
        }
    }
}

fn client_config(server: SocketAddr, instance_name: &str) -> ClientConfig {
    ClientConfig::builder()
        .namesrv_addr(server.to_string())
        // Fixed identity: keeps the host's address out of committed captures
        // and gives producer and consumer separate client instances.
        .client_ip("127.0.0.1")
        .instance_name(instance_name)
        .build()
        .unwrap()
}

struct IgnoreMessages;

impl MessageListenerConcurrently for IgnoreMessages {
    fn consume_message(
        &self,
        _msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

async fn bounded<F: std::future::Future>(what: &str, limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// Peer, raw bytes and live decode error of each connection of one side, in accept order.
fn side_streams(server: &Server, side: Side) -> Vec<(SocketAddr, Vec<u8>, Option<String>)> {
    server
        .captures
        .lock()
        .unwrap()
        .iter()
        .filter(|capture| capture.side == side)
        .map(|capture| {
            (
                capture.peer,
                capture.bytes.lock().unwrap().clone(),
                capture.live_error.lock().unwrap().clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_bytes_decode_with_our_codec() {
    let (server, acceptor) = Server::start().await;
    let harness = ClientHarness::start();
    let addr = server.addr;

    // Phase 1: a producer sends a few messages, then shuts down.
    let mut producer = DefaultMQProducer::builder(harness.runtime.clone())
        .client_config(client_config(addr, "golden-producer"))
        .producer_group(PRODUCER_GROUP)
        .send_msg_timeout(3000)
        .build();
    bounded("producer start", CONVERSATION_TIMEOUT, producer.start())
        .await
        .unwrap();
    for index in 0..MESSAGE_COUNT {
        let message = Message::builder()
            .topic(TOPIC)
            .tags(if index % 2 == 0 { "TagA" } else { "TagB" })
            .key(format!("golden-key-{index}"))
            .body_slice(format!("golden message {index}").as_bytes())
            .build()
            .unwrap();
        let result = bounded(
            "producer send",
            CONVERSATION_TIMEOUT,
            producer.send(message),
        )
        .await
        .unwrap_or_else(|error| panic!("send #{index} failed: {error}"))
        .expect("a sync send returns a result");
        assert_eq!(
            result.queue_offset, index as u64,
            "send #{index} came back with another queue offset: {result:?}"
        );
    }
    // A batch always travels as SEND_BATCH_MESSAGE with the one-letter V2
    // header, whatever the client's "smart message" setting.
    let batch = (0..BATCH_SIZE)
        .map(|index| {
            Message::builder()
                .topic(TOPIC)
                .tags("TagBatch")
                .key(format!("golden-batch-key-{index}"))
                .body_slice(format!("golden batch message {index}").as_bytes())
                .build()
                .unwrap()
        })
        .collect::<Vec<_>>();
    let result = bounded(
        "producer batch send",
        CONVERSATION_TIMEOUT,
        producer.send_batch(batch),
    )
    .await
    .unwrap_or_else(|error| panic!("batch send failed: {error}"));
    assert_eq!(
        result.queue_offset, MESSAGE_COUNT as u64,
        "the batch came back with another queue offset: {result:?}"
    );
    bounded("producer shutdown", SHUTDOWN_TIMEOUT, producer.shutdown()).await;
    let producer_closed = server.wait_all_closed("after producer shutdown").await;

    // Phase 2: a push consumer starts and runs until it has heartbeated,
    // rebalanced and pulled.
    *server.side.lock().unwrap() = Side::Consumer;
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(addr, "golden-consumer"))
        .consumer_group(CONSUMER_GROUP)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromLastOffset)
        .build();
    consumer.subscribe(TOPIC, "*").await.unwrap();
    consumer.register_message_listener_concurrently(IgnoreMessages);
    bounded("consumer start", CONVERSATION_TIMEOUT, consumer.start())
        .await
        .unwrap();

    let mut progress = server.progress.subscribe();
    let seen_all = tokio::time::timeout(
        CONVERSATION_TIMEOUT,
        progress.wait_for(|p| {
            CONVERSATION_REQUIRED
                .iter()
                .all(|alternatives| has_any(&p.codes, alternatives))
        }),
    )
    .await
    .is_ok();
    drop(progress);

    bounded("consumer shutdown", SHUTDOWN_TIMEOUT, consumer.shutdown()).await;
    bounded(
        "client runtime shutdown",
        SHUTDOWN_TIMEOUT,
        harness.shutdown(),
    )
    .await;
    let all_closed = server.wait_all_closed("after client shutdown").await;
    server.stop.send_replace(true);
    acceptor.abort();

    let live = server.progress();
    assert!(
        seen_all,
        "the server did not see all of {CONVERSATION_REQUIRED:?} within {CONVERSATION_TIMEOUT:?}; \
         seen: {}",
        format_codes(&live.codes)
    );

    // Re-decode every connection's raw bytes from scratch.
    let mut summary = Vec::new();
    let mut languages = BTreeSet::new();
    let mut versions = BTreeSet::new();
    let mut serialize_types = BTreeSet::new();
    let mut side_bytes: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let mut side_frames: BTreeMap<&str, Vec<RemotingCommand>> = BTreeMap::new();
    for (side, name) in [(Side::Producer, "producer"), (Side::Consumer, "consumer")] {
        for (index, (peer, stream, live_error)) in
            side_streams(&server, side).into_iter().enumerate()
        {
            assert_eq!(
                live_error, None,
                "{name} connection #{index} from {peer}: our codec failed on the live stream"
            );
            let frames = decode_all(&stream)
                .unwrap_or_else(|error| panic!("{name} connection #{index} from {peer}: {error}"));
            // The check has teeth: one byte short must not pass.
            if let Some((_, short)) = stream.split_last() {
                assert!(
                    decode_all(short).is_err(),
                    "a truncated stream decoded cleanly"
                );
            }
            for frame in &frames {
                languages.insert(format!("{:?}", frame.language));
                versions.insert(frame.version);
                serialize_types.insert(format!("{:?}", frame.serialize_type));
            }
            summary.push(format!(
                "  {name} conn #{index}: {} bytes, {} frames: {}",
                stream.len(),
                frames.len(),
                format_codes(&count_codes(&frames))
            ));
            side_bytes
                .entry(name)
                .or_default()
                .extend_from_slice(&stream);
            side_frames.entry(name).or_default().extend(frames);
        }
    }
    let producer_frames = side_frames.remove("producer").unwrap_or_default();
    let consumer_frames = side_frames.remove("consumer").unwrap_or_default();
    let producer_codes = check_client_frames("producer", &producer_frames, PRODUCER_REQUIRED);
    let consumer_codes = check_client_frames("consumer", &consumer_frames, CONSUMER_REQUIRED);
    let sends: usize = [RequestCode::SEND_MESSAGE_V2, RequestCode::SEND_MESSAGE]
        .iter()
        .filter_map(|code| producer_codes.get(&code.0))
        .sum();
    assert_eq!(sends, MESSAGE_COUNT, "one send request per single message");
    assert_eq!(
        producer_codes.get(&RequestCode::SEND_BATCH_MESSAGE.0),
        Some(&1),
        "one batch send request"
    );

    // What the server decoded live must be what the re-decode found.
    let mut redecoded = producer_codes.clone();
    for (code, count) in &consumer_codes {
        *redecoded.entry(*code).or_default() += count;
    }
    // (Only comparable when the client closed every connection: otherwise the
    // server stopped reading at an arbitrary point.)
    if all_closed {
        assert_eq!(
            redecoded, live.codes,
            "live decode and re-decode of the captures disagree"
        );
    }

    println!("golden capture against rocketmq-client-rust 1.0.0 on {addr}:");
    for line in &summary {
        println!("{line}");
    }
    println!("  producer codes: {}", format_codes(&producer_codes));
    println!("  consumer codes: {}", format_codes(&consumer_codes));
    println!("  languages {languages:?}, versions {versions:?}, header types {serialize_types:?}");
    println!(
        "  connections closed by the client: after producer {producer_closed}, at end {all_closed}"
    );

    if std::env::var("ROCKETMESH_WRITE_CAPTURES").as_deref() == Ok("1") {
        for (name, path) in [
            ("producer", PRODUCER_CAPTURE),
            ("consumer", CONSUMER_CAPTURE),
        ] {
            let path = manifest_path(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let bytes = side_bytes.remove(name).unwrap_or_default();
            std::fs::write(&path, &bytes).unwrap();
            println!("  wrote {} ({} bytes)", path.display(), bytes.len());
        }
    }
}

fn manifest_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The committed captures (written by the test above with
/// `ROCKETMESH_WRITE_CAPTURES=1`) must keep decoding as the codec evolves.
#[test]
fn committed_captures_decode() {
    for (path, required) in [
        (PRODUCER_CAPTURE, PRODUCER_REQUIRED),
        (CONSUMER_CAPTURE, CONSUMER_REQUIRED),
    ] {
        let path = manifest_path(path);
        let Ok(bytes) = std::fs::read(&path) else {
            println!("{} not present, skipped", path.display());
            continue;
        };
        assert!(!bytes.is_empty(), "{} is empty", path.display());
        let frames =
            decode_all(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let codes = check_client_frames(&path.display().to_string(), &frames, required);
        println!(
            "{}: {} bytes, {} frames: {}",
            path.display(),
            bytes.len(),
            frames.len(),
            format_codes(&codes)
        );
    }
}
