//! Durability under SIGKILL: a child process appends to a sync-flush commit log and reports each
//! acknowledged entry; the parent kills it mid-write, reopens the log and checks that every
//! acknowledged entry is there, byte for byte, in order, with nothing missing or duplicated.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocketmesh::broker::store::{CommitLog, CommitLogConfig, FlushPolicy};

const CHILD_DIR_ENV: &str = "ROCKETMESH_CRASH_CHILD_DIR";

fn config(dir: &Path) -> CommitLogConfig {
    CommitLogConfig {
        dir: dir.to_owned(),
        // small segments so that kills also land around segment rolls
        segment_size: 16 * 1024,
        max_entry_size: 64 * 1024,
        flush: FlushPolicy::Sync,
    }
}

/// Entry `index`: its number, then a body whose length and bytes depend on it.
fn entry(index: u64) -> Bytes {
    let mut bytes = format!("{index}:").into_bytes();
    let len = 16 + (index * 7919 % 2000) as usize;
    bytes.extend((0..len).map(|i| b'a' + ((index as usize + i) % 26) as u8));
    Bytes::from(bytes)
}

/// The child: append forever, printing `ack <index> <offset>` once each entry is durable.
#[test]
#[ignore = "run by commit_log_survives_sigkill as a child process"]
fn child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let log = CommitLog::open(config(Path::new(&dir))).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for index in 0.. {
        let appended = log.append(|_| entry(index)).expect("append");
        runtime
            .block_on(log.wait_durable(appended.end))
            .expect("durable");
        println!("ack {index} {}", appended.offset);
    }
}

#[test]
fn commit_log_survives_sigkill() {
    for run in 0..3u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "child_appends_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (acks_tx, acks) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split(' ');
                if parts.next() == Some("ack") {
                    let index: u64 = parts.next().and_then(|p| p.parse().ok()).expect("index");
                    let offset: u64 = parts.next().and_then(|p| p.parse().ok()).expect("offset");
                    if acks_tx.send((index, offset)).is_err() {
                        break;
                    }
                }
            }
        });
        // Kill at a different point each run.
        let kill_after = 300 + run * 257;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut acknowledged = Vec::new();
        while (acknowledged.len() as u64) < kill_after {
            let left = deadline.saturating_duration_since(Instant::now());
            match acks.recv_timeout(left) {
                Ok(ack) => acknowledged.push(ack),
                Err(error) => panic!(
                    "child stopped acknowledging after {}: {error}",
                    acknowledged.len()
                ),
            }
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        reader.join().expect("reader");
        // Acks printed before the kill but read after it count too.
        acknowledged.extend(acks.try_iter());

        let log = CommitLog::open(config(dir.path())).expect("reopen after SIGKILL");
        let mut offset = log.min_offset();
        let mut index = 0u64;
        let mut stored_offsets = Vec::new();
        while offset < log.max_offset() {
            let (payload, next) = log.read(offset).expect("every stored entry reads back");
            assert_eq!(payload, entry(index), "entry {index} at offset {offset}");
            stored_offsets.push(offset);
            index += 1;
            offset = next;
        }
        for (acked_index, acked_offset) in &acknowledged {
            assert_eq!(
                stored_offsets.get(*acked_index as usize),
                Some(acked_offset),
                "acknowledged entry {acked_index} is where it was acknowledged"
            );
        }
        let after = log.append(|_| entry(index)).expect("append after recovery");
        assert_eq!(log.read(after.offset).expect("read").0, entry(index));
        println!(
            "run {run}: killed after {} acknowledged entries; {} entries recovered, {} segments",
            acknowledged.len(),
            index,
            log.segment_bases().len()
        );
        assert!(index as usize >= acknowledged.len());
    }
}
