//! Runs a [`Broker`](crate::core::Broker) on a tokio runtime (or inside a turmoil simulation).
//!
//! One task owns the core: no lock, no shared state. It polls every connection's reader (one
//! `SelectAll`), the listener, finished connects and compute tasks, and one timer for the
//! core's next deadline; it feeds each event to the core with the time, then acts on the
//! core's outputs: bytes go to each connection's writer task, connects and compute tasks are
//! spawned and report back on a channel. Frames that are already read are handled as one batch
//! with one clock reading, and their outputs leave together.

mod io;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_us;
use crate::compute::Compute;
use crate::core::{Backoff, Broker, Config, ConnId, Now, Output, Time};
use crate::net::{BoxStream, Listener, Net};
use crate::protocol::Role;
use io::{ConnEvent, Readers, Writer};

/// Most connections a node serves at once by default (`--max-connections`); more are told
/// `ERR|too many connections` and closed. With [`MAX_FRAME`](crate::protocol::MAX_FRAME) this
/// bounds the memory idle or half-sent frames can pin.
pub const MAX_CONNECTIONS: usize = 4096;

/// Answers queued for a client that sends without reading them before the node stops reading
/// from it (it goes on once they are read): a publisher that never reads its `ACK`s is paced.
pub const CONNECTION_QUEUE: usize = 8192;

/// Bytes queued for one subscriber before it counts as too slow and is disconnected, rather
/// than holding up everyone else's deliveries or the node's memory (`--max-pending`; NATS cuts
/// a slow consumer at the same 64 MiB). A `subscriber` that is cut reconnects and resumes by
/// offset, so it misses nothing its node still keeps.
pub const MAX_PENDING: u64 = 64 * 1024 * 1024;

/// How long a clean stop may take by default: the longest compute of the seed scenario is
/// 150 ms, a replication round trip a few; seconds leave room for a slow disk.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping node waits for its connections to take what was queued for them.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// How long a connection may take from the first byte of a frame to its newline before it is
/// closed (`--frame-timeout`): a client that drips bytes and never finishes a frame would
/// otherwise hold its buffer and its slot for ever. Idle connections (nothing begun) are not
/// timed: a subscriber may wait for hours.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames read in one go (about) before their outputs are written: enough that a batch's
/// writes and its clock reading are shared by many messages, few enough that the outputs
/// waiting for the batch's end stay in the cache rather than growing the core's queue.
const BATCH: usize = 1024;

/// Everything a node needs to know at start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Role at start: the `primary` binary starts as primary, `backup` as backup.
    pub role: Role,
    /// The other node: the backup's address for a primary, the primary's for a backup.
    pub peer: Option<String>,
    /// The compute stage.
    pub compute: Compute,
    /// How often a backup pings its primary.
    pub ping_interval: Duration,
    /// How long a `PING` (or a probe) may go unanswered before the primary counts as hung.
    pub ping_timeout: Duration,
    /// How long the primary waits for `STORED` before it declares the backup link dead and
    /// acknowledges degraded. Kept well under the publishers' ack timeout so a hung backup does
    /// not make publishers fail over from a healthy primary.
    pub repl_timeout: Duration,
    /// How a backup forwarding a publish waits for the primary's `ACK`.
    pub forward_timeout: Duration,
    /// The network to use.
    pub net: Net,
    /// Where the log lives on disk; `None` keeps it in memory (nothing survives a restart).
    pub data_dir: Option<std::path::PathBuf>,
    /// When answers wait for the disk (with a `data_dir`).
    pub fsync: crate::log::Fsync,
    /// Per topic, the log's segments beyond this many bytes are removed once delivered.
    pub retain_bytes: Option<u64>,
    /// Where a topic's log rolls over to a new segment file (`--segment-bytes`).
    pub segment_bytes: u64,
    /// Per topic, segments whose newest entry is older than this are removed once delivered.
    pub retain_age: Option<Duration>,
    /// The lease (`--lease`): no overlapping reigns, at the price of failover time and of
    /// availability in a partition. `None`: off.
    pub lease: Option<Duration>,
    /// Bytes queued for a subscriber before it is disconnected ([`MAX_PENDING`]).
    pub max_pending: u64,
    /// How long a clean stop may take to finish what is in flight (`--drain-timeout`).
    pub drain_timeout: Duration,
    /// Accepted connections served at once, the peer's included ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// The secret shared with the peer (`crate::secret`); `None`: no connection can act as a
    /// peer, and this node's own peer links are refused.
    pub peer_key: Option<crate::core::PeerKey>,
    /// Take the seed's `REPLICATE`/`CLEAR` without authentication (`--allow-seed-replicate`).
    pub allow_seed_replicate: bool,
    /// Primary: drive a seed backup, unauthenticated (`--seed-backup`).
    pub seed_backup: bool,
    /// Seeds the handshake's nonces; `None` draws from the operating system.
    pub nonce_seed: Option<[u8; 32]>,
    /// Publishes of one connection awaiting their `ACK` before it is read no more.
    pub max_unacked: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Longest topic name, bytes.
    pub max_topic_len: usize,
    /// Journal entries between snapshots of the consumer groups (the simulation makes it
    /// small, to compact under faults).
    pub journal_compact: u64,
    /// How long a connection may take to finish a frame it has begun ([`FRAME_TIMEOUT`]).
    pub frame_timeout: Duration,
    /// TLS (`--tls-cert`, `--tls-key`, `--tls-ca`); `None`: plain TCP.
    pub tls: Option<crate::tls::NodeTls>,
    /// Where to serve Prometheus metrics over HTTP (`--metrics`); `None`: nowhere.
    pub metrics: Option<String>,
}

