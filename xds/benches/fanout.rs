//! Fan-out: one resource change pushed to N delta ADS subscribers.
//!
//! N in-process tonic clients on loopback, each with its own connection, stream and node id,
//! subscribe to one TopicRoute and ACK every response as a real client would. Each round
//! changes that resource once and measures:
//! - **last ACK**: from the store change to the moment the server has processed the N-th ACK
//!   (the harness's ACK counter, polled every ~50 µs from a separate thread);
//! - **delivery** p50/p99/max: store change → response received by each client;
//! - **memory per stream**: RSS growth while the N streams are opened and first answered,
//!   divided by N. It includes the in-process clients (their connections, HTTP/2 buffers and
//!   tasks) as well as the server's side, so it overstates the server's cost.
//!
//! Then a separate phase measures the **server's own memory per stream**: the bench re-executes
//! itself with `FANOUT_ROLE=server`; that child serves the same Store + Harness on 127.0.0.1:0,
//! prints its address and answers `metrics` lines on stdin with its harness counters. The parent
//! reads the child's VmRSS (`/proc/<pid>/status`) once the child is idle, opens the N streams
//! from its own process, waits until every client got its first response and the child has
//! processed the N ACKs, and reads VmRSS again: (after − before) / N. The child is killed when
//! the phase ends (and exits by itself when its stdin closes). The timing rounds above stay in
//! one process, measured against the in-process harness's ACK counter.
//!
//! `cargo bench -p rocketmesh-xds --bench fanout` runs N=1000 (`FANOUT_N` and `FANOUT_ROUNDS`
//! override); without `--bench` (as `cargo test --all-targets` runs it) a tiny N=20 checks that
//! the push reached everyone.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rocketmesh_xds::envoy_types::pb::envoy::config::core::v3::Node;
use rocketmesh_xds::envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use rocketmesh_xds::harness::Harness;
use rocketmesh_xds::server::{XdsServer, serve};
use rocketmesh_xds::spec::TopicRouteSpec;
use rocketmesh_xds::store::Store;
use rocketmesh_xds::types::TOPIC_ROUTE;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

const TOPIC: &str = "orders";
/// Bound on any wait; a round that takes longer has failed.
const WAIT: Duration = Duration::from_secs(60);
/// Clients connecting at once (the listen backlog is finite).
const CONNECTING_AT_ONCE: usize = 64;
/// Set (to `server`) in the environment of the child process that serves the memory phase.
const ROLE_VAR: &str = "FANOUT_ROLE";

/// A response as one client saw it.
struct Delivery {
    client: usize,
    version: String,
    at: Instant,
}

fn route(generation: u32) -> rocketmesh_xds::VersionedResource {
    TopicRouteSpec {
        topic: TOPIC.into(),
        cluster: format!("broker-cluster-{generation}"),
        ..Default::default()
    }
    .build()
    .unwrap()
}

/// VmRSS of a process (`self` or a pid), in KiB; 0 if unreadable.
fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// One subscriber: its own connection and stream; ACKs every response.
async fn client(
    id: usize,
    url: String,
    deliveries: mpsc::UnboundedSender<Delivery>,
    connecting: Arc<Semaphore>,
) {
    let permit = connecting.acquire_owned().await.unwrap();
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("client {id}: connect: {e} (open file limit?)"));
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
    let node = Node {
        id: format!("sidecar-{id}"),
        ..Default::default()
    };
    let (tx, requests) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: TOPIC_ROUTE.into(),
        resource_names_subscribe: vec![TOPIC.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = grpc
        .delta_aggregated_resources(ReceiverStream::new(requests))
        .await
        .unwrap_or_else(|e| panic!("client {id}: open stream: {e}"))
        .into_inner();
    drop(permit);
    while let Ok(Some(resp)) = responses.message().await {
        let at = Instant::now();
        let version = resp
            .resources
            .first()
            .map(|r| r.version.clone())
            .unwrap_or_default();
        // ACK as Envoy does: node, type and nonce, nothing else.
        let ack = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        let _ = deliveries.send(Delivery {
            client: id,
            version,
            at,
        });
    }
}

