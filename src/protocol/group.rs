//! Consumer groups on the wire: `GROUP|op|…`, one verb with sub-steps (as `AUTH`), so a client
//! that does not use groups never sees one of these frames.
//!
//! Client to broker:
//! - `GROUP|create|TOPIC|GROUP|START[|OPTIONS]`: START is `first`, `new`, an offset, or
//!   `time:µs`; OPTIONS `ack_wait=MS,max_deliver=N,max_in_flight=N` (any of them);
//! - `GROUP|join|TOPIC|GROUP|CONSUMER`, `GROUP|leave|TOPIC|GROUP`;
//! - `GROUP|ack|TOPIC|GROUP|OFFSET`, `GROUP|nack|TOPIC|GROUP|OFFSET[|DELAY_MS]`;
//! - `GROUP|list` or `GROUP|list|TOPIC`.
//!
//! Broker to client: `GROUP|created|…`, `GROUP|joined|…`, `GROUP|left|…`, `GROUP|acked|…`,
//! `GROUP|nacked|…` answer the above; `GROUP|msg|TOPIC|GROUP|OFFSET|ATTEMPT|PUBLISHER|SEQ|SENT|
//! PAYLOAD` is an entry leased to this member; `GROUP|info|…` lines and `GROUP|end` answer a
//! list.

use std::fmt;

use super::{MsgId, ProtocolError};

/// How an `ERR` answering a member's `ack` starts when the ack may have been stored and may
/// not: the node stopped being primary before it knew. The new primary either has the entry
/// done or delivers it again; the member has nothing to resend.
pub const ACK_UNCONFIRMED: &str = "ack unconfirmed";

/// Longest group or consumer name.
pub const MAX_NAME: usize = 64;

/// Where a new group starts reading its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// The oldest entry the log keeps.
    First,
    /// Entries published after the group was made.
    New,
    /// This offset.
    Offset(u64),
    /// The first entry received at or after this time (µs since the Unix epoch).
    Time(u64),
}

impl std::str::FromStr for GroupStart {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "first" => Ok(GroupStart::First),
            "new" => Ok(GroupStart::New),
            _ => {
                if let Some(t) = s.strip_prefix("time:") {
                    return t
                        .parse()
                        .map(GroupStart::Time)
                        .map_err(|_| bad(format!("bad group start time '{}'", short(t))));
                }
                s.parse().map(GroupStart::Offset).map_err(|_| {
                    bad(format!(
                        "bad group start '{}': expected first, new, an offset or time:µs",
                        short(s)
                    ))
                })
            }
        }
    }
}

impl fmt::Display for GroupStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupStart::First => f.write_str("first"),
            GroupStart::New => f.write_str("new"),
            GroupStart::Offset(o) => write!(f, "{o}"),
            GroupStart::Time(t) => write!(f, "time:{t}"),
        }
    }
}

/// A group's settings, fixed when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupOptions {
    /// How long a member has to acknowledge an entry before it goes to another, ms.
    pub ack_wait_ms: u64,
    /// Deliveries of one entry before it goes to the dead-letter topic.
    pub max_deliver: u32,
    /// Entries one member may hold unacknowledged.
    pub max_in_flight: u32,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            ack_wait_ms: 30_000,
            max_deliver: 5,
            max_in_flight: 1,
        }
    }
}

/// Bounds on the options: past them a `create` is refused.
pub const MAX_ACK_WAIT_MS: u64 = 24 * 3600 * 1000;
/// Most deliveries of one entry a group may ask for.
pub const MAX_DELIVER: u32 = 1000;
/// Most entries one member may hold.
pub const MAX_IN_FLIGHT: u32 = 10_000;

