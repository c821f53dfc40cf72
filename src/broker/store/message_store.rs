//! Messages on top of the commit log: each put gets its queue offset and commit-log offset, is
//! stored as a RocketMQ message record (so pull bodies are the stored bytes as they are), and is
//! indexed in its (topic, queue) consume queue.
//!
//! Puts are serialized by one lock that spans the commit-log append and the consume-queue append,
//! so queue offsets are handed out in commit-log order and a failed write gives its offset back.
//! Waiting for durability (sync flush) happens after the lock is released, so concurrent senders
//! still share fsyncs. On open, consume queues are repaired against the commit log and every record
//! past the dispatch checkpoint (or past where the key index found entries missing) is indexed
//! again; re-indexing an entry that is already there is a no-op. Open reads only what follows the
//! checkpoints, so restart time and memory do not grow with the stored history.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::commit_log::{CommitLog, CommitLogConfig, StoreError};
use super::consume_queue::{ConsumeQueue, QueueEntry};
use super::files::{child_path, read_u64, replace_file};
use super::key_index::KeyIndex;
use crate::log_throttle::LogThrottle;
use crate::names;
use crate::remoting::message::{MessageRecord, java_string_hash};

const COMMIT_LOG_DIR: &str = "commitlog";
const CONSUME_QUEUE_DIR: &str = "consumequeue";
const KEY_INDEX_DIR: &str = "index";
const DISPATCH_CHECKPOINT: &str = "dispatch.checkpoint";
const KEY_INDEX_ENTRIES_PER_FILE: u64 = 1 << 20;
/// Index hits a key query reads at most, newest first: bounds the work of a query for a key that
/// thousands of messages share (a reply holds at most 64).
const MAX_KEY_CANDIDATES: usize = 4096;

/// Records and directories with names the store refuses, found while opening: written by an older
/// version that did not check names, they are skipped, and one line per interval says so.
static SKIPPED_LOG: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(10));

/// Message store settings.
#[derive(Debug, Clone)]
pub struct MessageStoreConfig {
    /// Root data directory; the commit log and consume queues live below it.
    pub data_dir: PathBuf,
    pub commit_log: CommitLogConfig,
    pub entries_per_queue_file: u64,
    /// The broker address written into records as their store host (and so into message ids).
    pub store_host: SocketAddr,
}

impl MessageStoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>, store_host: SocketAddr) -> Self {
        let data_dir = data_dir.into();
        Self {
            commit_log: CommitLogConfig::new(data_dir.join(COMMIT_LOG_DIR)),
            data_dir,
            entries_per_queue_file: 300_000,
            store_host,
        }
    }
}

/// Where a put message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutResult {
    pub commit_offset: u64,
    pub queue_offset: u64,
    /// Commit-log offset just past the record; pass it to [`MessageStore::wait_durable`].
    pub end: u64,
}

type QueueKey = (String, i32);

/// Which side of a timestamp [`MessageStore::search_offset`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    Lower,
    Upper,
}

/// The store: one commit log, one consume queue per (topic, queue id).
pub struct MessageStore {
    config: MessageStoreConfig,
    commit_log: CommitLog,
    queues: RwLock<HashMap<QueueKey, Arc<RwLock<ConsumeQueue>>>>,
    keys: RwLock<KeyIndex>,
    put_lock: Mutex<()>,
    /// The dispatch checkpoint found at open: every index was flushed up to it.
    dispatch_checkpoint: u64,
}

