//! The broker's heart as a deterministic state machine: no sockets, no tasks, no locks, no clock.
//!
//! A [`Broker`] is one node, primary or backup. Everything that happens to it comes in through
//! a `handle_*` method, with the time it happened; everything it wants done comes out of
//! [`Broker::poll_output`]. The caller (the driver, or a test) owns every socket and timer.
//!
//! # Call order
//!
//! 1. Feed each event as it happens: [`Broker::handle_accepted`] (it hands back the new
//!    connection's id), [`Broker::handle_frame`] / [`Broker::handle_bad_frame`],
//!    [`Broker::handle_closed`], [`Broker::handle_connected`] / [`Broker::handle_connect_failed`]
//!    for connections the broker asked for, [`Broker::handle_computed`] for a finished compute
//!    task, and [`Broker::handle_timeout`] once the time from [`Broker::poll_timeout`] is
//!    reached. Each takes `now`; it must never go backwards.
//! 2. After each event (or a batch of them), drain [`Broker::poll_output`] until it says `None`
//!    and act on every [`Output`] in order: the order of `Send`s to one connection is the order
//!    of the bytes on it.
//! 3. Then ask [`Broker::poll_timeout`] again: any event may have moved the next deadline.
//! 4. To stop cleanly, call [`Broker::handle_stop`] and go on as above until
//!    [`Broker::drained`] (or a deadline of the caller's: [`Broker::unfinished`] says what is
//!    left); then [`Broker::shutdown`].
//!
//! # The life of a message on the primary
//!
//! 1. **accept**: a `PUB`/`PUBLISH` gets a replication id (`mid`, arrival order); an identity
//!    already seen is a resend and is not processed again;
//! 2. **replicate**: `REPL` goes to the backup on the link; the publisher's `ACK` waits in the
//!    connection's reply queue for the backup's `STORED` (or for the link to be declared dead:
//!    the node then runs *degraded* and acknowledges anyway);
//! 3. **compute**: [`Output::Compute`] asks the caller to run the simulated task;
//! 4. **deliver**: results leave in per-publisher order to every subscriber of the topic, then
//!    `CLR` tells the backup it may forget the message.
//!
//! The backup stores `REPL`s, drops them on `CLR`, polls the primary, and decides when to take
//! over with the sans-IO [`failover::Detector`]. Role changes are functions in `roles.rs`, each
//! of which only changes state and queues outputs.

mod auth;
mod backup;
mod conn;
mod durable;
pub mod failover;
mod groups;
mod history;
mod inflight;
mod lease;
mod limits;
mod link;
mod peer;
mod primary;
mod roles;
mod seen;
mod settle;
mod stats;
mod stop;
mod takeup;
pub mod time;

use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use crate::log::{Entry, Fsync, MemLog, Storage, DEFAULT_RETAIN_ENTRIES};
use crate::named::Named;
use crate::protocol::{Frame, ProtocolError, Role};
pub use auth::{PeerKey, AUTH_FAILED, NOT_A_PEER};
pub use groups::{JOURNAL, JOURNAL_COMPACT};
pub use history::REPLAY_CHUNK;
pub use limits::{bad_topic, MAX_SUBSCRIPTIONS, MAX_TOPIC_LEN, MAX_UNACKED};
pub use stats::{Counters, Snapshot, StageHist, STAGE_BOUNDS_US};
pub use stop::STOPPING;
pub use time::{Backoff, Now, Time};

use backup::Backup;
use conn::{Conn, Kind, LineArena};
use lease::LEASE_REFUSED;
use primary::Primary;
use seen::SeenMap;
use time::{Timer, Timers};

/// Names a connection of a node, inbound or outbound. Ids are never reused.
pub type ConnId = u64;

/// A gap this long between two watchdog ticks means the process was paused (SIGSTOP, a frozen
/// VM), long enough for the backup to have taken over: a primary then checks with its peer
/// before it delivers anything. Shorter than the backup's quickest takeover after a missed ping.
pub const STALL: Duration = Duration::from_millis(250);

