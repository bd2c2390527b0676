//! A member of a consumer group: joins the group on both brokers (only the primary hands out
//! entries; the backup's membership is ready for a takeover), works on each entry it is given,
//! and acknowledges it on the connection it came from. An entry counts as acknowledged only
//! once the broker says `GROUP|acked`: then it is never delivered to the group again.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{broker_name, Brokers};
use crate::clock::now_us;
use crate::compute::ComputeRange;
use crate::net::Net;
use crate::protocol::{Frame, FrameCodec, GroupOp, GroupOptions, GroupStart, ACK_UNCONFIRMED};

/// What a consumer does.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The group.
    pub group: String,
    /// Its topic.
    pub topic: String,
    /// This member's name, unique in the group.
    pub name: String,
    /// The brokers.
    pub brokers: Brokers,
    /// Sockets (real or simulated).
    pub net: Net,
    /// TLS to the brokers, if they speak it.
    pub tls: Option<crate::tls::Client>,
    /// Make the group first (an existing one with the same settings is no error).
    pub create: Option<(GroupStart, GroupOptions)>,
    /// Simulated work per entry.
    pub work: ComputeRange,
    /// Share of entries given back (`nack`) instead of acknowledged, 0..=1.
    pub fail_rate: f64,
    /// Stop as a crash would after receiving this many entries: the last is never answered.
    pub crash_after: Option<u64>,
    /// Seeds the work times and failures.
    pub seed: u64,
    /// Print a line per entry (`[PRIMARY] offset 7 attempt 1: payload`).
    pub print: bool,
}

/// One entry as the consumer saw it: a row of its CSV.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Consumed {
    /// When it arrived (this host's clock, µs since the Unix epoch).
    pub received_at_us: u64,
    /// `primary` or `backup`: the broker connection it came on.
    pub source: String,
    /// This member.
    pub consumer: String,
    /// The group.
    pub group: String,
    /// The entry's offset in its topic.
    pub offset: u64,
    /// Its delivery number in the group (1 = first).
    pub attempt: u32,
    /// Its publisher and sequence number.
    pub publisher: String,
    /// Its publisher's sequence number.
    pub seq: u64,
    /// When its publisher sent it.
    pub sent_at_us: u64,
    /// When the broker confirmed the acknowledgement (0 if it did not).
    pub acked_at_us: u64,
    /// `acked`; `unconfirmed` (acknowledged, and the connection went or the consumer stopped
    /// before the broker confirmed it: the ack may or may not have been stored); `nacked`;
    /// `refused` (the broker said why not, as when the lease had run out); `dropped` (never
    /// answered: the consumer stopped first); or `crashed` (`--crash-after`).
    pub outcome: String,
}

/// How a consumer's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerEnd {
    /// Stopped (signal, shutdown).
    Stopped,
    /// `crash_after` entries were received.
    Crashed,
}

/// What a broker connection hands the consumer.
enum Event {
    Msg(usize, GroupOp),
    Answer(usize, Frame),
    Lost(usize),
}

