//! The HTTP API on the Unix socket and the container endpoint: hyper on tokio, one accept loop
//! per listener. Peer credentials (SO_PEERCRED) are read at accept, each connection is counted
//! and bounded ([`conn`]), and access is checked per profile before anything is served.

mod admin;
mod conn;
pub mod container;
mod report;
mod socket;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use container::ContainerTokens;

pub use admin::ADMIN_WAIT;
pub use conn::Limits;
pub use socket::{bind_socket, BindError, BoundSocket};

use crate::api::{ClientProfile, ContainerAccess, ErrorAnswer, ErrorBody, ProfilesAnswer};
use crate::broker::Broker;

/// Who may read what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The daemon's own uid: it and root may use status and admin calls.
    pub daemon_uid: u32,
    /// Per profile: the uids and gids that may read its keys.
    pub profiles: std::collections::HashMap<String, (Vec<u32>, Vec<u32>)>,
    /// Per profile: what `aws-config` and `exec` need (`GET /v1/profiles`), the container
    /// endpoint left out.
    pub clients: std::collections::HashMap<String, ClientProfile>,
    /// The container endpoint's URL for credentials, without the profile name, when it is on.
    pub container_url: Option<String>,
}

/// A connected peer, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Peer uid.
    pub uid: u32,
    /// Peer primary gid.
    pub gid: u32,
}

impl Access {
    fn is_admin(&self, peer: Peer) -> bool {
        peer.uid == 0 || peer.uid == self.daemon_uid
    }

    /// Whether `peer` may read `profile`: its uid is allowed, or one of its groups (the
    /// primary gid, then the supplementary groups of its uid) is.
    fn may_read(&self, profile: &str, peer: Peer) -> bool {
        let Some((uids, gids)) = self.profiles.get(profile) else {
            return false;
        };
        if uids.contains(&peer.uid) || gids.contains(&peer.gid) {
            return true;
        }
        !gids.is_empty()
            && crate::users::groups_of(peer.uid, peer.gid)
                .iter()
                .any(|g| gids.contains(g))
    }
}

/// What the server needs to answer requests.
pub struct App {
    /// The key slots.
    pub broker: Arc<Broker>,
    /// Who may read what (replaced whole by a reload).
    pub access: arc_swap::ArcSwap<Access>,
    /// The container endpoint's tokens, when it is enabled.
    pub container: Option<ContainerTokens>,
    /// Answers given, by status, for `/metrics`.
    pub requests: crate::metrics::Requests,
    /// The open connections, counted against the open-file limit.
    pub limits: Arc<Limits>,
    /// Set when the servers stop accepting: answers from then on close their connection.
    pub stopping: AtomicBool,
}

impl App {
    /// The pre-rendered body of `profile`'s key, when it is ready and `peer` may read it: the
    /// answer that needs no wait.
    fn readable_body(&self, profile: &str, peer: Peer) -> Option<Bytes> {
        let body = self.broker.ready_body(profile)?;
        self.access.load().may_read(profile, peer).then_some(body)
    }

    /// Completes an answer to `method path`: the last one on its connection once the server
    /// is stopping; counted for `/metrics`, and logged at debug level.
    fn finish(
        &self,
        mut resp: Response<Body>,
        route: Route,
        method: &Method,
        path: &str,
    ) -> Response<Body> {
        if self.stopping.load(Ordering::Relaxed) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = resp.status().as_u16();
        self.requests.record(status);
        tracing::debug!(%method, path, status, ?route, "request");
        resp
    }
}

/// A listening endpoint: the Unix socket, or the loopback container endpoint.
#[derive(Debug)]
pub enum Listener {
    /// The Unix-socket API; peers are identified by SO_PEERCRED.
    Socket(std::os::unix::net::UnixListener),
    /// The container-credentials endpoint; peers present a token.
    Container(TcpListener),
}

