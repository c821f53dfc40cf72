//! Durability under SIGKILL. A child process writes with sync flush and reports each acknowledged
//! write; the parent kills it mid-write, reopens the store and checks that every acknowledged write
//! is there, byte for byte, in order, with nothing missing or duplicated. Once for the bare commit
//! log, once for the message store with its consume queues and key index.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocketmesh::broker::store::{
    CommitLog, CommitLogConfig, FlushPolicy, MessageStore, MessageStoreConfig,
};
use rocketmesh::remoting::message::{MessageRecord, Properties, property};

const CHILD_DIR_ENV: &str = "ROCKETMESH_CRASH_CHILD_DIR";
/// Set to `async` to run the child with the periodic flush policy.
const CHILD_FLUSH_ENV: &str = "ROCKETMESH_CRASH_CHILD_FLUSH";
const QUEUES: i32 = 4;

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

/// Runs `child_test` in a child process writing into `dir`, collects its `ack` lines (the numbers
/// after the word), and SIGKILLs it once `kill_after` acks have arrived.
fn run_child_and_kill(
    child_test: &str,
    dir: &Path,
    kill_after: usize,
    flush: &str,
) -> Vec<Vec<u64>> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            child_test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_FLUSH_ENV, flush)
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
                let numbers: Vec<u64> = parts.map(|p| p.parse().expect("number")).collect();
                if acks_tx.send(numbers).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < kill_after {
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
    acknowledged
}

#[test]
fn commit_log_survives_sigkill() {
    for run in 0..3usize {
        let dir = tempfile::tempdir().expect("tempdir");
        // Kill at a different point each run.
        let acknowledged: Vec<(u64, u64)> = run_child_and_kill(
            "child_appends_until_killed",
            dir.path(),
            300 + run * 257,
            "sync",
        )
        .into_iter()
        .map(|ack| (ack[0], ack[1]))
        .collect();

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

fn store_config(dir: &Path) -> MessageStoreConfig {
    let mut config = MessageStoreConfig::new(dir, "127.0.0.1:10911".parse().expect("addr"));
    config.commit_log.segment_size = 32 * 1024;
    config.commit_log.flush = match std::env::var(CHILD_FLUSH_ENV).as_deref() {
        Ok("async") => FlushPolicy::Async {
            interval: Duration::from_millis(50),
        },
        _ => FlushPolicy::Sync,
    };
    config.entries_per_queue_file = 64;
    config
}

fn store_message(index: u64) -> MessageRecord {
    MessageRecord {
        topic: "CrashTopic".into(),
        queue_id: (index % QUEUES as u64) as i32,
        body: entry(index),
        properties: Properties::from([
            (property::KEYS.to_owned(), format!("key-{index}")),
            (property::TAGS.to_owned(), "crash".to_owned()),
        ]),
        born_host: "127.0.0.1:4000".parse().expect("addr"),
        ..MessageRecord::default()
    }
}

/// The child: put forever, printing `ack <index> <queue id> <queue offset> <commit offset>` once each
/// message is durable.
#[test]
#[ignore = "run by message_store_survives_sigkill as a child process"]
fn child_puts_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let store = MessageStore::open(store_config(Path::new(&dir))).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for index in 0.. {
        let message = store_message(index);
        let queue_id = message.queue_id;
        let put = store.put(message).expect("put");
        runtime
            .block_on(store.wait_durable(put.end))
            .expect("durable");
        println!(
            "ack {index} {queue_id} {} {}",
            put.queue_offset, put.commit_offset
        );
    }
}

#[test]
fn message_store_survives_sigkill() {
    // Three runs with sync flush, then two with async flush: under async flush an acknowledged
    // message is only in the page cache, which a killed process does not take with it, so the
    // same checks hold; a power cut would only cost a suffix, never consistency.
    for run in 0..5usize {
        let flush = if run < 3 { "sync" } else { "async" };
        let dir = tempfile::tempdir().expect("tempdir");
        let acknowledged = run_child_and_kill(
            "child_puts_until_killed",
            dir.path(),
            400 + run * 311,
            flush,
        );
        let store = MessageStore::open(store_config(dir.path())).expect("reopen after SIGKILL");

        // Every queue is dense from 0, every entry points at a record of that queue with the
        // right queue offset, and together they hold messages 0..n exactly once, in order per queue.
        let mut seen = std::collections::BTreeMap::new();
        for queue_id in 0..QUEUES {
            let (min, max) = store.queue_offsets("CrashTopic", queue_id);
            assert_eq!(min, 0);
            let raw = store
                .read_queue("CrashTopic", queue_id, 0, max as usize, |_| true)
                .expect("read queue");
            assert_eq!(raw.len() as u64, max, "queue {queue_id} reads back whole");
            for (queue_offset, bytes) in raw.iter().enumerate() {
                let (record, _) = MessageRecord::decode(bytes, true).expect("stored record");
                assert_eq!(record.queue_id, queue_id);
                assert_eq!(record.queue_offset, queue_offset as i64);
                let index: u64 = record
                    .keys()
                    .and_then(|k| k.strip_prefix("key-"))
                    .and_then(|k| k.parse().ok())
                    .expect("key");
                assert_eq!(record.body, entry(index), "message {index} body");
                assert_eq!(index % QUEUES as u64, queue_id as u64);
                assert_eq!(
                    index / QUEUES as u64,
                    queue_offset as u64,
                    "per-queue order"
                );
                assert!(
                    seen.insert(index, record.physical_offset as u64).is_none(),
                    "message {index} twice"
                );
            }
        }
        let total = seen.len() as u64;
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            (0..total).collect::<Vec<_>>(),
            "no gaps"
        );

        // Every acknowledged put is where it was acknowledged.
        for ack in &acknowledged {
            let (index, queue_id, queue_offset, commit_offset) = (ack[0], ack[1], ack[2], ack[3]);
            assert_eq!(
                seen.get(&index),
                Some(&commit_offset),
                "acknowledged message {index}"
            );
            assert_eq!(index % QUEUES as u64, queue_id);
            assert_eq!(index / QUEUES as u64, queue_offset);
        }

        // The key index agrees with the log.
        for index in [0, total / 2, total - 1] {
            let found = store
                .query_by_key("CrashTopic", &format!("key-{index}"), false, 0, i64::MAX, 4)
                .expect("query by key");
            assert_eq!(found.len(), 1, "key-{index}");
        }
        let next = store.put(store_message(total)).expect("put after recovery");
        assert_eq!(next.queue_offset, total / QUEUES as u64);
        println!(
            "run {run} ({flush} flush): killed after {} acknowledged puts; {total} messages recovered in {QUEUES} queues",
            acknowledged.len()
        );
        assert!(total as usize >= acknowledged.len());
    }
}
