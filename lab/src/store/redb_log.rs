//! Candidate 2: redb (copy-on-write B+tree in one file). One table `offset u64 -> value bytes`
//! ([`super::encode_value`]); one write transaction per batch, committed with redb's default
//! `Durability::Immediate` (fsync before `commit` returns).

use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{check_dense, decode_value, encode_value, Candidate, Entry};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// The redb log.
pub struct RedbLog {
    db: Database,
    next: u64,
}

impl Candidate for RedbLog {
    const NAME: &'static str = "redb";

    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("log.redb")).context("open redb")?;
        // Make sure the table exists so readers can open it.
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.commit()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(LOG)?;
        let next = table.last()?.map_or(0, |(k, _)| k.value() + 1);
        drop(table);
        drop(rtx);
        Ok(Self { db, next })
    }

    fn append_batch(&mut self, entries: &[Entry]) -> Result<()> {
        check_dense(self.next, entries)?;
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(LOG)?;
            let mut v = Vec::with_capacity(128);
            for e in entries {
                v.clear();
                encode_value(e, &mut v);
                table.insert(e.offset, v.as_slice())?;
            }
        }
        tx.commit().context("redb commit")?;
        self.next += entries.len() as u64;
        Ok(())
    }

    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(LOG)?;
        let mut out = Vec::with_capacity(max.min(4096));
        for item in table.range(offset..)?.take(max) {
            let (k, v) = item?;
            out.push(decode_value(k.value(), v.value())?);
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
    fn redb_roundtrip() {
        crate::store::testutil::roundtrip::<super::RedbLog>();
    }
}
