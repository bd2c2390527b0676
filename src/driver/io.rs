//! The byte side of a connection: a reader polled by the driver that hands over every complete
//! frame of a read at once, and a writer task that writes whatever the driver has appended to
//! the connection's outbox in one write.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::core::ConnId;
use crate::net::BoxStream;
use crate::protocol::{Frame, LenientCodec, ProtocolError};

/// What a connection's reader yields: the frames of a read (or bad lines), then, once, its end.
pub enum ConnEvent {
    /// Lines were read: every complete one of a read, in order. One event per read rather
    /// than per line: the readers' `SelectAll` re-queues a stream for each item it yields, a
    /// cost that was paid per message.
    Frames(ConnId, Vec<Result<Frame, ProtocolError>>),
    /// The connection ended (EOF, error, or closed by us).
    Closed(ConnId),
}

/// Every connection's reader, polled as one stream: only readers that were woken are polled.
pub type Readers = SelectAll<Pin<Box<dyn Stream<Item = ConnEvent> + Send>>>;

/// How many lines may wait in a connection's writer before the driver stops reading from it:
/// a client that sends without reading its answers is slowed to the pace at which it reads,
/// instead of growing our queue without bound.
const READ_PAUSE: usize = super::CONNECTION_QUEUE;

/// How long a kicked subscriber's writer may go on writing what was queued for it before the
/// connection is cut, mid-line if need be: one that reads slowly gets whole lines up to the cut,
/// one that never reads does not keep its connection (and its slot) forever.
const KICK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the driver has for a connection and its writer task has not taken yet.
#[derive(Default)]
struct Outbox {
    /// The lines, back to back. Allocated on first use: most connections of a big fan-out are
    /// idle subscribers, and a buffer each would be most of their memory.
    bytes: Vec<u8>,
    /// How many lines `bytes` holds.
    lines: usize,
    /// The driver let go of the connection: write what is left, then shut it.
    closed: bool,
}

/// What the writer and the reader of one connection share: the writer's backlog, and the
/// reader's waker, woken when the backlog has shrunk enough to read again.
#[derive(Default)]
struct Backlog {
    /// Lines appended and not yet handed to the socket (the outbox's and those being written).
    queued: AtomicUsize,
    /// Bytes in the outbox (appended, not yet taken by the writer task).
    queued_bytes: AtomicUsize,
    /// The driver hands its pending lines here once per batch, the writer task takes it all at
    /// once: one wake-up of the writer per batch (a channel of lines cost a node, a push, a pop
    /// and a wake-up per line).
    outbox: std::sync::Mutex<Outbox>,
    /// Wakes the writer task when the outbox turns non-empty (or is closed).
    ready: tokio::sync::Notify,
    /// The core asked not to be given more of this connection's frames for now.
    held: AtomicBool,
    /// The core asked to be told when everything queued has been handed to the socket
    /// (`Output::Writable`); whoever clears it (writer task or driver) tells it.
    want_writable: AtomicBool,
    reader: AtomicWaker,
}

/// The sending half of a connection, owned by the driver.
pub struct Writer {
    conn: ConnId,
    /// Lines sent since the last [`Writer::flush`]: gathered here, with no lock and no shared
    /// counter touched per line, and handed to the writer task once per batch (per line, the
    /// lock and the two counters were four atomic operations, two lines per message).
    pending: Vec<u8>,
    /// How many lines `pending` holds.
    pending_lines: usize,
    /// Where to say that the writer drained, when asked (see [`Writer::notify_drained`]).
    drained: mpsc::UnboundedSender<ConnId>,
    backlog: Arc<Backlog>,
    /// Ends the reader.
    stop: CancellationToken,
    /// Ends the writer at once, dropping what is queued.
    kill: CancellationToken,
}

impl Writer {
    /// Bytes appended and not yet taken by the writer task: what a socket that does not drain
    /// leaves in memory.
    pub fn queued_bytes(&self) -> usize {
        self.backlog.queued_bytes.load(Ordering::Relaxed) + self.pending.len()
    }

