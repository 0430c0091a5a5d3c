//! Providers: the upstream APIs that mint and revoke object-storage keys.
//!
//! Each provider turns [`Provider::mint`] and [`Provider::revoke`] into its own HTTP calls
//! (each file links the provider's API reference) and maps every failure to a [`ProviderError`] whose variant tells
//! the broker whether and when a retry can help.

pub mod coreweave;
pub mod crusoe;
pub mod dev;
pub mod glesys;
pub mod http;
pub mod pacer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::clock::Clock;
use crate::credentials::Secret;

/// Which API a profile talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// CoreWeave AI Object Storage.
    Coreweave,
    /// Crusoe Cloud.
    Crusoe,
    /// GleSYS object storage.
    Glesys,
    /// The in-process development provider: random keys, real expiry, no cloud.
    Dev,
}

impl ProviderKind {
    /// The name used in config files, logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Coreweave => "coreweave",
            ProviderKind::Crusoe => "crusoe",
            ProviderKind::Glesys => "glesys",
            ProviderKind::Dev => "dev",
        }
    }

    /// The longest key lifetime the provider grants, if it has a limit.
    pub fn max_lifetime(self) -> Option<Duration> {
        match self {
            // 43200 s per CoreWeave's access-key how-to pages.
            ProviderKind::Coreweave => Some(Duration::from_secs(43_200)),
            ProviderKind::Dev => Some(Duration::from_secs(43_200)),
            ProviderKind::Crusoe | ProviderKind::Glesys => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed provider call. The variant decides what the broker does next.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderError {
    /// The provider refused for now (5xx) or could not be reached: back off and retry.
    #[error("{0}")]
    Transient(String),
    /// The request may have been carried out, but its answer was lost (a timeout or broken
    /// connection after sending, a gateway error, an unreadable success, any 5xx answer to a
    /// create). For a create, the key may exist: it is found by its tag before any new create.
    #[error("{0}")]
    Lost(String),
    /// A create was answered with a server error: the provider may have made the key before
    /// failing. Unlike [`ProviderError::Lost`] the call has ended, so one listing settles it.
    #[error("{0}")]
    MayExist(String),
    /// 429: retry no sooner than `retry_after` when the provider said so.
    #[error("{message}")]
    RateLimited {
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// What the provider said.
        message: String,
    },
    /// 401/403: the credentials are wrong or lack permission; retrying the same call cannot help.
    #[error("{0}")]
    Auth(String),
    /// Another 4xx: the provider refused the request as made.
    #[error("{0}")]
    Rejected(String),
    /// The provider's key limit is reached.
    #[error("{0}")]
    LimitReached(String),
    /// The answer could not be understood, or promised something keybroker cannot serve.
    #[error("{0}")]
    Malformed(String),
}

impl ProviderError {
    /// The same error, its message passed through `f` (to keep something out of it).
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> ProviderError {
        match self {
            ProviderError::Transient(m) => ProviderError::Transient(f(m)),
            ProviderError::Lost(m) => ProviderError::Lost(f(m)),
            ProviderError::MayExist(m) => ProviderError::MayExist(f(m)),
            ProviderError::RateLimited {
                retry_after,
                message,
            } => ProviderError::RateLimited {
                retry_after,
                message: f(message),
            },
            ProviderError::Auth(m) => ProviderError::Auth(f(m)),
            ProviderError::Rejected(m) => ProviderError::Rejected(f(m)),
            ProviderError::LimitReached(m) => ProviderError::LimitReached(f(m)),
            ProviderError::Malformed(m) => ProviderError::Malformed(f(m)),
        }
    }

    /// The shortest wait before a request may trigger another attempt. Errors a retry cannot
    /// fix quickly wait longer, so a crowd of clients cannot turn into a retry storm.
    pub fn retry_floor(&self) -> Duration {
        match self {
            ProviderError::Transient(_)
            | ProviderError::Lost(_)
            | ProviderError::MayExist(_)
            | ProviderError::Malformed(_) => Duration::from_secs(1),
            ProviderError::RateLimited { retry_after, .. } => retry_after
                .unwrap_or(Duration::from_secs(5))
                .max(Duration::from_secs(1)),
            ProviderError::Auth(_)
            | ProviderError::Rejected(_)
            | ProviderError::LimitReached(_) => Duration::from_secs(10),
        }
    }

    /// A short word for the error's kind, used in status and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Transient(_) => "transient",
            ProviderError::Lost(_) => "lost",
            ProviderError::MayExist(_) => "may_exist",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Auth(_) => "auth",
            ProviderError::Rejected(_) => "rejected",
            ProviderError::LimitReached(_) => "limit_reached",
            ProviderError::Malformed(_) => "malformed",
        }
    }
}

