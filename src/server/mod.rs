//! The Unix-socket HTTP API (DESIGN.md §4): hyper over tokio's `UnixListener`, peer
//! credentials checked per profile before anything is served.

pub mod container;
mod socket;

use std::convert::Infallible;
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

pub use socket::{bind_socket, BindError, BoundSocket};

use crate::broker::Broker;

/// Who may read what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The daemon's own uid: it and root may use status and admin calls.
    pub daemon_uid: u32,
    /// Per profile: the uids and gids that may read its keys.
    pub profiles: std::collections::HashMap<String, (Vec<u32>, Vec<u32>)>,
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
}

/// A listening endpoint: the Unix socket, or the loopback container endpoint.
#[derive(Debug)]
pub enum Listener {
    /// The Unix-socket API; peers are identified by SO_PEERCRED.
    Socket(UnixListener),
    /// The container-credentials endpoint; peers present a token.
    Container(TcpListener),
}

/// Which API a connection speaks, and who is on the other end.
#[derive(Clone, Copy, Debug)]
enum Route {
    Socket(Peer),
    Container,
}

/// Accepts one connection. `Ok(None)`: the connection was refused (no peer credentials).
async fn accept(
    listener: &Listener,
) -> std::io::Result<Option<(Either<UnixStream, TcpStream>, Route)>> {
    match listener {
        Listener::Socket(l) => {
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
        Listener::Container(l) => {
            let (stream, _) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(Some((Either::Right(stream), Route::Container)))
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
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut text = body.to_string();
    text.push('\n');
    json_response(status, Bytes::from(text))
}

/// Answers one request from `peer`.
pub async fn handle(app: &App, peer: Peer, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} is not supported; use GET", req.method()),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let path = req.uri().path();
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
        "/v1/status" => {
            if !app.access.load().is_admin(peer) {
                return forbidden(peer, "status is for root and the daemon's user");
            }
            json_response(StatusCode::OK, status_body(app))
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such endpoint {path}; try /v1/credentials/PROFILE"),
        ),
    }
}

fn forbidden(peer: Peer, why: &str) -> Response<Body> {
    error_response(
        StatusCode::FORBIDDEN,
        "forbidden",
        &format!("uid {} (gid {}) is not allowed: {why}", peer.uid, peer.gid),
    )
}

async fn credentials(app: &App, peer: Peer, profile: &str) -> Response<Body> {
    if !app.access.load().may_read(profile, peer) {
        if app.broker.slot(profile).is_none() {
            return error_response(
                StatusCode::NOT_FOUND,
                "unknown_profile",
                &format!("no profile named {profile:?} in the keybroker config"),
            );
        }
        return forbidden(
            peer,
            &format!("profile {profile} allows it neither by allow_uids nor by allow_groups"),
        );
    }
    if let Some(body) = app.broker.ready_body(profile) {
        return json_response(StatusCode::OK, body);
    }
    let Some(slot) = app.broker.slot(profile) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_profile",
            &format!("no profile named {profile:?} in the keybroker config"),
        );
    };
    match slot.get().await {
        Ok(key) => json_response(StatusCode::OK, key.process_json.clone()),
        Err(u) => {
            let mut resp =
                error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &u.message);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(u.retry_after.as_secs().max(1)),
            );
            resp
        }
    }
}

fn status_body(app: &App) -> Bytes {
    let profiles: Vec<serde_json::Value> = app
        .broker
        .status()
        .into_iter()
        .map(|(name, provider, status)| {
            let mut v = serde_json::to_value(&status).expect("status serializes");
            if let Some(file) = app.container.as_ref().and_then(|t| t.file(&name)) {
                v["container_token_file"] = file.display().to_string().into();
            }
            v["name"] = name.into();
            v["provider"] = provider.as_str().into();
            v
        })
        .collect();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "profiles": profiles,
    });
    Bytes::from(body.to_string() + "\n")
}

/// How long a stopping server waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until `stop` fires, then stops accepting and drains open connections for
/// at most `drain`.
pub async fn serve(listener: Listener, app: Arc<App>, stop: CancellationToken, drain: Duration) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .keep_alive(true);
    loop {
        let (stream, route) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(Some(conn)) => conn,
                Ok(None) => continue,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = Arc::clone(&app);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = Arc::clone(&app);
            async move {
                let mut resp = match (route, &app.container) {
                    (Route::Socket(peer), _) => handle(&app, peer, &req).await,
                    (Route::Container, Some(tokens)) => container::handle(&app, tokens, &req).await,
                    (Route::Container, None) => {
                        unreachable!("the container listener exists only with its tokens")
                    }
                };
                if req.method() == Method::HEAD {
                    *resp.body_mut() = Full::new(Bytes::new());
                }
                tracing::debug!(method = %req.method(), path = req.uri().path(), status = resp.status().as_u16(), ?route, "request");
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {}s; closing them",
            drain.as_secs()
        );
    }
}
