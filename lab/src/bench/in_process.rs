//! The relay path's own cost, inside one process: the codec and the core of a solo primary
//! (or of a primary and its backup, wired together in memory), no sockets, no tasks, no other
//! process on the cores.
//!
//! The throughput figures move ±15 % between runs on this shared machine, more than most
//! single changes to the relay path are worth; this one moves far less, and under
//! `valgrind --tool=callgrind` (`bench --only core`) its instruction count per message is the
//! same from run to run, which is what a change of a few per cent is judged by.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Decoder;

use edgepair::compute::{Compute, ComputeMode};
use edgepair::core::{Broker, ConnId, Now, Output, Time};
use edgepair::driver::NodeConfig;
use edgepair::log::{MemLog, DEFAULT_RETAIN_ENTRIES};
use edgepair::protocol::{Frame, LenientCodec, Role};

/// Bytes handed to the codec at a time: a pipelining publisher's read (`driver/io.rs`).
const READ: usize = 64 * 1024;
/// Frames handed to the core per event, as the driver does.
const BATCH: usize = 256;

/// The core as the `primary` (or `backup`) binary makes it with `--compute 0` (the driver's
/// own settings, [`NodeConfig::core_config`]), on the in-memory log it gets without a data
/// directory.
fn node(role: Role, peer: Option<&str>, now: Now) -> Broker {
    let off = "0".parse().expect("0 is a compute range");
    let compute = Compute::new(off, ComputeMode::Sleep, None, 0);
    let mut cfg = NodeConfig::new(role, peer.map(String::from), compute);
    // The binaries always have one (a secret file, or one they make): the pair's link
    // authenticates before it carries anything.
    cfg.peer_key = Some(edgepair::core::PeerKey::new(b"in-process bench"));
    let cfg = cfg.core_config();
    let log = Box::new(MemLog::new(DEFAULT_RETAIN_ENTRIES));
    Broker::with_log(cfg, log, now)
}

fn solo_primary(now: Now) -> Broker {
    node(Role::Primary, None, now)
}

/// What the core sent, counted in lines per connection.
#[derive(Default)]
struct Sink {
    acks: u64,
    delivered: u64,
    /// Sends to the publisher with an `ERR` in them (refusals, not acknowledgements).
    refused: u64,
}

impl Sink {
    /// Counts the lines of `line`, sent to `conn`.
    #[inline(always)]
    fn count(&mut self, conn: ConnId, line: &[u8], (sub, publ): (ConnId, ConnId)) {
        let lines = memchr::memchr_iter(b'\n', line).count() as u64;
        if conn == sub {
            self.delivered += lines;
        } else if conn == publ {
            self.acks += lines;
            if memchr::memmem::find(line, b"ERR").is_some() {
                self.refused += 1;
            }
        }
    }

