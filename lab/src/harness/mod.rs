//! The failover harness: one command that runs the seed's kill test unattended and judges it.
//!
//! It starts the real binaries as child processes (primary, backup, subscriber, test publisher),
//! waits until each is ready (brokers answer `STATUS`, the subscriber says it is subscribed to
//! both), kills the primary with the chosen signal at the chosen time, keeps publishing, stops the
//! publisher (which still collects its outstanding `ACK`s and has written each one to
//! `acks.csv`), lets the subscriber drain, and then judges the subscriber's CSV against what was
//! acknowledged with [`crate::report`]. No process outlives the harness: every
//! child is killed by its PID on success, on failure and on Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::report;
use edgepair::compute::{parse_duration, ComputeRange};

mod chaos;
pub mod clocks;
pub mod hosts;
mod matrix;
mod plan;
mod progress;
mod run;
mod scrape;

pub use chaos::ChaosEvent;
pub use matrix::{run_matrix, MatrixRow};
pub use plan::{effective_scenario, ChaosFault};
pub use run::run;
pub use scrape::EVERY as SCRAPE_EVERY;

/// Signal used to fail the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KillSignal {
    /// SIGKILL: a crash. Sockets close at once.
    #[value(name = "KILL", alias = "kill")]
    Kill,
    /// SIGTERM: a clean stop.
    #[value(name = "TERM", alias = "term")]
    Term,
    /// SIGSTOP: a hang. Sockets stay open, nothing answers. The harness resumes and then kills
    /// the process at the end of the run.
    #[value(name = "STOP", alias = "stop")]
    Stop,
}

impl KillSignal {
    pub(crate) fn number(self) -> i32 {
        match self {
            KillSignal::Kill => libc::SIGKILL,
            KillSignal::Term => libc::SIGTERM,
            KillSignal::Stop => libc::SIGSTOP,
        }
    }

    /// Name as shown in reports.
    pub fn name(self) -> &'static str {
        match self {
            KillSignal::Kill => "SIGKILL",
            KillSignal::Term => "SIGTERM",
            KillSignal::Stop => "SIGSTOP",
        }
    }
}

/// The fault a harness run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// SIGKILL the primary (the seed's test).
    KillPrimary,
    /// SIGTERM the primary.
    TermPrimary,
    /// SIGSTOP the primary for `--hang-for`, then SIGCONT: it must not deliver in a stale epoch.
    HangPrimary,
    /// SIGKILL the backup: the primary runs degraded and loses nothing.
    KillBackup,
    /// SIGKILL the primary, restart it after `--restart-after`: it must rejoin as backup.
    RestartPrimary,
    /// Blackhole the primary↔backup link for `--fault-for` (both may serve: reported as is).
    PartitionPeers,
    /// Add `--delay` each way on the primary↔backup link for `--fault-for`.
    SlowLink,
    /// SIGKILL both nodes at once, restart both after `--restart-after` on their data dirs:
    /// every acknowledged message must come back from their logs.
    PowerLoss,
    /// SIGTERM both nodes at once (clean stops), restart both after `--restart-after`.
    RestartBoth,
    /// A consumer group of three members shares the topic: one member is SIGKILLed halfway to
    /// `--kill-at`, the primary at `--kill-at`. Every entry must be acknowledged by one member.
    Group,
}

impl Scenario {
    /// Every scenario, in the order the matrix runs them.
    pub const ALL: [Scenario; 10] = [
        Scenario::KillPrimary,
        Scenario::TermPrimary,
        Scenario::HangPrimary,
        Scenario::KillBackup,
        Scenario::RestartPrimary,
        Scenario::PartitionPeers,
        Scenario::SlowLink,
        Scenario::PowerLoss,
        Scenario::RestartBoth,
        Scenario::Group,
    ];

