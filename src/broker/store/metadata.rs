//! Broker metadata: topics, subscription groups and consumer offsets, each in one JSON file shaped
//! like the Java broker's (`topics.json`, `subscriptionGroup.json`, `consumerOffset.json`).
//!
//! Why whole-file atomic replacement rather than an embedded database such as redb: the data is
//! small (thousands of entries at most), written at most every few seconds (Java persists offsets
//! every 5 s), and people want to read it. Writing a temporary file, fsyncing it, renaming it over
//! the old one and fsyncing the directory gives all-or-nothing updates with no dependency and no
//! compaction, and a crash leaves either the old or the new file. What must be durable per request
//! (POP checkpoints) does not belong here: it goes through the commit log, which is built for that.
//!
//! Reading accepts fastjson's bare-key form, so files written by a Java broker load too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::commit_log::StoreError;
pub use super::files::replace_file;
use crate::names;
use crate::remoting::fastjson;

const TOPICS_FILE: &str = "topics.json";
const GROUPS_FILE: &str = "subscriptionGroup.json";
const OFFSETS_FILE: &str = "consumerOffset.json";
const MODES_FILE: &str = "messageRequestMode.json";

/// `PermName` bits.
pub mod perm {
    pub const READ: i32 = 4;
    pub const WRITE: i32 = 2;
    pub const INHERIT: i32 = 1;
    pub const READ_WRITE: i32 = READ | WRITE;
}

/// A topic's configuration (`TopicConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopicConfig {
    pub topic_name: String,
    pub read_queue_nums: i32,
    pub write_queue_nums: i32,
    pub perm: i32,
    /// `SINGLE_TAG` or `MULTI_TAG`.
    pub topic_filter_type: String,
    pub topic_sys_flag: i32,
    pub order: bool,
    pub attributes: BTreeMap<String, String>,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            topic_name: String::new(),
            read_queue_nums: 8,
            write_queue_nums: 8,
            perm: perm::READ_WRITE,
            topic_filter_type: "SINGLE_TAG".into(),
            topic_sys_flag: 0,
            order: false,
            attributes: BTreeMap::new(),
        }
    }
}

/// A consumer group's configuration (`SubscriptionGroupConfig`, the fields the broker acts on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SubscriptionGroupConfig {
    pub group_name: String,
    pub consume_enable: bool,
    pub consume_from_min_enable: bool,
    pub consume_broadcast_enable: bool,
    pub consume_message_orderly: bool,
    pub retry_queue_nums: i32,
    /// Deliveries after which a message goes to the group's DLQ.
    pub retry_max_times: i32,
    pub broker_id: i64,
    pub which_broker_when_consume_slowly: i64,
    pub notify_consumer_ids_changed_enable: bool,
}

