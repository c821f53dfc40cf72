//! The segmented, append-only commit log.
//!
//! Every entry is framed as `len:u32 | crc:u32 | payload`, where `crc` is CRC-32 over the length bytes
//! and the payload, so a torn or zero-filled tail can never pass for an entry. An entry's offset is
//! the logical byte position of its frame; offsets are dense across segments. Segments are plain
//! files named by the 20-digit offset of their first byte; a new one starts when the next entry would
//! push the current one past the configured size. Files are not preallocated, so a segment's length
//! is exactly what was written to it.
//!
//! Durability: appends go to the page cache under one writer lock. A flusher thread fsyncs either
//! periodically (`Async`) or as soon as an appender asks (`Sync`); every fsync covers all appends
//! made before it started, so concurrent synchronous senders share fsyncs (group commit). The flushed
//! offset is checkpointed so that recovery only has to scan what might be torn: from the checkpoint
//! onwards, each frame's length and CRC are checked, the first bad frame and everything after it
//! are cut off, and any later segment is removed. (Should no frame follow the checkpoint where one
//! should, its whole segment is scanned instead.)

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use super::files::{io_error, numbered_files, numbered_name, read_u64, replace_file, sync_dir};

/// Bytes of the frame around each payload.
pub const FRAME_OVERHEAD: u64 = 8;
const CHECKPOINT_FILE: &str = "checkpoint";
/// How often the flusher rewrites the checkpoint at most.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// When appended bytes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fsync at this interval; an append is acknowledged once it is in the page cache.
    Async { interval: Duration },
    /// fsync on demand; [`CommitLog::wait_durable`] returns once the entry is on disk.
    Sync,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy::Async {
            interval: Duration::from_millis(500),
        }
    }
}

/// Commit log settings.
#[derive(Debug, Clone)]
pub struct CommitLogConfig {
    pub dir: PathBuf,
    /// A segment is closed when the next entry would take it past this many bytes.
    pub segment_size: u64,
    /// Largest payload accepted, and believed during recovery.
    pub max_entry_size: u32,
    pub flush: FlushPolicy,
}

impl CommitLogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_size: 1 << 30,
            max_entry_size: 16 << 20,
            flush: FlushPolicy::default(),
        }
    }
}

/// Why a commit log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entry of {size} bytes exceeds the limit of {max}")]
    EntryTooLarge { size: usize, max: u32 },
    #[error("empty entries cannot be stored")]
    EmptyEntry,
    #[error("offset {offset} is outside the log [{min}, {max})")]
    OffsetOutOfRange { offset: u64, min: u64, max: u64 },
    #[error("corrupt entry at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: &'static str },
    #[error("the commit log stopped accepting writes after an earlier I/O failure")]
    Failed,
    #[error("the commit log is closed")]
    Closed,
    #[error("metadata file {file}: {reason}")]
    Metadata { file: String, reason: String },
    #[error("invalid message record: {0}")]
    InvalidRecord(#[from] crate::remoting::message::RecordError),
    /// A topic or group name, or a queue id, that must not reach the disk.
    #[error("{0}")]
    InvalidName(#[from] crate::names::NameError),
    #[error("path {path} would lie outside {root}")]
    OutsideDataDir { root: PathBuf, path: PathBuf },
}

/// Where an appended entry landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the entry.
    pub offset: u64,
    /// Offset just past it: the entry is durable once the flushed offset reaches this.
    pub end: u64,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    /// The log's first offset afterwards.
    pub min_offset: u64,
}

struct Segment {
    base: u64,
    path: PathBuf,
    file: Arc<File>,
}

/// State only the appender touches.
struct Writer {
    active: Arc<Segment>,
    /// Offset just past the last entry.
    end: u64,
    /// Closed segments not yet fsynced, and whether a new file awaits a directory fsync.
    unsynced: Vec<Arc<File>>,
    dir_dirty: bool,
    failed: bool,
}

/// What the flusher publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Durability {
    flushed: u64,
    failed: bool,
}

