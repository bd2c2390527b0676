//! Deterministic simulation: the very node and client code of the binaries, run as hosts of
//! turmoil's simulated network, under a random fault schedule drawn from a seed.
//!
//! One seed gives one run, bit for bit: the schedule comes from the seed, the network's own
//! randomness is seeded by it, time is virtual, and every task the node code spawns goes on its
//! host's `LocalSet` (see [`edgepair::net::spawn`]). A failing seed is replayed with
//! `simulate --seed S`.
//!
//! After the publisher stops and the system has been quiet for a while, each run is judged by
//! [`crate::check::check`], the same checker as the harness's: nothing acknowledged lost, every
//! produced message delivered, reordering counted, one node per epoch and no stale epoch (split
//! brain during link faults counted apart), duplicates within `resend × (faults + 1)`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::check;
use crate::report::Delivery;
use edgepair::client::{self, Brokers, PublisherConfig, SubscriberConfig};
use edgepair::compute::{Compute, ComputeMode, ComputeRange};
use edgepair::driver::{self, NodeConfig};
use edgepair::log::{Fsync, BATCH_ENTRIES, BATCH_INTERVAL};
use edgepair::net::Net;
use edgepair::protocol::{MsgId, Role};

pub mod disk;
pub mod report;

pub use disk::{PowerLoss, SimDisk};

/// A kind of fault the schedule may draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// Kill a broker's process and bring it back after a while. Its disk is kept whole (the
    /// page cache outlives a killed process): it restarts on its log.
    Crash,
    /// Kill a broker's process and restart it at once, on its log.
    Restart,
    /// Cut the primary↔backup link for a while.
    Partition,
    /// Hold (delay, not drop) everything on the primary↔backup link for a while.
    Hold,
    /// Raise the primary↔backup link latency for a while.
    Latency,
    /// Cut a broker's power: it stops, its disk loses every entry not yet synced, and it
    /// restarts on what is left after a while.
    Power,
    /// Cut both brokers' power at once, each losing what it had not synced; both restart
    /// after a while.
    PowerBoth,
}

impl FaultKind {
    /// The faults the simulation had before it modelled the disk: the schedules of the
    /// regression seeds in `lab/tests/sim_seeds.rs` were drawn from this list (the schedule
    /// depends on the list, so it is kept).
    pub const PROCESS_AND_LINK: [FaultKind; 5] = [
        FaultKind::Crash,
        FaultKind::Restart,
        FaultKind::Partition,
        FaultKind::Hold,
        FaultKind::Latency,
    ];
}

/// Settings of a simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Simulated publishing time.
    pub duration: Duration,
    /// Messages per second.
    pub rate: f64,
    /// Faults to draw from.
    pub faults: Vec<FaultKind>,
    /// Backup's ping interval.
    pub ping_interval: Duration,
    /// How long a `PING` may go unanswered before the backup takes over.
    pub ping_timeout: Duration,
    /// Publisher's ack timeout.
    pub ack_timeout: Duration,
    /// Publisher's resend window.
    pub resend: usize,
    /// Both nodes' `--fsync` policy; what a power loss may take depends on it.
    pub fsync: Fsync,
    /// Run the nodes without a disk, as without `--data-dir`: a crash loses the node's whole
    /// log (the simulation before it modelled the disk). Power faults then are crashes, and
    /// nothing is excused as lost by policy.
    pub memory_only: bool,
    /// Both nodes' `--lease`: reigns that never overlap, paid for in failover time.
    pub lease: Option<Duration>,
    /// Three consumers share the topic in a group, judged by [`check::check_group`].
    pub group: bool,
    /// Journal entries between snapshots of the groups: small, so that a run of 400 entries
    /// compacts the journal a few times, under the faults ([`SIM_JOURNAL_COMPACT`]).
    pub journal_compact: u64,
}

/// The simulation's journal compaction interval: a group run writes some 500 journal
/// entries, so this compacts about a dozen times a run.
pub const SIM_JOURNAL_COMPACT: u64 = 40;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            duration: Duration::from_secs(40),
            rate: 10.0,
            faults: vec![
                FaultKind::Crash,
                FaultKind::Restart,
                FaultKind::Partition,
                FaultKind::Hold,
                FaultKind::Latency,
                FaultKind::Power,
                FaultKind::PowerBoth,
            ],
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(300),
            ack_timeout: Duration::from_millis(500),
            resend: 5,
            lease: None,
            fsync: Fsync::default(),
            memory_only: false,
            group: false,
            journal_compact: SIM_JOURNAL_COMPACT,
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// When, from the start of publishing.
    pub at: Duration,
    /// What.
    pub kind: FaultKind,
    /// Which broker (for crash, restart and power; `both` for power-both).
    pub host: &'static str,
    /// How long it lasts.
    pub lasts: Duration,
}

