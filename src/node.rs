//! A broker node: the primary and the backup are the same code in different roles.
//!
//! Keeping one type for both roles is what lets a backup *become* the primary in place: on
//! takeover it flips its role, replays what it holds through the very pipeline the primary used,
//! and goes on serving. The life of a message on the primary:
//!
//! 1. **accept** — a `PUB`/`PUBLISH` arrives; it gets a replication id (`mid`, arrival order) and,
//!    if it carries an identity already seen, is recognised as a resend and not processed again;
//! 2. **replicate** — `REPL` goes to the backup over one FIFO link; the publisher's `ACK` waits
//!    for the backup's `STORED` (or for the link to be declared dead: the node then runs
//!    *degraded*, says so in its log, and acknowledges anyway);
//! 3. **compute** — a simulated task of 50–150 ms runs in one of `workers` slots;
//! 4. **deliver** — results leave in per-publisher order (a reorder stage holds back a fast task
//!    that overtook a slow one) to every subscriber of the topic, then `CLR` tells the backup to
//!    forget the message.
//!
//! The backup stores `REPL`s, drops them on `CLR`, polls the primary with `PING`, and decides
//! when to take over with the sans-IO [`Detector`](crate::failover::Detector).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::now_us;
use crate::compute::Compute;
use crate::failover::{Detector, Evidence, Verdict};
use crate::net::{BoxStream, Listener, Net};
use crate::protocol::{Frame, FrameCodec, LenientCodec, MsgId, Role, Stamps, PROTOCOL_VERSION};

/// Most connections a node serves at once; more are told `ERR` and closed. With
/// [`MAX_FRAME`](crate::protocol::MAX_FRAME) this bounds the memory idle or half-sent frames can pin.
pub const MAX_CONNECTIONS: usize = 4096;

/// Frames queued for one connection before a subscriber counts as too slow and is disconnected
/// (it reconnects and sees a gap, rather than holding up everyone else's deliveries).
pub const CONNECTION_QUEUE: usize = 8192;

/// A gap this long between two watchdog ticks means the process was paused (SIGSTOP, a frozen
/// VM), long enough for the backup to have taken over: a primary then checks with its peer
/// before it delivers anything. Shorter than the backup's quickest takeover after a missed ping.
pub const STALL: Duration = Duration::from_millis(250);

/// A doubling wait between retries, capped, and cut short by shutdown.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// Back to the shortest wait, after a success.
    fn reset(&mut self) {
        self.next = self.first;
    }

    /// Waits, doubling the next wait; false if shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// How long a node that has just started holds its first results (with compute on): long
/// enough for subscribers that lost it while it was down to reconnect (their backoff is capped
/// at 250 ms), so that what it delivers first, often messages handed over from its previous
/// life, is not missed.
pub const STARTUP_GRACE: Duration = Duration::from_millis(300);

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
}

impl NodeConfig {
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
        }
    }
}

/// One accepted message as a node keeps it.
#[derive(Debug)]
struct Message {
    /// Replication id on the node that accepted it (0 for a seed `REPLICATE`).
    mid: u64,
    topic: String,
    id: MsgId,
    sent_us: u64,
    payload: String,
    /// When this node received it.
    received_us: u64,
}

/// A place in a publisher's delivery queue: filled when the message's compute task ends.
#[derive(Debug)]
struct Slot {
    mid: u64,
    done: Option<(Arc<Message>, Stamps)>,
}

/// Identities already accepted from one publisher, to recognise resends after a failover.
///
/// Everything at or below `floor` was seen; `above` holds seen sequence numbers past a hole.
/// Memory stays bounded by [`Seen::MAX_ABOVE`].
#[derive(Debug, Default)]
struct Seen {
    floor: u64,
    above: BTreeSet<u64>,
}

impl Seen {
    const MAX_ABOVE: usize = 4096;

    /// Records `seq`; false if it was seen before.
    fn insert(&mut self, seq: u64) -> bool {
        if seq == self.floor + 1 && self.above.is_empty() {
            // The common case: the next message of a publisher, no hole.
            self.floor = seq;
            return true;
        }
        if seq <= self.floor || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        while self.above.len() > Self::MAX_ABOVE {
            if let Some(first) = self.above.pop_first() {
                self.floor = first;
            }
        }
        true
    }
}

/// Records `seq` of `publisher` in `seen`; false if it was seen before. Allocates the
/// publisher's key only the first time it is met.
fn record_seen(seen: &mut HashMap<String, Seen>, publisher: &str, seq: u64) -> bool {
    match seen.get_mut(publisher) {
        Some(s) => s.insert(seq),
        None => seen.entry(publisher.to_string()).or_default().insert(seq),
    }
}

/// A subscriber registered on a topic.
#[derive(Debug)]
struct Sub {
    conn: u64,
    /// Seed subscribers get bare payload lines, identified ones `MSG` frames.
    legacy: bool,
    tx: mpsc::Sender<Out>,
    /// Cancelled to disconnect a subscriber that cannot keep up.
    kick: CancellationToken,
}

/// A publish whose `ACK` waits for the backup to store message `mid`.
#[derive(Debug)]
struct PendingAck {
    mid: u64,
    tx: oneshot::Sender<Frame>,
    ack: Frame,
    /// When to give up on the backup and run degraded.
    deadline: Instant,
}

/// What the replication link carries to the backup.
#[derive(Debug)]
enum LinkMsg {
    Repl(Arc<Message>),
    Clr(Arc<Message>),
}

/// State of the link to the backup, watched by publishes waiting for `STORED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkState {
    /// Changes every time a link comes up, so waiters notice a reconnect.
    generation: u64,
    up: bool,
}

