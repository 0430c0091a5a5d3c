//! The Unix socket's accept loop, on plain threads.
//!
//! A client that connects once per request (`keybroker credential-process`, which aws-cli
//! spawns per command) costs a server an accept, a read, a write and a close. On the async
//! runtime each of those is also a trip through epoll and a task; on two cores that made the
//! broker slower than nginx per connection, whatever the runtime's shape (bench/RESULTS.md).
//! So a few threads of their own accept, and answer what they can answer at once:
//! a complete `GET` or `HEAD` of `/v1/credentials/{profile}` over HTTP/1.1, from a peer that
//! may read the profile, whose key is ready. The answer is the bytes hyper would write
//! (a unit test holds them to it), written with one `sendmsg`.
//!
//! Everything else is handed to hyper on the runtime with the bytes already read: a request
//! not wholly arrived, any other path or method, a profile with no ready key, a denied peer,
//! HTTP/1.0, a request with a body. A keep-alive connection is handed over after its first
//! answer, so its next requests are hyper's.

use std::io::{self, IoSlice, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use tokio::sync::mpsc::UnboundedSender;

use super::{App, Peer, Route};

/// A connection the acceptor threads did not finish: hyper takes it over, first reading
/// `read`, the bytes the thread already took from the socket.
#[derive(Debug)]
pub(super) struct Handoff {
    /// The connection, non-blocking.
    pub stream: UnixStream,
    /// Who is on the other end.
    pub peer: Peer,
    /// Bytes read and not answered.
    pub read: Bytes,
}

/// The bytes a thread reads from a new connection, at most: hyper's first read is as large.
const READ_BUF: usize = 8192;

/// How long a thread waits for a new connection's request before handing the connection to
/// hyper. A slower client is served just as well, by hyper; one that connects and sends
/// nothing holds a thread this long.
const REQUEST_WAIT: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 1_000_000,
};

/// Waits for a request that may run out in one [`WAIT_WINDOW`]; a thread hands new
/// connections over at once for the rest of it. Clients that connect and send nothing, mixed
/// with ones that do or not, cost a thread about 10 ms in 100 ms, whatever their number. A
/// busy client that is slow to write now and then (a load generator on two cores: about 20 in
/// 200,000 connections) never gets near it.
const VAIN_WAITS: u32 = 10;

/// See [`VAIN_WAITS`].
const WAIT_WINDOW: Duration = Duration::from_millis(100);

/// Headers parsed, at most; a request with more is handed to hyper.
const MAX_HEADERS: usize = 32;

/// The threads, and what stops them.
pub(super) struct Acceptors {
    /// Set at stop; a busy thread sees it between connections.
    stopping: Arc<AtomicBool>,
    /// An eventfd written at stop; an idle thread sees it in its `poll`.
    wake: Arc<OwnedFd>,
    /// Joined at stop.
    threads: Vec<JoinHandle<()>>,
}