    /// Name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::TermPrimary => "term-primary",
            Scenario::HangPrimary => "hang-primary",
            Scenario::KillBackup => "kill-backup",
            Scenario::RestartPrimary => "restart-primary",
            Scenario::PartitionPeers => "partition-peers",
            Scenario::SlowLink => "slow-link",
            Scenario::PowerLoss => "power-loss",
            Scenario::RestartBoth => "restart-both",
            Scenario::Group => "group",
        }
    }

    pub(crate) fn uses_proxies(self) -> bool {
        matches!(self, Scenario::PartitionPeers | Scenario::SlowLink)
    }
}

/// Options of a harness run; defaults are the seed's scenario.
#[derive(Debug, Clone, Args)]
pub struct HarnessOpts {
    /// When to fail the primary, counted from the first message.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub kill_at: Duration,
    /// How long to keep publishing after the kill.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub after: Duration,
    /// Messages per second of the test publisher.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// What goes wrong at `--kill-at` (see README). `--signal` picks among the primary faults.
    #[arg(long, value_enum, default_value_t = Scenario::KillPrimary)]
    pub scenario: Scenario,
    /// Signal that fails the primary: KILL (crash), TERM (clean stop) or STOP (hang; resumed
    /// after `--hang-for`). Shorthand for `--scenario kill-primary|term-primary|hang-primary`.
    #[arg(long, value_enum)]
    pub signal: Option<KillSignal>,
    /// How long a hung primary stays stopped before SIGCONT.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub hang_for: Duration,
    /// How long after its kill a node is restarted (`restart-primary`, `power-loss`,
    /// `restart-both`, chaos).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub restart_after: Duration,
    /// How long a network fault lasts (`partition-peers`, `slow-link`).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub fault_for: Duration,
    /// Delay added each way by `slow-link`.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub delay: Duration,
    /// Compute time per message on the brokers, ms (`MIN..MAX`, a number, or `0`).
    #[arg(long, default_value = "50..150")]
    pub compute: ComputeRange,
    /// Seed for the brokers' compute draws (the backup gets seed + 1).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Topic to publish on.
    #[arg(long, default_value = "topicC")]
    pub topic: String,
    /// Port of the primary; the backup gets the next one. If either is taken the harness moves
    /// to the next free pair and says so. 0 picks any free ports.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Folder under which `<UTC timestamp>/` and the `latest` link are made.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Write into exactly this folder instead of `<out>/<timestamp>/`.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Folder holding the primary/backup/subscriber/test-publisher binaries (default: the
    /// harness's own folder).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub no_progress: bool,
    /// Run every scenario one after the other (each `--repeat` times) and write `matrix.csv`
    /// and `matrix.md`. Unless `--kill-at`/`--after` are given, each run uses 5 s + 6 s.
    #[arg(long)]
    pub matrix: bool,
    /// Matrix: runs per scenario.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Chaos mode: `--cycles` random self-healing faults against whichever node is active,
    /// one every `--cycle`, reproducible from `--seed`.
    #[arg(long)]
    pub chaos: bool,
    /// Chaos: number of faults.
    #[arg(long, default_value_t = 10)]
    pub cycles: usize,
    /// Chaos: time between two faults.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub cycle: Duration,
    /// Run a consumer group of three alongside, judged as in `--scenario group` (with any
    /// scenario, and in chaos, where killing a member joins the faults drawn).
    #[arg(long)]
    pub group: bool,
    /// Where each process runs (a TOML inventory: `local` or a network namespace per role;
    /// README, *Across network namespaces*). Default: everything local.
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
}

/// What a harness run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The analysis of the subscriber's deliveries.
    pub analysis: report::Analysis,
    /// Where the files were written.
    pub dir: PathBuf,
    /// Chaos mode: what each cycle did.
    pub chaos: Vec<ChaosEvent>,
}

/// UTC timestamp for folder names, e.g. `20261124T120501Z`, without a date crate.
pub fn utc_stamp(us: u64) -> String {
    let secs = (us / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn utc_stamp_formats_known_instants() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2026-11-24T12:05:01Z
        assert_eq!(utc_stamp(1_795_521_901_000_000), "20261124T120501Z");
    }
}
