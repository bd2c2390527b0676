//! A clean stop (SIGTERM, Ctrl-C): the node refuses new publishes, finishes what it accepted,
//! then lets the caller stop it.
//!
//! A primary stopped without this drops whatever it had acknowledged and not yet delivered:
//! its backup delivers those after taking over, if it has them (twice, where the primary had
//! already delivered some), and a primary running degraded has no backup that has them. So a
//! stopping primary answers every new publish `ERR|stopping…`, which sends its publisher to the
//! other broker, goes on computing and delivering what is in flight (and telling the backup,
//! with `CLR`, that it was delivered, so that nothing is delivered twice after the takeover),
//! and reports [`Broker::drained`] once nothing is left. The caller waits for that, up to its
//! drain timeout, and names what [`Broker::unfinished`] lists if the time runs out.

use tracing::info;

use super::{Broker, ConnId, RoleState};
use crate::protocol::Frame;

/// What a publish to a stopping node is answered.
pub const STOPPING: &str = "stopping; resend to the other broker";

impl Broker {
    /// Starts a clean stop (see the module documentation). A backup has nothing of its own to
    /// finish: the messages it holds are the primary's to deliver.
    pub fn handle_stop(&mut self, now: super::Now) {
        self.now = now;
        if self.stopping {
            return;
        }
        self.stopping = true;
        match &self.role {
            RoleState::Primary(p) => info!(
                "stopping: refusing new publishes, finishing {} message(s) in flight",
                p.in_flight()
            ),
            RoleState::Backup(_) => info!("stopping"),
        }
    }

    /// True once a stopping node has nothing left to finish: nothing in flight, no `ACK`
    /// waiting, nothing being handed to the peer.
    pub fn drained(&self) -> bool {
        let primary_done = match &self.role {
            RoleState::Primary(p) => {
                p.in_flight() == 0
                    && p.acks.is_empty()
                    && p.unstored.is_empty()
                    && p.fenced.is_empty()
            }
            RoleState::Backup(_) => true,
        };
        primary_done && self.handovers.is_empty()
    }

    /// What a stop that ran out of time leaves unfinished: the identities of the messages in
    /// flight (the first 20), for the log.
    pub fn unfinished(&self) -> String {
        let RoleState::Primary(p) = &self.role else {
            return format!("{} hand-over(s) to the peer", self.handovers.len());
        };
        let ids: Vec<String> = p
            .inflight
            .values()
            .take(20)
            .map(|m| format!("{}:{}", m.id.publisher, m.id.seq))
            .collect();
        format!(
            "{} message(s) in flight ({}{}), {} ACK(s) waiting",
            p.in_flight(),
            ids.join(", "),
            if p.inflight.len() > ids.len() {
                ", …"
            } else {
                ""
            },
            p.acks.len()
        )
    }

    /// A publish reached a stopping node: refused, so that its publisher resends it to the
    /// other broker. Returns false when the node is not stopping.
    pub(super) fn refuse_when_stopping(&mut self, conn: ConnId) -> bool {
        if !self.stopping {
            return false;
        }
        let reason = STOPPING.to_string();
        self.counters.refused += 1;
        self.reply(conn, Frame::Err { reason });
        true
    }
}
