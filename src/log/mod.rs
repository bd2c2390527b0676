//! The per-topic log: every accepted message is an entry at a dense offset of its topic.
//!
//! The primary appends, the backup appends the same entry at the same offset, and both keep a
//! *delivered mark* per topic: every entry below it has been delivered to subscribers. What lies
//! between the mark and the end of a topic is what a node must still deliver after a takeover
//! or a restart. The core reaches the log only through the [`Storage`] trait, so the same core
//! runs on [`MemLog`] (memory, as the pair tests and the simulation want, with a model of what a
//! crash loses) and on the segment files of [`FileLog`] (a `--data-dir`).
//!
//! Durability is explicit: [`Storage::append`] may leave an entry in a buffer or the page
//! cache; [`Storage::sync`] returns once everything appended so far is on disk. The core calls
//! `sync` once per batch of events (group commit) and sends an `ACK` only when the policy of
//! [`Fsync`] is met.

mod file;
pub mod inspect;
mod mem;
pub mod segment;

use std::sync::Arc;

use thiserror::Error;

use crate::protocol::MsgId;

pub use file::{decode_topic, encode_topic, FileLog, Recovery};
pub use mem::{MemLog, DEFAULT_RETAIN_ENTRIES};
pub use segment::{CutReason, Damage, DEFAULT_SEGMENT_BYTES};

/// One entry of a topic's log. Immutable once appended. The core's message holds it in place;
/// a log copies what it keeps (the in-memory log packs it into its chunks, a file log encodes
/// it), and a read hands out fresh ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the topic: dense, from 0.
    pub offset: u64,
    /// Epoch of the primary that appended it.
    pub epoch: u64,
    /// Publisher id and sequence number (anonymous for the seed dialect).
    pub id: MsgId,
    /// The publisher's send time, µs since the Unix epoch.
    pub sent_us: u64,
    /// When the node that accepted it received it, µs since the Unix epoch.
    pub received_us: u64,
    /// The message body.
    pub payload: String,
}

/// A topic as the log knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicState {
    /// Topic name.
    pub topic: String,
    /// Oldest offset still kept (retention moves it).
    pub first: u64,
    /// The offset the next entry gets: entries are `first..next`.
    pub next: u64,
    /// Every entry below this offset was delivered.
    pub delivered: u64,
}

/// When an `ACK` may go, as far as the local disk is concerned (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Each entry is fsync'd before its `ACK` (group commit: one fsync per batch of events).
    Always,
    /// Entries are written at once and fsync'd every [`BATCH_INTERVAL`] or
    /// [`BATCH_ENTRIES`] entries, whichever comes first; the `ACK` does not wait for it. A
    /// process crash loses nothing (the page cache survives it); a power loss loses at most
    /// that bound.
    #[default]
    Batch,
    /// Entries are written but never fsync'd by us (the OS writes them back when it likes).
    Never,
}

/// Longest time an appended entry stays un-fsync'd under [`Fsync::Batch`].
pub const BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);
/// Most entries left un-fsync'd under [`Fsync::Batch`]. Above the 5 ms bound's worth at the
/// rates measured here (~6,500 entries at 1.3 M msg/s, a windowed publisher's), so the time
/// bound governs: each fsync is a wake-up and a writeback on the same two cores as the relay.
/// At 1,000 a pipelining publisher made twice the fsyncs and `batch` fell below 0.9× of
/// `never`; at 4,096 the windowed figure was 0.88× of `never`, at 16,384 0.95× (8 rounds
/// alternating; README, *Durable*).
pub const BATCH_ENTRIES: u64 = 16384;

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "batch" => Ok(Fsync::Batch),
            "never" => Ok(Fsync::Never),
            _ => Err(format!("'{s}': expected always, batch or never")),
        }
    }
}

impl std::fmt::Display for Fsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fsync::Always => "always",
            Fsync::Batch => "batch",
            Fsync::Never => "never",
        })
    }
}

/// Why the log refused or failed an operation. The core answers a publish it could not log
/// with `ERR|…` and does not acknowledge it.
#[derive(Debug, Error)]
pub enum LogError {
    /// The disk said no (full, read-only, gone).
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An append whose offset is not the topic's next one.
    #[error("topic '{topic}': entry at offset {got}, the log expects {want}")]
    NotDense {
        /// The topic.
        topic: String,
        /// The next offset of the topic.
        want: u64,
        /// The offset of the entry given.
        got: u64,
    },
    /// Stored bytes that fail their checksum or do not decode, away from the tail (a torn
    /// tail is cut and reported at open instead).
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// An earlier write or sync failed; the log refuses appends until it is reopened.
    #[error("the log failed earlier and must be reopened: {0}")]
    Failed(String),
    /// Another process holds the log directory.
    #[error(
        "log directory {} is in use by {} (it holds {}); stop it, or give this node another data directory",
        path.parent().map_or_else(|| path.display().to_string(), |p| p.display().to_string()),
        pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}")),
        path.display()
    )]
    Locked {
        /// The lock file.
        path: std::path::PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
    },
    /// A topic name the log cannot keep on disk.
    #[error("topic '{topic}' cannot be logged: its name {why}")]
    BadTopic {
        /// The topic.
        topic: String,
        /// What is wrong with it.
        why: String,
    },
    /// An entry too large for a record.
    #[error("topic '{topic}': entry {offset} cannot be logged: {why}")]
    TooLarge {
        /// The topic.
        topic: String,
        /// The entry's offset.
        offset: u64,
        /// Its size and the limit.
        why: String,
    },
}