    fn drain(&mut self, b: &mut Broker, sub: ConnId, publ: ConnId, now: Now) -> anyhow::Result<()> {
        while let Some(o) = b.poll_output() {
            match o {
                Output::Send { conn, line, .. } => self.count(conn, &line, (sub, publ)),
                Output::Deliver { conns, line } => {
                    for conn in conns {
                        self.count(conn, &line, (sub, publ));
                    }
                }
                Output::Writable { conn } => b.handle_writable(conn, now),
                Output::Close { conn } => bail!("the core closed connection {conn}"),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Nanoseconds of this process's time per seed-dialect publish of a 64-byte payload relayed
/// by a solo primary to one `SUBSCRIBE`r: cut from the bytes a read gives, handled, `ACK`ed,
/// delivered (the lines the core hands to the writers are counted, not written). Fails unless
/// every message was acknowledged and delivered.
pub(super) fn relay_cost(n: u64) -> anyhow::Result<f64> {
    let mut now = Now {
        mono: Time(0),
        wall_us: 1_735_689_600_000_000,
    };
    let mut b = solo_primary(now);
    let mut sink = Sink::default();
    let sub = b.handle_accepted(now);
    let publ = b.handle_accepted(now);
    b.handle_frame(
        sub,
        Frame::Subscribe {
            topic: "bench".into(),
        },
        now,
    );
    // Past the startup grace, after which a fresh primary delivers.
    let step = Duration::from_secs(2);
    now.mono = now.mono + step;
    now.wall_us += step.as_micros() as u64;
    b.handle_timeout(now);
    sink.drain(&mut b, sub, publ, now)?;

    let wire = seed_publishes(n);
    let t = Instant::now();
    pump(&mut b, &mut sink, &wire, (sub, publ), now)?;
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    if sink.acks != n || sink.delivered != n || sink.refused > 0 {
        bail!(
            "{n} published: {} acknowledged ({} replies refusing), {} delivered",
            sink.acks,
            sink.refused,
            sink.delivered
        );
    }
    Ok(ns)
}

/// Cuts up to [`BATCH`] frames from `buf` and hands each to `handle`, as the driver does with
/// one event's worth; returns how many (fewer: `buf` holds no more whole frames).
#[inline(always)]
fn decode_batch(
    codec: &mut LenientCodec,
    buf: &mut BytesMut,
    mut handle: impl FnMut(Frame),
) -> anyhow::Result<usize> {
    let mut handled = 0;
    while handled < BATCH {
        match codec.decode(buf)? {
            Some(Ok(f)) => handle(f),
            Some(Err(e)) => bail!(e),
            None => break,
        }
        handled += 1;
    }
    Ok(handled)
}

/// `n` seed-dialect publishes on topic `bench`, 64-byte payloads.
fn seed_publishes(n: u64) -> Vec<u8> {
    let mut wire = Vec::with_capacity(n as usize * 80);
    let pad = "x".repeat(48);
    for i in 0..n {
        wire.extend_from_slice(format!("PUBLISH|bench|{i:016}{pad}\n").as_bytes());
    }
    wire
}

/// Hands `wire` to the core a read at a time, as the driver would. A function of its own so
/// that callgrind can count it alone (`--toggle-collect='*in_process::pump'`; the pair's is
/// `pump_pair`).
#[inline(never)]
fn pump(
    b: &mut Broker,
    sink: &mut Sink,
    wire: &[u8],
    (sub, publ): (ConnId, ConnId),
    mut now: Now,
) -> anyhow::Result<()> {
    let mut codec = LenientCodec::default();
    let mut buf = BytesMut::with_capacity(2 * READ);
    for read in wire.chunks(READ) {
        buf.extend_from_slice(read);
        loop {
            let handled = decode_batch(&mut codec, &mut buf, |f| b.handle_frame(publ, f, now))
                .context("a bench line did not parse")?;
            // One clock reading per batch, as the driver takes it.
            now.mono = now.mono + Duration::from_micros(20);
            now.wall_us += 20;
            sink.drain(b, sub, publ, now)?;
            if handled < BATCH {
                break;
            }
        }
    }
    Ok(())
}

/// The primary (node 0) and the backup (node 1) of a pair, their link in memory: what one
/// sends on a link is cut into frames by the other's codec, as its driver's reader would.
struct Pair {
    nodes: [Broker; 2],
    /// The ends of each link (a handful: searched, not hashed, so that the rig's own cost
    /// stays out of the figure), each with the bytes sent to it and not yet handled and the
    /// codec of its reader.
    ends: Vec<End>,
    /// Ends (indexes into `ends`) with bytes waiting.
    due: Vec<usize>,
    now: Now,
}

/// One end of a link between the two nodes.
struct End {
    /// This end: node and connection.
    at: (usize, ConnId),
    /// The other end.
    peer: (usize, ConnId),
    codec: LenientCodec,
    inbound: BytesMut,
}

impl Pair {
    /// A primary and its backup, linked (the backup's copy is what the primary's `ACK`s wait
    /// for), past the primary's startup grace.
    fn linked() -> anyhow::Result<Pair> {
        let now = Now {
            mono: Time(0),
            wall_us: 1_735_689_600_000_000,
        };
        let nodes = [
            node(Role::Primary, Some("backup:1"), now),
            node(Role::Backup, Some("primary:1"), now),
        ];
        let mut pair = Pair {
            nodes,
            ends: Vec::new(),
            due: Vec::new(),
            now,
        };
        // Simulated time in 10 ms steps, every timer that is due fired, until the link is up.
        for _ in 0..500 {
            pair.tick(Duration::from_millis(10))?;
            let up = |b: &Broker| matches!(b.status(), Frame::Status { link, .. } if link == "up");
            if up(&pair.nodes[0]) && pair.now.mono.0 > Duration::from_secs(2).as_micros() as u64 {
                return Ok(pair);
            }
        }
        bail!("the in-process pair did not link in 5 simulated seconds")
    }

    /// Moves the clock on by `step` and fires the timers now due, then settles.
    fn tick(&mut self, step: Duration) -> anyhow::Result<()> {
        self.now.mono = self.now.mono + step;
        self.now.wall_us += step.as_micros() as u64;
        for n in 0..2 {
            if self.nodes[n]
                .poll_timeout()
                .is_some_and(|t| t <= self.now.mono)
            {
                self.nodes[n].handle_timeout(self.now);
            }
        }
        self.settle(&mut Sink::default(), (0, 0))
    }

    /// Acts on what each node asked for and hands the links' bytes to the other side, until
    /// neither has anything left to do. The primary's lines to `sub` and `publ` are counted.
    fn settle(&mut self, sink: &mut Sink, (sub, publ): (ConnId, ConnId)) -> anyhow::Result<()> {
        loop {
            let mut idle = true;
            for n in 0..2 {
                while let Some(o) = self.nodes[n].poll_output() {
                    idle = false;
                    self.act(n, o, sink, (sub, publ))?;
                }
            }
            while let Some(i) = self.due.pop() {
                idle = false;
                let Some(end) = self.ends.get_mut(i) else {
                    continue;
                };
                let (n, conn) = end.at;
                let node = &mut self.nodes[n];
                let now = self.now;
                let handled = decode_batch(&mut end.codec, &mut end.inbound, |f| {
                    node.handle_frame(conn, f, now)
                })
                .context("a line between the nodes did not parse")?;
                if handled == BATCH {
                    self.due.push(i);
                }
                // As the driver, between batches: every output of the batch acted on.
                while let Some(o) = self.nodes[n].poll_output() {
                    self.act(n, o, sink, (sub, publ))?;
                }
            }
            if idle {
                return Ok(());
            }
        }
    }

    fn end_of(&self, at: (usize, ConnId)) -> Option<usize> {
        self.ends.iter().position(|e| e.at == at)
    }

    /// Bytes node `n` wrote to `conn`: to the other node's end of a link, or counted by the
    /// sink if they are the primary's to a client.
    fn carry(
        &mut self,
        n: usize,
        conn: ConnId,
        line: &[u8],
        sink: &mut Sink,
        (sub, publ): (ConnId, ConnId),
    ) {
        match self.end_of((n, conn)) {
            Some(i) => {
                let peer = self.ends[i].peer;
                if let Some(j) = self.end_of(peer) {
                    self.ends[j].inbound.extend_from_slice(line);
                    if !self.due.contains(&j) {
                        self.due.push(j);
                    }
                }
            }
            None if n == 0 => sink.count(conn, line, (sub, publ)),
            None => {}
        }
    }

    fn act(
        &mut self,
        n: usize,
        o: Output,
        sink: &mut Sink,
        (sub, publ): (ConnId, ConnId),
    ) -> anyhow::Result<()> {
        match o {
            Output::Send { conn, line, .. } => self.carry(n, conn, &line, sink, (sub, publ)),
            Output::Deliver { conns, line } => {
                for conn in conns {
                    self.carry(n, conn, &line, sink, (sub, publ));
                }
            }
            Output::Connect { conn, .. } => {
                let m = 1 - n;
                let mc = self.nodes[m].handle_accepted(self.now);
                for (at, peer) in [((n, conn), (m, mc)), ((m, mc), (n, conn))] {
                    self.ends.push(End {
                        at,
                        peer,
                        codec: LenientCodec::default(),
                        inbound: BytesMut::with_capacity(2 * READ),
                    });
                }
                self.nodes[n].handle_connected(conn, self.now);
            }
            Output::Writable { conn } => self.nodes[n].handle_writable(conn, self.now),
            Output::Sync => self.nodes[n].handle_sync(self.now),
            Output::Close { conn } => match self.end_of((n, conn)) {
                // A link the node is done with (a probe, a link it replaced): the other end
                // sees it close.
                Some(i) => {
                    let (m, mc) = self.ends[i].peer;
                    self.ends.retain(|e| e.at != (n, conn) && e.at != (m, mc));
                    // Indexes moved; the ends still waiting are found again.
                    self.due = (0..self.ends.len()).collect();
                    self.nodes[m].handle_closed(mc, self.now);
                }
                None => bail!("node {n} closed connection {conn}"),
            },
            Output::Compute { mid } => bail!("node {n} computes message {mid} with --compute 0"),
            Output::Hold { .. } => {}
        }
        Ok(())
    }
}

/// [`relay_cost`] through a replicated pair: each publish is replicated to the backup (`REPL`
/// frames, answered by cumulative `STORED`s) before its `ACK`, and its delivered mark goes
/// back (`CLR`); both nodes' codecs and cores are counted.
pub(super) fn pair_relay_cost(n: u64) -> anyhow::Result<f64> {
    let mut pair = Pair::linked()?;
    let mut sink = Sink::default();
    let now = pair.now;
    let sub = pair.nodes[0].handle_accepted(now);
    let publ = pair.nodes[0].handle_accepted(now);
    pair.nodes[0].handle_frame(
        sub,
        Frame::Subscribe {
            topic: "bench".into(),
        },
        now,
    );
    pair.settle(&mut sink, (sub, publ))?;
    let wire = seed_publishes(n);
    let t = Instant::now();
    pump_pair(&mut pair, &mut sink, &wire, (sub, publ))?;
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    if sink.acks != n || sink.delivered != n || sink.refused > 0 {
        bail!(
            "{n} published through the pair: {} acknowledged ({} replies refusing), {} delivered",
            sink.acks,
            sink.refused,
            sink.delivered
        );
    }
    // Every one went through the backup: it holds them all, and the link stayed up (a primary
    // whose link fell acknowledges alone, a cheaper path than the one measured).
    let stored = pair.nodes[1].log().next_offset("bench");
    let up = matches!(pair.nodes[0].status(), Frame::Status { link, .. } if link == "up");
    if stored != n || !up {
        bail!("{n} published through the pair: the backup stored {stored}, link up: {up}");
    }
    Ok(ns)
}

/// [`pump`] for the pair: after each batch of the publisher's frames, the nodes exchange what
/// they have for each other until both are idle.
#[inline(never)]
fn pump_pair(
    pair: &mut Pair,
    sink: &mut Sink,
    wire: &[u8],
    (sub, publ): (ConnId, ConnId),
) -> anyhow::Result<()> {
    let mut codec = LenientCodec::default();
    let mut buf = BytesMut::with_capacity(2 * READ);
    for read in wire.chunks(READ) {
        buf.extend_from_slice(read);
        loop {
            let (node, now) = (&mut pair.nodes[0], pair.now);
            let handled = decode_batch(&mut codec, &mut buf, |f| node.handle_frame(publ, f, now))
                .context("a bench line did not parse")?;
            pair.now.mono = pair.now.mono + Duration::from_micros(20);
            pair.now.wall_us += 20;
            pair.settle(sink, (sub, publ))?;
            if handled < BATCH {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure counts what the core sent: every publish acknowledged and delivered, or an
    /// error (a core that dropped one, or a bench that fed it nothing, gives no figure).
    #[test]
    fn every_publish_is_acknowledged_and_delivered_or_there_is_no_figure() {
        let ns = relay_cost(5_000).expect("a figure");
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
    }

    /// A refusal to the publisher is counted as one, so a run whose publishes were refused
    /// gives no figure even though a line came back for each.
    #[test]
    fn an_err_to_the_publisher_is_counted_as_a_refusal() {
        let (sub, publ) = (1, 2);
        let mut sink = Sink::default();
        sink.count(publ, b"ACK\n", (sub, publ));
        sink.count(publ, b"ERR|not stored: disk full\n", (sub, publ));
        sink.count(sub, b"payload\n", (sub, publ));
        assert_eq!((sink.acks, sink.refused, sink.delivered), (2, 1, 1));
    }

    /// Through the pair too: the backup's `STORED`s release the `ACK`s and the deliveries, so
    /// a figure means the link carried every message both ways.
    #[test]
    fn through_the_pair_every_publish_is_acknowledged_and_delivered() {
        let ns = pair_relay_cost(5_000).expect("a figure");
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
    }
}
