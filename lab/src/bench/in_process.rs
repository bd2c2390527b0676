//! The relay path's own cost, inside one process: the codec and the core of a solo primary,
//! no sockets, no tasks, no other process on the cores.
//!
//! The throughput figures move ±15 % between runs on this shared machine, more than most
//! single changes to the relay path are worth; this one moves far less, and under
//! `valgrind --tool=callgrind` (`bench --only core`) its instruction count per message is the
//! same from run to run, which is what a change of a few per cent is judged by.

use std::time::{Duration, Instant};

use anyhow::bail;
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

/// The core as the `primary` binary makes it with `--compute 0` and no backup (the driver's
/// own settings, [`NodeConfig::core_config`]), on the in-memory log it gets without a data
/// directory.
fn solo_primary(now: Now) -> Broker {
    let off = "0".parse().expect("0 is a compute range");
    let compute = Compute::new(off, ComputeMode::Sleep, None, 0);
    let cfg = NodeConfig::new(Role::Primary, None, compute).core_config();
    let log = Box::new(MemLog::new(DEFAULT_RETAIN_ENTRIES));
    Broker::with_log(cfg, log, now)
}

/// What the core sent, counted in lines per connection.
#[derive(Default)]
struct Sink {
    acks: u64,
    delivered: u64,
}

impl Sink {
    fn drain(&mut self, b: &mut Broker, sub: ConnId, publ: ConnId, now: Now) -> anyhow::Result<()> {
        while let Some(o) = b.poll_output() {
            match o {
                Output::Send { conn, line, .. } => {
                    let lines = memchr::memchr_iter(b'\n', &line).count() as u64;
                    if conn == sub {
                        self.delivered += lines;
                    } else if conn == publ {
                        self.acks += lines;
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

    let mut wire = Vec::with_capacity(n as usize * 80);
    let pad = "x".repeat(48);
    for i in 0..n {
        wire.extend_from_slice(format!("PUBLISH|bench|{i:016}{pad}\n").as_bytes());
    }
    let t = Instant::now();
    pump(&mut b, &mut sink, &wire, (sub, publ), now)?;
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    if sink.acks != n || sink.delivered != n {
        bail!(
            "{n} published: {} acknowledged, {} delivered",
            sink.acks,
            sink.delivered
        );
    }
    Ok(ns)
}

/// Hands `wire` to the core a read at a time, as the driver would. A function of its own so
/// that callgrind can count it alone (`--toggle-collect='*in_process::pump*'`).
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
            let mut handled = 0;
            while handled < BATCH {
                match codec.decode(&mut buf)? {
                    Some(Ok(f)) => b.handle_frame(publ, f, now),
                    Some(Err(e)) => bail!("a bench line did not parse: {e}"),
                    None => break,
                }
                handled += 1;
            }
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
}
