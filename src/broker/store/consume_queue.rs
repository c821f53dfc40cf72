//! The consume queue of one (topic, queue): entry N says where message N of that queue sits in the
//! commit log.
//!
//! Entries are 20 bytes, `commit_offset:u64 | size:u32 | tag_code:i64`, in files of a fixed number
//! of entries named by the 20-digit queue offset of their first entry. The queue is an index derived
//! from the commit log, so it carries no CRC and is flushed lazily: recovery drops a partial entry,
//! zeroed entries, and every entry that points at or past the commit log's end, and the dispatcher
//! then re-adds whatever the commit log holds beyond [`ConsumeQueue::dispatched_up_to`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::commit_log::StoreError;
use super::files::{io_error, numbered_files, numbered_name};

/// Bytes per entry.
pub const ENTRY_SIZE: u64 = 20;

/// Where one message of the queue sits in the commit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    pub commit_offset: u64,
    pub size: u32,
    /// Java `String.hashCode` of the message's tag (0 without a tag); filters compare it first.
    pub tag_code: i64,
}

impl QueueEntry {
    fn encode(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        bytes[..8].copy_from_slice(&self.commit_offset.to_be_bytes());
        bytes[8..12].copy_from_slice(&self.size.to_be_bytes());
        bytes[12..].copy_from_slice(&self.tag_code.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let commit_offset = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let size = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
        let tag_code = i64::from_be_bytes(bytes.get(12..20)?.try_into().ok()?);
        Some(Self {
            commit_offset,
            size,
            tag_code,
        })
    }
}

struct QueueFile {
    path: PathBuf,
    file: File,
}

/// One queue's index. Mutation takes `&mut self`; reads take `&self` and use positional reads.
pub struct ConsumeQueue {
    dir: PathBuf,
    entries_per_file: u64,
    files: BTreeMap<u64, QueueFile>,
    /// The queue offset the next entry gets.
    max_offset: u64,
    /// The first queue offset still stored.
    min_offset: u64,
    /// Commit-log offset just past the last entry's message.
    dispatched_up_to: Option<u64>,
    /// The newest entries, not yet written to their file (all in the newest file). Writing 20
    /// bytes per message cost a syscall each; a crash loses only entries that recovery re-adds
    /// from the commit log, since the dispatch checkpoint is taken after a flush.
    unwritten: Vec<u8>,
    /// Queue offset of the first entry in `unwritten`.
    unwritten_from: u64,
}

/// Entries buffered per queue before they are written out.
const MAX_UNWRITTEN_ENTRIES: u64 = 256;

/// Entry `number` (0-based) of a queue file.
fn read_entry(queue_file: &QueueFile, number: u64) -> Result<Option<QueueEntry>, StoreError> {
    let mut bytes = [0u8; ENTRY_SIZE as usize];
    queue_file
        .file
        .read_exact_at(&mut bytes, number * ENTRY_SIZE)
        .map_err(io_error("read", &queue_file.path))?;
    Ok(QueueEntry::decode(&bytes))
}

impl ConsumeQueue {
    /// Opens the queue in `dir`, keeping only entries that lie wholly below `commit_log_end` and
    /// above `commit_log_min`.
    pub fn open(
        dir: impl Into<PathBuf>,
        entries_per_file: u64,
        commit_log_min: u64,
        commit_log_end: u64,
    ) -> Result<Self, StoreError> {
        Self::open_trusting(dir, entries_per_file, commit_log_min, commit_log_end, 0)
    }

