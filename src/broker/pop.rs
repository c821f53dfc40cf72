//! POP consumption state: which messages each group has taken from each queue and until when they
//! stay invisible.
//!
//! Unlike Java, which moves unacknowledged messages to a retry topic through a revive topic, this
//! broker keeps a popped message in its own queue and remembers it as in flight: when its invisible
//! time passes without an ACK it is served again, with its reconsume count raised, or sent to the
//! group's dead-letter topic after the group's maximum. The state is an event log kept in the system
//! topic [`POP_LOG_TOPIC`] (checkpoint, ack, change-invisible-time events as small JSON bodies), so it
//! is as durable as any message and replayed on start: what was popped and not acked before a
//! restart comes back after it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::store::{MessageStore, PutResult, QueueEntry, StoreError};
use crate::remoting::message::MessageRecord;

pub const POP_LOG_TOPIC: &str = "rmq_sys_POP_LOG";
const POP_LOG_QUEUE: i32 = 0;
/// The revive queue id that marks an orderly pop in extraInfo.
pub const ORDER_REVIVE_QID: i32 = 999;

type QueueKey = (String, String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    pop_time: i64,
    invisible_until: i64,
    /// Deliveries before this one: the reconsume count the consumer sees.
    attempts: i32,
}

/// One logged change of POP state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "e")]
enum Event {
    /// Messages popped: (offset, attempts) pairs.
    #[serde(rename = "ck")]
    Checkpoint {
        g: String,
        t: String,
        q: i32,
        pt: i64,
        iu: i64,
        o: Vec<(u64, i32)>,
        /// The queue's pop progress after this pop.
        next: u64,
    },
    #[serde(rename = "ack")]
    Ack {
        g: String,
        t: String,
        q: i32,
        o: u64,
        pt: i64,
    },
    /// Several messages of one pop acked at once (BATCH_ACK): one log record, not one each.
    #[serde(rename = "acks")]
    Acks {
        g: String,
        t: String,
        q: i32,
        o: Vec<u64>,
        pt: i64,
    },
    #[serde(rename = "inv")]
    Invisible {
        g: String,
        t: String,
        q: i32,
        o: u64,
        pt: i64,
        npt: i64,
        iu: i64,
    },
}

/// A message handed out by a pop.
#[derive(Debug, Clone)]
pub struct Popped {
    pub queue_id: i32,
    pub queue_offset: u64,
    /// The stored record, its reconsume count set to this delivery's.
    pub record: Bytes,
}

/// What to pop.
pub struct PopRequest<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub queue_ids: Vec<i32>,
    pub max_messages: usize,
    pub invisible_ms: i64,
    pub now_ms: i64,
    /// initMode MAX: start at the queue's end rather than its start when the group has no progress
    /// yet (unless the queue still holds its first message).
    pub init_at_end: bool,
    pub order: bool,
    /// Deliveries after which a message goes to the dead-letter topic instead.
    pub max_attempts: i32,
    pub dead_letter_topic: String,
}

/// What a pop found.
#[derive(Debug, Default)]
pub struct PopOutcome {
    pub messages: Vec<Popped>,
    /// Messages still waiting in the queues asked for.
    pub rest: u64,
    /// When the earliest in-flight message of these queues becomes visible again.
    pub next_revive_ms: Option<i64>,
    /// Puts made for the pop (log entries, dead letters); wait for the last to be durable.
    pub last_put: Option<PutResult>,
}

#[derive(Default)]
struct State {
    in_flight: HashMap<QueueKey, BTreeMap<u64, InFlight>>,
    progress: HashMap<QueueKey, u64>,
}

/// POP state for the whole broker.
#[derive(Default)]
pub struct PopState {
    state: Mutex<State>,
}

fn key(group: &str, topic: &str, queue_id: i32) -> QueueKey {
    (group.to_owned(), topic.to_owned(), queue_id)
}

