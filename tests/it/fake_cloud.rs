//! A fake cloud that speaks the three providers' object-storage key APIs
//! (as their public API references describe them) on one router, told apart by path:
//! - CoreWeave `/v1/cwobject/...`: bearer token checked; the Workload Identity exchanges
//!   (`temporary-credentials/oidc` and `/saml`) take no token: a JWT's issuer, audience and
//!   expiry are checked (not its signature), a SAML assertion's configuration, and the key
//!   belongs to `role/<iss>:<sub>` or `saml/<role>`;
//! - Crusoe `/v1alpha5/organizations/...`: v1.0 signatures verified (by this file's own
//!   implementation, not the provider's), organizations, the two-keys-per-user limit, and
//!   third-party keys that count against it;
//! - GleSYS `/objectstorage/...`: Basic auth, the `response.status` envelope, one instance.
//!
//! It keeps every key it minted with its expiry and revocation, counts calls, and injects
//! latency, errors, hangs and malformed answers. Reachable over loopback HTTP (for the real
//! binary) or in process (for paused-time tests). Mirrored into moto, its keys are real S3 keys.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keybroker::clock::Clock;
use keybroker::credentials::Secret;
use keybroker::provider::coreweave::{wif::Exchange, CoreWeave};
use keybroker::provider::http::{HttpClient, InProcessHandler};
use keybroker::provider::{crusoe::Crusoe, glesys::Glesys, Provider};
use rand::distributions::{Alphanumeric, DistString};
use rand::RngCore;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::harness::{Daemon, Env};
use crate::moto::Moto;

/// The providers the fake speaks, by config name.
pub const PROVIDERS: [&str; 3] = ["coreweave", "crusoe", "glesys"];

const CRUSOE_LIMIT: usize = 2;
pub const GLESYS_PROJECT: &str = "CL12345";
pub const GLESYS_INSTANCE: &str = "os-ab123";

/// The principal of every key the fake's CoreWeave token mints.
pub const COREWEAVE_PRINCIPAL: &str = "coreweave/fake-token-id";

/// The organization, issuer, audience and SAML configuration the fake's Workload Identity
/// Federation accepts.
pub const WIF_ORG: &str = "org-fake";
pub const WIF_ISSUER: &str = "https://oidc.fake.test/id/cluster-1";
pub const WIF_AUDIENCE: &str = "https://coreweave.com/iam";
pub const WIF_CONFIG: &str = "wif-saml-fake";

/// A key the fake minted (or was given as a third party's).
#[derive(Clone, Debug)]
pub struct FakeKey {
    pub provider: &'static str,
    pub id: String,
    /// GleSYS deletes by credential id; the others by key id.
    pub handle: String,
    pub secret: String,
    pub tag: Option<String>,
    pub created: OffsetDateTime,
    /// `None`: never expires (GleSYS, or a Crusoe key made without `expire_at`).
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    /// Made by the test as someone else's key, not through the API.
    pub foreign: bool,
    /// The IAM user holding this key in moto, when the fake mirrors into moto.
    pub iam_user: Option<String>,
    /// Who owns it (CoreWeave).
    pub principal: Option<String>,
}