impl Acceptors {
    /// Starts `count` threads accepting on `listener`.
    pub fn start(
        listener: UnixListener,
        app: Arc<App>,
        handoff: UnboundedSender<Handoff>,
        count: usize,
    ) -> io::Result<Acceptors> {
        // A blocking accept would not see the stop.
        listener.set_nonblocking(true)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?);
        let listener = Arc::new(listener);
        let mut acceptors = Acceptors {
            stopping,
            wake,
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            let worker = Worker {
                listener: Arc::clone(&listener),
                stopping: Arc::clone(&acceptors.stopping),
                wake: Arc::clone(&acceptors.wake),
                app: Arc::clone(&app),
                handoff: handoff.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("keybroker-accept-{i}"))
                // Nothing here is deep: parsing, an access check (which may read /etc/group), a write.
                .stack_size(512 * 1024)
                .spawn(move || worker.run());
            match thread {
                Ok(t) => acceptors.threads.push(t),
                Err(e) => {
                    acceptors.stop();
                    return Err(e);
                }
            }
        }
        Ok(acceptors)
    }

    /// Stops the threads and waits for them: once this returns, no connection is accepted
    /// and no key is served by them. Blocks for at most one connection's handling.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // An eventfd stays readable once written: every thread's poll wakes.
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Acceptors {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One acceptor thread.
struct Worker {
    /// The socket's listener, shared by the threads (non-blocking).
    listener: Arc<UnixListener>,
    /// See [`Acceptors::stopping`].
    stopping: Arc<AtomicBool>,
    /// See [`Acceptors::wake`].
    wake: Arc<OwnedFd>,
    /// Keys, access rules and the answer counts.
    app: Arc<App>,
    /// Where connections for hyper go.
    handoff: UnboundedSender<Handoff>,
}

impl Worker {
    fn run(self) {
        let mut conn = Buffers::new();
        while !self.stopping.load(Ordering::Relaxed) {
            match rustix::net::accept_with(&*self.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    // A bug that panics loses its connection, not the thread.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.serve(&mut conn, UnixStream::from(fd))
                    }));
                    if served.is_err() {
                        conn = Buffers::new();
                    }
                }
                Err(Errno::AGAIN) => {
                    let mut fds = [
                        PollFd::new(&*self.listener, PollFlags::IN),
                        PollFd::new(&*self.wake, PollFlags::IN),
                    ];
                    match rustix::event::poll(&mut fds, None) {
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "waiting for connections failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                Err(Errno::INTR | Errno::CONNABORTED) => {}
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn serve(&self, conn: &mut Buffers, stream: UnixStream) {
        let peer = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(c) => Peer {
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; closing the connection");
                return;
            }
        };
        let ready = |profile: &str| self.app.readable_body(profile, peer);
        let handoff = match conn.serve(stream, peer, ready) {
            Outcome::Answered { request, handoff } => {
                let logged = tracing::enabled!(tracing::Level::DEBUG)
                    .then_some((request.method(), request.path));
                self.app.answered(200, Route::Socket(peer), logged);
                handoff
            }
            Outcome::HandOff(handoff) => Some(handoff),
            Outcome::Closed => None,
        };
        if let Some(handoff) = handoff {
            // Refused only once the server has stopped: the connection is closed, as a
            // connection still queued in the listener is.
            let _ = self.handoff.send(handoff);
        }
    }
}

/// A request an acceptor thread may answer.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    /// `HEAD` (else `GET`).
    head: bool,
    /// The path, `/v1/credentials/{profile}`.
    path: &'a str,
    /// The profile named.
    profile: &'a str,
    /// The client asked for the connection to be closed after the answer.
    close: bool,
    /// Bytes of `read` the request took; the rest belong to the next request.
    len: usize,
}

impl Request<'_> {
    fn method(&self) -> &'static str {
        if self.head {
            "HEAD"
        } else {
            "GET"
        }
    }
}

/// The request at the start of `read`, when it is one an acceptor thread may answer: a
/// complete `GET` or `HEAD` of `/v1/credentials/{profile}` (no query) over HTTP/1.1, with no
/// body and no upgrade. `None` leaves it to hyper, which answers whatever it is.
fn parse(read: &[u8]) -> Option<Request<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(read).ok()? else {
        return None;
    };
    let head = match req.method? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    if req.version? != 1 {
        return None;
    }
    let path = req.path?;
    let profile = path.strip_prefix("/v1/credentials/")?;
    // Profile names are `[A-Za-z0-9_.-]+` (config.rs); anything else, a query included, is
    // hyper's to answer (a 404, or a 400 for what it rejects).
    if !crate::config::valid_profile_name(profile) {
        return None;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if ["content-length", "transfer-encoding", "upgrade", "expect"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            return None;
        }
        if name.eq_ignore_ascii_case("connection") {
            if !h.value.is_ascii() {
                // hyper does not read such a value at all.
                return None;
            }
            // As hyper reads it: any comma-separated token `close`.
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    Some(Request {
        head,
        path,
        profile,
        close,
        len,
    })
}

/// What became of a connection.
enum Outcome<'a> {
    /// Answered here; a keep-alive connection goes on to hyper.
    Answered {
        request: Request<'a>,
        handoff: Option<Handoff>,
    },
    /// Not answered: hyper's.
    HandOff(Handoff),
    /// The peer went away, or asked nothing.
    Closed,
}