impl PopState {
    /// Replays the POP log.
    pub fn open(store: &MessageStore) -> Result<Self, StoreError> {
        let mut state = State::default();
        let (min, max) = store.queue_offsets(POP_LOG_TOPIC, POP_LOG_QUEUE);
        let mut offset = min;
        while offset < max {
            let entries = store.queue_entries(POP_LOG_TOPIC, POP_LOG_QUEUE, offset, 1024)?;
            if entries.is_empty() {
                break;
            }
            for entry in &entries {
                let raw = store.read_at(entry.commit_offset)?;
                let (record, _) = MessageRecord::decode(&raw, false)?;
                // A body we cannot read is skipped: losing one event beats refusing to start.
                if let Ok(event) = serde_json::from_slice::<Event>(&record.body) {
                    apply(&mut state, &event);
                }
                offset += 1;
            }
        }
        Ok(Self {
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(store: &MessageStore, event: &Event) -> Result<PutResult, StoreError> {
        let body = serde_json::to_vec(event).map_err(|error| StoreError::Metadata {
            file: POP_LOG_TOPIC.into(),
            reason: error.to_string(),
        })?;
        store.put(MessageRecord {
            topic: POP_LOG_TOPIC.to_owned(),
            queue_id: POP_LOG_QUEUE,
            body: Bytes::from(body),
            ..MessageRecord::default()
        })
    }

    /// A group's pop progress in a queue, if it has popped there.
    pub fn progress(&self, group: &str, topic: &str, queue_id: i32) -> Option<u64> {
        self.lock()
            .progress
            .get(&key(group, topic, queue_id))
            .copied()
    }

    /// The pop time of an in-flight message.
    pub fn pop_time(&self, group: &str, topic: &str, queue_id: i32, offset: u64) -> Option<i64> {
        self.lock()
            .in_flight
            .get(&key(group, topic, queue_id))
            .and_then(|messages| messages.get(&offset))
            .map(|message| message.pop_time)
    }

    /// Messages a group has popped from a queue and not yet acked.
    pub fn in_flight(&self, group: &str, topic: &str, queue_id: i32) -> usize {
        self.lock()
            .in_flight
            .get(&key(group, topic, queue_id))
            .map_or(0, BTreeMap::len)
    }

    /// Pops: first messages whose invisible time has passed, then new ones. `keep` filters new
    /// messages by their consume-queue entry and record; filtered-out messages are skipped for good.
    pub fn pop(
        &self,
        store: &MessageStore,
        request: &PopRequest<'_>,
        keep: impl Fn(&QueueEntry, &Bytes) -> bool,
    ) -> Result<PopOutcome, StoreError> {
        let mut outcome = PopOutcome::default();
        // One pop at a time: concurrent pops of one group must not hand out the same message.
        let mut state = self.lock();
        for &queue_id in &request.queue_ids {
            if outcome.messages.len() >= request.max_messages {
                break;
            }
            let queue_key = key(request.group, request.topic, queue_id);
            let in_flight = state.in_flight.entry(queue_key.clone()).or_default();
            if request.order
                && in_flight
                    .values()
                    .any(|m| m.invisible_until > request.now_ms)
            {
                // An orderly queue waits until its popped messages are acked or visible again.
                continue;
            }
            let due: Vec<(u64, InFlight)> = in_flight
                .iter()
                .filter(|(_, m)| m.invisible_until <= request.now_ms)
                .map(|(offset, m)| (*offset, *m))
                .take(request.max_messages - outcome.messages.len())
                .collect();
            let mut taken: Vec<(u64, i32)> = Vec::new();
            for (offset, message) in due {
                let attempts = message.attempts + 1;
                let Some(entry) = store
                    .queue_entries(request.topic, queue_id, offset, 1)?
                    .into_iter()
                    .next()
                else {
                    // Deleted by retention: forget it.
                    in_flight.remove(&offset);
                    continue;
                };
                let raw = store.read_at(entry.commit_offset)?;
                if attempts >= request.max_attempts {
                    let (mut dead, _) = MessageRecord::decode(&raw, false)?;
                    dead.properties
                        .insert("DLQ_ORIGIN_TOPIC".into(), dead.topic.clone());
                    dead.topic = request.dead_letter_topic.clone();
                    dead.queue_id = 0;
                    dead.reconsume_times = attempts;
                    outcome.last_put = Some(store.put(dead)?);
                    in_flight.remove(&offset);
                    outcome.last_put = Some(Self::log(
                        store,
                        &Event::Ack {
                            g: request.group.to_owned(),
                            t: request.topic.to_owned(),
                            q: queue_id,
                            o: offset,
                            pt: message.pop_time,
                        },
                    )?);
                    continue;
                }
                outcome.messages.push(Popped {
                    queue_id,
                    queue_offset: offset,
                    record: with_reconsume_times(&raw, attempts)?,
                });
                taken.push((offset, attempts));
            }

            let (min, max) = store.queue_offsets(request.topic, queue_id);
            // A group's first pop starts at the queue's end for initMode MAX, except while the queue
            // still holds its very first message: then at 0, like Java's in-memory rule and like
            // QUERY_CONSUMER_OFFSET answering 0 to new pull consumers.
            let start = match state.progress.get(&queue_key) {
                Some(progress) => (*progress).max(min),
                None if request.init_at_end && min > 0 => max,
                None => min,
            };
            let mut next = start;
            let room = request.max_messages - outcome.messages.len();
            // An orderly queue serves either its revived messages or new ones, never both at once.
            let orderly_busy = request.order && !taken.is_empty();
            if room > 0 && !orderly_busy {
                for entry in store.queue_entries(request.topic, queue_id, start, room)? {
                    let raw = store.read_at(entry.commit_offset)?;
                    let offset = next;
                    next += 1;
                    if keep(&entry, &raw) {
                        outcome.messages.push(Popped {
                            queue_id,
                            queue_offset: offset,
                            record: raw,
                        });
                        taken.push((offset, 0));
                    }
                }
            }
            outcome.rest += max.saturating_sub(next);
            if taken.is_empty() && next == start {
                continue;
            }
            let event = Event::Checkpoint {
                g: request.group.to_owned(),
                t: request.topic.to_owned(),
                q: queue_id,
                pt: request.now_ms,
                iu: request.now_ms + request.invisible_ms,
                o: taken,
                next,
            };
            outcome.last_put = Some(Self::log(store, &event)?);
            apply(&mut state, &event);
        }
        outcome.next_revive_ms = request
            .queue_ids
            .iter()
            .filter_map(|queue_id| {
                state
                    .in_flight
                    .get(&key(request.group, request.topic, *queue_id))
            })
            .flat_map(|messages| messages.values().map(|m| m.invisible_until))
            .min();
        Ok(outcome)
    }

    /// Acknowledges one popped message. A stale handle (from a delivery that already expired and
    /// was handed out again) acknowledges nothing. Returns whether something was acked.
    pub fn ack(
        &self,
        store: &MessageStore,
        group: &str,
        topic: &str,
        queue_id: i32,
        offset: u64,
        pop_time: i64,
    ) -> Result<Option<PutResult>, StoreError> {
        let event = Event::Ack {
            g: group.to_owned(),
            t: topic.to_owned(),
            q: queue_id,
            o: offset,
            pt: pop_time,
        };
        self.log_if_current(store, &event, (group, topic, queue_id, offset, pop_time))
    }

    /// Acknowledges the messages of one pop (same queue and pop time) with one log record; stale
    /// handles among them acknowledge nothing. Returns how many were acked, and the put.
    pub fn ack_many(
        &self,
        store: &MessageStore,
        group: &str,
        topic: &str,
        queue_id: i32,
        offsets: &[u64],
        pop_time: i64,
    ) -> Result<(usize, Option<PutResult>), StoreError> {
        let mut state = self.lock();
        let current: Vec<u64> = match state.in_flight.get(&key(group, topic, queue_id)) {
            Some(messages) => offsets
                .iter()
                .copied()
                .filter(|offset| {
                    messages
                        .get(offset)
                        .is_some_and(|message| message.pop_time == pop_time)
                })
                .collect(),
            None => Vec::new(),
        };
        if current.is_empty() {
            return Ok((0, None));
        }
        let count = current.len();
        let event = Event::Acks {
            g: group.to_owned(),
            t: topic.to_owned(),
            q: queue_id,
            o: current,
            pt: pop_time,
        };
        let put = Self::log(store, &event)?;
        apply(&mut state, &event);
        Ok((count, Some(put)))
    }

    /// Moves a popped message's invisible time. Returns the new pop time when the handle was current.
    #[allow(clippy::too_many_arguments)]
    pub fn change_invisible_time(
        &self,
        store: &MessageStore,
        group: &str,
        topic: &str,
        queue_id: i32,
        offset: u64,
        pop_time: i64,
        invisible_ms: i64,
        now_ms: i64,
    ) -> Result<Option<(i64, PutResult)>, StoreError> {
        let event = Event::Invisible {
            g: group.to_owned(),
            t: topic.to_owned(),
            q: queue_id,
            o: offset,
            pt: pop_time,
            npt: now_ms,
            iu: now_ms + invisible_ms,
        };
        let put = self.log_if_current(store, &event, (group, topic, queue_id, offset, pop_time))?;
        Ok(put.map(|put| (now_ms, put)))
    }

    /// Logs and applies `event` if the handle (group, topic, queue, offset, pop time) still names
    /// the message's current delivery; a stale handle changes nothing.
    fn log_if_current(
        &self,
        store: &MessageStore,
        event: &Event,
        (group, topic, queue_id, offset, pop_time): (&str, &str, i32, u64, i64),
    ) -> Result<Option<PutResult>, StoreError> {
        let mut state = self.lock();
        let current = state
            .in_flight
            .get(&key(group, topic, queue_id))
            .and_then(|messages| messages.get(&offset))
            .is_some_and(|message| message.pop_time == pop_time);
        if !current {
            return Ok(None);
        }
        let put = Self::log(store, event)?;
        apply(&mut state, event);
        Ok(Some(put))
    }
}

fn apply(state: &mut State, event: &Event) {
    match event {
        Event::Checkpoint {
            g,
            t,
            q,
            pt,
            iu,
            o,
            next,
        } => {
            let queue_key = key(g, t, *q);
            let in_flight = state.in_flight.entry(queue_key.clone()).or_default();
            for (offset, attempts) in o {
                in_flight.insert(
                    *offset,
                    InFlight {
                        pop_time: *pt,
                        invisible_until: *iu,
                        attempts: *attempts,
                    },
                );
            }
            let progress = state.progress.entry(queue_key).or_insert(0);
            *progress = (*progress).max(*next);
        }
        Event::Ack { g, t, q, o, pt } => {
            if let Some(messages) = state.in_flight.get_mut(&key(g, t, *q))
                && messages.get(o).is_some_and(|m| m.pop_time == *pt)
            {
                messages.remove(o);
            }
        }
        Event::Acks { g, t, q, o, pt } => {
            if let Some(messages) = state.in_flight.get_mut(&key(g, t, *q)) {
                for offset in o {
                    if messages.get(offset).is_some_and(|m| m.pop_time == *pt) {
                        messages.remove(offset);
                    }
                }
            }
        }
        Event::Invisible {
            g,
            t,
            q,
            o,
            pt,
            npt,
            iu,
        } => {
            if let Some(message) = state
                .in_flight
                .get_mut(&key(g, t, *q))
                .and_then(|messages| messages.get_mut(o))
                .filter(|m| m.pop_time == *pt)
            {
                message.pop_time = *npt;
                message.invisible_until = *iu;
            }
        }
    }
}

/// The record with its reconsume count replaced.
fn with_reconsume_times(raw: &Bytes, attempts: i32) -> Result<Bytes, StoreError> {
    let (mut record, _) = MessageRecord::decode(raw, false)?;
    record.reconsume_times = attempts;
    let mut out = BytesMut::new();
    record.encode(&mut out)?;
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::store::MessageStoreConfig;

    fn store(dir: &std::path::Path) -> MessageStore {
        MessageStore::open(MessageStoreConfig::new(
            dir,
            "127.0.0.1:10911".parse().expect("addr"),
        ))
        .expect("store")
    }

    fn request(now_ms: i64, max: usize) -> PopRequest<'static> {
        PopRequest {
            group: "G",
            topic: "T",
            queue_ids: vec![0, 1],
            max_messages: max,
            invisible_ms: 1_000,
            now_ms,
            init_at_end: false,
            order: false,
            max_attempts: 3,
            dead_letter_topic: "%DLQ%G".into(),
        }
    }

    fn fill(store: &MessageStore, count: usize) {
        for index in 0..count {
            store
                .put(MessageRecord {
                    topic: "T".into(),
                    queue_id: (index % 2) as i32,
                    body: Bytes::from(format!("m{index}")),
                    ..MessageRecord::default()
                })
                .expect("put");
        }
    }

    fn reconsume_times(popped: &Popped) -> i32 {
        MessageRecord::decode(&popped.record, true)
            .expect("record")
            .0
            .reconsume_times
    }

    #[test]
    fn unacked_messages_come_back_after_their_invisible_time_and_then_go_to_dead_letters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        fill(&store, 4);
        let pop = PopState::open(&store).expect("open");
        let first = pop
            .pop(&store, &request(10_000, 32), |_, _| true)
            .expect("pop");
        assert_eq!(first.messages.len(), 4);
        assert!(first.messages.iter().all(|m| reconsume_times(m) == 0));
        // Ack two; the other two stay in flight.
        for message in first.messages.iter().filter(|m| m.queue_id == 0) {
            assert!(
                pop.ack(&store, "G", "T", 0, message.queue_offset, 10_000)
                    .expect("ack")
                    .is_some()
            );
        }
        assert!(
            pop.ack(&store, "G", "T", 0, 0, 9_999)
                .expect("stale")
                .is_none()
        );
        assert!(
            pop.pop(&store, &request(10_500, 32), |_, _| true)
                .expect("pop")
                .messages
                .is_empty(),
            "still invisible"
        );
        let again = pop
            .pop(&store, &request(11_000, 32), |_, _| true)
            .expect("pop");
        assert_eq!(again.messages.len(), 2);
        assert!(
            again
                .messages
                .iter()
                .all(|m| m.queue_id == 1 && reconsume_times(m) == 1)
        );
        let third = pop
            .pop(&store, &request(12_000, 32), |_, _| true)
            .expect("pop");
        assert!(third.messages.iter().all(|m| reconsume_times(m) == 2));
        let fourth = pop
            .pop(&store, &request(13_000, 32), |_, _| true)
            .expect("pop");
        assert!(fourth.messages.is_empty(), "the third attempt was the last");
        assert_eq!(store.queue_offsets("%DLQ%G", 0), (0, 2));
        assert_eq!(pop.in_flight("G", "T", 1), 0);
    }

    #[test]
    fn a_batch_ack_is_one_log_record_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let acked = {
            let store = store(dir.path());
            fill(&store, 4);
            let pop = PopState::open(&store).expect("open");
            let popped = pop
                .pop(&store, &request(10_000, 4), |_, _| true)
                .expect("pop");
            let queue = popped.messages[0].queue_id;
            let offsets: Vec<u64> = popped
                .messages
                .iter()
                .filter(|m| m.queue_id == queue)
                .map(|m| m.queue_offset)
                .collect();
            let logged = store.queue_offsets(POP_LOG_TOPIC, POP_LOG_QUEUE).1;
            let (acked, put) = pop
                .ack_many(&store, "G", "T", queue, &offsets, 10_000)
                .expect("ack");
            assert_eq!(acked, offsets.len());
            assert!(put.is_some());
            assert_eq!(
                store.queue_offsets(POP_LOG_TOPIC, POP_LOG_QUEUE).1,
                logged + 1,
                "one record for the whole batch"
            );
            let (again, put) = pop
                .ack_many(&store, "G", "T", queue, &offsets, 10_000)
                .expect("ack");
            assert_eq!((again, put.is_none()), (0, true), "acked handles are stale");
            assert_eq!(pop.in_flight("G", "T", queue), 0);
            acked
        };
        let store = store(dir.path());
        let pop = PopState::open(&store).expect("replay");
        let total: usize = (0..4).map(|queue| pop.in_flight("G", "T", queue)).sum();
        assert_eq!(total, 4 - acked, "the batch ack was replayed");
        let later = pop
            .pop(&store, &request(11_000, 32), |_, _| true)
            .expect("pop");
        assert_eq!(
            later.messages.len(),
            total,
            "after the restart only the unacked come back"
        );
    }

