//! GleSYS object-storage credentials (https://github.com/glesys/api-docs/wiki/API-Introduction; README, "Providers").
//!
//! Basic auth (project, API key), JSON bodies, answers wrapped in `{"response": {"status":
//! {...}, ...}}`. GleSYS credentials never expire by themselves: the broker's lease end is the
//! expiry it serves, and deleting the credential at that time (which the broker does for every
//! retired key at its expiry) is what ends it. A missed deletion is a leaked key.

use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::http::{HttpClient, HttpResponse};
use super::{
    resolve_expiry, KeyHandle, ListedKey, MintedKey, Provider, ProviderError, ProviderKind,
};
use crate::clock::Clock;
use crate::credentials::Secret;

/// The public API host.
pub const DEFAULT_ENDPOINT: &str = "https://api.glesys.com";

/// A GleSYS project's object-storage instance.
#[derive(Debug)]
pub struct Glesys {
    http: HttpClient,
    endpoint: String,
    basic: Secret,
    instance_id: String,
    clock: Clock,
}

#[derive(Deserialize)]
struct Envelope<T> {
    response: T,
}

#[derive(Deserialize)]
struct StatusOnly {
    status: Option<Status>,
}

#[derive(Deserialize)]
struct Status {
    text: Option<String>,
}

#[derive(Deserialize)]
struct CredentialAnswer {
    credential: Credential,
}

#[derive(Deserialize)]
struct Credential {
    id: String,
    accesskey: String,
    #[serde(default)]
    secretkey: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    created: Option<String>,
}

#[derive(Deserialize)]
struct InstanceAnswer {
    instance: Instance,
}

#[derive(Deserialize)]
struct Instance {
    #[serde(default)]
    credentials: Vec<Credential>,
}

impl Glesys {
    /// A provider for `instance_id` of `project`, authenticated with `api_key`.
    pub fn new(
        http: HttpClient,
        endpoint: &str,
        project: &str,
        api_key: Secret,
        instance_id: &str,
        clock: Clock,
    ) -> Self {
        let basic = Secret::new(format!(
            "Basic {}",
            STANDARD.encode(format!("{project}:{}", api_key.expose()))
        ));
        Glesys {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            basic,
            instance_id: instance_id.to_string(),
            clock,
        }
    }

    /// Calls `function` and returns GleSYS's answer whatever its status, so that a caller can
    /// read a refusal itself; only failing to get an answer is an error here.
    async fn call(
        &self,
        function: &str,
        body: serde_json::Value,
    ) -> Result<HttpResponse, ProviderError> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/objectstorage/{function}", self.endpoint))
            .header(http::header::AUTHORIZATION, self.basic.expose())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::from(body.to_string()))
            .map_err(|e| ProviderError::Rejected(format!("GleSYS: bad request: {e}")))?;
        self.http.send(req).await
    }

    /// Calls `function` and returns its answer if GleSYS accepted the call.
    async fn post(
        &self,
        function: &str,
        body: serde_json::Value,
    ) -> Result<HttpResponse, ProviderError> {
        let resp = self.call(function, body).await?;
        if resp.status == StatusCode::OK {
            Ok(resp)
        } else {
            Err(status_error(function, &resp))
        }
    }
}

/// What GleSYS said about a call: `response.status.text`, else the body as it came.
fn status_text(resp: &HttpResponse) -> String {
    serde_json::from_slice::<Envelope<StatusOnly>>(&resp.body)
        .ok()
        .and_then(|e| e.response.status)
        .and_then(|s| s.text)
        .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned())
}

/// Whether a refused `deletecredential` says the credential is already gone: HTTP 404, or
/// another 4xx whose status text says "not found" (GleSYS's wording for a deleted credential is
/// unconfirmed). An answer that the object-storage instance is not found says nothing about the
/// credential, so it is not taken as done.
fn already_gone(resp: &HttpResponse) -> bool {
    let text = status_text(resp).to_ascii_lowercase();
    let not_found = resp.status == StatusCode::NOT_FOUND
        || (resp.status.is_client_error() && text.contains("not found"));
    let instance_missing = text.contains("instance") && !text.contains("credential");
    not_found && !instance_missing
}