    /// [`ConsumeQueue::open`], taking full files whose entries all point below `trusted_below`
    /// (the dispatch checkpoint, taken after they were fsynced) on their last entry alone, so that
    /// open reads only the recent tail of a queue.
    pub fn open_trusting(
        dir: impl Into<PathBuf>,
        entries_per_file: u64,
        commit_log_min: u64,
        commit_log_end: u64,
        trusted_below: u64,
    ) -> Result<Self, StoreError> {
        let dir = dir.into();
        let entries_per_file = entries_per_file.max(1);
        fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        let mut files = BTreeMap::new();
        for (base, path) in numbered_files(&dir)? {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_error("open", &path))?;
            files.insert(base, QueueFile { path, file });
        }
        let mut queue = Self {
            dir,
            entries_per_file,
            files,
            max_offset: 0,
            min_offset: 0,
            dispatched_up_to: None,
            unwritten: Vec::new(),
            unwritten_from: 0,
        };
        queue.recover(commit_log_min, commit_log_end, trusted_below)?;
        Ok(queue)
    }

    fn recover(
        &mut self,
        commit_log_min: u64,
        commit_log_end: u64,
        trusted_below: u64,
    ) -> Result<(), StoreError> {
        let bases: Vec<u64> = self.files.keys().copied().collect();
        let newest = bases.last().copied();
        let mut expected: Option<u64> = None;
        let mut cut_from: Option<u64> = None;
        for base in bases {
            if expected.is_some_and(|expected| expected != base) {
                cut_from = Some(base);
                break;
            }
            let Some(queue_file) = self.files.get(&base) else {
                continue;
            };
            let length = queue_file
                .file
                .metadata()
                .map_err(io_error("stat", &queue_file.path))?
                .len();
            let whole = (length / ENTRY_SIZE).min(self.entries_per_file);
            let valid_entry = |entry: &QueueEntry| {
                entry.size > 0
                    && entry.commit_offset.saturating_add(u64::from(entry.size)) <= commit_log_end
            };
            let trusted_entry = |entry: &QueueEntry| {
                valid_entry(entry)
                    && entry.commit_offset.saturating_add(u64::from(entry.size)) <= trusted_below
            };
            if whole == self.entries_per_file
                && Some(base) != newest
                && let Some(last) = read_entry(queue_file, whole - 1)?.filter(trusted_entry)
            {
                // Commit offsets grow along a queue and the file was fsynced before the
                // checkpoint, so it is good throughout: open does not read the whole history.
                self.dispatched_up_to = Some(last.commit_offset + u64::from(last.size));
                if length > whole * ENTRY_SIZE {
                    queue_file
                        .file
                        .set_len(whole * ENTRY_SIZE)
                        .map_err(io_error("truncate", &queue_file.path))?;
                }
                self.max_offset = base + whole;
                expected = Some(base + whole);
                continue;
            }
            let mut bytes = vec![0u8; (whole * ENTRY_SIZE) as usize];
            queue_file
                .file
                .read_exact_at(&mut bytes, 0)
                .map_err(io_error("read", &queue_file.path))?;
            let mut valid = 0;
            for chunk in bytes.chunks_exact(ENTRY_SIZE as usize) {
                match QueueEntry::decode(chunk) {
                    Some(entry) if valid_entry(&entry) => {
                        self.dispatched_up_to = Some(entry.commit_offset + u64::from(entry.size));
                        valid += 1;
                    }
                    _ => break,
                }
            }
            if valid * ENTRY_SIZE < length {
                queue_file
                    .file
                    .set_len(valid * ENTRY_SIZE)
                    .map_err(io_error("truncate", &queue_file.path))?;
            }
            self.max_offset = base + valid;
            expected = Some(base + valid);
            if valid < self.entries_per_file {
                cut_from = Some(base + 1);
                break;
            }
        }
        if let Some(cut) = cut_from {
            let doomed: Vec<u64> = self.files.range(cut..).map(|(base, _)| *base).collect();
            for base in doomed {
                if let Some(queue_file) = self.files.remove(&base) {
                    fs::remove_file(&queue_file.path)
                        .map_err(io_error("delete", &queue_file.path))?;
                }
            }
        }
        self.min_offset = self.files.keys().next().copied().unwrap_or(self.max_offset);
        self.delete_below_commit_offset(commit_log_min)?;
        Ok(())
    }