/// The outcome of one seed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SimResult {
    /// The seed.
    pub seed: u64,
    /// The schedule, as text.
    pub faults: String,
    /// Messages produced.
    pub published: u64,
    /// Acknowledged messages never delivered.
    pub lost_acked: u64,
    /// Produced messages never delivered, acknowledged or not.
    pub lost: u64,
    /// Duplicate deliveries (of a sequence number delivered before).
    pub duplicates: u64,
    /// Allowed duplicates: `resend × (faults + 1)` ([`check::duplicate_bound`]).
    pub duplicate_bound: u64,
    /// First deliveries after a higher sequence number.
    pub reordered: u64,
    /// Deliveries in one epoch by two nodes, or in an older epoch than one already delivered in,
    /// outside the split-brain window of a link fault ([`check::excused_until_us`]).
    pub stale: u64,
    /// The same, inside that window (split brain: reported, not a violation).
    pub split_brain: u64,
    /// Longest silence at the subscriber, ms.
    pub longest_gap_ms: f64,
    /// Number of distinct epochs that delivered, less one.
    pub failovers: u64,
    /// Longest failover gap, ms (see `failover_gaps_ms`).
    pub max_failover_gap_ms: f64,
    /// Silence at the subscriber around each change of reign: from the last delivery before the
    /// first delivery of a new epoch to that delivery, ms. Includes the publishing period (100 ms
    /// at 10 msg/s) and the ack timeout a publisher waits before it switches.
    #[serde(skip)]
    pub failover_gaps_ms: Vec<f64>,
    /// Violated invariants, empty when the run is clean.
    pub violations: String,
    /// Produced messages never delivered that had not been acknowledged (part of `lost`; the
    /// rest is `lost_acked`). Last, so that `simulation.csv`'s earlier columns stay where they
    /// were.
    pub lost_unacked: u64,
    /// Of `lost_acked`, the messages the fsync policy allowed to lose: under `batch` and
    /// `never`, acknowledged messages that a power loss of both nodes took off both disks
    /// before either had synced them (see [`lost_by_policy`]). Not a violation; every other
    /// acknowledged loss is.
    pub lost_by_policy: u64,
    /// Entries the power losses of the run took off the disks, both nodes together (unsynced
    /// entries; acknowledged or not, delivered or not).
    pub power_dropped: u64,
    /// Longest time an entry dropped by a power loss had waited for its sync, ms.
    pub power_oldest_unsynced_ms: f64,
    /// With a consumer group: acknowledgements the members got confirmed.
    pub group_acked: u64,
    /// With a consumer group: deliveries to it that were not an entry's first.
    pub group_redelivered: u64,
}

