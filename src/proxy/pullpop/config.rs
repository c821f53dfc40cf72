//! The `consume:` section of the sidecar configuration: whether pulls become POP, and the bounds
//! of the receipts the sidecar holds for converted consumers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a consumer group's pulls reach the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumeMode {
    /// POP for clustering, concurrently consuming groups; PULL for the rest (see `mode`).
    #[default]
    Auto,
    /// Convert every group that can be converted (broadcasting groups still cannot).
    Pop,
    /// Forward pulls as pulls.
    Pull,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumeConfig {
    /// The mode of routes that set none.
    pub mode: ConsumeMode,
    /// Per-group overrides, stronger than any route's mode.
    pub groups: BTreeMap<String, ConsumeMode>,
    /// How long a popped message stays invisible to other consumers before the broker serves it
    /// again, unless the sidecar renews it.
    pub invisible_time_ms: u64,
    /// Renew a receipt this long before it would become visible again.
    pub renew_ahead_ms: u64,
    /// Stop renewing a receipt this long after its pop and let the broker serve it again (Java
    /// sends a message back after its 15-minute consume timeout).
    pub renew_max_ms: u64,
    /// A client not heard from within this time (live ones commit offsets every 5 s) is taken as
    /// hung: its receipts are released to the other consumers at once.
    pub client_liveness_ms: u64,
    /// The invisible time given to receipts a client let go (disconnect, unregister, a rewind), so
    /// they reach another consumer at once.
    pub release_invisible_ms: u64,
    /// Receipts one client may hold across its queues; its pulls wait while it is over.
    pub max_receipts_per_client: usize,
    /// After a full batch, pop the queue's next batch before the client asks for it.
    pub read_ahead: bool,
    /// The largest batch one POP asks for.
    pub max_pop_batch: i32,
    /// The longest a converted pull is held at the broker, whatever the client's suspend time.
    pub max_long_poll_ms: u64,
    /// The max reconsume times of groups whose send-backs name none.
    pub default_max_reconsume_times: i32,
}

impl Default for ConsumeConfig {
    fn default() -> Self {
        Self {
            mode: ConsumeMode::Auto,
            groups: BTreeMap::new(),
            invisible_time_ms: 60_000,
            renew_ahead_ms: 10_000,
            renew_max_ms: 20 * 60_000,
            client_liveness_ms: 15_000,
            read_ahead: true,
            release_invisible_ms: 1_000,
            max_receipts_per_client: 65_536,
            max_pop_batch: 32,
            max_long_poll_ms: 20_000,
            default_max_reconsume_times: 16,
        }
    }
}

impl ConsumeConfig {
    /// Reasons the section cannot work, as (field, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.invisible_time_ms < 1_000 {
            problems.push(("invisible_time_ms", "must be at least 1000".to_owned()));
        }
        if self.renew_ahead_ms >= self.invisible_time_ms {
            problems.push((
                "renew_ahead_ms",
                "must be less than invisible_time_ms".to_owned(),
            ));
        }
        if self.client_liveness_ms == 0 {
            problems.push(("client_liveness_ms", "must be positive".to_owned()));
        }
        if self.max_receipts_per_client == 0 {
            problems.push(("max_receipts_per_client", "must be positive".to_owned()));
        }
        if !(1..=32).contains(&self.max_pop_batch) {
            problems.push(("max_pop_batch", "must be within 1..=32".to_owned()));
        }
        if self.max_long_poll_ms > 25_000 {
            problems.push((
                "max_long_poll_ms",
                "must end before the clients' 30 s pull timeout: at most 25000".to_owned(),
            ));
        }
        if self.default_max_reconsume_times < 0 {
            problems.push((
                "default_max_reconsume_times",
                "must not be negative".to_owned(),
            ));
        }
        problems
    }
}
