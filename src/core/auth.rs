//! Who may act as a peer: the handshake that turns a connection into an authenticated peer
//! link, and the frames that need one.
//!
//! Both nodes of a pair hold the same secret. The node that opens a peer link (a primary's
//! replication link, a paused primary's question) offers a fresh nonce `a`; the node it reached
//! answers with its own fresh nonce `b` and `HMAC(secret, "acceptor" a b)`; the opener checks
//! that and answers `HMAC(secret, "opener" a b)`, which the other checks. So each side proves
//! it knows the secret to the other without sending it, and neither proof can be used again:
//! the other side's nonce is new on every connection (a recorded handshake replayed gets a
//! different challenge), and the labels keep one side's proof from passing as the other's
//! (a reflection). The secret itself never crosses the wire.
//!
//! Frames that change roles, epochs or what a backup holds (`HELLO`, `REPL`, `MARK`, `CLR`, and
//! the seed's `REPLICATE`/`CLEAR`) are handled only on such a link; from anyone else they get
//! `ERR|…` and change nothing. Publishes, subscriptions, `PING` and `STATUS` stay open to every
//! client, as before. Only a node started with `--allow-seed-replicate` takes the seed's
//! `REPLICATE`/`CLEAR` from an unauthenticated connection (a seed primary cannot authenticate).

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use tracing::{error, warn};

use super::conn::Kind;
use super::{Broker, ConnId};
use crate::protocol::{AuthStep, Frame};

/// Bytes of each nonce.
pub const NONCE_LEN: usize = 32;

/// Nonces this node offered lately, kept to spot them coming back (a reflection).
const RECENT_OFFERS: usize = 16;

/// What `ERR` answers to a peer frame from a connection that did not authenticate start with.
pub const NOT_A_PEER: &str = "not an authenticated peer";

/// What `ERR` answers to a failed handshake start with; a primary that reads it from its
/// backup knows the backup speaks our protocol (it is not a seed backup) and refused it.
pub const AUTH_FAILED: &str = "authentication failed";

/// The secret the two nodes of a pair share. Its `Debug` does not show it.
#[derive(Clone)]
pub struct PeerKey(Arc<[u8]>);

impl PeerKey {
    /// A key made of `bytes` (the secret file's contents, or the environment variable's).
    pub fn new(bytes: &[u8]) -> PeerKey {
        PeerKey(bytes.into())
    }

    /// The proof of the side labelled `label` over both nonces.
    fn mac(&self, label: &[u8], opener: &[u8], acceptor: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(b"edgepair/1 ");
        m.update(label);
        // Nonces are fixed-length on our side, but a length prefix keeps `a|b` from reading
        // as another split of the same bytes whatever the peer sends.
        m.update(&(opener.len() as u32).to_be_bytes());
        m.update(opener);
        m.update(acceptor);
        m
    }

