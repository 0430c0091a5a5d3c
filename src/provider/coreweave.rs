//! CoreWeave AI Object Storage (https://docs.coreweave.com/products/storage/object-storage/reference/object-storage-api-ref; README, "Providers").
//!
//! Mint: `POST /v1/cwobject/access-key` with `durationSeconds` and an `attributes` tag, under
//! the API access token (`auth = "api-token"`), or an exchange of the workload's own identity
//! ([`wif`], `auth = "oidc"` or `"saml"`); revoke: `POST
//! /v1/cwobject/revoke-access-key/access-key` with the key id; the operator's panic button:
//! `POST /v1/cwobject/revoke-access-key/principal`. Revoking and listing always take the API
//! access token.

pub mod wif;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::Deserialize;
use time::OffsetDateTime;

use super::http::{HttpClient, HttpResponse};
use super::{
    resolve_expiry, KeyHandle, ListedKey, MintedKey, Provider, ProviderError, ProviderKind,
};
use crate::clock::Clock;
use crate::credentials::Secret;

/// The public API host.
pub const DEFAULT_ENDPOINT: &str = "https://api.coreweave.com";

/// The attribute key that carries the broker's lease tag on every key.
pub const TAG_ATTRIBUTE: &str = "keybroker-lease";

/// A CoreWeave account: keys minted with its API access token, or exchanged for the
/// workload's identity.
#[derive(Debug)]
pub struct CoreWeave {
    http: HttpClient,
    endpoint: String,
    /// The API access token: it mints under `auth = "api-token"`, and revokes and lists.
    /// Without one (a federated profile with no `token_file`) keys cannot be revoked.
    token: Option<Secret>,
    /// Where keys come from under `auth = "oidc"` or `"saml"`.
    exchange: Option<wif::Exchange>,
    clock: Clock,
}

/// A minted key. Older pages spell `accessKeyID`; the container-credentials shape
/// (`AccessKeyId`, `SecretAccessKey`, `Expiration`) is accepted too.
#[derive(Deserialize)]
struct CreateResponse {
    #[serde(rename = "accessKeyId", alias = "accessKeyID", alias = "AccessKeyId")]
    access_key_id: Option<String>,
    #[serde(rename = "secretKey", alias = "SecretAccessKey")]
    secret_key: Option<String>,
    #[serde(alias = "Expiration")]
    expiry: Option<String>,
    #[serde(rename = "principalName")]
    principal_name: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    message: Option<String>,
}

impl CoreWeave {
    /// A provider for the API at `endpoint` using the bearer `token` for every call.
    pub fn new(http: HttpClient, endpoint: &str, token: Secret, clock: Clock) -> Self {
        CoreWeave::federated(http, endpoint, None, Some(token), clock)
    }

    /// A provider that mints by `exchange` (with `token` when there is none) and revokes and
    /// lists with `token`, if it has one.
    pub fn federated(
        http: HttpClient,
        endpoint: &str,
        exchange: Option<wif::Exchange>,
        token: Option<Secret>,
        clock: Clock,
    ) -> Self {
        CoreWeave {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            exchange,
            clock,
        }
    }

    /// `Authorization: Bearer <token>`, for every call but the exchanges.
    fn bearer(&self) -> Result<String, ProviderError> {
        match &self.token {
            Some(token) => Ok(format!("Bearer {}", token.expose())),
            None => Err(ProviderError::Rejected(
                "this profile has no token_file, so keybroker cannot revoke or list its keys; they expire by themselves".into(),
            )),
        }
    }

    /// Mints by exchanging the workload's identity.
    async fn exchange(
        &self,
        exchange: &wif::Exchange,
        tag: &str,
        seconds: u64,
    ) -> Result<MintedKey, ProviderError> {
        let request = exchange.request(seconds, tag, self.clock.now())?;
        let mode = exchange.mode();
        let call = format!("{} exchange", mode.to_uppercase());
        let sent_at = self.clock.now();
        // No credentials: the identity in the body is the credential.
        let body = Bytes::from(request.body.expose().to_string());
        let resp = self.send_post(request.path, body, None).await?;
        if !resp.status.is_success() {
            let base = super::refused_create(resp.status, status_error(&call, &resp));
            return Err(wif::refused(&request, mode, resp.status, base));
        }
        self.minted(&call, &resp, seconds, sent_at, true).await
    }

