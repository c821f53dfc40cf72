//! `rocketmesh sidecar` as a process: SIGHUP reloads routes from the config file (an invalid
//! file is refused and the routes in force stay), new brokers get their own addresses, and config
//! errors are printed once.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::RunningBroker;
use common::raw::RawClient;
use rocketmesh::remoting::body::{JsonBody, TopicRouteData};
use rocketmesh::remoting::header::GetRouteInfoRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode};

const WAIT: Duration = Duration::from_secs(60);

fn write_config(path: &Path, brokers: &[(&str, SocketAddr)], extra: &str) {
    std::fs::write(path, common::sidecar_yaml(brokers, "", extra)).expect("write config");
}

/// The sidecar process and its log lines, as they come.
struct Sidecar {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sidecar {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
            .args(["sidecar", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sidecar");
        let stderr = child.stderr.take().expect("stderr");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first log line containing `text`.
    fn wait_for(&self, text: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no log line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

fn value_after<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
}

async fn brokers_in_route(namesrv: SocketAddr) -> Vec<(String, String)> {
    let answer = RawClient::connect(namesrv)
        .await
        .call(
            RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(
                &GetRouteInfoRequestHeader {
                    topic: "AnyTopic".into(),
                    ..Default::default()
                },
            ),
        )
        .await;
    let route = TopicRouteData::from_json(&answer.body).expect("route data");
    route
        .broker_datas
        .into_iter()
        .map(|broker| {
            let address = broker
                .broker_addrs
                .values()
                .next()
                .cloned()
                .unwrap_or_default();
            (broker.broker_name, address)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_and_keeps_them_when_the_file_is_invalid() {
    let data = tempfile::tempdir().expect("tempdir");
    let a = RunningBroker::start_with(&data.path().join("a"), |config| {
        config.broker_name = "broker-a".into();
    })
    .await;
    let b = RunningBroker::start_with(&data.path().join("b"), |config| {
        config.broker_name = "broker-b".into();
    })
    .await;
    let path = data.path().join("sidecar.yaml");
    write_config(&path, &[("broker-a", a.addr)], "");
    let mut sidecar = Sidecar::start(&path);
    let line = sidecar.wait_for("sidecar listening");
    let namesrv: SocketAddr = value_after(&line, "listen=").parse().expect("address");

    let before = brokers_in_route(namesrv).await;
    assert_eq!(before.len(), 1);
    assert_ne!(
        before[0].1,
        namesrv.to_string(),
        "broker-a has its own address"
    );

    write_config(&path, &[("broker-a", a.addr), ("broker-b", b.addr)], "");
    sidecar.signal("HUP");
    sidecar.wait_for("routes reloaded");
    let after = brokers_in_route(namesrv).await;
    let names: Vec<&str> = after.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["broker-a", "broker-b"]);
    assert_eq!(
        after[0], before[0],
        "broker-a keeps its address across the reload"
    );
    assert_ne!(after[0].1, after[1].1, "each broker has its own address");

    // An invalid file: refused, logged, and the routes in force stay.
    write_config(&path, &[("broker-a", a.addr)], "no_such_key: 1");
    sidecar.signal("HUP");
    let refused = sidecar.wait_for("configuration not reloaded");
    assert!(refused.contains("no_such_key"), "{refused}");
    assert_eq!(brokers_in_route(namesrv).await, after);
    println!("SIGHUP: {before:?} -> {after:?}; an invalid file was refused: {refused}");

    sidecar.signal("TERM");
    let status = tokio::task::spawn_blocking(move || sidecar.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    a.stop().await;
    b.stop().await;
}

#[test]
fn a_config_error_is_printed_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let path = data.path().join("bad.yaml");
    std::fs::write(&path, "listeners: 5\nroutes: []\nclusters: []\n").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(["sidecar", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = stderr
        .lines()
        .find(|line| line.starts_with("rocketmesh sidecar:"))
        .expect("an error line");
    let reason = message
        .split("invalid sidecar config: ")
        .nth(1)
        .expect("the reason");
    assert_eq!(
        message.matches(reason).count(),
        1,
        "the reason appears once: {message}"
    );
    assert_eq!(message.matches("invalid type").count(), 1, "{message}");
    println!("{message}");
}
