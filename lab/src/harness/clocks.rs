//! Each node's clock against the harness's, measured NTP-style over the nodes' own protocol
//! (`TIME`): four timestamps per exchange (harness sends t1, node receives t2 and answers t3,
//! harness receives t4); offset = ((t2 − t1) + (t3 − t4)) / 2, round trip = (t4 − t1) −
//! (t3 − t2); of several exchanges the one with the smallest round trip is kept, and half its
//! round trip bounds the error. On one host (or in namespaces of one host) the offset is ~0:
//! what it shows there is the method's own uncertainty.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::codec::Framed;

use edgepair::clock::now_us;
use edgepair::net::Net;
use edgepair::protocol::{Frame, FrameCodec};

/// Exchanges per measurement.
const EXCHANGES: usize = 8;

/// One node's clock offset at one moment of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClockReading {
    /// `primary` or `backup` (the role it was started in).
    pub node: String,
    /// `before` or `after` the run.
    pub when: String,
    /// Node clock minus harness clock, µs.
    pub offset_us: i64,
    /// Half the smallest round trip: the offset is right within this, µs.
    pub uncertainty_us: u64,
}

/// Measures the clock of the node at `addr`; `None` if it does not answer.
pub async fn measure(node: &str, when: &str, addr: &str) -> Option<ClockReading> {
    let s = Net::Tokio
        .connect(addr, Duration::from_secs(1))
        .await
        .ok()?;
    let mut f = Framed::new(s, FrameCodec::default());
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..EXCHANGES {
        let t1 = now_us();
        f.send(Frame::TimeQuery).await.ok()?;
        let answer = tokio::time::timeout(Duration::from_secs(1), f.next())
            .await
            .ok()??
            .ok()?;
        let t4 = now_us();
        let Frame::Time {
            received_us: t2,
            sent_us: t3,
        } = answer
        else {
            return None;
        };
        let (t1, t2, t3, t4) = (t1 as i64, t2 as i64, t3 as i64, t4 as i64);
        let round_trip = ((t4 - t1) - (t3 - t2)).max(0) as u64;
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        if best.is_none_or(|(rt, _)| round_trip < rt) {
            best = Some((round_trip, offset));
        }
    }
    let (rt, offset) = best?;
    Some(ClockReading {
        node: node.to_string(),
        when: when.to_string(),
        offset_us: offset,
        uncertainty_us: rt.div_ceil(2),
    })
}

/// The table line for the readings.
pub fn describe(readings: &[ClockReading]) -> String {
    readings
        .iter()
        .map(|r| {
            format!(
                "{} {:+.3} ± {:.3} ms ({})",
                r.node,
                r.offset_us as f64 / 1000.0,
                r.uncertainty_us as f64 / 1000.0,
                r.when
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