impl NodeConfig {
    /// The core's settings for this node: what the driver starts it with, a fresh
    /// incarnation (the time now) and nonce seed (random, unless `nonce_seed` is set) each
    /// call.
    pub fn core_config(&self) -> Config {
        Config {
            born: self.role,
            peer: self.peer.clone(),
            compute_off: self.compute.range().is_off(),
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            repl_timeout: self.repl_timeout,
            forward_timeout: self.forward_timeout,
            incarnation: now_us().max(1),
            fsync: self.fsync,
            lease: self.lease,
            peer_key: self.peer_key.clone(),
            allow_seed_replicate: self.allow_seed_replicate,
            seed_backup: self.seed_backup,
            nonce_seed: self.nonce_seed.unwrap_or_else(|| {
                let mut s = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
                s
            }),
            max_unacked: self.max_unacked.max(1),
            max_subscriptions: self.max_subscriptions,
            max_topic_len: self.max_topic_len,
            journal_compact: self.journal_compact,
            require_client_cert: self.tls.is_some(),
        }
    }

    /// Defaults of the seed scenario for a node in `role` whose peer is `peer`.
    pub fn new(role: Role, peer: Option<String>, compute: Compute) -> Self {
        NodeConfig {
            role,
            peer,
            compute,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(300),
            repl_timeout: Duration::from_millis(250),
            forward_timeout: Duration::from_millis(1000),
            net: Net::Tokio,
            data_dir: None,
            fsync: crate::log::Fsync::default(),
            retain_bytes: None,
            segment_bytes: crate::log::DEFAULT_SEGMENT_BYTES,
            retain_age: None,
            lease: None,
            max_pending: MAX_PENDING,
            drain_timeout: DRAIN_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            peer_key: None,
            allow_seed_replicate: false,
            seed_backup: false,
            nonce_seed: None,
            max_unacked: crate::core::MAX_UNACKED,
            max_subscriptions: crate::core::MAX_SUBSCRIPTIONS,
            max_topic_len: crate::core::MAX_TOPIC_LEN,
            journal_compact: crate::core::JOURNAL_COMPACT,
            frame_timeout: FRAME_TIMEOUT,
            tls: None,
            metrics: None,
        }
    }
}

/// Something a spawned helper task finished.
enum Done {
    /// A TLS handshake on an accepted connection ended (the stream, the client's address,
    /// whether it presented a certificate the CA signed); `None`: it failed.
    Accepted(
        Option<(BoxStream, bool)>,
        String,
        Arc<std::sync::atomic::AtomicU64>,
    ),
    Connected(ConnId, BoxStream),
    ConnectFailed(ConnId, String),
    Computed {
        mid: u64,
        start: u64,
        end: u64,
    },
    Synced(crate::log::SyncJob, Result<(), crate::log::LogError>),
}

/// The one clock reading of the driver: monotonic time since the node started, and the wall
/// clock for stamps (both virtual inside a simulation).
struct Clock {
    origin: tokio::time::Instant,
}

impl Clock {
    fn now(&self) -> Now {
        Now {
            mono: Time::from_duration(tokio::time::Instant::now() - self.origin),
            wall_us: now_us(),
        }
    }

