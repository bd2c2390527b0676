//! What the thin binaries share: logging, signal handling, address forms and option groups.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::compute::{parse_bytes, parse_duration, Compute, ComputeMode, ComputeRange};
use crate::driver::{self, NodeConfig};
use crate::log::Fsync;
use crate::net::Net;
use crate::protocol::Role;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays free for data.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// A token cancelled on Ctrl-C or SIGTERM, so every binary stops the same clean way.
///
/// The handlers are registered before this returns (not in the spawned task, nor on a future's
/// first poll): a signal that comes right after a binary's first log line must still stop it
/// cleanly rather than kill it with the default action.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = int.recv() => info!("Ctrl-C: stopping"),
                        _ = term.recv() => info!("SIGTERM: stopping"),
                    }
                    t.cancel();
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot handle signals ({e}); Ctrl-C and SIGTERM will end this process abruptly");
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

/// Accepts `host:port` as given, and a bare port as `localhost:PORT`.
pub fn addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty address".into());
    }
    if s.parse::<u16>().is_ok() {
        return Ok(format!("localhost:{s}"));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_string()),
        _ => Err(format!("address '{s}': expected HOST:PORT or PORT")),
    }
}

/// Options shared by the `primary` and `backup` binaries.
#[derive(Debug, Clone, Args)]
pub struct BrokerOpts {
    /// Simulated compute time per message in ms: `MIN..MAX`, or one number (`0` = none).
    #[arg(long, default_value = "50..150")]
    pub compute: ComputeRange,
    /// `sleep` models work done elsewhere; `spin` burns this node's CPU.
    #[arg(long, value_enum, default_value_t = ComputeMode::Sleep)]
    pub compute_mode: ComputeMode,
    /// Concurrent compute tasks (0 = unlimited; 1 = the seed's serial node).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Seed for the compute-time draws, for reproducible runs.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How often the backup pings the primary.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub ping_interval: Duration,
    /// How long a PING may go unanswered before the primary counts as hung.
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    pub ping_timeout: Duration,
    /// How long the primary waits for the backup to store a message before running degraded.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    pub repl_timeout: Duration,
    /// Interface to listen on. Default loopback only; `--bind` alone listens on all interfaces
    /// (0.0.0.0), for nodes on different hosts.
    #[arg(long, num_args = 0..=1, default_value = "127.0.0.1", default_missing_value = "0.0.0.0")]
    pub bind: String,
    /// Runtime threads for connections (0 = one per core). The default, 1, runs every
    /// connection on one thread: no cross-thread wake-ups, which doubled the relay's throughput
    /// on a 2-core machine shared with its clients. `spin` compute runs on its own threads
    /// either way.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Directory of the node's log: one folder of segment files per topic. Without it the log
    /// is kept in memory (the last 100,000 delivered entries per topic, and what a consumer
    /// group has not finished) and nothing survives a restart of the node.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// When a publish is acknowledged, as far as this node's disk goes: `always` = after its
    /// entry is fsync'd (one fsync per batch of publishes); `batch` = written at once, fsync'd
    /// within 5 ms or 16,384 entries (a crash of the process loses nothing, a power cut at most
    /// that); `never` = written, fsync'd only at a clean stop. Needs `--data-dir`.
    #[arg(long, default_value_t = Fsync::Batch)]
    pub fsync: Fsync,
    /// Keep at most about this much of each topic's log (e.g. `500M`, `2G`): older segments
    /// (`--segment-bytes` each) are removed once every entry in them was delivered. Needs
    /// `--data-dir`.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub retain_bytes: Option<u64>,
    /// Disconnect a subscriber once this much is queued for it and not read (e.g. `64M`,
    /// `512K`): a slow reader does not hold up the others or the node's memory. The
    /// `subscriber` binary reconnects and resumes by offset.
    #[arg(long, value_parser = parse_bytes, default_value = "64M", value_name = "SIZE")]
    pub max_pending: u64,
    /// On SIGTERM or Ctrl-C, how long to go on finishing what was accepted (computing,
    /// delivering, waiting for the backup) while refusing new publishes with `ERR|stopping`;
    /// whatever is left then is named in the log.
    #[arg(long, value_parser = parse_duration, default_value = "5s", value_name = "D")]
    pub drain_timeout: std::time::Duration,
    /// Connections served at once (clients and the peer's); one more is answered
    /// `ERR|too many connections` and closed, and the node goes on serving the others.
    #[arg(long, default_value_t = crate::driver::MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,
    /// Size at which a topic's log rolls over to a new segment file (at least 4K), the unit in
    /// which retention removes old entries. Needs `--data-dir`.
    #[arg(long, value_parser = parse_segment_bytes, default_value = "64M", value_name = "SIZE")]
    pub segment_bytes: u64,
    /// Remove a topic's segments whose newest entry is older than this (e.g. `12h`, `7d`),
    /// once delivered. Needs `--data-dir`.
    #[arg(long, value_parser = parse_duration, value_name = "AGE")]
    pub retain_age: Option<Duration>,
    /// Never let two nodes deliver in overlapping reigns: a primary acknowledges and delivers
    /// only while its backup has answered it within this lease, and a backup takes over only
    /// once a lease has passed since it last heard from its primary. Costs at least the lease in
    /// every failover, and a primary that cannot reach its backup (a partition) stops serving.
    /// Give both nodes the same value. Off by default.
    #[arg(long, value_parser = parse_lease, value_name = "DUR")]
    pub lease: Option<Duration>,
    /// File holding the secret this node shares with its peer; only a connection that proves
    /// it may act as the peer. Default: the file named by `EDGEPAIR_SECRET_FILE`, else the
    /// secret itself in `EDGEPAIR_SECRET`, else `~/.config/edgepair/secret`, made on first
    /// start (copy it to the other host for nodes on two hosts). Refused when others may read
    /// it.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<std::path::PathBuf>,
    /// Publishes of one connection that may await their ACK; past it the node reads no more
    /// from that connection until ACKs go out (the publisher is slowed, nothing is refused).
    #[arg(long, default_value_t = crate::core::MAX_UNACKED, value_name = "N")]
    pub max_unacked: usize,
    /// Subscriptions one connection may hold; one more is answered `ERR|too many
    /// subscriptions…` and the connection goes on.
    #[arg(long, default_value_t = crate::core::MAX_SUBSCRIPTIONS, value_name = "N")]
    pub max_subscriptions: usize,
    /// Longest topic name in bytes; a longer one (or one with a control character) is answered
    /// `ERR|…` and nothing is stored or subscribed.
    #[arg(long, default_value_t = crate::core::MAX_TOPIC_LEN, value_name = "BYTES")]
    pub max_topic_len: usize,
    /// Consumer groups: journal entries after which the primary writes a snapshot of the
    /// groups and, once the backup has it, removes the journal before it.
    #[arg(long, default_value_t = crate::core::JOURNAL_COMPACT, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub journal_compact: u64,
    /// Close a connection that has begun a frame and not finished it within this long (a slow
    /// drip of bytes); idle connections are not timed.
    #[arg(long, value_parser = parse_frame_timeout, default_value = "10s", value_name = "D")]
    pub frame_timeout: Duration,
    /// This node's TLS certificate chain (PEM): with `--tls-key` and `--tls-ca`, the node
    /// speaks only TLS, to clients and to its peer.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA (PEM) that signed the peer's certificate. Clients may connect without a
    /// certificate; a connection acts as the peer only if it presents one signed by this CA
    /// (mutual TLS), besides proving the secret.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Take the seed's `REPLICATE`/`CLEAR` from any connection, unauthenticated, so that a seed
    /// primary can drive this backup. Anyone who can connect can then plant messages.
    #[arg(long)]
    pub allow_seed_replicate: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (e.g. `127.0.0.1:9100`; port 0 picks
    /// one, logged at start): role, epoch, link, in flight, held, counters and stage latencies.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Primary: if the backup answers the peer handshake as a seed broker does (an `ERR` to an
    /// unknown verb), replicate to it with the seed's `REPLICATE`/`CLEAR`, unauthenticated.
    /// Without it such a backup is refused: whoever answers on the backup's port could
    /// otherwise take the primary's messages and have them counted as stored.
    #[arg(long)]
    pub seed_backup: bool,
}

/// A `--segment-bytes` value: a byte size of at least 4 KiB.
fn parse_segment_bytes(s: &str) -> Result<u64, String> {
    let b = parse_bytes(s)?;
    if b < 4096 {
        return Err(format!("segment size '{s}': at least 4K"));
    }
    Ok(b)
}

/// A `--frame-timeout` value: at least 100 ms (a frame split over two reads, or a TLS
/// handshake, needs a moment on a busy machine).
fn parse_frame_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("frame timeout '{s}': at least 100ms"));
    }
    Ok(d)
}

