//! `rocketmesh bench` against a `rocketmesh broker` process: produce, then consume by pull and by
//! POP, each reporting JSON with the messages it moved.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn bench(target: &str, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args([
            "bench",
            "--target",
            target,
            "--json",
            "--connections",
            "2",
            "--duration-secs",
            "30",
        ])
        .args(args)
        .output()
        .expect("run bench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON summary")
}

#[test]
fn bench_produces_and_consumes_against_the_broker() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut broker = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(["broker", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start broker");
    let stderr = broker.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listen=").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    });
    let target = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("broker address");

    let produced = bench(&target, &["--count", "2000", "produce", "--size", "256"]);
    assert!(
        produced["messages"].as_u64().is_some_and(|n| n >= 2000),
        "{produced}"
    );
    assert_eq!(produced["errors"], 0, "{produced}");
    assert!(
        produced["latency_us"]["p99"]
            .as_u64()
            .is_some_and(|p99| p99 > 0),
        "{produced}"
    );
    let pulled = bench(&target, &["--count", "2000", "consume", "--mode", "pull"]);
    assert!(
        pulled["messages"].as_u64().is_some_and(|n| n >= 2000),
        "{pulled}"
    );
    let popped = bench(
        &target,
        &[
            "--count",
            "2000",
            "consume",
            "--mode",
            "pop",
            "--group",
            "pop_bench",
        ],
    );
    assert!(
        popped["messages"].as_u64().is_some_and(|n| n >= 2000),
        "{popped}"
    );
    println!("bench: produced {produced}\npulled {pulled}\npopped {popped}");
    broker.kill().expect("stop broker");
    broker.wait().expect("reap broker");
}
