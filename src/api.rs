//! The socket API's JSON bodies, one type per shape. The daemon serializes them and the client
//! reads them back with the same types, so the two cannot drift apart. The credential bodies
//! (`credential_process` and the container format) are in [`crate::credentials`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a profile is in its key's lifecycle, as status, `/readyz` and metrics show it. A
/// profile starts cold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No key and no mint yet (a profile minted on first request, before it).
    #[default]
    Cold,
    /// The first key is being minted.
    Minting,
    /// A key is served and no renewal is due.
    Ready,
    /// A key is served while its successor is being minted.
    Renewing,
    /// Minting fails; the last key is served until its degraded floor.
    Degraded,
    /// Minting fails and no key may be served.
    Unavailable,
    /// An operator revoked its keys; nothing is served until `keybroker rotate`.
    Revoked,
    /// The daemon is stopping.
    Stopped,
}

impl State {
    /// Every state, for the one-hot `keybroker_profile_state` gauge.
    pub const ALL: [State; 8] = [
        State::Cold,
        State::Minting,
        State::Ready,
        State::Renewing,
        State::Degraded,
        State::Unavailable,
        State::Revoked,
        State::Stopped,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Cold => "cold",
            State::Minting => "minting",
            State::Ready => "ready",
            State::Renewing => "renewing",
            State::Degraded => "degraded",
            State::Unavailable => "unavailable",
            State::Revoked => "revoked",
            State::Stopped => "stopped",
        }
    }

    /// A request would be answered with a key now (what `/readyz` waits for).
    pub fn serves(self) -> bool {
        matches!(self, State::Ready | State::Renewing | State::Degraded)
    }

    /// `keybroker status` exits 1 while a profile is in it.
    pub fn unhealthy(self) -> bool {
        matches!(self, State::Degraded | State::Unavailable | State::Revoked)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The daemon's version.
    pub version: String,
    /// Every profile, by name.
    pub profiles: Vec<ProfileStatus>,
}

/// One profile in [`StatusAnswer`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// The profile's name.
    pub name: String,
    /// Its provider (`coreweave`, `crusoe`, `glesys`, `dev`).
    pub provider: String,
    /// How it authenticates its mints, where its provider offers a choice (CoreWeave:
    /// `api-token`, `oidc`, `saml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Whether keybroker can revoke its keys (not so for CoreWeave Workload Identity without
    /// `token_file`: they are left to expire). A daemon from before this field said nothing,
    /// and could revoke.
    #[serde(default = "revocable_by_default")]
    pub revocable: bool,
    /// The file holding its container endpoint token, when the endpoint is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_token_file: Option<String>,
    /// Its key, schedule and health.
    #[serde(flatten)]
    pub slot: SlotStatus,
}

fn revocable_by_default() -> bool {
    true
}

/// What status shows of a profile's slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Its state.
    pub state: State,
    /// The current key's id.
    pub key_id: Option<String>,
    /// Who owns the current key at the provider, when it said (CoreWeave: `coreweave/<uid>`,
    /// `role/<iss>:<sub>`, `saml/<role>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The current key's expiry (RFC 3339).
    pub expires_at: Option<String>,
    /// Seconds until it expires.
    pub expires_in_seconds: Option<i64>,
    /// Next scheduled renewal (RFC 3339).
    pub next_renewal: Option<String>,
    /// Seconds until then.
    pub renews_in_seconds: Option<i64>,
    /// Retired keys not yet revoked.
    pub retired_keys: usize,
    /// Retired keys whose revocation failed, with the provider's words; retried.
    pub failing_revokes: Vec<FailingRevoke>,
    /// Retired keys given up on in this run because too many could not be revoked (each had
    /// expired by itself; the ledger keeps them for the next start).
    pub retired_given_up: u64,
    /// Creates whose outcome is unknown: their key, if it exists, is looked for by tag.
    pub unsettled_creates: Vec<UnsettledCreate>,
    /// Counters since the daemon started.
    pub counters: CountersSnapshot,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// What keeps the profile from minting although it needs a key: room under the
    /// provider's key limit, or too many retired keys that could not be revoked.
    pub blocked: Option<String>,
}

impl SlotStatus {
    /// A status in `state` with no key, for tests of what renders it.
    #[cfg(test)]
    pub fn example(state: State) -> Self {
        SlotStatus {
            state,
            key_id: None,
            principal: None,
            expires_at: None,
            expires_in_seconds: None,
            next_renewal: None,
            renews_in_seconds: None,
            retired_keys: 0,
            failing_revokes: Vec::new(),
            retired_given_up: 0,
            unsettled_creates: Vec::new(),
            counters: CountersSnapshot::default(),
            last_error: None,
            blocked: None,
        }
    }
}

/// A retired key whose revocation keeps failing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailingRevoke {
    /// The key's id.
    pub key_id: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// How the last attempt failed.
    pub kind: RevokeFailure,
    /// What the provider said.
    pub error: String,
    /// The next attempt (RFC 3339).
    pub next_attempt: String,
}

