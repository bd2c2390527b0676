//! Connections as the core keeps them: what each one is for, and its queue of answers that
//! must leave in the order their questions came.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::peer::Purpose;
use super::{Broker, ConnId, Output};
use crate::protocol::{Frame, ACK_UNCONFIRMED};

/// Where the lines the core hands to the driver are cut from: each is encoded straight into
/// one large block, and the [`Bytes`] handed out share that block (a reference count, no
/// allocation per line; a new block when one is nearly full). A line per message went to the
/// allocator twice (its buffer and the `Bytes` header around it), several times per message;
/// and encoding into a scratch buffer first copied every line once more (~4 % of a replicating
/// primary's profile).
#[derive(Debug, Default)]
pub(super) struct LineArena {
    block: bytes::BytesMut,
}

/// Size of each block the lines are cut from.
const ARENA_BLOCK: usize = 64 * 1024;

/// Room a block must still have for a line to be begun in it; a line that turns out longer
/// than the room left is moved to a buffer of its own as it grows (`BytesMut` does that),
/// which only the rare long line pays.
const ARENA_ROOM: usize = 2048;

impl LineArena {
    /// A line written by `write`.
    pub(super) fn line(&mut self, write: impl FnOnce(&mut bytes::BytesMut)) -> Bytes {
        write(self.open());
        self.cut()
    }

    /// Where to write the next line (or several to go as one): the block, with room for it.
    pub(super) fn open(&mut self) -> &mut bytes::BytesMut {
        if self.block.capacity() - self.block.len() < ARENA_ROOM {
            // The lines cut from the old block keep it alive until they are written.
            self.block = bytes::BytesMut::with_capacity(ARENA_BLOCK);
        }
        &mut self.block
    }

    /// What was written since [`LineArena::open`], as one line.
    pub(super) fn cut(&mut self) -> Bytes {
        self.block.split().freeze()
    }

    /// `parts` one after the other as a line cut from the block (a seed subscriber's payload
    /// and its newline).
    pub(super) fn join(&mut self, parts: &[&[u8]]) -> Bytes {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > ARENA_BLOCK / 4 {
            // Big lines (a chunk of a replay, a long payload) get their own buffer.
            return Bytes::from(parts.concat());
        }
        self.line(|b| {
            for p in parts {
                b.extend_from_slice(p);
            }
        })
    }
}
/// What a connection is.
#[derive(Debug)]
pub(super) enum Kind {
    /// Accepted from a client (publisher, subscriber, harness, a peer's probe).
    Client,
    /// Accepted, and the primary's replication link into this backup: when it closes, the
    /// backup probes its primary at once.
    InLink,
    /// Opened by this node to its peer, for `Purpose`.
    Out(Purpose),
}

/// A line that did not parse, kept to be answered in its turn.
#[derive(Debug)]
pub(super) struct Bad {
    pub reason: String,
    pub fatal: bool,
}

/// One answer owed to a client, in the order of the questions.
#[derive(Debug)]
pub(super) enum Reply {
    /// Ready to go.
    Ready(Bytes),
    /// An `ACK` line (`ACK|publisher|seq`, or the seed's bare `ACK`), encoded when the publish
    /// was accepted, that waits until the backup has stored message `wait`.
    Ack { wait: u64, line: Bytes },
    /// The answer to a publish this backup is forwarding to its primary.
    Forward,
}

/// A connection of the node.
#[derive(Debug)]
pub(super) struct Conn {
    pub kind: Kind,
    /// Answers still owed, oldest first; empty when nothing waits.
    pub replies: VecDeque<Reply>,
    /// A publish is being forwarded: later frames wait in `backlog`, so a connection's frames
    /// are handled one after the other, as they came.
    pub busy: bool,
    pub backlog: VecDeque<Result<Frame, Bad>>,
    /// We asked not to be given more of this connection's frames (see [`super::BACKLOG_HOLD`]).
    pub held: bool,
    /// The client closed while busy: forgotten once its backlog is handled.
    pub hung_up: bool,
    /// Topics this connection subscribed to, to unregister it when it closes.
    pub topics: Vec<String>,
    /// Consumer groups it is a member of (topic, group).
    pub groups: Vec<(String, String)>,
    /// Where its peer handshake is (`auth.rs`).
    pub auth: super::auth::Auth,
    /// It has `--max-unacked` publishes awaiting their `ACK`: later frames wait in `backlog`
    /// and the connection is not read (`limits.rs`).
    pub full: bool,
    /// Accepted over TLS with a client certificate signed by the CA.
    pub client_cert: bool,
    /// `ACK`s in `replies` that wait for the backup or the disk (`--max-unacked`).
    pub acks_waiting: usize,
}

