//! Two broker cores wired together in memory, with a clock that jumps to the next deadline
//! (quinn-proto's `Pair::step`). No sockets, no tasks, no sleeps: a test of many simulated
//! seconds runs in milliseconds.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use edgepair::core::{Broker, Config, ConnId, Now, Output, Time};
use edgepair::protocol::{Frame, ProtocolError, Role, Stamps};

/// The node started as primary, and the one started as backup.
pub const P: usize = 0;
pub const B: usize = 1;
const NAMES: [&str; 2] = ["primary:7001", "backup:7002"];
/// Wall clock at the simulation's time zero (µs since the Unix epoch).
const WALL0: u64 = 1_735_689_600_000_000;

/// Something that happens to a node.
#[derive(Debug)]
enum Input {
    Frame(ConnId, Frame),
    Bad(ConnId, ProtocolError),
    Closed(ConnId),
    Connected(ConnId),
    /// The connect failed: refused (nobody listens) or timed out (nobody answers).
    ConnectFailed(ConnId, &'static str),
    Computed(u64),
}

/// The other end of a node's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Node(usize, ConnId),
    Client(usize),
}

/// One node: its core (None while crashed), and what waits for it while it is paused.
struct Node {
    core: Option<Broker>,
    paused: bool,
    held: VecDeque<Input>,
    born: Role,
    lives: u64,
    /// The log of a node that crashed, kept for its next start.
    disk: Option<Box<dyn edgepair::log::Storage>>,
}

/// A test's own connection to a node: what it received, line by line.
pub struct Client {
    pub node: usize,
    conn: ConnId,
    pub lines: Vec<String>,
    pub open: bool,
    /// The node asked not to be given more of this client's frames (`Output::Hold`), and
    /// every change of that, in order.
    pub holds: Vec<bool>,
    /// The client does not read: the node's `Output::Writable` for it waits (see
    /// [`Pair::unstall`]) instead of being answered at once, as a drained socket would.
    pub stalled: bool,
    /// A `Writable` the node asked for while the client was stalled.
    writable_due: bool,
}

/// Two nodes, their clients and the network between them.
pub struct Pair {
    pub now: Time,
    nodes: [Node; 2],
    wires: HashMap<(usize, ConnId), End>,
    pub clients: Vec<Client>,
    /// Inputs on their way, by arrival time, then in the order they were sent.
    net: BTreeMap<(Time, u64), (usize, Input)>,
    sent: u64,
    computes: Vec<(Time, usize, u64)>,
    /// Compute time of message `mid`.
    compute: fn(u64) -> Duration,
    /// Frames between the two nodes are lost and connects refused.
    pub partitioned: bool,
    pub cfg: Config,
}

/// The secret both nodes share.
pub const PAIR_SECRET: &[u8] = b"the pair's shared secret";

/// The defaults of the binaries, compute 100 ms.
pub fn config() -> Config {
    Config {
        born: Role::Primary,
        peer: None,
        compute_off: false,
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(300),
        repl_timeout: Duration::from_millis(250),
        forward_timeout: Duration::from_secs(1),
        incarnation: 0,
        fsync: edgepair::log::Fsync::default(),
        lease: None,
        peer_key: Some(edgepair::core::PeerKey::new(PAIR_SECRET)),
        allow_seed_replicate: false,
        seed_backup: false,
        nonce_seed: [0; 32],
        max_unacked: edgepair::core::MAX_UNACKED,
        max_subscriptions: edgepair::core::MAX_SUBSCRIPTIONS,
        max_topic_len: edgepair::core::MAX_TOPIC_LEN,
        journal_compact: edgepair::core::JOURNAL_COMPACT,
        require_client_cert: false,
    }
}

impl Pair {
    /// A primary and its backup, started at time zero, each message computing for `compute(mid)`.
    pub fn new(compute: fn(u64) -> Duration) -> Pair {
        Pair::with_config(compute, config())
    }

    /// Like [`Pair::new`], both nodes configured with `cfg` (role, peer and incarnation aside).
    pub fn with_config(compute: fn(u64) -> Duration, cfg: Config) -> Pair {
        Pair::with_logs(compute, cfg, [None, None])
    }