/// Runs the consumer until `shutdown` (or its planned crash), handing each entry's row to
/// `row` once its fate is known.
pub async fn run_consumer(
    cfg: ConsumerConfig,
    mut row: impl FnMut(&Consumed) -> anyhow::Result<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<ConsumerEnd> {
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let mut outs = Vec::new();
    for src in 0..2 {
        let (otx, orx) = mpsc::unbounded_channel::<Frame>();
        outs.push(otx);
        crate::net::spawn(connection(
            cfg.clone(),
            src,
            tx.clone(),
            orx,
            shutdown.clone(),
        ));
    }
    drop(tx);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut received = 0u64;
    // Entries given and not yet worked on, in arrival order.
    let mut queue: std::collections::VecDeque<(usize, Consumed)> = Default::default();
    // The entry being worked on, and when the work ends.
    let mut working: Option<(usize, Consumed, tokio::time::Instant)> = None;
    // Entries answered and not yet confirmed: (source, row, an ack rather than a nack).
    let mut waiting: Vec<(usize, Consumed, bool)> = Vec::new();
    loop {
        if working.is_none() {
            if let Some((src, c)) = queue.pop_front() {
                let ms = if cfg.work.max_ms == 0 {
                    0
                } else {
                    rng.gen_range(cfg.work.min_ms..=cfg.work.max_ms)
                };
                working = Some((
                    src,
                    c,
                    tokio::time::Instant::now() + Duration::from_millis(ms),
                ));
            }
        }
        let until = working.as_ref().map(|w| w.2);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        // Answers are taken while an entry is worked on, so each row is written when its
        // fate is known.
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(until.unwrap_or(far)), if until.is_some() => None,
            e = rx.recv() => match e {
                Some(e) => Some(e),
                None => break,
            },
        };
        let Some(ev) = ev else {
            // The work is done: acknowledge it, or give it back.
            let Some((src, c, _)) = working.take() else {
                continue;
            };
            let fail = cfg.fail_rate > 0.0 && rng.gen_bool(cfg.fail_rate.min(1.0));
            let (topic, group, offset) = (cfg.topic.clone(), cfg.group.clone(), c.offset);
            let f = if fail {
                Frame::Group(GroupOp::Nack {
                    topic,
                    group,
                    offset,
                    delay_ms: 0,
                })
            } else {
                Frame::Group(GroupOp::Ack {
                    topic,
                    group,
                    offset,
                })
            };
            if outs[src].send(f).is_err() {
                let mut c = c;
                c.outcome = "dropped".into();
                row(&c)?;
            } else {
                waiting.push((src, c, !fail));
            }
            continue;
        };
        match ev {
            Event::Msg(
                src,
                GroupOp::Msg {
                    group,
                    offset,
                    attempt,
                    id,
                    sent_us,
                    payload,
                    ..
                },
            ) => {
                received += 1;
                if cfg.print {
                    println!(
                        "[{}] offset {offset} attempt {attempt}: {payload}",
                        broker_name(src).to_uppercase()
                    );
                }
                let mut c = Consumed {
                    received_at_us: now_us(),
                    source: broker_name(src).to_string(),
                    consumer: cfg.name.clone(),
                    group,
                    offset,
                    attempt,
                    publisher: id.publisher.into_owned(),
                    seq: id.seq,
                    sent_at_us: sent_us,
                    acked_at_us: 0,
                    outcome: String::new(),
                };
                if cfg.crash_after.is_some_and(|n| received >= n) {
                    warn!("crashing on purpose after {received} entries (--crash-after)");
                    c.outcome = "crashed".into();
                    row(&c)?;
                    return Ok(ConsumerEnd::Crashed);
                }
                queue.push_back((src, c));
            }
            Event::Msg(..) => {}
            Event::Answer(src, frame) => {
                let (offset, outcome) = match &frame {
                    Frame::Group(GroupOp::Acked { offset, .. }) => (Some(*offset), "acked"),
                    Frame::Group(GroupOp::Nacked { offset, .. }) => (Some(*offset), "nacked"),
                    // Errors answer in order: the oldest unanswered entry of that connection.
                    // An ack the node could not confirm before it stopped being primary: the
                    // other node has it or delivers the entry again.
                    Frame::Err { reason } if reason.starts_with(ACK_UNCONFIRMED) => {
                        warn!("{} says: {reason}", broker_name(src));
                        (None, "unconfirmed")
                    }
                    Frame::Err { reason } => {
                        warn!("{} says: {reason}", broker_name(src));
                        (None, "refused")
                    }
                    _ => continue,
                };
                let i = waiting
                    .iter()
                    .position(|(s, c, _)| *s == src && offset.is_none_or(|o| c.offset == o));
                if let Some(i) = i {
                    let (_, mut c, _) = waiting.remove(i);
                    c.outcome = outcome.into();
                    if outcome == "acked" {
                        c.acked_at_us = now_us();
                    }
                    row(&c)?;
                }
            }
            Event::Lost(src) => {
                // Whatever that broker did not answer is not known to be acknowledged.
                let (lost, keep): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(|(s, _, _)| *s == src);
                waiting = keep;
                for (_, mut c, ack) in lost {
                    c.outcome = if ack { "unconfirmed" } else { "nacked" }.into();
                    row(&c)?;
                }
            }
        }
    }
    for (_, mut c) in queue.into_iter().chain(working.map(|(s, c, _)| (s, c))) {
        c.outcome = "dropped".into();
        row(&c)?;
    }
    for (_, mut c, ack) in waiting {
        c.outcome = if ack { "unconfirmed" } else { "nacked" }.into();
        row(&c)?;
    }
    Ok(ConsumerEnd::Stopped)
}