impl Conn {
    pub fn new(kind: Kind) -> Conn {
        Conn {
            kind,
            replies: VecDeque::new(),
            busy: false,
            backlog: VecDeque::new(),
            held: false,
            hung_up: false,
            topics: Vec::new(),
            auth: super::auth::Auth::None,
            full: false,
            client_cert: false,
            acks_waiting: 0,
            groups: Vec::new(),
        }
    }
}

impl Broker {
    /// Answers `conn` with a line already encoded, in its turn (see [`Broker::reply`]).
    pub(super) fn reply_line(&mut self, conn: ConnId, line: Bytes) {
        match self.conns.get(&conn) {
            // Nothing waits ahead of it (the common case): straight out, no queue.
            Some(c) if c.replies.is_empty() => self.out.push_back(Output::Send {
                conn,
                line,
                delivery: false,
            }),
            Some(_) => self.push_reply(conn, Reply::Ready(line)),
            None => {}
        }
    }

    /// Answers a client, behind any answer it is still owed.
    pub(super) fn reply(&mut self, conn: ConnId, frame: Frame) {
        if self.conns.contains_key(&conn) {
            let line = self.lines.line(|b| frame.encode_into_bytes(b));
            self.reply_line(conn, line);
        }
    }

    /// Queues an answer and sends whatever is ready at the head of the queue.
    pub(super) fn push_reply(&mut self, conn: ConnId, r: Reply) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.replies.push_back(r);
            self.flush_replies(conn, None, None);
        }
    }

    /// Sends, as one write, the answers at the head of `conn`'s queue that are ready, counting
    /// an `ACK` as ready when it waits for at most `stored` (`instead`: answer with that frame
    /// rather than the `ACK`). `ACK`s of one connection wait for ever higher `mid`s, so the
    /// first one that must wait holds back everything behind it.
    pub(super) fn flush_replies(
        &mut self,
        conn: ConnId,
        stored: Option<u64>,
        instead: Option<&Frame>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // Written straight into the line block, all of them one line to hand over.
        let buf = self.lines.open();
        let mut acked = 0;
        while let Some(r) = c.replies.front() {
            match r {
                Reply::Ready(line) => buf.extend_from_slice(line),
                Reply::Ack { wait, line } if stored.is_some_and(|s| *wait <= s) => {
                    c.acks_waiting = c.acks_waiting.saturating_sub(1);
                    match instead {
                        // A member's ack may have reached the other node, which then has the
                        // entry done: that is no refusal to act on, but an ack unconfirmed.
                        Some(Frame::Err { reason }) if line.starts_with(b"GROUP|acked|") => {
                            Frame::Err {
                                reason: format!("{ACK_UNCONFIRMED}: {reason}"),
                            }
                            .encode_into_bytes(buf)
                        }
                        Some(f) => f.encode_into_bytes(buf),
                        None => {
                            acked += 1;
                            buf.extend_from_slice(line);
                        }
                    }
                }
                _ => break,
            }
            c.replies.pop_front();
        }
        let drained = c.replies.is_empty();
        let full = c.full;
        self.counters.acknowledged += acked;
        if !buf.is_empty() {
            let line = self.lines.cut();
            self.out.push_back(Output::Send {
                conn,
                line,
                delivery: false,
            });
        }
        if full {
            self.uncount_unacked(conn);
        }
        if drained && self.replays.active(conn) {
            // A replay waited for these answers to go first.
            self.pump_replay(conn);
        }
    }

    /// Sends a frame on a connection to the peer.
    pub(super) fn send_frame(&mut self, conn: ConnId, frame: &Frame) {
        self.out.push_back(Output::Send {
            conn,
            line: self.lines.line(|b| frame.encode_into_bytes(b)),
            delivery: false,
        });
    }

    /// Asks the caller for a connection to `addr`, for `purpose`.
    pub(super) fn open(&mut self, purpose: Purpose, addr: String, timeout: Duration) -> ConnId {
        let conn = self.new_conn_id();
        self.conns.insert(conn, Conn::new(Kind::Out(purpose)));
        self.out.push_back(Output::Connect {
            conn,
            addr,
            timeout,
        });
        conn
    }

    /// Closes `conn` and forgets it; returns what it was.
    pub(super) fn close(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.forget(conn)?;
        self.out.push_back(Output::Close { conn });
        Some(c)
    }

    /// Forgets `conn` (closed by the other side, or about to be closed): unregisters its
    /// subscriptions and stops its answer timer.
    pub(super) fn forget(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        self.replays.forget(conn);
        self.take_up_answered(conn);
        for topic in &c.topics {
            if let Some(subs) = self.topics.get_mut(topic) {
                subs.retain(|s| s.conn != conn);
                if subs.is_empty() {
                    self.topics.remove(topic);
                }
            }
        }
        self.timers.stop(super::time::Timer::Answer(conn));
        if !c.groups.is_empty() {
            self.groups_forget(conn, &c.groups);
        }
        Some(c)
    }

    /// The forwarded publish of `conn` has its answer: send it and handle what came meanwhile.
    pub(super) fn finish_forward(&mut self, conn: ConnId, answer: Frame) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(slot) = c.replies.iter_mut().find(|r| matches!(r, Reply::Forward)) {
            *slot = Reply::Ready(answer.encode().into_bytes().into());
        }
        self.flush_replies(conn, None, None);
        self.resume(conn);
    }

    /// Keeps a frame (or a bad line) of a busy connection for its turn; past
    /// [`super::BACKLOG_HOLD`] of them, asks the caller to stop reading the connection.
    pub(super) fn hold_back(&mut self, conn: ConnId, item: Result<Frame, Bad>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.backlog.push_back(item);
        if c.backlog.len() >= super::BACKLOG_HOLD && !c.held {
            c.held = true;
            self.out.push_back(Output::Hold { conn, held: true });
        }
    }

    /// `conn` is no longer busy: handle the frames that waited, until one makes it busy again.
    pub(super) fn resume(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.busy = false;
        }
        while let Some(c) = self.conns.get_mut(&conn) {
            if c.busy || c.full {
                return;
            }
            let Some(item) = c.backlog.pop_front() else {
                break;
            };
            match item {
                Ok(f) => self.dispatch(conn, f),
                Err(bad) => self.on_bad(conn, bad),
            }
        }
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.held) {
            c.held = false;
            self.out.push_back(Output::Hold { conn, held: false });
        }
        if self.conns.get(&conn).is_some_and(|c| c.hung_up) {
            self.closed(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines cut from the arena keep their bytes whatever comes after them: more lines in the
    /// same block, a new block, a line too big for a block.
    #[test]
    fn arena_lines_keep_their_bytes() {
        let mut a = LineArena::default();
        let mut kept = Vec::new();
        for i in 0..5_000u64 {
            let text = format!("LINE|{i}|{}\n", "x".repeat((i % 97) as usize));
            let line = a.line(|b| b.extend_from_slice(text.as_bytes()));
            kept.push((text, line));
        }
        // Lines longer than the room a block keeps for one, written in place: each outgrows
        // what was left of its block and moves, and the lines after it are cut as before.
        for i in 0..200u64 {
            let text = format!(
                "LONG|{i}|{}\n",
                "z".repeat(ARENA_ROOM + (i as usize * 331) % 5000)
            );
            kept.push((
                text.clone(),
                a.line(|b| b.extend_from_slice(text.as_bytes())),
            ));
            let short = format!("S|{i}\n");
            kept.push((
                short.clone(),
                a.line(|b| b.extend_from_slice(short.as_bytes())),
            ));
        }
        let big = "y".repeat(ARENA_BLOCK);
        kept.push((big.clone(), a.join(&[big.as_bytes()])));
        for (text, line) in &kept {
            assert_eq!(&line[..], text.as_bytes());
        }
    }
}
