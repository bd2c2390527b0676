//! The log on disk: a [`SegmentLog`] per topic under one data directory.
//!
//! ```text
//! <dir>/LOCK                       exclusive advisory lock (flock) while open; holds the pid
//! <dir>/FORMAT                     "edgepair-log 1"
//! <dir>/topics/<encoded name>/     one per topic (see `encode_topic`)
//!     <base, 20 digits>.log        segment: records (see `segment`)
//!     <base, 20 digits>.idx        its sparse index
//!     delivered                    the delivered mark, decimal (saved by `sync`, by a background
//!                                  sync once `MARK_INTERVAL` has passed since the last save,
//!                                  and on drop)
//! ```

use foldhash::{HashMap, HashMapExt};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::segment::{io_err, sync_dir, Damage, SegmentLog, DEFAULT_SEGMENT_BYTES};
use super::{Covered, Entry, Holds, LogError, Storage, SyncJob, TopicState};

/// Content of the `FORMAT` file of a log directory.
const FORMAT: &str = "edgepair-log 1\n";
/// How often a background sync ([`Storage::end_sync`]) saves the delivered marks that moved.
/// Saving one is a file write and a rename (~0.1–0.2 ms here), which under `--fsync always`
/// came after every fsync, before its `ACK`s went out; a mark lost in a crash only means up
/// to this much of the delivered entries is delivered again after a restart.
const MARK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest encoded topic directory name (file systems allow 255 bytes).
const MAX_NAME: usize = 240;

/// Encodes a topic name as a directory name: bytes outside `[A-Za-z0-9_-]` become `%XX`, so
/// no name is `.`, `..`, empty or holds a `/`.
pub fn encode_topic(topic: &str) -> String {
    let mut s = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Inverse of [`encode_topic`]; `None` for a name it would not have made.
pub fn decode_topic(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                let v = u8::from_str_radix(hex, 16).ok()?;
                if v.is_ascii_alphanumeric() || v == b'_' || v == b'-' || hex != format!("{v:02X}")
                {
                    return None;
                }
                out.push(v);
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.is_empty() && !s.contains(['|', '\n'])).then_some(s)
}

/// What opening a log found and did, for the broker to log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Per topic, the bytes at the end of a segment that were not valid records.
    pub damage: Vec<(String, Damage)>,
    /// Paths ignored or read as something else, and why.
    pub ignored: Vec<(PathBuf, String)>,
}

impl Recovery {
    /// Nothing was cut, reported or ignored.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.ignored.is_empty()
    }

    /// One line per finding.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .damage
            .iter()
            .map(|(t, d)| format!("topic '{t}': {d}"))
            .collect();
        v.extend(
            self.ignored
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display())),
        );
        v
    }
}

#[derive(Debug)]
struct Topic {
    log: SegmentLog,
    delivered: u64,
    /// The mark as last saved.
    saved: u64,
    unsynced: u64,
    /// Times the topic was cut (a cut makes it durable, so a sync job begun before it does
    /// not settle entries appended after it).
    cuts: u64,
}

/// Every topic's log on disk, in one directory held locked while open.
#[derive(Debug)]
pub struct FileLog {
    dir: PathBuf,
    /// The locked `LOCK` file (`None` for [`FileLog::inspect`]).
    lock: Option<File>,
    topics: HashMap<String, Topic>,
    segment_bytes: u64,
    read_only: bool,
    failed: Option<String>,
    unsynced: u64,
    /// A [`SyncJob`] is in flight.
    syncing: bool,
    /// A topic directory was created since the last sync.
    topics_changed: bool,
    max_bytes: Option<u64>,
    max_age: Option<Duration>,
    /// The newest epoch saved in `EPOCH`.
    epoch: u64,
    /// When the delivered marks were last saved.
    marks_saved: std::time::Instant,
    /// New topics' segments are preallocated ([`FileLog::set_preallocate`]).
    preallocate: bool,
    /// Where retention must stop, per topic ([`Storage::hold`]).
    holds: Holds,
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, locking it, and recovers it: see
    /// [`Recovery`].
    pub fn open(dir: &Path) -> Result<(FileLog, Recovery), LogError> {
        FileLog::open_with(dir, DEFAULT_SEGMENT_BYTES)
    }