/// How long a node that has just started holds its first results (with compute on): long
/// enough for subscribers that lost it while it was down to reconnect (their backoff is capped
/// at 250 ms), so that what it delivers first, often messages handed over from its previous
/// life, is not missed.
pub const STARTUP_GRACE: Duration = Duration::from_millis(300);

/// What a node needs to know at start, as the core sees it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Role at start: the `primary` binary starts as primary, `backup` as backup.
    pub born: Role,
    /// The other node: the backup's address for a primary, the primary's for a backup.
    pub peer: Option<String>,
    /// True when compute is switched off: the broker is a pure relay and delivers in place.
    pub compute_off: bool,
    /// How often a backup pings its primary.
    pub ping_interval: Duration,
    /// How long a `PING` (or a probe) may go unanswered before the primary counts as hung.
    pub ping_timeout: Duration,
    /// How long the primary waits for `STORED` before it declares the backup link dead.
    pub repl_timeout: Duration,
    /// How long a backup forwarding a publish waits for the primary's `ACK`.
    pub forward_timeout: Duration,
    /// Changes with every start of the process (its start time in µs): sent in `HELLO`, and the
    /// first replication id, so that ids of two lives of one primary never collide at its backup.
    pub incarnation: u64,
    /// When an `ACK` (and a backup's `STORED`) waits for the local disk; see [`Fsync`]. Only
    /// matters with a log that reaches a disk.
    pub fsync: Fsync,
    /// The lease (`--lease`; see `lease.rs`): `None` chooses availability, as without it.
    pub lease: Option<Duration>,
    /// The secret shared with the peer (`auth.rs`): `None` authenticates no one, so this node
    /// takes no peer frames and its own are refused.
    pub peer_key: Option<PeerKey>,
    /// Take the seed's `REPLICATE`/`CLEAR` from connections that did not authenticate (a seed
    /// primary driving this backup cannot).
    pub allow_seed_replicate: bool,
    /// Primary: drive a backup that does not answer the peer handshake (a seed backup, which
    /// answers an unknown verb with `ERR`) with `REPLICATE`/`CLEAR`, unauthenticated.
    pub seed_backup: bool,
    /// Seeds the nonces of the peer handshake: random in a real node, fixed in a simulation.
    pub nonce_seed: [u8; 32],
    /// Publishes of one connection awaiting their `ACK` before it is read no more
    /// ([`MAX_UNACKED`]).
    pub max_unacked: usize,
    /// Subscriptions one connection may hold ([`MAX_SUBSCRIPTIONS`]).
    pub max_subscriptions: usize,
    /// Longest topic name in bytes ([`MAX_TOPIC_LEN`]).
    pub max_topic_len: usize,
    /// Journal entries after which the primary writes a snapshot of the consumer groups and
    /// removes what came before it ([`JOURNAL_COMPACT`]).
    pub journal_compact: u64,
    /// Mutual TLS: a connection may authenticate as the peer only if it presented a client
    /// certificate signed by the CA ([`Broker::handle_accepted_with_cert`]).
    pub require_client_cert: bool,
}

