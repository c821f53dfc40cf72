//! The bundled RocketMQ-compatible broker (`rocketmesh broker`).

pub use crate::client_registry as clients;
pub mod arrivals;
pub mod config;
pub mod handlers;
pub mod pop;
pub mod queue_locks;
pub mod schedule;
pub mod server;
pub mod state;
pub mod store;
pub mod transaction;
mod uniq_key;

pub use config::{BrokerConfig, FlushMode};
pub use state::BrokerState;