    /// Queues a line (copied into the connection's pending lines; [`Writer::flush`] hands them
    /// to the writer task). Returns whether the pending lines were empty before: the driver
    /// then notes the connection, to flush it at the end of the batch.
    pub fn send(&mut self, line: &[u8]) -> bool {
        let first = self.pending.is_empty();
        self.pending.extend_from_slice(line);
        self.pending_lines += 1;
        first
    }

    /// Hands the pending lines to the writer task: one lock, one update of the counters, one
    /// wake-up at most. When the writer task has taken everything before (the usual case),
    /// the buffers are swapped rather than copied.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (n, len) = (std::mem::take(&mut self.pending_lines), self.pending.len());
        self.backlog.queued.fetch_add(n, Ordering::Relaxed);
        self.backlog.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let was_empty = {
            let mut o = lock(&self.backlog.outbox);
            let was_empty = o.bytes.is_empty();
            if was_empty {
                std::mem::swap(&mut o.bytes, &mut self.pending);
            } else {
                o.bytes.extend_from_slice(&self.pending);
            }
            o.lines += n;
            was_empty
        };
        emptied(&mut self.pending);
        if was_empty {
            // Otherwise the writer has been told already and has not taken the outbox yet.
            self.backlog.ready.notify_one();
        }
    }

    /// Sends this connection's id on the drained channel once nothing is queued any more (at
    /// once if nothing is): the core's `Output::Writable`.
    pub fn notify_drained(&mut self) {
        self.flush();
        self.backlog.want_writable.store(true, Ordering::Release);
        // The writer may have emptied the queue before the flag was up: check here too.
        if self.backlog.queued.load(Ordering::Acquire) == 0
            && self.backlog.want_writable.swap(false, Ordering::AcqRel)
        {
            let _ = self.drained.send(self.conn);
        }
    }

    /// Ends the connection: the reader stops (and reports it closed), the writer writes what is
    /// queued and then shuts the socket (dropping the writer does the same).
    pub fn close(mut self) {
        self.flush();
        self.stop.cancel();
    }

    /// Stops (`true`) or resumes reading this connection, as the core asks.
    pub fn hold(&self, held: bool) {
        self.backlog.held.store(held, Ordering::Release);
        if !held {
            self.backlog.reader.wake();
        }
    }

    /// Ends the connection of a subscriber too far behind: like [`Writer::close`], but cut after
    /// [`KICK_GRACE`] if it still has not taken what was queued (it may never read again).
    pub fn kick(mut self) {
        self.flush();
        self.kill.cancel();
        self.stop.cancel();
    }
}

impl Drop for Writer {
    /// The writer task writes what is queued and shuts the socket.
    fn drop(&mut self) {
        self.flush();
        lock(&self.backlog.outbox).closed = true;
        self.backlog.ready.notify_one();
    }
}

/// Most of a connection's write buffer kept once it has been written out.
const KEEP_BUFFER: usize = 256 * 1024;

/// Empties a connection's write buffer for reuse, keeping its room unless a burst grew it past
/// [`KEEP_BUFFER`]: that much is not kept per connection for good.
fn emptied(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > KEEP_BUFFER {
        *buf = Vec::new();
    }
}

/// The outbox, even if a thread panicked holding it (it holds plain bytes: nothing half-made).
fn lock(m: &std::sync::Mutex<Outbox>) -> std::sync::MutexGuard<'_, Outbox> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's first read buffer: an idle subscriber then costs a few hundred bytes, not
/// a full buffer.
const FIRST_READ: usize = 512;

/// The largest read: a publisher pipelining fills it, and one read (one system call, one event
/// for the driver) then carries hundreds of frames. The buffer grows to it only while reads
/// keep filling it.
const MAX_READ: usize = 64 * 1024;

/// Most frames handed over in one event; the rest of a read waits for the next poll.
const MAX_FRAMES: usize = 256;

