//! The sidecar refuses a send whose body is over its configured message size itself, with a
//! clear code and remark, instead of carrying megabytes to a broker that would refuse them.

mod common;

use common::RunningBroker;
use common::raw::RawClient;
use rocketmesh::proxy::{self, SidecarConfig};
use rocketmesh::remoting::header::SendMessageRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};

const LIMIT: usize = 1024;
const TOPIC: &str = "SizedTopic";

fn send(size: usize) -> RemotingCommand {
    RemotingCommand::request(RequestCode::SEND_MESSAGE, 0)
        .with_header(&SendMessageRequestHeader {
            producer_group: "sized_producer".into(),
            topic: TOPIC.into(),
            default_topic: "TBW102".into(),
            default_topic_queue_nums: 4,
            queue_id: 0,
            ..Default::default()
        })
        .with_body(vec![b'x'; size])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_sidecars_message_size_are_refused_before_any_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker =
        RunningBroker::start_with(dir.path(), |config| config.broker_name = "broker-a".into())
            .await;
    let yaml = common::sidecar_yaml(
        &[("broker-a", broker.addr)],
        "",
        &format!("limits: {{ max_message_size: {LIMIT} }}"),
    );
    let sidecar = proxy::start(SidecarConfig::parse(&yaml).expect("config"))
        .await
        .expect("sidecar");
    let mut client = RawClient::connect(sidecar.listeners[0]).await;

    let refused = client.call(send(LIMIT + 1)).await;
    assert_eq!(refused.code, ResponseCode::MESSAGE_ILLEGAL.0);
    let remark = refused.remark.unwrap_or_default();
    assert!(
        remark.contains("1025 bytes") && remark.contains("limits.max_message_size"),
        "{remark}"
    );
    assert_eq!(
        common::messages_on(broker.addr, TOPIC).await,
        0,
        "nothing reached the broker"
    );

    // The same connection carries on, and a body at the limit goes through.
    let accepted = client.call(send(LIMIT)).await;
    assert_eq!(
        accepted.code,
        ResponseCode::SUCCESS.0,
        "{:?}",
        accepted.remark
    );
    assert_eq!(common::messages_on(broker.addr, TOPIC).await, 1);
    drop(sidecar);
    broker.stop().await;
}