/// A `--lease` value: a duration of at least 50 ms (a shorter lease runs out between two of its
/// own renewals on a busy machine).
pub fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(50) {
        return Err(format!("lease '{s}': at least 50ms"));
    }
    Ok(d)
}

fn broker_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        0 => tokio::runtime::Runtime::new(),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// Runs a broker binary to completion; the exit code says whether it started.
pub fn run_broker(role: Role, port: u16, peer: &str, opts: BrokerOpts) -> ExitCode {
    crate::disable_huge_pages();
    init_tracing();
    let peer = match addr(peer) {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let key = match crate::secret::load(opts.secret_file.as_deref()) {
        Ok((key, origin)) => {
            info!("peer secret from {origin}");
            key
        }
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let tls = match crate::tls::NodeTls::from_files(
        opts.tls_cert.as_deref(),
        opts.tls_key.as_deref(),
        opts.tls_ca.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    if opts.seed_backup {
        tracing::warn!(
            "--seed-backup: a backup that does not authenticate is driven with REPLICATE/CLEAR: \
             whoever answers on the backup's port gets the messages and they count as stored"
        );
    }
    if opts.allow_seed_replicate {
        tracing::warn!(
            "--allow-seed-replicate: REPLICATE/CLEAR are taken from ANY connection, \
             unauthenticated: whoever can connect can plant or clear held messages"
        );
    }
    let rt = match broker_runtime(opts.threads) {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = shutdown_on_signals();
        let listen = format!("{}:{port}", opts.bind);
        let listener = match Net::Tokio.bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                error!("cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let compute = Compute::new(opts.compute, opts.compute_mode, opts.seed, opts.workers);
        let mut cfg = NodeConfig::new(role, Some(peer), compute);
        cfg.ping_interval = opts.ping_interval;
        cfg.ping_timeout = opts.ping_timeout;
        cfg.repl_timeout = opts.repl_timeout;
        cfg.data_dir = opts.data_dir;
        cfg.fsync = opts.fsync;
        cfg.retain_bytes = opts.retain_bytes;
        cfg.segment_bytes = opts.segment_bytes;
        cfg.retain_age = opts.retain_age;
        cfg.lease = opts.lease;
        cfg.max_pending = opts.max_pending;
        cfg.drain_timeout = opts.drain_timeout;
        cfg.max_connections = opts.max_connections;
        // A descriptor per connection, and some for the log, the peer and the listener.
        let want = opts.max_connections as u64 + 64;
        match crate::net::raise_fd_limit(want) {
            Ok(have) if have < want => tracing::warn!(
                "--max-connections {}: only {have} open files allowed (hard limit); \
                 connections past it are refused until `ulimit -Hn` is raised",
                opts.max_connections
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
        }
        cfg.peer_key = Some(key);
        cfg.allow_seed_replicate = opts.allow_seed_replicate;
        cfg.seed_backup = opts.seed_backup;
        cfg.metrics = opts.metrics;
        cfg.max_unacked = opts.max_unacked;
        cfg.max_subscriptions = opts.max_subscriptions;
        cfg.max_topic_len = opts.max_topic_len;
        cfg.journal_compact = opts.journal_compact;
        cfg.frame_timeout = opts.frame_timeout;
        cfg.tls = tls;
        match driver::run(listener, cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Options shared by the publishing binaries.
#[derive(Debug, Clone, Args)]
pub struct PublishOpts {
    /// How long to wait for an ACK before switching to the other broker.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub ack_timeout: Duration,
    /// How many of the last messages to resend after switching broker (unacknowledged ones are
    /// always resent).
    #[arg(long, default_value_t = 5)]
    pub resend: usize,
    /// Publisher id carried by every message (default: unique per process).
    #[arg(long)]
    pub id: Option<String>,
    /// Give up when nothing was acknowledged for this long after the last message.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub give_up: Duration,
    /// Connect to the brokers over TLS, checking their certificates against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// The TLS of a client binary (`--tls-ca`), or why it cannot be had.
fn client_tls(ca: Option<&std::path::Path>) -> Result<Option<crate::tls::Client>, String> {
    ca.map(|ca| crate::tls::Client::new(ca, None))
        .transpose()
        .map_err(|e| e.to_string())
}

/// `test-publisher`: numbered messages at a fixed rate.
#[derive(Debug, clap::Parser)]
#[command(name = "test-publisher", version)]
pub struct TestPublisherCli {
    /// Topic to publish on.
    pub topic: String,
    /// Primary broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub primary: String,
    /// Backup broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub backup: String,
    /// Messages per second; the schedule is drift-free (message n leaves at start + n/rate).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Stop after N messages; exit 0 once all are acknowledged, 1 if any never was.
    #[arg(long)]
    pub count: Option<u64>,
    /// Print only switches and the final summary, not one line per ACK.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also write one CSV row per acknowledged message to FILE (`seq,acked_at_us,broker`).
    #[arg(long, value_name = "FILE")]
    pub acks: Option<std::path::PathBuf>,
    /// Publishing options.
    #[command(flatten)]
    pub opts: PublishOpts,
}

/// `publisher`: one message.
#[derive(Debug, clap::Parser)]
#[command(name = "publisher", version)]
pub struct PublisherCli {
    /// Topic to publish on.
    pub topic: String,
    /// Message body (may contain `|`, not a newline).
    pub payload: String,
    /// Primary broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub primary: String,
    /// Backup broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub backup: String,
    /// Publishing options.
    #[command(flatten)]
    pub opts: PublishOpts,
}

/// `subscriber`: listens to both brokers at once.
#[derive(Debug, clap::Parser)]
#[command(name = "subscriber", version)]
pub struct SubscriberCli {
    /// Topic to follow.
    pub topic: String,
    /// Primary broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub primary: String,
    /// Backup broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub backup: String,
    /// Also write one CSV row per delivery to FILE (columns in README.md).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<std::path::PathBuf>,
    /// Start with the topic's delivered entries from offset N on, then go live.
    #[arg(long, value_name = "N", group = "start")]
    pub from_offset: Option<u64>,
    /// Start with the last N delivered entries of the topic, then go live.
    #[arg(long, value_name = "N", group = "start")]
    pub history: Option<u64>,
    /// Start with the first entry the broker received at or after TIME, then go live: µs since
    /// the Unix epoch, or RFC 3339 (`2025-01-31T12:00:00Z`, `2025-01-31T13:00:00.5+01:00`).
    #[arg(long, value_name = "TIME", group = "start", value_parser = parse_time_us)]
    pub from_time: Option<u64>,
    /// After a reconnect, subscribe again from the first start (or live) instead of resuming
    /// after the highest offset received (BACKUP_SYSTEM.md, *Reading a topic's past*).
    #[arg(long)]
    pub no_resume: bool,
    /// Resume after a reconnect: the default (kept so that older command lines still run).
    #[arg(long, hide = true, conflicts_with = "no_resume")]
    pub resume: bool,
    /// Connect to the brokers over TLS, checking their certificates against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl SubscriberCli {
    /// Where the first subscription starts, from `--from-offset`/`--history`/`--from-time`.
    pub fn start(&self) -> Option<crate::protocol::Start> {
        use crate::protocol::Start;
        (self.from_offset.map(Start::Offset))
            .or(self.history.map(Start::Last))
            .or(self.from_time.map(Start::Time))
    }
}

/// `--from-time`: µs since the Unix epoch, or an RFC 3339 date-time with a `Z` or `±HH:MM` offset.
pub fn parse_time_us(s: &str) -> Result<u64, String> {
    if let Ok(us) = s.parse::<u64>() {
        return Ok(us);
    }
    rfc3339_us(s).ok_or_else(|| {
        format!("'{s}': expected µs since the Unix epoch or RFC 3339 like 2025-01-31T12:00:00Z")
    })
}

fn rfc3339_us(s: &str) -> Option<u64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let (date, rest) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let (clock, offset_s) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (c, off) = rest.split_at(at);
        let (oh, om) = off[1..].split_once(':')?;
        let secs = num(oh)? * 3600 + num(om)? * 60;
        (c, if off.starts_with('-') { -secs } else { secs })
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((h, f)) => (h, f),
        None => (clock, ""),
    };
    let mut t = hms.split(':');
    let (hh, mm, ss) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let micros = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        num(&digits)?
    };
    // Days from 1970-01-01 to the civil date (proleptic Gregorian).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_s;
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(micros as u64)
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => Some(rt),
        Err(e) => {
            error!("cannot start the runtime: {e}");
            None
        }
    }
}

fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.contains(['|', '\n', '\r']) {
        Err(format!(
            "topic '{topic}': must be non-empty without '|' or newlines"
        ))
    } else {
        Ok(())
    }
}

fn publisher_config(
    topic: String,
    primary: String,
    backup: String,
    o: &PublishOpts,
) -> Result<crate::client::PublisherConfig, String> {
    Ok(crate::client::PublisherConfig {
        tls: client_tls(o.tls_ca.as_deref())?,
        topic,
        brokers: crate::client::Brokers { primary, backup },
        id: o.id.clone().unwrap_or_else(crate::client::new_publisher_id),
        ack_timeout: o.ack_timeout,
        resend: o.resend,
        give_up: o.give_up,
        net: Net::Tokio,
    })
}

/// Runs the `test-publisher` binary.
pub fn test_publisher(cli: TestPublisherCli) -> ExitCode {
    init_tracing();
    if let Err(e) = check_topic(&cli.topic) {
        error!("{e}");
        return ExitCode::from(2);
    }
    if !(cli.rate.is_finite() && cli.rate > 0.0) {
        error!("--rate must be a positive number of messages per second");
        return ExitCode::from(2);
    }
    let mut acks = match &cli.acks {
        None => None,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(crate::client::AckLog::new(f)),
            Err(e) => {
                error!("cannot create {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let shutdown = shutdown_on_signals();
        let cfg = match publisher_config(cli.topic, cli.primary, cli.backup, &cli.opts) {
            Ok(c) => c,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(2);
            }
        };
        info!("publisher {} at {} msg/s", cfg.id, cli.rate);
        let (in_tx, in_rx) = tokio::sync::mpsc::channel(1024);
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let quiet = cli.quiet;
        let printer = tokio::spawn(async move {
            while let Some(e) = ev_rx.recv().await {
                if let Some(Err(err)) = acks.as_mut().map(|a| a.event(&e)) {
                    error!("cannot write the acknowledgement file: {err}");
                    acks = None;
                }
                if !(quiet && matches!(e, crate::client::PubEvent::Acked { .. })) {
                    crate::client::print_event(&e);
                }
            }
        });
        // The producer stops on a signal; the publisher then still collects outstanding ACKs
        // (for up to --give-up) so that a clean stop loses nothing.
        let stop = shutdown.clone();
        let period = Duration::from_secs_f64(1.0 / cli.rate);
        let count = cli.count;
        let producer = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut seq = 0u64;
            loop {
                if count.is_some_and(|c| seq >= c) {
                    break;
                }
                let at = start + period.mul_f64(seq as f64);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(at) => {}
                }
                seq += 1;
                if in_tx.send((seq, seq.to_string())).await.is_err() {
                    break;
                }
            }
        });
        let hard_stop = CancellationToken::new();
        let summary = crate::client::run_publisher(cfg, in_rx, ev_tx, hard_stop.clone()).await;
        let _ = producer.await;
        let _ = printer.await;
        println!(
            "published {}, acknowledged {}, unacknowledged {}{}",
            summary.published,
            summary.acked,
            summary.unacked.len(),
            if summary.unacked.is_empty() {
                String::new()
            } else {
                format!(" ({:?})", summary.unacked)
            }
        );
        if summary.unacked.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// Runs the `publisher` binary: one message, exit 0 once acknowledged.
pub fn publisher(cli: PublisherCli) -> ExitCode {
    init_tracing();
    if let Err(e) = check_topic(&cli.topic) {
        error!("{e}");
        return ExitCode::from(2);
    }
    if cli.payload.contains(['\n', '\r']) {
        error!("payload must not contain a newline (it ends the frame)");
        return ExitCode::from(2);
    }
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let shutdown = shutdown_on_signals();
        let cfg = match publisher_config(cli.topic, cli.primary, cli.backup, &cli.opts) {
            Ok(c) => c,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(2);
            }
        };
        let (in_tx, in_rx) = tokio::sync::mpsc::channel(1);
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = in_tx.send((1, cli.payload)).await;
        drop(in_tx);
        let printer = tokio::spawn(async move {
            while let Some(e) = ev_rx.recv().await {
                crate::client::print_event(&e);
            }
        });
        let summary = crate::client::run_publisher(cfg, in_rx, ev_tx, shutdown).await;
        let _ = printer.await;
        if summary.acked == 1 {
            ExitCode::SUCCESS
        } else {
            error!("message was not acknowledged");
            ExitCode::FAILURE
        }
    })
}

/// Runs the `subscriber` binary until Ctrl-C or SIGTERM.
pub fn subscriber(cli: SubscriberCli) -> ExitCode {
    init_tracing();
    if let Err(e) = check_topic(&cli.topic) {
        error!("{e}");
        return ExitCode::from(2);
    }
    let csv = match &cli.csv {
        None => None,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => {
                let w: Box<dyn std::io::Write + Send> = Box::new(std::io::BufWriter::new(f));
                Some(csv::Writer::from_writer(w))
            }
            Err(e) => {
                error!("cannot create {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let shutdown = shutdown_on_signals();
        let mut cfg = crate::client::SubscriberConfig::new(
            cli.topic.clone(),
            crate::client::Brokers {
                primary: cli.primary.clone(),
                backup: cli.backup.clone(),
            },
            Net::Tokio,
        );
        cfg.start = cli.start();
        cfg.resume = !cli.no_resume;
        cfg.tls = match client_tls(cli.tls_ca.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(2);
            }
        };
        let mut sink = crate::client::PrintSink {
            out: std::io::BufWriter::new(std::io::stdout()),
            csv,
        };
        match crate::client::run_subscriber(cfg, &mut sink, shutdown).await {
            Ok(n) => {
                info!("stopped after {n} deliveries");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `edgepair-clock`: this host's clock against a node's.
#[derive(Debug, clap::Parser)]
#[command(name = "edgepair-clock", version)]
pub struct ClockCli {
    /// The node (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub node: String,
    /// Exchanges; the one with the smallest round trip is kept.
    #[arg(long, default_value_t = 8)]
    pub exchanges: usize,
}

/// Prints `offset_us=… uncertainty_us=… round_trip_us=…` (the node's clock minus this host's),
/// for a harness that runs it on a client's host to correct latencies measured across hosts.
pub fn clock(cli: ClockCli) -> ExitCode {
    init_tracing();
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(crate::client::clock_offset(
        Net::Tokio,
        &cli.node,
        cli.exchanges,
        Duration::from_secs(2),
    )) {
        Ok(c) => {
            println!(
                "offset_us={} uncertainty_us={} round_trip_us={}",
                c.offset_us,
                c.uncertainty_us(),
                c.round_trip_us
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `consumer`: a member of a consumer group.
#[derive(Debug, clap::Parser)]
#[command(name = "consumer", version)]
pub struct ConsumerCli {
    /// The group (made if missing, unless --no-create).
    pub group: String,
    /// Its topic.
    pub topic: String,
    /// Primary broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub primary: String,
    /// Backup broker (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub backup: String,
    /// This member's name, unique in the group (default: `consumer-PID`).
    #[arg(long)]
    pub name: Option<String>,
    /// Simulated work per entry, ms: `MIN..MAX` (uniform) or `N`; `0` for none.
    #[arg(long, default_value = "50..150")]
    pub work: ComputeRange,
    /// Share of entries given back (`nack`) instead of acknowledged, as a failing worker would.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub fail_rate: f64,
    /// Exit as a crash would after receiving N entries: the last one is never answered.
    #[arg(long, value_name = "N")]
    pub crash_after: Option<u64>,
    /// Also write one CSV row per entry to FILE (columns in README.md).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<std::path::PathBuf>,
    /// Where a group this consumer makes starts: `first`, `new`, an offset, or `time:µs`.
    #[arg(long, default_value = "first")]
    pub start: String,
    /// How long a member has to acknowledge an entry before it goes to another.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Deliveries of an entry before it goes to `TOPIC.dead`.
    #[arg(long, default_value_t = 5)]
    pub max_deliver: u32,
    /// Entries one member holds at a time.
    #[arg(long, default_value_t = 1)]
    pub max_in_flight: u32,
    /// Join only: the group must exist.
    #[arg(long)]
    pub no_create: bool,
    /// Seeds the work times and failures (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Connect to the brokers over TLS, checking their certificates against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}': expected a share between 0 and 1")),
    }
}

/// Runs a consumer; exit 0 when stopped, 3 after a planned crash (`--crash-after`), 2 on bad
/// options.
pub fn consumer(cli: ConsumerCli) -> ExitCode {
    use crate::protocol::{check_name, GroupOptions, GroupStart};
    init_tracing();
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| format!("consumer-{}", std::process::id()));
    let checks = check_topic(&cli.topic)
        .and_then(|_| check_name(&cli.group, "group").map_err(|e| e.to_string()))
        .and_then(|_| check_name(&name, "consumer").map_err(|e| e.to_string()));
    let start: Result<GroupStart, String> = cli.start.parse().map_err(|e| format!("--start: {e}"));
    let options_ok = GroupOptions::parse(&format!(
        "ack_wait={},max_deliver={},max_in_flight={}",
        cli.ack_wait.as_millis(),
        cli.max_deliver,
        cli.max_in_flight
    ))
    .map_err(|e| e.to_string());
    let tls = client_tls(cli.tls_ca.as_deref());
    let (start, options, tls) = match (checks, start, options_ok, tls) {
        (Ok(()), Ok(s), Ok(o), Ok(t)) => (s, o, t),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut csv = match &cli.csv {
        None => None,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(csv::Writer::from_writer(std::io::BufWriter::new(f))),
            Err(e) => {
                error!("cannot create {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let cfg = crate::client::ConsumerConfig {
        group: cli.group.clone(),
        topic: cli.topic.clone(),
        name,
        brokers: crate::client::Brokers {
            primary: cli.primary.clone(),
            backup: cli.backup.clone(),
        },
        net: Net::Tokio,
        tls,
        create: (!cli.no_create).then_some((start, options)),
        work: cli.work,
        fail_rate: cli.fail_rate,
        crash_after: cli.crash_after,
        seed: cli.seed.unwrap_or_else(crate::clock::now_us),
        print: true,
    };
    let end = rt.block_on(async {
        let shutdown = shutdown_on_signals();
        crate::client::run_consumer(
            cfg,
            |row| {
                if let Some(w) = csv.as_mut() {
                    w.serialize(row)?;
                    w.flush()?;
                }
                Ok(())
            },
            shutdown,
        )
        .await
    });
    match end {
        Ok(crate::client::ConsumerEnd::Stopped) => ExitCode::SUCCESS,
        Ok(crate::client::ConsumerEnd::Crashed) => ExitCode::from(3),
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `groups`: the consumer groups a node knows.
#[derive(Debug, clap::Parser)]
#[command(name = "groups", version)]
pub struct GroupsCli {
    /// The node (HOST:PORT or PORT).
    #[arg(value_parser = addr)]
    pub node: String,
    /// Only this topic's groups.
    pub topic: Option<String>,
    /// Connect over TLS, checking the node's certificate against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Prints one line per group: members, acknowledged floor, pending, lag, redeliveries, dead
/// letters.
pub fn groups(cli: GroupsCli) -> ExitCode {
    use crate::protocol::{Frame, GroupOp};
    use futures_util::{SinkExt, StreamExt};
    init_tracing();
    let tls = match client_tls(cli.tls_ca.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let listed: anyhow::Result<Vec<(String, String, crate::protocol::GroupInfo)>> =
        rt.block_on(async {
            use anyhow::Context;
            let s = Net::Tokio
                .connect_tls(&cli.node, Duration::from_secs(2), tls.as_ref())
                .await
                .with_context(|| format!("cannot reach {}", cli.node))?;
            let mut f = tokio_util::codec::Framed::new(s, crate::protocol::FrameCodec::default());
            f.send(Frame::Group(GroupOp::List {
                topic: cli.topic.clone(),
            }))
            .await?;
            let mut out = Vec::new();
            loop {
                let next = tokio::time::timeout(Duration::from_secs(5), f.next())
                    .await
                    .context("no answer within 5 s")?;
                match next {
                    Some(Ok(Frame::Group(GroupOp::Info { topic, group, info }))) => {
                        out.push((topic, group, info))
                    }
                    Some(Ok(Frame::Group(GroupOp::End))) => return Ok(out),
                    Some(Ok(Frame::Err { reason })) => anyhow::bail!("{}: {reason}", cli.node),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => anyhow::bail!("{}: {e}", cli.node),
                    None => anyhow::bail!("{} closed the connection", cli.node),
                }
            }
        });
    match listed {
        Ok(groups) => {
            println!(
                "{:<16} {:<16} {:>8} {:>8} {:>8} {:>11} {:>5}  members",
                "topic", "group", "floor", "pending", "lag", "redelivered", "dead"
            );
            for (t, g, i) in groups {
                println!(
                    "{t:<16} {g:<16} {:>8} {:>8} {:>8} {:>11} {:>5}  {}",
                    i.floor,
                    i.pending,
                    i.lag,
                    i.redelivered,
                    i.dead,
                    if i.members.is_empty() {
                        "-".to_string()
                    } else {
                        i.members.join(",")
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
