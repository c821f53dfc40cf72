//! What a client connection's sends to a topic resolve to, kept between its sends. A producer
//! sends to the same few topics over and over, and each send would otherwise repeat the name
//! check, the route lookup, the cluster lookup and the stats lookup: hashes, string compares and,
//! in the maps both serving threads share, lock words that bounce between cores.
//!
//! An entry is used only while the route table and the stats' topic set are the ones it was made
//! from (two counters, read per send); after a new table or a forgotten topic the next send looks
//! again.

use std::sync::Arc;
use std::time::Duration;

use super::Proxy;
use super::failover::ClusterRuntime;
use super::routes::{RouteAction, TopicUsage};
use super::stats::{KeptTopicSends, ProxyStats};
use crate::names;

/// Topics (by request code) a connection keeps; past this the oldest kept one is replaced.
const KEPT_TOPICS: usize = 8;

/// A send topic's route, cluster and counters, as one connection keeps them.
pub struct SendTopic {
    topic: Box<str>,
    code: i32,
    routes_generation: u64,
    pub action: Arc<RouteAction>,
    pub cluster: Arc<ClusterRuntime>,
    /// Set for a route xDS gave: each send marks the topic used, as a lookup would.
    usage: Option<Arc<TopicUsage>>,
    sends: KeptTopicSends,
}

impl SendTopic {
    /// `None` when a send to `topic` cannot go out now: a name a client may not use, no route
    /// yet (on demand, or none matches), or a cluster not (or no longer) running.
    fn resolve(proxy: &Proxy, topic: &str, code: i32, routes_generation: u64) -> Option<Self> {
        names::validate_client_topic(topic).ok()?;
        let table = proxy.routes.snapshot();
        // Only a route known now: one still to be asked for or waited on takes the general path.
        if proxy.ondemand().is_some() && !table.has_xds_topic(topic) {
            return None;
        }
        let (action, usage) = table.lookup_with_usage(topic, code)?;
        let cluster = proxy.cluster(&action.cluster.name)?;
        Some(Self {
            topic: topic.into(),
            code,
            routes_generation,
            action,
            cluster,
            usage,
            sends: proxy.stats.topic_sends(topic),
        })
    }

    /// Counts a stored send of `count` messages, `elapsed` after it arrived.
    pub fn record_sent(&self, stats: &ProxyStats, count: u64, elapsed: Duration) {
        if stats.topic_sends_generation() == self.sends.generation {
            self.sends.sends.record(count, elapsed);
        } else {
            stats.messages_sent(&self.topic, count, elapsed);
        }
    }

    fn is_current(&self, routes_generation: u64, stats_generation: u64) -> bool {
        self.routes_generation == routes_generation && self.sends.generation == stats_generation
    }
}

/// The topics one connection sends to.
#[derive(Default)]
pub struct TopicCache {
    entries: Vec<Arc<SendTopic>>,
    /// The entry a new topic replaces once `KEPT_TOPICS` are kept.
    oldest: usize,
}

impl TopicCache {
    /// What a send of `code` to `topic` resolves to now: the kept entry while it is current, else
    /// a fresh one (kept for the next sends).
    pub fn resolve(&mut self, proxy: &Proxy, topic: &str, code: i32) -> Option<Arc<SendTopic>> {
        // Read before any lookup: a change after this read makes the entry stale at once.
        let routes_generation = proxy.routes.generation();
        let stats_generation = proxy.stats.topic_sends_generation();
        let kept = self
            .entries
            .iter()
            .position(|entry| entry.code == code && *entry.topic == *topic);
        if let Some(entry) = kept.and_then(|index| self.entries.get(index))
            && entry.is_current(routes_generation, stats_generation)
        {
            if let Some(usage) = &entry.usage {
                usage.touch();
            }
            return Some(entry.clone());
        }
        let entry = Arc::new(SendTopic::resolve(proxy, topic, code, routes_generation)?);
        match kept {
            Some(index) => {
                if let Some(slot) = self.entries.get_mut(index) {
                    *slot = entry.clone();
                }
            }
            None if self.entries.len() < KEPT_TOPICS => self.entries.push(entry.clone()),
            None => {
                if let Some(slot) = self.entries.get_mut(self.oldest) {
                    *slot = entry.clone();
                }
                self.oldest = (self.oldest + 1) % KEPT_TOPICS;
            }
        }
        Some(entry)
    }
}