#[derive(Debug, Default)]
struct State {
    role: Option<Role>,
    epoch: u64,
    /// Counts this node's takeovers: tasks that belong to one reign (the replication link)
    /// end when it does.
    reign: u64,
    next_mid: u64,
    next_conn: u64,
    topics: HashMap<String, Vec<Sub>>,
    /// Primary: the link to the backup, `None` while degraded.
    link: Option<mpsc::UnboundedSender<LinkMsg>>,
    /// Primary: accepted and not yet delivered; replayed to a backup that (re)connects.
    inflight: BTreeMap<u64, Arc<Message>>,
    /// Primary: delivery queues per publisher, the reorder stage.
    order: HashMap<String, VecDeque<Slot>>,
    /// Backup: replicated messages not yet cleared, by arrival order.
    held: BTreeMap<u64, Arc<Message>>,
    /// Backup: primary's `mid` → key in `held`.
    held_by_mid: HashMap<u64, u64>,
    next_held: u64,
    /// Identities accepted (primary) or stored (backup), per publisher.
    seen: HashMap<String, Seen>,
    /// Backup: whether the primary ever answered.
    armed: bool,
    /// Backup: the peer introduced itself with `HELLO`, so it answers `STATUS` (a seed primary
    /// only answers `PING`).
    peer_speaks_status: bool,
    /// Backup: incarnation of the primary whose messages we hold.
    following: u64,
    /// Backup: replication links from the primary, closed at takeover so that a primary that
    /// was merely paused learns at once, when it wakes, that it lost its role.
    link_conns: Vec<CancellationToken>,
    /// Primary: last tick of the stall watchdog (see [`Node::watchdog`]).
    last_tick: Option<Instant>,
    /// Primary: this process was paused; deliveries wait until the peer confirms our role.
    suspect: bool,
    /// Primary: results held back while `suspect`.
    fenced: Vec<(Arc<Message>, Stamps)>,
    /// Primary: publishes waiting for the backup's `STORED`, in `mid` order.
    acks: VecDeque<PendingAck>,
    /// Primary: every `mid` up to this one is stored by the backup or already delivered.
    confirmed: u64,
    delivered: u64,
    kicked: u64,
}

/// The node shared by all its tasks.
#[derive(Debug)]
struct Node {
    cfg: NodeConfig,
    /// Start time of this process (µs): sent in `HELLO`, and the first replication id, so that
    /// ids of two lives of one primary never collide at its backup.
    incarnation: u64,
    /// When this node started; see [`STARTUP_GRACE`].
    started: Instant,
    state: Mutex<State>,
    link_state: watch::Sender<LinkState>,
    /// Signalled when the primary's replication link into this backup closes.
    link_closed: Notify,
    /// Failure detector of a backup.
    detector: Mutex<Detector>,
    /// Serialises takeover decisions so that a burst of publishes probes once.
    decide: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

/// An item a connection's writer sends, in order.
#[derive(Debug)]
enum Out {
    /// A line ready to go (shared between subscribers of one message: cloning `Bytes` copies a
    /// pointer, not the payload).
    Line(bytes::Bytes),
    /// An answer still being worked out (an `ACK` waiting for `STORED`).
    Pending(oneshot::Receiver<Frame>),
}

impl Out {
    fn frame(f: Frame) -> Out {
        Out::Line(f.encode().into_bytes().into())
    }
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
    let role = cfg.role;
    let incarnation = now_us().max(1);
    let node = Arc::new(Node {
        incarnation,
        started: Instant::now(),
        detector: Mutex::new(Detector::new(cfg.ping_interval, Instant::now())),
        state: Mutex::new(State {
            role: Some(role),
            epoch: 1,
            next_mid: incarnation,
            ..State::default()
        }),
        link_state: watch::channel(LinkState {
            generation: 0,
            up: false,
        })
        .0,
        link_closed: Notify::new(),
        decide: tokio::sync::Mutex::new(()),
        shutdown: shutdown.clone(),
        cfg,
    });
    let addr = listener.local_addr()?;
    info!(
        "{} listening on {addr} (compute {} ms, peer {})",
        role.as_str(),
        node.cfg.compute.range(),
        node.cfg.peer.as_deref().unwrap_or("none")
    );
    match (role, node.cfg.peer.clone()) {
        (Role::Primary, Some(backup)) => {
            crate::net::spawn(node.clone().replication_link(backup, 0));
        }
        (Role::Primary, None) => warn!("no backup configured: running degraded"),
        (Role::Backup, Some(primary)) => {
            crate::net::spawn(node.clone().poll_primary(primary));
        }
        (Role::Backup, None) => warn!("backup without a primary address: will never take over"),
    }
    crate::net::spawn(node.clone().watchdog());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!("refusing {peer}: {MAX_CONNECTIONS} connections open");
                    crate::net::spawn(refuse(stream));
                    continue;
                };
                let node = node.clone();
                crate::net::spawn(async move {
                    node.connection(stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and try again rather than spin.
                warn!("accept failed: {e}; retrying");
                if !backoff.wait(&shutdown).await {
                    break;
                }
            }
        }
    }
    let st = node.lock();
    info!(
        "stopping: {} as {} in epoch {}, delivered {}, holding {}, in flight {}",
        addr,
        st.role.map(Role::as_str).unwrap_or("?"),
        st.epoch,
        st.delivered,
        st.held.len(),
        st.inflight.len()
    );
    Ok(())
}

async fn refuse(stream: BoxStream) {
    let mut w = FramedWrite::new(stream, FrameCodec::default());
    let _ = w
        .send(Frame::Err {
            reason: "too many connections".into(),
        })
        .await;
}