/// What the broker asks its caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write `line` to `conn`. `delivery` marks a message for a subscriber: a caller that
    /// bounds its write queues may disconnect a subscriber that falls behind, but must not drop
    /// a reply.
    Send {
        /// The connection.
        conn: ConnId,
        /// One or more whole frames, newlines included.
        line: Bytes,
        /// A delivery to a subscriber, rather than a reply or a peer frame.
        delivery: bool,
    },
    /// Write `line` to each of `conns`, as a delivery ([`Output::Send`] with `delivery` set,
    /// once per connection, in this order). A message to many subscribers of one dialect goes
    /// out as one of these: its line is not cloned and dropped, nor an output queued and taken,
    /// per subscriber (at 10,000 subscribers and 100 msg/s, a million of each a second).
    Deliver {
        /// The connections.
        conns: Vec<ConnId>,
        /// One whole frame, newline included.
        line: Bytes,
    },
    /// Close `conn` once what was sent before is written. No `handle_closed` is needed for it.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Open a connection to `addr` within `timeout`, known from now on as `conn`; then call
    /// [`Broker::handle_connected`] or [`Broker::handle_connect_failed`].
    Connect {
        /// The id the new connection will have.
        conn: ConnId,
        /// `host:port` of the peer.
        addr: String,
        /// Give up connecting after this long.
        timeout: Duration,
    },
    /// Run the compute task of message `mid`; then call [`Broker::handle_computed`].
    Compute {
        /// The message.
        mid: u64,
    },
    /// Stop (`held`) or resume reading from `conn`: frames of it wait unhandled (a publish it
    /// sent is being forwarded), and more should stay in the socket, not pile up here.
    Hold {
        /// The connection.
        conn: ConnId,
        /// Stop reading (true) or read again (false).
        held: bool,
    },
    /// Call [`Broker::handle_writable`] for `conn` once everything sent to it so far has been
    /// handed to the socket (at once if that is already so); a replay of the topic's past
    /// sends its next chunk then. Not repeated: one call per `Writable`.
    Writable {
        /// The connection.
        conn: ConnId,
    },
    /// Answers wait for the log to reach the disk: once the outputs queued now are acted on
    /// (so one fsync covers a whole batch of events), call [`Broker::handle_sync`] (or
    /// [`Broker::begin_sync`], to fsync on another thread meanwhile).
    Sync,
}

/// Frames of one connection that may wait unhandled before the core asks not to be given more.
pub const BACKLOG_HOLD: usize = 1024;

/// A message on its way through a node: its log entry, and the replication id (`mid`, arrival
/// order on this node) it goes by while in flight.
#[derive(Debug)]
struct Message {
    mid: u64,
    topic: String,
    /// Held here, not behind an `Arc` of its own: an allocation less per message (the log
    /// copies what it keeps).
    entry: Entry,
    /// For consumer groups only: the topic's subscribers had it already (an entry handed over
    /// from a diverged log so that a group still gets it; see `groups.rs`).
    quiet: bool,
}

/// A message as the primary's stages take it: owned (`Message`) while only the call at hand
/// holds it, which is all a relay's publish ever needs, so it costs no allocation of its own;
/// shared (`Arc<Message>`) once a stage keeps it, turned into one only then.
trait Msg: std::borrow::Borrow<Message> + Into<std::sync::Arc<Message>> {}

impl<T: std::borrow::Borrow<Message> + Into<std::sync::Arc<Message>>> Msg for T {}

impl std::ops::Deref for Message {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

/// Entries per topic read back at start to relearn which publisher identities were accepted,
/// so a resend after a restart is not logged twice.
const SEEN_REBUILD: u64 = 10_000;

/// The state only one role has lives in that role's variant, so no field is "only meaningful
/// when…".
// One per node, swapped only when the role changes; a `Box` would put a pointer chase in front
// of the primary's state on every publish.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum RoleState {
    Primary(Primary),
    Backup(Backup),
}

/// A subscriber registered on a topic.
#[derive(Debug)]
struct Sub {
    conn: ConnId,
    /// Seed subscribers get bare payload lines, identified ones `MSG` frames.
    legacy: bool,
    /// Its replay of the topic's past is going on: live deliveries skip it (see `history.rs`).
    replaying: bool,
    /// Live deliveries of entries below this offset skip it (it has them, or asked not to).
    from: u64,
}