    /// The queue offset the next entry gets.
    pub fn max_offset(&self) -> u64 {
        self.max_offset
    }

    /// The first queue offset still stored.
    pub fn min_offset(&self) -> u64 {
        self.min_offset
    }

    /// The commit-log offset just past the last indexed message; the dispatcher resumes there.
    pub fn dispatched_up_to(&self) -> Option<u64> {
        self.dispatched_up_to
    }

    /// Adds the entry for queue offset `queue_offset`. Re-dispatching an entry already present is a
    /// no-op, so recovery can replay the commit log; a gap is an error.
    pub fn append(&mut self, queue_offset: u64, entry: QueueEntry) -> Result<(), StoreError> {
        if queue_offset < self.max_offset {
            return Ok(());
        }
        if queue_offset > self.max_offset {
            return Err(StoreError::Corrupt {
                offset: queue_offset,
                reason: "consume queue entry would leave a gap",
            });
        }
        let base = queue_offset - queue_offset % self.entries_per_file;
        if !self.unwritten.is_empty() && self.unwritten_from < base {
            self.write_out()?;
        }
        if !self.files.contains_key(&base) {
            let path = self.dir.join(numbered_name(base));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_error("create", &path))?;
            self.files.insert(base, QueueFile { path, file });
        }
        if self.unwritten.is_empty() {
            self.unwritten_from = queue_offset;
        }
        self.unwritten.extend_from_slice(&entry.encode());
        self.max_offset = queue_offset + 1;
        self.dispatched_up_to = Some(entry.commit_offset + u64::from(entry.size));
        if self.max_offset - self.unwritten_from >= MAX_UNWRITTEN_ENTRIES {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes the buffered entries to their file (into the page cache; `flush` fsyncs).
    fn write_out(&mut self) -> Result<(), StoreError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let base = self.unwritten_from - self.unwritten_from % self.entries_per_file;
        let Some(queue_file) = self.files.get(&base) else {
            return Err(StoreError::Closed);
        };
        queue_file
            .file
            .write_all_at(&self.unwritten, (self.unwritten_from - base) * ENTRY_SIZE)
            .map_err(io_error("append to", &queue_file.path))?;
        self.unwritten.clear();
        Ok(())
    }

