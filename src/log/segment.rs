//! One topic's log on disk: segment files and their sparse indexes.
//!
//! A topic directory holds segments `<base offset, 20 digits>.log`, each an append-only run of
//! records `[body length u32 LE][CRC32C of body u32 LE][body]`. The body is offset, epoch,
//! seq, sent_us, received_us (u64 LE each), the publisher's length (u16 LE) and bytes, then
//! the payload (the rest; UTF-8). Beside each segment, `<base>.idx` holds sparse index points
//! `(offset u64 LE, file position u64 LE)`, one per [`INDEX_EVERY`] bytes of records; the
//! point `(base, 0)` is implied.
//!
//! Appends are written to the active (last) segment at once, by position, without fsync;
//! under `--fsync always` the active segment is kept filled with [`RUNWAY_BYTE`] up to
//! [`RUNWAY`] bytes past its records (see [`SegmentLog::set_preallocate`]), and nothing but that
//! byte after the last record of the last segment is taken as the runway when opening, not as
//! damage. [`SegmentLog::sync`]
//! fsyncs the active segment, then writes the index points gathered since the last sync (so an
//! index point never names bytes that were not fsync'd first), and fsyncs the directory when a
//! file was created. A segment is sealed once it passes the segment size: the next append
//! first fsyncs it and its index, so sealed segments are complete on disk.
//!
//! Opening trusts the sealed segments (it only checks that the last records of each end
//! cleanly, from the last index point, without scanning them) and recovers the last one: from
//! the last index point that starts a valid record it scans forward, verifying length,
//! checksum and offset of every record, and cuts the file at the first torn or corrupt one.

use std::cell::{OnceCell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Entry, LogError};
use crate::protocol::MsgId;

/// Bytes of the record header (length, checksum).
pub const HEADER: usize = 8;
/// Bytes of the body before the publisher id: five u64 and the publisher's u16 length.
const FIXED: usize = 5 * 8 + 2;
/// Largest body accepted; a larger length field means a torn or corrupt header.
pub const MAX_BODY: usize = 16 << 20;
/// One index point per this many bytes of records.
pub const INDEX_EVERY: u64 = 4096;
/// Default segment size before rolling to a new one.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes read at a time when scanning records, at most.
const CHUNK: usize = 256 << 10;
/// Bytes of a scan's first read: an index point's stretch of records and then some, so that
/// reading one entry (a history's last few, an epoch's first) does not copy [`CHUNK`]; each
/// read after it doubles, up to [`CHUNK`].
const FIRST_CHUNK: usize = 2 * INDEX_EVERY as usize;

/// Why the bytes at the end of a segment were not taken as records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// The file ends inside a record (a write interrupted by a crash).
    Torn,
    /// A record whose checksum does not match its bytes.
    Checksum,
    /// A length field out of range (garbage, or zeros after a crash).
    BadLength,
    /// A record with a valid checksum that does not decode or has the wrong offset.
    BadRecord,
}

impl std::fmt::Display for CutReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CutReason::Torn => "torn record",
            CutReason::Checksum => "checksum mismatch",
            CutReason::BadLength => "bad record length",
            CutReason::BadRecord => "bad record",
        })
    }
}

/// Bytes at the end of a segment that are not valid records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the valid records end (file position).
    pub at: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    /// What was found there.
    pub reason: CutReason,
    /// Details (the checksums, the length, ...).
    pub detail: String,
    /// Whether the bytes were cut (false for a sealed segment, which is left as it is and
    /// fails reads there, and for a read-only open).
    pub cut: bool,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({}): {} bytes at position {} {}",
            self.segment.display(),
            self.reason,
            self.detail,
            self.bytes,
            self.at,
            if self.cut { "cut" } else { "left in place" }
        )
    }
}

/// Appends the record of `e` to `out`; refuses a publisher id or a body too large.
pub fn encode_record(e: &Entry, out: &mut Vec<u8>) -> Result<(), String> {
    let publisher = e.id.publisher.as_bytes();
    let plen = u16::try_from(publisher.len())
        .map_err(|_| format!("publisher id of {} bytes (at most 65535)", publisher.len()))?;
    let body_len = FIXED + publisher.len() + e.payload.len();
    if body_len > MAX_BODY {
        return Err(format!("entry of {body_len} bytes (at most {MAX_BODY})"));
    }
    out.reserve(HEADER + body_len);
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for v in [e.offset, e.epoch, e.id.seq, e.sent_us, e.received_us] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&plen.to_le_bytes());
    out.extend_from_slice(publisher);
    out.extend_from_slice(e.payload.as_bytes());
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn decode_body(body: &[u8]) -> Result<Entry, String> {
    // The caller checked `body.len() >= FIXED`.
    let plen = usize::from(u16::from_le_bytes([body[40], body[41]]));
    let Some(pb) = body.get(FIXED..FIXED + plen) else {
        return Err(format!("publisher id of {plen} bytes runs past the record"));
    };
    let publisher = std::str::from_utf8(pb).map_err(|_| "publisher id is not UTF-8")?;
    let payload = std::str::from_utf8(&body[FIXED + plen..]).map_err(|_| "payload is not UTF-8")?;
    Ok(Entry {
        offset: u64_at(body, 0),
        epoch: u64_at(body, 8),
        id: MsgId {
            publisher: MsgId::publisher_of(publisher),
            seq: u64_at(body, 16),
        },
        sent_us: u64_at(body, 24),
        received_us: u64_at(body, 32),
        payload: payload.to_string(),
    })
}

