//! The secret-holding types and the two wire formats keys are served in.
//!
//! `credential_process` JSON is what aws-cli and every SDK accept (README, "Clients"): integer `Version` 1, both keys,
//! `SessionToken` only when the provider gives one, and `Expiration` always present as UTC with
//! whole seconds and a literal `Z` (the one format every SDK's parser accepts).

use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// A secret string (a minted secret key, a provider token). Zeroed on drop, printed as
/// `[redacted]`, read only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The secret itself: the one way to read it, so every use is easy to find.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `2026-11-23T18:00:00Z`: UTC, whole seconds (rounded down, so never later than the truth).
pub fn format_expiration(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).expect("0 is a valid nanosecond");
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .expect("a UTC date in range formats")
}

/// The `credential_process` body: what [`process_json`] writes, and what the clients that
/// need its fields (`exec`, the container endpoint) read back with [`ProcessJson::read`].
#[derive(Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessJson<'a> {
    /// Always 1.
    pub version: u8,
    /// The key id.
    pub access_key_id: &'a str,
    /// The secret.
    pub secret_access_key: &'a str,
    /// The session token, when the provider gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_token: Option<&'a str>,
    /// `Expiration`, as [`format_expiration`] writes it.
    pub expiration: &'a str,
}

impl<'a> ProcessJson<'a> {
    /// The key in a body [`process_json`] made (its fields borrowed from `body`).
    pub fn read(body: &'a [u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(body)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerJson<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: &'a str,
}

/// The `credential_process` body, rendered once per key. The bytes are zeroed when the last
/// clone is dropped.
pub fn process_json(
    access_key_id: &str,
    secret: &Secret,
    session_token: Option<&Secret>,
    expiration: OffsetDateTime,
) -> Bytes {
    let expiration = format_expiration(expiration);
    render(&ProcessJson {
        version: 1,
        access_key_id,
        secret_access_key: secret.expose(),
        session_token: session_token.map(Secret::expose),
        expiration: &expiration,
    })
}

/// The container-credentials body of the key in `process` (a body [`process_json`] made;
/// `Token` is empty when the provider gives none), rendered when the container endpoint asks
/// for it: a key holds one body, not two. `None` if `process` is not such a body.
pub fn container_from_process(process: &[u8]) -> Option<Bytes> {
    let key = ProcessJson::read(process).ok()?;
    Some(render(&ContainerJson {
        access_key_id: key.access_key_id,
        secret_access_key: key.secret_access_key,
        token: key.session_token.unwrap_or(""),
        expiration: key.expiration,
    }))
}

fn render(value: &impl Serialize) -> Bytes {
    let mut buf = Zeroizing::new(Vec::with_capacity(256));
    serde_json::to_writer(&mut *buf, value).expect("string fields always serialize");
    buf.push(b'\n');
    Bytes::from_owner(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn expiration_is_utc_whole_seconds_with_z() {
        let t = datetime!(2026-11-23 19:00:00.999 +01:00);
        assert_eq!(format_expiration(t), "2026-11-23T18:00:00Z");
    }

    #[test]
    fn process_json_has_the_documented_shape() {
        let body = process_json(
            "AK",
            &Secret::new("SK"),
            None,
            datetime!(2026-11-23 18:00:00 UTC),
        );
        assert_eq!(
            &body[..],
            b"{\"Version\":1,\"AccessKeyId\":\"AK\",\"SecretAccessKey\":\"SK\",\"Expiration\":\"2026-11-23T18:00:00Z\"}\n"
        );
        let body = process_json(
            "AK",
            &Secret::new("SK"),
            Some(&Secret::new("T")),
            datetime!(2026-11-23 18:00:00 UTC),
        );
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("\"SessionToken\":\"T\""));
    }

    #[test]
    fn container_json_always_has_token() {
        assert_eq!(container_from_process(b"not json"), None);
        let process = process_json(
            "AK",
            &Secret::new("SK"),
            None,
            datetime!(2026-11-23 18:00:00 UTC),
        );
        let body = container_from_process(&process).unwrap();
        assert_eq!(
            &body[..],
            b"{\"AccessKeyId\":\"AK\",\"SecretAccessKey\":\"SK\",\"Token\":\"\",\"Expiration\":\"2026-11-23T18:00:00Z\"}\n"
        );
    }
}
