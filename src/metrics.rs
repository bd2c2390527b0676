//! A node's metrics in the Prometheus text format (`--metrics ADDR`, `GET /metrics`), encoded
//! by `prometheus-client` from a [`Snapshot`] the core hands out in one piece: the state is the
//! very one `STATUS` reports at that moment, the counters are since the node started.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::{Snapshot, StageHist, STAGE_BOUNDS_US};
use crate::protocol::Role;

/// What the driver adds to the core's snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverCounts {
    /// Accepted connections open now.
    pub connections: u64,
    /// Subscribers disconnected for falling `--max-pending` behind.
    pub kicked: u64,
}

/// A histogram already counted elsewhere (the core's [`StageHist`]), in seconds.
#[derive(Debug)]
struct Stage(StageHist);

impl EncodeMetric for Stage {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets: Vec<(f64, u64)> = STAGE_BOUNDS_US
            .iter()
            .zip(self.0.buckets.iter())
            .map(|(b, n)| (*b as f64 / 1e6, *n))
            .collect();
        buckets.push((f64::MAX, self.0.buckets[STAGE_BOUNDS_US.len()]));
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_us as f64 / 1e6,
            self.0.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

/// The text a scrape gets.
pub fn encode(s: &Snapshot, d: &DriverCounts) -> String {
    let mut r = Registry::with_prefix("edgepair");
    let c = &s.counters;
    let gauges = [
        (
            "primary",
            "1 while this node is primary, 0 while backup",
            u64::from(s.role == Role::Primary),
        ),
        ("epoch", "The node's epoch (as in STATUS)", s.epoch),
        (
            "link_up",
            "Primary: 1 while the replication link is up. Backup: 1 once it has seen its \
             primary (STATUS armed)",
            u64::from(s.link == "up" || s.link == "armed"),
        ),
        (
            "inflight",
            "Messages accepted and not yet delivered (primary; STATUS inflight)",
            s.inflight,
        ),
        (
            "held",
            "Entries held past the delivered marks (backup; STATUS held)",
            s.held,
        ),
        ("connections", "Accepted connections open", d.connections),
    ];
    for (name, help, v) in gauges {
        r.register(name, help, gauge(v));
    }
    let counters = [
        (
            "published",
            "Publishes accepted and logged as primary",
            c.published,
        ),
        ("acknowledged", "ACKs sent to publishers", c.acknowledged),
        (
            "delivered",
            "Messages delivered to their topic's subscribers",
            c.delivered,
        ),
        (
            "refused",
            "Frames answered ERR by choice (stopping, a limit, an unauthenticated peer frame, \
             a failed log write)",
            c.refused,
        ),
        (
            "takeovers",
            "Times this node took over as primary",
            c.takeovers,
        ),
        (
            "dead_lettered",
            "Entries a consumer group moved to its topic's dead-letter topic",
            c.dead_lettered,
        ),
        (
            "kicked",
            "Subscribers disconnected for falling --max-pending behind",
            d.kicked,
        ),
    ];
    for (name, help, v) in counters {
        r.register(name, help, ConstCounter::new(v));
    }
    let stages = [
        (
            "queue_wait_seconds",
            "From receipt to the start of compute",
            &c.queue_wait,
        ),
        ("compute_seconds", "Compute of each message", &c.compute),
        (
            "delivery_seconds",
            "From the end of compute (or receipt, without compute) to delivery",
            &c.delivery,
        ),
    ];
    for (name, help, h) in stages {
        r.register(name, help, Stage(h.clone()));
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Serves `GET /metrics` on `listener`: each scrape asks the node's driver for the text (so it
/// is read in one step of the node, as `STATUS` is). Anything else gets `404` or `400`; a
/// request head must arrive within 5 s and 8 KiB.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scrapes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let scrapes = scrapes.clone();
        crate::net::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (status, body) = match (parts.next(), parts.next()) {
                (Some("GET"), Some("/metrics")) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if scrapes.send(tx).await.is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(text) => ("200 OK", text),
                        Err(_) => return,
                    }
                }
                (Some(_), Some(_)) => ("404 Not Found", "only GET /metrics here\n".to_string()),
                _ => (
                    "400 Bad Request",
                    "expected an HTTP request line\n".to_string(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Counters;

    #[test]
    fn a_snapshot_reads_back_as_prometheus_text() {
        let mut counters = Counters {
            published: 7,
            acknowledged: 6,
            ..Default::default()
        };
        counters.compute.observe(120_000);
        let s = Snapshot {
            role: Role::Primary,
            epoch: 3,
            link: "up".into(),
            held: 0,
            inflight: 1,
            counters,
        };
        let t = encode(&s, &DriverCounts::default());
        for line in [
            "edgepair_primary 1",
            "edgepair_epoch 3",
            "edgepair_link_up 1",
            "edgepair_published_total 7",
            "edgepair_acknowledged_total 6",
            "edgepair_compute_seconds_count 1",
            "edgepair_compute_seconds_bucket{le=\"0.25\"} 1",
            "edgepair_compute_seconds_bucket{le=\"0.1\"} 0",
        ] {
            assert!(t.lines().any(|l| l == line), "no '{line}' in:\n{t}");
        }
    }
}