/// The error for a refused call: `"{api} {call}: HTTP {status}[: {said}]"`, its variant chosen
/// by the status: 401/403 are credentials, 429 is a rate limit (with `Retry-After`), 5xx are
/// the provider's own trouble (or, from a gateway, unknown), any other status a refusal.
pub fn refused(api: &str, call: &str, resp: &http::HttpResponse, said: &str) -> ProviderError {
    let said = brief(said);
    let message = if said.is_empty() {
        format!("{api} {call}: HTTP {}", resp.status)
    } else {
        format!("{api} {call}: HTTP {}: {said}", resp.status)
    };
    match resp.status {
        ::http::StatusCode::UNAUTHORIZED | ::http::StatusCode::FORBIDDEN => {
            ProviderError::Auth(message)
        }
        ::http::StatusCode::TOO_MANY_REQUESTS => ProviderError::RateLimited {
            retry_after: http::retry_after(&resp.headers),
            message,
        },
        s if s.is_server_error() => server_error(s, message),
        _ => ProviderError::Rejected(message),
    }
}

/// Maps a server-error status: gateways (502, 504) may have passed the request on before
/// failing, so its outcome is unknown; any other 5xx is the provider's own refusal. A create
/// goes further through [`refused_create`].
pub fn server_error(status: ::http::StatusCode, message: String) -> ProviderError {
    match status {
        ::http::StatusCode::BAD_GATEWAY | ::http::StatusCode::GATEWAY_TIMEOUT => {
            ProviderError::Lost(message)
        }
        _ => ProviderError::Transient(message),
    }
}

/// The error for a refused create. A 5xx answer may come after the key was made, so the
/// broker finds the key by its tag before the next create: from the provider itself it is
/// [`ProviderError::MayExist`] (the create has ended); from a gateway that gave up waiting
/// (502, 504) it stays [`ProviderError::Lost`] (the create may still land). Any other refusal
/// keeps its variant.
pub fn refused_create(status: ::http::StatusCode, err: ProviderError) -> ProviderError {
    match err {
        ProviderError::Lost(_) => err,
        _ if status.is_server_error() => ProviderError::MayExist(err.to_string()),
        _ => err,
    }
}

/// A freshly minted key.
#[derive(Debug)]
pub struct MintedKey {
    /// The access key id (not secret).
    pub access_key_id: String,
    /// The secret access key.
    pub secret: Secret,
    /// A session token, for providers that issue one.
    pub session_token: Option<Secret>,
    /// When the key stops working, on the local clock (see [`resolve_expiry`]).
    pub expires_at: OffsetDateTime,
    /// What the provider needs to revoke this key (CoreWeave: the key id; GleSYS: the credential id).
    pub revoke_handle: String,
    /// Who owns the key at the provider, when it says (CoreWeave: `coreweave/<uid>`,
    /// `role/<iss>:<sub>`, `saml/<role>`).
    pub principal: Option<String>,
}

impl MintedKey {
    /// The part of the key needed to revoke it later.
    pub fn handle(&self) -> KeyHandle {
        KeyHandle {
            access_key_id: self.access_key_id.clone(),
            revoke_handle: self.revoke_handle.clone(),
        }
    }
}

/// The non-secret identity of a minted key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHandle {
    /// The access key id, for logs and status.
    pub access_key_id: String,
    /// The provider's revoke handle.
    pub revoke_handle: String,
}

/// A key as the provider lists it: enough to recognise the broker's tag and revoke it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedKey {
    /// Id and revoke handle.
    pub handle: KeyHandle,
    /// The tag the key was created with (CoreWeave attribute, Crusoe alias, GleSYS description).
    pub tag: Option<String>,
    /// When it was created, if the provider says.
    pub created_at: Option<OffsetDateTime>,
    /// When it expires, if it does.
    pub expires_at: Option<OffsetDateTime>,
}

/// The prefix of every tag the broker puts on a key: `keybroker-<lease>`.
pub const TAG_PREFIX: &str = "keybroker-";