    fn prove(&self, label: &[u8], opener: &[u8], acceptor: &[u8]) -> Vec<u8> {
        self.mac(label, opener, acceptor)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `proof` is the side `label`'s proof; compared in constant time.
    fn check(&self, label: &[u8], opener: &[u8], acceptor: &[u8], proof: &[u8]) -> bool {
        self.mac(label, opener, acceptor)
            .verify_slice(proof)
            .is_ok()
    }
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

const OPENER: &[u8] = b"opener";
const ACCEPTOR: &[u8] = b"acceptor";

/// Where a connection's handshake is.
#[derive(Debug, Default)]
pub(super) enum Auth {
    /// Nothing said: a client.
    #[default]
    None,
    /// We opened it and offered our nonce.
    Offered { ours: Vec<u8> },
    /// It offered `theirs`, we answered with `ours` and our proof.
    Challenged { theirs: Vec<u8>, ours: Vec<u8> },
    /// The other side proved it holds the secret.
    Peer,
}

impl Broker {
    /// Whether `conn` is an authenticated peer link.
    pub(super) fn is_peer(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| matches!(c.auth, Auth::Peer))
    }

    fn nonce(&mut self) -> Vec<u8> {
        let mut n = vec![0; NONCE_LEN];
        self.rng.fill_bytes(&mut n);
        n
    }

    /// An outbound connection that will carry peer frames opened: offer our nonce. Returns
    /// false when this node has no secret (then it goes on unauthenticated, and a peer of
    /// ours refuses what it sends, saying why).
    pub(super) fn offer_auth(&mut self, conn: ConnId) -> bool {
        if self.cfg.peer_key.is_none() {
            return false;
        }
        let ours = self.nonce();
        if self.offered.len() >= RECENT_OFFERS {
            self.offered.pop_front();
        }
        self.offered.push_back(ours.clone());
        let frame = Frame::Auth(AuthStep::Hello {
            nonce: ours.clone(),
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.auth = Auth::Offered { ours };
        }
        self.send_frame(conn, &frame);
        true
    }

    /// Whether `conn`, opened by us, is still waiting for the other side's challenge.
    pub(super) fn awaits_challenge(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| matches!(c.auth, Auth::Offered { .. }))
    }

    /// The answer to our offer on `conn`. `Ok(true)`: the other side proved the secret and we
    /// sent ours; the link is a peer link. `Ok(false)`: it answered something else than
    /// `AUTH` (a seed broker, which knows no handshake). `Err`: it failed or refused.
    pub(super) fn on_challenge(&mut self, conn: ConnId, answer: &Frame) -> Result<bool, String> {
        let Some(key) = self.cfg.peer_key.clone() else {
            return Err("no secret".into());
        };
        let ours = match self
            .conns
            .get_mut(&conn)
            .map(|c| std::mem::take(&mut c.auth))
        {
            Some(Auth::Offered { ours }) => ours,
            _ => return Err("no handshake in progress".into()),
        };
        match answer {
            Frame::Auth(AuthStep::Challenge { nonce, .. }) if self.is_own_challenge(nonce) => Err(
                format!("{AUTH_FAILED}: the peer's challenge is one this node made (a reflection)"),
            ),
            Frame::Auth(AuthStep::Challenge { nonce, proof }) => {
                if !key.check(ACCEPTOR, &ours, nonce, proof) {
                    return Err(format!(
                        "{AUTH_FAILED}: the peer's proof does not match our secret \
                         (do both nodes use the same secret file?)"
                    ));
                }
                let mine = key.prove(OPENER, &ours, nonce);
                self.send_frame(conn, &Frame::Auth(AuthStep::Proof { proof: mine }));
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.auth = Auth::Peer;
                }
                Ok(true)
            }
            Frame::Err { reason }
                if reason.starts_with(AUTH_FAILED) || reason.starts_with(NOT_A_PEER) =>
            {
                Err(format!("the peer refused us: {reason}"))
            }
            _ => Ok(false),
        }
    }

    /// Whether `nonce` is one this node offered as the opener of a peer link: sent back to it
    /// as someone else's, its own answer would prove the secret for them.
    fn is_own_offer(&self, nonce: &[u8]) -> bool {
        self.offered.iter().any(|n| n.as_slice() == nonce)
    }

    /// Whether `nonce` is one this node sent in a challenge of its own.
    fn is_own_challenge(&self, nonce: &[u8]) -> bool {
        self.conns
            .values()
            .any(|c| matches!(&c.auth, Auth::Challenged { ours, .. } if ours.as_slice() == nonce))
    }

