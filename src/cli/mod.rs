//! Command-line wiring: each subcommand parses its arguments and calls into the library.

pub mod bench;
pub mod broker;
pub mod control_plane;
pub mod decode;
pub mod sidecar;
pub mod signal;
pub mod up;

/// The multi-threaded runtime every long-running subcommand uses. Its workers release their free
/// memory when they park after the sidecar asked for it (`rocketmesh::memory`).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    rocketmesh::memory::install_release(crate::release_free_memory);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(rocketmesh::memory::on_park)
        .build()
        .context("cannot start the async runtime")
}