struct Shared {
    config: CommitLogConfig,
    writer: Mutex<Writer>,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    /// Offset just past the last entry, readable without the writer lock.
    written: AtomicU64,
    flush_requested: Mutex<FlushRequest>,
    flush_wakeup: Condvar,
    durability: watch::Sender<Durability>,
    /// Serializes fsync rounds, so that no round publishes an offset another is still syncing.
    flush_lock: Mutex<()>,
    fsyncs: AtomicU64,
}

#[derive(Default)]
struct FlushRequest {
    wanted: u64,
    shutdown: bool,
}

/// The commit log. Cheap to share behind an `Arc`; appends serialize on one lock, reads do not.
pub struct CommitLog {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these structures half-updated in a way that matters
    // more than refusing service, so keep going with the data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn frame_crc(len_bytes: &[u8; 4], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len_bytes);
    hasher.update(payload);
    hasher.finalize()
}

impl CommitLog {
    /// Opens (creating if needed) the log in `config.dir`, recovering from an unclean stop.
    pub fn open(config: CommitLogConfig) -> Result<Self, StoreError> {
        fs::create_dir_all(&config.dir).map_err(io_error("create directory", &config.dir))?;
        let checkpoint = read_checkpoint(&config.dir)?;
        let mut segments = list_segments(&config.dir)?;
        let end = recover(&config, &mut segments, checkpoint)?;

        let active = match segments.values().next_back() {
            Some(last) => last.clone(),
            None => {
                let segment = Arc::new(create_segment(&config.dir, 0)?);
                segments.insert(0, segment.clone());
                segment
            }
        };
        sync_dir(&config.dir)?;
        let (durability, _) = watch::channel(Durability {
            flushed: end,
            failed: false,
        });
        let shared = Arc::new(Shared {
            writer: Mutex::new(Writer {
                active,
                end,
                unsynced: Vec::new(),
                dir_dirty: false,
                failed: false,
            }),
            segments: RwLock::new(segments),
            written: AtomicU64::new(end),
            flush_requested: Mutex::new(FlushRequest {
                wanted: end,
                shutdown: false,
            }),
            flush_wakeup: Condvar::new(),
            durability,
            flush_lock: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
            config,
        });
        write_checkpoint(&shared.config.dir, end)?;
        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("commit-log-flush".into())
            .spawn(move || flusher_loop(&flusher_shared))
            .map_err(io_error("start flusher thread for", &shared.config.dir))?;
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }

    /// Appends one entry. `build` gets the entry's offset (records embed their own offset) and
    /// returns the payload. Returns where it landed; see [`CommitLog::wait_durable`].
    pub fn append(&self, build: impl FnOnce(u64) -> Bytes) -> Result<Appended, StoreError> {
        let config = &self.shared.config;
        let mut writer = lock(&self.shared.writer);
        if writer.failed {
            return Err(StoreError::Failed);
        }
        let offset = writer.end;
        let payload = build(offset);
        if payload.is_empty() {
            return Err(StoreError::EmptyEntry);
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len <= config.max_entry_size)
            .ok_or(StoreError::EntryTooLarge {
                size: payload.len(),
                max: config.max_entry_size,
            })?;
        let frame_len = FRAME_OVERHEAD + u64::from(len);
        if offset > writer.active.base
            && offset - writer.active.base + frame_len > config.segment_size
        {
            self.roll(&mut writer)?;
        }
        let len_bytes = len.to_be_bytes();
        let mut frame = Vec::with_capacity(payload.len() + FRAME_OVERHEAD as usize);
        frame.extend_from_slice(&len_bytes);
        frame.extend_from_slice(&frame_crc(&len_bytes, &payload).to_be_bytes());
        frame.extend_from_slice(&payload);

        let position = offset - writer.active.base;
        if let Err(source) = writer.active.file.write_all_at(&frame, position) {
            // Cut back whatever part landed; if even that fails the tail is unknown, so stop writing.
            if writer.active.file.set_len(position).is_err() {
                writer.failed = true;
            }
            return Err(StoreError::Io {
                action: "append to",
                path: writer.active.path.clone(),
                source,
            });
        }
        writer.end = offset + frame_len;
        self.shared.written.store(writer.end, Ordering::Release);
        let appended = Appended {
            offset,
            end: writer.end,
        };
        drop(writer);
        if self.shared.config.flush == FlushPolicy::Sync {
            let mut request = lock(&self.shared.flush_requested);
            request.wanted = request.wanted.max(appended.end);
            self.shared.flush_wakeup.notify_one();
        }
        Ok(appended)
    }

