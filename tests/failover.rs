//! Failover through the sidecar: three `rocketmesh broker` processes in two priorities behind the
//! sidecar, a real client sending steadily; the priority-0 broker is SIGKILLed mid-load. The client
//! must see no failed send, traffic must move to the priority-1 brokers within a second, and after
//! the broker restarts its weight climbs back and it takes traffic again.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmesh::proxy::{self, SidecarConfig};
use rocketmesh::remoting::message::OffsetMessageId;
use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::message_single::Message;

mod common;
use common::{STEP_TIMEOUT, client_config, harness};

const TOPIC: &str = "FailoverTopic";

/// A free loopback port (bound and released), so a restarted broker can come back on it.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Starts `rocketmesh broker` named `name` at `addr` and waits until it listens.
fn start_broker(data_dir: &Path, name: &str, addr: SocketAddr) -> Child {
    let listen = addr.to_string();
    common::start_broker_process(data_dir, &["--broker-name", name, "--listen", &listen]).0
}

/// Waits until `done`, polling: the sender's progress is only visible in its shared log.
async fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// (when the send finished, which broker stored it) for every send, in order.
type Log = Arc<Mutex<Vec<(Instant, u16)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_0_broker_dies_and_comes_back_without_a_failed_send() {
    let data = tempfile::tempdir().expect("tempdir");
    let addrs = [free_port(), free_port(), free_port()];
    let names = ["broker-a", "broker-b", "broker-c"];
    let mut brokers: Vec<Child> = names
        .iter()
        .zip(addrs)
        .map(|(name, addr)| start_broker(&data.path().join(name), name, addr))
        .collect();
    let endpoint = |index: usize, priority: u32| {
        format!(
            "      - address: \"{}\"\n        metadata: {{ broker_name: {}, cluster_name: DefaultCluster, priority: {priority} }}\n",
            addrs[index], names[index]
        )
    };
    let yaml = format!(
        "listeners: [{{ address: \"127.0.0.1:0\" }}]\n\
         admin: {{ address: null }}\n\
         routes:\n\
         \x20 - match: {{ topic: {{ prefix: \"\" }} }}\n\
         \x20   route: {{ cluster: brokers }}\n\
         clusters:\n\
         \x20 - name: brokers\n\
         \x20   connect_timeout_ms: 500\n\
         \x20   request_timeout_ms: 3000\n\
         \x20   balancer: {{ health_check_interval_ms: 200, outlier_base_ejection_ms: 1000 }}\n\
         \x20   endpoints:\n{}{}{}",
        endpoint(0, 0),
        endpoint(1, 1),
        endpoint(2, 1),
    );
    let sidecar = proxy::start(SidecarConfig::parse(&yaml).expect("config"))
        .await
        .expect("sidecar");
    let mesh = sidecar.listeners[0];

    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(mesh, "failover-producer"))
        .producer_group("failover_group")
        // The client must not hide failures by retrying itself: failover is the sidecar's job.
        .retry_times_when_send_failed(0)
        .send_msg_timeout(5_000)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    let log: Log = Arc::default();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (log, failures, stop) = (log.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            let mut index = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                index += 1;
                let message = Message::builder()
                    .topic(TOPIC)
                    .body_slice(format!("steady-{index}").as_bytes())
                    .build()
                    .expect("message");
                match tokio::time::timeout(STEP_TIMEOUT, producer.send(message)).await {
                    Ok(Ok(Some(result))) => {
                        let port = result
                            .offset_msg_id
                            .as_deref()
                            .and_then(|id| id.parse::<OffsetMessageId>().ok())
                            .map_or(0, |id| id.store_host.port());
                        log.lock().expect("log").push((Instant::now(), port));
                    }
                    other => failures
                        .lock()
                        .expect("failures")
                        .push(format!("{other:?}")),
                }
            }
            producer.shutdown().await;
        })
    };
    let on = |port: u16, since: Instant| {
        log.lock()
            .expect("log")
            .iter()
            .filter(|(at, stored)| *at >= since && *stored == port)
            .count()
    };
    let started = Instant::now();
    wait_until("broker-a took 300 sends", STEP_TIMEOUT, || {
        on(addrs[0].port(), started) >= 300
    })
    .await;
    assert_eq!(
        on(addrs[1].port(), started) + on(addrs[2].port(), started),
        0,
        "a healthy priority 0 takes all traffic"
    );

    // SIGKILL the priority-0 broker mid-load.
    brokers[0].kill().expect("kill broker-a");
    let _ = brokers[0].wait();
    let killed = Instant::now();
    let moved = |log: &Log| {
        log.lock()
            .expect("log")
            .iter()
            .find(|(at, port)| {
                *at >= killed && (*port == addrs[1].port() || *port == addrs[2].port())
            })
            .map(|(at, _)| *at - killed)
    };
    wait_until("traffic reached priority 1", STEP_TIMEOUT, || {
        moved(&log).is_some()
    })
    .await;
    let moved_after = moved(&log).expect("moved");
    wait_until("200 sends after the kill", STEP_TIMEOUT, || {
        on(addrs[1].port(), killed) + on(addrs[2].port(), killed) >= 200
    })
    .await;
    let weight_of_a = || {
        sidecar
            .proxy
            .cluster("brokers")
            .expect("cluster")
            .balancer
            .endpoints()
            .into_iter()
            .find(|view| view.key == addrs[0])
            .map_or(-1.0, |view| view.current_weight)
    };
    let down_weight = weight_of_a();

    // Restart it on the same address: health checks bring its weight back, and it takes traffic.
    brokers[0] = start_broker(&data.path().join(names[0]), names[0], addrs[0]);
    let restarted = Instant::now();
    wait_until("broker-a took traffic again", STEP_TIMEOUT, || {
        on(addrs[0].port(), restarted) >= 20
    })
    .await;
    let back_after = restarted.elapsed();
    let weight_back = weight_of_a();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout(STEP_TIMEOUT, sender)
        .await
        .expect("in time")
        .expect("sender");

    let failed = failures.lock().expect("failures").clone();
    let sent = log.lock().expect("log").len();
    println!(
        "{sent} sends, {} failed; after the SIGKILL traffic reached priority 1 in {moved_after:?} \
         (broker-a weight {down_weight}); after the restart broker-a took traffic again in \
         {back_after:?}, weight {weight_back}",
        failed.len()
    );
    assert!(failed.is_empty(), "failed sends: {failed:?}");
    assert!(
        moved_after <= Duration::from_secs(1),
        "traffic moved after {moved_after:?}"
    );
    assert!(
        weight_back > down_weight,
        "weight {down_weight} -> {weight_back}"
    );
    tokio::time::timeout(STEP_TIMEOUT, sidecar.shutdown())
        .await
        .expect("sidecar stops");
    for broker in &mut brokers {
        let _ = broker.kill();
        let _ = broker.wait();
    }
}