/// A broker node in either role. See the module documentation for the call order.
#[derive(Debug)]
pub struct Broker {
    cfg: Config,
    /// The time of the event being handled.
    now: Now,
    /// When this node started; see [`STARTUP_GRACE`].
    started: Time,
    role: RoleState,
    epoch: u64,
    next_mid: u64,
    next_conn: ConnId,
    conns: HashMap<ConnId, Conn>,
    topics: Named<Vec<Sub>>,
    /// Identities accepted (primary) or stored (backup), per publisher.
    seen: SeenMap,
    /// The peer introduced itself with `HELLO`, so it answers `STATUS` (a seed primary only
    /// answers `PING`).
    peer_speaks_status: bool,
    /// Incarnation of the primary whose messages we hold (as a backup).
    following: u64,
    timers: Timers,
    out: VecDeque<Output>,
    /// Messages being handed to the peer after a step-down or a primary's restart.
    handovers: BTreeMap<u64, peer::HandOver>,
    /// A clean stop is under way (`stop.rs`): new publishes are refused.
    stopping: bool,
    /// Publishes to forward once the hand-overs are done (connection, frame, attempt).
    forwards_waiting: Vec<(ConnId, Frame, u8)>,
    next_handover: u64,
    /// Backup: the link on which our primary asked `SETTLE` (`settle.rs`), until we answer.
    settle_asked: Option<ConnId>,
    /// Results computed during the startup grace: (mid, compute start, compute end).
    graced: Vec<(u64, u64, u64)>,
    delivered: u64,
    /// Every topic's log.
    log: Box<dyn Storage>,
    /// Every `mid` up to this one is on the local disk (when answers wait for it).
    synced_mid: u64,
    /// An [`Output::Sync`] is queued and not yet answered.
    sync_asked: bool,
    /// Backup: the `STORED` that waits for the sync (the last one; `STORED` is cumulative).
    stored_after_sync: Option<(ConnId, u64)>,
    /// Backup: the `STORED` that waits for the write of the log (a data directory's log under
    /// `batch` or `never`).
    stored_after_write: Option<(ConnId, u64)>,
    /// Every `mid` up to this one is written to the log's files (when answers wait for it).
    written_mid: u64,
    /// A sync handed out by [`Broker::begin_sync`] and not yet ended.
    syncing: Option<durable::Syncing>,
    /// A sync was asked for while one was in flight: ask again when it ends.
    sync_again: bool,
    /// Appends since the log was last flushed: flushed before the next output leaves.
    unflushed: bool,
    /// The lines handed to the driver are cut from here.
    lines: LineArena,
    /// Backup: offsets above a topic's delivered mark that were cleared out of order (the
    /// seed's `CLEAR` comes in the order its compute tasks end).
    cleared: HashMap<String, std::collections::BTreeSet<u64>>,
    /// Primary: topics with deliveries since the last `CLR`s went out (one per topic, at the
    /// end of the batch: see [`Broker::send_delivered_marks`]).
    delivered_due: foldhash::HashSet<String>,
    /// Replays of topics' pasts to subscribers (`history.rs`).
    replays: history::Replays,
    /// Draws the nonces of peer handshakes (`auth.rs`).
    rng: rand::rngs::StdRng,
    /// Peer frames refused from connections that did not authenticate.
    refused_peer_frames: u64,
    /// Nonces this node offered lately as the opener of a peer link (`auth.rs`).
    offered: VecDeque<Vec<u8>>,
    /// A connection reached `--max-unacked` (logged once).
    said_full: bool,
    /// What `--metrics` reports (`stats.rs`).
    counters: stats::Counters,
    /// Consumer groups (`groups.rs`).
    groups: groups::Groups,
}

impl Broker {
    /// A node that starts at `now` in the role `cfg.born`, with its log in memory.
    pub fn new(cfg: Config, now: Now) -> Broker {
        Broker::with_log(cfg, Box::new(MemLog::new(DEFAULT_RETAIN_ENTRIES)), now)
    }