    fn roll(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let segment = Arc::new(create_segment(&self.shared.config.dir, writer.end)?);
        let previous = std::mem::replace(&mut writer.active, segment.clone());
        writer.unsynced.push(previous.file.clone());
        writer.dir_dirty = true;
        self.shared
            .segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment.base, segment);
        Ok(())
    }

    /// Waits until the entry ending at `end` is on disk. With the async policy this returns at once:
    /// there the caller acknowledges from the page cache.
    pub async fn wait_durable(&self, end: u64) -> Result<(), StoreError> {
        if self.shared.config.flush != FlushPolicy::Sync {
            return Ok(());
        }
        let mut receiver = self.shared.durability.subscribe();
        let state = receiver
            .wait_for(|state| state.failed || state.flushed >= end)
            .await
            .map_err(|_| StoreError::Closed)?;
        if state.failed && state.flushed < end {
            return Err(StoreError::Failed);
        }
        Ok(())
    }

    /// fsyncs everything appended so far, now, on the calling thread.
    pub fn flush(&self) -> Result<(), StoreError> {
        flush_once(&self.shared).map(|_| ())
    }

    /// The payload of the entry at `offset` and the offset of the next entry.
    pub fn read(&self, offset: u64) -> Result<(Bytes, u64), StoreError> {
        let max = self.max_offset();
        let segment = {
            let segments = self
                .shared
                .segments
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let min = segments.keys().next().copied().unwrap_or(0);
            if offset < min || offset >= max {
                return Err(StoreError::OffsetOutOfRange { offset, min, max });
            }
            segments
                .range(..=offset)
                .next_back()
                .map(|(_, segment)| segment.clone())
                .ok_or(StoreError::OffsetOutOfRange { offset, min, max })?
        };
        let position = offset - segment.base;
        match segment.read_frame(
            position,
            max - segment.base,
            self.shared.config.max_entry_size,
        )? {
            Ok(payload) => {
                let next = offset + FRAME_OVERHEAD + payload.len() as u64;
                Ok((Bytes::from(payload), next))
            }
            Err(reason) => Err(StoreError::Corrupt { offset, reason }),
        }
    }

    /// The first offset still stored.
    pub fn min_offset(&self) -> u64 {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        segments.keys().next().copied().unwrap_or(0)
    }

    /// The offset the next entry will get.
    pub fn max_offset(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Everything below this offset is on disk.
    pub fn flushed_offset(&self) -> u64 {
        self.shared.durability.borrow().flushed
    }

    /// How many fsync rounds have run; with concurrent synchronous appends this grows more slowly
    /// than the number of appends.
    pub fn fsync_count(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// Offsets where segments start, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        segments.keys().copied().collect()
    }

    /// Deletes whole closed segments, oldest first, while the log holds more than `max_bytes` or
    /// while a segment's last write is older than `max_age`. The active segment always stays.
    pub fn apply_retention(
        &self,
        max_bytes: Option<u64>,
        max_age: Option<Duration>,
    ) -> Result<Retention, StoreError> {
        let active_base = lock(&self.shared.writer).active.base;
        let mut report = Retention::default();
        let now = SystemTime::now();
        loop {
            let oldest = {
                let segments = self
                    .shared
                    .segments
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                segments.values().next().cloned()
            };
            let Some(oldest) = oldest.filter(|segment| segment.base != active_base) else {
                break;
            };
            let total = self.max_offset() - oldest.base;
            let too_big = max_bytes.is_some_and(|max| total > max);
            let too_old = max_age.is_some_and(|max_age| {
                oldest
                    .file
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|modified| now.duration_since(modified).ok())
                    .is_some_and(|age| age > max_age)
            });
            if !too_big && !too_old {
                break;
            }
            let size = oldest.file.metadata().map(|meta| meta.len()).unwrap_or(0);
            self.shared
                .segments
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&oldest.base);
            fs::remove_file(&oldest.path).map_err(io_error("delete", &oldest.path))?;
            report.segments_deleted += 1;
            report.bytes_deleted += size;
        }
        if report.segments_deleted > 0 {
            sync_dir(&self.shared.config.dir)?;
        }
        report.min_offset = self.min_offset();
        Ok(report)
    }
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        lock(&self.shared.flush_requested).shutdown = true;
        self.shared.flush_wakeup.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

