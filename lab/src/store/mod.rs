//! Storage candidates for the durable, replicated per-topic log, and the `storebench` that
//! measures them on this machine (append with group commit, read from an offset, recovery after
//! SIGKILL, size on disk). Nothing here is used by the broker yet: it exists to pick one.
//!
//! Every candidate implements [`Candidate`]: one log in one directory, dense `u64` offsets from
//! 0, and `append_batch` returns only once the batch is durable (fsync'd).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

pub mod bench;
pub mod fjall_log;
pub mod redb_log;
pub mod segment;
pub mod sqlite_log;

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log: dense, from 0.
    pub offset: u64,
    /// The primary's epoch when the entry was appended.
    pub epoch: u64,
    /// Publisher id (short; at most 255 bytes).
    pub publisher: String,
    /// The publisher's sequence number.
    pub seq: u64,
    /// Timestamp (ms since the Unix epoch, or any clock the caller picks).
    pub timestamp: u64,
    /// The message body.
    pub payload: Vec<u8>,
}

/// One log in one directory. `append_batch` is durable when it returns.
pub trait Candidate: Sized {
    /// Short name used on the command line and in the table.
    const NAME: &'static str;
    /// Opens (creating if needed) the log in `dir`, recovering from a crash if one happened.
    fn open(dir: &Path) -> Result<Self>;
    /// Appends entries whose offsets must be `len()`, `len()+1`, ...; fsync'd when it returns.
    fn append_batch(&mut self, entries: &[Entry]) -> Result<()>;
    /// Up to `max` entries from `offset` on, in order (fewer at the end of the log).
    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>>;
    /// Number of entries, i.e. the next offset.
    fn len(&self) -> u64;
    /// True when the log holds no entry.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The candidates' names, in the order they are run.
pub const CANDIDATES: [&str; 4] = [
    segment::SegmentLog::NAME,
    redb_log::RedbLog::NAME,
    fjall_log::FjallLog::NAME,
    sqlite_log::SqliteLog::NAME,
];

/// Checks that `entries` continue a log of `len` entries densely.
pub(crate) fn check_dense(len: u64, entries: &[Entry]) -> Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let want = len + i as u64;
        ensure!(
            e.offset == want,
            "entry {i} of the batch has offset {}, the log expects {want}",
            e.offset
        );
        ensure!(
            e.publisher.len() <= 255,
            "publisher id longer than 255 bytes"
        );
    }
    Ok(())
}

/// Encodes everything but the offset (the key-value candidates keep it in the key):
/// epoch, seq, timestamp (u64 LE each), publisher (u8 length + bytes), payload (rest).
pub(crate) fn encode_value(e: &Entry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.epoch.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&e.timestamp.to_le_bytes());
    out.push(e.publisher.len() as u8);
    out.extend_from_slice(e.publisher.as_bytes());
    out.extend_from_slice(&e.payload);
}

/// Inverse of [`encode_value`]; errors (never panics) on malformed bytes.
pub(crate) fn decode_value(offset: u64, b: &[u8]) -> Result<Entry> {
    let u64_at = |at: usize| -> Result<u64> {
        let s = b
            .get(at..at + 8)
            .with_context(|| format!("entry {offset}: value too short"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    };
    let (epoch, seq, timestamp) = (u64_at(0)?, u64_at(8)?, u64_at(16)?);
    let plen = *b
        .get(24)
        .with_context(|| format!("entry {offset}: value too short"))? as usize;
    let Some(pb) = b.get(25..25 + plen) else {
        bail!("entry {offset}: publisher id cut short");
    };
    let publisher = String::from_utf8(pb.to_vec())
        .with_context(|| format!("entry {offset}: publisher id is not UTF-8"))?;
    Ok(Entry {
        offset,
        epoch,
        publisher,
        seq,
        timestamp,
        payload: b[25 + plen..].to_vec(),
    })
}

/// The deterministic entry at `offset` that the bench and the tests write, so a reader can
/// check any entry it gets back without keeping a copy.
pub fn make_entry(offset: u64, payload_len: usize) -> Entry {
    let mut payload = Vec::with_capacity(payload_len);
    let mut x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while payload.len() < payload_len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = (payload_len - payload.len()).min(8);
        // Printable ASCII (the broker's payloads are text), still incompressible enough.
        payload.extend(x.to_le_bytes()[..take].iter().map(|b| b'!' + b % 94));
    }
    Entry {
        offset,
        epoch: 1 + offset / 500_000,
        publisher: format!("pub-{}", offset % 7),
        seq: offset / 7,
        timestamp: 1_700_000_000_000 + offset,
        payload,
    }
}

/// `count` entries from `from` on, as [`make_entry`] makes them.
pub fn make_batch(from: u64, count: usize, payload_len: usize) -> Vec<Entry> {
    (0..count as u64)
        .map(|i| make_entry(from + i, payload_len))
        .collect()
}

#[cfg(test)]
pub(crate) mod testutil {
    //! The round trip every candidate must pass.
    use super::*;

    /// Append in uneven batches, read back from offsets, reopen, same contents.
    pub fn roundtrip<C: Candidate>() {
        let dir = tempfile::tempdir().expect("tempdir");
        let total = 3_000u64;
        {
            let mut log = C::open(dir.path()).expect("open");
            assert_eq!(log.len(), 0);
            assert!(log.read_from(0, 10).expect("read empty").is_empty());
            let mut next = 0u64;
            for size in [1usize, 7, 64, 1000, 1928] {
                log.append_batch(&make_batch(next, size, 64))
                    .expect("append");
                next += size as u64;
            }
            assert_eq!(next, total);
            assert_eq!(log.len(), total);
            // A batch that does not continue the log is refused.
            assert!(log.append_batch(&make_batch(total + 1, 1, 64)).is_err());
            check_contents(&log, total);
        }
        let mut log = C::open(dir.path()).expect("reopen");
        assert_eq!(log.len(), total);
        check_contents(&log, total);
        log.append_batch(&make_batch(total, 5, 64))
            .expect("append after reopen");
        assert_eq!(log.len(), total + 5);
        assert_eq!(
            log.read_from(total - 1, 10).expect("read"),
            make_batch(total - 1, 6, 64)
        );
    }

    fn check_contents<C: Candidate>(log: &C, total: u64) {
        assert_eq!(
            log.read_from(1500, 100).expect("read"),
            make_batch(1500, 100, 64)
        );
        assert_eq!(log.read_from(0, 1).expect("read"), make_batch(0, 1, 64));
        // Near and past the end: fewer entries, then none.
        assert_eq!(
            log.read_from(total - 3, 100).expect("read"),
            make_batch(total - 3, 3, 64)
        );
        assert!(log.read_from(total, 100).expect("read").is_empty());
        let mut all = Vec::new();
        while (all.len() as u64) < total {
            let got = log.read_from(all.len() as u64, 777).expect("read");
            assert!(!got.is_empty());
            all.extend(got);
        }
        assert_eq!(all, make_batch(0, total as usize, 64));
    }
}
