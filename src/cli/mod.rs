//! Command-line wiring: each subcommand parses its arguments and calls into the library.

pub mod bench;
pub mod broker;
pub mod control_plane;
pub mod decode;
pub mod sidecar;
pub mod signal;
pub mod up;