impl Default for SubscriptionGroupConfig {
    fn default() -> Self {
        Self {
            group_name: String::new(),
            consume_enable: true,
            consume_from_min_enable: true,
            consume_broadcast_enable: true,
            consume_message_orderly: false,
            retry_queue_nums: 1,
            retry_max_times: 16,
            broker_id: 0,
            which_broker_when_consume_slowly: 1,
            notify_consumer_ids_changed_enable: true,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TopicsFile {
    topic_config_table: BTreeMap<String, TopicConfig>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct GroupsFile {
    subscription_group_table: BTreeMap<String, SubscriptionGroupConfig>,
}

/// Keys are `topic@group`, as in Java's file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct OffsetsFile {
    offset_table: BTreeMap<String, BTreeMap<i32, i64>>,
}

/// How a group consumes a topic: `PULL` (client-side rebalance) or `POP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestMode {
    pub mode: String,
    pub pop_share_queue_num: i32,
}

impl Default for RequestMode {
    fn default() -> Self {
        Self {
            mode: "PULL".into(),
            pop_share_queue_num: 0,
        }
    }
}

/// Keys are `topic@group`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ModesFile {
    mode_table: BTreeMap<String, RequestMode>,
}

#[derive(Default)]
struct Tables {
    topics: TopicsFile,
    groups: GroupsFile,
    offsets: OffsetsFile,
    modes: ModesFile,
    topics_dirty: bool,
    groups_dirty: bool,
    offsets_dirty: bool,
    modes_dirty: bool,
}

impl Tables {
    /// Drops entries whose names the broker would refuse today (files written before names were
    /// checked, or edited by hand), and marks their tables for rewriting.
    fn drop_invalid_names(&mut self) {
        fn keep<V>(
            table: &mut BTreeMap<String, V>,
            file: &str,
            valid: impl Fn(&str) -> bool,
        ) -> bool {
            let before = table.len();
            table.retain(|key, _| {
                let ok = valid(key);
                if !ok {
                    tracing::warn!(file, entry = %names::shown(key), "metadata entry with an invalid name dropped");
                }
                ok
            });
            table.len() != before
        }
        let valid_pair = |key: &str| {
            key.rsplit_once('@').is_some_and(|(topic, group)| {
                names::validate_topic(topic).is_ok() && names::validate_group(group).is_ok()
            })
        };
        self.topics_dirty |= keep(&mut self.topics.topic_config_table, TOPICS_FILE, |topic| {
            names::validate_topic(topic).is_ok()
        });
        self.groups_dirty |= keep(
            &mut self.groups.subscription_group_table,
            GROUPS_FILE,
            |group| names::validate_group(group).is_ok(),
        );
        self.offsets_dirty |= keep(&mut self.offsets.offset_table, OFFSETS_FILE, valid_pair);
        self.modes_dirty |= keep(&mut self.modes.mode_table, MODES_FILE, valid_pair);
    }
}

/// The metadata of one broker, in memory, persisted on [`Metadata::persist`].
pub struct Metadata {
    dir: PathBuf,
    tables: RwLock<Tables>,
    /// One persist at a time: concurrent ones (housekeeping and a handler) would share the
    /// temporary file, and one's rename could find it gone.
    persisting: Mutex<()>,
}

fn offset_key(topic: &str, group: &str) -> String {
    format!("{topic}@{group}")
}

impl Metadata {
    /// Loads the three files from `dir`; missing files are empty tables.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            action: "create directory",
            path: dir.clone(),
            source,
        })?;
        let mut tables = Tables {
            topics: load(&dir.join(TOPICS_FILE))?,
            groups: load(&dir.join(GROUPS_FILE))?,
            offsets: load(&dir.join(OFFSETS_FILE))?,
            modes: load(&dir.join(MODES_FILE))?,
            ..Tables::default()
        };
        tables.drop_invalid_names();
        Ok(Self {
            dir,
            tables: RwLock::new(tables),
            persisting: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn topic(&self, topic: &str) -> Option<TopicConfig> {
        self.read().topics.topic_config_table.get(topic).cloned()
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        self.read()
            .topics
            .topic_config_table
            .values()
            .cloned()
            .collect()
    }

    /// Creates or replaces a topic; a topic with an invalid name or queue count is refused.
    pub fn put_topic(&self, config: TopicConfig) -> Result<(), StoreError> {
        names::validate_topic(&config.topic_name)?;
        for queues in [config.read_queue_nums, config.write_queue_nums] {
            if queues != 0 {
                names::validate_queue_id(&config.topic_name, queues - 1)?;
            }
        }
        let mut tables = self.write();
        tables
            .topics
            .topic_config_table
            .insert(config.topic_name.clone(), config);
        tables.topics_dirty = true;
        Ok(())
    }

    pub fn remove_topic(&self, topic: &str) -> Option<TopicConfig> {
        let mut tables = self.write();
        let removed = tables.topics.topic_config_table.remove(topic);
        tables.topics_dirty |= removed.is_some();
        removed
    }

    pub fn group(&self, group: &str) -> Option<SubscriptionGroupConfig> {
        self.read()
            .groups
            .subscription_group_table
            .get(group)
            .cloned()
    }

    /// Creates or replaces a subscription group; an invalid group name is refused.
    pub fn put_group(&self, config: SubscriptionGroupConfig) -> Result<(), StoreError> {
        names::validate_group(&config.group_name)?;
        let mut tables = self.write();
        tables
            .groups
            .subscription_group_table
            .insert(config.group_name.clone(), config);
        tables.groups_dirty = true;
        Ok(())
    }

    /// A group's committed offset for one queue.
    pub fn consumer_offset(&self, group: &str, topic: &str, queue_id: i32) -> Option<i64> {
        self.read()
            .offsets
            .offset_table
            .get(&offset_key(topic, group))
            .and_then(|queues| queues.get(&queue_id))
            .copied()
    }

    /// Records a group's offset for one queue.
    pub fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: i32,
        offset: i64,
    ) -> Result<(), StoreError> {
        names::validate_group(group)?;
        names::validate_topic(topic)?;
        names::validate_queue_id(topic, queue_id)?;
        let mut tables = self.write();
        let queues = tables
            .offsets
            .offset_table
            .entry(offset_key(topic, group))
            .or_default();
        if queues.insert(queue_id, offset) != Some(offset) {
            tables.offsets_dirty = true;
        }
        Ok(())
    }

    /// The request mode set for a group on a topic, if any.
    pub fn request_mode(&self, group: &str, topic: &str) -> Option<RequestMode> {
        self.read()
            .modes
            .mode_table
            .get(&offset_key(topic, group))
            .cloned()
    }

    pub fn set_request_mode(
        &self,
        group: &str,
        topic: &str,
        mode: RequestMode,
    ) -> Result<(), StoreError> {
        names::validate_group(group)?;
        names::validate_topic(topic)?;
        let mut tables = self.write();
        tables
            .modes
            .mode_table
            .insert(offset_key(topic, group), mode);
        tables.modes_dirty = true;
        Ok(())
    }

    /// Writes every table that changed since the last call, each atomically.
    pub fn persist(&self) -> Result<(), StoreError> {
        let _one = self
            .persisting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Serialize under the read lock, write the files outside any lock.
        let (topics, groups, offsets, modes) = {
            let tables = self.read();
            (
                encode_if(tables.topics_dirty, &tables.topics, TOPICS_FILE)?,
                encode_if(tables.groups_dirty, &tables.groups, GROUPS_FILE)?,
                encode_if(tables.offsets_dirty, &tables.offsets, OFFSETS_FILE)?,
                encode_if(tables.modes_dirty, &tables.modes, MODES_FILE)?,
            )
        };
        for (name, json) in [
            (TOPICS_FILE, topics),
            (GROUPS_FILE, groups),
            (OFFSETS_FILE, offsets),
            (MODES_FILE, modes),
        ] {
            if let Some(json) = json {
                replace_file(&self.dir, name, &json)?;
            }
        }
        let mut tables = self.write();
        tables.topics_dirty = false;
        tables.groups_dirty = false;
        tables.offsets_dirty = false;
        tables.modes_dirty = false;
        Ok(())
    }
}