/// One power loss as the simulation saw it.
#[derive(Debug, Clone)]
pub struct PowerEvent {
    /// The node, or `both`.
    pub host: &'static str,
    /// What each node's disk lost, by node.
    pub losses: Vec<(&'static str, PowerLoss)>,
    /// After a power loss of both nodes: the identities dropped that neither disk still holds.
    pub gone: BTreeSet<MsgId>,
}

/// What a policy allows a run to lose: the acknowledged messages (`lost_acked`) that a power
/// loss of both nodes took off both disks, under `batch` and `never`. `always` allows nothing
/// (every `ACK` waited for both nodes' fsync, or for the primary's alone while it ran
/// degraded); nor does a power loss of one node under any policy (the other node holds what was
/// acknowledged), nor a process crash (the disk keeps what was written).
pub fn lost_by_policy(
    fsync: Fsync,
    publisher: &str,
    lost_acked: &[u64],
    power: &[PowerEvent],
) -> BTreeSet<u64> {
    if fsync == Fsync::Always {
        return BTreeSet::new();
    }
    lost_acked
        .iter()
        .copied()
        .filter(|&seq| {
            let id = MsgId {
                publisher: publisher.to_string().into(),
                seq,
            };
            power.iter().any(|p| p.gone.contains(&id))
        })
        .collect()
}

/// What `batch` promises of the disk itself, checked at every power loss: no entry dropped had
/// waited more than [`BATCH_INTERVAL`] for its sync (plus one tick of the simulation's clock,
/// on which the sync timer fires), and no more than [`BATCH_ENTRIES`] were dropped. `always`
/// and `never` promise nothing here (`always` syncs before it answers, whatever is dropped was
/// not answered yet; `never` leaves it all to the OS, which the model never lets write back).
pub fn batch_window_violations(fsync: Fsync, tick: Duration, power: &[PowerEvent]) -> Vec<String> {
    if fsync != Fsync::Batch {
        return Vec::new();
    }
    let mut v = Vec::new();
    for (host, loss) in power.iter().flat_map(|p| p.losses.iter()) {
        if loss.oldest_unsynced > BATCH_INTERVAL + tick || loss.dropped.len() as u64 > BATCH_ENTRIES
        {
            v.push(format!(
                "a power loss of the {host} dropped {} entries, the oldest unsynced for {:.1} ms (batch promises at most {} ms, {BATCH_ENTRIES} entries)",
                loss.dropped.len(),
                loss.oldest_unsynced.as_secs_f64() * 1000.0,
                BATCH_INTERVAL.as_millis()
            ));
        }
    }
    v
}

/// The simulation's clock step.
const TICK: Duration = Duration::from_millis(1);

/// Draws the fault schedule of a seed: one fault every 2–6 s, healed before the next, so that
/// the pair is never asked to survive two overlapping faults.
pub fn schedule(seed: u64, cfg: &SimConfig) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    let mut out = Vec::new();
    if cfg.faults.is_empty() {
        return out;
    }
    let mut t = Duration::from_millis(rng.gen_range(2000..4000));
    let end = cfg.duration.saturating_sub(Duration::from_secs(3));
    while t < end {
        let kind = cfg.faults[rng.gen_range(0..cfg.faults.len())];
        let lasts = match kind {
            FaultKind::Restart => Duration::from_millis(10),
            _ => Duration::from_millis(rng.gen_range(500..3000)),
        };
        let host = match (rng.gen_bool(0.5), kind) {
            (_, FaultKind::PowerBoth) => "both",
            (true, _) => "primary",
            (false, _) => "backup",
        };
        out.push(Fault {
            at: t,
            kind,
            host,
            lasts,
        });
        t += lasts + Duration::from_millis(rng.gen_range(2000..6000));
    }
    out
}

