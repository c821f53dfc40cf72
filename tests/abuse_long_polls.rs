//! Long polls parked through the sidecar must not stall other traffic to the same broker: 2,100
//! ordinary long-polling pulls from three connections (the probe that found the stall), then
//! sends from another client, which must all succeed while every poll is still parked. A client
//! that goes away gives its parked slots back.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::RunningBroker;
use common::raw::RawClient;
use futures::SinkExt;
use rocketmesh::proxy;
use rocketmesh::remoting::header::{GetMaxOffsetRequestHeader, PullMessageRequestHeader};
use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, ResponseCode};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const TOPIC: &str = "ParkedTopic";
const GROUP: &str = "parked-group";
const CONNECTIONS: usize = 3;
const POLLS_PER_CONNECTION: usize = 700;
/// Longer than the whole test, so no poll is answered by its own timeout while it runs.
const SUSPEND_MS: i64 = 60_000;
const SENDS: usize = 200;
const WAIT: Duration = Duration::from_secs(30);

/// The sum of max offsets of queues 0..4, or each queue's.
async fn max_offsets(target: SocketAddr) -> Vec<i64> {
    let mut client = RawClient::connect(target).await;
    let mut offsets = Vec::new();
    for queue_id in 0..4 {
        let answer = client
            .call(
                RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 0).with_header(
                    &GetMaxOffsetRequestHeader {
                        topic: TOPIC.into(),
                        queue_id,
                        ..Default::default()
                    },
                ),
            )
            .await;
        assert_eq!(answer.code, ResponseCode::SUCCESS.0, "{:?}", answer.remark);
        offsets.push(
            answer
                .ext("offset")
                .and_then(|offset| offset.parse().ok())
                .expect("an offset"),
        );
    }
    offsets
}

fn long_poll(queue_id: i32, offset: i64) -> RemotingCommand {
    RemotingCommand::request(RequestCode::PULL_MESSAGE, 0).with_header(&PullMessageRequestHeader {
        consumer_group: GROUP.into(),
        topic: TOPIC.into(),
        queue_id,
        queue_offset: offset,
        max_msg_nums: 32,
        // Suspend with the subscription inline, no commit: a pull consumer at the queue's end.
        sys_flag: 0x2 | 0x4,
        subscription: Some("*".into()),
        expression_type: Some("TAG".into()),
        suspend_timeout_millis: SUSPEND_MS,
        sub_version: 0,
        ..Default::default()
    })
}

/// Waits until `parked` reports `want`, checking every few milliseconds within [`WAIT`].
async fn parked_reaches(parked: impl Fn() -> usize, want: usize) {
    let result = tokio::time::timeout(WAIT, async {
        while parked() != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "parked long polls reach {want} (now {})",
        parked()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_long_polls_leave_sends_unaffected_and_free_their_slots_when_clients_leave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker =
        RunningBroker::start_with(dir.path(), |config| config.broker_name = "broker-a".into())
            .await;
    let sidecar = proxy::start(common::sidecar_config(&[("broker-a", broker.addr)], ""))
        .await
        .expect("sidecar");
    let address = sidecar.listeners[0];
    // The topic exists once something was sent to it.
    common::send_all(address, "parked-seed", "seed", TOPIC, &["seed".to_owned()]).await;
    let ends = max_offsets(broker.addr).await;

    let mut pollers = Vec::new();
    for _ in 0..CONNECTIONS {
        let socket = TcpStream::connect(address).await.expect("connect");
        let mut framed = Framed::new(socket, RemotingCodec::default());
        for index in 0..POLLS_PER_CONNECTION {
            let queue_id = (index % 4) as i32;
            let mut request = long_poll(queue_id, ends[queue_id as usize]);
            request.opaque = index as i32 + 1;
            framed.feed(request).await.expect("send a long poll");
        }
        SinkExt::<RemotingCommand>::flush(&mut framed)
            .await
            .expect("flush");
        pollers.push(framed);
    }
    let pool = sidecar
        .proxy
        .upstreams
        .existing(broker.addr)
        .expect("the sidecar has a pool for the broker");
    let total = CONNECTIONS * POLLS_PER_CONNECTION;
    parked_reaches(|| pool.parked(), total).await;

    let bodies: Vec<String> = (0..SENDS).map(|index| format!("send-{index}")).collect();
    tokio::time::timeout(
        WAIT,
        common::send_all(
            address,
            "parked-sender",
            "sender",
            "SendsBesidePolls",
            &bodies,
        ),
    )
    .await
    .expect("every send is answered while the polls are parked");
    assert_eq!(
        pool.parked(),
        total,
        "the sends finished while every long poll was still parked"
    );
    assert_eq!(
        common::messages_on(broker.addr, "SendsBesidePolls").await,
        SENDS as i64
    );
    println!("{SENDS} sends succeeded beside {total} parked long polls");

    drop(pollers);
    parked_reaches(|| pool.parked(), 0).await;
    println!("all {total} parked slots freed once their clients closed");
    drop(sidecar);
    broker.stop().await;
}
