//! The byte side of a connection: a framed reader polled by the driver, and a writer task that
//! coalesces what is queued into one write.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::core::ConnId;
use crate::net::BoxStream;
use crate::protocol::{Frame, LenientCodec, ProtocolError};

/// What a connection's reader yields: a frame (or a bad line), then, once, its end.
pub enum ConnEvent {
    /// A line was read.
    Frame(ConnId, Result<Frame, ProtocolError>),
    /// The connection ended (EOF, error, or closed by us).
    Closed(ConnId),
}

/// Every connection's reader, polled as one stream: only readers that were woken are polled.
pub type Readers = SelectAll<Pin<Box<dyn Stream<Item = ConnEvent> + Send>>>;

/// The sending half of a connection, owned by the driver.
pub struct Writer {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Lines queued and not yet handed to the socket.
    queued: Arc<AtomicUsize>,
    /// Ends the reader.
    stop: CancellationToken,
}

impl Writer {
    /// Lines waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues a line.
    pub fn send(&self, line: Bytes) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(line);
    }

    /// Ends the connection: the reader stops (and reports it closed), the writer writes what is
    /// queued and then shuts the socket.
    pub fn close(self) {
        self.stop.cancel();
    }
}

/// Splits a connection into its reader (for [`Readers`]) and its writer.
pub fn split(
    conn: ConnId,
    stream: BoxStream,
) -> (Pin<Box<dyn Stream<Item = ConnEvent> + Send>>, Writer) {
    let (r, w) = tokio::io::split(stream);
    // A small first read buffer (it grows with the traffic): an idle subscriber then costs a
    // few KiB, not the codec's default 8 KiB.
    let framed = FramedRead::with_capacity(r, LenientCodec::default(), 512);
    let stop = CancellationToken::new();
    let reader = framed
        .take_until(stop.clone().cancelled_owned())
        .map(move |item| ConnEvent::Frame(conn, item.and_then(|inner| inner)))
        .chain(stream::once(async move { ConnEvent::Closed(conn) }));
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    crate::net::spawn(write_loop(w, rx, queued.clone()));
    let writer = Writer { tx, queued, stop };
    (Box::pin(reader), writer)
}

/// Writes a connection's lines in order, coalescing whatever is already queued into one write.
async fn write_loop(
    mut w: WriteHalf<BoxStream>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    // Allocated on first use: most connections of a big fan-out are idle subscribers, and a
    // buffer each would be most of their memory.
    let mut buf: Vec<u8> = Vec::new();
    while let Some(line) = rx.recv().await {
        buf.extend_from_slice(&line);
        let mut n = 1;
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(l) => {
                    buf.extend_from_slice(&l);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        queued.fetch_sub(n, Ordering::Relaxed);
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = w.shutdown().await;
}

/// Tells a client over the connection limit why it is turned away.
pub async fn refuse<S: AsyncWrite + Unpin>(mut stream: S) {
    let line = Frame::Err {
        reason: "too many connections".into(),
    }
    .encode();
    let _ = stream.write_all(line.as_bytes()).await;
}
