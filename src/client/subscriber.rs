//! The subscriber: one connection to each broker, every delivery labelled by where it came
//! from, duplicates marked.
//!
//! It may start in the topic's past ([`SubscriberConfig::start`]: `SUB|topic|from`), and, with
//! [`SubscriberConfig::resume`] (the default), it remembers the highest offset it got from
//! either broker and the epoch that delivered it: when a connection is lost (a broker
//! restarted, failed over, or the network cut it), it subscribes again with both
//! (`SUB|topic|N@E`), so the broker replays what it missed and nothing it already had, and
//! starts earlier where its log holds other entries at those offsets (a newer reign's).

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_us;
use crate::net::Net;
use crate::protocol::{Frame, FrameCodec, MsgId, Start};

use super::{broker_name, Brokers};

/// Settings of a subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Topic to follow.
    pub topic: String,
    /// Brokers to listen to, both at once.
    pub brokers: Brokers,
    /// Network to use.
    pub net: Net,
    /// TLS to the brokers (`--tls-ca`); `None`: plain TCP.
    pub tls: Option<crate::tls::Client>,
    /// Where the first subscription starts: `None` for live deliveries only (`SUB|topic`).
    pub start: Option<Start>,
    /// After a reconnect, subscribe again from the offset after the highest one received (from
    /// either broker) and the epoch it came in, rather than from `start`.
    pub resume: bool,
}

impl SubscriberConfig {
    /// Live deliveries of `topic` from `brokers`, resuming by offset after a reconnect.
    pub fn new(topic: String, brokers: Brokers, net: Net) -> Self {
        SubscriberConfig {
            topic,
            brokers,
            net,
            tls: None,
            start: None,
            resume: true,
        }
    }
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
    /// The entry's offset in the topic's log (0 from a broker that does not say).
    #[serde(default)]
    pub offset: u64,
}

impl Delivery {
    /// Sent from the log by a replay (a `SUB` with a start, a resume) rather than delivered
    /// live: a replay carries no compute times, and the epoch is the entry's (the reign that
    /// wrote it), not the epoch of the node that sent it.
    pub fn replayed(&self) -> bool {
        self.compute_start_us == 0 && self.compute_end_us == 0
    }
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
    let next = Arc::new(Mutex::new(None));
    for i in 0..2 {
        let f = Follow {
            net: cfg.net,
            tls: cfg.tls.clone(),
            src: i,
            addr: cfg.brokers.addr(i).to_string(),
            topic: cfg.topic.clone(),
            start: cfg.start,
            resume: cfg.resume.then(|| next.clone()),
        };
        crate::net::spawn(follow(f, tx.clone(), shutdown.clone()));
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
                    publisher: id.publisher.into_owned(),
                    seq: id.seq,
                    sent_at_us: sent_us,
                    latency_us: received_at_us as i64 - sent_us as i64,
                    duplicate,
                    epoch: stamps.epoch,
                    broker_rx_us: stamps.received_us,
                    compute_start_us: stamps.compute_start_us,
                    compute_end_us: stamps.compute_end_us,
                    payload,
                    offset: stamps.offset,
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

/// One subscription to one broker, as [`follow`] keeps it.
struct Follow {
    net: Net,
    tls: Option<crate::tls::Client>,
    src: usize,
    addr: String,
    topic: String,
    start: Option<Start>,
    /// Where to resume, shared by both connections: the offset after the highest one received
    /// from either broker, and the epoch it was delivered in (`None` inside: nothing yet);
    /// `None` when not resuming.
    resume: Option<Arc<Mutex<Option<Resume>>>>,
}

/// The offset after the highest one a subscriber has, and the epoch that entry came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resume {
    next: u64,
    epoch: u64,
}

impl Follow {
    /// The `SUB` for the next connection: after the last offset received, if any, else as
    /// configured.
    fn sub(&self) -> Frame {
        let at = self
            .resume
            .as_ref()
            .and_then(|r| *r.lock().unwrap_or_else(|p| p.into_inner()));
        Frame::Sub {
            topic: self.topic.clone(),
            from: match at {
                Some(Resume { next, epoch }) => Some(Start::Resume { next, epoch }),
                None => self.start,
            },
        }
    }

    /// Notes that the entry at `offset` arrived, delivered in `epoch`. The resume point is
    /// the furthest offset of the newest epoch: in overlapping reigns (a deposed primary that
    /// does not know it yet) the older reign's offsets name entries the newer reign's log does
    /// not have at those offsets, and resuming after them would skip the newer reign's own.
    fn got(&self, offset: u64, epoch: u64) {
        let Some(r) = &self.resume else {
            return;
        };
        let mut at = r.lock().unwrap_or_else(|p| p.into_inner());
        let got = Resume {
            next: offset + 1,
            epoch,
        };
        if at.is_none_or(|a| (got.epoch, got.next) > (a.epoch, a.next)) {
            *at = Some(got);
        }
    }

    /// A broker answered a subscription with `REPLAYED|topic|next`: it goes live from `next`.
    /// Below the resume point, the broker could not resume there: it is behind (it will get the
    /// same entries), or its log started over (a restart in memory) and its offsets name other
    /// entries now. The point comes down to `next` (the live deliveries of either broker raise
    /// it again), so that the next resume does not start past entries of the new numbering:
    /// duplicates at worst, never a gap.
    fn live_from(&self, next: u64) {
        let Some(r) = &self.resume else {
            return;
        };
        let mut at = r.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = at.as_mut() {
            a.next = a.next.min(next);
        }
    }
}

/// Keeps one subscription to one broker alive, reconnecting with a capped backoff.
async fn follow(f: Follow, tx: mpsc::Sender<(usize, Frame, u64)>, shutdown: CancellationToken) {
    let Follow {
        net,
        ref tls,
        src,
        ref addr,
        ref topic,
        ..
    } = f;
    let name = broker_name(src);
    let mut backoff = Duration::from_millis(10);
    let mut was_connected = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if let Ok(s) = net
            .connect_tls(addr, Duration::from_secs(1), tls.as_ref())
            .await
        {
            let mut c = Framed::new(s, FrameCodec::default());
            let sub = f.sub();
            if c.send(sub.clone()).await.is_ok() {
                match &sub {
                    Frame::Sub {
                        from: Some(from), ..
                    } => {
                        info!("subscribed to '{topic}' on {name} ({addr}) from {from}")
                    }
                    _ => info!("subscribed to '{topic}' on {name} ({addr})"),
                }
                was_connected = true;
                backoff = Duration::from_millis(10);
                loop {
                    let got = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        g = c.next() => g,
                    };
                    match got {
                        Some(Ok(m @ Frame::Msg { .. })) => {
                            if let Frame::Msg { stamps, .. } = &m {
                                f.got(stamps.offset, stamps.epoch);
                            }
                            if tx.send((src, m, now_us())).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Frame::Replayed { next, .. })) => {
                            info!("{name}: past replayed up to offset {next}, live from there");
                            f.live_from(next);
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
