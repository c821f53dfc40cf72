//! What every request handler of the broker shares.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::clients::ClientRegistry;
use super::config::BrokerConfig;
use super::pop::PopState;
use super::queue_locks::QueueLocks;
use super::schedule::{Scheduler, parse_delay_levels};
use super::store::metadata::{SubscriptionGroupConfig, TopicConfig, perm};
use super::store::{MessageStore, Metadata, StoreError};
use super::transaction::Transactions;
use super::uniq_key::UniqKeyGenerator;

/// The topic Java producers fall back to when asking for the route of a topic that does not exist
/// yet; serving it is what lets auto-creation work.
pub const AUTO_CREATE_TOPIC: &str = crate::names::AUTO_CREATE_TOPIC;

pub struct BrokerState {
    pub config: BrokerConfig,
    pub store: MessageStore,
    pub metadata: Metadata,
    pub clients: ClientRegistry,
    pub uniq_keys: UniqKeyGenerator,
    /// Delayed messages waiting for their time.
    pub scheduler: Scheduler,
    /// Half messages waiting for their producer's decision.
    pub transactions: Transactions,
    /// What each POP consumer group has in flight.
    pub pop: PopState,
    pub delay_levels: Vec<std::time::Duration>,
    /// Woken when a delayed message is scheduled, so the scheduler can move its next wake-up.
    pub scheduled: Notify,
    /// Woken per topic on every stored message, so that parked pulls and pops look again.
    pub arrivals: crate::broker::arrivals::Arrivals,
    pub parked_pulls: AtomicUsize,
    /// Orderly consumers' queue locks.
    pub queue_locks: QueueLocks,
    queue_cursor: AtomicU32,
}

impl BrokerState {
    pub fn open(config: BrokerConfig) -> Result<Self, StoreError> {
        let store = MessageStore::open(config.store_config())?;
        let delay_levels =
            parse_delay_levels(&config.delay_levels).map_err(|error| StoreError::Metadata {
                file: "delay_levels".into(),
                reason: error.to_string(),
            })?;
        let scheduler = Scheduler::open(&config.data_dir, &store)?;
        let transactions = Transactions::open(&store)?;
        let pop = PopState::open(&store)?;
        let metadata = Metadata::open(config.data_dir.join("config"))?;
        if config.auto_create_topic && metadata.topic(AUTO_CREATE_TOPIC).is_none() {
            metadata.put_topic(TopicConfig {
                topic_name: AUTO_CREATE_TOPIC.into(),
                read_queue_nums: config.default_queue_nums,
                write_queue_nums: config.default_queue_nums,
                perm: perm::READ_WRITE | perm::INHERIT,
                ..TopicConfig::default()
            })?;
        }
        metadata.persist()?;
        let ip = config
            .advertised()
            .parse::<std::net::SocketAddr>()
            .map(|addr| addr.ip())
            .unwrap_or(config.listen.ip());
        Ok(Self {
            uniq_keys: UniqKeyGenerator::new(ip),
            config,
            store,
            metadata,
            clients: ClientRegistry::default(),
            scheduler,
            transactions,
            pop,
            delay_levels,
            scheduled: Notify::new(),
            arrivals: Default::default(),
            parked_pulls: AtomicUsize::new(0),
            queue_locks: QueueLocks::default(),
            queue_cursor: AtomicU32::new(0),
        })
    }

    /// The topic's configuration, creating it when auto-creation is on. `Ok(None)`: no such topic;
    /// `Err`: the name may not be stored.
    pub fn topic_for_send(&self, topic: &str) -> Result<Option<TopicConfig>, StoreError> {
        if let Some(config) = self.metadata.topic(topic) {
            return Ok(Some(config));
        }
        if !self.config.auto_create_topic {
            return Ok(None);
        }
        let config = TopicConfig {
            topic_name: topic.to_owned(),
            read_queue_nums: self.config.default_queue_nums,
            write_queue_nums: self.config.default_queue_nums,
            ..TopicConfig::default()
        };
        self.metadata.put_topic(config.clone())?;
        Ok(Some(config))
    }

    /// A topic the broker itself creates (retry and dead-letter topics): one queue, read-write.
    pub fn ensure_system_topic(&self, topic: &str) -> Result<TopicConfig, StoreError> {
        if let Some(config) = self.metadata.topic(topic) {
            return Ok(config);
        }
        let config = TopicConfig {
            topic_name: topic.to_owned(),
            read_queue_nums: 1,
            write_queue_nums: 1,
            ..TopicConfig::default()
        };
        self.metadata.put_topic(config.clone())?;
        Ok(config)
    }

    /// A subscription group's configuration, created with defaults on first use as Java does.
    pub fn group(&self, group: &str) -> Result<SubscriptionGroupConfig, StoreError> {
        if let Some(config) = self.metadata.group(group) {
            return Ok(config);
        }
        let config = SubscriptionGroupConfig {
            group_name: group.to_owned(),
            ..SubscriptionGroupConfig::default()
        };
        self.metadata.put_group(config.clone())?;
        Ok(config)
    }

    /// A write queue for a send that left the choice to the broker.
    pub fn pick_queue(&self, write_queue_nums: i32) -> i32 {
        let next = self.queue_cursor.fetch_add(1, Ordering::Relaxed);
        (next % write_queue_nums.max(1) as u32) as i32
    }
}
