//! The message key index behind QUERY_MESSAGE: `topic#key` → commit-log offsets, for every KEYS entry
//! and the UNIQ_KEY of each message.
//!
//! It lives on disk, so memory does not grow with the number of messages. Files are named by the
//! 20-digit commit offset of their first entry; each is a hash table with chaining:
//!
//! ```text
//! header (64 B) | slots: slot_count × u32 | entries: capacity × (hash:u64 | commit_offset:u64 | prev:u32 | crc:u32)
//! ```
//!
//! A slot holds the number (1-based, 0 = none) of the newest entry whose hash falls in it, and each
//! entry's `prev` the one before it in the same slot, so a lookup reads one slot and walks a chain.
//! The hash is 64-bit FNV-1a, spelled out here so that files stay readable across compiler
//! versions; lookups return candidates and the caller compares the actual keys, so collisions cost
//! a read, never a wrong answer.
//!
//! Only the newest (active) file's slot table is in memory. Entries are appended in commit-log
//! order; when a file is full its slots are written out and, at the next flush, after an fsync, the
//! header is marked sealed with its entry count, last offset and time range. Sealed files are
//! trusted as they are at open; only an unsealed file is scanned and its slots rebuilt from its
//! entries, whose CRC and chain links (`prev` must equal the slot's head at that point) catch torn
//! and stale data. Like the consume queues the index is derived data: whatever a crash or a corrupt
//! file costs it is re-added from the commit log, from [`KeyIndex::replay_from`] on.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::commit_log::StoreError;
use super::files::{io_error, numbered_files, numbered_name, sync_dir};

const MAGIC: [u8; 8] = *b"RMKEYIX1";
const HEADER_SIZE: u64 = 64;
/// Bytes of the header covered by its CRC (which follows them).
const HEADER_CHECKED: usize = 52;
const SLOT_SIZE: u64 = 4;
const ENTRY_SIZE: u64 = 24;
/// Upper bound on slots and entries per file believed from a header.
const MAX_PER_FILE: u32 = 1 << 24;
/// Entries read per positional read while scanning an unsealed file at open.
const SCAN_CHUNK_ENTRIES: u64 = 1 << 16;
/// Bytes of entries buffered before they are written out.
const MAX_UNWRITTEN_BYTES: usize = 64 * 1024;

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

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    slot_count: u32,
    capacity: u32,
    first_offset: u64,
    /// 0 while the file is open for appends; the entry count once sealed.
    sealed_entries: u32,
    last_offset: u64,
    min_timestamp: i64,
    max_timestamp: i64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut bytes = [0u8; HEADER_SIZE as usize];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&self.slot_count.to_be_bytes());
        bytes[12..16].copy_from_slice(&self.capacity.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.first_offset.to_be_bytes());
        bytes[24..28].copy_from_slice(&self.sealed_entries.to_be_bytes());
        bytes[28..36].copy_from_slice(&self.last_offset.to_be_bytes());
        bytes[36..44].copy_from_slice(&self.min_timestamp.to_be_bytes());
        bytes[44..52].copy_from_slice(&self.max_timestamp.to_be_bytes());
        let crc = crc32fast::hash(&bytes[..HEADER_CHECKED]);
        bytes[HEADER_CHECKED..HEADER_CHECKED + 4].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    /// `None` for anything that is not an intact header with believable sizes.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.get(..8)? != MAGIC {
            return None;
        }
        let crc = u32_at(bytes, HEADER_CHECKED)?;
        if crc32fast::hash(bytes.get(..HEADER_CHECKED)?) != crc {
            return None;
        }
        let header = Self {
            slot_count: u32_at(bytes, 8)?,
            capacity: u32_at(bytes, 12)?,
            first_offset: u64_at(bytes, 16)?,
            sealed_entries: u32_at(bytes, 24)?,
            last_offset: u64_at(bytes, 28)?,
            min_timestamp: u64_at(bytes, 36)? as i64,
            max_timestamp: u64_at(bytes, 44)? as i64,
        };
        let sane = (1..=MAX_PER_FILE).contains(&header.slot_count)
            && (1..=MAX_PER_FILE).contains(&header.capacity)
            && header.sealed_entries <= header.capacity;
        sane.then_some(header)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    hash: u64,
    commit_offset: u64,
    /// Number (1-based) of the previous entry in the same slot; 0 ends the chain.
    prev: u32,
}