/// Reads a connection and cuts what it read into frames, all the complete frames of a read
/// handed over together.
struct Lines {
    io: ReadHalf<BoxStream>,
    buf: BytesMut,
    codec: LenientCodec,
    /// Free room wanted before each read: doubled each time a read fills what it had.
    want: usize,
    /// The connection ended (or failed): only what is left in `buf` is still handed over.
    eof: bool,
    /// Everything was handed over, the end included.
    done: bool,
}

impl Lines {
    fn new(io: ReadHalf<BoxStream>) -> Self {
        Lines {
            io,
            buf: BytesMut::new(),
            codec: LenientCodec::default(),
            want: FIRST_READ,
            eof: false,
            done: false,
        }
    }

    /// Bytes read and not yet cut into a frame: the start of a frame not finished.
    fn partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The frames of the next read, or of what is left of the last one; `None` after the end.
    fn poll_frames(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Vec<Result<Frame, ProtocolError>>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut frames = Vec::new();
        loop {
            while frames.len() < MAX_FRAMES {
                let cut = if self.eof {
                    self.codec.decode_eof(&mut self.buf)
                } else {
                    self.codec.decode(&mut self.buf)
                };
                match cut {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) if self.eof => {
                        self.done = true;
                        break;
                    }
                    Ok(None) => break,
                    Err(fatal) => {
                        // Nothing after a fatal error is read: the connection is closed.
                        frames.push(Err(fatal));
                        self.done = true;
                        break;
                    }
                }
            }
            if !frames.is_empty() {
                return Poll::Ready(Some(frames));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if self.buf.capacity() - self.buf.len() < self.want / 2 {
                self.buf.reserve(self.want);
            }
            let room = self.buf.capacity() - self.buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    if n == room && self.want < MAX_READ {
                        self.want = (self.want * 2).min(MAX_READ);
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(vec![Err(ProtocolError::Io(e))]));
                }
            }
        }
    }
}

/// A reader that pauses while its connection's writer is [`READ_PAUSE`] lines behind (when
/// `paced`), or while the core holds frames of it unhandled ([`Writer::hold`]); and that gives
/// a frame begun `frame_timeout` to be finished (`super::FRAME_TIMEOUT`).
struct Paced {
    inner: Lines,
    backlog: Arc<Backlog>,
    paced: bool,
    frame_timeout: std::time::Duration,
    /// The timer of a frame begun and not finished, kept between frames so that arming it
    /// allocates nothing; `armed` while it counts.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    timed_out: bool,
    /// Under TLS: bytes read from the socket, and their count when the last frame came (more
    /// since then is a frame begun, though the TLS layer still holds it).
    raw: Option<(Arc<std::sync::atomic::AtomicU64>, u64)>,
}

