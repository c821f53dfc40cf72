//! Settings of the bundled broker, from the command line or a YAML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{FlushPolicy, MessageStoreConfig};
use crate::remoting::frame::DEFAULT_MAX_FRAME;

/// When the broker acknowledges a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Once the message is in the page cache; fsync runs periodically.
    #[default]
    Async,
    /// Once the message is fsynced; concurrent sends share fsyncs.
    Sync,
}

/// Everything the broker needs to run. Field names are the YAML keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address clients are told to use in route data; the listen address when absent.
    pub advertised_address: Option<String>,
    pub broker_name: String,
    pub cluster: String,
    pub data_dir: PathBuf,
    pub flush: FlushMode,
    /// Period of the background fsync under `flush: async`.
    pub flush_interval_ms: u64,
    /// Commit-log segment size in bytes.
    pub segment_size: u64,
    /// Create unknown topics on first send (Java's `autoCreateTopicEnable`).
    pub auto_create_topic: bool,
    /// Read and write queues of an auto-created topic.
    pub default_queue_nums: i32,
    /// Largest message body accepted, in bytes.
    pub max_message_size: usize,
    /// Largest remoting frame accepted, in bytes, length prefix included.
    pub max_frame_size: usize,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// Connections one peer address may hold; beyond it that peer's new connections are closed.
    pub max_connections_per_peer: usize,
    /// A connection with nothing in flight and no byte received for this long is closed.
    pub idle_timeout_ms: u64,
    /// A frame must arrive whole within this long of its first byte, or the connection closes.
    pub frame_timeout_ms: u64,
    /// Bytes of partly received frames held across all connections; a read past it closes the
    /// connection that made it.
    pub max_buffered_bytes: usize,
    /// Pull requests parked for long polling beyond this are answered at once.
    pub max_parked_pulls: usize,
    /// Requests in flight per connection before the broker stops reading from it.
    pub max_in_flight_per_connection: usize,
    /// How often consumer offsets and other metadata are written to disk (Java: 5 s).
    pub persist_interval_ms: u64,
    /// Delete commit-log segments older than this many hours (0: keep by age forever).
    pub retention_hours: u64,
    /// Delete the oldest commit-log segments while the log is larger than this (0: no limit).
    pub retention_bytes: u64,
    /// Delays of the `DELAY` levels 1, 2, …, as Java's `messageDelayLevel` (units ms, s, m, h, d).
    pub delay_levels: String,
    /// Longest delay a TIMER_* property may ask for, in seconds (Java: 3 days).
    pub max_delay_secs: u64,
    /// An undecided transaction is first checked this long after its half message was stored.
    pub transaction_timeout_ms: u64,
    /// Time between checks of one undecided transaction.
    pub transaction_check_interval_ms: u64,
    /// Checks before an undecided transaction is rolled back.
    pub transaction_check_max: u32,
    /// How groups consume when no SET_MESSAGE_REQUEST_MODE said otherwise: `PULL` or `POP`.
    pub default_message_request_mode: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 10911)),
            advertised_address: None,
            broker_name: "broker-a".into(),
            cluster: "DefaultCluster".into(),
            data_dir: PathBuf::from("rocketmesh-data"),
            flush: FlushMode::Async,
            flush_interval_ms: 500,
            segment_size: 1 << 30,
            auto_create_topic: true,
            default_queue_nums: 4,
            max_message_size: 4 * 1024 * 1024,
            max_frame_size: DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            max_connections_per_peer: crate::inbound::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            idle_timeout_ms: crate::inbound::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
            frame_timeout_ms: crate::inbound::DEFAULT_FRAME_TIMEOUT.as_millis() as u64,
            max_buffered_bytes: crate::inbound::DEFAULT_MAX_BUFFERED_BYTES,
            max_parked_pulls: 100_000,
            max_in_flight_per_connection: 1024,
            persist_interval_ms: 5_000,
            retention_hours: 72,
            retention_bytes: 0,
            delay_levels: crate::broker::schedule::DEFAULT_DELAY_LEVELS.to_owned(),
            max_delay_secs: 3 * 86_400,
            transaction_timeout_ms: 6_000,
            transaction_check_interval_ms: 30_000,
            transaction_check_max: 15,
            default_message_request_mode: "PULL".into(),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid broker config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid broker config: {field} {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl BrokerConfig {
    /// Reads a YAML file; keys not given keep their defaults, unknown keys are errors.
    pub fn from_yaml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = serde_yaml_ng::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| {
            Err(ConfigError::Invalid {
                field,
                problem: problem.to_owned(),
            })
        };
        if self.broker_name.is_empty() {
            return invalid("broker_name", "must not be empty");
        }
        if self.cluster.is_empty() {
            return invalid("cluster", "must not be empty");
        }
        if !(1..=1024).contains(&self.default_queue_nums) {
            return invalid("default_queue_nums", "must be between 1 and 1024");
        }
        if self.max_message_size == 0 || self.max_message_size >= self.max_frame_size {
            return invalid(
                "max_message_size",
                "must be positive and smaller than max_frame_size",
            );
        }
        if self.segment_size < 4096 || self.segment_size < self.max_message_size as u64 {
            return invalid(
                "segment_size",
                "must be at least 4096 and at least max_message_size",
            );
        }
        if !matches!(self.default_message_request_mode.as_str(), "PULL" | "POP") {
            return invalid("default_message_request_mode", "must be PULL or POP");
        }
        if let Err(error) = crate::broker::schedule::parse_delay_levels(&self.delay_levels) {
            return invalid("delay_levels", &error.to_string());
        }
        for (field, value) in [
            ("max_connections", self.max_connections as u64),
            (
                "max_connections_per_peer",
                self.max_connections_per_peer as u64,
            ),
            (
                "max_in_flight_per_connection",
                self.max_in_flight_per_connection as u64,
            ),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
        ] {
            if value == 0 {
                return invalid(field, "must be positive");
            }
        }
        if self.max_buffered_bytes < self.max_frame_size {
            return invalid(
                "max_buffered_bytes",
                "must be at least max_frame_size (one whole frame must fit)",
            );
        }
        Ok(())
    }

    /// The limits applied to each client connection's reads.
    pub fn read_limits(&self) -> crate::inbound::ReadLimits {
        crate::inbound::ReadLimits {
            frame: crate::remoting::frame::FrameLimits {
                max_frame: self.max_frame_size,
                ..Default::default()
            },
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            frame_timeout: Duration::from_millis(self.frame_timeout_ms),
        }
    }

    /// The address put into route data and message ids.
    pub fn advertised(&self) -> String {
        self.advertised_address
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The store settings these broker settings imply.
    pub fn store_config(&self) -> MessageStoreConfig {
        let store_host = self.advertised().parse().unwrap_or(self.listen);
        let mut store = MessageStoreConfig::new(&self.data_dir, store_host);
        store.commit_log.segment_size = self.segment_size;
        // Room for the record's own header and properties around the largest body.
        store.commit_log.max_entry_size =
            u32::try_from(self.max_message_size + 64 * 1024).unwrap_or(u32::MAX);
        store.commit_log.flush = match self.flush {
            FlushMode::Async => FlushPolicy::Async {
                interval: Duration::from_millis(self.flush_interval_ms.max(1)),
            },
            FlushMode::Sync => FlushPolicy::Sync,
        };
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_validates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/broker.yaml");
        let config = BrokerConfig::from_yaml_file(&path).expect("config/broker.yaml");
        assert_eq!(config.broker_name, "broker-a");
        assert_eq!(config.flush, FlushMode::Async);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let error =
            serde_yaml_ng::from_str::<BrokerConfig>("brokr_name: x").expect_err("unknown key");
        assert!(error.to_string().contains("brokr_name"), "{error}");
        let config = BrokerConfig {
            default_queue_nums: 0,
            ..BrokerConfig::default()
        };
        let error = config.validate().expect_err("invalid");
        assert!(error.to_string().contains("default_queue_nums"), "{error}");
    }
}
