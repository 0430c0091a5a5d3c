//! Workload Identity Federation: a short-lived identity from the workload's own identity
//! provider, exchanged for a key with no CoreWeave credential on the node (README, "CoreWeave
//! Workload Identity").
//!
//! - OIDC: `POST /v1/cwobject/temporary-credentials/oidc` with `orgId` and `oidcToken`, a JWT
//!   (a Kubernetes projected service-account token, a CI job's token). The key belongs to the
//!   principal `role/<iss>:<sub>`.
//! - SAML: `POST /v1/cwobject/temporary-credentials/saml` with `orgId`, `configId` (the WIF
//!   configuration) and `samlResponse`, the base64 SAML response.
//!
//! Both are sent without an `Authorization` header: the token or assertion is the credential.
//! The file holding it is read afresh at every mint, because its source (kubelet, a CI runner)
//! rewrites it. A JWT's claims are decoded, not verified (CoreWeave verifies them), to refuse
//! an expired token before it leaves the machine and to name the principal in errors. Only
//! `iss`, `sub`, `aud` and `exp` are ever logged.

use std::path::{Path, PathBuf};

use base64::Engine;
use time::OffsetDateTime;

use crate::credentials::{format_expiration, Secret};
use crate::provider::ProviderError;

/// A token closer than this to its `exp` is not sent: it could expire on the way.
pub const EXPIRY_MARGIN: time::Duration = time::Duration::seconds(10);

/// What a federated profile exchanges for keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// An OIDC token (JWT) from `token_file`.
    Oidc {
        /// The CoreWeave organization the keys are minted in.
        org_id: String,
        /// The file holding the JWT, rewritten by its source.
        token_file: PathBuf,
    },
    /// A base64 SAML response from `assertion_file`.
    Saml {
        /// The CoreWeave organization the keys are minted in.
        org_id: String,
        /// The file holding the assertion.
        assertion_file: PathBuf,
        /// The WIF configuration of the SAML provider.
        config_id: String,
    },
}

/// One exchange request, ready to send.
pub struct Request {
    /// The API path.
    pub path: &'static str,
    /// The JSON body; it holds the token or assertion.
    pub body: Secret,
    /// The token's principal, when its claims tell it (`role/<iss>:<sub>`), for errors.
    pub principal: Option<String>,
    /// The claims that may be shown (`iss=... aud=...`), for errors about a refused token.
    pub shown_claims: Option<String>,
    /// The token or assertion, to keep out of errors should the provider quote it back.
    pub identity: Secret,
}

impl Exchange {
    /// `auth` as written in the config.
    pub fn mode(&self) -> &'static str {
        match self {
            Exchange::Oidc { .. } => "oidc",
            Exchange::Saml { .. } => "saml",
        }
    }

    /// The file the identity comes from.
    pub fn file(&self) -> &Path {
        match self {
            Exchange::Oidc { token_file, .. } => token_file,
            Exchange::Saml { assertion_file, .. } => assertion_file,
        }
    }

    /// Reads the identity and builds the request for a key of `seconds`, tagged `tag`.
    /// An unreadable file, an empty one, or an OIDC token that expires within
    /// [`EXPIRY_MARGIN`] of `now` is an error, and nothing is sent.
    pub fn request(
        &self,
        seconds: u64,
        tag: &str,
        now: OffsetDateTime,
    ) -> Result<Request, ProviderError> {
        let identity = read_identity(self.file(), self.mode())?;
        let attributes = serde_json::json!({ super::TAG_ATTRIBUTE: tag });
        match self {
            Exchange::Oidc { org_id, token_file } => {
                let claims = Claims::decode(identity.expose()).map_err(|why| {
                    ProviderError::Auth(format!(
                        "CoreWeave OIDC exchange: {} does not hold a JWT ({why}); point oidc_token_file at the token file your identity provider writes",
                        token_file.display()
                    ))
                })?;
                claims.check_fresh(token_file, now)?;
                tracing::debug!(
                    iss = claims.iss.as_deref().unwrap_or(""),
                    sub = claims.sub.as_deref().unwrap_or(""),
                    aud = %claims.audience(),
                    exp = claims.exp.unwrap_or(0),
                    "exchanging an OIDC token for a key"
                );
                let body = serde_json::json!({
                    "durationSeconds": seconds,
                    "orgId": org_id,
                    "oidcToken": identity.expose(),
                    "attributes": attributes,
                });
                Ok(Request {
                    path: "/v1/cwobject/temporary-credentials/oidc",
                    body: Secret::new(body.to_string()),
                    principal: claims.principal(),
                    shown_claims: Some(claims.shown()),
                    identity,
                })
            }
            Exchange::Saml {
                org_id, config_id, ..
            } => {
                let body = serde_json::json!({
                    "durationSeconds": seconds,
                    "orgId": org_id,
                    "configId": config_id,
                    "samlResponse": identity.expose(),
                    "attributes": attributes,
                });
                Ok(Request {
                    path: "/v1/cwobject/temporary-credentials/saml",
                    body: Secret::new(body.to_string()),
                    principal: None,
                    shown_claims: None,
                    identity,
                })
            }
        }
    }
}