/// The flusher thread: waits for a request or the interval, then fsyncs.
fn flusher_loop(shared: &Shared) {
    let interval = match shared.config.flush {
        FlushPolicy::Async { interval } => interval,
        FlushPolicy::Sync => CHECKPOINT_INTERVAL,
    };
    let mut last_checkpoint = Instant::now();
    loop {
        let shutdown = {
            let mut request = lock(&shared.flush_requested);
            let flushed = shared.durability.borrow().flushed;
            if !request.shutdown && request.wanted <= flushed {
                request = shared
                    .flush_wakeup
                    .wait_timeout(request, interval)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            request.shutdown
        };
        match flush_once(shared) {
            Ok(flushed) => {
                if shutdown || last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                    // A stale checkpoint only means a longer scan at the next start.
                    let _ = write_checkpoint(&shared.config.dir, flushed);
                    last_checkpoint = Instant::now();
                }
            }
            Err(_) => {
                lock(&shared.writer).failed = true;
                shared.durability.send_modify(|state| state.failed = true);
            }
        }
        if shutdown {
            return;
        }
    }
}

/// fsyncs closed segments, the directory if segments were created, and the active segment; then
/// publishes the offset all of that covers.
fn flush_once(shared: &Shared) -> Result<u64, StoreError> {
    let _round = lock(&shared.flush_lock);
    let (target, active, unsynced, dir_dirty) = {
        let mut writer = lock(&shared.writer);
        let dir_dirty = std::mem::take(&mut writer.dir_dirty);
        (
            writer.end,
            writer.active.clone(),
            std::mem::take(&mut writer.unsynced),
            dir_dirty,
        )
    };
    if target <= shared.durability.borrow().flushed {
        return Ok(target);
    }
    for file in &unsynced {
        file.sync_data()
            .map_err(io_error("fsync", &shared.config.dir))?;
    }
    if dir_dirty {
        sync_dir(&shared.config.dir)?;
    }
    active
        .file
        .sync_data()
        .map_err(io_error("fsync", &active.path))?;
    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    shared
        .durability
        .send_modify(|state| state.flushed = state.flushed.max(target));
    Ok(target)
}

fn read_checkpoint(dir: &Path) -> Result<Option<u64>, StoreError> {
    read_u64(&dir.join(CHECKPOINT_FILE))
}

fn write_checkpoint(dir: &Path, flushed: u64) -> Result<(), StoreError> {
    replace_file(dir, CHECKPOINT_FILE, &flushed.to_be_bytes())
}

impl Segment {
    /// Reads the frame at `position` and checks its length and CRC. `limit` is where this
    /// segment's data ends. The outer error is I/O; the inner one says why the bytes there are not
    /// a whole, intact frame.
    fn read_frame(
        &self,
        position: u64,
        limit: u64,
        max_entry_size: u32,
    ) -> Result<Result<Vec<u8>, &'static str>, StoreError> {
        if position + FRAME_OVERHEAD > limit {
            return Ok(Err("not the start of an entry"));
        }
        let mut header = [0u8; FRAME_OVERHEAD as usize];
        self.file
            .read_exact_at(&mut header, position)
            .map_err(io_error("read", &self.path))?;
        let len_bytes = [header[0], header[1], header[2], header[3]];
        let len = u32::from_be_bytes(len_bytes);
        let stored_crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > max_entry_size || position + FRAME_OVERHEAD + u64::from(len) > limit {
            return Ok(Err("not the start of an entry"));
        }
        let mut payload = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut payload, position + FRAME_OVERHEAD)
            .map_err(io_error("read", &self.path))?;
        if frame_crc(&len_bytes, &payload) != stored_crc {
            return Ok(Err("CRC mismatch"));
        }
        Ok(Ok(payload))
    }
}