    /// A node that starts at `now` in the role `cfg.born` on `log`, which may hold entries
    /// from an earlier life: what it did not deliver then, it delivers (as primary) or holds
    /// (as backup) now.
    pub fn with_log(cfg: Config, log: Box<dyn Storage>, now: Now) -> Broker {
        let role = match cfg.born {
            Role::Primary => RoleState::Primary(Primary::new(cfg.peer.is_some(), now.mono)),
            Role::Backup => RoleState::Backup(Backup::new(cfg.ping_interval, now.mono)),
        };
        let mut b = Broker {
            rng: rand::SeedableRng::from_seed(cfg.nonce_seed),
            refused_peer_frames: 0,
            offered: VecDeque::new(),
            said_full: false,
            counters: Default::default(),
            groups: Default::default(),
            next_mid: cfg.incarnation.max(1),
            cfg,
            now,
            started: now.mono,
            role,
            epoch: 1,
            next_conn: 0,
            conns: HashMap::new(),
            topics: Named::new(),
            seen: SeenMap::default(),
            peer_speaks_status: false,
            following: 0,
            timers: Timers::default(),
            out: VecDeque::new(),
            handovers: BTreeMap::new(),
            stopping: false,
            forwards_waiting: Vec::new(),
            next_handover: 0,
            settle_asked: None,
            graced: Vec::new(),
            delivered: 0,
            log,
            synced_mid: 0,
            sync_asked: false,
            stored_after_sync: None,
            stored_after_write: None,
            written_mid: 0,
            syncing: None,
            sync_again: false,
            unflushed: false,
            lines: LineArena::default(),
            cleared: HashMap::new(),
            delivered_due: Default::default(),
            replays: history::Replays::default(),
        };
        b.synced_mid = b.next_mid - 1;
        b.written_mid = b.synced_mid;
        b.recover();
        b.settle_at_start();
        b.timers
            .set(Timer::Retain, now.mono + durable::RETAIN_EVERY);
        b.timers.set(Timer::Watchdog, now.mono + STALL / 5);
        match (b.cfg.born, b.cfg.peer.is_some()) {
            (Role::Primary, true) => b.connect_link(),
            (Role::Primary, false) => warn!("no backup configured: running degraded"),
            (Role::Backup, true) => b.timers.set(Timer::Ping, now.mono),
            (Role::Backup, false) => {
                warn!("backup without a primary address: will never take over")
            }
        }
        b
    }

    /// A client connected; returns the id its frames are to be handled under.
    pub fn handle_accepted(&mut self, now: Now) -> ConnId {
        self.now = now;
        let id = self.new_conn_id();
        self.conns.insert(id, Conn::new(Kind::Client));
        id
    }

    /// A client connected over TLS and presented a certificate signed by the CA: it may
    /// authenticate as the peer under mutual TLS.
    pub fn handle_accepted_with_cert(&mut self, now: Now) -> ConnId {
        let id = self.handle_accepted(now);
        if let Some(c) = self.conns.get_mut(&id) {
            c.client_cert = true;
        }
        id
    }