/// How a revocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevokeFailure {
    /// The provider said no (credentials, permissions): retried every 15 minutes.
    Refused,
    /// The call failed on the way (network, 5xx, throttling): retried with backoff.
    Transient,
}

impl fmt::Display for RevokeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevokeFailure::Refused => "refused",
            RevokeFailure::Transient => "transient",
        })
    }
}

/// A create whose outcome is unknown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnsettledCreate {
    /// The tag its key would carry.
    pub tag: String,
    /// When its request ended (RFC 3339).
    pub since: String,
    /// Why the last look for it failed, if it did.
    pub last_error: Option<String>,
}

/// A profile's counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// Successful mints (first keys and renewals).
    pub mints: u64,
    /// Mints that replaced a current key.
    pub renewals: u64,
    /// Failed mint attempts.
    pub mint_failures: u64,
    /// Successful revocations.
    pub revokes: u64,
    /// Failed revoke attempts.
    pub revoke_failures: u64,
    /// Requests answered with a key while the profile was degraded.
    pub degraded_serves: u64,
    /// Requests answered 503.
    pub unavailable: u64,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    /// Every prewarmed profile has a key it would serve.
    pub ready: bool,
    /// The prewarmed profiles that have none (only when not ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<NotReady>,
}

/// A prewarmed profile with no key to serve, in [`Readiness`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotReady {
    /// The profile's name.
    pub profile: String,
    /// Its state.
    pub state: State,
    /// Why it has no key.
    pub reason: String,
}

/// Every error answer of the socket API: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// The error.
    pub error: ErrorBody,
}

/// The inside of [`ErrorAnswer`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable word for programs (`unknown_profile`, `unavailable`, ...).
    pub code: String,
    /// One sentence for people: what failed and what to do.
    pub message: String,
}

/// The body of `POST /v1/admin/revoke-principal/{profile}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalRequest {
    /// The CoreWeave principal whose keys are revoked.
    pub principal: String,
}

/// The answer to `POST /v1/admin/rotate/{profile}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateAnswer {
    /// The profile.
    pub profile: String,
    /// Its new key.
    #[serde(flatten)]
    pub rotated: Rotated,
}

/// What a rotation achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    /// The new key's id.
    pub key_id: String,
    /// Its expiry (RFC 3339).
    pub expires_at: String,
    /// The key it replaced, now retired: valid until its expiry, then revoked.
    pub retired: Option<String>,
}

/// The answer to `POST /v1/admin/revoke/{profile}` and `.../revoke-principal/{profile}`
/// when every key is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeAnswer {
    /// The profile.
    pub profile: String,
    /// The keys revoked now.
    pub revoked: Vec<String>,
    /// The principal whose keys the provider revoked (revoke-principal only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words_round_trip() {
        for state in State::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
            assert_eq!(serde_json::from_str::<State>(&json).unwrap(), state);
        }
    }

    #[test]
    fn a_profile_status_is_flat_on_the_wire() {
        let p = ProfileStatus {
            name: "p".into(),
            provider: "dev".into(),
            auth: None,
            revocable: true,
            container_token_file: None,
            slot: SlotStatus::example(State::Ready),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["name"], "p");
        assert_eq!(v["state"], "ready");
        assert_eq!(v["counters"]["mints"], 0);
        assert!(v.get("container_token_file").is_none());
        let back: ProfileStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.slot.state, State::Ready);
    }
}

/// `GET /v1/profiles`: the profiles the caller may read, with what a client needs to use them
/// (`keybroker aws-config`, `keybroker exec`). Never a secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfilesAnswer {
    /// By name.
    pub profiles: Vec<ClientProfile>,
}

/// One profile as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientProfile {
    /// The keybroker profile.
    pub name: String,
    /// Its provider (`coreweave`, `crusoe`, `glesys`, `dev`).
    pub provider: String,
    /// Its S3 service, the profile's settings over the provider's defaults.
    pub s3: S3Settings,
    /// The container endpoint for this profile, when the daemon serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerAccess>,
}

/// How SDKs reach a provider's S3 service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Settings {
    /// The endpoint URL, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region to sign for, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `virtual` or `path`, when the provider needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addressing_style: Option<String>,
    /// SDKs should send and check checksums only when an operation requires them: the store
    /// may reject the ones SDKs send by default.
    #[serde(default)]
    pub checksums_when_required: bool,
    /// Settings no default can fill, each with the line to add to the profile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingSetting>,
}

/// A client setting the profile lacks and the line that gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingSetting {
    /// The AWS setting: `endpoint_url` or `region`.
    pub setting: String,
    /// What to add to the profile's table in keybroker.toml, e.g. `s3_region = "US-EAST-04A"`.
    pub add: String,
}

/// The container endpoint of one profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerAccess {
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub url: String,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`: readable by those the file's mode lets in.
    pub token_file: std::path::PathBuf,
}
