//! `edgepair-log`: looks into a node's data directory (read-only, safe while the node runs),
//! and fills one for crash tests and benchmarks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use super::{Entry, FileLog, Storage};
use crate::protocol::MsgId;

/// Inspect a node's log directory (`--data-dir`): its topics, and the entries of one.
#[derive(Debug, Parser)]
#[command(name = "edgepair-log", version)]
pub struct LogCli {
    #[command(subcommand)]
    cmd: LogCmd,
}

#[derive(Debug, Subcommand)]
enum LogCmd {
    /// One line per topic: name, first and next offset, entries, bytes on disk, delivered
    /// mark, and any torn or corrupt tail found. Read-only: works while a node runs.
    Topics {
        /// The log directory.
        dir: PathBuf,
    },
    /// One line per entry of TOPIC: offset, epoch, publisher:seq, sent and received times
    /// (µs since the Unix epoch), payload. Read-only.
    Dump {
        /// The log directory.
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// First offset (default: the oldest kept).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most entries to print (default: all).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Appends COUNT generated entries to TOPIC (locking the directory), syncing every K
    /// and printing `synced <next offset>` after each sync; for crash tests and benchmarks.
    /// Entry N is `fill_entry(N, payload)`.
    #[command(hide = true)]
    Fill {
        /// The log directory (created if missing).
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// Entries to append.
        #[arg(long)]
        count: u64,
        /// Entries between syncs.
        #[arg(long, default_value_t = 100)]
        sync_every: u64,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Segment size in bytes.
        #[arg(long, default_value_t = super::DEFAULT_SEGMENT_BYTES)]
        segment_bytes: u64,
        /// Also mark every entry delivered (as a node that relayed them leaves its log).
        #[arg(long)]
        delivered: bool,
    },
}

/// Runs the command; errors go to stderr with a non-zero exit code.
pub fn main(cli: LogCli) -> ExitCode {
    crate::cli::init_tracing();
    let mut out = std::io::stdout().lock();
    let r = match cli.cmd {
        LogCmd::Topics { dir } => topics(&dir, &mut out),
        LogCmd::Dump {
            dir,
            topic,
            from,
            count,
        } => dump(&dir, &topic, from, count.unwrap_or(u64::MAX), &mut out),
        LogCmd::Fill {
            dir,
            topic,
            count,
            sync_every,
            payload,
            segment_bytes,
            delivered,
        } => fill(
            &dir,
            &topic,
            Fill {
                count,
                sync_every,
                payload,
                segment_bytes,
                delivered,
            },
            &mut out,
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgepair-log: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated, each cause left out when the message before it
/// already ends with it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !s.ends_with(&c) {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&c);
        }
    }
    s
}

/// Writes the `topics` listing of `dir`.
pub fn topics(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let (log, rec) = FileLog::inspect(dir)?;
    for t in log.topics() {
        write!(
            out,
            "topic={:?} first={} next={} last={} entries={} bytes={} delivered={}",
            t.topic,
            t.first,
            t.next,
            t.next.checked_sub(1).map_or("-".into(), |l| l.to_string()),
            t.next - t.first,
            log.topic_bytes(&t.topic),
            t.delivered
        )?;
        for (_, d) in rec.damage.iter().filter(|(n, _)| *n == t.topic) {
            write!(
                out,
                " damage={:?}",
                format!(
                    "{} bytes at {} of {}: {}",
                    d.bytes,
                    d.at,
                    seg_name(d),
                    d.reason
                )
            )?;
        }
        writeln!(out)?;
    }
    for (p, why) in &rec.ignored {
        writeln!(out, "ignored={:?} why={why:?}", p.display().to_string())?;
    }
    Ok(())
}

fn seg_name(d: &super::Damage) -> String {
    d.segment
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Writes up to `count` entries of `topic` from `from` on, one per line.
pub fn dump(dir: &Path, topic: &str, from: u64, count: u64, out: &mut dyn Write) -> Result<()> {
    let (log, rec) = FileLog::inspect(dir)?;
    let state = log.topics();
    if !state.iter().any(|t| t.topic == topic) {
        let names: Vec<&str> = state.iter().map(|t| t.topic.as_str()).collect();
        bail!(
            "no topic '{topic}' in {} (topics: {})",
            dir.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    let (mut at, mut left) = (from, count);
    while left > 0 {
        let got = match log.read(topic, at, left.min(1024) as usize) {
            Ok(got) => got,
            Err(e) => {
                let found: Vec<String> = rec
                    .damage
                    .iter()
                    .filter(|(t, _)| t == topic)
                    .map(|(_, d)| d.to_string())
                    .collect();
                bail!(
                    "reading topic '{topic}' at offset {at}: {e}{}",
                    if found.is_empty() {
                        String::new()
                    } else {
                        format!(" (found at open: {})", found.join("; "))
                    }
                );
            }
        };
        let Some(last) = got.last() else { break };
        at = last.offset + 1;
        left -= got.len() as u64;
        for e in got {
            writeln!(
                out,
                "{} epoch={} id={}:{} sent_us={} received_us={} {}",
                e.offset, e.epoch, e.id.publisher, e.id.seq, e.sent_us, e.received_us, e.payload
            )?;
        }
    }
    // A torn tail may be a record being written by a running node; anything else is damage.
    let mut corrupt = Vec::new();
    for (_, d) in rec.damage.iter().filter(|(t, _)| t == topic) {
        if d.reason == super::CutReason::Torn {
            eprintln!("edgepair-log: note: {d}");
        } else {
            corrupt.push(d.to_string());
        }
    }
    if !corrupt.is_empty() {
        bail!("corrupt data in topic '{topic}': {}", corrupt.join("; "));
    }
    Ok(())
}

/// The entry `fill` writes at `offset`, so a reader can check any entry without a copy.
pub fn fill_entry(offset: u64, payload: usize) -> Entry {
    let mut p = format!("fill-{offset}-");
    while p.len() < payload {
        p.push(char::from(
            b'a' + (p.len() as u64 + offset).rem_euclid(26) as u8,
        ));
    }
    Entry {
        offset,
        epoch: 1 + offset / 1000,
        id: MsgId {
            publisher: "fill".into(),
            seq: offset + 1,
        },
        sent_us: 1_700_000_000_000_000 + offset,
        received_us: 1_700_000_000_000_000 + offset * 2,
        payload: p,
    }
}

/// What [`fill`] writes.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    /// Entries to append.
    pub count: u64,
    /// Entries between syncs.
    pub sync_every: u64,
    /// Payload bytes per entry.
    pub payload: usize,
    /// Segment size in bytes.
    pub segment_bytes: u64,
    /// Mark every entry delivered at the end.
    pub delivered: bool,
}

/// Appends `count` entries from the topic's next offset on, syncing every `sync_every`.
pub fn fill(dir: &Path, topic: &str, f: Fill, out: &mut dyn Write) -> Result<()> {
    let Fill {
        count,
        sync_every,
        payload,
        segment_bytes,
        delivered,
    } = f;
    let (mut log, rec) = FileLog::open_with(dir, segment_bytes)?;
    for l in rec.lines() {
        tracing::warn!("{l}");
    }
    let start = Instant::now();
    let sync_every = sync_every.max(1);
    let mut next = log.topic(topic).next;
    for i in 0..count {
        log.append(topic, &fill_entry(next, payload))?;
        next += 1;
        if (i + 1) % sync_every == 0 || i + 1 == count {
            log.sync()?;
            writeln!(out, "synced {next}")?;
            out.flush()?;
        }
    }
    if delivered {
        log.set_delivered(topic, next);
        log.sync()?;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "appended {count} entries of {payload} B in {secs:.3} s ({:.0}/s), syncing every {sync_every}",
        count as f64 / secs.max(1e-9)
    );
    Ok(())
}
