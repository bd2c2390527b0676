//! The wire protocol: newline-terminated, pipe-delimited text frames.
//!
//! This module is pure: it turns bytes into [`Frame`]s and back and never touches a socket or a
//! clock, so every rule of the protocol can be tested on its own (see `tests/protocol.rs`).
//!
//! Two dialects share one port:
//!
//! * the **seed dialect** of the Go course project this crate succeeds: `PUBLISH|topic|payload`,
//!   `SUBSCRIBE|topic`, `REPLICATE|topic|payload`, `CLEAR|topic|payload`, `PING` (also `PING||`),
//!   `PONG`, `ACK`. A client written to that table works against our brokers unchanged;
//! * the **identified dialect** (`PUB`, `SUB`, `MSG`, `REPL`, `STORED`, `CLR`, `HELLO`), which
//!   carries a stable message identity (publisher id + per-publisher sequence) and the send time,
//!   so that two messages with the same payload stay two messages, duplicates can be spotted and
//!   latency measured. A peer opts in simply by sending the new verbs; a seed peer never sees them.
//!
//! The payload is always the last field and may itself contain `|`; it may not contain a newline,
//! which ends the frame. Frames are capped at [`MAX_FRAME`] bytes including the newline.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

/// Longest accepted frame in bytes, newline included. Caps the memory one connection can pin
/// while it sends a frame without ever finishing it.
pub const MAX_FRAME: usize = 64 * 1024;

/// Publisher id used for messages that arrived in the seed dialect and so carry no identity.
pub const ANONYMOUS: &str = "-";

/// Name and version a node announces in `HELLO`, so a peer can tell ours from a seed broker.
pub const PROTOCOL_VERSION: &str = "edgepair/1";

/// The identity of one message: who published it and its place in that publisher's sequence.
///
/// It travels through `REPLICATE`, `CLEAR` and delivery so that a message resent after a failover
/// is recognised as the same message rather than a new one with an equal payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    /// Publisher id: unique per publisher process (see `client::new_publisher_id`).
    pub publisher: String,
    /// Position in the publisher's sequence, starting at 1; 0 for anonymous messages.
    pub seq: u64,
}

impl MsgId {
    /// The identity given to a seed-dialect message, which has none of its own.
    pub fn anonymous() -> Self {
        MsgId {
            publisher: ANONYMOUS.to_string(),
            seq: 0,
        }
    }

    /// True for messages that arrived without an identity (seed dialect).
    pub fn is_anonymous(&self) -> bool {
        self.publisher == ANONYMOUS
    }
}

/// Broker-side timestamps and the epoch, carried by `MSG` so that a subscriber can split the
/// end-to-end latency into the part spent before compute and the compute itself, and tell which
/// reign of which node delivered it.
///
/// Encoded as `key=value` pairs joined by `,`; unknown keys are ignored so that fields can be
/// added without breaking older subscribers. All times are microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamps {
    /// Epoch (term) of the node that delivered the message.
    pub epoch: u64,
    /// When the delivering broker received the message (`rx`).
    pub received_us: u64,
    /// When the compute task started (`cs`).
    pub compute_start_us: u64,
    /// When the compute task ended (`ce`).
    pub compute_end_us: u64,
}

impl Stamps {
    fn encode<W: std::fmt::Write>(&self, out: &mut W) {
        let _ = write!(
            out,
            "e={},rx={},cs={},ce={}",
            self.epoch, self.received_us, self.compute_start_us, self.compute_end_us
        );
    }

    fn parse(s: &str) -> Result<Self, ProtocolError> {
        let mut st = Stamps::default();
        for pair in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or(ProtocolError::BadField("stamps"))?;
            let v: u64 = v.parse().map_err(|_| ProtocolError::BadField("stamps"))?;
            match k {
                "e" => st.epoch = v,
                "rx" => st.received_us = v,
                "cs" => st.compute_start_us = v,
                "ce" => st.compute_end_us = v,
                _ => {}
            }
        }
        Ok(st)
    }
}