/// The fsyncs of one sync, to run off the thread that owns the log ([`SyncJob::run`]), for
/// instance on a blocking thread while the node goes on reading and appending.
#[derive(Debug, Default)]
pub struct SyncJob {
    /// Handles on the files to fsync, with their paths (for errors).
    files: Vec<(std::fs::File, std::path::PathBuf)>,
    /// What the owner needs to finish, per topic.
    covered: Vec<Covered>,
}

/// What a [`SyncJob`] covers of one topic.
#[derive(Debug)]
struct Covered {
    topic: String,
    /// The active segment's base and the size the fsync covers.
    base: u64,
    size: u64,
    /// Entries it covers, and the topic's cut count when it began.
    entries: u64,
    cuts: u64,
}

impl SyncJob {
    /// fsyncs the job's files (the data, not the metadata that does not change on an append).
    pub fn run(&self) -> Result<(), LogError> {
        for (f, path) in &self.files {
            f.sync_data().map_err(|source| LogError::Io {
                what: format!("fsync {}", path.display()),
                source,
            })?;
        }
        Ok(())
    }
}

/// Per topic, the offset retention must keep entries from ([`Storage::hold`]): what a
/// consumer group has not finished. A topic may be held before it has an entry.
#[derive(Debug, Default)]
struct Holds(foldhash::HashMap<String, u64>);

impl Holds {
    fn set(&mut self, topic: &str, from: Option<u64>) {
        match from {
            // Set at every ack: no new key (an allocation) once the topic is held.
            Some(o) => match self.0.get_mut(topic) {
                Some(v) => *v = o,
                None => {
                    self.0.insert(topic.to_string(), o);
                }
            },
            None => {
                self.0.remove(topic);
            }
        }
    }

    /// The offset `topic` is held from (`u64::MAX`: not held).
    fn from(&self, topic: &str) -> u64 {
        self.0.get(topic).copied().unwrap_or(u64::MAX)
    }
}

