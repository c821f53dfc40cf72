//! The bundled RocketMQ-compatible broker (`rocketmesh broker`).

pub mod store;