/// The token or assertion in `file`, trimmed.
fn read_identity(file: &Path, mode: &str) -> Result<Secret, ProviderError> {
    let what = if mode == "oidc" {
        "OIDC token"
    } else {
        "SAML assertion"
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        ProviderError::Auth(format!(
            "CoreWeave {} exchange: cannot read the {what} in {}: {e}",
            mode.to_uppercase(),
            file.display()
        ))
    })?;
    let text = Secret::new(text.trim());
    if text.expose().is_empty() {
        return Err(ProviderError::Auth(format!(
            "CoreWeave {} exchange: {} is empty; its source has not written the {what} yet",
            mode.to_uppercase(),
            file.display()
        )));
    }
    Ok(text)
}

/// The claims of a JWT that keybroker reads (never verifies). A claim of an unexpected type
/// is taken as absent: CoreWeave judges the token, this only helps explain it.
#[derive(Debug, Default)]
pub struct Claims {
    /// Issuer.
    pub iss: Option<String>,
    /// Subject.
    pub sub: Option<String>,
    /// Audience: one string or a list.
    pub aud: Option<serde_json::Value>,
    /// Expiry, seconds since the epoch (a JWT may give a fraction; it is dropped).
    pub exp: Option<i64>,
}

impl Claims {
    /// The claims in the payload of `jwt` (`header.payload.signature`, base64url, the header
    /// and payload JSON objects).
    pub fn decode(jwt: &str) -> Result<Claims, String> {
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header, payload, _] = parts.as_slice() else {
            return Err(format!("{} dot-separated parts, not 3", parts.len()));
        };
        let object = |part: &str, name: &str| {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .map_err(|_| format!("its {name} is not base64url"))?;
            match serde_json::from_slice(&bytes) {
                Ok(serde_json::Value::Object(map)) => Ok(map),
                _ => Err(format!("its {name} is not a JSON object")),
            }
        };
        object(header, "header")?;
        let claims = object(payload, "payload")?;
        let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Ok(Claims {
            iss: text("iss"),
            sub: text("sub"),
            aud: claims.get("aud").cloned(),
            exp: claims.get("exp").and_then(|v| v.as_f64()).map(|e| e as i64),
        })
    }

    /// Refuses a token that has expired or expires within [`EXPIRY_MARGIN`].
    fn check_fresh(&self, file: &Path, now: OffsetDateTime) -> Result<(), ProviderError> {
        let Some(exp) = self.exp else {
            return Ok(());
        };
        let Ok(expires) = OffsetDateTime::from_unix_timestamp(exp) else {
            return Ok(());
        };
        if expires - now > EXPIRY_MARGIN {
            return Ok(());
        }
        let when = if expires <= now {
            format!("expired at {}", format_expiration(expires))
        } else {
            format!("expires at {}, too soon to use", format_expiration(expires))
        };
        Err(ProviderError::Auth(format!(
            "CoreWeave OIDC exchange: the token in {} {when}; nothing was sent. Its source is not refreshing the file: check the projected service-account token volume (kubelet rewrites it) or the job that writes it",
            file.display()
        )))
    }

    /// `aud` as one string.
    fn audience(&self) -> String {
        match &self.aud {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        }
    }

    /// `role/<iss>:<sub>`, the principal CoreWeave mints the key for.
    fn principal(&self) -> Option<String> {
        Some(format!(
            "role/{}:{}",
            self.iss.as_deref()?,
            self.sub.as_deref()?
        ))
    }

    /// The claims an error may show.
    fn shown(&self) -> String {
        format!(
            "iss {:?}, aud {:?}, sub {:?}",
            self.iss.as_deref().unwrap_or(""),
            self.audience(),
            self.sub.as_deref().unwrap_or("")
        )
    }
}

