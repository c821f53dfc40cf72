//! The bundled broker's storage: files on disk and the indexes over them. No network code.

pub mod commit_log;
pub mod consume_queue;
mod files;
pub mod key_index;
pub mod message_store;
pub mod metadata;

pub use commit_log::{Appended, CommitLog, CommitLogConfig, FlushPolicy, Retention, StoreError};
pub use consume_queue::{ConsumeQueue, QueueEntry};
pub use key_index::KeyIndex;
pub use message_store::{Boundary, MessageStore, MessageStoreConfig, PutResult};
pub use metadata::{Metadata, RequestMode, SubscriptionGroupConfig, TopicConfig};
