//! Attacks on the front door of both processes, each started as a real process so that its
//! resident memory can be read: connections that announce a 16 MiB frame and go silent, one peer
//! holding more connections than its cap, and idle admin connections.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::RawClient;
use rocketmesh::remoting::header::GetRouteInfoRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(60);
/// Connections in the memory test, as in the probe that found the problem.
const ANNOUNCERS: usize = 1_500;
const FRAME_TIMEOUT_MS: u64 = 3_000;

/// A process of ours, killed when dropped.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Resident set size in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in /proc status")
    }
}

/// Starts `rocketmesh <args>` and returns it with the value of `key` in its first log line that
/// has it.
fn spawn(args: &[&str], key: &str) -> (Process, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rocketmesh");
    let stderr = child.stderr.take().expect("stderr");
    let (found, reported) = std::sync::mpsc::channel();
    let key = key.to_owned();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(key.as_str()).nth(1)
                && let Some(found) = found.take()
            {
                let value = rest.split_whitespace().next().unwrap_or_default();
                let _ = found.send(value.to_owned());
            }
        }
    });
    let process = Process { child };
    let value = reported
        .recv_timeout(WAIT)
        .expect("the process reports its address");
    (process, value)
}

fn start_broker(dir: &Path, extra_yaml: &str) -> (Process, SocketAddr) {
    let config = dir.join("broker.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:0\"\nsegment_size: 8388608\nframe_timeout_ms: {FRAME_TIMEOUT_MS}\n{extra_yaml}"
        ),
    )
    .expect("write broker config");
    let data = dir.join("data");
    let config_arg = config.to_string_lossy().into_owned();
    let data_arg = data.to_string_lossy().into_owned();
    let (process, address) = spawn(
        &["broker", "--config", &config_arg, "--data-dir", &data_arg],
        "listen=",
    );
    (process, address.parse().expect("broker address"))
}

/// A sidecar process in front of `broker`; returns it with its listener and admin addresses.
fn start_sidecar(
    dir: &Path,
    broker: SocketAddr,
    limits_yaml: &str,
) -> (Process, SocketAddr, SocketAddr) {
    let config = dir.join("sidecar.yaml");
    let admin = if limits_yaml.contains("admin:") {
        ""
    } else {
        "admin: { address: \"127.0.0.1:0\" }"
    };
    let yaml = common::sidecar_yaml(&[("broker-a", broker)], "", limits_yaml)
        .replace("admin: { address: null }", admin);
    std::fs::write(&config, yaml).expect("write sidecar config");
    let config_arg = config.to_string_lossy().into_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(["sidecar", "--config", &config_arg])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidecar");
    let stderr = child.stderr.take().expect("stderr");
    let (found, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        let (mut listen, mut admin) = (None, None);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let value = |key: &str| {
                line.split(key)
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_owned)
            };
            if line.contains("sidecar listening") && listen.is_none() {
                listen = value("listen=");
            }
            if line.contains("admin endpoint listening") {
                admin = value("admin=");
            }
            // Keep draining after the report: a closed pipe would fail the sidecar's logging.
            if let (Some(listen), Some(admin)) = (&listen, &admin)
                && let Some(found) = found.take()
            {
                let _ = found.send((listen.clone(), admin.clone()));
            }
        }
    });
    let process = Process { child };
    let (listen, admin) = reported
        .recv_timeout(WAIT)
        .expect("the sidecar reports its addresses");
    (
        process,
        listen.parse().expect("listen address"),
        admin.parse().expect("admin address"),
    )
}

