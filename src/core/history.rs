//! Reading a topic's past: `SUB|topic|from` (replay, then live) and `HISTORY|topic|N`.
//!
//! A replay sends the topic's *delivered* entries (below the log's delivered mark) as `MSG`
//! frames, [`REPLAY_CHUNK`] of them per write, then `REPLAYED|topic|next`. The next chunk goes
//! only once the caller says the connection's writer has drained ([`Output::Writable`],
//! [`Broker::handle_writable`]), so replaying a log of millions of entries keeps at most a
//! chunk or two in memory and never fills the subscriber's queue.
//!
//! No gap, no duplicate between replay and live: while a `SUB` replays, live deliveries of its
//! topic skip it; the replay chases the delivered mark, and when it has caught up with it (in
//! the same event, so nothing is delivered in between) the subscriber turns live: every entry
//! below the mark came from the replay, every one from it on comes live.
//!
//! A start older than the oldest kept entry (retention dropped it) is answered
//! `ERR|offset N is before the oldest kept entry M` and the replay starts at `M`: the
//! subscription stands, the client learns of the gap. A start past the delivered mark
//! (a subscriber resuming after what this node has delivered so far) replays nothing, and live
//! deliveries below it are skipped for this subscriber; past the end of the log it is taken
//! as the end of the log, so an entry this node has not seen yet is never skipped.

use foldhash::HashMap;
use std::collections::VecDeque;

use bytes::Bytes;
use tracing::{info, warn};

use super::{Broker, ConnId, Output, Sub};
use crate::protocol::{Frame, Role, Stamps, Start};

/// Entries per write of a replay.
pub const REPLAY_CHUNK: usize = 1024;

/// One replay owed to a connection.
#[derive(Debug)]
struct Replay {
    topic: String,
    /// The next offset to send.
    next: u64,
    /// `HISTORY`: stop below this offset. `None` (a `SUB`): stop at the delivered mark as it is
    /// when the replay catches up with it, then turn live.
    end: Option<u64>,
}

/// The replays of one connection, done one after the other.
#[derive(Debug, Default)]
struct ConnReplays {
    queue: VecDeque<Replay>,
    /// A chunk was sent and [`Output::Writable`] asked: wait for [`Broker::handle_writable`].
    waiting: bool,
}

/// Every connection's replays.
#[derive(Debug, Default)]
pub(super) struct Replays {
    by_conn: HashMap<ConnId, ConnReplays>,
}

impl Replays {
    /// Forgets a connection's replays (it closed).
    pub fn forget(&mut self, conn: ConnId) {
        self.by_conn.remove(&conn);
    }

    /// True if `conn` has a replay going.
    pub fn active(&self, conn: ConnId) -> bool {
        self.by_conn.contains_key(&conn)
    }
}

impl Broker {
    /// `SUB|topic|from`: subscribes `conn`, replaying from `from` first.
    pub(super) fn subscribe_from(&mut self, conn: ConnId, topic: String, from: Start) {
        let start = self.resolve_start(conn, &topic, from);
        info!("subscriber {conn} on '{topic}' from {from} (offset {start})");
        if let Some(c) = self.conns.get_mut(&conn) {
            c.topics.push(topic.clone());
        }
        // A backup answers a resume without a replay: what it would send (entries below its
        // delivered mark, which follows the primary's `CLR`s) the primary has delivered, and
        // the subscriber gets it there; sent from here too it raced the primary's live
        // deliveries to the subscriber (duplicates). Held entries past the start still go at a
        // takeover.
        let replay_from = match from {
            Start::Resume { .. } if self.role() == Role::Backup => {
                start.max(self.log.topic(&topic).delivered)
            }
            _ => start,
        };
        self.topics.get_or_default(&topic).push(Sub {
            conn,
            legacy: false,
            replaying: true,
            from: start,
        });
        self.queue_replay(
            conn,
            Replay {
                topic,
                next: replay_from,
                end: None,
            },
        );
    }

    /// `HISTORY|topic|N`: the last `n` delivered entries, then `REPLAYED`; no subscription.
    pub(super) fn history(&mut self, conn: ConnId, topic: String, n: u64) {
        let st = self.log.topic(&topic);
        let end = st.delivered.max(st.first);
        let next = end.saturating_sub(n).max(st.first);
        self.queue_replay(
            conn,
            Replay {
                topic,
                next,
                end: Some(end),
            },
        );
    }

