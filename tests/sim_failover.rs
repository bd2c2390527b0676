//! The very node and client code of the binaries, run inside turmoil's deterministic network
//! simulator: a primary crash mid-stream loses nothing, in simulated time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgepair::client::{self, Brokers, PublisherConfig, SubscriberConfig};
use edgepair::compute::{Compute, ComputeMode, ComputeRange};
use edgepair::net::Net;
use edgepair::node::{self, NodeConfig};
use edgepair::protocol::Role;
use edgepair::report::Delivery;
use tokio_util::sync::CancellationToken;

fn broker(
    role: Role,
    port: u16,
    peer: &'static str,
    seed: u64,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = turmoil::Result> + 'static>> {
    move || {
        Box::pin(async move {
            let listener = Net::Sim.bind(&format!("0.0.0.0:{port}")).await?;
            let compute = Compute::new(ComputeRange::DEFAULT, ComputeMode::Sleep, Some(seed), 0);
            let mut cfg = NodeConfig::new(role, Some(peer.to_string()), compute);
            cfg.net = Net::Sim;
            node::run(listener, cfg, CancellationToken::new())
                .await
                .map_err(|e| e.to_string().into())
        })
    }
}

fn run(seed: u64, crash_at: Duration, total: u64) -> (Vec<Delivery>, client::PubSummary) {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(seed)
        .build();
    sim.host("primary", broker(Role::Primary, 8080, "backup:8081", seed));
    sim.host(
        "backup",
        broker(Role::Backup, 8081, "primary:8080", seed + 1),
    );
    let got: Arc<Mutex<(Vec<Delivery>, client::PubSummary)>> = Arc::default();
    let out = got.clone();
    sim.client("clients", async move {
        let brokers = Brokers {
            primary: "primary:8080".into(),
            backup: "backup:8081".into(),
        };
        let stop = CancellationToken::new();
        let sub_cfg = SubscriberConfig {
            topic: "t".into(),
            brokers: brokers.clone(),
            net: Net::Sim,
        };
        let sub_stop = stop.clone();
        let sub = edgepair::net::spawn(async move {
            let mut v: Vec<Delivery> = Vec::new();
            let _ = client::run_subscriber(sub_cfg, &mut v, sub_stop).await;
            v
        });
        // Let both subscriptions land before publishing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (ev, _evr) = tokio::sync::mpsc::unbounded_channel();
        let cfg = PublisherConfig {
            topic: "t".into(),
            brokers,
            id: "sim".into(),
            ack_timeout: Duration::from_millis(500),
            resend: 5,
            give_up: Duration::from_secs(10),
            net: Net::Sim,
        };
        let publisher =
            edgepair::net::spawn(client::run_publisher(cfg, rx, ev, CancellationToken::new()));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for seq in 1..=total {
            tick.tick().await;
            let _ = tx.send((seq, seq.to_string())).await;
        }
        drop(tx);
        let summary = publisher.await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        let deliveries = sub.await?;
        if let Ok(mut g) = out.lock() {
            *g = (deliveries, summary);
        }
        Ok(())
    });
    let mut crashed = false;
    loop {
        if !crashed && sim.elapsed() >= crash_at {
            sim.crash("primary");
            crashed = true;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => panic!("simulation failed: {e}"),
        }
    }
    let g = got.lock().expect("results");
    (g.0.clone(), g.1.clone())
}

#[test]
fn simulated_primary_crash_loses_nothing() {
    let total = 80;
    let (deliveries, summary) = run(7, Duration::from_millis(4_250), total);
    assert!(
        summary.unacked.is_empty(),
        "unacknowledged: {:?}",
        summary.unacked
    );
    let seqs: std::collections::BTreeSet<u64> = deliveries.iter().map(|d| d.seq).collect();
    let missing: Vec<u64> = (1..=total).filter(|s| !seqs.contains(s)).collect();
    assert!(missing.is_empty(), "missing {missing:?}");
    assert!(
        deliveries.iter().any(|d| d.source == "backup"),
        "the backup never delivered"
    );
}

/// Same seed, same trace, bit for bit, crash and takeover included, even for two runs in one
/// process (which is why node code spawns through `net::spawn`).
#[test]
fn simulation_is_reproducible_from_its_seed() {
    let key = |v: &[Delivery]| -> Vec<(String, u64, u64, bool, u64)> {
        v.iter()
            .map(|d| {
                (
                    d.source.clone(),
                    d.seq,
                    d.received_at_us,
                    d.duplicate,
                    d.epoch,
                )
            })
            .collect()
    };
    let a = run(11, Duration::from_millis(3_000), 40).0;
    let b = run(11, Duration::from_millis(3_000), 40).0;
    assert!(!a.is_empty());
    assert_eq!(key(&a), key(&b));
}