/// What is at the start of a byte slice.
enum Parsed {
    /// A valid record and its total size.
    Record(Entry, usize),
    /// The slice ends before the record does; the record needs this many bytes.
    Short(usize),
    /// Not a valid record.
    Bad(CutReason, String),
}

fn parse_record(b: &[u8]) -> Parsed {
    if b.len() < HEADER {
        return Parsed::Short(HEADER);
    }
    let len = u32_at(b, 0) as usize;
    if !(FIXED..=MAX_BODY).contains(&len) {
        return Parsed::Bad(CutReason::BadLength, format!("length field {len}"));
    }
    let Some(body) = b.get(HEADER..HEADER + len) else {
        return Parsed::Short(HEADER + len);
    };
    let (want, got) = (u32_at(b, 4), crc32c::crc32c(body));
    if want != got {
        return Parsed::Bad(
            CutReason::Checksum,
            format!("CRC32C {got:08x}, header says {want:08x}"),
        );
    }
    match decode_body(body) {
        Ok(e) => Parsed::Record(e, HEADER + len),
        Err(why) => Parsed::Bad(CutReason::BadRecord, why),
    }
}

/// One step of a [`Records`] scan.
enum Step {
    /// A valid record at this file position, of this size.
    Record(Entry, u64, usize),
    /// The end of the range, exactly at a record boundary.
    End,
    /// Not a valid record at this position.
    Bad(u64, CutReason, String),
}

/// Reads records one after the other from a range of a file, by pread.
struct Records<'a> {
    file: &'a File,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_pos: u64,
    /// Next record in `buf`.
    at: usize,
    /// End of the range.
    end: u64,
    /// Bytes the next read asks for, at least.
    chunk: usize,
}

impl<'a> Records<'a> {
    fn new(file: &'a File, from: u64, end: u64) -> Self {
        Self::with_chunk(file, from, end, FIRST_CHUNK)
    }

    /// Reads starting with `chunk` bytes (then doubling up to [`CHUNK`]).
    fn with_chunk(file: &'a File, from: u64, end: u64, chunk: usize) -> Self {
        Records {
            file,
            buf: Vec::new(),
            buf_pos: from,
            at: 0,
            end,
            chunk,
        }
    }

    fn next(&mut self) -> std::io::Result<Step> {
        loop {
            let pos = self.buf_pos + self.at as u64;
            let need = match parse_record(&self.buf[self.at..]) {
                Parsed::Record(e, n) => {
                    self.at += n;
                    return Ok(Step::Record(e, pos, n));
                }
                Parsed::Bad(why, detail) => return Ok(Step::Bad(pos, why, detail)),
                Parsed::Short(need) => need,
            };
            self.buf.drain(..self.at);
            self.buf_pos = pos;
            self.at = 0;
            let have = self.buf.len();
            let left = self.end.saturating_sub(pos + have as u64);
            if left == 0 {
                return Ok(if have == 0 {
                    Step::End
                } else {
                    Step::Bad(
                        pos,
                        CutReason::Torn,
                        format!("{have} of {need} bytes of a record"),
                    )
                });
            }
            let add = ((need - have).max(self.chunk) as u64).min(left) as usize;
            self.chunk = (self.chunk * 2).min(CHUNK);
            self.buf.resize(have + add, 0);
            self.file
                .read_exact_at(&mut self.buf[have..], pos + have as u64)?;
        }
    }
}

/// A segment as the log keeps it in memory.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Offset of its first record (also its file name).
    pub base: u64,
    /// Bytes of valid records.
    pub size: u64,
    /// Offset after its last record.
    pub end: u64,
    /// `received_us` of its last record (0 when empty or unknown): its age for retention.
    pub last_us: u64,
    /// Sparse index, always starting with `(base, 0)`.
    index: Vec<(u64, u64)>,
}

impl Segment {
    /// A segment with no record yet, starting at offset `base`.
    fn empty(base: u64) -> Segment {
        Segment {
            base,
            size: 0,
            end: base,
            last_us: 0,
            index: vec![(base, 0)],
        }
    }
}

fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn idx_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LogError {
    let what = what.into();
    move |source| LogError::Io { what, source }
}

/// fsyncs a directory, so the names created or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync directory {}", dir.display())))
}

/// Reads an index file, keeping the leading points that are in order and inside `size`.
fn load_index(path: &Path, base: u64, size: u64) -> Result<Vec<(u64, u64)>, LogError> {
    let mut index = vec![(base, 0u64)];
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
    };
    for point in bytes.chunks_exact(16) {
        let (off, pos) = (u64_at(point, 0), u64_at(point, 8));
        let (last_off, last_pos) = index[index.len() - 1];
        if off <= last_off || pos <= last_pos || pos >= size {
            break;
        }
        index.push((off, pos));
    }
    Ok(index)
}

fn index_bytes(points: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(points.len() * 16);
    for &(off, pos) in points {
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&pos.to_le_bytes());
    }
    b
}

/// What a scan of a segment's end found.
struct Scanned {
    index: Vec<(u64, u64)>,
    size: u64,
    end: u64,
    last_us: u64,
    damage: Option<(u64, CutReason, String)>,
}