/// The index keys of a message: each of its KEYS and its UNIQ_KEY.
fn index_keys(record: &MessageRecord) -> impl Iterator<Item = &str> {
    record
        .keys()
        .into_iter()
        .flat_map(|keys| keys.split(' '))
        .chain(record.uniq_key())
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The tag code a consume queue stores: Java's hash of the TAGS property, 0 without tags.
pub fn tag_code(record: &MessageRecord) -> i64 {
    record
        .tags()
        .map_or(0, |tags| i64::from(java_string_hash(tags)))
}

impl MessageStore {
    /// Opens the store, recovering the commit log and re-indexing what the queues miss.
    pub fn open(mut config: MessageStoreConfig) -> Result<Self, StoreError> {
        if config.commit_log.dir.as_os_str().is_empty() {
            config.commit_log.dir = config.data_dir.join(COMMIT_LOG_DIR);
        }
        let commit_log = CommitLog::open(config.commit_log.clone())?;
        let keys = KeyIndex::open(
            config.data_dir.join(KEY_INDEX_DIR),
            KEY_INDEX_ENTRIES_PER_FILE,
            commit_log.max_offset(),
        )?;
        let dispatch_checkpoint =
            read_u64(&config.data_dir.join(DISPATCH_CHECKPOINT))?.unwrap_or(0);
        let store = Self {
            queues: RwLock::new(HashMap::new()),
            keys: RwLock::new(keys),
            put_lock: Mutex::new(()),
            dispatch_checkpoint,
            commit_log,
            config,
        };
        store.open_queues()?;
        store.replay()?;
        Ok(store)
    }

    fn queue_root(&self) -> PathBuf {
        self.config.data_dir.join(CONSUME_QUEUE_DIR)
    }

    fn open_queues(&self) -> Result<(), StoreError> {
        let root = self.queue_root();
        let Ok(topics) = fs::read_dir(&root) else {
            return Ok(());
        };
        for topic_dir in topics.flatten() {
            let Some(topic) = topic_dir
                .file_name()
                .to_str()
                .filter(|topic| names::validate_topic(topic).is_ok())
                .map(str::to_owned)
            else {
                if let Some(skipped) = SKIPPED_LOG.allow() {
                    tracing::warn!(dir = %topic_dir.path().display(), skipped, "consume-queue directory with an invalid topic name ignored");
                }
                continue;
            };
            let Ok(queue_dirs) = fs::read_dir(topic_dir.path()) else {
                continue;
            };
            for queue_dir in queue_dirs.flatten() {
                let Some(queue_id) = queue_dir
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<i32>().ok())
                    .filter(|queue_id| names::validate_queue_id(&topic, *queue_id).is_ok())
                else {
                    continue;
                };
                self.open_queue(&topic, queue_id)?;
            }
        }
        Ok(())
    }

    fn open_queue(
        &self,
        topic: &str,
        queue_id: i32,
    ) -> Result<Arc<RwLock<ConsumeQueue>>, StoreError> {
        let mut queues = self.queues.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(&(topic.to_owned(), queue_id)) {
            return Ok(queue.clone());
        }
        // Every consume-queue path comes from here: a checked name and queue id, and a path
        // checked to stay under the data directory.
        names::validate_topic(topic)?;
        names::validate_queue_id(topic, queue_id)?;
        let dir = child_path(
            &child_path(&self.queue_root(), topic)?,
            &queue_id.to_string(),
        )?;
        let queue = Arc::new(RwLock::new(ConsumeQueue::open_trusting(
            dir,
            self.config.entries_per_queue_file,
            self.commit_log.min_offset(),
            self.commit_log.max_offset(),
            self.dispatch_checkpoint,
        )?));
        queues.insert((topic.to_owned(), queue_id), queue.clone());
        Ok(queue)
    }

    fn queue(&self, topic: &str, queue_id: i32) -> Option<Arc<RwLock<ConsumeQueue>>> {
        let queues = self.queues.read().unwrap_or_else(PoisonError::into_inner);
        queues.get(&(topic.to_owned(), queue_id)).cloned()
    }

    /// Indexes every record past the dispatch checkpoint, or from earlier where the key index
    /// found entries missing.
    fn replay(&self) -> Result<(), StoreError> {
        let checkpoint = self.dispatch_checkpoint;
        let keys_from = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .replay_from();
        let from = keys_from.map_or(checkpoint, |keys_from| keys_from.min(checkpoint));
        let mut offset = from.max(self.commit_log.min_offset());
        while offset < self.commit_log.max_offset() {
            let (payload, next) = self.commit_log.read(offset)?;
            let (record, _) =
                MessageRecord::decode(&payload, false).map_err(|_| StoreError::Corrupt {
                    offset,
                    reason: "commit-log entry is not a message record",
                })?;
            let queue_offset =
                u64::try_from(record.queue_offset).map_err(|_| StoreError::Corrupt {
                    offset,
                    reason: "negative queue offset in a stored record",
                })?;
            let queue = match self.open_queue(&record.topic, record.queue_id) {
                Ok(queue) => queue,
                Err(StoreError::InvalidName(error)) => {
                    if let Some(skipped) = SKIPPED_LOG.allow() {
                        tracing::warn!(offset, %error, skipped, "commit-log record not indexed");
                    }
                    offset = next;
                    continue;
                }
                Err(error) => return Err(error),
            };
            queue
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .append(
                    queue_offset,
                    QueueEntry {
                        commit_offset: offset,
                        size: payload.len() as u32,
                        tag_code: tag_code(&record),
                    },
                )?;
            self.keys
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .add(
                    &record.topic,
                    index_keys(&record),
                    offset,
                    record.store_timestamp,
                )?;
            offset = next;
        }
        Ok(())
    }

    /// Stores a message. The record's queue offset, physical offset and store host and timestamp
    /// are filled in here; everything else is stored as given.
    pub fn put(&self, record: MessageRecord) -> Result<PutResult, StoreError> {
        let _put = lock(&self.put_lock);
        self.put_locked(record)
    }

    /// Stores several messages back to back: nothing else is stored between them, so messages of
    /// one queue get consecutive queue offsets. Stops at the first failure; what was stored stays.
    pub fn put_batch(&self, records: Vec<MessageRecord>) -> Result<Vec<PutResult>, StoreError> {
        let _put = lock(&self.put_lock);
        records
            .into_iter()
            .map(|record| self.put_locked(record))
            .collect()
    }

    pub fn config(&self) -> &MessageStoreConfig {
        &self.config
    }

    fn put_locked(&self, mut record: MessageRecord) -> Result<PutResult, StoreError> {
        let queue = self.open_queue(&record.topic, record.queue_id)?;
        let mut queue = queue.write().unwrap_or_else(PoisonError::into_inner);
        let queue_offset = queue.max_offset();
        record.queue_offset = queue_offset as i64;
        record.store_host = self.config.store_host;
        record.store_timestamp = now_millis();
        let tag_code = tag_code(&record);
        let mut encoding_error = None;
        let appended = self.commit_log.append(|commit_offset| {
            record.physical_offset = commit_offset as i64;
            let mut out = BytesMut::new();
            match record.encode(&mut out) {
                Ok(()) => out.freeze(),
                Err(error) => {
                    encoding_error = Some(error);
                    Bytes::new()
                }
            }
        });
        if let Some(error) = encoding_error {
            return Err(StoreError::InvalidRecord(error));
        }
        let appended = appended?;
        queue.append(
            queue_offset,
            QueueEntry {
                commit_offset: appended.offset,
                size: (appended.end - appended.offset - super::commit_log::FRAME_OVERHEAD) as u32,
                tag_code,
            },
        )?;
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(
                &record.topic,
                index_keys(&record),
                appended.offset,
                record.store_timestamp,
            )?;
        Ok(PutResult {
            commit_offset: appended.offset,
            queue_offset,
            end: appended.end,
        })
    }

    /// Waits until the put ending at `end` is durable (immediately under async flush).
    pub async fn wait_durable(&self, end: u64) -> Result<(), StoreError> {
        self.commit_log.wait_durable(end).await
    }

    /// The stored record bytes at a commit-log offset (VIEW_MESSAGE_BY_ID).
    pub fn read_at(&self, commit_offset: u64) -> Result<Bytes, StoreError> {
        Ok(self.commit_log.read(commit_offset)?.0)
    }

    /// Up to `max` consume-queue entries of a queue from `queue_offset`.
    pub fn queue_entries(
        &self,
        topic: &str,
        queue_id: i32,
        queue_offset: u64,
        max: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let Some(queue) = self.queue(topic, queue_id) else {
            return Ok(Vec::new());
        };
        let queue = queue.read().unwrap_or_else(PoisonError::into_inner);
        let mut entries = Vec::new();
        let mut next = queue_offset;
        // One consume-queue read stops at a file boundary; keep going until `max` or the end.
        while entries.len() < max {
            let batch = queue.read(next, max - entries.len())?;
            if batch.is_empty() {
                break;
            }
            next += batch.len() as u64;
            entries.extend(batch);
        }
        Ok(entries)
    }

    /// The stored records of a queue from `queue_offset`, at most `max`, keeping only those whose
    /// entry passes `keep` (tag-code filtering), as raw record bytes ready for a pull body.
    pub fn read_queue(
        &self,
        topic: &str,
        queue_id: i32,
        queue_offset: u64,
        max: usize,
        keep: impl Fn(&QueueEntry) -> bool,
    ) -> Result<Vec<Bytes>, StoreError> {
        self.queue_entries(topic, queue_id, queue_offset, max)?
            .iter()
            .filter(|entry| keep(entry))
            .map(|entry| self.read_at(entry.commit_offset))
            .collect()
    }

    /// Stored records of `topic` whose KEYS contain `key` (or, with `unique`, whose UNIQ_KEY is
    /// `key`), stored within `[begin_ms, end_ms]`, newest first, at most `max`.
    pub fn query_by_key(
        &self,
        topic: &str,
        key: &str,
        unique: bool,
        begin_ms: i64,
        end_ms: i64,
        max: usize,
    ) -> Result<Vec<Bytes>, StoreError> {
        let candidates = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .candidates(topic, key, begin_ms, end_ms, MAX_KEY_CANDIDATES)?;
        let mut found = Vec::new();
        for offset in candidates {
            if found.len() >= max {
                break;
            }
            let Ok(raw) = self.read_at(offset) else {
                continue;
            };
            let Ok((record, _)) = MessageRecord::decode(&raw, false) else {
                continue;
            };
            let matches = if unique {
                record.uniq_key() == Some(key)
            } else {
                record
                    .keys()
                    .is_some_and(|keys| keys.split(' ').any(|k| k == key))
            };
            if matches
                && record.topic == topic
                && (begin_ms..=end_ms).contains(&record.store_timestamp)
            {
                found.push(raw);
            }
        }
        Ok(found)
    }

    /// (min, max) queue offsets of a queue; (0, 0) for a queue never written.
    pub fn queue_offsets(&self, topic: &str, queue_id: i32) -> (u64, u64) {
        self.queue(topic, queue_id).map_or((0, 0), |queue| {
            let queue = queue.read().unwrap_or_else(PoisonError::into_inner);
            (queue.min_offset(), queue.max_offset())
        })
    }

    /// The queue offset for a point in time: with [`Boundary::Lower`] the first message stored at
    /// or after `timestamp_ms`, with [`Boundary::Upper`] the last one stored at or before it
    /// (SEARCH_OFFSET_BY_TIMESTAMP). Store times grow along a queue, so this is a binary search.
    pub fn search_offset(
        &self,
        topic: &str,
        queue_id: i32,
        timestamp_ms: i64,
        boundary: Boundary,
    ) -> Result<u64, StoreError> {
        let (min, max) = self.queue_offsets(topic, queue_id);
        let store_time = |queue_offset: u64| -> Result<i64, StoreError> {
            let entry = self
                .queue_entries(topic, queue_id, queue_offset, 1)?
                .into_iter()
                .next()
                .ok_or(StoreError::OffsetOutOfRange {
                    offset: queue_offset,
                    min,
                    max,
                })?;
            let raw = self.read_at(entry.commit_offset)?;
            Ok(MessageRecord::decode(&raw, false)?.0.store_timestamp)
        };
        // First offset in [min, max) whose store time passes `after`; max when none does.
        let partition = |after: &dyn Fn(i64) -> bool| -> Result<u64, StoreError> {
            let (mut low, mut high) = (min, max);
            while low < high {
                let middle = low + (high - low) / 2;
                if after(store_time(middle)?) {
                    high = middle;
                } else {
                    low = middle + 1;
                }
            }
            Ok(low)
        };
        match boundary {
            Boundary::Lower => partition(&|time| time >= timestamp_ms),
            Boundary::Upper => Ok(partition(&|time| time > timestamp_ms)?
                .saturating_sub(1)
                .max(min)),
        }
    }

    /// Deletes whole old commit-log segments (by total size and age) and the index files that only
    /// point into them. Returns what the commit log dropped.
    pub fn apply_retention(
        &self,
        max_bytes: Option<u64>,
        max_age: Option<std::time::Duration>,
    ) -> Result<super::commit_log::Retention, StoreError> {
        let report = self.commit_log.apply_retention(max_bytes, max_age)?;
        if report.segments_deleted > 0 {
            let queues: Vec<_> = self
                .queues
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect();
            for queue in queues {
                queue
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .delete_below_commit_offset(report.min_offset)?;
            }
            self.keys
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .delete_below_commit_offset(report.min_offset)?;
        }
        Ok(report)
    }

    pub fn commit_log(&self) -> &CommitLog {
        &self.commit_log
    }

    /// Flushes the commit log and the consume queues, then records how far indexing is durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let dispatched = {
            let _put = lock(&self.put_lock);
            self.commit_log.max_offset()
        };
        self.commit_log.flush()?;
        let queues: Vec<_> = self
            .queues
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for queue in queues {
            queue
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .flush()?;
        }
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()?;
        replace_file(
            &self.config.data_dir,
            DISPATCH_CHECKPOINT,
            &dispatched.to_be_bytes(),
        )
    }
}