/// The error for a refused exchange. CoreWeave words a rejected token `Invalid token` and a
/// principal without an access policy `permission denied` (their HTTP statuses are not
/// documented); each gets what to check. Other refusals keep the usual mapping.
pub fn refused(
    request: &Request,
    mode: &str,
    status: http::StatusCode,
    base: ProviderError,
) -> ProviderError {
    let base = redacted(base, request.identity.expose());
    if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
        return base;
    }
    let said = base.to_string();
    let lower = said.to_lowercase();
    let what = if mode == "saml" { "assertion" } else { "token" };
    let principal = match &request.principal {
        Some(p) => p.clone(),
        None => format!("of the {what}"),
    };
    if lower.contains("permission denied") || status == http::StatusCode::FORBIDDEN {
        return ProviderError::Auth(format!(
            "{said}; permission denied: the {what} was accepted, but no org access policy lets principal {principal} mint keys (allow cwobject:CreateAccessKeyOIDC, cwobject:CreateAccessKeyFromOIDC or cwobject:CreateAccessKeySAML, and the S3 actions it needs)"
        ));
    }
    if lower.contains("invalid token")
        || lower.contains("unauthenticated")
        || status == http::StatusCode::UNAUTHORIZED
    {
        let claims = request
            .shown_claims
            .as_deref()
            .map(|c| format!(" (the token has {c})"))
            .unwrap_or_default();
        let check = if mode == "saml" {
            "check wif_config_id and that the assertion is current and carries the CoreWeave Role and PrincipalName attributes".to_string()
        } else {
            format!("check that the WIF configuration's issuer URL and audience match the token exactly{claims}, and that CoreWeave can fetch the issuer's keys")
        };
        return ProviderError::Auth(format!("{said}; {what} rejected: {check}"));
    }
    base
}