/// A thread's buffers, reused for every connection: answering allocates nothing.
struct Buffers {
    /// A new connection's first bytes.
    read: Vec<u8>,
    /// The answer's status line and headers.
    head: Vec<u8>,
    /// The `date` header's value.
    date: HttpDate,
    /// What waiting for requests may still cost.
    budget: WaitBudget,
}

/// Waits for a request that ran out, in the current window ([`VAIN_WAITS`]).
struct WaitBudget {
    /// Waits that ran out since `since`.
    vain: u32,
    /// When the window began: at a wait that ran out.
    since: Instant,
}

impl WaitBudget {
    /// Whether a new connection may be waited for.
    fn may_wait(&self) -> bool {
        self.vain < VAIN_WAITS || self.since.elapsed() >= WAIT_WINDOW
    }

    /// A wait ran out.
    fn ran_out(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.since) >= WAIT_WINDOW {
            self.since = now;
            self.vain = 0;
        }
        self.vain += 1;
    }
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            read: vec![0; READ_BUF],
            head: Vec::with_capacity(256),
            date: HttpDate::default(),
            budget: WaitBudget {
                vain: 0,
                since: Instant::now(),
            },
        }
    }

    /// Reads what `stream` has sent (waiting for it within the budget, see [`read_request`]),
    /// and answers it when it is a request for a key `ready` gives (the profile's body, when it
    /// is ready and `peer` may read it).
    fn serve(
        &mut self,
        stream: UnixStream,
        peer: Peer,
        ready: impl FnOnce(&str) -> Option<Bytes>,
    ) -> Outcome<'_> {
        let n = match read_request(&stream, &mut self.read, self.budget.may_wait()) {
            Read::Bytes(n) => n,
            Read::Nothing => 0,
            Read::NothingInTime => {
                self.budget.ran_out();
                0
            }
            Read::Gone => return Outcome::Closed,
        };
        let read = &self.read[..n];
        let Some((request, body)) =
            parse(read).and_then(|r| ready(r.profile).map(|body| (r, body)))
        else {
            return hand_off(stream, peer, read).map_or(Outcome::Closed, Outcome::HandOff);
        };
        render_head(&mut self.head, body.len(), request.close, self.date.now());
        let body = if request.head { &[][..] } else { &body[..] };
        if !send_all_now(&stream, &self.head, body) {
            return Outcome::Closed;
        }
        let handoff = if request.close {
            None
        } else {
            hand_off(stream, peer, &read[request.len..])
        };
        Outcome::Answered { request, handoff }
    }
}

/// What [`read_request`] got.
enum Read {
    /// This many bytes.
    Bytes(usize),
    /// Nothing yet, and it did not wait.
    Nothing,
    /// Nothing within [`REQUEST_WAIT`].
    NothingInTime,
    /// The peer has gone.
    Gone,
}

/// Reads what the peer has sent, waiting at most [`REQUEST_WAIT`] for a first byte when `wait`:
/// a client writes its request just after it connects, and a thread woken by the connect often
/// reads before the request is there. Waiting here costs a `poll`; handing the connection over
/// costs the runtime's whole path.
fn read_request(stream: &UnixStream, buf: &mut [u8], wait: bool) -> Read {
    let recv = |buf: &mut [u8]| match rustix::net::recv(stream, buf, RecvFlags::DONTWAIT) {
        Ok((0, _)) => Read::Gone,
        Ok((n, _)) => Read::Bytes(n),
        Err(Errno::AGAIN) => Read::Nothing,
        Err(_) => Read::Gone,
    };
    match recv(buf) {
        Read::Nothing if wait => {
            let mut fd = [PollFd::new(stream, PollFlags::IN)];
            match rustix::event::poll(&mut fd, Some(&REQUEST_WAIT)) {
                Ok(1) => recv(buf),
                _ => Read::NothingInTime,
            }
        }
        read => read,
    }
}

/// `stream` made ready for the runtime, with the bytes `read` from it; `None` when it cannot
/// be (the connection is then closed).
fn hand_off(stream: UnixStream, peer: Peer, read: &[u8]) -> Option<Handoff> {
    stream.set_nonblocking(true).ok()?;
    Some(Handoff {
        stream,
        peer,
        read: Bytes::copy_from_slice(read),
    })
}