impl Stream for Paced {
    type Item = Vec<Result<Frame, ProtocolError>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.timed_out {
            // Told and being closed: nothing more is read.
            return Poll::Pending;
        }
        let paced = self.paced;
        let full = |b: &Backlog| {
            b.held.load(Ordering::Acquire)
                || (paced && b.queued.load(Ordering::Acquire) >= READ_PAUSE)
        };
        if full(&self.backlog) {
            self.backlog.reader.register(cx.waker());
            // Checked again after registering, so a wake-up in between is not lost.
            if full(&self.backlog) {
                // Not the client's delay: its frame's time starts again when we read again.
                self.armed = false;
                return Poll::Pending;
            }
        }
        match self.inner.poll_frames(cx) {
            Poll::Ready(item) => {
                self.armed = false;
                if let Some((counter, seen)) = self.raw.as_mut() {
                    *seen = counter.load(Ordering::Relaxed);
                }
                Poll::Ready(item)
            }
            Poll::Pending
                if !self.inner.partial()
                    && self
                        .raw
                        .as_ref()
                        .is_none_or(|(c, seen)| c.load(Ordering::Relaxed) == *seen) =>
            {
                self.armed = false;
                Poll::Pending
            }
            Poll::Pending => {
                let t = self.frame_timeout;
                let arm = !self.armed;
                self.armed = true;
                let d = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                if arm {
                    d.as_mut().reset(tokio::time::Instant::now() + t);
                }
                match std::future::Future::poll(d.as_mut(), cx) {
                    Poll::Ready(()) => {
                        self.armed = false;
                        self.timed_out = true;
                        Poll::Ready(Some(vec![Err(ProtocolError::FrameTimeout(t))]))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Splits a connection into its reader (for [`Readers`]) and its writer.
pub fn split(
    conn: ConnId,
    stream: BoxStream,
    paced: bool,
    frame_timeout: std::time::Duration,
    raw: Option<Arc<std::sync::atomic::AtomicU64>>,
    drained: mpsc::UnboundedSender<ConnId>,
    alive: mpsc::Sender<()>,
) -> (Pin<Box<dyn Stream<Item = ConnEvent> + Send>>, Writer) {
    let (r, w) = tokio::io::split(stream);
    let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
    let backlog = Arc::new(Backlog::default());
    let reader = Paced {
        inner: Lines::new(r),
        backlog: backlog.clone(),
        paced,
        frame_timeout,
        deadline: None,
        armed: false,
        timed_out: false,
        raw: raw.map(|c| {
            let now = c.load(Ordering::Relaxed);
            (c, now)
        }),
    };
    let reader = reader
        .take_until(stop.clone().cancelled_owned())
        .map(move |frames| ConnEvent::Frames(conn, frames))
        .chain(stream::once(async move { ConnEvent::Closed(conn) }));
    let ended = stop.clone();
    let writing = write_loop(w, backlog.clone(), kill.clone(), (conn, drained.clone()));
    crate::net::spawn(async move {
        writing.await;
        // However the writer ended (done, cut, or the peer gone), the reader ends too, even if
        // it was paused: its end is what tells the core the connection is closed.
        ended.cancel();
        // Held until here: the driver, stopping, waits for every writer to have written out.
        drop(alive);
    });
    let writer = Writer {
        conn,
        pending: Vec::new(),
        pending_lines: 0,
        drained,
        backlog,
        stop,
        kill,
    };
    (Box::pin(reader), writer)
}

/// Writes a connection's lines in order: each time it is woken, everything in the outbox in
/// one write; when the driver has let go of the connection and the outbox is empty, shuts it.
async fn write_loop(
    mut w: WriteHalf<BoxStream>,
    backlog: Arc<Backlog>,
    kill: CancellationToken,
    (conn, drained): (ConnId, mpsc::UnboundedSender<ConnId>),
) {
    // Swapped with the outbox's buffer: the two buffers take turns, no allocation per write.
    let mut buf: Vec<u8> = Vec::new();
    let cut = async {
        kill.cancelled().await;
        tokio::time::sleep(KICK_GRACE).await;
    };
    tokio::pin!(cut);
    loop {
        tokio::select! {
            _ = &mut cut => return,
            _ = backlog.ready.notified() => {}
        }
        loop {
            let (n, closed) = {
                let mut o = lock(&backlog.outbox);
                std::mem::swap(&mut o.bytes, &mut buf);
                (std::mem::take(&mut o.lines), o.closed)
            };
            if buf.is_empty() {
                if closed {
                    let _ = w.shutdown().await;
                    return;
                }
                break;
            }
            backlog.queued_bytes.fetch_sub(buf.len(), Ordering::Relaxed);
            let left = backlog.queued.fetch_sub(n, Ordering::AcqRel) - n;
            if left < READ_PAUSE {
                backlog.reader.wake();
            }
            if left == 0 && backlog.want_writable.swap(false, Ordering::AcqRel) {
                let _ = drained.send(conn);
            }
            let written = tokio::select! {
                _ = &mut cut => return,
                r = w.write_all(&buf) => r,
            };
            if written.is_err() {
                return;
            }
            emptied(&mut buf);
        }
    }
}

/// Tells a client over the connection limit why it is turned away.
pub async fn refuse<S: AsyncWrite + Unpin>(mut stream: S) {
    let line = Frame::Err {
        reason: "too many connections".into(),
    }
    .encode();
    let _ = stream.write_all(line.as_bytes()).await;
}
