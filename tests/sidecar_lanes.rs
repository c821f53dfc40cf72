//! Sends on a client connection's own upstream connections ("lanes"): what a client hears when the
//! broker stays silent or answers busy. The brokers are stand-ins on loopback that answer every
//! request with one fixed code (or never), so each failure happens on every attempt.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rocketmesh::proxy::{self, SidecarConfig};
use rocketmesh::remoting::header::SendMessageRequestHeaderV2;
use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, ResponseCode};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

mod common;
use common::raw::RawClient;

/// A broker stand-in: answers each request with `code` (never, for `None`); counts the sends.
async fn stand_in(code: Option<ResponseCode>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let sends = Arc::new(AtomicUsize::new(0));
    let counted = sends.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(socket, RemotingCodec::default());
                while let Some(Ok(request)) = framed.next().await {
                    if request.code == RequestCode::SEND_MESSAGE_V2.0 {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    let answer = code.map(|code| RemotingCommand::response_to(&request, code));
                    if let Some(answer) = answer
                        && framed.send(answer).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    (address, sends)
}

async fn sidecar(brokers: &[(&str, SocketAddr)], request_timeout_ms: u64) -> proxy::RunningSidecar {
    let yaml = common::sidecar_yaml_with_cluster(
        brokers,
        "",
        "",
        &format!("    request_timeout_ms: {request_timeout_ms}\n"),
    );
    proxy::start(SidecarConfig::parse(&yaml).expect("config"))
        .await
        .expect("sidecar starts")
}

fn send(queue_id: i32) -> RemotingCommand {
    let header = SendMessageRequestHeaderV2 {
        producer_group: "LaneProducer".into(),
        topic: "LaneTopic".into(),
        default_topic: "TBW102".into(),
        default_topic_queue_nums: 4,
        queue_id,
        born_timestamp: 1_733_462_400_000,
        ..Default::default()
    };
    RemotingCommand::request(RequestCode::SEND_MESSAGE_V2, 0)
        .with_header(&header)
        .with_body(&b"lane"[..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_silent_broker_times_out_naming_the_broker() {
    let (silent, sends) = stand_in(None).await;
    let sidecar = sidecar(&[("broker-silent", silent)], 300).await;
    let mut client = RawClient::connect(sidecar.listeners[0]).await;
    let started = Instant::now();
    let answer = client.call(send(0)).await;
    let waited = started.elapsed();
    assert_eq!(answer.code, ResponseCode::SYSTEM_ERROR.0, "{answer:?}");
    let remark = answer.remark.clone().unwrap_or_default();
    assert!(
        remark.contains("broker-silent") && remark.contains("no response"),
        "{remark}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    assert_eq!(
        sends.load(Ordering::SeqCst),
        1,
        "one attempt reached the broker"
    );
    // The connection still serves: a second send times out the same way.
    let again = client.call(send(1)).await;
    assert_eq!(again.code, ResponseCode::SYSTEM_ERROR.0, "{again:?}");
    println!("silent broker: SYSTEM_ERROR after {waited:?}: {remark}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_answers_are_retried_on_another_broker() {
    let (busy, busy_sends) = stand_in(Some(ResponseCode::SYSTEM_BUSY)).await;
    let (good, good_sends) = stand_in(Some(ResponseCode::SUCCESS)).await;
    let sidecar = sidecar(&[("broker-busy", busy), ("broker-good", good)], 3000).await;
    let mut client = RawClient::connect(sidecar.listeners[0]).await;
    const SENDS: usize = 40;
    for queue in 0..SENDS {
        let answer = client.call(send(queue as i32 % 4)).await;
        assert_eq!(
            answer.code,
            ResponseCode::SUCCESS.0,
            "send {queue}: {answer:?}"
        );
    }
    let (busy_seen, good_seen) = (
        busy_sends.load(Ordering::SeqCst),
        good_sends.load(Ordering::SeqCst),
    );
    println!("{SENDS} sends: {busy_seen} reached the busy broker, {good_seen} the good one");
    assert_eq!(
        good_seen, SENDS,
        "every send was stored once, on the good broker"
    );
    assert!(
        busy_seen >= 1,
        "the busy broker was tried (and its answer retried)"
    );
    sidecar.shutdown().await;
}

/// A sidecar with clusters `first` (broker A) and `second` (broker B), each taking at most
/// `in_flight` sends at a time, and every topic routed to `to`.
fn two_cluster_yaml(a: SocketAddr, b: SocketAddr, in_flight: usize, to: &str) -> String {
    let cluster = |name: &str, broker: &str, address: SocketAddr| {
        format!(
            "  - name: {name}\n    max_in_flight_per_endpoint: {in_flight}\n    endpoints:\n      - {{ address: \"{address}\", metadata: {{ broker_name: {broker}, cluster_name: DefaultCluster }} }}\n"
        )
    };
    format!(
        "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: null }}\nroutes:\n  - {{ match: {{ topic: {{ prefix: \"\" }} }}, route: {{ cluster: {to} }} }}\nclusters:\n{}{}",
        cluster("first", "broker-a", a),
        cluster("second", "broker-b", b)
    )
}

/// Sends `count` sends back to back on `client`'s connection, then reads every answer.
async fn pipelined_sends(
    client: &mut Framed<tokio::net::TcpStream, RemotingCodec>,
    count: i32,
) -> Vec<RemotingCommand> {
    for opaque in 1..=count {
        let mut request = send(opaque % 4);
        request.opaque = opaque;
        client.feed(request).await.expect("send");
    }
    SinkExt::<RemotingCommand>::flush(client)
        .await
        .expect("flush");
    let mut answers = Vec::new();
    while answers.len() < count as usize {
        let answer = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .expect("answers in time")
            .expect("the connection stays open")
            .expect("a well-formed answer");
        answers.push(answer);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lane_sends_give_back_their_slots_count_once_and_follow_a_new_route() {
    let (a, a_sends) = stand_in(Some(ResponseCode::SUCCESS)).await;
    let (b, b_sends) = stand_in(Some(ResponseCode::SUCCESS)).await;
    let config = |to| SidecarConfig::parse(&two_cluster_yaml(a, b, 4, to)).expect("config");
    let sidecar = proxy::start(config("first")).await.expect("sidecar starts");
    let socket = tokio::net::TcpStream::connect(sidecar.listeners[0])
        .await
        .expect("connect");
    let mut client = Framed::new(socket, RemotingCodec::default());

    // Ten times more sends in flight than broker A's limit: the lanes take what fits, the rest
    // wait for slots; every one is answered, and every slot comes back.
    const FIRST: i32 = 40;
    let answers = pipelined_sends(&mut client, FIRST).await;
    let mut opaques: Vec<i32> = answers.iter().map(|answer| answer.opaque).collect();
    opaques.sort_unstable();
    assert_eq!(
        opaques,
        (1..=FIRST).collect::<Vec<_>>(),
        "each send answered once"
    );
    assert!(
        answers
            .iter()
            .all(|answer| answer.code == ResponseCode::SUCCESS.0),
        "{answers:?}"
    );
    assert_eq!(a_sends.load(Ordering::SeqCst), FIRST as usize);
    let pool = sidecar.proxy.upstreams.existing(a).expect("a pool to A");
    let deadline = Instant::now() + Duration::from_secs(5);
    while (pool.in_flight() > 0 || sidecar.proxy.stats.requests_active() > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.in_flight(), 0, "every endpoint slot was given back");
    assert_eq!(sidecar.proxy.stats.requests_active(), 0);
    let counted = |sidecar: &proxy::RunningSidecar| {
        sidecar
            .proxy
            .stats
            .messages_in_by_topic()
            .into_iter()
            .find(|(topic, _)| topic == "LaneTopic")
            .map_or(0, |(_, count)| count)
    };
    assert_eq!(
        counted(&sidecar),
        FIRST as u64,
        "each stored send counted once"
    );

    // A new route table: the same connection's next sends follow it at once.
    sidecar.proxy.reload(config("second")).expect("reload");
    const SECOND: i32 = 12;
    let answers = pipelined_sends(&mut client, SECOND).await;
    assert!(
        answers
            .iter()
            .all(|answer| answer.code == ResponseCode::SUCCESS.0),
        "{answers:?}"
    );
    assert_eq!(
        b_sends.load(Ordering::SeqCst),
        SECOND as usize,
        "all on B now"
    );
    assert_eq!(
        a_sends.load(Ordering::SeqCst),
        FIRST as usize,
        "none more on A"
    );
    assert_eq!(counted(&sidecar), (FIRST + SECOND) as u64);
    println!(
        "{FIRST} sends through a limit of 4 on A, then {SECOND} on B after the reload; slots all back"
    );
    sidecar.shutdown().await;
}
