//! Publisher and subscriber clients that follow whichever broker is serving.
//!
//! The publisher keeps a window of unacknowledged messages. When the broker it talks to does not
//! acknowledge the oldest of them within `ack_timeout` (500 ms by default), or closes the
//! connection, it switches to the other broker and resends every unacknowledged message plus the
//! last `resend` it sent (the seed's "last 5"). Messages carry their identity, so brokers drop
//! the resends they already hold and subscribers can spot the duplicates that remain.
//!
//! The subscriber keeps one connection to each broker open at once and labels every delivery
//! with the broker it came from.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_us;
use crate::net::{BoxStream, Net};
use crate::protocol::{Frame, FrameCodec, MsgId};

/// Most unacknowledged messages a publisher keeps; past it, it stops taking input until ACKs
/// come back, so a publisher whose brokers are both down does not grow without bound.
pub const MAX_WINDOW: usize = 65_536;

/// The brokers a client talks to, in order of preference.
#[derive(Debug, Clone)]
pub struct Brokers {
    /// Address of the primary (`host:port`).
    pub primary: String,
    /// Address of the backup.
    pub backup: String,
}

impl Brokers {
    fn addr(&self, i: usize) -> &str {
        if i == 0 {
            &self.primary
        } else {
            &self.backup
        }
    }
}

/// Name of broker `i` (0 = primary) for output.
pub fn broker_name(i: usize) -> &'static str {
    if i == 0 {
        "primary"
    } else {
        "backup"
    }
}

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
            publisher: cfg.id.clone(),
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
            match cfg.net.connect(&addr, cfg.ack_timeout).await {
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

/// Settings of a subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Topic to follow.
    pub topic: String,
    /// Brokers to listen to, both at once.
    pub brokers: Brokers,
    /// Network to use.
    pub net: Net,
}

/// One delivery as the subscriber saw it: one row of a delivery CSV (`subscriber --csv`, the
/// harness's `deliveries.csv`). It lives here because the subscriber makes it; the lab reads it back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Delivery {
    /// Subscriber's wall clock at receipt, µs since the Unix epoch.
    pub received_at_us: u64,
    /// `primary` or `backup`: the broker connection it arrived on.
    pub source: String,
    /// Topic.
    pub topic: String,
    /// Publisher id (`-` for seed-dialect messages).
    pub publisher: String,
    /// Publisher's sequence number.
    pub seq: u64,
    /// Publisher's wall clock when it first sent the message.
    pub sent_at_us: u64,
    /// `received_at_us - sent_at_us`.
    pub latency_us: i64,
    /// This publisher+seq was delivered before.
    pub duplicate: bool,
    /// Epoch of the delivering broker.
    pub epoch: u64,
    /// When the delivering broker received the message.
    pub broker_rx_us: u64,
    /// When its compute task started.
    pub compute_start_us: u64,
    /// When its compute task ended.
    pub compute_end_us: u64,
    /// Message body.
    pub payload: String,
}

/// Where a subscriber puts its deliveries.
pub trait DeliverySink {
    /// One delivery, duplicates included.
    fn delivery(&mut self, d: &Delivery) -> anyhow::Result<()>;
    /// Called when no more deliveries are queued right now: a good moment to flush.
    fn idle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Keeps every delivery in memory (tests, simulations).
impl DeliverySink for Vec<Delivery> {
    fn delivery(&mut self, d: &Delivery) -> anyhow::Result<()> {
        self.push(d.clone());
        Ok(())
    }
}

/// What the `subscriber` binary does with a delivery: one line to `out` (`[PRIMARY] 17`,
/// `[BACKUP] 18 (duplicate)`) and, if given, one CSV row.
pub struct PrintSink<W: Write> {
    /// Human-readable lines.
    pub out: W,
    /// CSV rows (columns of [`Delivery`]).
    pub csv: Option<csv::Writer<Box<dyn Write + Send>>>,
}

impl<W: Write> DeliverySink for PrintSink<W> {
    fn delivery(&mut self, d: &Delivery) -> anyhow::Result<()> {
        writeln!(
            self.out,
            "[{}] {}{}",
            d.source.to_uppercase(),
            d.payload,
            if d.duplicate { " (duplicate)" } else { "" }
        )?;
        if let Some(w) = self.csv.as_mut() {
            w.serialize(d)?;
        }
        Ok(())
    }

    fn idle(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        if let Some(w) = self.csv.as_mut() {
            w.flush()?;
        }
        Ok(())
    }
}

/// Runs a subscriber until `shutdown`, handing every delivery to `sink`. Returns how many
/// deliveries there were.
pub async fn run_subscriber(
    cfg: SubscriberConfig,
    sink: &mut impl DeliverySink,
    shutdown: CancellationToken,
) -> anyhow::Result<u64> {
    let (tx, mut rx) = mpsc::channel::<(usize, Frame, u64)>(4096);
    for i in 0..2 {
        let addr = cfg.brokers.addr(i).to_string();
        crate::net::spawn(follow(
            cfg.net,
            i,
            addr,
            cfg.topic.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    let mut seen: HashSet<MsgId> = HashSet::new();
    let mut count = 0u64;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => None,
            n = rx.recv() => n,
        };
        let Some((src, frame, received_at_us)) = next else {
            break;
        };
        let d = match frame {
            Frame::Msg {
                topic,
                id,
                sent_us,
                stamps,
                payload,
            } => {
                let duplicate = !id.is_anonymous() && !seen.insert(id.clone());
                Delivery {
                    received_at_us,
                    source: broker_name(src).to_string(),
                    topic,
                    publisher: id.publisher,
                    seq: id.seq,
                    sent_at_us: sent_us,
                    latency_us: received_at_us as i64 - sent_us as i64,
                    duplicate,
                    epoch: stamps.epoch,
                    broker_rx_us: stamps.received_us,
                    compute_start_us: stamps.compute_start_us,
                    compute_end_us: stamps.compute_end_us,
                    payload,
                }
            }
            _ => continue,
        };
        count += 1;
        sink.delivery(&d)?;
        if rx.is_empty() {
            sink.idle()?;
        }
    }
    sink.idle()?;
    Ok(count)
}

/// Keeps one subscription to one broker alive, reconnecting with a capped backoff.
async fn follow(
    net: Net,
    src: usize,
    addr: String,
    topic: String,
    tx: mpsc::Sender<(usize, Frame, u64)>,
    shutdown: CancellationToken,
) {
    let name = broker_name(src);
    let mut backoff = Duration::from_millis(10);
    let mut was_connected = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if let Ok(s) = net.connect(&addr, Duration::from_secs(1)).await {
            let mut c = Framed::new(s, FrameCodec::default());
            if c.send(Frame::Sub {
                topic: topic.clone(),
            })
            .await
            .is_ok()
            {
                info!("subscribed to '{topic}' on {name} ({addr})");
                was_connected = true;
                backoff = Duration::from_millis(10);
                loop {
                    let f = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        f = c.next() => f,
                    };
                    match f {
                        Some(Ok(f @ Frame::Msg { .. })) => {
                            if tx.send((src, f, now_us())).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Frame::Err { reason })) => warn!("{name} says: {reason}"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            warn!("{name}: {e}");
                            break;
                        }
                        None => break,
                    }
                }
                info!("lost {name} ({addr}); reconnecting");
            }
        } else if !was_connected && backoff == Duration::from_millis(250) {
            // Say it once the broker has stayed away for a while, not on every retry.
            info!("{name} ({addr}) not reachable yet; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}
