//! Crusoe Cloud object-storage keys (`reference/providers.md` §2).
//!
//! Every call is signed with signature version 1.0: HMAC-SHA256, keyed by the unpadded URL-safe
//! base64 decoding of the API secret, over `path \n canonical_query \n METHOD \n timestamp \n`
//! (the path with its version prefix), sent as `Authorization: Bearer 1.0:<key id>:<sig>` with
//! the timestamp in `X-Crusoe-Timestamp`. The body is not signed.
//!
//! A Crusoe user may hold at most two keys ([`Provider::key_limit`]); the broker makes room
//! before minting, and a 4xx at create is checked against a listing to tell "limit" from
//! "refused".

use std::collections::BTreeMap;
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

#[derive(Deserialize)]
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
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
    code: Option<serde_json::Value>,
}

fn parse_time(s: Option<&str>) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s?, &Rfc3339).ok()
}

/// Crusoe's "never expires" sentinel (`reference/providers.md` §2, quirk 3).
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
        serde_json::from_slice::<Listed>(&resp.body)
            .map(|l| l.items)
            .map_err(|e| {
                ProviderError::Malformed(format!("Crusoe list keys: unreadable answer: {e}"))
            })
    }
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
            let err = status_error("create key", &resp);
            // Any other 4xx may be the two-key limit: a listing tells.
            if let ProviderError::Rejected(message) = &err {
                if let Ok(keys) = self.list().await {
                    let live: Vec<&ListedItem> = keys
                        .iter()
                        .filter(|k| k.status.as_deref() != Some("disabled"))
                        .collect();
                    if live.len() >= KEY_LIMIT {
                        return Err(ProviderError::LimitReached(format!(
                            "{message} (the user holds {} keys, Crusoe's limit is {KEY_LIMIT})",
                            live.len()
                        )));
                    }
                }
            }
            return Err(err);
        }
        let body: Created = serde_json::from_slice(&resp.body).map_err(|e| {
            ProviderError::Malformed(format!("Crusoe create key: unreadable answer: {e}"))
        })?;
        let (Some(access_key_id), Some(secret)) = (
            body.access_key_id.filter(|s| !s.is_empty()),
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

    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|k| k.status.as_deref() != Some("disabled"))
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
    /// `reference/providers.md` §2, not with this code. Secret: the unpadded URL-safe base64 of
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

    #[test]
    fn a_padded_or_standard_base64_secret_is_refused() {
        assert!(check_secret(&Secret::new(SECRET)).is_ok());
        assert!(check_secret(&Secret::new("a2V5+/==")).is_err());
    }
}
