//! The message key index behind QUERY_MESSAGE: `topic#key` → commit-log offsets, for every KEYS entry
//! and the UNIQ_KEY of each message.
//!
//! On disk, entries are `hash:u64 | commit_offset:u64` appended in commit-log order to segment files
//! named by the 20-digit commit offset of their first entry. The hash is 64-bit FNV-1a, spelled out
//! here so that files stay readable across compiler versions; lookups read the candidate records and
//! compare the actual keys, so collisions cost a read, never a wrong answer. In memory the index is a
//! map from hash to offsets, loaded at open. Like the consume queues it is derived data: recovery
//! drops torn entries and entries past the commit log's end, and the message store replays the rest.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::commit_log::StoreError;
use super::files::{io_error, numbered_files, numbered_name};

const ENTRY_SIZE: u64 = 16;

/// 64-bit FNV-1a of `topic#key`.
pub fn key_hash(topic: &str, key: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    topic
        .bytes()
        .chain(std::iter::once(b'#'))
        .chain(key.bytes())
        .fold(OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

struct IndexFile {
    first_offset: u64,
    path: PathBuf,
    file: File,
    entries: u64,
}

/// The key index. Mutation takes `&mut self`.
pub struct KeyIndex {
    dir: PathBuf,
    entries_per_file: u64,
    files: BTreeMap<u64, IndexFile>,
    by_hash: HashMap<u64, Vec<u64>>,
    /// Commit-log offset of the last indexed message; entries at or below it are already in.
    last_indexed: Option<u64>,
    /// The newest entries of the newest file, not yet written: one write per batch instead of
    /// one per message. Recovery re-adds anything a crash loses from the commit log.
    unwritten: Vec<u8>,
    /// Entry number, within the newest file, of the first entry in `unwritten`.
    unwritten_at: u64,
}

/// Bytes of entries buffered before they are written out.
const MAX_UNWRITTEN_BYTES: usize = 64 * 1024;

impl KeyIndex {
    /// Loads the index from `dir`, dropping torn entries and entries at or past `commit_log_end`.
    pub fn open(
        dir: impl Into<PathBuf>,
        entries_per_file: u64,
        commit_log_end: u64,
    ) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        let mut index = Self {
            dir,
            entries_per_file: entries_per_file.max(1),
            files: BTreeMap::new(),
            by_hash: HashMap::new(),
            last_indexed: None,
            unwritten: Vec::new(),
            unwritten_at: 0,
        };
        let found = numbered_files(&index.dir)?;
        let mut stop = false;
        for (first_offset, path) in found {
            if stop {
                fs::remove_file(&path).map_err(io_error("delete", &path))?;
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_error("open", &path))?;
            let length = file.metadata().map_err(io_error("stat", &path))?.len();
            let mut bytes = vec![0u8; (length - length % ENTRY_SIZE) as usize];
            file.read_exact_at(&mut bytes, 0)
                .map_err(io_error("read", &path))?;
            let mut valid = 0u64;
            for chunk in bytes.chunks_exact(ENTRY_SIZE as usize) {
                let (hash, offset) = chunk.split_at(8);
                let hash = u64::from_be_bytes(hash.try_into().unwrap_or_default());
                let offset = u64::from_be_bytes(offset.try_into().unwrap_or_default());
                // Offsets only grow; anything else is a torn or stale tail.
                if offset >= commit_log_end || index.last_indexed.is_some_and(|last| offset < last)
                {
                    stop = true;
                    break;
                }
                index.by_hash.entry(hash).or_default().push(offset);
                index.last_indexed = Some(offset);
                valid += 1;
            }
            if valid * ENTRY_SIZE < length {
                file.set_len(valid * ENTRY_SIZE)
                    .map_err(io_error("truncate", &path))?;
                stop = true;
            }
            index.files.insert(
                first_offset,
                IndexFile {
                    first_offset,
                    path,
                    file,
                    entries: valid,
                },
            );
        }
        Ok(index)
    }

    /// Commit-log offset of the last message indexed.
    pub fn last_indexed(&self) -> Option<u64> {
        self.last_indexed
    }

    /// Indexes the keys of the message at `commit_offset`. Offsets at or below the last indexed one
    /// are skipped, so replaying the commit log is harmless.
    pub fn add<'k>(
        &mut self,
        topic: &str,
        keys: impl IntoIterator<Item = &'k str>,
        commit_offset: u64,
    ) -> Result<(), StoreError> {
        if self.last_indexed.is_some_and(|last| commit_offset <= last) {
            return Ok(());
        }
        let mut hashes: Vec<u64> = keys
            .into_iter()
            .filter(|key| !key.is_empty())
            .map(|key| key_hash(topic, key))
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        if hashes.is_empty() {
            return Ok(());
        }
        let needs_file = self
            .files
            .values()
            .next_back()
            .is_none_or(|last| last.entries >= self.entries_per_file);
        if needs_file {
            self.write_out()?;
            let path = self.dir.join(numbered_name(commit_offset));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_error("create", &path))?;
            self.files.insert(
                commit_offset,
                IndexFile {
                    first_offset: commit_offset,
                    path,
                    file,
                    entries: 0,
                },
            );
        }
        let Some(current) = self.files.values_mut().next_back() else {
            return Err(StoreError::Closed);
        };
        if self.unwritten.is_empty() {
            self.unwritten_at = current.entries;
        }
        for hash in &hashes {
            self.unwritten.extend_from_slice(&hash.to_be_bytes());
            self.unwritten
                .extend_from_slice(&commit_offset.to_be_bytes());
        }
        current.entries += hashes.len() as u64;
        for hash in hashes {
            self.by_hash.entry(hash).or_default().push(commit_offset);
        }
        self.last_indexed = Some(commit_offset);
        if self.unwritten.len() >= MAX_UNWRITTEN_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes the buffered entries to the newest file (into the page cache; `flush` fsyncs).
    fn write_out(&mut self) -> Result<(), StoreError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let Some(current) = self.files.values().next_back() else {
            return Err(StoreError::Closed);
        };
        current
            .file
            .write_all_at(&self.unwritten, self.unwritten_at * ENTRY_SIZE)
            .map_err(io_error("append to", &current.path))?;
        self.unwritten.clear();
        Ok(())
    }

    /// Commit-log offsets of messages that may carry `key` in `topic`, newest first. The caller
    /// reads each record and checks the key.
    pub fn candidates(&self, topic: &str, key: &str) -> Vec<u64> {
        let mut offsets = self
            .by_hash
            .get(&key_hash(topic, key))
            .cloned()
            .unwrap_or_default();
        offsets.reverse();
        offsets
    }

    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.write_out()?;
        for file in self.files.values() {
            file.file
                .sync_data()
                .map_err(io_error("fsync", &file.path))?;
        }
        Ok(())
    }

    /// Deletes whole files that only index messages below `commit_log_min`, and forgets them.
    pub fn delete_below_commit_offset(&mut self, commit_log_min: u64) -> Result<usize, StoreError> {
        let bases: Vec<u64> = self.files.keys().copied().collect();
        let mut deleted = 0;
        for pair in bases.windows(2) {
            // A file's offsets all lie below the next file's first offset.
            if pair[1] > commit_log_min {
                break;
            }
            if let Some(file) = self.files.remove(&pair[0]) {
                fs::remove_file(&file.path).map_err(io_error("delete", &file.path))?;
                deleted += 1;
                debug_assert_eq!(file.first_offset, pair[0]);
            }
        }
        if deleted > 0 {
            for offsets in self.by_hash.values_mut() {
                offsets.retain(|offset| *offset >= commit_log_min);
            }
            self.by_hash.retain(|_, offsets| !offsets.is_empty());
        }
        Ok(deleted)
    }
}

