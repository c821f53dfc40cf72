//! What the broker and the sidecar both need at their front door against hostile or careless
//! peers: a connection gate (a total and a per-peer cap), a process-wide budget for bytes of
//! partly received frames, and a frame reader whose buffer follows the bytes that arrived (never
//! the length a peer announced) and which closes idle and stalled connections.

mod budget;
mod gate;
mod reader;

pub use budget::BufferBudget;
pub use gate::{Admission, ConnectionGate, Refusal};
pub use reader::{FrameReader, ReadError, ReadLimits};

use std::time::Duration;

/// Java's `serverChannelMaxIdleTimeSeconds`: clients heartbeat every 30 s, so a healthy client
/// connection is never this quiet.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A frame must arrive whole within this long of its first byte: long enough for 16 MiB over a
/// slow link, short enough that a trickling or stalled peer lets its buffer go.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of partly received frames a process holds across all connections.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;
/// Connections one peer address may hold.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 1_000;