    /// Like [`Pair::with_config`], each node starting on the log given for it (`None`: the
    /// default in-memory log).
    #[allow(dead_code)]
    pub fn with_logs(
        compute: fn(u64) -> Duration,
        cfg: Config,
        logs: [Option<Box<dyn edgepair::log::Storage>>; 2],
    ) -> Pair {
        let [lp, lb] = logs;
        let node = |born, disk| Node {
            core: None,
            paused: false,
            held: VecDeque::new(),
            born,
            lives: 0,
            disk,
        };
        let mut p = Pair {
            now: Time(0),
            nodes: [node(Role::Primary, lp), node(Role::Backup, lb)],
            wires: HashMap::new(),
            clients: Vec::new(),
            net: BTreeMap::new(),
            sent: 0,
            computes: Vec::new(),
            compute,
            partitioned: false,
            cfg,
        };
        p.start(B);
        p.start(P);
        p
    }

    fn wall(&self) -> Now {
        Now {
            mono: self.now,
            wall_us: WALL0 + self.now.0,
        }
    }

    /// Starts (or restarts) node `n` in the role it was born with.
    pub fn start(&mut self, n: usize) {
        let mut cfg = self.cfg.clone();
        cfg.born = self.nodes[n].born;
        cfg.peer = Some(NAMES[1 - n].to_string());
        self.nodes[n].lives += 1;
        cfg.incarnation = WALL0 + self.now.0 + self.nodes[n].lives;
        // Each life of each node draws other nonces, as a real one does.
        cfg.nonce_seed[0] = n as u8;
        cfg.nonce_seed[1..9].copy_from_slice(&self.nodes[n].lives.to_le_bytes());
        let core = match self.nodes[n].disk.take() {
            Some(log) => Broker::with_log(cfg, log, self.wall()),
            None => Broker::new(cfg, self.wall()),
        };
        self.nodes[n].core = Some(core);
        self.nodes[n].paused = false;
        self.drain(n);
    }

    pub fn core(&self, n: usize) -> &Broker {
        self.nodes[n].core.as_ref().expect("node is up")
    }

    pub fn role(&self, n: usize) -> Role {
        self.core(n).role()
    }

    /// SIGKILL of a node whose log is on disk: the process is gone, what it wrote to its log
    /// stays (the page cache outlives a process), and its next [`Pair::start`] opens it again.
    pub fn crash_keeping_log(&mut self, n: usize) {
        let log = self.nodes[n].core.take().map(Broker::into_log);
        self.crash(n);
        self.nodes[n].disk = log;
    }

    /// SIGKILL: the core is gone and every connection of it closes.
    pub fn crash(&mut self, n: usize) {
        self.nodes[n].core = None;
        self.nodes[n].held.clear();
        self.computes.retain(|c| c.1 != n);
        let mine: Vec<(usize, ConnId)> = self.wires.keys().filter(|k| k.0 == n).copied().collect();
        for k in mine {
            if let Some(end) = self.wires.remove(&k) {
                self.hang_up(end);
            }
        }
    }

    /// SIGSTOP: the node does nothing; what reaches it waits.
    pub fn pause(&mut self, n: usize) {
        self.nodes[n].paused = true;
    }

    /// SIGCONT: its late timers fire, then it reads what waited.
    pub fn resume(&mut self, n: usize) {
        self.nodes[n].paused = false;
        let now = self.wall();
        if let Some(c) = self.nodes[n].core.as_mut() {
            c.handle_timeout(now);
        }
        self.drain(n);
        while let Some(i) = self.nodes[n].held.pop_front() {
            self.apply(n, i);
        }
    }

    /// A client connection to node `n`.
    pub fn client(&mut self, n: usize) -> usize {
        let now = self.wall();
        let conn = self.nodes[n]
            .core
            .as_mut()
            .expect("node is up")
            .handle_accepted(now);
        let id = self.clients.len();
        self.clients.push(Client {
            node: n,
            conn,
            lines: Vec::new(),
            open: true,
            holds: Vec::new(),
            stalled: false,
            writable_due: false,
        });
        self.wires.insert((n, conn), End::Client(id));
        id
    }