fn list_segments(dir: &Path) -> Result<BTreeMap<u64, Arc<Segment>>, StoreError> {
    let mut segments = BTreeMap::new();
    for (base, path) in numbered_files(dir)? {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        segments.insert(
            base,
            Arc::new(Segment {
                base,
                path,
                file: Arc::new(file),
            }),
        );
    }
    Ok(segments)
}

fn create_segment(dir: &Path, base: u64) -> Result<Segment, StoreError> {
    let path = dir.join(numbered_name(base));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("create", &path))?;
    Ok(Segment {
        base,
        path,
        file: Arc::new(file),
    })
}

/// Validates the possibly torn part of the log and cuts it at the first bad frame. Returns the end.
fn recover(
    config: &CommitLogConfig,
    segments: &mut BTreeMap<u64, Arc<Segment>>,
    checkpoint: Option<u64>,
) -> Result<u64, StoreError> {
    // Segments wholly below the checkpoint were fsynced before it was written: trust their lengths,
    // but they must still line up with each other.
    let scan_from = checkpoint
        .and_then(|checkpoint| {
            segments
                .range(..=checkpoint)
                .next_back()
                .map(|(base, _)| *base)
        })
        .or_else(|| segments.keys().next().copied());
    let bases: Vec<u64> = segments.keys().copied().collect();
    let mut expected_base: Option<u64> = None;
    let mut end = bases.first().copied().unwrap_or(0);
    let mut cut_after: Option<u64> = None;
    for base in bases {
        let Some(segment) = segments.get(&base).cloned() else {
            continue;
        };
        if expected_base.is_some_and(|expected| expected != base) {
            // A gap or overlap: this segment does not continue the previous one.
            cut_after = Some(base);
            break;
        }
        let length = segment
            .file
            .metadata()
            .map_err(io_error("stat", &segment.path))?
            .len();
        let valid = if Some(base) >= scan_from {
            // The checkpoint is a frame boundary of fsynced data: start there when it lies in
            // this segment and a frame (or the end) follows it; otherwise scan the whole segment.
            let trusted = checkpoint
                .filter(|checkpoint| (base..=base + length).contains(checkpoint))
                .map(|checkpoint| checkpoint - base)
                .unwrap_or(0);
            match scan_segment(config, &segment, length, trusted)? {
                valid if valid == trusted && trusted < length => {
                    scan_segment(config, &segment, length, 0)?
                }
                valid => valid,
            }
        } else {
            length
        };
        if valid < length {
            segment
                .file
                .set_len(valid)
                .map_err(io_error("truncate", &segment.path))?;
            segment
                .file
                .sync_all()
                .map_err(io_error("fsync", &segment.path))?;
        }
        end = base + valid;
        expected_base = Some(end);
        if valid < length {
            cut_after = Some(base + 1);
            break;
        }
    }
    if let Some(cut) = cut_after {
        let doomed: Vec<u64> = segments.range(cut..).map(|(base, _)| *base).collect();
        for base in doomed {
            if let Some(segment) = segments.remove(&base) {
                fs::remove_file(&segment.path).map_err(io_error("delete", &segment.path))?;
            }
        }
    }
    // An empty last segment after a cut is harmless, but one that starts past the end is not.
    if let Some((&base, _)) = segments.iter().next_back()
        && base > end
        && let Some(segment) = segments.remove(&base)
    {
        fs::remove_file(&segment.path).map_err(io_error("delete", &segment.path))?;
    }
    Ok(end)
}

