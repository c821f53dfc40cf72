//! Wake-ups for parked long polls. Pulls wait per topic: a stored message wakes only the pulls of
//! its own topic (one process-wide wake-up made every send wake every parked pull, so 2,100
//! parked pulls cost each send 2,100 queue lookups). Pops still share one wake-up for every
//! store event: with per-topic wake-ups the POP consumer test saw redeliveries, not yet explained.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Arrivals {
    by_topic: DashMap<String, Arc<Notify>>,
    pops: Notify,
}

impl Arrivals {
    /// The wake-up of `topic`, created on first use. Register with `notified()` and `enable()`
    /// before looking at the queue, so an arrival between the look and the wait counts.
    pub fn watch(&self, topic: &str) -> Arc<Notify> {
        if let Some(existing) = self.by_topic.get(topic) {
            return existing.clone();
        }
        self.by_topic
            .entry(topic.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// The wake-up every parked pop waits on.
    pub fn pops(&self) -> &Notify {
        &self.pops
    }

    /// Wakes the pulls parked on `topic`, and every parked pop.
    pub fn notify(&self, topic: &str) {
        if let Some(notify) = self.by_topic.get(topic) {
            notify.notify_waiters();
        }
        self.pops.notify_waiters();
    }

    /// Wakes every parked long poll: for the rare paths that may store into several topics
    /// (delayed deliveries, transaction commits, retries).
    pub fn notify_all(&self) {
        for notify in self.by_topic.iter() {
            notify.notify_waiters();
        }
        self.pops.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_topic_wakes_only_its_own_waiters() {
        let arrivals = Arrivals::default();
        let (a, b) = (arrivals.watch("A"), arrivals.watch("B"));
        let (woken_a, woken_b) = (a.notified(), b.notified());
        tokio::pin!(woken_a, woken_b);
        woken_a.as_mut().enable();
        woken_b.as_mut().enable();
        arrivals.notify("A");
        tokio::time::timeout(Duration::from_secs(5), woken_a)
            .await
            .expect("A's waiter is woken");
        assert!(
            futures::poll!(woken_b.as_mut()).is_pending(),
            "B's waiter sleeps on"
        );
        arrivals.notify_all();
        tokio::time::timeout(Duration::from_secs(5), woken_b)
            .await
            .expect("notify_all wakes B");
    }
}
