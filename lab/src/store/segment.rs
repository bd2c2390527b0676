//! Candidate 1: segment files and a sparse index, written directly.
//!
//! A log directory holds segments `<base offset, 20 digits>.log`, each an append-only run of
//! records `[body length u32 LE][CRC32C of body u32 LE][body]`, where the body is the offset
//! (u64 LE) followed by [`super::encode_value`]. Beside each segment, `<base>.idx` holds sparse
//! index points `(offset u64 LE, file position u64 LE)`, one per ~4 KiB of records.
//!
//! `append_batch` writes the whole batch with one `write_all` and makes it durable with one
//! `File::sync_data`; index points are appended afterwards and not synced (they are checked on
//! open and only speed up reads). A new segment is started once the active one passes
//! `segment_bytes`, and the directory is fsync'd so the new file's name is durable.
//!
//! `open` trusts the sealed segments and recovers the last one: it starts from the last index
//! point that still points at a valid record, scans forward verifying length, checksum and
//! offset of every record, and cuts the file (and its index) at the first torn or corrupt one.
//! Reads verify every checksum too, and fail rather than return damaged data.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::{check_dense, decode_value, encode_value, Candidate, Entry};

/// Bytes of the record header (length, checksum).
const HEADER: usize = 8;
/// Largest body accepted; a larger length field means a torn or corrupt header.
const MAX_BODY: usize = 16 << 20;
/// One index point per this many bytes of records.
const INDEX_EVERY: u64 = 4096;
/// Default segment size before rolling to a new one.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

struct Segment {
    base: u64,
    /// Valid bytes of the log file.
    size: u64,
    /// Sparse index, always starting with `(base, 0)`.
    index: Vec<(u64, u64)>,
}

/// The segment-file log.
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: Vec<Segment>,
    active: File,
    active_idx: File,
    next: u64,
    /// Bytes written to the active segment since its last index point.
    since_index: u64,
    buf: Vec<u8>,
    /// Set when a write or sync failed: the file may hold a partial batch, so refuse appends
    /// until reopened (which cuts it).
    failed: bool,
}

fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn idx_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Appends one record for `e` to `out`.
fn encode_record(e: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&e.offset.to_le_bytes());
    encode_value(e, out);
    let body_len = (out.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What is at the start of a byte slice.
enum Parsed {
    /// A valid record and its total size.
    Record(Entry, usize),
    /// The slice ends before the record does (a torn tail when at the end of a file).
    Short,
    /// Length out of range, checksum mismatch or undecodable body.
    Corrupt(String),
}

fn parse_record(b: &[u8]) -> Parsed {
    if b.len() < HEADER {
        return Parsed::Short;
    }
    let len = u32_at(b, 0) as usize;
    if !(8 + 25..=MAX_BODY).contains(&len) {
        return Parsed::Corrupt(format!("record length {len} out of range"));
    }
    let Some(body) = b.get(HEADER..HEADER + len) else {
        return Parsed::Short;
    };
    let crc = u32_at(b, 4);
    let actual = crc32c::crc32c(body);
    if crc != actual {
        return Parsed::Corrupt(format!("checksum {actual:08x}, header says {crc:08x}"));
    }
    let offset = u64_at(body, 0);
    match decode_value(offset, &body[8..]) {
        Ok(e) => Parsed::Record(e, HEADER + len),
        Err(e) => Parsed::Corrupt(format!("{e:#}")),
    }
}

/// Reads an index file, keeping the leading points that are in order and inside `size`.
fn load_index(path: &Path, base: u64, size: u64) -> Result<Vec<(u64, u64)>> {
    let mut index = vec![(base, 0u64)];
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    for point in bytes.chunks_exact(16) {
        let (off, pos) = (u64_at(point, 0), u64_at(point, 8));
        let &(last_off, last_pos) = index.last().unwrap_or(&(base, 0));
        if off <= last_off || pos <= last_pos || pos >= size {
            break;
        }
        index.push((off, pos));
    }
    Ok(index)
}

fn write_index(path: &Path, index: &[(u64, u64)]) -> Result<()> {
    let mut bytes = Vec::with_capacity(index.len() * 16);
    for &(off, pos) in index.iter().skip(1) {
        bytes.extend_from_slice(&off.to_le_bytes());
        bytes.extend_from_slice(&pos.to_le_bytes());
    }
    fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

impl SegmentLog {
    /// Opens the log in `dir`, rolling segments at `segment_bytes` (the tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut bases = Vec::new();
        for de in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
            let name = de?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".log") {
                if let Ok(base) = stem.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            File::create(log_path(dir, 0))?.sync_all()?;
            sync_dir(dir)?;
            bases.push(0);
        }
        let mut segments = Vec::with_capacity(bases.len());
        for &base in &bases[..bases.len() - 1] {
            let size = fs::metadata(log_path(dir, base))?.len();
            let index = load_index(&idx_path(dir, base), base, size)?;
            segments.push(Segment { base, size, index });
        }
        let base = bases[bases.len() - 1];
        let (last, next) = recover_last(dir, base)?;
        let since_index = last.size - last.index.last().map_or(0, |p| p.1);
        segments.push(last);
        let active = OpenOptions::new()
            .append(true)
            .open(log_path(dir, base))
            .context("open active segment")?;
        let active_idx = OpenOptions::new()
            .create(true)
            .append(true)
            .open(idx_path(dir, base))
            .context("open active index")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments,
            active,
            active_idx,
            next,
            since_index,
            buf: Vec::new(),
            failed: false,
        })
    }

    fn roll(&mut self) -> Result<()> {
        let base = self.next;
        let log = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(log_path(&self.dir, base))
            .context("create segment")?;
        let idx = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(idx_path(&self.dir, base))
            .context("create index")?;
        sync_dir(&self.dir)?;
        self.active = log;
        self.active_idx = idx;
        self.since_index = 0;
        self.segments.push(Segment {
            base,
            size: 0,
            index: vec![(base, 0)],
        });
        Ok(())
    }

    fn append_inner(&mut self, entries: &[Entry]) -> Result<()> {
        let seg_size = self.segments.last().map_or(0, |s| s.size);
        if seg_size >= self.segment_bytes {
            self.roll()?;
        }
        let Some(seg) = self.segments.last_mut() else {
            bail!("no active segment");
        };
        self.buf.clear();
        let mut points = Vec::new();
        for e in entries {
            if self.since_index >= INDEX_EVERY {
                points.push((e.offset, seg.size + self.buf.len() as u64));
                self.since_index = 0;
            }
            let before = self.buf.len();
            encode_record(e, &mut self.buf);
            self.since_index += (self.buf.len() - before) as u64;
        }
        self.active.write_all(&self.buf).context("write segment")?;
        self.active.sync_data().context("fsync segment")?;
        seg.size += self.buf.len() as u64;
        if !points.is_empty() {
            let mut ib = Vec::with_capacity(points.len() * 16);
            for &(off, pos) in &points {
                ib.extend_from_slice(&off.to_le_bytes());
                ib.extend_from_slice(&pos.to_le_bytes());
            }
            self.active_idx.write_all(&ib).context("write index")?;
            seg.index.extend(points);
        }
        self.next += entries.len() as u64;
        Ok(())
    }
}