    fn instant(&self, t: Time) -> tokio::time::Instant {
        self.origin + t.as_duration()
    }
}

/// The task that owns the core and every connection.
struct Driver {
    core: Broker,
    clock: Clock,
    readers: Readers,
    writers: HashMap<ConnId, Writer>,
    /// Writers given lines since the last flush (each once): flushed when a batch's outputs
    /// are all out.
    dirty: Vec<ConnId>,
    /// Accepted connections still open, against `max_connections`.
    inbound: HashSet<ConnId>,
    max_connections: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Writers that drained after an [`Output::Writable`] say so here.
    drained_tx: mpsc::UnboundedSender<ConnId>,
    compute: Compute,
    net: Net,
    /// Bytes queued for a subscriber before it is disconnected.
    max_pending: usize,
    /// How long a begun frame may take to finish.
    frame_timeout: Duration,
    /// TLS on accepted connections and on those to the peer.
    tls: Option<crate::tls::NodeTls>,
    /// Accepted connections whose TLS handshake is under way (they count as connections).
    handshaking: usize,
    /// TLS handshakes that failed (logged at each power of two).
    tls_failures: u64,
    /// Subscribers disconnected for `--max-pending`.
    kicked: u64,
    /// Cloned into every writer task, which drops it when done: once the driver drops its
    /// own, the channel closes when the last writer has written out (see [`FLUSH_WAIT`]).
    alive: Option<mpsc::Sender<()>>,
    /// `--fsync always`: a backup fsyncs on the loop itself (see [`Driver::act`]).
    always: bool,
}

/// Runs a node on an already-bound listener until `shutdown` is cancelled.
///
/// The listener is bound by the caller so tests can bind port 0 and read the port back, and a
/// simulated network can supply its own.
pub async fn run(
    listener: Listener,
    cfg: NodeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let log = open_log(&cfg)?;
    run_on(listener, cfg, log, shutdown).await
}