impl GroupOptions {
    /// Reads `ack_wait=MS,max_deliver=N,max_in_flight=N` (any of them; the rest default).
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        let mut o = GroupOptions::default();
        for kv in s.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("bad group option '{}': expected k=v", short(kv))))?;
            if !matches!(k, "ack_wait" | "max_deliver" | "max_in_flight") {
                return Err(bad(format!(
                    "unknown group option '{}' (ack_wait, max_deliver, max_in_flight)",
                    short(k)
                )));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| bad(format!("bad value for group option {}", short(k))))?;
            match k {
                "ack_wait" if (1..=MAX_ACK_WAIT_MS).contains(&n) => o.ack_wait_ms = n,
                "max_deliver" if (1..=MAX_DELIVER as u64).contains(&n) => o.max_deliver = n as u32,
                "max_in_flight" if (1..=MAX_IN_FLIGHT as u64).contains(&n) => {
                    o.max_in_flight = n as u32
                }
                "ack_wait" | "max_deliver" | "max_in_flight" => {
                    return Err(bad(format!(
                        "group option {k}={n} out of range (ack_wait 1..={MAX_ACK_WAIT_MS} ms, \
                         max_deliver 1..={MAX_DELIVER}, max_in_flight 1..={MAX_IN_FLIGHT})"
                    )))
                }
                _ => return Err(bad(format!("unknown group option '{}'", short(k)))),
            }
        }
        Ok(o)
    }
}

impl fmt::Display for GroupOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ack_wait={},max_deliver={},max_in_flight={}",
            self.ack_wait_ms, self.max_deliver, self.max_in_flight
        )
    }
}

/// What `GROUP|list` says of one group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    /// Every entry below this offset is acknowledged or dead-lettered.
    pub floor: u64,
    /// The topic's next offset (so lag = end − floor, less what is done above the floor).
    pub end: u64,
    /// Entries leased to a member and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet acknowledged or dead-lettered, from the floor to the end.
    pub lag: u64,
    /// Deliveries that were not an entry's first.
    pub redelivered: u64,
    /// Entries moved to the dead-letter topic.
    pub dead: u64,
    /// The members connected to this node, by name.
    pub members: Vec<String>,
}

