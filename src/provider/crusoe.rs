//! Crusoe Cloud object-storage keys (https://docs.crusoecloud.com/reference/api/; README, "Providers").
//!
//! Every call is signed with signature version 1.0: HMAC-SHA256, keyed by the unpadded URL-safe
//! base64 decoding of the API secret, over `path \n canonical_query \n METHOD \n timestamp \n`
//! (the path with its version prefix), sent as `Authorization: Bearer 1.0:<key id>:<sig>` with
//! the timestamp in `X-Crusoe-Timestamp`. The body is not signed.
//!
//! A Crusoe user may hold at most two keys ([`Provider::key_limit`]); the broker makes room
//! before minting, and a 4xx at create is checked against a listing to tell "limit" from
//! "refused".
//!
//! Whose keys the listing holds is unconfirmed: the API spec says it lists "all S3 access keys in
//! the organization", the docs say keys are visible to their user only. Each listed key carries
//! its `user_id`, but nothing tells which user the API key is, so the provider learns it: a listed
//! key whose id this provider minted shows the API key's `user_id`, and from then on only that
//! user's keys count as its own. Until then, a listing whose keys all have one `user_id` (or none)
//! is taken as the caller's; a listing of several users' keys is not taken as anyone's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::http::{HttpClient, HttpResponse};
use super::{
    resolve_expiry, KeyHandle, ListedKey, MintedKey, Provider, ProviderError, ProviderKind,
};
use crate::clock::Clock;
use crate::credentials::Secret;

/// The API base, version prefix included.
pub const DEFAULT_ENDPOINT: &str = "https://api.cloud.crusoe.ai/v1alpha5";

/// Keys a Crusoe user may hold at once ("Each bucket user can have a maximum of 2 keys").
pub const KEY_LIMIT: usize = 2;

/// How many of the access key ids it minted a provider remembers, to find its own user in a
/// listing. The broker holds at most [`KEY_LIMIT`] keys per profile, so a few suffice.
const REMEMBERED_KEYS: usize = 16;

/// A Crusoe account reached with one API key.
#[derive(Debug)]
pub struct Crusoe {
    http: HttpClient,
    endpoint: String,
    access_key_id: String,
    secret: Secret,
    configured_org: Option<String>,
    org: OnceCell<String>,
    clock: Clock,
    /// The access key ids this provider minted, newest last, at most [`REMEMBERED_KEYS`]: a
    /// listed key with one of these ids carries the API key's own `user_id`.
    minted: Mutex<VecDeque<String>>,
    /// The API key's `user_id`, once a listing has shown it.
    user: OnceLock<String>,
}

/// Why a secret cannot sign.
#[derive(Debug, thiserror::Error)]
#[error("the secret is not unpadded URL-safe base64, as Crusoe issues it: {0}")]
pub struct BadSecret(base64::DecodeError);

/// Checks that `secret` decodes as a signing key.
pub fn check_secret(secret: &Secret) -> Result<(), BadSecret> {
    URL_SAFE_NO_PAD
        .decode(secret.expose().trim())
        .map(|_| ())
        .map_err(BadSecret)
}

/// The canonical query: keys sorted, values kept in order per key, each re-escaped like Go's
/// `url.QueryEscape` (space as `+`). A `;` is refused, as the Go client does.
pub fn canonical_query(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.contains(';') {
        return Err(format!("query {raw:?} contains ';'"));
    }
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        groups.entry(unescape(k)?).or_default().push(unescape(v)?);
    }
    let mut out = Vec::new();
    for (k, values) in &groups {
        for v in values {
            out.push(format!("{}={}", query_escape(k), query_escape(v)));
        }
    }
    Ok(out.join("&"))
}