/// GleSYS treats any status but 200 as an error and explains in `response.status.text`.
fn status_error(function: &str, resp: &HttpResponse) -> ProviderError {
    let said = status_text(resp);
    match super::refused("GleSYS", function, resp, &said) {
        // glesys-go's own fixture answers bad credentials with 400 "Unauthorized".
        ProviderError::Rejected(m) if said.to_ascii_lowercase().contains("unauthorized") => {
            ProviderError::Auth(m)
        }
        e => e,
    }
}

#[async_trait]
impl Provider for Glesys {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Glesys
    }

    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError> {
        let sent_at = self.clock.now();
        let resp = self
            .call(
                "createcredential",
                serde_json::json!({ "instanceid": self.instance_id, "description": tag }),
            )
            .await?;
        if resp.status != StatusCode::OK {
            return Err(super::refused_create(
                resp.status,
                status_error("createcredential", &resp),
            ));
        }
        let answer: Envelope<CredentialAnswer> =
            serde_json::from_slice(&resp.body).map_err(|e| {
                ProviderError::Malformed(format!("GleSYS createcredential: unreadable answer: {e}"))
            })?;
        let c = answer.response.credential;
        let Some(secret) = c.secretkey.filter(|s| !s.is_empty()).map(Secret::new) else {
            // The credential exists; without its secret it is useless, so delete it.
            let handle = KeyHandle {
                access_key_id: c.accesskey.clone(),
                revoke_handle: c.id,
            };
            if let Err(e) = self.revoke(&handle).await {
                tracing::error!(key_id = %handle.access_key_id, error = %e, "could not delete an unusable credential");
            }
            return Err(ProviderError::Malformed(
                "GleSYS createcredential: answer lacks secretkey; the credential was deleted"
                    .into(),
            ));
        };
        Ok(MintedKey {
            // No native expiry: the lease end, measured on our clock, is the expiry.
            expires_at: resolve_expiry(
                None,
                sent_at,
                lifetime,
                resp.headers.get(http::header::DATE),
                &self.clock,
            ),
            access_key_id: c.accesskey,
            secret,
            session_token: None,
            revoke_handle: c.id,
            principal: None,
        })
    }

    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError> {
        let resp = self
            .call(
                "deletecredential",
                serde_json::json!({ "instanceid": self.instance_id, "credentialid": key.revoke_handle }),
            )
            .await?;
        // Already deleted: the goal is met.
        if resp.status == StatusCode::OK || already_gone(&resp) {
            Ok(())
        } else {
            Err(status_error("deletecredential", &resp))
        }
    }

    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        let resp = self
            .post(
                "instancedetails",
                serde_json::json!({ "instanceid": self.instance_id }),
            )
            .await?;
        let answer: Envelope<InstanceAnswer> = serde_json::from_slice(&resp.body).map_err(|e| {
            ProviderError::Malformed(format!("GleSYS instancedetails: unreadable answer: {e}"))
        })?;
        Ok(answer
            .response
            .instance
            .credentials
            .into_iter()
            .map(|c| ListedKey {
                handle: KeyHandle {
                    access_key_id: c.accesskey,
                    revoke_handle: c.id,
                },
                tag: c.description.filter(|d| !d.is_empty()),
                created_at: c
                    .created
                    .as_deref()
                    .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()),
                expires_at: None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn errors_carry_the_status_text() {
        let e = status_error(
            "createcredential",
            &resp(
                400,
                r#"{"response":{"status":{"code":400,"text":"Unauthorized"}}}"#,
            ),
        );
        assert!(
            matches!(&e, ProviderError::Auth(m) if m.ends_with("HTTP 400 Bad Request: Unauthorized")),
            "{e:?}"
        );
        let e = status_error(
            "createcredential",
            &resp(
                404,
                r#"{"response":{"status":{"code":404,"text":"No such instance"}}}"#,
            ),
        );
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("No such instance")),
            "{e:?}"
        );
        assert!(matches!(
            status_error("x", &resp(503, "")),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            status_error("x", &resp(504, "")),
            ProviderError::Lost(_)
        ));
    }

    fn provider(answers: Vec<(u16, serde_json::Value)>) -> Glesys {
        let (http, _) = crate::provider::http::canned::client(answers);
        Glesys::new(
            http,
            "http://glesys.invalid",
            "CL1",
            Secret::new("k"),
            "os-ab123",
            Clock::System,
        )
    }

    fn answer(code: u16, text: &str) -> (u16, serde_json::Value) {
        (
            code,
            serde_json::json!({"response": {"status": {"code": code, "text": text}}}),
        )
    }

    /// Whether a deletion is already done is read from GleSYS's answer, not from our message.
    #[tokio::test]
    async fn revoke_reads_already_gone_from_the_answer() {
        let handle = KeyHandle {
            access_key_id: "AK".into(),
            revoke_handle: "376af022".into(),
        };
        let handle = &handle;
        let revoke =
            |a: (u16, serde_json::Value)| async move { provider(vec![a]).revoke(handle).await };
        assert_eq!(revoke(answer(200, "OK")).await, Ok(()));
        assert_eq!(revoke(answer(404, "Credential not found")).await, Ok(()));
        assert_eq!(revoke((404, serde_json::json!("gone"))).await, Ok(()));
        assert_eq!(revoke(answer(400, "credential NOT FOUND")).await, Ok(()));
        let e = revoke(answer(400, "Unauthorized")).await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::Auth(m) if m.contains("Unauthorized")),
            "{e:?}"
        );
        let e = revoke(answer(400, "Invalid credentialid"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Rejected(m) if m.contains("Invalid credentialid")),
            "{e:?}"
        );
        // A missing instance is not a missing credential: the key may still be live elsewhere.
        let e = revoke(answer(404, "Object storage instance not found: os-ab123"))
            .await
            .unwrap_err();
        assert!(matches!(&e, ProviderError::Rejected(_)), "{e:?}");
        // "not found" in a server error is not an answer about the credential.
        let e = revoke(answer(500, "Backend not found")).await.unwrap_err();
        assert!(matches!(&e, ProviderError::Transient(_)), "{e:?}");
        let e = revoke(answer(500, "Internal error")).await.unwrap_err();
        assert!(matches!(&e, ProviderError::Transient(_)), "{e:?}");
    }

    /// A 5xx answer to createcredential may come after the credential was made.
    #[tokio::test]
    async fn a_5xx_create_is_lost_and_keeps_the_providers_words() {
        let hour = Duration::from_secs(3600);
        for status in [500, 503, 504] {
            let e = provider(vec![answer(status, "Internal error")])
                .mint("keybroker-1", hour)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, ProviderError::MayExist(m) | ProviderError::Lost(m) if matches!(e, ProviderError::Lost(_)) == matches!(status, 502 | 504) && m.contains("createcredential") && m.contains("Internal error")),
                "{status}: {e:?}"
            );
        }
        let e = provider(vec![answer(400, "Unauthorized")])
            .mint("keybroker-1", hour)
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Auth(_)), "{e:?}");
        let e = provider(vec![answer(500, "Internal error")])
            .list_keys()
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    }

    #[test]
    fn decodes_the_documented_credential() {
        let body = r#"{"response":{"status":{"code":200,"text":"OK"},"credential":{"id":"376af022-c81e-4a02-9f28-0dce6ba24399","accesskey":"AOEUKEY123546","secretkey":"superlongsecretkey123123123","description":"Key2","created":"2020-05-29T23:37:00+00:00"}}}"#;
        let a: Envelope<CredentialAnswer> = serde_json::from_str(body).unwrap();
        assert_eq!(
            a.response.credential.id,
            "376af022-c81e-4a02-9f28-0dce6ba24399"
        );
        assert_eq!(a.response.credential.accesskey, "AOEUKEY123546");
    }
}
