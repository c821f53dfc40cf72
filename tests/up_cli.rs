//! `rocketmesh up` as a user runs it: the binary starts two brokers and a sidecar, prints the
//! address apps use, a real client produces and consumes through it, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use rocketmq_client_rust::{DefaultMQPushConsumer, MQPushConsumer};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;

mod common;
use common::{Collector, STEP_TIMEOUT, client_config, harness, send_all};

const ADDRESS_LINE: &str = "nameserver address for apps: ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_a_real_client_and_stops_on_sigterm() {
    const MESSAGES: usize = 200;
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rocketmesh up");
    let stdout = child.stdout.take().expect("stdout");
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(address) = line.trim().strip_prefix(ADDRESS_LINE) {
                let _ = found.send(address.to_owned());
            }
        }
    });
    let address: SocketAddr = address
        .recv_timeout(STEP_TIMEOUT)
        .expect("up prints the address apps use")
        .parse()
        .expect("a socket address");

    let bodies: Vec<String> = (0..MESSAGES)
        .map(|index| format!("up-{index:03}"))
        .collect();
    send_all(address, "up-producer", "up_producer", "UpTopic", &bodies).await;

    let collector = Collector::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config(address, "up-consumer"))
        .consumer_group("up_consumer")
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe("UpTopic", "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(collector.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    collector.wait_for(MESSAGES, STEP_TIMEOUT).await;
    consumer.shutdown().await;

    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(terminated.success());
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "up did not stop after SIGTERM"
        );
        // A child's exit is not an event a test can await without a process-aware runtime.
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "up exited with {status}");
    println!(
        "`rocketmesh up` at {address}: {MESSAGES} messages produced and consumed; SIGTERM stopped it ({status})"
    );
}