impl Entry {
    fn encode(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        bytes[..8].copy_from_slice(&self.hash.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.commit_offset.to_be_bytes());
        bytes[16..20].copy_from_slice(&self.prev.to_be_bytes());
        let crc = crc32fast::hash(&bytes[..20]);
        bytes[20..].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    /// `None` when the CRC does not match: a torn, zeroed or overwritten entry.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let crc = u32_at(bytes, 20)?;
        if crc32fast::hash(bytes.get(..20)?) != crc {
            return None;
        }
        Some(Self {
            hash: u64_at(bytes, 0)?,
            commit_offset: u64_at(bytes, 8)?,
            prev: u32_at(bytes, 16)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// Taking appends; its slots are in [`KeyIndex::active_slots`], not on disk.
    Active,
    /// Full, slots written, header not yet marked sealed (the next flush does that).
    Full,
    Sealed,
}

struct IndexFile {
    path: PathBuf,
    file: File,
    header: Header,
    entries: u32,
    state: FileState,
}

impl IndexFile {
    fn entries_start(&self) -> u64 {
        HEADER_SIZE + SLOT_SIZE * u64::from(self.header.slot_count)
    }

    fn slot_of(&self, hash: u64) -> u32 {
        (hash % u64::from(self.header.slot_count)) as u32
    }

    fn read_slot(&self, slot: u32) -> Result<u32, StoreError> {
        let mut bytes = [0u8; SLOT_SIZE as usize];
        self.file
            .read_exact_at(&mut bytes, HEADER_SIZE + SLOT_SIZE * u64::from(slot))
            .map_err(io_error("read", &self.path))?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn read_entry(&self, number: u32) -> Result<Option<Entry>, StoreError> {
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        let at = self.entries_start() + ENTRY_SIZE * u64::from(number.saturating_sub(1));
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(io_error("read", &self.path))?;
        Ok(Entry::decode(&bytes))
    }

    fn write_header(&self) -> Result<(), StoreError> {
        self.file
            .write_all_at(&self.header.encode(), 0)
            .map_err(io_error("write", &self.path))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(io_error("fsync", &self.path))
    }
}

fn slots_to_bytes(slots: &[u32]) -> Vec<u8> {
    slots.iter().flat_map(|slot| slot.to_be_bytes()).collect()
}

/// The key index. Mutation takes `&mut self`; lookups take `&self` and use positional reads.
pub struct KeyIndex {
    dir: PathBuf,
    entries_per_file: u32,
    files: BTreeMap<u64, IndexFile>,
    /// Slot table of the newest file while it is [`FileState::Active`].
    active_slots: Vec<u32>,
    /// Commit-log offset of the last indexed message; entries at or below it are already in.
    last_indexed: Option<u64>,
    /// The newest entries of the active file, not yet written: one write per batch instead of
    /// one per message. Recovery re-adds anything a crash loses from the commit log.
    unwritten: Vec<u8>,
    /// Entry number (0-based) within the active file of the first entry in `unwritten`.
    unwritten_at: u32,
    /// Set at open: messages from this offset on may be missing from the index.
    replay_from: Option<u64>,
    /// Entries below this commit offset point at deleted segments.
    min_offset: u64,
    /// A file was created since the last flush, so the directory needs an fsync.
    dir_dirty: bool,
}

impl KeyIndex {
    /// Opens the index in `dir`. Entries at or past `commit_log_end` are dropped; a file that
    /// cannot be used is deleted with everything after it, and [`KeyIndex::replay_from`] says
    /// from where the commit log must be indexed again.
    pub fn open(
        dir: impl Into<PathBuf>,
        entries_per_file: u64,
        commit_log_end: u64,
    ) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        let mut index = Self {
            dir,
            entries_per_file: u32::try_from(entries_per_file.clamp(1, u64::from(MAX_PER_FILE)))
                .unwrap_or(MAX_PER_FILE),
            files: BTreeMap::new(),
            active_slots: Vec::new(),
            last_indexed: None,
            unwritten: Vec::new(),
            unwritten_at: 0,
            replay_from: None,
            min_offset: 0,
            dir_dirty: false,
        };
        let found = numbered_files(&index.dir)?;
        let count = found.len();
        let mut stop = false;
        for (position, (first_offset, path)) in found.into_iter().enumerate() {
            if stop || first_offset >= commit_log_end {
                // Nothing at or past the log's end exists any more; anything after a bad file
                // is re-added from the commit log.
                stop = true;
                fs::remove_file(&path).map_err(io_error("delete", &path))?;
                continue;
            }
            let newest = position + 1 == count;
            match index.load(first_offset, &path, commit_log_end, newest)? {
                Some(file) => {
                    let complete = file.state != FileState::Active;
                    index.files.insert(first_offset, file);
                    if !complete && !newest {
                        // A file that stopped short of full: nothing after it can follow on.
                        stop = true;
                    }
                }
                None => {
                    index.note_replay_from(first_offset);
                    fs::remove_file(&path).map_err(io_error("delete", &path))?;
                    stop = true;
                }
            }
        }
        index.finish_open()?;
        Ok(index)
    }

    fn note_replay_from(&mut self, offset: u64) {
        self.replay_from = Some(self.replay_from.map_or(offset, |from| from.min(offset)));
    }

    /// Reads one file: a sealed one by its header alone, an unsealed one by scanning its entries
    /// and rebuilding its slots. `None`: the file cannot be used.
    fn load(
        &mut self,
        first_offset: u64,
        path: &Path,
        commit_log_end: u64,
        newest: bool,
    ) -> Result<Option<IndexFile>, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error("open", path))?;
        let length = file.metadata().map_err(io_error("stat", path))?.len();
        let mut header_bytes = [0u8; HEADER_SIZE as usize];
        if length < HEADER_SIZE {
            return Ok(None);
        }
        file.read_exact_at(&mut header_bytes, 0)
            .map_err(io_error("read", path))?;
        let Some(header) = Header::decode(&header_bytes) else {
            return Ok(None);
        };
        let entries_start = HEADER_SIZE + SLOT_SIZE * u64::from(header.slot_count);
        if header.first_offset != first_offset || length < entries_start {
            return Ok(None);
        }
        let mut loaded = IndexFile {
            path: path.to_owned(),
            file,
            header,
            entries: 0,
            state: FileState::Active,
        };
        if header.sealed_entries > 0 {
            let whole = entries_start + ENTRY_SIZE * u64::from(header.sealed_entries);
            let follows = self
                .last_indexed
                .is_none_or(|last| header.first_offset > last);
            // A sealed file pointing past the log's end was sealed before a crash cut the log.
            if length < whole || header.last_offset >= commit_log_end || !follows {
                return Ok(None);
            }
            loaded.entries = header.sealed_entries;
            loaded.state = FileState::Sealed;
            self.last_indexed = Some(header.last_offset);
            return Ok(Some(loaded));
        }
        let mut slots = vec![0u32; header.slot_count as usize];
        let last_before = self.last_indexed;
        let (entries, last) = scan(&loaded, &mut slots, last_before, commit_log_end, length)?;
        loaded.entries = entries;
        // Entries carry no times: a rebuilt file's range is unknown, so lookups never skip it.
        loaded.header.min_timestamp = i64::MIN;
        loaded.header.max_timestamp = i64::MAX;
        if let Some(last) = last {
            self.last_indexed = Some(last);
        }
        let on_disk = (length - entries_start) / ENTRY_SIZE;
        if entries == header.capacity && !newest {
            // Filled before a crash but never sealed: seal it now, as the flush would have.
            loaded.header.last_offset = last.unwrap_or(first_offset);
            loaded.header.sealed_entries = entries;
            loaded
                .file
                .write_all_at(&slots_to_bytes(&slots), HEADER_SIZE)
                .map_err(io_error("write", path))?;
            loaded.sync()?;
            loaded.write_header()?;
            loaded.sync()?;
            loaded.state = FileState::Sealed;
            return Ok(Some(loaded));
        }
        if u64::from(entries) < on_disk {
            loaded
                .file
                .set_len(entries_start + ENTRY_SIZE * u64::from(entries))
                .map_err(io_error("truncate", path))?;
        }
        self.active_slots = slots;
        Ok(Some(loaded))
    }

    /// Makes the newest file the active one (if it is unsealed) after its last message's entries
    /// are dropped: a crash may have kept only some of them, and replay adds them all back.
    fn finish_open(&mut self) -> Result<(), StoreError> {
        let Some(newest) = self.files.values_mut().next_back() else {
            return Ok(());
        };
        if newest.state != FileState::Active {
            self.active_slots = Vec::new();
            return Ok(());
        }
        let mut dropped_offset = None;
        while newest.entries > 0 {
            let Some(entry) = newest.read_entry(newest.entries)? else {
                break;
            };
            if dropped_offset.is_some_and(|offset| offset != entry.commit_offset) {
                break;
            }
            dropped_offset = Some(entry.commit_offset);
            let slot = newest.slot_of(entry.hash) as usize;
            if let Some(head) = self.active_slots.get_mut(slot) {
                *head = entry.prev;
            }
            newest.entries -= 1;
        }
        let replay = dropped_offset.unwrap_or(newest.header.first_offset);
        newest
            .file
            .set_len(newest.entries_start() + ENTRY_SIZE * u64::from(newest.entries))
            .map_err(io_error("truncate", &newest.path))?;
        self.last_indexed = match newest.entries {
            0 => None,
            n => newest.read_entry(n)?.map(|entry| entry.commit_offset),
        }
        .or_else(|| {
            self.files
                .values()
                .rev()
                .find(|file| file.state == FileState::Sealed)
                .map(|file| file.header.last_offset)
        });
        self.note_replay_from(replay);
        Ok(())
    }

    /// Commit-log offset of the last message indexed.
    pub fn last_indexed(&self) -> Option<u64> {
        self.last_indexed
    }

    /// Where the commit log must be indexed again from because open found entries missing: a
    /// corrupt or unusable file, or the possibly partial last message of the active file. `None`
    /// when nothing is known to be missing beyond what the dispatch checkpoint covers.
    pub fn replay_from(&self) -> Option<u64> {
        self.replay_from
    }

    /// Indexes the keys of the message at `commit_offset`, stored at `store_timestamp` (ms).
    /// Offsets at or below the last indexed one are skipped, so replaying the commit log is
    /// harmless. A message with more distinct keys than a file holds keeps only that many.
    pub fn add<'k>(
        &mut self,
        topic: &str,
        keys: impl IntoIterator<Item = &'k str>,
        commit_offset: u64,
        store_timestamp: i64,
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
        hashes.truncate(self.entries_per_file as usize);
        if hashes.is_empty() {
            return Ok(());
        }
        let needed = hashes.len() as u64;
        let has_room = self.files.values().next_back().is_some_and(|last| {
            last.state == FileState::Active
                && u64::from(last.entries) + needed <= u64::from(last.header.capacity)
        });
        if !has_room {
            self.roll(commit_offset)?;
        }
        let Some(current) = self.files.values_mut().next_back() else {
            return Err(StoreError::Closed);
        };
        if self.unwritten.is_empty() {
            self.unwritten_at = current.entries;
        }
        for hash in hashes {
            let slot = (hash % u64::from(current.header.slot_count)) as usize;
            let Some(head) = self.active_slots.get_mut(slot) else {
                return Err(StoreError::Closed);
            };
            let entry = Entry {
                hash,
                commit_offset,
                prev: *head,
            };
            self.unwritten.extend_from_slice(&entry.encode());
            current.entries += 1;
            *head = current.entries;
        }
        let header = &mut current.header;
        header.last_offset = commit_offset;
        header.min_timestamp = header.min_timestamp.min(store_timestamp);
        header.max_timestamp = header.max_timestamp.max(store_timestamp);
        self.last_indexed = Some(commit_offset);
        if self.unwritten.len() >= MAX_UNWRITTEN_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    /// Closes the active file (its slots go to disk; the next flush seals its header) and starts
    /// a new one whose first entry is the message at `commit_offset`.
    fn roll(&mut self, commit_offset: u64) -> Result<(), StoreError> {
        self.write_out()?;
        if let Some(last) = self.files.values_mut().next_back()
            && last.state == FileState::Active
        {
            last.file
                .write_all_at(&slots_to_bytes(&self.active_slots), HEADER_SIZE)
                .map_err(io_error("write", &last.path))?;
            last.state = FileState::Full;
        }
        let path = self.dir.join(numbered_name(commit_offset));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error("create", &path))?;
        let header = Header {
            slot_count: self.entries_per_file,
            capacity: self.entries_per_file,
            first_offset: commit_offset,
            sealed_entries: 0,
            last_offset: commit_offset,
            min_timestamp: i64::MAX,
            max_timestamp: i64::MIN,
        };
        let created = IndexFile {
            path,
            file,
            header,
            entries: 0,
            state: FileState::Active,
        };
        created.write_header()?;
        // The slot table stays a hole until the file is full; open rebuilds it from the entries.
        created
            .file
            .set_len(created.entries_start())
            .map_err(io_error("extend", &created.path))?;
        self.active_slots.clear();
        self.active_slots.resize(header.slot_count as usize, 0);
        self.files.insert(commit_offset, created);
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes the buffered entries to the active file (into the page cache; `flush` fsyncs).
    fn write_out(&mut self) -> Result<(), StoreError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let Some(current) = self.files.values().next_back() else {
            return Err(StoreError::Closed);
        };
        current
            .file
            .write_all_at(
                &self.unwritten,
                current.entries_start() + ENTRY_SIZE * u64::from(self.unwritten_at),
            )
            .map_err(io_error("append to", &current.path))?;
        self.unwritten.clear();
        Ok(())
    }

