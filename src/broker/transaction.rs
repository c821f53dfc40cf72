//! Transactional messages.
//!
//! A half message (property `TRAN_MSG=true`) is stored in the system topic [`HALF_TOPIC`] with its
//! real topic and queue in properties, invisible to consumers. END_TRANSACTION with commit copies it
//! to its real topic; commit or rollback then records an op entry (the half message's commit-log
//! offset) in [`OP_TOPIC`], so the decision survives a restart. Half messages left undecided longer
//! than the transaction timeout are checked back with CHECK_TRANSACTION_STATE sent to a live
//! producer of their group, at the check interval, up to a maximum number of checks, after which
//! they are rolled back. Both topics are replayed on start; check counts restart from zero.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};

use super::schedule::property::{REAL_QID, REAL_TOPIC};
use super::store::{MessageStore, PutResult, StoreError};
use crate::names;
use crate::remoting::message::{MessageRecord, sys_flag};

pub const HALF_TOPIC: &str = crate::names::HALF_TOPIC;
pub const OP_TOPIC: &str = crate::names::OP_TOPIC;
const SYSTEM_QUEUE: i32 = 0;
/// Marks a transactional message (client side).
pub const TRAN_MSG: &str = "TRAN_MSG";
/// The producer group of a transactional message.
pub const PRODUCER_GROUP: &str = "PGROUP";
const TRANSACTION_TYPE_MASK: i32 = 0xC;

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Rollback,
}

struct Pending {
    half_queue_offset: u64,
    stored_ms: i64,
    checks: u32,
    last_check_ms: i64,
}

/// A half message whose producer must be asked what became of it.
pub struct Check {
    pub producer_group: String,
    pub commit_offset: u64,
    pub half_queue_offset: u64,
    /// The half message as its producer sent it: real topic and queue restored.
    pub message: MessageRecord,
    /// The same, encoded, for the request body.
    pub body: Bytes,
}

/// Undecided half messages by commit-log offset.
#[derive(Default)]
pub struct Transactions {
    pending: Mutex<BTreeMap<u64, Pending>>,
}

fn records_of(
    store: &MessageStore,
    topic: &str,
) -> Result<Vec<(u64, u64, MessageRecord)>, StoreError> {
    let (min, max) = store.queue_offsets(topic, SYSTEM_QUEUE);
    let mut records = Vec::new();
    let mut offset = min;
    while offset < max {
        let entries = store.queue_entries(topic, SYSTEM_QUEUE, offset, 1024)?;
        if entries.is_empty() {
            break;
        }
        for entry in entries {
            let raw = store.read_at(entry.commit_offset)?;
            records.push((
                offset,
                entry.commit_offset,
                MessageRecord::decode(&raw, false)?.0,
            ));
            offset += 1;
        }
    }
    Ok(records)
}

/// The half message as the producer sent it.
fn restored(mut half: MessageRecord) -> MessageRecord {
    half.topic = half.properties.remove(REAL_TOPIC).unwrap_or_default();
    half.queue_id = half
        .properties
        .remove(REAL_QID)
        .and_then(|qid| qid.parse().ok())
        .unwrap_or(0);
    half
}