    /// The key in a create's answer. `temporary`: an exchange's key, temporary by definition,
    /// so an answer without an expiry is served until `sent_at + seconds` on our clock. An
    /// access key answered without an expiry (CoreWeave's "permanent" forms), or any key with
    /// an unreadable one, cannot be served: it is revoked at once, where the profile can.
    async fn minted(
        &self,
        call: &str,
        resp: &HttpResponse,
        seconds: u64,
        sent_at: OffsetDateTime,
        temporary: bool,
    ) -> Result<MintedKey, ProviderError> {
        let body: CreateResponse = serde_json::from_slice(&resp.body).map_err(|e| {
            ProviderError::Malformed(format!("CoreWeave {call}: unreadable answer: {e}"))
        })?;
        let secret = body.secret_key.filter(|s| !s.is_empty()).map(Secret::new);
        let (Some(access_key_id), Some(secret)) =
            (body.access_key_id.filter(|s| !s.is_empty()), secret)
        else {
            return Err(ProviderError::Malformed(format!(
                "CoreWeave {call}: answer lacks accessKeyId or secretKey"
            )));
        };
        let expiry = match parse_expiry(body.expiry.as_deref()) {
            Ok(Some(expiry)) => Some(expiry),
            Ok(None) if temporary => None,
            outcome => {
                // The key exists but cannot be served: take it back before reporting.
                let handle = KeyHandle {
                    access_key_id: access_key_id.clone(),
                    revoke_handle: access_key_id.clone(),
                };
                let revoked = self.revoke(&handle).await;
                let why = match outcome {
                    Err(e) => format!("with an unreadable expiry ({e})"),
                    _ => format!("without an expiry although {seconds}s was asked"),
                };
                let message = match &revoked {
                    Ok(()) => format!("CoreWeave {call}: key {access_key_id} was created {why}; it was revoked"),
                    Err(e) => format!("CoreWeave {call}: key {access_key_id} was created {why}; it could not be revoked ({e})"),
                };
                // A key that may still be alive is looked for by its tag and revoked later
                // (Malformed); where it is gone, or nothing could revoke it, the create is
                // settled, and the retry waits a minute rather than making another such key.
                return Err(if revoked.is_err() && self.revocable() {
                    ProviderError::Malformed(message)
                } else {
                    ProviderError::Rejected(message)
                });
            }
        };
        let expires_at = resolve_expiry(
            expiry,
            sent_at,
            Duration::from_secs(seconds),
            resp.headers.get(http::header::DATE),
            &self.clock,
        );
        Ok(MintedKey {
            revoke_handle: access_key_id.clone(),
            access_key_id,
            secret,
            session_token: None,
            expires_at,
            principal: body.principal_name.filter(|p| !p.is_empty()),
        })
    }

    /// POSTs `body` to `path` with the API token.
    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<HttpResponse, ProviderError> {
        let bearer = self.bearer()?;
        self.send_post(path, Bytes::from(body.to_string()), Some(bearer))
            .await
    }

    /// POSTs the JSON `body` to `path`, with `Authorization: <authorization>` if given.
    async fn send_post(
        &self,
        path: &str,
        body: Bytes,
        authorization: Option<String>,
    ) -> Result<HttpResponse, ProviderError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.endpoint));
        if let Some(value) = authorization {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let req = req
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| ProviderError::Rejected(format!("bad request to {path}: {e}")))?;
        self.http.send(req).await
    }
}

/// Maps a non-2xx answer to the error whose variant decides the retry.
fn status_error(call: &str, resp: &HttpResponse) -> ProviderError {
    let said = serde_json::from_slice::<Status>(&resp.body)
        .ok()
        .and_then(|s| s.message)
        .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
    super::refused("CoreWeave", call, resp, &said)
}

/// A CoreWeave expiry, or `None` for the three "no expiry" forms: absent, the Unix epoch and
/// Go's zero time, which CoreWeave's API sends for a key that never expires.
fn parse_expiry(raw: Option<&str>) -> Result<Option<OffsetDateTime>, ProviderError> {
    let Some(raw) = raw.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let t = OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map_err(|e| ProviderError::Malformed(format!("CoreWeave create: expiry {raw:?}: {e}")))?;
    if t.year() <= 1970 && t.unix_timestamp() <= 0 {
        return Ok(None);
    }
    Ok(Some(t))
}