/// One `GROUP|…` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOp {
    /// Make a group (the same settings again are no error).
    Create {
        /// The topic it reads.
        topic: String,
        /// Its name.
        group: String,
        /// Where it starts.
        start: GroupStart,
        /// Its settings.
        options: GroupOptions,
    },
    /// Join a group as a named member.
    Join {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The member's name, unique in the group.
        consumer: String,
    },
    /// Leave a group: what this member holds goes to others.
    Leave {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// This member is done with the entry at `offset`.
    Ack {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The entry.
        offset: u64,
    },
    /// This member gives the entry at `offset` back, to be delivered again after `delay_ms`.
    Nack {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The entry.
        offset: u64,
        /// Wait this long before it is delivered again.
        delay_ms: u64,
    },
    /// The groups of one topic, or of every topic.
    List {
        /// The topic, or all.
        topic: Option<String>,
    },
    /// Answer to `create`.
    Created {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// Answer to `join`.
    Joined {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The member.
        consumer: String,
    },
    /// Answer to `leave`.
    Left {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// Answer to `ack`: the acknowledgement is stored (on both nodes, when linked).
    Acked {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The entry.
        offset: u64,
    },
    /// Answer to `nack`.
    Nacked {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The entry.
        offset: u64,
    },
    /// An entry leased to this member.
    Msg {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The entry's offset.
        offset: u64,
        /// 1 for its first delivery in this group.
        attempt: u32,
        /// Its publisher's identity.
        id: MsgId,
        /// When its publisher sent it (µs since the Unix epoch).
        sent_us: u64,
        /// Its payload.
        payload: String,
    },
    /// One group, answering `list`.
    Info {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// Its figures.
        info: GroupInfo,
    },
    /// The end of a list.
    End,
    /// Backup → primary on the replication link: a record of the groups' journal that the
    /// primary's catch-up cut from the backup's log (written in a reign the primary did not
    /// see). The primary takes what still names its own entries.
    Merge {
        /// The record, as the journal holds it.
        record: String,
    },
    /// Backup → primary: every `merge` of that catch-up was sent.
    Merged,
    /// Peer → primary (a hand-over, sent as the hand-over's `PUB`s are): an entry cut from the
    /// sender's diverged log that a consumer group had not finished. The topic's subscribers
    /// had it already: it is logged again for the groups only. Answered `ACK|publisher|seq`, as
    /// a `PUB`; it carries no more authority than one (any client could publish the entry).
    Requeue {
        /// The topic.
        topic: String,
        /// Its publisher's identity.
        id: MsgId,
        /// When its publisher sent it.
        sent_us: u64,
        /// Its payload.
        payload: String,
    },
}

fn bad(s: String) -> ProtocolError {
    ProtocolError::BadValue(s)
}

fn short(s: &str) -> String {
    if s.chars().count() > 32 {
        format!("{}…", s.chars().take(32).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Checks a group or consumer name: 1..=64 of letters, digits, `.`, `_`, `-`, `:`.
pub fn check_name(s: &str, what: &str) -> Result<(), ProtocolError> {
    if s.is_empty()
        || s.len() > MAX_NAME
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(bad(format!(
            "bad {what} name '{}': 1 to {MAX_NAME} letters, digits, '.', '_', '-' or ':'",
            short(s)
        )));
    }
    Ok(())
}

fn num(s: &str, what: &'static str) -> Result<u64, ProtocolError> {
    s.parse().map_err(|_| ProtocolError::BadField(what))
}

impl GroupOp {
    /// Parses what follows `GROUP|`.
    pub(super) fn parse(s: &str) -> Result<Self, ProtocolError> {
        let (step, rest) = s.split_once('|').unwrap_or((s, ""));
        let usage = || {
            bad(format!(
                "bad GROUP|{}: expected create|TOPIC|GROUP|START[|OPTIONS], join|TOPIC|GROUP|CONSUMER, \
                 leave|TOPIC|GROUP, ack|TOPIC|GROUP|OFFSET, nack|TOPIC|GROUP|OFFSET[|DELAY_MS] or list[|TOPIC]",
                short(step)
            ))
        };
        // The payload of `msg` is last and may hold '|': split only as far as needed.
        let f: Vec<&str> = if step == "merge" {
            vec![rest]
        } else if step == "requeue" {
            rest.splitn(5, '|').collect()
        } else if step == "msg" {
            rest.splitn(8, '|').collect()
        } else {
            rest.split('|').collect()
        };
        let tg = |f: &[&str]| -> Result<(String, String), ProtocolError> {
            let (t, g) = (f[0], f[1]);
            if t.is_empty() {
                return Err(ProtocolError::EmptyField("GROUP topic"));
            }
            check_name(g, "group")?;
            Ok((t.to_string(), g.to_string()))
        };
        let op = match (step, f.len()) {
            ("create", 3 | 4) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Create {
                    topic,
                    group,
                    start: f[2].parse()?,
                    options: match f.get(3) {
                        Some(o) => GroupOptions::parse(o)?,
                        None => GroupOptions::default(),
                    },
                }
            }
            ("join", 3) => {
                let (topic, group) = tg(&f)?;
                check_name(f[2], "consumer")?;
                GroupOp::Join {
                    topic,
                    group,
                    consumer: f[2].to_string(),
                }
            }
            ("leave", 2) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Leave { topic, group }
            }
            ("ack", 3) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Ack {
                    topic,
                    group,
                    offset: num(f[2], "GROUP offset")?,
                }
            }
            ("nack", 3 | 4) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Nack {
                    topic,
                    group,
                    offset: num(f[2], "GROUP offset")?,
                    delay_ms: match f.get(3) {
                        Some(d) => num(d, "GROUP nack delay")?.min(MAX_ACK_WAIT_MS),
                        None => 0,
                    },
                }
            }
            ("list", 1) if rest.is_empty() => GroupOp::List { topic: None },
            ("list", 1) => GroupOp::List {
                topic: Some(rest.to_string()),
            },
            ("created", 2) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Created { topic, group }
            }
            ("joined", 3) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Joined {
                    topic,
                    group,
                    consumer: f[2].to_string(),
                }
            }
            ("left", 2) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Left { topic, group }
            }
            ("acked", 3) | ("nacked", 3) => {
                let (topic, group) = tg(&f)?;
                let offset = num(f[2], "GROUP offset")?;
                if step == "acked" {
                    GroupOp::Acked {
                        topic,
                        group,
                        offset,
                    }
                } else {
                    GroupOp::Nacked {
                        topic,
                        group,
                        offset,
                    }
                }
            }
            ("msg", 8) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Msg {
                    topic,
                    group,
                    offset: num(f[2], "GROUP offset")?,
                    attempt: num(f[3], "GROUP attempt")?.min(u32::MAX as u64) as u32,
                    id: MsgId {
                        publisher: MsgId::publisher_of(f[4]),
                        seq: num(f[5], "GROUP seq")?,
                    },
                    sent_us: num(f[6], "GROUP sent")?,
                    payload: f[7].to_string(),
                }
            }
            ("info", 9) => {
                let (topic, group) = tg(&f)?;
                GroupOp::Info {
                    topic,
                    group,
                    info: GroupInfo {
                        floor: num(f[2], "GROUP floor")?,
                        end: num(f[3], "GROUP end")?,
                        pending: num(f[4], "GROUP pending")?,
                        lag: num(f[5], "GROUP lag")?,
                        redelivered: num(f[6], "GROUP redelivered")?,
                        dead: num(f[7], "GROUP dead")?,
                        members: f[8]
                            .split(',')
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect(),
                    },
                }
            }
            ("end", 1) if rest.is_empty() => GroupOp::End,
            ("merge", _) if !rest.is_empty() => GroupOp::Merge {
                record: rest.to_string(),
            },
            ("merged", 1) if rest.is_empty() => GroupOp::Merged,
            ("requeue", 5) => {
                if f[0].is_empty() {
                    return Err(ProtocolError::EmptyField("GROUP topic"));
                }
                GroupOp::Requeue {
                    topic: f[0].to_string(),
                    id: MsgId {
                        publisher: MsgId::publisher_of(f[1]),
                        seq: num(f[2], "GROUP seq")?,
                    },
                    sent_us: num(f[3], "GROUP sent")?,
                    payload: f[4].to_string(),
                }
            }
            _ => return Err(usage()),
        };
        Ok(op)
    }

    /// The topic the frame is about, if any (for the broker's topic checks).
    pub fn topic(&self) -> Option<&str> {
        match self {
            GroupOp::List { topic } => topic.as_deref(),
            GroupOp::End | GroupOp::Merge { .. } | GroupOp::Merged => None,
            GroupOp::Requeue { topic, .. } => Some(topic),
            GroupOp::Create { topic, .. }
            | GroupOp::Join { topic, .. }
            | GroupOp::Leave { topic, .. }
            | GroupOp::Ack { topic, .. }
            | GroupOp::Nack { topic, .. }
            | GroupOp::Created { topic, .. }
            | GroupOp::Joined { topic, .. }
            | GroupOp::Left { topic, .. }
            | GroupOp::Acked { topic, .. }
            | GroupOp::Nacked { topic, .. }
            | GroupOp::Msg { topic, .. }
            | GroupOp::Info { topic, .. } => Some(topic),
        }
    }
}

