//! Candidate 3: fjall (LSM tree with a journal). One keyspace `offset (u64 BE) -> value bytes`
//! ([`super::encode_value`]); one write batch per append, committed with
//! `PersistMode::SyncData` (the journal is fdatasync'd before `commit` returns).

use std::path::Path;

use anyhow::{bail, Context, Result};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{check_dense, decode_value, encode_value, Candidate, Entry};

/// The fjall log.
pub struct FjallLog {
    db: Database,
    log: Keyspace,
    next: u64,
}

fn key_offset(k: &[u8]) -> Result<u64> {
    let Ok(a) = <[u8; 8]>::try_from(k) else {
        bail!("fjall key of {} bytes, expected 8", k.len());
    };
    Ok(u64::from_be_bytes(a))
}

impl Candidate for FjallLog {
    const NAME: &'static str = "fjall";

    fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder(dir).open().context("open fjall")?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        let next = match log.last_key_value() {
            Some(g) => key_offset(&g.key()?)? + 1,
            None => 0,
        };
        Ok(Self { db, log, next })
    }

    fn append_batch(&mut self, entries: &[Entry]) -> Result<()> {
        check_dense(self.next, entries)?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for e in entries {
            let mut v = Vec::with_capacity(128);
            encode_value(e, &mut v);
            batch.insert(&self.log, e.offset.to_be_bytes(), v);
        }
        batch.commit().context("fjall commit")?;
        self.next += entries.len() as u64;
        Ok(())
    }

    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(max.min(4096));
        for g in self.log.range(offset.to_be_bytes()..).take(max) {
            let (k, v) = g.into_inner()?;
            out.push(decode_value(key_offset(&k)?, &v)?);
        }
        Ok(out)
    }

    fn len(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fjall_roundtrip() {
        crate::store::testutil::roundtrip::<super::FjallLog>();
    }
}