    /// The client sends a line.
    pub fn send(&mut self, client: usize, line: &str) {
        let (node, conn) = (self.clients[client].node, self.clients[client].conn);
        let input = match Frame::parse(line.as_bytes()) {
            Ok(frame) => Input::Frame(conn, frame),
            Err(e) => Input::Bad(conn, e),
        };
        self.put(self.now, node, input);
    }

    /// The client reads again: a `Writable` the node waits for is answered.
    pub fn unstall(&mut self, client: usize) {
        self.clients[client].stalled = false;
        if std::mem::take(&mut self.clients[client].writable_due) {
            let (n, conn) = (self.clients[client].node, self.clients[client].conn);
            let now = self.wall();
            if let Some(core) = self.nodes[n].core.as_mut() {
                core.handle_writable(conn, now);
            }
            self.drain(n);
        }
    }

    /// The client hangs up.
    pub fn hang_up_client(&mut self, client: usize) {
        let (node, conn) = (self.clients[client].node, self.clients[client].conn);
        if self.wires.remove(&(node, conn)).is_some() {
            self.clients[client].open = false;
            self.put(self.now, node, Input::Closed(conn));
        }
    }

    /// The `MSG`s a client received: (publisher, seq, stamps).
    pub fn msgs(&self, client: usize) -> Vec<(String, u64, Stamps)> {
        self.clients[client]
            .lines
            .iter()
            .filter_map(|l| match Frame::parse(l.as_bytes()) {
                Ok(Frame::Msg { id, stamps, .. }) => {
                    Some((id.publisher.into_owned(), id.seq, stamps))
                }
                _ => None,
            })
            .collect()
    }

