//! What one connection may take: how many a peer may hold open, how long an answer may wait to
//! be read, how much it may buffer.
//!
//! The daemon serves every user of a shared machine, so no one of them may hold what the others
//! need. Descriptors are the scarce thing: each open connection holds one, and the provider
//! calls and the state files need theirs. So:
//! - at most [`Limits::total`] connections are open at once: the open-file limit less a reserve
//!   for everything else;
//! - one uid on the Unix socket, or the container endpoint as a whole (its peers have no uid),
//!   holds at most a quarter of them: a connection past that is closed as soon as it is
//!   accepted;
//! - an answer the peer does not read within [`WRITE_TIMEOUT`] ends the connection
//!   ([`Bounded`]); hyper's header-read timeout bounds a connection that sends nothing, and
//!   its buffer limit what each one holds in memory.
//!
//! A refusal is logged once per [`LOG_EVERY`], with the number refused since.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long an answer may wait for the peer to read it before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may take to send a request's headers (and, between requests, to
/// start the next one) before it is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The most bytes hyper buffers per connection, each way: a request's headers must fit.
/// Clients send a few hundred bytes; the smallest hyper allows is 8 KiB.
pub const MAX_BUFFER: usize = 16 * 1024;

/// Descriptors kept for everything but connections: provider calls, the ledger, the token
/// files, the runtime's own.
const RESERVE: u64 = 128;

/// The most connections counted against the open-file limit, whatever it is.
const MAX_TOTAL: u64 = 1 << 20;

/// How often a refusal is logged, at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Who a connection is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A peer on the Unix socket, by uid.
    Uid(u32),
    /// The container endpoint (its peers have no uid).
    Container,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Uid(uid) => write!(f, "uid {uid}"),
            Holder::Container => f.write_str("the container endpoint"),
        }
    }
}

/// The open connections, counted.
#[derive(Debug)]
pub struct Limits {
    /// The most connections open at once.
    total: usize,
    /// The most one [`Holder`] may have open.
    each: usize,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_holder: HashMap<Holder, usize>,
    refused: Throttle,
    accept_failed: Throttle,
    /// Connections refused since start.
    refused_total: u64,
}

/// Logs an event at most once per [`LOG_EVERY`], counting the ones in between.
#[derive(Debug, Default)]
struct Throttle {
    /// Events since the last one logged.
    unlogged: u64,
    logged: Option<Instant>,
}

impl Throttle {
    /// Counts an event; when it is to be logged, how many it stands for (itself included).
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Limits {
    /// Limits for a process whose open-file limit is `nofile`.
    pub fn for_fd_limit(nofile: u64) -> Limits {
        let total = nofile.saturating_sub(RESERVE).clamp(4, MAX_TOTAL) as usize;
        Limits {
            total,
            each: (total / 4).max(1),
            state: Mutex::new(Counts::default()),
        }
    }

    /// Limits from this process's open-file limit (which the daemon raises to the hard limit
    /// first).
    pub fn from_process() -> Limits {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        Limits::for_fd_limit(limit.current.unwrap_or(MAX_TOTAL))
    }

    /// The most connections open at once.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The most connections one uid (or the container endpoint) may hold.
    pub fn each(&self) -> usize {
        self.each
    }

    /// The counts, for `/metrics`.
    pub fn snapshot(&self) -> crate::metrics::Connections {
        let counts = self.state.lock().expect("limits lock");
        crate::metrics::Connections {
            open: counts.open,
            limit: self.total,
            refused: counts.refused_total,
        }
    }

    /// Counts a new connection of `holder`, or refuses it (and logs that, now and then).
    pub fn admit(self: &Arc<Self>, holder: Holder) -> Option<Permit> {
        let mut counts = self.state.lock().expect("limits lock");
        let held = counts.by_holder.get(&holder).copied().unwrap_or(0);
        if counts.open < self.total && held < self.each {
            counts.open += 1;
            *counts.by_holder.entry(holder).or_insert(0) += 1;
            return Some(Permit {
                limits: Arc::clone(self),
                holder,
            });
        }
        counts.refused_total += 1;
        let refused = counts.refused.due()?;
        let (open, total, each) = (counts.open, self.total, self.each);
        drop(counts);
        tracing::warn!(
            holder = %holder,
            held,
            open,
            refused,
            "closing new connections: {holder} holds {held} of at most {each}, and {open} of {total} are open (the open-file limit less {RESERVE}); {refused} closed since the last report"
        );
        None
    }
}

impl Limits {
    /// Reports a failed `accept` (out of descriptors, most likely), now and then.
    pub fn accept_failed(&self, error: &std::io::Error) {
        let Some(failed) = self.state.lock().expect("limits lock").accept_failed.due() else {
            return;
        };
        tracing::warn!(
            error = %error,
            failed,
            "accepting a connection failed {failed} time(s) since the last report; retrying"
        );
    }
}

/// One counted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    holder: Holder,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limits.state.lock().expect("limits lock");
        counts.open -= 1;
        if let Some(n) = counts.by_holder.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                counts.by_holder.remove(&self.holder);
            }
        }
    }
}