    /// [`FileLog::open`] rolling segments at `segment_bytes` (the tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<(FileLog, Recovery), LogError> {
        fs::create_dir_all(dir.join("topics"))
            .map_err(io_err(format!("create {}", dir.join("topics").display())))?;
        let lock = lock(dir)?;
        let fmt = dir.join("FORMAT");
        match fs::read_to_string(&fmt) {
            Ok(s) if s == FORMAT => {}
            Ok(s) => {
                return Err(LogError::Corrupt(format!(
                    "{}: {:?} is not a format this build reads ({:?})",
                    fmt.display(),
                    s.trim(),
                    FORMAT.trim()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::write(&fmt, FORMAT).map_err(io_err(format!("write {}", fmt.display())))?;
                sync_dir(dir)?;
            }
            Err(e) => return Err(io_err(format!("read {}", fmt.display()))(e)),
        }
        FileLog::load(dir, Some(lock), segment_bytes)
    }

    /// Opens the log in `dir` for inspection, while a node may be running on it: takes no
    /// lock, writes nothing, and reports a torn tail instead of cutting it. Mutations fail.
    pub fn inspect(dir: &Path) -> Result<(FileLog, Recovery), LogError> {
        let topics = dir.join("topics");
        if let Err(e) = fs::metadata(&topics) {
            return Err(io_err(format!(
                "{} is not a log directory (no {})",
                dir.display(),
                topics.display()
            ))(e));
        }
        FileLog::load(dir, None, DEFAULT_SEGMENT_BYTES)
    }

    fn load(
        dir: &Path,
        lock: Option<File>,
        segment_bytes: u64,
    ) -> Result<(FileLog, Recovery), LogError> {
        let read_only = lock.is_none();
        let mut rec = Recovery::default();
        let mut topics = HashMap::new();
        let tdir = dir.join("topics");
        let list = fs::read_dir(&tdir).map_err(io_err(format!("list {}", tdir.display())))?;
        for de in list {
            let de = de.map_err(io_err(format!("list {}", tdir.display())))?;
            let path = de.path();
            let name = de.file_name();
            let Some(topic) = name.to_str().and_then(decode_topic) else {
                rec.ignored
                    .push((path, "not an encoded topic name: skipped".into()));
                continue;
            };
            if !path.is_dir() {
                rec.ignored.push((path, "not a directory: skipped".into()));
                continue;
            }
            let (log, damage) = SegmentLog::open(&path, segment_bytes, read_only)?;
            rec.damage
                .extend(damage.into_iter().map(|d| (topic.clone(), d)));
            let mark = path.join("delivered");
            let saved = match fs::read_to_string(&mark) {
                Ok(s) => match s.trim().parse::<u64>() {
                    Ok(v) => v,
                    Err(_) => {
                        rec.ignored.push((
                            mark,
                            "delivered mark is not a number: entries from the first kept \
                             are delivered again"
                                .into(),
                        ));
                        0
                    }
                },
                Err(_) => 0,
            };
            let delivered = saved.clamp(log.first(), log.next());
            topics.insert(
                topic,
                Topic {
                    log,
                    delivered,
                    saved,
                    unsynced: 0,
                    cuts: 0,
                },
            );
        }
        let epoch_path = dir.join("EPOCH");
        let epoch = match fs::read_to_string(&epoch_path) {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(v) => v,
                Err(_) => {
                    return Err(LogError::Corrupt(format!(
                        "{}: {:?} is not an epoch number",
                        epoch_path.display(),
                        s.trim()
                    )))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(format!("read {}", epoch_path.display()))(e)),
        };
        let log = FileLog {
            epoch,
            dir: dir.to_path_buf(),
            lock,
            topics,
            segment_bytes,
            read_only,
            failed: None,
            unsynced: 0,
            syncing: false,
            topics_changed: false,
            max_bytes: None,
            max_age: None,
            marks_saved: std::time::Instant::now(),
            preallocate: false,
            holds: Holds::default(),
        };
        Ok((log, rec))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps every topic's active segment filled ahead of its records (for `--fsync
    /// always`; see [`SegmentLog::set_preallocate`]).
    pub fn set_preallocate(&mut self, on: bool) {
        self.preallocate = on;
        for t in self.topics.values_mut() {
            t.log.set_preallocate(on);
        }
    }

    /// Bounds for [`FileLog::enforce_retention`], per topic: bytes of segments, and age of a
    /// segment's newest entry (by its `received_us`).
    pub fn set_retention(&mut self, max_bytes: Option<u64>, max_age: Option<Duration>) {
        self.max_bytes = max_bytes;
        self.max_age = max_age;
    }

    /// Removes whole sealed segments that are over a retention bound and wholly below their
    /// topic's delivered mark; returns the topics whose first offset moved, with the new one.
    pub fn enforce_retention(&mut self, now_us: u64) -> Result<Vec<(String, u64)>, LogError> {
        if self.max_bytes.is_none() && self.max_age.is_none() {
            return Ok(Vec::new());
        }
        self.check_writable()?;
        let cutoff = self
            .max_age
            .map(|a| now_us.saturating_sub(a.as_micros() as u64));
        let mut moved = Vec::new();
        for (name, t) in &mut self.topics {
            if name.starts_with('$') {
                // The node's own records (the consumer groups' journal) are its state: never
                // cut by age or size.
                continue;
            }
            let keep_from = t.delivered.min(self.holds.from(name));
            if t.log.retain(self.max_bytes, cutoff, keep_from)? {
                t.delivered = t.delivered.max(t.log.first());
                moved.push((name.clone(), t.log.first()));
            }
        }
        moved.sort();
        Ok(moved)
    }

    /// Appends several entries of `topic` with one write (a replicated batch, the bench).
    pub fn append_batch<E: std::borrow::Borrow<Entry>>(
        &mut self,
        topic: &str,
        entries: &[E],
    ) -> Result<(), LogError> {
        self.check_writable()?;
        // One lookup by name once the topic exists.
        let t = match self.topics.get_mut(topic) {
            Some(t) => t,
            None => {
                self.create_topic(topic)?;
                match self.topics.get_mut(topic) {
                    Some(t) => t,
                    None => return Err(LogError::Failed(format!("topic '{topic}' not created"))),
                }
            }
        };
        match t.log.append(topic, entries) {
            Ok(()) => {
                t.unsynced += entries.len() as u64;
                self.unsynced += entries.len() as u64;
                Ok(())
            }
            Err(e @ (LogError::NotDense { .. } | LogError::TooLarge { .. })) => Err(e),
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Bytes on disk of a topic's segments and indexes.
    pub fn topic_bytes(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.log.bytes())
    }

    /// Segments of a topic: (base offset, bytes), oldest first.
    pub fn topic_segments(&self, topic: &str) -> Vec<(u64, u64)> {
        self.topics.get(topic).map_or_else(Vec::new, |t| {
            t.log.segments().iter().map(|s| (s.base, s.size)).collect()
        })
    }

    /// After `topic` was cut (`truncate`, `restart_at`): the cut fsync'd what is left, so none
    /// of it is unsynced, and its delivered mark becomes `delivered(mark, next)`; a failed cut
    /// fails the log.
    fn cut_done(
        &mut self,
        topic: &str,
        cut: Result<u64, LogError>,
        delivered: impl FnOnce(u64, u64) -> u64,
    ) -> Result<u64, LogError> {
        let n = match cut {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        if let Some(t) = self.topics.get_mut(topic) {
            t.delivered = delivered(t.delivered, t.log.next());
            self.unsynced -= t.unsynced;
            t.unsynced = 0;
            t.cuts += 1;
        }
        Ok(n)
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.read_only {
            return Err(LogError::Failed(format!(
                "{} is opened for inspection only",
                self.dir.display()
            )));
        }
        match &self.failed {
            Some(why) => Err(LogError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn create_topic(&mut self, topic: &str) -> Result<(), LogError> {
        let bad = |why: &str| LogError::BadTopic {
            topic: topic.to_string(),
            why: why.to_string(),
        };
        if topic.is_empty() {
            return Err(bad("empty"));
        }
        if topic.contains(['|', '\n']) {
            return Err(bad("contains '|' or a newline"));
        }
        let name = encode_topic(topic);
        if name.len() > MAX_NAME {
            return Err(bad(&format!(
                "encodes to {} bytes, more than a directory name may hold ({MAX_NAME})",
                name.len()
            )));
        }
        let path = self.dir.join("topics").join(name);
        fs::create_dir(&path).map_err(io_err(format!("create {}", path.display())))?;
        let mut log = SegmentLog::create(&path, self.segment_bytes)?;
        log.set_preallocate(self.preallocate);
        self.topics_changed = true;
        self.topics.insert(
            topic.to_string(),
            Topic {
                log,
                delivered: 0,
                saved: 0,
                unsynced: 0,
                cuts: 0,
            },
        );
        Ok(())
    }

    /// Saves the delivered marks that moved (temp file and rename, no fsync). Errors are
    /// logged, not returned: a lost mark only means entries delivered again.
    fn save_marks(&mut self) {
        self.marks_saved = std::time::Instant::now();
        for (name, t) in &mut self.topics {
            if t.delivered == t.saved {
                continue;
            }
            let dir = t.log.dir();
            let (tmp, mark) = (dir.join("delivered.tmp"), dir.join("delivered"));
            let r = fs::write(&tmp, format!("{}\n", t.delivered))
                .and_then(|()| fs::rename(&tmp, &mark));
            match r {
                Ok(()) => t.saved = t.delivered,
                Err(e) => {
                    tracing::warn!(topic = %name, path = %mark.display(), error = %e, "cannot save the delivered mark")
                }
            }
        }
    }
}

/// Takes the directory's lock, writing our pid into it.
fn lock(dir: &Path) -> Result<File, LogError> {
    let path = dir.join("LOCK");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(format!("open {}", path.display())))?;
    match fs4::FileExt::try_lock(&f) {
        Ok(()) => {}
        Err(fs4::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let pid = f
                .read_to_string(&mut s)
                .ok()
                .and_then(|_| s.trim().parse().ok());
            return Err(LogError::Locked { path, pid });
        }
        Err(fs4::TryLockError::Error(e)) => {
            return Err(io_err(format!("lock {}", path.display()))(e))
        }
    }
    f.set_len(0)
        .and_then(|()| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_err(format!("write {}", path.display())))?;
    Ok(f)
}

impl Drop for FileLog {
    fn drop(&mut self) {
        if !self.read_only {
            self.save_marks();
        }
        // The lock goes with the file; the pid stays in it, naming the last holder.
        drop(self.lock.take());
    }
}

impl Storage for FileLog {
    fn topics(&self) -> Vec<TopicState> {
        let mut v: Vec<TopicState> = self.topics.keys().map(|n| self.topic(n)).collect();
        v.sort_by(|a, b| a.topic.cmp(&b.topic));
        v
    }

    fn saved_epoch(&self) -> u64 {
        self.epoch
    }

    fn save_epoch(&mut self, epoch: u64) -> Result<(), LogError> {
        if self.read_only || epoch <= self.epoch {
            return Ok(());
        }
        let tmp = self.dir.join("EPOCH.tmp");
        let path = self.dir.join("EPOCH");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, format!("{epoch}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(io_err(format!("save {}", path.display())))?;
        sync_dir(&self.dir)?;
        self.epoch = epoch;
        Ok(())
    }

    fn enforce_retention(&mut self, now_us: u64) -> Result<Vec<(String, u64)>, LogError> {
        FileLog::enforce_retention(self, now_us)
    }

    fn next_offset(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.log.next())
    }

    fn delivered(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.delivered)
    }

    fn topic(&self, topic: &str) -> TopicState {
        let (first, next, delivered) = self
            .topics
            .get(topic)
            .map_or((0, 0, 0), |t| (t.log.first(), t.log.next(), t.delivered));
        TopicState {
            topic: topic.to_string(),
            first,
            next,
            delivered,
        }
    }

    fn append(&mut self, topic: &str, e: &Entry) -> Result<(), LogError> {
        self.append_batch(topic, std::slice::from_ref(e))
    }

    fn truncate(&mut self, topic: &str, from: u64) -> Result<u64, LogError> {
        self.check_writable()?;
        let Some(t) = self.topics.get_mut(topic) else {
            return Ok(0);
        };
        let cut = t.log.truncate(from);
        self.cut_done(topic, cut, |delivered, next| delivered.min(next))
    }

    fn trim_front(&mut self, topic: &str, before: u64) -> Result<(), LogError> {
        self.check_writable()?;
        let Some(t) = self.topics.get_mut(topic) else {
            return Ok(());
        };
        // What replaces the removed entries must be on the disk before they go.
        // Then every sealed segment that ends at or below `before`, whatever its size or age.
        if let Err(e) = t
            .log
            .sync()
            .and_then(|()| t.log.retain(Some(0), None, before))
        {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        t.delivered = t.delivered.max(t.log.first());
        Ok(())
    }

    fn restart_at(&mut self, topic: &str, at: u64) -> Result<u64, LogError> {
        self.check_writable()?;
        if !self.topics.contains_key(topic) {
            // Made as an append makes it, then started again.
            self.create_topic(topic)?;
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return Ok(0);
        };
        let cut = t.log.restart_at(at);
        self.cut_done(topic, cut, |_, next| next)
    }

    fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        match self.topics.get(topic) {
            Some(t) => t.log.read(from, max),
            None => Ok(Vec::new()),
        }
    }

    fn epochs(&self, topic: &str) -> Vec<(u64, u64)> {
        self.topics
            .get(topic)
            .map_or_else(Vec::new, |t| t.log.epochs())
    }

    fn set_delivered(&mut self, topic: &str, upto: u64) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.delivered = t.delivered.max(upto.min(t.log.next()));
        }
    }

    fn sync(&mut self) -> Result<(), LogError> {
        self.check_writable()?;
        for t in self.topics.values_mut() {
            if let Err(e) = t.log.sync() {
                self.failed = Some(e.to_string());
                return Err(e);
            }
            t.unsynced = 0;
        }
        if self.topics_changed {
            if let Err(e) = sync_dir(&self.dir.join("topics")) {
                self.failed = Some(e.to_string());
                return Err(e);
            }
            self.topics_changed = false;
        }
        self.unsynced = 0;
        self.save_marks();
        Ok(())
    }

    fn unsynced(&self) -> u64 {
        self.unsynced
    }

    fn flush(&mut self) -> Result<(), LogError> {
        for t in self.topics.values() {
            if let Err(e) = t.log.flush() {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    fn begin_sync(&mut self) -> Result<Option<SyncJob>, LogError> {
        self.check_writable()?;
        if self.syncing {
            return Err(LogError::Failed("a sync is already in flight".into()));
        }
        let mut job = SyncJob::default();
        for (name, t) in self.topics.iter_mut() {
            match t.log.begin_sync() {
                Ok(Some((file, path, base, size))) => {
                    job.files.push((file, path));
                    job.covered.push(Covered {
                        topic: name.clone(),
                        base,
                        size,
                        entries: t.unsynced,
                        cuts: t.cuts,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        if job.files.is_empty() {
            return Ok(None);
        }
        self.syncing = true;
        Ok(Some(job))
    }

    fn end_sync(&mut self, job: SyncJob, result: Result<(), LogError>) -> Result<(), LogError> {
        self.syncing = false;
        if let Err(e) = result {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.check_writable()?;
        for c in &job.covered {
            if let Some(t) = self.topics.get_mut(&c.topic) {
                if t.cuts != c.cuts {
                    // Cut meanwhile: the cut made what the job covered durable.
                    continue;
                }
                t.unsynced = t.unsynced.saturating_sub(c.entries);
                if let Err(e) = t.log.end_sync(c.base, c.size) {
                    self.failed = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        if self.topics_changed {
            if let Err(e) = sync_dir(&self.dir.join("topics")) {
                self.failed = Some(e.to_string());
                return Err(e);
            }
            self.topics_changed = false;
        }
        // Entries appended while the job ran stay unsynced.
        self.unsynced = self.topics.values().map(|t| t.unsynced).sum();
        if self.marks_saved.elapsed() >= MARK_INTERVAL {
            self.save_marks();
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), LogError> {
        self.check_writable()
    }

    fn hold(&mut self, topic: &str, from: Option<u64>) {
        self.holds.set(topic, from);
    }

    fn is_durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::segment::{encode_record, HEADER as HEADER_BYTES, RUNWAY_BYTE};
    use crate::log::CutReason;
    use crate::protocol::MsgId;

    /// Small segments, so a few hundred entries span several.
    const SEG: u64 = 2048;

    fn entry(offset: u64) -> Arc<Entry> {
        Arc::new(Entry {
            offset,
            epoch: 1 + offset / 100,
            id: MsgId {
                publisher: format!("p{}", offset % 3).into(),
                seq: offset + 1,
            },
            sent_us: 1_000 + offset,
            received_us: 2_000 + offset,
            payload: format!("message {offset} ✓"),
        })
    }

    fn fill(log: &mut FileLog, topic: &str, range: std::ops::Range<u64>) {
        for o in range {
            log.append(topic, &entry(o)).expect("append");
        }
    }

    fn read_all(log: &FileLog, topic: &str) -> Vec<Arc<Entry>> {
        let mut all = Vec::new();
        let mut at = 0;
        loop {
            let got = log.read(topic, at, 37).expect("read");
            let Some(last) = got.last() else { break };
            at = last.offset + 1;
            all.extend(got);
        }
        all
    }

    fn assert_entries(log: &FileLog, topic: &str, range: std::ops::Range<u64>) {
        let got = read_all(log, topic);
        let want: Vec<Arc<Entry>> = range.map(entry).collect();
        assert_eq!(got.len(), want.len(), "entry count of {topic}");
        assert_eq!(got, want);
    }

    fn open(dir: &Path) -> (FileLog, Recovery) {
        FileLog::open_with(dir, SEG).expect("open")
    }

    fn topic_dir(dir: &Path, topic: &str) -> PathBuf {
        dir.join("topics").join(encode_topic(topic))
    }

    fn last_segment(dir: &Path, topic: &str) -> PathBuf {
        let mut logs: Vec<PathBuf> = fs::read_dir(topic_dir(dir, topic))
            .expect("list")
            .map(|d| d.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        logs.pop().expect("a segment")
    }

    fn record_len(offset: u64) -> u64 {
        let mut b = Vec::new();
        encode_record(&entry(offset), &mut b).expect("encode");
        b.len() as u64
    }

    /// Appends to `topic` runs of entries, one epoch each (epochs 1, 2, …): `runs[i]`
    /// entries in epoch `i + 1`. Returns the epochs as `Storage::epochs` should list them.
    fn fill_epochs(log: &mut FileLog, topic: &str, runs: &[u64]) -> Vec<(u64, u64)> {
        let mut want = Vec::new();
        let mut offset = log.next_offset(topic);
        for (i, &n) in runs.iter().enumerate() {
            let epoch = i as u64 + 1;
            if n > 0 {
                want.push((epoch, offset));
            }
            for _ in 0..n {
                let mut e = Arc::unwrap_or_clone(entry(offset));
                e.epoch = epoch;
                log.append(topic, &e).expect("append");
                offset += 1;
            }
        }
        want
    }

    #[test]
    fn epochs_are_found_from_the_index_as_a_search_over_entries_finds_them() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Small segments (one index point each) and larger ones (several points each).
        for seg in [SEG, 64 << 10] {
            for round in 0..12 {
                let dir = tempfile::tempdir().expect("tempdir");
                let (mut log, _) = FileLog::open_with(dir.path(), seg).expect("open");
                // Runs of one entry, of about a segment, of many segments; some epochs skipped.
                let runs: Vec<u64> = (0..rng.gen_range(1..40))
                    .map(|_| match rng.gen_range(0..6) {
                        0 => 0,
                        1 => 1,
                        2 => rng.gen_range(2..10),
                        3 => rng.gen_range(20..40),
                        _ => rng.gen_range(50..900),
                    })
                    .collect();
                let want = fill_epochs(&mut log, "t", &runs);
                // Before a sync (index points in memory), after one, after a reopen.
                assert_eq!(log.epochs("t"), want, "seg {seg} round {round}: {runs:?}");
                assert_eq!(crate::log::epochs_by_search(&log, "t"), want);
                log.sync().expect("sync");
                drop(log);
                let (log, _) = FileLog::open_with(dir.path(), seg).expect("reopen");
                assert_eq!(log.epochs("t"), want, "seg {seg} round {round} reopened");
                let next = log.next_offset("t");
                for (e, start) in &want {
                    let end = crate::log::end_of_epoch(&want, next, *e);
                    assert!(end > *start);
                    assert!(want.iter().all(|(x, s)| x <= e || *s >= end));
                }
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = FileLog::open_with(dir.path(), SEG).expect("open");
        assert!(log.epochs("none").is_empty());
    }

    #[test]
    fn epochs_start_at_the_oldest_kept_entry_and_stop_at_a_corrupt_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = FileLog::open_with(dir.path(), SEG).expect("open");
        let want = fill_epochs(&mut log, "t", &[100, 3, 200, 50]);
        log.trim_front("t", 150).expect("trim");
        let first = log.topic("t").first;
        assert!(first > 100 && first <= 150, "first kept {first}");
        let kept: Vec<(u64, u64)> = want.iter().copied().filter(|w| w.1 > first).collect();
        let mut expect = vec![(3, first)];
        expect.extend(kept);
        assert_eq!(log.epochs("t"), expect);
        log.sync().expect("sync");
        drop(log);
        // Flip a byte of epoch 4's first entry (offset 303), which a search must read.
        let mut segs: Vec<PathBuf> = fs::read_dir(topic_dir(dir.path(), "t"))
            .expect("list")
            .map(|d| d.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        segs.sort();
        let (hit, at) = segs
            .iter()
            .find_map(|p| {
                let bytes = fs::read(p).expect("read");
                let mut pos = 0;
                while pos + HEADER_BYTES + 8 <= bytes.len() {
                    let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().ok()?) as usize;
                    let b = pos + HEADER_BYTES;
                    if u64::from_le_bytes(bytes[b..b + 8].try_into().ok()?) == 303 {
                        return Some((p.clone(), b + 12));
                    }
                    pos += HEADER_BYTES + len;
                }
                None
            })
            .expect("the record of offset 303");
        let mut bytes = fs::read(&hit).expect("read");
        bytes[at] ^= 0x55;
        fs::write(&hit, bytes).expect("write");
        // Opening finds the damage (the segment's last records are checked) and the segment
        // ends before 303: the next one starts later. A search in memory meets the same gap.
        let (log, rec) = FileLog::open_with(dir.path(), SEG).expect("reopen");
        assert!(!rec.is_clean());
        assert_eq!(log.epochs("t"), vec![(3, first), (u64::MAX, 303)]);
    }

    #[test]
    fn roundtrip_across_segments_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, rec) = open(dir.path());
            assert!(rec.is_clean());
            assert!(log.is_durable());
            fill(&mut log, "t", 0..300);
            fill(&mut log, "u", 0..5);
            assert_eq!(log.unsynced(), 305);
            // Entries are readable before the sync.
            assert_entries(&log, "t", 0..300);
            log.sync().expect("sync");
            assert_eq!(log.unsynced(), 0);
            log.set_delivered("t", 120);
            log.set_delivered("t", 100); // never backwards
            log.set_delivered("u", 99); // capped at next
            assert!(
                log.topic_segments("t").len() > 5,
                "{:?}",
                log.topic_segments("t")
            );
            let err = log.append("t", &entry(301)).expect_err("a gap is refused");
            assert!(err.to_string().contains("expects 300"), "{err}");
            assert_eq!(log.read("t", 295, 100).expect("read").len(), 5);
            assert!(log.read("t", 300, 10).expect("read").is_empty());
            assert!(log.read("nope", 0, 10).expect("read").is_empty());
            log.sync().expect("sync");
        }
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..300);
        assert_entries(&log, "u", 0..5);
        let names: Vec<(String, u64, u64, u64)> = log
            .topics()
            .into_iter()
            .map(|t| (t.topic, t.first, t.next, t.delivered))
            .collect();
        assert_eq!(
            names,
            vec![("t".into(), 0, 300, 120), ("u".into(), 0, 5, 5)]
        );
        assert_eq!(log.topic("missing").next, 0);
    }

    #[test]
    fn marks_are_saved_on_drop_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..10);
            log.sync().expect("sync");
            log.set_delivered("t", 7);
        }
        assert_eq!(open(dir.path()).0.topic("t").delivered, 7);
    }

    #[test]
    fn torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..200);
            log.sync().expect("sync");
        }
        let last = last_segment(dir.path(), "t");
        let len = fs::metadata(&last).expect("meta").len();
        let rec_len = record_len(199);
        let f = OpenOptions::new().write(true).open(&last).expect("open");
        f.set_len(len - rec_len / 2).expect("truncate");
        drop(f);
        let (mut log, rec) = open(dir.path());
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.lines());
        let (topic, d) = &rec.damage[0];
        assert_eq!(topic, "t");
        assert_eq!(d.reason, CutReason::Torn);
        assert!(d.cut);
        assert_eq!(d.bytes, rec_len - rec_len / 2);
        assert_eq!(d.at, len - rec_len);
        assert_eq!(fs::metadata(&last).expect("meta").len(), len - rec_len);
        assert_entries(&log, "t", 0..199);
        // The log goes on at the cut, and the next open is clean.
        fill(&mut log, "t", 199..210);
        log.sync().expect("sync");
        drop(log);
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..210);
    }

    use std::os::unix::fs::FileExt;

    fn file_len(p: &Path) -> u64 {
        fs::metadata(p).expect("meta").len()
    }

    /// A preallocating log (`--fsync always`) keeps a runway past the records of its active
    /// segment; sealed segments end with their last record, and opening takes the runway for
    /// what it is (no damage, nothing lost, appends go on at the last record).
    #[test]
    fn preallocated_segments_reopen_clean_and_go_on_at_their_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            log.set_preallocate(true);
            for chunk in 0..30 {
                fill(&mut log, "t", chunk * 10..chunk * 10 + 10);
                log.sync().expect("sync");
            }
            let segs = log.topic_segments("t");
            assert!(segs.len() > 3, "{segs:?}");
            let (last_base, last_size) = segs[segs.len() - 1];
            for (base, size) in &segs[..segs.len() - 1] {
                let p = topic_dir(dir.path(), "t").join(format!("{base:020}.log"));
                assert_eq!(file_len(&p), *size, "sealed segment {base} keeps no runway");
            }
            let p = topic_dir(dir.path(), "t").join(format!("{last_base:020}.log"));
            assert!(
                file_len(&p) > last_size,
                "the active segment has a runway: {} bytes for {last_size} of records",
                file_len(&p)
            );
        }
        let (mut log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..300);
        // Without preallocation now: it writes into the old runway, at its last record.
        fill(&mut log, "t", 300..310);
        log.sync().expect("sync");
        drop(log);
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..310);
    }

    /// A record torn by a crash in front of the runway is still cut and reported, and so are
    /// zeros there (what a crash leaves of bytes that never reached the disk) and a stray
    /// byte after a stretch of the runway's fill.
    #[test]
    fn damage_in_front_of_a_runway_is_cut_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let end = {
            let (mut log, _) = open(dir.path());
            log.set_preallocate(true);
            fill(&mut log, "t", 0..5);
            log.sync().expect("sync");
            log.topic_segments("t")[0].1
        };
        let seg = last_segment(dir.path(), "t");
        let runway = file_len(&seg);
        assert!(runway > end);
        // Writes each (bytes, at) into the segment, reopens, and expects exactly one cut, at
        // `end`, for `reason`, with the five entries kept; returns the damaged byte count.
        let damaged = |writes: &[(&[u8], u64)], reason: CutReason| -> u64 {
            let f = OpenOptions::new().write(true).open(&seg).expect("open");
            for (bytes, at) in writes {
                f.write_all_at(bytes, *at).expect("write");
            }
            drop(f);
            let (log, rec) = open(dir.path());
            assert_eq!(rec.damage.len(), 1, "{:?}", rec.lines());
            assert_eq!(rec.damage[0].1.reason, reason);
            assert_eq!(rec.damage[0].1.at, end);
            assert_entries(&log, "t", 0..5);
            rec.damage[0].1.bytes
        };
        // Half a record: its header and the first half of its body, the runway after.
        let mut rec_bytes = Vec::new();
        encode_record(&entry(5), &mut rec_bytes).expect("encode");
        let half = &rec_bytes[..rec_bytes.len() / 2];
        assert_eq!(
            damaged(&[(half, end)], CutReason::Checksum),
            half.len() as u64,
            "the damaged bytes, not the runway after them"
        );
        assert_eq!(file_len(&seg), end, "cut at the last good record");
        // The runway's fill, then a stray byte: not a runway.
        damaged(
            &[(&[RUNWAY_BYTE; 64], end), (&[7], end + 64)],
            CutReason::BadLength,
        );
        // Zeros where the runway was: reported too.
        damaged(&[(&[0u8; 64], end)], CutReason::BadLength);
    }

    /// A segment sealed while preallocating is cut to its records, even when it was written
    /// with segments larger than the ones it is sealed under; and the runway's fill at the end
    /// of a sealed segment is damage, not runway (a sealed segment never keeps one).
    #[test]
    fn sealed_segments_keep_no_runway() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = FileLog::open_with(dir.path(), 1 << 20).expect("open");
            log.set_preallocate(true);
            fill(&mut log, "t", 0..40);
            log.sync().expect("sync");
            let (_, size) = log.topic_segments("t")[0];
            let first = last_segment(dir.path(), "t");
            assert!(file_len(&first) > size, "a runway while active");
        }
        let first = last_segment(dir.path(), "t");
        {
            // Reopened with small segments: the next append seals the first one.
            let (mut log, rec) = open(dir.path());
            assert!(rec.is_clean(), "{:?}", rec.lines());
            log.set_preallocate(true);
            fill(&mut log, "t", 40..60);
            log.sync().expect("sync");
            let segs = log.topic_segments("t");
            assert!(segs.len() >= 2, "{segs:?}");
            assert_eq!(file_len(&first), segs[0].1, "the sealed segment was cut");
        }
        // The runway's fill after a sealed segment's records is reported.
        let f = OpenOptions::new().write(true).open(&first).expect("open");
        let size = file_len(&first);
        f.write_all_at(&[RUNWAY_BYTE; 100], size).expect("write");
        drop(f);
        let (log, rec) = open(dir.path());
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.lines());
        assert_eq!(rec.damage[0].1.at, size);
        assert!(
            !rec.damage[0].1.cut,
            "damage in a sealed segment is left in place"
        );
        assert_entries(&log, "t", 0..60);
    }

    #[test]
    fn flipped_byte_in_the_last_record_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..50);
            log.sync().expect("sync");
        }
        let last = last_segment(dir.path(), "t");
        let mut bytes = fs::read(&last).expect("read");
        let n = bytes.len();
        bytes[n - 3] ^= 0x20; // inside the payload of entry 49
        fs::write(&last, &bytes).expect("write");
        let (log, rec) = open(dir.path());
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.lines());
        assert_eq!(rec.damage[0].1.reason, CutReason::Checksum);
        assert_eq!(rec.damage[0].1.bytes, record_len(49));
        assert_eq!(log.topic("t").next, 49);
        assert_entries(&log, "t", 0..49);
    }

    #[test]
    fn garbage_length_is_cut_as_bad_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..20);
            log.sync().expect("sync");
        }
        let last = last_segment(dir.path(), "t");
        let mut f = OpenOptions::new().append(true).open(&last).expect("open");
        f.write_all(&[0u8; 100]).expect("write zeros");
        drop(f);
        let (log, rec) = open(dir.path());
        assert_eq!(rec.damage[0].1.reason, CutReason::BadLength);
        assert_eq!(rec.damage[0].1.bytes, 100);
        assert_entries(&log, "t", 0..20);
    }

    #[test]
    fn a_sealed_segment_that_does_not_end_cleanly_is_reported_and_reads_fail_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..100);
            log.sync().expect("sync");
            log.topic_segments("t")
        };
        assert!(segs.len() > 2);
        let first = topic_dir(dir.path(), "t").join(format!("{:020}.log", segs[0].0));
        let f = OpenOptions::new().write(true).open(&first).expect("open");
        f.set_len(segs[0].1 - 5).expect("truncate");
        drop(f);
        let (log, rec) = open(dir.path());
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.lines());
        assert!(!rec.damage[0].1.cut, "a sealed segment is not cut");
        assert_eq!(rec.damage[0].1.reason, CutReason::Torn);
        assert_eq!(log.topic("t").next, 100);
        let err = log.read("t", 0, 100).expect_err("the hole fails the read");
        assert!(matches!(err, LogError::Corrupt(_)), "{err}");
        let later = log.read("t", segs[1].0, 5).expect("later segments read");
        assert_eq!(later[0].offset, segs[1].0);
    }

    #[test]
    fn truncate_across_segment_boundaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path());
        fill(&mut log, "t", 0..300);
        log.set_delivered("t", 290);
        let segs = log.topic_segments("t");
        // Into the middle of the third segment: the later ones go.
        let from = segs[2].0 + 3;
        assert_eq!(log.truncate("t", from).expect("truncate"), 300 - from);
        assert_eq!(log.topic_segments("t").len(), 3);
        assert_eq!(log.topic("t").next, from);
        assert_eq!(log.topic("t").delivered, from);
        assert_eq!(log.unsynced(), 0, "the cut makes the topic durable");
        assert_entries(&log, "t", 0..from);
        // Exactly at a segment's base.
        assert_eq!(
            log.truncate("t", segs[1].0).expect("truncate"),
            from - segs[1].0
        );
        assert_eq!(log.topic("t").next, segs[1].0);
        assert_eq!(log.truncate("t", 10_000).expect("nothing to cut"), 0);
        fill(&mut log, "t", segs[1].0..260);
        assert_entries(&log, "t", 0..260);
        log.sync().expect("sync");
        drop(log);
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..260);
        drop(log);
        let (mut log, _) = open(dir.path());
        assert_eq!(log.truncate("t", 0).expect("truncate all"), 260);
        assert_eq!(log.topic("t").next, 0);
        fill(&mut log, "t", 0..3);
        assert_entries(&log, "t", 0..3);
    }

    #[test]
    fn a_topic_started_again_past_its_end_keeps_only_what_comes_after_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = open(dir.path());
            fill(&mut log, "t", 0..300);
            assert!(log.topic_segments("t").len() > 2);
            assert_eq!(log.restart_at("t", 500).expect("restart"), 300);
            let t = log.topic("t");
            assert_eq!((t.first, t.next, t.delivered), (500, 500, 500));
            assert_eq!(log.unsynced(), 0);
            fill(&mut log, "t", 500..510);
            // A topic this log never had starts where it is told.
            assert_eq!(log.restart_at("u", 40).expect("new topic"), 0);
            fill(&mut log, "u", 40..42);
            log.sync().expect("sync");
        }
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_eq!(log.topic_segments("t").len(), 1);
        assert_eq!(log.topic("t").first, 500);
        assert_entries(&log, "t", 500..510);
        assert_entries(&log, "u", 40..42);
    }

    #[test]
    fn odd_topic_names_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = ["a/b", "..", ".", "x y", "é", "%41", "A-_z"];
        {
            let (mut log, _) = open(dir.path());
            for (i, n) in names.iter().enumerate() {
                fill(&mut log, n, 0..(i as u64 + 1));
            }
            log.sync().expect("sync");
            for bad in ["", "a|b", "a\nb"] {
                let err = log.append(bad, &entry(0)).expect_err("refused");
                assert!(matches!(err, LogError::BadTopic { .. }), "{err}");
            }
            let long = "é".repeat(100);
            assert!(matches!(
                log.append(&long, &entry(0)),
                Err(LogError::BadTopic { .. })
            ));
            // A refused topic name does not fail the log.
            fill(&mut log, "a/b", 1..2);
        }
        fs::create_dir(dir.path().join("topics").join("not%2")).expect("mkdir");
        fs::create_dir(dir.path().join("topics").join("%61")).expect("mkdir");
        let (log, rec) = open(dir.path());
        assert_eq!(rec.ignored.len(), 2, "{:?}", rec.lines());
        for (i, n) in names.iter().enumerate() {
            let want = if *n == "a/b" { 2 } else { i as u64 + 1 };
            assert_eq!(log.topic(n).next, want, "topic {n:?}");
            assert_entries(&log, n, 0..want);
        }
        assert_eq!(log.topics().len(), names.len());
        for n in names {
            assert_eq!(decode_topic(&encode_topic(n)).as_deref(), Some(n));
            assert!(!encode_topic(n).contains(['.', '/']));
        }
    }

    #[test]
    fn the_saved_epoch_survives_a_reopen_and_never_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path());
        assert_eq!(log.saved_epoch(), 0);
        log.save_epoch(3).expect("save");
        log.save_epoch(2).expect("an older one is ignored");
        drop(log);
        let (log, _) = open(dir.path());
        assert_eq!(log.saved_epoch(), 3);
        drop(log);
        fs::write(dir.path().join("EPOCH"), "three").expect("garble");
        let err = FileLog::open(dir.path()).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("not an epoch number")),
            "{err:?}"
        );
    }

    #[test]
    fn a_second_open_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = open(dir.path());
        let err = FileLog::open(dir.path()).expect_err("locked");
        match &err {
            LogError::Locked { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("in use by process {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        // Inspection needs no lock.
        assert!(FileLog::inspect(dir.path()).is_ok());
        drop(log);
        assert!(FileLog::open(dir.path()).is_ok(), "free again once closed");
    }

    #[test]
    fn inspect_reports_a_torn_tail_and_cuts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path());
        fill(&mut log, "t", 0..30);
        log.sync().expect("sync");
        let last = last_segment(dir.path(), "t");
        let mut f = OpenOptions::new().append(true).open(&last).expect("open");
        f.write_all(&[7u8; 5]).expect("write");
        let len = fs::metadata(&last).expect("meta").len();
        let (view, rec) = FileLog::inspect(dir.path()).expect("inspect");
        assert_eq!(rec.damage.len(), 1);
        assert!(!rec.damage[0].1.cut);
        assert_eq!(rec.damage[0].1.reason, CutReason::Torn);
        assert_eq!(fs::metadata(&last).expect("meta").len(), len, "nothing cut");
        assert_entries(&view, "t", 0..30);
        let mut view = view;
        assert!(matches!(
            view.append("t", &entry(30)),
            Err(LogError::Failed(_))
        ));
        assert!(FileLog::inspect(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn retention_removes_only_delivered_sealed_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path());
        fill(&mut log, "t", 0..300);
        log.sync().expect("sync");
        let segs = log.topic_segments("t");
        assert!(segs.len() > 5);
        assert!(log
            .enforce_retention(u64::MAX)
            .expect("no bounds")
            .is_empty());
        log.set_retention(Some(1), None);
        // Nothing delivered: nothing goes, however far over the bound.
        assert!(log.enforce_retention(0).expect("retention").is_empty());
        // Delivered up to inside the third segment, a group holding from the second: only
        // the first goes; once the group moves on, the second too.
        log.set_delivered("t", segs[2].0 + 1);
        log.hold("t", Some(segs[1].0 + 1));
        let moved = log.enforce_retention(0).expect("retention");
        assert_eq!(moved, vec![("t".to_string(), segs[1].0)]);
        log.hold("t", Some(segs[2].0 + 1));
        let moved = log.enforce_retention(0).expect("retention");
        assert_eq!(moved, vec![("t".to_string(), segs[2].0)]);
        assert_eq!(log.topic("t").first, segs[2].0);
        let got = log.read("t", 0, 2).expect("read from before first");
        assert_eq!(got[0].offset, segs[2].0);
        // By age: entries received at 2000 + offset µs; a bound of 1 s at a "now" where
        // everything is older than that: every delivered sealed segment goes.
        log.set_retention(None, Some(Duration::from_secs(1)));
        log.hold("t", None);
        log.set_delivered("t", 300);
        let moved = log.enforce_retention(10_000_000).expect("retention");
        let last_base = segs[segs.len() - 1].0;
        assert_eq!(moved, vec![("t".to_string(), last_base)]);
        drop(log);
        let (log, rec) = open(dir.path());
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_eq!(log.topic("t").first, last_base);
        assert_entries(&log, "t", last_base..300);
    }

    #[test]
    fn recovery_without_an_index_and_with_a_bad_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = FileLog::open_with(dir.path(), 1 << 20).expect("open");
            fill(&mut log, "t", 0..400);
            log.sync().expect("sync");
        }
        let last = last_segment(dir.path(), "t");
        let idx = last.with_extension("idx");
        assert!(
            fs::metadata(&idx).expect("meta").len() >= 16,
            "index points written"
        );
        // An index point that does not start a record is dropped and recovery still works.
        let mut f = OpenOptions::new().append(true).open(&idx).expect("open");
        f.write_all(&1000u64.to_le_bytes()).expect("write");
        f.write_all(&(fs::metadata(&last).expect("meta").len() - 7).to_le_bytes())
            .expect("write");
        drop(f);
        let (log, rec) = FileLog::open_with(dir.path(), 1 << 20).expect("open");
        assert!(rec.is_clean(), "{:?}", rec.lines());
        assert_entries(&log, "t", 0..400);
        drop(log);
        fs::remove_file(&idx).expect("remove index");
        let (log, _) = FileLog::open_with(dir.path(), 1 << 20).expect("open");
        assert_entries(&log, "t", 0..400);
    }
}
