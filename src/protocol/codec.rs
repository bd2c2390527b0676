//! Turns a byte stream into frames and back: line splitting with the frame cap.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Frame, ProtocolError, MAX_FRAME};

/// Splits a byte stream into lines and parses them; encodes frames on the way out.
///
/// A bad line yields an `Err` for that line only (the decoder has already consumed it), so the
/// connection can answer `ERR|…` and go on. An over-long line is fatal: see
/// [`ProtocolError::TooLong`].
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// How far into the buffer we already looked for a newline, so a frame arriving in many
    /// small pieces is scanned once, not once per piece.
    scanned: usize,
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        match memchr::memchr(b'\n', &buf[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                self.scanned = 0;
                if end + 1 > MAX_FRAME {
                    return Err(ProtocolError::TooLong);
                }
                // Parsed in place, then skipped: a `split_to` per line made and dropped a
                // shared handle on the buffer (two atomic operations) for every frame.
                let frame = Frame::parse(&buf[..end]);
                buf.advance(end + 1);
                frame.map(Some)
            }
            None if buf.len() >= MAX_FRAME => Err(ProtocolError::TooLong),
            None => {
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => {
                buf.advance(buf.len());
                self.scanned = 0;
                Err(ProtocolError::Incomplete)
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let mut s = String::new();
        frame.encode_into(&mut s);
        dst.put_slice(s.as_bytes());
        Ok(())
    }
}

/// A [`FrameCodec`] for servers: a bad line comes out as an item, `Ok(Some(Err(e)))`, instead of
/// a stream error, because a framed stream ends for good after its first error. Only fatal
/// errors ([`ProtocolError::is_fatal`]) end the stream.
#[derive(Debug, Default)]
pub struct LenientCodec(FrameCodec);

impl LenientCodec {
    fn lift(
        r: Result<Option<Frame>, ProtocolError>,
    ) -> Result<Option<Result<Frame, ProtocolError>>, ProtocolError> {
        match r {
            Ok(f) => Ok(f.map(Ok)),
            Err(e) if !e.is_fatal() => Ok(Some(Err(e))),
            Err(e) => Err(e),
        }
    }
}

impl Decoder for LenientCodec {
    type Item = Result<Frame, ProtocolError>;
    type Error = ProtocolError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, ProtocolError> {
        Self::lift(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, ProtocolError> {
        Self::lift(self.0.decode_eof(buf))
    }
}