    /// Up to `max` entries starting at `from`, fewer at the end of the queue or of a file.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<QueueEntry>, StoreError> {
        if from < self.min_offset || from >= self.max_offset || max == 0 {
            return Ok(Vec::new());
        }
        let base = from - from % self.entries_per_file;
        let Some(queue_file) = self.files.get(&base) else {
            return Ok(Vec::new());
        };
        let end = self
            .max_offset
            .min(base + self.entries_per_file)
            .min(from + max as u64);
        // The part of the range still in memory is taken from there.
        let on_disk_end = if self.unwritten.is_empty() {
            end
        } else {
            end.min(self.unwritten_from.max(from))
        };
        let mut bytes = vec![0u8; ((on_disk_end - from) * ENTRY_SIZE) as usize];
        queue_file
            .file
            .read_exact_at(&mut bytes, (from - base) * ENTRY_SIZE)
            .map_err(io_error("read", &queue_file.path))?;
        if on_disk_end < end {
            let start = ((on_disk_end - self.unwritten_from) * ENTRY_SIZE) as usize;
            let stop = ((end - self.unwritten_from) * ENTRY_SIZE) as usize;
            let buffered = self.unwritten.get(start..stop).ok_or(StoreError::Corrupt {
                offset: from,
                reason: "consume queue buffer out of step",
            })?;
            bytes.extend_from_slice(buffered);
        }
        Ok(bytes
            .chunks_exact(ENTRY_SIZE as usize)
            .filter_map(QueueEntry::decode)
            .collect())
    }

    /// The entry at `queue_offset`, if stored.
    pub fn get(&self, queue_offset: u64) -> Result<Option<QueueEntry>, StoreError> {
        Ok(self.read(queue_offset, 1)?.into_iter().next())
    }

    /// Writes out buffered entries and fsyncs every file; the queue can always be rebuilt, so
    /// this is only about restart time.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.write_out()?;
        for queue_file in self.files.values() {
            queue_file
                .file
                .sync_data()
                .map_err(io_error("fsync", &queue_file.path))?;
        }
        Ok(())
    }

    /// Deletes whole files whose entries all point below `commit_log_min`, after commit-log
    /// retention removed what they index, and moves the minimum offset past any remaining entry
    /// that points there. Returns how many files went.
    pub fn delete_below_commit_offset(&mut self, commit_log_min: u64) -> Result<usize, StoreError> {
        let mut deleted = 0;
        while let Some((&base, _)) = self.files.iter().next() {
            let last_in_file = (base + self.entries_per_file).min(self.max_offset);
            if last_in_file == 0 || last_in_file >= self.max_offset {
                break; // never delete the file being written
            }
            let Some(last) = self.get(last_in_file - 1)? else {
                break;
            };
            if last.commit_offset >= commit_log_min {
                break;
            }
            if let Some(queue_file) = self.files.remove(&base) {
                fs::remove_file(&queue_file.path).map_err(io_error("delete", &queue_file.path))?;
                deleted += 1;
            }
            self.min_offset = base + self.entries_per_file;
        }
        // Within the first file left, entries may still point below the commit log's start.
        if let Some(&base) = self.files.keys().next() {
            let file_end = (base + self.entries_per_file).min(self.max_offset);
            let from = self.min_offset.max(base);
            let entries = self.read(from, file_end.saturating_sub(from) as usize)?;
            let gone = entries
                .iter()
                .take_while(|entry| entry.commit_offset < commit_log_min)
                .count();
            self.min_offset = from + gone as u64;
        }
        Ok(deleted)
    }
}

impl Drop for ConsumeQueue {
    fn drop(&mut self) {
        // Best effort: whatever is lost here is re-dispatched from the commit log on open.
        let _ = self.write_out();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn entry(index: u64) -> QueueEntry {
        QueueEntry {
            commit_offset: index * 100,
            size: 100,
            tag_code: index as i64 % 3,
        }
    }

    fn filled(dir: &Path, count: u64) -> ConsumeQueue {
        let mut queue = ConsumeQueue::open(dir, 8, 0, u64::MAX).expect("open");
        for index in 0..count {
            queue.append(index, entry(index)).expect("append");
        }
        queue
    }

    #[test]
    fn entries_read_back_across_files_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = filled(dir.path(), 30);
        assert_eq!(
            queue.read(0, 100).expect("read").len(),
            8,
            "one file per read"
        );
        assert_eq!(queue.read(6, 4).expect("read"), vec![entry(6), entry(7)]);
        assert_eq!(queue.get(29).expect("get"), Some(entry(29)));
        assert_eq!(queue.get(30).expect("get"), None);
        drop(queue);
        let queue = ConsumeQueue::open(dir.path(), 8, 0, 30 * 100).expect("reopen");
        assert_eq!((queue.min_offset(), queue.max_offset()), (0, 30));
        assert_eq!(queue.dispatched_up_to(), Some(3000));
        assert_eq!(queue.get(17).expect("get"), Some(entry(17)));
    }

