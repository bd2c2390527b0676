//! The seam between node logic and the network.
//!
//! This is the only file that names socket types. Nodes and clients ask a [`Net`] to bind and to
//! connect and get back boxed byte streams, so the same logic can later run over a simulated
//! network (turmoil) by adding a variant here, without touching the protocol or node code.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream: what every connection of this crate is made of.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection, whatever carries it.
pub type BoxStream = Pin<Box<dyn Stream>>;

/// A stream that counts the bytes read from it into a shared counter: under TLS, the only way
/// to see that a client has begun sending (a partial record stays inside the TLS layer, out of
/// sight of the frame reader above it).
pub struct Counted {
    inner: BoxStream,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Counted {
    /// `inner`, counted; the counter to watch.
    pub fn new(inner: BoxStream) -> (Counted, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        (
            Counted {
                inner,
                read: read.clone(),
            },
            read,
        )
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        self.inner.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How nodes reach each other.
#[derive(Debug, Clone, Copy, Default)]
pub enum Net {
    /// Real TCP through tokio.
    #[default]
    Tokio,
    /// turmoil's simulated TCP: hosts are addressed by name (`primary:8080`), time is virtual,
    /// and faults (crash, partition, hold, latency) are injected by the simulator. Only with the
    /// `sim` feature, so the deployed binaries do not link the simulator.
    #[cfg(feature = "sim")]
    Sim,
}

/// A bound listening socket.
pub enum Listener {
    /// A real TCP listener.
    Tokio(tokio::net::TcpListener),
    /// A simulated listener.
    #[cfg(feature = "sim")]
    Sim(turmoil::net::TcpListener),
}

impl Net {
    /// Binds a listener on `addr` (`host:port`; port 0 picks a free port).
    pub async fn bind(&self, addr: &str) -> io::Result<Listener> {
        match self {
            Net::Tokio => Ok(Listener::Tokio(tokio::net::TcpListener::bind(addr).await?)),
            #[cfg(feature = "sim")]
            Net::Sim => Ok(Listener::Sim(turmoil::net::TcpListener::bind(addr).await?)),
        }
    }

    /// Connects to `addr` and, with `tls`, runs the TLS handshake, all within `timeout`.
    pub async fn connect_tls(
        &self,
        addr: &str,
        timeout: Duration,
        tls: Option<&crate::tls::Client>,
    ) -> io::Result<BoxStream> {
        let Some(tls) = tls else {
            return self.connect(addr, timeout).await;
        };
        let start = tokio::time::Instant::now();
        let s = self.connect(addr, timeout).await?;
        let left = timeout.saturating_sub(start.elapsed());
        tokio::time::timeout(left, tls.connect(s, addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// Connects to `addr`, giving up after `timeout` so a hung peer cannot stall the caller.
    pub async fn connect(&self, addr: &str, timeout: Duration) -> io::Result<BoxStream> {
        match self {
            Net::Tokio => {
                let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                // Frames are small and latency matters more than packet count.
                s.set_nodelay(true)?;
                Ok(Box::pin(s))
            }
            #[cfg(feature = "sim")]
            Net::Sim => {
                let s = tokio::time::timeout(timeout, turmoil::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                Ok(Box::pin(s))
            }
        }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listener::Tokio(l) => l.fmt(f),
            #[cfg(feature = "sim")]
            Listener::Sim(l) => write!(f, "SimListener({:?})", l.local_addr().ok()),
        }
    }
}

impl Listener {
    /// Waits for the next connection; returns the stream and the peer's address for logs.
    pub async fn accept(&self) -> io::Result<(BoxStream, String)> {
        match self {
            Listener::Tokio(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Box::pin(s), peer.to_string()))
            }
            #[cfg(feature = "sim")]
            Listener::Sim(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Box::pin(s), peer.to_string()))
            }
        }
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Listener::Tokio(l) => l.local_addr(),
            #[cfg(feature = "sim")]
            Listener::Sim(l) => l.local_addr(),
        }
    }
}

/// Raises this process's soft limit of open files to `want`, as far as the hard limit lets it;
/// returns the limit now in force. A node serving thousands of connections (or a client
/// holding them) needs one descriptor each, and many systems start processes at 1,024.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want: libc::rlim_t = want;
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Spawns a task on the current runtime. Inside a turmoil simulation it goes on the host's
/// `LocalSet`, whose tasks are kept in one list in spawn order: tokio's shared task list is
/// sharded by task id, a process-wide counter, so the order in which a crashed host's tasks
/// (and their sockets) are dropped would depend on what ran before in the same process, and two
/// runs of one seed would diverge.
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "sim")]
    if turmoil::in_simulation() {
        return tokio::task::spawn_local(f);
    }
    tokio::spawn(f)
}
