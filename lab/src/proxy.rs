//! A fault-injecting TCP proxy, for network faults without kernel help (no netem needed).
//!
//! Put one on any link (primary↔backup, publisher↔broker, broker↔subscriber) by pointing the
//! client at the proxy's port instead of the server's. Its [`Fault`] can be changed at any time
//! through a [`ProxyHandle`]:
//!
//! * `Pass` — bytes flow unchanged;
//! * `Delay(d)` — every chunk is held for `d` before it is forwarded (order is kept);
//! * `Blackhole` — connections stay open but nothing flows either way, and new connections are
//!   accepted and then starved: what a partition or a hung peer looks like to TCP;
//! * `Reset` — every open connection is dropped and new ones are closed at once: what a crashed
//!   peer or a flapping link looks like.
//!
//! Bytes held back during a blackhole are delivered when it ends (TCP would retransmit them).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use edgepair::net::{Listener, Net};

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Hold every chunk this long.
    Delay(Duration),
    /// Forward nothing; keep connections open.
    Blackhole,
    /// Drop every connection; refuse new ones.
    Reset,
}

/// Changes the fault of a running proxy.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    tx: watch::Sender<Fault>,
    /// Address clients should connect to.
    pub addr: String,
}

impl ProxyHandle {
    /// Sets the fault from now on.
    pub fn set(&self, f: Fault) {
        self.tx.send_replace(f);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.tx.borrow()
    }
}

/// Starts a proxy on `listen` (port 0 for any) that forwards to `target`, until `shutdown`.
pub async fn start(
    net: Net,
    listen: &str,
    target: String,
    shutdown: CancellationToken,
) -> std::io::Result<ProxyHandle> {
    let listener = net.bind(listen).await?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = watch::channel(Fault::Pass);
    tokio::spawn(accept_loop(net, listener, target, rx, shutdown));
    Ok(ProxyHandle { tx, addr })
}