/// The log of every topic of one node.
pub trait Storage: Send + std::fmt::Debug {
    /// Every topic the log holds.
    fn topics(&self) -> Vec<TopicState>;
    /// The state of one topic (`first == next == delivered == 0` for a topic never written).
    fn topic(&self, topic: &str) -> TopicState;
    /// The offset the next entry of `topic` gets.
    fn next_offset(&self, topic: &str) -> u64 {
        self.topic(topic).next
    }
    /// The delivered mark of `topic` (a backup asks once per `CLR`).
    fn delivered(&self, topic: &str) -> u64 {
        self.topic(topic).delivered
    }
    /// Appends `e` to `topic`; `e.offset` must be the topic's next offset. May stay in a
    /// buffer until [`Storage::sync`].
    fn append(&mut self, topic: &str, e: &Entry) -> Result<(), LogError>;
    /// Appends `e` at the topic's next offset, which it writes into `e.offset`: a fresh
    /// publish, whose offset is whatever comes next. One call, so that a store may find the
    /// topic once ([`MemLog`] does; the relay path's [`Storage::next_offset`] then
    /// [`Storage::append`] were two lookups by name per message). The default does just that.
    fn append_next(&mut self, topic: &str, e: &mut Entry) -> Result<(), LogError> {
        e.offset = self.next_offset(topic);
        self.append(topic, e)
    }
    /// Removes the entries at `from` and after (a divergent tail); returns how many.
    fn truncate(&mut self, topic: &str, from: u64) -> Result<u64, LogError>;
    /// Drops every entry of `topic` and starts it again, empty, at `at`: a backup's copy that
    /// ends before the oldest entry its primary still keeps (retention removed the rest while
    /// the backup was away) goes on from there; one whose primary's log ends before our oldest
    /// entry (it started again without its log) is cut back to there. Returns how many went.
    fn restart_at(&mut self, topic: &str, at: u64) -> Result<u64, LogError>;
    /// Removes entries of `topic` below `before`, as far as the store can (a file log drops
    /// whole segments, so some may stay): the groups' journal below a snapshot of the groups.
    fn trim_front(&mut self, topic: &str, before: u64) -> Result<(), LogError>;
    /// Up to `max` entries of `topic` from `from` on, in order; starts at the oldest kept
    /// entry if `from` is older than that.
    fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError>;
    /// Moves the delivered mark of `topic` to `upto` (never backwards). Kept lazily: a mark
    /// lost in a crash means a few entries are delivered again, never that one is lost.
    fn set_delivered(&mut self, topic: &str, upto: u64);
    /// Makes everything appended so far durable (fsync), and saves the delivered marks.
    fn sync(&mut self) -> Result<(), LogError>;
    /// Writes what [`Storage::append`] buffered to the files (no fsync): after it, a crash of
    /// the process (not of the machine) loses none of it. Reads and syncs do it first.
    fn flush(&mut self) -> Result<(), LogError> {
        Ok(())
    }
    /// Entries appended and not yet synced (those a [`SyncJob`] in flight covers included).
    fn unsynced(&self) -> u64;
    /// The newest epoch this node was ever in, as last saved (0 if never).
    fn saved_epoch(&self) -> u64 {
        0
    }
    /// Saves `epoch` as the newest this node was in, durably (fsync'd) when the log is on a
    /// disk, before the node acts in it: epochs are rare and must outlive a power loss under
    /// any fsync policy, or a node could reign again in an epoch older than one already seen.
    fn save_epoch(&mut self, _epoch: u64) -> Result<(), LogError> {
        Ok(())
    }
    /// Drops what is past the retention bounds (and already delivered); returns the topics
    /// whose first offset moved, with the new one. Nothing to do for a log without bounds.
    fn enforce_retention(&mut self, _now_us: u64) -> Result<Vec<(String, u64)>, LogError> {
        Ok(Vec::new())
    }
    /// Starts a sync whose fsyncs may run on another thread while appends go on: the job
    /// covers everything appended so far. `None`: nothing to hand off (nothing written since
    /// the last sync, or a log that is not on a disk); call [`Storage::sync`] instead. At most
    /// one job is in flight at a time; finish it with [`Storage::end_sync`].
    fn begin_sync(&mut self) -> Result<Option<SyncJob>, LogError> {
        Ok(None)
    }
    /// The job from [`Storage::begin_sync`] ran, with `result`: on success, what it covered
    /// is durable (the rest of the sync is done here: the delivered marks are saved when the
    /// last save is old enough, see `MARK_INTERVAL` in `file.rs`); an error
    /// fails the log as a failed [`Storage::sync`] does.
    fn end_sync(&mut self, job: SyncJob, result: Result<(), LogError>) -> Result<(), LogError> {
        let _ = job;
        result
    }
    /// Retention keeps `topic`'s entries from `from` on (a consumer group has not finished
    /// them), whatever the bounds say; `None` lifts the hold.
    fn hold(&mut self, _topic: &str, _from: Option<u64>) {}
    /// Whether an append could succeed now: an error once the log has failed (a write or
    /// sync that failed, a log opened for inspection), said before anything depends on it.
    fn writable(&self) -> Result<(), LogError> {
        Ok(())
    }
    /// True when [`Storage::sync`] reaches a disk (false for [`MemLog`]).
    fn is_durable(&self) -> bool;
    /// Each epoch of `topic`'s log with the offset where it begins, in order (empty for an
    /// empty topic): what two nodes compare to find where their logs part. Epochs never
    /// decrease along a log. An entry that cannot be read, or an epoch lower than the one
    /// before it, ends the list with `(u64::MAX, offset)` (no log has that epoch, so a
    /// comparison sees the logs part there at the latest).
    ///
    /// The default finds each epoch's end by a binary search over single-entry reads, fine
    /// for a log in memory; a store on disk answers from its own layout (see
    /// `SegmentLog::epochs`).
    fn epochs(&self, topic: &str) -> Vec<(u64, u64)> {
        epochs_by_search(self, topic)
    }
}

/// [`Storage::epochs`] through [`Storage::read`]: from each epoch's first entry, a binary
/// search for the first entry of a later one.
pub fn epochs_by_search<S: Storage + ?Sized>(log: &S, topic: &str) -> Vec<(u64, u64)> {
    let t = log.topic(topic);
    let epoch_at = |at: u64| {
        log.read(topic, at, 1)
            .ok()
            .and_then(|v| v.first().filter(|e| e.offset == at).map(|e| e.epoch))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = t.first;
    while at < t.next {
        let epoch = epoch_at(at).filter(|e| out.last().is_none_or(|(p, _)| e > p));
        let Some(epoch) = epoch else {
            out.push((u64::MAX, at));
            break;
        };
        out.push((epoch, at));
        let (mut lo, mut hi) = (at + 1, t.next);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match epoch_at(mid) {
                Some(e) if e <= epoch => lo = mid + 1,
                _ => hi = mid,
            }
        }
        at = lo;
    }
    out
}

/// Where `epoch` ends in a log whose epochs are `epochs` (as [`Storage::epochs`] lists them)
/// and whose next offset is `next`: the first offset of a later epoch, or `next`.
pub fn end_of_epoch(epochs: &[(u64, u64)], next: u64, epoch: u64) -> u64 {
    epochs
        .iter()
        .find(|(e, _)| *e > epoch)
        .map_or(next, |(_, start)| *start)
}