    #[test]
    fn reads_span_written_and_buffered_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut queue = ConsumeQueue::open(dir.path(), 1000, 0, u64::MAX).expect("open");
        let count = MAX_UNWRITTEN_ENTRIES + 44;
        for index in 0..count {
            queue.append(index, entry(index)).expect("append");
        }
        let on_disk = fs::metadata(dir.path().join(format!("{:020}", 0)))
            .expect("stat")
            .len();
        assert_eq!(
            on_disk,
            MAX_UNWRITTEN_ENTRIES * ENTRY_SIZE,
            "a full buffer is written out"
        );
        let from = MAX_UNWRITTEN_ENTRIES - 6;
        let expected: Vec<_> = (from..from + 20).map(entry).collect();
        assert_eq!(queue.read(from, 20).expect("read"), expected);
        queue.flush().expect("flush");
        let on_disk = fs::metadata(dir.path().join(format!("{:020}", 0)))
            .expect("stat")
            .len();
        assert_eq!(on_disk, count * ENTRY_SIZE, "flush writes the rest");
    }

    #[test]
    fn recovery_drops_torn_zeroed_and_unbacked_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(filled(dir.path(), 20));
        // The commit log only holds the first 18 messages: entries 18 and 19 must go.
        let mut queue = ConsumeQueue::open(dir.path(), 8, 0, 18 * 100).expect("reopen");
        assert_eq!(queue.max_offset(), 18);
        assert!(!dir.path().join(format!("{:020}", 24)).exists());
        // Re-dispatch is idempotent below the end and continues from it.
        queue.append(17, entry(17)).expect("replay");
        queue.append(18, entry(18)).expect("continue");
        assert!(matches!(
            queue.append(20, entry(20)),
            Err(StoreError::Corrupt { .. })
        ));
        drop(queue);
        let last = dir.path().join(format!("{:020}", 16));
        let mut bytes = fs::read(&last).expect("read");
        bytes.extend_from_slice(&[0u8; 20]);
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&last, bytes).expect("write");
        let queue = ConsumeQueue::open(dir.path(), 8, 0, u64::MAX).expect("reopen");
        assert_eq!(queue.max_offset(), 19);
    }

    #[test]
    fn only_files_past_the_checkpoint_are_scanned() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(filled(dir.path(), 20));
        // Zero entry 3 of the first (full) file, as a crash could before its fsync.
        let first = dir.path().join(format!("{:020}", 0));
        let mut bytes = fs::read(&first).expect("read");
        for byte in bytes
            .iter_mut()
            .skip(3 * ENTRY_SIZE as usize)
            .take(ENTRY_SIZE as usize)
        {
            *byte = 0;
        }
        fs::write(&first, bytes).expect("write");
        // Below the checkpoint the file is trusted on its last entry: the queue stays whole.
        let trusted = ConsumeQueue::open_trusting(dir.path(), 8, 0, u64::MAX, 8 * 100)
            .expect("open trusting");
        assert_eq!(trusted.max_offset(), 20);
        drop(trusted);
        // Past the checkpoint it is scanned, cut at the zeroed entry, and the rest goes.
        let scanned = ConsumeQueue::open_trusting(dir.path(), 8, 0, u64::MAX, 8 * 100 - 1)
            .expect("open scanning");
        assert_eq!(scanned.max_offset(), 3);
    }

    #[test]
    fn retention_follows_the_commit_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut queue = filled(dir.path(), 30);
        let deleted = queue.delete_below_commit_offset(1000).expect("retention");
        assert_eq!(deleted, 1);
        assert_eq!(queue.min_offset(), 10, "entries 8 and 9 point below 1000");
        assert!(queue.read(9, 1).expect("read").is_empty());
        assert_eq!(queue.get(10).expect("read"), Some(entry(10)));
        let deleted = queue
            .delete_below_commit_offset(u64::MAX)
            .expect("retention");
        assert_eq!(deleted, 2);
        let active = dir.path().join(format!("{:020}", 24));
        assert!(active.exists(), "the file being written stays");
        assert_eq!(queue.min_offset(), 30);
        drop(queue);
        let queue = ConsumeQueue::open(dir.path(), 8, 2500, u64::MAX).expect("reopen");
        assert_eq!((queue.min_offset(), queue.max_offset()), (25, 30));
    }
}
