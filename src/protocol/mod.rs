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
//! * the **identified dialect** (`PUB`, `SUB`, `MSG`, `REPL`, `STORED`, `CLR`, `HELLO`, and for
//!   reading a topic's past `SUB|topic|from`, `HISTORY`, `REPLAYED`), which
//!   carries a stable message identity (publisher id + per-publisher sequence) and the send time,
//!   so that two messages with the same payload stay two messages, duplicates can be spotted and
//!   latency measured. A peer opts in simply by sending the new verbs; a seed peer never sees them.
//!
//! The payload is always the last field and may itself contain `|`; it may not contain a newline,
//! which ends the frame. Frames are capped at [`MAX_FRAME`] bytes including the newline.

mod codec;
mod frame;
mod group;

use std::borrow::Cow;

use thiserror::Error;

pub use codec::{FrameCodec, LenientCodec};
pub use frame::{msg_line, msg_line_into, repl_line, repl_line_into, write_ack, Frame};
pub use group::{
    check_name, GroupInfo, GroupOp, GroupOptions, GroupStart, ACK_UNCONFIRMED, MAX_ACK_WAIT_MS,
    MAX_DELIVER, MAX_IN_FLIGHT,
};

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
    /// Publisher id: unique per publisher process (see `client::new_publisher_id`). Borrowed
    /// for [`ANONYMOUS`]: a seed-dialect publish then allocates no identity of its own.
    pub publisher: Cow<'static, str>,
    /// Position in the publisher's sequence, starting at 1; 0 for anonymous messages.
    pub seq: u64,
}

impl MsgId {
    /// The identity given to a seed-dialect message, which has none of its own.
    pub fn anonymous() -> Self {
        MsgId {
            publisher: Cow::Borrowed(ANONYMOUS),
            seq: 0,
        }
    }

    /// A publisher id read from the wire or a log: [`ANONYMOUS`] borrowed, any other copied.
    pub fn publisher_of(s: &str) -> Cow<'static, str> {
        if s == ANONYMOUS {
            Cow::Borrowed(ANONYMOUS)
        } else {
            Cow::Owned(s.to_string())
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
    /// The entry's offset in its topic's log (`o`): a subscriber that reconnects resumes after
    /// the last one it got.
    pub offset: u64,
}

impl Stamps {
    fn encode<W: std::fmt::Write>(&self, out: &mut W) {
        let _ = write!(
            out,
            "e={},rx={},cs={},ce={},o={}",
            self.epoch, self.received_us, self.compute_start_us, self.compute_end_us, self.offset
        );
    }

    fn parse(s: &str) -> Result<Self, ProtocolError> {
        if let Some(st) = Self::parse_repl_layout(s.as_bytes()) {
            return Ok(st);
        }
        let bad = || ProtocolError::BadField("stamps");
        let mut st = Stamps::default();
        // Cut at `,` and `=` with a plain byte search, as the frame's fields are (both ASCII,
        // so every piece is whole UTF-8).
        let mut rest = s;
        while !rest.is_empty() {
            let (pair, tail) = frame::split_at_byte(rest, b',').unwrap_or((rest, ""));
            rest = tail;
            if pair.is_empty() {
                continue;
            }
            let (k, v) = frame::split_at_byte(pair, b'=').ok_or_else(bad)?;
            let v = frame::number(v, "stamps")?;
            match k {
                "e" => st.epoch = v,
                "rx" => st.received_us = v,
                "cs" => st.compute_start_us = v,
                "ce" => st.compute_end_us = v,
                "o" => st.offset = v,
                _ => {}
            }
        }
        Ok(st)
    }

    /// The stamps exactly as a `REPL` carries them (`o=…,e=…,rx=…`, each of 1–19 digits), read
    /// in one pass with the digits folded as they come; anything else is `None` and goes
    /// through the general parse. A backup parses one per message: cutting the field at `,`
    /// and `=` and then parsing each number cost ~590 instructions a frame, this ~200.
    fn parse_repl_layout(b: &[u8]) -> Option<Stamps> {
        let b = b.strip_prefix(b"o=")?;
        let (offset, b) = digits_then(b, Some(b','))?;
        let b = b.strip_prefix(b"e=")?;
        let (epoch, b) = digits_then(b, Some(b','))?;
        let b = b.strip_prefix(b"rx=")?;
        let (received_us, _) = digits_then(b, None)?;
        Some(Stamps {
            epoch,
            received_us,
            offset,
            ..Stamps::default()
        })
    }
}

/// A decimal number of 1–19 digits at the start of `b`, ended by `end` (which is skipped) or,
/// for `None`, by the end of `b`: the number and what follows.
fn digits_then(b: &[u8], end: Option<u8>) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    for (i, &c) in b.iter().enumerate() {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            let whole = (1..=19).contains(&i) && Some(c) == end;
            return whole.then(|| (n, b.get(i + 1..).unwrap_or_default()));
        }
        // At most 19 digits are kept (checked when the number ends): no overflow.
        n = n.wrapping_mul(10).wrapping_add(u64::from(d));
    }
    (end.is_none() && (1..=19).contains(&b.len())).then_some((n, &[][..]))
}

