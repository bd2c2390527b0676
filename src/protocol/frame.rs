//! One frame of either dialect: the `Frame` enum, its parser and its encoder.

use bytes::BufMut;

use super::{AuthStep, GroupOp, MsgId, ProtocolError, Role, Stamps, Start};

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
    /// `SUB|topic` (live deliveries only) or `SUB|topic|from`: the connection then receives
    /// `MSG` frames. With `from`, the topic's delivered entries from that point are replayed
    /// first, then [`Frame::Replayed`] marks where the replay ends and live deliveries begin.
    Sub {
        /// Topic to follow.
        topic: String,
        /// Where to start; `None` for live deliveries only (the wire form `SUB|topic`).
        from: Option<Start>,
    },
    /// `HISTORY|topic|N`: the last `N` delivered entries of the topic as `MSG` frames, then
    /// [`Frame::Replayed`]; no subscription.
    History {
        /// The topic.
        topic: String,
        /// How many entries, at most.
        n: u64,
    },
    /// `REPLAYED|topic|next`: sent by the broker at the end of a replay (`SUB` with a start,
    /// `HISTORY`): every entry of the topic below `next` it was going to send has been sent;
    /// for a `SUB`, live deliveries follow from `next` on.
    Replayed {
        /// The topic.
        topic: String,
        /// The first offset not part of the replay.
        next: u64,
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
    /// `REPL|mid|topic|publisher|seq|sent_us|o=offset,e=epoch,rx=received_us|payload`: append
    /// this entry to the topic's log at `offset`, answer `STORED|mid`.
    Repl {
        /// Replication id, assigned by the primary in arrival order; the backup replays in it.
        mid: u64,
        /// Topic of the message.
        topic: String,
        /// Message identity.
        id: MsgId,
        /// Publisher's send time.
        sent_us: u64,
        /// The entry's place in the log: `offset`, `epoch` and `received_us` are set.
        stamps: Stamps,
        /// Message body.
        payload: String,
    },
    /// `TAIL|topic|next|epoch[|E@O,E@O…]`: a backup answering its primary's `HELLO` tells, per
    /// topic, the next offset of its log, the epoch of its last entry and where each epoch of
    /// its log begins, so the primary knows where the two logs diverge and resumes there.
    Tail {
        /// The topic.
        topic: String,
        /// The backup's next offset for it.
        next: u64,
        /// The epoch of the backup's last entry of it (0 when empty).
        epoch: u64,
        /// Each epoch of the backup's log with the offset of its first entry there, in order
        /// (empty: not told, and only `epoch` is compared).
        epochs: Vec<(u64, u64)>,
    },
    /// `TAIL`: the end of the backup's `TAIL` list.
    TailEnd,
    /// `SETTLE`: sent by a primary after catching up a backup whose log went further than its
    /// own (a reign or a degraded run it never saw). The backup cuts that tail at the `MARK`s
    /// and hands what of it was undelivered to the primary; the primary holds fresh publishes
    /// until the backup answers `SETTLED`, so that the handed entries come first in its log.
    Settle,
    /// `SETTLED`: the backup's answer to `SETTLE` once every hand-over it began is done.
    Settled,
    /// `MARK|topic|upto|next`: sent by the primary after catching a backup up: every entry of
    /// the topic below `upto` was delivered, and the primary's log of it ends before `next`
    /// (the backup cuts anything it has from there on: a tail the primary never had).
    Mark {
        /// The topic.
        topic: String,
        /// The delivered mark.
        upto: u64,
        /// The primary's next offset.
        next: u64,
    },
    /// `STORED|mid`: the backup holds message `mid`.
    Stored {
        /// Replication id being confirmed.
        mid: u64,
    },
    /// `CLR|topic|upto`: every entry of the topic below `upto` was delivered; the backup's
    /// delivered mark of it moves up to there. Cumulative: the primary sends one per topic
    /// for a batch of deliveries, not one per message.
    Clr {
        /// The topic.
        topic: String,
        /// The primary's delivered mark of it.
        upto: u64,
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
    /// `AUTH|hello|nonce`, `AUTH|challenge|nonce|proof`, `AUTH|proof|proof`: the handshake
    /// that makes a connection an authenticated peer link (see `core/auth.rs`).
    Auth(AuthStep),
    /// `GROUP|op|…`: consumer groups (see `protocol/group.rs`).
    Group(GroupOp),
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
    /// `TIME`: asks a node for its wall clock, answered [`Frame::Time`] (the harness measures
    /// each host's clock offset from it, NTP-style).
    TimeQuery,
    /// `TIME|received_us|sent_us`: the node's wall clock (µs since the Unix epoch) when the
    /// `TIME` was received and when this answer left.
    Time {
        /// When the question was received.
        received_us: u64,
        /// When the answer was sent.
        sent_us: u64,
    },
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

fn non_empty<'a>(s: &'a str, what: &'static str) -> Result<&'a str, ProtocolError> {
    if s.is_empty() {
        Err(ProtocolError::EmptyField(what))
    } else {
        Ok(s)
    }
}

/// A decimal `u64`. Up to 19 digits cannot overflow and are folded here (a `REPL` carries nine
/// numbers, and the standard parse was ~6 % of a backup's profile); anything else (signs,
/// 20 digits, garbage) goes through the standard parse, which also says what is wrong.
pub(crate) fn number(s: &str, what: &'static str) -> Result<u64, ProtocolError> {
    let b = s.as_bytes();
    if !b.is_empty() && b.len() <= 19 {
        // One pass: fold, and note whether every byte was a digit.
        let (mut n, mut ok) = (0u64, true);
        for d in b {
            let v = d.wrapping_sub(b'0');
            ok &= v < 10;
            n = n.wrapping_mul(10).wrapping_add(u64::from(v));
        }
        if ok {
            return Ok(n);
        }
    }
    s.parse().map_err(|_| ProtocolError::BadField(what))
}

/// `E@O,E@O…` of a `TAIL`: epochs with the offset each begins at, both rising.
fn epoch_starts(list: &str) -> Result<Vec<(u64, u64)>, ProtocolError> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for item in list.split(',') {
        let (e, o) = item
            .split_once('@')
            .ok_or(ProtocolError::BadField("epoch start"))?;
        let (e, o) = (number(e, "epoch")?, number(o, "epoch start")?);
        if out.last().is_some_and(|(pe, po)| e <= *pe || o <= *po) {
            return Err(ProtocolError::BadField("epoch starts (not rising)"));
        }
        out.push((e, o));
    }
    Ok(out)
}

/// Splits `line` into the verb and exactly `N` further fields, the last one taking the rest.
/// No allocation: this runs once per message on the relay path. The error is made only when
/// a field is missing (an `ok_or` per field built and dropped one for every field: ~2 % of a
/// backup's profile).
fn fields<'a, const N: usize>(
    line: &'a str,
    verb: &'static str,
) -> Result<[&'a str; N], ProtocolError> {
    let mut out = [""; N];
    let Some((_, mut rest)) = split_bar(line) else {
        return Err(ProtocolError::MissingFields(verb, N));
    };
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
        } else {
            let Some((f, r)) = split_bar(rest) else {
                return Err(ProtocolError::MissingFields(verb, N));
            };
            *slot = f;
            rest = r;
        }
    }
    Ok(out)
}