impl Drop for MessageStore {
    fn drop(&mut self) {
        // A missed checkpoint only makes the next start re-index more.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::message::{Properties, decode_records, property};
    use std::path::Path;

    fn message(topic: &str, queue_id: i32, index: usize) -> MessageRecord {
        MessageRecord {
            topic: topic.into(),
            queue_id,
            body: Bytes::from(format!("body-{index}")),
            properties: Properties::from([
                (
                    property::TAGS.to_owned(),
                    if index.is_multiple_of(2) {
                        "even"
                    } else {
                        "odd"
                    }
                    .to_owned(),
                ),
                (property::KEYS.to_owned(), format!("key-{index}")),
            ]),
            born_host: "127.0.0.1:5555".parse().expect("addr"),
            ..MessageRecord::default()
        }
    }

    fn config(dir: &Path) -> MessageStoreConfig {
        let mut config = MessageStoreConfig::new(dir, "127.0.0.1:10911".parse().expect("addr"));
        config.commit_log.segment_size = 2048;
        config.entries_per_queue_file = 16;
        config
    }

    #[test]
    fn puts_get_dense_queue_offsets_and_read_back_as_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MessageStore::open(config(dir.path())).expect("open");
        for index in 0..40 {
            let result = store
                .put(message("T", index as i32 % 2, index))
                .expect("put");
            assert_eq!(result.queue_offset, index as u64 / 2);
        }
        assert_eq!(store.queue_offsets("T", 1), (0, 20));
        assert_eq!(store.queue_offsets("other", 0), (0, 0));
        let raw = store.read_queue("T", 0, 3, 5, |_| true).expect("read");
        let records = decode_records(&Bytes::from(raw.concat()), true).expect("records");
        let bodies: Vec<_> = records.iter().map(|r| r.body.clone()).collect();
        assert_eq!(
            bodies,
            (3..8)
                .map(|i| Bytes::from(format!("body-{}", i * 2)))
                .collect::<Vec<_>>()
        );
        assert_eq!(records[0].queue_offset, 3);
        assert_eq!(
            records[0].store_host,
            "127.0.0.1:10911".parse().expect("addr")
        );
        let viewed = store
            .read_at(records[1].physical_offset as u64)
            .expect("view");
        assert_eq!(viewed, raw[1]);
        let odd = java_string_hash("odd") as i64;
        assert!(
            store
                .read_queue("T", 1, 0, 20, |entry| entry.tag_code == odd)
                .expect("filter")
                .len()
                == 20
        );
        assert!(
            store
                .read_queue("T", 0, 0, 20, |entry| entry.tag_code == odd)
                .expect("filter")
                .is_empty()
        );
    }