fn unescape(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {s:?}"))?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once unescaped"))
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The `Authorization` value for a request (signature version 1.0).
pub fn authorization(
    access_key_id: &str,
    secret: &Secret,
    method: &Method,
    path: &str,
    raw_query: &str,
    timestamp: &str,
) -> Result<String, String> {
    let key_bytes = URL_SAFE_NO_PAD
        .decode(secret.expose().trim())
        .map_err(|e| BadSecret(e).to_string())?;
    let payload = format!(
        "{path}\n{}\n{}\n{timestamp}\n",
        canonical_query(raw_query)?,
        method.as_str()
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let sig = ring::hmac::sign(&key, payload.as_bytes());
    Ok(format!(
        "Bearer 1.0:{access_key_id}:{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ))
}

#[derive(Deserialize)]
struct Entities {
    #[serde(default)]
    items: Vec<Entity>,
}

#[derive(Deserialize)]
struct Entity {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Created {
    access_key_id: Option<String>,
    secret_key: Option<String>,
    expire_at: Option<String>,
}

#[derive(Deserialize)]
struct Listed {
    #[serde(default)]
    items: Vec<ListedItem>,
}

#[derive(Clone, Deserialize)]
struct ListedItem {
    access_key_id: String,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    expire_at: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
    code: Option<serde_json::Value>,
}

fn parse_time(s: Option<&str>) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s?, &Rfc3339).ok()
}

/// Crusoe's "never expires" sentinel.
fn is_no_expiry(t: OffsetDateTime) -> bool {
    t.unix_timestamp() <= 0
}

impl Crusoe {
    /// A provider for the API at `endpoint` (version prefix included).
    pub fn new(
        http: HttpClient,
        endpoint: &str,
        access_key_id: &str,
        secret: Secret,
        org_id: Option<String>,
        clock: Clock,
    ) -> Self {
        Crusoe {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            access_key_id: access_key_id.to_string(),
            secret,
            configured_org: org_id,
            org: OnceCell::new(),
            clock,
            minted: Mutex::default(),
            user: OnceLock::new(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<HttpResponse, ProviderError> {
        let url = format!("{}{path}", self.endpoint);
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ProviderError::Rejected(format!("Crusoe: bad URL {url}: {e}")))?;
        let timestamp = self
            .clock
            .now()
            .replace_nanosecond(0)
            .expect("0 ns is valid")
            .format(&Rfc3339)
            .expect("a UTC time formats");
        let auth = authorization(
            &self.access_key_id,
            &self.secret,
            &method,
            uri.path(),
            uri.query().unwrap_or(""),
            &timestamp,
        )
        .map_err(|e| ProviderError::Auth(format!("Crusoe: cannot sign: {e}")))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::AUTHORIZATION, auth)
            .header("X-Crusoe-Timestamp", timestamp)
            .header(http::header::ACCEPT, "application/json");
        let body = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(body)
            .map_err(|e| ProviderError::Rejected(format!("Crusoe: bad request: {e}")))?;
        self.http.send(req).await
    }

    /// The organization: configured, or the one the API key sees.
    async fn org(&self) -> Result<&str, ProviderError> {
        self.org
            .get_or_try_init(|| async {
                if let Some(org) = &self.configured_org {
                    return Ok(org.clone());
                }
                let resp = self
                    .call(Method::GET, "/organizations/entities", None)
                    .await?;
                if !resp.status.is_success() {
                    return Err(status_error("list organizations", &resp));
                }
                let entities: Entities = serde_json::from_slice(&resp.body).map_err(|e| {
                    ProviderError::Malformed(format!(
                        "Crusoe list organizations: unreadable answer: {e}"
                    ))
                })?;
                match entities.items.as_slice() {
                    [one] => Ok(one.id.clone()),
                    [] => Err(ProviderError::Rejected(
                        "Crusoe: the API key belongs to no organization; set org_id".into(),
                    )),
                    many => Err(ProviderError::Rejected(format!(
                        "Crusoe: the API key sees {} organizations ({}); set org_id to one of them",
                        many.len(),
                        many.iter()
                            .map(|e| format!("{} {}", e.id, e.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            })
            .await
            .map(String::as_str)
    }

    async fn list(&self) -> Result<Vec<ListedItem>, ProviderError> {
        let org = self.org().await?;
        let resp = self
            .call(
                Method::GET,
                &format!("/organizations/{org}/storage/s3/keys"),
                None,
            )
            .await?;
        if !resp.status.is_success() {
            return Err(status_error("list keys", &resp));
        }
        let items = serde_json::from_slice::<Listed>(&resp.body)
            .map(|l| l.items)
            .map_err(|e| {
                ProviderError::Malformed(format!("Crusoe list keys: unreadable answer: {e}"))
            })?;
        self.learn_user(&items);
        Ok(items)
    }

    /// Remembers an access key id this provider minted.
    fn remember(&self, access_key_id: &str) {
        let mut minted = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        if minted.len() == REMEMBERED_KEYS {
            minted.pop_front();
        }
        minted.push_back(access_key_id.to_string());
    }

    /// Takes the API key's `user_id` from a listed key this provider minted, if there is one.
    fn learn_user(&self, items: &[ListedItem]) {
        if self.user.get().is_some() {
            return;
        }
        let minted = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(user) = items
            .iter()
            .filter(|k| minted.contains(&k.access_key_id))
            .find_map(|k| k.user_id.clone())
        {
            tracing::debug!(user_id = %user, "learned the Crusoe API key's user from a key it minted");
            let _ = self.user.set(user);
        }
    }

    /// The caller's keys among `items`: the known user's, or all of them when they are all of one
    /// user (or none says whose). When they are of several users and none is known to be the
    /// caller, `Err` with the number of users.
    fn own(&self, items: Vec<ListedItem>) -> Result<Vec<ListedItem>, usize> {
        if let Some(user) = self.user.get() {
            return Ok(items
                .into_iter()
                .filter(|k| k.user_id.as_deref() == Some(user.as_str()))
                .collect());
        }
        let users: BTreeSet<Option<&str>> = items.iter().map(|k| k.user_id.as_deref()).collect();
        match users.len() {
            0 | 1 => Ok(items),
            n => Err(n),
        }
    }
}

/// The keys that still work: Crusoe lists disabled keys too.
fn enabled(items: Vec<ListedItem>) -> Vec<ListedItem> {
    items
        .into_iter()
        .filter(|k| k.status.as_deref() != Some("disabled"))
        .collect()
}

/// Maps a failed answer by its HTTP status (Crusoe's `code` is not always the number).
fn status_error(call: &str, resp: &HttpResponse) -> ProviderError {
    let body = serde_json::from_slice::<ErrorBody>(&resp.body).ok();
    let said = body
        .as_ref()
        .and_then(|b| {
            b.message
                .clone()
                .or_else(|| b.code.as_ref().map(|c| c.to_string()))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
    super::refused("Crusoe", call, resp, &said)
}

#[async_trait]
impl Provider for Crusoe {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Crusoe
    }

    fn key_limit(&self) -> Option<usize> {
        Some(KEY_LIMIT)
    }

    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError> {
        let org = self.org().await?.to_string();
        let sent_at = self.clock.now();
        let expire_at = (sent_at + lifetime)
            .replace_nanosecond(0)
            .expect("0 ns is valid")
            .format(&Rfc3339)
            .expect("a UTC time formats");
        let resp = self
            .call(
                Method::POST,
                &format!("/organizations/{org}/storage/s3/keys"),
                Some(serde_json::json!({ "alias": tag, "expire_at": expire_at })),
            )
            .await?;
        if !resp.status.is_success() {
            let err = super::refused_create(resp.status, status_error("create key", &resp));
            // Any other 4xx may be the two-key limit: a listing of the caller's own keys tells.
            if let ProviderError::Rejected(message) = &err {
                if let Ok(keys) = self.list().await {
                    match self.own(enabled(keys)) {
                        Ok(own) if own.len() >= KEY_LIMIT => {
                            return Err(ProviderError::LimitReached(format!(
                                "{message} (the user holds {} keys, Crusoe's limit is {KEY_LIMIT})",
                                own.len()
                            )));
                        }
                        Ok(_) => {}
                        Err(users) => {
                            return Err(ProviderError::Rejected(format!(
                                "{message} (the key listing shows keys of {users} users and none is known to be this API key's, so whether its two-key limit is reached cannot be told)"
                            )));
                        }
                    }
                }
            }
            return Err(err);
        }
        let body: Created = serde_json::from_slice(&resp.body).map_err(|e| {
            ProviderError::Malformed(format!("Crusoe create key: unreadable answer: {e}"))
        })?;
        let access_key_id = body.access_key_id.filter(|s| !s.is_empty());
        if let Some(id) = &access_key_id {
            self.remember(id);
        }
        let (Some(access_key_id), Some(secret)) = (
            access_key_id,
            body.secret_key.filter(|s| !s.is_empty()).map(Secret::new),
        ) else {
            return Err(ProviderError::Malformed(
                "Crusoe create key: answer lacks access_key_id or secret_key".into(),
            ));
        };
        let handle = KeyHandle {
            access_key_id: access_key_id.clone(),
            revoke_handle: access_key_id.clone(),
        };
        let expiry = match body
            .expire_at
            .as_deref()
            .map(|s| OffsetDateTime::parse(s, &Rfc3339))
        {
            Some(Ok(t)) if !is_no_expiry(t) => t,
            other => {
                if let Err(e) = self.revoke(&handle).await {
                    tracing::error!(key_id = %access_key_id, error = %e, "could not revoke an unusable key");
                }
                return Err(ProviderError::Malformed(match other {
                    Some(Err(e)) => format!("Crusoe create key: expire_at unreadable ({e}); key {access_key_id} was revoked"),
                    _ => format!("Crusoe created key {access_key_id} without an expiry although {expire_at} was asked; it was revoked"),
                }));
            }
        };
        Ok(MintedKey {
            expires_at: resolve_expiry(
                Some(expiry),
                sent_at,
                lifetime,
                resp.headers.get(http::header::DATE),
                &self.clock,
            ),
            access_key_id,
            secret,
            session_token: None,
            revoke_handle: handle.revoke_handle,
            principal: None,
        })
    }

    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError> {
        let org = self.org().await?;
        let resp = self
            .call(
                Method::DELETE,
                &format!("/organizations/{org}/storage/s3/keys/{}", key.revoke_handle),
                None,
            )
            .await?;
        match resp.status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(status_error("delete key", &resp)),
        }
    }

    /// The caller's enabled keys once its user is known, else every enabled key listed (the
    /// broker only ever touches keys carrying its own tag).
    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        let keys = enabled(self.list().await?);
        let keys = match self.own(keys.clone()) {
            Ok(own) => own,
            Err(_) => keys,
        };
        Ok(keys
            .into_iter()
            .map(|k| ListedKey {
                handle: KeyHandle {
                    revoke_handle: k.access_key_id.clone(),
                    access_key_id: k.access_key_id,
                },
                tag: k.alias.filter(|a| !a.is_empty()),
                created_at: parse_time(k.created_at.as_deref()),
                expires_at: parse_time(k.expire_at.as_deref()).filter(|t| !is_no_expiry(*t)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed with Python's hmac, hashlib, base64 and urllib.parse from
    /// Crusoe's published description of the signature, not with this code. Secret: the unpadded URL-safe base64 of
    /// `keybroker-test-secret-0123456789`.
    const SECRET: &str = "a2V5YnJva2VyLXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk";

    fn sig(method: Method, path: &str, query: &str, ts: &str) -> String {
        authorization("KEYID", &Secret::new(SECRET), &method, path, query, ts).unwrap()
    }

    #[test]
    fn signs_like_the_reference_vectors() {
        assert_eq!(
            sig(
                Method::GET,
                "/v1alpha5/organizations/entities",
                "",
                "2026-08-01T12:00:00Z"
            ),
            "Bearer 1.0:KEYID:JyYNo282qZIsfI9eZLzq5OR_7L8mb5aM2GXg8fs806o"
        );
        let keys = "/v1alpha5/organizations/0b1f8a3c-0000-4000-8000-000000000001/storage/s3/keys";
        assert_eq!(
            sig(Method::POST, keys, "", "2026-11-23T18:30:05Z"),
            "Bearer 1.0:KEYID:iB09Jql53YBR-_c9gDePV_l34xDjctncDBpnifRl3ZM"
        );
        assert_eq!(
            sig(
                Method::DELETE,
                &format!("{keys}/CKIA493K6LOVDNNAR4SZ"),
                "",
                "2026-11-23T18:30:05Z"
            ),
            "Bearer 1.0:KEYID:IJ-kBvsQOa0x0RJ8jmeRqWxZzQjJt9Ywh40lYp-17nM"
        );
    }

    #[test]
    fn query_order_and_escaping_follow_go() {
        assert_eq!(
            canonical_query("zeta=1&alpha=b&alpha=a&name=x%20y").unwrap(),
            "alpha=b&alpha=a&name=x+y&zeta=1"
        );
        assert_eq!(
            sig(
                Method::GET,
                "/v1/organizations/entities",
                "zeta=1&alpha=b&alpha=a&name=x%20y",
                "2026-01-02T03:04:05Z"
            ),
            "Bearer 1.0:KEYID:r92A1vxB3JDUrMEf-TEgnovw1luUjWWu_FdLKGPB2OU"
        );
        assert!(canonical_query("a=1;b=2").is_err());
        assert_eq!(canonical_query("").unwrap(), "");
    }

    #[test]
    fn the_path_prefix_and_timestamp_are_signed() {
        let base = sig(
            Method::GET,
            "/v1alpha5/organizations/entities",
            "",
            "2026-08-01T12:00:00Z",
        );
        assert_ne!(
            base,
            sig(
                Method::GET,
                "/organizations/entities",
                "",
                "2026-08-01T12:00:00Z"
            )
        );
        assert_ne!(
            base,
            sig(
                Method::GET,
                "/v1alpha5/organizations/entities",
                "",
                "2026-08-01T12:00:01Z"
            )
        );
    }

    const OURS: &str = "e7bed65d-e918-4fab-921c-03b8db94aa7b";
    const THEIRS: &str = "0c1d2e3f-0000-4000-8000-00000000beef";

    fn provider(answers: Vec<(u16, serde_json::Value)>) -> Crusoe {
        let (http, _) = crate::provider::http::canned::client(answers);
        Crusoe::new(
            http,
            "http://crusoe.invalid/v1alpha5",
            "KEYID",
            Secret::new(SECRET),
            Some("4f9b1e0c-0000-4000-8000-000000000001".into()),
            Clock::System,
        )
    }

    fn created(id: &str) -> (u16, serde_json::Value) {
        (
            200,
            serde_json::json!({"access_key_id": id, "secret_key": "s3cr3t", "expire_at": "2099-01-01T00:00:00Z"}),
        )
    }

    fn listing(keys: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let items: Vec<_> = keys
            .iter()
            .map(|(id, user)| {
                serde_json::json!({
                    "key_uuid": "f5705300-79f8-4686-9b9f-02496a053bc0", "access_key_id": id,
                    "alias": format!("keybroker-{id}"), "status": "enabled",
                    "created_at": "2026-08-01T12:00:00Z", "expire_at": "2099-01-01T00:00:00Z",
                    "user_id": user,
                })
            })
            .collect();
        (200, serde_json::json!({ "items": items }))
    }

    fn at_limit() -> (u16, serde_json::Value) {
        (
            400,
            serde_json::json!({"code": "bad_request", "message": "user has reached the maximum of 2 S3 keys"}),
        )
    }

    fn ids(keys: &[ListedKey]) -> Vec<&str> {
        keys.iter()
            .map(|k| k.handle.access_key_id.as_str())
            .collect()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// An organization-wide listing: another user's two keys are not this API key's, so a 400 at
    /// create is the provider's refusal, not the two-key limit.
    #[tokio::test]
    async fn other_users_keys_do_not_fill_the_callers_budget() {
        let crusoe = provider(vec![
            created("K1"),
            listing(&[("K1", OURS), ("V1", THEIRS)]),
            at_limit(),
            listing(&[("V1", THEIRS), ("V2", THEIRS)]),
            listing(&[("V1", THEIRS), ("V2", THEIRS)]),
        ]);
        crusoe.mint("keybroker-a", HOUR).await.unwrap();
        // The listing shows K1, which this provider minted: its user is the API key's.
        assert_eq!(ids(&crusoe.list_keys().await.unwrap()), ["K1"]);
        // K1 is gone; the other user holds two keys, the caller none.
        let e = crusoe.mint("keybroker-b", HOUR).await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("maximum of 2 S3 keys")),
            "{e:?}"
        );
        assert!(crusoe.list_keys().await.unwrap().is_empty());
    }

    /// The caller's own two keys (ids it minted) fill the budget, whoever else is listed.
    #[tokio::test]
    async fn the_callers_own_two_keys_are_the_limit() {
        let crusoe = provider(vec![
            created("K1"),
            created("K2"),
            at_limit(),
            listing(&[("V1", THEIRS), ("K1", OURS), ("K2", OURS)]),
            listing(&[("V1", THEIRS), ("K1", OURS), ("K2", OURS)]),
        ]);
        crusoe.mint("keybroker-a", HOUR).await.unwrap();
        crusoe.mint("keybroker-b", HOUR).await.unwrap();
        let e = crusoe.mint("keybroker-c", HOUR).await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::LimitReached(m) if m.contains("maximum of 2 S3 keys") && m.contains("holds 2 keys")),
            "{e:?}"
        );
        assert_eq!(ids(&crusoe.list_keys().await.unwrap()), ["K1", "K2"]);
    }

    /// With no key of its own listed, the caller's user cannot be told: keys of several users
    /// are not claimed as a reached limit, and the error says why.
    #[tokio::test]
    async fn keys_of_several_unknown_users_are_not_a_limit() {
        let crusoe = provider(vec![
            at_limit(),
            listing(&[("V1", THEIRS), ("W1", OURS)]),
            listing(&[("V1", THEIRS), ("W1", OURS)]),
        ]);
        let e = crusoe.mint("keybroker-a", HOUR).await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("maximum of 2 S3 keys") && m.contains("keys of 2 users")),
            "{e:?}"
        );
        // Unknown user: every key is listed, as before (the broker goes by its tags).
        assert_eq!(ids(&crusoe.list_keys().await.unwrap()), ["V1", "W1"]);
        // Keys of one user only are taken as the caller's.
        let crusoe = provider(vec![at_limit(), listing(&[("K1", OURS), ("K2", OURS)])]);
        let e = crusoe.mint("keybroker-a", HOUR).await.unwrap_err();
        assert!(matches!(e, ProviderError::LimitReached(_)), "{e:?}");
    }

    /// A 5xx answer to a create may come after the key was made (a gateway's 502/504 even
    /// before it lands); other calls keep the usual mapping.
    #[tokio::test]
    async fn a_5xx_create_is_lost_and_keeps_the_providers_words() {
        for status in [500, 502, 503] {
            let crusoe = provider(vec![(
                status,
                serde_json::json!({"code": "internal_error", "message": "storage backend unavailable"}),
            )]);
            let e = crusoe.mint("keybroker-a", HOUR).await.unwrap_err();
            assert!(
                matches!(&e, ProviderError::MayExist(m) | ProviderError::Lost(m) if matches!(e, ProviderError::Lost(_)) == matches!(status, 502 | 504) && m.contains("create key") && m.contains("storage backend unavailable")),
                "{status}: {e:?}"
            );
        }
        let crusoe = provider(vec![(
            500,
            serde_json::json!({"code": "internal_error", "message": "x"}),
        )]);
        let handle = KeyHandle {
            access_key_id: "K1".into(),
            revoke_handle: "K1".into(),
        };
        let e = crusoe.revoke(&handle).await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    }

    #[test]
    fn remembers_a_bounded_number_of_its_keys() {
        let crusoe = provider(vec![]);
        for i in 0..40 {
            crusoe.remember(&format!("K{i}"));
        }
        let minted = crusoe.minted.lock().unwrap();
        assert_eq!(minted.len(), REMEMBERED_KEYS);
        assert_eq!(minted.back().map(String::as_str), Some("K39"));
    }

    #[test]
    fn a_padded_or_standard_base64_secret_is_refused() {
        assert!(check_secret(&Secret::new(SECRET)).is_ok());
        assert!(check_secret(&Secret::new("a2V5+/==")).is_err());
    }
}