async fn accept_loop(
    net: Net,
    listener: Listener,
    target: String,
    rx: watch::Receiver<Fault>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *rx.borrow() == Fault::Reset {
            drop(client);
            continue;
        }
        let target = target.clone();
        let rx = rx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let Ok(server) = net.connect(&target, Duration::from_secs(1)).await else {
                return; // dropping the client closes it, like a refused connection
            };
            let (cr, cw) = tokio::io::split(client);
            let (sr, sw) = tokio::io::split(server);
            tokio::select! {
                _ = pump(cr, sw, rx.clone()) => {}
                _ = pump(sr, cw, rx.clone()) => {}
                _ = reset(rx) => debug!("proxy: connection reset"),
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Resolves when the fault turns to `Reset`.
async fn reset(mut rx: watch::Receiver<Fault>) {
    loop {
        if *rx.borrow_and_update() == Fault::Reset {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Copies one direction, applying the fault to every chunk.
async fn pump<R, W>(mut r: R, mut w: W, mut rx: watch::Receiver<Fault>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While blackholed, do not even read: the sender's buffers fill as on a dead link.
        loop {
            let f = *rx.borrow_and_update();
            if f != Fault::Blackhole {
                break;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let f = *rx.borrow_and_update();
            match f {
                Fault::Pass => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Blackhole => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Reset => return,
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    async fn echo_server() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if w.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// What a client saw: an answer, the connection closed (EOF or an error), or silence.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Line(String),
        Closed,
        Silent,
    }

    async fn next(
        lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
        limit: Duration,
    ) -> Seen {
        match tokio::time::timeout(limit, lines.next_line()).await {
            Err(_) => Seen::Silent,
            Ok(Ok(Some(l))) => Seen::Line(l),
            Ok(Ok(None)) | Ok(Err(_)) => Seen::Closed,
        }
    }

    async fn roundtrip(addr: &str, msg: &str, limit: Duration) -> Seen {
        let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
            return Seen::Closed;
        };
        let (r, mut w) = s.into_split();
        if w.write_all(format!("{msg}\n").as_bytes()).await.is_err() {
            return Seen::Closed;
        }
        let mut lines = BufReader::new(r).lines();
        next(&mut lines, limit).await
    }

    #[tokio::test]
    async fn proxy_passes_delays_blackholes_and_resets() {
        let sd = CancellationToken::new();
        let target = echo_server().await;
        let p = start(Net::Tokio, "127.0.0.1:0", target, sd.clone())
            .await
            .expect("proxy");
        let short = Duration::from_millis(300);
        assert_eq!(roundtrip(&p.addr, "a", short).await, Seen::Line("a".into()));

        p.set(Fault::Delay(Duration::from_millis(100)));
        let t = std::time::Instant::now();
        assert_eq!(
            roundtrip(&p.addr, "b", Duration::from_secs(2)).await,
            Seen::Line("b".into())
        );
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "both directions delayed"
        );

        // A blackhole is silence on an open connection, not a close.
        p.set(Fault::Blackhole);
        assert_eq!(roundtrip(&p.addr, "c", short).await, Seen::Silent);

        // A reset is a prompt close, not silence: well before the limit.
        p.set(Fault::Reset);
        let t = std::time::Instant::now();
        assert_eq!(
            roundtrip(&p.addr, "d", Duration::from_secs(2)).await,
            Seen::Closed
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "reset took {:?}",
            t.elapsed()
        );

        p.set(Fault::Pass);
        assert_eq!(roundtrip(&p.addr, "e", short).await, Seen::Line("e".into()));
        sd.cancel();
    }

    #[tokio::test]
    async fn reset_closes_open_connections_at_once_and_a_blackhole_keeps_them_open() {
        let sd = CancellationToken::new();
        let target = echo_server().await;
        let p = start(Net::Tokio, "127.0.0.1:0", target, sd.clone())
            .await
            .expect("proxy");
        let open = || async {
            let s = tokio::net::TcpStream::connect(&p.addr)
                .await
                .expect("connect");
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"hi\n").await.expect("write");
            assert_eq!(
                next(&mut lines, Duration::from_secs(2)).await,
                Seen::Line("hi".into())
            );
            (lines, w)
        };
        // Blackhole: an established connection stays open and silent.
        let (mut lines, mut w) = open().await;
        p.set(Fault::Blackhole);
        w.write_all(b"held\n").await.expect("write");
        assert_eq!(
            next(&mut lines, Duration::from_millis(300)).await,
            Seen::Silent
        );
        p.set(Fault::Pass);
        assert_eq!(
            next(&mut lines, Duration::from_secs(2)).await,
            Seen::Line("held".into()),
            "the blackholed connection was not kept"
        );
        // Reset: an established connection is closed promptly, without anything being sent.
        let (mut lines, _w) = open().await;
        let t = std::time::Instant::now();
        p.set(Fault::Reset);
        assert_eq!(next(&mut lines, Duration::from_secs(2)).await, Seen::Closed);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "reset took {:?}",
            t.elapsed()
        );
        sd.cancel();
    }

    #[tokio::test]
    async fn bytes_held_in_a_blackhole_flow_when_it_ends() {
        let sd = CancellationToken::new();
        let target = echo_server().await;
        let p = start(Net::Tokio, "127.0.0.1:0", target, sd.clone())
            .await
            .expect("proxy");
        let s = tokio::net::TcpStream::connect(&p.addr)
            .await
            .expect("connect");
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"first\n").await.expect("write");
        assert_eq!(
            lines.next_line().await.ok().flatten().as_deref(),
            Some("first")
        );
        p.set(Fault::Blackhole);
        w.write_all(b"held\n").await.expect("write");
        let quiet = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await;
        assert!(quiet.is_err(), "nothing may flow in a blackhole");
        p.set(Fault::Pass);
        let got = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await;
        assert_eq!(
            got.ok().and_then(|r| r.ok()).flatten().as_deref(),
            Some("held")
        );
        sd.cancel();
    }
}
