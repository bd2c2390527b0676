//! The publisher: a window of unacknowledged messages, switched to the other broker and resent
//! when the one it talks to stops acknowledging.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock::now_us;
use crate::net::{BoxStream, Net};
use crate::protocol::{Frame, FrameCodec, MsgId};

use super::{broker_name, Brokers, MAX_WINDOW};

/// A fresh publisher id: unique per process so that a restarted publisher, whose sequence starts
/// again at 1, is not mistaken for a resend of the old one.
pub fn new_publisher_id() -> String {
    format!(
        "p{}-{:06x}",
        std::process::id(),
        rand::thread_rng().gen::<u32>() & 0xff_ffff
    )
}

/// Settings of a publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Topic to publish on.
    pub topic: String,
    /// Brokers to use.
    pub brokers: Brokers,
    /// Publisher id carried by every message.
    pub id: String,
    /// How long to wait for an `ACK` before switching broker.
    pub ack_timeout: Duration,
    /// How many of the most recent messages to resend after a switch, acknowledged or not.
    pub resend: usize,
    /// Give up when nothing was acknowledged for this long after input ended.
    pub give_up: Duration,
    /// Network to use.
    pub net: Net,
    /// TLS to the brokers (`--tls-ca`); `None`: plain TCP.
    pub tls: Option<crate::tls::Client>,
}

/// Something the publisher did, for the binary to print and the harness to count.
#[derive(Debug, Clone, PartialEq)]
pub enum PubEvent {
    /// Message `seq` was acknowledged by broker `broker`, `rtt_us` after it was (last) sent.
    Acked {
        /// Sequence number.
        seq: u64,
        /// Index of the broker (0 primary, 1 backup).
        broker: usize,
        /// Time from last send to `ACK`.
        rtt_us: u64,
    },
    /// The publisher moved to broker `to`.
    Switched {
        /// Index of the new broker.
        to: usize,
        /// Why.
        reason: String,
    },
    /// Messages resent after a switch.
    Resent {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
}

/// How a publisher run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PubSummary {
    /// Messages handed to the publisher.
    pub published: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Sequence numbers never acknowledged.
    pub unacked: Vec<u64>,
}

#[derive(Debug)]
struct Pending {
    payload: String,
    sent_us: u64,
    last_sent: Instant,
}

type Conn = Framed<BoxStream, FrameCodec>;