    /// Entry `number` (1-based) of `file`, from the unwritten buffer when it is still there.
    fn entry(&self, file: &IndexFile, number: u32) -> Result<Option<Entry>, StoreError> {
        if number == 0 || number > file.entries {
            return Ok(None);
        }
        let buffered = file.state == FileState::Active
            && !self.unwritten.is_empty()
            && number > self.unwritten_at;
        if buffered {
            let start = (number - 1 - self.unwritten_at) as usize * ENTRY_SIZE as usize;
            return Ok(self
                .unwritten
                .get(start..start + ENTRY_SIZE as usize)
                .and_then(Entry::decode));
        }
        file.read_entry(number)
    }

    /// Commit-log offsets of messages that may carry `key` in `topic`, newest first, at most
    /// `limit`. Files whose time range misses `[begin_ms, end_ms]` are skipped. The caller reads
    /// each record and checks the key and time. A chain that runs into a corrupt entry ends there.
    pub fn candidates(
        &self,
        topic: &str,
        key: &str,
        begin_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let hash = key_hash(topic, key);
        let mut found = Vec::new();
        for file in self.files.values().rev() {
            if found.len() >= limit {
                break;
            }
            if file.header.max_timestamp < begin_ms || file.header.min_timestamp > end_ms {
                continue;
            }
            let slot = file.slot_of(hash);
            let mut next = if file.state == FileState::Active {
                self.active_slots.get(slot as usize).copied().unwrap_or(0)
            } else {
                file.read_slot(slot)?
            };
            while next != 0 && found.len() < limit {
                let Some(entry) = self.entry(file, next)? else {
                    break;
                };
                if entry.hash == hash && entry.commit_offset >= self.min_offset {
                    found.push(entry.commit_offset);
                }
                // Chains only point back; anything else is corrupt and would loop.
                if entry.prev >= next {
                    break;
                }
                next = entry.prev;
            }
        }
        Ok(found)
    }