/// `e` with the identity, and anything shaped like a JWT (`eyJ...`), replaced by
/// `[redacted]`: a provider's error may quote what it was sent, and the message goes to logs
/// and status.
fn redacted(e: ProviderError, identity: &str) -> ProviderError {
    let clean = |text: String| {
        let mut text = if identity.is_empty() {
            text
        } else {
            text.replace(identity, "[redacted]")
        };
        while let Some(start) = text.find("eyJ") {
            let len = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.=".contains(c)))
                .unwrap_or(text.len() - start);
            text.replace_range(start..start + len, "[redacted]");
        }
        text
    };
    e.map_message(clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn jwt(claims: serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    fn oidc(dir: &Path, token: &str) -> Exchange {
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        Exchange::Oidc {
            org_id: "org1".into(),
            token_file,
        }
    }

    #[test]
    fn an_oidc_request_carries_the_token_read_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-01-01 00:00 UTC);
        let token = jwt(
            serde_json::json!({"iss": "https://idp", "sub": "a", "aud": ["x", "y"], "exp": now.unix_timestamp() + 600}),
        );
        let ex = oidc(dir.path(), &token);
        let req = ex.request(900, "keybroker-t", now).unwrap();
        assert_eq!(req.path, "/v1/cwobject/temporary-credentials/oidc");
        let body: serde_json::Value = serde_json::from_str(req.body.expose()).unwrap();
        assert_eq!(body["oidcToken"], token);
        assert_eq!(body["orgId"], "org1");
        assert_eq!(body["durationSeconds"], 900);
        assert_eq!(body["attributes"]["keybroker-lease"], "keybroker-t");
        assert_eq!(req.principal.as_deref(), Some("role/https://idp:a"));
        assert!(req.shown_claims.unwrap().contains("\"x,y\""));
        // The file is read again: a new subject shows at once.
        let token_b = jwt(serde_json::json!({"iss": "https://idp", "sub": "b"}));
        std::fs::write(ex.file(), token_b).unwrap();
        let req = ex.request(900, "keybroker-t", now).unwrap();
        assert_eq!(req.principal.as_deref(), Some("role/https://idp:b"));
    }

    #[test]
    fn an_expired_or_expiring_token_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-01-01 00:00 UTC);
        for (exp, word) in [(-5, "expired at"), (5, "too soon")] {
            let ex = oidc(
                dir.path(),
                &jwt(serde_json::json!({"sub": "a", "exp": now.unix_timestamp() + exp})),
            );
            let e = ex.request(900, "t", now).err().unwrap();
            let m = e.to_string();
            assert!(matches!(e, ProviderError::Auth(_)), "{e:?}");
            assert!(
                m.contains(word) && m.contains(&ex.file().display().to_string()),
                "{m}"
            );
        }
    }

    #[test]
    fn a_fractional_exp_is_read_and_other_claims_may_be_anything() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-01-01 00:00 UTC);
        let token = jwt(serde_json::json!({"sub": 7, "exp": now.unix_timestamp() as f64 - 0.5}));
        let e = oidc(dir.path(), &token)
            .request(900, "t", now)
            .err()
            .unwrap();
        assert!(e.to_string().contains("expired at"), "{e}");
        let token = jwt(serde_json::json!({"sub": 7, "exp": now.unix_timestamp() as f64 + 600.5}));
        assert!(oidc(dir.path(), &token).request(900, "t", now).is_ok());
    }

    #[test]
    fn what_is_not_a_jwt_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-01-01 00:00 UTC);
        // The last: GitHub's JSON wrapper around a token, which has three dots-separated parts.
        for bad in [
            "s3cr3t-not-a-jwt",
            "a.%%%.c",
            "a.bm90IGpzb24.c",
            r#"{"value":"a.b.c"}"#,
        ] {
            let e = oidc(dir.path(), bad).request(900, "t", now).err().unwrap();
            let m = e.to_string();
            assert!(m.contains("does not hold a JWT") && !m.contains(bad), "{m}");
        }
        let empty = oidc(dir.path(), "  ");
        assert!(empty
            .request(900, "t", now)
            .err()
            .unwrap()
            .to_string()
            .contains("is empty"));
        let missing = Exchange::Oidc {
            org_id: "o".into(),
            token_file: dir.path().join("nope"),
        };
        assert!(missing
            .request(900, "t", now)
            .err()
            .unwrap()
            .to_string()
            .contains("cannot read"));
    }

    #[test]
    fn a_saml_request_carries_the_assertion_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let assertion_file = dir.path().join("saml");
        std::fs::write(&assertion_file, "PHNhbWw+\n").unwrap();
        let ex = Exchange::Saml {
            org_id: "org1".into(),
            assertion_file,
            config_id: "wif-1".into(),
        };
        let req = ex.request(60, "t", OffsetDateTime::UNIX_EPOCH).unwrap();
        let body: serde_json::Value = serde_json::from_str(req.body.expose()).unwrap();
        assert_eq!(req.path, "/v1/cwobject/temporary-credentials/saml");
        assert_eq!(
            (&body["samlResponse"], &body["configId"]),
            (&"PHNhbWw+".into(), &"wif-1".into())
        );
    }

    #[test]
    fn refusals_say_token_rejected_or_permission_denied() {
        let req = Request {
            path: "/",
            body: Secret::new("x"),
            principal: Some("role/https://idp:a".into()),
            shown_claims: Some("iss \"https://idp\"".into()),
            identity: Secret::new("PHNhbWw+c2VjcmV0"),
        };
        let base =
            |m: &str| ProviderError::Rejected(format!("CoreWeave OIDC exchange: HTTP 400: {m}"));
        let e = refused(
            &req,
            "oidc",
            http::StatusCode::BAD_REQUEST,
            base("Invalid token"),
        );
        assert!(
            matches!(&e, ProviderError::Auth(m) if m.contains("token rejected") && m.contains("Invalid token") && m.contains("https://idp")),
            "{e:?}"
        );
        let e = refused(
            &req,
            "oidc",
            http::StatusCode::BAD_REQUEST,
            base("permission denied"),
        );
        assert!(
            matches!(&e, ProviderError::Auth(m) if m.contains("no org access policy lets principal role/https://idp:a")),
            "{e:?}"
        );
        let five = ProviderError::Transient("down".into());
        assert_eq!(
            refused(
                &req,
                "oidc",
                http::StatusCode::SERVICE_UNAVAILABLE,
                five.clone()
            ),
            five
        );
        // What the provider quotes back of the identity never reaches the message.
        let echo = base("bad assertion PHNhbWw+c2VjcmV0 or token eyJhbGciOi.eyJzdWIi.c2ln, sorry");
        let m = refused(&req, "saml", http::StatusCode::BAD_REQUEST, echo).to_string();
        assert!(
            !m.contains("PHNhbWw") && !m.contains("eyJ") && m.contains("sorry"),
            "{m}"
        );
    }
}
