//! The log on disk: a [`SegmentLog`] per topic under one data directory.
//!
//! ```text
//! <dir>/LOCK                       exclusive advisory lock (flock) while open; holds the pid
//! <dir>/FORMAT                     "edgepair-log 1"
//! <dir>/topics/<encoded name>/     one per topic (see `encode_topic`)
//!     <base, 20 digits>.log        segment: records (see `segment`)
//!     <base, 20 digits>.idx        its sparse index
//!     delivered                    the delivered mark, decimal (saved by `sync` and on drop)
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::segment::{io_err, sync_dir, Damage, SegmentLog, DEFAULT_SEGMENT_BYTES};
use super::{Entry, LogError, Storage, TopicState};

/// Content of the `FORMAT` file of a log directory.
const FORMAT: &str = "edgepair-log 1\n";
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
    /// A topic directory was created since the last sync.
    topics_changed: bool,
    max_bytes: Option<u64>,
    max_age: Option<Duration>,
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
                },
            );
        }
        let log = FileLog {
            dir: dir.to_path_buf(),
            lock,
            topics,
            segment_bytes,
            read_only,
            failed: None,
            unsynced: 0,
            topics_changed: false,
            max_bytes: None,
            max_age: None,
        };
        Ok((log, rec))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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
            if t.log.retain(self.max_bytes, cutoff, t.delivered)? {
                t.delivered = t.delivered.max(t.log.first());
                moved.push((name.clone(), t.log.first()));
            }
        }
        moved.sort();
        Ok(moved)
    }

    /// Appends several entries of `topic` with one write (a replicated batch, the bench).
    pub fn append_batch(&mut self, topic: &str, entries: &[Arc<Entry>]) -> Result<(), LogError> {
        self.check_writable()?;
        if !self.topics.contains_key(topic) {
            self.create_topic(topic)?;
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return Err(LogError::Failed(format!("topic '{topic}' not created")));
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
        let log = SegmentLog::create(&path, self.segment_bytes)?;
        self.topics_changed = true;
        self.topics.insert(
            topic.to_string(),
            Topic {
                log,
                delivered: 0,
                saved: 0,
                unsynced: 0,
            },
        );
        Ok(())
    }

    /// Saves the delivered marks that moved (temp file and rename, no fsync). Errors are
    /// logged, not returned: a lost mark only means entries delivered again.
    fn save_marks(&mut self) {
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

    fn append(&mut self, topic: &str, e: &Arc<Entry>) -> Result<(), LogError> {
        self.append_batch(topic, std::slice::from_ref(e))
    }

    fn truncate(&mut self, topic: &str, from: u64) -> Result<u64, LogError> {
        self.check_writable()?;
        let Some(t) = self.topics.get_mut(topic) else {
            return Ok(0);
        };
        match t.log.truncate(from) {
            Ok(n) => {
                t.delivered = t.delivered.min(t.log.next());
                // The cut fsync'd the segment: what is left of this topic is durable.
                self.unsynced -= t.unsynced;
                t.unsynced = 0;
                Ok(n)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        match self.topics.get(topic) {
            Some(t) => t.log.read(from, max),
            None => Ok(Vec::new()),
        }
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

    fn is_durable(&self) -> bool {
        true
    }
}