/// Recovers the last segment: finds a trustworthy start point, scans, cuts a torn tail.
fn recover_last(dir: &Path, base: u64) -> Result<(Segment, u64)> {
    let path = log_path(dir, base);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut index = load_index(&idx_path(dir, base), base, file_len)?;
    let index_len = index.len();
    // From the last index point back, the first one that starts a valid record with its
    // offset; (base, 0) is always kept.
    let (tail, start_off, start_pos) = loop {
        let &(off, pos) = index.last().unwrap_or(&(base, 0));
        file.seek(SeekFrom::Start(pos))?;
        let mut tail = Vec::with_capacity((file_len - pos) as usize);
        file.read_to_end(&mut tail)?;
        let ok = matches!(parse_record(&tail), Parsed::Record(ref e, _) if e.offset == off);
        if ok || index.len() == 1 {
            break (tail, off, pos);
        }
        index.pop();
    };
    let (mut at, mut next) = (0usize, start_off);
    while let Parsed::Record(e, size) = parse_record(&tail[at..]) {
        if e.offset != next {
            break;
        }
        at += size;
        next += 1;
    }
    let size = start_pos + at as u64;
    if size < file_len {
        tracing::warn!(
            segment = %path.display(),
            cut = file_len - size,
            "torn or corrupt tail cut"
        );
        file.set_len(size)?;
        file.sync_all()?;
    }
    if index.len() != index_len {
        write_index(&idx_path(dir, base), &index)?;
    }
    Ok((Segment { base, size, index }, next))
}

impl Candidate for SegmentLog {
    const NAME: &'static str = "segment";

    fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, DEFAULT_SEGMENT_BYTES)
    }

    fn append_batch(&mut self, entries: &[Entry]) -> Result<()> {
        ensure!(!self.failed, "an earlier append failed; reopen the log");
        check_dense(self.next, entries)?;
        if entries.is_empty() {
            return Ok(());
        }
        let r = self.append_inner(entries);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn read_from(&self, offset: u64, max: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        if offset >= self.next || max == 0 {
            return Ok(out);
        }
        let first = self.segments.partition_point(|s| s.base <= offset).max(1) - 1;
        let mut want = offset;
        for seg in &self.segments[first..] {
            let i = seg.index.partition_point(|p| p.0 <= want).max(1) - 1;
            let (_, pos) = seg.index[i];
            let path = log_path(&self.dir, seg.base);
            let mut file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            file.seek(SeekFrom::Start(pos))?;
            let mut r = BufReader::with_capacity(256 << 10, file.take(seg.size - pos));
            let mut rec = Vec::new();
            let mut remaining = seg.size - pos;
            while remaining > 0 {
                let mut head = [0u8; HEADER];
                r.read_exact(&mut head).context("read record header")?;
                let len = u32_at(&head, 0) as usize;
                ensure!(
                    len <= MAX_BODY && (HEADER + len) as u64 <= remaining,
                    "{}: record length {len} at the wrong place",
                    path.display()
                );
                rec.clear();
                rec.extend_from_slice(&head);
                rec.resize(HEADER + len, 0);
                r.read_exact(&mut rec[HEADER..]).context("read record")?;
                remaining -= rec.len() as u64;
                let e = match parse_record(&rec) {
                    Parsed::Record(e, _) => e,
                    Parsed::Short => bail!("{}: record cut short", path.display()),
                    Parsed::Corrupt(why) => bail!("{}: corrupt record: {why}", path.display()),
                };
                if e.offset < want {
                    continue;
                }
                ensure!(
                    e.offset == want,
                    "{}: offset {} where {want} was expected",
                    path.display(),
                    e.offset
                );
                out.push(e);
                want += 1;
                if out.len() == max || want == self.next {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn len(&self) -> u64 {
        self.next
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

    /// 1000 entries in batches of 50 over 16 KiB segments (several of them).
    fn small_log(dir: &Path) -> SegmentLog {
        let mut log = SegmentLog::open_with(dir, 16 << 10).expect("open");
        for b in 0..20 {
            log.append_batch(&make_batch(b * 50, 50, 64))
                .expect("append");
        }
        assert!(log.segments.len() > 3, "{} segments", log.segments.len());
        log
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut logs: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list")
            .map(|d| d.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        logs.pop().expect("a segment")
    }

    fn reopen_and_check(dir: &Path, want_len: u64) {
        let mut log = SegmentLog::open_with(dir, 16 << 10).expect("reopen");
        assert_eq!(log.len(), want_len);
        let mut all = Vec::new();
        while (all.len() as u64) < log.len() {
            all.extend(log.read_from(all.len() as u64, 128).expect("read"));
        }
        assert_eq!(all, make_batch(0, want_len as usize, 64));
        // The log goes on densely after the cut, and survives another reopen.
        log.append_batch(&make_batch(want_len, 3, 64))
            .expect("append after cut");
        drop(log);
        let log = SegmentLog::open_with(dir, 16 << 10).expect("reopen again");
        assert_eq!(log.len(), want_len + 3);
        assert_eq!(
            log.read_from(want_len, 10).expect("read"),
            make_batch(want_len, 3, 64)
        );
    }

    #[test]
    fn segment_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(small_log(dir.path()));
        let last = last_segment(dir.path());
        let len = fs::metadata(&last).expect("meta").len();
        // Cut the last record in half: it is gone, the 999 before it stay.
        let rec = {
            let mut b = Vec::new();
            encode_record(&make_batch(999, 1, 64)[0], &mut b);
            b.len() as u64
        };
        let f = OpenOptions::new().write(true).open(&last).expect("open");
        f.set_len(len - rec / 2).expect("truncate");
        drop(f);
        drop(SegmentLog::open_with(dir.path(), 16 << 10).expect("reopen"));
        // Cut at the end of entry 998, not before.
        assert_eq!(fs::metadata(&last).expect("meta").len(), len - rec);
        reopen_and_check(dir.path(), 999);
    }

    #[test]
    fn segment_flipped_byte_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(small_log(dir.path()));
        let last = last_segment(dir.path());
        let mut bytes = fs::read(&last).expect("read");
        let rec = {
            let mut b = Vec::new();
            encode_record(&make_batch(990, 1, 64)[0], &mut b);
            b.len()
        };
        // One byte in the payload of the record 10 from the end: it and all after it go.
        let at = bytes.len() - 10 * rec + rec - 5;
        bytes[at] ^= 0x40;
        fs::write(&last, &bytes).expect("write");
        reopen_and_check(dir.path(), 990);
    }

    #[test]
    fn segment_garbage_tail_and_bad_index_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(small_log(dir.path()));
        let last = last_segment(dir.path());
        // Zeros after the last record (as after a crash that extended the file), and an index
        // point that points into them.
        let len = fs::metadata(&last).expect("meta").len();
        let mut f = OpenOptions::new().append(true).open(&last).expect("open");
        f.write_all(&[0u8; 3000]).expect("write");
        let mut idx = OpenOptions::new()
            .append(true)
            .open(last.with_extension("idx"))
            .expect("open idx");
        idx.write_all(&5000u64.to_le_bytes()).expect("write idx");
        idx.write_all(&(len + 100).to_le_bytes())
            .expect("write idx");
        drop((f, idx));
        reopen_and_check(dir.path(), 1000);
    }

    #[test]
    fn segment_corrupt_sealed_segment_fails_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(small_log(dir.path()));
        let first = log_path(dir.path(), 0);
        let mut bytes = fs::read(&first).expect("read");
        bytes[200] ^= 0x01;
        fs::write(&first, &bytes).expect("write");
        let log = SegmentLog::open_with(dir.path(), 16 << 10).expect("open");
        assert_eq!(log.len(), 1000);
        assert!(log.read_from(0, 100).is_err());
        assert_eq!(
            log.read_from(900, 100).expect("later segments still read"),
            make_batch(900, 100, 64)
        );
    }
}
