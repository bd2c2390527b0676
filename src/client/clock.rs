//! This host's clock against a node's, measured NTP-style over the nodes' own `TIME` frame.
//!
//! A latency computed across hosts (sent on one clock, received on another) is wrong by the
//! difference of the two clocks. Four timestamps per exchange: we send at t1, the node receives
//! at t2 and answers at t3, we receive at t4; offset = ((t2 − t1) + (t3 − t4)) / 2 and round
//! trip = (t4 − t1) − (t3 − t2). Of several exchanges the one with the smallest round trip is
//! kept (the least queueing, so the most symmetric), and half its round trip bounds the error.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;

use crate::clock::now_us;
use crate::net::Net;
use crate::protocol::{Frame, FrameCodec};

/// One measurement of a node's clock against ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// The node's clock minus ours, µs.
    pub offset_us: i64,
    /// The smallest round trip seen, µs.
    pub round_trip_us: u64,
}

impl ClockOffset {
    /// The offset is right within this (half the round trip), µs.
    pub fn uncertainty_us(&self) -> u64 {
        self.round_trip_us.div_ceil(2)
    }
}

/// Measures the clock of the node at `addr` with `exchanges` exchanges, each given `timeout`.
/// Fails, saying why, when the node cannot be reached or does not answer `TIME` (a seed node).
pub async fn clock_offset(
    net: Net,
    addr: &str,
    exchanges: usize,
    timeout: Duration,
) -> anyhow::Result<ClockOffset> {
    use anyhow::{bail, Context};
    let s = net
        .connect(addr, timeout)
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    let mut f = Framed::new(s, FrameCodec::default());
    let mut best: Option<ClockOffset> = None;
    for _ in 0..exchanges.max(1) {
        let t1 = now_us();
        f.send(Frame::TimeQuery)
            .await
            .with_context(|| format!("cannot write to {addr}"))?;
        let answer = match tokio::time::timeout(timeout, f.next()).await {
            Err(_) => bail!("{addr} did not answer TIME within {timeout:?}"),
            Ok(None) => bail!("{addr} closed the connection"),
            Ok(Some(a)) => a.with_context(|| format!("reading from {addr}"))?,
        };
        let t4 = now_us();
        let Frame::Time {
            received_us: t2,
            sent_us: t3,
        } = answer
        else {
            bail!("{addr} answered TIME with something else: is it an edgepair node?");
        };
        let (t1, t2, t3, t4) = (t1 as i64, t2 as i64, t3 as i64, t4 as i64);
        let m = ClockOffset {
            offset_us: ((t2 - t1) + (t3 - t4)) / 2,
            round_trip_us: ((t4 - t1) - (t3 - t2)).max(0) as u64,
        };
        if best.is_none_or(|b| m.round_trip_us < b.round_trip_us) {
            best = Some(m);
        }
    }
    best.context("no exchange")
}
