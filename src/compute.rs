//! The simulated edge-compute task every broker runs on each message before delivering it.
//!
//! The seed ran one task at a time, so at 10 Hz with 50–150 ms per task it sat at utilisation ~1
//! and its queue random-walked. Here capacity is a knob: `workers` concurrent slots (0 means no
//! limit), so the default never queues and `--workers 1` reproduces the serial node on purpose.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

/// How long one compute task takes: a uniform draw from `min..=max` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeRange {
    /// Shortest task, ms.
    pub min_ms: u64,
    /// Longest task, ms.
    pub max_ms: u64,
}

impl ComputeRange {
    /// The seed's 50–150 ms.
    pub const DEFAULT: ComputeRange = ComputeRange {
        min_ms: 50,
        max_ms: 150,
    };

    /// True when compute is switched off (`--compute 0`): the broker is a pure relay.
    pub fn is_off(&self) -> bool {
        self.max_ms == 0
    }
}

impl fmt::Display for ComputeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min_ms == self.max_ms {
            write!(f, "{}", self.min_ms)
        } else {
            write!(f, "{}..{}", self.min_ms, self.max_ms)
        }
    }
}

impl FromStr for ComputeRange {
    type Err = String;

    /// Accepts `50..150`, `50-150` or a single number (`0` switches compute off).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("compute range '{s}': expected MIN..MAX or N, in milliseconds");
        let s = s.trim().trim_end_matches("ms");
        let (a, b) = match s.split_once("..").or_else(|| s.split_once('-')) {
            Some((a, b)) => (a, b.trim_start_matches('=')),
            None => (s, s),
        };
        let min_ms: u64 = a.trim().parse().map_err(|_| bad())?;
        let max_ms: u64 = b.trim().parse().map_err(|_| bad())?;
        if min_ms > max_ms {
            return Err(format!("compute range '{s}': MIN is larger than MAX"));
        }
        Ok(ComputeRange { min_ms, max_ms })
    }
}

/// Whether a compute task waits (work offloaded elsewhere) or burns this node's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ComputeMode {
    /// Sleep for the drawn time: models work done by an accelerator or another box.
    #[default]
    Sleep,
    /// Spin on a blocking thread for the drawn time: models work done by this node's CPU.
    Spin,
}

/// The compute stage of one broker: draws task lengths and bounds concurrency.
#[derive(Debug, Clone)]
pub struct Compute {
    range: ComputeRange,
    mode: ComputeMode,
    /// Seeded so that `--seed` makes the sequence of draws reproducible.
    rng: Arc<Mutex<StdRng>>,
    /// `None` means unlimited concurrent tasks.
    slots: Option<Arc<Semaphore>>,
}

impl Compute {
    /// A compute stage with the given range, mode, seed (random if `None`) and worker count
    /// (0 = unlimited).
    pub fn new(range: ComputeRange, mode: ComputeMode, seed: Option<u64>, workers: usize) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Compute {
            range,
            mode,
            rng: Arc::new(Mutex::new(rng)),
            slots: (workers > 0).then(|| Arc::new(Semaphore::new(workers))),
        }
    }

    /// The configured range.
    pub fn range(&self) -> ComputeRange {
        self.range
    }

    /// Draws the length of the next task.
    pub fn draw(&self) -> Duration {
        if self.range.is_off() {
            return Duration::ZERO;
        }
        let ms = match self.rng.lock() {
            Ok(mut rng) => rng.gen_range(self.range.min_ms..=self.range.max_ms),
            Err(poisoned) => poisoned
                .into_inner()
                .gen_range(self.range.min_ms..=self.range.max_ms),
        };
        Duration::from_millis(ms)
    }

    /// Runs one task: waits for a free slot, then takes the drawn time. Returns when the task
    /// got its slot and started (µs, [`crate::clock::now_us`]), so that the time spent queueing
    /// for a worker and the compute itself are reported apart.
    pub async fn run(&self) -> u64 {
        let d = self.draw();
        if d.is_zero() {
            return crate::clock::now_us();
        }
        let _permit = match &self.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let started = crate::clock::now_us();
        match self.mode {
            ComputeMode::Sleep => tokio::time::sleep(d).await,
            ComputeMode::Spin => {
                let _ = tokio::task::spawn_blocking(move || {
                    let end = std::time::Instant::now() + d;
                    while std::time::Instant::now() < end {
                        std::hint::spin_loop();
                    }
                })
                .await;
            }
        }
        started
    }
}

/// Parses a byte size: a number with an optional `K`, `M`, `G` (powers of 1,024, also written
/// `KiB`, `MiB`, `GiB`) or `B`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let v: u64 = num
        .parse()
        .map_err(|_| format!("size '{s}': expected e.g. 500M, 2G, 1048576"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("size '{s}': unknown unit '{other}'")),
    };
    v.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' out of range"))
}

/// Parses a duration such as `500ms`, `1s`, `1.5s`, `2m` or a bare number of milliseconds.
/// Shared by every binary's command line.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "ms"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("duration '{s}': expected e.g. 500ms, 1s, 1.5s, 2m, 12h, 7d"))?;
    let secs = match unit.trim() {
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        "d" => v * 86400.0,
        other => return Err(format!("duration '{s}': unknown unit '{other}'")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_range_parses_seed_forms() {
        assert_eq!("50..150".parse(), Ok(ComputeRange::DEFAULT));
        assert_eq!("50-150".parse(), Ok(ComputeRange::DEFAULT));
        assert!("0".parse::<ComputeRange>().is_ok_and(|r| r.is_off()));
        assert!("150..50".parse::<ComputeRange>().is_err());
        assert!("fast".parse::<ComputeRange>().is_err());
    }

    #[test]
    fn seeded_draws_repeat_and_stay_in_range() {
        let a = Compute::new(ComputeRange::DEFAULT, ComputeMode::Sleep, Some(7), 0);
        let b = Compute::new(ComputeRange::DEFAULT, ComputeMode::Sleep, Some(7), 0);
        let da: Vec<_> = (0..100).map(|_| a.draw()).collect();
        let db: Vec<_> = (0..100).map(|_| b.draw()).collect();
        assert_eq!(da, db);
        assert!(da
            .iter()
            .all(|d| (50..=150).contains(&(d.as_millis() as u64))));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5T").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
        assert!(parse_duration("3y").is_err());
    }
}