#[async_trait]
impl Provider for CoreWeave {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Coreweave
    }

    fn auth(&self) -> Option<&'static str> {
        Some(
            self.exchange
                .as_ref()
                .map_or("api-token", wif::Exchange::mode),
        )
    }

    fn revocable(&self) -> bool {
        self.token.is_some()
    }

    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError> {
        // Never 0: that asks CoreWeave for a permanent key. Config validation keeps lifetime in
        // 1..=43200 s; the clamp is the last line of defence.
        let seconds = lifetime.as_secs().clamp(1, 43_200);
        if let Some(exchange) = &self.exchange {
            return self.exchange(exchange, tag, seconds).await;
        }
        let sent_at = self.clock.now();
        let resp = self
            .post(
                "/v1/cwobject/access-key",
                serde_json::json!({
                    "durationSeconds": seconds,
                    "attributes": { TAG_ATTRIBUTE: tag },
                }),
            )
            .await?;
        if !resp.status.is_success() {
            return Err(super::refused_create(
                resp.status,
                status_error("create access key", &resp),
            ));
        }
        self.minted("create access key", &resp, seconds, sent_at, false)
            .await
    }

    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}/v1/cwobject/access-key", self.endpoint))
            .header(http::header::AUTHORIZATION, self.bearer()?)
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::new())
            .map_err(|e| ProviderError::Rejected(format!("bad list request: {e}")))?;
        let resp = self.http.send(req).await?;
        if !resp.status.is_success() {
            return Err(status_error("list access keys", &resp));
        }
        let body: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| {
            ProviderError::Malformed(format!(
                "CoreWeave list access keys: unreadable answer: {e}"
            ))
        })?;
        Ok(listed(&body))
    }

    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError> {
        let resp = self
            .post(
                "/v1/cwobject/revoke-access-key/access-key",
                serde_json::json!({ "accessKey": key.revoke_handle }),
            )
            .await?;
        match resp.status {
            s if s.is_success() => Ok(()),
            // Already gone (revoked, or expired and removed): the goal is met.
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(status_error("revoke access key", &resp)),
        }
    }

    async fn revoke_principal(&self, principal: &str) -> Result<(), ProviderError> {
        let resp = self
            .post(
                "/v1/cwobject/revoke-access-key/principal",
                serde_json::json!({ "principalName": principal }),
            )
            .await?;
        if resp.status.is_success() {
            Ok(())
        } else {
            Err(status_error("revoke a principal's access keys", &resp))
        }
    }
}

