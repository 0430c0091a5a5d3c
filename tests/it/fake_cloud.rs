//! A fake CoreWeave object-storage API (`reference/providers.md` §1): checks the bearer token,
//! keeps every key it minted with its expiry and revocation, counts calls, and injects
//! latency, errors, hangs and malformed answers. Reachable over loopback HTTP (for the real
//! binary) or in process (for paused-time tests).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keybroker::clock::Clock;
use keybroker::provider::http::InProcessHandler;

use crate::moto::Moto;
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use time::OffsetDateTime;

/// A key the fake minted.
#[derive(Clone, Debug)]
pub struct FakeKey {
    pub id: String,
    pub secret: String,
    pub tag: Option<String>,
    pub created: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// The IAM user holding this key in moto, when the fake mirrors into moto.
    pub iam_user: Option<String>,
}

/// Faults to inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer creates with this status (and body) instead of minting.
    pub create_status: Option<(u16, String)>,
    /// Retry-After sent with `create_status`.
    pub retry_after: Option<u64>,
    /// Delay before answering a create.
    pub create_latency: Duration,
    /// Never answer revokes.
    pub hang_revokes: bool,
    /// Answer creates with 200 and an unparseable body (after minting nothing).
    pub malformed_create: bool,
    /// Mint normally but report this `expiry` (e.g. a "never expires" sentinel).
    pub expiry_override: Option<String>,
}

#[derive(Default)]
struct State {
    keys: BTreeMap<String, FakeKey>,
    calls: BTreeMap<&'static str, u64>,
    faults: Faults,
    /// Highest number of simultaneously live keys seen at any create.
    peak_live: usize,
}

pub struct FakeCloud {
    clock: Clock,
    token: String,
    state: Mutex<State>,
    /// Where keys really live, for the end-to-end tests: moto's IAM.
    mirror: Option<Arc<Moto>>,
}

impl FakeCloud {
    pub fn new(clock: Clock) -> Arc<Self> {
        Self::build(clock, None)
    }