    /// Writes out buffered entries, seals full files, and fsyncs what changed.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.write_out()?;
        for file in self.files.values_mut() {
            match file.state {
                FileState::Sealed => {}
                FileState::Active => file.sync()?,
                FileState::Full => {
                    // Entries and slots are on disk before the header vouches for them.
                    file.sync()?;
                    file.header.sealed_entries = file.entries;
                    file.write_header()?;
                    file.sync()?;
                    file.state = FileState::Sealed;
                }
            }
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Deletes whole files that only index messages below `commit_log_min`, and ignores entries
    /// below it in the rest.
    pub fn delete_below_commit_offset(&mut self, commit_log_min: u64) -> Result<usize, StoreError> {
        self.min_offset = self.min_offset.max(commit_log_min);
        let bases: Vec<u64> = self.files.keys().copied().collect();
        let mut deleted = 0;
        for pair in bases.windows(2) {
            let [base, next] = pair else { break };
            // A file's offsets all lie below the next file's first offset.
            if *next > commit_log_min {
                break;
            }
            if let Some(file) = self.files.remove(base) {
                fs::remove_file(&file.path).map_err(io_error("delete", &file.path))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// Validates an unsealed file's entries in order and rebuilds its slots. Returns how many
/// entries are good and the offset of the last one. An entry is good when its CRC matches, its
/// offset neither goes back nor reaches `commit_log_end`, and its `prev` is the slot's head so far.
fn scan(
    file: &IndexFile,
    slots: &mut [u32],
    last_before: Option<u64>,
    commit_log_end: u64,
    length: u64,
) -> Result<(u32, Option<u64>), StoreError> {
    let start = file.entries_start();
    let on_disk = ((length - start) / ENTRY_SIZE).min(u64::from(file.header.capacity));
    let mut good = 0u32;
    let mut last: Option<u64> = None;
    let mut chunk = Vec::new();
    let mut at = 0u64;
    while at < on_disk {
        let count = SCAN_CHUNK_ENTRIES.min(on_disk - at);
        chunk.resize((count * ENTRY_SIZE) as usize, 0);
        file.file
            .read_exact_at(&mut chunk, start + at * ENTRY_SIZE)
            .map_err(io_error("read", &file.path))?;
        for bytes in chunk.chunks_exact(ENTRY_SIZE as usize) {
            let Some(entry) = Entry::decode(bytes) else {
                return Ok((good, last));
            };
            let slot = file.slot_of(entry.hash) as usize;
            let in_order = entry.commit_offset >= file.header.first_offset
                && entry.commit_offset < commit_log_end
                && last_before.is_none_or(|before| entry.commit_offset > before)
                && last.is_none_or(|last| entry.commit_offset >= last);
            match slots.get_mut(slot) {
                Some(head) if in_order && *head == entry.prev => {
                    good += 1;
                    *head = good;
                    last = Some(entry.commit_offset);
                }
                _ => return Ok((good, last)),
            }
        }
        at += count;
    }
    Ok((good, last))
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

    const ALL: (i64, i64) = (i64::MIN, i64::MAX);

    fn candidates(index: &KeyIndex, key: &str) -> Vec<u64> {
        index
            .candidates("T", key, ALL.0, ALL.1, usize::MAX)
            .expect("lookup")
    }

    fn file_path(dir: &Path, first_offset: u64) -> PathBuf {
        dir.join(numbered_name(first_offset))
    }

    #[test]
    fn keys_are_found_across_files_and_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 4, u64::MAX).expect("open");
            for message in 0..10u64 {
                let key = format!("order-{}", message % 3);
                let uniq = format!("UNIQ{message}");
                index
                    .add("T", [key.as_str(), uniq.as_str()], message * 100, 0)
                    .expect("add");
            }
            // Two entries per message, four per file: five files, chains in each.
            assert_eq!(index.files.len(), 5);
            assert_eq!(candidates(&index, "order-0"), vec![900, 600, 300, 0]);
            index
                .add("T", ["order-0"], 500, 0)
                .expect("replayed add is skipped");
            index.flush().expect("flush");
        }
        let index = KeyIndex::open(dir.path(), 4, u64::MAX).expect("reopen");
        // The newest file's last message is dropped at open, to be replayed.
        assert_eq!(index.replay_from(), Some(900));
        assert_eq!(index.last_indexed(), Some(800));
        assert_eq!(candidates(&index, "order-0"), vec![600, 300, 0]);
        assert_eq!(candidates(&index, "order-1"), vec![700, 400, 100]);
        assert_eq!(candidates(&index, "UNIQ7"), vec![700]);
        assert!(
            index
                .candidates("other", "order-0", ALL.0, ALL.1, 10)
                .expect("lookup")
                .is_empty()
        );
        assert_eq!(
            index
                .candidates("T", "order-0", ALL.0, ALL.1, 2)
                .expect("lookup"),
            vec![600, 300],
            "limit"
        );
    }

    #[test]
    fn replay_after_reopen_restores_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let add_all = |index: &mut KeyIndex, from: u64| {
            for message in from..20u64 {
                let key = format!("k{}", message % 2);
                index
                    .add("T", [key.as_str()], message * 10, message as i64)
                    .expect("add");
            }
        };
        {
            let mut index = KeyIndex::open(dir.path(), 3, u64::MAX).expect("open");
            add_all(&mut index, 0);
        }
        // Not flushed: the full files were never sealed; open rebuilds and seals them.
        let mut index = KeyIndex::open(dir.path(), 3, u64::MAX).expect("reopen");
        let from = index.replay_from().expect("replay");
        add_all(&mut index, from / 10);
        let expected: Vec<u64> = (0..20u64)
            .rev()
            .filter(|m| m % 2 == 0)
            .map(|m| m * 10)
            .collect();
        assert_eq!(candidates(&index, "k0"), expected);
        assert!(
            index
                .files
                .values()
                .rev()
                .skip(1)
                .all(|f| f.state == FileState::Sealed)
        );
        drop(index);
        let index = KeyIndex::open(dir.path(), 3, u64::MAX).expect("reopen again");
        assert!(index.replay_from().expect("replay") >= 180);
    }

    #[test]
    fn sealed_files_are_pruned_by_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("open");
        for message in 0..6u64 {
            index
                .add("T", ["k"], message, 1000 * message as i64)
                .expect("add");
        }
        index.flush().expect("flush");
        assert_eq!(
            index.candidates("T", "k", 1500, 3500, 10).expect("lookup"),
            vec![3, 2],
            "only the middle file's range meets the window"
        );
    }