/// Where the run of [`RUNWAY_BYTE`] that ends the file starts (`len` if there is none), no
/// earlier than `from`.
fn runway_start(file: &File, from: u64, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; CHUNK];
    while end > from {
        let n = (end - from).min(CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], end - n as u64)?;
        match buf[..n].iter().rposition(|&b| b != RUNWAY_BYTE) {
            Some(i) => return Ok(end - n as u64 + i as u64 + 1),
            None => end -= n as u64,
        }
    }
    Ok(from)
}

/// Scans a segment from its last index point that starts a valid record (dropping the later
/// ones) to the end of the file.
/// `runway_ok`: the segment is the last one, which may end with a runway; a sealed one never
/// does (`roll` cuts it), so there the same bytes are damage.
fn scan_tail(
    file: &File,
    mut index: Vec<(u64, u64)>,
    len: u64,
    runway_ok: bool,
) -> std::io::Result<Scanned> {
    loop {
        let (off, pos) = index[index.len() - 1];
        let mut recs = Records::new(file, pos, len);
        let (mut next, mut size, mut last_us) = (off, pos, 0);
        let first_ok = loop {
            match recs.next()? {
                Step::Record(e, at, n) if e.offset == next => {
                    next += 1;
                    size = at + n as u64;
                    last_us = e.received_us;
                }
                Step::Record(e, at, _) => {
                    break Some((
                        at,
                        CutReason::BadRecord,
                        format!("offset {} where {next} was expected", e.offset),
                    ))
                }
                Step::End => break None,
                Step::Bad(at, CutReason::BadLength | CutReason::Torn, _)
                    if runway_ok && runway_start(file, at, len)? == at =>
                {
                    // Nothing but the runway's fill from here on: preallocated, not damage.
                    break None;
                }
                Step::Bad(at, why, detail) => break Some((at, why, detail)),
            }
        };
        // An index point that does not start a valid record is not trusted: fall back to the
        // one before it (the first point, (base, 0), always stays).
        if next == off && index.len() > 1 && pos < len {
            index.pop();
            continue;
        }
        return Ok(Scanned {
            index,
            size,
            end: next,
            last_us,
            damage: first_ok,
        });
    }
}

/// How far ahead of its records a preallocating log keeps the active segment filled (see
/// [`SegmentLog::set_preallocate`]).
pub const RUNWAY: u64 = 1 << 20;
/// The byte a runway is filled with. Not zero: zeros after the last record are what a crash
/// can leave where appended bytes never reached the disk (a size written, its data not), and
/// are reported as damage; a length field of `0xFFFFFFFF` is out of range like zeros are.
pub const RUNWAY_BYTE: u8 = 0xFF;

/// Unwritten appends that make [`SegmentLog::append`] write at once rather than wait for
/// [`SegmentLog::flush`].
const FLUSH_BYTES: usize = 256 * 1024;

/// One topic's log: its segments in one directory.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    /// Never empty; the last one is active.
    segs: Vec<Segment>,
    /// Read and append handle of the active segment (`None` only for an empty read-only log).
    active: Option<File>,
    /// Append handle of the active index (`None` when read-only).
    active_idx: Option<File>,
    /// Index points of the active segment not yet in its index file (written by `sync`).
    pending_points: Vec<(u64, u64)>,
    /// Bytes appended to the active segment since its last index point.
    since_index: u64,
    /// Bytes written and not fsync'd.
    dirty: bool,
    /// Names created or removed in `dir` since the last sync.
    names_changed: bool,
    read_only: bool,
    /// Records appended and not yet written to the active segment (counted in its size
    /// already): appends of one batch of events go out with one write, at
    /// [`SegmentLog::flush`] (which reads, syncs and cuts do first).
    unflushed: RefCell<Vec<u8>>,
    /// A write of `unflushed` failed: appends are refused until the log is reopened.
    flush_failed: RefCell<Option<String>>,
    /// Keep the active segment filled [`RUNWAY`] bytes past its records.
    preallocate: bool,
    /// Length of the active segment's file: its records, then perhaps a runway (written
    /// ahead, or left by an earlier run).
    file_len: std::cell::Cell<u64>,
    /// Writing a runway failed (no room): none for the rest of this segment.
    runway_failed: std::cell::Cell<bool>,
}

impl SegmentLog {
    /// Creates an empty log in the new directory `dir` (created by the caller).
    pub fn create(dir: &Path, segment_bytes: u64) -> Result<SegmentLog, LogError> {
        let (active, idx) = create_files(dir, 0)?;
        let mut log = SegmentLog::create_in_memory(dir, segment_bytes);
        log.active = Some(active);
        log.active_idx = Some(idx);
        log.names_changed = true;
        log.read_only = false;
        Ok(log)
    }