/// One broker connection: makes the group (if asked) and joins it, then passes entries and
/// answers on, and writes what the consumer sends; reconnects with a backoff.
async fn connection(
    cfg: ConsumerConfig,
    src: usize,
    tx: mpsc::Sender<Event>,
    mut out: mpsc::UnboundedReceiver<Frame>,
    shutdown: CancellationToken,
) {
    let name = broker_name(src);
    let addr = if src == 0 {
        cfg.brokers.primary.clone()
    } else {
        cfg.brokers.backup.clone()
    };
    let mut backoff = Duration::from_millis(10);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if let Ok(s) = cfg
            .net
            .connect_tls(&addr, Duration::from_secs(1), cfg.tls.as_ref())
            .await
        {
            let mut c = Framed::new(s, FrameCodec::default());
            let mut hello = Vec::new();
            if let Some((start, options)) = cfg.create {
                hello.push(Frame::Group(GroupOp::Create {
                    topic: cfg.topic.clone(),
                    group: cfg.group.clone(),
                    start,
                    options,
                }));
            }
            hello.push(Frame::Group(GroupOp::Join {
                topic: cfg.topic.clone(),
                group: cfg.group.clone(),
                consumer: cfg.name.clone(),
            }));
            let mut ok = true;
            for f in hello {
                ok &= c.send(f).await.is_ok();
            }
            if ok {
                backoff = Duration::from_millis(10);
                // Frames sent before the join was answered would race it.
                while let Ok(stale) = out.try_recv() {
                    drop(stale);
                }
                // A backup may not know the group yet (its record is on its way from the
                // primary): the join is tried again until it is answered.
                let mut rejoin: Option<tokio::time::Instant> = None;
                loop {
                    let wake = rejoin
                        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(wake), if rejoin.is_some() => {
                            rejoin = None;
                            let join = Frame::Group(GroupOp::Join {
                                topic: cfg.topic.clone(),
                                group: cfg.group.clone(),
                                consumer: cfg.name.clone(),
                            });
                            if c.send(join).await.is_err() {
                                break;
                            }
                        }
                        f = out.recv() => match f {
                            Some(f) => if c.send(f).await.is_err() { break },
                            None => return,
                        },
                        got = c.next() => match got {
                            Some(Ok(Frame::Group(m @ GroupOp::Msg { .. }))) => {
                                if tx.send(Event::Msg(src, m)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(Frame::Group(GroupOp::Joined { .. }))) => {
                                info!(
                                    "joined group '{}' on '{}' as {} on {name} ({addr})",
                                    cfg.group, cfg.topic, cfg.name
                                );
                            }
                            Some(Ok(Frame::Group(GroupOp::Created { .. }))) => {}
                            Some(Ok(Frame::Err { reason })) if reason.contains("made on the primary") => {}
                            Some(Ok(Frame::Err { reason })) if reason.starts_with("no group") => {
                                rejoin = Some(tokio::time::Instant::now() + Duration::from_millis(200));
                            }
                            Some(Ok(Frame::Err { reason })) if reason.contains("exists with other settings") => {
                                warn!("{name}: {reason}");
                            }
                            Some(Ok(f)) => {
                                if tx.send(Event::Answer(src, f)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => {
                                warn!("{name}: {e}");
                                break;
                            }
                            None => break,
                        },
                    }
                }
                info!("lost {name} ({addr}); reconnecting");
                if tx.send(Event::Lost(src)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}