/// The length of the valid prefix of a segment, `from` being known valid: whole frames with good
/// lengths and CRCs.
fn scan_segment(
    config: &CommitLogConfig,
    segment: &Segment,
    length: u64,
    from: u64,
) -> Result<u64, StoreError> {
    let mut position = from;
    while let Ok(payload) = segment.read_frame(position, length, config.max_entry_size)? {
        position += FRAME_OVERHEAD + payload.len() as u64;
    }
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(dir: &Path, segment_size: u64, flush: FlushPolicy) -> CommitLogConfig {
        CommitLogConfig {
            dir: dir.to_owned(),
            segment_size,
            max_entry_size: 4096,
            flush,
        }
    }

    fn payload(index: usize) -> Bytes {
        let mut text = format!("entry-{index}-");
        text.push_str(&"x".repeat(index % 53));
        Bytes::from(text)
    }

    fn append_n(log: &CommitLog, range: std::ops::Range<usize>) -> Vec<Appended> {
        range
            .map(|index| log.append(|_| payload(index)).expect("append"))
            .collect()
    }

    fn read_all(log: &CommitLog) -> Vec<Bytes> {
        let mut entries = Vec::new();
        let mut offset = log.min_offset();
        while offset < log.max_offset() {
            let (entry, next) = log.read(offset).expect("read");
            entries.push(entry);
            offset = next;
        }
        entries
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut names: Vec<PathBuf> = fs::read_dir(dir)
            .expect("dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.len() == super::super::files::NUMBERED_NAME_DIGITS)
            })
            .collect();
        names.sort();
        names.pop().expect("a segment")
    }

    #[test]
    fn entries_survive_segment_rolls_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let appended = {
            let log =
                CommitLog::open(config(dir.path(), 256, FlushPolicy::default())).expect("open");
            let appended = append_n(&log, 0..100);
            assert!(log.segment_bases().len() > 10, "{:?}", log.segment_bases());
            for pair in appended.windows(2) {
                assert_eq!(pair[0].end, pair[1].offset, "offsets are dense");
            }
            assert_eq!(read_all(&log), (0..100).map(payload).collect::<Vec<_>>());
            appended
        };
        let log = CommitLog::open(config(dir.path(), 256, FlushPolicy::default())).expect("reopen");
        assert_eq!(
            log.max_offset(),
            appended.last().map(|a| a.end).unwrap_or(0)
        );
        assert_eq!(read_all(&log), (0..100).map(payload).collect::<Vec<_>>());
        let offset = appended[42].offset;
        assert_eq!(log.read(offset).expect("read").0, payload(42));
        assert!(matches!(
            log.read(offset + 1),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            log.read(log.max_offset()),
            Err(StoreError::OffsetOutOfRange { .. })
        ));
    }

    #[test]
    fn the_builder_sees_the_entry_offset_and_bad_sizes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            CommitLog::open(config(dir.path(), 1 << 20, FlushPolicy::default())).expect("open");
        let first = log
            .append(|offset| Bytes::from(offset.to_string()))
            .expect("append");
        let second = log
            .append(|offset| Bytes::from(offset.to_string()))
            .expect("append");
        assert_eq!(
            log.read(second.offset).expect("read").0,
            second.offset.to_string()
        );
        assert_eq!(second.offset, first.end);
        assert!(matches!(
            log.append(|_| Bytes::new()),
            Err(StoreError::EmptyEntry)
        ));
        assert!(matches!(
            log.append(|_| Bytes::from(vec![0u8; 4097])),
            Err(StoreError::EntryTooLarge { .. })
        ));
        assert_eq!(
            log.max_offset(),
            second.end,
            "refused entries take no space"
        );
    }

    #[test]
    fn torn_zero_filled_and_corrupt_tails_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 1 << 20, FlushPolicy::default());
        let good_end = {
            let log = CommitLog::open(cfg.clone()).expect("open");
            append_n(&log, 0..10).last().map(|a| a.end).expect("ten")
        };
        let tails: [&[u8]; 3] = [
            // a frame header promising 50 bytes, followed by 6
            &[0, 0, 0, 50, 1, 2, 3, 4, b'p', b'a', b'r', b't', b'i', b'a'],
            // the file grew but the data never reached the disk
            &[0u8; 4096],
            // half a header
            &[0, 0],
        ];
        for tail in tails {
            let mut file = OpenOptions::new()
                .append(true)
                .open(last_segment(dir.path()))
                .expect("segment");
            file.write_all(tail).expect("write tail");
            drop(file);
            let log = CommitLog::open(cfg.clone()).expect("recover");
            assert_eq!(log.max_offset(), good_end);
            assert_eq!(read_all(&log), (0..10).map(payload).collect::<Vec<_>>());
        }
        // A flipped bit in the last entry removes that entry only.
        let segment = last_segment(dir.path());
        let mut bytes = fs::read(&segment).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&segment, bytes).expect("write");
        fs::remove_file(dir.path().join(CHECKPOINT_FILE)).expect("remove checkpoint");
        let log = CommitLog::open(cfg).expect("recover");
        assert_eq!(read_all(&log), (0..9).map(payload).collect::<Vec<_>>());
        let again = log.append(|_| payload(9)).expect("append after recovery");
        assert_eq!(again.end, good_end, "the cut entry's space is reused");
        assert_eq!(read_all(&log), (0..10).map(payload).collect::<Vec<_>>());
    }

    #[test]
    fn a_bad_entry_in_an_earlier_segment_drops_the_segments_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 256, FlushPolicy::default());
        let bases = {
            let log = CommitLog::open(cfg.clone()).expect("open");
            append_n(&log, 0..40);
            log.segment_bases()
        };
        assert!(bases.len() >= 4);
        let victim = dir.path().join(numbered_name(bases[1]));
        let mut bytes = fs::read(&victim).expect("read");
        bytes[10] ^= 0xff;
        fs::write(&victim, bytes).expect("write");
        fs::remove_file(dir.path().join(CHECKPOINT_FILE)).expect("remove checkpoint");
        let log = CommitLog::open(cfg).expect("recover");
        assert_eq!(log.segment_bases(), bases[..2].to_vec());
        assert_eq!(
            log.max_offset(),
            bases[1],
            "the first entry of segment 1 was the bad one"
        );
        for base in &bases[2..] {
            assert!(!dir.path().join(numbered_name(*base)).exists());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_flush_acknowledges_after_fsync_and_batches_fsyncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            Arc::new(CommitLog::open(config(dir.path(), 4096, FlushPolicy::Sync)).expect("open"));
        let mut tasks = Vec::new();
        for task in 0..8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for index in 0..50 {
                    let appended = log.append(|_| payload(task * 50 + index)).expect("append");
                    log.wait_durable(appended.end).await.expect("durable");
                    assert!(log.flushed_offset() >= appended.end);
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("in time")
                .expect("task");
        }
        let fsyncs = log.fsync_count();
        println!("400 synchronous appends took {fsyncs} fsync rounds");
        assert!(fsyncs < 400, "fsyncs were shared: {fsyncs}");
        assert_eq!(read_all(&log).len(), 400);
    }

    #[test]
    fn retention_deletes_whole_old_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = CommitLog::open(config(dir.path(), 512, FlushPolicy::default())).expect("open");
        let appended = append_n(&log, 0..200);
        let before = log.segment_bases();
        let report = log.apply_retention(Some(2048), None).expect("retention");
        assert!(report.segments_deleted > 0);
        assert_eq!(
            log.segment_bases(),
            before[report.segments_deleted..].to_vec()
        );
        assert!(log.max_offset() - log.min_offset() <= 2048);
        assert!(matches!(
            log.read(appended[0].offset),
            Err(StoreError::OffsetOutOfRange { .. })
        ));
        assert_eq!(read_all(&log).last(), Some(&payload(199)));
        let by_age = log
            .apply_retention(None, Some(Duration::ZERO))
            .expect("retention by age");
        assert_eq!(
            log.segment_bases().len(),
            1,
            "only the active segment stays: {by_age:?}"
        );
    }
}