impl Drop for KeyIndex {
    fn drop(&mut self) {
        // Best effort: whatever is lost here is re-added from the commit log on open.
        let _ = self.write_out();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_after_reopen_and_replay_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 4, u64::MAX).expect("open");
            for message in 0..10u64 {
                let key = format!("order-{}", message % 3);
                let uniq = format!("UNIQ{message}");
                index
                    .add("T", [key.as_str(), uniq.as_str()], message * 100)
                    .expect("add");
            }
            index
                .add("T", ["order-0"], 500)
                .expect("replayed add is skipped");
        }
        let index = KeyIndex::open(dir.path(), 4, u64::MAX).expect("reopen");
        assert_eq!(index.candidates("T", "order-0"), vec![900, 600, 300, 0]);
        assert_eq!(index.candidates("T", "UNIQ7"), vec![700]);
        assert!(index.candidates("other", "order-0").is_empty());
        assert_eq!(index.last_indexed(), Some(900));
    }

    #[test]
    fn entries_past_the_commit_log_end_and_torn_tails_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 100, u64::MAX).expect("open");
            for message in 0..10u64 {
                index.add("T", ["k"], message * 100).expect("add");
            }
        }
        let mut index = KeyIndex::open(dir.path(), 100, 650).expect("reopen");
        assert_eq!(
            index.candidates("T", "k"),
            vec![600, 500, 400, 300, 200, 100, 0]
        );
        index.add("T", ["k"], 700).expect("continue");
        drop(index);
        let file = dir.path().join(format!("{:020}", 0));
        let mut bytes = fs::read(&file).expect("read");
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&file, bytes).expect("write");
        let index = KeyIndex::open(dir.path(), 100, u64::MAX).expect("reopen");
        assert_eq!(index.candidates("T", "k").first(), Some(&700));
    }

    #[test]
    fn retention_forgets_old_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("open");
        for message in 0..10u64 {
            index.add("T", ["k"], message * 100).expect("add");
        }
        assert_eq!(index.delete_below_commit_offset(450).expect("retention"), 2);
        assert_eq!(index.candidates("T", "k"), vec![900, 800, 700, 600, 500]);
    }

    #[test]
    fn the_hash_is_stable() {
        // FNV-1a 64 of "#"; the same code gives the published 0xaf63dc4c8601ec8c for "a".
        assert_eq!(key_hash("", ""), 0xaf63_9e4c_8601_8332);
    }
}
