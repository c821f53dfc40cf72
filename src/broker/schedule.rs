//! Delayed delivery: `DELAY` levels, `TIMER_DELIVER_MS`, `TIMER_DELAY_MS` and `TIMER_DELAY_SEC`.
//!
//! A delayed message is stored at once (so a sync-flush send is durable before it is answered) in
//! the system topic [`SCHEDULE_TOPIC`], queue 0, with its real topic, queue and absolute delivery
//! time in properties. A scheduler keeps the pending entries in a min-heap
//! by delivery time and re-puts each to its real topic when due. What has been delivered is tracked
//! by a low-water mark (every schedule-queue offset below it is delivered), persisted periodically;
//! after a crash, entries above the mark that were already delivered go out again: delivery is at
//! least once, as in Java.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::store::{MessageStore, StoreError, metadata::replace_file};
use crate::log_throttle::LogThrottle;
use crate::names;
use crate::remoting::message::{MessageRecord, Properties};

/// The system topic holding messages until they are due (Java's name).
pub const SCHEDULE_TOPIC: &str = crate::names::SCHEDULE_TOPIC;
const SCHEDULE_QUEUE: i32 = 0;
const PROGRESS_FILE: &str = "schedule.offset";

/// Property keys of delayed messages.
pub mod property {
    pub const DELAY: &str = "DELAY";
    pub const TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
    pub const TIMER_DELAY_MS: &str = "TIMER_DELAY_MS";
    pub const TIMER_DELAY_SEC: &str = "TIMER_DELAY_SEC";
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    pub const REAL_QID: &str = "REAL_QID";
}

/// Java's default `messageDelayLevel`.
pub const DEFAULT_DELAY_LEVELS: &str = "1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h";

/// Why a delay could not be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelayError {
    #[error("invalid delay level list {0:?}: each item is a number with ms, s, m, h or d")]
    BadLevels(String),
    #[error("invalid {property} value {value:?}")]
    BadValue {
        property: &'static str,
        value: String,
    },
    #[error("a delay of {delay_ms} ms exceeds the maximum of {max_ms} ms")]
    TooLong { delay_ms: i64, max_ms: i64 },
}