/// Runs a publisher: takes `(seq, payload)` from `input`, and returns once `input` is closed and
/// every message is acknowledged, or nothing was acknowledged for `give_up`, or `shutdown`.
pub async fn run_publisher(
    cfg: PublisherConfig,
    mut input: mpsc::Receiver<(u64, String)>,
    events: mpsc::UnboundedSender<PubEvent>,
    shutdown: CancellationToken,
) -> PubSummary {
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut recent: VecDeque<(u64, String, u64)> = VecDeque::new();
    let mut summary = PubSummary::default();
    let mut target = 0usize;
    let mut conn: Option<Conn> = None;
    let mut input_open = true;
    let mut last_progress = Instant::now();
    let mut failures_in_a_row = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frame = |seq: u64, payload: &str, sent_us: u64| Frame::Pub {
        topic: cfg.topic.clone(),
        id: MsgId {
            publisher: cfg.id.clone().into(),
            seq,
        },
        sent_us,
        payload: payload.to_string(),
    };

    loop {
        if !input_open && pending.is_empty() {
            break;
        }
        if !input_open && last_progress.elapsed() > cfg.give_up {
            warn!("giving up: nothing acknowledged for {:?}", cfg.give_up);
            break;
        }
        // With no connection, keep taking input (it is sent on the next connection) so that a
        // publisher whose brokers are all down still sees its input end and can give up.
        if conn.is_none() && input_open {
            loop {
                if pending.len() >= MAX_WINDOW {
                    break;
                }
                match input.try_recv() {
                    Ok((seq, payload)) => {
                        remember(&mut pending, &mut recent, cfg.resend, seq, payload);
                        summary.published += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        input_open = false;
                        last_progress = Instant::now();
                        break;
                    }
                }
            }
            if !input_open && last_progress.elapsed() > cfg.give_up {
                warn!("giving up: nothing acknowledged for {:?}", cfg.give_up);
                break;
            }
        }
        // (Re)connect when there is anything to send.
        if conn.is_none() && (!pending.is_empty() || input_open) {
            let addr = cfg.brokers.addr(target).to_string();
            match cfg
                .net
                .connect_tls(&addr, cfg.ack_timeout, cfg.tls.as_ref())
                .await
            {
                Ok(s) => {
                    let mut c = Framed::new(s, FrameCodec::default());
                    // Resend the window: every unacknowledged message plus the last `resend`.
                    let mut seqs: Vec<u64> = recent.iter().map(|(s, _, _)| *s).collect();
                    seqs.extend(pending.keys().copied());
                    seqs.sort_unstable();
                    seqs.dedup();
                    let mut ok = true;
                    for seq in &seqs {
                        let f = match (pending.get(seq), recent.iter().find(|r| r.0 == *seq)) {
                            (Some(p), _) => frame(*seq, &p.payload, p.sent_us),
                            (None, Some((_, payload, sent))) => frame(*seq, payload, *sent),
                            (None, None) => continue,
                        };
                        if c.feed(f).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if ok && c.flush().await.is_ok() {
                        let now = Instant::now();
                        for p in pending.values_mut() {
                            p.last_sent = now;
                        }
                        if !seqs.is_empty() {
                            let _ = events.send(PubEvent::Resent { seqs });
                        }
                        conn = Some(c);
                        failures_in_a_row = 0;
                    }
                }
                Err(e) => {
                    failures_in_a_row += 1;
                    let to = 1 - target;
                    let _ = events.send(PubEvent::Switched {
                        to,
                        reason: format!("{} unreachable: {e}", broker_name(target)),
                    });
                    target = to;
                    if failures_in_a_row >= 2 {
                        // Both brokers refused: back off instead of spinning.
                        let wait =
                            Duration::from_millis(100 * u64::from(failures_in_a_row.min(10)));
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = input.recv(), if input_open && pending.len() < MAX_WINDOW => match msg {
                None => {
                    input_open = false;
                    last_progress = Instant::now();
                }
                Some((seq, payload)) => {
                    summary.published += 1;
                    let sent_us = remember(&mut pending, &mut recent, cfg.resend, seq, payload.clone());
                    let f = frame(seq, &payload, sent_us);
                    if let Some(c) = conn.as_mut() {
                        if c.send(f).await.is_err() {
                            conn = None;
                        }
                    }
                }
            },
            f = async { match conn.as_mut() { Some(c) => c.next().await, None => std::future::pending().await } } => match f {
                Some(Ok(Frame::Ack { id: Some(id) })) if id.publisher == cfg.id => {
                    if let Some(p) = pending.remove(&id.seq) {
                        summary.acked += 1;
                        last_progress = Instant::now();
                        let _ = events.send(PubEvent::Acked {
                            seq: id.seq,
                            broker: target,
                            rtt_us: p.last_sent.elapsed().as_micros() as u64,
                        });
                    }
                }
                Some(Ok(Frame::Err { reason })) if reason.starts_with(crate::core::STOPPING) => {
                    // A clean stop: the other broker takes over once this one is gone, and
                    // holds what it is sent until then; everything unacknowledged goes there.
                    warn!("{} is stopping", broker_name(target));
                    conn = None;
                    target = switch(&events, target, "broker stopping");
                }
                Some(Ok(Frame::Err { reason })) => warn!("{} refused a message: {reason}", broker_name(target)),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!("connection to {} failed: {e}", broker_name(target));
                    conn = None;
                    target = switch(&events, target, "connection failed");
                }
                None => {
                    conn = None;
                    target = switch(&events, target, "connection closed");
                }
            },
            _ = tick.tick() => {
                let overdue = pending.values().next().is_some_and(|p| p.last_sent.elapsed() >= cfg.ack_timeout);
                if overdue {
                    conn = None;
                    target = switch(&events, target, &format!("no ACK within {:?}", cfg.ack_timeout));
                }
            }
        }
    }
    summary.unacked = pending.keys().copied().collect();
    summary
}

/// Records a new message as unacknowledged and among the last `resend` sent; returns its send
/// time.
fn remember(
    pending: &mut BTreeMap<u64, Pending>,
    recent: &mut VecDeque<(u64, String, u64)>,
    resend: usize,
    seq: u64,
    payload: String,
) -> u64 {
    let sent_us = now_us();
    pending.insert(
        seq,
        Pending {
            payload: payload.clone(),
            sent_us,
            last_sent: Instant::now(),
        },
    );
    recent.push_back((seq, payload, sent_us));
    while recent.len() > resend {
        recent.pop_front();
    }
    sent_us
}

fn switch(events: &mpsc::UnboundedSender<PubEvent>, from: usize, reason: &str) -> usize {
    let to = 1 - from;
    let _ = events.send(PubEvent::Switched {
        to,
        reason: reason.to_string(),
    });
    to
}

/// Columns of an acknowledgement CSV (`test-publisher --acks FILE`), in order.
pub const ACK_COLUMNS: [&str; 3] = ["seq", "acked_at_us", "broker"];

/// One acknowledged message: one row of an acknowledgement CSV.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AckRecord {
    /// Sequence number.
    pub seq: u64,
    /// When the publisher saw its (first) `ACK`, µs since the Unix epoch.
    pub acked_at_us: u64,
    /// The broker that acknowledged it (`primary` or `backup`, the address it was given as).
    pub broker: String,
}

/// Writes one [`AckRecord`] per acknowledged message, flushed row by row, so that what a
/// publisher got acknowledged survives however it stops.
pub struct AckLog<W: std::io::Write> {
    w: csv::Writer<W>,
}

impl<W: std::io::Write> AckLog<W> {
    /// An acknowledgement CSV on `w`; the header is written with the first row.
    pub fn new(w: W) -> Self {
        AckLog {
            w: csv::Writer::from_writer(w),
        }
    }

    /// Records `e` if it is an [`PubEvent::Acked`], stamped now.
    pub fn event(&mut self, e: &PubEvent) -> std::io::Result<()> {
        if let PubEvent::Acked { seq, broker, .. } = e {
            self.w.serialize(AckRecord {
                seq: *seq,
                acked_at_us: now_us(),
                broker: broker_name(*broker).to_string(),
            })?;
            self.w.flush()?;
        }
        Ok(())
    }
}

/// Prints publisher events the way the binaries show them.
pub fn print_event(e: &PubEvent) {
    match e {
        PubEvent::Acked {
            seq,
            broker,
            rtt_us,
        } => println!(
            "ACK {seq} from {} ({:.1} ms)",
            broker_name(*broker),
            *rtt_us as f64 / 1000.0
        ),
        PubEvent::Switched { to, reason } => {
            println!("SWITCH to {}: {reason}", broker_name(*to))
        }
        PubEvent::Resent { seqs } => println!(
            "RESEND {}",
            seqs.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}