/// `s` split at its first `|`. `str::split_once` with a `char` decoded the line a character
/// at a time (~6 % of a relay's profile); see [`find_byte`]. `|` is ASCII, so both sides are
/// still whole UTF-8.
fn split_bar(s: &str) -> Option<(&str, &str)> {
    split_at_byte(s, b'|')
}

/// `s` split at the first `sep`, an ASCII byte (so both sides are whole UTF-8).
pub(crate) fn split_at_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = find_byte(s.as_bytes(), sep)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// Where `sep` first occurs in `b`, eight bytes at a time (the classic test for a zero byte in
/// a word, after an XOR that turns `sep` into zero). The fields searched are short (a `REPL`
/// has eight of 5–40 bytes before its payload, which is never searched): a SIMD search's call
/// costs more than it saves on them, and a byte loop inlined into `Frame::parse` took ~10 % of
/// a backup's profile.
#[inline]
pub(crate) fn find_byte(b: &[u8], sep: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(sep);
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for c in words.by_ref() {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w) ^ pattern;
        // The lowest byte flagged is exactly the first zero byte (a borrow only ever flags
        // bytes above a true zero, never below one).
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|x| *x == sep)
        .map(|i| at + i)
}

impl Frame {
    /// Parses one line (without its newline) into a frame.
    pub fn parse(line: &[u8]) -> Result<Frame, ProtocolError> {
        // simdutf8: the standard library's check was ~135 instructions of a 64-byte publish's
        // line, 4 % of the in-process relay path (`bench --only core` under callgrind).
        let line = simdutf8::basic::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return Err(ProtocolError::Empty);
        }
        let verb = split_bar(line).map_or(line, |(v, _)| v);
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
                        publisher: MsgId::publisher_of(non_empty(f[1], "publisher")?),
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
                let rest = fields::<1>(line, "SUB")?[0];
                let (topic, from) = match rest.split_once('|') {
                    Some((t, f)) => (t, Some(f.parse::<Start>()?)),
                    None => (rest, None),
                };
                Frame::Sub {
                    topic: s(non_empty(topic, "topic")?),
                    from,
                }
            }
            "HISTORY" => {
                let f = fields::<2>(line, "HISTORY")?;
                Frame::History {
                    topic: s(non_empty(f[0], "topic")?),
                    n: f[1].parse().map_err(|_| {
                        let v: String = f[1].chars().take(32).collect();
                        ProtocolError::BadValue(format!(
                            "bad HISTORY count '{v}': expected a number"
                        ))
                    })?,
                }
            }
            "REPLAYED" => {
                let f = fields::<2>(line, "REPLAYED")?;
                Frame::Replayed {
                    topic: s(non_empty(f[0], "topic")?),
                    next: number(f[1], "next")?,
                }
            }
            "MSG" => {
                let f = fields::<6>(line, "MSG")?;
                Frame::Msg {
                    topic: s(non_empty(f[0], "topic")?),
                    id: MsgId {
                        publisher: MsgId::publisher_of(non_empty(f[1], "publisher")?),
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
                let f = fields::<7>(line, "REPL")?;
                Frame::Repl {
                    mid: number(f[0], "mid")?,
                    topic: s(non_empty(f[1], "topic")?),
                    id: MsgId {
                        publisher: MsgId::publisher_of(non_empty(f[2], "publisher")?),
                        seq: number(f[3], "seq")?,
                    },
                    sent_us: number(f[4], "sent_us")?,
                    stamps: Stamps::parse(f[5])?,
                    payload: s(f[6]),
                }
            }
            "TAIL" if line == "TAIL" => Frame::TailEnd,
            "TAIL" => {
                let f = fields::<3>(line, "TAIL")?;
                let (epoch, epochs) = f[2].split_once('|').unwrap_or((f[2], ""));
                Frame::Tail {
                    topic: s(non_empty(f[0], "topic")?),
                    next: number(f[1], "next")?,
                    epoch: number(epoch, "epoch")?,
                    epochs: epoch_starts(epochs)?,
                }
            }
            "MARK" => {
                let f = fields::<3>(line, "MARK")?;
                Frame::Mark {
                    topic: s(non_empty(f[0], "topic")?),
                    upto: number(f[1], "upto")?,
                    next: number(f[2], "next")?,
                }
            }
            "STORED" => Frame::Stored {
                mid: number(fields::<1>(line, "STORED")?[0], "mid")?,
            },
            "CLR" => {
                let f = fields::<2>(line, "CLR")?;
                Frame::Clr {
                    topic: s(non_empty(f[0], "topic")?),
                    upto: number(f[1], "upto")?,
                }
            }
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
            "AUTH" => Frame::Auth(AuthStep::parse(fields::<1>(line, "AUTH")?[0])?),
            "GROUP" => Frame::Group(GroupOp::parse(fields::<1>(line, "GROUP")?[0])?),
            // The seed's backup writes `PING||`; anything after the verb is ignored.
            "PING" => Frame::Ping,
            "PONG" => Frame::Pong,
            "SETTLE" if line == "SETTLE" => Frame::Settle,
            "SETTLED" if line == "SETTLED" => Frame::Settled,
            "ACK" if line == "ACK" => Frame::Ack { id: None },
            "ACK" => {
                let f = fields::<2>(line, "ACK")?;
                Frame::Ack {
                    id: Some(MsgId {
                        publisher: MsgId::publisher_of(non_empty(f[0], "publisher")?),
                        seq: number(f[1], "seq")?,
                    }),
                }
            }
            "TIME" if line == "TIME" => Frame::TimeQuery,
            "TIME" => {
                let f = fields::<2>(line, "TIME")?;
                Frame::Time {
                    received_us: number(f[0], "received_us")?,
                    sent_us: number(f[1], "sent_us")?,
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
    /// The frames sent once per message or batch (`ACK`, `STORED`) are written without
    /// `core::fmt`, whose integer formatting was the largest single cost of the relay path.
    pub fn encode_into_bytes(&self, out: &mut impl BufMut) {
        match self {
            Frame::Ack { id } => write_ack(id.as_ref(), out),
            Frame::Stored { mid } => {
                out.put_slice(b"STORED|");
                push_u64(out, *mid);
                out.put_u8(b'\n');
            }
            _ => self.write_to(&mut ByteWriter(out)),
        }
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
            Frame::Sub { topic, from: None } => write!(out, "SUB|{topic}"),
            Frame::Sub {
                topic,
                from: Some(from),
            } => write!(out, "SUB|{topic}|{from}"),
            Frame::History { topic, n } => write!(out, "HISTORY|{topic}|{n}"),
            Frame::Replayed { topic, next } => write!(out, "REPLAYED|{topic}|{next}"),
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
                stamps,
                payload,
            } => write_repl_fields(out, *mid, topic, id, *sent_us, stamps, payload),
            Frame::Tail {
                topic,
                next,
                epoch,
                epochs,
            } => write!(out, "TAIL|{topic}|{next}|{epoch}").and_then(|()| {
                epochs.iter().enumerate().try_for_each(|(i, (e, o))| {
                    let sep = if i == 0 { '|' } else { ',' };
                    write!(out, "{sep}{e}@{o}")
                })
            }),
            Frame::TailEnd => write!(out, "TAIL"),
            Frame::Mark { topic, upto, next } => write!(out, "MARK|{topic}|{upto}|{next}"),
            Frame::Stored { mid } => write!(out, "STORED|{mid}"),
            Frame::Clr { topic, upto } => write!(out, "CLR|{topic}|{upto}"),
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
            Frame::Auth(step) => write!(out, "AUTH|{step}"),
            Frame::Group(op) => write!(out, "GROUP|{op}"),
            Frame::Ping => write!(out, "PING"),
            Frame::Pong => write!(out, "PONG"),
            Frame::Settle => write!(out, "SETTLE"),
            Frame::Settled => write!(out, "SETTLED"),
            Frame::Ack { id } => write_ack_fields(out, id.as_ref()),
            Frame::StatusQuery => write!(out, "STATUS"),
            Frame::TimeQuery => write!(out, "TIME"),
            Frame::Time {
                received_us,
                sent_us,
            } => write!(out, "TIME|{received_us}|{sent_us}"),
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
struct ByteWriter<'a, B: BufMut>(&'a mut B);

impl<B: BufMut> std::fmt::Write for ByteWriter<'_, B> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
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
    msg_line_into(&mut out, topic, id, sent_us, stamps, payload);
    out
}

/// Appends the `MSG` line of [`msg_line`] to `out`: a replay writes a whole chunk of them into
/// one buffer. The same bytes as [`Frame::encode`] of a [`Frame::Msg`], written without
/// `core::fmt` (its integer formatting was most of a replay's time).
pub fn msg_line_into(
    out: &mut impl BufMut,
    topic: &str,
    id: &MsgId,
    sent_us: u64,
    stamps: &Stamps,
    payload: &str,
) {
    out.put_slice(b"MSG|");
    push_origin(out, topic, id, sent_us);
    out.put_slice(b"e=");
    push_u64(out, stamps.epoch);
    out.put_slice(b",rx=");
    push_u64(out, stamps.received_us);
    out.put_slice(b",cs=");
    push_u64(out, stamps.compute_start_us);
    out.put_slice(b",ce=");
    push_u64(out, stamps.compute_end_us);
    out.put_slice(b",o=");
    push_u64(out, stamps.offset);
    push_payload(out, payload);
}

/// Appends `topic|publisher|seq|sent_us|`: the fields `MSG` and `REPL` share, in their order.
fn push_origin(out: &mut impl BufMut, topic: &str, id: &MsgId, sent_us: u64) {
    out.put_slice(topic.as_bytes());
    out.put_u8(b'|');
    out.put_slice(id.publisher.as_bytes());
    out.put_u8(b'|');
    push_u64(out, id.seq);
    out.put_u8(b'|');
    push_u64(out, sent_us);
    out.put_u8(b'|');
}

/// Appends `|payload` and the newline that end `MSG` and `REPL`.
fn push_payload(out: &mut impl BufMut, payload: &str) {
    out.put_u8(b'|');
    out.put_slice(payload.as_bytes());
    out.put_u8(b'\n');
}

/// Appends `v` in decimal (itoa: two digits per step from a table, where a division per
/// digit was ~5 % of the primary's profile with a backup, six numbers per `REPL`).
fn push_u64(out: &mut impl BufMut, v: u64) {
    out.put_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// The `REPL` line for one message, written from borrowed parts (no [`Frame`], no copies of the
/// topic and payload, no `core::fmt`): the primary writes one per accepted message. The same
/// bytes as [`Frame::encode`] of a [`Frame::Repl`].
pub fn repl_line(mid: u64, topic: &str, e: &crate::log::Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + e.id.publisher.len() + e.payload.len() + 96);
    repl_line_into(&mut out, mid, topic, e);
    out
}

/// Appends the line of [`repl_line`] to `out`.
pub fn repl_line_into(out: &mut impl BufMut, mid: u64, topic: &str, e: &crate::log::Entry) {
    out.put_slice(b"REPL|");
    push_u64(out, mid);
    out.put_u8(b'|');
    push_origin(out, topic, &e.id, e.sent_us);
    out.put_slice(b"o=");
    push_u64(out, e.offset);
    out.put_slice(b",e=");
    push_u64(out, e.epoch);
    out.put_slice(b",rx=");
    push_u64(out, e.received_us);
    push_payload(out, &e.payload);
}

/// The fields of a `REPL` frame, for [`Frame::encode`] ([`repl_line`] writes the same bytes).
fn write_repl_fields<W: std::fmt::Write>(
    out: &mut W,
    mid: u64,
    topic: &str,
    id: &MsgId,
    sent_us: u64,
    stamps: &Stamps,
    payload: &str,
) -> std::fmt::Result {
    write!(
        out,
        "REPL|{mid}|{topic}|{}|{}|{sent_us}|o={},e={},rx={}|{payload}",
        id.publisher, id.seq, stamps.offset, stamps.epoch, stamps.received_us
    )
}

/// An `ACK` frame without its newline, for [`Frame::encode`] ([`write_ack`] writes the same bytes).
fn write_ack_fields<W: std::fmt::Write>(out: &mut W, id: Option<&MsgId>) -> std::fmt::Result {
    match id {
        Some(id) => write!(out, "ACK|{}|{}", id.publisher, id.seq),
        None => write!(out, "ACK"),
    }
}

/// Appends the `ACK` for a publish (`ACK|publisher|seq`, or the seed's bare `ACK` when it came
/// without an identity) to a write buffer, without `core::fmt`.
pub fn write_ack(id: Option<&MsgId>, out: &mut impl BufMut) {
    out.put_slice(b"ACK");
    if let Some(id) = id {
        out.put_u8(b'|');
        out.put_slice(id.publisher.as_bytes());
        out.put_u8(b'|');
        push_u64(out, id.seq);
    }
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time search finds what a byte loop finds: every length across a word's
    /// edges, the separator anywhere (or twice, or nowhere), among bytes next to it in value
    /// and bytes with the high bit set (where a careless zero-byte test flags wrongly).
    #[test]
    fn find_byte_agrees_with_a_byte_loop() {
        let fill = [b'{', b'}', 0x80, 0xfc, 0xfd, 0xff, 0x00, b'a', b'|' + 0x80];
        for len in 0..40usize {
            for first in (0..len).map(Some).chain([None]) {
                for k in 0..fill.len() {
                    let mut b: Vec<u8> = (0..len).map(|i| fill[(i + k) % fill.len()]).collect();
                    if let Some(f) = first {
                        b[f] = b'|';
                        if f + 3 < len {
                            b[f + 3] = b'|';
                        }
                    }
                    let want = b.iter().position(|x| *x == b'|');
                    assert_eq!(find_byte(&b, b'|'), want, "{b:?}");
                }
            }
        }
    }

    /// The folded fast path and the standard parse agree, on the edges of both.
    #[test]
    fn numbers_parse_as_the_standard_parse_does() {
        for s in [
            "0",
            "7",
            "0042",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "+5",
            "-5",
            "",
            "12a",
            " 1",
            "١٢",
        ] {
            assert_eq!(number(s, "n").ok(), s.parse::<u64>().ok(), "{s:?}");
        }
        assert_eq!(
            Stamps::parse("e=2,rx=10,,o=41").ok(),
            Some(Stamps {
                epoch: 2,
                received_us: 10,
                offset: 41,
                ..Stamps::default()
            })
        );
        assert!(Stamps::parse("e2").is_err());
        assert!(Stamps::parse("e=x").is_err());
    }

    /// The one-pass stamps parser agrees with cutting at `,` and `=` and parsing each number
    /// with the standard library, on well-formed and broken fields alike.
    #[test]
    fn stamps_parse_as_cut_and_parsed_pairs_would() {
        fn model(s: &str) -> Option<Stamps> {
            let mut st = Stamps::default();
            for pair in s.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=')?;
                let v: u64 = v.parse().ok()?;
                match k {
                    "e" => st.epoch = v,
                    "rx" => st.received_us = v,
                    "cs" => st.compute_start_us = v,
                    "ce" => st.compute_end_us = v,
                    "o" => st.offset = v,
                    _ => {}
                }
            }
            Some(st)
        }
        for s in [
            "",
            ",",
            ",,",
            "o=1,e=2,rx=1735689600000000",
            "e=1,rx=2,cs=3,ce=4,o=5",
            "o=18446744073709551615,e=0",
            "o=18446744073709551616",
            "o=99999999999999999999",
            "o=",
            "=5",
            "o=5,",
            ",o=5",
            "o=5,,e=6",
            "o",
            "o=5,e",
            "o=1=2",
            "o=+1",
            "o=-1",
            "o=١",
            "x=ü,o=3",
            "zz=7,o=3",
            "o=0042",
            "o=1,e=2,rx=3",
            "o=0,e=0,rx=0",
            "o=9999999999999999999,e=1,rx=9999999999999999999",
            "o=18446744073709551615,e=1,rx=2",
            "o=1,e=18446744073709551616,rx=2",
            "o=,e=1,rx=2",
            "o=1,e=,rx=2",
            "o=1,e=2,rx=",
            "o=1,e=2,rx=3,",
            "o=1,e=2,rx=3,cs=4",
            "o=1,e=2,rx=3x",
            "o=1,e=2,rx=+3",
            "o=1;e=2,rx=3",
            "o=1,e=2,rx=3=4",
            "o=1,rx=2,e=3",
        ] {
            assert_eq!(Stamps::parse(s).ok(), model(s), "{s:?}");
        }
    }

    /// The byte encoders written without `core::fmt` give exactly what the frame's own
    /// encoding (through `core::fmt`) gives.
    #[test]
    fn byte_encoders_match_the_frames_encoding() {
        for (mid, seq, sent, offset, epoch, rx, payload) in [
            (0, 0, 0, 0, 0, 0, ""),
            (
                1,
                7,
                1_700_000_000_000_123,
                42,
                3,
                1_700_000_000_000_456,
                "a|b",
            ),
            (
                u64::MAX,
                u64::MAX,
                u64::MAX,
                u64::MAX,
                u64::MAX,
                u64::MAX,
                "ünïcödé",
            ),
        ] {
            let id = MsgId {
                publisher: "pub-1".into(),
                seq,
            };
            let e = crate::log::Entry {
                offset,
                epoch,
                id: id.clone(),
                sent_us: sent,
                received_us: rx,
                payload: payload.into(),
            };
            let frame = Frame::Repl {
                mid,
                topic: "t/x".into(),
                id: id.clone(),
                sent_us: sent,
                stamps: Stamps {
                    offset,
                    epoch,
                    received_us: rx,
                    ..Stamps::default()
                },
                payload: payload.into(),
            };
            let line = repl_line(mid, "t/x", &e);
            assert_eq!(String::from_utf8(line).ok(), Some(frame.encode()));
            for f in [
                Frame::Ack {
                    id: Some(id.clone()),
                },
                Frame::Ack { id: None },
                Frame::Stored { mid },
                frame,
            ] {
                let mut bytes = Vec::new();
                f.encode_into_bytes(&mut bytes);
                assert_eq!(String::from_utf8(bytes).ok(), Some(f.encode()));
            }
        }
    }

    #[test]
    fn msg_line_is_the_frames_encoding() {
        for (seq, sent, st, payload) in [
            (0, 0, Stamps::default(), ""),
            (
                1,
                1_700_000_000_000_123,
                Stamps {
                    epoch: 7,
                    received_us: 1_700_000_000_000_456,
                    compute_start_us: 9,
                    compute_end_us: 10,
                    offset: 999_999,
                },
                "hello|with|bars",
            ),
            (
                u64::MAX,
                u64::MAX,
                Stamps {
                    epoch: u64::MAX,
                    received_us: 10,
                    compute_start_us: 100,
                    compute_end_us: 1000,
                    offset: u64::MAX - 1,
                },
                "ünïcödé",
            ),
        ] {
            let id = MsgId {
                publisher: "pub-1".into(),
                seq,
            };
            let frame = Frame::Msg {
                topic: "t/x".into(),
                id: id.clone(),
                sent_us: sent,
                stamps: st,
                payload: payload.into(),
            };
            let line = msg_line("t/x", &id, sent, &st, payload);
            assert_eq!(String::from_utf8(line).ok(), Some(frame.encode()));
        }
    }
}
