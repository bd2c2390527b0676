//! What one client may hold of a node: subscriptions per connection, topic names, publishes
//! awaiting their `ACK`. A client past a limit is told (`ERR|…`) or slowed; the node goes on
//! serving everyone else. (Connections, bytes queued for a subscriber and the time to finish a
//! frame are limited by the driver, which owns the sockets.)

use tracing::info;

use super::time::Timer;
use super::{Broker, ConnId, Output};
use crate::protocol::Frame;

/// Subscriptions one connection may hold (`--max-subscriptions`): each costs an entry in the
/// topic's list and a look-up per delivery; a client that subscribes in a loop is told to stop.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// Longest topic name, in bytes (`--max-topic-len`). Kafka allows 249 characters; a topic is
/// also a folder name in a data directory, which file systems cap at 255 bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// Publishes of one connection that may await their `ACK` (`--max-unacked`). Past it the node
/// reads no more from that connection until `ACK`s go out: a publisher that pipelines without
/// bound is slowed to what the pair can store, and loses nothing (an `ERR` would make it resend
/// what it had already sent, and a close would cut it off from `ACK`s it is owed).
pub const MAX_UNACKED: usize = 8192;

/// Why a topic name is refused, if it is.
pub fn bad_topic(topic: &str, max_len: usize) -> Option<String> {
    if topic.len() > max_len {
        let head: String = topic.chars().take(32).collect();
        return Some(format!(
            "topic '{head}…' is {} bytes, longer than {max_len} (--max-topic-len)",
            topic.len()
        ));
    }
    // The usual topic is printable ASCII, tested in one pass a byte at a time; only other
    // names (an ASCII control, or anything not ASCII: C1 controls are not) are walked a
    // character at a time.
    let maybe = topic.bytes().any(|b| !(0x20..0x7f).contains(&b));
    let found = if maybe {
        topic.chars().find(|c| c.is_control())
    } else {
        None
    };
    if let Some(c) = found {
        return Some(format!(
            "topic '{}' holds the control character {c:?}: not allowed in a topic name",
            topic.escape_debug()
        ));
    }
    None
}

impl Broker {
    /// Whether a client's frame is within the limits; a refused one is answered `ERR|…`.
    pub(super) fn within_limits(&mut self, conn: ConnId, frame: &Frame) -> bool {
        let (topic, subscribes) = match frame {
            Frame::Publish { topic, .. } | Frame::Pub { topic, .. } if topic.starts_with('$') => {
                // The node's own topics (`$groups`) are written by the node alone.
                self.counters.refused += 1;
                let reason = format!(
                    "topic '{topic}' is reserved: names starting with '$' are the node's own"
                );
                self.reply(conn, Frame::Err { reason });
                return false;
            }
            Frame::Publish { topic, .. } | Frame::Pub { topic, .. } => (topic.as_str(), false),
            Frame::Subscribe { topic } | Frame::Sub { topic, .. } => (topic.as_str(), true),
            Frame::History { topic, .. } => (topic.as_str(), false),
            Frame::Group(op) => match op.topic() {
                // A member holds one subscription's worth.
                Some(t) => (t, matches!(op, crate::protocol::GroupOp::Join { .. })),
                None => return true,
            },
            _ => return true,
        };
        let mut why = bad_topic(topic, self.cfg.max_topic_len);
        let max = self.cfg.max_subscriptions;
        if why.is_none() && subscribes {
            let held = self.conns.get(&conn).map_or(0, |c| c.topics.len());
            if held >= max {
                why = Some(format!(
                    "too many subscriptions on this connection ({held}, --max-subscriptions {max})"
                ));
            }
        }
        match why {
            None => true,
            Some(reason) => {
                self.counters.refused += 1;
                self.reply(conn, Frame::Err { reason });
                false
            }
        }
    }

    /// An `ACK` was queued for `conn`: at [`MAX_UNACKED`] of them, read no more from it.
    pub(super) fn count_unacked(&mut self, conn: ConnId) {
        let max = self.cfg.max_unacked;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.acks_waiting += 1;
        if c.full || c.acks_waiting < max {
            return;
        }
        c.full = true;
        if !c.held {
            c.held = true;
            self.out.push_back(Output::Hold { conn, held: true });
        }
        if !self.said_full {
            self.said_full = true;
            info!(
                "connection {conn} has {max} publishes awaiting their ACK (--max-unacked): \
                 reading no more from it until they are answered (said once)"
            );
        }
    }

    /// Answers went out on `conn`: once below the limit, it may be read again. Done from a
    /// timer due at once, so the frames that waited are not handled inside the caller's step.
    pub(super) fn uncount_unacked(&mut self, conn: ConnId) {
        let max = self.cfg.max_unacked;
        if let Some(c) = self.conns.get(&conn) {
            if c.full && c.acks_waiting < max {
                self.timers.set(Timer::Unpause(conn), self.now.mono);
            }
        }
    }

    /// [`Timer::Unpause`]: `conn` reads again and its frames that waited are handled.
    pub(super) fn unpause(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.full {
            return;
        }
        c.full = false;
        let busy = c.busy;
        if busy {
            // A forward is under way: the frames go on waiting for it.
            return;
        }
        self.resume(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_and_control_characters_are_refused_with_the_reason() {
        assert_eq!(bad_topic("sensors/room-1.temp", 255), None);
        assert_eq!(bad_topic("données", 255), None);
        let long = "x".repeat(256);
        assert!(bad_topic(&long, 255).is_some_and(|e| e.contains("256 bytes")));
        assert!(bad_topic("a\u{1b}[31m", 255).is_some_and(|e| e.contains("control")));
        assert!(bad_topic("tab\there", 255).is_some());
        assert!(bad_topic("del\u{7f}", 255).is_some());
        // C1 controls are not ASCII: found by the character walk.
        assert!(bad_topic("données\u{85}", 255).is_some_and(|e| e.contains("control")));
    }
}