    #[test]
    fn lost_consume_queues_are_rebuilt_from_the_commit_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = MessageStore::open(config(dir.path())).expect("open");
            for index in 0..50 {
                store
                    .put(message("T", (index % 3) as i32, index))
                    .expect("put");
            }
        }
        // Lose every index file and the checkpoint, as if they had never been flushed.
        fs::remove_dir_all(dir.path().join(CONSUME_QUEUE_DIR)).expect("remove queues");
        fs::remove_file(dir.path().join(DISPATCH_CHECKPOINT)).expect("remove checkpoint");
        let store = MessageStore::open(config(dir.path())).expect("reopen");
        assert_eq!(store.queue_offsets("T", 0), (0, 17));
        assert_eq!(store.queue_offsets("T", 2), (0, 16));
        let next = store.put(message("T", 2, 50)).expect("put after rebuild");
        assert_eq!(next.queue_offset, 16);
        let raw = store.read_queue("T", 2, 16, 1, |_| true).expect("read");
        let (record, _) = MessageRecord::decode(&raw[0], true).expect("record");
        assert_eq!(record.body, Bytes::from("body-50"));
    }

    #[test]
    fn messages_are_found_by_key_and_unique_key_after_a_rebuild() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = MessageStore::open(config(dir.path())).expect("open");
            for index in 0..12 {
                let mut record = message("T", 0, index);
                record
                    .properties
                    .insert(property::UNIQ_KEY.into(), format!("U{index}"));
                store.put(record).expect("put");
            }
        }
        fs::remove_dir_all(dir.path().join(KEY_INDEX_DIR)).expect("lose the index");
        fs::remove_file(dir.path().join(DISPATCH_CHECKPOINT)).expect("remove checkpoint");
        let store = MessageStore::open(config(dir.path())).expect("reopen");
        let by_key = store
            .query_by_key("T", "key-5", false, 0, i64::MAX, 10)
            .expect("query");
        assert_eq!(by_key.len(), 1);
        let (record, _) = MessageRecord::decode(&by_key[0], true).expect("record");
        assert_eq!(record.body, Bytes::from("body-5"));
        let by_uniq = store
            .query_by_key("T", "U7", true, 0, i64::MAX, 10)
            .expect("query");
        assert_eq!(
            MessageRecord::decode(&by_uniq[0], true)
                .expect("record")
                .0
                .body,
            Bytes::from("body-7")
        );
        assert!(
            store
                .query_by_key("T", "U7", false, 0, i64::MAX, 10)
                .expect("query")
                .is_empty()
        );
        assert!(
            store
                .query_by_key("T", "key-5", false, 0, 1, 10)
                .expect("query")
                .is_empty(),
            "time range"
        );
        assert!(
            store
                .query_by_key("other", "key-5", false, 0, i64::MAX, 10)
                .expect("query")
                .is_empty()
        );
    }

    #[test]
    fn offsets_are_found_by_store_time_and_retention_trims_the_queues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MessageStore::open(config(dir.path())).expect("open");
        let mut times = Vec::new();
        for index in 0..60 {
            let put = store.put(message("T", 0, index)).expect("put");
            let raw = store.read_at(put.commit_offset).expect("read");
            times.push(
                MessageRecord::decode(&raw, false)
                    .expect("record")
                    .0
                    .store_timestamp,
            );
        }
        let middle = times[30];
        let first_at = times.iter().position(|t| *t >= middle).expect("some") as u64;
        let last_at = times.iter().rposition(|t| *t <= middle).expect("some") as u64;
        assert_eq!(
            store
                .search_offset("T", 0, middle, Boundary::Lower)
                .expect("lower"),
            first_at
        );
        assert_eq!(
            store
                .search_offset("T", 0, middle, Boundary::Upper)
                .expect("upper"),
            last_at
        );
        assert_eq!(
            store
                .search_offset("T", 0, 0, Boundary::Lower)
                .expect("before all"),
            0
        );
        assert_eq!(
            store
                .search_offset("T", 0, i64::MAX, Boundary::Lower)
                .expect("after all"),
            60
        );

        let report = store.apply_retention(Some(4096), None).expect("retention");
        assert!(report.segments_deleted > 0);
        let (min, max) = store.queue_offsets("T", 0);
        assert_eq!(max, 60);
        assert!(min > 0, "whole queue files went with the segments");
        let raw = store
            .read_queue("T", 0, min, 100, |_| true)
            .expect("read the rest");
        assert!(raw.iter().all(|r| MessageRecord::decode(r, true).is_ok()));
    }

    #[test]
    fn an_invalid_record_is_refused_and_takes_no_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MessageStore::open(config(dir.path())).expect("open");
        let mut bad = message("T", 0, 0);
        bad.properties.insert("huge".into(), "x".repeat(40_000));
        assert!(matches!(store.put(bad), Err(StoreError::InvalidRecord(_))));
        assert_eq!(store.put(message("T", 0, 1)).expect("put").queue_offset, 0);
    }
    #[test]
    fn invalid_topics_and_queue_ids_never_reach_the_disk() {
        let parent = tempfile::tempdir().expect("tempdir");
        let data = parent.path().join("data");
        let store = MessageStore::open(config(&data)).expect("open");
        for (topic, queue_id) in [
            ("%DLQ%../../../escaped", 0),
            ("%RETRY%../../T", 0),
            ("a\0b", 0),
            ("T", -3),
            ("T", names::MAX_QUEUES),
        ] {
            let refused = store.put(message(topic, queue_id, 0));
            assert!(
                matches!(refused, Err(StoreError::InvalidName(_))),
                "{topic:?} {queue_id}: {refused:?}"
            );
        }
        assert_eq!(store.commit_log().max_offset(), 0, "nothing was appended");
        assert!(!parent.path().join("escaped").exists());
        let queues: Vec<_> = fs::read_dir(data.join(CONSUME_QUEUE_DIR))
            .map(|dirs| dirs.flatten().map(|dir| dir.file_name()).collect())
            .unwrap_or_default();
        assert!(queues.is_empty(), "{queues:?}");
    }
}