    /// Opens the log in `dir`; see the module doc for what is checked and cut. A read-only
    /// open writes nothing and reports a torn tail instead of cutting it.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        read_only: bool,
    ) -> Result<(SegmentLog, Vec<Damage>), LogError> {
        let mut bases = Vec::new();
        let mut idx_only = Vec::new();
        let list = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
        for de in list {
            let de = de.map_err(io_err(format!("list {}", dir.display())))?;
            let name = de.file_name();
            let name = name.to_string_lossy();
            if let Some(b) = name
                .strip_suffix(".log")
                .and_then(|s| s.parse::<u64>().ok())
            {
                bases.push(b);
            } else if let Some(b) = name
                .strip_suffix(".idx")
                .and_then(|s| s.parse::<u64>().ok())
            {
                idx_only.push(b);
            }
        }
        bases.sort_unstable();
        if !read_only {
            // An index whose segment is gone (a removal interrupted by a crash).
            for b in idx_only
                .into_iter()
                .filter(|b| bases.binary_search(b).is_err())
            {
                let p = idx_path(dir, b);
                fs::remove_file(&p).map_err(io_err(format!("remove {}", p.display())))?;
            }
        }
        let Some(&last_base) = bases.last() else {
            if read_only {
                let mut log = SegmentLog::create_in_memory(dir, segment_bytes);
                log.read_only = true;
                return Ok((log, Vec::new()));
            }
            return Ok((SegmentLog::create(dir, segment_bytes)?, Vec::new()));
        };
        let mut damage = Vec::new();
        let mut segs = Vec::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            let last = base == last_base;
            let path = log_path(dir, base);
            let mut opts = OpenOptions::new();
            opts.read(true);
            if last && !read_only {
                // Written by position (`write_all_at`): a runway may follow its records
                // (see `SegmentLog::set_preallocate`).
                opts.write(true);
            }
            let file = opts
                .open(&path)
                .map_err(io_err(format!("open {}", path.display())))?;
            let len = file
                .metadata()
                .map_err(io_err(format!("stat {}", path.display())))?
                .len();
            let index = load_index(&idx_path(dir, base), base, len)?;
            let loaded = index.len();
            let s = scan_tail(&file, index, len, last)
                .map_err(io_err(format!("read {}", path.display())))?;
            let cut = last && !read_only;
            let mut file_len = len;
            if let Some((at, reason, detail)) = s.damage {
                // The damaged bytes, not the runway that may follow them.
                let bytes = if last {
                    runway_start(&file, at, len)
                        .map_err(io_err(format!("read {}", path.display())))?
                        - at
                } else {
                    len - at
                };
                damage.push(Damage {
                    segment: path.clone(),
                    at,
                    bytes,
                    reason,
                    detail,
                    cut,
                });
                if cut {
                    tracing::warn!(segment = %path.display(), at, cut = len - at, damaged = bytes, %reason, "torn or corrupt tail cut");
                    file.set_len(at)
                        .and_then(|()| file.sync_all())
                        .map_err(io_err(format!("cut {}", path.display())))?;
                    file_len = at;
                }
            } else if let Some(&next_base) = bases.get(i + 1) {
                if s.end != next_base {
                    damage.push(Damage {
                        segment: path.clone(),
                        at: s.size,
                        bytes: 0,
                        reason: CutReason::BadRecord,
                        detail: format!(
                            "records end at offset {}, the next segment starts at {next_base}",
                            s.end
                        ),
                        cut: false,
                    });
                }
            }
            if !read_only && s.index.len() != loaded {
                let p = idx_path(dir, base);
                fs::write(&p, index_bytes(&s.index[1..]))
                    .and_then(|()| File::open(&p)?.sync_all())
                    .map_err(io_err(format!("rewrite {}", p.display())))?;
            }
            segs.push(Segment {
                base,
                size: s.size,
                end: s.end,
                last_us: s.last_us,
                index: s.index,
            });
            if last {
                let since_index = s.size - segs[segs.len() - 1].index.last().map_or(0, |p| p.1);
                let active_idx = if read_only {
                    None
                } else {
                    let p = idx_path(dir, base);
                    Some(
                        OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&p)
                            .map_err(io_err(format!("open {}", p.display())))?,
                    )
                };
                let log = SegmentLog {
                    dir: dir.to_path_buf(),
                    segment_bytes,
                    segs,
                    active: Some(file),
                    active_idx,
                    pending_points: Vec::new(),
                    since_index,
                    dirty: false,
                    names_changed: false,
                    read_only,
                    unflushed: RefCell::new(Vec::new()),
                    flush_failed: RefCell::new(None),
                    preallocate: false,
                    file_len: std::cell::Cell::new(file_len),
                    runway_failed: std::cell::Cell::new(false),
                };
                return Ok((log, damage));
            }
        }
        Err(LogError::Corrupt(format!(
            "{}: no active segment",
            dir.display()
        )))
    }

    /// An empty log with no files open (read-only until [`SegmentLog::create`] gives it some).
    fn create_in_memory(dir: &Path, segment_bytes: u64) -> SegmentLog {
        SegmentLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            segs: vec![Segment::empty(0)],
            active: None,
            active_idx: None,
            pending_points: Vec::new(),
            since_index: 0,
            dirty: false,
            names_changed: false,
            read_only: true,
            unflushed: RefCell::new(Vec::new()),
            flush_failed: RefCell::new(None),
            preallocate: false,
            file_len: std::cell::Cell::new(0),
            runway_failed: std::cell::Cell::new(false),
        }
    }

    /// Under `--fsync always` every write is fsync'd before its `ACK`. An `fdatasync` of a
    /// write that grows the file also commits the new size to the file system's journal; one
    /// of a write into bytes already written only flushes the data (~120 µs against ~180 µs
    /// per sync here). So a preallocating log writes [`RUNWAY`] bytes of [`RUNWAY_BYTE`] past
    /// its records whenever its writes reach the end of the previous runway: the size changes
    /// once per MiB instead of at every sync. Opening takes that fill after the last record as
    /// the runway, not as damage; a sealed segment is cut to its records.
    pub fn set_preallocate(&mut self, on: bool) {
        self.preallocate = on;
    }

    fn last(&self) -> &Segment {
        &self.segs[self.segs.len() - 1]
    }

    /// The oldest offset kept.
    pub fn first(&self) -> u64 {
        self.segs[0].base
    }

    /// The offset the next entry gets.
    pub fn next(&self) -> u64 {
        self.last().end
    }

    /// The segments, oldest first (the last one is active).
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    /// Bytes of records and index points on disk.
    pub fn bytes(&self) -> u64 {
        self.segs
            .iter()
            .map(|s| s.size + 16 * (s.index.len() as u64 - 1))
            .sum()
    }

    /// The topic's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn writable(&self) -> Result<(), LogError> {
        if let Some(e) = self.flush_failed.borrow().as_ref() {
            return Err(LogError::Failed(e.clone()));
        }
        if self.read_only {
            return Err(LogError::Failed(format!(
                "{} is opened read-only",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Seals the active segment (fsync'd with its index) and starts a new one at `next`.
    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        let size = self.last().size;
        if self.file_len.get() > size {
            // A sealed segment ends with its last record: cut the runway.
            let path = log_path(&self.dir, self.last().base);
            if let Some(f) = &self.active {
                f.set_len(size)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(format!("cut {}", path.display())))?;
            }
        }
        if let Some(idx) = &self.active_idx {
            idx.sync_data().map_err(io_err(format!(
                "fsync {}",
                idx_path(&self.dir, self.last().base).display()
            )))?;
        }
        self.start_segment(self.next())
    }

    /// Makes an empty segment at `base` the active one.
    fn start_segment(&mut self, base: u64) -> Result<(), LogError> {
        let (log, idx) = create_files(&self.dir, base)?;
        self.active = Some(log);
        self.active_idx = Some(idx);
        self.file_len.set(0);
        self.runway_failed.set(false);
        self.since_index = 0;
        self.names_changed = true;
        self.segs.push(Segment::empty(base));
        Ok(())
    }

    /// Removes a segment's files (one already gone is fine: a removal a crash interrupted).
    fn remove_segment_files(&self, base: u64) -> Result<(), LogError> {
        for p in [idx_path(&self.dir, base), log_path(&self.dir, base)] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(format!("remove {}", p.display()))(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes `entries` (dense from [`SegmentLog::next`]) to the active segment with one
    /// write, without fsync. An error may leave part of them in the file: the caller must
    /// stop appending until the log is reopened (which cuts it).
    pub fn append<E: std::borrow::Borrow<Entry>>(
        &mut self,
        topic: &str,
        entries: &[E],
    ) -> Result<(), LogError> {
        self.writable()?;
        let next = self.next();
        for (i, e) in entries.iter().map(|e| e.borrow()).enumerate() {
            if e.offset != next + i as u64 {
                return Err(LogError::NotDense {
                    topic: topic.to_string(),
                    want: next + i as u64,
                    got: e.offset,
                });
            }
        }
        let Some(last_e) = entries.last().map(|e| e.borrow()) else {
            return Ok(());
        };
        if self.last().size >= self.segment_bytes {
            self.roll()?;
        }
        let size = self.last().size;
        let mut points = Vec::new();
        let written = {
            let mut buf = self.unflushed.borrow_mut();
            let start = buf.len();
            for e in entries.iter().map(|e| e.borrow()) {
                if self.since_index >= INDEX_EVERY {
                    points.push((e.offset, size + (buf.len() - start) as u64));
                    self.since_index = 0;
                }
                let before = buf.len();
                if let Err(why) = encode_record(e, &mut buf) {
                    buf.truncate(start);
                    return Err(LogError::TooLarge {
                        topic: topic.to_string(),
                        offset: e.offset,
                        why,
                    });
                }
                self.since_index += (buf.len() - before) as u64;
            }
            (buf.len() - start) as u64
        };
        self.dirty = true;
        let seg = self.segs.last_mut().ok_or_else(|| {
            LogError::Failed(format!("{}: no active segment", self.dir.display()))
        })?;
        seg.size += written;
        seg.end = last_e.offset + 1;
        seg.last_us = last_e.received_us;
        seg.index.extend_from_slice(&points);
        self.pending_points.extend(points);
        if self.unflushed.borrow().len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the records appended since the last flush to the active segment, with one
    /// write (no fsync). A failure fails the log: appends are refused until it is reopened
    /// (which cuts whatever part of the write reached the file).
    pub fn flush(&self) -> Result<(), LogError> {
        let mut buf = self.unflushed.borrow_mut();
        if buf.is_empty() {
            return Ok(());
        }
        let path = log_path(&self.dir, self.last().base);
        // `size` counts the unflushed records already.
        let pos = self.last().size - buf.len() as u64;
        let end = pos + buf.len() as u64;
        let r = match &self.active {
            Some(f) => f
                .write_all_at(&buf, pos)
                .map_err(io_err(format!("write {}", path.display()))),
            None => Err(LogError::Failed(format!("{}: not open", path.display()))),
        };
        if r.is_ok() {
            self.file_len.set(self.file_len.get().max(end));
            // As long as the records so far (at least 4 KiB, at most `RUNWAY`): a topic
            // with little in it keeps a small one. None past where the segment rolls, nor
            // when the disk had no room for one.
            let runway = RUNWAY
                .min(end.max(4096))
                .min(self.segment_bytes.saturating_sub(end));
            if self.preallocate
                && !self.runway_failed.get()
                && end >= self.file_len.get()
                && runway > 0
            {
                self.extend_runway(end, runway);
            }
        }
        buf.clear();
        if let Err(e) = &r {
            *self.flush_failed.borrow_mut() = Some(e.to_string());
        }
        r
    }

    /// Writes `len` bytes of [`RUNWAY_BYTE`] at `at` (the end of the records). A disk without
    /// room for them is not an error (the records fit; only the runway does not): the
    /// segment goes on without one, and what part of it was written stays (it reads as
    /// runway).
    fn extend_runway(&self, at: u64, len: u64) {
        let Some(f) = &self.active else {
            return;
        };
        let fill = vec![RUNWAY_BYTE; len as usize];
        match f.write_all_at(&fill, at) {
            Ok(()) => self.file_len.set(at + len),
            Err(e) => {
                tracing::warn!(segment = %log_path(&self.dir, self.last().base).display(), error = %e, "cannot write the runway ahead of the records (a full disk?); this segment goes on without one");
                self.runway_failed.set(true);
                if let Ok(m) = f.metadata() {
                    self.file_len.set(m.len().max(at));
                }
            }
        }
    }

    /// Makes what was written durable: fsyncs the active segment, writes the pending index
    /// points, fsyncs the directory if names changed.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.read_only {
            return Ok(());
        }
        self.flush()?;
        let base = self.last().base;
        if self.dirty {
            if let Some(f) = &self.active {
                f.sync_data().map_err(io_err(format!(
                    "fsync {}",
                    log_path(&self.dir, base).display()
                )))?;
            }
            self.dirty = false;
        }
        if !self.pending_points.is_empty() {
            if let Some(idx) = self.active_idx.as_mut() {
                idx.write_all(&index_bytes(&self.pending_points))
                    .map_err(io_err(format!(
                        "write {}",
                        idx_path(&self.dir, base).display()
                    )))?;
            }
            self.pending_points.clear();
        }
        if self.names_changed {
            sync_dir(&self.dir)?;
            self.names_changed = false;
        }
        Ok(())
    }

    /// The first half of a sync whose fsync runs elsewhere: a handle on the active segment
    /// (with its path) when it holds bytes not yet fsync'd, and where those bytes end. Call
    /// [`SegmentLog::end_sync`] with that end once the fsync of the handle succeeded.
    pub fn begin_sync(&mut self) -> Result<Option<(File, PathBuf, u64, u64)>, LogError> {
        if self.read_only {
            return Ok(None);
        }
        self.flush()?;
        if !self.dirty {
            return Ok(None);
        }
        let (base, size) = (self.last().base, self.last().size);
        let path = log_path(&self.dir, base);
        let Some(f) = &self.active else {
            return Ok(None);
        };
        let f = f
            .try_clone()
            .map_err(io_err(format!("reopen {}", path.display())))?;
        self.dirty = false;
        Ok(Some((f, path, base, size)))
    }

    /// The second half: the active segment is fsync'd up to `size` if it still starts at
    /// `base`; writes the index points below that, and fsyncs the directory if names changed.
    pub fn end_sync(&mut self, base: u64, size: u64) -> Result<(), LogError> {
        if self.read_only {
            return Ok(());
        }
        if self.last().base == base {
            let n = self.pending_points.partition_point(|p| p.1 < size);
            if n > 0 {
                if let Some(idx) = self.active_idx.as_mut() {
                    idx.write_all(&index_bytes(&self.pending_points[..n]))
                        .map_err(io_err(format!(
                            "write {}",
                            idx_path(&self.dir, base).display()
                        )))?;
                }
                self.pending_points.drain(..n);
            }
        }
        if self.names_changed {
            sync_dir(&self.dir)?;
            self.names_changed = false;
        }
        Ok(())
    }

    fn open_segment(&self, i: usize) -> Result<SegFile<'_>, LogError> {
        if i + 1 == self.segs.len() {
            if let Some(f) = &self.active {
                return Ok(SegFile::Active(f));
            }
        }
        let p = log_path(&self.dir, self.segs[i].base);
        File::open(&p)
            .map(SegFile::Sealed)
            .map_err(io_err(format!("open {}", p.display())))
    }

    /// Each epoch of the log with the offset where it begins, in order (what
    /// `Storage::epochs` promises, an unreadable entry or a falling epoch ending the list with
    /// `(u64::MAX, offset)`). Epochs never fall along a log, so a binary search over the index
    /// points (one record read at each) finds the last point still in an epoch, and only the
    /// stretch after it is scanned for the next epoch's first entry. A binary search over
    /// single entries, each read copying [`CHUNK`] bytes, took a second on a million entries
    /// in a thousand epochs, long enough for a restarted pair's backup to take over while its
    /// primary compared logs.
    pub fn epochs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Err(at) = self.epochs_into(&mut out) {
            out.push((u64::MAX, at));
        }
        out
    }

    /// [`SegmentLog::epochs`]' work; an error names the offset of the entry that could not be
    /// read (or whose epoch fell).
    fn epochs_into(&self, out: &mut Vec<(u64, u64)>) -> Result<(), u64> {
        self.flush().map_err(|_| self.first())?;
        // Every index point of a segment holding records: (offset, segment, file position).
        let points: Vec<(u64, usize, u64)> = self
            .segs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.end > s.base)
            .flat_map(|(i, s)| {
                s.index
                    .iter()
                    .filter(move |p| p.0 < s.end)
                    .map(move |&(o, pos)| (o, i, pos))
            })
            .collect();
        let Some(&(first, _, _)) = points.first() else {
            return Ok(());
        };
        // Each segment opened once (a sealed one is opened by name).
        let files: Vec<OnceCell<Option<SegFile>>> =
            self.segs.iter().map(|_| OnceCell::new()).collect();
        let file = |i: usize| files[i].get_or_init(|| self.open_segment(i).ok()).as_ref();
        let epoch_at = |(offset, seg, pos): (u64, usize, u64)| {
            // One record: a short first read.
            let mut recs = Records::with_chunk(file(seg)?.get(), pos, self.segs[seg].size, 256);
            match recs.next() {
                Ok(Step::Record(e, _, _)) if e.offset == offset => Some(e.epoch),
                _ => None,
            }
        };
        let mut epoch = epoch_at(points[0]).ok_or(first)?;
        out.push((epoch, first));
        // The point at or before the current epoch's first entry.
        let mut k = 0;
        loop {
            // The first point after `k` of a later epoch (an unreadable one counts as later:
            // the scan reaches it and ends the list there).
            let (mut lo, mut hi) = (k + 1, points.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match epoch_at(points[mid]) {
                    Some(e) if e <= epoch => lo = mid + 1,
                    _ => hi = mid,
                }
            }
            let start = out.last().map_or(first, |p| p.1);
            let (_, seg, _) = points[lo - 1];
            let f = file(seg).ok_or(start)?;
            if let Some(at) = self.later_epoch(f.get(), points[lo - 1], start, epoch)? {
                epoch = at.0;
                out.push(at);
                k = lo - 1;
                continue;
            }
            // The segment ends in this epoch: the next begins with the next segment, where
            // this one ends (a segment whose records end early leaves a gap: unreadable).
            let Some(&next) = points.get(lo) else {
                return Ok(());
            };
            let end = self.segs[points[lo - 1].1].end;
            if next.0 != end {
                return Err(end);
            }
            epoch = epoch_at(next).filter(|e| *e > epoch).ok_or(next.0)?;
            out.push((epoch, next.0));
            k = lo;
        }
    }

    /// Scans from an index point (of segment file `f`) to the end of its segment for the
    /// first entry, at `start` or after, of an epoch later than `epoch`:
    /// `Some((epoch, offset))`, or `None` when the segment ends first.
    fn later_epoch(
        &self,
        f: &File,
        (mut want, seg, pos): (u64, usize, u64),
        start: u64,
        epoch: u64,
    ) -> Result<Option<(u64, u64)>, u64> {
        let s = &self.segs[seg];
        let mut recs = Records::new(f, pos, s.size);
        loop {
            match recs.next() {
                Ok(Step::Record(e, _, _)) if e.offset == want => {
                    want += 1;
                    if e.offset < start || e.epoch == epoch {
                        continue;
                    }
                    if e.epoch < epoch {
                        return Err(e.offset);
                    }
                    return Ok(Some((e.epoch, e.offset)));
                }
                Ok(Step::End) if want == s.end => return Ok(None),
                _ => return Err(want.max(start)),
            }
        }
    }

    /// Up to `max` entries from `from` on (from the oldest kept if `from` is older),
    /// checksums verified.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        self.flush()?;
        let mut want = from.max(self.first());
        let mut out = Vec::new();
        if want >= self.next() || max == 0 {
            return Ok(out);
        }
        let first = self.segs.partition_point(|s| s.base <= want).max(1) - 1;
        for i in first..self.segs.len() {
            let seg = &self.segs[i];
            if seg.end <= want {
                match self.segs.get(i + 1) {
                    Some(n) if n.base > want => {
                        return Err(LogError::Corrupt(format!(
                            "{}: no valid record for offset {want}: its records end at {}, \
                             the next segment starts at {}",
                            log_path(&self.dir, seg.base).display(),
                            seg.end,
                            n.base
                        )))
                    }
                    _ => continue,
                }
            }
            let p = seg.index.partition_point(|p| p.0 <= want).max(1) - 1;
            let f = self.open_segment(i)?;
            let path = || log_path(&self.dir, seg.base).display().to_string();
            let mut recs = Records::new(f.get(), seg.index[p].1, seg.size);
            loop {
                // The error's text is built only on an error: this runs once per record.
                match recs
                    .next()
                    .map_err(|e| io_err(format!("read {}", path()))(e))?
                {
                    Step::Record(e, at, _) => {
                        if e.offset < want {
                            continue;
                        }
                        if e.offset != want {
                            return Err(LogError::Corrupt(format!(
                                "{} position {at}: offset {} where {want} was expected",
                                path(),
                                e.offset
                            )));
                        }
                        out.push(Arc::new(e));
                        want += 1;
                        if out.len() == max || want == self.next() {
                            return Ok(out);
                        }
                    }
                    Step::End => break,
                    Step::Bad(at, why, detail) => {
                        return Err(LogError::Corrupt(format!(
                            "{} position {at}: {why} ({detail})",
                            path()
                        )))
                    }
                }
            }
            if want < seg.end {
                return Err(LogError::Corrupt(format!(
                    "{}: records end before offset {}",
                    path(),
                    seg.end
                )));
            }
        }
        Ok(out)
    }

    /// Removes the entries at `from` and after, durably; returns how many.
    pub fn truncate(&mut self, from: u64) -> Result<u64, LogError> {
        self.writable()?;
        self.flush()?;
        let from = from.max(self.first());
        let old_next = self.next();
        if from >= old_next {
            return Ok(0);
        }
        let i = self.segs.partition_point(|s| s.base <= from).max(1) - 1;
        // Later segments go, newest first, so a crash leaves a log that is still dense.
        let later: Vec<u64> = self.segs[i + 1..].iter().map(|s| s.base).collect();
        if !later.is_empty() {
            self.active = None;
            self.active_idx = None;
        }
        for base in later.into_iter().rev() {
            for p in [idx_path(&self.dir, base), log_path(&self.dir, base)] {
                fs::remove_file(&p).map_err(io_err(format!("remove {}", p.display())))?;
            }
            self.segs.pop();
            self.names_changed = true;
        }
        let path = log_path(&self.dir, self.segs[i].base);
        // Where the record `from` starts, and the time of the one before it.
        let (pos, last_us) = {
            let seg = &self.segs[i];
            let p = seg.index.partition_point(|p| p.0 <= from).max(1) - 1;
            let f = self.open_segment(i)?;
            let mut recs = Records::new(f.get(), seg.index[p].1, seg.size);
            let mut last_us = 0;
            loop {
                match recs
                    .next()
                    .map_err(io_err(format!("read {}", path.display())))?
                {
                    Step::Record(e, at, _) if e.offset >= from => break (at, last_us),
                    Step::Record(e, _, _) => last_us = e.received_us,
                    _ => {
                        return Err(LogError::Corrupt(format!(
                            "{}: no record at offset {from} to cut at",
                            path.display()
                        )))
                    }
                }
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        file.set_len(pos)
            .and_then(|()| file.sync_all())
            .map_err(io_err(format!("cut {}", path.display())))?;
        self.file_len.set(pos);
        self.runway_failed.set(false);
        let seg = &mut self.segs[i];
        let base = seg.base;
        seg.index.retain(|p| p.0 < from || p.1 == 0);
        seg.size = pos;
        seg.end = from;
        seg.last_us = last_us;
        let ip = idx_path(&self.dir, base);
        fs::write(&ip, index_bytes(&seg.index[1..]))
            .and_then(|()| File::open(&ip)?.sync_all())
            .map_err(io_err(format!("rewrite {}", ip.display())))?;
        self.since_index = pos - seg.index.last().map_or(0, |p| p.1);
        self.pending_points.clear();
        self.active_idx = Some(
            OpenOptions::new()
                .append(true)
                .open(&ip)
                .map_err(io_err(format!("open {}", ip.display())))?,
        );
        self.active = Some(file);
        self.dirty = false;
        if self.names_changed {
            sync_dir(&self.dir)?;
            self.names_changed = false;
        }
        Ok(old_next - from)
    }

    /// Drops every record and starts the log again, empty, at offset `at`: segments are
    /// removed newest first (a crash meanwhile leaves a dense, shorter log), then one empty
    /// segment is made at `at`. Returns how many records went.
    pub fn restart_at(&mut self, at: u64) -> Result<u64, LogError> {
        self.writable()?;
        self.flush()?;
        let (first, next) = (self.first(), self.next());
        self.active = None;
        self.active_idx = None;
        while let Some(s) = self.segs.last() {
            self.remove_segment_files(s.base)?;
            self.segs.pop();
        }
        self.start_segment(at)?;
        self.pending_points.clear();
        self.dirty = false;
        sync_dir(&self.dir)?;
        self.names_changed = false;
        Ok(next - first)
    }

    /// Removes the oldest sealed segments while they end at or below `delivered` and either
    /// the log is over `max_bytes` or the segment's last entry is older than `cutoff_us`.
    /// Returns whether any went.
    pub fn retain(
        &mut self,
        max_bytes: Option<u64>,
        cutoff_us: Option<u64>,
        delivered: u64,
    ) -> Result<bool, LogError> {
        self.writable()?;
        let mut total: u64 = self.segs.iter().map(|s| s.size).sum();
        let mut removed = false;
        while self.segs.len() > 1 {
            let s = &self.segs[0];
            let over_size = max_bytes.is_some_and(|m| total > m);
            let too_old = cutoff_us.is_some_and(|c| s.last_us < c);
            if self.segs[1].base > delivered || !(over_size || too_old) {
                break;
            }
            self.remove_segment_files(s.base)?;
            total -= s.size;
            self.segs.remove(0);
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

impl Drop for SegmentLog {
    /// What was appended reaches the file even if nobody flushed it (best effort).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// A segment's file for reading: the active handle, or one opened for the read.
enum SegFile<'a> {
    Active(&'a File),
    Sealed(File),
}

impl SegFile<'_> {
    fn get(&self) -> &File {
        match self {
            SegFile::Active(f) => f,
            SegFile::Sealed(f) => f,
        }
    }
}

fn create_files(dir: &Path, base: u64) -> Result<(File, File), LogError> {
    // The segment is written by position (`write_all_at`, see `SegmentLog::flush`), its
    // index appended to.
    let log = log_path(dir, base);
    let idx = idx_path(dir, base);
    Ok((
        OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&log)
            .map_err(io_err(format!("create {}", log.display())))?,
        OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&idx)
            .map_err(io_err(format!("create {}", idx.display())))?,
    ))
}