/// One provider account, as configured for one profile.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Which API this is.
    fn kind(&self) -> ProviderKind;

    /// How the profile authenticates its mints, where the provider offers a choice (CoreWeave:
    /// `api-token`, `oidc`, `saml`).
    fn auth(&self) -> Option<&'static str> {
        None
    }

    /// Whether it can revoke (and list) keys. A CoreWeave profile that mints by Workload
    /// Identity without an API token cannot: its keys are left to expire.
    fn revocable(&self) -> bool {
        true
    }

    /// How many keys the account may hold at once, if the provider limits it.
    fn key_limit(&self) -> Option<usize> {
        None
    }

    /// The account's live keys, with their tags.
    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError>;

    /// Creates a key tagged with `tag` that lives for `lifetime`. Called once per attempt: create
    /// is not idempotent, so the caller never retries it blindly.
    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError>;

    /// Revokes a key. A key the provider no longer knows counts as revoked.
    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError>;

    /// Revokes every key of `principal`, the panic button (CoreWeave's `revoke-access-key/principal`). Only
    /// CoreWeave has such a call.
    async fn revoke_principal(&self, principal: &str) -> Result<(), ProviderError> {
        let _ = principal;
        Err(ProviderError::Rejected(format!(
            "{} has no call that revokes a principal's keys; only coreweave does",
            self.kind()
        )))
    }
}

/// How much the provider's `Date` may differ from ours before it is worth a warning.
const SKEW_WARNING: Duration = Duration::from_secs(30);

/// The expiry to serve for a key requested at `sent_at` for `lifetime`: the shorter of the
/// provider's own expiry and `sent_at + lifetime` measured on the local clock (README, "Behaviour over time"), so
/// that a provider clock running fast can never make us promise more than the key has.
pub fn resolve_expiry(
    provider_expiry: Option<OffsetDateTime>,
    sent_at: OffsetDateTime,
    lifetime: Duration,
    provider_date: Option<&::http::HeaderValue>,
    clock: &Clock,
) -> OffsetDateTime {
    if let Some(date) = provider_date.and_then(|v| v.to_str().ok()) {
        if let Ok(theirs) = httpdate_parse(date) {
            let skew = theirs - clock.now();
            if skew.unsigned_abs() > SKEW_WARNING {
                tracing::warn!(
                    skew_seconds = skew.whole_seconds(),
                    "provider clock differs from ours; serving the shorter expiry"
                );
            }
        }
    }
    let local = sent_at + lifetime;
    match provider_expiry {
        Some(theirs) if theirs < local => theirs,
        _ => local,
    }
}

/// Parses an HTTP `Date` (`Sun, 06 Nov 1994 08:49:37 GMT`, or one of the two obsolete forms
/// RFC 9110 §5.6.7 still asks recipients to accept).
fn httpdate_parse(s: &str) -> Result<OffsetDateTime, httpdate::Error> {
    httpdate::parse_http_date(s).map(OffsetDateTime::from)
}

