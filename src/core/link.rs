//! The primary's link to its backup: connect, say `HELLO`, replay what is in flight, stream
//! `REPL`/`CLR` and collect `STORED`; reconnect with a backoff when it fails.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::durable::CATCH_UP_CHUNK;
use super::failover::{next_epoch, yields_to};
use super::lease::LEASE_REFUSED;
use super::peer::Purpose;
use super::time::{Backoff, Time, Timer};
use super::{Broker, ConnId, Message};
use crate::protocol::{Frame, Role, PROTOCOL_VERSION};

/// How long the primary waits for its backup to connect and to answer `HELLO`.
pub(super) const LINK_TIMEOUT: Duration = Duration::from_secs(1);

/// The replication link to the backup.
#[derive(Debug)]
pub(super) struct Link {
    pub state: LinkState,
    has_peer: bool,
    /// The backup answered our `HELLO` with something else: a seed backup, driven with
    /// `REPLICATE`/`CLEAR`.
    legacy: bool,
    backoff: Backoff,
    ever_up: bool,
    said_degraded: bool,
    /// The backup's `TAIL`s while they come in.
    tails: Vec<super::durable::Tail>,
    /// When the current connect attempt started (a refusal grants the lease from then).
    connect_started: Time,
    /// The last connect was refused: no process listens on the backup's port, so none can take
    /// over. With `--lease`, only then does a primary acknowledge without the backup.
    pub backup_down: bool,
    /// How much longer than the replication timeout the backup has for its first `STORED`s on
    /// this link: the time to store what the link's catch-up sent ahead of them.
    pub catch_up_grace: Duration,
    /// While catching the backup up: each topic and the next offset of it to send.
    pub catching_up: Vec<(String, u64)>,
    /// Entries the catch-up sent so far.
    pub caught_up_sent: u64,
    /// The catch-up sent the other topics' `MARK`s ahead of the groups' journal.
    pub marked_early: bool,
}

impl Link {
    pub fn new(has_peer: bool) -> Link {
        Link {
            state: LinkState::Down,
            has_peer,
            legacy: false,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            ever_up: false,
            said_degraded: false,
            tails: Vec::new(),
            connect_started: Time::default(),
            backup_down: false,
            catch_up_grace: Duration::ZERO,
            catching_up: Vec::new(),
            caught_up_sent: 0,
            marked_early: false,
        }
    }

    /// The link as `STATUS` names it.
    pub fn word(&self) -> &'static str {
        match self.state {
            _ if !self.has_peer => "none",
            LinkState::Up { .. } => "up",
            _ => "down",
        }
    }

    /// The link's connection and whether it speaks the seed dialect, while it is up.
    pub fn up(&self) -> Option<(ConnId, bool)> {
        match self.state {
            LinkState::Up { conn, .. } => Some((conn, self.legacy)),
            _ => None,
        }
    }
}

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    /// Not connected (waiting for [`Timer::Link`], or no backup configured).
    Down,
    /// Connecting on this connection.
    Connecting(ConnId),
    /// Our `HELLO` waits for the backup's.
    Hello(ConnId),
    /// The backup answered `HELLO`; its `TAIL`s (where its log ends) come in.
    Tails(ConnId),
    /// Sending the backup what its log lacks, a chunk each time the last one was written out.
    CatchUp(ConnId),
    /// Streaming `REPL`/`CLR`.
    Up { conn: ConnId, since: Time },
}