    /// A fake whose keys are real keys in moto: minted there, deleted there on revoke or expiry
    /// (moto never expires a key by itself, so a reaper deletes expired ones). Real time only.
    pub fn mirrored(moto: Arc<Moto>) -> Arc<Self> {
        let fake = Self::build(Clock::System, Some(moto));
        let weak = Arc::downgrade(&fake);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(fake) = weak.upgrade() else { return };
                fake.reap_expired().await;
            }
        });
        fake
    }

    fn build(clock: Clock, mirror: Option<Arc<Moto>>) -> Arc<Self> {
        Arc::new(FakeCloud {
            clock,
            token: format!(
                "cwtoken-{}",
                Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
            ),
            state: Mutex::new(State::default()),
            mirror,
        })
    }

    /// Deletes expired keys from moto, as the real provider's expiry would.
    async fn reap_expired(&self) {
        let now = self.clock.now();
        let expired: Vec<(String, String)> = {
            let mut st = self.lock();
            st.keys
                .values_mut()
                .filter(|k| k.revoked_at.is_none() && k.expires_at <= now)
                .filter_map(|k| k.iam_user.take().map(|u| (u, k.id.clone())))
                .collect()
        };
        for (user, id) in expired {
            self.unmirror(user, id).await;
        }
    }

    async fn unmirror(&self, user: String, id: String) {
        if let Some(moto) = self.mirror.clone() {
            tokio::task::spawn_blocking(move || moto.delete_key(&user, &id))
                .await
                .unwrap();
        }
    }

    /// The API token the fake accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn calls(&self, what: &str) -> u64 {
        self.lock().calls.get(what).copied().unwrap_or(0)
    }

    /// Keys not revoked and not expired now.
    pub fn live(&self) -> Vec<FakeKey> {
        let now = self.clock.now();
        self.lock()
            .keys
            .values()
            .filter(|k| k.revoked_at.is_none() && k.expires_at > now)
            .cloned()
            .collect()
    }

    pub fn peak_live(&self) -> usize {
        self.lock().peak_live
    }

    /// Every key ever minted, oldest first.
    pub fn keys(&self) -> Vec<FakeKey> {
        let mut keys: Vec<FakeKey> = self.lock().keys.values().cloned().collect();
        keys.sort_by_key(|k| k.created);
        keys
    }

    pub fn key(&self, id: &str) -> Option<FakeKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Every secret the fake has handed out or accepts: minted secrets and the API token.
    pub fn secrets(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .lock()
            .keys
            .values()
            .map(|k| k.secret.clone())
            .collect();
        s.push(self.token.clone());
        s
    }

    /// The router, callable without a socket.
    pub fn handler(self: &Arc<Self>) -> InProcessHandler {
        let me = Arc::clone(self);
        Arc::new(move |req: Request<Bytes>| {
            let me = Arc::clone(&me);
            Box::pin(async move { me.route(req).await })
        })
    }

    /// Serves the API over plain HTTP on 127.0.0.1 and returns its base URL.
    pub async fn serve(self: &Arc<Self>) -> String {
        self.listen(None).await
    }

    /// Serves the API over HTTPS on 127.0.0.1 with a fresh self-signed certificate for
    /// `localhost`; returns the base URL and the certificate's PEM (the client's `ca_file`).
    pub async fn serve_tls(self: &Arc<Self>) -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let url = self.listen(Some(acceptor)).await;
        (url.replace("http://127.0.0.1", "https://localhost"), pem)
    }

    async fn listen(self: &Arc<Self>, tls: Option<tokio_rustls::TlsAcceptor>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let me = Arc::clone(&me);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = Arc::clone(&me);
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let resp = me.route(Request::from_parts(parts, body)).await;
                                Ok::<_, Infallible>(resp.map(Full::new))
                            }
                        });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    fn count(&self, what: &'static str) {
        *self.lock().calls.entry(what).or_default() += 1;
    }

    async fn route(&self, req: Request<Bytes>) -> Response<Bytes> {
        let auth_ok = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", self.token));
        if !auth_ok {
            self.count("unauthorized");
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"code": 16, "message": "unauthenticated: invalid API access token"}),
            );
        }
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/cwobject/access-key") => self.create(body).await,
            (&Method::POST, "/v1/cwobject/revoke-access-key/access-key") => self.revoke(body).await,
            (&Method::GET, "/v1/cwobject/access-key") => {
                self.count("list");
                let infos: Vec<Value> = self
                    .live()
                    .iter()
                    .map(|k| json!({"accessKeyId": k.id, "status": "ACTIVE", "attributes": {"keybroker-lease": k.tag}, "expiry": rfc3339(k.expires_at)}))
                    .collect();
                reply(StatusCode::OK, json!({ "accessKeyInfos": infos }))
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"code": 5, "message": "no such method"}),
            ),
        }
    }

    async fn create(&self, body: Value) -> Response<Bytes> {
        self.count("create");
        let faults = self.faults();
        if !faults.create_latency.is_zero() {
            tokio::time::sleep(faults.create_latency).await;
        }
        if let Some((status, message)) = faults.create_status {
            let mut resp = reply(
                StatusCode::from_u16(status).unwrap(),
                json!({"code": 14, "message": message}),
            );
            if let Some(secs) = faults.retry_after {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, secs.into());
            }
            return resp;
        }
        if faults.malformed_create {
            return Response::builder()
                .status(200)
                .body(Bytes::from_static(b"{\"accessKeyId\": "))
                .unwrap();
        }
        let Some(seconds) = body["durationSeconds"].as_u64() else {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"code": 3, "message": "duration required"}),
            );
        };
        if seconds == 0 || seconds > 43_200 {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"code": 3, "message": "durationSeconds must be in 1..43200 for this test fake"}),
            );
        }
        let (id, secret, iam_user) = match self.mirror.clone() {
            Some(moto) => {
                let user = format!(
                    "kb-{}",
                    Alphanumeric.sample_string(&mut rand::thread_rng(), 12)
                );
                let u = user.clone();
                let (id, secret) = tokio::task::spawn_blocking(move || moto.create_key(&u))
                    .await
                    .unwrap();
                (id, secret, Some(user))
            }
            None => {
                let mut rng = rand::thread_rng();
                (
                    format!(
                        "CW{}",
                        Alphanumeric.sample_string(&mut rng, 14).to_uppercase()
                    ),
                    format!("cwo{}", Alphanumeric.sample_string(&mut rng, 40)),
                    None,
                )
            }
        };
        let now = self.clock.now();
        let key = FakeKey {
            id,
            secret,
            iam_user,
            tag: body["attributes"]["keybroker-lease"]
                .as_str()
                .map(str::to_string),
            created: now,
            expires_at: now + Duration::from_secs(seconds),
            revoked_at: None,
        };
        let answer = json!({
            "accessKeyId": key.id,
            "secretKey": key.secret,
            "principalName": "coreweave/fake-token-id",
            "expiry": faults.expiry_override.clone().unwrap_or_else(|| rfc3339(key.expires_at)),
            "attributes": body["attributes"],
        });
        {
            let mut st = self.lock();
            st.keys.insert(key.id.clone(), key);
            let live = st
                .keys
                .values()
                .filter(|k| k.revoked_at.is_none() && k.expires_at > now)
                .count();
            st.peak_live = st.peak_live.max(live);
        }
        reply(StatusCode::OK, answer)
    }

    async fn revoke(&self, body: Value) -> Response<Bytes> {
        self.count("revoke");
        if self.faults().hang_revokes {
            std::future::pending::<()>().await;
        }
        let Some(id) = body["accessKey"].as_str() else {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"code": 3, "message": "accessKey required"}),
            );
        };
        let now = self.clock.now();
        let mirrored = {
            let mut st = self.lock();
            match st.keys.get_mut(id) {
                Some(k) if k.revoked_at.is_none() => {
                    k.revoked_at = Some(now);
                    k.iam_user.take()
                }
                _ => {
                    return reply(
                        StatusCode::NOT_FOUND,
                        json!({"code": 5, "message": "access key not found"}),
                    )
                }
            }
        };
        if let Some(user) = mirrored {
            self.unmirror(user, id.to_string()).await;
        }
        reply(StatusCode::OK, json!({}))
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn reply(status: StatusCode, body: Value) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap()
}
