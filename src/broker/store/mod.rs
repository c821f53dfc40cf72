//! The bundled broker's storage: files on disk and the indexes over them. No network code.

pub mod commit_log;

pub use commit_log::{Appended, CommitLog, CommitLogConfig, FlushPolicy, Retention, StoreError};