/// [`run`] on a log the caller opened (`cfg.data_dir` is not looked at). The simulation keeps
/// each node's simulated disk outside the node, so that it outlives a crash of the node and
/// can lose what was not synced at a power loss.
pub async fn run_on(
    listener: Listener,
    cfg: NodeConfig,
    log: Box<dyn crate::log::Storage>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let clock = Clock {
        origin: tokio::time::Instant::now(),
    };
    let core_cfg = cfg.core_config();
    info!(
        "{} listening on {addr} (compute {} ms, peer {})",
        cfg.role.as_str(),
        cfg.compute.range(),
        cfg.peer.as_deref().unwrap_or("none")
    );
    let cfg_drain_timeout = cfg.drain_timeout;
    let (alive, mut writers_done) = mpsc::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (drained_tx, mut drained_rx) = mpsc::unbounded_channel();
    let mut d = Driver {
        core: Broker::with_log(core_cfg, log, clock.now()),
        clock,
        readers: Readers::default(),
        writers: HashMap::new(),
        dirty: Vec::new(),
        inbound: HashSet::new(),
        done_tx,
        drained_tx,
        compute: cfg.compute,
        net: cfg.net,
        max_pending: usize::try_from(cfg.max_pending).unwrap_or(usize::MAX),
        frame_timeout: cfg.frame_timeout,
        tls: cfg.tls.clone(),
        handshaking: 0,
        tls_failures: 0,
        kicked: 0,
        alive: Some(alive),
        always: cfg.fsync == crate::log::Fsync::Always,
        max_connections: cfg.max_connections,
    };
    let (scrape_tx, mut scrapes) = mpsc::channel::<tokio::sync::oneshot::Sender<String>>(16);
    if let Some(at) = &cfg.metrics {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for --metrics on {at}: {e}"))?;
        info!("metrics on http://{}/metrics", l.local_addr()?);
        crate::net::spawn(crate::metrics::serve(l, scrape_tx));
    } else {
        drop(scrape_tx);
    }
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let mut accept_pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // One timer for the core's next deadline, moved only when the deadline moves: arming a
    // fresh one per event would cost a timer-wheel insertion and removal per message.
    let mut armed = d.core.poll_timeout();
    let timer = tokio::time::sleep_until(d.clock.instant(armed.unwrap_or_default()));
    let stop = shutdown.cancelled();
    // A clean stop drains first (`core/stop.rs`), until this deadline at the latest.
    let drain_end = tokio::time::sleep(Duration::MAX);
    let mut draining = false;
    tokio::pin!(timer, stop, drain_end);
    loop {
        d.act();
        if draining && d.core.drained() {
            info!("stopping: everything in flight was finished");
            break;
        }
        let next = d.core.poll_timeout();
        if next != armed {
            armed = next;
            if let Some(t) = next {
                timer.as_mut().reset(d.clock.instant(t));
            }
        }
        tokio::select! {
            _ = &mut stop, if !draining => {
                draining = true;
                let now = d.clock.now();
                d.core.handle_stop(now);
                drain_end.as_mut().reset(tokio::time::Instant::now() + cfg_drain_timeout);
            }
            _ = &mut drain_end, if draining => {
                warn!(
                    "stopping after --drain-timeout {cfg_drain_timeout:?} with work left: {}",
                    d.core.unfinished()
                );
                break;
            }
            a = listener.accept(), if accept_pause.is_none() => {
                accept_pause = d.on_accept(a, &mut backoff);
            }
            _ = async { if let Some(p) = accept_pause.as_mut() { p.await } }, if accept_pause.is_some() => {
                accept_pause = None;
            }
            Some(ev) = d.readers.next(), if !d.readers.is_empty() => {
                d.read_batch(ev);
                d.act();
                // The writer tasks write the batch's lines before the next batch is read:
                // otherwise, with input always ready, the loop reads on until tokio's budget
                // makes it yield, and every connection's outbox grows meanwhile (fresh memory
                // to fault in, and a subscriber's lines late by many batches).
                tokio::task::yield_now().await;
            }
            Some(done) = done_rx.recv() => d.done(done),
            Some(reply) = scrapes.recv() => {
                let counts = crate::metrics::DriverCounts {
                    connections: (d.inbound.len() + d.handshaking) as u64,
                    kicked: d.kicked,
                };
                let _ = reply.send(crate::metrics::encode(&d.core.snapshot(), &counts));
            }
            Some(conn) = drained_rx.recv() => {
                let now = d.clock.now();
                d.core.handle_writable(conn, now);
            }
            _ = &mut timer, if armed.is_some() => {
                let now = d.clock.now();
                d.core.handle_timeout(now);
                // Re-armed above from the core's next deadline, even if it did not move.
                armed = None;
            }
        }
    }
    info!("stopping: {addr} as {}", d.core);
    if let Err(e) = d.core.shutdown() {
        warn!("the log could not be synced on the way out: {e}");
    }
    // What is queued for each connection (a drain's last deliveries, `CLR`s to the backup) is
    // written out before the process goes: every writer is let go, and the channel closes once
    // the last writer task is done.
    d.writers.clear();
    d.alive = None;
    if tokio::time::timeout(FLUSH_WAIT, writers_done.recv())
        .await
        .is_err()
    {
        warn!("some connections did not take what was queued for them within {FLUSH_WAIT:?}");
    }
    Ok(())
}

/// The node's log: the files in `--data-dir`, or memory.
fn open_log(cfg: &NodeConfig) -> anyhow::Result<Box<dyn crate::log::Storage>> {
    match &cfg.data_dir {
        None => Ok(Box::new(crate::log::MemLog::new(
            crate::log::DEFAULT_RETAIN_ENTRIES,
        ))),
        Some(dir) => {
            let (mut log, recovery) = crate::log::FileLog::open_with(dir, cfg.segment_bytes)?;
            log.set_retention(cfg.retain_bytes, cfg.retain_age);
            log.set_preallocate(cfg.fsync == crate::log::Fsync::Always);
            for line in recovery.lines() {
                warn!("log recovery: {line}");
            }
            info!("log in {} (fsync {})", dir.display(), cfg.fsync);
            Ok(Box::new(log))
        }
    }
}

impl Driver {
    /// Acts on every output of the core (see [`Driver::act_unflushed`]), then hands each
    /// connection's lines to its writer task, once per connection.
    fn act(&mut self) {
        self.act_unflushed();
        self.flush_writers();
    }

    /// Every writer's pending lines to its task: one hand-over per connection per batch.
    fn flush_writers(&mut self) {
        for conn in self.dirty.drain(..) {
            if let Some(w) = self.writers.get_mut(&conn) {
                w.flush();
            }
        }
    }

