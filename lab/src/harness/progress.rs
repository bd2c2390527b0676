//! What the children print, counted: the live progress line and the readiness counters.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::report;

use edgepair::clock::now_us;
/// Live counters fed by the children's output.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) acked: AtomicU64,
    pub(crate) by_primary: AtomicU64,
    pub(crate) by_backup: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) subscribed: AtomicU64,
    /// Consumers (`group` scenario) that joined their group on the primary.
    pub(crate) joined: AtomicU64,
    pub(crate) published: AtomicU64,
    /// Lines in which a broker said it runs without a backup (or lost its role).
    pub(crate) events: std::sync::Mutex<Vec<String>>,
}

/// Counts what the children print, for the progress line and for readiness.
pub(crate) fn watch_lines(
    mut rx: mpsc::UnboundedReceiver<(&'static str, bool, String)>,
    c: Arc<Counters>,
    takeover_us: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        while let Some((name, is_out, line)) = rx.recv().await {
            match (name, is_out) {
                ("subscriber", true) => {
                    if line.starts_with("[PRIMARY]") {
                        c.by_primary.fetch_add(1, Ordering::Relaxed);
                    } else if line.starts_with("[BACKUP]") {
                        c.by_backup.fetch_add(1, Ordering::Relaxed);
                    }
                    if line.ends_with("(duplicate)") {
                        c.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ("subscriber", false) if line.contains("subscribed to") => {
                    c.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                (n, false)
                    if n.starts_with("consumer")
                        && line.contains("joined group")
                        && line.contains(" on primary") =>
                {
                    c.joined.fetch_add(1, Ordering::Relaxed);
                }
                ("test-publisher", true) => {
                    if let Some(rest) = line.strip_prefix("ACK ") {
                        if rest
                            .split(' ')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some()
                        {
                            c.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if let Some(rest) = line.strip_prefix("published ") {
                        if let Some(n) = rest.split(',').next().and_then(|n| n.trim().parse().ok())
                        {
                            c.published.store(n, Ordering::Relaxed);
                        }
                    }
                }
                ("primary" | "backup", false)
                    if line.contains("running degraded")
                        || line.contains("STEP DOWN")
                        || line.contains("TAKEOVER") =>
                {
                    if let Ok(mut ev) = c.events.lock() {
                        // Keep the message, not the timestamp and level prefix.
                        let msg = line
                            .split_once("  ")
                            .map_or(line.as_str(), |(_, m)| m.trim_start());
                        let msg = msg.split_once(' ').map_or(msg, |(_, m)| m);
                        ev.push(format!("{name}: {msg}"));
                    }
                    if name == "backup" && line.contains("TAKEOVER") {
                        let _ = takeover_us.compare_exchange(
                            0,
                            now_us(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
                _ => {}
            }
        }
    });
}

/// Distinct sequence numbers of `publisher` in the CSV so far (0 if it cannot be read yet).
pub(crate) fn distinct_seqs(path: &Path, publisher: &str) -> u64 {
    let Ok(mut r) = csv::Reader::from_path(path) else {
        return 0;
    };
    let mut seen = BTreeMap::new();
    for row in r.deserialize::<report::Delivery>().flatten() {
        if row.publisher == publisher {
            seen.insert(row.seq, ());
        }
    }
    seen.len() as u64
}

/// The live progress line: a bar on a terminal, a plain line every 5 s otherwise.
pub(crate) struct Progress {
    pub(crate) bar: Option<indicatif::ProgressBar>,
    pub(crate) total: Duration,
    pub(crate) last_plain: std::sync::Mutex<Duration>,
    pub(crate) quiet: bool,
}

impl Progress {
    pub(crate) fn new(total: Duration, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total.as_millis() as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {msg}") {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            total,
            last_plain: std::sync::Mutex::new(Duration::ZERO),
            quiet,
        }
    }

    pub(crate) fn update(&self, elapsed: Duration, c: &Counters, kill_at: Duration) {
        let msg = format!(
            "{:>5.1}/{:.0}s  acked {}  delivered {} (primary {}, backup {}, dup {})  {}",
            elapsed.as_secs_f64(),
            self.total.as_secs_f64(),
            c.acked.load(Ordering::Relaxed),
            c.by_primary.load(Ordering::Relaxed) + c.by_backup.load(Ordering::Relaxed),
            c.by_primary.load(Ordering::Relaxed),
            c.by_backup.load(Ordering::Relaxed),
            c.duplicates.load(Ordering::Relaxed),
            if elapsed < kill_at {
                format!("fault in {:.1}s", (kill_at - elapsed).as_secs_f64())
            } else {
                "fault injected".to_string()
            }
        );
        match &self.bar {
            Some(b) => {
                b.set_position(elapsed.as_millis() as u64);
                b.set_message(msg);
            }
            None if !self.quiet => {
                if let Ok(mut last) = self.last_plain.lock() {
                    if elapsed >= *last + Duration::from_secs(5) || *last == Duration::ZERO {
                        *last = elapsed.max(Duration::from_millis(1));
                        println!("{msg}");
                    }
                }
            }
            None => {}
        }
    }

    pub(crate) fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