/// Which part a node currently plays; announced in `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serving publishers and subscribers, replicating to its backup.
    Primary,
    /// Holding replicated messages and polling the primary.
    Backup,
}

impl Role {
    /// Lower-case name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }

    fn parse(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "primary" => Ok(Role::Primary),
            "backup" => Ok(Role::Backup),
            _ => Err(ProtocolError::BadField("role")),
        }
    }
}

/// One protocol frame, either dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `PUBLISH|topic|payload` (seed): publish without identity, answered by a bare `ACK`.
    Publish {
        /// Topic to publish on.
        topic: String,
        /// Message body.
        payload: String,
    },
    /// `PUB|topic|publisher|seq|sent_us|payload`: publish with identity, answered `ACK|publisher|seq`.
    Pub {
        /// Topic to publish on.
        topic: String,
        /// Message identity.
        id: MsgId,
        /// Publisher's wall clock when it first sent the message, µs since the Unix epoch.
        sent_us: u64,
        /// Message body.
        payload: String,
    },
    /// `SUBSCRIBE|topic` (seed): the connection then receives bare payload lines.
    Subscribe {
        /// Topic to follow.
        topic: String,
    },
    /// `SUB|topic`: the connection then receives `MSG` frames.
    Sub {
        /// Topic to follow.
        topic: String,
    },
    /// `MSG|topic|publisher|seq|sent_us|stamps|payload`: one delivery to an identified subscriber.
    Msg {
        /// Topic the message was published on.
        topic: String,
        /// Message identity.
        id: MsgId,
        /// Publisher's send time.
        sent_us: u64,
        /// Broker-side timestamps and epoch.
        stamps: Stamps,
        /// Message body.
        payload: String,
    },
    /// A bare payload line as the seed delivers it to `SUBSCRIBE` connections. Only produced by
    /// [`Frame::encode`]; the decoder never yields it (a bare line is not a command).
    Bare(String),
    /// `REPLICATE|topic|payload` (seed): store a copy until the matching `CLEAR`.
    Replicate {
        /// Topic of the message.
        topic: String,
        /// Message body.
        payload: String,
    },
    /// `CLEAR|topic|payload` (seed): forget one stored copy with this topic and payload.
    Clear {
        /// Topic of the message.
        topic: String,
        /// Message body.
        payload: String,
    },
    /// `REPL|mid|topic|publisher|seq|sent_us|payload`: store a copy, answer `STORED|mid`.
    Repl {
        /// Replication id, assigned by the primary in arrival order; the backup replays in it.
        mid: u64,
        /// Topic of the message.
        topic: String,
        /// Message identity.
        id: MsgId,
        /// Publisher's send time.
        sent_us: u64,
        /// Message body.
        payload: String,
    },
    /// `STORED|mid`: the backup holds message `mid`.
    Stored {
        /// Replication id being confirmed.
        mid: u64,
    },
    /// `CLR|mid`: message `mid` was delivered, the backup may drop it.
    Clr {
        /// Replication id to drop.
        mid: u64,
    },
    /// `HELLO|edgepair/1|role|epoch|incarnation`: opens a broker-to-broker link and says who is
    /// speaking.
    Hello {
        /// Protocol name and version, [`PROTOCOL_VERSION`] for this crate.
        version: String,
        /// Role of the sender.
        role: Role,
        /// Epoch of the sender.
        epoch: u64,
        /// Changes every time the sender's process starts (0 if not given), so a backup can tell
        /// that its primary was restarted and forgot the messages it had replicated.
        incarnation: u64,
    },
    /// `PING` (the seed also sends `PING||`): liveness probe, answered `PONG`.
    Ping,
    /// `PONG`: the node is alive.
    Pong,
    /// `ACK` (seed) or `ACK|publisher|seq`: the publish is safe (replicated or degraded).
    Ack {
        /// Identity of the acknowledged message; `None` for a seed-dialect publish.
        id: Option<MsgId>,
    },
    /// `STATUS`: asks a node for its state (used by the harness to await readiness).
    StatusQuery,
    /// `STATUS|role|epoch|link|held|inflight`: a node's state. `link` is `up`, `down` (a backup
    /// is configured but not connected) or `none`; `held` counts replicated messages a backup
    /// holds; `inflight` counts messages a primary has accepted but not yet delivered.
    Status {
        /// Current role.
        role: Role,
        /// Current epoch.
        epoch: u64,
        /// State of the replication link or, on a backup, whether it has seen its primary.
        link: String,
        /// Messages held for the primary (backup).
        held: u64,
        /// Messages accepted and not yet delivered (primary).
        inflight: u64,
    },
    /// `ERR|reason`: the last frame was refused; nothing was stored.
    Err {
        /// Human-readable reason.
        reason: String,
    },
}

