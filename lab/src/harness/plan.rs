//! Fault plans: what a scenario or a chaos run does to the pair, and when.

use std::time::Duration;

use crate::proxy::Fault;

use super::*;
/// One step of a fault plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send a signal to node 0 (started as primary) or 1 (started as backup).
    Signal(usize, KillSignal),
    /// Resume a stopped node.
    Resume(usize),
    /// Start a killed node again with its original command line.
    Restart(usize),
    /// Start a killed consumer again (chaos with `--group`).
    RestartConsumer(usize),
    /// Set the fault of both peer-link proxies.
    Link(Fault),
    /// A chaos fault, aimed when it fires at whichever node is then active (or standing by).
    Chaos(ChaosFault),
    /// SIGKILL consumer `k` of the `group` scenario (0-based).
    KillConsumer(usize),
}

/// The faults chaos mode draws from. Each heals itself: a killed node is restarted after
/// `--restart-after`, a stopped one resumed after `--hang-for`, a link fault lifted after
/// `--fault-for`, so the pair must survive fault after fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChaosFault {
    /// SIGKILL the active node, restart it later.
    KillActive,
    /// SIGTERM the active node, restart it later.
    TermActive,
    /// SIGSTOP the active node, SIGCONT later.
    HangActive,
    /// SIGKILL the standby node, restart it later.
    KillStandby,
    /// Blackhole the peer link for a while.
    Partition,
    /// Delay the peer link for a while.
    SlowLink,
    /// SIGKILL both nodes at once, restart both later (on their data dirs).
    PowerLoss,
    /// SIGTERM both nodes at once, restart both later.
    RestartBoth,
    /// SIGKILL a member of the consumer group, start it again later (`--group` only).
    KillConsumer,
}

impl ChaosFault {
    pub(crate) const ALL: [ChaosFault; 8] = [
        ChaosFault::KillActive,
        ChaosFault::TermActive,
        ChaosFault::HangActive,
        ChaosFault::KillStandby,
        ChaosFault::Partition,
        ChaosFault::SlowLink,
        ChaosFault::PowerLoss,
        ChaosFault::RestartBoth,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ChaosFault::KillActive => "kill-active",
            ChaosFault::TermActive => "term-active",
            ChaosFault::HangActive => "hang-active",
            ChaosFault::KillStandby => "kill-standby",
            ChaosFault::Partition => "partition-peers",
            ChaosFault::SlowLink => "slow-link",
            ChaosFault::PowerLoss => "power-loss",
            ChaosFault::RestartBoth => "restart-both",
            ChaosFault::KillConsumer => "kill-consumer",
        }
    }
}

/// A reproducible chaos plan: `cycles` faults, one per `cycle` period, drawn from `seed`.
pub(crate) fn chaos_plan(opts: &HarnessOpts, seed: u64) -> Vec<(Duration, Action)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..opts.cycles)
        .map(|c| {
            let jitter = Duration::from_millis(rng.gen_range(0..500));
            // With a consumer group, killing a member joins the faults (without one, the
            // schedules of earlier seeds stay as they were).
            let kinds = ChaosFault::ALL.len() + usize::from(opts.group);
            let f = ChaosFault::ALL
                .get(rng.gen_range(0..kinds))
                .copied()
                .unwrap_or(ChaosFault::KillConsumer);
            (
                opts.kill_at + opts.cycle * c as u32 + jitter,
                Action::Chaos(f),
            )
        })
        .collect()
}

/// The fault plan of a scenario: what to do, when (from the first message).
pub(crate) fn plan(opts: &HarnessOpts, scenario: Scenario) -> Vec<(Duration, Action)> {
    let t = opts.kill_at;
    match scenario {
        Scenario::KillPrimary => vec![(t, Action::Signal(0, KillSignal::Kill))],
        Scenario::TermPrimary => vec![(t, Action::Signal(0, KillSignal::Term))],
        Scenario::HangPrimary => vec![
            (t, Action::Signal(0, KillSignal::Stop)),
            (t + opts.hang_for, Action::Resume(0)),
        ],
        Scenario::KillBackup => vec![(t, Action::Signal(1, KillSignal::Kill))],
        Scenario::RestartPrimary => vec![
            (t, Action::Signal(0, KillSignal::Kill)),
            (t + opts.restart_after, Action::Restart(0)),
        ],
        Scenario::PartitionPeers => vec![
            (t, Action::Link(Fault::Blackhole)),
            (t + opts.fault_for, Action::Link(Fault::Pass)),
        ],
        Scenario::SlowLink => vec![
            (t, Action::Link(Fault::Delay(opts.delay))),
            (t + opts.fault_for, Action::Link(Fault::Pass)),
        ],
        Scenario::PowerLoss => both_down(t, opts.restart_after, KillSignal::Kill),
        Scenario::RestartBoth => both_down(t, opts.restart_after, KillSignal::Term),
        Scenario::Group => vec![
            (t / 2, Action::KillConsumer(1)),
            (t, Action::Signal(0, KillSignal::Kill)),
        ],
    }
}

/// Both nodes signalled at `at` (the primary first, microseconds apart) and both restarted
/// `restart_after` later, on their data dirs.
fn both_down(at: Duration, restart_after: Duration, sig: KillSignal) -> Vec<(Duration, Action)> {
    vec![
        (at, Action::Signal(0, sig)),
        (at, Action::Signal(1, sig)),
        (at + restart_after, Action::Restart(0)),
        (at + restart_after, Action::Restart(1)),
    ]
}

/// The scenario a run uses: `--signal` overrides the primary-fault scenarios.
pub fn effective_scenario(opts: &HarnessOpts) -> Scenario {
    match (opts.signal, opts.scenario) {
        (
            Some(KillSignal::Kill),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::KillPrimary,
        (
            Some(KillSignal::Term),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::TermPrimary,
        (
            Some(KillSignal::Stop),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::HangPrimary,
        (_, s) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: HarnessOpts,
    }

    fn opts(args: &[&str]) -> HarnessOpts {
        Cli::parse_from(std::iter::once("harness").chain(args.iter().copied())).opts
    }

    #[test]
    fn both_down_scenarios_signal_both_nodes_then_restart_both() {
        let o = opts(&["--kill-at", "3s", "--restart-after", "1s"]);
        let (t, r) = (Duration::from_secs(3), Duration::from_secs(4));
        assert_eq!(
            plan(&o, Scenario::PowerLoss),
            vec![
                (t, Action::Signal(0, KillSignal::Kill)),
                (t, Action::Signal(1, KillSignal::Kill)),
                (r, Action::Restart(0)),
                (r, Action::Restart(1)),
            ]
        );
        assert_eq!(
            plan(&o, Scenario::RestartBoth),
            vec![
                (t, Action::Signal(0, KillSignal::Term)),
                (t, Action::Signal(1, KillSignal::Term)),
                (r, Action::Restart(0)),
                (r, Action::Restart(1)),
            ]
        );
        assert!(Scenario::ALL.contains(&Scenario::PowerLoss));
        assert!(Scenario::ALL.contains(&Scenario::RestartBoth));
    }

    #[test]
    fn chaos_draws_both_down_faults() {
        let o = opts(&["--cycles", "50"]);
        let drawn: Vec<ChaosFault> = chaos_plan(&o, 7)
            .into_iter()
            .filter_map(|(_, a)| match a {
                Action::Chaos(f) => Some(f),
                _ => None,
            })
            .collect();
        for f in [ChaosFault::PowerLoss, ChaosFault::RestartBoth] {
            assert!(drawn.contains(&f), "{f:?} never drawn in {drawn:?}");
        }
    }
}