/// Writes a connection's outgoing items in order, coalescing whatever is already queued into one
/// write.
async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Out>) {
    // Allocated on first use: most connections of a big fan-out are idle subscribers, and a
    // buffer each would be most of their memory.
    let mut buf: Vec<u8> = Vec::new();
    while let Some(mut item) = rx.recv().await {
        loop {
            match item {
                Out::Line(l) => buf.extend_from_slice(&l),
                Out::Pending(mut p) => {
                    // Usually the answer is there already (a pipelining publisher's ACKs come
                    // in bursts): take it without flushing what is queued.
                    let answer = match p.try_recv() {
                        Ok(f) => Some(f),
                        Err(oneshot::error::TryRecvError::Closed) => None,
                        Err(oneshot::error::TryRecvError::Empty) => {
                            if !buf.is_empty() && w.write_all(&buf).await.is_err() {
                                return;
                            }
                            buf.clear();
                            p.await.ok()
                        }
                    };
                    if let Some(f) = answer {
                        f.encode_into_bytes(&mut buf);
                    }
                }
            }
            if buf.len() >= 64 * 1024 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = w.shutdown().await;
}

impl Node {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving what we can rather than cascade.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node is primary in the reign numbered `reign` (see [`State::reign`]).
    fn reigns(&self, reign: u64) -> bool {
        let st = self.lock();
        st.role == Some(Role::Primary) && st.reign == reign
    }

    fn role(&self) -> Role {
        self.lock().role.unwrap_or(Role::Backup)
    }

    /// Serves one connection: reads frames, answers in order, registers subscribers.
    async fn connection(self: Arc<Self>, stream: BoxStream, peer: String) {
        let (r, w) = tokio::io::split(stream);
        // A small first read buffer (it grows with the traffic): an idle subscriber then costs
        // a few KiB, not the codec's default 8 KiB.
        let mut reader = FramedRead::with_capacity(r, LenientCodec::default(), 512);
        let (tx, rx) = mpsc::channel::<Out>(CONNECTION_QUEUE);
        let writer = crate::net::spawn(write_loop(w, rx));
        let kick = self.shutdown.child_token();
        let conn = {
            let mut st = self.lock();
            st.next_conn += 1;
            st.next_conn
        };
        let mut is_link = false;
        debug!("connection {conn} from {peer}");
        loop {
            let next = tokio::select! {
                _ = kick.cancelled() => break,
                n = reader.next() => n,
            };
            match next {
                None => break,
                Some(Ok(Ok(frame))) => {
                    if !self.handle(frame, conn, &tx, &kick, &mut is_link).await {
                        break;
                    }
                }
                Some(Ok(Err(e))) | Some(Err(e)) => {
                    debug!("connection {conn} from {peer}: {e}");
                    let _ = tx
                        .send(Out::frame(Frame::Err {
                            reason: e.to_string(),
                        }))
                        .await;
                    if e.is_fatal() {
                        break;
                    }
                }
            }
        }
        if is_link {
            info!("replication link from the primary closed");
            self.link_closed.notify_one();
        }
        {
            let mut st = self.lock();
            for subs in st.topics.values_mut() {
                subs.retain(|s| s.conn != conn);
            }
        }
        drop(tx);
        let _ = writer.await;
        debug!("connection {conn} from {peer} closed");
    }

    /// Handles one frame; false closes the connection.
    async fn handle(
        self: &Arc<Self>,
        frame: Frame,
        conn: u64,
        tx: &mpsc::Sender<Out>,
        kick: &CancellationToken,
        is_link: &mut bool,
    ) -> bool {
        let reply = |f: Frame| tx.send(Out::frame(f));
        let sent = match frame {
            Frame::Publish { .. } | Frame::Pub { .. } => {
                let out = self.publish(frame).await;
                tx.send(out).await
            }
            Frame::Subscribe { ref topic } | Frame::Sub { ref topic } => {
                let legacy = matches!(frame, Frame::Subscribe { .. });
                info!(
                    "subscriber {conn} on '{topic}'{}",
                    if legacy { " (seed dialect)" } else { "" }
                );
                self.lock()
                    .topics
                    .entry(topic.clone())
                    .or_default()
                    .push(Sub {
                        conn,
                        legacy,
                        tx: tx.clone(),
                        kick: kick.clone(),
                    });
                Ok(())
            }
            Frame::Ping => reply(Frame::Pong).await,
            Frame::StatusQuery => reply(self.status()).await,
            Frame::Hello {
                version,
                role,
                epoch,
                incarnation,
            } => {
                info!("peer says hello: {version} {} epoch {epoch}", role.as_str());
                if role == Role::Primary {
                    let mine = self.lock().epoch;
                    let newer = epoch > mine || (epoch == mine && self.cfg.role == Role::Backup);
                    if self.role() == Role::Primary && newer {
                        self.step_down(
                            epoch,
                            "a primary of a newer (or equal, born-primary) epoch says hello",
                        );
                    }
                    if self.role() == Role::Backup {
                        *is_link = true;
                        // A primary that opens its replication link is alive: as good as a PONG.
                        self.detector
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .on_pong();
                        let mut st = self.lock();
                        if !st.armed {
                            info!("primary says hello: following it");
                        }
                        st.armed = true;
                        st.link_conns.push(kick.clone());
                        st.peer_speaks_status = true;
                        if st.following != incarnation {
                            // A new life of our primary: what we hold from its previous life it
                            // no longer knows about. Hand it over rather than keep it forever.
                            let orphans: Vec<Arc<Message>> =
                                std::mem::take(&mut st.held).into_values().collect();
                            st.held_by_mid.clear();
                            if st.following != 0 && !orphans.is_empty() {
                                warn!(
                                    "primary restarted: handing {} message(s) it replicated before to its new life",
                                    orphans.len()
                                );
                                if let Some(peer) = self.cfg.peer.clone() {
                                    crate::net::spawn(self.clone().hand_over(peer, orphans));
                                }
                            }
                            st.following = incarnation;
                        }
                        // Follow the primary's epoch, so that our own takeover, if it comes,
                        // starts a newer one than any it has seen (a restarted node starts at 1).
                        st.epoch = st.epoch.max(epoch);
                    }
                }
                let (my_role, my_epoch) = {
                    let st = self.lock();
                    (st.role.unwrap_or(Role::Backup), st.epoch)
                };
                reply(Frame::Hello {
                    version: PROTOCOL_VERSION.into(),
                    incarnation: self.incarnation,
                    role: my_role,
                    epoch: my_epoch,
                })
                .await
            }
            Frame::Repl {
                mid,
                topic,
                id,
                sent_us,
                payload,
            } => {
                let stored = self.store(Message {
                    mid,
                    topic,
                    id,
                    sent_us,
                    payload,
                    received_us: now_us(),
                });
                reply(if stored {
                    Frame::Stored { mid }
                } else {
                    Frame::Err {
                        reason: "not a backup".into(),
                    }
                })
                .await
            }
            Frame::Replicate { topic, payload } => {
                *is_link = true;
                let stored = self.store(Message {
                    mid: 0,
                    topic,
                    id: MsgId::anonymous(),
                    sent_us: 0,
                    payload,
                    received_us: now_us(),
                });
                reply(if stored {
                    Frame::Ack { id: None }
                } else {
                    Frame::Err {
                        reason: "not a backup".into(),
                    }
                })
                .await
            }
            Frame::Clr { mid } => {
                let mut st = self.lock();
                if let Some(key) = st.held_by_mid.remove(&mid) {
                    st.held.remove(&key);
                }
                Ok(())
            }
            Frame::Clear { topic, payload } => {
                let mut st = self.lock();
                let key = st
                    .held
                    .iter()
                    .find(|(_, m)| m.mid == 0 && m.topic == topic && m.payload == payload)
                    .map(|(k, _)| *k);
                if let Some(k) = key {
                    st.held.remove(&k);
                }
                Ok(())
            }
            other @ (Frame::Msg { .. }
            | Frame::Bare(_)
            | Frame::Stored { .. }
            | Frame::Pong
            | Frame::Ack { .. }
            | Frame::Status { .. }
            | Frame::Err { .. }) => {
                let verb = other.encode();
                let verb = verb.split(['|', '\n']).next().unwrap_or("?").to_string();
                reply(Frame::Err {
                    reason: format!("unexpected {verb} from a client"),
                })
                .await
            }
        };
        sent.is_ok()
    }

    fn status(&self) -> Frame {
        let st = self.lock();
        let role = st.role.unwrap_or(Role::Backup);
        let link = match role {
            Role::Primary if self.cfg.peer.is_none() => "none",
            Role::Primary if st.link.is_some() => "up",
            Role::Primary => "down",
            Role::Backup if st.armed => "armed",
            Role::Backup => "waiting",
        };
        Frame::Status {
            role,
            epoch: st.epoch,
            link: link.into(),
            held: st.held.len() as u64,
            inflight: st.inflight.len() as u64,
        }
    }

    /// A backup stores a replicated message; false if this node is not a backup any more.
    fn store(&self, msg: Message) -> bool {
        let mut st = self.lock();
        if st.role != Some(Role::Backup) {
            return false;
        }
        if msg.mid != 0 && st.held_by_mid.contains_key(&msg.mid) {
            return true;
        }
        if !msg.id.is_anonymous() {
            record_seen(&mut st.seen, &msg.id.publisher, msg.id.seq);
        }
        st.next_held += 1;
        let key = st.next_held;
        if msg.mid != 0 {
            st.held_by_mid.insert(msg.mid, key);
        }
        st.held.insert(key, Arc::new(msg));
        true
    }

    /// Handles a publish in either role and returns what to answer, possibly still pending.
    async fn publish(self: &Arc<Self>, frame: Frame) -> Out {
        if self.role() == Role::Backup {
            // `None`: we took over, so serve it as the primary.
            if let Some(out) = self.publish_at_backup(&frame).await {
                return out;
            }
        }
        let (topic, id, sent_us, payload, legacy) = match frame {
            Frame::Pub {
                topic,
                id,
                sent_us,
                payload,
            } => (topic, id, sent_us, payload, false),
            Frame::Publish { topic, payload } => {
                (topic, MsgId::anonymous(), now_us(), payload, true)
            }
            _ => {
                return Out::frame(Frame::Err {
                    reason: "not a publish".into(),
                })
            }
        };
        let ack = Frame::Ack {
            id: (!legacy).then(|| id.clone()),
        };
        self.accept(topic, id, sent_us, payload, ack)
    }

    /// A publish reached this backup. Either the primary is alive (forward the message to it and
    /// relay its answer) or it is not (take over: `None`, the caller serves it as primary).
    async fn publish_at_backup(self: &Arc<Self>, frame: &Frame) -> Option<Out> {
        let Some(primary) = self.cfg.peer.clone() else {
            return Some(Out::frame(Frame::Err {
                reason: "backup has no primary to forward to".into(),
            }));
        };
        for _attempt in 0..2 {
            {
                let _g = self.decide.lock().await;
                if self.role() == Role::Primary {
                    return None;
                }
                let verdict = self.detect(Evidence::Publish);
                if verdict == Verdict::Probe {
                    let alive = self.probe(&primary).await;
                    let v = self.detect_probe(alive);
                    if v == Verdict::TakeOver {
                        self.take_over("a publish arrived and the primary does not answer");
                        return None;
                    }
                }
            }
            match self.forward(&primary, frame).await {
                Ok(f) => return Some(Out::frame(f)),
                Err(e) => warn!("forwarding a publish to the primary failed: {e}"),
            }
        }
        Some(Out::frame(Frame::Err {
            reason: "primary alive but not accepting; retry".into(),
        }))
    }

    /// Sends one publish to the primary on a fresh connection and returns its answer.
    async fn forward(&self, primary: &str, frame: &Frame) -> anyhow::Result<Frame> {
        let t = self.cfg.forward_timeout;
        let stream = self.cfg.net.connect(primary, t).await?;
        let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::default());
        framed.send(frame.clone()).await?;
        match timeout(t, framed.next()).await {
            Ok(Some(Ok(f @ Frame::Ack { .. }))) => Ok(f),
            Ok(Some(Ok(other))) => anyhow::bail!("primary answered {}", other.encode().trim_end()),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) => anyhow::bail!("primary closed the connection"),
            Err(_) => anyhow::bail!("primary did not answer within {t:?}"),
        }
    }

    /// Accepts a publish on the primary and returns its answer: the `ACK` at once when running
    /// degraded (or for a resend of a message already safe with no link), otherwise an answer
    /// that comes when the backup has stored the message (see [`Node::stored`]).
    fn accept(
        self: &Arc<Self>,
        topic: String,
        id: MsgId,
        sent_us: u64,
        payload: String,
        ack: Frame,
    ) -> Out {
        let mut st = self.lock();
        let wait = if !id.is_anonymous() && !record_seen(&mut st.seen, &id.publisher, id.seq) {
            // A resend. Every earlier message went down the link before this point, so once
            // the last one is stored, so is this one.
            debug!("resend of {}:{} recognised", id.publisher, id.seq);
            let last = st.next_mid - 1;
            st.link
                .as_ref()
                .and_then(|_| (last > st.confirmed).then_some(last))
        } else {
            let mid = st.next_mid;
            st.next_mid += 1;
            let msg = Arc::new(Message {
                mid,
                topic,
                id,
                sent_us,
                payload,
                received_us: now_us(),
            });
            let wait = match &st.link {
                Some(link) => link.send(LinkMsg::Repl(msg.clone())).is_ok().then_some(mid),
                None => None,
            };
            self.enqueue(&mut st, msg);
            wait
        };
        match wait {
            None => Out::frame(ack),
            Some(mid) => {
                let (tx, rx) = oneshot::channel();
                st.acks.push_back(PendingAck {
                    mid,
                    tx,
                    ack,
                    deadline: Instant::now() + self.cfg.repl_timeout,
                });
                Out::Pending(rx)
            }
        }
    }

    /// The backup confirmed everything up to `mid`: answer the publishes waiting for it.
    fn stored(&self, mid: u64) {
        let mut st = self.lock();
        st.confirmed = st.confirmed.max(mid);
        while st.acks.front().is_some_and(|a| a.mid <= mid) {
            if let Some(a) = st.acks.pop_front() {
                let _ = a.tx.send(a.ack);
            }
        }
    }

    /// Answers every publish still waiting for `STORED`: with its `ACK` when this node is still
    /// primary (the link is gone, so it runs degraded), with `ERR` when it lost its role (the
    /// publisher then resends to the new primary).
    fn release_acks(st: &mut State) {
        let keep_role = st.role == Some(Role::Primary) && !st.suspect;
        for a in st.acks.drain(..) {
            let _ = a.tx.send(if keep_role {
                a.ack
            } else {
                Frame::Err {
                    reason: "not primary any more; resend to the other broker".into(),
                }
            });
        }
    }

    /// Puts an accepted message into the compute stage and its publisher's delivery queue.
    fn enqueue(self: &Arc<Self>, st: &mut State, msg: Arc<Message>) {
        let mid = msg.mid;
        if self.cfg.compute.range().is_off()
            && st.role == Some(Role::Primary)
            && !st.order.contains_key(&msg.id.publisher)
            && !self.stalled(st)
        {
            // Pure relay, nothing of this publisher waiting ahead of it, free to deliver: the
            // reorder stage and the in-flight map would hold it for no time at all.
            let now = now_us();
            let stamps = Stamps {
                epoch: st.epoch,
                received_us: msg.received_us,
                compute_start_us: now,
                compute_end_us: now,
            };
            self.release(st, msg, stamps);
            return;
        }
        st.inflight.insert(mid, msg.clone());
        st.order
            .entry(msg.id.publisher.clone())
            .or_default()
            .push_back(Slot { mid, done: None });
        if self.cfg.compute.range().is_off() {
            // Pure relay: no task to wait for, deliver in place (still through the reorder
            // stage, so a message never overtakes an earlier one still computing).
            let now = now_us();
            self.finish(st, msg, now, now);
            return;
        }
        let node = self.clone();
        crate::net::spawn(async move {
            let cs = node.cfg.compute.run().await;
            let ce = now_us();
            // Subscribers that lost this node when it went down reconnect within their backoff
            // (250 ms); a node that has just started holds its first results until then.
            tokio::time::sleep_until(node.started + STARTUP_GRACE).await;
            node.computed(msg, cs, ce);
        });
    }

    /// Marks the link of `generation` dead (if it is still the current one).
    fn link_down(&self, generation: u64) {
        let mut st = self.lock();
        let cur = *self.link_state.borrow();
        if cur.generation == generation && cur.up {
            st.link = None;
            self.link_state.send_modify(|s| s.up = false);
            Self::release_acks(&mut st);
        }
    }

    /// A compute task ended: deliver everything of this publisher that is now ready, in order.
    fn computed(self: &Arc<Self>, msg: Arc<Message>, cs: u64, ce: u64) {
        let mut st = self.lock();
        self.finish(&mut st, msg, cs, ce);
    }

    /// The body of [`Node::computed`], for callers that hold the state lock already.
    fn finish(self: &Arc<Self>, st: &mut State, msg: Arc<Message>, cs: u64, ce: u64) {
        let epoch = st.epoch;
        let key = msg.id.publisher.clone();
        let Some(queue) = st.order.get_mut(&key) else {
            return;
        };
        if let Some(slot) = queue.iter_mut().find(|s| s.mid == msg.mid) {
            let stamps = Stamps {
                epoch,
                received_us: msg.received_us,
                compute_start_us: cs,
                compute_end_us: ce,
            };
            slot.done = Some((msg, stamps));
        }
        let mut ready = Vec::new();
        while queue.front().is_some_and(|s| s.done.is_some()) {
            if let Some(Slot { done: Some(d), .. }) = queue.pop_front() {
                ready.push(d);
            }
        }
        if queue.is_empty() {
            st.order.remove(&key);
        }
        if st.role != Some(Role::Primary) {
            return;
        }
        if self.stalled(st) {
            st.fenced.extend(ready);
            return;
        }
        for (m, stamps) in ready {
            self.release(st, m, stamps);
        }
    }

    /// Delivers a finished message, forgets it as in flight and tells the backup to drop it.
    fn release(&self, st: &mut State, m: Arc<Message>, stamps: Stamps) {
        self.deliver(st, &m, stamps);
        st.inflight.remove(&m.mid);
        if let Some(link) = &st.link {
            let _ = link.send(LinkMsg::Clr(m));
        }
    }

    /// Sends one message to every subscriber of its topic. Runs under the state lock so that
    /// deliveries leave in the order they were decided; it never waits: a subscriber whose queue
    /// is full is disconnected instead.
    fn deliver(&self, st: &mut State, m: &Message, stamps: Stamps) {
        st.delivered += 1;
        let Some(subs) = st.topics.get_mut(&m.topic) else {
            return;
        };
        let mut msg_line: Option<bytes::Bytes> = None;
        let mut bare_line: Option<bytes::Bytes> = None;
        let mut kicked = 0;
        subs.retain(|s| {
            let line = if s.legacy {
                bare_line
                    .get_or_insert_with(|| {
                        let mut b = Vec::with_capacity(m.payload.len() + 1);
                        b.extend_from_slice(m.payload.as_bytes());
                        b.push(b'\n');
                        b.into()
                    })
                    .clone()
            } else {
                msg_line
                    .get_or_insert_with(|| {
                        crate::protocol::msg_line(&m.topic, &m.id, m.sent_us, &stamps, &m.payload)
                            .into()
                    })
                    .clone()
            };
            match s.tx.try_send(Out::Line(line)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!(
                        "subscriber {} is {CONNECTION_QUEUE} frames behind: disconnecting it",
                        s.conn
                    );
                    s.kick.cancel();
                    kicked += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        st.kicked += kicked;
    }

    /// Becomes the primary: new epoch, then replay every held message in its original order
    /// through the compute stage and on to subscribers.
    fn take_over(self: &Arc<Self>, why: &str) {
        let mut st = self.lock();
        if st.role == Some(Role::Primary) {
            return;
        }
        st.role = Some(Role::Primary);
        st.reign += 1;
        let reign = st.reign;
        st.epoch = crate::failover::next_epoch(st.epoch, self.cfg.role == Role::Primary);
        let held = std::mem::take(&mut st.held);
        st.held_by_mid.clear();
        warn!(
            "TAKEOVER: {why}; now primary in epoch {}, replaying {} held message(s) in order",
            st.epoch,
            held.len()
        );
        for (_, m) in held {
            let mid = st.next_mid;
            st.next_mid += 1;
            let msg = Arc::new(Message {
                mid,
                topic: m.topic.clone(),
                id: m.id.clone(),
                sent_us: m.sent_us,
                payload: m.payload.clone(),
                received_us: m.received_us,
            });
            self.enqueue(&mut st, msg);
        }
        for k in st.link_conns.drain(..) {
            k.cancel();
        }
        st.last_tick = Some(Instant::now());
        drop(st);
        match self.cfg.peer.clone() {
            Some(peer) => {
                warn!("running degraded until {peer} comes back as our backup");
                crate::net::spawn(self.clone().replication_link(peer, reign));
            }
            None => warn!("running degraded: no backup after takeover"),
        }
    }

    /// Gives up the primary role to a node of a newer epoch and becomes its backup. Messages
    /// accepted here and not yet delivered are handed to the new primary, which drops those it
    /// already holds (by identity): a message this node acknowledged while it ran degraded (in a
    /// partition, say) is thus not lost when it steps down.
    fn step_down(self: &Arc<Self>, epoch: u64, why: &str) {
        let mut st = self.lock();
        if st.role != Some(Role::Primary) {
            return;
        }
        warn!(
            "STEP DOWN: {why}; epoch {} → {epoch}, now backup; handing {} undelivered message(s) to the new primary",
            st.epoch,
            st.inflight.len()
        );
        st.role = Some(Role::Backup);
        st.epoch = st.epoch.max(epoch);
        Self::release_acks(&mut st);
        let undelivered: Vec<Arc<Message>> =
            std::mem::take(&mut st.inflight).into_values().collect();
        // Forget which identities we accepted: the undelivered ones are about to come back to us
        // as forwarded publishes if the peer steps down in turn, and must not be taken for
        // resends. As a backup we relearn identities from what the new primary replicates.
        st.seen.clear();
        st.order.clear();
        st.fenced.clear();
        st.suspect = false;
        st.link = None;
        st.armed = true;
        self.link_state.send_modify(|s| s.up = false);
        drop(st);
        {
            let mut d = self.detector.lock().unwrap_or_else(|p| p.into_inner());
            *d = Detector::new(self.cfg.ping_interval, Instant::now());
            d.on_pong();
        }
        if let Some(peer) = self.cfg.peer.clone() {
            if !undelivered.is_empty() {
                crate::net::spawn(self.clone().hand_over(peer.clone(), undelivered));
            }
            crate::net::spawn(self.clone().poll_primary(peer));
        }
    }

    /// Sends messages this node accepted as primary to the new primary, in their original order,
    /// retrying for a few seconds; each must be acknowledged.
    async fn hand_over(self: Arc<Self>, peer: String, msgs: Vec<Arc<Message>>) {
        for attempt in 1..=10 {
            match self.forward_all(&peer, &msgs).await {
                Ok(()) => {
                    info!(
                        "handed {} message(s) over to the new primary {peer}",
                        msgs.len()
                    );
                    return;
                }
                Err(e) => {
                    warn!("handing messages over to {peer} failed (attempt {attempt}): {e}");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    }
                }
            }
        }
        error!(
            "could not hand {} message(s) over to {peer}: they are lost unless their publishers resend them",
            msgs.len()
        );
    }

    async fn forward_all(&self, peer: &str, msgs: &[Arc<Message>]) -> anyhow::Result<()> {
        let t = self.cfg.forward_timeout;
        let stream = self.cfg.net.connect(peer, t).await?;
        let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::default());
        for m in msgs {
            let f = if m.id.is_anonymous() {
                Frame::Publish {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                }
            } else {
                Frame::Pub {
                    topic: m.topic.clone(),
                    id: m.id.clone(),
                    sent_us: m.sent_us,
                    payload: m.payload.clone(),
                }
            };
            framed.feed(f).await?;
        }
        framed.flush().await?;
        for _ in msgs {
            match timeout(t, framed.next()).await {
                Ok(Some(Ok(Frame::Ack { .. }))) => {}
                Ok(Some(Ok(other))) => anyhow::bail!("answered {}", other.encode().trim_end()),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => anyhow::bail!("connection closed"),
                Err(_) => anyhow::bail!("no answer within {t:?}"),
            }
        }
        Ok(())
    }

    /// True if this primary must not deliver now because the process was paused (SIGSTOP, a VM
    /// freeze): while it slept, the backup may have taken over. Starts a check with the peer.
    fn stalled(self: &Arc<Self>, st: &mut State) -> bool {
        if self.cfg.peer.is_none() {
            return false;
        }
        let now = Instant::now();
        if let Some(t) = st.last_tick {
            if now.duration_since(t) > STALL && !st.suspect {
                warn!(
                    "this process was paused for {:?}: holding deliveries until the peer confirms our role",
                    now.duration_since(t)
                );
                st.suspect = true;
                crate::net::spawn(self.clone().fence_check());
            }
        }
        st.suspect
    }

    /// Ticks so that a pause of the whole process shows up as a late tick (see [`STALL`]).
    async fn watchdog(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STALL / 5);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut st = self.lock();
            if st.role == Some(Role::Primary) {
                self.stalled(&mut st);
            }
            let now = Instant::now();
            st.last_tick = Some(now);
            if let Some(a) = st.acks.front().filter(|a| a.deadline <= now) {
                warn!(
                    "backup did not store message {} within {:?}: dropping the link, running degraded",
                    a.mid, self.cfg.repl_timeout
                );
                let generation = self.link_state.borrow().generation;
                drop(st);
                self.link_down(generation);
            }
        }
    }

    /// After a pause: ask the peer who is primary. A newer epoch there means step down; a backup
    /// (or no answer: running degraded) means we are still primary, so deliver what was held.
    async fn fence_check(self: Arc<Self>) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        let epoch = self.lock().epoch;
        let t = Duration::from_secs(1);
        let answer = async {
            let stream = self.cfg.net.connect(&peer, t).await.ok()?;
            let mut f = tokio_util::codec::Framed::new(stream, FrameCodec::default());
            f.send(Frame::Hello {
                version: PROTOCOL_VERSION.into(),
                incarnation: self.incarnation,
                role: Role::Primary,
                epoch,
            })
            .await
            .ok()?;
            match timeout(t, f.next()).await {
                Ok(Some(Ok(Frame::Hello { role, epoch, .. }))) => Some((role, epoch)),
                _ => None,
            }
        }
        .await;
        match answer {
            Some((Role::Primary, e)) if e > epoch => {
                self.step_down(e, "after a pause, the peer is primary in a newer epoch");
            }
            other => {
                let mut st = self.lock();
                if st.role != Some(Role::Primary) {
                    return;
                }
                info!(
                    "after the pause the peer {}: still primary, delivering {} held result(s)",
                    match other {
                        Some((r, _)) => format!("is {}", r.as_str()),
                        None => "does not answer".to_string(),
                    },
                    st.fenced.len()
                );
                st.suspect = false;
                let fenced = std::mem::take(&mut st.fenced);
                for (m, stamps) in fenced {
                    self.release(&mut st, m, stamps);
                }
            }
        }
    }

    fn detect(&self, e: Evidence) -> Verdict {
        self.detector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_evidence(e)
    }

    fn detect_probe(&self, alive: bool) -> Verdict {
        if alive {
            self.lock().armed = true;
        }
        self.detector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_probe(alive)
    }

    /// Opens a fresh connection to the primary and pings it: true if it answered in time.
    async fn probe(&self, primary: &str) -> bool {
        let t = self.cfg.ping_timeout;
        let attempt = async {
            let stream = self.cfg.net.connect(primary, t).await.ok()?;
            let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::default());
            self.ask(&mut framed).await.ok()
        };
        match timeout(t, attempt).await.ok().flatten() {
            None => false,
            Some(answer) => !self.nobody_serves(answer),
        }
    }

    /// One liveness question on an open connection: `STATUS` to a peer of ours (so we also learn
    /// whether it is primary), `PING` to a seed primary. `Ok(Some((role, epoch)))` or `Ok(None)`
    /// (alive, role unknown); `Err` says what failed.
    async fn ask(
        &self,
        c: &mut tokio_util::codec::Framed<BoxStream, FrameCodec>,
    ) -> Result<Option<(Role, u64)>, Evidence> {
        let t = self.cfg.ping_timeout;
        let status = self.lock().peer_speaks_status;
        let q = if status {
            Frame::StatusQuery
        } else {
            Frame::Ping
        };
        c.send(q).await.map_err(|_| Evidence::Closed)?;
        match timeout(t, c.next()).await {
            Ok(Some(Ok(Frame::Pong))) => Ok(None),
            Ok(Some(Ok(Frame::Status { role, epoch, .. }))) => Ok(Some((role, epoch))),
            Ok(_) => Err(Evidence::Closed),
            Err(_) => Err(Evidence::Timeout),
        }
    }

    /// True if the peer answered as a backup that this node outranks: nobody serves, so this
    /// node must take over.
    fn nobody_serves(&self, answer: Option<(Role, u64)>) -> bool {
        match answer {
            Some((Role::Backup, peer_epoch)) => {
                let mine = self.lock().epoch;
                let outranks =
                    crate::failover::outranks(mine, self.cfg.role == Role::Primary, peer_epoch);
                if outranks {
                    warn!(
                        "the peer is a backup too (epoch {peer_epoch}, ours {mine}): nobody serves"
                    );
                }
                outranks
            }
            _ => false,
        }
    }

    /// The backup's polling loop: one `PING` per interval on a kept-open connection, plus an
    /// immediate probe when the replication link closes.
    async fn poll_primary(self: Arc<Self>, primary: String) {
        let t = self.cfg.ping_timeout;
        let mut conn: Option<tokio_util::codec::Framed<BoxStream, FrameCodec>> = None;
        let mut logged_waiting = false;
        loop {
            let next = self
                .detector
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_ping();
            let Some(next) = next else { return };
            let evidence = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.link_closed.notified() => Some(Evidence::Closed),
                _ = tokio::time::sleep_until(next) => {
                    self.detector.lock().unwrap_or_else(|p| p.into_inner())
                        .on_ping_sent(Instant::now());
                    let ping = async {
                        if conn.is_none() {
                            let s = self.cfg.net.connect(&primary, t).await.map_err(|_| Evidence::Closed)?;
                            conn = Some(tokio_util::codec::Framed::new(s, FrameCodec::default()));
                        }
                        let Some(c) = conn.as_mut() else { return Err(Evidence::Closed) };
                        let answer = self.ask(c).await?;
                        if self.nobody_serves(answer) {
                            return Err(Evidence::NoPrimary);
                        }
                        Ok(())
                    };
                    match ping.await {
                        Ok(()) => {
                            let first = !self.lock().armed;
                            self.lock().armed = true;
                            self.detector.lock().unwrap_or_else(|p| p.into_inner()).on_pong();
                            if first {
                                info!("primary {primary} answers: following it");
                            }
                            logged_waiting = false;
                            None
                        }
                        Err(e) => {
                            conn = None;
                            Some(e)
                        }
                    }
                }
            };
            let Some(e) = evidence else { continue };
            let _g = self.decide.lock().await;
            if self.role() == Role::Primary {
                return;
            }
            let mut verdict = self.detect(e);
            if verdict == Verdict::Probe {
                info!("primary link closed or refused: probing {primary}");
                let alive = self.probe(&primary).await;
                verdict = self.detect_probe(alive);
            }
            match verdict {
                Verdict::TakeOver => {
                    let why = match e {
                        Evidence::Timeout => format!("primary did not answer PING within {t:?}"),
                        Evidence::NoPrimary => {
                            "the peer is a backup too and we outrank it".to_string()
                        }
                        _ => "primary connection closed and probe failed".to_string(),
                    };
                    self.take_over(&why);
                    return;
                }
                Verdict::Wait if !self.lock().armed && !logged_waiting => {
                    info!("waiting for primary {primary} to come up");
                    logged_waiting = true;
                }
                _ => {}
            }
        }
    }

    /// The primary's link to its backup: connect, introduce ourselves, replay what is in flight,
    /// then stream `REPL`/`CLR` and collect `STORED`, reconnecting forever.
    ///
    /// One loop per reign: a loop left over from an earlier reign (it was waiting to reconnect
    /// when the node stepped down, then the node took over again) ends instead of fighting the
    /// new one for the link.
    async fn replication_link(self: Arc<Self>, backup: String, reign: u64) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut legacy = false;
        let mut ever_up = false;
        let mut said_degraded = false;
        loop {
            if self.shutdown.is_cancelled() || !self.reigns(reign) {
                return;
            }
            let stream = match self.cfg.net.connect(&backup, Duration::from_secs(1)).await {
                Ok(s) => s,
                Err(e) => {
                    if !said_degraded {
                        warn!("backup {backup} unreachable ({e}): running degraded, retrying");
                        said_degraded = true;
                    }
                    if !backoff.wait(&self.shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::default());
            if !legacy {
                let epoch = {
                    // Read with the role: a loop whose reign ended while it connected must not
                    // announce itself as primary.
                    let st = self.lock();
                    if st.role != Some(Role::Primary) || st.reign != reign {
                        return;
                    }
                    st.epoch
                };
                let hello = Frame::Hello {
                    version: PROTOCOL_VERSION.into(),
                    incarnation: self.incarnation,
                    role: Role::Primary,
                    epoch,
                };
                let answer = match framed.send(hello).await {
                    Ok(()) => timeout(Duration::from_secs(1), framed.next()).await,
                    Err(_) => continue,
                };
                match answer {
                    Ok(Some(Ok(Frame::Hello {
                        role: Role::Backup,
                        epoch,
                        ..
                    }))) => {
                        // A backup that has followed a newer reign than ours (we were restarted
                        // and forgot it): ours is a new reign, numbered after it.
                        let mut st = self.lock();
                        if epoch > st.epoch {
                            let ours =
                                crate::failover::next_epoch(epoch, self.cfg.role == Role::Primary);
                            info!(
                                "backup {backup} has seen epoch {epoch}: we now reign in epoch {ours}"
                            );
                            st.epoch = ours;
                            // Say hello again so the backup learns the new epoch before it
                            // could ever take over (and start the same epoch itself).
                            continue;
                        }
                    }
                    Ok(Some(Ok(Frame::Hello {
                        role: Role::Primary,
                        epoch,
                        ..
                    }))) => {
                        let mine = self.lock().epoch;
                        if epoch > mine || (epoch == mine && self.cfg.role == Role::Backup) {
                            self.step_down(
                                epoch,
                                "the peer is primary in a newer (or equal, born-primary) epoch",
                            );
                            return;
                        }
                        error!("peer {backup} is itself primary (epoch {epoch}, ours {mine}): not replicating to it");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                    Err(_) => {
                        // No answer at all: a hung backup, not a seed one. Stay degraded and
                        // try again rather than mistake it for a seed backup.
                        if !said_degraded {
                            warn!("backup {backup} accepts connections but does not answer: running degraded");
                            said_degraded = true;
                        }
                        if !backoff.wait(&self.shutdown).await {
                            return;
                        }
                        continue;
                    }
                    Ok(Some(Ok(other))) => {
                        // It answered, but not with HELLO: a seed backup.
                        warn!(
                            "backup {backup} answered {} to HELLO: using seed REPLICATE/CLEAR",
                            other.encode().trim_end()
                        );
                        legacy = true;
                        continue;
                    }
                    Ok(_) => {
                        // Closed or broke without a word: not there yet (or a proxy in front of
                        // a node that is down). Try again later.
                        if !backoff.wait(&self.shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            backoff.reset();
            said_degraded = false;
            let (tx, rx) = mpsc::unbounded_channel();
            let generation;
            {
                let mut st = self.lock();
                if st.role != Some(Role::Primary) || st.reign != reign {
                    return;
                }
                for m in st.inflight.values() {
                    let _ = tx.send(LinkMsg::Repl(m.clone()));
                }
                info!(
                    "replication link to backup {backup} up{}; {} message(s) in flight sent",
                    if ever_up { " again" } else { "" },
                    st.inflight.len()
                );
                st.link = Some(tx);
                // Everything below the oldest message in flight was delivered already.
                st.confirmed = st.inflight.keys().next().map_or(st.next_mid - 1, |m| m - 1);
                let mut g = 0;
                self.link_state.send_modify(|s| {
                    s.generation += 1;
                    s.up = true;
                    g = s.generation;
                });
                generation = g;
            }
            ever_up = true;
            let up_since = Instant::now();
            let err = self.run_link(framed, rx, legacy).await;
            self.link_down(generation);
            if !self.shutdown.is_cancelled() {
                warn!("replication link to backup lost ({err}): running degraded");
                said_degraded = true;
            }
            if up_since.elapsed() < Duration::from_secs(1) {
                // A link that drops at once would otherwise be retried in a tight loop.
                if !backoff.wait(&self.shutdown).await {
                    return;
                }
            }
        }
    }

    /// Drives one established replication link until it fails.
    async fn run_link(
        &self,
        framed: tokio_util::codec::Framed<BoxStream, FrameCodec>,
        mut rx: mpsc::UnboundedReceiver<LinkMsg>,
        legacy: bool,
    ) -> String {
        let (mut sink, mut stream) = framed.split();
        let write = async {
            while let Some(m) = rx.recv().await {
                let (f, mid) = match (&m, legacy) {
                    (LinkMsg::Repl(m), false) => (
                        Frame::Repl {
                            mid: m.mid,
                            topic: m.topic.clone(),
                            id: m.id.clone(),
                            sent_us: m.sent_us,
                            payload: m.payload.clone(),
                        },
                        None,
                    ),
                    (LinkMsg::Repl(m), true) => (
                        Frame::Replicate {
                            topic: m.topic.clone(),
                            payload: m.payload.clone(),
                        },
                        Some(m.mid),
                    ),
                    (LinkMsg::Clr(m), false) => (Frame::Clr { mid: m.mid }, None),
                    (LinkMsg::Clr(m), true) => (
                        Frame::Clear {
                            topic: m.topic.clone(),
                            payload: m.payload.clone(),
                        },
                        None,
                    ),
                };
                if let Err(e) = sink.feed(f).await {
                    return format!("write: {e}");
                }
                if rx.is_empty() {
                    if let Err(e) = sink.flush().await {
                        return format!("write: {e}");
                    }
                }
                // A seed backup never confirms; a written frame is the best we can know.
                if let Some(mid) = mid {
                    self.stored(mid);
                }
            }
            "link closed locally".to_string()
        };
        let read = async {
            while let Some(f) = stream.next().await {
                match f {
                    Ok(Frame::Stored { mid }) => self.stored(mid),
                    Ok(Frame::Ack { .. }) => {}
                    Ok(other) => {
                        return format!("backup answered {}", other.encode().trim_end());
                    }
                    Err(e) => return format!("read: {e}"),
                }
            }
            "backup closed the link".to_string()
        };
        tokio::select! {
            e = write => e,
            e = read => e,
            _ = self.shutdown.cancelled() => "shutdown".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_knows_every_sequence_number_it_recorded_in_any_order() {
        let mut s = Seen::default();
        for seq in 1..=100 {
            assert!(s.insert(seq), "{seq} is new");
        }
        assert_eq!(
            (s.floor, s.above.len()),
            (100, 0),
            "in order: no set at all"
        );
        assert!(!s.insert(57), "a resend is recognised");
        assert!(s.insert(103));
        assert!(s.insert(102));
        assert!(!s.insert(103));
        assert!(s.insert(101));
        assert_eq!((s.floor, s.above.len()), (103, 0), "the hole closed");
        for seq in 1..=103 {
            assert!(!s.insert(seq));
        }
    }

    #[test]
    fn seen_allocates_a_publisher_key_once() {
        let mut seen = HashMap::new();
        assert!(record_seen(&mut seen, "p", 1));
        assert!(record_seen(&mut seen, "p", 2));
        assert!(!record_seen(&mut seen, "p", 1));
        assert!(record_seen(&mut seen, "q", 1));
        assert_eq!(seen.len(), 2);
    }
}