    /// Acts on every output of the core, in order; then, if the core asked for it, syncs the
    /// log once for all of them (group commit): on a blocking thread, so that the loop goes on
    /// reading (and the replication frames just queued go out) during the fsync; what it
    /// releases is acted on when it reports back ([`Done::Synced`]).
    ///
    /// A backup under `--fsync always` fsyncs on the loop instead: each of its `STORED`s waits
    /// for the fsync anyway, and what arrives meanwhile is read after it, into the next group
    /// commit. That saves two thread hand-offs per sync on the path of every `ACK` (measured:
    /// the 64-deep figure 0.89x -> 0.91x Redis, one at a time 1.59x -> 1.50x its p50; medians of
    /// 3 alternating rounds).
    fn act_unflushed(&mut self) {
        let mut sync = false;
        loop {
            while let Some(o) = self.core.poll_output() {
                if matches!(o, Output::Sync) {
                    sync = true;
                } else {
                    self.output(o);
                }
            }
            if !std::mem::take(&mut sync) {
                break;
            }
            // Lines before the sync go out meanwhile (a backup's `STORED`s after it).
            self.flush_writers();
            let now = self.clock.now();
            if let Some(job) = self.core.begin_sync(now) {
                if self.always && self.core.role() == Role::Backup {
                    let r = job.run();
                    let now = self.clock.now();
                    self.core.handle_synced(job, r, now);
                    continue;
                }
                let tx = self.done_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let r = job.run();
                    let _ = tx.send(Done::Synced(job, r));
                });
            }
        }
    }

    fn output(&mut self, o: Output) {
        match o {
            Output::Sync => {}
            Output::Send {
                conn,
                line,
                delivery,
            } => self.send(conn, &line, delivery),
            Output::Deliver { conns, line } => {
                for conn in conns {
                    self.send(conn, &line, true);
                }
            }
            Output::Close { conn } => {
                if let Some(w) = self.writers.remove(&conn) {
                    w.close();
                }
            }
            Output::Connect {
                conn,
                addr,
                timeout,
            } => {
                let (net, tx) = (self.net, self.done_tx.clone());
                let tls = self.tls.as_ref().map(|t| t.client.clone());
                crate::net::spawn(async move {
                    let done = match net.connect_tls(&addr, timeout, tls.as_ref()).await {
                        Ok(s) => Done::Connected(conn, s),
                        Err(e) => Done::ConnectFailed(conn, e.to_string()),
                    };
                    let _ = tx.send(done);
                });
            }
            Output::Writable { conn } => {
                if let Some(w) = self.writers.get_mut(&conn) {
                    w.notify_drained();
                }
            }
            Output::Hold { conn, held } => {
                if let Some(w) = self.writers.get(&conn) {
                    w.hold(held);
                }
            }
            Output::Compute { mid } => {
                let (compute, tx) = (self.compute.clone(), self.done_tx.clone());
                crate::net::spawn(async move {
                    let start = compute.run().await;
                    let end = now_us();
                    let _ = tx.send(Done::Computed { mid, start, end });
                });
            }
        }
    }

    /// Queues `line` for `conn`; a subscriber too far behind is disconnected instead.
    fn send(&mut self, conn: ConnId, line: &[u8], delivery: bool) {
        let Some(w) = self.writers.get_mut(&conn) else {
            return;
        };
        if delivery && w.queued_bytes() >= self.max_pending {
            warn!(
                "subscriber {conn} has {} bytes not read (--max-pending {}): disconnecting it",
                w.queued_bytes(),
                self.max_pending
            );
            if let Some(w) = self.writers.remove(&conn) {
                w.kick();
            }
            self.kicked += 1;
            let now = self.clock.now();
            self.core.handle_closed(conn, now);
            return;
        }
        if w.send(line) {
            self.dirty.push(conn);
        }
    }

    /// A connection came in, or accepting failed: then (out of file descriptors and the like)
    /// returns a pause before accepting again, rather than spin, while every connection and
    /// timer goes on being served.
    fn on_accept(
        &mut self,
        accepted: std::io::Result<(BoxStream, String)>,
        backoff: &mut Backoff,
    ) -> Option<Pin<Box<tokio::time::Sleep>>> {
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                self.accepted(stream, &peer);
                None
            }
            Err(e) => {
                let wait = backoff.next_wait();
                warn!("accept failed: {e}; accepting again in {wait:?}");
                Some(Box::pin(tokio::time::sleep(wait)))
            }
        }
    }

    fn accepted(&mut self, stream: BoxStream, peer: &str) {
        if self.inbound.len() + self.handshaking >= self.max_connections {
            warn!(
                "refusing {peer}: {} connections open (--max-connections)",
                self.inbound.len() + self.handshaking
            );
            crate::net::spawn(io::refuse(stream));
            return;
        }
        let Some(tls) = self.tls.as_ref().map(|t| t.server.clone()) else {
            self.admit(stream, peer, false, None);
            return;
        };
        let (stream, raw) = crate::net::Counted::new(stream);
        // The handshake runs on its own task, so a slow client holds up no one; it has the
        // time of a frame to finish.
        self.handshaking += 1;
        let (tx, limit, peer) = (self.done_tx.clone(), self.frame_timeout, peer.to_string());
        crate::net::spawn(async move {
            let r = match tokio::time::timeout(limit, tls.accept(Box::pin(stream))).await {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    debug!("TLS handshake with {peer} failed: {e}");
                    None
                }
                Err(_) => {
                    debug!("TLS handshake with {peer} took longer than {limit:?}");
                    None
                }
            };
            let _ = tx.send(Done::Accepted(r, peer, raw));
        });
    }

    /// An accepted connection (its TLS handshake done, if any) becomes a connection of the core.
    fn admit(
        &mut self,
        stream: BoxStream,
        peer: &str,
        client_cert: bool,
        raw: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) {
        let now = self.clock.now();
        let conn = if client_cert {
            self.core.handle_accepted_with_cert(now)
        } else {
            self.core.handle_accepted(now)
        };
        debug!("connection {conn} from {peer}");
        self.inbound.insert(conn);
        self.register(conn, stream, true, raw);
    }

    /// Registers a connection; `paced`: stop reading it while its answers are not being read
    /// (clients; not our own connections to the peer, whose answers we must always read).
    fn register(
        &mut self,
        conn: ConnId,
        stream: BoxStream,
        paced: bool,
        raw: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) {
        let Some(alive) = self.alive.clone() else {
            return;
        };
        let (reader, writer) = io::split(
            conn,
            stream,
            paced,
            self.frame_timeout,
            raw,
            self.drained_tx.clone(),
            alive,
        );
        self.readers.push(reader);
        self.writers.insert(conn, writer);
    }

    /// Handles `first` and whatever else the readers have ready, with one clock reading.
    fn read_batch(&mut self, first: ConnEvent) {
        let now = self.clock.now();
        let mut read = self.event(first, now);
        while read < BATCH {
            match self.readers.next().now_or_never() {
                Some(Some(ev)) => read += self.event(ev, now),
                _ => break,
            }
        }
    }

    /// Hands an event to the core; returns how many frames it carried.
    fn event(&mut self, ev: ConnEvent, now: Now) -> usize {
        match ev {
            ConnEvent::Frames(conn, frames) => {
                let n = frames.len();
                for frame in frames {
                    match frame {
                        Ok(frame) => self.core.handle_frame(conn, frame, now),
                        Err(e) => {
                            debug!("connection {conn}: {e}");
                            self.core.handle_bad_frame(conn, &e, now);
                        }
                    }
                }
                n
            }
            ConnEvent::Closed(conn) => {
                // What the core said to this connection before it closed still goes out.
                self.act();
                self.inbound.remove(&conn);
                if let Some(w) = self.writers.remove(&conn) {
                    w.close();
                }
                debug!("connection {conn} closed");
                self.core.handle_closed(conn, now);
                1
            }
        }
    }

    fn done(&mut self, done: Done) {
        let now = self.clock.now();
        match done {
            Done::Accepted(result, peer, raw) => {
                self.handshaking -= 1;
                match result {
                    Some((stream, cert)) => self.admit(stream, &peer, cert, Some(raw)),
                    None => {
                        self.tls_failures += 1;
                        if self.tls_failures.is_power_of_two() {
                            warn!(
                                "TLS handshakes failed: {} so far (the last from {peer}; \
                                 RUST_LOG=debug says why)",
                                self.tls_failures
                            );
                        }
                    }
                }
            }
            Done::Connected(conn, stream) => {
                self.register(conn, stream, false, None);
                self.core.handle_connected(conn, now);
            }
            Done::ConnectFailed(conn, e) => self.core.handle_connect_failed(conn, &e, now),
            Done::Computed { mid, start, end } => self.core.handle_computed(mid, start, end, now),
            Done::Synced(job, r) => self.core.handle_synced(job, r, now),
        }
    }
}