/// Truncates a provider's message for logs and errors, keeping it on one line.
pub fn brief(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 200 {
        let cut: String = one_line.chars().take(200).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// Provider-specific settings and secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderCredentials {
    /// CoreWeave: the API access token, and the identity exchange that mints instead of it.
    Coreweave {
        /// Bearer token from `token_file`: always there with `auth = "api-token"`; without it
        /// a federated profile's keys cannot be revoked.
        token: Option<Secret>,
        /// `auth = "oidc"` or `"saml"`: how keys are minted; `None` for `"api-token"`.
        exchange: Option<coreweave::wif::Exchange>,
    },
    /// Crusoe: the API key id and secret, and the organization if not discovered.
    Crusoe {
        /// The API key id (not secret).
        access_key_id: String,
        /// The API secret from `secret_key_file`.
        secret: Secret,
        /// `org_id`, or `None` to use the one organization the key sees.
        org_id: Option<String>,
    },
    /// GleSYS: project, API key and object-storage instance.
    Glesys {
        /// The project id (`CL12345`), the Basic auth user.
        project: String,
        /// The API key from `api_key_file`.
        api_key: Secret,
        /// The object-storage instance (`os-ab123`).
        instance_id: String,
    },
    /// The dev provider needs no secret; it can pretend to be slow.
    Dev {
        /// How long each mint takes (`mint_delay`, default 0): simulated provider latency.
        mint_delay: Duration,
    },
}

/// A daemon's upstream connections: one HTTP client (TLS setup and connection pool) per
/// `ca_file`, and one [`pacer::Pacer`] per provider endpoint and credential, shared by every
/// profile that uses them, across reloads.
#[derive(Debug)]
pub struct Upstreams {
    concurrency: usize,
    clients: std::sync::Mutex<HashMap<Option<PathBuf>, http::HttpClient>>,
    pacers: std::sync::Mutex<HashMap<(String, u64), Arc<pacer::Pacer>>>,
}

impl Upstreams {
    /// Upstreams allowing at most `concurrency` calls in flight per endpoint and credential.
    pub fn new(concurrency: usize) -> Self {
        Upstreams {
            concurrency,
            clients: Default::default(),
            pacers: Default::default(),
        }
    }

    /// The client for an `endpoint` reached with `credentials`, trusting `ca_file`.
    fn client(
        &self,
        ca_file: Option<&Path>,
        endpoint: &str,
        credentials: &ProviderCredentials,
    ) -> Result<http::HttpClient, http::TlsSetupError> {
        let base = {
            let mut clients = self.clients.lock().expect("upstreams lock poisoned");
            match clients.get(&ca_file.map(Path::to_path_buf)) {
                Some(client) => client.clone(),
                None => {
                    let client = http::HttpClient::new(ca_file, http::DEFAULT_CALL_TIMEOUT)?;
                    clients.insert(ca_file.map(Path::to_path_buf), client.clone());
                    client
                }
            }
        };
        let key = (endpoint.to_string(), credentials.identity());
        let pacer = Arc::clone(
            self.pacers
                .lock()
                .expect("upstreams lock poisoned")
                .entry(key)
                .or_insert_with(|| pacer::Pacer::new(self.concurrency)),
        );
        Ok(base.with_pacer(pacer))
    }
}

impl ProviderCredentials {
    /// Which account the provider sees calls from, as a number: profiles with the same one
    /// share the provider's rate limit. Derived from secrets, and never shown.
    fn identity(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match self {
            ProviderCredentials::Coreweave { token, exchange } => {
                token.as_ref().map(Secret::expose).hash(&mut h);
                exchange
                    .as_ref()
                    .map(|e| e.file().to_path_buf())
                    .hash(&mut h);
            }
            ProviderCredentials::Crusoe { access_key_id, .. } => access_key_id.hash(&mut h),
            ProviderCredentials::Glesys { project, .. } => project.hash(&mut h),
            ProviderCredentials::Dev { .. } => {}
        }
        h.finish()
    }
}

/// Builds the provider for `credentials` at `endpoint`, trusting `ca_file` (else the system's
/// roots) for HTTPS, its calls paced with every other profile on the same endpoint and
/// credential.
pub fn build(
    credentials: &ProviderCredentials,
    endpoint: &str,
    ca_file: Option<&Path>,
    clock: &Clock,
    upstreams: &Upstreams,
) -> Result<Arc<dyn Provider>, http::TlsSetupError> {
    let client = || upstreams.client(ca_file, endpoint, credentials);
    Ok(match credentials {
        ProviderCredentials::Coreweave { token, exchange } => {
            Arc::new(coreweave::CoreWeave::federated(
                client()?,
                endpoint,
                exchange.clone(),
                token.clone(),
                clock.clone(),
            ))
        }
        ProviderCredentials::Crusoe {
            access_key_id,
            secret,
            org_id,
        } => Arc::new(crusoe::Crusoe::new(
            client()?,
            endpoint,
            access_key_id,
            secret.clone(),
            org_id.clone(),
            clock.clone(),
        )),
        ProviderCredentials::Glesys {
            project,
            api_key,
            instance_id,
        } => Arc::new(glesys::Glesys::new(
            client()?,
            endpoint,
            project,
            api_key.clone(),
            instance_id,
            clock.clone(),
        )),
        ProviderCredentials::Dev { mint_delay } => {
            Arc::new(dev::Dev::new(clock.clone()).with_mint_delay(*mint_delay))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expiry_is_the_shorter_of_provider_and_local() {
        let sent = datetime!(2026-11-23 12:00:00 UTC);
        let hour = Duration::from_secs(3600);
        let clock = Clock::System;
        // Provider clock 10 minutes fast: its expiry is later than ours, ours wins.
        let fast = datetime!(2026-11-23 13:10:00 UTC);
        assert_eq!(
            resolve_expiry(Some(fast), sent, hour, None, &clock),
            sent + hour
        );
        // Provider gave a shorter key than asked: theirs wins.
        let short = datetime!(2026-11-23 12:30:00 UTC);
        assert_eq!(resolve_expiry(Some(short), sent, hour, None, &clock), short);
        // No expiry from the provider (GleSYS): the lease end.
        assert_eq!(resolve_expiry(None, sent, hour, None, &clock), sent + hour);
    }

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            httpdate_parse("Mon, 23 Nov 2026 18:00:00 GMT").unwrap(),
            datetime!(2026-11-23 18:00:00 UTC)
        );
        assert_eq!(
            httpdate_parse("Mon Nov 23 18:00:00 2026").unwrap(),
            datetime!(2026-11-23 18:00:00 UTC)
        );
        assert!(httpdate_parse("2026-11-23T18:00:00Z").is_err());
    }
}