/// A connection's stream whose writes may wait at most [`WRITE_TIMEOUT`] for the peer to
/// read: then they fail, and hyper closes the connection. It holds the connection's
/// [`Permit`].
///
/// Its end is its `close()` on drop, without a `shutdown()` first: hyper shuts the write side
/// down before dropping a finished connection, and the close that follows tells the peer the
/// same (end of stream after the last byte written). One system call less per connection.
#[derive(Debug)]
pub struct Bounded<S> {
    io: S,
    /// Armed when a write could not go on, until one does.
    stalled: Option<Pin<Box<Sleep>>>,
    _permit: Permit,
}

impl<S> Bounded<S> {
    /// Wraps `io`, counted by `permit`.
    pub fn new(io: S, permit: Permit) -> Self {
        Bounded {
            io,
            stalled: None,
            _permit: permit,
        }
    }

    /// Passes a write's outcome on, failing it once the peer has read nothing for
    /// [`WRITE_TIMEOUT`].
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the peer read nothing for {}s; closing the connection",
                    WRITE_TIMEOUT.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bound(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_a_reserve_and_share_by_quarters() {
        let limits = Limits::for_fd_limit(1024);
        assert_eq!((limits.total(), limits.each()), (896, 224));
        let tiny = Limits::for_fd_limit(16);
        assert_eq!((tiny.total(), tiny.each()), (4, 1));
    }

    #[test]
    fn one_holder_cannot_take_every_place() {
        let limits = Arc::new(Limits::for_fd_limit(RESERVE + 8));
        let mine: Vec<_> = (0..2)
            .map(|_| limits.admit(Holder::Uid(65534)).expect("within its share"))
            .collect();
        assert!(limits.admit(Holder::Uid(65534)).is_none(), "past its share");
        let root = limits.admit(Holder::Uid(0));
        assert!(root.is_some(), "another uid still gets in");
        drop(mine);
        assert!(
            limits.admit(Holder::Uid(65534)).is_some(),
            "places are freed on drop"
        );
    }

    #[test]
    fn the_total_is_a_bound_too() {
        let limits = Arc::new(Limits::for_fd_limit(RESERVE + 8));
        let held: Vec<_> = (0..8)
            .map(|uid| limits.admit(Holder::Uid(uid)).expect("room"))
            .collect();
        assert!(limits.admit(Holder::Uid(100)).is_none());
        assert!(limits.admit(Holder::Container).is_none());
        drop(held);
        assert!(limits.admit(Holder::Container).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_answer_ends_the_connection() {
        use tokio::io::AsyncWriteExt;
        let limits = Arc::new(Limits::for_fd_limit(1024));
        let (ours, peer) = tokio::io::duplex(64);
        let mut conn = Bounded::new(ours, limits.admit(Holder::Uid(1)).unwrap());
        let started = tokio::time::Instant::now();
        let err = conn
            .write_all(&[0u8; 1024])
            .await
            .expect_err("the peer never reads");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), WRITE_TIMEOUT);
        drop(peer);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Arc::new(Limits::for_fd_limit(1024));
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut conn = Bounded::new(ours, limits.admit(Holder::Uid(1)).unwrap());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                // Each read comes within the bound, though the whole answer takes longer.
                tokio::time::sleep(WRITE_TIMEOUT / 2).await;
                match peer.read(&mut buf).await.unwrap() {
                    0 => return got.len(),
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        conn.write_all(&[7u8; 640])
            .await
            .expect("each write goes on in time");
        conn.shutdown().await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), 640);
    }
}