impl FakeKey {
    fn live_at(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// Faults to inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer creates with this status (and message) instead of minting.
    pub create_status: Option<(u16, String)>,
    /// Retry-After sent with `create_status`.
    pub retry_after: Option<u64>,
    /// Delay before answering a create.
    pub create_latency: Duration,
    /// Never answer revokes.
    pub hang_revokes: bool,
    /// Answer creates with 200 and an unparseable body (after minting nothing).
    pub malformed_create: bool,
    /// Mint normally but report this expiry (e.g. a "never expires" sentinel).
    pub expiry_override: Option<String>,
    /// Make the key of this many creates, then drop the answer (the connection closes; in
    /// process, no answer ever comes).
    pub drop_create_responses: usize,
    /// Delay before answering a revoke (the key is revoked on arrival).
    pub revoke_latency: Duration,
    /// Answer revokes as failed (500) without revoking.
    pub fail_revokes: bool,
    /// Answer revokes with this status and message, without revoking.
    pub revoke_status: Option<(u16, String)>,
    /// Make the key of a create, then answer with this status instead of the key.
    pub create_then_status: Option<u16>,
    /// Answer every listing with 503.
    pub fail_lists: bool,
    /// With `create_latency`: the key lands at the end of the delay, not on arrival, and it
    /// lands even if the caller gave up on the answer (the provider goes on with the create).
    pub lands_late: bool,
    /// A rate limit on creates, per second: a token bucket holding one second of them. A
    /// create beyond it gets 429 with `Retry-After: 1` at once (counted as `throttled`).
    pub create_rate: Option<u32>,
}

/// The status the router uses to mean "drop this answer".
const DROP: u16 = 599;

#[derive(Default)]
struct State {
    keys: BTreeMap<String, FakeKey>,
    calls: BTreeMap<&'static str, u64>,
    faults: Faults,
    /// Highest number of simultaneously live keys per provider, seen at each create.
    peak_live: BTreeMap<&'static str, usize>,
    /// Organizations the Crusoe key sees besides its own.
    extra_orgs: usize,
    /// OIDC subjects no access policy allows to mint.
    denied_subjects: Vec<String>,
    /// `create_rate`'s bucket: tokens left, and when it was last filled.
    bucket: Option<(f64, std::time::Instant)>,
    /// Creates being answered now, and the most there have been at once.
    creates_in_flight: usize,
    peak_creates_in_flight: usize,
}

pub struct FakeCloud {
    clock: Clock,
    coreweave_token: String,
    crusoe_key_id: String,
    crusoe_secret: String,
    crusoe_org: String,
    glesys_api_key: String,
    state: Mutex<State>,
    /// Where keys really live, for the end-to-end tests: moto's IAM.
    mirror: Option<Arc<Moto>>,
    /// This fake, for work that goes on after a caller gave up (a create that lands late).
    me: std::sync::Weak<FakeCloud>,
}

fn random(n: usize) -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), n)
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
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
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Arc::new_cyclic(|me| FakeCloud {
            clock,
            coreweave_token: format!("cwtoken-{}", random(24)),
            crusoe_key_id: format!("CRUSOEKEY{}", random(11).to_uppercase()),
            crusoe_secret: URL_SAFE_NO_PAD.encode(secret),
            crusoe_org: uuid(),
            glesys_api_key: format!("glesys-{}", random(32)),
            state: Mutex::new(State::default()),
            mirror,
            me: me.clone(),
        })
    }

    /// The CoreWeave API token the fake accepts.
    pub fn token(&self) -> &str {
        &self.coreweave_token
    }

    pub fn crusoe_org(&self) -> &str {
        &self.crusoe_org
    }

    pub fn crusoe_key_id(&self) -> &str {
        &self.crusoe_key_id
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

    /// Makes the Crusoe key see `n` more organizations than its own.
    pub fn set_extra_orgs(&self, n: usize) {
        self.lock().extra_orgs = n;
    }

    pub fn calls(&self, what: &str) -> u64 {
        self.lock().calls.get(what).copied().unwrap_or(0)
    }

    /// Every request the fake answered, however it answered.
    pub fn total_calls(&self) -> u64 {
        self.calls("request")
    }

    /// Keys not revoked and not expired now, third parties' excluded.
    pub fn live(&self) -> Vec<FakeKey> {
        let now = self.clock.now();
        self.lock()
            .keys
            .values()
            .filter(|k| !k.foreign && k.live_at(now))
            .cloned()
            .collect()
    }

    /// The most keys of one provider alive at once (third parties' included), seen at creates.
    pub fn peak_live(&self) -> usize {
        self.lock().peak_live.values().copied().max().unwrap_or(0)
    }

    /// Every key ever minted through the API, oldest first.
    pub fn keys(&self) -> Vec<FakeKey> {
        let mut keys: Vec<FakeKey> = self
            .lock()
            .keys
            .values()
            .filter(|k| !k.foreign)
            .cloned()
            .collect();
        keys.sort_by_key(|k| k.created);
        keys
    }

    pub fn key(&self, id: &str) -> Option<FakeKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Every secret the fake has handed out or accepts.
    pub fn secrets(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .lock()
            .keys
            .values()
            .map(|k| k.secret.clone())
            .collect();
        s.extend([
            self.coreweave_token.clone(),
            self.crusoe_secret.clone(),
            self.glesys_api_key.clone(),
        ]);
        s
    }

    /// Puts a key into the Crusoe user's budget as if someone else had made it; returns its id.
    pub fn add_crusoe_key(&self, alias: &str, foreign: bool) -> String {
        let now = self.clock.now();
        let id = format!("CKIA{}", random(16).to_uppercase());
        let key = FakeKey {
            provider: "crusoe",
            id: id.clone(),
            handle: id.clone(),
            secret: random(40),
            tag: Some(alias.to_string()),
            created: now - Duration::from_secs(3600),
            expires_at: None,
            revoked_at: None,
            foreign,
            iam_user: None,
            principal: None,
        };
        self.lock().keys.insert(id.clone(), key);
        id
    }

    /// A provider of kind `provider` for this fake's account, answered in process.
    pub fn provider(
        self: &Arc<Self>,
        provider: &str,
        clock: &Clock,
        wrong_secret: bool,
    ) -> Arc<dyn Provider> {
        let http = HttpClient::in_process(self.handler(), Duration::from_secs(10));
        let endpoint = "http://fake.invalid";
        let pick = |right: &str, wrong: &str| {
            if wrong_secret {
                wrong.to_string()
            } else {
                right.to_string()
            }
        };
        match provider {
            "coreweave" => Arc::new(CoreWeave::new(
                http,
                endpoint,
                Secret::new(pick(&self.coreweave_token, "wrong-token")),
                clock.clone(),
            )),
            "crusoe" => Arc::new(Crusoe::new(
                http,
                &format!("{endpoint}/v1alpha5"),
                &self.crusoe_key_id,
                Secret::new(pick(&self.crusoe_secret, "d3Jvbmctc2VjcmV0")),
                None,
                clock.clone(),
            )),
            "glesys" => Arc::new(Glesys::new(
                http,
                endpoint,
                GLESYS_PROJECT,
                Secret::new(pick(&self.glesys_api_key, "wrong-api-key")),
                GLESYS_INSTANCE,
                clock.clone(),
            )),
            other => panic!("the fake does not speak {other}"),
        }
    }

    /// A CoreWeave provider that mints by exchanging the OIDC token in `token_file` (which the
    /// test writes) and revokes with the fake's API token, answered in process.
    pub fn oidc_provider(
        self: &Arc<Self>,
        token_file: &std::path::Path,
        clock: &Clock,
    ) -> Arc<dyn Provider> {
        Arc::new(CoreWeave::federated(
            HttpClient::in_process(self.handler(), Duration::from_secs(10)),
            "http://fake.invalid",
            Some(Exchange::Oidc {
                org_id: WIF_ORG.to_string(),
                token_file: token_file.to_path_buf(),
            }),
            Some(Secret::new(self.coreweave_token.clone())),
            clock.clone(),
        ))
    }

    /// A `[profiles.NAME]` table for `provider` against the fake at `url`, writing the secret
    /// files into `env`. `extra` is appended inside the table.
    pub fn profile_toml(
        &self,
        provider: &str,
        name: &str,
        url: &str,
        env: &Env,
        extra: &str,
    ) -> String {
        let head = format!("[profiles.{name}]\nprovider = \"{provider}\"\n");
        let body = match provider {
            "coreweave" => {
                let f = env.secret_file(&format!("{name}-cw-token"), &self.coreweave_token);
                format!("endpoint = \"{url}\"\ntoken_file = \"{}\"\n", f.display())
            }
            "crusoe" => {
                let f = env.secret_file(&format!("{name}-crusoe-secret"), &self.crusoe_secret);
                format!(
                    "endpoint = \"{url}/v1alpha5\"\naccess_key_id = \"{}\"\nsecret_key_file = \"{}\"\n",
                    self.crusoe_key_id,
                    f.display()
                )
            }
            "glesys" => {
                let f = env.secret_file(&format!("{name}-glesys-key"), &self.glesys_api_key);
                format!(
                    "endpoint = \"{url}\"\nproject = \"{GLESYS_PROJECT}\"\napi_key_file = \"{}\"\ninstance_id = \"{GLESYS_INSTANCE}\"\n",
                    f.display()
                )
            }
            "coreweave-oidc" | "coreweave-saml" => {
                let f = env.secret_file(&format!("{name}-cw-token"), &self.coreweave_token);
                let identity = if provider == "coreweave-oidc" {
                    let token = self.oidc_token(
                        "system:serviceaccount:ml:trainer",
                        self.clock.now() + time::Duration::hours(1),
                    );
                    let file = env.path(&format!("{name}-oidc-token"));
                    std::fs::write(&file, token).unwrap();
                    format!(
                        "auth = \"oidc\"\noidc_token_file = \"{}\"\n",
                        file.display()
                    )
                } else {
                    let file = env.path(&format!("{name}-saml"));
                    std::fs::write(&file, Self::saml_assertion("trainer")).unwrap();
                    format!("auth = \"saml\"\nsaml_assertion_file = \"{}\"\nwif_config_id = \"{WIF_CONFIG}\"\n", file.display())
                };
                return format!(
                    "[profiles.{name}]\nprovider = \"coreweave\"\nendpoint = \"{url}\"\ntoken_file = \"{}\"\norg_id = \"{WIF_ORG}\"\n{identity}{extra}\n",
                    f.display()
                );
            }
            other => panic!("the fake does not speak {other}"),
        };
        format!("{head}{body}{extra}\n")
    }

    /// Deletes expired keys from moto, as the real provider's expiry would.
    async fn reap_expired(&self) {
        let now = self.clock.now();
        let expired: Vec<(String, String)> = {
            let mut st = self.lock();
            st.keys
                .values_mut()
                .filter(|k| k.revoked_at.is_none() && k.expires_at.is_some_and(|e| e <= now))
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

    /// The router, callable without a socket.
    pub fn handler(self: &Arc<Self>) -> InProcessHandler {
        let me = Arc::clone(self);
        Arc::new(move |req: Request<Bytes>| {
            let me = Arc::clone(&me);
            Box::pin(async move {
                let resp = me.route(req).await;
                if resp.status().as_u16() == DROP {
                    // A dropped answer never comes: the caller's timeout ends the wait.
                    std::future::pending::<()>().await;
                }
                resp
            })
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
                                if resp.status().as_u16() == DROP {
                                    // An error from the service closes the connection unanswered.
                                    return Err(std::io::Error::other(
                                        "answer dropped by the fake",
                                    ));
                                }
                                Ok(resp.map(Full::new))
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
        self.count("request");
        let path = req.uri().path().to_string();
        let is_revoke = path.starts_with("/v1/cwobject/revoke-access-key")
            || req.method() == Method::DELETE
            || path.ends_with("/deletecredential");
        let faults = self.faults();
        let refusal = match (&faults.revoke_status, faults.fail_revokes) {
            (Some((status, message)), _) => Some((*status, message.clone())),
            (None, true) => Some((500, "revoke failed (injected)".to_string())),
            (None, false) => None,
        };
        if let Some((status, message)) = refusal.filter(|_| is_revoke) {
            self.count("revoke");
            self.count("revoke_refused");
            let body = json!({"code": status.to_string(), "message": message,
                "response": {"status": {"code": status, "text": message}}});
            return reply(StatusCode::from_u16(status).unwrap(), body);
        }
        let is_list = (req.method() == Method::GET
            && (path == "/v1/cwobject/access-key" || path.ends_with("/storage/s3/keys")))
            || path.ends_with("/instancedetails");
        if is_list && faults.fail_lists {
            self.count("list");
            self.count("list_failed");
            let body = json!({"code": "unavailable", "message": "listing is down (injected)",
                "response": {"status": {"code": 503, "text": "listing is down (injected)"}}});
            return reply(StatusCode::SERVICE_UNAVAILABLE, body);
        }
        if let Some(mode) = path.strip_prefix("/v1/cwobject/temporary-credentials/") {
            let mode = mode.to_string();
            self.exchange(req, &mode).await
        } else if path.starts_with("/v1/cwobject/") {
            self.coreweave(req).await
        } else if let Some(rest) = path.strip_prefix("/v1alpha5") {
            self.crusoe(&req, rest.to_string()).await
        } else if let Some(function) = path.strip_prefix("/objectstorage/") {
            self.glesys(&req, function.to_string()).await
        } else {
            reply(StatusCode::NOT_FOUND, json!({"message": "no such path"}))
        }
    }

    // ---- CoreWeave -------------------------------------------------------------------------

    async fn coreweave(&self, req: Request<Bytes>) -> Response<Bytes> {
        let err = |status: StatusCode, code: u16, message: &str| {
            reply(status, json!({"code": code, "message": message}))
        };
        let auth_ok =
            header(&req, "authorization") == Some(format!("Bearer {}", self.coreweave_token));
        if !auth_ok {
            self.count("unauthorized");
            return err(
                StatusCode::UNAUTHORIZED,
                16,
                "unauthenticated: invalid API access token",
            );
        }
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/cwobject/access-key") => {
                self.coreweave_create(&body, COREWEAVE_PRINCIPAL.to_string())
                    .await
            }
            (&Method::POST, "/v1/cwobject/revoke-access-key/access-key") => {
                let Some(id) = body["accessKey"].as_str() else {
                    return err(StatusCode::BAD_REQUEST, 3, "accessKey required");
                };
                match self.revoke("coreweave", id).await {
                    true => reply(StatusCode::OK, json!({})),
                    false => err(StatusCode::NOT_FOUND, 5, "access key not found"),
                }
            }
            (&Method::POST, "/v1/cwobject/revoke-access-key/principal") => {
                self.count("revoke_principal");
                if body["principalName"].as_str() != Some(COREWEAVE_PRINCIPAL) {
                    return err(StatusCode::NOT_FOUND, 5, "principal not found");
                }
                let ids: Vec<String> = self
                    .live_of("coreweave")
                    .into_iter()
                    .filter(|k| !k.foreign)
                    .map(|k| k.id)
                    .collect();
                for id in ids {
                    self.revoke("coreweave", &id).await;
                }
                reply(StatusCode::OK, json!({}))
            }
            (&Method::GET, "/v1/cwobject/access-key") => {
                self.count("list");
                let infos: Vec<Value> = self
                    .live_of("coreweave")
                    .iter()
                    .map(|k| json!({"accessKeyId": k.id, "status": "ACTIVE", "attributes": {"keybroker-lease": k.tag}, "expiry": k.expires_at.map(rfc3339)}))
                    .collect();
                reply(StatusCode::OK, json!({ "accessKeyInfos": infos }))
            }
            _ => err(StatusCode::NOT_FOUND, 5, "no such method"),
        }
    }

    /// `POST /v1/cwobject/temporary-credentials/{oidc,saml}`: a key for the workload's
    /// identity, with no API token.
    async fn exchange(&self, req: Request<Bytes>, mode: &str) -> Response<Bytes> {
        let err = |status: StatusCode, code: u16, message: &str| {
            reply(
                status,
                json!({"code": code, "message": message, "details": []}),
            )
        };
        self.count("exchange");
        if req.headers().contains_key(http::header::AUTHORIZATION) {
            self.count("exchange_with_authorization");
        }
        if req.method() != Method::POST {
            return err(StatusCode::NOT_FOUND, 5, "no such method");
        }
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        if body["orgId"].as_str() != Some(WIF_ORG) {
            return err(StatusCode::BAD_REQUEST, 3, "unknown organization");
        }
        let principal = match mode {
            "oidc" => {
                let claims = body["oidcToken"].as_str().and_then(jwt_claims);
                let Some(claims) = claims else {
                    return err(StatusCode::BAD_REQUEST, 3, "Invalid token");
                };
                let aud_ok = claims["aud"] == WIF_AUDIENCE
                    || claims["aud"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|v| v == WIF_AUDIENCE));
                if claims["iss"] != WIF_ISSUER || !aud_ok {
                    return err(StatusCode::BAD_REQUEST, 3, "Invalid token");
                }
                if claims["exp"]
                    .as_i64()
                    .is_none_or(|e| e <= self.clock.now().unix_timestamp())
                {
                    self.count("exchange_expired_token");
                    return err(
                        StatusCode::BAD_REQUEST,
                        3,
                        "Invalid token: token is expired",
                    );
                }
                let sub = claims["sub"].as_str().unwrap_or_default().to_string();
                if self.lock().denied_subjects.contains(&sub) {
                    return err(StatusCode::FORBIDDEN, 7, "permission denied");
                }
                format!("role/{WIF_ISSUER}:{sub}")
            }
            "saml" => {
                if body["configId"].as_str() != Some(WIF_CONFIG) {
                    return err(StatusCode::BAD_REQUEST, 3, "unknown WIF configuration");
                }
                let role = body["samlResponse"]
                    .as_str()
                    .and_then(|b| STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|t| t.strip_prefix("fake-saml-role:").map(str::to_string));
                let Some(role) = role else {
                    return err(StatusCode::BAD_REQUEST, 3, "Invalid SAML response");
                };
                format!("saml/{role}")
            }
            _ => return err(StatusCode::NOT_FOUND, 5, "no such method"),
        };
        self.coreweave_create(&body, principal).await
    }

    /// A CoreWeave create, by API token or exchange: `durationSeconds` checked, the key made
    /// with the body's tag for `principal`, answered in CoreWeave's camelCase shape.
    async fn coreweave_create(&self, body: &Value, principal: String) -> Response<Bytes> {
        let err = |status: StatusCode, code: u16, message: &str| {
            reply(status, json!({"code": code, "message": message}))
        };
        let seconds = match body["durationSeconds"].as_u64() {
            Some(s @ 1..=43_200) => s,
            None => return err(StatusCode::BAD_REQUEST, 3, "duration required"),
            Some(_) => {
                return err(
                    StatusCode::BAD_REQUEST,
                    3,
                    "durationSeconds must be in 1..43200 for this test fake",
                )
            }
        };
        let tag = body["attributes"]["keybroker-lease"]
            .as_str()
            .map(str::to_string);
        let lifetime = Some(Duration::from_secs(seconds));
        let key = match self
            .create("coreweave", tag, lifetime, |s, m| err(s, 14, m))
            .await
        {
            Ok(k) => k,
            Err(resp) => return resp,
        };
        if let Some(k) = self.lock().keys.get_mut(&key.id) {
            k.principal = Some(principal.clone());
        }
        let expiry = self
            .faults()
            .expiry_override
            .unwrap_or_else(|| rfc3339(key.expires_at.unwrap()));
        reply(
            StatusCode::OK,
            json!({
                "accessKeyId": key.id, "secretKey": key.secret, "principalName": principal,
                "expiry": expiry, "attributes": body["attributes"],
            }),
        )
    }

    /// An OIDC token from the fake's issuer for `sub`, expiring at `exp`, as an identity
    /// provider would write it to a file. Its signature is not one: the fake does not check it.
    pub fn oidc_token(&self, sub: &str, exp: OffsetDateTime) -> String {
        Self::jwt(json!({
            "iss": WIF_ISSUER, "aud": [WIF_AUDIENCE], "sub": sub,
            "exp": exp.unix_timestamp(), "iat": self.clock.now().unix_timestamp(),
        }))
    }

    /// A JWT with these claims (and no real signature).
    pub fn jwt(claims: Value) -> String {
        let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.{}",
            part(json!({"alg": "RS256", "kid": "fake"})),
            part(claims),
            URL_SAFE_NO_PAD.encode(random(32))
        )
    }

    /// A SAML response (base64) for `role`.
    pub fn saml_assertion(role: &str) -> String {
        STANDARD.encode(format!("fake-saml-role:{role}"))
    }

    /// From now on, no access policy lets `sub` mint.
    pub fn deny_subject(&self, sub: &str) {
        self.lock().denied_subjects.push(sub.to_string());
    }

    // ---- Crusoe ----------------------------------------------------------------------------

    /// Verifies signature version 1.0 as Crusoe's API reference describes it.
    fn crusoe_signature_ok(&self, req: &Request<Bytes>) -> bool {
        let Some(ts) = header(req, "x-crusoe-timestamp") else {
            return false;
        };
        let Some(auth) = header(req, "authorization") else {
            return false;
        };
        let Some(rest) = auth.strip_prefix("Bearer 1.0:") else {
            return false;
        };
        let Some((key_id, sig)) = rest.split_once(':') else {
            return false;
        };
        if key_id != self.crusoe_key_id {
            return false;
        }
        let mut pairs: Vec<(&str, &str)> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        pairs.sort_by_key(|(k, _)| *k);
        let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let payload = format!(
            "{}\n{}\n{}\n{ts}\n",
            req.uri().path(),
            query.join("&"),
            req.method().as_str()
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &URL_SAFE_NO_PAD.decode(&self.crusoe_secret).unwrap(),
        );
        URL_SAFE_NO_PAD
            .decode(sig)
            .is_ok_and(|sig| ring::hmac::verify(&key, payload.as_bytes(), &sig).is_ok())
    }

    async fn crusoe(&self, req: &Request<Bytes>, path: String) -> Response<Bytes> {
        let err = |status: StatusCode, code: &str, message: &str| {
            reply(status, json!({"code": code, "message": message}))
        };
        if !self.crusoe_signature_ok(req) {
            self.count("unauthorized");
            return err(StatusCode::UNAUTHORIZED, "401", "bad_credential");
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["organizations", "entities"]) => {
                self.count("entities");
                let mut items = vec![
                    json!({"id": self.crusoe_org, "name": "keybroker-tests", "relation": "member"}),
                ];
                for i in 0..self.lock().extra_orgs {
                    items.push(
                        json!({"id": uuid(), "name": format!("other-{i}"), "relation": "member"}),
                    );
                }
                reply(StatusCode::OK, json!({ "items": items }))
            }
            (_, ["organizations", org, "storage", "s3", "keys", ..]) if *org != self.crusoe_org => {
                err(
                    StatusCode::FORBIDDEN,
                    "unauthorized",
                    &format!("user is not a member of organization {org}"),
                )
            }
            (&Method::POST, [_, _, _, _, "keys"]) => {
                let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
                let now = self.clock.now();
                let lifetime = body["expire_at"]
                    .as_str()
                    .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                    .map(|t| positive(t - now));
                let live = {
                    let st = self.lock();
                    st.keys
                        .values()
                        .filter(|k| k.provider == "crusoe" && k.live_at(now))
                        .count()
                };
                if live >= CRUSOE_LIMIT {
                    self.count("create");
                    self.count("limit");
                    return err(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "user has reached the maximum of 2 S3 keys",
                    );
                }
                let tag = body["alias"].as_str().map(str::to_string);
                let key = match self
                    .create("crusoe", tag, lifetime, |s, m| err(s, "internal_error", m))
                    .await
                {
                    Ok(k) => k,
                    Err(resp) => return resp,
                };
                let expire_at = self.faults().expiry_override.unwrap_or_else(|| {
                    key.expires_at
                        .map(rfc3339)
                        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
                });
                reply(
                    StatusCode::OK,
                    json!({"access_key_id": key.id, "secret_key": key.secret, "expire_at": expire_at}),
                )
            }
            (&Method::GET, [_, _, _, _, "keys"]) => {
                self.count("list");
                let items: Vec<Value> = self
                    .live_of("crusoe")
                    .iter()
                    .map(|k| json!({
                        "key_uuid": uuid(), "access_key_id": k.id, "alias": k.tag, "status": "enabled",
                        "created_at": rfc3339(k.created),
                        "expire_at": k.expires_at.map(rfc3339).unwrap_or_else(|| "1970-01-01T00:00:00Z".into()),
                        "user_id": "e7bed65d-e918-4fab-921c-03b8db94aa7b",
                    }))
                    .collect();
                reply(StatusCode::OK, json!({ "items": items }))
            }
            (&Method::DELETE, [_, _, _, _, "keys", id]) => match self.revoke("crusoe", id).await {
                true => Response::builder().status(204).body(Bytes::new()).unwrap(),
                false => err(StatusCode::NOT_FOUND, "not_found", "key not found"),
            },
            _ => err(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }

    // ---- GleSYS ----------------------------------------------------------------------------

    async fn glesys(&self, req: &Request<Bytes>, function: String) -> Response<Bytes> {
        let err = |status: StatusCode, text: &str| {
            reply(
                status,
                json!({"response": {"status": {"code": status.as_u16(), "text": text}}}),
            )
        };
        let expected = format!(
            "Basic {}",
            STANDARD.encode(format!("{GLESYS_PROJECT}:{}", self.glesys_api_key))
        );
        if header(req, "authorization") != Some(expected) {
            self.count("unauthorized");
            return err(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        let instance = body["instanceid"].as_str().unwrap_or_default();
        if instance != GLESYS_INSTANCE {
            return err(
                StatusCode::NOT_FOUND,
                &format!("Object storage instance not found: {instance}"),
            );
        }
        let ok = |extra: Value| {
            let mut response = json!({"status": {"code": 200, "timestamp": rfc3339(self.clock.now()), "text": "OK"}});
            if let (Some(r), Some(e)) = (response.as_object_mut(), extra.as_object()) {
                r.extend(e.clone());
            }
            reply(StatusCode::OK, json!({ "response": response }))
        };
        let credential = |k: &FakeKey, with_secret: bool| {
            let mut c = json!({"id": k.handle, "accesskey": k.id, "description": k.tag, "created": rfc3339(k.created)});
            if with_secret {
                c["secretkey"] = k.secret.clone().into();
            }
            c
        };
        match function.as_str() {
            "createcredential" => {
                let tag = body["description"].as_str().map(str::to_string);
                match self.create("glesys", tag, None, err).await {
                    Ok(k) => ok(json!({ "credential": credential(&k, true) })),
                    Err(resp) => resp,
                }
            }
            "deletecredential" => {
                let id = body["credentialid"].as_str().unwrap_or_default();
                let key_id = self
                    .lock()
                    .keys
                    .values()
                    .find(|k| k.provider == "glesys" && k.handle == id)
                    .map(|k| k.id.clone());
                match key_id {
                    Some(key_id) if self.revoke("glesys", &key_id).await => ok(json!({})),
                    _ => err(StatusCode::NOT_FOUND, "Credential not found"),
                }
            }
            "instancedetails" => {
                self.count("list");
                let credentials: Vec<Value> = self
                    .live_of("glesys")
                    .iter()
                    .map(|k| credential(k, false))
                    .collect();
                ok(json!({"instance": {"id": GLESYS_INSTANCE, "credentials": credentials}}))
            }
            _ => err(StatusCode::NOT_FOUND, "No such function"),
        }
    }

    // ---- shared bookkeeping ----------------------------------------------------------------

    fn live_of(&self, provider: &str) -> Vec<FakeKey> {
        let now = self.clock.now();
        self.lock()
            .keys
            .values()
            .filter(|k| k.provider == provider && k.live_at(now))
            .cloned()
            .collect()
    }

    /// Mints a key (applying create faults); `Err` is the answer to send instead.
    async fn create(
        &self,
        provider: &'static str,
        tag: Option<String>,
        lifetime: Option<Duration>,
        error: impl Fn(StatusCode, &str) -> Response<Bytes>,
    ) -> Result<FakeKey, Response<Bytes>> {
        self.count("create");
        let _in_flight = InFlight::enter(self);
        let faults = self.faults();
        if let Some(rate) = faults.create_rate {
            if !self.take_token(rate) {
                self.count("throttled");
                let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, 1.into());
                return Err(resp);
            }
        }
        if let Some((status, message)) = faults.create_status {
            let mut resp = error(StatusCode::from_u16(status).unwrap(), &message);
            if let Some(secs) = faults.retry_after {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, secs.into());
            }
            return Err(resp);
        }
        if faults.malformed_create {
            return Err(Response::builder()
                .status(200)
                .body(Bytes::from_static(b"{\"accessKeyId\": "))
                .unwrap());
        }
        let (id, secret, iam_user) = match self.mirror.clone() {
            Some(moto) => {
                let user = format!("kb-{}", random(12));
                let u = user.clone();
                let (id, secret) = tokio::task::spawn_blocking(move || moto.create_key(&u))
                    .await
                    .unwrap();
                (id, secret, Some(user))
            }
            None => (
                format!(
                    "{}{}",
                    &provider[..2].to_uppercase(),
                    random(14).to_uppercase()
                ),
                random(40),
                None,
            ),
        };
        let key = FakeKey {
            provider,
            handle: if provider == "glesys" {
                uuid()
            } else {
                id.clone()
            },
            id,
            secret,
            tag,
            created: self.clock.now(),
            expires_at: None,
            revoked_at: None,
            foreign: false,
            iam_user,
            principal: None,
        };
        let key = if faults.lands_late && !faults.create_latency.is_zero() {
            // The provider carries the create out after the delay, whether or not the caller
            // still waits for the answer.
            let me = self.me.upgrade().expect("the fake is alive");
            let latency = faults.create_latency;
            let landing = tokio::spawn(async move {
                tokio::time::sleep(latency).await;
                me.land(key, lifetime)
            });
            landing.await.unwrap()
        } else {
            self.land(key, lifetime)
        };
        let drop_answer = {
            let mut st = self.lock();
            let drop_answer = st.faults.drop_create_responses > 0;
            if drop_answer {
                st.faults.drop_create_responses -= 1;
            }
            drop_answer
        };
        // The key exists from the moment the request arrived; only the answer is slow.
        if !faults.create_latency.is_zero() && !faults.lands_late {
            tokio::time::sleep(faults.create_latency).await;
        }
        if let Some(status) = faults.create_then_status {
            self.count("failed_after_create");
            return Err(error(
                StatusCode::from_u16(status).unwrap(),
                "internal error after the key was made (injected)",
            ));
        }
        if drop_answer {
            self.count("dropped");
            return Err(Response::builder().status(DROP).body(Bytes::new()).unwrap());
        }
        Ok(key)
    }

    /// Takes a token from the create bucket (`rate` a second, one second's worth at most).
    fn take_token(&self, rate: u32) -> bool {
        let mut st = self.lock();
        let now = std::time::Instant::now();
        let (tokens, since) = st.bucket.unwrap_or((f64::from(rate), now));
        let tokens = (tokens + now.duration_since(since).as_secs_f64() * f64::from(rate))
            .min(f64::from(rate));
        let allowed = tokens >= 1.0;
        st.bucket = Some((if allowed { tokens - 1.0 } else { tokens }, now));
        allowed
    }

    /// The most creates this fake has been answering at once.
    pub fn peak_creates_in_flight(&self) -> usize {
        self.lock().peak_creates_in_flight
    }

    /// Puts a new key into the store, created now with `lifetime`.
    fn land(&self, mut key: FakeKey, lifetime: Option<Duration>) -> FakeKey {
        let now = self.clock.now();
        key.created = now;
        key.expires_at = lifetime.map(|l| now + l);
        let provider = key.provider;
        {
            let mut st = self.lock();
            st.keys.insert(key.id.clone(), key.clone());
            let live = st
                .keys
                .values()
                .filter(|k| k.provider == provider && k.live_at(now))
                .count();
            let peak = st.peak_live.entry(provider).or_default();
            *peak = (*peak).max(live);
        }
        key
    }

    /// Revokes a key of `provider` by id; false if it is unknown or already revoked.
    async fn revoke(&self, provider: &str, id: &str) -> bool {
        self.count("revoke");
        let faults = self.faults();
        if faults.hang_revokes {
            std::future::pending::<()>().await;
        }
        let now = self.clock.now();
        let mirrored = {
            let mut st = self.lock();
            match st.keys.get_mut(id) {
                Some(k) if k.provider == provider && k.revoked_at.is_none() => {
                    k.revoked_at = Some(now);
                    k.iam_user.take()
                }
                _ => return false,
            }
        };
        if let Some(user) = mirrored {
            self.unmirror(user, id.to_string()).await;
        }
        if !faults.revoke_latency.is_zero() {
            tokio::time::sleep(faults.revoke_latency).await;
        }
        true
    }
}

fn positive(d: time::Duration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

fn header(req: &Request<Bytes>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The claims of a JWT, not verified.
fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn reply(status: StatusCode, body: Value) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

/// A create being answered, counted for [`FakeCloud::peak_creates_in_flight`].
struct InFlight<'a>(&'a FakeCloud);

impl<'a> InFlight<'a> {
    fn enter(fake: &'a FakeCloud) -> Self {
        let mut st = fake.lock();
        st.creates_in_flight += 1;
        st.peak_creates_in_flight = st.peak_creates_in_flight.max(st.creates_in_flight);
        InFlight(fake)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().creates_in_flight -= 1;
    }
}

/// SIGTERM to `daemon`: it exits 0, and no key the broker minted is alive at `fake`.
pub fn stop_leaving_no_key(daemon: &mut Daemon, fake: &FakeCloud) {
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    assert!(status.success(), "{}", daemon.logs());
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
}