/// Waits until the server has processed `target` ACKs in all; returns when it saw that.
/// Polls from its own thread so the runtime's workers are not taken.
fn ack_watch(
    harness: Arc<Harness>,
    target: u64,
    give_up: Arc<AtomicBool>,
) -> oneshot::Receiver<Instant> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        while !give_up.load(Ordering::Relaxed) {
            if harness.metrics().acks >= target {
                let _ = tx.send(Instant::now());
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    rx
}

struct Round {
    last_ack: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn run(n: usize, rounds: u32) -> (u64, Vec<Round>) {
    let store = Arc::new(Store::new());
    let harness = Arc::new(Harness::default());
    store.upsert(route(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        XdsServer::new(store.clone(), harness.clone()),
        async {
            let _ = stopped.await;
        },
    ));

    // Open the N streams; each gets the initial version and ACKs it.
    let rss_before = rss_kib("self");
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let clients: Vec<_> = (0..n)
        .map(|id| {
            tokio::spawn(client(
                id,
                url.clone(),
                deliveries_tx.clone(),
                connecting.clone(),
            ))
        })
        .collect();
    drop(deliveries_tx);
    let opened = Instant::now();
    let initial = store.get(TOPIC_ROUTE, TOPIC).unwrap().version.clone();
    let mut got = 0;
    while got < n {
        let d = tokio::time::timeout(WAIT, deliveries.recv())
            .await
            .expect("streams did not open in time")
            .expect("every client ended");
        assert_eq!(d.version, initial);
        got += 1;
    }
    let give_up = Arc::new(AtomicBool::new(false));
    tokio::time::timeout(WAIT, ack_watch(harness.clone(), n as u64, give_up.clone()))
        .await
        .expect("initial ACKs did not arrive")
        .unwrap();
    let rss_after = rss_kib("self");
    eprintln!(
        "opened {n} streams in {:?}; RSS {rss_before} KiB -> {rss_after} KiB",
        opened.elapsed()
    );
    let per_stream = (rss_after.saturating_sub(rss_before) * 1024) / n as u64;

    let mut results = Vec::new();
    for generation in 1..=rounds {
        let acks_before = harness.metrics().acks;
        let resource = route(generation);
        let version = resource.version.clone();
        let watch = ack_watch(harness.clone(), acks_before + n as u64, give_up.clone());
        let changed = Instant::now();
        assert!(store.upsert(resource));
        let mut seen = vec![false; n];
        let mut delivery = Vec::with_capacity(n);
        while delivery.len() < n {
            let d = tokio::time::timeout(WAIT, deliveries.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "round {generation}: {} of {n} clients got the push",
                        delivery.len()
                    )
                })
                .expect("every client ended");
            assert_eq!(
                d.version, version,
                "client {} got another version",
                d.client
            );
            assert!(!seen[d.client], "client {} got the push twice", d.client);
            seen[d.client] = true;
            delivery.push(d.at.duration_since(changed));
        }
        let last_ack = tokio::time::timeout(WAIT, watch)
            .await
            .unwrap_or_else(|_| panic!("round {generation}: the server did not get all ACKs"))
            .unwrap()
            .duration_since(changed);
        delivery.sort_unstable();
        let round = Round {
            last_ack,
            p50: percentile(&delivery, 0.50),
            p99: percentile(&delivery, 0.99),
            max: percentile(&delivery, 1.0),
        };
        eprintln!(
            "round {generation}: N={n} last ACK at the server {:?}; delivery p50 {:?} p99 {:?} max {:?}",
            round.last_ack, round.p50, round.p99, round.max
        );
        results.push(round);
        // No response beyond the one per client.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(deliveries.try_recv().is_err(), "an extra response was sent");
        let m = harness.metrics();
        assert_eq!(m.nacks, 0);
        assert_eq!(m.acks, acks_before + n as u64);
    }
    give_up.store(true, Ordering::Relaxed);
    let open = harness
        .stream_infos()
        .iter()
        .filter(|s| s.closed_ms.is_none())
        .count();
    assert_eq!(open, n, "one server stream per client");
    let _ = stop.send(());
    tokio::time::timeout(WAIT, served)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    for c in clients {
        c.abort();
    }
    (per_stream, results)
}

/// The server's counters as the child reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChildMetrics {
    acks: u64,
    nacks: u64,
    open_streams: u64,
}

/// The bench binary run as a server in its own process (for its memory alone). Killed on drop.
struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    url: String,
}