    /// An `AUTH` frame from a client connection (the other side opened it).
    pub(super) fn on_auth(&mut self, conn: ConnId, step: AuthStep) {
        let Some(key) = self.cfg.peer_key.clone() else {
            self.refuse_auth(conn, "this node has no peer secret");
            return;
        };
        let state = self
            .conns
            .get_mut(&conn)
            .map(|c| std::mem::take(&mut c.auth));
        match (state, step) {
            (Some(Auth::None), AuthStep::Hello { .. })
                if self.cfg.require_client_cert
                    && !self.conns.get(&conn).is_some_and(|c| c.client_cert) =>
            {
                self.refuse_auth(
                    conn,
                    "peer links need mutual TLS: this connection presented no certificate \
                     signed by --tls-ca",
                );
            }
            (Some(Auth::None), AuthStep::Hello { nonce }) if self.is_own_offer(&nonce) => {
                self.refuse_auth(
                    conn,
                    "the nonce offered is one this node offered itself (a reflection)",
                );
            }
            (Some(Auth::None), AuthStep::Hello { nonce: theirs }) => {
                let ours = self.nonce();
                let proof = key.prove(ACCEPTOR, &theirs, &ours);
                let frame = Frame::Auth(AuthStep::Challenge {
                    nonce: ours.clone(),
                    proof,
                });
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.auth = Auth::Challenged { theirs, ours };
                }
                self.reply(conn, frame);
            }
            (Some(Auth::Challenged { theirs, ours }), AuthStep::Proof { proof }) => {
                if key.check(OPENER, &theirs, &ours, &proof) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.auth = Auth::Peer;
                    }
                } else {
                    self.refuse_auth(
                        conn,
                        "the proof does not match this node's secret \
                         (do both nodes use the same secret file?)",
                    );
                }
            }
            (Some(Auth::Peer), _) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.auth = Auth::Peer;
                }
                self.reply(
                    conn,
                    Frame::Err {
                        reason: "already authenticated".into(),
                    },
                );
            }
            (Some(_), _) => self.refuse_auth(conn, "AUTH step out of order"),
            (None, _) => {}
        }
    }

    /// Refuses a handshake on `conn` and closes it: a second try needs a new connection (and
    /// so a new nonce of ours).
    fn refuse_auth(&mut self, conn: ConnId, why: &str) {
        warn!("refused a peer handshake on connection {conn}: {why}");
        self.reply(
            conn,
            Frame::Err {
                reason: format!("{AUTH_FAILED}: {why}"),
            },
        );
        self.close(conn);
    }

    /// Whether `frame`, from `conn`, may be handled: frames that act on roles, epochs and what
    /// a backup holds need an authenticated peer link. A refused frame is answered `ERR|…`.
    pub(super) fn admit(&mut self, conn: ConnId, frame: &Frame) -> bool {
        let seed = matches!(frame, Frame::Replicate { .. } | Frame::Clear { .. });
        let needs_peer = seed
            || matches!(
                frame,
                Frame::Hello { .. }
                    | Frame::Repl { .. }
                    | Frame::Mark { .. }
                    | Frame::Clr { .. }
                    | Frame::Settle
            );
        if !needs_peer || self.is_peer(conn) || (seed && self.cfg.allow_seed_replicate) {
            return true;
        }
        let line = frame.encode();
        let verb = line.split(['|', '\n']).next().unwrap_or("?").to_string();
        self.refused_peer_frames += 1;
        self.counters.refused += 1;
        if self.refused_peer_frames.is_power_of_two() {
            warn!(
                "refused {verb} from connection {conn}, which is not an authenticated peer \
                 ({} such frames so far)",
                self.refused_peer_frames
            );
        }
        let hint = if seed {
            " (a seed primary needs --allow-seed-replicate on this node)"
        } else {
            ""
        };
        self.reply(
            conn,
            Frame::Err {
                reason: format!("{NOT_A_PEER}: {verb} refused{hint}"),
            },
        );
        false
    }

    /// The peer failed our handshake on a connection we opened for `purpose`.
    pub(super) fn auth_failed(&mut self, conn: ConnId, why: String) {
        error!("peer handshake failed: {why}");
        if let Some(super::conn::Conn {
            kind: Kind::Out(purpose),
            ..
        }) = self.close(conn)
        {
            self.on_peer_failed(conn, purpose, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_side_its_nonces_and_its_key() {
        let k = PeerKey::new(b"shared");
        let (a, b) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = k.prove(ACCEPTOR, &a, &b);
        assert!(k.check(ACCEPTOR, &a, &b, &p));
        // The other side's label (a reflected proof), another nonce (a replay), another key.
        assert!(!k.check(OPENER, &a, &b, &p));
        assert!(!k.check(ACCEPTOR, &a, &[3u8; NONCE_LEN], &p));
        assert!(!PeerKey::new(b"other").check(ACCEPTOR, &a, &b, &p));
        assert_eq!(format!("{k:?}"), "PeerKey(..)");
    }
}