    #[test]
    fn entries_past_the_commit_log_end_and_torn_tails_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 100, u64::MAX).expect("open");
            for message in 0..10u64 {
                index.add("T", ["k"], message * 100, 0).expect("add");
            }
        }
        let mut index = KeyIndex::open(dir.path(), 100, 650).expect("reopen");
        // 600 is the newest file's last message: dropped, to be replayed.
        assert_eq!(index.replay_from(), Some(600));
        assert_eq!(candidates(&index, "k"), vec![500, 400, 300, 200, 100, 0]);
        index.add("T", ["k"], 600, 0).expect("replay");
        index.add("T", ["k"], 700, 0).expect("continue");
        index.add("T", ["k"], 800, 0).expect("continue");
        drop(index);
        // A torn tail: half an entry, then garbage in place of the last whole one.
        let path = file_path(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        let len = bytes.len();
        if let Some(byte) = bytes.get_mut(len - 3) {
            *byte ^= 0xff;
        }
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&path, bytes).expect("write");
        let index = KeyIndex::open(dir.path(), 100, u64::MAX).expect("reopen");
        assert_eq!(index.replay_from(), Some(700));
        assert_eq!(candidates(&index, "k").first(), Some(&600));
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_dropped_with_everything_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("open");
            for message in 0..8u64 {
                index.add("T", ["k"], message * 10, 0).expect("add");
            }
            index.flush().expect("flush");
        }
        // Files start at 0, 20, 40, 60. Break the header of the one at 20.
        let path = file_path(dir.path(), 20);
        let mut bytes = fs::read(&path).expect("read");
        if let Some(byte) = bytes.get_mut(10) {
            *byte ^= 1;
        }
        fs::write(&path, bytes).expect("write");
        let index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("reopen");
        assert_eq!(index.replay_from(), Some(20));
        assert_eq!(index.last_indexed(), Some(10));
        assert_eq!(candidates(&index, "k"), vec![10, 0]);
        assert!(!file_path(dir.path(), 40).exists());
        drop(index);

        // A file in the old format (bare 16-byte entries, no header), or truncated to nothing.
        fs::write(file_path(dir.path(), 0), [0u8; 32]).expect("write");
        let index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("reopen");
        assert_eq!(index.replay_from(), Some(0));
        assert!(candidates(&index, "k").is_empty());
        fs::write(file_path(dir.path(), 0), []).expect("write");
        let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("reopen");
        assert_eq!(index.replay_from(), Some(0));
        index.add("T", ["k"], 0, 0).expect("rebuild");
        assert_eq!(candidates(&index, "k"), vec![0]);
    }

    #[test]
    fn a_sealed_file_past_the_commit_log_end_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("open");
            for message in 0..5u64 {
                index.add("T", ["k"], message * 10, 0).expect("add");
            }
            index.flush().expect("flush");
        }
        // The log was cut to 25 by a crash: the sealed file [20, 30] points past it.
        let index = KeyIndex::open(dir.path(), 2, 25).expect("reopen");
        assert_eq!(index.replay_from(), Some(20));
        assert_eq!(candidates(&index, "k"), vec![10, 0]);
    }

    #[test]
    fn retention_forgets_old_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut index = KeyIndex::open(dir.path(), 2, u64::MAX).expect("open");
        for message in 0..10u64 {
            index.add("T", ["k"], message * 100, 0).expect("add");
        }
        assert_eq!(index.delete_below_commit_offset(450).expect("retention"), 2);
        assert_eq!(candidates(&index, "k"), vec![900, 800, 700, 600, 500]);
    }

    #[test]
    fn the_hash_is_stable() {
        // FNV-1a 64 of "#"; the same code gives the published 0xaf63dc4c8601ec8c for "a".
        assert_eq!(key_hash("", ""), 0xaf63_9e4c_8601_8332);
    }
}