impl ServerProcess {
    fn spawn() -> Self {
        let exe = std::env::current_exe().expect("path of the bench binary");
        let mut child = Command::new(exe)
            .env(ROLE_VAR, "server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the server process");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut server = Self {
            child,
            stdin,
            stdout,
            url: String::new(),
        };
        let line = server.read_line();
        let addr = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("server process said {line:?}"));
        server.url = format!("http://{addr}");
        server
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .expect("read the server process");
        assert!(read > 0, "the server process ended");
        line.trim_end().to_owned()
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(&self.child.id().to_string())
    }

    /// Asks the child for its harness counters (it answers from a thread of its own).
    fn metrics(&mut self) -> ChildMetrics {
        writeln!(self.stdin, "metrics").expect("write to the server process");
        let line = self.read_line();
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .skip_while(|w| *w != name)
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        ChildMetrics {
            acks: field("acks"),
            nacks: field("nacks"),
            open_streams: field("open_streams"),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serves the store (one TopicRoute) until its stdin closes; a `metrics`
/// line on stdin is answered by one line of counters on stdout.
fn server_process() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(Store::new());
        let harness = Arc::new(Harness::default());
        store.upsert(route(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let counters = harness.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "metrics" {
                    let m = counters.metrics();
                    let open = counters
                        .stream_infos()
                        .iter()
                        .filter(|s| s.closed_ms.is_none())
                        .count();
                    println!("acks {} nacks {} open_streams {open}", m.acks, m.nacks);
                } else {
                    println!("unknown command {line:?}");
                }
            }
            // The parent is gone (or done): stop serving.
            let _ = stop.send(());
        });
        serve(listener, XdsServer::new(store, harness), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
}

/// Server RSS (KiB) before the N streams and once all N are open, first answered and ACKed.
async fn server_memory(n: usize) -> (u64, u64) {
    let mut server = ServerProcess::spawn();
    // A round trip to the child, then a moment for its startup to settle.
    assert_eq!(server.metrics().open_streams, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = server.rss_kib();
    assert!(rss_before > 0, "cannot read the server process's VmRSS");

    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let clients: Vec<_> = (0..n)
        .map(|id| {
            tokio::spawn(client(
                id,
                server.url.clone(),
                deliveries_tx.clone(),
                connecting.clone(),
            ))
        })
        .collect();
    drop(deliveries_tx);
    let initial = route(0).version;
    let mut seen = vec![false; n];
    for _ in 0..n {
        let d = tokio::time::timeout(WAIT, deliveries.recv())
            .await
            .expect("server process: streams did not open in time")
            .expect("every client ended");
        assert_eq!(d.version, initial);
        assert!(!seen[d.client], "client {} answered twice", d.client);
        seen[d.client] = true;
    }
    // The ACKs of those first responses, processed by the child.
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = server.metrics();
        if m.acks >= n as u64 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "server process: {} of {n} initial ACKs",
            m.acks
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rss_after = server.rss_kib();
    assert_eq!(
        m,
        ChildMetrics {
            acks: n as u64,
            nacks: 0,
            open_streams: n as u64,
        },
        "server process: one stream and one ACK per client"
    );
    for c in clients {
        c.abort();
    }
    drop(server);
    (rss_before, rss_after)
}

fn main() {
    if std::env::var(ROLE_VAR).is_ok_and(|r| r == "server") {
        server_process();
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if full {
        (env_or("FANOUT_N", 1000), env_or("FANOUT_ROUNDS", 5) as u32)
    } else {
        (20, 2)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (per_stream, results) = runtime.block_on(run(n, rounds));
    let (server_before, server_after) = runtime.block_on(server_memory(n));
    let mut last: Vec<Duration> = results.iter().map(|r| r.last_ack).collect();
    last.sort_unstable();
    let median = |v: &[Duration]| v[v.len() / 2];
    let mut p99: Vec<Duration> = results.iter().map(|r| r.p99).collect();
    p99.sort_unstable();
    let mut p50: Vec<Duration> = results.iter().map(|r| r.p50).collect();
    p50.sort_unstable();
    println!(
        "fanout N={n} rounds={rounds}: last ACK at the server median {:?} (best {:?}, worst {:?}); \
         delivery p50 {:?} p99 {:?} (medians over rounds); memory {:.1} KiB per stream \
         (RSS growth / N, clients included)",
        median(&last),
        last[0],
        last[last.len() - 1],
        median(&p50),
        median(&p99),
        per_stream as f64 / 1024.0,
    );
    println!(
        "server memory: {:.1} KiB per stream (RSS {server_before} -> {server_after} KiB for {n} streams)",
        server_after.saturating_sub(server_before) as f64 / n as f64,
    );
    if full && median(&last) > Duration::from_secs(1) {
        println!("over the 1 s target");
    }
}