    /// The caller has written out what was queued for `conn` (see [`Output::Writable`]): the
    /// next chunk of its replay may go.
    pub fn handle_writable(&mut self, conn: ConnId, now: super::Now) {
        self.now = now;
        if let Some(r) = self.replays.by_conn.get_mut(&conn) {
            r.waiting = false;
        }
        self.take_up_answered(conn);
        self.catch_up_written(conn);
        self.pump_replay(conn);
    }

    /// Where a `SUB` with `from` starts, as an offset of the topic's log.
    pub(super) fn resolve_start(&mut self, conn: ConnId, topic: &str, from: Start) -> u64 {
        let st = self.log.topic(topic);
        let mark = st.delivered.max(st.first);
        match from {
            Start::New => mark,
            Start::Last(n) => mark.saturating_sub(n).max(st.first),
            Start::Offset(o) | Start::Resume { next: o, .. } if o < st.first => {
                let reason = format!(
                    "offset {o} is before the oldest kept entry {}; starting there",
                    st.first
                );
                self.reply(conn, Frame::Err { reason });
                st.first
            }
            Start::Offset(o) => o.min(st.next.max(mark)),
            Start::Resume { next, epoch } => {
                let end = st.next.max(mark);
                if next > end && !self.log.is_durable() {
                    // A log in memory that is behind the subscriber most likely started empty
                    // again (a restart): its offsets name other entries now, and an epoch does
                    // not tell (it starts over too). All of it, then: duplicates, not a gap.
                    return st.first;
                }
                self.first_of_newer_reign(topic, st.first, next.min(end), epoch)
            }
            Start::Time(t) => {
                // Entries are in arrival order: the first one received at or after `t`.
                let (mut lo, mut hi) = (st.first, mark);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    match self.log.read(topic, mid, 1) {
                        Ok(e) if e.first().is_some_and(|e| e.received_us < t) => lo = mid + 1,
                        Ok(_) => hi = mid,
                        Err(e) => {
                            warn!("reading '{topic}' for a time start: {e}");
                            return mark;
                        }
                    }
                }
                lo
            }
        }
    }

    /// The first offset below `upto` whose entry was written in an epoch newer than `epoch`
    /// (`upto` when there is none): where a subscriber resuming at `upto`, whose last entry
    /// was delivered in `epoch`, really starts on this node. Entries from there on came from a
    /// reign newer than what the subscriber saw (a node that took over, wrote, and whose log
    /// this node now follows), so they are not the entries the subscriber has at those
    /// offsets. Epochs never decrease along a log (a newer reign appends after the older one,
    /// and a node cuts a divergent tail before it follows another), so a binary search finds
    /// it; the usual answer, `upto`, takes one read.
    fn first_of_newer_reign(&self, topic: &str, first: u64, upto: u64, epoch: u64) -> u64 {
        let newer = |at: u64| match self.log.read(topic, at, 1) {
            Ok(e) => e.first().is_some_and(|e| e.epoch > epoch),
            Err(e) => {
                // Unreadable: take it as newer, so the resume starts early (duplicates), not late.
                warn!("reading '{topic}' for a resume: {e}");
                true
            }
        };
        if upto <= first || !newer(upto - 1) {
            return upto;
        }
        let (mut lo, mut hi) = (first, upto - 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if newer(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// The log of `topic` was cut at `from`: offsets from there on will name other entries.
    /// A subscriber that had them (its live start, or its replay, past `from`) has not got
    /// those, so it starts at `from` now (a resumed subscriber would otherwise skip what the
    /// node appends there).
    pub(super) fn offsets_reused(&mut self, topic: &str, from: u64) {
        if let Some(subs) = self.topics.get_mut(topic) {
            for s in subs {
                s.from = s.from.min(from);
            }
        }
        for rs in self.replays.by_conn.values_mut() {
            for r in rs.queue.iter_mut().filter(|r| r.topic == topic) {
                r.next = r.next.min(from);
            }
        }
    }

    fn queue_replay(&mut self, conn: ConnId, r: Replay) {
        self.replays
            .by_conn
            .entry(conn)
            .or_default()
            .queue
            .push_back(r);
        self.pump_replay(conn);
    }

    /// Sends what `conn`'s replays may send now: replays that have caught up end (a `SUB`
    /// turns live), and one chunk goes if the writer is not still busy with the last one.
    pub(super) fn pump_replay(&mut self, conn: ConnId) {
        loop {
            if !self.conns.contains_key(&conn) {
                self.replays.forget(conn);
                return;
            }
            if self.conns.get(&conn).is_some_and(|c| !c.replies.is_empty()) {
                // Answers are owed first; `flush_replies` calls again once they are out.
                return;
            }
            let Some(rs) = self.replays.by_conn.get_mut(&conn) else {
                return;
            };
            let Some(r) = rs.queue.front() else {
                self.replays.forget(conn);
                return;
            };
            let (topic, next, end) = (r.topic.clone(), r.next, r.end);
            let waiting = rs.waiting;
            let upto = end.unwrap_or_else(|| self.log.topic(&topic).delivered);
            if next >= upto {
                self.end_replay(conn, &topic, next.max(upto), end.is_none());
                continue;
            }
            if waiting {
                return;
            }
            let max = (upto - next).min(REPLAY_CHUNK as u64) as usize;
            let (chunk, new_next) = match self.log.read(&topic, next, max) {
                Ok(entries) => {
                    // One buffer for the chunk, sized for the lines of its first entry.
                    let each = entries.first().map_or(0, |e| {
                        topic.len() + e.id.publisher.len() + e.payload.len() + 128
                    });
                    let mut buf: Vec<u8> = Vec::with_capacity(each * entries.len());
                    if let Some(first) = entries.first().filter(|e| e.offset > next) {
                        let reason = format!(
                            "offset {next} is before the oldest kept entry {}; starting there",
                            first.offset
                        );
                        Frame::Err { reason }.encode_into_bytes(&mut buf);
                    }
                    let mut new_next = next;
                    for e in entries.iter().take_while(|e| e.offset < upto) {
                        let stamps = Stamps {
                            epoch: e.epoch,
                            received_us: e.received_us,
                            offset: e.offset,
                            ..Stamps::default()
                        };
                        crate::protocol::msg_line_into(
                            &mut buf, &topic, &e.id, e.sent_us, &stamps, &e.payload,
                        );
                        new_next = e.offset + 1;
                    }
                    if new_next == next {
                        // Nothing readable below `upto` (cut away meanwhile): done.
                        new_next = upto;
                    }
                    (buf, new_next)
                }
                Err(e) => {
                    warn!("replay of '{topic}' to {conn}: {e}");
                    let mut buf = Vec::new();
                    let reason = format!("cannot read the log of '{topic}': {e}");
                    Frame::Err { reason }.encode_into_bytes(&mut buf);
                    (buf, upto)
                }
            };
            if let Some(r) = self
                .replays
                .by_conn
                .get_mut(&conn)
                .and_then(|rs| rs.queue.front_mut())
            {
                r.next = new_next;
            }
            if !chunk.is_empty() {
                self.out.push_back(Output::Send {
                    conn,
                    line: Bytes::from(chunk),
                    delivery: false,
                });
                if let Some(rs) = self.replays.by_conn.get_mut(&conn) {
                    rs.waiting = true;
                }
                self.out.push_back(Output::Writable { conn });
            }
        }
    }

    /// A replay has sent everything below `next`: `REPLAYED`, and a `SUB` (`live`) turns live.
    fn end_replay(&mut self, conn: ConnId, topic: &str, next: u64, live: bool) {
        if let Some(rs) = self.replays.by_conn.get_mut(&conn) {
            rs.queue.pop_front();
        }
        if live {
            if let Some(s) = self
                .topics
                .get_mut(topic)
                .and_then(|subs| subs.iter_mut().find(|s| s.conn == conn && s.replaying))
            {
                s.replaying = false;
                s.from = s.from.max(next);
            }
        }
        self.send_frame(
            conn,
            &Frame::Replayed {
                topic: topic.to_string(),
                next,
            },
        );
    }
}