/// Writes `head` then `body` with one `sendmsg` that does not wait. A new connection's send
/// buffer takes an answer whole (a few hundred bytes against the default 208 KiB), so this
/// only fails when the peer has gone; a peer that does not read cannot hold the thread.
fn send_all_now(stream: &UnixStream, head: &[u8], body: &[u8]) -> bool {
    let total = head.len() + body.len();
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(head), IoSlice::new(body)],
        &mut rustix::net::SendAncillaryBuffer::default(),
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    );
    sent == Ok(total)
}

/// The head hyper writes for [`super::json_response`] with a 200: the same headers in the
/// same order, `connection: close` where hyper adds it.
fn render_head(out: &mut Vec<u8>, content_length: usize, close: bool, date: &[u8]) {
    out.clear();
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n",
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {content_length}\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
}

/// The `date` header's value (IMF-fixdate), formatted once a second.
#[derive(Default)]
struct HttpDate {
    /// The Unix second `text` was formatted for.
    second: u64,
    /// `Tue, 24 Nov 2026 04:36:43 GMT`.
    text: Vec<u8>,
}

impl HttpDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now != self.second || self.text.is_empty() {
            self.second = now;
            self.text = imf_fixdate(now).into_bytes();
        }
        &self.text
    }
}

/// `Tue, 24 Nov 2026 04:36:43 GMT`.
fn imf_fixdate(unix_seconds: u64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"{\"Version\":1,\"AccessKeyId\":\"AKIDEXAMPLE\"}\n";

    #[test]
    fn parse_takes_only_complete_simple_credential_requests() {
        let get = b"GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse(get),
            Some(Request {
                head: false,
                path: "/v1/credentials/p",
                profile: "p",
                close: true,
                len: get.len()
            })
        );
        let two = b"HEAD /v1/credentials/p HTTP/1.1\r\nconnection: Keep-Alive\r\n\r\nGET /";
        let r = parse(two).unwrap();
        assert!(r.head && !r.close);
        assert_eq!(&two[r.len..], b"GET /");
        assert!(
            parse(b"GET /v1/credentials/p HTTP/1.1\r\nConnection: foo, CLOSE\r\n\r\n")
                .unwrap()
                .close
        );
        for hyper_s in [
            &b"GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\n"[..],
            b"GET /v1/credentials/p HTTP/1.0\r\n\r\n",
            b"POST /v1/credentials/p HTTP/1.1\r\n\r\n",
            b"GET /v1/credentials/p?x=1 HTTP/1.1\r\n\r\n",
            b"GET /v1/credentials/ HTTP/1.1\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\n\r\n",
            b"GET http://k/v1/credentials/p HTTP/1.1\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nConnection: close, \x80\r\n\r\n",
            b"GET /v1/credentials/a<b HTTP/1.1\r\n\r\n",
            b"GET /v1/credentials/p/x HTTP/1.1\r\n\r\n",
            b"GET /v1/credentials/%70 HTTP/1.1\r\n\r\n",
            b"",
        ] {
            assert_eq!(parse(hyper_s), None, "{}", String::from_utf8_lossy(hyper_s));
        }
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(imf_fixdate(784111777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(imf_fixdate(1795494995), "Tue, 24 Nov 2026 04:36:35 GMT");
    }

    /// What `connection` answers to `request`, written whole before it reads: the thread's
    /// answer and what it hands over.
    fn answer(request: &[u8], ready: Option<&'static [u8]>) -> (Vec<u8>, Option<Handoff>) {
        let (server, mut client) = UnixStream::pair().unwrap();
        client.write_all(request).unwrap();
        let mut conn = Buffers::new();
        let peer = Peer { uid: 1, gid: 1 };
        let handoff = match conn.serve(server, peer, |p| {
            assert_eq!(p, "p");
            ready.map(Bytes::from_static)
        }) {
            Outcome::Answered { handoff, .. } => handoff,
            Outcome::HandOff(h) => Some(h),
            Outcome::Closed => None,
        };
        client.set_nonblocking(true).unwrap();
        let mut answer = Vec::new();
        let _ = io::Read::read_to_end(&mut client, &mut answer);
        (answer, handoff)
    }

    /// What hyper answers to `request` with `json_response(200, BODY)`, the answer of
    /// `ready_answer` on the runtime.
    async fn hyper_answer(request: &'static [u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(super::super::json_response(
                http::StatusCode::OK,
                Bytes::from_static(BODY),
            ))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let served = tokio::spawn(conn);
        client.write_all(request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        served.await.unwrap().unwrap();
        answer
    }

    fn without_date(answer: &[u8]) -> String {
        let text = String::from_utf8(answer.to_vec()).unwrap();
        let date = text.find("date: ").expect("a date header");
        let end = date + text[date..].find("\r\n").unwrap();
        assert_eq!(end - date, "date: ".len() + 29, "{text}");
        format!("{}date: X{}", &text[..date], &text[end..])
    }

    #[tokio::test]
    async fn answers_are_the_bytes_hyper_writes() {
        for request in [
            &b"GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"[..],
            b"HEAD /v1/credentials/p HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\n\r\n",
            b"HEAD /v1/credentials/p HTTP/1.1\r\n\r\n",
        ] {
            let (ours, handoff) = answer(request, Some(BODY));
            let close = request.ends_with(b"close\r\n\r\n");
            assert_eq!(handoff.is_some(), !close, "keep-alive goes on to hyper");
            if let Some(h) = handoff {
                assert!(h.read.is_empty());
            }
            let theirs = hyper_answer(request).await;
            assert_eq!(
                without_date(&ours),
                without_date(&theirs),
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn what_is_not_answered_is_handed_over_with_the_bytes_read() {
        let partial = b"GET /v1/credentials/p HTTP/1.1\r\nHo";
        let (answered, handoff) = answer(partial, Some(BODY));
        assert!(answered.is_empty());
        assert_eq!(&handoff.unwrap().read[..], partial);

        let cold = b"GET /v1/credentials/p HTTP/1.1\r\n\r\n";
        let (answered, handoff) = answer(cold, None);
        assert!(answered.is_empty());
        assert_eq!(&handoff.unwrap().read[..], cold);

        let pipelined = b"GET /v1/credentials/p HTTP/1.1\r\n\r\nGET /v1/status HTTP/1.1\r\n\r\n";
        let (answered, handoff) = answer(pipelined, Some(BODY));
        assert!(answered.starts_with(b"HTTP/1.1 200 OK\r\n") && answered.ends_with(BODY));
        assert_eq!(
            &handoff.unwrap().read[..],
            b"GET /v1/status HTTP/1.1\r\n\r\n"
        );

        // A connection with nothing sent goes to hyper after the wait. Once the window's waits
        // have run out, connections go without a wait (requests already sent are still
        // answered), until the window ends; answered requests in between change nothing.
        let mut conn = Buffers::new();
        let peer = Peer { uid: 1, gid: 1 };
        let sent = |conn: &mut Buffers| {
            let (server, mut client) = UnixStream::pair().unwrap();
            client.write_all(cold).unwrap();
            let answered = conn.serve(server, peer, |_| Some(Bytes::from_static(BODY)));
            assert!(matches!(answered, Outcome::Answered { .. }));
        };
        // The window is kept open by hand (`since` moved to now), so that how fast this machine
        // runs the loop does not matter.
        for _ in 0..VAIN_WAITS {
            conn.budget.since = Instant::now();
            let (server, _client) = UnixStream::pair().unwrap();
            match conn.serve(server, peer, |_| unreachable!("nothing was asked")) {
                Outcome::HandOff(h) => assert!(h.read.is_empty()),
                _ => panic!("a connection with nothing sent yet goes to hyper"),
            }
            sent(&mut conn);
        }
        assert_eq!(conn.budget.vain, VAIN_WAITS);
        conn.budget.since = Instant::now();
        assert!(!conn.budget.may_wait());
        let (server, _client) = UnixStream::pair().unwrap();
        assert!(matches!(
            conn.serve(server, peer, |_| unreachable!()),
            Outcome::HandOff(_)
        ));
        assert_eq!(conn.budget.vain, VAIN_WAITS, "no wait, so none in vain");
        sent(&mut conn);
        conn.budget.since -= WAIT_WINDOW;
        assert!(conn.budget.may_wait(), "a new window");
        conn.budget.ran_out();
        assert_eq!(conn.budget.vain, 1);
    }
}
