//! Candidate 4: SQLite through rusqlite (bundled SQLite). One table with a column per field,
//! `offset` as the INTEGER PRIMARY KEY (the rowid); WAL journal, `synchronous=FULL` (the WAL is
//! fsync'd at every commit), one transaction per batch.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};

use super::{check_dense, Candidate, Entry};

/// The SQLite log.
pub struct SqliteLog {
    conn: Connection,
    next: u64,
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).context("value above i64::MAX")
}

fn to_u64(v: i64) -> Result<u64> {
    u64::try_from(v).context("negative value in the database")
}

impl Candidate for SqliteLog {
    const NAME: &'static str = "sqlite";

    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("log.sqlite")).context("open sqlite")?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("sqlite refused WAL mode (got {mode})");
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS log (
                 offset INTEGER PRIMARY KEY,
                 epoch INTEGER NOT NULL,
                 publisher TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 ts INTEGER NOT NULL,
                 payload BLOB NOT NULL
             );",
        )?;
        let last: Option<i64> = conn
            .query_row("SELECT MAX(offset) FROM log", [], |r| r.get(0))
            .optional()?
            .flatten();
        let next = match last {
            Some(v) => to_u64(v)? + 1,
            None => 0,
        };
        Ok(Self { conn, next })
    }

    fn append_batch(&mut self, entries: &[Entry]) -> Result<()> {
        check_dense(self.next, entries)?;
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO log (offset, epoch, publisher, seq, ts, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in entries {
                st.execute(params![
                    to_i64(e.offset)?,
                    to_i64(e.epoch)?,
                    e.publisher,
                    to_i64(e.seq)?,
                    to_i64(e.timestamp)?,
                    e.payload
                ])?;
            }
        }
        tx.commit().context("sqlite commit")?;
        self.next += entries.len() as u64;
        Ok(())
    }

    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT offset, epoch, publisher, seq, ts, payload FROM log
             WHERE offset >= ?1 ORDER BY offset LIMIT ?2",
        )?;
        let rows = st.query_map(params![to_i64(offset)?, to_i64(max as u64)?], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })?;
        let mut out = Vec::with_capacity(max.min(4096));
        for row in rows {
            let (offset, epoch, publisher, seq, ts, payload) = row?;
            out.push(Entry {
                offset: to_u64(offset)?,
                epoch: to_u64(epoch)?,
                publisher,
                seq: to_u64(seq)?,
                timestamp: to_u64(ts)?,
                payload,
            });
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
    fn sqlite_roundtrip() {
        crate::store::testutil::roundtrip::<super::SqliteLog>();
    }
}