/// Which API a connection speaks, and who is on the other end.
#[derive(Clone, Copy, Debug)]
enum Route {
    Socket(Peer),
    Container,
}

/// A listener, ready for the runtime.
enum Accepting {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// An accepted connection, and whom it is charged to.
type Stream = Either<UnixStream, TcpStream>;

impl Accepting {
    fn new(listener: Listener) -> std::io::Result<Accepting> {
        Ok(match listener {
            Listener::Socket(l) => {
                l.set_nonblocking(true)?;
                Accepting::Unix(UnixListener::from_std(l)?)
            }
            Listener::Container(l) => Accepting::Tcp(l),
        })
    }

    /// The next connection, with its route. `Ok(None)`: one that could not be identified,
    /// already closed.
    async fn next(&self) -> std::io::Result<Option<(Stream, Route)>> {
        match self {
            Accepting::Unix(l) => {
                let (stream, _) = l.accept().await?;
                match stream.peer_cred() {
                    Ok(c) => Ok(Some((
                        Either::Left(stream),
                        Route::Socket(Peer {
                            uid: c.uid(),
                            gid: c.gid(),
                        }),
                    ))),
                    Err(e) => {
                        tracing::warn!(error = %e, "no peer credentials; closing the connection");
                        Ok(None)
                    }
                }
            }
            Accepting::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Some((Either::Right(stream), Route::Container)))
            }
        }
    }
}

type Body = Full<Bytes>;