fn describe(faults: &[Fault]) -> String {
    faults
        .iter()
        .map(|f| {
            let what = match f.kind {
                FaultKind::Crash => format!("crash {}", f.host),
                FaultKind::Restart => format!("restart {}", f.host),
                FaultKind::Partition => "partition".into(),
                FaultKind::Hold => "hold".into(),
                FaultKind::Latency => "latency".into(),
                FaultKind::Power => format!("power {}", f.host),
                FaultKind::PowerBoth => "power both".into(),
            };
            format!(
                "{what}@{:.1}s/{:.1}s",
                f.at.as_secs_f64(),
                f.lasts.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn broker(
    role: Role,
    port: u16,
    peer: &'static str,
    seed: u64,
    cfg: &SimConfig,
    disk: Option<SimDisk>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = turmoil::Result> + 'static>> {
    let (ping, ping_timeout, fsync, lease, journal_compact) = (
        cfg.ping_interval,
        cfg.ping_timeout,
        cfg.fsync,
        cfg.lease,
        cfg.journal_compact,
    );
    move || {
        let disk = disk.clone();
        Box::pin(async move {
            let listener = Net::Sim.bind(&format!("0.0.0.0:{port}")).await?;
            let compute = Compute::new(ComputeRange::DEFAULT, ComputeMode::Sleep, Some(seed), 0);
            let mut c = NodeConfig::new(role, Some(peer.to_string()), compute);
            c.net = Net::Sim;
            c.ping_interval = ping;
            c.ping_timeout = ping_timeout;
            c.fsync = fsync;
            c.lease = lease;
            c.journal_compact = journal_compact;
            // Both nodes share a secret, as two real ones do; the nonces are drawn from the
            // seed, so a run replays exactly.
            c.peer_key = Some(edgepair::core::PeerKey::new(b"the simulated pair's secret"));
            let mut nonce_seed = [0u8; 32];
            nonce_seed[..8].copy_from_slice(&seed.to_le_bytes());
            nonce_seed[8] = u8::from(role == edgepair::protocol::Role::Backup);
            c.nonce_seed = Some(nonce_seed);
            let stop = CancellationToken::new();
            match disk {
                Some(d) => driver::run_on(listener, c, d.storage(), stop).await,
                None => driver::run(listener, c, stop).await,
            }
            .map_err(|e| e.to_string().into())
        })
    }
}

/// Runs one seed and checks the invariants. Also returns every delivery, for traces.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> (SimResult, Vec<Delivery>) {
    let (r, d, _) = run_seed_traced(seed, cfg);
    (r, d)
}

/// [`run_seed`], also returning the consumer group's rows (empty without `cfg.group`).
pub fn run_seed_traced(
    seed: u64,
    cfg: &SimConfig,
) -> (SimResult, Vec<Delivery>, Vec<client::Consumed>) {
    let faults = schedule(seed, cfg);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(cfg.duration + Duration::from_secs(120))
        .tick_duration(TICK)
        .rng_seed(seed)
        .build();
    let disks = (!cfg.memory_only).then(|| (SimDisk::new(), SimDisk::new()));
    let disk_of = |host: &str| {
        disks.as_ref().map(|(p, b)| match host {
            "primary" => p.clone(),
            _ => b.clone(),
        })
    };
    sim.host(
        "primary",
        broker(
            Role::Primary,
            8080,
            "backup:8081",
            seed,
            cfg,
            disk_of("primary"),
        ),
    );
    sim.host(
        "backup",
        broker(
            Role::Backup,
            8081,
            "primary:8080",
            seed + 1,
            cfg,
            disk_of("backup"),
        ),
    );
    type Out = (Vec<Delivery>, client::PubSummary, BTreeSet<u64>);
    let got: Arc<Mutex<Out>> = Arc::default();
    let out = got.clone();
    let group_rows: Arc<Mutex<Vec<client::Consumed>>> = Arc::default();
    let group_out = group_rows.clone();
    let group = cfg.group;
    let (rate, duration, ack_timeout, resend) =
        (cfg.rate, cfg.duration, cfg.ack_timeout, cfg.resend);
    sim.client("clients", async move {
        let brokers = Brokers {
            primary: "primary:8080".into(),
            backup: "backup:8081".into(),
        };
        let stop = CancellationToken::new();
        let sub_cfg = SubscriberConfig::new("t".into(), brokers.clone(), Net::Sim);
        let sub_stop = stop.clone();
        let sub = edgepair::net::spawn(async move {
            let mut v: Vec<Delivery> = Vec::new();
            let _ = client::run_subscriber(sub_cfg, &mut v, sub_stop).await;
            v
        });
        let mut consumers = Vec::new();
        if group {
            for k in 0..3u64 {
                let ccfg = client::ConsumerConfig {
                    group: "g".into(),
                    topic: "t".into(),
                    name: format!("c{k}"),
                    brokers: brokers.clone(),
                    net: Net::Sim,
                    tls: None,
                    create: Some((
                        edgepair::protocol::GroupStart::First,
                        edgepair::protocol::GroupOptions {
                            ack_wait_ms: 1000,
                            max_deliver: 1000,
                            max_in_flight: 2,
                        },
                    )),
                    work: ComputeRange {
                        min_ms: 0,
                        max_ms: 30,
                    },
                    fail_rate: 0.0,
                    crash_after: None,
                    seed: seed.wrapping_mul(31).wrapping_add(k),
                    print: false,
                };
                let rows = group_out.clone();
                let c_stop = stop.clone();
                consumers.push(edgepair::net::spawn(async move {
                    let _ = client::run_consumer(
                        ccfg,
                        |r| {
                            if let Ok(mut g) = rows.lock() {
                                g.push(r.clone());
                            }
                            Ok(())
                        },
                        c_stop,
                    )
                    .await;
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (ev, mut evr) = tokio::sync::mpsc::unbounded_channel();
        let pcfg = PublisherConfig {
            tls: None,
            topic: "t".into(),
            brokers,
            id: "sim".into(),
            ack_timeout,
            resend,
            give_up: Duration::from_secs(30),
            net: Net::Sim,
        };
        let acked = edgepair::net::spawn(async move {
            let mut s = BTreeSet::new();
            while let Some(e) = evr.recv().await {
                if let client::PubEvent::Acked { seq, .. } = e {
                    s.insert(seq);
                }
            }
            s
        });
        let publisher = edgepair::net::spawn(client::run_publisher(
            pcfg,
            rx,
            ev,
            CancellationToken::new(),
        ));
        let n = (rate * duration.as_secs_f64()) as u64;
        let period = Duration::from_secs_f64(1.0 / rate);
        let start = tokio::time::Instant::now();
        for seq in 1..=n {
            tokio::time::sleep_until(start + period.mul_f64(seq as f64)).await;
            let _ = tx.send((seq, seq.to_string())).await;
        }
        drop(tx);
        let summary = publisher.await?;
        let acked = acked.await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
        for c in consumers {
            c.await?;
        }
        let deliveries = sub.await?;
        if let Ok(mut g) = out.lock() {
            *g = (deliveries, summary, acked);
        }
        Ok(())
    });

    // Drive the simulation, injecting faults between steps.
    let publish_start = Duration::from_millis(500);
    let mut actions: Vec<(Duration, usize, bool)> = Vec::new(); // (when, fault index, start?)
    for (i, f) in faults.iter().enumerate() {
        actions.push((publish_start + f.at, i, true));
        actions.push((publish_start + f.at + f.lasts, i, false));
    }
    actions.sort_by_key(|a| (a.0, !a.2));
    let mut next = 0;
    let mut error = None;
    let mut power: Vec<PowerEvent> = Vec::new();
    loop {
        while next < actions.len() && sim.elapsed() >= actions[next].0 {
            let (_, i, start) = actions[next];
            next += 1;
            let f = &faults[i];
            match (f.kind, start) {
                (FaultKind::Crash, true) => sim.crash(f.host),
                (FaultKind::Crash, false) | (FaultKind::Restart, false) => sim.bounce(f.host),
                (FaultKind::Restart, true) => sim.crash(f.host),
                (FaultKind::Partition, true) => {
                    sim.partition("primary", "backup");
                }
                (FaultKind::Partition, false) => sim.repair("primary", "backup"),
                (FaultKind::Hold, true) => {
                    sim.hold("primary", "backup");
                }
                (FaultKind::Hold, false) => sim.release("primary", "backup"),
                (FaultKind::Latency, true) => {
                    sim.set_link_latency("primary", "backup", Duration::from_millis(200));
                }
                (FaultKind::Latency, false) => {
                    sim.set_link_latency("primary", "backup", Duration::from_millis(1))
                }
                (FaultKind::Power | FaultKind::PowerBoth, true) => {
                    let hosts: &[&'static str] = match f.host {
                        "both" => &["primary", "backup"],
                        "primary" => &["primary"],
                        _ => &["backup"],
                    };
                    // The nodes stop first (turmoil drops their tasks), then their disks lose
                    // what was not synced.
                    for h in hosts {
                        sim.crash(*h);
                    }
                    let mut ev = PowerEvent {
                        host: f.host,
                        losses: Vec::new(),
                        gone: BTreeSet::new(),
                    };
                    for h in hosts {
                        if let Some(d) = disk_of(h) {
                            ev.losses.push((h, d.power_loss(sim.elapsed())));
                        }
                    }
                    if hosts.len() == 2 {
                        let held = |id: &MsgId| {
                            hosts
                                .iter()
                                .any(|h| disk_of(h).is_some_and(|d| d.holds(id)))
                        };
                        ev.gone = ev
                            .losses
                            .iter()
                            .flat_map(|(_, l)| l.dropped.iter())
                            .filter(|id| !held(id))
                            .cloned()
                            .collect();
                    }
                    power.push(ev);
                }
                (FaultKind::Power, false) => sim.bounce(f.host),
                (FaultKind::PowerBoth, false) => {
                    sim.bounce("primary");
                    sim.bounce("backup");
                }
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let (deliveries, summary, acked) = got.lock().map(|g| g.clone()).unwrap_or_default();
    let mut r = judge(seed, cfg, &faults, &deliveries, &summary, &acked, &power);
    let rows = group_rows.lock().map(|g| g.clone()).unwrap_or_default();
    if cfg.group {
        judge_group(&mut r, cfg, &faults, &deliveries, &rows, &power);
    }
    if let Some(e) = error {
        r.violations = format!("simulation error: {e}; {}", r.violations);
    }
    (r, deliveries, rows)
}

/// Adds the consumer group's figures and violations to a seed's result.
fn judge_group(
    r: &mut SimResult,
    cfg: &SimConfig,
    faults: &[Fault],
    deliveries: &[Delivery],
    rows: &[client::Consumed],
    _power: &[PowerEvent],
) {
    let spans = fault_spans(faults);
    let delivered: BTreeSet<u64> = deliveries
        .iter()
        .filter(|d| d.publisher == "sim")
        .map(|d| d.seq)
        .collect();
    let mut seen = BTreeSet::new();
    let duplicated: BTreeSet<u64> = deliveries
        .iter()
        .filter(|d| d.publisher == "sim" && !seen.insert(d.seq))
        .map(|d| d.seq)
        .collect();
    // Acks a loss of both nodes may take with it: every one without a disk; under `batch` and
    // `never`, those the disks had not synced (any given before the loss, to keep it simple).
    // Given before the loss means confirmed to the consumer by the time the nodes are back: a
    // confirmation sent just before the power went can reach the consumer after (seed 322: the
    // ack record of seq 265 appended on both nodes at 27.132 s, both lost power unsynced at
    // 27.136 s, the consumer got `acked` at 27.149 s).
    let lost_at: Vec<u64> = faults
        .iter()
        .filter(|f| {
            f.kind == FaultKind::PowerBoth && (cfg.memory_only || cfg.fsync != Fsync::Always)
        })
        .map(|f| PUBLISH_START_US + (f.at + f.lasts).as_micros() as u64)
        .collect();
    let v = check::check_group(
        rows,
        &delivered,
        &check::GroupExpect {
            publisher: "sim",
            faults: &spans,
            ping_interval_us: cfg.ping_interval.as_micros() as u64,
            acks_lost_at: &lost_at,
            duplicated: &duplicated,
        },
    );
    r.group_acked = rows.iter().filter(|c| c.outcome == "acked").count() as u64;
    r.group_redelivered = rows.iter().filter(|c| c.attempt > 1).count() as u64;
    if !v.is_empty() {
        if !r.violations.is_empty() {
            r.violations.push_str("; ");
        }
        r.violations.push_str(&v.join("; "));
    }
}

/// When publishing starts: faults are timed from here, 500 ms into the simulation.
const PUBLISH_START_US: u64 = edgepair::clock::SIM_EPOCH_US + 500_000;

/// The schedule as the checker sees it: each fault's kind and window on the subscriber's clock.
pub fn fault_spans(faults: &[Fault]) -> Vec<check::FaultSpan> {
    faults
        .iter()
        .map(|f| {
            let from_us = PUBLISH_START_US + f.at.as_micros() as u64;
            check::FaultSpan {
                kind: match f.kind {
                    FaultKind::Crash => check::FaultKind::Crash,
                    FaultKind::Restart => check::FaultKind::Restart,
                    FaultKind::Partition => check::FaultKind::Partition,
                    FaultKind::Hold => check::FaultKind::Hold,
                    FaultKind::Latency => check::FaultKind::Latency,
                    // A node stopped without warning, as a crash: no split brain excused.
                    FaultKind::Power | FaultKind::PowerBoth => check::FaultKind::Crash,
                },
                from_us,
                to_us: from_us + f.lasts.as_micros() as u64,
            }
        })
        .collect()
}

/// Judges a seed with [`check::check`] and adds the simulation's own figures (failovers, gaps).
fn judge(
    seed: u64,
    cfg: &SimConfig,
    faults: &[Fault],
    deliveries: &[Delivery],
    summary: &client::PubSummary,
    acked: &BTreeSet<u64>,
    power: &[PowerEvent],
) -> SimResult {
    let spans = fault_spans(faults);
    let mut v = check::check(
        deliveries,
        &check::Expect {
            publisher: Some("sim"),
            published: summary.published,
            acked: Some(acked),
            faults: &spans,
            resend: cfg.resend as u64,
            ping_interval_us: cfg.ping_interval.as_micros() as u64,
        },
    );
    // The checker's verdict, less what the fsync policy allowed to lose (reported apart).
    let lost_acked = v.acked_lost.len() as u64;
    let lost = v.missing.len() as u64;
    let excused = if cfg.memory_only {
        BTreeSet::new()
    } else {
        lost_by_policy(cfg.fsync, "sim", &v.acked_lost, power)
    };
    v.acked_lost.retain(|s| !excused.contains(s));
    v.missing.retain(|s| !excused.contains(s));
    let mut violations = v.violations();
    violations.extend(batch_window_violations(cfg.fsync, TICK, power));
    let losses = power.iter().flat_map(|p| p.losses.iter().map(|(_, l)| l));
    let power_dropped = losses.clone().map(|l| l.dropped.len() as u64).sum();
    let power_oldest = losses.map(|l| l.oldest_unsynced).max().unwrap_or_default();
    let mut rows: Vec<&Delivery> = deliveries.iter().filter(|d| d.publisher == "sim").collect();
    rows.sort_by_key(|d| d.received_at_us);
    // Changes of reign: the first delivery of each (epoch, node), and the silence before it.
    let mut failover_gaps_ms = Vec::new();
    let mut reigns: BTreeSet<(u64, &str)> = BTreeSet::new();
    for (i, d) in rows.iter().enumerate() {
        if reigns.insert((d.epoch, d.source.as_str())) && i > 0 {
            let before = rows[i - 1].received_at_us;
            failover_gaps_ms.push(d.received_at_us.saturating_sub(before) as f64 / 1000.0);
        }
    }
    let epochs: BTreeSet<u64> = rows.iter().map(|d| d.epoch).collect();
    let mut longest = 0;
    for w in rows.windows(2) {
        longest = longest.max(w[1].received_at_us - w[0].received_at_us);
    }
    SimResult {
        seed,
        faults: describe(faults),
        published: v.published,
        lost_acked,
        lost,
        duplicates: v.duplicates,
        duplicate_bound: v.duplicate_bound,
        reordered: v.reordered,
        stale: v.epoch_violations,
        split_brain: v.split_brain,
        longest_gap_ms: longest as f64 / 1000.0,
        failovers: epochs.len().saturating_sub(1) as u64,
        max_failover_gap_ms: failover_gaps_ms.iter().copied().fold(0.0, f64::max),
        failover_gaps_ms,
        violations: violations.join("; "),
        lost_unacked: v.unacked_lost.len() as u64,
        lost_by_policy: excused.len() as u64,
        power_dropped,
        power_oldest_unsynced_ms: power_oldest.as_secs_f64() * 1000.0,
        group_acked: 0,
        group_redelivered: 0,
    }
}

/// Log timestamps in simulated time (seconds since the simulation started), so a node's log
/// lines line up with the deliveries of a replayed seed.
#[derive(Debug, Clone, Copy)]
pub struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "t={:>9.3}s", t.as_secs_f64()),
            None => write!(w, "t=        -"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> MsgId {
        MsgId {
            publisher: "sim".into(),
            seq,
        }
    }

    fn event(host: &'static str, dropped: &[u64], gone: &[u64], unsynced_ms: u64) -> PowerEvent {
        PowerEvent {
            host,
            losses: vec![(
                "primary",
                PowerLoss {
                    dropped: dropped.iter().map(|s| id(*s)).collect(),
                    oldest_unsynced: Duration::from_millis(unsynced_ms),
                },
            )],
            gone: gone.iter().map(|s| id(*s)).collect(),
        }
    }

    #[test]
    fn only_what_both_nodes_lost_to_power_is_lost_by_policy_and_never_under_always() {
        let power = [
            event("primary", &[7], &[], 1),
            event("both", &[9, 10], &[10], 1),
        ];
        // 7 was dropped by one node only (the other had it): not excused; 10 left both disks.
        let lost = [7, 10, 12];
        let want: BTreeSet<u64> = [10].into();
        assert_eq!(lost_by_policy(Fsync::Batch, "sim", &lost, &power), want);
        assert_eq!(lost_by_policy(Fsync::Never, "sim", &lost, &power), want);
        assert!(lost_by_policy(Fsync::Always, "sim", &lost, &power).is_empty());
        assert!(lost_by_policy(Fsync::Batch, "other", &lost, &power).is_empty());
    }

    #[test]
    fn batch_promises_the_window_of_the_disk_and_the_others_do_not() {
        let tick = Duration::from_millis(1);
        let within = [event("both", &[1], &[1], 6)];
        assert!(batch_window_violations(Fsync::Batch, tick, &within).is_empty());
        let late = [event("backup", &[1, 2], &[], 7)];
        let v = batch_window_violations(Fsync::Batch, tick, &late);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("7.0 ms"), "{}", v[0]);
        assert!(batch_window_violations(Fsync::Never, tick, &late).is_empty());
        assert!(batch_window_violations(Fsync::Always, tick, &late).is_empty());
    }
}
