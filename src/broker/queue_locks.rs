//! Queue locks for orderly consumers (LOCK_BATCH_MQ / UNLOCK_BATCH_MQ): a queue of a group is
//! consumed by one client at a time, and a lock not renewed within [`LOCK_LIFETIME`] lapses, so a
//! client that died frees its queues. Java's broker keeps the same 60 s rule.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a lock holds without renewal (clients renew every 20 s).
pub const LOCK_LIFETIME: Duration = Duration::from_secs(60);
/// Locks kept at most: a bound on what lock requests can make the broker hold.
pub const MAX_LOCKS: usize = 1_000_000;

/// (group, topic, queue id)
type QueueKey = (String, String, i32);

#[derive(Default)]
pub struct QueueLocks {
    held: Mutex<HashMap<QueueKey, (String, Instant)>>,
}

impl QueueLocks {
    fn lock(&self) -> MutexGuard<'_, HashMap<QueueKey, (String, Instant)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks (or renews) each `(topic, queue)` for `client` where no other live client holds it;
    /// returns the ones `client` now holds.
    pub fn try_lock<'a>(
        &self,
        group: &str,
        client: &str,
        queues: impl IntoIterator<Item = (&'a str, i32)>,
        now: Instant,
    ) -> Vec<(&'a str, i32)> {
        let mut held = self.lock();
        if held.len() >= MAX_LOCKS {
            held.retain(|_, (_, at)| now.duration_since(*at) < LOCK_LIFETIME);
        }
        let mut granted = Vec::new();
        for (topic, queue) in queues {
            let key = (group.to_owned(), topic.to_owned(), queue);
            let free = match held.get(&key) {
                Some((owner, at)) => owner == client || now.duration_since(*at) >= LOCK_LIFETIME,
                None => held.len() < MAX_LOCKS,
            };
            if free {
                held.insert(key, (client.to_owned(), now));
                granted.push((topic, queue));
            }
        }
        granted
    }

    /// Releases the queues `client` holds among those given.
    pub fn unlock<'a>(
        &self,
        group: &str,
        client: &str,
        queues: impl IntoIterator<Item = (&'a str, i32)>,
    ) {
        let mut held = self.lock();
        for (topic, queue) in queues {
            let key = (group.to_owned(), topic.to_owned(), queue);
            if held.get(&key).is_some_and(|(owner, _)| owner == client) {
                held.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_holds_a_queue_until_it_unlocks_or_lapses() {
        let locks = QueueLocks::default();
        let start = Instant::now();
        assert_eq!(
            locks.try_lock("g", "c1", [("T", 0), ("T", 1)], start).len(),
            2
        );
        assert!(locks.try_lock("g", "c2", [("T", 0)], start).is_empty());
        assert_eq!(
            locks.try_lock("other", "c2", [("T", 0)], start),
            vec![("T", 0)],
            "groups lock separately"
        );
        locks.unlock("g", "c2", [("T", 0)]);
        assert!(
            locks.try_lock("g", "c2", [("T", 0)], start).is_empty(),
            "only the owner unlocks"
        );
        locks.unlock("g", "c1", [("T", 0)]);
        assert_eq!(locks.try_lock("g", "c2", [("T", 0)], start).len(), 1);
        let later = start + LOCK_LIFETIME;
        assert_eq!(
            locks.try_lock("g", "c2", [("T", 1)], later),
            vec![("T", 1)],
            "c1's lock on queue 1 lapsed"
        );
    }
}