/// A JSON answer with `Cache-Control: no-store`.
pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `{"error": {"code": ..., "message": ...}}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = ErrorAnswer {
        error: ErrorBody {
            code: code.to_string(),
            message: message.to_string(),
        },
    };
    json_response(status, json_body(&body))
}

/// Answers one request from `peer`.
pub async fn handle(app: &App, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let method = req.method();
    let readable = method == Method::GET || method == Method::HEAD;
    let path = req.uri().path();
    if let Some(action) = path.strip_prefix("/v1/admin/") {
        if method != Method::POST {
            return not_allowed(method, "POST");
        }
        let action = action.to_string();
        return admin::admin(app, peer, &action, req).await;
    }
    if !readable {
        return not_allowed(method, "GET, HEAD");
    }
    if let Some(profile) = path.strip_prefix("/v1/credentials/") {
        return credentials(app, peer, profile).await;
    }
    match path {
        "/healthz" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        "/readyz" => report::readiness(app),
        "/v1/profiles" => json_ok(&profiles(app, peer)),
        "/v1/status" => {
            if !app.access.load().is_admin(peer) {
                return forbidden(peer, "status is for root and the daemon's user");
            }
            let query = req.uri().query().unwrap_or("");
            let only: Option<Vec<&str>> = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("profiles="))
                .map(|list| list.split(',').filter(|n| !n.is_empty()).collect());
            match report::status_body(app, only.as_deref()) {
                Ok(body) => json_response(StatusCode::OK, body),
                Err(unknown) => error_response(
                    StatusCode::NOT_FOUND,
                    "unknown_profile",
                    &format!("no such profile: {}", unknown.join(", ")),
                ),
            }
        }
        "/metrics" => {
            if !app.access.load().is_admin(peer) {
                return forbidden(peer, "metrics are for root and the daemon's user");
            }
            let mut resp = Response::new(Full::new(Bytes::from(report::metrics_body(app))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such endpoint {path}; try /v1/credentials/PROFILE"),
        ),
    }
}

/// The profiles `peer` may read, by name, each with its container endpoint when the daemon
/// serves one for it.
fn profiles(app: &App, peer: Peer) -> ProfilesAnswer {
    let access = app.access.load();
    let mut profiles: Vec<ClientProfile> = access
        .clients
        .values()
        .filter(|p| access.may_read(&p.name, peer))
        .map(|p| {
            let mut p = p.clone();
            let file = app.container.as_ref().and_then(|c| c.file(&p.name));
            if let (Some(url), Some(token_file)) = (&access.container_url, file) {
                p.container = Some(ContainerAccess {
                    url: format!("{url}{}", p.name),
                    token_file,
                });
            }
            p
        })
        .collect();
    profiles.sort_by(|a, b| a.name.cmp(&b.name));
    ProfilesAnswer { profiles }
}

fn not_allowed(method: &Method, allow: &'static str) -> Response<Body> {
    let mut resp = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not supported here; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// `value` as the JSON text of an answer, one line.
fn json_body(value: &impl serde::Serialize) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("the API's types serialize");
    text.push(b'\n');
    Bytes::from(text)
}

fn json_ok(value: &impl serde::Serialize) -> Response<Body> {
    json_response(StatusCode::OK, json_body(value))
}

fn unknown_profile(profile: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown_profile",
        &format!("no profile named {profile:?} in the keybroker config"),
    )
}

fn forbidden(peer: Peer, why: &str) -> Response<Body> {
    error_response(
        StatusCode::FORBIDDEN,
        "forbidden",
        &format!("uid {} (gid {}) is not allowed: {why}", peer.uid, peer.gid),
    )
}

/// The hot path: `GET` (or `HEAD`) `/v1/credentials/{profile}` for a reader of a profile whose
/// key is ready, answered with the key's pre-rendered body. `None`: [`handle`] decides (and
/// checks access itself, so a profile that is not ready costs no second check).
fn ready_answer(app: &App, peer: Peer, req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let profile = req.uri().path().strip_prefix("/v1/credentials/")?;
    let body = app.readable_body(profile, peer)?;
    Some(json_response(StatusCode::OK, body))
}

async fn credentials(app: &App, peer: Peer, profile: &str) -> Response<Body> {
    if !app.access.load().may_read(profile, peer) {
        if app.broker.slot(profile).is_none() {
            return unknown_profile(profile);
        }
        return forbidden(
            peer,
            &format!("profile {profile} allows it neither by allow_uids nor by allow_groups"),
        );
    }
    // `get` answers a key that became ready since `ready_answer` looked, without waiting.
    let Some(slot) = app.broker.slot(profile) else {
        return unknown_profile(profile);
    };
    key_answer(&slot, Shape::Process).await
}

/// The JSON a listener serves keys and errors in.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The socket: `credential_process` JSON; errors `{"error": {"code", "message"}}`.
    Process,
    /// The container endpoint: the SDKs' container JSON; errors `{"code", "message"}`.
    Container,
}

/// `slot`'s key in `shape`, once a mint under way (or started now) has one; else 503 with
/// `Retry-After`, in the same shape. Both listeners answer with this.
async fn key_answer(slot: &crate::broker::Slot, shape: Shape) -> Response<Body> {
    let unavailable = match slot.get().await {
        Ok(key) => {
            let body = match shape {
                Shape::Process => Some(key.process_json.clone()),
                Shape::Container => crate::credentials::container_from_process(&key.process_json),
            };
            return match body {
                Some(body) => json_response(StatusCode::OK, body),
                None => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the key's answer could not be rendered",
                ),
            };
        }
        Err(u) => u,
    };
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let mut resp = match shape {
        Shape::Process => error_response(status, "unavailable", &unavailable.message),
        Shape::Container => {
            container::sdk_error(status, "ServiceUnavailable", &unavailable.message)
        }
    };
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(unavailable.retry_after.as_secs().max(1)),
    );
    resp
}

/// How long a stopping server waits for the first request of a connection it has just accepted.
const FIRST_REQUEST_AT_STOP: Duration = Duration::from_millis(500);

/// How long a stopping server waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving `listener` (registering it with the runtime here, so that a failure is the
/// caller's to report). The future serves until `stop` fires, then stops accepting, answers the
/// requests under way and the ones already sent on open connections, and waits at most `drain`
/// for them.
pub fn serve(
    listener: Listener,
    app: Arc<App>,
    stop: CancellationToken,
    drain: Duration,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listener = Accepting::new(listener)?;
    Ok(run(listener, app, stop, drain))
}

async fn run(listener: Accepting, app: Arc<App>, stop: CancellationToken, drain: Duration) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(conn::HEADER_TIMEOUT)
        .max_buf_size(conn::MAX_BUFFER)
        .writev(false)
        .keep_alive(true);
    let http = Arc::new(http);
    let open = tokio_util::task::TaskTracker::new();
    // Waited on across the loop: made once, not per connection.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let (stream, route) = tokio::select! {
            biased;
            _ = &mut stopped => {
                app.stopping.store(true, Ordering::Relaxed);
                break;
            }
            accepted = listener.next() => match accepted {
                Ok(Some(conn)) => conn,
                Ok(None) => continue,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    app.limits.accept_failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let holder = match route {
            Route::Socket(peer) => conn::Holder::Uid(peer.uid),
            Route::Container => conn::Holder::Container,
        };
        let Some(permit) = app.limits.admit(holder) else {
            continue;
        };
        let io = TokioIo::new(conn::Bounded::new(stream, permit));
        open.spawn(connection(
            Arc::clone(&http),
            io,
            Arc::clone(&app),
            route,
            stop.clone(),
        ));
    }
    open.close();
    if tokio::time::timeout(drain, open.wait()).await.is_err() {
        // What is left ends with its peer's next answer (`Connection: close`), or by the
        // header and write timeouts, or with the process.
        tracing::warn!(
            "connections still open after {}s; no longer waiting for them",
            drain.as_secs()
        );
    }
}

/// Serves one connection until it ends or, once `stop` fires, until the request it is
/// answering (or the one its peer has already sent) is answered.
async fn connection(
    http: Arc<hyper::server::conn::http1::Builder>,
    io: TokioIo<conn::Bounded<Stream>>,
    app: Arc<App>,
    route: Route,
    stop: CancellationToken,
) {
    let asked = Arc::new(AtomicBool::new(false));
    let conn = http.serve_connection(io, service(&app, route, &asked));
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stop.cancelled() => {
            // hyper closes an idle connection at once when told to shut down, and a new one
            // is idle until its request has been read: one that has not been asked anything
            // yet gets a moment for its request to arrive, and is answered with
            // `Connection: close`.
            let first = async {
                if asked.load(Ordering::Relaxed) {
                    return None;
                }
                tokio::time::timeout(FIRST_REQUEST_AT_STOP, conn.as_mut()).await.ok()
            };
            match first.await {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// hyper's service for a connection on `route`. `asked` is set at its first request.
fn service(
    app: &Arc<App>,
    route: Route,
    asked: &Arc<AtomicBool>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
       + 'static {
    let (app, asked) = (Arc::clone(app), Arc::clone(asked));
    hyper::service::service_fn(move |req: Request<Incoming>| {
        asked.store(true, Ordering::Relaxed);
        // The hot path: a ready key, answered from its pre-rendered bytes with no future of
        // its own.
        if let Route::Socket(peer) = route {
            if let Some(resp) = ready_answer(&app, peer, &req) {
                let resp = app.finish(resp, route, req.method(), req.uri().path());
                return Either::Left(std::future::ready(Ok(resp)));
            }
        }
        // Everything else (a mint to wait for, the admin calls) is a large future: boxed, so
        // that the future hyper keeps per connection stays small.
        let app = Arc::clone(&app);
        Either::Right(Box::pin(async move {
            // The socket's handler takes the request: what the log line needs is kept first.
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let resp = match (route, &app.container) {
                (Route::Socket(peer), _) => handle(&app, peer, req).await,
                (Route::Container, Some(tokens)) => container::handle(&app, tokens, &req).await,
                (Route::Container, None) => {
                    unreachable!("the container listener exists only with its tokens")
                }
            };
            Ok::<_, Infallible>(app.finish(resp, route, &method, &path))
        }))
    })
}