/// The keys of a list answer. Its wrapper field is unconfirmed (the README says what is assumed), so
/// the first array-valued top-level field is taken; revoked and expired keys are skipped.
fn listed(body: &serde_json::Value) -> Vec<ListedKey> {
    let items = body
        .as_object()
        .and_then(|o| o.values().find_map(|v| v.as_array()))
        .cloned()
        .unwrap_or_default();
    items
        .iter()
        .filter(|k| !matches!(k["status"].as_str(), Some("DELETED" | "EXPIRED")))
        .filter_map(|k| {
            let id = k["accessKeyId"]
                .as_str()
                .or_else(|| k["accessKeyID"].as_str())?
                .to_string();
            Some(ListedKey {
                handle: KeyHandle {
                    access_key_id: id.clone(),
                    revoke_handle: id,
                },
                tag: k["attributes"][TAG_ATTRIBUTE].as_str().map(str::to_string),
                created_at: None,
                expires_at: parse_expiry(k["expiry"].as_str()).ok().flatten(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn no_expiry_sentinels() {
        assert_eq!(parse_expiry(None).unwrap(), None);
        assert_eq!(parse_expiry(Some("")).unwrap(), None);
        assert_eq!(parse_expiry(Some("1970-01-01T00:00:00Z")).unwrap(), None);
        assert_eq!(parse_expiry(Some("0001-01-01T00:00:00Z")).unwrap(), None);
        assert_eq!(
            parse_expiry(Some("2024-01-01T09:15:01Z")).unwrap(),
            Some(datetime!(2024-01-01 09:15:01 UTC))
        );
        assert!(parse_expiry(Some("tomorrow")).is_err());
    }

    #[test]
    fn lists_decode_defensively() {
        let body = serde_json::json!({"accessKeyInfos": [
            {"accessKeyId": "CWA", "status": "ACTIVE", "attributes": {"keybroker-lease": "keybroker-1"}, "expiry": "2024-01-01T09:15:01Z"},
            {"accessKeyID": "CWB", "status": "ACTIVE"},
            {"accessKeyId": "CWC", "status": "DELETED"},
        ]});
        let keys = listed(&body);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].tag.as_deref(), Some("keybroker-1"));
        assert_eq!(keys[1].handle.access_key_id, "CWB");
        assert!(listed(&serde_json::json!({"infos": []})).is_empty());
    }

    #[test]
    fn both_key_id_spellings_decode() {
        for field in ["accessKeyId", "accessKeyID"] {
            let body =
                format!(r#"{{"{field}":"CWX","secretKey":"s","expiry":"2024-01-01T09:15:01Z"}}"#);
            let parsed: CreateResponse = serde_json::from_str(&body).unwrap();
            assert_eq!(parsed.access_key_id.as_deref(), Some("CWX"));
        }
    }

    fn provider(answers: Vec<(u16, serde_json::Value)>) -> CoreWeave {
        let (http, _) = crate::provider::http::canned::client(answers);
        CoreWeave::new(http, "http://cw.invalid", Secret::new("t"), Clock::System)
    }

    /// A 5xx answer to a create may come after the key was made (a gateway's 502/504 even
    /// before it lands): the broker must look for it by tag before creating again. Other calls
    /// keep the usual mapping.
    #[tokio::test]
    async fn a_5xx_create_is_lost_and_keeps_the_providers_words() {
        let hour = Duration::from_secs(3600);
        for status in [500, 502, 503, 504] {
            let cw = provider(vec![(
                status,
                serde_json::json!({"code": 13, "message": "backend hiccup"}),
            )]);
            let e = cw.mint("keybroker-1", hour).await.unwrap_err();
            assert!(
                matches!(&e, ProviderError::MayExist(m) | ProviderError::Lost(m) if matches!(e, ProviderError::Lost(_)) == matches!(status, 502 | 504) && m.contains("create access key") && m.contains("backend hiccup")),
                "{status}: {e:?}"
            );
        }
        let cw = provider(vec![(400, serde_json::json!({"message": "bad duration"}))]);
        let e = cw.mint("keybroker-1", hour).await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("bad duration")),
            "{e:?}"
        );
        let cw = provider(vec![(503, serde_json::json!({"message": "down"}))]);
        let handle = KeyHandle {
            access_key_id: "CWA".into(),
            revoke_handle: "CWA".into(),
        };
        let e = cw.revoke(&handle).await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    }

    #[test]
    fn statuses_map_to_retry_classes() {
        let resp = |status: u16, body: &str| HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: Bytes::from(body.to_string()),
        };
        assert!(
            matches!(status_error("x", &resp(401, r#"{"code":16,"message":"bad token"}"#)), ProviderError::Auth(m) if m.contains("bad token"))
        );
        assert!(matches!(
            status_error("x", &resp(403, "")),
            ProviderError::Auth(_)
        ));
        assert!(matches!(
            status_error("x", &resp(429, "")),
            ProviderError::RateLimited { .. }
        ));
        assert!(matches!(
            status_error("x", &resp(503, "down")),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            status_error("x", &resp(400, "nope")),
            ProviderError::Rejected(_)
        ));
    }

    /// An exchange's key is temporary: without an expiry in the answer it is served until the
    /// lifetime asked for. An unreadable expiry on a profile that cannot revoke is settled
    /// (Rejected, retried in a minute) and says the key could not be revoked: no second call.
    #[tokio::test]
    async fn an_exchange_without_expiry_serves_the_lifetime_asked() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"sub":"a"}"#)
        );
        std::fs::write(&token_file, jwt).unwrap();
        let exchange = wif::Exchange::Oidc {
            org_id: "o".into(),
            token_file,
        };
        let answers = vec![
            (
                200,
                serde_json::json!({"accessKeyId": "CWA", "secretKey": "s"}),
            ),
            (
                200,
                serde_json::json!({"accessKeyId": "CWB", "secretKey": "s", "expiry": "soon"}),
            ),
        ];
        let (http, asked) = crate::provider::http::canned::client(answers);
        let clock = Clock::System;
        let cw = CoreWeave::federated(
            http,
            "http://cw.invalid",
            Some(exchange),
            None,
            clock.clone(),
        );
        let before = clock.now();
        let key = cw
            .mint("keybroker-1", Duration::from_secs(900))
            .await
            .unwrap();
        let lifetime = time::Duration::seconds(900);
        assert!(
            key.expires_at > before + lifetime - time::Duration::seconds(5)
                && key.expires_at <= clock.now() + lifetime,
            "{}",
            key.expires_at
        );
        let e = cw
            .mint("keybroker-2", Duration::from_secs(900))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("CWB") && m.contains("could not be revoked")),
            "{e:?}"
        );
        assert_eq!(asked.lock().unwrap().len(), 2, "no revoke call was made");
    }
}