fn encode_if<T: Serialize>(
    dirty: bool,
    table: &T,
    file: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    if !dirty {
        return Ok(None);
    }
    serde_json::to_vec_pretty(table)
        .map(Some)
        .map_err(|error| StoreError::Metadata {
            file: file.to_owned(),
            reason: error.to_string(),
        })
}

fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(source) => {
            return Err(StoreError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |reason: String| StoreError::Metadata {
        file: path.display().to_string(),
        reason,
    };
    let normalized = fastjson::normalize(&bytes).map_err(|error| invalid(error.to_string()))?;
    serde_json::from_slice(&normalized).map_err(|error| invalid(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let metadata = Metadata::open(dir.path()).expect("open");
            metadata
                .put_topic(TopicConfig {
                    topic_name: "T".into(),
                    read_queue_nums: 4,
                    write_queue_nums: 4,
                    ..TopicConfig::default()
                })
                .expect("put topic");
            metadata
                .put_group(SubscriptionGroupConfig {
                    group_name: "G".into(),
                    retry_max_times: 3,
                    ..SubscriptionGroupConfig::default()
                })
                .expect("put group");
            metadata.commit_offset("G", "T", 2, 42).expect("commit");
            metadata.persist().expect("persist");
            // Not persisted: lost on "crash".
            metadata.commit_offset("G", "T", 2, 43).expect("commit");
        }
        let metadata = Metadata::open(dir.path()).expect("reopen");
        assert_eq!(metadata.topic("T").map(|t| t.read_queue_nums), Some(4));
        assert_eq!(metadata.group("G").map(|g| g.retry_max_times), Some(3));
        assert_eq!(metadata.consumer_offset("G", "T", 2), Some(42));
        assert_eq!(metadata.consumer_offset("G", "T", 1), None);
        assert!(!dir.path().join(format!("{OFFSETS_FILE}.tmp")).exists());
    }

    #[test]
    fn java_files_with_bare_keys_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(OFFSETS_FILE),
            br#"{"offsetTable":{"TopicTest@please_rename_unique_group_name":{0:12,1:7}}}"#,
        )
        .expect("write");
        fs::write(
            dir.path().join(TOPICS_FILE),
            br#"{"dataVersion":{"counter":3,"timestamp":1},"topicConfigTable":{"TopicTest":{"order":false,"perm":6,"readQueueNums":4,"topicFilterType":"SINGLE_TAG","topicName":"TopicTest","topicSysFlag":0,"writeQueueNums":4}}}"#,
        )
        .expect("write");
        let metadata = Metadata::open(dir.path()).expect("open");
        assert_eq!(
            metadata.consumer_offset("please_rename_unique_group_name", "TopicTest", 1),
            Some(7)
        );
        assert_eq!(
            metadata.topic("TopicTest").map(|t| t.perm),
            Some(perm::READ_WRITE)
        );
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(GROUPS_FILE),
            b"{\"subscriptionGroupTable\":",
        )
        .expect("write");
        let error = Metadata::open(dir.path())
            .err()
            .expect("corrupt file refused");
        assert!(error.to_string().contains(GROUPS_FILE), "{error}");
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn invalid_names_are_refused_and_never_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metadata = Metadata::open(dir.path()).expect("open");
        for topic in ["%DLQ%../../x", "%RETRY%a\0b", &"t".repeat(200)] {
            let refused = metadata.put_topic(TopicConfig {
                topic_name: topic.to_owned(),
                ..TopicConfig::default()
            });
            assert!(
                matches!(refused, Err(StoreError::InvalidName(_))),
                "{topic:?}"
            );
        }
        let negative = metadata.put_topic(TopicConfig {
            topic_name: "T".into(),
            read_queue_nums: 5000,
            ..TopicConfig::default()
        });
        assert!(matches!(negative, Err(StoreError::InvalidName(_))));
        assert!(
            metadata
                .put_group(SubscriptionGroupConfig {
                    group_name: "../g".into(),
                    ..SubscriptionGroupConfig::default()
                })
                .is_err()
        );
        assert!(metadata.commit_offset("g", "T", -1, 0).is_err());
        assert!(metadata.commit_offset("g/x", "T", 0, 0).is_err());
        metadata.persist().expect("persist");
        assert!(metadata.topics().is_empty());
        assert!(!dir.path().join(TOPICS_FILE).exists(), "nothing to write");
    }

    #[test]
    fn invalid_entries_on_disk_are_dropped_on_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(TOPICS_FILE),
            br#"{"topicConfigTable":{"Good":{"topicName":"Good"},"%DLQ%../../x":{"topicName":"%DLQ%../../x"}}}"#,
        )
        .expect("write");
        let metadata = Metadata::open(dir.path()).expect("open");
        let names: Vec<String> = metadata
            .topics()
            .into_iter()
            .map(|t| t.topic_name)
            .collect();
        assert_eq!(names, vec!["Good".to_owned()]);
        metadata.persist().expect("persist");
        let written = fs::read_to_string(dir.path().join(TOPICS_FILE)).expect("read");
        assert!(!written.contains(".."), "{written}");
    }
}