async fn connect_from(local: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    tokio::time::timeout(WAIT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Whether the server closes `stream` within `limit` (end of stream or reset).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn route_answer(target: SocketAddr, from: IpAddr) -> i32 {
    let socket = connect_from(from, target).await.expect("connect");
    let mut client = RawClient::from_stream(socket);
    client
        .call(
            RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(
                &GetRouteInfoRequestHeader {
                    topic: "TBW102".into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .code
}

/// Opens `ANNOUNCERS` connections that each send only a length prefix announcing a 16 MiB frame,
/// checks the growth of `process`'s memory, and that the read timeout closes every one.
async fn announce_and_go_silent(process: &Process, target: SocketAddr, name: &str) {
    let before = process.rss_kib();
    let mut connections = Vec::with_capacity(ANNOUNCERS);
    for index in 0..ANNOUNCERS {
        // Spread over loopback addresses so the per-peer cap is not what stops them.
        let from = IpAddr::from([127, 0, 1, (index % 200) as u8 + 1]);
        let mut stream = connect_from(from, target).await.expect("connect");
        let announced = (16 * 1024 * 1024 - 4u32).to_be_bytes();
        stream.write_all(&announced).await.expect("announce");
        stream.write_all(&[0, 0, 0, 0]).await.expect("header word");
        connections.push(stream);
    }
    // Connections are accepted in order: once a later one is answered, all of them were taken in.
    let served = route_answer(target, IpAddr::from([127, 0, 0, 1])).await;
    assert_eq!(
        served,
        ResponseCode::SUCCESS.0,
        "{name} serves while under attack"
    );
    let after = process.rss_kib();
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "{name}: RSS {:.1} MiB before, {:.1} MiB with {ANNOUNCERS} announced 16 MiB frames: +{grown_mib:.1} MiB",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    assert!(
        grown_mib < 50.0,
        "{name} grew by {grown_mib:.1} MiB for {ANNOUNCERS} silent connections"
    );
    let started = Instant::now();
    let limit = Duration::from_millis(FRAME_TIMEOUT_MS) + Duration::from_secs(20);
    for stream in &mut connections {
        assert!(
            closed_within(stream, limit.saturating_sub(started.elapsed())).await,
            "{name} closes a stalled frame by the read timeout"
        );
    }
    println!(
        "{name}: all {ANNOUNCERS} closed {:.1} s after the measurement (frame timeout {FRAME_TIMEOUT_MS} ms)",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_frames_cost_only_received_bytes_and_time_out_on_both_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, broker_address) = start_broker(dir.path(), "");
    announce_and_go_silent(&broker, broker_address, "broker").await;
    let (sidecar, sidecar_address, _) = start_sidecar(
        dir.path(),
        broker_address,
        &format!("limits: {{ frame_timeout_ms: {FRAME_TIMEOUT_MS} }}"),
    );
    announce_and_go_silent(&sidecar, sidecar_address, "sidecar").await;
    // Both still serve an ordinary client afterwards.
    let local = IpAddr::from([127, 0, 0, 1]);
    assert_eq!(
        route_answer(broker_address, local).await,
        ResponseCode::SUCCESS.0
    );
    assert_eq!(
        route_answer(sidecar_address, local).await,
        ResponseCode::SUCCESS.0
    );
}

/// One peer opens more connections than its cap; a fresh client from another address is still
/// served, and the greedy peer's extra connections are closed at once.
async fn a_greedy_peer_cannot_lock_others_out(target: SocketAddr, cap: usize, name: &str) {
    let greedy = IpAddr::from([127, 0, 0, 2]);
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(connect_from(greedy, target).await.expect("connect"));
    }
    // Each held connection is served: a request on the last one is answered.
    let mut last = RawClient::from_stream(held.pop().expect("one"));
    let answer = last
        .call(RemotingCommand::request(
            RequestCode::GET_ROUTEINFO_BY_TOPIC,
            0,
        ))
        .await;
    assert_ne!(answer.code, -1);
    let mut refused = 0;
    for _ in 0..cap {
        let mut extra = connect_from(greedy, target).await.expect("connect");
        if closed_within(&mut extra, Duration::from_secs(10)).await {
            refused += 1;
        }
    }
    assert_eq!(
        refused, cap,
        "{name}: every connection past the cap is closed"
    );
    for other in [IpAddr::from([127, 0, 0, 3]), IpAddr::from([127, 0, 0, 1])] {
        assert_eq!(
            route_answer(target, other).await,
            ResponseCode::SUCCESS.0,
            "{name}: a client from {other} is served while {greedy} is at its cap"
        );
    }
    println!(
        "{name}: {greedy} held {cap}, {refused} more refused, clients from 127.0.0.3 and 127.0.0.1 served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_past_its_cap_does_not_stop_other_clients_on_both_processes() {
    const CAP: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, broker_address) = start_broker(
        dir.path(),
        &format!("max_connections: 120\nmax_connections_per_peer: {CAP}\n"),
    );
    a_greedy_peer_cannot_lock_others_out(broker_address, CAP, "broker").await;
    let (_sidecar, sidecar_address, _) = start_sidecar(
        dir.path(),
        broker_address,
        &format!("limits: {{ max_connections: 120, max_connections_per_peer: {CAP} }}"),
    );
    a_greedy_peer_cannot_lock_others_out(sidecar_address, CAP, "sidecar").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_unless_a_request_is_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, broker_address) = start_broker(dir.path(), "idle_timeout_ms: 1500\n");
    let (_sidecar, sidecar_address, _) = start_sidecar(
        dir.path(),
        broker_address,
        "limits: { idle_timeout_ms: 1500 }",
    );
    for (name, target) in [("broker", broker_address), ("sidecar", sidecar_address)] {
        let mut idle = TcpStream::connect(target).await.expect("connect");
        let started = Instant::now();
        assert!(
            closed_within(&mut idle, Duration::from_secs(20)).await,
            "{name} closes an idle connection"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1_000),
            "{name} closed it only after the idle timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_caps_connections_and_times_out_silent_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, broker_address) = start_broker(dir.path(), "");
    let (_sidecar, _, admin) = start_sidecar(
        dir.path(),
        broker_address,
        "admin: { address: \"127.0.0.1:0\", max_connections: 8, header_timeout_ms: 1500 }",
    );
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(admin).await.expect("connect"));
    }
    let mut ninth = TcpStream::connect(admin).await.expect("connect");
    assert!(
        closed_within(&mut ninth, Duration::from_secs(10)).await,
        "the admin closes connections past its cap"
    );
    for stream in &mut idle {
        assert!(
            closed_within(stream, Duration::from_secs(20)).await,
            "a connection that sends no request headers is closed by the header timeout"
        );
    }
    let mut fresh = TcpStream::connect(admin).await.expect("connect");
    fresh
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, fresh.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