    /// A frame arrived on `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: Frame, now: Now) {
        self.now = now;
        // A member's acks (and nacks) in a row share one batch of group records; anything
        // else closes the batch before and after it (`groups.rs`, `journal_flush`).
        let in_batch = matches!(
            frame,
            Frame::Group(
                crate::protocol::GroupOp::Ack { .. } | crate::protocol::GroupOp::Nack { .. }
            )
        );
        if !in_batch {
            self.journal_flush();
        }
        self.on_frame(conn, frame);
        if !in_batch {
            self.journal_flush();
        }
    }

    fn on_frame(&mut self, conn: ConnId, frame: Frame) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if matches!(c.kind, Kind::InLink) {
            if matches!(frame, Frame::StatusQuery) && !self.grant_lease() {
                // A backup about to take over lets its primary's lease run out.
                let reason = format!("{LEASE_REFUSED}: taking over");
                self.reply(conn, Frame::Err { reason });
                return;
            }
            // The primary spoke on its link (see `poll_failed`).
            let now = self.now.mono;
            if let Some(b) = self.backup() {
                b.heard_at = now;
            }
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match &c.kind {
            Kind::Out(_) => self.on_peer_frame(conn, frame),
            Kind::Client | Kind::InLink if c.busy || c.full => self.hold_back(conn, Ok(frame)),
            Kind::Client | Kind::InLink => self.dispatch(conn, frame),
        }
    }

    /// A line on `conn` did not parse. The client is told `ERR|…`; a fatal error (a frame too
    /// long to find the next one) closes the connection.
    pub fn handle_bad_frame(&mut self, conn: ConnId, err: &ProtocolError, now: Now) {
        self.now = now;
        self.journal_flush();
        match self.conns.get(&conn).map(|c| &c.kind) {
            None => return,
            Some(Kind::Out(_)) => {
                // Our peer speaks the protocol: a bad line from it ends that connection.
                if let Some(Conn {
                    kind: Kind::Out(purpose),
                    ..
                }) = self.close(conn)
                {
                    self.on_peer_failed(conn, purpose, format!("read: {err}"));
                }
                return;
            }
            Some(_) => {}
        }
        let bad = conn::Bad {
            reason: err.to_string(),
            fatal: err.is_fatal(),
        };
        if self.conns.get(&conn).is_some_and(|c| c.busy || c.full) {
            // Answered in its turn, after the frames that came before it.
            self.hold_back(conn, Err(bad));
        } else {
            self.on_bad(conn, bad);
        }
    }

    /// Answers a line that did not parse; a fatal one closes the connection.
    fn on_bad(&mut self, conn: ConnId, bad: conn::Bad) {
        self.reply(conn, Frame::Err { reason: bad.reason });
        if bad.fatal {
            self.close(conn);
        }
    }

    /// `conn` was closed by the other side (or broke).
    pub fn handle_closed(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        self.journal_flush();
        if let Some(c) = self
            .conns
            .get_mut(&conn)
            .filter(|c| c.busy || (c.full && !c.backlog.is_empty()))
        {
            // A client that sent a publish (and maybe more) and hung up without waiting: what
            // it sent is still handled, in order, before the connection is forgotten.
            c.hung_up = true;
            return;
        }
        self.closed(conn);
    }

    /// Forgets a connection the other side closed, and reacts as its kind requires.
    fn closed(&mut self, conn: ConnId) {
        let Some(c) = self.forget(conn) else {
            return;
        };
        match c.kind {
            Kind::Client => {}
            Kind::InLink => self.on_in_link_closed(conn),
            Kind::Out(purpose) => self.on_peer_failed(conn, purpose, "closed".into()),
        }
    }

    /// An outbound connection asked for with [`Output::Connect`] is open.
    pub fn handle_connected(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        self.journal_flush();
        match self.conns.get(&conn) {
            Some(_) => self.on_peer_connected(conn),
            // Given up on while it connected (a role change, a timeout): close it again.
            None => self.out.push_back(Output::Close { conn }),
        }
    }

    /// An outbound connection asked for with [`Output::Connect`] could not be opened.
    pub fn handle_connect_failed(&mut self, conn: ConnId, reason: &str, now: Now) {
        self.now = now;
        self.journal_flush();
        if let Some(c) = self.forget(conn) {
            if let Kind::Out(purpose) = c.kind {
                self.on_peer_failed(conn, purpose, reason.to_string());
            }
        }
    }

    /// The compute task of `mid` started at `start_us` and ended at `end_us` (wall clock, µs).
    pub fn handle_computed(&mut self, mid: u64, start_us: u64, end_us: u64, now: Now) {
        self.now = now;
        self.journal_flush();
        if now.mono < self.started + STARTUP_GRACE {
            // Subscribers that lost this node when it went down reconnect within their backoff;
            // a node that has just started holds its first results until then.
            self.graced.push((mid, start_us, end_us));
            self.timers.set(Timer::Grace, self.started + STARTUP_GRACE);
            return;
        }
        self.computed(mid, start_us, end_us);
    }

    /// The deadline from [`Broker::poll_timeout`] has come.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        for t in self.timers.expired(now.mono) {
            // Each timer's records go into the log before the next timer acts.
            self.journal_flush();
            match t {
                Timer::Watchdog => self.on_watchdog(),
                Timer::Grace => {
                    for (mid, cs, ce) in std::mem::take(&mut self.graced) {
                        self.computed(mid, cs, ce);
                    }
                }
                Timer::Link => self.connect_link(),
                Timer::Ping => self.on_ping_due(),
                Timer::Answer(conn) => self.on_answer_timeout(conn),
                Timer::HandOver(id) => self.retry_hand_over(id),
                Timer::Sync => self.ask_sync(),
                Timer::Retain => self.retain(),
                Timer::Lease => self.on_lease_timer(),
                Timer::TakeUp => self.on_take_up_timer(),
                Timer::Unpause(conn) => self.unpause(conn),
                Timer::AckWait => self.on_ack_wait(),
                Timer::Settle => self.on_settle_timer(),
            }
        }
    }

    /// The caller acted on the outputs that asked for [`Output::Sync`]: make the log durable
    /// now, then answer what waited for it.
    pub fn handle_sync(&mut self, now: Now) {
        self.now = now;
        self.journal_flush();
        self.sync_log();
    }

    /// Instead of [`Broker::handle_sync`], for a caller that can fsync on another thread while
    /// it goes on feeding events: the fsyncs to run (then call [`Broker::handle_synced`] with
    /// the job and its result), or `None` when there is nothing to run (the sync was done
    /// here, or one is in flight and another is asked for when it ends).
    pub fn begin_sync(&mut self, now: Now) -> Option<crate::log::SyncJob> {
        self.now = now;
        self.journal_flush();
        self.begin_sync_job()
    }

    /// The job from [`Broker::begin_sync`] ran ([`SyncJob::run`](crate::log::SyncJob::run))
    /// with `result`: answer what waited for it.
    pub fn handle_synced(
        &mut self,
        job: crate::log::SyncJob,
        result: Result<(), crate::log::LogError>,
        now: Now,
    ) {
        self.now = now;
        self.end_sync_job(job, result);
    }

    /// The node's log, to look at (tests compare the two nodes' logs).
    pub fn log(&self) -> &dyn Storage {
        self.log.as_ref()
    }

    /// The node's log, as a process that dies leaves it behind (tests restart a node on it).
    pub fn into_log(self) -> Box<dyn Storage> {
        self.log
    }

    /// Makes the log durable on the way out (a clean stop): best effort, the error is
    /// returned for the caller to report.
    pub fn shutdown(&mut self) -> Result<(), crate::log::LogError> {
        self.journal_flush();
        self.log.sync()
    }

    /// A new `mid`. The open batch of group records, which took the one before, goes down
    /// the link first: mids go down it in order (the backup's `STORED` is cumulative).
    fn take_mid(&mut self) -> u64 {
        self.journal_flush();
        let mid = self.next_mid;
        self.next_mid += 1;
        mid
    }

    /// The next thing the caller should do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.journal_flush();
        self.send_delivered_marks();
        if std::mem::take(&mut self.unflushed) {
            // What was appended is written before the `ACK`s and `STORED`s that wait for it go
            // out (they wait in reply queues until then): a crash of the process loses none of
            // it, and a write that fails refuses them instead.
            self.write_log();
        }
        self.out.pop_front()
    }

    /// When [`Broker::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.timers.next()
    }

    /// The role this node plays now.
    pub fn role(&self) -> Role {
        match self.role {
            RoleState::Primary(_) => Role::Primary,
            RoleState::Backup(_) => Role::Backup,
        }
    }

    /// The epoch this node is in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many messages this node has delivered to subscribers (counting each message once).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The node's state as `STATUS` reports it.
    pub fn status(&self) -> Frame {
        let (link, held, inflight) = self.link_held_inflight();
        Frame::Status {
            role: self.role(),
            epoch: self.epoch,
            link: link.into(),
            held,
            inflight,
        }
    }

    /// The `link`, `held` and `inflight` fields of `STATUS` (and of the metrics' snapshot).
    fn link_held_inflight(&self) -> (&'static str, u64, u64) {
        match &self.role {
            RoleState::Primary(p) => (p.link.word(), 0, p.in_flight()),
            RoleState::Backup(b) => (
                if b.detector.is_armed() {
                    "armed"
                } else {
                    "waiting"
                },
                self.held_count(),
                0,
            ),
        }
    }

    /// Dispatches a frame from a client (or from our primary, on its link into this backup).
    fn dispatch(&mut self, conn: ConnId, frame: Frame) {
        if !self.admit(conn, &frame) || !self.within_limits(conn, &frame) {
            return;
        }
        match frame {
            Frame::Auth(step) => self.on_auth(conn, step),
            Frame::Group(op) => self.on_group(conn, op),
            Frame::Publish { .. } | Frame::Pub { .. } => self.on_publish(conn, frame),
            Frame::Subscribe { topic } => self.subscribe(conn, topic, true),
            Frame::Sub { topic, from: None } => self.subscribe(conn, topic, false),
            Frame::Sub {
                topic,
                from: Some(from),
            } => self.subscribe_from(conn, topic, from),
            Frame::History { topic, n } => self.history(conn, topic, n),
            Frame::Ping => self.reply(conn, Frame::Pong),
            Frame::StatusQuery => self.reply(conn, self.status()),
            Frame::TimeQuery => {
                // One clock reading per step of the node: received and sent are the same.
                let t = self.now.wall_us;
                self.reply(
                    conn,
                    Frame::Time {
                        received_us: t,
                        sent_us: t,
                    },
                );
            }
            Frame::Hello {
                version,
                role,
                epoch,
                incarnation,
            } => self.on_hello(conn, &version, role, epoch, incarnation),
            Frame::Repl {
                mid,
                topic,
                id,
                sent_us,
                stamps,
                payload,
            } => {
                let entry = Entry {
                    offset: stamps.offset,
                    epoch: stamps.epoch,
                    id,
                    sent_us,
                    received_us: stamps.received_us,
                    payload,
                };
                self.on_repl(conn, mid, topic, entry);
            }
            Frame::Mark { topic, upto, next } => self.on_mark(conn, &topic, upto, next),
            Frame::Settle => self.on_settle(conn),
            Frame::Replicate { topic, payload } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.kind = Kind::InLink;
                }
                let stored = self.store_seed(topic, payload);
                self.reply(
                    conn,
                    if stored {
                        Frame::Ack { id: None }
                    } else {
                        durable::not_a_backup()
                    },
                );
            }
            Frame::Clr { topic, upto } => self.clear_upto(&topic, upto),
            Frame::Clear { topic, payload } => self.clear_seed(&topic, &payload),
            other @ (Frame::Msg { .. }
            | Frame::Bare(_)
            | Frame::Stored { .. }
            | Frame::Tail { .. }
            | Frame::TailEnd
            | Frame::Settled
            | Frame::Pong
            | Frame::Ack { .. }
            | Frame::Status { .. }
            | Frame::Time { .. }
            | Frame::Replayed { .. }
            | Frame::Err { .. }) => {
                let line = other.encode();
                let verb = line.split(['|', '\n']).next().unwrap_or("?");
                let reason = format!("unexpected {verb} from a client");
                self.reply(conn, Frame::Err { reason });
            }
        }
    }

    fn subscribe(&mut self, conn: ConnId, topic: String, legacy: bool) {
        info!(
            "subscriber {conn} on '{topic}'{}",
            if legacy { " (seed dialect)" } else { "" }
        );
        if let Some(c) = self.conns.get_mut(&conn) {
            c.topics.push(topic.clone());
        }
        self.topics.get_or_default(&topic).push(Sub {
            conn,
            legacy,
            replaying: false,
            from: 0,
        });
    }

    /// A publish from a client: served here as primary, or forwarded by a backup.
    fn on_publish(&mut self, conn: ConnId, frame: Frame) {
        if self.refuse_when_stopping(conn) {
            return;
        }
        if self.settle_holds(conn, &frame) {
            return;
        }
        match self.role {
            RoleState::Primary(_) => self.accept_publish(conn, frame),
            RoleState::Backup(_) => self.publish_at_backup(conn, frame),
        }
    }

    /// The primary's stall watchdog and replication timeout, every [`STALL`]/5.
    fn on_watchdog(&mut self) {
        let now = self.now.mono;
        self.timers.set(Timer::Watchdog, now + STALL / 5);
        if matches!(self.role, RoleState::Primary(_)) {
            self.stalled();
            self.check_repl_timeout();
            if let RoleState::Primary(p) = &mut self.role {
                p.last_tick = now;
            }
        }
    }

    fn new_conn_id(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }
}

/// What a node logs when it stops: role, epoch and what it still holds.
impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (held, inflight) = match &self.role {
            RoleState::Primary(p) => (0, p.in_flight()),
            RoleState::Backup(_) => (self.held_count() as usize, 0),
        };
        write!(
            f,
            "{} in epoch {}, delivered {}, holding {held}, in flight {inflight}",
            self.role().as_str(),
            self.epoch,
            self.delivered
        )
    }
}