    /// Lines a client received that start with `prefix`.
    pub fn count(&self, client: usize, prefix: &str) -> usize {
        self.clients[client]
            .lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Runs until `done` holds; panics if it does not within `limit` of simulated time.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Pair) -> bool) {
        let end = self.now + limit;
        while !done(self) {
            assert!(
                self.step(end),
                "not done after {limit:?} (now {:?})",
                self.now.as_duration()
            );
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.step(end) {}
        self.now = self.now.max(end);
    }

    /// Handles the next event, if one comes by `end`, jumping the clock to it.
    pub fn step(&mut self, end: Time) -> bool {
        if self
            .net
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= self.now)
        {
            if let Some((_, (n, input))) = self.net.pop_first() {
                self.deliver(n, input);
            }
            return true;
        }
        let timers = (0..2).filter_map(|n| {
            let node = &self.nodes[n];
            (!node.paused).then_some(node.core.as_ref()?.poll_timeout()?)
        });
        let next = timers
            .chain(self.net.first_key_value().map(|((at, _), _)| *at))
            .chain(self.computes.iter().map(|c| c.0))
            .min();
        let Some(next) = next.filter(|t| *t <= end) else {
            return false;
        };
        self.now = self.now.max(next);
        let now = self.wall();
        let due: Vec<_> = self
            .computes
            .iter()
            .filter(|c| c.0 <= self.now)
            .copied()
            .collect();
        self.computes.retain(|c| c.0 > self.now);
        for (_, n, mid) in due {
            self.deliver(n, Input::Computed(mid));
        }
        for n in 0..2 {
            let node = &mut self.nodes[n];
            let Some(core) = node.core.as_mut().filter(|_| !node.paused) else {
                continue;
            };
            if core.poll_timeout().is_some_and(|t| t <= self.now) {
                core.handle_timeout(now);
                self.drain(n);
            }
        }
        true
    }

    fn put(&mut self, at: Time, n: usize, input: Input) {
        self.sent += 1;
        self.net.insert((at, self.sent), (n, input));
    }

    fn deliver(&mut self, n: usize, input: Input) {
        if self.nodes[n].core.is_none() {
            return;
        }
        if self.nodes[n].paused {
            self.nodes[n].held.push_back(input);
            return;
        }
        self.apply(n, input);
    }

    fn apply(&mut self, n: usize, input: Input) {
        let now = self.wall();
        let compute = self.compute;
        let Some(core) = self.nodes[n].core.as_mut() else {
            return;
        };
        match input {
            Input::Frame(conn, f) => core.handle_frame(conn, f, now),
            Input::Bad(conn, e) => core.handle_bad_frame(conn, &e, now),
            Input::Closed(conn) => core.handle_closed(conn, now),
            Input::Connected(conn) => core.handle_connected(conn, now),
            Input::ConnectFailed(conn, why) => core.handle_connect_failed(conn, why, now),
            Input::Computed(mid) => {
                let start = now.wall_us - compute(mid).as_micros() as u64;
                core.handle_computed(mid, start, now.wall_us, now)
            }
        }
        self.drain(n);
    }

    /// Acts on everything node `n` asked for.
    fn drain(&mut self, n: usize) {
        loop {
            let Some(o) = self.nodes[n].core.as_mut().and_then(|c| c.poll_output()) else {
                return;
            };
            match o {
                Output::Send { conn, line, .. } => self.carry(n, conn, &line),
                Output::Deliver { conns, line } => {
                    for conn in conns {
                        self.carry(n, conn, &line);
                    }
                }
                Output::Close { conn } => {
                    if let Some(end) = self.wires.remove(&(n, conn)) {
                        self.hang_up(end);
                    }
                }
                Output::Connect {
                    conn,
                    addr,
                    timeout,
                } => self.connect(n, conn, &addr, timeout),
                Output::Compute { mid } => {
                    let at = self.now + (self.compute)(mid);
                    self.computes.push((at, n, mid));
                }
                Output::Hold { conn, held } => {
                    if let Some(End::Client(c)) = self.wires.get(&(n, conn)).copied() {
                        self.clients[c].holds.push(held);
                    }
                }
                Output::Writable { conn } => {
                    let client = match self.wires.get(&(n, conn)).copied() {
                        Some(End::Client(c)) => Some(c),
                        _ => None,
                    };
                    match client {
                        Some(c) if self.clients[c].stalled => self.clients[c].writable_due = true,
                        _ => {
                            let now = self.wall();
                            if let Some(core) = self.nodes[n].core.as_mut() {
                                core.handle_writable(conn, now);
                            }
                        }
                    }
                }
                Output::Sync => {
                    let now = self.wall();
                    if let Some(core) = self.nodes[n].core.as_mut() {
                        core.handle_sync(now);
                    }
                }
            }
        }
    }

    fn carry(&mut self, n: usize, conn: ConnId, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        match self.wires.get(&(n, conn)).copied() {
            Some(End::Client(c)) => self.clients[c].lines.extend(text.lines().map(String::from)),
            Some(End::Node(m, mc)) if !self.partitioned => {
                for l in text.lines() {
                    if let Ok(f) = Frame::parse(l.as_bytes()) {
                        self.put(self.now, m, Input::Frame(mc, f));
                    }
                }
            }
            _ => {}
        }
    }

    /// The other end of a closed connection learns of it.
    fn hang_up(&mut self, end: End) {
        match end {
            End::Client(c) => self.clients[c].open = false,
            End::Node(m, mc) => {
                self.wires.remove(&(m, mc));
                self.put(self.now, m, Input::Closed(mc));
            }
        }
    }

    fn connect(&mut self, n: usize, conn: ConnId, addr: &str, timeout: Duration) {
        let m = if addr == NAMES[0] { 0 } else { 1 };
        let now = self.wall();
        let target = &mut self.nodes[m];
        match target.core.as_mut() {
            Some(_) if target.paused || self.partitioned => {
                // The kernel would accept (or the packets are lost), but nobody answers: the
                // connect times out.
                self.put(
                    self.now + timeout,
                    n,
                    Input::ConnectFailed(conn, "timed out"),
                );
            }
            Some(core) if !self.partitioned => {
                let mc = core.handle_accepted(now);
                self.wires.insert((n, conn), End::Node(m, mc));
                self.wires.insert((m, mc), End::Node(n, conn));
                self.put(self.now, n, Input::Connected(conn));
            }
            _ => self.put(
                self.now,
                n,
                Input::ConnectFailed(conn, "connection refused"),
            ),
        }
    }
}
