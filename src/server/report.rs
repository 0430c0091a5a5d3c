//! What the daemon reports about itself: `/readyz`, `/v1/status` and `/metrics`.

use bytes::Bytes;
use http::{Response, StatusCode};

use super::{json_ok, json_response, App, Body};

/// `GET /readyz`: 200 `{"ready": true}` when every prewarmed profile has a key it would serve
/// now, else 503 naming those that have none and why. For any peer that can connect: it tells
/// profile names and states, never a key id.
pub(super) fn readiness(app: &App) -> Response<Body> {
    let not_ready = app.broker.not_ready();
    if not_ready.is_empty() {
        return json_ok(&serde_json::json!({ "ready": true }));
    }
    let profiles: Vec<serde_json::Value> = not_ready
        .into_iter()
        .map(|p| {
            let reason = p.reason.unwrap_or_else(|| match p.state {
                "cold" => "no key to serve: no mint has started yet".to_string(),
                "minting" => "no key to serve yet: a mint is under way".to_string(),
                "revoked" => format!(
                    "an operator revoked its keys; `keybroker rotate {}` mints a new one",
                    p.profile
                ),
                "stopped" => "keybroker is stopping".to_string(),
                _ => "no key it may serve".to_string(),
            });
            serde_json::json!({ "profile": p.profile, "state": p.state, "reason": reason })
        })
        .collect();
    let body = serde_json::json!({ "ready": false, "profiles": profiles });
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from(body.to_string() + "\n"),
    )
}

pub(super) fn metrics_body(app: &App) -> String {
    let slots = app.broker.slots();
    let statuses: Vec<_> = slots.iter().map(|(_, slot)| slot.status()).collect();
    let samples: Vec<_> = slots
        .iter()
        .zip(&statuses)
        .map(|((name, slot), status)| crate::metrics::ProfileSample {
            profile: name,
            provider: slot.provider().kind(),
            values: status.into(),
            upstream: slot.upstream(),
        })
        .collect();
    crate::metrics::render(
        &samples,
        &app.requests,
        app.limits.snapshot(),
        app.broker.ledger_backlog(),
    )
}

/// A profile's status, in the numbers `/metrics` shows.
impl From<&crate::broker::SlotStatus> for crate::metrics::ProfileValues {
    fn from(status: &crate::broker::SlotStatus) -> Self {
        let c = &status.counters;
        crate::metrics::ProfileValues {
            mints: c.mints,
            renewals: c.renewals,
            revokes: c.revokes,
            mint_failures: c.mint_failures,
            revoke_failures: c.revoke_failures,
            degraded_serves: c.degraded_serves,
            key_remaining_seconds: status.expires_in_seconds.unwrap_or(0).max(0) as u64,
            retired_keys: status.retired_keys as u64,
            failing_revokes: status.failing_revokes.len() as u64,
            unsettled_creates: status.unsettled_creates.len() as u64,
            state: status.state,
        }
    }
}

pub(super) fn status_body(app: &App) -> Bytes {
    let profiles: Vec<serde_json::Value> = app
        .broker
        .status()
        .into_iter()
        .map(|(name, provider, status)| {
            let mut v = serde_json::to_value(&status).expect("status serializes");
            if let Some(file) = app.container.as_ref().and_then(|t| t.file(&name)) {
                v["container_token_file"] = file.display().to_string().into();
            }
            v["name"] = name.into();
            v["provider"] = provider.as_str().into();
            v
        })
        .collect();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "profiles": profiles,
    });
    Bytes::from(body.to_string() + "\n")
}