/// Parses a level list such as `"1s 5s 10s 1m 2h"`; level n is item n (1-based).
pub fn parse_delay_levels(text: &str) -> Result<Vec<Duration>, DelayError> {
    let bad = || DelayError::BadLevels(text.to_owned());
    let levels = text
        .split_whitespace()
        .map(|item| {
            let split = item.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            let (number, unit) = item.split_at(split);
            let number: u64 = number.parse().map_err(|_| bad())?;
            let millis = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            Ok(Duration::from_millis(number * millis))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if levels.is_empty() {
        return Err(bad());
    }
    Ok(levels)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// When a message with these properties is due, if it is delayed at all.
pub fn delivery_time(
    properties: &Properties,
    levels: &[Duration],
    max_delay: Duration,
    now_ms: i64,
) -> Result<Option<i64>, DelayError> {
    let number = |key: &'static str| -> Result<Option<i64>, DelayError> {
        properties
            .get(key)
            .map(|value| {
                value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| DelayError::BadValue {
                        property: key,
                        value: value.clone(),
                    })
            })
            .transpose()
    };
    let due = if let Some(at) = number(property::TIMER_DELIVER_MS)? {
        at
    } else if let Some(delay) = number(property::TIMER_DELAY_MS)? {
        now_ms.saturating_add(delay)
    } else if let Some(delay) = number(property::TIMER_DELAY_SEC)? {
        now_ms.saturating_add(delay.saturating_mul(1000))
    } else if let Some(level) = number(property::DELAY)? {
        if level <= 0 {
            return Ok(None);
        }
        // Levels past the last one mean the last one, as in Java.
        let index = (level as usize).min(levels.len()).saturating_sub(1);
        let delay = levels.get(index).copied().unwrap_or_default();
        now_ms.saturating_add(delay.as_millis() as i64)
    } else {
        return Ok(None);
    };
    let max_ms = max_delay.as_millis() as i64;
    if due - now_ms > max_ms {
        return Err(DelayError::TooLong {
            delay_ms: due - now_ms,
            max_ms,
        });
    }
    Ok((due > now_ms).then_some(due))
}

/// Throttles the warning for skipped schedule entries: a planted batch must not flood the log.
static SKIPPED_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

fn skip_entry(offset: u64, reason: &str) {
    if let Some(skipped) = SKIPPED_LOG.allow() {
        tracing::warn!(
            offset,
            reason,
            skipped,
            "scheduled message not delivered: invalid target"
        );
    }
}

/// Takes REAL_TOPIC and REAL_QID out of a schedule entry; `Err` says why they are unusable.
fn real_target(record: &mut MessageRecord) -> Result<(String, i32), String> {
    let topic = record
        .properties
        .remove(property::REAL_TOPIC)
        .ok_or("no REAL_TOPIC")?;
    names::validate_client_topic(&topic).map_err(|error| error.to_string())?;
    let queue_id = record
        .properties
        .remove(property::REAL_QID)
        .ok_or("no REAL_QID")?;
    let queue_id = queue_id
        .trim()
        .parse::<i32>()
        .map_err(|_| format!("REAL_QID {} is not a number", names::shown(&queue_id)))?;
    names::validate_queue_id(&topic, queue_id).map_err(|error| error.to_string())?;
    Ok((topic, queue_id))
}

/// Pending delayed messages and delivery progress.
pub struct Scheduler {
    progress_dir: PathBuf,
    state: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// (due time, schedule-queue offset), earliest first.
    heap: BinaryHeap<Reverse<(i64, u64)>>,
    /// Delivered offsets at or above `low_water`.
    delivered: BTreeSet<u64>,
    /// Every offset below this is delivered.
    low_water: u64,
    persisted_low_water: u64,
}

impl Scheduler {
    /// Loads progress from `progress_dir` and rebuilds the pending set from the schedule queue.
    pub fn open(progress_dir: &Path, store: &MessageStore) -> Result<Self, StoreError> {
        let low_water = match std::fs::read(progress_dir.join(PROGRESS_FILE)) {
            Ok(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            Err(_) => 0,
        };
        let (min, max) = store.queue_offsets(SCHEDULE_TOPIC, SCHEDULE_QUEUE);
        let low_water = low_water.max(min);
        let mut pending = Pending {
            low_water,
            persisted_low_water: low_water,
            ..Pending::default()
        };
        let mut offset = low_water;
        while offset < max {
            let entries = store.queue_entries(SCHEDULE_TOPIC, SCHEDULE_QUEUE, offset, 1024)?;
            if entries.is_empty() {
                break;
            }
            for entry in &entries {
                let raw = store.read_at(entry.commit_offset)?;
                let (record, _) = MessageRecord::decode(&raw, false)?;
                let due = record
                    .properties
                    .get(property::TIMER_DELIVER_MS)
                    .and_then(|due| due.parse().ok())
                    .unwrap_or(0);
                pending.heap.push(Reverse((due, offset)));
                offset += 1;
            }
        }
        Ok(Self {
            progress_dir: progress_dir.to_owned(),
            state: Mutex::new(pending),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a delayed message in the schedule topic; it will be delivered at `due_ms`.
    pub fn schedule(
        &self,
        store: &MessageStore,
        mut record: MessageRecord,
        due_ms: i64,
    ) -> Result<super::store::PutResult, StoreError> {
        record.properties.insert(
            property::REAL_TOPIC.to_owned(),
            std::mem::take(&mut record.topic),
        );
        record
            .properties
            .insert(property::REAL_QID.to_owned(), record.queue_id.to_string());
        record
            .properties
            .insert(property::TIMER_DELIVER_MS.to_owned(), due_ms.to_string());
        record.topic = SCHEDULE_TOPIC.to_owned();
        record.queue_id = SCHEDULE_QUEUE;
        let put = store.put(record)?;
        self.lock().heap.push(Reverse((due_ms, put.queue_offset)));
        Ok(put)
    }

    /// When the next message is due, if any is pending.
    pub fn next_due(&self) -> Option<i64> {
        self.lock().heap.peek().map(|Reverse((due, _))| *due)
    }

    /// Moves every message due by `now_ms` to its real topic. Returns how many moved.
    pub fn deliver_due(&self, store: &MessageStore, now_ms: i64) -> Result<usize, StoreError> {
        let mut delivered = 0;
        loop {
            let next = {
                let mut pending = self.lock();
                match pending.heap.peek() {
                    Some(Reverse((due, _))) if *due <= now_ms => pending.heap.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((_, offset))) = next else {
                break;
            };
            let raw = match store
                .queue_entries(SCHEDULE_TOPIC, SCHEDULE_QUEUE, offset, 1)?
                .first()
            {
                Some(entry) => store.read_at(entry.commit_offset)?,
                // Removed by retention: nothing left to deliver.
                None => {
                    self.mark_delivered(offset);
                    continue;
                }
            };
            let (mut record, _) = MessageRecord::decode(&raw, false)?;
            // The target is re-checked: the entry may predate name checks, or have been written
            // by a client when sends to this topic were still allowed.
            let target = match real_target(&mut record) {
                Ok(target) => target,
                Err(reason) => {
                    skip_entry(offset, &reason);
                    self.mark_delivered(offset);
                    continue;
                }
            };
            (record.topic, record.queue_id) = target;
            for key in [
                property::DELAY,
                property::TIMER_DELIVER_MS,
                property::TIMER_DELAY_MS,
                property::TIMER_DELAY_SEC,
            ] {
                record.properties.remove(key);
            }
            match store.put(record) {
                Ok(_) => delivered += 1,
                // The store refuses this entry for good: skip it, so later ones still go out.
                Err(error @ (StoreError::InvalidName(_) | StoreError::InvalidRecord(_))) => {
                    skip_entry(offset, &error.to_string());
                }
                Err(error) => {
                    // Transient (I/O): try this entry again on the next pass.
                    self.lock().heap.push(Reverse((now_ms, offset)));
                    return Err(error);
                }
            }
            self.mark_delivered(offset);
        }
        Ok(delivered)
    }

    fn mark_delivered(&self, offset: u64) {
        let mut pending = self.lock();
        pending.delivered.insert(offset);
        loop {
            let low_water = pending.low_water;
            if !pending.delivered.remove(&low_water) {
                break;
            }
            pending.low_water += 1;
        }
    }

    /// Writes the delivery progress if it moved.
    pub fn persist(&self) -> Result<(), StoreError> {
        let low_water = {
            let pending = self.lock();
            if pending.low_water == pending.persisted_low_water {
                return Ok(());
            }
            pending.low_water
        };
        replace_file(&self.progress_dir, PROGRESS_FILE, &low_water.to_be_bytes())?;
        self.lock().persisted_low_water = low_water;
        Ok(())
    }

    /// Messages waiting for their time.
    pub fn pending(&self) -> usize {
        self.lock().heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::message::property as message_property;
    use bytes::Bytes;

    #[test]
    fn levels_and_timer_properties() {
        let levels = parse_delay_levels(DEFAULT_DELAY_LEVELS).expect("levels");
        assert_eq!(levels.len(), 18);
        assert_eq!(levels[17], Duration::from_secs(7200));
        assert!(parse_delay_levels("1x").is_err());
        assert!(parse_delay_levels("").is_err());
        let max = Duration::from_secs(86_400);
        let with = |key: &str, value: &str| Properties::from([(key.to_owned(), value.to_owned())]);
        assert_eq!(
            delivery_time(&with("DELAY", "3"), &levels, max, 1000).expect("ok"),
            Some(11_000)
        );
        assert_eq!(
            delivery_time(&with("DELAY", "99"), &levels, max, 0).expect("ok"),
            Some(7_200_000)
        );
        assert_eq!(
            delivery_time(&with("DELAY", "0"), &levels, max, 0).expect("ok"),
            None
        );
        assert_eq!(
            delivery_time(&with("TIMER_DELAY_MS", "250"), &levels, max, 1000).expect("ok"),
            Some(1250)
        );
        assert_eq!(
            delivery_time(&with("TIMER_DELAY_SEC", "2"), &levels, max, 1000).expect("ok"),
            Some(3000)
        );
        assert_eq!(
            delivery_time(&with("TIMER_DELIVER_MS", "500"), &levels, max, 1000).expect("ok"),
            None,
            "past"
        );
        assert!(matches!(
            delivery_time(&with("TIMER_DELAY_SEC", "x"), &levels, max, 0),
            Err(DelayError::BadValue { .. })
        ));
        assert!(matches!(
            delivery_time(&with("TIMER_DELAY_SEC", "999999"), &levels, max, 0),
            Err(DelayError::TooLong { .. })
        ));
        assert_eq!(
            delivery_time(&Properties::new(), &levels, max, 0).expect("ok"),
            None
        );
    }

    fn store(dir: &Path) -> MessageStore {
        MessageStore::open(super::super::store::MessageStoreConfig::new(
            dir,
            "127.0.0.1:10911".parse().expect("addr"),
        ))
        .expect("store")
    }

    fn delayed(index: usize) -> MessageRecord {
        MessageRecord {
            topic: "T".into(),
            queue_id: 2,
            body: Bytes::from(format!("delayed-{index}")),
            properties: Properties::from([(
                message_property::KEYS.to_owned(),
                format!("k{index}"),
            )]),
            ..MessageRecord::default()
        }
    }

    #[test]
    fn messages_move_to_their_topic_when_due_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = store(dir.path());
            let scheduler = Scheduler::open(dir.path(), &store).expect("scheduler");
            for (index, due) in [(0, 3_000), (1, 1_000), (2, 2_000)] {
                scheduler
                    .schedule(&store, delayed(index), due)
                    .expect("schedule");
            }
            assert_eq!(scheduler.next_due(), Some(1_000));
            assert_eq!(scheduler.deliver_due(&store, 999).expect("deliver"), 0);
            assert_eq!(
                store.queue_offsets("T", 2),
                (0, 0),
                "nothing before its time"
            );
            assert_eq!(scheduler.deliver_due(&store, 2_000).expect("deliver"), 2);
            let raw = store.read_queue("T", 2, 0, 10, |_| true).expect("read");
            let bodies: Vec<_> = raw
                .iter()
                .map(|r| MessageRecord::decode(r, true).expect("record").0)
                .map(|record| {
                    assert!(!record.properties.contains_key(property::REAL_TOPIC));
                    record.body
                })
                .collect();
            assert_eq!(
                bodies,
                vec![Bytes::from("delayed-1"), Bytes::from("delayed-2")]
            );
            scheduler.persist().expect("persist");
        }
        // Offset 0 (due at 3000) is still pending; 1 and 2 were delivered, but the low-water mark
        // is still 0, so after a restart they are pending again: at least once.
        let store = store(dir.path());
        let scheduler = Scheduler::open(dir.path(), &store).expect("reopen");
        assert_eq!(scheduler.pending(), 3);
        assert_eq!(scheduler.deliver_due(&store, 5_000).expect("deliver"), 3);
        scheduler.persist().expect("persist");
        let scheduler = Scheduler::open(dir.path(), &store).expect("reopen");
        assert_eq!(
            scheduler.pending(),
            0,
            "the low-water mark passed everything"
        );
    }
    #[test]
    fn entries_with_bad_targets_are_skipped_and_do_not_hold_the_low_water_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = store(dir.path());
            // Entries as a client could once plant them by sending to the schedule topic.
            let plant = |real_topic: Option<&str>, real_qid: Option<&str>| {
                let mut properties =
                    Properties::from([(property::TIMER_DELIVER_MS.to_owned(), "1000".to_owned())]);
                if let Some(topic) = real_topic {
                    properties.insert(property::REAL_TOPIC.to_owned(), topic.to_owned());
                }
                if let Some(qid) = real_qid {
                    properties.insert(property::REAL_QID.to_owned(), qid.to_owned());
                }
                store
                    .put(MessageRecord {
                        topic: SCHEDULE_TOPIC.into(),
                        queue_id: SCHEDULE_QUEUE,
                        body: Bytes::from_static(b"planted"),
                        properties,
                        ..MessageRecord::default()
                    })
                    .expect("plant");
            };
            plant(Some("../../../tmp/x"), Some("0"));
            plant(Some("T"), Some("-3"));
            plant(Some("TBW102"), Some("0"));
            plant(Some(SCHEDULE_TOPIC), Some("0"));
            plant(Some("T"), Some("x"));
            plant(None, Some("0"));
            plant(Some("T"), None);
            plant(Some("T"), Some("1"));
        }
        let store = store(dir.path());
        let scheduler = Scheduler::open(dir.path(), &store).expect("scheduler");
        assert_eq!(scheduler.pending(), 8);
        assert_eq!(scheduler.deliver_due(&store, 2_000).expect("deliver"), 1);
        assert_eq!(
            store.queue_offsets("T", 1),
            (0, 1),
            "the good entry went out"
        );
        assert_eq!(store.queue_offsets("T", 0), (0, 0));
        assert_eq!(store.queue_offsets("TBW102", 0), (0, 0));
        assert!(
            !dir.path()
                .join("consumequeue")
                .join("..")
                .join("tmp")
                .exists()
        );
        scheduler.persist().expect("persist");
        let scheduler = Scheduler::open(dir.path(), &store).expect("reopen");
        assert_eq!(
            scheduler.pending(),
            0,
            "the low-water mark passed the bad entries"
        );
    }
}