impl fmt::Display for GroupOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupOp::Create {
                topic,
                group,
                start,
                options,
            } => write!(f, "create|{topic}|{group}|{start}|{options}"),
            GroupOp::Join {
                topic,
                group,
                consumer,
            } => write!(f, "join|{topic}|{group}|{consumer}"),
            GroupOp::Leave { topic, group } => write!(f, "leave|{topic}|{group}"),
            GroupOp::Ack {
                topic,
                group,
                offset,
            } => write!(f, "ack|{topic}|{group}|{offset}"),
            GroupOp::Nack {
                topic,
                group,
                offset,
                delay_ms,
            } => write!(f, "nack|{topic}|{group}|{offset}|{delay_ms}"),
            GroupOp::List { topic: None } => f.write_str("list"),
            GroupOp::List { topic: Some(t) } => write!(f, "list|{t}"),
            GroupOp::Created { topic, group } => write!(f, "created|{topic}|{group}"),
            GroupOp::Joined {
                topic,
                group,
                consumer,
            } => write!(f, "joined|{topic}|{group}|{consumer}"),
            GroupOp::Left { topic, group } => write!(f, "left|{topic}|{group}"),
            GroupOp::Acked {
                topic,
                group,
                offset,
            } => write!(f, "acked|{topic}|{group}|{offset}"),
            GroupOp::Nacked {
                topic,
                group,
                offset,
            } => write!(f, "nacked|{topic}|{group}|{offset}"),
            GroupOp::Msg {
                topic,
                group,
                offset,
                attempt,
                id,
                sent_us,
                payload,
            } => write!(
                f,
                "msg|{topic}|{group}|{offset}|{attempt}|{}|{}|{sent_us}|{payload}",
                id.publisher, id.seq
            ),
            GroupOp::Info { topic, group, info } => write!(
                f,
                "info|{topic}|{group}|{}|{}|{}|{}|{}|{}|{}",
                info.floor,
                info.end,
                info.pending,
                info.lag,
                info.redelivered,
                info.dead,
                info.members.join(",")
            ),
            GroupOp::End => f.write_str("end"),
            GroupOp::Merge { record } => write!(f, "merge|{record}"),
            GroupOp::Merged => f.write_str("merged"),
            GroupOp::Requeue {
                topic,
                id,
                sent_us,
                payload,
            } => write!(
                f,
                "requeue|{topic}|{}|{}|{sent_us}|{payload}",
                id.publisher, id.seq
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_op_reads_back_as_written() {
        let id = MsgId {
            publisher: "p1".into(),
            seq: 9,
        };
        let ops = [
            GroupOp::Create {
                topic: "t".into(),
                group: "g".into(),
                start: GroupStart::Time(5),
                options: GroupOptions {
                    ack_wait_ms: 200,
                    max_deliver: 3,
                    max_in_flight: 2,
                },
            },
            GroupOp::Join {
                topic: "t".into(),
                group: "g".into(),
                consumer: "c-1".into(),
            },
            GroupOp::Leave {
                topic: "t".into(),
                group: "g".into(),
            },
            GroupOp::Ack {
                topic: "t".into(),
                group: "g".into(),
                offset: 4,
            },
            GroupOp::Nack {
                topic: "t".into(),
                group: "g".into(),
                offset: 4,
                delay_ms: 50,
            },
            GroupOp::List { topic: None },
            GroupOp::List {
                topic: Some("t".into()),
            },
            GroupOp::Msg {
                topic: "t".into(),
                group: "g".into(),
                offset: 4,
                attempt: 2,
                id,
                sent_us: 77,
                payload: "a|b".into(),
            },
            GroupOp::Info {
                topic: "t".into(),
                group: "g".into(),
                info: GroupInfo {
                    floor: 1,
                    end: 9,
                    pending: 2,
                    lag: 7,
                    redelivered: 3,
                    dead: 1,
                    members: vec!["a".into(), "b".into()],
                },
            },
            GroupOp::End,
            GroupOp::Merge {
                record: "ack|t|g|4|p|9".into(),
            },
            GroupOp::Merged,
            GroupOp::Requeue {
                topic: "t".into(),
                id: MsgId {
                    publisher: "p".into(),
                    seq: 3,
                },
                sent_us: 5,
                payload: "x|y".into(),
            },
        ];
        for op in ops {
            let text = op.to_string();
            assert_eq!(GroupOp::parse(&text).expect(&text), op, "{text}");
        }
    }

    #[test]
    fn bad_group_frames_say_what_is_wrong() {
        for (line, says) in [
            ("create|t|g|sometime", "bad group start"),
            ("create|t|g|first|ack_wait=0", "out of range"),
            ("create|t|g|first|color=red", "unknown group option"),
            ("join|t|g|bad name", "bad consumer name"),
            ("join|t|g g|c", "bad group name"),
            ("ack|t|g|x", "GROUP offset"),
            ("fly|t|g", "bad GROUP|fly"),
        ] {
            let e = GroupOp::parse(line).expect_err(line).to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }
}