/// Why a frame was refused. Every variant except [`ProtocolError::Io`] leaves the connection
/// usable: the peer is told `ERR|reason` and may send the next frame.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The frame is longer than [`MAX_FRAME`]. The connection is closed, since we cannot tell
    /// where the next frame starts without buffering the rest of this one.
    #[error("frame longer than {MAX_FRAME} bytes")]
    TooLong,
    /// The bytes are not valid UTF-8.
    #[error("frame is not valid UTF-8")]
    NotUtf8,
    /// The line is empty.
    #[error("empty frame")]
    Empty,
    /// The verb (first field) is not one we know.
    #[error("unknown verb '{0}'")]
    UnknownVerb(String),
    /// The verb is known but the frame has too few fields.
    #[error("{0} needs {1} fields")]
    MissingFields(&'static str, usize),
    /// A field that must not be empty is.
    #[error("empty {0}")]
    EmptyField(&'static str),
    /// A field does not parse (a number that is not one, say).
    #[error("bad {0}")]
    BadField(&'static str),
    /// The connection ended in the middle of a frame.
    #[error("connection closed mid-frame")]
    Incomplete,
    /// Transport error underneath the codec.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// Whether the connection must be closed after this error (otherwise the next frame is read).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtocolError::TooLong | ProtocolError::Incomplete | ProtocolError::Io(_)
        )
    }
}

fn non_empty<'a>(s: &'a str, what: &'static str) -> Result<&'a str, ProtocolError> {
    if s.is_empty() {
        Err(ProtocolError::EmptyField(what))
    } else {
        Ok(s)
    }
}

fn number(s: &str, what: &'static str) -> Result<u64, ProtocolError> {
    s.parse().map_err(|_| ProtocolError::BadField(what))
}

/// Splits `line` into the verb and exactly `N` further fields, the last one taking the rest.
/// No allocation: this runs once per message on the relay path.
fn fields<'a, const N: usize>(
    line: &'a str,
    verb: &'static str,
) -> Result<[&'a str; N], ProtocolError> {
    let mut out = [""; N];
    let mut rest = line
        .split_once('|')
        .map(|(_, r)| r)
        .ok_or(ProtocolError::MissingFields(verb, N))?;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
        } else {
            let (f, r) = rest
                .split_once('|')
                .ok_or(ProtocolError::MissingFields(verb, N))?;
            *slot = f;
            rest = r;
        }
    }
    Ok(out)
}

