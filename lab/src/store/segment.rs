//! Candidate 1: segment files and a sparse index — the broker's own on-disk log,
//! [`edgepair::log::FileLog`] (see `edgepair::log::segment` for the format), so the bench
//! measures what a node runs. The candidate is one topic of a `FileLog`: `append_batch` writes
//! the batch with one write ([`FileLog::append_batch`]) and makes it durable with
//! [`Storage::sync`]; reads verify every checksum.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use edgepair::log::{FileLog, Storage};
use edgepair::protocol::MsgId;

use super::{check_dense, Candidate, Entry};

/// The topic the candidate writes.
const TOPIC: &str = "bench";

/// The broker's segment-file log, as a candidate.
pub struct SegmentLog {
    log: FileLog,
}

fn to_broker(e: &Entry) -> Result<Arc<edgepair::log::Entry>> {
    Ok(Arc::new(edgepair::log::Entry {
        offset: e.offset,
        epoch: e.epoch,
        id: MsgId {
            publisher: e.publisher.clone().into(),
            seq: e.seq,
        },
        sent_us: e.timestamp,
        received_us: e.timestamp,
        payload: String::from_utf8(e.payload.clone())
            .with_context(|| format!("entry {}: payload is not UTF-8", e.offset))?,
    }))
}

fn from_broker(e: &edgepair::log::Entry) -> Entry {
    Entry {
        offset: e.offset,
        epoch: e.epoch,
        publisher: e.id.publisher.to_string(),
        seq: e.id.seq,
        timestamp: e.sent_us,
        payload: e.payload.as_bytes().to_vec(),
    }
}

impl SegmentLog {
    /// Opens the log in `dir`, rolling segments at `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self> {
        let (log, rec) = FileLog::open_with(dir, segment_bytes)?;
        for l in rec.lines() {
            tracing::warn!("{l}");
        }
        Ok(SegmentLog { log })
    }
}

impl Candidate for SegmentLog {
    const NAME: &'static str = "segment";

    fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, edgepair::log::DEFAULT_SEGMENT_BYTES)
    }

    fn append_batch(&mut self, entries: &[Entry]) -> Result<()> {
        check_dense(self.len(), entries)?;
        let batch = entries.iter().map(to_broker).collect::<Result<Vec<_>>>()?;
        self.log.append_batch(TOPIC, &batch)?;
        self.log.sync()?;
        Ok(())
    }

    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>> {
        Ok(self
            .log
            .read(TOPIC, offset, max)?
            .iter()
            .map(|e| from_broker(e))
            .collect())
    }

    fn len(&self) -> u64 {
        self.log.topic(TOPIC).next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::make_batch;

    #[test]
    fn segment_roundtrip() {
        crate::store::testutil::roundtrip::<SegmentLog>();
    }

    #[test]
    fn segment_roundtrip_over_small_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut log = SegmentLog::open_with(dir.path(), 16 << 10).expect("open");
            for b in 0..20 {
                log.append_batch(&make_batch(b * 50, 50, 64))
                    .expect("append");
            }
        }
        let log = SegmentLog::open_with(dir.path(), 16 << 10).expect("reopen");
        assert!(log.log.topic_segments(TOPIC).len() > 3);
        assert_eq!(log.len(), 1000);
        assert_eq!(
            log.read_from(490, 30).expect("read"),
            make_batch(490, 30, 64)
        );
    }
}