impl Transactions {
    /// Rebuilds the undecided set: half messages without an op entry.
    pub fn open(store: &MessageStore) -> Result<Self, StoreError> {
        let decided: std::collections::HashSet<u64> = records_of(store, OP_TOPIC)?
            .into_iter()
            .filter_map(|(_, _, op)| std::str::from_utf8(&op.body).ok()?.parse().ok())
            .collect();
        let pending = records_of(store, HALF_TOPIC)?
            .into_iter()
            .filter(|(_, commit_offset, _)| !decided.contains(commit_offset))
            .map(|(queue_offset, commit_offset, half)| {
                let pending = Pending {
                    half_queue_offset: queue_offset,
                    stored_ms: half.store_timestamp,
                    checks: 0,
                    last_check_ms: 0,
                };
                (commit_offset, pending)
            })
            .collect();
        Ok(Self {
            pending: Mutex::new(pending),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a half message.
    pub fn prepare(
        &self,
        store: &MessageStore,
        mut record: MessageRecord,
    ) -> Result<PutResult, StoreError> {
        record
            .properties
            .insert(REAL_TOPIC.to_owned(), std::mem::take(&mut record.topic));
        record
            .properties
            .insert(REAL_QID.to_owned(), record.queue_id.to_string());
        record.topic = HALF_TOPIC.to_owned();
        record.queue_id = SYSTEM_QUEUE;
        record.sys_flag =
            (record.sys_flag & !TRANSACTION_TYPE_MASK) | sys_flag::TRANSACTION_PREPARED;
        let put = store.put(record)?;
        self.lock().insert(
            put.commit_offset,
            Pending {
                half_queue_offset: put.queue_offset,
                stored_ms: super::schedule::now_ms(),
                checks: 0,
                last_check_ms: 0,
            },
        );
        Ok(put)
    }

    /// Applies a producer's decision. Returns the committed message's put, or `None` for a
    /// rollback or a half message already decided (END_TRANSACTION may arrive twice).
    pub fn end(
        &self,
        store: &MessageStore,
        commit_offset: u64,
        decision: Decision,
    ) -> Result<Option<PutResult>, StoreError> {
        if self.lock().remove(&commit_offset).is_none() {
            return Ok(None);
        }
        let committed = match decision {
            Decision::Commit => {
                let raw = store.read_at(commit_offset)?;
                let mut message = restored(MessageRecord::decode(&raw, false)?.0);
                message.sys_flag =
                    (message.sys_flag & !TRANSACTION_TYPE_MASK) | sys_flag::TRANSACTION_COMMIT;
                // A half message whose target a client could not send to (one planted before
                // names were checked) is rolled back instead.
                match names::validate_client_topic(&message.topic)
                    .and_then(|()| names::validate_queue_id(&message.topic, message.queue_id))
                {
                    Ok(()) => Some(store.put(message)?),
                    Err(error) => {
                        tracing::warn!(commit_offset, %error, "half message rolled back: invalid target");
                        None
                    }
                }
            }
            Decision::Rollback => None,
        };
        store.put(MessageRecord {
            topic: OP_TOPIC.to_owned(),
            queue_id: SYSTEM_QUEUE,
            body: Bytes::from(commit_offset.to_string()),
            ..MessageRecord::default()
        })?;
        Ok(committed)
    }

    /// Half messages due for a check now; those checked `max_checks` times are rolled back instead.
    pub fn due_checks(
        &self,
        store: &MessageStore,
        now_ms: i64,
        timeout_ms: i64,
        interval_ms: i64,
        max_checks: u32,
    ) -> Result<Vec<Check>, StoreError> {
        let (due, expired): (Vec<u64>, Vec<u64>) = {
            let mut pending = self.lock();
            let mut due = Vec::new();
            let mut expired = Vec::new();
            for (commit_offset, half) in pending.iter_mut() {
                if now_ms - half.stored_ms < timeout_ms || now_ms - half.last_check_ms < interval_ms
                {
                    continue;
                }
                if half.checks >= max_checks {
                    expired.push(*commit_offset);
                } else {
                    half.checks += 1;
                    half.last_check_ms = now_ms;
                    due.push(*commit_offset);
                }
            }
            (due, expired)
        };
        for commit_offset in expired {
            self.end(store, commit_offset, Decision::Rollback)?;
        }
        let mut checks = Vec::new();
        for commit_offset in due {
            let half_queue_offset = match self.lock().get(&commit_offset) {
                Some(pending) => pending.half_queue_offset,
                None => continue,
            };
            let raw = store.read_at(commit_offset)?;
            let message = restored(MessageRecord::decode(&raw, false)?.0);
            let Some(producer_group) = message.properties.get(PRODUCER_GROUP).cloned() else {
                continue;
            };
            let mut body = BytesMut::new();
            message.encode(&mut body)?;
            checks.push(Check {
                producer_group,
                commit_offset,
                half_queue_offset,
                message,
                body: body.freeze(),
            });
        }
        Ok(checks)
    }

    /// Half messages awaiting a decision.
    pub fn undecided(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::message::Properties;

    fn store(dir: &std::path::Path) -> MessageStore {
        MessageStore::open(super::super::store::MessageStoreConfig::new(
            dir,
            "127.0.0.1:10911".parse().expect("addr"),
        ))
        .expect("store")
    }

    fn half(body: &str) -> MessageRecord {
        MessageRecord {
            topic: "T".into(),
            queue_id: 1,
            body: Bytes::from(body.to_owned()),
            properties: Properties::from([
                (TRAN_MSG.to_owned(), "true".to_owned()),
                (PRODUCER_GROUP.to_owned(), "tx_group".to_owned()),
            ]),
            ..MessageRecord::default()
        }
    }

    #[test]
    fn commit_makes_the_message_visible_rollback_never_does_and_decisions_survive_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (commit, rollback, undecided) = {
            let store = store(dir.path());
            let transactions = Transactions::open(&store).expect("open");
            let commit = transactions
                .prepare(&store, half("commit"))
                .expect("prepare");
            let rollback = transactions
                .prepare(&store, half("rollback"))
                .expect("prepare");
            let undecided = transactions
                .prepare(&store, half("undecided"))
                .expect("prepare");
            assert_eq!(
                store.queue_offsets("T", 1),
                (0, 0),
                "half messages are invisible"
            );
            let put = transactions
                .end(&store, commit.commit_offset, Decision::Commit)
                .expect("commit");
            assert!(put.is_some());
            assert!(
                transactions
                    .end(&store, commit.commit_offset, Decision::Commit)
                    .expect("again")
                    .is_none()
            );
            transactions
                .end(&store, rollback.commit_offset, Decision::Rollback)
                .expect("rollback");
            (commit, rollback, undecided)
        };
        let store = store(dir.path());
        let transactions = Transactions::open(&store).expect("reopen");
        assert_eq!(transactions.undecided(), 1);
        let raw = store.read_queue("T", 1, 0, 10, |_| true).expect("read");
        assert_eq!(raw.len(), 1);
        let (visible, _) = MessageRecord::decode(&raw[0], true).expect("record");
        assert_eq!(visible.body, Bytes::from("commit"));
        assert_eq!(
            visible.sys_flag & TRANSACTION_TYPE_MASK,
            sys_flag::TRANSACTION_COMMIT
        );
        let _ = (commit, rollback);

        let now = super::super::schedule::now_ms() + 10_000;
        let checks = transactions
            .due_checks(&store, now, 6_000, 1_000, 2)
            .expect("checks");
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].commit_offset, undecided.commit_offset);
        assert_eq!(checks[0].message.topic, "T");
        assert_eq!(checks[0].producer_group, "tx_group");
        assert!(
            transactions
                .due_checks(&store, now + 500, 6_000, 1_000, 2)
                .expect("checks")
                .is_empty(),
            "interval"
        );
        assert_eq!(
            transactions
                .due_checks(&store, now + 1_000, 6_000, 1_000, 2)
                .expect("checks")
                .len(),
            1
        );
        assert!(
            transactions
                .due_checks(&store, now + 2_000, 6_000, 1_000, 2)
                .expect("checks")
                .is_empty()
        );
        assert_eq!(
            transactions.undecided(),
            0,
            "rolled back after the last check"
        );
        assert_eq!(store.queue_offsets("T", 1), (0, 1));
    }
}