impl Frame {
    /// Parses one line (without its newline) into a frame.
    pub fn parse(line: &[u8]) -> Result<Frame, ProtocolError> {
        let line = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return Err(ProtocolError::Empty);
        }
        let verb = line.split('|').next().unwrap_or_default();
        let s = String::from;
        Ok(match verb {
            "PUBLISH" => {
                let f = fields::<2>(line, "PUBLISH")?;
                Frame::Publish {
                    topic: s(non_empty(f[0], "topic")?),
                    payload: s(f[1]),
                }
            }
            "PUB" => {
                let f = fields::<5>(line, "PUB")?;
                Frame::Pub {
                    topic: s(non_empty(f[0], "topic")?),
                    id: MsgId {
                        publisher: s(non_empty(f[1], "publisher")?),
                        seq: number(f[2], "seq")?,
                    },
                    sent_us: number(f[3], "sent_us")?,
                    payload: s(f[4]),
                }
            }
            "SUBSCRIBE" => {
                let f = fields::<1>(line, "SUBSCRIBE")?;
                Frame::Subscribe {
                    topic: s(non_empty(f[0], "topic")?),
                }
            }
            "SUB" => {
                let f = fields::<1>(line, "SUB")?;
                Frame::Sub {
                    topic: s(non_empty(f[0], "topic")?),
                }
            }
            "MSG" => {
                let f = fields::<6>(line, "MSG")?;
                Frame::Msg {
                    topic: s(non_empty(f[0], "topic")?),
                    id: MsgId {
                        publisher: s(non_empty(f[1], "publisher")?),
                        seq: number(f[2], "seq")?,
                    },
                    sent_us: number(f[3], "sent_us")?,
                    stamps: Stamps::parse(f[4])?,
                    payload: s(f[5]),
                }
            }
            "REPLICATE" | "CLEAR" => {
                let f = fields::<2>(
                    line,
                    if verb == "CLEAR" {
                        "CLEAR"
                    } else {
                        "REPLICATE"
                    },
                )?;
                let topic = s(non_empty(f[0], "topic")?);
                let payload = s(f[1]);
                if verb == "CLEAR" {
                    Frame::Clear { topic, payload }
                } else {
                    Frame::Replicate { topic, payload }
                }
            }
            "REPL" => {
                let f = fields::<6>(line, "REPL")?;
                Frame::Repl {
                    mid: number(f[0], "mid")?,
                    topic: s(non_empty(f[1], "topic")?),
                    id: MsgId {
                        publisher: s(non_empty(f[2], "publisher")?),
                        seq: number(f[3], "seq")?,
                    },
                    sent_us: number(f[4], "sent_us")?,
                    payload: s(f[5]),
                }
            }
            "STORED" => Frame::Stored {
                mid: number(fields::<1>(line, "STORED")?[0], "mid")?,
            },
            "CLR" => Frame::Clr {
                mid: number(fields::<1>(line, "CLR")?[0], "mid")?,
            },
            "HELLO" => {
                let f = fields::<3>(line, "HELLO")?;
                let (epoch, incarnation) = match f[2].split_once('|') {
                    Some((e, i)) => (number(e, "epoch")?, number(i, "incarnation")?),
                    None => (number(f[2], "epoch")?, 0),
                };
                Frame::Hello {
                    version: s(non_empty(f[0], "version")?),
                    role: Role::parse(f[1])?,
                    epoch,
                    incarnation,
                }
            }
            // The seed's backup writes `PING||`; anything after the verb is ignored.
            "PING" => Frame::Ping,
            "PONG" => Frame::Pong,
            "ACK" if line == "ACK" => Frame::Ack { id: None },
            "ACK" => {
                let f = fields::<2>(line, "ACK")?;
                Frame::Ack {
                    id: Some(MsgId {
                        publisher: s(non_empty(f[0], "publisher")?),
                        seq: number(f[1], "seq")?,
                    }),
                }
            }
            "STATUS" if line == "STATUS" => Frame::StatusQuery,
            "STATUS" => {
                let f = fields::<5>(line, "STATUS")?;
                Frame::Status {
                    role: Role::parse(f[0])?,
                    epoch: number(f[1], "epoch")?,
                    link: s(f[2]),
                    held: number(f[3], "held")?,
                    inflight: number(f[4], "inflight")?,
                }
            }
            "ERR" => Frame::Err {
                reason: s(line.split_once('|').map(|(_, r)| r).unwrap_or("")),
            },
            other => {
                let mut v: String = other.chars().take(32).collect();
                if other.len() > v.len() {
                    v.push('…');
                }
                return Err(ProtocolError::UnknownVerb(v));
            }
        })
    }

    /// Appends the frame, newline included, to `out`.
    pub fn encode_into(&self, out: &mut String) {
        self.write_to(out);
    }

    /// Appends the frame, newline included, to a byte buffer (a connection's write buffer).
    pub fn encode_into_bytes(&self, out: &mut Vec<u8>) {
        self.write_to(&mut ByteWriter(out));
    }

    fn write_to<W: std::fmt::Write>(&self, out: &mut W) {
        let _ = match self {
            Frame::Publish { topic, payload } => write!(out, "PUBLISH|{topic}|{payload}"),
            Frame::Pub {
                topic,
                id,
                sent_us,
                payload,
            } => write!(
                out,
                "PUB|{topic}|{}|{}|{sent_us}|{payload}",
                id.publisher, id.seq
            ),
            Frame::Subscribe { topic } => write!(out, "SUBSCRIBE|{topic}"),
            Frame::Sub { topic } => write!(out, "SUB|{topic}"),
            Frame::Msg {
                topic,
                id,
                sent_us,
                stamps,
                payload,
            } => {
                write_msg_fields(out, topic, id, *sent_us, stamps, payload);
                Ok(())
            }
            Frame::Bare(payload) => write!(out, "{payload}"),
            Frame::Replicate { topic, payload } => write!(out, "REPLICATE|{topic}|{payload}"),
            Frame::Clear { topic, payload } => write!(out, "CLEAR|{topic}|{payload}"),
            Frame::Repl {
                mid,
                topic,
                id,
                sent_us,
                payload,
            } => write!(
                out,
                "REPL|{mid}|{topic}|{}|{}|{sent_us}|{payload}",
                id.publisher, id.seq
            ),
            Frame::Stored { mid } => write!(out, "STORED|{mid}"),
            Frame::Clr { mid } => write!(out, "CLR|{mid}"),
            Frame::Hello {
                version,
                role,
                epoch,
                incarnation,
            } => write!(
                out,
                "HELLO|{version}|{}|{epoch}|{incarnation}",
                role.as_str()
            ),
            Frame::Ping => write!(out, "PING"),
            Frame::Pong => write!(out, "PONG"),
            Frame::Ack { id: None } => write!(out, "ACK"),
            Frame::Ack { id: Some(id) } => write!(out, "ACK|{}|{}", id.publisher, id.seq),
            Frame::StatusQuery => write!(out, "STATUS"),
            Frame::Status {
                role,
                epoch,
                link,
                held,
                inflight,
            } => write!(
                out,
                "STATUS|{}|{epoch}|{link}|{held}|{inflight}",
                role.as_str()
            ),
            Frame::Err { reason } => write!(out, "ERR|{reason}"),
        };
        let _ = out.write_char('\n');
    }

    fn payload_len(&self) -> usize {
        match self {
            Frame::Publish { payload, .. }
            | Frame::Pub { payload, .. }
            | Frame::Msg { payload, .. }
            | Frame::Replicate { payload, .. }
            | Frame::Clear { payload, .. }
            | Frame::Repl { payload, .. }
            | Frame::Bare(payload) => payload.len(),
            _ => 0,
        }
    }

    /// The frame as a line, newline included.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(self.payload_len() + 96);
        self.encode_into(&mut s);
        s
    }
}

/// `fmt::Write` into a byte buffer, so that frames are formatted straight into a connection's
/// write buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn write_msg_fields<W: std::fmt::Write>(
    out: &mut W,
    topic: &str,
    id: &MsgId,
    sent_us: u64,
    stamps: &Stamps,
    payload: &str,
) {
    let _ = write!(out, "MSG|{topic}|{}|{}|{sent_us}|", id.publisher, id.seq);
    stamps.encode(out);
    let _ = write!(out, "|{payload}");
}

/// The `MSG` line (newline included) for one delivery, written from borrowed parts: a broker
/// encodes each message once for all its subscribers without building a [`Frame`] first.
pub fn msg_line(topic: &str, id: &MsgId, sent_us: u64, stamps: &Stamps, payload: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + id.publisher.len() + payload.len() + 96);
    write_msg_fields(
        &mut ByteWriter(&mut out),
        topic,
        id,
        sent_us,
        stamps,
        payload,
    );
    out.push(b'\n');
    out
}

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
        match buf[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                self.scanned = 0;
                if end + 1 > MAX_FRAME {
                    return Err(ProtocolError::TooLong);
                }
                let line = buf.split_to(end + 1);
                Frame::parse(&line[..end]).map(Some)
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