/// Where a `SUB|topic|from` starts reading the topic's log (the `from` field).
///
/// Wire forms: `new` (nothing old: live from the delivered mark on, but with the
/// `REPLAYED` marker telling that offset), a decimal offset, `last:N` (the last `N` delivered
/// entries), `time:µs` (the first entry the broker received at or after that wall-clock time,
/// µs since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `new`.
    New,
    /// A decimal offset.
    Offset(u64),
    /// `last:N`.
    Last(u64),
    /// `time:µs`.
    Time(u64),
    /// `N@E`: a resume. The subscriber has every entry below offset `next`, the last of them
    /// delivered in epoch `epoch` (an entry's epoch is never above the epoch it is delivered
    /// in). The node starts at `next` unless its own entries below `next` were written in a
    /// newer reign: those are not what the subscriber got, and it starts at the first of them.
    Resume {
        /// The offset after the last entry the subscriber has.
        next: u64,
        /// The epoch that entry was delivered in.
        epoch: u64,
    },
}

/// One step of the peer handshake (`AUTH|…`), hex fields. The node that opens a peer link
/// offers a fresh nonce; the node it reached answers with its own nonce and its proof over
/// both; the opener answers with its proof. See `core/auth.rs` for why it is built this way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// `AUTH|hello|NONCE`: the opener's nonce.
    Hello {
        /// Fresh random bytes.
        nonce: Vec<u8>,
    },
    /// `AUTH|challenge|NONCE|PROOF`: the answering node's nonce and its proof.
    Challenge {
        /// Fresh random bytes.
        nonce: Vec<u8>,
        /// HMAC over both nonces, under the shared secret.
        proof: Vec<u8>,
    },
    /// `AUTH|proof|PROOF`: the opener's proof.
    Proof {
        /// HMAC over both nonces, under the shared secret.
        proof: Vec<u8>,
    },
}

/// Longest hex field of an `AUTH` frame (bytes once decoded): nonces and SHA-256 proofs are 32.
const AUTH_FIELD_MAX: usize = 64;

impl AuthStep {
    fn parse(s: &str) -> Result<Self, ProtocolError> {
        let hex_field = |v: &str, what: &'static str| -> Result<Vec<u8>, ProtocolError> {
            match hex::decode(v) {
                Ok(b) if !b.is_empty() && b.len() <= AUTH_FIELD_MAX => Ok(b),
                _ => Err(ProtocolError::BadField(what)),
            }
        };
        let mut parts = s.split('|');
        let step = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        match (step, rest.as_slice()) {
            ("hello", [n]) => Ok(AuthStep::Hello {
                nonce: hex_field(n, "AUTH nonce")?,
            }),
            ("challenge", [n, p]) => Ok(AuthStep::Challenge {
                nonce: hex_field(n, "AUTH nonce")?,
                proof: hex_field(p, "AUTH proof")?,
            }),
            ("proof", [p]) => Ok(AuthStep::Proof {
                proof: hex_field(p, "AUTH proof")?,
            }),
            _ => Err(ProtocolError::BadValue(
                "bad AUTH: expected AUTH|hello|NONCE, AUTH|challenge|NONCE|PROOF or AUTH|proof|PROOF"
                    .into(),
            )),
        }
    }
}

impl std::fmt::Display for AuthStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthStep::Hello { nonce } => write!(f, "hello|{}", hex::encode(nonce)),
            AuthStep::Challenge { nonce, proof } => {
                write!(f, "challenge|{}|{}", hex::encode(nonce), hex::encode(proof))
            }
            AuthStep::Proof { proof } => write!(f, "proof|{}", hex::encode(proof)),
        }
    }
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::New => f.write_str("new"),
            Start::Offset(o) => write!(f, "{o}"),
            Start::Last(n) => write!(f, "last:{n}"),
            Start::Time(t) => write!(f, "time:{t}"),
            Start::Resume { next, epoch } => write!(f, "{next}@{epoch}"),
        }
    }
}

impl std::str::FromStr for Start {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        let num = |v: &str| v.parse::<u64>().ok();
        let got = match s.split_once(':') {
            None if s == "new" => Some(Start::New),
            None => match s.split_once('@') {
                Some((n, e)) => num(n)
                    .zip(num(e))
                    .map(|(next, epoch)| Start::Resume { next, epoch }),
                None => num(s).map(Start::Offset),
            },
            Some(("last", n)) => num(n).map(Start::Last),
            Some(("time", t)) => num(t).map(Start::Time),
            Some(_) => None,
        };
        got.ok_or_else(|| {
            let mut v: String = s.chars().take(32).collect();
            if s.len() > v.len() {
                v.push('…');
            }
            ProtocolError::BadValue(format!(
                "bad SUB start '{v}': expected new, an offset, last:N, time:<µs since the epoch> or <offset>@<epoch>"
            ))
        })
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
    /// The start of a `SUB` or the count of a `HISTORY` does not parse; says what was wrong.
    #[error("{0}")]
    BadValue(String),
    /// A frame was begun and not finished in time (a slow drip of bytes). Fatal.
    #[error("no complete frame within {0:?}: closing")]
    FrameTimeout(std::time::Duration),
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
            ProtocolError::TooLong
                | ProtocolError::Incomplete
                | ProtocolError::FrameTimeout(_)
                | ProtocolError::Io(_)
        )
    }
}