impl Broker {
    /// Opens the link to the backup, if this node is primary, has a backup and is not linked.
    pub(super) fn connect_link(&mut self) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        if self
            .primary()
            .is_none_or(|p| p.link.state != LinkState::Down)
        {
            return;
        }
        let now = self.now.mono;
        let conn = self.open(Purpose::Link, peer, LINK_TIMEOUT);
        if let Some(p) = self.primary() {
            p.link.state = LinkState::Connecting(conn);
            p.link.connect_started = now;
        }
    }

    /// The link's connection opened: introduce ourselves (a seed backup gets no `HELLO`).
    pub(super) fn on_link_connected(&mut self, conn: ConnId) {
        match self.primary() {
            Some(p) => {
                // Every link proves the secret anew: a backup is a seed backup only for as
                // long as the one that answers says so.
                p.link.legacy = false;
                p.link.state = LinkState::Hello(conn);
                if self.offer_auth(conn) {
                    // `HELLO` follows once the backup has proved the secret (`auth.rs`).
                    self.timers
                        .set(Timer::Answer(conn), self.now.mono + LINK_TIMEOUT);
                } else {
                    self.say_hello(conn);
                }
            }
            None => {
                self.close(conn);
            }
        }
    }

    pub(super) fn say_hello(&mut self, conn: ConnId) {
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION.into(),
            role: Role::Primary,
            epoch: self.epoch,
            incarnation: self.cfg.incarnation,
        };
        self.send_frame(conn, &hello);
        self.timers
            .set(Timer::Answer(conn), self.now.mono + LINK_TIMEOUT);
    }

    /// A frame from the backup on the link.
    pub(super) fn on_link_frame(&mut self, conn: ConnId, frame: Frame) {
        let Some(p) = self.primary() else {
            self.close(conn);
            return;
        };
        match (p.link.state, frame) {
            // `TAIL`s of an earlier `HELLO` (we said hello again in a newer epoch).
            (LinkState::Hello(_), Frame::Tail { .. } | Frame::TailEnd) => {}
            (LinkState::Hello(_), f) => self.on_hello_answer(conn, f),
            (
                LinkState::Tails(_),
                Frame::Tail {
                    topic,
                    next,
                    epoch,
                    epochs,
                },
            ) => {
                p.link.tails.push(super::durable::Tail {
                    topic,
                    next,
                    epoch,
                    epochs,
                });
            }
            (LinkState::Tails(_), Frame::TailEnd) => {
                let tails = std::mem::take(&mut p.link.tails);
                p.link.state = LinkState::CatchUp(conn);
                self.timers.stop(Timer::Answer(conn));
                self.begin_catch_up(conn, tails);
            }
            (LinkState::CatchUp(_), other) => {
                let why = format!(
                    "backup answered {} during the catch-up",
                    other.encode().trim_end()
                );
                warn!("{why}: dropping the link");
                self.close(conn);
                self.link_retry(None);
            }
            (LinkState::Up { .. }, Frame::Stored { mid }) => self.stored(mid),
            (LinkState::Up { .. }, Frame::Group(crate::protocol::GroupOp::Merge { record })) => {
                self.merge_record(&record)
            }
            (LinkState::Up { .. }, Frame::Group(crate::protocol::GroupOp::Merged)) => {
                self.groups_hold(false)
            }
            (LinkState::Up { .. }, Frame::Ack { .. }) => {}
            (LinkState::Up { .. }, Frame::Settled) => {
                self.settle_end("the backup handed its tail over")
            }
            (LinkState::Up { .. }, Frame::Err { reason }) if reason.contains("SETTLE") => {
                // A backup of an earlier version: it hands over all the same, unannounced.
                self.settle_end("the backup does not say when it has settled")
            }
            (LinkState::Up { .. }, Frame::Status { .. }) => self.lease_answered(),
            (LinkState::Up { .. }, Frame::Err { reason }) if reason.starts_with(LEASE_REFUSED) => {
                // The backup is about to take over: this question grants nothing.
                p.lease_asks.pop_front();
            }
            (_, other) => {
                let why = format!("backup answered {}", other.encode().trim_end());
                self.link_lost(&why);
            }
        }
    }

    /// The backup's answer to our `HELLO`.
    fn on_hello_answer(&mut self, conn: ConnId, answer: Frame) {
        let peer = self.cfg.peer.clone().unwrap_or_default();
        let born_primary = self.cfg.born == Role::Primary;
        match answer {
            Frame::Hello {
                role: Role::Backup,
                epoch,
                ..
            } if epoch > self.epoch => {
                // A backup that has followed a newer reign than ours (we were restarted and
                // forgot it): ours is a new reign, numbered after it. Say hello again so the
                // backup learns it before it could ever take over in the same epoch.
                self.epoch = next_epoch(epoch, born_primary);
                self.save_epoch();
                info!(
                    "backup {peer} has seen epoch {epoch}: we now reign in epoch {}",
                    self.epoch
                );
                self.say_hello(conn);
            }
            Frame::Hello {
                role: Role::Backup, ..
            } => {
                if let Some(p) = self.primary() {
                    p.link.state = LinkState::Tails(conn);
                    p.link.tails.clear();
                }
            }
            Frame::Hello {
                role: Role::Primary,
                epoch,
                ..
            } => {
                if yields_to(self.epoch, born_primary, epoch) {
                    self.step_down(
                        epoch,
                        "the peer is primary in a newer (or equal, born-primary) epoch",
                    );
                    return;
                }
                error!(
                    "peer {peer} is itself primary (epoch {epoch}, ours {}): not replicating to it",
                    self.epoch
                );
                self.close(conn);
                self.link_retry(Some(Duration::from_secs(1)));
            }
            other => {
                // An authenticated backup that does not say HELLO back is broken, not a seed
                // backup (those never get this far: `unauthenticated_answer`).
                warn!(
                    "backup {peer} answered {} to HELLO: dropping the link",
                    other.encode().trim_end()
                );
                self.close(conn);
                self.link_retry(Some(Duration::from_secs(1)));
            }
        }
    }

    /// A seed backup (see `peer.rs`, `unauthenticated_answer`) is driven on `conn` with
    /// `REPLICATE`/`CLEAR`.
    pub(super) fn seed_link_up(&mut self, conn: ConnId) {
        if let Some(p) = self.primary() {
            p.link.legacy = true;
        }
        self.link_up(conn, 0);
    }

    /// The link is up: replay what is in flight, then stream. `caught_up`: log entries the
    /// catch-up sent, which the backup stores before it gets to anything sent from here on.
    pub(super) fn link_up(&mut self, conn: ConnId, caught_up: u64) {
        // Group records made before the link was up are the catch-up's, not in flight: they go
        // into the log now, so that `confirmed` below does not count them as sent.
        self.journal_flush();
        // What the backup may still have to store is at most what the socket buffers hold
        // once the catch-up's last chunk was written out (at most 16 chunks, on loopback).
        let chunks = caught_up.div_ceil(CATCH_UP_CHUNK as u64).min(16);
        let grace = self.cfg.repl_timeout * u32::try_from(chunks).unwrap_or(u32::MAX);
        self.timers.stop(Timer::Answer(conn));
        let now = self.now.mono;
        let next_mid = self.next_mid;
        let peer = self.cfg.peer.clone().unwrap_or_default();
        let Some(p) = self.primary() else {
            return;
        };
        p.link.backoff.reset();
        p.link.said_degraded = false;
        p.link.state = LinkState::Up { conn, since: now };
        p.link.backup_down = false;
        p.link.catch_up_grace = grace;
        // Questions asked on an earlier link are never answered.
        p.lease_asks.clear();
        // Everything below the oldest message in flight was delivered already.
        p.confirmed = p.inflight.first_key().map_or(next_mid - 1, |m| m - 1);
        info!(
            "replication link to backup {peer} up{}; {} message(s) in flight sent",
            if p.link.ever_up { " again" } else { "" },
            p.inflight.len()
        );
        p.link.ever_up = true;
        let inflight: Vec<Arc<Message>> = p.inflight.values().cloned().collect();
        for m in inflight {
            self.replicate(&m);
        }
        if self.cfg.lease.is_some() {
            // Ask for the lease at once rather than at the next tick.
            self.on_lease_timer();
        }
        self.settle_link_up(conn);
    }

    /// The link failed: it could not connect, or broke or was closed (`reason` says which).
    pub(super) fn on_link_failed(&mut self, conn: ConnId, reason: &str) {
        let peer = self.cfg.peer.clone().unwrap_or_default();
        let Some(p) = self.primary() else {
            return;
        };
        match p.link.state {
            LinkState::Up { conn: c, .. } if c == conn => {
                let why = if reason == "closed" {
                    "backup closed the link"
                } else {
                    reason
                };
                self.link_lost(why);
            }
            LinkState::Connecting(c) if c == conn => {
                p.link.backup_down = reason.to_ascii_lowercase().contains("refused");
                if p.link.backup_down {
                    // Nobody listens on the peer's port: no node there can take over.
                    let asked = p.link.connect_started;
                    self.lease_granted(asked);
                }
                let Some(p) = self.primary() else {
                    return;
                };
                if !p.link.said_degraded {
                    warn!("backup {peer} unreachable ({reason}): running degraded, retrying");
                    p.link.said_degraded = true;
                }
                self.link_retry(None);
            }
            // Connected, then closed or broke without a word: not there yet (or a proxy in
            // front of a node that is down). Try again later, quietly.
            LinkState::Hello(c) | LinkState::Tails(c) | LinkState::CatchUp(c) if c == conn => {
                self.link_retry(None)
            }
            _ => {}
        }
    }

    /// Our `HELLO` got no answer in time, or a chunk of the catch-up was not taken in time: a
    /// hung backup, not a seed one.
    pub(super) fn on_link_silent(&mut self, conn: ConnId) {
        let peer = self.cfg.peer.clone().unwrap_or_default();
        if let Some(p) = self.primary() {
            if !p.link.said_degraded {
                warn!("backup {peer} accepts connections but does not answer: running degraded");
                p.link.said_degraded = true;
            }
        }
        self.close(conn);
        self.link_retry(None);
    }

    /// The link was up and is gone: acknowledge what waited (degraded), and reconnect.
    pub(super) fn link_lost(&mut self, why: &str) {
        let now = self.now.mono;
        let Some(p) = self.primary() else {
            return;
        };
        let LinkState::Up { conn, since } = p.link.state else {
            return;
        };
        p.link.state = LinkState::Down;
        p.link.said_degraded = true;
        let keep_role = !p.suspect;
        let acks = std::mem::take(&mut p.acks);
        warn!("replication link to backup lost ({why}): running degraded");
        self.close(conn);
        self.release_acks(acks, keep_role);
        // No backup to wait for: what waited for its STORED goes now (degraded).
        self.release_stored();
        // A link that drops at once would otherwise be retried in a tight loop.
        let quick = now - since < Duration::from_secs(1);
        self.link_retry(if quick { None } else { Some(Duration::ZERO) });
    }

    /// Schedules the next connect: after `wait`, or after the backoff's next wait.
    fn link_retry(&mut self, wait: Option<Duration>) {
        // Without a backup to hear from, the groups serve what this node knows.
        self.groups_hold(false);
        let now = self.now.mono;
        let Some(p) = self.primary() else {
            return;
        };
        p.link.state = LinkState::Down;
        let d = wait.unwrap_or_else(|| p.link.backoff.next_wait());
        self.timers.set(Timer::Link, now + d);
    }
}