    #[test]
    fn in_flight_messages_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = store(dir.path());
            fill(&store, 6);
            let pop = PopState::open(&store).expect("open");
            let popped = pop
                .pop(&store, &request(10_000, 4), |_, _| true)
                .expect("pop");
            assert_eq!(popped.messages.len(), 4);
            let kept = &popped.messages[0];
            pop.ack(&store, "G", "T", kept.queue_id, kept.queue_offset, 10_000)
                .expect("ack");
            let moved = &popped.messages[1];
            pop.change_invisible_time(
                &store,
                "G",
                "T",
                moved.queue_id,
                moved.queue_offset,
                10_000,
                60_000,
                10_100,
            )
            .expect("change");
        }
        let store = store(dir.path());
        let pop = PopState::open(&store).expect("replay");
        assert_eq!(pop.in_flight("G", "T", 0) + pop.in_flight("G", "T", 1), 3);
        // At 11 000: two popped-and-unacked come back, plus the two never popped; the one whose
        // invisible time was moved to 70 100 does not.
        let later = pop
            .pop(&store, &request(11_000, 32), |_, _| true)
            .expect("pop");
        assert_eq!(later.messages.len(), 4);
        assert_eq!(
            later
                .messages
                .iter()
                .filter(|m| reconsume_times(m) == 1)
                .count(),
            2
        );
    }

    #[test]
    fn orderly_queues_wait_for_their_acks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        fill(&store, 4);
        let pop = PopState::open(&store).expect("open");
        let mut orderly = request(10_000, 1);
        orderly.order = true;
        orderly.queue_ids = vec![0];
        let first = pop.pop(&store, &orderly, |_, _| true).expect("pop");
        assert_eq!(first.messages[0].queue_offset, 0);
        assert!(
            pop.pop(&store, &orderly, |_, _| true)
                .expect("pop")
                .messages
                .is_empty()
        );
        pop.ack(&store, "G", "T", 0, 0, 10_000).expect("ack");
        let second = pop.pop(&store, &orderly, |_, _| true).expect("pop");
        assert_eq!(second.messages[0].queue_offset, 1);
    }
}
